//! The control sockets against a fake running VM: every command, module versus VM endpoints,
//! and hostile clients (truncated, wrong magic or version, huge lengths, slowloris, too many
//! connections, random bytes). The VM keeps running through all of it.

mod common;

use std::io::Write;
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{closed, opts, raw, read_frame, send, XorShift};
use kmod::fake::{FakeCall, FakeTarget};
use kmod::proto::{
    self, encode_request, status, Command, Endpoint, Header, PinOp, Reg, Reply, Request,
    HEADER_LEN, VERSION,
};
use kmod::{Client, ClientError, SysfsSource, Vmm};
use passthrough::fake::{FakeDevice, FakeSysfs};
use passthrough::{PciAddress, VFIO_PCI};
use stages::VmRequest;

const T: Duration = Duration::from_secs(5);

struct Setup {
    _dir: tempfile::TempDir,
    vmm: Vmm,
    target: Arc<FakeTarget>,
    vm_sock: PathBuf,
    ctl_sock: PathBuf,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let (vmm, _) = Vmm::load(opts(dir.path())).unwrap();
    vmm.create_vm("vm", 2).unwrap();
    let target = Arc::new(FakeTarget::new(2));
    vmm.attach("vm", target.clone()).unwrap();
    let vm_sock = vmm.socket_path("vm");
    let ctl_sock = vmm.module_socket_path();
    Setup {
        _dir: dir,
        vmm,
        target,
        vm_sock,
        ctl_sock,
    }
}

fn remote(e: ClientError) -> (u32, String) {
    match e {
        ClientError::Remote { status, message } => (status, message),
        other => panic!("expected a refusal, got {other}"),
    }
}

fn counter(vmm: &Vmm, name: &str) -> u64 {
    vmm.sysctl()[&format!("hw.vmm.control.{name}")]
        .parse()
        .unwrap()
}

/// The VM is still served and was never stopped, paused or reset.
fn vm_unharmed(s: &Setup) {
    let mut c = Client::connect(&s.vm_sock, T).expect("a good client is still served");
    assert!(matches!(
        c.call(&Request::GetRegs { vcpu: 1 }).unwrap(),
        Reply::Regs(_)
    ));
    let st = s.target.state();
    assert_eq!(st.suspended, None);
    assert!(!st.paused);
    assert_eq!(st.resets, 0);
}

#[test]
fn hello_names_the_endpoint() {
    let s = setup();
    let c = Client::connect(&s.vm_sock, T).unwrap();
    let h = c.hello();
    assert_eq!(h.version, VERSION);
    assert_eq!(h.endpoint, Endpoint::Vm);
    assert_eq!(h.name, "vm");
    assert_eq!((h.ncpus, h.running, h.maxcpu), (2, true, 4));
    let m = Client::connect(&s.ctl_sock, T).unwrap();
    assert_eq!(m.hello().endpoint, Endpoint::Module);
    assert_eq!(m.hello().name, "vmmctl");

    // A created VM nobody runs yet answers HELLO but not register reads.
    s.vmm.create_vm("idle", 3).unwrap();
    let mut c = Client::connect(&s.vmm.socket_path("idle"), T).unwrap();
    assert_eq!((c.hello().ncpus, c.hello().running), (3, false));
    let (st, msg) = remote(c.call(&Request::GetRegs { vcpu: 0 }).unwrap_err());
    assert_eq!(st, status::ENXIO);
    assert_eq!(msg, "VM idle is not running (created, no bhyve attached)");
}

