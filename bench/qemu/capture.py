#!/usr/bin/env python3
"""Record the byte streams of one real QEMU -> QEMU multifd migration (Python 3 stdlib only).

Capture mode (default) runs one migration between two fresh qemu-system-x86_64 processes on
loopback TCP through a recording proxy: every connection the source opens to the proxy is
forwarded to the destination, and its source->destination bytes are saved to a file of its
own, in arrival order: the first connection is the main channel (main.bin), the others are
the multifd channels (channel-0.bin, channel-1.bin, ...; arrival order, which need not be the
channel id: the 64-byte init packet at the start of each file carries the id). manifest.json
describes the run. The guest RAM is a known file (--ram; created with the deterministic
content of ramgen.py when missing), and the destination's RAM must come out identical.

Walk mode (--walk PATH...) is an independent reader of multifd channel streams: it prints
every packet (flags, normal/zero page counts, next_packet_size, block) and checks that the
stream is well formed to its last byte. Given a capture directory it also checks that the
channels together cover every page of every RAM block exactly once, and that block "mem"
holds the RAM image page for page (decompressing zlib with the stdlib and zstd with the zstd
command-line tool when it is installed).

Examples:
  python3 bench/qemu/capture.py --compression zstd --channels 2 --size-mib 16 \\
      --ram /dev/shm/capture-16.ram --outdir /tmp/cap-zstd
  python3 bench/qemu/capture.py --walk /tmp/cap-zstd                 # summary + full checks
  python3 bench/qemu/capture.py --walk /tmp/cap-zstd/channel-0.bin -v  # one line per packet
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ramgen  # noqa: E402
from qmp import QEMU_BINARY, QMPError, QemuProcess  # noqa: E402

MiB = 1 << 20
PAGE = 4096
MULTIFD_PACKET_SIZE = 512 * 1024
MULTIFD_MAGIC = 0x11223344
QEVM_MAGIC = 0x5145564D
INIT_LEN = 64
HDR_LEN = 12
DEVICE_STATE_LEN = 276
FLAG_SYNC = 0x01
FLAG_DEVICE_STATE = 0x40
COMP_MASK = 0x3E
COMP_NAMES = {0x00: "none", 0x02: "zlib", 0x04: "zstd", 0x08: "qpl", 0x10: "uadk", 0x20: "qatzip"}
UNLIMITED_BANDWIDTH = 1 << 40
MAIN_KEEP_LIMIT = 64 * 1024


def log(msg):
    print("capture: " + msg, file=sys.stderr, flush=True)


def sha256_bytes(b):
    return hashlib.sha256(b).hexdigest()


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(4 * MiB), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Walker: an independent reader of multifd channel streams (spec sections 2-5).
# --------------------------------------------------------------------------------------------

class WalkError(Exception):
    pass


def walk_stream(data, page_size=PAGE):
    """Parse one multifd channel stream. Returns a dict; raises WalkError on any malformation.

    Layout: 64-byte init packet, then packets until the end. A packet is a 12-byte header
    {magic, version, flags}; flags & 0x40 means a 276-byte device-state header, otherwise a
    RAM header of 320 + 8*N bytes (N = 512 KiB / page size); then next_packet_size payload
    bytes. The checks are those of a QEMU >= 9.2 sender (zeroed header, empty block name and
    pages_alloc 0 in SYNC packets): older senders leave stale values there and would be
    reported as malformed."""
    n_pages = MULTIFD_PACKET_SIZE // page_size
    ram_hdr_len = 320 + 8 * n_pages
    if len(data) < INIT_LEN:
        raise WalkError("file holds %d bytes, less than the 64-byte init packet" % len(data))
    magic, version = struct.unpack_from(">II", data, 0)
    if magic != MULTIFD_MAGIC:
        if magic == QEVM_MAGIC:
            raise WalkError("this is a main-channel stream (QEVM magic), not a multifd channel")
        raise WalkError("init packet magic 0x%08x, expected 0x%08x" % (magic, MULTIFD_MAGIC))
    if version != 1:
        raise WalkError("init packet version %d, expected 1" % version)
    uuid = data[8:24]
    chan_id = data[24]
    if any(data[25:64]):
        raise WalkError("init packet reserved bytes 25..63 are not zero")
    res = {"channelId": chan_id, "uuid": uuid.hex(), "packets": [], "bytes": len(data)}
    off = INIT_LEN
    last_num = None
    while off < len(data):
        if len(data) - off < HDR_LEN:
            raise WalkError("@%d: %d trailing bytes, shorter than a packet header"
                            % (off, len(data) - off))
        magic, version, flags = struct.unpack_from(">III", data, off)
        if magic != MULTIFD_MAGIC:
            raise WalkError("@%d: packet magic 0x%08x, expected 0x%08x" % (off, magic, MULTIFD_MAGIC))
        if version != 1:
            raise WalkError("@%d: packet version %d, expected 1" % (off, version))
        if flags & ~(FLAG_SYNC | COMP_MASK | FLAG_DEVICE_STATE):
            raise WalkError("@%d: unknown flag bits in 0x%x" % (off, flags))
        p = {"at": off, "flags": flags, "sync": bool(flags & FLAG_SYNC),
             "comp": COMP_NAMES.get(flags & COMP_MASK, "0x%x" % (flags & COMP_MASK))}
        if flags & FLAG_DEVICE_STATE:
            hlen = DEVICE_STATE_LEN
            if len(data) - off < hlen:
                raise WalkError("@%d: truncated device-state header" % off)
            idstr = data[off + 12:off + 268]
            p["kind"] = "device"
            p["block"] = idstr.split(b"\0", 1)[0].decode("latin-1")
            p["instanceId"], nps = struct.unpack_from(">II", data, off + 268)
            p["normal"] = p["zero"] = 0
            p["packetNum"] = None
        else:
            hlen = ram_hdr_len
            if len(data) - off < hlen:
                raise WalkError("@%d: truncated RAM packet header (%d of %d bytes)"
                                % (off, len(data) - off, hlen))
            pages_alloc, normal, nps, packet_num, zero, unused32 = struct.unpack_from(
                ">IIIQII", data, off + 12)
            unused64 = data[off + 40:off + 64]
            block_raw = data[off + 64:off + 320]
            offsets = struct.unpack_from(">%dQ" % n_pages, data, off + 320)
            if pages_alloc > n_pages:
                raise WalkError("@%d: pages_alloc %d > %d" % (off, pages_alloc, n_pages))
            if normal > pages_alloc or zero > pages_alloc - normal:
                raise WalkError("@%d: normal %d + zero %d exceed pages_alloc %d"
                                % (off, normal, zero, pages_alloc))
            if unused32 or any(unused64):
                raise WalkError("@%d: unused header fields are not zero" % off)
            used = normal + zero
            if any(offsets[used:]):
                raise WalkError("@%d: offset entries past normal+zero are not zero" % off)
            if any(o % page_size for o in offsets[:used]):
                raise WalkError("@%d: an offset is not page aligned" % off)
            if used and not block_raw[0]:
                raise WalkError("@%d: packet with pages but an empty block name" % off)
            if not used and any(block_raw):
                raise WalkError("@%d: packet without pages carries a block name" % off)
            if packet_num is not None and last_num is not None and packet_num <= last_num:
                raise WalkError("@%d: packet_num %d not above the previous %d on this channel"
                                % (off, packet_num, last_num))
            last_num = packet_num
            p.update(kind="ram", pagesAlloc=pages_alloc, normal=normal, zero=zero,
                     packetNum=packet_num,
                     block=block_raw.split(b"\0", 1)[0].decode("latin-1"),
                     normalOffsets=offsets[:normal], zeroOffsets=offsets[normal:used])
            comp = flags & COMP_MASK
            if p["sync"] and (normal or zero or nps or pages_alloc or comp):
                raise WalkError("@%d: SYNC packet with pages, payload or a compression code" % off)
            if comp == 0 and nps != normal * page_size:
                raise WalkError("@%d: nocomp next_packet_size %d != normal %d * %d"
                                % (off, nps, normal, page_size))
            if comp and normal == 0 and nps:
                raise WalkError("@%d: compressed packet without normal pages has %d payload bytes"
                                % (off, nps))
            if comp and normal and not nps:
                raise WalkError("@%d: compressed packet with normal pages has no payload" % off)
        p["nextPacketSize"] = nps
        p["payloadAt"] = off + hlen
        if len(data) - p["payloadAt"] < nps:
            raise WalkError("@%d: payload of %d bytes runs past the end of the file (%d left)"
                            % (off, nps, len(data) - p["payloadAt"]))
        res["packets"].append(p)
        off = p["payloadAt"] + nps
    if off != len(data):  # cannot happen given the checks above; kept as the invariant
        raise WalkError("stream does not end on a packet boundary")
    return res


def summarize(walk):
    pk = walk["packets"]
    blocks = {}
    for p in pk:
        if p["kind"] == "ram" and (p["normal"] or p["zero"]):
            b = blocks.setdefault(p["block"], {"packets": 0, "normalPages": 0, "zeroPages": 0})
            b["packets"] += 1
            b["normalPages"] += p["normal"]
            b["zeroPages"] += p["zero"]
    comps = sorted({p["comp"] for p in pk if p["kind"] == "ram" and (p["normal"] or p["zero"])})
    return {
        "channelId": walk["channelId"],
        "bytes": walk["bytes"],
        "packets": len(pk),
        "syncPackets": sum(1 for p in pk if p["sync"]),
        "dataPackets": sum(1 for p in pk if p["kind"] == "ram" and (p["normal"] or p["zero"])),
        "deviceStatePackets": sum(1 for p in pk if p["kind"] == "device"),
        "normalPages": sum(p["normal"] for p in pk),
        "zeroPages": sum(p["zero"] for p in pk),
        "payloadBytes": sum(p["nextPacketSize"] for p in pk),
        "compression": comps,
        "blocks": blocks,
    }


def packet_line(i, p):
    fl = "0x%02x%s" % (p["flags"], " SYNC" if p["sync"] else "")
    if p["kind"] == "device":
        return ("#%-4d @%-9d DEVICE flags=%s idstr=%s instance=%d next_packet_size=%d"
                % (i, p["at"], fl, p["block"], p["instanceId"], p["nextPacketSize"]))
    return ("#%-4d @%-9d num=%-5d flags=%-9s comp=%-4s alloc=%-3d normal=%-3d zero=%-3d "
            "next_packet_size=%-7d block=%s"
            % (i, p["at"], p["packetNum"], fl, p["comp"], p["pagesAlloc"], p["normal"],
               p["zero"], p["nextPacketSize"], p["block"] or "-"))


def decode_payloads(walk, data, page_size, compression):
    """Yield (packet, [page bytes of its normal pages]) in stream order, decompressing with
    one persistent stream per channel as the sender does."""
    pk = [p for p in walk["packets"] if p["kind"] == "ram" and p["normal"]]
    if compression == "none":
        for p in pk:
            a = p["payloadAt"]
            yield p, [data[a + k * page_size:a + (k + 1) * page_size] for k in range(p["normal"])]
        return
    if compression == "zlib":
        d = zlib.decompressobj()
        for i, p in enumerate(pk):
            a = p["payloadAt"]
            # Facts of QEMU's zlib method: a zlib header (0x78) only at the start of the
            # channel's first payload, and every payload ends with Z_SYNC_FLUSH's 00 00 ff ff.
            if (data[a] == 0x78) != (i == 0):
                raise WalkError("@%d: zlib header %s" % (p["at"], "missing" if i == 0 else
                                                          "repeated (stream was reset?)"))
            if data[a + p["nextPacketSize"] - 4:a + p["nextPacketSize"]] != b"\0\0\xff\xff":
                raise WalkError("@%d: zlib payload does not end with a sync flush" % p["at"])
            out = d.decompress(data[a:a + p["nextPacketSize"]])
            if len(out) != p["normal"] * page_size or d.unconsumed_tail:
                raise WalkError("@%d: zlib payload inflates to %d bytes, expected %d"
                                % (p["at"], len(out), p["normal"] * page_size))
            if d.eof:
                raise WalkError("@%d: zlib stream ended (QEMU never finishes it)" % p["at"])
            yield p, [out[k * page_size:(k + 1) * page_size] for k in range(p["normal"])]
        return
    if compression == "zstd":
        zstd = shutil.which("zstd")
        if zstd is None:
            raise FileNotFoundError("zstd command-line tool not found")
        stream = b"".join(data[p["payloadAt"]:p["payloadAt"] + p["nextPacketSize"]] for p in pk)
        # The frame never ends (QEMU keeps one stream open per channel and only flushes it),
        # and the zstd tool drops its last output buffer on a truncated input. Every payload
        # ends on a block boundary, so close the frame with an empty raw last block (block
        # header 0x000001, little-endian), plus a dummy checksum if the frame announces one.
        if len(stream) < 5 or stream[:4] != b"\x28\xb5\x2f\xfd":
            raise WalkError("channel's zstd stream does not start with a zstd frame header")
        stream += b"\x01\x00\x00" + (b"\0\0\0\0" if stream[4] & 0x04 else b"")
        r = subprocess.run([zstd, "-d", "-c", "-q", "--no-check"], input=stream,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
        if r.returncode:
            raise WalkError("zstd failed: %s" % r.stderr.decode(errors="replace").strip())
        out = r.stdout
        want = sum(p["normal"] for p in pk) * page_size
        if len(out) != want:
            raise WalkError("zstd stream decodes to %d bytes, expected %d (zstd: %s)"
                            % (len(out), want, r.stderr.decode(errors="replace").strip()))
        pos = 0
        for p in pk:
            yield p, [out[pos + k * page_size:pos + (k + 1) * page_size] for k in range(p["normal"])]
            pos += p["normal"] * page_size
        return
    raise WalkError("cannot decode compression %r" % compression)


def check_content(walk, data, ram, block, page_size, compression):
    """Compare block `block`'s pages in this channel with the RAM image. Returns counts."""
    checked = 0
    for p in walk["packets"]:
        if p["kind"] == "ram" and p["block"] == block:
            for o in p["zeroOffsets"]:
                if o + page_size > len(ram) or any(ram[o:o + page_size]):
                    raise WalkError("@%d: offset 0x%x sent as a zero page but the RAM page is "
                                    "not zero" % (p["at"], o))
                checked += 1
    for p, pages in decode_payloads(walk, data, page_size, compression):
        if p["block"] != block:
            continue
        for o, pg in zip(p["normalOffsets"], pages):
            if o + page_size > len(ram) or ram[o:o + page_size] != pg:
                raise WalkError("@%d: page at offset 0x%x differs from the RAM image"
                                % (p["at"], o))
            checked += 1
    return checked


