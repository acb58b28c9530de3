//! Harness for the integration tests: runs the real `plumule` binary in a fresh temp dir with a
//! generated config and tiny worker scripts, and observes it from outside (files the workers
//! write, the master's stderr, /proc).
//!
//! Rules it keeps:
//! - every wait goes through [`wait_for`], which polls a condition until a deadline and panics
//!   naming what never happened; nothing synchronises with a fixed sleep;
//! - nothing leaks: a [`Daemon`] SIGKILLs its master on drop, and a [`Sandbox`] SIGKILLs, on
//!   drop, every process still carrying its marker environment variable (workers, grandchildren,
//!   orphans a killed master left behind);
//! - the test process plays init: it is a child subreaper and reaps the orphans it adopts (the
//!   machine's pid 1 may not reap), so "gone" means gone, and a zombie never counts as alive.

#![allow(dead_code)] // each test binary uses a different part of the harness

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use plumule::protocol::{Request, Response, StatusReport, WorkerStatus};

#[allow(unused_imports)] // not every test binary sends every signal
pub use nix::sys::signal::Signal::{SIGINT, SIGKILL, SIGTERM, SIGUSR1};

/// The master binary under test.
pub const PLUMULE: &str = env!("CARGO_BIN_EXE_plumule");

/// Environment variable set on every master a sandbox starts; workers inherit it, which is how
/// the sandbox finds what to kill when a test ends.
const MARKER: &str = "PLUMULE_TEST_SANDBOX";

/// How often [`wait_for`] re-checks its condition. The harness polls; the product must not.
const POLL_INTERVAL: Duration = Duration::from_millis(5);

/// The most a test may spend waiting, all its waits together, counted from `Sandbox::new`: the
/// waits of a sandbox and its daemons are cut short when it is spent.
pub const TEST_BUDGET: Duration = Duration::from_secs(20);

/// Upper bound for anything that should happen promptly in a test (a start, a stop, an answer).
pub const DEADLINE: Duration = Duration::from_secs(10);

/// `deadline`, shortened to what is left until `budget_end`.
fn within_budget(deadline: Duration, budget_end: Instant) -> Duration {
    deadline.min(budget_end.saturating_duration_since(Instant::now()))
}

/// Polls `cond` until it holds; panics saying `what` never happened if `deadline` passes first.
/// While waiting it reaps the orphans the test process adopted.
#[track_caller]
pub fn wait_for(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
    wait_or_abort(what, deadline, || Ok(cond()));
}

/// [`wait_for`] whose condition may also give up at once, with the reason (`Err`).
#[track_caller]
pub fn wait_or_abort(
    what: &str,
    deadline: Duration,
    mut cond: impl FnMut() -> Result<bool, String>,
) {
    let give_up = Instant::now() + deadline;
    loop {
        reap_adopted_orphans();
        match cond() {
            Ok(true) => return,
            Ok(false) => {}
            Err(why) => panic!("{why} while waiting until {what}"),
        }
        if Instant::now() >= give_up {
            panic!("timed out after {deadline:?} waiting until {what}");
        }
        std::thread::sleep(POLL_INTERVAL); // poll interval of wait_for, not synchronisation
    }
}

// ---------------------------------------------------------------------------------------------
// Children of the test process and adopted orphans

/// Pids of the children this process spawned itself (masters, one-shot commands): the orphan
/// reaper must leave them to `Child::wait`. Locked across `spawn` so that a child cannot exit
/// and be mistaken for an orphan before it is registered.
static OWN_CHILDREN: Mutex<Option<HashSet<i32>>> = Mutex::new(None);
static SUBREAPER: Once = Once::new();

fn become_subreaper() {
    SUBREAPER.call_once(|| {
        nix::sys::prctl::set_child_subreaper(true).expect("PR_SET_CHILD_SUBREAPER");
    });
}

fn spawn_registered(cmd: &mut Command) -> Child {
    become_subreaper();
    let mut own = OWN_CHILDREN.lock().unwrap_or_else(|e| e.into_inner());
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn {cmd:?}: {e}"));
    own.get_or_insert_with(HashSet::new)
        .insert(child.id() as i32);
    child
}

fn forget_child(pid: u32) {
    let mut own = OWN_CHILDREN.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(set) = own.as_mut() {
        set.remove(&(pid as i32));
    }
}

