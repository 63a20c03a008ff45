//! What bhyvectl prints, formatted as bhyvectl(8) formats it.

use std::collections::BTreeMap;

use kmod::proto::{Reg, StatScope, VmListing};

use crate::opts::Item;

/// `humanize_number(buf, 8, n, "B", HN_AUTOSCALE, HN_NOSPACE)`: at most 5 digits, scaled by
/// 1024 with a K/M/G/T/P/E prefix, rounded to nearest.
pub fn humanize(n: u64) -> String {
    const PREFIX: [&str; 7] = ["", "K", "M", "G", "T", "P", "E"];
    // Room for 8 - strlen("B") - 2 digits: values up to 99999 are printed as they are.
    const MAX: u64 = 100_000;
    let (mut q, mut rem, mut i) = (n, 0u64, 0usize);
    while (q >= MAX || (q == MAX - 1 && rem >= 973)) && i + 1 < PREFIX.len() {
        rem = q % 1024;
        q /= 1024;
        i += 1;
    }
    let rounded = q + (rem + 512) / 1024;
    format!("{rounded}{}B", PREFIX.get(i).copied().unwrap_or("?"))
}

fn value(regs: &[(Reg, u64)], r: Reg) -> Option<u64> {
    regs.iter().find(|(x, _)| *x == r).map(|(_, v)| *v)
}

/// One line of a register dump, as `get_all_registers`/`get_all_segments` print it; `None`
/// when the VM did not report the register.
pub fn item_line(item: Item, vcpu: u32, regs: &[(Reg, u64)]) -> Option<String> {
    Some(match item {
        // "rflags[%d]\t0x%016lx" has one tab, the others two.
        Item::Reg(Reg::Rflags) => {
            format!("rflags[{vcpu}]\t0x{:016x}", value(regs, Reg::Rflags)?)
        }
        Item::Reg(r) => format!("{}[{vcpu}]\t\t0x{:016x}", r.name(), value(regs, r)?),
        Item::Desc(s) => {
            let [_, base, limit, access] = s.regs();
            format!(
                "{} desc[{vcpu}]\t0x{:016x}/0x{:08x}/0x{:08x}",
                s.name(),
                value(regs, base)?,
                value(regs, limit)?,
                value(regs, access)?
            )
        }
        Item::Table(t) => {
            let [base, limit] = t.regs();
            format!(
                "{}[{vcpu}]\t\t0x{:016x}/0x{:08x}",
                t.name(),
                value(regs, base)?,
                value(regs, limit)?
            )
        }
        Item::Selector(s) => {
            let [sel, ..] = s.regs();
            format!("{}[{vcpu}]\t\t0x{:04x}", s.name(), value(regs, sel)?)
        }
    })
}

/// `--get-stats` as bhyvectl prints it: `vcpuN stats:` and one `%-40s\t%ld` line per counter;
/// then any VM-wide scopes the same way.
pub fn stats_text(scopes: &[StatScope]) -> String {
    let mut s = String::new();
    for scope in scopes {
        s.push_str(&format!("{} stats:\n", scope.scope));
        for (desc, v) in &scope.counters {
            s.push_str(&format!("{desc:<40}\t{v}\n"));
        }
    }
    s
}

