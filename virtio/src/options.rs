//! bhyve(8) `-s slot[:function],emulation[,options]`: the `emulation[,options]` part for the virtio
//! devices, with bhyve's spellings.
//!
//! | emulation | options |
//! |---|---|
//! | `virtio-blk` | `PATH[,ro][,nocache][,nodelete][,sync\|direct][,ser=ID][,sectorsize=N[/M]][,eagerwb=SIZE\|off]` |
//! | `virtio-net` | `TAP[,mac=xx:xx:xx:xx:xx:xx][,mtu=N]` (also `backend=TAP`) |
//! | `virtio-console` | `stdio`, `file=PATH`, `unix=PATH`, or bhyve's `port1=PATH` (a listening socket) |
//! | `virtio-rnd` | none |
//!
//! `eagerwb=` is this monitor's own (bhyve has no such option): see
//! [`crate::blk::Block::set_eager_writeback`]. SIZE is bytes with an optional `K`, `M` or `G`
//! suffix (powers of 1024); `off` or 0 turns it off; the default is
//! [`crate::blk::DEFAULT_EAGER_WRITEBACK`].
//!
//! Every error names the option at fault. Options bhyve accepts but this monitor does not
//! implement (`nocache`, `sectorsize=`) are accepted and reported in [`Parsed::ignored`], never
//! skipped silently.

use std::path::PathBuf;

use crate::blk::BlockOptions;
use crate::net::Mac;

/// Why an emulation string was refused.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum OptionError {
    /// The emulation name is not a virtio device we have.
    #[error("Unknown emulation '{0}'")]
    UnknownEmulation(String),
    /// A required positional option is missing.
    #[error("{device}: missing {what}")]
    Missing {
        /// Emulation name.
        device: &'static str,
        /// What is missing.
        what: &'static str,
    },
    /// An option this device does not have.
    #[error("{device}: unknown option '{option}'")]
    Unknown {
        /// Emulation name.
        device: &'static str,
        /// The option as written.
        option: String,
    },
    /// An option with a bad value.
    #[error("{device}: bad value for '{option}': {why}")]
    BadValue {
        /// Emulation name.
        device: &'static str,
        /// The option as written.
        option: String,
        /// Why.
        why: &'static str,
    },
    /// The same option twice (or two conflicting ones).
    #[error("{device}: option '{option}' given more than once")]
    Duplicate {
        /// Emulation name.
        device: &'static str,
        /// The option.
        option: String,
    },
}

/// The console backend asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleTarget {
    /// Standard input and output.
    Stdio,
    /// Output appended to a file.
    File(PathBuf),
    /// A Unix socket the monitor listens on.
    Unix(PathBuf),
}

/// Network options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetOptions {
    /// Tap interface name.
    pub tap: String,
    /// `mac=`, if given (else the platform derives bhyve's default).
    pub mac: Option<Mac>,
    /// `mtu=`, if given.
    pub mtu: Option<u16>,
}

/// A parsed virtio device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceSpec {
    /// `virtio-blk`.
    Block(BlockOptions),
    /// `virtio-net`.
    Net(NetOptions),
    /// `virtio-console`.
    Console(ConsoleTarget),
    /// `virtio-rnd`.
    Rng,
}

/// A parse result with the options accepted but not acted on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// The device.
    pub spec: DeviceSpec,
    /// Options bhyve accepts that this monitor ignores, each with the reason (tell the operator).
    pub ignored: Vec<String>,
}

/// Parses `emulation[,options]` (what follows `slot[:function],` in `-s`).
pub fn parse(s: &str) -> Result<Parsed, OptionError> {
    let (emu, rest) = match s.split_once(',') {
        Some((e, r)) => (e, Some(r)),
        None => (s, None),
    };
    let opts: Vec<&str> = rest.map(|r| r.split(',').collect()).unwrap_or_default();
    match emu {
        "virtio-blk" => parse_blk(&opts),
        "virtio-net" => parse_net(&opts),
        "virtio-console" => parse_console(&opts),
        "virtio-rnd" => match opts.first() {
            None => Ok(Parsed {
                spec: DeviceSpec::Rng,
                ignored: Vec::new(),
            }),
            Some(o) => Err(OptionError::Unknown {
                device: "virtio-rnd",
                option: (*o).to_string(),
            }),
        },
        other => Err(OptionError::UnknownEmulation(other.to_string())),
    }
}

