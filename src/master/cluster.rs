//! The master's side of the cluster (SPEC §10): the etcd helper process (see
//! [`crate::cluster::helper`]) it forks, supervises and restarts with backoff, and the
//! workers waiting for cluster locks.
//!
//! A worker with cluster locks is forked at once, like any other; in the child, after its
//! file locks, it reports "waiting for lock N" (so its slot shows `starting`, waiting for
//! lock N) and blocks on its *gate*, a pipe whose write end the master keeps here. The master
//! asks the helper for the locks ([`ToHelper::Acquire`]); when the helper says they are
//! granted, the master writes their revisions into the gate and the child goes on to exec
//! with `PLUMULE_LOCK_REVISION_<NAME>` set. When the worker is reaped, the master tells the
//! helper to release its keys.
//!
//! While a cluster is configured the master has a timer: every quarter of the lease it tells
//! the helper it is alive, so that a frozen master loses its lease (and its holders) instead
//! of holding a lock it cannot supervise. If the helper dies, every holder is SIGKILLed at
//! once (nothing enforces their lease any more) and a new helper takes over the waiters.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::os::fd::{OwnedFd, RawFd};
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::supervisor::Supervisor;
use super::Part;
use crate::cluster::helper::{self, FromHelper, Settings, ToHelper};
use crate::cluster::Member;
use crate::config::{Backoff, Config};
use crate::protocol::{MembersReport, Response};
use crate::slot::Exit;
use crate::sys::link::Link;

/// The helper's restart delays.
const HELPER_BACKOFF: Backoff = Backoff {
    initial: Duration::from_millis(500),
    max: Duration::from_secs(30),
    multiplier: 2.0,
    jitter: 0.1,
};

/// A worker waiting for its cluster locks.
struct Waiting {
    /// The write end of its gate.
    gate: OwnedFd,
    start_time: u64,
    locks: Vec<String>,
}

/// The cluster state of the supervisor's (see the module docs).
pub(super) struct Cluster {
    /// `None`: no `[plumule] cluster`.
    settings: Option<Settings>,
    link: Option<Link<ToHelper, FromHelper>>,
    /// The helper's pid from its spawn until it is reaped (the link may be gone before).
    helper_pid: Option<Pid>,
    /// What the reactor watches of the link: its descriptor, and POLLOUT.
    watched: Option<(RawFd, bool)>,
    /// When to start a helper (none runs).
    start_at: Option<Instant>,
    failures: u32,
    /// When to tell the helper the master is alive.
    alive_at: Option<Instant>,
    waiting: BTreeMap<u32, Waiting>,
    holders: BTreeSet<u32>,
    /// The live members as last read; `None` while out of the cluster.
    members: Option<Vec<Member>>,
    /// Counts the changes of `members` (the Redis queues' partitions follow them).
    generation: u64,
    /// Why we are out of the cluster, for `members`.
    out_because: String,
    /// The config the member record's programs were last compared with: a reload replaces
    /// it (kept, so that its address cannot be reused by the next one).
    config: Option<std::sync::Arc<Config>>,
}

impl Cluster {
    pub(super) fn new(config: &Config) -> Cluster {
        let settings = config.cluster.as_ref().map(|c| Settings {
            etcd: c.etcd.clone(),
            lease: c.lease,
            member: Member {
                node: config.node.clone(),
                host: crate::config::hostname(),
                pid: std::process::id(),
                since: SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
                programs: config.programs.iter().map(|p| p.name.clone()).collect(),
                queues: consumed_queues(config),
            },
        });
        Cluster {
            start_at: settings.as_ref().map(|_| Instant::now()),
            settings,
            link: None,
            helper_pid: None,
            watched: None,
            failures: 0,
            alive_at: None,
            waiting: BTreeMap::new(),
            holders: BTreeSet::new(),
            members: None,
            generation: 0,
            out_because: "joining".into(),
            config: None,
        }
    }

    /// Counts the changes of the member list (see [`Cluster::live_members`]).
    pub(super) fn generation(&self) -> u64 {
        self.generation
    }

    /// The live members as last read; `None` while out of the cluster (or not in one).
    pub(super) fn live_members(&self) -> Option<&[Member]> {
        self.members.as_deref()
    }

    pub(super) fn helper_pid(&self) -> Option<Pid> {
        self.helper_pid
    }

