//! Worker output in the master: the pipes it reads, where their lines go (its log, a rotating
//! file, the `logs` ring), SIGUSR1's reopening of files, and [`event`], which puts what the
//! master says about a worker in the same ring.

use std::collections::HashMap;
use std::fmt;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;

use nix::unistd::Pid;

use super::supervisor::{Proc, Supervisor};
use crate::config::OutputSpec;
use crate::output::{LineSplitter, LogRing, RotatingFile, Stream, DEFAULT_MAX_LINE};
use crate::slot::StartWait;
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
            Stream::Plumule => return,
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

    /// Reads what is left in an exited worker's pipes, to their end.
    pub(super) fn drain_output(&mut self, proc: &mut Proc) {
        for (pipe, stream) in [
            (proc.stdout.as_mut(), Stream::Stdout),
            (proc.stderr.as_mut(), Stream::Stderr),
        ] {
            if let Some(pipe) = pipe {
                pump(
                    pipe,
                    &proc.tag,
                    stream,
                    &mut self.files,
                    &mut self.log_ring,
                    true,
                );
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

/// Says what happened to the worker `tag` (`web.2`): logs `web.2: <what>` at `level`, and
/// keeps `plumule: <what>` in the ring as a [`Stream::Plumule`] line of that worker, so that
/// `plumule logs web` shows the worker's starts, exits and restarts among its output, in the
/// order they happened. The prefix tells the event apart where the stream is not shown.
///
/// Takes the ring rather than the supervisor so that callers may hold other parts of it
/// (the program, the slot) while they describe the event.
pub(super) fn event(
    ring: &mut LogRing,
    level: log::Level,
    tag: impl fmt::Display,
    what: fmt::Arguments,
) {
    let (tag, what) = (tag.to_string(), what.to_string());
    log::log!(level, "{tag}: {what}");
    ring.push(&tag, Stream::Plumule, format!("plumule: {what}").as_bytes());
}

/// Records that a starting worker now runs, when its start waited for more than its exec:
/// for its `READY=1` (`ready = "notify"`) or for a file lock.
pub(super) fn now_running(ring: &mut LogRing, tag: impl fmt::Display, waited: &StartWait) {
    match waited {
        StartWait::Exec => {}
        StartWait::Ready => event(ring, log::Level::Info, tag, format_args!("ready (READY=1)")),
        StartWait::Lock(name) => event(
            ring,
            log::Level::Info,
            tag,
            format_args!("running (holds lock {name})"),
        ),
    }
}

/// Reads what a worker wrote and forwards it line by line. Returns true at end of file.
/// One read per call (64 KiB) unless `to_end`: the descriptor stays ready and the loop comes
/// back to it after the others, so a worker that floods its output cannot hold up restarts,
/// requests or other workers' lines (about 14 000 short lines per read were enough to
/// slow a crash-looping neighbour's restarts fivefold).
pub(super) fn pump(
    pipe: &mut OutPipe,
    tag: &str,
    stream: Stream,
    files: &mut HashMap<PathBuf, RotatingFile>,
    ring: &mut LogRing,
    to_end: bool,
) -> bool {
    let mut buf = [0u8; 64 * 1024];
    let eof = loop {
        match sys::read_available(pipe.fd.as_raw_fd(), &mut buf) {
            Ok(Some(0)) if !to_end => break false,
            Ok(Some(0)) => break true,
            Ok(Some(n)) => {
                let sink = &pipe.sink;
                pipe.splitter
                    .push(&buf[..n], |line| emit(sink, tag, stream, line, files, ring));
                if !to_end {
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
