//! Soak and fault tests (issue 14, SPEC §3, §5, §7, §9): the master under many crash/restart
//! cycles, bursts of SIGHUP, hundreds of control connections at once, and a low open-file
//! limit. Each test measures the master from outside (/proc) and prints its figures.
//!
//! Size: small by default, so that `cargo test` stays fast; `PLUMULE_SOAK=1` (set by
//! `.ci/run`) runs the full sizes of issue 14.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;
use plumule::protocol::{Request, Response};

fn soak() -> bool {
    std::env::var("PLUMULE_SOAK").is_ok_and(|v| v == "1")
}

/// `normal` in a default run, `full` under `PLUMULE_SOAK=1`.
fn size(normal: usize, full: usize) -> usize {
    if soak() {
        full
    } else {
        normal
    }
}

/// The whole wait budget of a test: generous under `PLUMULE_SOAK=1`, where sizes are large.
fn budget() -> Duration {
    Duration::from_secs(if soak() { 900 } else { 60 })
}

/// Open descriptors of `pid`.
fn fd_count(pid: i32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("cannot list /proc/{pid}/fd: {e}"))
        .count()
}

/// Resident set size of `pid`, in KiB.
fn rss_kib(pid: i32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
}

/// Threads of `pid` (the master is single-threaded: this stays 1).
fn thread_count(pid: i32) -> usize {
    fs::read_dir(format!("/proc/{pid}/task"))
        .expect("/proc/PID/task")
        .count()
}

/// Waits until `pid`'s descriptor count is the same in two samples one poll apart (a client
/// that just exited may still have its connection open in the master); returns it.
fn settled_fds(sb: &Sandbox, pid: i32) -> usize {
    let mut last = usize::MAX;
    let mut settled = 0;
    sb.wait("the master's descriptor count settles", DEADLINE, || {
        let now = fd_count(pid);
        let same = now == last;
        last = now;
        settled = now;
        same
    });
    settled
}

/// Waits until the master has no more descriptors open than `baseline`; panics with the
/// descriptors it holds (their targets) if it never gets there. Returns the count.
fn wait_fds_back(pid: i32, baseline: usize, what: &str) -> usize {
    let give_up = Instant::now() + DEADLINE;
    loop {
        let now = fd_count(pid);
        if now <= baseline {
            return now;
        }
        if Instant::now() >= give_up {
            let targets: Vec<String> = fs::read_dir(format!("/proc/{pid}/fd"))
                .map(|d| {
                    d.filter_map(|e| {
                        let e = e.ok()?;
                        let t = fs::read_link(e.path()).ok()?;
                        Some(format!(
                            "{} -> {}",
                            e.file_name().to_string_lossy(),
                            t.display()
                        ))
                    })
                    .collect()
                })
                .unwrap_or_default();
            panic!(
                "{what}: the master holds {now} descriptors, {baseline} before:\n{}",
                targets.join("\n")
            );
        }
        reap_adopted_orphans();
        std::thread::sleep(Duration::from_millis(5)); // poll interval of a bounded wait
    }
}

/// `restarts` of worker `program.id`, from a status over the socket.
fn restarts(sb: &Sandbox, program: &str, id: u32) -> u32 {
    worker(&socket_status(sb), program, id).map_or(0, |w| w.restarts)
}

// ---------------------------------------------------------------------------------------------
// 1. Crash/restart cycles

