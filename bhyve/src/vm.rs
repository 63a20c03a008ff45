//! Builds and runs one VM from a [`Config`]: the bhyve(8) main path.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use stages::acpipm::{Pm1, ResetControl, PM1_LEN, PM1_PORT, RESET_CONTROL_LEN, RESET_CONTROL_PORT};
use stages::misc::{
    Absent, BootDone, DebugExit, Scratch, ScratchMem, BOOT_DONE_PORT, COM3_BASE, COM4_BASE,
    DEBUG_EXIT_PORT, I8042, I8042_COMMAND_PORT, I8042_DATA_PORT, PCI_CFA_LEN, PCI_CFA_PORT,
    SCRATCH_FAST_PORT, SCRATCH_MMIO_BASE, SCRATCH_MMIO_LEN, SCRATCH_PORT_LEN, SCRATCH_SLOW_PORT,
};
use stages::models::console::{self, ConsoleWriter};
use stages::models::uart::{Uart, COM1_BASE, COM1_IRQ, COM2_BASE, COM2_IRQ, UART_LEN};
use stages::pc::{MsiFn, MsiRoute, PcConfig, PcPlatform};
use stages::BusDevice;
use stages::{Space, Stage, VmRequests};
use vcpu_runner::{Devices, EntryRegs, Hypervisor, KvmHypervisor, Machine, RunConfig, Vm};

use crate::opts::{BootProtocol, Config, ConsoleBackend};

/// Why a VM could not be set up (exit status 4).
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// A file named on the command line cannot be read.
    #[error("Cannot read {what} {path}: {source}")]
    Read {
        /// Kernel, initrd, ...
        what: &'static str,
        /// Path.
        path: String,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The image is not something we can boot.
    #[error("Cannot load kernel {path}: {source}")]
    Load {
        /// Path.
        path: String,
        /// Loader's reason.
        #[source]
        source: loader::LoaderError,
    },
    /// A vCPU's host CPU set (`-p`) names CPUs this process may not run on.
    #[error(
        "Bad value '{cpus}' for vcpu.{vcpu}.cpuset (-p): host CPU {bad} is not one this process may run on ({allowed})"
    )]
    CpuSet {
        /// The vCPU.
        vcpu: u32,
        /// The set given.
        cpus: String,
        /// The first CPU of it that is not allowed.
        bad: usize,
        /// The CPUs the process may run on.
        allowed: String,
    },
    /// The module refused (tunables, capabilities, hw.vmm.maxcpu, the VM's name).
    #[error("{0}")]
    Module(#[from] kmod::VmmError),
    /// The initrd does not fit in guest memory beside the kernel.
    #[error(
        "Cannot load initrd {path} ({size_mib} MiB): it does not fit in the {mem_mib} MiB of guest memory beside the kernel ({source})"
    )]
    InitrdTooLarge {
        /// Path.
        path: String,
        /// Its size in MiB (rounded up).
        size_mib: u64,
        /// Guest memory in MiB.
        mem_mib: u64,
        /// Loader's reason.
        #[source]
        source: loader::LoaderError,
    },
    /// Memory that cannot be had.
    #[error("Guest memory of {asked} MiB (-m) cannot be had: {why}")]
    Memory {
        /// MiB asked for.
        asked: u64,
        /// Why.
        why: String,
    },
    /// A console backend cannot be opened.
    #[error("Cannot open console {what}: {source}")]
    Console {
        /// Which.
        what: String,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// A device model could not be set up.
    #[error("{0}")]
    Device(String),
    /// The in-module platform could not be registered.
    #[error("In-module devices: {0}")]
    Platform(String),
    /// The hypervisor refused.
    #[error(transparent)]
    Backend(#[from] vcpu_runner::BackendError),
    /// Building or running the machine failed.
    #[error(transparent)]
    Machine(#[from] vcpu_runner::MachineError),
}

/// The ACPI PM1 block with its SCI wired to the platform's ISA IRQ 9 (level, as the FADT says).
struct SciPm1 {
    pm1: Pm1,
    pc: Arc<PcPlatform>,
}

impl BusDevice for SciPm1 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.pm1.read(offset, data);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.pm1.write(offset, data);
        self.pc
            .set_irq(stages::acpipm::SCI_IRQ, self.pm1.sci_level());
    }
}

/// How long the end of a run waits for console output to reach a slow backend.
const CONSOLE_DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Set by SIGINT, SIGTERM or SIGHUP.
static STOP: AtomicBool = AtomicBool::new(false);

/// The running VM's stop switch, for the signal handler (null before the VM starts). It points
/// into an `Arc` leaked for the rest of the process, so the handler can never see it freed.
static VM_STOP: std::sync::atomic::AtomicPtr<vcpu_runner::StopSwitch> =
    std::sync::atomic::AtomicPtr::new(std::ptr::null_mut());

extern "C" fn on_terminate(_sig: libc::c_int) {
    STOP.store(true, Ordering::Release);
    let vm = VM_STOP.load(Ordering::Acquire);
    if !vm.is_null() {
        // SAFETY: a non-null VM_STOP points into a leaked `Arc<StopSwitch>` (see
        // `stop_on_signals`), valid for the rest of the process; `StopSwitch::stop` is
        // async-signal-safe (an atomic store and a write(2)).
        unsafe { (*vm).stop() };
    }
}

/// From now on SIGINT, SIGTERM and SIGHUP stop the VM straight from the handler, which also wakes
/// the thread waiting for the VM (so the stop takes effect at once, idle VM or not); a signal
/// that came before is applied now. (This replaced a thread that polled for signals every 10 ms:
/// 100 wake-ups a second of an idle VM.)
fn stop_on_signals(switch: Arc<vcpu_runner::StopSwitch>) {
    let ptr = Arc::into_raw(switch).cast_mut();
    // Published before STOP is looked at: a signal after this store stops the VM itself, one
    // before it is seen in STOP below.
    VM_STOP.store(ptr, Ordering::SeqCst);
    if STOP.load(Ordering::SeqCst) {
        // SAFETY: `ptr` comes from `Arc::into_raw` above and is never released.
        unsafe { (*ptr).stop() };
    }
}

fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: all-zero is a valid `sigaction`.
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = on_terminate as *const () as usize;
        // SAFETY: `sa.sa_mask` is a valid, writable signal set.
        unsafe { libc::sigemptyset(&mut sa.sa_mask) };
        // SAFETY: the handler only stores to an atomic (async-signal-safe).
        unsafe { libc::sigaction(sig, &sa, std::ptr::null_mut()) };
    }
}

/// A kernel or initrd named on the command line, opened. A regular file is measured, not read:
/// the loaders read a kernel's headers from it and what they load straight into guest memory
/// (a Debian initramfs is 30–60 MiB, a bzImage 8–14 MiB, an ELF vmlinux 50 MiB or, unstripped,
/// hundreds: reading one into a buffer first cost a second copy and as much memory of the
/// monitor's own, at its peak; of a vmlinux only its loadable segments are read). Anything else
/// (a pipe, `<(…)`, a device) is read into memory at once, and refused once it passes `limit`
/// bytes (guest memory) without reading further: `-o boot.kernel=/dev/zero` is an error, not a
/// monitor that grows until the host runs out of memory. A regular file has no such bound (an
/// unstripped ELF vmlinux may be far larger than what it loads).
enum Image {
    File(std::fs::File, u64),
    Bytes(Vec<u8>),
}

impl Image {
    fn open(what: &'static str, p: &Path, limit: u64) -> Result<Self, VmError> {
        use std::io::Read;
        let err = |source| read_error(what, p, source);
        let file = std::fs::File::open(p).map_err(err)?;
        let meta = file.metadata().map_err(err)?;
        let image = if meta.is_file() {
            Image::File(file, meta.len())
        } else {
            let mut bytes = Vec::new();
            file.take(limit.saturating_add(1))
                .read_to_end(&mut bytes)
                .map_err(err)?;
            if u64::try_from(bytes.len()).unwrap_or(u64::MAX) > limit {
                return Err(err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("it is larger than the {} MiB of guest memory", limit >> 20),
                )));
            }
            Image::Bytes(bytes)
        };
        // An empty kernel or initrd is a mistake (a truncated download, a file being rewritten),
        // not "none": say so rather than boot a guest that finds nothing where it was promised
        // something.
        if image.blob().is_empty() {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the file is empty",
            )));
        }
        Ok(image)
    }

    fn blob(&self) -> loader::Blob<'_> {
        match self {
            Image::File(file, len) => loader::Blob::File { file, len: *len },
            Image::Bytes(b) => loader::Blob::Bytes(b),
        }
    }
}

/// The host CPU sets given for vCPUs (`-p`, `vcpu.N.cpuset`), by vCPU, each checked against the
/// CPUs this process may run on (its affinity mask: `taskset`, a cpuset).
fn vcpu_cpusets(cfg: &Config) -> Result<Vec<Vec<usize>>, VmError> {
    let allowed = vcpu_runner::machine::allowed_host_cpus();
    let mut out = vec![Vec::new(); usize::try_from(cfg.cpus).unwrap_or(0)];
    for (&vcpu, set) in &cfg.cpusets {
        if let Some(&bad) = set
            .iter()
            .find(|c| !allowed.is_empty() && !allowed.contains(c))
        {
            return Err(VmError::CpuSet {
                vcpu,
                cpus: crate::opts::cpuset_text(set),
                bad,
                allowed: crate::opts::cpuset_text(allowed),
            });
        }
        if let Some(slot) = usize::try_from(vcpu).ok().and_then(|i| out.get_mut(i)) {
            slot.clone_from(set);
        }
    }
    Ok(out)
}

/// A kernel or initrd that failed while the loader read it from its file (it shrank, or the file
/// system failed): the loader's error, with its cause, as a read error naming the file.
fn read_failed(what: &'static str, p: &Path, e: &loader::LoaderError) -> VmError {
    let why = match std::error::Error::source(e) {
        Some(why) if !e.to_string().contains(&why.to_string()) => format!("{e}: {why}"),
        _ => e.to_string(),
    };
    read_error(
        what,
        p,
        std::io::Error::new(std::io::ErrorKind::InvalidData, why),
    )
}

fn read_error(what: &'static str, p: &Path, source: std::io::Error) -> VmError {
    VmError::Read {
        what,
        path: p.display().to_string(),
        source,
    }
}

