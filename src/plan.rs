//! Planning: what should run, compared with what runs, gives the actions that close the gap.
//!
//! [`plan`] is a pure function of the pools and the clock. It never touches a process: the
//! master carries out the [`Action`]s it returns and sleeps until [`Plan::wake_at`].
//! Invariant kept by the master and relied on here: `pool.slots[i].id == i`.

use std::sync::Arc;
use std::time::Instant;

use crate::config::Program;
use crate::slot::{Slot, SlotState};

/// A program's settings and its worker slots.
#[derive(Debug, Clone)]
pub struct Pool {
    pub program: Arc<Program>,
    /// The operator's `scale`, kept until the file's `workers` changes.
    pub scale: Option<u32>,
    /// The program left the config: its workers drain, then the pool is dropped.
    pub removed: bool,
    pub slots: Vec<Slot>,
}

impl Pool {
    pub fn new(program: Arc<Program>) -> Self {
        Pool { program, scale: None, removed: false, slots: Vec::new() }
    }

    /// How many workers should run.
    pub fn desired(&self) -> u32 {
        if self.removed {
            0
        } else {
            self.scale.unwrap_or(self.program.workers)
        }
    }

    pub fn live(&self) -> usize {
        self.slots.iter().filter(|s| s.is_live()).count()
    }
}

/// One step the master must carry out, on slot `id` of pool `pool`.
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
}

#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    pub actions: Vec<Action>,
    /// The earliest deadline still ahead (a backoff, a kill): the poll timeout.
    pub wake_at: Option<Instant>,
}

impl Plan {
    fn wake(&mut self, at: Instant) {
        self.wake_at = Some(self.wake_at.map_or(at, |w| w.min(at)));
    }
}

/// The master's phase, as far as planning cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Running,
    /// Graceful stop: everything stops; past the deadline everything left is killed.
    ShuttingDown { deadline: Instant },
}

