//! What the benches share: the machine's description, today's date, the system calls they
//! wait and measure with, the Rust echo worker of the queue benches, and their tables. Each bench includes it with `mod common;` and uses what it
//! needs, so not every item is used by every bench.
#![allow(dead_code)]

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// "N CPUs (model), Linux RELEASE".
pub fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("model name")?
                    .split_once(':')
                    .map(|x| x.1.trim().to_string())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpus} CPUs ({model}), Linux {}", release.trim())
}

/// Today's date (UTC) as YYYY-MM-DD, from the days since 1970 (H. Hinnant's civil_from_days).
pub fn today() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

// ---------------------------------------------------------------------------------------------

/// The libc calls and `unsafe` blocks the benches share.
pub mod sys {
    use super::*;
    use std::os::fd::FromRawFd;

    /// CLOCK_MONOTONIC in nanoseconds: the clock the workers log.
    pub fn mono_ns() -> u64 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        assert_eq!(rc, 0, "clock_gettime(CLOCK_MONOTONIC)");
        ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
    }

    pub fn kill(pid: i32, sig: i32) -> io::Result<()> {
        if pid <= 0 {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
        // SAFETY: kill has no memory-safety preconditions; pid > 0 targets one process only.
        if unsafe { libc::kill(pid, sig) } == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// A pidfd for `pid`: readable once the process has exited.
    pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the syscall returned a fresh fd that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    /// A non-blocking inotify fd that becomes readable when `path` is written to.
    pub fn inotify_watch(path: &Path) -> io::Result<OwnedFd> {
        use std::os::unix::ffi::OsStrExt;
        let cpath = std::ffi::CString::new(path.as_os_str().as_bytes())?;
        // SAFETY: inotify_init1 takes flags only and returns a new fd or -1.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh inotify fd that nothing else owns.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: `cpath` is a NUL-terminated string that outlives the call.
        if unsafe { libc::inotify_add_watch(fd, cpath.as_ptr(), libc::IN_MODIFY) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(owned)
    }

    /// Reads a non-blocking fd until it would block.
    pub fn drain(fd: BorrowedFd<'_>) {
        let mut buf = [0u8; 4096];
        // SAFETY: `buf` is valid for writes of its length for the duration of the call.
        while unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
    }

    /// poll(2) for readability, retried on EINTR; which of `fds` are readable (or hung up).
    pub fn poll(fds: &[BorrowedFd<'_>], timeout: Duration) -> io::Result<Vec<bool>> {
        let mut pfds: Vec<libc::pollfd> = fds
            .iter()
            .map(|fd| libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let deadline = mono_ns() + timeout.as_nanos() as u64;
        loop {
            let left_ms = deadline.saturating_sub(mono_ns()).div_ceil(1_000_000);
            let left_ms = left_ms.min(i32::MAX as u64) as i32;
            // SAFETY: `pfds` is a valid array of pollfd of the length passed.
            let rc = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, left_ms) };
            if rc >= 0 {
                return Ok(pfds.iter().map(|p| p.revents != 0).collect());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Makes the spawned system get SIGTERM (a graceful stop) if the bench itself dies.
    pub fn die_with_parent(cmd: &mut Command) {
        // SAFETY: the closure runs between fork and exec and only calls prctl, which is
        // async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
}

/// The queue benches' Rust worker (`examples/echo_worker.rs`): the binary named by
/// `QUEUE_BENCH_ECHO_WORKER`, or built now with cargo into this build's target dir.
pub fn echo_worker() -> Result<std::path::PathBuf, String> {
    if let Some(path) = std::env::var_os("QUEUE_BENCH_ECHO_WORKER") {
        return Ok(std::path::PathBuf::from(path));
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| env!("CARGO").into());
    let plumule = Path::new(env!("CARGO_BIN_EXE_plumule"));
    // target/release/plumule: examples land in target/release/examples.
    let profile_dir = plumule.parent().ok_or("no target dir")?;
    let target_dir = profile_dir.parent().ok_or("no target dir")?;
    let status = Command::new(cargo)
        .args(["build", "--quiet", "--release", "--example", "echo_worker"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("CARGO_TARGET_DIR", target_dir)
        .status()
        .map_err(|e| format!("cannot run cargo to build echo_worker: {e}"))?;
    if !status.success() {
        return Err(format!("cargo build --example echo_worker: {status}"));
    }
    Ok(profile_dir.join("examples").join("echo_worker"))
}

/// A Markdown-style table, every column padded to its widest cell.
pub fn table<S: AsRef<str>>(head: &[S], rows: &[Vec<String>]) -> String {
    use std::fmt::Write;
    let head: Vec<String> = head.iter().map(|h| h.as_ref().to_string()).collect();
    let mut widths = vec![0; head.len()];
    for r in std::iter::once(&head).chain(rows) {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[String]| {
        out.push('|');
        for (c, w) in cells.iter().zip(&widths) {
            let _ = write!(out, " {c}{} |", " ".repeat(w - c.chars().count()));
        }
        out.push('\n');
    };
    line(&head);
    line(&widths.iter().map(|&w| "-".repeat(w)).collect::<Vec<_>>());
    for r in rows {
        line(r);
    }
    out
}
