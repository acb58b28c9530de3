//! The queues part of the master: each `[queue.*]` with its bookkeeping
//! ([`QueueState`]), its durable log ([`Store`], for `durable = true`), and the pipes of its
//! consumers, the workers of the program with `queue = NAME`.
//!
//! A consumer's stdin carries jobs and its stdout answers (SPEC §4). Both ends held here are
//! non-blocking: jobs are encoded into a per-consumer buffer (bounded: at most `prefetch`
//! jobs, each at most `max_frame`), written as far as the pipe takes, and the rest when epoll
//! says the pipe is writable again (the write end is registered only while bytes wait, so a
//! worker that closed its stdin cannot make the loop spin). Answers are decoded as they come
//! ([`AnswerDecoder`]) and applied to the oldest job in flight.
//!
//! The queues live in the supervisor, not in a part of their own: stopping a worker (the
//! supervisor) and `submit` (a client) both change them. Their descriptors are registered
//! under [`Part::Queues`]; the loop calls [`Supervisor::queue_ready`] for them and
//! [`Supervisor::queues_pass`] once per pass.
//!
//! Durability, per pass (group commit): submissions and every change of a job are appended to
//! the log as they happen; at the end of the pass what was appended is written and synced
//! once, and only then are the pass's submissions acknowledged and their jobs delivered. A
//! failed write or sync cuts the log back to what was synced: the submissions after that point
//! fail (their clients are told, their jobs forgotten), and nothing synced before is touched.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Instant;

use log::Level;
use nix::unistd::Pid;

use super::output::event;
use super::supervisor::Supervisor;
use super::Part;
use crate::backoff::Jitter;
use crate::config::{Queue, QueueProtocol};
use crate::plan::WorkerKey;
use crate::protocol::{JobOutcome, JobResult};
use crate::queue::durable::{Durable, Failed, OnReply};
use crate::queue::state::{ConsumerId, DeadJob, Job, JobEvent, QueueState, Settings};
use crate::queue::store::{self, JobState, Pos, Store};
use crate::queue::wire::{check_job, encode_job, AnswerDecoder};
use crate::slot::{Exit, SlotState};
use crate::sys;
use crate::sys::syncer::Syncer;

mod remote;
pub(super) use remote::Ask;

/// Which descriptor of a consumer a `Part::Queues` token names.
const TOKEN_STDIN: u64 = 0;
const TOKEN_STDOUT: u64 = 1;
/// The syncer's socket (with pid 0).
const TOKEN_SYNCER: u64 = 2;

fn token(pid: Pid, which: u64) -> u64 {
    Part::Queues.token(which << 32 | pid.as_raw() as u32 as u64)
}

fn of_token(local: u64) -> (Pid, u64) {
    (
        Pid::from_raw((local & 0xffff_ffff) as u32 as i32),
        local >> 32,
    )
}

/// How big a consumer's pipes are made (best effort; the kernel may cap it): fewer wake-ups
/// per job when jobs are small and many.
const PIPE_SIZE: i32 = 1 << 20;

/// The most bytes read from one consumer's stdout per readiness, so that one fast worker
/// cannot starve the others.
const READ_BUDGET: usize = 1 << 20;

/// Past this many jobs waiting for a worker (while workers take them), `submit` batches are
/// acknowledged only as the backlog drains: flow control, not a refusal (`max_pending` is
/// the refusal).
pub(super) const FLOW_PENDING: u64 = 16_384;

/// How many refused batches a queue remembers for their waiting clients.
const FAILED_KEPT: usize = 256;

/// One queue.
pub(super) struct QueueRt {
    pub(super) config: Arc<Queue>,
    pub(super) state: QueueState,
    store: Option<Durable>,
    /// Submitted batches whose records are not yet synced: (end of their last record, first
    /// id, end id).
    unsynced: VecDeque<(Pos, u64, u64)>,
    /// Every batch with ids below this is stored.
    stored_below: u64,
    /// Batches whose storage failed: (first id, end id, why), the newest last.
    failed: VecDeque<(u64, u64, String)>,
    /// Jobs submitted with `wait` that have not ended yet, and the outcomes of those that
    /// have, until their client collects them.
    /// Each job submitted with `wait`: `None` while it runs, its outcome once it has ended,
    /// until its client takes it.
    watched: Watched,
    /// Counters for the metrics endpoint.
    pub(super) counters: QueueCounters,
    /// `backend = "redis://…"`: the queue lives in Redis, fed through a helper process.
    remote: Option<remote::Remote>,
}

/// What the metrics endpoint reports of a queue's activity since the master started.
#[derive(Debug, Default, Clone)]
pub(super) struct QueueCounters {
    pub(super) ok: u64,
    pub(super) fail: u64,
    pub(super) dropped: u64,
    pub(super) retried: u64,
    pub(super) timeout: u64,
    /// Job durations (delivery to answer), seconds.
    pub(super) durations: crate::master::metrics::Histogram,
}

impl QueueCounters {
    /// Counts what `ev` says happened to a job: the same for a local and a Redis queue.
    pub(super) fn count(&mut self, ev: &JobEvent) {
        match ev {
            JobEvent::Done { took, .. } => {
                self.ok += 1;
                self.durations.observe(took.as_secs_f64());
            }
            JobEvent::Dead { took, failed, .. } => {
                if let Some(t) = took {
                    self.durations.observe(t.as_secs_f64());
                }
                // Answered `fail` on its last attempt, answered `drop`, or out of attempts by
                // redeliveries (then counted as those, under `retried`).
                if *failed {
                    self.fail += 1;
                } else if took.is_some() {
                    self.dropped += 1;
                }
            }
            JobEvent::Attempt { took, .. } => {
                if let Some(t) = took {
                    self.fail += 1;
                    self.durations.observe(t.as_secs_f64());
                }
                self.retried += 1;
            }
            JobEvent::Requeued { .. } => {}
            JobEvent::TimedOut { .. } => self.timeout += 1,
        }
    }
}

