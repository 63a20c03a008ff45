//! Reserving PCI functions for passthrough, handing them back to host drivers at run time, and
//! tracking which VM each one is assigned to.
//!
//! On FreeBSD the `ppt` driver claims the devices named by `pptdevs` when vmm.ko loads, and
//! `devctl set driver` moves a device between `ppt` and a host driver at run time. On Linux the
//! equivalent of `ppt` is `vfio-pci`, reached through sysfs:
//!
//! 1. `bus/pci/devices/ADDR/config`: the device exists and its header type (byte 0x0e, bit 7
//!    masked off) is 0, an endpoint, as `ppt_probe` requires;
//! 2. write `vfio-pci` to `ADDR/driver_override`;
//! 3. if bound, write `ADDR` to `ADDR/driver/unbind`;
//! 4. write `ADDR` to `bus/pci/drivers_probe`, and check `ADDR/driver` now points at `vfio-pci`.
//!
//! Handing a device back clears `driver_override`, unbinds it from `vfio-pci` and writes `ADDR`
//! to `bus/pci/drivers/NAME/bind`.
//!
//! Every operation is all-or-nothing: when a step fails, the writes already done are undone, so
//! sysfs is left as the operation found it. The undo is driven by state, not by a log: it reads
//! what the device looks like now and walks it back to what it looked like before, writing only
//! what differs.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use crate::address::PciAddress;
use crate::sysfs::Sysfs;

/// The Linux driver that plays the part of FreeBSD's `ppt`.
pub const VFIO_PCI: &str = "vfio-pci";

/// Offset of the header-type byte in PCI configuration space.
pub const PCI_HEADER_TYPE_OFFSET: usize = 0x0e;
/// The header-type bits (bit 7 flags a multi-function device).
const HEADER_TYPE_MASK: u8 = 0x7f;
/// Header type of an endpoint ("normal") function.
const HEADER_TYPE_NORMAL: u8 = 0;

/// One sysfs access, as named in an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Reading an attribute.
    Read,
    /// Reading a symbolic link.
    ReadLink,
    /// Writing `data` to an attribute.
    Write {
        /// What was written.
        data: String,
    },
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Read => write!(f, "reading"),
            Step::ReadLink => write!(f, "reading the link"),
            Step::Write { data } => write!(f, "writing {data:?} to"),
        }
    }
}

/// Errors of passthrough reservation; each names the device and, for sysfs, the step and path.
#[derive(Debug, thiserror::Error)]
pub enum PassthroughError {
    /// The device has no `config` attribute in sysfs: there is no such device.
    #[error("No PCI device {addr} (pptdevs {}): {} not found", .addr.pptdevs_form(), .path.display())]
    NoSuchDevice {
        /// The device.
        addr: PciAddress,
        /// The attribute that was looked for.
        path: PathBuf,
        /// What the read returned.
        #[source]
        source: io::Error,
    },
    /// The device is a bridge or a CardBus bridge, which `ppt` refuses.
    #[error(
        "PCI device {addr} is not an endpoint (header type {header_type:#04x}, expected 0x00)"
    )]
    NotEndpoint {
        /// The device.
        addr: PciAddress,
        /// Its header type with the multi-function bit masked off.
        header_type: u8,
    },
    /// The readable configuration space stops before the header-type byte.
    #[error("PCI device {addr}: config space is {len} bytes, too short to hold the header type")]
    ShortConfig {
        /// The device.
        addr: PciAddress,
        /// How many bytes could be read.
        len: usize,
    },
    /// A sysfs access failed.
    #[error("PCI device {addr}: {step} {} failed", .path.display())]
    Sysfs {
        /// The device.
        addr: PciAddress,
        /// What was being done.
        step: Step,
        /// The attribute, relative to the sysfs root.
        path: PathBuf,
        /// What the access returned.
        #[source]
        source: io::Error,
    },
    /// After binding, the device is not bound to the driver it should be.
    #[error("PCI device {addr} is bound to {} after binding, expected {expected}", .found.as_deref().unwrap_or("no driver"))]
    NotBound {
        /// The device.
        addr: PciAddress,
        /// The driver it should be bound to.
        expected: String,
        /// The driver it is bound to, if any.
        found: Option<String>,
    },
    /// The device is assigned to a VM (EBUSY).
    #[error("PCI device {addr} is busy: assigned to VM {vm:?}")]
    Busy {
        /// The device.
        addr: PciAddress,
        /// The VM it is assigned to.
        vm: String,
    },
    /// The device is not reserved for passthrough (never taken, or handed back to a host driver).
    #[error("PCI device {addr} is not reserved for passthrough")]
    NotReserved {
        /// The device.
        addr: PciAddress,
    },
    /// The device is not assigned to the VM that tried to give it up.
    #[error("PCI device {addr} is not assigned to VM {vm:?} (owner: {})", .owner.as_deref().unwrap_or("none"))]
    NotAssignedTo {
        /// The device.
        addr: PciAddress,
        /// The VM that claimed it.
        vm: String,
        /// The VM it is actually assigned to.
        owner: Option<String>,
    },
    /// A driver name that cannot be a Linux driver (empty, `.`/`..`, or with `/`, spaces...).
    #[error("Invalid driver name {name:?}")]
    InvalidDriverName {
        /// The name given.
        name: String,
    },
    /// An operation failed and undoing its writes failed too: sysfs may be left changed.
    #[error("Rolling back also failed, sysfs may be left changed: {rollback}")]
    RollbackFailed {
        /// The failure that triggered the rollback.
        #[source]
        cause: Box<PassthroughError>,
        /// The failure of the rollback.
        rollback: Box<PassthroughError>,
    },
}

