//! A fake running VM for tests of the control server and of bhyvectl: it holds registers and
//! counters in memory, records every call, and refuses what a real VM would refuse (a vCPU out
//! of range, an I/O APIC pin past 23, a second suspend).

use std::sync::{Mutex, MutexGuard};

use passthrough::PciAddress;
use stages::VmRequest;
use vcpu_runner::stats::Stat;
use vcpu_runner::{DescriptorTable, Regs, Segment, SpecialRegs};

use crate::target::{ControlTarget, PinOp, StatScope, TargetError};

/// I/O APIC pins of the fake (as ours: 24).
pub const FAKE_IOAPIC_PINS: u32 = 24;

/// One call made to a [`FakeTarget`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FakeCall {
    /// `regs(vcpu)`.
    Regs(u32),
    /// `set_regs(vcpu, ..)`.
    SetRegs(u32),
    /// `sregs(vcpu)`.
    Sregs(u32),
    /// `memory_segments()`.
    MemorySegments,
    /// `ioapic_pin(pin, op)`.
    IoapicPin(u32, PinOp),
    /// `inject_msi(addr, data)`.
    InjectMsi(u64, u32),
    /// `stats()`.
    Stats,
    /// `suspend(how)`.
    Suspend(VmRequest),
    /// `pause()`.
    Pause,
    /// `resume()`.
    Resume,
    /// `reset()`.
    Reset,
    /// `assign_device(addr)`.
    AssignDevice(PciAddress),
    /// `unassign_device(addr)`.
    UnassignDevice(PciAddress),
}

/// The fake's state, open for tests to read and change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeState {
    /// General registers per vCPU.
    pub regs: Vec<Regs>,
    /// Special registers per vCPU.
    pub sregs: Vec<SpecialRegs>,
    /// Memory segments.
    pub segments: Vec<(u64, u64)>,
    /// Counters returned by `stats()`.
    pub stats: Vec<StatScope>,
    /// Level of each I/O APIC pin.
    pub pins: Vec<bool>,
    /// Pulses seen per pin.
    pub pulses: Vec<u32>,
    /// MSIs injected.
    pub msis: Vec<(u64, u32)>,
    /// The suspend request, once made.
    pub suspended: Option<VmRequest>,
    /// Paused.
    pub paused: bool,
    /// Resets in place.
    pub resets: u32,
    /// Devices attached.
    pub devices: Vec<PciAddress>,
    /// Accept `assign_device` (a VM that supports hot-plug).
    pub hotplug: bool,
    /// Every call, in order.
    pub calls: Vec<FakeCall>,
}

/// A fake [`ControlTarget`].
#[derive(Debug)]
pub struct FakeTarget {
    ncpus: u32,
    state: Mutex<FakeState>,
}

fn segment(selector: u16, base: u64, limit: u32, type_: u8, l: bool) -> Segment {
    Segment {
        base,
        limit,
        selector,
        type_,
        present: true,
        dpl: 0,
        db: !l,
        s: true,
        l,
        g: true,
        unusable: false,
    }
}

impl FakeTarget {
    /// A fake VM with `ncpus` vCPUs in long mode. Register values are recognisable: vCPU `v`'s
    /// `rax` is `0xa000 + v`, `rbx` `0xb000 + v` ... `rip` `0x10_0000 + 0x1000 * v`; 512 MiB of
    /// memory below 4 GiB and 512 MiB above; every vCPU counter `Stat::ALL[i]` is
    /// `100 * (v + 1) + i`, and a `devmodel0` scope counts records and completions.
    pub fn new(ncpus: u32) -> Self {
        let mut regs = Vec::new();
        let mut sregs = Vec::new();
        let mut stats = Vec::new();
        for v in 0..ncpus {
            let x = u64::from(v);
            regs.push(Regs {
                rax: 0xa000 + x,
                rbx: 0xb000 + x,
                rcx: 0xc000 + x,
                rdx: 0xd000 + x,
                rsi: 0x51 + x,
                rdi: 0xd1 + x,
                rsp: 0x8000 - 0x100 * x,
                rbp: 0x7000 + x,
                r8: 8 + x,
                r9: 9 + x,
                r10: 10 + x,
                r11: 11 + x,
                r12: 12 + x,
                r13: 13 + x,
                r14: 14 + x,
                r15: 15 + x,
                rip: 0x10_0000 + 0x1000 * x,
                rflags: 0x2,
            });
            sregs.push(SpecialRegs {
                cs: segment(0x08, 0, 0xffff_ffff, 0xb, true),
                ds: segment(0x10, 0, 0xffff_ffff, 0x3, false),
                es: segment(0x10, 0, 0xffff_ffff, 0x3, false),
                fs: segment(0x10, 0x1000 * x, 0xffff_ffff, 0x3, false),
                gs: segment(0x10, 0x2000 * x, 0xffff_ffff, 0x3, false),
                ss: segment(0x10, 0, 0xffff_ffff, 0x3, false),
                tr: Segment {
                    s: false,
                    type_: 0xb,
                    limit: 0x67,
                    g: false,
                    db: false,
                    ..segment(0x18, 0x5000, 0x67, 0xb, false)
                },
                ldt: Segment {
                    unusable: true,
                    present: false,
                    ..Segment::default()
                },
                gdt: DescriptorTable {
                    base: 0x6000,
                    limit: 0x1f,
                },
                idt: DescriptorTable {
                    base: 0x6800,
                    limit: 0xfff,
                },
                cr0: 0x8000_0011,
                cr2: 0,
                cr3: 0x9000,
                cr4: 0x20,
                cr8: 0,
                efer: 0x500,
                apic_base: 0xfee0_0900,
            });
            stats.push(StatScope {
                scope: format!("vcpu{v}"),
                counters: Stat::ALL
                    .iter()
                    .zip(0u64..)
                    .map(|(s, i)| (s.description().to_owned(), 100 * (x + 1) + i))
                    .collect(),
            });
        }
        stats.push(StatScope {
            scope: "devmodel0".into(),
            counters: vec![
                ("records drained from the exit ring".into(), 7),
                ("completions posted".into(), 3),
            ],
        });
        let pins = usize::try_from(FAKE_IOAPIC_PINS).unwrap_or(0);
        Self {
            ncpus,
            state: Mutex::new(FakeState {
                regs,
                sregs,
                segments: vec![(0, 512 << 20), (1 << 32, 512 << 20)],
                stats,
                pins: vec![false; pins],
                pulses: vec![0; pins],
                msis: Vec::new(),
                suspended: None,
                paused: false,
                resets: 0,
                devices: Vec::new(),
                hotplug: false,
                calls: Vec::new(),
            }),
        }
    }

