//! Readers of hostile files: duplicate block names are refused, and a sparse snapshot claiming
//! a huge block costs its bitmap in chunks, not in whole (one test per concern; this file is its
//! own process, so the peak resident size it checks is its own).

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use multifd_core::ErrorCode;
use multifd_core::block::RamBlock;
use multifd_core::mapped_ram::BlockHeader;
use multifd_core::snapshot::{Progress, SnapshotOptions, inspect, restore, snapshot};

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
        // SAFETY: test-only write inside the block.
        unsafe { *b.page_ptr(p * 4096) = p as u8 + 1 };
    }
    b
}

fn opts() -> SnapshotOptions {
    SnapshotOptions { channels: 1, direct_io: false, incremental: false }
}

/// Peak resident set of this process (VmHWM), in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

#[test]
fn duplicate_block_names_in_a_snapshot_are_refused() {
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
