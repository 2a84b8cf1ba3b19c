//! Snapshot save (including its fdatasyncs) and restore from a cold page cache, in process, for
//! A/B experiments on the file path.
//! `cargo run --release -p multifd-core --example snapshot_ab -- CHANNELS SIZE_MIB REPS [DIR]`
//! The source is SRC_FILE (mapped, prefaulted) when set, else half-zero pages in 64 KiB runs
//! (as bench/snapshot's source). The snapshot file's cached pages are dropped before each
//! restore (posix_fadvise DONTNEED after its data is durable), so only this file goes cold.
//! DROP_ALL=1 drops the whole page cache instead (as bench/snapshot does). DIRECT=1 writes the pages with O_DIRECT. Prints save and restore GB/s of block memory and
//! the process CPU seconds each took.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use multifd_core::block::RamBlock;
use multifd_core::snapshot::{self, Progress, SnapshotOptions};


mod common;
use common::cpu_seconds;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let channels: usize = args[0].parse().unwrap();
    let mib: u64 = args[1].parse().unwrap();
    let reps: usize = args.get(2).map_or(3, |a| a.parse().unwrap());
    let dir = args.get(3).cloned().unwrap_or_else(|| "/var/tmp".into());
    let size = mib << 20;
    let src = Arc::new(match std::env::var("SRC_FILE") {
        Ok(path) => RamBlock::map_file("b", Path::new(&path), 4096, Some(size), true).unwrap(),
        Err(_) => {
            let b = RamBlock::allocate("b", size, 4096, true).unwrap();
            let mut x = 0x9e3779b97f4a7c15u64;
            let chunk: Vec<u8> = (0..8192).flat_map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_ne_bytes()
            }).collect();
            for at in (0..size).step_by(128 << 10) {
                b.store(at + (64 << 10), &chunk).unwrap();
                x = x.rotate_left(1);
            }
            b
        }
    });
    let path = Path::new(&dir).join(format!("snapshot-ab-{}.snap", std::process::id()));
    for _ in 0..reps {
        // A new prefaulted destination each rep, as bench/snapshot's restore uses.
        let dst = Arc::new(RamBlock::allocate("b", size, 4096, true).unwrap());
        let _ = std::fs::remove_file(&path);
        let progress = Progress::default();
        let (t, c) = (Instant::now(), cpu_seconds());
        snapshot::snapshot(std::slice::from_ref(&src), &path, SnapshotOptions { channels, direct_io: std::env::var("DIRECT").is_ok(), incremental: false }, &progress).unwrap();
        let (save, save_cpu) = (t.elapsed().as_secs_f64(), cpu_seconds() - c);
        if std::env::var("DROP_ALL").is_ok() {
            // As bench/snapshot does: every clean cached page and inode of the machine.
            std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
        }
        let f = std::fs::File::open(&path).unwrap();
        // SAFETY: plain syscall on a descriptor we own.
        unsafe { libc::posix_fadvise(std::os::fd::AsRawFd::as_raw_fd(&f), 0, 0, libc::POSIX_FADV_DONTNEED) };
        let (t, c) = (Instant::now(), cpu_seconds());
        snapshot::restore(&path, std::slice::from_ref(&dst), channels, &Progress::default()).unwrap();
        let (restore, restore_cpu) = (t.elapsed().as_secs_f64(), cpu_seconds() - c);
        let same = (0..size).step_by(1 << 20).all(|at| src.read_vec(at, 1 << 20) == dst.read_vec(at, 1 << 20));
        println!("channels={channels} save_gbps={:.2} save_cpu={save_cpu:.2} restore_gbps={:.2} restore_cpu={restore_cpu:.2} same={same}", size as f64 / save / 1e9, size as f64 / restore / 1e9);
    }
    let _ = std::fs::remove_file(&path);
}
