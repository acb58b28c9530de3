//! Randomized robustness, deterministic so that CI runs it with `cargo test` on a stable
//! toolchain (the coverage-guided fuzz targets in `fuzz/` need cargo-fuzz; see its README).
//!
//! Valid inputs are mutated (byte flips, insertions, deletions, truncations, duplicated or
//! swapped lines, spliced tokens) by a seeded xorshift, thousands of cases per parser, and each
//! result goes through the same checks as the fuzz targets (`invariants`): control request
//! lines, configuration files, worker output streams. Then one end-to-end case: a real master
//! takes a few hundred mutated lines on its control socket and its worker is untouched.
//!
//! A failure prints the seed and case number; `ROBUSTNESS_SEED=N` replays with another seed.

mod common;
mod invariants;

use std::fs;
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use plumule::protocol::{Answer, Request, Response, MAX_REQUEST};

use common::*;
use nix::sys::signal::Signal::{SIGCONT, SIGSTOP};
use plumule::protocol::StatusReport;

// ---------------------------------------------------------------------------------------------
// Deterministic randomness and mutations

/// xorshift64*: small, seeded, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n` (`n` > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// The base seed: fixed, unless `ROBUSTNESS_SEED` says otherwise.
fn base_seed() -> u64 {
    std::env::var("ROBUSTNESS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_0f91_u64)
}

/// Bytes that mean something to one of the parsers.
const SPECIAL: &[u8] = b"\0\n\r\t \"'\\{}[]=.,:#-+_0189eE\x7f\xc3\xa9\xff";

/// Fragments worth splicing in: syntax, keys and values of either format, odd numbers and
/// escapes.
const TOKENS: &[&str] = &[
    "\"",
    "'''",
    "\"\"\"",
    "{",
    "}",
    "[",
    "]",
    "[[",
    "]]",
    "=",
    ",",
    ":",
    ".",
    "#",
    "\\u0000",
    "\\ud800",
    "\\n",
    "\r\n",
    "null",
    "true",
    "-1",
    "0",
    "1e400",
    "4294967296",
    "18446744073709551616",
    "-9223372036854775809",
    "nan",
    "inf",
    "1979-05-27T07:32:00Z",
    "\"cmd\"",
    "\"status\"",
    "\"stop\"",
    "\"scale\"",
    "\"logs\"",
    "\"target\"",
    "\"program\"",
    "\"workers\"",
    "\"lines\"",
    "\"follow\"",
    "[program.x]",
    "[plumule]",
    "[queue.q]",
    "command",
    "workers",
    "backoff",
    "start_limit",
    "locks",
    "listen",
    "after",
    "env",
    "user",
    "group",
    "stdout",
    "umask",
    "stop_signal",
    "\"10s\"",
    "\"0s\"",
    "\"99999999999h\"",
    "\"10MiB\"",
    "\"SIGKILL\"",
    "\"0777\"",
    "\"tcp:[::1]:0\"",
    "\"unix:\"",
    "\"{worker}\"",
    "\"root\"",
    "\"nosuchuser\"",
    "é",
    "\u{feff}",
    "\u{202e}",
];

/// Applies one to four random mutations to `input`.
fn mutate(rng: &mut Rng, input: &[u8]) -> Vec<u8> {
    let mut data = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        mutate_once(rng, &mut data);
    }
    data
}

fn mutate_once(rng: &mut Rng, data: &mut Vec<u8>) {
    let len = data.len();
    match rng.below(9) {
        // Flip one bit.
        0 if len > 0 => {
            let i = rng.below(len);
            data[i] ^= 1 << rng.below(8);
        }
        // Overwrite a byte with a meaningful one.
        1 if len > 0 => {
            let i = rng.below(len);
            data[i] = *rng.pick(SPECIAL);
        }
        // Insert a byte, random or meaningful.
        2 => {
            let i = rng.below(len + 1);
            let b = if rng.below(2) == 0 {
                rng.next() as u8
            } else {
                *rng.pick(SPECIAL)
            };
            data.insert(i, b);
        }
        // Delete a range.
        3 if len > 0 => {
            let i = rng.below(len);
            let n = 1 + rng.below((len - i).min(16));
            data.drain(i..i + n);
        }
        // Truncate.
        4 => data.truncate(rng.below(len + 1)),
        // Splice a token in.
        5 => {
            let i = rng.below(len + 1);
            let token = rng.pick(TOKENS).as_bytes();
            data.splice(i..i, token.iter().copied());
        }
        // Duplicate a line.
        6 => {
            let mut lines = split_lines(data);
            if !lines.is_empty() {
                let i = rng.below(lines.len());
                let j = rng.below(lines.len() + 1);
                let line = lines[i].clone();
                lines.insert(j, line);
                *data = lines.concat();
            }
        }
        // Swap two lines.
        7 => {
            let mut lines = split_lines(data);
            if lines.len() > 1 {
                let (i, j) = (rng.below(lines.len()), rng.below(lines.len()));
                lines.swap(i, j);
                *data = lines.concat();
            }
        }
        // Copy a range over another place (repeats structure: tables, keys, quotes).
        _ if len > 0 => {
            let i = rng.below(len);
            let n = 1 + rng.below((len - i).min(32));
            let piece = data[i..i + n].to_vec();
            let at = rng.below(len + 1);
            data.splice(at..at, piece);
        }
        _ => data.push(rng.next() as u8),
    }
}

