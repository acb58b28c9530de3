//! Queues shared by several masters through one Redis (SPEC §10, first bullet), end to end:
//! each test starts its own `redis-server` (appendonly on) on a free loopback port in a temp
//! dir, and two or three masters, each in its own sandbox with its own `node` name.
//!
//! The worker (`rw.sh`) appends `NODE PAYLOAD` to a log shared by all masters for each job it
//! does, then answers `ok PAYLOAD`; a payload starting `fail` is answered `fail nope`, one
//! starting `drop` `drop bad`, one starting `slow` after 3 s. "Every job answered at least once" is read from that log;
//! duplicates (allowed: delivery is at least once) are counted and printed.

mod common;
#[path = "common/etcd.rs"]
mod etcd;

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use plumule::protocol::{DeadLetters, QueueCounts, QueueReport};

/// A `redis-server` of the test's own: killed on drop.
struct Redis {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    password: Option<String>,
    child: Option<Child>,
}

impl Redis {
    /// `None` (the test skips, loudly) where redis-server is not installed and `CI` is unset.
    fn start() -> Option<Redis> {
        Redis::start_with(None)
    }

    fn start_with(password: Option<&str>) -> Option<Redis> {
        let bin = needed_program("redis-server", "redis-server")?;
        let dir = tempfile::Builder::new()
            .prefix("plumule-redis.")
            .tempdir()
            .expect("temp dir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind port 0")
            .local_addr()
            .unwrap()
            .port();
        let mut r = Redis {
            bin,
            dir,
            port,
            password: password.map(str::to_string),
            child: None,
        };
        r.spawn();
        Some(r)
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new(&self.bin);
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--save", "", "--appendonly", "yes", "--daemonize", "no"])
            .arg("--unixsocket")
            .arg(self.socket())
            .args(["--unixsocketperm", "700"]);
        if let Some(p) = &self.password {
            cmd.args(["--requirepass", p]);
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        wait_for("redis-server answers PING", DEADLINE, || {
            self.try_command(&["PING"]).is_ok()
        });
    }

    /// SIGKILLs it (what it had written to its append-only file stays).
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and dir.
    fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("redis.sock")
    }

    fn url(&self) -> String {
        match &self.password {
            Some(p) => format!("redis://:{p}@127.0.0.1:{}/0", self.port),
            None => format!("redis://127.0.0.1:{}/0", self.port),
        }
    }

    /// One command over RESP; the reply's first line.
    fn try_command(&self, args: &[&str]) -> std::io::Result<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut out = Vec::new();
        let mut frame = |args: &[&str]| {
            out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
            for a in args {
                out.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
            }
        };
        if let Some(p) = &self.password {
            frame(&["AUTH", p]);
        }
        frame(args);
        s.write_all(&out)?;
        let mut r = BufReader::new(s);
        let mut line = String::new();
        if self.password.is_some() {
            r.read_line(&mut line)?;
            line.clear();
        }
        r.read_line(&mut line)?;
        if line.is_empty() {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(line.trim_end().to_string())
    }

