//! The CPU state at the kernel's first instruction, and the structures it refers to (GDT and
//! identity page tables).
//!
//! The loader only writes guest memory and describes the entry state as plain data; the vCPU
//! runner turns an [`EntryState`] into registers.

use vm_memory::GuestMemory;

use crate::layout::{
    BOOT_STACK_POINTER, GDT_ADDR, PAGE_SIZE, PDPT_ADDR, PD_ADDR, PD_COUNT, PML4_ADDR,
};
use crate::mem::write_bytes;
use crate::LoaderError;

/// GDT selector of the flat 32-bit code segment.
pub const CODE32_SELECTOR: u16 = 0x08;
/// GDT selector of the 64-bit code segment (Linux's `__BOOT_CS`).
pub const CODE64_SELECTOR: u16 = 0x10;
/// GDT selector of the flat data segment (Linux's `__BOOT_DS`).
pub const DATA_SELECTOR: u16 = 0x18;
/// GDT selector of the boot TSS.
pub const TSS_SELECTOR: u16 = 0x20;

/// Raw boot GDT: null, code32, code64, data, then a 16-byte TSS descriptor (the last 8 bytes
/// are the upper half of the TSS base, zero, and read as a null descriptor in 32-bit mode).
pub const GDT_ENTRIES: [u64; 6] = [
    0,
    // 0x08: code, base 0, limit 0xfffff pages, G=1, D=1, P=1, S=1, type 0xb (exec/read, accessed).
    0x00cf_9b00_0000_ffff,
    // 0x10: like 0x08 but L=1, D=0: 64-bit code.
    0x00af_9b00_0000_ffff,
    // 0x18: data, base 0, limit 4 GiB, G=1, B=1, P=1, S=1, type 0x3 (read/write, accessed).
    0x00cf_9300_0000_ffff,
    // 0x20: TSS, base 0, limit 0x67, P=1, S=0, type 0xb (busy 32/64-bit TSS): what the PVH
    // spec asks for TR. Kernels install their own TSS before they need one.
    tss_descriptor(0, 0x67),
    0,
];

/// GDT limit (size in bytes minus one), as loaded into GDTR.
// The GDT is 48 bytes; the cast cannot truncate.
#[allow(clippy::cast_possible_truncation)]
pub const GDT_LIMIT: u16 = (GDT_ENTRIES.len() * 8 - 1) as u16;

const fn tss_descriptor(base: u64, limit: u64) -> u64 {
    (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (0x8b << 40)
        | (((limit >> 16) & 0xf) << 48)
        | (((base >> 24) & 0xff) << 56)
}

/// Control register bits used in entry states.
pub mod regs {
    /// CR0.PE: protected mode.
    pub const CR0_PE: u64 = 1 << 0;
    /// CR0.ET: extension type (hard-wired to 1 on modern CPUs).
    pub const CR0_ET: u64 = 1 << 4;
    /// CR0.PG: paging.
    pub const CR0_PG: u64 = 1 << 31;
    /// CR4.PAE: physical address extension (required for long mode).
    pub const CR4_PAE: u64 = 1 << 5;
    /// EFER.LME: long mode enable.
    pub const EFER_LME: u64 = 1 << 8;
    /// EFER.LMA: long mode active.
    pub const EFER_LMA: u64 = 1 << 10;
    /// RFLAGS bit 1, always set; interrupts off.
    pub const RFLAGS_RESERVED: u64 = 1 << 1;
}

/// The CPU mode at entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuMode {
    /// 64-bit long mode, paging on with the loader's identity page tables (`cr3`).
    Long64,
    /// 32-bit protected mode, flat 4 GiB segments, paging off.
    Protected32,
}

/// A segment register's selector and hidden part (what `kvm_segment` holds), decoded from the
/// boot GDT so the runner does not have to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Selector.
    pub selector: u16,
    /// Base address.
    pub base: u64,
    /// Limit in bytes (already scaled by the granularity bit).
    pub limit: u32,
    /// Type field (4 bits).
    pub type_: u8,
    /// Descriptor type: true for code/data, false for system (TSS).
    pub s: bool,
    /// Descriptor privilege level.
    pub dpl: u8,
    /// Present.
    pub present: bool,
    /// Available for software.
    pub avl: bool,
    /// 64-bit code segment.
    pub l: bool,
    /// Default operation size (D/B).
    pub db: bool,
    /// Granularity (limit in 4 KiB units).
    pub g: bool,
}

