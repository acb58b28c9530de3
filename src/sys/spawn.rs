//! Starting a child process without blocking the master, in two phases.
//!
//! 1. **Set-up** ([`Setup`]): its own process group, death with the master, default signal
//!    dispositions and an empty signal mask, descriptors 0, 1, 2, 3… and nothing else, umask,
//!    working folder, open-file limit, resource limits, niceness, OOM score adjustment, file
//!    locks, credentials. Limits, niceness and OOM score come before the change of
//!    credentials: raising a hard limit, a negative nice or a lower OOM score needs the
//!    master's privileges, which the worker no longer has after it.
//! 2. **Body** ([`Body`]): exec a command, or call a Rust function in the forked child.
//!
//! `std::process::Command` is not used: its `spawn` waits until the child has exec'd, and a
//! worker with `locks` blocks in set-up, in the child, until its locks are free. Here the
//! master forks and returns at once; the child reports through a close-on-exec status pipe:
//! "waiting for lock i", or "stage S failed with errno E" just before `_exit(127)`. End of
//! file on that pipe without a failure record means set-up is done and the body has begun:
//! exec closes the pipe for an [`Body::Exec`], the child closes it itself before a
//! [`Body::Call`].
//!
//! Between fork and the body the child runs only async-signal-safe libc calls over data
//! prepared before the fork (C strings, pointer arrays, descriptor lists): no allocation, no
//! locks.

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

/// The child's set-up, prepared by the parent; the same whatever the body.
#[derive(Debug)]
pub struct Setup {
    pub cwd: Option<CString>,
    pub umask: Option<libc::mode_t>,
    pub credentials: Option<Credentials>,
    pub stdin: RawFd,
    pub stdout: RawFd,
    pub stderr: RawFd,
    /// Placed at descriptors 3, 4, … in the child.
    pub pass_fds: Vec<RawFd>,
    /// Taken in this order (the caller sorts them), held by the child for its whole life
    /// (across exec too).
    pub locks: Vec<LockRequest>,
    pub lock_mode: libc::mode_t,
    /// The open-file limit to restore (the master raised its own).
    pub nofile: Option<libc::rlimit>,
    /// Set after `nofile`, in this order; a failure is [`Stage::Limit`] with the index.
    pub limits: Vec<ResourceLimit>,
    /// setpriority(PRIO_PROCESS, 0, nice).
    pub nice: Option<i32>,
    /// Written to `/proc/self/oom_score_adj`.
    pub oom_score_adj: Option<i32>,
    /// Cluster locks: after the file locks, the child waits on this gate until the master
    /// writes the locks' revisions.
    pub gate: Option<Gate>,
}

/// Where a worker with cluster locks waits for them, in the child, after its file locks: it
/// reports "waiting for lock `lock`", then reads `env.len()` little-endian u64 revisions from
/// `fd` (the master writes them once the locks are its, then closes its end) and writes each
/// one, in decimal, as the value of the entry of the exec body's `envp` at the same place of
/// `env` (`PLUMULE_LOCK_REVISION_<NAME>=`, completed in the child). End of file first means
/// the master gave up on the worker: it fails at stage `Lock(lock)` with ECANCELED.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gate {
    pub fd: RawFd,
    /// The index of the first cluster lock in the worker's lock names.
    pub lock: u16,
    /// Indices into the exec body's `envp`, one per revision.
    pub env: Vec<usize>,
}

/// The most revisions one gate carries (a worker's cluster locks).
pub const MAX_GATE_LOCKS: usize = 32;

/// One setrlimit(2) call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResourceLimit {
    /// `libc::RLIMIT_*`.
    pub resource: u32,
    pub cur: u64,
    pub max: u64,
}

