#!/usr/bin/env python3
"""QEMU -> QEMU migration benchmark: the real-QEMU baseline for the multifd package.

Runs one migration per rep between two freshly started qemu-system-x86_64 processes on this
machine and prints one JSON line per rep on stdout (progress and diagnostics go to stderr).
Python 3 standard library only; see bench/qemu/README.md.
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time

from qmp import QEMU_BINARY, QMPError, QemuProcess

MiB = 1 << 20
UNLIMITED_BANDWIDTH = 1 << 40  # bytes/s; QEMU 10's default max-bandwidth is 128 MiB/s
QMP_CONNECT_TIMEOUT = 60.0     # covers QEMU start-up including prealloc of the guest RAM
QUIT_TIMEOUT = 10.0
TERMINAL_STATES = ("completed", "failed", "cancelled")

EPILOG = """\
modes:
  tcp      source -> tcp:127.0.0.1:<port picked by the destination> -> destination
  unix     source -> unix socket in a private temp dir -> destination
  save     source -> file:FILE (use with --mapped-ram for multifd; nothing to hash)
  restore  file:FILE -> destination; the destination RAM is compared with --src-ram, so pass
           the same --src-ram and --size-mib that the save used

examples:
  %(prog)s --size-mib 256 --channels 4 --prealloc both --src-ram /dev/shm/src.ram --reps 3
  %(prog)s --size-mib 256 --channels 0 --mode unix
  %(prog)s --size-mib 256 --channels 4 --mapped-ram --mode save    --file /var/tmp/g.img --src-ram /dev/shm/src.ram
  %(prog)s --size-mib 256 --channels 4 --mapped-ram --mode restore --file /var/tmp/g.img --src-ram /dev/shm/src.ram

