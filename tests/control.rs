//! The control socket and the operator commands through the real binary (SPEC §1, §7, §9):
//! `status` (table, `--json` shape, exit 3), `stop`/`start`/`restart` by program and by worker
//! id, `scale`, bad input of every kind on the raw socket, and who may connect.
//!
//! Pids are read from `status` and from the start lines the worker scripts write; every
//! assertion about "untouched" compares pids before and after.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use plumule::protocol::{LastExit, StatusReport, WorkerStatus};
use serde_json::{json, Value};

use common::*;

// ---------------------------------------------------------------------------------------------
// Talking to the master

/// One connection to the control socket, every read and write bounded by [`DEADLINE`].
struct Ctl {
    reader: BufReader<UnixStream>,
}

impl Ctl {
    fn connect(path: &Path) -> std::io::Result<Ctl> {
        let stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(DEADLINE))?;
        stream.set_write_timeout(Some(DEADLINE))?;
        Ok(Ctl {
            reader: BufReader::new(stream),
        })
    }

    #[track_caller]
    fn open(sb: &Sandbox) -> Ctl {
        Ctl::connect(&sb.control_socket())
            .unwrap_or_else(|e| panic!("cannot connect to the master: {e}"))
    }

    fn stream(&self) -> &UnixStream {
        self.reader.get_ref()
    }

    #[track_caller]
    fn send(&mut self, bytes: &[u8]) {
        self.stream()
            .write_all(bytes)
            .unwrap_or_else(|e| panic!("cannot send {} bytes: {e}", bytes.len()));
    }

    /// The next answer line; `None` when the master closed the connection.
    #[track_caller]
    fn recv(&mut self) -> Option<Value> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => None,
            Ok(_) => Some(
                serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("the answer {line:?} is not JSON: {e}")),
            ),
            // The master closed with our unread request still queued on its side.
            Err(e) if e.kind() == ErrorKind::ConnectionReset => None,
            Err(e) => panic!("no answer from the master within {DEADLINE:?}: {e}"),
        }
    }

    #[track_caller]
    fn call(&mut self, request: &Value) -> Value {
        self.send(format!("{request}\n").as_bytes());
        self.recv().unwrap_or_else(|| {
            panic!("the master closed the connection instead of answering {request}")
        })
    }
}

/// Every running worker: (program, id) → pid.
fn all_running(status: &StatusReport) -> BTreeMap<(String, u32), i32> {
    entries(status)
        .into_iter()
        .filter(|e| e.state == "running")
        .map(|e| ((e.program, e.id), e.pid.expect("pid")))
        .collect()
}

/// The start line of the process `pid`, once its script has written it.
#[track_caller]
fn wait_start_line(sb: &Sandbox, pid: i32) -> Start {
    let mut found = None;
    sb.wait(
        &format!("pid {pid} has written its start line"),
        DEADLINE,
        || {
            found = sb.starts().into_iter().find(|s| s.pid == pid);
            found.is_some()
        },
    );
    found.unwrap()
}

/// The master still answers `status` and every worker in `before` runs with the same pid.
#[track_caller]
fn assert_unharmed(sb: &Sandbox, before: &BTreeMap<(String, u32), i32>, after_what: &str) {
    let now = all_running(&socket_status(sb));
    assert_eq!(&now, before, "worker pids changed after {after_what}");
    for ((program, id), pid) in before {
        assert!(
            pid_alive(*pid),
            "{program}.{id} (pid {pid}) died after {after_what}"
        );
    }
}

/// A worker that, on the stop signal, waits until the file `gate` exists before it exits:
/// the test decides when a stop completes. The trap is set before the start line is written,
/// so a worker seen started always has it.
fn gated_worker(sb: &Sandbox, name: &str, gate: &Path) -> PathBuf {
    sb.script(
        name,
        &format!(
            "trap 'while [ ! -e {gate} ]; do sleep 0.01; done; exit 0' TERM\n\
             echo \"$PLUMULE_PROGRAM $PLUMULE_WORKER_ID $PLUMULE_WORKERS $$\" >> {starts}\n\
             sleep 1000 &\n\
             wait $!",
            gate = sh_str(gate),
            starts = sh_str(&sb.starts_file()),
        ),
    )
}

// ---------------------------------------------------------------------------------------------
// status

