//! ACPI tables for the guest, at bhyve's addresses and with bhyve's conventions
//! (`usr.sbin/bhyve/acpi.c`, `pm.c`, `pci_emul.c`, `pci_lpc.c`).
//!
//! [`build_acpi`] writes the tables into the legacy BIOS area and returns the RSDP address, which
//! the VMM hands to the kernel ([`crate::BootConfig::rsdp_addr`]: Linux `acpi_rsdp_addr`, PVH
//! `rsdp_paddr`). An OS that scans for the RSDP finds it too: it sits on a 16-byte boundary inside
//! 0xE0000..0xFFFFF.
//!
//! # Tables
//!
//! | table | where | contents |
//! |---|---|---|
//! | RSDP | [`ACPI_RSDP_ADDR`] (0xF2400, bhyve's) | revision 2, XSDT address, RSDT address 0 (no RSDT) |
//! | XSDT | packed after the RSDP | FADT, MADT, HPET, MCFG (if [`AcpiConfig::mcfg`]) |
//! | FADT | packed | revision 6.5 (276 bytes), see below |
//! | FACS | packed, 64-byte aligned | version 1, no waking vector, no S4BIOS |
//! | MADT | packed | local APIC at 0xFEE00000, PCAT_COMPAT; one enabled Processor Local APIC per vCPU (ACPI UID = APIC ID = vCPU index); one I/O APIC (ID [`IOAPIC_ID`], 0xFEC00000, GSI base 0); overrides ISA IRQ 0 → GSI 2 (edge, active high) and IRQ 9 (SCI) → GSI 9 (level, active low); local APIC NMI on LINT1 of every processor (UID 0xFF, edge, active high) |
//! | HPET | packed | event timer block ID [`AcpiConfig::hpet_block_id`], base 0xFED00000, HPET number 0, 4 KiB page protection |
//! | MCFG | packed | one ECAM allocation: segment 0, buses 0–255, at [`PCI_ECAM_ADDR`] (0xE0000000) |
//! | DSDT | packed, last | AML, see below |
//!
//! Everything lives in `ACPI_RSDP_ADDR..ACPI_AREA_END` (0xF2400..1 MiB), which the memory map
//! already reports reserved; nothing outside it is touched, and the area is zeroed first so no
//! stale table survives.
//!
//! # FADT decisions
//!
//! * **Revision 6.5** (the `acpi_tables` crate's layout; bhyve uses 5.1). Only X_DSDT and
//!   X_FIRMWARE_CTRL are set (ACPI requires the 32-bit fields to be zero then); the PM blocks are in
//!   both the 32-bit and the X_ fields, with GAS bit widths equal to 8 × the block lengths, as
//!   ACPICA checks.
//! * **No SMM: SMI_CMD = 0, ACPI_ENABLE = ACPI_DISABLE = 0**: the platform is always in ACPI mode
//!   and PM1_CNT.SCI_EN always reads 1 (ACPICA and Linux treat SMI_CMD = 0 as "already in ACPI
//!   mode"). bhyve instead emulates SMI_CMD 0xB2 with enable/disable values 0xA0/0xA1; one port
//!   less here, and nothing for an OS to get wrong.
//! * PM1a event block at port [`PM1A_EVT_PORT`] (4 bytes), PM1a control at [`PM1A_CNT_PORT`]
//!   (2 bytes), PM timer at [`PM_TMR_PORT`] (4 bytes), SCI on ISA IRQ [`SCI_IRQ`]: bhyve's ports,
//!   served by `stages::acpipm` and `stages::devices::pmtimer`.
//! * **TMR_VAL_EXT set**: the PM timer (`stages::devices::pmtimer`, like bhyve's `vpmtmr.c`) is
//!   32 bits wide.
//! * Reset register: system I/O 0xCF9, byte access, value 0x06 (RST_CPU | SYS_RST), RESET_REG_SUP
//!   set. Linux's default reboot method writes it first (`reboot=acpi`) and falls back to the
//!   keyboard controller (0xFE to port 0x64), which `stages::misc::I8042` also honours.
//! * Flags: WBINVD, PROC_C1, SLP_BUTTON (no sleep button), TMR_VAL_EXT, RESET_REG_SUP, plus
//!   bhyve's HEADLESS and FORCE_APIC_PHYSICAL_DESTINATION_MODE (physical destination mode keeps the
//!   I/O APIC's MSI translation simple). PWR_BUTTON is clear: the power button is the fixed-feature
//!   one (PM1 PWRBTN_STS/EN).
//! * IAPC_BOOT_ARCH: VGA not present, PCIe ASPM not supported (bhyve's 0x0014), and **8042 only if
//!   [`AcpiConfig::i8042`]** (default off, as bhyve). With the flag clear Linux marks the i8042
//!   "firmware absent" (`x86_platform.legacy.i8042`) and its i8042 driver never touches ports
//!   0x60/0x64; with it set, Linux probes the controller and, since ours only implements the reset
//!   line (its status register never reports output), can be expected to wait out the i8042
//!   driver's command timeout (500 ms) and give up with "Can't read CTR" at every boot. Either way
//!   Linux's keyboard-controller reboot fallback writes 0xFE to port 0x64 without looking at the
//!   flag.
//! * CENTURY = 0x32 (the RTC's century register), no day/month alarm.
//!
//! # DSDT
//!
//! ```text
//! Name (_S5_, Package () { 5, 0, 0, 0 })     // SLP_TYP 5 = S5, what stages::acpipm powers off on
//! Name (PICM, 0)  Method (_PIC, 1) { PICM = Arg0 }
//! Scope (\_SB_) {
//!   Device (PC00) {                            // PNP0A03, _ADR 0, _UID 0, _BBN 0
//!     _CRS: bus 0–0; I/O 0xCF8 len 8; I/O windows 0x0000–0x0CF7 and 0x0D00–0xFFFF;
//!           32-bit memory window 0xC0000000–0xDFFFFFFF
//!     Device (ISA_) {                          // _ADR 0x001F0000: the LPC bridge at 0:31.0
//!       COM1 (PNP0501, _UID 1, 0x3F8/8, IRQ 4)   if com1
//!       COM2 (PNP0501, _UID 2, 0x2F8/8, IRQ 3)   if com2
//!       RTC_ (PNP0B00, 0x70/2, IRQ 8)   TIMR (PNP0100, 0x40/4, IRQ 0)
//!       PIC_ (PNP0000, 0x20/2, 0xA0/2, IRQ 2)
//!       PS2K (PNP0303, 0x60, 0x64, IRQ 1)        if i8042
//!       SRES (PNP0C02: 0x400/12 PM1 + PM timer, 0x4D0/2 ELCR, the ECAM if mcfg)
//!     }
//!     Device (HPET) { PNP0103, _UID 0, memory 0xFED00000 len 0x400 }
//!   }
//!   Device (PWRB) { PNP0C0C }
//! }
//! ```
//!
//! The ECAM is reserved through the PNP0C02 device rather than the memory map: Linux accepts an
//! MCFG region reserved in ACPI motherboard resources, and x86 Linux keeps using configuration
//! mechanism #1 for the first 256 bytes of every function, so only extended configuration space
//! goes to the ECAM.
//!
//! With PCI device models (`AcpiConfig::pci_slots`), `PC00` also has a `_PRT`: INTA–INTD of each
//! such slot straight to I/O APIC inputs 16–23 ([`pci_intx_gsi`]; level, active low).
//!
//! Not built (yet): an RSDT (every OS we target reads the XSDT of a revision-2 RSDP), PCI
//! interrupt link devices (PIC-mode routing), a 64-bit PCI memory window, GPE blocks,
//! sleep states other than S5, SRAT/SLIT, MP tables.
//!
//! # Crate
//!
//! The tables are built with `acpi_tables` (rust-vmm, cloud-hypervisor's table and AML builder):
//! its RSDP, XSDT, FADT, FACS, MCFG and AML objects are used as they are. Its MADT builder cannot
//! set the MADT flags (PCAT_COMPAT) and has no interrupt source override or local APIC NMI
//! structure, and it has no HPET table, so those two tables are laid out here over its generic
//! [`Sdt`] (which keeps length and checksum right); the AML `IRQNoFlags`
//! descriptor bhyve uses for ISA devices is encoded here too.

