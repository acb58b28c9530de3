//! Batching, cutting lines and printing, against a fake master that records every request.

use super::*;
use crate::protocol::{DeadLetter, JobResult, QueueCounts, Submitted};

/// A master that stores whatever it is sent, or refuses the batches numbered in `refuse`
/// (from 0); it records the requests and the most awaited at once.
#[derive(Default)]
struct Fake {
    requests: Vec<Request>,
    lines: Vec<usize>,
    answers: VecDeque<Response>,
    refuse: Vec<usize>,
    batches: usize,
    next_id: u64,
    most_awaited: usize,
    results: Vec<JobResult>,
}

impl Peer for Fake {
    fn send(&mut self, req: &Request) -> Result<(), ClientError> {
        self.lines.push(req.to_line(true).unwrap().len());
        self.requests.push(req.clone());
        let answer = match req {
            Request::Submit { queue, jobs, .. } => {
                let n = self.batches;
                self.batches += 1;
                if self.refuse.contains(&n) {
                    Response::error("queue q is full (max_pending 10)")
                } else {
                    let first_id = self.next_id;
                    self.next_id += jobs.len() as u64;
                    Response::ok(Submitted {
                        queue: queue.clone(),
                        first_id,
                        count: jobs.len() as u64,
                        results: Vec::new(),
                    })
                }
            }
            Request::Results => {
                // Streamed in two lines, as the master may: the first `results` of the
                // pattern, then the rest of the jobs submitted (the pattern repeated).
                let total = self.next_id as usize;
                let all: Vec<JobResult> =
                    self.results.iter().cycle().take(total).cloned().collect();
                let (a, b) = all.split_at(self.results.len().min(total));
                self.answers.push_back(Response::ok(JobResults {
                    results: a.to_vec(),
                }));
                Response::ok(JobResults {
                    results: b.to_vec(),
                })
            }
            _ => Response::error("unexpected"),
        };
        self.answers.push_back(answer);
        self.most_awaited = self.most_awaited.max(self.answers.len());
        Ok(())
    }

    fn read_response(&mut self) -> Result<Option<Response>, ClientError> {
        Ok(self.answers.pop_front())
    }
}

impl Fake {
    /// The jobs of every submit request, decoded, with the request's `base64`.
    fn batches(&self) -> Vec<(bool, Vec<Vec<u8>>)> {
        self.requests
            .iter()
            .filter_map(|r| match r {
                Request::Submit { jobs, base64, .. } => Some((
                    *base64,
                    jobs.iter()
                        .map(|j| bytes_of(j, *base64).into_owned())
                        .collect(),
                )),
                _ => None,
            })
            .collect()
    }
}

fn lines(input: &[u8]) -> Vec<Result<Piece, SubmitError>> {
    LineJobs::new(input, None, MAX_REQUEST).collect()
}

fn jobs_of(input: &[u8]) -> Vec<Vec<u8>> {
    lines(input)
        .into_iter()
        .map(|p| match p.unwrap() {
            Piece::Job(_, job) => job,
            Piece::Pause => panic!("no pause from a slice"),
        })
        .collect()
}

#[test]
fn a_line_is_a_job_without_its_newline_and_a_last_line_counts() {
    let table: [(&[u8], &[&[u8]]); 7] = [
        (b"", &[]),
        (b"a\n", &[b"a"]),
        (b"a\nb", &[b"a", b"b"]),
        (b"a\n\nb\n", &[b"a", b"", b"b"]),
        (b"\n", &[b""]),
        // A `\r` is the job's own byte: plumule does not guess line endings.
        (b"a\r\nb\r\n", &[b"a\r", b"b\r"]),
        (b"\xff\x00x\n", &[b"\xff\x00x"]),
    ];
    for (input, expected) in table {
        assert_eq!(jobs_of(input), expected, "{input:?}");
    }
    let origins: Vec<Origin> = lines(b"a\nb\nc")
        .into_iter()
        .map(|p| match p.unwrap() {
            Piece::Job(o, _) => o,
            Piece::Pause => unreachable!(),
        })
        .collect();
    assert_eq!(origins, [Origin::Line(1), Origin::Line(2), Origin::Line(3)]);
}

