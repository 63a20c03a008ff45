//! MSI-X: the capability's state, the vector table and the pending-bit array (PBA).
//!
//! The table and the PBA live in a BAR ([`super::PciFunction`] decides which and where); this
//! module only sees offsets relative to the start of the table or of the PBA. The state is shared
//! (`Arc<Msix>`) between the register side (guest writes to the table and the capability's control
//! word, on the device-model thread) and the queue workers that raise vectors, so it has its own
//! lock. Lock order: the device's lock, then this one, then whatever the [`MsiTrigger`] takes: the
//! trigger is called with this module's lock held, so a message always leaves with the entry's
//! current contents and a platform that keeps a route per vector (irqfd) updates it in step with
//! the table. A trigger must not call back into its [`Msix`].
//!
//! Semantics (PCI Local Bus 3.0 §6.8.2): every entry starts masked; a vector raised while its entry
//! or the whole function is masked sets its pending bit instead; unmasking delivers a pending vector
//! once and clears its bit. Table accesses are 4 or 8 bytes, naturally aligned; anything else, and
//! anything past the last entry, reads all-ones and is dropped (counted). The PBA is read-only.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use stages::platform::{le_value, put_le_value};

/// Delivers one MSI message: the platform implements it with KVM irqfd + an MSI route per vector
/// (no vCPU exit and no ioctl on the completion path) or `KVM_SIGNAL_MSI`.
///
/// Called with the function's MSI-X lock held, only for an entry that is unmasked in an enabled,
/// unmasked function: `vector` is the table entry, `address`/`data` its message now. An irqfd
/// platform installs the message as the vector's route when it differs from the route in place
/// (a guest that rewrites the table costs route updates only when it also takes interrupts).
pub trait MsiTrigger: Send + Sync {
    /// Sends entry `vector`'s message: `data` to `address` (64 bits).
    fn trigger(&self, vector: u16, address: u64, data: u32);
}

/// Bytes per table entry.
pub const MSIX_ENTRY_SIZE: u64 = 16;
/// The largest table a function can have (11-bit table size field).
pub const MSIX_MAX_VECTORS: u16 = 2048;
/// Vector control: mask bit.
const ENTRY_MASKED: u32 = 1;

/// What [`Msix::notify`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsixOutcome {
    /// The message was sent.
    Delivered,
    /// The entry or the function is masked: the pending bit is set.
    Pending,
    /// MSI-X is not enabled: the caller falls back to INTx.
    Disabled,
    /// The vector is past the end of the table (or is the "no vector" value): nothing was sent.
    NoSuchVector,
}

/// Counters of one MSI-X function.
#[derive(Debug, Default)]
pub struct MsixStats {
    /// Messages sent.
    pub delivered: AtomicU64,
    /// Vectors left pending because they were masked.
    pub pended: AtomicU64,
    /// Vectors raised that the table does not have.
    pub no_such_vector: AtomicU64,
    /// Table or PBA accesses that were refused (width, alignment, out of range, PBA write).
    pub bad_access: AtomicU64,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    control: u32,
}

impl Entry {
    fn masked(&self) -> bool {
        self.control & ENTRY_MASKED != 0
    }
    fn address(&self) -> u64 {
        (u64::from(self.addr_hi) << 32) | u64::from(self.addr_lo)
    }
}

#[derive(Debug)]
struct State {
    enabled: bool,
    function_masked: bool,
    entries: Vec<Entry>,
    pending: Vec<u64>,
}

impl State {
    fn pending(&self, v: usize) -> bool {
        self.pending
            .get(v / 64)
            .is_some_and(|w| w & (1u64 << (v % 64)) != 0)
    }
    fn set_pending(&mut self, v: usize, on: bool) {
        if let Some(w) = self.pending.get_mut(v / 64) {
            if on {
                *w |= 1u64 << (v % 64);
            } else {
                *w &= !(1u64 << (v % 64));
            }
        }
    }
    /// Sends every pending, now unmasked vector's message (and clears its bit).
    fn deliver_pending(&mut self, m: &Msix) {
        if !self.enabled || self.function_masked {
            return;
        }
        for (w, word) in self.pending.iter_mut().enumerate() {
            let mut bits = *word;
            while bits != 0 {
                let b = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                let v = w * 64 + b;
                let Some(e) = self.entries.get(v) else {
                    continue;
                };
                if !e.masked() {
                    *word &= !(1u64 << b);
                    m.send(v, e);
                }
            }
        }
    }
}

