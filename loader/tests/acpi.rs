//! ACPI tables, checked by parsers written by someone else: the `acpi` crate finds the RSDP by
//! scanning the BIOS area as an OS does and parses the MADT, FADT, HPET and MCFG; ACPICA (Linux's
//! interpreter, Debian's `acpica-tools`) disassembles every table and loads and evaluates the DSDT
//! in an opt-in test. Checksums and pointers are checked byte by byte from guest memory, and the
//! DSDT's namespace and resources by a strict decoder written here from the ACPI specification.
//!
//! The `aml` crate (and `acpi` 6/7, which absorbed it) would be the Rust parser to use, but every
//! version needs a nightly compiler (`#![feature(decl_macro)]`, `allocator_api`).

mod common;

use std::ptr::NonNull;

use acpi::fadt::Fadt;
use acpi::madt::{Madt, MadtEntry};
use acpi::mcfg::Mcfg;
use acpi::rsdp::Rsdp;
use acpi::{AcpiHandler, AcpiTables, HpetInfo, PhysicalMapping};
use common::*;
use loader::acpi::{AcpiConfig, HPET_EVENT_TIMER_BLOCK_ID};
use loader::layout::{ACPI_AREA_END, ACPI_RSDP_ADDR, BIOS_AREA_START};
use loader::{build_acpi, LoaderError, MAX_CPUS};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Maps guest-physical addresses to the host mapping of guest memory.
#[derive(Clone, Copy)]
struct GuestMap<'a>(&'a GuestMemoryMmap);

impl AcpiHandler for GuestMap<'_> {
    unsafe fn map_physical_region<T>(&self, phys: usize, size: usize) -> PhysicalMapping<Self, T> {
        let start = GuestAddress(u64::try_from(phys).unwrap());
        let last = start.unchecked_add(u64::try_from(size.max(1) - 1).unwrap());
        let host = self
            .0
            .get_host_address(start)
            .expect("table start not in guest memory");
        let host_last = self
            .0
            .get_host_address(last)
            .expect("table end not in guest memory");
        assert_eq!(
            host_last as usize - host as usize,
            size.max(1) - 1,
            "not contiguous"
        );
        let ptr = NonNull::new(host.cast::<T>()).unwrap();
        // SAFETY: `ptr..ptr + size` is host memory backing guest memory that lives as long as the
        // handler's reference; the acpi crate only reads through it.
        unsafe { PhysicalMapping::new(phys, ptr, size, size, *self) }
    }

    fn unmap_physical_region<T>(_region: &PhysicalMapping<Self, T>) {}
}

fn sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |a, &x| a.wrapping_add(x))
}

/// The bytes of the SDT at `addr`, its length taken from its header.
fn table(mem: &GuestMemoryMmap, addr: u64) -> Vec<u8> {
    let len = r32(mem, addr + 4);
    assert!(len >= 36, "table at {addr:#x} has length {len}");
    let t = read_bytes(mem, addr, len as usize);
    assert!(
        addr + u64::from(len) <= ACPI_AREA_END,
        "{} at {addr:#x} runs past the ACPI area",
        String::from_utf8_lossy(&t[..4])
    );
    t
}