/// Reaps zombies whose parent is this process and which it did not spawn itself: orphans of
/// workers or of a killed master, adopted because this process is a subreaper. Those live in
/// the process groups of masters or workers; a zombie in this process's own group is a child a
/// test spawned with a plain `Command` (promtool, a client) and is left for that test's `wait`,
/// which would otherwise fail with ECHILD when this runs on another thread at the wrong time.
pub fn reap_adopted_orphans() {
    let me = std::process::id() as i32;
    let my_group = nix::unistd::getpgrp().as_raw();
    let own = OWN_CHILDREN.lock().unwrap_or_else(|e| e.into_inner());
    for p in processes() {
        if p.ppid == me
            && p.state == 'Z'
            && p.pgrp != my_group
            && !own.as_ref().is_some_and(|s| s.contains(&p.pid))
        {
            let _ = waitpid(Pid::from_raw(p.pid), Some(WaitPidFlag::WNOHANG));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// /proc

/// One line of /proc/PID/stat, the fields the tests need.
#[derive(Debug, Clone)]
pub struct ProcStat {
    pub pid: i32,
    pub comm: String,
    pub state: char,
    pub ppid: i32,
    pub pgrp: i32,
}

pub fn proc_stat(pid: i32) -> Option<ProcStat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm may hold spaces and parentheses: it ends at the last ')'.
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let mut rest = text[close + 1..].split_whitespace();
    let state = rest.next()?.chars().next()?;
    let ppid = rest.next()?.parse().ok()?;
    let pgrp = rest.next()?.parse().ok()?;
    Some(ProcStat {
        pid,
        comm: text[open + 1..close].to_string(),
        state,
        ppid,
        pgrp,
    })
}

/// Every process visible in /proc (a snapshot; processes come and go while it is taken).
pub fn processes() -> Vec<ProcStat> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(proc_stat)
        .collect()
}

/// The process exists and is not a zombie.
pub fn pid_alive(pid: i32) -> bool {
    proc_stat(pid).is_some_and(|p| p.state != 'Z')
}

/// /proc/PID exists at all (a zombie included): false once its parent has reaped it.
pub fn pid_exists(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Zombies whose parent is `parent`.
pub fn zombie_children(parent: i32) -> Vec<ProcStat> {
    processes()
        .into_iter()
        .filter(|p| p.ppid == parent && p.state == 'Z')
        .collect()
}

/// Live (non-zombie) children of `parent`.
pub fn live_children(parent: i32) -> Vec<ProcStat> {
    processes()
        .into_iter()
        .filter(|p| p.ppid == parent && p.state != 'Z')
        .collect()
}

/// Live (non-zombie) members of process group `pgrp`.
pub fn group_members(pgrp: i32) -> Vec<ProcStat> {
    processes()
        .into_iter()
        .filter(|p| p.pgrp == pgrp && p.state != 'Z')
        .collect()
}

fn carries_marker(pid: i32, marker: &str) -> bool {
    let Ok(env) = fs::read(format!("/proc/{pid}/environ")) else {
        return false;
    };
    env.split(|b| *b == 0).any(|var| var == marker.as_bytes())
}

#[track_caller]
pub fn send(pid: i32, sig: Signal) {
    kill(Pid::from_raw(pid), sig).unwrap_or_else(|e| panic!("cannot send {sig} to {pid}: {e}"));
}

// ---------------------------------------------------------------------------------------------
// Sandbox: temp dir, config, scripts

/// One line a worker script appends when it starts: `PROGRAM ID WORKERS PID [TIME]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Start {
    pub program: String,
    pub id: u32,
    pub workers: u32,
    pub pid: i32,
    /// Seconds since the epoch, when the script wrote it (see [`Sandbox::timed_worker`]).
    pub time: Option<f64>,
}

/// A fresh temp dir holding a config, worker scripts and everything they write.
pub struct Sandbox {
    dir: tempfile::TempDir,
    spawned: AtomicUsize,
    /// Every `plumule` started here, so that a wait can fail at once, with the master's stderr,
    /// when a master exits that should still be running.
    watches: Mutex<Vec<Watch>>,
    /// When [`TEST_BUDGET`] is spent.
    budget_end: Instant,
    /// The binary other users may run, once [`Sandbox::plumule_for_others`] has placed it.
    shared_binary: OnceLock<PathBuf>,
}

/// What a wait needs to notice that a `plumule` process exited unexpectedly.
#[derive(Clone)]
struct Watch {
    pid: i32,
    args: String,
    stderr: PathBuf,
    /// Set once the test has signalled it or waits for its exit.
    exit_expected: Arc<AtomicBool>,
    /// Its sandbox's.
    budget_end: Instant,
}

impl Watch {
    /// Err if the process has exited (it is a zombie: the test has not reaped it yet) although
    /// nobody asked it to.
    fn check(&self) -> Result<(), String> {
        let exited = proc_stat(self.pid).is_some_and(|p| p.state == 'Z');
        if !exited || self.exit_expected.load(Ordering::SeqCst) {
            return Ok(());
        }
        // Peek at the exit status, leaving the zombie for `Child::wait`.
        let how = match waitid(
            Id::Pid(Pid::from_raw(self.pid)),
            WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT,
        ) {
            Ok(WaitStatus::Exited(_, code)) => format!("exited with code {code}"),
            Ok(WaitStatus::Signaled(_, sig, _)) => format!("was killed by {sig}"),
            other => format!("exited ({other:?})"),
        };
        Err(format!(
            "`plumule {}` (pid {}) {how}; its stderr:\n{}\n",
            self.args,
            self.pid,
            String::from_utf8_lossy(&fs::read(&self.stderr).unwrap_or_default())
        ))
    }
}

impl Sandbox {
    pub fn new() -> Sandbox {
        Sandbox::with_budget(TEST_BUDGET)
    }

    /// A sandbox whose waits may take `budget` in all instead of [`TEST_BUDGET`]: for the few
    /// long tests (a chaos run) that are bounded by their own size.
    pub fn with_budget(budget: Duration) -> Sandbox {
        become_subreaper();
        let dir = tempfile::Builder::new()
            .prefix("plumule-test.")
            .tempdir()
            .expect("temp dir");
        Sandbox {
            dir,
            spawned: AtomicUsize::new(0),
            watches: Mutex::new(Vec::new()),
            budget_end: Instant::now() + budget,
            shared_binary: OnceLock::new(),
        }
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn runtime_dir(&self) -> PathBuf {
        self.path("run")
    }

    pub fn pidfile(&self) -> PathBuf {
        self.runtime_dir().join("plumule.pid")
    }

    /// The file every worker script appends its start line to.
    pub fn starts_file(&self) -> PathBuf {
        self.path("starts")
    }

    /// `MARKER=VALUE` as it appears in /proc/PID/environ of the processes this sandbox started.
    fn marker(&self) -> String {
        format!("{MARKER}={}", self.dir.path().display())
    }

    /// Writes `name` with `text` and the given mode (set explicitly: the umask must not decide).
    pub fn write_file(&self, name: &str, text: &str, mode: u32) -> PathBuf {
        let path = self.path(name);
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&path)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        f.write_all(text.as_bytes()).expect("write");
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).expect("chmod");
        path
    }

    /// The `[plumule]` section every generated config starts with (4 lines and a blank one).
    pub fn header(&self) -> String {
        format!(
            "[plumule]\nruntime_dir = {}\nstate_dir = {}\nshutdown_timeout = \"5s\"\n\n",
            toml_str(&self.runtime_dir()),
            toml_str(&self.path("state")),
        )
    }

    /// Writes `plumule.toml` (mode 0644): the header, then `programs`.
    pub fn config(&self, programs: &str) -> PathBuf {
        self.write_file(
            "plumule.toml",
            &format!("{}{programs}", self.header()),
            0o644,
        )
    }

    /// Writes an executable shell script `name` (mode 0755) that first appends its start line
    /// to [`Sandbox::starts_file`], then runs `body`.
    pub fn worker(&self, name: &str, body: &str) -> PathBuf {
        let record = format!(
            "echo \"$PLUMULE_PROGRAM $PLUMULE_WORKER_ID $PLUMULE_WORKERS $$\" >> {}",
            sh_str(&self.starts_file())
        );
        self.script(name, &format!("{record}\n{body}"))
    }

    /// Like [`Sandbox::worker`], with the wall-clock time of the start appended to the line.
    pub fn timed_worker(&self, name: &str, body: &str) -> PathBuf {
        let record = format!(
            "echo \"$PLUMULE_PROGRAM $PLUMULE_WORKER_ID $PLUMULE_WORKERS $$ $(date +%s.%N)\" >> {}",
            sh_str(&self.starts_file())
        );
        self.script(name, &format!("{record}\n{body}"))
    }

    /// Writes an executable `#!/bin/sh` script without the start line.
    pub fn script(&self, name: &str, body: &str) -> PathBuf {
        self.write_file(name, &format!("#!/bin/sh\n{body}\n"), 0o755)
    }

    /// The complete start lines written so far, in order.
    pub fn starts(&self) -> Vec<Start> {
        let text = fs::read_to_string(self.starts_file()).unwrap_or_default();
        let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
        complete
            .lines()
            .map(|line| {
                let f: Vec<&str> = line.split(' ').collect();
                fn bad<T>(line: &str) -> T {
                    panic!("malformed start line {line:?}")
                }
                if f.len() < 4 {
                    bad::<()>(line);
                }
                Start {
                    program: f[0].to_string(),
                    id: f[1].parse().unwrap_or_else(|_| bad(line)),
                    workers: f[2].parse().unwrap_or_else(|_| bad(line)),
                    pid: f[3].parse().unwrap_or_else(|_| bad(line)),
                    time: f.get(4).map(|t| t.parse().unwrap_or_else(|_| bad(line))),
                }
            })
            .collect()
    }

    /// Start lines of one program.
    pub fn starts_of(&self, program: &str) -> Vec<Start> {
        self.starts()
            .into_iter()
            .filter(|s| s.program == program)
            .collect()
    }

    /// Waits until `program` has at least `n` start lines; returns them.
    #[track_caller]
    pub fn wait_starts(&self, program: &str, n: usize, deadline: Duration) -> Vec<Start> {
        self.wait(
            &format!("{program} has started {n} time(s)"),
            deadline,
            || self.starts_of(program).len() >= n,
        );
        self.starts_of(program)
    }

    /// Reads a file a worker wrote (e.g. a pid), waiting until it holds a complete line.
    #[track_caller]
    pub fn wait_line(&self, name: &str, deadline: Duration) -> String {
        let path = self.path(name);
        let mut line = String::new();
        self.wait(
            &format!("{} holds a line", path.display()),
            deadline,
            || {
                let text = fs::read_to_string(&path).unwrap_or_default();
                match text.split_once('\n') {
                    Some((first, _)) => {
                        line = first.to_string();
                        true
                    }
                    None => false,
                }
            },
        );
        line
    }

    /// Starts `plumule run -c CONFIG` in the foreground, output captured in the sandbox.
    pub fn start(&self, config: &Path) -> Daemon {
        self.spawn_plumule(&["run", "-c", &config.display().to_string()])
    }

    /// Starts `plumule run -c CONFIG` with extra environment variables (e.g. `NOTIFY_SOCKET`).
    pub fn start_with_env(&self, config: &Path, env: &[(&str, &str)]) -> Daemon {
        let args = ["run", "-c", &config.display().to_string()];
        self.spawn_plumule_with(&args, |cmd| {
            cmd.envs(env.iter().copied());
        })
    }

    /// The file the next spawned `plumule` will write its stderr to. The spawn truncates an
    /// existing file rather than replacing it, so its device and inode can be known beforehand.
    pub fn next_stderr(&self) -> PathBuf {
        let n = self.spawned.load(Ordering::SeqCst) + 1;
        self.path(&format!("plumule-{n}.stderr"))
    }

    /// Spawns `plumule ARGS…` with stdout and stderr captured to files in the sandbox.
    pub fn spawn_plumule(&self, args: &[&str]) -> Daemon {
        self.spawn_plumule_with(args, |_| {})
    }

    /// [`Sandbox::spawn_plumule`] with `adjust` applied to the command just before it is
    /// spawned (e.g. `uid`/`gid` to run a client as another user).
    pub fn spawn_plumule_with(&self, args: &[&str], adjust: impl FnOnce(&mut Command)) -> Daemon {
        self.spawn_binary_with(Path::new(PLUMULE), args, adjust)
    }

    /// `plumule ARGS…` as `uid`/`gid`, from the copy of the binary other users may run (see
    /// [`Sandbox::plumule_for_others`]): the build tree may sit in a folder they cannot enter.
    pub fn spawn_plumule_as(&self, args: &[&str], uid: u32, gid: u32) -> Daemon {
        let binary = self.plumule_for_others();
        self.spawn_binary_with(&binary, args, |cmd| {
            cmd.uid(uid).gid(gid);
        })
    }

    /// A copy of the binary under test that any user may execute: `bin/plumule` (0755) in the
    /// sandbox, whose root becomes 0711 so that others may traverse it (not list it). Made once
    /// per sandbox. The checkout, and `target/` with it, may live in a folder other users cannot
    /// enter (a clone under a 0700 home), where they cannot run `target/…/plumule` itself.
    pub fn plumule_for_others(&self) -> PathBuf {
        self.shared_binary
            .get_or_init(|| {
                let bin = self.path("bin");
                fs::create_dir(&bin).expect("create bin/ in the sandbox");
                fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).expect("chmod bin/");
                let copy = bin.join("plumule");
                // A hard link when the sandbox is on the same filesystem; else `cp` in a child
                // process, so that no descriptor open for writing on the copy exists in this
                // process, where a concurrent fork would inherit it and make its exec fail
                // with ETXTBSY.
                if fs::hard_link(PLUMULE, &copy).is_err() {
                    let out = Command::new("cp")
                        .arg(PLUMULE)
                        .arg(&copy)
                        .output()
                        .expect("run cp");
                    assert!(out.status.success(), "cp {PLUMULE}: {out:?}");
                }
                fs::set_permissions(&copy, fs::Permissions::from_mode(0o755))
                    .expect("chmod the copied binary");
                fs::set_permissions(self.root(), fs::Permissions::from_mode(0o711))
                    .expect("chmod the sandbox");
                copy
            })
            .clone()
    }

    /// Spawns `BINARY ARGS…` (a `plumule`) with the environment, output capture, process group
    /// and exit watch of [`Sandbox::spawn_plumule`].
    fn spawn_binary_with(
        &self,
        binary: &Path,
        args: &[&str],
        adjust: impl FnOnce(&mut Command),
    ) -> Daemon {
        // A one-shot command is expected to exit; a master is not.
        let exit_expected = args.first() != Some(&"run");
        self.spawn_watched(binary, args, &args.join(" "), exit_expected, adjust)
    }

    /// Starts a master through a launcher, `program ARGS…` (e.g. `/bin/sh -c '… exec plumule
    /// run …'`, which keeps the pid), with the environment, output capture, process group and
    /// exit watch of [`Sandbox::spawn_plumule_with`]. `what` names it in failure messages.
    pub fn spawn_master_via(
        &self,
        program: &str,
        args: &[&str],
        what: &str,
        adjust: impl FnOnce(&mut Command),
    ) -> Daemon {
        self.spawn_watched(Path::new(program), args, what, false, adjust)
    }

    /// Spawns `program ARGS…` in the sandbox: the marker set, the variables that would make a
    /// master talk to the test's own systemd or sockets removed, stdin from /dev/null, stdout
    /// and stderr to numbered files, its own process group; watched for an unexpected exit.
    fn spawn_watched(
        &self,
        program: &Path,
        args: &[&str],
        what: &str,
        exit_expected: bool,
        adjust: impl FnOnce(&mut Command),
    ) -> Daemon {
        let n = self.spawned.fetch_add(1, Ordering::SeqCst) + 1;
        let stdout = self.path(&format!("plumule-{n}.stdout"));
        let stderr = self.path(&format!("plumule-{n}.stderr"));
        let mut cmd = Command::new(program);
        cmd.args(args)
            .current_dir(self.root())
            .env(MARKER, self.dir.path());
        for var in [
            "NOTIFY_SOCKET",
            "PLUMULE_CONFIG",
            "PLUMULE_SOCKET",
            "LISTEN_FDS",
            "LISTEN_PID",
            "LISTEN_FDNAMES",
            "WATCHDOG_USEC",
            "WATCHDOG_PID",
            "JOURNAL_STREAM",
        ] {
            cmd.env_remove(var);
        }
        // Its own process group, as under systemd: a signal meant for it never reaches the
        // test runner, and the runner's terminal signals never reach it.
        cmd.stdin(Stdio::null())
            .stdout(File::create(&stdout).expect("stdout file"))
            .stderr(File::create(&stderr).expect("stderr file"))
            .process_group(0);
        adjust(&mut cmd);
        let child = spawn_registered(&mut cmd);
        let watch = Watch {
            pid: child.id() as i32,
            args: what.to_string(),
            stderr,
            exit_expected: Arc::new(AtomicBool::new(exit_expected)),
            budget_end: self.budget_end,
        };
        self.watches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(watch.clone());
        Daemon {
            child,
            stdout,
            watch,
            status: None,
        }
    }

    /// [`wait_for`], failing at once if a master of this sandbox exits meanwhile.
    #[track_caller]
    pub fn wait(&self, what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
        wait_or_abort(what, within_budget(deadline, self.budget_end), || {
            // Released before `cond`, which may spawn a `plumule` itself (a status query).
            let watches = self
                .watches
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            watches.iter().try_for_each(Watch::check)?;
            Ok(cond())
        });
    }

    /// Runs a one-shot `plumule ARGS…` to completion (within `deadline`).
    #[track_caller]
    pub fn plumule(&self, args: &[&str], deadline: Duration) -> Outcome {
        let mut d = self.spawn_plumule(args);
        let status = d.wait_exit(deadline);
        Outcome {
            status,
            stdout: d.stdout_text(),
            stderr: d.stderr_text(),
        }
    }

    /// `plumule ARGS… -c CONFIG`, to completion (within 10 s).
    #[track_caller]
    pub fn cli(&self, config: &Path, args: &[&str]) -> Outcome {
        let config = config.display().to_string();
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["-c", &config]);
        self.plumule(&all, Duration::from_secs(10))
    }

    /// [`Sandbox::cli`] that must exit 0.
    #[track_caller]
    pub fn cli_ok(&self, config: &Path, args: &[&str]) -> Outcome {
        let out = self.cli(config, args);
        assert_exit_code(
            out.status,
            0,
            &format!("`plumule {args:?}`: {}", out.stderr),
        );
        out
    }

    /// `plumule status --json -c CONFIG`: its exit code and the parsed answer (SPEC §9 shape).
    #[track_caller]
    pub fn status(&self, config: &Path) -> (i32, StatusReport) {
        let out = self.plumule(
            &["status", "--json", "-c", &config.display().to_string()],
            Duration::from_secs(10),
        );
        let code = out
            .status
            .code()
            .unwrap_or_else(|| panic!("status: {}", out.status));
        let report = parse_status(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "status --json printed no status report ({e}):\n{}\nstderr:\n{}",
                out.stdout, out.stderr
            )
        });
        (code, report)
    }

    /// `status` over this sandbox's control socket; `None` while no master answers there.
    #[track_caller]
    pub fn ask_status(&self) -> Option<StatusReport> {
        ask_status(&self.runtime_dir().join("control.sock"))
    }

    /// The `status --json` entry of worker `program.id`.
    #[track_caller]
    pub fn worker_status(&self, config: &Path, program: &str, id: u32) -> WorkerStatus {
        let (_, report) = self.status(config);
        worker(&report, program, id)
            .cloned()
            .unwrap_or_else(|| panic!("no worker {program}.{id} in status --json: {report:?}"))
    }

    /// The live processes carrying this sandbox's marker: its masters, their workers and
    /// whatever those started.
    pub fn marked_processes(&self) -> Vec<ProcStat> {
        let marker = self.marker();
        processes()
            .into_iter()
            .filter(|p| p.state != 'Z' && carries_marker(p.pid, &marker))
            .collect()
    }

    /// SIGKILLs every process carrying this sandbox's marker until none is left (bounded).
    fn kill_marked(&self) {
        let marker = self.marker();
        let give_up = Instant::now() + Duration::from_secs(5);
        loop {
            reap_adopted_orphans();
            let marked: Vec<i32> = processes()
                .into_iter()
                .filter(|p| p.state != 'Z' && carries_marker(p.pid, &marker))
                .map(|p| p.pid)
                .collect();
            if marked.is_empty() || Instant::now() >= give_up {
                return;
            }
            for pid in marked {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            std::thread::sleep(POLL_INTERVAL); // poll interval of the kill-until-gone loop
        }
    }
}

