//! The bookkeeping of one queue, as pure code: where each job is (pending, waiting for a
//! retry, in flight at a worker, dead-lettered), which worker gets the next job, and what an
//! answer, a worker's death or a job timeout does to the jobs it held (SPEC §4, §9).
//!
//! Nothing here reads a clock, touches a pipe or a file: the master passes in the time and
//! what happened, carries out the deliveries [`QueueState::dispatch`] decides, and drains
//! [`QueueState::events`] to record each change (the durable log), answer `submit --wait` and
//! count (metrics).
//!
//! A job is in exactly one place at a time, and moves by value:
//!
//! ```text
//!  submit ──► pending ──dispatch──► in flight at a consumer ──ok──► done (leaves the queue)
//!               ▲  ▲                    │        │
//!               │  └──── redelivery ────┘        ├──fail, attempts left──► retry (backoff) ──┐
//!               │   (worker died, timed out,     └──drop, or fail with none left──► dead     │
//!               │    stopped with it unanswered)                                 │           │
//!               └──────────────────────────── requeue ◄──────────────────────────┘           │
//!               └────────────────────────────── backoff over ◄───────────────────────────────┘
//! ```
//!
//! `attempts` counts the deliveries of a job that ended without `ok`: a `fail` or a `drop`,
//! and every redelivery whatever its cause (the worker died, a protocol error, a job
//! timeout). A job whose attempts reach `max_attempts` is dead-lettered with the last reason.
//!
//! Consumers are worker processes ([`ConsumerId`], the master uses the pid), each in a worker
//! slot of the consuming program (`slot`, the stable worker id). During a rolling restart a
//! slot has two: the old one, no longer accepting, and its successor. Routing by key goes to
//! slots through the [`Ring`], then to the slot's accepting consumer.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use super::ring::{least_loaded, Ring, RoundRobin, WorkerLoad};
use super::wire::{Answer, Outcome};
use crate::config::{Backoff, Queue, Route};

/// A worker process consuming the queue (the master uses its pid).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConsumerId(pub u64);

/// A job of the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub id: u64,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    /// Deliveries that ended without `ok`.
    pub attempts: u32,
    /// Why the last attempt failed.
    pub last_reason: Option<Vec<u8>>,
    /// A client waits for its outcome: [`JobEvent::Done`] and [`JobEvent::Dead`] say so.
    pub watched: bool,
}

/// A dead-lettered job, kept with its reason until it is requeued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadJob {
    pub job: Job,
    pub reason: Vec<u8>,
}

/// What changed, in order, for the master to record and report.
#[derive(Debug, Clone, PartialEq)]
pub enum JobEvent {
    /// Answered `ok`: the job has left the queue.
    Done {
        id: u64,
        result: Vec<u8>,
        watched: bool,
        /// From delivery to answer.
        took: Duration,
    },
    /// Dead-lettered (a `drop`, or the last attempt failed).
    Dead {
        id: u64,
        attempts: u32,
        reason: Vec<u8>,
        watched: bool,
        took: Option<Duration>,
        /// The worker answered `fail` to the last attempt (not `drop`, nor a redelivery).
        failed: bool,
    },
    /// An attempt failed and the job goes back for another (after `retry_backoff` for a
    /// `fail`, at once for a redelivery).
    Attempt {
        id: u64,
        attempts: u32,
        reason: Vec<u8>,
        took: Option<Duration>,
    },
    /// A dead letter is pending again, its attempts back to 0.
    Requeued { id: u64 },
    /// A job was in flight longer than `job_timeout`.
    TimedOut { id: u64 },
}

/// The settings of a queue that its bookkeeping uses.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub prefetch: u32,
    pub max_attempts: u32,
    pub retry_backoff: Backoff,
    pub route: Route,
    pub max_pending: u64,
    pub job_timeout: Option<Duration>,
}

impl From<&Queue> for Settings {
    fn from(q: &Queue) -> Self {
        Settings {
            prefetch: q.prefetch,
            max_attempts: q.max_attempts,
            retry_backoff: q.retry_backoff,
            route: q.route,
            max_pending: q.max_pending,
            job_timeout: q.job_timeout,
        }
    }
}

/// A batch that cannot be taken whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "queue is full: {held} job(s) pending or in flight, max_pending is {max}; \
     this batch of {batch} was refused whole"
)]
pub struct Full {
    pub held: u64,
    pub batch: u64,
    pub max: u64,
}

/// An answer from a worker that holds no job: a protocol error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("more answers than jobs in flight (an answer came while it held none)")]
pub struct NothingInFlight;

/// A `requeue` naming something that is not a dead letter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no dead letter with id {0}")]
pub struct NotDead(pub u64);

#[derive(Debug, Clone)]
struct InFlight {
    job: Job,
    since: Instant,
}

#[derive(Debug, Clone)]
struct Consumer {
    slot: u32,
    accepting: bool,
    in_flight: VecDeque<InFlight>,
    /// When the oldest unanswered job became the oldest (job_timeout counts from there).
    head_since: Option<Instant>,
    /// The head job overstayed `job_timeout`: the worker is being stopped.
    timed_out: bool,
}

/// Counters since the queue was made in this master.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub pending: u64,
    pub in_flight: u64,
    pub done: u64,
    pub retried: u64,
    pub dead: u64,
}

