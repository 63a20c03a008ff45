//! A log rate limiter: at most `burst` lines per `period`; the rest are counted and reported once the
//! next line is allowed. A guest can make an exit happen a million times a second; it must not make
//! the monitor log a million lines.

use std::time::{Duration, Instant};

/// Allows `burst` events per `period`.
#[derive(Debug)]
pub struct RateLimit {
    period: Duration,
    burst: u32,
    window_start: Option<Instant>,
    used: u32,
    suppressed: u64,
}

impl RateLimit {
    /// A limiter of `burst` lines per `period`.
    pub const fn new(burst: u32, period: Duration) -> Self {
        Self {
            period,
            burst,
            window_start: None,
            used: 0,
            suppressed: 0,
        }
    }

    /// Whether a line may be logged now; if so, also how many were suppressed since the last one.
    pub fn check(&mut self, now: Instant) -> Option<u64> {
        let start = *self.window_start.get_or_insert(now);
        if now.duration_since(start) >= self.period {
            self.window_start = Some(now);
            self.used = 0;
        }
        if self.used < self.burst {
            self.used += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_and_reports_suppressed() {
        let mut r = RateLimit::new(2, Duration::from_secs(1));
        let t = Instant::now();
        assert_eq!(r.check(t), Some(0));
        assert_eq!(r.check(t), Some(0));
        for _ in 0..1000 {
            assert_eq!(r.check(t), None);
        }
        assert_eq!(r.check(t + Duration::from_secs(1)), Some(1000));
    }
}
