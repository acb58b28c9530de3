//! The worker slot: one place in a program's pool (`web.2`), which keeps its identity across
//! restarts, and its state machine. Pure: the clock is passed in, nothing here performs I/O.
//!
//! ```text
//!            spawn                exec (+ READY=1 when ready = "notify")
//!  stopped ─────────► starting ─────────────────────────────► running ──── roll ───► rolling
//!     ▲                  │  │                                   │          (old keeps serving,
//!     │ stop done        │  └──────── exits ──────┬─────────────┘           successor starts;
//!  stopping ◄── stop ────┘                        ▼                         old stops once the
//!                              restart policy? ── no ──► exited             successor runs)
//!                                   │ yes
//!                         start limit hit? ── yes ──► failed
//!                                   │ no
//!                                backoff ── delay over ──► (spawn) starting
//! ```
//!
//! *Where* a slot is ([`SlotState`]) is kept apart from *why* its last process ended ([`Exit`]).
//! Data that means something in one state lives in that variant (the watchdog deadline in
//! `Running`, what follows a stop in `Stopping`, a reported start error in `Starting`, the old
//! process of a rolling restart in `Rolling`). The state changes in one place,
//! [`Slot::transition`], through one private setter that logs `web.2: old -> new`. Events about
//! a process carry its pid: a late message from a process that is gone names another pid and
//! is ignored, whatever the slot has become since.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use nix::unistd::Pid;

use crate::backoff;
use crate::config::{Program, ReadyMode, RestartPolicy};

/// How a worker's main process ended, as the reaper reports it: plain data from [`crate::sys`].
pub use crate::sys::process::{signal_name, Exit};

/// What a `starting` worker waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartWait {
    /// Forked; its exec has not been confirmed yet.
    Exec,
    /// Blocked in the child on a named file lock.
    Lock(String),
    /// Exec'd; waits for `READY=1` (`ready = "notify"`).
    Ready,
}

/// What follows the end of a stop plumule asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterStop {
    /// Nothing: the slot rests in `stopped` (operator stop, scale-down, shutdown).
    Rest,
    /// Spawn again at once (operator restart, a restart-mode reload).
    Restart,
    /// The stop was a failure of the worker's: restart per its policy, counted as a crash.
    Crash(StopReason),
}

/// A stop that counts as a crash of the worker: it is restarted per its policy afterwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// Not ready within `ready_timeout`: counts as a quick crash.
    ReadyTimeout,
    /// Missed its `WATCHDOG=1`.
    Watchdog,
}

/// The previous process of a slot during a rolling restart.
#[derive(Debug, Clone, PartialEq)]
pub struct Old {
    pub pid: Pid,
    pub since: Instant,
    /// Set once its stop signal was sent: SIGKILL is due then.
    pub kill_at: Option<Instant>,
    pub killed: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum SlotState {
    /// No process, none wanted yet (new slot, stopped by the operator, or after a stop).
    Stopped,
    Starting {
        pid: Pid,
        since: Instant,
        wait: StartWait,
        /// What the child reported before dying, when its set-up failed.
        error: Option<String>,
    },
    Running {
        pid: Pid,
        since: Instant,
        /// When the next `WATCHDOG=1` is due (`watchdog` set).
        watchdog_at: Option<Instant>,
    },
    Stopping {
        pid: Pid,
        since: Instant,
        kill_at: Instant,
        killed: bool,
        then: AfterStop,
    },
    Backoff {
        until: Instant,
    },
    /// Finished and not to be restarted.
    Exited {
        exit: Exit,
    },
    /// Start limit hit, or the worker cannot be started at all.
    Failed {
        reason: String,
    },
    /// A rolling restart: `old` keeps serving while the slot's successor goes through `next`
    /// (stopped, starting, running, backoff…); `old` is stopped once the successor runs, and
    /// when `old` is gone the slot simply is `next`.
    Rolling {
        old: Old,
        next: Box<SlotState>,
    },
}

impl SlotState {
    /// The state's name as `status` shows it (SPEC §3); a rolling slot shows its successor.
    pub fn name(&self) -> &'static str {
        match self {
            SlotState::Stopped => "stopped",
            SlotState::Starting { .. } => "starting",
            SlotState::Running { .. } => "running",
            SlotState::Stopping { .. } => "stopping",
            SlotState::Backoff { .. } => "backoff",
            SlotState::Exited { .. } => "exited",
            SlotState::Failed { .. } => "failed",
            SlotState::Rolling { next, .. } => next.name(),
        }
    }

    /// The live main process of this state (a rolling slot's successor), if any.
    pub fn pid(&self) -> Option<Pid> {
        match self {
            SlotState::Starting { pid, .. }
            | SlotState::Running { pid, .. }
            | SlotState::Stopping { pid, .. } => Some(*pid),
            SlotState::Rolling { next, .. } => next.pid(),
            SlotState::Stopped
            | SlotState::Backoff { .. }
            | SlotState::Exited { .. }
            | SlotState::Failed { .. } => None,
        }
    }

    /// When the live main process was spawned.
    pub fn since(&self) -> Option<Instant> {
        match self {
            SlotState::Starting { since, .. }
            | SlotState::Running { since, .. }
            | SlotState::Stopping { since, .. } => Some(*since),
            SlotState::Rolling { next, .. } => next.since(),
            SlotState::Stopped
            | SlotState::Backoff { .. }
            | SlotState::Exited { .. }
            | SlotState::Failed { .. } => None,
        }
    }

    /// The state of the successor, seen through a rolling restart.
    pub fn current(&self) -> &SlotState {
        match self {
            SlotState::Rolling { next, .. } => next.current(),
            other => other,
        }
    }

    /// The old process of a rolling restart.
    pub fn old(&self) -> Option<&Old> {
        match self {
            SlotState::Rolling { old, .. } => Some(old),
            _ => None,
        }
    }

