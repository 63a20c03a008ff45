//! Tunables from a loader.conf(5)-format file, as vmm.ko reads them at `kldload`.
//!
//! # Syntax
//!
//! The same lines FreeBSD's loader takes (its Lua `config.lua`, which replaced the Forth one):
//!
//! - blank lines, and comment lines whose first non-blank character is `#`;
//! - `name="value"` or `name=value`, with blanks allowed around `=`, optionally followed by blanks
//!   and a `#` comment. A quoted value runs to the first unescaped `"`; inside it `\x` stands for
//!   `x`, and `$name` / `${name}` expand to a variable set earlier in the same file (empty if it
//!   is not set; the real loader also knows its built-in variables, which we do not have). An
//!   unquoted value is one "word": letters, digits, `-`, `_` and `.`, starting with a letter, a
//!   digit or `-` — so `hw.vmm.maxcpu=4` is fine but `pptdevs=10/0/0` is not (the loader rejects
//!   that line too: quote it);
//! - a variable name starts with a letter or digit and has letters, digits, `-`, `_`, `.`;
//! - `MODULE_load`, `_name`, `_type`, `_flags`, `_before`, `_after` and `_error` are module
//!   settings, not variables; of those we act on `vmm_load` (YES, any case, means load);
//! - a later setting of a variable replaces an earlier one.
//!
//! One deliberate difference from the Lua loader: it lets a quoted value run to the *last* `"`
//! on the line, so `pptdevs="1/0/0" # "nic"` is a syntax error there; here the value ends at the
//! first unescaped quote and the comment is a comment.
//!
//! # Tunables
//!
//! | name | default | values |
//! |---|---|---|
//! | `vmm_load` | NO | YES/NO, any case |
//! | `hw.vmm.maxcpu` | host CPUs | an integer as FreeBSD's `getenv_int` reads it (decimal, `0x` hex, leading-`0` octal, optional `k`/`m`/`g`/`t` suffix), clamped to 1..=[`VM_MAXCPU`] |
//! | `hw.vmm.halt_detection` | 1 | 0 or 1 (same integer syntax) |
//! | `pptdevs`, `pptdevs2`, `pptdevs3` | none | space-separated `bus/slot/function`, see [`pptdevs`] |
//!
//! `hw.vmm.maxcpu` follows vmm.ko: a value above [`VM_MAXCPU`] is clamped to it and a value
//! below 1 becomes 1, each with a [`DiagnosticKind::Clamped`] warning. Newer FreeBSD sets
//! `VM_MAXCPU` to `MIN(0xffff - 1, CPU_SETSIZE)`, 1024 on amd64, which is also Linux KVM's
//! `KVM_MAX_VCPUS` on x86; the backend may still refuse fewer when a VM is created.
//!
//! # Errors and diagnostics
//!
//! Anything the loader or the kernel would skip is skipped here too, and reported as a
//! [`Diagnostic`] naming the file, line, column, variable and offending text: malformed lines,
//! unknown variables (kept in [`Tunables::others`]), other modules' settings, overridden
//! settings, every ignored `pptdevs` entry. A value of ours that cannot be used at all is a
//! [`TunablesError`] instead, which refuses the load: a `hw.vmm.maxcpu` or
//! `hw.vmm.halt_detection` that is not an integer (or not 0/1), and a `pptdevs` variable over 128
//! bytes (none of its entries is used).

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use passthrough::PciAddress;

/// The most vCPUs `hw.vmm.maxcpu` may allow (FreeBSD's `VM_MAXCPU` on amd64).
pub const VM_MAXCPU: u32 = 1024;

/// `hw.vmm.maxcpu`.
pub const MAXCPU: &str = "hw.vmm.maxcpu";
/// `hw.vmm.halt_detection`.
pub const HALT_DETECTION: &str = "hw.vmm.halt_detection";
/// The module this crate is, for `vmm_load`.
pub const MODULE: &str = "vmm";

/// Module-setting suffixes of loader.conf(5) (`MODULE_load` and friends).
const MODULE_SETTINGS: [&str; 7] = ["load", "name", "type", "flags", "before", "after", "error"];

/// Errors that refuse a tunables file; each names the file, line, variable and value.
#[derive(Debug, thiserror::Error)]
pub enum TunablesError {
    /// The file cannot be read.
    #[error("Cannot read {}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A tunable of ours has a value that cannot be used.
    #[error("{file}:{line}: {variable}: invalid value {value:?}: {reason}")]
    InvalidValue {
        /// The file.
        file: String,
        /// The line, from 1.
        line: usize,
        /// The tunable.
        variable: String,
        /// The value as set (after quote and escape processing).
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A `pptdevs` variable that cannot be used (too long).
    #[error("{file}:{line}: {variable} not used")]
    Pptdevs {
        /// The file.
        file: String,
        /// The line, from 1.
        line: usize,
        /// The variable.
        variable: String,
        /// Why.
        #[source]
        source: pptdevs::PptdevsError,
    },
}

/// The tunables vmm reads at load time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tunables {
    /// `vmm_load="YES"` was given.
    pub vmm_load: bool,
    /// `hw.vmm.maxcpu`: the most vCPUs a VM may have, 1..=[`VM_MAXCPU`].
    pub maxcpu: u32,
    /// `hw.vmm.halt_detection`: halt the VM when every vCPU halts with interrupts disabled.
    pub halt_detection: bool,
    /// Devices to reserve for passthrough, from `pptdevs`, `pptdevs2`, `pptdevs3` in that order,
    /// each once.
    pub pptdevs: Vec<PciAddress>,
    /// Every other variable the file sets (loader.conf holds many), by name.
    pub others: BTreeMap<String, String>,
}

