//! bhyve(8)-style command line and configuration.
//!
//! Every option ends up as a `key=value` configuration variable, as bhyve(8) does since FreeBSD 13
//! (`-o key=value`, `-k file`); the typed [`Config`] is built from those variables, and every error
//! names the option or key at fault.

use std::collections::BTreeMap;
use std::path::PathBuf;

/// A bad command line or configuration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OptError {
    /// An option letter we do not know.
    #[error("Unknown option '-{0}' (see bhyve -h)")]
    UnknownOption(String),
    /// An option that needs an argument got none.
    #[error("Option '-{0}' needs an argument")]
    MissingArgument(char),
    /// No VM name.
    #[error("No VM name given: it goes last on the command line")]
    MissingName,
    /// More than one positional argument.
    #[error("Unexpected argument '{0}' after the VM name")]
    ExtraArgument(String),
    /// A VM name we refuse.
    #[error("Bad VM name '{0}': use 1 to 31 characters from A-Z a-z 0-9 . _ -")]
    BadName(String),
    /// A value that does not parse.
    #[error("Bad value '{value}' for {what}: {why}")]
    BadValue {
        /// The option or key.
        what: String,
        /// The value given.
        value: String,
        /// Why it is bad.
        why: String,
    },
    /// `-o` without `=`.
    #[error("Bad -o '{0}': expected key=value")]
    BadAssignment(String),
    /// A configuration file that cannot be read or has a bad line.
    #[error("Config file {path}: {why}")]
    ConfigFile {
        /// The file.
        path: String,
        /// What is wrong (with the line number).
        why: String,
    },
    /// A key we do not know.
    #[error("Unknown configuration key '{0}'")]
    UnknownKey(String),
    /// A PCI slot emulation we do not have.
    #[error(
        "-s {slot}: device emulation '{emulation}' is not supported (supported: hostbridge, lpc)"
    )]
    UnsupportedEmulation {
        /// The -s argument.
        slot: String,
        /// The emulation asked for.
        emulation: String,
    },
    /// A device's options are wrong.
    #[error("-s {slot}: {why}")]
    DeviceOptions {
        /// The -s argument.
        slot: String,
        /// What is wrong (names the option).
        why: String,
    },
    /// Two devices in one PCI slot/function.
    #[error("-s {0}: PCI slot {1} is already taken")]
    SlotTaken(String, String),
    /// No kernel to boot.
    #[error("Nothing to boot: give the guest kernel with -o boot.kernel=PATH")]
    NoKernel,
}

/// Where a UART's bytes go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleBackend {
    /// The monitor's stdin/stdout.
    Stdio,
    /// Output appended to a file.
    File(PathBuf),
    /// A Unix socket the monitor listens on (one client at a time).
    Unix(PathBuf),
    /// Discard output.
    Null,
}

/// Which boot protocol to use for the kernel image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootProtocol {
    /// Detect: bzImage, then a PVH note, then a Multiboot header, then an ELF64 vmlinux.
    Auto,
    /// The Linux 64-bit boot protocol (bzImage or ELF vmlinux; PVH if the ELF has the note).
    Linux,
    /// PVH (ELF with XEN_ELFNOTE_PHYS32_ENTRY).
    Pvh,
    /// Multiboot v1.
    Multiboot,
}

/// A PCI device model placed with `-s slot[:function],emulation[,conf]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciDevice {
    /// PCI slot (device number) on bus 0.
    pub slot: u8,
    /// PCI function.
    pub function: u8,
    /// The parsed emulation and options.
    pub spec: virtio::options::DeviceSpec,
    /// Options bhyve accepts that we ignore, with the reason (told to the operator).
    pub ignored: Vec<String>,
}

