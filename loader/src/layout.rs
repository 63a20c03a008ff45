//! Fixed guest-physical addresses and the guest memory map.
//!
//! Everything the loaders write outside the kernel image lives at a fixed address in low memory,
//! below [`LOADER_AREA_END`]. Page 0 is left untouched so application processors can later start
//! at SIPI vector 0.
//!
//! | Address range                 | Contents                                                    |
//! |-------------------------------|-------------------------------------------------------------|
//! | `0x0000_0000..0x0000_1000`    | untouched: real-mode IVT/BDA, AP start-up page (vector 0)   |
//! | `0x0000_1000..0x0000_1030`    | boot GDT: null, code32 `0x08`, code64 `0x10`, data `0x18`, TSS `0x20` (16 bytes, base 0, limit 0x67) |
//! | `0x0000_5000..0x0000_5038`    | PVH `hvm_start_info`                                        |
//! | `0x0000_5040..0x0000_6000`    | PVH module list (`hvm_modlist_entry`, initrd is module 0)  |
//! | `0x0000_6000..0x0000_7000`    | PVH memory map (`hvm_memmap_table_entry`)                   |
//! | `0x0000_7000..0x0000_8000`    | Linux zero page (`boot_params`)                             |
//! | `0x0000_8000..0x0000_8078`    | Multiboot information structure (mbi)                       |
//! | `0x0000_8080..0x0000_8100`    | Multiboot boot loader name                                  |
//! | `0x0000_8100..0x0000_8800`    | Multiboot memory map                                        |
//! | `0x0000_8800..0x0000_9000`    | Multiboot module list                                       |
//! | `0x0000_9000..0x0000_a000`    | PML4 (64-bit entry only)                                    |
//! | `0x0000_a000..0x0000_b000`    | PDPT                                                        |
//! | `0x0000_b000..0x0000_f000`    | 4 page directories: identity map of 0..4 GiB, 2 MiB pages   |
//! | `0x0001_0000..0x0002_0000`    | boot stack (`rsp` = `0x1fff0`)                              |
//! | `0x0002_0000..0x0003_0000`    | kernel command line                                         |
//! | `0x0003_0000..0x0004_0000`    | module command lines (PVH, multiboot)                       |
//! | `0x0004_0000..0x0009_fc00`    | free RAM (a kernel may load here if it asks)                |
//! | `0x0009_fc00..0x0010_0000`    | reserved: EBDA, VGA, option ROMs, BIOS                      |
//! | `0x000f_0000..0x000f_2400`    | (kept free for an MP table, where bhyve puts its `mptbl`)   |
//! | `0x000f_2400..0x0010_0000`    | ACPI tables: RSDP at `0xf_2400` (bhyve's address, found by the 0xE0000..0xFFFFF scan), then XSDT, FADT, FACS, MADT, HPET, MCFG, DSDT packed after it ([`crate::acpi`]) |
//! | `0x0010_0000..`               | kernel (bzImage at 1 MiB or `pref_address`, ELF at `p_paddr`) |
//! | initrd / PVH modules          | page-aligned, as high as possible below min(`initrd_addr_max` + 1, RAM end below 4 GiB) |
//! | multiboot modules             | page-aligned, one after another above the kernel's end      |
//! | `0xc000_0000..0x1_0000_0000`  | 32-bit MMIO hole (not RAM, a gap in the memory map)         |
//! | `0xc000_0000..0xe000_0000`    | PCI 32-bit memory window (the DSDT root bridge `_CRS`)      |
//! | `0xe000_0000..0xf000_0000`    | PCI ECAM, segment 0, buses 0–255 (the MCFG; bhyve's `PCI_EMUL_ECFG_BASE`) |
//! | `0xfec0_0000`                 | I/O APIC                                                    |
//! | `0xfed0_0000`                 | HPET                                                        |
//! | `0xfee0_0000`                 | local APIC                                                  |
//! | `0x1_0000_0000..`             | RAM beyond 3 GiB continues here                             |

use vm_memory::GuestAddress;

use crate::LoaderError;