/// What the child does once set up.
pub enum Body<'a> {
    /// Replaces the child with the executable `path` (absolute or relative to the set-up's
    /// `cwd`), with arguments `argv` and environment `envp` (`KEY=VALUE` entries).
    Exec {
        path: CString,
        argv: Vec<CString>,
        envp: Vec<CString>,
        /// Indices into `envp` of entries (`LISTEN_PID=`, `WATCHDOG_PID=`) whose value the
        /// child replaces with its own pid, which is only known after fork.
        pid_vars: Vec<usize>,
    },
    /// Calls the function in the forked child, which then `_exit`s with its return value
    /// (its low 8 bits, as for any exit code).
    ///
    /// The function runs after `fork` in a copy of the parent that has only the forking
    /// thread, after the set-up above (its descriptors are exactly 0, 1, 2 and `pass_fds`
    /// from 3; its signals have default dispositions and are unblocked). What that implies:
    /// - it works on a *copy* of the parent's memory: what it changes, the parent never sees;
    ///   it talks to the parent through its descriptors and its exit code;
    /// - a lock another thread of the parent held at fork time (the allocator's, stdio's, a
    ///   `Mutex`) stays locked forever in the child. The plumule master is single-threaded, so
    ///   allocating is fine there; a multi-threaded caller must keep to async-signal-safe
    ///   calls;
    /// - no destructor of the parent's values runs at the end and Rust's buffered `stdout`
    ///   is not flushed: flush what must be written before returning;
    /// - a panic does not unwind back into the parent's code: it ends the child with exit
    ///   code 101 (or SIGABRT when built with `panic = "abort"`).
    ///
    /// Boxed, so that a prepared spawn can own its function (the library's services).
    Call(Box<dyn FnMut() -> i32 + 'a>),
}

impl std::fmt::Debug for Body<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Body::Exec {
                path,
                argv,
                envp,
                pid_vars,
            } => f
                .debug_struct("Exec")
                .field("path", path)
                .field("argv", argv)
                .field("envp", envp)
                .field("pid_vars", pid_vars)
                .finish(),
            Body::Call(_) => f.write_str("Call(..)"),
        }
    }
}

/// Exit code of a child whose [`Body::Call`] function panicked, as for a Rust `main`.
pub const PANIC_EXIT: i32 = 101;

/// Why no child was started. Failures inside the child are [`Report`]s instead.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("cannot create a status pipe to start {what}: {source}")]
    StatusPipe { what: String, source: io::Error },
    #[error("cannot fork to start {what}: {source}")]
    Fork { what: String, source: io::Error },
    /// The fork server is fine but its fork failed (EAGAIN, ENOMEM): transient, like a
    /// failed fork in the master.
    #[error("cannot fork to start {what}: {source}")]
    ServerFork { what: String, source: io::Error },
}

impl Body<'_> {
    /// What the body runs, for messages: the executable, or "a function".
    pub fn describe(&self) -> String {
        match self {
            Body::Exec { path, .. } => path.to_string_lossy().into_owned(),
            Body::Call(_) => "a function".to_string(),
        }
    }
}

/// Where in the child a start failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Setup,
    Chdir,
    Lock(u16),
    Credentials,
    Exec,
    /// The limit at this index of [`Setup::limits`].
    Limit(u16),
    Nice,
    OomScoreAdj,
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
        Stage::Limit(i) => (5, i),
        Stage::Nice => (6, 0),
        Stage::OomScoreAdj => (7, 0),
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
        5 => Stage::Limit(index),
        6 => Stage::Nice,
        7 => Stage::OomScoreAdj,
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

/// A forked child and the read end of its status pipe (non-blocking).
#[derive(Debug)]
pub struct Child {
    pub pid: Pid,
    pub status: OwnedFd,
}

/// Forks a child that runs `setup`, then `body`. Returns once forked: set-up and body happen
/// in the child, which reports on [`Child::status`].
pub fn spawn(setup: &Setup, body: &mut Body<'_>) -> Result<Child, SpawnError> {
    let (status_r, status_w) = super::pipe(true).map_err(|source| SpawnError::StatusPipe {
        what: body.describe(),
        source,
    })?;
    let master = nix::unistd::getpid().as_raw();
    let pid = start(setup, body, status_w.as_raw_fd(), master, Parent::Me).map_err(|source| {
        SpawnError::Fork {
            what: body.describe(),
            source,
        }
    })?;
    Ok(Child {
        pid,
        status: status_r,
    })
}

/// Whose child a new process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Parent {
    /// The caller's: fork(2).
    Me,
    /// The caller's parent's, a sibling of the caller: clone(2) with `CLONE_PARENT`. What the
    /// fork server does, so that workers are the master's children although the server
    /// forked them.
    Mine,
}

