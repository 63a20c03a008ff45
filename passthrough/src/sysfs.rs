//! The few sysfs operations passthrough needs, behind a trait so tests can simulate the kernel.
//!
//! Every path handed to a [`Sysfs`] is relative to the sysfs root (`bus/pci/devices/...`), never
//! absolute: the real implementation joins it to its root, the fake in [`crate::fake`] interprets
//! it the way the kernel would.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Reads and writes sysfs attributes.
///
/// An implementation over a real `/sys` gets the kernel's reactions for free (writing a device
/// name to `unbind` removes its `driver` link, and so on); the fake in [`crate::fake`] simulates
/// them. Paths are relative to the sysfs root.
pub trait Sysfs {
    /// Reads the whole attribute at `path`.
    fn read(&self, path: &Path) -> io::Result<Vec<u8>>;

    /// Writes `data` to the existing attribute at `path` in a single `write(2)`, as sysfs
    /// requires. Never creates a file.
    fn write(&self, path: &Path, data: &[u8]) -> io::Result<()>;

    /// Reads the target of the symbolic link at `path`.
    fn read_link(&self, path: &Path) -> io::Result<PathBuf>;
}

/// [`Sysfs`] over a directory tree: `/sys` on a host, or a tree of a test's own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RealSysfs {
    root: PathBuf,
}

/// The default sysfs mount point.
pub const DEFAULT_SYSFS_ROOT: &str = "/sys";

impl RealSysfs {
    /// Sysfs rooted at `root` (for tests: a directory tree laid out like `/sys`).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The root every relative path is joined to.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn full(&self, path: &Path) -> io::Result<PathBuf> {
        if !path.is_relative() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("sysfs path {} is not relative", path.display()),
            ));
        }
        Ok(self.root.join(path))
    }
}

/// `/sys`.
impl Default for RealSysfs {
    fn default() -> Self {
        Self::new(DEFAULT_SYSFS_ROOT)
    }
}

impl Sysfs for RealSysfs {
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        fs::read(self.full(path)?)
    }

    fn write(&self, path: &Path, data: &[u8]) -> io::Result<()> {
        // No `create`: a sysfs attribute that is missing means the kernel lacks the feature (or
        // the driver is not loaded), and creating a plain file would hide that.
        let mut file = OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(self.full(path)?)?;
        let written = file.write(data)?;
        if written != data.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("short write: {written} of {} bytes", data.len()),
            ));
        }
        Ok(())
    }

    fn read_link(&self, path: &Path) -> io::Result<PathBuf> {
        fs::read_link(self.full(path)?)
    }
}

impl<T: Sysfs + ?Sized> Sysfs for &T {
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        (**self).read(path)
    }

    fn write(&self, path: &Path, data: &[u8]) -> io::Result<()> {
        (**self).write(path, data)
    }

    fn read_link(&self, path: &Path) -> io::Result<PathBuf> {
        (**self).read_link(path)
    }
}
