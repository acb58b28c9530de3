//! fork + exec of a worker, without blocking the master.
//!
//! `std::process::Command` is not used: its `spawn` waits until the child has exec'd, and a
//! worker with `locks` blocks *before* exec, in the child, until its locks are free. Here the
//! master forks and returns at once; the child reports through a close-on-exec status pipe:
//! "waiting for lock i", or "stage S failed with errno E" just before `_exit(127)`. End of
//! file on that pipe without a failure record means the exec succeeded.
//!
//! Between fork and exec the child runs only async-signal-safe libc calls over data prepared
//! before the fork (C strings, pointer arrays, descriptor lists): no allocation, no locks.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use nix::unistd::Pid;

/// Owner and groups a worker runs as.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
    pub groups: Vec<libc::gid_t>,
}

#[derive(Debug, Clone)]
pub struct LockRequest {
    pub path: CString,
    pub shared: bool,
}

/// Everything the child needs, prepared by the parent.
#[derive(Debug)]
pub struct Request {
    /// The executable, already resolved (absolute or relative to `cwd`).
    pub program: CString,
    pub argv: Vec<CString>,
    pub env: Vec<CString>,
    pub cwd: Option<CString>,
    pub umask: Option<libc::mode_t>,
    pub credentials: Option<Credentials>,
    pub stdin: RawFd,
    pub stdout: RawFd,
    pub stderr: RawFd,
    /// Placed at descriptors 3, 4, … in the worker.
    pub pass_fds: Vec<RawFd>,
    /// Taken in this order (the caller sorts them), held across exec.
    pub locks: Vec<LockRequest>,
    pub lock_mode: libc::mode_t,
    /// The open-file limit to restore before exec (the master raised its own).
    pub nofile: Option<libc::rlimit>,
    /// Indices into `env` of entries (`LISTEN_PID=`, `WATCHDOG_PID=`) whose value the child
    /// replaces with its own pid, which is only known after fork.
    pub pid_vars: Vec<usize>,
}

/// Where in the child a start failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Setup,
    Chdir,
    Lock(u16),
    Credentials,
    Exec,
}

/// A message from a child that has not exec'd yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Report {
    WaitingForLock(u16),
    Failed { stage: Stage, errno: i32 },
}

const REPORT_LEN: usize = 8;
const KIND_WAIT: u8 = 1;
const KIND_FAIL: u8 = 2;

fn encode(kind: u8, stage: Stage, errno: i32) -> [u8; REPORT_LEN] {
    let (code, index) = match stage {
        Stage::Setup => (0u8, 0u16),
        Stage::Chdir => (1, 0),
        Stage::Lock(i) => (2, i),
        Stage::Credentials => (3, 0),
        Stage::Exec => (4, 0),
    };
    let i = index.to_le_bytes();
    let e = errno.to_le_bytes();
    [kind, code, i[0], i[1], e[0], e[1], e[2], e[3]]
}

fn decode(rec: &[u8]) -> Option<Report> {
    let index = u16::from_le_bytes([rec[2], rec[3]]);
    let errno = i32::from_le_bytes([rec[4], rec[5], rec[6], rec[7]]);
    let stage = match rec[1] {
        0 => Stage::Setup,
        1 => Stage::Chdir,
        2 => Stage::Lock(index),
        3 => Stage::Credentials,
        4 => Stage::Exec,
        _ => return None,
    };
    match rec[0] {
        KIND_WAIT => Some(Report::WaitingForLock(index)),
        KIND_FAIL => Some(Report::Failed { stage, errno }),
        _ => None,
    }
}

/// Reads the reports available on a child's status pipe. The second value is true at end of
/// file: the child exec'd (when no failure came) or died.
pub fn read_reports(status: RawFd) -> io::Result<(Vec<Report>, bool)> {
    let mut out = Vec::new();
    // A multiple of the record size: writes of one record are atomic, so reads never split one.
    let mut buf = [0u8; REPORT_LEN * 16];
    loop {
        match super::read_available(status, &mut buf)? {
            None => return Ok((out, true)),
            Some(0) => return Ok((out, false)),
            Some(n) => out.extend(buf[..n].chunks_exact(REPORT_LEN).filter_map(decode)),
        }
    }
}

