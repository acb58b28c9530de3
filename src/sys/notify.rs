//! The sd_notify protocol, both ways: the master's messages to systemd (`$NOTIFY_SOCKET`,
//! a path or an abstract `@name`), and plumule's own datagram socket on which workers send
//! theirs, with SO_PASSCRED so that every message names the pid that sent it.

use std::io::{self, IoSliceMut};
use std::os::fd::{AsRawFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::{Path, PathBuf};

use nix::sys::socket::{
    recvmsg, setsockopt, sockopt::PassCred, ControlMessageOwned, MsgFlags, UnixAddr,
};

/// The master's link to systemd; does nothing when `$NOTIFY_SOCKET` was not set.
pub struct Notifier {
    socket: Option<(UnixDatagram, SocketAddr)>,
}

impl Notifier {
    /// Reads `$NOTIFY_SOCKET` once; the variable is never passed on to workers.
    pub fn from_env() -> Notifier {
        let Some(value) = std::env::var_os("NOTIFY_SOCKET") else {
            return Notifier { socket: None };
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
        Notifier { socket }
    }

    pub fn enabled(&self) -> bool {
        self.socket.is_some()
    }

    /// Sends one datagram of `KEY=VALUE` lines. A failure is logged, never fatal.
    pub fn send(&self, message: &str) {
        let Some((socket, addr)) = &self.socket else {
            return;
        };
        if let Err(e) = socket.send_to_addr(message.as_bytes(), addr) {
            log::warn!(
                "cannot notify systemd ({}), ignoring: {e}",
                message.lines().next().unwrap_or("")
            );
        }
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

    /// The next message and its sender's pid; `None` when nothing is waiting.
    pub fn recv(&self) -> Option<(i32, String)> {
        loop {
            let mut buf = [0u8; MAX_MESSAGE];
            let mut cmsg = nix::cmsg_space!(libc::ucred);
            let mut iov = [IoSliceMut::new(&mut buf)];
            let msg = match recvmsg::<UnixAddr>(
                self.fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_TRUNC,
            ) {
                Ok(m) => m,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return None,
            };
            let len = msg.bytes;
            let mut pid = None;
            if let Ok(cmsgs) = msg.cmsgs() {
                for c in cmsgs {
                    if let ControlMessageOwned::ScmCredentials(cred) = c {
                        pid = Some(cred.pid());
                    }
                }
            }
            if len > MAX_MESSAGE {
                log::debug!("notify socket: ignoring a {len}-byte message");
                continue;
            }
            let Some(pid) = pid else { continue };
            return Some((pid, String::from_utf8_lossy(&buf[..len]).into_owned()));
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
        let (pid, text) = sock.recv().unwrap();
        assert_eq!(pid, std::process::id() as i32);
        assert_eq!(text, "READY=1\nSTATUS=warming up");
    }

    #[test]
    fn notifier_reaches_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("systemd.sock");
        let listener = UnixDatagram::bind(&path).unwrap();
        let notifier = Notifier {
            socket: Some((
                UnixDatagram::unbound().unwrap(),
                SocketAddr::from_pathname(&path).unwrap(),
            )),
        };
        notifier.send("READY=1");
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
    }
}