impl Default for Sandbox {
    fn default() -> Self {
        Sandbox::new()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.kill_marked();
    }
}

/// What a one-shot command did.
#[derive(Debug)]
pub struct Outcome {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

// ---------------------------------------------------------------------------------------------
// Daemon

/// A running `plumule` process. SIGKILLed (and reaped) on drop if it is still running.
pub struct Daemon {
    child: Child,
    stdout: PathBuf,
    watch: Watch,
    status: Option<ExitStatus>,
}

impl Daemon {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    #[track_caller]
    pub fn signal(&self, sig: Signal) {
        assert!(
            self.status.is_none(),
            "`plumule {}` already exited",
            self.watch.args
        );
        if matches!(sig, Signal::SIGTERM | Signal::SIGINT | Signal::SIGKILL) {
            self.watch.exit_expected.store(true, Ordering::SeqCst);
        }
        send(self.pid(), sig);
    }

    /// Waits until it exits; panics (with its stderr) if it is still running after `deadline`.
    #[track_caller]
    pub fn wait_exit(&mut self, deadline: Duration) -> ExitStatus {
        if let Some(status) = self.status {
            return status;
        }
        let mut status = None;
        self.watch.exit_expected.store(true, Ordering::SeqCst);
        let what = format!("`plumule {}` has exited", self.watch.args);
        let (child, stderr) = (&mut self.child, &self.watch.stderr);
        // Gives up from inside the condition so that the panic shows the master's stderr.
        let deadline = within_budget(deadline, self.watch.budget_end);
        let give_up = Instant::now() + deadline;
        wait_or_abort(&what, deadline + Duration::from_secs(1), || {
            status = child.try_wait().expect("try_wait");
            if status.is_none() && Instant::now() >= give_up {
                return Err(format!(
                    "still running after {deadline:?}; its stderr:\n{}\n",
                    String::from_utf8_lossy(&fs::read(stderr).unwrap_or_default())
                ));
            }
            Ok(status.is_some())
        });
        forget_child(self.child.id());
        self.status = status;
        status.unwrap()
    }

