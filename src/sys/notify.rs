//! The sd_notify protocol, both ways: the master's messages to systemd (`$NOTIFY_SOCKET`,
//! a path or an abstract `@name`), and plumule's own datagram socket on which workers send
//! theirs, with SO_PASSCRED so that every message names the pid that sent it.
//!
//! Descriptors passed with a worker's message (SCM_RIGHTS) are owned by the [`Notification`]
//! and closed when it is dropped: never leaked, never inherited (received close-on-exec). That
//! is how `BARRIER=1` works: `sd_notify_barrier` sends the write end of a pipe and waits until
//! every copy is closed, so the master drops the notification only once it has handled every
//! message read before it, and the sender (still waiting) can be attributed meanwhile.

use std::io::{self, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::{Path, PathBuf};

use nix::sys::socket::{
    recvmsg, setsockopt, sockopt::PassCred, ControlMessageOwned, MsgFlags, UnixAddr,
};

/// The master's link to systemd; does nothing when `$NOTIFY_SOCKET` was not set.
pub struct Notifier {
    socket: Option<(UnixDatagram, SocketAddr)>,
    /// The value of the last `STATUS=` systemd received from us: what it shows now.
    last_status: Option<String>,
}

impl Notifier {
    /// Reads `$NOTIFY_SOCKET` once; the variable is never passed on to workers.
    pub fn from_env() -> Notifier {
        let Some(value) = std::env::var_os("NOTIFY_SOCKET") else {
            return Notifier {
                socket: None,
                last_status: None,
            };
        };
        let value = value.to_string_lossy().into_owned();
        let addr = if let Some(name) = value.strip_prefix('@') {
            SocketAddr::from_abstract_name(name.as_bytes())
        } else {
            SocketAddr::from_pathname(&value)
        };
        let socket = match (UnixDatagram::unbound(), addr) {
            (Ok(s), Ok(a)) => {
                let _ = s.set_nonblocking(true);
                Some((s, a))
            }
            (Err(e), _) | (_, Err(e)) => {
                log::warn!("NOTIFY_SOCKET={value} is unusable, ignoring: {e}");
                None
            }
        };
        Notifier {
            socket,
            last_status: None,
        }
    }

    pub fn enabled(&self) -> bool {
        self.socket.is_some()
    }

    /// Sends one datagram of `KEY=VALUE` lines. A failure is logged, never fatal.
    pub fn send(&mut self, message: &str) {
        let Some((socket, addr)) = &self.socket else {
            return;
        };
        match socket.send_to_addr(message.as_bytes(), addr) {
            Ok(_) => {
                if let Some(status) = message.lines().find_map(|l| l.strip_prefix("STATUS=")) {
                    self.last_status = Some(status.to_string());
                }
            }
            Err(e) => log::warn!(
                "cannot notify systemd ({}), ignoring: {e}",
                message.lines().next().unwrap_or("")
            ),
        }
    }

    /// The last `STATUS=` value systemd received from us, whoever in the master sent it.
    pub fn last_status(&self) -> Option<&str> {
        self.last_status.as_deref()
    }
}

/// CLOCK_MONOTONIC in microseconds, for `MONOTONIC_USEC=`.
pub fn monotonic_usec() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .unwrap_or(nix::sys::time::TimeSpec::new(0, 0));
    ts.tv_sec() as u64 * 1_000_000 + ts.tv_nsec() as u64 / 1_000
}

/// Largest datagram read from a worker; longer ones are truncated (and ignored).
pub const MAX_MESSAGE: usize = 4096;

/// Most descriptors taken from one message (a barrier passes one). The kernel closes those
/// that do not fit in the control buffer, so a message with more leaks nothing either.
pub const MAX_FDS: usize = 16;

/// One message from a worker (or anyone) on plumule's notify socket.
#[derive(Debug)]
pub struct Notification {
    /// The sender's pid, from SCM_CREDENTIALS.
    pub pid: i32,
    /// The datagram, lossily UTF-8.
    pub text: String,
    /// Descriptors passed with it; closed when the notification is dropped.
    pub fds: Vec<OwnedFd>,
}

