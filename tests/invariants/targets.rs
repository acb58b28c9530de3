//! The fuzz targets' bodies: `fuzz/fuzz_targets/NAME.rs` calls [`NAME`] on each input, and
//! `tests/fuzz_regressions.rs` replays the committed seeds and the inputs that once crashed a
//! target (`fuzz/regressions/NAME/`) through the same functions. Each panics on a broken
//! property.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use plumule::config::QueueProtocol;
use plumule::output::DEFAULT_MAX_LINE;
use plumule::protocol::{parse_message, parse_request_line, Message, Progress};
use plumule::queue::store::{segment_header, segment_name, Options, Store};
use plumule::queue::wire::{
    encode_answer, parse_answer_line, Answer, AnswerDecoder, JobDecoder, Outcome, ProtocolError,
};
use plumule::sys::forkserver;
use plumule::sys::spawn::Body;
use plumule::sys::syncer::{Reply, Tag};
use plumule::worker::{self, Builder, Protocol, DEFAULT_MAX_FRAME};

/// A target's check of one input.
pub type Check = fn(&[u8]);

/// Every target, by name, for the replay of seeds and regressions.
pub const ALL: &[(&str, Check)] = &[
    ("answer_line", answer_line),
    ("config", config),
    ("control_message", control_message),
    ("control_request", control_request),
    ("forkserver_request", forkserver_request),
    ("output_lines", output_lines),
    ("queue_answers", queue_answers),
    ("queue_recovery", queue_recovery),
    ("syncer_reply", syncer_reply),
    ("worker_frames", worker_frames),
];

/// One `lines` answer (`queue::wire::parse_answer_line`): never a panic; an answer is one of
/// the three words then the rest of the line as text; an error names the line on one line;
/// what parses encodes (when the encoder takes it) to a line that parses the same.
pub fn answer_line(line: &[u8]) {
    match parse_answer_line(line) {
        Ok(answer) => {
            let word = answer.outcome.keyword().as_bytes();
            assert!(line.starts_with(word));
            match line.get(word.len()) {
                None => assert!(answer.text.is_empty()),
                Some(b' ') => assert_eq!(answer.text, line[word.len() + 1..]),
                Some(other) => panic!("{word:?} followed by {other}"),
            }
            let mut bytes = Vec::new();
            if encode_answer(
                QueueProtocol::Lines,
                answer.outcome,
                &answer.text,
                u64::MAX,
                &mut bytes,
            )
            .is_ok()
            {
                assert_eq!(
                    parse_answer_line(&bytes[..bytes.len() - 1]),
                    Ok(answer.clone())
                );
                let mut d = AnswerDecoder::new(QueueProtocol::Lines, 1 << 20);
                let mut got = Vec::new();
                d.push(&bytes, |a| got.push(a)).unwrap();
                d.finish().unwrap();
                assert_eq!(got, vec![answer]);
            }
        }
        Err(e) => {
            let text = e.to_string();
            assert!(!text.is_empty() && !text.contains('\n'), "{text:?}");
        }
    }
}

/// Configuration files: parsing never panics, and an error renders one located line per
/// problem (see [`super::check_config`]).
pub fn config(data: &[u8]) {
    let _ = super::check_config(&String::from_utf8_lossy(data));
}

/// Lines from the master, as the client reads them (`protocol::parse_message`): never a
/// panic; a response the client parses is one the master can write back as one line that
/// parses the same. Also `parse_request_line`'s progress flag: a request that parses with it
/// parses the same without the flag.
pub fn control_message(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(message) = parse_message(&text) {
        let line = match &message {
            Message::Response(r) => r.to_line(),
            Message::Progress(p) => Progress {
                progress: p.clone(),
            }
            .to_line(),
        };
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
        let back = std::str::from_utf8(&line[..line.len() - 1]).unwrap();
        assert_eq!(
            parse_message(back).ok(),
            Some(message),
            "written as {back:?}"
        );
    }
    if let Ok((request, _progress)) = parse_request_line(data) {
        let mut value = serde_json::to_value(&request).unwrap();
        value
            .as_object_mut()
            .expect("a request is an object")
            .insert("progress".into(), true.into());
        let line = serde_json::to_vec(&value).unwrap();
        assert_eq!(parse_request_line(&line).ok(), Some((request, true)));
    }
}

