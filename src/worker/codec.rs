//! The worker's side of the two queue protocols: reading one job, encoding one answer.
//!
//! Kept apart from the rest of the module so that it can be swapped for the codecs the master
//! uses (`queue::wire`) once both sides share one implementation. Nothing here keeps state
//! between calls: a codec is the protocol and the frame limit.

use std::io::{self, BufRead, Read};

use super::{Answer, Error, Protocol};

/// What a status word or byte is followed by when a reason is empty: the master always gets a
/// reason to record with the job.
pub(super) const NO_REASON: &str = "no reason given";

/// Reads one job: `Ok(None)` at a clean end of input (EOF between jobs).
pub(super) fn read_job(
    protocol: Protocol,
    max_frame: usize,
    input: &mut impl BufRead,
) -> Result<Option<Vec<u8>>, Error> {
    match protocol {
        Protocol::Lines => read_line(max_frame, input),
        Protocol::Frames => read_frame(max_frame, input),
    }
}

/// A line up to (not including) its `\n`. A last line without `\n` is still a job, as
/// `BufRead::lines` has it.
fn read_line(max_frame: usize, input: &mut impl BufRead) -> Result<Option<Vec<u8>>, Error> {
    let mut line = Vec::new();
    loop {
        let buf = match input.fill_buf() {
            Ok(buf) => buf,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::Read(e)),
        };
        if buf.is_empty() {
            return Ok((!line.is_empty()).then_some(line));
        }
        let (take, end) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i, true),
            None => (buf.len(), false),
        };
        if line.len() + take > max_frame {
            return Err(Error::LineTooLong { max: max_frame });
        }
        line.extend_from_slice(&buf[..take]);
        input.consume(take + usize::from(end));
        if end {
            return Ok(Some(line));
        }
    }
}

/// A 4-byte big-endian length, then that many bytes of payload.
fn read_frame(max_frame: usize, input: &mut impl Read) -> Result<Option<Vec<u8>>, Error> {
    let mut header = [0u8; 4];
    match read_full(input, &mut header)? {
        0 => return Ok(None),
        4 => {}
        got => return Err(Error::Truncated { got, want: 4 }),
    }
    let len = u32::from_be_bytes(header) as usize;
    if len > max_frame {
        return Err(Error::FrameTooLarge {
            len,
            max: max_frame,
        });
    }
    let mut payload = vec![0u8; len];
    let got = read_full(input, &mut payload)?;
    if got < len {
        return Err(Error::Truncated {
            got: 4 + got,
            want: 4 + len,
        });
    }
    Ok(Some(payload))
}

/// Fills `buf` unless the input ends first; returns how much it read.
fn read_full(input: &mut impl Read, buf: &mut [u8]) -> Result<usize, Error> {
    let mut got = 0;
    while got < buf.len() {
        match input.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::Read(e)),
        }
    }
    Ok(got)
}

/// Appends the bytes of one answer to `out`.
///
/// An `ok` result that does not fit in `max_frame` becomes a `fail` that says so (the master
/// would reject the answer as a protocol error and redeliver the job forever); a reason that
/// does not fit is cut at a character boundary. In `lines`, each `\n` of a result or reason
/// becomes a space.
pub(super) fn encode_answer(
    protocol: Protocol,
    max_frame: usize,
    answer: &Answer,
    out: &mut Vec<u8>,
) {
    let (status, word, body): (u8, &str, &[u8]) = match answer {
        Answer::Ok(result) => (0, "ok", result),
        Answer::Fail(reason) => (1, "fail", reason_bytes(reason)),
        Answer::Drop(reason) => (2, "drop", reason_bytes(reason)),
    };
    // Room for the body: a frame's length counts its status byte, a line its "word ".
    let room = match protocol {
        Protocol::Frames => max_frame.saturating_sub(1),
        Protocol::Lines => max_frame.saturating_sub(word.len() + 1),
    };
    if body.len() > room {
        if let Answer::Ok(result) = answer {
            let reason = format!(
                "result of {} bytes exceeds max_frame ({max_frame} bytes)",
                result.len()
            );
            return encode_answer(protocol, max_frame, &Answer::Fail(reason), out);
        }
    }
    let body = match answer {
        Answer::Ok(_) => body,
        Answer::Fail(_) | Answer::Drop(_) => cut_at_char(body, room),
    };
    match protocol {
        Protocol::Frames => {
            let len = u32::try_from(1 + body.len()).unwrap_or(u32::MAX);
            out.extend_from_slice(&len.to_be_bytes());
            out.push(status);
            out.extend_from_slice(body);
        }
        Protocol::Lines => {
            out.extend_from_slice(word.as_bytes());
            if !body.is_empty() {
                out.push(b' ');
                out.extend(body.iter().map(|&b| if b == b'\n' { b' ' } else { b }));
            }
            out.push(b'\n');
        }
    }
}

fn reason_bytes(reason: &str) -> &[u8] {
    if reason.is_empty() {
        NO_REASON.as_bytes()
    } else {
        reason.as_bytes()
    }
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
    }

    #[test]
    fn frames_answers_count_their_status_byte() {
        let f = |a| encoded(Protocol::Frames, 1 << 20, a);
        assert_eq!(f(Answer::Ok(vec![])), [0, 0, 0, 1, 0]);
        assert_eq!(f(Answer::Ok(b"a\nb".to_vec())), b"\0\0\0\x04\0a\nb");
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

    #[test]
    fn reading_stops_cleanly_only_between_jobs() {
        let read = |p, bytes: &[u8]| {
            let mut input = bytes;
            let mut jobs = Vec::new();
            loop {
                match read_job(p, 8, &mut input) {
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
        assert!(read(Protocol::Lines, b"123456789\n").is_err());
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
        assert!(read(Protocol::Frames, b"\0\0\0\x09").is_err());
    }
}
