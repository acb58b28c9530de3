//! The master: one thread, one event loop over a few subsystems, no periodic tick.
//!
//! ```text
//!                 ┌──────────────────────── Master::run ─────────────────────────┐
//!                 │  wait on the reactor (epoll) until a descriptor is ready or    │
//!                 │  the earliest deadline of any part; then, in order:            │
//!                 │   1. signals: SIGCHLD reaps, SIGHUP reloads, TERM/INT stop     │
//!                 │   2. each ready token goes to the part its tag names           │
//!                 │   3. the supervisor plans the dirty slots and acts             │
//!                 │   4. each part's after_pass, which also gives its deadline     │
//!                 └────────┬──────────────────┬──────────────────┬────────────────┘
//!                          │                  │                  │
//!        Part::Workers  ┌──▼─────────────┐  ┌─▼──────────────┐ ┌─▼───────────────┐
//!        Part::Signals  │ Supervisor     │  │ Clients        │ │ Systemd         │
//!                       │ pools, slots,  │◄─┤ control.sock,  │ │ notify.sock for │
//!                       │ procs + pipes, │  │ connections,   │ │ workers; tells  │
//!                       │ timers, output │◄─┤ waiters, logs  │ │ systemd READY,  │
//!                       │ (the only one  │  │ -f followers   │ │ STATUS, WATCHDOG│
//!                       │ that acts)     │  │ Part::Control  │ │ Part::Notify    │
//!                       └────────────────┘  └────────────────┘ └─────────────────┘
//! ```
//!
//! The job queues (`queues`) are state of the supervisor's, since both a stop (the
//! supervisor) and a `submit` (a client) change them; their descriptors (consumers' job and
//! answer pipes, the syncer's socket) have a tag of their own, `Part::Queues`, and the loop
//! gives them one pass of their own (`queues_pass`: retries due, job timeouts, group commit,
//! deliveries) before the supervisor settles.
//!
//! The cluster (`cluster`: the etcd helper's link and the workers waiting for cluster locks) is
//! state of the supervisor's too, since spawns and reaps change it; its link has the tag
//! `Part::Cluster`, and `cluster_pass` (after the supervisor settles) starts the helper when
//! due and tells it the master is alive, the one timer the master keeps while in a cluster.
//!
//! Every descriptor is registered once with the [`Reactor`](crate::sys::reactor::Reactor)
//! under a token whose high byte is its `Part`; a wait costs what is ready, not what is
//! registered. The `Supervisor` holds the state all parts share; each other part owns its own
//! descriptors and state and implements `Subsystem`: what to do when one of its tokens is
//! ready, what follows a pass, and when it next needs to run. Adding a subsystem (a queue, a
//! metrics endpoint) means a `Part` tag, a field of [`Master`], and one line in
//! `Master::parts`. When nothing is ready and no deadline is set, the master sleeps.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::config::Config;
use crate::sys::pidfile::PidfileError;
use crate::sys::reactor::Ready;

mod clients;
mod cluster;
mod commands;
mod hooks;
mod metrics;
mod output;
mod queues;
mod supervisor;
mod systemd;

pub use supervisor::BindError;

use clients::Clients;
pub(crate) use hooks::{Hooks, Request, StopKind};
use metrics::Metrics;
use supervisor::Supervisor;
use systemd::Systemd;

/// How much recent worker output the master keeps for `plumule logs`.
const LOG_RING_LINES: usize = 10_000;
const LOG_RING_BYTES: usize = 4 * 1024 * 1024;

/// Why the master could not run.
#[derive(Debug, thiserror::Error)]
pub enum MasterError {
    #[error(transparent)]
    Busy(PidfileError),
    #[error("cannot prepare {what} {path}: {reason}")]
    Dir {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("cannot listen: {0}")]
    Listen(BindError),
    #[error("cannot serve metrics: {0}")]
    Metrics(crate::sys::listen::ListenError),
    #[error("cannot set up the master: {0}")]
    Setup(std::io::Error),
    #[error("cannot open queue {queue}: {source}")]
    Queue {
        queue: String,
        source: crate::queue::store::Error,
    },
}

impl MasterError {
    /// 3 when another master owns the runtime dir, else 1.
    pub fn exit_code(&self) -> i32 {
        match self {
            MasterError::Busy(PidfileError::Busy { .. }) => 3,
            _ => 1,
        }
    }
}