/// Size of a small page.
pub const PAGE_SIZE: u64 = 0x1000;
/// Page 0: left untouched (real-mode IVT/BDA; AP start-up at SIPI vector 0).
pub const AP_STARTUP_PAGE: u64 = 0x0;
/// Boot GDT.
pub const GDT_ADDR: u64 = 0x1000;
/// PVH `hvm_start_info`.
pub const PVH_START_INFO_ADDR: u64 = 0x5000;
/// PVH module list.
pub const PVH_MODLIST_ADDR: u64 = 0x5040;
/// End of the PVH module list area.
pub const PVH_MODLIST_END: u64 = 0x6000;
/// PVH memory map.
pub const PVH_MEMMAP_ADDR: u64 = 0x6000;
/// End of the PVH memory map area.
pub const PVH_MEMMAP_END: u64 = 0x7000;
/// Linux zero page (`boot_params`).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Multiboot information structure.
pub const MBI_ADDR: u64 = 0x8000;
/// Multiboot boot loader name string.
pub const MB_LOADER_NAME_ADDR: u64 = 0x8080;
/// Multiboot memory map.
pub const MB_MMAP_ADDR: u64 = 0x8100;
/// End of the multiboot memory map area.
pub const MB_MMAP_END: u64 = 0x8800;
/// Multiboot module list.
pub const MB_MODS_ADDR: u64 = 0x8800;
/// End of the multiboot module list area.
pub const MB_MODS_END: u64 = 0x9000;
/// PML4 of the identity page tables.
pub const PML4_ADDR: u64 = 0x9000;
/// PDPT of the identity page tables.
pub const PDPT_ADDR: u64 = 0xa000;
/// First of the page directories (one per GiB).
pub const PD_ADDR: u64 = 0xb000;
/// Number of page directories: the identity map covers `PD_COUNT` GiB.
pub const PD_COUNT: u64 = 4;
/// Bottom of the boot stack.
pub const BOOT_STACK_BOTTOM: u64 = 0x1_0000;
/// Initial stack pointer (16-byte aligned, just below the command line).
pub const BOOT_STACK_POINTER: u64 = 0x1_fff0;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// Size of the command line area, including the terminating NUL.
pub const CMDLINE_AREA_SIZE: u64 = 0x1_0000;
/// Module command lines.
pub const MODULE_STRINGS_ADDR: u64 = 0x3_0000;
/// Size of the module command line area.
pub const MODULE_STRINGS_SIZE: u64 = 0x1_0000;
/// Everything the loader writes in low memory is below this address.
pub const LOADER_AREA_END: u64 = 0x4_0000;
/// Start of the EBDA / legacy reserved area.
pub const EBDA_START: u64 = 0x9_fc00;
/// Start of high memory (1 MiB).
pub const HIGH_MEMORY_START: u64 = 0x10_0000;
/// Default bzImage load address (1 MiB).
pub const KERNEL_LOAD_ADDR: u64 = HIGH_MEMORY_START;
/// Start of the 32-bit MMIO hole.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole (4 GiB).
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// I/O APIC base.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// HPET base.
pub const HPET_ADDR: u64 = 0xfed0_0000;
/// Local APIC base.
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// Start of the legacy BIOS area an OS scans for the RSDP (ACPI: 0xE0000..0xFFFFF).
pub const BIOS_AREA_START: u64 = 0xe_0000;
/// Kept free for an MP table (bhyve's `MPTABLE_BASE`); the ACPI tables start after it.
pub const MPTABLE_ADDR: u64 = 0xf_0000;
/// ACPI RSDP, the first byte of the ACPI table area (bhyve's `BHYVE_ACPI_BASE`).
pub const ACPI_RSDP_ADDR: u64 = 0xf_2400;
/// End (exclusive) of the ACPI table area: the end of the BIOS area.
pub const ACPI_AREA_END: u64 = HIGH_MEMORY_START;
/// PCI 32-bit memory window (BARs), from the start of the MMIO hole up to the ECAM.
pub const PCI_MMIO32_START: u64 = MMIO_HOLE_START;
/// End (exclusive) of the PCI 32-bit memory window.
pub const PCI_MMIO32_END: u64 = PCI_ECAM_ADDR;
/// PCI ECAM (enhanced configuration access) base, segment 0 (bhyve's `PCI_EMUL_ECFG_BASE`).
pub const PCI_ECAM_ADDR: u64 = 0xe000_0000;
/// PCI ECAM size: 1 MiB per bus, buses 0–255.
pub const PCI_ECAM_SIZE: u64 = 0x1000_0000;
/// Smallest RAM size the loaders accept (2 MiB).
pub const MIN_RAM_SIZE: u64 = 0x20_0000;
/// Largest RAM size the loaders accept (1 TiB).
pub const MAX_RAM_SIZE: u64 = 1 << 40;

