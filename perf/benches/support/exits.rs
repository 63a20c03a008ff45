//! Exit round-trip measurement: the same test guest under our whole machine (exit handler, fast
//! stage, rings, device-model thread) and under a raw `KVM_RUN` loop that handles the same exit
//! inline with nothing else.
//!
//! Cost per exit = (time of a run with `n=N` − time of a run with `n=0`) / exits in the workload, so
//! VM creation, loading and thread start-up cancel out.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_enable_cap, kvm_userspace_memory_region, KVM_CAP_SPLIT_IRQCHIP};
use kvm_ioctls::{Kvm, VcpuExit};
use stages::misc::{
    BootDone, DebugExit, Scratch, ScratchMem, BOOT_DONE_PORT, DEBUG_EXIT_PORT, SCRATCH_FAST_PORT,
    SCRATCH_MMIO_BASE, SCRATCH_MMIO_LEN, SCRATCH_PORT_LEN, SCRATCH_SLOW_PORT,
};
use stages::{Space, Stage, VmRequests};
use vcpu_runner::{Devices, EntryRegs, KvmHypervisor, Machine, RunConfig, RunExit};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Guest memory of the benchmark VMs.
pub const MEM: u64 = 64 << 20;

/// One exit class and the guest that produces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Port writes and reads handled inline by a fast-stage device.
    Fast,
    /// Port writes posted to the device-model side.
    Posted,
    /// Port reads that wait for a device-model completion.
    Waited,
}

impl Class {
    /// Every class.
    pub const ALL: [Class; 3] = [Class::Fast, Class::Posted, Class::Waited];

    /// The test guest.
    pub fn guest(self) -> &'static str {
        match self {
            Class::Fast => "fast",
            Class::Posted => "posted",
            Class::Waited => "waited",
        }
    }

    /// Exits the guest's workload takes for `n` (beyond the `n=0` run).
    pub fn exits(self, n: u64) -> u64 {
        match self {
            // n writes, then n reads of the read counter.
            Class::Fast => 2 * n,
            Class::Posted | Class::Waited => n,
        }
    }

    /// Name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Class::Fast => "fast stage (inline device)",
            Class::Posted => "posted write (slow stage)",
            Class::Waited => "waited read (slow stage)",
        }
    }
}

fn load(mem: &GuestMemoryMmap<()>, guest: &str, cmdline: &str) -> loader::LoadedKernel {
    let img = guests::image(guest).expect("guest image");
    let boot = loader::BootConfig::new(MEM, cmdline);
    loader::load_multiboot(mem, img, &boot).expect("load guest")
}

fn entry(e: &loader::EntryState) -> EntryRegs {
    EntryRegs::from(e)
}

/// Runs `guest` with `n=N` under our machine; returns the wall time of the whole run.
pub fn run_ours(guest: &str, n: u64) -> Duration {
    run_ours_with(guest, n, false)
}

/// As [`run_ours`], with exit tracing on or off.
pub fn run_ours_with(guest: &str, n: u64, trace: bool) -> Duration {
    run_ours_opts(guest, n, trace, false)
}

