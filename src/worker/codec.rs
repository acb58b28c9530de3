//! What the worker library adds to [`queue::wire`](crate::queue::wire), which owns the bytes of
//! both protocols for both ends (the master and this library read and write the very same
//! shapes through it):
//!
//! - reading: a last `lines` job without its `\n` is a job (as `BufRead::lines` has it, for a
//!   worker fed by hand), and the wire's errors become this library's [`Error`]s;
//! - answering: the wire refuses what the master would misread, and a worker's author should
//!   not have to care, so an answer is made sendable first. In `lines` each `\n` of a result or
//!   reason becomes a space, and so does a `\r` that would end the line (the master drops one
//!   before the `\n`); an empty reason becomes [`NO_REASON`]; a reason that does not fit in
//!   `max_frame` is cut at a character boundary; an `ok` result that does not fit becomes a
//!   `fail` that says so (the master would reject the oversized answer as a protocol error and
//!   redeliver the job forever).
//!
//! Nothing here keeps state between calls but the reader.

use std::borrow::Cow;
use std::io::Read;

use super::{Answer, Error, Protocol};
use crate::config::QueueProtocol;
use crate::queue::wire::{self, JobReader, Outcome, ProtocolError, ReadError};

/// What a status word or byte is followed by when a reason is empty: the master always gets a
/// reason to record with the job.
pub(super) const NO_REASON: &str = "no reason given";

fn wire_protocol(protocol: Protocol) -> QueueProtocol {
    match protocol {
        Protocol::Lines => QueueProtocol::Lines,
        Protocol::Frames => QueueProtocol::Frames,
    }
}

/// The reader of the jobs of `input`.
pub(super) fn job_reader<R: Read>(protocol: Protocol, max_frame: usize, input: R) -> JobReader<R> {
    JobReader::new(input, wire_protocol(protocol), max_frame as u64).taking_last_line()
}

/// Reads one job: `Ok(None)` at a clean end of input (EOF between jobs).
pub(super) fn read_job<R: Read>(reader: &mut JobReader<R>) -> Result<Option<Vec<u8>>, Error> {
    reader.next_job().map_err(|e| match e {
        ReadError::Io(e) => Error::Read(e),
        ReadError::Protocol(ProtocolError::TruncatedFrame { have, want }) => {
            Error::Truncated { got: have, want }
        }
        ReadError::Protocol(ProtocolError::FrameTooLong { len, max }) => Error::FrameTooLarge {
            len: len as usize,
            max: usize::try_from(max).unwrap_or(usize::MAX),
        },
        ReadError::Protocol(ProtocolError::LineTooLong { max, .. }) => Error::LineTooLong {
            max: usize::try_from(max).unwrap_or(usize::MAX),
        },
        ReadError::Protocol(other) => Error::Protocol(other),
    })
}

/// Appends the bytes of one answer to `out`, made sendable as the module docs say.
pub(super) fn encode_answer(
    protocol: Protocol,
    max_frame: usize,
    answer: &Answer,
    out: &mut Vec<u8>,
) {
    match answer {
        Answer::Ok(result) => encode_ok(protocol, max_frame, result, out),
        Answer::Fail(reason) => encode(
            protocol,
            max_frame,
            Outcome::Fail,
            reason_bytes(reason),
            out,
        ),
        Answer::Drop(reason) => encode(
            protocol,
            max_frame,
            Outcome::Drop,
            reason_bytes(reason),
            out,
        ),
    }
}

/// [`encode_answer`] of an `ok` with `result`, without making an [`Answer`] of it first.
pub(super) fn encode_ok(protocol: Protocol, max_frame: usize, result: &[u8], out: &mut Vec<u8>) {
    encode(protocol, max_frame, Outcome::Ok, result, out)
}

