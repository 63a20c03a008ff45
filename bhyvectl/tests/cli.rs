//! The `bhyvectl` binary against a module in this test process serving a fake running VM from
//! a temporary socket directory.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;

use kmod::fake::FakeTarget;
use kmod::proto::{self, status, Header, HEADER_LEN};
use kmod::{LoadOptions, SysfsSource, Vmm};
use passthrough::fake::FakeSysfs;
use stages::VmRequest;
use vcpu_runner::stats::Stat;
use vcpu_runner::{Capabilities, VirtKind};

struct Setup {
    dir: tempfile::TempDir,
    vmm: Vmm,
    target: Arc<FakeTarget>,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let mut o = LoadOptions::new(Capabilities {
        api_version: 12,
        virt: VirtKind::VmxEpt,
        split_irqchip: true,
        immediate_exit: true,
        irqfd: true,
        ioeventfd: true,
        signal_msi: true,
        irq_routes: 1024,
        max_vcpus: 288,
    });
    o.socket_dir = dir.path().join("run");
    o.host_cpus = Some(4);
    o.sysfs = SysfsSource::Shared(Arc::new(FakeSysfs::new()));
    let (vmm, _) = Vmm::load(o).unwrap();
    vmm.create_vm("guest", 2).unwrap();
    let target = Arc::new(FakeTarget::new(2));
    vmm.attach("guest", target.clone()).unwrap();
    Setup { dir, vmm, target }
}

impl Setup {
    fn run(&self, args: &[&str]) -> Output {
        bhyvectl(&self.dir.path().join("run"), args)
    }
}

fn bhyvectl(socket_dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bhyvectl"))
        .arg(format!("--socket-dir={}", socket_dir.display()))
        .args(args)
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).unwrap()
}

fn ok(o: &Output) -> String {
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(o));
    stdout(o)
}

/// What bhyvectl prints for the fake's counters of `vcpu`, then its device-model scope.
fn expected_stats(vcpu: u64) -> String {
    let mut s = format!("vcpu{vcpu} stats:\n");
    for (i, st) in (0u64..).zip(Stat::ALL) {
        s.push_str(&format!(
            "{:<40}\t{}\n",
            st.description(),
            100 * (vcpu + 1) + i
        ));
    }
    s.push_str("devmodel0 stats:\n");
    s.push_str(&format!(
        "{:<40}\t7\n",
        "records drained from the exit ring"
    ));
    s.push_str(&format!("{:<40}\t3\n", "completions posted"));
    s
}

#[test]
fn get_stats_prints_description_left_value_right() {
    let s = setup();
    let out = ok(&s.run(&["--vm=guest", "--get-stats"]));
    assert_eq!(out, expected_stats(0));
    assert!(out.starts_with("vcpu0 stats:\ntotal number of vm exits                \t100\n"));
    let out = ok(&s.run(&["--vm=guest", "--cpu=1", "--get-stats"]));
    assert_eq!(out, expected_stats(1));
}

#[test]
fn get_stats_json_is_machine_readable() {
    let s = setup();
    let out = ok(&s.run(&["--vm=guest", "--cpu=1", "--get-stats", "--json"]));
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["vm"], "guest");
    assert_eq!(j["vcpu"], 1);
    let scopes = j["scopes"].as_array().unwrap();
    assert_eq!(scopes.len(), 2);
    assert_eq!(scopes[0]["scope"], "vcpu1");
    assert_eq!(
        scopes[0]["counters"][0]["description"],
        "total number of vm exits"
    );
    assert_eq!(scopes[0]["counters"][0]["value"], 200);
    assert_eq!(
        scopes[0]["counters"].as_array().unwrap().len(),
        Stat::ALL.len()
    );
    assert_eq!(scopes[1]["scope"], "devmodel0");
}

