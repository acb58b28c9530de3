//! The worker slot: one place in a program's pool (`web.2`), which keeps its identity across
//! restarts, and its state machine. Pure: the clock is passed in, nothing here performs I/O.
//!
//! ```text
//!            spawn                exec (+ READY=1 when ready = "notify")
//!  stopped ─────────► starting ─────────────────────────────► running
//!     ▲                  │  │                                   │
//!     │ stop done        │  └──────── exits ──────┬─────────────┘
//!  stopping ◄── stop ────┘                        ▼
//!                              restart policy? ── no ──► exited
//!                                   │ yes
//!                         start limit hit? ── yes ──► failed
//!                                   │ no
//!                                backoff ── delay over ──► (spawn) starting
//! ```
//!
//! *Where* a slot is ([`SlotState`]) is kept apart from *why* its last process ended ([`Exit`]).

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

#[derive(Debug, Clone, PartialEq)]
pub enum SlotState {
    /// No process, none wanted yet (new slot, stopped by the operator, or after a stop).
    Stopped,
    Starting {
        pid: Pid,
        since: Instant,
        wait: StartWait,
    },
    Running {
        pid: Pid,
        since: Instant,
    },
    Stopping {
        pid: Pid,
        since: Instant,
        kill_at: Instant,
        killed: bool,
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
}

impl SlotState {
    /// The state's name as `status` shows it (SPEC §3).
    pub fn name(&self) -> &'static str {
        match self {
            SlotState::Stopped => "stopped",
            SlotState::Starting { .. } => "starting",
            SlotState::Running { .. } => "running",
            SlotState::Stopping { .. } => "stopping",
            SlotState::Backoff { .. } => "backoff",
            SlotState::Exited { .. } => "exited",
            SlotState::Failed { .. } => "failed",
        }
    }

    /// The live process of this state, if any.
    pub fn pid(&self) -> Option<Pid> {
        match self {
            SlotState::Starting { pid, .. }
            | SlotState::Running { pid, .. }
            | SlotState::Stopping { pid, .. } => Some(*pid),
            _ => None,
        }
    }

    /// When the live process was spawned.
    pub fn since(&self) -> Option<Instant> {
        match self {
            SlotState::Starting { since, .. }
            | SlotState::Running { since, .. }
            | SlotState::Stopping { since, .. } => Some(*since),
            _ => None,
        }
    }
}

/// The previous process of a slot during a rolling restart: it keeps serving until its
/// successor is running, then it is stopped. `status` shows it as `stopping`.
#[derive(Debug, Clone, PartialEq)]
pub struct Retiring {
    pub pid: Pid,
    pub since: Instant,
    /// Set once the stop signal was sent.
    pub kill_at: Option<Instant>,
    pub killed: bool,
}

/// One worker place of a program.
#[derive(Debug, Clone)]
pub struct Slot {
    pub id: u32,
    pub state: SlotState,
    /// The pool's config generation the current process was spawned with.
    pub generation: u64,
    /// The process being replaced by a rolling restart.
    pub retiring: Option<Retiring>,
    /// False once the operator stopped this worker; `start` sets it again.
    pub enabled: bool,
    /// Restarts since the master started (operator restarts excluded).
    pub restarts: u32,
    /// Consecutive runs shorter than `healthy_after`.
    pub crashes: u32,
    /// Spawn times inside the `start_limit` window.
    starts: VecDeque<Instant>,
    pub last_exit: Option<Exit>,
    /// The stop in progress is a restart: spawn again once it is over.
    pub restart_after_stop: bool,
    /// Why the current process could not start, as its child reported before dying.
    pub start_error: Option<String>,
    /// The worker's last `STATUS=` line.
    pub status: Option<String>,
    /// When the worker's next `WATCHDOG=1` is due (`watchdog` set and running).
    pub watchdog_at: Option<Instant>,
    /// Why plumule is stopping this worker, when the stop is a failure of the worker's.
    pub stop_reason: Option<StopReason>,
}

/// A stop that counts as a crash of the worker: it is restarted per its policy afterwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// Not ready within `ready_timeout`: counts as a quick crash.
    ReadyTimeout,
    /// Missed its `WATCHDOG=1`.
    Watchdog,
}

