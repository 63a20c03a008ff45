//! bhyvectl(8) for the bhyve-style monitor: control of VMs through the module's control sockets.
//!
//! The FreeBSD tool opens `/dev/vmm/NAME` and issues ioctls; this one connects to
//! `<socket dir>/NAME` (default `/run/bhyve-rs`, `--socket-dir=DIR` to change) and speaks the
//! module's control protocol (`kmod::proto`). Creating and destroying go to the module's socket,
//! `<socket dir>/vmmctl`, as FreeBSD's go to `hw.vmm.create`/`/dev/vmmctl`.
//!
//! Options bhyvectl(8) has, with its names and output formats: `--vm`, `--cpu`, `--create`,
//! `--destroy`, `--get-all`, `--get-stats`, `--get-memseg`, `--get-memmap`, `--get-REG` for
//! `efer cr0 cr2 cr3 cr4 rsp rip rax rbx rcx rdx rsi rdi rbp r8`-`r15 rflags`, `--get-desc-SEG`
//! and `--get-SEG` for `cs ds es fs gs ss tr ldtr` (and `--get-desc-gdtr`/`idtr`),
//! `--set-rip`/`rsp`/`rax`/`rflags`, `--force-reset`, `--force-poweroff`,
//! `--unassign-pptdev=B/S/F`.
//!
//! Our own names, for what bhyvectl does not have or does differently: `--ncpus=N` (vCPUs for
//! `--create`, default 1), `--json` (`--get-stats` as JSON), `--suspend=reset|poweroff|halt|
//! triplefault` (vm_suspend; FreeBSD's `--suspend=FILE` snapshots, which we do not),
//! `--reinit` (vm_reinit), `--pause`, `--resume`, `--ioapic-assert=PIN`,
//! `--ioapic-deassert=PIN`, `--ioapic-pulse=PIN` (vm_ioapic_*_irq), `--inject-msi=ADDR:DATA`
//! (vm_lapic_msi), `--assign-pptdev=B/S/F` (vm_assign_pptdev), `--list` and `--sysctl` (the
//! module's VMs and its `hw.vmm` tree; no `--vm` needed).
//!
//! Exit status: 0 when everything asked for was done, 1 otherwise (with a message on stderr
//! naming what failed).
#![warn(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap,
    clippy::cast_lossless
)]

pub mod opts;
pub mod output;

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use kmod::proto::{status, Endpoint, Reply, Request, VERSION};
use kmod::{Client, ClientError, MODULE_SOCKET};
use stages::VmRequest;

use crate::opts::Options;

/// How long one control round trip may take.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// A failure to report: the message (without the program name).
#[derive(Debug)]
struct Failure(String);

fn fail(what: &str, e: &ClientError) -> Failure {
    Failure(format!("{what}: {e}"))
}

/// Connects to the module socket for `what`.
fn module(o: &Options, what: &str) -> Result<Client, Failure> {
    let path = o.socket_dir.join(MODULE_SOCKET);
    match Client::connect(&path, TIMEOUT) {
        Ok(c) if c.hello().endpoint == Endpoint::Module => Ok(c),
        Ok(_) => Err(Failure(format!(
            "{what}: {} is not a module control socket",
            path.display()
        ))),
        Err(ClientError::NoSocket { path } | ClientError::Stale { path }) => Err(Failure(format!(
            "{what}: no module control socket at {} (is the vmm module loaded?)",
            path.display()
        ))),
        Err(e) => Err(connect_failure(what, &e)),
    }
}

fn connect_failure(what: &str, e: &ClientError) -> Failure {
    match e {
        ClientError::VersionMismatch { path, ours, theirs } => Failure(format!(
            "{what}: protocol version mismatch: bhyvectl speaks version {ours}, the socket at {} speaks version {theirs}",
            path.display()
        )),
        _ => fail(what, e),
    }
}

/// Connects to VM `name`'s socket.
fn vm(o: &Options, name: &str) -> Result<Client, Failure> {
    let path = o.socket_dir.join(name);
    match Client::connect(&path, TIMEOUT) {
        Ok(c) if c.hello().endpoint == Endpoint::Vm => Ok(c),
        Ok(_) => Err(Failure(format!(
            "{} is not a VM control socket",
            path.display()
        ))),
        Err(ClientError::NoSocket { path }) => Err(Failure(format!(
            "VM:{name} is not created (no control socket at {})",
            path.display()
        ))),
        Err(ClientError::Stale { path }) => Err(Failure(format!(
            "VM:{name} is not served: nobody answers on {} (stale socket)",
            path.display()
        ))),
        Err(e) => Err(connect_failure(&format!("VM:{name}"), &e)),
    }
}