Every rep starts new QEMU processes (TCG, paused guest, no disk, memory-backend-file share=on)
and a new destination RAM file; all are removed when the rep ends, on error and on Ctrl-C.
The QEMU binary can be overridden with the QEMU environment variable.
"""


class Interrupted(BaseException):
    """Raised from SIGTERM/SIGHUP handlers so that every finally-block runs."""


def on_signal(signum, _frame):
    raise Interrupted("signal %d" % signum)


class Resources:
    """Everything the driver created, released newest first.

    An item leaves the list only after it has been released, so a release cut short by a
    signal is finished by the final release in main()."""

    def __init__(self):
        self._items = []

    def process(self, proc):
        self._items.append(("proc", proc))
        return proc

    def path(self, path):
        self._items.append(("path", path))
        return path

    def keep(self, path):
        """Stop tracking `path`: it is a result now, not a temp file."""
        self._items = [it for it in self._items if it != ("path", path)]

    def mark(self):
        return len(self._items)

    def release(self, mark=0):
        while len(self._items) > mark:
            kind, item = self._items[-1]
            try:
                if kind == "proc":
                    item.stop(QUIT_TIMEOUT)
                elif os.path.isdir(item) and not os.path.islink(item):
                    shutil.rmtree(item, ignore_errors=True)
                elif os.path.lexists(item):
                    os.unlink(item)
            except Exception as e:  # keep releasing the rest
                log("cleanup of %s failed: %s" % (item, e))
            self._items.pop()


TEMP_PREFIX = "multifd-qemu-"
TEMP_NAME = re.compile(r"^multifd-qemu-(?:run|src|dst)-(\d+)-")


def temp_dir(kind, parent):
    """A private directory whose name carries our PID (see sweep_stale)."""
    return tempfile.mkdtemp(prefix="%s%s-%d-" % (TEMP_PREFIX, kind, os.getpid()), dir=parent)


def sweep_stale():
    """Remove temp dirs left by a driver that was SIGKILLed (its QEMUs died with it)."""
    for parent in ("/dev/shm", tempfile.gettempdir()):
        try:
            names = os.listdir(parent)
        except OSError:
            continue
        for name in names:
            m = TEMP_NAME.match(name)
            if not m:
                continue
            try:
                os.kill(int(m.group(1)), 0)
                continue  # owner still running
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
            log("removing stale %s" % os.path.join(parent, name))
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def log(msg):
    print("qemu_mig: " + msg, file=sys.stderr, flush=True)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(4 * MiB)
            if not chunk:
                return h.hexdigest()
            h.update(chunk)


def free_bytes(directory):
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def write_random_file(path, size, res):
    """Create `path` with `size` random bytes; a half-written file never survives."""
    tmp = res.path(path + ".partial-%d" % os.getpid())
    with open(tmp, "wb") as f:
        left = size
        while left:
            n = min(left, 4 * MiB)
            f.write(os.urandom(n))
            left -= n
    os.rename(tmp, path)


def prepare_src_ram(args, res):
    """Return the source RAM file path, creating it (random data) when missing."""
    size = args.size_mib * MiB
    if args.src_ram is None:
        if free_bytes("/dev/shm") < 2 * size:
            raise SystemExit("qemu_mig: /dev/shm lacks room for source and destination RAM")
        d = res.path(temp_dir("src", "/dev/shm"))
        path = os.path.join(d, "src.ram")
        log("creating temporary %d MiB random source RAM (removed at exit)" % args.size_mib)
        write_random_file(path, size, res)
        return path
    path = args.src_ram
    if os.path.exists(path):
        have = os.path.getsize(path)
        if have != size:
            raise SystemExit("qemu_mig: %s holds %d bytes, --size-mib %d needs %d; remove it or "
                             "pass another --src-ram" % (path, have, args.size_mib, size))
        return path
    if args.mode == "restore":
        raise SystemExit("qemu_mig: --mode restore needs the --src-ram the save used; %s is missing" % path)
    if free_bytes(os.path.dirname(os.path.abspath(path))) < 2 * size:
        raise SystemExit("qemu_mig: not enough space next to %s for source and destination RAM" % path)
    log("creating %s with %d MiB of random data (kept for later runs)" % (path, args.size_mib))
    write_random_file(path, size, res)
    return path


def qemu_args(ram_path, size_mib, prealloc, incoming, tls_dir=None):
    backend = "memory-backend-file,id=mem,size=%dM,mem-path=%s,share=on" % (size_mib, ram_path)
    if prealloc:
        # Faults every guest page in at start-up, before the timed window.
        backend += ",prealloc=on,prealloc-threads=%d" % max(1, os.cpu_count() or 1)
    argv = ["-S", "-display", "none", "-nodefaults", "-no-user-config",
            "-accel", "tcg", "-smp", "1",
            "-object", backend,
            "-machine", "pc,memory-backend=mem", "-m", "%dM" % size_mib]
    if incoming:
        argv += ["-incoming", "defer"]
    if tls_dir:
        endpoint = "server" if incoming else "client"
        argv += ["-object", "tls-creds-x509,id=tls0,dir=%s,endpoint=%s,verify-peer=on"
                 % (os.path.join(tls_dir, endpoint), endpoint)]
    return argv


def qemu_tls_dir(pki, parent):
    """QEMU's tls-creds-x509 layout (ca-cert.pem, server-*/client-*.pem) from the
    scripts/test-certs.sh files: dest is the server, source the client."""
    out = tempfile.mkdtemp(prefix="tls-", dir=parent)
    for endpoint, who in (("server", "dest"), ("client", "source")):
        d = os.path.join(out, endpoint)
        os.mkdir(d)
        shutil.copy(os.path.join(pki, "ca.pem"), os.path.join(d, "ca-cert.pem"))
        shutil.copy(os.path.join(pki, who + ".pem"), os.path.join(d, endpoint + "-cert.pem"))
        shutil.copy(os.path.join(pki, who + ".key"), os.path.join(d, endpoint + "-key.pem"))
    return out


def configure(qmp, args, side):
    """Capabilities and parameters, identical on both sides except the sender-only ones."""
    caps = {"events": True}
    if args.channels > 0:
        caps["multifd"] = True
    if args.mapped_ram:
        caps["mapped-ram"] = True
    if args.zero_copy and side == "src":
        caps["zero-copy-send"] = True
    qmp.execute("migrate-set-capabilities",
                capabilities=[{"capability": k, "state": v} for k, v in caps.items()])
    params = {}
    if args.channels > 0:
        params["multifd-channels"] = args.channels
        params["multifd-compression"] = args.compression
        if args.compression_level is not None:
            params["multifd-%s-level" % args.compression] = args.compression_level
    if side == "src":
        params["max-bandwidth"] = UNLIMITED_BANDWIDTH
    if args.tls_dir:
        params["tls-creds"] = "tls0"
        if side == "src":
            params["tls-hostname"] = "localhost"
    if params:
        qmp.execute("migrate-set-parameters", **params)


def wait_migration(proc, timeout):
    """(final status, completion timestamp in seconds since the epoch)."""
    ev = proc.qmp.wait_event(
        lambda e: e.get("event") == "MIGRATION" and e["data"]["status"] in TERMINAL_STATES,
        timeout)
    ts = ev["timestamp"]
    return ev["data"]["status"], ts["seconds"] + ts["microseconds"] / 1e6


def migration_error(proc):
    try:
        return proc.qmp.execute("query-migrate", timeout=5).get("error-desc")
    except (QMPError, TimeoutError, OSError):
        return None


def dead_logs(procs, already=""):
    """QEMU's own words when a process died under us (unless `already` quotes them)."""
    return "".join("; %s exited %s: %s" % (p.name, p.proc.returncode, p.log_tail())
                   for p in procs if p and not p.alive() and p.log_tail() not in already)


