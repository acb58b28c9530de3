//! `plumule::worker`, the library for queue workers written in Rust (SPEC §4, §9 `frames`): run
//! in-process over in-memory buffers and over real pipes, with the test playing the master.
//!
//! Over pipes, every answer the test waits for arrives within a deadline or the test fails
//! saying which answer never came: an answer held back in a buffer shows up as a failure, not a
//! hang.

mod common;

use std::io::{BufRead, BufReader, BufWriter, PipeWriter, Write};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError};
use plumule::worker::{Answer, Builder, Error, Fail, Job, Jobs, Pool, Protocol, DEFAULT_MAX_FRAME};
use serde::{Deserialize, Serialize};

use common::{wait_for, DEADLINE};

// ---------------------------------------------------------------------------------------------
// Harness

/// An output the test can read while the worker still writes to it.
#[derive(Clone, Default)]
struct Output(Arc<Mutex<Vec<u8>>>);

impl Output {
    fn bytes(&self) -> Vec<u8> {
        self.0.lock().unwrap().clone()
    }

    fn text(&self) -> String {
        String::from_utf8(self.bytes()).expect("answers are text")
    }
}

impl Write for Output {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Jobs over in-memory input, answered into an [`Output`].
fn in_memory(protocol: Protocol, input: impl Into<Vec<u8>>) -> (Jobs, Output) {
    let output = Output::default();
    let jobs = Jobs::from_io(std::io::Cursor::new(input.into()), output.clone(), protocol);
    (jobs, output)
}

/// A job as the master writes it in `frames`.
fn frame(payload: &[u8]) -> Vec<u8> {
    let mut bytes = (payload.len() as u32).to_be_bytes().to_vec();
    bytes.extend_from_slice(payload);
    bytes
}

/// Many jobs in `frames`, one after the other.
fn frames<'a>(payloads: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    payloads.into_iter().flat_map(frame).collect()
}

/// `n` jobs `0`, `1`, … in `lines`.
fn numbered_lines(n: usize) -> String {
    (0..n).map(|i| format!("{i}\n")).collect()
}

/// A worker running in a thread of the test, its stdin and stdout real pipes, the test its
/// master: it writes jobs and reads answers one at a time.
struct PipeWorker {
    protocol: Protocol,
    jobs: Option<PipeWriter>,
    answers: Receiver<Vec<u8>>,
    body: Option<JoinHandle<Result<(), Error>>>,
}

impl PipeWorker {
    /// Runs `body` over the pipes; with `buffered`, its output goes through a large `BufWriter`,
    /// so only the library's flushes get answers through.
    fn start(
        protocol: Protocol,
        buffered: bool,
        body: impl FnOnce(Jobs) -> Result<(), Error> + Send + 'static,
    ) -> PipeWorker {
        let (jobs_read, jobs_write) = std::io::pipe().expect("pipe");
        let (answers_read, answers_write) = std::io::pipe().expect("pipe");
        let body = std::thread::spawn(move || {
            let jobs = if buffered {
                let output = BufWriter::with_capacity(1 << 16, answers_write);
                Jobs::from_io(jobs_read, output, protocol)
            } else {
                Jobs::from_io(jobs_read, answers_write, protocol)
            };
            body(jobs)
        });
        let (sender, answers) = crossbeam_channel::unbounded();
        std::thread::spawn(move || {
            let mut input = BufReader::new(answers_read);
            while let Some(answer) = read_answer(protocol, &mut input) {
                if sender.send(answer).is_err() {
                    return;
                }
            }
        });
        PipeWorker {
            protocol,
            jobs: Some(jobs_write),
            answers,
            body: Some(body),
        }
    }

    fn send(&mut self, payload: &[u8]) {
        let jobs = self.jobs.as_mut().expect("stdin still open");
        let bytes = match self.protocol {
            Protocol::Lines => [payload, b"\n"].concat(),
            Protocol::Frames => frame(payload),
        };
        jobs.write_all(&bytes).expect("write a job");
    }

