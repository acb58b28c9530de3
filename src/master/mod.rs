//! The master: one thread, one poll(2) loop, the only code that carries out actions.
//!
//! Every wake-up runs the same pass: drain signals, reap children, read worker pipes, then
//! [`plan`] and carry out its actions. The poll timeout is the earliest deadline the plan
//! reports (a backoff, a kill); with none, poll waits forever, so an idle master never wakes.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use crate::backoff::Jitter;
use crate::config::{Config, ListenAddr, Program};
use crate::orphans;
use crate::output::{LogRing, RotatingFile, Stream};
use crate::plan::{plan, Action, Phase, Pool};
use crate::slot::{Event, Exit, Slot};
use crate::sys;
use crate::sys::pidfile::{Pidfile, PidfileError};
use crate::sys::signals::{Signals, HANDLED};
use crate::sys::spawn::{Report, Stage};
use crate::worker;

mod output;
mod requests;
mod systemd;

use output::{pump, OutPipe};
use systemd::SystemdLink;

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
    #[error("cannot set up the master: {0}")]
    Setup(std::io::Error),
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

/// What the master holds for one live worker process.
struct Proc {
    program: Arc<str>,
    id: u32,
    /// Status pipe until the exec is confirmed (or the child died).
    status: Option<OwnedFd>,
    lock_names: Vec<String>,
    stdout: Option<OutPipe>,
    stderr: Option<OutPipe>,
    start_time: u64,
    stop_signal: Signal,
    stop_timeout: Duration,
}

impl Proc {
    fn tag(&self) -> String {
        format!("{}.{}", self.program, self.id)
    }
}

/// Where a ready descriptor of the poll set leads.
#[derive(Debug, Clone, Copy)]
enum Source {
    Signals,
    Listener,
    Client(u64),
    Notify,
    Status(Pid),
    Output(Pid, Stream),
}

pub struct Master {
    config: Arc<Config>,
    pools: Vec<Pool>,
    procs: HashMap<Pid, Proc>,
    signals: Signals,
    pidfile: Option<Pidfile>,
    phase: Phase,
    jitter: Jitter,
    ctx: worker::Context,
    dev_null: OwnedFd,
    files: HashMap<PathBuf, RotatingFile>,
    groups_dirty: bool,
    control: Option<crate::control::ControlServer>,
    waiters: Vec<requests::Waiter>,
    systemd: SystemdLink,
    notify_socket: Option<sys::notify::NotifySocket>,
    /// Bound once, kept across reloads while some program lists them.
    listeners: HashMap<ListenAddr, OwnedFd>,
    /// Recent worker output for `plumule logs`.
    log_ring: LogRing,
    /// `logs --follow` connections: (connection, filter, next line to send).
    followers: Vec<(u64, Option<String>, u64)>,
}

/// Creates a missing directory with `mode`; refuses one that others may write to.
fn prepare_dir(what: &'static str, path: &Path, mode: u32) -> Result<(), MasterError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let err = |reason: String| MasterError::Dir {
        what,
        path: path.to_path_buf(),
        reason,
    };
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
    if meta.mode() & 0o002 != 0 {
        return Err(err(format!(
            "it is writable by other users (mode {:04o}); run chmod o-w on it",
            meta.mode() & 0o7777
        )));
    }
    Ok(())
}