use acpi_tables::aml::{self, AddressSpace, AddressSpaceCacheable, Path};
use acpi_tables::fadt::{FADTBuilder, Flags, FADT};
use acpi_tables::gas::{AccessSize, AddressSpace as GasSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::sdt::Sdt;
use acpi_tables::{Aml, AmlSink};
use vm_memory::GuestMemory;

use crate::layout::{
    ACPI_AREA_END, ACPI_RSDP_ADDR, HPET_ADDR, IOAPIC_ADDR, LAPIC_ADDR, PCI_ECAM_ADDR,
    PCI_ECAM_SIZE, PCI_MMIO32_END, PCI_MMIO32_START,
};
use crate::mem::{len64, write_bytes, zero_bytes};
use crate::{LoaderError, MAX_CPUS};

/// OEM ID of every table (bhyve's).
pub const OEM_ID: [u8; 6] = *b"BHYVE ";
/// OEM revision of every table.
pub const OEM_REVISION: u32 = 1;

/// PM1a event block (PM1_STS at +0, PM1_EN at +2), system I/O (bhyve's `PM1A_EVT_ADDR`).
pub const PM1A_EVT_PORT: u16 = 0x400;
/// Length of the PM1a event block.
pub const PM1_EVT_LEN: u8 = 4;
/// PM1a control block (PM1_CNT), system I/O (bhyve's `PM1A_CNT_ADDR`).
pub const PM1A_CNT_PORT: u16 = 0x404;
/// Length of the PM1a control block.
pub const PM1_CNT_LEN: u8 = 2;
/// PM timer (bhyve's `IO_PMTMR`).
pub const PM_TMR_PORT: u16 = 0x408;
/// Length of the PM timer block (32-bit timer: FADT TMR_VAL_EXT set).
pub const PM_TMR_LEN: u8 = 4;
/// Reset control register (system I/O).
pub const RESET_PORT: u16 = 0xcf9;
/// Value the OS writes to [`RESET_PORT`] to reset (RST_CPU | SYS_RST).
pub const RESET_VALUE: u8 = 0x06;
/// ISA IRQ (and GSI) of the SCI (bhyve's `SCI_INT`).
pub const SCI_IRQ: u8 = 9;
/// SLP_TYP value of S5 in `\_S5_` (bhyve's); `stages::acpipm` powers off on it.
pub const S5_SLP_TYP: u8 = 5;
/// RTC CMOS index of the century register (FADT CENTURY).
pub const RTC_CENTURY_INDEX: u8 = 0x32;
/// APIC ID of the I/O APIC (bhyve's 0; `stages::devices::ioapic::IoApic::new` resets to it).
pub const IOAPIC_ID: u8 = 0;
/// The HPET's event timer block ID: the low 32 bits of its GCAP_ID register as
/// `stages::devices::hpet::capabilities` reports them (revision 1, 8 timers, 64-bit counter,
/// legacy replacement capable, vendor 0x8086).
pub const HPET_EVENT_TIMER_BLOCK_ID: u32 = 0x8086_a701;
/// PCI address (`_ADR`: device << 16 | function) of the LPC/ISA bridge, 0:31.0 as bhyve's
/// conventional `-s 31,lpc` and `stages::devices::pci`.
pub const LPC_PCI_ADR: u32 = 0x001f_0000;
/// Length of the HPET register block in the DSDT (bhyve's).
pub const HPET_MMIO_LEN: u32 = 0x400;

// Addresses that go into 32-bit fields.
const _: () = assert!(LAPIC_ADDR < 1 << 32 && IOAPIC_ADDR < 1 << 32 && HPET_ADDR < 1 << 32);
const _: () = assert!(PCI_MMIO32_END <= 1 << 32 && PCI_ECAM_ADDR + PCI_ECAM_SIZE <= 1 << 32);
const _: () = assert!(ACPI_RSDP_ADDR % 16 == 0);

/// MADT flags: PCAT_COMPAT (dual 8259s present).
const MADT_PCAT_COMPAT: u32 = 1;
/// MPS INTI flags: active high, edge triggered.
const MPS_INTI_EDGE_HIGH: u16 = 0x0005;
/// MPS INTI flags: active low, level triggered (bhyve's SCI override).
const MPS_INTI_LEVEL_LOW: u16 = 0x000f;
/// IAPC_BOOT_ARCH: 8042 present.
const IAPC_8042: u16 = 1 << 1;
/// IAPC_BOOT_ARCH: VGA not present.
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
/// IAPC_BOOT_ARCH: PCIe ASPM controls not supported.
const IAPC_ASPM_NOT_SUPPORTED: u16 = 1 << 4;
/// Length of the HPET table.
const HPET_TABLE_LEN: u32 = 56;
/// Length of the MADT header (SDT header, local APIC address, flags).
const MADT_HEADER_LEN: u32 = 44;
/// Length of an SDT header.
const SDT_HEADER_LEN: u32 = 36;

/// What the tables describe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcpiConfig {
    /// Number of vCPUs (1..=[`MAX_CPUS`]): one MADT Processor Local APIC entry each, APIC ID =
    /// ACPI processor UID = vCPU index.
    pub ncpus: u32,
    /// COM1 (0x3F8, IRQ 4) is present: `\_SB_.PC00.ISA_.COM1` in the DSDT.
    pub com1: bool,
    /// COM2 (0x2F8, IRQ 3) is present: `\_SB_.PC00.ISA_.COM2` in the DSDT.
    pub com2: bool,
    /// Advertise an 8042 keyboard controller (FADT IAPC_BOOT_ARCH bit 1 and a PNP0303 device).
    /// Off by default: ours implements only the reset line, see the module documentation.
    pub i8042: bool,
    /// Build the MCFG (ECAM at [`PCI_ECAM_ADDR`]) and reserve the ECAM in the DSDT.
    pub mcfg: bool,
    /// HPET table event timer block ID (the low 32 bits of the HPET's GCAP_ID register).
    pub hpet_block_id: u32,
    /// Bus-0 slots holding PCI device models (bit per slot): `\_SB_.PC00._PRT` routes their
    /// INTA–INTD to I/O APIC inputs ([`pci_intx_gsi`]). No slot, no `_PRT`.
    pub pci_slots: u32,
}

