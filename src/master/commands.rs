//! What control requests do: status, start/stop/restart, scale, reload, signal and shutdown,
//! each one handler
//! on the supervisor's state, and when the answer of a waiting request is due. The socket and
//! the waiting itself belong to the clients part.

use std::sync::Arc;
use std::time::Instant;

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::supervisor::{BindError, Note, Supervisor};
use crate::config::{self, ConfigError};
use crate::diff::{self, ReloadAction};
use crate::plan::{Pool, PoolId};
use crate::protocol::{
    self, Answer, ProgramStatus, Response, ScaleResult, SignalResult, StatusReport, Target,
    TargetError, WorkerStatus,
};
use crate::slot::{AfterStop, Event, Slot, SlotState, StartWait};

/// Why the master refuses a control request; the text is the client's error line.
#[derive(Debug, thiserror::Error)]
pub enum RefusedError {
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error("no program named {program}")]
    NoProgram { program: String },
    #[error("no program named {program}.{id} ({program} has {desired} workers)")]
    NoWorker {
        program: String,
        id: u32,
        desired: u32,
    },
    #[error("cannot scale {program} to {workers}: at most {max} workers")]
    TooManyWorkers {
        program: String,
        workers: u32,
        max: u32,
    },
    #[error(transparent)]
    Reload(#[from] ReloadError),
    #[error("the master is stopping")]
    Stopping,
    #[error("{0}")]
    BadSignal(String),
    /// `signal` to a program none of whose workers runs.
    #[error("{program}: no worker is running, nothing to signal")]
    NoneRunning { program: String },
    /// `signal` to one worker that does not run.
    #[error("{program}.{id}: not running ({state}), nothing to signal")]
    NotRunning {
        program: String,
        id: u32,
        state: &'static str,
    },
    #[error("cannot send {signal} to {worker} (pid {pid}): {source}")]
    Kill {
        signal: &'static str,
        worker: String,
        pid: i32,
        source: std::io::Error,
    },
}

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("reload refused, nothing changed: {0}")]
    Config(#[source] ConfigError),
    #[error("reload refused, nothing changed: cannot listen: {0}")]
    Listen(#[source] BindError),
    #[error("reload refused, nothing changed: {0}")]
    Queue(String),
}

impl RefusedError {
    fn no_program(program: &str) -> Self {
        RefusedError::NoProgram {
            program: program.to_string(),
        }
    }
}

pub(super) enum WaitKind {
    /// `stop`: the slots have no process left.
    Stopped { pool: PoolId, ids: Vec<u32> },
    /// `start`, `restart` and `scale`: each slot runs a process other than `old`, which has
    /// been up for the program's `healthy_after` (SPEC §1, like supervisorctl's `startsecs`);
    /// an error as soon as one of them ends before that. With `settle`, the pool must also be
    /// settled (a scale-down's surplus gone) before `result` is the answer.
    Running {
        pool: PoolId,
        ids: Vec<u32>,
        old: Vec<Pid>,
        /// Each slot's `restarts` when the request came, beside `ids`: a quick crash since
        /// shows as a higher count even when the slot has already been spawned again.
        restarts: Vec<u32>,
        settle: bool,
        result: Answer,
    },
    /// `reload`: the pools are settled; `result` is the answer then.
    Settled { pools: Vec<PoolId>, result: Answer },
    /// `shutdown`: the graceful stop has finished (every worker is gone); answered as the
    /// master exits, whose connection closes right after.
    Exit,
    /// `submit` to a durable queue: the batch `first..end` is synced to disk (or failed).
    Stored { queue: String, first: u64, end: u64 },
    /// `results`: every job of these batches (queue, first id, end id) has ended.
    Results { batches: Vec<(String, u64, u64)> },
    /// `queue` or `requeue` on a queue in Redis: its helper has replied.
    Remote(super::queues::Ask),
}

/// Where a waiting request stands.
enum Progress {
    Answer(Response),
    /// Not yet; with nothing else happening, look again at this moment (a worker reaching
    /// `healthy_after`).
    Pending(Option<Instant>),
}

impl Supervisor {
    pub(super) fn pool(&self, name: &str) -> Option<&Pool> {
        self.pools
            .iter()
            .find(|p| p.program.name == name && !p.removed)
    }

    /// The pool a waiter is about, while it is in the config.
    fn pool_by_key(&self, key: PoolId) -> Option<&Pool> {
        self.pools.iter().find(|p| p.key == key && !p.removed)
    }

    /// The answer of a waiting request, once it is due.
    pub(super) fn outcome(&self, kind: &WaitKind, now: Instant) -> Option<Response> {
        match self.progress(kind, now) {
            Progress::Answer(response) => Some(response),
            Progress::Pending(_) => None,
        }
    }

    /// When a waiting request must be looked at again though nothing happens: the waiting
    /// costs a timer only while someone waits, no tick.
    pub(super) fn recheck_at(&self, kind: &WaitKind, now: Instant) -> Option<Instant> {
        match self.progress(kind, now) {
            Progress::Answer(_) => None,
            Progress::Pending(at) => at,
        }
    }

    fn progress(&self, kind: &WaitKind, now: Instant) -> Progress {
        let pending = Progress::Pending(None);
        match kind {
            WaitKind::Stored { queue, first, end } => {
                let Some(q) = self.queues.get(queue) else {
                    return Progress::Answer(Response::error(format!(
                        "queue {queue} was removed by a reload"
                    )));
                };
                match q.batch(*first, *end) {
                    None => pending,
                    Some(Ok(())) => Progress::Answer(Response::ok(crate::protocol::Submitted {
                        queue: queue.clone(),
                        first_id: q.first_id(*first),
                        count: end - first,
                        results: Vec::new(),
                    })),
                    Some(Err(why)) => Progress::Answer(Response::error(format!(
                        "queue {queue}: cannot store the jobs: {why}"
                    ))),
                }
            }
            // Streamed by the clients part as results come; answered here only when it
            // had nothing to wait for.
            WaitKind::Results { batches } if batches.is_empty() => {
                Progress::Answer(Response::ok(crate::protocol::JobResults {
                    results: Vec::new(),
                }))
            }
            WaitKind::Results { .. } => pending,
            WaitKind::Remote(ask) => match self.remote_outcome(ask) {
                Some(response) => Progress::Answer(response),
                None => pending,
            },
            WaitKind::Stopped { pool, ids } => {
                let Some(pool) = self.pool_by_key(*pool) else {
                    return Progress::Answer(Response::done());
                };
                let busy = ids
                    .iter()
                    .any(|&id| pool.slots.get(id as usize).is_some_and(|s| s.is_live()));
                if busy {
                    pending
                } else {
                    Progress::Answer(Response::done())
                }
            }
            WaitKind::Running {
                pool,
                ids,
                old,
                restarts,
                settle,
                result,
            } => {
                let Some(pool) = self.pool_by_key(*pool) else {
                    return Progress::Answer(Response::error(
                        "the program was removed by a reload",
                    ));
                };
                let program = &pool.program;
                let name = &program.name;
                // Held back by an `after` dependency that has given up: say so, not hang.
                let blocked = crate::plan::waiting_for(&self.pools, pool).filter(|dep| {
                    self.pools
                        .iter()
                        .any(|p| p.program.name == *dep && p.settled())
                });
                let mut errors = Vec::new();
                let mut waiting = false;
                let mut recheck: Option<Instant> = None;
                for (i, &id) in ids.iter().enumerate() {
                    if let Some(dep) = blocked {
                        errors.push(format!(
                            "{name}.{id}: waiting for {dep}, which is not running"
                        ));
                        continue;
                    }
                    let Some(slot) = pool.slots.get(id as usize) else {
                        waiting = true;
                        continue;
                    };
                    let base = restarts.get(i).copied().unwrap_or(0);
                    match slot.state().current() {
                        SlotState::Failed { reason } => {
                            errors.push(format!("{name}.{id}: failed: {reason}"));
                            continue;
                        }
                        SlotState::Exited { .. } => {
                            errors
                                .push(format!("{name}.{id}: exited ({})", slot.last_end(program)));
                            continue;
                        }
                        _ if slot.crashes > 0 && slot.restarts > base => {
                            let how = match slot.last_stop {
                                Some(_) => "stopped",
                                None => "crashed",
                            };
                            errors.push(format!(
                                "{name}.{id}: {how} ({}) before running for healthy_after ({}), \
                                 and is restarting",
                                slot.last_end(program),
                                crate::format_duration(program.healthy_after)
                            ));
                            continue;
                        }
                        _ => {}
                    }
                    match slot.state() {
                        SlotState::Running { pid, since, .. } if !old.contains(pid) => {
                            let healthy = *since + program.healthy_after;
                            if healthy > now {
                                waiting = true;
                                recheck = Some(recheck.map_or(healthy, |r| r.min(healthy)));
                            }
                        }
                        _ => waiting = true,
                    }
                }
                if !errors.is_empty() {
                    return Progress::Answer(Response::error(errors.join("\n")));
                }
                if waiting {
                    return Progress::Pending(recheck);
                }
                if *settle && !pool.settled() {
                    return pending;
                }
                Progress::Answer(Response::ok(result.clone()))
            }
            WaitKind::Exit if self.finished() => Progress::Answer(Response::done()),
            WaitKind::Exit => pending,
            WaitKind::Settled { pools, result } => {
                let done = pools
                    .iter()
                    .all(|&key| self.pool_by_key(key).is_none_or(Pool::settled));
                if done {
                    Progress::Answer(Response::ok(result.clone()))
                } else {
                    pending
                }
            }
        }
    }

    /// The pool index and slot ids a target names; errors name what does not exist.
    pub(super) fn resolve(&mut self, target: &str) -> Result<(usize, Vec<u32>), RefusedError> {
        let t = Target::parse(target)?;
        let p = self
            .pools
            .iter()
            .position(|p| p.program.name == t.program && !p.removed)
            .ok_or_else(|| RefusedError::no_program(&t.program))?;
        let desired = self.pools[p].desired();
        let ids = match t.id {
            Some(id) if id < desired || (id as usize) < self.pools[p].slots.len() => vec![id],
            Some(id) => {
                return Err(RefusedError::NoWorker {
                    program: t.program,
                    id,
                    desired,
                })
            }
            None => (0..desired.max(self.pools[p].slots.len() as u32)).collect(),
        };
        Ok((p, ids))
    }

    pub(super) fn start(&mut self, target: &str, now: Instant) -> Result<WaitKind, RefusedError> {
        let (p, ids) = self.resolve(target)?;
        let desired = self.pools[p].desired();
        let ids: Vec<u32> = ids.into_iter().filter(|&id| id < desired).collect();
        for &id in &ids {
            self.pool_event(p, id, Event::Enable, now);
            // `enabled` may change without the state: plan the slot either way.
            self.pools[p].touch(id);
        }
        Ok(self.wait_running(p, ids, Vec::new(), None))
    }

    /// Waits for `ids` of pool `p` to run for `healthy_after`, processes other than `old`.
    fn wait_running(
        &self,
        p: usize,
        ids: Vec<u32>,
        old: Vec<Pid>,
        scaled: Option<ScaleResult>,
    ) -> WaitKind {
        let pool = &self.pools[p];
        let restarts = ids
            .iter()
            .map(|&id| pool.slots.get(id as usize).map_or(0, |s| s.restarts))
            .collect();
        WaitKind::Running {
            pool: pool.key,
            ids,
            old,
            restarts,
            settle: scaled.is_some(),
            result: scaled.map_or(Answer::Done(protocol::Done {}), Answer::from),
        }
    }

    pub(super) fn stop_target(
        &mut self,
        target: &str,
        now: Instant,
    ) -> Result<WaitKind, RefusedError> {
        let (p, ids) = self.resolve(target)?;
        for &id in &ids {
            self.pool_event(p, id, Event::Disable, now);
            // A slot past the end (not spawned yet) still counts as stopped by the operator.
            self.pools[p].touch(id);
        }
        Ok(WaitKind::Stopped {
            pool: self.pools[p].key,
            ids,
        })
    }

    pub(super) fn restart(&mut self, target: &str, now: Instant) -> Result<WaitKind, RefusedError> {
        let (p, ids) = self.resolve(target)?;
        let desired = self.pools[p].desired();
        let ids: Vec<u32> = ids.into_iter().filter(|&id| id < desired).collect();
        let mut old = Vec::new();
        for &id in &ids {
            self.pool_event(p, id, Event::Enable, now);
            self.pools[p].touch(id);
            let Some(slot) = self.pools[p].slots.get(id as usize) else {
                continue;
            };
            if let Some(pid) = slot.pid() {
                old.push(pid);
                self.stop(p, id, AfterStop::Restart, now);
            }
        }
        Ok(self.wait_running(p, ids, old, None))
    }

    pub(super) fn scale(&mut self, program: &str, workers: u32) -> Result<WaitKind, RefusedError> {
        if workers > config::MAX_WORKERS {
            return Err(RefusedError::TooManyWorkers {
                program: program.to_string(),
                workers,
                max: config::MAX_WORKERS,
            });
        }
        let p = self
            .pools
            .iter()
            .position(|p| p.program.name == program && !p.removed)
            .ok_or_else(|| RefusedError::no_program(program))?;
        let pool = &mut self.pools[p];
        let from = pool.desired();
        log::info!("{program}: scaling from {from} to {workers} worker(s)");
        pool.scale = Some(workers);
        pool.touch_all();
        // The new workers must come up like those of `start`; the others only settle.
        let result = ScaleResult {
            program: program.to_string(),
            workers,
        };
        Ok(self.wait_running(p, (from..workers).collect(), Vec::new(), Some(result)))
    }

    /// `signal`: sends `signal` (a name) to the main process of every worker of `target` that
    /// runs its command (`running`, `stopping`, or `starting` once exec'd and waiting to be
    /// ready); with `group`, to each one's process group (a worker leads its own). A worker
    /// still in plumule's code before its exec (waiting for a lock) or without a process is
    /// left alone; a target with no such worker is refused, saying so.
    pub(super) fn signal(
        &mut self,
        target: &str,
        signal: &str,
        group: bool,
    ) -> Result<SignalResult, RefusedError> {
        let sig = protocol::parse_signal(signal).map_err(RefusedError::BadSignal)?;
        let one = Target::parse(target)?.id.is_some();
        let (p, ids) = self.resolve(target)?;
        let pool = &self.pools[p];
        let mut pids = Vec::new();
        for &id in &ids {
            let state = pool.slots.get(id as usize).map(|s| s.state().current());
            match state {
                Some(
                    SlotState::Running { pid, .. }
                    | SlotState::Stopping { pid, .. }
                    | SlotState::Starting {
                        pid,
                        wait: StartWait::Ready,
                        ..
                    },
                ) => pids.push((id, *pid)),
                _ if one => {
                    return Err(RefusedError::NotRunning {
                        program: pool.program.name.clone(),
                        id,
                        state: state.map_or("stopped", SlotState::name),
                    })
                }
                _ => {}
            }
        }
        if pids.is_empty() {
            return Err(RefusedError::NoneRunning {
                program: pool.program.name.clone(),
            });
        }
        let name = crate::slot::signal_name(sig);
        let mut workers = Vec::with_capacity(pids.len());
        for (id, pid) in pids {
            // A worker leads its own process group: its pid is the group's id.
            let sent = if group {
                crate::sys::process::signal_group(pid, sig)
            } else {
                crate::sys::process::signal_process(pid, sig)
            };
            let worker = pool.tag(id).to_string();
            if let Err(source) = sent {
                return Err(RefusedError::Kill {
                    signal: name,
                    worker,
                    pid: pid.as_raw(),
                    source,
                });
            }
            let whom = if group { "process group" } else { "process" };
            log::info!("{worker}: sent SIG{name} to its {whom} {pid} (plumule signal)");
            workers.push(id);
        }
        Ok(SignalResult {
            program: pool.program.name.clone(),
            signal: name.to_string(),
            group,
            workers,
        })
    }

    /// `shutdown`: the graceful stop SIGTERM starts (SPEC §3); waits until it has finished.
    pub(super) fn shutdown(&mut self) -> WaitKind {
        if !matches!(self.phase, crate::plan::Phase::ShuttingDown { .. }) {
            log::info!("shutdown requested over the control socket");
            self.begin_shutdown(Signal::SIGTERM);
        }
        WaitKind::Exit
    }

    /// Re-reads the config file and applies the difference. On error nothing changes.
    /// Returns the changes (as lines) and the pools to wait for.
    pub(super) fn reload(
        &mut self,
        now: Instant,
    ) -> Result<(Vec<String>, Vec<PoolId>), ReloadError> {
        // A library master has no file: its hooks and its workers reload instead.
        if self.hook_reload() {
            return Ok((vec!["reload signal sent to the workers".into()], Vec::new()));
        }
        let usec = crate::sys::notify::monotonic_usec();
        self.notes.push(Note::Reloading {
            monotonic_usec: usec,
        });
        let new = match config::load(&self.config.path) {
            Ok(c) => c,
            Err(e) => {
                let refused = ReloadError::Config(e);
                log::error!("{refused}");
                self.notes.push(Note::ReloadRefused(refused.to_string()));
                return Err(refused);
            }
        };
        if let Err(why) = self.queues.check_reload(&new) {
            let refused = ReloadError::Queue(why);
            log::error!("{refused}");
            self.notes.push(Note::ReloadRefused(refused.to_string()));
            return Err(refused);
        }
        // New sockets are bound before anything changes, so a busy port refuses the reload.
        // An address the running config already lists and could not bind (busy when the
        // master started) is left to its program's next start, as then.
        let listed = |config: &config::Config, addr: &crate::config::ListenAddr| {
            config
                .programs
                .iter()
                .any(|p| p.listen.iter().any(|l| &l.address == addr))
        };
        let busy = super::supervisor::bind_listeners(&new, &mut self.listeners)
            .into_iter()
            .find(|e| !listed(&self.config, &e.address));
        if let Some(e) = busy {
            // What this reload bound goes with it.
            let old = Arc::clone(&self.config);
            self.listeners.retain(|addr, _| {
                matches!(addr, crate::config::ListenAddr::Systemd(_)) || listed(&old, addr)
            });
            let refused = ReloadError::Listen(e);
            log::error!("{refused}");
            self.notes.push(Note::ReloadRefused(refused.to_string()));
            return Err(refused);
        }
        let changes = diff::diff(&self.config, &new);
        let mut lines: Vec<String> = changes.iter().map(|c| c.describe(&new)).collect();
        lines.extend(diff::settings_changes(&self.config, &new));
        let new = diff::applicable(&self.config, new);
        let mut wait_for = Vec::new();
        for action in diff::plan_reload(&self.pools, &changes, &new) {
            match action {
                ReloadAction::Add(program) => {
                    let key = PoolId(self.next_pool);
                    self.next_pool += 1;
                    self.pools.push(Pool::new(key, program));
                    wait_for.push(key);
                }
                ReloadAction::Remove(key) => {
                    if let Some(pool) = self.pools.iter_mut().find(|p| p.key == key) {
                        pool.removed = true;
                        pool.touch_all();
                    }
                }
                ReloadAction::Signal { pool, signal } => {
                    let Some(pool) = self.pools.iter().find(|p| p.key == pool) else {
                        continue;
                    };
                    for slot in &pool.slots {
                        if let Some(pid) = slot.pid() {
                            if let Err(e) = crate::sys::process::signal_process(pid, signal) {
                                log::warn!("{}: cannot signal {pid}: {e}", pool.tag(slot.id));
                            }
                        }
                    }
                }
                ReloadAction::Update {
                    pool,
                    program,
                    reset_scale,
                    roll,
                } => {
                    let Some(p) = self.pools.iter().position(|p| p.key == pool) else {
                        continue;
                    };
                    self.pools[p].program = Arc::clone(&program);
                    if reset_scale {
                        self.pools[p].scale = None;
                    }
                    if roll {
                        self.pools[p].generation += 1;
                        self.pools[p].roll_pending = true;
                        let failed: Vec<u32> = self.pools[p]
                            .slots
                            .iter()
                            .filter(|s| matches!(s.state(), SlotState::Failed { .. }))
                            .map(|s| s.id)
                            .collect();
                        for id in failed {
                            self.pool_event(p, id, Event::Enable, now);
                        }
                    }
                    self.pools[p].touch_all();
                    wait_for.push(pool);
                }
            }
        }
        crate::logging::set_level(new.log_level);
        // Sockets no program lists any more close; systemd's stay (they cannot be had again).
        self.listeners.retain(|addr, _| {
            matches!(addr, crate::config::ListenAddr::Systemd(_))
                || new
                    .programs
                    .iter()
                    .any(|p| p.listen.iter().any(|l| &l.address == addr))
        });
        lines.extend(self.queues.reconfigure(&new));
        self.set_queue_wires(super::supervisor::queue_wires(&new));
        self.config = Arc::new(new);
        self.notes.push(Note::Reloaded(wait_for.clone()));
        if lines.is_empty() {
            log::info!("reload: nothing changed");
        }
        for line in &lines {
            log::info!("reload: {line}");
        }
        Ok((lines, wait_for))
    }

    pub(super) fn status(&self, program: Option<&str>, now: Instant) -> Response {
        if let Some(name) = program {
            if self.pool(name).is_none() {
                return Response::error(RefusedError::no_program(name));
            }
        }
        let locks_of = |pid: Pid| {
            self.procs
                .get(&pid)
                .map(|p| p.lock_names.clone())
                .unwrap_or_default()
        };
        let in_flight = |pid: Pid| self.queues.in_flight_of(pid);
        let mut programs = Vec::new();
        for pool in &self.pools {
            if program.is_some_and(|n| n != pool.program.name) {
                continue;
            }
            let mut workers = Vec::new();
            // `after`: wanted workers not forked yet show as starting, waiting for whom.
            let blocked_by = crate::plan::waiting_for(&self.pools, pool);
            let desired = pool.desired();
            for slot in &pool.slots {
                let waiting = blocked_by.filter(|_| slot.id < desired);
                workers.extend(worker_status(slot, &locks_of, &in_flight, waiting, now));
            }
            if let Some(dep) = blocked_by {
                for id in pool.slots.len() as u32..desired {
                    workers.push(WorkerStatus {
                        id,
                        pid: None,
                        state: "starting".into(),
                        detail: Some(format!("waiting for {dep}")),
                        uptime_s: None,
                        restarts: 0,
                        last_exit: None,
                        locks: Vec::new(),
                        in_flight: 0,
                        status: None,
                    });
                }
            }
            programs.push(ProgramStatus {
                name: pool.program.name.clone(),
                workers,
            });
        }
        Response::ok(StatusReport { programs })
    }
}

/// What `status` shows of one slot: during a rolling restart the old process (`stopping`),
/// then the slot itself. `locks_of` names the locks a process holds, in the program's order;
/// `waiting_for` is the `after` program that holds back this wanted slot, if any.
///
/// The one place that reads a slot's state for `status`.
fn worker_status(
    slot: &Slot,
    locks_of: &dyn Fn(Pid) -> Vec<String>,
    in_flight: &dyn Fn(Pid) -> u32,
    waiting_for: Option<&str>,
    now: Instant,
) -> Vec<WorkerStatus> {
    let mut shown = Vec::with_capacity(1);
    if let Some(r) = slot.state().old() {
        shown.push(WorkerStatus {
            id: slot.id,
            pid: Some(r.pid.as_raw()),
            state: "stopping".into(),
            detail: Some("replaced by a rolling restart".into()),
            uptime_s: Some(now.saturating_duration_since(r.since).as_secs_f64()),
            restarts: slot.restarts,
            last_exit: None,
            locks: locks_of(r.pid),
            in_flight: in_flight(r.pid),
            status: None,
        });
    }
    let locks = match slot.state().current() {
        SlotState::Running { pid, .. } | SlotState::Stopping { pid, .. } => locks_of(*pid),
        SlotState::Starting { pid, wait, .. } if *wait != crate::slot::StartWait::Exec => {
            let all = locks_of(*pid);
            match wait {
                // Still waiting for this one: only those before it are held.
                crate::slot::StartWait::Lock(name) => {
                    all.into_iter().take_while(|l| l != name).collect()
                }
                _ => all,
            }
        }
        _ => Vec::new(),
    };
    let waiting =
        waiting_for.filter(|_| slot.enabled && matches!(slot.state(), SlotState::Stopped));
    shown.push(WorkerStatus {
        id: slot.id,
        pid: slot.pid().map(|p| p.as_raw()),
        state: if waiting.is_some() {
            "starting"
        } else {
            slot.state().name()
        }
        .into(),
        detail: waiting
            .map(|d| format!("waiting for {d}"))
            .or_else(|| slot.detail(now)),
        uptime_s: slot
            .state()
            .since()
            .map(|s| now.saturating_duration_since(s).as_secs_f64()),
        restarts: slot.restarts,
        last_exit: slot.last_exit.map(protocol::LastExit::from),
        locks,
        in_flight: slot.pid().map_or(0, in_flight),
        status: slot.status.clone(),
    });
    shown
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    /// The texts clients print (SPEC §9 names "no program named …"), unchanged by typing.
    #[test]
    fn refusals_say_what_they_said() {
        let table = [
            (RefusedError::no_program("web"), "no program named web"),
            (
                RefusedError::NoWorker {
                    program: "web".into(),
                    id: 7,
                    desired: 2,
                },
                "no program named web.7 (web has 2 workers)",
            ),
            (
                RefusedError::TooManyWorkers {
                    program: "web".into(),
                    workers: 5000,
                    max: 1024,
                },
                "cannot scale web to 5000: at most 1024 workers",
            ),
            (
                Target::parse("web.x").unwrap_err().into(),
                "bad worker id in `web.x`: expected PROGRAM or PROGRAM.ID",
            ),
            (
                ReloadError::Listen(BindError {
                    program: "web".into(),
                    address: crate::config::ListenAddr::Unix("/run/web.sock".into()),
                    source: crate::sys::listen::ListenError::BindUnix {
                        path: PathBuf::from("/run/web.sock"),
                        source: std::io::Error::from_raw_os_error(libc::EADDRINUSE),
                    },
                })
                .into(),
                "reload refused, nothing changed: cannot listen: program web: \
                 cannot bind unix:/run/web.sock: Address already in use (os error 98)",
            ),
            (RefusedError::Stopping, "the master is stopping"),
            (
                RefusedError::NoneRunning {
                    program: "web".into(),
                },
                "web: no worker is running, nothing to signal",
            ),
            (
                RefusedError::NotRunning {
                    program: "web".into(),
                    id: 2,
                    state: "backoff",
                },
                "web.2: not running (backoff), nothing to signal",
            ),
            (
                RefusedError::Kill {
                    signal: "HUP",
                    worker: "web.0".into(),
                    pid: 42,
                    source: std::io::Error::from_raw_os_error(libc::EPERM),
                },
                "cannot send HUP to web.0 (pid 42): Operation not permitted (os error 1)",
            ),
        ];
        for (refused, text) in table {
            assert_eq!(Response::error(refused), Response::error(text));
        }
    }
}