/// A consumer's pipes and what travels on them.
struct Conn {
    queue: String,
    key: WorkerKey,
    tag: Arc<str>,
    /// The protocol this worker was started with: a reload that changes the queue's
    /// protocol rolls the consumers one at a time, and those not yet rolled keep speaking
    /// the old one until they are. (Jobs are held to the queue's current `max_frame`, the
    /// one `submit` checked them against.)
    protocol: QueueProtocol,
    stdin: Option<OwnedFd>,
    stdout: Option<OwnedFd>,
    /// Encoded jobs not yet written; `out[..sent]` is written already.
    out: Vec<u8>,
    sent: usize,
    /// Stream offsets of the jobs in flight, oldest first: where each starts and ends.
    /// `base` is the offset of `out[0]`.
    spans: VecDeque<(u64, u64)>,
    base: u64,
    /// The write end is registered for writability.
    watching_stdin: bool,
    /// Stop sending: close stdin once the job being written is through.
    closing: bool,
    decoder: AnswerDecoder,
    /// A protocol error killed it (what was wrong): nothing more is read, and the jobs it
    /// held are redelivered with that reason.
    broken: Option<String>,
}

impl Conn {
    /// Bytes written to the worker so far.
    fn written(&self) -> u64 {
        self.base + self.sent as u64
    }

    /// Jobs in flight whose bytes reached the worker, at least in part.
    fn delivered(&self) -> usize {
        let written = self.written();
        self.spans.iter().take_while(|(s, _)| *s < written).count()
    }
}

#[derive(Default)]
pub(super) struct Queues {
    pub(super) queues: Vec<QueueRt>,
    conns: HashMap<Pid, Conn, BuildHasherDefault<PidHasher>>,
    jitter: Option<Jitter>,
    /// Syncs durable queues' logs away from the loop (see [`crate::sys::syncer`]); `None`
    /// without durable queues, or if it cannot run: then the loop syncs inline.
    syncer: Option<Syncer>,
    /// What the reactor watches of the syncer's socket: (fd, for writing too).
    syncer_watch: Option<(i32, bool)>,
    /// The buffer answers are read into.
    read_buf: Vec<u8>,
}

/// Hashes a pid by multiplying it: the consumers are looked up once per job delivered and
/// per answer read, and SipHash (which resists keys chosen by an attacker, not a concern for
/// the master's own children) cost more than the rest of the lookup.
#[derive(Default)]
struct PidHasher(u64);

impl Hasher for PidHasher {
    fn finish(&self) -> u64 {
        self.0.wrapping_mul(0x9e37_79b9_7f4a_7c15)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_i32(&mut self, n: i32) {
        self.0 = self.0.rotate_left(32) ^ u64::from(n as u32);
    }
}

/// Why a batch was not taken.
#[derive(Debug, thiserror::Error)]
pub(super) enum SubmitError {
    #[error("no queue named {0}")]
    NoQueue(String),
    #[error("queue {queue}: {source}")]
    Full {
        queue: String,
        source: crate::queue::state::Full,
    },
    #[error("queue {queue}: job {index} of the batch: {source}")]
    Encode {
        queue: String,
        index: usize,
        source: crate::queue::wire::EncodeError,
    },
    #[error("queue {queue}: cannot store the jobs: {why}")]
    Store { queue: String, why: String },
}

impl Queues {
    /// Opens every queue of the config: a durable one replays its log from
    /// `state_dir/queues/NAME/`. A queue whose data cannot be read stops the master, as an
    /// unreadable config would: running without it would hide its jobs.
    pub(super) fn open(config: &crate::config::Config) -> Result<Queues, (String, store::Error)> {
        let mut queues = Queues {
            queues: Vec::new(),
            conns: HashMap::default(),
            jitter: Some(Jitter::from_entropy()),
            syncer: None,
            syncer_watch: None,
            read_buf: Vec::new(),
        };
        for q in &config.queues {
            let rt = QueueRt::open(q, &config.state_dir, &config.node, config.cluster.is_some())
                .map_err(|e| (q.name.clone(), e))?;
            queues.queues.push(rt);
        }
        queues.ensure_syncer();
        Ok(queues)
    }

    /// Starts the syncer when a durable queue exists and it does not run yet.
    fn ensure_syncer(&mut self) {
        if self.syncer.is_some() || !self.queues.iter().any(|q| q.store.is_some()) {
            return;
        }
        match Syncer::start() {
            Ok(s) => self.syncer = Some(s),
            Err(e) => log::warn!("cannot start the syncer process, syncing in the loop: {e}"),
        }
    }

    /// The syncer's pid, to tell it from the workers when it is reaped.
    pub(super) fn syncer_pid(&self) -> Option<Pid> {
        self.syncer.as_ref().map(Syncer::pid)
    }

    /// Every durable queue's log synced now, inline: the master is stopping.
    pub(super) fn finish(&mut self) {
        for q in &mut self.queues {
            q.remote_finish();
        }
        for q in &mut self.queues {
            if let Some(st) = q.store.as_mut() {
                if let Err(f) = st.sync_now() {
                    log::error!("{}", f.error);
                }
            }
        }
    }

    pub(super) fn get(&self, name: &str) -> Option<&QueueRt> {
        self.queues.iter().find(|q| q.config.name == name)
    }

    pub(super) fn get_mut(&mut self, name: &str) -> Option<&mut QueueRt> {
        self.queues.iter_mut().find(|q| q.config.name == name)
    }

    /// Jobs in flight at the worker process `pid`.
    pub(super) fn in_flight_of(&self, pid: Pid) -> u32 {
        let Some(conn) = self.conns.get(&pid) else {
            return 0;
        };
        self.get(&conn.queue).map_or(0, |q| {
            q.state.in_flight_of(ConsumerId(pid.as_raw() as u64)) as u32
        })
    }

    /// Earliest moment a queue needs the loop without an event: a retry, a job timeout.
    pub(super) fn deadline(&self) -> Option<Instant> {
        let remote = self
            .queues
            .iter()
            .filter_map(|q| q.remote.as_ref().and_then(|r| r.deadline()));
        self.queues
            .iter()
            .filter_map(|q| q.state.deadline())
            .chain(remote)
            .min()
    }

