//! Named file locks: the files under `lock_dir` that workers, `plumule lock` and library users
//! share, so that they exclude each other whichever of them takes a lock.
//!
//! # What this module owns
//!
//! - **Lock names** ([`validate_name`]): `[A-Za-z0-9._-]{1,100}`, not starting with a dot, checked
//!   after `{worker}` expansion ([`expand`]). A valid name can never leave `lock_dir` (no `/`, no
//!   `..`) nor name a hidden file.
//! - **The file layout** ([`lock_path`]): lock `NAME` is the file `lock_dir/NAME.lock`.
//! - **Safe creation.** [`ensure_dir`] creates a missing `lock_dir` with mode 0755 and refuses
//!   one that is a symlink, not a directory, or writable by others (o+w, sticky bit or not: in
//!   such a directory anybody could swap a lock file and break the exclusion). [`open_lock_file`]
//!   never follows a symlink planted at the lock path and refuses anything but a regular file.
//! - **Taking locks** ([`acquire`]), released by dropping the [`LockGuard`], and running a
//!   command under a lock ([`run_locked`], the body of `plumule lock`).
//!
//! # Invariants
//!
//! - The locks are `flock(2)` locks. They belong to an *open file description*: two `open()`s of
//!   one file conflict even inside one process, and a lock lives as long as any descriptor of its
//!   open file description, in any process. That is why a worker that execs holding a lock keeps
//!   it until it and every child that inherited it are gone, even under SIGKILL; and why the
//!   process that opened the file for a worker (the master) must close its own copy once the
//!   worker has it, or the lock outlives the worker.
//! - Every descriptor made here is close-on-exec ([`open_lock_file`]): handing one to a child
//!   across exec is always deliberate (the copy [`run_locked`] gives CMD is the one case here).
//! - **One global order.** A process that takes several locks takes them sorted by name, each
//!   name once, with exclusive winning over shared for a name listed twice
//!   ([`acquisition_order`]). Two programs sharing two locks therefore never deadlock, and a
//!   worker never waits on itself by opening the same lock file twice.
//! - A lock is never taken by polling: `Wait::Block` sleeps in `flock`, and `Wait::Timeout`
//!   sleeps there until a timer set to the deadline interrupts it (see [`Wait::Timeout`] for its costs; it is
//!   meant for client processes such as `plumule lock`, never for the master).
//!
//! # `plumule lock NAME [--shared] [--timeout DUR | --nonblock] -- CMD…`
//!
//! [`run_locked`] takes the lock, runs CMD with inherited stdio, waits for it, releases the lock
//! and returns the exit code, flock(1)-style:
//!
//! | code | meaning |
//! |---|---|
//! | CMD's own | CMD exited (0 included) |
//! | 128 + N | CMD was killed by signal N, as a shell reports it |
//! | 75 ([`EXIT_BUSY`], EX_TEMPFAIL) | the lock was held elsewhere: `--nonblock`, or `--timeout` expired |
//! | 2 ([`EXIT_USAGE`]) | invalid lock name or no CMD (the CLI parser reports other usage errors with 2 too) |
//! | 126 ([`EXIT_CANNOT_EXEC`]) | CMD exists but cannot be executed |
//! | 127 ([`EXIT_NOT_FOUND`]) | CMD was not found |
//! | 1 ([`EXIT_FAILURE`]) | any other error: unsafe lock dir, lock file not openable, … |
//!
//! CMD inherits a descriptor of the lock (flock(1) does the same), so that the lock outlives
//! `plumule lock` itself: if `plumule lock` is killed while CMD runs, CMD still excludes everybody
//! else until it exits. When CMD exits, `plumule lock` unlocks explicitly, so a daemon that CMD
//! left running in the background does *not* keep the lock (unlike flock(1)).
//!
//! Signals are not forwarded: CMD runs in the caller's process group, so a terminal's ^C reaches
//! both; a signal sent to `plumule lock` alone kills it (default action) while CMD keeps running,
//! still holding the lock through its inherited descriptor.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions, Permissions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

// fs2's trait methods are always called as `FileExt::method(&file)`: since Rust 1.89 `File` has
// inherent `lock_shared`, `try_lock_shared` and `unlock` methods, which win over trait methods in
// method-call syntax and (for `try_lock*`) return a different error type. The crate's
// rust-version (1.80) predates them, so fs2 it is.
use fs2::FileExt;

/// Longest valid lock name, in bytes.
pub const MAX_NAME_LEN: usize = 100;

/// `run_locked`: another error (unsafe lock dir, lock file not openable, wait failed).
pub const EXIT_FAILURE: i32 = 1;
/// `run_locked`: invalid lock name, or no command.
pub const EXIT_USAGE: i32 = 2;
/// `run_locked`: the lock could not be taken (`--nonblock` or `--timeout`). EX_TEMPFAIL.
pub const EXIT_BUSY: i32 = 75;
/// `run_locked`: the command was found but cannot be executed.
pub const EXIT_CANNOT_EXEC: i32 = 126;
/// `run_locked`: the command was not found.
pub const EXIT_NOT_FOUND: i32 = 127;

/// Which kind of lock to take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// One holder at a time (`LOCK_EX`).
    Exclusive,
    /// Any number of shared holders, excluding every exclusive one (`LOCK_SH`).
    Shared,
}

