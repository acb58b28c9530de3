//! The Redis helper process of one queue: the only place plumule talks to Redis.
//!
//! Forked by the master ([`crate::sys::link::Link::spawn`]); what it knows (the URL, a
//! password in it) it inherited in memory. Four threads, each blocking on one thing:
//! - the *reader* takes the master's messages: credit goes straight to the fetcher, the rest
//!   to the main thread; the master closing its end ends the process;
//! - the *main* thread carries out submits, answers, holds and queries on its connection,
//!   keeps the answers it could not record (in order) until Redis is back, and reconnects
//!   with backoff;
//! - the *fetcher* reads jobs for the credit it has (XREADGROUP, first this consumer's own
//!   pending entries after each connect, then new ones), and takes over entries idle longer
//!   than `claim_after` (XAUTOCLAIM, an attempt counted); of a partitioned queue it reads
//!   only the partitions' streams the master says it owns ([`ToHelper::Own`]), all in one
//!   XREADGROUP;
//! - the *results* reader follows `plumule:Q:results` for the outcomes of watched jobs.
//!
//! Nothing here writes to stderr (the helper has none): log lines go to the master.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use ::redis::{Connection, RedisError, Script, Value};

use super::{
    entry_name, redact, Bytes, Fetched, FromHelper, Keys, Op, Outcome, Query, Reply, ToHelper,
    ANSWERS, GARBAGE, GROUP, REQUEUE, REQUEUE_ONE, RESULTS_KEPT, SUBMIT,
};
use crate::cluster::partition::partition_of;
use crate::protocol::{DeadLetter, QueueCounts};
use crate::sys::link::Peer;

/// What a helper is started with.
#[derive(Debug, Clone)]
pub struct Setup {
    pub queue: String,
    /// With its password, if any: never shown (see [`redact`]).
    pub url: String,
    pub node: String,
    pub claim_after: Duration,
    pub max_attempts: u32,
    /// `Some` when the master waits for outcomes: where its reading of the results stream
    /// stopped (a restarted helper goes on from there).
    pub results_from: Option<String>,
    /// `route = "key"` in a cluster: how many partitions (one stream each).
    pub partitions: Option<u32>,
    /// The partitions this master owns (of a partitioned queue).
    pub owned: Vec<u32>,
}

/// The streams the fetcher reads: the partitions owned, counted by changes.
struct Owned {
    epoch: u64,
    list: Vec<u32>,
}

/// Whether and from where the results thread reads `plumule:Q:results`: only while the
/// master waits for outcomes (no outcome is read for nothing on the masters that submitted
/// nothing with `--wait`).
struct Follow {
    wanted: bool,
    /// The next read starts after this entry; `None` while the main thread has not looked
    /// up where the stream ends.
    cursor: Option<String>,
    /// Counts the changes of `wanted`: a read begun before one is thrown away.
    epoch: u64,
}

/// The longest a read waits for Redis (a blocking read asks for less).
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a blocking read waits for new entries before looking around.
const BLOCK_MS: u64 = 1000;
/// The most entries one read asks for.
const BATCH: u64 = 1000;
/// The most answers recorded by one script call.
const ANSWERS_PER_CALL: usize = 5000;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

struct Shared {
    setup: Setup,
    keys: Keys,
    client: Result<::redis::Client, String>,
    out: Mutex<Peer<FromHelper, ToHelper>>,
    credit: Mutex<u64>,
    credit_cv: Condvar,
    /// What the results thread follows.
    follow: Mutex<Follow>,
    follow_cv: Condvar,
    quit: AtomicBool,
    owned: Mutex<Owned>,
}

impl Shared {
    fn send(&self, msg: FromHelper) {
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        if out.send(&msg).is_err() {
            self.stop();
        }
    }

    fn log(&self, warn: bool, text: String) {
        self.send(FromHelper::Log { warn, text });
    }

    fn stop(&self) {
        self.quit.store(true, Ordering::SeqCst);
        self.credit_cv.notify_all();
        self.follow_cv.notify_all();
    }

    fn quitting(&self) -> bool {
        self.quit.load(Ordering::SeqCst)
    }

    /// The streams to read now (partition, stream), and the ownership epoch they are of.
    fn streams(&self) -> (u64, Vec<(Option<u32>, String)>) {
        if self.setup.partitions.is_none() {
            return (0, vec![(None, self.keys.stream.clone())]);
        }
        let o = self.owned.lock().unwrap_or_else(|e| e.into_inner());
        let list = o
            .list
            .iter()
            .map(|&p| (Some(p), self.keys.partition(p)))
            .collect();
        (o.epoch, list)
    }

    /// Every stream of the queue: the partitions' (all of them, owned or not), or the one.
    fn all_streams(&self) -> Vec<String> {
        match self.setup.partitions {
            Some(n) => (0..n).map(|p| self.keys.partition(p)).collect(),
            None => vec![self.keys.stream.clone()],
        }
    }

    fn url(&self) -> String {
        redact(&self.setup.url)
    }

    fn connect(&self) -> Result<Connection, String> {
        let client = self.client.as_ref().map_err(Clone::clone)?;
        let con = client
            .get_connection_with_timeout(CONNECT_TIMEOUT)
            .map_err(|e| e.to_string())?;
        con.set_read_timeout(Some(READ_TIMEOUT))
            .map_err(|e| e.to_string())?;
        con.set_write_timeout(Some(READ_TIMEOUT))
            .map_err(|e| e.to_string())?;
        Ok(con)
    }

    /// Connects (and makes the group), retrying with backoff until it works or the master
    /// goes; for the threads that have nothing else to do meanwhile.
    fn connect_patiently(&self) -> Option<Connection> {
        let mut delay = RETRY_FIRST;
        loop {
            if self.quitting() {
                return None;
            }
            match self.connect().and_then(|mut c| {
                make_groups(&mut c, self).map_err(|e| e.to_string())?;
                Ok(c)
            }) {
                Ok(c) => return Some(c),
                Err(_) => {
                    // The main thread logs the outage; the others just wait.
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(RETRY_MAX);
                }
            }
        }
    }
}