/// A parsed file: the tunables, and a diagnostic for everything that was ignored or adjusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// The tunables.
    pub tunables: Tunables,
    /// Diagnostics in file order.
    pub diagnostics: Vec<Diagnostic>,
}

/// Something in the file that was ignored or adjusted, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The file, as named to the parser.
    pub file: String,
    /// The line, from 1.
    pub line: usize,
    /// The variable the line sets; for a line too malformed to have one, its leading text.
    /// Never empty.
    pub variable: String,
    /// The byte column, from 1, where the offending text starts.
    pub position: usize,
    /// What was ignored or adjusted, and why.
    pub kind: DiagnosticKind,
}

impl Diagnostic {
    /// The message, without the location.
    pub fn message(&self) -> String {
        self.kind.to_string()
    }
}

/// Formats as `file:line:column: variable: message`.
impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}: {}",
            self.file, self.line, self.position, self.variable, self.kind
        )
    }
}

/// What a [`Diagnostic`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiagnosticKind {
    /// Not `name=value` with an optional comment; the line is ignored (the loader skips it too).
    MalformedLine {
        /// What is wrong.
        reason: &'static str,
        /// The offending text, from `position` to the end of the line.
        text: String,
    },
    /// The value has a `\` or `$` error; the variable is not set (as in the loader).
    BadValue {
        /// What is wrong.
        reason: &'static str,
        /// The value as written.
        text: String,
    },
    /// Not a tunable of ours; kept in [`Tunables::others`].
    UnknownTunable {
        /// Its value.
        value: String,
    },
    /// A setting for another module (`zfs_load`...).
    OtherModule {
        /// The module.
        module: String,
    },
    /// A vmm module setting other than `vmm_load` (`vmm_flags`...), which we do not support.
    UnsupportedSetting {
        /// Its value.
        value: String,
    },
    /// `exec` runs a loader command; there is no loader here.
    Exec {
        /// The command.
        command: String,
    },
    /// `vmm_load` is neither YES nor NO (any case); like the loader we read it as NO.
    NotYesOrNo {
        /// The value.
        value: String,
    },
    /// This setting is replaced by a later one.
    Overridden {
        /// The line of the later setting.
        by_line: usize,
    },
    /// `$name` names no variable set earlier in this file; it expanded to nothing.
    UnsetReference {
        /// The variable referred to.
        name: String,
    },
    /// `hw.vmm.maxcpu` out of 1..=[`VM_MAXCPU`], clamped as vmm.ko does.
    Clamped {
        /// The value as written.
        value: String,
        /// The value used.
        to: u32,
    },
    /// A `pptdevs` entry, or the part of one, that bhyve would ignore.
    PptdevsEntry {
        /// The entry's index in its variable, from 1.
        entry: usize,
        /// The ignored text.
        text: String,
        /// Why.
        reason: pptdevs::Reason,
    },
    /// A device listed a second time.
    DuplicateDevice {
        /// The device.
        device: PciAddress,
        /// Where it was listed first.
        first_variable: String,
        /// The line of that listing.
        first_line: usize,
    },
}

impl fmt::Display for DiagnosticKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::MalformedLine { reason, text } => {
                write!(f, "Malformed line, ignored: {reason}: {text:?}")
            }
            Self::BadValue { reason, text } => {
                write!(f, "Bad value {text:?}, variable not set: {reason}")
            }
            Self::UnknownTunable { value } => {
                write!(f, "Unknown tunable, ignored (value {value:?})")
            }
            Self::OtherModule { module } => {
                write!(f, "Setting for module {module:?}, ignored")
            }
            Self::UnsupportedSetting { value } => {
                write!(f, "Unsupported vmm module setting, ignored (value {value:?})")
            }
            Self::Exec { command } => write!(f, "Loader command not run: {command:?}"),
            Self::NotYesOrNo { value } => {
                write!(f, "Value {value:?} is neither YES nor NO, read as NO")
            }
            Self::Overridden { by_line } => {
                write!(f, "Replaced by the setting on line {by_line}")
            }
            Self::UnsetReference { name } => {
                write!(f, "${name} is not set earlier in this file, expanded to nothing")
            }
            Self::Clamped { value, to } => {
                write!(f, "Value {value:?} out of range 1..={VM_MAXCPU}, clamped to {to}")
            }
            Self::PptdevsEntry {
                entry,
                text,
                reason,
            } => write!(f, "Entry {entry} {text:?} ignored: {reason}"),
            Self::DuplicateDevice {
                device,
                first_variable,
                first_line,
            } => write!(
                f,
                "Device {} ({device}) already listed in {first_variable} on line {first_line}, ignored",
                device.pptdevs_form()
            ),
        }
    }
}

