//! The control ABI: a versioned binary protocol over a Unix stream socket, modelled on vmm(4)'s
//! ioctls on `/dev/vmm/NAME` (one socket per VM) and `/dev/vmmctl` (one per module).
//!
//! # Framing
//!
//! Every message, request or reply, is a 32-byte little-endian header followed by `length`
//! payload bytes:
//!
//! | offset | size | field | |
//! |---|---|---|---|
//! | 0 | 4 | magic | the bytes `B` `H` `V` `C` ([`MAGIC`]) |
//! | 4 | 2 | version | [`VERSION`]; offsets 0..6 never change, so any version can read another's |
//! | 6 | 2 | command | [`Command`]; a reply echoes it |
//! | 8 | 4 | flags | bit 0 [`FLAG_REPLY`]; other bits must be 0 |
//! | 12 | 4 | status | errno-style ([`status`]); 0 in requests |
//! | 16 | 4 | length | payload bytes that follow; at most [`MAX_PAYLOAD`] in a request |
//! | 20 | 4 | reserved | 0 |
//! | 24 | 8 | id | chosen by the client, echoed in the reply; 0 in a reply not tied to a request |
//!
//! A reply with status 0 carries the command's reply payload; any other status carries a UTF-8
//! message (at most [`MAX_MESSAGE_LEN`] bytes) saying what went wrong.
//!
//! # Payloads
//!
//! Integers are little-endian; a string is a `u16` byte count and UTF-8 bytes; a list is a
//! `u32` count and its items; a PCI address is four bytes `bus, slot, function, 0`.
//!
//! | command | request | reply |
//! |---|---|---|
//! | `HELLO` | — | [`Hello`] |
//! | `GET_REGS` | `u32 vcpu` | list of (`u16` [`Reg`] id, `u64` value) |
//! | `SET_REGS` | `u32 vcpu`, list of (`u16` id, `u64` value) | — |
//! | `MEMSEGS` | — | list of (`u64 gpa`, `u64 len`) |
//! | `IOAPIC_PIN` | `u32 pin`, `u32` [`PinOp`] | — |
//! | `INJECT_MSI` | `u64 addr`, `u32 data` | — |
//! | `GET_STATS` | `u32 vcpu` (`u32::MAX`: every vCPU) | list of (string scope, list of (string description, `u64` value)) |
//! | `SUSPEND` | `u32 how` (vm_suspend's numbers: 1 reset, 2 poweroff, 3 halt, 4 triple fault) | — |
//! | `RESET` | — | — |
//! | `BIND` / `UNBIND` | PCI address | — |
//! | `PAUSE` / `RESUME` | — | — |
//! | `CREATE` | `u32 ncpus`, string name | — |
//! | `DESTROY` | string name | — |
//! | `LIST` | — | list of (string name, `u32 ncpus`, `u8 running`) |
//! | `SYSCTL` | — | list of (string key, string value) |
//!
//! Decoding never trusts a count: a list's count is checked against the bytes left before any
//! item is read, and trailing bytes are an error.

use std::fmt;

use passthrough::PciAddress;
use stages::VmRequest;
use vcpu_runner::{DescriptorTable, Regs, Segment, SpecialRegs};

/// The first four bytes of every message: `B` `H` `V` `C`.
pub const MAGIC: u32 = u32::from_le_bytes(*b"BHVC");
/// The protocol version this build speaks.
pub const VERSION: u16 = 1;
/// Bytes in a header.
pub const HEADER_LEN: usize = 32;
/// The largest request payload a server accepts; checked before anything is allocated.
pub const MAX_PAYLOAD: u32 = 64 * 1024;
/// The largest reply payload a client accepts (and a server sends).
pub const MAX_REPLY_PAYLOAD: u32 = 4 * 1024 * 1024;
/// The longest error message carried by a reply.
pub const MAX_MESSAGE_LEN: usize = 1024;
/// Header flag: this message is a reply.
pub const FLAG_REPLY: u32 = 1;
/// Every flag this version knows.
pub const KNOWN_FLAGS: u32 = FLAG_REPLY;
/// `GET_STATS` selector meaning every vCPU.
pub const ALL_VCPUS: u32 = u32::MAX;

/// Reply statuses: errno values as Linux numbers them, whatever the host.
pub mod status {
    /// Success.
    pub const OK: u32 = 0;
    /// No such VM, device or entry.
    pub const ENOENT: u32 = 2;
    /// The operation failed in the VM or the host.
    pub const EIO: u32 = 5;
    /// The VM is not running (created, no bhyve attached), or the module is going away.
    pub const ENXIO: u32 = 6;
    /// The payload is longer than the server accepts.
    pub const E2BIG: u32 = 7;
    /// Too many connections: try again later.
    pub const EAGAIN: u32 = 11;
    /// Busy: a VM still exists, a device is assigned, the VM is running.
    pub const EBUSY: u32 = 16;
    /// A VM of that name exists.
    pub const EEXIST: u32 = 17;
    /// A bad argument.
    pub const EINVAL: u32 = 22;
    /// The command is not served on this endpoint (an ioctl the device does not have).
    pub const ENOTTY: u32 = 25;
    /// The VM cannot do this.
    pub const ENOSYS: u32 = 38;
    /// The message is malformed.
    pub const EBADMSG: u32 = 74;
    /// The reply would be too long.
    pub const EOVERFLOW: u32 = 75;
    /// The protocol version is not the server's.
    pub const EPROTONOSUPPORT: u32 = 93;
    /// The VM did not answer in time.
    pub const ETIMEDOUT: u32 = 110;
    /// Already done (vm_suspend on a suspended VM).
    pub const EALREADY: u32 = 114;