/// Whether the connection is lost (as opposed to a command Redis refused).
fn lost(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_timeout()
        || e.is_connection_refusal()
        || e.is_unrecoverable_error()
}

/// The group on every stream of the queue.
fn make_groups(con: &mut Connection, sh: &Shared) -> ::redis::RedisResult<()> {
    for stream in sh.all_streams() {
        make_group(con, &stream)?;
    }
    Ok(())
}

fn make_group(con: &mut Connection, stream: &str) -> ::redis::RedisResult<()> {
    let made: ::redis::RedisResult<Value> = ::redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg(GROUP)
        .arg("0")
        .arg("MKSTREAM")
        .query(con);
    match made {
        Ok(_) => Ok(()),
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        Err(e) => Err(e),
    }
}

/// The helper's body: runs until the master closes the link.
pub fn run(setup: Setup, peer: Peer<FromHelper, ToHelper>) -> i32 {
    // The helper has no descriptor 0 to 2: keep them taken, so that no Redis socket gets one
    // (a panic message written to "stderr" would land in the Redis protocol).
    for _ in 0..3 {
        if let Ok(f) = std::fs::File::open("/dev/null") {
            if std::os::fd::AsRawFd::as_raw_fd(&f) > 2 {
                break;
            }
            std::mem::forget(f);
        }
    }
    let mut input = match peer.try_clone() {
        Ok(p) => p,
        Err(_) => return 1,
    };
    let client = ::redis::Client::open(setup.url.as_str())
        .map_err(|e| format!("{}: not a usable Redis URL: {e}", redact(&setup.url)));
    let shared = Arc::new(Shared {
        keys: Keys::new(&setup.queue),
        client,
        out: Mutex::new(peer),
        credit: Mutex::new(0),
        credit_cv: Condvar::new(),
        follow: Mutex::new(Follow {
            wanted: setup.results_from.is_some(),
            cursor: setup.results_from.clone(),
            epoch: 0,
        }),
        follow_cv: Condvar::new(),
        quit: AtomicBool::new(false),
        owned: Mutex::new(Owned {
            epoch: 1,
            list: setup.owned.clone(),
        }),
        setup,
    });
    let (tx, rx) = crossbeam_channel::unbounded::<ToHelper>();
    {
        let shared = Arc::clone(&shared);
        std::thread::spawn(move || {
            while let Ok(Some(msg)) = input.receive() {
                match msg {
                    ToHelper::Credit(n) => {
                        *shared.credit.lock().unwrap_or_else(|e| e.into_inner()) += n;
                        shared.credit_cv.notify_all();
                    }
                    ToHelper::NoCredit => {
                        *shared.credit.lock().unwrap_or_else(|e| e.into_inner()) = 0;
                    }
                    ToHelper::Own(list) => {
                        let mut o = shared.owned.lock().unwrap_or_else(|e| e.into_inner());
                        o.list = list;
                        o.epoch += 1;
                        drop(o);
                        shared.credit_cv.notify_all();
                    }
                    other => {
                        if tx.send(other).is_err() {
                            break;
                        }
                    }
                }
            }
            shared.stop();
        });
    }
    for body in [fetcher as fn(&Shared), results] {
        let shared = Arc::clone(&shared);
        std::thread::spawn(move || body(&shared));
    }
    main_loop(&shared, rx);
    0
}

/// The main thread's connection and what waits for it.
struct Main<'a> {
    shared: &'a Shared,
    con: Option<Connection>,
    last_error: String,
    next_try: Instant,
    delay: Duration,
    /// Answer batches not yet recorded, oldest first.
    answers: VecDeque<(u64, Vec<Op>)>,
    outage_logged: bool,
    checked_appendonly: bool,
    submit: Script,
    answer: Script,
    requeue: Script,
    requeue_one: Script,
    /// The partition the next batch without a key goes to (they take turns).
    keyless: u32,
}

fn main_loop(shared: &Shared, rx: crossbeam_channel::Receiver<ToHelper>) {
    let mut m = Main {
        shared,
        con: None,
        last_error: "not connected yet".into(),
        next_try: Instant::now(),
        delay: RETRY_FIRST,
        answers: VecDeque::new(),
        outage_logged: false,
        checked_appendonly: false,
        submit: Script::new(SUBMIT),
        answer: Script::new(ANSWERS),
        requeue: Script::new(REQUEUE),
        requeue_one: Script::new(REQUEUE_ONE),
        keyless: 0,
    };
    loop {
        if shared.quitting() {
            return;
        }
        m.ensure_connected();
        m.flush_answers();
        let wait = if m.con.is_none() {
            m.next_try.saturating_duration_since(Instant::now())
        } else {
            Duration::from_secs(3600)
        };
        let first = match rx.recv_timeout(wait) {
            Ok(msg) => msg,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => continue,
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
        };
        // Everything that has come, then the answers in one go.
        let mut msg = Some(first);
        while let Some(next) = msg {
            m.handle(next);
            msg = rx.try_recv().ok();
        }
        m.flush_answers();
    }
}

