//! [`VcpuProbe`]: the per-vCPU instrument the run loop calls at fixed points of an exit.
//!
//! ```text
//!  loop {
//!      probe.enter();                      // ① right before Vcpu::run: closes the previous exit
//!      let exit = vcpu.run();
//!      probe.exited();                     // ② right after Vcpu::run returns
//!      ... handler: probe.classify(kind, stage, owner);
//!          slow read: probe.ring_posted(); post; wait; probe.ring_completed();
//!      probe.handled();                    // ③ optional: after the handler returns
//!  }
//!  probe.finish();                         // closes the last exit when the loop ends
//! ```
//!
//! ① − ② is the exit-to-re-entry time ([`Phase::Exit`]), ② − the previous ① the time inside
//! `Vcpu::run` ([`Phase::Run`]), ③ − ② the handler ([`Phase::Handler`]), and the ring pair the
//! ring wait ([`Phase::RingWait`]). The exit is recorded when it is closed (at ①), so the re-entry
//! time includes everything the loop does between exits. Two clock reads per exit are the
//! minimum (① and ②); ③ and the ring pair are optional. Each call is `#[inline]` and allocates
//! nothing; with tracing off the only added cost is one relaxed load at ①.

use std::sync::Arc;

use crate::clock::Clock;
use crate::set::{ExitClass, HistogramSet, Phase, StageClass};
use crate::trace::{TraceEvent, TraceWriter, NO_OWNER};

/// The per-vCPU instrument: owned by the vCPU thread (not `Sync`); its histograms are shared
/// for snapshots.
pub struct VcpuProbe {
    clock: Clock,
    vcpu: u32,
    hists: Arc<HistogramSet>,
    trace: Option<TraceWriter>,
    entered: Option<u64>,
    exited: Option<u64>,
    handled: Option<u64>,
    posted: Option<u64>,
    ring_wait: Option<u64>,
    kind: ExitClass,
    stage: StageClass,
    owner: u16,
}

impl std::fmt::Debug for VcpuProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuProbe")
            .field("vcpu", &self.vcpu)
            .field("clock", &self.clock.source())
            .field("tracing", &self.trace.is_some())
            .finish()
    }
}

impl VcpuProbe {
    /// The probe of vCPU `vcpu`, recording into `hists` and, if given, tracing into `trace`.
    pub fn new(
        vcpu: u32,
        clock: Clock,
        hists: Arc<HistogramSet>,
        trace: Option<TraceWriter>,
    ) -> Self {
        Self {
            clock,
            vcpu,
            hists,
            trace,
            entered: None,
            exited: None,
            handled: None,
            posted: None,
            ring_wait: None,
            kind: ExitClass::Other,
            stage: StageClass::Loop,
            owner: NO_OWNER,
        }
    }

    /// The clock (for callers that time other things with the same ticks).
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// The histograms this probe records into.
    pub fn histograms(&self) -> &Arc<HistogramSet> {
        &self.hists
    }

    /// The trace writer, if tracing was set up.
    pub fn trace(&self) -> Option<&TraceWriter> {
        self.trace.as_ref()
    }

    /// The current tick count.
    #[inline(always)]
    pub fn now(&self) -> u64 {
        self.clock.now()
    }

    /// ① Call right before `Vcpu::run`: closes (records) the previous exit, if one is open, and
    /// starts timing the run.
    #[inline]
    pub fn enter(&mut self) {
        let now = self.clock.now();
        if self.exited.is_some() {
            self.close(now);
        }
        self.entered = Some(now);
    }

    /// ② Call right after `Vcpu::run` returns: opens an exit, classified as (`Other`, `Loop`,
    /// no owner) until [`VcpuProbe::classify`] says otherwise.
    #[inline]
    pub fn exited(&mut self) {
        let now = self.clock.now();
        if self.exited.is_some() {
            // Two exits without an `enter` between them: close the first here.
            self.close(now);
        }
        self.exited = Some(now);
        self.kind = ExitClass::Other;
        self.stage = StageClass::Loop;
        self.owner = NO_OWNER;
    }

    /// Says what the open exit was: its kind, the stage that handled it and the owning device
    /// id ([`NO_OWNER`] if none). No clock read.
    #[inline(always)]
    pub fn classify(&mut self, kind: ExitClass, stage: StageClass, owner: u16) {
        self.kind = kind;
        self.stage = stage;
        self.owner = owner;
    }

    /// Call right before posting an exit record that will be waited for.
    #[inline]
    pub fn ring_posted(&mut self) {
        self.posted = Some(self.clock.now());
    }

    /// Call right after its completion arrived (or the wait failed).
    #[inline]
    pub fn ring_completed(&mut self) {
        if let Some(p) = self.posted.take() {
            let d = self.clock.now().saturating_sub(p);
            self.ring_wait = Some(self.ring_wait.unwrap_or(0).saturating_add(d));
        }
    }

    /// ③ Optional: call right after the exit handler returns, to time it.
    #[inline]
    pub fn handled(&mut self) {
        self.handled = Some(self.clock.now());
    }