/// What a VM monitor sees of a device it has taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceState {
    /// Bound to `vfio-pci`, free to assign.
    Reserved,
    /// Bound to `vfio-pci` and assigned to a VM.
    Assigned {
        /// The VM.
        vm: String,
    },
    /// Handed back to a host driver at run time; [`Passthrough::take`] reserves it again.
    Released {
        /// The host driver it was handed to.
        host_driver: String,
    },
}

/// How a device is bound: its driver and its `driver_override`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Binding {
    driver: Option<String>,
    driver_override: Option<String>,
}

impl Binding {
    fn vfio() -> Self {
        Self {
            driver: Some(VFIO_PCI.to_owned()),
            driver_override: Some(VFIO_PCI.to_owned()),
        }
    }

    fn host(driver: &str) -> Self {
        Self {
            driver: Some(driver.to_owned()),
            driver_override: None,
        }
    }
}

/// How to undo one take inside [`Passthrough::reserve_all`].
#[derive(Debug)]
struct Undo {
    addr: PciAddress,
    /// The binding read just before the take.
    before: Binding,
    /// The state before the take; `None` when the device was new to us.
    previous: Option<DeviceState>,
}

#[derive(Debug)]
struct Device {
    /// How the device was bound before we first took it; [`Passthrough::release_all`] puts it
    /// back that way.
    original: Binding,
    state: DeviceState,
}

/// The passthrough devices of one module instance, over a [`Sysfs`].
///
/// Not internally synchronised: the owner (the module) keeps it behind its own lock.
#[derive(Debug)]
pub struct Passthrough<S: Sysfs> {
    sysfs: S,
    devices: BTreeMap<PciAddress, Device>,
}

fn device_path(addr: PciAddress, leaf: &str) -> PathBuf {
    Path::new("bus/pci/devices")
        .join(addr.sysfs_name())
        .join(leaf)
}

