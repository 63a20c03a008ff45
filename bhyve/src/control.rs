//! The running VM as the module's control target: what `bhyvectl --vm=NAME` reaches through
//! `<socket dir>/NAME` (the analogue of `/dev/vmm/NAME`).

use std::sync::Arc;

use kmod::{ControlTarget, PinOp, StatScope, TargetError};
use stages::pc::PcPlatform;
use stages::VmRequest;
use vcpu_runner::{
    ControlError, KvmHypervisor, Regs, RunningVm, SpecialRegs, VcpuOp, VcpuOpResult,
};

/// A running VM and its platform, for control requests.
pub struct VmTarget {
    /// The VM.
    pub vm: Arc<RunningVm<KvmHypervisor>>,
    /// Its in-module devices (I/O APIC pins).
    pub pc: Arc<PcPlatform>,
}

impl std::fmt::Debug for VmTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmTarget").finish()
    }
}

fn control_err(e: ControlError) -> TargetError {
    match e {
        ControlError::SuspectedDeadlock { .. } => TargetError::timed_out(e.to_string()),
        ControlError::NotRunning(_) => TargetError::invalid(e.to_string()),
        ControlError::Busy(_) => TargetError::busy(e.to_string()),
    }
}

impl VmTarget {
    fn op(&self, vcpu: u32, op: VcpuOp) -> Result<VcpuOpResult, TargetError> {
        if vcpu >= self.vm.ncpus() {
            return Err(TargetError::invalid(format!(
                "vCPU {vcpu} does not exist (the VM has {})",
                self.vm.ncpus()
            )));
        }
        match self.vm.vcpu_op(vcpu, op).map_err(control_err)? {
            VcpuOpResult::Failed(m) => Err(TargetError::failed(m)),
            other => Ok(other),
        }
    }
}

impl ControlTarget for VmTarget {
    fn ncpus(&self) -> u32 {
        self.vm.ncpus()
    }

    fn regs(&self, vcpu: u32) -> Result<Regs, TargetError> {
        match self.op(vcpu, VcpuOp::GetRegs)? {
            VcpuOpResult::Regs(r) => Ok(r),
            other => Err(TargetError::failed(format!("unexpected answer {other:?}"))),
        }
    }

    fn set_regs(&self, vcpu: u32, regs: &Regs) -> Result<(), TargetError> {
        self.op(vcpu, VcpuOp::SetRegs(*regs)).map(|_| ())
    }

    fn sregs(&self, vcpu: u32) -> Result<SpecialRegs, TargetError> {
        match self.op(vcpu, VcpuOp::GetSregs)? {
            VcpuOpResult::Sregs(s) => Ok(s),
            other => Err(TargetError::failed(format!("unexpected answer {other:?}"))),
        }
    }

    fn memory_segments(&self) -> Vec<(u64, u64)> {
        self.vm.memory_segments().to_vec()
    }

    fn ioapic_pin(&self, pin: u32, op: PinOp) -> Result<(), TargetError> {
        if pin >= 32 {
            return Err(TargetError::invalid(format!(
                "I/O APIC pin {pin} does not exist (0-31)"
            )));
        }
        match op {
            PinOp::Assert => self.pc.set_irq(pin, true),
            PinOp::Deassert => self.pc.set_irq(pin, false),
            PinOp::Pulse => self.pc.pulse_irq(pin),
        }
        Ok(())
    }

    fn inject_msi(&self, addr: u64, data: u32) -> Result<(), TargetError> {
        self.vm
            .signal_msi(addr, data)
            .map_err(|e| TargetError::failed(e.to_string()))
    }

    fn stats(&self) -> Vec<StatScope> {
        let mut out: Vec<StatScope> = self
            .vm
            .vcpu_stats()
            .iter()
            .enumerate()
            .map(|(i, s)| StatScope {
                scope: format!("vcpu{i}"),
                counters: s
                    .snapshot()
                    .into_iter()
                    .map(|(st, v)| (st.description().to_string(), v))
                    .collect(),
            })
            .collect();
        // Exits per device, summed over the vCPUs.
        let names = self.vm.device_names();
        let mut per_device = vec![0u64; names.len()];
        for s in self.vm.vcpu_stats() {
            for (t, v) in per_device.iter_mut().zip(s.per_device()) {
                *t += v;
            }
        }
        out.push(StatScope {
            scope: "devices".into(),
            counters: names
                .iter()
                .zip(per_device)
                .map(|(n, v)| (format!("exits to {n}"), v))
                .collect(),
        });
        for (i, s) in self.vm.slow_stats().iter().enumerate() {
            use std::sync::atomic::Ordering::Relaxed;
            out.push(StatScope {
                scope: format!("devmodel{i}"),
                counters: vec![
                    ("records processed".into(), s.records.load(Relaxed)),
                    ("completions posted".into(), s.completions.load(Relaxed)),
                    ("records refused".into(), s.bad_records.load(Relaxed)),
                    (
                        "times parked waiting for records".into(),
                        s.parks.load(Relaxed),
                    ),
                ],
            });
        }
        out.push(StatScope {
            scope: "platform".into(),
            counters: self
                .pc
                .stats()
                .snapshot()
                .into_iter()
                .map(|(n, v)| (n.to_string(), v))
                .collect(),
        });
        out
    }

    fn suspend(&self, how: VmRequest) -> Result<(), TargetError> {
        self.vm.request(how);
        Ok(())
    }

    fn set_tracing(&self, on: bool) -> Result<(), TargetError> {
        self.vm.set_tracing(on);
        Ok(())
    }

    fn pause(&self) -> Result<(), TargetError> {
        self.vm.pause().map_err(control_err)
    }

    fn resume(&self) -> Result<(), TargetError> {
        self.vm.resume().map_err(control_err)
    }
}