/// Lines with their `\n` (the last one may have none).
fn split_lines(data: &[u8]) -> Vec<Vec<u8>> {
    data.split_inclusive(|&b| b == b'\n')
        .map(<[u8]>::to_vec)
        .collect()
}

/// Runs `check` on `cases` mutations of the seeds, reporting the case that failed.
fn fuzz_cases(name: &str, seeds: &[Vec<u8>], cases: usize, mut check: impl FnMut(&[u8])) {
    let seed = base_seed()
        ^ name
            .bytes()
            .fold(0u64, |h, b| h.rotate_left(5) ^ u64::from(b));
    let mut rng = Rng::new(seed);
    for case in 0..cases {
        let base = rng.pick(seeds);
        // Now and then, mutate a mutation: deeper changes while staying close to valid.
        let mut input = mutate(&mut rng, base);
        if rng.below(4) == 0 {
            input = mutate(&mut rng, &input);
        }
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&input)));
        if let Err(panic) = outcome {
            eprintln!(
                "{name}: case {case} (ROBUSTNESS_SEED={}) failed on input {:?}",
                base_seed(),
                String::from_utf8_lossy(&input)
            );
            std::panic::resume_unwind(panic);
        }
    }
}

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// The hand-written seeds of a fuzz target (`fuzz/corpus/TARGET/seed-*`).
fn fuzz_seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = repo_file(&format!("fuzz/corpus/{target}"));
    let mut seeds: Vec<(PathBuf, Vec<u8>)> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("seed-"))
        })
        .map(|p| {
            let bytes = fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p, bytes)
        })
        .collect();
    seeds.sort();
    assert!(!seeds.is_empty(), "no seeds in {}", dir.display());
    seeds.into_iter().map(|(_, b)| b).collect()
}

// ---------------------------------------------------------------------------------------------
// Control requests

fn request_seeds() -> Vec<Vec<u8>> {
    fuzz_seeds("control_request")
        .into_iter()
        .map(|mut line| {
            // The master hands the parser a line without its newline.
            if line.last() == Some(&b'\n') {
                line.pop();
            }
            line
        })
        .collect()
}

#[test]
fn mutated_control_requests_parse_or_fail_cleanly() {
    let seeds = request_seeds();
    for seed in &seeds {
        assert!(
            invariants::check_request(seed).is_some(),
            "a seed does not parse: {:?}",
            String::from_utf8_lossy(seed)
        );
    }
    let mut parsed = 0;
    fuzz_cases("control_request", &seeds, 20_000, |line| {
        parsed += usize::from(invariants::check_request(line).is_some());
    });
    // The mutations stay close enough to valid requests to exercise the success path too.
    assert!(parsed > 500, "only {parsed} mutated requests parsed");
}

// ---------------------------------------------------------------------------------------------
// Configuration files

/// Problems that fuzzing found, minimized; each must now pass the checks.
const CONFIG_FINDINGS: &[&str] = &[
    // toml refused it with an empty message: the error line was a bare location.
    "#\0",
];

#[test]
fn config_fuzz_findings_stay_fixed() {
    for text in CONFIG_FINDINGS {
        let error = invariants::check_config(text).expect_err(text);
        assert!(!error.to_string().ends_with(": "), "{error}");
    }
}

