//! The pure exit handler: classify one exit, run the fast stage inline or hand it to the slow stage.
//!
//! It knows nothing of KVM: it takes a [`VmExit`] and returns an [`Action`], so unit tests drive it with
//! hand-made exits. The borrowed exit data never leaves this function: what crosses to the device-model
//! side is an owned [`ExitRecord`].

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use pipeline::{CompletionRecord, ExitKind, ExitRecord};
use stages::bus::fill_unclaimed;
use stages::platform::{le_value, put_le_value};
use stages::{Bus, BusDevice, DeviceId, EoiSink, Route, Space, Stage, VmRequest, VmRequests};

use crate::backend::VmExit;
use crate::coalesced::{CoalescedRing, LazyZones};
use crate::ratelimit::RateLimit;
use crate::stats::{Stat, VcpuStats};
use perf::{ExitClass, StageClass, VcpuProbe, NO_OWNER};

/// `ExitRecord::flags`: the vCPU did not wait for this record.
pub const FLAG_POSTED: u32 = pipeline::ExitFlags::POSTED.bits();
/// `ExitRecord::flags`: the vCPU waits for a completion with the same `seq`.
pub const FLAG_NEEDS_COMPLETION: u32 = pipeline::ExitFlags::NEEDS_COMPLETION.bits();

/// Why the slow path failed.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum SlowPathError {
    /// The device-model side did not make room or answer in time.
    #[error("Device-model side did not answer within {0:?}")]
    Timeout(Duration),
    /// The ring reported corruption or the peer answered out of protocol.
    #[error("Exit ring protocol error: {0}")]
    Protocol(String),
    /// The VM is stopping.
    #[error("VM is stopping")]
    Stopping,
}

/// The vCPU's end of its exit ring and completion ring.
pub trait SlowPath: Send {
    /// Posts `rec` (waits, bounded, for room if the ring is full; returns whether it had to wait).
    fn post(&mut self, rec: ExitRecord) -> Result<bool, SlowPathError>;
    /// Waits for the completion of record `seq`.
    fn wait(&mut self, seq: u64) -> Result<CompletionRecord, SlowPathError>;
    /// Records on the exit ring now (for the occupancy gauge).
    fn occupancy(&self) -> usize {
        0
    }
}

/// A device that runs inline on the vCPU thread. One lock per device; no other lock is taken while
/// holding it.
pub type FastDevice = Arc<Mutex<dyn BusDevice>>;

/// What every vCPU of a VM shares: the bus, the fast devices, the request word.
pub struct Platform {
    /// The classifier.
    pub bus: Bus,
    /// Fast devices by id (`None` for slow or unused ids).
    pub fast: Vec<Option<FastDevice>>,
    /// Names by device id (for logs and stats).
    pub names: Vec<String>,
    /// VM-wide requests (stop, reset, ...).
    pub requests: Arc<VmRequests>,
    /// Where I/O APIC EOIs go (the in-module interrupt controller), if there is one.
    pub eoi: Option<Arc<dyn EoiSink>>,
    /// Zones whose writes the hypervisor coalesces (each registered at the first write exit into
    /// it, once the ring is mapped).
    pub coalesced_zones: LazyZones,
    /// The VM's coalesced-write ring, once a vCPU has mapped it.
    pub coalesced: OnceLock<CoalescedRing>,
}

impl std::fmt::Debug for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Platform")
            .field("bus", &self.bus)
            .field("names", &self.names)
            .finish()
    }
}

impl Platform {
    /// The name of `id`, for messages.
    pub fn name(&self, id: DeviceId) -> &str {
        self.names
            .get(usize::from(id.0))
            .map_or("?", |s| s.as_str())
    }
}

/// What the run loop does after an exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Re-enter the guest.
    Continue,
    /// Stop the VM with this request (a device asked, or the guest triple-faulted).
    Stop(VmRequest),
    /// Stop the VM with an error (bhyve exit status 4).
    Fail(String),
}

/// One vCPU's exit handler.
pub struct ExitHandler<S: SlowPath> {
    vcpu: u32,
    platform: Arc<Platform>,
    slow: S,
    seq: u64,
    stats: Arc<VcpuStats>,
    unclaimed_log: RateLimit,
    error_log: RateLimit,
    /// Latency histograms and the trace writer of this vCPU.
    probe: VcpuProbe,
}