/// Every table reachable from the RSDP, by signature, with its address; checks every checksum.
fn walk(mem: &GuestMemoryMmap, rsdp: u64) -> Vec<([u8; 4], u64, Vec<u8>)> {
    let r = read_bytes(mem, rsdp, 36);
    assert_eq!(&r[..8], b"RSD PTR ");
    assert_eq!(sum(&r[..20]), 0, "RSDP checksum (first 20 bytes)");
    assert_eq!(sum(&r), 0, "RSDP extended checksum");
    assert_eq!(r[15], 2, "RSDP revision");
    assert_eq!(r32(mem, rsdp + 20), 36, "RSDP length");
    let xsdt_addr = r64(mem, rsdp + 24);
    let xsdt = table(mem, xsdt_addr);
    assert_eq!(&xsdt[..4], b"XSDT");
    assert_eq!(sum(&xsdt), 0, "XSDT checksum");
    let mut out = vec![(*b"XSDT", xsdt_addr, xsdt.clone())];
    for e in xsdt[36..].chunks(8) {
        let addr = u64::from_le_bytes(e.try_into().unwrap());
        let t = table(mem, addr);
        let sig: [u8; 4] = t[..4].try_into().unwrap();
        assert_eq!(sum(&t), 0, "{} checksum", String::from_utf8_lossy(&sig));
        if &sig == b"FACP" {
            let dsdt_addr = u64::from_le_bytes(t[140..148].try_into().unwrap());
            let dsdt = table(mem, dsdt_addr);
            assert_eq!(&dsdt[..4], b"DSDT");
            assert_eq!(sum(&dsdt), 0, "DSDT checksum");
            out.push((*b"DSDT", dsdt_addr, dsdt));
            let facs_addr = u64::from_le_bytes(t[132..140].try_into().unwrap());
            assert_eq!(facs_addr % 64, 0, "FACS must be 64-byte aligned");
            let facs = read_bytes(mem, facs_addr, 64);
            assert_eq!(&facs[..4], b"FACS");
            assert_eq!(r32(mem, facs_addr + 4), 64);
        }
        out.push((sig, addr, t));
    }
    out
}

fn built(cfg: &AcpiConfig) -> (GuestMemoryMmap, u64) {
    let mem = guest_mem(64 * MIB);
    let rsdp = build_acpi(&mem, cfg).unwrap();
    (mem, rsdp)
}

