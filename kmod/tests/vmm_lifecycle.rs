//! The module's life: load checks, VMs by name, unload refusal and device hand-back, sysctls.

mod common;

use std::os::unix::net::UnixListener;
use std::sync::Arc;

use common::{caps, opts};
use kmod::fake::FakeTarget;
use kmod::proto::status;
use kmod::{Diagnostic, SysfsSource, Vmm, VmmError};
use passthrough::fake::{FakeDevice, FakeSysfs};
use passthrough::{DeviceState, PciAddress, VFIO_PCI};
use vcpu_runner::VirtKind;

fn addr(b: u8, s: u8, f: u8) -> PciAddress {
    PciAddress::new(b, s, f).unwrap()
}

fn load(dir: &std::path::Path) -> Vmm {
    Vmm::load(opts(dir)).expect("load").0
}

#[test]
fn load_reports_the_virtualization_and_serves_vmmctl_until_unload() {
    let dir = tempfile::tempdir().unwrap();
    let (vmm, diags) = Vmm::load(opts(dir.path())).unwrap();
    assert!(diags.contains(&Diagnostic::Virtualization(VirtKind::SvmNpt)));
    let text: Vec<String> = diags.iter().map(ToString::to_string).collect();
    assert!(
        text.contains(&"Virtualization: AMD SVM/NPT".to_string()),
        "{text:?}"
    );
    let sock = dir.path().join("run/vmmctl");
    assert_eq!(vmm.module_socket_path(), sock);
    assert!(sock.exists());
    let t = vmm.sysctl();
    assert_eq!(t["hw.vmm.maxcpu"], "4");
    assert_eq!(t["hw.vmm.halt_detection"], "1");
    assert_eq!(t["hw.vmm.version"], "1");
    assert_eq!(t["hw.vmm.vm_count"], "0");
    assert_eq!(t["hw.vmm.virt"], "AMD SVM/NPT");
    assert_eq!(t["hw.vmm.ppt.devices"], "");
    assert_eq!(t["hw.vmm.control.protocol_version"], "1");
    vmm.unload().unwrap();
    assert!(!sock.exists(), "unload removes the module socket");
}

#[test]
fn software_virtualizers_are_named_in_the_diagnostics_and_sysctl() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(dir.path());
    o.capabilities.virt = VirtKind::Software("kvm_pvm".into());
    let (vmm, diags) = Vmm::load(o).unwrap();
    let d = diags
        .iter()
        .find(|d| matches!(d, Diagnostic::Virtualization(_)))
        .unwrap();
    assert_eq!(
        d.to_string(),
        "Virtualization: software virtualizer (kvm_pvm): guest ring-0 code is emulated"
    );
    assert_eq!(
        vmm.sysctl()["hw.vmm.virt"],
        "software virtualizer (kvm_pvm)"
    );
}

