//! The supervisor: the pools, their slots and the worker processes, and the only code that
//! carries out the plan (fork, signal, reap). Every pass: drain signals, reap children, read
//! worker pipes, then [`plan`] the dirty slots and carry out its actions. Its next deadline
//! is the earliest slot timer (a backoff, a kill) or the shutdown deadline.

use std::collections::{BTreeSet, HashMap};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::output::{event, OutPipe};
use super::{MasterError, Part, LOG_RING_BYTES, LOG_RING_LINES};
use crate::backoff::Jitter;
use crate::config::{Config, ListenAddr, Program};
use crate::launch;
use crate::orphans;
use crate::output::{LogRing, RotatingFile, Stream};
use crate::plan::{plan, Action, Dirty, Phase, Pool, PoolId, WorkerKey};
use crate::slot::{AfterStop, Event, Exit, Slot, SlotState};
use crate::sys;
use crate::sys::pidfile::Pidfile;
use crate::sys::reactor::Reactor;
use crate::sys::signals::{Signals, HANDLED};
use crate::sys::spawn::{Report, Stage};
use log::Level;

/// What the master holds for one live worker process.
pub(super) struct Proc {
    pub(super) key: WorkerKey,
    /// `PROGRAM.ID`, for its output and logs.
    pub(super) tag: Arc<str>,
    /// Status pipe until the exec is confirmed (or the child died).
    status: Option<OwnedFd>,
    pub(super) lock_names: Vec<String>,
    pub(super) stdout: Option<OutPipe>,
    pub(super) stderr: Option<OutPipe>,
    /// Readable once the process has exited (see [`sys::process::pidfd`]); `None` where the
    /// kernel has no pidfds, and SIGCHLD's sweep finds the exit.
    exit_fd: Option<OwnedFd>,
    start_time: u64,
    pub(super) stop_signal: Signal,
    stop_timeout: Duration,
}

impl Proc {
    /// The record of this worker's process group, for a later master.
    fn group(&self, pid: Pid) -> orphans::Group {
        orphans::Group {
            pgid: pid,
            start_time: self.start_time,
            stop_signal: self.stop_signal,
            stop_timeout: self.stop_timeout,
        }
    }
}

/// Which pipe of a worker a `Part::Workers` token names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Pipe {
    Status = 0,
    Stdout = 1,
    Stderr = 2,
    /// The process's pidfd: readable when it has exited.
    Exit = 3,
}

fn pipe_token(pid: Pid, pipe: Pipe) -> u64 {
    Part::Workers.token((pipe as u64) << 32 | pid.as_raw() as u32 as u64)
}

pub(super) fn pipe_of(local: u64) -> (Pid, Pipe) {
    let pid = Pid::from_raw((local & 0xffff_ffff) as u32 as i32);
    let pipe = match local >> 32 {
        0 => Pipe::Status,
        1 => Pipe::Stdout,
        2 => Pipe::Stderr,
        _ => Pipe::Exit,
    };
    (pid, pipe)
}

/// The supervision state every part of the loop works on: the config, the pools and their
/// slots, the live processes with their pipes, the timers, and the reactor all parts register
/// with. It carries out the plan; the other parts change what is wanted (a request, a reload)
/// and read what is.
pub(super) struct Supervisor {
    pub(super) config: Arc<Config>,
    pub(super) pools: Vec<Pool>,
    /// The next [`PoolId`] to hand out: never reused.
    pub(super) next_pool: u64,
    /// Slot deadlines (backoff over, SIGKILL due, ready timeout, watchdog): when one passes,
    /// its slot is planned again. Stale entries only cause one more look at their slot.
    timers: BTreeSet<(Instant, WorkerKey)>,
    pub(super) procs: HashMap<Pid, Proc>,
    pub(super) reactor: Reactor,
    signals: Signals,
    pidfile: Option<Pidfile>,
    pub(super) phase: Phase,
    jitter: Jitter,
    ctx: launch::Context,
    pub(super) dev_null: OwnedFd,
    pub(super) files: HashMap<PathBuf, RotatingFile>,
    /// The record of live process groups for a later master (see [`orphans`]).
    journal: orphans::Journal,
    /// Bound once, kept across reloads while some program lists them.
    pub(super) listeners: HashMap<ListenAddr, OwnedFd>,
    /// Recent worker output for `plumule logs`.
    pub(super) log_ring: LogRing,
    /// What the systemd part has to tell systemd, in order (see [`Note`]).
    pub(super) notes: Vec<Note>,
    /// Forks the workers, so that the cost of a fork does not grow with the master's
    /// descriptors (see [`sys::forkserver`]); `None` if it could not start or failed.
    forkserver: Option<sys::forkserver::ForkServer>,
    /// When to look for exited children that are not workers (see `on_sigchld`).
    sweep_at: Option<Instant>,
    /// Live workers without a pidfd, whose exit only SIGCHLD's wait finds.
    without_pidfd: usize,
    /// Exits and restarts by program, for the metrics endpoint.
    pub(super) counters: super::metrics::Counters,
    /// Moves whenever a slot or a pool changed: what other parts derive from the whole fleet
    /// (systemd's STATUS=) is computed again only then.
    pub(super) epoch: u64,
    /// The job queues and the pipes of their consumers (see [`super::queues`]).
    pub(super) queues: super::queues::Queues,
    /// Queue consumers asked to finish (their stdin closed): when each one's stop signal is
    /// due, if it has not exited by then (SPEC §9, "Stopping a queue worker").
    drains: BTreeSet<(Instant, Pid)>,
    /// The embedding program's hooks (the library's); `None` for the binary.
    pub(super) hooks: Option<Box<dyn super::hooks::Hooks>>,
    /// The etcd helper and the workers waiting for cluster locks (see [`super::cluster`]).
    pub(super) cluster: super::cluster::Cluster,
}