    /// The errno name of `status` (`"EINVAL"`), or `"E?"` for a number this version does not know.
    pub fn name(status: u32) -> &'static str {
        match status {
            OK => "OK",
            ENOENT => "ENOENT",
            EIO => "EIO",
            ENXIO => "ENXIO",
            E2BIG => "E2BIG",
            EAGAIN => "EAGAIN",
            EBUSY => "EBUSY",
            EEXIST => "EEXIST",
            EINVAL => "EINVAL",
            ENOTTY => "ENOTTY",
            ENOSYS => "ENOSYS",
            EBADMSG => "EBADMSG",
            EOVERFLOW => "EOVERFLOW",
            EPROTONOSUPPORT => "EPROTONOSUPPORT",
            ETIMEDOUT => "ETIMEDOUT",
            EALREADY => "EALREADY",
            _ => "E?",
        }
    }
}

/// Why bytes are not a valid message, or a value cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// The first four bytes are not [`MAGIC`].
    #[error("Bad magic {found:#010x} (expected {MAGIC:#010x}, \"BHVC\")")]
    BadMagic {
        /// What was there.
        found: u32,
    },
    /// The header's version is not [`VERSION`].
    #[error("Protocol version {found} not supported (this end speaks {VERSION})")]
    Version {
        /// The version in the header.
        found: u16,
    },
    /// The reserved header field is not zero.
    #[error("Reserved header field is {value:#x}, must be 0")]
    Reserved {
        /// Its value.
        value: u32,
    },
    /// Flags this version does not know.
    #[error("Unknown header flags {flags:#x}")]
    UnknownFlags {
        /// The unknown bits.
        flags: u32,
    },
    /// A request with the reply flag or a status, or a reply without the flag.
    #[error("{0}")]
    Direction(&'static str),
    /// The payload is longer than allowed.
    #[error("Payload of {length} bytes exceeds the limit of {max}")]
    TooLong {
        /// The length in the header.
        length: u32,
        /// The limit.
        max: u32,
    },
    /// The header's length does not match the bytes given.
    #[error("Header says {length} payload bytes, {have} follow")]
    LengthMismatch {
        /// The length in the header.
        length: u32,
        /// The bytes there are.
        have: usize,
    },
    /// A command number this version does not know.
    #[error("Unknown command {command}")]
    UnknownCommand {
        /// The number.
        command: u16,
    },
    /// The payload ends inside a field.
    #[error("Payload too short: {what} needs {need} more bytes, {have} left")]
    Short {
        /// The field.
        what: &'static str,
        /// Bytes the field needs.
        need: usize,
        /// Bytes left.
        have: usize,
    },
    /// Bytes left over after the last field.
    #[error("{extra} unexpected bytes after the payload")]
    Trailing {
        /// How many.
        extra: usize,
    },
    /// A string that is not UTF-8.
    #[error("{what} is not UTF-8")]
    BadUtf8 {
        /// The field.
        what: &'static str,
    },
    /// A field with a value it cannot have.
    #[error("Invalid {what} {value:#x}")]
    BadValue {
        /// The field.
        what: &'static str,
        /// The value.
        value: u64,
    },
    /// A list count larger than the bytes left could hold.
    #[error("{what}: {count} items cannot fit in the {have} bytes left")]
    Count {
        /// The list.
        what: &'static str,
        /// The count in the payload.
        count: u32,
        /// Bytes left.
        have: usize,
    },
    /// A value too large to encode (a string over 65535 bytes, a list over `u32::MAX` items).
    #[error("{what} too long to encode ({len})")]
    Unencodable {
        /// The field.
        what: &'static str,
        /// Its length.
        len: usize,
    },
}

/// A message header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Protocol version.
    pub version: u16,
    /// Command number (see [`Command`]).
    pub command: u16,
    /// Flags ([`FLAG_REPLY`]).
    pub flags: u32,
    /// Errno-style status (replies).
    pub status: u32,
    /// Payload bytes that follow.
    pub length: u32,
    /// Request id.
    pub id: u64,
}

pub(crate) fn le_u16(b: &[u8], at: usize) -> u16 {
    let mut a = [0u8; 2];
    if let Some(s) = b.get(at..at + 2) {
        a.copy_from_slice(s);
    }
    u16::from_le_bytes(a)
}

pub(crate) fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        a.copy_from_slice(s);
    }
    u32::from_le_bytes(a)
}

pub(crate) fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        a.copy_from_slice(s);
    }
    u64::from_le_bytes(a)
}

impl Header {
    /// A request header of this version.
    pub fn request(command: u16, length: u32, id: u64) -> Self {
        Self {
            version: VERSION,
            command,
            flags: 0,
            status: 0,
            length,
            id,
        }
    }

    /// A reply header of this version.
    pub fn reply(command: u16, status: u32, length: u32, id: u64) -> Self {
        Self {
            version: VERSION,
            command,
            flags: FLAG_REPLY,
            status,
            length,
            id,
        }
    }

