//! The `/dev/kvm` backend: the first implementation of [`Hypervisor`], on kvm-ioctls.

use kvm_bindings::{
    kvm_enable_cap, kvm_msi, kvm_regs, kvm_segment, kvm_userspace_memory_region, CpuId,
    KVM_CAP_SPLIT_IRQCHIP, KVM_MAX_CPUID_ENTRIES, KVM_SYSTEM_EVENT_RESET,
};
use kvm_ioctls::{Cap, Kvm, VcpuExit, VcpuFd, VmFd};

use crate::backend::{
    BackendError, Capabilities, DescriptorTable, EntryRegs, Hypervisor, MpState, Regs, Segment,
    SpecialRegs, Vcpu, VirtKind, Vm, VmExit,
};
use crate::coalesced::{CoalescedRing, CoalescedZone};
use crate::cpuid::CpuidFeatures;

/// Detects what virtualizes guests on this host, from the loaded modules and the CPU's own CPUID
/// (not `/proc/cpuinfo`: reading and parsing it took ~120 ms of start-up under emulation).
pub fn detect_virt() -> VirtKind {
    // Software virtualizers behind the KVM API announce themselves as a module.
    for m in ["kvm_pvm"] {
        if std::path::Path::new("/sys/module").join(m).exists() {
            return VirtKind::Software(m.to_string());
        }
    }
    use core::arch::x86_64::__cpuid;
    // Leaves above the reported maximum are not asked for.
    let leaf1_ecx = __cpuid(1).ecx;
    let ext_max = __cpuid(0x8000_0000).eax;
    let ext1_ecx = if ext_max >= 0x8000_0001 {
        __cpuid(0x8000_0001).ecx
    } else {
        0
    };
    virt_from_cpuid(leaf1_ecx, ext1_ecx)
}

/// The virtualization extension CPUID reports: leaf 1 ECX[5] is VMX, leaf 0x8000_0001 ECX[2] SVM
/// (`ext1_ecx` 0 when the CPU has no such leaf).
pub fn virt_from_cpuid(leaf1_ecx: u32, ext1_ecx: u32) -> VirtKind {
    if leaf1_ecx & (1 << 5) != 0 {
        VirtKind::VmxEpt
    } else if ext1_ecx & (1 << 2) != 0 {
        VirtKind::SvmNpt
    } else {
        VirtKind::Unknown
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpuid_bits_name_the_extension() {
        assert_eq!(virt_from_cpuid(1 << 5, 0), VirtKind::VmxEpt);
        assert_eq!(virt_from_cpuid(0, 1 << 2), VirtKind::SvmNpt);
        assert_eq!(virt_from_cpuid(!(1 << 5), !(1 << 2)), VirtKind::Unknown);
        assert_eq!(virt_from_cpuid(0, 0), VirtKind::Unknown);
    }

    #[test]
    fn cpuid_agrees_with_the_kernels_flags_when_they_show_one() {
        // The kernel may hide a flag (disabled by firmware), never invent one: where /proc/cpuinfo
        // shows vmx or svm, CPUID must say the same.
        let flags = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let flags = flags
            .lines()
            .find(|l| l.starts_with("flags"))
            .unwrap_or_default()
            .to_string();
        let has = |f: &str| flags.split_whitespace().any(|w| w == f);
        use core::arch::x86_64::__cpuid;
        let (l1, ext_max) = (__cpuid(1).ecx, __cpuid(0x8000_0000).eax);
        let e1 = if ext_max >= 0x8000_0001 {
            __cpuid(0x8000_0001).ecx
        } else {
            0
        };
        let v = virt_from_cpuid(l1, e1);
        if has("vmx") {
            assert_eq!(v, VirtKind::VmxEpt);
        } else if has("svm") {
            assert_eq!(v, VirtKind::SvmNpt);
        }
    }
}

/// The device node [`KvmHypervisor::open`] opens.
pub const KVM_DEVICE: &str = "/dev/kvm";

/// `KVM_GET_SUPPORTED_CPUID` of [`KVM_DEVICE`], asked once per process (the answer depends on the
/// module and the CPU, not on the open file): `Err` holds the errno.
static SUPPORTED_CPUID: std::sync::OnceLock<Result<CpuId, i32>> = std::sync::OnceLock::new();

/// Asks [`KVM_DEVICE`] for its supported CPUID now, so the first vCPU finds the answer ready.
///
/// The ioctl took 0.25–0.33 ms on our hosts (kvm_pvm, 2026-11-25); asked in
/// [`KvmHypervisor::open`] it sat on the main thread before the VM could be created. bhyve calls
/// this from the thread that warms up the clock, while the command line, images and VM are set up
/// on the main thread; the first `create_vcpu` takes the answer (waiting for it if the ioctl is
/// still running), or asks itself when nothing called this. A failure to open the device is
/// ignored here (the main thread reports it); a failing ioctl is reported by `create_vcpu`.
pub fn prefetch_supported_cpuid() {
    if SUPPORTED_CPUID.get().is_some() {
        return;
    }
    let Ok(kvm) = Kvm::new() else {
        return;
    };
    supported_cpuid_of_device(&kvm);
}

fn supported_cpuid_of_device(kvm: &Kvm) -> &'static Result<CpuId, i32> {
    SUPPORTED_CPUID.get_or_init(|| ask_supported_cpuid(kvm))
}

