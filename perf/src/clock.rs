//! A cycle-counter clock for the exit path: `rdtsc`, calibrated once against [`Instant`].
//!
//! # Why the TSC, and when not
//!
//! One exit costs about 8.6 µs here; the instrumentation may take a few tens of nanoseconds of it.
//! `Instant::now()` (the vDSO `clock_gettime`) measured about 22 ns per call on our hosts, a bare
//! `rdtsc` about 10 ns (see `docs/perf-instrumentation.md`), and an exit takes two or three of
//! them. The TSC is used only when it is *invariant*: CPUID leaf `0x8000_0007`, EDX bit 8 (Intel
//! and AMD both define it; Linux shows it as `constant_tsc nonstop_tsc` in `/proc/cpuinfo`), which
//! means it ticks at a constant rate in every P-, C- and T-state and can be compared across
//! cores. Otherwise (or off x86-64) the clock falls back to `Instant`, and a "tick" is one
//! nanosecond since the clock's origin. [`Clock::source`] says which one is in use.
//!
//! # Ordering (`lfence`)
//!
//! `rdtsc` is not serialising: the CPU may execute it before earlier instructions finish, and
//! start later ones before it. [`Clock::now`] is the bare `rdtsc`: the skew is a few tens of
//! cycles, far below the microsecond scale of an exit, and the timestamps the exit path takes sit
//! next to a system call (`KVM_RUN`) that orders much more than that anyway. [`Clock::now_ordered`]
//! puts an `lfence` before the `rdtsc`, so that everything before it has completed (Linux makes
//! `lfence` dispatch-serialising on AMD too); use it to time short code sections, as the
//! benchmark does. Calibration uses it.
//!
//! # Calibration
//!
//! [`Clock::new`] brackets one `Instant::now()` between two ordered `rdtsc` reads, waits a
//! calibration window (5 ms by default), brackets another, and divides; each bracket is the
//! narrowest of several tries, so a preemption between the reads cannot skew it. The error is
//! the bracket width over the window: about 50 ns / 5 ms = 1e-5. The resulting rate is kept as a
//! 32.32 fixed-point multiplier, so converting ticks to nanoseconds on the hot path is one
//! multiply and one shift. [`Clock::global`] calibrates once per process, on first use (call it
//! at start-up, off the exit path).

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Where a [`Clock`]'s ticks come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClockSource {
    /// The invariant time-stamp counter (`rdtsc`).
    Tsc,
    /// `Instant` (`CLOCK_MONOTONIC`); one tick is one nanosecond since the clock's origin.
    Monotonic,
}

impl ClockSource {
    /// A short name for reports ("tsc", "monotonic").
    pub fn name(self) -> &'static str {
        match self {
            ClockSource::Tsc => "tsc",
            ClockSource::Monotonic => "monotonic",
        }
    }
}

/// Default calibration window of [`Clock::new`].
pub const CALIBRATION_WINDOW: Duration = Duration::from_millis(5);

/// Fixed-point shift of the ticks-to-nanoseconds multiplier.
const SHIFT: u32 = 32;

/// A calibrated tick clock. `Copy`: each vCPU thread keeps its own copy, no shared cache line.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    source: ClockSource,
    /// Ticks at the origin (the end of calibration).
    origin_ticks: u64,
    /// `Instant` at the origin.
    origin: Instant,
    /// Nanoseconds per tick, 32.32 fixed point.
    mult: u64,
    /// Ticks per nanosecond, for reports.
    ticks_per_ns: f64,
}