def walk_main(args):
    """--walk: print and check channel streams or capture directories."""
    ok = True
    ram = None
    files = [p for p in args.walk if not os.path.isdir(p)]
    if files and args.ram:
        with open(args.ram, "rb") as f:
            ram = f.read()
    for path in args.walk:
        if os.path.isdir(path):
            ok &= walk_capture_dir(path, args)
    if files:
        # Loose files are walked together, so several channels of one capture get the
        # coverage check too.
        ok &= walk_files(files, args, None, ram)
    return 0 if ok else 1


def walk_files(paths, args, manifest, ram):
    page_size = args.page_size
    results = []
    ok = True
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        try:
            w = walk_stream(data, page_size)
        except WalkError as e:
            print("%s: MALFORMED: %s" % (path, e))
            ok = False
            continue
        s = summarize(w)
        if args.verbose:
            print("%s:" % path)
            for i, p in enumerate(w["packets"]):
                print("  " + packet_line(i, p))
        blocks = ", ".join("%s: %d packets, %d normal + %d zero pages"
                           % (b, v["packets"], v["normalPages"], v["zeroPages"])
                           for b, v in sorted(s["blocks"].items()))
        print("%s: channel id %d, %d bytes, %d packets (%d SYNC, %d data, %d device-state), "
              "%d normal + %d zero pages, %d payload bytes, compression %s, uuid %s; blocks: %s"
              % (path, s["channelId"], s["bytes"], s["packets"], s["syncPackets"],
                 s["dataPackets"], s["deviceStatePackets"], s["normalPages"], s["zeroPages"],
                 s["payloadBytes"], "/".join(s["compression"]) or "-", w["uuid"], blocks))
        results.append((path, data, w, s))
    if ram is not None:
        comp = manifest["compression"] if manifest else None
        for path, data, w, s in results:
            c = comp or (s["compression"][0] if s["compression"] else "none")
            try:
                n = check_content(w, data, ram, args.block, page_size, c)
                print("%s: %d pages of block %r match the RAM image" % (path, n, args.block))
            except FileNotFoundError as e:
                print("%s: content check skipped: %s" % (path, e))
            except (WalkError, zlib.error) as e:
                print("%s: CONTENT MISMATCH: %s" % (path, e))
                ok = False
    if len(results) > 1 or manifest:
        ok &= check_coverage(results, manifest, page_size)
    return ok


