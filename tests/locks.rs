//! File-based locks through the real binary (SPEC §2 `lock_dir`/`locks`, §5, §9; issue 5):
//! locks workers hold across exec, `{worker}` names, shared locks, `plumule lock`, locks shared
//! by two masters, symlinks at the lock path, and stopping a worker that waits for a lock.
//!
//! Besides `status --json`, the tests read /proc/locks: it shows, for every flock lock, the pid
//! that took it and the ones blocked waiting for it, so "X holds L" and "Y waits for L" are
//! observed facts rather than guesses from timing.

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use plumule::protocol::{StatusReport, WorkerStatus};

use common::*;

/// Backoff for programs whose restarts must be quick and free of jitter.
const FAST_BACKOFF: &str = r#"backoff = { initial = "1ms", max = "1ms", jitter = 0.0 }"#;

// ---------------------------------------------------------------------------------------------
// Helpers

/// The default lock dir of a sandbox's config: `runtime_dir/locks`.
fn lock_dir(sb: &Sandbox) -> PathBuf {
    sb.runtime_dir().join("locks")
}

/// `lock_dir/NAME.lock`.
fn lock_file(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.lock"))
}

fn cfg(config: &Path) -> String {
    config.display().to_string()
}

/// Creates `dir` and its missing parents with mode 0755, whatever the umask (the master refuses
/// directories writable by others).
fn make_dir(dir: &Path) {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
}

/// A program that runs `sleep` until stopped, holding `locks` (a TOML array).
fn sleeper(sb: &Sandbox, program: &str, locks: &str, extra: &str) -> String {
    let script = sb.worker(&format!("{program}.sh"), "exec sleep 1000");
    format!(
        "[program.{program}]\ncommand = {}\nlocks = {locks}\n{extra}\n\n",
        argv(&script)
    )
}

/// Runs `plumule lock` against the lock dir of `config` (no master needed) and returns what it
/// did, within `DEADLINE`.
fn plumule_lock(sb: &Sandbox, config: &Path, args: &[&str]) -> Outcome {
    let config = cfg(config);
    let mut all = vec!["lock", "-c", &config];
    all.extend_from_slice(args);
    sb.plumule(&all, DEADLINE)
}

/// `plumule status --json` of the master `config` belongs to. `Ok(None)` while no master
/// listens on its control socket yet; Err (with its stderr) when the command fails otherwise.
/// Exit 3 ("a worker is failed") is a reply like exit 0.
fn status(sb: &Sandbox, config: &Path) -> Result<Option<StatusReport>, String> {
    let out = sb.plumule(&["status", "--json", "-c", &cfg(config)], DEADLINE);
    match out.status.code() {
        Some(0 | 3) => parse_status(&out.stdout)
            .map(Some)
            .map_err(|e| format!("status --json: {e}: {:?}", out.stdout)),
        Some(1) if out.stderr.contains("no master is running here") => Ok(None),
        _ => Err(format!(
            "`plumule status --json` failed ({}): {}",
            out.status, out.stderr
        )),
    }
}

/// Waits until worker PROGRAM.ID of `master` (started with `config`) is in `state` and, when
/// given, shows `detail`; returns its status entry. Gives up at once, with the master's stderr,
/// if the master exits, and if the worker is `failed` while another state is awaited.
#[track_caller]
fn wait_worker(
    sb: &Sandbox,
    master: &mut Daemon,
    config: &Path,
    (program, id): (&str, u32),
    state: &str,
    detail: Option<&str>,
) -> WorkerStatus {
    let what = match detail {
        Some(d) => format!("{program}.{id} is {state} with detail {d:?}"),
        None => format!("{program}.{id} is {state}"),
    };
    let mut found = None;
    wait_or_abort(&what, DEADLINE, || {
        if !master.running() {
            return Err(format!(
                "the master exited; its stderr:\n{}",
                master.stderr_text()
            ));
        }
        let Some(status) = status(sb, config)? else {
            return Ok(false);
        };
        let Some(w) = worker(&status, program, id) else {
            return Ok(false);
        };
        if w.state == "failed" && state != "failed" {
            return Err(format!("{program}.{id} is failed: {w:?}"));
        }
        let ok = w.state == state && detail.is_none_or(|d| w.detail.as_deref() == Some(d));
        found = Some(w.clone());
        Ok(ok)
    });
    found.expect("waited for")
}