/// What to do when the lock is held elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Wait {
    /// Wait as long as it takes.
    Block,
    /// Fail at once with [`LockError::Busy`].
    NonBlock,
    /// Wait at most this long, then fail with [`LockError::Busy`]. A zero duration is `NonBlock`.
    ///
    /// `flock` has no timeout, so while the wait lasts, SIGALRM gets a handler that does nothing
    /// (installed without `SA_RESTART`, so the signal makes `flock` return EINTR), SIGALRM is
    /// unblocked in the calling thread, and a POSIX timer aimed at that thread alone fires at the
    /// deadline. Afterwards the timer is deleted, the thread's mask restored and, once no thread
    /// of the process waits any more, the previous SIGALRM action put back. Several threads may
    /// wait at once. Costs to know of: a process-wide SIGALRM (e.g. from `alarm(2)`) that arrives
    /// during the wait is swallowed, and a SIGALRM action installed by someone else during the
    /// wait is overwritten when it ends. This is for client processes (`plumule lock`, library
    /// users); the master never waits for a lock and must not use it.
    Timeout(Duration),
}

/// Why a lock could not be taken, or its directory or file not used.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// The name is not a valid lock name (see [`validate_name`]).
    #[error("invalid lock name {name:?}: {reason}")]
    InvalidName { name: String, reason: NameError },
    /// The lock is held elsewhere: `Wait::NonBlock` (`waited` is `None`), or `Wait::Timeout`
    /// expired (`waited` is the timeout).
    #[error("{}", busy_message(.name, *.waited))]
    Busy {
        name: String,
        waited: Option<Duration>,
    },
    /// The missing lock directory could not be created.
    #[error("cannot create lock directory {}: {source}", .path.display())]
    CreateDir { path: PathBuf, source: io::Error },
    /// The lock directory could not be examined.
    #[error("cannot use lock directory {}: {source}", .path.display())]
    Dir { path: PathBuf, source: io::Error },
    /// The lock directory exists but is not safe to use.
    #[error("refusing lock directory {}: {reason}", .path.display())]
    UnsafeDir { path: PathBuf, reason: String },
    /// A symlink sits at the lock path. It was not followed and its target was not touched.
    #[error("refusing symlink at lock path {} (its target is left untouched)", .path.display())]
    Symlink { path: PathBuf },
    /// Something other than a regular file sits at the lock path.
    #[error("refusing lock file {}: it is {kind}, not a regular file", .path.display())]
    NotRegular { path: PathBuf, kind: &'static str },
    /// The lock file could not be opened or created.
    #[error("cannot open lock file {}: {source}", .path.display())]
    Open { path: PathBuf, source: io::Error },
    /// `flock` failed for another reason than contention.
    #[error("cannot lock {}: {source}", .path.display())]
    Lock { path: PathBuf, source: io::Error },
    /// The timer behind `Wait::Timeout` could not be set up.
    #[error("cannot arm the timeout for lock {name}: {source}")]
    Timer { name: String, source: io::Error },
}

fn busy_message(name: &str, waited: Option<Duration>) -> String {
    match waited {
        None => format!("lock {name} is held by another process"),
        Some(waited) => format!(
            "lock {name} is still held by another process after {}",
            humantime::format_duration(waited)
        ),
    }
}

impl LockError {
    /// True when the lock is merely held elsewhere (`--nonblock`, or the timeout expired): the
    /// one error that trying again later may cure.
    pub fn is_busy(&self) -> bool {
        matches!(self, LockError::Busy { .. })
    }
}

/// What is wrong with a lock name; the text does not repeat the name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("the name is empty")]
    Empty,
    #[error("it contains {0:?}; only ASCII letters, digits, '.', '_' and '-' are allowed")]
    Character(char),
    #[error("it is {0} characters long; the limit is {MAX_NAME_LEN}")]
    TooLong(usize),
    #[error("it starts with a dot")]
    LeadingDot,
}

/// Checks a lock name (after `{worker}` expansion): `[A-Za-z0-9._-]{1,100}`, not starting with a
/// dot.
pub fn validate_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(NameError::Character(bad));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong(name.len()));
    }
    if name.starts_with('.') {
        return Err(NameError::LeadingDot);
    }
    Ok(())
}

/// Replaces every `{worker}` in a lock name template with the worker id.
pub fn expand(template: &str, worker: u32) -> String {
    template.replace("{worker}", &worker.to_string())
}

/// The file of lock `name`: `lock_dir/NAME.lock`. `name` must be valid ([`validate_name`]).
pub fn lock_path(lock_dir: &Path, name: &str) -> PathBuf {
    lock_dir.join(format!("{name}.lock"))
}

/// Puts a list of `(name, shared)` lock specs into the one global acquisition order: sorted by
/// name, each name once, exclusive (`shared == false`) winning when a name is listed both ways.
///
/// Every process that takes several locks takes them in this order, so two of them can never
/// each hold one lock the other waits for. The dedup also keeps a process from opening one lock
/// file twice, which would make it wait for itself (flock locks of separate opens conflict).
pub fn acquisition_order(names: &mut Vec<(String, bool)>) {
    // `false < true`: within one name the exclusive entry sorts first and survives the dedup.
    names.sort();
    names.dedup_by(|later, kept| later.0 == kept.0);
}

