//! Command-line options, named as bhyvectl(8) names them (getopt_long style: `--name=VALUE` or
//! `--name VALUE`).

use std::path::PathBuf;

use kmod::proto::{PinOp, Reg};
use passthrough::PciAddress;
use stages::VmRequest;

/// Why the command line cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptsError {
    /// Not an option we know.
    #[error("Unknown option {0}")]
    Unknown(String),
    /// An option that takes a value got none.
    #[error("Option --{0} needs a value")]
    MissingValue(String),
    /// An option that takes no value got one.
    #[error("Option --{0} takes no value")]
    UnexpectedValue(String),
    /// A value that cannot be used.
    #[error("Invalid value {value:?} for --{option}: {reason}")]
    BadValue {
        /// The option.
        option: String,
        /// The value.
        value: String,
        /// Why.
        reason: String,
    },
    /// A bare argument (bhyvectl takes none).
    #[error("Unexpected argument {0:?}")]
    Positional(String),
}

/// What the registers dump prints, in bhyvectl's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Item {
    /// A register printed as `name[vcpu]\t\t0x%016lx`.
    Reg(Reg),
    /// A segment descriptor: `seg desc[vcpu]\t0xBASE/0xLIMIT/0xACCESS`.
    Desc(Seg),
    /// A descriptor table: `gdtr[vcpu]\t\t0xBASE/0xLIMIT`.
    Table(Table),
    /// A segment selector: `cs[vcpu]\t\t0x%04lx`.
    Selector(Seg),
}

/// A segment register.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[allow(missing_docs)]
pub enum Seg {
    Ds,
    Es,
    Fs,
    Gs,
    Ss,
    Cs,
    Tr,
    Ldtr,
}

impl Seg {
    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Seg::Ds => "ds",
            Seg::Es => "es",
            Seg::Fs => "fs",
            Seg::Gs => "gs",
            Seg::Ss => "ss",
            Seg::Cs => "cs",
            Seg::Tr => "tr",
            Seg::Ldtr => "ldtr",
        }
    }

    /// (selector, base, limit, access) registers.
    pub fn regs(self) -> [Reg; 4] {
        match self {
            Seg::Ds => [Reg::Ds, Reg::DsBase, Reg::DsLimit, Reg::DsAccess],
            Seg::Es => [Reg::Es, Reg::EsBase, Reg::EsLimit, Reg::EsAccess],
            Seg::Fs => [Reg::Fs, Reg::FsBase, Reg::FsLimit, Reg::FsAccess],
            Seg::Gs => [Reg::Gs, Reg::GsBase, Reg::GsLimit, Reg::GsAccess],
            Seg::Ss => [Reg::Ss, Reg::SsBase, Reg::SsLimit, Reg::SsAccess],
            Seg::Cs => [Reg::Cs, Reg::CsBase, Reg::CsLimit, Reg::CsAccess],
            Seg::Tr => [Reg::Tr, Reg::TrBase, Reg::TrLimit, Reg::TrAccess],
            Seg::Ldtr => [Reg::Ldtr, Reg::LdtrBase, Reg::LdtrLimit, Reg::LdtrAccess],
        }
    }
}

/// A descriptor-table register.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[allow(missing_docs)]
pub enum Table {
    Gdtr,
    Idtr,
}

impl Table {
    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Table::Gdtr => "gdtr",
            Table::Idtr => "idtr",
        }
    }

    /// (base, limit) registers.
    pub fn regs(self) -> [Reg; 2] {
        match self {
            Table::Gdtr => [Reg::GdtrBase, Reg::GdtrLimit],
            Table::Idtr => [Reg::IdtrBase, Reg::IdtrLimit],
        }
    }
}