impl Notification {
    /// A `BARRIER=1` message: its descriptor must stay open until every message read before
    /// it has been handled, then be closed (by dropping the notification).
    pub fn is_barrier(&self) -> bool {
        self.text.lines().any(|l| l == "BARRIER=1")
    }
}

/// plumule's notify socket for workers.
pub struct NotifySocket {
    socket: UnixDatagram,
    path: PathBuf,
}

impl NotifySocket {
    pub fn bind(path: &Path) -> io::Result<NotifySocket> {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let socket = UnixDatagram::bind(path)?;
        socket.set_nonblocking(true)?;
        setsockopt(&socket, PassCred, &true)?;
        // Workers may run as other users: anyone may send, and the sender's pid decides
        // whether a message is heeded.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
        Ok(NotifySocket {
            socket,
            path: path.to_path_buf(),
        })
    }

    pub fn fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }

    /// The next message, its sender's pid and the descriptors passed with it; `None` when
    /// nothing is waiting. Messages without credentials or longer than [`MAX_MESSAGE`] are
    /// skipped (their descriptors closed).
    pub fn recv(&self) -> Option<Notification> {
        loop {
            let mut buf = [0u8; MAX_MESSAGE];
            let mut cmsg = nix::cmsg_space!(libc::ucred, [RawFd; MAX_FDS]);
            let mut iov = [IoSliceMut::new(&mut buf)];
            let msg = match recvmsg::<UnixAddr>(
                self.fd(),
                &mut iov,
                Some(&mut cmsg),
                // CLOEXEC: a descriptor held while the master forks must not reach a worker.
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_TRUNC | MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(m) => m,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return None,
            };
            let len = msg.bytes;
            let mut pid = None;
            let mut fds = Vec::new();
            if let Ok(cmsgs) = msg.cmsgs() {
                for c in cmsgs {
                    match c {
                        ControlMessageOwned::ScmCredentials(cred) => pid = Some(cred.pid()),
                        ControlMessageOwned::ScmRights(received) => {
                            fds.extend(received.into_iter().map(|fd| {
                                // SAFETY: the kernel has just installed `fd` in this process
                                // for this message; nothing else knows it, so it is owned here
                                // alone and closed once.
                                unsafe { OwnedFd::from_raw_fd(fd) }
                            }))
                        }
                        _ => {}
                    }
                }
            }
            if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
                log::debug!("notify socket: a message carried more descriptors than it may");
            }
            if len > MAX_MESSAGE {
                log::debug!("notify socket: ignoring a {len}-byte message");
                continue;
            }
            let Some(pid) = pid else { continue };
            return Some(Notification {
                pid,
                text: String::from_utf8_lossy(&buf[..len]).into_owned(),
                fds,
            });
        }
    }

    pub fn close(self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_messages_carry_the_sender_pid() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let sock = NotifySocket::bind(&path).unwrap();
        assert!(sock.recv().is_none());
        let client = UnixDatagram::unbound().unwrap();
        client
            .send_to(b"READY=1\nSTATUS=warming up", &path)
            .unwrap();
        let n = sock.recv().unwrap();
        assert_eq!(n.pid, std::process::id() as i32);
        assert_eq!(n.text, "READY=1\nSTATUS=warming up");
        assert!(n.fds.is_empty() && !n.is_barrier());
    }

    #[test]
    fn notifier_reaches_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("systemd.sock");
        let listener = UnixDatagram::bind(&path).unwrap();
        let mut notifier = Notifier {
            socket: Some((
                UnixDatagram::unbound().unwrap(),
                SocketAddr::from_pathname(&path).unwrap(),
            )),
            last_status: None,
        };
        notifier.send("READY=1");
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        assert_eq!(notifier.last_status(), None);
        notifier.send("READY=1\nSTATUS=reload refused");
        notifier.send("WATCHDOG=1");
        assert_eq!(notifier.last_status(), Some("reload refused"));
    }
}
