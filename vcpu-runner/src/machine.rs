//! A whole VM: guest memory, the device registry, one pinned thread per vCPU with its exit ring and
//! completion ring, one device-model thread per exit ring, and a bounded stop.
//!
//! Lock order: a device's own mutex is the only lock taken on the exit path; `VcpuControl` locks are
//! taken only by controllers and never while a device lock is held.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pipeline::{
    CompletionRecord, Consumer, ExitRecord, Producer, RingError, RingSet, SharedRegion,
};
use stages::slow::{SlowDevice, SlowSide, SlowStats};
use stages::{Bus, BusDevice, BusError, DeviceId, EoiSink, Space, Stage, VmRequest, VmRequests};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::backend::{BackendError, EntryRegs, Hypervisor, Vcpu, Vm};
use crate::coalesced::CoalescedZone;
use crate::control::{
    install_kick_handler, ControlError, RunState, VcpuControl, VcpuOp, VcpuOpResult,
};
use crate::handler::{ExitHandler, FastDevice, Platform, SlowPath, SlowPathError};
use crate::runner::{pin_to_cpu, pin_to_cpus, run_vcpu, VcpuOutcome};
use crate::stats::VcpuStats;

/// Errors building or running a machine.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// The backend refused something.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// Guest memory could not be allocated.
    #[error("Cannot allocate {size} bytes of guest memory: {why}")]
    Memory {
        /// Bytes asked for.
        size: u64,
        /// The allocator's reason.
        why: String,
    },
    /// A device range was refused.
    #[error("Device {name}: {source}")]
    Device {
        /// Device name.
        name: String,
        /// Why.
        #[source]
        source: BusError,
    },
    /// A coalesced zone that cannot be (empty, or covering a device that is not a fast one).
    #[error("{0}")]
    Coalesced(String),
    /// A ring could not be set up.
    #[error("Exit rings: {0}")]
    Rings(String),
    /// A thread could not be started.
    #[error("Cannot start thread {name}: {source}")]
    Thread {
        /// Thread name.
        name: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Devices being registered: one bus, one registry (fast and slow share the id space).
#[derive(Default)]
pub struct Devices {
    bus: Bus,
    fast: Vec<Option<FastDevice>>,
    slow: Vec<Option<SlowDevice>>,
    names: Vec<String>,
    eoi: Option<Arc<dyn EoiSink>>,
    coalesced: Vec<CoalescedZone>,
}

impl std::fmt::Debug for Devices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Devices")
            .field("names", &self.names)
            .finish()
    }
}

impl Devices {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `dev` under `name` for `len` bytes at `base` in `space`, in `stage`.
    pub fn add(
        &mut self,
        name: &str,
        space: Space,
        base: u64,
        len: u64,
        stage: Stage,
        dev: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<DeviceId, MachineError> {
        let id = u16::try_from(self.names.len()).map_err(|_| MachineError::Device {
            name: name.to_string(),
            source: BusError::Full,
        })?;
        let id = DeviceId(id);
        self.add_range(name, id, space, base, len, stage)?;
        self.names.push(name.to_string());
        let (f, s) = match stage {
            Stage::Fast => (Some(dev), None),
            Stage::Slow | Stage::SlowOrdered => (None, Some(dev)),
        };
        self.fast.push(f);
        self.slow.push(s);
        Ok(id)
    }

    /// Adds one more range for an already registered device.
    pub fn add_range(
        &mut self,
        name: &str,
        id: DeviceId,
        space: Space,
        base: u64,
        len: u64,
        stage: Stage,
    ) -> Result<(), MachineError> {
        self.bus
            .insert(space, base, len, id, stage)
            .map_err(|source| MachineError::Device {
                name: name.to_string(),
                source,
            })
    }

    /// Asks for the writes to `len` bytes at `base` to be coalesced (see [`crate::coalesced`]): the
    /// hypervisor queues them instead of exiting, and they reach their devices, in order, before
    /// the next exit is handled. For index registers, whose writes only select what a later data
    /// access (an exit) reaches. Every address of the zone must belong to a fast device already
    /// registered, or to nobody: a slow device would see its writes overtaken.
    pub fn coalesce(&mut self, space: Space, base: u64, len: u32) -> Result<(), MachineError> {
        let zone = CoalescedZone {
            pio: space == Space::Pio,
            addr: base,
            len,
        };
        self.check_zone(&zone)?;
        self.coalesced.push(zone);
        Ok(())
    }

    /// Whether every address of `zone` belongs to a fast device or to nobody.
    fn check_zone(&self, zone: &CoalescedZone) -> Result<(), MachineError> {
        let space = if zone.pio { Space::Pio } else { Space::Mmio };
        let (base, len) = (zone.addr, zone.len);
        let bad = |why: &str| {
            MachineError::Coalesced(format!("coalesced zone {space} {base:#x}+{len}: {why}"))
        };
        let Some(end) = base.checked_add(u64::from(len)).filter(|_| len != 0) else {
            return Err(bad("empty or past the end of the space"));
        };
        for addr in base..end {
            if let Some(r) = self.bus.route(space, addr) {
                if r.stage != Stage::Fast {
                    return Err(bad(&format!(
                        "{addr:#x} belongs to {}, not a fast device",
                        self.names
                            .get(usize::from(r.device.0))
                            .map_or("?", String::as_str)
                    )));
                }
            }
        }
        Ok(())
    }

    /// The zones asked for with [`Devices::coalesce`].
    pub fn coalesced_zones(&self) -> &[CoalescedZone] {
        &self.coalesced
    }

    /// Routes I/O APIC EOI exits to `sink` (the in-module interrupt controller).
    pub fn set_eoi_sink(&mut self, sink: Arc<dyn EoiSink>) {
        self.eoi = Some(sink);
    }

    /// Device names by id.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The bus as registered so far.
    pub fn bus(&self) -> &Bus {
        &self.bus
    }
}

/// How to run.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Pin vCPU `i` to the `i % host_cpus`-th of the CPUs the process may run on
    /// ([`allowed_host_cpus`]), and its device-model thread to the next one. Under
    /// `taskset -c 4-7`, or in a container's cpuset, vCPU 0 goes to CPU 4, not to CPU 0, where
    /// pinning would fail and leave the thread unpinned.
    pub pin: bool,
    /// Host CPUs vCPU `i` may run on, given by the user (bhyve's `-p`): when `cpusets[i]` is not
    /// empty, the vCPU thread runs there instead (whatever `pin` says).
    pub cpusets: Vec<Vec<usize>>,
    /// Slots per exit ring and per completion ring (power of two).
    pub ring_capacity: u32,
    /// How long a device-model thread spins for records before it parks (it yields its CPU now
    /// and then while it spins).
    pub device_spin: Duration,
    /// How long a vCPU spins for a completion before it parks, when the VM's threads have CPUs
    /// of their own (see [`completion_spin_for`]).
    pub completion_spin: Duration,
    /// Spin for completions even where [`completion_spin_for`] would not (one host CPU, or more
    /// vCPUs than CPUs): by default a vCPU then parks at once, since spinning it could hold the
    /// CPU its device-model thread needs.
    pub spin_when_shared: bool,
    /// How long a vCPU waits for a completion (or for ring room) before it declares the device side
    /// dead.
    pub completion_timeout: Duration,
    /// Bound on each control round trip (pause, resume, stop).
    pub control_timeout: Duration,
    /// bhyve's `hw.vmm.halt_detection`: when every vCPU is halted with interrupts off (nothing can
    /// ever wake it), the VM stops with the halt status.
    pub halt_detection: bool,
    /// Events per vCPU trace ring (power of two; 32 bytes each, resident even while tracing is
    /// off); drained every 20 ms, so 4096 holds 200k exits/s, above what one vCPU can take.
    pub trace_capacity: u32,
    /// Most trace events kept in memory; further ones are counted and dropped.
    pub trace_max_events: usize,
    /// Start with tracing on.
    pub trace: bool,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            pin: true,
            cpusets: Vec::new(),
            ring_capacity: 1024,
            device_spin: Duration::from_micros(200),
            completion_spin: Duration::from_micros(100),
            spin_when_shared: false,
            completion_timeout: Duration::from_secs(2),
            control_timeout: Duration::from_secs(2),
            halt_detection: true,
            trace_capacity: 1 << 12,
            trace_max_events: 1 << 21,
            trace: false,
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunExit {
    /// The guest or a device asked to stop.
    Request(VmRequest),
    /// Stopped from the host (signal, control request).
    Stopped,
    /// Something failed.
    Error(String),
}

impl RunExit {
    /// bhyve(8) process exit status.
    pub fn exit_status(&self) -> i32 {
        match self {
            RunExit::Request(r) => r.exit_status(),
            RunExit::Stopped | RunExit::Error(_) => 4,
        }
    }
}

/// The result of [`Machine::run`].
#[derive(Debug)]
pub struct RunOutcome {
    /// How it ended.
    pub exit: RunExit,
    /// Per-vCPU counters.
    pub vcpu_stats: Vec<Arc<VcpuStats>>,
    /// Per device-model thread counters.
    pub slow_stats: Vec<Arc<SlowStats>>,
    /// Wall time from the first vCPU entry to the stop.
    pub elapsed: Duration,
    /// Problems met while stopping (suspected deadlocks), if any.
    pub stop_problems: Vec<String>,
    /// Per-vCPU latency histograms, merged.
    pub histograms: perf::SetSnapshot,
    /// Bytes of guest memory resident in the host at the stop (what the guest and the loader
    /// touched), from mincore(2); `None` if it could not be measured.
    pub guest_resident: Option<u64>,
}

/// Bytes of `mem` resident in host memory (mincore over every region).
pub fn resident_bytes(mem: &GuestMemoryMmap<()>) -> Option<u64> {
    // SAFETY: sysconf has no preconditions.
    let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).ok()?;
    let mut total = 0u64;
    for r in mem.iter() {
        let host = mem.get_host_address(r.start_addr()).ok()?;
        let len = usize::try_from(r.len()).ok()?;
        let pages = len.div_ceil(usize::try_from(page).ok()?);
        let mut vec = vec![0u8; pages];
        // SAFETY: `host..host+len` is one mapping owned by `mem` (page-aligned by mmap); `vec` has
        // one byte per page of it.
        let rc = unsafe { libc::mincore(host.cast(), len, vec.as_mut_ptr()) };
        if rc != 0 {
            return None;
        }
        let resident = vec.iter().filter(|&&b| b & 1 != 0).count();
        total += u64::try_from(resident).ok()? * page;
    }
    Some(total)
}

