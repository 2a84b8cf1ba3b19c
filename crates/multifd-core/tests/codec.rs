//! The RAM packet codec against the spec's vectors, every validation error, and random input.

use multifd_core::ErrorCode;
use multifd_core::wire::{BlockInfo, Compression, Flags, Geometry, PacketHeader, PacketValidator};

const G: Geometry = Geometry::x86();

fn blocks() -> Vec<BlockInfo> {
    vec![
        BlockInfo { name: b"pc.ram".to_vec(), length: 64 << 20 },
        BlockInfo { name: b"/rom@etc/acpi/tables".to_vec(), length: 128 << 10 },
        BlockInfo { name: vec![b'x'; 255], length: 4096 },
    ]
}

fn validator(blocks: &[BlockInfo], compression: Compression) -> PacketValidator<'_, [BlockInfo]> {
    PacketValidator { geometry: G, compression, blocks }
}

/// Spec appendix A.2: SYNC-only packet, packet_num 5.
#[test]
fn appendix_a2_sync_packet() {
    let bytes = PacketHeader::sync(5).encode(G).unwrap();
    assert_eq!(bytes.len(), 1344);
    let head: [u8; 32] = [
        0x11, 0x22, 0x33, 0x44, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, //
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5,
    ];
    assert_eq!(bytes[..32], head);
    assert!(bytes[32..].iter().all(|&b| b == 0));
    let b = blocks();
    let mut h = PacketHeader::default();
    let v = validator(&b, Compression::Zstd).decode(&bytes, &mut h).unwrap();
    assert_eq!(v.block, None);
    assert_eq!(v.payload_len, 0);
    assert!(h.flags.is_sync());
    assert_eq!(h.packet_num, 5);
}

/// Spec appendix A.3: nocomp data packet with 2 normal pages and 1 zero page.
#[test]
fn appendix_a3_data_packet() {
    let h = PacketHeader::data(G, Compression::None, 7, b"pc.ram", &[0x1000, 0x3000], &[0x2000], 8192);
    let bytes = h.encode(G).unwrap();
    let mut expect = vec![0u8; 1344];
    expect[..16].copy_from_slice(&[0x11, 0x22, 0x33, 0x44, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0x80]);
    expect[16..32].copy_from_slice(&[0, 0, 0, 2, 0, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 7]);
    expect[32..36].copy_from_slice(&[0, 0, 0, 1]);
    expect[0x40..0x46].copy_from_slice(b"pc.ram");
    expect[0x140..0x148].copy_from_slice(&0x1000u64.to_be_bytes());
    expect[0x148..0x150].copy_from_slice(&0x3000u64.to_be_bytes());
    expect[0x150..0x158].copy_from_slice(&0x2000u64.to_be_bytes());
    assert_eq!(bytes, expect);

    let b = blocks();
    let mut back = PacketHeader::default();
    let v = validator(&b, Compression::None).decode(&bytes, &mut back).unwrap();
    assert_eq!(back, h);
    assert_eq!(v.block, Some(0));
    assert_eq!(v.payload_len, 8192);
    assert_eq!(back.normal_offsets(), &[0x1000, 0x3000]);
    assert_eq!(back.zero_offsets(), &[0x2000]);
}

#[test]
fn seed_era_packets_are_accepted() {
    let b = blocks();
    // Seed/9.0/9.1 SYNC: pages_alloc = N, stale name, zero counts.
    let mut sync = PacketHeader::sync(9);
    sync.pages_alloc = 128;
    let mut bytes = sync.encode(G).unwrap();
    bytes[64..70].copy_from_slice(b"stale!");
    bytes[320..328].fill(0xff); // stale offset past the counts: ignored
    validator(&b, Compression::None).decode(&bytes, &mut PacketHeader::default()).unwrap();
    // Pre-9.0 SYNC with data attached.
    let mut with_data = PacketHeader::data(G, Compression::None, 10, b"pc.ram", &[0], &[], 4096);
    with_data.flags = Flags(Flags::SYNC);
    let bytes = with_data.encode(G).unwrap();
    let mut h = PacketHeader::default();
    assert_eq!(validator(&b, Compression::None).decode(&bytes, &mut h).unwrap().block, Some(0));
    assert!(h.flags.is_sync());
    // 255-byte name fills the field up to its NUL.
    let long = PacketHeader::data(G, Compression::None, 1, &[b'x'; 255], &[0], &[], 4096);
    validator(&b, Compression::None).decode(&long.encode(G).unwrap(), &mut h).unwrap();
    assert_eq!(h.block.len(), 255);
}

