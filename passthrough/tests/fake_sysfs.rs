//! Reservation against the simulated kernel: binding, handing back, assignment, and rollback
//! that leaves sysfs byte-for-byte unchanged when any step fails.

use passthrough::fake::{FakeDevice, FakeSysfs};
use passthrough::{DeviceState, Passthrough, PassthroughError, PciAddress, Step, VFIO_PCI};

fn addr(b: u8, s: u8, f: u8) -> PciAddress {
    PciAddress::new(b, s, f).unwrap()
}

/// The vmm(4) example: `pptdevs="10/0/0 6/5/0 6/5/1"`, three NICs on their host drivers.
fn vmm4_host() -> FakeSysfs {
    FakeSysfs::new()
        .with_driver(VFIO_PCI)
        .with_driver("xhci_hcd")
        .with_device(addr(10, 0, 0), FakeDevice::endpoint(Some("e1000e")))
        .with_device(addr(6, 5, 0), FakeDevice::endpoint(Some("igb")))
        .with_device(addr(6, 5, 1), FakeDevice::endpoint(Some("igb")))
}

fn vmm4_addrs() -> Vec<PciAddress> {
    vec![addr(10, 0, 0), addr(6, 5, 0), addr(6, 5, 1)]
}

fn log(fake: &FakeSysfs) -> Vec<(String, String)> {
    fake.write_log()
}

fn w(path: &str, data: &str) -> (String, String) {
    (path.to_owned(), data.to_owned())
}

#[test]
fn reserve_binds_to_vfio_through_driver_override_and_remembers_the_driver() {
    let mut pt = Passthrough::new(vmm4_host());
    pt.reserve_all(&[addr(10, 0, 0)]).unwrap();

    let dev = pt.sysfs().device(addr(10, 0, 0)).unwrap();
    assert_eq!(dev.driver.as_deref(), Some(VFIO_PCI));
    assert_eq!(dev.driver_override.as_deref(), Some(VFIO_PCI));
    assert_eq!(pt.state(addr(10, 0, 0)), Some(&DeviceState::Reserved));
    assert_eq!(pt.original_driver(addr(10, 0, 0)), Some("e1000e"));
    assert_eq!(
        log(pt.sysfs()),
        vec![
            w("bus/pci/devices/0000:0a:00.0/driver_override", "vfio-pci"),
            w("bus/pci/devices/0000:0a:00.0/driver/unbind", "0000:0a:00.0"),
            w("bus/pci/drivers_probe", "0000:0a:00.0"),
        ]
    );
}

#[test]
fn vmm4_example_reserves_three_devices() {
    let mut pt = Passthrough::new(vmm4_host());
    pt.reserve_all(&vmm4_addrs()).unwrap();
    let reserved: Vec<_> = pt.devices().map(|(a, s)| (a, s.clone())).collect();
    assert_eq!(
        reserved,
        vec![
            (addr(6, 5, 0), DeviceState::Reserved),
            (addr(6, 5, 1), DeviceState::Reserved),
            (addr(10, 0, 0), DeviceState::Reserved),
        ]
    );
    for a in vmm4_addrs() {
        assert_eq!(
            pt.sysfs().device(a).unwrap().driver.as_deref(),
            Some(VFIO_PCI)
        );
    }
}

#[test]
fn an_unbound_device_is_probed_without_unbinding_and_stays_unbound_after_unload() {
    let fake = FakeSysfs::new()
        .with_driver(VFIO_PCI)
        .with_device(addr(3, 0, 0), FakeDevice::endpoint(None));
    let before = fake.snapshot();
    let mut pt = Passthrough::new(fake);
    pt.take(addr(3, 0, 0)).unwrap();
    assert_eq!(
        log(pt.sysfs()),
        vec![
            w("bus/pci/devices/0000:03:00.0/driver_override", "vfio-pci"),
            w("bus/pci/drivers_probe", "0000:03:00.0"),
        ]
    );
    assert_eq!(pt.original_driver(addr(3, 0, 0)), None);
    pt.release_all().unwrap();
    assert_eq!(pt.sysfs().snapshot(), before);
    assert_eq!(pt.devices().count(), 0);
}

