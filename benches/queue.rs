//! Benchmark of job queues (issue 9): submit-to-answer throughput end to end, and the master's
//! memory while jobs pass, printed as tables beside the goals and beside limits the bench
//! measures itself in the same run.
//!
//! The limits (the baseline part, which needs nothing of plumule):
//! - a two-process pipe ping-pong of a 64-byte message: the bench re-runs itself as a child
//!   (`--echo-child`) that echoes every message from its stdin to its stdout; one message in
//!   flight (what prefetch 1 is bound by), and 64 in flight (each side reads what has arrived
//!   and answers it with one write, the child flushing when its input is drained);
//! - where `python3` is present, `multiprocessing.Pool(2)` on a trivial job (`return x`), one at
//!   a time (`pool.apply` in a loop) and batched (`pool.map`). Without python3 the rows say
//!   "skipped".
//!
//! The end-to-end part runs `plumule run` (this crate's release binary) in a temp dir with a
//! config of one queue `q` and one consumer program, and pipes N jobs (`j0`, `j1`, … one per
//! line, made before the clock starts) into `plumule submit q --wait`, timing from the first job
//! written to the last answer read (and checking every answer, in order, against its expected
//! bytes without allocating: the bench shares the cores with what it measures). It covers a Rust worker
//! (`examples/echo_worker.rs`, answering `ok PAYLOAD` through `plumule::worker`) and a shell
//! one (`while read l; do echo ok; done`), prefetch 1 and 64, 1 and 2 workers, durable and in
//! memory, and reads the master's resident size (VmRSS, and its peak VmHWM) before and after.
//! Rows with prefetch 1 run a tenth of the jobs: they are bound by round trips, and the figure
//! settles long before. The bench builds the Rust worker itself with
//! `$CARGO build --release --example echo_worker` (into the same target dir), unless
//! `QUEUE_BENCH_ECHO_WORKER` names a binary already built.
//!
//! Before any of that it asks the master to take one job: a master that does not serve queues
//! yet (the command refused with "not supported yet" or "not served by this master yet") gets
//! one "skipped: …" line saying so above the table, every end-to-end row says "skipped", and
//! the bench still prints the baseline and exits 0.
//!
//! Each row first passes a tenth of its jobs untimed (a warm-up: buffers and the flow-control
//! backlog reach their working size). The goals are checked on the Rust worker's rows; the
//! memory goal reads "flat" as the master's VmRSS growing by at most 1 MiB over the second
//! half of the measured N jobs (default 1,000,000): a cost per job would show there as much as
//! in the first half.
//!
//! Run: `cargo bench --bench queue`. `QUEUE_BENCH_JOBS=N` sets N (default 1,000,000; the
//! ping-pong makes N/5 round trips one at a time and N with 64 in flight, python N/20 `apply`
//! calls and N/5 `map` items), for quick runs.
//!
//! Every wait has a deadline; on failure the master is SIGKILLed and the row says what went
//! wrong.

mod common;

use common::{echo_worker, machine, table};
use std::fmt::Write as _;
use std::fs;
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Every failure is a sentence for the user: what never happened, or what went wrong.
type Result<T> = std::result::Result<T, String>;

const JOBS_VAR: &str = "QUEUE_BENCH_JOBS";
const DEFAULT_JOBS: usize = 1_000_000;
/// The ping-pong message.
const MSG: usize = 64;
/// Messages in flight in the batched ping-pong, and the big prefetch.
const WINDOW: usize = 64;

/// The goals of issue 9.
const GOAL_IN_MEMORY: f64 = 1_000_000.0;
const GOAL_PREFETCH1_OF_PINGPONG: f64 = 0.5;
const GOAL_DURABLE: f64 = 200_000.0;
/// "Flat": the master's resident size may grow this much while the jobs pass (allocator slack).
const FLAT_KIB: u64 = 1024;