fn valid_driver_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl<S: Sysfs> Passthrough<S> {
    /// No devices yet, over `sysfs`.
    pub fn new(sysfs: S) -> Self {
        Self {
            sysfs,
            devices: BTreeMap::new(),
        }
    }

    /// The sysfs this instance works on.
    pub fn sysfs(&self) -> &S {
        &self.sysfs
    }

    /// The state of `addr`, or `None` if this instance never took it.
    pub fn state(&self, addr: PciAddress) -> Option<&DeviceState> {
        self.devices.get(&addr).map(|d| &d.state)
    }

    /// Every device taken so far, in address order.
    pub fn devices(&self) -> impl Iterator<Item = (PciAddress, &DeviceState)> {
        self.devices.iter().map(|(a, d)| (*a, &d.state))
    }

    /// The driver `addr` was bound to before it was first taken (`None` if it was unbound or is
    /// unknown here).
    pub fn original_driver(&self, addr: PciAddress) -> Option<&str> {
        self.devices
            .get(&addr)
            .and_then(|d| d.original.driver.as_deref())
    }

    /// Reserves every device in `addrs` (module load with `pptdevs`): all or none.
    ///
    /// Devices already reserved here are left alone; duplicates are taken once. If any device
    /// fails, the ones moved by this call are put back the way they were (unreserved ones to the
    /// drivers they had, released ones to their host drivers), and sysfs is left as it was found.
    pub fn reserve_all(&mut self, addrs: &[PciAddress]) -> Result<(), PassthroughError> {
        let mut done: Vec<Undo> = Vec::new();
        for &addr in addrs {
            match self.take_inner(addr) {
                Ok(Some(undo)) => done.push(undo),
                Ok(None) => {}
                Err(cause) => return Err(self.undo_takes(done, cause)),
            }
        }
        Ok(())
    }

    /// Undoes the takes in `done`, newest first, after `cause`; returns the error to report.
    fn undo_takes(&mut self, done: Vec<Undo>, cause: PassthroughError) -> PassthroughError {
        for undo in done.into_iter().rev() {
            if let Err(rollback) = transition(&self.sysfs, undo.addr, &undo.before) {
                return PassthroughError::RollbackFailed {
                    cause: Box::new(cause),
                    rollback: Box::new(rollback),
                };
            }
            match undo.previous {
                Some(state) => {
                    if let Some(dev) = self.devices.get_mut(&undo.addr) {
                        dev.state = state;
                    }
                }
                None => {
                    self.devices.remove(&undo.addr);
                }
            }
        }
        cause
    }

    /// Reserves `addr` for passthrough (`devctl set driver -f pciD:B:S:F ppt`).
    ///
    /// Works on any endpoint, listed in `pptdevs` or not, and on a device handed back by
    /// [`release`](Self::release). A device already reserved is left as it is. On failure
    /// sysfs is left as it was found.
    pub fn take(&mut self, addr: PciAddress) -> Result<(), PassthroughError> {
        self.take_inner(addr).map(|_| ())
    }

    /// [`take`](Self::take); returns how to undo it, or `None` if nothing had to change.
    fn take_inner(&mut self, addr: PciAddress) -> Result<Option<Undo>, PassthroughError> {
        let previous = match self.devices.get(&addr) {
            Some(dev) if matches!(dev.state, DeviceState::Released { .. }) => {
                Some(dev.state.clone())
            }
            Some(_) => return Ok(None),
            None => None,
        };
        check_endpoint(&self.sysfs, addr)?;
        let before = read_binding(&self.sysfs, addr)?;
        change_or_restore(&self.sysfs, addr, &Binding::vfio(), &before)?;
        match self.devices.get_mut(&addr) {
            // Re-taken after a release: the binding from before the first take still stands as
            // the one to restore at unload.
            Some(dev) => dev.state = DeviceState::Reserved,
            None => {
                self.devices.insert(
                    addr,
                    Device {
                        original: before.clone(),
                        state: DeviceState::Reserved,
                    },
                );
            }
        }
        Ok(Some(Undo {
            addr,
            before,
            previous,
        }))
    }

    /// Hands the reserved device `addr` back to the host driver `host_driver`
    /// (`devctl set driver -f pciD:B:S:F NAME`).
    ///
    /// Refused with [`PassthroughError::Busy`] while the device is assigned to a VM. Clears
    /// `driver_override`, unbinds from `vfio-pci` and binds through
    /// `bus/pci/drivers/NAME/bind`; on failure sysfs is left as it was found.
    pub fn release(&mut self, addr: PciAddress, host_driver: &str) -> Result<(), PassthroughError> {
        if !valid_driver_name(host_driver) {
            return Err(PassthroughError::InvalidDriverName {
                name: host_driver.to_owned(),
            });
        }
        let dev = self
            .devices
            .get(&addr)
            .ok_or(PassthroughError::NotReserved { addr })?;
        if let DeviceState::Assigned { vm } = &dev.state {
            return Err(PassthroughError::Busy {
                addr,
                vm: vm.clone(),
            });
        }
        let before = read_binding(&self.sysfs, addr)?;
        change_or_restore(&self.sysfs, addr, &Binding::host(host_driver), &before)?;
        if let Some(dev) = self.devices.get_mut(&addr) {
            dev.state = DeviceState::Released {
                host_driver: host_driver.to_owned(),
            };
        }
        Ok(())
    }

    /// Assigns the reserved device `addr` to the VM `vm`.
    ///
    /// Fails with [`PassthroughError::Busy`] if another VM (or this one) already has it, and
    /// with [`PassthroughError::NotReserved`] if it is not reserved.
    pub fn assign(&mut self, addr: PciAddress, vm: &str) -> Result<(), PassthroughError> {
        let dev = self
            .devices
            .get_mut(&addr)
            .ok_or(PassthroughError::NotReserved { addr })?;
        match &dev.state {
            DeviceState::Reserved => {
                dev.state = DeviceState::Assigned { vm: vm.to_owned() };
                Ok(())
            }
            DeviceState::Assigned { vm: owner } => Err(PassthroughError::Busy {
                addr,
                vm: owner.clone(),
            }),
            DeviceState::Released { .. } => Err(PassthroughError::NotReserved { addr }),
        }
    }

    /// Takes `addr` away from the VM `vm`; it stays reserved. Only the owner may do this.
    pub fn unassign(&mut self, addr: PciAddress, vm: &str) -> Result<(), PassthroughError> {
        let dev = self
            .devices
            .get_mut(&addr)
            .ok_or(PassthroughError::NotReserved { addr })?;
        match &dev.state {
            DeviceState::Assigned { vm: owner } if owner == vm => {
                dev.state = DeviceState::Reserved;
                Ok(())
            }
            DeviceState::Assigned { vm: owner } => Err(PassthroughError::NotAssignedTo {
                addr,
                vm: vm.to_owned(),
                owner: Some(owner.clone()),
            }),
            DeviceState::Reserved => Err(PassthroughError::NotAssignedTo {
                addr,
                vm: vm.to_owned(),
                owner: None,
            }),
            DeviceState::Released { .. } => Err(PassthroughError::NotReserved { addr }),
        }
    }

    /// Takes every device away from the VM `vm` (VM destruction); returns them in address order.
    pub fn unassign_vm(&mut self, vm: &str) -> Vec<PciAddress> {
        let mut freed = Vec::new();
        for (addr, dev) in &mut self.devices {
            if matches!(&dev.state, DeviceState::Assigned { vm: owner } if owner == vm) {
                dev.state = DeviceState::Reserved;
                freed.push(*addr);
            }
        }
        freed
    }

    /// Hands every reserved device back to the driver it had before it was taken (module
    /// unload): all or none.
    ///
    /// Refused with [`PassthroughError::Busy`] while any device is assigned. Devices already
    /// handed back with [`release`](Self::release) stay with the driver they were given. On
    /// success this instance holds no devices; on failure the devices handed back by this call
    /// are reserved again and sysfs is left as it was found.
    pub fn release_all(&mut self) -> Result<(), PassthroughError> {
        if let Some((addr, vm)) = self.devices.iter().find_map(|(a, d)| match &d.state {
            DeviceState::Assigned { vm } => Some((*a, vm.clone())),
            _ => None,
        }) {
            return Err(PassthroughError::Busy { addr, vm });
        }
        let mut done: Vec<PciAddress> = Vec::new();
        for (&addr, dev) in &self.devices {
            if dev.state != DeviceState::Reserved {
                continue;
            }
            let result = read_binding(&self.sysfs, addr)
                .and_then(|before| change_or_restore(&self.sysfs, addr, &dev.original, &before));
            if let Err(cause) = result {
                for &back in done.iter().rev() {
                    if let Err(rollback) = transition(&self.sysfs, back, &Binding::vfio()) {
                        return Err(PassthroughError::RollbackFailed {
                            cause: Box::new(cause),
                            rollback: Box::new(rollback),
                        });
                    }
                }
                return Err(cause);
            }
            done.push(addr);
        }
        self.devices.clear();
        Ok(())
    }
}