#[test]
fn each_missing_capability_refuses_the_load_by_name() {
    type Knock = fn(&mut vcpu_runner::Capabilities);
    let cases: [(Knock, &str); 5] = [
        (|c| c.split_irqchip = false, "KVM_CAP_SPLIT_IRQCHIP"),
        (|c| c.immediate_exit = false, "KVM_CAP_IMMEDIATE_EXIT"),
        (|c| c.signal_msi = false, "KVM_CAP_SIGNAL_MSI"),
        (|c| c.irqfd = false, "KVM_CAP_IRQFD"),
        (|c| c.ioeventfd = false, "KVM_CAP_IOEVENTFD"),
    ];
    for (knock, piece) in cases {
        let dir = tempfile::tempdir().unwrap();
        let mut o = opts(dir.path());
        knock(&mut o.capabilities);
        let e = Vmm::load(o).unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with("The hypervisor lacks "), "{msg}");
        assert!(msg.contains(piece), "{msg} should name {piece}");
        assert!(
            !dir.path().join("run/vmmctl").exists(),
            "a refused load serves nothing"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(dir.path());
    o.capabilities.api_version = 11;
    assert_eq!(
        Vmm::load(o).unwrap_err().to_string(),
        "KVM API version 11 is not supported (vmm needs 12)"
    );
}

#[test]
fn maxcpu_refusals_use_bhyves_exact_messages() {
    let dir = tempfile::tempdir().unwrap();
    let vmm = load(dir.path());
    let e = vmm.create_vm("big", 5).unwrap_err();
    assert_eq!(e.to_string(), "5 vCPUs requested but only 4 available");
    assert_eq!(e.status(), status::EINVAL);
    assert_eq!(
        vmm.create_vm("none", 0).unwrap_err().to_string(),
        "Invalid guest vCPUs (0)"
    );
    vmm.create_vm("four", 4).unwrap();

    // hw.vmm.maxcpu from a tunables file.
    let dir2 = tempfile::tempdir().unwrap();
    let conf = dir2.path().join("loader.conf");
    std::fs::write(&conf, "hw.vmm.maxcpu=2\n").unwrap();
    let mut o = opts(dir2.path());
    o.tunables = Some(conf);
    let (vmm2, _) = Vmm::load(o).unwrap();
    assert_eq!(vmm2.sysctl()["hw.vmm.maxcpu"], "2");
    assert_eq!(
        vmm2.create_vm("vm", 3).unwrap_err().to_string(),
        "3 vCPUs requested but only 2 available"
    );
    // Attaching a running instance with too many vCPUs is refused the same way.
    vmm2.create_vm("vm", 2).unwrap();
    let e = vmm2.attach("vm", Arc::new(FakeTarget::new(3))).unwrap_err();
    assert_eq!(e.to_string(), "3 vCPUs requested but only 2 available");
}

#[test]
fn a_bad_tunables_file_refuses_the_load() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("loader.conf");
    std::fs::write(&conf, "hw.vmm.maxcpu=\"lots\"\n").unwrap();
    let mut o = opts(dir.path());
    o.tunables = Some(conf);
    let e = Vmm::load(o).unwrap_err();
    assert!(matches!(e, VmmError::Tunables(_)), "{e}");
    assert!(e.to_string().contains("hw.vmm.maxcpu"), "{e}");
}

#[test]
fn maxcpu_above_the_backend_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(dir.path());
    o.capabilities.max_vcpus = 2;
    let (_vmm, diags) = Vmm::load(o).unwrap();
    assert!(diags.contains(&Diagnostic::MaxcpuAboveBackend {
        maxcpu: 4,
        backend: 2
    }));
}

#[test]
fn names_are_unique_and_follow_vmms_rules() {
    let dir = tempfile::tempdir().unwrap();
    let vmm = load(dir.path());
    vmm.create_vm("a", 1).unwrap();
    let e = vmm.create_vm("a", 2).unwrap_err();
    assert_eq!(e.to_string(), "VM a already exists");
    assert_eq!(e.status(), status::EEXIST);
    assert_eq!(vmm.vms().len(), 1);

    let longest = "n".repeat(31);
    vmm.create_vm(&longest, 1).unwrap();
    assert!(dir.path().join("run").join(&longest).exists());
    for (bad, why) in [
        ("", "empty"),
        (&*"n".repeat(32), "longer than 31 bytes"),
        ("a/b", "contains '/'"),
        ("a\0b", "contains a NUL byte"),
        (".", "a directory name"),
        ("..", "a directory name"),
        ("vmmctl", "reserved for the module's control socket"),
    ] {
        let e = vmm.create_vm(bad, 1).unwrap_err();
        assert_eq!(e.to_string(), format!("Invalid VM name {bad:?}: {why}"));
        assert_eq!(e.status(), status::EINVAL);
    }
    assert_eq!(vmm.vms().len(), 2);
}

#[test]
fn unload_is_refused_while_vms_exist_and_lists_them() {
    let dir = tempfile::tempdir().unwrap();
    let vmm = load(dir.path());
    vmm.create_vm("beta", 1).unwrap();
    vmm.create_vm("alpha", 2).unwrap();
    let (vmm, e) = vmm.unload().unwrap_err();
    assert_eq!(e.to_string(), "Module busy: 2 VM(s) exist: alpha, beta");
    assert_eq!(e.status(), status::EBUSY);
    // The module is handed back unchanged and still serving.
    assert_eq!(vmm.vms().len(), 2);
    assert!(dir.path().join("run/vmmctl").exists());
    assert!(dir.path().join("run/alpha").exists());
    vmm.destroy_vm("alpha").unwrap();
    let (vmm, e) = vmm.unload().unwrap_err();
    assert_eq!(e.to_string(), "Module busy: 1 VM(s) exist: beta");
    vmm.destroy_vm("beta").unwrap();
    assert!(
        !dir.path().join("run/beta").exists(),
        "destroy removes the socket"
    );
    let t = vmm.sysctl();
    assert_eq!(t["hw.vmm.vms_created"], "2");
    assert_eq!(t["hw.vmm.vms_destroyed"], "2");
    vmm.unload().unwrap();
}

