//! The control protocol between `plumule` client commands and the master, over the Unix
//! stream socket `runtime_dir/control.sock`: one JSON object per line each way, one request
//! and one response per line, any number of requests per connection.
//!
//! ```text
//! → {"cmd":"status","program":"web"}
//! ← {"ok":true,"result":{"programs":[…]}}
//! → {"cmd":"scale","program":"web","workers":8}
//! ← {"ok":false,"error":"no program named web"}
//! ```
//!
//! A response comes once the action is done (SPEC §9): `stop` when the workers have exited,
//! `start`/`restart` when the new workers run, `scale` when the count is reached, `reload`
//! when the new plan is applied, rolling restarts included.
//!
//! Progress lines. A request may carry `"progress":true` beside its `cmd`; the master then
//! acknowledges it at once, when it has to wait for its answer, and repeats that at most every
//! [`PROGRESS_EVERY`] while it waits, with a line that is not a response:
//!
//! ```text
//! → {"cmd":"stop","target":"web","progress":true}
//! ← {"progress":"waiting for web to stop"}
//! ← {"progress":"waiting for web to stop"}
//! ← {"ok":true,"result":{}}
//! ```
//!
//! So a client can tell a master that works on a long request from one that is stopped or
//! wedged: only silence counts (`plumule --timeout`). A request without the field gets no
//! progress line, exactly as before, so older clients and scripts reading the first line as
//! the answer keep working.
//!
//! Version. A request may carry `"v":N`, the version of the control protocol its sender
//! speaks ([`PROTOCOL_VERSION`]); `plumule` clients always send it, and a request without it
//! is version 1 (scripts written by hand need not bother). A master refuses a request of a
//! version it does not speak with an error naming both versions, and sends nothing else for
//! it, so a client of another version says so instead of misreading an answer:
//!
//! ```text
//! → {"cmd":"status","v":2}
//! ← {"ok":false,"error":"control protocol version 2 is not spoken by this master (it speaks version 1): use the plumule client of the master's version"}
//! ```

use serde::{Deserialize, Serialize};

/// Longest request line the master reads; longer ones get an error and the connection closes.
pub const MAX_REQUEST: usize = 64 * 1024;

/// The version of the control protocol this build speaks, sent as `"v"` in every request.
pub const PROTOCOL_VERSION: u64 = 1;

/// How often, at most, the master repeats a progress line while a request waits.
pub const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Status {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        program: Option<String>,
    },
    Reload,
    Start {
        target: String,
    },
    Stop {
        target: String,
    },
    Restart {
        target: String,
    },
    Scale {
        program: String,
        workers: u32,
    },
    /// Recent worker output; with `follow`, the connection then receives every new line.
    Logs {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        target: Option<String>,
        #[serde(default = "default_log_lines")]
        lines: usize,
        #[serde(default)]
        follow: bool,
    },
    /// Sends `signal` (a name, as [`parse_signal`] reads it) to the main process of each
    /// running worker of `target`; with `group`, to each one's whole process group.
    Signal {
        target: String,
        signal: String,
        #[serde(default)]
        group: bool,
    },
    /// A graceful stop of the master, like SIGTERM. Acknowledged at once, then progress
    /// lines until every worker is gone; answered `{}` as the master finishes, and the
    /// connection closes when it exits.
    Shutdown,
    /// Enqueues `jobs` on `queue`, all with `key` (`--key`). Answered with [`Submitted`] once
    /// the jobs are stored (for a durable queue: synced to disk) and, while workers take the
    /// queue's jobs, the backlog is under the flow-control bound. The batch is refused whole
    /// when it would cross `max_pending`, or when a `lines` payload holds a newline. With
    /// `base64`, each job is the base64 (standard alphabet, padded) of its bytes; otherwise
    /// the job is the string's UTF-8 bytes. With `wait`, the master keeps the outcome of
    /// these jobs for this connection until it has sent it: with a later answer to `submit`
    /// ([`Submitted::results`]), or in the stream a [`Request::Results`] starts.
    Submit {
        queue: String,
        jobs: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        key: Option<String>,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        base64: bool,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        wait: bool,
    },
    /// The outcomes of this connection's `wait` jobs not sent yet, streamed in submission
    /// order as [`JobResults`] lines as the jobs end (answered `ok`, or dead-lettered); the
    /// line with the last of them is the answer. Progress lines meanwhile, when asked for.
    Results,
    /// Counts of one queue or of all ([`QueueReport`]); with `dead`, the dead letters of
    /// `queue` (required then) as [`DeadLetters`].
    Queue {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        queue: Option<String>,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        dead: bool,
    },
    /// Puts dead letters of `queue` back: those in `ids`, or all of them with `all`.
    /// Answered with [`Requeued`]; an id that is not a dead letter is an error naming it,
    /// and then nothing is requeued.
    Requeue {
        queue: String,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        ids: Vec<u64>,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        all: bool,
    },
    /// The live members of the cluster ([`MembersReport`]), as this master's cluster helper
    /// last read them from etcd (every third of the lease).
    Members,
}

fn default_log_lines() -> usize {
    50
}

impl Request {
    /// What the client waits for while this request is carried out, for progress lines and
    /// for the client's message when it gives up ("web to stop").
    pub fn describe(&self) -> String {
        match self {
            Request::Status { program: None } => "the status".into(),
            Request::Status { program: Some(p) } => format!("the status of {p}"),
            Request::Reload => "the reload to be applied".into(),
            Request::Start { target } => format!("{target} to run"),
            Request::Stop { target } => format!("{target} to stop"),
            Request::Restart { target } => format!("{target} to restart and run"),
            Request::Scale { program, workers } => {
                format!("{program} to reach {workers} worker(s)")
            }
            Request::Logs { .. } => "the logs".into(),
            Request::Signal { target, .. } => format!("{target} to be signalled"),
            Request::Shutdown => "the master to stop".into(),
            Request::Submit { queue, jobs, .. } => {
                format!("{} job(s) to be stored in queue {queue}", jobs.len())
            }
            Request::Results => "the results of the jobs submitted".into(),
            Request::Queue { queue: None, .. } => "the queue counts".into(),
            Request::Queue {
                queue: Some(q),
                dead: false,
            } => format!("the counts of queue {q}"),
            Request::Queue {
                queue: Some(q),
                dead: true,
            } => format!("the dead letters of queue {q}"),
            Request::Requeue { queue, .. } => format!("dead letters of {queue} to be requeued"),
            Request::Members => "the members of the cluster".into(),
        }
    }

    /// The request as one line, newline included, carrying its protocol version (`"v"`);
    /// with `progress`, asking for progress lines.
    pub fn to_line(&self, progress: bool) -> Result<Vec<u8>, serde_json::Error> {
        if let Request::Submit {
            queue,
            jobs,
            key,
            base64,
            wait,
        } = self
        {
            return Ok(submit_line(
                queue,
                jobs,
                key.as_deref(),
                *base64,
                *wait,
                progress,
            ));
        }
        let mut value = serde_json::to_value(self)?;
        if let Some(map) = value.as_object_mut() {
            if progress {
                map.insert("progress".into(), serde_json::Value::Bool(true));
            }
            map.insert("v".into(), PROTOCOL_VERSION.into());
        }
        let mut line = serde_json::to_vec(&value)?;
        line.push(b'\n');
        Ok(line)
    }
}

