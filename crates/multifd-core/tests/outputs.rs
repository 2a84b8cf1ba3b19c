//! Outputs on real filesystems: a full disk is an error, never a signal; holes stay holes; a
//! source file truncated while it is read fails with its own code.
//!
//! Each test body runs in a child process (this test binary, re-run for that one test), and
//! the parent asserts the child exited normally: a SIGBUS kills the child, not the suite, and
//! shows up as a failure naming the signal. Full-disk cases mount a small tmpfs (the suite runs
//! as root); where mounting is impossible they are skipped with the reason.

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use multifd_core::block::RamBlock;
use multifd_core::dest::{DestConfig, Destination};
use multifd_core::session::{Event, Failure};
use multifd_core::snapshot::{Progress, SnapshotOptions, restore, snapshot};
use multifd_core::source::{Selection, Source, SourceConfig};
use multifd_core::tls::{TlsClient, TlsOptions, TlsServer};
use multifd_core::transport::Address;
use multifd_core::wire::{Compression, Geometry};
use multifd_core::{Error, ErrorCode};

mod common;
use common::{fill, options, sink};

const MIB: u64 = 1 << 20;
const CHILD: &str = "MULTIFD_OUTPUTS_CHILD";

/// Runs the calling test's body in a child process: returns true in the parent (after checking
/// the child passed and was not killed by a signal), false in the child (run the body).
fn in_child(name: &str) -> bool {
    if std::env::var(CHILD).as_deref() == Ok(name) {
        return false;
    }
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, name)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    clean_up_after(pid);
    let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.signal(), None, "the child was killed by signal {:?} (7 is SIGBUS):\n{log}", out.status.signal());
    assert!(out.status.success(), "the child failed ({}):\n{log}", out.status);
    assert!(log.contains("1 passed"), "the child ran no test:\n{log}");
    true
}

