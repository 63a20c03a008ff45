//! What an exit is, for the instruments: its kind, the stage that handled it, and the phases of
//! its life that are timed. A [`HistogramSet`] keeps one [`Histogram`] per (phase, kind, stage).
//!
//! These are this crate's own small enums (perf depends on nothing of ours but `pipeline`); the
//! exit path maps its own types onto them (`From<pipeline::ExitKind>` is provided). Their `u8`
//! values are what a [`crate::TraceEvent`] carries.

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;

use crate::hist::{Histogram, HistogramSnapshot};

macro_rules! small_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident { $( $(#[$vmeta:meta])* $variant:ident = $value:literal => $text:literal ),* $(,)? }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[repr(u8)]
        pub enum $name { $( $(#[$vmeta])* $variant = $value, )* }

        impl $name {
            /// Every value, in order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)*];
            /// How many values there are.
            pub const COUNT: usize = Self::ALL.len();

            /// The short name used in reports, traces and JSON.
            pub fn name(self) -> &'static str {
                match self { $($name::$variant => $text,)* }
            }

            /// Decodes a `u8` (from a trace event); `None` if it names no value.
            pub fn from_u8(v: u8) -> Option<Self> {
                match v { $($value => Some($name::$variant),)* _ => None }
            }

            /// Looks a value up by its [`name`](Self::name).
            pub fn from_name(s: &str) -> Option<Self> {
                Self::ALL.iter().copied().find(|v| v.name() == s)
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.name())
            }
        }
    };
}

small_enum! {
    /// Why the vCPU left the guest.
    pub enum ExitClass {
        /// Port I/O read (`in`).
        PioRead = 0 => "pio-read",
        /// Port I/O write (`out`).
        PioWrite = 1 => "pio-write",
        /// MMIO read.
        MmioRead = 2 => "mmio-read",
        /// MMIO write.
        MmioWrite = 3 => "mmio-write",
        /// `hlt` reached user space.
        Hlt = 4 => "hlt",
        /// An EOI for a level-triggered I/O APIC vector.
        IoapicEoi = 5 => "ioapic-eoi",
        /// A kick (`immediate_exit`, signal) or a host interrupt.
        Kick = 6 => "kick",
        /// Triple fault / shutdown.
        Shutdown = 7 => "shutdown",
        /// Anything else (system event, entry failure, internal error, unknown reason).
        Other = 8 => "other",
    }
}

small_enum! {
    /// Which part of the monitor handled the exit.
    pub enum StageClass {
        /// No device stage: the run loop handled it (halt, kick, EOI, shutdown...).
        Loop = 0 => "loop",
        /// An in-module device, inline on the vCPU thread.
        Fast = 1 => "fast",
        /// A device model, posted on the exit ring without waiting.
        SlowPosted = 2 => "slow-posted",
        /// A device model, posted and waited for (reads).
        SlowWaited = 3 => "slow-waited",
        /// No device claimed the address.
        Unclaimed = 4 => "unclaimed",
    }
}

small_enum! {
    /// Which interval of an exit a histogram times.
    pub enum Phase {
        /// Exit to re-entry: from `Vcpu::run` returning to the next `Vcpu::run` call.
        Exit = 0 => "exit",
        /// The exit handler alone (classification, stage, posting, waiting).
        Handler = 1 => "handler",
        /// Ring wait: from posting an exit record to its completion arriving.
        RingWait = 2 => "ring-wait",
        /// Inside `Vcpu::run`: guest time plus the hypervisor's entry and exit, keyed by the exit
        /// that ended it.
        Run = 3 => "run",
    }
}

impl From<pipeline::ExitKind> for ExitClass {
    fn from(k: pipeline::ExitKind) -> Self {
        match k {
            pipeline::ExitKind::PioRead => ExitClass::PioRead,
            pipeline::ExitKind::PioWrite => ExitClass::PioWrite,
            pipeline::ExitKind::MmioRead => ExitClass::MmioRead,
            pipeline::ExitKind::MmioWrite => ExitClass::MmioWrite,
        }
    }
}

/// The key of one histogram in a [`HistogramSet`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HistKey {
    /// Which interval.
    pub phase: Phase,
    /// Which exit kind.
    pub kind: ExitClass,
    /// Which stage.
    pub stage: StageClass,
}

impl HistKey {
    /// `phase kind/stage`, e.g. `exit pio-write/slow-posted`.
    pub fn label(&self) -> String {
        format!("{} {}/{}", self.phase, self.kind, self.stage)
    }
}

const SET_LEN: usize = Phase::COUNT * ExitClass::COUNT * StageClass::COUNT;
const TOUCHED_WORDS: usize = SET_LEN.div_ceil(64);

#[inline(always)]
fn index(phase: Phase, kind: ExitClass, stage: StageClass) -> usize {
    (usize::from(phase as u8) * ExitClass::COUNT + usize::from(kind as u8)) * StageClass::COUNT
        + usize::from(stage as u8)
}

fn key_of(i: usize) -> Option<HistKey> {
    let stage = StageClass::ALL.get(i % StageClass::COUNT)?;
    let kind = ExitClass::ALL.get(i / StageClass::COUNT % ExitClass::COUNT)?;
    let phase = Phase::ALL.get(i / StageClass::COUNT / ExitClass::COUNT)?;
    Some(HistKey {
        phase: *phase,
        kind: *kind,
        stage: *stage,
    })
}

/// One histogram per (phase, exit kind, stage) for one vCPU: one writer (the vCPU thread),
/// snapshots from anywhere.
///
/// 180 histograms of 3.7 KiB (about 670 KiB of address space) come from zeroed memory, so only
/// the pages of histograms actually recorded into become resident. A bitmap says which ones were
/// recorded into, so a snapshot reads only those: reading the others would fault in a zero page
/// for each of their ~165 pages (measured at 2026-11-25: 160 of a `hello` guest's 377 page faults,
/// all from the snapshot taken when its vCPU stopped).
pub struct HistogramSet {
    hists: Box<[Histogram]>,
    /// Bit `i`: histogram `i` has been recorded into (set before its first value is).
    touched: [AtomicU64; TOUCHED_WORDS],
}

impl std::fmt::Debug for HistogramSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HistogramSet")
            .field("histograms", &self.hists.len())
            .finish()
    }
}

