//! The syncer: a small process the master forks so that fdatasync(2) never runs in the event
//! loop.
//!
//! Why: fdatasync of a queue segment takes milliseconds, on a busy disk seconds, and the
//! master must keep restarting workers within a couple of milliseconds meanwhile. The master
//! has no threads, so the wait happens in another process. fdatasync of any descriptor of a
//! file covers every write made to that file before the call, by any process; so the syncer
//! holds its own descriptor of each segment (the master hands it over once, SCM_RIGHTS) and,
//! told "sync descriptor T up to offset N" after the master wrote up to N, calls fdatasync and
//! answers "synced T N" (or "failed T N errno").
//!
//! The master's end is non-blocking and never waits: [`Syncer::fd`] goes into the master's
//! epoll; requests are single small messages, queued in memory (bounded, [`MAX_QUEUED`]) when
//! the socket is full, and sent when it is writable again ([`Syncer::wants_write`],
//! [`Syncer::send_queued`]); [`Syncer::replies`] reads the answers that have come.
//!
//! The handle remembers what the process must hold: a duplicate of every descriptor handed
//! over (until [`Syncer::close`]) and every sync asked and not answered yet. When the syncer
//! dies (the master reaps [`Syncer::pid`] among its children), [`Syncer::restart`] forks a
//! new one and sends it all of that again, so callers' requests are answered as if nothing had
//! happened. Replies the dead process had already sent are kept, not lost.
//!
//! The process is set up like the fork server ([`super::forkserver`]): forked while the caller
//! is single-threaded, it keeps only its socket (and 0, 1, 2), dies with its parent
//! (parent-death signal SIGKILL; note that this is the death of the forking *thread*), ignores
//! the signals a terminal sends to the master's group, and ends when the master closes its end.
//!
//! # Wire format
//!
//! One Unix `SOCK_SEQPACKET` socket pair: every request and every reply is one message of
//! exactly 24 bytes, so message boundaries (and which message a descriptor came with) are the
//! kernel's business. Integers are little-endian.
//!
//! Request, master to syncer:
//!
//! ```text
//!   0..4    u32 op: 1 hold, 2 sync, 3 close
//!   4..8    u32 zero
//!   8..16   u64 tag T: the caller's name for one descriptor (never reused by one master)
//!   16..24  u64 offset N (sync: how far the file is written; zero for hold and close)
//! ```
//!
//! - `hold` carries exactly one descriptor (SCM_RIGHTS): the syncer keeps it as T, replacing
//!   any earlier T. Not answered.
//! - `sync`: fdatasync of T, then one reply. A T the syncer does not hold (its descriptor did
//!   not arrive, or was closed) is answered `failed` with EBADF.
//! - `close`: the syncer closes T. Not answered.
//!
//! Reply, syncer to master, one per `sync`, in the order of the requests:
//!
//! ```text
//!   0..4    u32 status: 0 synced, 1 failed
//!   4..8    u32 errno of the failed fdatasync (EIO, ENOSPC, EBADF, ...); zero when synced
//!   8..16   u64 tag T, as in the request
//!   16..24  u64 offset N, as in the request
//! ```
//!
//! A message of another length, or with an unknown op or status, is ignored by both ends
//! (descriptors that come with it are closed).

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::errno::Errno;
use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};
use nix::unistd::Pid;

/// Length of every request and reply.
pub const MESSAGE_LEN: usize = 24;
/// How many requests wait in memory for the socket at most; past this, requests are refused
/// (the caller then syncs by itself).
pub const MAX_QUEUED: usize = 4096;
/// The syncer's name in `ps` and /proc/PID/comm.
pub const NAME: &str = "plumule-syncer";

const OP_HOLD: u32 = 1;
const OP_SYNC: u32 = 2;
const OP_CLOSE: u32 = 3;
const STATUS_SYNCED: u32 = 0;
const STATUS_FAILED: u32 = 1;

/// The caller's name for one descriptor the syncer holds. Tags come from one counter per
/// master process, so a tag is never given twice, not even by a new [`Syncer`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(pub u64);

static NEXT_TAG: AtomicU64 = AtomicU64::new(1);

/// What the syncer answered to a `sync` request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reply {
    /// fdatasync of the descriptor succeeded: the file is durable up to `offset` (at least).
    Synced { tag: Tag, offset: u64 },
    /// fdatasync failed with `errno`.
    Failed { tag: Tag, offset: u64, errno: i32 },
}