#[test]
fn a_running_vm_cannot_be_destroyed_until_detached() {
    let dir = tempfile::tempdir().unwrap();
    let vmm = load(dir.path());
    vmm.create_vm("vm", 2).unwrap();
    assert!(!vmm.vm("vm").unwrap().running);
    vmm.attach("vm", Arc::new(FakeTarget::new(2))).unwrap();
    let e = vmm.attach("vm", Arc::new(FakeTarget::new(2))).unwrap_err();
    assert_eq!(
        e.to_string(),
        "VM vm already has a running instance attached"
    );
    assert!(vmm.vm("vm").unwrap().running);
    assert_eq!(vmm.sysctl()["hw.vmm.vm.vm.running"], "1");
    let e = vmm.destroy_vm("vm").unwrap_err();
    assert_eq!(
        e.to_string(),
        "VM vm is running: stop it before destroying it"
    );
    assert_eq!(e.status(), status::EBUSY);
    vmm.detach("vm").unwrap();
    assert!(matches!(vmm.detach("vm"), Err(VmmError::NotRunning { .. })));
    vmm.destroy_vm("vm").unwrap();
    let e = vmm.destroy_vm("vm").unwrap_err();
    assert_eq!(e.to_string(), "No VM named vm");
    assert_eq!(e.status(), status::ENOENT);
}

fn two_nics() -> Arc<FakeSysfs> {
    Arc::new(
        FakeSysfs::new()
            .with_driver(VFIO_PCI)
            .with_device(addr(10, 0, 0), FakeDevice::endpoint(Some("e1000e")))
            .with_device(addr(11, 0, 0), FakeDevice::endpoint(Some("igb"))),
    )
}

#[test]
fn pptdevs_are_reserved_on_load_and_handed_back_on_unload() {
    let dir = tempfile::tempdir().unwrap();
    let fake = two_nics();
    let before = fake.snapshot();
    let conf = dir.path().join("loader.conf");
    std::fs::write(&conf, "pptdevs=\"10/0/0 11/0/0\"\n").unwrap();
    let mut o = opts(dir.path());
    o.tunables = Some(conf);
    o.sysfs = SysfsSource::Shared(fake.clone());
    let (vmm, _) = Vmm::load(o).unwrap();
    for a in [addr(10, 0, 0), addr(11, 0, 0)] {
        assert_eq!(fake.device(a).unwrap().driver.as_deref(), Some(VFIO_PCI));
    }
    assert_eq!(
        vmm.sysctl()["hw.vmm.ppt.devices"],
        "10/0/0=reserved 11/0/0=reserved"
    );

    // Assigned to a VM; destroying the VM takes the device back.
    vmm.create_vm("vm", 1).unwrap();
    vmm.assign_device("vm", addr(10, 0, 0)).unwrap();
    assert_eq!(vmm.vm("vm").unwrap().devices, vec![addr(10, 0, 0)]);
    assert_eq!(
        vmm.sysctl()["hw.vmm.ppt.devices"],
        "10/0/0=assigned:vm 11/0/0=reserved"
    );
    let e = vmm.assign_device("vm", addr(10, 0, 0)).unwrap_err();
    assert_eq!(e.status(), status::EBUSY);
    let (vmm, _) = vmm.unload().unwrap_err();
    vmm.destroy_vm("vm").unwrap();
    assert_eq!(
        vmm.devices(),
        vec![
            (addr(10, 0, 0), DeviceState::Reserved),
            (addr(11, 0, 0), DeviceState::Reserved)
        ]
    );
    vmm.unload().unwrap();
    assert_eq!(
        fake.device(addr(10, 0, 0)).unwrap().driver.as_deref(),
        Some("e1000e")
    );
    assert_eq!(
        fake.device(addr(11, 0, 0)).unwrap().driver.as_deref(),
        Some("igb")
    );
    assert_eq!(fake.snapshot(), before, "sysfs is as the module found it");
}

