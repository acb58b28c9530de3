//! The bytes on a queue worker's pipes (SPEC §4 and §9): jobs on its stdin, answers on its
//! stdout, for `protocol = "lines"` and `protocol = "frames"`. Both ends use this module: the
//! master encodes jobs ([`encode_job`]) and decodes answers ([`AnswerDecoder`]); the worker
//! library decodes jobs ([`JobDecoder`], [`JobReader`]) and encodes answers
//! ([`encode_answer`]).
//!
//! # `lines`
//!
//! A job is its payload followed by one `\n` (0x0A). The payload may hold any byte but `\n`,
//! which [`encode_job`] refuses (`submit` refuses it before anything is stored). A `\r` (0x0D)
//! is an ordinary byte in a job, passed through untouched wherever it is, so what was submitted
//! is exactly what the worker reads; a shell `read -r` keeps it too.
//!
//! An answer is one line, ended by `\n`, in one of these shapes (bytes, no other spelling):
//!
//! | line            | meaning                                              |
//! |-----------------|------------------------------------------------------|
//! | `ok`            | done, empty result                                   |
//! | `ok RESULT`     | done; RESULT is every byte after the first space     |
//! | `fail REASON`   | failed, retried with backoff until `max_attempts`   |
//! | `drop REASON`   | failed for good, dead-lettered at once               |
//!
//! The keyword is lowercase and is followed by exactly one space (0x20) before the text, or by
//! the end of the line; the text is kept byte for byte (more spaces, tabs, non-UTF-8 bytes), so
//! `ok ` is `ok` with an empty result. `fail` and `drop` without a reason are accepted, with an
//! empty one, so that `echo "fail $why"` with an empty `$why` is not a protocol error. One `\r`
//! just before the `\n` is dropped, so a worker that writes CRLF line ends is understood; for
//! that reason [`encode_answer`] refuses a text that ends with `\r`. Anything else (an empty
//! line, `OK`, ` ok`, `ok\tx`, `done`) is a protocol error that names the line.
//!
//! A line longer than the limit (the queue's `max_frame`, counted without its `\n` and dropped
//! `\r`) is a protocol error too, raised as soon as the excess arrives: the decoder never holds
//! more than the limit plus one byte.
//!
//! Example: the job `resize 42.png` is `72 65 73 69 7a 65 20 34 32 2e 70 6e 67 0a`; the answer
//! `ok 42-small.png\n` is `6f 6b 20 34 32 2d ...  0a`.
//!
//! # `frames`
//!
//! Binary-safe: every length is 4 bytes, unsigned, big-endian (network order).
//!
//! A job is a length L (0 ≤ L ≤ `max_frame`), then the L bytes of the payload:
//!
//! ```text
//! job    = L:u32be  payload[L]
//! "abc"  → 00 00 00 03  61 62 63
//! ""     → 00 00 00 00
//! ```
//!
//! An answer is a length N (1 ≤ N ≤ `max_frame`), one status byte, then N − 1 bytes of result
//! (for ok) or reason (for fail and drop):
//!
//! ```text
//! answer = N:u32be  status:u8  text[N-1]        status: 00 ok, 01 fail, 02 drop
//! ok "hi"       → 00 00 00 03  00  68 69
//! fail ""       → 00 00 00 01  01
//! drop "bad"    → 00 00 00 04  02  62 61 64
//! ```
//!
//! N = 0 (no room for the status byte), N over `max_frame`, and a status byte other than 0, 1
//! or 2 are protocol errors, each raised as soon as its bytes arrive: the decoder never waits
//! for (or buffers) the body of a frame it will refuse.
//!
//! # Both
//!
//! Answers come in the order of the jobs. The decoders are incremental: they take bytes in
//! whatever chunks a non-blocking read returns, hold only the unfinished record (at most the
//! limit, plus one byte for `lines`), and give the same answers and the same error whatever the
//! chunking. A protocol error is final: the decoder repeats it and decodes nothing more (the
//! master kills the worker). At end of stream, [`AnswerDecoder::finish`] reports a record left
//! half-written (a last line without `\n`, a cut frame).

use std::collections::VecDeque;
use std::io::{self, Read};

use crate::config::QueueProtocol;

/// What a worker says about a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Done: the job leaves the queue; the text is its result.
    Ok,
    /// Failed: retried with backoff until `max_attempts`; the text is the reason.
    Fail,
    /// Failed for good: dead-lettered at once; the text is the reason.
    Drop,
}

impl Outcome {
    /// The word that starts a `lines` answer.
    pub fn keyword(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Fail => "fail",
            Outcome::Drop => "drop",
        }
    }

    /// The status byte of a `frames` answer.
    pub fn status(self) -> u8 {
        match self {
            Outcome::Ok => 0,
            Outcome::Fail => 1,
            Outcome::Drop => 2,
        }
    }

    pub fn from_status(status: u8) -> Option<Outcome> {
        match status {
            0 => Some(Outcome::Ok),
            1 => Some(Outcome::Fail),
            2 => Some(Outcome::Drop),
            _ => None,
        }
    }
}

/// One answer from a worker, for its oldest unanswered job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub outcome: Outcome,
    /// The result (ok) or the reason (fail, drop); may be empty, may be any bytes.
    pub text: Vec<u8>,
}

/// How many bytes of an offending line an error message shows.
const EXCERPT: usize = 60;