/// Lines longer than a small read buffer are put together; past `max`, reading stops with
/// the line's number after `max + 1` bytes (so a line of gigabytes costs no memory).
#[test]
fn long_lines_are_joined_and_too_long_ones_stop_the_stream() {
    let long = vec![b'x'; 200_000];
    let mut input = long.clone();
    input.extend_from_slice(b"\nshort\n");
    let got: Vec<Vec<u8>> = LineJobs::new(&input[..], None, 300_000)
        .map(|p| match p.unwrap() {
            Piece::Job(_, j) => j,
            Piece::Pause => unreachable!(),
        })
        .collect();
    assert_eq!(got, [long.clone(), b"short".to_vec()]);

    let mut input = b"ok\n".to_vec();
    input.extend_from_slice(&long);
    input.extend_from_slice(b"\nnever read\n");
    let mut it = LineJobs::new(&input[..], None, 1000);
    assert!(matches!(
        it.next(),
        Some(Ok(Piece::Job(Origin::Line(1), _)))
    ));
    let err = it.next().unwrap().unwrap_err();
    assert!(
        matches!(&err, SubmitError::TooLarge { origin: Origin::Line(2), size, .. } if size == "more than 1000"),
        "{err}"
    );
    assert!(it.next().is_none(), "nothing after the error");
}

/// A pipe with nothing ready yields a pause (the batch goes out), then blocks for more.
#[test]
fn an_idle_pipe_pauses_once_then_reads_on() {
    use std::os::fd::AsRawFd;
    let (read, mut write) = std::io::pipe().unwrap();
    let fd = read.as_raw_fd();
    write.write_all(b"one\n").unwrap();
    let mut it = LineJobs::new(read, Some(fd), MAX_REQUEST);
    assert_eq!(
        it.next().unwrap().unwrap(),
        Piece::Job(Origin::Line(1), b"one".to_vec())
    );
    assert_eq!(it.next().unwrap().unwrap(), Piece::Pause);
    write.write_all(b"two").unwrap();
    drop(write);
    assert_eq!(
        it.next().unwrap().unwrap(),
        Piece::Job(Origin::Line(2), b"two".to_vec())
    );
    assert!(it.next().is_none());
}

fn numbered(n: usize) -> impl Iterator<Item = Result<Piece, SubmitError>> {
    (1..=n).map(|i| {
        Ok(Piece::Job(
            Origin::Line(i as u64),
            format!("job {i}").into_bytes(),
        ))
    })
}

#[test]
fn batches_hold_at_most_1000_jobs_and_keep_the_order() {
    let mut fake = Fake::default();
    let (stored, results) =
        submit(&mut fake, "q", None, false, numbered(2500), &mut |_| Ok(())).unwrap();
    assert_eq!((stored, results), (2500, None));
    let batches = fake.batches();
    let sizes: Vec<usize> = batches.iter().map(|(_, j)| j.len()).collect();
    assert_eq!(sizes, [1000, 1000, 500]);
    let all: Vec<Vec<u8>> = batches.into_iter().flat_map(|(_, j)| j).collect();
    let expected: Vec<Vec<u8>> = (1..=2500)
        .map(|i| format!("job {i}").into_bytes())
        .collect();
    assert_eq!(all, expected);
    assert!(fake.most_awaited <= IN_FLIGHT, "{}", fake.most_awaited);
    assert!(fake.most_awaited == IN_FLIGHT, "pipelined");
}

#[test]
fn batches_hold_about_32_kib_and_one_large_job_goes_alone() {
    let mut fake = Fake::default();
    let jobs = [
        vec![b'a'; 10_000],
        vec![b'b'; 10_000],
        vec![b'c'; 10_000],
        vec![b'd'; 10_000],
        // Larger than a batch, small enough for a request line.
        vec![b'e'; 50_000],
        vec![b'f'; 10],
    ];
    let pieces = jobs
        .iter()
        .enumerate()
        .map(|(i, j)| Ok(Piece::Job(Origin::Line(i as u64 + 1), j.clone())));
    submit(&mut fake, "q", Some("k".into()), false, pieces, &mut |_| {
        Ok(())
    })
    .unwrap();
    let sizes: Vec<usize> = fake.batches().iter().map(|(_, j)| j.len()).collect();
    assert_eq!(sizes, [3, 1, 1, 1]);
    for line in &fake.lines {
        assert!(*line <= MAX_REQUEST, "{line}");
    }
    assert!(fake
        .requests
        .iter()
        .all(|r| matches!(r, Request::Submit { key: Some(k), .. } if k == "k")));
}