    /// The state, locked.
    pub fn state(&self) -> MutexGuard<'_, FakeState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every call so far.
    pub fn calls(&self) -> Vec<FakeCall> {
        self.state().calls.clone()
    }

    fn record(&self, call: FakeCall) -> MutexGuard<'_, FakeState> {
        let mut s = self.state();
        s.calls.push(call);
        s
    }

    fn index(&self, vcpu: u32) -> Result<usize, TargetError> {
        if vcpu >= self.ncpus {
            return Err(TargetError::invalid(format!(
                "vCPU {vcpu} out of range (VM has {})",
                self.ncpus
            )));
        }
        usize::try_from(vcpu).map_err(|_| TargetError::invalid("vCPU index"))
    }
}

impl ControlTarget for FakeTarget {
    fn ncpus(&self) -> u32 {
        self.ncpus
    }

    fn regs(&self, vcpu: u32) -> Result<Regs, TargetError> {
        let i = self.index(vcpu)?;
        let s = self.record(FakeCall::Regs(vcpu));
        s.regs.get(i).copied().ok_or_else(|| "no such vCPU".into())
    }

    fn set_regs(&self, vcpu: u32, regs: &Regs) -> Result<(), TargetError> {
        let i = self.index(vcpu)?;
        let mut s = self.record(FakeCall::SetRegs(vcpu));
        let slot = s.regs.get_mut(i).ok_or("no such vCPU")?;
        *slot = *regs;
        Ok(())
    }

    fn sregs(&self, vcpu: u32) -> Result<SpecialRegs, TargetError> {
        let i = self.index(vcpu)?;
        let s = self.record(FakeCall::Sregs(vcpu));
        s.sregs.get(i).copied().ok_or_else(|| "no such vCPU".into())
    }

    fn memory_segments(&self) -> Vec<(u64, u64)> {
        self.record(FakeCall::MemorySegments).segments.clone()
    }

    fn ioapic_pin(&self, pin: u32, op: PinOp) -> Result<(), TargetError> {
        let mut s = self.record(FakeCall::IoapicPin(pin, op));
        let i = usize::try_from(pin).unwrap_or(usize::MAX);
        let Some(level) = s.pins.get_mut(i) else {
            return Err(TargetError::invalid(format!(
                "I/O APIC pin {pin} out of range (0..={})",
                FAKE_IOAPIC_PINS - 1
            )));
        };
        match op {
            PinOp::Assert => *level = true,
            PinOp::Deassert => *level = false,
            PinOp::Pulse => {
                *level = false;
                if let Some(p) = s.pulses.get_mut(i) {
                    *p += 1;
                }
            }
        }
        Ok(())
    }

    fn inject_msi(&self, addr: u64, data: u32) -> Result<(), TargetError> {
        let mut s = self.record(FakeCall::InjectMsi(addr, data));
        if addr & 0xfff0_0000 != 0xfee0_0000 {
            return Err(TargetError::invalid(format!(
                "MSI address {addr:#x} is not in the 0xfee00000 window"
            )));
        }
        s.msis.push((addr, data));
        Ok(())
    }

    fn stats(&self) -> Vec<StatScope> {
        self.record(FakeCall::Stats).stats.clone()
    }

    fn suspend(&self, how: VmRequest) -> Result<(), TargetError> {
        let mut s = self.record(FakeCall::Suspend(how));
        if s.suspended.is_some() {
            return Err(TargetError::already("The VM is already suspended"));
        }
        s.suspended = Some(how);
        Ok(())
    }

    fn pause(&self) -> Result<(), TargetError> {
        let mut s = self.record(FakeCall::Pause);
        if s.paused {
            return Err(TargetError::busy("The VM is already paused"));
        }
        s.paused = true;
        Ok(())
    }

    fn resume(&self) -> Result<(), TargetError> {
        let mut s = self.record(FakeCall::Resume);
        if !s.paused {
            return Err(TargetError::busy("The VM is not paused"));
        }
        s.paused = false;
        Ok(())
    }

    fn reset(&self) -> Result<(), TargetError> {
        let mut s = self.record(FakeCall::Reset);
        s.resets += 1;
        Ok(())
    }

    fn assign_device(&self, addr: PciAddress) -> Result<(), TargetError> {
        let mut s = self.record(FakeCall::AssignDevice(addr));
        if !s.hotplug {
            return Err(TargetError::unsupported(format!(
                "This VM cannot attach PCI device {addr} while running"
            )));
        }
        s.devices.push(addr);
        Ok(())
    }

    fn unassign_device(&self, addr: PciAddress) -> Result<(), TargetError> {
        let mut s = self.record(FakeCall::UnassignDevice(addr));
        s.devices.retain(|d| *d != addr);
        Ok(())
    }
}