/// Control request lines, as the master reads them from `control.sock` (see
/// [`super::check_request`]).
pub fn control_request(data: &[u8]) {
    super::check_request(data);
}

/// The fork server's requests (`sys::forkserver::decode`), as the server reads them from its
/// socket: never a panic, and no allocation the payload cannot back; a payload that decodes
/// is exactly what `encode` makes of the result (the format has one spelling per request),
/// and its `pid_vars` name entries of the environment, in order.
pub fn forkserver_request(data: &[u8]) {
    // Byte 0: how many descriptors past the four the server requires (status, stdio).
    let Some((&extra, payload)) = data.split_first() else {
        return;
    };
    let fds: Vec<i32> = (0..4 + i32::from(extra % 8)).map(|i| 100 + i).collect();
    assert!(
        forkserver::decode(payload, &fds[..3]).is_none(),
        "decoded with 3 descriptors"
    );
    let Some((setup, body)) = forkserver::decode(payload, &fds) else {
        return;
    };
    assert_eq!((setup.stdin, setup.stdout, setup.stderr), (101, 102, 103));
    assert_eq!(setup.pass_fds, fds[4..]);
    let again = forkserver::encode(&setup, &body).expect("an exec body encodes");
    assert_eq!(again, payload, "decoded as {setup:?}, {body:?}");
    let Body::Exec { envp, pid_vars, .. } = &body else {
        panic!("decoded a function body");
    };
    assert!(
        pid_vars.windows(2).all(|w| w[0] < w[1]) && pid_vars.iter().all(|&i| i < envp.len()),
        "pid_vars {pid_vars:?} for {} environment entries",
        envp.len()
    );
}

/// Worker output through `LineSplitter`, in chunks of any size: nothing lost or added, no
/// piece over the maximum.
///
/// Input layout: byte 0 picks `max_line` (1 to 64, or the default 16 KiB), bytes 1 to 4 seed
/// the chunk sizes, the rest is the stream.
pub fn output_lines(data: &[u8]) {
    let (max_line, seed, stream) = match data {
        [m, a, b, c, d, rest @ ..] => (*m, u32::from_le_bytes([*a, *b, *c, *d]), rest),
        _ => return,
    };
    let max_line = match max_line % 65 {
        0 => DEFAULT_MAX_LINE,
        m => usize::from(m),
    };
    // Chunk sizes from 0 to 2 × max_line + 1 (capped).
    let sizes = sizes(seed, (2 * max_line + 2).min(200), stream.len());
    super::check_splitter(stream, max_line, &sizes);
}

/// Worker answers through `queue::wire::AnswerDecoder`, in chunks of any size: never a panic,
/// the same answers and the same error whatever the chunking, memory bounded by the limit, and
/// what it decodes encodes back to bytes that decode the same. The job decoder gets the same
/// bytes and the same chunking check.
///
/// Input layout: byte 0 picks the protocol (bit 0: lines or frames) and `max_frame` (the rest:
/// 1 to 32, or 16 MiB when it is 0 mod 33), bytes 1 to 4 seed the chunk sizes, the rest is the
/// worker's stdout.
pub fn queue_answers(data: &[u8]) {
    let (head, seed, stream) = match data {
        [h, a, b, c, d, rest @ ..] => (*h, u32::from_le_bytes([*a, *b, *c, *d]), rest),
        _ => return,
    };
    let protocol = if head & 1 == 0 {
        QueueProtocol::Lines
    } else {
        QueueProtocol::Frames
    };
    let max = match (head >> 1) % 33 {
        0 => 16 << 20,
        m => u64::from(m),
    };
    // Chunk sizes from 0 to 2 × max + 5 (capped).
    let sizes = sizes(seed, (2 * max as usize + 6).min(200), stream.len());
    let ones = vec![1; stream.len()];

    let whole = answers(protocol, max, stream, &[]);
    assert_eq!(answers(protocol, max, stream, &sizes), whole, "chunked");
    assert_eq!(answers(protocol, max, stream, &ones), whole, "byte by byte");
    if let Err(e) = &whole.1 {
        assert!(!e.to_string().is_empty() && !e.to_string().contains('\n'));
    }
    // Whatever the encoder accepts of what was decoded reads back the same.
    for a in &whole.0 {
        let mut bytes = Vec::new();
        if encode_answer(protocol, a.outcome, &a.text, max, &mut bytes).is_ok() {
            assert_eq!(
                answers(protocol, max, &bytes, &[]),
                (vec![a.clone()], Ok(()))
            );
        }
    }

    let whole = jobs(protocol, max, stream, &[]);
    assert_eq!(jobs(protocol, max, stream, &sizes), whole, "jobs chunked");
    assert_eq!(
        jobs(protocol, max, stream, &ones),
        whole,
        "jobs byte by byte"
    );
}

