//! The module's life (vmm.ko's MOD_LOAD and MOD_UNLOAD), its VMs by name, and the `hw.vmm`
//! sysctl tree.
//!
//! [`Vmm::load`] checks the backend, reads the tunables, reserves the `pptdevs` devices and
//! starts the module's control socket `<socket dir>/vmmctl` (the analogue of `/dev/vmmctl`).
//! [`Vmm::create_vm`] registers a VM by name and serves its socket `<socket dir>/NAME` (the
//! analogue of `/dev/vmm/NAME`); a running instance (bhyve) then [`attach`](Vmm::attach)es a
//! [`ControlTarget`] so the socket can reach it. [`Vmm::unload`] is refused while any VM exists
//! and hands the reserved devices back.
//!
//! VM names follow vmm.ko's `vm_create`: at most [`VM_MAX_NAMELEN`] − 1 = 31 bytes (FreeBSD's
//! classic `VM_MAX_NAMELEN` of 32 with its NUL; newer FreeBSD allows longer names, but a short
//! bound keeps `<socket dir>/NAME` inside a Unix socket address), no `/`, no NUL; and, because
//! the names are file names in one directory, not `.`, `..` or `vmmctl`.
//!
//! Lock order: the registry, then passthrough, then a VM's target slot. No lock is held while a
//! [`ControlTarget`] is called or a server is stopped.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use passthrough::{
    DeviceState, Passthrough, PassthroughError, PciAddress, RealSysfs, Sysfs, DEFAULT_SYSFS_ROOT,
};
use vcpu_runner::{BackendError, Capabilities, Hypervisor, KvmHypervisor, VirtKind};

use crate::proto::{self, status, Endpoint, Hello, Reply, Request, VmListing};
use crate::server::{Bound, ControlServer, Handler, ServerError, ServerLimits, ServerStats};
use crate::target::{ControlTarget, TargetError};
use crate::tunables::{self, Tunables, TunablesError};

/// Where the control sockets live unless told otherwise.
pub const DEFAULT_SOCKET_DIR: &str = "/run/bhyve-rs";
/// The module's control socket, in the socket directory.
pub const MODULE_SOCKET: &str = "vmmctl";
/// FreeBSD's classic `VM_MAX_NAMELEN`: a name is shorter than this (at most 31 bytes).
pub const VM_MAX_NAMELEN: usize = 32;
/// The module's version (`MODULE_VERSION(vmm, 1)`), `hw.vmm.version`.
pub const MODULE_VERSION: u32 = 1;
/// The KVM API version the module needs.
pub const KVM_API_VERSION: i32 = 12;

