//! loom models of every lock-free structure. Run with `RUSTFLAGS="--cfg loom" cargo test -p loom-tests --release`.
//!
//! The models live in `tests/`; this library holds what they share: the model bounds and
//! record constructors. See `README.md` for the bounds, run times, and how to watch a model
//! fail when an ordering is weakened.

#[cfg(loom)]
pub use model::*;

#[cfg(loom)]
mod model {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Instant;

    use pipeline::{CompletionRecord, ExitFlags, ExitKind, ExitRecord, Producer, Record};

    /// Default preemption bound: every interleaving with at most this many preemptions is
    /// explored. `LOOM_MAX_PREEMPTIONS` overrides it (for a deeper, slower run).
    pub const PREEMPTION_BOUND: usize = 5;

    /// A model builder with our bounds.
    #[must_use]
    pub fn builder() -> loom::model::Builder {
        let mut b = loom::model::Builder::new();
        if b.preemption_bound.is_none() {
            b.preemption_bound = Some(PREEMPTION_BOUND);
        }
        b
    }

    /// Explore `f` under our bounds and print how many executions that took, and how long
    /// (shown with `--nocapture`; the figures in README.md come from here).
    pub fn check<F>(name: &str, f: F)
    where
        F: Fn() + Sync + Send + 'static,
    {
        let runs = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&runs);
        let b = builder();
        let bound = b.preemption_bound;
        let start = Instant::now();
        b.check(move || {
            counter.fetch_add(1, Ordering::Relaxed);
            f();
        });
        println!(
            "loom model {name}: {} executions, preemption bound {bound:?}, {:.2?}",
            runs.load(Ordering::Relaxed),
            start.elapsed()
        );
    }

    /// A posted write whose payload is derived from `seq`, so a torn or stale slot shows.
    #[must_use]
    pub fn write(seq: u64) -> ExitRecord {
        ExitRecord {
            seq,
            addr: 0x3f8,
            offset: 0,
            data: seq.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            vcpu: 0,
            device: 1,
            kind: ExitKind::PioWrite.into(),
            size: 1,
            flags: ExitFlags::POSTED.bits(),
            reserved: 0,
        }
    }

    /// A read that needs a completion.
    #[must_use]
    pub fn read(seq: u64) -> ExitRecord {
        ExitRecord {
            kind: ExitKind::MmioRead.into(),
            data: 0,
            addr: 0xfee0_0000 + seq,
            flags: ExitFlags::NEEDS_COMPLETION.bits(),
            ..write(seq)
        }
    }

    /// The completion a device would send for `r`.
    #[must_use]
    pub fn answer(r: &ExitRecord) -> CompletionRecord {
        CompletionRecord {
            seq: r.seq,
            data: r.addr ^ 0xff,
            vcpu: r.vcpu,
            status: 0,
            reserved: 0,
        }
    }

    /// Push, yielding to the model while the ring is full.
    pub fn push<T: Record>(p: &mut Producer<T>, mut r: T) {
        loop {
            match p.try_push(r) {
                Ok(()) => return,
                Err(back) => {
                    r = back;
                    loom::thread::yield_now();
                }
            }
        }
    }
}