impl Default for HistogramSet {
    fn default() -> Self {
        Self::new()
    }
}

impl HistogramSet {
    /// An empty set.
    pub fn new() -> Self {
        // (`Box::new_zeroed_slice` would say this in one line, but needs Rust 1.92; MSRV is 1.85.)
        let Ok(layout) = std::alloc::Layout::array::<Histogram>(SET_LEN) else {
            // 180 × 3.7 KiB cannot overflow `isize`; keep a safe path anyway.
            return Self {
                hists: (0..SET_LEN).map(|_| Histogram::new()).collect(),
                touched: Default::default(),
            };
        };
        // SAFETY: `layout` has a non-zero size (SET_LEN > 0, Histogram is not zero-sized).
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<Histogram>();
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        let slice = std::ptr::slice_from_raw_parts_mut(ptr, SET_LEN);
        // SAFETY: `ptr` comes from the global allocator with the layout of `[Histogram; SET_LEN]`,
        // which is what `Box<[Histogram]>` frees with; the memory is zeroed, and `Histogram` is
        // `#[repr(C)]` and made only of `AtomicU64`s, for which all-zero bytes are a valid value
        // (0), so every element is initialised; an all-zero `Histogram` is an empty one (its
        // minimum is stored inverted, see `hist.rs`).
        let hists = unsafe { Box::from_raw(slice) };
        Self {
            hists,
            touched: Default::default(),
        }
    }

    /// Records `ns` for `(phase, kind, stage)`. Single writer (see [`Histogram::record`]).
    #[inline(always)]
    pub fn record(&self, phase: Phase, kind: ExitClass, stage: StageClass, ns: u64) {
        let i = index(phase, kind, stage);
        if let Some(h) = self.hists.get(i) {
            if let Some(word) = self.touched.get(i / 64) {
                let bit = 1u64 << (i % 64);
                // Single writer: a plain load and store, and only the first time.
                let w = word.load(Relaxed);
                if w & bit == 0 {
                    word.store(w | bit, Relaxed);
                }
            }
            h.record(ns);
        }
    }

    /// The histogram of `(phase, kind, stage)`, to read. Record through [`HistogramSet::record`]:
    /// a value recorded into the histogram directly is not in [`HistogramSet::snapshot`] until
    /// `record` has been called once for that key.
    pub fn get(&self, phase: Phase, kind: ExitClass, stage: StageClass) -> Option<&Histogram> {
        self.hists.get(index(phase, kind, stage))
    }

    /// Whether histogram `i` has been recorded into.
    fn touched(&self, i: usize) -> bool {
        self.touched
            .get(i / 64)
            .is_some_and(|w| w.load(Relaxed) & (1u64 << (i % 64)) != 0)
    }

    /// Snapshots of the non-empty histograms (only those recorded into are read).
    pub fn snapshot(&self) -> SetSnapshot {
        let entries = self
            .hists
            .iter()
            .enumerate()
            .filter(|(i, h)| self.touched(*i) && h.count() != 0)
            .filter_map(|(i, h)| Some((key_of(i)?, h.snapshot())))
            .collect();
        SetSnapshot { entries }
    }
}

/// Snapshots of the non-empty histograms of one or more [`HistogramSet`]s, sorted by key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SetSnapshot {
    entries: Vec<(HistKey, HistogramSnapshot)>,
}

impl SetSnapshot {
    /// The entries, sorted by (phase, kind, stage).
    pub fn entries(&self) -> &[(HistKey, HistogramSnapshot)] {
        &self.entries
    }

