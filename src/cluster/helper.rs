//! The cluster helper: the process the master forks (through [`crate::sys::link`]) to do all
//! of its etcd I/O. It joins the cluster (a lease, kept alive; the member record under it),
//! reports the live members, takes cluster locks for workers, and enforces the lease.
//!
//! # Threads
//!
//! - the *main* thread owns the state: the lease, the waiters, the holders; it renews the
//!   lease every third of it and reads the member list after each renewal;
//! - a *reader* thread turns the master's messages into events for the main thread;
//! - one *waiter* thread per worker waiting for its locks (it blocks in a watch);
//! - the *enforcer* thread sleeps until the lease's kill deadline and SIGKILLs every holder
//!   then, whatever the other threads are blocked on (a connect to a dead endpoint, say).
//!
//! # The guarantee
//!
//! A holder is killed no later than [`Lease::kill_at`] of the last renewal that succeeded,
//! measured on CLOCK_BOOTTIME: before etcd can have let the lease expire, so before any other
//! master can be given the lock. The master must say it is alive ([`ToHelper::Alive`]) every
//! quarter of the lease: a frozen master (SIGSTOP) cannot supervise its holders, so its lease
//! is not renewed and its holders are killed, and the lock goes elsewhere. When the master
//! goes (its end of the link closes, even by SIGKILL) the helper kills the holders and
//! revokes the lease at once, so the next holder does not wait for the lease to run out.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use super::etcd::{Client, EtcdError};
use super::{lock_key, lock_prefix, turn, Lease, Member, Turn, MEMBERS_PREFIX};
use crate::sys::link::Peer;
use crate::sys::process::boottime;

/// From the master to its helper.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToHelper {
    /// The master's loop runs (sent every quarter of the lease).
    Alive,
    /// Take `locks` (sorted) for worker `pid`, whose start time (in clock ticks since boot,
    /// as `/proc/PID/stat` gives it) pins it against pid reuse.
    Acquire {
        pid: u32,
        start_time: u64,
        locks: Vec<String>,
    },
    /// The worker is gone (reaped), or no longer wants its locks: its keys go.
    Release { pid: u32 },
    /// The programs changed (a reload): the member record says so from the next renewal.
    Programs(Vec<String>),
    /// The queues the member record lists changed (a reload).
    Queues(Vec<String>),
}

/// From the helper to the master.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FromHelper {
    /// In the cluster, with this lease.
    Joined { lease: i64 },
    /// Out of the cluster: the lease is lost or cannot be had; holders were killed.
    Lost { reason: String },
    /// The live members, sent when they change.
    Members(Vec<Member>),
    /// Worker `pid` holds its locks, at these revisions (in the order asked).
    Granted { pid: u32, revisions: Vec<i64> },
    /// Worker `pid` was SIGKILLed because the lease may be lost.
    Killed { pid: u32, reason: String },
    /// A line for the master's log (the helper has no stderr of its own).
    Log { warn: bool, text: String },
}

/// What the helper needs to run, copied into it at fork.
#[derive(Debug, Clone)]
pub struct Settings {
    pub etcd: Vec<String>,
    pub lease: Duration,
    pub member: Member,
}

enum Event {
    Master(ToHelper),
    MasterGone,
    Granted {
        pid: u32,
        lease: i64,
        keys: Vec<(String, i64)>,
    },
    Killed {
        pid: u32,
    },
}

/// What the enforcer thread shares with the main thread.
#[derive(Default)]
struct Guard {
    /// When holders must be dead (CLOCK_BOOTTIME); `None` while nothing is held or no lease.
    deadline: Option<Duration>,
    holders: HashMap<u32, OwnedFd>,
    stop: bool,
}

struct Enforcer {
    guard: Mutex<Guard>,
    wake: Condvar,
}

impl Enforcer {
    /// SIGKILLs every holder now; returns their pids.
    fn kill_all(&self) -> Vec<u32> {
        let mut g = self.guard.lock().unwrap_or_else(|e| e.into_inner());
        let pids: Vec<u32> = g.holders.keys().copied().collect();
        for (pid, fd) in g.holders.drain() {
            kill_holder(pid, &fd);
        }
        pids
    }

    fn set_deadline(&self, deadline: Option<Duration>) {
        let mut g = self.guard.lock().unwrap_or_else(|e| e.into_inner());
        g.deadline = deadline;
        self.wake.notify_all();
    }

