//! Benchmark of the library (issue 10): a program built on [`plumule::ServiceManager`] with
//! one service of N workers (forked, not exec'd), beside the binary's master running N `exec`
//! workers of a tiny C program, and beside Cotyledon (the Python library the service manager is
//! modelled on) running N forked Python workers — all three measured in the same run and
//! printed as one table with the ratios and the goals of issue 10: at least 10× faster starts
//! and restarts than Cotyledon, and a master no bigger than the binary's (PSS within ±20 %).
//!
//! Three figures per system:
//! - cold start: from just before the program is spawned (and, for the two libraries, from just
//!   before their `run()`, which the program logs) to the latest first start a worker logged;
//! - restart: SIGKILL of one running worker to the start its replacement logged, the median
//!   (and max) over K kills, each of a worker that has run for the supervisor's
//!   `healthy_after`, so no backoff applies;
//! - master memory: Pss (/proc/PID/smaps_rollup) summed over the supervising processes (the
//!   master and any child of it that is not a worker, e.g. plumule's fork server), and the
//!   master's VmRSS.
//!
//! Every worker logs `ID PID MONOTONIC_NS` the moment its body starts, with one write on an
//! O_APPEND descriptor: the library service from its `run`, the tiny C worker
//! (`tiny_worker.c`) first thing after exec, the Cotyledon service from its `run`. Latencies are
//! from the bench's CLOCK_MONOTONIC reading to the worker's own, so they do not depend on how
//! fast the bench notices the line.
//!
//! Cotyledon is installed (`pip install cotyledon`) into a venv under `target/cotyledon-venv`
//! the first time; when it cannot be, its column shows the figures of `../shared/PEERS.md`
//! (measured on this machine on 2026-12-01) and the table says so. Its guard against forking
//! too fast (a 5 s pause once more than N forks happen within N seconds, which would make every
//! restart after the first take 5 s) is turned off in the bench's program; its 10 ms sleep
//! before each fork is kept.
//!
//! Run: `cargo bench --bench library [-- --workers N --kills K --no-cotyledon]`;
//! `PLUMULE_BENCH_N=20` scales N down for a quick run (default 200, K = 20).
//!
//! This bench binary is also the library program: started with `PLUMULE_LIBBENCH_PROGRAM` set
//! it runs a `ServiceManager` (it checks that first, while it has only one thread). The bench
//! never hangs: every wait has a deadline, and on failure every process it started is killed.

mod common;

use common::{machine, sys, table, today};
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{Read, Write as _};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::Duration;

use plumule::service::{Backoff, Error, OutputSpec};
use plumule::{Service, ServiceManager, ServiceOptions, Worker};

/// Every failure is a sentence for the user: what never happened, or what went wrong.
type Result<T> = std::result::Result<T, String>;

const USAGE: &str = "usage: cargo bench --bench library [-- --workers N --kills K \
                     --no-cotyledon]\n\
                     PLUMULE_BENCH_N=N picks the worker count when --workers is not given \
                     (default 200)";

const DEFAULT_N: usize = 200;
const DEFAULT_KILLS: usize = 20;
const SIZE_VAR: &str = "PLUMULE_BENCH_N";
/// Set (to `LOG N RUN_MARK RUNTIME_DIR`, tab-separated) when this binary is the library
/// program.
const PROGRAM_VAR: &str = "PLUMULE_LIBBENCH_PROGRAM";

/// `healthy_after` and `backoff.initial` of the library service and of the binary's program.
const HEALTHY_AFTER: Duration = Duration::from_millis(100);
/// Added to every "has run long enough" wait, so that the supervisor's clock agrees.
const MARGIN: Duration = Duration::from_millis(30);

const COLD_START_DEADLINE: Duration = Duration::from_secs(60);
const RESTART_DEADLINE: Duration = Duration::from_secs(10);
const STOP_DEADLINE: Duration = Duration::from_secs(30);

/// PEERS.md's Cotyledon figures at N = 200 (2026-12-01, this machine): the reference when
/// Cotyledon cannot be run.
const PEERS_COTYLEDON: Figures = Figures {
    cold_from_spawn: Duration::from_millis(3184),
    cold_from_run: None,
    restarts: Vec::new(),
    restart_median: Duration::from_micros(17_200),
    rss_kib: None,
    pss_kib: 4608,
    uss_kib: None,
};

