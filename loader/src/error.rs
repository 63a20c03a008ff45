//! The crate's error type.
//!
//! Every message names the part of the image or configuration that is wrong (field, offset,
//! sizes), so an operator can tell a truncated download from a wrong file from a too-small VM.

use vm_memory::GuestMemoryError;

/// Why a kernel image could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    // ---- memory layout and configuration ----
    /// The configured RAM size is too small for the loader's fixed layout.
    #[error("RAM size {size:#x} is below the minimum of {min:#x} bytes")]
    RamTooSmall {
        /// Requested RAM size in bytes.
        size: u64,
        /// Smallest supported RAM size.
        min: u64,
    },
    /// The configured RAM size is larger than the loader supports.
    #[error("RAM size {size:#x} exceeds the maximum of {max:#x} bytes")]
    RamTooLarge {
        /// Requested RAM size in bytes.
        size: u64,
        /// Largest supported RAM size.
        max: u64,
    },
    /// The configured RAM size is not page-granular.
    #[error("RAM size {size:#x} is not a multiple of 4 KiB")]
    RamUnaligned {
        /// Requested RAM size in bytes.
        size: u64,
    },
    /// The guest memory object does not cover a RAM range of the layout.
    #[error("Guest memory does not back RAM range {start:#x}..{end:#x} of the {mem_size:#x}-byte layout")]
    MemoryNotBacked {
        /// First address of the missing range.
        start: u64,
        /// End (exclusive) of the missing range.
        end: u64,
        /// RAM size the layout was built for.
        mem_size: u64,
    },
    /// Writing to guest memory failed.
    #[error("Writing {len:#x} bytes of {what} at guest address {addr:#x} failed")]
    GuestWrite {
        /// What was being written.
        what: &'static str,
        /// Guest-physical address of the write.
        addr: u64,
        /// Length of the write.
        len: u64,
        /// The guest memory error.
        #[source]
        source: GuestMemoryError,
    },
    /// Reading the image file failed: it shrank, or became unreadable, after it was opened.
    #[error("Reading {len:#x} bytes of the image at file offset {offset:#x} failed: {source}")]
    ImageRead {
        /// File offset of the read.
        offset: u64,
        /// Length of the read.
        len: u64,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The vCPU count is out of range.
    #[error("vCPU count {ncpus} is out of range (1..={max})")]
    CpuCount {
        /// Requested vCPU count.
        ncpus: u32,
        /// Largest supported count.
        max: u32,
    },

    /// A value that must fit a 32-bit boot-protocol field does not.
    #[error("{what} at {addr:#x} does not fit the 32-bit field the boot protocol gives it")]
    AddressAbove4G {
        /// What the address is.
        what: &'static str,
        /// The address.
        addr: u64,
    },
    /// The kernel lies beyond the loader's identity page tables.
    #[error("Kernel {start:#x}..{end:#x} is beyond the identity-mapped first {limit:#x} bytes the 64-bit entry gets")]
    NotIdentityMapped {
        /// Kernel start.
        start: u64,
        /// Kernel end (exclusive).
        end: u64,
        /// End of the identity map.
        limit: u64,
    },

    // ---- ACPI tables ----
    /// The ACPI tables do not fit the area the layout gives them.
    #[error("ACPI tables need {need:#x} bytes from {start:#x} but the ACPI area ends at {end:#x}")]
    AcpiTablesTooLarge {
        /// First address of the ACPI area.
        start: u64,
        /// Bytes the tables need.
        need: u64,
        /// End (exclusive) of the ACPI area.
        end: u64,
    },

    // ---- recognising the image ----
    /// The image is not any kind of kernel this crate knows.
    #[error("Unrecognised kernel image ({len:#x} bytes): no bzImage \"HdrS\" magic at 0x202, no ELF magic, no multiboot header")]
    UnknownImage {
        /// Image length in bytes.
        len: u64,
    },
    /// The image is not a Linux kernel (neither bzImage nor ELF).
    #[error(
        "Not a Linux kernel ({len:#x} bytes): no bzImage \"HdrS\" magic at 0x202 and no ELF magic"
    )]
    NotLinux {
        /// Image length in bytes.
        len: u64,
    },
    /// A 32-bit ELF without a PVH note has no entry the Linux boot protocol can use.
    #[error("ELF32 image has no PVH entry note; the Linux 64-bit entry needs an ELF64 vmlinux")]
    Elf32WithoutPvh,

    // ---- bzImage ----
    /// The bzImage ends before a part the header describes.
    #[error("Truncated bzImage: {what} needs {need:#x} bytes but the image has {len:#x}")]
    BzImageTruncated {
        /// The part that is cut off.
        what: &'static str,
        /// Image length needed for that part.
        need: u64,
        /// Actual image length.
        len: u64,
    },
    /// Boot protocol too old for the 64-bit entry.
    #[error("bzImage boot protocol version {}.{:02} is too old (2.06 or later required)", version >> 8, version & 0xff)]
    BzImageVersion {
        /// The header's `version` field.
        version: u16,
    },
    /// The setup header is shorter than its version promises.
    #[error("bzImage setup header ends at {end:#x}, before the cmdline_size field its version 2.06+ needs (0x23c)")]
    BzImageHeaderShort {
        /// End of the header (0x202 + byte at 0x201).
        end: u64,
    },
    /// `setup_sects` claims more real-mode setup code than can exist.
    #[error("bzImage setup_sects {sects} is absurd: the setup code must fit in 32 KiB (at most 63 sectors)")]
    BzImageSetupSects {
        /// The header's `setup_sects` field.
        sects: u8,
    },
    /// The kernel must be loaded high (bzImage, not zImage).
    #[error(
        "bzImage loadflags {loadflags:#04x} lack LOADED_HIGH: zImage kernels are not supported"
    )]
    BzImageNotLoadedHigh {
        /// The header's `loadflags` field.
        loadflags: u8,
    },
    /// The kernel declares no 64-bit entry point.
    #[error("bzImage xloadflags {xloadflags:#06x} lack XLF_KERNEL_64: the kernel has no 64-bit entry point")]
    BzImageNo64BitEntry {
        /// The header's `xloadflags` field.
        xloadflags: u16,
    },
    /// The kernel does not fit in RAM below the MMIO hole.
    #[error("Kernel needs memory {start:#x}..{end:#x} but RAM below 4 GiB ends at {ram_end:#x}")]
    KernelTooLarge {
        /// Load address.
        start: u64,
        /// End (exclusive) of what the kernel needs, including `init_size`.
        end: u64,
        /// End of RAM below the 32-bit MMIO hole.
        ram_end: u64,
    },

    // ---- command line, initrd, modules ----
    /// The command line is longer than the kernel (or loader area) accepts.
    #[error("Command line is {len} bytes, longer than the limit of {max} bytes")]
    CmdlineTooLong {
        /// Length of the command line (without NUL).
        len: u64,
        /// Longest accepted command line (without NUL).
        max: u64,
    },
    /// A string for the guest contains a NUL byte.
    #[error("{what} contains a NUL byte at offset {offset}")]
    StringHasNul {
        /// Which string.
        what: &'static str,
        /// Offset of the NUL.
        offset: u64,
    },
    /// The initrd is larger than the whole guest memory.
    #[error("Initrd is {initrd:#x} bytes but guest memory is only {ram:#x} bytes")]
    InitrdLargerThanRam {
        /// Initrd size.
        initrd: u64,
        /// Guest RAM size.
        ram: u64,
    },
    /// A module (initrd) cannot be placed in the free RAM.
    #[error("Module {index} ({size:#x} bytes) does not fit in free RAM {low:#x}..{high:#x}")]
    ModuleNoRoom {
        /// Index in the module list (the initrd is module 0).
        index: u64,
        /// Module size.
        size: u64,
        /// Lowest usable address (end of the kernel or previous module).
        low: u64,
        /// Highest usable address (exclusive).
        high: u64,
    },
    /// Too many modules for the loader's fixed tables.
    #[error("{count} modules given but at most {max} are supported")]
    TooManyModules {
        /// Modules given.
        count: u64,
        /// Table capacity.
        max: u64,
    },
    /// Module strings do not fit their area.
    #[error("Module strings need at least {len} bytes, more than the {max}-byte string area")]
    ModuleStringsTooLong {
        /// Length needed up to and including the string that overflowed, NULs included.
        len: u64,
        /// Size of the area.
        max: u64,
    },
    /// The Linux boot protocol has no module list.
    #[error("The Linux boot protocol takes one initrd, not a module list ({count} modules given)")]
    LinuxModules {
        /// Modules given.
        count: u64,
    },

    // ---- ELF ----
    /// The ELF image ends before a structure it describes.
    #[error("Truncated ELF: {what} ends at {need:#x} but the image has {len:#x} bytes")]
    ElfTruncated {
        /// The structure that is cut off.
        what: &'static str,
        /// Needed image length.
        need: u64,
        /// Actual image length.
        len: u64,
    },
    /// Bad ELF magic.
    #[error("Not an ELF image: no \"\\x7fELF\" magic at offset 0")]
    NotElf,
    /// Unknown ELF class.
    #[error("ELF class {class} is neither ELF32 (1) nor ELF64 (2)")]
    ElfClass {
        /// `e_ident[EI_CLASS]`.
        class: u8,
    },
    /// Not little-endian.
    #[error("ELF data encoding {data} is not little-endian (1)")]
    ElfEndian {
        /// `e_ident[EI_DATA]`.
        data: u8,
    },
    /// Not an executable.
    #[error("ELF type {e_type} is not an executable (2)")]
    ElfType {
        /// `e_type`.
        e_type: u16,
    },
    /// Wrong machine for the class.
    #[error("ELF machine {machine} is not {expected} for this ELF class")]
    ElfMachine {
        /// `e_machine`.
        machine: u16,
        /// Expected machine name.
        expected: &'static str,
    },
    /// Program header entry size does not match the class.
    #[error(
        "ELF e_phentsize {size} does not match the {expected}-byte program header of this class"
    )]
    ElfPhentsize {
        /// `e_phentsize`.
        size: u16,
        /// Expected size.
        expected: u16,
    },
    /// A program header is inconsistent.
    #[error("ELF program header {index}: {what}")]
    ElfSegment {
        /// Program header index.
        index: u64,
        /// What is wrong.
        what: &'static str,
    },
    /// No loadable segments.
    #[error("ELF image has no loadable (PT_LOAD) segments")]
    ElfNoLoadSegments,
    /// A note is malformed.
    #[error("Malformed ELF note at file offset {offset:#x}: {what}")]
    ElfNote {
        /// File offset of the note header.
        offset: u64,
        /// What is wrong.
        what: &'static str,
    },
    /// PVH requested but the image has no PVH note.
    #[error("ELF image has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY, type 18, name \"Xen\")")]
    PvhNoteMissing,
    /// PVH note descriptor has the wrong size.
    #[error("PVH entry note descriptor is {size} bytes (4 or 8 expected)")]
    PvhNoteDescSize {
        /// `n_descsz`.
        size: u32,
    },

    // ---- placement of loaded code ----
    /// A segment is not inside guest RAM.
    #[error("Kernel segment {start:#x}..{end:#x} is not inside guest RAM")]
    SegmentNotInRam {
        /// Segment start.
        start: u64,
        /// Segment end (exclusive).
        end: u64,
    },
    /// A segment overlaps an area the loader or the platform owns.
    #[error(
        "Kernel segment {start:#x}..{end:#x} overlaps the {area} at {area_start:#x}..{area_end:#x}"
    )]
    SegmentOverlapsReserved {
        /// Segment start.
        start: u64,
        /// Segment end (exclusive).
        end: u64,
        /// The area it overlaps.
        area: &'static str,
        /// Area start.
        area_start: u64,
        /// Area end (exclusive).
        area_end: u64,
    },
    /// The entry point is outside the loaded image.
    #[error("Entry point {entry:#x} is outside every loaded segment")]
    EntryOutsideImage {
        /// The entry point.
        entry: u64,
    },
    /// A 32-bit entry point above 4 GiB.
    #[error("Entry point {entry:#x} is above 4 GiB, out of reach of a 32-bit entry")]
    EntryAbove4G {
        /// The entry point.
        entry: u64,
    },

    // ---- multiboot ----
    /// No multiboot header found.
    #[error("No multiboot header (magic 0x1BADB002 with a valid checksum) in the first {searched} bytes")]
    MultibootHeaderMissing {
        /// Bytes searched.
        searched: u64,
    },
    /// The header runs past the end of the image.
    #[error(
        "Multiboot header at offset {offset:#x} needs {need} bytes but the image ends at {len:#x}"
    )]
    MultibootHeaderTruncated {
        /// Header offset in the file.
        offset: u64,
        /// Header length its flags require.
        need: u64,
        /// Image length.
        len: u64,
    },
    /// The header requires features this loader does not provide.
    #[error("Multiboot header flags {flags:#x} require unsupported features (bits {unsupported:#x}; only bits 0, 1 and 16 are supported)")]
    MultibootUnsupportedFlags {
        /// The header's flags.
        flags: u32,
        /// The unsupported required bits.
        unsupported: u32,
    },
    /// The a.out kludge addresses are inconsistent.
    #[error("Multiboot a.out kludge: {what} (header_addr {header_addr:#x}, load_addr {load_addr:#x}, load_end_addr {load_end_addr:#x}, bss_end_addr {bss_end_addr:#x})")]
    MultibootAout {
        /// What is wrong.
        what: &'static str,
        /// `header_addr`.
        header_addr: u32,
        /// `load_addr`.
        load_addr: u32,
        /// `load_end_addr`.
        load_end_addr: u32,
        /// `bss_end_addr`.
        bss_end_addr: u32,
    },
    /// Without the a.out kludge the image must be a valid ELF.
    #[error("Multiboot image has no a.out kludge (flags bit 16), so it must be a valid ELF")]
    MultibootNotElf {
        /// Why ELF parsing failed.
        #[source]
        source: Box<LoaderError>,
    },
}