fn call(c: &mut Client, request: &Request) -> Result<Reply, Failure> {
    c.call(request)
        .map_err(|e| fail(&format!("{} failed", request.command()), &e))
}

fn print(out: &mut dyn Write, s: &str) -> Result<(), Failure> {
    out.write_all(s.as_bytes())
        .map_err(|e| Failure(format!("cannot write the output: {e}")))
}

fn unexpected(request: &Request) -> Failure {
    Failure(format!("{} failed: unexpected reply", request.command()))
}

/// Runs bhyvectl with `args` (without the program name); returns the exit status.
pub fn run(args: &[String], out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    let o = match opts::parse(args) {
        Ok(o) => o,
        Err(e) => {
            let _ = writeln!(err, "bhyvectl: {e}");
            let _ = err.write_all(opts::usage().as_bytes());
            return 1;
        }
    };
    if o.help {
        let _ = out.write_all(opts::usage().as_bytes());
        return 0;
    }
    match execute(&o, out) {
        Ok(()) => 0,
        Err(Failure(m)) => {
            let _ = out.flush();
            let _ = writeln!(err, "bhyvectl: {m}");
            1
        }
    }
}

/// Does what the options ask, in bhyvectl's order.
fn execute(o: &Options, out: &mut dyn Write) -> Result<(), Failure> {
    if o.list || o.sysctl {
        let mut m = module(o, if o.list { "--list" } else { "--sysctl" })?;
        if o.list {
            let Reply::List(vms) = call(&mut m, &Request::List)? else {
                return Err(unexpected(&Request::List));
            };
            print(out, &output::list(&vms))?;
        }
        if o.sysctl {
            let Reply::Sysctl(t) = call(&mut m, &Request::Sysctl)? else {
                return Err(unexpected(&Request::Sysctl));
            };
            print(out, &output::sysctl(&t))?;
        }
        if o.vm.is_none() {
            return Ok(());
        }
    }
    let Some(name) = o.vm.as_deref() else {
        return Err(Failure(format!(
            "--vm=NAME is required\n{}",
            opts::usage().trim_end()
        )));
    };
    if o.create {
        let mut m = module(o, &format!("cannot create VM {name}"))?;
        call(
            &mut m,
            &Request::Create {
                name: name.to_owned(),
                ncpus: o.ncpus,
            },
        )?;
    }
    if o.needs_vm_socket() {
        let mut c = vm(o, name)?;
        vm_operations(o, &mut c, name, out)?;
    } else if !o.create && !o.destroy && !o.list && !o.sysctl {
        // Like bhyvectl, opening the VM is the check that it exists.
        vm(o, name)?;
    }
    if o.destroy {
        let mut m = module(o, &format!("cannot destroy VM {name}"))?;
        call(
            &mut m,
            &Request::Destroy {
                name: name.to_owned(),
            },
        )
        .map_err(|Failure(msg)| {
            if msg.contains(status::name(status::ENOENT)) {
                Failure(format!("VM:{name} is not created ({msg})"))
            } else {
                Failure(msg)
            }
        })?;
    }
    Ok(())
}

