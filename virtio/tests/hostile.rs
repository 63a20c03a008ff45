//! A hostile guest: broken chains, bad rings, protocol violations. Each ends in an error status or
//! DEVICE_NEEDS_RESET (with a counter and a configuration interrupt), never a panic, a spin, or
//! unbounded memory; and a reset brings the device back.

use std::sync::atomic::Ordering;
use std::time::Duration;

use virtio::blk::{self, Block};
use virtio::device::{device_id, status, CHAIN_BUDGET};
use virtio::rng::Rng;
use virtio::testing::{common, Driver, Harness, DATA_BASE, MSI_ADDR};
use virtio::transport::{Execution, MSIX_TABLE_OFFSET};
use vm_memory::{Bytes, GuestAddress};

const NEXT: u16 = 1;
const WRITE: u16 = 2;
const INDIRECT: u16 = 4;

fn rng() -> (Harness, Driver) {
    let h = Harness::new(Box::new(Rng::new()), Execution::Inline).unwrap();
    let mut d = h.driver();
    d.bring_up(device_id::RNG, 0, true).unwrap();
    (h, d)
}

/// Publishes head `head` on queue 0 without touching descriptors, and notifies.
fn publish(d: &mut Driver, head: u16) {
    let q = d.queues[0];
    d.mem
        .write_obj(
            head,
            GuestAddress(q.avail + 4 + u64::from(q.avail_idx % q.size) * 2),
        )
        .unwrap();
    let idx = q.avail_idx.wrapping_add(1);
    d.mem.write_obj(idx, GuestAddress(q.avail + 2)).unwrap();
    d.queues[0].avail_idx = idx;
    d.notify(0);
}

fn needs_reset(h: &Harness, d: &mut Driver) {
    assert_ne!(
        d.status() & status::NEEDS_RESET,
        0,
        "DEVICE_NEEDS_RESET set"
    );
    assert_eq!(h.lock().stats().needs_reset.load(Ordering::Relaxed), 1);
    assert!(
        h.msi.messages().contains(&(MSI_ADDR, 0x30)),
        "configuration-change interrupt on vector 0"
    );
    assert_eq!(d.used_idx(0), 0, "nothing completed");
    // Terminal: further notifications are ignored.
    let before = h.lock().stats().notifies_ignored.load(Ordering::Relaxed);
    d.notify(0);
    assert_eq!(
        h.lock().stats().notifies_ignored.load(Ordering::Relaxed),
        before + 1
    );
}

/// After a reset the device works again.
fn recovers(h: &Harness, d: &mut Driver) {
    d.queues.clear();
    d.bring_up(device_id::RNG, 0, true).unwrap();
    d.push(0, &[(DATA_BASE, 32, true)]).unwrap();
    d.notify(0);
    assert_eq!(d.wait_used(0, Duration::from_secs(1)).unwrap().1, 32);
    assert!(h.lock().stats().resets.load(Ordering::Relaxed) >= 1);
}

#[test]
fn looping_chain() {
    let (h, mut d) = rng();
    let q = d.queues[0];
    d.write_desc(q.desc, DATA_BASE, 8, NEXT | WRITE, 1).unwrap();
    d.write_desc(q.desc + 16, DATA_BASE + 8, 8, NEXT | WRITE, 0)
        .unwrap();
    publish(&mut d, 0);
    needs_reset(&h, &mut d);
    recovers(&h, &mut d);
}

#[test]
fn next_index_out_of_range_and_head_out_of_range() {
    let (h, mut d) = rng();
    let q = d.queues[0];
    d.write_desc(q.desc, DATA_BASE, 8, NEXT | WRITE, 999)
        .unwrap();
    publish(&mut d, 0);
    needs_reset(&h, &mut d);
    let (h, mut d) = rng();
    publish(&mut d, 500);
    needs_reset(&h, &mut d);
}

#[test]
fn buffer_outside_guest_memory() {
    let (h, mut d) = rng();
    let q = d.queues[0];
    d.write_desc(q.desc, 0xffff_0000_0000, 64, WRITE, 0)
        .unwrap();
    publish(&mut d, 0);
    needs_reset(&h, &mut d);
    // Straddling the end of memory.
    let (h, mut d) = rng();
    let q = d.queues[0];
    let end = virtio::testing::TEST_MEM as u64;
    d.write_desc(q.desc, end - 16, 64, WRITE, 0).unwrap();
    publish(&mut d, 0);
    needs_reset(&h, &mut d);
}