    /// The 32 bytes on the wire.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..6].copy_from_slice(&self.version.to_le_bytes());
        b[6..8].copy_from_slice(&self.command.to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..16].copy_from_slice(&self.status.to_le_bytes());
        b[16..20].copy_from_slice(&self.length.to_le_bytes());
        // 20..24 reserved, zero.
        b[24..32].copy_from_slice(&self.id.to_le_bytes());
        b
    }

    /// Reads a header: checks the magic and the reserved field, nothing else (a version
    /// mismatch must still be answerable, so [`check_request`](Self::check_request) and
    /// [`check_reply`](Self::check_reply) do the rest).
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Self, ProtoError> {
        let magic = le_u32(b, 0);
        if magic != MAGIC {
            return Err(ProtoError::BadMagic { found: magic });
        }
        let reserved = le_u32(b, 20);
        if reserved != 0 {
            return Err(ProtoError::Reserved { value: reserved });
        }
        Ok(Self {
            version: le_u16(b, 4),
            command: le_u16(b, 6),
            flags: le_u32(b, 8),
            status: le_u32(b, 12),
            length: le_u32(b, 16),
            id: le_u64(b, 24),
        })
    }

    /// Checks a decoded header as a request: version, flags, no status, length at most
    /// `max_payload`. The version is checked first.
    pub fn check_request(&self, max_payload: u32) -> Result<(), ProtoError> {
        if self.version != VERSION {
            return Err(ProtoError::Version {
                found: self.version,
            });
        }
        if self.flags & !KNOWN_FLAGS != 0 {
            return Err(ProtoError::UnknownFlags {
                flags: self.flags & !KNOWN_FLAGS,
            });
        }
        if self.flags & FLAG_REPLY != 0 {
            return Err(ProtoError::Direction("A request has the reply flag set"));
        }
        if self.status != 0 {
            return Err(ProtoError::Direction("A request has a non-zero status"));
        }
        if self.length > max_payload {
            return Err(ProtoError::TooLong {
                length: self.length,
                max: max_payload,
            });
        }
        Ok(())
    }

    /// Checks a decoded header as a reply: version, flags, length at most
    /// [`MAX_REPLY_PAYLOAD`].
    pub fn check_reply(&self) -> Result<(), ProtoError> {
        if self.version != VERSION {
            return Err(ProtoError::Version {
                found: self.version,
            });
        }
        if self.flags & !KNOWN_FLAGS != 0 {
            return Err(ProtoError::UnknownFlags {
                flags: self.flags & !KNOWN_FLAGS,
            });
        }
        if self.flags & FLAG_REPLY == 0 {
            return Err(ProtoError::Direction("A reply lacks the reply flag"));
        }
        if self.length > MAX_REPLY_PAYLOAD {
            return Err(ProtoError::TooLong {
                length: self.length,
                max: MAX_REPLY_PAYLOAD,
            });
        }
        Ok(())
    }
}