/// What happened to a slot, fed to [`Slot::transition`].
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Spawned {
        pid: Pid,
    },
    WaitingForLock {
        name: String,
    },
    Exec,
    Ready,
    /// `WATCHDOG=1` from the worker.
    WatchdogPing,
    /// Begin a stop: the stop signal was sent, SIGKILL is due at `kill_at`.
    Stop {
        kill_at: Instant,
    },
    Killed,
    Exited {
        exit: Exit,
        jitter: f64,
    },
    /// Cannot be started at all (command missing, bad cwd, …).
    Fail {
        reason: String,
    },
    /// The operator's `start`: clear `failed`/`exited` and the start limit.
    Enable,
    /// The operator's `stop`.
    Disable,
    /// Drop a pending backoff (the slot is no longer wanted).
    CancelBackoff,
}

impl Slot {
    pub fn new(id: u32) -> Self {
        Slot {
            id,
            state: SlotState::Stopped,
            generation: 0,
            retiring: None,
            enabled: true,
            restarts: 0,
            crashes: 0,
            starts: VecDeque::new(),
            last_exit: None,
            restart_after_stop: false,
            start_error: None,
            status: None,
            watchdog_at: None,
            stop_reason: None,
        }
    }

    pub fn pid(&self) -> Option<Pid> {
        self.state.pid()
    }

    /// Whether the slot has a process (alive or not yet reaped), its retiring one included.
    pub fn is_live(&self) -> bool {
        self.state.pid().is_some() || self.retiring.is_some()
    }

    /// One line of why, for `status`: lock waited for, restart delay, failure reason.
    pub fn detail(&self, now: Instant) -> Option<String> {
        match &self.state {
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
            SlotState::Stopping { .. } => match self.stop_reason {
                Some(StopReason::ReadyTimeout) => Some("not ready within ready_timeout".into()),
                Some(StopReason::Watchdog) => Some("missed its watchdog".into()),
                None => None,
            },
            SlotState::Failed { reason } => Some(reason.clone()),
            _ => None,
        }
    }

    /// Applies `event` at `now` under `program`'s settings. Events that make no sense in the
    /// current state (a late message from a process that is gone) are ignored.
    pub fn transition(&mut self, event: Event, program: &Program, now: Instant) {
        let before = self.state.name();
        let next = self.next_state(event, program, now);
        if let Some(next) = next {
            if next.name() != before {
                log::debug!(
                    "{}.{}: {} -> {}",
                    program.name,
                    self.id,
                    before,
                    next.name()
                );
            }
            self.state = next;
        }
    }

    fn next_state(&mut self, event: Event, program: &Program, now: Instant) -> Option<SlotState> {
        use SlotState as S;
        match (event, &self.state) {
            (Event::Spawned { pid }, S::Stopped | S::Backoff { .. }) => {
                self.starts.push_back(now);
                self.start_error = None;
                self.status = None;
                Some(S::Starting {
                    pid,
                    since: now,
                    wait: StartWait::Exec,
                })
            }
            (Event::WaitingForLock { name }, S::Starting { pid, since, .. }) => Some(S::Starting {
                pid: *pid,
                since: *since,
                wait: StartWait::Lock(name),
            }),
            (Event::Exec, S::Starting { pid, since, .. }) => Some(match program.ready {
                ReadyMode::Started => {
                    self.watchdog_at = program.watchdog.map(|w| now + w);
                    S::Running {
                        pid: *pid,
                        since: *since,
                    }
                }
                ReadyMode::Notify => S::Starting {
                    pid: *pid,
                    since: *since,
                    wait: StartWait::Ready,
                },
            }),
            (
                Event::Ready,
                S::Starting {
                    pid,
                    since,
                    wait: StartWait::Ready,
                },
            ) => {
                self.watchdog_at = program.watchdog.map(|w| now + w);
                Some(S::Running {
                    pid: *pid,
                    since: *since,
                })
            }
            (Event::WatchdogPing, S::Running { .. }) => {
                self.watchdog_at = program.watchdog.map(|w| now + w);
                None
            }
            (
                Event::Stop { kill_at },
                S::Starting { pid, since, .. } | S::Running { pid, since },
            ) => Some(S::Stopping {
                pid: *pid,
                since: *since,
                kill_at,
                killed: false,
            }),
            (
                Event::Killed,
                S::Stopping {
                    pid,
                    since,
                    kill_at,
                    ..
                },
            ) => Some(S::Stopping {
                pid: *pid,
                since: *since,
                kill_at: *kill_at,
                killed: true,
            }),
            (Event::Exited { exit, jitter }, S::Stopping { since, .. }) => {
                self.last_exit = Some(exit);
                self.watchdog_at = None;
                if let Some(reason) = self.stop_reason.take() {
                    let ran = match reason {
                        StopReason::ReadyTimeout => Duration::ZERO,
                        StopReason::Watchdog => now.saturating_duration_since(*since),
                    };
                    return Some(self.after_exit(exit, ran, jitter, program, now));
                }
                if std::mem::take(&mut self.restart_after_stop) && self.enabled {
                    Some(S::Backoff { until: now })
                } else {
                    Some(S::Stopped)
                }
            }
            (
                Event::Exited { exit, jitter },
                S::Starting { since, .. } | S::Running { since, .. },
            ) => {
                self.last_exit = Some(exit);
                self.watchdog_at = None;
                let ran = now.saturating_duration_since(*since);
                Some(self.after_exit(exit, ran, jitter, program, now))
            }
            (Event::Fail { reason }, _) => {
                self.start_error = None;
                Some(S::Failed { reason })
            }
            (Event::Enable, state) => {
                self.enabled = true;
                self.starts.clear();
                self.crashes = 0;
                match state {
                    S::Failed { .. } | S::Exited { .. } | S::Backoff { .. } => Some(S::Stopped),
                    _ => None,
                }
            }
            (Event::Disable, state) => {
                self.enabled = false;
                self.restart_after_stop = false;
                match state {
                    S::Backoff { .. } => Some(S::Stopped),
                    _ => None,
                }
            }
            (Event::CancelBackoff, S::Backoff { .. }) => Some(S::Stopped),
            _ => None,
        }
    }