/// A worker that exits at once, restarted after 1 ms each time, thousands of times: the
/// master's descriptors, memory, threads and children are the same afterwards, and no child
/// is left a zombie.
#[test]
fn thousands_of_crash_restart_cycles_leak_nothing() {
    let cycles = size(300, 10_000) as u32;
    let sb = Sandbox::with_budget(budget());
    let steady = sleeper(&sb);
    let config = sb.config(&format!(
        "[program.crash]\ncommand = [\"/bin/false\"]\nhealthy_after = \"1h\"\n\
         backoff = {{ initial = \"1ms\", max = \"1ms\", jitter = 0.0 }}\n\n\
         [program.steady]\ncommand = {}\n",
        argv(&steady)
    ));
    let master = sb.start(&config);
    let pid = master.pid();
    wait_running(&sb, "steady", 1);
    // A warm-up: the master's lazily grown buffers (the log ring among them) take their
    // first allocations.
    let warm_up = 50;
    sb.wait(
        "the crashing worker has restarted 50 times",
        DEADLINE,
        || restarts(&sb, "crash", 0) >= warm_up,
    );
    sb.cli_ok(&config, &["stop", "crash"]);
    let before_restarts = restarts(&sb, "crash", 0);
    let fds_before = settled_fds(&sb, pid);
    let rss_before = rss_kib(pid);
    let children_before = live_children(pid).len();
    let threads_before = thread_count(pid);

    let started = Instant::now();
    sb.cli_ok(&config, &["start", "crash", "--no-wait"]);
    // RSS halfway too: the log ring (10 000 events, 2 per cycle) is full by then in a full
    // run, so what grows in the second half would be a leak.
    let mut rss_half = 0;
    for (part, target) in [
        (2, before_restarts + cycles / 2),
        (1, before_restarts + cycles),
    ] {
        sb.wait(
            &format!(
                "the crashing worker has restarted {} more times",
                cycles / part
            ),
            budget(),
            || restarts(&sb, "crash", 0) >= target,
        );
        if part == 2 {
            rss_half = rss_kib(pid);
        }
    }
    let elapsed = started.elapsed();
    sb.cli_ok(&config, &["stop", "crash"]);
    let survived = restarts(&sb, "crash", 0) - before_restarts;

    let fds_after = wait_fds_back(pid, fds_before, "after the crash/restart cycles");
    let rss_after = rss_kib(pid);
    sb.wait("the master has no zombie child", DEADLINE, || {
        zombie_children(pid).is_empty()
    });
    let children_after = live_children(pid).len();
    let threads_after = thread_count(pid);
    println!(
        "soak: {survived} crash/restart cycles in {elapsed:.1?}; master fds {fds_before} -> \
         {fds_after}, RSS {rss_before} KiB -> {rss_half} KiB halfway -> {rss_after} KiB, live \
         children {children_before} -> {children_after}, threads {threads_before} -> \
         {threads_after}"
    );
    assert!(survived >= cycles);
    assert_eq!(
        children_after, children_before,
        "the master's live children"
    );
    assert_eq!(threads_after, 1, "the master is single-threaded");
    // The log ring holds up to 4 MiB of recent events, which these cycles fill in part; past
    // that, growth would be a leak of memory per cycle.
    let grown = rss_after.saturating_sub(rss_before);
    assert!(
        grown <= 6 * 1024,
        "the master's RSS grew by {grown} KiB over {survived} cycles"
    );
    if soak() {
        let second_half = rss_after.saturating_sub(rss_half);
        assert!(
            second_half <= 1024,
            "the master's RSS grew by {second_half} KiB over the last {} cycles, its log ring \
             full",
            cycles / 2
        );
    }
    // The steady worker was never touched.
    assert_eq!(sb.starts_of("steady").len(), 1);
    assert_eq!(
        worker(&socket_status(&sb), "steady", 0).unwrap().state,
        "running"
    );
}

// ---------------------------------------------------------------------------------------------
// 2. Bursts of SIGHUP

/// Writes the config whole under its name at once (a rename), so that a reload never reads
/// it half written.
fn replace_config(sb: &Sandbox, programs: &str) -> PathBuf {
    let fresh = sb.write_file(
        "plumule.toml.new",
        &format!("{}{programs}", sb.header()),
        0o644,
    );
    let config = sb.path("plumule.toml");
    fs::rename(&fresh, &config).expect("rename the config into place");
    config
}

fn sleepers(sb: &Sandbox, workers: u32) -> String {
    format!(
        "[program.w]\ncommand = {}\nworkers = {workers}\nstop_timeout = \"2s\"\n",
        argv(&sb.path("sleeper.sh"))
    )
}

/// The pids of the live `sleep` processes this sandbox started (the workers).
fn live_sleepers(sb: &Sandbox) -> BTreeSet<i32> {
    sb.marked_processes()
        .into_iter()
        .filter(|p| p.comm == "sleep")
        .map(|p| p.pid)
        .collect()
}

/// Waits until `w` has exactly workers 0..n, all running, and exactly those n worker
/// processes exist (no duplicate, nothing left over from a scale down); returns id → pid.
fn wait_exactly(sb: &Sandbox, n: u32) -> BTreeMap<u32, i32> {
    let mut pids = BTreeMap::new();
    sb.wait(
        &format!("exactly {n} workers of w run, each id once"),
        DEADLINE,
        || {
            let Some(s) = try_status(sb) else {
                return false;
            };
            let listed: Vec<u32> = entries(&s)
                .iter()
                .filter(|e| e.program == "w")
                .map(|e| e.id)
                .collect();
            pids = running(&s, "w");
            let live = live_sleepers(sb);
            listed.iter().copied().eq(0..n)
                && pids.keys().copied().eq(0..n)
                && live == pids.values().copied().collect()
        },
    );
    pids
}

