//! Benchmark of the control socket (issue 3), with 200 workers of a tiny C program:
//!
//! - `status` round trip over the raw socket, on one connection and on a new connection per
//!   call (what the `plumule status` client does);
//! - reload of a config in which one program of several changed its command: time from
//!   sending the request until the first new worker exec'd, and until the reply (plan applied,
//!   the changed program rolled); every unchanged worker's pid is checked untouched.
//!
//! Run: `cargo bench --bench control [-- --programs P --per-program W --calls N --reloads R
//! --plumule PATH]`.
//!
//! Each worker logs `PROGRAM ID PID VERSION MONOTONIC_NS` first thing after exec, so the time to
//! the first new worker is read from the worker's own clock reading, not from when the bench
//! notices the line. Every wait has a deadline; on any failure the master and every worker are
//! SIGKILLed and the message says what never happened.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::time::{clock_gettime, ClockId};
use nix::unistd::Pid;
use plumule::protocol::{Answer, ReloadResult, Response, StatusReport};

type Result<T> = std::result::Result<T, String>;

const USAGE: &str = "usage: cargo bench --bench control [-- --programs P --per-program W \
                     --calls N --reloads R --plumule PATH]";

const START_DEADLINE: Duration = Duration::from_secs(30);
const REPLY_DEADLINE: Duration = Duration::from_secs(30);
const STOP_DEADLINE: Duration = Duration::from_secs(30);
/// How often a bounded wait re-reads what it waits for (the measurements never depend on it).
const POLL: Duration = Duration::from_millis(1);

const STATUS_GOAL_MS: f64 = 5.0;
const FIRST_WORKER_GOAL_MS: f64 = 10.0;

