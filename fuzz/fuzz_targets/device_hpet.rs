//! Random register traffic (widths, offsets, values, clock advances) against the hpet core.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    stages::devices::fuzz::fuzz_hpet(data);
});
