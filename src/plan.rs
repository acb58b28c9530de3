//! Planning: what should run, compared with what runs, gives the actions that close the gap.
//!
//! [`plan`] is a pure function of the pools and the clock. It never touches a process: the
//! master carries out the [`Action`]s it returns and sleeps until the earliest of the
//! [`Plan::timers`]. Work follows what changed: a pool looks only at the slots marked dirty
//! since the last plan (an event, an expired timer), unless something about the whole pool
//! changed (its count, its config, a rolling restart, shutdown).
//! Invariant kept by the master and relied on here: `pool.slots[i].id == i`.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use crate::config::{Program, ReloadMode};
use crate::slot::{Slot, SlotState, StartWait};

/// A pool's identity for the master's whole life: a program that is removed and added back
/// while its old workers still drain is a new pool, never confused with the draining one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PoolId(pub u64);

/// One worker's identity: its pool and its slot. Every message about a worker (exec report,
/// notification, exit, output, control request) is routed by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WorkerKey {
    pub pool: PoolId,
    pub id: u32,
}

/// What changed in a pool since it was last planned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dirty {
    Clean,
    /// These slots had an event or a timer.
    Slots(BTreeSet<u32>),
    /// The pool as a whole: new, scaled, reconfigured, or an `after` dependency moved.
    All,
}

/// A program's settings and its worker slots.
#[derive(Debug, Clone)]
pub struct Pool {
    pub key: PoolId,
    pub program: Arc<Program>,
    /// The operator's `scale`, kept until the file's `workers` changes.
    pub scale: Option<u32>,
    /// The program left the config: its workers drain, then the pool is dropped.
    pub removed: bool,
    /// Bumped when a reload changes a key that needs a new process.
    pub generation: u64,
    pub slots: Vec<Slot>,
    pub dirty: Dirty,
    /// Set when `generation` moves; cleared once no slot runs an older one. Saves walking
    /// every slot on every plan to find out that no rolling restart is under way.
    pub roll_pending: bool,
}

impl Pool {
    pub fn new(key: PoolId, program: Arc<Program>) -> Self {
        Pool {
            key,
            program,
            scale: None,
            removed: false,
            generation: 0,
            slots: Vec::new(),
            dirty: Dirty::All,
            roll_pending: false,
        }
    }

    /// `web.2`, for logs.
    pub fn tag(&self, id: u32) -> Tag<'_> {
        Tag(&self.program.name, id)
    }

    /// Marks one slot as changed.
    pub fn touch(&mut self, id: u32) {
        match &mut self.dirty {
            Dirty::Clean => self.dirty = Dirty::Slots(BTreeSet::from([id])),
            Dirty::Slots(ids) => {
                ids.insert(id);
            }
            Dirty::All => {}
        }
    }

    /// Marks the whole pool as changed.
    pub fn touch_all(&mut self) {
        self.dirty = Dirty::All;
    }

    /// How many workers should run.
    pub fn desired(&self) -> u32 {
        if self.removed {
            0
        } else {
            self.scale.unwrap_or(self.program.workers)
        }
    }

    /// Whether every wanted worker is running and ready: what `after` waits for.
    pub fn ready(&self) -> bool {
        let desired = self.desired();
        self.slots.len() >= desired as usize
            && self
                .slots
                .iter()
                .filter(|s| s.id < desired && s.enabled)
                .all(|s| matches!(s.state(), SlotState::Running { .. }))
    }

    pub fn live(&self) -> usize {
        self.slots.iter().filter(|s| s.is_live()).count()
    }

    /// Whether a successor may start beside the old process: not when they would contend
    /// for an exclusive lock (the successor could never take it), then the old one stops first.
    pub fn rolls_side_by_side(&self) -> bool {
        self.program.locks.iter().all(|l| l.shared)
    }

    /// Whether a rolling restart is under way: some wanted slot runs an older generation.
    pub fn rolling(&self) -> bool {
        self.program.reload != ReloadMode::None
            && self
                .slots
                .iter()
                .any(|s| s.generation != self.generation || s.state().old().is_some())
    }

    /// Whether the pool is as it should be: every wanted worker running (or given up on:
    /// failed, exited, or crashing in backoff), nothing beyond the count, no rolling restart
    /// under way. Control commands answer once their pools are settled.
    pub fn settled(&self) -> bool {
        let desired = self.desired();
        if self.slots.len() < desired as usize {
            return false;
        }
        let rolling = self.program.reload != ReloadMode::None;
        self.slots.iter().all(|s| {
            if s.state().old().is_some() {
                return false;
            }
            if s.id >= desired || !s.enabled {
                return !s.is_live();
            }
            match s.state() {
                SlotState::Running { .. } => !rolling || s.generation == self.generation,
                SlotState::Failed { .. } | SlotState::Exited { .. } => true,
                SlotState::Backoff { .. } => s.crashes > 0,
                SlotState::Stopped
                | SlotState::Starting { .. }
                | SlotState::Stopping { .. }
                | SlotState::Rolling { .. } => false,
            }
        })
    }
}