/// Starts a child that runs `setup`, then `body`, reporting on `status_w` (which the caller
/// keeps and closes). `master` is the pid the child ties its life to.
pub(super) fn start(
    setup: &Setup,
    body: &mut Body<'_>,
    status_w: RawFd,
    master: libc::pid_t,
    parent: Parent,
) -> io::Result<Pid> {
    // Everything the child touches is built here, before fork.
    let mut sources: Vec<RawFd> = vec![setup.stdin, setup.stdout, setup.stderr];
    sources.extend(&setup.pass_fds);
    if let Some(gate) = &setup.gate {
        sources.push(gate.fd);
    }
    sources.push(status_w);
    let mut scratch: Vec<RawFd> = vec![-1; sources.len()];
    // The value to write to /proc/self/oom_score_adj, formatted here: no formatting after fork.
    let oom_score_adj: Option<Vec<u8>> = setup.oom_score_adj.map(|v| v.to_string().into_bytes());
    // Only filled for an exec; they must outlive the fork, so they live here.
    let mut argv_ptrs: Vec<*const libc::c_char> = Vec::new();
    let mut env_ptrs: Vec<*const libc::c_char> = Vec::new();
    let mut env_bufs: Vec<Vec<u8>> = Vec::new();
    let mut pid_slots: Vec<(*mut u8, usize)> = Vec::new();
    let mut rev_slots: Vec<(*mut u8, usize)> = Vec::new();
    let no_env = Vec::new();
    let rev_vars = setup.gate.as_ref().map_or(&no_env, |g| &g.env);
    let child_body = match body {
        Body::Exec {
            path,
            argv,
            envp,
            pid_vars,
        } => {
            prepare_exec(
                argv,
                envp,
                &[pid_vars, rev_vars],
                &mut argv_ptrs,
                &mut env_ptrs,
                &mut env_bufs,
                &mut [&mut pid_slots, &mut rev_slots],
            );
            ChildBody::Exec {
                path,
                argv: &argv_ptrs,
                env: &env_ptrs,
                pid_slots: &pid_slots,
                rev_slots: &rev_slots,
            }
        }
        Body::Call(f) => ChildBody::Call(&mut **f),
    };

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
        setup,
        sources: &sources,
        scratch: &mut scratch,
        master,
        oom_score_adj: oom_score_adj.as_deref(),
    };
    // fork, not vfork: the master goes on forking while children exec on the other cores.
    // (clone(CLONE_VM | CLONE_VFORK) was measured: it saves the page-table copy, but the
    // master then waits for every exec, and 200 workers started 3x slower on 2 cores.)
    let pid = match parent {
        // SAFETY: the caller is single-threaded, and the child only runs `child_after_fork`,
        // which uses async-signal-safe calls over memory prepared above until the body,
        // whose constraints `Body::Call` documents.
        Parent::Me => unsafe { libc::fork() },
        // SAFETY: as fork: without a new stack the child runs on a copy of ours, and it only
        // makes raw system calls until execve (the fork server passes exec bodies only).
        Parent::Mine => unsafe {
            libc::syscall(
                libc::SYS_clone,
                (libc::CLONE_PARENT | libc::SIGCHLD) as libc::c_ulong,
                0usize,
                0usize,
                0usize,
                0usize,
            ) as libc::pid_t
        },
    };
    if pid == 0 {
        // SAFETY: we are the freshly forked child; see `child_after_fork`.
        unsafe { child_after_fork(&mut ctx, child_body) }
    }
    let fork_err = io::Error::last_os_error();
    // SAFETY: restores the mask saved above.
    unsafe {
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
    }
    drop(env_bufs);
    if pid < 0 {
        return Err(fork_err);
    }
    Ok(Pid::from_raw(pid))
}