/// Which part of the loop a registered descriptor belongs to: the high byte of its token.
/// The rest of the token is the part's own (a pid and pipe, a connection id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum Part {
    /// The signal self-pipe (the supervisor's).
    Signals = 1,
    /// Worker processes: status pipes and output pipes (the supervisor's).
    Workers = 2,
    /// The control socket: its listener and its connections.
    Control = 3,
    /// plumule's notify socket for workers.
    Notify = 4,
    /// The Prometheus endpoint: its listener and its connections.
    Metrics = 5,
    /// Queue consumers' job and answer pipes (the supervisor's, see `queues`).
    Queues = 6,
    /// The master's own log, while lines wait for a slow reader of its stderr.
    Log = 7,
    /// The link to the cluster helper (the supervisor's, see `cluster`).
    Cluster = 8,
}

const LOCAL_BITS: u64 = 56;

impl Part {
    pub(super) fn token(self, local: u64) -> u64 {
        (self as u64) << LOCAL_BITS | (local & ((1 << LOCAL_BITS) - 1))
    }

    fn of(token: u64) -> Option<(Part, u64)> {
        let local = token & ((1 << LOCAL_BITS) - 1);
        let part = match token >> LOCAL_BITS {
            1 => Part::Signals,
            2 => Part::Workers,
            3 => Part::Control,
            4 => Part::Notify,
            5 => Part::Metrics,
            6 => Part::Queues,
            7 => Part::Log,
            8 => Part::Cluster,
            _ => return None,
        };
        Some((part, local))
    }
}

/// A part of the loop beside the supervisor. It owns its descriptors (registered with
/// `sup.reactor` under its [`Part`] tag) and its state, and works on the supervisor's.
trait Subsystem {
    /// The tag of the tokens it registers.
    fn part(&self) -> Part;
    /// One of its descriptors is ready; `local` is the token without the tag.
    fn ready(&mut self, sup: &mut Supervisor, local: u64, ready: Ready, now: Instant);
    /// After the supervisor has settled in a pass: what follows from the new state (answers,
    /// notifications, registrations). Returns when it next needs to run without an event.
    fn after_pass(&mut self, sup: &mut Supervisor, now: Instant) -> Option<Instant>;
    /// The master is stopping for good: last answers, sockets closed.
    fn finish(&mut self, sup: &mut Supervisor);
}

pub struct Master {
    sup: Supervisor,
    clients: Clients,
    systemd: Systemd,
    metrics: Metrics,
}

/// Creates a missing directory with exactly `mode` (whatever the umask); refuses one that
/// others may write to. With `own`, also one owned by another user than root or the master's
/// own: its owner could swap the pidfile, the sockets or the records of a previous master's
/// process groups (which a new master signals) under a root master.
fn prepare_dir(what: &'static str, path: &Path, mode: u32, own: bool) -> Result<(), MasterError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let err = |reason: String| MasterError::Dir {
        what,
        path: path.to_path_buf(),
        reason,
    };
    let missing = std::fs::symlink_metadata(path).is_err();
    if let Err(e) = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
    {
        return Err(err(e.to_string()));
    }
    let meta = std::fs::symlink_metadata(path).map_err(|e| err(e.to_string()))?;
    if !meta.is_dir() {
        return Err(err("not a directory".into()));
    }
    if missing && meta.mode() & 0o7777 != mode {
        // The umask narrowed it: a 0700 runtime_dir would shut out a `control_group`.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| err(format!("cannot set its mode to {mode:04o}: {e}")))?;
    }
    if meta.mode() & 0o002 != 0 {
        return Err(err(format!(
            "it is writable by other users (mode {:04o}); run chmod o-w on it",
            meta.mode() & 0o7777
        )));
    }
    let me = nix::unistd::geteuid().as_raw();
    if own && meta.uid() != 0 && meta.uid() != me {
        return Err(err(format!(
            "it belongs to uid {}, who could replace what the master keeps there; \
             use a folder of uid {me} or root (chown)",
            meta.uid()
        )));
    }
    Ok(())
}

impl Master {
    /// Takes the runtime dir (pidfile), stops leftovers of a previous master, and registers
    /// the signals and sockets — all before the first worker is forked.
    pub fn new(config: Config) -> Result<Master, MasterError> {
        let sup = Supervisor::new(config)?;
        let systemd = Systemd::new(&sup)?;
        let clients = Clients::new(&sup)?;
        let metrics = Metrics::new(&sup)?;
        Ok(Master {
            sup,
            clients,
            systemd,
            metrics,
        })
    }