#[test]
fn enormous_and_zero_lengths() {
    let (h, mut d) = rng();
    let q = d.queues[0];
    d.write_desc(q.desc, DATA_BASE, u32::MAX, WRITE, 0).unwrap();
    publish(&mut d, 0);
    needs_reset(&h, &mut d);
    // Zero-length buffer: a valid, empty answer.
    let (h, mut d) = rng();
    d.push(0, &[(DATA_BASE, 0, true)]).unwrap();
    d.notify(0);
    assert_eq!(d.wait_used(0, Duration::from_secs(1)).unwrap().1, 0);
    assert_eq!(h.lock().stats().needs_reset.load(Ordering::Relaxed), 0);
}

#[test]
fn device_never_writes_driver_readable_buffers() {
    let (h, mut d) = rng();
    d.mem
        .write_slice(&[0x77; 64], GuestAddress(DATA_BASE))
        .unwrap();
    d.push(0, &[(DATA_BASE, 64, false)]).unwrap();
    d.notify(0);
    assert_eq!(d.wait_used(0, Duration::from_secs(1)).unwrap().1, 0);
    let mut b = [0u8; 64];
    d.mem.read_slice(&mut b, GuestAddress(DATA_BASE)).unwrap();
    assert_eq!(b, [0x77; 64]);
    // Readable after writable is a protocol violation.
    d.push(0, &[(DATA_BASE, 8, true), (DATA_BASE + 8, 8, false)])
        .unwrap();
    d.notify(0);
    assert_ne!(d.status() & status::NEEDS_RESET, 0);
    assert_eq!(h.lock().stats().needs_reset.load(Ordering::Relaxed), 1);
}

#[test]
fn avail_index_jump() {
    let (h, mut d) = rng();
    let q = d.queues[0];
    d.mem.write_obj(1000u16, GuestAddress(q.avail + 2)).unwrap();
    d.notify(0);
    needs_reset(&h, &mut d);
    recovers(&h, &mut d);
}

#[test]
fn indirect_tables() {
    let (h, mut d) = rng();
    let q = d.queues[0];
    let table = DATA_BASE + 0x1000;
    // A valid indirect table of two writable buffers.
    d.write_desc(table, DATA_BASE, 16, NEXT | WRITE, 1).unwrap();
    d.write_desc(table + 16, DATA_BASE + 16, 16, WRITE, 0)
        .unwrap();
    d.write_desc(q.desc, table, 32, INDIRECT, 0).unwrap();
    publish(&mut d, 0);
    assert_eq!(d.wait_used(0, Duration::from_secs(1)).unwrap().1, 32);
    // An indirect descriptor inside an indirect table.
    d.write_desc(table, table, 32, INDIRECT, 0).unwrap();
    d.write_desc(q.desc + 16, table, 32, INDIRECT, 0).unwrap();
    publish(&mut d, 1);
    assert_ne!(d.status() & status::NEEDS_RESET, 0);
    // A table whose length is not a multiple of 16.
    let (h2, mut d2) = rng();
    let q = d2.queues[0];
    d2.write_desc(q.desc, table, 17, INDIRECT, 0).unwrap();
    publish(&mut d2, 0);
    needs_reset(&h2, &mut d2);
    drop(h);
}

#[test]
fn queue_size_not_a_power_of_two_or_too_big() {
    for size in [3u16, 100, 128] {
        let h = Harness::new(Box::new(Rng::new()), Execution::Inline).unwrap();
        let mut d = h.driver();
        d.discover(device_id::RNG).unwrap();
        d.negotiate(0).unwrap();
        d.setup_queue(0, size, 0x1_0000).unwrap();
        let s = d.driver_ok();
        assert_ne!(s & status::NEEDS_RESET, 0, "size {size} refused");
        assert_eq!(h.lock().stats().needs_reset.load(Ordering::Relaxed), 1);
        assert_eq!(h.lock().stats().activations.load(Ordering::Relaxed), 0);
    }
}

#[test]
fn rings_outside_memory_or_misaligned() {
    for base in [0xffff_f000u64 << 8, 0x1_0001] {
        let h = Harness::new(Box::new(Rng::new()), Execution::Inline).unwrap();
        let mut d = h.driver();
        d.discover(device_id::RNG).unwrap();
        d.negotiate(0).unwrap();
        d.setup_queue(0, 0, base).unwrap();
        assert_ne!(d.driver_ok() & status::NEEDS_RESET, 0, "rings at {base:#x}");
    }
}

