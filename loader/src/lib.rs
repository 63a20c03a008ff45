//! Guest loaders: Linux boot protocol (bzImage, ELF vmlinux), PVH and Multiboot v1.
//!
//! A loader writes the kernel, its boot structures and modules into guest memory and returns
//! the CPU state at the kernel's first instruction as plain data ([`EntryState`]); it never
//! touches a vCPU. The vCPU runner turns the entry state into registers.
//!
//! Images are untrusted input: every field taken from an image is checked, every failure is a
//! [`LoaderError`] naming the field, offset or sizes involved, and no input panics. Nothing is
//! written to guest memory until the whole image, command line and module set have been
//! validated and placed.
//!
//! All fixed guest-physical addresses are in [`layout`]. [`acpi`] builds the ACPI tables.
#![warn(
    missing_docs,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap,
    clippy::cast_lossless
)]

pub mod acpi;
mod elf;
mod entry;
mod error;
pub mod layout;
mod linux;
mod mem;
pub mod multiboot;
pub mod pvh;

pub use acpi::{build_acpi, pci_intx_gsi, AcpiConfig};
pub use entry::{
    regs, CpuMode, EntryState, Segment, CODE32_SELECTOR, CODE64_SELECTOR, DATA_SELECTOR,
    GDT_ENTRIES, GDT_LIMIT, TSS_SELECTOR,
};
pub use error::LoaderError;
pub use layout::{E820Entry, E820Type, Hole, MemoryLayout};
pub use multiboot::load_multiboot;
pub use pvh::load_pvh;

use vm_memory::GuestMemory;

/// Most vCPUs a boot configuration may ask for (x2APIC-free APIC IDs 0..=254).
pub const MAX_CPUS: u32 = 254;

/// An image the loaders read: a kernel (whose headers they parse), an initrd or a module (which
/// they copy without looking inside). Bytes in memory, or a file whose loaded parts are read
/// straight into guest memory, so a large image is neither copied twice nor held in the
/// monitor's own memory meanwhile.
#[derive(Debug, Clone, Copy)]
pub enum Blob<'a> {
    /// Bytes already in memory.
    Bytes(&'a [u8]),
    /// The first `len` bytes of `file` (read from its start, whatever its offset). A file
    /// shorter than `len` when it is read is an error ([`LoaderError::GuestWrite`]).
    File {
        /// The open file.
        file: &'a std::fs::File,
        /// Its length, as measured when it was opened.
        len: u64,
    },
}

impl Blob<'_> {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        match self {
            Blob::Bytes(b) => mem::len64(b),
            Blob::File { len, .. } => *len,
        }
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<'a> From<&'a [u8]> for Blob<'a> {
    fn from(b: &'a [u8]) -> Self {
        Blob::Bytes(b)
    }
}

impl<'a, const N: usize> From<&'a [u8; N]> for Blob<'a> {
    fn from(b: &'a [u8; N]) -> Self {
        Blob::Bytes(b)
    }
}

impl<'a> From<&'a Vec<u8>> for Blob<'a> {
    fn from(b: &'a Vec<u8>) -> Self {
        Blob::Bytes(b)
    }
}

/// A multiboot or PVH module: its contents and its command line.
#[derive(Debug, Clone, Copy)]
pub struct BootModule<'a> {
    /// Module contents.
    pub data: Blob<'a>,
    /// Module command line (the multiboot `string`, the PVH module `cmdline_paddr`).
    pub cmdline: &'a str,
}

/// What to boot with: command line, initrd/modules, memory size, CPU count.
#[derive(Debug, Clone, Copy)]
pub struct BootConfig<'a> {
    /// Kernel command line (no NUL bytes).
    pub cmdline: &'a str,
    /// Initramfs. Linux: `ramdisk_image`; PVH and multiboot: module 0 (empty command line).
    pub initrd: Option<Blob<'a>>,
    /// Further modules (PVH and multiboot only; the Linux protocol refuses them).
    pub modules: &'a [BootModule<'a>],
    /// Guest RAM in bytes; the memory map is [`MemoryLayout::new`]`(mem_size)`.
    pub mem_size: u64,
    /// Number of vCPUs (1..=[`MAX_CPUS`]). Validated only: the loaders build no MP or ACPI
    /// tables, so a guest learns its CPUs from whatever tables the VMM adds ([`build_acpi`]).
    pub ncpus: u32,
    /// Guest-physical address of the ACPI RSDP, if the VMM built ACPI tables
    /// (Linux: `boot_params.acpi_rsdp_addr`; PVH: `rsdp_paddr`).
    pub rsdp_addr: Option<u64>,
}

impl<'a> BootConfig<'a> {
    /// A configuration with `mem_size` bytes of RAM, one vCPU, the given command line, no initrd,
    /// no modules and no RSDP.
    pub fn new(mem_size: u64, cmdline: &'a str) -> Self {
        BootConfig {
            cmdline,
            initrd: None,
            modules: &[],
            mem_size,
            ncpus: 1,
            rsdp_addr: None,
        }
    }

    /// Validates the configuration and builds its memory layout.
    pub fn layout(&self) -> Result<MemoryLayout, LoaderError> {
        if self.ncpus == 0 || self.ncpus > MAX_CPUS {
            return Err(LoaderError::CpuCount {
                ncpus: self.ncpus,
                max: MAX_CPUS,
            });
        }
        MemoryLayout::new(self.mem_size)
    }