impl Main<'_> {
    fn ensure_connected(&mut self) {
        if self.con.is_some() || Instant::now() < self.next_try {
            return;
        }
        let sh = self.shared;
        match sh.connect().and_then(|mut c| {
            make_groups(&mut c, sh).map_err(|e| e.to_string())?;
            Ok(c)
        }) {
            Ok(mut con) => {
                if self.outage_logged {
                    sh.log(
                        false,
                        format!("queue {}: {} reachable again", sh.setup.queue, sh.url()),
                    );
                }
                self.outage_logged = false;
                self.delay = RETRY_FIRST;
                if !self.checked_appendonly {
                    self.checked_appendonly = true;
                    check_appendonly(sh, &mut con);
                }
                self.con = Some(con);
                self.start_results();
            }
            Err(e) => {
                self.last_error = e;
                self.next_try = Instant::now() + self.delay;
                if !self.outage_logged {
                    self.outage_logged = true;
                    sh.log(
                        true,
                        format!(
                            "queue {}: {} unreachable: {}; retrying",
                            sh.setup.queue,
                            sh.url(),
                            self.last_error
                        ),
                    );
                }
                self.delay = (self.delay * 2).min(RETRY_MAX);
            }
        }
    }

    /// Follows the results stream (`on`) or stops; see [`Follow`].
    fn watch(&mut self, on: bool) {
        let sh = self.shared;
        let mut f = sh.follow.lock().unwrap_or_else(|e| e.into_inner());
        if f.wanted == on {
            return;
        }
        f.wanted = on;
        f.cursor = None;
        f.epoch += 1;
        drop(f);
        self.start_results();
    }

    /// When the results are wanted and no cursor is set: the reader starts at the newest
    /// outcome there is now, before anything submitted after this could have one.
    fn start_results(&mut self) {
        let sh = self.shared;
        let Some(con) = self.con.as_mut() else {
            // At the next connect, before any submit.
            return;
        };
        let mut f = sh.follow.lock().unwrap_or_else(|e| e.into_inner());
        if !f.wanted || f.cursor.is_some() {
            return;
        }
        let top: ::redis::RedisResult<Value> = ::redis::cmd("XREVRANGE")
            .arg(&sh.keys.results)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query(con);
        let id = match top {
            Ok(v) => entries(&v)
                .first()
                .map(|(id, _)| id.clone())
                .unwrap_or_else(|| "0-0".into()),
            Err(_) => return,
        };
        f.cursor = Some(id.clone());
        sh.follow_cv.notify_all();
        drop(f);
        sh.send(FromHelper::Results {
            cursor: id,
            outcomes: Vec::new(),
        });
    }

    fn broke(&mut self, e: &RedisError) {
        if lost(e) {
            self.con = None;
            self.last_error = e.to_string();
            self.next_try = Instant::now();
        }
    }

    fn unreachable(&self) -> String {
        format!("{} unreachable: {}", self.shared.url(), self.last_error)
    }

    fn handle(&mut self, msg: ToHelper) {
        self.ensure_connected();
        match msg {
            ToHelper::Credit(_) | ToHelper::NoCredit | ToHelper::Own(_) => {}
            ToHelper::Submit {
                ticket,
                key,
                watched,
                max_pending,
                jobs,
            } => {
                let sent = self.do_submit(key, watched, max_pending, jobs);
                self.shared.send(match sent {
                    Ok(first_id) => FromHelper::Submitted { ticket, first_id },
                    Err(why) => FromHelper::SubmitFailed { ticket, why },
                });
            }
            // Recorded once everything that has come is handled (one script for many).
            ToHelper::Answers { seq, ops } => self.answers.push_back((seq, ops)),
            ToHelper::Hold { entries } => self.hold(&entries),
            ToHelper::Watch(on) => self.watch(on),
            ToHelper::Query { token, query } => {
                let reply = self.query(query);
                self.shared.send(FromHelper::Reply { token, reply });
            }
        }
    }

    fn do_submit(
        &mut self,
        key: Option<Bytes>,
        watched: bool,
        max_pending: u64,
        jobs: Vec<Bytes>,
    ) -> Result<u64, String> {
        let Some(con) = self.con.as_mut() else {
            return Err(self.unreachable());
        };
        let keys = &self.shared.keys;
        // A partitioned queue: the key's partition, or (no key) each partition in turn.
        let stream = match (self.shared.setup.partitions, &key) {
            (None, _) => keys.stream.clone(),
            (Some(n), Some(k)) => keys.partition(partition_of(&k.0, n)),
            (Some(n), None) => {
                self.keyless = (self.keyless + 1) % n.max(1);
                keys.partition(self.keyless)
            }
        };
        let mut inv = self.submit.prepare_invoke();
        inv.key(&stream).key(&keys.seq).key(&keys.stats);
        inv.arg(max_pending).arg(if watched { "1" } else { "0" });
        match &key {
            Some(k) => {
                let mut arg = b"k".to_vec();
                arg.extend_from_slice(&k.0);
                inv.arg(arg)
            }
            None => inv.arg(""),
        };
        let n = jobs.len() as u64;
        for j in &jobs {
            inv.arg(&j.0);
        }
        let got: ::redis::RedisResult<(i64, u64)> = inv.invoke(con);
        match got {
            Ok((first, _)) if first > 0 => Ok(first as u64),
            Ok((_, held)) => Err(format!(
                "queue is full: {held} job(s) pending or in flight in {}, max_pending is \
                 {max_pending}; this batch of {n} was refused whole",
                self.shared.url()
            )),
            Err(e) => {
                self.broke(&e);
                if self.con.is_none() {
                    Err(self.unreachable())
                } else {
                    Err(format!("{}: {e}", self.shared.url()))
                }
            }
        }
    }

    /// Records the answers that wait, oldest first, several batches per script call, and
    /// tells the master up to which batch they are recorded.
    fn flush_answers(&mut self) {
        while !self.answers.is_empty() {
            let Some(con) = self.con.as_mut() else {
                return;
            };
            // The batches that fit one call (at least one).
            let mut take = 0;
            let mut size = 0;
            for (_, ops) in &self.answers {
                if take > 0 && size + ops.len() > ANSWERS_PER_CALL {
                    break;
                }
                take += 1;
                size += ops.len();
            }
            let keys = &self.shared.keys;
            // One script call per stream (a partitioned queue's answers are in several);
            // attempts counts go with the first. Each op changes nothing the second time, so
            // a call that fails after others worked is simply made again, all of them.
            let mut by_stream: BTreeMap<String, Vec<&Op>> = BTreeMap::new();
            let mut first_stream: Option<String> = None;
            for op in self.answers.iter().take(take).flat_map(|(_, ops)| ops) {
                let stream = match op.entry() {
                    Some(e) => keys.locate(e).0,
                    None => first_stream.clone().unwrap_or_else(|| keys.stream.clone()),
                };
                first_stream.get_or_insert_with(|| stream.clone());
                by_stream.entry(stream).or_default().push(op);
            }
            let mut done: ::redis::RedisResult<Value> = Ok(Value::Nil);
            for (stream, ops) in &by_stream {
                done = record(&self.answer, con, keys, stream, ops);
                if done.is_err() {
                    break;
                }
            }
            let seq = self.answers[take - 1].0;
            match done {
                Ok(_) => {
                    self.answers.drain(..take);
                    self.shared.send(FromHelper::Recorded { seq });
                }
                Err(e) => {
                    self.broke(&e);
                    if self.con.is_some() {
                        // Refused by Redis itself (not a lost connection): retrying would
                        // refuse again; the entries stay pending and are claimed again.
                        self.shared.log(
                            true,
                            format!(
                                "queue {}: cannot record answers in {}: {e}",
                                self.shared.setup.queue,
                                self.shared.url()
                            ),
                        );
                        self.answers.drain(..take);
                        self.shared.send(FromHelper::Recorded { seq });
                    }
                    return;
                }
            }
        }
    }

    /// Resets the idle time of the entries the master holds, leaving alone those another
    /// master took over (their idle time is short: that master keeps them too).
    fn hold(&mut self, entries: &[String]) {
        let Some(con) = self.con.as_mut() else {
            return;
        };
        let sh = self.shared;
        let min_idle = (sh.setup.claim_after / 2).as_millis() as u64;
        let mut by_stream: BTreeMap<String, Vec<&str>> = BTreeMap::new();
        for e in entries {
            let (stream, id) = sh.keys.locate(e);
            by_stream.entry(stream).or_default().push(id);
        }
        for (stream, chunk) in by_stream
            .iter()
            .flat_map(|(s, ids)| ids.chunks(BATCH as usize).map(move |c| (s, c)))
        {
            let mut cmd = ::redis::cmd("XCLAIM");
            cmd.arg(stream).arg(GROUP).arg(&sh.setup.node).arg(min_idle);
            for e in chunk {
                cmd.arg(*e);
            }
            cmd.arg("JUSTID");
            let r: ::redis::RedisResult<Value> = cmd.query(con);
            if let Err(e) = r {
                self.broke(&e);
                return;
            }
        }
    }

    fn query(&mut self, query: Query) -> Reply {
        let Some(con) = self.con.as_mut() else {
            return Reply::Error(self.unreachable());
        };
        let sh = self.shared;
        let keys = &sh.keys;
        let got = match query {
            Query::Counts => counts(con, sh).map(Reply::Counts),
            Query::Dead => dead_letters(con, keys).map(Reply::Dead),
            Query::Requeue(ids) if sh.setup.partitions.is_some() => {
                requeue_partitioned(con, sh, &self.requeue_one, ids)
            }
            Query::Requeue(ids) => {
                let mut inv = self.requeue.prepare_invoke();
                inv.key(&keys.stream)
                    .key(&keys.dead)
                    .key(&keys.attempts)
                    .key(&keys.stats);
                inv.arg(if ids.is_none() { "1" } else { "0" });
                for id in ids.iter().flatten() {
                    inv.arg(id);
                }
                let r: ::redis::RedisResult<Vec<Value>> = inv.invoke(con);
                r.map(
                    |v| match (v.first().and_then(int), v.get(1).and_then(int)) {
                        (Some(-1), Some(id)) => {
                            Reply::Error(format!("no dead letter with id {id}"))
                        }
                        (Some(n), _) => Reply::Requeued(n.max(0) as u64),
                        _ => Reply::Error("unexpected answer from the requeue script".into()),
                    },
                )
            }
        };
        match got {
            Ok(r) => r,
            Err(e) => {
                self.broke(&e);
                if self.con.is_none() {
                    Reply::Error(self.unreachable())
                } else {
                    Reply::Error(format!("{}: {e}", sh.url()))
                }
            }
        }
    }
}