/// A `submit` request line, written directly: the same object [`Request::to_line`] makes of
/// any request (fields in another order, which JSON does not care about), without building a
/// JSON tree of the batch first. `submit` sends one per batch of up to a thousand jobs.
fn submit_line(
    queue: &str,
    jobs: &[String],
    key: Option<&str>,
    base64: bool,
    wait: bool,
    progress: bool,
) -> Vec<u8> {
    let size: usize = jobs.iter().map(|j| j.len() + 3).sum();
    let mut out = Vec::with_capacity(size + queue.len() + 96);
    out.extend_from_slice(br#"{"cmd":"submit","queue":"#);
    push_json_str(&mut out, queue);
    out.extend_from_slice(br#","jobs":["#);
    for (i, job) in jobs.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        push_json_str(&mut out, job);
    }
    out.push(b']');
    if let Some(key) = key {
        out.extend_from_slice(br#","key":"#);
        push_json_str(&mut out, key);
    }
    if base64 {
        out.extend_from_slice(br#","base64":true"#);
    }
    if wait {
        out.extend_from_slice(br#","wait":true"#);
    }
    if progress {
        out.extend_from_slice(br#","progress":true"#);
    }
    out.extend_from_slice(br#","v":"#);
    push_u64(&mut out, PROTOCOL_VERSION);
    out.extend_from_slice(b"}\n");
    out
}

/// What a byte of a JSON string is written as, when it is not written as itself: serde_json's
/// escapes (`\"`, `\\`, the five short ones, `\u00XX` for the other control characters).
fn json_escape(b: u8) -> Option<&'static [u8]> {
    const CONTROL: [&[u8]; 32] = [
        b"\\u0000", b"\\u0001", b"\\u0002", b"\\u0003", b"\\u0004", b"\\u0005", b"\\u0006",
        b"\\u0007", b"\\b", b"\\t", b"\\n", b"\\u000b", b"\\f", b"\\r", b"\\u000e", b"\\u000f",
        b"\\u0010", b"\\u0011", b"\\u0012", b"\\u0013", b"\\u0014", b"\\u0015", b"\\u0016",
        b"\\u0017", b"\\u0018", b"\\u0019", b"\\u001a", b"\\u001b", b"\\u001c", b"\\u001d",
        b"\\u001e", b"\\u001f",
    ];
    match b {
        b'"' => Some(b"\\\""),
        b'\\' => Some(b"\\\\"),
        0..=0x1f => Some(CONTROL[usize::from(b)]),
        _ => None,
    }
}

/// The bytes [`json_escape`] escapes, and the closing quote: what a scan of a string stops at.
const ESCAPED: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 0x20 {
        table[b] = true;
        b += 1;
    }
    table[b'"' as usize] = true;
    table[b'\\' as usize] = true;
    table
};

/// Appends `s` as a JSON string, quotes included, byte for byte as serde_json writes it.
pub(crate) fn push_json_str(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    let mut start = 0;
    while let Some(i) = bytes[start..].iter().position(|&b| ESCAPED[usize::from(b)]) {
        let at = start + i;
        out.extend_from_slice(&bytes[start..at]);
        out.extend_from_slice(json_escape(bytes[at]).unwrap_or(&bytes[at..=at]));
        start = at + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// How many bytes [`push_json_str`] appends for `s`.
pub(crate) fn json_str_len(s: &str) -> usize {
    s.bytes()
        .map(|b| json_escape(b).map_or(1, <[u8]>::len))
        .sum::<usize>()
        + 2
}

/// Appends `n` in decimal.
fn push_u64(out: &mut Vec<u8>, mut n: u64) {
    const PAIRS: &[u8; 200] = b"0001020304050607080910111213141516171819\
        2021222324252627282930313233343536373839404142434445464748495051525354555657585960\
        6162636465666768697071727374757677787980818283848586878889909192939495969798\
        99";
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    while n >= 100 {
        let pair = (n % 100) as usize * 2;
        n /= 100;
        at -= 2;
        digits[at..at + 2].copy_from_slice(&PAIRS[pair..pair + 2]);
    }
    if n >= 10 {
        let pair = n as usize * 2;
        at -= 2;
        digits[at..at + 2].copy_from_slice(&PAIRS[pair..pair + 2]);
    } else {
        at -= 1;
        digits[at] = b'0' + n as u8;
    }
    out.extend_from_slice(&digits[at..]);
}

/// Appends one job's outcome as the derived `Serialize` of [`JobResult`] writes it.
fn push_job_result(out: &mut Vec<u8>, r: &JobResult) {
    out.extend_from_slice(br#"{"queue":"#);
    push_json_str(out, &r.queue);
    out.extend_from_slice(br#","id":"#);
    push_u64(out, r.id);
    out.extend_from_slice(match r.outcome {
        JobOutcome::Ok => br#","outcome":"ok","text":"#,
        JobOutcome::Dead => br#","outcome":"dead","text":"#,
    });
    push_json_str(out, &r.text);
    if r.base64 {
        out.extend_from_slice(br#","base64":true"#);
    }
    out.push(b'}');
}

fn push_job_results(out: &mut Vec<u8>, results: &[JobResult]) {
    out.extend_from_slice(br#""results":["#);
    for (i, r) in results.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        push_job_result(out, r);
    }
    out.push(b']');
}

/// The line of a `submit` or `results` answer, written directly, byte for byte what the
/// derived serialization writes (a unit test holds them together): these carry one entry per
/// job submitted with `wait`, and the generic path spent more on them than the master on the
/// jobs themselves. `None` for every other response.
fn job_answer_line(response: &Response) -> Option<Vec<u8>> {
    let Response::Ok(answer) = response else {
        return None;
    };
    let results = match answer {
        Answer::Submitted(s) => &s.results,
        Answer::Results(r) => &r.results,
        _ => return None,
    };
    let size: usize = results
        .iter()
        .map(|r| r.queue.len() + r.text.len() + 64)
        .sum();
    let mut out = Vec::with_capacity(size + 96);
    out.extend_from_slice(br#"{"ok":true,"result":{"#);
    match answer {
        Answer::Submitted(s) => {
            out.extend_from_slice(br#""queue":"#);
            push_json_str(&mut out, &s.queue);
            out.extend_from_slice(br#","first_id":"#);
            push_u64(&mut out, s.first_id);
            out.extend_from_slice(br#","count":"#);
            push_u64(&mut out, s.count);
            if !s.results.is_empty() {
                out.push(b',');
                push_job_results(&mut out, &s.results);
            }
        }
        _ => push_job_results(&mut out, results),
    }
    out.extend_from_slice(b"}}\n");
    Some(out)
}

/// A line the master sends before the answer of a request that waits, when the request asked
/// for it: `{"progress":"waiting for web to stop"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Progress {
    pub progress: String,
}

impl Progress {
    /// The progress line, newline included.
    pub fn to_line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self).unwrap_or_else(|_| br#"{"progress":""}"#.to_vec());
        line.push(b'\n');
        line
    }
}

/// A line a client reads: progress, or the response.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Progress(String),
    Response(Response),
}

/// Parses one line from the master.
pub fn parse_message(line: &str) -> Result<Message, serde_json::Error> {
    if let Ok(p) = serde_json::from_str::<Progress>(line) {
        return Ok(Message::Progress(p.progress));
    }
    if let Some(r) = parse_job_answer(line) {
        return Ok(Message::Response(r));
    }
    serde_json::from_str(line).map(Message::Response)
}

/// The answer of `submit` or `results`, as exactly that shape, or `None`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JobEnvelope {
    ok: bool,
    result: JobAnswer,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JobAnswer {
    #[serde(default)]
    queue: Option<String>,
    #[serde(default)]
    first_id: Option<u64>,
    #[serde(default)]
    count: Option<u64>,
    #[serde(default)]
    results: Option<Vec<JobResult>>,
}

/// The answers `submit --wait` reads by the thousand, parsed straight into their type: the
/// untagged [`Answer`] buffers a whole line and tries every earlier variant on it first. A line
/// of exactly the shape of [`Submitted`] or of [`JobResults`] (no other field) is what the
/// generic parse makes of it too, since no earlier variant takes those fields; anything else
/// is left to the generic parse (`None`).
fn parse_job_answer(line: &str) -> Option<Response> {
    if let Some(r) = Scan::job_answer(line) {
        return Some(r);
    }
    let JobEnvelope { ok: true, result } = serde_json::from_str(line).ok()? else {
        return None;
    };
    let answer = match result {
        JobAnswer {
            queue: Some(queue),
            first_id: Some(first_id),
            count: Some(count),
            results,
        } => Answer::Submitted(Submitted {
            queue,
            first_id,
            count,
            results: results.unwrap_or_default(),
        }),
        JobAnswer {
            queue: None,
            first_id: None,
            count: None,
            results: Some(results),
        } => Answer::Results(JobResults { results }),
        _ => return None,
    };
    Some(Response::Ok(answer))
}

/// One line of worker output, as `logs` sends it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    /// `PROGRAM.ID`.
    pub source: String,
    /// `stdout` or `stderr` (the worker's output), or `plumule` (the supervisor's own events about it).
    pub stream: String,
    /// The line, invalid UTF-8 replaced.
    pub line: String,
}

impl From<&crate::output::LogLine> for LogEntry {
    fn from(l: &crate::output::LogLine) -> Self {
        LogEntry {
            time: humantime::format_rfc3339_millis(l.time).to_string(),
            source: l.source.clone(),
            stream: l.stream.as_str().to_string(),
            line: String::from_utf8_lossy(&l.line).into_owned(),
        }
    }
}

/// One answer line: what a request produced, or why it did not.
///
/// On the wire it is `{"ok":true,"result":{…}}` or `{"ok":false,"error":"…"}` (the
/// envelope); in Rust, only the combinations that mean something exist.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(from = "Envelope")]
pub enum Response {
    Ok(Answer),
    Error(String),
}

/// The `result` of a successful request; which one is known from the request sent.
///
/// Untagged on the wire: the variants are told apart by their fields, tried in this order,
/// and [`Done`] matches only `{}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Answer {
    /// `status`.
    Status(StatusReport),
    /// `reload`.
    Reload(ReloadResult),
    /// `signal` (before `scale`: its fields are a superset of a scale answer's `program`).
    Signal(SignalResult),
    /// `scale`.
    Scale(ScaleResult),
    /// `logs`, and each batch of `logs --follow`.
    Logs(LogsResult),
    /// `queue`.
    Queues(QueueReport),
    /// `queue --dead`.
    DeadLetters(DeadLetters),
    /// `requeue`.
    Requeued(Requeued),
    /// `submit`.
    Submitted(Submitted),
    /// `results`.
    Results(JobResults),
    /// `members`.
    Members(MembersReport),
    /// `start`, `stop`, `restart`: `{}`.
    Done(Done),
}

/// The answer of `members`: the live masters of the cluster, by node name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembersReport {
    pub members: Vec<crate::cluster::Member>,
}

/// The answer of `start`, `stop` and `restart`: nothing but "it is done", `{}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Done {}

/// The answer of `reload`: one line per change applied, in the order they were applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadResult {
    pub changes: Vec<String>,
}

/// The answer of `scale`, once the count is reached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScaleResult {
    pub program: String,
    pub workers: u32,
}

/// The answer of `signal`: which workers of `program` were sent `signal` (by name, "HUP"),
/// to their process groups when `group`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignalResult {
    pub program: String,
    pub signal: String,
    pub group: bool,
    pub workers: Vec<u32>,
}

/// The answer of `logs`: the last lines kept, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogsResult {
    pub lines: Vec<LogEntry>,
}

/// The answer of `submit`: the batch is stored. Its jobs have the ids `first_id` to
/// `first_id + count - 1` (a batch is stored in one piece, so its ids are consecutive).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Submitted {
    pub queue: String,
    pub first_id: u64,
    pub count: u64,
    /// With `wait`: outcomes of this connection's earlier jobs that have ended since the last
    /// answer, in submission order (the rest come with [`Request::Results`]), so that a long
    /// stream of submissions does not leave every result waiting in the master.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub results: Vec<JobResult>,
}

/// The answer of `results`: one entry per job submitted with `wait` on this connection, in
/// submission order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobResults {
    pub results: Vec<JobResult>,
}

/// How one job ended, as `submit --wait` prints it: `ok RESULT` or `dead REASON`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobResult {
    pub queue: String,
    pub id: u64,
    pub outcome: JobOutcome,
    /// The result (`ok`) or the reason (`dead`); base64 of the bytes when `base64`, else
    /// the bytes as UTF-8.
    pub text: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub base64: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobOutcome {
    Ok,
    Dead,
}

/// The answer of `queue`: SPEC §9's `queue --json`, as is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueReport {
    pub queues: Vec<QueueCounts>,
}