/// The `pptdevs` syntax, exactly as bhyve's vmm.ko reads it, with every ignored entry reported.
///
/// vmm.ko (`vmm_is_pptdev`) splits the value at each space character (only `' '`: a tab is not a
/// separator) and runs the kernel's `sscanf(entry, "%d/%d/%d")` on each piece, using the piece
/// when three numbers were converted. What that accepts, and so what [`parse`] accepts:
///
/// - each `%d` skips leading white space (space, `\t`, `\n`, `\v`, `\f`, `\r`) — so a piece that
///   starts with a tab is fine — then takes an optional `+`/`-` and decimal digits, at most 31
///   characters in all (the kernel's conversion buffer); leading zeros are decimal (`010` is
///   10), and `0x10` converts only the `0`;
/// - each `/` must follow its number immediately: `10 /0/0` cannot occur (the space splits it),
///   and `10/\t0/0` is accepted since `%d` skips the tab;
/// - anything after the third number is ignored, so `10/0/0,6/5/0` and `10/0/0\t6/5/0` give
///   10/0/0 only; we accept the triple too and report the rest as [`Reason::TrailingText`];
/// - empty pieces (double, leading or trailing spaces) are skipped; they are not entries.
///
/// Beyond bhyve, a triple whose numbers are out of PCI range (bus > 255, slot > 31, function > 7,
/// or negative), which bhyve keeps but can never match to a device, is reported as
/// [`Reason::OutOfRange`]. The one deliberate difference: a number that does not fit a C `int`
/// is refused ([`Reason::Overflow`]) where bhyve's `sscanf` silently keeps its low 32 bits
/// (`4294967306/0/0` would be bus 10 there).
///
/// A value longer than [`MAX_LEN`] bytes, the kernel environment's limit (`KENV_MVALLEN`), is
/// an error and none of its entries is used. A NUL byte ends the value for the kernel; what
/// follows it is reported as [`Reason::AfterNul`].
pub mod pptdevs {
    use std::fmt;

    use passthrough::{PciAddress, MAX_FUNCTION, MAX_SLOT};

    /// Longest value, in bytes, the kernel environment holds.
    pub const MAX_LEN: usize = 128;

    /// The variables vmm.ko reads, in order.
    pub const VARIABLES: [&str; 3] = ["pptdevs", "pptdevs2", "pptdevs3"];

    /// The kernel's numeric conversion buffer holds 31 characters and a NUL.
    const SCANF_WIDTH: usize = 31;

    /// A `pptdevs` value that cannot be used at all.
    #[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
    pub enum PptdevsError {
        /// Longer than [`MAX_LEN`].
        #[error("Value of {variable} is {len} bytes, over the limit of {MAX_LEN}: {value:?}")]
        TooLong {
            /// The variable.
            variable: String,
            /// Its length in bytes.
            len: usize,
            /// The value.
            value: String,
        },
    }

