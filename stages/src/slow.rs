//! The device-model side: drains one exit ring, runs the slow-stage device models, posts completions.
//!
//! One consumer per ring (design §2). Records come from the vCPU half, which in the two-process layout
//! is another process: every record is decoded and checked (kind, size, flags, device id) before it
//! reaches a device, and a bad record is answered with an error status (reads) or dropped (writes),
//! counted, never trusted.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pipeline::{
    CompletionRecord, Consumer, ExitKind, ExitRecord, Producer, RingError, WaitOutcome,
};

use crate::platform::BusDevice;

/// Completion status: the device handled the access.
pub const STATUS_OK: u32 = 0;
/// Completion status: the record did not decode (bad kind, size or flags).
pub const STATUS_BAD_RECORD: u32 = 1;
/// Completion status: no slow device with that id.
pub const STATUS_NO_DEVICE: u32 = 2;

/// A slow-stage device, shared by the device-model threads (one lock per device).
pub type SlowDevice = Arc<Mutex<dyn BusDevice>>;

/// Counters of one device-model thread.
#[derive(Debug, Default)]
pub struct SlowStats {
    /// Records processed.
    pub records: AtomicU64,
    /// Completions posted.
    pub completions: AtomicU64,
    /// Records refused (did not decode, or named no device).
    pub bad_records: AtomicU64,
    /// Times the thread parked waiting for records.
    pub parks: AtomicU64,
}

/// The slow-stage device table and the serve loop.
pub struct SlowSide {
    devices: Vec<Option<SlowDevice>>,
    /// Counters, readable while the loop runs.
    pub stats: Arc<SlowStats>,
}