#[test]
fn get_all_dumps_memory_registers_segments_and_stats_in_bhyvectls_order() {
    let s = setup();
    let out = ok(&s.run(&["--vm=guest", "--get-all"]));
    let lines: Vec<&str> = out.lines().collect();
    let at = |l: &str| {
        lines
            .iter()
            .position(|x| *x == l)
            .unwrap_or_else(|| panic!("{l:?} missing from:\n{out}"))
    };
    let memseg = at("ID  Length      Name");
    assert_eq!(lines[memseg + 1], "0   1024MB      sysmem");
    let memmap = at("Address     Length      Segment     Offset      Prot  Flags");
    assert_eq!(
        lines[memmap + 1],
        "0           512MB       sysmem      0           RWX   "
    );
    assert_eq!(
        lines[memmap + 2],
        "100000000   512MB       sysmem      20000000    RWX   "
    );
    let efer = at("efer[0]\t\t0x0000000000000500");
    assert_eq!(efer, memmap + 3, "registers follow the memory map");
    let cr0 = at("cr0[0]\t\t0x0000000080000011");
    let rip = at("rip[0]\t\t0x0000000000100000");
    let rax = at("rax[0]\t\t0x000000000000a000");
    let r15 = at("r15[0]\t\t0x000000000000000f");
    let rflags = at("rflags[0]\t0x0000000000000002");
    let ds = at("ds desc[0]\t0x0000000000000000/0xffffffff/0x0000c093");
    let cs = at("cs desc[0]\t0x0000000000000000/0xffffffff/0x0000a09b");
    let tr = at("tr desc[0]\t0x0000000000005000/0x00000067/0x0000008b");
    let ldtr = at("ldtr desc[0]\t0x0000000000000000/0x00000000/0x00010000");
    let gdtr = at("gdtr[0]\t\t0x0000000000006000/0x0000001f");
    let idtr = at("idtr[0]\t\t0x0000000000006800/0x00000fff");
    let cs_sel = at("cs[0]\t\t0x0008");
    let ldtr_sel = at("ldtr[0]\t\t0x0000");
    let stats = at("vcpu0 stats:");
    let order = [
        efer, cr0, rip, rax, r15, rflags, ds, cs, tr, ldtr, gdtr, idtr, cs_sel, ldtr_sel, stats,
    ];
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{out}");
    assert!(out.ends_with(&expected_stats(0)));
}

#[test]
fn single_getters_and_setters() {
    let s = setup();
    let out = ok(&s.run(&["--vm=guest", "--get-rax", "--get-rip", "--cpu=1"]));
    assert_eq!(
        out,
        "rip[1]\t\t0x0000000000101000\nrax[1]\t\t0x000000000000a001\n"
    );
    let out = ok(&s.run(&[
        "--vm=guest",
        "--set-rip=0x2000",
        "--set-rax",
        "010",
        "--get-rip",
        "--get-rax",
        "--get-desc-idtr",
        "--get-ss",
    ]));
    assert_eq!(
        out,
        "rip[0]\t\t0x0000000000002000\nrax[0]\t\t0x0000000000000008\n\
         idtr[0]\t\t0x0000000000006800/0x00000fff\nss[0]\t\t0x0010\n"
    );
    let st = s.target.state();
    assert_eq!((st.regs[0].rip, st.regs[0].rax), (0x2000, 8));
    assert_eq!(st.regs[1].rip, 0x10_1000);
}