/// The typed configuration of one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// VM name.
    pub name: String,
    /// vCPUs.
    pub cpus: u32,
    /// Guest memory in bytes.
    pub memory: u64,
    /// COM1 backend, if configured.
    pub com1: Option<ConsoleBackend>,
    /// COM2 backend, if configured.
    pub com2: Option<ConsoleBackend>,
    /// Kernel image.
    pub kernel: PathBuf,
    /// Initial ramdisk (Linux, PVH) or first Multiboot module.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Boot protocol.
    pub protocol: BootProtocol,
    /// Register the scratch test devices used by our test guests.
    pub test_devices: bool,
    /// Module tunables file (loader.conf(5) format).
    pub tunables: Option<PathBuf>,
    /// Where the module puts control sockets (`NAME` per VM): `vmm.socket_dir`, else
    /// `$BHYVE_RS_SOCKET_DIR`, else /run/bhyve-rs.
    pub socket_dir: PathBuf,
    /// Print exit statistics on stop.
    pub print_stats: bool,
    /// `-o memory.thp=BOOL`: advise guest RAM above 2 MiB for transparent huge pages (default true).
    pub huge_pages: bool,
    /// Pin vCPU threads to host CPUs.
    pub pin: bool,
    /// Host CPUs a vCPU may run on, by vCPU (`-p vcpu:hostcpu`, `vcpu.N.cpuset`): it is pinned to
    /// that set instead of the CPU chosen for it.
    pub cpusets: BTreeMap<u32, Vec<usize>>,
    /// Print latency histograms when the VM stops.
    pub print_histograms: bool,
    /// Trace every exit and write a Chrome trace / Perfetto JSON file here when the VM stops.
    pub trace_file: Option<PathBuf>,
    /// Whether tracing is on from the start (`trace.enabled`; default: on when `trace.file` is
    /// given). `bhyvectl --trace=on|off` switches it while the VM runs.
    pub trace_enabled: Option<bool>,
    /// Write SVG plots (latency histogram, exit rate over time) into this directory.
    pub plots_dir: Option<PathBuf>,
    /// PCI device models.
    pub pci: Vec<PciDevice>,
    /// Every configuration variable, as given.
    pub vars: BTreeMap<String, String>,
}

/// What the command line asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Run a VM.
    Run(Box<Config>),
    /// Print usage.
    Help,
}

/// Usage text.
pub const USAGE: &str = "\
Usage: bhyve [-AHPuw] [-c [cpus=]N] [-k config_file] [-l lpcdev[,conf]] [-m memsize[K|M|G|T]]
             [-o key=value] [-s slot,emulation[,conf]] vmname
       bhyve -h

  -c  number of vCPUs (default 1; at most hw.vmm.maxcpu)
  -m  guest memory (default 256M; no suffix means MiB)
  -l  LPC device: com1,stdio | com1,file=PATH | com1,unix=PATH | com1,null (com2 likewise)
  -s  PCI slot: hostbridge, lpc, virtio-blk,PATH[,ro][,nodelete][,ser=ID],
      virtio-net,TAP[,mac=xx:xx:xx:xx:xx:xx][,mtu=N], virtio-console,stdio|file=P|unix=P,
      virtio-rnd
  -o  set a configuration variable:
        boot.kernel=PATH     kernel image (Linux bzImage/vmlinux, PVH ELF, Multiboot ELF)
        boot.initrd=PATH     initramfs (Linux/PVH) or first module (Multiboot)
        boot.cmdline=STRING  kernel command line
        boot.protocol=P      auto (default), linux, pvh or multiboot
        vmm.tunables=PATH    module tunables (loader.conf(5) format: hw.vmm.maxcpu,
                             hw.vmm.halt_detection, pptdevs)
        vmm.socket_dir=DIR   control sockets (default $BHYVE_RS_SOCKET_DIR or /run/bhyve-rs);
                             bhyvectl --vm=NAME talks to DIR/NAME
        test.devices=true    scratch devices for the project's test guests
        memory.thp=BOOL      advise guest RAM above 2 MiB for transparent huge pages (default true;
                             false starts a short-lived guest sooner)
        stats.print=true     print exit counters when the VM stops
        stats.histograms=true  print exit latency histograms (p50/p99/p99.9/max) at the stop
        stats.plots=DIR      write SVG plots: latency histogram, exit rate over time
        trace.file=PATH      trace every exit; write Chrome trace / Perfetto JSON at the stop
        trace.enabled=BOOL   tracing on from the start (default: on with trace.file);
                             bhyvectl --vm=NAME --trace=on|off switches it while running
        cpus.pin=false       do not pin vCPU threads to host CPUs
  -p  vcpu:hostcpu: run vCPU vcpu on host CPU hostcpu only (repeat to add CPUs; or
      -o vcpu.N.cpuset=LIST, e.g. 2,4-5); other vCPUs are pinned as the host allows
  -k  read key=value configuration variables from a file
  -A -H -P -u -w  accepted for compatibility (ACPI tables, HLT/PAUSE exits and UTC RTC are
                  always on; unknown MSRs always fault)
  -h  this help