/// The `KVM_GET_SUPPORTED_CPUID` ioctl itself; `Err` holds the errno.
fn ask_supported_cpuid(kvm: &Kvm) -> Result<CpuId, i32> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| e.errno())
}

/// Where a VM's vCPUs get the supported CPUID from (see [`prefetch_supported_cpuid`]).
#[derive(Debug)]
struct SupportedCpuid {
    kvm: std::sync::Arc<Kvm>,
    /// Whether `kvm` is [`KVM_DEVICE`] (whose answer is kept process-wide).
    default_device: bool,
    /// The answer of another device node.
    other: std::sync::OnceLock<Result<CpuId, i32>>,
}

impl SupportedCpuid {
    fn get(&self) -> Result<&CpuId, BackendError> {
        let answer = if self.default_device {
            supported_cpuid_of_device(&self.kvm)
        } else {
            self.other.get_or_init(|| ask_supported_cpuid(&self.kvm))
        };
        answer.as_ref().map_err(|&errno| {
            BackendError::ioctl("KVM_GET_SUPPORTED_CPUID", kvm_ioctls::Error::new(errno))
        })
    }
}

/// `/dev/kvm`, opened and probed.
#[derive(Debug)]
pub struct KvmHypervisor {
    kvm: std::sync::Arc<Kvm>,
    caps: Capabilities,
    cpuid: std::sync::Arc<SupportedCpuid>,
    /// `KVM_CAP_TSC_DEADLINE_TIMER`: the in-kernel LAPIC emulates the TSC-deadline MSR.
    tsc_deadline: bool,
    /// `KVM_CAP_COALESCED_MMIO`: the page offset of the coalesced ring in a vCPU fd (0: none).
    coalesced_page: u32,
    /// `KVM_CAP_COALESCED_PIO`: port zones too.
    coalesced_pio: bool,
}

impl KvmHypervisor {
    /// Opens `/dev/kvm` and probes what it offers.
    pub fn open() -> Result<Self, BackendError> {
        Self::open_path(KVM_DEVICE)
    }