macro_rules! commands {
    ($( $(#[$doc:meta])* $v:ident = $n:literal, $name:literal; )*) => {
        /// A command (the analogue of one vmm ioctl).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u16)]
        pub enum Command { $( $(#[$doc])* $v = $n, )* }

        impl Command {
            /// Every command.
            pub const ALL: &'static [Command] = &[$(Command::$v,)*];

            /// The command with wire number `n`.
            pub fn from_u16(n: u16) -> Option<Self> {
                match n { $( $n => Some(Command::$v), )* _ => None }
            }

            /// Its name, as errors print it (`GET_REGS`).
            pub fn name(self) -> &'static str {
                match self { $( Command::$v => $name, )* }
            }
        }
    };
}

commands! {
    /// Version and identity of the endpoint (both sockets).
    Hello = 1, "HELLO";
    /// A vCPU's registers.
    GetRegs = 2, "GET_REGS";
    /// Sets general registers of a vCPU.
    SetRegs = 3, "SET_REGS";
    /// Guest memory segments.
    MemorySegments = 4, "MEMSEGS";
    /// Asserts, deasserts or pulses an I/O APIC pin.
    IoapicPin = 5, "IOAPIC_PIN";
    /// Injects an MSI.
    InjectMsi = 6, "INJECT_MSI";
    /// Counters (vmm_stat).
    GetStats = 7, "GET_STATS";
    /// vm_suspend: stop the VM with a reason.
    Suspend = 8, "SUSPEND";
    /// vm_reinit: back to power-on state in place.
    Reset = 9, "RESET";
    /// Assigns a reserved passthrough device to the VM.
    Bind = 10, "BIND";
    /// Takes a passthrough device away from the VM.
    Unbind = 11, "UNBIND";
    /// Parks every vCPU.
    Pause = 12, "PAUSE";
    /// Lets parked vCPUs run again.
    Resume = 13, "RESUME";
    /// Turns exit tracing on or off (u32: 1 on, 0 off).
    Trace = 14, "TRACE";
    /// Creates a VM by name (module socket).
    Create = 32, "CREATE";
    /// Destroys a VM by name (module socket).
    Destroy = 33, "DESTROY";
    /// Lists the VMs (module socket).
    List = 34, "LIST";
    /// The `hw.vmm` tree (module socket).
    Sysctl = 35, "SYSCTL";
}

impl Command {
    /// Whether the module socket (`vmmctl`) serves this command; the others are the VM sockets'.
    /// `HELLO` is served by both.
    pub fn is_module_command(self) -> bool {
        matches!(
            self,
            Command::Hello | Command::Create | Command::Destroy | Command::List | Command::Sysctl
        )
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What to do to an I/O APIC pin (vm_ioapic_assert_irq / deassert_irq / pulse_irq).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PinOp {
    /// Raise the line.
    Assert,
    /// Lower the line.
    Deassert,
    /// Raise and lower (an edge).
    Pulse,
}

impl PinOp {
    fn to_u32(self) -> u32 {
        match self {
            PinOp::Assert => 0,
            PinOp::Deassert => 1,
            PinOp::Pulse => 2,
        }
    }

    fn from_u32(v: u32) -> Option<Self> {
        match v {
            0 => Some(PinOp::Assert),
            1 => Some(PinOp::Deassert),
            2 => Some(PinOp::Pulse),
            _ => None,
        }
    }
}

/// How to suspend, by vm_suspend's `enum vm_suspend_how` numbers.
fn suspend_to_u32(how: VmRequest) -> Option<u32> {
    match how {
        VmRequest::Reset => Some(1),
        VmRequest::PowerOff => Some(2),
        VmRequest::Halt => Some(3),
        VmRequest::TripleFault => Some(4),
        VmRequest::DebugExit(_) => None,
    }
}

fn suspend_from_u32(v: u32) -> Option<VmRequest> {
    match v {
        1 => Some(VmRequest::Reset),
        2 => Some(VmRequest::PowerOff),
        3 => Some(VmRequest::Halt),
        4 => Some(VmRequest::TripleFault),
        _ => None,
    }
}

macro_rules! registers {
    ($( $v:ident = $n:literal, $name:literal; )*) => {
        /// A register as `GET_REGS`/`SET_REGS` name it; the names are bhyvectl's.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[repr(u16)]
        #[allow(missing_docs)]
        pub enum Reg { $( $v = $n, )* }

        impl Reg {
            /// Every register, in wire order.
            pub const ALL: &'static [Reg] = &[$(Reg::$v,)*];

            /// Its wire number.
            pub fn id(self) -> u16 {
                self as u16
            }

            /// The register with wire number `id`.
            pub fn from_id(id: u16) -> Option<Self> {
                match id { $( $n => Some(Reg::$v), )* _ => None }
            }

            /// Its name (`rip`, `cs.base`).
            pub fn name(self) -> &'static str {
                match self { $( Reg::$v => $name, )* }
            }

            /// The register called `name`.
            pub fn from_name(name: &str) -> Option<Self> {
                match name { $( $name => Some(Reg::$v), )* _ => None }
            }
        }
    };
}

registers! {
    Rax = 0, "rax"; Rbx = 1, "rbx"; Rcx = 2, "rcx"; Rdx = 3, "rdx";
    Rsi = 4, "rsi"; Rdi = 5, "rdi"; Rbp = 6, "rbp"; Rsp = 7, "rsp";
    R8 = 8, "r8"; R9 = 9, "r9"; R10 = 10, "r10"; R11 = 11, "r11";
    R12 = 12, "r12"; R13 = 13, "r13"; R14 = 14, "r14"; R15 = 15, "r15";
    Rip = 16, "rip"; Rflags = 17, "rflags";
    Cr0 = 32, "cr0"; Cr2 = 33, "cr2"; Cr3 = 34, "cr3"; Cr4 = 35, "cr4"; Cr8 = 36, "cr8";
    Efer = 37, "efer"; ApicBase = 38, "apic_base";
    Cs = 64, "cs"; CsBase = 65, "cs.base"; CsLimit = 66, "cs.limit"; CsAccess = 67, "cs.access";
    Ds = 68, "ds"; DsBase = 69, "ds.base"; DsLimit = 70, "ds.limit"; DsAccess = 71, "ds.access";
    Es = 72, "es"; EsBase = 73, "es.base"; EsLimit = 74, "es.limit"; EsAccess = 75, "es.access";
    Fs = 76, "fs"; FsBase = 77, "fs.base"; FsLimit = 78, "fs.limit"; FsAccess = 79, "fs.access";
    Gs = 80, "gs"; GsBase = 81, "gs.base"; GsLimit = 82, "gs.limit"; GsAccess = 83, "gs.access";
    Ss = 84, "ss"; SsBase = 85, "ss.base"; SsLimit = 86, "ss.limit"; SsAccess = 87, "ss.access";
    Tr = 88, "tr"; TrBase = 89, "tr.base"; TrLimit = 90, "tr.limit"; TrAccess = 91, "tr.access";
    Ldtr = 92, "ldtr"; LdtrBase = 93, "ldtr.base"; LdtrLimit = 94, "ldtr.limit";
    LdtrAccess = 95, "ldtr.access";
    GdtrBase = 96, "gdtr.base"; GdtrLimit = 97, "gdtr.limit";
    IdtrBase = 98, "idtr.base"; IdtrLimit = 99, "idtr.limit";
}

impl Reg {
    /// Whether `SET_REGS` can set it (the general registers, `rip` and `rflags`).
    pub fn settable(self) -> bool {
        self.id() <= Reg::Rflags.id()
    }
}

/// A segment's access rights in the VMX layout bhyvectl prints (`desc_access`): type in bits
/// 0..4, S 4, DPL 5..7, P 7, L 13, D/B 14, G 15, unusable 16.
pub fn segment_access(s: &Segment) -> u32 {
    u32::from(s.type_ & 0xf)
        | u32::from(s.s) << 4
        | u32::from(s.dpl & 3) << 5
        | u32::from(s.present) << 7
        | u32::from(s.l) << 13
        | u32::from(s.db) << 14
        | u32::from(s.g) << 15
        | u32::from(s.unusable) << 16
}

fn segment_regs(out: &mut Vec<(Reg, u64)>, s: &Segment, regs: [Reg; 4]) {
    let [sel, base, limit, access] = regs;
    out.push((sel, u64::from(s.selector)));
    out.push((base, s.base));
    out.push((limit, u64::from(s.limit)));
    out.push((access, u64::from(segment_access(s))));
}

fn table_regs(out: &mut Vec<(Reg, u64)>, t: &DescriptorTable, base: Reg, limit: Reg) {
    out.push((base, t.base));
    out.push((limit, u64::from(t.limit)));
}

/// Every register of a vCPU, in wire order, from its general and special registers.
pub fn register_list(r: &Regs, s: &SpecialRegs) -> Vec<(Reg, u64)> {
    let mut out = vec![
        (Reg::Rax, r.rax),
        (Reg::Rbx, r.rbx),
        (Reg::Rcx, r.rcx),
        (Reg::Rdx, r.rdx),
        (Reg::Rsi, r.rsi),
        (Reg::Rdi, r.rdi),
        (Reg::Rbp, r.rbp),
        (Reg::Rsp, r.rsp),
        (Reg::R8, r.r8),
        (Reg::R9, r.r9),
        (Reg::R10, r.r10),
        (Reg::R11, r.r11),
        (Reg::R12, r.r12),
        (Reg::R13, r.r13),
        (Reg::R14, r.r14),
        (Reg::R15, r.r15),
        (Reg::Rip, r.rip),
        (Reg::Rflags, r.rflags),
        (Reg::Cr0, s.cr0),
        (Reg::Cr2, s.cr2),
        (Reg::Cr3, s.cr3),
        (Reg::Cr4, s.cr4),
        (Reg::Cr8, s.cr8),
        (Reg::Efer, s.efer),
        (Reg::ApicBase, s.apic_base),
    ];
    segment_regs(
        &mut out,
        &s.cs,
        [Reg::Cs, Reg::CsBase, Reg::CsLimit, Reg::CsAccess],
    );
    segment_regs(
        &mut out,
        &s.ds,
        [Reg::Ds, Reg::DsBase, Reg::DsLimit, Reg::DsAccess],
    );
    segment_regs(
        &mut out,
        &s.es,
        [Reg::Es, Reg::EsBase, Reg::EsLimit, Reg::EsAccess],
    );
    segment_regs(
        &mut out,
        &s.fs,
        [Reg::Fs, Reg::FsBase, Reg::FsLimit, Reg::FsAccess],
    );
    segment_regs(
        &mut out,
        &s.gs,
        [Reg::Gs, Reg::GsBase, Reg::GsLimit, Reg::GsAccess],
    );
    segment_regs(
        &mut out,
        &s.ss,
        [Reg::Ss, Reg::SsBase, Reg::SsLimit, Reg::SsAccess],
    );
    segment_regs(
        &mut out,
        &s.tr,
        [Reg::Tr, Reg::TrBase, Reg::TrLimit, Reg::TrAccess],
    );
    segment_regs(
        &mut out,
        &s.ldt,
        [Reg::Ldtr, Reg::LdtrBase, Reg::LdtrLimit, Reg::LdtrAccess],
    );
    table_regs(&mut out, &s.gdt, Reg::GdtrBase, Reg::GdtrLimit);
    table_regs(&mut out, &s.idt, Reg::IdtrBase, Reg::IdtrLimit);
    out
}

/// Sets `reg` in `r`; false if `reg` is not one [`Regs`] holds (see [`Reg::settable`]).
pub fn set_register(r: &mut Regs, reg: Reg, value: u64) -> bool {
    let slot = match reg {
        Reg::Rax => &mut r.rax,
        Reg::Rbx => &mut r.rbx,
        Reg::Rcx => &mut r.rcx,
        Reg::Rdx => &mut r.rdx,
        Reg::Rsi => &mut r.rsi,
        Reg::Rdi => &mut r.rdi,
        Reg::Rbp => &mut r.rbp,
        Reg::Rsp => &mut r.rsp,
        Reg::R8 => &mut r.r8,
        Reg::R9 => &mut r.r9,
        Reg::R10 => &mut r.r10,
        Reg::R11 => &mut r.r11,
        Reg::R12 => &mut r.r12,
        Reg::R13 => &mut r.r13,
        Reg::R14 => &mut r.r14,
        Reg::R15 => &mut r.r15,
        Reg::Rip => &mut r.rip,
        Reg::Rflags => &mut r.rflags,
        _ => return false,
    };
    *slot = value;
    true
}

/// What an endpoint is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// The module socket, `vmmctl`.
    Module,
    /// A VM's socket.
    Vm,
}

/// The `HELLO` reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The server's protocol version.
    pub version: u16,
    /// Module or VM socket.
    pub endpoint: Endpoint,
    /// The VM's name (`vmmctl` for the module).
    pub name: String,
    /// The VM's vCPUs (0 for the module).
    pub ncpus: u32,
    /// Whether a running instance (bhyve) is attached to the VM.
    pub running: bool,
    /// `hw.vmm.maxcpu`.
    pub maxcpu: u32,
}

/// The counters of one scope (`vcpu0`, `devmodel0`...), as `GET_STATS` returns them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatScope {
    /// The scope: `vcpuN` for a vCPU, anything else for VM-wide or device-model counters.
    pub scope: String,
    /// (description, value), in display order.
    pub counters: Vec<(String, u64)>,
}

impl StatScope {
    /// The vCPU this scope belongs to, if its name is `vcpuN`.
    pub fn vcpu(&self) -> Option<u32> {
        let digits = self.scope.strip_prefix("vcpu")?;
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        digits.parse().ok()
    }
}

/// One VM in a `LIST` reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmListing {
    /// Its name.
    pub name: String,
    /// Its vCPUs.
    pub ncpus: u32,
    /// Whether a running instance is attached.
    pub running: bool,
}

/// A request, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `HELLO`.
    Hello,
    /// `GET_REGS`.
    GetRegs {
        /// The vCPU.
        vcpu: u32,
    },
    /// `SET_REGS`.
    SetRegs {
        /// The vCPU.
        vcpu: u32,
        /// Registers to set, in order.
        regs: Vec<(Reg, u64)>,
    },
    /// `MEMSEGS`.
    MemorySegments,
    /// `IOAPIC_PIN`.
    IoapicPin {
        /// The pin.
        pin: u32,
        /// What to do.
        op: PinOp,
    },
    /// `INJECT_MSI`.
    InjectMsi {
        /// Message address.
        addr: u64,
        /// Message data.
        data: u32,
    },
    /// `GET_STATS`.
    GetStats {
        /// One vCPU's counters (and the VM-wide ones), or every vCPU's with `None`.
        vcpu: Option<u32>,
    },
    /// `SUSPEND`.
    Suspend {
        /// Why (reset, power-off, halt, triple fault; not a debug exit).
        how: VmRequest,
    },
    /// `RESET`.
    Reset,
    /// `BIND`.
    Bind {
        /// The device.
        addr: PciAddress,
    },
    /// `UNBIND`.
    Unbind {
        /// The device.
        addr: PciAddress,
    },
    /// `PAUSE`.
    Pause,
    /// `RESUME`.
    Resume,
    /// `TRACE`: exit tracing on or off.
    Trace {
        /// On.
        on: bool,
    },
    /// `CREATE`.
    Create {
        /// The name.
        name: String,
        /// vCPUs.
        ncpus: u32,
    },
    /// `DESTROY`.
    Destroy {
        /// The name.
        name: String,
    },
    /// `LIST`.
    List,
    /// `SYSCTL`.
    Sysctl,
}

