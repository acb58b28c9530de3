//! Queue semantics end to end with the real binary (SPEC §1, §4, §9): frames with binary
//! payloads, retries with backoff and dead letters, protocol errors, workers that die or
//! overstay `job_timeout`, key routing across a scale-up and a stopped worker, backpressure,
//! stopping a consumer, durable recovery after a SIGKILLed master, reloads.
//!
//! The workers are one small Python script (`qw.py`) whose behaviour is picked by its first
//! argument; it speaks whichever protocol `PLUMULE_QUEUE_PROTOCOL` names.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};

use common::*;
use plumule::protocol::{DeadLetters, QueueCounts, QueueReport, Request};

/// The worker script. Modes:
/// - `echo`: `ok` with the payload reversed, prefixed `R:`; `drop` for a payload starting
///   `drop`, with a non-UTF-8 reason;
/// - `fail`: logs a timestamp per attempt to `attempts`; `fail boom` until `heal` exists;
/// - `garbage` / `extra`: the first job anywhere gets `hello` / two answers, later ones `ok`;
/// - `block`: the first job anywhere writes the pid to `blocked` and blocks; later ones get
///   `ok by-ID-PID`;
/// - `whoami`: `ok ID`;
/// - `hold`: holds every job (counted in `got`) until EOF, then logs `eof`, answers all, exits;
/// - `deaf`: holds every job; at EOF logs `eof TIME` and keeps running; SIGTERM logs
///   `TERM TIME` and exits;
/// - `log`: appends the payload to `runs`, answers `ok`.
const WORKER: &str = r#"
import os, sys, time, signal, struct

mode, d = sys.argv[1], sys.argv[2]
wid = os.environ.get("PLUMULE_WORKER_ID", "?")
frames = os.environ.get("PLUMULE_QUEUE_PROTOCOL", "lines") == "frames"
with open(os.path.join(d, "starts"), "a") as f:
    f.write("%s %s %s %d %s\n" % (os.environ["PLUMULE_PROGRAM"], wid,
            os.environ["PLUMULE_WORKERS"], os.getpid(),
            os.environ.get("PLUMULE_QUEUE_PROTOCOL", "-")))
inp, out = sys.stdin.buffer, sys.stdout.buffer
if "NOTIFY_SOCKET" in os.environ:
    # A frames worker waits for the file `go` before it says READY=1 while `hold` exists.
    while frames and os.path.exists(os.path.join(d, "hold")) and not os.path.exists(os.path.join(d, "go")):
        time.sleep(0.01)
    import socket
    addr = os.environ["NOTIFY_SOCKET"]
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b"READY=1", addr)

def log(name, text):
    with open(os.path.join(d, name), "a") as f:
        f.write(text + "\n")

def first(name, text=""):
    try:
        fd = os.open(os.path.join(d, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.write(fd, (text + "\n").encode())
    os.close(fd)
    return True

def read_job():
    if frames:
        head = inp.read(4)
        if len(head) < 4:
            return None
        (n,) = struct.unpack(">I", head)
        return inp.read(n)
    line = inp.readline()
    if not line:
        return None
    return line[:-1] if line.endswith(b"\n") else line

def answer(word, text=b""):
    if frames:
        status = {"ok": 0, "fail": 1, "drop": 2}[word]
        out.write(struct.pack(">IB", len(text) + 1, status) + text)
    else:
        out.write(word.encode() + (b" " + text if text else b"") + b"\n")
    out.flush()

def on_term(sig, frame):
    log("signals", "TERM %f" % time.time())
    os._exit(0)

if mode == "deaf":
    signal.signal(signal.SIGTERM, on_term)

held = []
while True:
    job = read_job()
    if job is None:
        break
    if mode == "echo":
        if job.startswith(b"drop"):
            answer("drop", b"refused \xff")
        else:
            answer("ok", b"R:" + job[::-1])
    elif mode == "fail":
        log("attempts", "%f %s" % (time.time(), job.decode()))
        if os.path.exists(os.path.join(d, "heal")):
            answer("ok", b"healed")
        else:
            answer("fail", b"boom")
    elif mode == "garbage":
        if first("garbage.done"):
            out.write(b"hello\n"); out.flush()
        else:
            answer("ok", b"fine")
    elif mode == "extra":
        if first("extra.done"):
            out.write(b"ok a\nok b\n"); out.flush()
        else:
            answer("ok", b"fine")
    elif mode == "block":
        if first("blocked", str(os.getpid())):
            time.sleep(1000)
        answer("ok", ("by-%s-%d" % (wid, os.getpid())).encode())
    elif mode == "whoami":
        answer("ok", wid.encode())
    elif mode == "log":
        log("runs", job.decode())
        answer("ok")
    elif mode in ("hold", "deaf"):
        held.append(job)
        log("got", "%d" % len(held))
    else:
        sys.exit("unknown mode " + mode)

if mode == "hold":
    log("eof", "eof")
    for job in held:
        answer("ok", b"held-" + job)
elif mode == "deaf":
    log("eof", "eof %f" % time.time())
    while True:
        time.sleep(1000)
"#;

/// With `ready = "notify"`, while the file `hold` exists, a worker speaking `frames` says
/// READY=1 only once the file `go` exists.
///
/// Fast restarts: the tests wait for restarts, they do not study backoff.
const FAST: &str = r#"backoff = { initial = "10ms", max = "10ms", jitter = 0.0 }"#;

/// Writes the worker script once; returns its path.
fn worker_script(sb: &Sandbox) -> PathBuf {
    let path = sb.path("qw.py");
    if !path.exists() {
        sb.write_file("qw.py", WORKER, 0o755);
    }
    path
}

/// `[program.NAME]` running `qw.py MODE` on queue `queue`, with `extra` lines.
fn program(sb: &Sandbox, name: &str, queue: &str, mode: &str, extra: &str) -> String {
    let script = worker_script(sb);
    format!(
        "[program.{name}]\ncommand = [\"{}\", {}, \"{mode}\", {}]\nqueue = \"{queue}\"\n{FAST}\n{extra}\n\n",
        python(),
        toml_str(&script),
        toml_str(sb.root()),
    )
}

/// What a one-shot command did, its stdout as bytes.
struct Raw {
    status: ExitStatus,
    stdout: Vec<u8>,
    stderr: String,
}

/// `plumule ARGS… -c CONFIG` with `input` on stdin (or nothing), stdout kept as bytes.
fn cli_raw(sb: &Sandbox, config: &Path, args: &[&str], input: Option<&[u8]>) -> Raw {
    let c = config.display().to_string();
    let mut all = args.to_vec();
    all.extend(["-c", &c]);
    let stdout_path = sb.next_stderr().with_extension("stdout");
    let stdin = input.map(|bytes| {
        let path = sb.path("stdin.bin");
        fs::write(&path, bytes).expect("write the input");
        path
    });
    let mut d = sb.spawn_plumule_with(&all, |cmd| match &stdin {
        Some(path) => {
            cmd.stdin(fs::File::open(path).expect("open the input"));
        }
        None => {
            cmd.stdin(Stdio::null());
        }
    });
    let status = d.wait_exit(DEADLINE);
    Raw {
        status,
        stdout: fs::read(stdout_path).expect("the command's stdout"),
        stderr: d.stderr_text(),
    }
}

/// `queue Q --json`: the counts of `queue`.
#[track_caller]
fn counts(sb: &Sandbox, config: &Path, queue: &str) -> QueueCounts {
    let out = sb.cli_ok(config, &["queue", queue, "--json"]);
    let report: QueueReport = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("queue --json: {e}: {}", out.stdout));
    report
        .queues
        .into_iter()
        .find(|q| q.name == queue)
        .unwrap_or_else(|| panic!("no queue {queue} in {}", out.stdout))
}

/// Waits until the counts of `queue` satisfy `cond`; returns them.
#[track_caller]
fn wait_counts(
    sb: &Sandbox,
    config: &Path,
    queue: &str,
    what: &str,
    cond: impl Fn(&QueueCounts) -> bool,
) -> QueueCounts {
    let mut last = None;
    sb.wait(&format!("queue {queue}: {what}"), DEADLINE, || {
        let c = counts(sb, config, queue);
        let done = cond(&c);
        last = Some(c);
        done
    });
    last.unwrap()
}

/// `queue Q --dead --json`.
#[track_caller]
fn dead_letters(sb: &Sandbox, config: &Path, queue: &str) -> DeadLetters {
    let out = sb.cli_ok(config, &["queue", queue, "--dead", "--json"]);
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("queue --dead --json: {e}: {}", out.stdout))
}

