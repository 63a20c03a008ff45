//! Spin-then-park waiting: the consumer half of the "needs wake-up" protocol.
//!
//! Facts of our hosts (design brief §3): a cross-core spin hand-off costs about 66 ns round
//! trip, a futex wake-up of a sleeping thread 40–60 µs. So a waiter first spins (the common
//! case: the peer is awake and answers within a few microseconds) and parks only when the spin
//! budget is spent. The default budget, [`Waiter::DEFAULT_SPIN`] = 50 µs, is about the cost of
//! one futex round trip: by the ski-rental argument that caps the worst case at twice the
//! optimum, while a peer that answers within the budget never costs a syscall.
//!
//! Every park is bounded: by the caller's overall timeout and by [`Waiter::PARK_SLICE`], so a peer
//! that clears the flag without waking us (a hostile process can) costs at most one slice.
//!
//! The protocol itself (flag, fence, re-check, sleep; and publish, fence, check flag, wake) is
//! described on [`crate::ring`].

use core::time::Duration;

use crate::sync::{AtomicU32, Ordering};

/// Value of the wake word while the consumer is running.
pub(crate) const AWAKE: u32 = 0;
/// Value of the wake word once the consumer has decided it may sleep.
#[cfg_attr(
    not(any(feature = "std", loom)),
    allow(dead_code, reason = "no waiting without std")
)]
pub(crate) const SLEEPING: u32 = 1;

/// How long to spin before parking, and how long to wait in all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Waiter {
    /// Spin budget, counted from the start of the wait. Zero parks at once.
    pub spin: Duration,
    /// Overall bound on the wait (spin included). Zero checks once and gives up.
    pub timeout: Duration,
}

impl Waiter {
    /// Default spin budget: about one futex wake-up round trip on our hosts (40–60 µs).
    pub const DEFAULT_SPIN: Duration = Duration::from_micros(50);
    /// Default overall timeout: a device model that takes a second to answer is broken.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
    /// The longest single park; the waiter re-checks the ring after each, so a peer that
    /// clears the wake flag without waking us costs at most this much.
    /// (1 s: an idle bhyve device-model thread, whose own timeout is as long, wakes once a
    /// second; with 100 ms it woke 10 times, with 10 ms 100 times. Nothing of ours relies on the
    /// re-check: a producer that publishes, or lets go of the ring, wakes a parked consumer.)
    pub const PARK_SLICE: Duration = Duration::from_secs(1);
    /// The longest single park when this process cannot issue the `membarrier` a light
    /// producer relies on (see [`crate::Consumer::fallback_parks`]).
    pub const FALLBACK_PARK: Duration = Duration::from_millis(1);

    /// A waiter with the given budgets.
    #[must_use]
    pub const fn new(spin: Duration, timeout: Duration) -> Self {
        Self { spin, timeout }
    }
}

impl Default for Waiter {
    fn default() -> Self {
        Self::new(Self::DEFAULT_SPIN, Self::DEFAULT_TIMEOUT)
    }
}

/// What [`crate::Consumer::wait_for_records`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitOutcome {
    /// Records are available. `parked` tells whether the consumer had to sleep for them.
    Ready {
        /// True if the consumer parked at least once (and so a producer paid a wake-up).
        parked: bool,
    },
    /// The timeout passed with the ring still empty.
    TimedOut,
}

/// The futex word in the ring header, plus (under loom) the model of the kernel's futex.
#[repr(C)]
pub(crate) struct WakeWord {
    /// [`AWAKE`] or [`SLEEPING`]. Written by the consumer before it sleeps and by the producer
    /// (swap to `AWAKE`) when it decides to wake it.
    pub(crate) word: AtomicU32,
    #[cfg(loom)]
    parker: crate::sync::Parker,
}

impl WakeWord {
    pub(crate) fn new() -> Self {
        Self {
            word: AtomicU32::new(AWAKE),
            #[cfg(loom)]
            parker: crate::sync::Parker::new(),
        }
    }

    /// Sleep while the word is [`SLEEPING`], for at most `timeout` (under loom: until woken).
    /// True if the sleep ended because the timeout expired (not a wake-up or a changed word).
    #[cfg(any(feature = "std", loom))]
    pub(crate) fn sleep(&self, timeout: Duration) -> bool {
        #[cfg(loom)]
        {
            let _ = timeout;
            self.parker.wait(&self.word, SLEEPING);
            false
        }
        #[cfg(not(loom))]
        futex::wait(&self.word, SLEEPING, timeout)
    }

    /// Wake the consumer if it sleeps on this word.
    pub(crate) fn wake(&self) {
        #[cfg(loom)]
        self.parker.wake();
        #[cfg(all(feature = "std", not(loom)))]
        futex::wake(&self.word);
        // Without std (and outside loom) there is no way to sleep, so nobody to wake.
    }

    /// The consumer's write of the word (only on the slow path: before and after sleeping).
    ///
    /// An RMW rather than a plain store. On hardware either is correct: the ordering comes
    /// from the `SeqCst` fences of the protocol. But the RMW also reads the newest value, so
    /// the write is ordered after the producer's last `swap(AWAKE)` even in a model that keeps
    /// modification order as vector clocks: with a plain store, loom (0.7) treats the two as
    /// concurrent and reports a lost wake-up that C++20's fence rules exclude (seen at
    /// preemption bound 4; see loom-tests/README.md).
    #[cfg_attr(
        not(any(feature = "std", loom)),
        allow(dead_code, reason = "no waiting without std")
    )]
    pub(crate) fn set(&self, value: u32) {
        self.word.swap(value, Ordering::Relaxed);
    }
}