Exit status: 0 reboot, 1 power-off, 2 halt, 3 triple fault, 4 error; a write of v to the debug
port 0xf4 ends the VM with (v << 1) | 1.
";

/// Parses a memory size: a number with an optional K/M/G/T suffix; no suffix means MiB (bhyve(8)).
pub fn parse_memsize(what: &str, s: &str) -> Result<u64, OptError> {
    let bad = |why: &str| OptError::BadValue {
        what: what.to_string(),
        value: s.to_string(),
        why: why.to_string(),
    };
    let t = s.trim();
    let (digits, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_lowercase() {
                'k' => 1 << 10,
                'm' => 1 << 20,
                'g' => 1 << 30,
                't' => 1 << 40,
                _ => return Err(bad("the suffix must be K, M, G or T")),
            };
            (&t[..i], m)
        }
        Some(_) => (t, 1 << 20),
        None => return Err(bad("empty size")),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| bad("not a whole number followed by an optional K, M, G or T"))?;
    let bytes = n.checked_mul(mult).ok_or_else(|| bad("too large"))?;
    if bytes < (1 << 20) {
        return Err(bad("guest memory must be at least 1M"));
    }
    if bytes % 4096 != 0 {
        return Err(bad("guest memory must be a multiple of 4K"));
    }
    Ok(bytes)
}

fn parse_bool(key: &str, v: &str) -> Result<bool, OptError> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "yes" | "on" | "1" => Ok(true),
        "false" | "no" | "off" | "0" => Ok(false),
        _ => Err(OptError::BadValue {
            what: key.to_string(),
            value: v.to_string(),
            why: "expected true or false".to_string(),
        }),
    }
}

fn check_name(name: &str) -> Result<(), OptError> {
    let ok = !name.is_empty()
        && name.len() <= 31
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(OptError::BadName(name.to_string()))
    }
}

fn parse_console(key: &str, v: &str) -> Result<ConsoleBackend, OptError> {
    let bad = |why: &str| OptError::BadValue {
        what: key.to_string(),
        value: v.to_string(),
        why: why.to_string(),
    };
    if v == "stdio" {
        Ok(ConsoleBackend::Stdio)
    } else if v == "null" {
        Ok(ConsoleBackend::Null)
    } else if let Some(p) = v.strip_prefix("file=") {
        if p.is_empty() {
            return Err(bad("empty file path"));
        }
        Ok(ConsoleBackend::File(p.into()))
    } else if let Some(p) = v.strip_prefix("unix=") {
        if p.is_empty() {
            return Err(bad("empty socket path"));
        }
        Ok(ConsoleBackend::Unix(p.into()))
    } else {
        Err(bad("expected stdio, null, file=PATH or unix=PATH"))
    }
}

/// Reads a bhyve config file: `key=value` lines, `#` comments, blank lines.
pub fn read_config_file(path: &str) -> Result<Vec<(String, String)>, OptError> {
    let text = std::fs::read_to_string(path).map_err(|e| OptError::ConfigFile {
        path: path.to_string(),
        why: e.to_string(),
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let l = line.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let Some((k, v)) = l.split_once('=') else {
            return Err(OptError::ConfigFile {
                path: path.to_string(),
                why: format!("line {}: expected key=value, got '{l}'", i + 1),
            });
        };
        out.push((k.trim().to_string(), v.trim().to_string()));
    }
    Ok(out)
}

/// Parses the arguments after the program name.
pub fn parse(args: &[String]) -> Result<Command, OptError> {
    let mut vars: Vec<(String, String)> = Vec::new();
    let mut positional: Vec<String> = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        i += 1;
        if a == "--" {
            positional.extend(args[i..].iter().cloned());
            break;
        }
        let Some(flags) = a.strip_prefix('-').filter(|f| !f.is_empty()) else {
            positional.push(a.clone());
            continue;
        };
        // getopt style: flags may be grouped (-AHP), an argument may be attached (-c2) or next.
        for (pos, c) in flags.char_indices() {
            match c {
                'h' => return Ok(Command::Help),
                'A' | 'H' | 'P' | 'u' | 'w' | 'S' | 'x' | 'e' | 'W' | 'Y' => {}
                'c' | 'm' | 'l' | 's' | 'o' | 'k' | 'p' => {
                    let rest = &flags[pos + c.len_utf8()..];
                    let arg = if !rest.is_empty() {
                        rest.to_string()
                    } else if i < args.len() {
                        i += 1;
                        args[i - 1].clone()
                    } else {
                        return Err(OptError::MissingArgument(c));
                    };
                    option(c, &arg, &mut vars)?;
                    break;
                }
                other => return Err(OptError::UnknownOption(other.to_string())),
            }
        }
    }
    let mut pos = positional.into_iter();
    let name = pos.next().ok_or(OptError::MissingName)?;
    if let Some(extra) = pos.next() {
        return Err(OptError::ExtraArgument(extra));
    }
    check_name(&name)?;
    vars.push(("name".to_string(), name));
    build(vars).map(|c| Command::Run(Box::new(c)))
}