#[test]
fn an_os_scanning_the_bios_area_finds_and_parses_every_table() {
    for ncpus in [1u8, 2, 8] {
        let (mem, rsdp) = built(&AcpiConfig::new(ncpus.into()));
        assert_eq!(rsdp, ACPI_RSDP_ADDR);
        let h = GuestMap(&mem);

        // The RSDP is found by the legacy scan, not only at the address we return.
        // SAFETY: the handler maps guest memory, which backs the whole BIOS area.
        let found = unsafe { Rsdp::search_for_on_bios(h) }.unwrap();
        assert_eq!(found.physical_start() as u64, rsdp);
        // SAFETY: as above.
        let tables = unsafe { AcpiTables::search_for_rsdp_bios(h) }.unwrap();

        let all = walk(&mem, rsdp);
        let sigs: Vec<&[u8; 4]> = all.iter().map(|(s, _, _)| s).collect();
        for want in [b"XSDT", b"FACP", b"DSDT", b"APIC", b"HPET", b"MCFG"] {
            assert!(
                sigs.contains(&want),
                "missing {}",
                String::from_utf8_lossy(want)
            );
        }

        // MADT: one enabled processor per vCPU, APIC ID = UID = index; the I/O APIC; overrides.
        let madt = tables.find_table::<Madt>().unwrap();
        assert!(madt.get().supports_8259(), "PCAT_COMPAT");
        assert_eq!({ madt.get().local_apic_address }, 0xfee0_0000);
        let (mut lapics, mut ioapics, mut isos, mut nmis) = (vec![], vec![], vec![], vec![]);
        for e in madt.get().entries() {
            match e {
                MadtEntry::LocalApic(l) => lapics.push((l.processor_id, l.apic_id, { l.flags })),
                MadtEntry::IoApic(io) => ioapics.push((io.io_apic_id, { io.io_apic_address }, {
                    io.global_system_interrupt_base
                })),
                MadtEntry::InterruptSourceOverride(o) => {
                    isos.push((o.bus, o.irq, { o.global_system_interrupt }, { o.flags }))
                }
                MadtEntry::LocalApicNmi(n) => nmis.push((n.processor_id, { n.flags }, n.nmi_line)),
                other => panic!("unexpected MADT entry {other:?}"),
            }
        }
        let want: Vec<_> = (0..ncpus).map(|i| (i, i, 1u32)).collect();
        assert_eq!(lapics, want, "{ncpus} vCPUs");
        assert_eq!(ioapics, vec![(0, 0xfec0_0000, 0)]);
        assert_eq!(isos, vec![(0, 0, 2, 0x0005), (0, 9, 9, 0x000f)]);
        assert_eq!(nmis, vec![(0xff, 0x0005, 1)]);

        // FADT.
        let fadt = tables.find_table::<Fadt>().unwrap();
        assert_eq!({ fadt.sci_interrupt }, 9);
        let tmr = fadt.pm_timer_block().unwrap().unwrap();
        assert_eq!((tmr.address, tmr.bit_width), (0x408, 32));
        assert!(
            { fadt.flags }.pm_timer_is_32_bit(),
            "TMR_VAL_EXT: the PM timer is 32-bit"
        );
        let evt = fadt.pm1a_event_block().unwrap();
        assert_eq!((evt.address, evt.bit_width), (0x400, 32));
        let cnt = fadt.pm1a_control_block().unwrap();
        assert_eq!((cnt.address, cnt.bit_width), (0x404, 16));
        let reset = fadt.reset_register().unwrap();
        assert_eq!((reset.address, reset.bit_width), (0xcf9, 8));
        assert!(matches!(
            reset.address_space,
            acpi::address::AddressSpace::SystemIo
        ));
        assert_eq!({ fadt.reset_value }, 6);
        assert!({ fadt.flags }.supports_system_reset_via_fadt());
        assert!(!{ fadt.iapc_boot_arch }.motherboard_implements_8042());
        assert!({ fadt.iapc_boot_arch }.dont_probe_vga());
        assert!(
            !{ fadt.flags }.power_button_is_control_method(),
            "fixed-feature power button"
        );
        assert!(
            { fadt.flags }.sleep_button_is_control_method(),
            "no sleep button"
        );
        assert!(!{ fadt.flags }.system_is_hw_reduced_acpi());
        assert_eq!({ fadt.smi_cmd_port }, 0, "no SMM: always in ACPI mode");
        assert_eq!({ fadt.century }, 0x32);
        let dsdt = all.iter().find(|(s, _, _)| s == b"DSDT").unwrap().1;
        assert_eq!(fadt.dsdt_address().unwrap() as u64, dsdt);

        // HPET, as stages' HPET reports itself.
        let hpet = HpetInfo::new(&tables).unwrap();
        assert_eq!(hpet.base_address, 0xfed0_0000);
        assert_eq!(hpet.event_timer_block_id, HPET_EVENT_TIMER_BLOCK_ID);
        assert_eq!(hpet.hardware_rev(), 1);
        assert_eq!(hpet.num_comparators(), 8);
        assert!(hpet.main_counter_is_64bits());
        assert!(hpet.legacy_irq_capable());
        assert_eq!(hpet.pci_vendor_id(), 0x8086);

        // MCFG: one ECAM allocation.
        let mcfg = tables.find_table::<Mcfg>().unwrap();
        let e: Vec<_> = mcfg
            .entries()
            .iter()
            .map(|e| {
                (
                    { e.base_address },
                    { e.pci_segment_group },
                    e.bus_number_start,
                    e.bus_number_end,
                )
            })
            .collect();
        assert_eq!(e, vec![(0xe000_0000, 0, 0, 255)]);
    }
}

/// A decoded AML object (the subset a static DSDT uses).
#[derive(Debug, Clone, PartialEq)]
enum Obj {
    Int(u64),
    Str(String),
    Buffer(Vec<u8>),
    Package(Vec<Obj>),
    Device,
    Scope,
    Method { args: u8 },
}

/// A strict decoder for the AML a static DSDT uses, written from the ACPI specification (§20,
/// "AML Specification"), independent of the `acpi_tables` encoder: every package length must end
/// exactly where its contents end, every byte must be understood.
struct AmlReader<'a> {
    b: &'a [u8],
    pos: usize,
    ns: Vec<(String, Obj)>,
}

impl<'a> AmlReader<'a> {
    fn decode(b: &'a [u8]) -> Vec<(String, Obj)> {
        let mut r = AmlReader {
            b,
            pos: 0,
            ns: vec![],
        };
        r.term_list(b.len(), "\\");
        assert_eq!(r.pos, b.len());
        r.ns
    }

