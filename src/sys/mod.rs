//! Every syscall wrapper and every `unsafe` block of plumule lives below this module.
//! Each `unsafe` block carries a `// SAFETY:` line naming the invariant it relies on.

pub mod alarm;
pub mod forkserver;
pub mod fs;
pub mod link;
pub mod listen;
pub mod notify;
pub mod pidfile;
pub mod process;
pub mod reactor;
pub mod service;
pub mod signals;
pub mod spawn;
pub mod syncer;

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::Duration;

/// A pipe whose two ends are close-on-exec; `nonblock_read` makes the read end non-blocking.
pub fn pipe(nonblock_read: bool) -> io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    if nonblock_read {
        set_nonblocking(r.as_raw_fd())?;
    }
    Ok((r, w))
}

/// Asks the kernel for a pipe buffer of `bytes` (F_SETPIPE_SZ); it may give less (an
/// unprivileged process is held to /proc/sys/fs/pipe-max-size). Returns the size it has.
pub fn set_pipe_size(fd: RawFd, bytes: i32) -> io::Result<usize> {
    use nix::fcntl::{fcntl, FcntlArg};
    Ok(fcntl(fd, FcntlArg::F_SETPIPE_SZ(bytes))? as usize)
}

pub fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// Gives `path` to group `gid`, keeping its owner.
pub fn set_group(path: &Path, gid: libc::gid_t) -> io::Result<()> {
    nix::unistd::chown(path, None, Some(nix::unistd::Gid::from_raw(gid)))?;
    Ok(())
}

/// The user and group ids of the process at the other end of a connected Unix socket, as the
/// kernel recorded them at connect time (SO_PEERCRED).
pub fn peer_credentials(sock: &impl AsFd) -> io::Result<(libc::uid_t, libc::gid_t)> {
    let cred = nix::sys::socket::getsockopt(sock, nix::sys::socket::sockopt::PeerCredentials)?;
    Ok((cred.uid(), cred.gid()))
}

/// Opens /dev/null for reading and writing, close-on-exec.
pub fn dev_null() -> io::Result<OwnedFd> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    Ok(OwnedFd::from(f))
}

/// poll(2) over raw descriptors; `None` waits without limit. EINTR returns `Ok(0)`, since a
/// signal's own byte in the self-pipe is what the caller acts on.
pub fn poll(fds: &mut [libc::pollfd], timeout: Option<Duration>) -> io::Result<usize> {
    let ms: libc::c_int = match timeout {
        None => -1,
        // Round up: waking a hair early would only make the loop spin once more.
        Some(d) => d.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as libc::c_int,
    };
    // SAFETY: `fds` is a valid, exclusively borrowed slice of pollfd for the whole call.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    if n < 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::Interrupted {
            return Ok(0);
        }
        return Err(err);
    }
    Ok(n as usize)
}

/// Reads what is available without blocking. `Ok(None)` means end of file; `Ok(Some(0))`
/// means nothing now.
pub fn read_available(fd: RawFd, buf: &mut [u8]) -> io::Result<Option<usize>> {
    match nix::unistd::read(fd, buf) {
        Ok(0) => Ok(None),
        Ok(n) => Ok(Some(n)),
        Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EINTR) => Ok(Some(0)),
        Err(e) => Err(e.into()),
    }
}

/// Wraps a descriptor this process owns.
///
/// # Safety
/// `fd` must be open and owned by nobody else.
pub unsafe fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: the caller guarantees `fd` is open and has no other owner.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// What a helper process of the master (the fork server, the syncer) does first in the child
/// just forked: die with the master (and go at once if it is already gone), take `name` as
/// its process name, leave the signals meant for the master's process group to the master,
/// unblock the rest, and keep no descriptor but `sock`, moved to 3. Returns 3.
///
/// # Safety
/// Only in a child just forked from a single-threaded process, before anything else.
pub(crate) unsafe fn become_helper(
    master: libc::pid_t,
    name: &std::ffi::CStr,
    sock: RawFd,
) -> RawFd {
    // SAFETY (whole block): plain system calls on our own descriptors and signal state.
    unsafe {
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        );
        if libc::getppid() != master {
            libc::_exit(0);
        }
        libc::prctl(libc::PR_SET_NAME, name.as_ptr(), 0, 0, 0);
        // A terminal's ^C or a signal to the master's process group is the master's business:
        // a helper goes when the master closes its socket, or dies.
        for sig in [
            libc::SIGINT,
            libc::SIGTERM,
            libc::SIGHUP,
            libc::SIGQUIT,
            libc::SIGUSR1,
            libc::SIGUSR2,
            libc::SIGPIPE,
        ] {
            libc::signal(sig, libc::SIG_IGN);
        }
        libc::signal(libc::SIGCHLD, libc::SIG_DFL);
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        // Keep only the socket, at 3: no descriptor of the master's stays open here.
        if libc::dup2(sock, 3) < 0 {
            libc::_exit(1);
        }
        if libc::syscall(
            libc::SYS_close_range,
            4 as libc::c_uint,
            libc::c_uint::MAX,
            0,
        ) < 0
        {
            for fd in 4..65536 {
                libc::close(fd);
            }
        }
        3
    }
}