    /// Where an unrequested exit leads: restart (after a delay), `exited` or `failed`.
    fn after_exit(
        &mut self,
        exit: Exit,
        ran: Duration,
        jitter: f64,
        program: &Program,
        now: Instant,
    ) -> SlotState {
        if let Some(reason) = self.start_error.take() {
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
        slot.transition(Event::Exec, p, t);
        assert_eq!(slot.state.name(), "running");
        let end = t + ran;
        slot.transition(Event::Exited { exit, jitter: 0.0 }, p, end);
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
            let SlotState::Backoff { until } = slot.state else {
                panic!("{:?}", slot.state)
            };
            delays.push(until - end);
            t = until;
        }
        assert_eq!(delays, vec![ms(100), ms(200), ms(400), ms(800), ms(1000)]);
        let end = run_once(&mut slot, &p, t, ms(5000), Exit::Code(1));
        assert_eq!(
            slot.state,
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
            assert_eq!(slot.state.name(), expected, "{policy:?} {codes:?} {exit:?}");
            assert_eq!(slot.last_exit, Some(exit));
        }
    }

    #[test]
    fn requested_stop_ends_stopped_or_restarts_when_asked() {
        let p = program();
        let t = Instant::now();
        let mut slot = Slot::new(0);
        slot.transition(Event::Spawned { pid: pid(7) }, &p, t);
        slot.transition(Event::Exec, &p, t);
        slot.transition(
            Event::Stop {
                kill_at: t + ms(10),
            },
            &p,
            t,
        );
        assert!(matches!(
            slot.state,
            SlotState::Stopping { killed: false, .. }
        ));
        slot.transition(Event::Killed, &p, t + ms(10));
        assert!(matches!(
            slot.state,
            SlotState::Stopping { killed: true, .. }
        ));
        let exit = Exit::Signal(Signal::SIGKILL);
        slot.transition(Event::Exited { exit, jitter: 0.0 }, &p, t + ms(11));
        assert_eq!(slot.state, SlotState::Stopped);
        assert_eq!(slot.restarts, 0, "a requested stop is not a restart");

        slot.transition(Event::Spawned { pid: pid(8) }, &p, t);
        slot.restart_after_stop = true;
        slot.transition(Event::Stop { kill_at: t }, &p, t);
        slot.transition(Event::Exited { exit, jitter: 0.0 }, &p, t + ms(1));
        assert_eq!(slot.state, SlotState::Backoff { until: t + ms(1) });
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
            names.push(slot.state.name());
        }
        assert_eq!(names, vec!["backoff", "backoff", "failed"]);
        let SlotState::Failed { reason } = &slot.state else {
            unreachable!()
        };
        assert!(
            reason.contains("start limit hit: 3 starts within 1m"),
            "{reason}"
        );