fn main() -> ExitCode {
    // First, while this process has only its main thread: the library program.
    if let Some(spec) = std::env::var_os(PROGRAM_VAR) {
        std::process::exit(library_program(&spec.to_string_lossy()));
    }
    let opts = match Options::parse(std::env::args().skip(1), std::env::var(SIZE_VAR).ok()) {
        Ok(opts) => opts,
        Err(e) => {
            eprintln!("library bench: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match bench(&opts) {
        Ok(table) => {
            print!("{table}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("library bench FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

struct Options {
    n: usize,
    kills: usize,
    cotyledon: bool,
}

impl Options {
    fn parse(mut args: impl Iterator<Item = String>, env_n: Option<String>) -> Result<Options> {
        let mut n = None;
        let mut opts = Options {
            n: DEFAULT_N,
            kills: DEFAULT_KILLS,
            cotyledon: true,
        };
        while let Some(arg) = args.next() {
            let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
            match arg.as_str() {
                // `cargo bench` passes `--bench` to every bench binary.
                "--bench" => {}
                "--workers" => n = Some(number(&arg, &value("--workers")?)?),
                "--kills" => opts.kills = number(&arg, &value("--kills")?)?,
                "--no-cotyledon" => opts.cotyledon = false,
                "-h" | "--help" => return Err("help".into()),
                other => return Err(format!("unknown argument `{other}`")),
            }
        }
        match (n, env_n) {
            (Some(n), _) => opts.n = n,
            (None, Some(env)) if !env.trim().is_empty() => opts.n = number(SIZE_VAR, env.trim())?,
            (None, _) => {}
        }
        if opts.n == 0 {
            return Err("the worker count must be at least 1".into());
        }
        Ok(opts)
    }
}

fn number<T: std::str::FromStr>(flag: &str, s: &str) -> Result<T> {
    s.parse()
        .map_err(|_| format!("{flag} wants a whole number, not `{s}`"))
}

// ---------------------------------------------------------------------------------------------
// The library program.

/// The library service: logs its start, then waits for a request (a stop) and returns.
struct Stamp {
    log: PathBuf,
}

impl Service for Stamp {
    fn run(&mut self, worker: &Worker) -> std::result::Result<(), Error> {
        let ns = sys::mono_ns();
        let line = format!("{} {} {ns}\n", worker.id(), std::process::id());
        let mut f = fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o644)
            .open(&self.log)?;
        f.write_all(line.as_bytes())?;
        drop(f);
        while worker.wait(Duration::from_secs(3600)).is_none() {}
        Ok(())
    }
}

/// `spec` is `LOG N RUN_MARK RUNTIME_DIR`, tab-separated. Writes the monotonic time to
/// RUN_MARK just before `run()`, and returns `run()`'s exit code.
fn library_program(spec: &str) -> i32 {
    let f: Vec<&str> = spec.split('\t').collect();
    let [log, n, mark, runtime] = f[..] else {
        eprintln!("library bench program: bad {PROGRAM_VAR} `{spec}`");
        return 2;
    };
    let Ok(n) = n.parse::<u32>() else {
        eprintln!("library bench program: bad worker count `{n}`");
        return 2;
    };
    let log = PathBuf::from(log);
    let mut manager = ServiceManager::new();
    manager.runtime_dir(runtime);
    let options = ServiceOptions {
        workers: n,
        healthy_after: HEALTHY_AFTER,
        backoff: Backoff {
            initial: HEALTHY_AFTER,
            ..ServiceOptions::default().backoff
        },
        stdout: OutputSpec::Null,
        ..ServiceOptions::default()
    };
    manager.add_with("tiny", options, move |_: &Worker| Stamp {
        log: log.clone(),
    });
    if let Err(e) = fs::write(mark, sys::mono_ns().to_string()) {
        eprintln!("library bench program: cannot write {mark}: {e}");
        return 2;
    }
    manager.run()
}

/// The Cotyledon program: `python PROGRAM LOG N RUN_MARK`.
const COTYLEDON_PROGRAM: &str = r#"
import os, sys, time
import cotyledon

log, n, mark = sys.argv[1], int(sys.argv[2]), sys.argv[3]

class Stamp(cotyledon.Service):
    def run(self):
        ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(fd, b"%d %d %d\n" % (self.worker_id, os.getpid(), ns))
        os.close(fd)
        # Returning leaves the worker waiting for its stop signal.

class Manager(cotyledon.ServiceManager):
    # Cotyledon's own, without its 5 s pause once more than N forks happen within N seconds
    # (every restart after the first would take 5 s); its sleep before each fork is kept.
    def _slowdown_respawn_if_needed(self):
        time.sleep(self._wait_interval)
        self._forktimes.append(time.time())

m = Manager()
m.add(Stamp, workers=n)
with open(mark, "w") as f:
    f.write(str(time.clock_gettime_ns(time.CLOCK_MONOTONIC)))
m.run()
"#;

// ---------------------------------------------------------------------------------------------
// The systems under test.

/// How to start one system with `n` workers that log to `log`.
struct System {
    name: &'static str,
    command: Command,
    /// Where the program writes its monotonic time just before `run()`, if it does.
    run_mark: Option<PathBuf>,
    log: PathBuf,
}

fn library_system(dir: &Path, n: usize) -> Result<System> {
    let d = fresh_dir(dir, "library")?;
    let log = d.join("workers.log");
    let mark = d.join("run.mark");
    let runtime = d.join("run");
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the bench binary: {e}"))?;
    let mut command = Command::new(exe);
    let spec = [&log, Path::new(&n.to_string()), &mark, &runtime]
        .map(|p| p.to_string_lossy().into_owned())
        .join("\t");
    command.env(PROGRAM_VAR, spec);
    Ok(System {
        name: "library",
        command,
        run_mark: Some(mark),
        log,
    })
}

fn binary_system(dir: &Path, n: usize, tiny: &Path) -> Result<System> {
    let d = fresh_dir(dir, "binary")?;
    let log = d.join("workers.log");
    for sub in ["run", "state"] {
        fs::create_dir(d.join(sub)).map_err(|e| format!("cannot create {sub}: {e}"))?;
    }
    let config = format!(
        "[plumule]\n\
         runtime_dir = {runtime}\n\
         state_dir = {state}\n\
         \n\
         [program.tiny]\n\
         command = [{exe}, {log}]\n\
         workers = {n}\n\
         stdout = \"null\"\n\
         healthy_after = \"{ms}ms\"\n\
         backoff = {{ initial = \"{ms}ms\" }}\n",
        runtime = toml_str(&d.join("run")),
        state = toml_str(&d.join("state")),
        exe = toml_str(tiny),
        log = toml_str(&log),
        ms = HEALTHY_AFTER.as_millis(),
    );
    let path = d.join("plumule.toml");
    write_file(&path, &config)?;
    let mut command = Command::new(env!("CARGO_BIN_EXE_plumule"));
    command.arg("run").arg("-c").arg(&path);
    Ok(System {
        name: "binary (exec)",
        command,
        run_mark: None,
        log,
    })
}

fn cotyledon_system(dir: &Path, n: usize, python: &Path) -> Result<System> {
    let d = fresh_dir(dir, "cotyledon")?;
    let log = d.join("workers.log");
    let mark = d.join("run.mark");
    let program = d.join("bench_cotyledon.py");
    write_file(&program, COTYLEDON_PROGRAM)?;
    let mut command = Command::new(python);
    command
        .arg(&program)
        .arg(&log)
        .arg(n.to_string())
        .arg(&mark);
    Ok(System {
        name: "Cotyledon",
        command,
        run_mark: Some(mark),
        log,
    })
}

/// The venv's python with Cotyledon importable, installing it the first time; or why not.
fn cotyledon_python() -> std::result::Result<(PathBuf, String), String> {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/cotyledon-venv");
    let python = venv.join("bin/python");
    let version = |python: &Path| -> Option<String> {
        let out = Command::new(python)
            .args([
                "-c",
                "import cotyledon, importlib.metadata as m; print(m.version('cotyledon'))",
            ])
            .stderr(Stdio::null())
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    if let Some(v) = version(&python) {
        return Ok((python, v));
    }
    eprintln!("bench: installing cotyledon into {}", venv.display());
    let run = |cmd: &mut Command| -> Result<()> {
        let out = cmd
            .output()
            .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
        if out.status.success() {
            return Ok(());
        }
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().last().unwrap_or("").to_string();
        Err(format!("{cmd:?} failed ({}): {last}", out.status))
    };
    run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    run(Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "cotyledon"])
        .stdin(Stdio::null()))?;
    let v = version(&python).ok_or("cotyledon was installed but does not import")?;
    Ok((python, v))
}

fn fresh_dir(dir: &Path, name: &str) -> Result<PathBuf> {
    let d = dir.join(name);
    fs::create_dir(&d).map_err(|e| format!("cannot create {}: {e}", d.display()))?;
    Ok(d)
}

fn toml_str(p: &Path) -> String {
    let s = p.to_string_lossy();
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn write_file(path: &Path, text: &str) -> Result<()> {
    fs::write(path, text)
        .and_then(|()| fs::set_permissions(path, fs::Permissions::from_mode(0o644)))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Compiles `tiny_worker.c` with `$CC` (default `cc`) `-O2` into `dir`.
fn build_tiny_worker(dir: &Path) -> Result<PathBuf> {
    let src = dir.join("tiny_worker.c");
    write_file(&src, include_str!("tiny_worker.c"))?;
    let exe = dir.join("tiny_worker");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = Command::new(&cc)
        .arg("-O2")
        .arg("-o")
        .arg(&exe)
        .arg(&src)
        .output()
        .map_err(|e| format!("cannot run the C compiler `{cc}`: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "`{cc} -O2` could not build tiny_worker.c ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(exe)
}

// ---------------------------------------------------------------------------------------------
// The measurements.

struct Figures {
    cold_from_spawn: Duration,
    cold_from_run: Option<Duration>,
    restarts: Vec<Duration>,
    restart_median: Duration,
    rss_kib: Option<u64>,
    pss_kib: u64,
    /// The master's private pages (Private_Clean + Private_Dirty of smaps_rollup).
    uss_kib: Option<u64>,
}

/// What the Cotyledon column holds.
enum Peer {
    Measured(Figures, String),
    /// PEERS.md's figures, and why Cotyledon was not run.
    Reference(String),
}

fn bench(opts: &Options) -> Result<String> {
    let dir = tempfile::Builder::new()
        .prefix("plumule-libbench.")
        .tempdir()
        .map_err(|e| format!("cannot create a temp dir: {e}"))?;
    let n = opts.n;
    let tiny = build_tiny_worker(dir.path())?;
    let load = fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into());
    eprintln!("bench: {n} workers, {} kills", opts.kills);

    let library = measure(library_system(dir.path(), n)?, n, opts.kills)?;
    let binary = measure(binary_system(dir.path(), n, &tiny)?, n, opts.kills)?;
    let peer = if !opts.cotyledon {
        Peer::Reference("skipped: --no-cotyledon".into())
    } else {
        match cotyledon_python() {
            Ok((python, version)) => Peer::Measured(
                measure(cotyledon_system(dir.path(), n, &python)?, n, opts.kills)?,
                version,
            ),
            Err(why) => Peer::Reference(format!("skipped: {why}")),
        }
    };
    Ok(render(opts, &load, &library, &binary, &peer))
}

/// Starts `sys`, waits for all `n` workers, reads its memory, restarts `kills` workers one at a
/// time, then stops it.
fn measure(sys: System, n: usize, kills: usize) -> Result<Figures> {
    let name = sys.name;
    eprintln!("bench: {name}");
    let (mut running, t0) = Running::start(sys, n)?;
    let last = running
        .log
        .first
        .iter()
        .flatten()
        .max()
        .copied()
        .unwrap_or(t0);
    let cold_from_spawn = Duration::from_nanos(last.saturating_sub(t0));
    let cold_from_run = match &running.run_mark {
        Some(mark) => {
            let text = fs::read_to_string(mark)
                .map_err(|e| format!("{name}: cannot read {}: {e}", mark.display()))?;
            let at: u64 = text
                .trim()
                .parse()
                .map_err(|_| format!("{name}: bad run mark `{text}`"))?;
            Some(Duration::from_nanos(last.saturating_sub(at)))
        }
        None => None,
    };
    eprintln!("bench: {name}: cold start {}", ms(cold_from_spawn));

    running.wait_all_healthy()?;
    let supervision = running.supervision_pids()?;
    let rss_kib = proc_field(running.root, "status", "VmRSS:")?;
    let uss_kib = proc_field(running.root, "smaps_rollup", "Private_Clean:")?
        + proc_field(running.root, "smaps_rollup", "Private_Dirty:")?;
    let mut pss_kib = 0;
    for &pid in &supervision {
        pss_kib += proc_field(pid, "smaps_rollup", "Pss:")?;
    }

    let mut restarts = Vec::with_capacity(kills);
    for k in 0..kills {
        restarts.push(running.restart(k % n)?);
    }
    let restart_median = median(&restarts);
    eprintln!("bench: {name}: restart median {}", ms(restart_median));
    running.stop()?;
    Ok(Figures {
        cold_from_spawn,
        cold_from_run,
        restarts,
        restart_median,
        rss_kib: Some(rss_kib),
        pss_kib,
        uss_kib: Some(uss_kib),
    })
}

/// A running system. Dropping it before [`Running::stop`] SIGKILLs it and every worker it
/// logged.
struct Running {
    name: &'static str,
    child: Child,
    root: i32,
    /// Readable once `root` has exited.
    pidfd: OwnedFd,
    log: WorkerLog,
    run_mark: Option<PathBuf>,
    stderr: PathBuf,
    done: bool,
}

impl Running {
    /// Spawns the system and waits until all `n` workers have started; returns it and the
    /// monotonic time just before the spawn.
    fn start(sys: System, n: usize) -> Result<(Running, u64)> {
        let System {
            name,
            mut command,
            run_mark,
            log,
        } = sys;
        write_file(&log, "")?;
        let log = WorkerLog::open(&log, n)?;
        let stderr = log.path.with_file_name("stderr");
        let stderr_file = File::create(&stderr)
            .map_err(|e| format!("cannot create {}: {e}", stderr.display()))?;
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr_file);
        sys::die_with_parent(&mut command);
        let t0 = sys::mono_ns();
        let child = command
            .spawn()
            .map_err(|e| format!("cannot start {name} ({command:?}): {e}"))?;
        let root = child.id() as i32;
        let pidfd = match sys::pidfd_open(root) {
            Ok(fd) => fd,
            Err(e) => {
                let _ = sys::kill(root, libc::SIGKILL);
                return Err(format!("pidfd_open({root}): {e}"));
            }
        };
        let mut running = Running {
            name,
            child,
            root,
            pidfd,
            log,
            run_mark,
            stderr,
            done: false,
        };
        running.wait_log(
            COLD_START_DEADLINE,
            |log| (log.started() == n).then_some(()),
            |log| format!("only {} of {n} workers had started", log.started()),
        )?;
        Ok((running, t0))
    }

    /// Waits until `found` sees what it looks for in the worker log, sleeping on inotify
    /// between looks; fails with `missing` when `timeout` passes or the system exits.
    fn wait_log<T>(
        &mut self,
        timeout: Duration,
        mut found: impl FnMut(&WorkerLog) -> Option<T>,
        missing: impl Fn(&WorkerLog) -> String,
    ) -> Result<T> {
        let deadline = sys::mono_ns() + timeout.as_nanos() as u64;
        loop {
            self.log.refresh()?;
            if let Some(t) = found(&self.log) {
                return Ok(t);
            }
            let now = sys::mono_ns();
            if now >= deadline {
                return Err(format!(
                    "{}: {} within {timeout:?}{}",
                    self.name,
                    missing(&self.log),
                    self.stderr_tail()
                ));
            }
            let ready = sys::poll(
                &[self.log.inotify.as_fd(), self.pidfd.as_fd()],
                Duration::from_nanos(deadline - now),
            )
            .map_err(|e| format!("poll: {e}"))?;
            if ready[1] {
                self.log.refresh()?;
                self.done = true;
                let status = self.child.wait().map_err(|e| format!("wait: {e}"))?;
                return Err(format!(
                    "{}: {}: it exited first ({status}){}",
                    self.name,
                    missing(&self.log),
                    self.stderr_tail()
                ));
            }
            if ready[0] {
                sys::drain(self.log.inotify.as_fd());
            }
        }
    }

    /// The master and each child of it that is not a current worker (plumule's fork server,
    /// a helper of Python's multiprocessing).
    fn supervision_pids(&mut self) -> Result<Vec<i32>> {
        self.log.refresh()?;
        let workers: Vec<i32> = self.log.latest.iter().flatten().map(|s| s.pid).collect();
        let tasks = format!("/proc/{}/task", self.root);
        let mut pids = vec![self.root];
        for task in fs::read_dir(&tasks).map_err(|e| format!("cannot list {tasks}: {e}"))? {
            let task = task.map_err(|e| format!("cannot list {tasks}: {e}"))?;
            let children = fs::read_to_string(task.path().join("children")).unwrap_or_default();
            pids.extend(
                children
                    .split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok())
                    .filter(|p| !workers.contains(p)),
            );
        }
        Ok(pids)
    }

    /// Sleeps until every worker's current run has lasted `healthy_after` (and a margin).
    fn wait_all_healthy(&mut self) -> Result<()> {
        self.log.refresh()?;
        let latest = self.log.latest.iter().flatten().map(|s| s.ns).max();
        sleep_until_healthy(latest.unwrap_or(0));
        Ok(())
    }

    /// SIGKILLs worker `id` once it has run for `healthy_after`, and returns the time from
    /// just before the kill to its replacement's logged start.
    fn restart(&mut self, id: usize) -> Result<Duration> {
        let current = self.log.latest[id].ok_or(format!("worker {id} never started"))?;
        sleep_until_healthy(current.ns);
        let seen = self.log.starts[id];
        let t_kill = sys::mono_ns();
        sys::kill(current.pid, libc::SIGKILL)
            .map_err(|e| format!("kill -KILL {} (worker {id}): {e}", current.pid))?;
        let replaced =
            |log: &WorkerLog| (log.starts[id] > seen).then(|| log.latest[id].map_or(0, |s| s.ns));
        let ns = self.wait_log(RESTART_DEADLINE, replaced, |_| {
            format!(
                "worker {id} was not restarted after SIGKILL of its pid {}",
                current.pid
            )
        })?;
        Ok(Duration::from_nanos(ns.saturating_sub(t_kill)))
    }

    /// SIGTERM, then waits for the system to exit; then SIGKILLs any worker it left.
    fn stop(mut self) -> Result<()> {
        sys::kill(self.root, libc::SIGTERM).map_err(|e| format!("kill -TERM: {e}"))?;
        let ready =
            sys::poll(&[self.pidfd.as_fd()], STOP_DEADLINE).map_err(|e| format!("poll: {e}"))?;
        if !ready[0] {
            return Err(format!(
                "{} had not exited {STOP_DEADLINE:?} after SIGTERM{}",
                self.name,
                self.stderr_tail()
            ));
        }
        self.done = true;
        let _ = self.child.wait();
        self.kill_workers();
        Ok(())
    }

    fn kill_workers(&mut self) {
        let _ = self.log.refresh();
        for s in self.log.latest.iter().flatten() {
            let _ = sys::kill(s.pid, libc::SIGKILL);
        }
    }

    fn stderr_tail(&self) -> String {
        let text = fs::read_to_string(&self.stderr).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        if lines.is_empty() {
            return String::new();
        }
        let tail = &lines[lines.len().saturating_sub(20)..];
        format!("; last lines of its stderr:\n  {}", tail.join("\n  "))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        eprintln!(
            "bench: killing {} (pid {}) and its workers",
            self.name, self.root
        );
        let _ = sys::kill(self.root, libc::SIGKILL);
        let _ = self.child.wait();
        self.kill_workers();
    }
}

fn sleep_until_healthy(started_ns: u64) {
    let ready = started_ns + (HEALTHY_AFTER + MARGIN).as_nanos() as u64;
    let now = sys::mono_ns();
    if ready > now {
        std::thread::sleep(Duration::from_nanos(ready - now));
    }
}

/// The workers' log: every start, in order.
struct WorkerLog {
    path: PathBuf,
    file: File,
    inotify: OwnedFd,
    partial: Vec<u8>,
    /// Per worker id: the monotonic time of its first start.
    first: Vec<Option<u64>>,
    /// Per worker id: how many starts so far.
    starts: Vec<usize>,
    /// Per worker id: its latest start.
    latest: Vec<Option<Start>>,
}

#[derive(Clone, Copy)]
struct Start {
    pid: i32,
    ns: u64,
}

impl WorkerLog {
    fn open(path: &Path, n: usize) -> Result<WorkerLog> {
        let file = File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        let inotify = sys::inotify_watch(path)
            .map_err(|e| format!("cannot watch {} with inotify: {e}", path.display()))?;
        Ok(WorkerLog {
            path: path.to_path_buf(),
            file,
            inotify,
            partial: Vec::new(),
            first: vec![None; n],
            starts: vec![0; n],
            latest: vec![None; n],
        })
    }

    /// Reads the lines appended since the last call.
    fn refresh(&mut self) -> Result<()> {
        self.file
            .read_to_end(&mut self.partial)
            .map_err(|e| format!("cannot read the worker log: {e}"))?;
        let Some(end) = self.partial.iter().rposition(|&b| b == b'\n') else {
            return Ok(());
        };
        let complete: Vec<u8> = self.partial.drain(..=end).collect();
        for line in String::from_utf8_lossy(&complete).lines() {
            let (id, start) = parse_start(line)
                .filter(|&(id, _)| id < self.first.len())
                .ok_or(format!("bad line in the worker log: `{line}`"))?;
            self.first[id].get_or_insert(start.ns);
            self.starts[id] += 1;
            self.latest[id] = Some(start);
        }
        Ok(())
    }

    /// How many distinct workers have started at least once.
    fn started(&self) -> usize {
        self.first.iter().flatten().count()
    }
}

fn parse_start(line: &str) -> Option<(usize, Start)> {
    let mut f = line.split(' ');
    let id = f.next()?.parse().ok()?;
    let pid = f.next()?.parse().ok()?;
    let ns = f.next()?.parse().ok()?;
    f.next().is_none().then_some((id, Start { pid, ns }))
}

/// The first number after `key` at the start of a line of /proc/PID/FILE.
fn proc_field(pid: i32, file: &str, key: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/{file}");
    let text = fs::read_to_string(&path).map_err(|e| format!("cannot read {path}: {e}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or(format!("no `{key}` in {path}"))
}

// ---------------------------------------------------------------------------------------------
// The table.

fn render(opts: &Options, load: &str, lib: &Figures, bin: &Figures, peer: &Peer) -> String {
    let (coty, coty_head, coty_note) = match peer {
        Peer::Measured(f, version) => (
            f,
            format!("Cotyledon {version}"),
            "Cotyledon: measured in this run (its fork-rate guard off, see the bench's docs)"
                .to_string(),
        ),
        Peer::Reference(why) => (
            &PEERS_COTYLEDON,
            "Cotyledon (PEERS.md)".to_string(),
            format!(
                "Cotyledon {why}; its column is ../shared/PEERS.md's (2026-12-01, this machine, \
                 N = 200), not this run"
            ),
        ),
    };
    let ratio = |peer: Duration, ours: Duration| {
        if ours.is_zero() {
            "-".to_string()
        } else {
            format!("{:.1}×", peer.as_secs_f64() / ours.as_secs_f64())
        }
    };
    let opt_ms = |d: Option<Duration>| d.map_or("-".to_string(), ms);
    let max = |f: &Figures| f.restarts.iter().max().map_or("-".to_string(), |d| ms(*d));
    let pss_ratio = lib.pss_kib as f64 / bin.pss_kib.max(1) as f64;
    let rss_ratio = match (lib.rss_kib, bin.rss_kib) {
        (Some(l), Some(b)) => l as f64 / b.max(1) as f64,
        _ => f64::NAN,
    };

    let head: Vec<String> = [
        "metric (N = ".to_string() + &opts.n.to_string() + ")",
        "library".into(),
        "binary (exec)".into(),
        coty_head,
        "Cotyledon / library".into(),
        "goal".into(),
    ]
    .to_vec();
    let rows = vec![
        vec![
            "cold start from spawn, all running".into(),
            ms(lib.cold_from_spawn),
            ms(bin.cold_from_spawn),
            ms(coty.cold_from_spawn),
            ratio(coty.cold_from_spawn, lib.cold_from_spawn),
            "≥ 10×".into(),
        ],
        vec![
            "cold start from run(), all running".into(),
            opt_ms(lib.cold_from_run),
            "-".into(),
            opt_ms(coty.cold_from_run),
            match (coty.cold_from_run, lib.cold_from_run) {
                (Some(c), Some(l)) => ratio(c, l),
                _ => "-".into(),
            },
            "≥ 10×".into(),
        ],
        vec![
            format!(
                "restart: SIGKILL → replacement running, median of {}",
                lib.restarts.len()
            ),
            ms(lib.restart_median),
            ms(bin.restart_median),
            ms(coty.restart_median),
            ratio(coty.restart_median, lib.restart_median),
            "≥ 10×".into(),
        ],
        vec![
            "restart, max".into(),
            max(lib),
            max(bin),
            max(coty),
            "".into(),
            "".into(),
        ],
        vec![
            "master PSS (supervising processes)".into(),
            mib(lib.pss_kib),
            mib(bin.pss_kib),
            mib(coty.pss_kib),
            format!("library / binary: {pss_ratio:.2}"),
            "≤ 1.2 × binary's".into(),
        ],
        vec![
            "master RSS".into(),
            lib.rss_kib.map_or("-".into(), mib),
            bin.rss_kib.map_or("-".into(), mib),
            coty.rss_kib.map_or("-".into(), mib),
            format!("library / binary: {rss_ratio:.2}"),
            "binary's ± 20 %".into(),
        ],
        vec![
            "master private memory (USS)".into(),
            lib.uss_kib.map_or("-".into(), mib),
            bin.uss_kib.map_or("-".into(), mib),
            coty.uss_kib.map_or("-".into(), mib),
            "".into(),
            "".into(),
        ],
    ];

    let start_ratio = coty.cold_from_run.zip(lib.cold_from_run).map_or(
        coty.cold_from_spawn.as_secs_f64() / lib.cold_from_spawn.as_secs_f64().max(1e-9),
        |(c, l)| c.as_secs_f64() / l.as_secs_f64().max(1e-9),
    );
    let restart_ratio =
        coty.restart_median.as_secs_f64() / lib.restart_median.as_secs_f64().max(1e-9);
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nplumule library bench, {} UTC, {}; load before: {load}\n\
         N = {} workers, {} kills per system{}\n",
        today(),
        machine(),
        opts.n,
        opts.kills,
        if opts.n == DEFAULT_N {
            ""
        } else {
            " (the goals are stated for N = 200)"
        }
    );
    out.push_str(&table(&head, &rows));
    let _ = writeln!(
        out,
        "\ngoals: starts {:.1}× faster than Cotyledon: {}; restarts {restart_ratio:.1}× faster: \
         {}; master memory the binary's (RSS {rss_ratio:.2}×, PSS {pss_ratio:.2}×): {}",
        start_ratio,
        verdict(start_ratio >= 10.0),
        verdict(restart_ratio >= 10.0),
        verdict((0.8..=1.2).contains(&rss_ratio) && pss_ratio <= 1.2),
    );
    let _ = writeln!(
        out,
        "library: a ServiceManager with one service of N forked workers (this bench binary); \
         binary: `plumule run` with N exec'd tiny C workers; {coty_note}.\n\
         Workers log their own CLOCK_MONOTONIC start; restarts kill a worker that has run \
         {}ms (healthy_after), so no backoff applies. The library's workers share the master's \
         pages (no exec), which lowers the master's PSS\n\
         below the binary's (whose workers exec): the memory goal is RSS within ± 20 % of the \
         binary's master and PSS no more than 1.2×.",
        HEALTHY_AFTER.as_millis()
    );
    out
}

fn median(v: &[Duration]) -> Duration {
    let mut s = v.to_vec();
    s.sort();
    match s.len() {
        0 => Duration::ZERO,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2,
    }
}

fn ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1e3;
    if ms < 10.0 {
        format!("{ms:.2} ms")
    } else {
        format!("{ms:.0} ms")
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}