/// A forked worker and the read end of its status pipe (non-blocking).
#[derive(Debug)]
pub struct Child {
    pub pid: Pid,
    pub status: OwnedFd,
}

/// Forks a worker as described by `req`. Returns once forked; the exec happens in the child.
pub fn spawn(req: &Request) -> io::Result<Child> {
    let (status_r, status_w) = super::pipe(true)?;
    let master = nix::unistd::getpid().as_raw();

    // Everything the child touches is built here, before fork.
    let argv: Vec<*const libc::c_char> = req
        .argv
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    // Entries to complete with the child's pid get a buffer with room for the digits.
    let mut env_bufs: Vec<Vec<u8>> = Vec::new();
    for &i in &req.pid_vars {
        let Some(entry) = req.env.get(i) else {
            continue;
        };
        let bytes = entry.as_bytes();
        let key_len = bytes
            .iter()
            .position(|&b| b == b'=')
            .map_or(bytes.len(), |p| p + 1);
        let mut b = bytes[..key_len].to_vec();
        b.resize(key_len + 11, 0);
        env_bufs.push(b);
    }
    let mut pid_slots: Vec<(*mut u8, usize)> = Vec::new();
    let mut bufs = env_bufs.iter_mut();
    let mut env: Vec<*const libc::c_char> = Vec::with_capacity(req.env.len() + 1);
    for (i, e) in req.env.iter().enumerate() {
        if req.pid_vars.contains(&i) {
            if let Some(b) = bufs.next() {
                let key_len = b.len() - 11;
                pid_slots.push((b.as_mut_ptr(), key_len));
                env.push(b.as_ptr().cast());
                continue;
            }
        }
        env.push(e.as_ptr());
    }
    env.push(std::ptr::null());

    let mut sources: Vec<RawFd> = vec![req.stdin, req.stdout, req.stderr];
    sources.extend(&req.pass_fds);
    sources.push(status_w.as_raw_fd());
    let mut scratch: Vec<RawFd> = vec![-1; sources.len()];
    let groups = req.credentials.as_ref().map(|c| c.groups.clone());

    // Block every signal across fork, so that no handler of the master's runs in the child
    // before the child has reset the dispositions.
    // SAFETY: sigset_t values are plain data initialised by sigfillset/sigprocmask.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: pointers are to the local, valid sigset_t values above.
    unsafe {
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
    }
    let mut ctx = ChildContext {
        req,
        argv: &argv,
        env: &env,
        pid_slots: &pid_slots,
        sources: &sources,
        scratch: &mut scratch,
        groups: groups.as_deref(),
        master,
    };
    // fork, not vfork: the master goes on forking while children exec on the other cores.
    // (clone(CLONE_VM | CLONE_VFORK) was measured: it saves the page-table copy, but the
    // master then waits for every exec, and 200 workers started 3x slower on 2 cores.)
    // SAFETY: the master is single-threaded, and the child only runs `child_after_fork`,
    // which uses async-signal-safe calls over memory prepared above.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: we are the freshly forked child; see `child_after_fork`.
        unsafe { child_after_fork(&mut ctx) }
    }
    let fork_err = io::Error::last_os_error();
    // SAFETY: restores the mask saved above.
    unsafe {
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
    }
    drop(status_w);
    drop(env_bufs);
    if pid < 0 {
        return Err(fork_err);
    }
    Ok(Child {
        pid: Pid::from_raw(pid),
        status: status_r,
    })
}

struct ChildContext<'a> {
    req: &'a Request,
    argv: &'a [*const libc::c_char],
    env: &'a [*const libc::c_char],
    pid_slots: &'a [(*mut u8, usize)],
    sources: &'a [RawFd],
    scratch: &'a mut [RawFd],
    groups: Option<&'a [libc::gid_t]>,
    master: libc::pid_t,
}

/// Writes a failure record and exits 127, like a shell that cannot run a command.
///
/// # Safety
/// Only in the forked child.
unsafe fn fail(status: RawFd, stage: Stage) -> ! {
    let errno = io::Error::last_os_error().raw_os_error().unwrap_or(0);
    let rec = encode(KIND_FAIL, stage, errno);
    // SAFETY: write and _exit are async-signal-safe; `rec` is a valid buffer.
    unsafe {
        libc::write(status, rec.as_ptr().cast(), rec.len());
        libc::_exit(127)
    }
}