fn check_appendonly(sh: &Shared, con: &mut Connection) {
    let got: ::redis::RedisResult<Vec<String>> = ::redis::cmd("CONFIG")
        .arg("GET")
        .arg("appendonly")
        .query(con);
    if let Ok(v) = got {
        if v.get(1).map(String::as_str) == Some("no") {
            sh.log(
                true,
                format!(
                    "queue {}: {} has appendonly off: jobs submitted there may be lost if \
                     Redis stops (durability is Redis's own; set appendonly yes)",
                    sh.setup.queue,
                    sh.url()
                ),
            );
        }
    }
}

/// Records `ops` (all of one stream, but attempts) with the answers script.
fn record(
    script: &Script,
    con: &mut Connection,
    keys: &Keys,
    stream: &str,
    ops: &[&Op],
) -> ::redis::RedisResult<Value> {
    let mut inv = script.prepare_invoke();
    inv.key(stream)
        .key(&keys.attempts)
        .key(&keys.stats)
        .key(&keys.dead)
        .key(&keys.results);
    inv.arg(GROUP).arg(RESULTS_KEPT);
    for op in ops {
        match op {
            Op::Ok {
                entry,
                id,
                watched,
                retried,
                result,
            } => {
                inv.arg("o")
                    .arg(keys.locate(entry).1)
                    .arg(id)
                    .arg(if *watched { "1" } else { "0" })
                    .arg(if *retried { "1" } else { "0" })
                    .arg(&result.0);
            }
            Op::Attempt { id, attempts } => {
                inv.arg("a").arg(id).arg(attempts);
            }
            Op::Dead {
                entry,
                id,
                attempts,
                reason,
                watched,
            } => {
                inv.arg("d")
                    .arg(keys.locate(entry).1)
                    .arg(id)
                    .arg(attempts)
                    .arg(&reason.0)
                    .arg(if *watched { "1" } else { "0" });
            }
            Op::Back { entry, .. } => {
                inv.arg("b").arg(keys.locate(entry).1);
            }
        }
    }
    inv.invoke(con)
}

