//! Control of running vCPUs: the state machine (running, paused, stopping), kicks, and bounded waits.
//!
//! A kick sets the vCPU's `immediate_exit` byte from a signal handler that runs on the vCPU's own
//! thread, so a kick that lands just before `KVM_RUN` still makes it return at once (the race a plain
//! signal loses). Every wait on a vCPU is bounded: pause, resume and stop report a suspected deadlock
//! rather than hang.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Condvar, Mutex, Once};
use std::time::{Duration, Instant};

/// The signal used to kick vCPU threads out of `KVM_RUN` (SIGRTMIN + 2, like cloud-hypervisor's choice
/// of a real-time signal nobody else uses).
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + 2
}

thread_local! {
    /// This thread's vCPU `immediate_exit` byte, or null when the thread runs no vCPU.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn on_kick(_sig: libc::c_int) {
    // Only async-signal-safe work here: a const-initialised thread-local read and one byte store.
    let p = IMMEDIATE_EXIT.with(|c| c.get());
    if !p.is_null() {
        // SAFETY: `p` points into this thread's vCPU run structure, registered by `register_vcpu_thread`
        // and cleared before that structure goes away.
        unsafe { std::ptr::write_volatile(p, 1) };
    }
}

/// Installs the kick handler once per process.
pub fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: all-zero is a valid `sigaction` (no handler, empty mask, no flags).
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = on_kick as *const () as usize;
        sa.sa_flags = 0; // no SA_RESTART: KVM_RUN must return EINTR
                         // SAFETY: `sa.sa_mask` is a valid, writable signal set.
        unsafe { libc::sigemptyset(&mut sa.sa_mask) };
        // SAFETY: installs a handler that only does async-signal-safe work (see `on_kick`).
        unsafe { libc::sigaction(kick_signal(), &sa, std::ptr::null_mut()) };
    });
}

/// Registers this thread's vCPU `immediate_exit` byte with the kick handler; the guard unregisters it.
pub fn register_vcpu_thread(p: *mut u8) -> KickGuard {
    IMMEDIATE_EXIT.with(|c| c.set(p));
    KickGuard(())
}

/// Unregisters the kick target when dropped.
#[derive(Debug)]
pub struct KickGuard(());

impl Drop for KickGuard {
    fn drop(&mut self) {
        IMMEDIATE_EXIT.with(|c| c.set(std::ptr::null_mut()));
    }
}

/// Sends the kick signal to a thread.
pub fn kick_thread(t: libc::pthread_t) {
    // SAFETY: `t` is a live thread of this process (the controller joins vCPU threads only after
    // their last kick).
    unsafe {
        libc::pthread_kill(t, kick_signal());
    }
}

/// The state a controller asks a vCPU to be in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RunState {
    /// Running the guest.
    Running = 0,
    /// Parked outside the guest until resumed.
    Paused = 1,
    /// Leaving its loop for good.
    Stopping = 2,
}

impl RunState {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => RunState::Running,
            1 => RunState::Paused,
            _ => RunState::Stopping,
        }
    }
}

/// An operation that must run on the vCPU's own thread (KVM vCPU ioctls belong to it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VcpuOp {
    /// Read the general registers.
    GetRegs,
    /// Write the general registers.
    SetRegs(crate::backend::Regs),
    /// Read the special registers.
    GetSregs,
    /// Is the vCPU halted with interrupts off (halt detection)?
    HaltedWithInterruptsOff,
}

/// The answer to a [`VcpuOp`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VcpuOpResult {
    /// General registers.
    Regs(crate::backend::Regs),
    /// Special registers.
    Sregs(crate::backend::SpecialRegs),
    /// Done, nothing to return.
    Done,
    /// An answer to a yes/no question.
    Flag(bool),
    /// The backend refused.
    Failed(String),
}

/// Failure of a control round trip.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ControlError {
    /// The vCPU did not acknowledge in time.
    #[error("vCPU {vcpu} did not reach {wanted:?} within {waited:?}: suspected deadlock")]
    SuspectedDeadlock {
        /// Which vCPU.
        vcpu: u32,
        /// The state asked for.
        wanted: RunState,
        /// How long we waited.
        waited: Duration,
    },
    /// The vCPU thread has exited: nothing can run on it.
    #[error("vCPU {0} is not running")]
    NotRunning(u32),
    /// Another operation on this vCPU is in flight.
    #[error("vCPU {0} is busy with another control operation")]
    Busy(u32),
}

