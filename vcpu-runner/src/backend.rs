//! The hypervisor backend trait: what the monitor needs from VT-x/SVM (here: `/dev/kvm`).
//!
//! No `kvm_bindings` type appears in these signatures; `kvm.rs` is the first implementation, the way
//! vmm.ko has its `vmm_ops` table with VMX and SVM behind it.

use std::fmt;

/// What kind of hardware virtualization the host offers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VirtKind {
    /// Intel VT-x with EPT.
    VmxEpt,
    /// AMD SVM with nested paging.
    SvmNpt,
    /// A software virtualizer behind the KVM API (for example `kvm_pvm`).
    Software(String),
    /// KVM is there but the host CPU flags say neither VMX nor SVM.
    Unknown,
}

impl fmt::Display for VirtKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VirtKind::VmxEpt => f.write_str("Intel VT-x/EPT"),
            VirtKind::SvmNpt => f.write_str("AMD SVM/NPT"),
            VirtKind::Software(m) => write!(f, "software virtualizer ({m})"),
            VirtKind::Unknown => f.write_str("unknown"),
        }
    }
}

/// The backend's capabilities, probed once.
#[derive(Clone, Debug)]
pub struct Capabilities {
    /// KVM API version (12 for every KVM since 2.6.22).
    pub api_version: i32,
    /// What virtualizes the guest.
    pub virt: VirtKind,
    /// In-kernel LAPIC with the I/O APIC and PIC in userspace (what our in-module devices need).
    pub split_irqchip: bool,
    /// `immediate_exit` in the run structure (what kicks need).
    pub immediate_exit: bool,
    /// Interrupt injection from an eventfd.
    pub irqfd: bool,
    /// Notification writes absorbed in the kernel.
    pub ioeventfd: bool,
    /// Direct MSI injection.
    pub signal_msi: bool,
    /// GSI routing entries available.
    pub irq_routes: u32,
    /// Recommended maximum vCPUs per VM.
    pub max_vcpus: u32,
}

/// A missing piece the monitor cannot do without.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// `/dev/kvm` cannot be opened.
    #[error("Cannot open {path}: {source} (is the kvm module loaded, and may this user open it?)")]
    Open {
        /// Device path.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The KVM API version is not the stable one.
    #[error("KVM API version {0} is not supported (need 12)")]
    ApiVersion(i32),
    /// A capability the monitor needs is missing.
    #[error("The hypervisor lacks {0}, which the monitor needs")]
    Missing(&'static str),
    /// An ioctl failed.
    #[error("{op} failed: {source}")]
    Ioctl {
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A value handed to the backend is out of range.
    #[error("{0}")]
    Invalid(String),
}

impl BackendError {
    pub(crate) fn ioctl(op: &'static str, e: impl Into<std::io::Error>) -> Self {
        BackendError::Ioctl {
            op,
            source: e.into(),
        }
    }
}

/// A segment register as the architecture holds it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    pub base: u64,
    pub limit: u32,
    pub selector: u16,
    /// Type field (4 bits).
    pub type_: u8,
    pub present: bool,
    pub dpl: u8,
    /// Default operation size (D/B).
    pub db: bool,
    /// Code or data (not system).
    pub s: bool,
    /// 64-bit code segment.
    pub l: bool,
    /// Granularity (limit in 4 KiB units).
    pub g: bool,
    pub unusable: bool,
}

/// A descriptor-table register.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DescriptorTable {
    pub base: u64,
    pub limit: u16,
}

/// General-purpose registers, instruction pointer and flags.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct Regs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
}

/// Control registers, segments and descriptor tables.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct SpecialRegs {
    pub cs: Segment,
    pub ds: Segment,
    pub es: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub ss: Segment,
    pub tr: Segment,
    pub ldt: Segment,
    pub gdt: DescriptorTable,
    pub idt: DescriptorTable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub apic_base: u64,
}

/// Where the boot CPU starts: what a boot protocol prescribes, as plain data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct EntryRegs {
    pub rip: u64,
    pub rsp: u64,
    pub rsi: u64,
    pub rbx: u64,
    pub rax: u64,
    pub rflags: u64,
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    pub gdt: DescriptorTable,
    /// Code segment.
    pub cs: Segment,
    /// Loaded into DS, ES, FS, GS and SS.
    pub ds: Segment,
    /// Task register, if the protocol loads one.
    pub tr: Option<Segment>,
}

/// Whether a vCPU can run, as the backend's scheduler sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MpState {
    /// Running or ready to run.
    Runnable,
    /// Halted (HLT) in the backend, waiting for an interrupt.
    Halted,
    /// An application processor waiting for INIT/SIPI.
    WaitingForSipi,
    /// Anything else the backend reports.
    Other(u32),
}