    /// The next answer's bytes, as they came (a line with its `\n`, a frame with its length).
    #[track_caller]
    fn answer(&self, what: &str) -> Vec<u8> {
        match self.answers.recv_timeout(DEADLINE) {
            Ok(answer) => answer,
            Err(RecvTimeoutError::Timeout) => panic!("no answer to {what} within {DEADLINE:?}"),
            Err(RecvTimeoutError::Disconnected) => {
                panic!("stdout closed before the answer to {what}")
            }
        }
    }

    /// Closes the worker's stdin (EOF: the master asks it to finish).
    fn close(&mut self) {
        self.jobs = None;
    }

    /// Every answer left until the worker closes its stdout, then what its body returned.
    #[track_caller]
    fn finish(mut self) -> (Vec<Vec<u8>>, Result<(), Error>) {
        self.close();
        let mut rest = Vec::new();
        loop {
            match self.answers.recv_timeout(DEADLINE) {
                Ok(answer) => rest.push(answer),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => panic!("the worker did not finish after EOF"),
            }
        }
        let result = self
            .body
            .take()
            .unwrap()
            .join()
            .expect("the worker body panicked");
        (rest, result)
    }
}

/// One answer as the master reads it; `None` at EOF.
fn read_answer(protocol: Protocol, input: &mut impl BufRead) -> Option<Vec<u8>> {
    match protocol {
        Protocol::Lines => {
            let mut line = Vec::new();
            input.read_until(b'\n', &mut line).expect("read an answer");
            (!line.is_empty()).then_some(line)
        }
        Protocol::Frames => {
            let mut header = [0u8; 4];
            if input.read_exact(&mut header).is_err() {
                return None;
            }
            let mut body = vec![0u8; u32::from_be_bytes(header) as usize];
            input.read_exact(&mut body).expect("a whole answer frame");
            Some([&header[..], &body].concat())
        }
    }
}

/// A pseudo-random delay of up to 2 ms for job `i`: a stand-in for work of uneven length.
fn uneven_work(i: u64) {
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    x ^= x >> 29;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 32;
    std::thread::sleep(Duration::from_micros(x % 2000)); // the job's work, not a wait
}

// ---------------------------------------------------------------------------------------------
// Both protocols, exact bytes

#[test]
fn lines_answers_are_exact_lines_in_job_order() {
    let (jobs, output) = in_memory(Protocol::Lines, "plain\nresult\nretry\ndead\nmulti\n");
    for job in jobs {
        let job = job.unwrap();
        match job.as_str().unwrap() {
            "plain" => job.ok("").unwrap(),
            "result" => job.ok("42").unwrap(),
            "retry" => job.fail("database down").unwrap(),
            "dead" => job.drop("no such user").unwrap(),
            "multi" => job.ok("two\nlines").unwrap(),
            other => panic!("unexpected job {other:?}"),
        }
    }
    assert_eq!(
        output.text(),
        "ok\nok 42\nfail database down\ndrop no such user\nok two lines\n"
    );
}

#[test]
fn frames_carry_any_bytes_both_ways() {
    let payloads: [&[u8]; 4] = [b"a\nb", b"\0\xff", b"", b"x"];
    let (jobs, output) = in_memory(Protocol::Frames, frames(payloads));
    let mut seen = Vec::new();
    for job in jobs {
        let job = job.unwrap();
        seen.push(job.payload().to_vec());
        match job.seq() {
            0 => {
                let echo = job.payload().to_vec();
                job.ok(echo).unwrap()
            }
            1 => job.ok("").unwrap(),
            2 => job.fail("line\nbreak").unwrap(),
            _ => job.drop("bad").unwrap(),
        }
    }
    assert_eq!(seen, payloads.map(<[u8]>::to_vec));
    let expected: &[u8] = b"\0\0\0\x04\0a\nb\
                            \0\0\0\x01\0\
                            \0\0\0\x0b\x01line\nbreak\
                            \0\0\0\x04\x02bad";
    assert_eq!(output.bytes(), expected);
}

