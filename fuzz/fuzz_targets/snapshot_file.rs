//! Arbitrary bytes as a snapshot file of ours and as a QEMU migration file: the readers must
//! return an error or a valid description, never panic or read outside the file.
#![no_main]
use std::io::Write;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("multifd-fuzz-{}", std::process::id()));
    std::fs::File::create(&path).and_then(|mut f| f.write_all(data)).expect("write the input file");
    let _ = multifd_core::snapshot::inspect(&path);
    if let Ok(q) = multifd_core::qemu_file::QemuFile::open(&path) {
        for b in q.blocks() {
            if b.used_len <= 1 << 24 {
                let mut buf = vec![0u8; b.used_len as usize];
                let _ = q.extract_into(&b.name, &mut buf);
            }
        }
    }
});
