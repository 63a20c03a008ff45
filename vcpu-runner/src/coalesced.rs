//! Coalesced writes: guest writes the hypervisor appends to a ring instead of exiting to us.
//!
//! Index registers (the I/O APIC's IOREGSEL, PCI CONFIG_ADDRESS 0xCF8, the RTC index 0x70) only
//! select what the next data access reaches. Registered as coalesced zones
//! (`KVM_REGISTER_COALESCED_MMIO`), their writes cost no exit to userspace: KVM appends them to one
//! ring per VM (a page of the vCPU fds' mapping) and re-enters the guest. Reads in a zone still exit.
//!
//! Exact semantics come from draining the ring, in order, before anything could observe the
//! device: every exit handler drains it before it handles its own exit (the data access that
//! follows an index write is an exit, so it sees the index), and so does a vCPU before it pauses
//! or stops. Draining holds the ring's lock while it applies the entries and advances the ring's
//! `first` index only afterwards, so a vCPU that finds the ring empty without the lock knows every
//! entry before its own exit has been applied (an entry taken by another vCPU is applied before it
//! leaves the ring). When KVM finds the ring full it exits to userspace as usual, and the exit
//! handler drains the older entries first. A write that nothing exits after for a while (a reset
//! through 0xCF9, which shares the 0xCF8 zone, followed by a busy loop) is applied when the main
//! thread sees the ring non-empty on two consecutive checks and kicks vCPU 0 (checks are 20 ms
//! apart while the VM is busy or writes are pending, 100 ms while it is idle).
//!
//! The ring is `struct kvm_coalesced_mmio_ring { u32 first, last; struct kvm_coalesced_mmio
//! entries[]; }`, entries `{ u64 phys_addr; u32 len; u32 pio; u8 data[8]; }` (24 bytes): KVM writes
//! `last` and the entries, we write `first`.

use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

/// Bytes of one ring entry.
const ENTRY: usize = 24;
/// Bytes before the first entry (`first`, `last`).
const HEADER: usize = 8;

/// One coalesced zone: writes to `[addr, addr + len)` in port or memory space are coalesced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CoalescedZone {
    /// Port I/O (else MMIO).
    pub pio: bool,
    /// First address.
    pub addr: u64,
    /// Bytes.
    pub len: u32,
}

/// One write taken from the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CoalescedWrite {
    /// Port I/O (else MMIO).
    pub pio: bool,
    /// Port or guest-physical address.
    pub addr: u64,
    /// Bytes written (1..=8).
    pub len: usize,
    /// The data, little-endian, `len` bytes of it valid.
    pub data: [u8; 8],
}

impl CoalescedWrite {
    /// The bytes written.
    pub fn bytes(&self) -> &[u8] {
        &self.data[..self.len.min(8)]
    }
}

/// Registers one zone with the hypervisor; returns whether it took it.
pub type ZoneRegistrar = Box<dyn Fn(&CoalescedZone) -> bool + Send + Sync>;

/// The zones a VM asked for, registered lazily: a zone is registered with the hypervisor at the
/// first write exit into it, not when the VM starts.
///
/// Each registration (and each unregistration when the VM closes) waits for an SRCU grace period
/// in KVM (`kvm_io_bus_register_dev`): measured 0.1–3 ms each on our hosts (2026-11-25), so three
/// zones registered up front cost a guest that never touches them (a test guest, a firmware-less
/// micro-VM) milliseconds at start and again at exit. A guest that does use an index register
/// pays one grace period at its first write there, and every later write is coalesced. The write
/// that arms a zone exits as usual, so nothing is coalesced before the ring is mapped and the zone
/// registered.
pub struct LazyZones {
    zones: Vec<CoalescedZone>,
    /// Bit `i`: zone `i` is not registered yet and has not been tried (at most 64 zones).
    unarmed: AtomicU64,
    registrar: OnceLock<ZoneRegistrar>,
}