/// Maps the coalesced-write ring through `vcpu` and lets the platform register its zones, each at
/// the first write exit into it ([`crate::coalesced::LazyZones`]). Without a ring nothing is
/// registered (the writes exit as usual); a zone the hypervisor refuses exits as usual.
fn setup_coalescing<V: Vm + 'static>(vm: &Arc<V>, vcpu: &mut V::Vcpu, platform: &Platform) {
    if platform.coalesced_zones.is_empty() {
        return;
    }
    let Ok(Some(ring)) = vcpu.map_coalesced_ring() else {
        return;
    };
    if platform.coalesced.set(ring).is_err() {
        return;
    }
    // Weak: the platform outlives nothing it should keep open (the VM closes with its last owner).
    let vm = Arc::downgrade(vm);
    platform.coalesced_zones.set_registrar(Box::new(move |z| {
        vm.upgrade()
            .is_some_and(|vm| vm.register_coalesced(z).is_ok())
    }));
}

/// Guest-physical memory below this is never advised for huge pages. It holds what every loader
/// writes before the guest runs — the real-mode area, the zero page or Multiboot information, the
/// boot page tables and GDT, the command line, the ACPI tables at 0xE0000–0xFFFFF, a small kernel
/// at 1 MiB — and a huge page there costs a 2 MiB zero-fill at the loader's first write: measured
/// 2026-11-25 on our hosts, the `hello` test guest's first UART byte came 1.4 ms later with it
/// (4.65 against 3.22 ms from process start, median of 15). A Linux kernel lives from 16 MiB up,
/// so it keeps its huge pages.
pub const SMALL_PAGES_BELOW: u64 = 2 << 20;

/// KVM maps a memory slot with huge nested (or extended) pages only if the slot's host address and
/// guest address agree modulo the huge page size; otherwise the whole slot gets 4 KiB nested pages
/// and the guest takes a nested page fault per 4 KiB it touches. The kernel does not necessarily
/// place a large anonymous mapping on a 2 MiB boundary (Linux before 6.7 does not): in the rig's
/// outer VM (Debian's 6.1), one `bhyve` run in three got guest RAM at a host address 0x78000 past
/// a boundary, and those were the runs with 20,000–30,000 nested page faults (QEMU aligns its RAM
/// and never had them). [`map_guest_ram`] places each region accordingly.
pub const RAM_HOST_ALIGN: usize = 2 << 20;

/// Guest RAM as vm-memory regions (each an ordinary mapping vm-memory owns), each placed so that
/// its host address is congruent to its guest address modulo [`RAM_HOST_ALIGN`].
///
/// vm-memory maps a region itself and takes no address, so the kernel is steered: a reservation
/// `RAM_HOST_ALIGN` larger on each side is made, the aligned window inside it is freed, and the
/// region's own mapping (which the kernel places in the highest gap that fits, this one) goes
/// there; the rest of the reservation is then released. If the mapping lands elsewhere anyway
/// (another thread mapped memory meanwhile), it is tried again, and after three tries kept where
/// it is, with a warning: correct, only slower.
pub fn map_guest_ram(ram: &[(GuestAddress, usize)]) -> Result<GuestMemoryMmap<()>, String> {
    let mut regions = Vec::with_capacity(ram.len());
    for &(gpa, len) in ram {
        regions.push(map_aligned_region(gpa, len)?);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| e.to_string())
}