#[test]
fn eof_between_jobs_ends_the_jobs_and_eof_inside_a_frame_is_an_error() {
    let (jobs, output) = in_memory(Protocol::Lines, "a\nlast line without newline");
    let payloads: Vec<String> = jobs
        .map(|job| {
            let job = job.unwrap();
            let text = job.as_str().unwrap().to_string();
            job.ok("").unwrap();
            text
        })
        .collect();
    assert_eq!(payloads, ["a", "last line without newline"]);
    assert_eq!(output.text(), "ok\nok\n");

    let mut input = frame(b"whole");
    input.extend_from_slice(&[0, 0, 0, 9, b'p', b'a']);
    let (mut jobs, output) = in_memory(Protocol::Frames, input);
    jobs.next().unwrap().unwrap().ok("").unwrap();
    let error = jobs.next().unwrap().unwrap_err();
    assert!(
        matches!(error, Error::Truncated { got: 6, want: 13 }),
        "{error}"
    );
    assert!(jobs.next().is_none(), "the jobs end after an error");
    assert_eq!(output.bytes(), [0, 0, 0, 1, 0]);
}

#[test]
fn a_job_over_max_frame_is_an_error() {
    let output = Output::default();
    let input = std::io::Cursor::new(frames([&b"1234"[..], b"12345"]));
    let mut jobs = Builder::new()
        .protocol(Protocol::Frames)
        .max_frame(4)
        .io(input, output.clone())
        .unwrap();
    assert_eq!(jobs.next().unwrap().unwrap().payload(), b"1234");
    let error = jobs.next().unwrap().unwrap_err();
    assert!(
        matches!(error, Error::FrameTooLarge { len: 5, max: 4 }),
        "{error}"
    );
    assert_eq!(
        error.to_string(),
        "a job of 5 bytes exceeds max_frame (4 bytes)"
    );
}

// ---------------------------------------------------------------------------------------------
// Order, and no answer skipped

#[test]
fn answers_given_out_of_order_are_written_in_job_order() {
    let (mut jobs, output) = in_memory(Protocol::Lines, "0\n1\n2\n");
    let mut held: Vec<Job> = jobs.by_ref().map(Result::unwrap).collect();
    assert_eq!(jobs.in_flight(), 3);
    let (second, first) = (held.remove(2), held.remove(1));
    second.ok("2").unwrap();
    assert_eq!(output.text(), "", "job 2's answer waits for jobs 0 and 1");
    held.remove(0).ok("0").unwrap();
    assert_eq!(output.text(), "ok 0\n");
    assert_eq!(jobs.in_flight(), 2);
    first.ok("1").unwrap();
    assert_eq!(output.text(), "ok 0\nok 1\nok 2\n");
    assert_eq!(jobs.in_flight(), 0);
}

#[test]
fn held_counts_every_job_taken_from_the_input_and_not_answered() {
    // The four jobs arrive in one read: the first job handed out leaves three decoded ones
    // waiting in the reader, and all four are held.
    let (mut jobs, output) = in_memory(Protocol::Lines, "0\n1\n2\n3\n");
    assert_eq!((jobs.in_flight(), jobs.held()), (0, 0));
    let first = jobs.next().unwrap().unwrap();
    assert_eq!((jobs.in_flight(), jobs.held()), (1, 4));
    first.ok("").unwrap();
    assert_eq!((jobs.in_flight(), jobs.held()), (0, 3));
    let rest: Vec<Job> = jobs.by_ref().map(Result::unwrap).collect();
    assert_eq!((jobs.in_flight(), jobs.held()), (3, 3));
    for job in rest {
        job.ok("").unwrap();
    }
    assert_eq!((jobs.in_flight(), jobs.held()), (0, 0));
    assert_eq!(output.text(), "ok\nok\nok\nok\n");
}

#[test]
fn a_job_dropped_unanswered_answers_fail_not_answered() {
    let (mut jobs, output) = in_memory(Protocol::Lines, "forgotten\nanswered\n");
    drop(jobs.next().unwrap().unwrap());
    jobs.next().unwrap().unwrap().ok("").unwrap();
    assert_eq!(output.text(), "fail not answered\nok\n");
}

