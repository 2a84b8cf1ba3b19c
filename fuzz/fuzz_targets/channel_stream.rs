//! A captured multifd channel byte stream (init packet, packets, any compression) through the
//! stream decoder: never a panic, never an unbounded allocation.
#![no_main]
use libfuzzer_sys::fuzz_target;
use multifd_core::wire::Geometry;

fuzz_target!(|data: &[u8]| {
    let _ = multifd_core::stream::rebuild(&[data], Geometry::x86(), 1 << 26);
});