#[test]
fn registers_are_read_and_set() {
    let s = setup();
    let mut c = Client::connect(&s.vm_sock, T).unwrap();
    let Reply::Regs(regs) = c.call(&Request::GetRegs { vcpu: 1 }).unwrap() else {
        panic!("not registers");
    };
    let get = |r: Reg| regs.iter().find(|(x, _)| *x == r).unwrap().1;
    assert_eq!(get(Reg::Rax), 0xa001);
    assert_eq!(get(Reg::Rip), 0x10_1000);
    assert_eq!(get(Reg::Cr0), 0x8000_0011);
    assert_eq!(get(Reg::Cs), 0x08);
    assert_eq!(get(Reg::FsBase), 0x1000);
    assert_eq!(get(Reg::TrLimit), 0x67);
    assert_eq!(get(Reg::GdtrBase), 0x6000);
    assert_eq!(get(Reg::IdtrLimit), 0xfff);

    c.call(&Request::SetRegs {
        vcpu: 1,
        regs: vec![(Reg::Rip, 0xdead_beef), (Reg::Rax, 1)],
    })
    .unwrap();
    let after = s.target.state().regs[1];
    assert_eq!((after.rip, after.rax, after.rbx), (0xdead_beef, 1, 0xb001));
    assert_eq!(s.target.state().regs[0].rip, 0x10_0000, "vCPU 0 untouched");

    let (st, msg) = remote(
        c.call(&Request::SetRegs {
            vcpu: 0,
            regs: vec![(Reg::Cr0, 0)],
        })
        .unwrap_err(),
    );
    assert_eq!(
        (st, msg.as_str()),
        (status::EINVAL, "Register cr0 cannot be set")
    );
    let (st, msg) = remote(c.call(&Request::GetRegs { vcpu: 2 }).unwrap_err());
    assert_eq!(
        (st, msg.as_str()),
        (status::EINVAL, "vCPU 2 out of range (the VM has 2)")
    );
    // The connection survives refusals.
    assert!(c.call(&Request::GetRegs { vcpu: 0 }).is_ok());
}

#[test]
fn interrupts_memory_and_stats_reach_the_vm() {
    let s = setup();
    let mut c = Client::connect(&s.vm_sock, T).unwrap();
    assert_eq!(
        c.call(&Request::MemorySegments).unwrap(),
        Reply::MemorySegments(vec![(0, 512 << 20), (1 << 32, 512 << 20)])
    );
    c.call(&Request::IoapicPin {
        pin: 5,
        op: PinOp::Assert,
    })
    .unwrap();
    assert!(s.target.state().pins[5]);
    c.call(&Request::IoapicPin {
        pin: 5,
        op: PinOp::Deassert,
    })
    .unwrap();
    c.call(&Request::IoapicPin {
        pin: 9,
        op: PinOp::Pulse,
    })
    .unwrap();
    assert!(!s.target.state().pins[5]);
    assert_eq!(s.target.state().pulses[9], 1);
    let (st, msg) = remote(
        c.call(&Request::IoapicPin {
            pin: 24,
            op: PinOp::Assert,
        })
        .unwrap_err(),
    );
    assert_eq!(
        (st, msg.as_str()),
        (status::EINVAL, "I/O APIC pin 24 out of range (0..=23)")
    );
    c.call(&Request::InjectMsi {
        addr: 0xfee0_0000,
        data: 0x41,
    })
    .unwrap();
    assert_eq!(s.target.state().msis, vec![(0xfee0_0000, 0x41)]);
    assert_eq!(
        remote(
            c.call(&Request::InjectMsi { addr: 0, data: 0 })
                .unwrap_err()
        )
        .0,
        status::EINVAL
    );

    let Reply::Stats(one) = c.call(&Request::GetStats { vcpu: Some(1) }).unwrap() else {
        panic!()
    };
    let names: Vec<&str> = one.iter().map(|s| s.scope.as_str()).collect();
    assert_eq!(names, ["vcpu1", "devmodel0"]);
    assert_eq!(one[0].counters[0], ("total number of vm exits".into(), 200));
    let Reply::Stats(all) = c.call(&Request::GetStats { vcpu: None }).unwrap() else {
        panic!()
    };
    assert_eq!(all.len(), 3);
    assert_eq!(
        remote(c.call(&Request::GetStats { vcpu: Some(9) }).unwrap_err()).0,
        status::EINVAL
    );
}