/// The pid of a worker's status entry.
#[track_caller]
fn pid_of(entry: &WorkerStatus) -> i32 {
    entry.pid.unwrap_or_else(|| panic!("no pid in {entry:?}"))
}

/// The `locks` of a worker's status entry, sorted.
fn locks_of(entry: &WorkerStatus) -> Vec<String> {
    let mut locks = entry.locks.clone();
    locks.sort();
    locks
}

/// One flock lock on a file, or one request blocked waiting for it, as /proc/locks shows it.
#[derive(Debug, Clone, PartialEq)]
struct Flock {
    pid: i32,
    write: bool,
    blocked: bool,
}

/// The flock locks held on and waited for on `path`, from /proc/locks.
fn flocks(path: &Path) -> Vec<Flock> {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return Vec::new();
    };
    let id = format!(
        "{:02x}:{:02x}:{}",
        libc::major(meta.dev()),
        libc::minor(meta.dev()),
        meta.ino()
    );
    let text = fs::read_to_string("/proc/locks").expect("/proc/locks");
    text.lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace().skip(1).peekable(); // "N:"
            let blocked = f.next_if_eq(&"->").is_some();
            let (kind, _, access, pid, file) =
                (f.next()?, f.next()?, f.next()?, f.next()?, f.next()?);
            if kind != "FLOCK" || file != id {
                return None;
            }
            Some(Flock {
                pid: pid.parse().ok()?,
                write: access == "WRITE",
                blocked,
            })
        })
        .collect()
}

/// Pids that hold a lock on `path` (not those waiting).
fn holders(path: &Path) -> Vec<i32> {
    flocks(path)
        .into_iter()
        .filter(|l| !l.blocked)
        .map(|l| l.pid)
        .collect()
}

/// Waits until process `pid` is blocked waiting for a lock on `path`.
#[track_caller]
fn wait_blocked_on(pid: i32, path: &Path) {
    wait_for(
        &format!("pid {pid} waits for a lock on {}", path.display()),
        DEADLINE,
        || flocks(path).iter().any(|l| l.pid == pid && l.blocked),
    );
}

// ---------------------------------------------------------------------------------------------
// Mutual exclusion across exec and restarts

/// A worker that logs `enter PROGRAM PID NS` and `exit PROGRAM PID NS` (CLOCK_MONOTONIC,
/// nanoseconds, one `write` per line on an O_APPEND file) around a short critical section, then
/// crashes.
const CRITICAL_SECTION: &str = r#"#!/usr/bin/env python3
import os, sys, time
log = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
who = "%s %d" % (os.environ["PLUMULE_PROGRAM"], os.getpid())
os.write(log, ("enter %s %d\n" % (who, time.monotonic_ns())).encode())
time.sleep(0.1)  # the work done under the lock: most of a cycle, so that unlocked runs would overlap
os.write(log, ("exit %s %d\n" % (who, time.monotonic_ns())).encode())
sys.exit(1)
"#;

/// One run of the critical section: `[enter, exit]`, or open-ended if it never logged its exit.
#[derive(Debug)]
struct Section {
    program: String,
    pid: i32,
    enter: u128,
    exit: Option<u128>,
}

fn sections(log: &Path) -> Vec<Section> {
    let text = fs::read_to_string(log).unwrap_or_default();
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    let mut out: Vec<Section> = Vec::new();
    for line in complete.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        assert_eq!(f.len(), 4, "malformed log line {line:?}");
        let pid: i32 = f[2].parse().expect("pid");
        let ns: u128 = f[3].parse().expect("monotonic ns");
        match f[0] {
            "enter" => out.push(Section {
                program: f[1].to_string(),
                pid,
                enter: ns,
                exit: None,
            }),
            "exit" => {
                let s = out
                    .iter_mut()
                    .find(|s| s.pid == pid && s.exit.is_none())
                    .unwrap_or_else(|| panic!("exit without enter: {line:?}"));
                s.exit = Some(ns);
            }
            _ => panic!("malformed log line {line:?}"),
        }
    }
    out
}