    /// The earliest moment this state needs the planner without any event: a backoff ending,
    /// a SIGKILL due, a ready timeout, a watchdog ping missed.
    pub fn deadline(&self, program: &Program) -> Option<Instant> {
        match self {
            SlotState::Backoff { until } => Some(*until),
            SlotState::Starting {
                since,
                wait: StartWait::Ready,
                ..
            } => Some(*since + program.ready_timeout),
            SlotState::Running { watchdog_at, .. } => *watchdog_at,
            SlotState::Stopping {
                kill_at,
                killed: false,
                ..
            } => Some(*kill_at),
            SlotState::Rolling { old, next } => {
                let old_due = old.kill_at.filter(|_| !old.killed);
                match (old_due, next.deadline(program)) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            }
            SlotState::Starting { .. }
            | SlotState::Stopping { .. }
            | SlotState::Stopped
            | SlotState::Exited { .. }
            | SlotState::Failed { .. } => None,
        }
    }
}

/// One worker place of a program.
#[derive(Debug, Clone)]
pub struct Slot {
    pub id: u32,
    state: SlotState,
    /// The pool's config generation the current process was spawned with.
    pub generation: u64,
    /// False once the operator stopped this worker; `start` sets it again.
    pub enabled: bool,
    /// Restarts since the master started (operator restarts excluded).
    pub restarts: u32,
    /// Consecutive runs shorter than `healthy_after`.
    pub crashes: u32,
    /// Spawn times inside the `start_limit` window.
    starts: VecDeque<Instant>,
    pub last_exit: Option<Exit>,
    /// Why plumule itself stopped the last process, when that stop counted as a crash (a
    /// ready timeout, a missed watchdog): its `last_exit` is then the signal plumule sent,
    /// not something the worker did of its own accord.
    pub last_stop: Option<StopReason>,
    /// The worker's last `STATUS=` line (reset when a new process starts).
    pub status: Option<String>,
}

/// What happened to a slot, fed to [`Slot::transition`]. Events that come from a process name
/// its pid.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A process was forked for the slot.
    Spawned { pid: Pid },
    /// fork itself failed (EAGAIN, ENOMEM): try again at `until`.
    SpawnFailed { until: Instant },
    /// The child blocks on a lock.
    WaitingForLock { pid: Pid, name: String },
    /// The child's set-up failed; it is about to exit.
    StartError { pid: Pid, reason: String },
    /// The exec is confirmed.
    Exec { pid: Pid },
    /// `READY=1` from the worker.
    Ready { pid: Pid },
    /// `WATCHDOG=1` from the worker.
    WatchdogPing { pid: Pid },
    /// The stop signal was sent to the main process; SIGKILL is due at `kill_at`.
    Stop { kill_at: Instant, then: AfterStop },
    /// SIGKILL was sent to the main process.
    Killed,
    /// A process of the slot was reaped.
    Exited { pid: Pid, exit: Exit, jitter: f64 },
    /// Cannot be started at all (command missing, bad cwd, …).
    Fail { reason: String },
    /// The operator's `start`: clear `failed`/`exited` and the start limit.
    Enable,
    /// The operator's `stop`.
    Disable,
    /// Drop a pending backoff (the slot is no longer wanted).
    CancelBackoff,
    /// Rolling restart: the running process becomes the old one; its successor is spawned next.
    Roll,
    /// The successor is up: the old process was sent its stop signal.
    Retire { kill_at: Instant },
    /// SIGKILL was sent to the old process.
    KillOld,
}

/// Every kind of event, for the table test and logs.
impl Event {
    pub fn name(&self) -> &'static str {
        match self {
            Event::Spawned { .. } => "spawned",
            Event::SpawnFailed { .. } => "spawn-failed",
            Event::WaitingForLock { .. } => "waiting-for-lock",
            Event::StartError { .. } => "start-error",
            Event::Exec { .. } => "exec",
            Event::Ready { .. } => "ready",
            Event::WatchdogPing { .. } => "watchdog-ping",
            Event::Stop { .. } => "stop",
            Event::Killed => "killed",
            Event::Exited { .. } => "exited",
            Event::Fail { .. } => "fail",
            Event::Enable => "enable",
            Event::Disable => "disable",
            Event::CancelBackoff => "cancel-backoff",
            Event::Roll => "roll",
            Event::Retire { .. } => "retire",
            Event::KillOld => "kill-old",
        }
    }
}

/// The outcome of one (state, event) pair.
enum Step {
    /// The pair means nothing (a late message, a command that does not apply): no change.
    Ignore,
    /// Stay, with counters maybe updated (a watchdog ping moves its deadline).
    Go(SlotState),
}

impl Slot {
    pub fn new(id: u32) -> Self {
        Slot {
            id,
            state: SlotState::Stopped,
            generation: 0,
            enabled: true,
            restarts: 0,
            crashes: 0,
            starts: VecDeque::new(),
            last_exit: None,
            last_stop: None,
            status: None,
        }
    }

    pub fn state(&self) -> &SlotState {
        &self.state
    }

    /// The live main process (a rolling slot's successor).
    pub fn pid(&self) -> Option<Pid> {
        self.state.pid()
    }

    /// Whether the slot has a process (alive or not yet reaped), a rolling one's old included.
    pub fn is_live(&self) -> bool {
        self.state.pid().is_some() || self.state.old().is_some()
    }

    /// One line of why, for `status`: lock waited for, restart delay, failure reason.
    pub fn detail(&self, now: Instant) -> Option<String> {
        match self.state.current() {
            SlotState::Starting {
                wait: StartWait::Lock(name),
                ..
            } => Some(format!("waiting for lock {name}")),
            SlotState::Starting {
                wait: StartWait::Ready,
                ..
            } => Some("waiting for READY=1".to_string()),
            SlotState::Backoff { until } => Some(format!(
                "restarting in {}",
                crate::format_duration(until.saturating_duration_since(now))
            )),
            SlotState::Exited { exit } => Some(format!("finished: {exit}")),
            SlotState::Stopping { then, .. } => match then {
                AfterStop::Crash(StopReason::ReadyTimeout) => {
                    Some("not ready within ready_timeout".into())
                }
                AfterStop::Crash(StopReason::Watchdog) => Some("missed its watchdog".into()),
                AfterStop::Rest | AfterStop::Restart => None,
            },
            SlotState::Failed { reason } => Some(reason.clone()),
            SlotState::Starting { .. }
            | SlotState::Running { .. }
            | SlotState::Stopped
            | SlotState::Rolling { .. } => None,
        }
    }