    fn byte(&mut self) -> u8 {
        let v = *self
            .b
            .get(self.pos)
            .unwrap_or_else(|| panic!("AML ends at {:#x}", self.pos));
        self.pos += 1;
        v
    }

    fn le(&mut self, n: usize) -> u64 {
        (0..n).map(|i| u64::from(self.byte()) << (8 * i)).sum()
    }

    /// PkgLength: returns the absolute end it encodes.
    fn pkg_end(&mut self) -> usize {
        let start = self.pos;
        let lead = self.byte();
        let extra = usize::from(lead >> 6);
        let len = if extra == 0 {
            usize::from(lead & 0x3f)
        } else {
            let mut len = usize::from(lead & 0x0f);
            for i in 0..extra {
                len |= usize::from(self.byte()) << (4 + 8 * i);
            }
            len
        };
        start + len
    }

    fn name_seg(&mut self) -> String {
        let seg: Vec<u8> = (0..4).map(|_| self.byte()).collect();
        assert!(
            seg.iter()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == b'_'),
            "bad NameSeg {seg:?}"
        );
        String::from_utf8(seg).unwrap()
    }

    /// NameString, resolved against `scope`.
    fn name(&mut self, scope: &str) -> String {
        let mut root = false;
        if self.b[self.pos] == b'\\' {
            root = true;
            self.pos += 1;
        }
        let segs: Vec<String> = match self.b[self.pos] {
            0x2e => {
                self.pos += 1;
                vec![self.name_seg(), self.name_seg()]
            }
            0x2f => {
                self.pos += 1;
                let n = self.byte();
                (0..n).map(|_| self.name_seg()).collect()
            }
            _ => vec![self.name_seg()],
        };
        let base = if root {
            "\\".to_string()
        } else {
            scope.to_string()
        };
        segs.iter().fold(base, |p, s| {
            if p == "\\" {
                format!("\\{s}")
            } else {
                format!("{p}.{s}")
            }
        })
    }

    fn data(&mut self) -> Obj {
        match self.byte() {
            0x00 => Obj::Int(0),
            0x01 => Obj::Int(1),
            0xff => Obj::Int(u64::MAX),
            0x0a => Obj::Int(self.le(1)),
            0x0b => Obj::Int(self.le(2)),
            0x0c => Obj::Int(self.le(4)),
            0x0e => Obj::Int(self.le(8)),
            0x0d => {
                let mut s = vec![];
                loop {
                    match self.byte() {
                        0 => break Obj::Str(String::from_utf8(s).unwrap()),
                        c => s.push(c),
                    }
                }
            }
            0x11 => {
                let end = self.pkg_end();
                let Obj::Int(size) = self.data() else {
                    panic!("BufferSize")
                };
                let bytes = self.b[self.pos..end].to_vec();
                assert_eq!(bytes.len() as u64, size, "buffer size");
                self.pos = end;
                Obj::Buffer(bytes)
            }
            0x12 => {
                let end = self.pkg_end();
                let n = self.byte();
                let elems: Vec<Obj> = (0..n).map(|_| self.data()).collect();
                assert_eq!(self.pos, end, "package length");
                Obj::Package(elems)
            }
            op => panic!("unexpected data opcode {op:#x} at {:#x}", self.pos - 1),
        }
    }

    fn term_list(&mut self, end: usize, scope: &str) {
        while self.pos < end {
            match self.byte() {
                0x08 => {
                    let name = self.name(scope);
                    let v = self.data();
                    self.ns.push((name, v));
                }
                0x10 => {
                    let end = self.pkg_end();
                    let name = self.name(scope);
                    self.ns.push((name.clone(), Obj::Scope));
                    self.term_list(end, &name);
                }
                0x14 => {
                    let end = self.pkg_end();
                    let name = self.name(scope);
                    let flags = self.byte();
                    self.ns.push((name, Obj::Method { args: flags & 7 }));
                    self.pos = end; // bodies are code, not namespace
                }
                0x5b if self.b[self.pos] == 0x82 => {
                    self.pos += 1;
                    let end = self.pkg_end();
                    let name = self.name(scope);
                    self.ns.push((name.clone(), Obj::Device));
                    self.term_list(end, &name);
                }
                op => panic!("unexpected opcode {op:#x} at {:#x}", self.pos - 1),
            }
            assert!(self.pos <= end, "object overruns its scope");
        }
    }
}