    /// A new config: queues added are opened, settings of kept ones change in place.
    /// Queues removed from the file go (the reload refuses to remove a durable queue that
    /// still holds jobs, see `check_reload`).
    pub(super) fn reconfigure(&mut self, config: &crate::config::Config) -> Vec<String> {
        let mut changes = Vec::new();
        let mut kept = Vec::new();
        for q in &config.queues {
            match self.queues.iter().position(|r| r.config.name == q.name) {
                Some(i) => {
                    let mut rt = self.queues.swap_remove(i);
                    if let Some(r) = rt.remote.as_mut() {
                        r.reconfigure(q);
                    }
                    if rt.config.backend != q.backend {
                        changes.push(format!(
                            "queue {}: `backend` changes when the master restarts",
                            q.name
                        ));
                    }
                    if rt.config.durable != q.durable && q.backend.is_none() {
                        // `check_reload` let it through: the queue holds no job.
                        match rt.set_durable(q, &config.state_dir) {
                            Ok(()) => changes.push(format!(
                                "queue {}: {}",
                                q.name,
                                if q.durable {
                                    "durable now"
                                } else {
                                    "in memory now"
                                }
                            )),
                            Err(e) => {
                                log::error!("queue {}: cannot open its log: {e}", q.name);
                            }
                        }
                    }
                    if *rt.config != *q {
                        rt.state.set_settings(Settings::from(q));
                        rt.config = Arc::new(q.clone());
                        changes.push(format!("queue {}: settings changed", q.name));
                    }
                    kept.push(rt);
                }
                None => match QueueRt::open(
                    q,
                    &config.state_dir,
                    &config.node,
                    config.cluster.is_some(),
                ) {
                    Ok(rt) => {
                        changes.push(format!("queue {}: added", q.name));
                        kept.push(rt);
                    }
                    Err(e) => log::error!("queue {}: cannot open: {e}", q.name),
                },
            }
        }
        for gone in self.queues.drain(..) {
            changes.push(format!("queue {}: removed", gone.config.name));
        }
        self.queues = kept;
        self.ensure_syncer();
        changes
    }

    /// A queue the new config removes, or whose durability changes, while it holds jobs: a
    /// reload must not drop them.
    pub(super) fn check_reload(&self, config: &crate::config::Config) -> Result<(), String> {
        for q in &self.queues {
            let held = q.state.held() + q.state.counts().dead;
            if held == 0 {
                continue;
            }
            match config.queues.iter().find(|n| n.name == q.config.name) {
                None => {
                    return Err(format!(
                        "queue {} still holds {held} job(s) (pending, in flight or dead); \
                         drain it or keep it in the file",
                        q.config.name
                    ))
                }
                Some(n) if n.durable != q.config.durable && n.backend.is_none() => {
                    return Err(format!(
                        "queue {}: `durable` cannot change while it holds {held} job(s)",
                        q.config.name
                    ))
                }
                Some(_) => {}
            }
        }
        Ok(())
    }
}

impl QueueRt {
    fn open(
        q: &Queue,
        state_dir: &std::path::Path,
        node: &str,
        clustered: bool,
    ) -> Result<QueueRt, store::Error> {
        let mut state = QueueState::new(Settings::from(q));
        let mut store_opt = None;
        // A queue in Redis is as durable as Redis is: no log of its own.
        if q.durable && q.backend.is_none() {
            let (durable, pending, dead, next_id) = open_log(q, state_dir)?;
            state.restore(pending, dead, next_id);
            store_opt = Some(durable);
        }
        let stored_below = state.next_id();
        Ok(QueueRt {
            config: Arc::new(q.clone()),
            state,
            store: store_opt,
            unsynced: VecDeque::new(),
            stored_below,
            failed: VecDeque::new(),
            watched: Watched::default(),
            counters: QueueCounters::default(),
            remote: remote::Remote::for_queue(q, node, clustered),
        })
    }

    /// A reload changed `durable` while the queue holds no job: its log is opened (taking
    /// back whatever it kept from an earlier durable life, as a restart would), or synced
    /// and let go. The consumers stay.
    fn set_durable(&mut self, q: &Queue, state_dir: &std::path::Path) -> Result<(), store::Error> {
        if q.durable {
            let (durable, pending, dead, next_id) = open_log(q, state_dir)?;
            self.state.restore(pending, dead, next_id);
            self.store = Some(durable);
        } else if let Some(mut st) = self.store.take() {
            if let Err(f) = st.sync_now() {
                log::error!("{}", f.error);
            }
        }
        self.unsynced.clear();
        self.stored_below = self.state.next_id();
        self.state.set_deliverable_below(u64::MAX);
        Ok(())
    }

    /// Enqueues a batch; for a durable queue, appends its records (synced at the end of the
    /// pass). Returns the batch's id range.
    fn submit(
        &mut self,
        key: Option<&[u8]>,
        jobs: Vec<Vec<u8>>,
        watched: bool,
    ) -> Result<(u64, u64), SubmitError> {
        let name = self.config.name.clone();
        let name = &name;
        for (index, payload) in jobs.iter().enumerate() {
            // The same checks the encoder makes when it delivers: refuse now, not later.
            let check = check_job(self.config.protocol, payload, self.config.max_frame);
            check.map_err(|source| SubmitError::Encode {
                queue: name.clone(),
                index: index + 1,
                source,
            })?;
        }
        if self.remote.is_some() {
            return self.remote_submit(key, jobs, watched);
        }
        let count = jobs.len() as u64;
        self.state
            .admit(count)
            .map_err(|source| SubmitError::Full {
                queue: name.clone(),
                source,
            })?;
        let first = self.state.next_id();
        if let Some(st) = self.store.as_mut() {
            let mut last = None;
            for (i, payload) in jobs.iter().enumerate() {
                match st.append_submitted(first + i as u64, 0, key, payload) {
                    Ok(pos) => last = Some(pos),
                    Err(failed) => {
                        // The log was cut back to its last sync: this batch's earlier
                        // records went with it, as did every unsynced batch (they fail).
                        let why = failed.error.detail.clone();
                        self.failed_after(&failed);
                        return Err(SubmitError::Store {
                            queue: name.clone(),
                            why,
                        });
                    }
                }
            }
            if let Some(pos) = last {
                if self.unsynced.is_empty() {
                    self.state.set_deliverable_below(first);
                }
                self.unsynced.push_back((pos, first, first + count));
            }
        }
        let got = self.state.submit(key, jobs, watched);
        debug_assert_eq!(got, first);
        if self.store.is_none() {
            self.stored_below = first + count;
        }
        if watched {
            self.watched.open(first, first + count);
        }
        Ok((first, first + count))
    }