fn sysfs_error(addr: PciAddress, step: Step, path: PathBuf, source: io::Error) -> PassthroughError {
    PassthroughError::Sysfs {
        addr,
        step,
        path,
        source,
    }
}

/// Checks that `addr` exists and is an endpoint (header type 0).
fn check_endpoint(sysfs: &impl Sysfs, addr: PciAddress) -> Result<(), PassthroughError> {
    let path = device_path(addr, "config");
    let config = match sysfs.read(&path) {
        Ok(c) => c,
        Err(source) if source.kind() == io::ErrorKind::NotFound => {
            return Err(PassthroughError::NoSuchDevice { addr, path, source });
        }
        Err(source) => return Err(sysfs_error(addr, Step::Read, path, source)),
    };
    let header = config
        .get(PCI_HEADER_TYPE_OFFSET)
        .ok_or(PassthroughError::ShortConfig {
            addr,
            len: config.len(),
        })?;
    let header_type = header & HEADER_TYPE_MASK;
    if header_type != HEADER_TYPE_NORMAL {
        return Err(PassthroughError::NotEndpoint { addr, header_type });
    }
    Ok(())
}

/// Reads the driver `addr` is bound to (`None` when unbound) and its `driver_override`.
fn read_binding(sysfs: &impl Sysfs, addr: PciAddress) -> Result<Binding, PassthroughError> {
    let link = device_path(addr, "driver");
    let driver = match sysfs.read_link(&link) {
        Ok(target) => target.file_name().map(|n| n.to_string_lossy().into_owned()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(sysfs_error(addr, Step::ReadLink, link, e)),
    };
    let path = device_path(addr, "driver_override");
    let raw = sysfs
        .read(&path)
        .map_err(|e| sysfs_error(addr, Step::Read, path, e))?;
    let text = String::from_utf8_lossy(&raw);
    let text = text.trim_end_matches('\n');
    // The kernel prints an unset override as "(null)".
    let driver_override = if text.is_empty() || text == "(null)" {
        None
    } else {
        Some(text.to_owned())
    };
    Ok(Binding {
        driver,
        driver_override,
    })
}

fn write(
    sysfs: &impl Sysfs,
    addr: PciAddress,
    path: PathBuf,
    data: &str,
) -> Result<(), PassthroughError> {
    sysfs.write(&path, data.as_bytes()).map_err(|source| {
        sysfs_error(
            addr,
            Step::Write {
                data: data.to_owned(),
            },
            path,
            source,
        )
    })
}

fn write_override(
    sysfs: &impl Sysfs,
    addr: PciAddress,
    value: Option<&str>,
) -> Result<(), PassthroughError> {
    // Writing an empty line clears the override.
    write(
        sysfs,
        addr,
        device_path(addr, "driver_override"),
        value.unwrap_or("\n"),
    )
}

/// Moves `addr` from whatever binding it has now to `target`, writing only what differs.
fn transition(
    sysfs: &impl Sysfs,
    addr: PciAddress,
    target: &Binding,
) -> Result<(), PassthroughError> {
    let now = read_binding(sysfs, addr)?;
    let name = addr.sysfs_name();
    // An override naming another driver would stop the bind: bind with none, then set it.
    let override_while_binding = match (&target.driver, &target.driver_override) {
        (Some(d), Some(o)) if d != o => None,
        _ => target.driver_override.clone(),
    };
    if now.driver_override != override_while_binding {
        write_override(sysfs, addr, override_while_binding.as_deref())?;
    }
    if now.driver != target.driver {
        if now.driver.is_some() {
            write(sysfs, addr, device_path(addr, "driver/unbind"), &name)?;
        }
        if let Some(driver) = &target.driver {
            if override_while_binding.as_deref() == Some(driver.as_str()) {
                write(sysfs, addr, PathBuf::from("bus/pci/drivers_probe"), &name)?;
            } else {
                let bind = Path::new("bus/pci/drivers").join(driver).join("bind");
                write(sysfs, addr, bind, &name)?;
            }
        }
    }
    if override_while_binding != target.driver_override {
        write_override(sysfs, addr, target.driver_override.as_deref())?;
    }
    let after = read_binding(sysfs, addr)?;
    if after.driver != target.driver {
        return Err(PassthroughError::NotBound {
            addr,
            expected: target.driver.clone().unwrap_or_else(|| "no driver".into()),
            found: after.driver,
        });
    }
    Ok(())
}

/// [`transition`] to `target`; on failure, back to `before` (the binding read just before).
fn change_or_restore(
    sysfs: &impl Sysfs,
    addr: PciAddress,
    target: &Binding,
    before: &Binding,
) -> Result<(), PassthroughError> {
    transition(sysfs, addr, target).map_err(|cause| match transition(sysfs, addr, before) {
        Ok(()) => cause,
        Err(rollback) => PassthroughError::RollbackFailed {
            cause: Box::new(cause),
            rollback: Box::new(rollback),
        },
    })
}