impl Reply {
    pub fn tag(&self) -> Tag {
        match *self {
            Reply::Synced { tag, .. } | Reply::Failed { tag, .. } => tag,
        }
    }

    pub fn offset(&self) -> u64 {
        match *self {
            Reply::Synced { offset, .. } | Reply::Failed { offset, .. } => offset,
        }
    }

    /// The reply's 24 bytes (see the module docs).
    pub fn encode(&self) -> [u8; MESSAGE_LEN] {
        match *self {
            Reply::Synced { tag, offset } => message(STATUS_SYNCED, 0, tag.0, offset),
            Reply::Failed { tag, offset, errno } => {
                message(STATUS_FAILED, errno as u32, tag.0, offset)
            }
        }
    }

    /// A reply from its bytes; `None` for anything but a well-formed reply.
    pub fn decode(bytes: &[u8]) -> Option<Reply> {
        let (status, errno, tag, offset) = parse(bytes)?;
        let tag = Tag(tag);
        match status {
            STATUS_SYNCED if errno == 0 => Some(Reply::Synced { tag, offset }),
            STATUS_FAILED => Some(Reply::Failed {
                tag,
                offset,
                errno: errno as i32,
            }),
            _ => None,
        }
    }
}

/// A request as it waits to be sent.
#[derive(Debug)]
enum Request {
    Hold(Tag),
    Sync(Tag, u64),
    Close(Tag),
}

fn message(a: u32, b: u32, tag: u64, offset: u64) -> [u8; MESSAGE_LEN] {
    let mut m = [0u8; MESSAGE_LEN];
    m[0..4].copy_from_slice(&a.to_le_bytes());
    m[4..8].copy_from_slice(&b.to_le_bytes());
    m[8..16].copy_from_slice(&tag.to_le_bytes());
    m[16..24].copy_from_slice(&offset.to_le_bytes());
    m
}

fn parse(bytes: &[u8]) -> Option<(u32, u32, u64, u64)> {
    if bytes.len() != MESSAGE_LEN {
        return None;
    }
    let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    Some((u32_at(0), u32_at(4), u64_at(8), u64_at(16)))
}

/// The master's handle on its syncer process.
#[derive(Debug)]
pub struct Syncer {
    sock: OwnedFd,
    pid: Pid,
    /// Reaped by the caller already: its pid may belong to another process by now.
    reaped: bool,
    /// Our duplicate of every descriptor handed over and not closed, to hand it again to a
    /// new process after a restart.
    held: HashMap<Tag, OwnedFd>,
    /// Syncs asked and not answered, in the order asked.
    outstanding: Vec<(Tag, u64)>,
    /// Requests the socket had no room for.
    queue: VecDeque<Request>,
    /// Replies read from a process that died, handed out by the next [`Syncer::replies`].
    early: Vec<Reply>,
    /// The socket reached end of file or failed: the process is gone or going.
    gone: bool,
    syncs_requested: u64,
}

impl Syncer {
    /// Forks the syncer. Call it while the caller is single-threaded: the child runs plain Rust
    /// (it allocates) until it exits.
    pub fn start() -> io::Result<Syncer> {
        let (sock, pid) = fork_syncer()?;
        Ok(Syncer {
            sock,
            pid,
            reaped: false,
            held: HashMap::new(),
            outstanding: Vec::new(),
            queue: VecDeque::new(),
            early: Vec::new(),
            gone: false,
            syncs_requested: 0,
        })
    }

    /// Replaces a syncer that died and that the caller has reaped (nothing is sent to the old
    /// pid, which may be another process's by now): forks a new process and sends it every
    /// descriptor held and every sync not answered yet. Replies the old one had sent and the
    /// caller had not read are kept for the next [`Syncer::replies`]. The socket changes:
    /// register [`Syncer::fd`] again. On error this handle is unusable (drop it).
    pub fn restart(&mut self) -> io::Result<()> {
        // Whatever the old process answered before dying is true: keep it.
        let old = self.read_replies();
        self.early.extend(old);
        self.queue.clear();
        let (sock, pid) = fork_syncer()?;
        self.sock = sock;
        self.pid = pid;
        self.reaped = false;
        self.gone = false;
        let mut tags: Vec<Tag> = self.held.keys().copied().collect();
        tags.sort();
        for tag in tags {
            self.queue.push_back(Request::Hold(tag));
        }
        for &(tag, offset) in &self.outstanding {
            self.queue.push_back(Request::Sync(tag, offset));
        }
        self.send_queued();
        Ok(())
    }