    /// When the loop must run for the cluster without an event.
    pub(super) fn deadline(&self) -> Option<Instant> {
        match (self.start_at, self.alive_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The answer of `members`.
    pub(super) fn members_report(&self) -> Response {
        if self.settings.is_none() {
            return Response::error(
                "this master is not in a cluster: [plumule] cluster is not set",
            );
        }
        match &self.members {
            Some(m) => Response::ok(MembersReport { members: m.clone() }),
            None => Response::error(format!("not in the cluster now: {}", self.out_because)),
        }
    }

    fn send(&mut self, msg: &ToHelper) {
        if let Some(link) = self.link.as_mut() {
            if let Err(e) = link.send(msg) {
                log::warn!("cluster helper: {e}");
                // Closing our end makes it kill its holders and exit; the reap restarts it.
                self.link = None;
            }
        }
    }
}

impl Supervisor {
    /// Starts the helper when due, tells it the master is alive, keeps the link watched.
    pub(super) fn cluster_pass(&mut self, now: Instant) {
        let c = &mut self.cluster;
        let Some(settings) = c.settings.clone() else {
            return;
        };
        if c.start_at.is_some_and(|at| at <= now) && c.helper_pid.is_none() {
            c.start_at = None;
            let body = move |peer| helper::run(peer, settings);
            match Link::spawn(c"plumule-etcd", body) {
                Ok(link) => {
                    log::info!("cluster helper started (pid {})", link.pid());
                    c.helper_pid = Some(link.pid());
                    c.link = Some(link);
                    c.alive_at = Some(now);
                    // What waited under the previous helper waits under this one.
                    let again: Vec<ToHelper> = c
                        .waiting
                        .iter()
                        .map(|(pid, w)| ToHelper::Acquire {
                            pid: *pid,
                            start_time: w.start_time,
                            locks: w.locks.clone(),
                        })
                        .collect();
                    for msg in again {
                        c.send(&msg);
                    }
                }
                Err(e) => {
                    log::error!("cannot start the cluster helper: {e}");
                    c.failures += 1;
                    c.start_at =
                        Some(now + crate::backoff::delay(&HELPER_BACKOFF, c.failures, 0.0));
                }
            }
        }
        // A reload may have changed the programs the member record lists.
        if !c
            .config
            .as_ref()
            .is_some_and(|k| std::sync::Arc::ptr_eq(k, &self.config))
        {
            c.config = Some(std::sync::Arc::clone(&self.config));
            let programs: Vec<String> = self
                .config
                .programs
                .iter()
                .map(|p| p.name.clone())
                .collect();
            let queues = consumed_queues(&self.config);
            if let Some(s) = c.settings.as_mut() {
                if s.member.programs != programs {
                    s.member.programs = programs.clone();
                    c.send(&ToHelper::Programs(programs));
                }
            }
            if let Some(s) = c.settings.as_mut() {
                if s.member.queues != queues {
                    s.member.queues = queues.clone();
                    c.send(&ToHelper::Queues(queues));
                }
            }
        }
        if let (Some(at), Some(lease)) = (c.alive_at, c.settings.as_ref().map(|s| s.lease)) {
            if at <= now && c.link.is_some() {
                c.send(&ToHelper::Alive);
                c.alive_at = Some(now + lease / 4);
            }
        }
        if let Some(link) = c.link.as_mut() {
            if link.wants_write() {
                if let Err(e) = link.flush() {
                    log::warn!("cluster helper: {e}");
                    c.link = None;
                }
            }
        }
        self.watch_cluster();
    }

    fn watch_cluster(&mut self) {
        let c = &mut self.cluster;
        let want = c.link.as_ref().map(|l| (l.fd(), l.wants_write()));
        if want == c.watched {
            return;
        }
        if let Some((fd, _)) = c.watched.take() {
            self.reactor.remove(fd);
        }
        if let Some((fd, write)) = want {
            match self.reactor.add(fd, Part::Cluster.token(0), write) {
                Ok(()) => c.watched = Some((fd, write)),
                Err(e) => log::error!("cannot watch the cluster helper: {e}"),
            }
        }
    }

    /// The helper's socket is ready.
    pub(super) fn cluster_ready(&mut self) {
        let Some(link) = self.cluster.link.as_mut() else {
            return;
        };
        if let Err(e) = link.flush() {
            log::warn!("cluster helper: {e}");
        }
        let msgs = match link.receive() {
            Ok(m) => m,
            Err(e) => {
                log::warn!("cluster helper: {e}");
                self.cluster.link = None;
                self.watch_cluster();
                return;
            }
        };
        for msg in msgs {
            self.on_helper_message(msg);
        }
        self.watch_cluster();
    }

    fn on_helper_message(&mut self, msg: FromHelper) {
        let c = &mut self.cluster;
        match msg {
            FromHelper::Joined { lease } => {
                c.failures = 0;
                log::info!("joined the cluster (lease {lease:x})");
            }
            FromHelper::Lost { reason } => {
                log::warn!("out of the cluster: {reason}");
                c.members = None;
                c.generation += 1;
                c.out_because = reason;
            }
            FromHelper::Members(members) => {
                log::debug!("cluster members: {}", members.len());
                c.members = Some(members);
                c.generation += 1;
            }
            FromHelper::Granted { pid, revisions } => {
                let Some(w) = c.waiting.remove(&pid) else {
                    // Gone meanwhile: its release is on its way.
                    return;
                };
                let mut bytes = Vec::with_capacity(revisions.len() * 8);
                for r in &revisions {
                    bytes.extend_from_slice(&(*r as u64).to_le_bytes());
                }
                // At most 256 bytes into an empty pipe: never blocks, never splits.
                let mut gate = std::fs::File::from(w.gate);
                if let Err(e) = gate.write_all(&bytes) {
                    log::warn!("cannot open the gate of worker {pid}: {e}");
                    c.send(&ToHelper::Release { pid });
                    return;
                }
                c.holders.insert(pid);
                if let Some(tag) = self
                    .procs
                    .get(&Pid::from_raw(pid as i32))
                    .map(|p| p.tag.clone())
                {
                    let what = w
                        .locks
                        .iter()
                        .zip(&revisions)
                        .map(|(l, r)| format!("{l} (revision {r})"))
                        .collect::<Vec<_>>()
                        .join(", ");
                    super::output::event(
                        &mut self.log_ring,
                        log::Level::Info,
                        &tag,
                        format_args!("holds cluster lock {what}"),
                    );
                }
            }
            FromHelper::Killed { pid, reason } => {
                c.holders.remove(&pid);
                if let Some(tag) = self
                    .procs
                    .get(&Pid::from_raw(pid as i32))
                    .map(|p| p.tag.clone())
                {
                    super::output::event(
                        &mut self.log_ring,
                        log::Level::Warn,
                        &tag,
                        format_args!("killed (SIGKILL): it held a cluster lock and {reason}"),
                    );
                }
            }
            FromHelper::Log { warn: true, text } => log::warn!("cluster: {text}"),
            FromHelper::Log { warn: false, text } => log::info!("cluster: {text}"),
        }
    }

    /// A worker with cluster locks was forked: it waits on `gate` for them.
    pub(super) fn cluster_acquire(
        &mut self,
        pid: Pid,
        start_time: u64,
        locks: Vec<String>,
        gate: OwnedFd,
    ) {
        let c = &mut self.cluster;
        let pid = pid.as_raw() as u32;
        if c.settings.is_none() {
            // A reload added cluster locks, and `cluster` with them: that takes a restart.
            log::error!(
                "worker {pid} waits for cluster lock(s) {} but this master is not in a \
                 cluster: [plumule] cluster takes effect when the master restarts",
                locks.join(", ")
            );
        }
        c.send(&ToHelper::Acquire {
            pid,
            start_time,
            locks: locks.clone(),
        });
        c.waiting.insert(
            pid,
            Waiting {
                gate,
                start_time,
                locks,
            },
        );
        self.watch_cluster();
    }

    /// A worker was reaped: whatever it held or waited for is released.
    pub(super) fn cluster_release(&mut self, pid: Pid) {
        let c = &mut self.cluster;
        let raw = pid.as_raw() as u32;
        let waited = c.waiting.remove(&raw).is_some();
        if waited || c.holders.remove(&raw) {
            c.send(&ToHelper::Release { pid: raw });
            self.watch_cluster();
        }
    }

    /// The helper was reaped: its holders are killed (nothing enforces their lease now), and
    /// another helper starts after a backoff.
    pub(super) fn cluster_helper_exited(&mut self, exit: Exit, now: Instant) {
        let c = &mut self.cluster;
        c.helper_pid = None;
        c.link = None;
        c.members = None;
        c.generation += 1;
        c.out_because = format!("the cluster helper ended ({exit})");
        c.failures += 1;
        let delay = crate::backoff::delay(&HELPER_BACKOFF, c.failures, 0.0);
        c.start_at = Some(now + delay);
        c.alive_at = None;
        log::warn!(
            "the cluster helper ended ({exit}); starting another in {}",
            crate::format_duration(delay)
        );
        for pid in std::mem::take(&mut c.holders) {
            log::warn!("killing worker {pid}: it holds a cluster lock and the lease is not kept");
            let _ = crate::sys::process::signal_group(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        self.watch_cluster();
    }

    /// The master stops: closing the link makes the helper kill what still holds (nothing, by
    /// now) and revoke the lease, so that other masters take the locks at once.
    pub(super) fn cluster_finish(&mut self) {
        if let Some((fd, _)) = self.cluster.watched.take() {
            self.reactor.remove(fd);
        }
        self.cluster.link = None;
    }
}

/// The queues this master's programs consume, sorted: what its member record says (only
/// members that consume a partitioned queue take its partitions).
fn consumed_queues(config: &Config) -> Vec<String> {
    let set: BTreeSet<String> = config
        .programs
        .iter()
        .filter_map(|p| p.queue.clone())
        .collect();
    set.into_iter().collect()
}