impl std::fmt::Debug for LazyZones {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyZones")
            .field("zones", &self.zones)
            .field("unarmed", &self.unarmed.load(Ordering::Relaxed))
            .finish()
    }
}

impl LazyZones {
    /// At most this many zones (one bit each).
    pub const MAX: usize = 64;

    /// `zones`, none registered yet (zones past [`LazyZones::MAX`] are never registered).
    pub fn new(zones: Vec<CoalescedZone>) -> Self {
        let n = zones.len().min(Self::MAX);
        let bits = if n == Self::MAX {
            u64::MAX
        } else {
            (1u64 << n) - 1
        };
        Self {
            zones,
            unarmed: AtomicU64::new(bits),
            registrar: OnceLock::new(),
        }
    }

    /// The zones.
    pub fn zones(&self) -> &[CoalescedZone] {
        &self.zones
    }

    /// Whether there are no zones.
    pub fn is_empty(&self) -> bool {
        self.zones.is_empty()
    }

    /// Sets how zones are registered (once the coalesced ring is mapped). Only the first call counts.
    pub fn set_registrar(&self, r: ZoneRegistrar) {
        let _ = self.registrar.set(r);
    }

    /// Called on a write exit to `addr`: registers the zone that holds it if it is the first write
    /// there (one caller wins; a zone the hypervisor refuses is not tried again). Returns whether
    /// a zone was registered now. Without a registrar (no ring) nothing happens.
    #[inline]
    pub fn on_write_exit(&self, pio: bool, addr: u64) -> bool {
        let unarmed = self.unarmed.load(Ordering::Relaxed);
        if unarmed == 0 {
            return false;
        }
        self.arm(unarmed, pio, addr)
    }

    #[cold]
    fn arm(&self, unarmed: u64, pio: bool, addr: u64) -> bool {
        let Some(registrar) = self.registrar.get() else {
            return false;
        };
        let Some(i) = self
            .zones
            .iter()
            .take(Self::MAX)
            .position(|z| z.pio == pio && addr >= z.addr && addr - z.addr < u64::from(z.len))
        else {
            return false;
        };
        let bit = 1u64 << i;
        if unarmed & bit == 0 || self.unarmed.fetch_and(!bit, Ordering::AcqRel) & bit == 0 {
            return false;
        }
        registrar(&self.zones[i])
    }

    /// Zones not registered (nor tried) yet.
    pub fn unarmed(&self) -> usize {
        self.unarmed.load(Ordering::Relaxed).count_ones() as usize
    }
}

enum Backing {
    /// A page of a vCPU fd, unmapped on drop.
    Mapped,
    /// Heap memory standing in for KVM (tests).
    Heap(#[allow(dead_code)] Box<[u64]>),
}

/// The VM's coalesced-write ring, shared by every vCPU.
pub struct CoalescedRing {
    base: *mut u8,
    size: usize,
    max: u32,
    backing: Backing,
    lock: Mutex<()>,
}

impl std::fmt::Debug for CoalescedRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoalescedRing")
            .field("entries", &self.max)
            .finish()
    }
}

// SAFETY: the page is shared memory whose only accesses are volatile reads and writes under `lock`
// (plus volatile reads of the two indices without it); it stays mapped for the ring's life.
unsafe impl Send for CoalescedRing {}
// SAFETY: as above.
unsafe impl Sync for CoalescedRing {}

/// Why a drain stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainError {
    /// The ring's indices are outside the ring (never written by a correct KVM): nothing applied.
    Corrupt {
        /// `first` as read.
        first: u32,
        /// `last` as read.
        last: u32,
    },
}

impl CoalescedRing {
    /// A ring over `size` bytes at `base`, a page the caller mapped from a vCPU fd at the offset
    /// `KVM_CAP_COALESCED_MMIO` names.
    ///
    /// # Safety
    /// `base..base + size` must be such a mapping, readable and writable, owned by the returned ring
    /// (it unmaps it on drop) and not accessed otherwise while the ring lives.
    pub unsafe fn from_mapping(base: *mut u8, size: usize) -> Option<Self> {
        let max = u32::try_from(size.checked_sub(HEADER)? / ENTRY).ok()?;
        if base.is_null() || max < 2 {
            return None;
        }
        Some(Self {
            base,
            size,
            max,
            backing: Backing::Mapped,
            lock: Mutex::new(()),
        })
    }