    /// Writes what this pass appended and asks for one sync of it (group commit); the
    /// batches a sync covers are acknowledged when it is done.
    fn commit(&mut self, syncer: Option<&mut Syncer>, now: Instant) {
        let Some(st) = self.store.as_mut() else {
            return;
        };
        if let Err(failed) = st.commit(syncer, now) {
            self.failed_after(&failed);
        }
        let synced = self.store.as_ref().map(Durable::synced);
        if let Some(synced) = synced {
            self.acknowledge(synced);
        }
    }

    /// Batches whose records are all synced up to `synced` are stored: their clients are
    /// answered, their jobs may go out.
    fn acknowledge(&mut self, synced: Pos) {
        while let Some(&(pos, _, end)) = self.unsynced.front() {
            if pos > synced {
                break;
            }
            self.unsynced.pop_front();
            self.stored_below = end;
        }
        match self.unsynced.front() {
            Some(&(_, first, _)) => self.state.set_deliverable_below(first),
            None => self.state.set_deliverable_below(u64::MAX),
        }
    }

    /// The log lost what came after `failed.after`: every batch among it fails (its client
    /// is told, its jobs forgotten; none was delivered).
    fn failed_after(&mut self, failed: &Failed) {
        log::error!("{}", failed.error);
        let why = failed.error.detail.clone();
        let lost: Vec<(Pos, u64, u64)> = self
            .unsynced
            .iter()
            .copied()
            .filter(|(pos, _, _)| *pos > failed.after)
            .collect();
        self.unsynced.retain(|(pos, _, _)| *pos <= failed.after);
        for (_, first, end) in lost {
            self.state.forget(first, end);
            for id in first..end {
                self.watched.forget(id);
            }
            self.failed.push_back((first, end, why.clone()));
            if self.failed.len() > FAILED_KEPT {
                self.failed.pop_front();
            }
        }
        match self.unsynced.front() {
            Some(&(_, first, _)) => self.state.set_deliverable_below(first),
            None => self.state.set_deliverable_below(u64::MAX),
        }
    }

    /// A syncer reply: this queue's sync is done (or failed), or it is not this queue's.
    fn on_sync_reply(&mut self, reply: &crate::sys::syncer::Reply, now: Instant) -> bool {
        let Some(st) = self.store.as_mut() else {
            return false;
        };
        match st.on_reply(reply, now) {
            OnReply::NotMine => false,
            OnReply::Synced(upto) => {
                self.acknowledge(upto);
                true
            }
            OnReply::Failed(failed) => {
                self.failed_after(&failed);
                true
            }
        }
    }

    /// Records each change of a job in the log, fills in the results clients wait for, and
    /// counts.
    fn apply_events(&mut self) {
        if self.remote.is_some() {
            return self.remote_events();
        }
        let events: Vec<JobEvent> = self.state.events().collect();
        for mut ev in events {
            self.counters.count(&ev);
            let appended = match &mut ev {
                JobEvent::Done {
                    id,
                    result,
                    watched,
                    ..
                } => {
                    let appended = self
                        .store
                        .as_mut()
                        .map(|s| s.append_answered(*id, store::Outcome::Ok(result)));
                    if *watched {
                        // The result moves into the answer for the client, not copied.
                        let result = std::mem::take(result);
                        self.watched.end(*id, || ended(JobOutcome::Ok, result));
                    }
                    appended
                }
                JobEvent::Dead {
                    id,
                    attempts,
                    reason,
                    watched,
                    ..
                } => {
                    if *watched {
                        let reason = reason.clone();
                        self.watched.end(*id, || ended(JobOutcome::Dead, reason));
                    }
                    // The attempt that killed it is recorded first, so that the dead letter
                    // keeps its count across a restart.
                    self.store.as_mut().map(|s| {
                        if *attempts > 0 {
                            s.append_attempt(*id, *attempts, reason)?;
                        }
                        s.append_answered(*id, store::Outcome::Dead(reason))
                    })
                }
                JobEvent::Attempt {
                    id,
                    attempts,
                    reason,
                    ..
                } => self
                    .store
                    .as_mut()
                    .map(|s| s.append_attempt(*id, *attempts, reason)),
                JobEvent::Requeued { id } => self.store.as_mut().map(|s| s.append_requeued(*id)),
                JobEvent::TimedOut { .. } => None,
            };
            if let Some(Err(failed)) = appended {
                // The change stays in memory; on disk the job keeps its earlier state, so
                // after a restart it runs again (at least once).
                self.failed_after(&failed);
            }
        }
    }

    /// Where the batch `first..end` stands: stored (`Some(Ok)`), failed (`Some(Err)`), or
    /// not yet known. A stored batch is acknowledged only once the jobs waiting for a worker
    /// are fewer than [`FLOW_PENDING`] while workers take them: a producer faster than its
    /// consumers is slowed to their pace instead of filling the master's memory (a queue
    /// with no consumer running takes jobs up to `max_pending`).
    pub(super) fn batch(&self, first: u64, end: u64) -> Option<Result<(), String>> {
        if self.remote.is_some() {
            return self.remote_batch(first);
        }
        if let Some((_, _, why)) = self
            .failed
            .iter()
            .find(|(f, e, _)| *f == first && *e == end)
        {
            return Some(Err(why.clone()));
        }
        if end > self.stored_below {
            return None;
        }
        let backlog = self.state.counts().pending;
        if backlog > FLOW_PENDING && self.state.has_consumers() {
            return None;
        }
        Some(Ok(()))
    }