impl LoaderError {
    /// Whether reading an image's file failed (a header read, or a part read straight into guest
    /// memory: the file shrank or its file system failed), rather than the image being wrong or
    /// not fitting.
    pub fn is_file_read_failure(&self) -> bool {
        matches!(
            self,
            LoaderError::ImageRead { .. }
                | LoaderError::GuestWrite {
                    source: GuestMemoryError::IOError(_) | GuestMemoryError::PartialBuffer { .. },
                    ..
                }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_read_failure_is_told_from_a_bad_image() {
        let io = || std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
        let write = |source| LoaderError::GuestWrite {
            what: "ELF segment",
            addr: 0x10_0000,
            len: 4096,
            source,
        };
        assert!(LoaderError::ImageRead {
            offset: 0,
            len: 64,
            source: io()
        }
        .is_file_read_failure());
        assert!(write(GuestMemoryError::IOError(io())).is_file_read_failure());
        assert!(write(GuestMemoryError::PartialBuffer {
            expected: 4096,
            completed: 100
        })
        .is_file_read_failure());
        let address = GuestMemoryError::InvalidGuestAddress(vm_memory::GuestAddress(0));
        assert!(!write(address).is_file_read_failure());
        assert!(!LoaderError::NotElf.is_file_read_failure());
    }
}