const START_DEADLINE: Duration = Duration::from_secs(10);
const PROBE_DEADLINE: Duration = Duration::from_secs(10);
const STOP_DEADLINE: Duration = Duration::from_secs(10);
/// For a whole run of N jobs: generous, a run that needs it is broken.
const RUN_DEADLINE: Duration = Duration::from_secs(600);

fn main() -> ExitCode {
    if std::env::args().any(|a| a == "--echo-child") {
        return match echo_child() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("echo child: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let jobs = match std::env::var(JOBS_VAR) {
        Err(_) => DEFAULT_JOBS,
        Ok(v) => match v.replace('_', "").parse::<usize>() {
            Ok(n) if n >= 100 => n,
            _ => {
                eprintln!("queue bench: {JOBS_VAR}={v:?}: expected a number of jobs, at least 100");
                return ExitCode::from(2);
            }
        },
    };
    println!(
        "# plumule queue bench, {}\n\n{jobs} jobs ({JOBS_VAR}); plumule: {}{}\n",
        machine(),
        env!("CARGO_BIN_EXE_plumule"),
        source(),
    );

    let base = baseline(jobs);
    println!("## Limits, measured in this run\n\n{}", base.table());
    let e2e = end_to_end(jobs);
    println!("## End to end: submit to answer\n\n{}", e2e.table());
    println!("## Goals (issue 9)\n\n{}", goals(&base, &e2e));
    ExitCode::SUCCESS
}

// ---------------------------------------------------------------------------------------------
// The baseline

/// One figure of the baseline: a rate, or why there is none.
type Figure = Result<f64>;

struct Baseline {
    /// Round trips per second, and how many.
    ping_pong_1: (Figure, usize),
    ping_pong_64: (Figure, usize),
    /// Jobs per second, and how many.
    python_apply: (Figure, usize),
    python_map: (Figure, usize),
}

fn baseline(jobs: usize) -> Baseline {
    let one = jobs / 5;
    let (apply, map) = (jobs / 20, jobs / 5);
    let (python_apply, python_map) = match python_pool(apply, map) {
        Ok((a, m)) => (Ok(a), Ok(m)),
        Err(e) => (Err(e.clone()), Err(e)),
    };
    Baseline {
        ping_pong_1: (ping_pong(1, one), one),
        ping_pong_64: (ping_pong(WINDOW, jobs), jobs),
        python_apply: (python_apply, apply),
        python_map: (python_map, map),
    }
}

impl Baseline {
    fn table(&self) -> String {
        let row = |what: &str, (fig, n): &(Figure, usize), unit: &str| {
            vec![what.to_string(), n.to_string(), rate(fig, unit)]
        };
        table(
            &["limit", "count", "figure"],
            &[
                row(
                    "pipe ping-pong, 64 B, 1 in flight",
                    &self.ping_pong_1,
                    "round trips/s",
                ),
                row(
                    "pipe ping-pong, 64 B, 64 in flight",
                    &self.ping_pong_64,
                    "round trips/s",
                ),
                row(
                    "python3 multiprocessing.Pool(2), apply one at a time",
                    &self.python_apply,
                    "jobs/s",
                ),
                row(
                    "python3 multiprocessing.Pool(2), map",
                    &self.python_map,
                    "jobs/s",
                ),
            ],
        )
    }
}

/// The child of the ping-pong: echoes 64-byte messages until EOF, flushing whenever what has
/// arrived is answered.
fn echo_child() -> io::Result<()> {
    let mut input = BufReader::with_capacity(1 << 16, io::stdin().lock());
    let mut output = BufWriter::with_capacity(1 << 16, io::stdout().lock());
    let mut msg = [0u8; MSG];
    loop {
        match input.read_exact(&mut msg) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return output.flush(),
            Err(e) => return Err(e),
        }
        output.write_all(&msg)?;
        if input.buffer().is_empty() {
            output.flush()?;
        }
    }
}