impl Segment {
    /// Decodes an 8-byte GDT descriptor loaded with `selector`.
    pub fn from_descriptor(selector: u16, desc: u64) -> Self {
        let bits = |shift: u32, width: u32| (desc >> shift) & ((1u64 << width) - 1);
        let base = bits(16, 24) | (bits(56, 8) << 24);
        let raw_limit = bits(0, 16) | (bits(48, 4) << 16);
        let g = bits(55, 1) == 1;
        let limit = if g {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        };
        // Every field was masked to its width above, so the narrowing below cannot truncate.
        #[allow(clippy::cast_possible_truncation)]
        Segment {
            selector,
            base,
            limit: limit as u32,
            type_: bits(40, 4) as u8,
            s: bits(44, 1) == 1,
            dpl: bits(45, 2) as u8,
            present: bits(47, 1) == 1,
            avl: bits(52, 1) == 1,
            l: bits(53, 1) == 1,
            db: bits(54, 1) == 1,
            g,
        }
    }

    fn from_gdt(selector: u16) -> Self {
        let index = usize::from(selector >> 3);
        Segment::from_descriptor(selector, GDT_ENTRIES.get(index).copied().unwrap_or(0))
    }
}

/// The CPU state at the kernel's first instruction. All plain data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryState {
    /// Long mode with paging, or flat protected mode without.
    pub mode: CpuMode,
    /// Instruction pointer (the kernel's entry point).
    pub rip: u64,
    /// Stack pointer (a small boot stack; kernels set their own).
    pub rsp: u64,
    /// RSI: zero page address for the Linux 64-bit entry, else 0.
    pub rsi: u64,
    /// RBX: `hvm_start_info` (PVH) or multiboot information address, else 0.
    pub rbx: u64,
    /// RAX: the multiboot magic 0x2BADB002, else 0.
    pub rax: u64,
    /// RFLAGS (interrupts off).
    pub rflags: u64,
    /// CR0.
    pub cr0: u64,
    /// Long64: the PML4 of the loader's identity page tables. None when paging is off.
    pub cr3: Option<u64>,
    /// CR4.
    pub cr4: u64,
    /// EFER.
    pub efer: u64,
    /// GDTR base.
    pub gdt_base: u64,
    /// GDTR limit.
    pub gdt_limit: u16,
    /// CS selector (0x10 for Long64, 0x08 for Protected32).
    pub code_selector: u16,
    /// DS/ES/FS/GS/SS selector (0x18).
    pub data_selector: u16,
    /// CS, decoded from the GDT.
    pub code_segment: Segment,
    /// DS/ES/FS/GS/SS, decoded from the GDT.
    pub data_segment: Segment,
    /// TR, decoded from the GDT: a busy TSS, base 0, limit 0x67 (PVH's rule; VM entry needs a
    /// busy TSS in TR).
    pub tss_segment: Segment,
}

impl EntryState {
    /// Entry state for `mode` at `rip`; the loader fills the argument registers afterwards.
    pub(crate) fn new(mode: CpuMode, rip: u64) -> Self {
        let (code_selector, cr0, cr3, cr4, efer) = match mode {
            CpuMode::Long64 => (
                CODE64_SELECTOR,
                regs::CR0_PE | regs::CR0_ET | regs::CR0_PG,
                Some(PML4_ADDR),
                regs::CR4_PAE,
                regs::EFER_LME | regs::EFER_LMA,
            ),
            CpuMode::Protected32 => (CODE32_SELECTOR, regs::CR0_PE | regs::CR0_ET, None, 0, 0),
        };
        EntryState {
            mode,
            rip,
            rsp: BOOT_STACK_POINTER,
            rsi: 0,
            rbx: 0,
            rax: 0,
            rflags: regs::RFLAGS_RESERVED,
            cr0,
            cr3,
            cr4,
            efer,
            gdt_base: GDT_ADDR,
            gdt_limit: GDT_LIMIT,
            code_selector,
            data_selector: DATA_SELECTOR,
            code_segment: Segment::from_gdt(code_selector),
            data_segment: Segment::from_gdt(DATA_SELECTOR),
            tss_segment: Segment::from_gdt(TSS_SELECTOR),
        }
    }
}