    /// How the last process ended, in words: the reason plumule stopped it when that stop
    /// counted as a crash (the signal it sent is not the worker's doing), else its exit.
    pub fn last_end(&self, program: &Program) -> String {
        match self.last_stop {
            Some(StopReason::ReadyTimeout) => format!(
                "not ready within ready_timeout ({})",
                crate::format_duration(program.ready_timeout)
            ),
            Some(StopReason::Watchdog) => format!(
                "missed its watchdog ({})",
                program.watchdog.map_or("?".into(), crate::format_duration)
            ),
            None => self.last_exit.map_or("?".into(), |e| e.to_string()),
        }
    }

    /// Applies `event` at `now` under `program`'s settings. Returns whether the state changed.
    /// Events that make no sense in the current state (a late message from a process that is
    /// gone) are ignored.
    pub fn transition(&mut self, event: Event, program: &Program, now: Instant) -> bool {
        let state = std::mem::replace(&mut self.state, SlotState::Stopped);
        match self.step(&state, event, program, now) {
            Step::Ignore => {
                self.state = state;
                false
            }
            Step::Go(next) => {
                self.set_state(state, next, &program.name);
                true
            }
        }
    }

    /// The one place the state changes. The old state is dropped here, with what it owned.
    fn set_state(&mut self, old: SlotState, new: SlotState, program: &str) {
        if old.name() != new.name() || old.old().is_some() != new.old().is_some() {
            let rolling = |s: &SlotState| if s.old().is_some() { " (rolling)" } else { "" };
            log::debug!(
                "{program}.{}: {}{} -> {}{}",
                self.id,
                old.name(),
                rolling(&old),
                new.name(),
                rolling(&new)
            );
        }
        self.state = new;
    }