    /// A ring in ordinary memory, with [`CoalescedRing::push`] playing KVM (tests, benches).
    pub fn simulated(size: usize) -> Self {
        let words = size.div_ceil(8).max(HEADER / 8 + 3 * ENTRY / 8);
        let mut mem = vec![0u64; words].into_boxed_slice();
        let base = mem.as_mut_ptr().cast::<u8>();
        let size = words * 8;
        Self {
            base,
            size,
            max: u32::try_from((size - HEADER) / ENTRY).unwrap_or(u32::MAX),
            backing: Backing::Heap(mem),
            lock: Mutex::new(()),
        }
    }

    /// Entries the ring holds at most (one slot stays free, as KVM keeps it).
    pub fn capacity(&self) -> u32 {
        self.max - 1
    }

    /// Reads a `T` at byte `off` of the ring.
    fn read_at<T: Copy>(&self, off: usize) -> T {
        assert!(off + std::mem::size_of::<T>() <= self.size);
        let p = self.base.wrapping_add(off).cast::<T>();
        // SAFETY: inside the ring (checked above); aligned, as every field of the layout is on a
        // page-aligned (or u64-aligned) base.
        unsafe { std::ptr::read_volatile(p) }
    }

    /// Writes a `T` at byte `off` of the ring.
    fn write_at<T: Copy>(&self, off: usize, v: T) {
        assert!(off + std::mem::size_of::<T>() <= self.size);
        let p = self.base.wrapping_add(off).cast::<T>();
        // SAFETY: as in `read_at`.
        unsafe { std::ptr::write_volatile(p, v) }
    }

    fn index(&self, at: usize) -> u32 {
        self.read_at(at)
    }

    fn set_index(&self, at: usize, v: u32) {
        self.write_at(at, v);
    }

    /// Byte offset of entry `i` (`i < max`).
    fn entry(&self, i: u32) -> usize {
        HEADER + (i as usize) * ENTRY
    }

    /// Whether the ring holds no entry (no lock: an entry another vCPU is applying still counts).
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.index(0) == self.index(4)
    }

    /// Entries waiting (for tests and gauges).
    pub fn len(&self) -> u32 {
        let (f, l) = (self.index(0), self.index(4));
        if f >= self.max || l >= self.max {
            return 0;
        }
        (l + self.max - f) % self.max
    }

    /// Applies every waiting write, oldest first, with `apply`, then frees their slots. Returns how
    /// many it applied.
    pub fn drain(&self, mut apply: impl FnMut(CoalescedWrite)) -> Result<usize, DrainError> {
        if self.is_empty() {
            return Ok(0);
        }
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let first = self.index(0);
        let last = self.index(4);
        if first >= self.max || last >= self.max {
            return Err(DrainError::Corrupt { first, last });
        }
        // The entries up to `last` were written before `last` was published.
        fence(Ordering::Acquire);
        let mut f = first;
        let mut n = 0;
        while f != last {
            let e = self.entry(f);
            let len: u32 = self.read_at(e + 8);
            let pio: u32 = self.read_at(e + 12);
            let w = CoalescedWrite {
                pio: pio != 0,
                addr: self.read_at(e),
                len: (len as usize).clamp(1, 8),
                data: self.read_at::<u64>(e + 16).to_le_bytes(),
            };
            apply(w);
            n += 1;
            f = (f + 1) % self.max;
        }
        // Applied: only now give the slots back (and tell other vCPUs the ring is empty).
        fence(Ordering::Release);
        self.set_index(0, f);
        Ok(n)
    }

    /// Appends a write as KVM would; false when the ring is full (KVM then exits instead).
    pub fn push(&self, w: CoalescedWrite) -> bool {
        let (first, last) = (self.index(0), self.index(4));
        if (last + 1) % self.max == first % self.max {
            return false;
        }
        let e = self.entry(last % self.max);
        self.write_at(e, w.addr);
        self.write_at(e + 8, u32::try_from(w.len).unwrap_or(8));
        self.write_at(e + 12, u32::from(w.pio));
        self.write_at(e + 16, u64::from_le_bytes(w.data));
        fence(Ordering::Release);
        self.set_index(4, (last + 1) % self.max);
        true
    }

    /// Overwrites the indices (tests of a corrupted ring).
    pub fn set_indices(&self, first: u32, last: u32) {
        self.set_index(0, first);
        self.set_index(4, last);
    }
}