/// Builds the NULL-terminated pointer arrays execve takes. Entries the child completes (with
/// its pid, with a lock's revision) get a buffer with room for [`SLOT_ROOM`] more bytes, and
/// a `(buffer, offset)` in the `slots` list of the same place as their list in `vars`.
fn prepare_exec(
    argv: &[CString],
    envp: &[CString],
    vars: &[&[usize]; 2],
    argv_ptrs: &mut Vec<*const libc::c_char>,
    env_ptrs: &mut Vec<*const libc::c_char>,
    env_bufs: &mut Vec<Vec<u8>>,
    slots: &mut [&mut Vec<(*mut u8, usize)>; 2],
) {
    argv_ptrs.extend(argv.iter().map(|a| a.as_ptr()));
    argv_ptrs.push(std::ptr::null());
    // Which list completes entry i: buffers are made first (they must not move once their
    // pointers are taken), in the order of `envp`.
    let which = |i: usize| vars.iter().position(|v| v.contains(&i));
    for (i, entry) in envp.iter().enumerate() {
        if which(i).is_none() {
            continue;
        }
        let bytes = entry.as_bytes();
        let key_len = bytes
            .iter()
            .position(|&b| b == b'=')
            .map_or(bytes.len(), |p| p + 1);
        let mut b = bytes[..key_len].to_vec();
        b.resize(key_len + SLOT_ROOM, 0);
        env_bufs.push(b);
    }
    let mut bufs = env_bufs.iter_mut();
    env_ptrs.reserve(envp.len() + 1);
    let mut by_var: [Vec<(usize, (*mut u8, usize))>; 2] = [Vec::new(), Vec::new()];
    for (i, e) in envp.iter().enumerate() {
        if let Some(list) = which(i) {
            if let Some(b) = bufs.next() {
                let key_len = b.len() - SLOT_ROOM;
                by_var[list].push((i, (b.as_mut_ptr(), key_len)));
                env_ptrs.push(b.as_ptr().cast());
                continue;
            }
        }
        env_ptrs.push(e.as_ptr());
    }
    env_ptrs.push(std::ptr::null());
    // Each list's slots in the order of its indices (a gate's revisions come in that order).
    for (list, found) in by_var.iter().enumerate() {
        for i in vars[list] {
            if let Some((_, slot)) = found.iter().find(|(j, _)| j == i) {
                slots[list].push(*slot);
            }
        }
    }
}

/// Room after `KEY=` for what the child writes: a u64 in decimal (20 digits) and a NUL.
const SLOT_ROOM: usize = 21;

struct ChildContext<'a> {
    setup: &'a Setup,
    sources: &'a [RawFd],
    scratch: &'a mut [RawFd],
    master: libc::pid_t,
    /// [`Setup::oom_score_adj`] in decimal.
    oom_score_adj: Option<&'a [u8]>,
}

/// The body as the child runs it: for an exec, pointer arrays built before fork.
enum ChildBody<'a, 'f> {
    Exec {
        path: &'a std::ffi::CStr,
        argv: &'a [*const libc::c_char],
        env: &'a [*const libc::c_char],
        pid_slots: &'a [(*mut u8, usize)],
        rev_slots: &'a [(*mut u8, usize)],
    },
    Call(&'a mut (dyn FnMut() -> i32 + 'f)),
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

/// Set-up, then the body; never returns.
///
/// # Safety
/// Must run only in a child just forked from the single-threaded master, with every signal
/// blocked.
unsafe fn child_after_fork(ctx: &mut ChildContext<'_>, body: ChildBody<'_, '_>) -> ! {
    // SAFETY: same contract as ours.
    let status = unsafe { set_up(ctx) };
    let mut revisions = [0u64; MAX_GATE_LOCKS];
    if let Some(gate) = &ctx.setup.gate {
        // SAFETY: in the child after set-up; the gate sits just below the status pipe.
        unsafe { wait_gate(gate, status - 1, status, &mut revisions) };
    }
    match body {
        ChildBody::Exec {
            path,
            argv,
            env,
            pid_slots,
            rev_slots,
        } => {
            // SAFETY: async-signal-safe calls over buffers prepared before fork, each slot
            // with room for SLOT_ROOM bytes after its offset (see `prepare_exec`).
            unsafe {
                for &(buf, offset) in pid_slots {
                    write_decimal(buf.add(offset), libc::getpid() as u32);
                }
                for (&(buf, offset), &rev) in rev_slots.iter().zip(&revisions) {
                    write_decimal64(buf.add(offset), rev);
                }
                libc::execve(path.as_ptr(), argv.as_ptr(), env.as_ptr());
                fail(status, Stage::Exec)
            }
        }
        ChildBody::Call(f) => {
            // There is no exec to close the close-on-exec status pipe: closing it is how the
            // parent learns that set-up is over, exactly as for an exec.
            // SAFETY: `status` is the child's own descriptor, used by nothing after this.
            unsafe { libc::close(status) };
            // A panic must not unwind into the parent's frames copied above us: the child
            // would go on running the parent's code.
            let code =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(PANIC_EXIT);
            // SAFETY: _exit ends this process without running the parent's destructors.
            unsafe { libc::_exit(code) }
        }
    }
}