#[test]
fn two_programs_sharing_an_exclusive_lock_never_overlap_across_restarts() {
    let sb = Sandbox::new();
    let script = sb.write_file("section.py", CRITICAL_SECTION, 0o755);
    let log = sb.path("sections.log");
    let program = |name: &str| {
        format!(
            "[program.{name}]\ncommand = [{}, {}]\nlocks = [\"mutex\"]\nrestart = \"always\"\n\
             healthy_after = \"1ms\"\n{FAST_BACKOFF}\n\n",
            toml_str(&script),
            toml_str(&log)
        )
    };
    let config = sb.config(&format!("{}{}", program("alpha"), program("beta")));
    let mut master = sb.start(&config);

    let cycles = |name: &str| {
        sections(&log)
            .iter()
            .filter(|s| s.program == name && s.exit.is_some())
            .count()
    };
    sb.wait(
        "alpha and beta have each run their critical section 6 times",
        Duration::from_secs(30),
        || cycles("alpha") >= 6 && cycles("beta") >= 6,
    );
    stop_cleanly(&mut master);

    let mut all = sections(&log);
    all.sort_by_key(|s| s.enter);
    for pair in all.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        let a_exit = a.exit.unwrap_or_else(|| {
            panic!("{a:?} never left its critical section, yet {b:?} entered one after it")
        });
        assert!(
            a_exit < b.enter,
            "critical sections overlap: {a:?} and {b:?} (all: {all:#?})"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// `{worker}`, shared locks, status

#[test]
fn worker_placeholder_gives_each_worker_its_own_lock() {
    let sb = Sandbox::new();
    let config = sb.config(&sleeper(
        &sb,
        "disks",
        r#"["disk-{worker}"]"#,
        "workers = 2",
    ));
    let mut master = sb.start(&config);

    let w0 = wait_worker(&sb, &mut master, &config, ("disks", 0), "running", None);
    let w1 = wait_worker(&sb, &mut master, &config, ("disks", 1), "running", None);
    for (id, w) in [(0, &w0), (1, &w1)] {
        let file = lock_file(&lock_dir(&sb), &format!("disk-{id}"));
        let meta =
            fs::metadata(&file).unwrap_or_else(|e| panic!("{} should exist: {e}", file.display()));
        assert_eq!(meta.mode() & 0o7777, 0o644, "mode of {}", file.display());
        assert_eq!(locks_of(w), [format!("disk-{id}")], "status of disks.{id}");
        assert_eq!(
            holders(&file),
            [pid_of(w)],
            "disks.{id} holds {}",
            file.display()
        );
    }
    stop_cleanly(&mut master);
}

#[test]
fn shared_locks_overlap_while_an_exclusive_one_waits() {
    let sb = Sandbox::new();
    let config = sb.config(&sleeper(
        &sb,
        "readers",
        r#"[{ name = "books", shared = true }]"#,
        "workers = 2",
    ));
    let mut master = sb.start(&config);

    let r0 = wait_worker(&sb, &mut master, &config, ("readers", 0), "running", None);
    let r1 = wait_worker(&sb, &mut master, &config, ("readers", 1), "running", None);
    let file = lock_file(&lock_dir(&sb), "books");
    let mut shared: Vec<i32> = flocks(&file)
        .iter()
        .filter(|l| !l.blocked && !l.write)
        .map(|l| l.pid)
        .collect();
    shared.sort();
    let mut readers = vec![pid_of(&r0), pid_of(&r1)];
    readers.sort();
    assert_eq!(shared, readers, "both readers hold `books` shared at once");

    let out = plumule_lock(&sb, &config, &["books", "--nonblock", "--", "true"]);
    assert_exit_code(out.status, 75, &out.stderr);
    let out = plumule_lock(
        &sb,
        &config,
        &["books", "--shared", "--nonblock", "--", "true"],
    );
    assert_exit_code(out.status, 0, &out.stderr);

    // An exclusive taker waits for as long as a reader holds the lock, then proceeds.
    let got = sb.path("got");
    let mut writer = sb.spawn_plumule(&[
        "lock",
        "-c",
        &cfg(&config),
        "books",
        "--",
        "sh",
        "-c",
        &format!("echo got > {}", sh_str(&got)),
    ]);
    wait_blocked_on(writer.pid(), &file);
    stop_cleanly(&mut master);
    let status = writer.wait_exit(DEADLINE);
    assert_exit_code(status, 0, &writer.stderr_text());
    assert_eq!(fs::read_to_string(&got).unwrap_or_default(), "got\n");
}

#[test]
fn status_lists_the_locks_a_running_worker_holds() {
    let sb = Sandbox::new();
    let config = sb.config(&sleeper(
        &sb,
        "holder",
        r#"["zeta", { name = "alpha", shared = true }]"#,
        "",
    ));
    let mut master = sb.start(&config);

    let w = wait_worker(&sb, &mut master, &config, ("holder", 0), "running", None);
    assert_eq!(locks_of(&w), ["alpha", "zeta"], "status entry {w:?}");
    let pid = pid_of(&w);
    let dir = lock_dir(&sb);
    assert_eq!(
        flocks(&lock_file(&dir, "alpha")),
        [Flock {
            pid,
            write: false,
            blocked: false
        }],
        "the worker holds `alpha` shared"
    );
    assert_eq!(
        flocks(&lock_file(&dir, "zeta")),
        [Flock {
            pid,
            write: true,
            blocked: false
        }],
        "the worker holds `zeta` exclusive"
    );
    stop_cleanly(&mut master);
}

// ---------------------------------------------------------------------------------------------
// The kernel frees a worker's locks, whatever kills it

/// Starts `plumule lock NAME -- sh -c 'echo got > got'` and waits until it blocks on the lock.
fn blocked_taker(sb: &Sandbox, config: &Path, name: &str) -> Daemon {
    let taker = sb.spawn_plumule(&[
        "lock",
        "-c",
        &cfg(config),
        name,
        "--",
        "sh",
        "-c",
        &format!("echo got > {}", sh_str(&sb.path("got"))),
    ]);
    wait_blocked_on(taker.pid(), &lock_file(&lock_dir(sb), name));
    taker
}

/// The blocked taker gets the lock, runs its command and exits 0.
#[track_caller]
fn assert_taker_proceeds(sb: &Sandbox, taker: &mut Daemon) {
    let status = taker.wait_exit(DEADLINE);
    assert_exit_code(status, 0, &taker.stderr_text());
    assert_eq!(
        fs::read_to_string(sb.path("got")).unwrap_or_default(),
        "got\n",
        "the command ran under the lock"
    );
}

#[test]
fn sigkill_of_the_master_and_the_worker_group_frees_the_lock() {
    let sb = Sandbox::new();
    // The worker's child inherits the lock too: only when both are gone is it free.
    let script = sb.worker(
        "holder.sh",
        &format!(
            "sleep 1000 &\necho $! > {}\nwait",
            sh_str(&sb.path("child.pid"))
        ),
    );
    let config = sb.config(&format!(
        "[program.holder]\ncommand = {}\nlocks = [\"vault\"]\n",
        argv(&script)
    ));
    let mut master = sb.start(&config);
    let w = wait_worker(&sb, &mut master, &config, ("holder", 0), "running", None);
    let worker = pid_of(&w);
    let child: i32 = sb.wait_line("child.pid", DEADLINE).parse().expect("pid");
    let mut taker = blocked_taker(&sb, &config, "vault");

    master.stop_with(SIGKILL, DEADLINE);
    // The worker's process group: the worker and its child.
    let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(worker), SIGKILL);
    assert_taker_proceeds(&sb, &mut taker);
    assert!(!pid_alive(worker) && !pid_alive(child));
}

#[test]
fn sigkill_of_the_master_alone_frees_the_lock_through_its_workers_death() {
    let sb = Sandbox::new();
    let config = sb.config(&sleeper(&sb, "holder", r#"["vault"]"#, ""));
    let mut master = sb.start(&config);
    let w = wait_worker(&sb, &mut master, &config, ("holder", 0), "running", None);
    let mut taker = blocked_taker(&sb, &config, "vault");

    master.stop_with(SIGKILL, DEADLINE);
    assert_taker_proceeds(&sb, &mut taker);
    assert!(!pid_alive(pid_of(&w)), "the worker died with its master");
}

// ---------------------------------------------------------------------------------------------
// `plumule lock`

#[test]
fn plumule_lock_times_out_with_75_while_a_worker_holds_the_lock_and_succeeds_once_stopped() {
    let sb = Sandbox::new();
    let config = sb.config(&sleeper(&sb, "holder", r#"["nightly"]"#, ""));
    let mut master = sb.start(&config);
    wait_worker(&sb, &mut master, &config, ("holder", 0), "running", None);

    let began = Instant::now();
    let out = plumule_lock(
        &sb,
        &config,
        &["nightly", "--timeout", "300ms", "--", "true"],
    );
    let waited = began.elapsed();
    assert_exit_code(out.status, 75, &out.stderr);
    assert!(
        waited >= Duration::from_millis(300),
        "gave up after {waited:?}, before its 300ms timeout"
    );

    let out = sb.plumule(&["stop", "holder", "-c", &cfg(&config)], DEADLINE);
    assert_exit_code(out.status, 0, &out.stderr);
    // `stop` returns once the worker has exited: its lock is free by then.
    let out = plumule_lock(
        &sb,
        &config,
        &["nightly", "--timeout", "300ms", "--", "true"],
    );
    assert_exit_code(out.status, 0, &out.stderr);
    stop_cleanly(&mut master);
}

#[test]
fn plumule_lock_passes_the_exit_status_through_and_refuses_bad_names_with_2() {
    let sb = Sandbox::new();
    let config = sb.config(&sleeper(&sb, "unused", r#"["other"]"#, ""));
    // No master runs: `plumule lock` finds the lock dir through the config alone.
    let out = plumule_lock(&sb, &config, &["cron", "--", "sh", "-c", "exit 7"]);
    assert_exit_code(out.status, 7, &out.stderr);
    assert!(
        lock_file(&lock_dir(&sb), "cron").is_file(),
        "the lock file is in the config's lock_dir"
    );
    let out = plumule_lock(&sb, &config, &["cron", "--nonblock", "--", "true"]);
    assert_exit_code(out.status, 0, &out.stderr);

    for bad in ["../x", "a/b", ".hidden", ""] {
        let out = plumule_lock(&sb, &config, &[bad, "--", "true"]);
        assert_exit_code(out.status, 2, &out.stderr);
    }
    assert!(
        !sb.runtime_dir().join("x.lock").exists(),
        "`../x` created nothing outside the lock dir"
    );
}

// ---------------------------------------------------------------------------------------------
// Two masters, one lock dir

/// A config for a master with its own runtime and state dirs under `tag`, and `lock_dir`.
fn config_at(sb: &Sandbox, tag: &str, lock_dir: &Path, programs: &str) -> PathBuf {
    sb.write_file(
        &format!("{tag}.toml"),
        &format!(
            "[plumule]\nruntime_dir = {}\nstate_dir = {}\nlock_dir = {}\n\
             shutdown_timeout = \"5s\"\n\n{programs}",
            toml_str(&sb.path(&format!("{tag}-run"))),
            toml_str(&sb.path(&format!("{tag}-state"))),
            toml_str(lock_dir),
        ),
        0o644,
    )
}

#[test]
fn two_masters_sharing_a_lock_dir_exclude_each_other() {
    let sb = Sandbox::new();
    let shared = sb.path("shared-locks");
    let first_cfg = config_at(&sb, "one", &shared, &sleeper(&sb, "first", r#"["db"]"#, ""));
    let second_cfg = config_at(
        &sb,
        "two",
        &shared,
        &sleeper(&sb, "second", r#"["db"]"#, ""),
    );

    let mut first = sb.start(&first_cfg);
    let holder = wait_worker(&sb, &mut first, &first_cfg, ("first", 0), "running", None);
    let mut second = sb.start(&second_cfg);
    let waiter = wait_worker(
        &sb,
        &mut second,
        &second_cfg,
        ("second", 0),
        "starting",
        Some("waiting for lock db"),
    );
    let file = lock_file(&shared, "db");
    wait_blocked_on(pid_of(&waiter), &file);
    assert_eq!(holders(&file), [pid_of(&holder)], "only `first` holds db");
    assert!(
        sb.starts_of("second").is_empty(),
        "second never ran while first held the lock"
    );

    stop_cleanly(&mut first);
    let running = wait_worker(
        &sb,
        &mut second,
        &second_cfg,
        ("second", 0),
        "running",
        None,
    );
    assert_eq!(locks_of(&running), ["db"]);
    assert_eq!(holders(&file), [pid_of(&running)]);
    stop_cleanly(&mut second);
}

// ---------------------------------------------------------------------------------------------
// Symlinks, stopping a waiting worker

#[test]
fn a_symlink_at_the_lock_path_is_refused_and_its_target_untouched() {
    let sb = Sandbox::new();
    let dir = lock_dir(&sb);
    make_dir(&dir);
    let target = sb.write_file("precious", "precious\n", 0o644);
    std::os::unix::fs::symlink(&target, lock_file(&dir, "planted")).expect("symlink");
    let missing = sb.path("nothing-here");
    std::os::unix::fs::symlink(&missing, lock_file(&dir, "dangling")).expect("symlink");
    let config = sb.config(&format!(
        "{}{}",
        sleeper(&sb, "victim", r#"["planted"]"#, ""),
        sleeper(&sb, "dangler", r#"["dangling"]"#, "")
    ));
    let mut master = sb.start(&config);

    for (program, lock) in [("victim", "planted"), ("dangler", "dangling")] {
        let w = wait_worker(&sb, &mut master, &config, (program, 0), "failed", None);
        let detail = w.detail.as_deref().unwrap_or_default();
        assert!(
            detail.contains(lock),
            "the reason {program} failed names lock {lock}: {w:?}"
        );
        assert!(sb.starts_of(program).is_empty(), "{program} never ran");
        assert!(fs::symlink_metadata(lock_file(&dir, lock))
            .expect("still there")
            .file_type()
            .is_symlink());
    }
    assert_eq!(fs::read_to_string(&target).unwrap(), "precious\n");
    assert_eq!(
        fs::metadata(&target).unwrap().permissions().mode() & 0o7777,
        0o644
    );
    assert!(
        !missing.exists(),
        "the dangling symlink's target was not created"
    );
    stop_cleanly(&mut master);
}

#[test]
fn a_worker_waiting_for_a_lock_is_stopped_cleanly_and_starts_once_it_is_free() {
    let sb = Sandbox::new();
    let dir = lock_dir(&sb);
    make_dir(&dir);
    let guard = plumule::locks::acquire(
        &dir,
        "busy",
        plumule::locks::Mode::Exclusive,
        plumule::locks::Wait::NonBlock,
    )
    .expect("the test takes the lock first");
    // A long stop_timeout: the waiting worker must go on the stop signal, not on SIGKILL.
    let config = sb.config(&sleeper(
        &sb,
        "waiter",
        r#"["busy"]"#,
        "stop_timeout = \"60s\"",
    ));
    let mut master = sb.start(&config);
    let w = wait_worker(
        &sb,
        &mut master,
        &config,
        ("waiter", 0),
        "starting",
        Some("waiting for lock busy"),
    );
    let pid = pid_of(&w);
    wait_blocked_on(pid, &lock_file(&dir, "busy"));

    let out = sb.plumule(&["stop", "waiter", "-c", &cfg(&config)], DEADLINE);
    assert_exit_code(out.status, 0, &out.stderr);
    let w = wait_worker(&sb, &mut master, &config, ("waiter", 0), "stopped", None);
    assert!(w.pid.is_none(), "a stopped worker has no pid: {w:?}");
    assert!(!pid_alive(pid), "the waiting child {pid} is gone");
    assert!(group_members(pid).is_empty(), "its process group is empty");
    assert!(sb.starts_of("waiter").is_empty(), "it never ran");

    drop(guard);
    let out = sb.plumule(&["start", "waiter", "-c", &cfg(&config)], DEADLINE);
    assert_exit_code(out.status, 0, &out.stderr);
    let w = wait_worker(&sb, &mut master, &config, ("waiter", 0), "running", None);
    assert_eq!(locks_of(&w), ["busy"]);
    stop_cleanly(&mut master);
}

// ---------------------------------------------------------------------------------------------
// The library's named locks are the workers' locks

#[test]
fn library_acquire_is_busy_while_a_worker_holds_the_lock() {
    use plumule::locks::{acquire, Mode, Wait};

    let sb = Sandbox::new();
    let config = sb.config(&sleeper(&sb, "holder", r#"["shelf"]"#, ""));
    let mut master = sb.start(&config);
    wait_worker(&sb, &mut master, &config, ("holder", 0), "running", None);
    let dir = lock_dir(&sb);

    for mode in [Mode::Exclusive, Mode::Shared] {
        match acquire(&dir, "shelf", mode, Wait::NonBlock) {
            Err(e) => assert!(e.is_busy(), "{mode:?}: expected Busy, got {e}"),
            Ok(_) => panic!("{mode:?}: took `shelf` while the worker holds it"),
        }
    }

    let out = sb.plumule(&["stop", "holder", "-c", &cfg(&config)], DEADLINE);
    assert_exit_code(out.status, 0, &out.stderr);
    let guard = acquire(&dir, "shelf", Mode::Exclusive, Wait::NonBlock).expect("free once stopped");
    // A guard excludes `plumule lock` like a worker does, until it is dropped.
    let out = plumule_lock(&sb, &config, &["shelf", "--nonblock", "--", "true"]);
    assert_exit_code(out.status, 75, &out.stderr);
    drop(guard);
    let out = plumule_lock(&sb, &config, &["shelf", "--nonblock", "--", "true"]);
    assert_exit_code(out.status, 0, &out.stderr);
    stop_cleanly(&mut master);
}