    /// Takes the outcomes of the watched jobs from `*next` on, in id order, up to `end` or
    /// the first one still running, at most `max`; moves `*next` past what it took. Ids that
    /// are neither running nor ended (their batch failed to be stored) are passed over.
    pub(super) fn take_results(
        &mut self,
        next: &mut u64,
        end: u64,
        max: usize,
        out: &mut Vec<JobResult>,
    ) {
        out.reserve((end.saturating_sub(*next)).min(max.saturating_sub(out.len()) as u64) as usize);
        while *next < end && out.len() < max {
            match self.watched.take(*next) {
                Taken::Running => return,
                Taken::Ended(e) => out.push(JobResult {
                    queue: self.config.name.clone(),
                    id: self.job_id(*next),
                    outcome: e.outcome,
                    text: e.text,
                    base64: e.base64,
                }),
                Taken::Nothing => {}
            }
            *next += 1;
        }
    }

    /// The client that watched `first..end` is gone: keep nothing for it.
    pub(super) fn unwatch(&mut self, first: u64, end: u64) {
        for id in first..end {
            self.watched.forget(id);
        }
    }
}

/// Opens the durable log of `q` under `state_dir/queues/NAME/`: the log, and what it held
/// (pending jobs, dead letters, the next id).
fn open_log(
    q: &Queue,
    state_dir: &std::path::Path,
) -> Result<(Durable, Vec<Job>, Vec<DeadJob>, u64), store::Error> {
    let dir = state_dir.join("queues").join(&q.name);
    // Hidden, for tests (a full disk on a small tmpfs): the segment size in bytes.
    let opts = match std::env::var("PLUMULE_QUEUE_SEGMENT_SIZE").map(|v| v.parse()) {
        Ok(Ok(segment_size)) => store::Options { segment_size },
        _ => store::Options::default(),
    };
    let (st, recovered) = Store::open(&dir, opts)?;
    for w in &recovered.warnings {
        log::warn!("queue {}: {w}", q.name);
    }
    let mut pending = Vec::new();
    let mut dead = Vec::new();
    for j in recovered.jobs {
        match j.state {
            JobState::Pending { last_reason } => pending.push(Job {
                id: j.id,
                key: j.key,
                payload: j.payload,
                attempts: j.attempts,
                last_reason,
                watched: false,
            }),
            JobState::Dead { reason } => dead.push(DeadJob {
                job: Job {
                    id: j.id,
                    key: j.key,
                    payload: j.payload,
                    attempts: j.attempts,
                    last_reason: Some(reason.clone()),
                    watched: false,
                },
                reason,
            }),
        }
    }
    if !pending.is_empty() || !dead.is_empty() {
        log::info!(
            "queue {}: recovered {} pending and {} dead job(s) from {}",
            q.name,
            pending.len(),
            dead.len(),
            dir.display()
        );
    }
    Ok((
        Durable::new(&q.name, st),
        pending,
        dead,
        recovered.next_id.max(1),
    ))
}

/// The jobs clients wait on (`submit --wait`), by id: a window from the oldest one still
/// kept to the newest, one small entry per id in between (jobs nobody waits on included),
/// so that every lookup is an index, not a hash: at hundreds of thousands of jobs a second a
/// hash map of results spent its time in cache misses.
#[derive(Debug, Default)]
struct Watched {
    /// The id of `slots[0]`.
    base: u64,
    slots: VecDeque<Slot>,
}

#[derive(Debug)]
enum Slot {
    /// Nobody waits for it (or waits no more).
    Nothing,
    Running,
    Ended(Ended),
}

/// How a watched job ended: its [`JobResult`] but for the queue and the id, which are known
/// from where it is kept (no copy of the queue's name, no box, per job).
#[derive(Debug)]
struct Ended {
    outcome: JobOutcome,
    text: String,
    base64: bool,
}

/// What [`Watched::take`] found.
enum Taken {
    Nothing,
    Running,
    Ended(Ended),
}

impl Watched {
    fn slot(&mut self, id: u64) -> Option<&mut Slot> {
        let i = usize::try_from(id.checked_sub(self.base)?).ok()?;
        self.slots.get_mut(i)
    }

    /// Jobs `first..end` (ids above every one kept) are waited on.
    fn open(&mut self, first: u64, end: u64) {
        if self.slots.is_empty() {
            self.base = first;
        }
        let top = self.base + self.slots.len() as u64;
        for _ in top..first {
            self.slots.push_back(Slot::Nothing);
        }
        for _ in first.max(top)..end {
            self.slots.push_back(Slot::Running);
        }
    }

    /// Job `id` ended: its outcome is kept if someone waits for it.
    fn end(&mut self, id: u64, result: impl FnOnce() -> Ended) {
        if let Some(slot @ Slot::Running) = self.slot(id) {
            *slot = Slot::Ended(result());
        }
    }

    fn take(&mut self, id: u64) -> Taken {
        let taken = match self.slot(id) {
            None | Some(Slot::Nothing) => Taken::Nothing,
            Some(Slot::Running) => Taken::Running,
            Some(slot @ Slot::Ended(_)) => match std::mem::replace(slot, Slot::Nothing) {
                Slot::Ended(r) => Taken::Ended(r),
                _ => Taken::Nothing,
            },
        };
        self.trim();
        taken
    }

    fn forget(&mut self, id: u64) {
        if let Some(slot) = self.slot(id) {
            *slot = Slot::Nothing;
        }
        self.trim();
    }

    /// Drops the entries nobody needs from the front.
    fn trim(&mut self) {
        while matches!(self.slots.front(), Some(Slot::Nothing)) {
            self.slots.pop_front();
            self.base += 1;
        }
    }
}

fn ended(outcome: JobOutcome, text: Vec<u8>) -> Ended {
    let (text, base64) = crate::protocol::encode_owned(text);
    Ended {
        outcome,
        text,
        base64,
    }
}

/// How a consumer's end reads in a redelivered job's reason.
fn death_reason(exit: Exit) -> String {
    match exit {
        Exit::Code(c) => format!("worker exited with code {c} before answering"),
        Exit::Signal(s) => format!(
            "worker killed by signal {} before answering",
            crate::slot::signal_name(s)
        ),
    }
}

impl Supervisor {
    /// Makes the pipes of a consumer of `queue` about to be spawned: (the worker's stdin,
    /// its stdout) ends for the child, and the master's ends.
    pub(super) fn consumer_pipes(&self) -> std::io::Result<ConsumerPipes> {
        let (job_r, job_w) = sys::pipe(false)?;
        let (ans_r, ans_w) = sys::pipe(true)?;
        sys::set_nonblocking(job_w.as_raw_fd())?;
        let _ = sys::set_pipe_size(job_w.as_raw_fd(), PIPE_SIZE);
        let _ = sys::set_pipe_size(ans_r.as_raw_fd(), PIPE_SIZE);
        Ok(ConsumerPipes {
            child_stdin: job_r,
            child_stdout: ans_w,
            stdin: job_w,
            stdout: ans_r,
        })
    }