    /// The syncer's pid (a child of the master, not a worker).
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// The master's end of the socket, to register for reading (replies) and, while
    /// [`Syncer::wants_write`], writing.
    pub fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// Whether requests wait for room in the socket: watch [`Syncer::fd`] for writing and call
    /// [`Syncer::send_queued`] when it is writable.
    pub fn wants_write(&self) -> bool {
        !self.queue.is_empty() && !self.gone
    }

    /// Whether the socket was found closed (the process died, or is dying): its descriptor
    /// stays readable until [`Syncer::restart`] or drop, so stop watching it until then. The
    /// death itself comes as the exit of [`Syncer::pid`].
    pub fn is_gone(&self) -> bool {
        self.gone
    }

    /// Lets go of a syncer the caller has reaped without replacing it: nothing is signalled
    /// or waited for at drop.
    pub fn reaped(mut self) {
        self.reaped = true;
    }

    /// Hands `file` (any descriptor of the file: read-only is enough) to the syncer and
    /// returns the tag to sync it by. The handle keeps a duplicate until [`Syncer::close`].
    pub fn hold(&mut self, file: &impl AsFd) -> io::Result<Tag> {
        if self.queue.len() >= MAX_QUEUED {
            return Err(backlog_full());
        }
        let dup = file.as_fd().try_clone_to_owned()?;
        let tag = Tag(NEXT_TAG.fetch_add(1, Ordering::Relaxed));
        self.held.insert(tag, dup);
        self.push(Request::Hold(tag));
        Ok(tag)
    }

    /// Whether the syncer holds (or has been sent) a descriptor for `tag`.
    pub fn holds(&self, tag: Tag) -> bool {
        self.held.contains_key(&tag)
    }

    /// Asks for fdatasync of `tag`'s file, after writing up to `offset`; the answer comes
    /// through [`Syncer::replies`]. Refused only when [`MAX_QUEUED`] requests already wait.
    pub fn sync(&mut self, tag: Tag, offset: u64) -> io::Result<()> {
        if self.queue.len() >= MAX_QUEUED {
            return Err(backlog_full());
        }
        self.outstanding.push((tag, offset));
        self.syncs_requested += 1;
        self.push(Request::Sync(tag, offset));
        Ok(())
    }

    /// Whether a sync of `tag` up to `offset` was asked and is not answered yet (false after a
    /// restart by another handle: the request is lost, ask again).
    pub fn awaits(&self, tag: Tag, offset: u64) -> bool {
        self.outstanding.contains(&(tag, offset))
    }

    /// Tells the syncer to close `tag`'s descriptor (a retired segment). Syncs of it asked
    /// before are still answered.
    pub fn close(&mut self, tag: Tag) {
        if self.held.remove(&tag).is_some() {
            // Never refused: a close is how the backlog's descriptors get freed.
            self.push(Request::Close(tag));
        }
    }

    /// How many syncs were asked of this handle in all.
    pub fn syncs_requested(&self) -> u64 {
        self.syncs_requested
    }

    /// Sends the requests that waited for room, as many as fit now.
    pub fn send_queued(&mut self) {
        while let Some(req) = self.queue.front() {
            match self.send(req) {
                Ok(()) => {
                    self.queue.pop_front();
                }
                // Full: later, when writable.
                Err(Errno::EAGAIN) => return,
                // Broken: the syncer died; what is held and outstanding goes to the next one
                // at restart.
                Err(_) => {
                    self.gone = true;
                    return;
                }
            }
        }
    }

    /// The replies that have come (never blocks); also sends what waited for room.
    pub fn replies(&mut self) -> Vec<Reply> {
        let mut got = std::mem::take(&mut self.early);
        got.extend(self.read_replies());
        self.send_queued();
        got
    }

