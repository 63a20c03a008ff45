//! The module and its control socket (tier: needs `/dev/kvm`): `bhyvectl --get-stats` against a
//! running test guest shows counters that move; registers read back; hostile clients on the control
//! socket get an error or a closed connection and the VM keeps running; `--force-poweroff` ends it
//! with bhyve's power-off status; a VM asking for more vCPUs than `hw.vmm.maxcpu` is refused.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn bhyvectl() -> PathBuf {
    // bhyvectl is another package's binary: build it (a no-op when it is up to date) next to ours.
    let dir = Path::new(env!("CARGO_BIN_EXE_bhyve"))
        .parent()
        .unwrap()
        .to_path_buf();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let profile_release = dir.ends_with("release");
    let mut c = Command::new(cargo);
    c.args(["build", "-q", "-p", "bhyvectl"]);
    if profile_release {
        c.arg("--release");
    }
    assert!(c.status().unwrap().success(), "building bhyvectl");
    dir.join("bhyvectl")
}

/// Kills the VM if the test ends early (a panicking test must not leave a guest spinning).
struct Vm(Child);

impl Drop for Vm {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn start(dir: &Path, name: &str, extra: &[&str]) -> Vm {
    assert!(Path::new("/dev/kvm").exists(), "needs /dev/kvm");
    guests::write_all(dir).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_bhyve"))
        .env("BHYVE_RS_SOCKET_DIR", dir.join("sock"))
        .args(["-l", "com1,null", "-o"])
        .arg(format!("boot.kernel={}", dir.join("hammer.elf").display()))
        .args(["-o", "boot.cmdline=n=0"])
        .args(extra)
        .arg(name)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let vm = Vm(child);
    // The socket appears when the module creates the VM; the running VM attaches to it just
    // after: wait until it answers.
    let t = Instant::now();
    loop {
        let (st, out) = ctl(dir, &[&format!("--vm={name}"), "--get-stats"]);
        if st == 0 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the VM's control socket never answered: {out}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    vm
}

fn ctl(dir: &Path, args: &[&str]) -> (i32, String) {
    let o = Command::new(bhyvectl())
        .arg(format!("--socket-dir={}", dir.join("sock").display()))
        .args(args)
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr),
    )
}