    /// Adds a holder; false (and it is killed) when the deadline has already passed.
    fn hold(&self, pid: u32, fd: OwnedFd) -> bool {
        let mut g = self.guard.lock().unwrap_or_else(|e| e.into_inner());
        if g.deadline.is_none_or(|d| boottime() >= d) {
            kill_holder(pid, &fd);
            return false;
        }
        g.holders.insert(pid, fd);
        self.wake.notify_all();
        true
    }

    fn forget(&self, pid: u32) {
        let mut g = self.guard.lock().unwrap_or_else(|e| e.into_inner());
        g.holders.remove(&pid);
    }

    /// The enforcer thread: kills the holders when the deadline passes.
    fn run(&self, events: Sender<Event>) {
        let mut g = self.guard.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if g.stop {
                return;
            }
            let now = boottime();
            match g.deadline {
                Some(d) if now >= d && !g.holders.is_empty() => {
                    for (pid, fd) in g.holders.drain() {
                        kill_holder(pid, &fd);
                        let _ = events.send(Event::Killed { pid });
                    }
                }
                Some(d) if !g.holders.is_empty() => {
                    // The condvar's clock may not count a suspend: wake at least every 100 ms
                    // to look at CLOCK_BOOTTIME again.
                    let wait = (d - now).min(Duration::from_millis(100));
                    g = self
                        .wake
                        .wait_timeout(g, wait)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
                _ => g = self.wake.wait(g).unwrap_or_else(|e| e.into_inner()),
            }
        }
    }
}

/// SIGKILLs a holder and its process group, through its pidfd so that a reused pid is never
/// hit; the group only while its leader lives (it pins the group id until the master reaps
/// it, and the master kills what is left of a group when it reaps its leader).
fn kill_holder(pid: u32, fd: &OwnedFd) {
    if crate::sys::process::pidfd_exited(fd.as_raw_fd()) {
        return;
    }
    let _ = crate::sys::process::signal_pidfd(fd.as_raw_fd(), Signal::SIGKILL);
    let _ = crate::sys::process::signal_group(Pid::from_raw(pid as i32), Signal::SIGKILL);
}

/// A pidfd of `pid` if it is still the process that started at `start_time`.
fn pin(pid: u32, start_time: u64) -> Option<OwnedFd> {
    let p = Pid::from_raw(pid as i32);
    let fd = crate::sys::process::pidfd(p).ok()?;
    // Checked after the pidfd is open: from then on the pid cannot be reused under it.
    (start_time == 0 || crate::sys::process::start_time(p) == Some(start_time)).then_some(fd)
}

/// A waiter thread's handle.
struct Waiter {
    cancel: Arc<AtomicBool>,
    req: (u32, u64, Vec<String>),
}

struct Helper {
    settings: Settings,
    lease_math: Lease,
    client: Client,
    peer: Peer<FromHelper, ToHelper>,
    events_tx: Sender<Event>,
    enforcer: Arc<Enforcer>,
    /// The lease and when the last renewal that succeeded was sent.
    lease: Option<(i64, Duration)>,
    /// A lease we lost, to revoke once etcd answers again (its keys then go at once).
    stale: Vec<i64>,
    waiters: HashMap<u32, Waiter>,
    /// Requests waiting for a lease.
    queued: BTreeMap<u32, (u64, Vec<String>)>,
    /// The keys each holder holds.
    held: HashMap<u32, Vec<String>>,
    last_alive: Duration,
    members: Option<Vec<Member>>,
    /// The outage being reported, so that it is logged once.
    outage: Option<String>,
    record_put: bool,
}

/// The helper's body: runs until the master goes. Returns the exit code.
pub fn run(peer: Peer<FromHelper, ToHelper>, settings: Settings) -> i32 {
    // The master's death must not take us at once: its holders are to be killed first.
    let _ = crate::sys::process::keep_after_parent();
    let lease_math = Lease {
        ttl: settings.lease,
    };
    let timeout = lease_math
        .renew_every()
        .clamp(Duration::from_millis(200), Duration::from_secs(5));
    let mut peer = peer;
    let client = match Client::new(&settings.etcd, timeout) {
        Ok(c) => c,
        Err(e) => {
            let _ = peer.send(&FromHelper::Lost {
                reason: e.to_string(),
            });
            // Nothing can be done without an endpoint: wait for the master to go, answering
            // no lock (its workers stay waiting, `status` says why in the log).
            while let Ok(Some(_)) = peer.receive() {}
            return 0;
        }
    };
    let (tx, rx) = crossbeam_channel::unbounded();
    let Ok(mut reader) = peer.try_clone() else {
        return 1;
    };
    let to_main = tx.clone();
    std::thread::spawn(move || loop {
        match reader.receive() {
            Ok(Some(msg)) => {
                if to_main.send(Event::Master(msg)).is_err() {
                    return;
                }
            }
            Ok(None) | Err(_) => {
                let _ = to_main.send(Event::MasterGone);
                return;
            }
        }
    });
    let enforcer = Arc::new(Enforcer {
        guard: Mutex::new(Guard::default()),
        wake: Condvar::new(),
    });
    {
        let e = Arc::clone(&enforcer);
        let tx = tx.clone();
        std::thread::spawn(move || e.run(tx));
    }
    let mut h = Helper {
        settings,
        lease_math,
        client,
        peer,
        events_tx: tx,
        enforcer,
        lease: None,
        stale: Vec::new(),
        waiters: HashMap::new(),
        queued: BTreeMap::new(),
        held: HashMap::new(),
        last_alive: boottime(),
        members: None,
        outage: None,
        record_put: false,
    };
    h.main(rx)
}

