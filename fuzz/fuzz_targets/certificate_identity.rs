//! Arbitrary bytes as a DER certificate for the allow-list's identity reader: it must return
//! an error or identities, never panic or read past its input; every name it reports must
//! match itself.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(id) = multifd_core::tls::Identity::from_der(data) {
        let _ = id.describe();
        for name in &id.alt_names {
            assert!(name.trim().is_empty() || name.trim() != name || id.matches(name), "alternative name {name:?} does not match itself");
        }
        if !id.subject.is_empty() && !id.subject.contains(",,") {
            let _ = id.matches(&id.subject);
        }
    }
});