    /// One of the three numbers of an entry.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Field {
        /// The first.
        Bus,
        /// The second.
        Slot,
        /// The third.
        Function,
    }

    impl Field {
        const ALL: [Field; 3] = [Field::Bus, Field::Slot, Field::Function];

        fn max(self) -> i64 {
            match self {
                Field::Bus => i64::from(u8::MAX),
                Field::Slot => i64::from(MAX_SLOT),
                Field::Function => i64::from(MAX_FUNCTION),
            }
        }
    }

    impl fmt::Display for Field {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(match self {
                Field::Bus => "bus",
                Field::Slot => "slot",
                Field::Function => "function",
            })
        }
    }

    /// Why (part of) an entry is ignored.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Reason {
        /// `sscanf("%d/%d/%d")` converted fewer than three numbers (hex, `:`, `.`, `,` or a
        /// missing number).
        NotATriple {
            /// How many numbers it converted.
            converted: usize,
        },
        /// A number out of its PCI range.
        OutOfRange {
            /// Which number.
            field: Field,
            /// Its value.
            value: i64,
            /// The largest value allowed.
            max: i64,
        },
        /// A number that does not fit a C `int`; bhyve would wrap it.
        Overflow {
            /// Which number.
            field: Field,
            /// What bhyve's `sscanf` would have stored.
            wrapped: i32,
        },
        /// Text after a valid triple: the triple is used, this text is not.
        TrailingText {
            /// The device the triple names.
            device: PciAddress,
        },
        /// Text after a NUL byte, where the value ends for the kernel.
        AfterNul,
    }

    impl fmt::Display for Reason {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            match self {
                Reason::NotATriple { converted } => write!(
                    f,
                    "not decimal bus/slot/function (only {converted} of 3 numbers read)"
                ),
                Reason::OutOfRange { field, value, max } => {
                    write!(f, "{field} {value} out of range 0..={max}")
                }
                Reason::Overflow { field, wrapped } => write!(
                    f,
                    "{field} does not fit a C int (bhyve would silently use {wrapped})"
                ),
                Reason::TrailingText { device } => write!(
                    f,
                    "text after {} is not read; entries are separated by single spaces only",
                    device.pptdevs_form()
                ),
                Reason::AfterNul => write!(f, "text after a NUL byte, where the value ends"),
            }
        }
    }

    /// An entry that names a device.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Accepted {
        /// The device.
        pub addr: PciAddress,
        /// The entry's index in the value, from 1.
        pub entry: usize,
        /// Byte offset of the entry in the value.
        pub offset: usize,
    }

    /// An entry, or the part of one, that is not used.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Ignored {
        /// The variable.
        pub variable: String,
        /// The entry's index in the value, from 1.
        pub entry: usize,
        /// Byte offset of `text` in the value.
        pub offset: usize,
        /// The ignored text.
        pub text: String,
        /// Why.
        pub reason: Reason,
    }

    /// Formats as `variable: entry N "text" ignored: reason`.
    impl fmt::Display for Ignored {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(
                f,
                "{}: entry {} {:?} at offset {} ignored: {}",
                self.variable, self.entry, self.text, self.offset, self.reason
            )
        }
    }

    /// What one variable gives.
    ///
    /// Every non-empty space-separated piece before any NUL is either in `accepted` or in
    /// `ignored` with a reason other than [`Reason::TrailingText`] (which notes the unread tail
    /// of an accepted piece) and [`Reason::AfterNul`].
    #[derive(Debug, Clone, Default, PartialEq, Eq)]
    pub struct Parse {
        /// Entries that name a device, in order (a device listed twice is here twice).
        pub accepted: Vec<Accepted>,
        /// Everything ignored, in order.
        pub ignored: Vec<Ignored>,
    }

    /// Parses the value of `variable` (one of [`VARIABLES`], though any name is accepted).
    pub fn parse(variable: &str, value: &str) -> Result<Parse, PptdevsError> {
        // The kernel sees a C string: it ends at the first NUL.
        let full = value;
        let (value, after_nul) = match full.find('\0') {
            Some(i) => (&full[..i], Some(i)),
            None => (full, None),
        };
        if value.len() > MAX_LEN {
            return Err(PptdevsError::TooLong {
                variable: variable.to_owned(),
                len: value.len(),
                value: value.to_owned(),
            });
        }
        let mut out = Parse::default();
        let mut entry = 0;
        let mut offset = 0;
        for piece in value.split(' ') {
            let at = offset;
            offset += piece.len() + 1;
            if piece.is_empty() {
                continue;
            }
            entry += 1;
            let ignore = |text: &str, off: usize, reason: Reason| Ignored {
                variable: variable.to_owned(),
                entry,
                offset: off,
                text: text.to_owned(),
                reason,
            };
            let scan = scan_triple(piece.as_bytes());
            if scan.converted < 3 {
                out.ignored.push(ignore(
                    piece,
                    at,
                    Reason::NotATriple {
                        converted: scan.converted,
                    },
                ));
                continue;
            }
            match to_address(scan.values) {
                Ok(addr) => {
                    out.accepted.push(Accepted {
                        addr,
                        entry,
                        offset: at,
                    });
                    let rest = &piece[scan.end..];
                    if !rest.is_empty() {
                        out.ignored.push(ignore(
                            rest,
                            at + scan.end,
                            Reason::TrailingText { device: addr },
                        ));
                    }
                }
                Err(reason) => out.ignored.push(ignore(piece, at, reason)),
            }
        }
        if let Some(nul) = after_nul {
            out.ignored.push(Ignored {
                variable: variable.to_owned(),
                entry: entry + 1,
                offset: nul,
                text: full[nul..].to_owned(),
                reason: Reason::AfterNul,
            });
        }
        Ok(out)
    }

    /// Checks the three numbers `sscanf` produced.
    fn to_address(values: [i64; 3]) -> Result<PciAddress, Reason> {
        let mut fields = [0u8; 3];
        for ((field, value), slot) in Field::ALL.into_iter().zip(values).zip(&mut fields) {
            if i32::try_from(value).is_err() {
                return Err(Reason::Overflow {
                    field,
                    wrapped: wrap_to_int(value),
                });
            }
            match u8::try_from(value) {
                Ok(v) if i64::from(v) <= field.max() => *slot = v,
                _ => {
                    return Err(Reason::OutOfRange {
                        field,
                        value,
                        max: field.max(),
                    })
                }
            }
        }
        let [bus, slot, function] = fields;
        PciAddress::new(bus, slot, function).map_err(|_| Reason::NotATriple { converted: 3 })
    }

    /// What C's `*(int *)p = (quad)v` stores: the low 32 bits, as signed.
    fn wrap_to_int(v: i64) -> i32 {
        let low = v.rem_euclid(1 << 32);
        let signed = if low >= 1 << 31 { low - (1 << 32) } else { low };
        i32::try_from(signed).unwrap_or(i32::MIN)
    }

    /// What `sscanf(piece, "%d/%d/%d")` did.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(super) struct Scan {
        /// Numbers converted (the return value when ≥ 0).
        pub(super) converted: usize,
        /// The numbers, as `strtoq` returned them (before the cast to `int`).
        pub(super) values: [i64; 3],
        /// Bytes consumed through the last converted number.
        pub(super) end: usize,
    }

    /// The kernel's `isspace`.
    pub(super) fn is_c_space(b: u8) -> bool {
        b == b' ' || (b'\t'..=b'\r').contains(&b)
    }

    /// FreeBSD kernel `vsscanf(piece, "%d/%d/%d")`, conversion for conversion.
    pub(super) fn scan_triple(piece: &[u8]) -> Scan {
        let mut scan = Scan {
            converted: 0,
            values: [0; 3],
            end: 0,
        };
        let mut i = 0;
        for n in 0..3 {
            if n > 0 {
                // The literal '/': no white space skipped before it.
                if piece.get(i) != Some(&b'/') {
                    return scan;
                }
                i += 1;
            }
            // %d: skip white space, then at most 31 characters of [sign] digits.
            while piece.get(i).copied().is_some_and(is_c_space) {
                i += 1;
            }
            let start = i;
            let mut negative = false;
            let mut digits = 0usize;
            let mut value: i64 = 0;
            let mut saturated = false;
            while i - start < SCANF_WIDTH {
                match piece.get(i) {
                    Some(&c @ (b'+' | b'-')) if i == start => negative = c == b'-',
                    Some(&d) if d.is_ascii_digit() => {
                        digits += 1;
                        let digit = i64::from(d - b'0');
                        // strtoq accumulates toward the sign and clamps at QUAD_MAX/QUAD_MIN.
                        let next = value.checked_mul(10).and_then(|v| {
                            if negative {
                                v.checked_sub(digit)
                            } else {
                                v.checked_add(digit)
                            }
                        });
                        match next {
                            Some(v) if !saturated => value = v,
                            _ => {
                                saturated = true;
                                value = if negative { i64::MIN } else { i64::MAX };
                            }
                        }
                    }
                    _ => break,
                }
                i += 1;
            }
            if digits == 0 {
                return scan;
            }
            scan.values[n] = value;
            scan.converted = n + 1;
            scan.end = i;
        }
        scan
    }
}