/// A successful reply, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// To `HELLO`.
    Hello(Hello),
    /// To `GET_REGS`.
    Regs(Vec<(Reg, u64)>),
    /// To `MEMSEGS`: (gpa, len).
    MemorySegments(Vec<(u64, u64)>),
    /// To `GET_STATS`.
    Stats(Vec<StatScope>),
    /// To `LIST`.
    List(Vec<VmListing>),
    /// To `SYSCTL`: (key, value) in key order.
    Sysctl(Vec<(String, String)>),
    /// To any other command: nothing.
    Done,
}

/// Payload writer.
#[derive(Default)]
struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn str(&mut self, what: &'static str, s: &str) -> Result<(), ProtoError> {
        let len =
            u16::try_from(s.len()).map_err(|_| ProtoError::Unencodable { what, len: s.len() })?;
        self.u16(len);
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
    fn count(&mut self, what: &'static str, n: usize) -> Result<(), ProtoError> {
        let n = u32::try_from(n).map_err(|_| ProtoError::Unencodable { what, len: n })?;
        self.u32(n);
        Ok(())
    }
    fn pci(&mut self, a: PciAddress) {
        self.0
            .extend_from_slice(&[a.bus(), a.slot(), a.function(), 0]);
    }
}

/// Payload reader: every read is bounds-checked.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(b: &'a [u8]) -> Self {
        Self { rest: b }
    }

    fn take(&mut self, what: &'static str, n: usize) -> Result<&'a [u8], ProtoError> {
        if self.rest.len() < n {
            return Err(ProtoError::Short {
                what,
                need: n,
                have: self.rest.len(),
            });
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, ProtoError> {
        Ok(self.take(what, 1)?.first().copied().unwrap_or(0))
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, ProtoError> {
        Ok(le_u16(self.take(what, 2)?, 0))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, ProtoError> {
        Ok(le_u32(self.take(what, 4)?, 0))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, ProtoError> {
        Ok(le_u64(self.take(what, 8)?, 0))
    }
    fn str(&mut self, what: &'static str) -> Result<String, ProtoError> {
        let len = self.u16(what)?;
        let bytes = self.take(what, usize::from(len))?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| ProtoError::BadUtf8 { what })
    }
    fn bool(&mut self, what: &'static str) -> Result<bool, ProtoError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(ProtoError::BadValue {
                what,
                value: u64::from(v),
            }),
        }
    }
    /// A list count, checked against the bytes left: each item takes at least `min_item`.
    fn count(&mut self, what: &'static str, min_item: usize) -> Result<u32, ProtoError> {
        let count = self.u32(what)?;
        let fits = usize::try_from(count)
            .ok()
            .and_then(|c| c.checked_mul(min_item))
            .is_some_and(|need| need <= self.rest.len());
        if !fits {
            return Err(ProtoError::Count {
                what,
                count,
                have: self.rest.len(),
            });
        }
        Ok(count)
    }
    fn pci(&mut self) -> Result<PciAddress, ProtoError> {
        let b = self.take("PCI address", 4)?;
        let (bus, slot, function, zero) = match b {
            [a, b, c, d] => (*a, *b, *c, *d),
            _ => (0, 0, 0, 0),
        };
        if zero != 0 {
            return Err(ProtoError::BadValue {
                what: "PCI address padding",
                value: u64::from(zero),
            });
        }
        PciAddress::new(bus, slot, function).map_err(|_| ProtoError::BadValue {
            what: "PCI address",
            value: u64::from(u32::from_le_bytes([bus, slot, function, 0])),
        })
    }
    fn regs(&mut self) -> Result<Vec<(Reg, u64)>, ProtoError> {
        let n = self.count("register list", 10)?;
        let mut out = Vec::new();
        for _ in 0..n {
            let id = self.u16("register id")?;
            let reg = Reg::from_id(id).ok_or(ProtoError::BadValue {
                what: "register id",
                value: u64::from(id),
            })?;
            out.push((reg, self.u64("register value")?));
        }
        Ok(out)
    }
    fn end(self) -> Result<(), ProtoError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(ProtoError::Trailing {
                extra: self.rest.len(),
            })
        }
    }
}