/// `requeue` of a partitioned queue: each dead letter goes back to its key's partition
/// (one without a key: to partition 0), moved atomically one by one; nothing moves when an id
/// named is not a dead letter.
fn requeue_partitioned(
    con: &mut Connection,
    sh: &Shared,
    script: &Script,
    ids: Option<Vec<u64>>,
) -> ::redis::RedisResult<Reply> {
    let n = sh.setup.partitions.unwrap_or(1);
    let v: Value = ::redis::cmd("XRANGE")
        .arg(&sh.keys.dead)
        .arg("-")
        .arg("+")
        .query(con)?;
    let want: Option<HashSet<u64>> = ids.as_ref().map(|l| l.iter().copied().collect());
    let mut found = Vec::new();
    for (entry, fields) in entries(&v) {
        let get = |name: &[u8]| fields.iter().find(|(f, _)| f == name).map(|(_, v)| v);
        let Some(id) = get(b"id")
            .and_then(|b| std::str::from_utf8(b).ok())
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        if want.as_ref().is_none_or(|w| w.contains(&id)) {
            let p = get(b"k").map_or(0, |k| partition_of(k, n));
            found.push((entry, id, p));
        }
    }
    if let Some(w) = &want {
        if let Some(missing) = w.iter().find(|id| !found.iter().any(|f| f.1 == **id)) {
            return Ok(Reply::Error(format!("no dead letter with id {missing}")));
        }
    }
    let mut moved = 0;
    for (entry, id, p) in found {
        let got: i64 = script
            .key(&sh.keys.dead)
            .key(sh.keys.partition(p))
            .key(&sh.keys.attempts)
            .key(&sh.keys.stats)
            .arg(&entry)
            .arg(id)
            .invoke(con)?;
        moved += got.max(0) as u64;
    }
    Ok(Reply::Requeued(moved))
}

fn counts(con: &mut Connection, sh: &Shared) -> ::redis::RedisResult<QueueCounts> {
    type Stats = (Option<u64>, Option<u64>, Option<i64>);
    let keys = &sh.keys;
    let queue = &sh.setup.queue;
    // The entries pending in the group, over every stream of the queue.
    let streams = sh.all_streams();
    let mut pipe = ::redis::pipe();
    for s in &streams {
        pipe.cmd("XPENDING").arg(s).arg(GROUP);
    }
    let pels: Vec<Value> = pipe.query(con)?;
    let in_flight: u64 = pels
        .iter()
        .map(|pel| {
            array(pel)
                .and_then(|a| a.first())
                .and_then(int)
                .unwrap_or(0)
                .max(0) as u64
        })
        .sum();
    let (stats, dead): (Stats, u64) = ::redis::pipe()
        .cmd("HMGET")
        .arg(&keys.stats)
        .arg("done")
        .arg("retried")
        .arg("held")
        .cmd("XLEN")
        .arg(&keys.dead)
        .query(con)?;
    let len = stats.2.unwrap_or(0).max(0) as u64;
    Ok(QueueCounts {
        name: queue.to_string(),
        pending: len.saturating_sub(in_flight),
        in_flight: in_flight.min(len),
        done: stats.0.unwrap_or(0),
        retried: stats.1.unwrap_or(0),
        dead,
    })
}

fn dead_letters(con: &mut Connection, keys: &Keys) -> ::redis::RedisResult<Vec<DeadLetter>> {
    let v: Value = ::redis::cmd("XRANGE")
        .arg(&keys.dead)
        .arg("-")
        .arg("+")
        .query(con)?;
    Ok(entries(&v)
        .into_iter()
        .map(|(_, fields)| {
            let get = |name: &str| {
                fields
                    .iter()
                    .find(|(f, _)| f == name.as_bytes())
                    .map(|(_, v)| v.clone())
            };
            let text = |b: Option<Vec<u8>>| {
                b.and_then(|b| String::from_utf8(b).ok())
                    .and_then(|s| s.parse::<u64>().ok())
            };
            let (payload, base64) = crate::protocol::encode_owned(get("p").unwrap_or_default());
            let (reason, reason_base64) =
                crate::protocol::encode_owned(get("r").unwrap_or_default());
            DeadLetter {
                id: text(get("id")).unwrap_or(0),
                attempts: text(get("a")).unwrap_or(0) as u32,
                reason,
                reason_base64,
                payload,
                key: get("k").map(|k| String::from_utf8_lossy(&k).into_owned()),
                base64,
            }
        })
        .collect())
}