fn option(c: char, arg: &str, vars: &mut Vec<(String, String)>) -> Result<(), OptError> {
    match c {
        'c' => {
            // [[cpus=]N][,sockets=n][,cores=n][,threads=n]
            for (j, part) in arg.split(',').enumerate() {
                let (k, v) = match part.split_once('=') {
                    Some((k, v)) => (k, v),
                    None if j == 0 => ("cpus", part),
                    None => {
                        return Err(OptError::BadValue {
                            what: "-c".into(),
                            value: arg.into(),
                            why: format!("'{part}' is not key=value"),
                        })
                    }
                };
                match k {
                    "cpus" => vars.push(("cpus".into(), v.into())),
                    "sockets" | "cores" | "threads" => {
                        vars.push((k.to_string(), v.into()));
                    }
                    _ => {
                        return Err(OptError::BadValue {
                            what: "-c".into(),
                            value: arg.into(),
                            why: format!("unknown topology key '{k}'"),
                        })
                    }
                }
            }
        }
        'm' => vars.push(("memory.size".into(), arg.into())),
        'l' => {
            let (dev, conf) = arg.split_once(',').unwrap_or((arg, ""));
            match dev {
                "com1" | "com2" | "com3" | "com4" => {
                    if conf.is_empty() {
                        return Err(OptError::BadValue {
                            what: "-l".into(),
                            value: arg.into(),
                            why: format!("{dev} needs a backend, e.g. {dev},stdio"),
                        });
                    }
                    vars.push((format!("lpc.{dev}.path"), conf.into()));
                }
                "bootrom" | "fwcfg" | "tpm" | "pc-testdev" => {
                    return Err(OptError::BadValue {
                        what: "-l".into(),
                        value: arg.into(),
                        why: format!(
                            "LPC device '{dev}' is not supported; boot a kernel directly with -o boot.kernel=PATH"
                        ),
                    })
                }
                _ => {
                    return Err(OptError::BadValue {
                        what: "-l".into(),
                        value: arg.into(),
                        why: format!("unknown LPC device '{dev}'"),
                    })
                }
            }
        }
        's' => {
            let mut parts = arg.splitn(3, ',');
            let slot = parts.next().unwrap_or_default();
            let emulation = parts.next().unwrap_or_default();
            let bad_slot = || OptError::BadValue {
                what: "-s".into(),
                value: arg.into(),
                why: "expected slot[:function],emulation[,conf] with slot 0-31, function 0-7"
                    .into(),
            };
            let (s, f) = slot.split_once(':').unwrap_or((slot, "0"));
            let s: u8 = s.parse().map_err(|_| bad_slot())?;
            let f: u8 = f.parse().map_err(|_| bad_slot())?;
            if s > 31 || f > 7 || emulation.is_empty() {
                return Err(bad_slot());
            }
            match emulation {
                "hostbridge" | "amd_hostbridge" | "lpc" => {
                    vars.push((format!("pci.0.{s}.{f}.device"), emulation.into()));
                }
                e if e.starts_with("virtio-") => {
                    // Everything after "slot," is the emulation and its options.
                    let conf = arg.split_once(',').map_or("", |(_, c)| c);
                    virtio::options::parse(conf).map_err(|e| OptError::DeviceOptions {
                        slot: arg.into(),
                        why: e.to_string(),
                    })?;
                    vars.push((format!("pci.0.{s}.{f}.device"), emulation.into()));
                    vars.push((format!("pci.0.{s}.{f}.config"), conf.into()));
                }
                _ => {
                    return Err(OptError::UnsupportedEmulation {
                        slot: arg.into(),
                        emulation: emulation.into(),
                    })
                }
            }
        }
        'o' => {
            let (k, v) = arg
                .split_once('=')
                .ok_or_else(|| OptError::BadAssignment(arg.into()))?;
            if k.is_empty() {
                return Err(OptError::BadAssignment(arg.into()));
            }
            vars.push((k.into(), v.into()));
        }
        'k' => vars.extend(read_config_file(arg)?),
        'p' => {
            // -p vcpu:hostcpu, as bhyve(8): each adds hostcpu to vcpu.N.cpuset.
            let bad = |why: &str| OptError::BadValue {
                what: "-p".into(),
                value: arg.into(),
                why: why.into(),
            };
            let (vcpu, host) = arg
                .split_once(':')
                .ok_or_else(|| bad("expected vcpu:hostcpu, e.g. -p 0:2"))?;
            let vcpu: u32 = vcpu
                .parse()
                .map_err(|_| bad("the vCPU must be a whole number"))?;
            let host: usize = host
                .parse()
                .map_err(|_| bad("the host CPU must be a whole number"))?;
            let key = format!("vcpu.{vcpu}.cpuset");
            match vars.iter_mut().rev().find(|(k, _)| *k == key) {
                Some((_, v)) => *v = format!("{v},{host}"),
                None => vars.push((key, host.to_string())),
            }
        }
        _ => return Err(OptError::UnknownOption(c.to_string())),
    }
    Ok(())
}