    /// The snapshot of one key, if anything was recorded under it.
    pub fn get(&self, key: HistKey) -> Option<&HistogramSnapshot> {
        self.entries
            .binary_search_by(|(k, _)| k.cmp(&key))
            .ok()
            .and_then(|i| self.entries.get(i))
            .map(|(_, s)| s)
    }

    /// Adds `other` (e.g. another vCPU's set) into `self`, key by key.
    pub fn merge(&mut self, other: &SetSnapshot) {
        for (key, snap) in &other.entries {
            match self.entries.binary_search_by(|(k, _)| k.cmp(key)) {
                Ok(i) => {
                    if let Some((_, mine)) = self.entries.get_mut(i) {
                        mine.merge(snap);
                    }
                }
                Err(i) => self.entries.insert(i, (*key, snap.clone())),
            }
        }
    }

    /// Everything recorded for `phase`, whatever the kind and stage.
    pub fn total(&self, phase: Phase) -> HistogramSnapshot {
        let mut t = HistogramSnapshot::new();
        for (_, s) in self.entries.iter().filter(|(k, _)| k.phase == phase) {
            t.merge(s);
        }
        t
    }

    /// Exits counted per (kind, stage): the counts of the [`Phase::Exit`] histograms.
    pub fn exit_counts(&self) -> Vec<(ExitClass, StageClass, u64)> {
        self.entries
            .iter()
            .filter(|(k, _)| k.phase == Phase::Exit)
            .map(|(k, s)| (k.kind, k.stage, s.count()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_holds_every_key_recorded_into_and_no_other() {
        let set = HistogramSet::new();
        assert!(set.snapshot().entries().is_empty());
        // Keys in each word of the bitmap (the first, one in the middle, the last).
        let keys: Vec<HistKey> = [0, 64, 100, SET_LEN - 1]
            .iter()
            .map(|&i| key_of(i).expect("key"))
            .collect();
        for (n, k) in keys.iter().enumerate() {
            for v in 0..=n as u64 {
                set.record(k.phase, k.kind, k.stage, 100 + v);
            }
        }
        let snap = set.snapshot();
        let got: Vec<HistKey> = snap.entries().iter().map(|(k, _)| *k).collect();
        let mut want = keys.clone();
        want.sort();
        assert_eq!(got, want);
        for (n, k) in keys.iter().enumerate() {
            assert_eq!(snap.get(*k).expect("entry").count(), n as u64 + 1);
        }
    }

    #[test]
    fn index_and_key_are_inverse() {
        let mut seen = [false; SET_LEN];
        for &p in Phase::ALL {
            for &k in ExitClass::ALL {
                for &s in StageClass::ALL {
                    let i = index(p, k, s);
                    assert!(i < SET_LEN);
                    assert!(!seen[i]);
                    seen[i] = true;
                    assert_eq!(
                        key_of(i),
                        Some(HistKey {
                            phase: p,
                            kind: k,
                            stage: s
                        })
                    );
                }
            }
        }
        assert!(key_of(SET_LEN).is_none());
    }

    #[test]
    fn enums_round_trip() {
        for &k in ExitClass::ALL {
            assert_eq!(ExitClass::from_u8(k as u8), Some(k));
            assert_eq!(ExitClass::from_name(k.name()), Some(k));
        }
        for &s in StageClass::ALL {
            assert_eq!(StageClass::from_u8(s as u8), Some(s));
        }
        assert_eq!(ExitClass::from_u8(200), None);
        assert_eq!(StageClass::from_u8(5), None);
        assert_eq!(
            ExitClass::from(pipeline::ExitKind::MmioRead),
            ExitClass::MmioRead
        );
    }

    #[test]
    fn set_records_by_key_and_merges() {
        let a = HistogramSet::new();
        let b = HistogramSet::new();
        assert!(a.snapshot().entries().is_empty());
        a.record(
            Phase::Exit,
            ExitClass::PioWrite,
            StageClass::SlowPosted,
            3_000,
        );
        a.record(
            Phase::Exit,
            ExitClass::PioWrite,
            StageClass::SlowPosted,
            4_000,
        );
        b.record(
            Phase::Exit,
            ExitClass::PioWrite,
            StageClass::SlowPosted,
            5_000,
        );
        b.record(
            Phase::RingWait,
            ExitClass::PioRead,
            StageClass::SlowWaited,
            900,
        );
        let mut s = a.snapshot();
        assert_eq!(s.entries().len(), 1);
        s.merge(&b.snapshot());
        assert_eq!(s.entries().len(), 2);
        let key = HistKey {
            phase: Phase::Exit,
            kind: ExitClass::PioWrite,
            stage: StageClass::SlowPosted,
        };
        let e = s.get(key).expect("merged entry");
        assert_eq!((e.count(), e.min(), e.max()), (3, 3_000, 5_000));
        assert_eq!(s.total(Phase::RingWait).count(), 1);
        assert_eq!(
            s.exit_counts(),
            vec![(ExitClass::PioWrite, StageClass::SlowPosted, 3)]
        );
        assert_eq!(key.label(), "exit pio-write/slow-posted");
    }
}