/// A resource descriptor of a `_CRS` buffer.
#[derive(Debug, PartialEq)]
enum Res {
    /// I/O port (16-bit decode): base, length.
    Io(u16, u8),
    /// IRQ (small descriptor): mask.
    Irq(u16),
    /// 32-bit fixed memory: base, length.
    Mem32(u32, u32),
    /// Word, DWord or QWord address space: resource type, min, max.
    Addr(u8, u64, u64),
}

/// Decodes a resource template (ACPI §6.4), which must end with an end tag.
fn resource_list(buf: &[u8]) -> Vec<Res> {
    let mut out = vec![];
    let mut i = 0;
    let le = |b: &[u8]| b.iter().rev().fold(0u64, |a, &x| (a << 8) | u64::from(x));
    loop {
        let tag = buf[i];
        if tag & 0x80 == 0 {
            let len = usize::from(tag & 7);
            let body = &buf[i + 1..i + 1 + len];
            match tag >> 3 {
                0x4 => out.push(Res::Irq(le(&body[..2]) as u16)),
                0x8 => {
                    assert_eq!((len, body[0]), (7, 1), "16-bit I/O descriptor");
                    assert_eq!(body[1..3], body[3..5], "fixed I/O range");
                    out.push(Res::Io(le(&body[1..3]) as u16, body[6]));
                }
                0xf => {
                    assert_eq!(i + 2, buf.len(), "end tag ends the template");
                    return out;
                }
                t => panic!("small resource type {t:#x}"),
            }
            i += 1 + len;
        } else {
            let len = le(&buf[i + 1..i + 3]) as usize;
            let body = &buf[i + 3..i + 3 + len];
            match tag {
                0x86 => out.push(Res::Mem32(le(&body[1..5]) as u32, le(&body[5..9]) as u32)),
                0x88 | 0x87 | 0x8a => {
                    let w = (len - 3) / 5;
                    out.push(Res::Addr(
                        body[0],
                        le(&body[3 + w..3 + 2 * w]),
                        le(&body[3 + 2 * w..3 + 3 * w]),
                    ));
                }
                t => panic!("large resource type {t:#x}"),
            }
            i += 3 + len;
        }
    }
}

/// The DSDT's namespace, decoded.
fn dsdt_namespace(mem: &GuestMemoryMmap, rsdp: u64) -> Vec<(String, Obj)> {
    let all = walk(mem, rsdp);
    let dsdt = &all.iter().find(|(s, _, _)| s == b"DSDT").unwrap().2;
    assert_eq!(dsdt[8], 2, "DSDT revision 2: 64-bit integers");
    AmlReader::decode(&dsdt[36..])
}

fn get<'a>(ns: &'a [(String, Obj)], path: &str) -> Option<&'a Obj> {
    let mut hits = ns.iter().filter(|(p, _)| p == path);
    let hit = hits.next().map(|(_, o)| o);
    assert!(hits.next().is_none(), "{path} defined twice");
    hit
}

fn crs(ns: &[(String, Obj)], device: &str) -> Vec<Res> {
    assert_eq!(get(ns, device), Some(&Obj::Device), "{device}");
    match get(ns, &format!("{device}._CRS")) {
        Some(Obj::Buffer(b)) => resource_list(b),
        other => panic!("{device}._CRS is {other:?}"),
    }
}

