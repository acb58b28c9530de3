//! The master's side of a queue kept in Redis (`backend = "redis://…"`, SPEC §10): the same
//! [`QueueState`](crate::queue::state::QueueState) as a local queue, in memory, fed from the
//! stream by the queue's helper process ([`crate::queue::redis`]).
//!
//! What this part keeps, and why:
//! - `held`: every entry fetched and not yet recorded as answered (job id → stream entry id),
//!   named to the helper every `claim_after / 4` so that no other master takes them while
//!   this one lives, and used to ignore an entry fetched twice (after a helper restart, the
//!   helper reads this consumer's pending entries again);
//! - `unconfirmed`: the answer batches sent and not yet recorded, in order: a new helper gets
//!   them again, so a helper crash or a Redis outage loses no answer;
//! - the `submit` batches waiting for their ids (`tickets`: a batch has local ticket numbers
//!   at once, for the clients that wait on it, and its cluster-wide ids once Redis gave them);
//! - the helper itself: spawned, watched, and after it ends restarted with backoff;
//! - of a partitioned queue (`route = "key"` with `[plumule] cluster`), the partitions this
//!   master owns, computed from the cluster's member list each time it changes
//!   ([`crate::cluster::partition`]) and told to the helper, which reads only those.
//!
//! Jobs fetched and not delivered to a worker are given back to Redis ([`Op::Back`]: the
//! entry acknowledged and added again, in one script) when no worker of this master takes
//! jobs any more (their credit withdrawn too), and, of a partitioned queue, when their
//! partition moved to another master: they do not wait here for workers that may not come
//! back, nor run on a node their key left.
//!
//! The helper is polled through `Part::Queues` (token [`TOKEN_REMOTE`] with its pid); the
//! only timers are the next hold (while something is held) and a restart due.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use log::Level;
use nix::unistd::Pid;

use super::{ended, token, QueueRt, SubmitError};
use crate::cluster::partition;
use crate::config::Queue;
use crate::master::commands::WaitKind;
use crate::master::output::event;
use crate::master::supervisor::Supervisor;
use crate::protocol::{self, JobOutcome, QueueCounts, Response};
use crate::queue::redis::helper::{self, Setup};
use crate::queue::redis::{redact, Bytes, FromHelper, Op, Query, Reply, ToHelper};
use crate::queue::state::{Job, JobEvent};
use crate::slot::Exit;
use crate::sys::link::{Link, LinkError};

/// A `Part::Queues` token naming a Redis helper's socket (with the helper's pid).
pub(super) const TOKEN_REMOTE: u64 = 3;

/// Restarts of a helper that keeps dying wait this long at first, doubling up to the max.
const RESTART_FIRST: Duration = Duration::from_millis(100);
const RESTART_MAX: Duration = Duration::from_secs(10);
/// A helper that ran this long starts its next backoff from the beginning.
const HEALTHY: Duration = Duration::from_secs(10);
/// Query replies kept for their waiters (the newest).
const REPLIES_KEPT: u64 = 256;
/// Ended `submit` batches remembered for their waiters (answered in the pass they end).
const BATCHES_KEPT: usize = 4096;

/// Where a `submit` batch stands.
#[derive(Debug, Clone)]
enum Batch {
    Waiting { end: u64, watched: bool },
    Stored { first_id: u64 },
    Failed(String),
}

pub(super) struct Remote {
    setup: Setup,
    /// The URL as shown (no password).
    shown: String,
    link: Option<Link<ToHelper, FromHelper>>,
    /// A link lost, kept open until the reactor no longer watches its socket.
    closing: Option<Link<ToHelper, FromHelper>>,
    /// The helper's pid until it is reaped.
    pid: Option<Pid>,
    /// What the reactor watches: (fd, for writing too).
    watch: Option<(RawFd, bool)>,
    restart_at: Option<Instant>,
    failures: u32,
    started: Instant,
    held: HashMap<u64, String>,
    /// Held jobs with an attempts count in Redis (to forget once they are done).
    retried: HashSet<u64>,
    granted: u64,
    next_ticket: u64,
    /// By first ticket; the oldest ended ones beyond [`BATCHES_KEPT`] are forgotten.
    batches: BTreeMap<u64, Batch>,
    /// The helper follows the results stream (something submitted here is watched).
    watching: bool,
    /// Watched jobs by id: their ticket.
    watch_ids: HashMap<u64, u64>,
    /// Watched batches by first ticket: (end ticket, first job id), until their outcomes
    /// are all taken.
    ids: BTreeMap<u64, (u64, u64)>,
    unconfirmed: VecDeque<(u64, Vec<Op>)>,
    next_seq: u64,
    /// Answers of this pass, sent at its end as one batch.
    ops: Vec<Op>,
    hold_at: Option<Instant>,
    next_token: u64,
    replies: HashMap<u64, Reply>,
    asked: Vec<u64>,
    /// The cluster membership generation the owned partitions were computed from.
    members_seen: Option<u64>,
    /// The partitions owned changed: jobs of the others not delivered yet go back.
    moved: bool,
}