/// How long SIGCHLD's sweep for adopted orphans waits, so that a burst of exits costs one.
const SWEEP_DELAY: Duration = Duration::from_millis(100);

/// What happened in the supervisor that systemd is told about, left for the systemd part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Note {
    /// A reload begins (RELOADING=1 with MONOTONIC_USEC).
    Reloading { monotonic_usec: u64 },
    /// The reload was refused: READY=1 and why.
    ReloadRefused(String),
    /// The reload was applied: READY=1 once these pools have settled.
    Reloaded(Vec<PoolId>),
    /// A graceful stop begins (STOPPING=1, EXTEND_TIMEOUT_USEC).
    Stopping { extend_usec: u128 },
}

impl Supervisor {
    /// Takes the runtime dir (pidfile), stops leftovers of a previous master, and registers
    /// the signals — all before the first worker is forked.
    pub(super) fn new(config: Config) -> Result<Supervisor, MasterError> {
        // Signals first: a SIGTERM that comes while the master sets up (its pidfile already
        // written) is a graceful stop once the loop runs, not the default action's death.
        let signals = Signals::register(&HANDLED).map_err(MasterError::Setup)?;
        super::prepare_dir("runtime_dir", &config.runtime_dir, 0o755, true)?;
        let pidfile = Pidfile::acquire(&config.runtime_dir).map_err(MasterError::Busy)?;
        super::prepare_dir("state_dir", &config.state_dir, 0o700, true)?;
        // Another user's lock_dir is fine: masters of several users may share one.
        super::prepare_dir("lock_dir", &config.lock_dir, 0o755, false)?;
        if let Err(e) = sys::process::become_subreaper() {
            log::warn!("cannot become the subreaper of the workers' children, ignoring: {e}");
        }
        let nofile = sys::process::raise_nofile_limit()
            .map_err(|e| log::warn!("cannot raise the open-file limit, ignoring: {e}"))
            .ok();
        orphans::stop_leftovers(&config.runtime_dir);
        let dev_null = sys::dev_null().map_err(MasterError::Setup)?;
        let ctx = launch::Context {
            lock_dir: config.lock_dir.clone(),
            lock_mode: if config.control_group.is_some() {
                0o664
            } else {
                0o644
            },
            nofile,
            notify_socket: Some(notify_path(&config)),
            queues: queue_wires(&config),
        };
        let mut listeners = HashMap::new();
        for (name, fd) in sys::listen::from_systemd() {
            listeners.insert(ListenAddr::Systemd(name), fd);
        }
        // A socket that cannot be had now (a busy port) fails only the program that needs it:
        // its workers go `failed` with the error when they are spawned, and `start` tries the
        // bind again. A `systemd:` socket systemd did not pass can never be had by this
        // master: that mismatch of unit and config stops it, like an invalid config.
        for e in bind_listeners(&config, &mut listeners) {
            if matches!(e.address, ListenAddr::Systemd(_)) {
                return Err(MasterError::Listen(e));
            }
            log::error!("{e}; its workers cannot start until `plumule start` binds it");
        }
        let pools: Vec<Pool> = config
            .programs
            .iter()
            .enumerate()
            .map(|(i, p)| Pool::new(PoolId(i as u64), Arc::new(p.clone())))
            .collect();
        let reactor = Reactor::new().map_err(MasterError::Setup)?;
        reactor
            .add(signals.fd(), Part::Signals.token(0), false)
            .map_err(MasterError::Setup)?;
        let journal = orphans::Journal::new(&config.runtime_dir);
        let queues = super::queues::Queues::open(&config)
            .map_err(|(queue, e)| MasterError::Queue { queue, source: e })?;
        let forkserver = sys::forkserver::ForkServer::start()
            .map_err(|e| log::warn!("cannot start the fork server, forking from the master: {e}"))
            .ok();
        let cluster = super::cluster::Cluster::new(&config);
        Ok(Supervisor {
            cluster,
            config: Arc::new(config),
            next_pool: pools.len() as u64,
            pools,
            timers: BTreeSet::new(),
            procs: HashMap::new(),
            reactor,
            signals,
            pidfile: Some(pidfile),
            phase: Phase::Running,
            jitter: Jitter::from_entropy(),
            ctx,
            dev_null,
            files: HashMap::new(),
            journal,
            listeners,
            log_ring: LogRing::new(LOG_RING_LINES, LOG_RING_BYTES),
            notes: Vec::new(),
            forkserver,
            sweep_at: None,
            without_pidfd: 0,
            counters: Default::default(),
            epoch: 0,
            queues,
            drains: BTreeSet::new(),
            hooks: None,
        })
    }

    /// One of the supervisor's worker pipes is ready.
    pub(super) fn ready(&mut self, local: u64, now: Instant) {
        let (pid, pipe) = pipe_of(local);
        match pipe {
            Pipe::Status => self.read_status(pid, now),
            Pipe::Stdout => self.read_output(pid, Stream::Stdout),
            Pipe::Stderr => self.read_output(pid, Stream::Stderr),
            Pipe::Exit => self.reap_worker(pid),
        }
    }