impl Master {
    /// Takes the runtime dir (pidfile), stops leftovers of a previous master, and registers
    /// the signals — all before the first worker is forked.
    pub fn new(config: Config) -> Result<Master, MasterError> {
        prepare_dir("runtime_dir", &config.runtime_dir, 0o755)?;
        let pidfile = Pidfile::acquire(&config.runtime_dir).map_err(MasterError::Busy)?;
        prepare_dir("state_dir", &config.state_dir, 0o700)?;
        prepare_dir("lock_dir", &config.lock_dir, 0o755)?;
        let signals = Signals::register(&HANDLED).map_err(MasterError::Setup)?;
        if let Err(e) = sys::process::become_subreaper() {
            log::warn!("cannot become the subreaper of the workers' children, ignoring: {e}");
        }
        let nofile = sys::process::raise_nofile_limit()
            .map_err(|e| log::warn!("cannot raise the open-file limit, ignoring: {e}"))
            .ok();
        orphans::stop_leftovers(&config.runtime_dir);
        let dev_null = sys::dev_null().map_err(MasterError::Setup)?;
        let notify_path = config.runtime_dir.join("notify.sock");
        let notify_socket =
            sys::notify::NotifySocket::bind(&notify_path).map_err(|e| MasterError::Dir {
                what: "notify socket",
                path: notify_path.clone(),
                reason: e.to_string(),
            })?;
        let ctx = worker::Context {
            lock_dir: config.lock_dir.clone(),
            lock_mode: if config.control_group.is_some() {
                0o664
            } else {
                0o644
            },
            nofile,
            notify_socket: Some(notify_path),
        };
        let mut listeners = HashMap::new();
        for (name, fd) in sys::listen::from_systemd() {
            listeners.insert(ListenAddr::Systemd(name), fd);
        }
        bind_listeners(&config, &mut listeners).map_err(|(path, reason)| MasterError::Dir {
            what: "listen socket",
            path,
            reason,
        })?;
        let pools = config
            .programs
            .iter()
            .map(|p| Pool::new(Arc::new(p.clone())))
            .collect();
        let access = crate::control::Access {
            uid: nix::unistd::geteuid().as_raw(),
            group: config.control_group.clone(),
        };
        let control_path = config.runtime_dir.join("control.sock");
        let control = crate::control::ControlServer::bind(&control_path, access).map_err(|e| {
            MasterError::Dir {
                what: "control socket",
                path: control_path.clone(),
                reason: e.to_string(),
            }
        })?;
        Ok(Master {
            config: Arc::new(config),
            pools,
            procs: HashMap::new(),
            signals,
            pidfile: Some(pidfile),
            phase: Phase::Running,
            jitter: Jitter::from_entropy(),
            ctx,
            dev_null,
            files: HashMap::new(),
            groups_dirty: false,
            control: Some(control),
            waiters: Vec::new(),
            systemd: SystemdLink::from_env(Instant::now()),
            notify_socket: Some(notify_socket),
            listeners,
            log_ring: LogRing::new(LOG_RING_LINES, LOG_RING_BYTES),
            followers: Vec::new(),
        })
    }

    /// Runs until a graceful stop has finished.
    pub fn run(mut self) -> Result<(), MasterError> {
        log::info!(
            "plumule {} started (pid {}), {} program(s), runtime dir {}",
            env!("CARGO_PKG_VERSION"),
            std::process::id(),
            self.pools.len(),
            self.config.runtime_dir.display()
        );
        loop {
            let now = Instant::now();
            let mut wake_at = self.settle(now);
            while self.check_waiters(now) {
                // Pipelined requests were carried out behind an answered one: act on them
                // before sleeping. Each round consumes buffered request lines, so this ends.
                wake_at = self.settle(now);
            }
            self.feed_followers();
            if let Some(t) = self.tell_systemd(now) {
                wake_at = Some(wake_at.map_or(t, |w| w.min(t)));
            }
            if let Some(t) = self.control.as_mut().and_then(|c| c.expire(now)) {
                wake_at = Some(wake_at.map_or(t, |w| w.min(t)));
            }
            if matches!(self.phase, Phase::ShuttingDown { .. }) && self.procs.is_empty() {
                break;
            }
            self.save_groups();
            let (mut fds, sources) = self.poll_set();
            let timeout = wake_at.map(|t| t.saturating_duration_since(Instant::now()));
            let ready = sys::poll(&mut fds, timeout).map_err(MasterError::Setup)?;
            // Signals (and so reaping) first, whatever poll reported: a signal whose handler ran
            // as poll returned (because a pipe was ready first) has not marked the self-pipe
            // in `fds` yet, and SIGUSR1 must be handled before the output that follows it, a
            // worker's exit known before its pipes close.
            self.handle_signals();
            if ready == 0 {
                continue;
            }
            for (fd, source) in fds.iter().zip(&sources).skip(1) {
                if fd.revents == 0 {
                    continue;
                }
                match *source {
                    Source::Status(pid) => self.read_status(pid, Instant::now()),
                    Source::Output(pid, stream) => self.read_output(pid, stream),
                    Source::Listener => {
                        if let Some(c) = self.control.as_mut() {
                            c.accept(Instant::now());
                        }
                    }
                    Source::Client(id) => self.serve_client(id, fd.revents),
                    Source::Notify => self.read_notifications(Instant::now()),
                    Source::Signals => {}
                }
            }
        }
        self.finish();
        Ok(())
    }