#[test]
fn suspend_reset_pause_and_resume() {
    let s = setup();
    let mut c = Client::connect(&s.vm_sock, T).unwrap();
    c.call(&Request::Pause).unwrap();
    assert!(s.target.state().paused);
    assert_eq!(
        remote(c.call(&Request::Pause).unwrap_err()).0,
        status::EBUSY
    );
    c.call(&Request::Resume).unwrap();
    c.call(&Request::Reset).unwrap();
    assert_eq!(s.target.state().resets, 1);
    c.call(&Request::Suspend {
        how: VmRequest::PowerOff,
    })
    .unwrap();
    assert_eq!(s.target.state().suspended, Some(VmRequest::PowerOff));
    let (st, msg) = remote(
        c.call(&Request::Suspend {
            how: VmRequest::Reset,
        })
        .unwrap_err(),
    );
    assert_eq!(
        (st, msg.as_str()),
        (status::EALREADY, "The VM is already suspended")
    );
}

#[test]
fn commands_sent_to_the_wrong_endpoint_are_refused_as_ioctls_would_be() {
    let s = setup();
    let mut vm = Client::connect(&s.vm_sock, T).unwrap();
    let (st, msg) = remote(vm.call(&Request::List).unwrap_err());
    assert_eq!(st, status::ENOTTY);
    assert_eq!(
        msg,
        "LIST is a module command: send it to vmmctl, not VM vm's socket"
    );
    let mut ctl = Client::connect(&s.ctl_sock, T).unwrap();
    let (st, msg) = remote(ctl.call(&Request::Pause).unwrap_err());
    assert_eq!(st, status::ENOTTY);
    assert!(msg.starts_with("PAUSE is a VM command"), "{msg}");
    assert!(s.target.calls().is_empty(), "nothing reached the VM");
}

#[test]
fn vmmctl_creates_lists_and_destroys_vms_by_name() {
    let s = setup();
    let mut ctl = Client::connect(&s.ctl_sock, T).unwrap();
    ctl.call(&Request::Create {
        name: "web".into(),
        ncpus: 1,
    })
    .unwrap();
    assert!(s.vmm.vm("web").is_some());
    let (st, msg) = remote(
        ctl.call(&Request::Create {
            name: "web".into(),
            ncpus: 1,
        })
        .unwrap_err(),
    );
    assert_eq!(
        (st, msg.as_str()),
        (status::EEXIST, "VM web already exists")
    );
    let (st, msg) = remote(
        ctl.call(&Request::Create {
            name: "huge".into(),
            ncpus: 64,
        })
        .unwrap_err(),
    );
    assert_eq!(
        (st, msg.as_str()),
        (status::EINVAL, "64 vCPUs requested but only 4 available")
    );
    let (st, _) = remote(
        ctl.call(&Request::Create {
            name: "a/b".into(),
            ncpus: 1,
        })
        .unwrap_err(),
    );
    assert_eq!(st, status::EINVAL);
    let Reply::List(vms) = ctl.call(&Request::List).unwrap() else {
        panic!()
    };
    let listed: Vec<(&str, u32, bool)> = vms
        .iter()
        .map(|v| (v.name.as_str(), v.ncpus, v.running))
        .collect();
    assert_eq!(listed, [("vm", 2, true), ("web", 1, false)]);
    let (st, _) = remote(
        ctl.call(&Request::Destroy { name: "vm".into() })
            .unwrap_err(),
    );
    assert_eq!(st, status::EBUSY, "a running VM is not destroyed");
    ctl.call(&Request::Destroy { name: "web".into() }).unwrap();
    let (st, msg) = remote(
        ctl.call(&Request::Destroy { name: "web".into() })
            .unwrap_err(),
    );
    assert_eq!((st, msg.as_str()), (status::ENOENT, "No VM named web"));
    let Reply::Sysctl(tree) = ctl.call(&Request::Sysctl).unwrap() else {
        panic!()
    };
    let get = |k: &str| tree.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    assert_eq!(get("hw.vmm.vms_created").as_deref(), Some("2"));
    assert_eq!(get("hw.vmm.vms_destroyed").as_deref(), Some("1"));
    assert_eq!(get("hw.vmm.vm_count").as_deref(), Some("1"));
}