    /// Sends `sig` and waits for the exit.
    #[track_caller]
    pub fn stop_with(&mut self, sig: Signal, deadline: Duration) -> ExitStatus {
        self.signal(sig);
        self.wait_exit(deadline)
    }

    /// Whether it is still running (reaps it if it has exited).
    pub fn running(&mut self) -> bool {
        if self.status.is_none() {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                forget_child(self.child.id());
                self.status = Some(status);
            }
        }
        self.status.is_none()
    }

    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.watch.stderr).unwrap_or_default()).into_owned()
    }

    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.stdout).unwrap_or_default()).into_owned()
    }

    /// Lines of the master's stderr that contain every one of `needles`.
    pub fn stderr_lines_with(&self, needles: &[&str]) -> Vec<String> {
        self.stderr_text()
            .lines()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .map(str::to_string)
            .collect()
    }

    /// Waits until a line of the master's stderr contains every one of `needles`.
    #[track_caller]
    pub fn wait_stderr(&self, needles: &[&str], deadline: Duration) -> String {
        let mut found = String::new();
        let what = format!("the master's stderr has a line containing {needles:?}");
        let deadline = within_budget(deadline, self.watch.budget_end);
        wait_or_abort(&what, deadline, || {
            self.watch.check()?;
            Ok(match self.stderr_lines_with(needles).into_iter().next() {
                Some(line) => {
                    found = line;
                    true
                }
                None => false,
            })
        });
        found
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
            forget_child(self.child.id());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Small helpers

/// `path` as a TOML basic string.
pub fn toml_str(path: &Path) -> String {
    let s = path.display().to_string();
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// `path` as a single-quoted shell word.
pub fn sh_str(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', "'\\''"))
}

/// `command = [PATH]` for a script.
pub fn argv(path: &Path) -> String {
    format!("[{}]", toml_str(path))
}

/// Asserts a clean exit with `code`, showing stderr otherwise.
#[track_caller]
pub fn assert_exit_code(status: ExitStatus, code: i32, stderr: &str) {
    assert_eq!(
        status.code(),
        Some(code),
        "unexpected exit {status}; stderr:\n{stderr}"
    );
}

// ---------------------------------------------------------------------------------------------
// Reading a status answer: always into the library's own `StatusReport`

/// `status --json` output (or a status `result`) read as the typed report.
pub fn parse_status(text: &str) -> Result<StatusReport, String> {
    serde_json::from_str(text.trim()).map_err(|e| format!("not a status report: {e}"))
}

/// Asks for `status` on `socket` with the library's own request and response types, every read
/// and write bounded; `None` while nothing listens there. Once connected, anything but a
/// status report (no answer, a refusal, an unreadable line) panics.
#[track_caller]
pub fn ask_status(socket: &Path) -> Option<StatusReport> {
    use std::io::{BufRead, BufReader};
    let stream = std::os::unix::net::UnixStream::connect(socket).ok()?;
    let bound = Some(Duration::from_secs(10));
    stream.set_read_timeout(bound).expect("read timeout");
    stream.set_write_timeout(bound).expect("write timeout");
    let mut line = serde_json::to_vec(&Request::Status { program: None }).expect("encode");
    line.push(b'\n');
    (&stream).write_all(&line).expect("send status");
    let mut answer = String::new();
    BufReader::new(&stream)
        .read_line(&mut answer)
        .expect("an answer to status");
    let answer: serde_json::Value = serde_json::from_str(&answer)
        .unwrap_or_else(|e| panic!("the answer {answer:?} is not JSON: {e}"));
    Some(status_of(&answer))
}

/// A whole answer line to `status` (`{"ok":true,"result":{"programs":…}}`), read with the
/// library's `Response`: its report. Anything else panics.
#[track_caller]
pub fn status_of(answer: &serde_json::Value) -> StatusReport {
    match serde_json::from_value::<Response>(answer.clone()) {
        Ok(Response::Ok(plumule::protocol::Answer::Status(report))) => report,
        Ok(other) => panic!("status failed: {other:?}"),
        Err(e) => panic!("the answer {answer} is not a status response: {e}"),
    }
}

/// The entry of worker `program.id` (the first, during a rolling restart the old process).
pub fn worker<'a>(report: &'a StatusReport, program: &str, id: u32) -> Option<&'a WorkerStatus> {
    report
        .workers()
        .find(|(p, w)| p.name == program && w.id == id)
        .map(|(_, w)| w)
}