/// One queue's jobs and consumers.
#[derive(Debug)]
pub struct QueueState {
    settings: Settings,
    /// Ready to deliver, oldest first (redeliveries go to the front).
    pending: VecDeque<Job>,
    /// Key-routed jobs whose worker was full, by slot: it takes them first when it has room.
    parked: BTreeMap<u32, VecDeque<Job>>,
    parked_len: usize,
    /// Failed jobs waiting for their retry, by when.
    retry: BTreeSet<(Instant, u64)>,
    retry_jobs: HashMap<u64, Job>,
    dead: BTreeMap<u64, DeadJob>,
    consumers: BTreeMap<ConsumerId, Consumer>,
    /// The worker slots of the consuming program, for `route = "key"`.
    ring: Ring,
    slots: u32,
    round_robin: RoundRobin,
    in_flight: usize,
    /// Jobs with an id at or above this may not be delivered yet (a durable queue's
    /// submissions not yet on disk).
    deliverable_below: u64,
    next_id: u64,
    done: u64,
    retried: u64,
    events: Vec<JobEvent>,
}

impl QueueState {
    pub fn new(settings: Settings) -> Self {
        QueueState {
            settings,
            pending: VecDeque::new(),
            parked: BTreeMap::new(),
            parked_len: 0,
            retry: BTreeSet::new(),
            retry_jobs: HashMap::new(),
            dead: BTreeMap::new(),
            consumers: BTreeMap::new(),
            ring: Ring::default(),
            slots: 0,
            round_robin: RoundRobin::new(),
            in_flight: 0,
            deliverable_below: u64::MAX,
            next_id: 1,
            done: 0,
            retried: 0,
            events: Vec::new(),
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// New settings (a reload): they apply to what happens from now on.
    pub fn set_settings(&mut self, settings: Settings) {
        self.settings = settings;
    }

    /// Takes back what a durable queue held when the master last stopped: pending jobs go to
    /// the queue in submission order, dead ones to the dead letters.
    pub fn restore(&mut self, jobs: Vec<Job>, dead: Vec<DeadJob>, next_id: u64) {
        self.pending.extend(jobs);
        for d in dead {
            self.dead.insert(d.job.id, d);
        }
        self.next_id = self.next_id.max(next_id);
    }

    /// The id the next submitted job gets.
    pub fn next_id(&self) -> u64 {
        self.next_id
    }

    /// Jobs with an id at or above `id` are held back from delivery (not yet durable).
    pub fn set_deliverable_below(&mut self, id: u64) {
        self.deliverable_below = id;
    }

    /// Jobs pending or in flight: what `max_pending` bounds.
    pub fn held(&self) -> u64 {
        (self.pending.len() + self.parked_len + self.retry_jobs.len() + self.in_flight) as u64
    }

    /// Whether a batch of `count` jobs fits under `max_pending`.
    pub fn admit(&self, count: u64) -> Result<(), Full> {
        let held = self.held();
        if held.saturating_add(count) > self.settings.max_pending {
            return Err(Full {
                held,
                batch: count,
                max: self.settings.max_pending,
            });
        }
        Ok(())
    }

    /// Enqueues a batch (after [`QueueState::admit`]); returns the id of its first job. The
    /// batch's ids are consecutive.
    pub fn submit(
        &mut self,
        key: Option<&[u8]>,
        payloads: impl IntoIterator<Item = Vec<u8>>,
        watched: bool,
    ) -> u64 {
        let first = self.next_id;
        for payload in payloads {
            self.pending.push_back(Job {
                id: self.next_id,
                key: key.map(<[u8]>::to_vec),
                payload,
                attempts: 0,
                last_reason: None,
                watched,
            });
            self.next_id += 1;
        }
        first
    }

    /// Forgets the jobs with ids in `first..end` that are still pending: their submission
    /// failed (the durable log could not store them), and they were never delivered.
    pub fn forget(&mut self, first: u64, end: u64) {
        self.pending.retain(|j| !(first..end).contains(&j.id));
    }

    /// A worker process of slot `slot` will consume the queue; it gets jobs once accepting.
    pub fn add_consumer(&mut self, c: ConsumerId, slot: u32) {
        self.consumers.insert(
            c,
            Consumer {
                slot,
                accepting: false,
                in_flight: VecDeque::new(),
                head_since: None,
                timed_out: false,
            },
        );
    }

    /// Whether the consumer takes new jobs (its worker runs, and is not being stopped).
    pub fn set_accepting(&mut self, c: ConsumerId, accepting: bool) {
        let Some(con) = self.consumers.get_mut(&c) else {
            return;
        };
        let accepting = accepting && !con.timed_out;
        if con.accepting == accepting {
            return;
        }
        con.accepting = accepting;
        let slot = con.slot;
        if !accepting {
            self.unpark_if_down(slot);
        }
    }

    /// Whether some consumer takes jobs now.
    pub fn has_consumers(&self) -> bool {
        self.consumers.values().any(|c| c.accepting)
    }

    pub fn is_accepting(&self, c: ConsumerId) -> bool {
        self.consumers.get(&c).is_some_and(|c| c.accepting)
    }

    /// The consuming program has `n` worker slots (the key ring follows).
    pub fn set_slots(&mut self, n: u32) {
        if n == self.slots && self.ring.len() == n as usize {
            return;
        }
        for id in n..self.slots {
            self.ring.remove(id);
        }
        for id in self.slots.min(n)..n {
            self.ring.add(id);
        }
        if self.ring.len() != n as usize {
            self.ring = Ring::new(0..n);
        }
        self.slots = n;
        let gone: Vec<u32> = self.parked.range(n..).map(|(&s, _)| s).collect();
        for slot in gone {
            self.unpark(slot);
        }
    }

    /// Jobs parked for `slot` go back to the front of the queue when no consumer of the slot
    /// accepts jobs any more: they are routed again (to the next live worker on the ring).
    fn unpark_if_down(&mut self, slot: u32) {
        if !self.slot_live(slot) {
            self.unpark(slot);
        }
    }

    fn unpark(&mut self, slot: u32) {
        if let Some(jobs) = self.parked.remove(&slot) {
            self.parked_len -= jobs.len();
            for job in jobs.into_iter().rev() {
                self.pending.push_front(job);
            }
        }
    }

    fn slot_live(&self, slot: u32) -> bool {
        self.consumers
            .values()
            .any(|c| c.slot == slot && c.accepting)
    }

    /// The accepting consumer of `slot`, if any.
    fn consumer_of_slot(&self, slot: u32) -> Option<ConsumerId> {
        self.consumers
            .iter()
            .find(|(_, c)| c.slot == slot && c.accepting)
            .map(|(&id, _)| id)
    }

    fn has_room(&self, c: ConsumerId) -> bool {
        self.consumers
            .get(&c)
            .is_some_and(|c| c.accepting && c.in_flight.len() < self.settings.prefetch as usize)
    }

    /// Hands out the pending jobs the consumers have room for, in queue order, each through
    /// `deliver` (which writes it to the worker). Returns how many were delivered.
    pub fn dispatch(&mut self, now: Instant, mut deliver: impl FnMut(ConsumerId, &Job)) -> usize {
        let mut count = 0;
        if self.consumers.is_empty() {
            return 0;
        }
        // Parked jobs first: they are older than anything still pending for their slot.
        if self.parked_len > 0 {
            let slots: Vec<u32> = self.parked.keys().copied().collect();
            for slot in slots {
                let Some(c) = self.consumer_of_slot(slot) else {
                    continue;
                };
                while self.has_room(c) {
                    let Some(job) = self.parked.get_mut(&slot).and_then(VecDeque::pop_front) else {
                        break;
                    };
                    self.parked_len -= 1;
                    self.deliver(c, job, now, &mut deliver);
                    count += 1;
                }
                if self.parked.get(&slot).is_some_and(VecDeque::is_empty) {
                    self.parked.remove(&slot);
                }
            }
        }
        let mut loads: Vec<WorkerLoad> = Vec::new();
        let mut ids: Vec<u64> = Vec::new();
        while let Some(job) = self.pending.front() {
            if job.id >= self.deliverable_below {
                break;
            }
            let keyed = self.settings.route == Route::Key && job.key.is_some();
            let target = if keyed {
                let key = job.key.as_deref().unwrap_or_default();
                let slot = self.ring.route(key, |s| self.slot_live(s));
                match slot.and_then(|s| self.consumer_of_slot(s)) {
                    Some(c) if self.has_room(c) => Some(c),
                    Some(c) => {
                        // Its worker is busy: park it there, and go on with the others.
                        let slot = self.consumers[&c].slot;
                        let job = self.pending.pop_front().expect("front exists");
                        self.parked.entry(slot).or_default().push_back(job);
                        self.parked_len += 1;
                        continue;
                    }
                    None => break,
                }
            } else {
                self.choose(&mut loads, &mut ids)
            };
            let Some(c) = target else {
                break;
            };
            let job = self.pending.pop_front().expect("front exists");
            self.deliver(c, job, now, &mut deliver);
            count += 1;
        }
        count
    }

    /// The consumer for an unkeyed job under the queue's route, among those with room.
    fn choose(&mut self, loads: &mut Vec<WorkerLoad>, ids: &mut Vec<u64>) -> Option<ConsumerId> {
        let prefetch = self.settings.prefetch as usize;
        match self.settings.route {
            Route::RoundRobin => {
                // Turns go by worker slot, which a worker keeps across restarts: a position
                // among the consumers would shift when a restarted worker's new process sorts
                // elsewhere, and serve one worker twice in a row.
                let open = |c: &Consumer| c.accepting && c.in_flight.len() < prefetch;
                let slots: Vec<u32> = self.consumers.values().map(|c| c.slot).collect();
                let consumers = &self.consumers;
                let slot = self.round_robin.next(&slots, |s| {
                    consumers.values().any(|c| c.slot == s && open(c))
                })?;
                consumers
                    .iter()
                    .find(|(_, c)| c.slot == slot && open(c))
                    .map(|(&id, _)| id)
            }
            Route::LeastLoaded | Route::Key => {
                loads.clear();
                ids.clear();
                for (id, c) in &self.consumers {
                    if c.accepting {
                        loads.push(WorkerLoad {
                            id: ids.len() as u32,
                            in_flight: c.in_flight.len(),
                            prefetch,
                        });
                        ids.push(id.0);
                    }
                }
                let i = least_loaded(loads)?;
                Some(ConsumerId(ids[i as usize]))
            }
        }
    }

    fn deliver(
        &mut self,
        c: ConsumerId,
        job: Job,
        now: Instant,
        deliver: &mut impl FnMut(ConsumerId, &Job),
    ) {
        deliver(c, &job);
        let con = self.consumers.get_mut(&c).expect("consumer exists");
        if con.in_flight.is_empty() {
            con.head_since = Some(now);
        }
        con.in_flight.push_back(InFlight { job, since: now });
        self.in_flight += 1;
    }

    /// A consumer answered its oldest job. `jitter` is a sample in [-1, 1] for the retry
    /// delay.
    pub fn answer(
        &mut self,
        c: ConsumerId,
        answer: Answer,
        now: Instant,
        jitter: f64,
    ) -> Result<(), NothingInFlight> {
        let con = self.consumers.get_mut(&c).ok_or(NothingInFlight)?;
        let InFlight { mut job, since } = con.in_flight.pop_front().ok_or(NothingInFlight)?;
        con.head_since = if con.in_flight.is_empty() {
            None
        } else {
            Some(now)
        };
        self.in_flight -= 1;
        let took = now.saturating_duration_since(since);
        match answer.outcome {
            Outcome::Ok => {
                self.done += 1;
                self.events.push(JobEvent::Done {
                    id: job.id,
                    result: answer.text,
                    watched: job.watched,
                    took,
                });
            }
            Outcome::Drop => {
                // A delivery that ended without `ok`: it counts, like a `fail`.
                job.attempts = job.attempts.saturating_add(1);
                self.kill(job, answer.text, Some(took), false)
            }
            Outcome::Fail => {
                job.attempts = job.attempts.saturating_add(1);
                if job.attempts >= self.settings.max_attempts {
                    self.kill(job, answer.text, Some(took), true);
                } else {
                    let delay =
                        crate::backoff::delay(&self.settings.retry_backoff, job.attempts, jitter);
                    self.events.push(JobEvent::Attempt {
                        id: job.id,
                        attempts: job.attempts,
                        reason: answer.text.clone(),
                        took: Some(took),
                    });
                    job.last_reason = Some(answer.text);
                    self.retried += 1;
                    self.retry.insert((now + delay, job.id));
                    self.retry_jobs.insert(job.id, job);
                }
            }
        }
        Ok(())
    }

    fn kill(&mut self, mut job: Job, reason: Vec<u8>, took: Option<Duration>, failed: bool) {
        self.events.push(JobEvent::Dead {
            id: job.id,
            attempts: job.attempts,
            reason: reason.clone(),
            watched: job.watched,
            took,
            failed,
        });
        job.last_reason = Some(reason.clone());
        self.dead.insert(job.id, DeadJob { job, reason });
    }

    /// The consumer's jobs after its first `keep` go back to the front of the queue without
    /// counting an attempt: they were never written to the worker (it is being stopped, and
    /// its stdin closes once the first `keep` are written).
    pub fn take_back(&mut self, c: ConsumerId, keep: usize) {
        let Some(con) = self.consumers.get_mut(&c) else {
            return;
        };
        let back: Vec<InFlight> = con
            .in_flight
            .drain(keep.min(con.in_flight.len())..)
            .collect();
        if con.in_flight.is_empty() {
            con.head_since = None;
        }
        self.in_flight -= back.len();
        for f in back.into_iter().rev() {
            self.pending.push_front(f.job);
        }
    }

    /// The consumer is gone (its worker exited, or was killed). Of its unanswered jobs, the
    /// first `delivered` were written to it, at least in part: each counts an attempt with
    /// `reason` (the head job, when it timed out, with its timeout), and is redelivered or,
    /// with no attempt left, dead-lettered. The rest go back as they were.
    pub fn remove_consumer(&mut self, c: ConsumerId, delivered: usize, reason: &str) {
        let Some(con) = self.consumers.remove(&c) else {
            return;
        };
        let slot = con.slot;
        self.in_flight -= con.in_flight.len();
        let timeout = self.timeout_reason();
        let mut back = Vec::new();
        for (i, InFlight { mut job, .. }) in con.in_flight.into_iter().enumerate() {
            if i >= delivered {
                back.push(job);
                continue;
            }
            let why = match (&timeout, i == 0 && con.timed_out) {
                (Some(t), true) => t.clone(),
                _ => reason.to_string(),
            }
            .into_bytes();
            job.attempts = job.attempts.saturating_add(1);
            let took = None;
            if job.attempts >= self.settings.max_attempts {
                self.kill(job, why, took, false);
            } else {
                self.events.push(JobEvent::Attempt {
                    id: job.id,
                    attempts: job.attempts,
                    reason: why.clone(),
                    took,
                });
                job.last_reason = Some(why);
                self.retried += 1;
                back.push(job);
            }
        }
        for job in back.into_iter().rev() {
            self.pending.push_front(job);
        }
        self.unpark_if_down(slot);
    }

    fn timeout_reason(&self) -> Option<String> {
        self.settings
            .job_timeout
            .map(|t| format!("job timeout after {}", crate::format_duration(t)))
    }

    /// Jobs whose retry delay is over go back to the front of the queue. Returns how many.
    pub fn wake(&mut self, now: Instant) -> usize {
        let mut woken = Vec::new();
        while let Some(&(at, id)) = self.retry.first() {
            if at > now {
                break;
            }
            self.retry.pop_first();
            if let Some(job) = self.retry_jobs.remove(&id) {
                woken.push(job);
            }
        }
        let n = woken.len();
        for job in woken.into_iter().rev() {
            self.pending.push_front(job);
        }
        n
    }

    /// Consumers whose oldest job has been in flight longer than `job_timeout`: each is marked
    /// timed out (it takes no more jobs) and returned, for the master to stop its worker.
    pub fn expire(&mut self, now: Instant) -> Vec<ConsumerId> {
        let Some(limit) = self.settings.job_timeout else {
            return Vec::new();
        };
        let mut expired = Vec::new();
        for (&id, c) in &mut self.consumers {
            if c.timed_out {
                continue;
            }
            if let (Some(since), Some(head)) = (c.head_since, c.in_flight.front()) {
                if now.saturating_duration_since(since) >= limit {
                    c.timed_out = true;
                    c.accepting = false;
                    self.events.push(JobEvent::TimedOut { id: head.job.id });
                    expired.push(id);
                }
            }
        }
        for c in &expired {
            let slot = self.consumers[c].slot;
            self.unpark_if_down(slot);
        }
        expired
    }

    /// When this queue next needs the master without any event: a retry due, a job timeout.
    pub fn deadline(&self) -> Option<Instant> {
        let mut at = self.retry.first().map(|&(t, _)| t);
        if let Some(limit) = self.settings.job_timeout {
            for c in self.consumers.values().filter(|c| !c.timed_out) {
                if let Some(since) = c.head_since {
                    let t = since + limit;
                    at = Some(at.map_or(t, |a| a.min(t)));
                }
            }
        }
        at
    }

    /// Puts dead letters back in the queue (all of them with `ids` = `None`), attempts at 0.
    /// Every id must be a dead letter, else nothing is requeued.
    pub fn requeue(&mut self, ids: Option<&[u64]>) -> Result<u64, NotDead> {
        let chosen: Vec<u64> = match ids {
            None => self.dead.keys().copied().collect(),
            Some(ids) => {
                if let Some(&missing) = ids.iter().find(|id| !self.dead.contains_key(id)) {
                    return Err(NotDead(missing));
                }
                let mut ids = ids.to_vec();
                ids.sort_unstable();
                ids.dedup();
                ids
            }
        };
        for id in &chosen {
            if let Some(DeadJob { mut job, .. }) = self.dead.remove(id) {
                job.attempts = 0;
                job.watched = false;
                self.events.push(JobEvent::Requeued { id: *id });
                self.pending.push_back(job);
            }
        }
        Ok(chosen.len() as u64)
    }

    /// Takes out the jobs not delivered (waiting, parked, or waiting for a retry) that `give`
    /// picks: a queue fed from elsewhere gives them back there.
    pub fn take_waiting(&mut self, mut give: impl FnMut(&Job) -> bool) -> Vec<Job> {
        let mut out = Vec::new();
        let mut keep = VecDeque::with_capacity(self.pending.len());
        for job in self.pending.drain(..) {
            if give(&job) {
                out.push(job);
            } else {
                keep.push_back(job);
            }
        }
        self.pending = keep;
        for list in self.parked.values_mut() {
            let before = list.len();
            let mut kept = VecDeque::with_capacity(before);
            for job in list.drain(..) {
                if give(&job) {
                    out.push(job);
                } else {
                    kept.push_back(job);
                }
            }
            self.parked_len -= before - kept.len();
            *list = kept;
        }
        self.parked.retain(|_, l| !l.is_empty());
        let retrying: std::collections::HashSet<u64> = self
            .retry_jobs
            .iter()
            .filter(|(_, j)| give(j))
            .map(|(id, _)| *id)
            .collect();
        if !retrying.is_empty() {
            self.retry.retain(|(_, id)| !retrying.contains(id));
            for id in retrying {
                out.extend(self.retry_jobs.remove(&id));
            }
        }
        out
    }

    /// Lets a dead letter go: it is kept elsewhere (a queue in Redis keeps its dead letters
    /// there).
    pub fn forget_dead(&mut self, id: u64) {
        self.dead.remove(&id);
    }

    /// How many jobs the accepting consumers can hold at once (`prefetch` each).
    pub fn capacity(&self) -> u64 {
        let accepting = self.consumers.values().filter(|c| c.accepting).count() as u64;
        accepting * u64::from(self.settings.prefetch)
    }

    /// How many more jobs the accepting consumers could take now, plus `extra`, beyond the
    /// jobs already waiting for them (a queue fed from elsewhere asks for that many).
    pub fn room(&self, extra: u64) -> u64 {
        let prefetch = self.settings.prefetch as usize;
        let free: usize = self
            .consumers
            .values()
            .filter(|c| c.accepting)
            .map(|c| prefetch.saturating_sub(c.in_flight.len()))
            .sum();
        (free as u64 + extra).saturating_sub((self.pending.len() + self.parked_len) as u64)
    }

    /// The dead letters, oldest first.
    pub fn dead(&self) -> impl Iterator<Item = &DeadJob> {
        self.dead.values()
    }

    /// Jobs in flight at consumer `c`.
    pub fn in_flight_of(&self, c: ConsumerId) -> usize {
        self.consumers.get(&c).map_or(0, |c| c.in_flight.len())
    }

    pub fn counts(&self) -> Counts {
        Counts {
            pending: (self.pending.len() + self.parked_len + self.retry_jobs.len()) as u64,
            in_flight: self.in_flight as u64,
            done: self.done,
            retried: self.retried,
            dead: self.dead.len() as u64,
        }
    }

    /// What changed since the last call, in order.
    pub fn events(&mut self) -> std::vec::Drain<'_, JobEvent> {
        self.events.drain(..)
    }

    /// Every job held (pending, waiting for a retry, in flight), for a check of the
    /// invariants in tests: each id once.
    #[cfg(test)]
    fn all_ids(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self
            .pending
            .iter()
            .chain(self.parked.values().flatten())
            .chain(self.retry_jobs.values())
            .map(|j| j.id)
            .chain(
                self.consumers
                    .values()
                    .flat_map(|c| c.in_flight.iter().map(|f| f.job.id)),
            )
            .collect();
        ids.sort_unstable();
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(route: Route, prefetch: u32) -> Settings {
        Settings {
            prefetch,
            max_attempts: 3,
            retry_backoff: Backoff {
                initial: Duration::from_secs(1),
                max: Duration::from_secs(60),
                multiplier: 2.0,
                jitter: 0.0,
            },
            route,
            max_pending: 1000,
            job_timeout: None,
        }
    }

    fn ok(text: &str) -> Answer {
        Answer {
            outcome: Outcome::Ok,
            text: text.into(),
        }
    }

    fn fail(text: &str) -> Answer {
        Answer {
            outcome: Outcome::Fail,
            text: text.into(),
        }
    }

    fn jobs(n: usize) -> Vec<Vec<u8>> {
        (0..n).map(|i| format!("job{i}").into_bytes()).collect()
    }

    #[test]
    fn room_is_the_free_prefetch_of_accepting_consumers_less_what_waits() {
        let mut q = QueueState::new(settings(Route::LeastLoaded, 4));
        q.add_consumer(ConsumerId(1), 0);
        q.add_consumer(ConsumerId(2), 1);
        assert_eq!((q.capacity(), q.room(0)), (0, 0), "nobody accepts yet");
        q.set_accepting(ConsumerId(1), true);
        q.set_accepting(ConsumerId(2), true);
        assert_eq!((q.capacity(), q.room(0), q.room(8)), (8, 8, 16));
        q.submit(None, jobs(3), false);
        assert_eq!(q.room(0), 5, "three wait for a worker");
        dispatch(&mut q, Instant::now());
        assert_eq!(q.room(0), 5, "three are in flight");
        q.submit(None, jobs(10), false);
        assert_eq!((q.room(0), q.room(8)), (0, 3));
    }

    #[test]
    fn jobs_not_delivered_can_be_taken_out_in_flight_ones_stay() {
        let mut q = QueueState::new(settings(Route::LeastLoaded, 2));
        q.add_consumer(ConsumerId(1), 0);
        q.set_accepting(ConsumerId(1), true);
        q.submit(None, jobs(5), false);
        dispatch(&mut q, Instant::now());
        let held = q.held();
        assert_eq!((held, q.counts().in_flight), (5, 2));
        let odd = q.take_waiting(|j| j.id % 2 == 1);
        assert_eq!(odd.iter().map(|j| j.id).collect::<Vec<_>>(), vec![3, 5]);
        assert_eq!((q.held(), q.counts().pending), (3, 1));
        let rest = q.take_waiting(|_| true);
        assert_eq!(rest.iter().map(|j| j.id).collect::<Vec<_>>(), vec![4]);
        assert_eq!((q.held(), q.counts().in_flight), (2, 2));
    }

    /// Delivers and returns (consumer, job id) pairs.
    fn dispatch(q: &mut QueueState, now: Instant) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        q.dispatch(now, |c, j| out.push((c.0, j.id)));
        out
    }

    fn with_consumers(route: Route, prefetch: u32, n: u64) -> QueueState {
        let mut q = QueueState::new(settings(route, prefetch));
        q.set_slots(n as u32);
        for i in 0..n {
            q.add_consumer(ConsumerId(100 + i), i as u32);
            q.set_accepting(ConsumerId(100 + i), true);
        }
        q
    }

    #[test]
    fn least_loaded_spreads_jobs_and_respects_prefetch() {
        let now = Instant::now();
        let mut q = with_consumers(Route::LeastLoaded, 2, 2);
        q.submit(None, jobs(5), false);
        let got = dispatch(&mut q, now);
        assert_eq!(got, [(100, 1), (101, 2), (100, 3), (101, 4)]);
        assert_eq!(q.counts().pending, 1);
        assert_eq!(q.counts().in_flight, 4);
        q.answer(ConsumerId(101), ok("r"), now, 0.0).unwrap();
        assert_eq!(dispatch(&mut q, now), [(101, 5)]);
        assert_eq!(q.counts().done, 1);
    }

    #[test]
    fn round_robin_takes_turns() {
        let now = Instant::now();
        let mut q = with_consumers(Route::RoundRobin, 10, 3);
        q.submit(None, jobs(6), false);
        let who: Vec<u64> = dispatch(&mut q, now).into_iter().map(|p| p.0).collect();
        assert_eq!(who, [100, 101, 102, 100, 101, 102]);
    }

    #[test]
    fn round_robin_keeps_its_turns_when_a_worker_restarts() {
        let now = Instant::now();
        let mut q = with_consumers(Route::RoundRobin, 10, 3);
        q.submit(None, jobs(2), false);
        let who: Vec<u64> = dispatch(&mut q, now).into_iter().map(|p| p.0).collect();
        assert_eq!(who, [100, 101]);
        // Worker 2 restarts: its new process (pid 5) sorts first. Its turn comes next all the
        // same, and worker 1 is not served twice in a row.
        q.remove_consumer(ConsumerId(102), 0, "restarted");
        q.add_consumer(ConsumerId(5), 2);
        q.set_accepting(ConsumerId(5), true);
        q.submit(None, jobs(3), false);
        let who: Vec<u64> = dispatch(&mut q, now).into_iter().map(|p| p.0).collect();
        assert_eq!(who, [5, 100, 101]);
    }

    #[test]
    fn answers_come_in_order_and_an_extra_one_is_an_error() {
        let now = Instant::now();
        let mut q = with_consumers(Route::LeastLoaded, 2, 1);
        q.submit(None, jobs(2), true);
        dispatch(&mut q, now);
        q.answer(ConsumerId(100), ok("a"), now, 0.0).unwrap();
        q.answer(ConsumerId(100), ok("b"), now, 0.0).unwrap();
        assert_eq!(
            q.answer(ConsumerId(100), ok("c"), now, 0.0),
            Err(NothingInFlight)
        );
        let done: Vec<(u64, Vec<u8>, bool)> = q
            .events()
            .filter_map(|e| match e {
                JobEvent::Done {
                    id,
                    result,
                    watched,
                    ..
                } => Some((id, result, watched)),
                _ => None,
            })
            .collect();
        assert_eq!(done, [(1, b"a".to_vec(), true), (2, b"b".to_vec(), true)]);
    }

    #[test]
    fn fail_retries_after_backoff_then_dead_letters() {
        let t = Instant::now();
        let mut q = with_consumers(Route::LeastLoaded, 1, 1);
        q.submit(None, jobs(1), false);
        let c = ConsumerId(100);
        // Attempt 1 fails: retry after 1s; attempt 2 fails: after 2s; attempt 3: dead.
        let mut now = t;
        for (attempt, delay) in [(1, 1), (2, 2)] {
            assert_eq!(dispatch(&mut q, now).len(), 1, "attempt {attempt}");
            q.answer(c, fail("boom"), now, 0.0).unwrap();
            assert_eq!(q.deadline(), Some(now + Duration::from_secs(delay)));
            assert_eq!(
                q.wake(now + Duration::from_secs(delay) - Duration::from_millis(1)),
                0
            );
            now += Duration::from_secs(delay);
            assert_eq!(q.wake(now), 1);
        }
        dispatch(&mut q, now);
        q.events().for_each(drop);
        q.answer(c, fail("boom"), now, 0.0).unwrap();
        assert!(
            matches!(
                q.events().collect::<Vec<_>>()[..],
                [JobEvent::Dead {
                    attempts: 3,
                    failed: true,
                    ..
                }]
            ),
            "the last fail is told apart from a drop"
        );
        assert_eq!(q.counts().dead, 1);
        assert_eq!(q.counts().retried, 2);
        assert_eq!(q.held(), 0);
        let dead: Vec<&DeadJob> = q.dead().collect();
        assert_eq!(dead[0].reason, b"boom");
        assert_eq!(dead[0].job.attempts, 3);
        // Requeue: pending again with attempts 0.
        assert_eq!(q.requeue(Some(&[2])), Err(NotDead(2)));
        assert_eq!(q.requeue(None), Ok(1));
        assert_eq!(q.counts().dead, 0);
        assert_eq!(q.counts().pending, 1);
        assert_eq!(q.pending[0].attempts, 0);
    }

    #[test]
    fn drop_dead_letters_at_once() {
        let now = Instant::now();
        let mut q = with_consumers(Route::LeastLoaded, 1, 1);
        q.submit(None, jobs(1), true);
        dispatch(&mut q, now);
        let drop = Answer {
            outcome: Outcome::Drop,
            text: b"bad input".to_vec(),
        };
        q.answer(ConsumerId(100), drop, now, 0.0).unwrap();
        let ev: Vec<JobEvent> = q.events().collect();
        assert!(matches!(
            &ev[..],
            [JobEvent::Dead {
                id: 1,
                attempts: 1,
                watched: true,
                failed: false,
                ..
            }]
        ));
    }

    #[test]
    fn a_dead_worker_s_jobs_are_redelivered_with_an_attempt_counted() {
        let now = Instant::now();
        let mut q = with_consumers(Route::LeastLoaded, 3, 2);
        q.submit(None, jobs(6), false);
        dispatch(&mut q, now);
        // Consumer 100 holds 1, 3, 5; two were written, the third not yet.
        q.remove_consumer(ConsumerId(100), 2, "worker exited (code 1)");
        assert_eq!(q.counts().in_flight, 3);
        assert_eq!(q.counts().pending, 3);
        assert_eq!(q.counts().retried, 2);
        let attempts: Vec<(u64, u32)> = q.pending.iter().map(|j| (j.id, j.attempts)).collect();
        assert_eq!(attempts, [(1, 1), (3, 1), (5, 0)]);
        // They go to the other worker when it has room.
        q.answer(ConsumerId(101), ok(""), now, 0.0).unwrap();
        assert_eq!(dispatch(&mut q, now), [(101, 1)]);
        assert_eq!(q.all_ids(), [1, 3, 4, 5, 6]);
    }

    #[test]
    fn redeliveries_exhaust_attempts_too() {
        let now = Instant::now();
        let mut q = with_consumers(Route::LeastLoaded, 1, 1);
        q.submit(None, jobs(1), false);
        for i in 0..3u64 {
            let c = ConsumerId(100 + i);
            if i > 0 {
                q.add_consumer(c, 0);
                q.set_accepting(c, true);
            }
            assert_eq!(dispatch(&mut q, now).len(), 1);
            q.remove_consumer(c, 1, "worker killed by KILL");
        }
        assert_eq!(q.counts().dead, 1);
        assert_eq!(q.dead().next().unwrap().reason, b"worker killed by KILL");
    }

    #[test]
    fn stopping_a_worker_takes_back_what_it_was_never_sent() {
        let now = Instant::now();
        let mut q = with_consumers(Route::LeastLoaded, 4, 1);
        q.submit(None, jobs(4), false);
        dispatch(&mut q, now);
        q.set_accepting(ConsumerId(100), false);
        q.take_back(ConsumerId(100), 1);
        assert_eq!(q.in_flight_of(ConsumerId(100)), 1);
        let pending: Vec<(u64, u32)> = q.pending.iter().map(|j| (j.id, j.attempts)).collect();
        assert_eq!(pending, [(2, 0), (3, 0), (4, 0)]);
        assert_eq!(dispatch(&mut q, now), []);
    }

    #[test]
    fn job_timeout_counts_from_the_head_and_stops_the_worker() {
        let t = Instant::now();
        let mut s = settings(Route::LeastLoaded, 2);
        s.job_timeout = Some(Duration::from_secs(5));
        let mut q = QueueState::new(s);
        q.set_slots(1);
        let c = ConsumerId(7);
        q.add_consumer(c, 0);
        q.set_accepting(c, true);
        q.submit(None, jobs(2), false);
        dispatch(&mut q, t);
        assert_eq!(q.deadline(), Some(t + Duration::from_secs(5)));
        // The first is answered at 4s: the second becomes the head then.
        q.answer(c, ok(""), t + Duration::from_secs(4), 0.0)
            .unwrap();
        assert_eq!(q.deadline(), Some(t + Duration::from_secs(9)));
        assert!(q.expire(t + Duration::from_secs(8)).is_empty());
        assert_eq!(q.expire(t + Duration::from_secs(9)), [c]);
        assert!(!q.is_accepting(c));
        q.set_accepting(c, true);
        assert!(!q.is_accepting(c), "a timed-out worker takes no new job");
        q.remove_consumer(c, 1, "worker stopped");
        assert_eq!(
            q.pending[0].last_reason.as_deref(),
            Some(&b"job timeout after 5s"[..])
        );
        assert_eq!(q.pending[0].attempts, 1);
    }

    #[test]
    fn max_pending_refuses_a_batch_whole() {
        let mut q = QueueState::new(Settings {
            max_pending: 10,
            ..settings(Route::LeastLoaded, 1)
        });
        q.admit(10).unwrap();
        q.submit(None, jobs(8), false);
        assert_eq!(
            q.admit(3),
            Err(Full {
                held: 8,
                batch: 3,
                max: 10
            })
        );
        q.admit(2).unwrap();
    }

    #[test]
    fn jobs_not_yet_durable_are_held_back() {
        let now = Instant::now();
        let mut q = with_consumers(Route::LeastLoaded, 10, 1);
        let first = q.submit(None, jobs(3), false);
        q.set_deliverable_below(first + 2);
        assert_eq!(dispatch(&mut q, now).len(), 2);
        q.set_deliverable_below(first + 3);
        assert_eq!(dispatch(&mut q, now).len(), 1);
        // A failed batch is forgotten.
        let second = q.submit(None, jobs(2), false);
        q.forget(second, second + 2);
        assert_eq!(q.counts().pending, 0);
    }

    #[test]
    fn keyed_jobs_stick_to_their_worker_and_park_when_it_is_busy() {
        let now = Instant::now();
        let mut q = with_consumers(Route::Key, 1, 3);
        for _ in 0..3 {
            q.submit(Some(b"user-42"), jobs(1), false);
        }
        q.submit(None, jobs(1), false);
        let got = dispatch(&mut q, now);
        // One keyed job goes out, the other two park for that worker; the unkeyed one goes
        // least-loaded to another worker.
        assert_eq!(got.len(), 2);
        let keyed_to = got[0].0;
        assert_ne!(got[1].0, keyed_to);
        assert_eq!(q.counts().pending, 2);
        for _ in 0..2 {
            q.answer(ConsumerId(keyed_to), ok(""), now, 0.0).unwrap();
            let next = dispatch(&mut q, now);
            assert_eq!(next.len(), 1);
            assert_eq!(next[0].0, keyed_to, "same key, same worker");
        }
    }

    #[test]
    fn a_keyed_job_whose_worker_is_down_goes_to_the_next_live_one() {
        let now = Instant::now();
        let mut q = with_consumers(Route::Key, 10, 3);
        q.submit(Some(b"k"), jobs(1), false);
        let first = dispatch(&mut q, now)[0].0;
        q.answer(ConsumerId(first), ok(""), now, 0.0).unwrap();
        q.set_accepting(ConsumerId(first), false);
        q.submit(Some(b"k"), jobs(1), false);
        let second = dispatch(&mut q, now)[0].0;
        assert_ne!(second, first);
        // Back up: the key comes back.
        q.set_accepting(ConsumerId(first), true);
        q.submit(Some(b"k"), jobs(1), false);
        assert_eq!(dispatch(&mut q, now)[0].0, first);
    }

    #[test]
    fn parked_jobs_are_routed_again_when_their_worker_goes_down() {
        let now = Instant::now();
        let mut q = with_consumers(Route::Key, 1, 2);
        for _ in 0..3 {
            q.submit(Some(b"k"), jobs(1), false);
        }
        let got = dispatch(&mut q, now);
        let owner = ConsumerId(got[0].0);
        q.remove_consumer(owner, 1, "worker exited");
        let rest = dispatch(&mut q, now);
        assert_eq!(rest.len(), 1);
        assert_ne!(rest[0].0, owner.0);
        assert_eq!(q.all_ids(), [1, 2, 3]);
    }

    #[test]
    fn scaling_the_ring_moves_about_one_in_n_plus_one_keys() {
        // Routing decisions only, through the state's ring: 10 000 keys over 4 then 5 slots.
        let mut q = QueueState::new(settings(Route::Key, 1));
        q.set_slots(4);
        let keys: Vec<Vec<u8>> = (0..10_000)
            .map(|i| format!("key-{i}").into_bytes())
            .collect();
        let before: Vec<Option<u32>> = keys.iter().map(|k| q.ring.route(k, |_| true)).collect();
        q.set_slots(5);
        let after: Vec<Option<u32>> = keys.iter().map(|k| q.ring.route(k, |_| true)).collect();
        let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
        let share = moved as f64 / keys.len() as f64;
        println!(
            "4 -> 5 slots: {moved} of 10000 keys moved ({:.1} %, ideal 20 %)",
            share * 100.0
        );
        assert!((0.15..0.25).contains(&share), "{share}");
        assert!(before
            .iter()
            .zip(&after)
            .all(|(a, b)| a == b || *b == Some(4)));
    }
}
