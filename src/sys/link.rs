//! A link between the master and one of its network helper processes (the Redis queue
//! helper, the etcd cluster helper): typed messages, one JSON value per frame, over a Unix
//! stream socket pair.
//!
//! Why a process: the master is single-threaded and must never block on a network peer, and
//! client libraries for Redis or etcd block. The helper is forked from the master (while the
//! master has no thread), set up like the other helpers (`super::become_helper`: it dies with
//! the master, keeps no descriptor of the master's but its socket), and ends when the master
//! closes its end. What the helper knows (a Redis password, say) it inherits in memory, never
//! through its argv or environment.
//!
//! # Framing
//!
//! Each message is a frame: a 4-byte little-endian length N (at most [`MAX_FRAME`]), then N
//! bytes of UTF-8 JSON, the message's serde form. A frame longer than that, or whose JSON does
//! not decode into the expected type, ends the link ([`LinkError::Corrupt`]): the owner then
//! treats the helper as dead and starts another.
//!
//! # The two ends
//!
//! - [`Link`], the master's end, never blocks: [`Link::send`] appends to an outgoing buffer
//!   and writes what the socket takes; the owner watches [`Link::fd`] for POLLOUT while
//!   [`Link::wants_write`] and calls [`Link::flush`]; on POLLIN it calls [`Link::receive`],
//!   which reads what is there and returns the complete messages.
//! - [`Peer`], the helper's end, blocks: [`Peer::receive`] waits for the next message (`None`
//!   when the master closed its end), [`Peer::send`] writes one whole frame. A helper that
//!   must wait on its network and on the master at once reads the master in a thread of its
//!   own ([`Peer::try_clone`]); helpers may run threads, the master may not.

use std::io::{self, Read, Write};
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::unistd::Pid;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// The longest frame either end accepts: 64 MiB.
pub const MAX_FRAME: usize = 64 << 20;

/// How a link ended.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The other end closed (the helper exited, or the master did).
    #[error("the helper closed its link")]
    Closed,
    /// A frame too long, or one that is not the JSON of the expected message.
    #[error("the helper sent a bad frame: {0}")]
    Corrupt(String),
    /// The socket itself failed.
    #[error("the link to the helper failed: {0}")]
    Io(#[from] io::Error),
}

/// The master's end of a link: non-blocking, `S` sent, `R` received.
pub struct Link<S, R> {
    sock: UnixStream,
    pid: Pid,
    out: Vec<u8>,
    /// How much of `out` is written already.
    sent: usize,
    inbuf: Vec<u8>,
    _types: PhantomData<fn(S) -> R>,
}