/// Reads FreeBSD's `getenv_quad` way: `strtoq(s, &end, 0)` then an optional single `k`/`m`/`g`/`t`
/// suffix (powers of 1024) and nothing else. Overflow saturates.
fn parse_tunable_int(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let mut i = 0;
    while b.get(i).copied().is_some_and(pptdevs::is_c_space) {
        i += 1;
    }
    let mut negative = false;
    if let Some(&c @ (b'+' | b'-')) = b.get(i) {
        negative = c == b'-';
        i += 1;
    }
    let mut radix = 10;
    if b.get(i) == Some(&b'0')
        && matches!(b.get(i + 1), Some(b'x' | b'X'))
        && b.get(i + 2).is_some_and(u8::is_ascii_hexdigit)
    {
        radix = 16;
        i += 2;
    } else if b.get(i) == Some(&b'0') {
        radix = 8;
    }
    let mut value: i64 = 0;
    let mut digits = 0;
    while let Some(d) = b.get(i).and_then(|&c| char::from(c).to_digit(radix)) {
        let d = i64::from(d);
        value = value
            .checked_mul(i64::from(radix))
            .and_then(|v| {
                if negative {
                    v.checked_sub(d)
                } else {
                    v.checked_add(d)
                }
            })
            .unwrap_or(if negative { i64::MIN } else { i64::MAX });
        digits += 1;
        i += 1;
    }
    if digits == 0 {
        return None;
    }
    let shift = match &b[i..] {
        [] => 0,
        [c] => match c.to_ascii_lowercase() {
            b'k' => 10,
            b'm' => 20,
            b'g' => 30,
            b't' => 40,
            _ => return None,
        },
        _ => return None,
    };
    Some(value.saturating_mul(1i64 << shift))
}

/// One `name=value` assignment, as set.
#[derive(Debug, Clone)]
struct Setting {
    line: usize,
    name_col: usize,
    value: String,
    /// For each byte of `value`, the column (from 0) it came from in the line.
    origins: Vec<usize>,
    /// Column (from 0) where the value starts in the line.
    value_col: usize,
}

impl Setting {
    /// The 1-based column of byte `offset` of the value.
    fn column(&self, offset: usize) -> usize {
        self.origins
            .get(offset)
            .copied()
            .unwrap_or_else(|| self.origins.last().map_or(self.value_col, |c| c + 1))
            + 1
    }
}

/// A `name=value` line, split.
struct Assignment<'a> {
    name: &'a str,
    /// Column (from 0) of the name.
    name_col: usize,
    quoted: bool,
    /// The value as written, between the quotes if any.
    raw: &'a str,
    /// Column (from 0) where `raw` starts.
    value_col: usize,
}

/// What one line is.
enum Line<'a> {
    Blank,
    Malformed { col: usize, reason: &'static str },
    Assignment(Assignment<'a>),
}

fn is_name_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')
}

fn skip_space(b: &[u8], mut i: usize) -> usize {
    while b.get(i).copied().is_some_and(pptdevs::is_c_space) {
        i += 1;
    }
    i
}

fn split_line(line: &str) -> Line<'_> {
    let b = line.as_bytes();
    let start = skip_space(b, 0);
    if start == b.len() || b[start] == b'#' {
        return Line::Blank;
    }
    let mut i = start;
    while b.get(i).copied().is_some_and(is_name_char) {
        i += 1;
    }
    let name = &line[start..i];
    let eq = skip_space(b, i);
    if name.is_empty() || b.get(eq) != Some(&b'=') {
        return Line::Malformed {
            col: if name.is_empty() { start } else { eq },
            reason: "expected name=\"value\"",
        };
    }
    let v = skip_space(b, eq + 1);
    let (quoted, raw, value_col, after) = match b.get(v) {
        Some(b'"') => {
            let mut j = v + 1;
            loop {
                match b.get(j) {
                    None => {
                        return Line::Malformed {
                            col: v,
                            reason: "missing closing quote",
                        }
                    }
                    Some(b'\\') if j + 1 < b.len() => j += 2,
                    Some(b'"') => break,
                    Some(_) => j += 1,
                }
            }
            (true, &line[v + 1..j], v + 1, j + 1)
        }
        Some(&c) if c == b'-' || c.is_ascii_alphanumeric() => {
            let mut j = v;
            while b.get(j).copied().is_some_and(is_name_char) {
                j += 1;
            }
            (false, &line[v..j], v, j)
        }
        None => {
            return Line::Malformed {
                col: v,
                reason: "missing value",
            }
        }
        Some(_) => {
            return Line::Malformed {
                col: v,
                reason: "unquoted values hold only letters, digits, '-', '_' and '.'; quote it",
            }
        }
    };
    let rest = skip_space(b, after);
    if rest < b.len() && b[rest] != b'#' {
        return Line::Malformed {
            col: rest,
            reason: if quoted {
                "text after the closing quote"
            } else {
                "text after the unquoted value; quote values with other characters"
            },
        };
    }
    let starts_well = name
        .bytes()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    if !starts_well && module_setting(name).is_none() {
        return Line::Malformed {
            col: start,
            reason: "a variable name starts with a letter or digit",
        };
    }
    Line::Assignment(Assignment {
        name,
        name_col: start,
        quoted,
        raw,
        value_col,
    })
}

