//! The fork server: a small process the master forks once, before any worker, that forks the
//! workers for it.
//!
//! Why: fork(2) copies the caller's descriptor table and the child must close every entry
//! again (at close_range or exec). The master holds a pipe or two per worker, so forking from
//! it costs more with every worker it has (at 2000 workers the kernel's `dup_fd` and
//! `filp_close` led the profile of a restart). The server holds three descriptors whatever
//! the fleet. It starts each worker with `clone(CLONE_PARENT)`: the worker is the master's
//! child, exactly as if the master had forked it (SIGCHLD, waitid, the parent-death signal
//! and the master's subreaper role are unchanged).
//!
//! Protocol, on a Unix stream socket pair: the master sends a request (an 8-byte header,
//! `u32` payload length and `u32` descriptor count, little endian, with the descriptors as
//! SCM_RIGHTS: status pipe, stdin, stdout, stderr, then `pass_fds`), then the payload (the
//! set-up and exec body, see [`encode`]); the server answers one `i32`: the child's pid, or a
//! negative errno. The server ends when the master closes its end, and dies with the master
//! (parent-death signal SIGKILL).

use std::ffi::CString;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use nix::unistd::Pid;

use super::spawn::{
    start, Body, Child, Credentials, LockRequest, Parent, ResourceLimit, Setup, SpawnError,
};

/// The most descriptors one request carries (the kernel's SCM_MAX_FD).
const MAX_FDS: usize = 253;
/// The largest payload accepted: argv and environment are bounded by ARG_MAX well below this.
const MAX_PAYLOAD: usize = 64 * 1024 * 1024;
/// How long the master waits for the server to take a request and answer it.
const PATIENCE: Duration = Duration::from_secs(2);

/// The master's handle on its fork server.
#[derive(Debug)]
pub struct ForkServer {
    sock: UnixStream,
    pid: Pid,
    /// Reaped by the caller already: its pid may belong to another process by now.
    reaped: bool,
}

impl ForkServer {
    /// Forks the server. Call it while the caller is single-threaded and before the
    /// descriptors the server must not hold are many: it closes all but its socket anyway.
    pub fn start() -> io::Result<ForkServer> {
        let (ours, theirs) = UnixStream::pair()?;
        let master = nix::unistd::getpid().as_raw();
        let their_fd = theirs.as_raw_fd();
        // SAFETY: the caller is single-threaded; the child only serves requests (plain Rust
        // over its own memory) and exits without returning into the caller's frames.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        if pid == 0 {
            // SAFETY: we are the freshly forked server.
            unsafe { become_server(master, their_fd) }
        }
        drop(theirs);
        ours.set_read_timeout(Some(PATIENCE))?;
        ours.set_write_timeout(Some(PATIENCE))?;
        Ok(ForkServer {
            sock: ours,
            pid: Pid::from_raw(pid),
            reaped: false,
        })
    }

    /// The server's pid (a child of the master, not a worker).
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// Lets go of a server the caller has reaped (it died): nothing is signalled or waited
    /// for, since its pid may have been given to another process since.
    pub fn reaped(mut self) {
        self.reaped = true;
    }

    /// Starts a child that runs `setup` then the exec `body`, as [`super::spawn::spawn`]
    /// does, but forked by the server. `Body::Call` cannot cross processes: it is refused.
    pub fn spawn(&mut self, setup: &Setup, body: &Body<'_>) -> Result<Child, SpawnError> {
        let failed = |source: io::Error| SpawnError::Fork {
            what: body.describe(),
            source,
        };
        let payload = encode(setup, body).ok_or_else(|| {
            failed(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a function body cannot be started by the fork server",
            ))
        })?;
        let (status_r, status_w) = super::pipe(true).map_err(|source| SpawnError::StatusPipe {
            what: body.describe(),
            source,
        })?;
        let mut fds = vec![
            status_w.as_raw_fd(),
            setup.stdin,
            setup.stdout,
            setup.stderr,
        ];
        fds.extend(&setup.pass_fds);
        if fds.len() > MAX_FDS {
            return Err(failed(io::Error::new(
                io::ErrorKind::InvalidInput,
                "too many descriptors for one request",
            )));
        }
        let mut header = [0u8; 8];
        header[..4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        header[4..].copy_from_slice(&(fds.len() as u32).to_le_bytes());
        self.send(&header, &fds, &payload).map_err(failed)?;
        drop(status_w);
        let mut answer = [0u8; 4];
        self.sock.read_exact(&mut answer).map_err(failed)?;
        let pid = i32::from_le_bytes(answer);
        if pid <= 0 {
            return Err(SpawnError::ServerFork {
                what: body.describe(),
                source: io::Error::from_raw_os_error(-pid),
            });
        }
        Ok(Child {
            pid: Pid::from_raw(pid),
            status: status_r,
        })
    }

    fn send(&mut self, header: &[u8], fds: &[RawFd], payload: &[u8]) -> io::Result<()> {
        let iov = [io::IoSlice::new(header)];
        let cmsg = [ControlMessage::ScmRights(fds)];
        let sent = loop {
            match sendmsg::<()>(self.sock.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None) {
                Err(nix::errno::Errno::EINTR) => continue,
                other => break other?,
            }
        };
        self.sock.write_all(&header[sent..])?;
        self.sock.write_all(payload)
    }
}