impl Remote {
    /// The Redis side of `q`, if it has a backend.
    /// `clustered`: `[plumule] cluster` is set (a key-routed queue is then partitioned).
    pub(super) fn for_queue(q: &Queue, node: &str, clustered: bool) -> Option<Remote> {
        let url = q.backend.clone()?;
        let partitioned = clustered && q.route == crate::config::Route::Key;
        Some(Remote {
            shown: redact(&url),
            setup: Setup {
                queue: q.name.clone(),
                url,
                node: node.to_string(),
                claim_after: q.claim_after,
                max_attempts: q.max_attempts,
                results_from: None,
                partitions: partitioned.then_some(q.partitions),
                owned: Vec::new(),
            },
            link: None,
            closing: None,
            pid: None,
            watch: None,
            restart_at: Some(Instant::now()),
            failures: 0,
            started: Instant::now(),
            held: HashMap::new(),
            retried: HashSet::new(),
            granted: 0,
            next_ticket: 1,
            batches: BTreeMap::new(),
            watching: false,
            watch_ids: HashMap::new(),
            ids: BTreeMap::new(),
            unconfirmed: VecDeque::new(),
            next_seq: 1,
            ops: Vec::new(),
            hold_at: None,
            next_token: 1,
            replies: HashMap::new(),
            asked: Vec::new(),
            members_seen: None,
            moved: false,
        })
    }

    /// New settings from a reload (the URL, node, and a partitioned queue's partitions stay
    /// until the master restarts): a helper started with other `claim_after` or `max_attempts` is replaced (it loses
    /// nothing: what it did not record is handed to the next one).
    pub(super) fn reconfigure(&mut self, q: &Queue) {
        if self.setup.partitions.is_some()
            && (q.route != crate::config::Route::Key || Some(q.partitions) != self.setup.partitions)
        {
            log::warn!(
                "queue {}: a change of `route` or `partitions` of a Redis queue takes effect \
                 when the master restarts",
                self.setup.queue
            );
        }
        if (self.setup.claim_after, self.setup.max_attempts) == (q.claim_after, q.max_attempts) {
            return;
        }
        self.setup.claim_after = q.claim_after;
        self.setup.max_attempts = q.max_attempts;
        if self.link.is_some() {
            self.lost("its settings changed (reload)", true);
        }
    }

    fn send(&mut self, msg: &ToHelper) -> bool {
        let Some(link) = self.link.as_mut() else {
            return false;
        };
        match link.send(msg) {
            Ok(()) => true,
            Err(e) => {
                self.lost(&e.to_string(), true);
                false
            }
        }
    }

    /// The link is gone (the helper died, or said something that makes no sense): what
    /// waited on it fails; with `kill`, the helper (not reaped yet) is killed if it still
    /// runs; it is restarted once reaped. The socket stays open until the reactor has let
    /// it go (`watch_remotes`): closed before, its number could be another's by then.
    fn lost(&mut self, why: &str, kill: bool) {
        let Some(link) = self.link.take() else {
            return;
        };
        log::warn!(
            "queue {}: the Redis helper's link ended: {why}",
            self.setup.queue
        );
        if kill {
            let _ = nix::sys::signal::kill(link.pid(), nix::sys::signal::Signal::SIGKILL);
        }
        self.closing = Some(link);
        for b in self.batches.values_mut() {
            if matches!(b, Batch::Waiting { .. }) {
                *b = Batch::Failed(
                    "the Redis helper ended before it answered: the batch may or may not have \
                     been added"
                        .into(),
                );
            }
        }
        for t in self.asked.drain(..) {
            self.replies.insert(
                t,
                Reply::Error("the Redis helper ended before it answered".into()),
            );
        }
        self.granted = 0;
    }