/// The worker: logs one line with its CLOCK_MONOTONIC reading, in one `write` on an O_APPEND
/// descriptor (lines from hundreds of workers never interleave), then waits for a signal.
const WORKER_C: &str = r#"
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	if (argc != 3)
		return 2;
	const char *program = getenv("PLUMULE_PROGRAM");
	const char *id = getenv("PLUMULE_WORKER_ID");
	char line[256];
	int len = snprintf(line, sizeof line, "%s %s %ld %s %lld\n", program ? program : "?",
			   id ? id : "?", (long)getpid(), argv[2],
			   (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec);
	if (len <= 0 || (size_t)len >= sizeof line)
		return 2;
	int fd = open(argv[1], O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
	if (fd < 0 || write(fd, line, (size_t)len) != len)
		return 1;
	close(fd);
	for (;;)
		pause();
}
"#;

fn main() -> ExitCode {
    let opts = match Options::parse(std::env::args().skip(1)) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("control bench: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&opts) {
        Ok(report) => {
            print!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("control bench FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

struct Options {
    programs: usize,
    per_program: usize,
    calls: usize,
    reloads: usize,
    plumule: PathBuf,
}

impl Options {
    fn parse(mut args: impl Iterator<Item = String>) -> Result<Options> {
        let mut o = Options {
            programs: 10,
            per_program: 20,
            calls: 200,
            reloads: 5,
            plumule: PathBuf::from(env!("CARGO_BIN_EXE_plumule")),
        };
        while let Some(arg) = args.next() {
            let mut value = || args.next().ok_or(format!("{arg} needs a value"));
            match arg.as_str() {
                "--bench" => {} // cargo passes it to every bench binary
                "--programs" => o.programs = number(&arg, &value()?)?,
                "--per-program" => o.per_program = number(&arg, &value()?)?,
                "--calls" => o.calls = number(&arg, &value()?)?,
                "--reloads" => o.reloads = number(&arg, &value()?)?,
                "--plumule" => o.plumule = PathBuf::from(value()?),
                other => return Err(format!("unknown argument `{other}`")),
            }
        }
        if o.programs < 2 || o.per_program == 0 || o.calls == 0 || o.reloads == 0 {
            return Err("need at least 2 programs, 1 worker each, 1 call and 1 reload".into());
        }
        Ok(o)
    }
}

fn number(flag: &str, s: &str) -> Result<usize> {
    s.parse()
        .map_err(|_| format!("{flag} wants a whole number, not `{s}`"))
}

fn monotonic_ns() -> i64 {
    let t = clock_gettime(ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC");
    t.tv_sec() * 1_000_000_000 + t.tv_nsec()
}

/// Polls `cond` until it gives a value; fails naming `what` after `deadline`.
fn wait_until<T>(
    what: &str,
    deadline: Duration,
    mut cond: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let give_up = Instant::now() + deadline;
    loop {
        if let Some(v) = cond()? {
            return Ok(v);
        }
        if Instant::now() >= give_up {
            return Err(format!("timed out after {deadline:?} waiting until {what}"));
        }
        std::thread::sleep(POLL); // poll interval of a bounded wait, not synchronisation
    }
}

// ---------------------------------------------------------------------------------------------
// The setup: a temp dir, the worker, the config, the master

/// One log line of the worker.
#[derive(Debug, Clone)]
struct Start {
    program: String,
    id: u32,
    pid: i32,
    version: String,
    ns: i64,
}

struct Bench {
    dir: tempfile::TempDir,
    worker: PathBuf,
    log: PathBuf,
    config: PathBuf,
    master: Option<Child>,
}

impl Bench {
    fn new(plumule: &Path) -> Result<Bench> {
        let dir = tempfile::Builder::new()
            .prefix("plumule-control-bench.")
            .tempdir()
            .map_err(|e| format!("cannot make a temp dir: {e}"))?;
        let source = dir.path().join("worker.c");
        let worker = dir.path().join("worker");
        fs::write(&source, WORKER_C).map_err(|e| format!("cannot write worker.c: {e}"))?;
        let cc = Command::new("cc")
            .args(["-O2", "-o"])
            .arg(&worker)
            .arg(&source)
            .output()
            .map_err(|e| format!("cannot run cc to build the tiny worker: {e}"))?;
        if !cc.status.success() {
            return Err(format!(
                "cc failed to build the tiny worker:\n{}",
                String::from_utf8_lossy(&cc.stderr)
            ));
        }
        if !plumule.exists() {
            return Err(format!("no plumule binary at {}", plumule.display()));
        }
        Ok(Bench {
            log: dir.path().join("starts"),
            config: dir.path().join("plumule.toml"),
            dir,
            worker,
            master: None,
        })
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("run/control.sock")
    }

    /// Writes the config: programs p0…, `per_program` workers each; `changed` runs `version`.
    fn write_config(&self, o: &Options, changed: usize, version: &str) -> Result<()> {
        let q = |p: &Path| format!("{:?}", p.display().to_string());
        let mut text = format!(
            "[plumule]\nruntime_dir = {}\nstate_dir = {}\n\n",
            q(&self.dir.path().join("run")),
            q(&self.dir.path().join("state")),
        );
        for p in 0..o.programs {
            let v = if p == changed { version } else { "v1" };
            let _ = write!(
                text,
                "[program.p{p}]\ncommand = [{}, {}, \"{v}\"]\nworkers = {}\n\n",
                q(&self.worker),
                q(&self.log),
                o.per_program
            );
        }
        // Written aside and renamed: the master never reads half a file.
        let tmp = self.dir.path().join("plumule.toml.tmp");
        fs::write(&tmp, text).map_err(|e| format!("cannot write the config: {e}"))?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644))
            .map_err(|e| format!("cannot chmod the config: {e}"))?;
        fs::rename(&tmp, &self.config).map_err(|e| format!("cannot rename the config: {e}"))
    }

    fn start_master(&mut self, plumule: &Path) -> Result<()> {
        let stderr = fs::File::create(self.dir.path().join("master.stderr"))
            .map_err(|e| format!("cannot create master.stderr: {e}"))?;
        let mut cmd = Command::new(plumule);
        cmd.args(["run", "-c"])
            .arg(&self.config)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("PLUMULE_SOCKET")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .process_group(0);
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", plumule.display()))?;
        self.master = Some(child);
        Ok(())
    }

    /// Fails at once, with the master's stderr, if the master has exited.
    fn check_master(&mut self) -> Result<()> {
        let Some(child) = self.master.as_mut() else {
            return Err("the master is not running".into());
        };
        if let Ok(Some(status)) = child.try_wait() {
            self.master = None;
            let stderr =
                fs::read_to_string(self.dir.path().join("master.stderr")).unwrap_or_default();
            return Err(format!(
                "the master exited ({status}); its stderr:\n{stderr}"
            ));
        }
        Ok(())
    }

    /// The complete lines of the worker log.
    fn starts(&self) -> Result<Vec<Start>> {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
        complete
            .lines()
            .map(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                let bad = || format!("malformed worker log line {l:?}");
                if f.len() != 5 {
                    return Err(bad());
                }
                Ok(Start {
                    program: f[0].to_string(),
                    id: f[1].parse().map_err(|_| bad())?,
                    pid: f[2].parse().map_err(|_| bad())?,
                    version: f[3].to_string(),
                    ns: f[4].parse().map_err(|_| bad())?,
                })
            })
            .collect()
    }

    /// SIGTERM to the master, then a bounded wait for its exit.
    fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.master.take() else {
            return Ok(());
        };
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        let give_up = Instant::now() + STOP_DEADLINE;
        loop {
            match child.try_wait() {
                Ok(Some(s)) if s.success() => return Ok(()),
                Ok(Some(s)) => return Err(format!("the master exited with {s} on SIGTERM")),
                _ if Instant::now() >= give_up => {
                    self.master = Some(child);
                    return Err(format!(
                        "the master still runs {STOP_DEADLINE:?} after SIGTERM"
                    ));
                }
                _ => std::thread::sleep(POLL), // bounded wait for the exit
            }
        }
    }
}

impl Drop for Bench {
    /// Leaves nothing behind: the master and every worker that logged a start are SIGKILLed
    /// (a worker only if /proc still shows it running our worker binary: pids get reused).
    fn drop(&mut self) {
        if let Some(mut child) = self.master.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let worker = self.worker.display().to_string();
        for s in self.starts().unwrap_or_default() {
            let cmdline = fs::read(format!("/proc/{}/cmdline", s.pid)).unwrap_or_default();
            if cmdline.starts_with(worker.as_bytes()) {
                let _ = kill(Pid::from_raw(-s.pid), Signal::SIGKILL);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The control socket

struct Ctl {
    reader: BufReader<UnixStream>,
}

impl Ctl {
    fn connect(path: &Path) -> Result<Ctl> {
        let s = UnixStream::connect(path)
            .map_err(|e| format!("cannot connect to {}: {e}", path.display()))?;
        s.set_read_timeout(Some(REPLY_DEADLINE))
            .and_then(|_| s.set_write_timeout(Some(REPLY_DEADLINE)))
            .map_err(|e| format!("cannot set socket timeouts: {e}"))?;
        Ok(Ctl {
            reader: BufReader::new(s),
        })
    }

    fn send(&mut self, line: &[u8]) -> Result<()> {
        self.reader
            .get_ref()
            .write_all(line)
            .map_err(|e| format!("cannot send a request: {e}"))
    }

    fn recv(&mut self) -> Result<Response> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err("the master closed the connection without answering".into()),
            Ok(_) => serde_json::from_str(&line).map_err(|e| format!("bad answer {line:?}: {e}")),
            Err(e) => Err(format!("no answer within {REPLY_DEADLINE:?}: {e}")),
        }
    }

    fn ok(answer: Response) -> Result<Answer> {
        match answer {
            Response::Ok(answer) => Ok(answer),
            Response::Error(e) => Err(format!("the master refused: {e}")),
        }
    }

    fn status(&mut self) -> Result<StatusReport> {
        self.send(b"{\"cmd\":\"status\"}\n")?;
        match Ctl::ok(self.recv()?)? {
            Answer::Status(report) => Ok(report),
            other => Err(format!("not a status: {other:?}")),
        }
    }
}

/// (program, id) → pid of the running workers.
fn running(status: &StatusReport) -> BTreeMap<(String, u32), i32> {
    status
        .workers()
        .filter(|(_, w)| w.state == "running")
        .filter_map(|(p, w)| Some(((p.name.clone(), w.id), w.pid?)))
        .collect()
}

fn pid_alive(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rfind(')')
                .and_then(|i| s[i + 1..].trim_start().chars().next())
        })
        .is_some_and(|state| state != 'Z')
}

// ---------------------------------------------------------------------------------------------
// The measurements

struct Stats {
    median: f64,
    p90: f64,
    max: f64,
}

/// Nearest-rank percentiles, in milliseconds.
fn stats(mut ms: Vec<f64>) -> Stats {
    ms.sort_by(f64::total_cmp);
    let rank = |q: f64| ms[((q * ms.len() as f64).ceil() as usize).clamp(1, ms.len()) - 1];
    Stats {
        median: rank(0.5),
        p90: rank(0.9),
        max: ms[ms.len() - 1],
    }
}

struct Report {
    total: usize,
    status_reused: Stats,
    status_fresh: Stats,
    first_worker: Stats,
    reply: Stats,
    unchanged_checked: usize,
    rolled: usize,
}

fn run(o: &Options) -> Result<String> {
    let total = o.programs * o.per_program;
    let mut bench = Bench::new(&o.plumule)?;
    let changed = o.programs - 1;
    bench.write_config(o, changed, "v1")?;
    bench.start_master(&o.plumule)?;

    // Every worker running: by status and by its own log line.
    let socket = bench.socket();
    let mut before = wait_until(&format!("{total} workers run"), START_DEADLINE, || {
        bench.check_master()?;
        let Ok(mut ctl) = Ctl::connect(&socket) else {
            return Ok(None);
        };
        let pids = running(&ctl.status()?);
        Ok((pids.len() == total && bench.starts()?.len() >= total).then_some(pids))
    })?;

    // status round trips: on one connection, then a new connection per call.
    let mut ctl = Ctl::connect(&socket)?;
    let mut reused = Vec::with_capacity(o.calls);
    for _ in 0..o.calls {
        let t = Instant::now();
        let st = ctl.status()?;
        reused.push(t.elapsed().as_secs_f64() * 1e3);
        if running(&st).len() != total {
            return Err(format!(
                "status lists {} running workers, not {total}",
                running(&st).len()
            ));
        }
    }
    let mut fresh = Vec::with_capacity(o.calls);
    for _ in 0..o.calls {
        let t = Instant::now();
        let st = Ctl::connect(&socket)?.status()?;
        fresh.push(t.elapsed().as_secs_f64() * 1e3);
        if running(&st).len() != total {
            return Err(format!(
                "status lists {} running workers, not {total}",
                running(&st).len()
            ));
        }
    }

    // Reloads: each changes the command of the last program only.
    let changed_name = format!("p{changed}");
    let mut first_worker = Vec::new();
    let mut reply = Vec::new();
    let mut unchanged_checked = 0;
    for trial in 0..o.reloads {
        let version = format!("v{}", trial + 2);
        bench.write_config(o, changed, &version)?;
        let logged_before = bench.starts()?.len();
        let t0 = monotonic_ns();
        ctl.send(b"{\"cmd\":\"reload\"}\n")?;
        let answer = Ctl::ok(ctl.recv()?)?;
        let t_reply = monotonic_ns();
        let expected = format!("{changed_name}: command changed (rolling restart)");
        if answer
            != Answer::Reload(ReloadResult {
                changes: vec![expected],
            })
        {
            return Err(format!(
                "reload {}: unexpected changes {answer:?}",
                trial + 1
            ));
        }

        // The reply came once the roll was done: every worker of the changed program is new.
        let after = running(&ctl.status()?);
        // "Running" means exec'd: the last successor may not have written its line yet.
        let new_pids: BTreeSet<i32> = after
            .iter()
            .filter(|((p, _), _)| *p == changed_name)
            .map(|(_, pid)| *pid)
            .collect();
        let new: Vec<Start> = wait_until(
            &format!(
                "reload {}: every new worker has logged its start",
                trial + 1
            ),
            START_DEADLINE,
            || {
                let new = bench.starts()?.split_off(logged_before);
                let logged: BTreeSet<i32> = new.iter().map(|s| s.pid).collect();
                Ok(new_pids.is_subset(&logged).then_some(new))
            },
        )?;
        let first = new
            .iter()
            .filter(|s| s.program == changed_name && s.version == version)
            .map(|s| s.ns)
            .min()
            .ok_or(format!(
                "reload {}: no new worker logged a start",
                trial + 1
            ))?;
        let mut fresh_ids = BTreeSet::new();
        for ((program, id), pid) in &before {
            let now = after.get(&(program.clone(), *id));
            if *program == changed_name {
                let started = new.iter().find(|s| Some(&s.pid) == now);
                match started {
                    Some(s) if s.version == version && s.id == *id && now != Some(pid) => {
                        fresh_ids.insert(*id);
                    }
                    _ => {
                        return Err(format!(
                            "reload {}: {program}.{id} was not replaced by a {version} worker \
                             (pid {pid} before, {now:?} after)",
                            trial + 1
                        ))
                    }
                }
            } else {
                if now != Some(pid) || !pid_alive(*pid) {
                    return Err(format!(
                        "reload {}: unchanged worker {program}.{id} was touched \
                         (pid {pid} before, {now:?} after)",
                        trial + 1
                    ));
                }
                unchanged_checked += 1;
            }
        }
        if fresh_ids.len() != o.per_program {
            return Err(format!(
                "reload {}: {} of {} workers rolled",
                trial + 1,
                fresh_ids.len(),
                o.per_program
            ));
        }
        if let Some(s) = new.iter().find(|s| s.program != changed_name) {
            return Err(format!(
                "reload {}: an unchanged program started a worker: {s:?}",
                trial + 1
            ));
        }
        first_worker.push((first - t0) as f64 / 1e6);
        reply.push((t_reply - t0) as f64 / 1e6);
        before = after;
    }
    drop(ctl);
    bench.stop()?;

    Ok(Report {
        total,
        status_reused: stats(reused),
        status_fresh: stats(fresh),
        first_worker: stats(first_worker),
        reply: stats(reply),
        unchanged_checked,
        rolled: o.per_program,
    }
    .render(o))
}

impl Report {
    fn render(&self, o: &Options) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "plumule control bench: {} workers ({} programs x {}), {} status calls, {} reloads",
            self.total, o.programs, o.per_program, o.calls, o.reloads
        );
        let _ = writeln!(out, "| metric | median | p90 | max | goal |");
        let _ = writeln!(out, "|---|---|---|---|---|");
        let mut row = |name: &str, s: &Stats, goal: Option<f64>| {
            let verdict = match goal {
                Some(g) if s.median < g => format!("< {g} ms (met)"),
                Some(g) => format!("< {g} ms (MISSED)"),
                None => "-".to_string(),
            };
            let _ = writeln!(
                out,
                "| {name} | {:.2} ms | {:.2} ms | {:.2} ms | {verdict} |",
                s.median, s.p90, s.max
            );
        };
        row(
            "status round trip, one connection",
            &self.status_reused,
            Some(STATUS_GOAL_MS),
        );
        row(
            "status round trip, new connection each",
            &self.status_fresh,
            Some(STATUS_GOAL_MS),
        );
        row(
            "reload sent -> first new worker exec'd",
            &self.first_worker,
            Some(FIRST_WORKER_GOAL_MS),
        );
        row(
            &format!(
                "reload sent -> reply (applied, {} workers rolled)",
                self.rolled
            ),
            &self.reply,
            None,
        );
        let _ = writeln!(
            out,
            "unchanged workers: {} pid checks over {} reloads, all untouched",
            self.unchanged_checked, o.reloads
        );
        out
    }
}
