//! The system side of a library worker (a forked child running a [`crate::Service`]): how
//! stop and reload requests arrive, its process title, and the thread count the manager
//! checks before forking.
//!
//! Requests arrive as signals. The handler only does async-signal-safe things: it sets an
//! atomic flag and writes one byte to a non-blocking self-pipe, whose read end the worker
//! polls ([`Requests::wait`]). signal-hook cannot be used here: the worker is a copy of the
//! master, whose signal-hook registry believes its handlers for TERM and HUP are installed
//! although the child reset every disposition to the default, so registering again would
//! install nothing.

use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

/// The write end of the self-pipe, for the handler; -1 until [`Requests::install`].
static PIPE_W: AtomicI32 = AtomicI32::new(-1);
static STOP_SIG: AtomicI32 = AtomicI32::new(0);
static RELOAD_SIG: AtomicI32 = AtomicI32::new(0);
static STOP: AtomicBool = AtomicBool::new(false);
static RELOAD: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(sig: libc::c_int) {
    // SAFETY: __errno_location returns this thread's errno; read and restored around write,
    // so the interrupted code sees its own errno.
    let saved = unsafe { *libc::__errno_location() };
    if sig == RELOAD_SIG.load(Ordering::Relaxed) {
        RELOAD.store(true, Ordering::SeqCst);
    }
    if sig == STOP_SIG.load(Ordering::Relaxed) || sig == libc::SIGTERM {
        STOP.store(true, Ordering::SeqCst);
    }
    let fd = PIPE_W.load(Ordering::Relaxed);
    if fd >= 0 {
        // SAFETY: write is async-signal-safe; the buffer is a valid static byte. A full pipe
        // (EAGAIN) is fine: a byte already waits to wake the reader.
        unsafe { libc::write(fd, b"!".as_ptr().cast(), 1) };
    }
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = saved };
}

/// A request the worker has received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Stop,
    Reload,
}

/// The worker's end of its request signals. One per process: installed once in the child.
#[derive(Debug)]
pub struct Requests {
    read: OwnedFd,
    _write: OwnedFd,
}

impl Requests {
    /// Installs the handler for `stop` (and SIGTERM, the signal of the master's death) and
    /// `reload`.
    pub fn install(stop: Signal, reload: Signal) -> io::Result<Requests> {
        let (read, write) = super::pipe(true)?;
        super::set_nonblocking(write.as_raw_fd())?;
        PIPE_W.store(write.as_raw_fd(), Ordering::SeqCst);
        STOP_SIG.store(stop as i32, Ordering::SeqCst);
        RELOAD_SIG.store(reload as i32, Ordering::SeqCst);
        for sig in [stop, Signal::SIGTERM, reload] {
            // SAFETY: a zeroed sigaction is a valid starting value; the handler only touches
            // atomics and calls write(2), both async-signal-safe.
            unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as *const () as usize;
                action.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&mut action.sa_mask);
                if libc::sigaction(sig as i32, &action, std::ptr::null_mut()) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
        }
        Ok(Requests {
            read,
            _write: write,
        })
    }

    /// Readable while a request is waiting.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.read.as_fd()
    }

    /// Whether a stop was requested (it stays requested).
    pub fn stopping(&self) -> bool {
        STOP.load(Ordering::SeqCst)
    }

    /// The waiting request, a stop first; a reload is taken (it is answered once), and the
    /// pipe drained so that it is not readable for a request already answered. Call it when
    /// nothing else waits on the pipe (the worker's body has returned).
    pub fn take(&self) -> Option<Request> {
        if self.stopping() {
            return Some(Request::Stop);
        }
        if RELOAD.swap(false, Ordering::SeqCst) {
            let mut buf = [0u8; 64];
            while matches!(super::read_available(self.read.as_raw_fd(), &mut buf), Ok(Some(n)) if n > 0)
            {
            }
            // A request that came while draining has its flag set: still seen by `pending`.
            return Some(Request::Reload);
        }
        None
    }

    /// Whether a request is waiting, without taking it.
    pub fn pending(&self) -> Option<Request> {
        if self.stopping() {
            Some(Request::Stop)
        } else if RELOAD.load(Ordering::SeqCst) {
            Some(Request::Reload)
        } else {
            None
        }
    }

    /// Waits until a request is waiting or `timeout` has passed (`None`: without limit).
    /// Several threads may wait at once: the pipe is only drained when it holds nothing but
    /// the bytes of requests already taken, so a byte one waiter drains never hides a request
    /// from another (its flag is set before its byte is written).
    pub fn wait(&self, timeout: Option<Duration>) -> Option<Request> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            if let Some(r) = self.pending() {
                return Some(r);
            }
            let left = match deadline {
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return None;
                    }
                    Some(left)
                }
                None => None,
            };
            let mut fds = [libc::pollfd {
                fd: self.read.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            match super::poll(&mut fds, left) {
                Ok(n) if n > 0 && self.pending().is_none() => {
                    let mut buf = [0u8; 64];
                    while matches!(super::read_available(self.read.as_raw_fd(), &mut buf), Ok(Some(n)) if n > 0)
                    {
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    log::warn!("cannot wait for a request: {e}");
                    return None;
                }
            }
        }
    }
}

/// Names the calling thread (the process's main thread: its `comm`, what `ps -o comm`, `top`
/// and `pgrep` show), cut to the kernel's 15 bytes.
pub fn set_process_name(name: &str) {
    let mut buf = [0u8; 16];
    let bytes = name.as_bytes();
    let n = bytes.len().min(15);
    buf[..n].copy_from_slice(&bytes[..n]);
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes from a valid
    // buffer, which `buf` is (its last byte stays 0).
    unsafe {
        libc::prctl(libc::PR_SET_NAME, buf.as_ptr() as libc::c_ulong, 0, 0, 0);
    }
}

/// How many threads this process runs (the entries of `/proc/self/task`).
pub fn thread_count() -> io::Result<usize> {
    Ok(fs::read_dir("/proc/self/task")?.count())
}

/// Moves a queue consumer's job channel off its stdin and stdout, which the master made the
/// job and answer pipes: returns them at new descriptors (close-on-exec), then points stdin
/// at `/dev/null` and stdout at stderr (the master's log), so that what the service prints
/// can never reach the answers.
pub fn take_job_channel() -> io::Result<(OwnedFd, OwnedFd)> {
    use nix::fcntl::{fcntl, FcntlArg};
    let jobs = fcntl(0, FcntlArg::F_DUPFD_CLOEXEC(3))?;
    // SAFETY: fcntl returned a new descriptor that nothing else owns.
    let jobs = unsafe { super::owned(jobs) };
    let answers = fcntl(1, FcntlArg::F_DUPFD_CLOEXEC(3))?;
    // SAFETY: as above.
    let answers = unsafe { super::owned(answers) };
    let null = super::dev_null()?;
    nix::unistd::dup2(null.as_raw_fd(), 0)?;
    nix::unistd::dup2(2, 1)?;
    Ok((jobs, answers))
}