    /// When this queue's Redis side needs the loop: a hold due, a restart due.
    pub(super) fn deadline(&self) -> Option<Instant> {
        [self.hold_at, self.restart_at.filter(|_| self.pid.is_none())]
            .into_iter()
            .flatten()
            .min()
    }

    fn hold_every(&self) -> Duration {
        (self.setup.claim_after / 4).max(Duration::from_millis(10))
    }

    fn take_reply(&self, token: u64) -> Option<&Reply> {
        self.replies.get(&token)
    }
}

impl QueueRt {
    /// `submit` on a Redis queue: the batch goes to the helper; its tickets wait for the
    /// ids Redis gives.
    pub(super) fn remote_submit(
        &mut self,
        key: Option<&[u8]>,
        jobs: Vec<Vec<u8>>,
        watched: bool,
    ) -> Result<(u64, u64), SubmitError> {
        let name = self.config.name.clone();
        let max_pending = self.config.max_pending;
        let r = self.remote.as_mut().expect("a Redis queue");
        if r.link.is_none() {
            return Err(SubmitError::Store {
                queue: name,
                why: format!("{}: the Redis helper is not running (restarting)", r.shown),
            });
        }
        let count = jobs.len() as u64;
        let first = r.next_ticket;
        if watched && !r.watching {
            // Before the submit: the helper starts reading outcomes from the newest one now.
            if !r.send(&ToHelper::Watch(true)) {
                return Err(SubmitError::Store {
                    queue: name,
                    why: format!("{}: the Redis helper is not running", r.shown),
                });
            }
            r.watching = true;
        }
        let msg = ToHelper::Submit {
            ticket: first,
            key: key.map(|k| Bytes(k.to_vec())),
            watched,
            max_pending,
            jobs: jobs.into_iter().map(Bytes).collect(),
        };
        if !r.send(&msg) {
            return Err(SubmitError::Store {
                queue: name,
                why: format!("{}: the Redis helper is not running", r.shown),
            });
        }
        r.next_ticket += count;
        r.batches.insert(
            first,
            Batch::Waiting {
                end: first + count,
                watched,
            },
        );
        while r.batches.len() > BATCHES_KEPT
            && r.batches
                .first_key_value()
                .is_some_and(|(_, b)| !matches!(b, Batch::Waiting { .. }))
        {
            r.batches.pop_first();
        }
        if watched {
            self.watched.open(first, first + count);
        }
        Ok((first, first + count))
    }

    /// Where a Redis batch stands (see [`QueueRt::batch`]).
    pub(super) fn remote_batch(&self, first: u64) -> Option<Result<(), String>> {
        let r = self.remote.as_ref()?;
        match r.batches.get(&first) {
            None => Some(Err("the batch was forgotten".into())),
            Some(Batch::Waiting { .. }) => None,
            Some(Batch::Stored { .. }) => Some(Ok(())),
            Some(Batch::Failed(why)) => Some(Err(why.clone())),
        }
    }

    /// The job id of a watched job's ticket (a local queue's ids are its tickets).
    pub(super) fn job_id(&self, ticket: u64) -> u64 {
        let Some(r) = self.remote.as_ref() else {
            return ticket;
        };
        match r.ids.range(..=ticket).next_back() {
            Some((&first, &(end, first_id))) if ticket < end => first_id + (ticket - first),
            _ => ticket,
        }
    }

    /// The id the client is told for the batch whose first ticket is `first` (its first
    /// job's id in Redis); a local queue's ids are its own.
    pub(crate) fn first_id(&self, first: u64) -> u64 {
        match self.remote.as_ref().and_then(|r| r.batches.get(&first)) {
            Some(Batch::Stored { first_id }) => *first_id,
            _ => first,
        }
    }

