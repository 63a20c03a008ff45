//! The asymmetric barrier of the wake-up protocol: `membarrier(2)`.
//!
//! The protocol (see [`crate::ring`]) is Dekker's pattern: the consumer stores its "sleeping"
//! flag then loads the producer's index; the producer stores its index then loads the flag.
//! Each side needs a store→load barrier between the two. A `SeqCst` fence on the producer side
//! costs a cross-core round trip on *every* publish on x86 (it waits for the store buffer to
//! drain, including the tail line the consumer keeps reading): measured here it cut single-push
//! throughput about fourfold. But the consumer goes to sleep rarely (only after spinning idle
//! for its budget), so the cost can be moved there:
//!
//! - a producer whose process is registered for `MEMBARRIER_CMD_GLOBAL_EXPEDITED` ("light"
//!   mode, recorded in the ring header) publishes with only a compiler fence between its index
//!   store and its flag load;
//! - a consumer about to sleep on a light producer's ring calls
//!   `membarrier(MEMBARRIER_CMD_GLOBAL_EXPEDITED)` after storing its flag and before re-reading
//!   the index. The kernel makes every running thread of every registered process pass a full
//!   memory barrier before the call returns (threads not running pass one when switched out).
//!   Wherever that barrier fell in the producer's program, either its index store was before it
//!   (then visible to the consumer's re-read) or its flag load was after it (then it sees the
//!   flag, which the consumer stored before the call). The same reasoning liburcu and folly's
//!   `asymmetricHeavyBarrier` rest on.
//!
//! If registration fails (seccomp, an old kernel, no `std`) the producer stays in "fenced" mode
//! (a `SeqCst` fence per publish). If the consumer's own `membarrier` call fails on a light
//! ring, it cannot rule out a missed wake-up, so it parks for at most
//! [`crate::Waiter::FALLBACK_PARK`] at a time and counts it
//! ([`crate::Consumer::fallback_parks`]).
//!
//! Under `cfg(loom)` the producer always fences: loom cannot model an inter-processor barrier,
//! so the models check the protocol with the barrier represented by the fence it is equivalent
//! to at that point of the producer's program.

/// Producer mode stored in the ring header: a `SeqCst` fence after every publish.
pub(crate) const FENCED: u32 = 0;
/// Producer mode stored in the ring header: compiler fence only; sleepers call `membarrier`.
pub(crate) const LIGHT: u32 = 1;

#[cfg(all(feature = "std", not(loom)))]
mod imp {
    use core::sync::atomic::{AtomicU8, Ordering};

    const MEMBARRIER_CMD_GLOBAL_EXPEDITED: libc::c_int = 1 << 1;
    const MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED: libc::c_int = 1 << 2;

    const UNKNOWN: u8 = 0;
    const REGISTERED: u8 = 1;
    const UNAVAILABLE: u8 = 2;
    /// Another thread is registering (the syscall can take milliseconds).
    const REGISTERING: u8 = 3;

    /// Whether this process is registered, decided once.
    static STATE: AtomicU8 = AtomicU8::new(UNKNOWN);

    #[cfg(test)]
    std::thread_local! {
        /// Unit tests make this thread's barrier fail, to exercise the fallback.
        pub(crate) static FAIL_BARRIER_FOR_TEST: core::cell::Cell<bool> =
            const { core::cell::Cell::new(false) };
    }

    fn membarrier(cmd: libc::c_int) -> bool {
        // SAFETY: membarrier takes no pointers; an unsupported command fails with an error.
        let rc = unsafe { libc::syscall(libc::SYS_membarrier, cmd, 0u32, 0 as libc::c_int) };
        rc == 0
    }

    /// Register this process so that consumers' barriers reach its threads. True if the
    /// producer may run in light mode.
    pub(crate) fn register_producer() -> bool {
        // Only the first caller registers; one that comes while the registration is still in
        // flight does not wait for it: its rings fence every publish (always correct), and rings
        // made after the registration run light.
        match STATE.compare_exchange(UNKNOWN, REGISTERING, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => {
                let ok = membarrier(MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED);
                STATE.store(if ok { REGISTERED } else { UNAVAILABLE }, Ordering::Release);
                ok
            }
            Err(REGISTERED) => true,
            Err(_) => false,
        }
    }

    /// Decide, before any ring is made, that this process's producers fence every publish and
    /// never register (the registration can take milliseconds and holds up process exit).
    pub(crate) fn fence_only() {
        let _ = STATE.compare_exchange(UNKNOWN, UNAVAILABLE, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Make every running thread of every registered process pass a full barrier.
    pub(crate) fn heavy_barrier() -> bool {
        #[cfg(test)]
        if FAIL_BARRIER_FOR_TEST.get() {
            return false;
        }
        membarrier(MEMBARRIER_CMD_GLOBAL_EXPEDITED)
    }
}

#[cfg(not(all(feature = "std", not(loom))))]
mod imp {
    /// Nothing to decide without the OS: producers fence.
    pub(crate) fn fence_only() {}

    /// Without the OS (no_std) there is no `membarrier`: producers fence. Under loom the
    /// producer fences too (see the module docs), so the mode is irrelevant there.
    pub(crate) fn register_producer() -> bool {
        cfg!(loom)
    }

    /// Under loom the producer's own fence stands for this barrier.
    #[cfg_attr(not(loom), allow(dead_code, reason = "no waiting without std"))]
    pub(crate) fn heavy_barrier() -> bool {
        true
    }
}

pub(crate) use imp::*;
