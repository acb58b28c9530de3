//! The library for queue workers written in Rust: jobs from stdin, answers on stdout.
//!
//! A program with `queue = "Q"` in the config file consumes the jobs of queue Q: the master
//! writes each job to the worker's stdin and reads the worker's answers from its stdout, one
//! answer per job, in the order the jobs came. This module owns the worker's end of that pipe:
//! [`jobs`] is an iterator of [`Job`]s, each answered once with [`Job::ok`], [`Job::fail`]
//! (retried with backoff, until `max_attempts`) or [`Job::drop`] (dead-lettered at once).
//! End of input (EOF on stdin) ends the iterator: it is how the master asks the worker to finish,
//! so a worker should answer what it holds and exit.
//!
//! ```no_run
//! use plumule::worker;
//!
//! fn main() -> Result<(), worker::Error> {
//!     for job in worker::jobs()? {
//!         let job = job?;
//!         match job.as_str().map(str::trim).map(str::parse::<i64>) {
//!             Ok(Ok(n)) => job.ok(n.saturating_mul(n).to_string())?,
//!             _ => job.drop("not a number")?,
//!         }
//!     }
//!     Ok(())
//! }
//! ```
//!
//! Typed jobs go through serde_json: [`serve`] parses each payload as `T`, calls the handler,
//! and answers with its result as JSON; a payload that does not parse answers
//! `drop "bad payload: …"` without reaching the handler. A [`Pool`] runs the handler on several
//! threads and still answers in order.
//!
//! ```no_run
//! use plumule::worker::{self, Fail};
//!
//! fn main() -> Result<(), worker::Error> {
//!     worker::serve(|n: i64| n.checked_mul(n).ok_or_else(|| Fail::drop("overflow")))
//! }
//! ```
//!
//! # Protocols
//!
//! The master says which protocol the queue uses through the environment variable
//! [`PROTOCOL_ENV`] (`PLUMULE_QUEUE_PROTOCOL=lines|frames`; unset or empty means `lines`, the
//! queue's default), and the largest frame through [`MAX_FRAME_ENV`]
//! (`PLUMULE_QUEUE_MAX_FRAME`, in bytes; unset means [`DEFAULT_MAX_FRAME`]). A [`Builder`] can
//! set either explicitly instead.
//!
//! - `lines`: a job is one line on stdin (its bytes up to `\n`, not included; a last line
//!   without `\n` is a job too). Each answer is one line on stdout: `ok`, `ok RESULT`,
//!   `fail REASON` or `drop REASON`. A line cannot carry a newline, so each `\n` in a result or
//!   reason is written as a space; use `frames` for results that must arrive byte for byte.
//! - `frames`: a job is a 4-byte big-endian length then that many bytes of payload. An answer is
//!   a 4-byte big-endian length N ≥ 1, one status byte (0 ok, 1 fail, 2 drop), then N − 1
//!   bytes of result or reason. `ok` with result `42` is `00 00 00 03 00 34 32`.
//!
//! In both, an empty reason is sent as `no reason given`; a reason that does not fit in the
//! frame limit is cut (at a character boundary); an `ok` result that does not fit becomes a
//! `fail` that says so, since the master would reject the oversized answer. A job over the
//! limit is an error ([`Error::FrameTooLarge`], [`Error::LineTooLong`]) that ends the jobs.
//!
//! # Answers
//!
//! - Every job gets exactly one answer: the answering methods take the job by value, and a
//!   [`Job`] dropped unanswered answers `fail "not answered"` (or `fail "handler panicked"` when
//!   it is dropped while a panic unwinds), so the job is retried instead of the stream falling
//!   out of step. It also says so on stderr.
//! - Answers are written in job order whatever order they are given in: an answer to a later
//!   job waits until every earlier job is answered. With `prefetch` > 1 a worker may hold
//!   several jobs and answer them in any order.
//! - Each answer is flushed as soon as it is in order, before the answering method returns, so
//!   no buffer holds an answer back while the worker waits for its next job.
//! - stdout carries the answers: a worker must log to stderr (`eprintln!`), never `println!`.
//!
//! # What a worker holds
//!
//! [`Jobs::in_flight`] (and [`Pool::in_flight`]) counts the jobs handed out whose answers are
//! not written yet: unanswered, or answered and waiting for an earlier answer. [`Jobs::held`]
//! (and [`Pool::held`]) adds the jobs already read from stdin and decoded but not handed out
//! yet: everything this process has taken and not answered. The master's count of the worker's
//! jobs in flight is `held` plus what is still in the two pipes, so `held` never exceeds the
//! queue's `prefetch`; a [`Pool`] keeps `in_flight` within its
//! [`capacity`](Pool::capacity) and stops reading past it.
//!
//! # Sharing the wire with the master
//!
//! The bytes are read and written by [`queue::wire`](crate::queue::wire), the same code the
//! master uses for its end of the pipes: this library adds only what makes any answer
//! sendable (above) and its own error type.
//!
//! # Testing a worker
//!
//! [`Jobs::from_io`] runs the same code over any reader and writer, such as in-memory buffers or
//! the ends of a pipe.

