//! What the TLS record layer's cipher costs on this CPU: ring's AEAD sealing and opening
//! 16 KiB records in place, as `tls/record.rs` does, per suite. Reports thread CPU seconds per
//! GiB (robust on a busy machine) and the rate they imply.
//! `cargo run --release -p multifd-core --example aead_bench -- [MIB]`

use ring::aead::{AES_128_GCM, AES_256_GCM, Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};

fn thread_cpu() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec into a live local.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn main() {
    let mib: usize = std::env::args().nth(1).map_or(1024, |a| a.parse().unwrap());
    const RECORD: usize = 16 << 10;
    let records = (mib << 20) / RECORD;
    let mut buf = vec![0x5au8; 16 * (RECORD + 16)];
    for (name, alg) in [("AES-128-GCM", &AES_128_GCM), ("AES-256-GCM", &AES_256_GCM), ("ChaCha20-Poly1305", &CHACHA20_POLY1305)] {
        let key = LessSafeKey::new(UnboundKey::new(alg, &[7u8; 32][..alg.key_len()]).unwrap());
        let nonce = |seq: u64| {
            let mut n = [0u8; 12];
            n[4..].copy_from_slice(&seq.to_be_bytes());
            Nonce::assume_unique_for_key(n)
        };
        let t = thread_cpu();
        for seq in 0..records as u64 {
            let at = (seq as usize % 16) * (RECORD + 16);
            let tag = key.seal_in_place_separate_tag(nonce(seq), Aad::from([23u8, 3, 3, 0, 0]), &mut buf[at..at + RECORD]).unwrap();
            buf[at + RECORD..at + RECORD + 16].copy_from_slice(tag.as_ref());
        }
        let seal = (thread_cpu() - t) / (mib as f64 / 1024.0);
        let t = thread_cpu();
        for seq in 0..records as u64 {
            let at = (seq as usize % 16) * (RECORD + 16);
            // Every record was overwritten by later ones with other nonces: open fails its tag
            // check after decrypting, which costs what a successful open costs.
            let _ = key.open_in_place(nonce(seq), Aad::from([23u8, 3, 3, 0, 0]), &mut buf[at..at + RECORD + 16]);
        }
        let open = (thread_cpu() - t) / (mib as f64 / 1024.0);
        println!("{name:18} seal {seal:.3} CPU-s/GiB ({:.1} GB/s)  open {open:.3} CPU-s/GiB ({:.1} GB/s)", 1.073741824 / seal, 1.073741824 / open);
    }
}
