//! The client side of job queues: `submit` (jobs cut from stdin or taken from arguments,
//! sent in bounded batches over one connection), and how `submit --wait`, `queue` and
//! `queue --dead` print their answers.
//!
//! Bounds: a batch holds at most [`BATCH_JOBS`] jobs and about [`BATCH_BYTES`] of encoded
//! jobs, at most [`IN_FLIGHT`] batches are sent and not yet answered, and a line of stdin is
//! read [`MAX_REQUEST`] bytes at most: the input is never read whole into memory, and a job
//! too large for one request line is an error naming its line, not a hang.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use base64::Engine as _;

use super::ClientError;
use crate::protocol::{
    Answer, DeadLetters, JobOutcome, JobResults, QueueReport, Request, Response, MAX_REQUEST,
};

/// At most this many jobs in one `submit` request.
pub const BATCH_JOBS: usize = 1000;
/// About this many bytes of encoded jobs in one `submit` request; a single job larger than
/// this goes alone, up to what one request line may hold.
pub const BATCH_BYTES: usize = 32 * 1024;
/// How many `submit` requests may be on their way, not yet answered. Two: the next batch is
/// read and sent while the master stores the previous one.
pub const IN_FLIGHT: usize = 2;
/// A connection unused for this long is replaced before the next batch (without `--wait`):
/// the master closes connections that send no request for 30 s.
const IDLE_REOPEN: Duration = Duration::from_secs(20);

/// Where a job came from, for messages: a line of stdin (from 1) or a payload argument
/// (from 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Line(u64),
    Arg(usize),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Line(n) => write!(f, "line {n} of stdin"),
            Origin::Arg(n) => write!(f, "payload {n}"),
        }
    }
}

/// What the job source gives the submitter.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece {
    Job(Origin, Vec<u8>),
    /// The input has nothing more to give right now: send what is batched rather than hold
    /// it while the producer is slow (`tail -f log | plumule submit q`).
    Pause,
}

/// Why `submit` stopped; the text is what the user reads.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("cannot read stdin at line {line}: {source}")]
    Read { line: u64, source: io::Error },
    /// The results could not be written out.
    #[error("cannot write the results: {0}")]
    Output(io::Error),
    /// One job that cannot fit in a request line; nothing from it on was sent.
    #[error(
        "{origin} is too large for one submit request: {size} bytes{encoded}, and a request \
         line holds at most {MAX_REQUEST} bytes; {stored} job(s) before it were stored"
    )]
    TooLarge {
        origin: Origin,
        /// Its bytes (for a line cut short, how many were read before giving up: "more than").
        size: String,
        /// ", N once encoded" when the raw bytes would fit but their encoding does not.
        encoded: String,
        stored: u64,
    },
    /// `--key` alone fills a request line.
    #[error("the key is too long: a submit request line holds at most {MAX_REQUEST} bytes")]
    KeyTooLong,
    /// The master refused a batch (past `max_pending`, a `lines` payload with a newline…).
    #[error(
        "{queue}: the batch of {count} job(s) {span} was refused: {reason}; {stored} job(s) \
         were stored before it{after}"
    )]
    Refused {
        queue: String,
        count: usize,
        /// "from line 1 of stdin to line 1000 of stdin", "at payload 1".
        span: String,
        reason: String,
        stored: u64,
        /// Batches sent behind it, before its refusal came back, and stored all the same.
        after: String,
    },
}

/// Jobs cut from a byte stream: one per line, the `\n` not included (a `\r` before it stays
/// part of the job), a last line without `\n` counting too, an empty line being an empty
/// job. A line longer than `max` bytes stops the stream with [`SubmitError::TooLarge`] after
/// reading `max + 1` bytes of it, so memory stays bounded whatever comes in.
pub struct LineJobs<R> {
    reader: BufReader<R>,
    /// Polled (without waiting) before each read that could block, for [`Piece::Pause`].
    fd: Option<RawFd>,
    max: usize,
    line: u64,
    paused: bool,
    done: bool,
}

impl<R: Read> LineJobs<R> {
    /// `fd`: the descriptor `input` reads from, to notice when it has nothing ready (None: never
    /// pause, e.g. for a slice in tests).
    pub fn new(input: R, fd: Option<RawFd>, max: usize) -> LineJobs<R> {
        LineJobs {
            reader: BufReader::with_capacity(64 * 1024, input),
            fd,
            max,
            line: 0,
            paused: false,
            done: false,
        }
    }