    /// Opens a KVM device node at `path`.
    pub fn open_path(path: &str) -> Result<Self, BackendError> {
        let c = std::ffi::CString::new(path)
            .map_err(|_| BackendError::Invalid(format!("bad device path {path:?}")))?;
        let kvm = Kvm::new_with_path(&c).map_err(|e| BackendError::Open {
            path: path.to_string(),
            source: e.into(),
        })?;
        let caps = Capabilities {
            api_version: kvm.get_api_version(),
            virt: detect_virt(),
            split_irqchip: kvm.check_extension(Cap::SplitIrqchip),
            immediate_exit: kvm.check_extension(Cap::ImmediateExit),
            irqfd: kvm.check_extension(Cap::Irqfd),
            ioeventfd: kvm.check_extension(Cap::Ioeventfd),
            signal_msi: kvm.check_extension(Cap::SignalMsi),
            irq_routes: u32::try_from(kvm.check_extension_int(Cap::IrqRouting)).unwrap_or(0),
            max_vcpus: u32::try_from(kvm.get_nr_vcpus()).unwrap_or(1),
        };
        let tsc_deadline = kvm.check_extension(Cap::TscDeadlineTimer);
        let coalesced_page =
            u32::try_from(kvm.check_extension_int(Cap::CoalescedMmio)).unwrap_or(0);
        let coalesced_pio = coalesced_page != 0 && kvm.check_extension(Cap::CoalescedPio);
        let kvm = std::sync::Arc::new(kvm);
        let cpuid = std::sync::Arc::new(SupportedCpuid {
            kvm: kvm.clone(),
            default_device: path == KVM_DEVICE,
            other: std::sync::OnceLock::new(),
        });
        Ok(Self {
            kvm,
            caps,
            cpuid,
            tsc_deadline,
            coalesced_page,
            coalesced_pio,
        })
    }

    /// What the CPUID policy adds for a VM with (or without) an in-kernel local APIC.
    pub fn cpuid_features(&self, in_kernel_lapic: bool) -> CpuidFeatures {
        CpuidFeatures {
            tsc_deadline: in_kernel_lapic && self.tsc_deadline,
        }
    }
}

impl Hypervisor for KvmHypervisor {
    type Vm = KvmVm;

    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    fn create_vm(&self, split_irqchip_pins: Option<u32>) -> Result<KvmVm, BackendError> {
        let vm = self
            .kvm
            .create_vm()
            .map_err(|e| BackendError::ioctl("KVM_CREATE_VM", e))?;
        if let Some(pins) = split_irqchip_pins {
            let mut cap = kvm_enable_cap {
                cap: KVM_CAP_SPLIT_IRQCHIP,
                ..Default::default()
            };
            cap.args[0] = u64::from(pins);
            vm.enable_cap(&cap)
                .map_err(|e| BackendError::ioctl("KVM_ENABLE_CAP(SPLIT_IRQCHIP)", e))?;
        }
        Ok(KvmVm {
            vm,
            cpuid: self.cpuid.clone(),
            features: self.cpuid_features(split_irqchip_pins.is_some()),
            coalesced_page: self.coalesced_page,
            coalesced_pio: self.coalesced_pio,
            coalesced: std::sync::Mutex::new(Vec::new()),
        })
    }
}

/// A KVM VM.
#[derive(Debug)]
pub struct KvmVm {
    vm: VmFd,
    cpuid: std::sync::Arc<SupportedCpuid>,
    features: CpuidFeatures,
    coalesced_page: u32,
    coalesced_pio: bool,
    /// Zones registered with `KVM_REGISTER_COALESCED_MMIO`, unregistered on drop.
    coalesced: std::sync::Mutex<Vec<(kvm_ioctls::IoEventAddress, u32)>>,
}

/// Unregisters the coalesced zones before the VM file closes. Measured on our hosts (kvm_pvm,
/// 2026-11-25): a VM destroyed with its three zones still registered took 5–10 ms in `close`;
/// three `KVM_UNREGISTER_COALESCED_MMIO` calls cost 0.02–3 ms each (each waits for an SRCU grace
/// period, as each registration does) and the `close` then 0.3–0.5 ms. Zones are registered at
/// their first use (`coalesced::LazyZones`), so a guest that never touches one pays neither.
impl Drop for KvmVm {
    fn drop(&mut self) {
        let zones = std::mem::take(
            &mut *self
                .coalesced
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for (addr, len) in zones {
            let _ = self.vm.unregister_coalesced_mmio(addr, len);
        }
    }
}

impl Vm for KvmVm {
    type Vcpu = KvmVcpu;