    /// The changes of a Redis queue's jobs become answers for the helper (and counts).
    pub(super) fn remote_events(&mut self) {
        let events: Vec<JobEvent> = self.state.events().collect();
        let r = self.remote.as_mut().expect("a Redis queue");
        for ev in events {
            self.counters.count(&ev);
            match ev {
                JobEvent::Done {
                    id,
                    result,
                    watched,
                    ..
                } => {
                    if let Some(entry) = r.held.get(&id) {
                        r.ops.push(Op::Ok {
                            entry: entry.clone(),
                            id,
                            watched,
                            retried: r.retried.remove(&id),
                            result: Bytes(result),
                        });
                    }
                }
                JobEvent::Dead {
                    id,
                    attempts,
                    reason,
                    watched,
                    ..
                } => {
                    // The dead letters of a Redis queue live in Redis.
                    self.state.forget_dead(id);
                    r.retried.remove(&id);
                    if let Some(entry) = r.held.get(&id) {
                        r.ops.push(Op::Dead {
                            entry: entry.clone(),
                            id,
                            attempts,
                            reason: Bytes(reason),
                            watched,
                        });
                    }
                }
                JobEvent::Attempt { id, attempts, .. } => {
                    r.retried.insert(id);
                    r.ops.push(Op::Attempt { id, attempts });
                }
                JobEvent::Requeued { .. } | JobEvent::TimedOut { .. } => {}
            }
        }
    }

    /// What the helper said.
    fn on_helper(&mut self, msg: FromHelper) {
        let r = self.remote.as_mut().expect("a Redis queue");
        match msg {
            FromHelper::Jobs(list) => {
                r.granted = r.granted.saturating_sub(list.len() as u64);
                let mut jobs = Vec::with_capacity(list.len());
                for f in list {
                    // Fetched twice (a new helper reads this consumer's pending entries
                    // again): the job is here already. The same job in another entry was
                    // given back and read again: a new delivery.
                    if r.held.get(&f.id) == Some(&f.entry) {
                        continue;
                    }
                    // Read by a read begun before its partition moved away: given back at
                    // once, for its owner.
                    let theirs = r.setup.partitions.is_some()
                        && crate::queue::redis::split_entry(&f.entry)
                            .0
                            .is_some_and(|p| !r.setup.owned.contains(&p));
                    r.held.insert(f.id, f.entry.clone());
                    if theirs {
                        r.ops.push(Op::Back {
                            entry: f.entry,
                            id: f.id,
                        });
                        continue;
                    }
                    if f.attempts > 0 {
                        r.retried.insert(f.id);
                    }
                    jobs.push(Job {
                        id: f.id,
                        key: f.key.map(|k| k.0),
                        payload: f.payload.0,
                        attempts: f.attempts,
                        last_reason: f.reason.map(String::into_bytes),
                        watched: f.watched,
                    });
                }
                self.state.restore(jobs, Vec::new(), 0);
            }
            FromHelper::Submitted { ticket, first_id } => {
                if let Some(Batch::Waiting { end, watched }) = r.batches.get(&ticket).cloned() {
                    if watched {
                        for i in 0..end - ticket {
                            r.watch_ids.insert(first_id + i, ticket + i);
                        }
                        r.ids.insert(ticket, (end, first_id));
                    }
                    r.batches.insert(ticket, Batch::Stored { first_id });
                }
            }
            FromHelper::SubmitFailed { ticket, why } => {
                if let Some(Batch::Waiting { end, watched }) = r.batches.get(&ticket).cloned() {
                    if watched {
                        for t in ticket..end {
                            self.watched.forget(t);
                        }
                    }
                    r.batches.insert(ticket, Batch::Failed(why));
                }
            }
            FromHelper::Recorded { seq } => {
                while r.unconfirmed.front().is_some_and(|(s, _)| *s <= seq) {
                    let (_, ops) = r.unconfirmed.pop_front().expect("checked");
                    for (id, entry) in ops.iter().filter_map(Op::ends) {
                        if r.held.get(&id).is_some_and(|e| e == entry) {
                            r.held.remove(&id);
                        }
                    }
                }
            }
            FromHelper::Results { cursor, outcomes } => {
                r.setup.results_from = Some(cursor);
                for o in outcomes {
                    let Some(ticket) = r.watch_ids.remove(&o.id) else {
                        continue;
                    };
                    let outcome = if o.ok {
                        JobOutcome::Ok
                    } else {
                        JobOutcome::Dead
                    };
                    self.watched.end(ticket, || ended(outcome, o.text.0));
                }
            }
            FromHelper::Reply { token, reply } => {
                r.asked.retain(|&t| t != token);
                r.replies.insert(token, reply);
                let oldest = r.next_token.saturating_sub(REPLIES_KEPT);
                r.replies.retain(|&t, _| t >= oldest);
            }
            FromHelper::Log { warn, text } => {
                if warn {
                    log::warn!("{text}");
                } else {
                    log::info!("{text}");
                }
            }
        }
    }