/// SIGHUPs in bursts, the config's `workers` changed before and during each burst: the
/// workers end exactly as the last config says, each id once; then a burst with an invalid
/// config leaves every worker as it was.
#[test]
fn sighup_bursts_leave_exactly_the_configured_workers() {
    let per_burst = size(100, 1000);
    let sb = Sandbox::with_budget(budget());
    sleeper(&sb);
    let config = replace_config(&sb, &sleepers(&sb, 3));
    let master = sb.start(&config);
    let pid = master.pid();
    wait_exactly(&sb, 3);

    let started = Instant::now();
    // (workers before the burst, workers written halfway through it)
    let bursts = [(5, 2), (1, 4), (6, 6), (2, 3)];
    for (first, second) in bursts {
        replace_config(&sb, &sleepers(&sb, first));
        for i in 0..per_burst {
            if i == per_burst / 2 {
                replace_config(&sb, &sleepers(&sb, second));
            }
            send(pid, Signal::SIGHUP);
        }
        wait_exactly(&sb, second);
    }
    let elapsed = started.elapsed();
    let total = per_burst * bursts.len();
    println!(
        "soak: {total} SIGHUPs in {} bursts, {elapsed:.1?}",
        bursts.len()
    );

    // An invalid config: every reload is refused, nothing changes.
    let before = wait_exactly(&sb, 3);
    let starts_before = sb.starts_of("w").len();
    let invalid = format!("{}workers = \"many\"\n", sleepers(&sb, 5));
    replace_config(&sb, &invalid);
    for _ in 0..per_burst {
        send(pid, Signal::SIGHUP);
    }
    master.wait_stderr(&["workers"], DEADLINE);
    let reload = sb.cli(&config, &["reload"]);
    assert_eq!(
        reload.status.code(),
        Some(1),
        "reload of an invalid config: {reload:?}"
    );
    let after = wait_exactly(&sb, 3);
    assert_eq!(after, before, "an invalid config changed the workers");
    assert_eq!(
        sb.starts_of("w").len(),
        starts_before,
        "a worker was started"
    );
    assert_eq!(thread_count(pid), 1);

    // And a valid config is applied again afterwards.
    replace_config(&sb, &sleepers(&sb, 2));
    send(pid, Signal::SIGHUP);
    wait_exactly(&sb, 2);
}

// ---------------------------------------------------------------------------------------------
// 3. Hundreds of control connections at once

/// What one control connection got for its `status`.
#[derive(Debug, PartialEq)]
enum Got {
    Status,
    Refused(String),
}

/// Connections opened all at once, each sending `status`: each gets an answer, or past the
/// master's bound of 128 a clear refusal, within the deadline; the master answers afterwards
/// and its descriptors are back to what they were.
#[test]
fn hundreds_of_control_connections_get_an_answer_or_a_clear_refusal() {
    // Past the master's bound of 128 in the default run too.
    let n = size(200, 500);
    let sb = Sandbox::with_budget(budget());
    let config = sb.config(&format!("[program.w]\ncommand = {}\n", argv(&sleeper(&sb))));
    let master = sb.start(&config);
    let pid = master.pid();
    wait_running(&sb, "w", 1);
    let fds_before = settled_fds(&sb, pid);

    // Connect from a thread, so that a master that stopped accepting fails the test instead
    // of hanging it: a connect to a full backlog blocks.
    let socket = sb.control_socket();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let conns: Vec<UnixStream> = (0..n)
            .map(|i| {
                UnixStream::connect(&socket)
                    .unwrap_or_else(|e| panic!("connection {i} of {n}: {e}"))
            })
            .collect();
        let _ = tx.send(conns);
    });
    let conns = rx
        .recv_timeout(DEADLINE)
        .unwrap_or_else(|e| panic!("{n} connections were not all made within {DEADLINE:?}: {e}"));
    let fds_held = fd_count(pid);

    let mut line = serde_json::to_vec(&Request::Status { program: None }).expect("encode");
    line.push(b'\n');
    for c in &conns {
        c.set_read_timeout(Some(DEADLINE)).expect("read timeout");
        c.set_write_timeout(Some(DEADLINE)).expect("write timeout");
        // A refused connection may be closed already: its refusal is read below.
        let _ = (&*c).write_all(&line);
    }
    let started = Instant::now();
    let mut got = Vec::new();
    for (i, c) in conns.iter().enumerate() {
        let mut answer = String::new();
        BufReader::new(c)
            .read_line(&mut answer)
            .unwrap_or_else(|e| panic!("connection {i}: no answer: {e}"));
        let value: serde_json::Value = serde_json::from_str(&answer)
            .unwrap_or_else(|e| panic!("connection {i}: {answer:?} is not JSON: {e}"));
        got.push(match serde_json::from_value::<Response>(value) {
            Ok(Response::Ok(plumule::protocol::Answer::Status(_))) => Got::Status,
            Ok(Response::Error(error)) => Got::Refused(error),
            other => panic!("connection {i}: unexpected answer {other:?}"),
        });
    }
    let answered = got.iter().filter(|g| **g == Got::Status).count();
    let refused: Vec<&String> = got
        .iter()
        .filter_map(|g| match g {
            Got::Refused(why) => Some(why),
            Got::Status => None,
        })
        .collect();
    println!(
        "soak: {n} control connections at once: {answered} answered, {} refused, in {:.1?}; \
         master fds {fds_before} idle, {fds_held} with them open",
        refused.len(),
        started.elapsed()
    );
    for why in &refused {
        assert!(
            why.contains("too many control connections"),
            "an unclear refusal: {why}"
        );
    }
    assert_eq!(answered, n.min(plumule::control::MAX_CONNECTIONS));
    drop(conns);

    let fds_after = wait_fds_back(pid, fds_before, "after the connections closed");
    assert!(socket_status(&sb).programs.iter().any(|p| p.name == "w"));
    println!("soak: master fds after the connections closed: {fds_after}");
}