#[test]
fn status_json_lists_every_worker_with_the_spec_fields() {
    let sb = Sandbox::new();
    let s = sleeper(&sb);
    let config = sb.config(&format!(
        "[program.web]\ncommand = {a}\nworkers = 3\n\n[program.cron]\ncommand = {a}\n",
        a = argv(&s)
    ));
    let mut master = sb.start(&config);
    let web = wait_running(&sb, "web", 3);
    let cron = wait_running(&sb, "cron", 1);

    let out = sb.cli_ok(&config, &["status", "--json"]);
    // The field names, on the raw JSON: the wire format is the contract.
    let v: Value = serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("status --json is not one JSON value: {e}\n{}", out.stdout));
    let keys = |v: &Value| -> Vec<String> {
        let mut k: Vec<String> = v.as_object().expect("an object").keys().cloned().collect();
        k.sort();
        k
    };
    assert_eq!(keys(&v), ["programs"], "{v}");
    let mut worker_keys = vec![
        "id",
        "pid",
        "state",
        "detail",
        "uptime_s",
        "restarts",
        "last_exit",
        "locks",
        "in_flight",
        "status",
    ];
    worker_keys.sort();
    for p in v["programs"].as_array().expect("programs is an array") {
        assert_eq!(keys(p), ["name", "workers"], "{p}");
        for w in p["workers"].as_array().expect("workers is an array") {
            assert_eq!(keys(w), worker_keys, "{w}");
        }
    }
    // The values, typed: reading them as a `StatusReport` checks each field's type (a number
    // for `id`, a string or null for `detail`, …).
    let report = parse_status(&out.stdout).unwrap_or_else(|e| panic!("{e}\n{}", out.stdout));
    let mut names: Vec<&str> = report.programs.iter().map(|p| p.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["cron", "web"], "{report:?}");
    for p in &report.programs {
        let expected = if p.name == "web" { &web } else { &cron };
        assert_eq!(p.workers.len(), expected.len(), "{p:?}");
        for w in &p.workers {
            assert_eq!(w.pid, Some(expected[&w.id]), "{w:?}");
            assert_eq!(w.state, "running", "{w:?}");
            assert!(w.uptime_s.is_some_and(|u| u >= 0.0), "{w:?}");
            assert_eq!(w.restarts, 0, "{w:?}");
            assert_eq!(w.last_exit, None, "{w:?}");
            assert!(w.locks.is_empty(), "{w:?}");
            assert_eq!(w.in_flight, 0, "{w:?}");
            assert_eq!(w.status, None, "{w:?}");
        }
    }
    // Start lines and status agree on who runs.
    for (program, pids) in [("web", &web), ("cron", &cron)] {
        for (id, pid) in pids {
            let s = wait_start_line(&sb, *pid);
            assert_eq!((s.program.as_str(), s.id), (program, *id), "{s:?}");
        }
    }

    // One program only; an unknown one is exit 1.
    let out = sb.cli_ok(&config, &["status", "web", "--json"]);
    let report = parse_status(&out.stdout).expect("a status report");
    assert_eq!(report.programs.len(), 1, "{report:?}");
    assert_eq!(report.programs[0].name, "web");
    let out = sb.cli(&config, &["status", "nosuch"]);
    assert_exit_code(out.status, 1, &out.stderr);
    assert!(
        out.stderr.contains("no program named nosuch"),
        "{}",
        out.stderr
    );

    // The table: a header, one row per worker with its pid, a summary.
    let out = sb.cli_ok(&config, &["status"]);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 1 + 4 + 1, "{}", out.stdout);
    for pid in web.values().chain(cron.values()) {
        assert!(
            lines
                .iter()
                .any(|l| l.split_whitespace().any(|w| w == pid.to_string())),
            "no row with pid {pid}:\n{}",
            out.stdout
        );
    }
    stop_cleanly(&mut master);
}

/// A program that fails at once unless `ready` exists, and is `failed` after its first start.
fn flaky_program(sb: &Sandbox) -> String {
    let ready = sb.path("ready");
    let script = sb.worker(
        "flaky.sh",
        &format!("[ -e {} ] || exit 1\nexec sleep 1000", sh_str(&ready)),
    );
    format!(
        "[program.flaky]\ncommand = {}\nstart_limit = {{ burst = 1, interval = \"1h\" }}\n\n",
        argv(&script)
    )
}

#[track_caller]
fn wait_state(sb: &Sandbox, program: &str, id: u32, state: &str) -> WorkerStatus {
    let mut worker = None;
    sb.wait(&format!("{program}.{id} is {state}"), DEADLINE, || {
        let Some(s) = try_status(sb) else {
            return false;
        };
        worker = s
            .workers()
            .find(|(p, w)| p.name == program && w.id == id && w.state == state)
            .map(|(_, w)| w.clone());
        worker.is_some()
    });
    worker.expect("waited for")
}

#[test]
fn status_exits_3_when_a_worker_is_failed() {
    let sb = Sandbox::new();
    let s = sleeper(&sb);
    let config = sb.config(&format!(
        "{}[program.web]\ncommand = {}\n",
        flaky_program(&sb),
        argv(&s)
    ));
    let mut master = sb.start(&config);
    wait_running(&sb, "web", 1);
    let failed = wait_state(&sb, "flaky", 0, "failed");
    assert_eq!(failed.pid, None, "{failed:?}");
    assert_eq!(
        failed.last_exit,
        Some(LastExit::Code { code: 1 }),
        "{failed:?}"
    );
    assert!(
        failed.detail.is_some(),
        "a failed worker says why: {failed:?}"
    );

    for args in [&["status"][..], &["status", "--json"], &["status", "flaky"]] {
        let out = sb.cli(&config, args);
        assert_exit_code(out.status, 3, &format!("{args:?}: {}", out.stderr));
        assert!(out.stdout.contains("failed"), "{args:?}: {}", out.stdout);
    }
    // Only the listed workers count.
    sb.cli_ok(&config, &["status", "web"]);
    stop_cleanly(&mut master);
}

/// An operator who stops a failed worker has acknowledged it: it is `stopped`, and `status`
/// no longer exits 3 for it.
#[test]
fn stop_acknowledges_a_failed_worker() {
    let sb = Sandbox::new();
    let config = sb.config(&flaky_program(&sb));
    let mut master = sb.start(&config);
    wait_state(&sb, "flaky", 0, "failed");
    sb.cli_ok(&config, &["stop", "flaky"]);
    let w = sb.worker_status(&config, "flaky", 0);
    assert_eq!((w.state.as_str(), w.pid), ("stopped", None), "{w:?}");
    sb.cli_ok(&config, &["status"]);
    stop_cleanly(&mut master);
}