    /// The earliest slot timer, or the shutdown deadline while workers remain.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        let mut wake_at = self.timers.first().map(|t| t.0);
        for at in [
            self.drains.first().map(|d| d.0),
            self.queues.deadline(),
            self.cluster.deadline(),
        ]
        .into_iter()
        .flatten()
        {
            wake_at = Some(wake_at.map_or(at, |w| w.min(at)));
        }
        if let Some(at) = self.sweep_at {
            wake_at = Some(wake_at.map_or(at, |w| w.min(at)));
        }
        if let Phase::ShuttingDown { deadline } = self.phase {
            if !self.procs.is_empty() {
                wake_at = Some(wake_at.map_or(deadline, |w| w.min(deadline)));
            }
        }
        wake_at
    }

    /// A graceful stop has finished: no worker process is left.
    pub(super) fn finished(&self) -> bool {
        matches!(self.phase, Phase::ShuttingDown { .. }) && self.procs.is_empty()
    }

    /// Plans and acts until nothing is left to do now; returns the next deadline.
    pub(super) fn settle(&mut self, now: Instant) {
        if self.sweep_at.is_some_and(|at| at <= now) {
            self.sweep_at = None;
            self.reap_all();
        }
        // Queue consumers that did not finish within stop_timeout of their stdin closing.
        while let Some(&(at, pid)) = self.drains.first() {
            if at > now {
                break;
            }
            self.drains.pop_first();
            let Some(proc) = self.procs.get(&pid) else {
                continue;
            };
            let held = self.queues.in_flight_of(pid);
            event(
                &mut self.log_ring,
                Level::Info,
                &proc.tag,
                format_args!(
                    "still running {} after its stdin closed ({held} job(s) unanswered); \
                     sending {}",
                    crate::format_duration(proc.stop_timeout),
                    sys::process::signal_name(proc.stop_signal)
                ),
            );
            if let Err(e) = sys::process::signal_group(pid, proc.stop_signal) {
                log::warn!("cannot signal process group {pid}: {e}");
            }
        }
        // Slots whose deadline has come are looked at again.
        while let Some(&(at, key)) = self.timers.first() {
            if at > now {
                break;
            }
            self.timers.pop_first();
            if let Some(p) = self.pool_index(key.pool) {
                self.pools[p].touch(key.id);
            }
        }
        // Each action changes the state it was planned from, so this converges; the bound
        // only guards against a planning bug turning into a busy loop.
        let mut settled = false;
        for _ in 0..16 {
            // What hooks asked for, in the last round's actions too.
            self.hook_requests(now);
            if self.pools.iter().any(|p| p.dirty != Dirty::Clean) {
                self.epoch += 1;
            }
            let plan = plan(&self.pools, self.phase, now);
            for pool in &mut self.pools {
                pool.dirty = Dirty::Clean;
                if pool.roll_pending && !pool.rolling() {
                    pool.roll_pending = false;
                }
            }
            for (p, id, at) in plan.timers {
                self.timers.insert((
                    at,
                    WorkerKey {
                        pool: self.pools[p].key,
                        id,
                    },
                ));
            }
            if plan.actions.is_empty() {
                settled = true;
                break;
            }
            for action in plan.actions {
                self.act(action, now);
            }
            self.pools.retain(|p| !(p.removed && p.slots.is_empty()));
        }
        if !settled {
            log::error!("planning did not settle; retrying in 10ms");
            for pool in &mut self.pools {
                pool.touch_all();
            }
            let (pool, id) = (self.pools.first().map_or(PoolId(0), |p| p.key), 0);
            self.timers
                .insert((now + Duration::from_millis(10), WorkerKey { pool, id }));
        }
    }

    /// What consumers spawned from now on are told of their queue's wire.
    pub(super) fn set_queue_wires(
        &mut self,
        wires: Vec<(String, crate::config::QueueProtocol, u64)>,
    ) {
        self.ctx.queues = wires;
    }

    /// The index of the pool `key` names, if it still exists. Pools are few (one per
    /// program), so a scan is the cheap way; no name is compared.
    pub(super) fn pool_index(&self, key: PoolId) -> Option<usize> {
        self.pools.iter().position(|p| p.key == key)
    }

    /// Feeds `event` to the slot `key` names, if the slot still exists, and notes what needs
    /// planning again: the slot, and programs started `after` this one when it became or
    /// stopped being running. Returns whether the slot changed.
    pub(super) fn slot_event(&mut self, key: WorkerKey, event: Event, now: Instant) -> bool {
        let Some(p) = self.pool_index(key.pool) else {
            return false;
        };
        self.pool_event(p, key.id, event, now)
    }

    pub(super) fn pool_event(&mut self, p: usize, id: u32, event: Event, now: Instant) -> bool {
        let pool = &mut self.pools[p];
        let program = Arc::clone(&pool.program);
        let Some(slot) = pool.slots.get_mut(id as usize) else {
            return false;
        };
        let was_running = matches!(slot.state(), SlotState::Running { .. });
        let waited = match slot.state() {
            SlotState::Starting { wait, .. } => Some(wait.clone()),
            _ => None,
        };
        if !slot.transition(event, &program, now) {
            return false;
        }
        let is_running = matches!(slot.state(), SlotState::Running { .. });
        pool.touch(id);
        if let (true, Some(wait)) = (is_running, waited) {
            super::output::now_running(&mut self.log_ring, self.pools[p].tag(id), &wait);
        }
        if was_running != is_running {
            for other in &mut self.pools {
                if other.program.after.contains(&program.name) {
                    other.touch_all();
                }
            }
        }
        true
    }

    pub(super) fn act(&mut self, action: Action, now: Instant) {
        match action {
            Action::Spawn { pool, id } => self.spawn(pool, id, now),
            Action::Stop { pool, id } => self.stop(pool, id, AfterStop::Rest, now),
            Action::Kill { pool, id } => {
                let Some(pid) = self.pools[pool].slots[id as usize].pid() else {
                    return;
                };
                event(
                    &mut self.log_ring,
                    Level::Warn,
                    self.pools[pool].tag(id),
                    format_args!("still running after its stop timeout; sending KILL"),
                );
                if let Err(e) = sys::process::signal_group(pid, Signal::SIGKILL) {
                    log::warn!("cannot kill process group {pid}: {e}");
                }
                self.pool_event(pool, id, Event::Killed, now);
            }
            Action::CancelBackoff { pool, id } => {
                self.pool_event(pool, id, Event::CancelBackoff, now);
            }
            Action::Forget { pool, .. } => {
                self.pools[pool].slots.pop();
                self.pools[pool].touch_all();
            }
            Action::Roll { pool, id } => {
                event(
                    &mut self.log_ring,
                    Level::Info,
                    self.pools[pool].tag(id),
                    format_args!(
                        "rolling restart: starting a successor to {}",
                        self.pools[pool].slots[id as usize]
                            .pid()
                            .map_or(0, |p| p.as_raw())
                    ),
                );
                if self.pool_event(pool, id, Event::Roll, now) {
                    self.spawn(pool, id, now);
                }
            }
            Action::Restart { pool, id } => self.stop(pool, id, AfterStop::Restart, now),
            Action::Retire { pool, id } => {
                let program = Arc::clone(&self.pools[pool].program);
                let kill_at = match self.phase {
                    Phase::ShuttingDown { deadline } => deadline.min(now + program.stop_timeout),
                    Phase::Running => now + program.stop_timeout,
                };
                let Some(old) = self.pools[pool].slots[id as usize].state().old().cloned() else {
                    return;
                };
                event(
                    &mut self.log_ring,
                    Level::Info,
                    self.pools[pool].tag(id),
                    format_args!("successor is up; stopping the old process {}", old.pid),
                );
                let kill_at = if program.queue.is_some() {
                    self.drain(old.pid, kill_at, now)
                } else {
                    if let Err(e) = sys::process::signal_group(old.pid, program.stop_signal) {
                        log::warn!("cannot signal process group {}: {e}", old.pid);
                    }
                    kill_at
                };
                self.pool_event(pool, id, Event::Retire { kill_at }, now);
            }
            Action::ReadyTimeout { pool, id } => {
                let program = Arc::clone(&self.pools[pool].program);
                event(
                    &mut self.log_ring,
                    Level::Error,
                    self.pools[pool].tag(id),
                    format_args!(
                        "not ready after {}; stopping it",
                        crate::format_duration(program.ready_timeout)
                    ),
                );
                self.stop(
                    pool,
                    id,
                    AfterStop::Crash(crate::slot::StopReason::ReadyTimeout),
                    now,
                );
            }
            Action::WatchdogMiss { pool, id } => {
                let program = Arc::clone(&self.pools[pool].program);
                let Some(pid) = self.pools[pool].slots[id as usize].pid() else {
                    return;
                };
                event(
                    &mut self.log_ring,
                    Level::Error,
                    self.pools[pool].tag(id),
                    format_args!("missed its watchdog; sending ABRT"),
                );
                if let Err(e) = sys::process::signal_process(pid, Signal::SIGABRT) {
                    log::warn!("cannot signal process {pid}: {e}");
                }
                let stop = Event::Stop {
                    kill_at: now + program.stop_timeout,
                    then: AfterStop::Crash(crate::slot::StopReason::Watchdog),
                };
                self.pool_event(pool, id, stop, now);
            }
            Action::KillOld { pool, id } => {
                let Some(old) = self.pools[pool].slots[id as usize].state().old().cloned() else {
                    return;
                };
                if let Err(e) = sys::process::signal_group(old.pid, Signal::SIGKILL) {
                    log::warn!("cannot kill process group {}: {e}", old.pid);
                }
                self.pool_event(pool, id, Event::KillOld, now);
            }
        }
    }

    /// Stops the slot's process; `then` says what follows its end. A queue consumer stopped
    /// for good or for a restart is drained first: its stdin closes and it has
    /// `stop_timeout` to answer what it holds and exit, before its stop signal.
    pub(super) fn stop(&mut self, pool: usize, id: u32, then: AfterStop, now: Instant) {
        let drain = self.pools[pool].program.queue.is_some()
            && matches!(then, AfterStop::Rest | AfterStop::Restart);
        self.stop_with(pool, id, then, drain, now);
    }

    /// Sends the stop signal to the slot's process group now, queue consumer or not.
    pub(super) fn stop_now(&mut self, pool: usize, id: u32, then: AfterStop, now: Instant) {
        self.stop_with(pool, id, then, false, now);
    }

    /// Closes a consumer's stdin and puts its stop signal off until `stop_timeout` from now
    /// (or `kill_at`, if sooner, at a shutdown's deadline). Returns when SIGKILL is due.
    fn drain(&mut self, pid: Pid, kill_at: Instant, now: Instant) -> Instant {
        let Some(proc) = self.procs.get(&pid) else {
            return kill_at;
        };
        let signal_at = kill_at.min(now + proc.stop_timeout);
        let kill = (signal_at + proc.stop_timeout).min(match self.phase {
            Phase::ShuttingDown { deadline } => deadline,
            Phase::Running => signal_at + proc.stop_timeout,
        });
        self.close_consumer_input(pid);
        self.drains.insert((signal_at, pid));
        kill
    }

    fn stop_with(&mut self, pool: usize, id: u32, then: AfterStop, drain: bool, now: Instant) {
        let program = Arc::clone(&self.pools[pool].program);
        let mut kill_at = now + program.stop_timeout;
        if let Phase::ShuttingDown { deadline } = self.phase {
            kill_at = kill_at.min(deadline);
        }
        let Some(pid) = self.pools[pool].slots[id as usize].pid() else {
            return;
        };
        let stopping = matches!(
            self.pools[pool].slots[id as usize].state().current(),
            SlotState::Stopping { .. }
        );
        if !stopping && drain {
            event(
                &mut self.log_ring,
                Level::Debug,
                self.pools[pool].tag(id),
                format_args!("stopping: its stdin is closed, to finish its jobs"),
            );
            kill_at = self.drain(pid, kill_at, now);
        } else if !stopping {
            event(
                &mut self.log_ring,
                Level::Debug,
                self.pools[pool].tag(id),
                format_args!(
                    "stopping: sending {} to process group {pid}",
                    sys::process::signal_name(program.stop_signal)
                ),
            );
            if let Err(e) = sys::process::signal_group(pid, program.stop_signal) {
                log::warn!(
                    "{}: cannot signal process group {pid}: {e}",
                    self.pools[pool].tag(id)
                );
            }
        }
        self.pool_event(pool, id, Event::Stop { kill_at, then }, now);
    }

    pub(super) fn spawn(&mut self, pool: usize, id: u32, now: Instant) {
        let workers = self.pools[pool].desired();
        let program = Arc::clone(&self.pools[pool].program);
        let key = WorkerKey {
            pool: self.pools[pool].key,
            id,
        };
        let slots = &mut self.pools[pool].slots;
        if id as usize == slots.len() {
            slots.push(Slot::new(id));
        }
        let tag: Arc<str> = Arc::from(self.pools[pool].tag(id).to_string());
        let fail = |master: &mut Supervisor, reason: String| {
            event(
                &mut master.log_ring,
                Level::Error,
                &tag,
                format_args!("failed: cannot start: {reason}"),
            );
            master.pool_event(pool, id, Event::Fail { reason }, now);
        };
        let mut prepared = match launch::prepare(&program, id, workers, &self.ctx) {
            Ok(p) => p,
            Err(reason) => return fail(self, reason.to_string()),
        };
        let consumer = match &program.queue {
            Some(_) => match self.consumer_pipes() {
                Ok(p) => Some(p),
                Err(e) => return fail(self, format!("cannot make its queue pipes: {e}")),
            },
            None => None,
        };
        let stdout_spec = match consumer {
            // Its stdout carries answers; an output pipe is made but not used.
            Some(_) => &crate::config::OutputSpec::Null,
            None => &program.stdout,
        };
        let stdout = match self.output(stdout_spec, 1) {
            Ok(o) => o,
            Err(reason) => return fail(self, reason.to_string()),
        };
        let stderr = match self.output(&program.stderr, 2) {
            Ok(o) => o,
            Err(reason) => return fail(self, reason.to_string()),
        };
        let mut pass_fds = Vec::with_capacity(program.listen.len());
        for l in &program.listen {
            if !self.listeners.contains_key(&l.address) {
                // Busy when the master started (or at a reload): try again now.
                match bind_listener(&l.address, l.mode) {
                    Ok(fd) => {
                        log::info!(
                            "{}: listening on {}",
                            program.name,
                            describe_addr(&l.address)
                        );
                        self.listeners.insert(l.address.clone(), fd);
                    }
                    Err(e) => return fail(self, e.to_string()),
                }
            }
            if let Some(fd) = self.listeners.get(&l.address) {
                pass_fds.push(fd.as_raw_fd());
            }
        }
        let req = &mut prepared.setup;
        req.pass_fds = pass_fds;
        req.stdin = self.dev_null.as_raw_fd();
        req.stdout = stdout.0;
        if let Some(c) = &consumer {
            req.stdin = c.child_stdin.as_raw_fd();
            req.stdout = c.child_stdout.as_raw_fd();
        }
        req.stderr = stderr.0;
        // Cluster locks: the child waits on a gate the master opens once they are granted.
        let mut gate_w = None;
        if let Some(gate) = req.gate.as_mut() {
            match sys::pipe(false) {
                Ok((r, w)) => {
                    gate.fd = r.as_raw_fd();
                    gate_w = Some((r, w));
                }
                Err(e) => return fail(self, format!("cannot make its cluster lock gate: {e}")),
            }
        }
        let exec = matches!(prepared.body, sys::spawn::Body::Exec { .. });
        // A gated worker is forked here: its gate does not travel to the fork server.
        let served = exec && gate_w.is_none();
        let forked = match self.forkserver.as_mut().filter(|_| served) {
            // A function body (the library's) runs in a fork of the master itself.
            Some(server) => server.spawn(req, &prepared.body).or_else(|e| match e {
                // The master could not make the worker's status pipe (out of descriptors):
                // this start fails, the fork server is fine. Given up for it, every later
                // worker would be forked from the master, with all its descriptors, which
                // near the limit fails in the child.
                // Nor is a fork the server tried and the kernel refused (EAGAIN, ENOMEM): it
                // is retried after the backoff, by the same server.
                e @ (sys::spawn::SpawnError::StatusPipe { .. }
                | sys::spawn::SpawnError::ServerFork { .. }) => Err(e),
                e => {
                    // Ours, so this should not happen; if it does, the master can still fork.
                    log::warn!("the fork server failed ({e}); the master forks workers itself now");
                    self.forkserver = None;
                    sys::spawn::spawn(req, &mut prepared.body)
                }
            }),
            None => sys::spawn::spawn(req, &mut prepared.body),
        };
        let child = match forked {
            Ok(c) => c,
            Err(e) => {
                // fork failing (EAGAIN, ENOMEM) is transient: retry as after a quick crash.
                event(&mut self.log_ring, Level::Error, &tag, format_args!("{e}"));
                let until = now + program.backoff.initial;
                self.pool_event(pool, id, Event::SpawnFailed { until }, now);
                return;
            }
        };
        // The write ends now live in the child only (and the gate's read end).
        drop(stdout.1);
        drop(stderr.1);
        let gate_w = gate_w.map(|(r, w)| {
            drop(r);
            w
        });
        event(
            &mut self.log_ring,
            Level::Info,
            &tag,
            format_args!("started (pid {})", child.pid),
        );
        let pid = child.pid;
        let exit_fd = sys::process::pidfd(pid)
            .map_err(|e| log::debug!("{tag}: no pidfd ({e}); its exit is found by SIGCHLD"))
            .ok();
        if exit_fd.is_none() {
            self.without_pidfd += 1;
        }
        for (fd, pipe) in [
            (exit_fd.as_ref().map(|fd| fd.as_raw_fd()), Pipe::Exit),
            (Some(child.status.as_raw_fd()), Pipe::Status),
            (stdout.2.as_ref().map(|o| o.fd.as_raw_fd()), Pipe::Stdout),
            (stderr.2.as_ref().map(|o| o.fd.as_raw_fd()), Pipe::Stderr),
        ] {
            let Some(fd) = fd else { continue };
            if let Err(e) = self.reactor.add(fd, pipe_token(pid, pipe), false) {
                log::error!("{tag}: cannot watch its {pipe:?} pipe: {e}");
            }
        }
        self.procs.insert(
            pid,
            Proc {
                key,
                tag,
                status: Some(child.status),
                lock_names: prepared.lock_names,
                stdout: stdout.2,
                stderr: stderr.2,
                exit_fd,
                start_time: sys::process::start_time(pid).unwrap_or(0),
                stop_signal: program.stop_signal,
                stop_timeout: program.stop_timeout,
            },
        );
        self.journal.started(&self.procs[&pid].group(pid));
        if let Some(gate) = gate_w {
            let start_time = self.procs[&pid].start_time;
            self.cluster_acquire(pid, start_time, prepared.cluster_locks.clone(), gate);
        }
        // On disk before the worker can run its own code: a master SIGKILLed right after
        // this spawn still leaves the group on record for the next one to stop.
        self.save_groups();
        if let (Some(pipes), Some(queue)) = (consumer, program.queue.as_deref()) {
            let tag = Arc::clone(&self.procs[&pid].tag);
            self.attach_consumer(pid, key, tag, queue, pipes);
        }
        let generation = self.pools[pool].generation;
        self.pools[pool].slots[id as usize].generation = generation;
        self.pool_event(pool, id, Event::Spawned { pid }, now);
        self.hook_spawned(pool, id, pid);
    }

    pub(super) fn handle_signals(&mut self) {
        for sig in self.signals.drain() {
            match sig {
                Signal::SIGCHLD => self.on_sigchld(),
                Signal::SIGTERM | Signal::SIGINT => self.begin_shutdown(sig),
                Signal::SIGHUP if self.hook_reload() => log::info!("SIGHUP: reloading workers"),
                Signal::SIGHUP => {
                    log::info!("SIGHUP: reloading {}", self.config.path.display());
                    let _ = self.reload(Instant::now());
                }
                Signal::SIGUSR1 => self.reopen_files(),
                _ => {}
            }
        }
    }

    pub(super) fn begin_shutdown(&mut self, sig: Signal) {
        if let Phase::ShuttingDown { .. } = self.phase {
            log::info!("{sig} again: the graceful stop is already under way");
            return;
        }
        self.hook_stopping(sig);
        let deadline = Instant::now() + self.config.shutdown_timeout;
        log::info!(
            "{sig}: stopping {} worker(s) (everything left is killed after {})",
            self.procs.len(),
            crate::format_duration(self.config.shutdown_timeout)
        );
        self.phase = Phase::ShuttingDown { deadline };
        self.epoch += 1;
        let extend_usec = (self.config.shutdown_timeout + Duration::from_secs(5)).as_micros();
        self.notes.push(Note::Stopping { extend_usec });
    }

    /// Reaps every exited child: SIGCHLD coalesces, so one signal may stand for many.
    pub(super) fn reap_all(&mut self) {
        loop {
            let procs = &self.procs;
            match sys::process::reap_one(|pid| procs.contains_key(&pid)) {
                Ok(Some(reaped)) => self.on_exit(reaped.pid, reaped.exit),
                Ok(None) => return,
                Err(e) => {
                    log::error!("waitid failed: {e}");
                    return;
                }
            }
        }
    }

    /// A worker's pidfd is readable: it has exited. Reaped through its own descriptor, at
    /// the cost of one process whatever the size of the fleet.
    fn reap_worker(&mut self, pid: Pid) {
        let Some(fd) = self
            .procs
            .get(&pid)
            .and_then(|p| p.exit_fd.as_ref())
            .map(|fd| fd.as_raw_fd())
        else {
            return;
        };
        match sys::process::reap_pidfd(fd) {
            Ok(Some(reaped)) => self.on_exit(reaped.pid, reaped.exit),
            Ok(None) => {}
            Err(e) => log::error!("waitid on the pidfd of {pid} failed: {e}"),
        }
    }

    /// SIGCHLD. Workers with a pidfd are reaped through it as their exit is reported, so the
    /// wait over all children (which walks every one of them) only has to find the others:
    /// the orphans of workers, adopted by the master as subreaper. That sweep is put off a
    /// little, so that a burst of exits costs one walk, and one restart none.
    fn on_sigchld(&mut self) {
        if self.without_pidfd == 0 {
            if self.sweep_at.is_none() {
                self.sweep_at = Some(Instant::now() + SWEEP_DELAY);
            }
        } else {
            self.reap_all();
        }
    }

    /// Stops watching a worker's pipes and closes them.
    pub(super) fn forget_pipes(&mut self, proc: &mut Proc) {
        for fd in [
            proc.status.take(),
            proc.stdout.take().map(|o| o.fd),
            proc.stderr.take().map(|o| o.fd),
            proc.exit_fd.take(),
        ]
        .into_iter()
        .flatten()
        {
            self.reactor.remove(fd.as_raw_fd());
        }
    }

    pub(super) fn on_exit(&mut self, pid: Pid, exit: Exit) {
        let now = Instant::now();
        let Some(mut proc) = self.procs.remove(&pid) else {
            if self.queues.syncer_pid() == Some(pid) {
                self.syncer_exited(exit, now);
            } else if self.remote_exited(pid, exit, now) {
            } else if self.cluster.helper_pid() == Some(pid) {
                self.cluster_helper_exited(exit, now);
            } else if self.forkserver.as_ref().is_some_and(|f| f.pid() == pid) {
                log::warn!("the fork server ended ({exit}); the master forks workers itself now");
                if let Some(server) = self.forkserver.take() {
                    server.reaped();
                }
            } else {
                log::debug!("reaped process {pid} ({exit}), not a worker");
            }
            return;
        };
        self.journal.gone(pid);
        self.cluster_release(pid);
        if proc.exit_fd.is_none() {
            self.without_pidfd -= 1;
        }
        // Whatever the child reported before dying, and its last output and answers.
        self.drain_status(&mut proc, pid, now);
        self.drain_output(&mut proc);
        self.forget_pipes(&mut proc);
        self.detach_consumer(pid, exit, now);
        let jitter = self.jitter.sample();
        let Some(p) = self.pool_index(proc.key.pool) else {
            return;
        };
        self.hook_exited(p, proc.key.id, pid, exit);
        let slot = &self.pools[p].slots[proc.key.id as usize];
        let program = &self.pools[p].program;
        let reason = super::metrics::exit_reason(slot.state(), pid, exit, program);
        self.counters.exited(&program.name, reason);
        let restarts = slot.restarts;
        if slot.state().old().is_some_and(|o| o.pid == pid) {
            self.pool_event(p, proc.key.id, Event::Exited { pid, exit, jitter }, now);
            return;
        }
        let before = slot.state().name();
        if !self.pool_event(p, proc.key.id, Event::Exited { pid, exit, jitter }, now) {
            return;
        }
        let tag = &proc.tag;
        let program = &self.pools[p].program;
        let slot = &self.pools[p].slots[proc.key.id as usize];
        let restarted = slot.restarts.saturating_sub(restarts);
        self.counters.restarted(&program.name, restarted.into());
        let ring = &mut self.log_ring;
        match self.pools[p].slots[proc.key.id as usize].state().current() {
            SlotState::Backoff { until } => {
                let delay = until.saturating_duration_since(now);
                if delay.is_zero() {
                    event(
                        ring,
                        Level::Info,
                        tag,
                        format_args!("exited ({exit}); restarting"),
                    );
                } else {
                    let delay = crate::format_duration(delay);
                    event(
                        ring,
                        Level::Warn,
                        tag,
                        format_args!("exited ({exit}); restarting in {delay}"),
                    );
                }
            }
            SlotState::Failed { reason } => {
                event(
                    ring,
                    Level::Error,
                    tag,
                    format_args!("exited ({exit}); failed: {reason}"),
                );
            }
            SlotState::Exited { .. } => {
                let restart = program.restart;
                event(
                    ring,
                    Level::Info,
                    tag,
                    format_args!("exited ({exit}); not restarted (restart = {restart:?})"),
                );
            }
            _ if before == "stopping" => {
                event(ring, Level::Info, tag, format_args!("stopped ({exit})"));
            }
            _ => event(ring, Level::Info, tag, format_args!("exited ({exit})")),
        }
    }

    pub(super) fn read_status(&mut self, pid: Pid, now: Instant) {
        if let Some(mut proc) = self.procs.remove(&pid) {
            self.drain_status(&mut proc, pid, now);
            self.procs.insert(pid, proc);
        }
    }

    pub(super) fn drain_status(&mut self, proc: &mut Proc, pid: Pid, now: Instant) {
        let Some(fd) = &proc.status else { return };
        let (reports, eof) = match sys::spawn::read_reports(fd.as_raw_fd()) {
            Ok(r) => r,
            Err(e) => {
                log::warn!("{}: cannot read its status pipe: {e}", proc.tag);
                (Vec::new(), true)
            }
        };
        let mut failed = false;
        for report in reports {
            match report {
                Report::WaitingForLock(i) => {
                    let name = proc.lock_names.get(i as usize).cloned().unwrap_or_default();
                    event(
                        &mut self.log_ring,
                        Level::Info,
                        &proc.tag,
                        format_args!("waiting for lock {name}"),
                    );
                    self.slot_event(proc.key, Event::WaitingForLock { pid, name }, now);
                }
                Report::Failed { stage, errno } => {
                    failed = true;
                    let Some(p) = self.pool_index(proc.key.pool) else {
                        continue;
                    };
                    let reason =
                        describe_failure(&self.pools[p].program, stage, errno, &proc.lock_names);
                    self.pool_event(p, proc.key.id, Event::StartError { pid, reason }, now);
                }
            }
        }
        if eof {
            if let Some(fd) = proc.status.take() {
                self.reactor.remove(fd.as_raw_fd());
            }
            if !failed {
                self.slot_event(proc.key, Event::Exec { pid }, now);
            }
        }
    }

    /// Writes the process groups started and gone since the last pass to the record a
    /// later master reads (see [`orphans`]).
    pub(super) fn save_groups(&mut self) {
        let procs = &self.procs;
        let all = || {
            procs
                .iter()
                .map(|(&pid, p)| p.group(pid))
                .collect::<Vec<_>>()
        };
        if let Err(e) = self.journal.flush(all) {
            log::warn!("cannot record the worker process groups, ignoring: {e}");
        }
    }

    /// The master is going away: sockets and records go with it.
    pub(super) fn finish(&mut self) {
        self.forkserver = None;
        self.cluster_finish();
        self.queues.finish();
        for addr in self.listeners.keys() {
            if let ListenAddr::Unix(path) = addr {
                let _ = std::fs::remove_file(path);
            }
        }
        orphans::remove(&self.config.runtime_dir);
        if let Some(p) = self.pidfile.take() {
            p.remove();
        }
    }
}