// Each fixed structure ends before the next one starts (checked at compile time).
const _: () =
    assert!(GDT_ADDR >= AP_STARTUP_PAGE + PAGE_SIZE && GDT_ADDR + 0x30 <= PVH_START_INFO_ADDR);
const _: () = assert!(PVH_START_INFO_ADDR + 0x38 <= PVH_MODLIST_ADDR);
const _: () = assert!(PVH_MODLIST_END <= PVH_MEMMAP_ADDR && PVH_MEMMAP_END <= ZERO_PAGE_ADDR);
const _: () = assert!(ZERO_PAGE_ADDR + PAGE_SIZE <= MBI_ADDR);
const _: () = assert!(MBI_ADDR + 0x78 <= MB_LOADER_NAME_ADDR);
const _: () = assert!(MB_MODS_END <= PML4_ADDR && PML4_ADDR + PAGE_SIZE <= PDPT_ADDR);
const _: () = assert!(PDPT_ADDR + PAGE_SIZE <= PD_ADDR);
const _: () = assert!(PD_ADDR + PD_COUNT * PAGE_SIZE <= BOOT_STACK_BOTTOM);
const _: () = assert!(BOOT_STACK_POINTER < CMDLINE_ADDR);
const _: () = assert!(CMDLINE_ADDR + CMDLINE_AREA_SIZE <= MODULE_STRINGS_ADDR);
const _: () = assert!(MODULE_STRINGS_ADDR + MODULE_STRINGS_SIZE <= LOADER_AREA_END);
const _: () = assert!(LOADER_AREA_END <= EBDA_START);
// The ACPI tables sit in the reserved legacy area, inside the window an OS scans for the RSDP, with
// the RSDP on the 16-byte boundary the scan requires.
const _: () = assert!(EBDA_START <= BIOS_AREA_START && BIOS_AREA_START <= MPTABLE_ADDR);
const _: () = assert!(MPTABLE_ADDR < ACPI_RSDP_ADDR && ACPI_RSDP_ADDR % 16 == 0);
const _: () = assert!(ACPI_AREA_END == HIGH_MEMORY_START);
// The PCI windows lie in the MMIO hole, below the I/O APIC, HPET and local APIC.
const _: () = assert!(MMIO_HOLE_START <= PCI_MMIO32_START && PCI_MMIO32_START < PCI_MMIO32_END);
const _: () = assert!(PCI_MMIO32_END <= PCI_ECAM_ADDR);
const _: () = assert!(PCI_ECAM_ADDR + PCI_ECAM_SIZE <= IOAPIC_ADDR);
const _: () =
    assert!(IOAPIC_ADDR < HPET_ADDR && HPET_ADDR < LAPIC_ADDR && LAPIC_ADDR < MMIO_HOLE_END);

/// Type of a memory-map entry (the e820 numbering, shared by PVH and multiboot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum E820Type {
    /// Usable RAM.
    Ram,
    /// Reserved, not usable.
    Reserved,
    /// ACPI reclaimable.
    Acpi,
    /// ACPI non-volatile storage.
    Nvs,
    /// Unusable.
    Unusable,
}