/// Registers in the order bhyvectl's `get_all_registers` prints them (it also has `dr0`-`dr7`,
/// which our backend does not expose).
pub const REG_ORDER: [Reg; 23] = [
    Reg::Efer,
    Reg::Cr0,
    Reg::Cr2,
    Reg::Cr3,
    Reg::Cr4,
    Reg::Rsp,
    Reg::Rip,
    Reg::Rax,
    Reg::Rbx,
    Reg::Rcx,
    Reg::Rdx,
    Reg::Rsi,
    Reg::Rdi,
    Reg::Rbp,
    Reg::R8,
    Reg::R9,
    Reg::R10,
    Reg::R11,
    Reg::R12,
    Reg::R13,
    Reg::R14,
    Reg::R15,
    Reg::Rflags,
];

/// Segment descriptors in `get_all_segments` order.
pub const DESC_ORDER: [Seg; 8] = [
    Seg::Ds,
    Seg::Es,
    Seg::Fs,
    Seg::Gs,
    Seg::Ss,
    Seg::Cs,
    Seg::Tr,
    Seg::Ldtr,
];

/// Selectors in `get_all_segments` order.
pub const SELECTOR_ORDER: [Seg; 8] = [
    Seg::Cs,
    Seg::Ds,
    Seg::Es,
    Seg::Fs,
    Seg::Gs,
    Seg::Ss,
    Seg::Tr,
    Seg::Ldtr,
];

/// Registers `--set-REG=VALUE` accepts (bhyvectl's general-register setters).
pub const SETTABLE: [Reg; 4] = [Reg::Rsp, Reg::Rip, Reg::Rax, Reg::Rflags];

/// Everything every `--get-all` dump prints, in order.
pub fn all_items() -> Vec<Item> {
    let mut v: Vec<Item> = REG_ORDER.iter().map(|r| Item::Reg(*r)).collect();
    v.extend(DESC_ORDER.iter().map(|s| Item::Desc(*s)));
    v.push(Item::Table(Table::Gdtr));
    v.push(Item::Table(Table::Idtr));
    v.extend(SELECTOR_ORDER.iter().map(|s| Item::Selector(*s)));
    v
}

/// The parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// `--vm=NAME`.
    pub vm: Option<String>,
    /// `--cpu=N` (default 0).
    pub cpu: u32,
    /// `--socket-dir=DIR`.
    pub socket_dir: PathBuf,
    /// `--create`.
    pub create: bool,
    /// `--ncpus=N` for `--create` (default 1).
    pub ncpus: u32,
    /// `--destroy`.
    pub destroy: bool,
    /// `--get-all`.
    pub get_all: bool,
    /// `--get-REG`, `--get-desc-SEG`, `--get-SEG` (printed in bhyvectl's order).
    pub get: Vec<Item>,
    /// `--get-stats`.
    pub get_stats: bool,
    /// `--json`: machine-readable `--get-stats`.
    pub json: bool,
    /// `--top=SECONDS`: a live view of exit rates, refreshed every SECONDS (kept in ms).
    pub top: Option<u32>,
    /// `--iterations=N`: stop `--top` after N refreshes (default: until interrupted).
    pub iterations: Option<u32>,
    /// `--trace=on|off`: exit tracing, switched at run time.
    pub trace: Option<bool>,
    /// `--get-memseg`.
    pub get_memseg: bool,
    /// `--get-memmap`.
    pub get_memmap: bool,
    /// `--set-REG=VALUE`, in order.
    pub set: Vec<(Reg, u64)>,
    /// `--force-reset`.
    pub force_reset: bool,
    /// `--force-poweroff`.
    pub force_poweroff: bool,
    /// `--suspend=HOW`.
    pub suspend: Option<VmRequest>,
    /// `--reinit`.
    pub reinit: bool,
    /// `--pause`.
    pub pause: bool,
    /// `--resume`.
    pub resume: bool,
    /// `--ioapic-assert=PIN` and friends, in order.
    pub ioapic: Vec<(u32, PinOp)>,
    /// `--inject-msi=ADDR:DATA`, in order.
    pub msi: Vec<(u64, u32)>,
    /// `--assign-pptdev=B/S/F`.
    pub assign: Vec<PciAddress>,
    /// `--unassign-pptdev=B/S/F`.
    pub unassign: Vec<PciAddress>,
    /// `--list`.
    pub list: bool,
    /// `--sysctl`.
    pub sysctl: bool,
    /// `--help`.
    pub help: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            vm: None,
            cpu: 0,
            socket_dir: PathBuf::from(kmod::DEFAULT_SOCKET_DIR),
            create: false,
            ncpus: 1,
            destroy: false,
            get_all: false,
            get: Vec::new(),
            get_stats: false,
            json: false,
            top: None,
            iterations: None,
            trace: None,
            get_memseg: false,
            get_memmap: false,
            set: Vec::new(),
            force_reset: false,
            force_poweroff: false,
            suspend: None,
            reinit: false,
            pause: false,
            resume: false,
            ioapic: Vec::new(),
            msi: Vec::new(),
            assign: Vec::new(),
            unassign: Vec::new(),
            list: false,
            sysctl: false,
            help: false,
        }
    }
}

