//! Exit tracing: one lock-free SPSC ring of [`TraceEvent`]s per vCPU, off by default, switched at
//! run time, drained by a collector thread.
//!
//! # Cost when off
//!
//! The vCPU checks [`TraceWriter::enabled`]: one relaxed load of an `AtomicBool` that nobody
//! writes while the switch stays where it is, so its cache line stays shared in every core's
//! cache, and one predicted branch. Nothing else is built or stored when it is off.
//!
//! # When the ring is full
//!
//! The event is dropped and counted ([`TraceRingStats::dropped`]); the vCPU never waits for the
//! collector.
//!
//! # Why `pipeline`'s ring
//!
//! The ring is `pipeline`'s (`pipeline::try_channel`), the one the exit path already uses: it is
//! model-checked under loom, fuzzed, and its record layout can sit in shared memory, so a trace
//! ring can later live in a memfd that an out-of-process `bhyvectl` drains (design §1: the module
//! may run as its own process). A simpler overwrite ring would keep the newest events instead of
//! the oldest, but it would be new lock-free code without a loom model, and a reader racing an
//! overwriting writer needs a seqlock per slot. The price of reuse is the ring's wake-up protocol:
//! each push publishes with a `SeqCst` fence (one `lock`-prefixed instruction, ~10 ns here);
//! the collector never sleeps on the futex, so no push ever makes a system call. Measured in
//! `benches/instrument.rs`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use pipeline::{AttachError, Consumer, Producer, Record, RingError};

/// `owner` of an event that no device owns.
pub const NO_OWNER: u16 = u16::MAX;

/// One exit, as traced. 32 bytes, `#[repr(C)]`, no padding, no pointers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct TraceEvent {
    /// [`crate::Clock`] ticks when the exit reached the monitor (`Vcpu::run` returned).
    pub tsc: u64,
    /// Exit to re-entry, in nanoseconds.
    pub duration_ns: u64,
    /// Exit record posted to completion received, in nanoseconds (0: none), saturating.
    pub ring_wait_ns: u32,
    /// Time in the exit handler, in nanoseconds (0: not measured), saturating.
    pub handler_ns: u32,
    /// The vCPU.
    pub vcpu: u32,
    /// The owning device id ([`NO_OWNER`] if none).
    pub owner: u16,
    /// A [`crate::ExitClass`] as `u8`.
    pub kind: u8,
    /// A [`crate::StageClass`] as `u8`.
    pub stage: u8,
}

const _: () = {
    use core::mem::{align_of, offset_of, size_of};
    assert!(size_of::<TraceEvent>() == 32);
    assert!(align_of::<TraceEvent>() == 8);
    assert!(offset_of!(TraceEvent, tsc) == 0);
    assert!(offset_of!(TraceEvent, duration_ns) == 8);
    assert!(offset_of!(TraceEvent, ring_wait_ns) == 16);
    assert!(offset_of!(TraceEvent, handler_ns) == 20);
    assert!(offset_of!(TraceEvent, vcpu) == 24);
    assert!(offset_of!(TraceEvent, owner) == 28);
    assert!(offset_of!(TraceEvent, kind) == 30);
    assert!(offset_of!(TraceEvent, stage) == 31);
};

// SAFETY: repr(C), integer fields only, no padding (the layout is asserted just above), no
// pointers, valid for every bit pattern (kind and stage are raw u8s, decoded with `from_u8`),
// 32 bytes; the tag "TRCE" is used by no other record.
unsafe impl Record for TraceEvent {
    const TAG: u32 = u32::from_le_bytes(*b"TRCE");
}

/// Errors setting up or draining trace rings.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum TraceError {
    /// The ring could not be created (capacity not a power of two, or too large).
    #[error("Cannot create trace ring: {0}")]
    Create(#[from] AttachError),
    /// A ring reported a corrupted index; it is no longer drained.
    #[error("Trace ring of vCPU {vcpu} is corrupt: {source}")]
    Corrupt {
        /// The vCPU whose ring failed.
        vcpu: u32,
        /// What the ring reported.
        #[source]
        source: RingError,
    },
}

