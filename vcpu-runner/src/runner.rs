//! The vCPU loop: an explicit state machine around `Vcpu::run` and the pure exit handler.
//!
//! ```text
//!            request(Paused)              request(Running)
//!  Running ───────────────▶ Paused ───────────────────────▶ Running
//!     │                        │
//!     │ request(Stopping),     │ request(Stopping)
//!     │ Stop/Fail from handler ▼
//!     └──────────────────▶ Stopping  (thread leaves the loop, acknowledges, unregisters)
//! ```

use crate::backend::{MpState, Regs, SpecialRegs, Vcpu, VmExit};
use crate::control::{register_vcpu_thread, RunState, VcpuControl, VcpuOp, VcpuOpResult};
use crate::handler::{Action, ExitHandler, SlowPath};
use stages::VmRequest;

/// Why a vCPU loop ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuOutcome {
    /// A controller asked it to stop.
    Stopped,
    /// The VM asked to stop (power-off, reset, debug exit, triple fault...).
    Request(VmRequest),
    /// Something failed (bhyve exit status 4).
    Error(String),
}

/// Pins the calling thread to host CPU `cpu`. Failure is reported, not fatal (a container may forbid it).
pub fn pin_to_cpu(cpu: usize) -> std::io::Result<()> {
    pin_to_cpus(&[cpu])
}