// ---------------------------------------------------------------------------------------------
// stop / start / restart

#[test]
fn stop_start_restart_a_whole_program() {
    let sb = Sandbox::new();
    let s = sleeper(&sb);
    let config = sb.config(&format!(
        "[program.web]\ncommand = {a}\nworkers = 2\n\n[program.other]\ncommand = {a}\n",
        a = argv(&s)
    ));
    let mut master = sb.start(&config);
    let web = wait_running(&sb, "web", 2);
    let other = wait_running(&sb, "other", 1);

    // stop returns once the workers have exited.
    sb.cli_ok(&config, &["stop", "web"]);
    for pid in web.values() {
        assert!(
            !pid_alive(*pid),
            "web worker {pid} still runs after `stop` returned"
        );
    }
    let st = socket_status(&sb);
    let web_entries: Vec<Entry> = entries(&st)
        .into_iter()
        .filter(|e| e.program == "web")
        .collect();
    assert_eq!(
        web_entries.len(),
        2,
        "stopped workers are still listed: {st:?}"
    );
    for e in &web_entries {
        assert_eq!((e.state.as_str(), e.pid), ("stopped", None), "{st:?}");
    }
    assert_eq!(running(&st, "other"), other, "stop web touched other");

    // start returns once the new workers run.
    sb.cli_ok(&config, &["start", "web"]);
    let started = running(&socket_status(&sb), "web");
    assert_eq!(
        started.keys().copied().collect::<Vec<_>>(),
        [0, 1],
        "after start"
    );
    for (id, pid) in &started {
        assert!(
            pid_alive(*pid),
            "web.{id} (pid {pid}) is not alive after `start` returned"
        );
        assert!(!web.values().any(|p| p == pid), "web.{id} kept its old pid");
    }

    // restart: every worker gets a new pid, the old ones are gone, when it returns.
    sb.cli_ok(&config, &["restart", "web"]);
    let st = socket_status(&sb);
    let restarted = running(&st, "web");
    assert_eq!(restarted.len(), 2, "{st:?}");
    for (id, pid) in &restarted {
        assert_ne!(started.get(id), Some(pid), "web.{id} was not restarted");
        assert!(
            pid_alive(*pid),
            "web.{id} (pid {pid}) is not alive after `restart` returned"
        );
    }
    for pid in started.values() {
        assert!(
            !pid_alive(*pid),
            "old web worker {pid} still runs after `restart` returned"
        );
    }
    assert_eq!(
        running(&st, "other"),
        other,
        "start/restart of web touched other"
    );

    // start of a running program changes nothing.
    sb.cli_ok(&config, &["start", "web"]);
    assert_eq!(
        running(&socket_status(&sb), "web"),
        restarted,
        "start of a running program"
    );
    stop_cleanly(&mut master);
}

#[test]
fn stop_start_restart_one_worker_by_id() {
    let sb = Sandbox::new();
    let s = sleeper(&sb);
    let config = sb.config(&format!(
        "[program.web]\ncommand = {}\nworkers = 3\n",
        argv(&s)
    ));
    let mut master = sb.start(&config);
    let before = wait_running(&sb, "web", 3);

    sb.cli_ok(&config, &["stop", "web.1"]);
    assert!(
        !pid_alive(before[&1]),
        "web.1 still runs after `stop web.1` returned"
    );
    let st = socket_status(&sb);
    let e = entries(&st);
    assert!(
        e.iter()
            .any(|e| e.id == 1 && e.state == "stopped" && e.pid.is_none()),
        "web.1 is listed as stopped: {st:?}"
    );
    let rest = running(&st, "web");
    assert_eq!(
        rest,
        BTreeMap::from([(0, before[&0]), (2, before[&2])]),
        "{st:?}"
    );

    sb.cli_ok(&config, &["start", "web.1"]);
    let after_start = running(&socket_status(&sb), "web");
    assert_eq!(after_start.len(), 3);
    assert_ne!(after_start[&1], before[&1], "web.1 got a new process");
    assert!(pid_alive(after_start[&1]));
    assert_eq!((after_start[&0], after_start[&2]), (before[&0], before[&2]));
    let line = wait_start_line(&sb, after_start[&1]);
    assert_eq!(line.id, 1, "the new process is worker 1: {line:?}");

    sb.cli_ok(&config, &["restart", "web.2"]);
    let after_restart = running(&socket_status(&sb), "web");
    assert_ne!(after_restart[&2], before[&2], "web.2 got a new process");
    assert!(
        !pid_alive(before[&2]),
        "the old web.2 is gone when restart returns"
    );
    assert!(pid_alive(after_restart[&2]));
    assert_eq!(
        (after_restart[&0], after_restart[&1]),
        (before[&0], after_start[&1]),
        "restart web.2 touched another worker"
    );

    // Unknown programs and worker ids are exit 1, "no program named …", and change nothing.
    for args in [
        &["stop", "web.7"][..],
        &["start", "web.3"],
        &["restart", "web.99"],
        &["stop", "nosuch"],
        &["start", "nosuch.0"],
        &["restart", "nosuch"],
        &["scale", "nosuch", "2"],
    ] {
        let out = sb.cli(&config, args);
        assert_exit_code(out.status, 1, &format!("{args:?}: {}", out.stderr));
        assert!(
            out.stderr.contains("no program named"),
            "{args:?} says what is unknown: {}",
            out.stderr
        );
    }
    assert_eq!(running(&socket_status(&sb), "web"), after_restart);
    stop_cleanly(&mut master);
}