#[test]
fn passthrough_devices_are_bound_through_the_vm_socket() {
    let dir = tempfile::tempdir().unwrap();
    let a = PciAddress::new(10, 0, 0).unwrap();
    let fake = Arc::new(
        FakeSysfs::new()
            .with_driver(VFIO_PCI)
            .with_device(a, FakeDevice::endpoint(Some("e1000e"))),
    );
    let conf = dir.path().join("loader.conf");
    std::fs::write(&conf, "pptdevs=\"10/0/0\"\n").unwrap();
    let mut o = opts(dir.path());
    o.tunables = Some(conf);
    o.sysfs = SysfsSource::Shared(fake);
    let (vmm, _) = Vmm::load(o).unwrap();
    vmm.create_vm("vm", 1).unwrap();
    let mut c = Client::connect(&vmm.socket_path("vm"), T).unwrap();

    let other = PciAddress::new(3, 0, 0).unwrap();
    let (st, msg) = remote(c.call(&Request::Bind { addr: other }).unwrap_err());
    assert_eq!(st, status::ENOENT);
    assert_eq!(
        msg,
        "PCI device 0000:03:00.0 is not reserved for passthrough"
    );

    // Not running yet: the assignment is recorded for bhyve to pick up.
    c.call(&Request::Bind { addr: a }).unwrap();
    assert_eq!(vmm.vm("vm").unwrap().devices, vec![a]);
    c.call(&Request::Unbind { addr: a }).unwrap();
    assert!(vmm.vm("vm").unwrap().devices.is_empty());

    // Running, and the VM cannot take a device while running: taken back.
    let target = Arc::new(FakeTarget::new(1));
    vmm.attach("vm", target.clone()).unwrap();
    let (st, msg) = remote(c.call(&Request::Bind { addr: a }).unwrap_err());
    assert_eq!(st, status::ENOSYS);
    assert!(
        msg.contains("cannot attach PCI device 0000:0a:00.0"),
        "{msg}"
    );
    assert!(vmm.vm("vm").unwrap().devices.is_empty());
    // A VM that can hot-plug takes it.
    target.state().hotplug = true;
    c.call(&Request::Bind { addr: a }).unwrap();
    assert_eq!(target.state().devices, vec![a]);
    assert_eq!(vmm.sysctl()["hw.vmm.ppt.devices"], "10/0/0=assigned:vm");
    c.call(&Request::Unbind { addr: a }).unwrap();
    assert!(target.state().devices.is_empty());
    assert_eq!(
        remote(c.call(&Request::Unbind { addr: a }).unwrap_err()).0,
        status::ENOENT
    );
}

fn header_bytes(version: u16, command: u16, length: u32, id: u64) -> Vec<u8> {
    Header {
        version,
        command,
        flags: 0,
        status: 0,
        length,
        id,
    }
    .encode()
    .to_vec()
}

#[test]
fn a_version_mismatch_is_answered_with_both_versions_then_closed() {
    let s = setup();
    let mut r = raw(&s.vm_sock);
    send(&mut r, &header_bytes(2, Command::Hello as u16, 0, 77));
    let (h, p) = read_frame(&mut r).unwrap();
    assert_eq!(h.version, VERSION, "answered in the server's version");
    assert_eq!(h.status, status::EPROTONOSUPPORT);
    assert_eq!(h.id, 77);
    assert_eq!(
        String::from_utf8(p).unwrap(),
        "Protocol version 2 not supported (this end speaks 1)"
    );
    assert!(closed(&mut r));
    assert_eq!(counter(&s.vmm, "bad_messages"), 1);
    vm_unharmed(&s);
}