/// The fetcher thread: jobs for the credit the master gave.
fn fetcher(sh: &Shared) {
    let garbage = Script::new(GARBAGE);
    let answers = Script::new(ANSWERS);
    let half = sh.setup.claim_after / 2;
    let mut next_claim = Instant::now();
    let mut claim_cursors: HashMap<Option<u32>, String> = HashMap::new();
    // Where the next claim round starts among the streams (so that little credit does not
    // always go to the first ones).
    let mut claim_turn = 0usize;
    let mut pause = Pause::default();
    'connect: loop {
        pause.wait();
        let Some(mut con) = sh.connect_patiently() else {
            return;
        };
        // The streams whose own pending entries were read on this connection.
        let mut known: HashSet<Option<u32>> = HashSet::new();
        let mut epoch = None;
        loop {
            if sh.quitting() {
                return;
            }
            let (now_epoch, streams) = sh.streams();
            if epoch != Some(now_epoch) {
                // First what this consumer held in a stream when it (or the master before
                // it) stopped, or when it last owned the partition.
                known.retain(|p| streams.iter().any(|(q, _)| q == p));
                claim_cursors.retain(|p, _| streams.iter().any(|(q, _)| q == p));
                for (part, stream) in &streams {
                    if known.contains(part) {
                        continue;
                    }
                    if read_own(sh, &mut con, &garbage, *part, stream).is_err() {
                        continue 'connect;
                    }
                    known.insert(*part);
                }
                epoch = Some(now_epoch);
            }
            let credit = {
                let mut c = sh.credit.lock().unwrap_or_else(|e| e.into_inner());
                let until = next_claim.saturating_duration_since(Instant::now());
                if (*c == 0 || streams.is_empty()) && !until.is_zero() {
                    c = sh
                        .credit_cv
                        .wait_timeout(c, until.min(Duration::from_secs(1)))
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
                *c
            };
            if credit == 0 || streams.is_empty() {
                if Instant::now() >= next_claim {
                    next_claim = Instant::now() + half;
                }
                continue;
            }
            if Instant::now() >= next_claim {
                let mut left = credit;
                claim_turn = claim_turn.wrapping_add(1);
                let start = claim_turn % streams.len();
                for (part, stream) in streams.iter().cycle().skip(start).take(streams.len()) {
                    if left == 0 {
                        break;
                    }
                    let cursor = claim_cursors
                        .get(part)
                        .cloned()
                        .unwrap_or_else(|| "0-0".into());
                    match claim(
                        sh, &mut con, &garbage, &answers, *part, stream, &cursor, left,
                    ) {
                        Ok((next, n)) => {
                            left = left.saturating_sub(n);
                            claim_cursors.insert(*part, next);
                        }
                        Err(_) => continue 'connect,
                    }
                }
                if claim_cursors.values().all(|c| c == "0-0") {
                    next_claim = Instant::now() + half;
                }
                continue;
            }
            // COUNT is per stream: the credit shared among them (at least one each, so
            // a few more than the credit may come when many partitions have jobs).
            let count = credit.div_ceil(streams.len() as u64).min(BATCH);
            match read_group(sh, &mut con, &streams, ">", count, Some(BLOCK_MS)) {
                Ok(list) => {
                    pause.reset();
                    for (part, stream, got) in list {
                        if got.is_empty() {
                            continue;
                        }
                        if deliver(sh, &mut con, &garbage, part, &stream, got, None).is_err() {
                            continue 'connect;
                        }
                    }
                }
                Err(e) => {
                    if e.code() == Some("NOGROUP") {
                        // Redis lost the group (restarted without its data): make it again.
                        let _ = make_groups(&mut con, sh);
                        continue;
                    }
                    if !lost(&e) {
                        let what = streams.first().map_or("", |(_, s)| s.as_str());
                        pause.refused(sh, &format!("cannot read {what}: {e}"));
                    }
                    continue 'connect;
                }
            }
        }
    }
}

/// Reads this consumer's own pending entries of one stream (from an earlier life), resets
/// their idle time and sends them to the master.
fn read_own(
    sh: &Shared,
    con: &mut Connection,
    garbage: &Script,
    part: Option<u32>,
    stream: &str,
) -> ::redis::RedisResult<()> {
    let one = [(part, stream.to_string())];
    let mut from = "0".to_string();
    loop {
        let Some((_, _, list)) = read_group(sh, con, &one, &from, BATCH, None)?.pop() else {
            return Ok(());
        };
        if list.is_empty() {
            return Ok(());
        }
        from = list.last().map(|(id, _)| id.clone()).unwrap_or_default();
        // Ours again: their idle time starts over, so that no claim (ours included) takes
        // them for a master that stopped.
        let mut reset = ::redis::cmd("XCLAIM");
        reset.arg(stream).arg(GROUP).arg(&sh.setup.node).arg(0);
        for (id, _) in &list {
            reset.arg(id);
        }
        reset.arg("JUSTID");
        let _: Value = reset.query(con)?;
        deliver(sh, con, garbage, part, stream, list, None)?;
    }
}

/// The wait of a reading thread before its next connection after an error: none at first,
/// then 100 ms doubling to 5 s, back to none after a read that worked; so that a command Redis
/// keeps refusing (a key of another type, say) is retried slowly and logged once.
#[derive(Default)]
struct Pause {
    delay: Duration,
    logged: bool,
}

impl Pause {
    fn wait(&mut self) {
        if !self.delay.is_zero() {
            std::thread::sleep(self.delay);
        }
        self.delay = (self.delay * 2).clamp(RETRY_FIRST, RETRY_MAX);
    }

    fn reset(&mut self) {
        self.delay = Duration::ZERO;
        self.logged = false;
    }

    /// Redis refused a read (the connection is fine): said once until a read works.
    fn refused(&mut self, sh: &Shared, what: &str) {
        if !self.logged {
            self.logged = true;
            sh.log(true, format!("queue {}: {what}; retrying", sh.setup.queue));
        }
    }
}

type Entry = (String, Vec<(Vec<u8>, Vec<u8>)>);

/// What a read got from one stream: its partition, its name, its entries.
type StreamRead = (Option<u32>, String, Vec<Entry>);

/// Reads the group on `streams` (partition, stream) from `from` (the same for all); returns
/// each stream's entries.
fn read_group(
    sh: &Shared,
    con: &mut Connection,
    streams: &[(Option<u32>, String)],
    from: &str,
    count: u64,
    block: Option<u64>,
) -> ::redis::RedisResult<Vec<StreamRead>> {
    let mut cmd = ::redis::cmd("XREADGROUP");
    cmd.arg("GROUP")
        .arg(GROUP)
        .arg(&sh.setup.node)
        .arg("COUNT")
        .arg(count);
    if let Some(ms) = block {
        cmd.arg("BLOCK").arg(ms);
    }
    cmd.arg("STREAMS");
    for (_, s) in streams {
        cmd.arg(s);
    }
    for _ in streams {
        cmd.arg(from);
    }
    let v: Value = cmd.query(con)?;
    // [[stream, [entries]], …] (RESP2), or a map stream → entries (RESP3).
    let mut got = Vec::new();
    let mut take = |name: &[u8], list: &Value| {
        if let Some((part, stream)) = streams.iter().find(|(_, s)| s.as_bytes() == name) {
            got.push((*part, stream.clone(), entries(list)));
        }
    };
    match &v {
        Value::Map(pairs) => {
            for (k, list) in pairs {
                if let Some(name) = bulk(k) {
                    take(name, list);
                }
            }
        }
        other => {
            for s in array(other).unwrap_or_default() {
                let s = array(s).unwrap_or_default();
                if let (Some(name), Some(list)) = (s.first().and_then(bulk), s.get(1)) {
                    take(name, list);
                }
            }
        }
    }
    Ok(got)
}