impl Options {
    /// Whether anything needs the VM's own socket (everything but create, destroy, list and
    /// sysctl).
    pub fn needs_vm_socket(&self) -> bool {
        self.get_all
            || !self.get.is_empty()
            || self.get_stats
            || self.top.is_some()
            || self.trace.is_some()
            || self.get_memseg
            || self.get_memmap
            || !self.set.is_empty()
            || self.force_reset
            || self.force_poweroff
            || self.suspend.is_some()
            || self.reinit
            || self.pause
            || self.resume
            || !self.ioapic.is_empty()
            || !self.msi.is_empty()
            || !self.assign.is_empty()
            || !self.unassign.is_empty()
    }

    /// What the register dump prints, in bhyvectl's order, once each.
    pub fn items(&self) -> Vec<Item> {
        all_items()
            .into_iter()
            .filter(|i| self.get_all || self.get.contains(i))
            .collect()
    }
}

/// A number as `strtoul(s, NULL, 0)` reads it (decimal, `0x` hex, leading-`0` octal), but
/// strict: the whole string must be the number.
pub fn parse_number(s: &str) -> Option<u64> {
    let (digits, radix) = if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        (h, 16)
    } else if let Some(o) = s.strip_prefix('0').filter(|o| !o.is_empty()) {
        (o, 8)
    } else {
        (s, 10)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    u64::from_str_radix(digits, radix).ok()
}

fn bad(option: &str, value: &str, reason: impl Into<String>) -> OptsError {
    OptsError::BadValue {
        option: option.to_owned(),
        value: value.to_owned(),
        reason: reason.into(),
    }
}

fn number(option: &str, value: &str) -> Result<u64, OptsError> {
    parse_number(value).ok_or_else(|| bad(option, value, "not a number"))
}

fn number_u32(option: &str, value: &str) -> Result<u32, OptsError> {
    u32::try_from(number(option, value)?).map_err(|_| bad(option, value, "too large"))
}

/// `bus/slot/function`, decimal, as bhyvectl's `--unassign-pptdev` reads it.
fn pci(option: &str, value: &str) -> Result<PciAddress, OptsError> {
    let parts: Vec<&str> = value.split('/').collect();
    let [b, s, f] = parts.as_slice() else {
        return Err(bad(option, value, "expected bus/slot/function"));
    };
    let field = |x: &str| {
        x.parse::<u8>()
            .map_err(|_| bad(option, value, "expected bus/slot/function"))
    };
    PciAddress::new(field(b)?, field(s)?, field(f)?).map_err(|e| bad(option, value, e.to_string()))
}

