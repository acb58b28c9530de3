//! Queues kept in Redis (SPEC §10, `backend = "redis://…"`): what the master and its Redis
//! helper process say to each other, the keys and fields a queue uses in Redis, and the Lua
//! scripts that change them atomically. The helper's body, the only code here that does I/O,
//! is in [`helper`]; the master's side is `master::remote`.
//!
//! # Keys of queue Q
//!
//! | key | type | what |
//! |---|---|---|
//! | `plumule:Q` | stream, group `plumule` | the jobs not yet answered: fields `id` (the job id), `p` (payload), `k` (key, optional), `w` (`1`: a client waits for the outcome) |
//! | `plumule:Q:P` | stream, group `plumule` | with key partitions (`route = "key"` in a cluster), partition P's jobs, instead of `plumule:Q`; the master names their entries `P/ID` |
//! | `plumule:Q:seq` | string | the last job id given (INCRBY in the submit script: ids are cluster-wide) |
//! | `plumule:Q:attempts` | hash | job id → attempts so far, for jobs that failed at least once |
//! | `plumule:Q:stats` | hash | `held` (jobs pending or fetched: what `max_pending` bounds), `done`, `retried` |
//! | `plumule:Q:dead` | stream | dead letters: `id`, `p`, `k`, `a` (attempts), `r` (reason) |
//! | `plumule:Q:results` | stream, capped | outcomes of watched jobs, many per entry: field = job id, value = `1` then the result (`ok`) or `0` then the reason (dead) |
//!
//! Answered jobs are acknowledged, and the stream trimmed below its oldest entry still pending
//! or not yet delivered (XTRIM MINID ~): trimming never drops an entry still pending.
//! `plumule:Q:results` is capped at about [`RESULTS_KEPT`] entries (XADD MAXLEN ~), each the
//! outcomes of one batch of answers; only watched jobs write there.
//!
//! # The master and its helper
//!
//! One helper process per Redis queue, forked by the master ([`crate::sys::link`]: 4-byte
//! little-endian length, then the JSON of a [`ToHelper`] or [`FromHelper`]). The master
//! grants credit (how many more jobs its workers can take), the helper reads that many from
//! the group as consumer `node` and sends them ([`FromHelper::Jobs`]); the master answers
//! them in numbered batches ([`ToHelper::Answers`]) and keeps each batch until the helper
//! says it is recorded ([`FromHelper::Recorded`]), so that a helper that dies or a Redis that
//! is down loses no answer: a new helper gets them again, in order. Every
//! `claim_after / 4` the master names the entries it holds ([`ToHelper::Hold`]) and the
//! helper resets their idle time (XCLAIM … JUSTID), so that other masters, whose XAUTOCLAIM
//! takes entries idle longer than `claim_after`, only take the jobs of a master that stopped.
//!
//! Jobs fetched and not delivered go back with [`Op::Back`], recorded in order with the
//! answers. Of a partitioned queue (`route = "key"` in a cluster:
//! [`helper::Setup::partitions`]) the master says which partitions it owns
//! ([`ToHelper::Own`]) each time the membership changes them, and the helper reads only those
//! streams; the master names each entry `P/ID` (its partition, its id in `plumule:Q:P`:
//! [`entry_name`]), so that answers and holds find their stream.

pub mod helper;

use serde::{Deserialize, Serialize};

/// The consumer group every master reads a queue's stream with.
pub const GROUP: &str = "plumule";

/// About how many entries (batches of outcomes of watched jobs) `plumule:Q:results` keeps.
pub const RESULTS_KEPT: u64 = 10_000;

/// Bytes carried in a JSON frame: UTF-8 as a string, anything else as base64.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Bytes(pub Vec<u8>);

impl Serialize for Bytes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(&self.0) {
            Ok(text) => s.serialize_newtype_variant("Bytes", 0, "t", text),
            Err(_) => {
                use base64::Engine;
                let b = base64::engine::general_purpose::STANDARD.encode(&self.0);
                s.serialize_newtype_variant("Bytes", 1, "b", &b)
            }
        }
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        enum Form {
            #[serde(rename = "t")]
            Text(String),
            #[serde(rename = "b")]
            Base64(String),
        }
        match Form::deserialize(d)? {
            Form::Text(t) => Ok(Bytes(t.into_bytes())),
            Form::Base64(b) => {
                use base64::Engine;
                base64::engine::general_purpose::STANDARD
                    .decode(b)
                    .map(Bytes)
                    .map_err(serde::de::Error::custom)
            }
        }
    }
}