fn encode(protocol: Protocol, max_frame: usize, outcome: Outcome, text: &[u8], out: &mut Vec<u8>) {
    let max = max_frame as u64;
    // Room for the text: a frame's length counts its status byte and fits in 4 bytes, a line
    // counts its "word ".
    let room = match protocol {
        Protocol::Frames => max.min(u64::from(u32::MAX)).saturating_sub(1),
        Protocol::Lines => max.saturating_sub(outcome.keyword().len() as u64 + 1),
    };
    let room = usize::try_from(room).unwrap_or(usize::MAX);
    if outcome == Outcome::Ok && text.len() > room {
        let reason = format!(
            "result of {} bytes exceeds max_frame ({max_frame} bytes)",
            text.len()
        );
        return encode_answer(protocol, max_frame, &Answer::Fail(reason), out);
    }
    let text = match outcome {
        Outcome::Ok => text,
        Outcome::Fail | Outcome::Drop => cut_at_char(text, room),
    };
    let text = match protocol {
        Protocol::Lines => one_line(text),
        Protocol::Frames => Cow::Borrowed(text),
    };
    let protocol = wire_protocol(protocol);
    if wire::encode_answer(protocol, outcome, &text, max, out).is_err() {
        // Only a limit too small for the keyword itself (`max_frame` under 5): send the answer
        // whole all the same, and the master reports the protocol error, rather than send
        // nothing and leave the stream out of step.
        let sent = wire::encode_answer(protocol, outcome, &text, u64::MAX, out);
        debug_assert!(sent.is_ok(), "a sendable answer is refused: {sent:?}");
    }
}

fn reason_bytes(reason: &str) -> &[u8] {
    if reason.is_empty() {
        NO_REASON.as_bytes()
    } else {
        reason.as_bytes()
    }
}

/// `text` as the body of one `lines` answer: each `\n` a space, and a last `\r` too.
fn one_line(text: &[u8]) -> Cow<'_, [u8]> {
    if !text.contains(&b'\n') && text.last() != Some(&b'\r') {
        return Cow::Borrowed(text);
    }
    let mut line: Vec<u8> = text
        .iter()
        .map(|&b| if b == b'\n' { b' ' } else { b })
        .collect();
    if let Some(last) = line.last_mut().filter(|b| **b == b'\r') {
        *last = b' ';
    }
    Cow::Owned(line)
}