fn eisa_id(s: &str) -> u64 {
    let b = s.as_bytes();
    let c = |i: usize| u32::from(b[i] - 0x40);
    let h = |i: usize| (b[i] as char).to_digit(16).unwrap();
    let v = (c(0) << 26)
        | (c(1) << 21)
        | (c(2) << 16)
        | (h(3) << 12)
        | (h(4) << 8)
        | (h(5) << 4)
        | h(6);
    u64::from(v.swap_bytes())
}

fn hid(ns: &[(String, Obj)], device: &str) -> u64 {
    match get(ns, &format!("{device}._HID")) {
        Some(Obj::Int(v)) => *v,
        other => panic!("{device}._HID is {other:?}"),
    }
}

const ISA: &str = "\\_SB_.PC00.ISA_";

#[test]
fn the_dsdt_describes_the_platform() {
    let (mem, rsdp) = built(&AcpiConfig::new(2));
    let ns = dsdt_namespace(&mem, rsdp);

    assert_eq!(
        get(&ns, "\\_S5_"),
        Some(&Obj::Package(vec![
            Obj::Int(5),
            Obj::Int(0),
            Obj::Int(0),
            Obj::Int(0)
        ])),
        "SLP_TYP 5 is S5"
    );
    assert_eq!(get(&ns, "\\_PIC"), Some(&Obj::Method { args: 1 }));
    assert_eq!(get(&ns, "\\PICM"), Some(&Obj::Int(0)));

    let pc00 = "\\_SB_.PC00";
    assert_eq!(hid(&ns, pc00), eisa_id("PNP0A03"));
    assert_eq!(get(&ns, &format!("{pc00}._BBN")), Some(&Obj::Int(0)));
    assert_eq!(
        crs(&ns, pc00),
        vec![
            Res::Addr(2, 0, 0),
            Res::Io(0xcf8, 8),
            Res::Addr(1, 0, 0xcf7),
            Res::Addr(1, 0xd00, 0xffff),
            Res::Addr(0, 0xc000_0000, 0xdfff_ffff),
        ]
    );

    assert_eq!(
        get(&ns, &format!("{ISA}._ADR")),
        Some(&Obj::Int(0x001f_0000))
    );
    let com1 = format!("{ISA}.COM1");
    assert_eq!(hid(&ns, &com1), eisa_id("PNP0501"));
    assert_eq!(get(&ns, &format!("{com1}._UID")), Some(&Obj::Int(1)));
    assert_eq!(crs(&ns, &com1), vec![Res::Io(0x3f8, 8), Res::Irq(1 << 4)]);
    assert_eq!(
        get(&ns, &format!("{ISA}.COM2")),
        None,
        "COM2 is off by default"
    );
    assert_eq!(get(&ns, &format!("{ISA}.PS2K")), None, "no 8042 by default");

    let rtc = format!("{ISA}.RTC_");
    assert_eq!(hid(&ns, &rtc), eisa_id("PNP0B00"));
    assert_eq!(crs(&ns, &rtc), vec![Res::Io(0x70, 2), Res::Irq(1 << 8)]);
    let pit = format!("{ISA}.TIMR");
    assert_eq!(hid(&ns, &pit), eisa_id("PNP0100"));
    assert_eq!(crs(&ns, &pit), vec![Res::Io(0x40, 4), Res::Irq(1)]);
    let pic = format!("{ISA}.PIC_");
    assert_eq!(hid(&ns, &pic), eisa_id("PNP0000"));
    assert_eq!(
        crs(&ns, &pic),
        vec![Res::Io(0x20, 2), Res::Io(0xa0, 2), Res::Irq(1 << 2)]
    );
    let sres = format!("{ISA}.SRES");
    assert_eq!(hid(&ns, &sres), eisa_id("PNP0C02"));
    assert_eq!(
        crs(&ns, &sres),
        vec![
            Res::Io(0x400, 12),
            Res::Io(0x4d0, 2),
            Res::Mem32(0xe000_0000, 0x1000_0000)
        ]
    );

    let hpet = "\\_SB_.PC00.HPET";
    assert_eq!(hid(&ns, hpet), eisa_id("PNP0103"));
    assert_eq!(crs(&ns, hpet), vec![Res::Mem32(0xfed0_0000, 0x400)]);

    assert_eq!(get(&ns, "\\_SB_.PWRB"), Some(&Obj::Device));
    assert_eq!(hid(&ns, "\\_SB_.PWRB"), eisa_id("PNP0C0C"));
}