/// A stream from the other end that does not follow the protocol. Messages name the offending
/// bytes (escaped, cut to a few dozen) so that a worker's author can find the bug.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("unexpected answer line \"{line}\": expected `ok`, `ok RESULT`, `fail REASON` or `drop REASON`")]
    BadAnswerLine {
        /// The line, escaped (`\xNN`, `\t`, `\"`) and cut after 60 bytes with `…`.
        line: String,
    },
    #[error("line longer than {max} bytes (max_frame), starting \"{start}\"")]
    LineTooLong { max: u64, start: String },
    #[error("answer frame of length 0: an answer holds at least its status byte")]
    EmptyAnswerFrame,
    #[error("frame of {len} bytes is over max_frame ({max} bytes)")]
    FrameTooLong { len: u32, max: u64 },
    #[error("answer frame with status byte {status}: expected 0 (ok), 1 (fail) or 2 (drop)")]
    BadStatus { status: u8 },
    #[error("stream ended inside a line: {len} bytes without a newline, starting \"{start}\"")]
    UnterminatedLine { len: usize, start: String },
    #[error("stream ended inside a frame: {have} of its {want} bytes (length included)")]
    TruncatedFrame { have: usize, want: usize },
}

/// A job or answer that cannot be put on the wire as asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("a lines {what} cannot contain a newline (byte {at}); use protocol = \"frames\" for binary data")]
    Newline { what: &'static str, at: usize },
    #[error(
        "a lines answer cannot end with a carriage return: the master drops one before the newline"
    )]
    TrailingCr,
    #[error("{what} of {len} bytes is over max_frame ({max} bytes)")]
    TooLong {
        what: &'static str,
        len: usize,
        max: u64,
    },
}

/// The first bytes of `bytes`, escaped, for an error message.
fn excerpt(bytes: &[u8]) -> String {
    let mut s = bytes[..bytes.len().min(EXCERPT)].escape_ascii().to_string();
    if bytes.len() > EXCERPT {
        s.push('…');
    }
    s
}

/// The most bytes a frame can carry: its length is 4 bytes.
fn frame_limit(max: u64) -> u64 {
    max.min(u64::from(u32::MAX))
}

/// Whether `payload` can be sent as a job under `protocol` and `max` (the queue's
/// `max_frame`): what [`encode_job`] checks, without writing anything.
pub fn check_job(protocol: QueueProtocol, payload: &[u8], max: u64) -> Result<(), EncodeError> {
    match protocol {
        QueueProtocol::Lines => {
            if let Some(at) = payload.iter().position(|&b| b == b'\n') {
                return Err(EncodeError::Newline { what: "job", at });
            }
            if payload.len() as u64 > max {
                return Err(too_long("job", payload.len(), max));
            }
        }
        QueueProtocol::Frames => {
            if payload.len() as u64 > frame_limit(max) {
                return Err(too_long("job", payload.len(), max));
            }
        }
    }
    Ok(())
}

/// Appends job `payload` to `out` as `protocol` writes it, or says why it cannot be sent. `max`
/// is the queue's `max_frame`; nothing is appended on error.
pub fn encode_job(
    protocol: QueueProtocol,
    payload: &[u8],
    max: u64,
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    check_job(protocol, payload, max)?;
    match protocol {
        QueueProtocol::Lines => {
            out.extend_from_slice(payload);
            out.push(b'\n');
        }
        QueueProtocol::Frames => {
            out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
            out.extend_from_slice(payload);
        }
    }
    Ok(())
}

/// Appends an answer to `out` as `protocol` writes it, or says why it cannot be sent. `max` is
/// the queue's `max_frame` (a worker learns it however its program passes it; the default is
/// 16 MiB); nothing is appended on error.
pub fn encode_answer(
    protocol: QueueProtocol,
    outcome: Outcome,
    text: &[u8],
    max: u64,
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    match protocol {
        QueueProtocol::Lines => {
            if let Some(at) = text.iter().position(|&b| b == b'\n') {
                return Err(EncodeError::Newline { what: "answer", at });
            }
            if text.last() == Some(&b'\r') {
                return Err(EncodeError::TrailingCr);
            }
            let word = outcome.keyword().as_bytes();
            let len = if text.is_empty() {
                word.len()
            } else {
                word.len() + 1 + text.len()
            };
            if len as u64 > max {
                return Err(too_long("answer", len, max));
            }
            out.extend_from_slice(word);
            if !text.is_empty() {
                out.push(b' ');
                out.extend_from_slice(text);
            }
            out.push(b'\n');
        }
        QueueProtocol::Frames => {
            let len = text.len() + 1;
            if len as u64 > frame_limit(max) {
                return Err(too_long("answer", len, max));
            }
            out.extend_from_slice(&(len as u32).to_be_bytes());
            out.push(outcome.status());
            out.extend_from_slice(text);
        }
    }
    Ok(())
}

fn too_long(what: &'static str, len: usize, max: u64) -> EncodeError {
    EncodeError::TooLong { what, len, max }
}

/// Parses one `lines` answer, without its `\n` (and without the `\r` before it, if any).
pub fn parse_answer_line(line: &[u8]) -> Result<Answer, ProtocolError> {
    let (word, text) = match line.iter().position(|&b| b == b' ') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, &b""[..]),
    };
    let outcome = match word {
        b"ok" => Outcome::Ok,
        b"fail" => Outcome::Fail,
        b"drop" => Outcome::Drop,
        _ => {
            return Err(ProtocolError::BadAnswerLine {
                line: excerpt(line),
            })
        }
    };
    Ok(Answer {
        outcome,
        text: text.to_vec(),
    })
}

/// Which way the bytes flow: the two directions differ in small rules (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Jobs,
    Answers,
}