/// First I/O APIC input for PCI INTx (16–23; 0–15 are the ISA IRQs).
pub const PCI_INTX_GSI_BASE: u32 = 16;

/// The I/O APIC input (GSI) that INTx `pin` (0 = INTA … 3 = INTD) of bus-0 `slot` is wired to: the
/// usual swizzle over inputs 16–23, `16 + (slot + pin) % 8`. Level-triggered, active low, as PCI
/// interrupts are (the `_PRT` says so by naming a GSI, not a link device). The platform also writes
/// it into each function's interrupt line register (0x3C), where a guest without ACPI finds it.
pub fn pci_intx_gsi(slot: u8, pin: u8) -> u32 {
    PCI_INTX_GSI_BASE + (u32::from(slot) + u32::from(pin)) % 8
}

impl AcpiConfig {
    /// `ncpus` vCPUs, COM1 only, no 8042, MCFG, our HPET's block ID.
    pub fn new(ncpus: u32) -> Self {
        AcpiConfig {
            ncpus,
            com1: true,
            com2: false,
            i8042: false,
            mcfg: true,
            hpet_block_id: HPET_EVENT_TIMER_BLOCK_ID,
            pci_slots: 0,
        }
    }
}

/// Builds the ACPI tables for `cfg` into guest memory and returns the RSDP's address
/// ([`ACPI_RSDP_ADDR`]).
///
/// Fails on a vCPU count outside 1..=[`MAX_CPUS`] ([`LoaderError::CpuCount`]), if the tables do
/// not fit the ACPI area, or if guest memory does not back it. Nothing is written unless every
/// table was built and placed.
pub fn build_acpi<M: GuestMemory + ?Sized>(mem: &M, cfg: &AcpiConfig) -> Result<u64, LoaderError> {
    let ncpus = u8::try_from(cfg.ncpus)
        .ok()
        .filter(|&n| n != 0 && u32::from(n) <= MAX_CPUS)
        .ok_or(LoaderError::CpuCount {
            ncpus: cfg.ncpus,
            max: MAX_CPUS,
        })?;

    // Address-independent tables first, so their sizes are known.
    let madt = madt(ncpus);
    let hpet = hpet(cfg.hpet_block_id);
    let mcfg = cfg.mcfg.then(mcfg);
    let facs = facs();
    let dsdt = dsdt(cfg);

    let mut at = Placer::new(ACPI_RSDP_ADDR);
    let rsdp_addr = at.place(len64(&rsdp_bytes(0)), 16);
    let nentries = 3 + u64::from(mcfg.is_some());
    let xsdt_addr = at.place(u64::from(SDT_HEADER_LEN) + 8 * nentries, 16);
    let fadt_addr = at.place(len64_of(FADT::len()), 16);
    let facs_addr = at.place(len64(&facs), 64);
    let madt_addr = at.place(len64(&madt), 16);
    let hpet_addr = at.place(len64(&hpet), 16);
    let mcfg_addr = mcfg.as_ref().map(|t| at.place(len64(t), 16));
    let dsdt_addr = at.place(len64(&dsdt), 16);
    if at.next > ACPI_AREA_END {
        return Err(LoaderError::AcpiTablesTooLarge {
            start: ACPI_RSDP_ADDR,
            need: at.next.saturating_sub(ACPI_RSDP_ADDR),
            end: ACPI_AREA_END,
        });
    }

    let fadt = fadt(cfg, dsdt_addr, facs_addr);
    let mut entries = vec![fadt_addr, madt_addr, hpet_addr];
    entries.extend(mcfg_addr);
    let xsdt = xsdt(&entries);
    let rsdp = rsdp_bytes(xsdt_addr);

    zero_bytes(
        mem,
        "ACPI table area",
        ACPI_RSDP_ADDR,
        ACPI_AREA_END - ACPI_RSDP_ADDR,
    )?;
    write_bytes(mem, "ACPI RSDP", rsdp_addr, &rsdp)?;
    write_bytes(mem, "ACPI XSDT", xsdt_addr, &xsdt)?;
    write_bytes(mem, "ACPI FADT", fadt_addr, &fadt)?;
    write_bytes(mem, "ACPI FACS", facs_addr, &facs)?;
    write_bytes(mem, "ACPI MADT", madt_addr, &madt)?;
    write_bytes(mem, "ACPI HPET table", hpet_addr, &hpet)?;
    if let (Some(addr), Some(table)) = (mcfg_addr, &mcfg) {
        write_bytes(mem, "ACPI MCFG", addr, table)?;
    }
    write_bytes(mem, "ACPI DSDT", dsdt_addr, &dsdt)?;
    Ok(rsdp_addr)
}

