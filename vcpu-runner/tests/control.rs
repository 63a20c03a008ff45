//! Control of a live VM (tier: needs `/dev/kvm`): pause, register reads through the vCPU mailbox,
//! resume, host stop — each bounded — on a guest that never stops by itself.

use std::sync::Arc;
use std::time::{Duration, Instant};

use stages::VmRequests;
use vcpu_runner::{
    Devices, EntryRegs, KvmHypervisor, Machine, RunConfig, RunExit, VcpuOp, VcpuOpResult,
};

#[test]
fn pause_inspect_resume_and_stop_a_running_guest() {
    let hv = KvmHypervisor::open().expect("this test needs /dev/kvm");
    let mem = 64 << 20;
    let boot = loader::BootConfig::new(mem, "n=0");
    let layout = boot.layout().unwrap();
    let machine = Machine::new(&hv, &layout.ram_ranges(), 1, true).unwrap();
    let img = guests::image("hammer").unwrap();
    let e = loader::load_multiboot(machine.memory(), img, &boot)
        .unwrap()
        .entry;
    let entry = EntryRegs::from(&e);
    let vm = Arc::new(
        machine
            .start(
                entry,
                Devices::new(),
                Arc::new(VmRequests::new()),
                &RunConfig::default(),
            )
            .unwrap(),
    );
    std::thread::sleep(Duration::from_millis(300));
    let before = vm.vcpu_stats()[0].get(vcpu_runner::stats::Stat::VmExitTotal);
    assert!(before > 0, "the guest is taking exits");

    let t = Instant::now();
    vm.pause().expect("pause");
    assert!(t.elapsed() < Duration::from_secs(2));
    let paused_at = vm.vcpu_stats()[0].get(vcpu_runner::stats::Stat::VmExitTotal);
    std::thread::sleep(Duration::from_millis(100));
    let still = vm.vcpu_stats()[0].get(vcpu_runner::stats::Stat::VmExitTotal);
    assert!(
        still <= paused_at + 1,
        "a paused vCPU takes no exits ({paused_at} → {still})"
    );

    let regs = match vm.vcpu_op(0, VcpuOp::GetRegs).expect("get regs") {
        VcpuOpResult::Regs(r) => r,
        other => panic!("{other:?}"),
    };
    assert!(
        (0x10_0000..0x20_0000).contains(&regs.rip),
        "rip {:#x} is inside the guest image",
        regs.rip
    );
    let sregs = match vm.vcpu_op(0, VcpuOp::GetSregs).expect("get sregs") {
        VcpuOpResult::Sregs(s) => s,
        other => panic!("{other:?}"),
    };
    assert_ne!(sregs.efer & (1 << 10), 0, "the guest runs in long mode");
    assert_eq!(sregs.cs.dpl, 3, "the workload runs in ring 3");

    if let Err(e) = vm.resume() {
        vm.stop_switch().stop();
        panic!("resume: {e}; outcome {:?}", vm.wait());
    }
    std::thread::sleep(Duration::from_millis(200));
    let after = vm.vcpu_stats()[0].get(vcpu_runner::stats::Stat::VmExitTotal);
    assert!(after > still, "resumed: exits again");

    // A register op while running is served too (the vCPU is kicked out of the guest for it).
    assert!(matches!(
        vm.vcpu_op(0, VcpuOp::GetRegs),
        Ok(VcpuOpResult::Regs(_))
    ));
    assert!(vm.vcpu_op(7, VcpuOp::GetRegs).is_err(), "no vCPU 7");

    let t = Instant::now();
    vm.stop_switch().stop();
    let out = vm.wait().expect("outcome");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "stop took {:?}",
        t.elapsed()
    );
    assert_eq!(out.exit, RunExit::Stopped);
    assert!(out.stop_problems.is_empty(), "{:?}", out.stop_problems);
    assert!(vm.wait().is_none(), "one waiter only");
}