def check_coverage(results, manifest, page_size):
    """Every page of every block sent exactly once, over all channels together."""
    ok = True
    seen = {}
    for path, _data, w, _s in results:
        for p in w["packets"]:
            if p["kind"] != "ram":
                continue
            for o in p["normalOffsets"]:
                seen.setdefault(p["block"], {}).setdefault(o, []).append("normal")
            for o in p["zeroOffsets"]:
                seen.setdefault(p["block"], {}).setdefault(o, []).append("zero")
    ids = sorted(w["channelId"] for _p, _d, w, _s in results)
    if len(set(ids)) != len(ids):
        print("COVERAGE: duplicate channel ids %s" % ids)
        ok = False
    sizes = {b["name"]: b["usedBytes"] for b in (manifest or {}).get("ramBlocks", [])}
    for name in sorted(set(seen) | set(sizes)):
        pages = seen.get(name, {})
        normal = sum(v.count("normal") for v in pages.values())
        zero = sum(v.count("zero") for v in pages.values())
        dups = sum(1 for v in pages.values() if len(v) > 1)
        line = "block %r: %d distinct pages (%d normal, %d zero, %d sent more than once)" % (
            name, len(pages), normal, zero, dups)
        if name in sizes:
            want = sizes[name] // page_size
            full = set(pages) == set(range(0, want * page_size, page_size))
            line += "; used_length %d = %d pages: %s" % (
                sizes[name], want, "all covered" if full else "NOT covered exactly")
            if not full:
                ok = False
        elif sizes:
            line += "; NOT in the source's block list"
            ok = False
        print(line)
    return ok