/// Builds the typed configuration from variables (later settings override earlier ones).
pub fn build(list: Vec<(String, String)>) -> Result<Config, OptError> {
    let mut vars = BTreeMap::new();
    for (k, v) in list {
        vars.insert(k, v);
    }
    let mut cfg = Config {
        name: String::new(),
        cpus: 1,
        memory: 256 << 20,
        com1: None,
        com2: None,
        kernel: PathBuf::new(),
        initrd: None,
        cmdline: String::new(),
        protocol: BootProtocol::Auto,
        test_devices: false,
        tunables: None,
        socket_dir: std::env::var_os("BHYVE_RS_SOCKET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/run/bhyve-rs")),
        print_stats: false,
        huge_pages: true,
        pin: true,
        cpusets: BTreeMap::new(),
        print_histograms: false,
        trace_file: None,
        trace_enabled: None,
        plots_dir: None,
        pci: Vec::new(),
        vars: BTreeMap::new(),
    };
    let mut kernel = None;
    for (k, v) in &vars {
        match k.as_str() {
            "name" => cfg.name = v.clone(),
            "cpus" => {
                cfg.cpus =
                    v.parse()
                        .ok()
                        .filter(|&n: &u32| n >= 1)
                        .ok_or_else(|| OptError::BadValue {
                            what: "cpus (-c)".into(),
                            value: v.clone(),
                            why: "expected a whole number of vCPUs, at least 1".into(),
                        })?
            }
            "sockets" | "cores" | "threads" => {
                v.parse::<u32>()
                    .ok()
                    .filter(|&n| n >= 1)
                    .ok_or_else(|| OptError::BadValue {
                        what: format!("{k} (-c)"),
                        value: v.clone(),
                        why: "expected a whole number, at least 1".into(),
                    })?;
            }
            "memory.size" => cfg.memory = parse_memsize("memory size (-m)", v)?,
            "lpc.com1.path" => cfg.com1 = Some(parse_console("-l com1", v)?),
            "lpc.com2.path" => cfg.com2 = Some(parse_console("-l com2", v)?),
            "lpc.com3.path" | "lpc.com4.path" => {
                return Err(OptError::BadValue {
                    what: k.clone(),
                    value: v.clone(),
                    why: "only com1 and com2 are supported".into(),
                })
            }
            "boot.kernel" => {
                if v.is_empty() {
                    return Err(OptError::BadValue {
                        what: k.clone(),
                        value: v.clone(),
                        why: "empty path".into(),
                    });
                }
                kernel = Some(PathBuf::from(v))
            }
            "boot.initrd" => cfg.initrd = Some(PathBuf::from(v)),
            "boot.cmdline" => cfg.cmdline = v.clone(),
            "boot.protocol" => {
                cfg.protocol = match v.as_str() {
                    "auto" => BootProtocol::Auto,
                    "linux" => BootProtocol::Linux,
                    "pvh" => BootProtocol::Pvh,
                    "multiboot" => BootProtocol::Multiboot,
                    _ => {
                        return Err(OptError::BadValue {
                            what: k.clone(),
                            value: v.clone(),
                            why: "expected auto, linux, pvh or multiboot".into(),
                        })
                    }
                }
            }
            "test.devices" => cfg.test_devices = parse_bool(k, v)?,
            "stats.print" => cfg.print_stats = parse_bool(k, v)?,
            "memory.thp" => cfg.huge_pages = parse_bool(k, v)?,
            "cpus.pin" => cfg.pin = parse_bool(k, v)?,
            "stats.histograms" => cfg.print_histograms = parse_bool(k, v)?,
            "trace.file" => cfg.trace_file = Some(PathBuf::from(v)),
            "trace.enabled" => cfg.trace_enabled = Some(parse_bool(k, v)?),
            "stats.plots" => cfg.plots_dir = Some(PathBuf::from(v)),
            "vmm.tunables" => cfg.tunables = Some(PathBuf::from(v)),
            "vmm.socket_dir" => cfg.socket_dir = PathBuf::from(v),
            // bhyve keys we accept and have no use for.
            "acpi_tables"
            | "x86.strictmsr"
            | "x86.vmexit_on_hlt"
            | "x86.vmexit_on_pause"
            | "rtc.use_localtime"
            | "memory.wired"
            | "memory.guest_in_core" => {}
            k if k.starts_with("pci.0.") && k.ends_with(".config") => {
                let mut it = k["pci.0.".len()..].split('.');
                let (Some(sl), Some(fu)) = (it.next(), it.next()) else {
                    return Err(OptError::UnknownKey(k.to_string()));
                };
                let bad = || OptError::BadValue {
                    what: k.to_string(),
                    value: v.clone(),
                    why: "slot 0-31 and function 0-7".into(),
                };
                let slot: u8 = sl.parse().ok().filter(|&n| n <= 31).ok_or_else(bad)?;
                let function: u8 = fu.parse().ok().filter(|&n| n <= 7).ok_or_else(bad)?;
                if slot == 0 || slot == 31 {
                    return Err(OptError::SlotTaken(
                        format!("{slot}:{function},{v}"),
                        format!("{slot} (the host bridge is 0, the LPC bridge 31)"),
                    ));
                }
                let parsed = virtio::options::parse(v).map_err(|e| OptError::DeviceOptions {
                    slot: format!("{slot}:{function},{v}"),
                    why: e.to_string(),
                })?;
                cfg.pci.push(PciDevice {
                    slot,
                    function,
                    spec: parsed.spec,
                    ignored: parsed.ignored,
                });
            }
            k if k.starts_with("pci.") => {}
            k if k.starts_with("vcpu.") && k.ends_with(".cpuset") => {
                let vcpu = k["vcpu.".len()..k.len() - ".cpuset".len()]
                    .parse::<u32>()
                    .map_err(|_| OptError::UnknownKey(k.to_string()))?;
                let set = parse_cpuset(v).map_err(|why| OptError::BadValue {
                    what: format!("{k} (-p)"),
                    value: v.clone(),
                    why,
                })?;
                cfg.cpusets.insert(vcpu, set);
            }
            _ => return Err(OptError::UnknownKey(k.clone())),
        }
    }
    if let Some((&vcpu, set)) = cfg.cpusets.range(cfg.cpus..).next() {
        return Err(OptError::BadValue {
            what: format!("vcpu.{vcpu}.cpuset (-p)"),
            value: cpuset_text(set),
            why: format!(
                "the VM has {} vCPU{} (-c): vCPUs are numbered from 0",
                cfg.cpus,
                if cfg.cpus == 1 { "" } else { "s" }
            ),
        });
    }
    cfg.kernel = kernel.ok_or(OptError::NoKernel)?;
    cfg.vars = vars;
    Ok(cfg)
}