impl<S: SlowPath> std::fmt::Debug for ExitHandler<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExitHandler")
            .field("vcpu", &self.vcpu)
            .field("seq", &self.seq)
            .finish()
    }
}

impl<S: SlowPath> ExitHandler<S> {
    /// The handler of vCPU `vcpu`.
    pub fn new(
        vcpu: u32,
        platform: Arc<Platform>,
        slow: S,
        stats: Arc<VcpuStats>,
        probe: VcpuProbe,
    ) -> Self {
        Self {
            vcpu,
            platform,
            slow,
            seq: 0,
            stats,
            unclaimed_log: RateLimit::new(10, Duration::from_secs(1)),
            error_log: RateLimit::new(10, Duration::from_secs(1)),
            probe,
        }
    }

    /// The latency probe (the run loop calls it around `Vcpu::run`).
    #[inline]
    pub fn probe(&mut self) -> &mut VcpuProbe {
        &mut self.probe
    }

    /// The counters this handler increments.
    pub fn stats(&self) -> &Arc<VcpuStats> {
        &self.stats
    }

    /// The VM-wide request, if a device (on any thread) made one.
    #[inline]
    pub fn pending_request(&self) -> Option<VmRequest> {
        self.platform.requests.pending()
    }

    /// Applies the writes the hypervisor coalesced since the last drain, oldest first, to their
    /// (fast) devices. Every exit does this before handling its own access; the run loop also does
    /// it on a kick and before the vCPU pauses or stops.
    #[inline]
    pub fn drain_coalesced(&mut self) {
        let Some(ring) = self.platform.coalesced.get() else {
            return;
        };
        if ring.is_empty() {
            return;
        }
        let platform = &*self.platform;
        let stats = &self.stats;
        let drained = ring.drain(|w| {
            let space = if w.pio { Space::Pio } else { Space::Mmio };
            let dev = platform
                .bus
                .route(space, w.addr)
                .filter(|r| r.stage == Stage::Fast)
                .and_then(|r| {
                    Some((
                        r.offset,
                        platform.fast.get(usize::from(r.device.0))?.as_ref()?,
                    ))
                });
            match dev {
                Some((offset, dev)) => {
                    stats.inc(Stat::CoalescedWrite);
                    lock(dev).write(offset, w.bytes());
                }
                // Zones are checked to hold fast devices only; the rest is nobody's (dropped).
                None => stats.inc(Stat::UnclaimedWrite),
            }
        });
        if let Err(e) = drained {
            self.stats.inc(Stat::SlowPathError);
            self.log_error(&format!("coalesced-write ring: {e:?}"));
        }
    }

    /// Handles one exit.
    pub fn handle(&mut self, exit: VmExit<'_>) -> Action {
        // The writes the guest made before this exit reach their devices first (an index register
        // written before this data access).
        self.drain_coalesced();
        self.stats.inc(Stat::VmExitTotal);
        let action = match exit {
            VmExit::IoIn { port, data } => {
                self.stats.inc(Stat::VmExitInout);
                self.read(Space::Pio, u64::from(port), data)
            }
            VmExit::IoOut { port, data } => {
                self.stats.inc(Stat::VmExitInout);
                self.write(Space::Pio, u64::from(port), data)
            }
            VmExit::MmioRead { addr, data } => {
                self.stats.inc(Stat::VmExitMmio);
                self.read(Space::Mmio, addr, data)
            }
            VmExit::MmioWrite { addr, data } => {
                self.stats.inc(Stat::VmExitMmio);
                self.write(Space::Mmio, addr, data)
            }
            VmExit::Hlt => {
                self.probe
                    .classify(ExitClass::Hlt, StageClass::Loop, NO_OWNER);
                // Only without an in-kernel LAPIC: a HLT that reaches us halts the VM (bhyve's
                // halt detection with one vCPU).
                self.stats.inc(Stat::VmExitHlt);
                Action::Stop(VmRequest::Halt)
            }
            VmExit::Shutdown => {
                self.probe
                    .classify(ExitClass::Shutdown, StageClass::Loop, NO_OWNER);
                self.stats.inc(Stat::VmExitShutdown);
                Action::Stop(VmRequest::TripleFault)
            }
            VmExit::IoapicEoi { vector } => {
                self.probe
                    .classify(ExitClass::IoapicEoi, StageClass::Loop, NO_OWNER);
                self.stats.inc(Stat::VmExitIoapicEoi);
                if let Some(sink) = &self.platform.eoi {
                    sink.eoi(vector);
                }
                Action::Continue
            }
            VmExit::Interrupted => {
                self.probe
                    .classify(ExitClass::Kick, StageClass::Loop, NO_OWNER);
                self.stats.inc(Stat::VmExitIntr);
                Action::Continue
            }
            VmExit::SystemEvent { reset } => Action::Stop(if reset {
                VmRequest::Reset
            } else {
                VmRequest::PowerOff
            }),
            VmExit::FailEntry { reason } => {
                self.stats.inc(Stat::VmExitOther);
                Action::Fail(format!(
                    "vCPU {} could not enter the guest (hardware entry failure reason {reason:#x})",
                    self.vcpu
                ))
            }
            VmExit::InternalError { suberror } => {
                self.stats.inc(Stat::VmExitOther);
                Action::Fail(format!(
                    "vCPU {}: hypervisor internal error (suberror {suberror})",
                    self.vcpu
                ))
            }
            VmExit::Other { reason } => {
                self.stats.inc(Stat::VmExitOther);
                Action::Fail(format!(
                    "vCPU {}: unhandled exit reason {reason}",
                    self.vcpu
                ))
            }
        };
        if action == Action::Continue {
            if let Some(req) = self.platform.requests.pending() {
                return Action::Stop(req);
            }
        }
        action
    }