/// The server's name in `ps` and /proc/PID/comm (15 bytes at most).
pub const NAME: &str = "plumule-spawner";

impl Drop for ForkServer {
    /// The server holds nothing worth a graceful end, and a stopped one must not hold the
    /// master up: it is killed, then reaped here so that nothing is left.
    fn drop(&mut self) {
        if self.reaped {
            return;
        }
        let _ = nix::sys::signal::kill(self.pid, nix::sys::signal::Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(self.pid, None);
    }
}

/// The server's life, in the forked child: serve until the master closes its end.
///
/// # Safety
/// Only in a child just forked from a single-threaded process.
unsafe fn become_server(master: libc::pid_t, sock: RawFd) -> ! {
    // SAFETY: the caller's promise, passed on; what follows only serves requests over the
    // socket, in plain Rust, and exits without returning into the caller's frames.
    unsafe {
        let fd = super::become_helper(master, c"plumule-spawner", sock);
        let code =
            std::panic::catch_unwind(|| serve(OwnedFd::from_raw_fd(fd), master)).map_or(1, |()| 0);
        libc::_exit(code)
    }
}

/// Answers requests until end of file.
fn serve(sock: OwnedFd, master: libc::pid_t) {
    let mut stream = UnixStream::from(sock);
    loop {
        let (header, fds) = match receive_header(&stream) {
            Ok(Some(h)) => h,
            Ok(None) | Err(_) => return,
        };
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let nfds = u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as usize;
        if len > MAX_PAYLOAD {
            return;
        }
        let mut payload = vec![0u8; len];
        if stream.read_exact(&mut payload).is_err() {
            return;
        }
        let answer = if fds.len() != nfds || nfds < 4 {
            -libc::EPROTO
        } else {
            let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
            match decode(&payload, &raw) {
                Some((setup, mut body)) => {
                    match start(&setup, &mut body, raw[0], master, Parent::Mine) {
                        Ok(pid) => pid.as_raw(),
                        Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
                    }
                }
                None => -libc::EPROTO,
            }
        };
        // The child has its copies; ours close here.
        drop(fds);
        if stream.write_all(&answer.to_le_bytes()).is_err() {
            return;
        }
    }
}

/// Reads the 8-byte header and the descriptors that come with it; `None` at end of file.
fn receive_header(stream: &UnixStream) -> io::Result<Option<([u8; 8], Vec<OwnedFd>)>> {
    let mut header = [0u8; 8];
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
    let (got, fds) = loop {
        let mut iov = [io::IoSliceMut::new(&mut header)];
        match recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
            Ok(msg) => {
                let mut fds = Vec::new();
                for c in msg.cmsgs()? {
                    if let ControlMessageOwned::ScmRights(list) = c {
                        // SAFETY: the kernel just installed these descriptors for us.
                        fds.extend(
                            list.into_iter()
                                .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                        );
                    }
                }
                break (msg.bytes, fds);
            }
        }
    };
    if got == 0 {
        return Ok(None);
    }
    (&*stream).read_exact(&mut header[got..])?;
    Ok(Some((header, fds)))
}