/// The run-time on/off switch shared by a VM's trace writers. Off when created.
#[derive(Debug, Clone, Default)]
pub struct TraceSwitch(Arc<AtomicBool>);

impl TraceSwitch {
    /// Starts tracing (takes effect at each vCPU's next exit).
    pub fn enable(&self) {
        self.0.store(true, Relaxed);
    }

    /// Stops tracing.
    pub fn disable(&self) {
        self.0.store(false, Relaxed);
    }

    /// Sets the switch.
    pub fn set(&self, on: bool) {
        self.0.store(on, Relaxed);
    }

    /// Whether tracing is on.
    pub fn is_enabled(&self) -> bool {
        self.0.load(Relaxed)
    }
}

/// Counters of one trace ring: written by its [`TraceWriter`], read by anyone.
#[derive(Debug, Default)]
pub struct TraceRingStats {
    /// Events pushed onto the ring.
    pub written: AtomicU64,
    /// Events dropped because the ring was full.
    pub dropped: AtomicU64,
}

/// The vCPU's end of its trace ring.
pub struct TraceWriter {
    vcpu: u32,
    on: Arc<AtomicBool>,
    ring: Producer<TraceEvent>,
    stats: Arc<TraceRingStats>,
    written: u64,
    dropped: u64,
}

impl std::fmt::Debug for TraceWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TraceWriter")
            .field("vcpu", &self.vcpu)
            .field("written", &self.written)
            .field("dropped", &self.dropped)
            .finish()
    }
}

impl TraceWriter {
    /// The vCPU this writer belongs to.
    pub fn vcpu(&self) -> u32 {
        self.vcpu
    }

    /// Whether tracing is on: one relaxed load. Check it before building an event.
    #[inline(always)]
    pub fn enabled(&self) -> bool {
        self.on.load(Relaxed)
    }

    /// Pushes `ev` (whatever the switch says; callers check [`TraceWriter::enabled`] first).
    /// Returns false if the ring was full and the event was dropped (and counted).
    #[inline]
    pub fn push(&mut self, ev: TraceEvent) -> bool {
        if self.ring.try_push(ev).is_ok() {
            self.written = self.written.wrapping_add(1);
            self.stats.written.store(self.written, Relaxed);
            true
        } else {
            self.dropped = self.dropped.wrapping_add(1);
            self.stats.dropped.store(self.dropped, Relaxed);
            false
        }
    }

    /// Pushes `ev` if tracing is on. Returns whether it was pushed.
    #[inline(always)]
    pub fn record(&mut self, ev: TraceEvent) -> bool {
        self.enabled() && self.push(ev)
    }

    /// This ring's counters.
    pub fn stats(&self) -> &Arc<TraceRingStats> {
        &self.stats
    }
}

struct CollectorRing {
    vcpu: u32,
    ring: Consumer<TraceEvent>,
    stats: Arc<TraceRingStats>,
    read: u64,
    corrupt: bool,
}

/// The counters of one ring, as [`TraceCollector::stats`] reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceRingSnapshot {
    /// The vCPU.
    pub vcpu: u32,
    /// Events the vCPU pushed.
    pub written: u64,
    /// Events the vCPU dropped because the ring was full.
    pub dropped: u64,
    /// Events the collector has taken.
    pub collected: u64,
    /// The ring reported corruption and is no longer drained.
    pub corrupt: bool,
}

/// Drains every vCPU's trace ring (one collector per VM; it owns the consumer ends).
pub struct TraceCollector {
    rings: Vec<CollectorRing>,
    batch: Vec<TraceEvent>,
}

impl std::fmt::Debug for TraceCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TraceCollector")
            .field("rings", &self.rings.len())
            .finish()
    }
}