/// One entry of a `status` result: (program, id, pid, state).
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub program: String,
    pub id: u32,
    pub pid: Option<i32>,
    pub state: String,
}

/// Every worker entry of a `status` result, in order.
pub fn entries(status: &StatusReport) -> Vec<Entry> {
    status
        .workers()
        .map(|(p, w)| Entry {
            program: p.name.clone(),
            id: w.id,
            pid: w.pid,
            state: w.state.clone(),
        })
        .collect()
}

/// id → pid of the `running` workers of `program`.
pub fn running(status: &StatusReport, program: &str) -> std::collections::BTreeMap<u32, i32> {
    entries(status)
        .into_iter()
        .filter(|e| e.program == program && e.state == "running")
        .map(|e| (e.id, e.pid.expect("a running worker has a pid")))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Helpers every test file used to define for itself

/// SIGTERM to the master, which must exit 0 within [`DEADLINE`].
#[track_caller]
pub fn stop_cleanly(master: &mut Daemon) {
    let status = master.stop_with(SIGTERM, DEADLINE);
    assert_exit_code(status, 0, &master.stderr_text());
}

/// Whether the tests run as root; says the test is skipped, and `why` it needs root, if not.
pub fn root_or_skip(why: &str) -> bool {
    let root = nix::unistd::geteuid().is_root();
    if !root {
        println!("skipped: needs root ({why})");
    }
    root
}

/// The Python interpreter for worker scripts: the system one when present (no pyenv shim
/// between a wrapper's `exec` and the interpreter, so the worker keeps its pid), else whatever
/// PATH finds.
pub fn python() -> &'static str {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// The path of `name` in PATH, if it is there. A test that needs a program which CI installs
/// calls [`needed_program`] instead.
pub fn find_program(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join(name))
        .find(|p| fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// The path of `name` in PATH. When it is missing the test is skipped, loudly (on stderr,
/// returns `None`); under CI (`$CI` set), where it is installed, a missing program fails.
#[track_caller]
pub fn needed_program(name: &str, package: &str) -> Option<PathBuf> {
    let found = find_program(name);
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "`{name}` is not in PATH, and CI must install it (package {package})"
        );
        eprintln!("SKIPPED: `{name}` is not in PATH (install the {package} package)");
    }
    found
}