fn map_aligned_region(
    gpa: GuestAddress,
    len: usize,
) -> Result<vm_memory::GuestRegionMmap<()>, String> {
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    let want_offset = usize::try_from(gpa.0 % RAM_HOST_ALIGN as u64).unwrap_or(0);
    let mut last = None;
    for _ in 0..3 {
        let reserve_len = len
            .checked_add(2 * RAM_HOST_ALIGN)
            .ok_or_else(|| format!("{len} bytes is too large a region"))?;
        // SAFETY: a new private anonymous reservation without access; no address hint.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                reserve_len,
                libc::PROT_NONE,
                flags,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error().to_string());
        }
        let base = base as usize;
        let want = base.next_multiple_of(RAM_HOST_ALIGN) + want_offset;
        // SAFETY: `want..want + len` lies inside the reservation just made (at most
        // 2 * RAM_HOST_ALIGN - 1 past `base`, and the reservation is that much longer than `len`).
        unsafe { libc::munmap(want as *mut libc::c_void, len) };
        let region = vm_memory::MmapRegion::<()>::build(
            None,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
        );
        if want > base {
            // SAFETY: the stub left of the reservation below the window; nothing else uses it.
            unsafe { libc::munmap(base as *mut libc::c_void, want - base) };
        }
        // SAFETY: the stub left above the window; nothing else uses it either (the window
        // holds the region now, or nothing).
        unsafe {
            libc::munmap(
                (want + len) as *mut libc::c_void,
                base + reserve_len - (want + len),
            )
        };
        let region = region.map_err(|e| e.to_string())?;
        let at = region.as_ptr() as usize;
        let region = vm_memory::GuestRegionMmap::new(region, gpa)
            .ok_or_else(|| format!("a region of {len} bytes at {:#x} overflows", gpa.0))?;
        if at % RAM_HOST_ALIGN == want_offset {
            return Ok(region);
        }
        last = Some((region, at));
    }
    let (region, at) = last.ok_or("no region mapped")?;
    eprintln!(
        "warning: guest RAM at {:#x} is at host address {at:#x}, not aligned with it modulo 2 MiB: \
         KVM will map it with 4 KiB nested pages (slower)",
        gpa.0
    );
    Ok(region)
}

/// Asks for transparent huge pages on one guest RAM mapping (`MADV_HUGEPAGE`), as QEMU does.
///
/// With the usual THP setting (`enabled=always`, `defrag=madvise`, Debian's default) only advised
/// memory gets direct compaction when no huge page is free, which is typical right after another VM
/// exited: unadvised guest RAM then ends up on 4 KiB pages, and the guest takes 10–20× more nested
/// page faults (measured in the rig: 18,000–27,000 instead of ~1,400 per Linux boot) and more TLB
/// misses for its whole life. (The storms that remained after this advice came from guest RAM
/// placed at a host address not 2 MiB-aligned: see [`RAM_HOST_ALIGN`].) Advice only: a kernel
/// without THP refuses it (`EINVAL`), which changes nothing else. Returns whether the kernel took
/// it.
pub fn advise_huge_pages(host: *mut u8, len: u64) -> bool {
    let Ok(len) = usize::try_from(len) else {
        return false;
    };
    // SAFETY: advice on a range of a mapping the caller owns; MADV_HUGEPAGE changes no contents.
    unsafe { libc::madvise(host.cast(), len, libc::MADV_HUGEPAGE) == 0 }
}

/// How long every vCPU must have been without exits before halt detection looks at them.
const HALT_CHECK_AFTER: Duration = Duration::from_millis(500);

/// How often the thread waiting for a VM looks at it (stop flag, requests from slow devices,
/// coalesced writes nothing exited after, halt detection, trace draining) while it is busy: some
/// vCPU took an exit since the last look, tracing is on, or coalesced writes are pending.
const WATCH_BUSY: Duration = Duration::from_millis(20);
/// ... and while it is idle: as often as halt detection needs, so an idle VM's waiting thread
/// wakes twice a second (it woke 50 times, then 10). Nothing else needs an idle look: a stop and
/// a vCPU that ends wake it at once (see [`StopSwitch`]); a request from another thread
/// ([`RunningVm::request`]) kicks the vCPUs itself; fast devices' requests end their vCPU's run at
/// once. The price: a coalesced write that nothing exits after, made by a VM that was idle (a
/// reset through 0xCF9 followed by a loop without exits), is applied within ~0.5 s, not ~0.1 s.
const WATCH_IDLE: Duration = HALT_CHECK_AFTER;

/// The vCPU end of one ring pair.
struct RingSlowPath {
    exits: Producer<ExitRecord>,
    completions: Consumer<CompletionRecord>,
    spin: Duration,
    timeout: Duration,
    stopping: Arc<AtomicBool>,
}

fn ring_err(e: RingError) -> SlowPathError {
    match e {
        RingError::Timeout => SlowPathError::Timeout(Duration::ZERO),
        other => SlowPathError::Protocol(other.to_string()),
    }
}

impl SlowPath for RingSlowPath {
    #[inline]
    fn post(&mut self, rec: ExitRecord) -> Result<bool, SlowPathError> {
        let Err(mut rec) = self.exits.try_push(rec) else {
            return Ok(false);
        };
        // Full: the device side is behind. Wait (bounded) for room; posted writes stay in order.
        let start = Instant::now();
        loop {
            std::hint::spin_loop();
            match self.exits.try_push(rec) {
                Ok(()) => return Ok(true),
                Err(back) => rec = back,
            }
            if self.stopping.load(Ordering::Acquire) {
                return Err(SlowPathError::Stopping);
            }
            if start.elapsed() > self.timeout {
                return Err(SlowPathError::Timeout(self.timeout));
            }
            if start.elapsed() > self.spin {
                std::thread::yield_now();
            }
        }
    }

    #[inline]
    fn occupancy(&self) -> usize {
        self.exits.len()
    }

    #[inline]
    fn wait(&mut self, seq: u64) -> Result<CompletionRecord, SlowPathError> {
        match self
            .completions
            .wait_completion(seq, self.spin, self.timeout)
        {
            Ok(c) => Ok(c),
            Err(RingError::Timeout) if self.stopping.load(Ordering::Acquire) => {
                Err(SlowPathError::Stopping)
            }
            Err(RingError::Timeout) => Err(SlowPathError::Timeout(self.timeout)),
            Err(e) => Err(ring_err(e)),
        }
    }
}

/// A VM ready to run.
pub struct Machine<H: Hypervisor> {
    vm: Arc<H::Vm>,
    memory: GuestMemoryMmap<()>,
    ncpus: u32,
}

impl<H: Hypervisor> std::fmt::Debug for Machine<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("ncpus", &self.ncpus)
            .finish()
    }
}

/// How long a vCPU of a VM of `ncpus` vCPUs on `host` CPUs spins for its completion before it
/// parks: `cfg.completion_spin` when every vCPU has a CPU of its own and its device-model thread
/// is pinned to another (two CPUs or more, no more vCPUs than CPUs), or with
/// [`RunConfig::spin_when_shared`]; not at all otherwise.
///
/// A vCPU spins so that the answer its device-model thread makes on another CPU is seen at once.
/// On one CPU that thread needs the very CPU the vCPU spins on, and a vCPU's spin never yields
/// (the CPU is the guest's): the answer then waits for the spin to run out. With more vCPUs than
/// CPUs, vCPUs spinning on each other's device-model CPUs can wait in a ring. The device-model
/// thread's own spin yields its CPU now and then, and stays. Measured (2026-11-25):
/// - the exits bench on one CPU (`taskset -c 0`, `EXITS_N=20000`): a waited read cost +108 µs
///   over the raw loop with the vCPU's 100 µs spin and +6.5–7.0 µs without it; a posted write
///   +13 ns with the device-model thread's spin and +6.1 µs without it (every record then wakes
///   a parked thread);
/// - in the rig, an outer VM with one CPU: a verbose Linux boot (an LSR read before every byte)
///   took 12.0 s with the spin, 7.7 s without, QEMU `-M pc` 7.6 s;
/// - two vCPUs on an outer VM with two CPUs (each vCPU's device-model thread on the other
///   vCPU's CPU), start to marker, three runs each: spinning 2.36–2.81 s quiet and 7.93–8.48 s
///   verbose, parking 2.48–2.81 s and 8.13–9.33 s. So two vCPUs on two CPUs spin.
pub fn completion_spin_for(cfg: &RunConfig, ncpus: u32, host: usize) -> Duration {
    let own_cpus = host >= 2 && usize::try_from(ncpus).is_ok_and(|n| n <= host);
    if own_cpus || cfg.spin_when_shared {
        cfg.completion_spin
    } else {
        Duration::ZERO
    }
}