/// One exit of `Vcpu::run`, borrowed from the backend's run structure. It never leaves the vCPU
/// thread: what crosses a ring is an owned `pipeline::ExitRecord` built from it.
#[derive(Debug)]
pub enum VmExit<'a> {
    /// Port read: fill `data`.
    IoIn { port: u16, data: &'a mut [u8] },
    /// Port write.
    IoOut { port: u16, data: &'a [u8] },
    /// MMIO read: fill `data`.
    MmioRead { addr: u64, data: &'a mut [u8] },
    /// MMIO write.
    MmioWrite { addr: u64, data: &'a [u8] },
    /// HLT with no in-kernel LAPIC to absorb it.
    Hlt,
    /// Triple fault (or another reason the CPU shut down).
    Shutdown,
    /// EOI of a level-triggered vector routed through the userspace I/O APIC.
    IoapicEoi { vector: u8 },
    /// The run was interrupted (a kick): nothing for the guest.
    Interrupted,
    /// The guest asked for a system event (PSCI-style reset/shutdown on some backends).
    SystemEvent { reset: bool },
    /// The backend could not enter the guest.
    FailEntry { reason: u64 },
    /// The backend hit an internal error (for example an instruction it cannot emulate).
    InternalError { suberror: u32 },
    /// Any other exit, by the backend's number.
    Other { reason: u32 },
}

/// A hypervisor (the `vmm_ops` table).
pub trait Hypervisor: Send + Sync {
    /// The VM type.
    type Vm: Vm;
    /// Capabilities, probed at open.
    fn capabilities(&self) -> &Capabilities;
    /// A new VM; `split_irqchip_pins` enables the in-kernel LAPIC with our userspace I/O APIC.
    fn create_vm(&self, split_irqchip_pins: Option<u32>) -> Result<Self::Vm, BackendError>;
}

/// One VM: memory slots, vCPUs, interrupt injection.
pub trait Vm: Send + Sync {
    /// The vCPU type.
    type Vcpu: Vcpu;
    /// Maps `size` bytes of host memory at `host_addr` to guest-physical `gpa`.
    ///
    /// # Safety
    /// The host range must stay mapped and valid for the VM's lifetime.
    unsafe fn map_memory(
        &self,
        slot: u32,
        gpa: u64,
        host_addr: u64,
        size: u64,
    ) -> Result<(), BackendError>;
    /// Creates vCPU `id`.
    fn create_vcpu(&self, id: u32) -> Result<Self::Vcpu, BackendError>;
    /// Injects an MSI (how our I/O APIC delivers to the in-kernel LAPIC).
    fn signal_msi(&self, addr: u64, data: u32) -> Result<(), BackendError>;
    /// Replaces the GSI routing table with MSI routes `(gsi, address, data)`. With a userspace
    /// I/O APIC this is also how the backend learns which vectors are level-triggered I/O APIC
    /// vectors, whose EOIs it must report (`VmExit::IoapicEoi`).
    ///
    /// The table is replaced as a whole: call it through one owner that merges every user's routes
    /// (`crate::routes::GsiRoutes`), never directly from two places.
    fn set_msi_routes(&self, routes: &[(u32, u64, u32)]) -> Result<(), BackendError>;
    /// Whether a new VM's routing table is known to be empty, so installing an empty table would
    /// change nothing (and need not be done). `false` when unknown.
    fn msi_routes_start_empty(&self) -> bool {
        false
    }
    /// Binds `fd` to `gsi`: every write to the eventfd injects the interrupt the GSI's route
    /// describes, inside the hypervisor (no exit, no ioctl on the writer's side).
    fn register_irqfd(
        &self,
        fd: &vmm_sys_util::eventfd::EventFd,
        gsi: u32,
    ) -> Result<(), BackendError>;
    /// Undoes [`Vm::register_irqfd`].
    fn unregister_irqfd(
        &self,
        fd: &vmm_sys_util::eventfd::EventFd,
        gsi: u32,
    ) -> Result<(), BackendError>;
    /// Coalesces the guest's writes to `zone`: the hypervisor appends them to the VM's ring
    /// (read with [`Vcpu::map_coalesced_ring`]) instead of exiting. `Err` when it cannot; the writes
    /// then exit as usual. Register only after the ring is mapped, and only zones whose every
    /// address belongs to a fast device (or nobody).
    fn register_coalesced(
        &self,
        zone: &crate::coalesced::CoalescedZone,
    ) -> Result<(), BackendError>;
    /// Absorbs guest writes of any width to MMIO `addr` in the hypervisor: each signals `fd`
    /// instead of exiting to us (a virtio notify costs no userspace exit).
    fn register_ioeventfd(
        &self,
        addr: u64,
        fd: &vmm_sys_util::eventfd::EventFd,
    ) -> Result<(), BackendError>;
    /// Undoes [`Vm::register_ioeventfd`] (a BAR the guest moved or stopped decoding).
    fn unregister_ioeventfd(
        &self,
        addr: u64,
        fd: &vmm_sys_util::eventfd::EventFd,
    ) -> Result<(), BackendError>;
}

/// One vCPU. Must be run on one thread (the pinned vCPU thread).
pub trait Vcpu: Send {
    /// Enters the guest until the next exit.
    fn run(&mut self) -> Result<VmExit<'_>, BackendError>;
    /// Sets the boot CPU's entry state.
    fn set_entry(&mut self, entry: &EntryRegs) -> Result<(), BackendError>;
    /// Reads the general registers.
    fn regs(&self) -> Result<Regs, BackendError>;
    /// Writes the general registers.
    fn set_regs(&self, regs: &Regs) -> Result<(), BackendError>;
    /// Reads the special registers.
    fn sregs(&self) -> Result<SpecialRegs, BackendError>;
    /// The scheduling state (halted, runnable, waiting for SIPI).
    fn mp_state(&self) -> Result<MpState, BackendError>;
    /// The CPUID leaf `function`/`index` this vCPU's guest sees, as `[eax, ebx, ecx, edx]`
    /// (`None` if the table has no such leaf).
    fn cpuid(&self, function: u32, index: u32) -> Result<Option<[u32; 4]>, BackendError>;
    /// Maps the VM's coalesced-write ring through this vCPU (`None` if the hypervisor has none).
    fn map_coalesced_ring(
        &mut self,
    ) -> Result<Option<crate::coalesced::CoalescedRing>, BackendError>;
    /// Arms or clears `immediate_exit` (a pending kick makes the next `run` return at once).
    fn set_immediate_exit(&mut self, on: bool);
    /// The address of the `immediate_exit` byte, for a signal handler on this vCPU's thread.
    fn immediate_exit_ptr(&mut self) -> *mut u8;
}