impl std::fmt::Debug for SlowSide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlowSide")
            .field("devices", &self.devices.len())
            .finish()
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SlowSide {
    /// A device-model side over `devices`, indexed by device id.
    pub fn new(devices: Vec<Option<SlowDevice>>) -> Self {
        Self {
            devices,
            stats: Arc::new(SlowStats::default()),
        }
    }

    /// Runs one record; returns the completion to post, if the record asks for one.
    pub fn process(&self, rec: &ExitRecord) -> Option<CompletionRecord> {
        self.stats.records.fetch_add(1, Ordering::Relaxed);
        let fail = |status| {
            // Answer a read that did not decode (the vCPU may be waiting on it); drop anything else.
            (rec.flags & 2 != 0).then_some(CompletionRecord {
                seq: rec.seq,
                data: u64::MAX,
                vcpu: rec.vcpu,
                status,
                reserved: 0,
            })
        };
        let exit = match rec.decode() {
            Ok(e) => e,
            Err(_) => {
                self.stats.bad_records.fetch_add(1, Ordering::Relaxed);
                return fail(STATUS_BAD_RECORD);
            }
        };
        let Some(dev) = self
            .devices
            .get(usize::from(exit.device))
            .and_then(|d| d.as_ref())
        else {
            self.stats.bad_records.fetch_add(1, Ordering::Relaxed);
            return fail(STATUS_NO_DEVICE);
        };
        let n = exit.size.bytes();
        let mut buf = [0xffu8; 8];
        match exit.kind {
            ExitKind::PioWrite | ExitKind::MmioWrite => {
                let bytes = exit.data.to_le_bytes();
                lock(dev).write(exit.offset, &bytes[..n]);
            }
            ExitKind::PioRead | ExitKind::MmioRead => {
                lock(dev).read(exit.offset, &mut buf[..n]);
            }
        }
        exit.needs_completion().then(|| {
            // Only the access width travels back; the bytes above it are zero.
            let mut data = [0u8; 8];
            data[..n].copy_from_slice(&buf[..n]);
            CompletionRecord {
                seq: exit.seq,
                data: u64::from_le_bytes(data),
                vcpu: exit.vcpu,
                status: STATUS_OK,
                reserved: 0,
            }
        })
    }

    /// Serves one exit ring until `stop` is set or the ring is found corrupt. `spin` is how long to
    /// spin for records before parking (the waited-read latency depends on it).
    pub fn serve(
        &self,
        exits: &mut Consumer<ExitRecord>,
        completions: &mut Producer<CompletionRecord>,
        stop: &AtomicBool,
        spin: Duration,
    ) -> Result<(), RingError> {
        let mut batch = [ExitRecord::default(); 32];
        while !stop.load(Ordering::Acquire) {
            // The timeout only bounds how late a stop is seen if nothing wakes this thread (the
            // vCPU side letting go of the ring does): an idle thread wakes once a second.
            match exits.wait_for_records(spin, Duration::from_secs(1))? {
                // The vCPU side let go of the ring (its vCPU stopped): drain and end.
                WaitOutcome::TimedOut if exits.producer_gone() => break,
                WaitOutcome::TimedOut => continue,
                WaitOutcome::Ready { parked } => {
                    if parked {
                        self.stats.parks.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            self.drain(exits, completions, stop, &mut batch)?;
        }
        // The vCPU has stopped (its producer is gone, or the machine set `stop` after joining the
        // vCPUs): whatever it posted before stopping still runs, so a guest's last UART bytes
        // before a debug exit or a power-off are not lost.
        self.drain(exits, completions, stop, &mut batch)
    }

    fn drain(
        &self,
        exits: &mut Consumer<ExitRecord>,
        completions: &mut Producer<CompletionRecord>,
        stop: &AtomicBool,
        batch: &mut [ExitRecord],
    ) -> Result<(), RingError> {
        loop {
            let n = exits.pop_batch(batch)?;
            if n == 0 {
                return Ok(());
            }
            for rec in batch.iter().take(n) {
                if let Some(c) = self.process(rec) {
                    self.push_completion(completions, c, stop);
                }
            }
        }
    }

    fn push_completion(
        &self,
        completions: &mut Producer<CompletionRecord>,
        c: CompletionRecord,
        stop: &AtomicBool,
    ) {
        // A vCPU has at most one read outstanding, so the ring has room; if a hostile or stuck peer
        // never drains it, give up when the VM stops rather than spin forever.
        let mut c = c;
        loop {
            match completions.try_push(c) {
                Ok(()) => {
                    self.stats.completions.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Err(back) => {
                    if stop.load(Ordering::Acquire) {
                        return;
                    }
                    c = back;
                    std::thread::yield_now();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::misc::Scratch;

    fn side() -> SlowSide {
        let dev: SlowDevice = Arc::new(Mutex::new(Scratch::default()));
        SlowSide::new(vec![None, Some(dev)])
    }

    fn rec(
        kind: ExitKind,
        size: u8,
        flags: u32,
        device: u16,
        offset: u64,
        data: u64,
    ) -> ExitRecord {
        ExitRecord {
            seq: 5,
            addr: 0x500 + offset,
            offset,
            data,
            vcpu: 0,
            device,
            kind: kind as u8,
            size,
            flags,
            reserved: 0,
        }
    }

    #[test]
    fn writes_are_applied_and_reads_answered() {
        let s = side();
        assert_eq!(
            s.process(&rec(ExitKind::PioWrite, 4, 1, 1, 0, 0x1234)),
            None
        );
        let c = s.process(&rec(ExitKind::PioRead, 2, 2, 1, 0, 0)).unwrap();
        assert_eq!((c.seq, c.status, c.data), (5, STATUS_OK, 0x1234));
        let c = s.process(&rec(ExitKind::PioRead, 4, 2, 1, 4, 0)).unwrap();
        assert_eq!(c.data, 1, "one write counted");
        // An ordered write (NEEDS_COMPLETION) is applied and answered.
        let c = s.process(&rec(ExitKind::PioWrite, 4, 2, 1, 0, 9)).unwrap();
        assert_eq!(c.status, STATUS_OK);
        let c = s.process(&rec(ExitKind::PioRead, 4, 2, 1, 4, 0)).unwrap();
        assert_eq!(c.data, 2);
    }

    #[test]
    fn hostile_records_are_refused_not_trusted() {
        let s = side();
        // Unknown device: the waiting read gets an error, not a hang.
        let c = s.process(&rec(ExitKind::PioRead, 4, 2, 9, 0, 0)).unwrap();
        assert_eq!(c.status, STATUS_NO_DEVICE);
        // Bad size, bad kind, bad flags.
        let c = s.process(&rec(ExitKind::PioRead, 3, 2, 1, 0, 0)).unwrap();
        assert_eq!(c.status, STATUS_BAD_RECORD);
        let mut r = rec(ExitKind::PioRead, 4, 2, 1, 0, 0);
        r.kind = 99;
        assert_eq!(s.process(&r).unwrap().status, STATUS_BAD_RECORD);
        assert_eq!(s.process(&rec(ExitKind::PioWrite, 4, 0x80, 1, 0, 0)), None);
        assert_eq!(s.stats.bad_records.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn serve_loop_round_trip_and_stop() {
        let s = Arc::new(side());
        let (mut ep, mut ec) = pipeline::channel::<ExitRecord>(64);
        let (mut cp, mut cc) = pipeline::channel::<CompletionRecord>(64);
        let stop = Arc::new(AtomicBool::new(false));
        let (s2, stop2) = (s.clone(), stop.clone());
        let t = std::thread::spawn(move || {
            s2.serve(&mut ec, &mut cp, &stop2, Duration::from_micros(50))
        });
        for i in 0..1000u64 {
            let mut r = rec(ExitKind::PioWrite, 4, 1, 1, 0, i);
            r.seq = i + 1;
            while ep.try_push(r).is_err() {
                std::thread::yield_now();
            }
        }
        let mut r = rec(ExitKind::PioRead, 4, 2, 1, 4, 0);
        r.seq = 1001;
        ep.try_push(r).unwrap();
        let c = cc
            .wait_completion(1001, Duration::from_micros(50), Duration::from_secs(5))
            .unwrap();
        assert_eq!(c.data, 1000, "every posted write arrived before the read");
        stop.store(true, Ordering::Release);
        t.join().unwrap().unwrap();
    }

    #[test]
    fn records_posted_before_stop_are_still_run() {
        let s = side();
        let (mut ep, mut ec) = pipeline::channel::<ExitRecord>(64);
        let (mut cp, _cc) = pipeline::channel::<CompletionRecord>(64);
        for i in 0..10u64 {
            let mut r = rec(ExitKind::PioWrite, 4, 1, 1, 0, i);
            r.seq = i + 1;
            ep.try_push(r).unwrap();
        }
        // Stop is already set: the loop body never runs, the final drain must.
        let stop = AtomicBool::new(true);
        s.serve(&mut ec, &mut cp, &stop, Duration::ZERO).unwrap();
        let c = s.process(&rec(ExitKind::PioRead, 4, 2, 1, 4, 0)).unwrap();
        assert_eq!(c.data, 10);
    }
}