/// Makes sure `dir` is a directory fit to hold lock files: creates it (and missing parents) with
/// mode 0755 if it does not exist, and refuses a symlink, a non-directory, or a directory
/// writable by others (o+w, even with the sticky bit). Only the last component is checked, so a
/// symlinked parent such as `/var/run` is fine.
pub fn ensure_dir(dir: &Path) -> Result<(), LockError> {
    let handle = match open_dir(dir) {
        Ok(handle) => handle,
        Err(err) if err.kind() == io::ErrorKind::NotFound => create_dir(dir)?,
        Err(err) => return Err(dir_error(dir, err)),
    };
    let meta = handle.metadata().map_err(|source| LockError::Dir {
        path: dir.to_path_buf(),
        source,
    })?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o002 != 0 {
        return Err(LockError::UnsafeDir {
            path: dir.to_path_buf(),
            reason: format!(
                "it is writable by other users (mode {mode:04o}), who could replace lock files; \
                 remove that permission (chmod o-w)"
            ),
        });
    }
    Ok(())
}

/// Opens a directory without following a symlink in its last component. The handle (`O_PATH`,
/// no read permission needed) is what gets checked, so the check cannot be raced by renaming.
fn open_dir(dir: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(dir)
}

/// Creates a missing lock directory and returns a handle on it.
fn create_dir(dir: &Path) -> Result<File, LockError> {
    let failed = |source| LockError::CreateDir {
        path: dir.to_path_buf(),
        source,
    };
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .map_err(failed)?;
    }
    match fs::DirBuilder::new().mode(0o755).create(dir) {
        Ok(()) => {
            // The umask may have narrowed 0755, and users other than the master (cron jobs
            // running `plumule lock`) must reach the lock files. Through a handle that does not
            // follow symlinks, so nobody can redirect the chmod.
            let handle = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
                .open(dir)
                .map_err(|err| dir_error(dir, err))?;
            handle
                .set_permissions(Permissions::from_mode(0o755))
                .map_err(failed)?;
            Ok(handle)
        }
        // Created by somebody else in the meantime: judge it like any existing directory.
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {
            open_dir(dir).map_err(|err| dir_error(dir, err))
        }
        Err(err) => Err(failed(err)),
    }
}

/// Turns a failed open of the lock directory into the error that says what is there.
fn dir_error(dir: &Path, err: io::Error) -> LockError {
    if matches!(err.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)) {
        if let Ok(meta) = fs::symlink_metadata(dir) {
            let reason = if meta.file_type().is_symlink() {
                Some("it is a symlink")
            } else if !meta.is_dir() {
                Some("it is not a directory")
            } else {
                None
            };
            if let Some(reason) = reason {
                return LockError::UnsafeDir {
                    path: dir.to_path_buf(),
                    reason: reason.to_string(),
                };
            }
        }
    }
    LockError::Dir {
        path: dir.to_path_buf(),
        source: err,
    }
}

/// Opens (creating it if needed) the lock file at `path` and returns a close-on-exec descriptor.
///
/// The file is opened with `O_NOFOLLOW | O_CLOEXEC | O_NOCTTY | O_NONBLOCK` (the last so that a
/// FIFO or device planted there cannot make the open hang; it changes nothing for `flock`). A new
/// file is created exclusively and given exactly mode 0644, or 0664 with `group_writable`,
/// whatever the umask. An existing file is opened read-write, or read-only when we may not write
/// it: `flock` needs no write permission, and this lets an unprivileged `plumule lock` share lock
/// files created by a master running as root. A symlink at `path` is refused
/// ([`LockError::Symlink`]) and its target left untouched; anything else that is not a regular
/// file is refused too ([`LockError::NotRegular`]).
pub fn open_lock_file(path: &Path, group_writable: bool) -> Result<OwnedFd, LockError> {
    let mode = if group_writable { 0o664 } else { 0o644 };
    let flags = libc::O_NOFOLLOW | libc::O_NOCTTY | libc::O_NONBLOCK;
    let failed = |err: io::Error| open_error(path, err);
    // Bounded: each round needs the file to appear and then vanish again in between our opens.
    let mut last_error = None;
    for _ in 0..5 {
        // O_EXCL never follows a symlink: one planted here fails with EEXIST, then ELOOP below.
        match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(flags)
            .open(path)
        {
            Ok(file) => {
                file.set_permissions(Permissions::from_mode(mode))
                    .map_err(failed)?;
                return regular_file(path, file);
            }
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
            Err(err) => return Err(failed(err)),
        }
        let existing = |write| {
            OpenOptions::new()
                .read(true)
                .write(write)
                .custom_flags(flags)
                .open(path)
        };
        match existing(true) {
            Ok(file) => return regular_file(path, file),
            Err(err) if err.kind() == io::ErrorKind::PermissionDenied => {
                return regular_file(path, existing(false).map_err(failed)?);
            }
            // Removed between our two opens: create it again.
            Err(err) if err.kind() == io::ErrorKind::NotFound => last_error = Some(err),
            Err(err) => return Err(failed(err)),
        }
    }
    Err(failed(last_error.unwrap_or_else(|| {
        io::Error::from_raw_os_error(libc::ENOENT)
    })))
}

/// Accepts `file` only if fstat says it is a regular file.
fn regular_file(path: &Path, file: File) -> Result<OwnedFd, LockError> {
    let meta = file.metadata().map_err(|err| open_error(path, err))?;
    let kind = meta.file_type();
    if kind.is_file() {
        return Ok(OwnedFd::from(file));
    }
    let what = if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_char_device() || kind.is_block_device() {
        "a device"
    } else {
        "of an unknown type"
    };
    Err(LockError::NotRegular {
        path: path.to_path_buf(),
        kind: what,
    })
}