/// The lines of a file the workers write (empty while it does not exist).
fn lines_of(sb: &Sandbox, name: &str) -> Vec<String> {
    let text = fs::read_to_string(sb.path(name)).unwrap_or_default();
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    complete.lines().map(str::to_string).collect()
}

/// Waits until `name` holds at least `n` lines; returns them.
#[track_caller]
fn wait_lines(sb: &Sandbox, name: &str, n: usize) -> Vec<String> {
    let mut lines = Vec::new();
    sb.wait(&format!("{name} holds {n} line(s)"), DEADLINE, || {
        lines = lines_of(sb, name);
        lines.len() >= n
    });
    lines
}

/// The worker entry `program.id` of a status report.
#[track_caller]
fn worker_of(sb: &Sandbox, program: &str, id: u32) -> plumule::protocol::WorkerStatus {
    let s = socket_status(sb);
    worker(&s, program, id)
        .cloned()
        .unwrap_or_else(|| panic!("no {program}.{id} in {s:?}"))
}

/// A connection to the control socket speaking the library's own requests.
struct Control {
    reader: BufReader<UnixStream>,
    stream: UnixStream,
}

impl Control {
    fn open(sb: &Sandbox) -> Control {
        let stream = UnixStream::connect(sb.control_socket()).expect("connect");
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        stream.set_write_timeout(Some(DEADLINE)).unwrap();
        Control {
            reader: BufReader::new(stream.try_clone().unwrap()),
            stream,
        }
    }

    /// Sends `req`; returns the `result` of its answer (panics on a refusal).
    fn send(&mut self, req: &Request) {
        let mut line = serde_json::to_vec(req).unwrap();
        line.push(b'\n');
        self.stream.write_all(&line).expect("send");
    }

    fn ask(&mut self, req: &Request) -> serde_json::Value {
        self.send(req);
        self.next_result()
    }

    /// The next answer's `result`, progress lines passed over.
    fn next_result(&mut self) -> serde_json::Value {
        loop {
            let mut answer = String::new();
            self.reader.read_line(&mut answer).expect("an answer");
            let v: serde_json::Value =
                serde_json::from_str(&answer).unwrap_or_else(|e| panic!("answer {answer:?}: {e}"));
            if v.get("ok") == Some(&serde_json::Value::Bool(true)) && v.get("result").is_some() {
                return v["result"].clone();
            }
            assert!(v.get("ok") != Some(&serde_json::Value::Bool(false)), "{v}");
            // A progress line: read on.
        }
    }
}