    /// Once per pass: credit for the workers' free room, this pass's answers, a hold when
    /// due; the helper (re)started when due.
    fn remote_pass(&mut self, now: Instant) {
        // Credit: the workers' free room, plus as many again waiting here, so that the
        // workers need not wait a round trip to Redis for their next jobs; in chunks of a
        // quarter of that (one read of many entries costs Redis about what a read of one does).
        let capacity = self.state.capacity();
        let room = self.state.room(capacity);
        let chunk = (capacity / 2).max(1);
        let r = self.remote.as_mut().expect("a Redis queue");
        // What was fetched and is not delivered goes back when no worker here takes jobs,
        // or (partitioned) when its partition is not ours any more.
        let nobody = capacity == 0;
        let owned = r.setup.partitions.map(|_| &r.setup.owned);
        let moved = |entry: &str| match (owned, crate::queue::redis::split_entry(entry).0) {
            (Some(owned), Some(p)) => !owned.contains(&p),
            _ => false,
        };
        if (nobody || std::mem::take(&mut r.moved)) && !r.held.is_empty() {
            let held = &r.held;
            let back = self
                .state
                .take_waiting(|j| nobody || held.get(&j.id).is_some_and(|e| moved(e)));
            if !back.is_empty() {
                log::info!(
                    "queue {}: {} job(s) fetched and not delivered given back to Redis ({})",
                    self.config.name,
                    back.len(),
                    if nobody {
                        "no worker here takes jobs"
                    } else {
                        "their partition moved to another master"
                    }
                );
            }
            for j in back {
                if let Some(entry) = r.held.get(&j.id) {
                    r.ops.push(Op::Back {
                        entry: entry.clone(),
                        id: j.id,
                    });
                }
            }
        }
        if nobody && r.granted > 0 && r.send(&ToHelper::NoCredit) {
            r.granted = 0;
        }
        if r.link.is_none() {
            if r.pid.is_none() && r.restart_at.is_some_and(|at| at <= now) {
                r.spawn(now);
            }
            if r.link.is_none() {
                // The answers wait for the next helper, in order.
                if !r.ops.is_empty() {
                    let seq = r.next_seq;
                    r.next_seq += 1;
                    let ops = std::mem::take(&mut r.ops);
                    r.unconfirmed.push_back((seq, ops));
                }
                return;
            }
        }
        if !r.ops.is_empty() {
            let seq = r.next_seq;
            r.next_seq += 1;
            let ops = std::mem::take(&mut r.ops);
            let msg = ToHelper::Answers {
                seq,
                ops: ops.clone(),
            };
            r.unconfirmed.push_back((seq, ops));
            r.send(&msg);
        }
        // Watched batches whose outcomes were all taken (or given up).
        let kept_from = self.watched.base;
        while r
            .ids
            .first_key_value()
            .is_some_and(|(_, &(end, _))| end <= kept_from || self.watched.slots.is_empty())
        {
            r.ids.pop_first();
        }
        if r.watching
            && r.watch_ids.is_empty()
            && !r
                .batches
                .values()
                .any(|b| matches!(b, Batch::Waiting { watched: true, .. }))
            && r.send(&ToHelper::Watch(false))
        {
            r.watching = false;
            r.setup.results_from = None;
        }
        let want = room.saturating_sub(r.granted);
        if want >= chunk && r.send(&ToHelper::Credit(want)) {
            r.granted += want;
        }
        if r.held.is_empty() {
            r.hold_at = None;
        } else {
            let every = r.hold_every();
            match r.hold_at {
                None => r.hold_at = Some(now + every),
                Some(at) if at <= now => {
                    let entries = r.held.values().cloned().collect();
                    r.send(&ToHelper::Hold { entries });
                    r.hold_at = Some(now + every);
                }
                Some(_) => {}
            }
        }
    }
}

/// How long a stopping master waits for its last answers to be recorded in Redis.
const FINISH_WAIT: Duration = Duration::from_secs(3);

