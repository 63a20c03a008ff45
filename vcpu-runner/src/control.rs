//! Control of running vCPUs: the state machine (running, paused, stopping), kicks, and bounded waits.
//!
//! A kick sets the vCPU's `immediate_exit` byte from a signal handler that runs on the vCPU's own
//! thread, so a kick that lands just before `KVM_RUN` still makes it return at once (the race a plain
//! signal loses). Every wait on a vCPU is bounded: pause, resume and stop report a suspected deadlock
//! rather than hang.

use std::cell::Cell;
use std::sync::atomic::{AtomicU8, Ordering};
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
}

/// Shared between one vCPU thread and its controllers.
#[derive(Debug)]
pub struct VcpuControl {
    id: u32,
    wanted: AtomicU8,
    /// The state the vCPU thread last acknowledged.
    acked: Mutex<RunState>,
    changed: Condvar,
    thread: Mutex<Option<libc::pthread_t>>,
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
            if w != RunState::Paused {
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
        self.wanted.store(s as u8, Ordering::Release);
        self.changed.notify_all();
        self.kick();
        let deadline = Instant::now() + timeout;
        let mut acked = crate::handler::lock(&self.acked);
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