// ---------------------------------------------------------------------------------------------
// 4. A low open-file limit

/// The master's open-file limit (soft and hard) in this test.
const NOFILE: u32 = 64;

/// The pid of the master's fork server (its child `plumule-spawner`), if it has one.
fn fork_server(master: i32) -> Option<i32> {
    live_children(master)
        .into_iter()
        .find(|p| p.comm == "plumule-spawner")
        .map(|p| p.pid)
}

/// Connects to the control socket and asks for `status`: Ok with the connection (which the
/// master keeps open) if it answered, Err with the refusal if it refused the connection.
fn held_connection(sb: &Sandbox) -> Result<UnixStream, String> {
    let c = UnixStream::connect(sb.control_socket()).expect("connect to the control socket");
    c.set_read_timeout(Some(DEADLINE)).expect("read timeout");
    c.set_write_timeout(Some(DEADLINE)).expect("write timeout");
    let mut line = serde_json::to_vec(&Request::Status { program: None }).expect("encode");
    line.push(b'\n');
    // A refused connection may be closed before the request is written.
    let _ = (&c).write_all(&line);
    let mut answer = String::new();
    BufReader::new(&c)
        .read_line(&mut answer)
        .unwrap_or_else(|e| panic!("no answer and no refusal within {DEADLINE:?}: {e}"));
    match serde_json::from_str::<Response>(&answer) {
        Ok(Response::Ok(plumule::protocol::Answer::Status(_))) => Ok(c),
        Ok(Response::Error(why)) => Err(why),
        other => panic!("unexpected answer {answer:?}: {other:?}"),
    }
}