/// `MODULE_SETTING` split, if `name` is a loader module setting.
fn module_setting(name: &str) -> Option<(&str, &str)> {
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
    {
        return None;
    }
    MODULE_SETTINGS.iter().find_map(|s| {
        let module = name.strip_suffix(s)?.strip_suffix('_')?;
        (!module.is_empty()).then_some((module, *s))
    })
}

/// The loader's value processing: `\x` is `x`, `$name`/`${name}` expand from `env`.
/// Returns the value and, for each byte, the column it came from; or what is wrong.
fn expand(
    raw: &str,
    value_col: usize,
    env: &BTreeMap<String, Setting>,
    unset: &mut Vec<(usize, String)>,
) -> Result<(String, Vec<usize>), &'static str> {
    let b = raw.as_bytes();
    let mut out = String::with_capacity(raw.len());
    let mut origins = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < b.len() {
        let col = value_col + i;
        match b[i] {
            b'\\' => {
                let Some(c) = raw[i + 1..].chars().next() else {
                    return Err("stray escape at end of value");
                };
                out.push(c);
                origins.extend(std::iter::repeat_n(col, c.len_utf8()));
                i += 1 + c.len_utf8();
            }
            b'$' => {
                let (name, next) = if b.get(i + 1) == Some(&b'{') {
                    let Some(close) = raw[i + 2..].find('}') else {
                        return Err("malformed ${...} expression");
                    };
                    let name = &raw[i + 2..i + 2 + close];
                    if name.is_empty() {
                        return Err("malformed ${...} expression");
                    }
                    (name, i + 3 + close)
                } else {
                    let s = i + 1;
                    if s == b.len() {
                        return Err("unescaped $ at end of value");
                    }
                    if !b[s].is_ascii_alphanumeric() {
                        return Err("malformed $ expression");
                    }
                    let mut e = s + 1;
                    while b.get(e).copied().is_some_and(is_name_char) {
                        e += 1;
                    }
                    (&raw[s..e], e)
                };
                match env.get(name) {
                    Some(set) => {
                        out.push_str(&set.value);
                        origins.extend(std::iter::repeat_n(col, set.value.len()));
                    }
                    None => unset.push((col, name.to_owned())),
                }
                i = next;
            }
            _ => {
                let c = raw[i..].chars().next().unwrap_or('\u{fffd}');
                out.push(c);
                origins.extend(std::iter::repeat_n(col, c.len_utf8()));
                i += c.len_utf8();
            }
        }
    }
    Ok((out, origins))
}

/// Names we act on, which [`Tunables::others`] does not hold.
fn is_ours(name: &str) -> bool {
    name == MAXCPU || name == HALT_DETECTION || pptdevs::VARIABLES.contains(&name)
}

impl Tunables {
    /// The values with no file: not loaded by loader.conf, `maxcpu` = `host_cpus` (within
    /// 1..=[`VM_MAXCPU`]), halt detection on, no passthrough devices.
    pub fn defaults(host_cpus: u32) -> Self {
        Self {
            vmm_load: false,
            maxcpu: host_cpus.clamp(1, VM_MAXCPU),
            halt_detection: true,
            pptdevs: Vec::new(),
            others: BTreeMap::new(),
        }
    }

    /// Reads and parses the loader.conf(5)-format file at `path`.
    pub fn from_file(path: &Path, host_cpus: u32) -> Result<Parsed, TunablesError> {
        let text = std::fs::read(path).map_err(|source| TunablesError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&path.display().to_string(), &text, host_cpus)
    }

    /// Parses `text` in loader.conf(5) format; `file` names it in diagnostics and errors.
    pub fn parse(file: &str, text: &[u8], host_cpus: u32) -> Result<Parsed, TunablesError> {
        let mut reader = Reader::new(file);
        for (index, bytes) in text.split(|&b| b == b'\n').enumerate() {
            reader.line(index + 1, bytes);
        }
        reader.finish(host_cpus)
    }
}

/// The state of a file being read: variables set so far, diagnostics, refusals.
struct Reader<'f> {
    file: &'f str,
    diags: Vec<Diagnostic>,
    /// Every variable set so far (what the loader's environment would hold), by name.
    env: BTreeMap<String, Setting>,
    vmm_load: Option<Setting>,
    /// Refusals, with their line: the earliest is reported.
    errors: Vec<(usize, TunablesError)>,
}

impl<'f> Reader<'f> {
    fn new(file: &'f str) -> Self {
        Self {
            file,
            diags: Vec::new(),
            env: BTreeMap::new(),
            vmm_load: None,
            errors: Vec::new(),
        }
    }