def run_once(args, rep, src_ram, src_sha, workdir, res):
    size = args.size_mib * MiB
    record = {
        "tool": "qemu", "qemuVersion": None, "mode": args.mode, "rep": rep,
        "channels": args.channels, "compression": args.compression,
        "compressionLevel": args.compression_level, "zeroCopy": args.zero_copy,
        "mappedRam": args.mapped_ram, "prealloc": args.prealloc, "sizeBytes": size,
        "tls": bool(args.tls_dir),
        "seconds": None, "bytesPerSecond": None, "srcCpuSeconds": None, "dstCpuSeconds": None,
        "status": "error", "sha256Match": None,
    }
    mark = res.mark()
    prealloc = args.prealloc == "both"
    src = dst = None
    try:
        rundir = res.path(tempfile.mkdtemp(prefix="rep%d-" % rep, dir=workdir))
        # Start both processes first so their start-up (and prealloc) overlaps.
        t_start = time.monotonic()
        tls = qemu_tls_dir(args.tls_dir, rundir) if args.tls_dir else None
        if args.mode in ("tcp", "unix", "restore"):
            dst_dir = res.path(temp_dir("dst", "/dev/shm"))
            dst_ram = os.path.join(dst_dir, "dst.ram")
            dst = res.process(QemuProcess("dst", rundir, qemu_args(dst_ram, args.size_mib, prealloc, True, tls)))
        if args.mode in ("tcp", "unix", "save"):
            src = res.process(QemuProcess("src", rundir, qemu_args(src_ram, args.size_mib, prealloc, False, tls)))
        for p in (dst, src):
            if p:
                p.connect(QMP_CONNECT_TIMEOUT)
                configure(p.qmp, args, p.name)
        record["qemuVersion"] = (src or dst).qmp.qemu_version
        record["startupSeconds"] = round(time.monotonic() - t_start, 3)  # untimed, incl. prealloc

        if args.mode == "tcp":
            dst.qmp.execute("migrate-incoming", uri="tcp:127.0.0.1:0")
            addrs = dst.qmp.execute("query-migrate").get("socket-address") or []
            ports = [a["port"] for a in addrs if a.get("type") == "inet"]
            if not ports:
                raise QMPError("destination did not report its listening port: %r" % (addrs,))
            uri = "tcp:127.0.0.1:%s" % ports[0]
        elif args.mode == "unix":
            uri = "unix:" + os.path.join(rundir, "mig.sock")
            dst.qmp.execute("migrate-incoming", uri=uri)
        else:
            uri = "file:" + os.path.abspath(args.file)
            if args.mode == "save":
                # A half-written image is removed; a complete one is kept (see below).
                res.path(os.path.abspath(args.file))
                if os.path.lexists(args.file):
                    os.unlink(args.file)
        record["uri"] = uri

        procs = [p for p in (src, dst) if p]
        cpu0 = {p.name: p.cpu_seconds() for p in procs}
        t0 = time.time()
        if args.mode == "restore":
            dst.qmp.execute("migrate-incoming", uri=uri)
        else:
            src.qmp.execute("migrate", uri=uri)

        # The sender finishes first (or fails first); the receiver is then bounded tightly.
        done = {}
        for p in procs:
            timeout = args.timeout if not done or all(s == "completed" for s, _ in done.values()) else 10
            try:
                done[p.name] = wait_migration(p, timeout)
            except TimeoutError:
                done[p.name] = ("timeout", None)
            except (QMPError, OSError):
                if p.alive():
                    raise
                done[p.name] = ("exited", None)
        cpu1 = {p.name: p.cpu_seconds() for p in procs}

        for p in procs:
            record[p.name + "Status"] = done[p.name][0]
            if cpu1[p.name] is not None:
                record[p.name + "CpuSeconds"] = round(cpu1[p.name] - cpu0[p.name], 3)
        statuses = [s for s, _ in done.values()]
        ok = all(s == "completed" for s in statuses)
        record["status"] = "completed" if ok else next(s for s in statuses if s != "completed")
        if not ok:
            errs = [e for e in (migration_error(p) for p in procs) if e]
            if "timeout" in statuses:
                errs.insert(0, "no final MIGRATION event within --timeout %g s" % args.timeout)
            record["error"] = ("; ".join(errs) or "migration did not complete") + dead_logs(procs)
            return record

        seconds = max(ts for _, ts in done.values()) - t0
        record["seconds"] = round(seconds, 4)
        record["bytesPerSecond"] = round(size / seconds) if seconds > 0 else None
        if args.sync:
            # Durable now, not after QEMU has quit: the kernel keeps writing the file back
            # meanwhile, and that time would go untimed.
            fd = os.open(args.file, os.O_RDONLY)
            try:
                t_sync = time.monotonic()
                os.fsync(fd)
                record["syncSeconds"] = round(time.monotonic() - t_sync, 4)
            finally:
                os.close(fd)
        if src:
            info = src.qmp.execute("query-migrate")
            ram = info.get("ram", {})
            record.update({
                "qemuTotalTimeMs": info.get("total-time"),
                "qemuSetupTimeMs": info.get("setup-time"),
                "qemuDowntimeMs": info.get("downtime"),
                "transferredBytes": ram.get("transferred"),
                "multifdBytes": ram.get("multifd-bytes"),
                "normalPages": ram.get("normal"),
                "zeroPages": ram.get("duplicate"),
            })
            params = src.qmp.execute("query-migrate-parameters")
            record["maxBandwidth"] = params.get("max-bandwidth")

        # Quit QEMU before reading files it wrote.
        for p in procs:
            p.stop(QUIT_TIMEOUT)
        if args.mode == "save":
            res.keep(os.path.abspath(args.file))
            st = os.stat(args.file)
            record["fileBytes"] = st.st_size
            record["fileAllocatedBytes"] = st.st_blocks * 512
        else:
            record["sha256Match"] = (os.path.getsize(dst_ram) == size and sha256_file(dst_ram) == src_sha)
            if not record["sha256Match"]:
                record["status"] = "mismatch"
        return record
    except (QMPError, TimeoutError, OSError, KeyError, ValueError) as e:
        record["status"] = "error"
        msg = "%s: %s" % (type(e).__name__, e)
        record["error"] = msg + dead_logs([src, dst], msg)
        return record
    finally:
        res.release(mark)


