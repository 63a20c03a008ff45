//! Live rates from successive counter snapshots, for a top-style view (`bhyvectl`) and for the
//! exit-rate plot.
//!
//! ```text
//! let mut rates = RateSampler::new(600);            // keep 600 samples of history
//! loop {
//!     let now = start.elapsed();
//!     for r in rates.sample(now, &counters_snapshot()) { println!("{} {:?}", r.name, r.per_sec) }
//!     sleep(1 s);
//! }
//! plot_rate_svg(&rates.series("total number of vm exits"), "exits/s")
//! ```
//!
//! Counters are matched by name, so a snapshot may add or drop counters. A counter that went
//! down was reset (a VM restarted): its delta is its new value, counted from zero.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

/// One counter's rate over the last interval.
#[derive(Debug, Clone, PartialEq)]
pub struct Rate {
    /// The counter.
    pub name: String,
    /// Its value now.
    pub total: u64,
    /// How much it grew since the previous sample.
    pub delta: u64,
    /// `delta` per second; `None` on a counter's first sample (no interval yet) or when the
    /// interval is not positive.
    pub per_sec: Option<f64>,
}

/// Turns successive counter snapshots into per-second rates, keeping a bounded history.
#[derive(Debug, Clone)]
pub struct RateSampler {
    capacity: usize,
    first: Option<Duration>,
    last_at: Option<Duration>,
    last: HashMap<String, u64>,
    /// (seconds since the first sample, rates that had one).
    history: VecDeque<(f64, Vec<(String, f64)>)>,
}

impl RateSampler {
    /// A sampler that remembers the rates of the last `history` samples (for plots).
    pub fn new(history: usize) -> Self {
        Self {
            capacity: history,
            first: None,
            last_at: None,
            last: HashMap::new(),
            history: VecDeque::new(),
        }
    }

    /// Takes a snapshot taken at `at` (any monotonic time base, e.g. `start.elapsed()`) and
    /// returns each counter's rate since the previous snapshot, in the snapshot's order.
    pub fn sample<N: AsRef<str>>(&mut self, at: Duration, counters: &[(N, u64)]) -> Vec<Rate> {
        let dt = self
            .last_at
            .and_then(|prev| at.checked_sub(prev))
            .map(|d| d.as_secs_f64())
            .filter(|&d| d > 0.0);
        let first = *self.first.get_or_insert(at);
        let mut rates = Vec::with_capacity(counters.len());
        let mut next = HashMap::with_capacity(counters.len());
        for (name, total) in counters {
            let name = name.as_ref();
            let total = *total;
            let (delta, per_sec) = match self.last.get(name) {
                Some(&prev) => {
                    // Went down: reset, counted from zero.
                    let delta = if total >= prev { total - prev } else { total };
                    (delta, dt.map(|dt| crate::clock::u64_to_f64(delta) / dt))
                }
                None => (0, None),
            };
            next.insert(name.to_string(), total);
            rates.push(Rate {
                name: name.to_string(),
                total,
                delta,
                per_sec,
            });
        }
        self.last = next;
        self.last_at = Some(at);
        if self.capacity > 0 {
            let t = at.checked_sub(first).unwrap_or_default().as_secs_f64();
            let row = rates
                .iter()
                .filter_map(|r| r.per_sec.map(|p| (r.name.clone(), p)))
                .collect::<Vec<_>>();
            if !row.is_empty() {
                if self.history.len() == self.capacity {
                    self.history.pop_front();
                }
                self.history.push_back((t, row));
            }
        }
        rates
    }

    /// The remembered `(seconds since the first sample, per second)` points of one counter,
    /// oldest first: the input of [`crate::plot_rate_svg`].
    pub fn series(&self, name: &str) -> Vec<(f64, f64)> {
        self.history
            .iter()
            .filter_map(|(t, row)| {
                row.iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, rate)| (*t, *rate))
            })
            .collect()
    }

    /// Names of every counter in the remembered history, in first-seen order.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for (_, row) in &self.history {
            for (n, _) in row {
                if !names.contains(n) {
                    names.push(n.clone());
                }
            }
        }
        names
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn rates_per_second() {
        let mut r = RateSampler::new(10);
        let first = r.sample(secs(10.0), &[("exits", 100u64), ("pio", 10)]);
        assert_eq!(first[0].per_sec, None);
        assert_eq!(first[0].delta, 0);
        let second = r.sample(secs(10.5), &[("exits", 1100u64), ("pio", 10)]);
        assert_eq!(second[0].delta, 1000);
        assert_eq!(second[0].per_sec, Some(2000.0));
        assert_eq!(second[1].per_sec, Some(0.0));
        let third = r.sample(secs(11.5), &[("exits", 1600u64), ("mmio", 7)]);
        assert_eq!(third[0].per_sec, Some(500.0));
        assert_eq!(third[1].per_sec, None, "new counter has no rate yet");
        assert_eq!(r.series("exits"), vec![(0.5, 2000.0), (1.5, 500.0)]);
        assert_eq!(r.names(), vec!["exits".to_string(), "pio".to_string()]);
    }

    #[test]
    fn reset_and_bad_intervals() {
        let mut r = RateSampler::new(2);
        r.sample(secs(1.0), &[("x", 500u64)]);
        let reset = r.sample(secs(2.0), &[("x", 40u64)]);
        assert_eq!(reset[0].delta, 40);
        assert_eq!(reset[0].per_sec, Some(40.0));
        // Same instant, then time going backwards: no rate, no panic.
        assert_eq!(r.sample(secs(2.0), &[("x", 50u64)])[0].per_sec, None);
        assert_eq!(r.sample(secs(1.5), &[("x", 60u64)])[0].per_sec, None);
        let ok = r.sample(secs(2.5), &[("x", 160u64)]);
        assert_eq!(
            ok[0].per_sec,
            Some(100.0),
            "100 more over the 1 s since 1.5"
        );
        // History keeps the last two rows only.
        assert_eq!(r.series("x"), vec![(1.0, 40.0), (1.5, 100.0)]);
    }
}