// ---------------------------------------------------------------------------------------
// The payload: every field of the set-up and the exec body, in order. Integers are little
// endian; `bytes` is a u32 length then the bytes; `opt` is a u8 (0 absent, 1 present) then
// the value; `list` is a u32 count then the items.
//
//   opt bytes cwd · opt u32 umask · opt (u32 uid, u32 gid, list u32 groups) credentials ·
//   opt (u64 cur, u64 max) nofile · list (u32 resource, u64 cur, u64 max) limits ·
//   opt i32 nice · opt i32 oom_score_adj · u32 lock_mode · list (bytes path, u8 shared) locks ·
//   bytes path · list bytes argv · list bytes envp · list u32 pid_vars
//
// The descriptors travel beside it (see the module docs); `pass_fds` is their count past 4.

struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Option<u64> {
        let b = self.take(8)?;
        Some(u64::from_le_bytes(b.try_into().ok()?))
    }
    fn bytes(&mut self) -> Option<Vec<u8>> {
        let n = self.u32()? as usize;
        self.take(n).map(<[u8]>::to_vec)
    }
    fn cstring(&mut self) -> Option<CString> {
        CString::new(self.bytes()?).ok()
    }
    fn flag(&mut self) -> Option<bool> {
        match self.u8()? {
            0 => Some(false),
            1 => Some(true),
            _ => None,
        }
    }
    /// A count of items, each at least `min` bytes: a count the rest cannot hold is refused
    /// before anything is allocated for it.
    fn count(&mut self, min: usize) -> Option<usize> {
        let n = self.u32()? as usize;
        (n.checked_mul(min)? <= self.0.len()).then_some(n)
    }
}

/// The payload for `setup` and `body`; `None` for a function body, which cannot cross, and
/// for a gated set-up (cluster locks: the master forks those workers itself).
pub fn encode(setup: &Setup, body: &Body<'_>) -> Option<Vec<u8>> {
    if setup.gate.is_some() {
        return None;
    }
    let Body::Exec {
        path,
        argv,
        envp,
        pid_vars,
    } = body
    else {
        return None;
    };
    let mut w = Writer(Vec::with_capacity(1024));
    match &setup.cwd {
        Some(c) => {
            w.u8(1);
            w.bytes(c.as_bytes());
        }
        None => w.u8(0),
    }
    match setup.umask {
        Some(m) => {
            w.u8(1);
            w.u32(m);
        }
        None => w.u8(0),
    }
    match &setup.credentials {
        Some(c) => {
            w.u8(1);
            w.u32(c.uid);
            w.u32(c.gid);
            w.u32(c.groups.len() as u32);
            for &g in &c.groups {
                w.u32(g);
            }
        }
        None => w.u8(0),
    }
    match &setup.nofile {
        Some(l) => {
            w.u8(1);
            w.u64(l.rlim_cur);
            w.u64(l.rlim_max);
        }
        None => w.u8(0),
    }
    w.u32(setup.limits.len() as u32);
    for l in &setup.limits {
        w.u32(l.resource);
        w.u64(l.cur);
        w.u64(l.max);
    }
    for v in [setup.nice, setup.oom_score_adj] {
        match v {
            Some(v) => {
                w.u8(1);
                w.u32(v as u32);
            }
            None => w.u8(0),
        }
    }
    w.u32(setup.lock_mode);
    w.u32(setup.locks.len() as u32);
    for l in &setup.locks {
        w.bytes(l.path.as_bytes());
        w.u8(u8::from(l.shared));
    }
    w.bytes(path.as_bytes());
    w.u32(argv.len() as u32);
    for a in argv {
        w.bytes(a.as_bytes());
    }
    w.u32(envp.len() as u32);
    for e in envp {
        w.bytes(e.as_bytes());
    }
    w.u32(pid_vars.len() as u32);
    for &i in pid_vars {
        w.u32(i as u32);
    }
    Some(w.0)
}