        // `start` clears it, and starts older than the window no longer count.
        slot.transition(Event::Enable, &p, t);
        assert_eq!(slot.state, SlotState::Stopped);
        let t = run_once(&mut slot, &p, t, ms(1), Exit::Code(1));
        assert_eq!(slot.state.name(), "backoff");
        let later = t + Duration::from_secs(61);
        run_once(&mut slot, &p, later, ms(1), Exit::Code(1));
        run_once(&mut slot, &p, later + ms(5), ms(1), Exit::Code(1));
        assert_eq!(slot.state.name(), "backoff");
    }

    #[test]
    fn a_reported_start_error_fails_instead_of_restarting() {
        let p = program();
        let t = Instant::now();
        let mut slot = Slot::new(0);
        slot.transition(Event::Spawned { pid: pid(9) }, &p, t);
        slot.start_error = Some("cannot change directory to /nope: No such file".into());
        slot.transition(
            Event::Exited {
                exit: Exit::Code(127),
                jitter: 0.0,
            },
            &p,
            t,
        );
        assert_eq!(slot.state.name(), "failed");
        assert!(slot.detail(t).unwrap().contains("/nope"));
    }

    #[test]
    fn lock_wait_and_readiness_show_in_detail() {
        let mut p = program();
        p.ready = ReadyMode::Notify;
        let t = Instant::now();
        let mut slot = Slot::new(0);
        slot.transition(Event::Spawned { pid: pid(9) }, &p, t);
        slot.transition(Event::WaitingForLock { name: "db".into() }, &p, t);
        assert_eq!(slot.detail(t).as_deref(), Some("waiting for lock db"));
        slot.transition(Event::Exec, &p, t);
        assert_eq!(slot.state.name(), "starting");
        assert_eq!(slot.detail(t).as_deref(), Some("waiting for READY=1"));
        slot.transition(Event::Ready, &p, t);
        assert_eq!(slot.state.name(), "running");
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
        slot.transition(Event::Exec, &p, t);
        slot.stop_reason = Some(StopReason::ReadyTimeout);
        slot.transition(
            Event::Stop {
                kill_at: t + ms(100),
            },
            &p,
            t + ms(50),
        );
        assert_eq!(
            slot.detail(t).as_deref(),
            Some("not ready within ready_timeout")
        );
        slot.transition(
            Event::Exited {
                exit: Exit::Signal(Signal::SIGTERM),
                jitter: 0.0,
            },
            &p,
            t + ms(60),
        );
        assert_eq!(
            slot.state,
            SlotState::Backoff { until: t + ms(160) },
            "quick crash: initial delay"
        );
        assert_eq!(slot.crashes, 1);

        let t = t + ms(200);
        slot.transition(Event::Spawned { pid: pid(4) }, &p, t);
        slot.transition(Event::Exec, &p, t);
        assert_eq!(slot.watchdog_at, None, "the watchdog starts at READY=1");
        slot.transition(Event::Ready, &p, t);
        assert_eq!(slot.watchdog_at, Some(t + ms(500)));
        slot.transition(Event::WatchdogPing, &p, t + ms(400));
        assert_eq!(slot.watchdog_at, Some(t + ms(900)));
        slot.stop_reason = Some(StopReason::Watchdog);
        slot.transition(
            Event::Stop {
                kill_at: t + ms(2000),
            },
            &p,
            t + ms(900),
        );
        slot.transition(
            Event::Exited {
                exit: Exit::Signal(Signal::SIGABRT),
                jitter: 0.0,
            },
            &p,
            t + ms(901),
        );
        assert_eq!(
            slot.state,
            SlotState::Backoff { until: t + ms(901) },
            "healthy run: at once"
        );
        assert_eq!(slot.watchdog_at, None);
    }

    #[test]
    fn late_events_are_ignored() {
        let p = program();
        let t = Instant::now();
        let mut slot = Slot::new(0);
        slot.transition(Event::Exec, &p, t);
        slot.transition(Event::Ready, &p, t);
        slot.transition(
            Event::Exited {
                exit: Exit::Code(0),
                jitter: 0.0,
            },
            &p,
            t,
        );
        assert_eq!(slot.state, SlotState::Stopped);
    }

    #[test]
    fn disabled_slot_does_not_restart() {
        let p = program();
        let t = Instant::now();
        let mut slot = Slot::new(0);
        slot.transition(Event::Disable, &p, t);
        run_once(&mut slot, &p, t, ms(5), Exit::Code(1));
        assert_eq!(slot.state.name(), "exited");
    }
}
