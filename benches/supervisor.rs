//! Benchmark of the supervisor itself (issue 2): cold start, restart latency, quick-crash
//! backoff, master memory, idle activity and graceful stop, with N workers of a tiny C program,
//! printed as a table beside the goals and a baseline the bench measures itself in the same run.
//!
//! The baseline is the physical floor on this machine: the bench process starts the same N tiny
//! workers itself with a plain fork+exec loop, restarts a SIGKILLed one by waiting for it and
//! forking+exec'ing a new one, and stops them all with SIGTERM and waitpid. That is what any
//! supervisor must do at the least, with no config, no bookkeeping and no control socket. The
//! memory floor is one idle C process (a tiny worker), and the idle floor is 0.
//!
//! Run: `cargo bench --bench supervisor [-- --workers N[,N…] --kills K --idle-secs S --plumule
//! PATH]`. By default it measures N = 200 and then N = 2000, prints one table per N, and then a
//! table of how each figure grows from the first N to the others (the goals of issue 2: restart
//! latency at 2000 within 1.2× of that at 200, cold start linear in N). `PLUMULE_BENCH_N=2000`
//! (or `200,2000`) picks the sizes when `--workers` is not given.
//!
//! The bench leaves its own open-file limit alone: it holds a handful of descriptors whatever N
//! is, and the master it starts must raise its soft limit itself (it needs a few descriptors per
//! worker); the table shows the master's open descriptors and the limit it ended up with.
//!
//! Every worker logs `ID PID MONOTONIC_NS` the moment it starts (`tiny_worker.c`), so latencies
//! are measured from the bench's CLOCK_MONOTONIC reading just before its action to the time the
//! worker itself logged, and do not depend on how fast the bench notices the line.
//!
//! The measurements only talk to a [`Supervisor`]: plumule is one implementation, and a peer
//! (runit, s6, …) can be measured by the same code by writing another.
//!
//! The bench never hangs: every wait has a deadline, and on any failure the supervisor and every
//! tiny worker are SIGKILLed, and the message says what never happened.

mod common;

use common::{machine, table, today};
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::time::Duration;

/// Every failure is a sentence for the user: what never happened, or what went wrong.
type Result<T> = std::result::Result<T, String>;

const USAGE: &str = "usage: cargo bench --bench supervisor [-- --workers N[,N...] --kills K \
                     --idle-secs S --plumule PATH]\n\
                     PLUMULE_BENCH_N=N[,N...] picks the worker counts when --workers is not given \
                     (default 200,2000)";

/// The worker counts measured when neither `--workers` nor `PLUMULE_BENCH_N` says otherwise.
const DEFAULT_SIZES: [usize; 2] = [200, 2000];
/// The environment variable that picks the worker counts.
const SIZES_VAR: &str = "PLUMULE_BENCH_N";

/// The plumule config's `healthy_after`: short, so the bench need not wait long between kills.
const HEALTHY_AFTER: Duration = Duration::from_millis(100);
/// The plumule config's `backoff.initial`: what the second of two quick restarts should take.
const BACKOFF_INITIAL: Duration = Duration::from_millis(100);
/// Added to every "has run long enough" wait, so that the supervisor's clock agrees.
const MARGIN: Duration = Duration::from_millis(30);
/// Quick-crash trials (on different workers); their median is reported.
const QUICK_CRASH_TRIALS: usize = 5;

const COLD_START_DEADLINE: Duration = Duration::from_secs(30);
const RESTART_DEADLINE: Duration = Duration::from_secs(5);
const STOP_DEADLINE: Duration = Duration::from_secs(30);