    fn command(&self, args: &[&str]) -> String {
        self.try_command(args)
            .unwrap_or_else(|e| panic!("redis {args:?}: {e}"))
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The worker every master runs: logs `NODE PAYLOAD` to `log`, answers.
fn worker_script(dir: &Path) -> PathBuf {
    let path = dir.join("rw.sh");
    let log = dir.join("done");
    fs::write(
        &path,
        format!(
            "#!/bin/sh\n\
             while read -r job; do\n\
             \x20 case \"$job\" in\n\
             \x20   fail*) echo \"$NODE $job\" >> {log}; echo \"fail nope\";;\n\
             \x20   drop*) echo \"$NODE $job\" >> {log}; echo \"drop bad\";;\n\
             \x20   slow*) sleep 3; echo \"$NODE $job\" >> {log}; echo \"ok $job\";;\n\
             \x20   *) [ -n \"$DELAY\" ] && sleep \"$DELAY\"; echo \"$NODE $job\" >> {log}; \
             echo \"ok $job\";;\n\
             \x20 esac\n\
             done\n",
            log = sh_str(&log)
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// One master of the cluster: its sandbox, config and process.
struct Master {
    sb: Sandbox,
    config: PathBuf,
    daemon: Option<Daemon>,
}

impl Master {
    /// A master named `node` whose program `w` (`workers` workers of `worker`) consumes
    /// queue `q` in `redis`; `queue_extra` adds keys to `[queue.q]`.
    fn start(
        node: &str,
        redis: &Redis,
        worker: &Path,
        workers: u32,
        delay: &str,
        queue_extra: &str,
    ) -> Master {
        Master::start_at(node, &redis.url(), worker, workers, delay, queue_extra)
    }

    fn start_at(
        node: &str,
        url: &str,
        worker: &Path,
        workers: u32,
        delay: &str,
        queue_extra: &str,
    ) -> Master {
        Master::start_full(node, url, None, worker, workers, delay, queue_extra)
    }

    /// With `etcd`: a member of the cluster on that etcd (lease 2s).
    fn start_full(
        node: &str,
        url: &str,
        etcd: Option<&str>,
        worker: &Path,
        workers: u32,
        delay: &str,
        queue_extra: &str,
    ) -> Master {
        let sb = Sandbox::with_budget(Duration::from_secs(40));
        let cluster = etcd.map_or(String::new(), |e| {
            format!("cluster = {{ etcd = [\"{e}\"], lease = \"2s\" }}\n")
        });
        let header = sb.header().replacen(
            "[plumule]\n",
            &format!("[plumule]\nnode = \"{node}\"\n{cluster}"),
            1,
        );
        let text = format!(
            "{header}[program.w]\ncommand = [{}]\nworkers = {workers}\nqueue = \"q\"\n\
             env = {{ NODE = \"{node}\", DELAY = \"{delay}\" }}\n\n\
             [queue.q]\nbackend = \"{}\"\nclaim_after = \"1s\"\nmax_attempts = 3\n\
             retry_backoff = {{ initial = \"50ms\", max = \"200ms\" }}\n{queue_extra}",
            toml_str(worker),
            url
        );
        // A config holding a password is for its owner's eyes only.
        let config = sb.write_file("plumule.toml", &text, 0o600);
        let daemon = sb.start(&config);
        let m = Master {
            sb,
            config,
            daemon: Some(daemon),
        };
        m.sb.wait("the master answers `queue`", DEADLINE, || {
            m.sb.cli(&m.config, &["queue", "--json"]).status.success()
        });
        m
    }

    fn cli(&self, args: &[&str]) -> Outcome {
        self.sb.cli(&self.config, args)
    }

    fn cli_ok(&self, args: &[&str]) -> Outcome {
        self.sb.cli_ok(&self.config, args)
    }

    fn counts(&self) -> QueueCounts {
        let out = self.sb.cli_ok(&self.config, &["queue", "--json"]);
        let report: QueueReport = serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("queue --json: {e}: {}", out.stdout));
        report.queues.into_iter().next().expect("queue q")
    }

    fn kill(&mut self) {
        if let Some(d) = self.daemon.as_mut() {
            d.signal(nix::sys::signal::Signal::SIGKILL);
            d.wait_exit(DEADLINE);
        }
        self.daemon = None;
    }

    fn pid(&self) -> i32 {
        self.daemon.as_ref().expect("running").pid()
    }
}

/// Submits `jobs` on `m`, without waiting for outcomes.
fn submit(m: &Master, jobs: &[String]) {
    let mut args = vec!["submit", "q"];
    args.extend(jobs.iter().map(String::as_str));
    let out = m.cli(&args);
    assert!(out.status.success(), "submit: {}", out.stderr);
}

fn numbered(range: std::ops::Range<u32>) -> Vec<String> {
    range.map(|i| i.to_string()).collect()
}

/// How often each payload was done, and by which nodes, from the shared log.
fn done_log(dir: &Path) -> BTreeMap<String, Vec<String>> {
    let mut done: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in fs::read_to_string(dir.join("done"))
        .unwrap_or_default()
        .lines()
    {
        if let Some((node, job)) = line.split_once(' ') {
            done.entry(job.to_string()).or_default().push(node.into());
        }
    }
    done
}

/// Waits until every job of `jobs` was done at least once and the queue is empty on `m`
/// (every answer recorded); returns the duplicates (jobs done more than once), printed.
fn all_done(m: &Master, dir: &Path, jobs: &[String], deadline: Duration) -> usize {
    m.sb.wait("every job done at least once", deadline, || {
        let done = done_log(dir);
        jobs.iter().all(|j| done.contains_key(j))
    });
    m.sb.wait("nothing left pending or in flight", deadline, || {
        let c = m.counts();
        c.pending == 0 && c.in_flight == 0
    });
    let done = done_log(dir);
    let dups: usize = done.values().map(|v| v.len() - 1).sum();
    eprintln!(
        "{} jobs done, {} duplicate run(s) (at least once)",
        jobs.len(),
        dups
    );
    dups
}

#[test]
fn jobs_submitted_on_one_master_are_done_by_the_workers_of_all_three() {
    let Some(redis) = Redis::start() else { return };
    let shared = tempfile::tempdir().unwrap();
    let w = worker_script(shared.path());
    let masters: Vec<Master> = ["a", "b", "c"]
        .iter()
        .map(|n| Master::start(n, &redis, &w, 2, "0.02", ""))
        .collect();
    let jobs = numbered(1..151);
    let mut args = vec!["submit", "q", "--wait"];
    args.extend(jobs.iter().map(String::as_str));
    let out = masters[0].cli(&args);
    assert!(out.status.success(), "submit --wait: {}", out.stderr);
    // One line per job, in submission order, each its own result.
    let expected: Vec<String> = jobs.iter().map(|j| format!("ok {j}")).collect();
    assert_eq!(out.stdout.lines().collect::<Vec<_>>(), expected);
    let done = done_log(shared.path());
    for node in ["a", "b", "c"] {
        let n = done.values().flatten().filter(|d| *d == node).count();
        assert!(n > 0, "master {node} did no job: {done:?}");
    }
    // Every master counts the whole stream.
    let counts: Vec<QueueCounts> = masters.iter().map(Master::counts).collect();
    for c in &counts {
        assert_eq!((c.pending, c.in_flight, c.dead), (0, 0, 0), "{counts:?}");
        assert!(c.done >= 150, "{counts:?}");
        assert_eq!(c, &counts[0], "the masters disagree: {counts:?}");
    }
    // Answered entries are trimmed away (whole stream nodes of 100 entries at most remain).
    let len = redis.command(&["XLEN", "plumule:q"]);
    let len: u64 = len.trim_start_matches(':').parse().unwrap();
    assert!(len <= 100, "the stream still holds {len} entries");
    // Ids are cluster-wide: a second batch on another master goes on from the first.
    masters[1].cli_ok(&["submit", "q", "x"]);
    assert_eq!(redis.command(&["INCRBY", "plumule:q:seq", "0"]), ":151");
}

#[test]
fn a_master_sigkilled_mid_stream_loses_no_job() {
    let Some(redis) = Redis::start() else { return };
    let shared = tempfile::tempdir().unwrap();
    let w = worker_script(shared.path());
    let mut a = Master::start("a", &redis, &w, 2, "0.02", "prefetch = 4\n");
    let b = Master::start("b", &redis, &w, 2, "0.02", "prefetch = 4\n");
    let jobs = numbered(1..201);
    submit(&b, &jobs);
    a.sb.wait("master a did some jobs", DEADLINE, || {
        done_log(shared.path())
            .values()
            .flatten()
            .filter(|n| *n == "a")
            .count()
            >= 10
    });
    a.kill();
    // What a held is taken over by b after claim_after (1s).
    all_done(&b, shared.path(), &jobs, Duration::from_secs(30));
    let c = b.counts();
    assert!(c.done >= 200, "{c:?}");
    assert_eq!(c.dead, 0, "{c:?}");
    // a held jobs when it died (2 workers, prefetch 4, 20 ms a job): b took them over.
    let log = fs::read_to_string(b.sb.path("plumule-1.stderr")).unwrap_or_default();
    assert!(log.contains("took over"), "{log}");
    assert!(c.retried > 0, "a take-over counts an attempt: {c:?}");
}

#[test]
fn redis_killed_and_restarted_mid_stream_loses_no_job() {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    let shared = tempfile::tempdir().unwrap();
    let w = worker_script(shared.path());
    let a = Master::start("a", &redis, &w, 2, "0.02", "");
    let b = Master::start("b", &redis, &w, 2, "0.02", "");
    let jobs = numbered(1..201);
    submit(&a, &jobs);
    a.sb.wait("some jobs done", DEADLINE, || {
        done_log(shared.path()).len() >= 20
    });
    redis.kill();
    // Unreachable: submit fails at once, saying where; supervision goes on.
    let started = Instant::now();
    let out = a.cli(&["submit", "q", "late"]);
    assert_exit_code(out.status, 1, &out.stderr);
    assert!(
        out.stderr
            .contains(&format!("redis://127.0.0.1:{}/0 unreachable", redis.port)),
        "{}",
        out.stderr
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "submit took {:?} to fail",
        started.elapsed()
    );
    let out = a.cli(&["queue", "--json"]);
    assert_exit_code(out.status, 1, &out.stderr);
    assert!(out.stderr.contains("unreachable"), "{}", out.stderr);
    let (code, _) = a.sb.status(&a.config);
    assert_eq!(code, 0);
    redis.restart();
    all_done(&a, shared.path(), &jobs, Duration::from_secs(30));
    let counts = (a.counts(), b.counts());
    assert_eq!(counts.0, counts.1);
}

#[test]
fn retries_dead_letters_and_requeue_across_masters() {
    let Some(redis) = Redis::start() else { return };
    let shared = tempfile::tempdir().unwrap();
    let w = worker_script(shared.path());
    let a = Master::start("a", &redis, &w, 1, "", "");
    let b = Master::start("b", &redis, &w, 1, "", "");
    let out = a.cli(&["submit", "q", "--wait", "fail-1", "fine", "drop-1"]);
    assert_exit_code(out.status, 1, &out.stderr);
    assert_eq!(
        out.stdout.lines().collect::<Vec<_>>(),
        ["dead nope", "ok fine", "dead bad"]
    );
    // fail-1 ran max_attempts (3) times, on whichever master fetched it.
    let runs = done_log(shared.path());
    assert_eq!(runs["fail-1"].len(), 3, "{runs:?}");
    assert_eq!(runs["drop-1"].len(), 1, "{runs:?}");
    // The dead letters are the cluster's: listed and requeued on the other master.
    let out = b.cli(&["queue", "q", "--dead", "--json"]);
    assert!(out.status.success(), "{}", out.stderr);
    let dead: DeadLetters = serde_json::from_str(&out.stdout).unwrap();
    let mut seen: Vec<(String, u32, String)> = dead
        .dead
        .iter()
        .map(|d| (d.payload.clone(), d.attempts, d.reason.clone()))
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            ("drop-1".to_string(), 1, "bad".to_string()),
            ("fail-1".to_string(), 3, "nope".to_string())
        ]
    );
    let (ca, cb) = (a.counts(), b.counts());
    assert_eq!(ca, cb);
    assert_eq!((ca.dead, ca.retried), (2, 2), "{ca:?}");
    let id = dead.dead.iter().find(|d| d.payload == "drop-1").unwrap().id;
    let out = b.cli(&["requeue", "q", "999999"]);
    assert_exit_code(out.status, 1, &out.stderr);
    assert!(
        out.stderr.contains("no dead letter with id 999999"),
        "{}",
        out.stderr
    );
    b.cli_ok(&["requeue", "q", &id.to_string()]);
    a.sb.wait("the requeued job ran again", DEADLINE, || {
        done_log(shared.path())
            .get("drop-1")
            .is_some_and(|v| v.len() == 2)
    });
    a.sb.wait(
        "it is dead again, on both masters' counts",
        DEADLINE,
        || {
            let c = a.counts();
            c.dead == 2 && c.pending == 0 && c.in_flight == 0 && c == b.counts()
        },
    );
}

#[test]
fn garbage_in_the_stream_is_dead_lettered_not_a_crash() {
    let Some(redis) = Redis::start() else { return };
    let shared = tempfile::tempdir().unwrap();
    let w = worker_script(shared.path());
    let a = Master::start("a", &redis, &w, 1, "", "");
    let reply = redis.command(&["XADD", "plumule:q", "*", "foo", "bar"]);
    assert!(reply.starts_with('$'), "XADD: {reply}");
    a.sb.wait("the garbage is a dead letter", DEADLINE, || {
        a.counts().dead == 1
    });
    let out = a.cli_ok(&["queue", "q", "--dead", "--json"]);
    let dead: DeadLetters = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(dead.dead.len(), 1);
    assert_eq!(dead.dead[0].payload, "foo=bar");
    assert!(
        dead.dead[0]
            .reason
            .contains("not a plumule job: no `id` field"),
        "{:?}",
        dead.dead[0]
    );
    // The master and its queue go on.
    let out = a.cli(&["submit", "q", "--wait", "after"]);
    assert!(out.status.success(), "{}", out.stderr);
    assert_eq!(out.stdout.trim(), "ok after");
}

/// The Redis helper's pid: the child of `master` named plumule-redis.
fn helper_pid(master: i32) -> Option<i32> {
    live_children(master)
        .into_iter()
        .find(|p| p.comm == "plumule-redis")
        .map(|p| p.pid)
}

#[test]
fn a_killed_redis_helper_is_restarted_and_loses_nothing() {
    let Some(redis) = Redis::start_with(Some("s3cret-pw")) else {
        return;
    };
    let shared = tempfile::tempdir().unwrap();
    let w = worker_script(shared.path());
    let a = Master::start("a", &redis, &w, 2, "0.01", "");
    let first = helper_pid(a.pid()).expect("a Redis helper runs");
    // The password is in no argv.
    let cmdline = fs::read(format!("/proc/{first}/cmdline")).unwrap();
    assert!(!String::from_utf8_lossy(&cmdline).contains("s3cret"));
    let jobs = numbered(1..201);
    // A client waits for every outcome meanwhile: they come, in order, across the restart.
    let cfg = a.config.display().to_string();
    let mut args = vec!["submit", "q", "--wait", "-c", &cfg];
    args.extend(jobs.iter().map(String::as_str));
    let mut waiting = a.sb.spawn_plumule(&args);
    a.sb.wait("some jobs done", DEADLINE, || {
        done_log(shared.path()).len() >= 20
    });
    send(first, nix::sys::signal::Signal::SIGKILL);
    a.sb.wait("another helper runs", DEADLINE, || {
        helper_pid(a.pid()).is_some_and(|p| p != first)
    });
    all_done(&a, shared.path(), &jobs, Duration::from_secs(30));
    let c = a.counts();
    assert!(c.done >= 200, "{c:?}");
    let status = waiting.wait_exit(DEADLINE);
    assert_exit_code(status, 0, &waiting.stderr_text());
    let expected: Vec<String> = jobs.iter().map(|j| format!("ok {j}")).collect();
    assert_eq!(waiting.stdout_text().lines().collect::<Vec<_>>(), expected);
    // Nothing the master logged shows the password.
    let mut log = String::new();
    fs::File::open(a.sb.path("plumule-1.stderr"))
        .and_then(|mut f| f.read_to_string(&mut log))
        .ok();
    assert!(!log.contains("s3cret"), "{log}");
}

#[test]
fn a_live_master_keeps_a_job_longer_than_claim_after() {
    let Some(redis) = Redis::start() else { return };
    let shared = tempfile::tempdir().unwrap();
    let w = worker_script(shared.path());
    let a = Master::start("a", &redis, &w, 1, "", "");
    // b has a worker too, idle: it would claim whatever sits idle past claim_after (1s).
    let b = Master::start("b", &redis, &w, 1, "", "");
    // The job runs 3 s on a, three times claim_after: a keeps it claimed while it lives.
    let out = a.cli(&["submit", "q", "--wait", "slow-1"]);
    assert!(out.status.success(), "{}", out.stderr);
    assert_eq!(out.stdout.trim(), "ok slow-1");
    let runs = done_log(shared.path());
    assert_eq!(runs["slow-1"].len(), 1, "{runs:?}");
    let c = b.counts();
    assert_eq!((c.done, c.retried, c.in_flight), (1, 0, 0), "{c:?}");
}

#[test]
fn a_graceful_stop_records_every_answer_and_a_restart_takes_back_its_own() {
    let Some(redis) = Redis::start() else { return };
    let shared = tempfile::tempdir().unwrap();
    let w = worker_script(shared.path());
    let mut a = Master::start("a", &redis, &w, 2, "0.01", "prefetch = 8\n");
    let jobs = numbered(1..201);
    submit(&a, &jobs);
    a.sb.wait("some jobs done", DEADLINE, || {
        done_log(shared.path()).len() >= 20
    });
    let daemon = a.daemon.as_mut().expect("running");
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    daemon.wait_exit(DEADLINE);
    a.daemon = None;
    // The same node again: it first reads what it held (no claim_after to wait for).
    let a2 = Master::start("a", &redis, &w, 2, "0.01", "prefetch = 8\n");
    let dups = all_done(&a2, shared.path(), &jobs, Duration::from_secs(30));
    assert_eq!(dups, 0, "a graceful stop recorded every answer");
    let c = a2.counts();
    assert_eq!((c.done, c.retried), (200, 0), "{c:?}");
}

#[test]
fn a_config_with_a_redis_password_readable_by_others_is_refused() {
    let sb = Sandbox::new();
    let text = format!(
        "{}[queue.q]\nbackend = \"redis://:hunter2@127.0.0.1:1/0\"\n",
        sb.header()
    );
    let config = sb.write_file("plumule.toml", &text, 0o644);
    let out = sb.cli(&config, &["check"]);
    assert_exit_code(out.status, 1, &out.stderr);
    assert!(out.stderr.contains("readable by others"), "{}", out.stderr);
    assert!(!out.stderr.contains("hunter2"), "{}", out.stderr);
    fs::set_permissions(&config, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let out = sb.cli(&config, &["check"]);
    assert!(out.status.success(), "{}", out.stderr);
    assert!(!out.stdout.contains("hunter2"), "{}", out.stdout);
}

#[test]
fn a_queue_over_a_unix_socket() {
    let Some(redis) = Redis::start() else { return };
    let shared = tempfile::tempdir().unwrap();
    let w = worker_script(shared.path());
    let url = format!("unix://{}", redis.socket().display());
    let a = Master::start_at("a", &url, &w, 1, "", "");
    let out = a.cli(&["submit", "q", "--wait", "over-unix"]);
    assert!(out.status.success(), "{}", out.stderr);
    assert_eq!(out.stdout.trim(), "ok over-unix");
}

#[test]
fn max_pending_holds_across_masters() {
    let Some(redis) = Redis::start() else { return };
    let shared = tempfile::tempdir().unwrap();
    let w = worker_script(shared.path());
    // Producers only (no worker runs): the jobs stay pending.
    let a = Master::start("a", &redis, &w, 0, "", "max_pending = 5\n");
    let b = Master::start("b", &redis, &w, 0, "", "max_pending = 5\n");
    a.cli_ok(&["submit", "q", "1", "2", "3"]);
    let out = b.cli(&["submit", "q", "4", "5", "6"]);
    assert_exit_code(out.status, 1, &out.stderr);
    assert!(
        out.stderr.contains("queue is full: 3 job(s)") && out.stderr.contains("refused whole"),
        "{}",
        out.stderr
    );
    b.cli_ok(&["submit", "q", "4", "5"]);
    let c = a.counts();
    assert_eq!((c.pending, c.in_flight), (5, 0), "{c:?}");
}

#[test]
fn a_reload_of_claim_after_replaces_the_helper_and_the_queue_goes_on() {
    let Some(redis) = Redis::start() else { return };
    let shared = tempfile::tempdir().unwrap();
    let w = worker_script(shared.path());
    let a = Master::start("a", &redis, &w, 1, "", "");
    let first = helper_pid(a.pid()).expect("a Redis helper runs");
    let text = fs::read_to_string(&a.config).unwrap();
    fs::write(
        &a.config,
        text.replace("claim_after = \"1s\"", "claim_after = \"2s\""),
    )
    .unwrap();
    let out = a.cli_ok(&["reload"]);
    assert!(
        out.stdout.contains("queue q: settings changed"),
        "{}",
        out.stdout
    );
    a.sb.wait("a new helper runs", DEADLINE, || {
        helper_pid(a.pid()).is_some_and(|p| p != first)
    });
    let out = a.cli_ok(&["submit", "q", "--wait", "after-reload"]);
    assert_eq!(out.stdout.trim(), "ok after-reload");
}

/// A member of a cluster on `etcd` whose queue q (in `redis`) is key-routed: partitioned.
fn clustered(node: &str, redis: &Redis, etcd: &etcd::Etcd, w: &Path, delay: &str) -> Master {
    clustered_with(node, redis, etcd, w, 2, delay, "")
}

fn clustered_with(
    node: &str,
    redis: &Redis,
    etcd: &etcd::Etcd,
    w: &Path,
    workers: u32,
    delay: &str,
    extra: &str,
) -> Master {
    Master::start_full(
        node,
        &redis.url(),
        Some(&etcd.url()),
        w,
        workers,
        delay,
        &format!("route = \"key\"\n{extra}"),
    )
}

/// The lines of `m`'s log saying which partitions it owns among `n` consuming masters.
fn owner_lines(m: &Master, n: usize) -> usize {
    let among = format!("({n} master(s) consume it)");
    m.daemon
        .as_ref()
        .expect("running")
        .stderr_lines_with(&["queue q: owns", &among])
        .len()
}

/// Waits until each of `masters` has logged more than `before[i]` lines of partitions
/// owned among `n` masters.
fn wait_owners(masters: &[&Master], n: usize, before: &[usize]) {
    for (m, b) in masters
        .iter()
        .zip(before.iter().chain(std::iter::repeat(&0)))
    {
        m.sb.wait(
            &format!("the master owns its partitions among {n}"),
            DEADLINE,
            || owner_lines(m, n) > *b,
        );
    }
}

/// Submits two jobs `KEY-TAG-1`, `KEY-TAG-2` with key `KEY` for each key, through `m`, and
/// waits until all are done; returns the nodes that did each key's jobs of this round.
fn keyed_round(
    m: &Master,
    dir: &Path,
    keys: &[String],
    tag: &str,
) -> BTreeMap<String, std::collections::BTreeSet<String>> {
    let mut jobs = Vec::new();
    for k in keys {
        let (one, two) = (format!("{k}-{tag}-1"), format!("{k}-{tag}-2"));
        m.cli_ok(&["submit", "q", "--key", k, &one, &two]);
        jobs.push(one);
        jobs.push(two);
    }
    m.sb.wait(&format!("round {tag} done"), DEADLINE, || {
        let done = done_log(dir);
        jobs.iter().all(|j| done.contains_key(j))
    });
    let mut placed: BTreeMap<String, std::collections::BTreeSet<String>> = BTreeMap::new();
    for (job, nodes) in done_log(dir) {
        for k in keys {
            if job.starts_with(&format!("{k}-{tag}-")) {
                placed
                    .entry(k.clone())
                    .or_default()
                    .extend(nodes.iter().cloned());
            }
        }
    }
    placed
}

/// The node that owns `key`'s partition among `members` (as every master computes it).
fn owner_of(key: &str, members: &[&str]) -> String {
    use plumule::cluster::partition::{owner, partition_of};
    owner("q", partition_of(key.as_bytes(), 64), members)
        .expect("a member")
        .to_string()
}

#[test]
fn keyed_jobs_stick_to_their_partition_owner_and_a_third_master_takes_about_a_third() {
    let Some(etcd) = etcd::Etcd::start() else {
        return;
    };
    let Some(redis) = Redis::start() else { return };
    let shared = tempfile::tempdir().unwrap();
    let w = worker_script(shared.path());
    let a = clustered("a", &redis, &etcd, &w, "");
    let b = clustered("b", &redis, &etcd, &w, "");
    wait_owners(&[&a, &b], 2, &[]);
    let keys: Vec<String> = (0..48).map(|i| format!("user{i}")).collect();
    // A first round lets reads begun before the membership settled end.
    keyed_round(&a, shared.path(), &keys, "warm");
    let two = keyed_round(&b, shared.path(), &keys, "r1");
    for (k, nodes) in &two {
        let want = owner_of(k, &["a", "b"]);
        assert_eq!(
            nodes.iter().collect::<Vec<_>>(),
            vec![&want],
            "key {k}: done by {nodes:?}, its partition's owner is {want}"
        );
    }
    // Both take a share.
    for n in ["a", "b"] {
        assert!(
            two.values().any(|s| s.contains(n)),
            "{n} did no key: {two:?}"
        );
    }
    // Submitted anywhere, a key goes to the same node again.
    let again = keyed_round(&a, shared.path(), &keys, "r2");
    assert_eq!(again, two, "keys moved while the membership was stable");

    let before = [owner_lines(&a, 3), owner_lines(&b, 3)];
    let c = clustered("c", &redis, &etcd, &w, "");
    wait_owners(&[&a, &b], 3, &before);
    wait_owners(&[&c], 3, &[]);
    keyed_round(&c, shared.path(), &keys, "warm3");
    let three = keyed_round(&c, shared.path(), &keys, "r3");
    let mut moved = 0;
    for (k, nodes) in &three {
        let want = owner_of(k, &["a", "b", "c"]);
        assert_eq!(
            nodes.iter().collect::<Vec<_>>(),
            vec![&want],
            "key {k}: done by {nodes:?}, its partition's owner is {want}"
        );
        if two[k] != *nodes {
            moved += 1;
            // Only to the newcomer: nothing moves between the members that stayed.
            assert_eq!(want, "c", "key {k} moved from {:?} to {want}", two[k]);
        }
    }
    // The partitions that moved, as computed by every master.
    let partitions_moved = (0..64)
        .filter(|&p| {
            use plumule::cluster::partition::owner;
            owner("q", p, &["a", "b"]) != owner("q", p, &["a", "b", "c"])
        })
        .count();
    eprintln!(
        "a third master joined: {partitions_moved}/64 partitions moved, {moved}/{} keys moved \
         (ideal 1/3)",
        keys.len()
    );
    assert!((10..=32).contains(&partitions_moved), "{partitions_moved}");
    assert!(
        moved >= keys.len() / 6 && moved <= keys.len() * 2 / 3,
        "{moved} keys moved"
    );
    // Counts over every partition's stream, from any master.
    for m in [&a, &b, &c] {
        let q = m.counts();
        assert_eq!((q.pending, q.in_flight, q.dead), (0, 0, 0), "{q:?}");
        assert_eq!(q.done, keys.len() as u64 * 2 * 5, "{q:?}");
    }
    // Every stream is one partition's: nothing in the unpartitioned one.
    assert_eq!(redis.command(&["XLEN", "plumule:q"]), ":0");
}

#[test]
fn a_sigkilled_member_s_partitions_go_to_the_others_and_its_jobs_are_claimed() {
    let Some(etcd) = etcd::Etcd::start() else {
        return;
    };
    let Some(redis) = Redis::start() else { return };
    let shared = tempfile::tempdir().unwrap();
    let w = worker_script(shared.path());
    let a = clustered("a", &redis, &etcd, &w, "0.05");
    let b = clustered("b", &redis, &etcd, &w, "0.05");
    let mut c = clustered("c", &redis, &etcd, &w, "0.05");
    wait_owners(&[&a, &b, &c], 3, &[]);
    let keys: Vec<String> = (0..48).map(|i| format!("user{i}")).collect();
    keyed_round(&a, shared.path(), &keys, "warm");
    let before = [owner_lines(&a, 2), owner_lines(&b, 2)];
    // Four jobs per key; c is killed while it has some in flight.
    let mut jobs = Vec::new();
    for k in &keys {
        let mine: Vec<String> = (1..=4).map(|i| format!("{k}-x-{i}")).collect();
        let mut args = vec!["submit", "q", "--key", k];
        args.extend(mine.iter().map(String::as_str));
        a.cli_ok(&args);
        jobs.extend(mine);
    }
    let did_c = |n: usize| {
        done_log(shared.path())
            .iter()
            .filter(|(j, nodes)| j.contains("-x-") && nodes.iter().any(|n| n == "c"))
            .count()
            >= n
    };
    c.sb.wait("c did some of the jobs", DEADLINE, || did_c(4));
    c.kill();
    wait_owners(&[&a, &b], 2, &before);
    all_done(&a, shared.path(), &jobs, Duration::from_secs(30));
    let log = [&a, &b]
        .iter()
        .map(|m| m.daemon.as_ref().unwrap().stderr_text())
        .collect::<String>();
    assert!(
        log.contains("took over"),
        "c's jobs in flight were claimed: {log}"
    );
    let q = a.counts();
    assert_eq!((q.pending, q.in_flight, q.dead), (0, 0, 0), "{q:?}");
    // c's partitions are a's and b's now.
    let after = keyed_round(&b, shared.path(), &keys, "after");
    for (k, nodes) in &after {
        let want = owner_of(k, &["a", "b"]);
        assert_eq!(nodes.iter().collect::<Vec<_>>(), vec![&want], "key {k}");
    }
}

#[test]
fn a_master_whose_workers_stop_gives_back_the_jobs_it_fetched() {
    let Some(redis) = Redis::start() else { return };
    let shared = tempfile::tempdir().unwrap();
    let w = worker_script(shared.path());
    // a fetches up to twice its workers' prefetch, far more than its one slow worker does.
    let a = Master::start("a", &redis, &w, 1, "0.3", "prefetch = 8\n");
    let jobs = numbered(1..41);
    submit(&a, &jobs);
    a.sb.wait("a works", DEADLINE, || !done_log(shared.path()).is_empty());
    let b = Master::start("b", &redis, &w, 2, "", "");
    a.cli_ok(&["stop", "w"]);
    // a lives and would hold what it fetched for ever: it gives it back instead, and b
    // does it (claim_after would never move it).
    all_done(&b, shared.path(), &jobs, Duration::from_secs(20));
    let log = a.daemon.as_ref().unwrap().stderr_text();
    assert!(log.contains("given back to Redis"), "{log}");
    let by_b = done_log(shared.path())
        .values()
        .filter(|n| n.iter().any(|n| n == "b"))
        .count();
    assert!(by_b > 0, "b did none");
    // Given back, not taken over: no attempt counted.
    let q = b.counts();
    assert_eq!((q.pending, q.in_flight, q.dead), (0, 0, 0), "{q:?}");
    // a fetches nothing while it has no worker.
    submit(&b, &numbered(100..110));
    all_done(&b, shared.path(), &numbered(100..110), DEADLINE);
    let late = done_log(shared.path());
    for j in 100..110 {
        assert_eq!(late[&j.to_string()], vec!["b".to_string()]);
    }
}

#[test]
fn wait_dead_letters_requeue_and_counts_work_across_partitions() {
    let Some(etcd) = etcd::Etcd::start() else {
        return;
    };
    let Some(redis) = Redis::start() else { return };
    let shared = tempfile::tempdir().unwrap();
    let w = worker_script(shared.path());
    let a = clustered_with("a", &redis, &etcd, &w, 1, "", "");
    let b = clustered_with("b", &redis, &etcd, &w, 1, "", "");
    wait_owners(&[&a, &b], 2, &[]);
    let out = a.cli(&["submit", "q", "--key", "user1", "--wait", "fail-1", "fine"]);
    assert_exit_code(out.status, 1, &out.stderr);
    assert_eq!(
        out.stdout.lines().collect::<Vec<_>>(),
        ["dead nope", "ok fine"]
    );
    // Without a key: some partition, whoever owns it.
    let out = b.cli(&["submit", "q", "--wait", "drop-1"]);
    assert_exit_code(out.status, 1, &out.stderr);
    assert_eq!(out.stdout.trim(), "dead bad");
    let runs = done_log(shared.path());
    let user1 = owner_of("user1", &["a", "b"]);
    assert_eq!(runs["fail-1"], vec![user1.clone(); 3], "{runs:?}");
    let out = b.cli_ok(&["queue", "q", "--dead", "--json"]);
    let dead: DeadLetters = serde_json::from_str(&out.stdout).unwrap();
    let mut seen: Vec<(String, Option<String>, u32)> = dead
        .dead
        .iter()
        .map(|d| (d.payload.clone(), d.key.clone(), d.attempts))
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            ("drop-1".to_string(), None, 1),
            ("fail-1".to_string(), Some("user1".to_string()), 3)
        ]
    );
    let out = a.cli(&["requeue", "q", "999999"]);
    assert_exit_code(out.status, 1, &out.stderr);
    assert!(
        out.stderr.contains("no dead letter with id 999999"),
        "{}",
        out.stderr
    );
    let id = dead.dead.iter().find(|d| d.payload == "fail-1").unwrap().id;
    a.cli_ok(&["requeue", "q", &id.to_string()]);
    // Back to its key's partition: run by its owner again, dead again.
    a.sb.wait("the requeued job ran again, dead again", DEADLINE, || {
        let c = a.counts();
        done_log(shared.path())["fail-1"].len() == 6 && c.dead == 2 && c.in_flight == 0
    });
    assert_eq!(done_log(shared.path())["fail-1"], vec![user1; 6]);
    let (ca, cb) = (a.counts(), b.counts());
    assert_eq!(ca, cb);
    assert_eq!(
        (ca.pending, ca.in_flight, ca.dead, ca.done),
        (0, 0, 2, 1),
        "{ca:?}"
    );
}

#[test]
fn max_pending_holds_across_partitions() {
    let Some(etcd) = etcd::Etcd::start() else {
        return;
    };
    let Some(redis) = Redis::start() else { return };
    let shared = tempfile::tempdir().unwrap();
    let w = worker_script(shared.path());
    // Consumers by their config, but no worker runs: the jobs stay pending.
    let a = clustered_with("a", &redis, &etcd, &w, 0, "", "max_pending = 5\n");
    let b = clustered_with("b", &redis, &etcd, &w, 0, "", "max_pending = 5\n");
    for k in ["k1", "k2", "k3"] {
        a.cli_ok(&["submit", "q", "--key", k, k]);
    }
    let out = b.cli(&["submit", "q", "--key", "k4", "4", "5", "6"]);
    assert_exit_code(out.status, 1, &out.stderr);
    assert!(
        out.stderr.contains("queue is full: 3 job(s)"),
        "{}",
        out.stderr
    );
    b.cli_ok(&["submit", "q", "4", "5"]);
    let c = a.counts();
    assert_eq!((c.pending, c.in_flight), (5, 0), "{c:?}");
}
