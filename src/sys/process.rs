//! Processes and process groups: reaping, signals, start times, limits. Plain values in and
//! out: nothing here knows about programs or slots.

use std::fmt;
use std::io;
use std::os::fd::{OwnedFd, RawFd};

use nix::errno::Errno;
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

/// How a process ended: its exit code, or the signal that killed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(Signal),
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exit {c}"),
            Exit::Signal(s) => write!(f, "signal {}", signal_name(*s)),
        }
    }
}

/// "TERM" for SIGTERM: the form the config file and `status --json` use.
pub fn signal_name(s: Signal) -> &'static str {
    s.as_str().trim_start_matches("SIG")
}

/// One reaped child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reaped {
    pub pid: Pid,
    pub exit: Exit,
}

/// A descriptor that becomes readable when the child `pid` exits (pidfd_open(2)),
/// close-on-exec. With it a worker's end is reported by its own descriptor and reaped without
/// a wait over every child.
pub fn pidfd(pid: Pid) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags, no pointers; the result is checked.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it. pidfds are
    // always close-on-exec.
    Ok(unsafe { crate::sys::owned(fd as RawFd) })
}

/// Reaps one exited child, if any, without blocking. `is_worker` is asked before the reap:
/// for a worker, what is left of its process group is SIGKILLed while the zombie still pins
/// the group id, so the kill can never hit a group that reused the id.
pub fn reap_one(is_worker: impl Fn(Pid) -> bool) -> io::Result<Option<Reaped>> {
    reap(libc::P_ALL, 0, is_worker)
}

/// Reaps the child whose pidfd is `pidfd`, if it has exited, killing what is left of its
/// group first like [`reap_one`]. Costs one child, where a wait over all children walks
/// every one of them (2000 workers: 2000 looks per exit).
pub fn reap_pidfd(pidfd: RawFd) -> io::Result<Option<Reaped>> {
    reap(libc::P_PIDFD, pidfd as libc::id_t, |_| true)
}