#[test]
fn each_answer_is_flushed_before_the_worker_waits_for_its_next_job() {
    for protocol in [Protocol::Lines, Protocol::Frames] {
        // Prefetch 1: the master sends a job only once the previous one is answered, so an
        // answer left in the worker's BufWriter would stall both sides.
        let mut worker = PipeWorker::start(protocol, true, |jobs| {
            for job in jobs {
                let job = job?;
                let answer = format!("got {}", job.as_str().unwrap());
                job.ok(answer)?;
            }
            Ok(())
        });
        for i in 0..5 {
            worker.send(format!("{i}").as_bytes());
            let answer = worker.answer(&format!("job {i} ({protocol})"));
            let expected = match protocol {
                Protocol::Lines => format!("ok got {i}\n").into_bytes(),
                Protocol::Frames => [&[0, 0, 0, 6, 0][..], format!("got {i}").as_bytes()].concat(),
            };
            assert_eq!(answer, expected);
        }
        let (rest, result) = worker.finish();
        assert!(rest.is_empty(), "{rest:?}");
        result.unwrap();
    }
}

#[test]
fn an_answer_to_a_master_that_is_gone_is_an_error() {
    let (jobs_read, mut jobs_write) = std::io::pipe().unwrap();
    let (answers_read, answers_write) = std::io::pipe().unwrap();
    let mut jobs = Jobs::from_io(jobs_read, answers_write, Protocol::Lines);
    jobs_write.write_all(b"a\nb\n").unwrap();
    drop(answers_read);
    let error = jobs.next().unwrap().unwrap().ok("").unwrap_err();
    assert!(matches!(&error, Error::Write(e) if e.kind() == std::io::ErrorKind::BrokenPipe));
    // Sticky: the next answer cannot be written either, whatever the pipe does now.
    assert!(matches!(
        jobs.next().unwrap().unwrap().ok(""),
        Err(Error::Write(_))
    ));
}

// ---------------------------------------------------------------------------------------------
// Typed payloads

#[derive(Debug, Deserialize)]
struct Resize {
    width: u32,
    height: u32,
}

#[derive(Debug, Serialize)]
struct Area {
    pixels: u64,
}

fn area(job: Resize) -> Result<Area, Fail> {
    match (job.width, job.height) {
        (0, _) | (_, 0) => Err(Fail::drop("empty image")),
        (w, _) if w > 10_000 => Err(Fail::retry("too wide for now")),
        (w, h) => Ok(Area {
            pixels: u64::from(w) * u64::from(h),
        }),
    }
}

#[test]
fn typed_jobs_answer_json_and_a_bad_payload_is_dropped() {
    let input = r#"{"width": 3, "height": 4}
{"width": 3}
not json
{"width": 0, "height": 4}
{"width": 20000, "height": 1}
"#;
    let (jobs, output) = in_memory(Protocol::Lines, input);
    jobs.serve(area).unwrap();
    assert_eq!(
        output.text(),
        "ok {\"pixels\":12}\n\
         drop bad payload: missing field `height` at line 1 column 12\n\
         drop bad payload: expected ident at line 1 column 2\n\
         drop empty image\n\
         fail too wide for now\n"
    );
}

#[test]
fn the_typed_iterator_hands_out_only_payloads_that_parse() {
    let (jobs, output) = in_memory(Protocol::Frames, frames([&b"7"[..], b"seven", b"8"]));
    let mut seen = Vec::new();
    for item in jobs.typed::<i64>() {
        let (n, job) = item.unwrap();
        seen.push(n);
        job.ok_json(&(n * 2)).unwrap();
    }
    assert_eq!(seen, [7, 8]);
    let mut expected = frame(b"\x0014");
    expected.extend(frame(b"\x02bad payload: expected value at line 1 column 1"));
    expected.extend(frame(b"\x0016"));
    assert_eq!(output.bytes(), expected);
}

// ---------------------------------------------------------------------------------------------
// Protocol from the environment, checked in a child process so that no test changes the
// environment of threads that read it

/// Prints what the environment makes of the protocol; with the variables unset (as in a
/// normal test run) the defaults must hold.
#[test]
fn env_probe() {
    let opened = Builder::new().io(std::io::empty(), std::io::sink());
    match &opened {
        Ok(jobs) => println!("<probe>ok {} {}</probe>", jobs.protocol(), jobs.max_frame()),
        Err(e) => println!("<probe>error {e}</probe>"),
    }
    if std::env::var_os(plumule::worker::PROTOCOL_ENV).is_none()
        && std::env::var_os(plumule::worker::MAX_FRAME_ENV).is_none()
    {
        let jobs = opened.unwrap();
        assert_eq!(
            (jobs.protocol(), jobs.max_frame()),
            (Protocol::Lines, DEFAULT_MAX_FRAME)
        );
    }
}