#[test]
fn a_device_already_on_vfio_needs_no_write() {
    let mut dev = FakeDevice::endpoint(Some(VFIO_PCI));
    dev.driver_override = Some(VFIO_PCI.to_owned());
    let fake = FakeSysfs::new().with_device(addr(1, 0, 0), dev);
    let mut pt = Passthrough::new(fake);
    pt.take(addr(1, 0, 0)).unwrap();
    assert_eq!(pt.sysfs().writes(), 0);
    pt.release_all().unwrap();
    assert_eq!(pt.sysfs().writes(), 0);
}

#[test]
fn a_missing_device_is_an_error_naming_it_in_both_notations() {
    let fake = vmm4_host();
    let before = fake.snapshot();
    let mut pt = Passthrough::new(fake);
    let err = pt.reserve_all(&[addr(7, 0, 0)]).unwrap_err();
    assert!(
        matches!(err, PassthroughError::NoSuchDevice { .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains("0000:07:00.0"), "{msg}");
    assert!(msg.contains("7/0/0"), "{msg}");
    assert_eq!(pt.sysfs().snapshot(), before);
    assert_eq!(pt.sysfs().writes(), 0);
}

#[test]
fn bridges_are_refused_and_multifunction_endpoints_accepted() {
    let fake = FakeSysfs::new()
        .with_driver(VFIO_PCI)
        .with_device(
            addr(0, 1, 0),
            FakeDevice::with_header_type(0x01, Some("pcieport")),
        )
        .with_device(addr(0, 2, 0), FakeDevice::with_header_type(0x82, None))
        .with_device(
            addr(0, 3, 0),
            FakeDevice::with_header_type(0x80, Some("snd_hda")),
        );
    let mut pt = Passthrough::new(fake);

    let err = pt.take(addr(0, 1, 0)).unwrap_err();
    assert!(
        matches!(
            err,
            PassthroughError::NotEndpoint {
                header_type: 0x01,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("0000:00:01.0"), "{err}");
    assert!(err.to_string().contains("not an endpoint"), "{err}");

    let err = pt.take(addr(0, 2, 0)).unwrap_err();
    assert!(
        matches!(
            err,
            PassthroughError::NotEndpoint {
                header_type: 0x02,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(pt.sysfs().writes(), 0);

    pt.take(addr(0, 3, 0)).unwrap();
    assert_eq!(pt.state(addr(0, 3, 0)), Some(&DeviceState::Reserved));
}

#[test]
fn truncated_config_space_is_an_error() {
    let mut dev = FakeDevice::endpoint(Some("e1000e"));
    dev.config.truncate(8);
    let fake = FakeSysfs::new()
        .with_driver(VFIO_PCI)
        .with_device(addr(2, 0, 0), dev);
    let mut pt = Passthrough::new(fake);
    let err = pt.take(addr(2, 0, 0)).unwrap_err();
    assert!(
        matches!(err, PassthroughError::ShortConfig { len: 8, .. }),
        "{err:?}"
    );
}

/// Runs `op` with the `n`th write failing, for n = 1, 2, ... until `op` succeeds; each failing
/// run must leave the tree byte-for-byte as it found it and report the failed step.
fn every_failing_write_is_rolled_back<F>(setup: impl Fn() -> Passthrough<FakeSysfs>, op: F) -> u64
where
    F: Fn(&mut Passthrough<FakeSysfs>) -> Result<(), PassthroughError>,
{
    let mut n = 1;
    loop {
        let mut pt = setup();
        let before = pt.sysfs().snapshot();
        let states_before: Vec<_> = pt.devices().map(|(a, s)| (a, s.clone())).collect();
        pt.sysfs().fail_nth_write(n);
        match op(&mut pt) {
            Ok(()) => return n - 1,
            Err(err) => {
                assert!(
                    matches!(
                        err,
                        PassthroughError::Sysfs {
                            step: Step::Write { .. },
                            ..
                        }
                    ),
                    "write {n}: {err:?}"
                );
                assert_eq!(pt.sysfs().snapshot(), before, "write {n} failed: {err}");
                let states: Vec<_> = pt.devices().map(|(a, s)| (a, s.clone())).collect();
                assert_eq!(states, states_before, "write {n}");
            }
        }
        n += 1;
        assert!(n < 100, "operation never succeeded");
    }
}

#[test]
fn reserve_failing_at_any_write_leaves_sysfs_unchanged() {
    let steps = every_failing_write_is_rolled_back(
        || Passthrough::new(vmm4_host()),
        |pt| pt.reserve_all(&[addr(10, 0, 0)]),
    );
    assert_eq!(steps, 3, "override, unbind, probe");
}

#[test]
fn reserving_several_devices_is_all_or_nothing_at_any_write() {
    let steps = every_failing_write_is_rolled_back(
        || Passthrough::new(vmm4_host()),
        |pt| pt.reserve_all(&vmm4_addrs()),
    );
    assert_eq!(steps, 9);
}

#[test]
fn a_bad_device_late_in_the_list_rolls_back_the_earlier_ones() {
    let fake = vmm4_host().with_device(addr(0, 1, 0), FakeDevice::with_header_type(0x01, None));
    let before = fake.snapshot();
    let mut pt = Passthrough::new(fake);
    let mut list = vmm4_addrs();
    list.push(addr(0, 1, 0));
    let err = pt.reserve_all(&list).unwrap_err();
    assert!(
        matches!(err, PassthroughError::NotEndpoint { .. }),
        "{err:?}"
    );
    assert_eq!(pt.sysfs().snapshot(), before);
    assert_eq!(pt.devices().count(), 0);
    assert!(pt.sysfs().writes() > 0, "the first three were really bound");
}

#[test]
fn without_vfio_pci_the_probe_binds_nothing_and_everything_is_undone() {
    let fake = vmm4_host();
    fake.remove_driver(VFIO_PCI);
    let before = fake.snapshot();
    let mut pt = Passthrough::new(fake);
    let err = pt.reserve_all(&vmm4_addrs()).unwrap_err();
    match &err {
        PassthroughError::NotBound {
            expected, found, ..
        } => {
            assert_eq!(expected, VFIO_PCI);
            assert_eq!(found, &None);
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("no driver"), "{err}");
    assert_eq!(pt.sysfs().snapshot(), before);
}

#[test]
fn a_failed_rollback_is_reported_as_such() {
    let mut pt = Passthrough::new(vmm4_host());
    // Write 3 (drivers_probe) fails, then write 4 (the first write of the rollback) too.
    pt.sysfs().fail_nth_write(3);
    pt.sysfs().fail_nth_write(4);
    let err = pt.take(addr(10, 0, 0)).unwrap_err();
    match &err {
        PassthroughError::RollbackFailed { cause, rollback } => {
            assert!(cause.to_string().contains("drivers_probe"), "{cause}");
            assert!(
                rollback.to_string().contains("driver_override"),
                "{rollback}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("may be left changed"), "{err}");
}

#[test]
fn release_hands_a_device_to_a_host_driver_and_take_reserves_it_again() {
    let mut pt = Passthrough::new(vmm4_host());
    pt.reserve_all(&[addr(10, 0, 0)]).unwrap();
    let n = pt.sysfs().write_log().len();

    pt.release(addr(10, 0, 0), "e1000e").unwrap();
    let dev = pt.sysfs().device(addr(10, 0, 0)).unwrap();
    assert_eq!(dev.driver.as_deref(), Some("e1000e"));
    assert_eq!(dev.driver_override, None);
    assert_eq!(
        pt.state(addr(10, 0, 0)),
        Some(&DeviceState::Released {
            host_driver: "e1000e".into()
        })
    );
    assert_eq!(
        pt.sysfs().write_log()[n..].to_vec(),
        vec![
            w("bus/pci/devices/0000:0a:00.0/driver_override", "\n"),
            w("bus/pci/devices/0000:0a:00.0/driver/unbind", "0000:0a:00.0"),
            w("bus/pci/drivers/e1000e/bind", "0000:0a:00.0"),
        ]
    );
    // A released device cannot be assigned.
    assert!(matches!(
        pt.assign(addr(10, 0, 0), "vm1"),
        Err(PassthroughError::NotReserved { .. })
    ));

    pt.take(addr(10, 0, 0)).unwrap();
    assert_eq!(pt.state(addr(10, 0, 0)), Some(&DeviceState::Reserved));
    assert_eq!(
        pt.sysfs().device(addr(10, 0, 0)).unwrap().driver.as_deref(),
        Some(VFIO_PCI)
    );
    pt.assign(addr(10, 0, 0), "vm1").unwrap();
}

#[test]
fn release_is_refused_while_assigned_with_ebusy() {
    let mut pt = Passthrough::new(vmm4_host());
    pt.reserve_all(&vmm4_addrs()).unwrap();
    pt.assign(addr(6, 5, 0), "web").unwrap();
    let before = pt.sysfs().snapshot();
    let writes = pt.sysfs().writes();

    let err = pt.release(addr(6, 5, 0), "igb").unwrap_err();
    assert!(
        matches!(&err, PassthroughError::Busy { vm, .. } if vm == "web"),
        "{err:?}"
    );
    assert!(err.to_string().contains("busy"), "{err}");
    assert!(err.to_string().contains("0000:06:05.0"), "{err}");
    let err = pt.release_all().unwrap_err();
    assert!(matches!(err, PassthroughError::Busy { .. }), "{err:?}");
    assert_eq!(pt.sysfs().snapshot(), before);
    assert_eq!(pt.sysfs().writes(), writes);

    pt.unassign(addr(6, 5, 0), "web").unwrap();
    pt.release(addr(6, 5, 0), "igb").unwrap();
}

#[test]
fn release_to_a_driver_that_does_not_match_is_undone() {
    let mut pt = Passthrough::new(vmm4_host());
    pt.reserve_all(&[addr(10, 0, 0)]).unwrap();
    let before = pt.sysfs().snapshot();
    // xhci_hcd is loaded but does not claim a NIC: the kernel's bind fails with ENODEV.
    let err = pt.release(addr(10, 0, 0), "xhci_hcd").unwrap_err();
    match &err {
        PassthroughError::Sysfs { step, path, .. } => {
            assert_eq!(
                step,
                &Step::Write {
                    data: "0000:0a:00.0".into()
                }
            );
            assert_eq!(path.to_str(), Some("bus/pci/drivers/xhci_hcd/bind"));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(pt.sysfs().snapshot(), before);
    assert_eq!(pt.state(addr(10, 0, 0)), Some(&DeviceState::Reserved));

    // A driver that is not loaded at all: no bind attribute.
    let err = pt.release(addr(10, 0, 0), "ixgbe").unwrap_err();
    assert!(err.to_string().contains("drivers/ixgbe/bind"), "{err}");
    assert_eq!(pt.sysfs().snapshot(), before);
}

#[test]
fn release_failing_at_any_write_leaves_sysfs_unchanged() {
    let setup = || {
        let mut pt = Passthrough::new(vmm4_host());
        pt.reserve_all(&[addr(10, 0, 0)]).unwrap();
        pt
    };
    let steps =
        every_failing_write_is_rolled_back(setup, |pt| pt.release(addr(10, 0, 0), "e1000e"));
    assert_eq!(steps, 3, "clear override, unbind, bind");
}

#[test]
fn release_all_returns_every_device_to_its_original_driver() {
    let fake = vmm4_host();
    let before = fake.snapshot();
    let mut pt = Passthrough::new(fake);
    pt.reserve_all(&vmm4_addrs()).unwrap();
    pt.release_all().unwrap();
    assert_eq!(pt.sysfs().snapshot(), before);
    assert_eq!(pt.devices().count(), 0);
}

#[test]
fn release_all_failing_at_any_write_keeps_everything_reserved() {
    let setup = || {
        let mut pt = Passthrough::new(vmm4_host());
        pt.reserve_all(&vmm4_addrs()).unwrap();
        pt
    };
    let steps = every_failing_write_is_rolled_back(setup, Passthrough::release_all);
    assert_eq!(steps, 9);
}

#[test]
fn reserve_all_undoes_a_retaken_released_device_back_to_its_host_driver() {
    let fake = vmm4_host().with_device(addr(0, 1, 0), FakeDevice::with_header_type(0x01, None));
    let mut pt = Passthrough::new(fake);
    pt.reserve_all(&[addr(10, 0, 0)]).unwrap();
    pt.release(addr(10, 0, 0), "e1000e").unwrap();
    let before = pt.sysfs().snapshot();
    let err = pt
        .reserve_all(&[addr(10, 0, 0), addr(0, 1, 0)])
        .unwrap_err();
    assert!(
        matches!(err, PassthroughError::NotEndpoint { .. }),
        "{err:?}"
    );
    assert_eq!(pt.sysfs().snapshot(), before);
    assert_eq!(
        pt.state(addr(10, 0, 0)),
        Some(&DeviceState::Released {
            host_driver: "e1000e".into()
        })
    );
}

#[test]
fn assignment_follows_ppt_ownership_rules() {
    let mut pt = Passthrough::new(vmm4_host());
    pt.reserve_all(&vmm4_addrs()).unwrap();
    let a = addr(10, 0, 0);

    assert!(matches!(
        pt.assign(addr(9, 0, 0), "vm1"),
        Err(PassthroughError::NotReserved { .. })
    ));
    pt.assign(a, "vm1").unwrap();
    assert_eq!(
        pt.state(a),
        Some(&DeviceState::Assigned { vm: "vm1".into() })
    );
    let err = pt.assign(a, "vm2").unwrap_err();
    assert!(
        matches!(&err, PassthroughError::Busy { vm, .. } if vm == "vm1"),
        "{err:?}"
    );

    let err = pt.unassign(a, "vm2").unwrap_err();
    assert!(
        matches!(&err, PassthroughError::NotAssignedTo { owner: Some(o), .. } if o == "vm1"),
        "{err:?}"
    );
    pt.unassign(a, "vm1").unwrap();
    assert!(matches!(
        pt.unassign(a, "vm1"),
        Err(PassthroughError::NotAssignedTo { owner: None, .. })
    ));

    pt.assign(addr(6, 5, 0), "vm2").unwrap();
    pt.assign(addr(6, 5, 1), "vm2").unwrap();
    pt.assign(a, "vm3").unwrap();
    assert_eq!(pt.unassign_vm("vm2"), vec![addr(6, 5, 0), addr(6, 5, 1)]);
    assert_eq!(pt.state(addr(6, 5, 1)), Some(&DeviceState::Reserved));
    assert_eq!(
        pt.state(a),
        Some(&DeviceState::Assigned { vm: "vm3".into() })
    );
    // Assignment is bookkeeping: it never touches sysfs.
    assert_eq!(pt.sysfs().writes(), 9);
}

#[test]
fn driver_names_that_could_escape_sysfs_are_refused() {
    let mut pt = Passthrough::new(vmm4_host());
    pt.reserve_all(&[addr(10, 0, 0)]).unwrap();
    let writes = pt.sysfs().writes();
    for bad in ["", ".", "..", "../e1000e", "e1000e/bind", "e1000e\n", "a b"] {
        let err = pt.release(addr(10, 0, 0), bad).unwrap_err();
        assert!(
            matches!(err, PassthroughError::InvalidDriverName { .. }),
            "{bad:?}: {err:?}"
        );
    }
    assert_eq!(pt.sysfs().writes(), writes);
}

#[test]
fn take_works_on_devices_not_listed_in_pptdevs_and_is_idempotent() {
    let mut pt = Passthrough::new(vmm4_host());
    pt.take(addr(6, 5, 1)).unwrap();
    let writes = pt.sysfs().writes();
    pt.take(addr(6, 5, 1)).unwrap();
    pt.reserve_all(&[addr(6, 5, 1), addr(6, 5, 1)]).unwrap();
    assert_eq!(pt.sysfs().writes(), writes);
}

#[test]
fn an_admin_override_for_another_driver_is_restored_at_unload() {
    // Bound to igb, with an override naming igb-alt set after the bind.
    let mut dev = FakeDevice::endpoint(Some("igb"));
    dev.driver_override = Some("igb-alt".into());
    let fake = FakeSysfs::new()
        .with_driver(VFIO_PCI)
        .with_device(addr(4, 0, 0), dev);
    let before = fake.snapshot();
    let mut pt = Passthrough::new(fake);
    pt.take(addr(4, 0, 0)).unwrap();
    pt.release_all().unwrap();
    assert_eq!(pt.sysfs().snapshot(), before);
}
