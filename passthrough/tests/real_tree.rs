//! `RealSysfs` over a directory tree of the test's own: the plain file I/O (reading `config`,
//! following the `driver` link, writing through it), with no kernel behind the files.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use passthrough::{Passthrough, PassthroughError, PciAddress, RealSysfs, Sysfs};

const DEV: &str = "0000:0a:00.0";

fn addr() -> PciAddress {
    PciAddress::new(10, 0, 0).unwrap()
}

/// `root/bus/pci/...` with one device bound to e1000e, laid out like `/sys`.
fn tree(header_type: u8) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let dev = root.join("bus/pci/devices").join(DEV);
    let drv = root.join("bus/pci/drivers/e1000e");
    fs::create_dir_all(&dev).unwrap();
    fs::create_dir_all(&drv).unwrap();
    fs::create_dir_all(root.join("bus/pci/drivers/vfio-pci")).unwrap();
    let mut config = vec![0u8; 64];
    config[0x0e] = header_type;
    fs::write(dev.join("config"), &config).unwrap();
    fs::write(dev.join("driver_override"), "(null)\n").unwrap();
    fs::write(drv.join("bind"), "").unwrap();
    fs::write(drv.join("unbind"), "").unwrap();
    fs::write(root.join("bus/pci/drivers_probe"), "").unwrap();
    symlink("../../../../bus/pci/drivers/e1000e", dev.join("driver")).unwrap();
    (tmp, root)
}

fn read(root: &Path, rel: &str) -> String {
    fs::read_to_string(root.join(rel)).unwrap()
}

#[test]
fn reads_attributes_and_links_relative_to_the_root() {
    let (_tmp, root) = tree(0);
    let sysfs = RealSysfs::new(&root);
    assert_eq!(sysfs.root(), root.as_path());
    let config = sysfs
        .read(Path::new("bus/pci/devices/0000:0a:00.0/config"))
        .unwrap();
    assert_eq!(config.len(), 64);
    let link = sysfs
        .read_link(Path::new("bus/pci/devices/0000:0a:00.0/driver"))
        .unwrap();
    assert_eq!(link.file_name().unwrap(), "e1000e");
    assert_eq!(RealSysfs::default().root(), Path::new("/sys"));
}

#[test]
fn writes_replace_the_attribute_and_never_create_one() {
    let (_tmp, root) = tree(0);
    let sysfs = RealSysfs::new(&root);
    let attr = Path::new("bus/pci/devices/0000:0a:00.0/driver_override");
    sysfs.write(attr, b"vfio-pci").unwrap();
    assert_eq!(read(&root, attr.to_str().unwrap()), "vfio-pci");

    let missing = Path::new("bus/pci/drivers/ixgbe/bind");
    let err = sysfs.write(missing, b"x").unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
    assert!(!root.join(missing).exists());
}

#[test]
fn absolute_paths_are_refused() {
    let (_tmp, root) = tree(0);
    let sysfs = RealSysfs::new(&root);
    let err = sysfs.read(Path::new("/etc/hostname")).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    let err = sysfs
        .write(&root.join("bus/pci/drivers_probe"), b"x")
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
}

#[test]
fn a_bridge_in_a_real_tree_is_refused_before_any_write() {
    let (_tmp, root) = tree(0x01);
    let mut pt = Passthrough::new(RealSysfs::new(&root));
    let err = pt.take(addr()).unwrap_err();
    assert!(
        matches!(err, PassthroughError::NotEndpoint { header_type: 1, .. }),
        "{err:?}"
    );
    assert_eq!(
        read(&root, "bus/pci/devices/0000:0a:00.0/driver_override"),
        "(null)\n"
    );
}

#[test]
fn a_missing_device_in_a_real_tree_is_named() {
    let (_tmp, root) = tree(0);
    let mut pt = Passthrough::new(RealSysfs::new(&root));
    let err = pt.take(PciAddress::new(0x0b, 0, 0).unwrap()).unwrap_err();
    assert!(
        matches!(err, PassthroughError::NoSuchDevice { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("0000:0b:00.0"), "{err}");
}

/// With no kernel behind the files the bind cannot happen; what this checks is that each write
/// reaches the right file (through the `driver` link for unbind) and that the failure is
/// reported and undone as far as plain files allow.
#[test]
fn writes_land_in_the_right_files_and_an_unbound_probe_is_reported() {
    let (_tmp, root) = tree(0);
    let mut pt = Passthrough::new(RealSysfs::new(&root));
    let err = pt.take(addr()).unwrap_err();
    match &err {
        PassthroughError::NotBound {
            expected, found, ..
        } => {
            assert_eq!(expected, "vfio-pci");
            assert_eq!(found.as_deref(), Some("e1000e"));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(read(&root, "bus/pci/drivers/e1000e/unbind"), DEV);
    assert_eq!(read(&root, "bus/pci/drivers_probe"), DEV);
    // The rollback cleared the override again (an empty line is how sysfs clears it).
    assert_eq!(
        read(&root, "bus/pci/devices/0000:0a:00.0/driver_override"),
        "\n"
    );
    assert!(pt.state(addr()).is_none());
}