#[test]
fn options_add_com2_and_the_8042_and_drop_the_mcfg() {
    let cfg = AcpiConfig {
        com1: false,
        com2: true,
        i8042: true,
        mcfg: false,
        ..AcpiConfig::new(1)
    };
    let (mem, rsdp) = built(&cfg);
    let all = walk(&mem, rsdp);
    assert!(!all.iter().any(|(s, _, _)| s == b"MCFG"));
    let fadt = &all.iter().find(|(s, _, _)| s == b"FACP").unwrap().2;
    assert_eq!(
        u16::from_le_bytes([fadt[109], fadt[110]]),
        0x16,
        "8042 present, no VGA"
    );

    let ns = dsdt_namespace(&mem, rsdp);
    assert_eq!(get(&ns, &format!("{ISA}.COM1")), None);
    let com2 = format!("{ISA}.COM2");
    assert_eq!(get(&ns, &format!("{com2}._UID")), Some(&Obj::Int(2)));
    assert_eq!(crs(&ns, &com2), vec![Res::Io(0x2f8, 8), Res::Irq(1 << 3)]);
    let kbd = format!("{ISA}.PS2K");
    assert_eq!(hid(&ns, &kbd), eisa_id("PNP0303"));
    assert_eq!(
        crs(&ns, &kbd),
        vec![Res::Io(0x60, 1), Res::Io(0x64, 1), Res::Irq(1 << 1)]
    );
    assert_eq!(
        crs(&ns, &format!("{ISA}.SRES")),
        vec![Res::Io(0x400, 12), Res::Io(0x4d0, 2)],
        "no ECAM to reserve"
    );
}

#[test]
fn the_largest_vcpu_count_fits() {
    let (mem, rsdp) = built(&AcpiConfig::new(MAX_CPUS));
    let h = GuestMap(&mem);
    // SAFETY: the handler maps guest memory, which backs the whole BIOS area.
    let tables = unsafe { AcpiTables::from_rsdp(h, rsdp as usize) }.unwrap();
    let madt = tables.find_table::<Madt>().unwrap();
    let ids: Vec<u8> = madt
        .get()
        .entries()
        .filter_map(|e| match e {
            MadtEntry::LocalApic(l) => Some(l.apic_id),
            _ => None,
        })
        .collect();
    assert_eq!(ids, (0..=253).collect::<Vec<u8>>());
    walk(&mem, rsdp);
}

#[test]
fn bad_vcpu_counts_are_refused_and_nothing_is_written() {
    for ncpus in [0, MAX_CPUS + 1, 255, 256, u32::MAX] {
        let mem = guest_mem(64 * MIB);
        fill(&mem, ACPI_RSDP_ADDR, 64, 0xab);
        let err = build_acpi(&mem, &AcpiConfig::new(ncpus)).unwrap_err();
        assert!(
            matches!(err, LoaderError::CpuCount { ncpus: n, max: 254 } if n == ncpus),
            "{err:?}"
        );
        assert!(err.to_string().contains(&ncpus.to_string()), "{err}");
        assert_eq!(read_bytes(&mem, ACPI_RSDP_ADDR, 64), vec![0xab; 64]);
    }
}