fn write_regs(w: &mut Writer, regs: &[(Reg, u64)]) -> Result<(), ProtoError> {
    w.count("register list", regs.len())?;
    for (r, v) in regs {
        w.u16(r.id());
        w.u64(*v);
    }
    Ok(())
}

impl Request {
    /// Its command.
    pub fn command(&self) -> Command {
        match self {
            Request::Hello => Command::Hello,
            Request::GetRegs { .. } => Command::GetRegs,
            Request::SetRegs { .. } => Command::SetRegs,
            Request::MemorySegments => Command::MemorySegments,
            Request::IoapicPin { .. } => Command::IoapicPin,
            Request::InjectMsi { .. } => Command::InjectMsi,
            Request::GetStats { .. } => Command::GetStats,
            Request::Suspend { .. } => Command::Suspend,
            Request::Reset => Command::Reset,
            Request::Bind { .. } => Command::Bind,
            Request::Unbind { .. } => Command::Unbind,
            Request::Pause => Command::Pause,
            Request::Trace { .. } => Command::Trace,
            Request::Resume => Command::Resume,
            Request::Create { .. } => Command::Create,
            Request::Destroy { .. } => Command::Destroy,
            Request::List => Command::List,
            Request::Sysctl => Command::Sysctl,
        }
    }

