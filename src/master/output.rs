//! Worker output in the master: the pipes it reads, where their lines go (its log, a rotating
//! file, the `logs` ring), and SIGUSR1's reopening of files.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;

use nix::unistd::Pid;

use super::supervisor::Supervisor;
use crate::config::OutputSpec;
use crate::output::{LineSplitter, LogRing, RotatingFile, Stream, DEFAULT_MAX_LINE};
use crate::sys;

pub(super) enum Sink {
    Log,
    File(PathBuf),
}

/// Why a worker's output could not be set up; its start fails with this reason.
#[derive(Debug, thiserror::Error)]
pub(super) enum OutputError {
    #[error("cannot open output file {}: {source}", path.display())]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create an output pipe: {0}")]
    Pipe(std::io::Error),
}

pub(super) struct OutPipe {
    pub(super) fd: OwnedFd,
    pub(super) splitter: LineSplitter,
    pub(super) sink: Sink,
}

impl Supervisor {
    /// The descriptor a worker writes `fd` (1 or 2) to, the write end to close after fork
    /// (if any), and the pipe the master reads (if any).
    #[allow(clippy::type_complexity)]
    pub(super) fn output(
        &mut self,
        spec: &OutputSpec,
        fd: RawFd,
    ) -> Result<(RawFd, Option<OwnedFd>, Option<OutPipe>), OutputError> {
        let sink = match spec {
            OutputSpec::Inherit => return Ok((fd, None, None)),
            OutputSpec::Null => return Ok((self.dev_null.as_raw_fd(), None, None)),
            OutputSpec::Log => Sink::Log,
            OutputSpec::File {
                path,
                max_size,
                keep,
            } => {
                if !self.files.contains_key(path) {
                    let file = RotatingFile::open(path, *max_size, *keep).map_err(|source| {
                        OutputError::Open {
                            path: path.clone(),
                            source,
                        }
                    })?;
                    self.files.insert(path.clone(), file);
                }
                Sink::File(path.clone())
            }
        };
        let (r, w) = sys::pipe(true).map_err(OutputError::Pipe)?;
        let raw = w.as_raw_fd();
        Ok((
            raw,
            Some(w),
            Some(OutPipe {
                fd: r,
                splitter: LineSplitter::new(DEFAULT_MAX_LINE),
                sink,
            }),
        ))
    }

    pub(super) fn read_output(&mut self, pid: Pid, stream: Stream) {
        let Some(proc) = self.procs.get_mut(&pid) else {
            return;
        };
        let tag = Arc::clone(&proc.tag);
        let pipe = match stream {
            Stream::Stdout => &mut proc.stdout,
            Stream::Stderr => &mut proc.stderr,
        };
        if let Some(p) = pipe {
            if pump(p, &tag, stream, &mut self.files, &mut self.log_ring, false) {
                // Out of the reactor before it closes: a child forked meanwhile may still
                // hold a copy until its exec, which would keep the end of file reported.
                self.reactor.remove(p.fd.as_raw_fd());
                *pipe = None;
            }
        }
    }

    pub(super) fn reopen_files(&mut self) {
        log::info!("SIGUSR1: reopening {} output file(s)", self.files.len());
        for file in self.files.values_mut() {
            if let Err(e) = file.reopen() {
                log::error!("cannot reopen {}: {e}", file.path().display());
            }
        }
    }
}

/// Reads what a worker wrote and forwards it line by line. Returns true at end of file.
/// Reads are bounded per call so that one chatty worker cannot starve the others.
pub(super) fn pump(
    pipe: &mut OutPipe,
    tag: &str,
    stream: Stream,
    files: &mut HashMap<PathBuf, RotatingFile>,
    ring: &mut LogRing,
    to_end: bool,
) -> bool {
    let mut buf = [0u8; 64 * 1024];
    let mut rounds = 0;
    let eof = loop {
        match sys::read_available(pipe.fd.as_raw_fd(), &mut buf) {
            Ok(Some(0)) if !to_end => break false,
            Ok(Some(0)) => break true,
            Ok(Some(n)) => {
                let sink = &pipe.sink;
                pipe.splitter
                    .push(&buf[..n], |line| emit(sink, tag, stream, line, files, ring));
                rounds += 1;
                if rounds >= 16 && !to_end {
                    break false;
                }
            }
            Ok(None) | Err(_) => break true,
        }
    };
    if eof {
        let sink = &pipe.sink;
        pipe.splitter
            .finish(|line| emit(sink, tag, stream, line, files, ring));
    }
    eof
}

fn emit(
    sink: &Sink,
    tag: &str,
    stream: Stream,
    line: &[u8],
    files: &mut HashMap<PathBuf, RotatingFile>,
    ring: &mut LogRing,
) {
    ring.push(tag, stream, line);
    match sink {
        Sink::Log => crate::logging::worker_line(tag, line),
        Sink::File(path) => {
            if let Some(f) = files.get_mut(path) {
                if let Err(e) = f.write_line(line) {
                    log::warn!("{tag}: cannot write to {}: {e}", path.display());
                }
            }
        }
    }
}