/// Lets the calling thread run on the host CPUs `cpus` only (none: an error).
pub fn pin_to_cpus(cpus: &[usize]) -> std::io::Result<()> {
    let limit = 8 * std::mem::size_of::<libc::cpu_set_t>();
    if cpus.is_empty() || cpus.iter().any(|&c| c >= limit) {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: an all-zero cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        // SAFETY: `cpu` is below CPU_SETSIZE (checked above), so CPU_SET writes inside `set`.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: `set` is a valid cpu_set_t of the size passed; pid 0 is the calling thread.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Runs a control operation on the vCPU's own thread.
fn run_op<V: Vcpu>(vcpu: &mut V, op: VcpuOp) -> VcpuOpResult {
    let r = match op {
        VcpuOp::GetRegs => vcpu.regs().map(VcpuOpResult::Regs),
        VcpuOp::SetRegs(r) => vcpu.set_regs(&r).map(|()| VcpuOpResult::Done),
        VcpuOp::GetSregs => vcpu.sregs().map(VcpuOpResult::Sregs),
        VcpuOp::HaltedWithInterruptsOff => vcpu.mp_state().and_then(|m| {
            Ok(VcpuOpResult::Flag(match m {
                // An AP that was never started cannot be woken by the guest's own interrupts
                // either, if the BSP is halted with interrupts off.
                MpState::WaitingForSipi => true,
                MpState::Halted => vcpu.regs()?.rflags & (1 << 9) == 0,
                MpState::Runnable | MpState::Other(_) => false,
            }))
        }),
    };
    r.unwrap_or_else(|e| VcpuOpResult::Failed(e.to_string()))
}

/// One line on the state a vCPU shut down in (a triple fault): instruction and stack pointers,
/// flags, code segment, control registers, EFER and the descriptor tables.
pub fn triple_fault_report<V: Vcpu>(vcpu: &V, id: u32) -> String {
    let (regs, sregs) = (vcpu.regs(), vcpu.sregs());
    let r = match &regs {
        Ok(r) => format!("rip={:#x} rsp={:#x} rflags={:#x}", r.rip, r.rsp, r.rflags),
        Err(e) => format!("(registers unreadable: {e})"),
    };
    let s = match &sregs {
        Ok(s) => format!(
            "cs={:#x} (dpl {}, {}) cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} \
             idt={:#x}/{:#x} gdt={:#x}/{:#x} tr={:#x}",
            s.cs.selector,
            s.cs.dpl,
            if s.cs.l {
                "64-bit"
            } else if s.cs.db {
                "32-bit"
            } else {
                "16-bit"
            },
            s.cr0,
            s.cr2,
            s.cr3,
            s.cr4,
            s.efer,
            s.idt.base,
            s.idt.limit,
            s.gdt.base,
            s.gdt.limit,
            s.tr.selector,
        ),
        Err(e) => format!("(special registers unreadable: {e})"),
    };
    let note = match (&regs, &sregs) {
        (Ok(r), Ok(s)) if is_reset_state(r, s) => {
            " (the reset state: the hypervisor re-initialised the vCPU, as KVM on AMD does, so \
             where the guest was is lost)"
        }
        _ => "",
    };
    format!("vcpu {id}: triple fault (the CPU shut down): {r} {s}{note}")
}

/// Whether a vCPU's registers are the architectural reset state (real mode at the reset vector
/// 0xF000:0xFFF0). KVM on AMD SVM re-initialises a vCPU on a shutdown intercept (the VMCB is
/// undefined after one), so that is what a triple fault leaves there.
pub fn is_reset_state(regs: &Regs, sregs: &SpecialRegs) -> bool {
    regs.rip == 0xfff0 && sregs.cs.selector == 0xf000 && sregs.cr0 & 1 == 0
}

/// Runs `vcpu` until it stops. Call on the vCPU's own (pinned) thread.
pub fn run_vcpu<V: Vcpu, S: SlowPath>(
    vcpu: &mut V,
    handler: &mut ExitHandler<S>,
    control: &VcpuControl,
) -> VcpuOutcome {
    let _kick = register_vcpu_thread(vcpu.immediate_exit_ptr());
    // SAFETY: pthread_self has no preconditions.
    control.set_thread(unsafe { libc::pthread_self() });
    control.ack(RunState::Running);
    // Whether the controller has been told we run. A park can end on an operation (with
    // "paused" acknowledged) just as the controller asks to resume: the loop then sees "running"
    // without `park_while_paused` having said so, and must say it itself.
    let mut acked_running = true;
    let outcome = loop {
        if control.op_pending() {
            if let Some(op) = control.take_op() {
                control.complete_op(run_op(vcpu, op));
            }
        }
        match control.wanted() {
            RunState::Running => {
                if !acked_running {
                    control.ack(RunState::Running);
                    acked_running = true;
                }
            }
            RunState::Paused => {
                // Whoever looks at the devices while we are paused sees every write made so far.
                handler.drain_coalesced();
                vcpu.set_immediate_exit(false);
                acked_running = false;
                if control.park_while_paused() == RunState::Stopping {
                    break VcpuOutcome::Stopped;
                }
                continue;
            }
            RunState::Stopping => {
                handler.drain_coalesced();
                break VcpuOutcome::Stopped;
            }
        }
        handler.probe().enter();
        let result = vcpu.run();
        handler.probe().exited();
        let action = match result {
            Ok(VmExit::Interrupted) => {
                handler.probe().classify(
                    perf::ExitClass::Kick,
                    perf::StageClass::Loop,
                    perf::NO_OWNER,
                );
                None
            }
            Ok(exit) => {
                let action = handler.handle(exit);
                // The handler's own time (a third clock read, ~9 ns).
                handler.probe().handled();
                if matches!(action, Action::Stop(VmRequest::TripleFault)) {
                    // Where the guest was when its CPU shut down: what anyone debugging the
                    // guest (or us) needs first.
                    eprintln!("{}", triple_fault_report(vcpu, control.id()));
                }
                Some(action)
            }
            Err(e) => Some(Action::Fail(format!("vCPU {}: {e}", control.id()))),
        };
        match action {
            None => {
                // A kick: clear it, apply coalesced writes (the main thread kicks for stale ones),
                // and look at what the controller wants.
                vcpu.set_immediate_exit(false);
                handler.drain_coalesced();
                handler.stats().inc(crate::stats::Stat::VmExitIntr);
                if let Some(r) = handler.pending_request() {
                    break VcpuOutcome::Request(r);
                }
            }
            Some(Action::Continue) => {}
            Some(Action::Stop(r)) => break VcpuOutcome::Request(r),
            Some(Action::Fail(m)) => break VcpuOutcome::Error(m),
        }
    };
    handler.probe().finish();
    control.ack(RunState::Stopping);
    control.clear_thread();
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reset_state_is_told_apart_from_a_real_fault_site() {
        let mut r = Regs {
            rip: 0xfff0,
            ..Regs::default()
        };
        let mut s = SpecialRegs::default();
        s.cs.selector = 0xf000;
        s.cr0 = 0x10;
        assert!(is_reset_state(&r, &s));
        // Protected mode, another RIP or another CS: where a guest was, not a reset.
        s.cr0 = 0x11;
        assert!(!is_reset_state(&r, &s));
        s.cr0 = 0x10;
        r.rip = 0x1000;
        assert!(!is_reset_state(&r, &s));
        r.rip = 0xfff0;
        s.cs.selector = 0x10;
        assert!(!is_reset_state(&r, &s));
    }
}
