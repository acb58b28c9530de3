//! The library (SPEC §8) end to end: this test binary is also the program under test.
//!
//! A `ServiceManager` refuses to fork from a process that runs threads, and the test harness
//! runs threads; so this binary has no libtest harness (`harness = false`): started with
//! `PLUMULE_LIBRARY_SCENARIO` set, its `main` is a library program (a scenario below, or one
//! of the examples, included as modules so that the very same code is tested); started
//! without, it runs the tests, each of which starts itself as a scenario in a sandbox and
//! watches it from outside: the events file its hooks and services append to, /proc, the
//! control socket, its exit code.
//!
//! `cargo test --test library [FILTER]` runs the tests whose name contains FILTER.

mod common;

#[allow(dead_code)]
#[path = "../examples/producer_consumer.rs"]
mod producer_consumer;
#[allow(dead_code)]
#[path = "../examples/reload_config.rs"]
mod reload_config;
#[allow(dead_code)]
#[path = "../examples/service_pool.rs"]
mod service_pool;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use common::{pid_alive, proc_stat, send, wait_for, Daemon, Sandbox, DEADLINE};
use nix::sys::signal::Signal;

const SCENARIO: &str = "PLUMULE_LIBRARY_SCENARIO";
const DIR: &str = "PLUMULE_LIBRARY_DIR";

// ---------------------------------------------------------------------------------------------
// The program side: scenarios

mod scenarios {
    use std::cell::Cell;
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    use std::path::PathBuf;
    use std::rc::Rc;
    use std::time::Duration;

    use plumule::service::{Backoff, Error, Exit, LockSpec, QueueOptions, ReadyMode, Reload};
    use plumule::{Service, ServiceManager, ServiceOptions, Worker};

    fn dir() -> PathBuf {
        PathBuf::from(std::env::var_os(super::DIR).expect("PLUMULE_LIBRARY_DIR"))
    }