    /// Whether the descriptor has nothing to read at once (the next read would block).
    fn would_block(&self) -> bool {
        let Some(fd) = self.fd else { return false };
        let mut fds = [libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        }];
        matches!(crate::sys::poll(&mut fds, Some(Duration::ZERO)), Ok(0))
    }
}

impl<R: Read> Iterator for LineJobs<R> {
    type Item = Result<Piece, SubmitError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let mut job = Vec::new();
        loop {
            if self.reader.buffer().is_empty() && !self.paused && self.would_block() {
                self.paused = true;
                if job.is_empty() {
                    return Some(Ok(Piece::Pause));
                }
            }
            let buf = match self.reader.fill_buf() {
                Ok(buf) => buf,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    self.done = true;
                    return Some(Err(SubmitError::Read {
                        line: self.line + 1,
                        source,
                    }));
                }
            };
            self.paused = false;
            if buf.is_empty() {
                self.done = true;
                if job.is_empty() {
                    return None;
                }
                self.line += 1;
                return Some(Ok(Piece::Job(Origin::Line(self.line), job)));
            }
            let newline = buf.iter().position(|&b| b == b'\n');
            let take = newline.unwrap_or(buf.len());
            if job.len() + take > self.max {
                self.done = true;
                return Some(Err(SubmitError::TooLarge {
                    origin: Origin::Line(self.line + 1),
                    size: format!("more than {}", self.max),
                    encoded: String::new(),
                    stored: 0,
                }));
            }
            if job.is_empty() {
                // Most lines are whole in the buffer: one allocation of the right size.
                job = buf[..take].to_vec();
            } else {
                job.extend_from_slice(&buf[..take]);
            }
            self.reader.consume(take + usize::from(newline.is_some()));
            if newline.is_some() {
                self.line += 1;
                return Some(Ok(Piece::Job(Origin::Line(self.line), job)));
            }
        }
    }
}

/// The payload arguments, as jobs.
pub fn arg_jobs(
    payloads: Vec<std::ffi::OsString>,
) -> impl Iterator<Item = Result<Piece, SubmitError>> {
    use std::os::unix::ffi::OsStringExt;
    payloads
        .into_iter()
        .enumerate()
        .map(|(i, p)| Ok(Piece::Job(Origin::Arg(i + 1), p.into_vec())))
}

/// Where batches go: the master's connection, or a fake in tests.
pub trait Peer {
    fn send(&mut self, req: &Request) -> Result<(), ClientError>;
    fn read_response(&mut self) -> Result<Option<Response>, ClientError>;
    /// Called before a batch is sent while no answer is awaited and no later request depends
    /// on this connection: a chance to replace one the master may have closed as idle.
    fn rested(&mut self) -> Result<(), ClientError> {
        Ok(())
    }
}

impl Peer for super::Connection {
    fn send(&mut self, req: &Request) -> Result<(), ClientError> {
        super::Connection::send(self, req)
    }
    fn read_response(&mut self) -> Result<Option<Response>, ClientError> {
        super::Connection::read_response(self)
    }
}

/// A connection to the master that is reopened when it has rested long enough for the master
/// to have closed it (see [`Peer::rested`]).
pub struct MasterPeer {
    socket: std::path::PathBuf,
    timeout: Option<Duration>,
    conn: super::Connection,
    used: Instant,
}

impl MasterPeer {
    pub fn open(socket: &std::path::Path, timeout: Option<Duration>) -> Result<Self, ClientError> {
        Ok(MasterPeer {
            socket: socket.to_path_buf(),
            timeout,
            conn: super::Connection::open(socket, timeout)?,
            used: Instant::now(),
        })
    }
}

impl Peer for MasterPeer {
    fn send(&mut self, req: &Request) -> Result<(), ClientError> {
        self.used = Instant::now();
        self.conn.send(req)
    }
    fn read_response(&mut self) -> Result<Option<Response>, ClientError> {
        let r = self.conn.read_response();
        self.used = Instant::now();
        r
    }
    fn rested(&mut self) -> Result<(), ClientError> {
        if self.used.elapsed() >= IDLE_REOPEN {
            self.conn = super::Connection::open(&self.socket, self.timeout)?;
            self.used = Instant::now();
        }
        Ok(())
    }
}

