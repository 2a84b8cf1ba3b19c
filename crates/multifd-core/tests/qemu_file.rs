//! QEMU's own mapped-ram files read back byte for byte: a 16 MiB guest with known RAM
//! (bench/qemu/ramgen.py) is saved with `migrate file:` by bench/qemu/qemu_mig.py, with and
//! without multifd, and `QemuFile` must extract exactly that RAM. Skipped, with a message, when
//! QEMU 10 or newer (or python3) is not installed; CI installs it.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

use multifd_core::qemu_file::QemuFile;

const MIB: u64 = 1 << 20;
const SIZE_MIB: u64 = 16;
const PAGE: usize = 4096;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The major version of the QEMU that qemu_mig.py runs (it honours `$QEMU` too).
fn qemu_major() -> Option<u32> {
    let qemu = std::env::var("QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into());
    let out = Command::new(qemu).arg("--version").output().ok()?;
    // "QEMU emulator version 10.0.2 (Debian ...)"
    let text = String::from_utf8_lossy(&out.stdout);
    text.split("version ").nth(1)?.split('.').next()?.trim().parse().ok()
}

fn have_python() -> bool {
    Command::new("python3").arg("--version").output().is_ok_and(|o| o.status.success())
}

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("multifd-qemufile-it-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{cmd:?} failed ({}):\n{stdout}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    stdout
}

fn save_and_extract(channels: u32) {
    match qemu_major() {
        Some(v) if v >= 10 => {}
        found => {
            eprintln!("SKIPPED: QEMU 10 or newer is not installed (found {found:?}); scripts/install-qemu.sh installs it");
            return;
        }
    }
    if !have_python() {
        eprintln!("SKIPPED: python3 is not installed (bench/qemu needs it)");
        return;
    }
    let root = repo_root();
    let dir = TempDir::new(&format!("ch{channels}"));
    let ram_path = dir.0.join("guest.ram");
    let mig_path = dir.0.join("guest.mig");

    run(Command::new("python3").arg(root.join("bench/qemu/ramgen.py")).arg(SIZE_MIB.to_string()).arg(&ram_path));
    let ram = std::fs::read(&ram_path).unwrap();
    assert_eq!(ram.len() as u64, SIZE_MIB * MIB);

    let record = run(Command::new("python3")
        .arg(root.join("bench/qemu/qemu_mig.py"))
        .args(["--mode", "save", "--mapped-ram", "--size-mib", &SIZE_MIB.to_string(), "--channels", &channels.to_string(), "--timeout", "120"])
        .arg("--file")
        .arg(&mig_path)
        .arg("--src-ram")
        .arg(&ram_path));
    assert!(record.contains(r#""status": "completed""#), "qemu_mig.py: {record}");

    let f = QemuFile::open(&mig_path).unwrap();
    assert!(f.machine().starts_with("pc"), "machine {}", f.machine());
    assert!(f.capabilities().iter().any(|c| c == "mapped-ram"), "{:?}", f.capabilities());
    assert!(f.is_complete());

    // The guest RAM is the memory backend "mem"; the other blocks are the pc machine's ROMs
    // (pc.bios, pc.rom, /rom@etc/acpi/tables, ...), and all of them extract.
    let mem = f.block("mem").unwrap_or_else(|| panic!("no block 'mem' in {:?}", f.blocks()));
    assert_eq!(mem.used_len, SIZE_MIB * MIB);
    assert_eq!(mem.header.page_size, PAGE as u64);
    assert_eq!(f.blocks()[0].name, "mem");
    for b in f.blocks() {
        let mut buf = vec![0u8; b.used_len as usize];
        f.extract_into(&b.name, &mut buf).unwrap();
    }

    // QEMU leaves zero pages out of mapped-ram: their bit stays clear and their range is a
    // hole. That is zero-page detection (the default, "multifd", which also applies with
    // multifd off here); seen on QEMU 10.0 with channels 0 and 2: every non-zero page is
    // present and no zero page is, so the count is exact. (With zero-page-detection=none,
    // which qemu_mig.py does not set, QEMU writes zero pages too and every bit is set.)
    // ramgen makes every fourth page zero.
    let nonzero = ram.chunks(PAGE).filter(|p| p.iter().any(|&b| b != 0)).count() as u64;
    assert_eq!(nonzero, SIZE_MIB * MIB / PAGE as u64 * 3 / 4);
    assert_eq!(mem.pages_present, nonzero);

    let out_path = dir.0.join("mem.out");
    let mut out = File::create(&out_path).unwrap();
    assert_eq!(f.extract("mem", &mut out).unwrap(), SIZE_MIB * MIB);
    drop(out);
    let got = std::fs::read(&out_path).unwrap();
    assert!(got == ram, "extracted 'mem' differs from the guest RAM (first difference at byte {:?})", got.iter().zip(&ram).position(|(a, b)| a != b));

    let mut buf = vec![0xa5u8; ram.len()];
    f.extract_into("mem", &mut buf).unwrap();
    assert!(buf == ram, "extract_into differs from the guest RAM");
}

#[test]
fn qemu_mapped_ram_without_multifd() {
    save_and_extract(0);
}

#[test]
fn qemu_mapped_ram_with_multifd() {
    save_and_extract(2);
}