/// The master started with `RLIMIT_NOFILE` at 64: a program scaled past what the descriptors
/// allow has its extra workers `failed` with "Too many open files" (in `status` and the log),
/// the workers that run keep running, control clients past the limit are refused clearly
/// (the master neither hangs them nor spins), and once descriptors are freed the failed
/// workers start again with `plumule start`.
#[test]
fn running_out_of_descriptors_is_reported_and_recovered_from() {
    let sb = Sandbox::with_budget(budget());
    let steady = sleeper(&sb);
    let metrics = sb.path("metrics.sock");
    let config = sb.config(&format!(
        "metrics = \"unix:{}\"\n\n[program.a]\ncommand = {}\n\n\
         [program.hog]\ncommand = [\"/bin/sleep\", \"1000\"]\nworkers = 8\n\n\
         [program.b]\ncommand = [\"/bin/sleep\", \"1000\"]\n",
        metrics.display(),
        argv(&steady)
    ));
    let script = format!("ulimit -n {NOFILE} && exec \"$0\" run -c \"$1\"");
    let master = sb.spawn_master_via(
        "/bin/sh",
        &["-c", &script, PLUMULE, &config.display().to_string()],
        "plumule run (ulimit -n 64)",
        |_| {},
    );
    let pid = master.pid();
    let a = wait_running(&sb, "a", 1)[&0];
    wait_running(&sb, "hog", 8);
    wait_running(&sb, "b", 1);
    let fds_idle = settled_fds(&sb, pid);
    let spawner = fork_server(pid);

    // Past the limit: the extra workers fail, saying why.
    sb.cli_ok(&config, &["scale", "b", "10", "--no-wait"]);
    let mut failed = Vec::new();
    sb.wait(
        "every worker of b is running or failed, one failed for lack of descriptors",
        DEADLINE,
        || {
            let s = socket_status(&sb);
            let b: Vec<_> = s.workers().filter(|(p, _)| p.name == "b").collect();
            failed = b
                .iter()
                .filter(|(_, w)| w.state == "failed")
                .map(|(_, w)| (w.id, w.detail.clone().unwrap_or_default()))
                .collect();
            b.len() == 10
                && b.iter()
                    .all(|(_, w)| w.state == "running" || w.state == "failed")
                && failed
                    .iter()
                    .any(|(_, why)| why.contains("Too many open files"))
        },
    );
    master.wait_stderr(&["b.", "Too many open files"], DEADLINE);
    let fds_full = fd_count(pid);
    let running_b = running(&socket_status(&sb), "b").len();

    // What runs is still supervised: the steady worker is the same process, and a worker
    // that exits is restarted.
    assert_eq!(wait_running(&sb, "a", 1)[&0], a);
    let hog = running(&socket_status(&sb), "hog");
    send(hog[&0], Signal::SIGKILL);
    sb.wait("hog.0 runs again as a new process", DEADLINE, || {
        running(&socket_status(&sb), "hog")
            .get(&0)
            .is_some_and(|&p| p != hog[&0])
    });

    // Control clients until the descriptors run out: the one past the limit is told so, at
    // once, not left waiting; the master does not spin on the connection it cannot take.
    let mut held = Vec::new();
    let mut refused = None;
    while refused.is_none() && held.len() < plumule::control::MAX_CONNECTIONS {
        match held_connection(&sb) {
            Ok(c) => held.push(c),
            Err(why) => refused = Some(why),
        }
    }
    let refused = refused.unwrap_or_else(|| {
        panic!(
            "{} idle connections held and none refused (the master holds {} descriptors)",
            held.len(),
            fd_count(pid)
        )
    });
    assert!(
        refused.contains("Too many open files"),
        "an unclear refusal: {refused}"
    );
    // The metrics endpoint, at the limit too: a scraper is told, not left waiting.
    let mut scrape = UnixStream::connect(&metrics).expect("connect to the metrics socket");
    scrape
        .set_read_timeout(Some(DEADLINE))
        .expect("read timeout");
    let _ = scrape.write_all(b"GET /metrics HTTP/1.0\r\n\r\n");
    let mut scraped = String::new();
    let _ = BufReader::new(&scrape).read_line(&mut scraped);
    assert!(
        scraped.starts_with("HTTP/1.1 503") || scraped.starts_with("HTTP/1.0 503"),
        "a scrape past the descriptor limit got {scraped:?}"
    );
    for (what, lines) in [
        (
            "control socket",
            master.stderr_lines_with(&["control socket"]).len(),
        ),
        ("metrics", master.stderr_lines_with(&["metrics:"]).len()),
    ] {
        // One line when it happens, not one per retry of a busy loop.
        assert!(
            lines <= 3,
            "{lines} log lines about the {what} for {} connections",
            held.len()
        );
    }
    let connections_held = held.len();
    drop(held);
    wait_fds_back(pid, fds_full, "after the idle connections closed");

    // Recovery: descriptors freed, the failed workers start.
    sb.cli_ok(&config, &["scale", "hog", "1"]);
    sb.cli_ok(&config, &["start", "b"]);
    wait_running(&sb, "b", 10);
    assert_eq!(wait_running(&sb, "a", 1)[&0], a);
    // Running out was the master's trouble, not its fork server's: that one still forks.
    assert_eq!(fork_server(pid), spawner, "the master's fork server");
    println!(
        "soak: RLIMIT_NOFILE {NOFILE}: master fds {fds_idle} idle, {fds_full} at the limit with \
         b at {running_b} of 10 ({} failed: {:?}); {connections_held} control connections \
         held, the last refused: {}; after recovery b runs 10",
        failed.len(),
        failed.first().map(|(_, why)| why),
        refused.trim()
    );
}