/// The longest prefix of `text` (valid UTF-8) of at most `max` bytes that ends on a character
/// boundary.
fn cut_at_char(text: &[u8], max: usize) -> &[u8] {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    // A UTF-8 continuation byte is 0b10xx_xxxx: back up to the start of its character.
    while end > 0 && text[end] & 0xC0 == 0x80 {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::wire::AnswerDecoder;

    fn encoded(protocol: Protocol, max: usize, answer: Answer) -> Vec<u8> {
        let mut out = Vec::new();
        encode_answer(protocol, max, &answer, &mut out);
        out
    }

    #[test]
    fn lines_answers_are_one_line_each() {
        let l = |a| encoded(Protocol::Lines, 1 << 20, a);
        assert_eq!(l(Answer::Ok(vec![])), b"ok\n");
        assert_eq!(l(Answer::Ok(b"42".to_vec())), b"ok 42\n");
        assert_eq!(l(Answer::Ok(b"a\nb\n".to_vec())), b"ok a b \n");
        assert_eq!(l(Answer::Fail("x\ny".into())), b"fail x y\n");
        assert_eq!(l(Answer::Drop(String::new())), b"drop no reason given\n");
        // The master would drop a `\r` before the `\n`: it is sent as a space instead.
        assert_eq!(l(Answer::Ok(b"a\rb\r".to_vec())), b"ok a\rb \n");
    }

    #[test]
    fn frames_answers_count_their_status_byte() {
        let f = |a| encoded(Protocol::Frames, 1 << 20, a);
        assert_eq!(f(Answer::Ok(vec![])), [0, 0, 0, 1, 0]);
        assert_eq!(f(Answer::Ok(b"a\nb\r".to_vec())), b"\0\0\0\x05\0a\nb\r");
        assert_eq!(f(Answer::Fail("r".into())), [0, 0, 0, 2, 1, b'r']);
        assert_eq!(f(Answer::Drop("r".into())), [0, 0, 0, 2, 2, b'r']);
    }

    #[test]
    fn an_oversized_result_fails_and_an_oversized_reason_is_cut() {
        assert_eq!(
            encoded(Protocol::Frames, 40, Answer::Ok(vec![b'x'; 40])),
            b"\0\0\0\x28\x01result of 40 bytes exceeds max_frame (4"
        );
        // "é" is two bytes: the cut does not split it.
        assert_eq!(
            encoded(Protocol::Lines, 7, Answer::Drop("aé".into())),
            b"drop a\n"
        );
        assert_eq!(
            encoded(Protocol::Frames, 3, Answer::Fail("aé".into())),
            b"\0\0\0\x02\x01a"
        );
    }

    /// Whatever a handler answers, the master's decoder reads it back as one answer of the
    /// same outcome: the worker never puts the stream out of step.
    #[test]
    fn every_answer_decodes_on_the_master_side() {
        let texts: &[&[u8]] = &[
            b"",
            b"x",
            b"a\nb",
            b"cr\r",
            b"\r\n\r",
            "é".as_bytes(),
            &[b'y'; 50],
        ];
        // A frame's length counts its status byte, a line its "ok ".
        for (protocol, overhead) in [(Protocol::Lines, 3), (Protocol::Frames, 1)] {
            for max in [8, 12, 64, 1 << 20] {
                let mut stream = Vec::new();
                let mut sent = Vec::new();
                for text in texts {
                    let reason = String::from_utf8_lossy(text).into_owned();
                    for answer in [
                        Answer::Ok(text.to_vec()),
                        Answer::Fail(reason.clone()),
                        Answer::Drop(reason),
                    ] {
                        encode_answer(protocol, max, &answer, &mut stream);
                        sent.push(answer);
                    }
                }
                let mut decoder = AnswerDecoder::new(wire_protocol(protocol), max as u64);
                let mut got = Vec::new();
                decoder.push(&stream, |a| got.push(a)).unwrap();
                decoder.finish().unwrap();
                assert_eq!(got.len(), sent.len(), "{protocol} {max}");
                for (answer, got) in sent.iter().zip(&got) {
                    let outcome = match answer {
                        Answer::Ok(text) if text.len() + overhead <= max => Outcome::Ok,
                        Answer::Ok(_) | Answer::Fail(_) => Outcome::Fail,
                        Answer::Drop(_) => Outcome::Drop,
                    };
                    assert_eq!(got.outcome, outcome, "{protocol} {max} {answer:?}");
                }
            }
        }
    }

    #[test]
    fn reading_stops_cleanly_only_between_jobs() {
        let read = |p, bytes: &[u8]| {
            let mut reader = job_reader(p, 8, bytes);
            let mut jobs = Vec::new();
            loop {
                match read_job(&mut reader) {
                    Ok(Some(job)) => jobs.push(job),
                    Ok(None) => return Ok(jobs),
                    Err(e) => return Err(e.to_string()),
                }
            }
        };
        assert_eq!(
            read(Protocol::Lines, b"a\n\nb"),
            Ok(vec![b"a".to_vec(), vec![], b"b".to_vec()])
        );
        assert_eq!(
            read(Protocol::Lines, b"123456789\n"),
            Err("a job line exceeds max_frame (8 bytes)".to_string())
        );
        assert_eq!(
            read(Protocol::Frames, b"\0\0\0\x01a\0\0\0\0"),
            Ok(vec![b"a".to_vec(), vec![]])
        );
        assert!(read(Protocol::Frames, b"\0\0\0\x02a")
            .unwrap_err()
            .contains("5 of 6"));
        assert!(read(Protocol::Frames, b"\0\0")
            .unwrap_err()
            .contains("2 of 4"));
        assert_eq!(
            read(Protocol::Frames, b"\0\0\0\x09"),
            Err("a job of 9 bytes exceeds max_frame (8 bytes)".to_string())
        );
    }
}