/// `PROGRAM.ID`, the name of a worker in logs and `status`.
pub struct Tag<'a>(&'a str, u32);

impl fmt::Display for Tag<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.0, self.1)
    }
}

/// One step the master must carry out, on slot `id` of the pool at index `pool` of the slice
/// that was planned (valid until the master drops a pool, after the plan is carried out).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Fork a worker (creating the slot when `id` is past the end).
    Spawn { pool: usize, id: u32 },
    /// Send the stop signal to the worker's process group; SIGKILL follows at the deadline.
    Stop { pool: usize, id: u32 },
    /// SIGKILL the worker's process group.
    Kill { pool: usize, id: u32 },
    /// The slot waits to restart but is no longer wanted.
    CancelBackoff { pool: usize, id: u32 },
    /// Drop the last slot of the pool: it is dead and beyond the desired count.
    Forget { pool: usize, id: u32 },
    /// Rolling restart: start a successor beside the running process, which retires.
    Roll { pool: usize, id: u32 },
    /// Rolling restart where both would contend for a lock: stop, then start again.
    Restart { pool: usize, id: u32 },
    /// The successor is up: send the stop signal to the old process.
    Retire { pool: usize, id: u32 },
    /// SIGKILL the old process's group.
    KillOld { pool: usize, id: u32 },
    /// Not ready within `ready_timeout`: stop it; the start counts as a quick crash.
    ReadyTimeout { pool: usize, id: u32 },
    /// No `WATCHDOG=1` in time: SIGABRT, then SIGKILL after `stop_timeout`.
    WatchdogMiss { pool: usize, id: u32 },
}

#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    pub actions: Vec<Action>,
    /// Deadlines still ahead (a backoff, a kill) of the slots that were looked at: the master
    /// wakes at the earliest of these and of those it kept from earlier plans.
    pub timers: Vec<(usize, u32, Instant)>,
}

impl Plan {
    fn wake(&mut self, pool: usize, id: u32, at: Instant) {
        self.timers.push((pool, id, at));
    }

    /// The earliest timer of this plan.
    pub fn wake_at(&self) -> Option<Instant> {
        self.timers.iter().map(|t| t.2).min()
    }
}

/// The master's phase, as far as planning cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Running,
    /// Graceful stop: everything stops; past the deadline everything left is killed.
    ShuttingDown {
        deadline: Instant,
    },
}

/// The first program named in `pool`'s `after` that is not ready yet.
pub fn waiting_for<'a>(pools: &'a [Pool], pool: &'a Pool) -> Option<&'a str> {
    pool.program.after.iter().map(String::as_str).find(|dep| {
        pools
            .iter()
            .any(|p| p.program.name == *dep && !p.removed && !p.ready())
    })
}

/// Whether `pool` has settled for READY=1: settled itself, or held back by an `after`
/// dependency that has settled without becoming ready (it failed), so that one broken
/// program cannot hold the service in "activating".
pub fn settled_for_ready(pools: &[Pool], pool: &Pool) -> bool {
    pool.settled()
        || waiting_for(pools, pool).is_some_and(|dep| {
            pools
                .iter()
                .filter(|p| p.program.name == dep)
                .all(|p| p.settled() || settled_for_ready(pools, p))
        })
}

/// Whether a program that starts after `pool` still has processes: then `pool` must wait
/// before stopping.
fn dependents_live(pools: &[Pool], pool: &Pool) -> bool {
    pools
        .iter()
        .any(|p| p.program.after.contains(&pool.program.name) && p.live() > 0)
}