/// Hands out addresses one after another, each aligned.
struct Placer {
    next: u64,
}

impl Placer {
    fn new(start: u64) -> Self {
        Placer { next: start }
    }

    /// Reserves `len` bytes at the next `align`-aligned address (`align` a power of two).
    fn place(&mut self, len: u64, align: u64) -> u64 {
        let addr = self.next.saturating_add(align - 1) & !(align - 1);
        self.next = addr.saturating_add(len);
        addr
    }
}

/// A host length as u64 (lossless on the 64-bit hosts KVM runs on).
fn len64_of(len: usize) -> u64 {
    u64::try_from(len).unwrap_or(u64::MAX)
}

/// The AML (or table) bytes of `obj`.
fn bytes_of(obj: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    obj.to_aml_bytes(&mut v);
    v
}

/// An address known at compile time to be below 4 GiB (asserted above), as a 32-bit field.
fn addr32(addr: u64) -> u32 {
    u32::try_from(addr).unwrap_or(u32::MAX)
}

fn rsdp_bytes(xsdt_addr: u64) -> Vec<u8> {
    bytes_of(&acpi_tables::rsdp::Rsdp::new(OEM_ID, xsdt_addr))
}

fn xsdt(entries: &[u64]) -> Vec<u8> {
    let mut xsdt = acpi_tables::xsdt::XSDT::new(OEM_ID, *b"BVXSDT  ", OEM_REVISION);
    for &e in entries {
        xsdt.add_entry(e);
    }
    bytes_of(&xsdt)
}