fn reap(
    idtype: libc::idtype_t,
    id: libc::id_t,
    is_worker: impl Fn(Pid) -> bool,
) -> io::Result<Option<Reaped>> {
    // SAFETY: siginfo_t is plain data; all-zero is a valid value for waitid to fill in.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid, writable siginfo_t.
    let r = unsafe {
        libc::waitid(
            idtype,
            id,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    if r < 0 {
        let e = Errno::last();
        return match e {
            Errno::ECHILD => Ok(None),
            Errno::EINTR => reap(idtype, id, is_worker),
            _ => Err(e.into()),
        };
    }
    // SAFETY: waitid succeeded, so si_pid is set (0 when no child had exited).
    let pid = unsafe { info.si_pid() };
    if pid == 0 {
        return Ok(None);
    }
    let pid = Pid::from_raw(pid);
    if is_worker(pid) {
        // ESRCH: the group had no other member. Anything else is not ours to report.
        let _ = killpg(pid, Signal::SIGKILL);
    }
    // SAFETY: as above, si_status is set for an exited child.
    let (code, status) = (info.si_code, unsafe { info.si_status() });
    let exit = if code == libc::CLD_EXITED {
        Exit::Code(status)
    } else {
        Exit::Signal(Signal::try_from(status).unwrap_or(Signal::SIGKILL))
    };
    // Now reap for real; the pid is known, so this cannot take another child's status.
    loop {
        match nix::sys::wait::waitpid(pid, None) {
            Ok(_) => break,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Some(Reaped { pid, exit }))
}

/// Sends `sig` to the process group led by `pgid`. A group already gone is not an error.
pub fn signal_group(pgid: Pid, sig: Signal) -> io::Result<()> {
    match killpg(pgid, sig) {
        Ok(()) | Err(Errno::ESRCH) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Sends `sig` to the single process `pid`. A process already gone is not an error.
pub fn signal_process(pid: Pid, sig: Signal) -> io::Result<()> {
    match kill(pid, sig) {
        Ok(()) | Err(Errno::ESRCH) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The process group of `pid`, or `None` when no such process exists (or it is not ours to
/// ask about).
pub fn process_group(pid: Pid) -> Option<Pid> {
    nix::unistd::getpgid(Some(pid)).ok()
}

/// Whether any live process is left in group `pgid`. Zombies do not count: an orphan that
/// init has not reaped yet (some containers' pid 1 never does) is already dead.
pub fn group_exists(pgid: Pid) -> bool {
    if matches!(killpg(pgid, None), Err(Errno::ESRCH)) {
        return false;
    }
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return true;
    };
    dir.filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        })
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .any(|stat| {
            // Fields after the command name: state (3), ppid (4), pgrp (5).
            let Some(close) = stat.rfind(')') else {
                return false;
            };
            let mut f = stat[close + 1..].split_whitespace();
            let state = f.next();
            let pgrp = f.nth(1).and_then(|p| p.parse::<i32>().ok());
            pgrp == Some(pgid.as_raw()) && state != Some("Z")
        })
}

/// The start time of `pid` in clock ticks since boot (field 22 of /proc/PID/stat), which
/// tells a process apart from a later one that reused its pid.
pub fn start_time(pid: Pid) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    // rest starts at field 3 (state); field 22 is the 20th after it.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Makes the master the reaper of its workers' orphaned descendants, so that a worker's
/// child that outlives it is still reaped by plumule rather than left to init.
pub fn become_subreaper() -> io::Result<()> {
    // SAFETY: PR_SET_CHILD_SUBREAPER takes an integer flag; no pointers are involved.
    let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Raises the soft open-file limit to the hard one (the master holds pipes for every worker)
/// and returns the original, which workers get back before exec.
pub fn raise_nofile_limit() -> io::Result<libc::rlimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid rlimit to write into.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let original = lim;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: `lim` is a valid rlimit; raising the soft limit to the hard one is allowed.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(original)
}

/// Sends `sig` to the process a pidfd refers to (pidfd_send_signal(2)): never to another
/// process that reused its pid. A process already gone is not an error.
pub fn signal_pidfd(pidfd: RawFd, sig: Signal) -> io::Result<()> {
    // SAFETY: plain integer arguments; a null siginfo asks for the kill(2)-like default.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd,
            sig as libc::c_int,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ESRCH) {
            return Ok(());
        }
        return Err(e);
    }
    Ok(())
}

/// Whether the process of a pidfd has exited (its pidfd is readable).
pub fn pidfd_exited(pidfd: RawFd) -> bool {
    let mut fds = [libc::pollfd {
        fd: pidfd,
        events: libc::POLLIN,
        revents: 0,
    }];
    matches!(super::poll(&mut fds, Some(std::time::Duration::ZERO)), Ok(n) if n > 0)
}

/// The time since boot on CLOCK_BOOTTIME, which goes on counting through a suspend.
pub fn boottime() -> std::time::Duration {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME) {
        Ok(ts) => std::time::Duration::new(ts.tv_sec() as u64, ts.tv_nsec() as u32),
        // Never on Linux ≥ 2.6.39; the monotonic clock is the next best.
        Err(_) => {
            let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
                .expect("CLOCK_MONOTONIC");
            std::time::Duration::new(ts.tv_sec() as u64, ts.tv_nsec() as u32)
        }
    }
}

/// This process no longer dies with its parent: a helper that must outlive the master for
/// a moment (to kill what the master can no longer stop) watches its socket instead.
pub fn keep_after_parent() -> io::Result<()> {
    nix::sys::prctl::set_pdeathsig(None).map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_of_self_is_stable_and_other_pids_differ() {
        let me = nix::unistd::getpid();
        let a = start_time(me).expect("own start time");
        assert_eq!(start_time(me), Some(a));
        assert_eq!(start_time(Pid::from_raw(i32::MAX)), None);
    }
}