fn describe_failure(program: &Program, stage: Stage, errno: i32, locks: &[String]) -> String {
    let why = sys::spawn::errno_text(errno);
    match stage {
        Stage::Exec => format!("cannot execute {}: {why}", command_name(program)),
        Stage::Chdir => format!(
            "cannot change directory to {}: {why}",
            program.cwd.as_deref().unwrap_or(Path::new("?")).display()
        ),
        Stage::Lock(i) => format!(
            "cannot take lock {}: {why}",
            locks.get(i as usize).map(String::as_str).unwrap_or("?")
        ),
        Stage::Credentials => format!(
            "cannot switch to user {} / group {}: {why}",
            program.user.as_ref().map_or("(same)", |u| u.name.as_str()),
            program.group.as_ref().map_or("(same)", |g| g.name.as_str())
        ),
        Stage::Setup => format!("cannot set up the worker's descriptors: {why}"),
        Stage::Limit(_) | Stage::Nice | Stage::OomScoreAdj => {
            launch::describe_shaping_failure(program, stage, &why).unwrap_or(why)
        }
    }
}

/// A `listen` address of a program could not be had.
#[derive(Debug, thiserror::Error)]
#[error("program {program}: {source}")]
pub struct BindError {
    pub program: String,
    /// The address (also named in `source`).
    pub address: ListenAddr,
    #[source]
    pub source: sys::listen::ListenError,
}

