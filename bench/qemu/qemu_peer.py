#!/usr/bin/env python3
"""One QEMU 10 side of a migration whose other side is `multifd recv --qemu` / `send --qemu`
(Python 3 standard library only; used by __test__/qemu-peer.spec.ts).

  source  --uri tcp:HOST:PORT   a paused pc guest whose RAM is --ram migrates to URI;
          prints {"status": ..., "seconds": ...}. --kill-after-bytes N SIGKILLs QEMU once
          N bytes went out (with --max-bandwidth to make that mid-way).
  dest    a QEMU started with -incoming defer, then migrate-incoming tcp:127.0.0.1:0; prints
          {"port": P} as soon as it listens, then {"status": ..., "ramMatch": bool} when the
          migration ended, comparing its RAM with --ram.

Every QEMU runs with TCG, -nodefaults, a memory-backend-file in a private /dev/shm dir, and
dies with this driver (see qmp.py). Restores from a file: qemu_mig.py --mode restore.
"""

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qmp import QMPError, QemuProcess  # noqa: E402
from qemu_mig import qemu_args  # noqa: E402

MiB = 1 << 20


def out(obj):
    print(json.dumps(obj), flush=True)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(4 * MiB), b""):
            h.update(chunk)
    return h.hexdigest()


def configure(qmp, a, side):
    caps = [{"capability": "events", "state": True}]
    if a.channels > 0:
        caps.append({"capability": "multifd", "state": True})
    qmp.execute("migrate-set-capabilities", capabilities=caps)
    params = {}
    if a.channels > 0:
        params["multifd-channels"] = a.channels
        params["multifd-compression"] = a.compression
    if side == "src":
        params["max-bandwidth"] = a.max_bandwidth
        params["zero-page-detection"] = a.zero_page_detection
    if params:
        qmp.execute("migrate-set-parameters", **params)


def wait_done(proc, timeout):
    ev = proc.qmp.wait_event(lambda e: e.get("event") == "MIGRATION" and e["data"]["status"] in ("completed", "failed", "cancelled"), timeout)
    return ev["data"]["status"]


def source(a, workdir):
    size = os.path.getsize(a.ram)
    src = QemuProcess("src", workdir, qemu_args(a.ram, size // MiB, False, False))
    try:
        src.connect(60)
        configure(src.qmp, a, "src")
        t0 = time.monotonic()
        src.qmp.execute("migrate", uri=a.uri)
        if a.kill_after_bytes:
            deadline = time.monotonic() + a.timeout
            while time.monotonic() < deadline:
                info = src.qmp.execute("query-migrate")
                if info.get("status") in ("completed", "failed"):
                    out({"status": "finished-before-kill", "info": info.get("status")})
                    return 1
                if info.get("ram", {}).get("transferred", 0) >= a.kill_after_bytes:
                    src.kill()
                    out({"status": "killed", "transferred": info["ram"]["transferred"]})
                    return 0
                time.sleep(0.02)
            out({"status": "timeout"})
            return 1
        status = wait_done(src, a.timeout)
        err = None if status == "completed" else src.qmp.execute("query-migrate").get("error-desc")
        out({"status": status, "seconds": round(time.monotonic() - t0, 4), **({"error": err} if err else {})})
        return 0 if status == "completed" else 1
    finally:
        src.stop(10)


def dest(a, workdir):
    size = os.path.getsize(a.ram)
    shm = tempfile.mkdtemp(prefix="multifd-qemu-dst-%d-" % os.getpid(), dir="/dev/shm")
    try:
        dst_ram = os.path.join(shm, "dst.ram")
        dst = QemuProcess("dst", workdir, qemu_args(dst_ram, size // MiB, False, True))
        try:
            dst.connect(60)
            configure(dst.qmp, a, "dst")
            dst.qmp.execute("migrate-incoming", uri="tcp:127.0.0.1:0")
            addrs = dst.qmp.execute("query-migrate").get("socket-address") or []
            out({"port": [x["port"] for x in addrs if x.get("type") == "inet"][0]})
            status = wait_done(dst, a.timeout)
            err = None if status == "completed" else dst.qmp.execute("query-migrate").get("error-desc")
            dst.stop(10)
            match = status == "completed" and os.path.getsize(dst_ram) == size and sha256_file(dst_ram) == sha256_file(a.ram)
            out({"status": status, "ramMatch": match, **({"error": err} if err else {})})
            return 0 if match else 1
        finally:
            dst.stop(10)
    finally:
        shutil.rmtree(shm, ignore_errors=True)


def main(argv):
    ap = argparse.ArgumentParser(prog="qemu_peer.py")
    ap.add_argument("mode", choices=["source", "dest"])
    ap.add_argument("--ram", required=True, help="guest RAM image (source) or the one to compare with (dest)")
    ap.add_argument("--uri", help="source: where to migrate")
    ap.add_argument("--channels", type=int, default=2)
    ap.add_argument("--compression", choices=["none", "zlib", "zstd"], default="none")
    ap.add_argument("--max-bandwidth", type=int, default=1 << 40)
    ap.add_argument("--zero-page-detection", choices=["multifd", "legacy", "none"], default="multifd",
                    help="source: where zero pages are found (legacy: on the main channel)")
    ap.add_argument("--kill-after-bytes", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=120)
    a = ap.parse_args(argv)
    workdir = tempfile.mkdtemp(prefix="multifd-qemu-run-%d-" % os.getpid())
    try:
        return source(a, workdir) if a.mode == "source" else dest(a, workdir)
    except (QMPError, TimeoutError, OSError) as e:
        out({"status": "error", "error": "%s: %s" % (type(e).__name__, e)})
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