    /// The initrd (as module 0, if any) followed by `modules`.
    fn module_list(&self) -> Vec<BootModule<'a>> {
        self.initrd
            .map(|data| BootModule { data, cmdline: "" })
            .into_iter()
            .chain(self.modules.iter().copied())
            .collect()
    }
}

/// The kinds of kernel image the loaders understand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageKind {
    /// Linux bzImage ("HdrS" at 0x202): 64-bit Linux boot protocol.
    BzImage,
    /// ELF (32 or 64) with a PVH entry note: PVH boot.
    ElfPvh,
    /// Image with a multiboot v1 header (ELF or a.out kludge) and no PVH note.
    Multiboot,
    /// ELF64 without PVH note or multiboot header: Linux 64-bit entry at the ELF entry.
    ElfVmlinux,
    /// None of the above, or an ELF too malformed to classify.
    Unknown,
}

/// Classifies an image; errors come from a malformed ELF or multiboot header, or from reading
/// the image's file.
fn classify(image: Blob<'_>) -> Result<ImageKind, LoaderError> {
    let head = mem::image_prefix(image, multiboot::MULTIBOOT_READ)?;
    if linux::has_bzimage_magic(&head) {
        return Ok(ImageKind::BzImage);
    }
    let parsed = elf::has_elf_magic(&head).then(|| elf::ElfImage::parse(image));
    if let Some(Ok(e)) = &parsed {
        if e.pvh_entry()?.is_some() {
            return Ok(ImageKind::ElfPvh);
        }
    }
    if multiboot::find_header(&head)?.is_some() {
        return Ok(ImageKind::Multiboot);
    }
    match parsed {
        Some(Ok(e)) if e.class == elf::ElfClass::Elf64 => Ok(ImageKind::ElfVmlinux),
        Some(Ok(_)) => Err(LoaderError::Elf32WithoutPvh),
        Some(Err(e)) => Err(e),
        None => Err(LoaderError::UnknownImage { len: image.len() }),
    }
}

/// Recognises an image: bzImage magic first, then an ELF PVH note, then a multiboot header,
/// then a plain ELF64. Malformed (or unreadable) images are [`ImageKind::Unknown`]; the loaders
/// report why.
pub fn detect<'k>(image: impl Into<Blob<'k>>) -> ImageKind {
    classify(image.into()).unwrap_or(ImageKind::Unknown)
}

/// Where a kernel was loaded and how to enter it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedKernel {
    /// The protocol used.
    pub kind: ImageKind,
    /// CPU state at the kernel's first instruction.
    pub entry: EntryState,
    /// Lowest guest address of the kernel image.
    pub kernel_start: u64,
    /// End (exclusive) of the memory the kernel occupies (bzImage: including `init_size`).
    pub kernel_end: u64,
    /// Initrd (address, size), if one was loaded.
    pub initrd: Option<(u64, u64)>,
    /// Every module placed, (address, size), in order: the initrd first when given.
    pub modules: Vec<(u64, u64)>,
    /// The memory map given to the guest.
    pub layout: MemoryLayout,
}

/// Loads a Linux kernel: a bzImage through the 64-bit boot protocol; an ELF with a PVH note
/// through PVH; an ELF64 vmlinux without one at its ELF entry through the 64-bit boot protocol.
///
/// `kernel` is bytes in memory or a file ([`Blob`]): a file's headers are read to parse them,
/// and what is loaded is read straight into guest memory, so the monitor never holds the image
/// (nor reads what is not loaded: an unstripped vmlinux's symbols and debug information).
pub fn load_linux<'k, M: GuestMemory + ?Sized>(
    mem: &M,
    kernel: impl Into<Blob<'k>>,
    cfg: &BootConfig<'_>,
) -> Result<LoadedKernel, LoaderError> {
    let kernel = kernel.into();
    let head = mem::image_prefix(kernel, linux::SETUP_HEADER_READ)?;
    if linux::has_bzimage_magic(&head) {
        return linux::load_bzimage(mem, kernel, cfg);
    }
    if !elf::has_elf_magic(&head) {
        return Err(LoaderError::NotLinux { len: kernel.len() });
    }
    let parsed = elf::ElfImage::parse(kernel)?;
    if parsed.pvh_entry()?.is_some() {
        load_pvh(mem, kernel, cfg)
    } else {
        linux::load_vmlinux(mem, kernel, cfg)
    }
}

/// Loads any supported image, chosen as [`detect`] does: bzImage, PVH, multiboot, ELF64
/// vmlinux. `kernel` is bytes or a file, as for [`load_linux`].
pub fn load_kernel<'k, M: GuestMemory + ?Sized>(
    mem: &M,
    kernel: impl Into<Blob<'k>>,
    cfg: &BootConfig<'_>,
) -> Result<LoadedKernel, LoaderError> {
    let kernel = kernel.into();
    match classify(kernel)? {
        ImageKind::BzImage => linux::load_bzimage(mem, kernel, cfg),
        ImageKind::ElfPvh => load_pvh(mem, kernel, cfg),
        ImageKind::Multiboot => load_multiboot(mem, kernel, cfg),
        ImageKind::ElfVmlinux => linux::load_vmlinux(mem, kernel, cfg),
        ImageKind::Unknown => Err(LoaderError::UnknownImage { len: kernel.len() }),
    }
}
