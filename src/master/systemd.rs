//! The master's side of systemd: what it tells systemd (READY, RELOADING, STOPPING, STATUS,
//! WATCHDOG) and what workers tell plumule on its notify socket (READY, STATUS, WATCHDOG).

use std::time::{Duration, Instant};

use nix::unistd::Pid;

use super::Master;
use crate::plan::{Phase, Pool};
use crate::slot::Event;
use crate::sys;

/// What the master tells systemd, and when.
pub(super) struct SystemdLink {
    pub(super) notifier: sys::notify::Notifier,
    pub(super) ready_sent: bool,
    /// A reload is being applied: READY=1 once these programs are settled.
    pub(super) reloading: Option<Vec<crate::plan::PoolId>>,
    pub(super) last_status: String,
    /// Shown instead of the worker summary until the next good reload: why the last reload
    /// was refused.
    pub(super) refusal: Option<String>,
    /// Half of `$WATCHDOG_USEC`, when systemd watches us.
    pub(super) watchdog_every: Option<Duration>,
    pub(super) watchdog_next: Option<Instant>,
}

impl SystemdLink {
    pub(super) fn from_env(now: Instant) -> SystemdLink {
        let notifier = sys::notify::Notifier::from_env();
        let ours = std::env::var("WATCHDOG_PID")
            .ok()
            .and_then(|p| p.parse::<u32>().ok());
        let watchdog_every = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|u| u.parse::<u64>().ok())
            .filter(|&u| {
                u > 0 && ours.is_none_or(|p| p == std::process::id()) && notifier.enabled()
            })
            .map(|u| Duration::from_micros(u / 2));
        SystemdLink {
            notifier,
            ready_sent: false,
            reloading: None,
            last_status: String::new(),
            refusal: None,
            watchdog_every,
            watchdog_next: watchdog_every.map(|w| now + w),
        }
    }
}

impl SystemdLink {
    /// A reload was refused: systemd leaves "reloading" and shows why, until a later reload
    /// is applied (then the summary comes back even when it did not change).
    pub(super) fn refused(&mut self, message: &str) {
        let first: String = message
            .lines()
            .next()
            .unwrap_or_default()
            .chars()
            .take(200)
            .collect();
        self.notifier.send(&format!("READY=1\nSTATUS={first}"));
        self.last_status = first.clone();
        self.refusal = Some(first);
    }
}

impl Master {
    /// READY=1 once every program has settled (first start, then after each reload),
    /// STATUS= when the summary changes, WATCHDOG=1 when due. Returns the next watchdog time.
    pub(super) fn tell_systemd(&mut self, now: Instant) -> Option<Instant> {
        if !self.systemd.notifier.enabled() {
            return None;
        }
        if self.phase == Phase::Running {
            let settled = |pools: &[Pool], keys: Option<&Vec<crate::plan::PoolId>>| {
                pools
                    .iter()
                    .filter(|p| keys.is_none_or(|k| k.contains(&p.key)))
                    .all(|p| crate::plan::settled_for_ready(pools, p))
            };
            if !self.systemd.ready_sent && settled(&self.pools, None) {
                self.systemd.ready_sent = true;
                self.systemd
                    .notifier
                    .send(&format!("READY=1\nSTATUS={}", self.summary()));
                self.systemd.last_status = self.summary();
            }
            if let Some(keys) = &self.systemd.reloading {
                if settled(&self.pools, Some(keys)) {
                    self.systemd.reloading = None;
                    self.systemd.refusal = None;
                    self.systemd.notifier.send("READY=1");
                }
            }
        }
        let status = match &self.systemd.refusal {
            Some(refusal) => refusal.clone(),
            None => self.summary(),
        };
        if status != self.systemd.last_status {
            self.systemd.notifier.send(&format!("STATUS={status}"));
            self.systemd.last_status = status;
        }
        if let (Some(every), Some(next)) = (self.systemd.watchdog_every, self.systemd.watchdog_next)
        {
            if next <= now {
                self.systemd.notifier.send("WATCHDOG=1");
                self.systemd.watchdog_next = Some(now + every);
            }
        }
        self.systemd.watchdog_next
    }

    /// "12/12 workers running, 0 failed", plus what is degraded.
    fn summary(&self) -> String {
        let mut wanted = 0;
        let mut running = 0;
        let mut failed = Vec::new();
        for pool in &self.pools {
            let desired = pool.desired();
            wanted += desired;
            for slot in pool.slots.iter().filter(|s| s.id < desired) {
                match slot.state().current() {
                    crate::slot::SlotState::Running { .. } => running += 1,
                    crate::slot::SlotState::Failed { .. } => {
                        failed.push(format!("{}.{}", pool.program.name, slot.id))
                    }
                    _ => {}
                }
            }
        }
        let mut s = format!(
            "{running}/{wanted} workers running, {} failed",
            failed.len()
        );
        if !failed.is_empty() {
            failed.truncate(5);
            s.push_str(&format!(" ({})", failed.join(", ")));
        }
        if self.phase != Phase::Running {
            s = format!("stopping: {s}");
        }
        s
    }

    /// Messages on plumule's notify socket, from workers (or their children).
    pub(super) fn read_notifications(&mut self, now: Instant) {
        let Some(sock) = &self.notify_socket else {
            return;
        };
        let mut messages = Vec::new();
        while let Some(m) = sock.recv() {
            messages.push(m);
            if messages.len() >= 256 {
                break;
            }
        }
        for (sender, text) in messages {
            self.on_notification(Pid::from_raw(sender), &text, now);
        }
    }

    fn on_notification(&mut self, sender: Pid, text: &str, now: Instant) {
        // A worker's children speak for it too (as with NotifyAccess=all): match the group.
        let pid = if self.procs.contains_key(&sender) {
            sender
        } else {
            match crate::sys::process::process_group(sender) {
                Some(pgid) if self.procs.contains_key(&pgid) => pgid,
                _ => {
                    log::debug!(
                        "notify socket: ignoring a message from pid {sender}, not a worker"
                    );
                    return;
                }
            }
        };
        let Some(key) = self.procs.get(&pid).map(|p| p.key) else {
            return;
        };
        for line in text.lines() {
            match line.split_once('=') {
                Some(("READY", "1")) => {
                    self.slot_event(key, Event::Ready { pid }, now);
                }
                Some(("WATCHDOG", "1")) => {
                    self.slot_event(key, Event::WatchdogPing { pid }, now);
                }
                Some(("STATUS", s)) => {
                    let Some(p) = self.pool_index(key.pool) else {
                        continue;
                    };
                    if let Some(slot) = self.pools[p].slots.get_mut(key.id as usize) {
                        if slot.pid() == Some(pid) {
                            slot.status = Some(s.chars().take(256).collect());
                        }
                    }
                }
                _ => {}
            }
        }
    }
}