/// `--get-stats --json`.
pub fn stats_json(vm: &str, vcpu: u32, scopes: &[StatScope]) -> String {
    let scopes: Vec<serde_json::Value> = scopes
        .iter()
        .map(|s| {
            serde_json::json!({
                "scope": s.scope,
                "counters": s.counters.iter().map(|(d, v)| serde_json::json!({
                    "description": d,
                    "value": v,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let doc = serde_json::json!({ "vm": vm, "vcpu": vcpu, "scopes": scopes });
    format!("{doc:#}\n")
}

/// `--get-memseg`: the VM's system memory as one segment, as `show_memseg` prints it.
pub fn memseg(segments: &[(u64, u64)]) -> String {
    let total: u64 = segments
        .iter()
        .map(|(_, l)| *l)
        .fold(0, u64::saturating_add);
    let mut s = String::from("ID  Length      Name\n");
    if total > 0 {
        s.push_str(&format!("{:<4}{:<12}{}\n", 0, humanize(total), "sysmem"));
    }
    s
}

/// `--get-memmap`: each mapping of system memory, as `show_memmap` prints it.
pub fn memmap(segments: &[(u64, u64)]) -> String {
    let mut s = String::from("Address     Length      Segment     Offset      Prot  Flags\n");
    let mut offset = 0u64;
    for (gpa, len) in segments {
        s.push_str(&format!(
            "{:<12X}{:<12}{:<12}{:<12X}RWX   \n",
            gpa,
            humanize(*len),
            "sysmem",
            offset
        ));
        offset = offset.saturating_add(*len);
    }
    s
}

/// `--list`.
pub fn list(vms: &[VmListing]) -> String {
    let mut s = format!("{:<32}{:>6}  STATE\n", "NAME", "VCPUS");
    for vm in vms {
        let state = if vm.running { "running" } else { "created" };
        s.push_str(&format!("{:<32}{:>6}  {state}\n", vm.name, vm.ncpus));
    }
    s
}

/// `--sysctl`, as `sysctl hw.vmm` prints it.
pub fn sysctl(entries: &[(String, String)]) -> String {
    let sorted: BTreeMap<&str, &str> = entries
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    sorted.iter().map(|(k, v)| format!("{k}: {v}\n")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::opts::{Seg, Table};

    #[test]
    fn humanize_matches_humanize_number() {
        assert_eq!(humanize(0), "0B");
        assert_eq!(humanize(99_999), "99999B");
        assert_eq!(humanize(100_000), "98KB");
        assert_eq!(humanize(512 << 20), "512MB");
        assert_eq!(humanize(1 << 30), "1024MB");
        assert_eq!(humanize(4 << 30), "4096MB");
        assert_eq!(humanize(u64::MAX), "16384PB");
    }

    #[test]
    fn lines_are_bhyvectls() {
        let regs = vec![
            (Reg::Rip, 0x1000),
            (Reg::Rflags, 2),
            (Reg::R8, 8),
            (Reg::Cs, 8),
            (Reg::CsBase, 0),
            (Reg::CsLimit, 0xffff_ffff),
            (Reg::CsAccess, 0xa09b),
            (Reg::GdtrBase, 0x6000),
            (Reg::GdtrLimit, 0x1f),
        ];
        let line = |i| item_line(i, 1, &regs).unwrap();
        assert_eq!(line(Item::Reg(Reg::Rip)), "rip[1]\t\t0x0000000000001000");
        assert_eq!(
            line(Item::Reg(Reg::Rflags)),
            "rflags[1]\t0x0000000000000002"
        );
        assert_eq!(line(Item::Reg(Reg::R8)), "r8[1]\t\t0x0000000000000008");
        assert_eq!(
            line(Item::Desc(Seg::Cs)),
            "cs desc[1]\t0x0000000000000000/0xffffffff/0x0000a09b"
        );
        assert_eq!(
            line(Item::Table(Table::Gdtr)),
            "gdtr[1]\t\t0x0000000000006000/0x0000001f"
        );
        assert_eq!(line(Item::Selector(Seg::Cs)), "cs[1]\t\t0x0008");
        assert_eq!(item_line(Item::Reg(Reg::Rax), 1, &regs), None);
    }

    #[test]
    fn stats_print_description_left_value_right() {
        let scopes = vec![StatScope {
            scope: "vcpu0".into(),
            counters: vec![("total number of vm exits".into(), 42)],
        }];
        assert_eq!(
            stats_text(&scopes),
            "vcpu0 stats:\ntotal number of vm exits                \t42\n"
        );
        let j: serde_json::Value = serde_json::from_str(&stats_json("a\"b", 0, &scopes)).unwrap();
        assert_eq!(j["vm"], "a\"b");
        assert_eq!(j["scopes"][0]["counters"][0]["value"], 42);
    }

    #[test]
    fn memory_tables_follow_show_memseg_and_show_memmap() {
        let segs = [(0, 2 << 30), (1 << 32, 2 << 30)];
        assert_eq!(
            memseg(&segs),
            "ID  Length      Name\n0   4096MB      sysmem\n"
        );
        assert_eq!(
            memmap(&segs),
            "Address     Length      Segment     Offset      Prot  Flags\n\
             0           2048MB      sysmem      0           RWX   \n\
             100000000   2048MB      sysmem      80000000    RWX   \n"
        );
    }
}