/// As [`run_ours_with`]; with `coalesce`, the fast scratch device's write register (port 0x510,
/// 4 bytes) is a coalesced zone: KVM queues those writes instead of exiting to us (the zone is
/// registered at the first write exit into it and unregistered when the VM closes, both inside the
/// timed run).
pub fn run_ours_opts(guest: &str, n: u64, trace: bool, coalesce: bool) -> Duration {
    let hv = KvmHypervisor::open().expect("open /dev/kvm");
    let layout = loader::BootConfig::new(MEM, "").layout().expect("layout");
    let t0 = Instant::now();
    let machine = Machine::new(&hv, &layout.ram_ranges(), 1, true).expect("machine");
    let loaded = load(machine.memory(), guest, &format!("n={n}"));
    let requests = Arc::new(VmRequests::new());
    let mut d = Devices::new();
    d.add(
        "debug-exit",
        Space::Pio,
        DEBUG_EXIT_PORT,
        1,
        Stage::Fast,
        Arc::new(Mutex::new(DebugExit::new(requests.clone()))),
    )
    .unwrap();
    d.add(
        "boot-done",
        Space::Pio,
        BOOT_DONE_PORT,
        1,
        Stage::Fast,
        Arc::new(Mutex::new(BootDone::new(requests.clone(), Instant::now()))),
    )
    .unwrap();
    d.add(
        "scratch-slow",
        Space::Pio,
        SCRATCH_SLOW_PORT,
        SCRATCH_PORT_LEN,
        Stage::Slow,
        Arc::new(Mutex::new(Scratch::default())),
    )
    .unwrap();
    d.add(
        "scratch-fast",
        Space::Pio,
        SCRATCH_FAST_PORT,
        SCRATCH_PORT_LEN,
        Stage::Fast,
        Arc::new(Mutex::new(Scratch::default())),
    )
    .unwrap();
    d.add(
        "scratch-mmio",
        Space::Mmio,
        SCRATCH_MMIO_BASE,
        SCRATCH_MMIO_LEN,
        Stage::Slow,
        Arc::new(Mutex::new(ScratchMem::default())),
    )
    .unwrap();
    // The guests' own messages on COM1 (start and end, outside the measured exits), dropped as
    // the raw loop drops them, rather than logged as unclaimed.
    d.add(
        "com1",
        Space::Pio,
        0x3f8,
        8,
        Stage::Fast,
        Arc::new(Mutex::new(stages::misc::Absent)),
    )
    .unwrap();
    if coalesce {
        d.coalesce(Space::Pio, SCRATCH_FAST_PORT, 4)
            .expect("coalesced zone");
    }
    let out = machine
        .run(
            entry(&loaded.entry),
            d,
            requests,
            &RunConfig {
                trace,
                device_spin: std::env::var("EXITS_DEVICE_SPIN_US")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .map_or(RunConfig::default().device_spin, Duration::from_micros),
                completion_spin: std::env::var("EXITS_COMPLETION_SPIN_US")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .map_or(RunConfig::default().completion_spin, Duration::from_micros),
                // A completion spin given explicitly applies whatever the host's CPUs.
                spin_when_shared: std::env::var_os("EXITS_COMPLETION_SPIN_US").is_some(),
                ..RunConfig::default()
            },
        )
        .expect("run");
    let took = t0.elapsed();
    assert_eq!(
        out.exit,
        RunExit::Request(stages::VmRequest::DebugExit(0)),
        "{guest} n={n} did not pass its own check"
    );
    took
}

/// Runs `guest` with `n=N` under a raw `KVM_RUN` loop that handles every exit inline, on a thread
/// pinned to host CPU 0 as our vCPU 0 is; returns the wall time of the whole run.
pub fn run_raw(guest: &str, n: u64) -> Duration {
    let guest = guest.to_string();
    // With EXITS_RAW_SPINNER set, a thread on CPU 1 spins (a relaxed load and a spin-loop hint,
    // as our device-model thread does between records) while the raw loop runs: does a busy
    // sibling CPU alone make `KVM_RUN` slower? (2026-11-25: no, see docs/perf.md.)
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let spinner = std::env::var_os("EXITS_RAW_SPINNER").map(|_| {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let _ = vcpu_runner::runner::pin_to_cpu(1);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                std::hint::spin_loop();
            }
        })
    });
    let r = std::thread::spawn(move || {
        let _ = vcpu_runner::runner::pin_to_cpu(0);
        run_raw_here(&guest, n)
    })
    .join()
    .expect("raw loop thread");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    if let Some(s) = spinner {
        s.join().expect("spinner thread");
    }
    r
}

