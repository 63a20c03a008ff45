//! virtio-blk_ro queue walk: the fuzz bytes are the guest's rings and buffers (see
//! `virtio::testing::fuzz_case`); the device must keep its invariants (no panic, bounded work,
//! NEEDS_RESET counted once) whatever they hold.
#![no_main]

use libfuzzer_sys::fuzz_target;
use virtio::testing::{fuzz_case, FuzzDevice};

fuzz_target!(|data: &[u8]| {
    if let Err(e) = fuzz_case(FuzzDevice::BlockReadOnly, data) {
        panic!("invariant broken: {e}");
    }
});