fn parse_blk(opts: &[&str]) -> Result<Parsed, OptionError> {
    const D: &str = "virtio-blk";
    let mut it = opts.iter();
    let path = match it.next() {
        Some(p) if !p.is_empty() && !p.contains('=') => PathBuf::from(p),
        Some(p) if p.len() > 5 && p.starts_with("path=") => {
            PathBuf::from(p.strip_prefix("path=").unwrap_or_default())
        }
        _ => {
            return Err(OptionError::Missing {
                device: D,
                what: "image path",
            })
        }
    };
    let mut o = BlockOptions {
        path,
        ..BlockOptions::default()
    };
    let mut ignored = Vec::new();
    let mut seen: Vec<&str> = Vec::new();
    for opt in it {
        let (key, val) = match opt.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (*opt, None),
        };
        let dup_key = if key == "direct" { "sync" } else { key };
        if seen.contains(&dup_key) {
            return Err(OptionError::Duplicate {
                device: D,
                option: (*opt).to_string(),
            });
        }
        seen.push(dup_key);
        let bad = |why| OptionError::BadValue {
            device: D,
            option: (*opt).to_string(),
            why,
        };
        match (key, val) {
            ("ro", None) => o.read_only = true,
            ("nodelete", None) => o.no_delete = true,
            ("sync" | "direct", None) => o.sync = true,
            ("nocache", None) => ignored.push(format!(
                "{D}: 'nocache' ignored (O_DIRECT needs aligned guest buffers; the page cache is used)"
            )),
            ("ser", Some(v)) => {
                if v.is_empty() || v.len() > crate::blk::ID_LEN || !v.is_ascii() {
                    return Err(bad("the serial is 1 to 20 ASCII characters"));
                }
                o.serial = Some(v.to_string());
            }
            ("eagerwb", Some(v)) => {
                o.eager_writeback = Some(if v == "off" {
                    0
                } else {
                    parse_size(v).ok_or(bad("a size (bytes, or with a K, M or G suffix) or 'off'"))?
                });
            }
            ("sectorsize", Some(v)) => {
                let ok = v
                    .split('/')
                    .all(|n| n.parse::<u32>().is_ok_and(|n| n >= 512 && n.is_power_of_two()));
                if !ok {
                    return Err(bad("sector sizes are powers of two of at least 512"));
                }
                ignored.push(format!(
                    "{D}: 'sectorsize={v}' ignored (the device presents 512-byte sectors)"
                ));
            }
            ("ro" | "nodelete" | "sync" | "direct" | "nocache", Some(_)) => {
                return Err(bad("this option takes no value"))
            }
            ("ser" | "sectorsize" | "eagerwb", None) => {
                return Err(bad("this option needs a value"))
            }
            _ => {
                return Err(OptionError::Unknown {
                    device: D,
                    option: (*opt).to_string(),
                })
            }
        }
    }
    Ok(Parsed {
        spec: DeviceSpec::Block(o),
        ignored,
    })
}

/// Parses `N`, `NK`, `NM` or `NG` (also lower case; powers of 1024) into bytes.
fn parse_size(v: &str) -> Option<u64> {
    let (num, shift) = match v.as_bytes().last()? {
        b'k' | b'K' => (v.get(..v.len() - 1)?, 10),
        b'm' | b'M' => (v.get(..v.len() - 1)?, 20),
        b'g' | b'G' => (v.get(..v.len() - 1)?, 30),
        _ => (v, 0),
    };
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    num.parse::<u64>().ok()?.checked_mul(1u64 << shift)
}

/// Parses `xx:xx:xx:xx:xx:xx` (hex, one or two digits a byte). Multicast addresses are refused,
/// as bhyve does.
pub fn parse_mac(s: &str) -> Option<Mac> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next()?;
        if p.is_empty() || p.len() > 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    if parts.next().is_some() || mac[0] & 1 != 0 || mac == [0; 6] {
        return None;
    }
    Some(mac)
}

