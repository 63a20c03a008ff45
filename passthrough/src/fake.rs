//! A simulated sysfs for tests: it reacts to writes the way the Linux PCI core does.
//!
//! There is no VFIO or IOMMU on our build hosts, and a plain directory tree has no kernel behind
//! it (writing to `unbind` would just leave a file with a name in it). [`FakeSysfs`] models the
//! part of the kernel passthrough talks to:
//!
//! - `bus/pci/devices/ADDR/config` reads the device's configuration bytes;
//! - `ADDR/driver_override` reads `(null)\n` or `NAME\n`; writing `NAME` sets it, writing an
//!   empty line clears it;
//! - `ADDR/driver` is a link to `../../../bus/pci/drivers/NAME` while the device is bound, and
//!   missing otherwise; `ADDR/driver/unbind` therefore exists only while bound;
//! - writing `ADDR` to `bus/pci/drivers/NAME/unbind` unbinds it if NAME is its driver (else
//!   ENODEV);
//! - writing `ADDR` to `bus/pci/drivers/NAME/bind` binds an unbound device if NAME matches it:
//!   the override names NAME, or there is no override and NAME is one of the drivers whose ID
//!   table matches the device (else ENODEV);
//! - writing `ADDR` to `bus/pci/drivers_probe` binds an unbound device to its override if that
//!   driver is registered, otherwise to the first registered matching driver, otherwise leaves it
//!   unbound, and succeeds either way, as the kernel does.
//!
//! A write can be made to fail (EIO, with no effect) with [`FakeSysfs::fail_nth_write`], and
//! [`FakeSysfs::snapshot`] renders every readable attribute and link so a test can check that a
//! failed operation left the tree byte-for-byte unchanged.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use crate::address::PciAddress;
use crate::reserve::PCI_HEADER_TYPE_OFFSET;
use crate::sysfs::Sysfs;

/// Linux errno values the PCI core returns from these attributes.
const ENODEV: i32 = 19;
const EIO: i32 = 5;
const EINVAL: i32 = 22;

/// One simulated PCI function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeDevice {
    /// Configuration space as `config` reads it.
    pub config: Vec<u8>,
    /// The driver it is bound to.
    pub driver: Option<String>,
    /// Its `driver_override`.
    pub driver_override: Option<String>,
    /// Drivers whose ID table matches the device, in probe order.
    pub id_drivers: Vec<String>,
}

impl FakeDevice {
    /// An endpoint (header type 0) bound to `driver`, which also matches it by ID.
    pub fn endpoint(driver: Option<&str>) -> Self {
        Self::with_header_type(0x00, driver)
    }

    /// A function with the given header type (0x01 is a PCI-to-PCI bridge; bit 7 marks a
    /// multi-function device).
    pub fn with_header_type(header_type: u8, driver: Option<&str>) -> Self {
        let mut config = vec![0u8; 64];
        // Vendor 0x8086, device 0x10d3: any plausible ID will do.
        config[0..4].copy_from_slice(&[0x86, 0x80, 0xd3, 0x10]);
        config[PCI_HEADER_TYPE_OFFSET] = header_type;
        Self {
            config,
            driver: driver.map(str::to_owned),
            driver_override: None,
            id_drivers: driver.into_iter().map(str::to_owned).collect(),
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    devices: BTreeMap<String, FakeDevice>,
    drivers: BTreeSet<String>,
    writes: u64,
    fail_at: BTreeSet<u64>,
    log: Vec<(String, String)>,
}

/// A simulated `/sys` for the PCI core; see the module documentation.
#[derive(Debug, Default)]
pub struct FakeSysfs {
    inner: Mutex<Inner>,
}

fn errno(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{}: no such file", path.display()),
    )
}

/// Splits a relative path into its normal components; anything else (`..`, root) is rejected.
fn parts(path: &Path) -> io::Result<Vec<&str>> {
    path.components()
        .map(|c| match c {
            Component::Normal(s) => s.to_str().ok_or_else(|| errno(EINVAL)),
            _ => Err(errno(EINVAL)),
        })
        .collect()
}

/// What sysfs compares a written device name with: the text without one trailing newline.
fn written_name(data: &[u8]) -> io::Result<&str> {
    let text = std::str::from_utf8(data).map_err(|_| errno(EINVAL))?;
    Ok(text.strip_suffix('\n').unwrap_or(text))
}

impl Inner {
    fn device(&mut self, name: &str, path: &Path) -> io::Result<&mut FakeDevice> {
        self.devices.get_mut(name).ok_or_else(|| not_found(path))
    }

