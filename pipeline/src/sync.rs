//! The one module the ring code takes its concurrency primitives from.
//!
//! Normal builds use `core`'s atomics and a plain `UnsafeCell`; under `cfg(loom)` the same names
//! resolve to `loom`'s checked versions, so `loom-tests/` explores every interleaving and
//! reordering the memory model allows, and flags any slot access that is not ordered by the
//! index protocol (a "causality violation"). Nothing outside this module names `core::sync` or
//! `loom::sync` directly.

/// Not an atomic operation (it only restrains the compiler), so the same under loom.
pub(crate) use core::sync::atomic::compiler_fence;
#[cfg(not(loom))]
pub(crate) use core::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
#[cfg(loom)]
pub(crate) use loom::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

/// The ordering of the producer's publishing store of its index.
///
/// `Release` is what the protocol needs: it orders the slot writes before the index that makes
/// them visible. The test-only feature `broken-ordering` swaps in `Relaxed` under `cfg(loom)`
/// (only there) so the loom models can show that they catch the bug.
#[cfg(not(all(loom, feature = "broken-ordering")))]
pub(crate) const PUBLISH: Ordering = Ordering::Release;
/// Deliberately wrong (test-only, `cfg(loom)` + feature `broken-ordering`): see above.
#[cfg(all(loom, feature = "broken-ordering"))]
pub(crate) const PUBLISH: Ordering = Ordering::Relaxed;

/// Tell the CPU (or, under loom, the scheduler) that this thread is spin-waiting.
#[cfg_attr(
    not(any(feature = "std", loom)),
    allow(dead_code, reason = "no waiting without std")
)]
#[inline(always)]
pub(crate) fn spin_hint() {
    #[cfg(not(loom))]
    core::hint::spin_loop();
    #[cfg(loom)]
    loom::thread::yield_now();
}

/// A slot cell: `core::cell::UnsafeCell` with loom's closure-based access API.
///
/// `repr(transparent)`, so a slice of `UnsafeCell<T>` has the layout of a slice of `T` and the
/// batch paths may copy runs of records with one `copy_nonoverlapping`.
#[cfg(not(loom))]
#[repr(transparent)]
pub(crate) struct UnsafeCell<T>(core::cell::UnsafeCell<T>);

#[cfg(not(loom))]
impl<T> UnsafeCell<T> {
    /// Read access to the cell's contents through a raw pointer.
    #[inline(always)]
    pub(crate) fn with<R>(&self, f: impl FnOnce(*const T) -> R) -> R {
        f(self.0.get())
    }

    /// Write access to the cell's contents through a raw pointer.
    #[inline(always)]
    pub(crate) fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
        f(self.0.get())
    }
}

#[cfg(loom)]
pub(crate) use loom::cell::UnsafeCell;

/// Under loom, a futex is modelled by a mutex and a condition variable: the mutex makes
/// "compare the word, then sleep" atomic with respect to "wake", which is exactly the guarantee
/// the kernel gives `FUTEX_WAIT`/`FUTEX_WAKE` (it checks the word under the hash-bucket lock).
/// The model parks without a timeout, so a lost wake-up shows as a loom deadlock instead of
/// being hidden by a timer.
#[cfg(loom)]
#[derive(Debug)]
pub(crate) struct Parker {
    lock: loom::sync::Mutex<()>,
    cond: loom::sync::Condvar,
}

#[cfg(loom)]
impl Parker {
    pub(crate) fn new() -> Self {
        Self {
            lock: loom::sync::Mutex::new(()),
            cond: loom::sync::Condvar::new(),
        }
    }

    /// `FUTEX_WAIT`: sleep only if `word` still holds `expected`, checked under the lock.
    pub(crate) fn wait(&self, word: &AtomicU32, expected: u32) {
        if let Ok(guard) = self.lock.lock() {
            if word.load(Ordering::Relaxed) == expected {
                drop(self.cond.wait(guard));
            }
        }
    }

    /// `FUTEX_WAKE`.
    pub(crate) fn wake(&self) {
        if let Ok(guard) = self.lock.lock() {
            self.cond.notify_all();
            drop(guard);
        }
    }
}