#[test]
fn stale_tables_in_the_area_are_wiped() {
    let mem = guest_mem(64 * MIB);
    fill(
        &mem,
        ACPI_RSDP_ADDR,
        (ACPI_AREA_END - ACPI_RSDP_ADDR) as usize,
        0xff,
    );
    // An old, valid-looking RSDP high in the area (a previous boot's tables, say).
    let mut old = b"RSD PTR ".to_vec();
    old.resize(20, 0);
    old[15] = 0;
    let fix = 0u8.wrapping_sub(sum(&old));
    old[8] = fix;
    vm_memory::Bytes::write_slice(&mem, &old, GuestAddress(0xf_f000)).unwrap();
    build_acpi(&mem, &AcpiConfig::new(1)).unwrap();

    let area = read_bytes(
        &mem,
        BIOS_AREA_START,
        (ACPI_AREA_END - BIOS_AREA_START) as usize,
    );
    let hits: Vec<u64> = (0..area.len())
        .step_by(16)
        .filter(|&i| area[i..].starts_with(b"RSD PTR "))
        .map(|i| BIOS_AREA_START + i as u64)
        .collect();
    assert_eq!(hits, vec![ACPI_RSDP_ADDR]);
    assert_eq!(
        r8(&mem, ACPI_AREA_END - 1),
        0,
        "the end of the area is zeroed"
    );
}

#[test]
fn guest_memory_without_the_bios_area_is_an_error() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0x10_0000), 1 << 20)]).unwrap();
    let err = build_acpi(&mem, &AcpiConfig::new(1)).unwrap_err();
    assert!(
        matches!(err, LoaderError::GuestWrite { what: "ACPI table area", addr, .. } if addr == ACPI_RSDP_ADDR),
        "{err:?}"
    );
}

/// ACPICA (the interpreter Linux uses) disassembles and loads the tables and evaluates `\_S5_`.
/// Opt-in: needs Debian's `acpica-tools`.
#[test]
#[ignore = "needs acpica-tools (iasl, acpiexec): cargo test -p loader --test acpi -- --ignored"]
fn acpica_accepts_the_tables() {
    use std::process::Command;
    let cfg = AcpiConfig {
        com2: true,
        i8042: true,
        pci_slots: (1 << 3) | (1 << 4),
        ..AcpiConfig::new(4)
    };
    let (mem, rsdp) = built(&cfg);
    let dir = std::env::temp_dir().join(format!("loader-acpi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut files = vec![];
    for (sig, _, bytes) in walk(&mem, rsdp) {
        let name = dir.join(format!(
            "{}.dat",
            String::from_utf8_lossy(&sig).to_lowercase()
        ));
        std::fs::write(&name, bytes).unwrap();
        files.push(name);
    }
    for f in &files {
        let out = Command::new("iasl")
            .arg("-d")
            .arg(f)
            .output()
            .expect("iasl");
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "iasl -d {}: {text}", f.display());
        assert!(
            !text.contains("Error") && !text.contains("Warning"),
            "iasl -d {}: {text}",
            f.display()
        );
    }
    // All tables: ACPICA installs ours (by OEM ID) and loads the DSDT. (acpiexec's own hardware
    // self-test then reports the GPE and PM2 blocks we do not have; that part is not checked.)
    let out = Command::new("acpiexec")
        .args(["-b", "quit"])
        .args(&files[1..])
        .output()
        .expect("acpiexec");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    for sig in ["FACP", "DSDT", "APIC", "HPET", "MCFG"] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("ACPI: {sig}")) && l.contains("BHYVE")),
            "{sig}: {text}"
        );
    }
    assert!(
        text.contains("1 ACPI AML tables successfully acquired and loaded"),
        "{text}"
    );
    // The DSDT alone: loads and evaluates without a single ACPICA exception.
    let out = Command::new("acpiexec")
        .args([
            "-b",
            "evaluate \\_S5_; evaluate \\_SB_.PC00._CRS; evaluate \\_SB_.PC00.ISA_.COM1._CRS; \
             evaluate \\_SB_.PC00.ISA_.PS2K._CRS; evaluate \\_SB_.PC00.HPET._CRS; evaluate \\_PIC 1",
        ])
        .arg(dir.join("dsdt.dat"))
        .output()
        .expect("acpiexec");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("[Integer] = 0000000000000005"),
        "\\_S5_: {text}"
    );
    assert!(
        text.contains("47 01 F8 03 F8 03 01 08 22 10 00 79 00"),
        "COM1._CRS: {text}"
    );
    assert!(!text.contains("AE_"), "{text}");
    std::fs::remove_dir_all(&dir).unwrap();
}