/// Most host CPUs a set may name (glibc's CPU_SETSIZE).
pub const MAX_HOST_CPUS: usize = 1024;

/// Parses a host CPU list as cpuset(1) and bhyve_config(5) write it: `2`, `0,3`, `4-7,9`.
/// Returns the CPUs in order, without repeats.
pub fn parse_cpuset(s: &str) -> Result<Vec<usize>, String> {
    let mut out = Vec::new();
    for part in s.split(',') {
        let cpu = |t: &str| -> Result<usize, String> {
            let n: usize = t
                .trim()
                .parse()
                .map_err(|_| format!("'{t}' is not a CPU number"))?;
            if n >= MAX_HOST_CPUS {
                return Err(format!(
                    "CPU {n} is beyond the last one a set can name ({})",
                    MAX_HOST_CPUS - 1
                ));
            }
            Ok(n)
        };
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (cpu(a)?, cpu(b)?);
                if a > b {
                    return Err(format!("the range '{part}' runs backwards"));
                }
                out.extend(a..=b);
            }
            None => out.push(cpu(part)?),
        }
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// A CPU list as `parse_cpuset` reads it (ranges collapsed).
pub fn cpuset_text(cpus: &[usize]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let mut j = i;
        while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
            j += 1;
        }
        parts.push(if j > i {
            format!("{}-{}", cpus[i], cpus[j])
        } else {
            cpus[i].to_string()
        });
        i = j + 1;
    }
    parts.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    fn run(s: &str) -> Result<Config, OptError> {
        match parse(&args(s))? {
            Command::Run(c) => Ok(*c),
            Command::Help => panic!("help"),
        }
    }

    #[test]
    fn p_pins_vcpus_to_host_cpu_sets_and_names_what_is_wrong() {
        let c =
            run("-c 3 -p 0:1 -p 0:3 -p 2:5 -o vcpu.1.cpuset=2-4,7,3 -o boot.kernel=/k vm").unwrap();
        assert_eq!(c.cpusets.get(&0), Some(&vec![1, 3]));
        assert_eq!(c.cpusets.get(&1), Some(&vec![2, 3, 4, 7]));
        assert_eq!(c.cpusets.get(&2), Some(&vec![5]));
        assert_eq!(cpuset_text(&[2, 3, 4, 7, 9, 10]), "2-4,7,9-10");
        assert!(run("-o boot.kernel=/k vm").unwrap().cpusets.is_empty());
        for (line, names) in [
            ("-p 1 -o boot.kernel=/k vm", "vcpu:hostcpu"),
            ("-p x:1 -o boot.kernel=/k vm", "vCPU"),
            ("-p 0:y -o boot.kernel=/k vm", "host CPU"),
            ("-p 1:0 -o boot.kernel=/k vm", "vcpu.1.cpuset (-p)"),
            ("-c 2 -p 2:0 -o boot.kernel=/k vm", "has 2 vCPUs"),
            ("-p 0:1024 -o boot.kernel=/k vm", "1024"),
            ("-o vcpu.0.cpuset=3-1 -o boot.kernel=/k vm", "backwards"),
            ("-o vcpu.0.cpuset= -o boot.kernel=/k vm", "not a CPU number"),
            ("-o vcpu.x.cpuset=1 -o boot.kernel=/k vm", "vcpu.x.cpuset"),
        ] {
            let e = run(line).unwrap_err().to_string();
            assert!(e.contains(names), "{line}: {e}");
        }
        assert_eq!(
            run("-p").unwrap_err(),
            OptError::MissingArgument('p'),
            "-p takes an argument"
        );
    }

    #[test]
    fn bhyve_style_command_line() {
        let c = run("-c 2 -m 512M -l com1,stdio -s 0,hostbridge -s 31,lpc -AHP -o boot.kernel=/k -o boot.cmdline=console=ttyS0 vm0").unwrap();
        assert_eq!(c.name, "vm0");
        assert_eq!(c.cpus, 2);
        assert_eq!(c.memory, 512 << 20);
        assert_eq!(c.com1, Some(ConsoleBackend::Stdio));
        assert_eq!(c.kernel, PathBuf::from("/k"));
        assert_eq!(c.cmdline, "console=ttyS0");
        let c = run("-c cpus=3,sockets=1 -m2G -o boot.kernel=/k x").unwrap();
        assert_eq!((c.cpus, c.memory), (3, 2 << 30));
        assert_eq!(run("-m 64 -o boot.kernel=/k x").unwrap().memory, 64 << 20);
        assert_eq!(parse(&args("-h")).unwrap(), Command::Help);
        assert!(c.huge_pages, "transparent huge pages by default");
        let c = run("-o memory.thp=false -o boot.kernel=/k x").unwrap();
        assert!(!c.huge_pages);
        assert!(run("-o memory.thp=maybe -o boot.kernel=/k x")
            .unwrap_err()
            .to_string()
            .contains("memory.thp"));
    }

    #[test]
    fn every_bad_input_names_its_part() {
        let e = run("-q x").unwrap_err();
        assert_eq!(e.to_string(), "Unknown option '-q' (see bhyve -h)");
        assert_eq!(run("-c").unwrap_err(), OptError::MissingArgument('c'));
        assert_eq!(run("-o boot.kernel=/k").unwrap_err(), OptError::MissingName);
        assert!(
            matches!(run("-o boot.kernel=/k a b"), Err(OptError::ExtraArgument(x)) if x == "b")
        );
        assert!(matches!(
            run("-o boot.kernel=/k bad/name"),
            Err(OptError::BadName(_))
        ));
        let e = run("-m 12Q -o boot.kernel=/k x").unwrap_err();
        assert!(
            e.to_string().contains("memory size (-m)") && e.to_string().contains("12Q"),
            "{e}"
        );
        let e = run("-m 0 -o boot.kernel=/k x").unwrap_err();
        assert!(e.to_string().contains("at least 1M"), "{e}");
        let e = run("-m 99999999999T -o boot.kernel=/k x").unwrap_err();
        assert!(e.to_string().contains("too large"), "{e}");
        let e = run("-c 0 -o boot.kernel=/k x").unwrap_err();
        assert!(e.to_string().contains("cpus (-c)"), "{e}");
        let e = run("-l com1,tty -o boot.kernel=/k x").unwrap_err();
        assert!(e.to_string().contains("-l com1"), "{e}");
        let e = run("-s 3,e1000,tap0 -o boot.kernel=/k x").unwrap_err();
        assert!(e.to_string().contains("e1000"), "{e}");
        let c = run("-s 3,virtio-blk,/img,ro -s 4:1,virtio-rnd -o boot.kernel=/k x").unwrap();
        assert_eq!(c.pci.len(), 2);
        assert_eq!((c.pci[0].slot, c.pci[1].slot, c.pci[1].function), (3, 4, 1));
        let e = run("-s 3,virtio-blk,/img,bogus=1 -o boot.kernel=/k x").unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        let e = run("-s 31,virtio-rnd -o boot.kernel=/k x").unwrap_err();
        assert!(e.to_string().contains("already taken"), "{e}");
        let e = run("-s 40,lpc -o boot.kernel=/k x").unwrap_err();
        assert!(e.to_string().contains("slot 0-31"), "{e}");
        assert!(matches!(
            run("-o nonsense -o boot.kernel=/k x"),
            Err(OptError::BadAssignment(_))
        ));
        assert!(
            matches!(run("-o frob=1 -o boot.kernel=/k x"), Err(OptError::UnknownKey(k)) if k == "frob")
        );
        assert_eq!(run("x").unwrap_err(), OptError::NoKernel);
        let e = run("-o boot.protocol=uefi -o boot.kernel=/k x").unwrap_err();
        assert!(e.to_string().contains("boot.protocol"), "{e}");
        assert_eq!(
            run("-o boot.protocol=multiboot -o boot.kernel=/k x")
                .unwrap()
                .protocol,
            BootProtocol::Multiboot
        );
        let e = run("-o test.devices=maybe -o boot.kernel=/k x").unwrap_err();
        assert!(e.to_string().contains("test.devices"), "{e}");
        let e = run("-k /nonexistent/cfg x").unwrap_err();
        assert!(e.to_string().contains("/nonexistent/cfg"), "{e}");
    }

    #[test]
    fn config_file_and_overrides() {
        let dir = std::env::temp_dir().join(format!("bhyve-opts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("vm.conf");
        std::fs::write(&f, "# a VM\ncpus=2\n\nmemory.size=128M\nboot.kernel=/k\n").unwrap();
        let c = run(&format!("-k {} -c 1 x", f.display())).unwrap();
        assert_eq!(
            (c.cpus, c.memory),
            (1, 128 << 20),
            "later -c overrides the file"
        );
        std::fs::write(&f, "cpus=2\nbogus line\n").unwrap();
        let e = run(&format!("-k {} x", f.display())).unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