    /// The whole table of (state, event) pairs. No `_` arm: a new state or event does not
    /// compile until each of its pairs is decided.
    fn step(&mut self, state: &SlotState, event: Event, program: &Program, now: Instant) -> Step {
        use Event as E;
        use SlotState as S;
        use Step::{Go, Ignore};
        let mine = |pid: &Pid, of: Option<Pid>| of == Some(*pid);
        // Every state but `Rolling` (which hands its events on, above): the ignored pairs.
        macro_rules! any_state {
            () => {
                S::Stopped
                    | S::Starting { .. }
                    | S::Running { .. }
                    | S::Stopping { .. }
                    | S::Backoff { .. }
                    | S::Exited { .. }
                    | S::Failed { .. }
            };
        }
        match (state, event) {
            // A rolling restart: what concerns the old process is handled here, the rest is
            // the successor's and goes through the same table.
            (S::Rolling { old, .. }, E::Exited { pid, exit, .. }) if pid == old.pid => {
                let S::Rolling { next, .. } = state.clone() else {
                    unreachable!()
                };
                log::info!(
                    "{}.{}: old process {pid} stopped ({exit})",
                    program.name,
                    self.id
                );
                Go(*next)
            }
            (S::Rolling { old, next }, E::Retire { kill_at }) if old.kill_at.is_none() => {
                Go(S::Rolling {
                    old: Old {
                        kill_at: Some(kill_at),
                        ..old.clone()
                    },
                    next: next.clone(),
                })
            }
            (S::Rolling { old, next }, E::KillOld) if !old.killed => Go(S::Rolling {
                old: Old {
                    killed: true,
                    ..old.clone()
                },
                next: next.clone(),
            }),
            (S::Rolling { .. }, E::Retire { .. } | E::KillOld | E::Roll) => Ignore,
            (S::Rolling { old, next }, event) => match self.step(next, event, program, now) {
                Ignore => Ignore,
                Go(n) => Go(S::Rolling {
                    old: old.clone(),
                    next: Box::new(n),
                }),
            },

            (S::Stopped | S::Backoff { .. }, E::Spawned { pid }) => {
                self.starts.push_back(now);
                // Only the last `burst` starts can reach the limit; without a limit none is
                // kept (a crash loop would otherwise grow this by one entry per restart).
                let keep = program.start_limit.map_or(0, |l| l.burst as usize);
                while self.starts.len() > keep {
                    self.starts.pop_front();
                }
                self.status = None;
                Go(S::Starting {
                    pid,
                    since: now,
                    wait: StartWait::Exec,
                    error: None,
                })
            }
            (
                S::Starting { .. }
                | S::Running { .. }
                | S::Stopping { .. }
                | S::Exited { .. }
                | S::Failed { .. },
                E::Spawned { .. },
            ) => Ignore,

            (S::Stopped | S::Backoff { .. }, E::SpawnFailed { until }) => Go(S::Backoff { until }),
            (
                S::Starting { .. }
                | S::Running { .. }
                | S::Stopping { .. }
                | S::Exited { .. }
                | S::Failed { .. },
                E::SpawnFailed { .. },
            ) => Ignore,

            (
                S::Starting {
                    pid, since, error, ..
                },
                E::WaitingForLock { pid: from, name },
            ) if *pid == from => Go(S::Starting {
                pid: *pid,
                since: *since,
                wait: StartWait::Lock(name),
                error: error.clone(),
            }),
            (any_state!(), E::WaitingForLock { .. }) => Ignore,

            (
                S::Starting {
                    pid, since, wait, ..
                },
                E::StartError { pid: from, reason },
            ) if *pid == from => Go(S::Starting {
                pid: *pid,
                since: *since,
                wait: wait.clone(),
                error: Some(reason),
            }),
            (any_state!(), E::StartError { .. }) => Ignore,

            (
                S::Starting {
                    pid,
                    since,
                    wait: StartWait::Exec | StartWait::Lock(_),
                    error: None,
                },
                E::Exec { pid: from },
            ) if *pid == from => Go(match program.ready {
                ReadyMode::Started => S::Running {
                    pid: *pid,
                    since: *since,
                    watchdog_at: program.watchdog.map(|w| now + w),
                },
                ReadyMode::Notify => S::Starting {
                    pid: *pid,
                    since: *since,
                    wait: StartWait::Ready,
                    error: None,
                },
            }),
            (any_state!(), E::Exec { .. }) => Ignore,

            // READY=1 can only come from a process that has exec'd: a READY read before the
            // status pipe's end (the notify socket is read first in a pass) confirms the exec.
            (
                S::Starting {
                    pid,
                    since,
                    error: None,
                    ..
                },
                E::Ready { pid: from },
            ) if *pid == from && program.ready == ReadyMode::Notify => Go(S::Running {
                pid: *pid,
                since: *since,
                watchdog_at: program.watchdog.map(|w| now + w),
            }),
            (any_state!(), E::Ready { .. }) => Ignore,

            (
                S::Running {
                    pid,
                    since,
                    watchdog_at: Some(_),
                },
                E::WatchdogPing { pid: from },
            ) if *pid == from => Go(S::Running {
                pid: *pid,
                since: *since,
                watchdog_at: program.watchdog.map(|w| now + w),
            }),
            (any_state!(), E::WatchdogPing { .. }) => Ignore,

            (
                S::Starting { pid, since, .. } | S::Running { pid, since, .. },
                E::Stop { kill_at, then },
            ) => Go(S::Stopping {
                pid: *pid,
                since: *since,
                kill_at,
                killed: false,
                then,
            }),
            // A stop already under way may still be turned into a restart.
            (
                S::Stopping {
                    pid,
                    since,
                    kill_at,
                    killed,
                    then: AfterStop::Rest,
                },
                E::Stop {
                    then: AfterStop::Restart,
                    ..
                },
            ) => Go(S::Stopping {
                pid: *pid,
                since: *since,
                kill_at: *kill_at,
                killed: *killed,
                then: AfterStop::Restart,
            }),
            (
                S::Stopping { .. }
                | S::Stopped
                | S::Backoff { .. }
                | S::Exited { .. }
                | S::Failed { .. },
                E::Stop { .. },
            ) => Ignore,

            (
                S::Stopping {
                    pid,
                    since,
                    kill_at,
                    killed: false,
                    then,
                },
                E::Killed,
            ) => Go(S::Stopping {
                pid: *pid,
                since: *since,
                kill_at: *kill_at,
                killed: true,
                then: *then,
            }),
            (any_state!(), E::Killed) => Ignore,

            (
                S::Stopping {
                    pid, since, then, ..
                },
                E::Exited {
                    pid: from,
                    exit,
                    jitter,
                },
            ) if mine(pid, Some(from)) => {
                self.last_exit = Some(exit);
                self.last_stop = match then {
                    AfterStop::Crash(reason) => Some(*reason),
                    AfterStop::Restart | AfterStop::Rest => None,
                };
                match then {
                    AfterStop::Crash(reason) => {
                        let ran = match reason {
                            StopReason::ReadyTimeout => Duration::ZERO,
                            StopReason::Watchdog => now.saturating_duration_since(*since),
                        };
                        Go(self.after_exit(exit, ran, jitter, None, program, now))
                    }
                    AfterStop::Restart if self.enabled => Go(S::Backoff { until: now }),
                    AfterStop::Restart | AfterStop::Rest => Go(S::Stopped),
                }
            }
            (
                S::Starting {
                    pid, since, error, ..
                },
                E::Exited {
                    pid: from,
                    exit,
                    jitter,
                },
            ) if *pid == from => {
                self.last_exit = Some(exit);
                self.last_stop = None;
                let ran = now.saturating_duration_since(*since);
                Go(self.after_exit(exit, ran, jitter, error.clone(), program, now))
            }
            (
                S::Running { pid, since, .. },
                E::Exited {
                    pid: from,
                    exit,
                    jitter,
                },
            ) if *pid == from => {
                self.last_exit = Some(exit);
                self.last_stop = None;
                let ran = now.saturating_duration_since(*since);
                Go(self.after_exit(exit, ran, jitter, None, program, now))
            }
            (any_state!(), E::Exited { .. }) => Ignore,

            (any_state!(), E::Fail { reason }) => Go(S::Failed { reason }),

            (state, E::Enable) => {
                self.enabled = true;
                self.starts.clear();
                self.crashes = 0;
                match state {
                    S::Failed { .. } | S::Exited { .. } | S::Backoff { .. } => Go(S::Stopped),
                    S::Starting { .. } | S::Running { .. } | S::Stopping { .. } | S::Stopped => {
                        Ignore
                    }
                    S::Rolling { .. } => unreachable!("handled with the rolling state above"),
                }
            }
            (state, E::Disable) => {
                self.enabled = false;
                match state {
                    S::Backoff { .. } => Go(S::Stopped),
                    // An operator's stop of a failed worker acknowledges it.
                    S::Failed { .. } => Go(S::Stopped),
                    S::Stopping {
                        pid,
                        since,
                        kill_at,
                        killed,
                        then: AfterStop::Restart,
                    } => Go(S::Stopping {
                        pid: *pid,
                        since: *since,
                        kill_at: *kill_at,
                        killed: *killed,
                        then: AfterStop::Rest,
                    }),
                    S::Starting { .. }
                    | S::Running { .. }
                    | S::Stopping { .. }
                    | S::Stopped
                    | S::Exited { .. } => Ignore,
                    S::Rolling { .. } => unreachable!("handled with the rolling state above"),
                }
            }

            (S::Backoff { .. }, E::CancelBackoff) => Go(S::Stopped),
            (
                S::Starting { .. }
                | S::Running { .. }
                | S::Stopping { .. }
                | S::Stopped
                | S::Exited { .. }
                | S::Failed { .. },
                E::CancelBackoff,
            ) => Ignore,

            (
                S::Running {
                    pid,
                    since,
                    watchdog_at: _,
                },
                E::Roll,
            ) => Go(S::Rolling {
                old: Old {
                    pid: *pid,
                    since: *since,
                    kill_at: None,
                    killed: false,
                },
                next: Box::new(S::Stopped),
            }),
            (S::Running { .. }, E::Retire { .. } | E::KillOld) => Ignore,
            (
                S::Starting { .. }
                | S::Stopping { .. }
                | S::Stopped
                | S::Backoff { .. }
                | S::Exited { .. }
                | S::Failed { .. },
                E::Roll | E::Retire { .. } | E::KillOld,
            ) => Ignore,
        }
    }

