//! The virtio PCI function's register surface: configuration space and BAR 0 accesses of any
//! offset, width and value, in any order, against a live virtio-rnd (inline). No panic; the
//! vendor/device IDs never change; the status byte only ever holds defined bits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use virtio::rng::Rng;
use virtio::testing::{Harness, TEST_BAR_ADDR};
use virtio::transport::Execution;

fuzz_target!(|data: &[u8]| {
    let Ok(h) = Harness::new(Box::new(Rng::new()), Execution::Inline) else {
        return;
    };
    let mut d = h.driver();
    d.layout.bar = TEST_BAR_ADDR;
    for op in data.chunks(8) {
        let [kind, a, b, w, v0, v1, v2, v3] =
            [0, 1, 2, 3, 4, 5, 6, 7].map(|i| op.get(i).copied().unwrap_or(0));
        let width = [1usize, 2, 4, 8][usize::from(w & 3)];
        let v = u32::from_le_bytes([v0, v1, v2, v3]);
        let off = u16::from_le_bytes([a, b]);
        match kind % 4 {
            0 => d.cfg_write(off & 0x1ff, v, width.min(4)),
            1 => {
                let _ = d.cfg_read(off & 0x1ff, width.min(4));
            }
            2 => d.mmio_write(TEST_BAR_ADDR + u64::from(off) * 2, u64::from(v), width),
            _ => {
                let _ = d.mmio_read(TEST_BAR_ADDR + u64::from(off) * 2, width);
            }
        }
        // Keep the function decodable so BAR accesses keep landing.
        assert_eq!(d.cfg_read(0, 4), 0x1044_1af4, "identity changed");
        let s = h.lock().status();
        assert_eq!(s & 0x30, 0, "undefined status bits {s:#x}");
    }
});