    fn matches(dev: &FakeDevice, driver: &str) -> bool {
        match &dev.driver_override {
            Some(o) => o == driver,
            None => dev.id_drivers.iter().any(|d| d == driver),
        }
    }

    fn unbind(&mut self, driver: &str, data: &[u8]) -> io::Result<()> {
        let name = written_name(data)?;
        let dev = self.devices.get_mut(name).ok_or_else(|| errno(ENODEV))?;
        if dev.driver.as_deref() != Some(driver) {
            return Err(errno(ENODEV));
        }
        dev.driver = None;
        Ok(())
    }

    fn bind(&mut self, driver: &str, data: &[u8]) -> io::Result<()> {
        let name = written_name(data)?;
        let dev = self.devices.get_mut(name).ok_or_else(|| errno(ENODEV))?;
        if dev.driver.is_some() || !Self::matches(dev, driver) {
            return Err(errno(ENODEV));
        }
        dev.driver = Some(driver.to_owned());
        Ok(())
    }

    fn probe(&mut self, data: &[u8]) -> io::Result<()> {
        let name = written_name(data)?;
        let drivers = &self.drivers;
        let dev = self.devices.get_mut(name).ok_or_else(|| errno(ENODEV))?;
        if dev.driver.is_some() {
            return Ok(());
        }
        let candidates: Vec<&String> = match &dev.driver_override {
            Some(o) => vec![o],
            None => dev.id_drivers.iter().collect(),
        };
        dev.driver = candidates
            .into_iter()
            .find(|d| drivers.contains(*d))
            .cloned();
        Ok(())
    }

    fn write(&mut self, path: &Path, data: &[u8]) -> io::Result<()> {
        match parts(path)?.as_slice() {
            ["bus", "pci", "devices", dev, "driver_override"] => {
                if data.len() >= 4095 {
                    return Err(errno(EINVAL));
                }
                let text = std::str::from_utf8(data).map_err(|_| errno(EINVAL))?;
                // The kernel keeps what comes before the first newline.
                let value = text.split('\n').next().unwrap_or("");
                let dev = self.device(dev, path)?;
                dev.driver_override = (!value.is_empty()).then(|| value.to_owned());
                Ok(())
            }
            ["bus", "pci", "devices", dev, "driver", "unbind"] => {
                let driver = self
                    .device(dev, path)?
                    .driver
                    .clone()
                    .ok_or_else(|| not_found(path))?;
                self.unbind(&driver, data)
            }
            ["bus", "pci", "drivers", driver, op @ ("bind" | "unbind")] => {
                if !self.drivers.contains(*driver) {
                    return Err(not_found(path));
                }
                if *op == "bind" {
                    self.bind(driver, data)
                } else {
                    self.unbind(driver, data)
                }
            }
            ["bus", "pci", "drivers_probe"] => self.probe(data),
            _ => Err(not_found(path)),
        }
    }
}

impl FakeSysfs {
    /// An empty bus with no drivers.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A test that panicked while holding the lock has already failed; the state is still
        // fine to read for its report.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a driver (`bus/pci/drivers/NAME`).
    pub fn with_driver(self, name: &str) -> Self {
        self.lock().drivers.insert(name.to_owned());
        self
    }