/// The jobs of the batch being filled, and what they cost encoded either way.
#[derive(Default)]
struct Batch {
    /// Each job as text when it is UTF-8 (checked once, when pushed), else its bytes.
    jobs: Vec<Result<String, Vec<u8>>>,
    first: Option<Origin>,
    last: Option<Origin>,
    /// Encoded as JSON strings (quotes and a comma each); `None` once a job is not UTF-8.
    text_len: Option<usize>,
    /// Encoded as base64 JSON strings.
    base64_len: usize,
}

/// A batch sent and not yet answered.
struct Sent {
    count: usize,
    first: Origin,
    last: Origin,
}

impl Sent {
    fn span(&self) -> String {
        match self.first == self.last {
            true => format!("at {}", self.first),
            false => format!("from {} to {}", self.first, self.last),
        }
    }
}

/// What one job costs in a request line: as a JSON string (None: not UTF-8), as base64.
fn encoded_len(job: &Result<String, Vec<u8>>) -> (Option<usize>, usize) {
    let text = job
        .as_ref()
        .ok()
        .map(|s| crate::protocol::json_str_len(s) + 1);
    (text, job_len(job).div_ceil(3) * 4 + 3)
}

fn job_len(job: &Result<String, Vec<u8>>) -> usize {
    match job {
        Ok(s) => s.len(),
        Err(b) => b.len(),
    }
}

/// Sends jobs to a queue in batches, pipelined, and counts what the master stored.
pub struct Submitter<'a, P: Peer> {
    peer: &'a mut P,
    queue: String,
    key: Option<String>,
    wait: bool,
    /// The request line of an empty batch (the longest: with `base64`).
    overhead: usize,
    batch: Batch,
    sent: VecDeque<Sent>,
    stored: u64,
    /// Results that came with `submit` answers, not yet handed out.
    early: Vec<JobResults>,
}

impl<'a, P: Peer> Submitter<'a, P> {
    pub fn new(
        peer: &'a mut P,
        queue: &str,
        key: Option<String>,
        wait: bool,
    ) -> Result<Self, SubmitError> {
        let empty = Request::Submit {
            queue: queue.to_string(),
            jobs: vec![],
            key: key.clone(),
            base64: true,
            wait,
        };
        let overhead = empty
            .to_line(true)
            .map_err(|e| SubmitError::Client(ClientError::Encode(e)))?
            .len();
        if overhead + 2 >= MAX_REQUEST {
            return Err(SubmitError::KeyTooLong);
        }
        Ok(Submitter {
            peer,
            queue: queue.to_string(),
            key,
            wait,
            overhead,
            batch: Batch::default(),
            sent: VecDeque::new(),
            stored: 0,
            early: Vec::new(),
        })
    }

    /// Results that came with the answers read so far, oldest first.
    pub fn take_early(&mut self) -> Vec<JobResults> {
        std::mem::take(&mut self.early)
    }

    /// How many jobs the master has said it stored so far.
    pub fn stored(&self) -> u64 {
        self.stored
    }

    /// Adds one job; sends the batch before it when the job would overflow it.
    pub fn push(&mut self, origin: Origin, job: Vec<u8>) -> Result<(), SubmitError> {
        let job = String::from_utf8(job).map_err(std::string::FromUtf8Error::into_bytes);
        let (text, base64) = encoded_len(&job);
        let alone = text.unwrap_or(base64);
        if self.overhead + alone > MAX_REQUEST {
            self.flush()?;
            self.drain()?;
            return Err(SubmitError::TooLarge {
                origin,
                size: job_len(&job).to_string(),
                encoded: if self.overhead + job_len(&job) <= MAX_REQUEST {
                    format!(", {} once encoded", alone.saturating_sub(1))
                } else {
                    String::new()
                },
                stored: self.stored,
            });
        }
        let b = &self.batch;
        let cost = match (b.text_len, text) {
            (Some(sum), Some(t)) => sum + t,
            _ => b.base64_len + base64,
        };
        if !b.jobs.is_empty() && (b.jobs.len() >= BATCH_JOBS || cost > BATCH_BYTES) {
            self.flush()?;
        }
        let b = &mut self.batch;
        if b.jobs.is_empty() {
            b.text_len = Some(0);
            b.first = Some(origin);
        }
        b.text_len = b.text_len.zip(text).map(|(a, t)| a + t);
        b.base64_len += base64;
        b.last = Some(origin);
        b.jobs.push(job);
        Ok(())
    }