/// Cuts a byte stream into records (lines or frame bodies), checking the framing rules.
///
/// Invariants: `buf` holds the unfinished record only — for lines at most `max + 1` bytes, for
/// frames the header (under 4 bytes, while `body` is `None`) or the body so far (under the
/// length in `body`, itself at most `max`). Once `failed` is set nothing more is decoded.
#[derive(Debug)]
struct Unframer {
    protocol: QueueProtocol,
    direction: Direction,
    max: u64,
    buf: Vec<u8>,
    /// Frames: the length of the body being read, once its header is in.
    body: Option<u32>,
    failed: Option<ProtocolError>,
}

impl Unframer {
    fn new(protocol: QueueProtocol, direction: Direction, max: u64) -> Self {
        let max = match protocol {
            QueueProtocol::Lines => max,
            QueueProtocol::Frames => frame_limit(max),
        };
        Unframer {
            protocol,
            direction,
            max,
            buf: Vec::new(),
            body: None,
            failed: None,
        }
    }

    /// Feeds a chunk; `record` gets each complete record in order and may refuse it. The first
    /// error, from the framing or from `record`, is kept and returned from then on.
    fn push(
        &mut self,
        data: &[u8],
        mut record: impl FnMut(&[u8]) -> Result<(), ProtocolError>,
    ) -> Result<(), ProtocolError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let result = match self.protocol {
            QueueProtocol::Lines => self.push_lines(data, &mut record),
            QueueProtocol::Frames => self.push_frames(data, &mut record),
        };
        if let Err(e) = &result {
            self.failed = Some(e.clone());
            self.buf = Vec::new();
        }
        result
    }

    fn strips_cr(&self) -> bool {
        self.direction == Direction::Answers
    }

    fn push_lines(
        &mut self,
        mut data: &[u8],
        record: &mut impl FnMut(&[u8]) -> Result<(), ProtocolError>,
    ) -> Result<(), ProtocolError> {
        while let Some(nl) = data.iter().position(|&b| b == b'\n') {
            let (head, rest) = (&data[..nl], &data[nl + 1..]);
            let raw = self.buf.len() + head.len();
            let last = head.last().or(self.buf.last()).copied();
            let cr = self.strips_cr() && last == Some(b'\r');
            let len = raw - usize::from(cr);
            if len as u64 > self.max {
                return Err(self.too_long_line(head));
            }
            if self.buf.is_empty() {
                // The common case: a whole line inside one chunk, passed on without a copy.
                record(&head[..len])?;
            } else {
                self.buf.extend_from_slice(head);
                self.buf.truncate(len);
                let line = std::mem::take(&mut self.buf);
                record(&line)?;
                // Keep the allocation for the next line.
                self.buf = line;
                self.buf.clear();
            }
            data = rest;
        }
        // An unfinished line: refuse it as soon as it is sure to be too long, whatever comes
        // next. One byte over the limit may still be the `\r` of a line of exactly `max`.
        let raw = (self.buf.len() + data.len()) as u64;
        let last = data.last().or(self.buf.last()).copied();
        let may_end_in_cr = self.strips_cr() && last == Some(b'\r');
        if raw > self.max + u64::from(may_end_in_cr) {
            return Err(self.too_long_line(data));
        }
        self.buf.extend_from_slice(data);
        Ok(())
    }

    /// The error for a line found too long with `more` bytes after those buffered. It shows
    /// the same bytes however the line was chunked: at least `max + 1` of them have arrived
    /// when this is called, and it never shows more.
    fn too_long_line(&self, more: &[u8]) -> ProtocolError {
        let shown = self.max.saturating_add(1).min(EXCERPT as u64 + 1) as usize;
        let mut start = self.buf[..self.buf.len().min(shown)].to_vec();
        start.extend_from_slice(&more[..more.len().min(shown - start.len())]);
        ProtocolError::LineTooLong {
            max: self.max,
            start: excerpt(&start),
        }
    }

    fn push_frames(
        &mut self,
        mut data: &[u8],
        record: &mut impl FnMut(&[u8]) -> Result<(), ProtocolError>,
    ) -> Result<(), ProtocolError> {
        let answers = self.direction == Direction::Answers;
        loop {
            let Some(len) = self.body else {
                if data.is_empty() {
                    return Ok(());
                }
                let take = (4 - self.buf.len()).min(data.len());
                self.buf.extend_from_slice(&data[..take]);
                data = &data[take..];
                if self.buf.len() < 4 {
                    return Ok(());
                }
                let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
                self.buf.clear();
                if answers && len == 0 {
                    return Err(ProtocolError::EmptyAnswerFrame);
                }
                if u64::from(len) > self.max {
                    return Err(ProtocolError::FrameTooLong { len, max: self.max });
                }
                self.body = Some(len);
                continue;
            };
            let len = len as usize;
            if len > 0 {
                if data.is_empty() {
                    return Ok(());
                }
                if answers && self.buf.is_empty() && Outcome::from_status(data[0]).is_none() {
                    return Err(ProtocolError::BadStatus { status: data[0] });
                }
            }
            if self.buf.is_empty() && data.len() >= len {
                // The whole body is in this chunk: no copy.
                self.body = None;
                record(&data[..len])?;
                data = &data[len..];
                continue;
            }
            let take = (len - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.buf.len() < len {
                return Ok(());
            }
            self.body = None;
            let body = std::mem::take(&mut self.buf);
            record(&body)?;
            // Keep the allocation only when it is small: one big answer must not pin its size.
            if body.capacity() <= 64 * 1024 {
                self.buf = body;
                self.buf.clear();
            }
        }
    }

    /// End of stream: an error if a record was left unfinished. The unframer is then empty (or
    /// failed for good).
    fn finish(&mut self) -> Result<(), ProtocolError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let error = match (self.protocol, self.body) {
            (_, None) if self.buf.is_empty() => return Ok(()),
            (QueueProtocol::Lines, _) => ProtocolError::UnterminatedLine {
                len: self.buf.len(),
                start: excerpt(&self.buf),
            },
            (QueueProtocol::Frames, None) => ProtocolError::TruncatedFrame {
                have: self.buf.len(),
                want: 4,
            },
            (QueueProtocol::Frames, Some(len)) => ProtocolError::TruncatedFrame {
                have: 4 + self.buf.len(),
                want: 4 + len as usize,
            },
        };
        self.failed = Some(error.clone());
        self.buf = Vec::new();
        Err(error)
    }

    fn buffered(&self) -> usize {
        self.buf.len() + if self.body.is_some() { 4 } else { 0 }
    }
}