fn facs() -> Vec<u8> {
    bytes_of(&acpi_tables::facs::FACS::new())
}

fn mcfg() -> Vec<u8> {
    let mut mcfg = acpi_tables::mcfg::MCFG::new(OEM_ID, *b"BVMCFG  ", OEM_REVISION);
    mcfg.add_ecam(PCI_ECAM_ADDR, 0, 0, 255);
    bytes_of(&mcfg)
}

/// MADT: header with PCAT_COMPAT, then local APICs, the I/O APIC, the two interrupt source
/// overrides and the LINT1 NMI.
fn madt(ncpus: u8) -> Vec<u8> {
    let mut madt = Sdt::new(
        *b"APIC",
        MADT_HEADER_LEN,
        1,
        OEM_ID,
        *b"BVMADT  ",
        OEM_REVISION,
    );
    madt.write_u32(36, addr32(LAPIC_ADDR));
    madt.write_u32(40, MADT_PCAT_COMPAT);

    let mut entries = Vec::new();
    for cpu in 0..ncpus {
        ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled).to_aml_bytes(&mut entries);
    }
    IoApic::new(IOAPIC_ID, addr32(IOAPIC_ADDR), 0).to_aml_bytes(&mut entries);
    interrupt_source_override(&mut entries, 0, 2, MPS_INTI_EDGE_HIGH);
    interrupt_source_override(
        &mut entries,
        SCI_IRQ,
        u32::from(SCI_IRQ),
        MPS_INTI_LEVEL_LOW,
    );
    // Local APIC NMI: every processor (UID 0xFF), LINT1, edge, active high.
    entries.extend_from_slice(&[4, 6, 0xff]);
    entries.extend_from_slice(&MPS_INTI_EDGE_HIGH.to_le_bytes());
    entries.push(1);
    madt.append_slice(&entries);
    madt.as_slice().to_vec()
}

/// MADT Interrupt Source Override (type 2) for ISA bus `irq`.
fn interrupt_source_override(out: &mut Vec<u8>, irq: u8, gsi: u32, flags: u16) {
    out.extend_from_slice(&[2, 10, 0, irq]);
    out.extend_from_slice(&gsi.to_le_bytes());
    out.extend_from_slice(&flags.to_le_bytes());
}

/// HPET description table.
fn hpet(block_id: u32) -> Vec<u8> {
    let mut hpet = Sdt::new(
        *b"HPET",
        HPET_TABLE_LEN,
        1,
        OEM_ID,
        *b"BVHPET  ",
        OEM_REVISION,
    );
    hpet.write_u32(36, block_id);
    // Base address: GAS in system memory (bhyve leaves width, offset and access size 0).
    let mut gas = [0u8; 12];
    gas[4..].copy_from_slice(&HPET_ADDR.to_le_bytes());
    hpet.write_bytes(40, &gas);
    hpet.write_u8(52, 0); // HPET number
    hpet.write_u16(53, 0); // minimum clock tick in periodic mode
    hpet.write_u8(55, 1); // page protection: 4 KiB
    hpet.as_slice().to_vec()
}

/// A system-I/O generic address of `width` bits.
fn io_gas(port: u16, width: u8, access: AccessSize) -> GAS {
    GAS::new(GasSpace::SystemIo, width, 0, access, u64::from(port))
}