/// The keys of one queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    /// The stream of an unpartitioned queue; with partitions, the prefix of theirs.
    pub stream: String,
    pub seq: String,
    pub attempts: String,
    pub stats: String,
    pub dead: String,
    pub results: String,
}

impl Keys {
    pub fn new(queue: &str) -> Keys {
        let stream = format!("plumule:{queue}");
        Keys {
            seq: format!("{stream}:seq"),
            attempts: format!("{stream}:attempts"),
            stats: format!("{stream}:stats"),
            dead: format!("{stream}:dead"),
            results: format!("{stream}:results"),
            stream,
        }
    }

    /// The stream of partition `p`: `plumule:Q:P`.
    pub fn partition(&self, p: u32) -> String {
        format!("{}:{p}", self.stream)
    }

    /// The stream an entry name (see [`entry_name`]) is in, and its id there.
    pub fn locate<'a>(&self, entry: &'a str) -> (String, &'a str) {
        match split_entry(entry) {
            (Some(p), id) => (self.partition(p), id),
            (None, id) => (self.stream.clone(), id),
        }
    }
}

/// How the master names an entry: its stream id, after `P/` for partition P's stream.
pub fn entry_name(partition: Option<u32>, id: &str) -> String {
    match partition {
        Some(p) => format!("{p}/{id}"),
        None => id.to_string(),
    }
}

/// The partition of an entry name (`None`: the queue's one stream) and its stream id.
pub fn split_entry(entry: &str) -> (Option<u32>, &str) {
    match entry.split_once('/') {
        Some((p, id)) => match p.parse() {
            Ok(p) => (Some(p), id),
            Err(_) => (None, entry),
        },
        None => (None, entry),
    }
}

/// What the master tells its Redis helper.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ToHelper {
    /// The master's workers can take this many more jobs (added to what was granted).
    Credit(u64),
    /// Add a batch; answered by [`FromHelper::Submitted`] with the same `ticket`.
    Submit {
        ticket: u64,
        key: Option<Bytes>,
        watched: bool,
        max_pending: u64,
        jobs: Vec<Bytes>,
    },
    /// Record these answers, in order; `seq` numbers the batch (answered by
    /// [`FromHelper::Recorded`]).
    Answers { seq: u64, ops: Vec<Op> },
    /// The master holds these entries: reset their idle time.
    Hold { entries: Vec<String> },
    /// Follow the results stream (some job submitted here is watched), or stop.
    Watch(bool),
    /// A `queue`, `queue --dead` or `requeue` request; answered by [`FromHelper::Reply`].
    Query { token: u64, query: Query },
    /// The credit granted and not used yet is withdrawn: no accepting worker is left.
    NoCredit,
    /// A partitioned queue: the partitions this master reads now (the rest it leaves to
    /// their owners).
    Own(Vec<u32>),
}

/// One answer to record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Op {
    /// Answered `ok`: XACK, XDEL, counted done; the result goes to the results stream when a
    /// client waits for it.
    Ok {
        entry: String,
        id: u64,
        watched: bool,
        /// It failed before: its attempts count is forgotten.
        retried: bool,
        result: Bytes,
    },
    /// An attempt failed (a `fail`, or a redelivery): the count is kept for other masters.
    Attempt { id: u64, attempts: u32 },
    /// Dead-lettered: moved to the dead stream with its reason.
    Dead {
        entry: String,
        id: u64,
        attempts: u32,
        reason: Bytes,
        watched: bool,
    },
    /// Fetched but not delivered, and given back (no worker takes it here, or its partition
    /// moved): the entry is acknowledged and added again at the end of its stream with the
    /// same fields (job id, payload, key), in one script, so another consumer reads it.
    Back { entry: String, id: u64 },
}

impl Op {
    /// The job an `Ok`, `Dead` or `Back` lets go of here, and its entry.
    pub fn ends(&self) -> Option<(u64, &str)> {
        match self {
            Op::Ok { id, entry, .. } | Op::Dead { id, entry, .. } | Op::Back { id, entry } => {
                Some((*id, entry))
            }
            Op::Attempt { .. } => None,
        }
    }