def walk_capture_dir(d, args):
    mpath = os.path.join(d, "manifest.json")
    manifest = None
    if os.path.exists(mpath):
        with open(mpath) as f:
            manifest = json.load(f)
    names = sorted((n for n in os.listdir(d) if re.match(r"^channel-\d+\.bin$", n)),
                   key=lambda n: int(n[8:-4]))
    if not names:
        print("%s: no channel-N.bin files" % d)
        return False
    ok = True
    if manifest:
        listed = [f["name"] for f in manifest["files"] if f["role"] == "multifd"]
        if listed != names:
            print("%s: manifest lists %s, directory holds %s" % (d, listed, names))
            ok = False
        for f in manifest["files"]:
            p = os.path.join(d, f["name"])
            if os.path.exists(p):
                if sha256_file(p) != f["sha256"]:
                    print("%s: sha256 differs from the manifest" % p)
                    ok = False
            elif f.get("kept", True):
                print("%s: listed in the manifest but missing" % p)
                ok = False
    ram = None
    if args.ram:
        with open(args.ram, "rb") as f:
            ram = f.read()
    elif manifest:
        image = b"".join(ramgen.chunks(manifest["sizeBytes"]))
        if sha256_bytes(image) == manifest["ramSha256"]:
            ram = image
            print("%s: RAM image regenerated with ramgen.py (sha256 matches the manifest)" % d)
        else:
            print("%s: the capture's RAM is not ramgen.py's; pass --ram to check page contents" % d)
    if ram is not None and manifest and sha256_bytes(ram) != manifest["ramSha256"]:
        print("%s: --ram does not have the manifest's ramSha256" % d)
        ok = False
    ok &= walk_files([os.path.join(d, n) for n in names], args, manifest, ram)
    st = (manifest or {}).get("qemuStats")
    if st:
        # The source's own counters: normal/duplicate pages and multifd-bytes (every byte on
        # the multifd channels, init packets included).
        sums = {"normal": 0, "duplicate": 0, "multifd-bytes": 0}
        for n in names:
            with open(os.path.join(d, n), "rb") as f:
                s = summarize(walk_stream(f.read(), args.page_size))
            sums["normal"] += s["normalPages"]
            sums["duplicate"] += s["zeroPages"]
            sums["multifd-bytes"] += s["bytes"]
        for k, v in sums.items():
            good = st.get(k) == v
            print("%s: channels total %s %d, QEMU's query-migrate says %s%s"
                  % (d, k, v, st.get(k), "" if good else "  MISMATCH"))
            ok &= good
    print("%s: %s" % (d, "OK" if ok else "FAILED"))
    return ok