#[test]
fn start_clears_a_failed_worker() {
    let sb = Sandbox::new();
    let config = sb.config(&flaky_program(&sb));
    let mut master = sb.start(&config);
    wait_state(&sb, "flaky", 0, "failed");
    assert_eq!(
        sb.starts_of("flaky").len(),
        1,
        "burst 1: one start, then failed"
    );

    // Nothing changed: `start` runs it again (a new start) and it fails again.
    sb.cli(&config, &["start", "flaky"]);
    sb.wait_starts("flaky", 2, DEADLINE);
    wait_state(&sb, "flaky", 0, "failed");
    assert_exit_code(
        sb.cli(&config, &["status"]).status,
        3,
        "status after the 2nd failure",
    );

    // What it needed is there now: `start` returns with it running, and status is 0 again.
    std::fs::write(sb.path("ready"), "").unwrap();
    sb.cli_ok(&config, &["start", "flaky.0"]);
    let pids = running(&socket_status(&sb), "flaky");
    let pid = *pids.get(&0).expect("flaky.0 runs after `start` returned");
    assert!(pid_alive(pid));
    assert_eq!(wait_start_line(&sb, pid).program, "flaky");
    sb.cli_ok(&config, &["status"]);
    stop_cleanly(&mut master);
}

// ---------------------------------------------------------------------------------------------
// scale

#[test]
fn scale_up_keeps_the_running_workers_and_scale_down_stops_the_highest_ids() {
    let sb = Sandbox::new();
    let s = sleeper(&sb);
    let config = sb.config(&format!(
        "[program.web]\ncommand = {a}\nworkers = 2\n\n[program.other]\ncommand = {a}\n",
        a = argv(&s)
    ));
    let mut master = sb.start(&config);
    let before = wait_running(&sb, "web", 2);
    let other = wait_running(&sb, "other", 1);

    // scale returns once the count is reached.
    sb.cli_ok(&config, &["scale", "web", "5"]);
    let st = socket_status(&sb);
    let up = running(&st, "web");
    assert_eq!(
        up.keys().copied().collect::<Vec<_>>(),
        [0, 1, 2, 3, 4],
        "{st:?}"
    );
    assert_eq!(
        (up[&0], up[&1]),
        (before[&0], before[&1]),
        "survivors keep their pids"
    );
    for id in 2..5 {
        let start = wait_start_line(&sb, up[&id]);
        assert_eq!((start.id, start.workers), (id, 5), "{start:?}");
    }

    sb.cli_ok(&config, &["scale", "web", "1"]);
    let st = socket_status(&sb);
    let web: Vec<Entry> = entries(&st)
        .into_iter()
        .filter(|e| e.program == "web")
        .collect();
    assert_eq!(web.len(), 1, "only web.0 is left: {st:?}");
    assert_eq!((web[0].id, web[0].pid), (0, Some(before[&0])), "{st:?}");
    for id in 1..5 {
        assert!(
            !pid_alive(up[&id]),
            "web.{id} still runs after `scale web 1` returned"
        );
    }
    assert_eq!(running(&st, "other"), other, "scaling web touched other");

    // Zero is a valid count; too many is refused with a message and changes nothing.
    sb.cli_ok(&config, &["scale", "web", "0"]);
    assert!(running(&socket_status(&sb), "web").is_empty());
    assert!(!pid_alive(before[&0]));
    let out = sb.cli(&config, &["scale", "web", "4000000000"]);
    assert_exit_code(out.status, 1, &out.stderr);
    assert!(running(&socket_status(&sb), "web").is_empty());
    stop_cleanly(&mut master);
}

// ---------------------------------------------------------------------------------------------
// Bad input on the raw socket

/// A master with two programs, every worker running; returns it with the pids.
fn garbage_target(sb: &Sandbox) -> (Daemon, BTreeMap<(String, u32), i32>) {
    let s = sleeper(sb);
    let config = sb.config(&format!(
        "[program.web]\ncommand = {a}\nworkers = 3\n\n[program.other]\ncommand = {a}\n",
        a = argv(&s)
    ));
    let master = sb.start(&config);
    wait_running(sb, "web", 3);
    wait_running(sb, "other", 1);
    let pids = all_running(&socket_status(sb));
    (master, pids)
}

/// Deterministic pseudo-random bytes (xorshift), newlines included.
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect()
}

/// Reads answers until the master closes the connection; each must be an error.
#[track_caller]
fn drain_errors(ctl: &mut Ctl, what: &str) -> usize {
    let mut n = 0;
    while let Some(answer) = ctl.recv() {
        assert_eq!(answer["ok"], false, "{what}: {answer}");
        assert!(answer["error"].is_string(), "{what}: {answer}");
        n += 1;
    }
    n
}

