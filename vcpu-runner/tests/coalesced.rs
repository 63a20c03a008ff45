//! Coalesced writes on a real hypervisor (tier: needs `/dev/kvm`): the `fast` guest writes a
//! scratch register n times and then reads the device's write count; with the write register in a
//! coalesced zone the writes queue in KVM's ring (and exit when it is full), and the read must still
//! see every one of them.

use std::sync::{Arc, Mutex};

use stages::misc::{DebugExit, Scratch, DEBUG_EXIT_PORT, SCRATCH_FAST_PORT, SCRATCH_PORT_LEN};
use stages::{Space, Stage, VmRequest, VmRequests};
use vcpu_runner::stats::Stat;
use vcpu_runner::{Devices, EntryRegs, KvmHypervisor, Machine, RunConfig, RunExit};

fn run_fast(n: u64, coalesce: bool) -> (RunExit, u64, u64) {
    let hv = KvmHypervisor::open().expect("this test needs /dev/kvm");
    let cmdline = format!("n={n}");
    let boot = loader::BootConfig::new(64 << 20, &cmdline);
    let layout = boot.layout().unwrap();
    let machine = Machine::new(&hv, &layout.ram_ranges(), 1, true).unwrap();
    let img = guests::image("fast").unwrap();
    let e = loader::load_multiboot(machine.memory(), img, &boot)
        .unwrap()
        .entry;
    let requests = Arc::new(VmRequests::new());
    let mut devices = Devices::new();
    devices
        .add(
            "scratch-fast",
            Space::Pio,
            SCRATCH_FAST_PORT,
            SCRATCH_PORT_LEN,
            Stage::Fast,
            Arc::new(Mutex::new(Scratch::default())),
        )
        .unwrap();
    devices
        .add(
            "debug-exit",
            Space::Pio,
            DEBUG_EXIT_PORT,
            1,
            Stage::Fast,
            Arc::new(Mutex::new(DebugExit::new(requests.clone()))),
        )
        .unwrap();
    if coalesce {
        // The write register only (offset 0); the count and counter registers are read.
        devices.coalesce(Space::Pio, SCRATCH_FAST_PORT, 4).unwrap();
    }
    let out = machine
        .run(
            EntryRegs::from(&e),
            devices,
            requests,
            &RunConfig::default(),
        )
        .unwrap();
    let s = &out.vcpu_stats[0];
    (
        out.exit,
        s.get(Stat::CoalescedWrite),
        s.get(Stat::FastStage),
    )
}

#[test]
fn coalesced_writes_reach_the_device_before_the_read_that_follows_them() {
    let n = 5000;
    let (exit, coalesced, fast) = run_fast(n, true);
    // The guest checks the device's write count itself (debug-exit 0 = its checks passed).
    assert_eq!(
        exit,
        RunExit::Request(VmRequest::DebugExit(0)),
        "guest check"
    );
    // Every write was applied exactly once: from the ring, or as an exit when the ring was full.
    let inline_writes = fast - (1 + (n + 1) + 1);
    assert_eq!(
        coalesced + inline_writes,
        n,
        "coalesced {coalesced}, fast {fast}"
    );
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    if kvm.check_extension(kvm_ioctls::Cap::CoalescedPio) {
        assert!(
            coalesced > n / 2,
            "the hypervisor coalesces port writes, yet only {coalesced} of {n} were"
        );
    }
}

#[test]
fn without_a_zone_every_write_exits() {
    let n = 300;
    let (exit, coalesced, fast) = run_fast(n, false);
    assert_eq!(exit, RunExit::Request(VmRequest::DebugExit(0)));
    assert_eq!(coalesced, 0);
    assert_eq!(fast, n + 1 + (n + 1) + 1);
}
