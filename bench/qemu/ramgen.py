#!/usr/bin/env python3
"""Deterministic guest-RAM content for the QEMU multifd captures (Python 3 stdlib only).

Usage:  python3 bench/qemu/ramgen.py SIZE_MIB OUT      (prints the sha256 of OUT)
Import: ramgen.page(i) -> 4096 bytes;  ramgen.write(path, size_bytes);  ramgen.sha256(size_bytes)

The content is a pure function of the page index, so a test in any language can rebuild it
(or just compare the sha256 printed here / recorded in a capture's manifest.json).

Rule, for a guest of S bytes (S a multiple of 4096), page i = bytes [4096*i, 4096*(i+1)):

  i % 4 == 0  all zero.
  i % 4 == 1  text: the ASCII sentence TEXT.format(i), i.e.
                  "Page 00000001 of the multifd capture guest: the quick brown fox jumps over
                   the lazy dog while QEMU migrates it.\\n"   (one line, no line break inside)
              repeated back to back and cut at 4096 bytes. The index is decimal, zero-padded to
              8 digits, so every sentence is 112 bytes long.
  i % 4 == 2  pseudo-random bytes from xorshift64 (Marsaglia's 13/7/17 triple):
  i % 4 == 3      state = (i * 0x9E3779B97F4A7C15 + 1) mod 2**64   (if that is 0, use 1)
                  repeat 512 times:
                      state ^= (state << 13) mod 2**64
                      state ^= state >> 7
                      state ^= (state << 17) mod 2**64
                      emit state as 8 bytes, little-endian
              i.e. the page is the first 512 outputs of the generator (the seed itself is not
              emitted), 512 * 8 = 4096 bytes.

Reference values: see bench/qemu/ramgen.py --selftest (page 2 starts with the bytes printed
there) and the sha256 of 6 / 8 / 16 MiB guests in __test__/fixtures/qemu-captures/README.md.
"""

import hashlib
import os
import struct
import sys

PAGE = 4096
MiB = 1 << 20
MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
TEXT = ("Page {:08d} of the multifd capture guest: the quick brown fox jumps over the lazy "
        "dog while QEMU migrates it.\n")

_PACK512 = struct.Struct("<512Q")


def xorshift_seed(index):
    s = (index * GOLDEN + 1) & MASK64
    return s or 1


def random_page(index):
    x = xorshift_seed(index)
    out = [0] * (PAGE // 8)
    for k in range(PAGE // 8):
        x ^= (x << 13) & MASK64
        x ^= x >> 7
        x ^= (x << 17) & MASK64
        out[k] = x
    return _PACK512.pack(*out)


def text_page(index):
    s = TEXT.format(index).encode("ascii")
    reps = PAGE // len(s) + 1
    return (s * reps)[:PAGE]


ZERO_PAGE = bytes(PAGE)


def kind(index):
    """'zero', 'text' or 'random'."""
    r = index % 4
    return "zero" if r == 0 else "text" if r == 1 else "random"


def page(index):
    r = index % 4
    if r == 0:
        return ZERO_PAGE
    if r == 1:
        return text_page(index)
    return random_page(index)


def _check_size(size):
    if size <= 0 or size % PAGE:
        raise ValueError("guest size must be a positive multiple of %d bytes" % PAGE)


def chunks(size):
    """The guest RAM image in chunks of up to 1 MiB (256 pages)."""
    _check_size(size)
    pages = size // PAGE
    for first in range(0, pages, 256):
        yield b"".join(page(i) for i in range(first, min(pages, first + 256)))


def sha256(size):
    h = hashlib.sha256()
    for c in chunks(size):
        h.update(c)
    return h.hexdigest()


def write(path, size):
    """Write the image to `path` atomically (a half-written file never appears there).
    Returns its sha256."""
    h = hashlib.sha256()
    tmp = "%s.partial-%d" % (path, os.getpid())
    try:
        with open(tmp, "wb") as f:
            for c in chunks(size):
                f.write(c)
                h.update(c)
        os.rename(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    return h.hexdigest()


def selftest():
    assert len(text_page(1)) == PAGE and len(random_page(2)) == PAGE
    assert len(TEXT.format(1)) == 112
    assert page(4) == ZERO_PAGE and page(5).startswith(b"Page 00000005 of")
    assert random_page(2) != random_page(3)
    print("page 2 first 16 bytes: %s" % random_page(2)[:16].hex())
    print("page 3 first 16 bytes: %s" % random_page(3)[:16].hex())
    print("page 1 first 40 bytes: %r" % text_page(1)[:40])
    for mib in (6, 8, 16):
        print("sha256 of a %d MiB guest: %s" % (mib, sha256(mib * MiB)))


def main(argv):
    if argv == ["--selftest"]:
        selftest()
        return 0
    if len(argv) != 2:
        print("usage: ramgen.py SIZE_MIB OUT | ramgen.py --selftest", file=sys.stderr)
        return 2
    size = int(argv[0]) * MiB
    print(write(argv[1], size))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