mod codec;
mod pool;
mod sink;

use std::fmt;
use std::io::{self, Read, Write};
use std::marker::PhantomData;
use std::str::FromStr;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::queue::wire::{JobReader, ProtocolError};
pub use pool::Pool;
use sink::Sink;

/// Environment variable through which the master tells a worker its queue's protocol:
/// `lines` or `frames`; unset or empty means `lines`.
pub const PROTOCOL_ENV: &str = "PLUMULE_QUEUE_PROTOCOL";

/// Environment variable through which the master tells a worker its queue's `max_frame`, as a
/// whole number of bytes; unset means [`DEFAULT_MAX_FRAME`].
pub const MAX_FRAME_ENV: &str = "PLUMULE_QUEUE_MAX_FRAME";

/// The largest job or answer, in bytes, unless told otherwise: the queue default, 16 MiB.
pub const DEFAULT_MAX_FRAME: usize = 16 << 20;

/// How jobs and answers are laid out on the worker's pipes (see the [module docs](self)).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Protocol {
    /// One job per line, one answer line per job.
    #[default]
    Lines,
    /// Length-prefixed frames, binary-safe.
    Frames,
}

impl Protocol {
    /// The protocol [`PROTOCOL_ENV`] names; `lines` when it is unset or empty.
    pub fn from_env() -> Result<Protocol, Error> {
        match std::env::var_os(PROTOCOL_ENV) {
            None => Ok(Protocol::Lines),
            Some(value) if value.is_empty() => Ok(Protocol::Lines),
            Some(value) => {
                value
                    .to_str()
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| Error::BadEnv {
                        var: PROTOCOL_ENV,
                        value: value.to_string_lossy().into_owned(),
                        expected: "\"lines\" or \"frames\"",
                    })
            }
        }
    }
}

impl FromStr for Protocol {
    type Err = String;

    /// `lines` or `frames`, as the config file spells them.
    fn from_str(s: &str) -> Result<Protocol, String> {
        match s {
            "lines" => Ok(Protocol::Lines),
            "frames" => Ok(Protocol::Frames),
            other => Err(format!(
                "unknown queue protocol {other:?} (expected lines or frames)"
            )),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Lines => "lines",
            Protocol::Frames => "frames",
        })
    }
}

/// The frame limit [`MAX_FRAME_ENV`] gives; [`DEFAULT_MAX_FRAME`] when it is unset.
fn max_frame_from_env() -> Result<usize, Error> {
    match std::env::var_os(MAX_FRAME_ENV) {
        None => Ok(DEFAULT_MAX_FRAME),
        Some(value) => value
            .to_str()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&n| n > 0)
            .ok_or_else(|| Error::BadEnv {
                var: MAX_FRAME_ENV,
                value: value.to_string_lossy().into_owned(),
                expected: "a number of bytes above 0",
            }),
    }
}

