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
//!   across exec is always a deliberate act of the caller.
//! - **One global order.** A process that takes several locks takes them sorted by name, each
//!   name once, with exclusive winning over shared for a name listed twice
//!   ([`acquisition_order`]). Two programs sharing two locks therefore never deadlock, and a
//!   worker never waits on itself by opening the same lock file twice.

use std::fs::{self, File, OpenOptions, Permissions};
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Longest valid lock name, in bytes.
pub const MAX_NAME_LEN: usize = 100;

/// Why a lock could not be taken, or its directory or file not used.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// The name is not a valid lock name (see [`validate_name`]).
    #[error("invalid lock name {name:?}: {reason}")]
    InvalidName { name: String, reason: String },
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
}

/// Checks a lock name (after `{worker}` expansion): `[A-Za-z0-9._-]{1,100}`, not starting with a
/// dot. The error says what is wrong, without repeating the name.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the name is empty".to_string());
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "it contains {bad:?}; only ASCII letters, digits, '.', '_' and '-' are allowed"
        ));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "it is {} characters long; the limit is {MAX_NAME_LEN}",
            name.len()
        ));
    }
    if name.starts_with('.') {
        return Err("it starts with a dot".to_string());
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;
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
                (Err(message), Some(part)) => {
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
        }
        chmod(&dir, 0o755);

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
        assert_eq!(fs::read_to_string(&target).unwrap(), "keep me");
        assert_eq!(mode_of(&target), 0o600);

        // A dangling symlink does not get its target created.
        let missing = tmp.path().join("missing");
        symlink(&missing, lock_path(&dir, "y")).unwrap();
        let err = open_lock_file(&lock_path(&dir, "y"), false).unwrap_err();
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
}