/// Turns a failed open of a lock file into the error that says what is there.
fn open_error(path: &Path, err: io::Error) -> LockError {
    match err.raw_os_error() {
        // With O_NOFOLLOW, ELOOP means the last component is a symlink; make sure before saying so.
        Some(libc::ELOOP)
            if fs::symlink_metadata(path).is_ok_and(|meta| meta.file_type().is_symlink()) =>
        {
            LockError::Symlink {
                path: path.to_path_buf(),
            }
        }
        Some(libc::EISDIR) => LockError::NotRegular {
            path: path.to_path_buf(),
            kind: "a directory",
        },
        _ => LockError::Open {
            path: path.to_path_buf(),
            source: err,
        },
    }
}

/// A held lock. Dropping it unlocks (`LOCK_UN`, which releases the lock even where a forked child
/// still shares the descriptor) and closes the file.
#[derive(Debug)]
pub struct LockGuard {
    file: File,
    name: String,
    path: PathBuf,
    mode: Mode,
}

impl LockGuard {
    /// The lock's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the lock is held exclusive or shared.
    pub fn mode(&self) -> Mode {
        self.mode
    }
}

impl AsFd for LockGuard {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        // Failing to unlock leaves closing the file, which releases the lock unless the
        // descriptor was shared; nothing better can be done here.
        let _ = FileExt::unlock(&self.file);
    }
}

/// Takes lock `name` in `lock_dir` (creating the directory and the lock file when missing, see
/// [`ensure_dir`] and [`open_lock_file`]) and returns the guard that holds it.
///
/// A lock held elsewhere gives [`LockError::Busy`] with `Wait::NonBlock`, or once a
/// `Wait::Timeout` expires (read its documentation before using it in a multi-threaded program
/// that uses SIGALRM). `Wait::Block` waits until the lock is free, through EINTR.
pub fn acquire(
    lock_dir: &Path,
    name: &str,
    mode: Mode,
    wait: Wait,
) -> Result<LockGuard, LockError> {
    validate_name(name).map_err(|reason| LockError::InvalidName {
        name: name.to_string(),
        reason,
    })?;
    ensure_dir(lock_dir)?;
    let path = lock_path(lock_dir, name);
    let file = File::from(open_lock_file(&path, false)?);
    let failed = |source| LockError::Lock {
        path: path.clone(),
        source,
    };
    let busy = |waited| LockError::Busy {
        name: name.to_string(),
        waited,
    };

    match wait {
        Wait::Block => lock_blocking(&file, mode).map_err(failed)?,
        Wait::NonBlock => {
            if !try_lock(&file, mode).map_err(failed)? {
                return Err(busy(None));
            }
        }
        Wait::Timeout(timeout) => {
            if !lock_within(&file, mode, timeout).map_err(|err| match err {
                TimedError::Lock(source) => failed(source),
                TimedError::Timer(source) => LockError::Timer {
                    name: name.to_string(),
                    source,
                },
            })? {
                let waited = (!timeout.is_zero()).then_some(timeout);
                return Err(busy(waited));
            }
        }
    }
    Ok(LockGuard {
        file,
        name: name.to_string(),
        path,
        mode,
    })
}

/// One blocking `flock`; EINTR when a signal handler ran meanwhile.
fn flock_wait(file: &File, mode: Mode) -> io::Result<()> {
    match mode {
        Mode::Exclusive => FileExt::lock_exclusive(file),
        Mode::Shared => FileExt::lock_shared(file),
    }
}