/// Round trips per second of `rounds` 64-byte messages to the echo child, `window` in flight.
fn ping_pong(window: usize, rounds: usize) -> Figure {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the bench itself: {e}"))?;
    let mut child = Reaped(
        Command::new(exe)
            .arg("--echo-child")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start the echo child: {e}"))?,
    );
    let mut to = child.0.stdin.take().unwrap();
    let mut from = child.0.stdout.take().unwrap();
    let io = |e: io::Error| format!("ping-pong: {e}");
    let msg = [b'x'; MSG];
    let start = Instant::now();
    if window == 1 {
        let mut back = [0u8; MSG];
        for _ in 0..rounds {
            to.write_all(&msg).map_err(io)?;
            from.read_exact(&mut back).map_err(io)?;
        }
    } else {
        let first = window.min(rounds);
        to.write_all(&msg.repeat(first)).map_err(io)?;
        let (mut sent, mut received, mut partial) = (first, 0, 0);
        let mut buf = vec![0u8; 1 << 16];
        while received < rounds {
            let n = from.read(&mut buf).map_err(io)?;
            if n == 0 {
                return Err("the echo child closed its stdout".into());
            }
            partial += n;
            let whole = partial / MSG;
            partial %= MSG;
            received += whole;
            let more = whole.min(rounds - sent);
            if more > 0 {
                to.write_all(&msg.repeat(more)).map_err(io)?;
                sent += more;
            }
        }
    }
    let elapsed = start.elapsed();
    drop(to);
    let status = child.0.wait().map_err(io)?;
    if !status.success() {
        return Err(format!("the echo child ended with {status}"));
    }
    Ok(rounds as f64 / elapsed.as_secs_f64())
}

const PYTHON: &str = r#"
import multiprocessing, sys, time

def job(x):
    return x

if __name__ == "__main__":
    n_apply, n_map = int(sys.argv[1]), int(sys.argv[2])
    with multiprocessing.Pool(2) as pool:
        pool.apply(job, (0,))
        start = time.perf_counter()
        for i in range(n_apply):
            pool.apply(job, (i,))
        applied = time.perf_counter() - start
        start = time.perf_counter()
        pool.map(job, range(n_map))
        mapped = time.perf_counter() - start
    print(n_apply / applied, n_map / mapped)
"#;