    /// Sends the batch being filled, if any, after reading answers until fewer than
    /// [`IN_FLIGHT`] are awaited.
    pub fn flush(&mut self) -> Result<(), SubmitError> {
        let batch = std::mem::take(&mut self.batch);
        let (Some(first), Some(last)) = (batch.first, batch.last) else {
            return Ok(());
        };
        while self.sent.len() >= IN_FLIGHT {
            self.take_answer()?;
        }
        if self.sent.is_empty() && !self.wait {
            self.peer.rested()?;
        }
        let base64 = batch.text_len.is_none();
        let count = batch.jobs.len();
        let jobs = batch
            .jobs
            .into_iter()
            .map(|j| match (base64, j) {
                (true, Ok(text)) => base64::engine::general_purpose::STANDARD.encode(text),
                (true, Err(bytes)) => base64::engine::general_purpose::STANDARD.encode(bytes),
                (false, Ok(text)) => text,
                // Not reached: a batch goes as text only when every job in it is UTF-8.
                (false, Err(_)) => String::new(),
            })
            .collect();
        let req = Request::Submit {
            queue: self.queue.clone(),
            jobs,
            key: self.key.clone(),
            base64,
            wait: self.wait,
        };
        self.peer.send(&req)?;
        self.sent.push_back(Sent { count, first, last });
        Ok(())
    }

    /// Reads every answer still awaited.
    pub fn drain(&mut self) -> Result<(), SubmitError> {
        while !self.sent.is_empty() {
            self.take_answer()?;
        }
        Ok(())
    }

    /// Sends what is left and reads every answer: the jobs stored.
    /// Sends what is left and reads every answer; returns how many jobs were stored and the
    /// results that came with the answers and were not handed out yet.
    pub fn finish(mut self) -> Result<(u64, Vec<JobResults>), SubmitError> {
        self.flush()?;
        self.drain()?;
        Ok((self.stored, self.early))
    }

    /// Reads the answer to the oldest batch awaited. A refusal stops everything: the
    /// answers of the batches sent behind it are read too, so the message can say exactly
    /// what was stored.
    fn take_answer(&mut self) -> Result<(), SubmitError> {
        let Some(front) = self.sent.pop_front() else {
            return Ok(());
        };
        let response = self.peer.read_response()?.ok_or(ClientError::NoAnswer)?;
        match response {
            Response::Ok(Answer::Submitted(s)) => {
                self.stored += s.count;
                if !s.results.is_empty() {
                    self.early.push(JobResults { results: s.results });
                }
                Ok(())
            }
            Response::Ok(_) => Err(ClientError::Unexpected { what: "submit" }.into()),
            Response::Error(reason) => {
                let mut after = Vec::new();
                while let Some(next) = self.sent.pop_front() {
                    match self.peer.read_response() {
                        Ok(Some(Response::Ok(Answer::Submitted(s)))) => {
                            after.push(format!("{} {}", s.count, next.span()))
                        }
                        _ => break,
                    }
                }
                let after = match after.is_empty() {
                    true => String::new(),
                    false => format!(
                        "; sent behind it before the refusal came back, and stored: {}",
                        after.join(", ")
                    ),
                };
                Err(SubmitError::Refused {
                    queue: self.queue.clone(),
                    count: front.count,
                    span: front.span(),
                    reason,
                    stored: self.stored,
                    after,
                })
            }
        }
    }
}

/// `submit`: every job of `jobs` to `queue` in batches over `peer`; returns how many were
/// stored and, with `wait`, how many outcomes came (each chunk goes to `on_results` as it comes,
/// with the submit answers and then after a results request on the same connection).
pub fn submit<P: Peer>(
    peer: &mut P,
    queue: &str,
    key: Option<String>,
    wait: bool,
    jobs: impl Iterator<Item = Result<Piece, SubmitError>>,
    on_results: &mut dyn FnMut(&JobResults) -> io::Result<()>,
) -> Result<(u64, Option<u64>), SubmitError> {
    let mut submitter = Submitter::new(peer, queue, key, wait)?;
    // Only the count is kept: each result goes out as it comes.
    let mut all: u64 = 0;
    let mut hand_out = |chunks: Vec<JobResults>, all: &mut u64| -> Result<(), SubmitError> {
        for chunk in chunks {
            on_results(&chunk).map_err(SubmitError::Output)?;
            *all += chunk.results.len() as u64;
        }
        Ok(())
    };
    for piece in jobs {
        hand_out(submitter.take_early(), &mut all)?;
        match piece {
            Ok(Piece::Job(origin, job)) => submitter.push(origin, job)?,
            Ok(Piece::Pause) => submitter.flush()?,
            Err(mut e) => {
                // Stop here, but say what was stored of what came before.
                submitter.flush()?;
                submitter.drain()?;
                if let SubmitError::TooLarge { stored, .. } = &mut e {
                    *stored = submitter.stored();
                }
                return Err(e);
            }
        }
    }
    let (stored, early) = submitter.finish()?;
    if !wait {
        return Ok((stored, None));
    }
    hand_out(early, &mut all)?;
    if all < stored {
        peer.send(&Request::Results)?;
    }
    // The master streams the rest in submission order, in as many lines as it likes; the
    // line that brings the count to the number stored is the last.
    while all < stored {
        match peer.read_response()?.ok_or(ClientError::NoAnswer)? {
            Response::Ok(Answer::Results(chunk)) => {
                if chunk.results.is_empty() {
                    return Err(ClientError::Unexpected { what: "results" }.into());
                }
                hand_out(vec![chunk], &mut all)?;
            }
            Response::Ok(_) => return Err(ClientError::Unexpected { what: "results" }.into()),
            Response::Error(e) => return Err(ClientError::Refused(e).into()),
        }
    }
    Ok((stored, Some(all)))
}