    unsafe fn map_memory(
        &self,
        slot: u32,
        gpa: u64,
        host_addr: u64,
        size: u64,
    ) -> Result<(), BackendError> {
        let region = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: host_addr,
            flags: 0,
        };
        // SAFETY: the caller guarantees the host range stays mapped for the VM's lifetime.
        unsafe { self.vm.set_user_memory_region(region) }
            .map_err(|e| BackendError::ioctl("KVM_SET_USER_MEMORY_REGION", e))
    }

    fn create_vcpu(&self, id: u32) -> Result<KvmVcpu, BackendError> {
        let fd = self
            .vm
            .create_vcpu(u64::from(id))
            .map_err(|e| BackendError::ioctl("KVM_CREATE_VCPU", e))?;
        let mut cpuid = self.cpuid.get()?.clone();
        crate::cpuid::apply_policy(&mut cpuid, id, self.features);
        fd.set_cpuid2(&cpuid)
            .map_err(|e| BackendError::ioctl("KVM_SET_CPUID2", e))?;
        Ok(KvmVcpu {
            fd,
            coalesced_page: self.coalesced_page,
        })
    }

    fn signal_msi(&self, addr: u64, data: u32) -> Result<(), BackendError> {
        let msi = kvm_msi {
            address_lo: u32::try_from(addr & 0xffff_ffff).unwrap_or(0),
            address_hi: u32::try_from(addr >> 32).unwrap_or(0),
            data,
            ..Default::default()
        };
        self.vm
            .signal_msi(msi)
            .map(|_| ())
            .map_err(|e| BackendError::ioctl("KVM_SIGNAL_MSI", e))
    }

    fn register_coalesced(&self, zone: &CoalescedZone) -> Result<(), BackendError> {
        if self.coalesced_page == 0 {
            return Err(BackendError::Missing("KVM_CAP_COALESCED_MMIO"));
        }
        if zone.pio && !self.coalesced_pio {
            return Err(BackendError::Missing("KVM_CAP_COALESCED_PIO"));
        }
        let addr = if zone.pio {
            kvm_ioctls::IoEventAddress::Pio(zone.addr)
        } else {
            kvm_ioctls::IoEventAddress::Mmio(zone.addr)
        };
        self.vm
            .register_coalesced_mmio(addr, zone.len)
            .map_err(|e| BackendError::ioctl("KVM_REGISTER_COALESCED_MMIO", e))?;
        self.coalesced
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((addr, zone.len));
        Ok(())
    }

    fn register_ioeventfd(
        &self,
        addr: u64,
        fd: &vmm_sys_util::eventfd::EventFd,
    ) -> Result<(), BackendError> {
        self.vm
            .register_ioevent(
                fd,
                &kvm_ioctls::IoEventAddress::Mmio(addr),
                kvm_ioctls::NoDatamatch,
            )
            .map_err(|e| BackendError::ioctl("KVM_IOEVENTFD", e))
    }

    fn unregister_ioeventfd(
        &self,
        addr: u64,
        fd: &vmm_sys_util::eventfd::EventFd,
    ) -> Result<(), BackendError> {
        self.vm
            .unregister_ioevent(
                fd,
                &kvm_ioctls::IoEventAddress::Mmio(addr),
                kvm_ioctls::NoDatamatch,
            )
            .map_err(|e| BackendError::ioctl("KVM_IOEVENTFD(DEASSIGN)", e))
    }

    fn register_irqfd(
        &self,
        fd: &vmm_sys_util::eventfd::EventFd,
        gsi: u32,
    ) -> Result<(), BackendError> {
        self.vm
            .register_irqfd(fd, gsi)
            .map_err(|e| BackendError::ioctl("KVM_IRQFD", e))
    }

    fn unregister_irqfd(
        &self,
        fd: &vmm_sys_util::eventfd::EventFd,
        gsi: u32,
    ) -> Result<(), BackendError> {
        self.vm
            .unregister_irqfd(fd, gsi)
            .map_err(|e| BackendError::ioctl("KVM_IRQFD(DEASSIGN)", e))
    }