impl TraceCollector {
    /// Moves every event now in the rings to the end of `out` (ring by ring, each in order).
    /// Returns how many. A corrupt ring is reported (the first one, after the others were
    /// drained) and skipped from then on.
    pub fn drain(&mut self, out: &mut Vec<TraceEvent>) -> Result<usize, TraceError> {
        let mut total = 0usize;
        let mut first_error = None;
        for r in self.rings.iter_mut().filter(|r| !r.corrupt) {
            loop {
                match r.ring.pop_batch(&mut self.batch) {
                    Ok(0) => break,
                    Ok(n) => {
                        out.extend(self.batch.iter().take(n));
                        total = total.saturating_add(n);
                        r.read = r.read.wrapping_add(n as u64);
                    }
                    Err(source) => {
                        r.corrupt = true;
                        first_error.get_or_insert(TraceError::Corrupt {
                            vcpu: r.vcpu,
                            source,
                        });
                        break;
                    }
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(total),
        }
    }

    /// Per-ring counters.
    pub fn stats(&self) -> Vec<TraceRingSnapshot> {
        self.rings
            .iter()
            .map(|r| TraceRingSnapshot {
                vcpu: r.vcpu,
                written: r.stats.written.load(Relaxed),
                dropped: r.stats.dropped.load(Relaxed),
                collected: r.read,
                corrupt: r.corrupt,
            })
            .collect()
    }

    /// Events dropped by all rings so far.
    pub fn dropped(&self) -> u64 {
        self.rings
            .iter()
            .fold(0u64, |a, r| a.saturating_add(r.stats.dropped.load(Relaxed)))
    }
}

/// Sorts events by timestamp (the collector returns them ring by ring).
pub fn sort_by_time(events: &mut [TraceEvent]) {
    events.sort_by_key(|e| (e.tsc, e.vcpu));
}

/// Trace rings for `vcpus` vCPUs, `capacity` events each (a power of two; 32 bytes an event).
/// Returns the switch (off), one writer per vCPU (index = vCPU id) and the collector.
pub fn trace_rings(
    vcpus: u32,
    capacity: u32,
) -> Result<(TraceSwitch, Vec<TraceWriter>, TraceCollector), TraceError> {
    let switch = TraceSwitch::default();
    let mut writers = Vec::new();
    let mut rings = Vec::new();
    for vcpu in 0..vcpus {
        let (tx, rx) = pipeline::try_channel::<TraceEvent>(capacity)?;
        let stats = Arc::new(TraceRingStats::default());
        writers.push(TraceWriter {
            vcpu,
            on: switch.0.clone(),
            ring: tx,
            stats: stats.clone(),
            written: 0,
            dropped: 0,
        });
        rings.push(CollectorRing {
            vcpu,
            ring: rx,
            stats,
            read: 0,
            corrupt: false,
        });
    }
    let collector = TraceCollector {
        rings,
        batch: vec![TraceEvent::default(); 256],
    };
    Ok((switch, writers, collector))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(i: u64) -> TraceEvent {
        TraceEvent {
            tsc: i,
            duration_ns: 1000 + i,
            vcpu: 0,
            owner: 3,
            kind: 1,
            stage: 2,
            ..TraceEvent::default()
        }
    }

    #[test]
    fn off_by_default_and_switchable() {
        let (switch, mut w, mut c) = trace_rings(1, 8).expect("rings");
        let w = &mut w[0];
        assert!(!switch.is_enabled());
        assert!(!w.record(ev(1)));
        switch.enable();
        assert!(w.record(ev(2)));
        switch.disable();
        assert!(!w.record(ev(3)));
        let mut out = Vec::new();
        assert_eq!(c.drain(&mut out), Ok(1));
        assert_eq!(out, vec![ev(2)]);
    }

    #[test]
    fn bad_capacity_is_an_error() {
        assert!(matches!(trace_rings(1, 3), Err(TraceError::Create(_))));
    }
}