#[test]
fn a_pptdevs_device_that_cannot_be_reserved_refuses_the_load_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let fake = two_nics();
    let before = fake.snapshot();
    let conf = dir.path().join("loader.conf");
    std::fs::write(&conf, "pptdevs=\"10/0/0 12/0/0\"\n").unwrap();
    let mut o = opts(dir.path());
    o.tunables = Some(conf);
    o.sysfs = SysfsSource::Shared(fake.clone());
    let e = Vmm::load(o).unwrap_err();
    let msg = e.to_string();
    assert!(msg.starts_with("Cannot reserve pptdevs: "), "{msg}");
    assert!(
        msg.contains("0000:0c:00.0") && msg.contains("12/0/0"),
        "{msg}"
    );
    assert_eq!(
        fake.snapshot(),
        before,
        "the device taken first was put back"
    );
    assert!(!dir.path().join("run/vmmctl").exists());
}

#[test]
fn devices_move_between_host_drivers_and_passthrough_at_run_time() {
    let dir = tempfile::tempdir().unwrap();
    let fake = two_nics();
    let mut o = opts(dir.path());
    o.sysfs = SysfsSource::Shared(fake.clone());
    let (vmm, _) = Vmm::load(o).unwrap();
    vmm.take_device(addr(11, 0, 0)).unwrap();
    assert_eq!(
        fake.device(addr(11, 0, 0)).unwrap().driver.as_deref(),
        Some(VFIO_PCI)
    );
    vmm.release_device(addr(11, 0, 0), "igb").unwrap();
    assert_eq!(vmm.sysctl()["hw.vmm.ppt.devices"], "11/0/0=released:igb");
    assert_eq!(
        fake.device(addr(11, 0, 0)).unwrap().driver.as_deref(),
        Some("igb")
    );
    vmm.unload().unwrap();
}

#[test]
fn a_live_module_socket_is_not_taken_over_and_a_stale_one_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let first = load(dir.path());
    let e = Vmm::load(opts(dir.path())).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "Control socket {} is in use by another process",
            dir.path().join("run/vmmctl").display()
        )
    );
    // The same name in two modules sharing a directory is refused by the socket too.
    first.create_vm("vm", 1).unwrap();
    let mut o = opts(dir.path());
    o.module_socket = false;
    let (second, _) = Vmm::load(o).unwrap();
    let e = second.create_vm("vm", 1).unwrap_err();
    assert_eq!(e.status(), status::EBUSY);
    drop(second);
    first.destroy_vm("vm").unwrap();
    first.unload().unwrap();

    // A socket file nobody serves (a crashed module) is replaced, and said so.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("run")).unwrap();
    let stale = dir.path().join("run/vmmctl");
    drop(UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let (vmm, diags) = Vmm::load(opts(dir.path())).unwrap();
    assert!(diags.contains(&Diagnostic::StaleSocket {
        path: stale.clone()
    }));
    vmm.unload().unwrap();

    // A file that is not a socket is left alone.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("run")).unwrap();
    std::fs::write(dir.path().join("run/vmmctl"), "data").unwrap();
    let e = Vmm::load(opts(dir.path())).unwrap_err();
    assert!(
        e.to_string().ends_with("vmmctl exists and is not a socket"),
        "{e}"
    );
}

#[test]
fn socket_paths_too_long_for_a_unix_address_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(dir.path());
    o.socket_dir = dir.path().join("d".repeat(100));
    let e = Vmm::load(o).unwrap_err();
    assert!(
        e.to_string()
            .contains("longer than the 107 a Unix socket allows"),
        "{e}"
    );
}

#[test]
fn the_default_maxcpu_is_the_host_cpu_count() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(dir.path());
    o.host_cpus = None;
    let (vmm, _) = Vmm::load(o).unwrap();
    let host = std::thread::available_parallelism().unwrap().get();
    assert_eq!(vmm.sysctl()["hw.vmm.maxcpu"], host.to_string());
    assert_eq!(vmm.capabilities().max_vcpus, caps().max_vcpus);
}