#[test]
fn random_bytes_get_errors_and_harm_nothing() {
    let sb = Sandbox::new();
    let (mut master, pids) = garbage_target(&sb);
    for seed in 1..=4u64 {
        let mut ctl = Ctl::open(&sb);
        let mut bytes = noise(32 * 1024, seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        bytes.push(b'\n');
        // The master may close on us mid-way (an overlong or undecodable line): that is fine.
        let _ = ctl.stream().write_all(&bytes);
        let _ = ctl.stream().shutdown(std::net::Shutdown::Write);
        let errors = drain_errors(&mut ctl, "random bytes");
        assert!(errors > 0, "random bytes got no error reply at all");
        assert_unharmed(&sb, &pids, "random bytes");
    }
    stop_cleanly(&mut master);
}

/// Regression: requests a client pipelined (sent before reading the answers) behind a bad
/// line, or behind a request whose answer has to wait (`restart`), were not answered until the
/// client sent more bytes, so such a client hung until the idle timeout closed it.
#[test]
fn pipelined_requests_are_all_answered_in_order() {
    let sb = Sandbox::new();
    let (mut master, pids) = garbage_target(&sb);
    let old = pids[&("other".to_string(), 0)];
    let mut ctl = Ctl::open(&sb);
    ctl.send(
        b"garbage\n\n{\"cmd\":\"status\"}\n{\"cmd\":\"restart\",\"target\":\"other\"}\n\
          {\"cmd\":\"status\",\"program\":\"other\"}\n{\"cmd\":\"stop\",\"target\":\"nosuch\"}\n",
    );
    let mut answers = Vec::new();
    for _ in 0..5 {
        answers.push(ctl.recv().expect("an answer to every pipelined request"));
    }
    assert_eq!(answers[0]["ok"], false, "{}", answers[0]);
    assert_eq!(answers[1]["ok"], true, "{}", answers[1]);
    assert_eq!(all_running(&status_of(&answers[1])), pids);
    assert_eq!(answers[2]["ok"], true, "restart: {}", answers[2]);
    assert_eq!(answers[3]["ok"], true, "{}", answers[3]);
    let new = running(&status_of(&answers[3]), "other");
    assert!(new.get(&0).is_some_and(|p| *p != old), "{}", answers[3]);
    assert_eq!(answers[4]["ok"], false, "{}", answers[4]);
    stop_cleanly(&mut master);
}

#[test]
fn a_ten_megabyte_line_without_newline_is_refused_and_harms_nothing() {
    let sb = Sandbox::new();
    let (mut master, pids) = garbage_target(&sb);
    let mut ctl = Ctl::open(&sb);
    let writer = ctl.stream().try_clone().expect("clone");
    let feeder = std::thread::spawn(move || {
        let chunk = vec![b'{'; 1 << 20];
        let mut sent = 0;
        for _ in 0..10 {
            match (&writer).write_all(&chunk) {
                Ok(()) => sent += chunk.len(),
                Err(_) => break, // closed by the master: what we expect
            }
        }
        sent
    });
    let answer = ctl.recv();
    if let Some(a) = &answer {
        assert_eq!(a["ok"], false, "{a}");
        assert!(
            a["error"].as_str().is_some_and(|e| e.contains("longer")),
            "{a}"
        );
    }
    drain_errors(&mut ctl, "after the overlong line");
    let sent = feeder.join().expect("feeder");
    assert!(
        sent < 10 << 20,
        "the master read all 10 MB of one request line"
    );
    assert_unharmed(&sb, &pids, "a 10 MB line");
    stop_cleanly(&mut master);
}

#[test]
fn unknown_commands_and_wrong_shapes_get_error_replies_on_a_live_connection() {
    let sb = Sandbox::new();
    let (mut master, pids) = garbage_target(&sb);
    let mut ctl = Ctl::open(&sb);
    let bad: &[&str] = &[
        "hello",
        r#"{"cmd":"explode"}"#,
        r#"{"cmd":"STATUS"}"#,
        r#"{"cmd":"stop"}"#,
        r#"{"cmd":"stop","target":5}"#,
        r#"{"cmd":"stop","target":"web","now":true}"#,
        r#"{"cmd":"scale","program":"web","workers":-1}"#,
        r#"{"cmd":"scale","program":"web","workers":"many"}"#,
        r#"{"cmd":"scale","program":"web","workers":1e3}"#,
        r#"{"cmd":"scale","program":"web","workers":99999999999}"#,
        r#"{"cmd":"scale","program":"web","workers":4294967295}"#,
        r#"{"cmd":"restart","target":"web.x"}"#,
        r#"{"cmd":"restart","target":"web.-1"}"#,
        r#"{"cmd":"start","target":""}"#,
        r#"{"cmd":"status","program":"nosuch"}"#,
        r#"{"cmd":null}"#,
        r#"{"cmd":["status"]}"#,
        r#"{"ok":true}"#,
        "{}",
        "[]",
        "null",
        "42",
        "\"status\"",
        "\"\"",
        "true",
        r#"{"cmd":"status"} trailing"#,
        r#"{"cmd":"status""#,
        "\u{feff}{\"cmd\":\"status\"}",
    ];
    for line in bad {
        ctl.send(format!("{line}\n").as_bytes());
        let answer = ctl
            .recv()
            .unwrap_or_else(|| panic!("the master closed the connection on {line:?}"));
        assert_eq!(answer["ok"], false, "{line:?} got {answer}");
        assert!(
            answer["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{line:?} got {answer}"
        );
    }
    // The same connection still works.
    let answer = ctl.call(&json!({"cmd": "status"}));
    assert_eq!(answer["ok"], true, "{answer}");
    assert_unharmed(&sb, &pids, "unknown commands and wrong shapes");
    stop_cleanly(&mut master);
}

#[test]
fn a_client_that_never_speaks_does_not_block_the_master() {
    let sb = Sandbox::new();
    let (mut master, pids) = garbage_target(&sb);
    let silent: Vec<Ctl> = (0..5).map(|_| Ctl::open(&sb)).collect();
    // Half a request, never finished.
    let mut half = Ctl::open(&sb);
    half.send(br#"{"cmd":"sta"#);
    assert_unharmed(&sb, &pids, "silent clients connected");
    // The master still carries out commands meanwhile.
    let mut ctl = Ctl::open(&sb);
    let answer = ctl.call(&json!({"cmd": "restart", "target": "other"}));
    assert_eq!(answer["ok"], true, "{answer}");
    let st = socket_status(&sb);
    assert_ne!(running(&st, "other")[&0], pids[&("other".to_string(), 0)]);
    assert_eq!(
        running(&st, "web"),
        pids.iter()
            .filter(|((p, _), _)| p == "web")
            .map(|((_, id), pid)| (*id, *pid))
            .collect::<BTreeMap<_, _>>()
    );
    drop(silent);
    drop(half);
    stop_cleanly(&mut master);
}

#[test]
fn a_client_that_disconnects_before_its_reply_harms_nothing() {
    let sb = Sandbox::new();
    let gate = sb.path("gate");
    let s = sleeper(&sb);
    let slow = gated_worker(&sb, "slow.sh", &gate);
    let config = sb.config(&format!(
        "[program.web]\ncommand = {}\nworkers = 3\n\n[program.slow]\ncommand = {}\n",
        argv(&s),
        argv(&slow)
    ));
    let mut master = sb.start(&config);
    let web = wait_running(&sb, "web", 3);
    let slow_before = wait_running(&sb, "slow", 1)[&0];

    // A request whose answer the master cannot give yet: the old process waits for the gate.
    let mut ctl = Ctl::open(&sb);
    ctl.send(b"{\"cmd\":\"restart\",\"target\":\"slow\"}\n");
    wait_state(&sb, "slow", 0, "stopping");
    drop(ctl); // gone before the answer
    std::fs::write(&gate, "").unwrap();
    sb.wait("slow.0 runs a new process", DEADLINE, || {
        running(&socket_status(&sb), "slow")
            .get(&0)
            .is_some_and(|p| *p != slow_before)
    });
    assert!(!pid_alive(slow_before));

    // Pipelined requests, never read, then gone: the master writes into a closed socket.
    for _ in 0..3 {
        let ctl = Ctl::open(&sb);
        let many = "{\"cmd\":\"status\"}\n".repeat(2000);
        let _ = ctl.stream().write_all(many.as_bytes());
        drop(ctl);
    }
    // One that leaves mid-answer: it reads a few bytes of a status, then closes.
    let mut ctl = Ctl::open(&sb);
    ctl.send(b"{\"cmd\":\"status\"}\n");
    let mut few = [0u8; 3];
    ctl.reader
        .get_mut()
        .read_exact(&mut few)
        .expect("the answer starts");
    drop(ctl);

    let now = all_running(&socket_status(&sb));
    for (id, pid) in &web {
        assert_eq!(now.get(&("web".to_string(), *id)), Some(pid), "web.{id}");
    }
    assert!(master.running(), "the master is alive");
    stop_cleanly(&mut master);
}

#[test]
fn three_hundred_connections_at_once_get_answers_or_a_clear_refusal() {
    let sb = Sandbox::new();
    let (mut master, pids) = garbage_target(&sb);
    let mut conns: Vec<Ctl> = (0..300).map(|_| Ctl::open(&sb)).collect();
    let (mut answered, mut refused, mut closed) = (0, 0, 0);
    for ctl in &mut conns {
        // A refused connection may already be closed: sending can fail, reading must not hang.
        let _ = ctl.stream().write_all(b"{\"cmd\":\"status\"}\n");
        match ctl.recv() {
            Some(a) if a["ok"] == true => {
                assert_eq!(all_running(&status_of(&a)), pids, "status under load");
                answered += 1;
            }
            Some(a) => {
                assert!(a["error"].is_string(), "{a}");
                refused += 1;
            }
            None => closed += 1,
        }
    }
    println!("300 connections: {answered} answered, {refused} refused, {closed} closed");
    assert!(answered > 0, "no connection was served");
    drop(conns);
    // The master may see a new connection before the hang-ups of the old ones, and refuse it
    // as one too many: wait (bounded) until a fresh connection is served again.
    sb.wait("a fresh connection is served again", DEADLINE, || {
        let mut ctl = Ctl::open(&sb);
        ctl.call(&json!({"cmd": "status"}))["ok"] == true
    });
    assert_unharmed(&sb, &pids, "300 connections at once");
    stop_cleanly(&mut master);
}

// ---------------------------------------------------------------------------------------------
// Who may connect

const NOBODY: u32 = 65534;

/// A master with `web` (2 workers) whose socket folder other users may traverse, so that only
/// the socket's mode and the master's credential check stand in their way.
fn reachable_master(sb: &Sandbox) -> (Daemon, BTreeMap<(String, u32), i32>) {
    let s = sleeper(sb);
    let config = sb.config(&format!(
        "[program.web]\ncommand = {}\nworkers = 2\n",
        argv(&s)
    ));
    let master = sb.start(&config);
    wait_running(sb, "web", 2);
    let pids = all_running(&socket_status(sb));
    std::fs::set_permissions(sb.root(), std::fs::Permissions::from_mode(0o711)).unwrap();
    (master, pids)
}

/// `plumule ARGS… --socket control.sock` as uid/gid [`NOBODY`].
#[track_caller]
fn as_nobody(sb: &Sandbox, args: &[&str]) -> Outcome {
    let sock = sb.control_socket().display().to_string();
    let mut all = args.to_vec();
    all.extend(["--socket", &sock]);
    let mut d = sb.spawn_plumule_as(&all, NOBODY, NOBODY);
    let status = d.wait_exit(DEADLINE);
    Outcome {
        status,
        stdout: d.stdout_text(),
        stderr: d.stderr_text(),
    }
}

#[test]
fn as_root_a_client_under_another_uid_is_refused_and_the_socket_is_0600() {
    if !root_or_skip(&format!("to run a client as uid {NOBODY}")) {
        return;
    }
    let sb = Sandbox::new();
    let (mut master, pids) = reachable_master(&sb);
    let sock = sb.control_socket();
    let meta = std::fs::metadata(&sock).expect("control.sock exists");
    assert_eq!(meta.mode() & 0o777, 0o600, "control.sock mode");
    assert_eq!(meta.uid(), 0, "control.sock belongs to the master's user");

    let out = as_nobody(&sb, &["stop", "web"]);
    assert_exit_code(out.status, 1, &out.stderr);
    assert!(
        out.stderr.to_lowercase().contains("permission denied"),
        "{}",
        out.stderr
    );
    assert_unharmed(
        &sb,
        &pids,
        "uid nobody tried `stop` through the 0600 socket",
    );

    // Even with the file mode opened, the master checks the peer's credentials.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    for args in [&["stop", "web"][..], &["status"], &["scale", "web", "0"]] {
        let out = as_nobody(&sb, args);
        assert_exit_code(out.status, 1, &format!("{args:?}: {}", out.stderr));
    }
    assert_unharmed(
        &sb,
        &pids,
        "uid nobody tried commands with the peer check only",
    );
    let line = master.wait_stderr(&["permission denied", &NOBODY.to_string()], DEADLINE);
    assert_eq!(
        master.stderr_lines_with(&["permission denied"]).len(),
        3,
        "one refusal logged per connection, e.g. {line}"
    );
    // Root still may.
    let answer = Ctl::open(&sb).call(&json!({"cmd": "status"}));
    assert_eq!(answer["ok"], true, "{answer}");
    stop_cleanly(&mut master);
}

/// The master refuses a foreign uid as soon as it connects, so the client's request may hit a
/// closed socket: the client must still show the master's reason, not a broken pipe.
#[test]
fn as_root_a_refused_client_says_why() {
    if !root_or_skip(&format!("to run a client as uid {NOBODY}")) {
        return;
    }
    let sb = Sandbox::new();
    let (mut master, pids) = reachable_master(&sb);
    std::fs::set_permissions(sb.control_socket(), std::fs::Permissions::from_mode(0o666)).unwrap();
    // A few rounds: which of the refusal and the request comes first is up to the scheduler.
    let rounds = [&["stop", "web"][..], &["status"], &["scale", "web", "0"]].repeat(5);
    for args in rounds {
        let out = as_nobody(&sb, args);
        assert_exit_code(out.status, 1, &format!("{args:?}: {}", out.stderr));
        assert!(
            out.stderr.contains("permission denied") && out.stderr.contains(&NOBODY.to_string()),
            "{args:?}: the client shows the master's refusal naming the uid; its stderr: {}",
            out.stderr
        );
    }
    assert_unharmed(&sb, &pids, "refused clients");
    stop_cleanly(&mut master);
}

// ---------------------------------------------------------------------------------------------
// start, restart and scale wait until the workers have run for healthy_after (SPEC §1)

/// The uptime `status` shows for `program.id`.
fn uptime(sb: &Sandbox, program: &str, id: u32) -> f64 {
    let st = socket_status(sb);
    let w = worker(&st, program, id).unwrap_or_else(|| panic!("no {program}.{id}: {st:?}"));
    assert_eq!(w.state, "running", "{w:?}");
    w.uptime_s.unwrap_or_else(|| panic!("no uptime: {w:?}"))
}

#[test]
fn start_of_a_program_that_exits_at_once_fails_naming_the_worker_and_its_exit() {
    let sb = Sandbox::new();
    let crash = sb.worker("crash.sh", "exit 3");
    let config = sb.config(&format!(
        "[program.crash]\ncommand = {}\nhealthy_after = \"1s\"\n\
         backoff = {{ initial = \"10s\" }}\n",
        argv(&crash)
    ));
    let mut master = sb.start(&config);
    sb.wait_starts("crash", 1, DEADLINE);

    let out = sb.cli(&config, &["start", "crash"]);
    assert_exit_code(out.status, 1, &out.stdout);
    assert!(
        out.stderr.contains("crash.0") && out.stderr.contains('3'),
        "names the worker and its exit: {}",
        out.stderr
    );
    assert!(sb.starts_of("crash").len() >= 2, "`start` started it again");
    stop_cleanly(&mut master);
}

/// `--no-wait` returns once the master has accepted the request: the same start that fails
/// above succeeds, and the worker is started again all the same.
#[test]
fn start_no_wait_returns_once_the_request_is_accepted() {
    let sb = Sandbox::new();
    let crash = sb.worker("crash.sh", "exit 3");
    let config = sb.config(&format!(
        "[program.crash]\ncommand = {}\nhealthy_after = \"10s\"\n\
         backoff = {{ initial = \"10s\" }}\n",
        argv(&crash)
    ));
    let mut master = sb.start(&config);
    sb.wait_starts("crash", 1, DEADLINE);
    let out = sb.cli_ok(&config, &["start", "crash", "--no-wait"]);
    assert_eq!(out.stdout, "crash: start requested\n");
    sb.wait_starts("crash", 2, DEADLINE);
    // A refusal still fails.
    let out = sb.cli(&config, &["start", "nope", "--no-wait"]);
    assert_exit_code(out.status, 1, &out.stderr);
    assert!(
        out.stderr.contains("no program named nope"),
        "{}",
        out.stderr
    );
    stop_cleanly(&mut master);
}

#[test]
fn restart_returns_once_the_new_worker_has_run_for_healthy_after() {
    let sb = Sandbox::new();
    let s = sleeper(&sb);
    let config = sb.config(&format!(
        "[program.web]\ncommand = {}\nhealthy_after = \"700ms\"\n",
        argv(&s)
    ));
    let mut master = sb.start(&config);
    let before = wait_running(&sb, "web", 1);

    sb.cli_ok(&config, &["restart", "web"]);
    let after = running(&socket_status(&sb), "web");
    assert_ne!(after[&0], before[&0], "a new process");
    let up = uptime(&sb, "web", 0);
    assert!(
        up >= 0.7,
        "answered after {up}s of running, before healthy_after"
    );

    sb.cli_ok(&config, &["start", "web"]);
    assert_eq!(
        running(&socket_status(&sb), "web"),
        after,
        "`start` of a running program touches nothing"
    );
    stop_cleanly(&mut master);
}

/// A worker plumule stopped for missing its ready_timeout did not "crash (signal TERM)": the
/// answer names the real reason, for `restart` and for the new workers of `scale`.
#[test]
fn restart_and_scale_name_a_ready_timeout_not_the_term_plumule_sent() {
    let sb = Sandbox::new();
    let mute = sb.worker("mute.sh", "exec sleep 1000");
    let config = sb.config(&format!(
        "[program.mute]\ncommand = {}\nready = \"notify\"\nready_timeout = \"300ms\"\n\
         backoff = {{ initial = \"10s\" }}\n",
        argv(&mute)
    ));
    let mut master = sb.start(&config);
    sb.wait_starts("mute", 1, DEADLINE);

    for args in [&["restart", "mute"][..], &["scale", "mute", "2"]] {
        let out = sb.cli(&config, args);
        assert_exit_code(out.status, 1, &format!("{args:?}: {}", out.stdout));
        let id = if args[0] == "scale" {
            "mute.1"
        } else {
            "mute.0"
        };
        assert!(
            out.stderr.contains(id)
                && out
                    .stderr
                    .contains("not ready within ready_timeout (300ms)")
                && !out.stderr.contains("TERM"),
            "{args:?}: {}",
            out.stderr
        );
    }
    stop_cleanly(&mut master);
}

#[test]
fn scale_up_returns_once_the_new_workers_have_run_for_healthy_after() {
    let sb = Sandbox::new();
    let s = sleeper(&sb);
    let config = sb.config(&format!(
        "[program.web]\ncommand = {}\nhealthy_after = \"700ms\"\n",
        argv(&s)
    ));
    let mut master = sb.start(&config);
    wait_running(&sb, "web", 1);

    sb.cli_ok(&config, &["scale", "web", "3"]);
    for id in 1..3 {
        let up = uptime(&sb, "web", id);
        assert!(up >= 0.7, "web.{id} had run {up}s when `scale` answered");
    }
    stop_cleanly(&mut master);
}

// ---------------------------------------------------------------------------------------------
// A busy `listen` address fails its program only

#[test]
fn a_busy_listen_port_fails_only_its_program_and_start_binds_it_again() {
    let sb = Sandbox::new();
    let s = sleeper(&sb);
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let addr = squatter.local_addr().unwrap().to_string();
    let programs = |more: &str| {
        format!(
            "[program.web]\ncommand = {a}\nlisten = [\"tcp:{addr}\"]\n\n\
             [program.other]\ncommand = {a}\n{more}",
            a = argv(&s)
        )
    };
    let config = sb.config(&programs(""));
    let mut master = sb.start(&config);
    wait_running(&sb, "other", 1);
    let failed = wait_state(&sb, "web", 0, "failed");
    let detail = failed.detail.unwrap_or_default();
    assert!(
        detail.contains(&addr) && detail.contains("in use"),
        "names the address and the error: {detail}"
    );

    // The address was already the running config's: a reload is not refused for it.
    sb.config(&programs(&format!(
        "\n[program.more]\ncommand = {}\n",
        argv(&s)
    )));
    sb.cli_ok(&config, &["reload"]);
    wait_running(&sb, "more", 1);

    // While the port is still taken, `start` tries again and says why it failed.
    let out = sb.cli(&config, &["start", "web"]);
    assert_exit_code(out.status, 1, &out.stdout);
    assert!(out.stderr.contains(&addr), "{}", out.stderr);

    drop(squatter);
    sb.cli_ok(&config, &["start", "web"]);
    let pid = running(&socket_status(&sb), "web")[&0];
    assert!(pid_alive(pid));
    std::net::TcpStream::connect(&addr).expect("the master listens on the port now");
    stop_cleanly(&mut master);
}