    /// Appends one line to the events file, in one write (O_APPEND: lines never mix).
    pub fn note(line: String) {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o644)
            .open(dir().join("events"))
            .expect("open the events file");
        f.write_all(format!("{line}\n").as_bytes())
            .expect("write an event");
    }

    fn me(worker: &Worker) -> String {
        format!("{} {} {}", worker.name(), worker.id(), std::process::id())
    }

    /// What a worker holds that it may have got from the master: its descriptors' targets
    /// and the signals it catches.
    fn inheritance() -> String {
        let mut targets = Vec::new();
        for entry in std::fs::read_dir("/proc/self/fd").expect("/proc/self/fd") {
            let entry = entry.expect("fd entry");
            if let Ok(target) = std::fs::read_link(entry.path()) {
                targets.push(format!(
                    "{}={}",
                    entry.file_name().to_string_lossy(),
                    target.display()
                ));
            }
        }
        let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
        let caught = status
            .lines()
            .find_map(|l| l.strip_prefix("SigCgt:"))
            .map(str::trim)
            .unwrap_or("?")
            .to_string();
        format!("caught={caught} fds={}", targets.join(","))
    }

    /// Waits for requests; reloads in place.
    struct Alpha;

    impl Service for Alpha {
        fn run(&mut self, worker: &Worker) -> Result<(), Error> {
            note(format!("run {} {}", me(worker), inheritance()));
            while worker.wait(Duration::from_secs(60)).is_none() {}
            Ok(())
        }
        fn reload(&mut self, worker: &Worker) -> Reload {
            note(format!("reload {}", me(worker)));
            Reload::Resume
        }
        fn terminate(&mut self, worker: &Worker) {
            note(format!("terminate {}", me(worker)));
        }
    }

    /// No `reload`: the default exits and comes back.
    struct Beta;

    impl Service for Beta {
        fn run(&mut self, worker: &Worker) -> Result<(), Error> {
            note(format!("run {}", me(worker)));
            while !worker.wait_for_stop(Duration::from_secs(60)) {}
            Ok(())
        }
        fn terminate(&mut self, worker: &Worker) {
            note(format!("terminate {}", me(worker)));
        }
    }

    /// Its `terminate` exits with code 42.
    struct Gamma;

    impl Service for Gamma {
        fn run(&mut self, worker: &Worker) -> Result<(), Error> {
            note(format!("run {}", me(worker)));
            // Returns at once: the worker waits for its request by itself.
            Ok(())
        }
        fn terminate(&mut self, worker: &Worker) {
            note(format!("terminate {}", me(worker)));
            std::process::exit(42);
        }
    }

    /// Three services: alpha (2 workers, reloads in place), beta (1, default reload), gamma
    /// (1, terminate exits 42); hooks of every kind, several of a kind, one that panics.
    /// gamma's first exit with 42 scales alpha to 3 from a hook.
    fn three() -> i32 {
        let mut manager = ServiceManager::new();
        manager
            .runtime_dir(dir().join("run"))
            .shutdown_timeout(Duration::from_secs(5));
        let alpha = manager.add("alpha", 1, |_: &Worker| Alpha);
        let beta = manager.add("beta", 3, |_: &Worker| Beta);
        let quick = ServiceOptions {
            backoff: Backoff {
                initial: Duration::from_millis(10),
                max: Duration::from_millis(100),
                multiplier: 2.0,
                jitter: 0.0,
            },
            ..ServiceOptions::default()
        };
        manager.add_with("gamma", quick, |_: &Worker| Gamma);
        // Before run: the counts it starts with.
        manager.reconfigure(alpha, 2);
        manager.reconfigure(beta, 1);
        let handle = manager.handle();
        let scaled = Rc::new(Cell::new(false));
        manager
            .on_new_worker(|name, id, pid| note(format!("new {name} {id} {pid}")))
            .on_new_worker(|name, id, _| note(format!("new2 {name} {id}")))
            .on_dead_worker(move |name, id, pid, exit| {
                note(format!("dead {name} {id} {pid} {exit}"));
                if name == "gamma" && exit == Exit::Code(42) && !scaled.replace(true) {
                    handle.reconfigure(alpha, 3);
                }
            })
            .on_reload(|| note("hook-reload 1".into()))
            .on_reload(|| panic!("a reload hook that panics"))
            .on_reload(|| note("hook-reload 2".into()))
            .on_terminate(|| note("hook-terminate 1".into()))
            .on_terminate(|| note("hook-terminate 2".into()));
        manager.run()
    }

    /// Panics in `run`, every time.
    struct Crashy;

    impl Service for Crashy {
        fn run(&mut self, worker: &Worker) -> Result<(), Error> {
            note(format!("run {}", me(worker)));
            panic!("crashy gives up");
        }
    }

    /// Returns an error from `run`, every time.
    struct Failing;

    impl Service for Failing {
        fn run(&mut self, worker: &Worker) -> Result<(), Error> {
            note(format!("run {}", me(worker)));
            Err("no luck today".into())
        }
    }

    fn panicking() -> i32 {
        let mut manager = ServiceManager::new();
        manager.runtime_dir(dir().join("run"));
        manager.add("crashy", 1, |_: &Worker| Crashy);
        manager.add("failing", 1, |_: &Worker| Failing);
        manager
            .on_dead_worker(|name, id, pid, exit| note(format!("dead {name} {id} {pid} {exit}")));
        manager.run()
    }

    /// Its `terminate` never ends.
    struct Stuck;

    impl Service for Stuck {
        fn run(&mut self, worker: &Worker) -> Result<(), Error> {
            note(format!("run {}", me(worker)));
            Ok(())
        }
        fn terminate(&mut self, worker: &Worker) {
            note(format!("terminate {}", me(worker)));
            loop {
                std::thread::park();
            }
        }
    }

    fn hanging() -> i32 {
        let mut manager = ServiceManager::new();
        manager.runtime_dir(dir().join("run"));
        let options = ServiceOptions {
            stop_timeout: Duration::from_millis(300),
            ..ServiceOptions::default()
        };
        manager.add_with("stuck", options, |_: &Worker| Stuck);
        manager
            .on_dead_worker(|name, id, pid, exit| note(format!("dead {name} {id} {pid} {exit}")));
        manager.run()
    }

    /// `ready = Notify`: ready once the file `go` exists.
    struct Slow;

    impl Service for Slow {
        fn run(&mut self, worker: &Worker) -> Result<(), Error> {
            let var = |k: &str| std::env::var(k).unwrap_or_else(|_| "-".into());
            note(format!(
                "env {} {} {} {} {}",
                me(worker),
                var("PLUMULE_PROGRAM"),
                var("PLUMULE_WORKER_ID"),
                var("PLUMULE_WORKERS"),
                var("NOTIFY_SOCKET")
            ));
            // The program's own polling, while the test waits on what it shows.
            while !dir().join("go").exists() {
                if worker.wait(Duration::from_millis(10)).is_some() {
                    return Ok(());
                }
            }
            worker.ready();
            Ok(())
        }
    }

    fn notify() -> i32 {
        let mut manager = ServiceManager::new();
        manager.runtime_dir(dir().join("run"));
        let options = ServiceOptions {
            workers: 2,
            ready: ReadyMode::Notify,
            ..ServiceOptions::default()
        };
        manager.add_with("slow", options, |_: &Worker| Slow);
        manager.run()
    }

    /// Two workers, one exclusive lock: one runs, the other waits for the lock.
    fn locked() -> i32 {
        let mut manager = ServiceManager::new();
        manager.runtime_dir(dir().join("run"));
        let options = ServiceOptions {
            workers: 2,
            locks: vec![LockSpec {
                name: "solo".into(),
                shared: false,
                cluster: false,
            }],
            ..ServiceOptions::default()
        };
        manager.add_with("solo", options, |_: &Worker| Alpha);
        manager.run()
    }

    /// A typed job.
    #[derive(serde::Serialize, serde::Deserialize)]
    struct Square {
        n: i64,
    }

    /// Consumes `squares`; dies in the middle of job 7 the first time it sees it.
    struct Squarer;

    impl Service for Squarer {
        fn run(&mut self, worker: &Worker) -> Result<(), Error> {
            for job in worker.jobs()?.typed::<Square>() {
                let (Square { n }, job) = job?;
                // A stray print: it must reach the log, not the answers.
                println!("squaring {n}");
                let crashed = dir().join("crashed");
                if n == 7 && !crashed.exists() {
                    std::fs::write(&crashed, "").expect("write the crash marker");
                    note(format!("crash {} {n}", me(worker)));
                    std::process::abort();
                }
                note(format!("done {} {n} {}", me(worker), n * n));
                job.ok_json(&(n * n))?;
            }
            Ok(())
        }
        fn terminate(&mut self, worker: &Worker) {
            note(format!("terminate {}", me(worker)));
        }
    }

    fn jobs() -> i32 {
        let mut manager = ServiceManager::new();
        manager.runtime_dir(dir().join("run"));
        manager.add_queue(
            "squares",
            QueueOptions {
                retry_backoff: Backoff {
                    initial: Duration::from_millis(10),
                    max: Duration::from_millis(100),
                    multiplier: 2.0,
                    jitter: 0.0,
                },
                ..QueueOptions::default()
            },
        );
        let options = ServiceOptions {
            workers: 2,
            queue: Some("squares".into()),
            ..ServiceOptions::default()
        };
        manager.add_with("squarer", options, |_: &Worker| Squarer);
        manager.on_new_worker(|name, id, pid| note(format!("new {name} {id} {pid}")));
        let handle = manager.handle();
        for n in 1..=10 {
            handle
                .submit("squares", &Square { n })
                .expect("encode a job");
        }
        manager.run()
    }

    /// A thread runs before `run`.
    fn threaded() -> i32 {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let _thread = std::thread::spawn(move || rx.recv());
        let mut manager = ServiceManager::new();
        manager.runtime_dir(dir().join("run"));
        manager.add("alpha", 1, |_: &Worker| Alpha);
        let code = manager.run();
        drop(tx);
        code
    }

    pub fn run(name: &str) -> i32 {
        let dir = dir();
        let arg = |s: &str| s.to_string();
        let rt = dir.join("run").display().to_string();
        match name {
            "three" => three(),
            "panicking" => panicking(),
            "hanging" => hanging(),
            "threaded" => threaded(),
            "notify" => notify(),
            "locked" => locked(),
            "jobs" => jobs(),
            "example-jobs" => super::producer_consumer::run(&[
                arg("--jobs"),
                arg("5"),
                arg("--exit-after"),
                arg("1s"),
                arg("--runtime-dir"),
                rt,
            ]),
            "example-pool" => super::service_pool::run(&[
                arg("--exit-after"),
                arg("1s"),
                arg("--runtime-dir"),
                rt,
            ]),
            "example-reload" => super::reload_config::run(&[
                arg("--config"),
                dir.join("greeting").display().to_string(),
                arg("--exit-after"),
                arg("60s"),
                arg("--runtime-dir"),
                rt,
            ]),
            other => {
                eprintln!("no scenario {other}");
                2
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The test side

/// One line of the events file, split on spaces.
type Event = Vec<String>;

struct Run {
    sandbox: Sandbox,
    master: Daemon,
}

impl Run {
    fn start(scenario: &str) -> Run {
        Run::start_in(Sandbox::new(), scenario)
    }

    fn start_in(sandbox: Sandbox, scenario: &str) -> Run {
        let exe = std::env::current_exe().expect("current_exe");
        let exe = exe.display().to_string();
        let dir = sandbox.root().to_path_buf();
        let master = sandbox.spawn_master_via(&exe, &[], scenario, |cmd| {
            cmd.env(SCENARIO, scenario).env(DIR, &dir);
        });
        Run { sandbox, master }
    }

    fn events(&self) -> Vec<Event> {
        std::fs::read_to_string(self.sandbox.path("events"))
            .unwrap_or_default()
            .lines()
            .map(|l| l.split(' ').map(str::to_string).collect())
            .collect()
    }

    fn matching(&self, prefix: &[&str]) -> Vec<Event> {
        self.events()
            .into_iter()
            .filter(|e| e.len() >= prefix.len() && e.iter().zip(prefix).all(|(a, b)| a == b))
            .collect()
    }

    /// Waits until `n` events start with `prefix`; returns them.
    #[track_caller]
    fn wait_events(&self, prefix: &[&str], n: usize) -> Vec<Event> {
        let mut found = Vec::new();
        self.sandbox.wait(
            &format!("{n} events {prefix:?} (events so far: {:?})", self.events()),
            DEADLINE,
            || {
                found = self.matching(prefix);
                found.len() >= n
            },
        );
        found
    }

    /// The pid of the live worker `name.id` as its last `new` hook said.
    fn pid_of(&self, name: &str, id: u32) -> i32 {
        let id = id.to_string();
        let new = self.matching(&["new", name, &id]);
        new.last()
            .unwrap_or_else(|| panic!("no new {name}.{id}: {:?}", self.events()))[3]
            .parse()
            .expect("pid")
    }

    fn control_socket(&self) -> PathBuf {
        self.sandbox.path("run").join("control.sock")
    }

    /// `plumule --socket … ARGS`, which must succeed.
    #[track_caller]
    fn cli(&self, args: &[&str]) -> String {
        let socket = self.control_socket().display().to_string();
        let mut all = vec!["--socket", &socket];
        all.extend(args);
        let out = self.sandbox.plumule(&all, DEADLINE);
        common::assert_exit_code(out.status, 0, &format!("plumule {args:?}: {}", out.stderr));
        out.stdout
    }

    /// Every worker pid its hooks ever reported.
    fn all_pids(&self) -> BTreeSet<i32> {
        self.matching(&["new"])
            .iter()
            .map(|e| e[3].parse().expect("pid"))
            .collect()
    }

    /// Waits for the three services of `three` to be up: alpha 0 and 1, beta 0, gamma 0.
    fn three_up(&self) {
        self.wait_events(&["run", "alpha"], 2);
        self.wait_events(&["run", "beta"], 1);
        self.wait_events(&["run", "gamma"], 1);
    }

    #[track_caller]
    fn assert_nothing_left(&self) {
        for pid in self.all_pids() {
            wait_for(&format!("worker {pid} is gone"), DEADLINE, || {
                !pid_alive(pid)
            });
            assert!(
                common::group_members(pid).is_empty(),
                "process group {pid} still has members"
            );
        }
    }
}

fn position(events: &[Event], prefix: &[&str]) -> usize {
    events
        .iter()
        .position(|e| e.len() >= prefix.len() && e.iter().zip(prefix).all(|(a, b)| a == b))
        .unwrap_or_else(|| panic!("no event {prefix:?} in {events:?}"))
}

fn startup_has_the_right_workers_ids_hooks_and_titles() {
    let run = Run::start("three");
    run.three_up();
    let news: BTreeSet<(String, String)> = run
        .matching(&["new"])
        .into_iter()
        .map(|e| (e[1].clone(), e[2].clone()))
        .collect();
    let expected: BTreeSet<(String, String)> = [("alpha", "0"), ("alpha", "1"), ("beta", "0")]
        .into_iter()
        .chain([("gamma", "0")])
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    assert_eq!(news, expected, "reconfigure before run: alpha 2, beta 1");
    // Both on_new_worker hooks, in order, for each worker.
    let events = run.events();
    for (name, id) in &expected {
        let first = position(&events, &["new", name, id]);
        let second = position(&events, &["new2", name, id]);
        assert!(first < second, "hooks out of order: {events:?}");
    }
    for (name, id) in &expected {
        let pid = run.pid_of(name, id.parse().unwrap());
        // The pid the hook reported is the worker that ran.
        let ran = run.matching(&["run", name, id]);
        assert_eq!(ran[0][3], pid.to_string(), "{name}.{id}");
        let stat = proc_stat(pid).expect("worker alive");
        assert_eq!(stat.comm, format!("{name}.{id}"), "process title");
        assert_eq!(stat.pgrp, pid, "{name}.{id} leads its own process group");
        assert_eq!(stat.ppid, run.master.pid(), "forked by the master itself");
    }
    // The control socket answers for the library master too.
    let status = common::ask_status(&run.control_socket()).expect("status over the socket");
    let running: BTreeSet<String> = status
        .programs
        .iter()
        .flat_map(|p| {
            p.workers
                .iter()
                .filter(|w| w.state == "running")
                .map(move |w| format!("{}.{}", p.name, w.id))
        })
        .collect();
    assert_eq!(
        running,
        ["alpha.0", "alpha.1", "beta.0", "gamma.0"]
            .map(String::from)
            .into()
    );
}

fn a_forked_worker_keeps_nothing_of_the_masters() {
    let run = Run::start("three");
    let alpha = run.wait_events(&["run", "alpha"], 2);
    for event in alpha {
        let caught = event[4].strip_prefix("caught=").expect("caught=");
        // SIGHUP (1) and SIGTERM (15), plumule's worker handler; nothing of the master's
        // (CHLD, INT, USR1).
        assert_eq!(
            u64::from_str_radix(caught, 16).expect("hex"),
            (1 << (libc::SIGHUP - 1)) | (1 << (libc::SIGTERM - 1)),
            "{event:?}"
        );
        let fds: Vec<&str> = event[5]
            .strip_prefix("fds=")
            .expect("fds=")
            .split(',')
            .collect();
        assert!(fds.contains(&"0=/dev/null"), "{fds:?}");
        for fd in &fds {
            let (_, target) = fd.split_once('=').expect("n=target");
            assert!(
                target.starts_with("pipe:")
                    || target == "/dev/null"
                    || target.starts_with("/proc/"),
                "a descriptor the worker should not have: {fd} (all: {fds:?})"
            );
        }
        // stdout, stderr, its request pipe's two ends, and the listing itself.
        assert!(fds.len() <= 6, "too many descriptors: {fds:?}");
    }
}

fn sighup_to_one_worker_calls_only_its_reload() {
    let run = Run::start("three");
    run.three_up();
    let pid = run.pid_of("alpha", 1);
    send(pid, Signal::SIGHUP);
    run.wait_events(&["reload", "alpha", "1"], 1);
    // Its body runs again, in the same process.
    let runs = run.wait_events(&["run", "alpha", "1"], 2);
    assert_eq!(runs[1][3], pid.to_string());
    assert_eq!(run.matching(&["reload"]).len(), 1, "{:?}", run.events());
    assert!(
        run.matching(&["terminate"]).is_empty(),
        "{:?}",
        run.events()
    );
    assert!(run.matching(&["hook-reload"]).is_empty());
}

fn a_service_without_reload_exits_on_sighup_and_comes_back_with_its_id() {
    let run = Run::start("three");
    run.three_up();
    let pid = run.pid_of("beta", 0);
    send(pid, Signal::SIGHUP);
    let dead = run.wait_events(&["dead", "beta", "0"], 1);
    assert_eq!(dead[0][3], pid.to_string());
    assert_eq!(dead[0][4..], ["exit", "0"]);
    run.wait_events(&["terminate", "beta", "0"], 1);
    let news = run.wait_events(&["new", "beta", "0"], 2);
    assert_ne!(news[1][3], pid.to_string(), "a new process");
    run.wait_events(&["run", "beta", "0"], 2);
}

fn a_terminate_that_exits_with_a_code_is_reported_and_restarted() {
    let run = Run::start("three");
    run.three_up();
    let pid = run.pid_of("gamma", 0);
    send(pid, Signal::SIGTERM);
    let dead = run.wait_events(&["dead", "gamma", "0"], 1);
    assert_eq!(dead[0][3], pid.to_string());
    assert_eq!(dead[0][4..], ["exit", "42"]);
    let news = run.wait_events(&["new", "gamma", "0"], 2);
    assert_ne!(news[1][3], pid.to_string());
    run.wait_events(&["run", "gamma", "0"], 2);
}

fn reconfigure_from_a_hook_and_scale_over_the_socket() {
    let run = Run::start("three");
    run.three_up();
    // gamma's exit with 42 makes a hook scale alpha to 3.
    send(run.pid_of("gamma", 0), Signal::SIGTERM);
    run.wait_events(&["run", "alpha", "2"], 1);
    // Down to 1 over the control socket: the highest ids stop.
    let pid0 = run.pid_of("alpha", 0);
    run.cli(&["scale", "alpha", "1"]);
    run.wait_events(&["dead", "alpha", "1"], 1);
    run.wait_events(&["dead", "alpha", "2"], 1);
    run.wait_events(&["terminate", "alpha", "2"], 1);
    assert!(pid_alive(pid0));
    assert!(run.matching(&["dead", "alpha", "0"]).is_empty());
    // And `status` shows it.
    let status = common::ask_status(&run.control_socket()).expect("status");
    let alpha = status
        .programs
        .iter()
        .find(|p| p.name == "alpha")
        .expect("alpha");
    let states: Vec<(u32, &str)> = alpha
        .workers
        .iter()
        .map(|w| (w.id, w.state.as_str()))
        .collect();
    assert_eq!(states, [(0, "running")]);
    // `logs` has the supervisor's events and the workers' output.
    let logs = run.cli(&["logs", "alpha", "-n", "1000"]);
    assert!(
        logs.contains("alpha.2") && logs.contains("started"),
        "{logs}"
    );
    // `reload` over the socket is SIGHUP: the reload hooks, then every worker's reload.
    run.cli(&["reload"]);
    run.wait_events(&["hook-reload", "2"], 1);
    run.wait_events(&["reload", "alpha", "0"], 1);
}

fn sighup_to_the_master_runs_the_reload_hooks_then_every_workers_reload() {
    let run = Run::start("three");
    run.three_up();
    run.master.signal(Signal::SIGHUP);
    run.wait_events(&["reload", "alpha", "0"], 1);
    run.wait_events(&["reload", "alpha", "1"], 1);
    // beta has no reload: it restarts.
    run.wait_events(&["dead", "beta", "0"], 1);
    let events = run.events();
    let one = position(&events, &["hook-reload", "1"]);
    let two = position(&events, &["hook-reload", "2"]);
    assert!(
        one < two,
        "hooks in order, the panicking one between: {events:?}"
    );
    assert!(two < position(&events, &["reload", "alpha", "0"]));
    run.master.wait_stderr(
        &["on_reload hook panicked", "a reload hook that panics"],
        DEADLINE,
    );
    assert!(run.master.stderr_lines_with(&["SIGHUP"]).len() == 1);
}

fn sigterm_runs_the_terminate_hooks_then_every_terminate_then_exits_0() {
    let mut run = Run::start("three");
    run.three_up();
    let status = run.master.stop_with(Signal::SIGTERM, DEADLINE);
    common::assert_exit_code(status, 0, &run.master.stderr_text());
    let events = run.events();
    let hook1 = position(&events, &["hook-terminate", "1"]);
    let hook2 = position(&events, &["hook-terminate", "2"]);
    assert!(hook1 < hook2, "{events:?}");
    for (name, id) in [
        ("alpha", "0"),
        ("alpha", "1"),
        ("beta", "0"),
        ("gamma", "0"),
    ] {
        assert!(
            hook2 < position(&events, &["terminate", name, id]),
            "{events:?}"
        );
    }
    run.assert_nothing_left();
}

fn sigint_stops_everything_at_once_and_exits_1() {
    let mut run = Run::start("three");
    run.three_up();
    let status = run.master.stop_with(Signal::SIGINT, DEADLINE);
    common::assert_exit_code(status, 1, &run.master.stderr_text());
    assert!(
        run.matching(&["terminate"]).is_empty(),
        "{:?}",
        run.events()
    );
    assert!(run.matching(&["hook-terminate"]).is_empty());
    run.assert_nothing_left();
}

fn sigkill_of_the_master_makes_every_worker_terminate_and_exit() {
    let mut run = Run::start("three");
    run.three_up();
    let pids = run.all_pids();
    run.master.stop_with(Signal::SIGKILL, DEADLINE);
    for (name, id) in [
        ("alpha", "0"),
        ("alpha", "1"),
        ("beta", "0"),
        ("gamma", "0"),
    ] {
        run.wait_events(&["terminate", name, id], 1);
    }
    for pid in pids {
        wait_for(&format!("worker {pid} is gone"), DEADLINE, || {
            !pid_alive(pid)
        });
    }
}

fn a_panicking_body_is_restarted_with_backoff_and_sigterm_ends_cleanly() {
    let mut run = Run::start("panicking");
    let dead = run.wait_events(&["dead", "crashy", "0"], 3);
    for d in &dead {
        assert_eq!(d[4..], ["exit", "101"], "{d:?}");
    }
    run.master
        .wait_stderr(&["crashy.0", "restarting in"], DEADLINE);
    // An error from `run` is a crash too: logged, exit 1, restarted with backoff.
    let dead = run.wait_events(&["dead", "failing", "0"], 2);
    for d in &dead {
        assert_eq!(d[4..], ["exit", "1"], "{d:?}");
    }
    run.master
        .wait_stderr(&["failing.0", "no luck today"], DEADLINE);
    let status = run.master.stop_with(Signal::SIGTERM, DEADLINE);
    common::assert_exit_code(status, 0, &run.master.stderr_text());
    run.assert_nothing_left();
}

fn a_hanging_terminate_is_cut_off_at_the_stop_timeout() {
    let mut run = Run::start("hanging");
    run.wait_events(&["run", "stuck", "0"], 1);
    let status = run.master.stop_with(Signal::SIGTERM, DEADLINE);
    common::assert_exit_code(status, 0, &run.master.stderr_text());
    run.wait_events(&["terminate", "stuck", "0"], 1);
    let dead = run.wait_events(&["dead", "stuck", "0"], 1);
    assert_eq!(dead[0][4..], ["signal", "KILL"]);
    run.assert_nothing_left();
}

fn sigterm_right_after_the_start_still_ends_cleanly() {
    let mut run = Run::start("three");
    // As soon as the first worker is forked, before any has set itself up.
    run.wait_events(&["new"], 1);
    let status = run.master.stop_with(Signal::SIGTERM, DEADLINE);
    common::assert_exit_code(status, 0, &run.master.stderr_text());
    run.assert_nothing_left();
}

fn a_notify_service_is_running_once_it_says_ready() {
    let run = Run::start("notify");
    let envs = run.wait_events(&["env", "slow"], 2);
    let socket = run.sandbox.path("run").join("notify.sock");
    for e in &envs {
        // The environment of an exec'd worker: its name, id and count, plumule's socket.
        assert_eq!(e[4..7], ["slow", e[2].as_str(), "2"], "{e:?}");
        assert_eq!(e[7], socket.display().to_string(), "{e:?}");
    }
    let states = || -> Vec<String> {
        common::ask_status(&run.control_socket())
            .map(|s| {
                s.programs[0]
                    .workers
                    .iter()
                    .map(|w| w.state.clone())
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(states(), ["starting", "starting"]);
    write(&run.sandbox.path("go"), "");
    run.sandbox.wait("both workers are running", DEADLINE, || {
        states() == ["running", "running"]
    });
}

fn locks_of_the_options_are_taken_before_the_service_runs() {
    let run = Run::start("locked");
    let first = run.wait_events(&["run", "solo"], 1);
    let states = || -> Vec<(String, bool)> {
        common::ask_status(&run.control_socket())
            .map(|s| {
                s.programs[0]
                    .workers
                    .iter()
                    .map(|w| (w.state.clone(), w.locks.is_empty()))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut seen = Vec::new();
    run.sandbox.wait(
        "one worker runs, the other waits for the lock",
        DEADLINE,
        || {
            seen = states();
            let mut sorted = seen.clone();
            sorted.sort();
            sorted
                == [
                    ("running".to_string(), false),
                    ("starting".to_string(), true),
                ]
        },
    );
    assert_eq!(
        run.matching(&["run", "solo"]).len(),
        1,
        "{:?}",
        run.events()
    );
    // The holder goes: the other one gets the lock and runs.
    let holder: i32 = first[0][3].parse().expect("pid");
    send(holder, Signal::SIGKILL);
    let runs = run.wait_events(&["run", "solo"], 2);
    assert_ne!(runs[1][2], first[0][2], "the waiting worker ran: {runs:?}");
}

fn typed_jobs_end_to_end_with_a_worker_killed_mid_job() {
    let mut run = Run::start("jobs");
    let crash = run.wait_events(&["crash", "squarer"], 1);
    // Every job answered, job 7 by a process other than the one that died holding it.
    let mut done = BTreeSet::new();
    run.sandbox.wait("jobs 1 to 10 are done", DEADLINE, || {
        done = run
            .matching(&["done", "squarer"])
            .iter()
            .map(|e| e[4].parse::<i64>().expect("n"))
            .collect();
        done.len() == 10
    });
    assert_eq!(done, (1..=10).collect());
    for d in run.matching(&["done", "squarer"]) {
        let n: i64 = d[4].parse().unwrap();
        assert_eq!(d[5], (n * n).to_string());
        if n == 7 {
            assert_ne!(d[3], crash[0][3], "redelivered to another process");
        }
    }
    // The dead worker was restarted with its id; stray prints went to the log.
    let crashed_id = &crash[0][2];
    run.wait_events(&["new", "squarer", crashed_id], 2);
    run.master
        .wait_stderr(&["squarer.", "squaring 7"], DEADLINE);
    // The control socket serves the library's queue too.
    let out = run.cli(&["submit", "squares", "--wait", "{\"n\": 12}"]);
    assert_eq!(out.trim(), "ok 144");
    let status = run.master.stop_with(Signal::SIGTERM, DEADLINE);
    common::assert_exit_code(status, 0, &run.master.stderr_text());
    run.wait_events(&["terminate", "squarer", "0"], 1);
    run.wait_events(&["terminate", "squarer", "1"], 1);
    run.assert_nothing_left();
}

fn example_producer_consumer_runs_and_ends_by_itself() {
    let mut run = Run::start("example-jobs");
    let status = run.master.wait_exit(DEADLINE);
    common::assert_exit_code(status, 0, &run.master.stderr_text());
    let err = run.master.stderr_text();
    for n in 1..=5 {
        assert!(err.contains(&format!(": {n}² = {}", n * n)), "{err}");
    }
}

fn run_refuses_a_process_that_runs_threads() {
    let mut run = Run::start("threaded");
    let status = run.master.wait_exit(DEADLINE);
    common::assert_exit_code(status, 1, &run.master.stderr_text());
    assert!(
        run.master.stderr_text().contains("runs 2 threads"),
        "{}",
        run.master.stderr_text()
    );
    assert!(run.events().is_empty(), "nothing was forked");
}

fn example_service_pool_runs_and_ends_by_itself() {
    let mut run = Run::start("example-pool");
    let status = run.master.wait_exit(DEADLINE);
    common::assert_exit_code(status, 0, &run.master.stderr_text());
    let out = run.master.stdout_text();
    for id in 0..3 {
        assert!(
            out.contains(&format!("master: printer.{id} started")),
            "{out}"
        );
        assert!(out.contains(&format!("master: printer.{id} (pid")), "{out}");
    }
    assert!(out.contains("master: stopping every worker"), "{out}");
    let err = run.master.stderr_text();
    assert!(err.contains("printer.2: stopping after"), "{err}");
}

fn example_reload_config_rereads_its_file_on_sighup() {
    let sandbox = Sandbox::new();
    let greeting = sandbox.path("greeting");
    write(&greeting, "hello\n");
    let mut run = Run::start_in(sandbox, "example-reload");
    run.master
        .wait_stderr(&["greeter.1", "greeting is \"hello\""], DEADLINE);
    run.master
        .wait_stderr(&["greeter.0", "greeting is \"hello\""], DEADLINE);
    let pids = (
        child_named(run.master.pid(), "greeter.0"),
        child_named(run.master.pid(), "greeter.1"),
    );
    write(&greeting, "bonjour\n");
    run.master.signal(Signal::SIGHUP);
    run.master
        .wait_stderr(&["greeter.0", "greeting is \"bonjour\""], DEADLINE);
    run.master
        .wait_stderr(&["greeter.1", "greeting is \"bonjour\""], DEADLINE);
    assert!(run
        .master
        .stdout_text()
        .contains("master: reloading every greeter"));
    // Reloaded in place: the same processes.
    assert_eq!(
        pids,
        (
            child_named(run.master.pid(), "greeter.0"),
            child_named(run.master.pid(), "greeter.1")
        )
    );
    let status = run.master.stop_with(Signal::SIGTERM, DEADLINE);
    common::assert_exit_code(status, 0, &run.master.stderr_text());
}

fn child_named(parent: i32, comm: &str) -> i32 {
    common::live_children(parent)
        .into_iter()
        .find(|p| p.comm == comm)
        .unwrap_or_else(|| panic!("no child {comm} of {parent}"))
        .pid
}

fn write(path: &Path, text: &str) {
    let mut f = std::fs::File::create(path).expect("create");
    f.write_all(text.as_bytes()).expect("write");
}

const TESTS: &[(&str, fn())] = &[
    (
        "startup_has_the_right_workers_ids_hooks_and_titles",
        startup_has_the_right_workers_ids_hooks_and_titles,
    ),
    (
        "a_forked_worker_keeps_nothing_of_the_masters",
        a_forked_worker_keeps_nothing_of_the_masters,
    ),
    (
        "sighup_to_one_worker_calls_only_its_reload",
        sighup_to_one_worker_calls_only_its_reload,
    ),
    (
        "a_service_without_reload_exits_on_sighup_and_comes_back_with_its_id",
        a_service_without_reload_exits_on_sighup_and_comes_back_with_its_id,
    ),
    (
        "a_terminate_that_exits_with_a_code_is_reported_and_restarted",
        a_terminate_that_exits_with_a_code_is_reported_and_restarted,
    ),
    (
        "reconfigure_from_a_hook_and_scale_over_the_socket",
        reconfigure_from_a_hook_and_scale_over_the_socket,
    ),
    (
        "sighup_to_the_master_runs_the_reload_hooks_then_every_workers_reload",
        sighup_to_the_master_runs_the_reload_hooks_then_every_workers_reload,
    ),
    (
        "sigterm_runs_the_terminate_hooks_then_every_terminate_then_exits_0",
        sigterm_runs_the_terminate_hooks_then_every_terminate_then_exits_0,
    ),
    (
        "sigint_stops_everything_at_once_and_exits_1",
        sigint_stops_everything_at_once_and_exits_1,
    ),
    (
        "sigkill_of_the_master_makes_every_worker_terminate_and_exit",
        sigkill_of_the_master_makes_every_worker_terminate_and_exit,
    ),
    (
        "a_panicking_body_is_restarted_with_backoff_and_sigterm_ends_cleanly",
        a_panicking_body_is_restarted_with_backoff_and_sigterm_ends_cleanly,
    ),
    (
        "a_hanging_terminate_is_cut_off_at_the_stop_timeout",
        a_hanging_terminate_is_cut_off_at_the_stop_timeout,
    ),
    (
        "sigterm_right_after_the_start_still_ends_cleanly",
        sigterm_right_after_the_start_still_ends_cleanly,
    ),
    (
        "a_notify_service_is_running_once_it_says_ready",
        a_notify_service_is_running_once_it_says_ready,
    ),
    (
        "locks_of_the_options_are_taken_before_the_service_runs",
        locks_of_the_options_are_taken_before_the_service_runs,
    ),
    (
        "typed_jobs_end_to_end_with_a_worker_killed_mid_job",
        typed_jobs_end_to_end_with_a_worker_killed_mid_job,
    ),
    (
        "example_producer_consumer_runs_and_ends_by_itself",
        example_producer_consumer_runs_and_ends_by_itself,
    ),
    (
        "run_refuses_a_process_that_runs_threads",
        run_refuses_a_process_that_runs_threads,
    ),
    (
        "example_service_pool_runs_and_ends_by_itself",
        example_service_pool_runs_and_ends_by_itself,
    ),
    (
        "example_reload_config_rereads_its_file_on_sighup",
        example_reload_config_rereads_its_file_on_sighup,
    ),
];

fn main() {
    if let Ok(scenario) = std::env::var(SCENARIO) {
        std::process::exit(scenarios::run(&scenario));
    }
    // `cargo test` passes libtest's flags (`--quiet`, `--nocapture`…): the first argument
    // that is not a flag filters by name, the rest are ignored.
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let chosen: Vec<_> = TESTS
        .iter()
        .filter(|(name, _)| filter.as_deref().is_none_or(|f| name.contains(f)))
        .collect();
    println!("running {} tests", chosen.len());
    // Each test in its own thread, all at once: they share nothing but the machine.
    let handles: Vec<_> = chosen
        .iter()
        .map(|&&(name, test)| (name, std::thread::spawn(test)))
        .collect();
    let mut failed = Vec::new();
    for (name, handle) in handles {
        match handle.join() {
            Ok(()) => println!("test {name} ... ok"),
            Err(_) => {
                println!("test {name} ... FAILED");
                failed.push(name);
            }
        }
    }
    if failed.is_empty() {
        println!("\ntest result: ok. {} passed", chosen.len());
    } else {
        println!("\nfailures: {failed:?}\ntest result: FAILED");
        std::process::exit(101);
    }
}