#[test]
fn status_and_feature_protocol_violations() {
    let h = Harness::new(Box::new(Rng::new()), Execution::Inline).unwrap();
    let mut d = h.driver();
    let l = d.discover(device_id::RNG).unwrap();
    // FEATURES_OK without VERSION_1 is refused (reads back clear).
    d.mmio_write(l.common + common::STATUS, 3, 1);
    d.mmio_write(l.common + common::STATUS, 0xb, 1);
    assert_eq!(d.status() & status::FEATURES_OK, 0);
    // A feature the device did not offer is refused too.
    d.mmio_write(l.common + common::GFSELECT, 0, 4);
    d.mmio_write(l.common + common::GF, 1 << 5, 4);
    d.mmio_write(l.common + common::GFSELECT, 1, 4);
    d.mmio_write(l.common + common::GF, 1, 4);
    d.mmio_write(l.common + common::STATUS, 0xb, 1);
    assert_eq!(d.status() & status::FEATURES_OK, 0);
    // Clearing bits is ignored.
    d.mmio_write(l.common + common::STATUS, 1, 1);
    assert_eq!(d.status(), 3);
    // DRIVER_OK without FEATURES_OK.
    d.mmio_write(l.common + common::STATUS, 7, 1);
    assert_ne!(d.status() & status::NEEDS_RESET, 0);
    let s = h.lock().stats().clone();
    assert_eq!(s.status_violations.load(Ordering::Relaxed), 4);
    assert_eq!(s.needs_reset.load(Ordering::Relaxed), 1);
    // The driver cannot clear NEEDS_RESET except by a reset.
    d.mmio_write(l.common + common::STATUS, 0x0f, 1);
    assert_ne!(d.status() & status::NEEDS_RESET, 0);
    d.mmio_write(l.common + common::STATUS, 0, 1);
    assert_eq!(d.status(), 0);
    d.queues.clear();
    d.bring_up(device_id::RNG, 0, true).unwrap();
}

#[test]
fn register_accesses_of_the_wrong_shape() {
    let (h, mut d) = rng();
    let l = d.layout;
    let bad0 = h.lock().stats().bad_accesses.load(Ordering::Relaxed);
    // Wrong widths and offsets in the common configuration read all-ones.
    assert_eq!(d.mmio_read(l.common + common::STATUS, 4), 0xffff_ffff);
    assert_eq!(d.mmio_read(l.common + 0x21, 4), 0xffff_ffff);
    d.mmio_write(l.common + common::NUMQ, 9, 2);
    assert_eq!(d.mmio_read(l.common + common::NUMQ, 2), 1);
    // Queue registers of a queue that does not exist.
    d.mmio_write(l.common + common::Q_SELECT, 7, 2);
    assert_eq!(d.mmio_read(l.common + common::Q_SIZE, 2), 0);
    assert_eq!(d.mmio_read(l.common + common::Q_MSIX, 2), 0xffff);
    d.mmio_write(l.common + common::Q_SIZE, 16, 2);
    // Queue setup after DRIVER_OK is refused.
    d.mmio_write(l.common + common::Q_SELECT, 0, 2);
    d.mmio_write(l.common + common::Q_SIZE, 16, 2);
    assert_eq!(d.mmio_read(l.common + common::Q_SIZE, 2), 64);
    // An MSI-X vector past the table reads back as NO_VECTOR.
    d.mmio_write(l.common + common::Q_MSIX, 40, 2);
    assert_eq!(d.mmio_read(l.common + common::Q_MSIX, 2), 0xffff);
    // Notify of a queue that does not exist, misaligned notify, unmapped BAR offsets.
    d.mmio_write(l.notify + 4 * 5, 5, 2);
    d.mmio_write(l.notify + 1, 0, 1);
    assert_eq!(d.mmio_read(l.bar + 0x7000, 4), 0xffff_ffff);
    d.mmio_write(l.bar + 0x7000, 1, 4);
    assert_eq!(l.device, 0, "rnd has no device configuration capability");
    assert_eq!(d.mmio_read(l.bar + 0x2000, 4), 0xffff_ffff);
    let s = h.lock().stats().clone();
    assert_eq!(s.bad_accesses.load(Ordering::Relaxed), bad0 + 8);
    assert_eq!(s.notifies_ignored.load(Ordering::Relaxed), 2);
}

#[test]
fn msix_table_writes_out_of_range_and_masking() {
    let (h, mut d) = rng();
    let l = d.layout;
    let table = l.bar + u64::from(MSIX_TABLE_OFFSET);
    // Entries 2.. do not exist (rnd has 2 vectors): ignored, counted.
    for off in [32u64, 48, 0xff0, 0xffc] {
        d.mmio_write(table + off, 0xdead_beef, 4);
        assert_eq!(d.mmio_read(table + off, 4), 0xffff_ffff);
    }
    // Past the table (the BAR has no register there): refused by the transport.
    assert_eq!(h.lock().stats().bad_accesses.load(Ordering::Relaxed), 8);
    // Inside the table but misaligned or of an odd width: refused by the MSI-X table.
    d.mmio_write(table + 2, 0, 4);
    d.mmio_write(table, 0, 2);
    let msix = h.lock().pci().msix().unwrap().clone();
    assert_eq!(msix.stats.bad_access.load(Ordering::Relaxed), 2);
    // Mask vector 1 (queue 0), complete a request: pending bit, no message; unmask: delivered.
    d.mmio_write(table + 16 + 12, 1, 4);
    d.push(0, &[(DATA_BASE, 8, true)]).unwrap();
    d.notify(0);
    d.wait_used(0, Duration::from_secs(1)).unwrap();
    assert!(!h.msi.messages().contains(&(MSI_ADDR, 0x31)));
    assert!(msix.is_pending(1));
    let pba = l.bar + u64::from(virtio::transport::MSIX_PBA_OFFSET);
    assert_eq!(d.mmio_read(pba, 8), 0b10);
    d.mmio_write(table + 16 + 12, 0, 4);
    assert!(h.msi.messages().contains(&(MSI_ADDR, 0x31)));
    assert_eq!(d.mmio_read(pba, 8), 0);
}