/// Number of host CPUs, asked once per process (`available_parallelism` reads the cgroup's CPU
/// quota files each time: a dozen system calls, ~20 µs, and both the module's load and every VM's
/// start ask).
pub fn host_cpus() -> usize {
    static CPUS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CPUS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// The host CPUs the process may run on, in order, as its affinity mask said when first asked
/// (empty if it cannot be read).
pub fn allowed_host_cpus() -> &'static [usize] {
    static ALLOWED: std::sync::OnceLock<Vec<usize>> = std::sync::OnceLock::new();
    ALLOWED.get_or_init(allowed_cpus)
}

/// Where vCPU `idx`'s thread and its device-model thread run, and how long the vCPU spins for
/// its completions.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Placement {
    /// The vCPU thread's CPUs (`None`: not pinned).
    vcpu: Option<Vec<usize>>,
    /// The device-model thread's CPU (`None`: not pinned).
    device_model: Option<usize>,
    /// The vCPU's spin for a completion.
    completion_spin: Duration,
}

impl Placement {
    /// vCPU `idx` on `host` CPUs, of which the process may run on `allowed`, with `spin` the
    /// completion spin [`completion_spin_for`] chose for the VM.
    ///
    /// A set the user gave (`cfg.cpusets`) is the vCPU's, and its device-model thread goes
    /// beside it, never onto a CPU of that set: a vCPU spinning for its completion would hold the
    /// CPU the answer needs. If the set takes every allowed CPU there is no such place, and the
    /// vCPU parks rather than spins. Otherwise, with `cfg.pin`, the vCPU goes to the
    /// `idx % host`-th allowed CPU and its device-model thread to the next one.
    fn of(cfg: &RunConfig, idx: usize, host: usize, allowed: &[usize], spin: Duration) -> Self {
        match cfg.cpusets.get(idx).filter(|s| !s.is_empty()) {
            Some(set) => {
                let device_model = cpu_outside(allowed, set);
                Self {
                    vcpu: Some(set.clone()),
                    completion_spin: if device_model.is_some() {
                        spin
                    } else {
                        Duration::ZERO
                    },
                    device_model,
                }
            }
            None => Self {
                vcpu: cfg.pin.then(|| vec![nth_cpu(allowed, idx % host)]),
                device_model: cfg.pin.then(|| nth_cpu(allowed, (idx + 1) % host)),
                completion_spin: spin,
            },
        }
    }
}

/// The first CPU of `allowed` after the highest of `set`, going round, that is not in `set`;
/// `None` if every CPU of `allowed` is in `set` (or `allowed` could not be read).
fn cpu_outside(allowed: &[usize], set: &[usize]) -> Option<usize> {
    let top = set.iter().max().copied().unwrap_or(0);
    let start = allowed.iter().position(|&c| c > top).unwrap_or(0);
    allowed[start..]
        .iter()
        .chain(&allowed[..start])
        .copied()
        .find(|c| !set.contains(c))
}

/// The `n`-th of `allowed` (modulo its length); `n` itself if the set could not be read.
fn nth_cpu(allowed: &[usize], n: usize) -> usize {
    if allowed.is_empty() {
        n
    } else {
        allowed[n % allowed.len()]
    }
}

/// The CPUs the calling thread may run on, in order (empty if the mask cannot be read).
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: an all-zero cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable cpu_set_t of the size passed; pid 0 is this thread.
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return Vec::new();
    }
    (0..8 * std::mem::size_of::<libc::cpu_set_t>())
        // SAFETY: `cpu` is below CPU_SETSIZE, so CPU_ISSET reads inside `set`.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect()
}