#[test]
fn suspend_and_force_options_reach_the_vm() {
    let s = setup();
    ok(&s.run(&["--vm=guest", "--force-poweroff"]));
    assert_eq!(s.target.state().suspended, Some(VmRequest::PowerOff));
    let o = s.run(&["--vm=guest", "--force-reset"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr(&o),
        "bhyvectl: SUSPEND failed: The VM is already suspended (EALREADY)\n"
    );

    let s = setup();
    ok(&s.run(&["--vm=guest", "--suspend=halt"]));
    assert_eq!(s.target.state().suspended, Some(VmRequest::Halt));
    let s = setup();
    ok(&s.run(&["--vm=guest", "--force-reset"]));
    assert_eq!(s.target.state().suspended, Some(VmRequest::Reset));
    ok(&s.run(&["--vm=guest", "--pause"]));
    assert!(s.target.state().paused);
    ok(&s.run(&["--vm=guest", "--resume", "--reinit"]));
    assert!(!s.target.state().paused);
    assert_eq!(s.target.state().resets, 1);
}

#[test]
fn interrupts_are_raised_by_pin_and_by_msi() {
    let s = setup();
    ok(&s.run(&[
        "--vm=guest",
        "--ioapic-assert=3",
        "--ioapic-pulse=4",
        "--inject-msi=0xfee00000:0x30",
    ]));
    let st = s.target.state();
    assert!(st.pins[3]);
    assert_eq!(st.pulses[4], 1);
    assert_eq!(st.msis, vec![(0xfee0_0000, 0x30)]);
    drop(st);
    let o = s.run(&["--vm=guest", "--ioapic-assert=99"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr(&o),
        "bhyvectl: IOAPIC_PIN failed: I/O APIC pin 99 out of range (0..=23) (EINVAL)\n"
    );
}

#[test]
fn create_list_and_destroy_through_the_module_socket() {
    let s = setup();
    ok(&s.run(&["--vm=web", "--create", "--ncpus=2"]));
    assert_eq!(s.vmm.vm("web").unwrap().ncpus, 2);
    let out = ok(&s.run(&["--list"]));
    assert_eq!(
        out,
        format!(
            "{:<32}{:>6}  STATE\n{:<32}{:>6}  running\n{:<32}{:>6}  created\n",
            "NAME", "VCPUS", "guest", 2, "web", 2
        )
    );
    let o = s.run(&["--vm=web", "--create"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr(&o),
        "bhyvectl: CREATE failed: VM web already exists (EEXIST)\n"
    );
    let o = s.run(&["--vm=huge", "--create", "--ncpus=9"]);
    assert_eq!(
        stderr(&o),
        "bhyvectl: CREATE failed: 9 vCPUs requested but only 4 available (EINVAL)\n"
    );
    // A VM created and not running answers HELLO; its registers need a running instance.
    let o = s.run(&["--vm=web", "--get-rip"]);
    assert_eq!(
        stderr(&o),
        "bhyvectl: GET_REGS failed: VM web is not running (created, no bhyve attached) (ENXIO)\n"
    );
    ok(&s.run(&["--vm=web", "--destroy"]));
    assert!(s.vmm.vm("web").is_none());
    let o = s.run(&["--vm=web", "--destroy"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr(&o),
        "bhyvectl: VM:web is not created (DESTROY failed: No VM named web (ENOENT))\n"
    );
    let o = s.run(&["--vm=guest", "--destroy"]);
    assert_eq!(
        stderr(&o),
        "bhyvectl: DESTROY failed: VM guest is running: stop it before destroying it (EBUSY)\n"
    );
    let out = ok(&s.run(&["--sysctl"]));
    assert!(out.contains("hw.vmm.maxcpu: 4\n"), "{out}");
    assert!(out.contains("hw.vmm.virt: Intel VT-x/EPT\n"), "{out}");
    assert!(out.contains("hw.vmm.vms_destroyed: 1\n"), "{out}");
}

#[test]
fn a_missing_vm_names_its_socket_path() {
    let s = setup();
    let o = s.run(&["--vm=nosuch", "--get-stats"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr(&o),
        format!(
            "bhyvectl: VM:nosuch is not created (no control socket at {})\n",
            s.dir.path().join("run/nosuch").display()
        )
    );
    // No module at all.
    let empty = tempfile::tempdir().unwrap();
    let o = bhyvectl(empty.path(), &["--vm=x", "--create"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr(&o),
        format!(
            "bhyvectl: cannot create VM x: no module control socket at {} (is the vmm module loaded?)\n",
            empty.path().join("vmmctl").display()
        )
    );
}

#[test]
fn a_protocol_version_mismatch_names_both_versions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old");
    let l = UnixListener::bind(&path).unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut head = [0u8; HEADER_LEN];
        s.read_exact(&mut head).unwrap();
        let req = Header::decode(&head).unwrap();
        let msg = b"Protocol version 1 not supported (this end speaks 2)";
        let reply = Header {
            version: 2,
            command: req.command,
            flags: proto::FLAG_REPLY,
            status: status::EPROTONOSUPPORT,
            length: u32::try_from(msg.len()).unwrap(),
            id: req.id,
        };
        s.write_all(&reply.encode()).unwrap();
        // bhyvectl may hang up as soon as it has read a header of another version (it does not
        // need the text): a broken pipe here is that, not a failure.
        let _ = s.write_all(msg);
    });
    let o = bhyvectl(dir.path(), &["--vm=old", "--get-stats"]);
    server.join().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr(&o),
        format!(
            "bhyvectl: VM:old: protocol version mismatch: bhyvectl speaks version 1, the socket at {} speaks version 2\n",
            path.display()
        )
    );
}

#[test]
fn usage_errors_exit_1_and_help_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let o = bhyvectl(dir.path(), &["--vm=a", "--bogus"]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(err.starts_with("bhyvectl: Unknown option --bogus\nUsage: bhyvectl --vm=<vmname>\n"));
    let o = bhyvectl(dir.path(), &["--get-stats"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).starts_with("bhyvectl: --vm=NAME is required\n"));
    let o = bhyvectl(dir.path(), &["--help"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(stdout(&o).contains("[--get-stats] [--json]"));
}