/// Errors of the module; [`VmmError::status`] gives the errno a control client sees.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The tunables file refuses the load.
    #[error(transparent)]
    Tunables(#[from] TunablesError),
    /// The backend could not be opened or probed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The KVM API version is not 12.
    #[error("KVM API version {found} is not supported (vmm needs {KVM_API_VERSION})")]
    ApiVersion {
        /// The version the backend reports.
        found: i32,
    },
    /// The backend lacks a capability the module needs.
    #[error("The hypervisor lacks {piece}, which vmm needs")]
    Missing {
        /// The missing piece.
        piece: &'static str,
    },
    /// The control socket directory cannot be made.
    #[error("Cannot create the control socket directory {}: {source}", .path.display())]
    SocketDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A control socket cannot be served.
    #[error(transparent)]
    Server(#[from] ServerError),
    /// A `pptdevs` device cannot be reserved (the message names it); nothing was reserved.
    #[error("Cannot reserve pptdevs: {source}")]
    Reserve {
        /// Why.
        #[source]
        source: PassthroughError,
    },
    /// Unload refused: VMs exist (EBUSY).
    #[error("Module busy: {} VM(s) exist: {}", .vms.len(), .vms.join(", "))]
    Busy {
        /// Their names.
        vms: Vec<String>,
    },
    /// Unload could not hand the reserved devices back; they stay reserved.
    #[error("Cannot hand pptdevs back: {source}")]
    Release {
        /// Why.
        #[source]
        source: PassthroughError,
    },
    /// A VM name vmm would refuse.
    #[error("Invalid VM name {name:?}: {reason}")]
    BadName {
        /// The name.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A VM of that name exists.
    #[error("VM {name} already exists")]
    Exists {
        /// The name.
        name: String,
    },
    /// No vCPUs asked for (bhyve(8)'s message).
    #[error("Invalid guest vCPUs ({requested})")]
    InvalidCpus {
        /// The count asked for.
        requested: u32,
    },
    /// More vCPUs than `hw.vmm.maxcpu` (bhyve(8)'s message).
    #[error("{requested} vCPUs requested but only {available} available")]
    TooManyCpus {
        /// The count asked for.
        requested: u32,
        /// `hw.vmm.maxcpu`.
        available: u32,
    },
    /// No VM of that name.
    #[error("No VM named {name}")]
    NoSuchVm {
        /// The name.
        name: String,
    },
    /// The VM has a running instance attached (EBUSY).
    #[error("VM {name} is running: stop it before destroying it")]
    Running {
        /// The name.
        name: String,
    },
    /// The VM has no running instance attached.
    #[error("VM {name} is not running")]
    NotRunning {
        /// The name.
        name: String,
    },
    /// A running instance is attached already.
    #[error("VM {name} already has a running instance attached")]
    Attached {
        /// The name.
        name: String,
    },
    /// The module is unloading.
    #[error("The vmm module is unloading")]
    Unloading,
    /// A passthrough operation was refused (the message names the device).
    #[error(transparent)]
    Device(PassthroughError),
    /// The running VM refused.
    #[error("VM {vm}: {source}")]
    Target {
        /// The VM.
        vm: String,
        /// Its answer.
        #[source]
        source: TargetError,
    },
}

impl VmmError {
    /// The errno-style status a control client gets for this error.
    pub fn status(&self) -> u32 {
        match self {
            VmmError::Busy { .. }
            | VmmError::Running { .. }
            | VmmError::Attached { .. }
            | VmmError::Server(ServerError::InUse { .. }) => status::EBUSY,
            VmmError::Exists { .. } => status::EEXIST,
            VmmError::NoSuchVm { .. } => status::ENOENT,
            VmmError::NotRunning { .. } | VmmError::Unloading => status::ENXIO,
            VmmError::BadName { .. }
            | VmmError::InvalidCpus { .. }
            | VmmError::TooManyCpus { .. } => status::EINVAL,
            VmmError::Device(e) => match e {
                PassthroughError::Busy { .. } => status::EBUSY,
                PassthroughError::NotReserved { .. } | PassthroughError::NotAssignedTo { .. } => {
                    status::ENOENT
                }
                PassthroughError::InvalidDriverName { .. } => status::EINVAL,
                _ => status::EIO,
            },
            VmmError::Target { source, .. } => source.status,
            VmmError::Tunables(_)
            | VmmError::Backend(_)
            | VmmError::ApiVersion { .. }
            | VmmError::Missing { .. }
            | VmmError::SocketDir { .. }
            | VmmError::Server(_)
            | VmmError::Reserve { .. }
            | VmmError::Release { .. } => status::EIO,
        }
    }
}

/// Something the load reports without refusing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Diagnostic {
    /// From the tunables file.
    Tunables(tunables::Diagnostic),
    /// What virtualizes guests on this host.
    Virtualization(VirtKind),
    /// `hw.vmm.maxcpu` is above what the backend recommends per VM.
    MaxcpuAboveBackend {
        /// `hw.vmm.maxcpu`.
        maxcpu: u32,
        /// The backend's recommended maximum.
        backend: u32,
    },
    /// A control socket file left by a dead module was replaced.
    StaleSocket {
        /// The path.
        path: PathBuf,
    },
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Diagnostic::Tunables(d) => write!(f, "{d}"),
            Diagnostic::Virtualization(VirtKind::Software(m)) => write!(
                f,
                "Virtualization: software virtualizer ({m}): guest ring-0 code is emulated"
            ),
            Diagnostic::Virtualization(VirtKind::Unknown) => write!(
                f,
                "Virtualization: unknown (the host CPU flags show neither VMX nor SVM)"
            ),
            Diagnostic::Virtualization(k) => write!(f, "Virtualization: {k}"),
            Diagnostic::MaxcpuAboveBackend { maxcpu, backend } => write!(
                f,
                "{}={maxcpu} is above the {backend} vCPUs the hypervisor recommends per VM",
                tunables::MAXCPU
            ),
            Diagnostic::StaleSocket { path } => {
                write!(f, "Replaced stale control socket {}", path.display())
            }
        }
    }
}

/// Where passthrough finds sysfs.
#[derive(Clone)]
pub enum SysfsSource {
    /// A directory laid out like `/sys`.
    Root(PathBuf),
    /// Any implementation (tests: `passthrough::fake::FakeSysfs`).
    Shared(Arc<dyn Sysfs + Send + Sync>),
}

impl fmt::Debug for SysfsSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SysfsSource::Root(p) => f.debug_tuple("Root").field(p).finish(),
            SysfsSource::Shared(_) => f.write_str("Shared(..)"),
        }
    }
}

/// The [`Sysfs`] the module's passthrough works on.
#[derive(Debug)]
pub struct ModuleSysfs(SysfsImpl);

#[derive(Debug)]
enum SysfsImpl {
    Real(RealSysfs),
    Shared(SharedSysfs),
}

struct SharedSysfs(Arc<dyn Sysfs + Send + Sync>);

impl fmt::Debug for SharedSysfs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SharedSysfs(..)")
    }
}