/// One queue's counts. `pending` and `in_flight` are now; `done`, `retried` (redeliveries,
/// whatever their cause) and `dead` count since the queue was created (for a durable queue,
/// `done` and `retried` since the master started; `dead` is the dead letters kept).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueCounts {
    pub name: String,
    pub pending: u64,
    pub in_flight: u64,
    pub done: u64,
    pub retried: u64,
    pub dead: u64,
}

/// The answer of `queue QUEUE --dead`: its dead letters, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetters {
    pub queue: String,
    pub dead: Vec<DeadLetter>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub id: u64,
    pub attempts: u32,
    /// Why it died; base64 when `reason_base64`, else UTF-8.
    pub reason: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reason_base64: bool,
    /// The job's payload; base64 when `base64`, else UTF-8.
    pub payload: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub base64: bool,
}

/// The answer of `requeue`: how many dead letters are pending again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Requeued {
    pub queue: String,
    pub requeued: u64,
}

/// Bytes as a JSON string: the UTF-8 text itself when they are valid UTF-8, else their base64
/// (standard alphabet, padded) and `true`.
pub fn encode_bytes(bytes: &[u8]) -> (String, bool) {
    use base64::Engine;
    match std::str::from_utf8(bytes) {
        Ok(s) => (s.to_owned(), false),
        Err(_) => (
            base64::engine::general_purpose::STANDARD.encode(bytes),
            true,
        ),
    }
}

/// [`encode_bytes`] for bytes the caller gives up: valid UTF-8 becomes the string without a
/// copy.
pub fn encode_owned(bytes: Vec<u8>) -> (String, bool) {
    match String::from_utf8(bytes) {
        Ok(s) => (s, false),
        Err(e) => encode_bytes(e.as_bytes()),
    }
}

/// The bytes a JSON string stands for: as [`encode_bytes`] made it.
pub fn decode_bytes(text: &str, base64: bool) -> Result<Vec<u8>, base64::DecodeError> {
    use base64::Engine;
    if base64 {
        base64::engine::general_purpose::STANDARD.decode(text)
    } else {
        Ok(text.as_bytes().to_vec())
    }
}

macro_rules! answer_from {
    ($($t:ident => $v:ident),* $(,)?) => {
        $(impl From<$t> for Answer {
            fn from(x: $t) -> Self {
                Answer::$v(x)
            }
        })*
    };
}

answer_from!(
    MembersReport => Members,
    QueueReport => Queues,
    DeadLetters => DeadLetters,
    Requeued => Requeued,
    Submitted => Submitted,
    JobResults => Results,
);

/// A response as it is read; [`Response`] is what both ends work with (written through
/// [`EnvelopeRef`]).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    result: Option<Answer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// The envelope of a response being written: borrowed, so that writing a response does not
/// copy it first (an answer may carry thousands of job results).
#[derive(Serialize)]
struct EnvelopeRef<'a> {
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<&'a Answer>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}

impl Serialize for Response {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let envelope = match self {
            Response::Ok(answer) => EnvelopeRef {
                ok: true,
                result: Some(answer),
                error: None,
            },
            Response::Error(message) => EnvelopeRef {
                ok: false,
                result: None,
                error: Some(message),
            },
        };
        envelope.serialize(serializer)
    }
}