impl<H: Hypervisor> Machine<H>
where
    H::Vm: 'static,
    <H::Vm as Vm>::Vcpu: 'static,
{
    /// Creates the VM and its guest memory (`ram` as (guest address, bytes) ranges), advised for
    /// transparent huge pages ([`Machine::with_huge_pages`]).
    pub fn new(
        hv: &H,
        ram: &[(GuestAddress, usize)],
        ncpus: u32,
        split_irqchip: bool,
    ) -> Result<Self, MachineError> {
        Self::with_huge_pages(hv, ram, ncpus, split_irqchip, true)
    }

    /// [`Machine::new`], choosing whether guest RAM is advised for transparent huge pages
    /// ([`advise_huge_pages`]). Huge pages cut nested page faults and TLB misses for the guest's
    /// whole life; the price is paid at the first touch of each 2 MiB (zeroing it), which a guest
    /// that lives a few milliseconds notices: on our hosts the `hello` test guest's first UART
    /// byte came 1.6–5 ms later with them (`bhyve -o memory.thp=false` turns them off). Memory
    /// below [`SMALL_PAGES_BELOW`] is never advised.
    pub fn with_huge_pages(
        hv: &H,
        ram: &[(GuestAddress, usize)],
        ncpus: u32,
        split_irqchip: bool,
        huge_pages: bool,
    ) -> Result<Self, MachineError> {
        // 32 pins: KVM reports EOIs only for level routes on GSIs below the reserved pin count, and
        // our I/O APIC has 32 inputs (the HPET routes to 24-31). MSI-X vectors get GSIs above.
        let vm = hv.create_vm(split_irqchip.then_some(crate::routes::IOAPIC_RESERVED_PINS))?;
        let total: u64 = ram.iter().map(|(_, l)| *l as u64).sum();
        let memory = map_guest_ram(ram).map_err(|why| MachineError::Memory { size: total, why })?;
        for (slot, region) in memory.iter().enumerate() {
            let host =
                memory
                    .get_host_address(region.start_addr())
                    .map_err(|e| MachineError::Memory {
                        size: total,
                        why: e.to_string(),
                    })?;
            let slot = u32::try_from(slot).unwrap_or(u32::MAX);
            if huge_pages {
                // The first 2 MiB of guest-physical memory stays on small pages (see
                // `SMALL_PAGES_BELOW`); the rest is advised.
                let skip = SMALL_PAGES_BELOW
                    .saturating_sub(region.start_addr().0)
                    .min(region.len());
                advise_huge_pages(
                    host.wrapping_add(usize::try_from(skip).unwrap_or(0)),
                    region.len() - skip,
                );
            }
            // SAFETY: the mapping belongs to `memory`, which the Machine owns and drops only after
            // every vCPU thread has been joined.
            unsafe {
                vm.map_memory(slot, region.start_addr().0, host as u64, region.len())?;
            }
        }
        Ok(Self {
            vm: Arc::new(vm),
            memory,
            ncpus,
        })
    }

    /// Guest memory, for loaders.
    pub fn memory(&self) -> &GuestMemoryMmap<()> {
        &self.memory
    }

    /// The VM (for MSI injection by device models).
    pub fn vm(&self) -> &Arc<H::Vm> {
        &self.vm
    }

    /// Runs the VM until it stops. (To stop it from outside, use [`Machine::start`] and
    /// [`RunningVm::stop_switch`].)
    pub fn run(
        self,
        entry: EntryRegs,
        devices: Devices,
        requests: Arc<VmRequests>,
        cfg: &RunConfig,
    ) -> Result<RunOutcome, MachineError> {
        self.start(entry, devices, requests, cfg)?
            .wait()
            .ok_or_else(|| MachineError::Rings("run outcome already taken".into()))
    }

    /// Starts every vCPU and device-model thread and returns a handle to the running VM.
    pub fn start(
        self,
        entry: EntryRegs,
        devices: Devices,
        requests: Arc<VmRequests>,
        cfg: &RunConfig,
    ) -> Result<RunningVm<H>, MachineError> {
        // A device registered after its zone may have landed in it: check again.
        for z in &devices.coalesced {
            devices.check_zone(z)?;
        }
        install_kick_handler();
        let platform = Arc::new(Platform {
            bus: devices.bus,
            fast: devices.fast,
            names: devices.names,
            requests: requests.clone(),
            eoi: devices.eoi,
            coalesced_zones: crate::coalesced::LazyZones::new(devices.coalesced),
            coalesced: std::sync::OnceLock::new(),
        });
        let host = host_cpus();
        let completion_spin = completion_spin_for(cfg, self.ncpus, host);
        let n = usize::try_from(self.ncpus).unwrap_or(1);
        let stopping = Arc::new(AtomicBool::new(false));
        let slow_stop = Arc::new(AtomicBool::new(false));
        let slow_side = Arc::new(SlowSide::new(devices.slow));
        let (done_tx, done_rx) = mpsc::channel::<(u32, VcpuOutcome)>();
        let stop = Arc::new(
            StopSwitch::new().map_err(|e| MachineError::Rings(format!("stop eventfd: {e}")))?,
        );
        let mut controls = Vec::with_capacity(n);
        let mut vcpu_threads = Vec::with_capacity(n);
        let mut slow_threads = Vec::with_capacity(n);
        let mut vcpu_stats = Vec::with_capacity(n);
        let mut slow_stats = Vec::with_capacity(n);
        let clock = *perf::Clock::global();
        let (trace_switch, trace_writers, trace_collector) =
            perf::trace_rings(self.ncpus, cfg.trace_capacity)
                .map_err(|e| MachineError::Rings(format!("trace rings: {e}")))?;
        trace_switch.set(cfg.trace);
        let mut trace_writers = trace_writers.into_iter();
        let mut histograms = Vec::with_capacity(n);
        let segments = self
            .memory
            .iter()
            .map(|r| (r.start_addr().0, r.len()))
            .collect();
        // One exit ring and one completion ring per CPU, in one memfd mapping laid out as the exit
        // ABI prescribes (the layout the two halves would share across processes).
        let ring_err = |e: &dyn std::fmt::Display| MachineError::Rings(e.to_string());
        let size = RingSet::required_size(self.ncpus, cfg.ring_capacity, cfg.ring_capacity)
            .map_err(|e| ring_err(&e))?;
        let shm = SharedRegion::create(size).map_err(|e| ring_err(&e))?;
        // Fresh memfd pages are zero: only the headers are written now.
        let rings = RingSet::format_zeroed(
            shm.region(),
            self.ncpus,
            cfg.ring_capacity,
            cfg.ring_capacity,
        )
        .map_err(|e| ring_err(&e))?;
        // Every vCPU exists in KVM before any of them runs: an INIT/SIPI the BSP sends to an AP that
        // KVM has not created yet is lost (the AP never starts).
        let created = Arc::new(std::sync::atomic::AtomicU32::new(0));
        for i in 0..self.ncpus {
            let idx = usize::try_from(i).unwrap_or(0);
            let vside = rings.vcpu_side(i).map_err(|e| ring_err(&e))?;
            let dside = rings.device_side(i).map_err(|e| ring_err(&e))?;
            let (ep, cc) = (vside.exits, vside.completions);
            let (mut ec, mut cp) = (dside.exits, dside.completions);

            // The device-model thread of this ring.
            let ss = slow_side.clone();
            slow_stats.push(ss.stats.clone());
            let st = slow_stop.clone();
            let spin = cfg.device_spin;
            let place = Placement::of(cfg, idx, host, allowed_host_cpus(), completion_spin);
            let pin = place.device_model;
            let name = format!("devmodel-{i}");
            slow_threads.push(
                std::thread::Builder::new()
                    .name(name.clone())
                    .spawn(move || {
                        if let Some(cpu) = pin {
                            let _ = pin_to_cpu(cpu);
                        }
                        ss.serve(&mut ec, &mut cp, &st, spin)
                    })
                    .map_err(|source| MachineError::Thread { name, source })?,
            );

            // The vCPU thread.
            let control = Arc::new(VcpuControl::new(i));
            controls.push(control.clone());
            let stats = Arc::new(VcpuStats::with_devices(platform.names.len()));
            vcpu_stats.push(stats.clone());
            let slow = RingSlowPath {
                exits: ep,
                completions: cc,
                spin: place.completion_spin,
                timeout: cfg.completion_timeout,
                stopping: stopping.clone(),
            };
            let hist = Arc::new(perf::HistogramSet::new());
            histograms.push(hist.clone());
            let probe = perf::VcpuProbe::new(i, clock, hist, trace_writers.next());
            let vm = self.vm.clone();
            let (created, ncpus) = (created.clone(), self.ncpus);
            let create_timeout = cfg.control_timeout;
            let platform = platform.clone();
            let (done, bell) = (done_tx.clone(), stop.clone());
            let pin = place.vcpu;
            let entry = (i == 0).then_some(entry);
            let name = format!("vcpu-{i}");
            vcpu_threads.push(
                std::thread::Builder::new()
                    .name(name.clone())
                    .spawn(move || {
                        if let Some(cpus) = pin {
                            let _ = pin_to_cpus(&cpus);
                        }
                        let outcome = (|| {
                            let mut vcpu = vm.create_vcpu(i);
                            // vCPU 0 maps the VM's coalesced-write ring before any vCPU runs
                            // (the others wait below); zones are registered at first use.
                            if let (0, Ok(v)) = (i, vcpu.as_mut()) {
                                setup_coalescing(&vm, v, &platform);
                            }
                            // Counted even if it failed: the others must not wait for it.
                            created.fetch_add(1, Ordering::AcqRel);
                            let t0 = Instant::now();
                            while created.load(Ordering::Acquire) < ncpus
                                && t0.elapsed() < create_timeout
                            {
                                std::thread::sleep(Duration::from_micros(50));
                            }
                            let mut vcpu = vcpu?;
                            if let Some(e) = entry {
                                vcpu.set_entry(&e)?;
                            }
                            let mut handler = ExitHandler::new(i, platform, slow, stats, probe);
                            Ok::<_, BackendError>(run_vcpu(&mut vcpu, &mut handler, &control))
                        })()
                        .unwrap_or_else(|e| VcpuOutcome::Error(format!("vCPU {i}: {e}")));
                        let _ = done.send((i, outcome));
                        bell.ring();
                    })
                    .map_err(|source| MachineError::Thread { name, source })?,
            );
        }
        drop(done_tx);
        Ok(RunningVm {
            device_names: platform.names.clone(),
            platform: platform.clone(),
            clock,
            histograms,
            trace_switch,
            trace: Mutex::new(TraceStore {
                collector: trace_collector,
                events: Vec::new(),
                max: cfg.trace_max_events,
                dropped: 0,
            }),
            _rings: shm,
            vm: self.vm,
            memory: Mutex::new(Some(self.memory)),
            segments,
            requests,
            controls,
            vcpu_stats,
            slow_stats,
            stop,
            stopping,
            slow_stop,
            control_timeout: cfg.control_timeout,
            halt_detection: cfg.halt_detection,
            started: Instant::now(),
            inner: Mutex::new(Some(Threads {
                done_rx,
                vcpu_threads,
                slow_threads,
            })),
        })
    }
}

