//! Deterministic stand-ins for the device cores' environment: a clock the caller advances, a fixed
//! wall clock, and interrupt sinks that record what they were asked to do.
//!
//! They are ordinary (no_std, allocation-free) code, compiled in every build, so unit tests,
//! integration tests, fuzz targets and the runner's own tests all drive the devices the same way.

use core::cell::Cell;

use super::{Clock, IrqSink, MsiSink, WallClock, WallTime};

/// A monotonic clock that only moves when told to.
#[derive(Debug, Default)]
pub struct ManualClock {
    now: Cell<u64>,
}

impl ManualClock {
    /// A clock reading `now_ns`.
    pub fn new(now_ns: u64) -> Self {
        ManualClock {
            now: Cell::new(now_ns),
        }
    }

    /// Move the clock to `now_ns` (ignored if that would go backwards).
    pub fn set(&self, now_ns: u64) {
        if now_ns > self.now.get() {
            self.now.set(now_ns);
        }
    }

    /// Move the clock forward by `delta_ns` (saturating).
    pub fn advance(&self, delta_ns: u64) {
        self.now.set(self.now.get().saturating_add(delta_ns));
    }

    /// Current reading.
    pub fn get(&self) -> u64 {
        self.now.get()
    }
}

impl Clock for ManualClock {
    fn now_ns(&self) -> u64 {
        self.now.get()
    }
}

/// A wall clock stuck at one instant.
#[derive(Debug, Clone, Copy, Default)]
pub struct FixedWallClock(pub WallTime);

impl FixedWallClock {
    /// A wall clock reading `secs` seconds and `nanos` nanoseconds past the epoch.
    pub fn new(secs: i64, nanos: u32) -> Self {
        FixedWallClock(WallTime { secs, nanos })
    }
}

impl WallClock for FixedWallClock {
    fn wall_now(&self) -> WallTime {
        self.0
    }
}

/// Number of lines [`IrqRecorder`] tracks individually (lines at or above land in `other`).
pub const RECORDED_LINES: usize = 64;

/// An [`IrqSink`] that remembers each line's level and counts its rising and falling edges.
#[derive(Debug, Clone)]
pub struct IrqRecorder {
    level: [bool; RECORDED_LINES],
    rising: [u64; RECORDED_LINES],
    falling: [u64; RECORDED_LINES],
    /// Calls for lines >= [`RECORDED_LINES`].
    pub other: u64,
    /// Every call, including ones that did not change the level.
    pub calls: u64,
}

impl Default for IrqRecorder {
    fn default() -> Self {
        Self::new()
    }
}

impl IrqRecorder {
    /// All lines low, no edges.
    pub fn new() -> Self {
        IrqRecorder {
            level: [false; RECORDED_LINES],
            rising: [0; RECORDED_LINES],
            falling: [0; RECORDED_LINES],
            other: 0,
            calls: 0,
        }
    }

    fn idx(line: u32) -> Option<usize> {
        usize::try_from(line).ok().filter(|&i| i < RECORDED_LINES)
    }

    /// Current level of `line`.
    pub fn level(&self, line: u32) -> bool {
        Self::idx(line)
            .and_then(|i| self.level.get(i).copied())
            .unwrap_or(false)
    }

    /// Rising edges seen on `line`.
    pub fn rising(&self, line: u32) -> u64 {
        Self::idx(line)
            .and_then(|i| self.rising.get(i).copied())
            .unwrap_or(0)
    }

    /// Falling edges seen on `line`.
    pub fn falling(&self, line: u32) -> u64 {
        Self::idx(line)
            .and_then(|i| self.falling.get(i).copied())
            .unwrap_or(0)
    }

    /// Rising edges over all recorded lines.
    pub fn total_rising(&self) -> u64 {
        self.rising.iter().sum()
    }
}

impl IrqSink for IrqRecorder {
    fn set_irq(&mut self, line: u32, level: bool) {
        self.calls = self.calls.saturating_add(1);
        let Some(i) = Self::idx(line) else {
            self.other = self.other.saturating_add(1);
            return;
        };
        let (Some(cur), Some(rise), Some(fall)) = (
            self.level.get_mut(i),
            self.rising.get_mut(i),
            self.falling.get_mut(i),
        ) else {
            return;
        };
        if level && !*cur {
            *rise = rise.saturating_add(1);
        }
        if !level && *cur {
            *fall = fall.saturating_add(1);
        }
        *cur = level;
    }
}

/// Capacity of [`MsiRecorder`]'s log.
pub const MSI_LOG_LEN: usize = 64;

/// An [`MsiSink`] that counts messages and keeps the first [`MSI_LOG_LEN`] of them.
#[derive(Debug, Clone, Default)]
pub struct MsiRecorder {
    /// Messages received.
    pub count: u64,
    /// The most recent message.
    pub last: Option<(u64, u32)>,
    /// The first messages, in order.
    pub log: heapless::Vec<(u64, u32), MSI_LOG_LEN>,
}

impl MsiRecorder {
    /// Nothing received yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Messages whose data carries `vector`.
    pub fn count_vector(&self, vector: u8) -> usize {
        self.log
            .iter()
            .filter(|(_, d)| (d & 0xff) == u32::from(vector))
            .count()
    }
}

impl MsiSink for MsiRecorder {
    fn send_msi(&mut self, addr: u64, data: u32) {
        self.count = self.count.saturating_add(1);
        self.last = Some((addr, data));
        // A full log just stops recording; `count` keeps counting.
        let _ = self.log.push((addr, data));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_never_goes_backwards() {
        let c = ManualClock::new(10);
        c.set(5);
        assert_eq!(c.now_ns(), 10);
        c.advance(5);
        assert_eq!(c.now_ns(), 15);
        c.advance(u64::MAX);
        assert_eq!(c.now_ns(), u64::MAX);
    }

    #[test]
    fn irq_recorder_counts_edges_not_calls() {
        let mut r = IrqRecorder::new();
        r.set_irq(3, true);
        r.set_irq(3, true);
        r.set_irq(3, false);
        r.set_irq(1000, true);
        assert_eq!(r.rising(3), 1);
        assert_eq!(r.falling(3), 1);
        assert_eq!(r.calls, 4);
        assert_eq!(r.other, 1);
    }
}
