//! The worker library's side of a queue (`worker::Builder::io`, over `queue::wire::JobReader`):
//! jobs read in reads of any size are the jobs `JobDecoder` finds in the whole stream (plus a
//! last unterminated `lines` job), then at most one error; every job answered gives exactly
//! one answer on the output, in order, that the master's `AnswerDecoder` reads without error.
//!
//! Input layout: byte 0 picks the protocol (bit 0), how jobs are answered (bits 1–2) and
//! `max_frame` (the rest: 1 to 32, or the default when it is 0 mod 33), bytes 1 to 4 seed the
//! read sizes, the rest is the worker's stdin.
#![no_main]

mod chunks;

use std::io::Write;
use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use plumule::config::QueueProtocol;
use plumule::queue::wire::{AnswerDecoder, JobDecoder, Outcome};
use plumule::worker::{Answer, Builder, Protocol, DEFAULT_MAX_FRAME};

#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

impl Write for Shared {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let (head, seed, stream) = match data {
        [h, a, b, c, d, rest @ ..] => (*h, u32::from_le_bytes([*a, *b, *c, *d]), rest),
        _ => return,
    };
    let (protocol, wire) = if head & 1 == 0 {
        (Protocol::Lines, QueueProtocol::Lines)
    } else {
        (Protocol::Frames, QueueProtocol::Frames)
    };
    let answering = usize::from((head >> 1) & 3);
    let max = match (head >> 3) % 33 {
        0 => DEFAULT_MAX_FRAME,
        m => usize::from(m),
    };

    // What the master's decoder finds in the whole stream.
    let mut expected = Vec::new();
    let mut d = JobDecoder::new(wire, max as u64);
    let pushed = d.push(stream, |j| expected.push(j.to_vec()));
    let end = match pushed {
        Ok(()) => d.finish_taking_last_line(|j| expected.push(j.to_vec())),
        Err(e) => Err(e),
    };

    let reads = chunks::sizes(seed, 2 * max.min(100) + 6, stream.len());
    let input = chunks::Chunked::new(stream, reads);
    let out = Shared::default();
    let jobs = Builder::new()
        .protocol(protocol)
        .max_frame(max)
        .io(input, out.clone())
        .expect("protocol and max_frame given");
    let mut got = Vec::new();
    let mut failed = false;
    for (i, job) in jobs.enumerate() {
        let job = match job {
            Ok(job) => job,
            Err(e) => {
                assert!(!failed, "a second error");
                assert!(end.is_err(), "the reader failed ({e}), the decoder did not");
                failed = true;
                continue;
            }
        };
        assert!(!failed, "a job after an error");
        got.push(job.payload().to_vec());
        let payload = job.payload().to_vec();
        let answer = match (answering + i) % 4 {
            0 => Answer::Ok(payload),
            1 => Answer::Fail(String::from_utf8_lossy(&payload).into_owned()),
            2 => Answer::Drop(String::new()),
            // Dropped unanswered, it answers `fail "not answered"` (and says so on stderr: only
            // the first job, to keep the run fast).
            _ if i == 0 => {
                drop(job);
                continue;
            }
            _ => Answer::Fail(String::new()),
        };
        job.answer(answer).expect("the output takes everything");
    }
    assert_eq!(got, expected, "jobs");
    assert_eq!(failed, end.is_err(), "error {end:?}");

    let written = out.0.lock().unwrap().clone();
    let mut answers = Vec::new();
    // A `lines` limit under 4 cannot hold `fail`: the library sends the answer whole, and the
    // master refuses it; the framing stays right.
    let limit = if wire == QueueProtocol::Lines && max < 4 {
        u64::MAX
    } else {
        max as u64
    };
    let room = match wire {
        QueueProtocol::Lines => max.saturating_sub(3),
        QueueProtocol::Frames => max - 1,
    };
    let mut d = AnswerDecoder::new(wire, limit);
    d.push(&written, |a| answers.push(a))
        .and_then(|()| d.finish())
        .unwrap_or_else(|e| panic!("the master refuses the answers {written:?}: {e}"));
    assert_eq!(answers.len(), got.len(), "one answer per job");
    for (i, (a, payload)) in answers.iter().zip(&got).enumerate() {
        let want = match (answering + i) % 4 {
            0 if payload.len() <= room => Outcome::Ok,
            0 | 1 | 3 => Outcome::Fail,
            _ => Outcome::Drop,
        };
        assert_eq!(a.outcome, want, "answer {i} to {payload:?}: {a:?}");
    }
});