#[test]
fn mutated_configs_parse_or_fail_with_located_problems() {
    let mut seeds = fuzz_seeds("config");
    seeds.push(fs::read(repo_file("config.example.toml")).expect("config.example.toml"));
    let mut valid = 0;
    fuzz_cases("config", &seeds, 2_000, |bytes| {
        let text = String::from_utf8_lossy(bytes);
        valid += usize::from(invariants::check_config(&text).is_ok());
    });
    assert!(valid > 100, "only {valid} mutated configs were valid");
}

// ---------------------------------------------------------------------------------------------
// Worker output

#[test]
fn mutated_output_streams_split_into_every_byte_and_bounded_pieces() {
    let seeds: Vec<Vec<u8>> = fuzz_seeds("output_lines")
        .into_iter()
        // The fuzz seeds begin with 5 bytes of parameters (see fuzz_targets/output_lines.rs).
        .map(|s| s[5.min(s.len())..].to_vec())
        .chain([
            b"plain\nlines\n".to_vec(),
            b"\r\n\r\n\n\r\r\n".to_vec(),
            vec![b'x'; 100],
            b"no newline at all".to_vec(),
        ])
        .collect();
    let mut rng = Rng::new(base_seed() ^ 0x0ff7);
    fuzz_cases("output_lines", &seeds, 5_000, |stream| {
        let max_line = match rng.below(8) {
            0 => plumule::output::DEFAULT_MAX_LINE,
            _ => 1 + rng.below(24),
        };
        let mut sizes = Vec::new();
        let mut covered = 0;
        while covered < stream.len() {
            let size = rng.below(2 * max_line.min(40) + 2);
            sizes.push(size);
            covered += size;
        }
        invariants::check_splitter(stream, max_line, &sizes);
    });
}

// ---------------------------------------------------------------------------------------------
// End to end: a real master's control socket

/// The pid of `program.0` when it is running, from a `status` request on the socket; `None`
/// while the master cannot be reached or the worker is not running yet.
fn running_pid(socket: &Path, program: &str) -> Option<i32> {
    let stream = UnixStream::connect(socket).ok()?;
    stream.set_read_timeout(Some(DEADLINE)).ok()?;
    (&stream).write_all(b"{\"cmd\":\"status\"}\n").ok()?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line).ok()?;
    let Ok(Response::Ok(Answer::Status(report))) = serde_json::from_str(&line) else {
        return None;
    };
    let worker = report
        .programs
        .iter()
        .find(|p| p.name == program)?
        .workers
        .first()?;
    (worker.state == "running").then_some(worker.pid).flatten()
}

/// Mutated request lines, with the ones that would act on the worker left out (a mutation of
/// `stop` can stay a valid `stop`), and no newline inside a line.
fn garbage_lines(count: usize) -> Vec<Vec<u8>> {
    let seeds = request_seeds();
    let mut rng = Rng::new(base_seed() ^ 0xe2e);
    let mut lines = Vec::new();
    while lines.len() < count {
        let mut line = if rng.below(10) == 0 {
            (0..rng.below(64)).map(|_| rng.next() as u8).collect()
        } else {
            let seed = rng.pick(&seeds).clone();
            mutate(&mut rng, &seed)
        };
        line.retain(|&b| b != b'\n');
        let harmless = match plumule::protocol::parse_request(&line) {
            Err(_) => true,
            Ok(Request::Status { .. }) => true,
            Ok(Request::Logs { follow, .. }) => !follow,
            Ok(_) => false,
        };
        if harmless {
            lines.push(line);
        }
    }
    lines
}