#[test]
fn wrong_magic_and_truncated_messages_get_an_error_then_a_closed_connection() {
    let s = setup();
    // Wrong magic.
    let mut r = raw(&s.vm_sock);
    let mut b = header_bytes(1, 1, 0, 5);
    b[..4].copy_from_slice(b"HTTP");
    send(&mut r, &b);
    let (h, p) = read_frame(&mut r).unwrap();
    assert_eq!((h.status, h.id, h.command), (status::EBADMSG, 0, 0));
    assert!(String::from_utf8(p)
        .unwrap()
        .starts_with("Bad magic 0x50545448"));
    assert!(closed(&mut r));

    // A header cut short.
    let mut r = raw(&s.vm_sock);
    send(&mut r, &header_bytes(1, 1, 0, 5)[..10]);
    r.shutdown(Shutdown::Write).unwrap();
    let (h, p) = read_frame(&mut r).unwrap();
    assert_eq!(h.status, status::EBADMSG);
    assert_eq!(
        String::from_utf8(p).unwrap(),
        "Truncated header: 10 of 32 bytes before the end of the stream"
    );
    assert!(closed(&mut r));

    // A payload cut short.
    let mut r = raw(&s.vm_sock);
    send(&mut r, &header_bytes(1, Command::GetRegs as u16, 8, 6));
    send(&mut r, &[0, 0, 0, 0]);
    r.shutdown(Shutdown::Write).unwrap();
    let (h, p) = read_frame(&mut r).unwrap();
    assert_eq!((h.status, h.id), (status::EBADMSG, 6));
    assert_eq!(
        String::from_utf8(p).unwrap(),
        "Truncated payload: 4 of 8 bytes"
    );
    assert!(closed(&mut r));
    assert_eq!(counter(&s.vmm, "bad_messages"), 3);

    // A well-framed request with a bad payload keeps the connection.
    let mut r = raw(&s.vm_sock);
    send(&mut r, &header_bytes(1, Command::GetRegs as u16, 2, 7));
    send(&mut r, &[0, 0]);
    let (h, p) = read_frame(&mut r).unwrap();
    assert_eq!((h.status, h.id), (status::EINVAL, 7));
    assert!(String::from_utf8(p)
        .unwrap()
        .starts_with("GET_REGS: Payload too short"));
    send(&mut r, &header_bytes(1, 4242, 0, 8));
    let (h, p) = read_frame(&mut r).unwrap();
    assert_eq!((h.status, h.id), (status::ENOTTY, 8));
    assert_eq!(String::from_utf8(p).unwrap(), "Unknown command 4242");
    send(
        &mut r,
        &encode_request(9, &Request::GetRegs { vcpu: 0 }).unwrap(),
    );
    let (h, _) = read_frame(&mut r).unwrap();
    assert_eq!((h.status, h.id), (status::OK, 9));
    assert_eq!(counter(&s.vmm, "refused"), 2);
    vm_unharmed(&s);
}

#[test]
fn a_huge_length_is_refused_before_any_payload_is_read() {
    let s = setup();
    for length in [proto::MAX_PAYLOAD + 1, u32::MAX] {
        let mut r = raw(&s.vm_sock);
        send(&mut r, &header_bytes(1, Command::SetRegs as u16, length, 3));
        // No payload is sent: the answer comes from the header alone.
        let (h, p) = read_frame(&mut r).unwrap();
        assert_eq!((h.status, h.id), (status::E2BIG, 3));
        assert_eq!(
            String::from_utf8(p).unwrap(),
            format!("Payload of {length} bytes exceeds the limit of 65536")
        );
        assert!(closed(&mut r));
    }
    vm_unharmed(&s);
}

#[test]
fn requests_are_answered_one_at_a_time_in_order() {
    let s = setup();
    let mut r = raw(&s.vm_sock);
    let mut both = encode_request(1, &Request::GetRegs { vcpu: 0 }).unwrap();
    both.extend(encode_request(2, &Request::MemorySegments).unwrap());
    send(&mut r, &both);
    let (a, _) = read_frame(&mut r).unwrap();
    let (b, p) = read_frame(&mut r).unwrap();
    assert_eq!((a.id, a.command), (1, Command::GetRegs as u16));
    assert_eq!((b.id, b.command), (2, Command::MemorySegments as u16));
    assert_eq!(
        Reply::decode(b.command, &p).unwrap(),
        Reply::MemorySegments(vec![(0, 512 << 20), (1 << 32, 512 << 20)])
    );
    assert_eq!(counter(&s.vmm, "requests"), 2);
    assert_eq!(counter(&s.vmm, "connections"), 1);
    assert_eq!(counter(&s.vmm, "refused"), 0);
}