impl Sysfs for ModuleSysfs {
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        match &self.0 {
            SysfsImpl::Real(s) => s.read(path),
            SysfsImpl::Shared(s) => s.0.read(path),
        }
    }

    fn write(&self, path: &Path, data: &[u8]) -> io::Result<()> {
        match &self.0 {
            SysfsImpl::Real(s) => s.write(path, data),
            SysfsImpl::Shared(s) => s.0.write(path, data),
        }
    }

    fn read_link(&self, path: &Path) -> io::Result<PathBuf> {
        match &self.0 {
            SysfsImpl::Real(s) => s.read_link(path),
            SysfsImpl::Shared(s) => s.0.read_link(path),
        }
    }
}

/// How to load the module.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// A loader.conf(5)-format tunables file; `None`: the defaults for [`host_cpus`](Self::host_cpus).
    pub tunables: Option<PathBuf>,
    /// Where passthrough finds sysfs (default `/sys`).
    pub sysfs: SysfsSource,
    /// The control socket directory (default [`DEFAULT_SOCKET_DIR`]); created 0700 if missing.
    pub socket_dir: PathBuf,
    /// What the backend offers (`KvmHypervisor::open()?.capabilities().clone()`, or
    /// [`host_capabilities`]).
    pub capabilities: Capabilities,
    /// Host CPUs, the default `hw.vmm.maxcpu`; `None`: the CPUs this process may use.
    pub host_cpus: Option<u32>,
    /// Serve `<socket dir>/vmmctl` (create/destroy/list by name). A front end that embeds the
    /// module next to a long-lived one may turn it off.
    pub module_socket: bool,
    /// Bounds on control clients.
    pub limits: ServerLimits,
}

impl LoadOptions {
    /// The defaults, with the backend's `capabilities`.
    pub fn new(capabilities: Capabilities) -> Self {
        Self {
            tunables: None,
            sysfs: SysfsSource::Root(PathBuf::from(DEFAULT_SYSFS_ROOT)),
            socket_dir: PathBuf::from(DEFAULT_SOCKET_DIR),
            capabilities,
            host_cpus: None,
            module_socket: true,
            limits: ServerLimits::default(),
        }
    }
}

/// Opens `/dev/kvm` and returns what it offers.
pub fn host_capabilities() -> Result<Capabilities, VmmError> {
    Ok(KvmHypervisor::open()?.capabilities().clone())
}