impl From<Envelope> for Response {
    /// Lenient about what a hand-written peer may leave out: `{"ok":true}` is done, and
    /// `{"ok":false}` a refusal without a reason.
    fn from(e: Envelope) -> Self {
        match e {
            Envelope {
                ok: true, result, ..
            } => Response::Ok(result.unwrap_or(Answer::Done(Done {}))),
            Envelope { error, .. } => Response::Error(
                error.unwrap_or_else(|| "the master refused the request".to_string()),
            ),
        }
    }
}

impl Response {
    pub fn ok(answer: impl Into<Answer>) -> Response {
        Response::Ok(answer.into())
    }

    /// `{}`: what `start`, `stop` and `restart` answer once done.
    pub fn done() -> Response {
        Response::Ok(Answer::Done(Done {}))
    }

    pub fn error(message: impl ToString) -> Response {
        Response::Error(message.to_string())
    }

    /// The response as one line, newline included.
    pub fn to_line(&self) -> Vec<u8> {
        if let Some(line) = job_answer_line(self) {
            return line;
        }
        let mut line = serde_json::to_vec(self).unwrap_or_else(|_| br#"{"ok":false}"#.to_vec());
        line.push(b'\n');
        line
    }
}

impl From<StatusReport> for Answer {
    fn from(s: StatusReport) -> Self {
        Answer::Status(s)
    }
}

impl From<ReloadResult> for Answer {
    fn from(r: ReloadResult) -> Self {
        Answer::Reload(r)
    }
}

impl From<ScaleResult> for Answer {
    fn from(s: ScaleResult) -> Self {
        Answer::Scale(s)
    }
}

impl From<SignalResult> for Answer {
    fn from(s: SignalResult) -> Self {
        Answer::Signal(s)
    }
}

impl From<LogsResult> for Answer {
    fn from(l: LogsResult) -> Self {
        Answer::Logs(l)
    }
}

impl From<Done> for Answer {
    fn from(d: Done) -> Self {
        Answer::Done(d)
    }
}

/// Why a request line was refused; the text is what the client is told.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("request is not UTF-8")]
    NotUtf8,
    #[error("bad request: {0}")]
    Malformed(#[source] serde_json::Error),
    /// `"v"` names a version of the control protocol this master does not speak.
    #[error(
        "control protocol version {client} is not spoken by this master (it speaks version \
         {PROTOCOL_VERSION}): use the plumule client of the master's version"
    )]
    Version { client: u64 },
}

/// Parses one request line.
pub fn parse_request(line: &[u8]) -> Result<Request, RequestError> {
    parse_request_line(line).map(|(req, _)| req)
}

/// Parses one request line, and whether it asks for progress lines (`"progress":true`).
/// A `"v"` other than [`PROTOCOL_VERSION`] is refused ([`RequestError::Version`]); none is 1.
pub fn parse_request_line(line: &[u8]) -> Result<(Request, bool), RequestError> {
    use serde::de::Error as _;
    let text = std::str::from_utf8(line).map_err(|_| RequestError::NotUtf8)?;
    if let Some(submit) = parse_submit(text) {
        return Ok(submit);
    }
    let mut value: serde_json::Value =
        serde_json::from_str(text.trim()).map_err(RequestError::Malformed)?;
    // The version first: a request of another version may not parse as one of ours.
    match value.as_object_mut().and_then(|m| m.remove("v")) {
        None => {}
        Some(v) => match v.as_u64() {
            Some(PROTOCOL_VERSION) => {}
            Some(client) => return Err(RequestError::Version { client }),
            None => {
                return Err(RequestError::Malformed(serde_json::Error::custom(
                    "`v` must be the protocol version, a number",
                )))
            }
        },
    }
    let progress = match value.as_object_mut().and_then(|m| m.remove("progress")) {
        None => false,
        Some(serde_json::Value::Bool(b)) => b,
        Some(_) => {
            return Err(RequestError::Malformed(serde_json::Error::custom(
                "`progress` must be true or false",
            )))
        }
    };
    let req = serde_json::from_value(value).map_err(RequestError::Malformed)?;
    Ok((req, progress))
}

/// Reads back exactly the bytes [`job_answer_line`] writes, for strings without an escape:
/// any other byte (an escape, a space, another field order) ends the scan with `None`, and
/// the line goes to the serde parse, which reads it the same way. This is what `submit
/// --wait` spends most of its time on otherwise.
struct Scan<'a> {
    rest: &'a str,
}

