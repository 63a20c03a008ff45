//! The one owner of the hypervisor's GSI routing table.
//!
//! `KVM_SET_GSI_ROUTING` replaces the whole table, and two users write routes into it:
//!
//! * the userspace I/O APIC (`stages::pc`), which mirrors its level-triggered redirection entries
//!   as MSI routes on GSIs `0..IOAPIC_RESERVED_PINS` so KVM reports their EOIs;
//! * device models with MSI-X, whose vectors are delivered by irqfds: one GSI per vector, its
//!   route carrying the vector's message.
//!
//! [`GsiRoutes`] keeps both sets, hands out the vectors' GSIs from [`IOAPIC_RESERVED_PINS`] up
//! (KVM treats the GSIs below its reserved pin count as I/O APIC inputs), and installs the merged
//! table whenever either set changes, skipping a rewrite that would install the table already in
//! place. Memory is bounded by the GSI limit, whatever the guest does.
//!
//! Lock order: the table's lock is a leaf except for the install call (an ioctl) it makes while
//! held; callers may hold their own locks (the I/O APIC's route mirror, a function's MSI-X state)
//! but nothing called from here calls back into them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::backend::{BackendError, Vm};

/// I/O APIC inputs KVM reserves with `KVM_CAP_SPLIT_IRQCHIP` (our I/O APIC has 32: the HPET
/// routes to 24–31). GSIs below this are the I/O APIC's; device vectors get the ones above.
pub const IOAPIC_RESERVED_PINS: u32 = 32;

/// The most GSIs KVM accepts (`KVM_MAX_IRQ_ROUTES` on x86).
pub const MAX_GSI: u32 = 4096;

/// One MSI route: `(gsi, address, data)`.
pub type Route = (u32, u64, u32);

/// What installs a table (the hypervisor's `set_msi_routes`).
pub type Install = Box<dyn Fn(&[Route]) -> Result<(), BackendError> + Send + Sync>;

/// Counters.
#[derive(Debug, Default)]
pub struct RouteStats {
    /// Tables installed.
    pub installs: AtomicU64,
    /// Installs the hypervisor refused.
    pub install_errors: AtomicU64,
    /// Changes that left the table as it was (no install).
    pub unchanged: AtomicU64,
    /// GSIs handed out.
    pub allocated: AtomicU64,
    /// GSIs given back.
    pub released: AtomicU64,
    /// Allocations refused (no GSI left).
    pub exhausted: AtomicU64,
}

#[derive(Debug, Default)]
struct Table {
    ioapic: Vec<Route>,
    /// Allocated vector GSIs and their route (`None`: allocated, no message yet).
    msi: BTreeMap<u32, Option<(u64, u32)>>,
    installed: Option<Vec<Route>>,
}

impl Table {
    fn merged(&self) -> Vec<Route> {
        let mut t: Vec<Route> = self.ioapic.clone();
        t.extend(
            self.msi
                .iter()
                .filter_map(|(gsi, r)| r.map(|(a, d)| (*gsi, a, d))),
        );
        t.sort_unstable_by_key(|r| r.0);
        t
    }
}

/// The merged GSI routing table of one VM (see the module documentation).
pub struct GsiRoutes {
    first: u32,
    limit: u32,
    install: Install,
    table: Mutex<Table>,
    /// Counters.
    pub stats: RouteStats,
}

impl std::fmt::Debug for GsiRoutes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GsiRoutes")
            .field("first", &self.first)
            .field("limit", &self.limit)
            .field("table", &*self.lock())
            .finish()
    }
}

impl GsiRoutes {
    /// A table whose vector GSIs are `first..limit`, installed through `install`.
    pub fn new(first: u32, limit: u32, install: Install) -> Self {
        Self {
            first,
            limit: limit.clamp(first, MAX_GSI),
            install,
            table: Mutex::new(Table::default()),
            stats: RouteStats::default(),
        }
    }