/// Checks that the backend has everything the module needs, naming the first missing piece.
pub fn check_capabilities(caps: &Capabilities) -> Result<(), VmmError> {
    if caps.api_version != KVM_API_VERSION {
        return Err(VmmError::ApiVersion {
            found: caps.api_version,
        });
    }
    let needs: [(bool, &'static str); 5] = [
        (
            caps.split_irqchip,
            "a split irqchip (KVM_CAP_SPLIT_IRQCHIP: in-kernel LAPIC, I/O APIC and PIC in vmm)",
        ),
        (
            caps.immediate_exit,
            "immediate_exit (KVM_CAP_IMMEDIATE_EXIT: kicking vCPUs)",
        ),
        (
            caps.signal_msi,
            "direct MSI injection (KVM_CAP_SIGNAL_MSI: I/O APIC delivery)",
        ),
        (
            caps.irqfd,
            "irqfd (KVM_CAP_IRQFD: interrupts from eventfds)",
        ),
        (
            caps.ioeventfd,
            "ioeventfd (KVM_CAP_IOEVENTFD: notifications absorbed in the kernel)",
        ),
    ];
    match needs.iter().find(|(have, _)| !have) {
        Some((_, piece)) => Err(VmmError::Missing { piece }),
        None => Ok(()),
    }
}

/// Checks `name` against vmm's rules (see the module documentation).
pub fn validate_name(name: &str) -> Result<(), VmmError> {
    let reason = if name.is_empty() {
        Some("empty")
    } else if name.len() >= VM_MAX_NAMELEN {
        Some("longer than 31 bytes")
    } else if name.contains('/') {
        Some("contains '/'")
    } else if name.contains('\0') {
        Some("contains a NUL byte")
    } else if name == "." || name == ".." {
        Some("a directory name")
    } else if name == MODULE_SOCKET {
        Some("reserved for the module's control socket")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(VmmError::BadName {
            name: name.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

/// A VM's number, unique for the module's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VmId(pub u64);

/// What the module knows of one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmInfo {
    /// Its number.
    pub id: VmId,
    /// Its name.
    pub name: String,
    /// Its vCPUs (the attached instance's once one is attached).
    pub ncpus: u32,
    /// Whether a running instance is attached.
    pub running: bool,
    /// Its control socket.
    pub socket: PathBuf,
    /// Passthrough devices assigned to it.
    pub devices: Vec<PciAddress>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One VM, shared by the registry and its socket's handler.
struct VmSlot {
    id: VmId,
    name: String,
    ncpus: AtomicU32,
    target: Mutex<Option<Arc<dyn ControlTarget>>>,
}

impl VmSlot {
    fn target(&self) -> Option<Arc<dyn ControlTarget>> {
        lock(&self.target).clone()
    }
}

struct VmEntry {
    slot: Arc<VmSlot>,
    server: Option<ControlServer>,
}

#[derive(Default)]
struct Registry {
    vms: BTreeMap<String, VmEntry>,
    next_id: u64,
    unloading: bool,
}

struct Inner {
    tunables: Tunables,
    caps: Capabilities,
    socket_dir: PathBuf,
    limits: ServerLimits,
    registry: Mutex<Registry>,
    passthrough: Mutex<Passthrough<ModuleSysfs>>,
    stats: Arc<ServerStats>,
    vms_created: AtomicU64,
    vms_destroyed: AtomicU64,
    /// The module socket's server (taken out when the module stops).
    module_server: Mutex<Option<ControlServer>>,
}

/// The loaded module. Dropping it without [`unload`](Vmm::unload) stops its sockets but
/// leaves reserved devices bound to `vfio-pci`, as a crashed module would.
pub struct Vmm {
    inner: Arc<Inner>,
}

impl fmt::Debug for Vmm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vmm")
            .field("socket_dir", &self.inner.socket_dir)
            .field("vms", &self.vms().len())
            .finish()
    }
}

fn prepare_socket_dir(dir: &Path) -> Result<(), VmmError> {
    let err = |source| VmmError::SocketDir {
        path: dir.to_owned(),
        source,
    };
    if dir.is_dir() {
        return Ok(());
    }
    fs::create_dir_all(dir).map_err(err)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(err)
}

impl Vmm {
    /// Loads the module (MOD_LOAD): checks the backend, reads the tunables, reserves the
    /// `pptdevs` devices, serves `<socket dir>/vmmctl`. Returns what it noticed on the way.
    pub fn load(opts: LoadOptions) -> Result<(Vmm, Vec<Diagnostic>), VmmError> {
        check_capabilities(&opts.capabilities)?;
        let host_cpus = opts.host_cpus.unwrap_or_else(|| {
            u32::try_from(vcpu_runner::machine::host_cpus()).unwrap_or(tunables::VM_MAXCPU)
        });
        let mut diags = Vec::new();
        let tunables = match &opts.tunables {
            Some(path) => {
                let parsed = Tunables::from_file(path, host_cpus)?;
                diags.extend(parsed.diagnostics.into_iter().map(Diagnostic::Tunables));
                parsed.tunables
            }
            None => Tunables::defaults(host_cpus),
        };
        let caps = opts.capabilities;
        diags.push(Diagnostic::Virtualization(caps.virt.clone()));
        if caps.max_vcpus > 0 && tunables.maxcpu > caps.max_vcpus {
            diags.push(Diagnostic::MaxcpuAboveBackend {
                maxcpu: tunables.maxcpu,
                backend: caps.max_vcpus,
            });
        }
        prepare_socket_dir(&opts.socket_dir)?;

        // Claim the devices before anything else can.
        let sysfs = ModuleSysfs(match opts.sysfs {
            SysfsSource::Root(root) => SysfsImpl::Real(RealSysfs::new(root)),
            SysfsSource::Shared(s) => SysfsImpl::Shared(SharedSysfs(s)),
        });
        let mut passthrough = Passthrough::new(sysfs);
        passthrough
            .reserve_all(&tunables.pptdevs)
            .map_err(|source| VmmError::Reserve { source })?;

        let inner = Arc::new(Inner {
            tunables,
            caps,
            socket_dir: opts.socket_dir,
            limits: opts.limits,
            registry: Mutex::new(Registry::default()),
            passthrough: Mutex::new(passthrough),
            stats: Arc::new(ServerStats::default()),
            vms_created: AtomicU64::new(0),
            vms_destroyed: AtomicU64::new(0),
            module_server: Mutex::new(None),
        });
        let vmm = Vmm { inner };
        if opts.module_socket {
            let path = vmm.module_socket_path();
            let handler = Arc::new(ModuleHandler {
                module: Arc::downgrade(&vmm.inner),
            });
            match ControlServer::start(
                &path,
                handler,
                vmm.inner.limits.clone(),
                vmm.inner.stats.clone(),
            ) {
                Ok((server, bound)) => {
                    if bound == Bound::ReplacedStale {
                        diags.push(Diagnostic::StaleSocket { path });
                    }
                    *lock(&vmm.inner.module_server) = Some(server);
                }
                Err(e) => {
                    // Give the devices back: the load did not happen.
                    let _ = lock(&vmm.inner.passthrough).release_all();
                    return Err(e.into());
                }
            }
        }
        Ok((vmm, diags))
    }

    /// Unloads the module (MOD_UNLOAD): refused with [`VmmError::Busy`] naming every VM while
    /// any exists; otherwise hands every reserved device back to its driver and stops the
    /// sockets. On refusal the module is handed back unchanged.
    pub fn unload(self) -> Result<(), (Vmm, VmmError)> {
        let result = {
            let mut reg = lock(&self.inner.registry);
            if reg.vms.is_empty() {
                match lock(&self.inner.passthrough).release_all() {
                    Ok(()) => {
                        reg.unloading = true;
                        Ok(())
                    }
                    Err(source) => Err(VmmError::Release { source }),
                }
            } else {
                Err(VmmError::Busy {
                    vms: reg.vms.keys().cloned().collect(),
                })
            }
        };
        match result {
            Ok(()) => {
                self.shutdown();
                Ok(())
            }
            Err(e) => Err((self, e)),
        }
    }

    /// Stops every socket (module first, so no VM is created meanwhile).
    fn shutdown(&self) {
        lock(&self.inner.registry).unloading = true;
        let module_server = lock(&self.inner.module_server).take();
        if let Some(s) = module_server {
            s.stop();
        }
        let entries: Vec<VmEntry> = std::mem::take(&mut lock(&self.inner.registry).vms)
            .into_values()
            .collect();
        for mut e in entries {
            if let Some(s) = e.server.take() {
                s.stop();
            }
        }
    }

    /// The tunables in force.
    pub fn tunables(&self) -> &Tunables {
        &self.inner.tunables
    }

    /// The backend's capabilities.
    pub fn capabilities(&self) -> &Capabilities {
        &self.inner.caps
    }

    /// The control socket directory.
    pub fn socket_dir(&self) -> &Path {
        &self.inner.socket_dir
    }

    /// `<socket dir>/vmmctl`.
    pub fn module_socket_path(&self) -> PathBuf {
        self.inner.socket_dir.join(MODULE_SOCKET)
    }

    /// `<socket dir>/NAME`.
    pub fn socket_path(&self, name: &str) -> PathBuf {
        self.inner.socket_dir.join(name)
    }

    /// Creates the VM `name` with `ncpus` vCPUs and serves its socket; it runs once an instance
    /// [`attach`](Self::attach)es. Refuses a bad or taken name, and `ncpus` outside
    /// 1..=`hw.vmm.maxcpu` with bhyve(8)'s messages.
    pub fn create_vm(&self, name: &str, ncpus: u32) -> Result<VmId, VmmError> {
        self.inner.create_vm(name, ncpus)
    }

    /// Destroys the VM `name`: stops its socket and takes its passthrough devices back.
    /// Refused while an instance is attached.
    pub fn destroy_vm(&self, name: &str) -> Result<(), VmmError> {
        self.inner.destroy_vm(name)
    }

    /// Attaches the running instance of VM `name`: its socket now reaches `target`. The VM's
    /// vCPU count becomes the target's, which must be within 1..=`hw.vmm.maxcpu`.
    pub fn attach(&self, name: &str, target: Arc<dyn ControlTarget>) -> Result<(), VmmError> {
        self.inner.attach(name, target)
    }

    /// Detaches the running instance of VM `name` (it stopped); the VM stays registered.
    pub fn detach(&self, name: &str) -> Result<Arc<dyn ControlTarget>, VmmError> {
        self.inner.detach(name)
    }

    /// Every VM, in name order.
    pub fn vms(&self) -> Vec<VmInfo> {
        self.inner.vms()
    }

    /// The VM `name`.
    pub fn vm(&self, name: &str) -> Option<VmInfo> {
        self.inner.vms().into_iter().find(|v| v.name == name)
    }

    /// Assigns the reserved device `addr` to VM `vm` (vm_assign_pptdev). A running VM must
    /// accept it ([`ControlTarget::assign_device`]) or the assignment is taken back.
    pub fn assign_device(&self, vm: &str, addr: PciAddress) -> Result<(), VmmError> {
        self.inner.assign_device(vm, addr)
    }

    /// Takes `addr` away from VM `vm` (vm_unassign_pptdev); it stays reserved.
    pub fn unassign_device(&self, vm: &str, addr: PciAddress) -> Result<(), VmmError> {
        self.inner.unassign_device(vm, addr)
    }

    /// Hands a reserved, unassigned device to the host driver `driver` at run time
    /// (`devctl set driver -f pciD:B:S:F DRIVER`).
    pub fn release_device(&self, addr: PciAddress, driver: &str) -> Result<(), VmmError> {
        lock(&self.inner.passthrough)
            .release(addr, driver)
            .map_err(VmmError::Device)
    }

    /// Reserves a device for passthrough at run time (`devctl set driver -f pciD:B:S:F ppt`).
    pub fn take_device(&self, addr: PciAddress) -> Result<(), VmmError> {
        lock(&self.inner.passthrough)
            .take(addr)
            .map_err(VmmError::Device)
    }

    /// Every device the module holds, with its state, in address order.
    pub fn devices(&self) -> Vec<(PciAddress, DeviceState)> {
        lock(&self.inner.passthrough)
            .devices()
            .map(|(a, s)| (a, s.clone()))
            .collect()
    }

    /// The `hw.vmm` tree, read-only.
    pub fn sysctl(&self) -> BTreeMap<String, String> {
        self.inner.sysctl()
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn ppt_state(state: &DeviceState) -> String {
    match state {
        DeviceState::Reserved => "reserved".into(),
        DeviceState::Assigned { vm } => format!("assigned:{vm}"),
        DeviceState::Released { host_driver } => format!("released:{host_driver}"),
    }
}

impl Inner {
    fn create_vm(self: &Arc<Self>, name: &str, ncpus: u32) -> Result<VmId, VmmError> {
        validate_name(name)?;
        self.check_ncpus(ncpus)?;
        let mut reg = lock(&self.registry);
        if reg.unloading {
            return Err(VmmError::Unloading);
        }
        if reg.vms.contains_key(name) {
            return Err(VmmError::Exists {
                name: name.to_owned(),
            });
        }
        let id = VmId(reg.next_id);
        let slot = Arc::new(VmSlot {
            id,
            name: name.to_owned(),
            ncpus: AtomicU32::new(ncpus),
            target: Mutex::new(None),
        });
        let handler = Arc::new(VmHandler {
            slot: slot.clone(),
            module: Arc::downgrade(self),
        });
        let (server, _) = ControlServer::start(
            &self.socket_dir.join(name),
            handler,
            self.limits.clone(),
            self.stats.clone(),
        )?;
        reg.next_id += 1;
        reg.vms.insert(
            name.to_owned(),
            VmEntry {
                slot,
                server: Some(server),
            },
        );
        self.vms_created.fetch_add(1, Ordering::Relaxed);
        Ok(id)
    }

    fn check_ncpus(&self, ncpus: u32) -> Result<(), VmmError> {
        if ncpus == 0 {
            return Err(VmmError::InvalidCpus { requested: ncpus });
        }
        if ncpus > self.tunables.maxcpu {
            return Err(VmmError::TooManyCpus {
                requested: ncpus,
                available: self.tunables.maxcpu,
            });
        }
        Ok(())
    }

    fn destroy_vm(&self, name: &str) -> Result<(), VmmError> {
        let mut entry = {
            let mut reg = lock(&self.registry);
            let Some(e) = reg.vms.get(name) else {
                return Err(VmmError::NoSuchVm {
                    name: name.to_owned(),
                });
            };
            if e.slot.target().is_some() {
                return Err(VmmError::Running {
                    name: name.to_owned(),
                });
            }
            reg.vms.remove(name).ok_or_else(|| VmmError::NoSuchVm {
                name: name.to_owned(),
            })?
        };
        // No lock held: the server's threads may be finishing a request that takes them.
        if let Some(s) = entry.server.take() {
            s.stop();
        }
        lock(&self.passthrough).unassign_vm(name);
        self.vms_destroyed.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn attach(&self, name: &str, target: Arc<dyn ControlTarget>) -> Result<(), VmmError> {
        let ncpus = target.ncpus();
        self.check_ncpus(ncpus)?;
        let reg = lock(&self.registry);
        let e = reg.vms.get(name).ok_or_else(|| VmmError::NoSuchVm {
            name: name.to_owned(),
        })?;
        let mut slot = lock(&e.slot.target);
        if slot.is_some() {
            return Err(VmmError::Attached {
                name: name.to_owned(),
            });
        }
        *slot = Some(target);
        e.slot.ncpus.store(ncpus, Ordering::Relaxed);
        Ok(())
    }

    fn detach(&self, name: &str) -> Result<Arc<dyn ControlTarget>, VmmError> {
        let reg = lock(&self.registry);
        let e = reg.vms.get(name).ok_or_else(|| VmmError::NoSuchVm {
            name: name.to_owned(),
        })?;
        let taken = lock(&e.slot.target).take();
        taken.ok_or_else(|| VmmError::NotRunning {
            name: name.to_owned(),
        })
    }

    fn vms(&self) -> Vec<VmInfo> {
        let reg = lock(&self.registry);
        let pt = lock(&self.passthrough);
        reg.vms
            .values()
            .map(|e| VmInfo {
                id: e.slot.id,
                name: e.slot.name.clone(),
                ncpus: e.slot.ncpus.load(Ordering::Relaxed),
                running: e.slot.target().is_some(),
                socket: self.socket_dir.join(&e.slot.name),
                devices: pt
                    .devices()
                    .filter(
                        |(_, s)| matches!(s, DeviceState::Assigned { vm } if *vm == e.slot.name),
                    )
                    .map(|(a, _)| a)
                    .collect(),
            })
            .collect()
    }

    fn assign_device(&self, vm: &str, addr: PciAddress) -> Result<(), VmmError> {
        let target = {
            let reg = lock(&self.registry);
            let e = reg.vms.get(vm).ok_or_else(|| VmmError::NoSuchVm {
                name: vm.to_owned(),
            })?;
            lock(&self.passthrough)
                .assign(addr, vm)
                .map_err(VmmError::Device)?;
            e.slot.target()
        };
        if let Some(t) = target {
            if let Err(source) = t.assign_device(addr) {
                let _ = lock(&self.passthrough).unassign(addr, vm);
                return Err(VmmError::Target {
                    vm: vm.to_owned(),
                    source,
                });
            }
        }
        Ok(())
    }

    fn unassign_device(&self, vm: &str, addr: PciAddress) -> Result<(), VmmError> {
        let target = {
            let reg = lock(&self.registry);
            let e = reg.vms.get(vm).ok_or_else(|| VmmError::NoSuchVm {
                name: vm.to_owned(),
            })?;
            let pt = lock(&self.passthrough);
            match pt.state(addr) {
                Some(DeviceState::Assigned { vm: owner }) if owner == vm => {}
                Some(DeviceState::Assigned { vm: owner }) => {
                    return Err(VmmError::Device(PassthroughError::NotAssignedTo {
                        addr,
                        vm: vm.to_owned(),
                        owner: Some(owner.clone()),
                    }))
                }
                Some(DeviceState::Reserved) => {
                    return Err(VmmError::Device(PassthroughError::NotAssignedTo {
                        addr,
                        vm: vm.to_owned(),
                        owner: None,
                    }))
                }
                Some(DeviceState::Released { .. }) | None => {
                    return Err(VmmError::Device(PassthroughError::NotReserved { addr }))
                }
            }
            e.slot.target()
        };
        if let Some(t) = target {
            t.unassign_device(addr).map_err(|source| VmmError::Target {
                vm: vm.to_owned(),
                source,
            })?;
        }
        lock(&self.passthrough)
            .unassign(addr, vm)
            .map_err(VmmError::Device)
    }

    fn sysctl(&self) -> BTreeMap<String, String> {
        let mut t = BTreeMap::new();
        let mut put = |k: &str, v: String| {
            t.insert(format!("hw.vmm.{k}"), v);
        };
        put("version", MODULE_VERSION.to_string());
        put("maxcpu", self.tunables.maxcpu.to_string());
        put(
            "halt_detection",
            u8::from(self.tunables.halt_detection).to_string(),
        );
        put("virt", self.caps.virt.to_string());
        put("kvm_api_version", self.caps.api_version.to_string());
        put("backend_max_vcpus", self.caps.max_vcpus.to_string());
        put(
            "vms_created",
            self.vms_created.load(Ordering::Relaxed).to_string(),
        );
        put(
            "vms_destroyed",
            self.vms_destroyed.load(Ordering::Relaxed).to_string(),
        );
        let vms = self.vms();
        put("vm_count", vms.len().to_string());
        for vm in &vms {
            put(&format!("vm.{}.id", vm.name), vm.id.0.to_string());
            put(&format!("vm.{}.ncpus", vm.name), vm.ncpus.to_string());
            put(
                &format!("vm.{}.running", vm.name),
                u8::from(vm.running).to_string(),
            );
        }
        let ppt: Vec<String> = lock(&self.passthrough)
            .devices()
            .map(|(a, s)| format!("{}={}", a.pptdevs_form(), ppt_state(s)))
            .collect();
        put("ppt.devices", ppt.join(" "));
        put("control.protocol_version", proto::VERSION.to_string());
        put("control.socket_dir", self.socket_dir.display().to_string());
        let s = &self.stats;
        for (k, c) in [
            ("control.connections", &s.connections),
            ("control.connections_refused", &s.connections_refused),
            ("control.requests", &s.requests),
            ("control.refused", &s.refused),
            ("control.bad_messages", &s.bad_messages),
            ("control.timeouts", &s.timeouts),
        ] {
            put(k, c.load(Ordering::Relaxed).to_string());
        }
        t
    }
}

/// Serves `<socket dir>/vmmctl`.
struct ModuleHandler {
    module: Weak<Inner>,
}

fn unloaded() -> (u32, String) {
    (status::ENXIO, VmmError::Unloading.to_string())
}

fn vmm_err(e: &VmmError) -> (u32, String) {
    (e.status(), e.to_string())
}

impl Handler for ModuleHandler {
    fn handle(&self, request: Request) -> Result<Reply, (u32, String)> {
        let inner = self.module.upgrade().ok_or_else(unloaded)?;
        match request {
            Request::Hello => Ok(Reply::Hello(Hello {
                version: proto::VERSION,
                endpoint: Endpoint::Module,
                name: MODULE_SOCKET.into(),
                ncpus: 0,
                running: false,
                maxcpu: inner.tunables.maxcpu,
            })),
            Request::Create { name, ncpus } => inner
                .create_vm(&name, ncpus)
                .map(|_| Reply::Done)
                .map_err(|e| vmm_err(&e)),
            Request::Destroy { name } => inner
                .destroy_vm(&name)
                .map(|()| Reply::Done)
                .map_err(|e| vmm_err(&e)),
            Request::List => Ok(Reply::List(
                inner
                    .vms()
                    .into_iter()
                    .map(|v| VmListing {
                        name: v.name,
                        ncpus: v.ncpus,
                        running: v.running,
                    })
                    .collect(),
            )),
            Request::Sysctl => Ok(Reply::Sysctl(inner.sysctl().into_iter().collect())),
            other => Err((
                status::ENOTTY,
                format!(
                    "{} is a VM command: send it to the VM's socket ({}/NAME), not {MODULE_SOCKET}",
                    other.command(),
                    inner.socket_dir.display()
                ),
            )),
        }
    }
}

/// Serves `<socket dir>/NAME`.
struct VmHandler {
    slot: Arc<VmSlot>,
    module: Weak<Inner>,
}

fn target_err(e: TargetError) -> (u32, String) {
    (e.status, e.message)
}

impl VmHandler {
    fn running(&self) -> Result<Arc<dyn ControlTarget>, (u32, String)> {
        self.slot.target().ok_or_else(|| {
            (
                status::ENXIO,
                format!(
                    "VM {} is not running (created, no bhyve attached)",
                    self.slot.name
                ),
            )
        })
    }

    fn check_vcpu(t: &dyn ControlTarget, vcpu: u32) -> Result<(), (u32, String)> {
        let n = t.ncpus();
        if vcpu >= n {
            return Err((
                status::EINVAL,
                format!("vCPU {vcpu} out of range (the VM has {n})"),
            ));
        }
        Ok(())
    }
}

impl Handler for VmHandler {
    fn handle(&self, request: Request) -> Result<Reply, (u32, String)> {
        let name = &self.slot.name;
        match request {
            Request::Hello => {
                let target = self.slot.target();
                let maxcpu = self.module.upgrade().map_or(0, |m| m.tunables.maxcpu);
                Ok(Reply::Hello(Hello {
                    version: proto::VERSION,
                    endpoint: Endpoint::Vm,
                    name: name.clone(),
                    ncpus: target
                        .as_ref()
                        .map_or(self.slot.ncpus.load(Ordering::Relaxed), |t| t.ncpus()),
                    running: target.is_some(),
                    maxcpu,
                }))
            }
            Request::Create { .. } | Request::Destroy { .. } | Request::List | Request::Sysctl => {
                Err((
                    status::ENOTTY,
                    format!(
                    "{} is a module command: send it to {MODULE_SOCKET}, not VM {name}'s socket",
                    request.command()
                ),
                ))
            }
            Request::Bind { addr } => {
                let inner = self.module.upgrade().ok_or_else(unloaded)?;
                inner
                    .assign_device(name, addr)
                    .map(|()| Reply::Done)
                    .map_err(|e| vmm_err(&e))
            }
            Request::Unbind { addr } => {
                let inner = self.module.upgrade().ok_or_else(unloaded)?;
                inner
                    .unassign_device(name, addr)
                    .map(|()| Reply::Done)
                    .map_err(|e| vmm_err(&e))
            }
            Request::GetRegs { vcpu } => {
                let t = self.running()?;
                Self::check_vcpu(t.as_ref(), vcpu)?;
                let r = t.regs(vcpu).map_err(target_err)?;
                let s = t.sregs(vcpu).map_err(target_err)?;
                Ok(Reply::Regs(proto::register_list(&r, &s)))
            }
            Request::SetRegs { vcpu, regs } => {
                let t = self.running()?;
                Self::check_vcpu(t.as_ref(), vcpu)?;
                if let Some((r, _)) = regs.iter().find(|(r, _)| !r.settable()) {
                    return Err((
                        status::EINVAL,
                        format!("Register {} cannot be set", r.name()),
                    ));
                }
                let mut current = t.regs(vcpu).map_err(target_err)?;
                for (r, v) in &regs {
                    proto::set_register(&mut current, *r, *v);
                }
                t.set_regs(vcpu, &current).map_err(target_err)?;
                Ok(Reply::Done)
            }
            Request::MemorySegments => {
                let t = self.running()?;
                Ok(Reply::MemorySegments(t.memory_segments()))
            }
            Request::IoapicPin { pin, op } => {
                let t = self.running()?;
                t.ioapic_pin(pin, op).map_err(target_err)?;
                Ok(Reply::Done)
            }
            Request::InjectMsi { addr, data } => {
                let t = self.running()?;
                t.inject_msi(addr, data).map_err(target_err)?;
                Ok(Reply::Done)
            }
            Request::GetStats { vcpu } => {
                let t = self.running()?;
                if let Some(v) = vcpu {
                    Self::check_vcpu(t.as_ref(), v)?;
                }
                let scopes = t
                    .stats()
                    .into_iter()
                    .filter(|s| match (vcpu, s.vcpu()) {
                        (Some(want), Some(have)) => want == have,
                        _ => true,
                    })
                    .collect();
                Ok(Reply::Stats(scopes))
            }
            Request::Suspend { how } => {
                let t = self.running()?;
                t.suspend(how).map_err(target_err)?;
                Ok(Reply::Done)
            }
            Request::Reset => {
                let t = self.running()?;
                t.reset().map_err(target_err)?;
                Ok(Reply::Done)
            }
            Request::Pause => {
                let t = self.running()?;
                t.pause().map_err(target_err)?;
                Ok(Reply::Done)
            }
            Request::Resume => {
                let t = self.running()?;
                t.resume().map_err(target_err)?;
                Ok(Reply::Done)
            }
            Request::Trace { on } => {
                let t = self.running()?;
                t.set_tracing(on).map_err(target_err)?;
                Ok(Reply::Done)
            }
        }
    }
}