#[test]
fn round_trips_for_every_method_and_page_size() {
    for page_size in [4096u32, 16384, 65536] {
        let g = Geometry::new(page_size).unwrap();
        let len = 1u64 << 24;
        let b = [BlockInfo { name: b"m".to_vec(), length: len }];
        for method in [Compression::None, Compression::Zlib, Compression::Zstd] {
            let n = g.page_count() as u64;
            let normal: Vec<u64> = (0..n / 2).map(|i| i * 3 * page_size as u64).collect();
            let zero: Vec<u64> = (0..n / 2).map(|i| (i * 3 + 1) * page_size as u64).collect();
            let size = if method == Compression::None { normal.len() as u32 * page_size } else { 777 };
            let h = PacketHeader::data(g, method, u64::MAX, b"m", &normal, &zero, size);
            let bytes = h.encode(g).unwrap();
            assert_eq!(bytes.len(), g.header_len());
            let mut back = PacketHeader::default();
            PacketValidator { geometry: g, compression: method, blocks: &b[..] }.decode(&bytes, &mut back).unwrap();
            assert_eq!(back, h);
        }
    }
}

/// Encodes `h`, applies `edit` to the bytes, and returns the validation error code.
fn code_of(h: &PacketHeader, compression: Compression, edit: impl FnOnce(&mut Vec<u8>)) -> ErrorCode {
    let b = blocks();
    let mut bytes = h.encode(G).unwrap();
    edit(&mut bytes);
    let e = validator(&b, compression).decode(&bytes, &mut PacketHeader::default()).unwrap_err();
    assert!(e.message.len() > 20, "message should say what was expected: {e}");
    e.code
}