#[test]
fn intx_fallback_and_isr() {
    let h = Harness::new(Box::new(Rng::new()), Execution::Inline).unwrap();
    let mut d = h.driver();
    d.bring_up(device_id::RNG, 0, false).unwrap();
    d.push(0, &[(DATA_BASE, 8, true)]).unwrap();
    d.notify(0);
    d.wait_used(0, Duration::from_secs(1)).unwrap();
    assert!(h.msi.messages().is_empty());
    assert_eq!(h.intx.state(), (true, 1));
    assert_eq!(d.cfg_read(0x06, 2) & 0x8, 0x8, "status: interrupt pending");
    assert_eq!(d.isr(), 1);
    assert!(!h.intx.state().0, "reading the ISR deasserts");
    assert_eq!(d.isr(), 0);
}

#[test]
fn pci_cfg_capability_window() {
    let (_h, mut d) = rng();
    // Find the VIRTIO_PCI_CAP_PCI_CFG capability and read num_queues through it.
    let mut p = d.cfg_read(0x34, 1) as u16;
    let mut cap = 0;
    while p != 0 {
        if d.cfg_read(p, 1) == 0x09 && d.cfg_read(p + 3, 1) == 5 {
            cap = p;
        }
        p = d.cfg_read(p + 1, 1) as u16;
    }
    assert_ne!(cap, 0);
    d.cfg_write(cap + 4, 0, 1);
    d.cfg_write(cap + 8, common::NUMQ as u32, 4);
    d.cfg_write(cap + 12, 2, 4);
    assert_eq!(d.cfg_read(cap + 16, 4), 1);
    d.cfg_write(cap + 12, 3, 4);
    assert_eq!(d.cfg_read(cap + 16, 4), 0xffff_ffff, "length 3 refused");
}

#[test]
fn self_modifying_rings_cannot_keep_the_device_busy() {
    // Every buffer the device fills is the driver's own available index: each completion makes
    // "more" work appear. One notify must still return, having taken at most CHAIN_BUDGET chains.
    let (h, mut d) = rng();
    let q = d.queues[0];
    for i in 0..u64::from(q.size) {
        d.write_desc(q.desc + 16 * i, q.avail + 2, 2, WRITE, 0)
            .unwrap();
        d.mem
            .write_obj(i as u16, GuestAddress(q.avail + 4 + 2 * i))
            .unwrap();
    }
    d.mem.write_obj(q.size, GuestAddress(q.avail + 2)).unwrap();
    d.notify(0);
    let s = h.lock().stats().clone();
    assert!(s.chains.load(Ordering::Relaxed) as usize <= CHAIN_BUDGET);
}

#[test]
fn blk_chain_without_status_byte_needs_reset() {
    let dir = std::env::temp_dir().join(format!("virtio-hostile-{}", std::process::id()));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&dir)
        .unwrap();
    let _ = std::fs::remove_file(&dir);
    f.set_len(8192).unwrap();
    let h = Harness::new(
        Box::new(Block::from_file(f, false, false, "X").unwrap()),
        Execution::Inline,
    )
    .unwrap();
    let mut d = h.driver();
    d.bring_up(device_id::BLOCK, u64::MAX, true).unwrap();
    // A short header still gets an answer (IOERR).
    d.push(0, &[(DATA_BASE, 8, false), (DATA_BASE + 64, 1, true)])
        .unwrap();
    d.notify(0);
    assert_eq!(d.wait_used(0, Duration::from_secs(1)).unwrap().1, 1);
    let st: u8 = d.mem.read_obj(GuestAddress(DATA_BASE + 64)).unwrap();
    assert_eq!(st, blk::status::IOERR);
    // No writable byte at all: cannot be answered.
    d.push(0, &[(DATA_BASE, 16, false)]).unwrap();
    d.notify(0);
    assert_ne!(d.status() & status::NEEDS_RESET, 0);
}