impl<S: Serialize, R: DeserializeOwned> Link<S, R> {
    /// Forks a helper named `name` (its `ps` name, at most 15 bytes) that runs `body` with its
    /// end of the link, then exits with the code `body` returns.
    ///
    /// Must be called while the process has a single thread (the master always has). The child
    /// runs `body` in the memory it inherited: `body` must not return into the caller's frames
    /// (it does not: the child exits right after) and must not touch descriptors it did not
    /// open itself (they are closed).
    pub fn spawn<F>(name: &std::ffi::CStr, body: F) -> io::Result<Link<S, R>>
    where
        F: FnOnce(Peer<R, S>) -> i32,
    {
        let (ours, theirs) = UnixStream::pair()?;
        let master = nix::unistd::getpid().as_raw();
        // SAFETY: the caller is single-threaded (this function's contract); the child sets
        // itself up with `become_helper`, runs `body` and exits without returning.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        if pid == 0 {
            drop(ours);
            // SAFETY: we are the freshly forked child of a single-threaded process.
            let fd = unsafe { super::become_helper(master, name, theirs.as_raw_fd()) };
            std::mem::forget(theirs);
            // SAFETY: `become_helper` moved the socket to `fd`, which nothing else owns.
            let sock = unsafe { UnixStream::from(OwnedFd::from_raw_fd(fd)) };
            let code =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(Peer::new(sock))))
                    .unwrap_or(1);
            // SAFETY: ends the child without running the parent's exit handlers.
            unsafe { libc::_exit(code) }
        }
        drop(theirs);
        ours.set_nonblocking(true)?;
        Ok(Link::from_parts(ours, Pid::from_raw(pid)))
    }

    /// A link over a socket already made (tests; a helper started some other way).
    pub fn from_parts(sock: UnixStream, pid: Pid) -> Link<S, R> {
        Link {
            sock,
            pid,
            out: Vec::new(),
            sent: 0,
            inbuf: Vec::new(),
            _types: PhantomData,
        }
    }

    /// The helper's process id (the master reaps it among its children).
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// The descriptor to watch: POLLIN always, POLLOUT while [`Link::wants_write`].
    pub fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// Queues `msg` and writes what the socket takes now. An error means the link is dead
    /// (the owner will also see it on its next receive).
    pub fn send(&mut self, msg: &S) -> Result<(), LinkError> {
        let start = self.out.len();
        self.out.extend_from_slice(&[0; 4]);
        serde_json::to_writer(&mut self.out, msg)
            .map_err(|e| LinkError::Corrupt(format!("cannot encode a message: {e}")))?;
        let len = self.out.len() - start - 4;
        if len > MAX_FRAME {
            self.out.truncate(start);
            return Err(LinkError::Corrupt(format!(
                "a message of {len} bytes is over the {MAX_FRAME}-byte limit"
            )));
        }
        self.out[start..start + 4].copy_from_slice(&(len as u32).to_le_bytes());
        self.flush()
    }

    /// Whether bytes wait for the socket (watch POLLOUT).
    pub fn wants_write(&self) -> bool {
        self.sent < self.out.len()
    }

    /// How many bytes wait for the socket.
    pub fn backlog(&self) -> usize {
        self.out.len() - self.sent
    }

    /// Writes what waits, as far as the socket takes it.
    pub fn flush(&mut self) -> Result<(), LinkError> {
        while self.sent < self.out.len() {
            match self.sock.write(&self.out[self.sent..]) {
                Ok(0) => return Err(LinkError::Closed),
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Err(LinkError::Closed),
                Err(e) => return Err(e.into()),
            }
        }
        if self.sent == self.out.len() {
            self.out.clear();
            self.sent = 0;
        } else if self.sent > 1 << 20 {
            self.out.drain(..self.sent);
            self.sent = 0;
        }
        Ok(())
    }

    /// Reads what the socket has and returns every complete message, in order. `Err` ends
    /// the link; messages decoded before the end are returned first (the next call gives the
    /// error).
    pub fn receive(&mut self) -> Result<Vec<R>, LinkError> {
        let mut eof = false;
        let mut chunk = [0u8; 64 * 1024];
        loop {
            match self.sock.read(&mut chunk) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => {
                    self.inbuf.extend_from_slice(&chunk[..n]);
                    if n < chunk.len() {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        let mut msgs = Vec::new();
        let mut at = 0;
        while let Some(frame) = frame_at(&self.inbuf[at..])? {
            msgs.push(decode(&self.inbuf[at + 4..at + 4 + frame])?);
            at += 4 + frame;
        }
        self.inbuf.drain(..at);
        if msgs.is_empty() && eof {
            return Err(LinkError::Closed);
        }
        Ok(msgs)
    }
}

/// The length of the frame at the start of `buf`, if it is all there.
fn frame_at(buf: &[u8]) -> Result<Option<usize>, LinkError> {
    let Some(head) = buf.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_le_bytes(head.try_into().expect("4 bytes")) as usize;
    if len > MAX_FRAME {
        return Err(LinkError::Corrupt(format!(
            "a frame of {len} bytes is over the {MAX_FRAME}-byte limit"
        )));
    }
    Ok((buf.len() >= 4 + len).then_some(len))
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, LinkError> {
    serde_json::from_slice(bytes).map_err(|e| LinkError::Corrupt(e.to_string()))
}

/// The helper's end of a link: blocking, `S` sent, `R` received.
pub struct Peer<S, R> {
    sock: UnixStream,
    _types: PhantomData<fn(S) -> R>,
}

impl<S, R> Peer<S, R> {
    /// Wraps the helper's socket.
    pub fn new(sock: UnixStream) -> Peer<S, R> {
        Peer {
            sock,
            _types: PhantomData,
        }
    }

    /// A second handle on the same socket (one thread reads, another writes).
    pub fn try_clone(&self) -> io::Result<Peer<S, R>> {
        Ok(Peer::new(self.sock.try_clone()?))
    }
}

impl<S: Serialize, R: DeserializeOwned> Peer<S, R> {
    /// Waits for the next message; `Ok(None)` when the master closed its end.
    pub fn receive(&mut self) -> Result<Option<R>, LinkError> {
        let mut head = [0u8; 4];
        match self.sock.read_exact(&mut head) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let len = u32::from_le_bytes(head) as usize;
        if len > MAX_FRAME {
            return Err(LinkError::Corrupt(format!(
                "a frame of {len} bytes is over the {MAX_FRAME}-byte limit"
            )));
        }
        let mut body = vec![0; len];
        self.sock.read_exact(&mut body)?;
        decode(&body).map(Some)
    }

    /// Writes one whole message.
    pub fn send(&mut self, msg: &S) -> Result<(), LinkError> {
        let mut frame = vec![0; 4];
        serde_json::to_writer(&mut frame, msg)
            .map_err(|e| LinkError::Corrupt(format!("cannot encode a message: {e}")))?;
        let len = frame.len() - 4;
        if len > MAX_FRAME {
            return Err(LinkError::Corrupt(format!(
                "a message of {len} bytes is over the {MAX_FRAME}-byte limit"
            )));
        }
        frame[..4].copy_from_slice(&(len as u32).to_le_bytes());
        self.sock.write_all(&frame).map_err(|e| {
            if e.kind() == io::ErrorKind::BrokenPipe {
                LinkError::Closed
            } else {
                e.into()
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    enum Msg {
        Ping(u64),
        Blob(String),
    }

    fn pair() -> (Link<Msg, Msg>, Peer<Msg, Msg>) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        (Link::from_parts(a, Pid::from_raw(0)), Peer::new(b))
    }

    #[test]
    fn messages_cross_both_ways_in_order() {
        let (mut link, mut peer) = pair();
        link.send(&Msg::Ping(1)).unwrap();
        link.send(&Msg::Blob("two".into())).unwrap();
        assert_eq!(peer.receive().unwrap(), Some(Msg::Ping(1)));
        assert_eq!(peer.receive().unwrap(), Some(Msg::Blob("two".into())));
        peer.send(&Msg::Ping(3)).unwrap();
        peer.send(&Msg::Ping(4)).unwrap();
        let mut got = Vec::new();
        while got.len() < 2 {
            got.extend(link.receive().unwrap());
        }
        assert_eq!(got, vec![Msg::Ping(3), Msg::Ping(4)]);
        drop(peer);
        assert!(matches!(link.receive(), Err(LinkError::Closed)));
    }

    #[test]
    fn a_message_larger_than_the_socket_buffer_waits_for_pollout() {
        let (mut link, mut peer) = pair();
        let big = "x".repeat(4 << 20);
        link.send(&Msg::Blob(big.clone())).unwrap();
        assert!(
            link.wants_write(),
            "4 MiB cannot fit a socket buffer at once"
        );
        let reader = std::thread::spawn(move || peer.receive().unwrap());
        while link.wants_write() {
            let mut fds = [nix::poll::PollFd::new(
                std::os::fd::AsFd::as_fd(&link.sock),
                nix::poll::PollFlags::POLLOUT,
            )];
            nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(5000u16)).unwrap();
            link.flush().unwrap();
        }
        assert_eq!(reader.join().unwrap(), Some(Msg::Blob(big)));
    }

    #[test]
    fn an_oversized_or_garbled_frame_ends_the_link() {
        let (mut link, peer) = pair();
        let mut raw = peer.sock.try_clone().unwrap();
        raw.write_all(&((MAX_FRAME as u32) + 1).to_le_bytes())
            .unwrap();
        assert!(matches!(link.receive(), Err(LinkError::Corrupt(_))));

        let (mut link, peer) = pair();
        let mut raw = peer.sock.try_clone().unwrap();
        raw.write_all(&3u32.to_le_bytes()).unwrap();
        raw.write_all(b"{{{").unwrap();
        assert!(matches!(link.receive(), Err(LinkError::Corrupt(_))));
    }

    #[test]
    fn a_spawned_helper_answers_and_ends_when_the_master_closes() {
        let mut link: Link<Msg, Msg> = Link::spawn(c"plumule-test", |mut peer: Peer<Msg, Msg>| {
            while let Ok(Some(Msg::Ping(n))) = peer.receive() {
                if peer.send(&Msg::Ping(n + 1)).is_err() {
                    return 2;
                }
            }
            7
        })
        .unwrap();
        link.send(&Msg::Ping(41)).unwrap();
        let mut got = Vec::new();
        while got.is_empty() {
            let mut fds = [nix::poll::PollFd::new(
                std::os::fd::AsFd::as_fd(&link.sock),
                nix::poll::PollFlags::POLLIN,
            )];
            nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(5000u16)).unwrap();
            got = link.receive().unwrap();
        }
        assert_eq!(got, vec![Msg::Ping(42)]);
        let pid = link.pid();
        drop(link);
        let status = nix::sys::wait::waitpid(pid, None).unwrap();
        assert_eq!(status, nix::sys::wait::WaitStatus::Exited(pid, 7));
    }
}