    fn fast_device(&self, id: DeviceId) -> Option<&FastDevice> {
        self.platform.fast.get(usize::from(id.0))?.as_ref()
    }

    fn read(&mut self, space: Space, addr: u64, data: &mut [u8]) -> Action {
        // Fill before dispatch: a device that ignores a register leaves all-ones, like an unclaimed read.
        fill_unclaimed(data);
        let class = match space {
            Space::Pio => ExitClass::PioRead,
            Space::Mmio => ExitClass::MmioRead,
        };
        let Some(route) = self.platform.bus.route(space, addr) else {
            self.probe.classify(class, StageClass::Unclaimed, NO_OWNER);
            self.stats.inc(Stat::UnclaimedRead);
            self.log_unclaimed("read", space, addr, data.len());
            return Action::Continue;
        };
        self.stats.inc_device(route.device.0);
        match route.stage {
            Stage::Fast => {
                self.probe.classify(class, StageClass::Fast, route.device.0);
                self.stats.inc(Stat::FastStage);
                if let Some(dev) = self.fast_device(route.device) {
                    lock(dev).read(route.offset, data);
                }
                Action::Continue
            }
            Stage::Slow | Stage::SlowOrdered => {
                self.probe
                    .classify(class, StageClass::SlowWaited, route.device.0);
                self.stats.inc(Stat::SlowWaited);
                let kind = match space {
                    Space::Pio => ExitKind::PioRead,
                    Space::Mmio => ExitKind::MmioRead,
                };
                let rec = self.record(kind, addr, &route, 0, data.len(), true);
                let seq = rec.seq;
                self.probe.ring_posted();
                let result = self.slow.post(rec).and_then(|waited| {
                    if waited {
                        self.stats.inc(Stat::RingFull);
                    }
                    self.slow.wait(seq)
                });
                self.probe.ring_completed();
                match result {
                    Ok(c) if c.seq == seq && c.status == 0 => {
                        put_le_value(data, c.data);
                        Action::Continue
                    }
                    Ok(c) => {
                        // A device-side error answers all-ones, as an aborted PCI read would.
                        self.stats.inc(Stat::SlowPathError);
                        self.log_error(&format!(
                            "completion seq {} status {} for read seq {seq}",
                            c.seq, c.status
                        ));
                        Action::Continue
                    }
                    Err(SlowPathError::Stopping) => Action::Continue,
                    Err(e) => self.slow_failure("read", space, addr, route.device, &e),
                }
            }
        }
    }