/// Waits on a gate (see [`Gate`]): reports the wait, reads the revisions into `out`, closes
/// the gate. Exits through [`fail`] if the master closes it first.
///
/// # Safety
/// Only in the forked child, after [`set_up`], with the gate at descriptor `fd`.
unsafe fn wait_gate(gate: &Gate, fd: RawFd, status: RawFd, out: &mut [u64; MAX_GATE_LOCKS]) {
    // At least one revision: the master always writes one per cluster lock.
    let want = gate.env.len().clamp(1, MAX_GATE_LOCKS) * 8;
    let mut buf = [0u8; MAX_GATE_LOCKS * 8];
    let mut got = 0;
    // SAFETY (whole block): write, read, close and _exit are async-signal-safe; the buffers
    // are ours and the lengths within them.
    unsafe {
        let rec = encode(KIND_WAIT, Stage::Lock(gate.lock), 0);
        libc::write(status, rec.as_ptr().cast(), rec.len());
        while got < want {
            let n = libc::read(fd, buf.as_mut_ptr().add(got).cast(), want - got);
            if n > 0 {
                got += n as usize;
                continue;
            }
            if n < 0 && *libc::__errno_location() == libc::EINTR {
                continue;
            }
            *libc::__errno_location() = libc::ECANCELED;
            fail(status, Stage::Lock(gate.lock));
        }
        libc::close(fd);
    }
    for (i, rev) in out.iter_mut().enumerate().take(want / 8) {
        let mut b = [0u8; 8];
        b.copy_from_slice(&buf[i * 8..i * 8 + 8]);
        *rev = u64::from_le_bytes(b);
    }
}

/// The set-up phase; returns the status pipe's descriptor, still open and close-on-exec.
///
/// # Safety
/// As [`child_after_fork`].
unsafe fn set_up(ctx: &mut ChildContext<'_>) -> RawFd {
    let setup = ctx.setup;
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

        if let Some(mask) = setup.umask {
            libc::umask(mask);
        }
        if let Some(cwd) = &setup.cwd {
            if libc::chdir(cwd.as_ptr()) < 0 {
                fail(status, Stage::Chdir);
            }
        }
        if let Some(lim) = &setup.nofile {
            libc::setrlimit(libc::RLIMIT_NOFILE, lim);
        }
        // Before credentials change and before the locks: a worker that cannot get its
        // limits fails at once instead of waiting for a lock first.
        for (i, lim) in setup.limits.iter().enumerate() {
            let value = libc::rlimit {
                rlim_cur: lim.cur as libc::rlim_t,
                rlim_max: lim.max as libc::rlim_t,
            };
            if libc::setrlimit(lim.resource as _, &value) < 0 {
                fail(status, Stage::Limit(i as u16));
            }
        }
        if let Some(nice) = setup.nice {
            if libc::setpriority(libc::PRIO_PROCESS, 0, nice) < 0 {
                fail(status, Stage::Nice);
            }
        }
        if let Some(text) = ctx.oom_score_adj {
            let fd = libc::open(
                c"/proc/self/oom_score_adj".as_ptr(),
                libc::O_WRONLY | libc::O_CLOEXEC,
            );
            if fd < 0 || libc::write(fd, text.as_ptr().cast(), text.len()) != text.len() as isize {
                fail(status, Stage::OomScoreAdj);
            }
            libc::close(fd);
        }
        for (i, lock) in setup.locks.iter().enumerate() {
            take_lock(lock, setup.lock_mode, i as u16, status);
        }
        if let Some(cred) = &setup.credentials {
            // Raw syscalls: only this process changes; glibc's wrappers would also try to
            // bring every other thread of the process along.
            if libc::syscall(libc::SYS_setgroups, cred.groups.len(), cred.groups.as_ptr()) < 0
                || libc::syscall(libc::SYS_setgid, cred.gid) < 0
                || libc::syscall(libc::SYS_setuid, cred.uid) < 0
            {
                fail(status, Stage::Credentials);
            }
            // A change of credentials clears the parent-death signal: set it again.
            tie_to_master(ctx.master);
        }
    }
    status
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

/// Writes `v` in decimal and a NUL at `out`, which has room for 21 bytes.
///
/// # Safety
/// `out` must be valid for 21 bytes of writes.
unsafe fn write_decimal64(out: *mut u8, mut v: u64) {
    let mut digits = [0u8; 20];
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
        // SAFETY: i < n ≤ 20 < 21 bytes available.
        unsafe { *out.add(i) = digits[n - 1 - i] };
    }
    // SAFETY: n ≤ 20, so index n is within the 21 bytes.
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
            (KIND_FAIL, Stage::Limit(4), libc::EPERM),
            (KIND_FAIL, Stage::Nice, libc::EACCES),
            (KIND_FAIL, Stage::OomScoreAdj, libc::EACCES),
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