/// What went wrong between the worker and the master.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An environment variable set by the master has a value this library does not understand.
    #[error("{var}={value:?} is not valid: expected {expected}")]
    BadEnv {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
        /// What it should have been.
        expected: &'static str,
    },
    /// Reading the next job failed.
    #[error("cannot read the next job: {0}")]
    Read(#[source] io::Error),
    /// The input ended in the middle of a frame.
    #[error("the input ended inside a frame: {got} of {want} bytes")]
    Truncated {
        /// Bytes of the frame read, its 4-byte header included.
        got: usize,
        /// Bytes the frame should have had.
        want: usize,
    },
    /// A `frames` job is longer than the frame limit.
    #[error("a job of {len} bytes exceeds max_frame ({max} bytes)")]
    FrameTooLarge {
        /// The length the frame announced.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A `lines` job is longer than the frame limit.
    #[error("a job line exceeds max_frame ({max} bytes)")]
    LineTooLong {
        /// The limit.
        max: usize,
    },
    /// The input breaks the protocol in some other way.
    #[error("the job stream breaks the protocol: {0}")]
    Protocol(#[source] ProtocolError),
    /// Writing an answer failed; no later answer can be written either.
    #[error("cannot write an answer: {0}")]
    Write(#[source] io::Error),
}

/// Sets the protocol and frame limit explicitly, then opens the jobs.
///
/// What is not set comes from the environment ([`PROTOCOL_ENV`], [`MAX_FRAME_ENV`]), as with
/// [`jobs`].
///
/// ```no_run
/// use plumule::worker::{Builder, Protocol};
///
/// let jobs = Builder::new().protocol(Protocol::Frames).stdio()?;
/// # Ok::<(), plumule::worker::Error>(())
/// ```
#[derive(Clone, Debug, Default)]
pub struct Builder {
    protocol: Option<Protocol>,
    max_frame: Option<usize>,
}

impl Builder {
    /// A builder that takes everything from the environment unless told otherwise.
    pub fn new() -> Builder {
        Builder::default()
    }

    /// Uses `protocol` whatever the environment says.
    pub fn protocol(mut self, protocol: Protocol) -> Builder {
        self.protocol = Some(protocol);
        self
    }

    /// Uses `bytes` as the largest job or answer whatever the environment says (at least 1).
    pub fn max_frame(mut self, bytes: usize) -> Builder {
        self.max_frame = Some(bytes.max(1));
        self
    }

    /// The jobs of stdin, answered on stdout.
    pub fn stdio(self) -> Result<Jobs, Error> {
        self.io(io::stdin(), io::stdout())
    }

    /// The jobs of `input`, answered on `output`.
    pub fn io(
        self,
        input: impl Read + Send + 'static,
        output: impl Write + Send + 'static,
    ) -> Result<Jobs, Error> {
        let protocol = match self.protocol {
            Some(p) => p,
            None => Protocol::from_env()?,
        };
        let max_frame = match self.max_frame {
            Some(n) => n,
            None => max_frame_from_env()?,
        };
        Ok(Jobs::new(
            protocol,
            max_frame,
            Box::new(input),
            Box::new(output),
        ))
    }
}

/// The jobs of stdin, answered on stdout, in the protocol the environment names.
///
/// Fails only when [`PROTOCOL_ENV`] or [`MAX_FRAME_ENV`] holds a value it does not understand.
pub fn jobs() -> Result<Jobs, Error> {
    Builder::new().stdio()
}

/// Answers every job of stdin with `handler`, typed through serde_json, until EOF: see
/// [`Jobs::serve`].
pub fn serve<T, R, F>(handler: F) -> Result<(), Error>
where
    T: DeserializeOwned,
    R: Serialize,
    F: FnMut(T) -> Result<R, Fail>,
{
    jobs()?.serve(handler)
}

/// The iterator of jobs: each item is the next job, or the error that ends the jobs.
///
/// It ends (`None`) at end of input, and after an error. Its jobs share its output: they can be
/// answered in any order, from any thread, and the answers are written in job order.
pub struct Jobs {
    protocol: Protocol,
    max_frame: usize,
    input: JobReader<Box<dyn Read + Send>>,
    sink: Arc<Sink>,
    done: bool,
}

impl fmt::Debug for Jobs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Jobs")
            .field("protocol", &self.protocol)
            .field("max_frame", &self.max_frame)
            .field("in_flight", &self.in_flight())
            .field("held", &self.held())
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl Jobs {
    fn new(
        protocol: Protocol,
        max_frame: usize,
        input: Box<dyn Read + Send>,
        output: Box<dyn Write + Send>,
    ) -> Jobs {
        Jobs {
            protocol,
            max_frame,
            input: codec::job_reader(protocol, max_frame, input),
            sink: Arc::new(Sink::new(protocol, max_frame, output)),
            done: false,
        }
    }

    /// The jobs of `input`, answered on `output`, in `protocol`, with the default frame limit;
    /// the environment is not read. For tests, and for workers that talk over other pipes.
    ///
    /// ```
    /// use plumule::worker::{Jobs, Protocol};
    /// use std::sync::{Arc, Mutex};
    ///
    /// /// A `Write` whose bytes the test can still read afterwards.
    /// #[derive(Clone, Default)]
    /// struct Shared(Arc<Mutex<Vec<u8>>>);
    /// impl std::io::Write for Shared {
    ///     fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
    ///         self.0.lock().unwrap().write(buf)
    ///     }
    ///     fn flush(&mut self) -> std::io::Result<()> {
    ///         Ok(())
    ///     }
    /// }
    ///
    /// let out = Shared::default();
    /// for job in Jobs::from_io(&b"3\nx\n"[..], out.clone(), Protocol::Lines) {
    ///     let job = job?;
    ///     match job.as_str().ok().and_then(|s| s.parse::<i64>().ok()) {
    ///         Some(n) => job.ok((n * n).to_string())?,
    ///         None => job.drop("not a number")?,
    ///     }
    /// }
    /// assert_eq!(*out.0.lock().unwrap(), b"ok 9\ndrop not a number\n");
    /// # Ok::<(), plumule::worker::Error>(())
    /// ```
    pub fn from_io(
        input: impl Read + Send + 'static,
        output: impl Write + Send + 'static,
        protocol: Protocol,
    ) -> Jobs {
        Jobs::new(
            protocol,
            DEFAULT_MAX_FRAME,
            Box::new(input),
            Box::new(output),
        )
    }

    /// The protocol in use.
    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// The largest job or answer, in bytes.
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// Jobs read whose answers are not written yet: unanswered ones, and answered ones waiting
    /// for an earlier job's answer.
    ///
    /// This is the number of [`Job`]s alive (or answered out of order) in this process; see
    /// [`held`](Jobs::held) for everything taken from the input.
    pub fn in_flight(&self) -> usize {
        self.sink.in_flight()
    }

    /// Jobs taken from the input and not answered on the output yet: the
    /// [`in_flight`](Jobs::in_flight) ones, plus those read and decoded (in one read of up to
    /// 16 KiB) that the iterator has not handed out yet. The master's count of this worker's
    /// jobs in flight is this, plus the jobs still in the stdin pipe and the answers still in
    /// the stdout pipe; so with `prefetch = P` it never exceeds P.
    pub fn held(&self) -> usize {
        self.sink.held()
    }

    /// The jobs with their payloads parsed as JSON into `T`: see [`Typed`].
    pub fn typed<T: DeserializeOwned>(self) -> Typed<T> {
        Typed {
            jobs: self,
            _payload: PhantomData,
        }
    }

    /// Answers every job with `handler` until end of input, one job at a time.
    ///
    /// Each payload is parsed as JSON into `T` (one that does not parse answers
    /// `drop "bad payload: …"` and never reaches the handler); `Ok(result)` answers `ok` with
    /// the result as JSON, `Err(fail)` answers as [`Fail`] says. Returns `Ok` at end of input,
    /// or the first read or write error.
    pub fn serve<T, R, F>(self, mut handler: F) -> Result<(), Error>
    where
        T: DeserializeOwned,
        R: Serialize,
        F: FnMut(T) -> Result<R, Fail>,
    {
        for item in self.typed::<T>() {
            let (payload, job) = item?;
            job.answer(Answer::json_result(handler(payload)))?;
        }
        Ok(())
    }

    /// Blocks until fewer than `limit` jobs are in flight (for the pool's backlog control).
    fn wait_for_room(&self, limit: usize) -> Result<(), Error> {
        self.sink.wait_for_room(limit)
    }
}

impl Iterator for Jobs {
    type Item = Result<Job, Error>;

    fn next(&mut self) -> Option<Result<Job, Error>> {
        if self.done {
            return None;
        }
        let read = codec::read_job(&mut self.input);
        self.sink.set_buffered(self.input.buffered_jobs());
        match read {
            Ok(Some(payload)) => Some(Ok(Job {
                seq: self.sink.next_seq(),
                payload,
                sink: Some(Arc::clone(&self.sink)),
            })),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

impl std::iter::FusedIterator for Jobs {}

/// One job: its payload, and the duty to answer it exactly once.
///
/// The answering methods ([`ok`](Job::ok), [`fail`](Job::fail), [`drop`](Job::drop),
/// [`answer`](Job::answer)) take the job by value. They return `Ok` once the answer is written
/// and flushed, or held until the earlier jobs are answered; `Err` when the output is broken
/// (the master is gone). A job dropped without an answer answers `fail "not answered"`.
pub struct Job {
    seq: u64,
    payload: Vec<u8>,
    /// `None` once answered.
    sink: Option<Arc<Sink>>,
}

impl fmt::Debug for Job {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Job")
            .field("seq", &self.seq)
            .field("payload", &String::from_utf8_lossy(&self.payload))
            .finish()
    }
}

impl Job {
    /// The job's position in this worker's input, from 0.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The payload's bytes (a line without its `\n`, or a frame without its length).
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// The payload as text, if it is UTF-8.
    pub fn as_str(&self) -> Result<&str, std::str::Utf8Error> {
        std::str::from_utf8(&self.payload)
    }

    /// The payload parsed as JSON into `T`.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.payload)
    }

    /// Answers `ok`, with `result` unless it is empty (`ok RESULT` in `lines`).
    pub fn ok(mut self, result: impl AsRef<[u8]>) -> Result<(), Error> {
        let sink = self.sink.take().expect("a job is answered once");
        sink.answer_ok(self.seq, result.as_ref())
    }

    /// Answers `ok` with `result` serialized as JSON.
    pub fn ok_json<R: Serialize>(self, result: &R) -> Result<(), Error> {
        self.answer(Answer::json(result))
    }

    /// Answers `fail REASON`: the master retries the job, with backoff, until `max_attempts`.
    pub fn fail(self, reason: impl fmt::Display) -> Result<(), Error> {
        self.answer(Answer::Fail(reason.to_string()))
    }

    /// Answers `drop REASON`: the master dead-letters the job at once, with the reason.
    ///
    /// (Not `Drop::drop`: this one takes a reason and answers.)
    pub fn drop(self, reason: impl fmt::Display) -> Result<(), Error> {
        self.answer(Answer::Drop(reason.to_string()))
    }

    /// Answers with `answer`.
    pub fn answer(mut self, answer: Answer) -> Result<(), Error> {
        let sink = self.sink.take().expect("a job is answered once");
        sink.answer(self.seq, answer)
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        let Some(sink) = self.sink.take() else { return };
        let reason = if std::thread::panicking() {
            "handler panicked"
        } else {
            "not answered"
        };
        eprintln!(
            "plumule::worker: job {} was dropped without an answer: fail {reason:?}",
            self.seq
        );
        // The output may be broken, and a destructor cannot report it: the next answer or read
        // will.
        let _ = sink.answer(self.seq, Answer::Fail(reason.to_string()));
    }
}

/// An answer to a job, as the handler of a [`Pool`] gives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// `ok`, with a result (may be empty).
    Ok(Vec<u8>),
    /// `fail REASON`: retried with backoff until `max_attempts`.
    Fail(String),
    /// `drop REASON`: dead-lettered at once.
    Drop(String),
}

impl Answer {
    /// `ok` with `result`.
    pub fn ok(result: impl Into<Vec<u8>>) -> Answer {
        Answer::Ok(result.into())
    }

    /// `fail` with `reason`.
    pub fn fail(reason: impl fmt::Display) -> Answer {
        Answer::Fail(reason.to_string())
    }

    /// `drop` with `reason`.
    pub fn drop(reason: impl fmt::Display) -> Answer {
        Answer::Drop(reason.to_string())
    }

    /// `ok` with `result` as JSON; `drop` when it cannot be serialized (trying again would not
    /// help).
    pub fn json<R: Serialize>(result: &R) -> Answer {
        match serde_json::to_vec(result) {
            Ok(bytes) => Answer::Ok(bytes),
            Err(e) => Answer::Drop(format!("cannot serialize the result: {e}")),
        }
    }

    /// What a typed handler's outcome answers: `ok` with the result as JSON, or the [`Fail`].
    pub fn json_result<R: Serialize>(outcome: Result<R, Fail>) -> Answer {
        match outcome {
            Ok(result) => Answer::json(&result),
            Err(fail) => fail.into(),
        }
    }
}

/// How a typed handler turns a job down.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fail {
    /// Answer `fail REASON`: the job is retried with backoff, until `max_attempts`.
    Retry(String),
    /// Answer `drop REASON`: the job is dead-lettered at once.
    Drop(String),
}

impl Fail {
    /// [`Fail::Retry`] with `reason`.
    pub fn retry(reason: impl fmt::Display) -> Fail {
        Fail::Retry(reason.to_string())
    }

    /// [`Fail::Drop`] with `reason`.
    pub fn drop(reason: impl fmt::Display) -> Fail {
        Fail::Drop(reason.to_string())
    }
}

impl fmt::Display for Fail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fail::Retry(reason) => write!(f, "fail {reason}"),
            Fail::Drop(reason) => write!(f, "drop {reason}"),
        }
    }
}