#[test]
fn slow_and_idle_clients_are_dropped_while_others_are_served() {
    let s = setup();
    // Slowloris: one byte every 100 ms; the request must arrive within 400 ms.
    let mut slow = raw(&s.vm_sock);
    let bytes = encode_request(1, &Request::GetRegs { vcpu: 0 }).unwrap();
    let start = Instant::now();
    let mut dropped = false;
    for b in &bytes {
        if slow.write_all(std::slice::from_ref(b)).is_err() {
            dropped = true;
            break;
        }
        // A good client is served meanwhile.
        if start.elapsed() < Duration::from_millis(150) {
            vm_unharmed(&s);
        }
        std::thread::sleep(Duration::from_millis(100));
        if start.elapsed() > Duration::from_secs(3) {
            break;
        }
    }
    if !dropped {
        slow.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        assert!(closed(&mut slow), "the slow client was dropped");
    }
    assert!(start.elapsed() < Duration::from_secs(3));

    // Idle: connected, never sends; dropped after the idle timeout (1.5 s).
    let mut idle = raw(&s.vm_sock);
    let t = Instant::now();
    assert!(closed(&mut idle));
    let waited = t.elapsed();
    assert!(waited >= Duration::from_millis(1200), "{waited:?}");
    assert!(waited < Duration::from_secs(4), "{waited:?}");
    assert!(counter(&s.vmm, "timeouts") >= 2);
    vm_unharmed(&s);
}

#[test]
fn connections_past_the_cap_are_refused_and_slots_come_back() {
    let s = setup();
    let mut held: Vec<Client> = (0..4)
        .map(|_| Client::connect(&s.vm_sock, T).unwrap())
        .collect();
    let e = Client::connect(&s.vm_sock, T).unwrap_err();
    let (st, msg) = remote(e);
    assert_eq!(st, status::EAGAIN);
    assert_eq!(
        msg,
        "Too many connections (4 served at once): try again later"
    );
    assert_eq!(counter(&s.vmm, "connections_refused"), 1);
    // The held ones still work.
    assert!(held[3].call(&Request::GetRegs { vcpu: 0 }).is_ok());
    // Free one slot: a new client gets in (the server notices the close first).
    held.pop();
    let deadline = Instant::now() + T;
    let mut c = loop {
        match Client::connect(&s.vm_sock, T) {
            Ok(c) => break c,
            Err(e) if Instant::now() < deadline => {
                assert_eq!(remote(e).0, status::EAGAIN);
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("no slot came back: {e}"),
        }
    };
    assert!(c.call(&Request::GetRegs { vcpu: 1 }).is_ok());
    // Caps are per socket: the module socket is still open to clients.
    assert!(Client::connect(&s.ctl_sock, T).is_ok());
}

#[test]
fn random_byte_streams_get_errors_or_closed_connections_and_the_vm_keeps_running() {
    let s = setup();
    let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
    for round in 0..300u32 {
        let mut r = raw(&s.vm_sock);
        r.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut stream = Vec::new();
        if round % 3 == 0 {
            // A believable header (right magic and version) with a random command and a
            // random, non-empty payload.
            let len = 1 + rng.below(64);
            let cmd = u16::try_from(rng.below(40)).unwrap();
            stream.extend(header_bytes(1, cmd, u32::try_from(len).unwrap(), 1));
            stream.extend(rng.bytes(usize::try_from(len).unwrap()));
        } else {
            let n = usize::try_from(rng.below(200)).unwrap();
            stream.extend(rng.bytes(n));
        }
        send(&mut r, &stream);
        let _ = r.shutdown(Shutdown::Write);
        // Whatever comes back is well-formed reply frames, then the end.
        while let Some((h, p)) = read_frame(&mut r) {
            assert_eq!(h.version, VERSION);
            assert_eq!(h.flags, proto::FLAG_REPLY);
            assert!(p.len() <= proto::MAX_MESSAGE_LEN || h.status == status::OK);
        }
    }
    vm_unharmed(&s);
    let calls = s.target.calls();
    assert!(
        !calls.iter().any(|c| matches!(
            c,
            FakeCall::Suspend(_) | FakeCall::Pause | FakeCall::Reset | FakeCall::SetRegs(_)
        )),
        "random bytes changed the VM: {calls:?}"
    );
    assert!(counter(&s.vmm, "bad_messages") > 100);
}

#[test]
fn destroying_a_vm_closes_its_connections_and_removes_its_socket() {
    let dir = tempfile::tempdir().unwrap();
    let (vmm, _) = Vmm::load(opts(dir.path())).unwrap();
    vmm.create_vm("gone", 1).unwrap();
    let path = vmm.socket_path("gone");
    let mut c = Client::connect(&path, T).unwrap();
    let t = Instant::now();
    vmm.destroy_vm("gone").unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "stop does not wait for idle clients"
    );
    assert!(!path.exists());
    assert!(c.call(&Request::Hello).is_err());
    let e = Client::connect(&path, T).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("No control socket at {}", path.display())
    );
}