/// Turns a worker's stdout, in chunks of any size, into its answers (the master's side).
#[derive(Debug)]
pub struct AnswerDecoder {
    inner: Unframer,
}

impl AnswerDecoder {
    /// A decoder for `protocol` whose records may not exceed `max_frame` bytes (a line without
    /// its line end, a frame after its length).
    pub fn new(protocol: QueueProtocol, max_frame: u64) -> Self {
        AnswerDecoder {
            inner: Unframer::new(protocol, Direction::Answers, max_frame),
        }
    }

    /// Feeds the next chunk read from the worker; `emit` gets each complete answer, in order.
    /// On a protocol error the answers before it have been emitted, and every later call
    /// returns the same error without decoding anything.
    pub fn push(
        &mut self,
        chunk: &[u8],
        mut emit: impl FnMut(Answer),
    ) -> Result<(), ProtocolError> {
        let protocol = self.inner.protocol;
        self.inner.push(chunk, |record| {
            let answer = match protocol {
                QueueProtocol::Lines => parse_answer_line(record)?,
                QueueProtocol::Frames => Answer {
                    // The unframer checked the status byte as it arrived.
                    outcome: Outcome::from_status(record[0]).expect("status byte checked"),
                    text: record[1..].to_vec(),
                },
            };
            emit(answer);
            Ok(())
        })
    }

    /// The worker's stdout ended: an error if it stopped in the middle of an answer.
    pub fn finish(&mut self) -> Result<(), ProtocolError> {
        self.inner.finish()
    }

    /// Bytes of an unfinished answer held (header included). Zero between answers.
    pub fn buffered(&self) -> usize {
        self.inner.buffered()
    }
}

/// Turns a worker's stdin, in chunks of any size, into its jobs (the worker's side).
#[derive(Debug)]
pub struct JobDecoder {
    inner: Unframer,
}

impl JobDecoder {
    /// A decoder for `protocol` whose jobs may not exceed `max_frame` bytes.
    pub fn new(protocol: QueueProtocol, max_frame: u64) -> Self {
        JobDecoder {
            inner: Unframer::new(protocol, Direction::Jobs, max_frame),
        }
    }

    /// Feeds the next chunk; `emit` gets each complete job's payload, in order. Errors are
    /// final, as for [`AnswerDecoder::push`].
    pub fn push(&mut self, chunk: &[u8], mut emit: impl FnMut(&[u8])) -> Result<(), ProtocolError> {
        self.inner.push(chunk, |job| {
            emit(job);
            Ok(())
        })
    }

    /// stdin ended: an error if it stopped in the middle of a job.
    pub fn finish(&mut self) -> Result<(), ProtocolError> {
        self.inner.finish()
    }

    /// stdin ended, taking a last `lines` job left without its `\n` as a job (as
    /// `BufRead::lines` does) rather than a protocol error: `emit` gets it. The master always
    /// ends its jobs, but a worker fed by hand (`printf 'a\nb' | worker`) should not fail on
    /// its last line. A frame cut short is still an error.
    pub fn finish_taking_last_line(
        &mut self,
        mut emit: impl FnMut(&[u8]),
    ) -> Result<(), ProtocolError> {
        let inner = &mut self.inner;
        if inner.protocol == QueueProtocol::Lines && inner.failed.is_none() && !inner.buf.is_empty()
        {
            // At most `max` bytes: `push_lines` refuses a longer unfinished line as it arrives.
            emit(&std::mem::take(&mut inner.buf));
        }
        inner.finish()
    }
}