/// Dies with the master: SIGTERM when it goes, and exit now if it is already gone (it may
/// have died between our fork and the prctl, in which case we were reparented).
///
/// # Safety
/// Only in the forked child.
unsafe fn tie_to_master(master: libc::pid_t) {
    // SAFETY: plain integer arguments.
    unsafe {
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGTERM as libc::c_ulong,
            0,
            0,
            0,
        );
        if libc::getppid() != master {
            libc::_exit(0);
        }
    }
}

/// # Safety
/// Must run only in a child just forked from the single-threaded master, with every signal
/// blocked; it never returns.
unsafe fn child_after_fork(ctx: &mut ChildContext<'_>) -> ! {
    let req = ctx.req;
    let n = ctx.sources.len() as RawFd;
    let mut status = *ctx.sources.last().expect("status pipe is always passed");
    // SAFETY (whole block): only async-signal-safe libc calls, over memory prepared before
    // fork that nothing else touches in this single-threaded child.
    unsafe {
        libc::setpgid(0, 0);
        tie_to_master(ctx.master);

        // Default dispositions for every signal, real-time ones included (Rust ignores
        // SIGPIPE; whatever the master's launcher ignored would stay ignored across exec),
        // then unblock them all. glibc keeps 32 and 33 to itself and refuses them: harmless.
        for sig in 1..=libc::SIGRTMAX() {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());

        // Descriptors: lift every source above the targets first, so that no dup2 overwrites
        // a source still to be placed; then put them at 0, 1, 2, 3…; close everything else.
        for (i, &src) in ctx.sources.iter().enumerate() {
            let fd = libc::fcntl(src, libc::F_DUPFD_CLOEXEC, n);
            if fd < 0 {
                fail(status, Stage::Setup);
            }
            ctx.scratch[i] = fd;
        }
        for (target, &fd) in ctx.scratch.iter().enumerate() {
            if libc::dup2(fd, target as RawFd) < 0 {
                fail(status, Stage::Setup);
            }
        }
        status = n - 1;
        libc::fcntl(status, libc::F_SETFD, libc::FD_CLOEXEC);
        if libc::syscall(
            libc::SYS_close_range,
            n as libc::c_uint,
            libc::c_uint::MAX,
            0,
        ) < 0
        {
            for fd in n..4096 {
                libc::close(fd);
            }
        }

        for &(buf, offset) in ctx.pid_slots {
            write_decimal(buf.add(offset), libc::getpid() as u32);
        }
        if let Some(mask) = req.umask {
            libc::umask(mask);
        }
        if let Some(cwd) = &req.cwd {
            if libc::chdir(cwd.as_ptr()) < 0 {
                fail(status, Stage::Chdir);
            }
        }
        if let Some(lim) = &req.nofile {
            libc::setrlimit(libc::RLIMIT_NOFILE, lim);
        }
        for (i, lock) in req.locks.iter().enumerate() {
            take_lock(lock, req.lock_mode, i as u16, status);
        }
        if let (Some(cred), Some(groups)) = (&req.credentials, ctx.groups) {
            // Raw syscalls: only this process changes; glibc's wrappers would also try to
            // bring every other thread of the process along.
            if libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) < 0
                || libc::syscall(libc::SYS_setgid, cred.gid) < 0
                || libc::syscall(libc::SYS_setuid, cred.uid) < 0
            {
                fail(status, Stage::Credentials);
            }
            // A change of credentials clears the parent-death signal: set it again.
            tie_to_master(ctx.master);
        }
        libc::execve(req.program.as_ptr(), ctx.argv.as_ptr(), ctx.env.as_ptr());
        fail(status, Stage::Exec)
    }
}