/// A server that answers every request with a fixed reply header.
fn fake_server(path: &Path, reply: Header) -> std::thread::JoinHandle<()> {
    let l = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut head = [0u8; HEADER_LEN];
        let _ = std::io::Read::read_exact(&mut s, &mut head);
        let req = Header::decode(&head).unwrap();
        let mut payload = vec![0u8; usize::try_from(req.length).unwrap()];
        let _ = std::io::Read::read_exact(&mut s, &mut payload);
        let _ = s.write_all(
            &Header {
                id: req.id,
                ..reply
            }
            .encode(),
        );
        let _ = s.write_all(b"version 2 here");
        std::thread::sleep(Duration::from_millis(200));
    })
}

#[test]
fn the_client_reports_a_version_mismatch_with_both_versions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v2");
    let t = fake_server(
        &path,
        Header {
            version: 2,
            command: 1,
            flags: proto::FLAG_REPLY,
            status: status::EPROTONOSUPPORT,
            length: 14,
            id: 0,
        },
    );
    let e = Client::connect(&path, T).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "Protocol version mismatch: this client speaks version 1, the server at {} speaks version 2",
            path.display()
        )
    );
    t.join().unwrap();
}

#[test]
fn the_client_refuses_a_huge_reply_without_reading_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("liar");
    let t = fake_server(
        &path,
        Header {
            version: 1,
            command: 1,
            flags: proto::FLAG_REPLY,
            status: 0,
            length: u32::MAX,
            id: 0,
        },
    );
    let e = Client::connect(&path, T).unwrap_err();
    assert!(
        e.to_string()
            .contains("Payload of 4294967295 bytes exceeds the limit of 4194304"),
        "{e}"
    );
    t.join().unwrap();
}

#[test]
fn the_client_names_missing_and_stale_sockets() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nothing");
    assert_eq!(
        Client::connect(&missing, T).unwrap_err().to_string(),
        format!("No control socket at {}", missing.display())
    );
    let stale = dir.path().join("stale");
    drop(UnixListener::bind(&stale).unwrap());
    assert_eq!(
        Client::connect(&stale, T).unwrap_err().to_string(),
        format!("Nobody serves {} (stale socket)", stale.display())
    );
    // Not our protocol at all: a server that closes at once.
    let odd = dir.path().join("odd");
    let l = UnixListener::bind(&odd).unwrap();
    let t = std::thread::spawn(move || drop(l.accept().unwrap()));
    assert!(matches!(
        Client::connect(&odd, T).unwrap_err(),
        ClientError::Io { .. }
    ));
    t.join().unwrap();
    let _ = UnixStream::pair();
}