/// Options taking a value.
fn takes_value(name: &str) -> bool {
    matches!(
        name,
        "vm" | "cpu"
            | "top"
            | "iterations"
            | "trace"
            | "socket-dir"
            | "ncpus"
            | "suspend"
            | "ioapic-assert"
            | "ioapic-deassert"
            | "ioapic-pulse"
            | "inject-msi"
            | "assign-pptdev"
            | "unassign-pptdev"
    ) || name.strip_prefix("set-").is_some()
}

fn flag_item(name: &str) -> Option<Item> {
    let what = name.strip_prefix("get-")?;
    if let Some(d) = what.strip_prefix("desc-") {
        if let Some(s) = DESC_ORDER.iter().find(|s| s.name() == d) {
            return Some(Item::Desc(*s));
        }
        return [Table::Gdtr, Table::Idtr]
            .into_iter()
            .find(|t| t.name() == d)
            .map(Item::Table);
    }
    if let Some(s) = SELECTOR_ORDER.iter().find(|s| s.name() == what) {
        return Some(Item::Selector(*s));
    }
    REG_ORDER
        .iter()
        .find(|r| r.name() == what)
        .map(|r| Item::Reg(*r))
}

/// Parses the arguments (without the program name).
pub fn parse(args: &[String]) -> Result<Options, OptsError> {
    let mut o = Options::default();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        if arg == "-h" {
            o.help = true;
            continue;
        }
        let Some(body) = arg.strip_prefix("--") else {
            return Err(OptsError::Positional(arg.clone()));
        };
        let (name, inline) = match body.split_once('=') {
            Some((n, v)) => (n, Some(v.to_owned())),
            None => (body, None),
        };
        let value = if takes_value(name) {
            match inline {
                Some(v) => v,
                None => it
                    .next()
                    .cloned()
                    .ok_or_else(|| OptsError::MissingValue(name.to_owned()))?,
            }
        } else {
            if inline.is_some() {
                return Err(OptsError::UnexpectedValue(name.to_owned()));
            }
            String::new()
        };
        match name {
            "vm" => o.vm = Some(value),
            "cpu" => o.cpu = number_u32(name, &value)?,
            "socket-dir" => o.socket_dir = PathBuf::from(value),
            "ncpus" => o.ncpus = number_u32(name, &value)?,
            "create" => o.create = true,
            "destroy" => o.destroy = true,
            "get-all" => o.get_all = true,
            "get-stats" => o.get_stats = true,
            "json" => o.json = true,
            "top" => {
                let secs: f64 = value
                    .parse()
                    .ok()
                    .filter(|s: &f64| s.is_finite() && *s >= 0.1 && *s <= 3600.0)
                    .ok_or_else(|| OptsError::BadValue {
                        option: name.to_owned(),
                        value: value.clone(),
                        reason: "expected seconds between 0.1 and 3600".into(),
                    })?;
                // 0.1 s to an hour: the product is in 100..=3_600_000.
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                let ms = (secs * 1000.0).round() as u32;
                o.top = Some(ms);
            }
            "iterations" => o.iterations = Some(number_u32(name, &value)?),
            "trace" => {
                o.trace = Some(match value.as_str() {
                    "on" => true,
                    "off" => false,
                    _ => {
                        return Err(OptsError::BadValue {
                            option: name.to_owned(),
                            value: value.clone(),
                            reason: "expected on or off".into(),
                        })
                    }
                })
            }
            "get-memseg" => o.get_memseg = true,
            "get-memmap" => o.get_memmap = true,
            "force-reset" => o.force_reset = true,
            "force-poweroff" => o.force_poweroff = true,
            "reinit" => o.reinit = true,
            "pause" => o.pause = true,
            "resume" => o.resume = true,
            "list" => o.list = true,
            "sysctl" => o.sysctl = true,
            "help" => o.help = true,
            "suspend" => {
                o.suspend = Some(match value.as_str() {
                    "reset" => VmRequest::Reset,
                    "poweroff" => VmRequest::PowerOff,
                    "halt" => VmRequest::Halt,
                    "triplefault" => VmRequest::TripleFault,
                    _ => {
                        return Err(bad(
                            name,
                            &value,
                            "expected reset, poweroff, halt or triplefault (snapshots to a file are not supported)",
                        ))
                    }
                })
            }
            "ioapic-assert" => o.ioapic.push((number_u32(name, &value)?, PinOp::Assert)),
            "ioapic-deassert" => o.ioapic.push((number_u32(name, &value)?, PinOp::Deassert)),
            "ioapic-pulse" => o.ioapic.push((number_u32(name, &value)?, PinOp::Pulse)),
            "inject-msi" => {
                let Some((a, d)) = value.split_once(':') else {
                    return Err(bad(name, &value, "expected ADDR:DATA"));
                };
                o.msi.push((number(name, a)?, number_u32(name, d)?));
            }
            "assign-pptdev" => o.assign.push(pci(name, &value)?),
            "unassign-pptdev" => o.unassign.push(pci(name, &value)?),
            _ => {
                if let Some(reg) = name.strip_prefix("set-") {
                    let Some(r) = SETTABLE.iter().find(|r| r.name() == reg) else {
                        return Err(OptsError::Unknown(arg.clone()));
                    };
                    o.set.push((*r, number(name, &value)?));
                } else if let Some(item) = flag_item(name) {
                    if !o.get.contains(&item) {
                        o.get.push(item);
                    }
                } else {
                    return Err(OptsError::Unknown(arg.clone()));
                }
            }
        }
    }
    Ok(o)
}

