//! Snapshot files: round trip, sparseness, incremental snapshots, refusal of damaged files.

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::PathBuf;
use std::sync::Arc;

use multifd_core::ErrorCode;
use multifd_core::block::RamBlock;
use multifd_core::snapshot::{Progress, SnapshotOptions, inspect, restore, snapshot};

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("multifd-snap-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn blocks() -> Vec<Arc<RamBlock>> {
    let bs: Vec<_> = [("pc.ram", 8 << 20), ("odd", 3 * 4096 + 4096 * 300)].iter().map(|(n, l)| Arc::new(RamBlock::allocate(n, *l, 4096, false).unwrap())).collect();
    let mut x = 99u64;
    for b in &bs {
        for p in 0..b.pages() as u64 {
            if p % 3 == 0 {
                continue; // zero page
            }
            let page: Vec<u8> = (0..4096)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            b.store(p * 4096, &page).unwrap();
        }
    }
    bs
}

fn fresh_like(bs: &[Arc<RamBlock>]) -> Vec<Arc<RamBlock>> {
    bs.iter().map(|b| Arc::new(RamBlock::allocate(b.name(), b.len(), 4096, false).unwrap())).collect()
}

fn same(a: &[Arc<RamBlock>], b: &[Arc<RamBlock>]) -> bool {
    a.iter().zip(b).all(|(x, y)| (0..x.pages() as u64).all(|p| x.read_page(p * 4096) == y.read_page(p * 4096)))
}

fn opts(channels: usize, incremental: bool) -> SnapshotOptions {
    SnapshotOptions { channels, direct_io: false, incremental }
}

#[test]
fn round_trip_is_exact_and_sparse() {
    let dir = TempDir::new("rt");
    let path = dir.0.join("s.snap");
    let src = blocks();
    let info = snapshot(&src, &path, opts(4, false), &Progress::default()).unwrap();
    assert!(info.complete);
    assert_eq!(info.generation, 1);
    let nonzero: u64 = src.iter().map(|b| (0..b.pages() as u64).filter(|p| p % 3 != 0).count() as u64).sum();
    assert_eq!(info.blocks.iter().map(|b| b.pages_present).sum::<u64>(), nonzero);
    assert_eq!(inspect(&path).unwrap(), info);
    // Pages regions start on 1 MiB boundaries; zero pages are holes.
    assert!(info.blocks.iter().all(|b| b.layout.pages_offset % (1 << 20) == 0));
    let meta = std::fs::metadata(&path).unwrap();
    assert!(meta.blocks() * 512 < meta.len() * 3 / 4, "{} allocated of {}", meta.blocks() * 512, meta.len());

    let dst = fresh_like(&src);
    restore(&path, &dst, 3, &Progress::default()).unwrap();
    assert!(same(&src, &dst));
}

#[test]
fn incremental_snapshots_write_only_dirty_pages() {
    let dir = TempDir::new("inc");
    let path = dir.0.join("s.snap");
    let src = blocks();
    snapshot(&src, &path, opts(2, false), &Progress::default()).unwrap();
    // data -> other data, data -> zero, zero -> data
    src[0].fill(4096, 4096, 0xab).unwrap();
    src[0].fill(2 * 4096, 4096, 0).unwrap();
    src[1].fill(3 * 4096, 4096, 0xcd).unwrap();
    src[0].mark_dirty(4096, 2 * 4096).unwrap();
    src[1].mark_dirty(3 * 4096, 1).unwrap();
    let progress = Progress::default();
    let info = snapshot(&src, &path, opts(2, true), &progress).unwrap();
    assert_eq!(info.generation, 2);
    assert_eq!(progress.pages_written.load(std::sync::atomic::Ordering::Relaxed), 2);
    assert_eq!(progress.zero_pages.load(std::sync::atomic::Ordering::Relaxed), 1);
    let dst = fresh_like(&src);
    // Stale data in the target must not survive for pages absent from the file.
    for b in &dst {
        b.mark_written();
        b.fill(0, b.len(), 0xee).unwrap();
    }
    restore(&path, &dst, 4, &Progress::default()).unwrap();
    assert!(same(&src, &dst));
}