impl<'a> Scan<'a> {
    fn job_answer(line: &'a str) -> Option<Response> {
        let mut s = Scan {
            rest: line.trim_end_matches(['\n', '\r']),
        };
        s.lit(r#"{"ok":true,"result":{"#)?;
        let answer = if s.lit(r#""queue":"#).is_some() {
            let queue = s.string()?.to_string();
            s.lit(r#","first_id":"#)?;
            let first_id = s.number()?;
            s.lit(r#","count":"#)?;
            let count = s.number()?;
            let results = match s.lit(",") {
                Some(()) => s.results()?,
                None => Vec::new(),
            };
            Answer::Submitted(Submitted {
                queue,
                first_id,
                count,
                results,
            })
        } else {
            Answer::Results(JobResults {
                results: s.results()?,
            })
        };
        s.lit("}}")?;
        s.rest.is_empty().then_some(Response::Ok(answer))
    }

    /// A `submit` line exactly as [`submit_line`] writes it, strings without escapes.
    fn submit(line: &'a str) -> Option<(Request, bool)> {
        let mut s = Scan {
            rest: line.trim_end_matches(['\n', '\r']),
        };
        s.lit(r#"{"cmd":"submit","queue":"#)?;
        let queue = s.string()?.to_string();
        s.lit(r#","jobs":["#)?;
        // At most one job per comma, and one more: the vector is sized once.
        let mut jobs = Vec::with_capacity(s.rest.bytes().filter(|&b| b == b',').count() + 1);
        if s.lit("]").is_none() {
            loop {
                jobs.push(s.string()?.to_string());
                if s.lit(",").is_none() {
                    break;
                }
            }
            s.lit("]")?;
        }
        let key = match s.lit(r#","key":"#) {
            Some(()) => Some(s.string()?.to_string()),
            None => None,
        };
        let base64 = s.lit(r#","base64":true"#).is_some();
        let wait = s.lit(r#","wait":true"#).is_some();
        let progress = s.lit(r#","progress":true"#).is_some();
        s.lit(r#","v":1}"#)?;
        if !s.rest.is_empty() {
            return None;
        }
        let req = Request::Submit {
            queue,
            jobs,
            key,
            base64,
            wait,
        };
        Some((req, progress))
    }

    // Inlined, each literal's comparison is made with its length known.
    #[inline(always)]
    fn lit(&mut self, text: &'static str) -> Option<()> {
        self.rest = self.rest.strip_prefix(text)?;
        Some(())
    }

    /// A string without escapes or control characters, quotes dropped.
    fn string(&mut self) -> Option<&'a str> {
        let body = self.rest.strip_prefix('"')?;
        let end = body.bytes().position(|b| ESCAPED[usize::from(b)])?;
        if body.as_bytes()[end] != b'"' {
            return None;
        }
        self.rest = &body[end + 1..];
        Some(&body[..end])
    }

    /// A decimal u64 as JSON writes it: no sign, no leading zero, no fraction.
    fn number(&mut self) -> Option<u64> {
        let digits = self.rest.bytes().take_while(u8::is_ascii_digit).count();
        let text = &self.rest[..digits];
        if digits == 0 || (digits > 1 && text.starts_with('0')) {
            return None;
        }
        let mut n: u64 = 0;
        for d in text.bytes() {
            n = n.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
        }
        self.rest = &self.rest[digits..];
        matches!(self.rest.as_bytes().first(), Some(b',' | b'}')).then_some(n)
    }

    fn results(&mut self) -> Option<Vec<JobResult>> {
        self.lit(r#""results":["#)?;
        let mut results = Vec::new();
        if self.lit("]").is_some() {
            return Some(results);
        }
        let mut queue: Option<&str> = None;
        loop {
            self.lit(r#"{"queue":"#)?;
            let q = self.string()?;
            // One queue per answer in practice: its name is copied once per result, not parsed.
            let q = match queue {
                Some(prev) if prev == q => prev,
                _ => *queue.insert(q),
            };
            self.lit(r#","id":"#)?;
            let id = self.number()?;
            let outcome = if self.lit(r#","outcome":"ok","text":"#).is_some() {
                JobOutcome::Ok
            } else {
                self.lit(r#","outcome":"dead","text":"#)?;
                JobOutcome::Dead
            };
            let text = self.string()?.to_string();
            let base64 = self.lit(r#","base64":true"#).is_some();
            self.lit("}")?;
            results.push(JobResult {
                queue: q.to_string(),
                id,
                outcome,
                text,
                base64,
            });
            if self.lit(",").is_none() {
                break;
            }
        }
        self.lit("]")?;
        Some(results)
    }
}

/// A `submit` request, as exactly that shape, or `None`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubmitRequest {
    cmd: SubmitCmd,
    queue: String,
    jobs: Vec<String>,
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    base64: bool,
    #[serde(default)]
    wait: bool,
    #[serde(default)]
    progress: bool,
    #[serde(default)]
    v: Option<u64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum SubmitCmd {
    Submit,
}

/// A `submit` line parsed straight into its request: the generic path builds a JSON tree of
/// the batch and then a buffered copy of it before the request. A line that is not a
/// well-formed `submit` of this version (any other command, a wrong or missing field, another
/// `"v"`) is left to the generic path (`None`), which takes it or says what is wrong, as
/// before.
fn parse_submit(text: &str) -> Option<(Request, bool)> {
    if let Some(submit) = Scan::submit(text) {
        return Some(submit);
    }
    let r: SubmitRequest = serde_json::from_str(text).ok()?;
    let SubmitCmd::Submit = r.cmd;
    if r.v.is_some_and(|v| v != PROTOCOL_VERSION) {
        return None;
    }
    let req = Request::Submit {
        queue: r.queue,
        jobs: r.jobs,
        key: r.key,
        base64: r.base64,
        wait: r.wait,
    };
    Some((req, r.progress))
}

/// A signal as `plumule signal` takes it: a name exactly as the config file's `stop_signal`
/// ("HUP", "SIGHUP", "usr1"; see [`crate::config::parse_signal`]). Numbers are refused, as
/// in the file (they differ across architectures), with the name to write instead.
pub fn parse_signal(text: &str) -> Result<nix::sys::signal::Signal, String> {
    let trimmed = text.trim();
    if let Ok(n) = trimmed.parse::<i32>() {
        return Err(match nix::sys::signal::Signal::try_from(n) {
            Ok(s) => format!(
                "signal numbers are not accepted (they differ across architectures): \
                 write `{}`",
                crate::slot::signal_name(s)
            ),
            Err(_) => format!(
                "signal numbers are not accepted, and `{trimmed}` is none; \
                 use a name like \"TERM\", \"HUP\" or \"USR1\""
            ),
        });
    }
    crate::config::parse_signal(text)
}

/// `PROGRAM` or `PROGRAM.ID`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub program: String,
    pub id: Option<u32>,
}

/// A target whose worker id is not a number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad worker id in `{target}`: expected PROGRAM or PROGRAM.ID")]
pub struct TargetError {
    pub target: String,
}

impl Target {
    pub fn parse(s: &str) -> Result<Target, TargetError> {
        match s.split_once('.') {
            None => Ok(Target {
                program: s.to_string(),
                id: None,
            }),
            Some((program, id)) => match id.parse() {
                Ok(id) => Ok(Target {
                    program: program.to_string(),
                    id: Some(id),
                }),
                Err(_) => Err(TargetError {
                    target: s.to_string(),
                }),
            },
        }
    }
}

/// `status --json`, exactly as SPEC §9 shapes it (fields in SPEC's order).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub programs: Vec<ProgramStatus>,
}

impl StatusReport {
    /// Every worker entry with its program, in order.
    pub fn workers(&self) -> impl Iterator<Item = (&ProgramStatus, &WorkerStatus)> {
        self.programs
            .iter()
            .flat_map(|p| p.workers.iter().map(move |w| (p, w)))
    }

    /// Whether any worker is `failed` (`status` exits 3 then).
    pub fn any_failed(&self) -> bool {
        self.workers().any(|(_, w)| w.state == "failed")
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProgramStatus {
    pub name: String,
    pub workers: Vec<WorkerStatus>,
}

/// One worker slot (or, during a rolling restart, the old process beside it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerStatus {
    pub id: u32,
    pub pid: Option<i32>,
    /// Exactly one of the states of SPEC §3.
    pub state: String,
    /// Why it is in that state ("waiting for lock L").
    pub detail: Option<String>,
    pub uptime_s: Option<f64>,
    pub restarts: u32,
    pub last_exit: Option<LastExit>,
    /// The locks it holds.
    pub locks: Vec<String>,
    pub in_flight: u32,
    /// The last `STATUS=` the worker sent.
    pub status: Option<String>,
}

/// How the last process of a slot ended: `{"code":1}` or `{"signal":"KILL"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LastExit {
    Code { code: i32 },
    Signal { signal: String },
}

impl From<crate::slot::Exit> for LastExit {
    fn from(e: crate::slot::Exit) -> Self {
        match e {
            crate::slot::Exit::Code(code) => LastExit::Code { code },
            crate::slot::Exit::Signal(s) => LastExit::Signal {
                signal: crate::slot::signal_name(s).to_string(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_from_their_documented_lines() {
        let table = [
            (r#"{"cmd":"status"}"#, Request::Status { program: None }),
            (
                r#"{"cmd":"status","program":"web"}"#,
                Request::Status {
                    program: Some("web".into()),
                },
            ),
            (r#"{"cmd":"reload"}"#, Request::Reload),
            (
                r#"{"cmd":"start","target":"web.2"}"#,
                Request::Start {
                    target: "web.2".into(),
                },
            ),
            (
                r#"{"cmd":"stop","target":"web"}"#,
                Request::Stop {
                    target: "web".into(),
                },
            ),
            (
                r#"{"cmd":"restart","target":"web"}"#,
                Request::Restart {
                    target: "web".into(),
                },
            ),
            (
                r#" {"cmd":"scale","program":"web","workers":3}"#,
                Request::Scale {
                    program: "web".into(),
                    workers: 3,
                },
            ),
            (
                r#"{"cmd":"logs"}"#,
                Request::Logs {
                    target: None,
                    lines: 50,
                    follow: false,
                },
            ),
            (
                r#"{"cmd":"logs","target":"web.1","lines":5,"follow":true}"#,
                Request::Logs {
                    target: Some("web.1".into()),
                    lines: 5,
                    follow: true,
                },
            ),
            (
                r#"{"cmd":"signal","target":"web.1","signal":"HUP"}"#,
                Request::Signal {
                    target: "web.1".into(),
                    signal: "HUP".into(),
                    group: false,
                },
            ),
            (
                r#"{"cmd":"signal","target":"web","signal":"USR1","group":true}"#,
                Request::Signal {
                    target: "web".into(),
                    signal: "USR1".into(),
                    group: true,
                },
            ),
            (r#"{"cmd":"shutdown"}"#, Request::Shutdown),
        ];
        for (line, expected) in table {
            assert_eq!(
                parse_request(line.as_bytes()).ok(),
                Some(expected.clone()),
                "{line}"
            );
            let round = serde_json::to_string(&expected).unwrap();
            assert_eq!(parse_request(round.as_bytes()).ok(), Some(expected));
        }
    }

    #[test]
    fn progress_is_asked_for_beside_cmd_and_sent_on_its_own_line() {
        let stop = Request::Stop {
            target: "web".into(),
        };
        let line = stop.to_line(true).unwrap();
        assert_eq!(
            String::from_utf8(line.clone()).unwrap(),
            "{\"cmd\":\"stop\",\"progress\":true,\"target\":\"web\",\"v\":1}\n"
        );
        assert_eq!(parse_request_line(&line).unwrap(), (stop.clone(), true));
        let plain = stop.to_line(false).unwrap();
        assert_eq!(parse_request_line(&plain).unwrap(), (stop.clone(), false));
        assert!(parse_request_line(br#"{"cmd":"stop","target":"web","progress":1}"#).is_err());
        let p = Progress {
            progress: format!("waiting for {}", stop.describe()),
        };
        let line = String::from_utf8(p.to_line()).unwrap();
        assert_eq!(line, "{\"progress\":\"waiting for web to stop\"}\n");
        assert_eq!(
            parse_message(line.trim()).unwrap(),
            Message::Progress("waiting for web to stop".into())
        );
        assert_eq!(
            parse_message(r#"{"ok":true,"result":{}}"#).unwrap(),
            Message::Response(Response::done())
        );
        assert!(parse_message(r#"{"progress":"x","ok":true}"#).is_err());
    }

    /// Every request line carries the version; none means 1; another one is refused with
    /// a message naming both versions, before the request itself is read.
    #[test]
    fn requests_carry_the_protocol_version_and_other_versions_are_refused() {
        let status = Request::Status { program: None };
        let line = status.to_line(false).unwrap();
        let value: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(value["v"], PROTOCOL_VERSION);
        assert_eq!(parse_request_line(&line).unwrap(), (status.clone(), false));
        assert_eq!(
            parse_request(br#"{"cmd":"status"}"#).unwrap(),
            status,
            "no version is version 1"
        );
        assert_eq!(parse_request(br#"{"cmd":"status","v":1}"#).unwrap(), status);
        for (line, client) in [
            (&br#"{"cmd":"status","v":2}"#[..], 2),
            (br#"{"v":0,"cmd":"status"}"#, 0),
            // A newer client's request that this master could not even parse.
            (br#"{"cmd":"teleport","to":"mars","v":7}"#, 7),
        ] {
            let err = parse_request(line).unwrap_err().to_string();
            assert_eq!(
                err,
                format!(
                    "control protocol version {client} is not spoken by this master (it \
                     speaks version 1): use the plumule client of the master's version"
                )
            );
        }
        for bad in [
            &br#"{"cmd":"status","v":"1"}"#[..],
            br#"{"cmd":"status","v":-1}"#,
        ] {
            let err = parse_request(bad).unwrap_err().to_string();
            assert!(err.starts_with("bad request: `v` must be"), "{err}");
        }
    }

    #[test]
    fn bad_requests_are_errors_not_panics() {
        for line in [
            &b"\xff\xfe"[..],
            b"",
            b"{}",
            b"[]",
            b"null",
            br#"{"cmd":"explode"}"#,
            br#"{"cmd":"scale","program":"web","workers":-1}"#,
            br#"{"cmd":"scale","program":"web","workers":"many"}"#,
            br#"{"cmd":"status","extra":1}"#,
            br#"{"cmd":"start"}"#,
        ] {
            let err = parse_request(line).unwrap_err().to_string();
            assert!(
                err == "request is not UTF-8" || err.starts_with("bad request: "),
                "{err}"
            );
        }
    }

    /// The names the config file takes, and numbers refused with the name to write.
    #[test]
    fn signals_are_names_as_in_the_config_file() {
        use nix::sys::signal::Signal;
        for (text, signal) in [
            ("HUP", Signal::SIGHUP),
            ("SIGHUP", Signal::SIGHUP),
            ("usr1", Signal::SIGUSR1),
            ("sigUsr2", Signal::SIGUSR2),
            (" TERM ", Signal::SIGTERM),
        ] {
            assert_eq!(parse_signal(text), Ok(signal), "{text}");
        }
        assert_eq!(
            parse_signal("9").unwrap_err(),
            "signal numbers are not accepted (they differ across architectures): write `KILL`"
        );
        assert!(parse_signal("99").unwrap_err().contains("`99` is none"));
        assert!(parse_signal("TREM")
            .unwrap_err()
            .contains("did you mean `TERM`?"));
        assert!(parse_signal("").is_err());
        assert!(parse_signal("SIG").is_err());
    }

    #[test]
    fn targets() {
        assert_eq!(
            Target::parse("web"),
            Ok(Target {
                program: "web".into(),
                id: None
            })
        );
        assert_eq!(
            Target::parse("web.3"),
            Ok(Target {
                program: "web".into(),
                id: Some(3)
            })
        );
        assert_eq!(
            Target::parse("web.x").unwrap_err().to_string(),
            "bad worker id in `web.x`: expected PROGRAM or PROGRAM.ID"
        );
        assert!(Target::parse("web.-1").is_err());
    }

    #[test]
    fn last_exit_serialises_as_spec_shapes_it() {
        let code: LastExit = crate::slot::Exit::Code(1).into();
        assert_eq!(serde_json::to_string(&code).unwrap(), r#"{"code":1}"#);
        let sig: LastExit = crate::slot::Exit::Signal(nix::sys::signal::Signal::SIGKILL).into();
        assert_eq!(serde_json::to_string(&sig).unwrap(), r#"{"signal":"KILL"}"#);
    }

    fn worker(id: u32) -> WorkerStatus {
        WorkerStatus {
            id,
            pid: Some(123),
            state: "running".into(),
            detail: Some("waiting for lock L".into()),
            uptime_s: Some(1.5),
            restarts: 2,
            last_exit: Some(LastExit::Signal {
                signal: "KILL".into(),
            }),
            locks: vec!["L".into()],
            in_flight: 0,
            status: Some("text from STATUS=".into()),
        }
    }

    fn report() -> StatusReport {
        StatusReport {
            programs: vec![
                ProgramStatus {
                    name: "web".into(),
                    workers: vec![worker(0), worker(1)],
                },
                ProgramStatus {
                    name: "idle".into(),
                    workers: vec![WorkerStatus {
                        id: 0,
                        pid: None,
                        state: "stopped".into(),
                        detail: None,
                        uptime_s: None,
                        restarts: 0,
                        last_exit: Some(LastExit::Code { code: 1 }),
                        locks: vec![],
                        in_flight: 0,
                        status: None,
                    }],
                },
                ProgramStatus {
                    name: "none".into(),
                    workers: vec![],
                },
            ],
        }
    }

    /// Every answer, as a response line, reads back as itself.
    #[test]
    fn every_answer_round_trips_through_its_line() {
        let answers = [
            Response::ok(report()),
            Response::ok(StatusReport { programs: vec![] }),
            Response::ok(ReloadResult {
                changes: vec!["web: workers 3 -> 2".into()],
            }),
            Response::ok(ReloadResult { changes: vec![] }),
            Response::ok(ScaleResult {
                program: "web".into(),
                workers: 8,
            }),
            Response::ok(ScaleResult {
                program: "web".into(),
                workers: 0,
            }),
            Response::ok(LogsResult {
                lines: vec![LogEntry {
                    time: "2024-01-02T03:04:05.678Z".into(),
                    source: "web.1".into(),
                    stream: "stdout".into(),
                    line: "hello \"world\"".into(),
                }],
            }),
            Response::ok(LogsResult { lines: vec![] }),
            Response::ok(SignalResult {
                program: "web".into(),
                signal: "HUP".into(),
                group: true,
                workers: vec![0, 2],
            }),
            Response::ok(SignalResult {
                program: "web".into(),
                signal: "USR1".into(),
                group: false,
                workers: vec![],
            }),
            Response::done(),
            Response::error("no program named web"),
        ];
        for response in answers {
            let line = response.to_line();
            assert_eq!(line.last(), Some(&b'\n'));
            assert!(!line[..line.len() - 1].contains(&b'\n'), "one line");
            let back: Response = serde_json::from_slice(&line).unwrap();
            assert_eq!(back, response, "{}", String::from_utf8_lossy(&line));
        }
    }

    /// The lines README and SPEC document, read as the typed answers.
    #[test]
    fn documented_answer_lines_decode_as_their_answers() {
        let table = [
            (r#"{"ok":true,"result":{}}"#, Response::done()),
            (r#"{"ok":true}"#, Response::done()),
            (
                r#"{"ok":false,"error":"no program named web"}"#,
                Response::error("no program named web"),
            ),
            (
                r#"{"ok":false}"#,
                Response::error("the master refused the request"),
            ),
            (
                r#"{"ok":true,"result":{"changes":["web: workers 3 -> 2"]}}"#,
                Response::ok(ReloadResult {
                    changes: vec!["web: workers 3 -> 2".into()],
                }),
            ),
            (
                r#"{"ok":true,"result":{"program":"web","workers":8}}"#,
                Response::ok(ScaleResult {
                    program: "web".into(),
                    workers: 8,
                }),
            ),
            (
                r#"{"ok":true,"result":{"lines":[]}}"#,
                Response::ok(LogsResult { lines: vec![] }),
            ),
            (
                r#"{"ok":true,"result":{"programs":[]}}"#,
                Response::ok(StatusReport { programs: vec![] }),
            ),
        ];
        for (line, expected) in table {
            let got: Response = serde_json::from_str(line).unwrap();
            assert_eq!(got, expected, "{line}");
        }
        // `{}` is the only shape `Done` accepts: an unknown result is an error, not "done".
        assert!(serde_json::from_str::<Response>(r#"{"ok":true,"result":{"what":1}}"#).is_err());
        assert!(serde_json::from_str::<Response>(r#"{"ok":true,"extra":1}"#).is_err());
    }

    /// The wire format of answers is SPEC §9's and README's, byte for byte.
    #[test]
    fn answers_serialise_exactly_as_documented() {
        let web = StatusReport {
            programs: vec![ProgramStatus {
                name: "web".into(),
                workers: vec![WorkerStatus {
                    last_exit: Some(LastExit::Code { code: 1 }),
                    detail: None,
                    ..worker(0)
                }],
            }],
        };
        assert_eq!(
            serde_json::to_string(&web).unwrap(),
            r#"{"programs":[{"name":"web","workers":[{"id":0,"pid":123,"state":"running","detail":null,"uptime_s":1.5,"restarts":2,"last_exit":{"code":1},"locks":["L"],"in_flight":0,"status":"text from STATUS="}]}]}"#
        );
        let idle = WorkerStatus {
            pid: None,
            uptime_s: None,
            last_exit: None,
            locks: vec![],
            status: None,
            ..worker(3)
        };
        assert_eq!(
            serde_json::to_string(&idle).unwrap(),
            r#"{"id":3,"pid":null,"state":"running","detail":"waiting for lock L","uptime_s":null,"restarts":2,"last_exit":null,"locks":[],"in_flight":0,"status":null}"#
        );
        let lines = |r: Response| String::from_utf8(r.to_line()).unwrap();
        assert_eq!(lines(Response::done()), "{\"ok\":true,\"result\":{}}\n");
        assert_eq!(
            lines(Response::error("no program named web")),
            "{\"ok\":false,\"error\":\"no program named web\"}\n"
        );
        assert_eq!(
            lines(Response::ok(ReloadResult {
                changes: vec!["web: workers 3 -> 2".into()]
            })),
            "{\"ok\":true,\"result\":{\"changes\":[\"web: workers 3 -> 2\"]}}\n"
        );
        assert_eq!(
            lines(Response::ok(ScaleResult {
                program: "web".into(),
                workers: 8
            })),
            "{\"ok\":true,\"result\":{\"program\":\"web\",\"workers\":8}}\n"
        );
    }

    /// The field names of a status report are exactly SPEC §9's, at every level.
    #[test]
    fn status_report_has_exactly_the_spec_field_names() {
        fn keys(v: &serde_json::Value) -> Vec<&str> {
            let mut k: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
            k.sort();
            k
        }
        let v = serde_json::to_value(report()).unwrap();
        assert_eq!(keys(&v), ["programs"]);
        let mut spec = [
            "id",
            "pid",
            "state",
            "detail",
            "uptime_s",
            "restarts",
            "last_exit",
            "locks",
            "in_flight",
            "status",
        ];
        spec.sort();
        let mut seen = 0;
        for p in v["programs"].as_array().unwrap() {
            assert_eq!(keys(p), ["name", "workers"]);
            for w in p["workers"].as_array().unwrap() {
                assert_eq!(keys(w), spec, "{w}");
                seen += 1;
            }
        }
        assert_eq!(seen, 3);
        let exits: Vec<&serde_json::Value> = v["programs"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|p| p["workers"].as_array().unwrap())
            .map(|w| &w["last_exit"])
            .collect();
        assert_eq!(keys(exits[0]), ["signal"]);
        assert_eq!(keys(exits[2]), ["code"]);
    }

    #[test]
    fn a_failed_worker_anywhere_is_noticed() {
        let mut r = report();
        assert!(!r.any_failed());
        r.programs[1].workers[0].state = "failed".into();
        assert!(r.any_failed());
        let ids: Vec<(&str, u32)> = r.workers().map(|(p, w)| (p.name.as_str(), w.id)).collect();
        assert_eq!(ids, [("web", 0), ("web", 1), ("idle", 0)]);
    }

    fn job_result(id: u64, outcome: JobOutcome, text: &str, base64: bool) -> JobResult {
        JobResult {
            queue: "q".into(),
            id,
            outcome,
            text: text.into(),
            base64,
        }
    }

    /// Answers of `submit` and `results` with every kind of text the master may send.
    fn job_answers() -> Vec<Response> {
        let texts = [
            "",
            "ok",
            "j123",
            "with \"quotes\" and \\ backslash",
            "tab\there, nl\nthere, cr\r, bell\u{7}, nul\u{0}, unit\u{1f}, del\u{7f}",
            "ünïcødé ✓ and / slash",
        ];
        let mut results: Vec<JobResult> = texts
            .iter()
            .enumerate()
            .map(|(i, t)| job_result(i as u64 * 1000, JobOutcome::Ok, t, false))
            .collect();
        results.push(job_result(7, JobOutcome::Dead, "out of attempts", false));
        results.push(job_result(u64::MAX, JobOutcome::Ok, "AAEC/w==", true));
        let mut other_queue = job_result(9, JobOutcome::Ok, "x", false);
        other_queue.queue = "other \"queue\"".into();
        let mut out = vec![
            Response::ok(JobResults { results: vec![] }),
            Response::ok(Submitted {
                queue: "q".into(),
                first_id: 0,
                count: 1,
                results: vec![],
            }),
            Response::ok(JobResults {
                results: vec![other_queue.clone(), results[2].clone()],
            }),
        ];
        for r in &results {
            out.push(Response::ok(JobResults {
                results: vec![r.clone()],
            }));
        }
        out.push(Response::ok(JobResults {
            results: results.clone(),
        }));
        out.push(Response::ok(Submitted {
            queue: "q".into(),
            first_id: 1_000_001,
            count: 1000,
            results,
        }));
        out
    }

    #[test]
    fn job_answers_are_written_byte_for_byte_as_the_derived_serialization() {
        for r in job_answers() {
            let mut derived = serde_json::to_vec(&r).unwrap();
            derived.push(b'\n');
            let line = r.to_line();
            assert_eq!(
                String::from_utf8_lossy(&line),
                String::from_utf8_lossy(&derived)
            );
            assert!(job_answer_line(&r).is_some());
        }
        // Every other answer takes the derived path.
        assert!(job_answer_line(&Response::done()).is_none());
        assert!(job_answer_line(&Response::error("no")).is_none());
    }

    #[test]
    fn job_answers_read_back_as_the_generic_parse_reads_them() {
        for r in job_answers() {
            let line = String::from_utf8(r.to_line()).unwrap();
            let generic: Response = serde_json::from_str(&line).unwrap();
            assert_eq!(generic, r);
            assert_eq!(parse_message(&line).unwrap(), Message::Response(r.clone()));
            assert_eq!(parse_job_answer(&line), Some(r.clone()));
        }
        // The scan takes the plain lines itself, and leaves those with escapes to serde.
        let plain = Response::ok(JobResults {
            results: vec![job_result(3, JobOutcome::Ok, "j3", false)],
        });
        let line = String::from_utf8(plain.to_line()).unwrap();
        assert_eq!(Scan::job_answer(&line), Some(plain));
        let escaped = Response::ok(JobResults {
            results: vec![job_result(3, JobOutcome::Ok, "a\"b", false)],
        });
        let line = String::from_utf8(escaped.to_line()).unwrap();
        assert_eq!(Scan::job_answer(&line), None);
        assert_eq!(parse_message(&line).unwrap(), Message::Response(escaped));
    }

    #[test]
    fn lines_near_a_job_answer_are_read_by_the_generic_parse() {
        for line in [
            r#"{"ok":true,"result":{"results":[{"queue":"q","id":01,"outcome":"ok","text":"x"}]}}"#,
            r#"{"ok":true,"result":{"results":[{"queue":"q","id":-1,"outcome":"ok","text":"x"}]}}"#,
            r#"{"ok":true,"result":{"results":[{"queue":"q","id":1,"outcome":"maybe","text":"x"}]}}"#,
            r#"{"ok":true,"result":{"queue":"q","first_id":1}}"#,
            r#"{"ok":true,"result":{"queue":"q","dead":[]}}"#,
            r#"{"ok":false,"error":"queue q: full"}"#,
            r#"{"ok":true,"result":{}}"#,
            r#"{"ok":true, "result":{"results":[]}}"#,
        ] {
            let generic = serde_json::from_str::<Response>(line).map(Message::Response);
            match (parse_message(line), generic) {
                (Ok(fast), Ok(slow)) => assert_eq!(fast, slow, "{line}"),
                (Err(_), Err(_)) => {}
                (fast, slow) => panic!("{line}: {fast:?} but {slow:?}"),
            }
        }
    }

    #[test]
    fn submit_lines_parse_as_the_generic_path_parses_them() {
        let requests = [
            Request::Submit {
                queue: "q".into(),
                jobs: vec!["a".into(), "".into(), "with \"quotes\"\t\u{1}".into()],
                key: None,
                base64: false,
                wait: true,
            },
            Request::Submit {
                queue: "q q".into(),
                jobs: vec!["AAE=".into()],
                key: Some("k\\".into()),
                base64: true,
                wait: false,
            },
        ];
        let plain = Request::Submit {
            queue: "q".into(),
            jobs: vec!["j1".into(), "".into(), "ünï ✓".into()],
            key: Some("k".into()),
            base64: false,
            wait: true,
        };
        let empty = Request::Submit {
            queue: "q".into(),
            jobs: vec![],
            key: None,
            base64: false,
            wait: false,
        };
        for req in requests.into_iter().chain([plain, empty]) {
            for progress in [false, true] {
                let line = req.to_line(progress).unwrap();
                // The same object as the generic writer makes.
                let direct: serde_json::Value = serde_json::from_slice(&line).unwrap();
                let mut generic = serde_json::to_value(&req).unwrap();
                let map = generic.as_object_mut().unwrap();
                if progress {
                    map.insert("progress".into(), true.into());
                }
                map.insert("v".into(), PROTOCOL_VERSION.into());
                assert_eq!(direct, generic);
                let text = std::str::from_utf8(&line).unwrap();
                let plain = text.find('\\').is_none();
                if plain {
                    assert_eq!(Scan::submit(text), Some((req.clone(), progress)));
                }
                assert_eq!(parse_submit(std::str::from_utf8(&line).unwrap()), {
                    Some((req.clone(), progress))
                });
                assert_eq!(parse_request_line(&line).unwrap(), (req.clone(), progress));
            }
        }
        // Not quite a submit of this version: the generic path decides, as before.
        let v2 = br#"{"cmd":"submit","queue":"q","jobs":["a"],"v":2}"#;
        assert!(parse_submit(std::str::from_utf8(v2).unwrap()).is_none());
        assert!(matches!(
            parse_request_line(v2),
            Err(RequestError::Version { client: 2 })
        ));
        let extra = br#"{"cmd":"submit","queue":"q","jobs":["a"],"what":1}"#;
        assert!(matches!(
            parse_request_line(extra),
            Err(RequestError::Malformed(_))
        ));
        // The scan takes only what `submit_line` writes; the rest goes to serde, as before.
        for line in [
            r#"{"cmd":"submit","queue":"q","jobs":["a"],"v":1} "#,
            r#"{"cmd":"submit","queue":"q","jobs":["a"],"wait":true,"base64":true,"v":1}"#,
            r#"{"cmd":"submit","queue":"q","jobs":["a","b"],"v":1,"wait":true}"#,
            r#"{"cmd":"submit","queue":"q","jobs":[],"v":1}"#,
        ] {
            let generic = parse_request_line(line.as_bytes()).unwrap();
            let scanned = Scan::submit(line);
            assert!(
                scanned.is_none() || scanned == Some(generic.clone()),
                "{line}"
            );
            let mut value: serde_json::Value = serde_json::from_str(line).unwrap();
            let map = value.as_object_mut().unwrap();
            let progress = map.remove("progress").is_some();
            map.remove("v");
            assert_eq!(generic, (serde_json::from_value(value).unwrap(), progress));
        }
        let key_null = br#"{"cmd":"submit","queue":"q","jobs":["a"],"key":null}"#;
        assert_eq!(
            parse_request_line(key_null).unwrap().0,
            Request::Submit {
                queue: "q".into(),
                jobs: vec!["a".into()],
                key: None,
                base64: false,
                wait: false,
            }
        );
    }

    #[test]
    fn numbers_are_written_in_decimal() {
        let mut n = 1u64;
        let mut samples = vec![0, u64::MAX, 9, 10, 99, 100, 101, 999, 1000, 1_000_001];
        while let Some(m) = n.checked_mul(7) {
            samples.extend([m, m - 1, m + 1]);
            n = m;
        }
        for n in samples {
            let mut out = Vec::new();
            push_u64(&mut out, n);
            assert_eq!(out, n.to_string().into_bytes());
        }
    }

    #[test]
    fn json_string_lengths_are_what_serde_json_writes() {
        for s in ["", "abc", "a\"b\\c", "\u{0}\u{1f}\n\t", "ünï ✓"] {
            assert_eq!(json_str_len(s), serde_json::to_string(s).unwrap().len());
            let mut out = Vec::new();
            push_json_str(&mut out, s);
            assert_eq!(out, serde_json::to_vec(s).unwrap());
        }
    }
}
