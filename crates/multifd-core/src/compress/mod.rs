//! Payload compression, QEMU-compatible: one persistent stream per channel for the whole
//! session, flushed at the end of every packet, so each payload decodes given the ones
//! before it on the same channel.
//!
//! Adding a method: a module implementing [`Compressor`] and [`Decompressor`], and an entry in
//! [`METHODS`]; its wire code and name are QEMU's, so it becomes a `wire::Compression` variant
//! (QEMU's other methods wait in `wire::KnownMethod::Unsupported`). Nothing else: the method's
//! name and levels reach the TypeScript schemas, the CLI and its help through `limits` and the
//! binding.

mod zlib;
mod zstd;

use crate::error::{Result, fail};
use crate::memory::{ReadSource, WriteTarget};
use crate::wire::Compression;

/// Compresses the normal pages of one packet at a time.
pub trait Compressor: Send {
    /// Compresses `pages` into a payload that ends with a flush: `out` (cleared first), or
    /// `out` spliced with the pages themselves (see [`Payload`]).
    fn compress(&mut self, pages: &ReadSource, out: &mut Vec<u8>) -> Result<Payload<'_>>;
}

/// What a packet's payload is made of, after [`Compressor::compress`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Payload<'c> {
    /// `out`, all of it.
    Packed,
    /// `out` and the pages, spliced: each piece is the next bytes of one or the other, in
    /// order (a method's framing around pages it sends as they are, with no copy).
    Spliced(&'c [Piece]),
}

/// A piece of a spliced payload: the next `n` bytes of `out`, or of the pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Piece {
    Out(usize),
    Pages(usize),
}

impl Payload<'_> {
    /// Its length in bytes.
    pub fn len(&self, out: &[u8]) -> usize {
        match self {
            Payload::Packed => out.len(),
            Payload::Spliced(pieces) => pieces.iter().map(|&(Piece::Out(n) | Piece::Pages(n))| n).sum(),
        }
    }

    /// Appends iovecs over the payload to `iov` (`out` and `pages` as given to `compress`);
    /// iovecs before index `from` are never extended.
    pub fn push_iovecs(&self, out: &[u8], pages: &ReadSource, iov: &mut Vec<libc::iovec>, from: usize) {
        let Payload::Spliced(pieces) = self else {
            iov.push(crate::memory::iovec(out.as_ptr(), out.len()));
            return;
        };
        let (mut o, mut p) = (0, 0);
        for &piece in *pieces {
            match piece {
                Piece::Out(n) => {
                    crate::memory::push_merged(iov, from, out[o..o + n].as_ptr(), n);
                    o += n;
                }
                Piece::Pages(n) => {
                    pages.push_iovecs(iov, from, p, n);
                    p += n;
                }
            }
        }
    }

    /// The payload's bytes in `out` (for callers that write slices; a spliced payload is
    /// copied together).
    pub fn into_bytes(self, out: &mut Vec<u8>, pages: &ReadSource) {
        let Payload::Spliced(pieces) = self else { return };
        let framing = std::mem::take(out);
        let (mut o, mut p) = (0, 0);
        for &piece in pieces {
            match piece {
                Piece::Out(n) => {
                    out.extend_from_slice(&framing[o..o + n]);
                    o += n;
                }
                Piece::Pages(n) => {
                    pages.extend_out(p, n, out);
                    p += n;
                }
            }
        }
    }
}

/// Decompresses one packet's payload.
pub trait Decompressor: Send {
    /// Decodes `input` into exactly `out.len()` bytes, never writing outside `out`. Less
    /// output, more output, input left over or a corrupt stream are errors
    /// (`ERR_MULTIFD_PAYLOAD_SIZE`, `ERR_MULTIFD_DECOMPRESS`); `out` then holds some bytes.
    fn decompress(&mut self, input: &[u8], out: &mut WriteTarget) -> Result<()>;
}

/// One compression method: its name, level range and constructors.
pub struct Method {
    pub compression: Compression,
    pub levels: std::ops::RangeInclusive<u32>,
    pub default_level: u32,
    new_compressor: fn(u32) -> Result<Box<dyn Compressor>>,
    new_decompressor: fn() -> Result<Box<dyn Decompressor>>,
}