fn host_memory() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = s
        .lines()
        .find(|l| l.starts_with("MemTotal:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    kb.checked_mul(1024)
}

/// With `BHYVE_RS_TIMING=1`, prints how long after process start each set-up phase ended.
fn phase(label: &str) {
    use std::sync::OnceLock;
    static ON: OnceLock<bool> = OnceLock::new();
    if *ON.get_or_init(|| std::env::var_os("BHYVE_RS_TIMING").is_some()) {
        eprintln!(
            "bhyve: timing: {:>8.3} ms {label}",
            since_start_ns() as f64 / 1e6
        );
    }
}

/// Monotonic nanoseconds since the process started (for the UART's first-byte stamp).
fn since_start_ns() -> u64 {
    use std::sync::OnceLock;
    static START: OnceLock<Instant> = OnceLock::new();
    u64::try_from(START.get_or_init(Instant::now).elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// A console backend on a file descriptor (stdout, a file). The console's writer thread writes it;
/// the UART's own thread may too, with a write that cannot block ([`console::Backend::write_now`]):
/// `pwritev2(RWF_NOWAIT)` on pipes and sockets, `poll` then a short `write` on terminals (which
/// refuse RWF_NOWAIT). Never for a regular file: it always polls writable, yet a write can wait
/// for its file system (a stalled network mount), so file consoles are written by the writer
/// thread alone.
struct FdOut {
    file: std::fs::File,
    /// Whether `poll` tells when a write would block (not a regular file).
    pollable: bool,
    /// Whether `pwritev2(RWF_NOWAIT)` works on this descriptor (pipes and sockets: a write that
    /// would block fails at once instead); cleared when it says it does not (terminals).
    nowait: bool,
}

impl FdOut {
    fn new(file: std::fs::File) -> Self {
        let pollable = file.metadata().map(|m| !m.is_file()).unwrap_or(false);
        Self {
            file,
            pollable,
            nowait: pollable,
        }
    }

    /// One `pwritev2(RWF_NOWAIT)` at the current position: `Ok(bytes)` or `Err(errno)`.
    fn write_nowait(&self, buf: &[u8]) -> Result<usize, i32> {
        use std::os::fd::AsRawFd;
        let iov = libc::iovec {
            iov_base: buf.as_ptr().cast_mut().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: one iovec over `buf`, valid for `buf.len()` bytes and only read; offset -1 is
        // the current position (what `write` uses); RWF_NOWAIT never blocks.
        let n = unsafe { libc::pwritev2(self.file.as_raw_fd(), &iov, 1, -1, libc::RWF_NOWAIT) };
        usize::try_from(n).map_err(|_| {
            std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO)
        })
    }

    /// Bytes one direct write may carry. A pipe that polls writable has a free buffer of at least
    /// `PIPE_BUF`; a terminal that does has fewer than 256 characters pending and room for more;
    /// a regular file always polls writable. Either way a write this small does not block (the
    /// UART hands over one byte at a time anyway).
    const DIRECT_MAX: usize = 64;
}

impl Write for FdOut {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.file.write(b)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl console::Backend for FdOut {
    fn write_now(&mut self, buf: &[u8]) -> Option<usize> {
        use std::os::fd::AsRawFd;
        if !self.pollable {
            return None;
        }
        let buf = &buf[..buf.len().min(Self::DIRECT_MAX)];
        // Where the kernel offers it, a write that cannot block: a `poll` then a `write` could
        // block the device's thread if another process sharing the pipe filled it in between.
        if self.nowait {
            match self.write_nowait(buf) {
                Ok(n) if n > 0 => return Some(n),
                // Not for this kind of file (a terminal): poll and write from now on.
                Err(libc::EOPNOTSUPP | libc::EINVAL) => self.nowait = false,
                // Full (EAGAIN), or an error the writer thread reports (it retries the bytes).
                _ => return None,
            }
        }
        // A terminal: it has a single writer here unless the user shares it, and a write of at
        // most DIRECT_MAX bytes to one that polls writable does not block.
        let mut p = libc::pollfd {
            fd: self.file.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        // SAFETY: one valid pollfd; a zero timeout never blocks.
        let ready = unsafe { libc::poll(&mut p, 1, 0) };
        // (A pipe reports POLLWRNORM with POLLOUT; an error or hang-up is the writer's to report.)
        let bad = libc::POLLERR | libc::POLLHUP | libc::POLLNVAL;
        if ready != 1 || p.revents & libc::POLLOUT == 0 || p.revents & bad != 0 {
            return None;
        }
        match self.file.write(buf) {
            Ok(n) if n > 0 => Some(n),
            // Errors are the writer thread's to count (it retries the bytes through the ring).
            _ => None,
        }
    }
}

/// A writer that sends to the connected Unix-socket client, if any (output is dropped otherwise).
#[derive(Clone, Default)]
struct SocketOut(Arc<Mutex<Option<std::os::unix::net::UnixStream>>>);

impl console::Backend for SocketOut {
    fn write_now(&mut self, buf: &[u8]) -> Option<usize> {
        use std::os::fd::AsRawFd;
        let g = self.0.try_lock().ok()?;
        let Some(s) = g.as_ref() else {
            // No client: dropped, as `write` drops it.
            return Some(buf.len());
        };
        // SAFETY: `buf` is valid for `buf.len()` bytes; MSG_DONTWAIT never blocks.
        let n = unsafe {
            libc::send(
                s.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        // Would block, or failed: the writer thread takes it (and drops a broken client).
        usize::try_from(n).ok().filter(|&n| n > 0)
    }
}

impl Write for SocketOut {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = g.as_mut() {
            if s.write_all(b).is_err() {
                *g = None;
            }
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Adds a UART with its backend; host input goes to the guest from a reader thread.
///
/// The UART is a slow stage (its registers are served by the device-model thread); the bytes it
/// transmits go through a bounded ring to a writer thread `NAME-out`, which alone calls the backend
/// (stdout, a file or a socket may block), so a slow backend stalls neither a vCPU nor the
/// device-model thread. The returned writer is finished when the VM stops, so every byte the guest
/// wrote reaches the backend.
///
/// The UART as a fast stage (registers on the vCPU thread: no LSR read waits for a device-model
/// wake-up) was measured and backed out: in the emulated-SVM rig, guests then triple-faulted or took
/// L1 down during heavy serial output (verbose boots, dmesg dumps: 5 of about 30 such boots, none of
/// about 15 without it). See docs/perf-linux.md, "Open issues".
fn add_uart(
    devices: &mut Devices,
    name: &str,
    base: u64,
    backend: &ConsoleBackend,
    irq: Arc<dyn stages::models::uart::IrqLine>,
) -> Result<Option<ConsoleWriter>, VmError> {
    let (out, input): (Box<dyn console::Backend>, Option<Box<dyn Read + Send>>) = match backend {
        ConsoleBackend::Stdio => {
            use std::os::fd::AsFd;
            // Our own descriptor for stdout (unbuffered: the writer writes whole batches).
            let fd = std::io::stdout()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|source| VmError::Console {
                    what: format!("{name} stdout"),
                    source,
                })?;
            (
                Box::new(FdOut::new(std::fs::File::from(fd))),
                Some(Box::new(std::io::stdin())),
            )
        }
        ConsoleBackend::Null => (Box::new(std::io::sink()), None),
        ConsoleBackend::File(p) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|source| VmError::Console {
                    what: format!("{name} file {}", p.display()),
                    source,
                })?;
            (Box::new(FdOut::new(f)), None)
        }
        ConsoleBackend::Unix(p) => {
            let _ = std::fs::remove_file(p);
            let l = UnixListener::bind(p).map_err(|source| VmError::Console {
                what: format!("{name} socket {}", p.display()),
                source,
            })?;
            let out = SocketOut::default();
            let slot = out.0.clone();
            std::thread::Builder::new()
                .name(format!("{name}-accept"))
                .spawn(move || {
                    for s in l.incoming().flatten() {
                        *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(s);
                    }
                })
                .map_err(|source| VmError::Console {
                    what: format!("{name} socket thread"),
                    source,
                })?;
            (Box::new(out), None)
        }
    };
    let (out, writer): (Box<dyn Write + Send>, _) = if matches!(backend, ConsoleBackend::Null) {
        (out, None)
    } else {
        let (ring, writer) = console::spawn(&format!("{name}-out"), out, console::DEFAULT_CAPACITY)
            .map_err(|source| VmError::Console {
                what: format!("{name} output thread"),
                source,
            })?;
        (Box::new(ring), Some(writer))
    };
    let uart = Arc::new(Mutex::new(Uart::new(out, irq, since_start_ns)));
    devices.add(name, Space::Pio, base, UART_LEN, Stage::Slow, uart.clone())?;
    if let Some(mut input) = input {
        let _ = std::thread::Builder::new()
            .name(format!("{name}-input"))
            .spawn(move || {
                let mut buf = [0u8; 64];
                while let Ok(n) = input.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let mut rest = &buf[..n];
                    while !rest.is_empty() {
                        let took = uart
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .enqueue_input(rest);
                        rest = &rest[took..];
                        if took == 0 {
                            std::thread::sleep(std::time::Duration::from_millis(5));
                        }
                    }
                }
            });
    }
    Ok(writer)
}

/// Claims the legacy ports a guest probes on every boot where this machine has nothing (COM2 when
/// not configured, COM3, COM4, 0xCFA–0xCFB) as a floating bus: what an unclaimed access would get,
/// without an "unclaimed" line on stderr per probe (Linux makes 19 of them per boot).
fn add_absent(devices: &mut Devices, com2: bool) -> Result<(), VmError> {
    let mut ports = vec![
        ("com3-absent", COM3_BASE, UART_LEN),
        ("com4-absent", COM4_BASE, UART_LEN),
        ("pci-cfa", PCI_CFA_PORT, PCI_CFA_LEN),
    ];
    if !com2 {
        ports.push(("com2-absent", COM2_BASE, UART_LEN));
    }
    for (name, base, len) in ports {
        devices.add(
            name,
            Space::Pio,
            base,
            len,
            Stage::Fast,
            Arc::new(Mutex::new(Absent)),
        )?;
    }
    Ok(())
}

/// Builds the VM described by `cfg`, runs it, and returns the bhyve(8) exit status.
pub fn run(cfg: &Config) -> Result<i32, VmError> {
    since_start_ns();
    install_signal_handlers();
    // Checked before anything is set up: a bad set is the user's to fix.
    let cpusets = vcpu_cpusets(cfg)?;
    let kernel = Image::open("kernel", &cfg.kernel, cfg.memory)?;
    phase("kernel opened");
    let initrd = match &cfg.initrd {
        Some(p) => Some(Image::open("initrd", p, cfg.memory)?),
        None => None,
    };
    phase("initrd opened");
    let hv = KvmHypervisor::open()?;
    phase("/dev/kvm opened");
    // kldload vmm: the module, embedded in this process (bhyve(8) on a host where vmm.ko is
    // loaded). It checks the backend, reads the tunables, reserves pptdevs, and gives the VM its
    // name and its control socket.
    let mut load = kmod::LoadOptions::new(hv.capabilities().clone());
    load.tunables = cfg.tunables.clone();
    load.socket_dir = cfg.socket_dir.clone();
    load.module_socket = false;
    let (vmm, diagnostics) = kmod::Vmm::load(load)?;
    for d in &diagnostics {
        if !matches!(d, kmod::Diagnostic::Virtualization(_)) {
            eprintln!("bhyve: vmm: {d}");
        }
    }
    vmm.create_vm(&cfg.name, cfg.cpus)?;
    phase("module loaded, VM created");
    let mib = cfg.memory >> 20;
    if let Some(host) = host_memory() {
        if cfg.memory > host {
            return Err(VmError::Memory {
                asked: mib,
                why: format!("the host has only {} MiB", host >> 20),
            });
        }
    }
    let mut boot = loader::BootConfig::new(cfg.memory, &cfg.cmdline);
    boot.initrd = initrd.as_ref().map(Image::blob);
    boot.ncpus = cfg.cpus;
    let layout = boot.layout().map_err(|e| VmError::Memory {
        asked: mib,
        why: e.to_string(),
    })?;
    let machine = Machine::with_huge_pages(
        &hv,
        &layout.ram_ranges(),
        cfg.cpus,
        hv.capabilities().split_irqchip,
        cfg.huge_pages,
    )
    .map_err(|e| match e {
        vcpu_runner::MachineError::Memory { why, .. } => VmError::Memory { asked: mib, why },
        other => other.into(),
    })?;
    phase("guest memory mapped");
    let mem = machine.memory();
    // ACPI tables describe the platform (MADT for every vCPU, FADT with PM1/reset, HPET, MCFG,
    // DSDT with the COM ports): as bhyve(8) always does now, they are always built.
    let mut acpi = loader::AcpiConfig::new(cfg.cpus);
    acpi.com1 = cfg.com1.is_some();
    acpi.com2 = cfg.com2.is_some();
    acpi.mcfg = false; // no ECAM decoder yet: config space is reached through 0xCF8/0xCFC
    acpi.pci_slots = cfg.pci.iter().fold(0, |m, d| {
        m | 1u32.checked_shl(u32::from(d.slot)).unwrap_or(0)
    });
    let rsdp = loader::build_acpi(mem, &acpi).map_err(|source| VmError::Load {
        path: cfg.kernel.display().to_string(),
        source,
    })?;
    boot.rsdp_addr = Some(rsdp);
    phase("ACPI tables built");
    let loaded = match cfg.protocol {
        BootProtocol::Auto => loader::load_kernel(mem, kernel.blob(), &boot),
        BootProtocol::Linux => loader::load_linux(mem, kernel.blob(), &boot),
        BootProtocol::Pvh => loader::load_pvh(mem, kernel.blob(), &boot),
        BootProtocol::Multiboot => loader::load_multiboot(mem, kernel.blob(), &boot),
    }
    .map_err(|source| match (&cfg.initrd, &initrd, &source) {
        (
            Some(p),
            Some(initrd),
            loader::LoaderError::ModuleNoRoom { index: 0, .. }
            | loader::LoaderError::InitrdLargerThanRam { .. },
        ) => VmError::InitrdTooLarge {
            path: p.display().to_string(),
            size_mib: initrd.blob().len().div_ceil(1 << 20),
            mem_mib: mib,
            source,
        },
        // Read straight from its file: a file that shrank, or failed, while it was read.
        (Some(p), Some(_), loader::LoaderError::GuestWrite { what: "initrd", .. }) => {
            read_failed("initrd", p, &source)
        }
        // The kernel's headers are read from its file, and what it loads straight into guest
        // memory: the same for the kernel (the only other file the loader reads).
        _ if matches!(kernel, Image::File(..)) && source.is_file_read_failure() => {
            read_failed("kernel", &cfg.kernel, &source)
        }
        _ => VmError::Load {
            path: cfg.kernel.display().to_string(),
            source,
        },
    })?;
    let entry = EntryRegs::from(&loaded.entry);
    // The images are in guest memory now: close them, and give back the buffers of those read
    // from a pipe rather than hold them for the VM's whole life.
    drop(kernel);
    drop(initrd);
    phase("memory mapped, kernel loaded");

    let requests = Arc::new(VmRequests::new());
    let mut devices = Devices::new();

    // The in-module devices (I/O APIC, PIC, PIT, HPET, RTC, PM timer, PCI config mechanism #1),
    // delivering through KVM MSIs to the in-kernel local APICs.
    let kvm_vm = machine.vm().clone();
    let msi: MsiFn = Arc::new(move |addr, data| {
        // A failed injection has no guest-visible recovery; the platform counts what it sends.
        let _ = kvm_vm.signal_msi(addr, data);
    });
    let pc = PcPlatform::new(
        PcConfig {
            ncpus: cfg.cpus,
            ..PcConfig::default()
        },
        msi,
        requests.clone(),
    );
    // One owner of KVM's GSI routing table: the I/O APIC's level routes (GSIs below 32) and the
    // device models' MSI-X vectors (irqfds on GSIs from 32 up), merged.
    let gsi_routes = Arc::new(vcpu_runner::GsiRoutes::for_vm(
        machine.vm().clone(),
        hv.capabilities().irq_routes,
    ));
    let r = gsi_routes.clone();
    pc.set_route_sink(Arc::new(move |routes: &[MsiRoute]| {
        let table: Vec<(u32, u64, u32)> =
            routes.iter().map(|r| (r.gsi, r.address, r.data)).collect();
        r.set_ioapic_routes(&table).map_err(|e| e.to_string())
    }));
    let mut pc_err = None;
    // Configuration space: the platform's bridges, plus our device models through a mux on the
    // data port.
    let cf8 = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let extra: crate::pci::ExtraFunctions = Arc::new(Mutex::new(Vec::new()));
    pc.register(&mut |name, space, base, len, dev| {
        let dev: Arc<Mutex<dyn BusDevice>> = match name {
            "pci-address" => Arc::new(Mutex::new(crate::pci::AddressShadow {
                inner: dev,
                shadow: cf8.clone(),
            })),
            "pci-data" => Arc::new(Mutex::new(crate::pci::DataMux {
                inner: dev,
                shadow: cf8.clone(),
                extra: extra.clone(),
            })),
            _ => dev,
        };
        devices
            .add(name, space, base, len, Stage::Fast, dev)
            .map(|_| ())
            .map_err(|e| {
                let m = e.to_string();
                pc_err.get_or_insert_with(|| m.clone());
                m
            })
    })
    .map_err(|m| VmError::Platform(pc_err.take().unwrap_or(m)))?;
    devices.set_eoi_sink(pc.clone());
    phase("platform built");
    devices.add(
        "debug-exit",
        Space::Pio,
        DEBUG_EXIT_PORT,
        1,
        Stage::Fast,
        Arc::new(Mutex::new(DebugExit::new(requests.clone()))),
    )?;
    devices.add(
        "boot-done",
        Space::Pio,
        BOOT_DONE_PORT,
        1,
        Stage::Fast,
        Arc::new(Mutex::new(BootDone::new(requests.clone(), Instant::now()))),
    )?;
    devices.add(
        "i8042-data",
        Space::Pio,
        I8042_DATA_PORT,
        1,
        Stage::Fast,
        Arc::new(Mutex::new(I8042::data_port(requests.clone()))),
    )?;
    devices.add(
        "i8042-command",
        Space::Pio,
        I8042_COMMAND_PORT,
        1,
        Stage::Fast,
        Arc::new(Mutex::new(I8042::command_port(requests.clone()))),
    )?;
    devices.add(
        "acpi-pm1",
        Space::Pio,
        PM1_PORT,
        PM1_LEN,
        Stage::Fast,
        Arc::new(Mutex::new(SciPm1 {
            pm1: Pm1::new(requests.clone()),
            pc: pc.clone(),
        })),
    )?;
    devices.add(
        "reset-control",
        Space::Pio,
        RESET_CONTROL_PORT,
        RESET_CONTROL_LEN,
        Stage::Fast,
        Arc::new(Mutex::new(ResetControl::new(requests.clone()))),
    )?;
    let mut consoles = Vec::new();
    if let Some(b) = &cfg.com1 {
        consoles.extend(add_uart(
            &mut devices,
            "com1",
            COM1_BASE,
            b,
            pc.isa_line(COM1_IRQ),
        )?);
    }
    if let Some(b) = &cfg.com2 {
        consoles.extend(add_uart(
            &mut devices,
            "com2",
            COM2_BASE,
            b,
            pc.isa_line(COM2_IRQ),
        )?);
    }
    add_absent(&mut devices, cfg.com2.is_some())?;
    // Platform MMIO inside the PCI window that BARs must not take.
    let reserved: Vec<(u64, u64)> = if cfg.test_devices {
        vec![(SCRATCH_MMIO_BASE, SCRATCH_MMIO_LEN)]
    } else {
        Vec::new()
    };
    let intx = crate::pci::IntxLines::new(pc.clone());
    let pci = crate::pci::add_devices(
        &cfg.name,
        &cfg.pci,
        &machine,
        &mut devices,
        &crate::pci::PlatformWiring {
            extra: &extra,
            routes: &gsi_routes,
            intx: &intx,
            reserved: &reserved,
        },
    )
    .map_err(VmError::Device)?;
    if cfg.test_devices {
        devices.add(
            "scratch-slow",
            Space::Pio,
            SCRATCH_SLOW_PORT,
            SCRATCH_PORT_LEN,
            Stage::Slow,
            Arc::new(Mutex::new(Scratch::default())),
        )?;
        devices.add(
            "scratch-fast",
            Space::Pio,
            SCRATCH_FAST_PORT,
            SCRATCH_PORT_LEN,
            Stage::Fast,
            Arc::new(Mutex::new(Scratch::default())),
        )?;
        devices.add(
            "scratch-mmio",
            Space::Mmio,
            SCRATCH_MMIO_BASE,
            SCRATCH_MMIO_LEN,
            Stage::Slow,
            Arc::new(Mutex::new(ScratchMem::default())),
        )?;
    }
    // Index registers: their writes only select what the next data access (an exit) reaches, so
    // KVM may queue them instead of exiting; they reach their devices, in order, before the next
    // exit is handled (vcpu_runner::coalesced). I/O APIC IOREGSEL (616 exits per Linux boot in the
    // rig), PCI CONFIG_ADDRESS (194; its zone also holds 0xCF9-0xCFB), the RTC index (77).
    for (space, base, len) in [
        (Space::Mmio, stages::devices::ioapic::IOAPIC_BASE, 4),
        (
            Space::Pio,
            u64::from(stages::devices::pci::PCI_CONFIG_ADDRESS_PORT),
            4,
        ),
        (Space::Pio, u64::from(stages::devices::rtc::RTC_PORT), 1),
    ] {
        devices.coalesce(space, base, len)?;
    }
    let run_cfg = RunConfig {
        pin: cfg.pin,
        cpusets,
        trace: cfg.trace_enabled.unwrap_or(cfg.trace_file.is_some()),
        halt_detection: vmm.tunables().halt_detection,
        ..RunConfig::default()
    };
    let timers_stop = Arc::new(AtomicBool::new(false));
    let timers = {
        let (pc, stop) = (pc.clone(), timers_stop.clone());
        std::thread::Builder::new()
            .name("timers".into())
            .spawn(move || {
                // Timer ticks must not wait behind ordinary threads: ask for a real-time
                // priority (it sleeps between polls, at most two wake-ups per 100 µs whatever the
                // guest programs, so it cannot starve the host). Refused without privilege: fine.
                let param = libc::sched_param { sched_priority: 1 };
                // SAFETY: sched_setscheduler on the calling thread with a valid parameter.
                let _ = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
                pc.run_timers(&stop)
            })
            .map_err(|source| vcpu_runner::MachineError::Thread {
                name: "timers".into(),
                source,
            })?
    };
    let names = devices.names().to_vec();
    phase("devices registered, timer thread started");
    let vm = Arc::new(machine.start(entry, devices, requests.clone(), &run_cfg)?);
    phase("vCPU and device-model threads started");
    // bhyvectl --vm=NAME reaches the running VM from now on.
    let target = Arc::new(crate::control::VmTarget {
        vm: vm.clone(),
        pc: pc.clone(),
    });
    if let Err(e) = vmm.attach(&cfg.name, target) {
        eprintln!("bhyve: control socket for {}: {e}", cfg.name);
    }
    // Signals stop the VM from the host.
    stop_on_signals(vm.stop_switch());
    // Exit rates over time, for the plots.
    let sampler = cfg.plots_dir.as_ref().map(|_| {
        let (vm, done) = (vm.clone(), Arc::new(AtomicBool::new(false)));
        let d2 = done.clone();
        let h = std::thread::spawn(move || {
            let mut rates = perf::RateSampler::new(100_000);
            let t0 = Instant::now();
            while !d2.load(Ordering::Acquire) {
                let counters: Vec<(String, u64)> = vm
                    .vcpu_stats()
                    .iter()
                    .enumerate()
                    .map(|(i, s)| {
                        (
                            format!("vcpu{i}"),
                            s.get(vcpu_runner::stats::Stat::VmExitTotal),
                        )
                    })
                    .collect();
                rates.sample(t0.elapsed(), &counters);
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            rates
        });
        (done, h)
    });
    let outcome = vm
        .wait()
        .ok_or_else(|| VmError::Platform("the VM was already waited for".into()));
    phase("VM stopped (vCPUs and device models joined)");
    // Everything the guest wrote to a console reaches its backend before we report or exit.
    for mut c in consoles {
        let drained = c.finish(CONSOLE_DRAIN_TIMEOUT);
        let lost = c.stats().lost.load(Ordering::Relaxed);
        if !drained {
            eprintln!(
                "bhyve: console output still blocked after {CONSOLE_DRAIN_TIMEOUT:?}; the rest is dropped"
            );
        } else if lost > 0 {
            eprintln!("bhyve: {lost} console bytes dropped (the backend stayed blocked)");
        }
    }
    phase("console output drained");
    vm.stop_switch().stop();
    timers_stop.store(true, Ordering::Release);
    pc.notify_timers();
    let _ = timers.join();
    phase("timer thread joined");
    let outcome = outcome?;
    // Destroy the VM and unload the module (its control socket goes away).
    let _ = vmm.detach(&cfg.name);
    if let Err(e) = vmm.destroy_vm(&cfg.name) {
        eprintln!("bhyve: destroying {}: {e}", cfg.name);
    }
    if let Err((_, e)) = vmm.unload() {
        eprintln!("bhyve: unloading the module: {e}");
    }
    phase("VM destroyed, module unloaded");
    let rates = sampler.and_then(|(done, h)| {
        done.store(true, Ordering::Release);
        h.join().ok()
    });
    if let Some(path) = &cfg.trace_file {
        let (events, dropped) = vm.take_trace();
        let meta = perf::TraceMeta {
            pid: std::process::id(),
            vm_name: &cfg.name,
            owners: &names,
        };
        let written = std::fs::File::create(path).and_then(|f| {
            let mut w = std::io::BufWriter::new(f);
            perf::write_chrome_trace(&mut w, &events, vm.clock(), &meta)?;
            w.flush()
        });
        match written {
            Ok(()) => eprintln!(
                "bhyve: trace of {} exits written to {} ({dropped} dropped)",
                events.len(),
                path.display()
            ),
            Err(e) => eprintln!("bhyve: cannot write trace {}: {e}", path.display()),
        }
    }
    if let (Some(dir), Some(rates)) = (&cfg.plots_dir, rates) {
        write_plots(dir, &outcome, &rates, vm.ncpus());
    }
    if cfg.print_histograms {
        eprint!("{}", perf::histograms_text(&outcome.histograms));
    }
    let _ = std::io::stdout().flush();
    if cfg.print_stats {
        print_stats(&outcome, requests.boot_done(), &names);
        print_pci_stats(&pci, &gsi_routes);
    }
    for p in &outcome.stop_problems {
        eprintln!("bhyve: {p}");
    }
    match &outcome.exit {
        vcpu_runner::RunExit::Error(m) => eprintln!("bhyve: {m}"),
        vcpu_runner::RunExit::Stopped => eprintln!("bhyve: stopped by signal"),
        vcpu_runner::RunExit::Request(_) => {}
    }
    drop(vm);
    drop(pc);
    phase("VM released");
    Ok(outcome.exit.exit_status())
}

/// A `kB` field of /proc/self/status.
fn proc_status_kib(field: &str) -> Option<u64> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Writes the latency histogram and the exit-rate plot as SVG into `dir`.
fn write_plots(dir: &Path, o: &vcpu_runner::RunOutcome, rates: &perf::RateSampler, ncpus: u32) {
    let exit = o.histograms.total(perf::Phase::Exit);
    let series: Vec<(String, Vec<(f64, f64)>)> = (0..ncpus)
        .map(|i| {
            let n = format!("vcpu{i}");
            let s = rates.series(&n);
            (n, s)
        })
        .collect();
    let refs: Vec<(&str, &[(f64, f64)])> = series
        .iter()
        .map(|(n, s)| (n.as_str(), s.as_slice()))
        .collect();
    let files = [
        (
            "exit-latency.svg",
            perf::plot_histogram_svg(&exit, "exit to re-entry (all exits)"),
        ),
        (
            "exit-rate.svg",
            perf::plot_rates_svg(&refs, "exits per second"),
        ),
    ];
    let made = std::fs::create_dir_all(dir).and_then(|()| {
        files
            .iter()
            .try_for_each(|(name, svg)| std::fs::write(dir.join(name), svg))
    });
    match made {
        Ok(()) => eprintln!("bhyve: plots written to {}", dir.display()),
        Err(e) => eprintln!("bhyve: cannot write plots into {}: {e}", dir.display()),
    }
}

fn print_stats(o: &vcpu_runner::RunOutcome, boot_done_ns: Option<u64>, names: &[String]) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "run time: {:?}", o.elapsed);
    if let Some(g) = o.guest_resident {
        let _ = writeln!(err, "guest memory resident: {} KiB", g / 1024);
    }
    if let Some(hwm) = proc_status_kib("VmHWM:") {
        let _ = writeln!(err, "monitor peak resident set (VmHWM): {hwm} KiB");
    }
    if let Some(ns) = boot_done_ns {
        let _ = writeln!(err, "boot done after: {:.3} ms", ns as f64 / 1e6);
    }
    for (i, s) in o.vcpu_stats.iter().enumerate() {
        let _ = writeln!(err, "vcpu{i}:");
        for (stat, v) in s.snapshot() {
            if v != 0 {
                let _ = writeln!(err, "  {:<58} {v}", stat.description());
            }
        }
    }
    let _ = writeln!(err, "devices:");
    for (id, name) in names.iter().enumerate() {
        let total: u64 = o
            .vcpu_stats
            .iter()
            .map(|s| s.per_device().get(id).copied().unwrap_or(0))
            .sum();
        if total != 0 {
            let _ = writeln!(err, "  {:<58} {total}", format!("exits to {name}"));
        }
    }
}

/// The device models' counters (after the devices' exits), for `stats.print`.
fn print_pci_stats(pci: &crate::pci::PciSetup, routes: &vcpu_runner::GsiRoutes) {
    let models = &pci.models;
    if models.is_empty() {
        return;
    }
    let mut err = std::io::stderr().lock();
    let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    let _ = writeln!(err, "pci:");
    for m in models {
        let rows = [
            ("MSI-X messages by irqfd", get(&m.msi.irqfd)),
            ("MSI-X messages by KVM_SIGNAL_MSI", get(&m.msi.signal_msi)),
            ("MSI-X route updates", get(&m.msi.route_updates)),
            ("MSI-X delivery failures", get(&m.msi.failures)),
            (
                "virtio notifies by register write (not ioeventfd)",
                get(&m.virtio.notifies),
            ),
            ("virtio chains completed", get(&m.virtio.chains)),
            ("virtio queue interrupts", get(&m.virtio.queue_interrupts)),
            (
                "bytes written back early (eagerwb)",
                get(&m.virtio.writeback_started),
            ),
            (
                "early writebacks failed (eagerwb)",
                get(&m.virtio.writeback_errors),
            ),
        ];
        for (what, v) in rows {
            let _ = writeln!(err, "  {:<58} {v}", format!("{} {} {what}", m.at, m.name));
        }
    }
    let _ = writeln!(
        err,
        "  {:<58} {}",
        "GSI routing tables installed",
        get(&routes.stats.installs)
    );
    if let Some(m) = &pci.mmio {
        let rows = [
            ("BAR placements followed", get(&m.stats.moves)),
            ("BAR placements refused", get(&m.stats.refused)),
            ("accesses no BAR decodes", get(&m.stats.unclaimed)),
            ("notify ioeventfds bound", get(&m.stats.binds)),
            ("notify ioeventfds unbound", get(&m.stats.unbinds)),
        ];
        for (what, v) in rows {
            let _ = writeln!(err, "  {what:<58} {v}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pipe: (read end, write end).
    fn pipe() -> (std::fs::File, std::fs::File) {
        use std::os::fd::FromRawFd;
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: a fresh descriptor owned by nothing else.
        let r = unsafe { std::fs::File::from_raw_fd(fds[0]) };
        // SAFETY: as above.
        let w = unsafe { std::fs::File::from_raw_fd(fds[1]) };
        (r, w)
    }

    #[test]
    fn a_descriptor_backend_writes_now_only_what_cannot_block() {
        use console::Backend;
        use std::io::Read;
        use std::os::fd::AsRawFd;
        let (mut r, w) = pipe();
        let wfd = w.as_raw_fd();
        let mut out = FdOut::new(w);
        // A pipe with room (poll says POLLOUT | POLLWRNORM): taken at once, at most DIRECT_MAX.
        assert_eq!(out.write_now(b"hi"), Some(2));
        let big = vec![b'x'; 1000];
        assert_eq!(out.write_now(&big), Some(FdOut::DIRECT_MAX));
        let mut got = vec![0; 2 + FdOut::DIRECT_MAX];
        r.read_exact(&mut got).unwrap();
        assert_eq!(&got[..2], b"hi");
        // A full pipe: refused (the writer thread would block on it, not the device).
        // SAFETY: F_SETFL on our own descriptor; O_NONBLOCK only for filling it here.
        unsafe { libc::fcntl(wfd, libc::F_SETFL, libc::O_NONBLOCK) };
        while out.file.write(&big).is_ok() {}
        while out.file.write(b"x").is_ok() {} // the last page's room too
        assert_eq!(out.write_now(b"z"), None);
        // The reader gone: refused too (the writer thread reports the error).
        drop(r);
        assert_eq!(out.write_now(b"z"), None);
        // A regular file: never from the device's thread (its file system may stall a write).
        let dir = std::env::temp_dir().join(format!("bhyve-fdout-{}", std::process::id()));
        let mut f = FdOut::new(std::fs::File::create(&dir).unwrap());
        assert_eq!(f.write_now(b"z"), None);
        f.write_all(b"z").unwrap();
        let _ = std::fs::remove_file(&dir);
    }

    /// A pseudo-terminal: (master, slave).
    fn pty() -> (std::fs::File, std::fs::File) {
        use std::os::fd::FromRawFd;
        use std::os::unix::fs::OpenOptionsExt;
        // SAFETY: posix_openpt takes flags only.
        let m = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY) };
        assert!(m >= 0, "posix_openpt");
        // SAFETY: `m` is a fresh descriptor owned by nothing else.
        let master = unsafe { std::fs::File::from_raw_fd(m) };
        // SAFETY: grantpt on our master descriptor.
        assert_eq!(unsafe { libc::grantpt(m) }, 0);
        // SAFETY: unlockpt on our master descriptor.
        assert_eq!(unsafe { libc::unlockpt(m) }, 0);
        let mut name = [0 as libc::c_char; 128];
        // SAFETY: `name` has room for `name.len()` characters, ptsname_r NUL-terminates it.
        let rc = unsafe { libc::ptsname_r(m, name.as_mut_ptr(), name.len()) };
        assert_eq!(rc, 0);
        // SAFETY: NUL-terminated by ptsname_r above, and `name` lives on.
        let path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        let slave = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(path)
            .expect("open the terminal");
        (master, slave)
    }

    /// A pipe another process fills between our `poll` and our `write` would block a blocking
    /// descriptor: the direct write is one `pwritev2(RWF_NOWAIT)`, which fails at once on a full
    /// pipe even though the descriptor itself blocks. A terminal (no RWF_NOWAIT) is still written
    /// directly, through `poll` and `write`.
    #[test]
    fn a_direct_write_to_a_full_blocking_pipe_fails_at_once_and_a_terminal_still_takes_bytes() {
        use console::Backend;
        use std::io::Read;
        use std::os::fd::AsRawFd;
        let (_r, w) = pipe();
        // Fill the pipe through another open file description (O_NONBLOCK there only), as another
        // process sharing the pipe would: ours stays blocking.
        let mut other = std::fs::OpenOptions::new()
            .write(true)
            .open(format!("/proc/self/fd/{}", w.as_raw_fd()))
            .expect("reopen the pipe");
        // SAFETY: F_SETFL on our own descriptor.
        unsafe { libc::fcntl(other.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        while other.write(&[b'x'; 4096]).is_ok() {}
        while other.write(b"x").is_ok() {}
        // SAFETY: F_GETFL on our own descriptor.
        let flags = unsafe { libc::fcntl(w.as_raw_fd(), libc::F_GETFL) };
        assert_eq!(
            flags & libc::O_NONBLOCK,
            0,
            "our descriptor must still block"
        );
        let out = FdOut::new(w);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut out = out;
            let r = out.write_nowait(b"z");
            let direct = out.write_now(b"z");
            let _ = tx.send((r, direct));
        });
        let (r, direct) = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("a direct write to a full pipe blocked");
        // EAGAIN where the kernel offers RWF_NOWAIT on pipes, EOPNOTSUPP where it does not.
        assert!(matches!(r, Err(libc::EAGAIN | libc::EOPNOTSUPP)), "{r:?}");
        assert_eq!(direct, None);

        // A pseudo-terminal.
        let (mut master, slave) = pty();
        let mut out = FdOut::new(slave);
        assert_eq!(out.write_now(b"hi"), Some(2));
        assert_eq!(out.write_now(b"!"), Some(1));
        let mut got = [0u8; 3];
        master.read_exact(&mut got).expect("read the terminal");
        assert_eq!(&got, b"hi!");
    }

    #[test]
    fn expected_probes_are_claimed_silently_and_com2_only_when_absent() {
        let mut d = Devices::new();
        add_absent(&mut d, false).unwrap();
        for port in [0x2f8, 0x2fd, 0x3e9, 0x3ef, 0x2e8, 0x2ee, 0xcfa, 0xcfb] {
            let r = d
                .bus()
                .route(Space::Pio, port)
                .unwrap_or_else(|| panic!("port {port:#x} unclaimed"));
            assert_eq!(r.stage, Stage::Fast, "{port:#x}");
            assert!(d.names()[usize::from(r.device.0)].ends_with("absent") || port >= 0xcfa);
        }
        // Neighbours stay free: the reset register, the PCI ports, COM1.
        for port in [0xcf8, 0xcf9, 0xcfc, 0x3f8, 0x2f0, 0x2f7, 0x300] {
            assert!(
                d.bus().route(Space::Pio, port).is_none(),
                "{port:#x} claimed"
            );
        }
        // With COM2 configured its UART owns 0x2f8: no absent claim there.
        let mut d = Devices::new();
        add_absent(&mut d, true).unwrap();
        assert!(d.bus().route(Space::Pio, 0x2f8).is_none());
        assert!(d.bus().route(Space::Pio, 0x3e8).is_some());
    }
}