def parse_args(argv):
    ap = argparse.ArgumentParser(
        prog="qemu_mig.py", description="QEMU -> QEMU (multifd) migration benchmark; "
        "one JSON line per rep on stdout.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["tcp", "unix", "save", "restore"], default="tcp")
    ap.add_argument("--size-mib", type=int, default=256, help="guest RAM size (default 256)")
    ap.add_argument("--channels", type=int, default=4,
                    help="multifd channels; 0 turns multifd off (default 4)")
    ap.add_argument("--compression", choices=["none", "zlib", "zstd"], default="none")
    ap.add_argument("--compression-level", type=int, default=None,
                    help="multifd-zlib-level / multifd-zstd-level (QEMU default 1)")
    ap.add_argument("--zero-copy", action="store_true",
                    help="zero-copy-send on the source (multifd, no compression, tcp/unix)")
    ap.add_argument("--prealloc", choices=["both", "none"], default="both",
                    help="both: source and destination RAM faulted in before the timed window; "
                         "none: the destination writes into fresh memory (default both)")
    ap.add_argument("--src-ram", default=None,
                    help="source RAM file (in /dev/shm), created with random data when missing "
                         "and kept; default: a temporary random file removed at exit")
    ap.add_argument("--mapped-ram", action="store_true", help="mapped-ram capability (save/restore)")
    ap.add_argument("--tls-dir", default=None,
                    help="mutual TLS with the certificates scripts/test-certs.sh made in this directory")
    ap.add_argument("--file", default=None, help="migration file for --mode save/restore")
    ap.add_argument("--sync", action="store_true",
                    help="--mode save: fsync the file as soon as QEMU reports completion and "
                         "report that fsync's duration as syncSeconds (QEMU itself does not sync)")
    ap.add_argument("--reps", type=int, default=1, help="migrations to run, one JSON line each")
    ap.add_argument("--timeout", type=float, default=300.0,
                    help="seconds to wait for one migration to finish (default 300)")
    a = ap.parse_args(argv)
    if a.size_mib < 16 or a.size_mib > 64 * 1024:
        ap.error("--size-mib must be between 16 and 65536")
    if a.channels < 0 or a.channels > 255:
        ap.error("--channels must be between 0 and 255")
    if a.reps < 1:
        ap.error("--reps must be at least 1")
    if a.timeout <= 0:
        ap.error("--timeout must be positive")
    if a.compression != "none" and a.channels == 0:
        ap.error("--compression needs multifd (--channels > 0)")
    if a.compression == "none" and a.compression_level is not None:
        ap.error("--compression-level needs --compression zlib or zstd")
    if a.zero_copy and (a.channels == 0 or a.compression != "none" or a.mode not in ("tcp", "unix")):
        ap.error("--zero-copy needs --channels > 0, --compression none and --mode tcp or unix")
    if a.mode in ("save", "restore"):
        if not a.file:
            ap.error("--mode %s needs --file" % a.mode)
        if a.channels > 0 and not a.mapped_ram:
            ap.error("multifd to/from a file needs --mapped-ram (or --channels 0)")
        if a.mapped_ram and a.compression != "none":
            ap.error("--mapped-ram does not support compression")
        if a.mode == "restore" and not a.src_ram:
            ap.error("--mode restore needs --src-ram (the file the save used) to verify the RAM")
        if a.mode == "restore" and not os.path.isfile(a.file):
            ap.error("--file %s does not exist; run --mode save first" % a.file)
    elif a.mapped_ram or a.file:
        ap.error("--mapped-ram and --file belong to --mode save/restore")
    if a.sync and a.mode != "save":
        ap.error("--sync belongs to --mode save")
    return a


def main(argv):
    args = parse_args(argv)
    if shutil.which(QEMU_BINARY) is None:
        raise SystemExit("qemu_mig: %s not found; run scripts/install-qemu.sh" % QEMU_BINARY)
    # Explicit, because a shell may start background jobs with SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    res = Resources()
    failed = False
    try:
        sweep_stale()
        workdir = res.path(temp_dir("run", tempfile.gettempdir()))
        src_ram = prepare_src_ram(args, res)
        need = args.size_mib * MiB if args.mode != "save" else 0
        if free_bytes("/dev/shm") < need:
            raise SystemExit("qemu_mig: /dev/shm lacks %d MiB for the destination RAM" % args.size_mib)
        src_sha = sha256_file(src_ram) if args.mode != "save" else None
        for rep in range(args.reps):
            record = run_once(args, rep, src_ram, src_sha, workdir, res)
            print(json.dumps(record), flush=True)
            if record["status"] != "completed":
                failed = True
                break
    except KeyboardInterrupt:
        log("interrupted; stopping QEMU and removing temp files")
        failed = True
    except Interrupted as e:
        log("%s; stopping QEMU and removing temp files" % e)
        failed = True
    finally:
        # A second Ctrl-C must not cut the cleanup short.
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)
        res.release()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