/// Shared between one vCPU thread and its controllers.
///
/// Lock order: `op` → `acked` → `thread`. The vCPU thread never holds two of them at once; state
/// changes (`wanted`, `op_pending`) are published while holding `acked`, the lock a parked vCPU
/// checks them under, so no notification is lost.
#[derive(Debug)]
pub struct VcpuControl {
    id: u32,
    wanted: AtomicU8,
    /// The state the vCPU thread last acknowledged.
    acked: Mutex<RunState>,
    changed: Condvar,
    thread: Mutex<Option<libc::pthread_t>>,
    /// Set while `op` holds an operation for the vCPU thread (checked once per loop iteration).
    op_pending: AtomicBool,
    op: Mutex<OpSlot>,
    op_done: Condvar,
}

/// The mailbox of one vCPU: at most one operation in flight.
#[derive(Debug, Default)]
struct OpSlot {
    request: Option<VcpuOp>,
    result: Option<VcpuOpResult>,
    busy: bool,
}

impl VcpuControl {
    /// Control block of vCPU `id`, wanted running.
    pub fn new(id: u32) -> Self {
        Self {
            id,
            wanted: AtomicU8::new(RunState::Running as u8),
            acked: Mutex::new(RunState::Running),
            changed: Condvar::new(),
            thread: Mutex::new(None),
            op_pending: AtomicBool::new(false),
            op: Mutex::new(OpSlot::default()),
            op_done: Condvar::new(),
        }
    }

    /// Whether an operation waits for the vCPU thread (one load per loop iteration).
    #[inline]
    pub fn op_pending(&self) -> bool {
        self.op_pending.load(Ordering::Acquire)
    }

    /// On the vCPU thread: takes the pending operation, if any.
    pub fn take_op(&self) -> Option<VcpuOp> {
        let op = crate::handler::lock(&self.op).request.take();
        self.op_pending.store(false, Ordering::Release);
        op
    }

    /// On the vCPU thread: publishes the result of the operation it took.
    pub fn complete_op(&self, r: VcpuOpResult) {
        crate::handler::lock(&self.op).result = Some(r);
        self.op_done.notify_all();
    }