    /// Closes the open exit, if any, as re-entered now (call when the run loop ends).
    pub fn finish(&mut self) {
        if self.exited.is_some() {
            let now = self.clock.now();
            self.close(now);
        }
        self.entered = None;
    }

    #[inline]
    fn close(&mut self, now: u64) {
        let Some(exited) = self.exited.take() else {
            return;
        };
        let (kind, stage) = (self.kind, self.stage);
        let c = &self.clock;
        let exit_ns = c.elapsed_ns(exited, now);
        self.hists.record(Phase::Exit, kind, stage, exit_ns);
        if let Some(e) = self.entered.take() {
            self.hists
                .record(Phase::Run, kind, stage, c.elapsed_ns(e, exited));
        }
        let handler_ns = self.handled.take().map(|h| c.elapsed_ns(exited, h));
        if let Some(ns) = handler_ns {
            self.hists.record(Phase::Handler, kind, stage, ns);
        }
        let ring_ns = self.ring_wait.take().map(|t| c.ticks_to_ns(t));
        if let Some(ns) = ring_ns {
            self.hists.record(Phase::RingWait, kind, stage, ns);
        }
        self.posted = None;
        if let Some(t) = self.trace.as_mut() {
            if t.enabled() {
                t.push(TraceEvent {
                    tsc: exited,
                    duration_ns: exit_ns,
                    ring_wait_ns: sat32(ring_ns.unwrap_or(0)),
                    handler_ns: sat32(handler_ns.unwrap_or(0)),
                    vcpu: self.vcpu,
                    owner: self.owner,
                    kind: kind as u8,
                    stage: stage as u8,
                });
            }
        }
    }
}

#[inline(always)]
fn sat32(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::set::HistKey;
    use crate::trace::trace_rings;

    fn key(phase: Phase, kind: ExitClass, stage: StageClass) -> HistKey {
        HistKey { phase, kind, stage }
    }

    #[test]
    fn phases_are_recorded_under_the_classified_key() {
        let hists = Arc::new(HistogramSet::new());
        let (switch, mut writers, mut collector) = trace_rings(1, 16).expect("rings");
        switch.enable();
        let mut p = VcpuProbe::new(0, Clock::new(), hists.clone(), writers.pop());
        for i in 0..3u16 {
            p.enter();
            p.exited();
            p.classify(ExitClass::PioRead, StageClass::SlowWaited, 7);
            p.ring_posted();
            std::thread::sleep(std::time::Duration::from_millis(1));
            p.ring_completed();
            if i != 0 {
                p.handled();
            }
        }
        p.enter();
        p.exited(); // a kick, never classified
        p.finish();
        let s = hists.snapshot();
        let waited = s
            .get(key(Phase::Exit, ExitClass::PioRead, StageClass::SlowWaited))
            .expect("exit histogram");
        assert_eq!(waited.count(), 3);
        assert!(waited.min() >= 1_000_000, "exit includes the 1 ms wait");
        let ring = s
            .get(key(
                Phase::RingWait,
                ExitClass::PioRead,
                StageClass::SlowWaited,
            ))
            .expect("ring histogram");
        assert_eq!(ring.count(), 3);
        assert!(ring.min() >= 1_000_000 && ring.max() <= waited.max());
        let handler = s
            .get(key(
                Phase::Handler,
                ExitClass::PioRead,
                StageClass::SlowWaited,
            ))
            .expect("handler histogram");
        assert_eq!(handler.count(), 2);
        assert_eq!(
            s.get(key(Phase::Exit, ExitClass::Other, StageClass::Loop))
                .map(|h| h.count()),
            Some(1)
        );
        assert_eq!(s.total(Phase::Run).count(), 4);
        let mut events = Vec::new();
        assert_eq!(collector.drain(&mut events), Ok(4));
        assert_eq!(events[0].owner, 7);
        assert_eq!(events[0].kind, ExitClass::PioRead as u8);
        assert!(events[0].ring_wait_ns >= 1_000_000);
        assert_eq!(events[0].handler_ns, 0);
        assert!(events[1].handler_ns >= 1_000_000);
        assert_eq!(events[3].owner, NO_OWNER);
    }

    #[test]
    fn handles_cross_threads() {
        // The probe moves to the vCPU thread; sets, switch and collector are shared with tools.
        fn send<T: Send>() {}
        fn shared<T: Send + Sync>() {}
        send::<VcpuProbe>();
        send::<crate::TraceCollector>();
        shared::<HistogramSet>();
        shared::<crate::TraceSwitch>();
        shared::<crate::TraceRingStats>();
    }

    #[test]
    fn finish_without_an_open_exit_records_nothing() {
        let hists = Arc::new(HistogramSet::new());
        let mut p = VcpuProbe::new(0, Clock::monotonic(), hists.clone(), None);
        p.finish();
        p.enter();
        p.finish();
        assert!(hists.snapshot().entries().is_empty());
    }
}