    /// A consumer was spawned: its pipes join the loop. It gets jobs once it runs.
    pub(super) fn attach_consumer(
        &mut self,
        pid: Pid,
        key: WorkerKey,
        tag: Arc<str>,
        queue: &str,
        pipes: ConsumerPipes,
    ) {
        let Some(q) = self.queues.get_mut(queue) else {
            return;
        };
        q.state
            .add_consumer(ConsumerId(pid.as_raw() as u64), key.id);
        let (protocol, max_frame) = (q.config.protocol, q.config.max_frame);
        if let Err(e) = self
            .reactor
            .add(pipes.stdout.as_raw_fd(), token(pid, TOKEN_STDOUT), false)
        {
            log::error!("{tag}: cannot watch its answers: {e}");
        }
        drop(pipes.child_stdin);
        drop(pipes.child_stdout);
        self.queues.conns.insert(
            pid,
            Conn {
                queue: queue.to_string(),
                key,
                tag,
                protocol,
                stdin: Some(pipes.stdin),
                stdout: Some(pipes.stdout),
                out: Vec::new(),
                sent: 0,
                spans: VecDeque::new(),
                base: 0,
                watching_stdin: false,
                closing: false,
                decoder: AnswerDecoder::new(protocol, max_frame),
                broken: None,
            },
        );
    }

    /// A consumer's pipe, or the syncer's socket, is ready.
    pub(super) fn queue_ready(&mut self, local: u64, now: Instant) {
        let (pid, which) = of_token(local);
        match which {
            TOKEN_STDIN => self.write_jobs(pid),
            TOKEN_STDOUT => self.read_answers(pid, now, false),
            TOKEN_SYNCER => self.syncer_ready(now),
            remote::TOKEN_REMOTE => self.remote_ready(pid, now),
            _ => {}
        }
    }

    fn syncer_ready(&mut self, now: Instant) {
        let Some(syncer) = self.queues.syncer.as_mut() else {
            return;
        };
        syncer.send_queued();
        for reply in syncer.replies() {
            for q in &mut self.queues.queues {
                if q.on_sync_reply(&reply, now) {
                    break;
                }
            }
        }
        self.watch_syncer();
    }

    /// Keeps the reactor in line with the syncer's socket: read while it lives, write while
    /// requests wait, nothing once it is gone (until it is restarted).
    fn watch_syncer(&mut self) {
        let queues = &mut self.queues;
        let want = queues
            .syncer
            .as_ref()
            .filter(|s| !s.is_gone())
            .map(|s| (s.fd(), s.wants_write()));
        if want == queues.syncer_watch {
            return;
        }
        if let Some((fd, _)) = queues.syncer_watch.take() {
            self.reactor.remove(fd);
        }
        if let Some((fd, write)) = want {
            let token = token(Pid::from_raw(0), TOKEN_SYNCER);
            match self.reactor.add(fd, token, write) {
                Ok(()) => queues.syncer_watch = Some((fd, write)),
                Err(e) => log::error!("cannot watch the syncer: {e}"),
            }
        }
    }

    /// The syncer process was reaped: a new one takes over (the queues hand their files
    /// again at their next commit); if none can start, the loop syncs inline.
    pub(super) fn syncer_exited(&mut self, exit: Exit, now: Instant) {
        log::warn!("the syncer process ended ({exit}); starting another");
        if let Some((fd, _)) = self.queues.syncer_watch.take() {
            self.reactor.remove(fd);
        }
        if let Some(s) = self.queues.syncer.as_mut() {
            if let Err(e) = s.restart() {
                log::error!("cannot restart the syncer, syncing in the loop: {e}");
                if let Some(s) = self.queues.syncer.take() {
                    s.reaped();
                }
            }
        }
        let syncer = &mut self.queues.syncer;
        for q in &mut self.queues.queues {
            q.commit(syncer.as_mut(), now);
        }
        self.watch_syncer();
    }

    /// The worker is being stopped: no new jobs; what it was never sent goes back to the
    /// queue; its stdin closes once the job being written is through, which asks it to
    /// finish (SPEC §9).
    pub(super) fn close_consumer_input(&mut self, pid: Pid) {
        let Some(conn) = self.queues.conns.get_mut(&pid) else {
            return;
        };
        conn.closing = true;
        let delivered = conn.delivered();
        let Some(q) = self
            .queues
            .queues
            .iter_mut()
            .find(|q| q.config.name == conn.queue)
        else {
            // Its queue went with a reload (it held no job): just the EOF.
            self.write_jobs(pid);
            return;
        };
        let c = ConsumerId(pid.as_raw() as u64);
        q.state.set_accepting(c, false);
        q.state.take_back(c, delivered);
        // The bytes of the jobs taken back are dropped from the buffer.
        conn.spans.truncate(delivered);
        let end = conn.spans.back().map_or(conn.written(), |&(_, e)| e);
        let keep = (end - conn.base) as usize;
        conn.out.truncate(keep.max(conn.sent));
        self.write_jobs(pid);
    }