impl QueueRt {
    /// The master is stopping: the answers not yet recorded are sent, and the helper gets a
    /// little while to record them (it dies with the master), so that a graceful stop does
    /// not leave done jobs to be done again.
    pub(super) fn remote_finish(&mut self) {
        let Some(r) = self.remote.as_mut() else {
            return;
        };
        if !r.ops.is_empty() {
            let seq = r.next_seq;
            r.next_seq += 1;
            let ops = std::mem::take(&mut r.ops);
            r.unconfirmed.push_back((seq, ops.clone()));
            r.send(&ToHelper::Answers { seq, ops });
        }
        let give_up = Instant::now() + FINISH_WAIT;
        while !r.unconfirmed.is_empty() {
            let Some(link) = r.link.as_mut() else {
                break;
            };
            let left = give_up.saturating_duration_since(Instant::now());
            if left.is_zero() {
                log::warn!(
                    "queue {}: {} answer batch(es) not recorded in Redis; their jobs will run \
                     again",
                    self.config.name,
                    r.unconfirmed.len()
                );
                break;
            }
            let mut flags = nix::poll::PollFlags::POLLIN;
            if link.wants_write() {
                flags |= nix::poll::PollFlags::POLLOUT;
            }
            let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
            let mut fds = [nix::poll::PollFd::new(
                std::os::fd::AsFd::as_fd(&*link),
                flags,
            )];
            if nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms)).is_err() {
                break;
            }
            let got = link.flush().and_then(|()| link.receive());
            match got {
                Ok(msgs) => {
                    for m in msgs {
                        if let FromHelper::Recorded { seq } = m {
                            while r.unconfirmed.front().is_some_and(|(s, _)| *s <= seq) {
                                r.unconfirmed.pop_front();
                            }
                        }
                    }
                }
                Err(_) => break,
            }
        }
    }
}

/// The members that consume `queue` (node names).
fn consumers_of<'a>(members: &'a [crate::cluster::Member], queue: &str) -> Vec<&'a str> {
    members
        .iter()
        .filter(|m| m.queues.iter().any(|q| q == queue))
        .map(|m| m.node.as_str())
        .collect()
}

impl Remote {
    /// The partitions this master owns now; `None`: the member list is not known (out of
    /// the cluster, or not joined yet), so none. Told to the helper and logged when changed.
    fn set_owned(&mut self, owned: Option<Vec<u32>>, partitions: u32, consumers: usize) {
        let list = owned.clone().unwrap_or_default();
        let changed = list != self.setup.owned;
        self.setup.owned = list.clone();
        if changed {
            self.moved = true;
            self.send(&ToHelper::Own(list.clone()));
        }
        match owned {
            None => log::warn!(
                "queue {}: owns no partition: the cluster's member list is not known (not \
                 in the cluster now)",
                self.setup.queue
            ),
            Some(_) if changed => log::info!(
                "queue {}: owns {} of {partitions} partitions ({} master(s) consume it): {}",
                self.setup.queue,
                list.len(),
                consumers,
                show_partitions(&list)
            ),
            Some(_) => {}
        }
    }

    fn spawn(&mut self, now: Instant) {
        let mut setup = self.setup.clone();
        if !self.watching {
            setup.results_from = None;
        } else if setup.results_from.is_none() {
            // The last helper died before it said where the outcomes began: from the start
            // of what is kept (at worst outcomes nobody here waits for are read again).
            setup.results_from = Some("0-0".into());
        }
        match Link::spawn(c"plumule-redis", move |peer| helper::run(setup, peer)) {
            Ok(link) => {
                self.pid = Some(link.pid());
                self.link = Some(link);
                self.restart_at = None;
                self.started = now;
                self.granted = 0;
                // Answers the last helper did not record go first, in order.
                let again: Vec<(u64, Vec<Op>)> = self.unconfirmed.iter().cloned().collect();
                for (seq, ops) in again {
                    if !self.send(&ToHelper::Answers { seq, ops }) {
                        break;
                    }
                }
                log::debug!("queue {}: Redis helper started", self.setup.queue);
            }
            Err(e) => {
                log::error!(
                    "queue {}: cannot start the Redis helper: {e}",
                    self.setup.queue
                );
                self.schedule_restart(now);
            }
        }
    }

    fn schedule_restart(&mut self, now: Instant) {
        if now.saturating_duration_since(self.started) >= HEALTHY {
            self.failures = 0;
        }
        let delay = RESTART_FIRST
            .saturating_mul(1 << self.failures.min(16))
            .min(RESTART_MAX);
        self.failures += 1;
        self.restart_at = Some(now + delay);
    }
}