fn parse_net(opts: &[&str]) -> Result<Parsed, OptionError> {
    const D: &str = "virtio-net";
    let mut tap: Option<String> = None;
    let mut mac = None;
    let mut mtu = None;
    for (i, opt) in opts.iter().enumerate() {
        let (key, val) = match opt.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (*opt, None),
        };
        let bad = |why| OptionError::BadValue {
            device: D,
            option: (*opt).to_string(),
            why,
        };
        let dup = || OptionError::Duplicate {
            device: D,
            option: (*opt).to_string(),
        };
        match (key, val) {
            (name, None) if i == 0 && !name.is_empty() => tap = Some(name.to_string()),
            ("backend", Some(v)) => {
                if tap.is_some() {
                    return Err(dup());
                }
                tap = Some(v.to_string());
            }
            ("mac", Some(v)) => {
                if mac.is_some() {
                    return Err(dup());
                }
                mac = Some(parse_mac(v).ok_or(bad("expected a unicast xx:xx:xx:xx:xx:xx"))?);
            }
            ("mtu", Some(v)) => {
                if mtu.is_some() {
                    return Err(dup());
                }
                let m = v
                    .parse::<u16>()
                    .ok()
                    .filter(|m| (68..=65_520).contains(m))
                    .ok_or(bad("the MTU is a number from 68 to 65520"))?;
                mtu = Some(m);
            }
            _ => {
                return Err(OptionError::Unknown {
                    device: D,
                    option: (*opt).to_string(),
                })
            }
        }
    }
    let tap = tap.filter(|t| !t.is_empty()).ok_or(OptionError::Missing {
        device: D,
        what: "tap interface name",
    })?;
    if tap.len() >= 16 {
        return Err(OptionError::BadValue {
            device: D,
            option: tap,
            why: "interface names are at most 15 bytes",
        });
    }
    Ok(Parsed {
        spec: DeviceSpec::Net(NetOptions { tap, mac, mtu }),
        ignored: Vec::new(),
    })
}