    /// Plans and acts until nothing is left to do now; returns the next deadline.
    fn settle(&mut self, now: Instant) -> Option<Instant> {
        // Each action changes the state it was planned from, so this converges; the bound
        // only guards against a planning bug turning into a busy loop.
        for _ in 0..16 {
            let plan = plan(&self.pools, self.phase, now);
            if plan.actions.is_empty() {
                return plan.wake_at;
            }
            for action in plan.actions {
                self.act(action, now);
            }
            self.pools.retain(|p| !(p.removed && p.slots.is_empty()));
        }
        log::error!("planning did not settle; retrying in 10ms");
        Some(now + Duration::from_millis(10))
    }

    fn act(&mut self, action: Action, now: Instant) {
        match action {
            Action::Spawn { pool, id } => self.spawn(pool, id, now),
            Action::Stop { pool, id } => self.stop(pool, id, now),
            Action::Kill { pool, id } => {
                let (program, slot) = self.slot_mut(pool, id);
                if let Some(pid) = slot.pid() {
                    log::warn!(
                        "{}.{}: still running after its stop timeout; sending KILL",
                        program.name,
                        id
                    );
                    let _ = sys::process::signal_group(pid, Signal::SIGKILL);
                    slot.transition(Event::Killed, &program, now);
                }
            }
            Action::CancelBackoff { pool, id } => {
                let (program, slot) = self.slot_mut(pool, id);
                slot.transition(Event::CancelBackoff, &program, now);
            }
            Action::Forget { pool, .. } => {
                self.pools[pool].slots.pop();
            }
            Action::Roll { pool, id } => self.roll(pool, id, now),
            Action::Restart { pool, id } => {
                self.pools[pool].slots[id as usize].restart_after_stop = true;
                self.stop(pool, id, now);
            }
            Action::Retire { pool, id } => {
                let stop_timeout = self.pools[pool].program.stop_timeout;
                let signal = self.pools[pool].program.stop_signal;
                let deadline = match self.phase {
                    Phase::ShuttingDown { deadline } => deadline.min(now + stop_timeout),
                    Phase::Running => now + stop_timeout,
                };
                let tag = format!("{}.{}", self.pools[pool].program.name, id);
                if let Some(r) = self.pools[pool].slots[id as usize].retiring.as_mut() {
                    log::info!("{tag}: successor is up; stopping the old process {}", r.pid);
                    let _ = sys::process::signal_group(r.pid, signal);
                    r.kill_at = Some(deadline);
                }
            }
            Action::ReadyTimeout { pool, id } => {
                let program = Arc::clone(&self.pools[pool].program);
                log::error!(
                    "{}.{}: not ready after {}; stopping it",
                    program.name,
                    id,
                    crate::format_duration(program.ready_timeout)
                );
                self.pools[pool].slots[id as usize].stop_reason =
                    Some(crate::slot::StopReason::ReadyTimeout);
                self.stop(pool, id, now);
            }
            Action::WatchdogMiss { pool, id } => {
                let (program, slot) = self.slot_mut(pool, id);
                let Some(pid) = slot.pid() else { return };
                log::error!("{}.{}: missed its watchdog; sending ABRT", program.name, id);
                let _ = sys::process::signal_process(pid, Signal::SIGABRT);
                slot.stop_reason = Some(crate::slot::StopReason::Watchdog);
                slot.transition(
                    Event::Stop {
                        kill_at: now + program.stop_timeout,
                    },
                    &program,
                    now,
                );
            }
            Action::KillRetiring { pool, id } => {
                if let Some(r) = self.pools[pool].slots[id as usize].retiring.as_mut() {
                    let _ = sys::process::signal_group(r.pid, Signal::SIGKILL);
                    r.killed = true;
                }
            }
        }
    }

    /// Moves the running process aside (it keeps serving) and starts its successor.
    fn roll(&mut self, pool: usize, id: u32, now: Instant) {
        let slot = &mut self.pools[pool].slots[id as usize];
        let crate::slot::SlotState::Running { pid, since } = slot.state else {
            return;
        };
        slot.retiring = Some(crate::slot::Retiring {
            pid,
            since,
            kill_at: None,
            killed: false,
        });
        slot.state = crate::slot::SlotState::Stopped;
        log::info!(
            "{}.{}: rolling restart: starting a successor to {pid}",
            self.pools[pool].program.name,
            id
        );
        self.spawn(pool, id, now);
    }

