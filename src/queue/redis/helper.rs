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
//!   than `claim_after` (XAUTOCLAIM, an attempt counted);
//! - the *results* reader follows `plumule:Q:results` for the outcomes of watched jobs.
//!
//! Nothing here writes to stderr (the helper has none): log lines go to the master.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use ::redis::{Connection, RedisError, Script, Value};

use super::{
    redact, Bytes, Fetched, FromHelper, Keys, Op, Outcome, Query, Reply, ToHelper, ANSWERS,
    GARBAGE, GROUP, REQUEUE, RESULTS_KEPT, SUBMIT,
};
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
                make_group(&mut c, &self.keys).map_err(|e| e.to_string())?;
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

fn make_group(con: &mut Connection, keys: &Keys) -> ::redis::RedisResult<()> {
    let made: ::redis::RedisResult<Value> = ::redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&keys.stream)
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
            make_group(&mut c, &sh.keys).map_err(|e| e.to_string())?;
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
            ToHelper::Credit(_) => {}
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
        let mut inv = self.submit.prepare_invoke();
        inv.key(&keys.stream).key(&keys.seq).key(&keys.stats);
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
            let mut inv = self.answer.prepare_invoke();
            inv.key(&keys.stream)
                .key(&keys.attempts)
                .key(&keys.stats)
                .key(&keys.dead)
                .key(&keys.results);
            inv.arg(GROUP).arg(RESULTS_KEPT);
            for op in self.answers.iter().take(take).flat_map(|(_, ops)| ops) {
                match op {
                    Op::Ok {
                        entry,
                        id,
                        watched,
                        retried,
                        result,
                    } => {
                        inv.arg("o")
                            .arg(entry)
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
                            .arg(entry)
                            .arg(id)
                            .arg(attempts)
                            .arg(&reason.0)
                            .arg(if *watched { "1" } else { "0" });
                    }
                }
            }
            let seq = self.answers[take - 1].0;
            let done: ::redis::RedisResult<Value> = inv.invoke(con);
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
        for chunk in entries.chunks(BATCH as usize) {
            let mut cmd = ::redis::cmd("XCLAIM");
            cmd.arg(&sh.keys.stream)
                .arg(GROUP)
                .arg(&sh.setup.node)
                .arg(min_idle);
            for e in chunk {
                cmd.arg(e);
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
            Query::Counts => counts(con, keys, &sh.setup.queue).map(Reply::Counts),
            Query::Dead => dead_letters(con, keys).map(Reply::Dead),
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

fn counts(con: &mut Connection, keys: &Keys, queue: &str) -> ::redis::RedisResult<QueueCounts> {
    type Stats = (Option<u64>, Option<u64>, Option<i64>);
    let (pel, stats, dead): (Value, Stats, u64) = ::redis::pipe()
        .cmd("XPENDING")
        .arg(&keys.stream)
        .arg(GROUP)
        .cmd("HMGET")
        .arg(&keys.stats)
        .arg("done")
        .arg("retried")
        .arg("held")
        .cmd("XLEN")
        .arg(&keys.dead)
        .query(con)?;
    let len = stats.2.unwrap_or(0).max(0) as u64;
    let in_flight = array(&pel)
        .and_then(|a| a.first())
        .and_then(int)
        .unwrap_or(0)
        .max(0) as u64;
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
    let mut claim_cursor = "0-0".to_string();
    let mut pause = Pause::default();
    'connect: loop {
        pause.wait();
        let Some(mut con) = sh.connect_patiently() else {
            return;
        };
        // First what this consumer held when it (or the master before it) stopped.
        let mut from = "0".to_string();
        loop {
            match read_group(sh, &mut con, &from, BATCH, None) {
                Ok(list) if list.is_empty() => break,
                Ok(list) => {
                    from = list.last().map(|(id, _)| id.clone()).unwrap_or_default();
                    // Ours again: their idle time starts over, so that no claim (ours
                    // included) takes them for a master that stopped.
                    let mut reset = ::redis::cmd("XCLAIM");
                    reset
                        .arg(&sh.keys.stream)
                        .arg(GROUP)
                        .arg(&sh.setup.node)
                        .arg(0);
                    for (id, _) in &list {
                        reset.arg(id);
                    }
                    reset.arg("JUSTID");
                    let reset: ::redis::RedisResult<Value> = reset.query(&mut con);
                    if reset.is_err() || deliver(sh, &mut con, &garbage, list, None).is_err() {
                        continue 'connect;
                    }
                }
                Err(_) => continue 'connect,
            }
        }
        loop {
            if sh.quitting() {
                return;
            }
            let credit = {
                let mut c = sh.credit.lock().unwrap_or_else(|e| e.into_inner());
                let until = next_claim.saturating_duration_since(Instant::now());
                if *c == 0 && !until.is_zero() {
                    c = sh
                        .credit_cv
                        .wait_timeout(c, until.min(Duration::from_secs(1)))
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
                *c
            };
            if credit == 0 {
                if Instant::now() >= next_claim {
                    next_claim = Instant::now() + half;
                }
                continue;
            }
            if Instant::now() >= next_claim {
                match claim(sh, &mut con, &garbage, &answers, &claim_cursor, credit) {
                    Ok(next) => {
                        if next == "0-0" {
                            next_claim = Instant::now() + half;
                        }
                        claim_cursor = next;
                    }
                    Err(_) => continue 'connect,
                }
                continue;
            }
            let count = credit.min(BATCH);
            match read_group(sh, &mut con, ">", count, Some(BLOCK_MS)) {
                Ok(list) if list.is_empty() => pause.reset(),
                Ok(list) => {
                    pause.reset();
                    if deliver(sh, &mut con, &garbage, list, None).is_err() {
                        continue 'connect;
                    }
                }
                Err(e) => {
                    if e.code() == Some("NOGROUP") {
                        // Redis lost the group (restarted without its data): make it again.
                        let _ = make_group(&mut con, &sh.keys);
                        continue;
                    }
                    if !lost(&e) {
                        pause.refused(sh, &format!("cannot read {}: {e}", sh.keys.stream));
                    }
                    continue 'connect;
                }
            }
        }
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

fn read_group(
    sh: &Shared,
    con: &mut Connection,
    from: &str,
    count: u64,
    block: Option<u64>,
) -> ::redis::RedisResult<Vec<Entry>> {
    let mut cmd = ::redis::cmd("XREADGROUP");
    cmd.arg("GROUP")
        .arg(GROUP)
        .arg(&sh.setup.node)
        .arg("COUNT")
        .arg(count);
    if let Some(ms) = block {
        cmd.arg("BLOCK").arg(ms);
    }
    cmd.arg("STREAMS").arg(&sh.keys.stream).arg(from);
    let v: Value = cmd.query(con)?;
    // [[stream, [entries]]]
    Ok(array(&v)
        .and_then(|streams| streams.first())
        .and_then(array)
        .and_then(|s| s.get(1))
        .map(entries)
        .unwrap_or_default())
}

/// Takes over entries idle longer than `claim_after` (their master stopped): each counts an
/// attempt; one out of attempts is dead-lettered. Returns the cursor for the next call.
fn claim(
    sh: &Shared,
    con: &mut Connection,
    garbage: &Script,
    answers: &Script,
    cursor: &str,
    credit: u64,
) -> ::redis::RedisResult<String> {
    let v: Value = ::redis::cmd("XAUTOCLAIM")
        .arg(&sh.keys.stream)
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
    if !list.is_empty() {
        sh.log(
            false,
            format!(
                "queue {}: took over {} job(s) left unanswered longer than claim_after ({})",
                sh.setup.queue,
                list.len(),
                crate::format_duration(sh.setup.claim_after)
            ),
        );
        deliver(sh, con, garbage, list, Some(answers))?;
    }
    Ok(next)
}

/// Sends the jobs among `list` to the master (with their attempts so far); dead-letters the
/// entries that are not plumule's jobs. With `claimed` (the answers script), each job counts
/// an attempt first, and one out of attempts goes to the dead letters.
fn deliver(
    sh: &Shared,
    con: &mut Connection,
    garbage: &Script,
    list: Vec<Entry>,
    claimed: Option<&Script>,
) -> ::redis::RedisResult<()> {
    let mut jobs = Vec::with_capacity(list.len());
    for (entry, fields) in list {
        if fields.is_empty() {
            // Deleted while pending (answered elsewhere): nothing to do but let it go.
            let _: Value = ::redis::cmd("XACK")
                .arg(&sh.keys.stream)
                .arg(GROUP)
                .arg(&entry)
                .query(con)?;
            continue;
        }
        match parse_job(&entry, &fields) {
            Ok(job) => jobs.push(job),
            Err(why) => {
                let shown = describe_fields(&fields);
                sh.log(
                    true,
                    format!(
                        "queue {}: entry {entry} of {} is not a plumule job ({why}); \
                         dead-lettered",
                        sh.setup.queue, sh.keys.stream
                    ),
                );
                let _: Value = garbage
                    .key(&sh.keys.stream)
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
        inv.key(&sh.keys.stream)
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
                    .arg(&j.entry)
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
