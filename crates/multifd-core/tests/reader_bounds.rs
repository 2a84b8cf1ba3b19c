//! Readers of hostile files: duplicate block names are refused, a sparse snapshot claiming a
//! huge block costs its bitmap in chunks, not in whole, and a tiny capture claiming huge blocks
//! is refused before anything is written (this file is its own process, so the peak resident
//! size it checks is its own).

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use multifd_core::ErrorCode;
use multifd_core::block::RamBlock;
use multifd_core::mapped_ram::BlockHeader;
use multifd_core::snapshot::{Progress, SnapshotOptions, inspect, restore, snapshot};
use multifd_core::stream::rebuild_to_dir;
use multifd_core::wire::{Compression, Geometry, InitPacket, PacketHeader};

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("multifd-bounds-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn block(name: &str, pages: u64) -> Arc<RamBlock> {
    let b = Arc::new(RamBlock::allocate(name, pages * 4096, 4096, false).unwrap());
    for p in 0..pages {
        b.store(p * 4096, &[p as u8 + 1]).unwrap();
    }
    b
}

fn opts() -> SnapshotOptions {
    SnapshotOptions { channels: 1, direct_io: false, incremental: false }
}

/// Tests of this file run one at a time, so a peak measured is the running test's.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Peak resident set of this process (VmHWM), in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

#[test]
fn duplicate_block_names_in_a_snapshot_are_refused() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TempDir::new("dup");
    let path = dir.0.join("s.snap");
    let src = [block("aa", 4), block("bb", 4)];
    snapshot(&src, &path, opts(), &Progress::default()).unwrap();
    // The second table entry's name (after the 40-byte fixed header and the first entry).
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(b"aa", 40 + 1 + 2 + 16 + 1).unwrap();
    let e = inspect(&path).unwrap_err();
    assert_eq!(e.code, ErrorCode::DuplicateBlock, "{e}");
    assert!(e.message.contains("\"aa\""), "{e}");
    let dst = [block("aa", 4), block("bb", 4)];
    assert_eq!(restore(&path, &dst, 1, &Progress::default()).unwrap_err().code, ErrorCode::DuplicateBlock);
}

#[test]
fn a_sparse_snapshot_claiming_4_tib_is_inspected_in_bounded_memory() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TempDir::new("huge");
    let path = dir.0.join("s.snap");
    snapshot(&[block("big", 64)], &path, opts(), &Progress::default()).unwrap();
    let info = inspect(&path).unwrap();
    let e = &info.blocks[0];
    // Claim 4 TiB: its 128 MiB bitmap (holes, but for the first word) must lie in the file.
    let claimed = 4u64 << 40;
    let layout = BlockHeader::layout(e.header_offset, claimed, 4096).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&claimed.to_be_bytes(), 40 + 1 + 3).unwrap();
    f.write_all_at(&layout.encode(), e.header_offset).unwrap();
    // The old pages region becomes bitmap: cut it off, then extend the file with a hole.
    f.set_len(e.layout.pages_offset).unwrap();
    f.set_len(layout.pages_offset).unwrap();
    let before = peak_rss();
    let info = inspect(&path).unwrap();
    let grown = peak_rss().saturating_sub(before);
    assert_eq!(info.blocks[0].len, claimed);
    assert_eq!(info.blocks[0].pages_present, 64);
    assert!(grown < 16 << 20, "inspect grew the peak resident set by {grown} bytes for a 128 MiB bitmap");
}

/// A channel capture: the init packet, then one packet per data page `(block, offset, byte)`.
fn capture(pages: &[(&str, u64, u8)]) -> Vec<u8> {
    let g = Geometry::new(4096).unwrap();
    let mut out = InitPacket { uuid: [7; 16], channel_id: 0 }.encode().to_vec();
    for (i, &(block, offset, byte)) in pages.iter().enumerate() {
        out.extend(PacketHeader::data(g, Compression::None, i as u64, block.as_bytes(), &[offset], &[], 4096).encode(g).unwrap());
        out.extend([byte; 4096]);
    }
    out
}

#[test]
fn a_tiny_capture_claiming_huge_blocks_is_refused_before_anything_is_written() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TempDir::new("rebuild");
    let g = Geometry::new(4096).unwrap();
    let far = 15u64 << 30;
    let bytes = capture(&[("a", far, 1), ("b", far, 2), ("c", 0, 3)]);
    assert!(bytes.len() < 20 << 10);
    let out = dir.0.join("out");
    let e = rebuild_to_dir(&[&bytes], g, &out, 16 << 30).unwrap_err();
    assert_eq!(e.code, ErrorCode::OffsetRange, "{e}");
    assert!(!out.exists(), "nothing is created for a refused capture");
    // Within the bound: sparse files of the claimed length, the pages where they belong.
    let before = peak_rss();
    let (files, _) = rebuild_to_dir(&[&bytes], g, &out, 32 << 30).unwrap();
    assert!(peak_rss() - before < 16 << 20, "rebuilding 30 GiB of blocks held them in memory");
    assert_eq!(files.iter().map(|f| (f.name.as_str(), f.len)).collect::<Vec<_>>(), [("a", far + 4096), ("b", far + 4096), ("c", 4096)]);
    let a = std::fs::File::open(out.join("a")).unwrap();
    let mut page = [0u8; 4096];
    a.read_exact_at(&mut page, far).unwrap();
    assert_eq!(page, [1; 4096]);
    // Existing names are never replaced: nothing new is left behind.
    let e = rebuild_to_dir(&[&bytes], g, &out, 32 << 30).unwrap_err();
    assert_eq!(e.code, ErrorCode::OutputExists, "{e}");
    let mut names: Vec<_> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["a", "b", "c"]);
}