    /// Adds a device; its driver, if any, is registered too.
    pub fn with_device(self, addr: PciAddress, device: FakeDevice) -> Self {
        {
            let mut inner = self.lock();
            if let Some(d) = &device.driver {
                inner.drivers.insert(d.clone());
            }
            inner.devices.insert(addr.sysfs_name(), device);
        }
        self
    }

    /// Unregisters a driver (as if its module were unloaded); devices bound to it are unbound.
    pub fn remove_driver(&self, name: &str) {
        let mut inner = self.lock();
        inner.drivers.remove(name);
        for dev in inner.devices.values_mut() {
            if dev.driver.as_deref() == Some(name) {
                dev.driver = None;
            }
        }
    }

    /// Makes the `n`th write from now (1-based) fail with EIO and no effect; other writes
    /// succeed. Calls add up: fail the 3rd and the 4th write with two calls made together.
    pub fn fail_nth_write(&self, n: u64) {
        let mut inner = self.lock();
        let at = inner.writes + n;
        inner.fail_at.insert(at);
    }

    /// How many writes were attempted so far, failed ones included.
    pub fn writes(&self) -> u64 {
        self.lock().writes
    }

    /// Every successful write so far: (path, data).
    pub fn write_log(&self) -> Vec<(String, String)> {
        self.lock().log.clone()
    }

    /// The simulated device at `addr`, if any.
    pub fn device(&self, addr: PciAddress) -> Option<FakeDevice> {
        self.lock().devices.get(&addr.sysfs_name()).cloned()
    }

    /// Every readable attribute and link of the tree, by path, exactly as a reader would get it:
    /// two equal snapshots mean nothing a program can see has changed.
    pub fn snapshot(&self) -> BTreeMap<String, Vec<u8>> {
        let inner = self.lock();
        let mut out = BTreeMap::new();
        for name in &inner.drivers {
            out.insert(format!("bus/pci/drivers/{name}"), Vec::new());
        }
        for (name, dev) in &inner.devices {
            let base = format!("bus/pci/devices/{name}");
            out.insert(format!("{base}/config"), dev.config.clone());
            let ov = match &dev.driver_override {
                Some(o) => format!("{o}\n"),
                None => "(null)\n".to_owned(),
            };
            out.insert(format!("{base}/driver_override"), ov.into_bytes());
            if let Some(d) = &dev.driver {
                out.insert(
                    format!("{base}/driver -> "),
                    format!("../../../bus/pci/drivers/{d}").into_bytes(),
                );
            }
        }
        out
    }
}

impl Sysfs for FakeSysfs {
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        let inner = self.lock();
        match parts(path)?.as_slice() {
            ["bus", "pci", "devices", dev, leaf] => {
                let dev = inner.devices.get(*dev).ok_or_else(|| not_found(path))?;
                match *leaf {
                    "config" => Ok(dev.config.clone()),
                    "driver_override" => Ok(match &dev.driver_override {
                        Some(o) => format!("{o}\n").into_bytes(),
                        None => b"(null)\n".to_vec(),
                    }),
                    _ => Err(not_found(path)),
                }
            }
            _ => Err(not_found(path)),
        }
    }

    fn write(&self, path: &Path, data: &[u8]) -> io::Result<()> {
        let mut inner = self.lock();
        inner.writes += 1;
        let count = inner.writes;
        if inner.fail_at.remove(&count) {
            return Err(errno(EIO));
        }
        inner.write(path, data)?;
        inner.log.push((
            path.display().to_string(),
            String::from_utf8_lossy(data).into_owned(),
        ));
        Ok(())
    }

    fn read_link(&self, path: &Path) -> io::Result<PathBuf> {
        let inner = self.lock();
        match parts(path)?.as_slice() {
            ["bus", "pci", "devices", dev, "driver"] => {
                let dev = inner.devices.get(*dev).ok_or_else(|| not_found(path))?;
                let driver = dev.driver.as_ref().ok_or_else(|| not_found(path))?;
                Ok(PathBuf::from(format!("../../../bus/pci/drivers/{driver}")))
            }
            _ => Err(not_found(path)),
        }
    }
}