/// One worker at a time: while a slot of the pool is mid-roll, nothing else starts rolling.
fn plan_roll(plan: &mut Plan, p: usize, pool: &Pool, desired: u32) {
    let mid_roll = pool.slots.iter().any(|s| {
        let fresh = s.generation == pool.generation;
        s.state().old().is_some()
            || matches!(
                s.state(),
                SlotState::Stopping {
                    then: crate::slot::AfterStop::Restart,
                    ..
                }
            )
            || (fresh && matches!(s.state(), SlotState::Starting { .. }))
            || (fresh && matches!(s.state(), SlotState::Backoff { .. }) && s.crashes == 0)
    });
    if mid_roll {
        return;
    }
    let stale = pool.slots.iter().find(|s| {
        s.id < desired
            && s.enabled
            && s.generation != pool.generation
            && matches!(
                s.state(),
                SlotState::Running { .. } | SlotState::Starting { .. }
            )
    });
    if let Some(s) = stale {
        let side_by_side =
            pool.rolls_side_by_side() && matches!(s.state(), SlotState::Running { .. });
        plan.actions.push(if side_by_side {
            Action::Roll { pool: p, id: s.id }
        } else {
            Action::Restart { pool: p, id: s.id }
        });
    }
}

/// What one slot needs, given whether it is wanted and may start.
struct SlotView<'a> {
    program: &'a Program,
    wanted: bool,
    may_start: bool,
    shutting_down: bool,
}

fn plan_slot(plan: &mut Plan, p: usize, slot: &Slot, v: &SlotView<'_>, now: Instant) {
    let (pool, id) = (p, slot.id);
    let SlotView {
        program,
        wanted,
        may_start,
        shutting_down,
    } = *v;
    if let Some(old) = slot.state().old() {
        match old.kill_at {
            None => {
                let successor_done = !matches!(
                    slot.state().current(),
                    SlotState::Starting { .. } | SlotState::Backoff { .. }
                );
                if successor_done || shutting_down {
                    plan.actions.push(Action::Retire { pool, id });
                }
            }
            Some(t) if !old.killed && t <= now => plan.actions.push(Action::KillOld { pool, id }),
            Some(t) if !old.killed => plan.wake(pool, id, t),
            Some(_) => {}
        }
    }
    match slot.state().current() {
        SlotState::Stopped | SlotState::Backoff { .. } if wanted && shutting_down => {}
        SlotState::Stopped if wanted && !may_start => {}
        SlotState::Stopped if wanted => plan.actions.push(Action::Spawn { pool, id }),
        SlotState::Backoff { .. } if !wanted => {
            plan.actions.push(Action::CancelBackoff { pool, id })
        }
        SlotState::Backoff { until } if *until <= now && may_start => {
            plan.actions.push(Action::Spawn { pool, id })
        }
        SlotState::Backoff { until } if *until <= now => {}
        SlotState::Backoff { until } => plan.wake(pool, id, *until),
        SlotState::Starting { .. } | SlotState::Running { .. } if !wanted => {
            plan.actions.push(Action::Stop { pool, id })
        }
        SlotState::Starting {
            since,
            wait: StartWait::Ready,
            ..
        } => {
            let due = *since + program.ready_timeout;
            if due <= now {
                plan.actions.push(Action::ReadyTimeout { pool, id });
            } else {
                plan.wake(pool, id, due);
            }
        }
        SlotState::Running {
            watchdog_at: Some(due),
            ..
        } => {
            if *due <= now {
                plan.actions.push(Action::WatchdogMiss { pool, id });
            } else {
                plan.wake(pool, id, *due);
            }
        }
        SlotState::Stopping {
            kill_at,
            killed: false,
            ..
        } => {
            if *kill_at <= now {
                plan.actions.push(Action::Kill { pool, id });
            } else {
                plan.wake(pool, id, *kill_at);
            }
        }
        SlotState::Stopped
        | SlotState::Starting { .. }
        | SlotState::Running { .. }
        | SlotState::Stopping { .. }
        | SlotState::Exited { .. }
        | SlotState::Failed { .. }
        | SlotState::Rolling { .. } => {}
    }
}