    /// The entry the op is about, if any.
    pub fn entry(&self) -> Option<&str> {
        self.ends().map(|(_, e)| e)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Query {
    Counts,
    Dead,
    /// `None`: every dead letter.
    Requeue(Option<Vec<u64>>),
}

/// A job read from the stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fetched {
    pub entry: String,
    pub id: u64,
    pub key: Option<Bytes>,
    pub payload: Bytes,
    pub attempts: u32,
    pub watched: bool,
    /// Why the last attempt failed, when it was taken over from a master that stopped.
    pub reason: Option<String>,
}

/// The answer to a [`Query`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Reply {
    Counts(crate::protocol::QueueCounts),
    Dead(Vec<crate::protocol::DeadLetter>),
    Requeued(u64),
    Error(String),
}

/// An outcome read from the results stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    pub id: u64,
    pub ok: bool,
    pub text: Bytes,
}

/// What the helper tells the master.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum FromHelper {
    Jobs(Vec<Fetched>),
    Submitted {
        ticket: u64,
        first_id: u64,
    },
    SubmitFailed {
        ticket: u64,
        why: String,
    },
    /// Every answer batch up to `seq` is recorded.
    Recorded {
        seq: u64,
    },
    /// Outcomes of watched jobs; `cursor` is where the next read starts.
    Results {
        cursor: String,
        outcomes: Vec<Outcome>,
    },
    Reply {
        token: u64,
        reply: Reply,
    },
    /// A line for the master's log (the helper has no stderr of its own).
    Log {
        warn: bool,
        text: String,
    },
}

/// Whether the URL carries a password (`redis://user:PASSWORD@host…` or `redis://:PASSWORD@…`).
pub fn has_password(url: &str) -> bool {
    let Some((_, rest)) = url.split_once("://") else {
        return false;
    };
    let authority = rest.split('/').next().unwrap_or_default();
    authority
        .rsplit_once('@')
        .is_some_and(|(user, _)| user.split_once(':').is_some_and(|(_, pw)| !pw.is_empty()))
}

/// The URL with its password (and user) replaced by `***`: what logs and messages show.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match authority.rfind('@') {
        Some(at) => format!("{scheme}://***@{}{path}", &authority[at + 1..]),
        None => url.to_string(),
    }
}