/// Binds every `listen` address of `config` not bound yet, as many as can be; returns what
/// could not be had, each error naming the program and the address.
pub(super) fn bind_listeners(
    config: &Config,
    listeners: &mut HashMap<ListenAddr, OwnedFd>,
) -> Vec<BindError> {
    let mut errors = Vec::new();
    for program in &config.programs {
        for l in &program.listen {
            if listeners.contains_key(&l.address) {
                continue;
            }
            match bind_listener(&l.address, l.mode) {
                Ok(fd) => {
                    log::info!(
                        "{}: listening on {}",
                        program.name,
                        describe_addr(&l.address)
                    );
                    listeners.insert(l.address.clone(), fd);
                }
                Err(source) => errors.push(BindError {
                    program: program.name.clone(),
                    address: l.address.clone(),
                    source,
                }),
            }
        }
    }
    errors
}

fn bind_listener(
    addr: &ListenAddr,
    mode: Option<u32>,
) -> Result<OwnedFd, sys::listen::ListenError> {
    match addr {
        ListenAddr::Tcp(sa) => sys::listen::bind_tcp(*sa),
        ListenAddr::Unix(path) => sys::listen::bind_unix(path, mode),
        ListenAddr::Systemd(name) => {
            Err(sys::listen::ListenError::NotPassed { name: name.clone() })
        }
    }
}

/// `tcp:HOST:PORT`, `unix:PATH`, `systemd:NAME`.
pub fn describe_addr(addr: &ListenAddr) -> String {
    match addr {
        ListenAddr::Tcp(sa) => format!("tcp:{sa}"),
        ListenAddr::Unix(p) => format!("unix:{}", p.display()),
        ListenAddr::Systemd(n) => format!("systemd:{n}"),
    }
}

/// The executable a program runs, for messages.
fn command_name(program: &Program) -> &str {
    match &program.command {
        crate::config::CommandSpec::Argv(argv) => argv.first().map_or("?", String::as_str),
        crate::config::CommandSpec::Shell(_) => "/bin/sh",
        crate::config::CommandSpec::Function(_) => "a function",
    }
}

/// plumule's notify socket for workers: `runtime_dir/notify.sock`.
pub(super) fn notify_path(config: &Config) -> PathBuf {
    config.runtime_dir.join("notify.sock")
}

/// The wire settings of each queue, for the consumers' environment.
pub(super) fn queue_wires(config: &Config) -> Vec<(String, crate::config::QueueProtocol, u64)> {
    config
        .queues
        .iter()
        .map(|q| (q.name.clone(), q.protocol, q.max_frame))
        .collect()
}