fn fadt(cfg: &AcpiConfig, dsdt_addr: u64, facs_addr: u64) -> Vec<u8> {
    let mut f = FADTBuilder::new(OEM_ID, *b"BVFACP  ", OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .firmware_ctrl_64(facs_addr)
        .flag(Flags::Wbinvd)
        .flag(Flags::ProcC1)
        .flag(Flags::SlpButton)
        .flag(Flags::TmrValExt)
        .flag(Flags::ResetRegSup)
        .flag(Flags::Headless)
        .flag(Flags::ForceApicPhysicalDestinationMode);
    f.sci_int = u16::from(SCI_IRQ).into();
    // SMI_CMD, ACPI_ENABLE and ACPI_DISABLE stay 0: always in ACPI mode.
    f.pm1a_evt_blk = u32::from(PM1A_EVT_PORT).into();
    f.pm1a_cnt_blk = u32::from(PM1A_CNT_PORT).into();
    f.pm_tmr_blk = u32::from(PM_TMR_PORT).into();
    f.pm1_evt_len = PM1_EVT_LEN;
    f.pm1_cnt_len = PM1_CNT_LEN;
    f.pm_tmr_len = PM_TMR_LEN;
    f.x_pm1a_evt_blk = io_gas(PM1A_EVT_PORT, PM1_EVT_LEN * 8, AccessSize::WordAccess);
    f.x_pm1a_cnt_blk = io_gas(PM1A_CNT_PORT, PM1_CNT_LEN * 8, AccessSize::WordAccess);
    f.x_pm_tmr_blk = io_gas(PM_TMR_PORT, PM_TMR_LEN * 8, AccessSize::DwordAccess);
    f.century = RTC_CENTURY_INDEX;
    let mut boot_arch = IAPC_VGA_NOT_PRESENT | IAPC_ASPM_NOT_SUPPORTED;
    if cfg.i8042 {
        boot_arch |= IAPC_8042;
    }
    f.iapc_boot_arch = boot_arch.into();
    f.reset_reg = io_gas(RESET_PORT, 8, AccessSize::ByteAccess);
    f.reset_value = RESET_VALUE;
    bytes_of(&f.finalize())
}

/// Already-encoded AML, nested as it is.
struct Encoded(Vec<u8>);

impl Aml for Encoded {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

/// The small `IRQNoFlags` resource descriptor (edge, active high, exclusive), as bhyve's
/// `dsdt_fixed_irq`.
struct IrqNoFlags(u8);

impl Aml for IrqNoFlags {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        // Small item, name 0x4 (IRQ), length 2: the IRQ mask.
        sink.byte(0x22);
        sink.word(1u16.checked_shl(u32::from(self.0)).unwrap_or(0));
    }
}

/// `Name (_CRS, ResourceTemplate () { resources })`.
fn crs(resources: Vec<&dyn Aml>) -> Encoded {
    Encoded(bytes_of(&aml::Name::new(
        "_CRS".into(),
        &aml::ResourceTemplate::new(resources),
    )))
}

/// `Name (_HID, EisaId (hid))`.
fn hid(hid: &str) -> Encoded {
    Encoded(bytes_of(&aml::Name::new(
        "_HID".into(),
        &aml::EISAName::new(hid),
    )))
}

/// `Name (name, value)` for an integer.
fn int_name(name: &str, value: u32) -> Encoded {
    Encoded(bytes_of(&aml::Name::new(name.into(), &value)))
}

/// A device with `_HID`, an optional `_UID` and a `_CRS`.
fn device(name: &str, hid_str: &str, uid: Option<u32>, resources: Vec<&dyn Aml>) -> Encoded {
    let hid = hid(hid_str);
    let uid = uid.map(|u| int_name("_UID", u));
    let crs = crs(resources);
    let mut children: Vec<&dyn Aml> = vec![&hid];
    if let Some(uid) = &uid {
        children.push(uid);
    }
    children.push(&crs);
    Encoded(bytes_of(&aml::Device::new(name.into(), children)))
}

/// A 16550 UART at `base` on ISA `irq`.
fn serial(name: &str, uid: u32, base: u16, irq: u8) -> Encoded {
    let io = aml::IO::new(base, base, 1, 8);
    let irq = IrqNoFlags(irq);
    device(name, "PNP0501", Some(uid), vec![&io, &irq])
}

/// `\_SB_.PC00.ISA_`: the LPC bridge's ISA devices and the motherboard resources.
fn isa(cfg: &AcpiConfig) -> Encoded {
    let com1 = cfg.com1.then(|| serial("COM1", 1, 0x3f8, 4));
    let com2 = cfg.com2.then(|| serial("COM2", 2, 0x2f8, 3));

    let rtc_io = aml::IO::new(0x70, 0x70, 1, 2);
    let rtc_irq = IrqNoFlags(8);
    let rtc = device("RTC_", "PNP0B00", None, vec![&rtc_io, &rtc_irq]);

    let pit_io = aml::IO::new(0x40, 0x40, 1, 4);
    let pit_irq = IrqNoFlags(0);
    let pit = device("TIMR", "PNP0100", None, vec![&pit_io, &pit_irq]);

    let pic_master = aml::IO::new(0x20, 0x20, 1, 2);
    let pic_slave = aml::IO::new(0xa0, 0xa0, 1, 2);
    let pic_irq = IrqNoFlags(2);
    let pic = device(
        "PIC_",
        "PNP0000",
        None,
        vec![&pic_master, &pic_slave, &pic_irq],
    );

    let kbd_data = aml::IO::new(0x60, 0x60, 1, 1);
    let kbd_cmd = aml::IO::new(0x64, 0x64, 1, 1);
    let kbd_irq = IrqNoFlags(1);
    let ps2k = cfg
        .i8042
        .then(|| device("PS2K", "PNP0303", None, vec![&kbd_data, &kbd_cmd, &kbd_irq]));

    // Motherboard resources: PM1 event/control and PM timer (0x400..0x40C), ELCR, ECAM.
    let pm_io = aml::IO::new(PM1A_EVT_PORT, PM1A_EVT_PORT, 1, 0x0c);
    let elcr_io = aml::IO::new(0x4d0, 0x4d0, 1, 2);
    let ecam = aml::Memory32Fixed::new(true, addr32(PCI_ECAM_ADDR), addr32(PCI_ECAM_SIZE));
    let mut sres_res: Vec<&dyn Aml> = vec![&pm_io, &elcr_io];
    if cfg.mcfg {
        sres_res.push(&ecam);
    }
    let sres = device("SRES", "PNP0C02", None, sres_res);

    let adr = int_name("_ADR", LPC_PCI_ADR);
    let mut children: Vec<&dyn Aml> = vec![&adr];
    children.extend(com1.as_ref().map(|d| d as &dyn Aml));
    children.extend(com2.as_ref().map(|d| d as &dyn Aml));
    children.push(&rtc);
    children.push(&pit);
    children.push(&pic);
    children.extend(ps2k.as_ref().map(|d| d as &dyn Aml));
    children.push(&sres);
    Encoded(bytes_of(&aml::Device::new("ISA_".into(), children)))
}

/// `Name (_PRT, Package () { Package () { slot << 16 | 0xFFFF, pin, 0, gsi }, ... })` for INTA–INTD
/// of every slot in `slots`: each pin straight to an I/O APIC input (source 0: a GSI, no link).
fn prt(slots: u32) -> Option<Encoded> {
    let mut entries: Vec<(u32, u8, u32)> = Vec::new();
    for slot in 0..32u8 {
        if slots & (1u32 << slot) == 0 {
            continue;
        }
        for pin in 0..4u8 {
            entries.push((
                (u32::from(slot) << 16) | 0xffff,
                pin,
                pci_intx_gsi(slot, pin),
            ));
        }
    }
    if entries.is_empty() {
        return None;
    }
    let zero = 0u8;
    let packages: Vec<aml::Package> = entries
        .iter()
        .map(|(adr, pin, gsi)| aml::Package::new(vec![adr, pin, &zero, gsi]))
        .collect();
    let refs: Vec<&dyn Aml> = packages.iter().map(|p| p as &dyn Aml).collect();
    Some(Encoded(bytes_of(&aml::Name::new(
        "_PRT".into(),
        &aml::Package::new(refs),
    ))))
}

/// `\_SB_.PC00`: the PCI root bridge with the ISA bridge and the HPET below it.
fn pci_root(cfg: &AcpiConfig) -> Encoded {
    let hid = hid("PNP0A03");
    let adr = int_name("_ADR", 0);
    let uid = int_name("_UID", 0);
    let bbn = int_name("_BBN", 0);

    let bus = AddressSpace::<u16>::new_bus_number(0, 0);
    let cfg_io = aml::IO::new(0xcf8, 0xcf8, 1, 8);
    let io_low = AddressSpace::<u16>::new_io(0x0000, 0x0cf7, None);
    let io_high = AddressSpace::<u16>::new_io(0x0d00, 0xffff, None);
    let mmio32 = AddressSpace::<u32>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        addr32(PCI_MMIO32_START),
        addr32(PCI_MMIO32_END - 1),
        None,
    );
    let crs = crs(vec![&bus, &cfg_io, &io_low, &io_high, &mmio32]);

    let isa = isa(cfg);

    let hpet_mem = aml::Memory32Fixed::new(true, addr32(HPET_ADDR), HPET_MMIO_LEN);
    let hpet = device("HPET", "PNP0103", Some(0), vec![&hpet_mem]);

    let prt = prt(cfg.pci_slots);
    let mut children: Vec<&dyn Aml> = vec![&hid, &adr, &uid, &bbn, &crs];
    children.extend(prt.as_ref().map(|p| p as &dyn Aml));
    children.push(&isa);
    children.push(&hpet);
    Encoded(bytes_of(&aml::Device::new("PC00".into(), children)))
}