/// A worker script, `sleeper.sh`, that records its start line and becomes `sleep 1000`.
pub fn sleeper(sb: &Sandbox) -> PathBuf {
    sb.worker("sleeper.sh", "exec sleep 1000")
}

// ---------------------------------------------------------------------------------------------
// Status over the raw control socket

impl Sandbox {
    /// The master's control socket.
    pub fn control_socket(&self) -> PathBuf {
        self.runtime_dir().join("control.sock")
    }
}

/// The status over the control socket (each read and write bounded), or `None` while
/// nothing listens yet.
pub fn try_status(sb: &Sandbox) -> Option<StatusReport> {
    sb.ask_status()
}

/// [`try_status`] that must get an answer.
#[track_caller]
pub fn socket_status(sb: &Sandbox) -> StatusReport {
    try_status(sb).expect("the master answers status")
}

/// Waits until `program` has exactly workers 0..n, all running; returns id → pid.
#[track_caller]
pub fn wait_running(sb: &Sandbox, program: &str, n: u32) -> std::collections::BTreeMap<u32, i32> {
    wait_running_within(sb, program, n, DEADLINE)
}

/// [`wait_running`] with its own deadline.
#[track_caller]
pub fn wait_running_within(
    sb: &Sandbox,
    program: &str,
    n: u32,
    deadline: Duration,
) -> std::collections::BTreeMap<u32, i32> {
    let mut pids = std::collections::BTreeMap::new();
    sb.wait(
        &format!("{program} has exactly workers 0..{n}, all running"),
        deadline,
        || {
            let Some(s) = try_status(sb) else {
                return false;
            };
            let listed = entries(&s).iter().filter(|e| e.program == program).count();
            pids = running(&s, program);
            listed == n as usize && pids.keys().copied().eq(0..n)
        },
    );
    pids
}