/// Shared (not `FUTEX_PRIVATE_FLAG`) futex calls, so a sleeper in one process is woken by a
/// producer in another that maps the same memfd.
#[cfg(all(feature = "std", not(loom)))]
mod futex {
    use core::time::Duration;

    use crate::sync::AtomicU32;

    /// `FUTEX_WAIT` with a relative timeout. Returns on wake-up, timeout, signal, or at once if
    /// the word no longer holds `expected`; the caller re-checks in every case. True if the
    /// timeout expired.
    pub(super) fn wait(word: &AtomicU32, expected: u32, timeout: Duration) -> bool {
        let ts = libc::timespec {
            tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
            tv_nsec: libc::c_long::from(timeout.subsec_nanos()),
        };
        // SAFETY: `word` is a live, aligned 32-bit atomic for the duration of the call (the
        // kernel only reads it) and `ts` outlives the call; the remaining arguments are unused
        // by FUTEX_WAIT. Whatever the result (0, EAGAIN, ETIMEDOUT, EINTR) the caller re-checks
        // the ring; only ETIMEDOUT is reported, for the late-wake-up counter.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_futex,
                word.as_ptr(),
                libc::FUTEX_WAIT,
                expected,
                core::ptr::from_ref(&ts),
                core::ptr::null::<u32>(),
                0u32,
            )
        };
        rc != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ETIMEDOUT)
    }

    /// `FUTEX_WAKE` one waiter (a ring has one consumer).
    pub(super) fn wake(word: &AtomicU32) {
        // SAFETY: `word` is a live, aligned 32-bit atomic; FUTEX_WAKE does not dereference the
        // other arguments.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                word.as_ptr(),
                libc::FUTEX_WAKE,
                1u32,
                core::ptr::null::<libc::timespec>(),
                core::ptr::null::<u32>(),
                0u32,
            );
        }
    }
}

/// Elapsed time since the start of a wait. Under loom time does not pass: spins are counted
/// and parks last until a wake-up, so the model explores a deterministic state space.
#[cfg(any(feature = "std", loom))]
pub(crate) struct Clock {
    #[cfg(not(loom))]
    start: std::time::Instant,
    /// Spin time after which the spinner next yields its CPU.
    #[cfg(not(loom))]
    next_yield: Duration,
    spins: u32,
}

#[cfg(any(feature = "std", loom))]
impl Clock {
    /// How many spin iterations pass between two reads of the clock (a read costs ~20 ns).
    #[cfg(not(loom))]
    const CHECK_EVERY: u32 = 64;
    /// A spinner yields its CPU once it has spun this long, and again every [`Clock::YIELD_EVERY`]
    /// (see `keep_spinning`).
    #[cfg(not(loom))]
    const YIELD_AFTER: Duration = Duration::from_micros(5);
    #[cfg(not(loom))]
    const YIELD_EVERY: Duration = Duration::from_micros(20);
    /// Spin iterations per wait in a loom model (each is a yield point).
    #[cfg(loom)]
    const LOOM_SPINS: u32 = 1;

    /// A clock for a wait that never yields its CPU while it spins (a vCPU waiting for its
    /// completion: the CPU is the guest's, and a yield could hand it to another thread just before
    /// the answer comes).
    pub(crate) fn start() -> Self {
        Self {
            #[cfg(not(loom))]
            start: std::time::Instant::now(),
            #[cfg(not(loom))]
            next_yield: Duration::MAX,
            spins: 0,
        }
    }

    /// A clock for a wait that yields its CPU now and then while it spins (see `keep_spinning`):
    /// a consumer waiting for records that may not come for a while.
    pub(crate) fn start_yielding() -> Self {
        Self {
            #[cfg(not(loom))]
            next_yield: Self::YIELD_AFTER,
            ..Self::start()
        }
    }

    /// True while the spin budget `spin` is not spent. Call once per spin iteration.
    ///
    /// With [`Clock::start_yielding`], past [`Clock::YIELD_AFTER`] the spinner also yields its CPU, once every
    /// [`Clock::YIELD_EVERY`]: a thread spinning for work that has not come for a while must not
    /// hold a CPU another runnable thread wants. Measured on our 2-CPU hosts (2026-11-25): with
    /// the vCPU on one CPU and the device-model thread spinning on the other, the process reading
    /// the guest's console waited for a CPU, and half the runs of the `hello` guest showed its
    /// first byte 1.5 ms late. A `sched_yield` with nothing else runnable returns at once, but
    /// not for free: yielding at every clock read (every ~2 µs) cost a waited read ~300 ns (median
    /// of 12 paired runs of the exits bench), as a record often arrived mid-yield.
    #[inline]
    pub(crate) fn keep_spinning(&mut self, spin: Duration) -> bool {
        if spin.is_zero() {
            return false;
        }
        self.spins = self.spins.wrapping_add(1);
        #[cfg(loom)]
        {
            self.spins <= Self::LOOM_SPINS
        }
        #[cfg(not(loom))]
        {
            if self.spins % Self::CHECK_EVERY != 0 {
                return true;
            }
            let spent = self.start.elapsed();
            if spent >= spin {
                return false;
            }
            if spent >= self.next_yield {
                std::thread::yield_now();
                self.next_yield = spent + Self::YIELD_EVERY;
            }
            true
        }
    }

    /// Time left before `timeout` expires, or `None` once it has (never, under loom, for a
    /// non-zero timeout). Each park is further capped at [`Waiter::PARK_SLICE`].
    pub(crate) fn park_budget(&self, timeout: Duration) -> Option<Duration> {
        #[cfg(loom)]
        let left = Some(timeout).filter(|t| !t.is_zero());
        #[cfg(not(loom))]
        let left = timeout
            .checked_sub(self.start.elapsed())
            .filter(|t| !t.is_zero());
        left.map(|t| t.min(Waiter::PARK_SLICE))
    }
}