/// The usage text.
pub fn usage() -> String {
    let mut s = String::from(
        "Usage: bhyvectl --vm=<vmname>\n\
         \x20      [--socket-dir=<dir>]            (default /run/bhyve-rs)\n\
         \x20      [--cpu=<vcpu_number>]\n\
         \x20      [--create] [--ncpus=<n>]\n\
         \x20      [--destroy]\n\
         \x20      [--get-all]\n\
         \x20      [--get-stats] [--json] [--top=SECONDS [--iterations=N]] [--trace=on|off]\n\
         \x20      [--get-memseg]\n\
         \x20      [--get-memmap]\n",
    );
    for r in SETTABLE {
        s.push_str(&format!("       [--set-{}=<value>]\n", r.name()));
    }
    for r in REG_ORDER {
        s.push_str(&format!("       [--get-{}]\n", r.name()));
    }
    for d in DESC_ORDER {
        s.push_str(&format!("       [--get-desc-{}]\n", d.name()));
    }
    s.push_str("       [--get-desc-gdtr]\n       [--get-desc-idtr]\n");
    for d in SELECTOR_ORDER {
        s.push_str(&format!("       [--get-{}]\n", d.name()));
    }
    s.push_str(
        "       [--force-reset]\n\
         \x20      [--force-poweroff]\n\
         \x20      [--suspend=<reset|poweroff|halt|triplefault>]\n\
         \x20      [--reinit]\n\
         \x20      [--pause]\n\
         \x20      [--resume]\n\
         \x20      [--ioapic-assert=<pin>]\n\
         \x20      [--ioapic-deassert=<pin>]\n\
         \x20      [--ioapic-pulse=<pin>]\n\
         \x20      [--inject-msi=<addr>:<data>]\n\
         \x20      [--assign-pptdev=<bus/slot/func>]\n\
         \x20      [--unassign-pptdev=<bus/slot/func>]\n\
         \x20  or: bhyvectl [--socket-dir=<dir>] --list | --sysctl\n",
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|a| (*a).to_owned()).collect()
    }

    #[test]
    fn numbers_read_like_strtoul_base_0_but_strictly() {
        assert_eq!(parse_number("10"), Some(10));
        assert_eq!(parse_number("0x1f"), Some(31));
        assert_eq!(parse_number("010"), Some(8));
        assert_eq!(parse_number("0"), Some(0));
        assert_eq!(parse_number("0xffffffffffffffff"), Some(u64::MAX));
        for bad in ["", "0x", "12a", "-1", "09", "0x10000000000000000"] {
            assert_eq!(parse_number(bad), None, "{bad}");
        }
    }

    #[test]
    fn bhyvectl_options_parse_in_both_forms() {
        let o = parse(&args(&[
            "--vm=web",
            "--cpu",
            "1",
            "--get-rip",
            "--get-desc-cs",
            "--get-cs",
            "--get-desc-gdtr",
            "--set-rip=0x1000",
            "--set-rax",
            "7",
            "--get-stats",
            "--json",
            "--socket-dir=/tmp/x",
            "--ioapic-pulse=4",
            "--inject-msi=0xfee00000:0x41",
            "--unassign-pptdev=10/0/0",
            "--suspend=halt",
        ]))
        .unwrap();
        assert_eq!(o.vm.as_deref(), Some("web"));
        assert_eq!(o.cpu, 1);
        assert_eq!(o.socket_dir, PathBuf::from("/tmp/x"));
        assert_eq!(o.set, vec![(Reg::Rip, 0x1000), (Reg::Rax, 7)]);
        assert_eq!(o.ioapic, vec![(4, PinOp::Pulse)]);
        assert_eq!(o.msi, vec![(0xfee0_0000, 0x41)]);
        assert_eq!(o.unassign, vec![PciAddress::new(10, 0, 0).unwrap()]);
        assert_eq!(o.suspend, Some(VmRequest::Halt));
        assert!(o.get_stats && o.json && o.needs_vm_socket());
        // Printed in bhyvectl's order, not the command line's.
        assert_eq!(
            o.items(),
            vec![
                Item::Reg(Reg::Rip),
                Item::Desc(Seg::Cs),
                Item::Table(Table::Gdtr),
                Item::Selector(Seg::Cs)
            ]
        );
    }

    #[test]
    fn get_all_covers_every_item_once() {
        let o = parse(&args(&["--vm=a", "--get-all", "--get-rip"])).unwrap();
        let items = o.items();
        assert_eq!(items, all_items());
        assert_eq!(items.len(), 23 + 8 + 2 + 8);
    }

    #[test]
    fn bad_command_lines_say_what_is_wrong() {
        assert_eq!(
            parse(&args(&["--vm=a", "--frobnicate"]))
                .unwrap_err()
                .to_string(),
            "Unknown option --frobnicate"
        );
        assert_eq!(
            parse(&args(&["--vm"])).unwrap_err().to_string(),
            "Option --vm needs a value"
        );
        assert_eq!(
            parse(&args(&["--get-all=1"])).unwrap_err().to_string(),
            "Option --get-all takes no value"
        );
        assert_eq!(
            parse(&args(&["--set-cr0=1"])).unwrap_err().to_string(),
            "Unknown option --set-cr0=1"
        );
        assert_eq!(
            parse(&args(&["--cpu=x"])).unwrap_err().to_string(),
            "Invalid value \"x\" for --cpu: not a number"
        );
        assert_eq!(
            parse(&args(&["--unassign-pptdev=1/32/0"]))
                .unwrap_err()
                .to_string(),
            "Invalid value \"1/32/0\" for --unassign-pptdev: Slot 32 out of range (0..=31)"
        );
        assert!(parse(&args(&["--suspend=/tmp/snap"]))
            .unwrap_err()
            .to_string()
            .contains("snapshots to a file are not supported"));
        assert_eq!(
            parse(&args(&["web"])).unwrap_err(),
            OptsError::Positional("web".into())
        );
    }

    #[test]
    fn the_usage_lists_every_getter_and_setter() {
        let u = usage();
        for r in REG_ORDER {
            assert!(u.contains(&format!("[--get-{}]", r.name())));
        }
        assert!(u.contains("[--set-rip=<value>]"));
        assert!(u.contains("[--get-desc-ldtr]"));
    }
}