/// The registry of methods with a payload codec.
pub const METHODS: &[Method] = &[
    Method { compression: Compression::Zlib, levels: 1..=9, default_level: 1, new_compressor: zlib::compressor, new_decompressor: zlib::decompressor },
    Method { compression: Compression::Zstd, levels: 1..=20, default_level: 1, new_compressor: zstd::compressor, new_decompressor: zstd::decompressor },
];

pub fn method(c: Compression) -> Option<&'static Method> {
    METHODS.iter().find(|m| m.compression == c)
}

/// The names a user may choose: `none`, then every method of the registry.
pub fn names() -> impl Iterator<Item = &'static str> {
    std::iter::once(Compression::None.name()).chain(METHODS.iter().map(|m| m.compression.name()))
}

/// The method a user named, if it is `none` or in the registry.
pub fn by_name(name: &str) -> Result<Compression> {
    match Compression::from_name(name) {
        Ok(c) if c == Compression::None || method(c).is_some() => Ok(c),
        _ => fail!(InvalidArgument, "unknown compression method {name:?}; expected one of {}", names().collect::<Vec<_>>().join(", ")),
    }
}

/// The level to compress at: `level`, or the method's default when `None`. A level outside
/// the method's range, or a level for no compression, is refused.
pub fn level(c: Compression, level: Option<u32>) -> Result<Option<u32>> {
    match (method(c), level) {
        (None, None) => Ok(None),
        (None, Some(l)) => fail!(InvalidArgument, "a compression level ({l}) needs a compression method other than {}", c.name()),
        (Some(m), None) => Ok(Some(m.default_level)),
        (Some(m), Some(l)) if m.levels.contains(&l) => Ok(Some(l)),
        (Some(m), Some(l)) => fail!(InvalidArgument, "{} level must be {}..{}, got {l}", c.name(), m.levels.start(), m.levels.end()),
    }
}

/// A compressor for `c` at `level` (`None` for no compression; level `None` = the default).
pub fn compressor(c: Compression, level: Option<u32>) -> Result<Option<Box<dyn Compressor>>> {
    let Some(level) = self::level(c, level)? else { return Ok(None) };
    let Some(m) = method(c) else { return Ok(None) };
    (m.new_compressor)(level).map(Some)
}

pub fn decompressor(c: Compression) -> Result<Option<Box<dyn Decompressor>>> {
    method(c).map(|m| (m.new_decompressor)()).transpose()
}