/// Trace events collected so far (bounded).
struct TraceStore {
    collector: perf::TraceCollector,
    events: Vec<perf::TraceEvent>,
    max: usize,
    dropped: u64,
}

impl TraceStore {
    fn drain(&mut self) {
        let mut batch = Vec::new();
        // A corrupt trace ring only costs its events.
        let _ = self.collector.drain(&mut batch);
        let room = self.max.saturating_sub(self.events.len());
        if batch.len() > room {
            self.dropped += u64::try_from(batch.len() - room).unwrap_or(u64::MAX);
            batch.truncate(room);
        }
        self.events.extend(batch);
    }
}

/// Stops a running VM from outside ([`StopSwitch::stop`]) and wakes the thread in
/// [`RunningVm::wait`] at once, for a stop as for a vCPU that ended, instead of at that thread's
/// next periodic look (up to [`WATCH_IDLE`] while the VM is idle).
///
/// [`StopSwitch::stop`] is async-signal-safe (an atomic store and a `write(2)` to an eventfd), so
/// a signal handler may call it.
#[derive(Debug)]
pub struct StopSwitch {
    flag: AtomicBool,
    bell: vmm_sys_util::eventfd::EventFd,
}

impl StopSwitch {
    fn new() -> Result<Self, std::io::Error> {
        Ok(Self {
            flag: AtomicBool::new(false),
            bell: vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
        })
    }

    /// Asks the VM to stop (as SIGTERM does): the waiting thread sees it at once.
    pub fn stop(&self) {
        self.flag.store(true, Ordering::Release);
        self.ring();
    }