/// Why [`JobReader`] could not give the next job.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("cannot read jobs: {0}")]
    Io(#[from] io::Error),
    #[error("protocol error in the job stream: {0}")]
    Protocol(#[from] ProtocolError),
}

/// Jobs read from a blocking reader (a worker's stdin), one at a time. End of stream at a job
/// boundary is the master asking the worker to finish: [`JobReader::next_job`] returns `None`.
#[derive(Debug)]
pub struct JobReader<R> {
    reader: R,
    decoder: JobDecoder,
    /// Jobs decoded from the last read and not handed out yet: at most one read's worth.
    ready: VecDeque<Vec<u8>>,
    chunk: Box<[u8]>,
    eof: bool,
    /// The iterator has returned an error and ends.
    done: bool,
    /// A protocol error, returned once the jobs decoded before it are handed out.
    failed: Option<ProtocolError>,
    /// A last `lines` job without its `\n` is a job, not an error (see
    /// [`JobDecoder::finish_taking_last_line`]).
    last_line: bool,
}

impl<R: Read> JobReader<R> {
    pub fn new(reader: R, protocol: QueueProtocol, max_frame: u64) -> Self {
        JobReader {
            reader,
            decoder: JobDecoder::new(protocol, max_frame),
            ready: VecDeque::new(),
            chunk: vec![0; 16 * 1024].into_boxed_slice(),
            eof: false,
            done: false,
            failed: None,
            last_line: false,
        }
    }

    /// Takes a last `lines` job left without its `\n` at the end of the stream as a job
    /// instead of a protocol error (see [`JobDecoder::finish_taking_last_line`]).
    pub fn taking_last_line(mut self) -> Self {
        self.last_line = true;
        self
    }

    /// Jobs already read from the stream and decoded, not handed out yet: at most one read's
    /// worth (16 KiB).
    pub fn buffered_jobs(&self) -> usize {
        self.ready.len()
    }

    /// The next job's payload, `None` at the end of the stream. A stream cut inside a job is a
    /// protocol error. A protocol error comes after every job before it in the stream, and
    /// ends the stream: later calls return `None`.
    pub fn next_job(&mut self) -> Result<Option<Vec<u8>>, ReadError> {
        loop {
            if let Some(job) = self.ready.pop_front() {
                return Ok(Some(job));
            }
            if let Some(e) = self.failed.take() {
                return Err(e.into());
            }
            if self.eof {
                return Ok(None);
            }
            let n = match self.reader.read(&mut self.chunk) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            let ready = &mut self.ready;
            let decoded = if n == 0 {
                if self.last_line {
                    self.decoder
                        .finish_taking_last_line(|job| ready.push_back(job.to_vec()))
                } else {
                    self.decoder.finish()
                }
            } else {
                self.decoder
                    .push(&self.chunk[..n], |job| ready.push_back(job.to_vec()))
            };
            // The jobs decoded before an error are handed out first.
            if n == 0 || decoded.is_err() {
                self.eof = true;
                self.failed = decoded.err();
            }
        }
    }
}

/// Jobs until the end of the stream or the first error, which ends the iteration.
impl<R: Read> Iterator for JobReader<R> {
    type Item = Result<Vec<u8>, ReadError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.next_job() {
            Ok(job) => job.map(Ok),
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use QueueProtocol::{Frames, Lines};

    const MAX: u64 = 16 << 20;

    /// Everything a decoder makes of `stream` fed in the chunks `sizes` (then the rest), and
    /// of the end of the stream: the answers, then the error if any.
    type Decoded = (Vec<Answer>, Result<(), ProtocolError>);

    fn decode(protocol: QueueProtocol, max: u64, stream: &[u8], sizes: &[usize]) -> Decoded {
        let mut d = AnswerDecoder::new(protocol, max);
        let mut answers = Vec::new();
        let mut rest = stream;
        for &size in sizes.iter().chain(std::iter::once(&usize::MAX)) {
            let (chunk, tail) = rest.split_at(size.min(rest.len()));
            rest = tail;
            if let Err(e) = d.push(chunk, |a| answers.push(a)) {
                // Final: the decoder repeats it and emits nothing more.
                assert_eq!(
                    d.push(b"ok\n\0\0\0\x01\0", |_| panic!("emitted")),
                    Err(e.clone())
                );
                assert_eq!(d.finish(), Err(e.clone()));
                return (answers, Err(e));
            }
        }
        (answers, d.finish())
    }

    fn whole(protocol: QueueProtocol, max: u64, stream: &[u8]) -> Decoded {
        decode(protocol, max, stream, &[])
    }

    /// Checks that every split in two, and byte-by-byte feeding, decode as the whole stream.
    fn same_at_every_split(protocol: QueueProtocol, max: u64, stream: &[u8]) -> Decoded {
        let expected = whole(protocol, max, stream);
        for i in 0..=stream.len() {
            assert_eq!(
                decode(protocol, max, stream, &[i]),
                expected,
                "split at {i}"
            );
        }
        let ones = vec![1; stream.len()];
        assert_eq!(
            decode(protocol, max, stream, &ones),
            expected,
            "byte by byte"
        );
        expected
    }

    fn answer(outcome: Outcome, text: &[u8]) -> Answer {
        Answer {
            outcome,
            text: text.to_vec(),
        }
    }

    #[test]
    fn answer_lines_that_parse() {
        let table: &[(&[u8], Outcome, &[u8])] = &[
            (b"ok", Outcome::Ok, b""),
            (b"ok ", Outcome::Ok, b""),
            (b"ok 42", Outcome::Ok, b"42"),
            (b"ok  two  spaces\t", Outcome::Ok, b" two  spaces\t"),
            (b"ok \xff\xfe binary", Outcome::Ok, b"\xff\xfe binary"),
            (b"ok a\rb", Outcome::Ok, b"a\rb"),
            (
                b"fail timeout talking to db",
                Outcome::Fail,
                b"timeout talking to db",
            ),
            (b"fail", Outcome::Fail, b""),
            (b"drop bad input", Outcome::Drop, b"bad input"),
            (b"drop", Outcome::Drop, b""),
        ];
        for &(line, outcome, text) in table {
            assert_eq!(
                parse_answer_line(line),
                Ok(answer(outcome, text)),
                "{line:?}"
            );
        }
    }

    #[test]
    fn answer_lines_that_do_not_parse_are_named_in_the_error() {
        for line in [
            &b""[..],
            b"OK",
            b" ok",
            b"ok\tx",
            b"okay",
            b"failure x",
            b"done",
            b"\x00\x01",
            b"ok\r",
        ] {
            let e = parse_answer_line(line).unwrap_err();
            let msg = e.to_string();
            assert!(
                msg.starts_with(&format!(
                    "unexpected answer line \"{}\"",
                    line.escape_ascii()
                )),
                "{msg}"
            );
            assert!(msg.ends_with("`fail REASON` or `drop REASON`"), "{msg}");
        }
        // A long line is cut in the message.
        let long = [b'x'; 5000];
        let msg = parse_answer_line(&long).unwrap_err().to_string();
        assert!(msg.contains(&format!("\"{}…\"", "x".repeat(60))), "{msg}");
        assert!(msg.len() < 200);
        // Control bytes and quotes are escaped: the message stays one line.
        let msg = parse_answer_line(b"oops \"\n\x1b[31m")
            .unwrap_err()
            .to_string();
        assert_eq!(
            msg,
            "unexpected answer line \"oops \\\"\\n\\x1b[31m\": expected `ok`, `ok RESULT`, \
             `fail REASON` or `drop REASON`"
        );
    }

    #[test]
    fn a_lines_stream_at_every_split() {
        let stream = b"ok\nok 1 2\r\nfail no\ndrop \xff\n";
        let (answers, end) = same_at_every_split(Lines, MAX, stream);
        assert_eq!(end, Ok(()));
        assert_eq!(
            answers,
            [
                answer(Outcome::Ok, b""),
                answer(Outcome::Ok, b"1 2"),
                answer(Outcome::Fail, b"no"),
                answer(Outcome::Drop, b"\xff"),
            ]
        );
        // Only one `\r` goes: the other is part of the line, and makes it a bad one.
        let (_, end) = same_at_every_split(Lines, MAX, b"ok\r\r\n");
        let line = "ok\\r".to_string();
        assert_eq!(end, Err(ProtocolError::BadAnswerLine { line }));
        // Answers before a bad line are kept; nothing after it is decoded.
        let (answers, end) = same_at_every_split(Lines, MAX, b"ok a\n\nok b\n");
        assert_eq!(answers, [answer(Outcome::Ok, b"a")]);
        assert_eq!(
            end,
            Err(ProtocolError::BadAnswerLine {
                line: String::new()
            })
        );
    }

    #[test]
    fn a_lines_answer_longer_than_the_limit_is_refused_as_soon_as_it_is_sure() {
        // Exactly the limit is fine, with LF or CRLF.
        for stream in [&b"ok 456\n"[..], b"ok 456\r\n"] {
            let (answers, end) = same_at_every_split(Lines, 6, stream);
            assert_eq!((answers, end), (vec![answer(Outcome::Ok, b"456")], Ok(())));
        }
        let too_long = Err(ProtocolError::LineTooLong {
            max: 6,
            start: "ok 4567".into(),
        });
        for stream in [&b"ok 4567\n"[..], b"ok 4567\r\n", b"ok 4567", b"ok 456\rx"] {
            let expected = if stream == b"ok 456\rx" {
                Err(ProtocolError::LineTooLong {
                    max: 6,
                    start: "ok 456\\r".into(),
                })
            } else {
                too_long.clone()
            };
            assert_eq!(same_at_every_split(Lines, 6, stream), (vec![], expected));
        }
        // Without waiting for a newline that may never come, and holding at most max + 1.
        let mut d = AnswerDecoder::new(Lines, 6);
        assert_eq!(d.push(b"ok 456", |_| {}), Ok(()));
        assert_eq!(d.push(b"\r", |_| {}), Ok(()));
        assert_eq!(d.buffered(), 7);
        assert!(d.push(b"\r", |_| {}).is_err());
        let mut d = AnswerDecoder::new(Lines, 6);
        let start = "ooooooo".to_string();
        let error = ProtocolError::LineTooLong { max: 6, start };
        assert_eq!(d.push(&[b'o'; 100_000], |_| {}), Err(error));
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn a_lines_stream_cut_inside_a_line() {
        let (answers, end) = same_at_every_split(Lines, MAX, b"ok\nok half");
        assert_eq!(answers, [answer(Outcome::Ok, b"")]);
        let e = end.unwrap_err();
        assert_eq!(
            e.to_string(),
            "stream ended inside a line: 7 bytes without a newline, starting \"ok half\""
        );
    }

    #[test]
    fn frames_are_byte_exact() {
        let table: &[(Outcome, &[u8], &[u8])] = &[
            (Outcome::Ok, b"hi", b"\0\0\0\x03\x00hi"),
            (Outcome::Ok, b"", b"\0\0\0\x01\x00"),
            (Outcome::Fail, b"", b"\0\0\0\x01\x01"),
            (Outcome::Drop, b"bad", b"\0\0\0\x04\x02bad"),
            (Outcome::Ok, b"\n\r\0", b"\0\0\0\x04\x00\n\r\0"),
        ];
        for &(outcome, text, bytes) in table {
            let mut out = Vec::new();
            encode_answer(Frames, outcome, text, MAX, &mut out).unwrap();
            assert_eq!(out, bytes);
            assert_eq!(
                whole(Frames, MAX, bytes),
                (vec![answer(outcome, text)], Ok(()))
            );
        }
        let mut out = Vec::new();
        encode_job(Frames, b"abc", MAX, &mut out).unwrap();
        encode_job(Frames, b"", MAX, &mut out).unwrap();
        encode_job(Frames, b"a\nb", MAX, &mut out).unwrap();
        assert_eq!(out, b"\0\0\0\x03abc\0\0\0\0\0\0\0\x03a\nb");
        // Lengths are big-endian.
        let text = vec![7u8; 0x0102];
        out.clear();
        encode_answer(Frames, Outcome::Fail, &text, MAX, &mut out).unwrap();
        assert_eq!(out[..5], [0, 0, 0x01, 0x03, 1]);
        assert_eq!(out.len(), 4 + 0x0103);
    }

    #[test]
    fn lines_are_byte_exact() {
        let mut out = Vec::new();
        encode_job(Lines, b"resize 42.png", MAX, &mut out).unwrap();
        encode_job(Lines, b"", MAX, &mut out).unwrap();
        encode_job(Lines, b"a\rb\r", MAX, &mut out).unwrap();
        assert_eq!(out, b"resize 42.png\n\na\rb\r\n");
        out.clear();
        encode_answer(Lines, Outcome::Ok, b"", MAX, &mut out).unwrap();
        encode_answer(Lines, Outcome::Ok, b"42-small.png", MAX, &mut out).unwrap();
        encode_answer(Lines, Outcome::Fail, b"", MAX, &mut out).unwrap();
        encode_answer(Lines, Outcome::Drop, b"no such file", MAX, &mut out).unwrap();
        assert_eq!(out, b"ok\nok 42-small.png\nfail\ndrop no such file\n");
    }

    #[test]
    fn a_frames_stream_at_every_split() {
        let mut stream = Vec::new();
        let sent = [
            answer(Outcome::Ok, b"result"),
            answer(Outcome::Fail, b""),
            answer(Outcome::Drop, b"\0\xff\n"),
            answer(Outcome::Ok, b""),
        ];
        for a in &sent {
            encode_answer(Frames, a.outcome, &a.text, MAX, &mut stream).unwrap();
        }
        assert_eq!(
            same_at_every_split(Frames, MAX, &stream),
            (sent.to_vec(), Ok(()))
        );
    }

    #[test]
    fn bad_frames_are_refused_as_soon_as_their_bytes_arrive() {
        let ok = b"\0\0\0\x01\x00";
        let cases: &[(&[u8], ProtocolError)] = &[
            (b"\0\0\0\0", ProtocolError::EmptyAnswerFrame),
            (
                b"\0\0\0\x0b",
                ProtocolError::FrameTooLong { len: 11, max: 10 },
            ),
            (
                b"\xff\xff\xff\xff",
                ProtocolError::FrameTooLong {
                    len: u32::MAX,
                    max: 10,
                },
            ),
            (b"\0\0\0\x05\x03", ProtocolError::BadStatus { status: 3 }),
            (b"\0\0\0\x01\xff", ProtocolError::BadStatus { status: 255 }),
        ];
        for (bad, error) in cases {
            // The error needs nothing beyond its own bytes, and answers before it are kept.
            let stream = [&ok[..], bad].concat();
            let expected = (vec![answer(Outcome::Ok, b"")], Err(error.clone()));
            assert_eq!(same_at_every_split(Frames, 10, &stream), expected);
        }
        // Exactly max_frame is fine.
        let mut stream = Vec::new();
        encode_answer(Frames, Outcome::Ok, b"123456789", 10, &mut stream).unwrap();
        assert_eq!(stream[..4], [0, 0, 0, 10]);
        assert_eq!(whole(Frames, 10, &stream).1, Ok(()));
    }

    #[test]
    fn a_frames_stream_cut_inside_a_frame() {
        let cases: &[(&[u8], usize, usize)] = &[
            (b"\0\0", 2, 4),
            (b"\0\0\0\x03", 4, 7),
            (b"\0\0\0\x03\x00a", 6, 7),
        ];
        for &(stream, have, want) in cases {
            let end = same_at_every_split(Frames, MAX, stream).1;
            assert_eq!(end, Err(ProtocolError::TruncatedFrame { have, want }));
        }
        assert_eq!(
            ProtocolError::TruncatedFrame { have: 6, want: 7 }.to_string(),
            "stream ended inside a frame: 6 of its 7 bytes (length included)"
        );
    }

    #[test]
    fn encoders_refuse_what_the_other_end_would_misread() {
        let mut out = Vec::new();
        assert_eq!(
            encode_job(Lines, b"two\nlines", MAX, &mut out),
            Err(EncodeError::Newline { what: "job", at: 3 })
        );
        assert_eq!(
            encode_answer(Lines, Outcome::Ok, b"a\nb", MAX, &mut out),
            Err(EncodeError::Newline {
                what: "answer",
                at: 1
            })
        );
        assert_eq!(
            encode_answer(Lines, Outcome::Fail, b"why\r", MAX, &mut out),
            Err(EncodeError::TrailingCr)
        );
        assert_eq!(
            encode_job(Lines, b"1234567", 6, &mut out),
            Err(EncodeError::TooLong {
                what: "job",
                len: 7,
                max: 6
            })
        );
        assert_eq!(
            encode_job(Frames, b"1234567", 6, &mut out),
            Err(EncodeError::TooLong {
                what: "job",
                len: 7,
                max: 6
            })
        );
        // "fail 12" is 7 bytes; the frame is 1 + 6.
        assert!(encode_answer(Lines, Outcome::Fail, b"12", 6, &mut out).is_err());
        assert!(encode_answer(Frames, Outcome::Fail, b"123456", 6, &mut out).is_err());
        assert!(out.is_empty(), "nothing is written on error");
        assert_eq!(
            EncodeError::Newline { what: "job", at: 3 }.to_string(),
            "a lines job cannot contain a newline (byte 3); use protocol = \"frames\" for binary data"
        );
        // What the encoder accepts, the decoder reads back.
        encode_answer(Lines, Outcome::Fail, b"12", 7, &mut out).unwrap();
        encode_answer(Frames, Outcome::Fail, b"12345", 6, &mut out).unwrap();
        assert_eq!(
            whole(Lines, 7, b"fail 12\n").0,
            [answer(Outcome::Fail, b"12")]
        );
    }

    /// A reader that hands out its bytes a few at a time, with an interruption between reads.
    struct Trickle {
        data: Vec<u8>,
        pos: usize,
        step: usize,
        interrupt: bool,
    }

    impl Read for Trickle {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.interrupt = !self.interrupt;
            if self.interrupt {
                return Err(io::ErrorKind::Interrupted.into());
            }
            let n = self.step.min(buf.len()).min(self.data.len() - self.pos);
            buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
            self.pos += n;
            Ok(n)
        }
    }

    #[test]
    fn jobs_round_trip_through_a_reader_in_both_protocols() {
        let jobs: &[&[u8]] = &[b"first", b"", b"with\rcr\r", b"\xff\x00 bytes", b"last"];
        for protocol in [Lines, Frames] {
            let mut data = Vec::new();
            for job in jobs {
                encode_job(protocol, job, MAX, &mut data).unwrap();
            }
            for step in [1, 3, 1000] {
                let trickle = Trickle {
                    data: data.clone(),
                    pos: 0,
                    step,
                    interrupt: false,
                };
                let read: Vec<Vec<u8>> = JobReader::new(trickle, protocol, MAX)
                    .collect::<Result<_, _>>()
                    .unwrap();
                assert_eq!(read, jobs, "{protocol:?}, step {step}");
            }
            // A stream cut inside a job is an error, once; the iterator then ends.
            let mut reader = JobReader::new(&data[..data.len() - 1], protocol, MAX);
            let got: Vec<_> = reader.by_ref().collect();
            assert_eq!(got.len(), jobs.len());
            assert!(matches!(got.last(), Some(Err(ReadError::Protocol(_)))));
            assert!(reader.next().is_none());
        }
        // The worker side keeps a job's `\r`: only answers lose one before the newline.
        let mut d = JobDecoder::new(Lines, MAX);
        let mut got = Vec::new();
        d.push(b"a\r\n\r\n", |j| got.push(j.to_vec())).unwrap();
        assert_eq!(got, [&b"a\r"[..], b"\r"]);
        assert_eq!(d.finish(), Ok(()));
    }

    #[test]
    fn a_last_line_without_newline_is_a_job_only_when_asked() {
        let read = |taking: bool, protocol, data: &[u8]| {
            let reader = JobReader::new(data, protocol, 8);
            let reader = if taking {
                reader.taking_last_line()
            } else {
                reader
            };
            reader
                .map(|job| job.map_err(|e| e.to_string()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            read(true, Lines, b"a\n\nlast"),
            [Ok(b"a".to_vec()), Ok(vec![]), Ok(b"last".to_vec())]
        );
        assert_eq!(read(true, Lines, b"a\n"), [Ok(b"a".to_vec())]);
        let strict = read(false, Lines, b"a\nlast");
        assert_eq!(strict[0], Ok(b"a".to_vec()));
        assert!(strict[1]
            .as_ref()
            .unwrap_err()
            .contains("4 bytes without a newline"));
        assert_eq!(strict.len(), 2);
        // A line over the limit is still refused, and a cut frame is still an error.
        assert!(read(true, Lines, b"123456789")[0].is_err());
        let cut = read(true, Frames, b"\0\0\0\x02a");
        assert_eq!(cut.len(), 1);
        assert!(cut[0].as_ref().unwrap_err().contains("5 of its 6 bytes"));
        // Decoded jobs wait in the reader until handed out.
        let mut reader = JobReader::new(&b"a\nb\nc\n"[..], Lines, 8);
        assert_eq!(reader.buffered_jobs(), 0);
        assert_eq!(reader.next_job().unwrap(), Some(b"a".to_vec()));
        assert_eq!(reader.buffered_jobs(), 2);
    }

    #[test]
    fn answers_round_trip_in_both_protocols() {
        let texts: &[&[u8]] = &[
            b"",
            b"x",
            b"two words",
            b"\xc3\xa9t\xc3\xa9",
            b"\x00\x7f\x1b",
        ];
        for protocol in [Lines, Frames] {
            let mut stream = Vec::new();
            let mut sent = Vec::new();
            for outcome in [Outcome::Ok, Outcome::Fail, Outcome::Drop] {
                for text in texts {
                    encode_answer(protocol, outcome, text, MAX, &mut stream).unwrap();
                    sent.push(answer(outcome, text));
                }
            }
            assert_eq!(same_at_every_split(protocol, MAX, &stream), (sent, Ok(())));
        }
    }

    #[test]
    fn garbage_never_panics_and_chunking_never_matters() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let alphabet = b"ok fail drop\n\r\0\x01\x02\x03\xff";
        let (mut answers, mut clean_ends) = (0, 0);
        for _ in 0..2000 {
            let max = [0, 1, 5, 12, MAX][(next() % 5) as usize];
            for protocol in [Lines, Frames] {
                // Valid answers with bytes of garbage among them.
                let mut stream = Vec::new();
                for _ in 0..next() % 6 {
                    if next() % 4 == 0 {
                        stream.extend(
                            (0..1 + next() % 3)
                                .map(|_| alphabet[(next() % alphabet.len() as u64) as usize]),
                        );
                    } else {
                        let outcome = Outcome::from_status((next() % 3) as u8).unwrap();
                        let text: Vec<u8> =
                            (0..next() % 4).map(|_| b'a' + (next() % 3) as u8).collect();
                        let _ = encode_answer(protocol, outcome, &text, MAX, &mut stream);
                    }
                }
                let expected = whole(protocol, max, &stream);
                answers += expected.0.len();
                clean_ends += usize::from(expected.1.is_ok());
                let sizes: Vec<usize> = (0..8).map(|_| (next() % 9) as usize).collect();
                assert_eq!(
                    decode(protocol, max, &stream, &sizes),
                    expected,
                    "{stream:?}"
                );
                let mut jobs = JobDecoder::new(protocol, max);
                let _ = jobs.push(&stream, |_| {});
                let _ = jobs.finish();
            }
        }
        // The inputs reach past the first record: some decode to answers, some end cleanly.
        assert!(
            answers > 1000 && clean_ends > 500,
            "{answers} answers, {clean_ends} clean"
        );
    }
}