fn vm_operations(
    o: &Options,
    c: &mut Client,
    name: &str,
    out: &mut dyn Write,
) -> Result<(), Failure> {
    let vcpu = o.cpu;
    if !o.set.is_empty() {
        call(
            c,
            &Request::SetRegs {
                vcpu,
                regs: o.set.clone(),
            },
        )?;
    }
    for addr in &o.unassign {
        call(c, &Request::Unbind { addr: *addr })?;
    }
    for addr in &o.assign {
        call(c, &Request::Bind { addr: *addr })?;
    }
    for (pin, op) in &o.ioapic {
        call(c, &Request::IoapicPin { pin: *pin, op: *op })?;
    }
    for (addr, data) in &o.msi {
        call(
            c,
            &Request::InjectMsi {
                addr: *addr,
                data: *data,
            },
        )?;
    }
    if o.get_memseg || o.get_memmap || o.get_all {
        let Reply::MemorySegments(segs) = call(c, &Request::MemorySegments)? else {
            return Err(unexpected(&Request::MemorySegments));
        };
        if o.get_memseg || o.get_all {
            print(out, &output::memseg(&segs))?;
        }
        if o.get_memmap || o.get_all {
            print(out, &output::memmap(&segs))?;
        }
    }
    let items = o.items();
    if !items.is_empty() {
        let request = Request::GetRegs { vcpu };
        let Reply::Regs(regs) = call(c, &request)? else {
            return Err(unexpected(&request));
        };
        let mut text = String::new();
        for item in items {
            if let Some(line) = output::item_line(item, vcpu, &regs) {
                text.push_str(&line);
                text.push('\n');
            }
        }
        print(out, &text)?;
    }
    if let Some(on) = o.trace {
        call(c, &Request::Trace { on })?;
    }
    if let Some(ms) = o.top {
        top(
            c,
            name,
            Duration::from_millis(u64::from(ms)),
            o.iterations,
            out,
        )?;
    }
    if o.get_stats || o.get_all {
        let request = Request::GetStats { vcpu: Some(vcpu) };
        let Reply::Stats(scopes) = call(c, &request)? else {
            return Err(unexpected(&request));
        };
        if o.json {
            print(out, &output::stats_json(name, vcpu, &scopes))?;
        } else {
            print(out, &output::stats_text(&scopes))?;
        }
    }
    if o.pause {
        call(c, &Request::Pause)?;
    }
    if o.resume {
        call(c, &Request::Resume)?;
    }
    if o.reinit {
        call(c, &Request::Reset)?;
    }
    if o.force_reset {
        call(
            c,
            &Request::Suspend {
                how: VmRequest::Reset,
            },
        )?;
    }
    if o.force_poweroff {
        call(
            c,
            &Request::Suspend {
                how: VmRequest::PowerOff,
            },
        )?;
    }
    if let Some(how) = o.suspend {
        call(c, &Request::Suspend { how })?;
    }
    Ok(())
}

/// The counters `--top` shows a rate for, by the description bhyvectl prints.
const TOP_COLUMNS: &[(&str, &str)] = &[
    ("exits/s", "total number of vm exits"),
    ("in/out", "number of times in/out was intercepted"),
    ("mmio", "number of mmio exits"),
    ("fast", "exits handled inline by an in-module device"),
    (
        "posted",
        "exits posted to the device-model side without waiting",
    ),
    ("waited", "exits that waited for a device-model completion"),
    ("unclaimed", "reads nobody claimed (all-ones returned)"),
    ("records", "records processed"),
];

/// `--top`: a live view of per-second rates per vCPU and device-model thread, refreshed every
/// `interval` (`iterations` refreshes, or until interrupted).
fn top(
    c: &mut Client,
    name: &str,
    interval: Duration,
    iterations: Option<u32>,
    out: &mut dyn Write,
) -> Result<(), Failure> {
    let mut prev: Option<(std::time::Instant, Vec<kmod::StatScope>)> = None;
    let mut shown = 0u32;
    loop {
        let request = Request::GetStats { vcpu: None };
        let Reply::Stats(scopes) = call(c, &request)? else {
            return Err(unexpected(&request));
        };
        let now = std::time::Instant::now();
        if let Some((then, before)) = &prev {
            let dt = now.duration_since(*then).as_secs_f64().max(1e-6);
            let mut text = format!(
                "VM {name}: rates per second over {dt:.2} s\n{:<12}",
                "scope"
            );
            for (h, _) in TOP_COLUMNS {
                text.push_str(&format!("{h:>12}"));
            }
            text.push('\n');
            for s in &scopes {
                let old = before.iter().find(|b| b.scope == s.scope);
                let value = |desc: &str| -> Option<f64> {
                    let v = s.counters.iter().find(|(d, _)| d == desc)?.1;
                    let o = old?.counters.iter().find(|(d, _)| d == desc)?.1;
                    Some(v.saturating_sub(o) as f64 / dt)
                };
                if TOP_COLUMNS.iter().all(|(_, d)| value(d).is_none()) {
                    continue;
                }
                text.push_str(&format!("{:<12}", s.scope));
                for (_, d) in TOP_COLUMNS {
                    match value(d) {
                        Some(r) => text.push_str(&format!("{r:>12.0}")),
                        None => text.push_str(&format!("{:>12}", "-")),
                    }
                }
                text.push('\n');
            }
            print(out, &text)?;
            shown += 1;
            if iterations.is_some_and(|n| shown >= n) {
                return Ok(());
            }
        }
        prev = Some((now, scopes));
        std::thread::sleep(interval);
    }
}

/// The protocol version this bhyvectl speaks.
pub fn protocol_version() -> u16 {
    VERSION
}

/// The socket bhyvectl would use for VM `name` under `socket_dir`.
pub fn socket_path(socket_dir: &Path, name: &str) -> std::path::PathBuf {
    socket_dir.join(name)
}