    /// Where an unrequested exit leads: restart (after a delay), `exited` or `failed`.
    fn after_exit(
        &mut self,
        exit: Exit,
        ran: Duration,
        jitter: f64,
        start_error: Option<String>,
        program: &Program,
        now: Instant,
    ) -> SlotState {
        if let Some(reason) = start_error {
            return SlotState::Failed { reason };
        }
        let success = matches!(exit, Exit::Code(c) if program.success_exit_codes.contains(&c));
        let restart = match program.restart {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => !success,
            RestartPolicy::Never => false,
        };
        if !restart || !self.enabled {
            return SlotState::Exited { exit };
        }
        if let Some(limit) = program.start_limit {
            while self
                .starts
                .front()
                .is_some_and(|t| now.duration_since(*t) >= limit.interval)
            {
                self.starts.pop_front();
            }
            if self.starts.len() >= limit.burst as usize {
                return SlotState::Failed {
                    reason: format!(
                        "start limit hit: {} starts within {} (last {exit})",
                        limit.burst,
                        crate::format_duration(limit.interval)
                    ),
                };
            }
        }
        if ran >= program.healthy_after {
            self.crashes = 0;
        } else {
            self.crashes = self.crashes.saturating_add(1);
        }
        self.restarts = self.restarts.saturating_add(1);
        SlotState::Backoff {
            until: now + backoff::delay(&program.backoff, self.crashes, jitter),
        }
    }