/// Opens (never following a symlink) and flocks one lock file; the descriptor is inherited
/// across exec, so the lock lives exactly as long as the worker and its children.
///
/// # Safety
/// Only in the forked child.
unsafe fn take_lock(lock: &LockRequest, mode: libc::mode_t, index: u16, status: RawFd) {
    // SAFETY: async-signal-safe calls over a valid C string and a local stat buffer.
    unsafe {
        // Created here with exactly `mode`, whatever the umask, so that `plumule lock` run by
        // another user (with `control_group`) can open it; an existing file keeps its mode.
        // Read-only is enough for flock when read-write is refused.
        let base = libc::O_NOFOLLOW | libc::O_NOCTTY;
        let mut fd = libc::open(
            lock.path.as_ptr(),
            base | libc::O_RDWR | libc::O_CREAT | libc::O_EXCL,
            mode as libc::c_uint,
        );
        if fd >= 0 {
            libc::fchmod(fd, mode);
        } else if *libc::__errno_location() == libc::EEXIST {
            fd = libc::open(lock.path.as_ptr(), base | libc::O_RDWR);
            if fd < 0 && *libc::__errno_location() == libc::EACCES {
                fd = libc::open(lock.path.as_ptr(), base | libc::O_RDONLY);
            }
        }
        if fd < 0 {
            fail(status, Stage::Lock(index));
        }
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd, &mut st) < 0 || st.st_mode & libc::S_IFMT != libc::S_IFREG {
            *libc::__errno_location() = libc::EINVAL;
            fail(status, Stage::Lock(index));
        }
        let op = if lock.shared {
            libc::LOCK_SH
        } else {
            libc::LOCK_EX
        };
        if libc::flock(fd, op | libc::LOCK_NB) == 0 {
            return;
        }
        if *libc::__errno_location() != libc::EWOULDBLOCK {
            fail(status, Stage::Lock(index));
        }
        let rec = encode(KIND_WAIT, Stage::Lock(index), 0);
        libc::write(status, rec.as_ptr().cast(), rec.len());
        while libc::flock(fd, op) < 0 {
            if *libc::__errno_location() != libc::EINTR {
                fail(status, Stage::Lock(index));
            }
        }
    }
}

/// Writes `v` in decimal followed by NUL at `out`, which has room for 11 bytes.
///
/// # Safety
/// `out` must point to 11 writable bytes.
unsafe fn write_decimal(out: *mut u8, mut v: u32) {
    let mut digits = [0u8; 10];
    let mut n = 0;
    loop {
        digits[n] = b'0' + (v % 10) as u8;
        n += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    for i in 0..n {
        // SAFETY: i < n ≤ 10 < 11 bytes available.
        unsafe { *out.add(i) = digits[n - 1 - i] };
    }
    // SAFETY: n ≤ 10, so index n is within the 11 bytes.
    unsafe { *out.add(n) = 0 };
}

/// Text of an errno value, for messages.
pub fn errno_text(errno: i32) -> String {
    io::Error::from_raw_os_error(errno).to_string()
}

/// `CString` from text known to have no NUL (config validation refuses NULs).
pub fn cstring(s: impl Into<Vec<u8>>) -> CString {
    CString::new(s).unwrap_or_else(|e| {
        let mut v = e.into_vec();
        v.retain(|&b| b != 0);
        CString::new(v).expect("NULs removed")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_round_trip() {
        for (kind, stage, errno) in [
            (KIND_FAIL, Stage::Exec, libc::ENOENT),
            (KIND_FAIL, Stage::Lock(7), libc::ELOOP),
            (KIND_FAIL, Stage::Chdir, libc::EACCES),
            (KIND_FAIL, Stage::Credentials, libc::EPERM),
            (KIND_FAIL, Stage::Setup, libc::EMFILE),
        ] {
            assert_eq!(
                decode(&encode(kind, stage, errno)),
                Some(Report::Failed { stage, errno })
            );
        }
        assert_eq!(
            decode(&encode(KIND_WAIT, Stage::Lock(3), 0)),
            Some(Report::WaitingForLock(3))
        );
        assert_eq!(decode(&[9, 0, 0, 0, 0, 0, 0, 0]), None);
    }

    #[test]
    fn decimal_formatting() {
        let mut buf = [0xffu8; 11];
        for (v, s) in [
            (0u32, "0"),
            (7, "7"),
            (12345, "12345"),
            (u32::MAX, "4294967295"),
        ] {
            // SAFETY: buf has 11 bytes.
            unsafe { write_decimal(buf.as_mut_ptr(), v) };
            let end = buf.iter().position(|&b| b == 0).unwrap();
            assert_eq!(&buf[..end], s.as_bytes());
        }
    }
}