    fn write(&mut self, space: Space, addr: u64, data: &[u8]) -> Action {
        let class = match space {
            Space::Pio => ExitClass::PioWrite,
            Space::Mmio => ExitClass::MmioWrite,
        };
        let Some(route) = self.platform.bus.route(space, addr) else {
            self.probe.classify(class, StageClass::Unclaimed, NO_OWNER);
            self.stats.inc(Stat::UnclaimedWrite);
            self.log_unclaimed("write", space, addr, data.len());
            return Action::Continue;
        };
        self.stats.inc_device(route.device.0);
        match route.stage {
            Stage::Fast => {
                self.probe.classify(class, StageClass::Fast, route.device.0);
                self.stats.inc(Stat::FastStage);
                if let Some(dev) = self.fast_device(route.device) {
                    lock(dev).write(route.offset, data);
                }
                // The first write into a coalesced zone registers it; later ones are coalesced.
                self.platform
                    .coalesced_zones
                    .on_write_exit(space == Space::Pio, addr);
                Action::Continue
            }
            Stage::Slow => {
                self.probe
                    .classify(class, StageClass::SlowPosted, route.device.0);
                self.stats.inc(Stat::SlowPosted);
                let kind = match space {
                    Space::Pio => ExitKind::PioWrite,
                    Space::Mmio => ExitKind::MmioWrite,
                };
                let rec = self.record(kind, addr, &route, le_value(data), data.len(), false);
                match self.slow.post(rec) {
                    Ok(waited) => {
                        if waited {
                            self.stats.inc(Stat::RingFull);
                        }
                        let occupancy = u64::try_from(self.slow.occupancy()).unwrap_or(u64::MAX);
                        self.stats.raise(Stat::RingHighWater, occupancy);
                        Action::Continue
                    }
                    Err(SlowPathError::Stopping) => Action::Continue,
                    Err(e) => self.slow_failure("write", space, addr, route.device, &e),
                }
            }
            Stage::SlowOrdered => {
                self.probe
                    .classify(class, StageClass::SlowWaited, route.device.0);
                self.stats.inc(Stat::SlowWaited);
                let kind = match space {
                    Space::Pio => ExitKind::PioWrite,
                    Space::Mmio => ExitKind::MmioWrite,
                };
                let rec = self.record(kind, addr, &route, le_value(data), data.len(), true);
                let seq = rec.seq;
                self.probe.ring_posted();
                let result = self.slow.post(rec).and_then(|waited| {
                    if waited {
                        self.stats.inc(Stat::RingFull);
                    }
                    self.slow.wait(seq)
                });
                self.probe.ring_completed();
                match result {
                    Ok(c) if c.status == 0 => Action::Continue,
                    Ok(c) => {
                        self.stats.inc(Stat::SlowPathError);
                        self.log_error(&format!(
                            "completion status {} for ordered write seq {seq}",
                            c.status
                        ));
                        Action::Continue
                    }
                    Err(SlowPathError::Stopping) => Action::Continue,
                    Err(e) => self.slow_failure("write", space, addr, route.device, &e),
                }
            }
        }
    }

    /// The VM-ending result of a slow-stage access the device-model side failed to serve.
    fn slow_failure(
        &mut self,
        what: &str,
        space: Space,
        addr: u64,
        device: DeviceId,
        e: &SlowPathError,
    ) -> Action {
        self.stats.inc(Stat::SlowPathError);
        Action::Fail(format!(
            "vCPU {}: {space} {what} at {addr:#x} ({}): {e}",
            self.vcpu,
            self.platform.name(device)
        ))
    }

    #[inline]
    fn record(
        &mut self,
        kind: ExitKind,
        addr: u64,
        route: &Route,
        data: u64,
        size: usize,
        ordered: bool,
    ) -> ExitRecord {
        self.seq = self.seq.wrapping_add(1);
        let posted = !ordered && matches!(kind, ExitKind::PioWrite | ExitKind::MmioWrite);
        ExitRecord {
            seq: self.seq,
            addr,
            offset: route.offset,
            data,
            vcpu: self.vcpu,
            device: route.device.0,
            kind: kind as u8,
            // Access widths come from the backend (1..=8); anything larger is clamped, never wrapped.
            size: u8::try_from(size.min(8)).unwrap_or(8),
            flags: if posted {
                FLAG_POSTED
            } else {
                FLAG_NEEDS_COMPLETION
            },
            reserved: 0,
        }
    }