/// One function's MSI-X state, shared by the register side and the interrupt raisers.
pub struct Msix {
    state: Mutex<State>,
    trigger: Arc<dyn MsiTrigger>,
    vectors: u16,
    /// Counters.
    pub stats: MsixStats,
}

impl std::fmt::Debug for Msix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Msix")
            .field("vectors", &self.vectors)
            .field("state", &*self.lock())
            .finish()
    }
}

impl Msix {
    /// A table of `vectors` entries (1..=2048), all masked, MSI-X disabled. `None` for a size the
    /// capability cannot express.
    pub fn new(vectors: u16, trigger: Arc<dyn MsiTrigger>) -> Option<Self> {
        if vectors == 0 || vectors > MSIX_MAX_VECTORS {
            return None;
        }
        let n = usize::from(vectors);
        Some(Self {
            state: Mutex::new(State {
                enabled: false,
                function_masked: false,
                entries: vec![
                    Entry {
                        addr_lo: 0,
                        addr_hi: 0,
                        data: 0,
                        control: ENTRY_MASKED,
                    };
                    n
                ],
                pending: vec![0; n.div_ceil(64)],
            }),
            trigger,
            vectors,
            stats: MsixStats::default(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends entry `v` (called with the state lock held).
    fn send(&self, v: usize, e: &Entry) {
        self.stats.delivered.fetch_add(1, Ordering::Relaxed);
        let v = u16::try_from(v).unwrap_or(u16::MAX);
        self.trigger.trigger(v, e.address(), e.data);
    }

    /// Number of table entries.
    pub fn vectors(&self) -> u16 {
        self.vectors
    }

    /// Bytes the table occupies in its BAR.
    pub fn table_len(&self) -> u64 {
        u64::from(self.vectors) * MSIX_ENTRY_SIZE
    }

    /// Bytes the PBA occupies in its BAR (whole qwords).
    pub fn pba_len(&self) -> u64 {
        u64::from(self.vectors).div_ceil(64) * 8
    }

    /// Whether the guest enabled MSI-X.
    pub fn enabled(&self) -> bool {
        self.lock().enabled
    }

    /// Whether the whole function is masked.
    pub fn function_masked(&self) -> bool {
        self.lock().function_masked
    }

    /// Whether `vector`'s pending bit is set.
    pub fn is_pending(&self, vector: u16) -> bool {
        self.lock().pending(usize::from(vector))
    }

    /// Capability control bits changed (enable, function mask): deliver what became deliverable.
    pub fn set_control(&self, enabled: bool, function_masked: bool) {
        let mut s = self.lock();
        s.enabled = enabled;
        s.function_masked = function_masked;
        s.deliver_pending(self);
    }

    /// Raises `vector`.
    pub fn notify(&self, vector: u16) -> MsixOutcome {
        let v = usize::from(vector);
        let mut s = self.lock();
        if !s.enabled {
            return MsixOutcome::Disabled;
        }
        let Some(e) = s.entries.get(v).copied() else {
            self.stats.no_such_vector.fetch_add(1, Ordering::Relaxed);
            return MsixOutcome::NoSuchVector;
        };
        if s.function_masked || e.masked() {
            s.set_pending(v, true);
            self.stats.pended.fetch_add(1, Ordering::Relaxed);
            return MsixOutcome::Pending;
        }
        self.send(v, &e);
        MsixOutcome::Delivered
    }

    /// Guest read of the table at `offset` (relative to the table).
    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        let Some((entry, word, width)) = self.table_decode(offset, data.len()) else {
            self.stats.bad_access.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let s = self.lock();
        let Some(e) = s.entries.get(entry) else {
            return;
        };
        let words = [e.addr_lo, e.addr_hi, e.data, e.control];
        let lo = words.get(word).copied().unwrap_or(u32::MAX);
        let hi = words.get(word + 1).copied().unwrap_or(u32::MAX);
        let v = if width == 8 {
            (u64::from(hi) << 32) | u64::from(lo)
        } else {
            u64::from(lo)
        };
        put_le_value(data, v);
    }

    /// Guest write of the table at `offset` (relative to the table).
    pub fn table_write(&self, offset: u64, data: &[u8]) {
        let Some((entry, word, width)) = self.table_decode(offset, data.len()) else {
            self.stats.bad_access.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let v = le_value(data);
        {
            let mut s = self.lock();
            let Some(e) = s.entries.get_mut(entry) else {
                return;
            };
            let halves = [v & 0xffff_ffff, v >> 32];
            let count = if width == 8 { 2 } else { 1 };
            for (i, half) in halves.iter().take(count).enumerate() {
                let half = u32::try_from(*half).unwrap_or(u32::MAX);
                match word + i {
                    0 => e.addr_lo = half,
                    1 => e.addr_hi = half,
                    2 => e.data = half,
                    // Bits 31:1 of vector control are reserved: they read 0.
                    3 => e.control = half & ENTRY_MASKED,
                    _ => {}
                }
            }
            s.deliver_pending(self);
        }
    }

    /// (entry, dword within entry, width) of a table access, or `None` if it is refused.
    fn table_decode(&self, offset: u64, len: usize) -> Option<(usize, usize, usize)> {
        if !matches!(len, 4 | 8) {
            return None;
        }
        let width = u64::try_from(len).ok()?;
        if offset % width != 0 || offset.checked_add(width)? > self.table_len() {
            return None;
        }
        let entry = usize::try_from(offset / MSIX_ENTRY_SIZE).ok()?;
        let word = usize::try_from((offset % MSIX_ENTRY_SIZE) / 4).ok()?;
        Some((entry, word, len))
    }

    /// Guest read of the PBA at `offset` (relative to the PBA): 4- or 8-byte aligned reads.
    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        let ok = matches!(data.len(), 4 | 8)
            && offset % 4 == 0
            && u64::try_from(data.len())
                .ok()
                .and_then(|w| offset.checked_add(w))
                .is_some_and(|end| end <= self.pba_len());
        if !ok {
            self.stats.bad_access.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let s = self.lock();
        let qword = |i: u64| -> u64 {
            usize::try_from(i)
                .ok()
                .and_then(|i| s.pending.get(i))
                .copied()
                .unwrap_or(0)
        };
        let lo = qword(offset / 8);
        let hi = qword(offset / 8 + 1);
        let v = if offset % 8 == 0 {
            lo
        } else {
            (lo >> 32) | (hi << 32)
        };
        put_le_value(data, v);
    }

    /// Guest write of the PBA: read-only, dropped and counted.
    pub fn pba_write(&self, _offset: u64, _data: &[u8]) {
        self.stats.bad_access.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Rec(Mutex<Vec<(u64, u32)>>);
    impl MsiTrigger for Rec {
        fn trigger(&self, _v: u16, a: u64, d: u32) {
            self.0.lock().unwrap().push((a, d));
        }
    }

    fn program(m: &Msix, v: u64, addr: u64, data: u32) {
        m.table_write(v * 16, &addr.to_le_bytes());
        m.table_write(v * 16 + 8, &data.to_le_bytes());
        m.table_write(v * 16 + 12, &0u32.to_le_bytes());
    }

    #[test]
    fn masking_pending_and_unmask_delivery() {
        let rec = Arc::new(Rec::default());
        let m = Msix::new(3, rec.clone()).unwrap();
        assert_eq!(m.notify(0), MsixOutcome::Disabled);
        m.set_control(true, false);
        // Entries start masked.
        assert_eq!(m.notify(1), MsixOutcome::Pending);
        assert!(m.is_pending(1));
        let mut pba = [0u8; 8];
        m.pba_read(0, &mut pba);
        assert_eq!(u64::from_le_bytes(pba), 0b10);
        program(&m, 1, 0xfee0_0000, 0x41);
        assert_eq!(&*rec.0.lock().unwrap(), &[(0xfee0_0000, 0x41)]);
        assert!(!m.is_pending(1));
        assert_eq!(m.notify(1), MsixOutcome::Delivered);
        // Function mask.
        m.set_control(true, true);
        assert_eq!(m.notify(1), MsixOutcome::Pending);
        m.set_control(true, false);
        assert_eq!(rec.0.lock().unwrap().len(), 3);
        // Out of range vector.
        assert_eq!(m.notify(3), MsixOutcome::NoSuchVector);
        assert_eq!(m.stats.no_such_vector.load(Ordering::Relaxed), 1);
        assert_eq!(m.stats.delivered.load(Ordering::Relaxed), 3);
        assert_eq!(m.stats.pended.load(Ordering::Relaxed), 2);
    }

    /// Records (vector, address, data).
    #[derive(Default)]
    struct ByVector(Mutex<Vec<(u16, u64, u32)>>);
    impl MsiTrigger for ByVector {
        fn trigger(&self, v: u16, a: u64, d: u32) {
            self.0.lock().unwrap().push((v, a, d));
        }
    }

    #[test]
    fn the_trigger_sees_the_entry_and_its_current_message_and_table_churn_sends_nothing() {
        let rec = Arc::new(ByVector::default());
        let m = Msix::new(4, rec.clone()).unwrap();
        m.set_control(true, false);
        program(&m, 2, 0xfee0_0000, 0x51);
        assert_eq!(m.notify(2), MsixOutcome::Delivered);
        // A guest retargeting the entry in a loop (unmasked, nothing pending): nothing is sent and
        // nothing is kept per write.
        for i in 0..100_000u32 {
            m.table_write(2 * 16 + 8, &(0x40 + (i % 2)).to_le_bytes());
        }
        m.table_write(2 * 16, &0xfee0_1000u64.to_le_bytes());
        m.table_write(2 * 16 + 8, &0x61u32.to_le_bytes());
        assert_eq!(m.notify(2), MsixOutcome::Delivered);
        assert_eq!(
            &*rec.0.lock().unwrap(),
            &[(2, 0xfee0_0000, 0x51), (2, 0xfee0_1000, 0x61)]
        );
        // Pending vectors go out in entry order when the function mask drops.
        m.set_control(true, true);
        program(&m, 3, 0xfee0_0000, 0x52);
        assert_eq!(m.notify(3), MsixOutcome::Pending);
        assert_eq!(m.notify(2), MsixOutcome::Pending);
        m.set_control(true, false);
        let got = rec.0.lock().unwrap().clone();
        assert_eq!(&got[2..], &[(2, 0xfee0_1000, 0x61), (3, 0xfee0_0000, 0x52)]);
        assert!(!m.is_pending(2) && !m.is_pending(3));
    }

    #[test]
    fn table_accesses_and_hostile_offsets() {
        let rec = Arc::new(Rec::default());
        let m = Msix::new(2, rec).unwrap();
        let mut d = [0u8; 4];
        m.table_read(12, &mut d);
        assert_eq!(u32::from_le_bytes(d), 1, "masked at reset");
        m.table_write(12, &0xffff_ffffu32.to_le_bytes());
        m.table_read(12, &mut d);
        assert_eq!(u32::from_le_bytes(d), 1, "reserved control bits read 0");
        m.table_write(0, &0x1122_3344_5566_7788u64.to_le_bytes());
        let mut q = [0u8; 8];
        m.table_read(0, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0x1122_3344_5566_7788);
        // Past the table, misaligned, odd widths: all-ones, dropped, counted.
        m.table_write(32, &[0; 4]);
        m.table_read(32, &mut d);
        assert_eq!(d, [0xff; 4]);
        m.table_write(2, &[0; 4]);
        m.table_read(0, &mut [0u8; 2]);
        m.table_write(u64::MAX - 3, &[0; 4]);
        m.pba_write(0, &[0; 8]);
        m.pba_read(8, &mut q);
        assert_eq!(q, [0xff; 8]);
        assert_eq!(m.stats.bad_access.load(Ordering::Relaxed), 7);
        assert!(Msix::new(0, Arc::new(Rec::default())).is_none());
        assert!(Msix::new(2049, Arc::new(Rec::default())).is_none());
    }
}