    fn report(&mut self, line: usize, variable: &str, position: usize, kind: DiagnosticKind) {
        self.diags.push(Diagnostic {
            file: self.file.to_owned(),
            line,
            variable: variable.to_owned(),
            position,
            kind,
        });
    }

    fn line(&mut self, line_no: usize, bytes: &[u8]) {
        let Ok(line) = std::str::from_utf8(bytes) else {
            let lossy = String::from_utf8_lossy(bytes).into_owned();
            let kind = DiagnosticKind::MalformedLine {
                reason: "not valid UTF-8",
                text: lossy.clone(),
            };
            self.report(line_no, leading_text(&lossy), 1, kind);
            return;
        };
        match split_line(line) {
            Line::Blank => {}
            Line::Malformed { col, reason } => {
                let kind = DiagnosticKind::MalformedLine {
                    reason,
                    text: line[col..].to_owned(),
                };
                self.report(line_no, leading_text(line), col + 1, kind);
            }
            Line::Assignment(a) => {
                if let Some((module, setting)) = module_setting(a.name) {
                    self.module_setting(line_no, &a, module, setting);
                } else if a.name == "exec" && a.quoted {
                    let kind = DiagnosticKind::Exec {
                        command: a.raw.to_owned(),
                    };
                    self.report(line_no, a.name, a.name_col + 1, kind);
                } else {
                    self.variable(line_no, &a);
                }
            }
        }
    }

    /// `MODULE_SETTING=value`: only `vmm_load` means something to us.
    fn module_setting(&mut self, line_no: usize, a: &Assignment<'_>, module: &str, setting: &str) {
        let value = a.raw.to_owned();
        if module != MODULE {
            let kind = DiagnosticKind::OtherModule {
                module: module.to_owned(),
            };
            self.report(line_no, a.name, a.name_col + 1, kind);
            return;
        }
        if setting != "load" {
            let kind = DiagnosticKind::UnsupportedSetting { value };
            self.report(line_no, a.name, a.name_col + 1, kind);
            return;
        }
        if !value.eq_ignore_ascii_case("yes") && !value.eq_ignore_ascii_case("no") {
            let kind = DiagnosticKind::NotYesOrNo {
                value: value.clone(),
            };
            self.report(line_no, a.name, a.value_col + 1, kind);
        }
        let setting = Setting {
            line: line_no,
            name_col: a.name_col,
            origins: (a.value_col..a.value_col + value.len()).collect(),
            value,
            value_col: a.value_col,
        };
        if let Some(old) = self.vmm_load.replace(setting) {
            let kind = DiagnosticKind::Overridden { by_line: line_no };
            self.report(old.line, a.name, old.name_col + 1, kind);
        }
    }

    /// `name=value` for a loader environment variable.
    fn variable(&mut self, line_no: usize, a: &Assignment<'_>) {
        let mut unset = Vec::new();
        let (value, origins) = match expand(a.raw, a.value_col, &self.env, &mut unset) {
            Ok(v) => v,
            Err(reason) => {
                let kind = DiagnosticKind::BadValue {
                    reason,
                    text: a.raw.to_owned(),
                };
                self.report(line_no, a.name, a.value_col + 1, kind);
                return;
            }
        };
        for (col, name) in unset {
            self.report(
                line_no,
                a.name,
                col + 1,
                DiagnosticKind::UnsetReference { name },
            );
        }
        if !is_ours(a.name) {
            let kind = DiagnosticKind::UnknownTunable {
                value: value.clone(),
            };
            self.report(line_no, a.name, a.name_col + 1, kind);
        }
        let setting = Setting {
            line: line_no,
            name_col: a.name_col,
            value,
            origins,
            value_col: a.value_col,
        };
        if let Some(old) = self.env.insert(a.name.to_owned(), setting) {
            if is_ours(a.name) {
                let kind = DiagnosticKind::Overridden { by_line: line_no };
                self.report(old.line, a.name, old.name_col + 1, kind);
            }
        }
    }

    fn refuse(&mut self, variable: &str, reason: &'static str) {
        if let Some(set) = self.env.get(variable) {
            let err = TunablesError::InvalidValue {
                file: self.file.to_owned(),
                line: set.line,
                variable: variable.to_owned(),
                value: set.value.clone(),
                reason,
            };
            self.errors.push((set.line, err));
        }
    }

    fn maxcpu(&mut self, tunables: &mut Tunables) {
        let Some(set) = self.env.get(MAXCPU) else {
            return;
        };
        let Some(v) = parse_tunable_int(&set.value) else {
            return self.refuse(MAXCPU, "not an integer");
        };
        let clamped = v.clamp(1, i64::from(VM_MAXCPU));
        let to = u32::try_from(clamped).unwrap_or(VM_MAXCPU);
        tunables.maxcpu = to;
        if clamped != v {
            let (line, col) = (set.line, set.value_col + 1);
            let kind = DiagnosticKind::Clamped {
                value: set.value.clone(),
                to,
            };
            self.report(line, MAXCPU, col, kind);
        }
    }

    fn halt_detection(&mut self, tunables: &mut Tunables) {
        let Some(set) = self.env.get(HALT_DETECTION) else {
            return;
        };
        match parse_tunable_int(&set.value) {
            Some(0) => tunables.halt_detection = false,
            Some(1) => tunables.halt_detection = true,
            Some(_) => self.refuse(HALT_DETECTION, "must be 0 or 1"),
            None => self.refuse(HALT_DETECTION, "not an integer"),
        }
    }