    /// We never create KVM's full in-kernel irqchip (`KVM_CREATE_IRQCHIP`, whose default table
    /// routes the PIC and I/O APIC pins): with the split irqchip KVM starts with an empty table
    /// (`kvm_setup_empty_irq_routing`), without one with none. Each `KVM_SET_GSI_ROUTING` waits
    /// for an SRCU grace period (0.1–3 ms measured on our hosts), so an empty table is not
    /// installed over an empty one at start-up.
    fn msi_routes_start_empty(&self) -> bool {
        true
    }

    fn set_msi_routes(&self, routes: &[(u32, u64, u32)]) -> Result<(), BackendError> {
        let mut table = kvm_bindings::KvmIrqRouting::new(0)
            .map_err(|e| BackendError::Invalid(format!("route table: {e:?}")))?;
        for &(gsi, addr, data) in routes {
            let mut e = kvm_bindings::kvm_irq_routing_entry {
                gsi,
                type_: kvm_bindings::KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            e.u.msi = kvm_bindings::kvm_irq_routing_msi {
                address_lo: u32::try_from(addr & 0xffff_ffff).unwrap_or(0),
                address_hi: u32::try_from(addr >> 32).unwrap_or(0),
                data,
                ..Default::default()
            };
            table
                .push(e)
                .map_err(|e| BackendError::Invalid(format!("route table: {e:?}")))?;
        }
        self.vm
            .set_gsi_routing(&table)
            .map_err(|e| BackendError::ioctl("KVM_SET_GSI_ROUTING", e))
    }
}

/// A KVM vCPU.
#[derive(Debug)]
pub struct KvmVcpu {
    fd: VcpuFd,
    coalesced_page: u32,
}

fn to_kvm_seg(s: &Segment) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: u8::from(s.present),
        dpl: s.dpl,
        db: u8::from(s.db),
        s: u8::from(s.s),
        l: u8::from(s.l),
        g: u8::from(s.g),
        avl: 0,
        unusable: u8::from(s.unusable),
        padding: 0,
    }
}

fn from_kvm_seg(s: &kvm_segment) -> Segment {
    Segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present != 0,
        dpl: s.dpl,
        db: s.db != 0,
        s: s.s != 0,
        l: s.l != 0,
        g: s.g != 0,
        unusable: s.unusable != 0,
    }
}