/// The checks every decompressor makes after decoding: output exactly filled, input used up.
fn check_exact(method: &str, produced: usize, expected: usize, consumed: usize, input: usize) -> Result<()> {
    if produced > expected {
        fail!(PayloadSize, "{method} payload decompresses to more than the {expected} bytes its pages hold");
    }
    if produced < expected {
        fail!(PayloadSize, "{method} payload decompresses to {produced} bytes, expected {expected}");
    }
    if consumed < input {
        fail!(PayloadSize, "{method} payload has {} bytes left after its {expected} bytes of pages", input - consumed);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;

    /// The whole payload of `ps` through `c`, spliced payloads copied together.
    pub(super) fn pack(c: &mut dyn Compressor, ps: &[&[u8]], out: &mut Vec<u8>) {
        let pages = ReadSource::slices(ps);
        c.compress(&pages, out).unwrap().into_bytes(out, &pages);
    }

    fn pages(seed: u64, n: usize) -> Vec<Vec<u8>> {
        let mut x = seed | 1;
        (0..n)
            .map(|i| {
                (0..4096)
                    .map(|j| {
                        if i % 3 == 0 {
                            (j % 7) as u8 // compressible
                        } else {
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            x as u8
                        }
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn streams_round_trip_across_packets() {
        for m in METHODS {
            for level in [*m.levels.start(), m.default_level, *m.levels.end()] {
                let mut c = compressor(m.compression, Some(level)).unwrap().unwrap();
                let mut d = decompressor(m.compression).unwrap().unwrap();
                for packet in 0..6 {
                    let ps = pages(packet, 1 + (packet as usize * 37) % 128);
                    let mut wire = Vec::new();
                    pack(c.as_mut(), &ps.iter().map(|p| p.as_slice()).collect::<Vec<_>>(), &mut wire);
                    assert!(wire.len() <= crate::wire::MAX_COMPRESSED_PAYLOAD as usize);
                    let mut out = vec![0u8; ps.len() * 4096];
                    d.decompress(&wire, &mut WriteTarget::buffer(&mut out)).unwrap();
                    assert_eq!(out, ps.concat(), "{} level {level} packet {packet}", m.compression.name());
                }
            }
        }
    }

    #[test]
    fn bad_payloads_are_errors_not_panics() {
        for m in METHODS {
            let mut c = compressor(m.compression, None).unwrap().unwrap();
            let ps = pages(9, 4);
            let mut wire = Vec::new();
            pack(c.as_mut(), &ps.iter().map(|p| p.as_slice()).collect::<Vec<_>>(), &mut wire);
            let name = m.compression.name();
            let fresh = || decompressor(m.compression).unwrap().unwrap();

            // Expecting more pages than were sent: short.
            let e = fresh().decompress(&wire, &mut WriteTarget::buffer(&mut vec![0; 5 * 4096])).unwrap_err();
            assert_eq!(e.code, ErrorCode::PayloadSize, "{name}: {e}");
            // Expecting fewer: long (a bomb is the extreme of this).
            let e = fresh().decompress(&wire, &mut WriteTarget::buffer(&mut vec![0; 3 * 4096])).unwrap_err();
            assert_eq!(e.code, ErrorCode::PayloadSize, "{name}: {e}");
            // Truncated payload.
            let e = fresh().decompress(&wire[..wire.len() / 2], &mut WriteTarget::buffer(&mut vec![0; 4 * 4096])).unwrap_err();
            assert!(matches!(e.code, ErrorCode::PayloadSize | ErrorCode::Decompress), "{name}: {e}");
            // Garbage.
            let garbage: Vec<u8> = (0..1000u32).map(|i| (i * 7919 % 251) as u8).collect();
            let e = fresh().decompress(&garbage, &mut WriteTarget::buffer(&mut vec![0; 4096])).unwrap_err();
            assert!(matches!(e.code, ErrorCode::PayloadSize | ErrorCode::Decompress), "{name}: {e}");
        }
    }

    #[test]
    fn a_compression_bomb_stops_at_the_page_budget() {
        for m in METHODS {
            // 64 MiB of zeros compresses to a few KiB; the receiver has room for one page.
            let mut c = compressor(m.compression, None).unwrap().unwrap();
            let zeros = vec![0u8; 4096];
            let mut wire = Vec::new();
            pack(c.as_mut(), &vec![zeros.as_slice(); 128], &mut wire);
            let e = decompressor(m.compression).unwrap().unwrap().decompress(&wire, &mut WriteTarget::buffer(&mut vec![0; 4096])).unwrap_err();
            assert_eq!(e.code, ErrorCode::PayloadSize);
        }
    }

    /// Wire bytes of `packets` 128-page packets through one stream, checked to decode back.
    fn wire_bytes(c: Compression, level: u32, packets: &[Vec<Vec<u8>>]) -> usize {
        let mut enc = compressor(c, Some(level)).unwrap().unwrap();
        let mut dec = decompressor(c).unwrap().unwrap();
        let mut total = 0;
        for ps in packets {
            let mut wire = Vec::new();
            pack(enc.as_mut(), &ps.iter().map(|p| p.as_slice()).collect::<Vec<_>>(), &mut wire);
            let mut out = vec![0u8; ps.len() * 4096];
            dec.decompress(&wire, &mut WriteTarget::buffer(&mut out)).unwrap();
            assert_eq!(out, ps.concat());
            total += wire.len();
        }
        total
    }

    /// The bench's text pages (`bench/lib/transfer.ts`).
    fn text_pages(packet: usize) -> Vec<Vec<u8>> {
        const TEXT: &[u8] = b"The quick brown fox jumps over the lazy dog while multifd moves pages over parallel channels. ";
        (0..128)
            .map(|i| {
                let mut p = format!("page 0:{} ", packet * 128 + i).into_bytes();
                while p.len() < 4096 {
                    p.extend_from_slice(TEXT);
                }
                p.truncate(4096);
                p
            })
            .collect()
    }

    #[test]
    fn zlib_bytes_match_c_zlib_at_the_same_level() {
        // C zlib 1.2.13 at level 1 (what QEMU sends): 6.46 MiB per GiB of these text pages,
        // i.e. 3.2 KiB per 512 KiB packet; random pages stay within 0.1% of their size.
        let text: Vec<_> = (0..8).map(text_pages).collect();
        let bytes = wire_bytes(Compression::Zlib, 1, &text) as f64 / 8.0;
        assert!(bytes <= 1.1 * 6.46 * 512.0 + 64.0, "text: {bytes} bytes per packet");
        let random_pages = |seed: u64| -> Vec<Vec<u8>> {
            let mut x = seed * 2 + 1;
            (0..128).map(|_| (0..4096).map(|_| { x ^= x << 13; x ^= x >> 7; x ^= x << 17; (x >> 24) as u8 }).collect()).collect()
        };
        let random: Vec<_> = (0..40).map(random_pages).collect();
        let bytes = wire_bytes(Compression::Zlib, 1, &random) as f64 / 40.0;
        assert!(bytes <= 1.001 * 512.0 * 1024.0, "random: {bytes} bytes per packet");
        // Text after random: the stream goes back to compressing after the stored packets.
        let mixed: Vec<_> = (0..4).map(random_pages).chain((0..40).map(text_pages)).collect();
        let bytes = wire_bytes(Compression::Zlib, 1, &mixed);
        assert!(bytes < (1 + zlib::STORED_PACKETS as usize) * 520 * 1024 + 40 * 8 * 1024, "mixed: {bytes} bytes");
    }

    #[test]
    fn decoding_into_pages_never_writes_outside_them() {
        let m = crate::memory::Mapping::anonymous(4 * 4096, false).unwrap();
        for meth in METHODS {
            let mut c = compressor(meth.compression, None).unwrap().unwrap();
            let ps = pages(3, 2);
            let mut wire = Vec::new();
            pack(c.as_mut(), &ps.iter().map(|p| p.as_slice()).collect::<Vec<_>>(), &mut wire);
            let mut bomb = Vec::new();
            let zeros = vec![0u8; 4096];
            pack(c.as_mut(), &vec![zeros.as_slice(); 64], &mut bomb);
            let mut d = decompressor(meth.compression).unwrap().unwrap();
            m.fill(0, 4 * 4096, 0xee);
            // Two pages, not contiguous: pages 1 and 3 of the mapping.
            let iov = [m.iovec(4096, 4096), m.iovec(3 * 4096, 4096)];
            // SAFETY: iovecs of a live private mapping no reference covers.
            d.decompress(&wire, &mut unsafe { crate::memory::WriteTarget::pages(&iov) }).unwrap();
            let mut got = vec![0u8; 4096];
            for (i, want) in [(0u64, None), (1, Some(&ps[0])), (2, None), (3, Some(&ps[1]))] {
                m.copy_to(i * 4096, &mut got);
                match want {
                    Some(p) => assert_eq!(&got, p, "{} page {i}", meth.compression.name()),
                    None => assert!(got.iter().all(|&b| b == 0xee), "{} wrote page {i}", meth.compression.name()),
                }
            }
            // A bomb into one page: an error, the pages around it untouched.
            m.fill(0, 4 * 4096, 0xee);
            let iov = [m.iovec(4096, 4096)];
            // SAFETY: as above.
            let e = d.decompress(&bomb, &mut unsafe { crate::memory::WriteTarget::pages(&iov) }).unwrap_err();
            assert_eq!(e.code, ErrorCode::PayloadSize);
            for i in [0u64, 2, 3] {
                m.copy_to(i * 4096, &mut got);
                assert!(got.iter().all(|&b| b == 0xee), "{} bomb wrote page {i}", meth.compression.name());
            }
        }
    }

    #[test]
    fn levels_are_checked() {
        assert_eq!(compressor(Compression::Zlib, Some(10)).err().unwrap().code, ErrorCode::InvalidArgument);
        assert_eq!(compressor(Compression::Zstd, Some(0)).err().unwrap().code, ErrorCode::InvalidArgument);
        assert!(compressor(Compression::None, None).unwrap().is_none());
        assert_eq!(compressor(Compression::None, Some(1)).err().unwrap().code, ErrorCode::InvalidArgument);
        assert_eq!(level(Compression::Zstd, None).unwrap(), Some(1));
    }

    #[test]
    fn names_come_from_the_registry() {
        assert_eq!(names().collect::<Vec<_>>(), ["none", "zlib", "zstd"]);
        assert_eq!(by_name("zstd").unwrap(), Compression::Zstd);
        assert_eq!(by_name("qpl").unwrap_err().code, ErrorCode::InvalidArgument);
    }
}