/// The bytes a result, reason or payload stands for (base64 decoded when marked so; text
/// that does not decode is shown as it came).
fn bytes_of(text: &str, base64: bool) -> Cow<'_, [u8]> {
    if base64 {
        if let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(text) {
            return Cow::Owned(bytes);
        }
    }
    Cow::Borrowed(text.as_bytes())
}

/// `submit --wait`: one line per job in submission order, `ok RESULT` (`ok` when the result
/// is empty) or `dead REASON`, results as raw bytes. Returns how many ended dead.
///
/// The lines of a chunk go out in one write, then a flush: stdout is line-buffered, and a
/// write per line would cost a system call per job.
pub fn write_results(out: &mut dyn Write, results: &JobResults) -> io::Result<usize> {
    let mut dead = 0;
    let size: usize = results.results.iter().map(|r| r.text.len() + 6).sum();
    let mut lines = Vec::with_capacity(size);
    for r in &results.results {
        let word: &[u8] = match r.outcome {
            JobOutcome::Ok => b"ok",
            JobOutcome::Dead => {
                dead += 1;
                b"dead"
            }
        };
        let text = bytes_of(&r.text, r.base64);
        lines.extend_from_slice(word);
        if !text.is_empty() {
            lines.push(b' ');
            lines.extend_from_slice(&text);
        }
        lines.push(b'\n');
    }
    out.write_all(&lines)?;
    out.flush()?;
    Ok(dead)
}

/// A table for people: columns as wide as their widest cell, the last one unpadded.
pub(crate) fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            match i + 1 == N {
                true => line.push_str(cell),
                false => line.push_str(&format!("{cell:<w$}  ", w = widths[i])),
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `queue`: one row per queue.
pub fn format_queues(report: &QueueReport) -> String {
    let mut rows = vec![[
        "QUEUE".to_string(),
        "PENDING".into(),
        "IN FLIGHT".into(),
        "DONE".into(),
        "RETRIED".into(),
        "DEAD".into(),
    ]];
    for q in &report.queues {
        rows.push([
            q.name.clone(),
            q.pending.to_string(),
            q.in_flight.to_string(),
            q.done.to_string(),
            q.retried.to_string(),
            q.dead.to_string(),
        ]);
    }
    table(&rows)
}

/// Bytes shown on one line of a terminal: valid UTF-8 as is, except control characters
/// (`\n`, `\t`, `\x1b`…) and backslashes, which are escaped; invalid bytes as `\xNN`.
pub fn escape(bytes: &[u8]) -> String {
    let mut out = String::new();
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                c if c.is_control() => out.push_str(&c.escape_unicode().to_string()),
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// `queue QUEUE --dead`: one row per dead letter, oldest first, then a count.
pub fn format_dead(dead: &DeadLetters) -> String {
    let mut rows = vec![[
        "ID".to_string(),
        "ATTEMPTS".into(),
        "REASON".into(),
        "PAYLOAD".into(),
    ]];
    for d in &dead.dead {
        rows.push([
            d.id.to_string(),
            d.attempts.to_string(),
            escape(&bytes_of(&d.reason, d.reason_base64)),
            escape(&bytes_of(&d.payload, d.base64)),
        ]);
    }
    let mut out = table(&rows);
    out.push_str(&format!(
        "{}: {} dead letter(s)\n",
        dead.queue,
        dead.dead.len()
    ));
    out
}

#[cfg(test)]
mod tests;