/// Takes over entries of one stream idle longer than `claim_after` (their master stopped):
/// each counts an attempt; one out of attempts is dead-lettered. Returns the cursor for the
/// next call and how many were taken.
#[allow(clippy::too_many_arguments)]
fn claim(
    sh: &Shared,
    con: &mut Connection,
    garbage: &Script,
    answers: &Script,
    part: Option<u32>,
    stream: &str,
    cursor: &str,
    credit: u64,
) -> ::redis::RedisResult<(String, u64)> {
    let v: Value = ::redis::cmd("XAUTOCLAIM")
        .arg(stream)
        .arg(GROUP)
        .arg(&sh.setup.node)
        .arg(sh.setup.claim_after.as_millis() as u64)
        .arg(cursor)
        .arg("COUNT")
        .arg(credit.min(BATCH))
        .query(con)?;
    let parts = array(&v).unwrap_or_default();
    let next = parts
        .first()
        .and_then(bulk)
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .unwrap_or_else(|| "0-0".into());
    let list = parts.get(1).map(entries).unwrap_or_default();
    let n = list.len() as u64;
    if !list.is_empty() {
        sh.log(
            false,
            format!(
                "queue {}: took over {} job(s) of {stream} left unanswered longer than \
                 claim_after ({})",
                sh.setup.queue,
                list.len(),
                crate::format_duration(sh.setup.claim_after)
            ),
        );
        deliver(sh, con, garbage, part, stream, list, Some(answers))?;
    }
    Ok((next, n))
}

/// Sends the jobs among `list` to the master (with their attempts so far); dead-letters the
/// entries that are not plumule's jobs. With `claimed` (the answers script), each job counts
/// an attempt first, and one out of attempts goes to the dead letters.
fn deliver(
    sh: &Shared,
    con: &mut Connection,
    garbage: &Script,
    part: Option<u32>,
    stream: &str,
    list: Vec<Entry>,
    claimed: Option<&Script>,
) -> ::redis::RedisResult<()> {
    let mut jobs = Vec::with_capacity(list.len());
    for (entry, fields) in list {
        if fields.is_empty() {
            // Deleted while pending (answered elsewhere): nothing to do but let it go.
            let _: Value = ::redis::cmd("XACK")
                .arg(stream)
                .arg(GROUP)
                .arg(&entry)
                .query(con)?;
            continue;
        }
        match parse_job(&entry, &fields) {
            Ok(mut job) => {
                job.entry = entry_name(part, &entry);
                jobs.push(job)
            }
            Err(why) => {
                let shown = describe_fields(&fields);
                sh.log(
                    true,
                    format!(
                        "queue {}: entry {entry} of {} is not a plumule job ({why}); \
                         dead-lettered",
                        sh.setup.queue, stream
                    ),
                );
                let _: Value = garbage
                    .key(stream)
                    .key(&sh.keys.seq)
                    .key(&sh.keys.dead)
                    .arg(GROUP)
                    .arg(&entry)
                    .arg(shown)
                    .arg(format!("not a plumule job: {why}"))
                    .invoke(con)?;
            }
        }
    }
    if jobs.is_empty() {
        return Ok(());
    }
    let mut attempts_of = ::redis::cmd("HMGET");
    attempts_of.arg(&sh.keys.attempts);
    for j in &jobs {
        attempts_of.arg(j.id);
    }
    let known: Vec<Option<u32>> = attempts_of.query(con)?;
    for (j, a) in jobs.iter_mut().zip(known) {
        j.attempts = a.unwrap_or(0);
    }
    if let Some(answers) = claimed {
        let reason = format!(
            "unanswered for claim_after ({}) on a master that stopped",
            crate::format_duration(sh.setup.claim_after)
        );
        let mut dead = Vec::new();
        let mut inv = answers.prepare_invoke();
        inv.key(stream)
            .key(&sh.keys.attempts)
            .key(&sh.keys.stats)
            .key(&sh.keys.dead)
            .key(&sh.keys.results);
        inv.arg(GROUP).arg(RESULTS_KEPT);
        for j in &mut jobs {
            j.attempts = j.attempts.saturating_add(1);
            j.reason = Some(reason.clone());
            inv.arg("a").arg(j.id).arg(j.attempts);
            if j.attempts >= sh.setup.max_attempts {
                inv.arg("d")
                    .arg(sh.keys.locate(&j.entry).1)
                    .arg(j.id)
                    .arg(j.attempts)
                    .arg(&reason)
                    .arg(if j.watched { "1" } else { "0" });
                dead.push(j.id);
            }
        }
        let _: Value = inv.invoke(con)?;
        jobs.retain(|j| !dead.contains(&j.id));
    }
    {
        let mut c = sh.credit.lock().unwrap_or_else(|e| e.into_inner());
        *c = c.saturating_sub(jobs.len() as u64);
    }
    if !jobs.is_empty() {
        sh.send(FromHelper::Jobs(jobs));
    }
    Ok(())
}

/// A stream entry as a job: `id` and `p` are required.
pub fn parse_job(entry: &str, fields: &[(Vec<u8>, Vec<u8>)]) -> Result<Fetched, String> {
    let get = |name: &[u8]| fields.iter().find(|(f, _)| f == name).map(|(_, v)| v);
    let id = get(b"id").ok_or("no `id` field")?;
    let id = std::str::from_utf8(id)
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .filter(|&n| n > 0)
        .ok_or("its `id` is not a positive integer")?;
    let payload = get(b"p").ok_or("no `p` field (payload)")?;
    Ok(Fetched {
        entry: entry.to_string(),
        id,
        key: get(b"k").map(|k| Bytes(k.clone())),
        payload: Bytes(payload.clone()),
        attempts: 0,
        watched: get(b"w").is_some_and(|w| w == b"1"),
        reason: None,
    })
}

