//! The master's readiness queue: epoll(7), level-triggered. A descriptor is registered once,
//! with a token that says which subsystem owns it and what it is, and stays registered until
//! it is removed or closed; a wait costs what is ready, not what is registered, so a master of
//! 2000 workers (4000 pipes) pays for the one pipe that spoke.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// What a ready descriptor can do, in poll(2)'s bits (`POLLIN`, `POLLOUT`, `POLLHUP`,
/// `POLLERR`), so that code written for poll reads it unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ready(pub i16);

impl Ready {
    pub fn readable(self) -> bool {
        self.0 & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0
    }

    pub fn writable(self) -> bool {
        self.0 & (libc::POLLOUT | libc::POLLERR) != 0
    }
}

pub struct Reactor {
    epoll: OwnedFd,
    events: Vec<libc::epoll_event>,
}

fn interest(write: bool) -> u32 {
    let mut bits = libc::EPOLLIN as u32;
    if write {
        bits |= libc::EPOLLOUT as u32;
    }
    bits
}

impl Reactor {
    pub fn new() -> io::Result<Reactor> {
        // SAFETY: epoll_create1 takes no pointers; the result is checked before use.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Reactor {
            // SAFETY: `fd` was just created and is owned by nothing else.
            epoll: unsafe { OwnedFd::from_raw_fd(fd) },
            events: Vec::with_capacity(256),
        })
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, token: u64, write: bool) -> io::Result<()> {
        self.ctl_events(op, fd, token, interest(write))
    }

    fn ctl_events(&self, op: libc::c_int, fd: RawFd, token: u64, events: u32) -> io::Result<()> {
        let mut event = libc::epoll_event { events, u64: token };
        // SAFETY: `event` lives across the call; the kernel copies it. A bad `fd` is reported
        // as an error, not undefined behaviour.
        let r = unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), op, fd, &mut event) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Watches `fd` for reading (and writing, with `write`), reported with `token`.
    pub fn add(&self, fd: RawFd, token: u64, write: bool) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, token, write)
    }

    /// Changes what `fd` is watched for.
    pub fn modify(&self, fd: RawFd, token: u64, write: bool) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd, token, write)
    }

    /// Watches `fd` for writing only: for a connection that has read all it will act on and
    /// waits for room to answer, whose peer may have closed its side (which would keep a
    /// read interest ready). Hang-ups and errors are still reported.
    pub fn modify_write_only(&self, fd: RawFd, token: u64) -> io::Result<()> {
        self.ctl_events(libc::EPOLL_CTL_MOD, fd, token, libc::EPOLLOUT as u32)
    }

    /// Stops watching `fd`. Closing the descriptor does the same (when no duplicate of it
    /// is open), so only descriptors that stay open need this.
    pub fn remove(&self, fd: RawFd) {
        // A descriptor that was never added, or is gone already, is not an error here.
        let _ = self.ctl(libc::EPOLL_CTL_DEL, fd, 0, false);
    }

    /// Waits until something is ready or `timeout` passes (`None`: no limit), and returns
    /// the ready tokens. EINTR returns nothing: a signal's byte in its self-pipe follows.
    pub fn wait(&mut self, timeout: Option<Duration>) -> io::Result<Vec<(u64, Ready)>> {
        let ms: libc::c_int = match timeout {
            None => -1,
            // Round up: waking a hair early would only make the loop spin once more.
            Some(d) => d.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as libc::c_int,
        };
        self.events.clear();
        let capacity = self.events.capacity();
        // SAFETY: the buffer has room for `capacity` events; the kernel writes at most that
        // many and says how many, and only those are then marked initialised.
        let n = unsafe {
            libc::epoll_wait(
                self.epoll.as_raw_fd(),
                self.events.as_mut_ptr(),
                capacity as libc::c_int,
                ms,
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                return Ok(Vec::new());
            }
            return Err(err);
        }
        // SAFETY: epoll_wait initialised the first `n` entries (n <= capacity).
        unsafe { self.events.set_len(n as usize) };
        Ok(self
            .events
            .iter()
            .map(|e| {
                let bits = e.events;
                let mut revents = 0i16;
                if bits & libc::EPOLLIN as u32 != 0 {
                    revents |= libc::POLLIN;
                }
                if bits & libc::EPOLLOUT as u32 != 0 {
                    revents |= libc::POLLOUT;
                }
                if bits & libc::EPOLLHUP as u32 != 0 {
                    revents |= libc::POLLHUP;
                }
                if bits & libc::EPOLLERR as u32 != 0 {
                    revents |= libc::POLLERR;
                }
                (e.u64, Ready(revents))
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_only_what_is_ready_with_its_token() {
        let mut r = Reactor::new().unwrap();
        let (a_read, a_write) = crate::sys::pipe(true).unwrap();
        let (b_read, _b_write) = crate::sys::pipe(true).unwrap();
        r.add(a_read.as_raw_fd(), 7, false).unwrap();
        r.add(b_read.as_raw_fd(), 8, false).unwrap();
        assert!(r.wait(Some(Duration::ZERO)).unwrap().is_empty());
        nix::unistd::write(&a_write, b"x").unwrap();
        let ready = r.wait(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(ready.len(), 1);
        assert_eq!(ready[0].0, 7);
        assert!(ready[0].1.readable());
        // The write end closing is a hang-up: readable, so the reader sees its end of file.
        drop(a_write);
        r.remove(b_read.as_raw_fd());
        let ready = r.wait(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(ready.iter().map(|e| e.0).collect::<Vec<_>>(), vec![7]);
    }
}