impl E820Type {
    /// The numeric value used in e820, `hvm_memmap_table_entry` and multiboot mmap entries.
    pub fn raw(self) -> u32 {
        match self {
            E820Type::Ram => 1,
            E820Type::Reserved => 2,
            E820Type::Acpi => 3,
            E820Type::Nvs => 4,
            E820Type::Unusable => 5,
        }
    }
}

/// One entry of the guest memory map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// First address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Type.
    pub kind: E820Type,
}

impl E820Entry {
    /// End address (exclusive).
    pub fn end(&self) -> u64 {
        self.addr.saturating_add(self.size)
    }
}

/// An address range that is not RAM even though it lies below the top of RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hole {
    /// First address.
    pub start: u64,
    /// Length in bytes.
    pub size: u64,
    /// What lives there.
    pub name: &'static str,
}

impl Hole {
    /// End address (exclusive).
    pub fn end(&self) -> u64 {
        self.start.saturating_add(self.size)
    }
}

/// The guest-physical memory map for a given RAM size.
///
/// RAM starts at 0. Up to 3 GiB it is contiguous (with the legacy area 0x9fc00..1 MiB reported
/// reserved); RAM beyond 3 GiB continues at 4 GiB, leaving the 32-bit MMIO hole free.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryLayout {
    mem_size: u64,
    e820: Vec<E820Entry>,
    holes: Vec<Hole>,
}

impl MemoryLayout {
    /// Builds the layout for `mem_size` bytes of RAM.
    ///
    /// `mem_size` must be a multiple of 4 KiB, at least [`MIN_RAM_SIZE`] and at most
    /// [`MAX_RAM_SIZE`].
    pub fn new(mem_size: u64) -> Result<Self, LoaderError> {
        if mem_size < MIN_RAM_SIZE {
            return Err(LoaderError::RamTooSmall {
                size: mem_size,
                min: MIN_RAM_SIZE,
            });
        }
        if mem_size > MAX_RAM_SIZE {
            return Err(LoaderError::RamTooLarge {
                size: mem_size,
                max: MAX_RAM_SIZE,
            });
        }
        if mem_size % PAGE_SIZE != 0 {
            return Err(LoaderError::RamUnaligned { size: mem_size });
        }
        let low_end = mem_size.min(MMIO_HOLE_START);
        let mut e820 = vec![
            E820Entry {
                addr: 0,
                size: EBDA_START,
                kind: E820Type::Ram,
            },
            E820Entry {
                addr: EBDA_START,
                size: HIGH_MEMORY_START - EBDA_START,
                kind: E820Type::Reserved,
            },
            E820Entry {
                addr: HIGH_MEMORY_START,
                size: low_end - HIGH_MEMORY_START,
                kind: E820Type::Ram,
            },
        ];
        let mut holes = vec![Hole {
            start: EBDA_START,
            size: HIGH_MEMORY_START - EBDA_START,
            name: "legacy EBDA/VGA/BIOS area",
        }];
        if mem_size > MMIO_HOLE_START {
            e820.push(E820Entry {
                addr: MMIO_HOLE_END,
                size: mem_size - MMIO_HOLE_START,
                kind: E820Type::Ram,
            });
            holes.push(Hole {
                start: MMIO_HOLE_START,
                size: MMIO_HOLE_END - MMIO_HOLE_START,
                name: "32-bit MMIO hole",
            });
        }
        Ok(MemoryLayout {
            mem_size,
            e820,
            holes,
        })
    }

    /// Total RAM in bytes.
    pub fn mem_size(&self) -> u64 {
        self.mem_size
    }

    /// The memory map handed to the guest (e820, PVH memmap, multiboot mmap), sorted by address.
    pub fn e820(&self) -> &[E820Entry] {
        &self.e820
    }

    /// Ranges below the top of RAM that are not usable RAM.
    pub fn holes(&self) -> &[Hole] {
        &self.holes
    }

    /// End (exclusive) of RAM below the 32-bit MMIO hole.
    pub fn low_ram_end(&self) -> u64 {
        self.mem_size.min(MMIO_HOLE_START)
    }