/// The DSDT: `\_S5_`, `_PIC`, and `\_SB_` with the PCI root and the power button.
fn dsdt(cfg: &AcpiConfig) -> Vec<u8> {
    let mut body = Vec::new();

    let s5 = aml::Package::new(vec![&S5_SLP_TYP, &0u8, &0u8, &0u8]);
    aml::Name::new("_S5_".into(), &s5).to_aml_bytes(&mut body);

    aml::Name::new("PICM".into(), &0u8).to_aml_bytes(&mut body);
    let picm = Path::new("PICM");
    let arg0 = aml::Arg(0);
    let store = aml::Store::new(&picm, &arg0);
    aml::Method::new("_PIC".into(), 1, false, vec![&store]).to_aml_bytes(&mut body);

    let pc00 = pci_root(cfg);
    let pwrb_hid = hid("PNP0C0C");
    let pwrb = aml::Device::new("PWRB".into(), vec![&pwrb_hid]);
    aml::Scope::new("\\_SB_".into(), vec![&pc00, &pwrb]).to_aml_bytes(&mut body);

    let mut dsdt = Sdt::new(
        *b"DSDT",
        SDT_HEADER_LEN,
        2,
        OEM_ID,
        *b"BVDSDT  ",
        OEM_REVISION,
    );
    dsdt.append_slice(&body);
    dsdt.as_slice().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, &x| a.wrapping_add(x))
    }

    fn le32(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
    }

    #[test]
    fn prt_routes_inta_to_intd_of_each_device_slot_only_when_there_are_devices() {
        let has = |t: &[u8], n: &[u8]| t.windows(n.len()).any(|w| w == n);
        assert!(!has(&dsdt(&AcpiConfig::new(1)), b"_PRT"));
        let t = dsdt(&AcpiConfig {
            pci_slots: 1 << 4,
            ..AcpiConfig::new(1)
        });
        assert!(has(&t, b"_PRT"));
        // Package () { 0x0004FFFF, pin, 0, gsi }: DWordConst 0x0004FFFF then pin 0..3.
        assert!(has(&t, &[0x0c, 0xff, 0xff, 0x04, 0x00]));
        assert_eq!(
            (0..4).map(|p| pci_intx_gsi(4, p)).collect::<Vec<_>>(),
            vec![20, 21, 22, 23]
        );
        assert_eq!(pci_intx_gsi(31, 3), 18);
    }

    #[test]
    fn every_table_sums_to_zero_and_states_its_length() {
        let cfg = AcpiConfig {
            com2: true,
            i8042: true,
            ..AcpiConfig::new(8)
        };
        for t in [
            madt(8),
            hpet(HPET_EVENT_TIMER_BLOCK_ID),
            mcfg(),
            dsdt(&cfg),
            fadt(&cfg, 0xf3000, 0xf2f00),
            xsdt(&[1, 2, 3]),
        ] {
            assert_eq!(sum(&t), 0, "{:?}", &t[..4]);
            assert_eq!(le32(&t, 4) as usize, t.len(), "{:?}", &t[..4]);
        }
        let facs = facs();
        assert_eq!(&facs[..4], b"FACS");
        assert_eq!(le32(&facs, 4), 64);
    }

    #[test]
    fn madt_layout_matches_bhyve() {
        let m = madt(2);
        assert_eq!(&m[..4], b"APIC");
        assert_eq!(le32(&m, 36), 0xfee0_0000);
        assert_eq!(le32(&m, 40), 1, "PCAT_COMPAT");
        // Two local APICs, the I/O APIC, two overrides, one NMI.
        assert_eq!(m.len(), 44 + 2 * 8 + 12 + 2 * 10 + 6);
        assert_eq!(&m[44..52], &[0, 8, 0, 0, 1, 0, 0, 0]);
        assert_eq!(&m[52..60], &[0, 8, 1, 1, 1, 0, 0, 0]);
        assert_eq!(&m[60..64], &[1, 12, IOAPIC_ID, 0]);
        assert_eq!(&m[72..82], &[2, 10, 0, 0, 2, 0, 0, 0, 5, 0]);
        assert_eq!(&m[82..92], &[2, 10, 0, 9, 9, 0, 0, 0, 0xf, 0]);
        assert_eq!(&m[92..98], &[4, 6, 0xff, 5, 0, 1]);
    }

    #[test]
    fn fadt_fields_sit_at_their_spec_offsets() {
        let f = fadt(&AcpiConfig::new(1), 0xf3000, 0xf2f00);
        assert_eq!(&f[..4], b"FACP");
        assert_eq!(f[8], 6, "major revision");
        assert_eq!(f[131], 5, "minor revision");
        assert_eq!(
            le32(&f, 36),
            0,
            "32-bit FIRMWARE_CTRL must be 0 when X_ is set"
        );
        assert_eq!(le32(&f, 40), 0, "32-bit DSDT must be 0 when X_DSDT is set");
        assert_eq!(u16::from_le_bytes([f[46], f[47]]), 9, "SCI_INT");
        assert_eq!(le32(&f, 48), 0, "SMI_CMD");
        assert_eq!(le32(&f, 56), 0x400);
        assert_eq!(le32(&f, 64), 0x404);
        assert_eq!(le32(&f, 76), 0x408);
        assert_eq!((f[88], f[89], f[91]), (4, 2, 4));
        assert_eq!(f[108], 0x32, "CENTURY");
        assert_eq!(
            u16::from_le_bytes([f[109], f[110]]),
            0x14,
            "no 8042, no VGA"
        );
        let flags = le32(&f, 112);
        for bit in [0, 2, 5, 8, 10] {
            assert_ne!(flags & (1 << bit), 0, "flag bit {bit}");
        }
        assert_eq!(flags & (1 << 4), 0, "fixed-feature power button");
        assert_eq!(
            &f[116..120],
            &[1, 8, 0, 1],
            "reset register: I/O, 8 bits, byte"
        );
        assert_eq!(le32(&f, 120), 0xcf9);
        assert_eq!(f[128], 6, "reset value");
        assert_eq!(le32(&f, 132), 0xf2f00, "X_FIRMWARE_CTRL");
        assert_eq!(le32(&f, 140), 0xf3000, "X_DSDT");
        assert_eq!(&f[148..152], &[1, 32, 0, 2], "X_PM1a_EVT_BLK");
        assert_eq!(&f[172..176], &[1, 16, 0, 2], "X_PM1a_CNT_BLK");
        assert_eq!(&f[208..212], &[1, 32, 0, 3], "X_PM_TMR_BLK");
        let with_kbd = fadt(
            &AcpiConfig {
                i8042: true,
                ..AcpiConfig::new(1)
            },
            0,
            0,
        );
        assert_eq!(u16::from_le_bytes([with_kbd[109], with_kbd[110]]), 0x16);
    }

    #[test]
    fn irq_no_flags_is_the_small_irq_descriptor() {
        assert_eq!(bytes_of(&IrqNoFlags(4)), [0x22, 0x10, 0x00]);
        assert_eq!(bytes_of(&IrqNoFlags(8)), [0x22, 0x00, 0x01]);
    }

    #[test]
    fn placer_aligns() {
        let mut p = Placer::new(0xf2400);
        assert_eq!(p.place(36, 16), 0xf2400);
        assert_eq!(p.place(10, 64), 0xf2440);
        assert_eq!(p.place(1, 16), 0xf2450);
        assert_eq!(p.next, 0xf2451);
    }
}