    /// Writes what a consumer's buffer holds, as far as its pipe takes.
    fn write_jobs(&mut self, pid: Pid) {
        let Some(conn) = self.queues.conns.get_mut(&pid) else {
            return;
        };
        let Some(fd) = conn.stdin.as_ref().map(|f| f.as_raw_fd()) else {
            return;
        };
        let mut gone = false;
        while conn.sent < conn.out.len() {
            match nix::unistd::write(
                conn.stdin.as_ref().expect("checked above"),
                &conn.out[conn.sent..],
            ) {
                Ok(n) => conn.sent += n,
                Err(nix::errno::Errno::EAGAIN) => break,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    // EPIPE: the worker closed its stdin. What it holds is answered or comes
                    // back when it exits; nothing more can be sent.
                    log::debug!("{}: cannot write jobs: {e}", conn.tag);
                    gone = true;
                    break;
                }
            }
        }
        if conn.sent == conn.out.len() {
            conn.base += conn.sent as u64;
            conn.out.clear();
            conn.sent = 0;
        } else if conn.sent > (1 << 20) {
            // Keep the buffer from growing at the front.
            conn.out.drain(..conn.sent);
            conn.base += conn.sent as u64;
            conn.sent = 0;
        }
        let pending = !conn.out.is_empty() && !gone;
        if pending != conn.watching_stdin {
            let result = if pending {
                self.reactor.add(fd, token(pid, TOKEN_STDIN), true)
            } else {
                self.reactor.remove(fd);
                Ok(())
            };
            match result {
                Ok(()) => conn.watching_stdin = pending,
                Err(e) => log::error!("{}: cannot watch its stdin: {e}", conn.tag),
            }
        }
        if gone || (conn.closing && conn.out.is_empty()) {
            if conn.watching_stdin {
                self.reactor.remove(fd);
                conn.watching_stdin = false;
            }
            conn.stdin = None;
        }
    }

    /// Reads a consumer's answers and applies them; a protocol error kills it. With
    /// `to_end`, reads until end of file (the worker has exited).
    fn read_answers(&mut self, pid: Pid, now: Instant, to_end: bool) {
        let jitter = self.queues.jitter.get_or_insert_with(Jitter::from_entropy);
        let Some(conn) = self.queues.conns.get_mut(&pid) else {
            return;
        };
        if conn.broken.is_some() {
            return;
        }
        let Some(fd) = conn.stdout.as_ref().map(|f| f.as_raw_fd()) else {
            return;
        };
        let Some(q) = self
            .queues
            .queues
            .iter_mut()
            .find(|q| q.config.name == conn.queue)
        else {
            // Its queue went with a reload: nothing it says can apply, and a pipe left
            // readable must not keep waking the loop.
            self.reactor.remove(fd);
            conn.stdout = None;
            return;
        };
        let c = ConsumerId(pid.as_raw() as u64);
        // One buffer for every read, kept between passes (not zeroed and allocated per read).
        let mut buf = std::mem::take(&mut self.queues.read_buf);
        buf.resize(64 * 1024, 0);
        let mut budget = READ_BUDGET;
        let mut eof = false;
        let mut error: Option<String> = None;
        while to_end || budget > 0 {
            let n = match sys::read_available(fd, &mut buf) {
                Ok(Some(0)) => break,
                Ok(Some(n)) => n,
                Ok(None) => {
                    eof = true;
                    break;
                }
                Err(e) => {
                    log::debug!("{}: cannot read its answers: {e}", conn.tag);
                    eof = true;
                    break;
                }
            };
            budget = budget.saturating_sub(n);
            let spans = &mut conn.spans;
            let pushed = conn.decoder.push(&buf[..n], |answer| {
                if error.is_some() {
                    return;
                }
                match q.state.answer(c, answer, now, jitter.sample()) {
                    Ok(()) => {
                        spans.pop_front();
                    }
                    Err(e) => error = Some(e.to_string()),
                }
            });
            if let Err(e) = pushed {
                error.get_or_insert(e.to_string());
            }
            if error.is_some() {
                break;
            }
            if n < buf.len() && !to_end {
                // The pipe is drained: the read that would say so costs a system call, and
                // the (level-triggered) reactor reports what comes next.
                break;
            }
        }
        self.queues.read_buf = buf;
        if eof && error.is_none() {
            if let Err(e) = conn.decoder.finish() {
                error = Some(e.to_string());
            }
        }
        q.apply_events();
        if let Some(why) = error {
            conn.broken = Some(format!("protocol error: {why}"));
            self.reactor.remove(fd);
            conn.stdout = None;
            q.state.set_accepting(c, false);
            let tag = Arc::clone(&conn.tag);
            event(
                &mut self.log_ring,
                Level::Error,
                &tag,
                format_args!("protocol error: {why}; killing it"),
            );
            if let Err(e) = sys::process::signal_group(pid, nix::sys::signal::Signal::SIGKILL) {
                log::warn!("{tag}: cannot kill process group {pid}: {e}");
            }
        } else if eof {
            self.reactor.remove(fd);
            conn.stdout = None;
        }
    }

    /// A consumer's worker process has exited: its last answers are read, and the jobs it
    /// did not answer go back to the queue (an attempt counted for each it was sent).
    pub(super) fn detach_consumer(&mut self, pid: Pid, exit: Exit, now: Instant) {
        if !self.queues.conns.contains_key(&pid) {
            return;
        }
        self.read_answers(pid, now, true);
        let Some(conn) = self.queues.conns.remove(&pid) else {
            return;
        };
        for fd in [conn.stdin.as_ref(), conn.stdout.as_ref()]
            .into_iter()
            .flatten()
        {
            self.reactor.remove(fd.as_raw_fd());
        }
        let delivered = conn.delivered();
        if let Some(q) = self.queues.get_mut(&conn.queue) {
            let c = ConsumerId(pid.as_raw() as u64);
            let held = q.state.in_flight_of(c);
            if held > 0 {
                event(
                    &mut self.log_ring,
                    Level::Warn,
                    &conn.tag,
                    format_args!("{held} job(s) unanswered; back to queue {}", conn.queue),
                );
            }
            let reason = conn.broken.unwrap_or_else(|| death_reason(exit));
            q.state.remove_consumer(c, delivered, &reason);
            q.apply_events();
        }
    }