fn parse_console(opts: &[&str]) -> Result<Parsed, OptionError> {
    const D: &str = "virtio-console";
    let mut target = None;
    for opt in opts {
        let t = match opt.split_once('=') {
            None if *opt == "stdio" => ConsoleTarget::Stdio,
            Some(("file", p)) if !p.is_empty() => ConsoleTarget::File(PathBuf::from(p)),
            Some(("unix" | "port1", p)) if !p.is_empty() => ConsoleTarget::Unix(PathBuf::from(p)),
            Some(("file" | "unix" | "port1", _)) => {
                return Err(OptionError::BadValue {
                    device: D,
                    option: (*opt).to_string(),
                    why: "a path is required",
                })
            }
            Some((k, _)) if k.starts_with("port") => {
                return Err(OptionError::BadValue {
                    device: D,
                    option: (*opt).to_string(),
                    why: "only one port (port1) is supported",
                })
            }
            _ => {
                return Err(OptionError::Unknown {
                    device: D,
                    option: (*opt).to_string(),
                })
            }
        };
        if target.is_some() {
            return Err(OptionError::Duplicate {
                device: D,
                option: (*opt).to_string(),
            });
        }
        target = Some(t);
    }
    let target = target.ok_or(OptionError::Missing {
        device: D,
        what: "backend (stdio, file=PATH or unix=PATH)",
    })?;
    Ok(Parsed {
        spec: DeviceSpec::Console(target),
        ignored: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(s: &str) -> DeviceSpec {
        match parse(s) {
            Ok(p) => p.spec,
            Err(e) => panic!("{s}: {e}"),
        }
    }

    #[test]
    fn accepts_bhyve_spellings() {
        assert_eq!(
            spec("virtio-blk,/img/disk.raw,ro,ser=ABC123,nodelete,direct"),
            DeviceSpec::Block(BlockOptions {
                path: "/img/disk.raw".into(),
                read_only: true,
                sync: true,
                no_delete: true,
                serial: Some("ABC123".into()),
                eager_writeback: None,
            })
        );
        let p = parse("virtio-blk,/d,nocache,sectorsize=4096/4096").unwrap();
        assert_eq!(p.ignored.len(), 2, "{:?}", p.ignored);
        assert_eq!(
            spec("virtio-net,tap0,mac=00:a0:98:1:2:3,mtu=9000"),
            DeviceSpec::Net(NetOptions {
                tap: "tap0".into(),
                mac: Some([0, 0xa0, 0x98, 1, 2, 3]),
                mtu: Some(9000),
            })
        );
        assert_eq!(
            spec("virtio-net,backend=tap1"),
            DeviceSpec::Net(NetOptions {
                tap: "tap1".into(),
                mac: None,
                mtu: None
            })
        );
        assert_eq!(
            spec("virtio-console,stdio"),
            DeviceSpec::Console(ConsoleTarget::Stdio)
        );
        assert_eq!(
            spec("virtio-console,unix=/tmp/c.sock"),
            DeviceSpec::Console(ConsoleTarget::Unix("/tmp/c.sock".into()))
        );
        assert_eq!(
            spec("virtio-console,port1=/tmp/p"),
            DeviceSpec::Console(ConsoleTarget::Unix("/tmp/p".into()))
        );
        assert_eq!(
            spec("virtio-console,file=/tmp/out"),
            DeviceSpec::Console(ConsoleTarget::File("/tmp/out".into()))
        );
        assert_eq!(spec("virtio-rnd"), DeviceSpec::Rng);
    }

    #[test]
    fn eager_writeback_takes_a_size_or_off() {
        let wb = |s: &str| match spec(&format!("virtio-blk,/d,{s}")) {
            DeviceSpec::Block(o) => o.eager_writeback,
            other => panic!("{other:?}"),
        };
        assert_eq!(wb("ro"), None, "not given: the device's default");
        assert_eq!(wb("eagerwb=off"), Some(0));
        assert_eq!(wb("eagerwb=0"), Some(0));
        assert_eq!(wb("eagerwb=4096"), Some(4096));
        assert_eq!(wb("eagerwb=64K"), Some(64 << 10));
        assert_eq!(wb("eagerwb=64k"), Some(64 << 10));
        assert_eq!(wb("eagerwb=1M"), Some(1 << 20));
        assert_eq!(wb("eagerwb=2g"), Some(2 << 30));
    }

    #[test]
    fn errors_name_the_bad_option() {
        let cases = [
            ("virtio-blk", "missing image path"),
            ("virtio-blk,/d,rw", "unknown option 'rw'"),
            ("virtio-blk,/d,ro=1", "'ro=1'"),
            ("virtio-blk,/d,ser=", "'ser='"),
            (
                "virtio-blk,/d,ser=123456789012345678901",
                "'ser=123456789012345678901'",
            ),
            ("virtio-blk,/d,ro,ro", "'ro' given more than once"),
            ("virtio-blk,/d,sync,direct", "'direct' given more than once"),
            ("virtio-blk,/d,sectorsize=1000", "'sectorsize=1000'"),
            ("virtio-blk,/d,eagerwb", "'eagerwb'"),
            ("virtio-blk,/d,eagerwb=", "'eagerwb='"),
            ("virtio-blk,/d,eagerwb=on", "'eagerwb=on'"),
            ("virtio-blk,/d,eagerwb=1T", "'eagerwb=1T'"),
            ("virtio-blk,/d,eagerwb=-1", "'eagerwb=-1'"),
            (
                "virtio-blk,/d,eagerwb=99999999999G",
                "'eagerwb=99999999999G'",
            ),
            (
                "virtio-blk,/d,eagerwb=off,eagerwb=1M",
                "'eagerwb=1M' given more than once",
            ),
            ("virtio-net", "missing tap interface name"),
            (
                "virtio-net,tap0,mac=01:00:00:00:00:01",
                "'mac=01:00:00:00:00:01'",
            ),
            (
                "virtio-net,tap0,mac=00:a0:98:zz:00:01",
                "'mac=00:a0:98:zz:00:01'",
            ),
            ("virtio-net,tap0,mtu=10", "'mtu=10'"),
            ("virtio-net,tap0,speed=10", "unknown option 'speed=10'"),
            ("virtio-net,tap0,tap1", "unknown option 'tap1'"),
            ("virtio-net,a-very-long-tap-name0", "a-very-long-tap-name0"),
            ("virtio-console", "missing backend"),
            ("virtio-console,port2=/x", "'port2=/x'"),
            ("virtio-console,unix=", "'unix='"),
            ("virtio-console,stdio,stdio", "given more than once"),
            ("virtio-console,tty", "unknown option 'tty'"),
            ("virtio-rnd,fast", "unknown option 'fast'"),
            ("virtio-9p,sharename=/x", "Unknown emulation 'virtio-9p'"),
        ];
        for (input, want) in cases {
            match parse(input) {
                Ok(p) => panic!("{input} accepted: {p:?}"),
                Err(e) => assert!(e.to_string().contains(want), "{input}: {e}"),
            }
        }
    }

    #[test]
    fn mac_parser() {
        assert_eq!(
            parse_mac("00:a0:98:aa:bb:cc"),
            Some([0, 0xa0, 0x98, 0xaa, 0xbb, 0xcc])
        );
        assert_eq!(parse_mac("00:a0:98:aa:bb"), None);
        assert_eq!(parse_mac("00:a0:98:aa:bb:cc:dd"), None);
        assert_eq!(parse_mac("00:a0:98:aa:bb:123"), None);
        assert_eq!(parse_mac("00:00:00:00:00:00"), None);
    }
}
