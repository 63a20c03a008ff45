//! Loader probes (tier: needs `/dev/kvm`): test kernels that report over COM1 what each boot protocol
//! handed them — the Linux zero page (e820, command line, initramfs address/size/contents, RSDP,
//! version, loader type, load flags, 64-bit entry), the Multiboot information structure and the PVH
//! start info — checked against what the protocols require, for two memory sizes.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;

const INITRD: &[u8] = b"INITRD-0123456789abcdef";
const FIRST8: u64 = u64::from_le_bytes(*b"INITRD-0");

fn dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("bhyve-probes-{}", std::process::id()));
    guests::write_all(&d).expect("guest images");
    // The tests run in parallel and share the folder: replace, never truncate, a file another
    // test's monitor may be reading (a truncated initrd once loaded as 0 bytes).
    guests::write_atomically(&d.join("initrd.bin"), INITRD).unwrap();
    d
}

/// Runs a probe; returns its report lines.
fn probe(kernel: &str, protocol: &str, mem: &str, cmdline: &str) -> Vec<String> {
    assert!(std::path::Path::new("/dev/kvm").exists(), "needs /dev/kvm");
    let d = dir();
    let o = Command::new(env!("CARGO_BIN_EXE_bhyve"))
        .args(["-m", mem, "-l", "com1,stdio", "-o"])
        .arg(format!("boot.kernel={}", d.join(kernel).display()))
        .arg("-o")
        .arg(format!("boot.initrd={}", d.join("initrd.bin").display()))
        .args(["-o", &format!("boot.protocol={protocol}")])
        .args(["-o", &format!("boot.cmdline={cmdline}")])
        .arg(format!("{protocol}-{}", std::process::id()))
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    eprintln!("{out}{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(o.status.code(), Some(1), "probe {kernel} did not finish");
    out.lines().map(str::to_string).collect()
}

/// `key=value` pairs of the first line starting with `prefix`.
fn fields(lines: &[String], prefix: &str) -> HashMap<String, String> {
    let line = lines
        .iter()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line {prefix}"));
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn hex(s: &str) -> u64 {
    u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap()
}

/// (addr, len, type) of every map line starting with `prefix`.
fn map(lines: &[String], prefix: &str, addr_key: &str) -> Vec<(u64, u64, u64)> {
    lines
        .iter()
        .filter(|l| l.starts_with(prefix))
        .map(|l| {
            let f: HashMap<_, _> = l
                .split_whitespace()
                .filter_map(|w| w.split_once('='))
                .collect();
            (hex(f[addr_key]), hex(f["len"]), f["type"].parse().unwrap())
        })
        .collect()
}

fn expected_map(mem: u64) -> Vec<(u64, u64, u64)> {
    vec![
        (0, 0x9fc00, 1),
        (0x9fc00, 0x100000 - 0x9fc00, 2),
        (0x100000, mem - 0x100000, 1),
    ]
}

#[test]
fn linux_probe_sees_a_correct_zero_page() {
    for (m, mem) in [("256M", 256u64 << 20), ("512M", 512 << 20)] {
        let l = probe(
            "probe_linux.bzImage",
            "linux",
            m,
            "console=ttyS0 root=/dev/ram0 quiet",
        );
        let f = fields(&l, "LINUX boot_params=");
        assert_eq!(hex(&f["version"]), 0x020f);
        assert_eq!(hex(&f["type_of_loader"]), 0xff, "undefined loader id");
        let flags = hex(&f["loadflags"]);
        assert_eq!(flags & 0x81, 0x81, "LOADED_HIGH and CAN_USE_HEAP");
        assert!(l.contains(&"LINUX cmdline=console=ttyS0 root=/dev/ram0 quiet".to_string()));
        let r = fields(&l, "LINUX ramdisk_image=");
        let (addr, size) = (hex(&r["ramdisk_image"]), hex(&r["ramdisk_size"]));
        assert_eq!(size, INITRD.len() as u64);
        assert_eq!(addr % 4096, 0, "initramfs page-aligned");
        assert!(
            addr >= 0x100000 && addr + size <= mem,
            "initramfs inside RAM"
        );
        assert_eq!(
            hex(&r["first"]),
            FIRST8,
            "the initramfs bytes are at that address"
        );
        assert_eq!(
            hex(&fields(&l, "LINUX acpi_rsdp_addr=")["acpi_rsdp_addr"]),
            0xf2400
        );
        let n: usize = fields(&l, "LINUX e820_entries=")["e820_entries"]
            .parse()
            .unwrap();
        let e820 = map(&l, "LINUX e820 addr=", "addr");
        assert_eq!(e820.len(), n);
        assert_eq!(e820, expected_map(mem));
        assert_eq!(hex(&fields(&l, "LINUX entry64=")["entry64"]), 0x100200);
    }
}

#[test]
fn multiboot_probe_sees_a_correct_information_structure() {
    for (m, mem) in [("256M", 256u64 << 20), ("512M", 512 << 20)] {
        let l = probe("probe_multiboot.elf", "multiboot", m, "mbtest a=1");
        let f = fields(&l, "MB magic=");
        assert_eq!(hex(&f["magic"]), 0x2bad_b002);
        let flags = hex(&f["flags"]);
        for (bit, what) in [
            (0, "mem"),
            (2, "cmdline"),
            (3, "mods"),
            (6, "mmap"),
            (9, "loader name"),
        ] {
            assert_ne!(flags & (1 << bit), 0, "flag for {what}");
        }
        let f = fields(&l, "MB mem_lower=");
        assert_eq!(f["mem_lower"], "639");
        assert_eq!(f["mem_upper"], ((mem - (1 << 20)) / 1024).to_string());
        assert!(l.contains(&"MB cmdline=mbtest a=1".to_string()));
        assert_eq!(fields(&l, "MB mods=")["mods"], "1");
        let md = fields(&l, "MB mod start=");
        let (start, end) = (hex(&md["start"]), hex(&md["end"]));
        assert_eq!(end - start, INITRD.len() as u64);
        assert_eq!(start % 4096, 0, "flag bit 0: modules page-aligned");
        assert_eq!(hex(&md["first"]), FIRST8);
        assert_eq!(map(&l, "MB mmap base=", "base"), expected_map(mem));
        assert!(l.contains(&"MB loader=bhyve-rs".to_string()));
    }
}

#[test]
fn pvh_probe_sees_a_correct_start_info() {
    for (m, mem) in [("256M", 256u64 << 20), ("512M", 512 << 20)] {
        let l = probe("probe_pvh.elf", "pvh", m, "pvhtest b=2");
        let f = fields(&l, "PVH magic=");
        assert_eq!(hex(&f["magic"]), 0x336e_c578);
        assert_eq!(f["version"], "1");
        assert!(l.contains(&"PVH cmdline=pvhtest b=2".to_string()));
        assert_eq!(hex(&fields(&l, "PVH rsdp=")["rsdp"]), 0xf2400);
        assert_eq!(fields(&l, "PVH mods=")["mods"], "1");
        let md = fields(&l, "PVH mod paddr=");
        assert_eq!(hex(&md["size"]), INITRD.len() as u64);
        assert_eq!(hex(&md["first"]), FIRST8);
        assert_eq!(map(&l, "PVH mmap addr=", "addr"), expected_map(mem));
    }
}

/// A regular initrd file is read straight into guest memory (the tests above); one that is not a
/// regular file — a pipe, as `-o boot.initrd=<(zcat …)` gives — is read into memory first, and
/// the guest finds the same bytes.
#[test]
fn an_initrd_from_a_pipe_reaches_the_guest_too() {
    use std::io::Write;
    use std::process::Stdio;
    let d = dir();
    let mut child = Command::new(env!("CARGO_BIN_EXE_bhyve"))
        .args(["-m", "256M", "-l", "com1,stdio", "-o"])
        .arg(format!(
            "boot.kernel={}",
            d.join("probe_linux.bzImage").display()
        ))
        .args(["-o", "boot.initrd=/dev/stdin", "-o", "boot.protocol=linux"])
        .arg(format!("pipe-{}", std::process::id()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(INITRD).unwrap();
    drop(stdin);
    let o = child.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    eprintln!("{out}{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(o.status.code(), Some(1), "the probe did not finish");
    let l: Vec<String> = out.lines().map(str::to_string).collect();
    let r = fields(&l, "LINUX ramdisk_image=");
    assert_eq!(hex(&r["ramdisk_size"]), INITRD.len() as u64);
    assert_eq!(hex(&r["first"]), FIRST8);
}