/// Submits one job per key (its payload the key) with `wait`, on one connection; returns
/// each key's result text.
fn route_keys(sb: &Sandbox, queue: &str, keys: &[String]) -> BTreeMap<String, String> {
    let mut c = Control::open(sb);
    // Results come with the submit answers as jobs end, and the rest stream in after the
    // results request, in submission order.
    let mut results: Vec<serde_json::Value> = Vec::new();
    for k in keys {
        let answer = c.ask(&Request::Submit {
            queue: queue.into(),
            jobs: vec![k.clone()],
            key: Some(k.clone()),
            base64: false,
            wait: true,
        });
        if let Some(early) = answer.get("results").and_then(|r| r.as_array()) {
            results.extend(early.iter().cloned());
        }
    }
    if results.len() < keys.len() {
        c.send(&Request::Results);
        while results.len() < keys.len() {
            let chunk = c.next_result();
            results.extend(
                chunk["results"]
                    .as_array()
                    .expect("results")
                    .iter()
                    .cloned(),
            );
        }
    }
    assert_eq!(results.len(), keys.len());
    keys.iter()
        .zip(results)
        .map(|(k, r)| {
            assert_eq!(r["outcome"], "ok", "{r}");
            (k.clone(), r["text"].as_str().unwrap().to_string())
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------

#[test]
fn frames_carry_binary_payloads_and_results_byte_for_byte() {
    let sb = Sandbox::new();
    let config = sb.config(&format!(
        "{}[queue.bin]\nprotocol = \"frames\"\nprefetch = 2\n",
        program(&sb, "bin", "bin", "echo", "workers = 2")
    ));
    let _master = sb.start(&config);
    wait_running(&sb, "bin", 2);
    // One job per line of stdin: NUL, invalid UTF-8, a carriage return, spaces.
    let jobs: Vec<&[u8]> = vec![
        b"\xff\x00\x01",
        b"caf\xc3\xa9 \t\r",
        b"",
        b"drop \x80",
        b"z",
    ];
    let mut input = Vec::new();
    for j in &jobs {
        input.extend_from_slice(j);
        input.push(b'\n');
    }
    let out = cli_raw(&sb, &config, &["submit", "bin", "--wait"], Some(&input));
    assert_exit_code(out.status, 1, &out.stderr);
    let mut expected = Vec::new();
    for j in &jobs {
        if j.starts_with(b"drop") {
            expected.extend_from_slice(b"dead refused \xff\n");
        } else {
            let mut r: Vec<u8> = j.to_vec();
            r.reverse();
            expected.extend_from_slice(b"ok R:");
            expected.extend_from_slice(&r);
            expected.push(b'\n');
        }
    }
    assert_eq!(
        out.stdout,
        expected,
        "{:?}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        out.stderr
    );
    let c = counts(&sb, &config, "bin");
    assert_eq!((c.done, c.dead, c.pending, c.in_flight), (4, 1, 0, 0));
}

#[test]
fn fail_retries_with_backoff_then_dead_letters_and_requeue_runs_it_again() {
    let sb = Sandbox::new();
    let config = sb.config(&format!(
        "{}[queue.flaky]\nmax_attempts = 3\n\
         retry_backoff = {{ initial = \"300ms\", max = \"10s\", multiplier = 2.0, jitter = 0.1 }}\n",
        program(&sb, "flaky", "flaky", "fail", "")
    ));
    let _master = sb.start(&config);
    wait_running(&sb, "flaky", 1);
    let out = sb.cli(&config, &["submit", "flaky", "--wait", "j1"]);
    assert_exit_code(out.status, 1, &out.stderr);
    assert_eq!(out.stdout, "dead boom\n");

    let times: Vec<f64> = lines_of(&sb, "attempts")
        .iter()
        .map(|l| l.split(' ').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(times.len(), 3, "three attempts");
    for k in 1..times.len() {
        // Attempt k failed; the retry comes initial × multiplier^(k−1) later, ± 10 %.
        let want = 0.3 * 2f64.powi(k as i32 - 1) * 0.9;
        let gap = times[k] - times[k - 1];
        println!("retry {k}: {gap:.3}s after the previous attempt (at least {want:.3}s)");
        assert!(
            gap >= want,
            "retry {k} came {gap:.3}s after, want ≥ {want:.3}s"
        );
        assert!(gap < want * 10.0, "retry {k} came {gap:.3}s after");
    }

    let dead = dead_letters(&sb, &config, "flaky");
    assert_eq!(dead.dead.len(), 1, "{dead:?}");
    let d = &dead.dead[0];
    assert_eq!(
        (d.attempts, d.reason.as_str(), d.payload.as_str()),
        (3, "boom", "j1")
    );
    let text = sb.cli_ok(&config, &["queue", "flaky", "--dead"]).stdout;
    assert!(text.contains("boom") && text.contains("j1"), "{text}");
    let c = counts(&sb, &config, "flaky");
    assert_eq!((c.dead, c.retried, c.pending, c.done), (1, 2, 0, 0));

    let out = sb.cli(&config, &["requeue", "flaky", "999", &d.id.to_string()]);
    assert_exit_code(out.status, 1, &out.stderr);
    assert!(
        out.stderr.contains("no dead letter with id 999"),
        "{}",
        out.stderr
    );
    assert_eq!(counts(&sb, &config, "flaky").dead, 1, "nothing requeued");

    fs::write(sb.path("heal"), "").unwrap();
    let out = sb.cli_ok(&config, &["requeue", "flaky", &d.id.to_string()]);
    assert_eq!(out.stdout, "flaky: 1 job(s) requeued\n");
    wait_lines(&sb, "attempts", 4);
    let c = wait_counts(&sb, &config, "flaky", "done 1", |c| c.done == 1);
    assert_eq!((c.dead, c.pending), (0, 0));
    assert!(dead_letters(&sb, &config, "flaky").dead.is_empty());
}

#[test]
fn a_garbage_answer_kills_the_worker_and_its_job_is_redelivered() {
    let sb = Sandbox::new();
    let config = sb.config(&format!(
        "{}[queue.q]\n",
        program(&sb, "p", "q", "garbage", "")
    ));
    let master = sb.start(&config);
    wait_running(&sb, "p", 1);
    let out = sb.cli(&config, &["submit", "q", "--wait", "x"]);
    assert_exit_code(out.status, 0, &out.stderr);
    assert_eq!(out.stdout, "ok fine\n");
    let line = master.wait_stderr(&["protocol error"], DEADLINE);
    assert!(line.contains("hello"), "{line}");
    assert_eq!(worker_of(&sb, "p", 0).restarts, 1);
    let c = counts(&sb, &config, "q");
    assert_eq!((c.done, c.retried, c.dead), (1, 1, 0));
}

#[test]
fn an_extra_answer_is_a_protocol_error() {
    let sb = Sandbox::new();
    let config = sb.config(&format!(
        "{}[queue.q]\n",
        program(&sb, "p", "q", "extra", "")
    ));
    let master = sb.start(&config);
    let before = wait_running(&sb, "p", 1)[&0];
    let out = sb.cli(&config, &["submit", "q", "--wait", "x"]);
    assert_exit_code(out.status, 0, &out.stderr);
    assert_eq!(out.stdout, "ok a\n");
    let line = master.wait_stderr(&["protocol error"], DEADLINE);
    assert!(line.contains("more answers than jobs"), "{line}");
    sb.wait("p.0 restarted", DEADLINE, || {
        let w = worker_of(&sb, "p", 0);
        w.restarts == 1 && w.state == "running" && w.pid != Some(before)
    });
    let out = sb.cli(&config, &["submit", "q", "--wait", "y"]);
    assert_exit_code(out.status, 0, &out.stderr);
    assert_eq!(out.stdout, "ok fine\n");
}

#[test]
fn a_worker_killed_mid_job_has_the_job_redelivered() {
    let sb = Sandbox::new();
    let config = sb.config(&format!(
        "{}[queue.q]\n",
        program(&sb, "p", "q", "block", "workers = 2")
    ));
    let _master = sb.start(&config);
    wait_running(&sb, "p", 2);
    let mut waiter = sb.spawn_plumule(&[
        "submit",
        "q",
        "--wait",
        "job",
        "-c",
        &config.display().to_string(),
    ]);
    let pid: i32 = sb.wait_line("blocked", DEADLINE).parse().unwrap();
    let busy = socket_status(&sb)
        .workers()
        .find(|(_, w)| w.pid == Some(pid))
        .map(|(_, w)| (w.id, w.in_flight))
        .expect("the blocked worker in status");
    assert_eq!(busy.1, 1, "status shows its job in flight");
    send(pid, SIGKILL);
    let status = waiter.wait_exit(DEADLINE);
    assert_exit_code(status, 0, &waiter.stderr_text());
    let result = waiter.stdout_text();
    let (id, by) = result
        .trim_end()
        .strip_prefix("ok by-")
        .and_then(|r| r.split_once('-'))
        .unwrap_or_else(|| panic!("{result:?}"));
    assert_ne!(
        by.parse::<i32>().unwrap(),
        pid,
        "answered by another process"
    );
    println!(
        "killed p.{} (pid {pid}); the job was answered by p.{id} (pid {by})",
        busy.0
    );
    let c = counts(&sb, &config, "q");
    assert_eq!((c.done, c.retried, c.dead, c.pending), (1, 1, 0, 0));
}

#[test]
fn job_timeout_stops_the_worker_and_keeps_the_reason() {
    let sb = Sandbox::new();
    let config = sb.config(&format!(
        "{}[queue.q]\njob_timeout = \"1s\"\nmax_attempts = 1\n",
        program(&sb, "p", "q", "block", "stop_timeout = \"5s\"")
    ));
    let master = sb.start(&config);
    let before = wait_running(&sb, "p", 1)[&0];
    let out = sb.cli(&config, &["submit", "q", "--wait", "stuck"]);
    assert_exit_code(out.status, 1, &out.stderr);
    assert_eq!(out.stdout, "dead job timeout after 1s\n");
    master.wait_stderr(&["job timeout after 1s"], DEADLINE);
    let dead = dead_letters(&sb, &config, "q");
    assert_eq!(dead.dead.len(), 1);
    assert_eq!(dead.dead[0].reason, "job timeout after 1s");
    assert_eq!(dead.dead[0].attempts, 1);
    // Restarted: a new process runs in the slot (a stop and restart the master decided,
    // like an operator's restart, so `restarts` does not count it).
    wait_lines(&sb, "starts", 2);
    sb.wait("p.0 restarted", DEADLINE, || {
        let w = worker_of(&sb, "p", 0);
        w.state == "running" && w.pid.is_some() && w.pid != Some(before)
    });
    // Stopped by its stop signal (TERM), not SIGKILL after stop_timeout.
    let w = worker_of(&sb, "p", 0);
    let exit = serde_json::to_string(&w.last_exit).unwrap();
    assert!(exit.contains("TERM"), "{exit}");
    let c = counts(&sb, &config, "q");
    assert_eq!((c.dead, c.pending, c.in_flight), (1, 0, 0));
}

#[test]
fn key_routing_sticks_moves_few_keys_on_scale_up_and_avoids_a_stopped_worker() {
    let sb = Sandbox::new();
    let config = sb.config(&format!(
        "{}[queue.k]\nroute = \"key\"\nprefetch = 4\n",
        program(&sb, "p", "k", "whoami", "workers = 4")
    ));
    let _master = sb.start(&config);
    wait_running(&sb, "p", 4);
    let keys: Vec<String> = (0..200).map(|i| format!("key-{i}")).collect();
    let first = route_keys(&sb, "k", &keys);
    let again = route_keys(&sb, "k", &keys);
    assert_eq!(
        first, again,
        "same key, same worker while workers are stable"
    );
    let mut per: BTreeMap<&str, usize> = BTreeMap::new();
    for w in first.values() {
        *per.entry(w).or_default() += 1;
    }
    println!("4 workers: keys per worker {per:?}");
    assert_eq!(per.len(), 4, "every worker gets keys: {per:?}");

    sb.cli_ok(&config, &["scale", "p", "5"]);
    wait_running(&sb, "p", 5);
    let scaled = route_keys(&sb, "k", &keys);
    let moved: Vec<&String> = keys.iter().filter(|k| first[*k] != scaled[*k]).collect();
    println!(
        "scaling 4 -> 5 moved {} of {} keys",
        moved.len(),
        keys.len()
    );
    assert!(moved.len() < keys.len() / 2, "{} keys moved", moved.len());
    assert!(!moved.is_empty(), "the new worker gets keys");
    for k in &moved {
        assert_eq!(scaled[*k], "4", "key {k} moved, but not to the new worker");
    }

    sb.cli_ok(&config, &["stop", "p.2"]);
    sb.wait("p.2 stopped", DEADLINE, || {
        worker_of(&sb, "p", 2).state == "stopped"
    });
    let after = route_keys(&sb, "k", &keys);
    let mut rerouted = 0;
    for k in &keys {
        if scaled[k] == "2" {
            assert_ne!(after[k], "2");
            rerouted += 1;
        } else {
            assert_eq!(after[k], scaled[k], "key {k} of a live worker moved");
        }
    }
    println!("p.2 stopped: its {rerouted} keys went to other live workers");
    assert!(rerouted > 0);
}

#[test]
fn past_max_pending_a_batch_is_refused_whole() {
    let sb = Sandbox::new();
    let config = sb.config(&format!(
        "{}[queue.q]\nmax_pending = 10\n",
        program(&sb, "p", "q", "log", "workers = 0")
    ));
    let _master = sb.start(&config);
    sb.wait("the master answers", DEADLINE, || try_status(&sb).is_some());
    let eight: Vec<String> = (1..=8).map(|i| format!("a{i}")).collect();
    let mut args = vec!["submit", "q"];
    args.extend(eight.iter().map(String::as_str));
    sb.cli_ok(&config, &args);
    let out = sb.cli(&config, &["submit", "q", "b1", "b2", "b3", "b4", "b5"]);
    assert_exit_code(out.status, 1, &out.stderr);
    assert!(
        out.stderr.contains("max_pending is 10") && out.stderr.contains("refused whole"),
        "{}",
        out.stderr
    );
    let c = counts(&sb, &config, "q");
    assert_eq!((c.pending, c.in_flight), (8, 0));
    // Two more still fit.
    sb.cli_ok(&config, &["submit", "q", "c1", "c2"]);
    assert_eq!(counts(&sb, &config, "q").pending, 10);
    for args in [
        &["submit", "nope", "x"][..],
        &["queue", "nope"],
        &["queue", "nope", "--dead"],
        &["requeue", "nope", "--all"],
    ] {
        let out = sb.cli(&config, args);
        assert_exit_code(out.status, 1, &out.stderr);
        assert!(
            out.stderr.contains("no queue named nope"),
            "{args:?}: {}",
            out.stderr
        );
    }
}

#[test]
fn stopping_a_queue_worker_closes_its_stdin_and_loses_no_job() {
    let sb = Sandbox::new();
    let config = sb.config(&format!(
        "{}[queue.q]\nprefetch = 3\n",
        program(&sb, "p", "q", "hold", "")
    ));
    let _master = sb.start(&config);
    wait_running(&sb, "p", 1);
    let c = config.display().to_string();
    let mut waiter = sb.spawn_plumule(&["submit", "q", "--wait", "1", "2", "3", "-c", &c]);
    wait_lines(&sb, "got", 3);
    sb.wait("status shows 3 jobs in flight", DEADLINE, || {
        worker_of(&sb, "p", 0).in_flight == 3
    });
    // The text table too, in its JOBS column.
    let table = sb.cli_ok(&config, &["status"]).stdout;
    let header = table.lines().next().unwrap();
    let at = header.find("JOBS").expect("a JOBS column");
    let row = table
        .lines()
        .find(|l| l.starts_with("p "))
        .expect("p's row");
    assert_eq!(row[at..].split_whitespace().next(), Some("3"), "{table}");
    sb.cli_ok(&config, &["stop", "p"]);
    let status = waiter.wait_exit(DEADLINE);
    assert_exit_code(status, 0, &waiter.stderr_text());
    assert_eq!(waiter.stdout_text(), "ok held-1\nok held-2\nok held-3\n");
    assert_eq!(lines_of(&sb, "eof"), ["eof"]);
    sb.wait("p.0 stopped", DEADLINE, || {
        worker_of(&sb, "p", 0).state == "stopped"
    });
    let w = worker_of(&sb, "p", 0);
    assert_eq!(
        serde_json::to_string(&w.last_exit).unwrap(),
        r#"{"code":0}"#,
        "it exited by itself"
    );
    let c = counts(&sb, &config, "q");
    assert_eq!(
        (c.done, c.pending, c.in_flight, c.dead, c.retried),
        (3, 0, 0, 0, 0)
    );
}

#[test]
fn a_queue_worker_that_ignores_eof_gets_its_stop_signal_after_stop_timeout() {
    let sb = Sandbox::new();
    let config = sb.config(&format!(
        "{}[queue.q]\nprefetch = 2\n",
        program(&sb, "p", "q", "deaf", "stop_timeout = \"700ms\"")
    ));
    let _master = sb.start(&config);
    wait_running(&sb, "p", 1);
    sb.cli_ok(&config, &["submit", "q", "1", "2", "3"]);
    wait_lines(&sb, "got", 2);
    let asked = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    sb.cli_ok(&config, &["stop", "p"]);
    assert_eq!(wait_lines(&sb, "eof", 1).len(), 1, "it saw EOF");
    let term: f64 = wait_lines(&sb, "signals", 1)[0]
        .strip_prefix("TERM ")
        .unwrap()
        .parse()
        .unwrap();
    // Its stdin closed after `stop` was asked for; TERM comes stop_timeout after that.
    println!("TERM came {:.3}s after `stop`", term - asked);
    assert!(
        term - asked >= 0.69,
        "TERM {:.3}s after `stop`",
        term - asked
    );
    sb.wait("p.0 stopped", DEADLINE, || {
        worker_of(&sb, "p", 0).state == "stopped"
    });
    // Nothing lost: the two it held and the one never sent are pending again.
    let c = wait_counts(&sb, &config, "q", "3 pending", |c| c.pending == 3);
    assert_eq!((c.in_flight, c.dead, c.done), (0, 0, 0));
}

#[test]
fn durable_jobs_survive_a_sigkilled_master_and_finished_ones_do_not_run_again() {
    let sb = Sandbox::new();
    let consumer = |n: u32| {
        sb.config(&format!(
            "{}[queue.q]\n",
            program(&sb, "p", "q", "log", &format!("workers = {n}"))
        ))
    };
    let config = consumer(0);
    let mut master = sb.start(&config);
    sb.wait("the master answers", DEADLINE, || try_status(&sb).is_some());
    sb.cli_ok(&config, &["submit", "q", "j1", "j2", "j3", "j4", "j5"]);
    master.stop_with(SIGKILL, DEADLINE);

    let config = consumer(1);
    let mut master = sb.start(&config);
    assert_eq!(wait_lines(&sb, "runs", 5), ["j1", "j2", "j3", "j4", "j5"]);
    wait_counts(&sb, &config, "q", "done 5", |c| c.done == 5);
    master.stop_with(SIGKILL, DEADLINE);

    let _master = sb.start(&config);
    wait_running(&sb, "p", 1);
    // Jobs go out oldest first: had any of the five been pending, it would run before this.
    let out = sb.cli(&config, &["submit", "q", "--wait", "j6"]);
    assert_exit_code(out.status, 0, &out.stderr);
    assert_eq!(lines_of(&sb, "runs"), ["j1", "j2", "j3", "j4", "j5", "j6"]);
}

#[test]
fn a_lines_payload_with_a_newline_is_refused_before_anything_is_stored() {
    let sb = Sandbox::new();
    let config = sb.config(&format!(
        "{}[queue.q]\n",
        program(&sb, "p", "q", "log", "workers = 0")
    ));
    let _master = sb.start(&config);
    sb.wait("the master answers", DEADLINE, || try_status(&sb).is_some());
    let out = sb.cli(&config, &["submit", "q", "fine", "two\nlines"]);
    assert_exit_code(out.status, 1, &out.stderr);
    assert!(out.stderr.contains("newline"), "{}", out.stderr);
    assert_eq!(counts(&sb, &config, "q").pending, 0);

    let out = sb.cli_ok(&config, &["check"]);
    let line = out
        .stdout
        .lines()
        .find(|l| l.trim_start().starts_with("q "))
        .unwrap_or_else(|| panic!("no queue q in:\n{}", out.stdout));
    for want in [
        "durable=true",
        "protocol=lines",
        "max_attempts=3",
        "consumed by p",
    ] {
        assert!(line.contains(want), "{want} in {line:?}");
    }
}

#[test]
fn reload_refuses_to_remove_a_durable_queue_with_jobs_and_a_protocol_change_rolls_consumers() {
    let sb = Sandbox::new();
    let body = |protocol: &str, with_old: bool| {
        let old = if with_old { "[queue.old]\n\n" } else { "" };
        format!(
            "{}[queue.q]\nprotocol = \"{protocol}\"\n\n{old}",
            program(&sb, "p", "q", "echo", "")
        )
    };
    let config = sb.config(&body("lines", true));
    let master = sb.start(&config);
    let before = wait_running(&sb, "p", 1)[&0];
    sb.cli_ok(&config, &["submit", "old", "a", "b"]);

    sb.config(&body("lines", false));
    let out = sb.cli(&config, &["reload"]);
    assert_exit_code(out.status, 1, &out.stderr);
    assert!(
        out.stderr.contains("old") && out.stderr.contains("2 job(s)"),
        "{}",
        out.stderr
    );
    assert_eq!(counts(&sb, &config, "old").pending, 2);

    sb.config(&body("frames", true));
    sb.cli_ok(&config, &["reload"]);
    let starts = wait_lines(&sb, "starts", 2);
    assert!(starts[1].ends_with(" frames"), "{starts:?}");
    sb.wait("p.0 rolled", DEADLINE, || {
        socket_status(&sb)
            .workers()
            .filter(|(p, _)| p.name == "p")
            .all(|(_, w)| w.state == "running" && w.pid.is_some() && w.pid != Some(before))
    });
    let out = sb.cli(&config, &["submit", "q", "--wait", "abc"]);
    assert_exit_code(out.status, 0, &out.stderr);
    assert_eq!(out.stdout, "ok R:cba\n");
    drop(master);
}

#[test]
fn during_a_protocol_roll_workers_not_yet_rolled_get_jobs_in_their_own_protocol() {
    let sb = Sandbox::new();
    let body = |protocol: &str| {
        format!(
            "{}[queue.q]\nprotocol = \"{protocol}\"\n",
            program(&sb, "p", "q", "echo", "workers = 2\nready = \"notify\"")
        )
    };
    let config = sb.config(&body("lines"));
    fs::write(sb.path("hold"), "").unwrap();
    let _master = sb.start(&config);
    wait_running(&sb, "p", 2);
    sb.config(&body("frames"));
    // `reload` answers once the roll is over: it runs meanwhile.
    let mut reload = sb.spawn_plumule(&["reload", "-c", &config.display().to_string()]);
    // The first successor speaks frames and is held before READY=1: one old worker, still
    // speaking lines, takes the jobs meanwhile.
    let starts = wait_lines(&sb, "starts", 3);
    assert!(starts[2].ends_with(" frames"), "{starts:?}");
    let out = sb.cli(&config, &["submit", "q", "--wait", "abc", "de"]);
    assert_exit_code(out.status, 0, &out.stderr);
    assert_eq!(out.stdout, "ok R:cba\nok R:ed\n");
    fs::write(sb.path("go"), "").unwrap();
    let status = reload.wait_exit(DEADLINE);
    assert_exit_code(status, 0, &reload.stderr_text());
    let starts = wait_lines(&sb, "starts", 4);
    assert!(starts[3].ends_with(" frames"), "{starts:?}");
    wait_running(&sb, "p", 2);
    let out = sb.cli(&config, &["submit", "q", "--wait", "xyz"]);
    assert_exit_code(out.status, 0, &out.stderr);
    assert_eq!(out.stdout, "ok R:zyx\n");
}

#[test]
fn a_queue_made_durable_by_a_reload_keeps_its_jobs_across_a_sigkill() {
    let sb = Sandbox::new();
    let body = |durable: bool| {
        format!(
            "{}[queue.q]\ndurable = {durable}\n",
            program(&sb, "p", "q", "log", "workers = 0")
        )
    };
    let config = sb.config(&body(false));
    let mut master = sb.start(&config);
    sb.wait("the master answers", DEADLINE, || try_status(&sb).is_some());
    sb.config(&body(true));
    sb.cli_ok(&config, &["reload"]);
    sb.cli_ok(&config, &["submit", "q", "a", "b"]);
    master.stop_with(SIGKILL, DEADLINE);

    let _master = sb.start(&config);
    sb.wait("the master answers", DEADLINE, || try_status(&sb).is_some());
    assert_eq!(
        counts(&sb, &config, "q").pending,
        2,
        "submitted after the reload"
    );
}

#[test]
fn a_queue_made_volatile_by_a_reload_stops_writing_its_log() {
    let sb = Sandbox::new();
    let body = |durable: bool| {
        format!(
            "{}[queue.q]\ndurable = {durable}\n",
            program(&sb, "p", "q", "log", "workers = 0")
        )
    };
    let config = sb.config(&body(true));
    let mut master = sb.start(&config);
    sb.wait("the master answers", DEADLINE, || try_status(&sb).is_some());
    sb.config(&body(false));
    sb.cli_ok(&config, &["reload"]);
    sb.cli_ok(&config, &["submit", "q", "a", "b"]);
    master.stop_with(SIGKILL, DEADLINE);

    // Back to durable: what was submitted while it was in memory is gone with the master.
    sb.config(&body(true));
    let _master = sb.start(&config);
    sb.wait("the master answers", DEADLINE, || try_status(&sb).is_some());
    assert_eq!(counts(&sb, &config, "q").pending, 0);
}

#[test]
fn a_job_timeout_at_a_retiring_process_stops_that_process_not_its_successor() {
    let sb = Sandbox::new();
    let body = |gen: u32| {
        format!(
            "{}[queue.q]\njob_timeout = \"1s\"\n",
            program(
                &sb,
                "p",
                "q",
                "block",
                &format!("stop_timeout = \"5s\"\nenv = {{ GEN = \"{gen}\" }}")
            )
        )
    };
    let config = sb.config(&body(1));
    let _master = sb.start(&config);
    wait_running(&sb, "p", 1);
    let c = config.display().to_string();
    let mut waiter = sb.spawn_plumule(&["submit", "q", "--wait", "job", "-c", &c]);
    let old: i32 = sb.wait_line("blocked", DEADLINE).parse().unwrap();
    // A rolling restart: the successor comes up, the old process (stuck on its job) retires
    // with stop_timeout (5 s) to finish; its job times out first.
    sb.config(&body(2));
    let mut reload = sb.spawn_plumule(&["reload", "-c", &c]);
    let status = waiter.wait_exit(DEADLINE);
    assert_exit_code(status, 0, &waiter.stderr_text());
    let starts = lines_of(&sb, "starts");
    assert_eq!(starts.len(), 2, "one successor, never stopped: {starts:?}");
    let successor = starts[1].split(' ').nth(3).unwrap();
    assert_eq!(waiter.stdout_text(), format!("ok by-0-{successor}\n"));
    assert!(!pid_alive(old), "the stuck process was stopped");
    let status = reload.wait_exit(DEADLINE);
    assert_exit_code(status, 0, &reload.stderr_text());
    let c = counts(&sb, &config, "q");
    assert_eq!((c.done, c.retried, c.dead), (1, 1, 0));
}

/// `GET /metrics` from the Unix socket `path`: the samples, `name{labels}` → value, and the
/// whole body.
fn scrape(path: &Path) -> (BTreeMap<String, f64>, String) {
    use std::io::Read;
    let mut s = UnixStream::connect(path).expect("connect to the metrics socket");
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: plumule\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("the answer");
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let samples = body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').expect("a sample line");
            (series.to_string(), value.parse().expect("a value"))
        })
        .collect();
    (samples, body.to_string())
}

#[test]
fn queue_metrics_count_jobs_and_outcomes_and_pass_promtool() {
    let sb = Sandbox::new();
    let socket = sb.path("metrics.sock");
    let text = format!(
        "{}\nmetrics = \"unix:{}\"\n\n{}[queue.flaky]\nmax_attempts = 2\n\
         retry_backoff = {{ initial = \"10ms\", jitter = 0.0 }}\n\n{}[queue.idle]\n",
        sb.header().trim_end(),
        socket.display(),
        program(&sb, "flaky", "flaky", "fail", ""),
        program(&sb, "idle", "idle", "log", "workers = 0"),
    );
    let config = sb.write_file("plumule.toml", &text, 0o644);
    let _master = sb.start(&config);
    wait_running(&sb, "flaky", 1);
    sb.cli_ok(&config, &["submit", "idle", "x", "y"]);
    let out = sb.cli(&config, &["submit", "flaky", "--wait", "j"]);
    assert_exit_code(out.status, 1, &out.stderr);
    fs::write(sb.path("heal"), "").unwrap();
    let out = sb.cli(&config, &["submit", "flaky", "--wait", "k"]);
    assert_exit_code(out.status, 0, &out.stderr);

    let (samples, body) = scrape(&socket);
    let get = |series: &str| {
        *samples
            .get(series)
            .unwrap_or_else(|| panic!("no {series} in:\n{body}"))
    };
    assert_eq!(
        get(r#"plumule_queue_jobs{queue="idle",state="pending"}"#),
        2.0
    );
    assert_eq!(
        get(r#"plumule_queue_jobs{queue="flaky",state="dead"}"#),
        1.0
    );
    assert_eq!(
        get(r#"plumule_queue_jobs{queue="flaky",state="pending"}"#),
        0.0
    );
    assert_eq!(
        get(r#"plumule_queue_jobs{queue="flaky",state="in_flight"}"#),
        0.0
    );
    assert_eq!(
        get(r#"plumule_jobs_total{queue="flaky",outcome="ok"}"#),
        1.0
    );
    assert_eq!(
        get(r#"plumule_jobs_total{queue="flaky",outcome="retried"}"#),
        1.0
    );
    // `drop` counts `drop` answers: this job was dead-lettered by its last `fail`.
    assert_eq!(
        get(r#"plumule_jobs_total{queue="flaky",outcome="drop"}"#),
        0.0
    );
    // Two `fail` answers: one retried, the last one dead-lettered.
    assert_eq!(
        get(r#"plumule_jobs_total{queue="flaky",outcome="fail"}"#),
        2.0
    );
    assert_eq!(
        get(r#"plumule_job_duration_seconds_count{queue="flaky"}"#),
        3.0
    );
    if let Some(promtool) = needed_program("promtool", "prometheus") {
        let mut child = std::process::Command::new(promtool)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run promtool");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(body.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
            "promtool: {out:?}"
        );
    }
}

#[test]
fn a_job_timeout_while_a_worker_drains_sends_its_stop_signal_then() {
    let sb = Sandbox::new();
    let config = sb.config(&format!(
        "{}[queue.q]\njob_timeout = \"1s\"\n",
        program(&sb, "p", "q", "block", "stop_timeout = \"8s\"")
    ));
    let _master = sb.start(&config);
    wait_running(&sb, "p", 1);
    sb.cli_ok(&config, &["submit", "q", "job"]);
    let pid: i32 = sb.wait_line("blocked", DEADLINE).parse().unwrap();
    let asked = std::time::Instant::now();
    sb.cli_ok(&config, &["stop", "p"]);
    sb.wait("the stuck worker is gone", DEADLINE, || !pid_alive(pid));
    let took = asked.elapsed();
    println!("stopped {took:?} after `stop` (job_timeout 1s, stop_timeout 8s)");
    assert!(
        took < std::time::Duration::from_secs(6),
        "its job timed out, yet it waited for stop_timeout: {took:?}"
    );
    let w = worker_of(&sb, "p", 0);
    assert_eq!(w.state, "stopped");
    let exit = serde_json::to_string(&w.last_exit).unwrap();
    assert!(exit.contains("TERM"), "{exit}");
    // Nothing lost: the job is pending again, its attempt counted.
    let c = wait_counts(&sb, &config, "q", "1 pending", |c| c.pending == 1);
    assert_eq!((c.retried, c.dead, c.in_flight), (1, 0, 0));
}

#[test]
fn a_stream_past_max_pending_keeps_what_was_stored_and_says_how_many() {
    let sb = Sandbox::new();
    let config = sb.config(&format!(
        "{}[queue.q]\nmax_pending = 1000\n",
        program(&sb, "p", "q", "log", "workers = 0")
    ));
    let _master = sb.start(&config);
    sb.wait("the master answers", DEADLINE, || try_status(&sb).is_some());
    let input: String = (0..50_000).map(|i| format!("job-{i}\n")).collect();
    let out = cli_raw(&sb, &config, &["submit", "q"], Some(input.as_bytes()));
    assert_exit_code(out.status, 1, &out.stderr);
    let pending = counts(&sb, &config, "q").pending;
    println!("{}", out.stderr.trim_end());
    assert!(pending <= 1000, "{pending}");
    assert!(
        out.stderr
            .contains(&format!("{pending} job(s) were stored before it")),
        "pending {pending}; stderr: {}",
        out.stderr
    );
}

#[test]
fn a_graceful_stop_lets_consumers_answer_and_records_it() {
    let sb = Sandbox::new();
    let with = |mode: &str| {
        sb.config(&format!(
            "{}[queue.q]\nprefetch = 3\n",
            program(&sb, "p", "q", mode, "")
        ))
    };
    let config = with("hold");
    let mut master = sb.start(&config);
    wait_running(&sb, "p", 1);
    sb.cli_ok(&config, &["submit", "q", "1", "2", "3", "4"]);
    wait_lines(&sb, "got", 3);
    stop_cleanly(&mut master);
    assert_eq!(lines_of(&sb, "eof"), ["eof"], "the worker saw EOF");

    // Three were answered while the master stopped; the fourth was never sent.
    let config = with("log");
    let _master = sb.start(&config);
    wait_running(&sb, "p", 1);
    let out = sb.cli(&config, &["submit", "q", "--wait", "5"]);
    assert_exit_code(out.status, 0, &out.stderr);
    assert_eq!(lines_of(&sb, "runs"), ["4", "5"]);
}

#[test]
fn dead_letters_and_requeues_are_durable() {
    let sb = Sandbox::new();
    let config = sb.config(&format!(
        "{}[queue.q]\n",
        program(&sb, "p", "q", "echo", "")
    ));
    let mut master = sb.start(&config);
    wait_running(&sb, "p", 1);
    let out = cli_raw(
        &sb,
        &config,
        &["submit", "q", "--wait", "drop-1", "drop-2", "ok"],
        None,
    );
    assert_exit_code(out.status, 1, &out.stderr);
    master.stop_with(SIGKILL, DEADLINE);

    let mut master = sb.start(&config);
    wait_running(&sb, "p", 1);
    let dead = dead_letters(&sb, &config, "q");
    let summary: Vec<(u32, &str, bool)> = dead
        .dead
        .iter()
        .map(|d| (d.attempts, d.payload.as_str(), d.base64))
        .collect();
    assert_eq!(summary, [(1, "drop-1", false), (1, "drop-2", false)]);
    // The worker's reason ends in a byte that is not UTF-8: it travels base64, intact.
    let reason = plumule::protocol::decode_bytes(&dead.dead[0].reason, dead.dead[0].reason_base64)
        .expect("base64");
    assert!(reason.starts_with(b"refused "), "{dead:?}");
    let table = sb.cli_ok(&config, &["queue", "q", "--dead"]).stdout;
    assert!(
        table.contains("refused ") && table.contains("drop-2"),
        "{table}"
    );
    let c = counts(&sb, &config, "q");
    assert_eq!((c.pending, c.dead), (0, 2));

    // Requeued: the worker drops it again; the other one stays requeued-then-dead once more.
    let id = dead.dead[0].id.to_string();
    sb.cli_ok(&config, &["requeue", "q", &id]);
    wait_counts(&sb, &config, "q", "dead again", |c| {
        c.dead == 2 && c.pending == 0
    });
    master.stop_with(SIGKILL, DEADLINE);
    let _master = sb.start(&config);
    wait_running(&sb, "p", 1);
    let c = counts(&sb, &config, "q");
    assert_eq!((c.pending, c.dead), (0, 2));
}

#[test]
fn jobs_in_flight_when_the_master_is_sigkilled_run_again_after_a_restart() {
    let sb = Sandbox::new();
    let with = |mode: &str| {
        sb.config(&format!(
            "{}[queue.q]\nprefetch = 3\n",
            program(&sb, "p", "q", mode, "")
        ))
    };
    let config = with("hold");
    let mut master = sb.start(&config);
    wait_running(&sb, "p", 1);
    sb.cli_ok(&config, &["submit", "q", "1", "2", "3", "4"]);
    wait_lines(&sb, "got", 3);
    master.stop_with(SIGKILL, DEADLINE);

    let config = with("log");
    let _master = sb.start(&config);
    assert_eq!(wait_lines(&sb, "runs", 4), ["1", "2", "3", "4"]);
    let c = wait_counts(&sb, &config, "q", "done 4", |c| c.done == 4);
    assert_eq!((c.pending, c.in_flight, c.dead), (0, 0, 0));
}

#[test]
fn a_frames_answer_over_max_frame_is_a_protocol_error() {
    let sb = Sandbox::new();
    let config = sb.config(&format!(
        "{}[queue.q]\nprotocol = \"frames\"\n",
        program(&sb, "p", "q", "garbage", "")
    ));
    let master = sb.start(&config);
    wait_running(&sb, "p", 1);
    // `hello\n` read as a frame header: a length of 1 751 477 356 bytes.
    let out = sb.cli(&config, &["submit", "q", "--wait", "x"]);
    assert_exit_code(out.status, 0, &out.stderr);
    assert_eq!(out.stdout, "ok fine\n");
    let line = master.wait_stderr(&["protocol error"], DEADLINE);
    assert!(line.contains("over max_frame"), "{line}");
    let c = counts(&sb, &config, "q");
    assert_eq!((c.done, c.retried, c.dead), (1, 1, 0));
}

#[test]
fn consumers_of_a_queue_removed_by_a_reload_see_eof_at_once() {
    let sb = Sandbox::new();
    let consumer = format!(
        "{}[queue.q]\n\n",
        program(&sb, "p", "q", "hold", "stop_timeout = \"8s\"")
    );
    let config = sb.config(&format!(
        "{consumer}[program.other]\ncommand = [\"/bin/sleep\", \"1000\"]\n"
    ));
    let _master = sb.start(&config);
    let pid = wait_running(&sb, "p", 1)[&0];
    sb.config("[program.other]\ncommand = [\"/bin/sleep\", \"1000\"]\n");
    let asked = std::time::Instant::now();
    sb.cli_ok(&config, &["reload"]);
    sb.wait("the consumer is gone", DEADLINE, || !pid_alive(pid));
    let took = asked.elapsed();
    assert_eq!(lines_of(&sb, "eof"), ["eof"], "it saw EOF on stdin");
    assert!(
        took < std::time::Duration::from_secs(6),
        "it waited for stop_timeout: {took:?}"
    );
}

#[test]
fn a_job_dead_lettered_by_a_protocol_error_says_so() {
    let sb = Sandbox::new();
    let config = sb.config(&format!(
        "{}[queue.q]\nmax_attempts = 1\n",
        program(&sb, "p", "q", "garbage", "")
    ));
    let _master = sb.start(&config);
    wait_running(&sb, "p", 1);
    let out = sb.cli(&config, &["submit", "q", "--wait", "x"]);
    assert_exit_code(out.status, 1, &out.stderr);
    assert!(
        out.stdout
            .starts_with("dead protocol error: unexpected answer line \"hello\""),
        "{}",
        out.stdout
    );
    let dead = dead_letters(&sb, &config, "q");
    assert_eq!(dead.dead.len(), 1);
    assert!(
        dead.dead[0].reason.starts_with("protocol error: "),
        "{dead:?}"
    );
}

#[test]
fn round_robin_takes_turns_among_the_workers() {
    let sb = Sandbox::new();
    let config = sb.config(&format!(
        "{}[queue.q]\nroute = \"round-robin\"\nprefetch = 10\n",
        program(&sb, "p", "q", "whoami", "workers = 3")
    ));
    let _master = sb.start(&config);
    wait_running(&sb, "p", 3);
    let jobs: Vec<String> = (0..30).map(|i| format!("j{i}")).collect();
    let mut args = vec!["submit", "q", "--wait"];
    args.extend(jobs.iter().map(String::as_str));
    let out = sb.cli_ok(&config, &args);
    let ids: Vec<&str> = out
        .stdout
        .lines()
        .map(|l| l.strip_prefix("ok ").unwrap())
        .collect();
    let mut per: BTreeMap<&str, usize> = BTreeMap::new();
    for id in &ids {
        *per.entry(id).or_default() += 1;
    }
    assert_eq!(
        per.values().copied().collect::<Vec<_>>(),
        [10, 10, 10],
        "{per:?}"
    );
    // In turns: each run of three consecutive jobs went to three different workers.
    for turn in ids.chunks(3) {
        let distinct: std::collections::BTreeSet<&&str> = turn.iter().collect();
        assert_eq!(distinct.len(), 3, "{ids:?}");
    }
}

#[test]
fn scaling_down_drains_the_workers_it_stops() {
    let sb = Sandbox::new();
    let config = sb.config(&format!(
        "{}[queue.q]\nprefetch = 2\n",
        program(&sb, "p", "q", "hold", "workers = 2")
    ));
    let _master = sb.start(&config);
    wait_running(&sb, "p", 2);
    let c = config.display().to_string();
    let mut waiter = sb.spawn_plumule(&["submit", "q", "--wait", "1", "2", "3", "4", "-c", &c]);
    sb.wait("both workers hold two jobs", DEADLINE, || {
        let s = socket_status(&sb);
        [0, 1]
            .iter()
            .all(|&id| worker(&s, "p", id).is_some_and(|w| w.in_flight == 2))
    });
    sb.cli_ok(&config, &["scale", "p", "1"]);
    wait_lines(&sb, "eof", 1);
    wait_counts(&sb, &config, "q", "two done", |c| c.done == 2);
    wait_running(&sb, "p", 1);
    assert_eq!(worker_of(&sb, "p", 0).in_flight, 2, "p.0 keeps its jobs");
    sb.cli_ok(&config, &["stop", "p"]);
    let status = waiter.wait_exit(DEADLINE);
    assert_exit_code(status, 0, &waiter.stderr_text());
    assert_eq!(
        waiter.stdout_text(),
        "ok held-1\nok held-2\nok held-3\nok held-4\n",
        "in submission order"
    );
    let c = counts(&sb, &config, "q");
    assert_eq!((c.done, c.retried, c.pending, c.dead), (4, 0, 0, 0));
}

#[test]
fn a_payload_over_max_frame_is_refused_at_submit() {
    let sb = Sandbox::new();
    let config = sb.config(&format!(
        "{}[queue.q]\nprotocol = \"frames\"\nmax_frame = \"1KiB\"\n",
        program(&sb, "p", "q", "log", "workers = 0")
    ));
    let _master = sb.start(&config);
    sb.wait("the master answers", DEADLINE, || try_status(&sb).is_some());
    let big = "x".repeat(2000);
    let out = sb.cli(&config, &["submit", "q", "small", &big]);
    assert_exit_code(out.status, 1, &out.stderr);
    assert!(out.stderr.contains("max_frame"), "{}", out.stderr);
    assert_eq!(counts(&sb, &config, "q").pending, 0, "refused whole");
    sb.cli_ok(&config, &["submit", "q", &"y".repeat(1024)]);
    assert_eq!(counts(&sb, &config, "q").pending, 1);
}