/// Writes the boot GDT.
pub(crate) fn write_gdt<M: GuestMemory + ?Sized>(mem: &M) -> Result<(), LoaderError> {
    let gdt: Vec<u8> = GDT_ENTRIES.iter().flat_map(|e| e.to_le_bytes()).collect();
    write_bytes(mem, "boot GDT", GDT_ADDR, &gdt)
}

/// Page-table entry bits.
const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITE: u64 = 1 << 1;
const PTE_HUGE: u64 = 1 << 7;

/// Writes identity page tables for `0..PD_COUNT` GiB with 2 MiB pages at [`PML4_ADDR`].
pub(crate) fn write_identity_page_tables<M: GuestMemory + ?Sized>(
    mem: &M,
) -> Result<(), LoaderError> {
    let mut pml4 = [0u8; 4096];
    pml4[..8].copy_from_slice(&(PDPT_ADDR | PTE_PRESENT | PTE_WRITE).to_le_bytes());
    write_bytes(mem, "PML4", PML4_ADDR, &pml4)?;

    let mut pdpt = [0u8; 4096];
    for (i, chunk) in (0..PD_COUNT).zip(pdpt.chunks_exact_mut(8)) {
        let pd = PD_ADDR + i * PAGE_SIZE;
        chunk.copy_from_slice(&(pd | PTE_PRESENT | PTE_WRITE).to_le_bytes());
    }
    write_bytes(mem, "PDPT", PDPT_ADDR, &pdpt)?;

    let mut pds = Vec::with_capacity(4096 * 4);
    for i in 0..PD_COUNT * 512 {
        let entry = (i << 21) | PTE_PRESENT | PTE_WRITE | PTE_HUGE;
        pds.extend_from_slice(&entry.to_le_bytes());
    }
    write_bytes(mem, "page directories", PD_ADDR, &pds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_decodes_to_flat_segments() {
        let cs64 = Segment::from_gdt(CODE64_SELECTOR);
        assert!(cs64.l && !cs64.db && cs64.present && cs64.s);
        assert_eq!((cs64.base, cs64.limit, cs64.type_), (0, 0xffff_ffff, 0xb));
        let cs32 = Segment::from_gdt(CODE32_SELECTOR);
        assert!(!cs32.l && cs32.db && cs32.g);
        assert_eq!(cs32.limit, 0xffff_ffff);
        let ds = Segment::from_gdt(DATA_SELECTOR);
        assert_eq!((ds.type_, ds.limit, ds.db), (0x3, 0xffff_ffff, true));
        let tr = Segment::from_gdt(TSS_SELECTOR);
        assert_eq!((tr.base, tr.limit, tr.type_, tr.s), (0, 0x67, 0xb, false));
        assert!(tr.present && !tr.g);
        assert_eq!(GDT_LIMIT, 0x2f);
    }

    #[test]
    fn entry_state_modes() {
        let l = EntryState::new(CpuMode::Long64, 0x100_0200);
        assert_eq!(l.cr3, Some(PML4_ADDR));
        assert_eq!(l.code_selector, 0x10);
        assert_eq!(l.data_selector, 0x18);
        assert_ne!(l.cr0 & regs::CR0_PG, 0);
        assert_ne!(l.efer & regs::EFER_LMA, 0);
        let p = EntryState::new(CpuMode::Protected32, 0x10_0000);
        assert_eq!(p.cr3, None);
        assert_eq!(p.cr0 & regs::CR0_PG, 0);
        assert_eq!((p.code_selector, p.efer, p.cr4), (0x08, 0, 0));
    }
}
