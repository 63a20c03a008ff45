//! `bhyve`: the bhyve(8)-style front end. Parses the command line, builds the VM, runs it, and exits
//! with bhyve's status: 0 reboot, 1 power-off, 2 halt, 3 triple fault, 4 error.

mod control;
mod opts;
mod pci;
mod vm;

fn main() {
    // KVM's supported CPUID (~0.3 ms) and the latency clock's calibration (a 0.5 ms window) are
    // taken while the command line, the images and the VM are set up, not on the way to the guest's
    // first instruction. The CPUID first, while the main thread makes no KVM call yet: asked later,
    // it overlapped `KVM_CREATE_VM` and the memory slot, and that phase took 0.72 ms instead of
    // 0.46 (medians of 15 runs, 2026-11-25). The calibration's window runs across the CPUID
    // query rather than after it: the VM's threads wait for the clock when they start, and
    // waited 0–270 µs for it when the two ran in turn.
    let _ = std::thread::Builder::new()
        .name("warm-up".into())
        .spawn(|| {
            let calibration = perf::Clock::start_calibration();
            vcpu_runner::kvm::prefetch_supported_cpuid();
            perf::Clock::global_from(calibration);
        });
    // A vCPU posts at most one record per exit, itself a system call: a fence per publish costs
    // nothing measurable there, while a membarrier registration would add milliseconds to start-up
    // and to exit.
    pipeline::fence_only();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let status = match opts::parse(&args) {
        Ok(opts::Command::Help) => {
            print!("{}", opts::USAGE);
            0
        }
        Ok(opts::Command::Run(cfg)) => match vm::run(&cfg) {
            Ok(status) => status,
            Err(e) => {
                eprintln!("bhyve: {e}");
                4
            }
        },
        Err(e) => {
            eprintln!("bhyve: {e}");
            eprintln!("Try 'bhyve -h' for usage.");
            4
        }
    };
    std::process::exit(status);
}