    fn read_replies(&mut self) -> Vec<Reply> {
        let mut got = Vec::new();
        let mut buf = [0u8; MESSAGE_LEN + 1];
        loop {
            // SAFETY: `buf` is valid and writable for its whole length during the call.
            let n = unsafe {
                libc::recv(
                    self.sock.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                match Errno::last() {
                    Errno::EINTR => continue,
                    Errno::EAGAIN => {}
                    _ => self.gone = true,
                }
                break;
            }
            if n == 0 {
                self.gone = true;
                break;
            }
            if let Some(reply) = Reply::decode(&buf[..n as usize]) {
                let key = (reply.tag(), reply.offset());
                if let Some(i) = self.outstanding.iter().position(|o| *o == key) {
                    self.outstanding.remove(i);
                }
                got.push(reply);
            }
        }
        got
    }

    fn push(&mut self, req: Request) {
        if self.queue.is_empty() {
            match self.send(&req) {
                Ok(()) => return,
                Err(Errno::EAGAIN) => {}
                Err(_) => self.gone = true,
            }
        }
        self.queue.push_back(req);
    }

    fn send(&self, req: &Request) -> Result<(), Errno> {
        let fd = self.sock.as_raw_fd();
        let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
        loop {
            let res = match *req {
                Request::Hold(tag) => {
                    let Some(held) = self.held.get(&tag) else {
                        // Closed before it was sent: nothing to hand over.
                        return Ok(());
                    };
                    let m = message(OP_HOLD, 0, tag.0, 0);
                    let fds = [held.as_raw_fd()];
                    sendmsg::<()>(
                        fd,
                        &[io::IoSlice::new(&m)],
                        &[ControlMessage::ScmRights(&fds)],
                        flags,
                        None,
                    )
                }
                Request::Sync(tag, offset) => {
                    let m = message(OP_SYNC, 0, tag.0, offset);
                    sendmsg::<()>(fd, &[io::IoSlice::new(&m)], &[], flags, None)
                }
                Request::Close(tag) => {
                    let m = message(OP_CLOSE, 0, tag.0, 0);
                    sendmsg::<()>(fd, &[io::IoSlice::new(&m)], &[], flags, None)
                }
            };
            match res {
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e),
                // A seqpacket message goes whole or not at all.
                Ok(_) => return Ok(()),
            }
        }
    }
}

fn backlog_full() -> io::Error {
    io::Error::new(
        io::ErrorKind::WouldBlock,
        format!("{MAX_QUEUED} requests already wait for the syncer"),
    )
}

impl Drop for Syncer {
    /// The syncer holds nothing worth a graceful end (a sync it was doing completes in the
    /// kernel anyway): it is killed, then reaped here so that nothing is left.
    fn drop(&mut self) {
        if self.reaped {
            return;
        }
        let _ = nix::sys::signal::kill(self.pid, nix::sys::signal::Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(self.pid, None);
    }
}

/// Makes the socket pair and forks the process; returns the master's (non-blocking) end.
fn fork_syncer() -> io::Result<(OwnedFd, Pid)> {
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    let master = nix::unistd::getpid().as_raw();
    let their_fd = theirs.as_raw_fd();
    // SAFETY: the caller is single-threaded (see `Syncer::start`); the child only serves
    // requests over its own memory and exits without returning into the caller's frames.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: we are the freshly forked syncer.
        unsafe { become_syncer(master, their_fd) }
    }
    drop(theirs);
    super::set_nonblocking(ours.as_raw_fd())?;
    Ok((ours, Pid::from_raw(pid)))
}

/// The syncer's life, in the forked child: serve until the master closes its end.
///
/// # Safety
/// Only in a child just forked from a single-threaded process.
unsafe fn become_syncer(master: libc::pid_t, sock: RawFd) -> ! {
    // SAFETY: the caller's promise, passed on; what follows only serves requests over the
    // socket, in plain Rust, and exits without returning into the caller's frames.
    unsafe {
        let fd = super::become_helper(master, c"plumule-syncer", sock);
        let code = std::panic::catch_unwind(|| serve(OwnedFd::from_raw_fd(fd))).map_or(1, |()| 0);
        libc::_exit(code)
    }
}