/// A list of partitions as ranges: `0-3,7,9-10`, or `none`.
fn show_partitions(list: &[u32]) -> String {
    let mut out = Vec::new();
    let mut i = 0;
    while i < list.len() {
        let mut j = i;
        while j + 1 < list.len() && list[j + 1] == list[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            list[i].to_string()
        } else {
            format!("{}-{}", list[i], list[j])
        });
        i = j + 1;
    }
    if out.is_empty() {
        "none".into()
    } else {
        out.join(",")
    }
}

/// What a `queue` or `requeue` request waits for from the Redis helpers.
#[derive(Debug)]
pub(crate) struct Ask {
    what: AskKind,
    /// The queries sent: (queue, token).
    tokens: Vec<(String, u64)>,
}

#[derive(Debug)]
enum AskKind {
    /// `queue [Q]`: every queue's counts in config order; those of Redis queues come from
    /// their helpers.
    Counts(Vec<QueueCounts>),
    Dead(String),
    Requeue(String),
}

impl Supervisor {
    /// A Redis helper's socket is ready.
    pub(super) fn remote_ready(&mut self, pid: Pid, _now: Instant) {
        let Some(q) = self
            .queues
            .queues
            .iter_mut()
            .find(|q| q.remote.as_ref().is_some_and(|r| r.pid == Some(pid)))
        else {
            return;
        };
        let r = q.remote.as_mut().expect("found by it");
        let Some(link) = r.link.as_mut() else {
            return;
        };
        let mut msgs = Vec::new();
        let mut ended: Option<LinkError> = None;
        if let Err(e) = link.flush() {
            ended = Some(e);
        }
        match link.receive() {
            Ok(m) => msgs = m,
            Err(e) => ended = Some(e),
        }
        for m in msgs {
            q.on_helper(m);
        }
        if let Some(e) = ended {
            if let Some(r) = q.remote.as_mut() {
                r.lost(&e.to_string(), true);
            }
        }
        q.apply_events();
        self.watch_remotes();
    }

    /// The Redis queues' part of a pass.
    pub(super) fn remotes_pass(&mut self, now: Instant) {
        let generation = self.cluster.generation();
        for q in &mut self.queues.queues {
            let Some(r) = q.remote.as_mut() else {
                continue;
            };
            if let Some(n) = r.setup.partitions {
                if r.members_seen != Some(generation) {
                    r.members_seen = Some(generation);
                    let members = self.cluster.live_members();
                    let owned = members.map(|m| {
                        let names = consumers_of(m, &q.config.name);
                        partition::owned_by(&q.config.name, n, &names, &r.setup.node)
                    });
                    let consumers = members.map_or(0, |m| consumers_of(m, &q.config.name).len());
                    r.set_owned(owned, n, consumers);
                }
            }
        }
        for q in &mut self.queues.queues {
            if q.remote.is_some() {
                q.remote_pass(now);
            }
        }
        self.watch_remotes();
    }

    /// Keeps the reactor in line with each helper's socket.
    fn watch_remotes(&mut self) {
        for q in &mut self.queues.queues {
            let Some(r) = q.remote.as_mut() else {
                continue;
            };
            let want = r.link.as_ref().map(|l| (l.fd(), l.wants_write()));
            if want == r.watch {
                r.closing = None;
                continue;
            }
            if let Some((fd, _)) = r.watch.take() {
                self.reactor.remove(fd);
            }
            r.closing = None;
            if let (Some((fd, write)), Some(pid)) = (want, r.pid) {
                match self.reactor.add(fd, token(pid, TOKEN_REMOTE), write) {
                    Ok(()) => r.watch = Some((fd, write)),
                    Err(e) => log::error!("cannot watch the Redis helper: {e}"),
                }
            }
        }
    }

    /// A reaped process that may be a Redis helper: restarted after a backoff.
    pub(in crate::master) fn remote_exited(&mut self, pid: Pid, exit: Exit, now: Instant) -> bool {
        let Some(q) = self
            .queues
            .queues
            .iter_mut()
            .find(|q| q.remote.as_ref().is_some_and(|r| r.pid == Some(pid)))
        else {
            return false;
        };
        let name = q.config.name.clone();
        let r = q.remote.as_mut().expect("found by it");
        if let Some((fd, _)) = r.watch.take() {
            self.reactor.remove(fd);
        }
        // Reaped: its pid may be another process's now, so no kill.
        r.lost(&format!("it ended ({exit})"), false);
        r.closing = None;
        r.pid = None;
        r.schedule_restart(now);
        let tag: std::sync::Arc<str> = std::sync::Arc::from(format!("queue {name}"));
        event(
            &mut self.log_ring,
            Level::Warn,
            &tag,
            format_args!("the Redis helper ended ({exit}); restarting it"),
        );
        true
    }