fn probe(env: &[(&str, &str)]) -> String {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command.args(["env_probe", "--exact", "--nocapture", "--test-threads=1"]);
    command
        .env_remove("PLUMULE_QUEUE_PROTOCOL")
        .env_remove("PLUMULE_QUEUE_MAX_FRAME");
    command.envs(env.iter().copied());
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    // libtest writes its own words around the probe's on the same line.
    let start = stdout.find("<probe>").expect("the probe's report") + "<probe>".len();
    let end = stdout[start..]
        .find("</probe>")
        .expect("the end of the probe's report");
    stdout[start..start + end].to_string()
}

#[test]
fn the_protocol_and_frame_limit_come_from_the_environment() {
    assert_eq!(probe(&[]), format!("ok lines {DEFAULT_MAX_FRAME}"));
    assert_eq!(
        probe(&[("PLUMULE_QUEUE_PROTOCOL", "")]),
        format!("ok lines {DEFAULT_MAX_FRAME}")
    );
    assert_eq!(
        probe(&[
            ("PLUMULE_QUEUE_PROTOCOL", "frames"),
            ("PLUMULE_QUEUE_MAX_FRAME", "1024")
        ]),
        "ok frames 1024"
    );
    assert_eq!(
        probe(&[("PLUMULE_QUEUE_PROTOCOL", "json")]),
        "error PLUMULE_QUEUE_PROTOCOL=\"json\" is not valid: expected \"lines\" or \"frames\""
    );
    assert_eq!(
        probe(&[("PLUMULE_QUEUE_MAX_FRAME", "16MiB")]),
        "error PLUMULE_QUEUE_MAX_FRAME=\"16MiB\" is not valid: expected a number of bytes above 0"
    );
}

// ---------------------------------------------------------------------------------------------
// The pool

#[test]
fn the_pool_answers_in_job_order_under_uneven_work() {
    for protocol in [Protocol::Lines, Protocol::Frames] {
        let payloads: Vec<Vec<u8>> = (0..200).map(|i| format!("{i}").into_bytes()).collect();
        let input = match protocol {
            Protocol::Lines => numbered_lines(200).into_bytes(),
            Protocol::Frames => frames(payloads.iter().map(Vec::as_slice)),
        };
        let (jobs, output) = in_memory(protocol, input);
        let pool = Pool::new(4, 3);
        let most = AtomicUsize::new(0);
        let threads_seen = Mutex::new(std::collections::HashSet::new());
        pool.run(jobs, |job| {
            most.fetch_max(pool.in_flight(), Ordering::Relaxed);
            threads_seen
                .lock()
                .unwrap()
                .insert(std::thread::current().id());
            uneven_work(job.seq());
            Answer::ok(job.payload())
        })
        .unwrap();
        let expected: Vec<u8> = payloads
            .iter()
            .flat_map(|p| match protocol {
                Protocol::Lines => [b"ok ", &p[..], b"\n"].concat(),
                Protocol::Frames => frame(&[&[0u8][..], p].concat()),
            })
            .collect();
        assert_eq!(output.bytes(), expected, "{protocol}");
        assert!(most.load(Ordering::Relaxed) <= pool.capacity());
        assert!(
            threads_seen.lock().unwrap().len() > 1,
            "the jobs ran on several threads"
        );
        assert_eq!(pool.in_flight(), 0);
    }
}