    /// Whether a stop was asked for.
    pub fn is_set(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    /// Wakes the waiting thread (a stop, or a vCPU thread that has sent its outcome).
    fn ring(&self) {
        // Only fails if the counter would overflow, which leaves it readable anyway.
        let _ = self.bell.write(1);
    }

    /// Waits until the bell rings or `timeout` passes, and clears it. True if it rang.
    fn wait(&self, timeout: Duration) -> bool {
        let mut pfd = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&self.bell),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(timeout.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n > 0 {
            // Non-blocking: clears the counter, or finds it already cleared.
            let _ = self.bell.read();
            true
        } else {
            false
        }
    }
}

/// The threads of a running VM, owned by whoever calls [`RunningVm::wait`].
struct Threads {
    done_rx: mpsc::Receiver<(u32, VcpuOutcome)>,
    vcpu_threads: Vec<std::thread::JoinHandle<()>>,
    slow_threads: Vec<std::thread::JoinHandle<Result<(), RingError>>>,
}

/// A running VM: what control requests (bhyvectl, signals) act on. Shareable (`Arc`); one thread
/// calls [`RunningVm::wait`].
pub struct RunningVm<H: Hypervisor> {
    device_names: Vec<String>,
    platform: Arc<Platform>,
    clock: perf::Clock,
    histograms: Vec<Arc<perf::HistogramSet>>,
    trace_switch: perf::TraceSwitch,
    trace: Mutex<TraceStore>,
    /// The ring set's memory (every ring handle also keeps it mapped).
    _rings: SharedRegion,
    vm: Arc<H::Vm>,
    memory: Mutex<Option<GuestMemoryMmap<()>>>,
    segments: Vec<(u64, u64)>,
    requests: Arc<VmRequests>,
    controls: Vec<Arc<VcpuControl>>,
    vcpu_stats: Vec<Arc<VcpuStats>>,
    slow_stats: Vec<Arc<SlowStats>>,
    stop: Arc<StopSwitch>,
    stopping: Arc<AtomicBool>,
    slow_stop: Arc<AtomicBool>,
    control_timeout: Duration,
    halt_detection: bool,
    started: Instant,
    inner: Mutex<Option<Threads>>,
}

impl<H: Hypervisor> std::fmt::Debug for RunningVm<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningVm")
            .field("ncpus", &self.controls.len())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<H: Hypervisor> RunningVm<H> {
    /// Number of vCPUs.
    pub fn ncpus(&self) -> u32 {
        u32::try_from(self.controls.len()).unwrap_or(u32::MAX)
    }

    /// Live per-vCPU counters.
    pub fn vcpu_stats(&self) -> &[Arc<VcpuStats>] {
        &self.vcpu_stats
    }

    /// Device names by device id (the index of [`VcpuStats::per_device`]).
    pub fn device_names(&self) -> &[String] {
        &self.device_names
    }

    /// Live per device-model thread counters.
    pub fn slow_stats(&self) -> &[Arc<SlowStats>] {
        &self.slow_stats
    }

    /// The clock the latency histograms and trace events use.
    pub fn clock(&self) -> &perf::Clock {
        &self.clock
    }

    /// Live per-vCPU latency histograms.
    pub fn histograms(&self) -> &[Arc<perf::HistogramSet>] {
        &self.histograms
    }

    /// Turns exit tracing on or off at run time.
    pub fn set_tracing(&self, on: bool) {
        self.trace_switch.set(on);
    }

    /// Takes the trace events collected so far (sorted by time), and how many were dropped (rings
    /// full, or over the in-memory bound).
    pub fn take_trace(&self) -> (Vec<perf::TraceEvent>, u64) {
        let mut t = lock(&self.trace);
        t.drain();
        let mut events = std::mem::take(&mut t.events);
        perf::sort_by_time(&mut events);
        let dropped = t.dropped + t.collector.dropped();
        (events, dropped)
    }

    /// Guest memory segments: (guest-physical address, length).
    pub fn memory_segments(&self) -> &[(u64, u64)] {
        &self.segments
    }

    /// What stops the VM from the host (signal handlers use it).
    pub fn stop_switch(&self) -> Arc<StopSwitch> {
        self.stop.clone()
    }

    /// Asks the VM to stop as if the guest had made `req` (bhyvectl --suspend, --force-reset).
    pub fn request(&self, req: VmRequest) {
        self.requests.request(req);
        for c in &self.controls {
            c.kick();
        }
    }

    /// Pauses every vCPU (bounded).
    pub fn pause(&self) -> Result<(), ControlError> {
        self.controls
            .iter()
            .try_for_each(|c| c.request(RunState::Paused, self.control_timeout))
    }

    /// Resumes every vCPU (bounded).
    pub fn resume(&self) -> Result<(), ControlError> {
        self.controls
            .iter()
            .try_for_each(|c| c.request(RunState::Running, self.control_timeout))
    }

    fn vcpu(&self, vcpu: u32) -> Result<&Arc<VcpuControl>, ControlError> {
        self.controls
            .get(usize::try_from(vcpu).unwrap_or(usize::MAX))
            .ok_or(ControlError::NotRunning(vcpu))
    }

    /// Runs a register operation on vCPU `vcpu`'s thread.
    pub fn vcpu_op(&self, vcpu: u32, op: VcpuOp) -> Result<VcpuOpResult, ControlError> {
        self.vcpu(vcpu)?.call(op, self.control_timeout)
    }

    /// Injects an MSI into the guest.
    pub fn signal_msi(&self, addr: u64, data: u32) -> Result<(), BackendError> {
        self.vm.signal_msi(addr, data)
    }

    /// The VM (for device models that inject interrupts).
    pub fn vm(&self) -> &Arc<H::Vm> {
        &self.vm
    }

    /// Whether every vCPU is halted with interrupts off (or is an AP never started).
    fn all_halted_with_interrupts_off(&self) -> bool {
        self.controls.iter().all(|c| {
            matches!(
                c.call(VcpuOp::HaltedWithInterruptsOff, self.control_timeout),
                Ok(VcpuOpResult::Flag(true))
            )
        })
    }

    /// Waits for the VM to stop, stops everything within bounds, and returns how it ended. Returns
    /// `None` if another thread already waited.
    pub fn wait(&self) -> Option<RunOutcome> {
        let threads = lock(&self.inner).take()?;
        let Threads {
            done_rx,
            vcpu_threads,
            slow_threads,
        } = threads;
        let n = self.controls.len();
        let exits = || -> Vec<u64> {
            self.vcpu_stats
                .iter()
                .map(|s| s.get(crate::stats::Stat::VmExitTotal))
                .collect()
        };
        let (mut quiet_since, mut last_exits) = (Instant::now(), exits());
        let mut coalesced_pending = false;
        let mut period = WATCH_BUSY;
        // Wait for the first vCPU to stop, or for a stop from outside.
        let first = loop {
            match done_rx.try_recv() {
                Ok(o) => break Some(o),
                Err(mpsc::TryRecvError::Disconnected) => break None,
                Err(mpsc::TryRecvError::Empty) => {}
            }
            if self.stop.is_set() {
                break None;
            }
            // A vCPU thread rings after sending its outcome, a stop after setting its flag: a
            // ring after the looks above is not lost (the eventfd keeps it), so a wake-up only
            // has to look again.
            if self.stop.wait(period) {
                continue;
            }
            let tracing = self.trace_switch.is_enabled();
            if tracing {
                lock(&self.trace).drain();
            }
            // A device on the slow side may have asked (a vCPU notices on its next exit;
            // kick so a vCPU halted in the kernel notices too).
            if self.requests.pending().is_some() {
                for c in &self.controls {
                    c.kick();
                }
            }
            // Coalesced writes waiting on two checks in a row: nothing exited since (a
            // reset through 0xCF9 followed by a busy loop). vCPU 0 applies them on a kick.
            let pending = self.platform.coalesced.get().is_some_and(|r| !r.is_empty());
            if pending && coalesced_pending {
                if let Some(c) = self.controls.first() {
                    c.kick();
                }
            }
            coalesced_pending = pending;
            // Halt detection: only when no vCPU has taken an exit for a while, so a busy
            // VM never pays for it.
            let now_exits = exits();
            let busy = now_exits != last_exits || pending || tracing;
            period = if busy { WATCH_BUSY } else { WATCH_IDLE };
            if now_exits != last_exits {
                (quiet_since, last_exits) = (Instant::now(), now_exits);
            } else if self.halt_detection
                && quiet_since.elapsed() >= HALT_CHECK_AFTER
                && self.all_halted_with_interrupts_off()
            {
                self.request(VmRequest::Halt);
            } else if quiet_since.elapsed() >= HALT_CHECK_AFTER {
                quiet_since = Instant::now();
            }
        };
        let elapsed = self.started.elapsed();
        let mut exit = match &first {
            Some((_, VcpuOutcome::Request(r))) => RunExit::Request(*r),
            Some((_, VcpuOutcome::Error(m))) => RunExit::Error(m.clone()),
            Some((_, VcpuOutcome::Stopped)) | None => match self.requests.pending() {
                Some(r) => RunExit::Request(r),
                None => RunExit::Stopped,
            },
        };

        // Stop every vCPU (bounded), then the device-model threads.
        self.stopping.store(true, Ordering::Release);
        let mut problems = Vec::new();
        for c in &self.controls {
            if let Err(e) = c.request(RunState::Stopping, self.control_timeout) {
                problems.push(e.to_string());
            }
        }
        let mut remaining = n - usize::from(first.is_some());
        let deadline = Instant::now() + self.control_timeout;
        while remaining > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            match done_rx.recv_timeout(left) {
                Ok((i, VcpuOutcome::Error(m))) => {
                    problems.push(format!("vCPU {i} while stopping: {m}"));
                    remaining -= 1;
                }
                Ok(_) => remaining -= 1,
                Err(_) => {
                    problems.push(format!(
                        "{remaining} vCPU thread(s) did not stop within {:?}: suspected deadlock",
                        self.control_timeout
                    ));
                    break;
                }
            }
        }
        if remaining == 0 {
            for t in vcpu_threads {
                let _ = t.join();
            }
        } else if let Some(m) = lock(&self.memory).take() {
            // A vCPU thread is stuck and may still use guest memory: never unmap it under it.
            std::mem::forget(m);
        }
        let guest_resident = lock(&self.memory).as_ref().and_then(resident_bytes);
        self.slow_stop.store(true, Ordering::Release);
        for t in slow_threads {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    if matches!(exit, RunExit::Stopped | RunExit::Request(_)) {
                        exit = RunExit::Error(format!("device-model side: {e}"));
                    }
                }
                Err(_) => problems.push("a device-model thread panicked".to_string()),
            }
        }
        Some(RunOutcome {
            exit,
            vcpu_stats: self.vcpu_stats.clone(),
            slow_stats: self.slow_stats.clone(),
            elapsed,
            stop_problems: problems,
            histograms: {
                let mut all = perf::SetSnapshot::default();
                for h in &self.histograms {
                    all.merge(&h.snapshot());
                }
                all
            },
            guest_resident,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Nop;
    impl BusDevice for Nop {
        fn read(&mut self, _o: u64, _d: &mut [u8]) {}
        fn write(&mut self, _o: u64, _d: &[u8]) {}
    }

    #[test]
    fn each_vcpu_and_its_device_model_thread_get_their_cpus_and_spin() {
        let spin = Duration::from_micros(100);
        let auto = RunConfig::default();
        // Automatic: the idx-th allowed CPU, the device model on the next.
        assert_eq!(
            Placement::of(&auto, 1, 2, &[4, 6], spin),
            Placement {
                vcpu: Some(vec![6]),
                device_model: Some(4),
                completion_spin: spin
            }
        );
        let unpinned = RunConfig {
            pin: false,
            ..RunConfig::default()
        };
        assert_eq!(
            Placement::of(&unpinned, 0, 2, &[0, 1], spin),
            Placement {
                vcpu: None,
                device_model: None,
                completion_spin: spin
            }
        );
        // A user's set wins over `pin`, and keeps the device model off its CPUs.
        let user = RunConfig {
            pin: false,
            cpusets: vec![vec![1], vec![0, 1]],
            ..RunConfig::default()
        };
        assert_eq!(
            Placement::of(&user, 0, 2, &[0, 1], spin),
            Placement {
                vcpu: Some(vec![1]),
                device_model: Some(0),
                completion_spin: spin
            }
        );
        // A set that takes every allowed CPU: nowhere else for the device model; no spin.
        assert_eq!(
            Placement::of(&user, 1, 2, &[0, 1], spin),
            Placement {
                vcpu: Some(vec![0, 1]),
                device_model: None,
                completion_spin: Duration::ZERO
            }
        );
    }

    #[test]
    fn a_device_model_thread_goes_beside_a_vcpu_the_user_pinned_never_onto_its_cpus() {
        assert_eq!(cpu_outside(&[0, 1, 2, 3], &[1]), Some(2));
        assert_eq!(cpu_outside(&[0, 1, 2, 3], &[3]), Some(0));
        assert_eq!(cpu_outside(&[0, 1, 2, 3], &[0, 1, 3]), Some(2));
        assert_eq!(cpu_outside(&[4, 6], &[6]), Some(4));
        assert_eq!(cpu_outside(&[0, 1], &[0, 1]), None);
        assert_eq!(cpu_outside(&[], &[1]), None);
        // CPUs outside the process's set do not count.
        assert_eq!(cpu_outside(&[2, 3], &[9]), Some(2));
    }

    #[test]
    fn pinned_threads_go_to_the_cpus_the_process_may_run_on() {
        assert_eq!(nth_cpu(&[4, 5, 6, 7], 0), 4);
        assert_eq!(nth_cpu(&[4, 5, 6, 7], 5), 5);
        assert_eq!(nth_cpu(&[], 3), 3);
        // A thread whose mask allows only the last CPU reads exactly that CPU back.
        let all = allowed_cpus();
        assert!(!all.is_empty());
        let last = *all.last().unwrap();
        let seen = std::thread::spawn(move || {
            // A sandbox may forbid setting an affinity at all: then there is nothing to check.
            crate::runner::pin_to_cpu(last)
                .ok()
                .map(|()| allowed_cpus())
        })
        .join()
        .unwrap();
        let Some(seen) = seen else {
            eprintln!("sched_setaffinity refused here: only the mapping was checked");
            return;
        };
        assert_eq!(seen, vec![last]);
        assert_eq!(nth_cpu(&seen, 0), last);
        assert_eq!(nth_cpu(&seen, 1), last);
    }

    #[test]
    fn a_vcpu_spins_for_completions_only_with_a_cpu_of_its_own_and_another_for_its_device_model() {
        let cfg = RunConfig::default();
        let spins = cfg.completion_spin;
        assert!(!spins.is_zero());
        let none = Duration::ZERO;
        // (vCPUs, host CPUs, spins)
        for (ncpus, host, want) in [
            (1, 2, spins),
            (1, 8, spins),
            (4, 8, spins),
            (2, 2, spins),
            (8, 8, spins),
            (1, 1, none),
            (2, 1, none),
            (3, 2, none),
            (9, 8, none),
            (u32::MAX, 1 << 20, none),
        ] {
            assert_eq!(
                completion_spin_for(&cfg, ncpus, host),
                want,
                "{ncpus} vCPUs on {host} CPUs"
            );
        }
        let forced = RunConfig {
            spin_when_shared: true,
            ..RunConfig::default()
        };
        assert_eq!(completion_spin_for(&forced, 2, 1), spins);
    }

    #[test]
    fn guest_ram_is_placed_congruent_with_its_guest_addresses_modulo_2_mib() {
        use vm_memory::Bytes;
        for round in 0..20u64 {
            // Lengths that are not multiples of 2 MiB: kernels that align large anonymous
            // mappings themselves (Linux 6.7 and later) do so only for those that are.
            let ram = [
                (GuestAddress(0), 17 << 20),
                (GuestAddress(0x1_0000_0000 + (1 << 20)), 7 << 20),
            ];
            // Something else mapped in between, as other threads do.
            let other = vec![0u8; usize::try_from(round * 4096 + 1).unwrap()];
            let mem = map_guest_ram(&ram).unwrap();
            for (gpa, len) in ram {
                let host = mem.get_host_address(gpa).unwrap() as usize;
                assert_eq!(
                    host % RAM_HOST_ALIGN,
                    usize::try_from(gpa.0 % RAM_HOST_ALIGN as u64).unwrap(),
                    "round {round}: guest {:#x} at host {host:#x}",
                    gpa.0
                );
                let last = GuestAddress(gpa.0 + len as u64 - 8);
                mem.write_obj(0x1234_5678_9abc_def0u64 ^ round, last)
                    .unwrap();
                assert_eq!(
                    mem.read_obj::<u64>(last).unwrap(),
                    0x1234_5678_9abc_def0 ^ round
                );
            }
            drop(other);
        }
    }

    #[test]
    fn a_stop_wakes_the_waiting_thread_instead_of_waiting_for_its_next_look() {
        let switch = Arc::new(StopSwitch::new().unwrap());
        // Nothing rang: the wait times out.
        assert!(!switch.wait(Duration::from_millis(1)));
        let s = switch.clone();
        let waiter = std::thread::spawn(move || s.wait(Duration::from_secs(30)));
        std::thread::sleep(Duration::from_millis(50));
        assert!(!switch.is_set());
        switch.stop();
        assert!(
            waiter.join().unwrap(),
            "the stop did not wake the waiting thread (it timed out)"
        );
        assert!(switch.is_set());
        // A ring before anyone waits is kept for the next wait, then cleared by it.
        switch.ring();
        assert!(switch.wait(Duration::from_secs(30)));
        assert!(!switch.wait(Duration::from_millis(1)));
    }

    #[test]
    fn coalesced_zones_may_hold_only_fast_devices_or_nobody() {
        let mut d = Devices::new();
        d.add(
            "fast",
            Space::Pio,
            0xcf8,
            1,
            Stage::Fast,
            Arc::new(Mutex::new(Nop)),
        )
        .unwrap();
        d.add(
            "slow",
            Space::Pio,
            0xcfc,
            4,
            Stage::Slow,
            Arc::new(Mutex::new(Nop)),
        )
        .unwrap();
        // 0xcf8 fast, 0xcf9-0xcfb nobody's: fine.
        d.coalesce(Space::Pio, 0xcf8, 4).unwrap();
        // Reaching into the slow device is refused, naming it.
        let e = d.coalesce(Space::Pio, 0xcfa, 4).unwrap_err().to_string();
        assert!(e.contains("slow"), "{e}");
        assert!(d.coalesce(Space::Mmio, 0x1000, 0).is_err(), "empty zone");
        assert!(
            d.coalesce(Space::Mmio, u64::MAX, 4).is_err(),
            "past the end"
        );
        // A slow device registered later inside the zone is caught by the check `start` repeats.
        let mut late = Devices::new();
        late.coalesce(Space::Pio, 0x70, 1).unwrap();
        late.add(
            "late",
            Space::Pio,
            0x70,
            2,
            Stage::Slow,
            Arc::new(Mutex::new(Nop)),
        )
        .unwrap();
        let z = late.coalesced_zones()[0];
        assert!(late.check_zone(&z).is_err());
        assert_eq!(
            d.coalesced_zones(),
            &[CoalescedZone {
                pio: true,
                addr: 0xcf8,
                len: 4
            }]
        );
    }
}
