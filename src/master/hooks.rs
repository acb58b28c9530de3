//! What a program that embeds the master (the library's [`crate::ServiceManager`]) is told, and
//! what it may ask for. The binary has no hooks: every method here does nothing without them.
//!
//! Hooks are called from inside the supervisor's work (a spawn, a reap, a signal), so they
//! cannot act on the supervisor there: what they want done ([`Request`]) is queued by the
//! embedder and taken at the start of each planning round of [`Supervisor::settle`], where it
//! is applied like a control request.

use std::time::Instant;

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::supervisor::Supervisor;
use crate::slot::{Exit, SlotState, StartWait};

/// A change the embedding program asks of the master.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Request {
    /// Run `workers` workers of `program` (what `plumule scale` does).
    Scale { program: String, workers: u32 },
    /// Stop everything gracefully, as SIGTERM does.
    Shutdown,
    /// Enqueue these payloads on `queue` (what `plumule submit` does, without waiting).
    Submit { queue: String, jobs: Vec<Vec<u8>> },
}

/// How a stop that begins goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StopKind {
    /// Each worker gets its stop signal, then SIGKILL after its stop timeout (SIGTERM).
    Graceful,
    /// Every worker's process group gets SIGKILL at once (the library's SIGINT).
    Immediate,
}

/// The embedding program's side of the master. Every call happens on the master's thread.
pub(crate) trait Hooks {
    /// Worker `id` of `program` was forked as `pid`.
    fn spawned(&mut self, program: &str, id: u32, pid: Pid);
    /// Worker `id` of `program`, process `pid`, has ended and was reaped.
    fn exited(&mut self, program: &str, id: u32, pid: Pid, exit: Exit);
    /// SIGHUP (or `plumule reload`). Returning true means the embedder has handled it and
    /// each worker that runs is sent its `reload_signal`; false: the file is read again.
    fn reload(&mut self) -> bool;
    /// A stop begins because of `signal`.
    fn stopping(&mut self, signal: Signal) -> StopKind;
    /// What the embedder asks for since the last call.
    fn requests(&mut self) -> Vec<Request>;
}

impl Supervisor {
    pub(super) fn hook_spawned(&mut self, pool: usize, id: u32, pid: Pid) {
        if let Some(h) = self.hooks.as_mut() {
            h.spawned(&self.pools[pool].program.name, id, pid);
        }
    }

    pub(super) fn hook_exited(&mut self, pool: usize, id: u32, pid: Pid, exit: Exit) {
        if let Some(h) = self.hooks.as_mut() {
            h.exited(&self.pools[pool].program.name, id, pid, exit);
        }
    }

    /// SIGHUP with hooks: the hooks, then the reload signal to every worker that runs its
    /// body. Returns false when there are no hooks (the binary re-reads its file).
    pub(super) fn hook_reload(&mut self) -> bool {
        let Some(h) = self.hooks.as_mut() else {
            return false;
        };
        if !h.reload() {
            return false;
        }
        for pool in &self.pools {
            for (id, slot) in pool.slots.iter().enumerate() {
                let pid = match slot.state().current() {
                    SlotState::Running { pid, .. }
                    | SlotState::Starting {
                        pid,
                        wait: StartWait::Ready,
                        ..
                    } => *pid,
                    _ => continue,
                };
                let sig = pool.program.reload_signal;
                if let Err(e) = crate::sys::process::signal_process(pid, sig) {
                    log::warn!("{}: cannot send {sig}: {e}", pool.tag(id as u32));
                }
            }
        }
        true
    }

    /// A stop begins: the hooks say how. An immediate stop kills every worker's group now.
    pub(super) fn hook_stopping(&mut self, signal: Signal) {
        let Some(h) = self.hooks.as_mut() else {
            return;
        };
        if h.stopping(signal) == StopKind::Immediate {
            log::info!("{signal}: killing every worker at once");
            for &pid in self.procs.keys() {
                if let Err(e) = crate::sys::process::signal_group(pid, Signal::SIGKILL) {
                    log::warn!("cannot kill process group {pid}: {e}");
                }
            }
        }
    }

    /// Applies what the embedder asked for since the last pass.
    pub(super) fn hook_requests(&mut self, _now: Instant) {
        let Some(h) = self.hooks.as_mut() else {
            return;
        };
        for request in h.requests() {
            match request {
                Request::Scale { program, workers } => {
                    if let Err(e) = self.scale(&program, workers) {
                        log::error!("cannot scale {program} to {workers}: {e}");
                    }
                }
                Request::Submit { queue, jobs } => {
                    let n = jobs.len();
                    if let Err(e) = self.submit(&queue, None, jobs, false) {
                        log::error!("cannot submit {n} job(s) from the program: {e}");
                    }
                }
                Request::Shutdown => {
                    log::info!("the program asks for a graceful stop");
                    self.begin_shutdown(Signal::SIGTERM);
                }
            }
        }
    }
}