/// The set-up and exec body of a payload, with `fds` (status pipe, stdin, stdout, stderr,
/// then `pass_fds`) as its descriptors. `None` for anything malformed.
pub fn decode(payload: &[u8], fds: &[RawFd]) -> Option<(Setup, Body<'static>)> {
    if fds.len() < 4 {
        return None;
    }
    let mut r = Reader(payload);
    let cwd = if r.flag()? { Some(r.cstring()?) } else { None };
    let umask = if r.flag()? { Some(r.u32()?) } else { None };
    let credentials = if r.flag()? {
        let uid = r.u32()?;
        let gid = r.u32()?;
        let n = r.count(4)?;
        let groups = (0..n).map(|_| r.u32()).collect::<Option<Vec<_>>>()?;
        Some(Credentials { uid, gid, groups })
    } else {
        None
    };
    let nofile = if r.flag()? {
        Some(libc::rlimit {
            rlim_cur: r.u64()?,
            rlim_max: r.u64()?,
        })
    } else {
        None
    };
    let n = r.count(20)?;
    let limits = (0..n)
        .map(|_| {
            Some(ResourceLimit {
                resource: r.u32()?,
                cur: r.u64()?,
                max: r.u64()?,
            })
        })
        .collect::<Option<Vec<_>>>()?;
    let nice = if r.flag()? {
        Some(r.u32()? as i32)
    } else {
        None
    };
    let oom_score_adj = if r.flag()? {
        Some(r.u32()? as i32)
    } else {
        None
    };
    let lock_mode = r.u32()?;
    let n = r.count(5)?;
    let locks = (0..n)
        .map(|_| {
            Some(LockRequest {
                path: r.cstring()?,
                shared: r.flag()?,
            })
        })
        .collect::<Option<Vec<_>>>()?;
    let path = r.cstring()?;
    let n = r.count(4)?;
    let argv = (0..n).map(|_| r.cstring()).collect::<Option<Vec<_>>>()?;
    let n = r.count(4)?;
    let envp = (0..n).map(|_| r.cstring()).collect::<Option<Vec<_>>>()?;
    let n = r.count(4)?;
    let pid_vars = (0..n)
        .map(|_| r.u32().map(|i| i as usize))
        .collect::<Option<Vec<_>>>()?;
    // Indices of entries of `envp`, in increasing order, as `launch` makes them: the child
    // pairs each with the entry it names by walking both in order.
    let indices_ok =
        pid_vars.windows(2).all(|w| w[0] < w[1]) && pid_vars.last().is_none_or(|&i| i < envp.len());
    if !r.0.is_empty() || !indices_ok {
        return None;
    }
    let setup = Setup {
        cwd,
        umask,
        credentials,
        stdin: fds[1],
        stdout: fds[2],
        stderr: fds[3],
        pass_fds: fds[4..].to_vec(),
        locks,
        lock_mode,
        nofile,
        limits,
        nice,
        oom_score_adj,
        gate: None,
    };
    Some((
        setup,
        Body::Exec {
            path,
            argv,
            envp,
            pid_vars,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> CString {
        CString::new(s).unwrap()
    }

    #[test]
    fn a_request_decodes_to_what_was_encoded() {
        let setup = Setup {
            cwd: Some(c("/srv/app")),
            umask: Some(0o027),
            credentials: Some(Credentials {
                uid: 1000,
                gid: 1000,
                groups: vec![1000, 27],
            }),
            stdin: 10,
            stdout: 11,
            stderr: 12,
            pass_fds: vec![13, 14],
            locks: vec![LockRequest {
                path: c("/run/lock/db"),
                shared: true,
            }],
            lock_mode: 0o644,
            nofile: Some(libc::rlimit {
                rlim_cur: 1024,
                rlim_max: 4096,
            }),
            limits: vec![
                ResourceLimit {
                    resource: libc::RLIMIT_CORE as _,
                    cur: 0,
                    max: 0,
                },
                ResourceLimit {
                    resource: libc::RLIMIT_NOFILE as _,
                    cur: 65536,
                    max: u64::MAX,
                },
            ],
            nice: Some(-5),
            oom_score_adj: Some(-1000),
            gate: None,
        };
        let body = Body::Exec {
            path: c("/usr/bin/env"),
            argv: vec![c("env"), c("-0")],
            envp: vec![c("A=1"), c("LISTEN_PID=0"), c("B=\u{e9}")],
            pid_vars: vec![1],
        };
        let payload = encode(&setup, &body).unwrap();
        let (got, got_body) = decode(&payload, &[9, 20, 21, 22, 23, 24]).unwrap();
        assert_eq!(got.cwd, setup.cwd);
        assert_eq!(got.umask, setup.umask);
        let cred = got.credentials.unwrap();
        assert_eq!(
            (cred.uid, cred.gid, cred.groups),
            (1000, 1000, vec![1000, 27])
        );
        assert_eq!((got.stdin, got.stdout, got.stderr), (20, 21, 22));
        assert_eq!(got.pass_fds, vec![23, 24], "the server's own descriptors");
        assert_eq!(got.locks.len(), 1);
        assert_eq!(
            (got.locks[0].path.as_c_str(), got.locks[0].shared),
            (c"/run/lock/db", true)
        );
        assert_eq!(got.lock_mode, 0o644);
        let lim = got.nofile.unwrap();
        assert_eq!((lim.rlim_cur, lim.rlim_max), (1024, 4096));
        assert_eq!(got.limits, setup.limits);
        assert_eq!((got.nice, got.oom_score_adj), (Some(-5), Some(-1000)));
        let Body::Exec {
            path,
            argv,
            envp,
            pid_vars,
        } = got_body
        else {
            panic!("an exec body")
        };
        assert_eq!(path, c("/usr/bin/env"));
        assert_eq!(argv, vec![c("env"), c("-0")]);
        assert_eq!(envp, vec![c("A=1"), c("LISTEN_PID=0"), c("B=\u{e9}")]);
        assert_eq!(pid_vars, vec![1]);
    }

    #[test]
    fn malformed_payloads_are_refused_not_trusted() {
        let setup = Setup {
            cwd: None,
            umask: None,
            credentials: None,
            stdin: 0,
            stdout: 1,
            stderr: 2,
            pass_fds: vec![],
            locks: vec![],
            lock_mode: 0o644,
            nofile: None,
            limits: vec![],
            nice: None,
            oom_score_adj: None,
            gate: None,
        };
        let body = Body::Exec {
            path: c("/bin/true"),
            argv: vec![c("true")],
            envp: vec![],
            pid_vars: vec![],
        };
        let payload = encode(&setup, &body).unwrap();
        let fds = [3, 4, 5, 6];
        assert!(decode(&payload, &fds).is_some());
        // Every truncation, one trailing byte, too few descriptors, a huge count.
        for cut in 0..payload.len() {
            assert!(decode(&payload[..cut], &fds).is_none(), "cut at {cut}");
        }
        let mut longer = payload.clone();
        longer.push(0);
        assert!(decode(&longer, &fds).is_none());
        assert!(decode(&payload, &fds[..3]).is_none());
        let mut huge = payload.clone();
        let at = huge.len() - 4; // the pid_vars count
        huge[at..].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode(&huge, &fds).is_none());
        // A function body is not sent at all.
        let mut f = || 0;
        assert!(encode(&setup, &Body::Call(Box::new(&mut f))).is_none());
    }

    /// Found by `fuzz/fuzz_targets/forkserver_request.rs`: a `pid_vars` index past the end of
    /// `envp` decoded, and so did indices out of order, which the child pairs with the wrong
    /// entries (it walks `pid_vars` and `envp` side by side).
    #[test]
    fn fuzz_regression_pid_vars_must_name_entries_in_order() {
        let setup = Setup {
            cwd: None,
            umask: None,
            credentials: None,
            stdin: 0,
            stdout: 1,
            stderr: 2,
            pass_fds: vec![],
            locks: vec![],
            lock_mode: 0o644,
            nofile: None,
            limits: vec![],
            nice: None,
            oom_score_adj: None,
            gate: None,
        };
        let fds = [3, 4, 5, 6];
        let request = |pid_vars: Vec<usize>| {
            let body = Body::Exec {
                path: c("/usr/bin/env"),
                argv: vec![c("env")],
                envp: vec![c("PATH=/usr/bin"), c("LISTEN_PID="), c("WATCHDOG_PID=")],
                pid_vars,
            };
            encode(&setup, &body).unwrap()
        };
        assert!(decode(&request(vec![1, 2]), &fds).is_some());
        assert!(decode(&request(vec![]), &fds).is_some());
        for bad in [vec![3], vec![2490369], vec![2, 1], vec![1, 1]] {
            assert!(decode(&request(bad.clone()), &fds).is_none(), "{bad:?}");
        }
    }
}