    fn slot_mut(&mut self, pool: usize, id: u32) -> (Arc<Program>, &mut Slot) {
        let pool = &mut self.pools[pool];
        (Arc::clone(&pool.program), &mut pool.slots[id as usize])
    }

    fn stop(&mut self, pool: usize, id: u32, now: Instant) {
        let mut kill_at = now + self.pools[pool].program.stop_timeout;
        if let Phase::ShuttingDown { deadline } = self.phase {
            kill_at = kill_at.min(deadline);
        }
        let (program, slot) = self.slot_mut(pool, id);
        let Some(pid) = slot.pid() else { return };
        log::debug!(
            "{}.{}: sending {} to process group {pid}",
            program.name,
            id,
            program.stop_signal
        );
        if let Err(e) = sys::process::signal_group(pid, program.stop_signal) {
            log::warn!(
                "{}.{}: cannot signal process group {pid}: {e}",
                program.name,
                id
            );
        }
        slot.transition(Event::Stop { kill_at }, &program, now);
    }

    fn spawn(&mut self, pool: usize, id: u32, now: Instant) {
        let workers = self.pools[pool].desired();
        let program = Arc::clone(&self.pools[pool].program);
        let slots = &mut self.pools[pool].slots;
        if id as usize == slots.len() {
            slots.push(Slot::new(id));
        }
        let tag = format!("{}.{}", program.name, id);
        let fail = |master: &mut Master, reason: String| {
            log::error!("{tag}: failed: cannot start: {reason}");
            let slot = &mut master.pools[pool].slots[id as usize];
            slot.transition(Event::Fail { reason }, &program, now);
        };
        let mut prepared = match worker::prepare(&program, id, workers, &self.ctx) {
            Ok(p) => p,
            Err(e) => return fail(self, e.to_string()),
        };
        let stdout = match self.output(&program.stdout, 1) {
            Ok(o) => o,
            Err(reason) => return fail(self, reason),
        };
        let stderr = match self.output(&program.stderr, 2) {
            Ok(o) => o,
            Err(reason) => return fail(self, reason),
        };
        let mut pass_fds = Vec::with_capacity(program.listen.len());
        for l in &program.listen {
            match self.listeners.get(&l.address) {
                Some(fd) => pass_fds.push(fd.as_raw_fd()),
                None => {
                    return fail(
                        self,
                        format!("no socket bound for {}", describe_addr(&l.address)),
                    )
                }
            }
        }
        let req = &mut prepared.setup;
        req.pass_fds = pass_fds;
        req.stdin = self.dev_null.as_raw_fd();
        req.stdout = stdout.0;
        req.stderr = stderr.0;
        let child = match sys::spawn::spawn(req, &mut prepared.body) {
            Ok(c) => c,
            Err(e) => {
                // fork failing (EAGAIN, ENOMEM) is transient: retry as after a quick crash.
                log::error!("{tag}: {e}");
                let slot = &mut self.pools[pool].slots[id as usize];
                slot.state = crate::slot::SlotState::Backoff {
                    until: now + program.backoff.initial,
                };
                return;
            }
        };
        // The write ends now live in the child only.
        drop(stdout.1);
        drop(stderr.1);
        log::info!("{tag}: started (pid {})", child.pid);
        self.procs.insert(
            child.pid,
            Proc {
                program: Arc::from(program.name.as_str()),
                id,
                status: Some(child.status),
                lock_names: prepared.lock_names,
                stdout: stdout.2,
                stderr: stderr.2,
                start_time: sys::process::start_time(child.pid).unwrap_or(0),
                stop_signal: program.stop_signal,
                stop_timeout: program.stop_timeout,
            },
        );
        self.groups_dirty = true;
        let generation = self.pools[pool].generation;
        let slot = &mut self.pools[pool].slots[id as usize];
        slot.generation = generation;
        slot.transition(Event::Spawned { pid: child.pid }, &program, now);
    }