fn main() -> ExitCode {
    let opts = match Options::parse(std::env::args().skip(1), std::env::var(SIZES_VAR).ok()) {
        Ok(opts) => opts,
        Err(e) => {
            eprintln!("supervisor bench: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let plumule = Plumule {
        bin: opts.plumule.clone(),
        healthy_after: HEALTHY_AFTER,
        backoff_initial: BACKOFF_INITIAL,
    };
    print!("{}", header(&plumule, &opts));
    let mut reports = Vec::with_capacity(opts.sizes.len());
    for &n in &opts.sizes {
        match run(&plumule, &opts, n) {
            Ok(report) => {
                // Each table as soon as its N is done, so a failure at a later N keeps it.
                print!("{}", report.render(&plumule));
                reports.push(report);
            }
            Err(e) => {
                eprintln!("supervisor bench FAILED with {n} workers: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    if reports.len() > 1 {
        print!("{}", growth(&plumule, &reports));
    }
    ExitCode::SUCCESS
}

struct Options {
    /// The worker counts to measure, one full run each, in this order.
    sizes: Vec<usize>,
    kills: usize,
    idle_secs: u64,
    plumule: PathBuf,
}

impl Options {
    /// `env_sizes` is the value of `PLUMULE_BENCH_N`, which `--workers` overrides.
    fn parse(mut args: impl Iterator<Item = String>, env_sizes: Option<String>) -> Result<Options> {
        let mut sizes = None;
        let mut opts = Options {
            sizes: DEFAULT_SIZES.to_vec(),
            kills: 50,
            idle_secs: 10,
            plumule: PathBuf::from(env!("CARGO_BIN_EXE_plumule")),
        };
        while let Some(arg) = args.next() {
            let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
            match arg.as_str() {
                // `cargo bench` passes `--bench` to every bench binary.
                "--bench" => {}
                "--workers" => sizes = Some(size_list(&arg, &value("--workers")?)?),
                "--kills" => opts.kills = number(&arg, &value("--kills")?)?,
                "--idle-secs" => opts.idle_secs = number(&arg, &value("--idle-secs")?)?,
                "--plumule" => opts.plumule = PathBuf::from(value("--plumule")?),
                "-h" | "--help" => return Err("help".into()),
                other => return Err(format!("unknown argument `{other}`")),
            }
        }
        match (sizes, env_sizes) {
            (Some(s), _) => opts.sizes = s,
            (None, Some(env)) if !env.trim().is_empty() => opts.sizes = size_list(SIZES_VAR, &env)?,
            (None, _) => {}
        }
        Ok(opts)
    }
}

/// "200,2000" → [200, 2000]: each at least 1.
fn size_list(what: &str, s: &str) -> Result<Vec<usize>> {
    let sizes = s
        .split(',')
        .map(|n| number(what, n.trim()))
        .collect::<Result<Vec<usize>>>()?;
    if sizes.contains(&0) {
        return Err(format!(
            "{what} wants worker counts of at least 1, not `{s}`"
        ));
    }
    Ok(sizes)
}

fn number<T: std::str::FromStr>(flag: &str, s: &str) -> Result<T> {
    s.parse()
        .map_err(|_| format!("{flag} wants a whole number, not `{s}`"))
}

// ---------------------------------------------------------------------------------------------
// The supervisor under test.

/// The tiny worker as built for this run: `exe LOG [ID]`.
struct Worker {
    exe: PathBuf,
    log: PathBuf,
}

/// What the measurements need from a supervisor. plumule implements it; a peer can too.
trait Supervisor {
    /// Its name in the table.
    fn name(&self) -> String;
    /// Writes whatever it needs into `dir` (a fresh folder, 0700) to run `n` copies of
    /// `worker`, and returns the command that runs it in the foreground. Each copy must get its
    /// id 0..n, by `PLUMULE_WORKER_ID` or as `worker.exe`'s second argument.
    fn prepare(&self, dir: &Path, worker: &Worker, n: usize) -> Result<Command>;
    /// The processes that do the supervising (memory and idle activity are summed over them),
    /// given the pid of the command that `prepare` returned.
    fn supervision_pids(&self, root: i32) -> Result<Vec<i32>>;
    /// A run at least this long makes the next restart immediate.
    fn healthy_after(&self) -> Duration;
    /// The delay it should apply after a run shorter than `healthy_after`.
    fn backoff_initial(&self) -> Duration;
    /// The signal that asks it to stop every worker and exit.
    fn stop_signal(&self) -> i32 {
        libc::SIGTERM
    }
}

struct Plumule {
    bin: PathBuf,
    healthy_after: Duration,
    backoff_initial: Duration,
}

impl Supervisor for Plumule {
    fn name(&self) -> String {
        "plumule".into()
    }

    fn prepare(&self, dir: &Path, worker: &Worker, n: usize) -> Result<Command> {
        let runtime = dir.join("run");
        let state = dir.join("state");
        for d in [&runtime, &state] {
            fs::create_dir(d).map_err(|e| format!("cannot create {}: {e}", d.display()))?;
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
             healthy_after = \"{healthy}ms\"\n\
             backoff = {{ initial = \"{initial}ms\" }}\n",
            runtime = toml_str(&runtime),
            state = toml_str(&state),
            exe = toml_str(&worker.exe),
            log = toml_str(&worker.log),
            healthy = self.healthy_after.as_millis(),
            initial = self.backoff_initial.as_millis(),
        );
        let path = dir.join("plumule.toml");
        write_file(&path, &config, 0o644)?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("run").arg("-c").arg(&path);
        Ok(cmd)
    }

    /// The master and its fork server (`plumule-spawner`, a child of the master that starts
    /// the workers): both are plumule's cost.
    fn supervision_pids(&self, root: i32) -> Result<Vec<i32>> {
        let children = fs::read_to_string(format!("/proc/{root}/task/{root}/children"))
            .map_err(|e| format!("cannot list the children of {root}: {e}"))?;
        let mut pids = vec![root];
        pids.extend(children.split_whitespace().filter_map(|p| {
            let pid: i32 = p.parse().ok()?;
            let comm = fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            (comm.trim() == "plumule-spawner").then_some(pid)
        }));
        Ok(pids)
    }

    fn healthy_after(&self) -> Duration {
        self.healthy_after
    }

    fn backoff_initial(&self) -> Duration {
        self.backoff_initial
    }
}

fn toml_str(p: &Path) -> String {
    let s = p.to_string_lossy();
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn write_file(path: &Path, text: &str, mode: u32) -> Result<()> {
    fs::write(path, text)
        .and_then(|()| fs::set_permissions(path, fs::Permissions::from_mode(mode)))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// The measurements.

#[derive(Default)]
struct Report {
    /// The number of workers.
    n: usize,
    /// /proc/loadavg's 1, 5 and 15 minute figures just before the supervisor started: other
    /// work on the machine skews every latency.
    load_before: String,
    cold_start: Duration,
    memory: Memory,
    fds: Fds,
    restarts: Vec<Duration>,
    quick_crash: Vec<Duration>,
    idle: Activity,
    idle_window: Duration,
    stop: Duration,
    floor: Floor,
}

/// The same measurements with no supervisor: the bench's own fork+exec loop (see the module
/// docs).
#[derive(Default)]
struct Floor {
    cold_start: Duration,
    restarts: Vec<Duration>,
    /// Of one tiny worker: the least any process costs.
    memory: Memory,
    stop: Duration,
}

/// Builds the worker, starts the supervisor, and measures in an order that keeps each figure
/// clean: memory right after start, restarts, quick crashes, then idle once every backoff has
/// run out, and graceful stop last.
fn run(sup: &dyn Supervisor, opts: &Options, n: usize) -> Result<Report> {
    let dir = tempfile::Builder::new()
        .prefix("plumule-bench.")
        .tempdir()
        .map_err(|e| format!("cannot create a temp dir: {e}"))?;
    let worker = build_worker(dir.path())?;
    let mut report = Report {
        n,
        load_before: fs::read_to_string("/proc/loadavg")
            .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_else(|_| "unknown".into()),
        ..Report::default()
    };

    eprintln!(
        "bench: {n} workers, {} kills, {} s idle",
        opts.kills, opts.idle_secs
    );
    report.floor = floor(dir.path(), &worker, n, opts.kills)?;
    eprintln!(
        "bench: floor (fork+exec loop): cold start {}, restart median {}",
        ms(report.floor.cold_start),
        ms(median(&report.floor.restarts))
    );
    let (mut sv, cold_start) = Running::start(sup, dir.path(), &worker, n)?;
    report.cold_start = cold_start;
    eprintln!("bench: cold start {}", ms(cold_start));

    sv.wait_all_healthy()?;
    report.memory = memory(&sv.supervision)?;
    report.fds = fds(&sv.supervision)?;

    for k in 0..opts.kills {
        report.restarts.push(sv.restart(k % n)?.0);
    }
    if !report.restarts.is_empty() {
        eprintln!("bench: restart median {}", ms(median(&report.restarts)));
    }

    for t in 0..QUICK_CRASH_TRIALS {
        let id = (opts.kills + t) % n;
        let (_, pid) = sv.restart(id)?;
        // The replacement has run for well under `healthy_after`: a quick crash.
        report.quick_crash.push(sv.kill_and_wait(id, pid)?);
    }
    eprintln!(
        "bench: quick-crash restart median {}",
        ms(median(&report.quick_crash))
    );

    // Let every backoff and healthy_after deadline pass before counting idle wake-ups.
    sv.wait_all_healthy()?;
    std::thread::sleep(Duration::from_secs(1));
    report.idle_window = Duration::from_secs(opts.idle_secs);
    report.idle = sv.idle(report.idle_window)?;
    eprintln!("bench: idle {} context switches", report.idle.ctx_switches);

    report.stop = sv.graceful_stop()?;
    eprintln!("bench: graceful stop {}", ms(report.stop));
    Ok(report)
}

/// Measures the floor: the bench starts `n` tiny workers itself (fork+exec, one after the
/// other), restarts `kills` of them after SIGKILL (waitpid, then fork+exec), and stops them all
/// (SIGTERM to each, then waitpid for each). Times come from the workers' own start stamps, as
/// for the supervisor.
fn floor(dir: &Path, worker: &Worker, n: usize, kills: usize) -> Result<Floor> {
    let log_path = dir.join("floor.log");
    write_file(&log_path, "", 0o644)?;
    let mut fleet = Fleet {
        exe: sys::cstring(worker.exe.as_os_str())?,
        log: sys::cstring(log_path.as_os_str())?,
        pids: Vec::with_capacity(n),
    };
    let mut log = WorkerLog::open(&log_path, n)?;
    let mut floor = Floor::default();

    let t0 = sys::mono_ns();
    for id in 0..n {
        let pid = fleet.spawn(id)?;
        fleet.pids.push(pid);
    }
    wait_floor(&mut log, COLD_START_DEADLINE, |l| l.started() == n)?;
    let last = log.first.iter().flatten().max().copied().unwrap_or(t0);
    floor.cold_start = Duration::from_nanos(last.saturating_sub(t0));
    floor.memory = memory(&fleet.pids[..1])?;

    for k in 0..kills {
        let id = k % n;
        let seen = log.starts_of(id);
        let t_kill = sys::mono_ns();
        let old = fleet.pids[id];
        sys::kill(old, libc::SIGKILL).map_err(|e| format!("kill -KILL {old}: {e}"))?;
        sys::waitpid(old).map_err(|e| format!("waitpid({old}): {e}"))?;
        fleet.pids[id] = fleet.spawn(id)?;
        wait_floor(&mut log, RESTART_DEADLINE, |l| l.starts_of(id) > seen)?;
        let ns = log.latest(id).map_or(0, |s| s.ns);
        floor
            .restarts
            .push(Duration::from_nanos(ns.saturating_sub(t_kill)));
    }

    let t0 = sys::mono_ns();
    for &pid in &fleet.pids {
        sys::kill(pid, libc::SIGTERM).map_err(|e| format!("kill -TERM {pid}: {e}"))?;
    }
    for pid in std::mem::take(&mut fleet.pids) {
        sys::waitpid(pid).map_err(|e| format!("waitpid({pid}): {e}"))?;
    }
    floor.stop = Duration::from_nanos(sys::mono_ns() - t0);
    Ok(floor)
}

/// The tiny workers the bench runs itself for the floor; dropping it kills and reaps those
/// still running.
struct Fleet {
    exe: std::ffi::CString,
    log: std::ffi::CString,
    pids: Vec<i32>,
}

impl Fleet {
    fn spawn(&self, id: usize) -> Result<i32> {
        let id = sys::cstring(id.to_string().as_ref())?;
        sys::fork_exec(&[&self.exe, &self.log, &id]).map_err(|e| format!("fork+exec: {e}"))
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for &pid in &self.pids {
            let _ = sys::kill(pid, libc::SIGKILL);
        }
        for &pid in &self.pids {
            let _ = sys::waitpid(pid);
        }
    }
}

/// Waits (on inotify, up to `timeout`) until `done` holds for the floor's worker log.
fn wait_floor(
    log: &mut WorkerLog,
    timeout: Duration,
    done: impl Fn(&WorkerLog) -> bool,
) -> Result<()> {
    let deadline = sys::mono_ns() + timeout.as_nanos() as u64;
    loop {
        log.refresh()?;
        if done(log) {
            return Ok(());
        }
        let now = sys::mono_ns();
        if now >= deadline {
            return Err(format!(
                "the floor's own workers: only {} had started within {timeout:?}",
                log.started()
            ));
        }
        if sys::poll(&[log.inotify.as_fd()], Duration::from_nanos(deadline - now))
            .map_err(|e| format!("poll: {e}"))?[0]
        {
            sys::drain(log.inotify.as_fd());
        }
    }
}

/// Compiles `tiny_worker.c` with `$CC` (default `cc`) `-O2` into `dir`.
fn build_worker(dir: &Path) -> Result<Worker> {
    let src = dir.join("tiny_worker.c");
    write_file(&src, include_str!("tiny_worker.c"), 0o644)?;
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
    let log = dir.join("workers.log");
    write_file(&log, "", 0o644)?;
    Ok(Worker { exe, log })
}

/// A running supervisor and what the bench knows about it. Dropping it before a graceful stop
/// SIGKILLs the supervisor and every tiny worker.
struct Running<'a> {
    sup: &'a dyn Supervisor,
    child: Child,
    root: i32,
    /// Readable once `root` has exited.
    pidfd: OwnedFd,
    supervision: Vec<i32>,
    log: WorkerLog,
    worker_exe: PathBuf,
    stderr: PathBuf,
    n: usize,
    /// Set once the supervisor has exited and been reaped.
    done: bool,
}

impl<'a> Running<'a> {
    /// Spawns the supervisor and waits until all `n` workers have started. Also returns the
    /// cold start: from just before the spawn to the latest first start logged by a worker.
    fn start(
        sup: &'a dyn Supervisor,
        dir: &Path,
        worker: &Worker,
        n: usize,
    ) -> Result<(Running<'a>, Duration)> {
        let log = WorkerLog::open(&worker.log, n)?;
        let mut cmd = sup.prepare(dir, worker, n)?;
        let stderr = dir.join("supervisor.stderr");
        let stderr_file = File::create(&stderr)
            .map_err(|e| format!("cannot create {}: {e}", stderr.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr_file);
        sys::die_with_parent(&mut cmd);

        let t0 = sys::mono_ns();
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {} ({cmd:?}): {e}", sup.name()))?;
        let root = child.id() as i32;
        let pidfd = match sys::pidfd_open(root) {
            Ok(fd) => fd,
            Err(e) => {
                let _ = sys::kill(root, libc::SIGKILL);
                return Err(format!("pidfd_open({root}): {e}"));
            }
        };
        let mut sv = Running {
            sup,
            child,
            root,
            pidfd,
            supervision: vec![root],
            log,
            worker_exe: worker.exe.clone(),
            stderr,
            n,
            done: false,
        };

        let all_started = |log: &WorkerLog| (log.started() == n).then_some(());
        sv.wait_log(COLD_START_DEADLINE, all_started, |log| {
            format!("only {} of {n} workers had started", log.started())
        })?;
        let last = sv.log.first.iter().flatten().max().copied().unwrap_or(t0);
        sv.supervision = sup.supervision_pids(root)?;
        Ok((sv, Duration::from_nanos(last.saturating_sub(t0))))
    }

    /// Waits until `found` sees what it looks for in the worker log, sleeping on inotify between
    /// looks. Fails with `missing` (what never happened) when `timeout` passes, or at once if
    /// the supervisor exits.
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
                return Err(format!("{} within {timeout:?}", missing(&self.log)));
            }
            let ready = sys::poll(
                &[self.log.inotify.as_fd(), self.pidfd.as_fd()],
                Duration::from_nanos(deadline - now),
            )
            .map_err(|e| format!("poll: {e}"))?;
            if ready[1] {
                self.log.refresh()?;
                let status = self.reap();
                return Err(format!(
                    "{}: {} exited first ({status}){}",
                    missing(&self.log),
                    self.sup.name(),
                    self.stderr_tail()
                ));
            }
            if ready[0] {
                sys::drain(self.log.inotify.as_fd());
            }
        }
    }

    /// Sleeps until every worker's current run has lasted at least `healthy_after`.
    fn wait_all_healthy(&mut self) -> Result<()> {
        self.log.refresh()?;
        let latest = (0..self.n)
            .map(|id| self.log.latest(id).map_or(0, |s| s.ns))
            .max();
        self.sleep_until_healthy(latest.unwrap_or(0));
        Ok(())
    }

    fn sleep_until_healthy(&self, started_ns: u64) {
        let ready = started_ns + (self.sup.healthy_after() + MARGIN).as_nanos() as u64;
        let now = sys::mono_ns();
        if ready > now {
            std::thread::sleep(Duration::from_nanos(ready - now));
        }
    }

    /// Waits until worker `id` has run for `healthy_after`, SIGKILLs it, and returns the
    /// restart latency and the replacement's pid.
    fn restart(&mut self, id: usize) -> Result<(Duration, i32)> {
        let current = self
            .log
            .latest(id)
            .ok_or(format!("worker {id} never started"))?;
        self.sleep_until_healthy(current.ns);
        let latency = self.kill_and_wait(id, current.pid)?;
        let pid = self.log.latest(id).map_or(0, |s| s.pid);
        Ok((latency, pid))
    }

    /// SIGKILLs `pid` (worker `id`) and waits for a new start of `id`: returns from just before
    /// the kill to the time the replacement logged.
    fn kill_and_wait(&mut self, id: usize, pid: i32) -> Result<Duration> {
        let seen = self.log.starts_of(id);
        let t_kill = sys::mono_ns();
        sys::kill(pid, libc::SIGKILL)
            .map_err(|e| format!("kill -KILL {pid} (worker {id}): {e}"))?;
        let replaced = |log: &WorkerLog| {
            (log.starts_of(id) > seen).then(|| log.latest(id).map_or(0, |s| s.ns))
        };
        let ns = self.wait_log(RESTART_DEADLINE, replaced, |_| {
            format!("worker {id} was not restarted after SIGKILL of its pid {pid}")
        })?;
        Ok(Duration::from_nanos(ns.saturating_sub(t_kill)))
    }

    /// Context switches and CPU ticks of the supervision processes over `window`.
    fn idle(&mut self, window: Duration) -> Result<Activity> {
        let before = activity(&self.supervision)?;
        std::thread::sleep(window);
        let after = activity(&self.supervision)?;
        Ok(Activity {
            ctx_switches: after.ctx_switches.saturating_sub(before.ctx_switches),
            cpu_ticks: after.cpu_ticks.saturating_sub(before.cpu_ticks),
        })
    }

    /// Sends the stop signal and waits until the supervisor has exited and no pid of a current
    /// worker exists any more. Returns the time from just before the signal.
    fn graceful_stop(&mut self) -> Result<Duration> {
        self.log.refresh()?;
        let mut workers = Vec::with_capacity(self.n);
        for id in 0..self.n {
            let s = self
                .log
                .latest(id)
                .ok_or(format!("worker {id} never started"))?;
            if !pid_exists(s.pid) {
                return Err(format!(
                    "worker {id} (pid {}) was not running before the stop",
                    s.pid
                ));
            }
            workers.push(s.pid);
        }
        let name = self.sup.name();
        let sig = self.sup.stop_signal();
        let deadline = STOP_DEADLINE.as_nanos() as u64;

        let t0 = sys::mono_ns();
        sys::kill(self.root, sig).map_err(|e| format!("kill -{sig} {}: {e}", self.root))?;
        let ready =
            sys::poll(&[self.pidfd.as_fd()], STOP_DEADLINE).map_err(|e| format!("poll: {e}"))?;
        if !ready[0] {
            return Err(format!(
                "{name} had not exited {STOP_DEADLINE:?} after signal {sig}{}",
                self.stderr_tail()
            ));
        }
        loop {
            workers.retain(|&pid| pid_exists(pid));
            let now = sys::mono_ns();
            if workers.is_empty() {
                let status = self.reap();
                if !status.success() {
                    return Err(format!(
                        "{name} exited with {status} after signal {sig}, not 0{}",
                        self.stderr_tail()
                    ));
                }
                return Ok(Duration::from_nanos(now - t0));
            }
            if now - t0 > deadline {
                return Err(format!(
                    "{} worker(s) (e.g. pid {}) still existed {STOP_DEADLINE:?} after signal \
                     {sig} to {name}, which had exited",
                    workers.len(),
                    workers[0]
                ));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Waits for the exited supervisor (it is our child) and frees its pid.
    fn reap(&mut self) -> ExitStatus {
        self.done = true;
        self.child.wait().unwrap_or_else(|_| ExitStatus::default())
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

impl Drop for Running<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        eprintln!(
            "bench: killing {} (pid {}) and its workers",
            self.sup.name(),
            self.root
        );
        for &pid in &self.supervision {
            let _ = sys::kill(pid, libc::SIGKILL);
        }
        let _ = sys::kill(self.root, libc::SIGKILL);
        let _ = self.child.wait();
        // Every process running our tiny worker, logged or not: its path is unique to this run.
        for pid in pids_running(&self.worker_exe) {
            let _ = sys::kill(pid, libc::SIGKILL);
        }
    }
}

/// The tiny workers' log: every start, in order.
struct WorkerLog {
    file: File,
    inotify: OwnedFd,
    partial: Vec<u8>,
    n: usize,
    /// Per worker id: the monotonic time of its first start.
    first: Vec<Option<u64>>,
    /// Per worker id: its starts so far and the latest one.
    latest: Vec<(usize, Option<Start>)>,
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
            file,
            inotify,
            partial: Vec::new(),
            n,
            first: vec![None; n],
            latest: vec![(0, None); n],
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
                .filter(|&(id, _)| id < self.n)
                .ok_or(format!("bad line in the worker log: `{line}`"))?;
            self.first[id].get_or_insert(start.ns);
            self.latest[id].0 += 1;
            self.latest[id].1 = Some(start);
        }
        Ok(())
    }

    /// How many distinct workers have started at least once.
    fn started(&self) -> usize {
        self.first.iter().flatten().count()
    }

    fn starts_of(&self, id: usize) -> usize {
        self.latest[id].0
    }

    fn latest(&self, id: usize) -> Option<Start> {
        self.latest[id].1
    }
}

fn parse_start(line: &str) -> Option<(usize, Start)> {
    let mut f = line.split(' ');
    let id = f.next()?.parse().ok()?;
    let pid = f.next()?.parse().ok()?;
    let ns = f.next()?.parse().ok()?;
    f.next().is_none().then_some((id, Start { pid, ns }))
}

// ---------------------------------------------------------------------------------------------
// /proc readings.

#[derive(Default)]
struct Memory {
    rss_kib: u64,
    pss_kib: u64,
}

/// Open descriptors, summed over the supervision processes, and the largest soft
/// RLIMIT_NOFILE among them.
#[derive(Default)]
struct Fds {
    open: u64,
    soft_limit: String,
}

#[derive(Default)]
struct Activity {
    ctx_switches: u64,
    cpu_ticks: u64,
}

/// VmRSS (/proc/PID/status) of the first of `pids` (the master), and the sum of Pss
/// (/proc/PID/smaps_rollup) over all: a sum of RSS would count the pages they share twice,
/// Pss shares each page out among them.
fn memory(pids: &[i32]) -> Result<Memory> {
    let mut m = Memory::default();
    if let Some(&master) = pids.first() {
        m.rss_kib = proc_field(master, "status", "VmRSS:")?;
    }
    for &pid in pids {
        m.pss_kib += proc_field(pid, "smaps_rollup", "Pss:")?;
    }
    Ok(m)
}

/// The entries of /proc/PID/fd and the "Max open files" soft limit of /proc/PID/limits.
fn fds(pids: &[i32]) -> Result<Fds> {
    let mut f = Fds::default();
    let mut limit: Option<u64> = None;
    for &pid in pids {
        let path = format!("/proc/{pid}/fd");
        let dir = fs::read_dir(&path).map_err(|e| format!("cannot read {path}: {e}"))?;
        f.open += dir.count() as u64;
        let path = format!("/proc/{pid}/limits");
        let text = fs::read_to_string(&path).map_err(|e| format!("cannot read {path}: {e}"))?;
        let soft = text
            .lines()
            .find_map(|l| l.strip_prefix("Max open files"))
            .and_then(|v| v.split_whitespace().next())
            .ok_or(format!("no `Max open files` in {path}"))?;
        match soft.parse::<u64>() {
            Ok(v) => limit = Some(limit.map_or(v, |l| l.max(v))),
            // "unlimited"
            Err(_) => f.soft_limit = soft.to_string(),
        }
    }
    if f.soft_limit.is_empty() {
        f.soft_limit = limit.map_or("unknown".into(), |l| l.to_string());
    }
    Ok(f)
}

/// Sum of voluntary + nonvoluntary context switches and utime + stime over `pids`.
fn activity(pids: &[i32]) -> Result<Activity> {
    let mut a = Activity::default();
    for &pid in pids {
        a.ctx_switches += proc_field(pid, "status", "voluntary_ctxt_switches:")?;
        a.ctx_switches += proc_field(pid, "status", "nonvoluntary_ctxt_switches:")?;
        let path = format!("/proc/{pid}/stat");
        let stat = fs::read_to_string(&path).map_err(|e| format!("cannot read {path}: {e}"))?;
        // Fields after the parenthesised command name start at field 3 (state); utime and
        // stime are fields 14 and 15.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| fields.get(i - 3).and_then(|f| f.parse::<u64>().ok());
        match (ticks(14), ticks(15)) {
            (Some(u), Some(s)) => a.cpu_ticks += u + s,
            _ => return Err(format!("cannot parse utime/stime in {path}")),
        }
    }
    Ok(a)
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

fn pid_exists(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Every process whose executable is `exe`.
fn pids_running(exe: &Path) -> Vec<i32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|p| p == exe))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The table.

/// The goals of issue 2 at one worker count.
struct Goals {
    cold: &'static str,
    restart: &'static str,
    rss: &'static str,
    pss: &'static str,
    stop: &'static str,
}

fn goals(n: usize) -> (Goals, &'static str) {
    let at200 = Goals {
        cold: "≤ 100 ms",
        restart: "≤ 1 ms",
        rss: "≤ 4 MiB",
        pss: "≤ 2 MiB",
        stop: "≤ 60 ms",
    };
    match n {
        200 => (at200, ""),
        50 => (
            Goals {
                cold: "≤ 25 ms",
                rss: "≤ 4 MiB (at 200)",
                pss: "≤ 2 MiB (at 200)",
                stop: "≤ 30 ms",
                ..at200
            },
            "",
        ),
        // At 2000 the goals are relative to 200 (see the growth table).
        2000 => (
            Goals {
                cold: "≤ 1 s (linear from 200)",
                restart: "≤ 1.2 × the median at 200",
                rss: "",
                pss: "",
                stop: "",
            },
            "",
        ),
        _ => (at200, " (goals are the figures at N = 200)"),
    }
}

/// What the baseline column holds, printed under each table.
const BASELINE_NOTE: &str = "baseline: measured in this run with no supervisor: the bench \
                             itself fork+execs the same N tiny workers one after the other, \
                             restarts a SIGKILLed one with waitpid then fork+exec, and stops \
                             them with SIGTERM and waitpid; memory is one idle tiny worker \
                             (the least a process costs); idle is 0";

/// What every table shares: the date, machine, binary and the settings of every run.
fn header(sup: &dyn Supervisor, opts: &Options) -> String {
    let sizes: Vec<String> = opts.sizes.iter().map(usize::to_string).collect();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n{} supervisor benchmark, {} UTC",
        sup.name(),
        today()
    );
    let _ = writeln!(out, "machine: {}", machine());
    let _ = writeln!(
        out,
        "binary: {}{}",
        opts.plumule.display(),
        source_of(&opts.plumule)
    );
    let _ = writeln!(
        out,
        "runs: N = {} tiny workers, {} kills, {} s idle, healthy_after {}, backoff.initial {}",
        sizes.join(", then "),
        opts.kills,
        opts.idle_secs,
        ms(sup.healthy_after()),
        ms(sup.backoff_initial()),
    );
    out
}

impl Report {
    /// The table of one run, beside the goals at its N and the baseline of the same run.
    fn render(&self, sup: &dyn Supervisor) -> String {
        let n = self.n;
        let (r, note) = goals(n);
        let f = &self.floor;
        let mut rows: Vec<Vec<String>> = Vec::new();
        let mut row = |m: String, v: String, g: &str, p: &str| {
            rows.push(vec![m, v, g.into(), p.into()]);
        };
        row(
            format!("cold start, all {n} exec'd"),
            ms(self.cold_start),
            r.cold,
            &ms(f.cold_start),
        );
        if !self.restarts.is_empty() {
            let k = self.restarts.len();
            row(
                format!("restart after SIGKILL, median of {k}"),
                ms(median(&self.restarts)),
                r.restart,
                &ms(median(&f.restarts)),
            );
            row(
                format!("restart after SIGKILL, p90 of {k}"),
                ms(percentile(&self.restarts, 90)),
                "",
                &ms(percentile(&f.restarts, 90)),
            );
        }
        row(
            format!(
                "second restart right after the first, median of {}",
                self.quick_crash.len()
            ),
            ms(median(&self.quick_crash)),
            &format!("= backoff.initial ({})", ms(sup.backoff_initial())),
            &format!(
                "{} (backoff.initial + restart)",
                ms(sup.backoff_initial() + median(&f.restarts))
            ),
        );
        row(
            "master RSS after start".into(),
            mib(self.memory.rss_kib),
            r.rss,
            &mib(f.memory.rss_kib),
        );
        row(
            "master + fork server PSS".into(),
            mib(self.memory.pss_kib),
            r.pss,
            &mib(f.memory.pss_kib),
        );
        row(
            "master + fork server open fds (soft limit)".into(),
            format!("{} ({})", self.fds.open, self.fds.soft_limit),
            "",
            "",
        );
        let s = self.idle_window.as_secs();
        row(
            format!("idle: context switches in {s} s"),
            self.idle.ctx_switches.to_string(),
            "0",
            "0",
        );
        row(
            format!("idle: CPU ticks (utime+stime) in {s} s"),
            self.idle.cpu_ticks.to_string(),
            "0",
            "0",
        );
        row(
            format!("graceful stop, all {n} gone"),
            ms(self.stop),
            r.stop,
            &ms(f.stop),
        );

        let mut out = String::new();
        let _ = writeln!(out, "\nN = {n}{note}");
        let _ = writeln!(out, "load average before the run: {}", self.load_before);
        let q: Vec<String> = self.quick_crash.iter().map(|d| ms(*d)).collect();
        let _ = writeln!(out, "quick-crash trials: {}\n", q.join(", "));
        let head = vec![
            "metric".to_string(),
            sup.name(),
            "goal".into(),
            "baseline".into(),
        ];
        out.push_str(&table(&head, &rows));
        let _ = writeln!(out, "{BASELINE_NOTE}");
        out
    }
}

/// How a figure is expected to grow with N, and so how the growth table compares it.
enum Growth {
    /// Proportional to N: shown as the figure ÷ (the first figure × the ratio of the Ns).
    Linear(fn(&Report) -> f64),
    /// Ideally flat: shown as the figure ÷ the first figure.
    Flat(fn(&Report) -> f64),
    /// A fixed cost plus so much per worker: shown as the added amount per added worker.
    PerWorker(fn(&Report) -> f64, &'static str),
    /// Not compared.
    Not,
}

/// One row of the growth table.
struct Metric {
    name: &'static str,
    show: fn(&Report) -> String,
    growth: Growth,
    goal: &'static str,
}

/// The figures of every run side by side, and how each grew from the first run's N to each
/// other's: the ratios issue 2 sets goals for.
fn growth(sup: &dyn Supervisor, reports: &[Report]) -> String {
    let mut metrics = vec![Metric {
        name: "cold start, all exec'd",
        show: |r| ms(r.cold_start),
        growth: Growth::Linear(|r| r.cold_start.as_secs_f64()),
        goal: "≈ 1 × linear",
    }];
    if reports.iter().all(|r| !r.restarts.is_empty()) {
        metrics.push(Metric {
            name: "restart after SIGKILL, median",
            show: |r| ms(median(&r.restarts)),
            growth: Growth::Flat(|r| median(&r.restarts).as_secs_f64()),
            goal: "≤ 1.2 ×",
        });
        metrics.push(Metric {
            name: "restart after SIGKILL, p90",
            show: |r| ms(percentile(&r.restarts, 90)),
            growth: Growth::Flat(|r| percentile(&r.restarts, 90).as_secs_f64()),
            goal: "",
        });
    }
    metrics.extend([
        Metric {
            name: "second restart right after the first, median",
            show: |r| ms(median(&r.quick_crash)),
            growth: Growth::Flat(|r| median(&r.quick_crash).as_secs_f64()),
            goal: "≈ 1 × (= backoff.initial)",
        },
        Metric {
            name: "master RSS after start",
            show: |r| mib(r.memory.rss_kib),
            growth: Growth::PerWorker(|r| r.memory.rss_kib as f64, "KiB"),
            goal: "",
        },
        Metric {
            name: "master + fork server PSS",
            show: |r| mib(r.memory.pss_kib),
            growth: Growth::PerWorker(|r| r.memory.pss_kib as f64, "KiB"),
            goal: "",
        },
        Metric {
            name: "master + fork server open fds",
            show: |r| r.fds.open.to_string(),
            growth: Growth::PerWorker(|r| r.fds.open as f64, "fds"),
            goal: "",
        },
        Metric {
            name: "idle: context switches",
            show: |r| r.idle.ctx_switches.to_string(),
            growth: Growth::Not,
            goal: "0 at every N",
        },
        Metric {
            name: "idle: CPU ticks (utime+stime)",
            show: |r| r.idle.cpu_ticks.to_string(),
            growth: Growth::Not,
            goal: "0 at every N",
        },
        Metric {
            name: "graceful stop, all gone",
            show: |r| ms(r.stop),
            growth: Growth::Linear(|r| r.stop.as_secs_f64()),
            goal: "",
        },
    ]);

    let base = &reports[0];
    let others = &reports[1..];
    let mut head = vec!["metric".to_string()];
    head.extend(reports.iter().map(|r| format!("N = {}", r.n)));
    head.extend(others.iter().map(|r| format!("{} vs {}", r.n, base.n)));
    head.push("goal".into());
    let rows: Vec<Vec<String>> = metrics
        .iter()
        .map(|m| {
            let mut cells = vec![m.name.to_string()];
            cells.extend(reports.iter().map(m.show));
            cells.extend(others.iter().map(|r| grown(&m.growth, base, r)));
            cells.push(m.goal.into());
            cells
        })
        .collect();

    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nhow {} grows with N (linear: the figure ÷ (the figure at {} × the ratio of the Ns))\n",
        sup.name(),
        base.n
    );
    out.push_str(&table(&head, &rows));
    out
}

/// The growth cell of `m` from `base` to `r`.
fn grown(g: &Growth, base: &Report, r: &Report) -> String {
    let scale = r.n as f64 / base.n as f64;
    let ratio = |a: f64, b: f64| {
        if a > 0.0 {
            format!("{:.2} ×", b / a)
        } else {
            "—".into()
        }
    };
    match g {
        Growth::Linear(f) => ratio(f(base) * scale, f(r)) + " linear",
        Growth::Flat(f) => ratio(f(base), f(r)),
        Growth::PerWorker(f, unit) => {
            let added = r.n as f64 - base.n as f64;
            if added == 0.0 {
                return "—".into();
            }
            format!("{:+.2} {unit} per worker", (f(r) - f(base)) / added)
        }
        Growth::Not => String::new(),
    }
}

/// " (built from git COMMIT)" when `bin` is this crate's own binary and git knows the commit.
fn source_of(bin: &Path) -> String {
    if bin != Path::new(env!("CARGO_BIN_EXE_plumule")) {
        return String::new();
    }
    let commit = Command::new("git")
        .args([
            "-C",
            env!("CARGO_MANIFEST_DIR"),
            "rev-parse",
            "--short",
            "HEAD",
        ])
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    commit.map_or(String::new(), |c| format!(" (built from git {c})"))
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

/// Nearest-rank percentile.
fn percentile(v: &[Duration], p: usize) -> Duration {
    let mut s = v.to_vec();
    s.sort();
    if s.is_empty() {
        return Duration::ZERO;
    }
    let rank = (p * s.len()).div_ceil(100).max(1);
    s[rank - 1]
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

/// Every libc call and every `unsafe` block of the bench.
mod sys {
    use super::*;

    pub use crate::common::sys::*;

    /// `s` as a C string, for exec.
    pub fn cstring(s: &std::ffi::OsStr) -> Result<std::ffi::CString> {
        use std::os::unix::ffi::OsStrExt;
        std::ffi::CString::new(s.as_bytes()).map_err(|_| format!("{s:?} holds a NUL byte"))
    }

    /// fork, then in the child execv(`argv[0]`, `argv`) with the bench's environment: the
    /// least a supervisor does to start a worker. The child dies with the bench (SIGKILL).
    pub fn fork_exec(argv: &[&std::ffi::CString]) -> io::Result<i32> {
        let mut ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
        ptrs.push(std::ptr::null());
        // SAFETY: the bench is single-threaded, and the child only calls prctl, execv and
        // _exit, which are async-signal-safe; `ptrs` is a NULL-terminated array of pointers to
        // C strings that outlive the call (the child's copy of them lives until its exec).
        let pid = unsafe { libc::fork() };
        match pid {
            -1 => Err(io::Error::last_os_error()),
            0 => {
                // SAFETY: see above; the child never returns from this block.
                unsafe {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    libc::execv(ptrs[0], ptrs.as_ptr());
                    libc::_exit(127)
                }
            }
            pid => Ok(pid),
        }
    }

    /// Waits for the child `pid` to end and reaps it.
    pub fn waitpid(pid: i32) -> io::Result<()> {
        let mut status = 0;
        loop {
            // SAFETY: `status` is a valid, writable int for the duration of the call.
            if unsafe { libc::waitpid(pid, &mut status, 0) } == pid {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}