fn total_exits(text: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with("total number of vm exits"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .expect("total exits line")
}

#[test]
fn bhyvectl_sees_a_live_vm_and_hostile_clients_do_not_hurt_it() {
    let dir = std::env::temp_dir().join(format!("bhyve-ctl-{}", std::process::id()));
    let trace = dir.join("trace.json");
    let trace_opt = format!("trace.file={}", trace.display());
    let mut vm = start(
        &dir,
        "live",
        &["-o", &trace_opt, "-o", "trace.enabled=false"],
    );

    let (st, a) = ctl(&dir, &["--vm=live", "--get-stats"]);
    assert_eq!(st, 0, "{a}");
    std::thread::sleep(Duration::from_millis(500));
    let (_, b) = ctl(&dir, &["--vm=live", "--get-stats"]);
    assert!(
        total_exits(&b) > total_exits(&a),
        "counters move while the guest runs:\n{a}\n{b}"
    );
    let (st, regs) = ctl(&dir, &["--vm=live", "--get-rip", "--get-efer"]);
    assert_eq!(st, 0, "{regs}");
    assert!(
        regs.contains("rip[0]") && regs.contains("0x0000000000000500"),
        "{regs}"
    );

    // The live top-style view: two refreshes, each with a non-zero exit rate for vCPU 0.
    let (st, top) = ctl(&dir, &["--vm=live", "--top=0.3", "--iterations=2"]);
    assert_eq!(st, 0, "{top}");
    let rates: Vec<f64> = top
        .lines()
        .filter(|l| l.starts_with("vcpu0"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
        .collect();
    assert_eq!(rates.len(), 2, "{top}");
    assert!(rates.iter().all(|&r| r > 0.0), "exit rates move: {top}");

    // Tracing switched on and off at run time.
    let (st, out) = ctl(&dir, &["--vm=live", "--trace=on"]);
    assert_eq!(st, 0, "{out}");
    std::thread::sleep(Duration::from_millis(300));
    let (st, out) = ctl(&dir, &["--vm=live", "--trace=off"]);
    assert_eq!(st, 0, "{out}");

    // Hostile clients: random bytes, a huge length, a truncated header, wrong magic.
    let sock = dir.join("sock").join("live");
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for i in 0..40 {
        let Ok(mut s) = UnixStream::connect(&sock) else {
            continue;
        };
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let msg: Vec<u8> = match i % 4 {
            0 => (0..64)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect(),
            1 => {
                let mut h = b"BHVC".to_vec();
                h.extend_from_slice(&1u16.to_le_bytes());
                h.extend_from_slice(&7u16.to_le_bytes());
                h.extend_from_slice(&[0; 8]);
                h.extend_from_slice(&u32::MAX.to_le_bytes()); // length
                h.extend_from_slice(&[0; 12]);
                h
            }
            2 => b"BHVC\x01".to_vec(),
            _ => b"NOPE and some more bytes than a header has........".to_vec(),
        };
        let _ = s.write_all(&msg);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut reply = Vec::new();
        let _ = s.read_to_end(&mut reply); // an error reply or a closed connection
    }
    assert!(
        vm.0.try_wait().unwrap().is_none(),
        "the VM survived the hostile clients"
    );
    let (_, c) = ctl(&dir, &["--vm=live", "--get-stats"]);
    assert!(total_exits(&c) > total_exits(&b), "and keeps running");

    // A second VM with the same name is refused (names are unique per module).
    let o = Command::new(env!("CARGO_BIN_EXE_bhyve"))
        .env("BHYVE_RS_SOCKET_DIR", dir.join("sock"))
        .arg("-o")
        .arg(format!("boot.kernel={}", dir.join("hello.elf").display()))
        .arg("live")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(4));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("live"), "the clash names the VM: {err}");
    assert!(
        vm.0.try_wait().unwrap().is_none(),
        "the first VM is untouched"
    );

    let (st, out) = ctl(&dir, &["--vm=live", "--force-poweroff"]);
    assert_eq!(st, 0, "{out}");
    let status = vm.0.wait().unwrap();
    assert_eq!(status.code(), Some(1), "power-off status");
    assert!(!sock.exists(), "the control socket goes with the VM");
    // The trace holds the exits of the traced window only: some, not all.
    let json = std::fs::read_to_string(&trace).unwrap();
    let events = json.matches("\"ph\":\"X\"").count() as u64;
    assert!(events > 0, "tracing switched on at run time recorded exits");
    assert!(
        events < total_exits(&c),
        "and stopped when switched off ({events} events)"
    );
    let (st, out) = ctl(&dir, &["--vm=live", "--get-stats"]);
    assert_ne!(st, 0);
    assert!(out.contains("live"), "a missing VM is named: {out}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn maxcpu_from_the_tunables_file_is_enforced_with_bhyves_message() {
    let dir = std::env::temp_dir().join(format!("bhyve-maxcpu-{}", std::process::id()));
    guests::write_all(&dir).unwrap();
    let conf = dir.join("loader.conf");
    std::fs::write(&conf, "vmm_load=\"YES\"\nhw.vmm.maxcpu=\"1\"\n").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_bhyve"))
        .env("BHYVE_RS_SOCKET_DIR", dir.join("sock"))
        .args(["-c", "2", "-o"])
        .arg(format!("vmm.tunables={}", conf.display()))
        .arg("-o")
        .arg(format!("boot.kernel={}", dir.join("hello.elf").display()))
        .arg("two")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(4));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("2 vCPUs requested but only 1 available"),
        "{err}"
    );
    // A malformed tunables file is refused, naming it.
    std::fs::write(&conf, "hw.vmm.maxcpu=\"many\"\n").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_bhyve"))
        .env("BHYVE_RS_SOCKET_DIR", dir.join("sock"))
        .arg("-o")
        .arg(format!("vmm.tunables={}", conf.display()))
        .arg("-o")
        .arg(format!("boot.kernel={}", dir.join("hello.elf").display()))
        .arg("bad")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(4));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("hw.vmm.maxcpu") && err.contains("many"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