/// True if this CPU's TSC is invariant (CPUID 0x8000_0007 EDX bit 8).
pub fn tsc_is_invariant() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use core::arch::x86_64::__cpuid;
        #[allow(
            unused_unsafe,
            reason = "`__cpuid` is safe in current Rust, unsafe in our MSRV (1.85)"
        )]
        // SAFETY: CPUID is available on every x86-64 CPU; leaf 0x8000_0000 is always valid.
        let max_ext = unsafe { __cpuid(0x8000_0000) }.eax;
        if max_ext < 0x8000_0007 {
            return false;
        }
        #[allow(
            unused_unsafe,
            reason = "`__cpuid` is safe in current Rust, unsafe in our MSRV (1.85)"
        )]
        // SAFETY: the leaf is at most the highest extended leaf, checked just above.
        let edx = unsafe { __cpuid(0x8000_0007) }.edx;
        edx & (1 << 8) != 0
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn rdtsc() -> u64 {
    // SAFETY: `rdtsc` has no preconditions on x86-64 (CR4.TSD is clear for Linux user space).
    unsafe { core::arch::x86_64::_rdtsc() }
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn rdtsc_ordered() -> u64 {
    // SAFETY: `lfence` is part of SSE2, which every x86-64 CPU has; it only orders instructions.
    unsafe { core::arch::x86_64::_mm_lfence() };
    rdtsc()
}

#[cfg(not(target_arch = "x86_64"))]
#[inline(always)]
fn rdtsc() -> u64 {
    0
}

#[cfg(not(target_arch = "x86_64"))]
#[inline(always)]
fn rdtsc_ordered() -> u64 {
    0
}

/// Nanoseconds in `d`, saturating at `u64::MAX` (584 years).
#[inline]
pub(crate) fn saturating_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// One `Instant` bracketed by two ordered TSC reads: (midpoint ticks, instant, bracket width).
fn bracket() -> (u64, Instant, u64) {
    let mut best = (0, Instant::now(), u64::MAX);
    for _ in 0..8 {
        let a = rdtsc_ordered();
        let i = Instant::now();
        let b = rdtsc_ordered();
        let width = b.wrapping_sub(a);
        if width < best.2 {
            best = (a.wrapping_add(width / 2), i, width);
        }
    }
    best
}

/// The calibration window of [`Clock::global`].
pub const GLOBAL_WINDOW: Duration = Duration::from_micros(500);

static GLOBAL: OnceLock<Clock> = OnceLock::new();

/// A TSC calibration in progress ([`Clock::start_calibration`]): the first bracket is taken.
#[derive(Debug)]
pub struct Calibration {
    /// (ticks, instant) of the first bracket; `None` when the TSC is not to be used.
    start: Option<(u64, Instant)>,
}

impl Calibration {
    /// Takes the first bracket if `use_tsc` (and the CPU is x86-64).
    fn begin(use_tsc: bool) -> Self {
        Self {
            start: (cfg!(target_arch = "x86_64") && use_tsc).then(|| {
                let (t, i, _) = bracket();
                (t, i)
            }),
        }
    }

    /// The calibrated clock, once at least `window` has passed since the start (it sleeps for
    /// what is left, if anything); the `Instant` clock if the TSC is not invariant or did not
    /// move sanely.
    pub fn finish(self, window: Duration) -> Clock {
        self.finish_tsc(window).unwrap_or_else(Clock::monotonic)
    }

    /// The TSC clock once `window` has passed since the start, or `None` (no TSC to use, or it
    /// did not move sanely).
    fn finish_tsc(self, window: Duration) -> Option<Clock> {
        let (t0, i0) = self.start?;
        let left = window.saturating_sub(i0.elapsed());
        if !left.is_zero() {
            std::thread::sleep(left);
        }
        Clock::tsc_between(t0, i0)
    }
}

impl Clock {
    /// The TSC clock if the TSC is invariant and calibrates sanely, else the `Instant` clock.
    /// Takes about [`CALIBRATION_WINDOW`].
    pub fn new() -> Self {
        Self::with_window(CALIBRATION_WINDOW)
    }

    /// As [`Clock::new`], with a calibration window of `window` (longer is more precise).
    pub fn with_window(window: Duration) -> Self {
        Self::start_calibration().finish(window)
    }

    /// The process-wide clock, calibrated on first use over a [`GLOBAL_WINDOW`] (it sits on a
    /// VM's start-up path: bhyve starts it on a thread of its own at process start, and the VM's
    /// threads wait for it if it is not done; with a bracket of ~50 ns the tick rate is good to
    /// about 1e-4, far below the histograms' 1/16 bucket error).
    pub fn global() -> &'static Clock {
        GLOBAL.get_or_init(|| Clock::with_window(GLOBAL_WINDOW))
    }

    /// As [`Clock::global`], but if it is not set yet, set it from `calibration` (started
    /// earlier with [`Clock::start_calibration`], so other work overlapped its window).
    pub fn global_from(calibration: Calibration) -> &'static Clock {
        GLOBAL.get_or_init(|| calibration.finish(GLOBAL_WINDOW))
    }

    /// Starts a calibration whose window runs while the caller does other work; finish it with
    /// [`Calibration::finish`], which waits only for what is left of the window.
    pub fn start_calibration() -> Calibration {
        Calibration::begin(tsc_is_invariant())
    }

    /// The `Instant` clock (one tick per nanosecond), whatever the CPU offers.
    pub fn monotonic() -> Self {
        Self {
            source: ClockSource::Monotonic,
            origin_ticks: 0,
            origin: Instant::now(),
            mult: 1 << SHIFT,
            ticks_per_ns: 1.0,
        }
    }

    /// The TSC clock calibrated over `window`, or `None` if the TSC did not move sanely (a rate
    /// outside 0.05..20 ticks per nanosecond, i.e. 50 MHz..20 GHz, or a backwards step).
    pub fn calibrate_tsc(window: Duration) -> Option<Self> {
        Calibration::begin(true).finish_tsc(window)
    }

    /// The TSC clock from a bracket taken at (`t0`, `i0`) and one taken now.
    fn tsc_between(t0: u64, i0: Instant) -> Option<Self> {
        let (t1, i1, _) = bracket();
        let ticks = t1.checked_sub(t0)?;
        let ns = saturating_nanos(i1.duration_since(i0));
        if ns == 0 {
            return None;
        }
        let ticks_per_ns = u64_to_f64(ticks) / u64_to_f64(ns);
        if !(0.05..=20.0).contains(&ticks_per_ns) {
            return None;
        }
        // ns per tick in 32.32: (ns << 32) / ticks, in 128 bits so nothing overflows.
        let mult = (u128::from(ns) << SHIFT) / u128::from(ticks);
        Some(Self {
            source: ClockSource::Tsc,
            origin_ticks: t1,
            origin: i1,
            mult: u64::try_from(mult).ok()?,
            ticks_per_ns,
        })
    }

    /// Median cost of one [`Clock::now`] in nanoseconds, over 15 rounds of 1,000 reads.
    fn measure_read_cost(&self) -> f64 {
        const READS: u32 = 1000;
        let mut rounds: Vec<f64> = (0..15)
            .map(|_| {
                let start = Instant::now();
                let mut acc = 0u64;
                for _ in 0..READS {
                    acc = acc.wrapping_add(std::hint::black_box(self.now()));
                }
                std::hint::black_box(acc);
                u64_to_f64(saturating_nanos(start.elapsed())) / f64::from(READS)
            })
            .collect();
        rounds.sort_by(f64::total_cmp);
        rounds.get(rounds.len() / 2).copied().unwrap_or(0.0)
    }

    /// Which counter this clock reads.
    pub fn source(&self) -> ClockSource {
        self.source
    }

    /// Ticks per nanosecond (the TSC frequency in GHz; 1.0 for the `Instant` clock).
    pub fn ticks_per_ns(&self) -> f64 {
        self.ticks_per_ns
    }

    /// The median cost of one [`Clock::now`] on this machine, measured at calibration.
    ///
    /// Measured on first use per clock source (about 15,000 reads, 0.2–0.4 ms: off the start-up
    /// path, since only reports need it).
    pub fn read_cost_ns(&self) -> f64 {
        static TSC: OnceLock<f64> = OnceLock::new();
        static MONOTONIC: OnceLock<f64> = OnceLock::new();
        let cell = match self.source {
            ClockSource::Tsc => &TSC,
            ClockSource::Monotonic => &MONOTONIC,
        };
        *cell.get_or_init(|| self.measure_read_cost())
    }

    /// The current tick count: a bare `rdtsc` (no fence), or nanoseconds since the origin.
    #[inline(always)]
    pub fn now(&self) -> u64 {
        match self.source {
            ClockSource::Tsc => rdtsc(),
            ClockSource::Monotonic => saturating_nanos(self.origin.elapsed()),
        }
    }

    /// As [`Clock::now`], but only after every earlier instruction has completed (`lfence;
    /// rdtsc`). For timing short sections.
    #[inline(always)]
    pub fn now_ordered(&self) -> u64 {
        match self.source {
            ClockSource::Tsc => rdtsc_ordered(),
            ClockSource::Monotonic => saturating_nanos(self.origin.elapsed()),
        }
    }

    /// Converts a tick count (a difference of two [`Clock::now`] values) to nanoseconds.
    #[inline(always)]
    pub fn ticks_to_ns(&self, ticks: u64) -> u64 {
        let ns = (u128::from(ticks) * u128::from(self.mult)) >> SHIFT;
        u64::try_from(ns).unwrap_or(u64::MAX)
    }

    /// Nanoseconds from `start` to `end` (two [`Clock::now`] values); 0 if `end` is earlier.
    #[inline(always)]
    pub fn elapsed_ns(&self, start: u64, end: u64) -> u64 {
        self.ticks_to_ns(end.saturating_sub(start))
    }

    /// Nanoseconds from the clock's origin to the tick value `ticks` (0 before the origin):
    /// the timeline trace exporters use.
    #[inline]
    pub fn since_origin_ns(&self, ticks: u64) -> u64 {
        self.elapsed_ns(self.origin_ticks, ticks)
    }

    /// The `Instant` of the clock's origin (tick value [`Clock::origin_ticks`]).
    pub fn origin(&self) -> Instant {
        self.origin
    }

    /// The tick value at the clock's origin.
    pub fn origin_ticks(&self) -> u64 {
        self.origin_ticks
    }
}