    /// The payload bytes.
    pub fn encode(&self) -> Result<Vec<u8>, ProtoError> {
        let mut w = Writer::default();
        match self {
            Request::Hello
            | Request::MemorySegments
            | Request::Reset
            | Request::Pause
            | Request::Resume
            | Request::List
            | Request::Sysctl => {}
            Request::GetRegs { vcpu } => w.u32(*vcpu),
            Request::SetRegs { vcpu, regs } => {
                w.u32(*vcpu);
                write_regs(&mut w, regs)?;
            }
            Request::IoapicPin { pin, op } => {
                w.u32(*pin);
                w.u32(op.to_u32());
            }
            Request::InjectMsi { addr, data } => {
                w.u64(*addr);
                w.u32(*data);
            }
            Request::GetStats { vcpu } => w.u32(vcpu.unwrap_or(ALL_VCPUS)),
            Request::Trace { on } => w.u32(u32::from(*on)),
            Request::Suspend { how } => {
                let v = suspend_to_u32(*how).ok_or(ProtoError::BadValue {
                    what: "suspend reason",
                    value: 0,
                })?;
                w.u32(v);
            }
            Request::Bind { addr } | Request::Unbind { addr } => w.pci(*addr),
            Request::Create { name, ncpus } => {
                w.u32(*ncpus);
                w.str("VM name", name)?;
            }
            Request::Destroy { name } => w.str("VM name", name)?,
        }
        Ok(w.0)
    }

    /// Decodes the payload of command number `command`.
    pub fn decode(command: u16, payload: &[u8]) -> Result<Self, ProtoError> {
        let cmd = Command::from_u16(command).ok_or(ProtoError::UnknownCommand { command })?;
        let mut r = Reader::new(payload);
        let req = match cmd {
            Command::Hello => Request::Hello,
            Command::GetRegs => Request::GetRegs {
                vcpu: r.u32("vCPU")?,
            },
            Command::SetRegs => Request::SetRegs {
                vcpu: r.u32("vCPU")?,
                regs: r.regs()?,
            },
            Command::MemorySegments => Request::MemorySegments,
            Command::IoapicPin => {
                let pin = r.u32("pin")?;
                let op = r.u32("pin operation")?;
                Request::IoapicPin {
                    pin,
                    op: PinOp::from_u32(op).ok_or(ProtoError::BadValue {
                        what: "pin operation",
                        value: u64::from(op),
                    })?,
                }
            }
            Command::InjectMsi => Request::InjectMsi {
                addr: r.u64("MSI address")?,
                data: r.u32("MSI data")?,
            },
            Command::GetStats => {
                let v = r.u32("vCPU")?;
                Request::GetStats {
                    vcpu: (v != ALL_VCPUS).then_some(v),
                }
            }
            Command::Suspend => {
                let v = r.u32("suspend reason")?;
                Request::Suspend {
                    how: suspend_from_u32(v).ok_or(ProtoError::BadValue {
                        what: "suspend reason",
                        value: u64::from(v),
                    })?,
                }
            }
            Command::Reset => Request::Reset,
            Command::Bind => Request::Bind { addr: r.pci()? },
            Command::Unbind => Request::Unbind { addr: r.pci()? },
            Command::Pause => Request::Pause,
            Command::Trace => {
                let v = r.u32("trace switch")?;
                if v > 1 {
                    return Err(ProtoError::BadValue {
                        what: "trace switch",
                        value: u64::from(v),
                    });
                }
                Request::Trace { on: v == 1 }
            }
            Command::Resume => Request::Resume,
            Command::Create => {
                let ncpus = r.u32("vCPU count")?;
                Request::Create {
                    name: r.str("VM name")?,
                    ncpus,
                }
            }
            Command::Destroy => Request::Destroy {
                name: r.str("VM name")?,
            },
            Command::List => Request::List,
            Command::Sysctl => Request::Sysctl,
        };
        r.end()?;
        Ok(req)
    }
}