/// Waits for the lock as long as it takes, through EINTR.
fn lock_blocking(file: &File, mode: Mode) -> io::Result<()> {
    loop {
        match flock_wait(file, mode) {
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

enum TimedError {
    Lock(io::Error),
    Timer(io::Error),
}

/// Ok(true): locked within `timeout`; Ok(false): still held elsewhere when it expired.
fn lock_within(file: &File, mode: Mode, timeout: Duration) -> Result<bool, TimedError> {
    let started = Instant::now();
    // Free locks are the common case: take them without touching signals.
    if try_lock(file, mode).map_err(TimedError::Lock)? {
        return Ok(true);
    }
    if timeout.is_zero() {
        return Ok(false);
    }
    // A deadline past the end of time is no deadline.
    let Some(deadline) = started.checked_add(timeout) else {
        return lock_blocking(file, mode)
            .map(|()| true)
            .map_err(TimedError::Lock);
    };
    let remaining = deadline.saturating_duration_since(Instant::now());
    if remaining.is_zero() {
        return Ok(false);
    }
    let _alarm = crate::sys::alarm::Alarm::arm(remaining).map_err(TimedError::Timer)?;
    loop {
        match flock_wait(file, mode) {
            Ok(()) => return Ok(true),
            // Our timer, or another signal: give up only once the deadline has passed.
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {
                if Instant::now() >= deadline {
                    return Ok(false);
                }
            }
            Err(err) => return Err(TimedError::Lock(err)),
        }
    }
}

/// Ok(true): locked; Ok(false): held elsewhere.
fn try_lock(file: &File, mode: Mode) -> io::Result<bool> {
    let result = match mode {
        Mode::Exclusive => FileExt::try_lock_exclusive(file),
        Mode::Shared => FileExt::try_lock_shared(file),
    };
    match result {
        Ok(()) => Ok(true),
        Err(err) if err.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(false),
        Err(err) => Err(err),
    }
}

/// `plumule lock NAME [--shared] [--timeout DUR | --nonblock] -- CMD…`: runs `cmd` (program and
/// arguments, looked up in PATH, stdio inherited) holding lock `name`, and returns the exit code
/// for the process. Messages go to stderr. See the module documentation for the exit codes, the
/// inherited descriptor and signals.
///
/// Meant for the `plumule lock` process itself: the descriptor CMD inherits is made inheritable
/// just around the spawn, and a process that forks from other threads meanwhile would leak it.
pub fn run_locked(lock_dir: &Path, name: &str, mode: Mode, wait: Wait, cmd: &[OsString]) -> i32 {
    if let Err(reason) = validate_name(name) {
        eprintln!("plumule lock: invalid lock name {name:?}: {reason}");
        return EXIT_USAGE;
    }
    let Some((program, args)) = cmd.split_first() else {
        eprintln!("plumule lock: no command given (plumule lock NAME [OPTIONS] -- CMD...)");
        return EXIT_USAGE;
    };
    let guard = match acquire(lock_dir, name, mode, wait) {
        Ok(guard) => guard,
        Err(err) => {
            eprintln!("plumule lock: {err}");
            return if err.is_busy() {
                EXIT_BUSY
            } else {
                EXIT_FAILURE
            };
        }
    };
    let inherited = match inheritable_copy(&guard) {
        Ok(file) => file,
        Err(err) => {
            eprintln!("plumule lock: cannot pass lock {name} to the command: {err}");
            return EXIT_FAILURE;
        }
    };
    let spawned = Command::new(program).args(args).spawn();
    // CMD has its copy (or none, if it did not start); ours must not reach anything else.
    drop(inherited);
    let mut child = match spawned {
        Ok(child) => child,
        Err(err) => {
            eprintln!(
                "plumule lock: cannot run {}: {err}",
                program.to_string_lossy()
            );
            return spawn_failure_code(&err);
        }
    };
    let status = match child.wait() {
        Ok(status) => status,
        Err(err) => {
            eprintln!(
                "plumule lock: cannot wait for {}: {err}",
                program.to_string_lossy()
            );
            return EXIT_FAILURE;
        }
    };
    drop(guard);
    exit_code(status)
}

/// A descriptor of the guard's open file description without close-on-exec, for CMD to inherit.
fn inheritable_copy(guard: &LockGuard) -> io::Result<File> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    let copy = guard.file.try_clone()?;
    fcntl(copy.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::empty()))?;
    Ok(copy)
}

/// The shell's codes for a command that could not be started.
pub(crate) fn spawn_failure_code(err: &io::Error) -> i32 {
    match err.raw_os_error() {
        Some(libc::ENOENT) => EXIT_NOT_FOUND,
        Some(
            libc::EACCES
            | libc::EPERM
            | libc::ENOEXEC
            | libc::EISDIR
            | libc::ENOTDIR
            | libc::ETXTBSY
            | libc::ELOOP
            | libc::ENAMETOOLONG
            | libc::E2BIG,
        ) => EXIT_CANNOT_EXEC,
        _ => EXIT_FAILURE,
    }
}

/// A shell's `$?` for a finished command.
pub(crate) fn exit_code(status: ExitStatus) -> i32 {
    match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(signal)) => 128 + signal,
        (None, None) => EXIT_FAILURE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::symlink;
    use std::sync::{Mutex, MutexGuard};
    use std::thread;

    /// Tests that use `Wait::Timeout` (which swaps the SIGALRM action) or read that action run one
    /// at a time, so none sees another's temporary handler.
    static SIGALRM_TESTS: Mutex<()> = Mutex::new(());

    fn sigalrm_serial() -> MutexGuard<'static, ()> {
        SIGALRM_TESTS
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn sigalrm_action() -> (libc::sighandler_t, libc::c_int) {
        crate::sys::alarm::current_action().expect("sigaction query")
    }

    /// Waits until `done` holds, failing with what never happened once `within` has passed.
    fn wait_for(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + within;
        while !done() {
            assert!(
                Instant::now() < deadline,
                "{what} did not happen within {within:?}"
            );
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// True while some process waits in flock for the file `path` (a `->` line in /proc/locks).
    fn has_waiter(path: &Path) -> bool {
        let inode = fs::metadata(path).unwrap().ino();
        let locks = fs::read_to_string("/proc/locks").unwrap();
        locks
            .lines()
            .any(|line| line.contains("->") && line.contains(&format!(":{inode} ")))
    }

    fn scratch() -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("locks");
        (tmp, dir)
    }

    fn mode_of(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().mode() & 0o7777
    }

    fn chmod(path: &Path, mode: u32) {
        fs::set_permissions(path, Permissions::from_mode(mode)).unwrap();
    }

    fn args(items: &[&str]) -> Vec<OsString> {
        items.iter().map(OsString::from).collect()
    }

    #[test]
    fn names_are_validated() {
        let longest = "a".repeat(100);
        let too_long = "a".repeat(101);
        let cases: &[(&str, Option<&str>)] = &[
            ("db", None),
            ("db-migrations", None),
            ("disk-3", None),
            ("A.b_c-9", None),
            ("a..b", None),
            ("x.", None),
            (&longest, None),
            ("", Some("empty")),
            (".hidden", Some("starts with a dot")),
            (".", Some("starts with a dot")),
            ("..", Some("starts with a dot")),
            ("a/b", Some("'/'")),
            ("../etc/passwd", Some("'/'")),
            ("/abs", Some("'/'")),
            ("a b", Some("' '")),
            ("tab\t", Some("'\\t'")),
            ("nul\0", Some("'\\0'")),
            ("café", Some("'é'")),
            ("disk-{worker}", Some("'{'")),
            (&too_long, Some("101 characters")),
        ];
        for (name, expected) in cases {
            match (validate_name(name), expected) {
                (Ok(()), None) => {}
                (Err(e), Some(part)) => {
                    let message = e.to_string();
                    assert!(
                        message.contains(part),
                        "{name:?}: {message:?} lacks {part:?}"
                    )
                }
                (result, _) => panic!("{name:?}: got {result:?}, expected {expected:?}"),
            }
        }
    }

    #[test]
    fn worker_ids_expand_and_paths_are_name_dot_lock() {
        assert_eq!(expand("disk-{worker}", 3), "disk-3");
        assert_eq!(expand("{worker}-{worker}", 0), "0-0");
        assert_eq!(expand("db", 7), "db");
        assert_eq!(
            lock_path(Path::new("/run/plumule/locks"), "db"),
            Path::new("/run/plumule/locks/db.lock")
        );
    }

    #[test]
    fn acquisition_order_sorts_dedups_and_prefers_exclusive() {
        let mut specs = vec![
            ("b".to_string(), true),
            ("a".to_string(), true),
            ("c".to_string(), false),
            ("b".to_string(), false),
            ("a".to_string(), true),
        ];
        acquisition_order(&mut specs);
        let expected = [("a", true), ("b", false), ("c", false)];
        let expected: Vec<_> = expected.iter().map(|(n, s)| (n.to_string(), *s)).collect();
        assert_eq!(specs, expected);
    }

    #[test]
    fn ensure_dir_creates_missing_dirs_0755() {
        let (_tmp, dir) = scratch();
        let nested = dir.join("deeper");
        ensure_dir(&nested).unwrap();
        assert!(nested.is_dir());
        assert_eq!(mode_of(&nested), 0o755);
        // Existing and fine (group-writable is allowed: control_group).
        chmod(&nested, 0o775);
        ensure_dir(&nested).unwrap();
    }

    #[test]
    fn ensure_dir_refuses_world_writable_symlinks_and_files() {
        let (tmp, dir) = scratch();
        fs::create_dir(&dir).unwrap();
        for mode in [0o777, 0o1777, 0o757] {
            chmod(&dir, mode);
            let err = ensure_dir(&dir).unwrap_err();
            assert!(
                matches!(err, LockError::UnsafeDir { .. }),
                "{mode:o}: {err}"
            );
            assert!(err.to_string().contains("writable by other users"), "{err}");
            let err = acquire(&dir, "x", Mode::Exclusive, Wait::NonBlock).unwrap_err();
            assert!(matches!(err, LockError::UnsafeDir { .. }), "{err}");
        }
        chmod(&dir, 0o755);
        assert!(
            !lock_path(&dir, "x").exists(),
            "no lock file made in a refused dir"
        );

        let link = tmp.path().join("link");
        symlink(&dir, &link).unwrap();
        let err = ensure_dir(&link).unwrap_err();
        assert!(err.to_string().contains("is a symlink"), "{err}");

        let file = tmp.path().join("file");
        fs::write(&file, "").unwrap();
        let err = ensure_dir(&file).unwrap_err();
        assert!(err.to_string().contains("not a directory"), "{err}");
    }

    #[test]
    fn new_lock_files_get_exact_modes_and_existing_ones_keep_theirs() {
        let (_tmp, dir) = scratch();
        ensure_dir(&dir).unwrap();
        let plain = lock_path(&dir, "plain");
        drop(open_lock_file(&plain, false).unwrap());
        assert_eq!(mode_of(&plain), 0o644);
        let group = lock_path(&dir, "group");
        drop(open_lock_file(&group, true).unwrap());
        assert_eq!(mode_of(&group), 0o664);
        chmod(&plain, 0o600);
        drop(open_lock_file(&plain, true).unwrap());
        assert_eq!(mode_of(&plain), 0o600);
    }

    #[test]
    fn lock_fds_are_close_on_exec() {
        let (_tmp, dir) = scratch();
        let guard = acquire(&dir, "x", Mode::Exclusive, Wait::NonBlock).unwrap();
        let flags = nix::fcntl::fcntl(guard.as_fd().as_raw_fd(), nix::fcntl::FcntlArg::F_GETFD);
        assert_ne!(flags.unwrap() & libc::FD_CLOEXEC, 0);
    }

    #[test]
    fn symlink_at_lock_path_is_refused_and_target_untouched() {
        let (tmp, dir) = scratch();
        ensure_dir(&dir).unwrap();
        let target = tmp.path().join("precious");
        fs::write(&target, "keep me").unwrap();
        chmod(&target, 0o600);
        let path = lock_path(&dir, "x");
        symlink(&target, &path).unwrap();

        let err = open_lock_file(&path, false).unwrap_err();
        assert!(matches!(err, LockError::Symlink { .. }), "{err}");
        assert!(err.to_string().contains("refusing symlink"), "{err}");
        let err = acquire(&dir, "x", Mode::Exclusive, Wait::NonBlock).unwrap_err();
        assert!(matches!(err, LockError::Symlink { .. }), "{err}");
        assert_eq!(fs::read_to_string(&target).unwrap(), "keep me");
        assert_eq!(mode_of(&target), 0o600);

        // A dangling symlink does not get its target created.
        let missing = tmp.path().join("missing");
        symlink(&missing, lock_path(&dir, "y")).unwrap();
        let err = acquire(&dir, "y", Mode::Shared, Wait::NonBlock).unwrap_err();
        assert!(matches!(err, LockError::Symlink { .. }), "{err}");
        assert!(!missing.exists());
    }

    #[test]
    fn non_regular_lock_files_are_refused() {
        let (_tmp, dir) = scratch();
        ensure_dir(&dir).unwrap();
        fs::create_dir(lock_path(&dir, "adir")).unwrap();
        let err = open_lock_file(&lock_path(&dir, "adir"), false).unwrap_err();
        assert!(
            err.to_string().contains("a directory, not a regular file"),
            "{err}"
        );
        let fifo = lock_path(&dir, "afifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
        let err = open_lock_file(&fifo, false).unwrap_err();
        assert!(
            err.to_string().contains("a FIFO, not a regular file"),
            "{err}"
        );
    }

    #[test]
    fn exclusive_excludes_everything_until_dropped() {
        // flock locks belong to the open file description: two opens in one process conflict.
        let (_tmp, dir) = scratch();
        let held = acquire(&dir, "x", Mode::Exclusive, Wait::Block).unwrap();
        assert_eq!((held.name(), held.mode()), ("x", Mode::Exclusive));
        assert_eq!(held.path(), lock_path(&dir, "x"));
        for mode in [Mode::Exclusive, Mode::Shared] {
            let err = acquire(&dir, "x", mode, Wait::NonBlock).unwrap_err();
            assert!(err.is_busy(), "{mode:?}: {err}");
            assert_eq!(err.to_string(), "lock x is held by another process");
        }
        // Other names, such as another worker's `disk-{worker}`, are independent.
        let _other = acquire(
            &dir,
            &expand("disk-{worker}", 1),
            Mode::Exclusive,
            Wait::NonBlock,
        )
        .unwrap();
        drop(held);
        acquire(&dir, "x", Mode::Exclusive, Wait::NonBlock).unwrap();
    }

    #[test]
    fn shared_locks_coexist_and_exclude_exclusive() {
        let (_tmp, dir) = scratch();
        let first = acquire(&dir, "x", Mode::Shared, Wait::NonBlock).unwrap();
        let second = acquire(&dir, "x", Mode::Shared, Wait::NonBlock).unwrap();
        let err = acquire(&dir, "x", Mode::Exclusive, Wait::NonBlock).unwrap_err();
        assert!(err.is_busy(), "{err}");
        drop(first);
        assert!(acquire(&dir, "x", Mode::Exclusive, Wait::NonBlock)
            .unwrap_err()
            .is_busy());
        drop(second);
        acquire(&dir, "x", Mode::Exclusive, Wait::NonBlock).unwrap();
    }

    #[test]
    fn invalid_names_are_refused_before_touching_the_disk() {
        let (_tmp, dir) = scratch();
        let err = acquire(&dir, "../x", Mode::Exclusive, Wait::NonBlock).unwrap_err();
        assert!(matches!(err, LockError::InvalidName { .. }), "{err}");
        assert!(!dir.exists());
    }

    #[test]
    fn a_blocked_waiter_proceeds_when_the_holder_lets_go() {
        let _serial = sigalrm_serial();
        let before = sigalrm_action();
        let (_tmp, dir) = scratch();
        for wait in [Wait::Block, Wait::Timeout(Duration::from_secs(10))] {
            let held = acquire(&dir, "x", Mode::Exclusive, Wait::Block).unwrap();
            let path = held.path().to_path_buf();
            // Let go only once the waiter below is really asleep in flock.
            let releaser = thread::spawn(move || {
                wait_for("a waiter in /proc/locks", Duration::from_secs(10), || {
                    has_waiter(&path)
                });
                drop(held);
            });
            let started = Instant::now();
            let guard = acquire(&dir, "x", Mode::Shared, wait).unwrap();
            assert!(started.elapsed() < Duration::from_secs(10), "{wait:?}");
            releaser.join().unwrap();
            drop(guard);
        }
        assert_eq!(sigalrm_action(), before);
    }

    #[test]
    fn timeout_gives_busy_after_the_timeout_and_restores_sigalrm() {
        let _serial = sigalrm_serial();
        let before = sigalrm_action();
        let (_tmp, dir) = scratch();
        let _held = acquire(&dir, "x", Mode::Exclusive, Wait::Block).unwrap();
        let timeout = Duration::from_millis(300);
        let started = Instant::now();
        let err = acquire(&dir, "x", Mode::Exclusive, Wait::Timeout(timeout)).unwrap_err();
        let waited = started.elapsed();
        assert!(err.is_busy(), "{err}");
        assert_eq!(
            err.to_string(),
            "lock x is still held by another process after 300ms"
        );
        assert!(waited >= timeout, "gave up after {waited:?}");
        assert!(
            waited < Duration::from_secs(10),
            "gave up only after {waited:?}"
        );
        assert_eq!(sigalrm_action(), before);

        let err = acquire(&dir, "x", Mode::Shared, Wait::Timeout(Duration::ZERO)).unwrap_err();
        assert!(err.is_busy(), "{err}");
    }

    #[test]
    fn concurrent_timeouts_each_expire_and_restore_sigalrm_once() {
        let _serial = sigalrm_serial();
        let before = sigalrm_action();
        let (_tmp, dir) = scratch();
        let _held = acquire(&dir, "x", Mode::Exclusive, Wait::Block).unwrap();
        let waiters: Vec<_> = [150, 400]
            .into_iter()
            .map(|ms| {
                let dir = dir.clone();
                thread::spawn(move || {
                    let timeout = Duration::from_millis(ms);
                    let started = Instant::now();
                    let result = acquire(&dir, "x", Mode::Shared, Wait::Timeout(timeout));
                    (result.map(drop), started.elapsed(), timeout)
                })
            })
            .collect();
        for waiter in waiters {
            let (result, waited, timeout) = waiter.join().unwrap();
            assert!(result.unwrap_err().is_busy());
            assert!(
                waited >= timeout && waited < Duration::from_secs(10),
                "{waited:?}"
            );
        }
        assert_eq!(sigalrm_action(), before);
    }

    #[test]
    fn run_locked_passes_the_exit_status_through() {
        let (_tmp, dir) = scratch();
        let run = |cmd: &[&str]| run_locked(&dir, "x", Mode::Exclusive, Wait::Block, &args(cmd));
        assert_eq!(run(&["sh", "-c", "exit 0"]), 0);
        assert_eq!(run(&["sh", "-c", "exit 7"]), 7);
        assert_eq!(run(&["sh", "-c", "kill -TERM $$"]), 128 + libc::SIGTERM);
    }

    #[test]
    fn run_locked_gives_75_when_the_lock_is_busy() {
        let _serial = sigalrm_serial();
        let (tmp, dir) = scratch();
        let marker = tmp.path().join("ran");
        let cmd = args(&["sh", "-c", r#": > "$1""#, "sh", marker.to_str().unwrap()]);
        let _held = acquire(&dir, "x", Mode::Exclusive, Wait::Block).unwrap();
        assert_eq!(
            run_locked(&dir, "x", Mode::Shared, Wait::NonBlock, &cmd),
            EXIT_BUSY
        );
        let timeout = Wait::Timeout(Duration::from_millis(100));
        assert_eq!(
            run_locked(&dir, "x", Mode::Exclusive, timeout, &cmd),
            EXIT_BUSY
        );
        assert!(!marker.exists(), "the command ran without the lock");
    }

    #[test]
    fn run_locked_usage_and_exec_errors() {
        let (tmp, dir) = scratch();
        let run = |name: &str, cmd: &[&str]| {
            run_locked(&dir, name, Mode::Exclusive, Wait::NonBlock, &args(cmd))
        };
        assert_eq!(run("a/b", &["true"]), EXIT_USAGE);
        assert_eq!(run("", &["true"]), EXIT_USAGE);
        assert_eq!(run("x", &[]), EXIT_USAGE);
        assert_eq!(run("x", &["plumule-test-no-such-command"]), EXIT_NOT_FOUND);
        let script = tmp.path().join("not-executable");
        fs::write(&script, "#!/bin/sh\n").unwrap();
        chmod(&script, 0o644);
        assert_eq!(run("x", &[script.to_str().unwrap()]), EXIT_CANNOT_EXEC);
        chmod(&dir, 0o777);
        assert_eq!(run("x", &["true"]), EXIT_FAILURE);
    }

    #[test]
    fn run_locked_holds_the_lock_while_the_command_runs() {
        let _serial = sigalrm_serial();
        let (tmp, dir) = scratch();
        let ready = tmp.path().join("ready");
        let go = tmp.path().join("go");
        let fds = tmp.path().join("fds");
        nix::unistd::mkfifo(&go, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        // Lists its descriptors' targets, says it runs, then waits for a line on the FIFO.
        let script = r#"for fd in /proc/$$/fd/*; do readlink "$fd"; done > "$1"; : > "$2"; read line < "$3""#;
        let cmd = args(&[
            "sh",
            "-c",
            script,
            "sh",
            fds.to_str().unwrap(),
            ready.to_str().unwrap(),
            go.to_str().unwrap(),
        ]);
        let runner = {
            let dir = dir.clone();
            thread::spawn(move || run_locked(&dir, "x", Mode::Exclusive, Wait::Block, &cmd))
        };
        wait_for("the command to start", Duration::from_secs(10), || {
            ready.exists()
        });
        let err = acquire(&dir, "x", Mode::Shared, Wait::NonBlock).unwrap_err();
        assert!(err.is_busy(), "{err}");
        // CMD inherited a descriptor of the lock (so it keeps it if `plumule lock` dies).
        let lock_file = lock_path(&dir, "x").to_str().unwrap().to_string();
        let inherited = fs::read_to_string(&fds).unwrap();
        assert!(inherited.lines().any(|l| l == lock_file), "{inherited}");

        let mut writer = None;
        wait_for(
            "the command to open the FIFO",
            Duration::from_secs(10),
            || {
                let opened = OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(&go);
                writer = opened.ok();
                writer.is_some()
            },
        );
        writer.unwrap().write_all(b"go\n").unwrap();
        assert_eq!(runner.join().unwrap(), 0);
        // Free again. Not NonBlock: a child that another test spawns at the wrong moment may
        // briefly hold an inherited copy.
        acquire(
            &dir,
            "x",
            Mode::Exclusive,
            Wait::Timeout(Duration::from_secs(10)),
        )
        .unwrap();
    }
}