/// Text travels as text; a batch turns base64 at its first job that is not UTF-8, and
/// every job comes back byte for byte.
#[test]
fn jobs_that_are_not_utf8_go_in_base64() {
    let mut fake = Fake::default();
    let input = b"plain\n\xff\xfe raw\nafter\nnewline\\n and \"quotes\" \xc3\xa9\n";
    let pieces = LineJobs::new(&input[..], None, MAX_REQUEST);
    submit(&mut fake, "q", None, false, pieces, &mut |_| Ok(())).unwrap();
    let batches = fake.batches();
    assert_eq!(batches.len(), 1);
    assert!(batches[0].0, "base64");
    assert_eq!(batches[0].1, jobs_of(input));

    let mut fake = Fake::default();
    let text = b"caf\xc3\xa9\nplain\n";
    submit(
        &mut fake,
        "q",
        None,
        false,
        LineJobs::new(&text[..], None, 100),
        &mut |_| Ok(()),
    )
    .unwrap();
    assert_eq!(
        fake.batches(),
        [(false, vec![b"caf\xc3\xa9".to_vec(), b"plain".to_vec()])]
    );
}

#[test]
fn a_job_too_large_for_a_request_names_its_line_after_the_rest_is_stored() {
    let mut fake = Fake::default();
    let mut pieces: Vec<Result<Piece, SubmitError>> = numbered(5).collect();
    pieces.push(Ok(Piece::Job(
        Origin::Line(6),
        vec![b'x'; MAX_REQUEST - 10],
    )));
    pieces.extend(numbered(3));
    let err = submit(&mut fake, "q", None, false, pieces.into_iter(), &mut |_| {
        Ok(())
    })
    .unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with(&format!(
            "line 6 of stdin is too large for one submit request: {} bytes",
            MAX_REQUEST - 10
        )),
        "{text}"
    );
    assert!(text.ends_with("5 job(s) before it were stored"), "{text}");
    assert_eq!(fake.batches().len(), 1, "nothing after it was sent");

    // Fits raw, not once escaped: the message says both sizes.
    let mut fake = Fake::default();
    let controls = vec![1u8; 20_000];
    let err = submit(
        &mut fake,
        "q",
        None,
        false,
        [Ok(Piece::Job(Origin::Arg(1), controls))].into_iter(),
        &mut |_| Ok(()),
    )
    .unwrap_err()
    .to_string();
    assert!(err.starts_with("payload 1 is too large"), "{err}");
    assert!(err.contains("20000 bytes, 120002 once encoded"), "{err}");

    let mut fake = Fake::default();
    let err = submit(
        &mut fake,
        "q",
        Some("k".repeat(MAX_REQUEST)),
        false,
        numbered(1),
        &mut |_| Ok(()),
    );
    assert!(matches!(err, Err(SubmitError::KeyTooLong)));
}

/// SPEC §9: a refused batch stops the stream; the message says how many were stored before
/// it, and what the pipeline had sent behind it.
#[test]
fn a_refused_batch_stops_and_says_what_was_stored() {
    let mut fake = Fake {
        refuse: vec![2],
        ..Fake::default()
    };
    let err = submit(&mut fake, "q", None, false, numbered(5000), &mut |_| Ok(())).unwrap_err();
    assert_eq!(
        err.to_string(),
        "q: the batch of 1000 job(s) from line 2001 of stdin to line 3000 of stdin was \
         refused: queue q is full (max_pending 10); 2000 job(s) were stored before it; sent \
         behind it before the refusal came back, and stored: 1000 from line 3001 of stdin to \
         line 4000 of stdin"
    );
    assert_eq!(
        fake.batches().len(),
        4,
        "no batch after the refusal was read"
    );

    let mut fake = Fake {
        refuse: vec![0],
        ..Fake::default()
    };
    let err = submit(&mut fake, "q", None, false, numbered(10), &mut |_| Ok(())).unwrap_err();
    assert_eq!(
        err.to_string(),
        "q: the batch of 10 job(s) from line 1 of stdin to line 10 of stdin was refused: \
         queue q is full (max_pending 10); 0 job(s) were stored before it"
    );
}