impl Reply {
    /// The payload bytes.
    pub fn encode(&self) -> Result<Vec<u8>, ProtoError> {
        let mut w = Writer::default();
        match self {
            Reply::Hello(h) => {
                w.u16(h.version);
                w.u8(match h.endpoint {
                    Endpoint::Module => 0,
                    Endpoint::Vm => 1,
                });
                w.u8(u8::from(h.running));
                w.u32(h.ncpus);
                w.u32(h.maxcpu);
                w.str("name", &h.name)?;
            }
            Reply::Regs(regs) => write_regs(&mut w, regs)?,
            Reply::MemorySegments(segs) => {
                w.count("segment list", segs.len())?;
                for (gpa, len) in segs {
                    w.u64(*gpa);
                    w.u64(*len);
                }
            }
            Reply::Stats(scopes) => {
                w.count("scope list", scopes.len())?;
                for s in scopes {
                    w.str("scope", &s.scope)?;
                    w.count("counter list", s.counters.len())?;
                    for (desc, v) in &s.counters {
                        w.str("description", desc)?;
                        w.u64(*v);
                    }
                }
            }
            Reply::List(vms) => {
                w.count("VM list", vms.len())?;
                for vm in vms {
                    w.str("VM name", &vm.name)?;
                    w.u32(vm.ncpus);
                    w.u8(u8::from(vm.running));
                }
            }
            Reply::Sysctl(entries) => {
                w.count("sysctl list", entries.len())?;
                for (k, v) in entries {
                    w.str("sysctl name", k)?;
                    w.str("sysctl value", v)?;
                }
            }
            Reply::Done => {}
        }
        Ok(w.0)
    }

    /// Decodes the successful reply payload of command number `command`.
    pub fn decode(command: u16, payload: &[u8]) -> Result<Self, ProtoError> {
        let cmd = Command::from_u16(command).ok_or(ProtoError::UnknownCommand { command })?;
        let mut r = Reader::new(payload);
        let reply = match cmd {
            Command::Hello => {
                let version = r.u16("version")?;
                let endpoint = match r.u8("endpoint")? {
                    0 => Endpoint::Module,
                    1 => Endpoint::Vm,
                    v => {
                        return Err(ProtoError::BadValue {
                            what: "endpoint",
                            value: u64::from(v),
                        })
                    }
                };
                let running = r.bool("running flag")?;
                let ncpus = r.u32("vCPU count")?;
                let maxcpu = r.u32("maxcpu")?;
                Reply::Hello(Hello {
                    version,
                    endpoint,
                    name: r.str("name")?,
                    ncpus,
                    running,
                    maxcpu,
                })
            }
            Command::GetRegs => Reply::Regs(r.regs()?),
            Command::MemorySegments => {
                let n = r.count("segment list", 16)?;
                let mut segs = Vec::new();
                for _ in 0..n {
                    segs.push((r.u64("segment address")?, r.u64("segment length")?));
                }
                Reply::MemorySegments(segs)
            }
            Command::GetStats => {
                let n = r.count("scope list", 6)?;
                let mut scopes = Vec::new();
                for _ in 0..n {
                    let scope = r.str("scope")?;
                    let m = r.count("counter list", 10)?;
                    let mut counters = Vec::new();
                    for _ in 0..m {
                        counters.push((r.str("description")?, r.u64("counter value")?));
                    }
                    scopes.push(StatScope { scope, counters });
                }
                Reply::Stats(scopes)
            }
            Command::List => {
                let n = r.count("VM list", 7)?;
                let mut vms = Vec::new();
                for _ in 0..n {
                    vms.push(VmListing {
                        name: r.str("VM name")?,
                        ncpus: r.u32("vCPU count")?,
                        running: r.bool("running flag")?,
                    });
                }
                Reply::List(vms)
            }
            Command::Sysctl => {
                let n = r.count("sysctl list", 4)?;
                let mut entries = Vec::new();
                for _ in 0..n {
                    entries.push((r.str("sysctl name")?, r.str("sysctl value")?));
                }
                Reply::Sysctl(entries)
            }
            _ => Reply::Done,
        };
        r.end()?;
        Ok(reply)
    }
}

/// A whole request message: header and payload.
pub fn encode_request(id: u64, request: &Request) -> Result<Vec<u8>, ProtoError> {
    let payload = request.encode()?;
    let length = u32::try_from(payload.len()).map_err(|_| ProtoError::Unencodable {
        what: "request payload",
        len: payload.len(),
    })?;
    let mut out = Header::request(request.command() as u16, length, id)
        .encode()
        .to_vec();
    out.extend_from_slice(&payload);
    Ok(out)
}

/// A whole reply message: header and payload.
pub fn encode_reply(command: u16, id: u64, status: u32, payload: &[u8]) -> Vec<u8> {
    // Payloads are bounded by MAX_REPLY_PAYLOAD before they get here; saturate regardless.
    let length = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    let mut out = Header::reply(command, status, length, id).encode().to_vec();
    out.extend_from_slice(payload);
    out
}

/// A whole error reply: `message` cut to [`MAX_MESSAGE_LEN`] bytes at a character boundary.
pub fn encode_error(command: u16, id: u64, status: u32, message: &str) -> Vec<u8> {
    encode_reply(command, id, status, truncate_message(message).as_bytes())
}

/// `message` cut to at most [`MAX_MESSAGE_LEN`] bytes at a character boundary.
pub fn truncate_message(message: &str) -> &str {
    if message.len() <= MAX_MESSAGE_LEN {
        return message;
    }
    let mut end = MAX_MESSAGE_LEN;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    message.get(..end).unwrap_or("")
}

/// Splits one complete message into its header and payload (for tests and fuzzing: the server
/// reads a socket incrementally). The header's length must match the bytes that follow.
pub fn parse_frame(bytes: &[u8]) -> Result<(Header, &[u8]), ProtoError> {
    let (head, payload) = match bytes.split_first_chunk::<HEADER_LEN>() {
        Some(split) => split,
        None => {
            return Err(ProtoError::Short {
                what: "header",
                need: HEADER_LEN,
                have: bytes.len(),
            })
        }
    };
    let header = Header::decode(head)?;
    if usize::try_from(header.length).ok() != Some(payload.len()) {
        return Err(ProtoError::LengthMismatch {
            length: header.length,
            have: payload.len(),
        });
    }
    Ok((header, payload))
}