#[test]
fn the_pool_holds_no_more_than_threads_plus_backlog() {
    // Every job is available at once, and every handler is held at a gate: the pool must stop
    // reading once it holds threads + backlog jobs.
    let (jobs, output) = in_memory(Protocol::Lines, numbered_lines(50));
    let pool = Pool::new(2, 3);
    let (open_gate, gate) = crossbeam_channel::bounded::<()>(0);
    let started = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        let running = scope.spawn(|| {
            pool.run(jobs, |job| {
                started.fetch_add(1, Ordering::SeqCst);
                let _ = gate.recv(); // returns once the gate is dropped
                Answer::ok(job.payload())
            })
        });
        wait_for("the pool holds 5 jobs", DEADLINE, || pool.in_flight() == 5);
        wait_for("both threads have a job", DEADLINE, || {
            started.load(Ordering::SeqCst) == 2
        });
        // The reader had 45 more jobs at hand; it must have stopped.
        for _ in 0..1000 {
            assert!(pool.in_flight() <= 5, "the pool read past its capacity");
            std::thread::yield_now();
        }
        // All 50 came in one read: the 45 the pool has no room for wait decoded in the reader,
        // taken from the input but not handed out.
        assert_eq!(pool.held(), 50);
        assert_eq!(started.load(Ordering::SeqCst), 2);
        assert_eq!(output.text(), "");
        drop(open_gate);
        running.join().unwrap().unwrap();
    });
    assert_eq!((pool.in_flight(), pool.held()), (0, 0));
    assert_eq!(
        output.text(),
        numbered_lines(50)
            .lines()
            .map(|l| format!("ok {l}\n"))
            .collect::<String>()
    );
}

#[test]
fn no_answer_is_lost_when_the_master_closes_stdin_with_jobs_in_flight() {
    // The master writes its jobs and closes stdin at once; the last job is the slowest.
    let mut worker = PipeWorker::start(Protocol::Frames, true, |jobs| {
        Pool::new(3, 2).run(jobs, |job| {
            if job.seq() == 9 {
                std::thread::sleep(Duration::from_millis(50)); // the slow job, not a sync
            }
            Answer::ok(job.payload())
        })
    });
    for i in 0..10u8 {
        worker.send(&[i]);
    }
    let (answers, result) = worker.finish();
    result.unwrap();
    let expected: Vec<Vec<u8>> = (0..10u8).map(|i| vec![0, 0, 0, 2, 0, i]).collect();
    assert_eq!(answers, expected);
}

#[test]
fn a_panicking_handler_fails_its_job_and_the_pool_goes_on() {
    let (jobs, output) = in_memory(Protocol::Lines, "1\nboom\n3\n");
    Pool::new(2, 1)
        .run(jobs, |job| {
            if job.payload() == b"boom" {
                panic!("test handler panics on purpose");
            }
            Answer::ok(job.payload())
        })
        .unwrap();
    assert_eq!(output.text(), "ok 1\nfail handler panicked\nok 3\n");
}

#[test]
fn the_pool_serves_typed_jobs_and_drops_bad_payloads() {
    let input = "{\"width\": 2, \"height\": 5}\n[]\n{\"width\": 0, \"height\": 1}\n";
    let (jobs, output) = in_memory(Protocol::Lines, input);
    Pool::new(2, 0).serve(jobs, area).unwrap();
    assert_eq!(
        output.text(),
        "ok {\"pixels\":10}\n\
         drop bad payload: invalid length 0, expected struct Resize with 2 elements at line 1 column 2\n\
         drop empty image\n"
    );
}

#[test]
fn the_pool_reports_answers_it_could_not_write() {
    // A master that is gone closed both pipes: the pool sees EOF, and must not call that a
    // clean end when its answers were lost.
    let (jobs_read, mut jobs_write) = std::io::pipe().unwrap();
    let (answers_read, answers_write) = std::io::pipe().unwrap();
    jobs_write.write_all(b"a\nb\n").unwrap();
    drop((jobs_write, answers_read));
    let jobs = Jobs::from_io(jobs_read, answers_write, Protocol::Lines);
    let error = Pool::new(2, 2).run(jobs, |_| Answer::ok("")).unwrap_err();
    assert!(matches!(&error, Error::Write(e) if e.kind() == std::io::ErrorKind::BrokenPipe));
}

// ---------------------------------------------------------------------------------------------
// The examples, run as the master runs them: jobs on a pipe to stdin, answers from stdout

/// The example binary `name`, built with the same profile as this test (cargo builds the
/// examples for a whole `cargo test`, but not for `cargo test --test worker_lib`).
fn example(name: &str) -> std::path::PathBuf {
    // This test runs as target/PROFILE/deps/worker_lib-HASH; examples go to
    // target/PROFILE/examples/.
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).unwrap();
    let mut build = Command::new(std::env::var("CARGO").unwrap_or_else(|_| env!("CARGO").into()));
    build
        .args(["build", "--quiet", "--example", name])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("CARGO_TARGET_DIR", profile_dir.parent().unwrap());
    if profile_dir.file_name() == Some(std::ffi::OsStr::new("release")) {
        build.arg("--release");
    }
    let status = build.status().expect("run cargo build --example");
    assert!(status.success(), "cargo build --example {name}: {status}");
    profile_dir.join("examples").join(name)
}

