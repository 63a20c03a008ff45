//! Per-vCPU counters in the style of `vmm_stat`: one writer (the vCPU thread), any number of readers
//! (`bhyvectl --get-stats`). Increments are a plain load and store, no locked instruction.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! stats {
    ($( $name:ident => $desc:literal ),* $(,)?) => {
        /// One counter of a vCPU.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        #[repr(usize)]
        pub enum Stat { $( #[doc = $desc] $name, )* }

        impl Stat {
            /// Every counter, in display order.
            pub const ALL: &'static [Stat] = &[$(Stat::$name,)*];
            /// The description bhyvectl prints (bhyve's wording where bhyve has the counter).
            pub fn description(self) -> &'static str {
                match self { $(Stat::$name => $desc,)* }
            }
        }
    };
}

stats! {
    VmExitTotal => "total number of vm exits",
    VmExitInout => "number of times in/out was intercepted",
    VmExitMmio => "number of mmio exits",
    VmExitHlt => "number of times hlt was intercepted",
    VmExitIoapicEoi => "number of EOIs forwarded to the ioapic",
    VmExitShutdown => "number of triple faults",
    VmExitIntr => "vm exits due to host interrupts (kicks)",
    VmExitOther => "number of vm exits for unknown reason",
    FastStage => "exits handled inline by an in-module device",
    CoalescedWrite => "coalesced writes applied (no exit of their own)",
    SlowPosted => "exits posted to the device-model side without waiting",
    SlowWaited => "exits that waited for a device-model completion",
    UnclaimedRead => "reads nobody claimed (all-ones returned)",
    UnclaimedWrite => "writes nobody claimed (dropped)",
    RingFull => "times the exit ring was full and the vCPU waited for room",
    SlowPathError => "slow-stage exits that failed (peer error or timeout)",
    RingHighWater => "exit ring occupancy high-water mark (records)",
}

/// Number of counters.
pub const NSTATS: usize = Stat::ALL.len();

/// The counters of one vCPU.
#[derive(Debug)]
pub struct VcpuStats {
    counts: [AtomicU64; NSTATS],
    /// Exits routed to each device, by device id.
    per_device: Box<[AtomicU64]>,
}

impl Default for VcpuStats {
    fn default() -> Self {
        Self::with_devices(0)
    }
}

impl VcpuStats {
    /// Counters for a VM with `devices` registered devices.
    pub fn with_devices(devices: usize) -> Self {
        Self {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            per_device: (0..devices).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Adds one to device `id`'s exit count (ids past the table are ignored).
    #[inline]
    pub fn inc_device(&self, id: u16) {
        if let Some(c) = self.per_device.get(usize::from(id)) {
            c.store(c.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
        }
    }

    /// Exits routed to each device, by device id.
    pub fn per_device(&self) -> Vec<u64> {
        self.per_device
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }

    /// Raises gauge `s` to `v` if `v` is higher (a high-water mark).
    #[inline]
    pub fn raise(&self, s: Stat, v: u64) {
        if let Some(c) = self.counts.get(s as usize) {
            if v > c.load(Ordering::Relaxed) {
                c.store(v, Ordering::Relaxed);
            }
        }
    }

    /// Adds one to `s`. Only the owning vCPU thread calls this.
    #[inline]
    pub fn inc(&self, s: Stat) {
        if let Some(c) = self.counts.get(s as usize) {
            c.store(c.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
        }
    }

    /// The current value of `s`.
    pub fn get(&self, s: Stat) -> u64 {
        self.counts
            .get(s as usize)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// A snapshot of every counter with its description.
    pub fn snapshot(&self) -> Vec<(Stat, u64)> {
        Stat::ALL.iter().map(|&s| (s, self.get(s))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Metrics are code: every counter is incremented somewhere in this crate (as Firecracker's
    /// `test_unused_metrics` does for its metrics). Reads the crate's own sources.
    #[test]
    fn every_counter_is_incremented_somewhere() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut code = String::new();
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "rs") && !p.ends_with("stats.rs") {
                let text = std::fs::read_to_string(&p).unwrap();
                // Only non-test code counts.
                let text = text
                    .split("#[cfg(test)]")
                    .next()
                    .unwrap_or_default()
                    .to_string();
                code.push_str(&text);
            }
        }
        for s in Stat::ALL {
            let name = format!("Stat::{s:?}");
            assert!(
                code.contains(&format!("inc({name})"))
                    || code.contains(&format!("inc(crate::stats::{name})"))
                    || code.contains(&format!("raise({name},")),
                "counter {s:?} ({}) is never incremented",
                s.description()
            );
        }
    }

    #[test]
    fn increments_are_visible_to_readers() {
        let s = VcpuStats::default();
        s.inc(Stat::VmExitTotal);
        s.inc(Stat::VmExitTotal);
        assert_eq!(s.get(Stat::VmExitTotal), 2);
        assert_eq!(s.snapshot().len(), NSTATS);
    }
}