#[test]
fn a_master_fed_mutated_requests_keeps_serving_and_its_worker() {
    let sb = Sandbox::new();
    let config = sb.config("[program.sleeper]\ncommand = [\"/bin/sleep\", \"1000\"]\n");
    let mut master = sb.start(&config);
    let socket = sb.runtime_dir().join("control.sock");
    let mut pid = None;
    sb.wait("sleeper.0 is running", DEADLINE, || {
        pid = running_pid(&socket, "sleeper");
        pid.is_some()
    });
    let pid = pid.unwrap();

    let lines = garbage_lines(400);
    for (n, batch) in lines.chunks(50).enumerate() {
        let stream = UnixStream::connect(&socket).expect("connect to the control socket");
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        stream.set_write_timeout(Some(DEADLINE)).unwrap();
        // All at once, as a pipelining client (or a flood) would send them.
        let bytes: Vec<u8> = batch
            .iter()
            .flat_map(|l| l.iter().chain(b"\n"))
            .copied()
            .collect();
        (&stream).write_all(&bytes).expect("write the batch");
        // One answer per line that is not blank, in order.
        let expected: Vec<&Vec<u8>> = batch
            .iter()
            .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
            .collect();
        let mut reader = BufReader::new(&stream);
        for (i, line) in expected.iter().enumerate() {
            let mut answer = String::new();
            match reader.read_line(&mut answer) {
                Ok(0) => panic!(
                    "connection {n}: closed after {i} of {} answers",
                    expected.len()
                ),
                Ok(_) => {}
                Err(e) => panic!(
                    "connection {n}: no answer {i} of {} to {:?} within {DEADLINE:?}: {e}",
                    expected.len(),
                    String::from_utf8_lossy(line)
                ),
            }
            let answer: serde_json::Value = serde_json::from_str(&answer)
                .unwrap_or_else(|e| panic!("connection {n}: answer {answer:?} is not JSON: {e}"));
            let parses = plumule::protocol::parse_request(line).is_ok();
            assert!(answer["ok"].is_boolean(), "{answer}");
            if !parses {
                assert_eq!(
                    answer["ok"],
                    false,
                    "{:?} got {answer}",
                    String::from_utf8_lossy(line)
                );
                assert!(
                    answer["error"].as_str().is_some_and(|e| !e.is_empty()),
                    "{answer}"
                );
            }
        }
    }

    // A line over the limit, then a connection dropped mid-line without reading anything.
    let stream = UnixStream::connect(&socket).expect("connect");
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    stream.set_write_timeout(Some(DEADLINE)).unwrap();
    let _ = (&stream).write_all(&vec![b'['; MAX_REQUEST + 100]);
    let mut answer = String::new();
    match BufReader::new(&stream).read_line(&mut answer) {
        Ok(_) => assert!(answer.contains("longer than"), "{answer:?}"),
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Err(e) => panic!("no answer to an over-long line: {e}"),
    }
    drop(stream);
    let stream = UnixStream::connect(&socket).expect("connect");
    let _ = (&stream).write_all(br#"{"cmd":"status","program":"#);
    drop(stream);

    let (code, report) = sb.status(&config);
    assert_eq!(code, 0, "{report:?}");
    let worker = &report.programs[0].workers[0];
    assert_eq!(worker.state, "running", "{report:?}");
    assert_eq!(worker.pid, Some(pid), "the worker was replaced: {report:?}");
    assert!(pid_alive(pid));
    assert!(master.running(), "{}", master.stderr_text());
    let status = master.stop_with(SIGTERM, DEADLINE);
    assert_exit_code(status, 0, &master.stderr_text());
}

// ---------------------------------------------------------------------------------------------
// Nothing a worker or a reader does stalls the master (issue 14)

/// A program whose worker exits at once, restarted every 20 ms: its start count is the
/// master's pulse.
fn crash_loop(sb: &Sandbox) -> String {
    let script = sb.worker("crash.sh", "exit 1");
    format!(
        "[program.crash]\ncommand = {}\nbackoff = {{ initial = \"20ms\", max = \"20ms\" }}\n\n",
        argv(&script)
    )
}

/// The master keeps supervising: `crash` starts `more` more times, and the control socket
/// answers `status`, within the deadline. Returns that answer.
#[track_caller]
fn still_supervising(sb: &Sandbox, more: usize, when: &str) -> StatusReport {
    let before = sb.starts_of("crash").len();
    sb.wait(
        &format!("{when}: crash restarts {more} more times"),
        DEADLINE,
        || sb.starts_of("crash").len() >= before + more,
    );
    let mut report = None;
    sb.wait(&format!("{when}: status answers"), DEADLINE, || {
        report = try_status(sb);
        report.is_some()
    });
    report.unwrap()
}

/// A pipe whose read end the test keeps (and reads only when it chooses).
fn test_pipe() -> (fs::File, std::os::fd::OwnedFd) {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
    (fs::File::from(r), w)
}

/// Whether `pid` is blocked writing to a full pipe (the kernel's wait channel).
fn blocked_on_pipe(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/wchan")).is_ok_and(|w| w.contains("pipe_write"))
}

#[test]
fn a_stalled_reader_of_the_masters_stderr_does_not_stall_supervision() {
    let sb = Sandbox::new();
    // 30 000 lines of ~150 bytes once forwarded: more than the pipe and the log's 1 MiB buffer.
    let flood = sb.worker(
        "flood.sh",
        &format!(
            "yes 'flooding the log with a line of some length, again and again and again' \
             | head -n 30000\ntouch {}\nexec sleep 1000",
            sh_str(&sb.path("flood-done"))
        ),
    );
    let config = sb.config(&format!(
        "{}[program.flood]\ncommand = {}\n",
        crash_loop(&sb),
        argv(&flood)
    ));
    let (mut reader, writer) = test_pipe();
    let _master = sb.spawn_master_via(
        PLUMULE,
        &["run", "-c", &config.display().to_string()],
        "plumule run (stderr to a pipe nobody reads)",
        |cmd| {
            cmd.stderr(std::process::Stdio::from(writer));
        },
    );
    sb.wait("the flood has been written", DEADLINE, || {
        sb.path("flood-done").exists()
    });
    let report = still_supervising(&sb, 5, "with nobody reading the master's stderr");
    assert!(
        worker(&report, "flood", 0).is_some_and(|w| w.state == "running"),
        "{report:?}"
    );

    // The reader resumes: what was kept arrives, then the marker of the gap.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = seen.clone();
    std::thread::spawn(move || {
        let mut chunk = vec![0u8; 1 << 16];
        while let Ok(n) = std::io::Read::read(&mut reader, &mut chunk) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    });
    let text = || String::from_utf8_lossy(&seen.lock().unwrap()).into_owned();
    sb.wait("the marker of the dropped lines arrives", DEADLINE, || {
        text()
            .lines()
            .any(|l| l.contains(" lines dropped: stderr was not read fast enough"))
    });
    // Whole lines only: each one timestamp, at its start (a line cut short would run into
    // the next one's).
    let text = text();
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    for l in complete.lines() {
        let stamped = l.len() > 4 && l.as_bytes()[..4].iter().all(u8::is_ascii_digit);
        assert!(
            stamped && l.matches("Z ").count() == 1,
            "a torn line: {l:?}"
        );
    }
    still_supervising(&sb, 2, "once the reader is back");
}

#[test]
fn a_flooding_stopped_or_silent_worker_and_a_stalled_follower_do_not_slow_the_master() {
    let sb = Sandbox::new();
    let flood = sb.worker(
        "flood.sh",
        "exec yes 'a worker that writes as fast as it can, without end, on its stdout'",
    );
    // Closes its stdout and stderr at once, and lives on.
    let silent = sb.worker("silent.sh", "exec >&- 2>&-\nexec sleep 1000");
    let config = sb.config(&format!(
        "{}[program.flood]\ncommand = {}\n\n[program.silent]\ncommand = {}\n",
        crash_loop(&sb),
        argv(&flood),
        argv(&silent)
    ));
    // The flood is forwarded to the master's stderr: /dev/null here, not a file that grows.
    let _master = sb.spawn_master_via(
        PLUMULE,
        &["run", "-c", &config.display().to_string()],
        "plumule run (stderr to /dev/null)",
        |cmd| {
            cmd.stderr(std::process::Stdio::null());
        },
    );
    let flood_pid = wait_running(&sb, "flood", 1)[&0];
    let silent_pid = wait_running(&sb, "silent", 1)[&0];
    still_supervising(&sb, 3, "beside a flooding worker");

    // A `logs -f` of the flood whose reader never reads.
    let (_unread, writer) = test_pipe();
    let follower = sb.spawn_plumule_with(
        &["logs", "-f", "flood", "-c", &config.display().to_string()],
        |cmd| {
            cmd.stdout(std::process::Stdio::from(writer));
        },
    );
    sb.wait("the follower is stuck on its full stdout", DEADLINE, || {
        blocked_on_pipe(follower.pid())
    });
    still_supervising(&sb, 3, "with a stalled `logs -f`");

    // The flooding worker stopped, then continued.
    send(flood_pid, SIGSTOP);
    still_supervising(&sb, 3, "with the flooding worker stopped");
    send(flood_pid, SIGCONT);
    let report = still_supervising(&sb, 3, "with the flooding worker continued");
    for (program, pid) in [("flood", flood_pid), ("silent", silent_pid)] {
        let w = worker(&report, program, 0).expect("listed");
        assert_eq!(
            (w.state.as_str(), w.pid),
            ("running", Some(pid)),
            "{program} is untouched: {report:?}"
        );
    }
    assert!(
        proc_stat(flood_pid).is_some_and(|p| p.state != 'T'),
        "the flood runs again"
    );
}