fn put32(bytes: &mut [u8], at: usize, v: u32) {
    bytes[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn put64(bytes: &mut [u8], at: usize, v: u64) {
    bytes[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// A change applied to an encoded header.
type Edit = Box<dyn FnOnce(&mut Vec<u8>)>;

fn good() -> PacketHeader {
    PacketHeader::data(G, Compression::None, 1, b"pc.ram", &[0, 4096], &[8192], 8192)
}

#[test]
fn every_validation_error_has_its_code() {
    use Compression::*;
    use ErrorCode::*;
    let g = good();
    let cases: Vec<(ErrorCode, Compression, Edit)> = vec![
        (BadMagic, None, Box::new(|b| put32(b, 0, 0x11223345))),
        (BadVersion, None, Box::new(|b| put32(b, 4, 2))),
        (UnknownFlags, None, Box::new(|b| put32(b, 8, 0x100))),
        (UnsupportedPacket, None, Box::new(|b| put32(b, 8, 0x40))),
        (Truncated, None, Box::new(|b| b.truncate(1343))),
        (Truncated, None, Box::new(|b| b.truncate(11))),
        (PagesAlloc, None, Box::new(|b| put32(b, 12, 129))),
        (PagesAlloc, None, Box::new(|b| put32(b, 12, u32::MAX))),
        (NormalPages, None, Box::new(|b| put32(b, 16, 129))),
        (ZeroPages, None, Box::new(|b| put32(b, 32, 127))),
        // normal + zero would overflow u32: must be caught, not wrapped.
        (ZeroPages, None, Box::new(|b| put32(b, 32, u32::MAX))),
        (BlockName, None, Box::new(|b| b[64..320].fill(b'a'))),
        (UnknownBlock, None, Box::new(|b| b[64..70].copy_from_slice(b"pc.rom"))),
        (UnknownBlock, None, Box::new(|b| b[64..320].fill(0))),
        (OffsetAlign, None, Box::new(|b| put64(b, 320, 1))),
        (OffsetAlign, None, Box::new(|b| put64(b, 336, 4097))),
        (OffsetRange, None, Box::new(|b| put64(b, 328, 64 << 20))),
                (OffsetRange, None, Box::new(|b| put64(b, 320, u64::MAX - 4095))),
        (OffsetRange, None, Box::new(|b| put64(b, 320, !4095u64))),
        (UnsupportedCompression, None, Box::new(|b| put32(b, 8, 0x08))),
        (UnsupportedCompression, None, Box::new(|b| put32(b, 8, 0x10))),
        (UnsupportedCompression, None, Box::new(|b| put32(b, 8, 0x20))),
        (UnsupportedCompression, None, Box::new(|b| put32(b, 8, 0x06))),
        (CompressionMismatch, None, Box::new(|b| put32(b, 8, 0x02))),
        (CompressionMismatch, Zstd, Box::new(|_| {})),
        (CompressionMismatch, Zlib, Box::new(|b| put32(b, 8, 0x04))),
        (PayloadSize, None, Box::new(|b| put32(b, 20, 8191))),
        (PayloadSize, None, Box::new(|b| put32(b, 20, 0))),
        (PayloadSize, Zlib, Box::new(|b| {
            put32(b, 8, 0x02);
            put32(b, 20, 2 * 524288 + 1);
        })),
        (PayloadSize, Zstd, Box::new(|b| {
            put32(b, 8, 0x04);
            put32(b, 20, 0);
        })),
    ];
    for (i, (want, method, edit)) in cases.into_iter().enumerate() {
        assert_eq!(code_of(&g, method, edit), want, "case {i}");
    }
    // Compressed packet of only zero pages: size must be 0.
    let zero_only = PacketHeader::data(G, Compression::Zlib, 1, b"pc.ram", &[], &[0], 5);
    assert_eq!(code_of(&zero_only, Compression::Zlib, |_| {}), PayloadSize);
}

#[test]
fn checks_run_in_qemu_order() {
    use ErrorCode::*;
    let g = good();
    // Each case breaks two fields; the one QEMU checks first must be reported.
    assert_eq!(code_of(&g, Compression::None, |b| { put32(b, 0, 0); put32(b, 4, 9) }), BadMagic);
    assert_eq!(code_of(&g, Compression::None, |b| { put32(b, 4, 9); put32(b, 12, 999) }), BadVersion);
    assert_eq!(code_of(&g, Compression::None, |b| { put32(b, 12, 999); put32(b, 16, 999) }), PagesAlloc);
    assert_eq!(code_of(&g, Compression::None, |b| { put32(b, 16, 999); b[64..320].fill(1) }), NormalPages);
    assert_eq!(code_of(&g, Compression::None, |b| { put32(b, 32, 999); b[64..320].fill(1) }), ZeroPages);
    assert_eq!(code_of(&g, Compression::None, |b| { b[64..320].fill(1); put64(b, 320, 3) }), BlockName);
    assert_eq!(code_of(&g, Compression::None, |b| { b[64] = b'q'; put64(b, 320, 3) }), UnknownBlock);
    assert_eq!(code_of(&g, Compression::None, |b| { put64(b, 320, 3); put32(b, 8, 2) }), OffsetAlign);
    assert_eq!(code_of(&g, Compression::None, |b| { put64(b, 320, 1 << 40); put32(b, 8, 2) }), OffsetRange);
    assert_eq!(code_of(&g, Compression::None, |b| { put32(b, 8, 2); put32(b, 20, 1) }), CompressionMismatch);
    // Normal offsets are checked before zero offsets.
    assert_eq!(code_of(&g, Compression::None, |b| { put64(b, 328, 1 << 40); put64(b, 336, 1) }), OffsetRange);
}

#[test]
fn empty_packets_skip_the_block_lookup() {
    let b = blocks();
    // SYNC-only with a garbage, unterminated name and compression code 0 under zstd: accepted.
    let mut bytes = PacketHeader::sync(3).encode(G).unwrap();
    bytes[64..320].fill(0xee);
    let mut h = PacketHeader::default();
    validator(&b, Compression::Zstd).decode(&bytes, &mut h).unwrap();
    assert!(h.block.is_empty());
    // The negotiated code on an empty packet is fine too.
    put32(&mut bytes, 8, Flags::SYNC | 0x04);
    validator(&b, Compression::Zstd).decode(&bytes, &mut h).unwrap();
    // Another method's code is not.
    put32(&mut bytes, 8, Flags::SYNC | 0x02);
    let e = validator(&b, Compression::Zstd).decode(&bytes, &mut h).unwrap_err();
    assert_eq!(e.code, ErrorCode::CompressionMismatch);
}

/// xorshift64*: deterministic, dependency-free randomness for the property tests.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Values near the edges that break decoders.
    fn edgy32(&mut self) -> u32 {
        const EDGES: [u32; 10] = [0, 1, 2, 127, 128, 129, 256, 0x7fff_ffff, 0x8000_0000, u32::MAX];
        if self.below(2) == 0 { EDGES[self.below(EDGES.len() as u64) as usize] } else { self.next() as u32 }
    }
}

fn iterations() -> u64 {
    std::env::var("MULTIFD_FUZZ_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000)
}

/// Whatever a decode accepts must be internally consistent and inside its block.
fn check_accepted(h: &PacketHeader, b: &[BlockInfo], v: multifd_core::wire::ValidatedPacket, compression: Compression) {
    assert!(h.pages_alloc <= 128);
    assert!(h.normal_pages as u64 + h.zero_pages as u64 <= h.pages_alloc as u64);
    assert_eq!(h.offsets.len(), (h.normal_pages + h.zero_pages) as usize);
    if let Some(i) = v.block {
        for &o in &h.offsets {
            assert!(o % 4096 == 0 && o + 4096 <= b[i].length, "offset {o} escaped block {i}");
        }
    }
    if compression == Compression::None {
        assert_eq!(v.payload_len as u64, h.normal_pages as u64 * 4096);
    } else {
        assert!(v.payload_len <= 1 << 20);
    }
}

#[test]
fn mutated_headers_never_panic_and_never_escape() {
    let b = blocks();
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let mut h = PacketHeader::default();
    let (mut ok, mut err) = (0u64, 0u64);
    for i in 0..iterations() {
        let method = [Compression::None, Compression::Zlib, Compression::Zstd][(i % 3) as usize];
        let block = &b[rng.below(3) as usize];
        let pages = block.length / 4096;
        let normal: Vec<u64> = (0..rng.below(65)).map(|_| rng.below(pages) * 4096).collect();
        let zero: Vec<u64> = (0..rng.below(64)).map(|_| rng.below(pages) * 4096).collect();
        let size = if method == Compression::None { normal.len() as u32 * 4096 } else { 1 + rng.below(1 << 20) as u32 };
        let size = if normal.is_empty() { 0 } else { size };
        let mut bytes = PacketHeader::data(G, method, rng.next(), &block.name, &normal, &zero, size).encode(G).unwrap();
        for _ in 0..1 + rng.below(3) {
            match rng.below(4) {
                0 => {
                    let at = rng.below(9) as usize * 4;
                    if at + 4 <= bytes.len() {
                        put32(&mut bytes, at, rng.edgy32());
                    }
                }
                1 => {
                    let at = 320 + 8 * rng.below(128) as usize;
                    if at + 8 <= bytes.len() {
                        put64(&mut bytes, at, (rng.edgy32() as u64) << rng.below(40));
                    }
                }
                2 if !bytes.is_empty() => {
                    let at = rng.below(bytes.len() as u64) as usize;
                    bytes[at] ^= 1 << rng.below(8);
                }
                _ => bytes.truncate(rng.below(bytes.len() as u64 + 1) as usize),
            }
        }
        match validator(&b, method).decode(&bytes, &mut h) {
            Ok(v) => {
                check_accepted(&h, &b, v, method);
                ok += 1;
            }
            Err(_) => err += 1,
        }
    }
    assert!(ok > 0 && err > 0, "mutations should give both outcomes: {ok} ok, {err} errors");
}

#[test]
fn random_bytes_never_panic() {
    let b = blocks();
    let mut rng = Rng(0xdead_beef_cafe_f00d);
    let mut bytes = vec![0u8; 1344];
    let mut h = PacketHeader::default();
    for i in 0..iterations() {
        // Keep a valid magic/version most of the time so the deeper checks get exercised.
        bytes.iter_mut().for_each(|x| *x = rng.next() as u8);
        if i % 4 != 0 {
            put32(&mut bytes, 0, 0x1122_3344);
            put32(&mut bytes, 4, 1);
            put32(&mut bytes, 8, rng.edgy32() & 0x7f);
            put32(&mut bytes, 12, rng.below(130) as u32);
            put32(&mut bytes, 16, rng.below(130) as u32);
            put32(&mut bytes, 32, rng.below(130) as u32);
        }
        let len = if i % 16 == 0 { rng.below(1345) as usize } else { 1344 };
        for method in [Compression::None, Compression::Zlib] {
            if let Ok(v) = validator(&b, method).decode(&bytes[..len], &mut h) {
                check_accepted(&h, &b, v, method);
            }
        }
    }
}