/// Compares the pools with what they should be at `now` and lists the actions to take. Looks
/// only at what is marked dirty (see [`Dirty`]); during a graceful stop, at everything.
pub fn plan(pools: &[Pool], phase: Phase, now: Instant) -> Plan {
    let mut plan = Plan::default();
    let shutting_down = phase != Phase::Running;
    for (p, pool) in pools.iter().enumerate() {
        let whole = shutting_down || pool.dirty == Dirty::All;
        if !whole && pool.dirty == Dirty::Clean {
            continue;
        }
        let desired = match phase {
            Phase::Running => pool.desired(),
            // Reverse `after` order: a program stops once those that start after it are gone.
            Phase::ShuttingDown { .. } if dependents_live(pools, pool) => {
                pool.desired().max(pool.slots.len() as u32)
            }
            Phase::ShuttingDown { .. } => 0,
        };
        // `after`: nothing of this program is forked before its dependencies are ready.
        let may_start = waiting_for(pools, pool).is_none();
        let view = |slot: &Slot| SlotView {
            program: &pool.program,
            wanted: slot.id < desired && (slot.enabled || shutting_down),
            may_start,
            shutting_down,
        };
        match &pool.dirty {
            Dirty::Slots(ids) if !whole => {
                for &id in ids {
                    if let Some(slot) = pool.slots.get(id as usize) {
                        plan_slot(&mut plan, p, slot, &view(slot), now);
                    }
                }
            }
            Dirty::Slots(_) | Dirty::All | Dirty::Clean => {
                for slot in &pool.slots {
                    plan_slot(&mut plan, p, slot, &view(slot), now);
                }
            }
        }
        if phase == Phase::Running && pool.roll_pending && pool.rolling() {
            plan_roll(&mut plan, p, pool, desired);
        }
        // Trailing dead slots beyond the desired count go; the highest ids first.
        if phase == Phase::Running {
            for slot in pool.slots.iter().rev() {
                if slot.id < desired || slot.is_live() {
                    break;
                }
                if !matches!(slot.state(), SlotState::Backoff { .. }) {
                    plan.actions.push(Action::Forget {
                        pool: p,
                        id: slot.id,
                    });
                }
            }
            if may_start {
                for id in pool.slots.len() as u32..desired {
                    plan.actions.push(Action::Spawn { pool: p, id });
                }
            }
        }
    }
    if let Phase::ShuttingDown { deadline } = phase {
        if deadline <= now {
            for (p, pool) in pools.iter().enumerate() {
                for slot in &pool.slots {
                    let id = slot.id;
                    if slot.pid().is_some()
                        && !matches!(
                            slot.state().current(),
                            SlotState::Stopping { killed: true, .. }
                        )
                        && !plan.actions.contains(&Action::Kill { pool: p, id })
                    {
                        plan.actions.push(Action::Kill { pool: p, id });
                    }
                    if slot.state().old().is_some_and(|o| !o.killed)
                        && !plan.actions.contains(&Action::KillOld { pool: p, id })
                    {
                        plan.actions.push(Action::KillOld { pool: p, id });
                    }
                }
            }
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slot::{Event, Exit};
    use crate::test_support::program;
    use nix::unistd::Pid;
    use std::time::Duration;
    use Action::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn pool(workers: u32) -> Pool {
        Pool::new(PoolId(0), Arc::new(program("web", workers)))
    }

    /// A pool whose slots are in the given states.
    fn with_states(workers: u32, states: Vec<SlotState>) -> Pool {
        let mut p = pool(workers);
        for (i, state) in states.into_iter().enumerate() {
            p.slots.push(Slot::with_state(i as u32, state));
        }
        p
    }

    fn running(pid: i32, since: Instant) -> SlotState {
        SlotState::Running {
            pid: Pid::from_raw(pid),
            since,
            watchdog_at: None,
        }
    }

    #[test]
    fn a_new_pool_spawns_every_worker() {
        let now = Instant::now();
        let plan = plan(&[pool(3)], Phase::Running, now);
        assert_eq!(
            plan.actions,
            vec![
                Spawn { pool: 0, id: 0 },
                Spawn { pool: 0, id: 1 },
                Spawn { pool: 0, id: 2 }
            ]
        );
        assert_eq!(plan.wake_at(), None, "nothing to wait for: no timer");
    }

    #[test]
    fn table_of_states_against_actions() {
        let now = Instant::now();
        let later = now + ms(50);
        let earlier = now - ms(50);
        let stopping = |kill_at, killed| SlotState::Stopping {
            pid: Pid::from_raw(5),
            since: earlier,
            kill_at,
            killed,
            then: crate::slot::AfterStop::Rest,
        };
        // (workers, slot state, expected actions, expected wake)
        let table: Vec<(u32, SlotState, Vec<Action>, Option<Instant>)> = vec![
            (1, SlotState::Stopped, vec![Spawn { pool: 0, id: 0 }], None),
            (1, running(5, earlier), vec![], None),
            (1, SlotState::Backoff { until: later }, vec![], Some(later)),
            (
                1,
                SlotState::Backoff { until: earlier },
                vec![Spawn { pool: 0, id: 0 }],
                None,
            ),
            (
                1,
                SlotState::Backoff { until: now },
                vec![Spawn { pool: 0, id: 0 }],
                None,
            ),
            (1, stopping(later, false), vec![], Some(later)),
            (
                1,
                stopping(earlier, false),
                vec![Kill { pool: 0, id: 0 }],
                None,
            ),
            (1, stopping(earlier, true), vec![], None),
            (
                1,
                SlotState::Exited {
                    exit: Exit::Code(0),
                },
                vec![],
                None,
            ),
            (1, SlotState::Failed { reason: "x".into() }, vec![], None),
            (0, running(5, earlier), vec![Stop { pool: 0, id: 0 }], None),
            (
                0,
                SlotState::Backoff { until: later },
                vec![CancelBackoff { pool: 0, id: 0 }],
                None,
            ),
            (0, SlotState::Stopped, vec![Forget { pool: 0, id: 0 }], None),
            (
                0,
                SlotState::Failed { reason: "x".into() },
                vec![Forget { pool: 0, id: 0 }],
                None,
            ),
        ];
        for (workers, state, actions, wake) in table {
            let p = with_states(workers, vec![state.clone()]);
            let got = plan(&[p], Phase::Running, now);
            assert_eq!(got.actions, actions, "workers={workers} state={state:?}");
            assert_eq!(got.wake_at(), wake, "workers={workers} state={state:?}");
        }
    }

    #[test]
    fn scaling_down_stops_the_highest_ids_and_keeps_the_rest() {
        let now = Instant::now();
        let mut p = with_states(4, (0..4).map(|i| running(100 + i, now)).collect());
        p.scale = Some(2);
        let got = plan(&[p], Phase::Running, now);
        assert_eq!(
            got.actions,
            vec![Stop { pool: 0, id: 2 }, Stop { pool: 0, id: 3 }]
        );
    }

    #[test]
    fn scaling_up_adds_slots_after_the_last() {
        let now = Instant::now();
        let mut p = with_states(2, vec![running(1, now), running(2, now)]);
        p.scale = Some(4);
        let got = plan(&[p], Phase::Running, now);
        assert_eq!(
            got.actions,
            vec![Spawn { pool: 0, id: 2 }, Spawn { pool: 0, id: 3 }]
        );
    }

    #[test]
    fn a_disabled_slot_is_stopped_and_not_respawned() {
        let now = Instant::now();
        let mut p = with_states(2, vec![running(1, now), SlotState::Stopped]);
        p.slots[0].enabled = false;
        p.slots[1].enabled = false;
        let got = plan(&[p], Phase::Running, now);
        assert_eq!(got.actions, vec![Stop { pool: 0, id: 0 }]);
    }

    #[test]
    fn a_removed_pool_drains() {
        let now = Instant::now();
        let mut p = with_states(2, vec![running(1, now), SlotState::Stopped]);
        p.removed = true;
        let got = plan(&[p], Phase::Running, now);
        assert_eq!(
            got.actions,
            vec![Stop { pool: 0, id: 0 }, Forget { pool: 0, id: 1 }]
        );
    }

    #[test]
    fn shutdown_stops_everything_then_kills_at_the_deadline() {
        let now = Instant::now();
        let deadline = now + ms(100);
        let p = with_states(
            3,
            vec![
                running(1, now),
                SlotState::Backoff {
                    until: now + ms(10),
                },
                SlotState::Stopped,
            ],
        );
        let got = plan(
            std::slice::from_ref(&p),
            Phase::ShuttingDown { deadline },
            now,
        );
        assert_eq!(
            got.actions,
            vec![Stop { pool: 0, id: 0 }, CancelBackoff { pool: 0, id: 1 }]
        );
        assert_eq!(got.wake_at(), None, "the shutdown deadline is the master's");

        let mut p = p;
        let far = now + Duration::from_secs(10);
        p.slots[0] = Slot::with_state(
            0,
            SlotState::Stopping {
                pid: Pid::from_raw(1),
                since: now,
                kill_at: far,
                killed: false,
                then: crate::slot::AfterStop::Rest,
            },
        );
        p.slots[1] = Slot::with_state(1, SlotState::Stopped);
        let got = plan(&[p], Phase::ShuttingDown { deadline }, deadline);
        assert_eq!(got.actions, vec![Kill { pool: 0, id: 0 }]);
    }

    #[test]
    fn after_holds_spawns_until_dependencies_run_and_stops_in_reverse() {
        let now = Instant::now();
        let db = with_states(
            1,
            vec![SlotState::Starting {
                pid: Pid::from_raw(1),
                since: now,
                wait: crate::slot::StartWait::Ready,
                error: None,
            }],
        );
        let mut web = Pool::new(
            PoolId(1),
            Arc::new({
                let mut p = program("web", 1);
                p.after = vec!["web-db".into()];
                p
            }),
        );
        web.slots.push(Slot::new(0));
        let mut db = db;
        db.program = Arc::new(program("web-db", 1));
        let fresh = Pool::new(PoolId(2), Arc::clone(&web.program));
        let pools = vec![db.clone(), fresh];
        let got = plan(&pools, Phase::Running, now);
        assert!(
            got.actions.is_empty(),
            "a new pool waits too: {:?}",
            got.actions
        );
        let pools = vec![db.clone(), web.clone()];
        assert_eq!(waiting_for(&pools, &pools[1]), Some("web-db"));
        let got = plan(&pools, Phase::Running, now);
        assert!(
            !got.actions.contains(&Spawn { pool: 1, id: 0 }),
            "{:?}",
            got.actions
        );

        db.slots[0] = Slot::with_state(0, running(1, now));
        let pools = vec![db.clone(), web.clone()];
        assert_eq!(waiting_for(&pools, &pools[1]), None);
        assert_eq!(
            plan(&pools, Phase::Running, now).actions,
            vec![Spawn { pool: 1, id: 0 }]
        );

        // Shutting down: web stops first; db waits until web is gone.
        web.slots[0] = Slot::with_state(0, running(2, now));
        let pools = vec![db.clone(), web.clone()];
        let deadline = now + Duration::from_secs(10);
        let got = plan(&pools, Phase::ShuttingDown { deadline }, now);
        assert_eq!(got.actions, vec![Stop { pool: 1, id: 0 }]);
        web.slots[0] = Slot::with_state(0, SlotState::Stopped);
        let pools = vec![db, web];
        let got = plan(&pools, Phase::ShuttingDown { deadline }, now);
        assert_eq!(got.actions, vec![Stop { pool: 0, id: 0 }]);
    }

    #[test]
    fn ready_timeout_and_watchdog_deadlines() {
        let now = Instant::now();
        let mut p = with_states(
            1,
            vec![SlotState::Starting {
                pid: Pid::from_raw(1),
                since: now,
                wait: crate::slot::StartWait::Ready,
                error: None,
            }],
        );
        let timeout = p.program.ready_timeout;
        assert_eq!(
            plan(&[p.clone()], Phase::Running, now).wake_at(),
            Some(now + timeout)
        );
        assert_eq!(
            plan(&[p.clone()], Phase::Running, now + timeout).actions,
            vec![ReadyTimeout { pool: 0, id: 0 }]
        );
        p.slots[0] = Slot::with_state(
            0,
            SlotState::Running {
                pid: Pid::from_raw(1),
                since: now,
                watchdog_at: Some(now + ms(300)),
            },
        );
        assert_eq!(
            plan(&[p.clone()], Phase::Running, now).wake_at(),
            Some(now + ms(300))
        );
        assert_eq!(
            plan(&[p], Phase::Running, now + ms(300)).actions,
            vec![WatchdogMiss { pool: 0, id: 0 }]
        );
    }

    #[test]
    fn a_crash_then_backoff_then_respawn_cycle() {
        let prog = program("web", 1);
        let mut p = pool(1);
        let t0 = Instant::now();
        assert_eq!(
            plan(&[p.clone()], Phase::Running, t0).actions,
            vec![Spawn { pool: 0, id: 0 }]
        );
        p.slots.push(Slot::new(0));
        p.slots[0].transition(
            Event::Spawned {
                pid: Pid::from_raw(9),
            },
            &prog,
            t0,
        );
        p.slots[0].transition(
            Event::Exec {
                pid: Pid::from_raw(9),
            },
            &prog,
            t0,
        );
        p.slots[0].transition(
            Event::Exited {
                pid: Pid::from_raw(9),
                exit: Exit::Code(1),
                jitter: 0.0,
            },
            &prog,
            t0 + ms(5),
        );
        let got = plan(&[p.clone()], Phase::Running, t0 + ms(5));
        assert_eq!(got.actions, vec![]);
        assert_eq!(got.wake_at(), Some(t0 + ms(105)));
        let got = plan(&[p], Phase::Running, t0 + ms(105));
        assert_eq!(got.actions, vec![Spawn { pool: 0, id: 0 }]);
    }
}
