//! Benchmark of queues kept in Redis (issue 12): jobs per second end to end through one local
//! `redis-server`, with 1 and 2 masters sharing the queue, prefetch 1 and 64, printed as a
//! table beside what `redis-benchmark` measures for XADD on the same server in the same run.
//!
//! The bench starts its own `redis-server` (appendonly on, the setting the README asks for,
//! without automatic rewrites of the file during the run) on a free loopback port in a temp
//! dir, and for each row one or two `plumule run` (this
//! crate's release binary) with a consumer program of 2 workers of `examples/echo_worker.rs`
//! (built with `$CARGO build --release --example echo_worker` unless
//! `QUEUE_BENCH_ECHO_WORKER` names it) and the queue `rN` in that Redis (a fresh stream per
//! row). It pipes N jobs into `plumule submit rN --wait` on the first master and times from
//! the first job written to the last answer read (the input made before, the answers checked
//! after, each `ok jI`, in order). A tenth
//! of N passes first, untimed. Rows with prefetch 1 run a tenth of the jobs (bound by round
//! trips).
//!
//! Run: `cargo bench --bench redis`; `REDIS_BENCH_JOBS=N` sets N (default 200,000). Without
//! redis-server or redis-benchmark the rows say "skipped" and the bench exits 0.

mod common;

use common::{echo_worker, machine, table};
use std::io::{self, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

type Result<T> = std::result::Result<T, String>;

const JOBS_VAR: &str = "REDIS_BENCH_JOBS";
const DEFAULT_JOBS: usize = 200_000;
const GOAL_TWO_MASTERS_64: f64 = 100_000.0;
const DEADLINE: Duration = Duration::from_secs(10);
const RUN_DEADLINE: Duration = Duration::from_secs(300);

/// A child process killed and reaped on drop.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() -> ExitCode {
    let jobs = match std::env::var(JOBS_VAR) {
        Err(_) => DEFAULT_JOBS,
        Ok(v) => match v.replace('_', "").parse::<usize>() {
            Ok(n) if n >= 100 => n,
            _ => {
                eprintln!("redis bench: {JOBS_VAR}={v:?}: expected a number of jobs, at least 100");
                return ExitCode::from(2);
            }
        },
    };
    println!(
        "# plumule Redis queue bench, {}\n\n{jobs} jobs ({JOBS_VAR}); plumule: {}\n",
        machine(),
        env!("CARGO_BIN_EXE_plumule"),
    );
    let redis = match Redis::start() {
        Ok(r) => r,
        Err(e) => {
            println!("skipped: {e}");
            return ExitCode::SUCCESS;
        }
    };
    let mut rows = Vec::new();
    for pipeline in [1, 64] {
        let fig = redis.benchmark_xadd(jobs, pipeline);
        rows.push(vec![
            format!("redis-benchmark XADD, 50 clients, pipeline {pipeline}"),
            jobs.to_string(),
            rate(&fig, "entries/s"),
        ]);
    }
    println!(
        "## Redis alone, measured in this run\n\n{}",
        table(&["what", "count", "figure"], &rows)
    );
    let echo = echo_worker();
    let mut rows = Vec::new();
    let mut goal = None;
    let mut row_no = 0;
    for masters in [1, 2] {
        for prefetch in [1, 64] {
            row_no += 1;
            let n = if prefetch == 1 { jobs / 10 } else { jobs };
            let fig = echo
                .clone()
                .and_then(|echo| run_row(&redis, &echo, row_no, masters, prefetch, n));
            if masters == 2 && prefetch == 64 {
                goal = Some(fig.clone());
            }
            rows.push(vec![
                masters.to_string(),
                prefetch.to_string(),
                n.to_string(),
                rate(&fig, "jobs/s"),
            ]);
        }
    }
    println!(
        "## End to end: submit --wait to answer, 2 Rust echo workers per master\n\n{}",
        table(&["masters", "prefetch", "jobs", "figure"], &rows)
    );
    let verdict = match goal {
        Some(Ok(v)) if v >= GOAL_TWO_MASTERS_64 => format!("met ({v:.0} jobs/s)"),
        Some(Ok(v)) => format!("NOT met ({v:.0} jobs/s)"),
        Some(Err(e)) => format!("not measured: {e}"),
        None => "not measured".into(),
    };
    println!(
        "## Goal (issue 12)\n\n2 masters, prefetch 64: at least {GOAL_TWO_MASTERS_64:.0} jobs/s: \
         {verdict}"
    );
    ExitCode::SUCCESS
}

struct Redis {
    /// Where its append-only file goes (removed with it).
    _dir: tempfile::TempDir,
    port: u16,
    _child: Reaped,
}