/// Answers requests until end of file (blocking: this process has nothing else to do).
fn serve(sock: OwnedFd) {
    let mut held: HashMap<u64, OwnedFd> = HashMap::new();
    loop {
        let mut buf = [0u8; MESSAGE_LEN + 1];
        let mut cmsg = nix::cmsg_space!([RawFd; 4]);
        let (n, mut fds) = {
            let mut iov = [io::IoSliceMut::new(&mut buf)];
            match recvmsg::<()>(
                sock.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Err(Errno::EINTR) => continue,
                Err(_) => return,
                Ok(msg) => {
                    let mut fds = Vec::new();
                    if let Ok(cmsgs) = msg.cmsgs() {
                        for c in cmsgs {
                            if let ControlMessageOwned::ScmRights(list) = c {
                                // SAFETY: the kernel just installed these descriptors for us.
                                fds.extend(
                                    list.into_iter()
                                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                                );
                            }
                        }
                    }
                    (msg.bytes, fds)
                }
            }
        };
        if n == 0 {
            return;
        }
        let Some((op, _, tag, offset)) = parse(&buf[..n]) else {
            continue;
        };
        match op {
            OP_HOLD => {
                // A hold whose descriptor did not come (the kernel cut it off) forgets the
                // tag: its syncs fail with EBADF rather than sync something else.
                match (fds.len(), fds.pop()) {
                    (1, Some(fd)) => {
                        held.insert(tag, fd);
                    }
                    _ => {
                        held.remove(&tag);
                    }
                }
            }
            OP_SYNC => {
                let reply = match held.get(&tag) {
                    None => Reply::Failed {
                        tag: Tag(tag),
                        offset,
                        errno: libc::EBADF,
                    },
                    Some(fd) => match fdatasync(fd.as_raw_fd()) {
                        Ok(()) => Reply::Synced {
                            tag: Tag(tag),
                            offset,
                        },
                        Err(errno) => Reply::Failed {
                            tag: Tag(tag),
                            offset,
                            errno,
                        },
                    },
                };
                let m = reply.encode();
                loop {
                    // SAFETY: `m` is valid for its whole length during the call.
                    let r = unsafe {
                        libc::send(
                            sock.as_raw_fd(),
                            m.as_ptr().cast(),
                            m.len(),
                            libc::MSG_NOSIGNAL,
                        )
                    };
                    if r >= 0 {
                        break;
                    }
                    if Errno::last() != Errno::EINTR {
                        return;
                    }
                }
            }
            OP_CLOSE => {
                held.remove(&tag);
            }
            _ => {}
        }
    }
}

/// fdatasync(2); the errno on failure.
fn fdatasync(fd: RawFd) -> Result<(), i32> {
    loop {
        // SAFETY: fdatasync takes a descriptor, no pointers.
        if unsafe { libc::fdatasync(fd) } == 0 {
            return Ok(());
        }
        let e = Errno::last();
        if e != Errno::EINTR {
            return Err(e as i32);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_decode_to_what_was_encoded_and_nothing_else() {
        let replies = [
            Reply::Synced {
                tag: Tag(7),
                offset: 1 << 40,
            },
            Reply::Failed {
                tag: Tag(u64::MAX),
                offset: 24,
                errno: libc::ENOSPC,
            },
        ];
        for r in replies {
            assert_eq!(Reply::decode(&r.encode()), Some(r));
        }
        // Byte by byte, as the module docs lay it out.
        let bytes = Reply::Failed {
            tag: Tag(0x0102),
            offset: 0x0304,
            errno: 5,
        }
        .encode();
        assert_eq!(
            bytes,
            [1, 0, 0, 0, 5, 0, 0, 0, 2, 1, 0, 0, 0, 0, 0, 0, 4, 3, 0, 0, 0, 0, 0, 0]
        );
        let good = replies[0].encode();
        assert_eq!(Reply::decode(&good[..23]), None);
        let mut longer = good.to_vec();
        longer.push(0);
        assert_eq!(Reply::decode(&longer), None);
        let mut unknown = good;
        unknown[0] = 2;
        assert_eq!(Reply::decode(&unknown), None);
        let mut synced_with_errno = good;
        synced_with_errno[4] = 1;
        assert_eq!(Reply::decode(&synced_with_errno), None);
    }

    #[test]
    fn requests_are_laid_out_as_documented() {
        assert_eq!(
            message(OP_SYNC, 0, 3, 0x1_0000_0000),
            [2, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]
        );
        assert_eq!(parse(&message(OP_HOLD, 0, 9, 0)), Some((OP_HOLD, 0, 9, 0)));
    }
}