/// Removes what a child left behind: tmpfs mounts and scratch directories if it died early,
/// its test PKI (all named with its process id).
fn clean_up_after(pid: u32) {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let ours = name.starts_with("multifd-outputs-") || name.starts_with("multifd-tls-test-");
        if ours && (name.contains(&format!("-{pid}-")) || name.ends_with(&format!("-{pid}"))) {
            let _ = std::process::Command::new("umount").arg("-l").arg(e.path()).stderr(std::process::Stdio::null()).status();
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// A tmpfs of `size` mounted on a fresh directory; unmounted on drop. `None` (with the reason
/// printed) where it cannot be mounted.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = std::env::temp_dir().join(format!("multifd-outputs-{}-{}", std::process::id(), size));
        std::fs::create_dir_all(&dir).unwrap();
        let out = std::process::Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(&dir).output();
        match out {
            Ok(o) if o.status.success() => Some(Tmpfs(dir)),
            Ok(o) => {
                eprintln!("SKIPPED: cannot mount a tmpfs (needs root): {}", String::from_utf8_lossy(&o.stderr).trim());
                None
            }
            Err(e) => {
                eprintln!("SKIPPED: cannot run mount: {e}");
                None
            }
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

fn scratch_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("multifd-outputs-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Bytes the file takes on disk.
fn on_disk(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

fn config(address: &Address, compression: Compression, zero_page_detection: bool) -> SourceConfig {
    SourceConfig { compression, zero_page_detection, peer_timeout: Some(Duration::from_secs(20)), ..common::source_config(address, [3; 16], 2) }
}

/// What a transfer ended with on each side (the first error, if any).
struct Outcome {
    source: Option<Error>,
    dest: Option<Error>,
}

/// Sends `src` whole into `dst` and syncs; then, for each of `rounds`, lets it change `src`
/// and sends the dirty pages with another sync. Stops at the first failure on either side.
fn transfer(src: &Arc<RamBlock>, dst: &Arc<RamBlock>, compression: Compression, zero_page_detection: bool, rounds: &[&dyn Fn(&RamBlock)]) -> Outcome {
    transfer_with(src, dst, compression, zero_page_detection, false, rounds)
}

/// [`transfer`], with mutual TLS on every channel when `tls`.
fn transfer_with(src: &Arc<RamBlock>, dst: &Arc<RamBlock>, compression: Compression, zero_page_detection: bool, tls: bool, rounds: &[&dyn Fn(&RamBlock)]) -> Outcome {
    let (dsink, drx) = sink();
    let server = tls.then(|| TlsServer::new(&options("dest", "ca.pem")).unwrap());
    let dest = Destination::listen(&Address::parse("tcp:127.0.0.1:0").unwrap(), Duration::from_secs(5), server, dsink).unwrap();
    dest.configure(DestConfig {
        uuid: [3; 16],
        channels: 2,
        geometry: Geometry::x86(),
        compression,
        blocks: vec![dst.clone()],
        channel_timeout: Duration::from_secs(10),
        peer_timeout: Some(Duration::from_secs(20)),
        integrity: false,
        resume_window: Duration::ZERO,
    })
    .unwrap();
    let (ssink, srx) = sink();
    let failure = Failure::new(ssink);
    let mut config = config(dest.address(), compression, zero_page_detection);
    config.tls = tls.then(|| TlsClient::new(&TlsOptions { name: Some("localhost".into()), ..options("source", "ca.pem") }, dest.address()).unwrap());
    let source = Source::start(config, failure.clone()).unwrap();
    // Sends a selection and syncs; true when the sync completed. The sync's Done arrives
    // either way: with the epoch, or with the first error.
    // The destination then reaches the sync's barrier, or fails.
    let round = |id: u32, selection: Selection| -> bool {
        source.send(id, src.clone(), selection).unwrap();
        let epoch = source.sync(id + 1).unwrap();
        let sent = loop {
            match srx.recv_timeout(Duration::from_secs(30)).expect("an answer to the sync within 30 s") {
                Event::Done { id: done, result } if done == id + 1 => break result.is_ok(),
                Event::Failed(_) => break false,
                _ => {}
            }
        };
        sent && loop {
            match drx.recv_timeout(Duration::from_secs(30)).expect("the destination reaches the sync or fails within 30 s") {
                Event::Synced { epoch: e, .. } if e == epoch => break true,
                Event::Failed(_) => break false,
                _ => {}
            }
        }
    };
    let mut ok = round(0, Selection::Whole);
    for (i, change) in rounds.iter().enumerate() {
        if !ok {
            break;
        }
        change(src);
        ok = round(10 * (i as u32 + 1), Selection::Dirty);
    }
    if ok {
        dest.finish().unwrap();
    }
    source.close(!ok);
    drop(drx);
    let outcome = Outcome { source: failure.first(), dest: dest.failure().first() };
    dest.close();
    outcome
}

/// Asserts `e` is `ERR_MULTIFD_NO_SPACE` naming `file`.
fn assert_no_space(e: Option<Error>, file: &Path) {
    let e = e.expect("the destination failed");
    assert_eq!(e.code, ErrorCode::NoSpace, "{e}");
    assert!(e.message.contains(&file.display().to_string()), "the message names the output file: {e}");
}

/// A 16 MiB source (every 5th page zero) received into a file on a 2 MiB tmpfs.
fn receive_into_full_disk(compression: Compression) {
    let Some(fs) = Tmpfs::mount("2m") else { return };
    let src = Arc::new(RamBlock::allocate("pc.ram", 16 * MIB, 4096, false).unwrap());
    fill(&src, 11, 5);
    let out = fs.path("pc.ram.out");
    let dst = Arc::new(RamBlock::map_file("pc.ram", &out, 4096, Some(16 * MIB), false).unwrap());
    let outcome = transfer(&src, &dst, compression, true, &[]);
    assert_no_space(outcome.dest, &out);
}

#[test]
fn receive_plain_pages_into_a_full_disk_is_no_space() {
    if in_child("receive_plain_pages_into_a_full_disk_is_no_space") {
        return;
    }
    receive_into_full_disk(Compression::None);
}

#[test]
fn receive_over_tls_into_a_full_disk_is_no_space() {
    if in_child("receive_over_tls_into_a_full_disk_is_no_space") {
        return;
    }
    let Some(fs) = Tmpfs::mount("2m") else { return };
    let src = Arc::new(RamBlock::allocate("pc.ram", 16 * MIB, 4096, false).unwrap());
    fill(&src, 13, 5);
    let out = fs.path("pc.ram.out");
    let dst = Arc::new(RamBlock::map_file("pc.ram", &out, 4096, Some(16 * MIB), false).unwrap());
    assert_no_space(transfer_with(&src, &dst, Compression::None, true, true, &[]).dest, &out);
}

#[test]
fn receive_zstd_pages_into_a_full_disk_is_no_space() {
    if in_child("receive_zstd_pages_into_a_full_disk_is_no_space") {
        return;
    }
    receive_into_full_disk(Compression::Zstd);
}

#[test]
fn without_fallocate_pages_go_through_the_descriptor() {
    if in_child("without_fallocate_pages_go_through_the_descriptor") {
        return;
    }
    // A filesystem without fallocate (emulated): received pages are written with pwrite, which
    // reports a full disk as ENOSPC; where there is room, the bytes arrive intact.
    let Some(fs) = Tmpfs::mount("24m") else { return };
    let src = Arc::new(RamBlock::allocate("pc.ram", 8 * MIB, 4096, false).unwrap());
    fill(&src, 29, 4);
    for compression in [Compression::None, Compression::Zstd] {
        let out = fs.path(&format!("{compression:?}.out"));
        let dst = Arc::new(RamBlock::map_file("pc.ram", &out, 4096, Some(8 * MIB), false).unwrap());
        dst.emulate_no_fallocate();
        let outcome = transfer(&src, &dst, compression, true, &[]);
        assert!(outcome.dest.is_none() && outcome.source.is_none(), "{:?} {:?}", outcome.dest, outcome.source);
        assert!((0..2048u64).all(|p| dst.read_page(p * 4096) == src.read_page(p * 4096)), "{compression:?}: the pages arrived");
    }
    std::fs::write(fs.path("filler"), vec![1u8; 10 * MIB as usize]).unwrap_or(());
    let out = fs.path("full.out");
    let dst = Arc::new(RamBlock::map_file("pc.ram", &out, 4096, Some(8 * MIB), false).unwrap());
    dst.emulate_no_fallocate();
    assert_no_space(transfer(&src, &dst, Compression::None, true, &[]).dest, &out);
}

#[test]
fn receive_zero_pages_over_data_on_a_full_disk_is_no_space() {
    if in_child("receive_zero_pages_over_data_on_a_full_disk_is_no_space") {
        return;
    }
    // An existing output file full of data (not known to be zero), on a disk with no room
    // left: zero pages over it free space instead of needing it, and the data pages fail.
    let Some(fs) = Tmpfs::mount("4m") else { return };
    let out = fs.path("pc.ram.out");
    std::fs::write(&out, vec![0x5au8; 3 * MIB as usize]).unwrap();
    std::fs::write(fs.path("filler"), vec![1u8; MIB as usize]).unwrap_or(());
    let src = Arc::new(RamBlock::allocate("pc.ram", 16 * MIB, 4096, false).unwrap());
    fill(&src, 5, 2);
    let dst = Arc::new(RamBlock::map_file("pc.ram", &out, 4096, Some(16 * MIB), false).unwrap());
    let outcome = transfer(&src, &dst, Compression::None, true, &[]);
    assert_no_space(outcome.dest, &out);
}

#[test]
fn zero_pages_received_into_a_fresh_file_stay_holes() {
    if in_child("zero_pages_received_into_a_fresh_file_stay_holes") {
        return;
    }
    // 256 MiB of zero pages into a fresh file on a 16 MiB tmpfs: nothing is written.
    let Some(fs) = Tmpfs::mount("16m") else { return };
    let src = Arc::new(RamBlock::allocate("pc.ram", 256 * MIB, 4096, false).unwrap());
    let out = fs.path("zero.out");
    let dst = Arc::new(RamBlock::map_file("pc.ram", &out, 4096, Some(256 * MIB), false).unwrap());
    let outcome = transfer(&src, &dst, Compression::None, true, &[]);
    assert!(outcome.dest.is_none() && outcome.source.is_none(), "{:?} {:?}", outcome.dest, outcome.source);
    assert_eq!(std::fs::metadata(&out).unwrap().len(), 256 * MIB);
    assert!(on_disk(&out) <= 64 << 10, "{} bytes on disk for an all-zero block", on_disk(&out));
}

#[test]
fn a_data_page_that_becomes_zero_is_punched_out() {
    if in_child("a_data_page_that_becomes_zero_is_punched_out") {
        return;
    }
    let Some(fs) = Tmpfs::mount("32m") else { return };
    let src = Arc::new(RamBlock::allocate("pc.ram", 8 * MIB, 4096, false).unwrap());
    fill(&src, 3, 0);
    let out = fs.path("pc.ram.out");
    let dst = Arc::new(RamBlock::map_file("pc.ram", &out, 4096, Some(8 * MIB), false).unwrap());
    let before = std::cell::Cell::new(0);
    // Round 2: the first 4 MiB become zero.
    let zero_half = |b: &RamBlock| {
        before.set(on_disk(&out));
        b.fill(0, 4 * MIB, 0).unwrap();
        b.mark_dirty(0, 4 * MIB).unwrap();
    };
    let outcome = transfer(&src, &dst, Compression::None, true, &[&zero_half]);
    assert!(outcome.dest.is_none() && outcome.source.is_none(), "{:?} {:?}", outcome.dest, outcome.source);
    // Measured before reading: a read fault on a tmpfs hole allocates the page.
    let after = on_disk(&out);
    assert!(before.get() >= 8 * MIB, "round 1 wrote 8 MiB ({} on disk)", before.get());
    assert!(after <= 4 * MIB + (64 << 10), "the zeroed half was punched out: {after} bytes on disk");
    assert!((0..1024u64).all(|p| dst.is_zero_page(p * 4096)), "the zeroed pages read back as zero");
    assert!((1024..2048u64).all(|p| dst.read_page(p * 4096) == src.read_page(p * 4096)), "the data pages are intact");
}

/// A snapshot of `src` in a scratch directory.
fn snapshot_of(src: &Arc<RamBlock>, tag: &str) -> (PathBuf, PathBuf) {
    let dir = scratch_dir(tag);
    let path = dir.join("vm.snap");
    snapshot(std::slice::from_ref(src), &path, SnapshotOptions { channels: 2, direct_io: false, incremental: false }, &Progress::default()).unwrap();
    (dir, path)
}

#[test]
fn restore_into_a_full_disk_is_no_space() {
    if in_child("restore_into_a_full_disk_is_no_space") {
        return;
    }
    let Some(fs) = Tmpfs::mount("2m") else { return };
    let src = Arc::new(RamBlock::allocate("pc.ram", 16 * MIB, 4096, false).unwrap());
    fill(&src, 17, 7);
    let (dir, snap) = snapshot_of(&src, "restore-full");
    let out = fs.path("pc.ram.out");
    let dst = Arc::new(RamBlock::map_file("pc.ram", &out, 4096, Some(16 * MIB), false).unwrap());
    let e = restore(&snap, &[dst], 2, &Progress::default()).unwrap_err();
    assert_no_space(Some(e), &out);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn restoring_an_all_zero_block_takes_no_space() {
    if in_child("restoring_an_all_zero_block_takes_no_space") {
        return;
    }
    let Some(fs) = Tmpfs::mount("16m") else { return };
    let src = Arc::new(RamBlock::allocate("pc.ram", 256 * MIB, 4096, false).unwrap());
    let (dir, snap) = snapshot_of(&src, "restore-zero");
    let out = fs.path("pc.ram.out");
    let dst = Arc::new(RamBlock::map_file("pc.ram", &out, 4096, Some(256 * MIB), false).unwrap());
    restore(&snap, &[dst], 2, &Progress::default()).unwrap();
    assert_eq!(std::fs::metadata(&out).unwrap().len(), 256 * MIB);
    assert!(on_disk(&out) <= 64 << 10, "{} bytes on disk for an all-zero block", on_disk(&out));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn restore_over_an_existing_file_punches_absent_pages() {
    if in_child("restore_over_an_existing_file_punches_absent_pages") {
        return;
    }
    // The target file already holds data: absent pages must read as zero, and take no space.
    let dir = scratch_dir("restore-over");
    let src = Arc::new(RamBlock::allocate("pc.ram", 8 * MIB, 4096, false).unwrap());
    src.fill(0, MIB, 0x42).unwrap();
    let (snapdir, snap) = snapshot_of(&src, "restore-over-snap");
    let out = dir.join("pc.ram.out");
    std::fs::write(&out, vec![0xeeu8; 8 * MIB as usize]).unwrap();
    // Written back first: ext4 allocates extra blocks around mapped writes into a file whose
    // own data is still delayed-allocated, which is not what this test measures.
    std::fs::File::open(&out).unwrap().sync_all().unwrap();
    let dst = Arc::new(RamBlock::map_file("pc.ram", &out, 4096, None, false).unwrap());
    restore(&snap, std::slice::from_ref(&dst), 2, &Progress::default()).unwrap();
    assert!((0..2048u64).all(|p| dst.read_page(p * 4096) == src.read_page(p * 4096)));
    assert!(on_disk(&out) <= MIB + (64 << 10), "{} bytes on disk for 1 MiB of data", on_disk(&out));
    drop(dst);
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&snapdir).unwrap();
}

/// A 16 MiB source file, mapped, then truncated to 4 MiB before it is sent (the same as a
/// truncation during the send: the pages past the new end are gone from the mapping).
fn truncated_source(tag: &str) -> (PathBuf, Arc<RamBlock>) {
    let dir = scratch_dir(tag);
    let path = dir.join("vm.img");
    let src = Arc::new(RamBlock::map_file("pc.ram", &path, 4096, Some(16 * MIB), false).unwrap());
    fill(&src, 23, 9);
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(4 * MIB).unwrap();
    (path, src)
}

fn send_truncated(tag: &str, compression: Compression, zero_page_detection: bool, tls: bool) {
    let (path, src) = truncated_source(tag);
    let dst = Arc::new(RamBlock::allocate("pc.ram", 16 * MIB, 4096, false).unwrap());
    let outcome = transfer_with(&src, &dst, compression, zero_page_detection, tls, &[]);
    let e = outcome.source.expect("the source failed");
    assert_eq!(e.code, ErrorCode::SourceTruncated, "{e}");
    assert!(e.message.contains(&path.display().to_string()), "the message names the source file: {e}");
    drop(src);
    std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
}

#[test]
fn a_source_file_truncated_while_scanned_fails_with_its_code() {
    if in_child("a_source_file_truncated_while_scanned_fails_with_its_code") {
        return;
    }
    // The zero scan reads past the new end in user space: SIGBUS, caught.
    send_truncated("trunc-scan", Compression::None, true, false);
}

#[test]
fn a_source_file_truncated_while_written_to_the_socket_fails_with_its_code() {
    if in_child("a_source_file_truncated_while_written_to_the_socket_fails_with_its_code") {
        return;
    }
    // No scan: the kernel's writev meets the missing pages (EFAULT).
    send_truncated("trunc-writev", Compression::None, false, false);
}

#[test]
fn a_source_file_truncated_while_compressed_fails_with_its_code() {
    if in_child("a_source_file_truncated_while_compressed_fails_with_its_code") {
        return;
    }
    send_truncated("trunc-zstd", Compression::Zstd, false, false);
}

#[test]
fn a_source_file_truncated_while_encrypted_fails_with_its_code() {
    if in_child("a_source_file_truncated_while_encrypted_fails_with_its_code") {
        return;
    }
    // TLS copies the pages out in user space (no scan): SIGBUS, caught.
    send_truncated("trunc-tls", Compression::None, false, true);
}

#[test]
fn a_snapshot_of_a_truncated_source_file_fails_with_its_code() {
    if in_child("a_snapshot_of_a_truncated_source_file_fails_with_its_code") {
        return;
    }
    let (path, src) = truncated_source("trunc-snapshot");
    let out = path.with_file_name("vm.snap");
    let e = snapshot(std::slice::from_ref(&src), &out, SnapshotOptions { channels: 2, direct_io: false, incremental: false }, &Progress::default()).unwrap_err();
    assert_eq!(e.code, ErrorCode::SourceTruncated, "{e}");
    assert!(e.message.contains(&path.display().to_string()), "{e}");
    drop(src);
    std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
}

#[test]
fn a_sigbus_outside_our_mappings_still_kills() {
    if std::env::var(CHILD).as_deref() != Ok("a_sigbus_outside_our_mappings_still_kills") {
        let child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["a_sigbus_outside_our_mappings_still_kills", "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD, "a_sigbus_outside_our_mappings_still_kills")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        let out = child.wait_with_output().unwrap();
        clean_up_after(pid);
        assert_eq!(out.status.signal(), Some(libc::SIGBUS), "the guard chains to the default action for addresses it does not own");
        return;
    }
    // Install the guard (one guarded mapping), then fault on a mapping that is not ours.
    let dir = scratch_dir("foreign");
    let _guarded = RamBlock::map_file("g", &dir.join("g"), 4096, Some(4096), false).unwrap();
    let path = dir.join("foreign");
    let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
    file.set_len(4096).unwrap();
    // SAFETY: a fresh shared mapping of our own file, read past its end on purpose.
    unsafe {
        use std::os::fd::AsRawFd;
        let p = libc::mmap(std::ptr::null_mut(), 8192, libc::PROT_READ, libc::MAP_SHARED, file.as_raw_fd(), 0);
        assert_ne!(p, libc::MAP_FAILED);
        std::ptr::read_volatile(p.cast::<u8>().add(4096));
    }
    unreachable!("the read past the end raised SIGBUS");
}