type Decoded = (Vec<Answer>, Result<(), ProtocolError>);

/// The stream fed in chunks of `sizes` (then the rest), then its end.
fn answers(protocol: QueueProtocol, max: u64, stream: &[u8], sizes: &[usize]) -> Decoded {
    let bound = match protocol {
        QueueProtocol::Lines => max as usize + 1,
        QueueProtocol::Frames => 4 + max as usize,
    };
    let mut d = AnswerDecoder::new(protocol, max);
    let mut got = Vec::new();
    let mut rest = stream;
    for &size in sizes.iter().chain(std::iter::once(&usize::MAX)) {
        let (chunk, tail) = rest.split_at(size.min(rest.len()));
        rest = tail;
        if let Err(e) = d.push(chunk, |a| got.push(a)) {
            // An error is final: repeated, nothing more decoded.
            assert_eq!(
                d.push(b"ok\n\0\0\0\x01\0", |_| panic!("decoded after an error")),
                Err(e.clone())
            );
            assert_eq!(d.finish(), Err(e.clone()));
            return (got, Err(e));
        }
        assert!(
            d.buffered() <= bound,
            "holds {} bytes, bound {bound}",
            d.buffered()
        );
    }
    (got, d.finish())
}

fn jobs(
    protocol: QueueProtocol,
    max: u64,
    stream: &[u8],
    sizes: &[usize],
) -> (Vec<Vec<u8>>, Result<(), ProtocolError>) {
    let mut d = JobDecoder::new(protocol, max);
    let mut got = Vec::new();
    let mut rest = stream;
    for &size in sizes.iter().chain(std::iter::once(&usize::MAX)) {
        let (chunk, tail) = rest.split_at(size.min(rest.len()));
        rest = tail;
        if let Err(e) = d.push(chunk, |j| got.push(j.to_vec())) {
            return (got, Err(e));
        }
    }
    (got, d.finish())
}