/// An entry's fields as one line, for the dead letter of an entry that is not a job.
fn describe_fields(fields: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, (f, v)) in fields.iter().enumerate() {
        if i > 0 {
            out.push(b' ');
        }
        out.extend_from_slice(f);
        out.push(b'=');
        out.extend_from_slice(v);
    }
    out
}

/// The results thread: outcomes of watched jobs, from the cursor on.
fn results(sh: &Shared) {
    let mut pause = Pause::default();
    'connect: loop {
        pause.wait();
        let Some(mut con) = sh.connect_patiently() else {
            return;
        };
        loop {
            // Wait until outcomes are wanted and where to start is known.
            let (epoch, cursor) = {
                let mut f = sh.follow.lock().unwrap_or_else(|e| e.into_inner());
                let ready = |f: &Follow| f.wanted && f.cursor.is_some();
                while !ready(&f) && !sh.quitting() {
                    f = sh.follow_cv.wait(f).unwrap_or_else(|e| e.into_inner());
                }
                if sh.quitting() {
                    return;
                }
                (f.epoch, f.cursor.clone().unwrap_or_default())
            };
            let got: ::redis::RedisResult<Value> = ::redis::cmd("XREAD")
                .arg("COUNT")
                .arg(BATCH)
                .arg("BLOCK")
                .arg(BLOCK_MS)
                .arg("STREAMS")
                .arg(&sh.keys.results)
                .arg(&cursor)
                .query(&mut con);
            let v = match got {
                Ok(v) => {
                    pause.reset();
                    v
                }
                Err(e) => {
                    if !lost(&e) {
                        pause.refused(sh, &format!("cannot read {}: {e}", sh.keys.results));
                    }
                    continue 'connect;
                }
            };
            let list = array(&v)
                .and_then(|s| s.first())
                .and_then(array)
                .and_then(|s| s.get(1))
                .map(entries)
                .unwrap_or_default();
            let Some((last, _)) = list.last() else {
                continue;
            };
            let cursor = last.clone();
            {
                let mut f = sh.follow.lock().unwrap_or_else(|e| e.into_inner());
                if f.epoch != epoch {
                    // Stopped (or started again) meanwhile: this read is nobody's.
                    continue;
                }
                f.cursor = Some(cursor.clone());
            }
            let outcomes = list
                .into_iter()
                .flat_map(|(_, fields)| fields)
                .filter_map(|(id, value)| {
                    let id = std::str::from_utf8(&id).ok()?.parse().ok()?;
                    let (&flag, text) = value.split_first()?;
                    Some(Outcome {
                        id,
                        ok: flag == b'1',
                        text: Bytes(text.to_vec()),
                    })
                })
                .collect();
            sh.send(FromHelper::Results {
                cursor: cursor.clone(),
                outcomes,
            });
        }
    }
}

fn bulk(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn array(v: &Value) -> Option<&[Value]> {
    match v {
        Value::Array(a) | Value::Set(a) => Some(a),
        _ => None,
    }
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(n) => Some(*n),
        other => std::str::from_utf8(bulk(other)?).ok()?.parse().ok(),
    }
}

/// A list of stream entries `[[id, [field, value, …]], …]`; an entry whose fields are nil
/// (deleted while pending) has none.
fn entries(v: &Value) -> Vec<Entry> {
    let Some(list) = array(v) else {
        return Vec::new();
    };
    list.iter()
        .filter_map(|e| {
            let e = array(e)?;
            let id = String::from_utf8_lossy(bulk(e.first()?)?).into_owned();
            let fields = match e.get(1) {
                Some(Value::Map(pairs)) => pairs
                    .iter()
                    .filter_map(|(f, v)| Some((bulk(f)?.to_vec(), bulk(v)?.to_vec())))
                    .collect(),
                Some(f) => array(f)
                    .unwrap_or_default()
                    .chunks(2)
                    .filter_map(|p| Some((bulk(p.first()?)?.to_vec(), bulk(p.get(1)?)?.to_vec())))
                    .collect(),
                None => Vec::new(),
            };
            Some((id, fields))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_without_plumule_fields_is_not_a_job() {
        let f = |pairs: &[(&str, &str)]| -> Vec<(Vec<u8>, Vec<u8>)> {
            pairs
                .iter()
                .map(|(a, b)| (a.as_bytes().to_vec(), b.as_bytes().to_vec()))
                .collect()
        };
        let job = parse_job("1-0", &f(&[("id", "7"), ("p", "x"), ("w", "1")])).unwrap();
        assert_eq!(
            (job.id, job.payload.0.as_slice(), job.watched),
            (7, &b"x"[..], true)
        );
        assert_eq!(
            parse_job("1-0", &f(&[("foo", "bar")])).unwrap_err(),
            "no `id` field"
        );
        assert_eq!(
            parse_job("1-0", &f(&[("id", "x"), ("p", "")])).unwrap_err(),
            "its `id` is not a positive integer"
        );
        assert_eq!(
            parse_job("1-0", &f(&[("id", "3")])).unwrap_err(),
            "no `p` field (payload)"
        );
        assert_eq!(describe_fields(&f(&[("a", "1"), ("b", "2")])), b"a=1 b=2");
    }

    #[test]
    fn stream_replies_are_read_in_both_shapes() {
        let b = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let v = Value::Array(vec![
            Value::Array(vec![
                b("1-1"),
                Value::Array(vec![b("id"), b("1"), b("p"), b("x")]),
            ]),
            Value::Array(vec![b("1-2"), Value::Nil]),
        ]);
        let got = entries(&v);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].0, "1-1");
        assert_eq!(got[0].1.len(), 2);
        assert!(got[1].1.is_empty(), "a deleted entry has no fields");
    }
}
