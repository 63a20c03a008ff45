//! [`SharedRegion`]: a memfd mapping two processes can lay rings in.

use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::Arc;

use crate::region::Region;

/// Seals every shared region carries: its size can never change, so a peer cannot shrink the
/// file under our mapping (which would turn our next access into SIGBUS).
const REQUIRED_SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;

struct Mapping {
    fd: OwnedFd,
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; all access goes through the ring protocol.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `base..base + len` is a mapping we created and nothing references it any
        // more (every `Region` holds an `Arc` to this `Mapping`). An error cannot be acted on.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// A memfd (anonymous shared memory) mapped `MAP_SHARED`, for rings shared by two processes.
///
/// The creator sizes and seals it ([`SharedRegion::create`]), formats rings in
/// [`SharedRegion::region`], and passes [`SharedRegion::fd`] to the peer (over a Unix socket,
/// or by inheritance), which maps it with [`SharedRegion::from_fd`] and attaches. The memory
/// stays mapped while this value, a clone, or any ring handle made from its region lives.
#[derive(Clone)]
pub struct SharedRegion {
    map: Arc<Mapping>,
}

impl fmt::Debug for SharedRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedRegion")
            .field("fd", &self.map.fd.as_raw_fd())
            .field("len", &self.map.len)
            .finish()
    }
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

impl SharedRegion {
    /// A new, zero-filled, `len`-byte memfd, sealed against resizing, mapped read-write.
    pub fn create(len: usize) -> io::Result<Self> {
        if len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "shared region of zero bytes",
            ));
        }
        let size = libc::off_t::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "shared region too large"))?;
        // SAFETY: the name is a valid NUL-terminated string; the flags are defined.
        let raw = check(unsafe {
            libc::memfd_create(
                c"bhyve-pipeline".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        })?;
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: plain syscall on a descriptor we own.
        check(unsafe { libc::ftruncate(fd.as_raw_fd(), size) })?;
        // SAFETY: plain syscall on a descriptor we own.
        check(unsafe {
            libc::fcntl(
                fd.as_raw_fd(),
                libc::F_ADD_SEALS,
                REQUIRED_SEALS | libc::F_SEAL_SEAL,
            )
        })?;
        Self::map(fd, len)
    }

    /// Map a region received from the creator. Refuses a descriptor that is not sealed against
    /// shrinking (a peer could otherwise shrink it under us and make us fault).
    pub fn from_fd(fd: OwnedFd) -> io::Result<Self> {
        // SAFETY: plain syscall on a descriptor we own.
        let seals = check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) })?;
        if seals & REQUIRED_SEALS != REQUIRED_SEALS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "shared region is not sealed against resizing",
            ));
        }
        // SAFETY: `stat` is plain old data; all-zero is a valid value.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `st` is a valid out-pointer for the duration of the call.
        check(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
        let len = usize::try_from(st.st_size)
            .ok()
            .filter(|&l| l > 0)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad shared region size"))?;
        Self::map(fd, len)
    }

    fn map(fd: OwnedFd, len: usize) -> io::Result<Self> {
        // SAFETY: a fresh shared mapping of `len` bytes of a file at least that long (sealed);
        // the kernel chooses the address.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(base.cast::<u8>())
            .ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Self {
            map: Arc::new(Mapping { fd, base, len }),
        })
    }

    /// The memfd, to hand to the peer process.
    #[must_use]
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.map.fd.as_fd()
    }

    /// Length in bytes.
    #[must_use]
    pub fn len(&self) -> usize {
        self.map.len
    }

    /// True for an empty region (never, for a successfully created one).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.map.len == 0
    }

    /// The mapping as a [`Region`] to format or attach rings in; it keeps the mapping alive.
    #[must_use]
    pub fn region(&self) -> Region {
        let owner: crate::region::Owner = self.map.clone();
        // SAFETY: `len` bytes at `base` stay mapped while the `Mapping` lives, which every
        // clone of the region keeps alive; this process touches them only through rings.
        unsafe { Region::with_owner(self.map.base, self.map.len, owner) }
    }
}