    /// Runs `op` on the vCPU thread: kicks it out of the guest, waits (bounded) for the answer.
    pub fn call(&self, op: VcpuOp, timeout: Duration) -> Result<VcpuOpResult, ControlError> {
        let mut slot = crate::handler::lock(&self.op);
        if slot.busy {
            return Err(ControlError::Busy(self.id));
        }
        if crate::handler::lock(&self.thread).is_none() {
            return Err(ControlError::NotRunning(self.id));
        }
        slot.busy = true;
        slot.request = Some(op);
        slot.result = None;
        {
            // A parked (paused) vCPU waits on `changed` under `acked`: publish under that lock.
            let _acked = crate::handler::lock(&self.acked);
            self.op_pending.store(true, Ordering::Release);
            self.changed.notify_all();
        }
        self.kick();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(r) = slot.result.take() {
                slot.busy = false;
                return Ok(r);
            }
            let now = Instant::now();
            if now >= deadline || crate::handler::lock(&self.thread).is_none() {
                slot.busy = false;
                slot.request = None;
                self.op_pending.store(false, Ordering::Release);
                return Err(if now >= deadline {
                    ControlError::SuspectedDeadlock {
                        vcpu: self.id,
                        wanted: RunState::Running,
                        waited: timeout,
                    }
                } else {
                    ControlError::NotRunning(self.id)
                });
            }
            let slice = (deadline - now).min(Duration::from_millis(20));
            slot = self
                .op_done
                .wait_timeout(slot, slice)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
            if slot.result.is_none() {
                self.kick();
            }
        }
    }

    /// The vCPU id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Called on the vCPU thread when it starts.
    pub fn set_thread(&self, t: libc::pthread_t) {
        *crate::handler::lock(&self.thread) = Some(t);
    }

    /// Called on the vCPU thread when it leaves its loop.
    pub fn clear_thread(&self) {
        *crate::handler::lock(&self.thread) = None;
    }

    /// What the controller wants (read on every loop iteration: one relaxed-acquire load).
    #[inline]
    pub fn wanted(&self) -> RunState {
        RunState::from_u8(self.wanted.load(Ordering::Acquire))
    }

    /// The vCPU thread acknowledges reaching `s`.
    pub fn ack(&self, s: RunState) {
        *crate::handler::lock(&self.acked) = s;
        self.changed.notify_all();
    }

    /// On the vCPU thread: park while paused; returns the state to continue in.
    pub fn park_while_paused(&self) -> RunState {
        let mut acked = crate::handler::lock(&self.acked);
        *acked = RunState::Paused;
        self.changed.notify_all();
        loop {
            let w = self.wanted();
            if w != RunState::Paused || self.op_pending() {
                *acked = w;
                self.changed.notify_all();
                return w;
            }
            acked = self
                .changed
                .wait_timeout(acked, Duration::from_millis(100))
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// Asks for `s`, kicks the vCPU, and waits (bounded) for the acknowledgement. A vCPU thread that
    /// has already exited counts as stopped.
    pub fn request(&self, s: RunState, timeout: Duration) -> Result<(), ControlError> {
        // Stopping is final.
        if self.wanted() == RunState::Stopping && s != RunState::Stopping {
            return Ok(());
        }
        // Publish under the lock the parked vCPU checks under, or a vCPU between its check and its
        // wait would miss the notification.
        let mut acked = crate::handler::lock(&self.acked);
        self.wanted.store(s as u8, Ordering::Release);
        self.changed.notify_all();
        self.kick();
        let deadline = Instant::now() + timeout;
        loop {
            let thread_gone = crate::handler::lock(&self.thread).is_none();
            if *acked == s || (s == RunState::Stopping && thread_gone) {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ControlError::SuspectedDeadlock {
                    vcpu: self.id,
                    wanted: s,
                    waited: timeout,
                });
            }
            // Re-kick periodically: a kick can be consumed by an exit that raced it.
            let slice = (deadline - now).min(Duration::from_millis(20));
            acked = self
                .changed
                .wait_timeout(acked, slice)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
            if *acked != s {
                self.kick();
            }
        }
    }

    /// Kicks the vCPU out of the guest (no wait).
    pub fn kick(&self) {
        if let Some(t) = *crate::handler::lock(&self.thread) {
            kick_thread(t);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn pause_resume_stop_round_trip_with_a_cooperating_thread() {
        install_kick_handler();
        let c = Arc::new(VcpuControl::new(0));
        let c2 = c.clone();
        let t = std::thread::spawn(move || {
            // SAFETY: pthread_self has no preconditions.
            c2.set_thread(unsafe { libc::pthread_self() });
            loop {
                match c2.wanted() {
                    RunState::Running => {
                        c2.ack(RunState::Running);
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    RunState::Paused => {
                        if c2.park_while_paused() == RunState::Stopping {
                            break;
                        }
                    }
                    RunState::Stopping => break,
                }
            }
            c2.ack(RunState::Stopping);
            c2.clear_thread();
        });
        c.request(RunState::Paused, Duration::from_secs(2)).unwrap();
        c.request(RunState::Running, Duration::from_secs(2))
            .unwrap();
        c.request(RunState::Stopping, Duration::from_secs(2))
            .unwrap();
        t.join().unwrap();
    }

    #[test]
    fn an_unresponsive_vcpu_is_reported_not_waited_for_forever() {
        let c = VcpuControl::new(7);
        // A thread is registered but never acknowledges. The kick handler is installed, so the
        // signal to ourselves is harmless.
        install_kick_handler();
        // SAFETY: pthread_self has no preconditions.
        c.set_thread(unsafe { libc::pthread_self() });
        let e = c
            .request(RunState::Paused, Duration::from_millis(100))
            .unwrap_err();
        assert!(matches!(e, ControlError::SuspectedDeadlock { vcpu: 7, .. }));
        assert!(e.to_string().contains("suspected deadlock"));
    }
}