#[test]
fn damaged_or_unfinished_files_are_refused() {
    let dir = TempDir::new("bad");
    let path = dir.0.join("s.snap");
    let src = blocks();
    snapshot(&src, &path, opts(2, false), &Progress::default()).unwrap();
    let good = std::fs::read(&path).unwrap();
    let dst = fresh_like(&src);
    let try_with = |edit: &dyn Fn(&mut Vec<u8>)| {
        let mut bytes = good.clone();
        edit(&mut bytes);
        let p = dir.0.join("bad.snap");
        std::fs::write(&p, &bytes).unwrap();
        restore(&p, &dst, 2, &Progress::default()).unwrap_err().code
    };
    assert_eq!(try_with(&|b| b[12..16].copy_from_slice(&0u32.to_be_bytes())), ErrorCode::Incomplete);
    assert_eq!(try_with(&|b| b[0] = b'X'), ErrorCode::BadMagic);
    assert_eq!(try_with(&|b| b[11] = 9), ErrorCode::BadVersion);
    assert_eq!(try_with(&|b| b[16..20].copy_from_slice(&3000u32.to_be_bytes())), ErrorCode::FileFormat);
    assert_eq!(try_with(&|b| b[20..24].copy_from_slice(&5000u32.to_be_bytes())), ErrorCode::FileFormat);
    assert_eq!(try_with(&|b| b.truncate(30)), ErrorCode::FileFormat);
    // A block's header offset pointing into the header region, or past the file.
    assert_eq!(try_with(&|b| b[48..56].copy_from_slice(&8u64.to_be_bytes())), ErrorCode::FileFormat);
    assert_eq!(try_with(&|b| b[48..56].copy_from_slice(&u64::MAX.to_be_bytes())), ErrorCode::FileFormat);
    // The file cut short inside the pages of the last block: a present page lies past EOF.
    assert_eq!(try_with(&|b| b.truncate(b.len() - 4096)), ErrorCode::FileFormat);
    // Blocks that do not match the file.
    let other = vec![Arc::new(RamBlock::allocate("pc.ram", 4096, 4096, false).unwrap())];
    assert_eq!(restore(&path, &other, 1, &Progress::default()).unwrap_err().code, ErrorCode::BlockMismatch);
    assert_eq!(snapshot(&other, &path, opts(1, true), &Progress::default()).unwrap_err().code, ErrorCode::BlockMismatch);
    // The good file still restores.
    restore(&path, &dst, 2, &Progress::default()).unwrap();
    assert!(same(&src, &dst));
}

#[test]
fn an_interrupted_incremental_leaves_the_file_marked_incomplete() {
    let dir = TempDir::new("int");
    let path = dir.0.join("s.snap");
    let src = blocks();
    snapshot(&src, &path, opts(1, false), &Progress::default()).unwrap();
    // Simulate a crash after the incremental marked the file incomplete.
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().write_all_at(&0u32.to_be_bytes(), 12).unwrap();
    assert!(!inspect(&path).unwrap().complete);
    assert_eq!(snapshot(&src, &path, opts(1, true), &Progress::default()).unwrap_err().code, ErrorCode::Incomplete);
    // A full snapshot replaces it.
    assert!(snapshot(&src, &path, opts(1, false), &Progress::default()).unwrap().complete);
}

#[test]
fn direct_io_where_the_filesystem_supports_it() {
    let dir = TempDir::new("dio");
    let path = dir.0.join("s.snap");
    let src = blocks();
    match snapshot(&src, &path, SnapshotOptions { channels: 2, direct_io: true, incremental: false }, &Progress::default()) {
        Ok(info) => {
            assert!(info.complete);
            let dst = fresh_like(&src);
            restore(&path, &dst, 2, &Progress::default()).unwrap();
            assert!(same(&src, &dst));
        }
        // tmpfs has no O_DIRECT: a clear refusal, not a corrupt file.
        Err(e) => assert_eq!(e.code, ErrorCode::InvalidArgument, "{e}"),
    }
}

#[test]
fn restore_asks_for_the_data_ahead_of_its_reader_and_never_for_holes() {
    let dir = TempDir::new("ahead");
    let path = dir.0.join("s.snap");
    let src = blocks();
    let info = snapshot(&src, &path, opts(1, false), &Progress::default()).unwrap();
    let present: u64 = info.blocks.iter().map(|b| b.pages_present * 4096).sum();
    let dst = fresh_like(&src);
    let progress = Progress::default();
    restore(&path, &dst, 1, &progress).unwrap();
    assert!(same(&src, &dst));
    // One reader: every present page was asked for ahead of it, once; of the rest of the file
    // only the second block's header and bitmap (one filesystem block), never a hole (a third
    // of the pages).
    let asked = progress.read_ahead.load(std::sync::atomic::Ordering::Relaxed);
    assert!(asked >= present && asked <= present + 4096, "asked {asked} bytes ahead, {present} present");
}