    /// `queue` (counts or dead letters) or `requeue` touching a Redis queue: the question
    /// goes to its helper and the request waits ([`WaitKind::Remote`]). `None`: no Redis
    /// queue is involved, the local answer applies.
    pub(in crate::master) fn remote_query(
        &mut self,
        queue: Option<&str>,
        dead: bool,
        requeue: Option<Option<Vec<u64>>>,
    ) -> Option<Result<WaitKind, Response>> {
        let remote = |q: &QueueRt| q.remote.is_some();
        let involved = match queue {
            Some(name) => self.queues.get(name).is_some_and(remote),
            None => requeue.is_none() && !dead && self.queues.queues.iter().any(remote),
        };
        if !involved {
            return None;
        }
        let mut tokens = Vec::new();
        let what = match (queue, requeue) {
            (Some(name), Some(ids)) => {
                tokens.push((name.to_string(), Query::Requeue(ids)));
                AskKind::Requeue(name.to_string())
            }
            (Some(name), None) if dead => {
                tokens.push((name.to_string(), Query::Dead));
                AskKind::Dead(name.to_string())
            }
            _ => {
                let mut counts = Vec::new();
                for q in &self.queues.queues {
                    if queue.is_some_and(|n| n != q.config.name) {
                        continue;
                    }
                    if q.remote.is_some() {
                        tokens.push((q.config.name.clone(), Query::Counts));
                    }
                    counts.push(super::report(q));
                }
                AskKind::Counts(counts)
            }
        };
        let mut sent = Vec::new();
        for (name, query) in tokens {
            let Some(r) = self.queues.get_mut(&name).and_then(|q| q.remote.as_mut()) else {
                continue;
            };
            let token = r.next_token;
            r.next_token += 1;
            if !r.send(&ToHelper::Query { token, query }) {
                return Some(Err(Response::error(format!(
                    "queue {name}: {}: the Redis helper is not running (restarting)",
                    r.shown
                ))));
            }
            r.asked.push(token);
            sent.push((name, token));
        }
        self.watch_remotes();
        Some(Ok(WaitKind::Remote(Ask { what, tokens: sent })))
    }

    /// The answer of a request waiting on Redis helpers, once every one has replied.
    pub(in crate::master) fn remote_outcome(&self, ask: &Ask) -> Option<Response> {
        let mut replies = Vec::new();
        for (name, token) in &ask.tokens {
            let reply = match self.queues.get(name).and_then(|q| q.remote.as_ref()) {
                Some(r) => r.take_reply(*token)?.clone(),
                None => Reply::Error(format!("queue {name} was removed by a reload")),
            };
            if let Reply::Error(e) = &reply {
                return Some(Response::error(format!("queue {name}: {e}")));
            }
            replies.push((name, reply));
        }
        Some(match &ask.what {
            AskKind::Counts(local) => {
                let mut list = local.clone();
                for (name, reply) in replies {
                    if let (Reply::Counts(c), Some(slot)) =
                        (reply, list.iter_mut().find(|c| &c.name == name))
                    {
                        *slot = c;
                    }
                }
                Response::ok(protocol::QueueReport { queues: list })
            }
            AskKind::Dead(queue) => match replies.pop() {
                Some((_, Reply::Dead(dead))) => Response::ok(protocol::DeadLetters {
                    queue: queue.clone(),
                    dead,
                }),
                _ => Response::error("unexpected reply from the Redis helper"),
            },
            AskKind::Requeue(queue) => match replies.pop() {
                Some((_, Reply::Requeued(n))) => Response::ok(protocol::Requeued {
                    queue: queue.clone(),
                    requeued: n,
                }),
                _ => Response::error("unexpected reply from the Redis helper"),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_show_as_ranges() {
        assert_eq!(show_partitions(&[]), "none");
        assert_eq!(show_partitions(&[0, 1, 2, 3, 7, 9, 10]), "0-3,7,9-10");
        assert_eq!(show_partitions(&[5]), "5");
    }
}