#[test]
fn a_pause_sends_the_batch_so_far() {
    let mut fake = Fake::default();
    let mut pieces: Vec<Result<Piece, SubmitError>> = numbered(3).collect();
    pieces.push(Ok(Piece::Pause));
    pieces.push(Ok(Piece::Pause));
    pieces.push(Ok(Piece::Job(Origin::Line(4), b"4".to_vec())));
    submit(&mut fake, "q", None, false, pieces.into_iter(), &mut |_| {
        Ok(())
    })
    .unwrap();
    let sizes: Vec<usize> = fake.batches().iter().map(|(_, j)| j.len()).collect();
    assert_eq!(sizes, [3, 1]);
}

#[test]
fn wait_marks_every_batch_then_asks_for_the_results() {
    let result = |id, outcome, text: &str, base64| JobResult {
        queue: "q".into(),
        id,
        outcome,
        text: text.into(),
        base64,
    };
    let mut fake = Fake {
        results: vec![
            result(0, JobOutcome::Ok, "done", false),
            result(1, JobOutcome::Ok, "", false),
            result(2, JobOutcome::Dead, "boom: exit 3", false),
            result(3, JobOutcome::Ok, "/w==", true),
        ],
        ..Fake::default()
    };
    let mut out = Vec::new();
    let mut dead = 0;
    let (stored, results) = submit(&mut fake, "q", None, true, numbered(1500), &mut |chunk| {
        dead += write_results(&mut out, chunk)?;
        Ok(())
    })
    .unwrap();
    assert_eq!(results, Some(1500));
    assert_eq!(stored, 1500);
    assert!(fake
        .requests
        .iter()
        .take(2)
        .all(|r| matches!(r, Request::Submit { wait: true, .. })));
    assert_eq!(fake.requests.last(), Some(&Request::Results));
    assert_eq!(dead, 375, "one in four of the pattern is dead");
    assert!(out.starts_with(b"ok done\nok\ndead boom: exit 3\nok \xff\nok done\n"));
    assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 1500);
}

#[test]
fn queue_tables() {
    let report = QueueReport {
        queues: vec![
            QueueCounts {
                name: "thumbnails".into(),
                pending: 12,
                in_flight: 2,
                done: 1000,
                retried: 3,
                dead: 1,
            },
            QueueCounts {
                name: "q".into(),
                pending: 0,
                in_flight: 0,
                done: 0,
                retried: 0,
                dead: 0,
            },
        ],
    };
    assert_eq!(
        format_queues(&report),
        "QUEUE       PENDING  IN FLIGHT  DONE  RETRIED  DEAD\n\
         thumbnails  12       2          1000  3        1\n\
         q           0        0          0     0        0\n"
    );
    let dead = DeadLetters {
        queue: "q".into(),
        dead: vec![
            DeadLetter {
                id: 7,
                attempts: 3,
                reason: "fail: no such file\n\x1b[31m".into(),
                reason_base64: false,
                payload: "a.png\tb".into(),
                key: None,
                base64: false,
            },
            DeadLetter {
                id: 12,
                attempts: 1,
                reason: "ZHJvcDogYmFk/w==".into(),
                reason_base64: true,
                payload: "/wA=".into(),
                key: Some("k".into()),
                base64: true,
            },
        ],
    };
    assert_eq!(
        format_dead(&dead),
        "ID  ATTEMPTS  REASON                          PAYLOAD\n\
         7   3         fail: no such file\\n\\u{1b}[31m  a.png\\tb\n\
         12  1         drop: bad\\xff                   \\xff\\u{0}\n\
         q: 2 dead letter(s)\n"
    );
}