impl Default for Clock {
    fn default() -> Self {
        *Self::global()
    }
}

/// `u64` to `f64` for ratios and reports (exact below 2^53, which covers every count we keep).
#[inline]
pub(crate) fn u64_to_f64(v: u64) -> f64 {
    #[allow(
        clippy::cast_precision_loss,
        reason = "reporting only; exact below 2^53 ns (104 days)"
    )]
    let f = v as f64;
    f
}

/// A non-negative finite `f64` to `u64`, saturating; NaN and negatives give 0.
#[inline]
pub(crate) fn f64_to_u64(v: f64) -> u64 {
    if v.is_nan() || v <= 0.0 {
        0
    } else if v >= 18_446_744_073_709_551_615.0 {
        u64::MAX
    } else {
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "range checked just above"
        )]
        let u = v as u64;
        u
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_track_instant() {
        // A calibration whose window other work overlapped (here a busy loop longer than the
        // window: `finish` then takes the second bracket at once).
        let overlapped = {
            let c = Clock::start_calibration();
            let t = Instant::now();
            while t.elapsed() < Duration::from_millis(25) {
                std::hint::spin_loop();
            }
            c.finish(Duration::from_millis(20))
        };
        for clock in [
            Clock::with_window(Duration::from_millis(20)),
            Clock::start_calibration().finish(Duration::from_millis(20)),
            overlapped,
            Clock::monotonic(),
        ] {
            // Bracket each clock read between two Instants, so a preemption next to a read
            // widens the bounds instead of failing the test.
            let i0a = Instant::now();
            let t0 = clock.now();
            let i0b = Instant::now();
            std::thread::sleep(Duration::from_millis(30));
            let i1a = Instant::now();
            let t1 = clock.now();
            let i1b = Instant::now();
            let lower = saturating_nanos(i1a.duration_since(i0b));
            let upper = saturating_nanos(i1b.duration_since(i0a));
            let ours = clock.elapsed_ns(t0, t1);
            // 1 % for calibration, 1 µs for the reads themselves.
            assert!(
                ours + lower / 100 + 1_000 >= lower && ours <= upper + upper / 100 + 1_000,
                "{:?}: clock says {ours} ns, Instant between {lower} and {upper} ns",
                clock.source()
            );
        }
    }

    #[test]
    fn a_calibration_waits_only_for_what_is_left_of_its_window() {
        let c = Clock::start_calibration();
        std::thread::sleep(Duration::from_millis(300));
        let t = Instant::now();
        let clock = c.finish(Duration::from_millis(250));
        // The window had passed: no sleep (sleeping the window again would take 250 ms).
        assert!(
            t.elapsed() < Duration::from_millis(200),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(clock.source(), Clock::new().source());
    }

    #[test]
    fn source_follows_cpuid() {
        let c = Clock::new();
        if tsc_is_invariant() {
            assert_eq!(c.source(), ClockSource::Tsc);
            assert!(c.ticks_per_ns() > 0.05);
        } else {
            assert_eq!(c.source(), ClockSource::Monotonic);
        }
        assert!(c.read_cost_ns() > 0.0 && c.read_cost_ns() < 1000.0);
    }

    #[test]
    fn conversions_saturate_not_wrap() {
        let c = Clock::monotonic();
        assert_eq!(c.ticks_to_ns(12345), 12345);
        assert_eq!(c.elapsed_ns(10, 5), 0);
        assert_eq!(c.ticks_to_ns(u64::MAX), u64::MAX);
        assert_eq!(f64_to_u64(f64::NAN), 0);
        assert_eq!(f64_to_u64(-3.0), 0);
        assert_eq!(f64_to_u64(1e30), u64::MAX);
        assert_eq!(f64_to_u64(41.9), 41);
    }

    #[test]
    fn origin_is_zero_on_the_timeline() {
        let c = Clock::new();
        assert_eq!(c.since_origin_ns(c.origin_ticks()), 0);
        assert!(c.since_origin_ns(c.now()) < 10_000_000_000);
    }
}