/// Arbitrary bytes as a queue segment → `queue::store::Store::open`: no panic; when the store
/// opens, its recovery is complete (a second open finds the same jobs and nothing to warn
/// about, since the first cut any bad tail), its jobs have unique ids in submission order below
/// `next_id`, and a job added then is found after them by a third open.
///
/// Input layout: byte 0 odd puts a valid segment header before the rest (so the records are
/// what gets fuzzed), even writes the rest as it is (so the header is).
pub fn queue_recovery(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut bytes = Vec::new();
    if mode & 1 == 1 {
        bytes.extend_from_slice(&segment_header(1));
    }
    bytes.extend_from_slice(rest);

    // Its own folder per call: the tests call this from several threads at once.
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "plumule-fuzz-queue-{}-{}",
        std::process::id(),
        CALLS.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(segment_name(1)), &bytes).unwrap();
    let opts = Options {
        segment_size: 1 << 16,
    };
    if let Ok((mut store, first)) = Store::open(&dir, opts.clone()) {
        drop(store);
        // The recovered jobs are consistent: ids unique, in submission order, under next_id.
        assert!(
            first.jobs.windows(2).all(|w| w[0].id < w[1].id),
            "ids out of order: {:?}",
            first.jobs.iter().map(|j| j.id).collect::<Vec<_>>()
        );
        assert!(first.jobs.iter().all(|j| j.id < first.next_id), "{first:?}");
        let (mut again, second) =
            Store::open(&dir, opts.clone()).expect("a store that opened opens again");
        assert_eq!(first.jobs, second.jobs);
        assert_eq!(first.next_id, second.next_id);
        assert!(second.warnings.is_empty(), "{:?}", second.warnings);
        let id = second.next_id;
        again.append_submitted(id, 0, None, b"fuzz").unwrap();
        again.sync().unwrap();
        store = again;
        drop(store);
        // What was added after recovery is there on the next open, after the same jobs.
        let (_, third) = Store::open(&dir, opts).expect("opens a third time");
        assert_eq!(third.jobs.len(), second.jobs.len() + 1, "{third:?}");
        assert_eq!(third.jobs[..second.jobs.len()], second.jobs[..]);
        let added = third.jobs.last().unwrap();
        assert_eq!((added.id, &added.payload[..]), (id, &b"fuzz"[..]));
        assert!(third.next_id > id);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The syncer's replies (`sys::syncer::Reply::decode`): never a panic; exactly the 24-byte
/// messages with a known status decode, and what decodes encodes back to the same bytes; a
/// reply made from the input encodes to bytes that decode to it.
pub fn syncer_reply(data: &[u8]) {
    if let Some(reply) = Reply::decode(data) {
        assert_eq!(data.len(), 24);
        assert_eq!(&reply.encode()[..], data, "{reply:?}");
    } else if data.len() == 24 {
        let status = u32::from_le_bytes(data[0..4].try_into().unwrap());
        let errno = u32::from_le_bytes(data[4..8].try_into().unwrap());
        assert!(
            status > 1 || (status == 0 && errno != 0),
            "refused a well-formed reply {data:?}"
        );
    }
    // Any reply the syncer can send reads back as itself.
    if let [a, b @ ..] = data {
        if b.len() >= 20 {
            let tag = Tag(u64::from_le_bytes(b[0..8].try_into().unwrap()));
            let offset = u64::from_le_bytes(b[8..16].try_into().unwrap());
            let errno = i32::from_le_bytes(b[16..20].try_into().unwrap());
            let reply = if a & 1 == 0 {
                Reply::Synced { tag, offset }
            } else {
                Reply::Failed { tag, offset, errno }
            };
            assert_eq!(Reply::decode(&reply.encode()), Some(reply));
        }
    }
}

/// The worker library's side of a queue (`worker::Builder::io`, over `queue::wire::JobReader`):
/// jobs read in reads of any size are the jobs `JobDecoder` finds in the whole stream (plus a
/// last unterminated `lines` job), then at most one error; every job answered gives exactly
/// one answer on the output, in order, that the master's `AnswerDecoder` reads without error.
///
/// Input layout: byte 0 picks the protocol (bit 0), how jobs are answered (bits 1–2) and
/// `max_frame` (the rest: 1 to 32, or the default when it is 0 mod 33), bytes 1 to 4 seed the
/// read sizes, the rest is the worker's stdin.
pub fn worker_frames(data: &[u8]) {
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

    let reads = sizes(seed, 2 * max.min(100) + 6, stream.len());
    let input = Chunked::new(stream, reads);
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
            0 => worker::Answer::Ok(payload),
            1 => worker::Answer::Fail(String::from_utf8_lossy(&payload).into_owned()),
            2 => worker::Answer::Drop(String::new()),
            // Dropped unanswered, it answers `fail "not answered"` (and says so on stderr: only
            // the first job, to keep the run fast).
            _ if i == 0 => {
                drop(job);
                continue;
            }
            _ => worker::Answer::Fail(String::new()),
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
}

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

// Chunking

/// Sizes from 0 to `span - 1` that add up to at least `len` (the last may overshoot).
pub fn sizes(seed: u32, span: usize, len: usize) -> Vec<usize> {
    let span = span.max(1) as u32;
    let mut x = seed | 1;
    let mut sizes = Vec::new();
    let mut covered = 0;
    while covered < len {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let size = (x % span) as usize;
        sizes.push(size);
        covered += size;
    }
    sizes
}

/// A reader that hands out `data` in the given sizes (a size of 0 is skipped: a read of 0
/// bytes means end of stream), then the rest in one read.
pub struct Chunked {
    data: Vec<u8>,
    at: usize,
    sizes: std::vec::IntoIter<usize>,
}

impl Chunked {
    pub fn new(data: &[u8], sizes: Vec<usize>) -> Chunked {
        Chunked {
            data: data.to_vec(),
            at: 0,
            sizes: sizes.into_iter(),
        }
    }
}

impl std::io::Read for Chunked {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let rest = &self.data[self.at..];
        if rest.is_empty() || buf.is_empty() {
            return Ok(0);
        }
        let size = loop {
            match self.sizes.next() {
                Some(0) => continue,
                Some(n) => break n,
                None => break rest.len(),
            }
        };
        let n = size.min(rest.len()).min(buf.len());
        buf[..n].copy_from_slice(&rest[..n]);
        self.at += n;
        Ok(n)
    }
}