    /// The table of `vm`: vector GSIs from [`IOAPIC_RESERVED_PINS`] up to `routes` (the
    /// backend's `irq_routes` capability; 0 means [`MAX_GSI`]).
    pub fn for_vm<V: Vm + 'static>(vm: Arc<V>, routes: u32) -> Self {
        let limit = if routes == 0 { MAX_GSI } else { routes };
        let empty = vm.msi_routes_start_empty();
        let r = Self::new(
            IOAPIC_RESERVED_PINS,
            limit,
            Box::new(move |t: &[Route]| vm.set_msi_routes(t)),
        );
        if empty {
            r.assume_installed_empty();
        }
        r
    }

    /// Records that the backend's table is empty now (a new VM's), so an empty table is not
    /// installed again.
    fn assume_installed_empty(&self) {
        self.lock().installed = Some(Vec::new());
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn commit(&self, t: &mut Table) -> Result<(), BackendError> {
        let want = t.merged();
        if t.installed.as_ref() == Some(&want) {
            self.stats.unchanged.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        match (self.install)(&want) {
            Ok(()) => {
                self.stats.installs.fetch_add(1, Ordering::Relaxed);
                t.installed = Some(want);
                Ok(())
            }
            Err(e) => {
                self.stats.install_errors.fetch_add(1, Ordering::Relaxed);
                // What is installed is unknown now: the next change installs in full.
                t.installed = None;
                Err(e)
            }
        }
    }

    /// Replaces the I/O APIC's routes (GSIs below the first vector GSI) and installs the table.
    pub fn set_ioapic_routes(&self, routes: &[Route]) -> Result<(), BackendError> {
        if let Some(r) = routes.iter().find(|r| r.0 >= self.first) {
            return Err(BackendError::Invalid(format!(
                "I/O APIC route on GSI {} (the I/O APIC has GSIs below {})",
                r.0, self.first
            )));
        }
        let mut t = self.lock();
        t.ioapic = routes.to_vec();
        self.commit(&mut t)
    }

    /// A free vector GSI (no route yet: [`GsiRoutes::set_msi_route`] gives it one).
    pub fn allocate(&self) -> Result<u32, BackendError> {
        let mut t = self.lock();
        let mut gsi = self.first;
        for used in t.msi.keys() {
            if *used != gsi {
                break;
            }
            gsi += 1;
        }
        if gsi >= self.limit {
            self.stats.exhausted.fetch_add(1, Ordering::Relaxed);
            return Err(BackendError::Invalid(format!(
                "no GSI left for an MSI-X vector ({}..{} are taken)",
                self.first, self.limit
            )));
        }
        t.msi.insert(gsi, None);
        self.stats.allocated.fetch_add(1, Ordering::Relaxed);
        Ok(gsi)
    }

    /// Routes vector GSI `gsi` to the MSI `address`/`data` and installs the table (nothing is
    /// installed if the route is already in place).
    pub fn set_msi_route(&self, gsi: u32, address: u64, data: u32) -> Result<(), BackendError> {
        let mut t = self.lock();
        let Some(slot) = t.msi.get_mut(&gsi) else {
            return Err(BackendError::Invalid(format!("GSI {gsi} is not allocated")));
        };
        *slot = Some((address, data));
        self.commit(&mut t)
    }

    /// Gives `gsi` back (its route goes with it).
    pub fn release(&self, gsi: u32) -> Result<(), BackendError> {
        let mut t = self.lock();
        let Some(old) = t.msi.remove(&gsi) else {
            return Ok(());
        };
        self.stats.released.fetch_add(1, Ordering::Relaxed);
        if old.is_some() {
            self.commit(&mut t)
        } else {
            Ok(())
        }
    }

    /// The table as it should be installed now (for tests and statistics).
    pub fn table(&self) -> Vec<Route> {
        self.lock().merged()
    }

    /// Vector GSIs allocated now.
    pub fn allocated(&self) -> usize {
        self.lock().msi.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recorder(limit: u32) -> (Arc<Mutex<Vec<Vec<Route>>>>, GsiRoutes) {
        let log: Arc<Mutex<Vec<Vec<Route>>>> = Arc::default();
        let l = log.clone();
        let r = GsiRoutes::new(
            32,
            limit,
            Box::new(move |t: &[Route]| {
                l.lock().unwrap().push(t.to_vec());
                Ok(())
            }),
        );
        (log, r)
    }

    #[test]
    fn an_empty_table_is_not_installed_over_a_known_empty_one() {
        let (log, r) = recorder(64);
        r.assume_installed_empty();
        r.set_ioapic_routes(&[]).unwrap();
        assert!(log.lock().unwrap().is_empty(), "nothing to change");
        r.set_ioapic_routes(&[(5, 0xfee0_0000, 0x8031)]).unwrap();
        r.set_ioapic_routes(&[]).unwrap();
        assert_eq!(log.lock().unwrap().len(), 2, "a route, then its removal");
    }

    #[test]
    fn ioapic_and_vector_routes_are_merged_in_one_table() {
        let (log, r) = recorder(MAX_GSI);
        r.set_ioapic_routes(&[(9, 0xfee0_0000, 0x8039)]).unwrap();
        let a = r.allocate().unwrap();
        let b = r.allocate().unwrap();
        assert_eq!((a, b), (32, 33));
        assert_eq!(
            log.lock().unwrap().len(),
            1,
            "a GSI without a route installs nothing"
        );
        r.set_msi_route(b, 0xfee0_1000, 0x51).unwrap();
        r.set_msi_route(a, 0xfee0_0000, 0x50).unwrap();
        // The I/O APIC changes its routes: the vectors' stay.
        r.set_ioapic_routes(&[(4, 0xfee0_0000, 0x8030)]).unwrap();
        let last = log.lock().unwrap().last().cloned().unwrap();
        assert_eq!(
            last,
            vec![
                (4, 0xfee0_0000, 0x8030),
                (32, 0xfee0_0000, 0x50),
                (33, 0xfee0_1000, 0x51)
            ]
        );
        // The same route again: no install.
        let n = log.lock().unwrap().len();
        r.set_msi_route(a, 0xfee0_0000, 0x50).unwrap();
        assert_eq!(log.lock().unwrap().len(), n);
        assert_eq!(r.stats.unchanged.load(Ordering::Relaxed), 1);
        // Release frees the lowest GSI for the next allocation and drops its route.
        r.release(a).unwrap();
        assert_eq!(
            r.table(),
            vec![(4, 0xfee0_0000, 0x8030), (33, 0xfee0_1000, 0x51)]
        );
        assert_eq!(r.allocate().unwrap(), 32);
        assert!(r.set_msi_route(40, 0, 0).is_err(), "not allocated");
        assert!(
            r.set_ioapic_routes(&[(32, 0, 0)]).is_err(),
            "the I/O APIC stays below the vectors"
        );
    }

    #[test]
    fn gsis_run_out_cleanly_and_churn_is_bounded() {
        let (log, r) = recorder(36);
        let gsis: Vec<u32> = (0..4).map(|_| r.allocate().unwrap()).collect();
        assert_eq!(gsis, vec![32, 33, 34, 35]);
        assert!(r.allocate().is_err());
        assert_eq!(r.stats.exhausted.load(Ordering::Relaxed), 1);
        // A guest rewriting one vector's message in a loop: one install per change, the table
        // never grows.
        for i in 0..10_000u32 {
            r.set_msi_route(33, 0xfee0_0000, 0x40 + (i % 2)).unwrap();
        }
        assert_eq!(r.table().len(), 1);
        assert_eq!(r.allocated(), 4);
        assert_eq!(log.lock().unwrap().len(), 10_000);
    }

    #[test]
    fn a_refused_install_is_retried_in_full_by_the_next_change() {
        let fail = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let f = fail.clone();
        let r = GsiRoutes::new(
            32,
            64,
            Box::new(move |_: &[Route]| {
                if f.load(Ordering::SeqCst) {
                    Err(BackendError::Invalid("no".into()))
                } else {
                    Ok(())
                }
            }),
        );
        let g = r.allocate().unwrap();
        assert!(r.set_msi_route(g, 0xfee0_0000, 0x50).is_err());
        fail.store(false, Ordering::SeqCst);
        r.set_msi_route(g, 0xfee0_0000, 0x50).unwrap();
        assert_eq!(r.stats.installs.load(Ordering::Relaxed), 1);
        assert_eq!(r.stats.install_errors.load(Ordering::Relaxed), 1);
    }
}