# --------------------------------------------------------------------------------------------
# Recording proxy
# --------------------------------------------------------------------------------------------

class RecordingProxy:
    """Listens on 127.0.0.1:<ephemeral>, forwards each accepted connection to 127.0.0.1:target
    and writes its client->server bytes to name_for(index) in `outdir`. Server->client bytes are
    forwarded and counted only."""

    def __init__(self, target_port, outdir, name_for):
        self.target_port = target_port
        self.outdir = outdir
        self.name_for = name_for
        self.conns = []
        self.errors = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sockets = []
        self._threads = []
        self.ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sockets.append(self.ls)
        self.ls.bind(("127.0.0.1", 0))
        self.ls.listen(64)
        self.ls.settimeout(0.2)
        self.port = self.ls.getsockname()[1]
        t = threading.Thread(target=self._accept_loop, name="proxy-accept", daemon=True)
        t.start()
        self._accept_thread = t

    def _accept_loop(self):
        while not self._stop.is_set():
            try:
                c, addr = self.ls.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                c.settimeout(None)
                u = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
                u.settimeout(None)
            except OSError as e:
                self.errors.append("connect to the destination failed: %s" % e)
                c.close()
                continue
            with self._lock:
                idx = len(self.conns)
                info = {"index": idx, "name": self.name_for(idx), "peer": "%s:%d" % addr,
                        "acceptedAt": time.time(), "c2s": 0, "s2c": 0,
                        "c2sDone": threading.Event(), "s2cDone": threading.Event()}
                self.conns.append(info)
                self._sockets += [c, u]
            f = open(os.path.join(self.outdir, info["name"]), "wb")
            for src, dst, key, out in ((c, u, "c2s", f), (u, c, "s2c", None)):
                t = threading.Thread(target=self._pump, args=(src, dst, info, key, out),
                                     name="proxy-%d-%s" % (idx, key), daemon=True)
                t.start()
                self._threads.append(t)

    def _pump(self, src, dst, info, key, out):
        try:
            while True:
                try:
                    b = src.recv(1 << 20)
                except OSError as e:
                    if not self._stop.is_set():
                        self.errors.append("conn %d %s recv: %s" % (info["index"], key, e))
                    break
                if not b:
                    break
                if out is not None:
                    out.write(b)
                info[key] += len(b)
                try:
                    dst.sendall(b)
                except OSError as e:
                    self.errors.append("conn %d %s send: %s" % (info["index"], key, e))
                    break
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        finally:
            if out is not None:
                out.close()
            info[key + "Done"].set()

    def wait_closed(self, count, timeout):
        """Wait until `count` connections were accepted and all their directions hit EOF."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                conns = list(self.conns)
            if len(conns) >= count and all(c["c2sDone"].is_set() and c["s2cDone"].is_set()
                                           for c in conns):
                return True
            time.sleep(0.05)
        return False

    def close(self):
        self._stop.set()
        for s in self._sockets:
            try:
                s.close()
            except OSError:
                pass
        for t in [self._accept_thread] + self._threads:
            t.join(5)


# --------------------------------------------------------------------------------------------
# Capture
# --------------------------------------------------------------------------------------------

class Interrupted(BaseException):
    pass


def on_signal(signum, _frame):
    raise Interrupted("signal %d" % signum)


def qemu_args(ram_path, size_mib, incoming):
    backend = "memory-backend-file,id=mem,size=%dM,mem-path=%s,share=on" % (size_mib, ram_path)
    argv = ["-S", "-display", "none", "-nodefaults", "-no-user-config",
            "-accel", "tcg", "-smp", "1",
            "-object", backend,
            "-machine", "pc,memory-backend=mem", "-m", "%dM" % size_mib]
    if incoming:
        argv += ["-incoming", "defer"]
    return argv


def configure(qmp, args, side):
    qmp.execute("migrate-set-capabilities", capabilities=[
        {"capability": "events", "state": True},
        {"capability": "multifd", "state": True}])
    params = {"multifd-channels": args.channels,
              "multifd-compression": args.compression,
              "zero-page-detection": args.zero_page_detection}
    if side == "src":
        params["max-bandwidth"] = UNLIMITED_BANDWIDTH
    qmp.execute("migrate-set-parameters", **params)


def ram_blocks(qmp):
    """[{name, usedBytes, maxBytes, pageSize}] from HMP 'info ramblock'."""
    text = qmp.execute("human-monitor-command", **{"command-line": "info ramblock"})
    blocks = []
    for line in text.splitlines():
        m = re.match(r"^\s*(\S+)\s+(\d+)\s*(KiB|MiB|GiB)?\s+0x([0-9a-f]+)\s+0x([0-9a-f]+)"
                     r"\s+0x([0-9a-f]+)", line)
        if m:
            mult = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, None: 1}[m.group(3)]
            blocks.append({"name": m.group(1), "usedBytes": int(m.group(5), 16),
                           "maxBytes": int(m.group(6), 16), "pageSize": int(m.group(2)) * mult})
    if not blocks:
        raise QMPError("could not parse 'info ramblock': %r" % text)
    return blocks


def wait_migration(proc, timeout):
    ev = proc.qmp.wait_event(
        lambda e: e.get("event") == "MIGRATION"
        and e["data"]["status"] in ("completed", "failed", "cancelled"), timeout)
    return ev["data"]["status"]


TEMP_NAME = re.compile(r"^multifd-capture-(?:run|src|dst)-(\d+)-")


def temp_dir(kind, parent):
    """A private directory whose name carries our PID (see sweep_stale)."""
    return tempfile.mkdtemp(prefix="multifd-capture-%s-%d-" % (kind, os.getpid()), dir=parent)


def sweep_stale():
    """Remove temp dirs of a capture.py that was SIGKILLed (its QEMUs died with it)."""
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


def prepare_ram(args, cleanup):
    size = args.size_mib * MiB
    if args.ram is None:
        d = temp_dir("src", "/dev/shm")
        cleanup.append(("path", d))
        path = os.path.join(d, "src.ram")
        log("generating a temporary %d MiB RAM image (ramgen.py)" % args.size_mib)
        ramgen.write(path, size)
        return path
    path = os.path.abspath(args.ram)
    if os.path.exists(path):
        have = os.path.getsize(path)
        if have != size:
            raise SystemExit("capture: %s holds %d bytes but --size-mib %d needs %d"
                             % (path, have, args.size_mib, size))
        return path
    log("creating %s: %d MiB, ramgen.py content (kept)" % (path, args.size_mib))
    ramgen.write(path, size)
    return path


def release(cleanup):
    while cleanup:
        kind, item = cleanup[-1]
        try:
            if kind == "proc":
                item.stop(10)
            elif kind == "proxy":
                item.close()
            elif os.path.isdir(item) and not os.path.islink(item):
                shutil.rmtree(item, ignore_errors=True)
            elif os.path.lexists(item):
                os.unlink(item)
        except Exception as e:  # keep releasing the rest
            log("cleanup of %r failed: %s" % (item, e))
        cleanup.pop()


def capture(args, cleanup):
    size = args.size_mib * MiB
    sweep_stale()
    src_ram = prepare_ram(args, cleanup)
    src_sha = sha256_file(src_ram)
    workdir = temp_dir("run", tempfile.gettempdir())
    cleanup.append(("path", workdir))
    staging = os.path.join(workdir, "out")
    os.mkdir(staging)
    dst_dir = temp_dir("dst", "/dev/shm")
    cleanup.append(("path", dst_dir))
    dst_ram = os.path.join(dst_dir, "dst.ram")

    dst = QemuProcess("dst", workdir, qemu_args(dst_ram, args.size_mib, True))
    cleanup.append(("proc", dst))
    src = QemuProcess("src", workdir, qemu_args(src_ram, args.size_mib, False))
    cleanup.append(("proc", src))
    for p in (dst, src):
        p.connect(60)
        configure(p.qmp, args, p.name)
    version = src.qmp.qemu_version
    blocks = ram_blocks(src.qmp)
    machine = next((m["name"] for m in src.qmp.execute("query-machines")
                    if m.get("is-current")), "pc")

    dst.qmp.execute("migrate-incoming", uri="tcp:127.0.0.1:0")
    addrs = dst.qmp.execute("query-migrate").get("socket-address") or []
    ports = [a["port"] for a in addrs if a.get("type") == "inet"]
    if not ports:
        raise QMPError("destination did not report its listening port: %r" % (addrs,))
    proxy = RecordingProxy(int(ports[0]), staging,
                           lambda i: "main.bin" if i == 0 else "channel-%d.bin" % (i - 1))
    cleanup.append(("proxy", proxy))
    log("QEMU %s, %s, %d MiB, %d channels, compression %s, zero-page-detection %s: "
        "source -> proxy :%d -> destination :%s"
        % (version, machine, args.size_mib, args.channels, args.compression,
           args.zero_page_detection, proxy.port, ports[0]))

    t0 = time.monotonic()
    src.qmp.execute("migrate", uri="tcp:127.0.0.1:%d" % proxy.port)
    status = {}
    for p in (src, dst):
        left = max(5.0, args.timeout - (time.monotonic() - t0))
        try:
            status[p.name] = wait_migration(p, left)
        except TimeoutError:
            status[p.name] = "timeout"
    if any(s != "completed" for s in status.values()):
        errs = []
        for p in (src, dst):
            try:
                e = p.qmp.execute("query-migrate", timeout=5).get("error-desc")
                if e:
                    errs.append("%s: %s" % (p.name, e))
            except Exception:
                if not p.alive():
                    errs.append("%s exited: %s" % (p.name, p.log_tail()))
        raise RuntimeError("migration did not complete: %s %s" % (status, "; ".join(errs)))
    seconds = time.monotonic() - t0
    info = src.qmp.execute("query-migrate")
    ram_info = info.get("ram", {})
    stats = {k: ram_info.get(k) for k in ("total", "transferred", "normal", "duplicate",
                                          "normal-bytes", "multifd-bytes")}
    stats["totalTimeMs"] = info.get("total-time")

    # QEMU closes its channels once the migration is over; wait for every EOF.
    if not proxy.wait_closed(1 + args.channels, 30):
        raise RuntimeError("proxy: connections still open 30 s after completion: %s"
                           % [(c["name"], c["c2sDone"].is_set(), c["s2cDone"].is_set())
                              for c in proxy.conns])
    for p in (src, dst):
        p.stop(10)
    proxy.close()
    if proxy.errors:
        raise RuntimeError("proxy errors: %s" % "; ".join(proxy.errors))
    if len(proxy.conns) != 1 + args.channels:
        raise RuntimeError("expected %d connections, the proxy saw %d"
                           % (1 + args.channels, len(proxy.conns)))

    # The RAM must have arrived intact, and the source's must be untouched.
    dst_sha = sha256_file(dst_ram) if os.path.exists(dst_ram) else None
    if os.path.getsize(dst_ram) != size or dst_sha != src_sha:
        raise RuntimeError("DESTINATION RAM DIFFERS: source sha256 %s, destination %s"
                           % (src_sha, dst_sha))
    if sha256_file(src_ram) != src_sha:
        raise RuntimeError("the source RAM file changed during the run")
    log("migration completed in %.2f s; destination RAM sha256 matches (%s)" % (seconds, src_sha))

    # Sanity of the recordings.
    files = []
    with open(os.path.join(staging, "main.bin"), "rb") as f:
        head = f.read(4)
    if len(head) < 4 or struct.unpack(">I", head)[0] != QEVM_MAGIC:
        raise RuntimeError("the first connection does not start with the QEVM magic: %r" % head)
    for c in proxy.conns:
        path = os.path.join(staging, c["name"])
        entry = {"name": c["name"], "role": "main" if c["index"] == 0 else "multifd",
                 "arrival": c["index"], "bytes": os.path.getsize(path),
                 "sha256": sha256_file(path), "replyBytes": c["s2c"]}
        if entry["bytes"] != c["c2s"]:
            raise RuntimeError("%s: wrote %d bytes but forwarded %d" % (c["name"], entry["bytes"], c["c2s"]))
        if c["index"] > 0:
            with open(path, "rb") as f:
                data = f.read()
            s = summarize(walk_stream(data))
            if s["compression"] and s["compression"] != [args.compression]:
                raise RuntimeError("%s: packets use compression %s, expected %s"
                                   % (c["name"], s["compression"], args.compression))
            entry.update(s)
            entry["blocks"] = s["blocks"]
        files.append(entry)
    main_entry = files[0]
    keep_main = args.keep_main == "yes" or (args.keep_main == "auto"
                                             and main_entry["bytes"] < MAIN_KEEP_LIMIT)
    main_entry["kept"] = keep_main

    manifest = {
        "qemuVersion": version,
        "machine": machine,
        "compression": args.compression,
        "channels": args.channels,
        "zeroPageDetection": args.zero_page_detection,
        "sizeBytes": size,
        "ramSha256": src_sha,
        "ramContent": ("ramgen.py" if src_sha == ramgen.sha256(size) else "other"),
        "ramBlock": "mem",
        "pageSize": PAGE,
        "packetPages": MULTIFD_PACKET_SIZE // PAGE,
        "ramBlocks": blocks,
        "qemuStats": stats,
        "files": files,
    }
    # Publish: only now does anything land in --outdir.
    os.makedirs(args.outdir, exist_ok=True)
    for n in os.listdir(args.outdir):
        if n == "main.bin" or re.match(r"^channel-\d+\.bin$", n):
            os.unlink(os.path.join(args.outdir, n))
    for e in files:
        if e.get("kept", True):
            shutil.move(os.path.join(staging, e["name"]), os.path.join(args.outdir, e["name"]))
    tmp = os.path.join(args.outdir, "manifest.json.partial")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    os.rename(tmp, os.path.join(args.outdir, "manifest.json"))
    for e in files:
        extra = ""
        if e["role"] == "multifd":
            extra = (": channel id %d, %d packets (%d SYNC), %d normal + %d zero pages, "
                     "%d payload bytes" % (e["channelId"], e["packets"], e["syncPackets"],
                                           e["normalPages"], e["zeroPages"], e["payloadBytes"]))
        log("%s %d bytes%s%s" % (e["name"], e["bytes"], extra,
                                 "" if e.get("kept", True) else " (not kept)"))
    log("wrote %s" % os.path.join(args.outdir, "manifest.json"))
    return 0


def parse_args(argv):
    ap = argparse.ArgumentParser(
        prog="capture.py", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("Examples:")[1] if "Examples:" in __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compression", choices=["none", "zlib", "zstd"], default="none")
    ap.add_argument("--channels", type=int, default=2, help="multifd channels (default 2)")
    ap.add_argument("--zero-page-detection", choices=["multifd", "none"], default="multifd")
    ap.add_argument("--size-mib", type=int, default=16, help="guest RAM in MiB (default 16)")
    ap.add_argument("--outdir", help="where main.bin, channel-N.bin and manifest.json go")
    ap.add_argument("--ram", help="guest RAM image used as the source's memory-backend-file; "
                    "created with ramgen.py content when missing (default: a temporary one). "
                    "With --walk: the RAM image to compare block 'mem' with")
    ap.add_argument("--keep-main", choices=["auto", "yes", "no"], default="yes",
                    help="write main.bin to --outdir (auto: only when under 64 KiB; "
                         "default yes). It is listed in the manifest either way")
    ap.add_argument("--timeout", type=float, default=120.0,
                    help="seconds for the migration to complete (default 120)")
    ap.add_argument("--walk", nargs="+", metavar="PATH",
                    help="walk channel files or capture directories instead of capturing")
    ap.add_argument("-v", "--verbose", action="store_true", help="--walk: one line per packet")
    ap.add_argument("--block", default="mem", help="--walk: block to compare with the RAM image")
    ap.add_argument("--page-size", type=int, default=PAGE, help="--walk: target page size")
    a = ap.parse_args(argv)
    if a.walk:
        return a
    if not a.outdir:
        ap.error("--outdir is required (or use --walk)")
    if not 1 <= a.channels <= 255:
        ap.error("--channels must be between 1 and 255")
    if not 2 <= a.size_mib <= 64:
        ap.error("--size-mib must be between 2 and 64 (this tool makes small test captures)")
    return a


def main(argv):
    args = parse_args(argv)
    if args.walk:
        return walk_main(args)
    if shutil.which(QEMU_BINARY) is None:
        raise SystemExit("capture: %s not found; run scripts/install-qemu.sh" % QEMU_BINARY)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    cleanup = []
    try:
        return capture(args, cleanup)
    except (QMPError, TimeoutError, OSError, RuntimeError, WalkError) as e:
        log("FAILED: %s: %s" % (type(e).__name__, e))
        return 1
    except (KeyboardInterrupt, Interrupted) as e:
        log("interrupted (%s); cleaning up" % (e or "Ctrl-C"))
        return 1
    finally:
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)
        release(cleanup)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
