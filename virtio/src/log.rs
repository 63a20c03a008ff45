//! Rate-limited logging and the counters every virtio function keeps.
//!
//! A guest can make an error path run a million times a second; it must not make the monitor log a
//! million lines. Every guest-triggerable error path increments a counter in [`VirtioStats`] and
//! logs through a [`Logger`] (at most `burst` lines per period; the rest are counted and reported
//! with the next line allowed).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub use stages::ratelimit::RateLimit;

/// A named, rate-limited log sink (stderr), shared by a device's register side and its worker.
#[derive(Debug)]
pub struct Logger {
    name: String,
    limit: Mutex<RateLimit>,
    /// Lines written (for tests and statistics).
    pub lines: AtomicU64,
}

impl Logger {
    /// A logger prefixing every line with `name`, at most 10 lines a second.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            limit: Mutex::new(RateLimit::new(10, Duration::from_secs(1))),
            lines: AtomicU64::new(0),
        }
    }

    /// Logs `msg` unless the rate limit says no.
    pub fn log(&self, msg: std::fmt::Arguments<'_>) {
        let allowed = self
            .limit
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .check(Instant::now());
        if let Some(suppressed) = allowed {
            self.lines.fetch_add(1, Ordering::Relaxed);
            if suppressed > 0 {
                eprintln!(
                    "{}: {msg} ({suppressed} similar messages suppressed)",
                    self.name
                );
            } else {
                eprintln!("{}: {msg}", self.name);
            }
        }
    }
}

/// Counters of one virtio function. Every one is incremented somewhere and tested.
#[derive(Debug, Default)]
pub struct VirtioStats {
    /// Queue notifications received (notify region writes).
    pub notifies: AtomicU64,
    /// Notifications ignored (bad queue index, device not live, queue stopped).
    pub notifies_ignored: AtomicU64,
    /// Descriptor chains completed (placed in a used ring).
    pub chains: AtomicU64,
    /// Requests the device answered with an error status (bad request, I/O error, read-only).
    pub request_errors: AtomicU64,
    /// Host I/O errors (a subset of the above, plus errors on queues without a status byte).
    pub io_errors: AtomicU64,
    /// Bytes moved from the guest to the host (TX, writes).
    pub bytes_from_guest: AtomicU64,
    /// Bytes moved from the host to the guest (RX, reads, entropy).
    pub bytes_to_guest: AtomicU64,
    /// Frames or input dropped (no buffer big enough, host queue full).
    pub dropped: AtomicU64,
    /// Queue interrupts raised.
    pub queue_interrupts: AtomicU64,
    /// Configuration-change interrupts raised.
    pub config_interrupts: AtomicU64,
    /// Times the device entered DEVICE_NEEDS_RESET.
    pub needs_reset: AtomicU64,
    /// Times the backend failed for good and the queues were stopped.
    pub backend_failures: AtomicU64,
    /// Register accesses refused (width, offset, read-only register, state).
    pub bad_accesses: AtomicU64,
    /// Device status writes that broke the status protocol.
    pub status_violations: AtomicU64,
    /// Activations (DRIVER_OK accepted).
    pub activations: AtomicU64,
    /// Device resets (status 0 written).
    pub resets: AtomicU64,
    /// Most requests a device had in flight at once (virtio-blk with I/O threads).
    pub in_flight_high: AtomicU64,
    /// Requests in flight now (a gauge, not a counter: popped from the ring, not yet in the used
    /// ring; virtio-blk with I/O threads).
    pub in_flight: AtomicU64,
    /// Bytes whose writeback to the host's storage was started as soon as their write completed
    /// (virtio-blk eager writeback).
    pub writeback_started: AtomicU64,
    /// Eager writebacks the host failed to start (other than not supporting them).
    pub writeback_errors: AtomicU64,
}

impl VirtioStats {
    /// Adds one to `c`.
    #[inline]
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds `n` to `c`.
    #[inline]
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// Reads `c`.
    #[inline]
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logger_is_rate_limited() {
        let l = Logger::new("test");
        for i in 0..100 {
            l.log(format_args!("line {i}"));
        }
        assert_eq!(l.lines.load(Ordering::Relaxed), 10);
    }
}