/// Compares the pools with what they should be at `now` and lists the actions to take.
pub fn plan(pools: &[Pool], phase: Phase, now: Instant) -> Plan {
    let mut plan = Plan::default();
    for (p, pool) in pools.iter().enumerate() {
        let desired = match phase {
            Phase::Running => pool.desired(),
            Phase::ShuttingDown { .. } => 0,
        };
        for slot in &pool.slots {
            let wanted = slot.id < desired && slot.enabled;
            let (pool, id) = (p, slot.id);
            match &slot.state {
                SlotState::Stopped if wanted => plan.actions.push(Action::Spawn { pool, id }),
                SlotState::Backoff { .. } if !wanted => {
                    plan.actions.push(Action::CancelBackoff { pool, id })
                }
                SlotState::Backoff { until } if *until <= now => {
                    plan.actions.push(Action::Spawn { pool, id })
                }
                SlotState::Backoff { until } => plan.wake(*until),
                SlotState::Starting { .. } | SlotState::Running { .. } if !wanted => {
                    plan.actions.push(Action::Stop { pool, id })
                }
                SlotState::Stopping { kill_at, killed: false, .. } => {
                    if *kill_at <= now {
                        plan.actions.push(Action::Kill { pool, id });
                    } else {
                        plan.wake(*kill_at);
                    }
                }
                _ => {}
            }
        }
        // Trailing dead slots beyond the desired count go; the highest ids first.
        if phase == Phase::Running {
            for slot in pool.slots.iter().rev() {
                if slot.id < desired || slot.is_live() {
                    break;
                }
                if !matches!(slot.state, SlotState::Backoff { .. }) {
                    plan.actions.push(Action::Forget { pool: p, id: slot.id });
                }
            }
            for id in pool.slots.len() as u32..desired {
                plan.actions.push(Action::Spawn { pool: p, id });
            }
        }
    }
    if let Phase::ShuttingDown { deadline } = phase {
        if deadline <= now {
            for (p, pool) in pools.iter().enumerate() {
                for slot in &pool.slots {
                    let killed = matches!(slot.state, SlotState::Stopping { killed: true, .. });
                    if slot.is_live() && !killed && !plan.actions.contains(&Action::Kill { pool: p, id: slot.id }) {
                        plan.actions.push(Action::Kill { pool: p, id: slot.id });
                    }
                }
            }
        } else if pools.iter().any(|p| p.live() > 0) {
            plan.wake(deadline);
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
        Pool::new(Arc::new(program("web", workers)))
    }

    /// A pool whose slots are in the given states.
    fn with_states(workers: u32, states: Vec<SlotState>) -> Pool {
        let mut p = pool(workers);
        for (i, state) in states.into_iter().enumerate() {
            let mut slot = Slot::new(i as u32);
            slot.state = state;
            p.slots.push(slot);
        }
        p
    }

    fn running(pid: i32, since: Instant) -> SlotState {
        SlotState::Running { pid: Pid::from_raw(pid), since }
    }

    #[test]
    fn a_new_pool_spawns_every_worker() {
        let now = Instant::now();
        let plan = plan(&[pool(3)], Phase::Running, now);
        assert_eq!(
            plan.actions,
            vec![Spawn { pool: 0, id: 0 }, Spawn { pool: 0, id: 1 }, Spawn { pool: 0, id: 2 }]
        );
        assert_eq!(plan.wake_at, None, "nothing to wait for: no timer");
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
        };
        // (workers, slot state, expected actions, expected wake)
        let table: Vec<(u32, SlotState, Vec<Action>, Option<Instant>)> = vec![
            (1, SlotState::Stopped, vec![Spawn { pool: 0, id: 0 }], None),
            (1, running(5, earlier), vec![], None),
            (1, SlotState::Backoff { until: later }, vec![], Some(later)),
            (1, SlotState::Backoff { until: earlier }, vec![Spawn { pool: 0, id: 0 }], None),
            (1, SlotState::Backoff { until: now }, vec![Spawn { pool: 0, id: 0 }], None),
            (1, stopping(later, false), vec![], Some(later)),
            (1, stopping(earlier, false), vec![Kill { pool: 0, id: 0 }], None),
            (1, stopping(earlier, true), vec![], None),
            (1, SlotState::Exited { exit: Exit::Code(0) }, vec![], None),
            (1, SlotState::Failed { reason: "x".into() }, vec![], None),
            (0, running(5, earlier), vec![Stop { pool: 0, id: 0 }], None),
            (0, SlotState::Backoff { until: later }, vec![CancelBackoff { pool: 0, id: 0 }], None),
            (0, SlotState::Stopped, vec![Forget { pool: 0, id: 0 }], None),
            (0, SlotState::Failed { reason: "x".into() }, vec![Forget { pool: 0, id: 0 }], None),
        ];
        for (workers, state, actions, wake) in table {
            let p = with_states(workers, vec![state.clone()]);
            let got = plan(&[p], Phase::Running, now);
            assert_eq!(got.actions, actions, "workers={workers} state={state:?}");
            assert_eq!(got.wake_at, wake, "workers={workers} state={state:?}");
        }
    }

    #[test]
    fn scaling_down_stops_the_highest_ids_and_keeps_the_rest() {
        let now = Instant::now();
        let mut p = with_states(4, (0..4).map(|i| running(100 + i, now)).collect());
        p.scale = Some(2);
        let got = plan(&[p], Phase::Running, now);
        assert_eq!(got.actions, vec![Stop { pool: 0, id: 2 }, Stop { pool: 0, id: 3 }]);
    }

    #[test]
    fn scaling_up_adds_slots_after_the_last() {
        let now = Instant::now();
        let mut p = with_states(2, vec![running(1, now), running(2, now)]);
        p.scale = Some(4);
        let got = plan(&[p], Phase::Running, now);
        assert_eq!(got.actions, vec![Spawn { pool: 0, id: 2 }, Spawn { pool: 0, id: 3 }]);
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
        assert_eq!(got.actions, vec![Stop { pool: 0, id: 0 }]);
    }

    #[test]
    fn shutdown_stops_everything_then_kills_at_the_deadline() {
        let now = Instant::now();
        let deadline = now + ms(100);
        let p = with_states(
            3,
            vec![running(1, now), SlotState::Backoff { until: now + ms(10) }, SlotState::Stopped],
        );
        let got = plan(&[p.clone()], Phase::ShuttingDown { deadline }, now);
        assert_eq!(got.actions, vec![Stop { pool: 0, id: 0 }, CancelBackoff { pool: 0, id: 1 }]);
        assert_eq!(got.wake_at, Some(deadline));

        let mut p = p;
        let far = now + Duration::from_secs(10);
        p.slots[0].state = SlotState::Stopping { pid: Pid::from_raw(1), since: now, kill_at: far, killed: false };
        let got = plan(&[p], Phase::ShuttingDown { deadline }, deadline);
        assert_eq!(got.actions, vec![Kill { pool: 0, id: 0 }]);
    }

    #[test]
    fn a_crash_then_backoff_then_respawn_cycle() {
        let prog = program("web", 1);
        let mut p = pool(1);
        let t0 = Instant::now();
        assert_eq!(plan(&[p.clone()], Phase::Running, t0).actions, vec![Spawn { pool: 0, id: 0 }]);
        p.slots.push(Slot::new(0));
        p.slots[0].transition(Event::Spawned { pid: Pid::from_raw(9) }, &prog, t0);
        p.slots[0].transition(Event::Exec, &prog, t0);
        p.slots[0].transition(Event::Exited { exit: Exit::Code(1), jitter: 0.0 }, &prog, t0 + ms(5));
        let got = plan(&[p.clone()], Phase::Running, t0 + ms(5));
        assert_eq!(got.actions, vec![]);
        assert_eq!(got.wake_at, Some(t0 + ms(105)));
        let got = plan(&[p], Phase::Running, t0 + ms(105));
        assert_eq!(got.actions, vec![Spawn { pool: 0, id: 0 }]);
    }
}