    /// A master for a program that embeds it (the library): `config` is built in memory,
    /// and `hooks` are told of spawns, exits, reloads and stops.
    pub(crate) fn with_hooks(
        config: Config,
        hooks: Box<dyn hooks::Hooks>,
    ) -> Result<Master, MasterError> {
        let mut master = Master::new(config)?;
        master.sup.hooks = Some(hooks);
        Ok(master)
    }

    /// The supervisor and every subsystem, these in the order their `after_pass` runs:
    /// metrics applies a reloaded address before the reload is answered; requests change
    /// what is wanted before systemd is told the state.
    fn parts(&mut self) -> (&mut Supervisor, [&mut dyn Subsystem; 3]) {
        (
            &mut self.sup,
            [&mut self.metrics, &mut self.clients, &mut self.systemd],
        )
    }

    /// Runs until a graceful stop has finished.
    pub fn run(mut self) -> Result<(), MasterError> {
        log::info!(
            "plumule {} started (pid {}), {} program(s), runtime dir {}",
            env!("CARGO_PKG_VERSION"),
            std::process::id(),
            self.sup.pools.len(),
            self.sup.config.runtime_dir.display()
        );
        let mut log_fd = None;
        loop {
            let now = Instant::now();
            // What the embedding program asked for (jobs it submits go out in this pass).
            self.sup.hook_requests(now);
            self.sup.queues_pass(now);
            self.sup.settle(now);
            self.sup.cluster_pass(now);
            let mut wake_at = None;
            let (sup, parts) = self.parts();
            for part in parts {
                wake_at = earliest(wake_at, part.after_pass(sup, now));
            }
            wake_at = earliest(wake_at, self.sup.next_deadline());
            if self.sup.finished() {
                break;
            }
            self.sup.save_groups();
            log_fd = watch_log(&self.sup.reactor, log_fd);
            let timeout = wake_at.map(|t| t.saturating_duration_since(Instant::now()));
            let ready = self.sup.reactor.wait(timeout).map_err(MasterError::Setup)?;
            // Signals (and so reaping) first, whatever was reported: a signal whose handler
            // ran as the wait returned (because a pipe was ready first) has not shown in
            // `ready` yet, and SIGUSR1 must be handled before the output that follows it, a
            // worker's exit known before its pipes close.
            self.sup.handle_signals();
            // The notify socket before the status pipes: READY=1 confirms an exec too, and
            // a worker's messages are attributed while it still lives.
            let mut ready = ready;
            ready.sort_by_key(|(token, _)| Part::of(*token).map(|(p, _)| p != Part::Notify));
            for (token, events) in ready {
                let Some((part, local)) = Part::of(token) else {
                    continue;
                };
                let now = Instant::now();
                match part {
                    Part::Signals => {}
                    Part::Workers => self.sup.ready(local, now),
                    Part::Queues => self.sup.queue_ready(local, now),
                    Part::Log => crate::logging::flush(),
                    Part::Cluster => self.sup.cluster_ready(),
                    _ => {
                        let (sup, parts) = self.parts();
                        if let Some(p) = parts.into_iter().find(|p| p.part() == part) {
                            p.ready(sup, local, events, now);
                        }
                    }
                }
            }
        }
        let (sup, parts) = self.parts();
        for part in parts {
            part.finish(sup);
        }
        self.sup.finish();
        log::info!("stopped");
        Ok(())
    }
}

/// Watches the master's log descriptor for writability while lines wait for it (a reader of
/// stderr that stopped reading); returns what is watched now.
fn watch_log(
    reactor: &crate::sys::reactor::Reactor,
    watched: Option<std::os::fd::RawFd>,
) -> Option<std::os::fd::RawFd> {
    let want = crate::logging::pending_fd();
    if want == watched {
        return watched;
    }
    if let Some(fd) = watched {
        reactor.remove(fd);
    }
    let fd = want?;
    match reactor.add(fd, Part::Log.token(0), true) {
        Ok(()) => Some(fd),
        Err(e) => {
            // Lines still go out with the next one logged.
            log::debug!("cannot watch the log descriptor: {e}");
            None
        }
    }
}

fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}