    /// Puts the slot in `state` directly: for tests that start from a given state.
    #[cfg(test)]
    pub(crate) fn with_state(id: u32, state: SlotState) -> Slot {
        let mut slot = Slot::new(id);
        slot.state = state;
        slot
    }
}
#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::{Backoff, StartLimit};
    use nix::sys::signal::Signal;

    pub(crate) fn program() -> Program {
        crate::test_support::program("web", 1)
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn pid(n: i32) -> Pid {
        Pid::from_raw(n)
    }

    /// Spawns, execs and lets the worker run for `ran`, then exits with `exit`.
    fn run_once(slot: &mut Slot, p: &Program, t: Instant, ran: Duration, exit: Exit) -> Instant {
        slot.transition(Event::Spawned { pid: pid(10) }, p, t);
        slot.transition(Event::Exec { pid: pid(10) }, p, t);
        assert_eq!(slot.state().name(), "running");
        let end = t + ran;
        slot.transition(
            Event::Exited {
                pid: pid(10),
                exit,
                jitter: 0.0,
            },
            p,
            end,
        );
        end
    }

    #[test]
    fn quick_crashes_back_off_geometrically_and_a_healthy_run_resets() {
        let mut p = program();
        p.backoff = Backoff {
            initial: ms(100),
            max: ms(1000),
            multiplier: 2.0,
            jitter: 0.0,
        };
        p.healthy_after = ms(1000);
        let mut slot = Slot::new(0);
        let mut t = Instant::now();
        let mut delays = vec![];
        for _ in 0..5 {
            let end = run_once(&mut slot, &p, t, ms(10), Exit::Code(1));
            let SlotState::Backoff { until } = *slot.state() else {
                panic!("{:?}", slot.state())
            };
            delays.push(until - end);
            t = until;
        }
        assert_eq!(delays, vec![ms(100), ms(200), ms(400), ms(800), ms(1000)]);
        let end = run_once(&mut slot, &p, t, ms(5000), Exit::Code(1));
        assert_eq!(
            *slot.state(),
            SlotState::Backoff { until: end },
            "healthy run restarts at once"
        );
        assert_eq!(slot.crashes, 0);
        assert_eq!(slot.restarts, 6);
    }

    #[test]
    fn restart_policies() {
        // (policy, success codes, exit, expected state name)
        let table = [
            (RestartPolicy::Always, vec![0], Exit::Code(0), "backoff"),
            (RestartPolicy::Always, vec![0], Exit::Code(1), "backoff"),
            (RestartPolicy::Never, vec![0], Exit::Code(1), "exited"),
            (
                RestartPolicy::Never,
                vec![0],
                Exit::Signal(Signal::SIGKILL),
                "exited",
            ),
            (RestartPolicy::OnFailure, vec![0], Exit::Code(0), "exited"),
            (RestartPolicy::OnFailure, vec![0], Exit::Code(3), "backoff"),
            (
                RestartPolicy::OnFailure,
                vec![0, 3],
                Exit::Code(3),
                "exited",
            ),
            (
                RestartPolicy::OnFailure,
                vec![0],
                Exit::Signal(Signal::SIGTERM),
                "backoff",
            ),
            (
                RestartPolicy::OnFailure,
                vec![0],
                Exit::Signal(Signal::SIGKILL),
                "backoff",
            ),
        ];
        for (policy, codes, exit, expected) in table {
            let mut p = program();
            p.restart = policy;
            p.success_exit_codes = codes.clone();
            let mut slot = Slot::new(0);
            run_once(&mut slot, &p, Instant::now(), ms(5), exit);
            assert_eq!(
                slot.state().name(),
                expected,
                "{policy:?} {codes:?} {exit:?}"
            );
            assert_eq!(slot.last_exit, Some(exit));
        }
    }

    fn stop(kill_at: Instant, then: AfterStop) -> Event {
        Event::Stop { kill_at, then }
    }

    fn exited(n: i32, exit: Exit) -> Event {
        Event::Exited {
            pid: pid(n),
            exit,
            jitter: 0.0,
        }
    }

    #[test]
    fn requested_stop_ends_stopped_or_restarts_when_asked() {
        let p = program();
        let t = Instant::now();
        let mut slot = Slot::new(0);
        slot.transition(Event::Spawned { pid: pid(7) }, &p, t);
        slot.transition(Event::Exec { pid: pid(7) }, &p, t);
        slot.transition(stop(t + ms(10), AfterStop::Rest), &p, t);
        assert!(matches!(
            slot.state(),
            SlotState::Stopping { killed: false, .. }
        ));
        slot.transition(Event::Killed, &p, t + ms(10));
        assert!(matches!(
            slot.state(),
            SlotState::Stopping { killed: true, .. }
        ));
        let exit = Exit::Signal(Signal::SIGKILL);
        slot.transition(exited(7, exit), &p, t + ms(11));
        assert_eq!(*slot.state(), SlotState::Stopped);
        assert_eq!(slot.restarts, 0, "a requested stop is not a restart");

        slot.transition(Event::Spawned { pid: pid(8) }, &p, t);
        slot.transition(stop(t, AfterStop::Restart), &p, t);
        slot.transition(exited(8, exit), &p, t + ms(1));
        assert_eq!(*slot.state(), SlotState::Backoff { until: t + ms(1) });
    }

    #[test]
    fn start_limit_counts_starts_in_the_window() {
        let mut p = program();
        p.backoff = Backoff {
            initial: ms(1),
            max: ms(1),
            multiplier: 1.0,
            jitter: 0.0,
        };
        p.start_limit = Some(StartLimit {
            burst: 3,
            interval: Duration::from_secs(60),
        });
        let mut slot = Slot::new(0);
        let mut t = Instant::now();
        let mut names = vec![];
        for _ in 0..3 {
            t = run_once(&mut slot, &p, t, ms(1), Exit::Code(1)) + ms(1);
            names.push(slot.state().name());
        }
        assert_eq!(names, vec!["backoff", "backoff", "failed"]);
        let SlotState::Failed { reason } = slot.state() else {
            unreachable!()
        };
        assert!(
            reason.contains("start limit hit: 3 starts within 1m"),
            "{reason}"
        );

        // `start` clears it, and starts older than the window no longer count.
        slot.transition(Event::Enable, &p, t);
        assert_eq!(*slot.state(), SlotState::Stopped);
        let t = run_once(&mut slot, &p, t, ms(1), Exit::Code(1));
        assert_eq!(slot.state().name(), "backoff");
        let later = t + Duration::from_secs(61);
        run_once(&mut slot, &p, later, ms(1), Exit::Code(1));
        run_once(&mut slot, &p, later + ms(5), ms(1), Exit::Code(1));
        assert_eq!(slot.state().name(), "backoff");
    }

    #[test]
    fn start_times_kept_are_bounded_by_the_start_limit() {
        let mut p = program();
        p.backoff = Backoff {
            initial: ms(1),
            max: ms(1),
            multiplier: 1.0,
            jitter: 0.0,
        };
        let mut slot = Slot::new(0);
        let mut t = Instant::now();
        for _ in 0..1000 {
            t = run_once(&mut slot, &p, t, ms(1), Exit::Code(1)) + ms(1);
        }
        assert_eq!(slot.restarts, 1000);
        assert_eq!(slot.starts.len(), 0, "no start limit: no start time kept");

        p.start_limit = Some(StartLimit {
            burst: 5,
            interval: Duration::from_millis(1),
        });
        for _ in 0..1000 {
            t = run_once(&mut slot, &p, t, ms(1), Exit::Code(1)) + ms(1);
        }
        assert_eq!(slot.state().name(), "backoff");
        assert!(
            slot.starts.len() <= 5,
            "{} start times kept",
            slot.starts.len()
        );
    }

    #[test]
    fn a_reported_start_error_fails_instead_of_restarting() {
        let p = program();
        let t = Instant::now();
        let mut slot = Slot::new(0);
        slot.transition(Event::Spawned { pid: pid(9) }, &p, t);
        let reason = "cannot change directory to /nope: No such file".to_string();
        slot.transition(
            Event::StartError {
                pid: pid(9),
                reason,
            },
            &p,
            t,
        );
        slot.transition(exited(9, Exit::Code(127)), &p, t);
        assert_eq!(slot.state().name(), "failed");
        assert!(slot.detail(t).unwrap().contains("/nope"));
    }

    #[test]
    fn lock_wait_and_readiness_show_in_detail() {
        let mut p = program();
        p.ready = ReadyMode::Notify;
        let t = Instant::now();
        let mut slot = Slot::new(0);
        slot.transition(Event::Spawned { pid: pid(9) }, &p, t);
        let name = "db".to_string();
        slot.transition(Event::WaitingForLock { pid: pid(9), name }, &p, t);
        assert_eq!(slot.detail(t).as_deref(), Some("waiting for lock db"));
        slot.transition(Event::Exec { pid: pid(9) }, &p, t);
        assert_eq!(slot.state().name(), "starting");
        assert_eq!(slot.detail(t).as_deref(), Some("waiting for READY=1"));
        slot.transition(Event::Ready { pid: pid(9) }, &p, t);
        assert_eq!(slot.state().name(), "running");
    }

    /// Regression (issue "a master that can grow"): the notify socket is read before the
    /// status pipes in a pass, so READY=1 may come before the exec is confirmed. It was
    /// dropped, and the worker stayed `starting` until its ready_timeout.
    #[test]
    fn ready_before_the_exec_is_confirmed_is_kept() {
        let mut p = program();
        p.ready = ReadyMode::Notify;
        let t = Instant::now();
        let mut slot = Slot::new(0);
        slot.transition(Event::Spawned { pid: pid(9) }, &p, t);
        assert!(slot.transition(Event::Ready { pid: pid(9) }, &p, t));
        assert_eq!(slot.state().name(), "running");
        assert!(
            !slot.transition(Event::Exec { pid: pid(9) }, &p, t),
            "late exec"
        );
        assert_eq!(slot.state().name(), "running");
        // Without ready = "notify", READY means nothing: the exec decides.
        let p = program();
        let mut slot = Slot::new(0);
        slot.transition(Event::Spawned { pid: pid(9) }, &p, t);
        assert!(!slot.transition(Event::Ready { pid: pid(9) }, &p, t));
        assert_eq!(slot.state().name(), "starting");
    }

    #[test]
    fn ready_timeout_counts_as_a_quick_crash_and_watchdog_restarts() {
        let mut p = program();
        p.ready = ReadyMode::Notify;
        p.watchdog = Some(ms(500));
        p.healthy_after = ms(10);
        p.backoff = Backoff {
            initial: ms(100),
            max: ms(1000),
            multiplier: 2.0,
            jitter: 0.0,
        };
        let t = Instant::now();
        let mut slot = Slot::new(0);
        slot.transition(Event::Spawned { pid: pid(3) }, &p, t);
        slot.transition(Event::Exec { pid: pid(3) }, &p, t);
        let ready_timeout = AfterStop::Crash(StopReason::ReadyTimeout);
        slot.transition(stop(t + ms(100), ready_timeout), &p, t + ms(50));
        assert_eq!(
            slot.detail(t).as_deref(),
            Some("not ready within ready_timeout")
        );
        slot.transition(exited(3, Exit::Signal(Signal::SIGTERM)), &p, t + ms(60));
        assert_eq!(
            *slot.state(),
            SlotState::Backoff { until: t + ms(160) },
            "quick crash: initial delay"
        );
        assert_eq!(slot.crashes, 1);
        assert_eq!(
            slot.last_end(&p),
            "not ready within ready_timeout (30s)",
            "the TERM was plumule's, not a crash of the worker's"
        );

        let t = t + ms(200);
        slot.transition(Event::Spawned { pid: pid(4) }, &p, t);
        slot.transition(Event::Exec { pid: pid(4) }, &p, t);
        assert_eq!(slot.state().deadline(&p), Some(t + p.ready_timeout));
        slot.transition(Event::Ready { pid: pid(4) }, &p, t);
        assert_eq!(slot.state().deadline(&p), Some(t + ms(500)), "watchdog");
        slot.transition(Event::WatchdogPing { pid: pid(4) }, &p, t + ms(400));
        assert_eq!(slot.state().deadline(&p), Some(t + ms(900)));
        let watchdog = AfterStop::Crash(StopReason::Watchdog);
        slot.transition(stop(t + ms(2000), watchdog), &p, t + ms(900));
        slot.transition(exited(4, Exit::Signal(Signal::SIGABRT)), &p, t + ms(901));
        assert_eq!(
            *slot.state(),
            SlotState::Backoff { until: t + ms(901) },
            "healthy run: at once"
        );
        assert_eq!(slot.last_end(&p), "missed its watchdog (500ms)");
        let t = t + ms(1000);
        slot.transition(Event::Spawned { pid: pid(5) }, &p, t);
        slot.transition(Event::Exec { pid: pid(5) }, &p, t);
        slot.transition(exited(5, Exit::Code(3)), &p, t + ms(1));
        assert_eq!(
            slot.last_end(&p),
            Exit::Code(3).to_string(),
            "its own exit again"
        );
    }

    #[test]
    fn late_events_are_ignored() {
        let p = program();
        let t = Instant::now();
        let mut slot = Slot::new(0);
        slot.transition(Event::Exec { pid: pid(1) }, &p, t);
        slot.transition(Event::Ready { pid: pid(1) }, &p, t);
        slot.transition(exited(1, Exit::Code(0)), &p, t);
        assert_eq!(*slot.state(), SlotState::Stopped);
        // An event from another pid than the slot's process is not about this slot's process.
        slot.transition(Event::Spawned { pid: pid(2) }, &p, t);
        assert!(!slot.transition(exited(1, Exit::Code(0)), &p, t));
        assert!(!slot.transition(Event::Exec { pid: pid(1) }, &p, t));
        assert_eq!(slot.state().name(), "starting");
    }

    #[test]
    fn disabled_slot_does_not_restart() {
        let p = program();
        let t = Instant::now();
        let mut slot = Slot::new(0);
        slot.transition(Event::Disable, &p, t);
        run_once(&mut slot, &p, t, ms(5), Exit::Code(1));
        assert_eq!(slot.state().name(), "exited");
    }

    #[test]
    fn a_rolling_restart_keeps_the_old_process_until_its_successor_runs() {
        let p = program();
        let t = Instant::now();
        let mut slot = Slot::new(0);
        slot.transition(Event::Spawned { pid: pid(1) }, &p, t);
        slot.transition(Event::Exec { pid: pid(1) }, &p, t);
        slot.transition(Event::Roll, &p, t);
        assert_eq!(
            slot.state().name(),
            "stopped",
            "the successor is not forked yet"
        );
        assert_eq!(slot.state().old().map(|o| o.pid), Some(pid(1)));
        slot.transition(Event::Spawned { pid: pid(2) }, &p, t);
        slot.transition(Event::Exec { pid: pid(2) }, &p, t);
        assert_eq!(slot.pid(), Some(pid(2)));
        slot.transition(
            Event::Retire {
                kill_at: t + ms(10),
            },
            &p,
            t,
        );
        assert_eq!(slot.state().deadline(&p), Some(t + ms(10)));
        slot.transition(Event::KillOld, &p, t + ms(10));
        assert_eq!(slot.state().deadline(&p), None);
        // The old process's exit ends the roll; it is no crash of the successor.
        slot.transition(exited(1, Exit::Signal(Signal::SIGKILL)), &p, t + ms(11));
        assert!(matches!(slot.state(), SlotState::Running { pid: p2, .. } if *p2 == pid(2)));
        assert_eq!(slot.restarts, 0);
        assert_eq!(slot.last_exit, None);
    }

    /// Every state against every event: the resulting state's name, or "-" when the pair is
    /// ignored. Written out whole, so that a change to any pair shows here.
    #[test]
    fn table_of_every_state_against_every_event() {
        let mut p = program();
        p.ready = ReadyMode::Notify;
        let t = Instant::now();
        let me = pid(5);
        let old = Old {
            pid: pid(4),
            since: t,
            kill_at: None,
            killed: false,
        };
        let running = SlotState::Running {
            pid: me,
            since: t,
            watchdog_at: Some(t + ms(100)),
        };
        let starting = |wait| SlotState::Starting {
            pid: me,
            since: t,
            wait,
            error: None,
        };
        let states: Vec<(&str, SlotState)> = vec![
            ("stopped", SlotState::Stopped),
            ("starting/exec", starting(StartWait::Exec)),
            ("starting/lock", starting(StartWait::Lock("db".into()))),
            ("starting/ready", starting(StartWait::Ready)),
            ("running", running.clone()),
            (
                "stopping",
                SlotState::Stopping {
                    pid: me,
                    since: t,
                    kill_at: t + ms(10),
                    killed: false,
                    then: AfterStop::Rest,
                },
            ),
            ("backoff", SlotState::Backoff { until: t + ms(10) }),
            (
                "exited",
                SlotState::Exited {
                    exit: Exit::Code(0),
                },
            ),
            ("failed", SlotState::Failed { reason: "x".into() }),
            (
                "rolling",
                SlotState::Rolling {
                    old: old.clone(),
                    next: Box::new(running),
                },
            ),
        ];
        let events: Vec<Event> = vec![
            Event::Spawned { pid: pid(6) },
            Event::SpawnFailed { until: t },
            Event::WaitingForLock {
                pid: me,
                name: "db".into(),
            },
            Event::StartError {
                pid: me,
                reason: "x".into(),
            },
            Event::Exec { pid: me },
            Event::Ready { pid: me },
            Event::WatchdogPing { pid: me },
            stop(t + ms(10), AfterStop::Restart),
            Event::Killed,
            exited(5, Exit::Code(1)),
            Event::Fail { reason: "x".into() },
            Event::Enable,
            Event::Disable,
            Event::CancelBackoff,
            Event::Roll,
            Event::Retire { kill_at: t },
            Event::KillOld,
        ];
        // Rows: states in the order above. Columns: events in the order above.
        // "-" = ignored; "=" = stays in the same state with its data changed; else the new state.
        #[rustfmt::skip]
        let expected: [[&str; 17]; 10] = [
            // spawned    spawn-f   lock       start-err  exec       ready      wd-ping stop        killed     exited     fail      enable     disable    cancel     roll       retire kill-old
            ["starting", "backoff", "-",       "-",       "-",       "-",       "-",    "-",        "-",       "-",       "failed", "-",       "-",       "-",       "-",       "-",   "-"], // stopped
            ["-",        "-",       "=",       "=",       "=",       "running", "-",    "stopping", "-",       "backoff", "failed", "-",       "-",       "-",       "-",       "-",   "-"], // starting/exec
            ["-",        "-",       "=",       "=",       "=",       "running", "-",    "stopping", "-",       "backoff", "failed", "-",       "-",       "-",       "-",       "-",   "-"], // starting/lock
            ["-",        "-",       "=",       "=",       "-",       "running", "-",    "stopping", "-",       "backoff", "failed", "-",       "-",       "-",       "-",       "-",   "-"], // starting/ready
            ["-",        "-",       "-",       "-",       "-",       "-",       "=",    "stopping", "-",       "backoff", "failed", "-",       "-",       "-",       "stopped", "-",   "-"], // running
            ["-",        "-",       "-",       "-",       "-",       "-",       "-",    "=",        "=",       "stopped", "failed", "-",       "-",       "-",       "-",       "-",   "-"], // stopping
            ["starting", "=",       "-",       "-",       "-",       "-",       "-",    "-",        "-",       "-",       "failed", "stopped", "stopped", "stopped", "-",       "-",   "-"], // backoff
            ["-",        "-",       "-",       "-",       "-",       "-",       "-",    "-",        "-",       "-",       "failed", "stopped", "-",       "-",       "-",       "-",   "-"], // exited
            ["-",        "-",       "-",       "-",       "-",       "-",       "-",    "-",        "-",       "-",       "=",      "stopped", "stopped", "-",       "-",       "-",   "-"], // failed
            ["-",        "-",       "-",       "-",       "-",       "-",       "=",    "stopping", "-",       "backoff", "failed", "-",       "-",       "-",       "-",       "=",   "="], // rolling
        ];
        let mut wrong = Vec::new();
        for (row, (state_name, state)) in states.iter().enumerate() {
            for (col, event) in events.iter().enumerate() {
                let mut slot = Slot::with_state(0, state.clone());
                let changed = slot.transition(event.clone(), &p, t + ms(1));
                let got = if !changed {
                    "-"
                } else if slot.state().name() == state.name()
                    && slot.state().old().is_some() == state.old().is_some()
                {
                    "="
                } else {
                    slot.state().name()
                };
                let want = expected[row][col];
                if got != want {
                    wrong.push(format!(
                        "{state_name} × {}: got {got}, expected {want}",
                        event.name()
                    ));
                }
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }
}