    /// Once per pass: consumers follow their workers' states, retries come due, job timeouts
    /// stop their workers, pending jobs go out, and what changed is made durable.
    pub(super) fn queues_pass(&mut self, now: Instant) {
        if self.queues.queues.is_empty() {
            return;
        }
        // Who takes jobs: a consumer whose worker runs (ready) and is not being stopped.
        let mut accepting: Vec<(usize, ConsumerId, bool)> = Vec::new();
        for (&pid, conn) in &self.queues.conns {
            let running = self.pool_index(conn.key.pool).is_some_and(|p| {
                let pool = &self.pools[p];
                let slot = pool.slots.get(conn.key.id as usize);
                slot.is_some_and(|s| {
                    matches!(s.state().current(), SlotState::Running { pid: p, .. } if *p == pid)
                }) && !pool.removed
            });
            let ok = running && !conn.closing && conn.broken.is_none() && conn.stdin.is_some();
            if let Some(i) = self
                .queues
                .queues
                .iter()
                .position(|q| q.config.name == conn.queue)
            {
                accepting.push((i, ConsumerId(pid.as_raw() as u64), ok));
            }
        }
        for (i, c, ok) in accepting {
            self.queues.queues[i].state.set_accepting(c, ok);
        }
        // Slots of each consuming program, for the key ring.
        for q in &mut self.queues.queues {
            let n = self
                .pools
                .iter()
                .find(|p| !p.removed && p.program.queue.as_deref() == Some(&q.config.name))
                .map_or(0, |p| p.desired());
            q.state.set_slots(n);
        }
        let mut expired: Vec<Pid> = Vec::new();
        for q in &mut self.queues.queues {
            q.state.wake(now);
            expired.extend(
                q.state
                    .expire(now)
                    .into_iter()
                    .map(|c| Pid::from_raw(c.0 as i32)),
            );
        }
        for pid in expired {
            self.job_timeout(pid, now);
        }
        // What the pass appended goes to disk (one sync asked for all of it); the batches a
        // finished sync covers may go out now.
        let syncer = &mut self.queues.syncer;
        for q in &mut self.queues.queues {
            q.commit(syncer.as_mut(), now);
            if let Some(st) = q.store.as_mut() {
                for t in st.take_sync_times() {
                    self.counters.fsync_seconds.observe(t.as_secs_f64());
                }
            }
        }
        self.watch_syncer();
        // Deliveries.
        let conns = &mut self.queues.conns;
        let mut touched: Vec<Pid> = Vec::new();
        for q in &mut self.queues.queues {
            let max = q.config.max_frame;
            q.state.dispatch(now, |c, job| {
                let pid = Pid::from_raw(c.0 as i32);
                let Some(conn) = conns.get_mut(&pid) else {
                    return;
                };
                let protocol = conn.protocol;
                let start = conn.base + conn.out.len() as u64;
                if encode_job(protocol, &job.payload, max, &mut conn.out).is_err() {
                    // Checked at submit; a reload may have lowered max_frame since. An empty
                    // line or frame keeps the answers in step; the worker's answer decides.
                    let _ = encode_job(protocol, b"", max, &mut conn.out);
                }
                let end = conn.base + conn.out.len() as u64;
                conn.spans.push_back((start, end));
                if touched.last() != Some(&pid) {
                    touched.push(pid);
                }
            });
            q.apply_events();
        }
        touched.sort_unstable();
        touched.dedup();
        for pid in touched {
            self.write_jobs(pid);
        }
        self.remotes_pass(now);
    }

    /// A job overstayed `job_timeout` at the worker `pid`: stop the worker (stop_signal,
    /// then SIGKILL after stop_timeout); its jobs come back when it has exited. A process
    /// already on its way out (the old process of a rolling restart, or one draining after
    /// a stop) only gets its stop signal now: its slot has its SIGKILL due already.
    fn job_timeout(&mut self, pid: Pid, now: Instant) {
        let Some(conn) = self.queues.conns.get(&pid) else {
            return;
        };
        let (key, tag) = (conn.key, Arc::clone(&conn.tag));
        let limit = self
            .queues
            .get(&conn.queue)
            .and_then(|q| q.config.job_timeout)
            .unwrap_or_default();
        event(
            &mut self.log_ring,
            Level::Error,
            &tag,
            format_args!(
                "job timeout after {}; stopping it",
                crate::format_duration(limit)
            ),
        );
        let Some(p) = self.pool_index(key.pool) else {
            return;
        };
        // Its slot restarts it, unless the process is on its way out already: retiring in a
        // rolling restart (the slot's pid is its successor's) or draining after a stop.
        let restart = self.pools[p].slots.get(key.id as usize).is_some_and(|s| {
            s.pid() == Some(pid) && !matches!(s.state().current(), SlotState::Stopping { .. })
        });
        if restart {
            self.stop_now(p, key.id, crate::slot::AfterStop::Restart, now);
        } else if let Some(signal) = self.procs.get(&pid).map(|proc| proc.stop_signal) {
            if let Err(e) = sys::process::signal_group(pid, signal) {
                log::warn!("{tag}: cannot signal process group {pid}: {e}");
            }
        }
    }

    /// Enqueues a batch on `queue` (a client's `submit`).
    pub(super) fn submit(
        &mut self,
        queue: &str,
        key: Option<&[u8]>,
        jobs: Vec<Vec<u8>>,
        watched: bool,
    ) -> Result<(u64, u64), SubmitError> {
        let q = self
            .queues
            .get_mut(queue)
            .ok_or_else(|| SubmitError::NoQueue(queue.to_string()))?;
        q.submit(key, jobs, watched)
    }

    /// Puts dead letters back; `None`: all of them.
    pub(super) fn requeue(&mut self, queue: &str, ids: Option<&[u64]>) -> Result<u64, String> {
        let q = self
            .queues
            .get_mut(queue)
            .ok_or_else(|| format!("no queue named {queue}"))?;
        let n = q
            .state
            .requeue(ids)
            .map_err(|e| format!("queue {queue}: {e}"))?;
        q.apply_events();
        Ok(n)
    }
}

/// The pipes of a consumer about to be spawned.
pub(super) struct ConsumerPipes {
    /// The read end of the job pipe: the child's stdin.
    pub(super) child_stdin: OwnedFd,
    /// The write end of the answer pipe: the child's stdout.
    pub(super) child_stdout: OwnedFd,
    stdin: OwnedFd,
    stdout: OwnedFd,
}

/// How long `queue` counts, for reports.
pub(super) fn report(q: &QueueRt) -> crate::protocol::QueueCounts {
    let c = q.state.counts();
    crate::protocol::QueueCounts {
        name: q.config.name.clone(),
        pending: c.pending,
        in_flight: c.in_flight,
        done: c.done,
        retried: c.retried,
        dead: c.dead,
    }
}