    /// `pptdevs`, `pptdevs2`, `pptdevs3` in that order; a device listed again is reported.
    fn pptdevs(&mut self, tunables: &mut Tunables) {
        let mut first_seen: BTreeMap<PciAddress, (&str, usize)> = BTreeMap::new();
        for variable in pptdevs::VARIABLES {
            let Some(set) = self.env.get(variable).cloned() else {
                continue;
            };
            let parsed = match pptdevs::parse(variable, &set.value) {
                Ok(p) => p,
                Err(source) => {
                    let err = TunablesError::Pptdevs {
                        file: self.file.to_owned(),
                        line: set.line,
                        variable: variable.to_owned(),
                        source,
                    };
                    self.errors.push((set.line, err));
                    continue;
                }
            };
            for ignored in parsed.ignored {
                let kind = DiagnosticKind::PptdevsEntry {
                    entry: ignored.entry,
                    text: ignored.text,
                    reason: ignored.reason,
                };
                self.report(set.line, variable, set.column(ignored.offset), kind);
            }
            for accepted in parsed.accepted {
                if let Some(&(first_variable, first_line)) = first_seen.get(&accepted.addr) {
                    let kind = DiagnosticKind::DuplicateDevice {
                        device: accepted.addr,
                        first_variable: first_variable.to_owned(),
                        first_line,
                    };
                    self.report(set.line, variable, set.column(accepted.offset), kind);
                } else {
                    first_seen.insert(accepted.addr, (variable, set.line));
                    tunables.pptdevs.push(accepted.addr);
                }
            }
        }
    }

    fn finish(mut self, host_cpus: u32) -> Result<Parsed, TunablesError> {
        let mut tunables = Tunables::defaults(host_cpus);
        tunables.vmm_load = self
            .vmm_load
            .as_ref()
            .is_some_and(|s| s.value.eq_ignore_ascii_case("yes"));
        self.maxcpu(&mut tunables);
        self.halt_detection(&mut tunables);
        self.pptdevs(&mut tunables);
        if let Some((_, err)) = self.errors.into_iter().min_by_key(|(line, _)| *line) {
            return Err(err);
        }
        tunables.others = self
            .env
            .into_iter()
            .filter(|(name, _)| !is_ours(name))
            .map(|(name, set)| (name, set.value))
            .collect();
        self.diags.sort_by_key(|d| (d.line, d.position));
        Ok(Parsed {
            tunables,
            diagnostics: self.diags,
        })
    }
}

/// A malformed line's stand-in for a variable name: its text up to `=`, or the whole line,
/// trimmed; never empty.
fn leading_text(line: &str) -> &str {
    let head = line.split('=').next().unwrap_or(line).trim();
    if !head.is_empty() {
        return head;
    }
    let all = line.trim();
    if all.is_empty() {
        "(line)"
    } else {
        all
    }
}

#[cfg(test)]
mod tests {
    use super::pptdevs::scan_triple;
    use super::*;

    #[test]
    fn scan_follows_the_kernel_sscanf() {
        let s = scan_triple(b"10/0/0");
        assert_eq!((s.converted, s.values, s.end), (3, [10, 0, 0], 6));
        let s = scan_triple(b"\t+010/\n5/-1junk");
        assert_eq!((s.converted, s.values, s.end), (3, [10, 5, -1], 11));
        assert_eq!(scan_triple(b"0x10/0/0").converted, 1);
        assert_eq!(scan_triple(b"10:0:0").converted, 1);
        assert_eq!(scan_triple(b"10/0/").converted, 2);
        assert_eq!(scan_triple(b"10 /0/0").converted, 1);
        assert_eq!(scan_triple(b"-/0/0").converted, 0);
        assert_eq!(scan_triple(b"").converted, 0);
        // 31 characters at most per number: the 32nd digit is left for the '/'.
        let long = format!("{}1/0/0", "0".repeat(31));
        assert_eq!(scan_triple(long.as_bytes()).converted, 1);
        let fits = format!("{}1/0/0", "0".repeat(30));
        assert_eq!(scan_triple(fits.as_bytes()).values, [1, 0, 0]);
        // strtoq saturates.
        assert_eq!(scan_triple(b"99999999999999999999/0/0").values[0], i64::MAX);
    }

    #[test]
    fn tunable_integers_read_like_getenv_quad() {
        assert_eq!(parse_tunable_int("4"), Some(4));
        assert_eq!(parse_tunable_int(" 4"), Some(4));
        assert_eq!(parse_tunable_int("0x10"), Some(16));
        assert_eq!(parse_tunable_int("010"), Some(8));
        assert_eq!(parse_tunable_int("-3"), Some(-3));
        assert_eq!(parse_tunable_int("2k"), Some(2048));
        assert_eq!(parse_tunable_int("1M"), Some(1 << 20));
        assert_eq!(parse_tunable_int("08"), None);
        assert_eq!(parse_tunable_int("4 "), None);
        assert_eq!(parse_tunable_int("4kb"), None);
        assert_eq!(parse_tunable_int("x"), None);
        assert_eq!(parse_tunable_int(""), None);
        assert_eq!(parse_tunable_int("0x"), None);
        assert_eq!(parse_tunable_int("99999999999999999999t"), Some(i64::MAX));
    }
}
