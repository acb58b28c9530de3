//! The master's pidfile: `runtime_dir/plumule.pid`, exclusively locked (flock, through fs2)
//! for the master's whole life, close-on-exec. The lock, not the file's presence, says that a
//! master runs: a stale file left by a crash is simply taken over.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use fs2::FileExt;

#[derive(Debug, thiserror::Error)]
pub enum PidfileError {
    #[error("another master (pid {pid}) already owns {dir}", pid = pid.map_or("unknown".to_string(), |p| p.to_string()), dir = dir.display())]
    Busy { pid: Option<i32>, dir: PathBuf },
    #[error("cannot use pidfile {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

pub struct Pidfile {
    file: File,
    path: PathBuf,
}

impl Pidfile {
    /// Takes the lock on `dir/plumule.pid` without waiting and writes our pid into it.
    pub fn acquire(dir: &Path) -> Result<Pidfile, PidfileError> {
        let path = dir.join("plumule.pid");
        let io_err = |source| PidfileError::Io {
            path: path.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(io_err)?;
        if let Err(e) = file.try_lock_exclusive() {
            if e.kind() != io::ErrorKind::WouldBlock && e.raw_os_error() != Some(libc::EWOULDBLOCK)
            {
                return Err(io_err(e));
            }
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            return Err(PidfileError::Busy {
                pid: text.trim().parse().ok(),
                dir: dir.to_path_buf(),
            });
        }
        file.set_len(0).map_err(io_err)?;
        file.rewind().map_err(io_err)?;
        writeln!(file, "{}", std::process::id()).map_err(io_err)?;
        Ok(Pidfile { file, path })
    }

    /// Removes the file while still holding the lock, so no other master can be misled.
    pub fn remove(self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = self.file.unlock();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_acquire_is_busy_and_names_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let first = Pidfile::acquire(dir.path()).unwrap();
        let text = std::fs::read_to_string(dir.path().join("plumule.pid")).unwrap();
        assert_eq!(text, format!("{}\n", std::process::id()));
        match Pidfile::acquire(dir.path()) {
            Err(PidfileError::Busy { pid, .. }) => assert_eq!(pid, Some(std::process::id() as i32)),
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("second acquire succeeded"),
        }
        first.remove();
        assert!(!dir.path().join("plumule.pid").exists());
        Pidfile::acquire(dir.path()).unwrap().remove();
    }
}