impl Helper {
    fn send(&mut self, msg: FromHelper) {
        let _ = self.peer.send(&msg);
    }

    fn log(&mut self, warn: bool, text: String) {
        self.send(FromHelper::Log { warn, text });
    }

    fn main(&mut self, rx: Receiver<Event>) -> i32 {
        let mut next_tick = Duration::ZERO;
        loop {
            let now = boottime();
            if now >= next_tick {
                self.tick();
                next_tick = boottime()
                    + if self.lease.is_some() {
                        self.lease_math.renew_every()
                    } else {
                        // Out of the cluster: try again soon, not in a tight loop.
                        (self.lease_math.renew_every()).min(Duration::from_secs(1))
                    };
            }
            let wait = next_tick.saturating_sub(boottime());
            match rx.recv_timeout(wait) {
                Ok(Event::Master(msg)) => self.on_master(msg),
                Ok(Event::MasterGone) | Err(RecvTimeoutError::Disconnected) => {
                    self.leave();
                    return 0;
                }
                Ok(Event::Granted { pid, lease, keys }) => self.on_granted(pid, lease, keys),
                Ok(Event::Killed { pid }) => {
                    let reason = "its master's cluster lease may have expired".to_string();
                    self.send(FromHelper::Killed {
                        pid,
                        reason: reason.clone(),
                    });
                    // Past the deadline the lease counts as lost, even if etcd answers again
                    // later (a restarted etcd restores leases): it is revoked once etcd
                    // answers, so the keys of the killed holders go with it.
                    if self.lease.is_some() {
                        self.lose(reason);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
        }
    }

    /// The master went: its holders die now, and the lease goes with its keys.
    fn leave(&mut self) {
        self.enforcer.kill_all();
        for w in self.waiters.values() {
            w.cancel.store(true, Ordering::SeqCst);
        }
        if let Some((id, _)) = self.lease.take() {
            let _ = self.client.revoke(id);
        }
        let mut g = self
            .enforcer
            .guard
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        g.stop = true;
        self.enforcer.wake.notify_all();
    }

    fn on_master(&mut self, msg: ToHelper) {
        match msg {
            ToHelper::Alive => self.last_alive = boottime(),
            ToHelper::Programs(programs) => {
                self.settings.member.programs = programs;
                self.record_put = false;
            }
            ToHelper::Queues(queues) => {
                self.settings.member.queues = queues;
                self.record_put = false;
            }
            ToHelper::Acquire {
                pid,
                start_time,
                locks,
            } => {
                self.queued.insert(pid, (start_time, locks));
                self.start_waiters();
            }
            ToHelper::Release { pid } => {
                self.queued.remove(&pid);
                if let Some(w) = self.waiters.remove(&pid) {
                    w.cancel.store(true, Ordering::SeqCst);
                }
                self.enforcer.forget(pid);
                let keys = self.held.remove(&pid).unwrap_or_default();
                // A waiter's keys are deleted by its thread as it gives up; a holder's here.
                for key in keys {
                    if let Err(e) = self.client.delete(&key) {
                        // Its lease will take it; until then the lock stays held.
                        self.log(true, format!("cannot release {key}: {e}"));
                    }
                }
            }
        }
    }

    /// Starts a waiter thread for each queued request, while there is a lease.
    fn start_waiters(&mut self) {
        let Some((lease, _)) = self.lease else {
            return;
        };
        for (pid, (start_time, locks)) in std::mem::take(&mut self.queued) {
            let cancel = Arc::new(AtomicBool::new(false));
            let mut client = self.client.clone();
            let tx = self.events_tx.clone();
            let flag = Arc::clone(&cancel);
            let wanted = locks.clone();
            let poll = self
                .lease_math
                .renew_every()
                .min(Duration::from_millis(500));
            std::thread::spawn(move || {
                if let Some(keys) = take_locks(&mut client, lease, pid, &wanted, poll, &flag) {
                    let _ = tx.send(Event::Granted { pid, lease, keys });
                }
            });
            self.waiters.insert(
                pid,
                Waiter {
                    cancel,
                    req: (pid, start_time, locks),
                },
            );
        }
    }

    fn on_granted(&mut self, pid: u32, lease: i64, keys: Vec<(String, i64)>) {
        let Some(w) = self.waiters.remove(&pid) else {
            // Released meanwhile: let the keys go.
            for (key, _) in keys {
                let _ = self.client.delete(&key);
            }
            return;
        };
        if self.lease.map(|l| l.0) != Some(lease) {
            // Granted under a lease since lost: wait again under the new one.
            self.queued.insert(pid, (w.req.1, w.req.2));
            self.start_waiters();
            return;
        }
        let Some(fd) = pin(pid, w.req.1) else {
            // The worker is gone already; the master's Release follows.
            self.held
                .insert(pid, keys.into_iter().map(|k| k.0).collect());
            return;
        };
        self.held
            .insert(pid, keys.iter().map(|k| k.0.clone()).collect());
        if !self.enforcer.hold(pid, fd) {
            self.send(FromHelper::Killed {
                pid,
                reason: "the cluster lease may have expired".into(),
            });
            return;
        }
        self.send(FromHelper::Granted {
            pid,
            revisions: keys.into_iter().map(|k| k.1).collect(),
        });
    }

    /// Joins, or renews, or notices the lease lost; reads the members.
    fn tick(&mut self) {
        let now = boottime();
        let master_quiet = now.saturating_sub(self.last_alive);
        let frozen = master_quiet > self.settings.lease / 2;
        match self.lease {
            // A frozen master does not join: it could not supervise what it would hold.
            None if frozen => {}
            None => self.join(),
            Some((id, sent)) => {
                if frozen {
                    let why = format!(
                        "the master has not run for {}: not renewing the lease",
                        crate::format_duration(master_quiet)
                    );
                    self.note_outage(why);
                } else {
                    match self.client.keep_alive(id) {
                        Ok(Some(_)) => {
                            self.lease = Some((id, now));
                            self.enforcer
                                .set_deadline(Some(self.lease_math.kill_at(now)));
                            self.recovered();
                            self.refresh_members(id);
                        }
                        Ok(None) => {
                            self.lose(format!("etcd says lease {id:x} has expired"));
                            return;
                        }
                        Err(e) => self.note_outage(format!("cannot renew the lease: {e}")),
                    }
                }
                if boottime() >= self.lease_math.kill_at(sent)
                    && self.lease.map(|l| l.1) == Some(sent)
                {
                    let why = self
                        .outage
                        .clone()
                        .unwrap_or_else(|| "the lease was not renewed in time".into());
                    self.lose(why);
                }
            }
        }
    }

    fn note_outage(&mut self, why: String) {
        if self.outage.is_none() {
            self.log(true, why.clone());
        }
        self.outage = Some(why);
    }

    fn recovered(&mut self) {
        if let Some(why) = self.outage.take() {
            self.log(
                false,
                format!("renewing again ({}); it was: {why}", self.client.describe()),
            );
        }
    }

    /// The lease may be gone: holders die (the enforcer may have done it already), waiters
    /// start again under the next lease.
    fn lose(&mut self, reason: String) {
        let killed = self.enforcer.kill_all();
        self.enforcer.set_deadline(None);
        // Their keys stay in `held` until the master's Release (they also go with the lease).
        for pid in killed {
            self.send(FromHelper::Killed {
                pid,
                reason: reason.clone(),
            });
        }
        for (pid, w) in self.waiters.drain() {
            w.cancel.store(true, Ordering::SeqCst);
            self.queued.insert(pid, (w.req.1, w.req.2));
        }
        if let Some((id, _)) = self.lease.take() {
            self.stale.push(id);
        }
        self.record_put = false;
        self.members = None;
        self.send(FromHelper::Lost { reason });
    }

    fn join(&mut self) {
        let sent = boottime();
        let (id, _ttl) = match self.client.grant(self.settings.lease) {
            Ok(l) => l,
            Err(e) => {
                // Said once per outage: the master logs it and `members` shows it.
                let why = format!("cannot join the cluster: {e}");
                if self.outage.is_none() {
                    self.send(FromHelper::Lost {
                        reason: why.clone(),
                    });
                }
                self.outage = Some(why);
                return;
            }
        };
        self.recovered();
        for old in std::mem::take(&mut self.stale) {
            let _ = self.client.revoke(old);
        }
        self.lease = Some((id, sent));
        self.enforcer
            .set_deadline(Some(self.lease_math.kill_at(sent)));
        self.send(FromHelper::Joined { lease: id });
        self.refresh_members(id);
        self.start_waiters();
    }

    /// Puts the member record if it is not there yet, then reads every member's.
    fn refresh_members(&mut self, lease: i64) {
        if !self.record_put {
            let key = format!("{MEMBERS_PREFIX}{}", self.settings.member.node);
            let value = serde_json::to_vec(&self.settings.member).unwrap_or_default();
            match self.client.create(&key, &value, lease) {
                Ok((true, _)) => self.record_put = true,
                // Ours already: written again, with what changed.
                Ok((false, kv)) if kv.lease == lease => {
                    match self.client.put(&key, &value, lease) {
                        Ok(()) => self.record_put = true,
                        Err(e) => self.log(true, format!("cannot update the member record: {e}")),
                    }
                }
                Ok((false, kv)) => {
                    let other: Option<Member> = serde_json::from_slice(&kv.value).ok();
                    self.log(
                        true,
                        format!(
                            "node name {} is taken by another live master ({}); \
                             trying again at the next renewal",
                            self.settings.member.node,
                            other.map_or("?".into(), |m| format!("{} pid {}", m.host, m.pid))
                        ),
                    );
                }
                Err(e) => self.log(true, format!("cannot write the member record: {e}")),
            }
        }
        match self.client.range_prefix(MEMBERS_PREFIX) {
            Ok((kvs, _)) => {
                let members: Vec<Member> = kvs
                    .iter()
                    .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
                    .collect();
                if self.members.as_ref() != Some(&members) {
                    self.members = Some(members.clone());
                    self.send(FromHelper::Members(members));
                }
            }
            Err(e) => self.log(true, format!("cannot read the members: {e}")),
        }
    }
}

/// Takes each lock of `locks` in turn under `lease` for `pid`: its key, then waiting for the
/// deletion of the key before it until it is the oldest. Returns the keys with their create
/// revisions, or `None` when cancelled (its keys deleted).
pub(crate) fn take_locks(
    client: &mut Client,
    lease: i64,
    pid: u32,
    locks: &[String],
    poll: Duration,
    cancel: &AtomicBool,
) -> Option<Vec<(String, i64)>> {
    let mut got = Vec::new();
    let give_up = || cancel.load(Ordering::SeqCst);
    for name in locks {
        let key = lock_key(name, lease, pid);
        loop {
            if give_up() {
                for (k, _) in got.iter().chain(std::iter::once(&(key.clone(), 0))) {
                    let _ = client.delete(k);
                }
                return None;
            }
            match wait_turn(client, name, &key, lease, poll, &give_up) {
                Ok(Some(rev)) => {
                    got.push((key.clone(), rev));
                    break;
                }
                Ok(None) => continue,
                Err(_) => {
                    // etcd unreachable: the main thread sees it too; try again shortly.
                    sleep_unless(poll, &give_up);
                }
            }
        }
    }
    Some(got)
}

fn sleep_unless(d: Duration, give_up: &dyn Fn() -> bool) {
    let end = boottime() + d;
    while !give_up() && boottime() < end {
        std::thread::sleep(Duration::from_millis(20).min(end.saturating_sub(boottime())));
    }
}

/// One round of the recipe: makes sure our key exists, then holds or waits for the key
/// before ours to go. `Ok(Some(revision))`: held; `Ok(None)`: look again.
pub(crate) fn wait_turn(
    client: &mut Client,
    name: &str,
    key: &str,
    lease: i64,
    poll: Duration,
    give_up: &dyn Fn() -> bool,
) -> Result<Option<i64>, EtcdError> {
    let (_, mine) = client.create(key, b"", lease)?;
    let (kvs, revision) = client.range_prefix(&lock_prefix(name))?;
    let keys: Vec<(String, i64)> = kvs
        .iter()
        .map(|k| (k.key.clone(), k.create_revision))
        .collect();
    match turn(&keys, key) {
        Turn::Holder => Ok(Some(mine.create_revision)),
        Turn::Gone => Ok(None),
        Turn::After { key: before, .. } => {
            // A watch from just after the range we read misses no deletion in between.
            client.wait_deleted(&before, revision, poll, give_up)?;
            Ok(None)
        }
    }
}