impl From<Fail> for Answer {
    fn from(fail: Fail) -> Answer {
        match fail {
            Fail::Retry(reason) => Answer::Fail(reason),
            Fail::Drop(reason) => Answer::Drop(reason),
        }
    }
}

/// The jobs whose payloads parse as JSON into `T`, each with its [`Job`] to answer.
///
/// A payload that does not parse is answered `drop "bad payload: …"` here and skipped. Made by
/// [`Jobs::typed`].
pub struct Typed<T> {
    jobs: Jobs,
    _payload: PhantomData<fn() -> T>,
}

impl<T> fmt::Debug for Typed<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Typed")
            .field("jobs", &self.jobs)
            .field("payload", &std::any::type_name::<T>())
            .finish()
    }
}

impl<T> Typed<T> {
    /// The untyped jobs underneath.
    pub fn jobs(&self) -> &Jobs {
        &self.jobs
    }
}

impl<T: DeserializeOwned> Iterator for Typed<T> {
    type Item = Result<(T, Job), Error>;

    fn next(&mut self) -> Option<Result<(T, Job), Error>> {
        loop {
            let job = match self.jobs.next()? {
                Ok(job) => job,
                Err(e) => return Some(Err(e)),
            };
            match job.json::<T>() {
                Ok(payload) => return Some(Ok((payload, job))),
                Err(e) => {
                    if let Err(e) = job.drop(format!("bad payload: {e}")) {
                        return Some(Err(e));
                    }
                }
            }
        }
    }
}

impl<T: DeserializeOwned> std::iter::FusedIterator for Typed<T> {}