fn run_raw_here(guest: &str, n: u64) -> Duration {
    let kvm = Kvm::new().expect("open /dev/kvm");
    let t0 = Instant::now();
    let vm = kvm.create_vm().expect("vm");
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_SPLIT_IRQCHIP,
        ..Default::default()
    };
    cap.args[0] = 24;
    vm.enable_cap(&cap).expect("split irqchip");
    let layout = loader::BootConfig::new(MEM, "").layout().expect("layout");
    let mem = GuestMemoryMmap::<()>::from_ranges(&layout.ram_ranges()).expect("memory");
    for (slot, r) in mem.iter().enumerate() {
        let host = mem.get_host_address(r.start_addr()).expect("host address");
        // SAFETY: `mem` outlives the VM in this function.
        unsafe {
            vm.set_user_memory_region(kvm_userspace_memory_region {
                slot: u32::try_from(slot).expect("slot"),
                guest_phys_addr: r.start_addr().0,
                memory_size: r.len(),
                userspace_addr: host as u64,
                flags: 0,
            })
            .expect("memory region");
        }
    }
    let loaded = load(&mem, guest, &format!("n={n}"));
    let mut vcpu = vm.create_vcpu(0).expect("vcpu");
    let mut cpuid = kvm.get_supported_cpuid(80).expect("cpuid");
    vcpu_runner::cpuid::apply_policy(&mut cpuid, 0, vcpu_runner::cpuid::CpuidFeatures::default());
    vcpu.set_cpuid2(&cpuid).expect("set cpuid");
    let e = entry(&loaded.entry);
    let mut sregs = vcpu.get_sregs().expect("sregs");
    let k = |s: &vcpu_runner::Segment| kvm_bindings::kvm_segment {
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
    };
    sregs.cs = k(&e.cs);
    sregs.ds = k(&e.ds);
    sregs.es = k(&e.ds);
    sregs.fs = k(&e.ds);
    sregs.gs = k(&e.ds);
    sregs.ss = k(&e.ds);
    if let Some(tr) = &e.tr {
        sregs.tr = k(tr);
    }
    sregs.gdt.base = e.gdt.base;
    sregs.gdt.limit = e.gdt.limit;
    sregs.cr0 = e.cr0;
    sregs.cr3 = e.cr3;
    sregs.cr4 = e.cr4;
    sregs.efer = e.efer;
    vcpu.set_sregs(&sregs).expect("set sregs");
    vcpu.set_regs(&kvm_bindings::kvm_regs {
        rip: e.rip,
        rsp: e.rsp,
        rbx: e.rbx,
        rax: e.rax,
        rsi: e.rsi,
        rflags: e.rflags | 2,
        ..Default::default()
    })
    .expect("set regs");
    // The same scratch semantics as stages::misc::Scratch, inline.
    let (mut value, mut writes, mut reads) = (0u32, 0u32, 0u32);
    let code = loop {
        match vcpu.run().expect("KVM_RUN") {
            VcpuExit::IoOut(port, data) => {
                let v = data
                    .iter()
                    .rev()
                    .fold(0u32, |a, &b| (a << 8) | u32::from(b));
                match port & !0xf {
                    0x500 | 0x510 if port & 0xf == 0 => {
                        value = v;
                        writes = writes.wrapping_add(1);
                    }
                    _ if u64::from(port) == DEBUG_EXIT_PORT => break v,
                    _ => {}
                }
            }
            VcpuExit::IoIn(port, data) => {
                let v = match port & 0xf {
                    0 => value,
                    4 => writes,
                    8 => {
                        reads = reads.wrapping_add(1);
                        reads - 1
                    }
                    _ => u32::MAX,
                };
                for (i, b) in data.iter_mut().enumerate() {
                    *b = v
                        .checked_shr(u32::try_from(8 * i).unwrap_or(32))
                        .unwrap_or(0) as u8;
                }
            }
            VcpuExit::Intr => {}
            other => panic!("raw loop: unexpected exit {other:?}"),
        }
    };
    let took = t0.elapsed();
    assert_eq!(
        code, 0,
        "{guest} n={n} failed its own check under the raw loop"
    );
    took
}