/// Submits a batch: refused whole (`{-1, held}`) when the jobs held (pending or fetched,
/// across the cluster: `held` in the stats hash) would pass `max_pending`, else every job
/// XADDed with consecutive ids from `seq`; returns `{first id, held}`.
/// KEYS: stream, seq, stats. ARGV: max_pending, watched (0/1), key ('' or 'k' .. key),
/// payloads.
pub const SUBMIT: &str = r#"
local n = #ARGV - 3
local held = tonumber(redis.call('HGET', KEYS[3], 'held') or '0')
if held + n > tonumber(ARGV[1]) then return {-1, held} end
local last = redis.call('INCRBY', KEYS[2], n)
local first = last - n + 1
local key = nil
if #ARGV[3] > 0 then key = string.sub(ARGV[3], 2) end
for i = 1, n do
  local f = {'id', string.format('%d', first + i - 1), 'p', ARGV[3 + i]}
  if key then f[#f + 1] = 'k'; f[#f + 1] = key end
  if ARGV[2] == '1' then f[#f + 1] = 'w'; f[#f + 1] = '1' end
  redis.call('XADD', KEYS[1], '*', unpack(f))
end
redis.call('HINCRBY', KEYS[3], 'held', n)
return {first, held}
"#;

/// Records answers in order. KEYS: stream, attempts, stats, dead, results. ARGV: group,
/// results cap, then ops: `o ENTRY ID W A RESULT` (A: `1` when the job has an attempts
/// count to forget), `a ID ATTEMPTS`, `d ENTRY ID ATTEMPTS REASON W`.
///
/// The `ok`s are acknowledged together (XACK of many ids), their outcomes (for watched jobs)
/// go to the results stream as one entry of `ID` → `1RESULT` fields, and the stream is then
/// trimmed below its oldest entry still pending or not yet delivered (XTRIM MINID ~): an
/// answered entry is not deleted one by one, which costs Redis more than the rest of an
/// answer. A `dead` moves its entry to the dead letters (read, acknowledged, deleted).
/// `b ENTRY` gives an entry back: acknowledged and added again at the stream's end with its
/// fields (job id, payload, key, watched), so that it is read again by whoever reads next.
/// An `ok`, `dead` or `b` whose entry another master answered already changes nothing.
pub const ANSWERS: &str = r#"
local group, cap = ARGV[1], ARGV[2]
local acks, forget, results = {}, {}, {}
local done, retried, gone = 0, 0, 0
local function flush_acks()
  local i = 1
  while i <= #acks do
    local n = redis.call('XACK', KEYS[1], group, unpack(acks, i, math.min(i + 999, #acks)))
    done = done + n
    i = i + 1000
  end
  acks = {}
end
local i = 3
while i <= #ARGV do
  local op = ARGV[i]
  if op == 'o' then
    acks[#acks + 1] = ARGV[i + 1]
    if ARGV[i + 3] == '1' then
      results[#results + 1] = ARGV[i + 2]
      results[#results + 1] = '1' .. ARGV[i + 5]
    end
    if ARGV[i + 4] == '1' then forget[#forget + 1] = ARGV[i + 2] end
    i = i + 6
  elseif op == 'a' then
    redis.call('HSET', KEYS[2], ARGV[i + 1], ARGV[i + 2])
    retried = retried + 1
    i = i + 3
  elseif op == 'b' then
    flush_acks()
    local e = ARGV[i + 1]
    i = i + 2
    local got = redis.call('XRANGE', KEYS[1], e, e)
    if #got > 0 and redis.call('XACK', KEYS[1], group, e) == 1 then
      redis.call('XADD', KEYS[1], '*', unpack(got[1][2]))
      redis.call('XDEL', KEYS[1], e)
    end
  else
    flush_acks()
    local e, id, a, r, w = ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5]
    i = i + 6
    local got = redis.call('XRANGE', KEYS[1], e, e)
    if #got > 0 and redis.call('XACK', KEYS[1], group, e) == 1 then
      gone = gone + 1
      local f = got[1][2]
      local d = {'id', id, 'a', a, 'r', r}
      for j = 1, #f, 2 do
        if f[j] == 'p' or f[j] == 'k' then d[#d + 1] = f[j]; d[#d + 1] = f[j + 1] end
      end
      redis.call('XADD', KEYS[4], '*', unpack(d))
      if w == '1' then
        results[#results + 1] = id
        results[#results + 1] = '0' .. r
      end
    end
    redis.call('XDEL', KEYS[1], e)
    redis.call('HDEL', KEYS[2], id)
  end
end
flush_acks()
local j = 1
while j <= #forget do
  redis.call('HDEL', KEYS[2], unpack(forget, j, math.min(j + 999, #forget)))
  j = j + 1000
end
j = 1
while j <= #results do
  redis.call('XADD', KEYS[5], 'MAXLEN', '~', cap, '*',
    unpack(results, j, math.min(j + 1999, #results)))
  j = j + 2000
end
if done > 0 then redis.call('HINCRBY', KEYS[3], 'done', done) end
if done + gone > 0 then redis.call('HINCRBY', KEYS[3], 'held', -(done + gone)) end
if retried > 0 then redis.call('HINCRBY', KEYS[3], 'retried', retried) end
if done > 0 then
  -- Below the oldest entry still pending, or else below the next one to deliver.
  local p = redis.call('XPENDING', KEYS[1], group)
  local minid = nil
  if p[1] > 0 then
    minid = p[2]
  else
    local groups = redis.call('XINFO', 'GROUPS', KEYS[1])
    for _, g in ipairs(groups) do
      local name, last = nil, nil
      for k = 1, #g, 2 do
        if g[k] == 'name' then name = g[k + 1] end
        if g[k] == 'last-delivered-id' then last = g[k + 1] end
      end
      if name == group then minid = last end
    end
  end
  if minid then redis.call('XTRIM', KEYS[1], 'MINID', '~', minid) end
end
return done
"#;

/// Dead-letters an entry that is not a job of plumule's (fields missing): it gets a job id
/// from `seq`, its fields as its payload. KEYS: stream, seq, dead. ARGV: group, entry,
/// payload, reason.
pub const GARBAGE: &str = r#"
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  local id = redis.call('INCR', KEYS[2])
  redis.call('XADD', KEYS[3], '*', 'id', string.format('%d', id), 'a', '0', 'r', ARGV[4],
    'p', ARGV[3])
end
redis.call('XDEL', KEYS[1], ARGV[2])
return 1
"#;

/// Puts dead letters back in the stream, attempts at 0. KEYS: stream, dead, attempts, stats.
/// ARGV: all (0/1), then job ids. Returns `{n}`, or `{-1, id}` when an id named is not a
/// dead letter (then nothing moves).
pub const REQUEUE: &str = r#"
local all = ARGV[1] == '1'
local want = {}
for i = 2, #ARGV do want[ARGV[i]] = true end
local found = {}
for _, en in ipairs(redis.call('XRANGE', KEYS[2], '-', '+')) do
  local f, id = en[2], nil
  for j = 1, #f, 2 do if f[j] == 'id' then id = f[j + 1] end end
  if id and (all or want[id]) then
    found[#found + 1] = {en[1], f, id}
  end
end
if not all then
  local seen = {}
  for _, x in ipairs(found) do seen[x[3]] = true end
  for i = 2, #ARGV do
    if not seen[ARGV[i]] then return {-1, ARGV[i]} end
  end
end
for _, x in ipairs(found) do
  local f = x[2]
  local n = {'id', x[3]}
  for j = 1, #f, 2 do
    if f[j] == 'p' or f[j] == 'k' then n[#n + 1] = f[j]; n[#n + 1] = f[j + 1] end
  end
  redis.call('XADD', KEYS[1], '*', unpack(n))
  redis.call('XDEL', KEYS[2], x[1])
  redis.call('HDEL', KEYS[3], x[3])
end
if #found > 0 then redis.call('HINCRBY', KEYS[4], 'held', #found) end
return {#found}
"#;

/// Puts one dead letter back in a stream (a partitioned queue's: the helper chose the
/// partition), attempts at 0. KEYS: dead, stream, attempts, stats. ARGV: the dead letter's
/// entry, its job id. Returns 1, or 0 when it is not there any more.
pub const REQUEUE_ONE: &str = r#"
local got = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #got == 0 then return 0 end
local f = got[1][2]
local n = {'id', ARGV[2]}
for j = 1, #f, 2 do
  if f[j] == 'p' or f[j] == 'k' then n[#n + 1] = f[j]; n[#n + 1] = f[j + 1] end
end
redis.call('XADD', KEYS[2], '*', unpack(n))
redis.call('XDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[2])
redis.call('HINCRBY', KEYS[4], 'held', 1)
return 1
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_never_shows() {
        assert_eq!(
            redact("redis://:s3cret@10.0.0.1:6379/0"),
            "redis://***@10.0.0.1:6379/0"
        );
        assert_eq!(redact("redis://user:pw@h/2"), "redis://***@h/2");
        assert_eq!(redact("redis://h:1/0"), "redis://h:1/0");
        assert_eq!(redact("unix:///run/redis.sock"), "unix:///run/redis.sock");
        assert!(has_password("redis://:pw@h:1/0"));
        assert!(has_password("redis://u:pw@h/0"));
        assert!(!has_password("redis://u@h/0"));
        assert!(!has_password("redis://h:1/0"));
    }

    #[test]
    fn bytes_travel_as_text_or_base64() {
        for b in [b"plain".to_vec(), vec![0xff, 0, 1], Vec::new()] {
            let json = serde_json::to_string(&Bytes(b.clone())).unwrap();
            assert_eq!(serde_json::from_str::<Bytes>(&json).unwrap(), Bytes(b));
        }
        assert_eq!(
            serde_json::to_string(&Bytes(b"x".to_vec())).unwrap(),
            r#"{"t":"x"}"#
        );
    }

    #[test]
    fn keys_follow_the_queue_name() {
        let k = Keys::new("thumbs");
        assert_eq!(k.stream, "plumule:thumbs");
        assert_eq!(k.dead, "plumule:thumbs:dead");
        assert_eq!(k.results, "plumule:thumbs:results");
        assert_eq!(k.partition(7), "plumule:thumbs:7");
    }

    #[test]
    fn entry_names_carry_their_partition() {
        let k = Keys::new("q");
        assert_eq!(entry_name(Some(3), "17-0"), "3/17-0");
        assert_eq!(entry_name(None, "17-0"), "17-0");
        assert_eq!(split_entry("3/17-0"), (Some(3), "17-0"));
        assert_eq!(split_entry("17-0"), (None, "17-0"));
        assert_eq!(k.locate("3/17-0"), ("plumule:q:3".to_string(), "17-0"));
        assert_eq!(k.locate("17-0"), ("plumule:q".to_string(), "17-0"));
        let back = Op::Back {
            entry: "3/17-0".into(),
            id: 9,
        };
        assert_eq!(back.ends(), Some((9, "3/17-0")));
        assert_eq!(Op::Attempt { id: 9, attempts: 1 }.entry(), None);
    }
}