    fn poll_set(&self) -> (Vec<libc::pollfd>, Vec<Source>) {
        let mut fds = Vec::with_capacity(1 + self.procs.len() * 2);
        let mut sources = Vec::with_capacity(fds.capacity());
        let mut add = |fd: RawFd, source: Source| {
            fds.push(libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            });
            sources.push(source);
        };
        add(self.signals.fd(), Source::Signals);
        if let Some(n) = &self.notify_socket {
            add(n.fd(), Source::Notify);
        }
        for (&pid, proc) in &self.procs {
            if let Some(s) = &proc.status {
                add(s.as_raw_fd(), Source::Status(pid));
            }
            if let Some(o) = &proc.stdout {
                add(o.fd.as_raw_fd(), Source::Output(pid, Stream::Stdout));
            }
            if let Some(o) = &proc.stderr {
                add(o.fd.as_raw_fd(), Source::Output(pid, Stream::Stderr));
            }
        }
        if let Some(c) = &self.control {
            for (fd, events, id) in c.poll_entries() {
                fds.push(libc::pollfd {
                    fd,
                    events,
                    revents: 0,
                });
                sources.push(Source::Client(id));
            }
        }
        if let Some(c) = &self.control {
            // Last: closed connections are noticed before new ones are counted against the limit.
            // During a graceful stop no new client is taken; those connected still get answers.
            if self.phase == Phase::Running {
                fds.push(libc::pollfd {
                    fd: c.fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
                sources.push(Source::Listener);
            }
        }
        (fds, sources)
    }

    fn handle_signals(&mut self) {
        for sig in self.signals.drain() {
            match sig {
                Signal::SIGCHLD => self.reap_all(),
                Signal::SIGTERM | Signal::SIGINT => self.begin_shutdown(sig),
                Signal::SIGHUP => {
                    log::info!("SIGHUP: reloading {}", self.config.path.display());
                    let _ = self.reload(Instant::now());
                }
                Signal::SIGUSR1 => self.reopen_files(),
                _ => {}
            }
        }
    }

    fn begin_shutdown(&mut self, sig: Signal) {
        if let Phase::ShuttingDown { .. } = self.phase {
            log::info!("{sig} again: the graceful stop is already under way");
            return;
        }
        let deadline = Instant::now() + self.config.shutdown_timeout;
        log::info!(
            "{sig}: stopping {} worker(s) (everything left is killed after {})",
            self.procs.len(),
            crate::format_duration(self.config.shutdown_timeout)
        );
        self.phase = Phase::ShuttingDown { deadline };
        let extend = (self.config.shutdown_timeout + Duration::from_secs(5)).as_micros();
        self.systemd
            .notifier
            .send(&format!("STOPPING=1\nEXTEND_TIMEOUT_USEC={extend}"));
    }

    /// Reaps every exited child: SIGCHLD coalesces, so one signal may stand for many.
    fn reap_all(&mut self) {
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

    fn on_exit(&mut self, pid: Pid, exit: Exit) {
        let now = Instant::now();
        let Some(mut proc) = self.procs.remove(&pid) else {
            log::debug!("reaped process {pid} ({exit}), not a worker");
            return;
        };
        self.groups_dirty = true;
        // Whatever the child reported before dying, and its last output.
        self.drain_status(&mut proc, pid, now);
        for stream in [Stream::Stdout, Stream::Stderr] {
            let tag = proc.tag();
            let pipe = match stream {
                Stream::Stdout => proc.stdout.as_mut(),
                Stream::Stderr => proc.stderr.as_mut(),
            };
            if let Some(pipe) = pipe {
                pump(
                    pipe,
                    &tag,
                    stream,
                    &mut self.files,
                    &mut self.log_ring,
                    true,
                );
            }
        }
        let jitter = self.jitter.sample();
        if let Some(pool) = self
            .pools
            .iter_mut()
            .find(|p| *p.program.name == *proc.program)
        {
            if let Some(slot) = pool.slots.get_mut(proc.id as usize) {
                if slot.retiring.as_ref().is_some_and(|r| r.pid == pid) {
                    slot.retiring = None;
                    log::info!("{}: old process {pid} stopped ({exit})", proc.tag());
                    return;
                }
            }
        }
        let Some((program, slot)) = self.find_slot(&proc.program, proc.id, pid) else {
            return;
        };
        let before = slot.state.name();
        slot.transition(Event::Exited { exit, jitter }, &program, now);
        let tag = proc.tag();
        match &slot.state {
            crate::slot::SlotState::Backoff { until } => {
                let delay = until.saturating_duration_since(now);
                if delay.is_zero() {
                    log::info!("{tag}: {exit}; restarting");
                } else {
                    log::warn!(
                        "{tag}: {exit}; restarting in {}",
                        crate::format_duration(delay)
                    );
                }
            }
            crate::slot::SlotState::Failed { reason } => log::error!("{tag}: failed: {reason}"),
            crate::slot::SlotState::Exited { .. } => log::info!(
                "{tag}: {exit}; not restarted (restart = {:?})",
                program.restart
            ),
            _ if before == "stopping" => log::info!("{tag}: stopped ({exit})"),
            _ => log::info!("{tag}: {exit}"),
        }
    }

    /// The slot whose live process is `pid`.
    fn find_slot(&mut self, program: &str, id: u32, pid: Pid) -> Option<(Arc<Program>, &mut Slot)> {
        let pool = self
            .pools
            .iter_mut()
            .find(|p| &*p.program.name == program)?;
        let program = Arc::clone(&pool.program);
        let slot = pool.slots.get_mut(id as usize)?;
        (slot.pid() == Some(pid)).then_some((program, slot))
    }

    fn read_status(&mut self, pid: Pid, now: Instant) {
        if let Some(mut proc) = self.procs.remove(&pid) {
            self.drain_status(&mut proc, pid, now);
            self.procs.insert(pid, proc);
        }
    }

    fn drain_status(&mut self, proc: &mut Proc, pid: Pid, now: Instant) {
        let Some(fd) = &proc.status else { return };
        let (reports, eof) = match sys::spawn::read_reports(fd.as_raw_fd()) {
            Ok(r) => r,
            Err(e) => {
                log::warn!("{}: cannot read its status pipe: {e}", proc.tag());
                (Vec::new(), true)
            }
        };
        let lock_names = proc.lock_names.clone();
        let tag = proc.tag();
        let Some((program, slot)) = self.find_slot(&proc.program, proc.id, pid) else {
            proc.status = None;
            return;
        };
        let mut failed = false;
        for report in reports {
            match report {
                Report::WaitingForLock(i) => {
                    let name = lock_names.get(i as usize).cloned().unwrap_or_default();
                    log::info!("{tag}: waiting for lock {name}");
                    slot.transition(Event::WaitingForLock { name }, &program, now);
                }
                Report::Failed { stage, errno } => {
                    failed = true;
                    slot.start_error = Some(describe_failure(&program, stage, errno, &lock_names));
                }
            }
        }
        if eof {
            proc.status = None;
            if !failed {
                slot.transition(Event::Exec, &program, now);
            }
        }
    }

    /// Records the live process groups for a later master (see [`orphans`]).
    fn save_groups(&mut self) {
        if !std::mem::take(&mut self.groups_dirty) {
            return;
        }
        let groups: Vec<orphans::Group> = self
            .procs
            .iter()
            .map(|(&pid, p)| orphans::Group {
                pgid: pid,
                start_time: p.start_time,
                stop_signal: p.stop_signal,
                stop_timeout: p.stop_timeout,
            })
            .collect();
        if let Err(e) = orphans::write(&self.config.runtime_dir, &groups) {
            log::warn!("cannot record the worker process groups, ignoring: {e}");
        }
    }

    fn finish(mut self) {
        self.abandon_waiters();
        for addr in self.listeners.keys() {
            if let ListenAddr::Unix(path) = addr {
                let _ = std::fs::remove_file(path);
            }
        }
        if let Some(c) = self.control.take() {
            c.close();
        }
        if let Some(n) = self.notify_socket.take() {
            n.close();
        }
        orphans::remove(&self.config.runtime_dir);
        if let Some(p) = self.pidfile.take() {
            p.remove();
        }
        log::info!("stopped");
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
    }
}

/// Binds every `listen` address of `config` not bound yet. The error names the address.
fn bind_listeners(
    config: &Config,
    listeners: &mut HashMap<ListenAddr, OwnedFd>,
) -> Result<(), (PathBuf, String)> {
    for program in &config.programs {
        for l in &program.listen {
            if listeners.contains_key(&l.address) {
                continue;
            }
            let fd = bind_listener(&l.address, l.mode).map_err(|e| {
                (
                    PathBuf::from(describe_addr(&l.address)),
                    format!("program {}: {e}", program.name),
                )
            })?;
            log::info!(
                "{}: listening on {}",
                program.name,
                describe_addr(&l.address)
            );
            listeners.insert(l.address.clone(), fd);
        }
    }
    Ok(())
}

/// Binds one `listen` address; a `systemd:NAME` one must have been passed to the master.
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
    }
}