impl Vcpu for KvmVcpu {
    #[inline]
    fn run(&mut self) -> Result<VmExit<'_>, BackendError> {
        // The run structure is an mmap of the vCPU fd: its address is stable for the fd's life.
        let run_ptr: *const kvm_bindings::kvm_run = self.fd.get_kvm_run();
        match self.fd.run() {
            Ok(exit) => Ok(match exit {
                VcpuExit::IoIn(port, data) => VmExit::IoIn { port, data },
                VcpuExit::IoOut(port, data) => VmExit::IoOut { port, data },
                VcpuExit::MmioRead(addr, data) => VmExit::MmioRead { addr, data },
                VcpuExit::MmioWrite(addr, data) => VmExit::MmioWrite { addr, data },
                VcpuExit::Hlt => VmExit::Hlt,
                VcpuExit::Shutdown => VmExit::Shutdown,
                VcpuExit::IoapicEoi(vector) => VmExit::IoapicEoi { vector },
                VcpuExit::Intr => VmExit::Interrupted,
                VcpuExit::SystemEvent(t, _) => VmExit::SystemEvent {
                    reset: t == KVM_SYSTEM_EVENT_RESET,
                },
                VcpuExit::FailEntry(reason, _) => VmExit::FailEntry { reason },
                VcpuExit::InternalError => VmExit::InternalError {
                    suberror: {
                        // SAFETY: `run_ptr` points at the live run structure (mapped for the fd's
                        // life), which KVM has finished writing for this exit.
                        let run = unsafe { &*run_ptr };
                        // SAFETY: the exit reason says the `internal` member of the union is live.
                        unsafe { run.__bindgen_anon_1.internal.suberror }
                    },
                },
                VcpuExit::Unsupported(r) => VmExit::Other { reason: r },
                other => VmExit::Other {
                    reason: exit_number(&other),
                },
            }),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                Ok(VmExit::Interrupted)
            }
            Err(e) => Err(BackendError::ioctl("KVM_RUN", e)),
        }
    }

    fn set_entry(&mut self, e: &EntryRegs) -> Result<(), BackendError> {
        let mut sregs = self
            .fd
            .get_sregs()
            .map_err(|err| BackendError::ioctl("KVM_GET_SREGS", err))?;
        sregs.cs = to_kvm_seg(&e.cs);
        for s in [
            &mut sregs.ds,
            &mut sregs.es,
            &mut sregs.fs,
            &mut sregs.gs,
            &mut sregs.ss,
        ] {
            *s = to_kvm_seg(&e.ds);
        }
        if let Some(tr) = &e.tr {
            sregs.tr = to_kvm_seg(tr);
        }
        sregs.gdt.base = e.gdt.base;
        sregs.gdt.limit = e.gdt.limit;
        sregs.cr0 = e.cr0;
        sregs.cr3 = e.cr3;
        sregs.cr4 = e.cr4;
        sregs.efer = e.efer;
        self.fd
            .set_sregs(&sregs)
            .map_err(|err| BackendError::ioctl("KVM_SET_SREGS", err))?;
        let regs = kvm_regs {
            rip: e.rip,
            rsp: e.rsp,
            rsi: e.rsi,
            rbx: e.rbx,
            rax: e.rax,
            rflags: e.rflags | 2,
            ..Default::default()
        };
        self.fd
            .set_regs(&regs)
            .map_err(|err| BackendError::ioctl("KVM_SET_REGS", err))
    }

    fn regs(&self) -> Result<Regs, BackendError> {
        let r = self
            .fd
            .get_regs()
            .map_err(|e| BackendError::ioctl("KVM_GET_REGS", e))?;
        Ok(Regs {
            rax: r.rax,
            rbx: r.rbx,
            rcx: r.rcx,
            rdx: r.rdx,
            rsi: r.rsi,
            rdi: r.rdi,
            rsp: r.rsp,
            rbp: r.rbp,
            r8: r.r8,
            r9: r.r9,
            r10: r.r10,
            r11: r.r11,
            r12: r.r12,
            r13: r.r13,
            r14: r.r14,
            r15: r.r15,
            rip: r.rip,
            rflags: r.rflags,
        })
    }

    fn set_regs(&self, r: &Regs) -> Result<(), BackendError> {
        let k = kvm_regs {
            rax: r.rax,
            rbx: r.rbx,
            rcx: r.rcx,
            rdx: r.rdx,
            rsi: r.rsi,
            rdi: r.rdi,
            rsp: r.rsp,
            rbp: r.rbp,
            r8: r.r8,
            r9: r.r9,
            r10: r.r10,
            r11: r.r11,
            r12: r.r12,
            r13: r.r13,
            r14: r.r14,
            r15: r.r15,
            rip: r.rip,
            rflags: r.rflags,
        };
        self.fd
            .set_regs(&k)
            .map_err(|e| BackendError::ioctl("KVM_SET_REGS", e))
    }

    fn sregs(&self) -> Result<SpecialRegs, BackendError> {
        let s = self
            .fd
            .get_sregs()
            .map_err(|e| BackendError::ioctl("KVM_GET_SREGS", e))?;
        Ok(SpecialRegs {
            cs: from_kvm_seg(&s.cs),
            ds: from_kvm_seg(&s.ds),
            es: from_kvm_seg(&s.es),
            fs: from_kvm_seg(&s.fs),
            gs: from_kvm_seg(&s.gs),
            ss: from_kvm_seg(&s.ss),
            tr: from_kvm_seg(&s.tr),
            ldt: from_kvm_seg(&s.ldt),
            gdt: DescriptorTable {
                base: s.gdt.base,
                limit: s.gdt.limit,
            },
            idt: DescriptorTable {
                base: s.idt.base,
                limit: s.idt.limit,
            },
            cr0: s.cr0,
            cr2: s.cr2,
            cr3: s.cr3,
            cr4: s.cr4,
            cr8: s.cr8,
            efer: s.efer,
            apic_base: s.apic_base,
        })
    }

    fn mp_state(&self) -> Result<MpState, BackendError> {
        let m = self
            .fd
            .get_mp_state()
            .map_err(|e| BackendError::ioctl("KVM_GET_MP_STATE", e))?;
        Ok(match m.mp_state {
            kvm_bindings::KVM_MP_STATE_RUNNABLE => MpState::Runnable,
            kvm_bindings::KVM_MP_STATE_HALTED => MpState::Halted,
            kvm_bindings::KVM_MP_STATE_UNINITIALIZED | kvm_bindings::KVM_MP_STATE_INIT_RECEIVED => {
                MpState::WaitingForSipi
            }
            other => MpState::Other(other),
        })
    }

    fn map_coalesced_ring(&mut self) -> Result<Option<CoalescedRing>, BackendError> {
        if self.coalesced_page == 0 {
            return Ok(None);
        }
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .map_err(|_| BackendError::Invalid("page size".into()))?;
        let offset = libc::off_t::try_from(self.coalesced_page as usize * page)
            .map_err(|_| BackendError::Invalid("coalesced ring offset".into()))?;
        // SAFETY: maps one page of the vCPU fd at the offset KVM_CAP_COALESCED_MMIO names; the
        // result is checked below and owned by the ring from then on.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(&self.fd),
                offset,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(BackendError::ioctl(
                "mmap(coalesced MMIO ring)",
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: `p` is a fresh mapping of `page` bytes of the ring, handed over to the ring.
        let ring = unsafe { CoalescedRing::from_mapping(p.cast(), page) };
        if ring.is_none() {
            // SAFETY: the mapping made above, not handed to anyone.
            unsafe { libc::munmap(p, page) };
        }
        Ok(ring)
    }

    fn cpuid(&self, function: u32, index: u32) -> Result<Option<[u32; 4]>, BackendError> {
        let table = self
            .fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| BackendError::ioctl("KVM_GET_CPUID2", e))?;
        Ok(table
            .as_slice()
            .iter()
            .find(|e| {
                e.function == function
                    && (e.flags & kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0
                        || e.index == index)
            })
            .map(|e| [e.eax, e.ebx, e.ecx, e.edx]))
    }

    #[inline]
    fn set_immediate_exit(&mut self, on: bool) {
        self.fd.set_kvm_immediate_exit(u8::from(on));
    }

    fn immediate_exit_ptr(&mut self) -> *mut u8 {
        std::ptr::addr_of_mut!(self.fd.get_kvm_run().immediate_exit)
    }
}

fn exit_number(e: &VcpuExit<'_>) -> u32 {
    use kvm_bindings::*;
    match e {
        VcpuExit::Unknown => KVM_EXIT_UNKNOWN,
        VcpuExit::Exception => KVM_EXIT_EXCEPTION,
        VcpuExit::Hypercall(_) => KVM_EXIT_HYPERCALL,
        VcpuExit::Debug(_) => KVM_EXIT_DEBUG,
        VcpuExit::IrqWindowOpen => KVM_EXIT_IRQ_WINDOW_OPEN,
        VcpuExit::Nmi => KVM_EXIT_NMI,
        VcpuExit::X86Rdmsr(_) => KVM_EXIT_X86_RDMSR,
        VcpuExit::X86Wrmsr(_) => KVM_EXIT_X86_WRMSR,
        VcpuExit::MemoryFault { .. } => KVM_EXIT_MEMORY_FAULT,
        _ => u32::MAX,
    }
}