impl Redis {
    fn start() -> Result<Redis> {
        let dir = tempfile::tempdir().map_err(|e| format!("cannot make a temp dir: {e}"))?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("cannot find a free port: {e}"))?
            .port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(dir.path())
            .args(["--save", "", "--appendonly", "yes"])
            // No automatic rewrite of the append-only file: one started by the growth of an
            // earlier row (a fork copying the data set) would land in the middle of a short
            // row and weigh on it alone.
            .args(["--auto-aof-rewrite-percentage", "0"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("redis-server is not installed here ({e})"))?;
        let r = Redis {
            _dir: dir,
            port,
            _child: Reaped(child),
        };
        let give_up = Instant::now() + DEADLINE;
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > give_up {
                return Err("redis-server did not listen within 10 s".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(r)
    }

    /// `redis-benchmark -q -n N -P P XADD …`: entries per second.
    fn benchmark_xadd(&self, n: usize, pipeline: usize) -> Result<f64> {
        let out = Command::new("redis-benchmark")
            .args(["-p", &self.port.to_string(), "-q", "-n", &n.to_string()])
            .args(["-P", &pipeline.to_string()])
            .args(["XADD", "bench:xadd", "*", "p", "j0000001"])
            .output()
            .map_err(|e| format!("skipped: redis-benchmark is not installed here ({e})"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        // "XADD bench:xadd * p j0000001: 123456.79 requests per second, p50=…"
        text.split(':')
            .filter_map(|part| part.split_whitespace().next()?.parse::<f64>().ok())
            .next_back()
            .ok_or_else(|| format!("cannot read redis-benchmark's output: {}", text.trim()))
    }
}

struct Master {
    _dir: tempfile::TempDir,
    config: PathBuf,
    _child: Reaped,
}

impl Master {
    fn start(redis: &Redis, echo: &Path, queue: &str, node: &str, prefetch: u32) -> Result<Master> {
        let dir = tempfile::tempdir().map_err(|e| format!("cannot make a temp dir: {e}"))?;
        let text = format!(
            "[plumule]\nruntime_dir = {}\nstate_dir = {}\nnode = \"{node}\"\nlog_level = \"warn\"\n\n\
             [program.echo]\ncommand = [{}]\nworkers = 2\nqueue = \"{queue}\"\n\n\
             [queue.{queue}]\nbackend = \"redis://127.0.0.1:{}/0\"\nprefetch = {prefetch}\n\
             max_pending = 10000000\n",
            toml_str(&dir.path().join("run").to_string_lossy()),
            toml_str(&dir.path().join("state").to_string_lossy()),
            toml_str(&echo.to_string_lossy()),
            redis.port,
        );
        let config = dir.path().join("plumule.toml");
        std::fs::write(&config, text).map_err(|e| e.to_string())?;
        let child = Command::new(env!("CARGO_BIN_EXE_plumule"))
            .arg("run")
            .arg("-c")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start plumule: {e}"))?;
        let m = Master {
            _dir: dir,
            config,
            _child: Reaped(child),
        };
        let give_up = Instant::now() + DEADLINE;
        loop {
            let ok = Command::new(env!("CARGO_BIN_EXE_plumule"))
                .args(["queue", queue, "-c"])
                .arg(&m.config)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return Ok(m);
            }
            if Instant::now() > give_up {
                return Err("the master did not answer within 10 s".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Streams `n` jobs through `submit --wait`; jobs per second. The input is made before
    /// the clock starts and the answers are checked after it stops (the time is the last
    /// answer's: `submit` exits right after it), so that the bench's own work takes little of
    /// the two cores it measures.
    fn pass(&self, queue: &str, n: usize) -> Result<f64> {
        let mut input = Vec::with_capacity(n * 8);
        for i in 0..n {
            let _ = writeln!(input, "j{i}");
        }
        let mut child = Reaped(
            Command::new(env!("CARGO_BIN_EXE_plumule"))
                .args(["submit", queue, "--wait", "-c"])
                .arg(&self.config)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("cannot run plumule submit: {e}"))?,
        );
        let mut stdin = child.0.stdin.take().expect("piped");
        let mut stdout = child.0.stdout.take().expect("piped");
        let start = Instant::now();
        let writer = std::thread::spawn(move || stdin.write_all(&input));
        let mut answers = Vec::with_capacity(n * 12);
        let read = io::Read::read_to_end(&mut stdout, &mut answers);
        let elapsed = start.elapsed();
        read.map_err(|e| format!("cannot read the answers: {e}"))?;
        let _ = writer.join();
        if elapsed > RUN_DEADLINE {
            return Err(format!("{n} answers took {elapsed:?}"));
        }
        let mut lines = answers.split(|&b| b == b'\n');
        for i in 0..n {
            let line = lines.next().unwrap_or_default();
            if line != format!("ok j{i}").as_bytes() {
                return Err(format!(
                    "answer {i} of {n} is {:?}",
                    String::from_utf8_lossy(line)
                ));
            }
        }
        Ok(n as f64 / elapsed.as_secs_f64())
    }
}

fn run_row(
    redis: &Redis,
    echo: &Path,
    row: usize,
    masters: usize,
    prefetch: u32,
    n: usize,
) -> Result<f64> {
    let queue = format!("r{row}");
    let list: Vec<Master> = (0..masters)
        .map(|i| Master::start(redis, echo, &queue, &format!("bench-{i}"), prefetch))
        .collect::<Result<_>>()?;
    list[0].pass(&queue, (n / 10).max(10))?;
    list[0].pass(&queue, n)
}

fn rate(fig: &Result<f64>, unit: &str) -> String {
    match fig {
        Ok(v) => format!("{v:.0} {unit}"),
        Err(why) => why.clone(),
    }
}

fn toml_str(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}