/// Runs example `name` with `args`, its stdin the bytes `jobs` (then EOF, as when the master
/// stops it), in `protocol`; returns its stdout, after checking it exited 0 within the deadline
/// (it is killed otherwise).
fn run_example(name: &str, args: &[&str], protocol: Protocol, jobs: &[u8]) -> Vec<u8> {
    let mut child = Command::new(example(name))
        .args(args)
        .env(plumule::worker::PROTOCOL_ENV, protocol.to_string())
        .env_remove(plumule::worker::MAX_FRAME_ENV)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start example {name}: {e}"));
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    // Written from a thread: a worker answering while the test still writes must not fill its
    // stdout pipe with nobody reading it.
    let mut stdin = child.stdin.take().unwrap();
    let jobs = jobs.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&jobs));
    let (sender, exited) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        let _ = sender.send(child.wait_with_output());
    });
    let out = match exited.recv_timeout(DEADLINE) {
        Ok(out) => out.expect("wait for the example"),
        Err(_) => {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            panic!("example {name} {args:?} did not exit within {DEADLINE:?} after EOF");
        }
    };
    assert!(out.status.success(), "{name} {args:?}: {}", out.status);
    writer.join().unwrap().expect("write the jobs");
    out.stdout
}

/// The answers `(status, text)` as `protocol` writes them (status 0 ok, 1 fail, 2 drop).
fn answers(protocol: Protocol, texts: &[(u8, &[u8])]) -> Vec<u8> {
    texts
        .iter()
        .flat_map(|&(status, text)| match protocol {
            Protocol::Frames => frame(&[&[status][..], text].concat()),
            Protocol::Lines => {
                let word: &[u8] = [&b"ok"[..], b"fail", b"drop"][status as usize];
                let sep: &[u8] = if text.is_empty() { b"" } else { b" " };
                [word, sep, text, b"\n"].concat()
            }
        })
        .collect()
}

fn jobs_of(protocol: Protocol, payloads: &[&[u8]]) -> Vec<u8> {
    match protocol {
        Protocol::Lines => payloads.iter().flat_map(|p| [*p, b"\n"].concat()).collect(),
        Protocol::Frames => frames(payloads.iter().copied()),
    }
}

#[test]
fn the_echo_example_answers_ok_payload_in_both_protocols() {
    let payloads: &[&[u8]] = &[b"a", b"", b"two words", b"caf\xc3\xa9"];
    for protocol in [Protocol::Lines, Protocol::Frames] {
        let out = run_example("echo_worker", &[], protocol, &jobs_of(protocol, payloads));
        let expected: Vec<(u8, &[u8])> = payloads.iter().map(|p| (0, *p)).collect();
        assert_eq!(out, answers(protocol, &expected), "{protocol}");
    }
    // Frames are binary-safe both ways.
    let binary: &[&[u8]] = &[b"a\nb", b"\0\xff"];
    let out = run_example(
        "echo_worker",
        &[],
        Protocol::Frames,
        &jobs_of(Protocol::Frames, binary),
    );
    assert_eq!(
        out,
        answers(Protocol::Frames, &[(0, binary[0]), (0, binary[1])])
    );
}

#[test]
fn the_square_example_answers_squares_in_both_protocols_with_and_without_threads() {
    let payloads: &[&[u8]] = &[b"3", b" 12 ", b"x", b"9223372036854775807", b"-4"];
    let bad = b"bad payload: expected value at line 1 column 1";
    let expected: &[(u8, &[u8])] = &[
        (0, b"9"),
        (0, b"144"),
        (2, bad),
        (2, b"overflow"),
        (0, b"16"),
    ];
    for protocol in [Protocol::Lines, Protocol::Frames] {
        for args in [&[][..], &["--threads", "3"]] {
            let out = run_example(
                "square_worker",
                args,
                protocol,
                &jobs_of(protocol, payloads),
            );
            assert_eq!(out, answers(protocol, expected), "{protocol} {args:?}");
        }
    }
}