    /// End (exclusive) of the highest RAM address.
    pub fn ram_end(&self) -> u64 {
        if self.mem_size > MMIO_HOLE_START {
            MMIO_HOLE_END + (self.mem_size - MMIO_HOLE_START)
        } else {
            self.mem_size
        }
    }

    /// The RAM ranges to back with host memory, in the form
    /// `GuestMemoryMmap::from_ranges` takes (the legacy area is backed: it is reserved, not absent).
    pub fn ram_ranges(&self) -> Vec<(GuestAddress, usize)> {
        let mut ranges = Vec::with_capacity(2);
        let low = self.low_ram_end();
        // Sizes are at most MAX_RAM_SIZE (1 TiB), which fits in usize on the 64-bit hosts KVM
        // runs on.
        if let Ok(len) = usize::try_from(low) {
            ranges.push((GuestAddress(0), len));
        }
        if self.mem_size > MMIO_HOLE_START {
            if let Ok(len) = usize::try_from(self.mem_size - MMIO_HOLE_START) {
                ranges.push((GuestAddress(MMIO_HOLE_END), len));
            }
        }
        ranges
    }

    /// Whether `start..end` lies entirely inside one usable-RAM entry of the map.
    pub fn is_ram(&self, start: u64, end: u64) -> bool {
        start <= end
            && self
                .e820
                .iter()
                .any(|e| e.kind == E820Type::Ram && e.addr <= start && end <= e.end())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_ram_has_three_entries() {
        let l = MemoryLayout::new(64 << 20).unwrap();
        let e = l.e820();
        assert_eq!(e.len(), 3);
        assert_eq!(
            (e[0].addr, e[0].size, e[0].kind),
            (0, 0x9fc00, E820Type::Ram)
        );
        assert_eq!(
            (e[1].addr, e[1].end(), e[1].kind),
            (0x9fc00, 0x10_0000, E820Type::Reserved)
        );
        assert_eq!((e[2].addr, e[2].end()), (0x10_0000, 64 << 20));
        assert_eq!(l.ram_end(), 64 << 20);
        assert_eq!(l.ram_ranges(), vec![(GuestAddress(0), 64 << 20)]);
    }

    #[test]
    fn large_ram_splits_around_mmio_hole() {
        let l = MemoryLayout::new(4 << 30).unwrap();
        let e = l.e820();
        assert_eq!(e.len(), 4);
        assert_eq!(e[2].end(), MMIO_HOLE_START);
        assert_eq!((e[3].addr, e[3].size), (MMIO_HOLE_END, 1 << 30));
        assert_eq!(l.ram_end(), MMIO_HOLE_END + (1 << 30));
        assert!(l.holes().iter().any(|h| h.start == MMIO_HOLE_START));
        assert!(!l.is_ram(MMIO_HOLE_START - 0x1000, MMIO_HOLE_START + 0x1000));
        assert!(l.is_ram(MMIO_HOLE_END, MMIO_HOLE_END + 0x1000));
        assert_eq!(
            l.ram_ranges(),
            vec![
                (GuestAddress(0), 0xc000_0000),
                (GuestAddress(MMIO_HOLE_END), 1 << 30)
            ]
        );
    }

    #[test]
    fn bad_sizes_are_refused() {
        assert!(matches!(
            MemoryLayout::new(0x1000),
            Err(LoaderError::RamTooSmall { size: 0x1000, .. })
        ));
        assert!(matches!(
            MemoryLayout::new((64 << 20) + 1),
            Err(LoaderError::RamUnaligned { .. })
        ));
        assert!(matches!(
            MemoryLayout::new(u64::MAX),
            Err(LoaderError::RamTooLarge { .. })
        ));
    }

    #[test]
    fn loader_area_is_ram_in_the_smallest_layout() {
        let l = MemoryLayout::new(MIN_RAM_SIZE).unwrap();
        assert!(l.is_ram(GDT_ADDR, LOADER_AREA_END));
        assert!(!l.is_ram(EBDA_START, HIGH_MEMORY_START));
        assert!(l.is_ram(HIGH_MEMORY_START, MIN_RAM_SIZE));
    }
}