/// `multiprocessing.Pool(2)` jobs per second: one at a time, and batched.
fn python_pool(apply: usize, map: usize) -> Result<(f64, f64)> {
    if Command::new("python3")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_err()
    {
        return Err("skipped: python3 is not installed here".into());
    }
    let dir = tempfile::tempdir().map_err(|e| format!("cannot make a temp dir: {e}"))?;
    let script = dir.path().join("pool.py");
    fs::write(&script, PYTHON).map_err(|e| format!("cannot write {}: {e}", script.display()))?;
    let out = Command::new("python3")
        .arg(&script)
        .arg(apply.to_string())
        .arg(map.to_string())
        .output()
        .map_err(|e| format!("cannot run python3: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let figures: Vec<f64> = text
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    match (out.status.success(), figures.as_slice()) {
        (true, &[a, m]) => Ok((a, m)),
        _ => Err(format!(
            "python3 failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

/// A child killed and reaped on drop, so that a failing bench leaves no process behind.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// End to end

#[derive(Clone, Copy, PartialEq, Eq)]
enum Worker {
    Rust,
    Shell,
}

#[derive(Clone, Copy)]
struct Setup {
    worker: Worker,
    prefetch: usize,
    workers: usize,
    durable: bool,
    jobs: usize,
}

impl Setup {
    fn cells(&self) -> Vec<String> {
        vec![
            match self.worker {
                Worker::Rust => "Rust (echo_worker)".into(),
                Worker::Shell => "shell (while read)".into(),
            },
            self.prefetch.to_string(),
            self.workers.to_string(),
            if self.durable { "durable" } else { "in memory" }.into(),
            self.jobs.to_string(),
        ]
    }
}

/// What one run measured.
struct Run {
    rate: f64,
    /// VmRSS before, halfway through and after, VmHWM after, in KiB.
    rss_before: u64,
    rss_mid: u64,
    rss_after: u64,
    rss_peak: u64,
}

struct EndToEnd {
    rows: Vec<(Setup, Result<Run>)>,
    /// Why no row ran, when none did (said once, above the table).
    skipped: Option<String>,
}

fn setups(jobs: usize) -> Vec<Setup> {
    let mut all = Vec::new();
    for durable in [false, true] {
        for worker in [Worker::Rust, Worker::Shell] {
            for prefetch in [1, WINDOW] {
                for workers in [1, 2] {
                    let jobs = if prefetch == 1 { jobs / 10 } else { jobs };
                    all.push(Setup {
                        worker,
                        prefetch,
                        workers,
                        durable,
                        jobs,
                    });
                }
            }
        }
    }
    all
}

fn end_to_end(jobs: usize) -> EndToEnd {
    let setups = setups(jobs);
    let skip = |why: String| EndToEnd {
        rows: setups.iter().map(|s| (*s, Err("skipped".into()))).collect(),
        skipped: Some(why),
    };
    // One job through a shell worker first: does this master serve queues at all?
    let probe = Setup {
        worker: Worker::Shell,
        prefetch: 1,
        workers: 1,
        durable: false,
        jobs: 1,
    };
    match Master::start(&probe, Path::new("/bin/sh")).and_then(|m| m.probe()) {
        Ok(()) => {}
        Err(why) => return skip(why),
    }
    let echo = match echo_worker() {
        Ok(path) => path,
        Err(why) => return skip(why),
    };
    let rows = setups
        .into_iter()
        .map(|s| {
            let run = Master::start(&s, &echo).and_then(|mut m| m.run(&s));
            (s, run)
        })
        .collect();
    EndToEnd {
        rows,
        skipped: None,
    }
}

/// A running master in its own temp dir: SIGKILLed on drop unless stopped.
struct Master {
    dir: tempfile::TempDir,
    config: PathBuf,
    child: Reaped,
}

impl Master {
    fn start(setup: &Setup, echo: &Path) -> Result<Master> {
        let dir = tempfile::tempdir().map_err(|e| format!("cannot make a temp dir: {e}"))?;
        let (runtime, state) = (dir.path().join("run"), dir.path().join("state"));
        let command = match setup.worker {
            Worker::Rust => format!("[{}]", toml_str(&echo.to_string_lossy())),
            Worker::Shell => "[\"/bin/sh\", \"-c\", \"while read l; do echo ok; done\"]".into(),
        };
        let config = format!(
            "[plumule]\n\
             runtime_dir = {runtime}\n\
             state_dir = {state}\n\
             log_level = \"warn\"\n\
             \n\
             [queue.q]\n\
             durable = {durable}\n\
             prefetch = {prefetch}\n\
             max_pending = {max_pending}\n\
             \n\
             [program.w]\n\
             command = {command}\n\
             workers = {workers}\n\
             queue = \"q\"\n",
            runtime = toml_str(&runtime.to_string_lossy()),
            state = toml_str(&state.to_string_lossy()),
            durable = setup.durable,
            prefetch = setup.prefetch,
            max_pending = setup.jobs.max(1_000_000),
            workers = setup.workers,
        );
        let path = dir.path().join("plumule.toml");
        fs::write(&path, config).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        let stderr = fs::File::create(dir.path().join("master.stderr"))
            .map_err(|e| format!("cannot create the master's log: {e}"))?;
        let child = Command::new(env!("CARGO_BIN_EXE_plumule"))
            .arg("run")
            .arg("-c")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("cannot start plumule run: {e}"))?;
        let mut master = Master {
            dir,
            config: path,
            child: Reaped(child),
        };
        let socket = runtime.join("control.sock");
        let give_up = Instant::now() + START_DEADLINE;
        while !socket.exists() {
            if let Ok(Some(status)) = master.child.0.try_wait() {
                return Err(format!("plumule run exited ({status}): {}", master.log()));
            }
            if Instant::now() > give_up {
                return Err(format!("no control socket after {START_DEADLINE:?}"));
            }
            std::thread::sleep(Duration::from_millis(10)); // the bench's poll interval
        }
        Ok(master)
    }

    fn pid(&self) -> i32 {
        self.child.0.id() as i32
    }

    /// The end of the master's stderr, for a failure message.
    fn log(&self) -> String {
        let text = fs::read_to_string(self.dir.path().join("master.stderr")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(3)..].join(" / ")
    }

    fn submit(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_plumule"));
        cmd.arg("-c")
            .arg(&self.config)
            .args(["submit", "q", "--wait"]);
        cmd
    }

    /// One job, as an argument: `Err("skipped: …")` when this master does not serve queues.
    fn probe(self) -> Result<()> {
        let child = self
            .submit()
            .arg("probe")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run plumule submit: {e}"))?;
        let out = wait_output(child, PROBE_DEADLINE)?;
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if out.status.success() {
            return self.stop();
        }
        if stderr.contains("not supported yet") || stderr.contains("not served") {
            return Err(format!(
                "skipped: queues are not served by this master yet ({stderr})"
            ));
        }
        Err(format!("the probe job failed ({}): {stderr}", out.status))
    }

    /// A warm-up of a tenth of the jobs (buffers, allocator arenas and the flow-control
    /// backlog reach their working size), then `setup.jobs` jobs through `submit --wait`,
    /// timed, every answer checked. The master's RSS is read after the warm-up, when half the
    /// jobs have been answered, and at the end: memory is flat when the second half adds
    /// nothing to what the first reached (a cost per job would add as much again).
    fn run(&mut self, setup: &Setup) -> Result<Run> {
        self.pass(setup, (setup.jobs / 10).max(1))?;
        let rss_before = proc_kib(self.pid(), "VmRSS")?;
        let (rate, rss_mid) = self.pass(setup, setup.jobs)?;
        Ok(Run {
            rate,
            rss_before,
            rss_mid,
            rss_after: proc_kib(self.pid(), "VmRSS")?,
            rss_peak: proc_kib(self.pid(), "VmHWM")?,
        })
    }

    /// Streams `n` jobs through `submit --wait`, checking every answer; returns jobs/s and
    /// the master's VmRSS when half the answers had come.
    fn pass(&mut self, setup: &Setup, n: usize) -> Result<(f64, u64)> {
        let pid = self.pid();
        let mut rss_mid = 0;
        let mut child = Reaped(
            self.submit()
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| format!("cannot run plumule submit: {e}"))?,
        );
        let stdin = child.0.stdin.take().unwrap();
        // The input is made before the clock starts, and each answer is checked against the
        // expected bytes without formatting or allocating: the bench's own work shares the
        // cores with what it measures, and should take as little of them as it can.
        let mut input = Vec::with_capacity(n * 9);
        for i in 0..n {
            input.push(b'j');
            push_decimal(&mut input, i);
            input.push(b'\n');
        }
        let start = Instant::now();
        let writer = std::thread::spawn(move || -> io::Result<()> {
            let mut stdin = stdin;
            stdin.write_all(&input)?;
            stdin.flush()
        });
        let mut answers = BufReader::with_capacity(1 << 16, child.0.stdout.take().unwrap());
        let mut line = Vec::new();
        let mut expected = Vec::new();
        for i in 0..n {
            if i == n / 2 {
                rss_mid = proc_kib(pid, "VmRSS")?;
            }
            line.clear();
            let read = answers.read_until(b'\n', &mut line);
            if !matches!(read, Ok(1..)) {
                let mut err = String::new();
                if let Some(mut e) = child.0.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                return Err(format!("answer {i} of {n} never came: {}", err.trim()));
            }
            let answer = line.strip_suffix(b"\n").unwrap_or(&line);
            let expected_ok = match setup.worker {
                Worker::Rust => {
                    expected.clear();
                    expected.extend_from_slice(b"ok j");
                    push_decimal(&mut expected, i);
                    answer == expected.as_slice()
                }
                Worker::Shell => answer.trim_ascii_end() == b"ok",
            };
            if !expected_ok {
                let answer = String::from_utf8_lossy(answer);
                return Err(format!("answer {i} is {answer:?}"));
            }
            if start.elapsed() > RUN_DEADLINE {
                return Err(format!("{i} of {n} answers after {RUN_DEADLINE:?}"));
            }
        }
        let elapsed = start.elapsed();
        writer
            .join()
            .map_err(|_| "the job writer panicked".to_string())?
            .map_err(|e| format!("cannot write the jobs: {e}"))?;
        let status = child.0.wait().map_err(|e| e.to_string())?;
        if !status.success() {
            return Err(format!("plumule submit --wait ended with {status}"));
        }
        Ok((n as f64 / elapsed.as_secs_f64(), rss_mid))
    }

    /// SIGTERM, and the graceful stop within its deadline.
    fn stop(mut self) -> Result<()> {
        let _ = kill(Pid::from_raw(self.pid()), Signal::SIGTERM);
        let give_up = Instant::now() + STOP_DEADLINE;
        loop {
            match self.child.0.try_wait() {
                Ok(Some(_)) => return Ok(()),
                Ok(None) if Instant::now() > give_up => {
                    return Err(format!("the master did not stop within {STOP_DEADLINE:?}"))
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(10)), // poll interval
                Err(e) => return Err(format!("cannot wait for the master: {e}")),
            }
        }
    }
}

/// The child's output, or an error (and the child killed) after `deadline`.
fn wait_output(child: Child, deadline: Duration) -> Result<std::process::Output> {
    let pid = Pid::from_raw(child.id() as i32);
    let (sender, done) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = sender.send(child.wait_with_output());
    });
    match done.recv_timeout(deadline) {
        Ok(out) => out.map_err(|e| format!("cannot wait for plumule submit: {e}")),
        Err(_) => {
            let _ = kill(pid, Signal::SIGKILL);
            Err(format!("plumule submit gave no answer within {deadline:?}"))
        }
    }
}

/// A `kB` field of /proc/PID/status.
fn proc_kib(pid: i32, key: &str) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("cannot read /proc/{pid}/status: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| format!("no {key} in /proc/{pid}/status"))
}

impl EndToEnd {
    fn table(&self) -> String {
        let why = self.skipped.as_ref().map(|why| format!("{why}\n\n"));
        let rows: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|(setup, run)| {
                let mut cells = setup.cells();
                match run {
                    Ok(r) => {
                        cells.push(format!("{:.0}", r.rate));
                        cells.push(format!(
                            "{} → {} (peak {})",
                            mib(r.rss_before),
                            mib(r.rss_after),
                            mib(r.rss_peak)
                        ));
                    }
                    Err(why) => {
                        cells.push(why.clone());
                        cells.push(String::new());
                    }
                }
                cells
            })
            .collect();
        let table = table(
            &[
                "worker",
                "prefetch",
                "workers",
                "queue",
                "jobs",
                "jobs/s",
                "master RSS after warm-up → after",
            ],
            &rows,
        );
        why.unwrap_or_default() + &table
    }

    /// The figures of the rows that match, or the reason of the first that failed.
    fn rates(&self, pick: impl Fn(&Setup) -> bool) -> Vec<(Setup, Result<f64>)> {
        self.rows
            .iter()
            .filter(|(s, _)| pick(s))
            .map(|(s, r)| (*s, r.as_ref().map(|r| r.rate).map_err(Clone::clone)))
            .collect()
    }
}

fn goals(base: &Baseline, e2e: &EndToEnd) -> String {
    let mut rows = Vec::new();
    let short = |s: &Setup| {
        format!(
            "{}, {} worker{}",
            if s.worker == Worker::Rust {
                "Rust"
            } else {
                "shell"
            },
            s.workers,
            if s.workers > 1 { "s" } else { "" }
        )
    };
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" }.to_string();
    let rust = |s: &Setup| s.worker == Worker::Rust;
    for (s, r) in e2e.rates(|s| rust(s) && !s.durable && s.prefetch == WINDOW) {
        rows.push(vec![
            format!("in memory, prefetch 64 ({})", short(&s)),
            format!("≥ {GOAL_IN_MEMORY:.0} jobs/s"),
            rate(&r, "jobs/s"),
            r.map_or_else(|e| e, |v| verdict(v >= GOAL_IN_MEMORY)),
        ]);
    }
    for (s, r) in e2e.rates(|s| rust(s) && !s.durable && s.prefetch == 1) {
        let limit = base
            .ping_pong_1
            .0
            .as_ref()
            .ok()
            .map(|p| p * GOAL_PREFETCH1_OF_PINGPONG);
        rows.push(vec![
            format!("in memory, prefetch 1 ({})", short(&s)),
            match limit {
                Some(l) => format!("≥ 50 % of ping-pong = {l:.0} jobs/s"),
                None => "≥ 50 % of ping-pong (not measured)".into(),
            },
            rate(&r, "jobs/s"),
            match (&r, limit) {
                (Ok(v), Some(l)) => verdict(*v >= l),
                (Err(e), _) => e.clone(),
                (_, None) => "—".into(),
            },
        ]);
    }
    for (s, r) in e2e.rates(|s| rust(s) && s.durable && s.prefetch == WINDOW) {
        rows.push(vec![
            format!("durable, streamed submit ({})", short(&s)),
            format!("≥ {GOAL_DURABLE:.0} jobs/s"),
            rate(&r, "jobs/s"),
            r.map_or_else(|e| e, |v| verdict(v >= GOAL_DURABLE)),
        ]);
    }
    // Memory: the in-memory rows with the most jobs.
    for (s, run) in e2e
        .rows
        .iter()
        .filter(|(s, _)| rust(s) && !s.durable && s.prefetch == WINDOW)
    {
        let (measured, met) = match run {
            Ok(r) => (
                format!(
                    "{:+.1} MiB over the second half of {} jobs ({} → {} → {}, peak {})",
                    (r.rss_after as f64 - r.rss_mid as f64) / 1024.0,
                    s.jobs,
                    mib(r.rss_before),
                    mib(r.rss_mid),
                    mib(r.rss_after),
                    mib(r.rss_peak)
                ),
                verdict(r.rss_after <= r.rss_mid + FLAT_KIB),
            ),
            Err(e) => (String::new(), e.clone()),
        };
        rows.push(vec![
            format!("master memory flat ({})", short(s)),
            format!("grows ≤ {} MiB", FLAT_KIB / 1024),
            measured,
            met,
        ]);
    }
    let mut out = table(&["goal", "limit", "measured", "verdict"], &rows);
    out.push_str(
        "\nThe goals are checked on the Rust worker's rows; the shell rows are for scale (its \
         `read` takes one byte per system call).\n",
    );
    let _ = write!(
        out,
        "\nFor scale (../shared/PEERS.md): Celery with Redis about 1.7 k jobs/s, Dramatiq 13 k, \
         Sidekiq 23 k (published laptop figures, none durable on its own).\n"
    );
    out
}

// ---------------------------------------------------------------------------------------------
// Printing

fn rate(fig: &Figure, unit: &str) -> String {
    match fig {
        Ok(v) => format!("{v:.0} {unit}"),
        Err(why) => why.clone(),
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// Appends `n` in decimal (what `format!("{n}")` writes).
fn push_decimal(out: &mut Vec<u8>, n: usize) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut n = n;
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

fn toml_str(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// " (git COMMIT[-dirty])" when git knows this checkout's commit.
fn source() -> String {
    let dir = env!("CARGO_MANIFEST_DIR");
    let described = Command::new("git")
        .args(["-C", dir, "describe", "--always", "--dirty"])
        .stderr(Stdio::null())
        .output();
    match described {
        Ok(o) if o.status.success() => {
            format!(" (git {})", String::from_utf8_lossy(&o.stdout).trim())
        }
        _ => String::new(),
    }
}