impl Drop for CoalescedRing {
    fn drop(&mut self) {
        if matches!(self.backing, Backing::Mapped) {
            // SAFETY: the mapping was handed to us by `from_mapping`, and nothing uses it any more.
            unsafe {
                libc::munmap(self.base.cast(), self.size);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zones_with_log() -> (LazyZones, std::sync::Arc<Mutex<Vec<CoalescedZone>>>) {
        let z = LazyZones::new(vec![
            CoalescedZone {
                pio: true,
                addr: 0xcf8,
                len: 4,
            },
            CoalescedZone {
                pio: false,
                addr: 0xfec0_0000,
                len: 4,
            },
            CoalescedZone {
                pio: true,
                addr: 0x70,
                len: 1,
            },
        ]);
        let log = std::sync::Arc::new(Mutex::new(Vec::new()));
        let l = log.clone();
        z.set_registrar(Box::new(move |zone| {
            l.lock().unwrap().push(*zone);
            // The hypervisor refuses the RTC zone.
            zone.addr != 0x70
        }));
        (z, log)
    }

    #[test]
    fn a_zone_is_registered_at_its_first_write_exit_and_only_then() {
        let (z, log) = zones_with_log();
        assert_eq!(z.unarmed(), 3);
        // Outside every zone, or the right address in the other space: nothing.
        assert!(!z.on_write_exit(true, 0xcfc));
        assert!(!z.on_write_exit(false, 0xcf8));
        assert!(!z.on_write_exit(true, 0xfec0_0000));
        assert!(log.lock().unwrap().is_empty());
        // Inside (not at the start): registered once.
        assert!(z.on_write_exit(true, 0xcfa));
        assert!(!z.on_write_exit(true, 0xcf8));
        assert!(z.on_write_exit(false, 0xfec0_0003));
        assert!(!z.on_write_exit(false, 0xfec0_0000));
        assert_eq!(log.lock().unwrap().len(), 2);
        assert_eq!(z.unarmed(), 1);
        // A refused zone is tried once, then left alone (its writes keep exiting).
        assert!(!z.on_write_exit(true, 0x70));
        assert!(!z.on_write_exit(true, 0x70));
        assert_eq!(log.lock().unwrap().len(), 3);
        assert_eq!(z.unarmed(), 0);
    }

    #[test]
    fn without_a_registrar_nothing_is_registered_or_used_up() {
        let z = LazyZones::new(vec![CoalescedZone {
            pio: true,
            addr: 0x70,
            len: 1,
        }]);
        assert!(!z.on_write_exit(true, 0x70));
        assert_eq!(
            z.unarmed(),
            1,
            "a zone stays armable until the ring is mapped"
        );
        assert!(LazyZones::new(Vec::new()).is_empty());
    }

    #[test]
    fn racing_first_writes_register_a_zone_once() {
        let (z, log) = zones_with_log();
        let z = std::sync::Arc::new(z);
        let wins: usize = (0..4)
            .map(|_| {
                let z = z.clone();
                std::thread::spawn(move || usize::from(z.on_write_exit(true, 0xcf8)))
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .sum();
        assert_eq!(wins, 1);
        assert_eq!(log.lock().unwrap().len(), 1);
    }

    #[test]
    fn more_zones_than_bits_are_left_unregistered() {
        let zones = (0..70u64)
            .map(|i| CoalescedZone {
                pio: true,
                addr: i * 4,
                len: 4,
            })
            .collect();
        let z = LazyZones::new(zones);
        z.set_registrar(Box::new(|_| true));
        assert_eq!(z.unarmed(), 64);
        assert!(z.on_write_exit(true, 63 * 4));
        assert!(!z.on_write_exit(true, 64 * 4), "zone 64 has no bit");
    }

    fn w(addr: u64, v: u32) -> CoalescedWrite {
        let mut data = [0u8; 8];
        data[..4].copy_from_slice(&v.to_le_bytes());
        CoalescedWrite {
            pio: false,
            addr,
            len: 4,
            data,
        }
    }

    #[test]
    fn drains_in_order_and_wraps() {
        let r = CoalescedRing::simulated(4096);
        assert_eq!(
            r.capacity(),
            169,
            "KVM's ring on a 4 KiB page keeps 170 slots, one free"
        );
        let mut seen = Vec::new();
        for round in 0..5u32 {
            for i in 0..100 {
                assert!(r.push(w(0xfec0_0000, round * 1000 + i)));
            }
            assert_eq!(r.len(), 100);
            let n = r
                .drain(|x| seen.push(u32::from_le_bytes(x.data[..4].try_into().unwrap())))
                .unwrap();
            assert_eq!(n, 100);
            assert!(r.is_empty());
        }
        let want: Vec<u32> = (0..5u32)
            .flat_map(|r| (0..100).map(move |i| r * 1000 + i))
            .collect();
        assert_eq!(seen, want);
    }

    #[test]
    fn a_full_ring_refuses_the_next_write() {
        let r = CoalescedRing::simulated(4096);
        for i in 0..r.capacity() {
            assert!(r.push(w(0x70, i)));
        }
        assert!(!r.push(w(0x70, 9999)), "KVM exits instead of overwriting");
        assert_eq!(r.drain(|_| {}).unwrap(), r.capacity() as usize);
        assert!(r.push(w(0x70, 1)));
    }

    #[test]
    fn corrupt_indices_apply_nothing() {
        let r = CoalescedRing::simulated(4096);
        r.set_indices(0, 5000);
        let mut n = 0;
        assert_eq!(
            r.drain(|_| n += 1),
            Err(DrainError::Corrupt {
                first: 0,
                last: 5000
            })
        );
        assert_eq!(n, 0);
    }

    #[test]
    fn a_vcpu_that_sees_an_empty_ring_knows_every_entry_was_applied() {
        // One thread drains slowly (its apply takes time); the slot index only moves after the
        // apply, so the other thread sees the ring non-empty until the write is applied.
        use std::sync::atomic::{AtomicBool, AtomicU32};
        use std::sync::Arc;
        let r = Arc::new(CoalescedRing::simulated(4096));
        let applied = Arc::new(AtomicU32::new(0));
        let started = Arc::new(AtomicBool::new(false));
        r.push(w(0x70, 42));
        let (r2, a2, s2) = (r.clone(), applied.clone(), started.clone());
        let t = std::thread::spawn(move || {
            r2.drain(|x| {
                s2.store(true, Ordering::Release);
                std::thread::sleep(std::time::Duration::from_millis(50));
                a2.store(
                    u32::from_le_bytes(x.data[..4].try_into().unwrap()),
                    Ordering::Release,
                );
            })
            .unwrap()
        });
        while !started.load(Ordering::Acquire) {
            std::thread::yield_now();
        }
        assert!(!r.is_empty(), "an entry being applied still holds its slot");
        // A second drainer waits for the first, then finds nothing left.
        assert_eq!(r.drain(|_| panic!("applied twice")).unwrap(), 0);
        assert_eq!(applied.load(Ordering::Acquire), 42);
        assert_eq!(t.join().unwrap(), 1);
    }
}
