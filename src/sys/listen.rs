//! Listening sockets the master binds once and hands to every worker of a program (SPEC §6),
//! and the sockets systemd passed to the master by socket activation.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

/// Why a listening socket could not be made; each variant names the address or path.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("cannot bind tcp:{address}: {source}")]
    BindTcp {
        address: SocketAddr,
        source: io::Error,
    },
    #[error("cannot bind unix:{}: {source}", path.display())]
    BindUnix { path: PathBuf, source: io::Error },
    #[error("{} exists and is not a socket", path.display())]
    NotASocket { path: PathBuf },
    #[error("cannot remove the stale socket {}: {source}", path.display())]
    RemoveStale { path: PathBuf, source: io::Error },
    #[error("cannot create the folder {}: {source}", path.display())]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("cannot set mode {mode:04o} on {}: {source}", path.display())]
    Mode {
        path: PathBuf,
        mode: u32,
        source: io::Error,
    },
    #[error("cannot use systemd:{name}: systemd passed no socket of that name (LISTEN_FDNAMES)")]
    NotPassed { name: String },
}

/// Binds a TCP listener on `address`, with SO_REUSEADDR (std sets it). The descriptor is
/// close-on-exec; spawn places it at 3, 4, …
pub fn bind_tcp(address: SocketAddr) -> Result<OwnedFd, ListenError> {
    std::net::TcpListener::bind(address)
        .map(OwnedFd::from)
        .map_err(|source| ListenError::BindTcp { address, source })
}

/// Binds a Unix listener at `path` after removing a stale socket file (never another kind of
/// file), creating its folder, with `mode` when given. The descriptor is close-on-exec.
pub fn bind_unix(path: &Path, mode: Option<u32>) -> Result<OwnedFd, ListenError> {
    let owned = || path.to_path_buf();
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(ListenError::NotASocket { path: owned() });
        }
        std::fs::remove_file(path).map_err(|source| ListenError::RemoveStale {
            path: owned(),
            source,
        })?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| ListenError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    let listener = UnixListener::bind(path).map_err(|source| ListenError::BindUnix {
        path: owned(),
        source,
    })?;
    if let Some(mode) = mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(
            |source| ListenError::Mode {
                path: owned(),
                mode,
                source,
            },
        )?;
    }
    Ok(OwnedFd::from(listener))
}

/// Sockets passed to this process by systemd (`LISTEN_FDS` from 3, for our pid), by name.
/// They are made close-on-exec; workers get them only through `systemd:NAME` entries.
pub fn from_systemd() -> HashMap<String, OwnedFd> {
    let mut out = HashMap::new();
    let ours = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok());
    if ours != Some(std::process::id()) {
        return out;
    }
    let count: RawFd = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
        .map(|n| n.split(':').map(str::to_string).collect())
        .unwrap_or_default();
    for i in 0..count.clamp(0, 1024) {
        let fd = 3 + i;
        // Only adopt descriptors that are open.
        if nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).is_err() {
            continue;
        }
        let _ = nix::fcntl::fcntl(
            fd,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        );
        let name = names
            .get(i as usize)
            .cloned()
            .unwrap_or_else(|| format!("fd{fd}"));
        // SAFETY: systemd passed these descriptors to this process (LISTEN_PID is ours),
        // they are open (checked above), and nothing else in plumule owns them.
        out.insert(name, unsafe { OwnedFd::from_raw_fd(fd) });
    }
    out
}
