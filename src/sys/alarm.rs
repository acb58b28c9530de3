//! A one-shot SIGALRM timer that interrupts a blocking call in the calling thread: the
//! timeout of `plumule lock --timeout` (flock has none). For client processes only; the
//! master never uses it.
use std::io;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use nix::sys::signal::{
    self, SaFlags, SigAction, SigEvent, SigHandler, SigSet, SigevNotify, SigmaskHow, Signal,
};
use nix::sys::time::TimeSpec;

/// How often the timer fires again after the deadline. It only matters when the first signal
/// arrived just *before* the thread entered `flock` (it then found nothing to interrupt); the
/// repeat makes sure that wait is interrupted too, instead of lasting forever.
const REFIRE: Duration = Duration::from_millis(10);

/// Longer timer settings are clamped (they would overflow `time_t` conversions); the caller
/// re-checks its deadline on every wake-up, so a clamped timer only wakes it early.
const LONGEST: Duration = Duration::from_secs(u32::MAX as u64);

/// An armed timer that interrupts the calling thread's blocking calls with EINTR.
///
/// Field order is drop order, and it matters: the timer is deleted first (a signal it raised
/// meanwhile is delivered to the no-op handler as `timer_delete` returns, SIGALRM being still
/// unblocked), then SIGALRM is blocked again if it was, then the previous handler returns.
/// The other way round, a late SIGALRM could meet the default action and kill the process.
pub struct Alarm {
    _timer: Timer,
    _mask: Unblocked,
    _handler: HandlerInUse,
}

impl Alarm {
    /// Installs the no-op handler, unblocks SIGALRM in this thread and arms a timer aimed at
    /// this thread that fires after `after`, then every `REFIRE`.
    pub fn arm(after: Duration) -> io::Result<Alarm> {
        let handler = HandlerInUse::new()?;
        let mask = Unblocked::new()?;
        let timer = Timer::new()?;
        timer.set(after.clamp(Duration::from_nanos(1), LONGEST), REFIRE)?;
        Ok(Alarm {
            _timer: timer,
            _mask: mask,
            _handler: handler,
        })
    }
}

extern "C" fn wake(_: libc::c_int) {
    // Nothing: the signal's only job is to make the interrupted call return EINTR.
}

/// How many threads currently rely on the no-op handler, and what it replaced.
struct Installed {
    users: usize,
    previous: Option<SigAction>,
}

static INSTALLED: Mutex<Installed> = Mutex::new(Installed {
    users: 0,
    previous: None,
});

fn installed() -> MutexGuard<'static, Installed> {
    // The state stays consistent even if a holder panicked (no panics between updates).
    INSTALLED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One thread's use of the no-op SIGALRM handler. The first user installs it, the last one
/// puts the previous action back, so concurrent waits do not undo each other's handler.
struct HandlerInUse(());

impl HandlerInUse {
    fn new() -> io::Result<HandlerInUse> {
        let mut state = installed();
        if state.users == 0 {
            // No SA_RESTART: the blocked flock must return EINTR rather than resume.
            let action =
                SigAction::new(SigHandler::Handler(wake), SaFlags::empty(), SigSet::empty());
            // SAFETY: `wake` does nothing at all, so it is async-signal-safe whatever the
            // thread was doing when the signal came; SIGALRM is neither SIGKILL nor SIGSTOP.
            let previous = unsafe { signal::sigaction(Signal::SIGALRM, &action) }?;
            state.previous = Some(previous);
        }
        state.users += 1;
        Ok(HandlerInUse(()))
    }
}

impl Drop for HandlerInUse {
    fn drop(&mut self) {
        let mut state = installed();
        state.users -= 1;
        if state.users == 0 {
            if let Some(previous) = state.previous.take() {
                // SAFETY: this puts back exactly the action that was in place before ours,
                // as the kernel returned it; its handler (if any) was fit to be one then.
                let _ = unsafe { signal::sigaction(Signal::SIGALRM, &previous) };
            }
        }
    }
}

/// SIGALRM unblocked in this thread (a blocked one could not interrupt flock). Blocked again
/// on drop if it was blocked before; the rest of the mask is left alone.
struct Unblocked {
    was_blocked: bool,
}

fn alarm_set() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGALRM);
    set
}

impl Unblocked {
    fn new() -> io::Result<Unblocked> {
        let mut before = SigSet::empty();
        signal::pthread_sigmask(
            SigmaskHow::SIG_UNBLOCK,
            Some(&alarm_set()),
            Some(&mut before),
        )?;
        Ok(Unblocked {
            was_blocked: before.contains(Signal::SIGALRM),
        })
    }
}

impl Drop for Unblocked {
    fn drop(&mut self) {
        if self.was_blocked {
            let _ = signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&alarm_set()), None);
        }
    }
}

/// A POSIX timer on CLOCK_MONOTONIC that sends SIGALRM to the thread that created it, and to
/// no other: `alarm(2)` or `setitimer(2)` signal the whole process, and any thread of a
/// multi-threaded process could take the signal while the waiting one sleeps on.
struct Timer(libc::timer_t);

impl Timer {
    fn new() -> io::Result<Timer> {
        let mut event = SigEvent::new(SigevNotify::SigevThreadId {
            signal: Signal::SIGALRM,
            thread_id: nix::unistd::gettid().as_raw(),
            si_value: 0,
        })
        .sigevent();
        let mut timer: libc::timer_t = std::ptr::null_mut();
        // SAFETY: `event` and `timer` are valid for the call; on success the kernel stores
        // the new timer's id in `timer`, which `Drop` deletes exactly once.
        let rc = unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut event, &mut timer) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Timer(timer))
    }

    fn set(&self, first: Duration, then: Duration) -> io::Result<()> {
        let spec = libc::itimerspec {
            it_interval: *TimeSpec::from(then).as_ref(),
            it_value: *TimeSpec::from(first).as_ref(),
        };
        // SAFETY: `self.0` is a live timer of this process (deleted only on drop), `spec` is
        // valid for the call, and a null old value is allowed.
        let rc = unsafe { libc::timer_settime(self.0, 0, &spec, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        // SAFETY: `self.0` came from a successful timer_create and is deleted only here.
        unsafe { libc::timer_delete(self.0) };
    }
}

/// The current SIGALRM handler and flags (SA_RESTORER, which glibc adds to whatever it
/// installs, masked out): lets tests check that a timeout put the old handler back.
pub fn current_action() -> io::Result<(libc::sighandler_t, libc::c_int)> {
    // SAFETY: an all-zero `struct sigaction` is a valid value (SIG_DFL, empty mask).
    let mut current: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: a null new action only queries; `current` is valid for writing.
    let rc = unsafe { libc::sigaction(libc::SIGALRM, std::ptr::null(), &mut current) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    const SA_RESTORER: libc::c_int = 0x0400_0000;
    Ok((current.sa_sigaction, current.sa_flags & !SA_RESTORER))
}