    fn log_unclaimed(&mut self, what: &str, space: Space, addr: u64, len: usize) {
        if let Some(suppressed) = self.unclaimed_log.check(Instant::now()) {
            let more = if suppressed > 0 {
                format!(" ({suppressed} similar messages suppressed)")
            } else {
                String::new()
            };
            eprintln!(
                "vcpu {}: unclaimed {len}-byte {space} {what} at {addr:#x}{more}",
                self.vcpu
            );
        }
    }

    fn log_error(&mut self, msg: &str) {
        if let Some(suppressed) = self.error_log.check(Instant::now()) {
            eprintln!(
                "vcpu {}: slow stage: {msg} ({suppressed} suppressed)",
                self.vcpu
            );
        }
    }
}

/// Locks a device; a poisoned lock (a device panicked on another thread) still yields the device, so
/// one bad device model cannot wedge every vCPU.
#[inline]
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicU8, Ordering};

    /// A slow path that records what is posted and answers reads from a script.
    #[derive(Default)]
    struct FakeSlow {
        posted: Arc<Mutex<Vec<ExitRecord>>>,
        answers: VecDeque<Result<CompletionRecord, SlowPathError>>,
        full: bool,
    }

    impl SlowPath for FakeSlow {
        fn post(&mut self, rec: ExitRecord) -> Result<bool, SlowPathError> {
            self.posted.lock().unwrap().push(rec);
            Ok(self.full)
        }
        fn wait(&mut self, seq: u64) -> Result<CompletionRecord, SlowPathError> {
            self.answers.pop_front().unwrap_or(Ok(CompletionRecord {
                seq,
                data: 0x1234_5678,
                vcpu: 0,
                status: 0,
                reserved: 0,
            }))
        }
    }

    #[derive(Default)]
    struct Reg(u64);
    impl BusDevice for Reg {
        fn read(&mut self, _o: u64, d: &mut [u8]) {
            put_le_value(d, self.0);
        }
        fn write(&mut self, o: u64, d: &[u8]) {
            self.0 = le_value(d) + o;
        }
    }

    struct Eoi(AtomicU8);
    impl EoiSink for Eoi {
        fn eoi(&self, v: u8) {
            self.0.store(v, Ordering::Relaxed);
        }
    }

    fn handler(slow: FakeSlow) -> (ExitHandler<FakeSlow>, Arc<Mutex<Reg>>, Arc<Eoi>) {
        let mut bus = Bus::new();
        bus.insert(Space::Pio, 0x40, 4, DeviceId(0), Stage::Fast)
            .unwrap();
        bus.insert(Space::Pio, 0x3f8, 8, DeviceId(1), Stage::Slow)
            .unwrap();
        bus.insert(Space::Mmio, 0xd000_0000, 0x1000, DeviceId(1), Stage::Slow)
            .unwrap();
        let fast = Arc::new(Mutex::new(Reg::default()));
        let eoi = Arc::new(Eoi(AtomicU8::new(0)));
        let platform = Arc::new(Platform {
            bus,
            fast: vec![Some(fast.clone() as FastDevice), None],
            names: vec!["pit".into(), "com1".into()],
            requests: Arc::new(VmRequests::new()),
            eoi: Some(eoi.clone()),
            coalesced_zones: LazyZones::new(vec![crate::coalesced::CoalescedZone {
                pio: true,
                addr: 0x40,
                len: 2,
            }]),
            coalesced: OnceLock::new(),
        });
        let probe = VcpuProbe::new(
            0,
            perf::Clock::new(),
            Arc::new(perf::HistogramSet::new()),
            None,
        );
        let h = ExitHandler::new(0, platform, slow, Arc::new(VcpuStats::default()), probe);
        (h, fast, eoi)
    }

    #[test]
    fn the_first_fast_write_into_a_coalesced_zone_registers_it() {
        let (mut h, fast, _) = handler(FakeSlow::default());
        let n = Arc::new(AtomicU8::new(0));
        let n2 = n.clone();
        h.platform.coalesced_zones.set_registrar(Box::new(move |z| {
            assert_eq!((z.pio, z.addr, z.len), (true, 0x40, 2));
            n2.fetch_add(1, Ordering::Relaxed);
            true
        }));
        // A read, and a write outside the zone (same device): not yet.
        let mut d = [0u8];
        h.handle(VmExit::IoIn {
            port: 0x41,
            data: &mut d,
        });
        h.handle(VmExit::IoOut {
            port: 0x42,
            data: &[1],
        });
        assert_eq!(n.load(Ordering::Relaxed), 0);
        for v in [5, 6] {
            h.handle(VmExit::IoOut {
                port: 0x41,
                data: &[v],
            });
        }
        assert_eq!(n.load(Ordering::Relaxed), 1, "registered once");
        assert_eq!(
            fast.lock().unwrap().0,
            6 + 1,
            "the arming write itself is applied"
        );
    }

    #[test]
    fn fast_stage_runs_inline_at_an_offset() {
        let (mut h, fast, _) = handler(FakeSlow::default());
        assert_eq!(
            h.handle(VmExit::IoOut {
                port: 0x42,
                data: &[7]
            }),
            Action::Continue
        );
        assert_eq!(fast.lock().unwrap().0, 7 + 2, "the device saw offset 2");
        let mut d = [0u8; 2];
        h.handle(VmExit::IoIn {
            port: 0x40,
            data: &mut d,
        });
        assert_eq!(d, [9, 0]);
        assert_eq!(h.stats().get(Stat::FastStage), 2);
        assert_eq!(h.stats().get(Stat::VmExitInout), 2);
    }

    #[test]
    fn slow_writes_are_posted_and_reads_wait() {
        let slow = FakeSlow::default();
        let posted = slow.posted.clone();
        let (mut h, _, _) = handler(slow);
        h.handle(VmExit::IoOut {
            port: 0x3f9,
            data: &[0x41],
        });
        let mut d = [0u8; 4];
        h.handle(VmExit::MmioRead {
            addr: 0xd000_0010,
            data: &mut d,
        });
        assert_eq!(u32::from_le_bytes(d), 0x1234_5678);
        let p = posted.lock().unwrap();
        assert_eq!(p.len(), 2);
        let w = p[0].decode().unwrap();
        assert_eq!(
            (w.kind, w.offset, w.data, w.addr),
            (ExitKind::PioWrite, 1, 0x41, 0x3f9)
        );
        assert!(!w.needs_completion());
        let r = p[1].decode().unwrap();
        assert_eq!((r.kind, r.offset, r.seq), (ExitKind::MmioRead, 0x10, 2));
        assert!(r.needs_completion());
        assert_eq!(h.stats().get(Stat::SlowPosted), 1);
        assert_eq!(h.stats().get(Stat::SlowWaited), 1);
    }

    #[test]
    fn unclaimed_reads_are_all_ones_and_counted() {
        let (mut h, _, _) = handler(FakeSlow::default());
        let mut d = [0u8; 4];
        h.handle(VmExit::IoIn {
            port: 0x9000,
            data: &mut d,
        });
        assert_eq!(d, [0xff; 4]);
        let mut q = [0u8; 8];
        h.handle(VmExit::MmioRead {
            addr: 0xe000_0000,
            data: &mut q,
        });
        assert_eq!(q, [0xff; 8]);
        h.handle(VmExit::MmioWrite {
            addr: 0xe000_0000,
            data: &[1],
        });
        assert_eq!(h.stats().get(Stat::UnclaimedRead), 2);
        assert_eq!(h.stats().get(Stat::UnclaimedWrite), 1);
    }

    #[test]
    fn device_errors_and_timeouts_have_defined_results() {
        let mut slow = FakeSlow::default();
        slow.answers.push_back(Ok(CompletionRecord {
            seq: 1,
            data: 5,
            vcpu: 0,
            status: 2,
            reserved: 0,
        }));
        slow.answers
            .push_back(Err(SlowPathError::Timeout(std::time::Duration::from_secs(
                2,
            ))));
        let (mut h, _, _) = handler(slow);
        let mut d = [0u8; 1];
        assert_eq!(
            h.handle(VmExit::IoIn {
                port: 0x3f8,
                data: &mut d
            }),
            Action::Continue
        );
        assert_eq!(d, [0xff], "a device error reads as all-ones");
        let a = h.handle(VmExit::IoIn {
            port: 0x3f8,
            data: &mut d,
        });
        assert!(
            matches!(a, Action::Fail(ref m) if m.contains("com1")),
            "{a:?}"
        );
        assert_eq!(h.stats().get(Stat::SlowPathError), 2);
    }

    #[test]
    fn vm_level_exits_map_to_bhyve_outcomes() {
        let (mut h, _, eoi) = handler(FakeSlow::default());
        assert_eq!(
            h.handle(VmExit::Shutdown),
            Action::Stop(VmRequest::TripleFault)
        );
        assert_eq!(h.handle(VmExit::Hlt), Action::Stop(VmRequest::Halt));
        assert_eq!(
            h.handle(VmExit::SystemEvent { reset: true }),
            Action::Stop(VmRequest::Reset)
        );
        assert_eq!(
            h.handle(VmExit::IoapicEoi { vector: 0x31 }),
            Action::Continue
        );
        assert_eq!(eoi.0.load(Ordering::Relaxed), 0x31);
        assert!(matches!(
            h.handle(VmExit::FailEntry { reason: 7 }),
            Action::Fail(_)
        ));
        assert!(matches!(
            h.handle(VmExit::InternalError { suberror: 1 }),
            Action::Fail(_)
        ));
        assert!(matches!(
            h.handle(VmExit::Other { reason: 99 }),
            Action::Fail(_)
        ));
        // A request made by any device stops the VM at the next exit.
        h.platform.requests.request(VmRequest::PowerOff);
        assert_eq!(
            h.handle(VmExit::IoOut {
                port: 0x42,
                data: &[1]
            }),
            Action::Stop(VmRequest::PowerOff)
        );
    }

    #[test]
    fn ordered_writes_wait_for_their_completion() {
        let slow = FakeSlow::default();
        let posted = slow.posted.clone();
        let (mut h, _, _) = handler(slow);
        let mut bus = Bus::new();
        bus.insert(
            Space::Mmio,
            0xc000_0000,
            0x1000,
            DeviceId(1),
            Stage::SlowOrdered,
        )
        .unwrap();
        Arc::get_mut(&mut h.platform).unwrap().bus = bus;
        h.handle(VmExit::MmioWrite {
            addr: 0xc000_0014,
            data: &[1],
        });
        let r = posted.lock().unwrap()[0].decode().unwrap();
        assert!(r.needs_completion(), "an ordered write is waited for");
        assert_eq!((r.kind, r.offset), (ExitKind::MmioWrite, 0x14));
        assert_eq!(h.stats().get(Stat::SlowWaited), 1);
        assert_eq!(h.stats().get(Stat::SlowPosted), 0);
    }

    #[test]
    fn coalesced_writes_are_applied_in_order_before_the_exit_that_follows() {
        use crate::coalesced::{CoalescedRing, CoalescedWrite};
        let (mut h, fast, _) = handler(FakeSlow::default());
        let ring = CoalescedRing::simulated(4096);
        let w = |port: u64, v: u8| CoalescedWrite {
            pio: true,
            addr: port,
            len: 1,
            data: [v, 0, 0, 0, 0, 0, 0, 0],
        };
        // Reg stores value + offset: the last write wins, so order shows.
        assert!(ring.push(w(0x41, 5)));
        assert!(ring.push(w(0x40, 9)));
        assert!(ring.push(w(0x9000, 1))); // nobody's: dropped and counted
        h.platform.coalesced.set(ring).unwrap();
        let mut d = [0u8; 1];
        h.handle(VmExit::IoIn {
            port: 0x40,
            data: &mut d,
        });
        assert_eq!(d, [9], "the read saw both writes, in order");
        assert_eq!(h.stats().get(Stat::CoalescedWrite), 2);
        assert_eq!(h.stats().get(Stat::UnclaimedWrite), 1);
        assert_eq!(h.stats().get(Stat::FastStage), 1, "one exit, the read");
        assert!(h.platform.coalesced.get().unwrap().is_empty());
        // Draining on its own (kick, pause, stop) applies what came since.
        h.platform.coalesced.get().unwrap().push(w(0x40, 3));
        h.drain_coalesced();
        assert_eq!(fast.lock().unwrap().0, 3);
    }

    #[test]
    fn a_full_ring_is_counted() {
        let slow = FakeSlow {
            full: true,
            ..FakeSlow::default()
        };
        let (mut h, _, _) = handler(slow);
        h.handle(VmExit::IoOut {
            port: 0x3f8,
            data: &[1],
        });
        assert_eq!(h.stats().get(Stat::RingFull), 1);
    }
}
