//! plumule as systemd sees it and as its workers see it (SPEC §2 `ready`, `ready_timeout`,
//! `watchdog`, `listen`, `after`; §6; §9): the master's sd_notify messages to a fake systemd,
//! its own notify socket for workers, readiness, watchdogs, `after` ordering, sockets passed
//! with LISTEN_FDS, the unit file, and log lines under journald.
//!
//! The fake systemd is a datagram socket in the sandbox whose path the master gets as
//! `NOTIFY_SOCKET`. Workers that speak sd_notify are a small Python script (`sd.py`) that the
//! shell wrapper `exec`s, so the sender of every message is the worker's own pid.

mod common;

use std::fs;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal::SIGHUP;
use plumule::protocol::{LastExit, StatusReport, WorkerStatus};
use serde_json::Value;

use common::*;

/// Backoff for programs whose restarts must be quick and free of jitter.
const FAST_BACKOFF: &str = r#"backoff = { initial = "10ms", max = "10ms", jitter = 0.0 }"#;

/// The worker side of sd_notify, run as `sd.py STEP…`; the steps run in order, then the
/// worker waits for signals forever.
const SD_PY: &str = r#"
import json, os, signal, socket, sys, time

def notify(message):
    addr = os.environ["NOTIFY_SOCKET"]
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.sendto(message.encode(), addr)
    s.close()

def sockname(fd):
    s = socket.socket(fileno=fd)
    try:
        name = s.getsockname()
        return name if isinstance(name, str) else "%s:%d" % name[:2]
    finally:
        s.detach()

me = "%s.%s" % (os.environ.get("PLUMULE_PROGRAM"), os.environ.get("PLUMULE_WORKER_ID"))
for step in sys.argv[1:]:
    op, _, arg = step.partition(":")
    if op == "wait":
        # wait:PATH  until PATH exists
        while not os.path.exists(arg):
            time.sleep(0.01)  # poll until the test creates PATH
    elif op == "send":
        # send:MESSAGE  one datagram; a literal \n separates lines
        notify(arg.replace("\\n", "\n"))
    elif op == "env":
        # env:DIR  DIR/PID.json: the environment and the names of the fds LISTEN_FDS counts
        fds = int(os.environ.get("LISTEN_FDS", "0"))
        data = {"pid": os.getpid(), "env": dict(os.environ),
                "socknames": [sockname(3 + i) for i in range(fds)]}
        path = os.path.join(arg, "%d.json" % os.getpid())
        with open(path + ".tmp", "w") as f:
            json.dump(data, f)
        os.rename(path + ".tmp", path)
    elif op == "onterm":
        # onterm:PATH:DELAY  on SIGTERM: wait DELAY seconds, append PROGRAM.ID to PATH, exit 0
        path, _, delay = arg.partition(":")
        def on_term(sig, frame, path=path, delay=float(delay or "0")):
            time.sleep(delay)
            with open(path, "a") as f:
                f.write(me + "\n")
            os._exit(0)
        signal.signal(signal.SIGTERM, on_term)
    elif op == "sleep":
        # sleep:SECONDS
        time.sleep(float(arg))
    elif op == "ping":
        # ping:SECONDS  WATCHDOG=1 every SECONDS, forever
        while True:
            notify("WATCHDOG=1")
            time.sleep(float(arg))
    elif op == "serve":
        # serve  answer every connection on fd 3 with our pid, forever
        server = socket.socket(fileno=3)
        while True:
            conn, _ = server.accept()
            conn.sendall(b"%d\n" % os.getpid())
            conn.close()
    else:
        sys.exit("sd.py: unknown step " + step)
while True:
    signal.pause()
"#;

/// A worker script `name` that records its start line, then becomes `sd.py STEPS…` (same pid).
/// Core dumps are off: a worker killed by SIGABRT must not leave (or wait for) one.
fn sd_worker(sb: &Sandbox, name: &str, steps: &[String]) -> PathBuf {
    let sd = sb.write_file("sd.py", SD_PY, 0o644);
    let args: Vec<String> = steps.iter().map(|s| sh_str(Path::new(s))).collect();
    sb.worker(
        name,
        &format!(
            "ulimit -c 0\nexec {} {} {}",
            python(),
            sh_str(&sd),
            args.join(" ")
        ),
    )
}

/// The folder `env:DIR` steps write to, created on first use.
fn env_dir(sb: &Sandbox) -> PathBuf {
    let dir = sb.path("env");
    fs::create_dir_all(&dir).expect("env dir");
    dir
}

/// What `env:DIR` recorded for worker `pid`, once it has been written.
#[track_caller]
fn worker_env(sb: &Sandbox, pid: i32) -> Value {
    let path = env_dir(sb).join(format!("{pid}.json"));
    sb.wait(
        &format!("worker {pid} has recorded its environment"),
        DEADLINE,
        || path.exists(),
    );
    serde_json::from_str(&fs::read_to_string(&path).expect("env file")).expect("env JSON")
}

fn env_var<'a>(env: &'a Value, name: &str) -> Option<&'a str> {
    env["env"][name].as_str()
}

// ---------------------------------------------------------------------------------------------
// status --json

/// `plumule status --json` (exit 0, or 3 when a worker is failed), parsed.
#[track_caller]
fn status(sb: &Sandbox, config: &Path) -> StatusReport {
    let (code, report) = sb.status(config);
    assert!(matches!(code, 0 | 3), "status exited {code}: {report:?}");
    report
}

/// Worker `id` of `program` in a status reply: the live one when, during a rolling restart, a
/// stopping predecessor shares its id.
fn live_worker(status: &StatusReport, program: &str, id: u32) -> Option<WorkerStatus> {
    let same_id: Vec<&WorkerStatus> = status
        .workers()
        .filter(|(p, w)| p.name == program && w.id == id)
        .map(|(_, w)| w)
        .collect();
    let live = same_id.iter().find(|w| w.state != "stopping");
    live.or(same_id.first()).map(|w| (*w).clone())
}

/// Waits until worker `id` of `program` satisfies `cond` in `status --json`; returns it.
#[track_caller]
fn wait_worker(
    sb: &Sandbox,
    config: &Path,
    program: &str,
    id: u32,
    what: &str,
    cond: impl Fn(&WorkerStatus) -> bool,
) -> WorkerStatus {
    let mut last = None;
    let give_up = Instant::now() + DEADLINE;
    // Gives up from inside the condition so that the failure shows the last status seen.
    wait_or_abort(
        &format!("{program}.{id} {what}"),
        DEADLINE + Duration::from_secs(1),
        || {
            last = live_worker(&status(sb, config), program, id);
            if last.as_ref().is_some_and(&cond) {
                Ok(true)
            } else if Instant::now() >= give_up {
                Err(format!("after {DEADLINE:?} it is still {last:?}"))
            } else {
                Ok(false)
            }
        },
    );
    last.expect("waited for")
}

// ---------------------------------------------------------------------------------------------
// The fake systemd

/// A datagram socket standing in for systemd's notify socket. Every datagram received is kept;
/// [`FakeSystemd::expect`] consumes them in order.
struct FakeSystemd {
    socket: UnixDatagram,
    /// Its path, as `NOTIFY_SOCKET` carries it.
    address: String,
    seen: Vec<String>,
    /// Index in `seen` of the first datagram `expect` has not consumed yet.
    next: usize,
}

impl FakeSystemd {
    fn bind(sb: &Sandbox) -> FakeSystemd {
        let path = sb.path("systemd-notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind the fake systemd socket");
        FakeSystemd {
            socket,
            address: path.display().to_string(),
            seen: Vec::new(),
            next: 0,
        }
    }

    /// The same in the abstract namespace: `NOTIFY_SOCKET=@NAME`.
    fn bind_abstract(sb: &Sandbox) -> FakeSystemd {
        use std::os::linux::net::SocketAddrExt;
        let dir = sb
            .root()
            .file_name()
            .expect("sandbox name")
            .to_string_lossy();
        let name = format!("{dir}/systemd-notify");
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            .expect("abstract address");
        let socket = UnixDatagram::bind_addr(&addr).expect("bind the fake systemd socket");
        FakeSystemd {
            socket,
            address: format!("@{name}"),
            seen: Vec::new(),
            next: 0,
        }
    }

    /// The variable that points the master at this socket.
    fn env(&self) -> (&'static str, &str) {
        ("NOTIFY_SOCKET", &self.address)
    }

    /// Receives one datagram if one arrives within `timeout`.
    fn recv(&mut self, timeout: Duration) -> bool {
        let timeout = timeout.max(Duration::from_millis(1));
        self.socket
            .set_read_timeout(Some(timeout))
            .expect("timeout");
        let mut buf = [0u8; 4096];
        match self.socket.recv(&mut buf) {
            Ok(n) => {
                self.seen
                    .push(String::from_utf8_lossy(&buf[..n]).into_owned());
                true
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                false
            }
            Err(e) => panic!("fake systemd: recv failed: {e}"),
        }
    }

    /// Takes in whatever has arrived already.
    fn drain(&mut self) {
        while self.recv(Duration::from_millis(1)) {}
    }

    /// Waits for the next datagram (after those consumed so far) that satisfies `cond`, and
    /// consumes it and those before it. Fails, showing every datagram and the master's stderr,
    /// when none comes within `deadline` or the master exits without sending it.
    #[track_caller]
    fn expect(
        &mut self,
        master: &mut Daemon,
        what: &str,
        deadline: Duration,
        cond: impl Fn(&str) -> bool,
    ) -> String {
        let give_up = Instant::now() + deadline;
        loop {
            if let Some(i) = (self.next..self.seen.len()).find(|&i| cond(&self.seen[i])) {
                self.next = i + 1;
                return self.seen[i].clone();
            }
            let now = Instant::now();
            let why = if now >= give_up {
                format!("timed out after {deadline:?}")
            } else if !self.recv((give_up - now).min(Duration::from_millis(100))) {
                reap_adopted_orphans();
                if master.running() {
                    continue;
                }
                self.drain();
                if (self.next..self.seen.len()).any(|i| cond(&self.seen[i])) {
                    continue;
                }
                "the master exited".to_string()
            } else {
                continue;
            };
            panic!(
                "{why} waiting for the master to send {what}; datagrams so far: {:?}; \
                 its stderr:\n{}",
                self.seen,
                master.stderr_text()
            );
        }
    }

    /// Every datagram that arrives during `window` (a bounded observation for "nothing is
    /// sent"; nothing else in these tests waits for a fixed time).
    fn collect_for(&mut self, window: Duration) -> Vec<String> {
        let start = self.seen.len();
        let end = Instant::now() + window;
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            if left.is_zero() {
                break;
            }
            self.recv(left);
        }
        self.seen[start..].to_vec()
    }
}

/// Whether a datagram carries the line `line` (messages are `KEY=VALUE` lines).
fn has_line(datagram: &str, line: &str) -> bool {
    datagram.lines().any(|l| l == line)
}

/// The value of `key` in a datagram.
fn value_of<'a>(datagram: &'a str, key: &str) -> Option<&'a str> {
    datagram
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
}

fn monotonic_usec() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("clock");
    ts.tv_sec() as u64 * 1_000_000 + ts.tv_nsec() as u64 / 1_000
}

/// A program of `n` shell workers that run until stopped.
fn sleeper(sb: &Sandbox, name: &str, n: u32) -> String {
    let script = sb.worker(&format!("{name}.sh"), "exec sleep 1000");
    format!(
        "[program.{name}]\ncommand = {}\nworkers = {n}\n\n",
        argv(&script)
    )
}

// ---------------------------------------------------------------------------------------------
// The master and systemd

#[test]
fn the_master_tells_systemd_ready_reloading_ready_stopping() {
    let sb = Sandbox::new();
    let config = sb.config(&sleeper(&sb, "web", 2));
    let mut systemd = FakeSystemd::bind(&sb);
    let mut master = sb.start_with_env(&config, &[systemd.env()]);

    let ready = systemd.expect(&mut master, "READY=1", DEADLINE, |d| has_line(d, "READY=1"));
    assert!(
        value_of(&ready, "STATUS").is_some_and(|s| s.starts_with("2/2 workers running")),
        "READY=1 comes with a STATUS= summary: {ready:?}"
    );

    let before = monotonic_usec();
    master.signal(SIGHUP);
    let reloading = systemd.expect(&mut master, "RELOADING=1", DEADLINE, |d| {
        has_line(d, "RELOADING=1")
    });
    let after = monotonic_usec();
    let usec: u64 = value_of(&reloading, "MONOTONIC_USEC")
        .unwrap_or_else(|| panic!("MONOTONIC_USEC= in the RELOADING=1 datagram: {reloading:?}"))
        .parse()
        .unwrap_or_else(|e| panic!("MONOTONIC_USEC is a number ({e}): {reloading:?}"));
    assert!(
        (before..=after).contains(&usec),
        "MONOTONIC_USEC={usec} is CLOCK_MONOTONIC between the SIGHUP ({before}) and its \
         receipt ({after})"
    );
    systemd.expect(&mut master, "READY=1 after the reload", DEADLINE, |d| {
        has_line(d, "READY=1")
    });

    master.signal(SIGTERM);
    let stopping = systemd.expect(&mut master, "STOPPING=1", DEADLINE, |d| {
        has_line(d, "STOPPING=1")
    });
    assert!(
        value_of(&stopping, "EXTEND_TIMEOUT_USEC").is_some_and(|v| v.parse::<u64>().is_ok()),
        "STOPPING=1 asks for time to stop: {stopping:?}"
    );
    let status = master.wait_exit(DEADLINE);
    assert_exit_code(status, 0, &master.stderr_text());
}

#[test]
fn an_abstract_notify_socket_is_reached_too() {
    let sb = Sandbox::new();
    let config = sb.config(&sleeper(&sb, "web", 1));
    let mut systemd = FakeSystemd::bind_abstract(&sb);
    let mut master = sb.start_with_env(&config, &[systemd.env()]);

    systemd.expect(&mut master, "READY=1", DEADLINE, |d| has_line(d, "READY=1"));
    master.signal(SIGTERM);
    systemd.expect(&mut master, "STOPPING=1", DEADLINE, |d| {
        has_line(d, "STOPPING=1")
    });
    let status = master.wait_exit(DEADLINE);
    assert_exit_code(status, 0, &master.stderr_text());
}

#[test]
fn ready_waits_for_a_notify_worker_to_say_ready() {
    let sb = Sandbox::new();
    let go = sb.path("go");
    let slow = sd_worker(
        &sb,
        "slow.sh",
        &[format!("wait:{}", go.display()), "send:READY=1".into()],
    );
    let config = sb.config(&format!(
        "{}[program.slow]\ncommand = {}\nready = \"notify\"\n",
        sleeper(&sb, "quick", 1),
        argv(&slow)
    ));
    let mut systemd = FakeSystemd::bind(&sb);
    let mut master = sb.start_with_env(&config, &[systemd.env()]);

    // The summary that says one of two workers runs is sent in the same pass that would send
    // an early READY=1, just after it.
    systemd.expect(&mut master, "STATUS=1/2 workers running", DEADLINE, |d| {
        value_of(d, "STATUS").is_some_and(|s| s.starts_with("1/2 workers running"))
    });
    wait_worker(&sb, &config, "slow", 0, "waits for READY=1", |w| {
        w.state == "starting" && w.pid.is_some()
    });
    systemd.drain();
    assert!(
        !systemd.seen.iter().any(|d| has_line(d, "READY=1")),
        "READY=1 sent while slow.0 has not said READY=1: {:?}",
        systemd.seen
    );

    fs::write(&go, "").expect("create the go file");
    let ready = systemd.expect(&mut master, "READY=1", DEADLINE, |d| has_line(d, "READY=1"));
    assert!(
        value_of(&ready, "STATUS").is_some_and(|s| s.starts_with("2/2 workers running")),
        "READY=1 once both run: {ready:?}"
    );
    stop_cleanly(&mut master);
}

#[test]
fn watchdog_pings_arrive_when_systemd_asks_for_them() {
    let sb = Sandbox::new();
    let config = sb.config(&sleeper(&sb, "web", 1));
    let mut systemd = FakeSystemd::bind(&sb);
    let started = Instant::now();
    let mut master = sb.start_with_env(&config, &[systemd.env(), ("WATCHDOG_USEC", "200000")]);

    for n in 1..=3 {
        let left = Duration::from_secs(2).saturating_sub(started.elapsed());
        systemd.expect(&mut master, &format!("WATCHDOG=1 #{n}"), left, |d| {
            has_line(d, "WATCHDOG=1")
        });
    }
    stop_cleanly(&mut master);
}

#[test]
fn no_watchdog_pings_when_watchdog_pid_is_another_process() {
    let sb = Sandbox::new();
    let config = sb.config(&sleeper(&sb, "web", 1));
    let mut systemd = FakeSystemd::bind(&sb);
    let other = std::process::id().to_string();
    let mut master = sb.start_with_env(
        &config,
        &[
            systemd.env(),
            ("WATCHDOG_USEC", "200000"),
            ("WATCHDOG_PID", &other),
        ],
    );

    systemd.expect(&mut master, "READY=1", DEADLINE, |d| has_line(d, "READY=1"));
    // Five ping periods: the master would have sent WATCHDOG=1 by now, had it been asked to.
    let later = systemd.collect_for(Duration::from_secs(1));
    let pings: Vec<&String> = systemd
        .seen
        .iter()
        .filter(|d| has_line(d, "WATCHDOG=1"))
        .collect();
    assert!(
        pings.is_empty(),
        "WATCHDOG=1 sent although WATCHDOG_PID={other} is not the master; since READY: {later:?}"
    );
    stop_cleanly(&mut master);
}

// ---------------------------------------------------------------------------------------------
// Workers that speak sd_notify

#[test]
fn a_notify_worker_is_starting_until_ready_and_its_status_text_shows() {
    let sb = Sandbox::new();
    let go = sb.path("go");
    let script = sd_worker(
        &sb,
        "svc.sh",
        &[
            "send:STATUS=warming up".into(),
            format!("wait:{}", go.display()),
            "send:READY=1\\nSTATUS=serving".into(),
        ],
    );
    let config = sb.config(&format!(
        "[program.svc]\ncommand = {}\nready = \"notify\"\n",
        argv(&script)
    ));
    let mut master = sb.start(&config);

    let pid = sb.wait_starts("svc", 1, DEADLINE)[0].pid;
    let w = wait_worker(&sb, &config, "svc", 0, "reports STATUS=warming up", |w| {
        w.status.as_deref() == Some("warming up")
    });
    assert_eq!(w.state, "starting", "not running before READY=1: {w:?}");
    assert_eq!(w.detail.as_deref(), Some("waiting for READY=1"), "{w:?}");
    assert_eq!(w.pid, Some(pid), "{w:?}");

    fs::write(&go, "").expect("create the go file");
    let w = wait_worker(&sb, &config, "svc", 0, "is running", |w| {
        w.state == "running"
    });
    assert_eq!(
        w.status.as_deref(),
        Some("serving"),
        "the latest STATUS= shows: {w:?}"
    );
    assert_eq!(w.pid, Some(pid), "the same process: {w:?}");
    assert_eq!(w.restarts, 0, "{w:?}");
    stop_cleanly(&mut master);
}

#[test]
fn a_silent_notify_worker_is_restarted_after_ready_timeout() {
    let sb = Sandbox::new();
    let script = sb.timed_worker("mute.sh", "exec sleep 1000");
    let config = sb.config(&format!(
        "[program.mute]\ncommand = {}\nready = \"notify\"\nready_timeout = \"300ms\"\n{FAST_BACKOFF}\n",
        argv(&script)
    ));
    let mut master = sb.start(&config);

    let first = sb.wait_starts("mute", 1, DEADLINE)[0].clone();
    let w = wait_worker(&sb, &config, "mute", 0, "has been restarted", |w| {
        w.restarts >= 1 && w.pid.is_some_and(|p| p != first.pid)
    });
    assert_eq!(
        w.last_exit,
        Some(LastExit::Signal {
            signal: "TERM".into()
        }),
        "stopped with its stop_signal: {w:?}"
    );
    let starts = sb.wait_starts("mute", 2, DEADLINE);
    // Stamped by each shell once it runs, a little after the fork that starts the clock: the
    // gap may fall short of 300 ms by the first shell's start-up time, never by much.
    let waited = starts[1].time.unwrap() - first.time.unwrap();
    assert!(
        waited >= 0.2,
        "restarted {waited:.3}s after its start, before ready_timeout (300ms) ran out"
    );
    stop_cleanly(&mut master);
}

#[test]
fn a_worker_that_misses_its_watchdog_is_aborted_and_one_that_pings_is_left_alone() {
    let sb = Sandbox::new();
    let dir = env_dir(&sb);
    // Both say READY=1, where the watchdog timer starts, once they have recorded their
    // environment: a slow interpreter start cannot count as a missed ping.
    let once = sd_worker(
        &sb,
        "once.sh",
        &[
            format!("env:{}", dir.display()),
            "send:READY=1".into(),
            "send:WATCHDOG=1".into(),
        ],
    );
    let steady = sd_worker(
        &sb,
        "steady.sh",
        &[
            format!("env:{}", dir.display()),
            "send:READY=1".into(),
            "ping:0.05".into(),
        ],
    );
    let config = sb.config(&format!(
        "[program.once]\ncommand = {}\nready = \"notify\"\nwatchdog = \"300ms\"\n{FAST_BACKOFF}\n\n\
         [program.steady]\ncommand = {}\nready = \"notify\"\nwatchdog = \"300ms\"\n{FAST_BACKOFF}\n",
        argv(&once),
        argv(&steady)
    ));
    let mut master = sb.start(&config);

    let first = sb.wait_starts("once", 1, DEADLINE)[0].pid;
    let steady_pid = sb.wait_starts("steady", 1, DEADLINE)[0].pid;
    for pid in [first, steady_pid] {
        let env = worker_env(&sb, pid);
        assert_eq!(
            env_var(&env, "WATCHDOG_PID"),
            Some(pid.to_string().as_str()),
            "WATCHDOG_PID is the worker's own pid: {env}"
        );
        assert_eq!(env_var(&env, "WATCHDOG_USEC"), Some("300000"), "{env}");
    }

    let w = wait_worker(
        &sb,
        &config,
        "once",
        0,
        "has missed its watchdog twice",
        |w| w.restarts >= 2,
    );
    assert_eq!(
        w.last_exit,
        Some(LastExit::Signal {
            signal: "ABRT".into()
        }),
        "{w:?}"
    );
    assert_ne!(w.pid, Some(first), "a new process: {w:?}");

    // Two watchdog periods have passed at least: the pinging worker is still the first one.
    let s = live_worker(&status(&sb, &config), "steady", 0).expect("steady.0 is listed");
    assert_eq!(
        s.pid,
        Some(steady_pid),
        "the pinging worker keeps its process: {s:?}"
    );
    assert_eq!(s.state, "running", "{s:?}");
    assert_eq!(s.restarts, 0, "{s:?}");
    assert_eq!(sb.starts_of("steady").len(), 1, "steady started once");
    stop_cleanly(&mut master);
}

#[test]
fn after_waits_for_the_ready_of_its_dependency_and_stops_in_reverse() {
    let sb = Sandbox::new();
    let go = sb.path("go");
    let order = sb.path("stop-order");
    let a = sd_worker(
        &sb,
        "a.sh",
        &[
            format!("onterm:{}:0", order.display()),
            format!("wait:{}", go.display()),
            "send:READY=1".into(),
        ],
    );
    // b takes its time to exit: were a stopped at the same time, a would finish first.
    // It records its environment once its handler is armed.
    let b = sd_worker(
        &sb,
        "b.sh",
        &[
            format!("onterm:{}:0.3", order.display()),
            format!("env:{}", env_dir(&sb).display()),
        ],
    );
    let config = sb.config(&format!(
        "[program.a]\ncommand = {}\nready = \"notify\"\n\n\
         [program.b]\ncommand = {}\nafter = [\"a\"]\n",
        argv(&a),
        argv(&b)
    ));
    let mut master = sb.start(&config);

    sb.wait_starts("a", 1, DEADLINE);
    wait_worker(&sb, &config, "a", 0, "waits for READY=1", |w| {
        w.state == "starting" && w.detail.as_deref() == Some("waiting for READY=1")
    });
    let w = wait_worker(&sb, &config, "b", 0, "waits for a", |w| {
        w.state == "starting"
    });
    assert_eq!(w.detail.as_deref(), Some("waiting for a"), "{w:?}");
    assert_eq!(w.pid, None, "b is not forked before a is ready: {w:?}");
    assert!(sb.starts_of("b").is_empty(), "b has not started");

    fs::write(&go, "").expect("create the go file");
    let b_pid = sb.wait_starts("b", 1, DEADLINE)[0].pid;
    wait_worker(&sb, &config, "b", 0, "is running", |w| {
        w.state == "running" && w.pid == Some(b_pid)
    });
    worker_env(&sb, b_pid);
    let a0 = live_worker(&status(&sb, &config), "a", 0).expect("a.0 is listed");
    assert_eq!(a0.state, "running", "a is ready: {a0:?}");

    stop_cleanly(&mut master);
    assert_eq!(
        fs::read_to_string(&order).unwrap_or_default(),
        "b.0\na.0\n",
        "b's worker exits before a's is stopped"
    );
}

// ---------------------------------------------------------------------------------------------
// Sockets passed to workers

/// A TCP port that was free a moment ago.
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    listener.local_addr().expect("local addr").port()
}

/// Connects to `addr` and reads the pid the worker answers with.
fn ask_pid(addr: &SocketAddr) -> std::io::Result<Option<i32>> {
    let stream = TcpStream::connect_timeout(addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    Ok(line.trim().parse().ok())
}

/// What the client saw during a rolling restart.
#[derive(Default, Debug)]
struct ClientLog {
    attempts: usize,
    refused: Vec<String>,
    answered_by: Vec<i32>,
}

#[test]
fn a_listen_worker_serves_on_fd_3_and_a_rolling_restart_refuses_no_connection() {
    let sb = Sandbox::new();
    let dir = env_dir(&sb);
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // Each worker takes 200 ms to say READY=1, so the roll lasts long enough for the client
    // to connect many times; meanwhile connections wait in the shared socket's backlog.
    let script = sd_worker(
        &sb,
        "web.sh",
        &[
            format!("env:{}", dir.display()),
            "sleep:0.2".into(),
            "send:READY=1".into(),
            "serve".into(),
        ],
    );
    let program = |generation: u32| {
        format!(
            "[program.web]\ncommand = {}\nworkers = 2\nready = \"notify\"\n\
             listen = [\"tcp:127.0.0.1:{port}\"]\n\
             env = {{ GENERATION = \"{generation}\" }}\n{FAST_BACKOFF}\n",
            argv(&script)
        )
    };
    let config = sb.config(&program(1));
    let mut master = sb.start(&config);

    let old: Vec<i32> = sb
        .wait_starts("web", 2, DEADLINE)
        .iter()
        .map(|s| s.pid)
        .collect();
    for &pid in &old {
        let env = worker_env(&sb, pid);
        assert_eq!(env_var(&env, "LISTEN_FDS"), Some("1"), "{env}");
        assert_eq!(
            env_var(&env, "LISTEN_PID"),
            Some(pid.to_string().as_str()),
            "LISTEN_PID is the worker's own pid: {env}"
        );
        assert_eq!(env_var(&env, "LISTEN_FDNAMES"), Some("web"), "{env}");
        assert_eq!(
            env["socknames"][0],
            format!("127.0.0.1:{port}"),
            "fd 3: {env}"
        );
    }
    let pid = ask_pid(&addr).expect("connect to the listen socket");
    assert!(
        pid.is_some_and(|p| old.contains(&p)),
        "answered by a worker ({pid:?}, workers {old:?})"
    );

    // A client connects every 10 ms while the program is rolled.
    let log = Arc::new(Mutex::new(ClientLog::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let client = {
        let (log, stop) = (Arc::clone(&log), Arc::clone(&stop));
        std::thread::spawn(move || {
            let give_up = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::SeqCst) && Instant::now() < give_up {
                let outcome = ask_pid(&addr);
                let mut log = log.lock().unwrap();
                log.attempts += 1;
                match outcome {
                    Ok(Some(pid)) => log.answered_by.push(pid),
                    Ok(None) => {} // accepted by a worker that was stopped before answering
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                        log.refused.push(e.to_string())
                    }
                    Err(_) => {} // a reset or timeout after the connection was accepted
                }
                drop(log);
                std::thread::sleep(Duration::from_millis(10)); // the client's pace
            }
        })
    };
    sb.wait("the client has been answered", DEADLINE, || {
        !log.lock().unwrap().answered_by.is_empty()
    });

    sb.write_file(
        "plumule.toml",
        &format!("{}{}", sb.header(), program(2)),
        0o644,
    );
    let before = log.lock().unwrap().attempts;
    let out = sb.plumule(&["reload", "-c", &config.display().to_string()], DEADLINE);
    assert_exit_code(out.status, 0, &out.stderr);
    let during = log.lock().unwrap().attempts - before;
    let new: Vec<i32> = sb.starts_of("web")[2..].iter().map(|s| s.pid).collect();
    assert_eq!(
        new.len(),
        2,
        "both workers were replaced: {:?}",
        sb.starts()
    );
    sb.wait("the client is answered by a new worker", DEADLINE, || {
        log.lock()
            .unwrap()
            .answered_by
            .iter()
            .any(|p| new.contains(p))
    });
    stop.store(true, Ordering::SeqCst);
    client.join().expect("client thread");

    let log = log.lock().unwrap();
    assert!(
        during >= 10,
        "the client connected only {during} times while the program was rolled"
    );
    assert!(
        log.refused.is_empty(),
        "{} of {} connections refused during the rolling restart: {:?}",
        log.refused.len(),
        log.attempts,
        log.refused
    );
    for &pid in &new {
        let env = worker_env(&sb, pid);
        assert_eq!(env_var(&env, "GENERATION"), Some("2"), "{env}");
        assert_eq!(
            env_var(&env, "LISTEN_PID"),
            Some(pid.to_string().as_str()),
            "{env}"
        );
    }
    drop(log);
    stop_cleanly(&mut master);
}

#[test]
fn listen_fdnames_carry_the_given_names_then_the_program_name() {
    let sb = Sandbox::new();
    let dir = env_dir(&sb);
    let port = free_port();
    let script = sd_worker(
        &sb,
        "front.sh",
        &[format!("env:{}", dir.display()), "serve".into()],
    );
    let config = sb.config(&format!(
        "[program.front]\ncommand = {}\n\
         listen = [{{ address = \"unix:api.sock\", name = \"api\" }}, \"tcp:127.0.0.1:{port}\"]\n",
        argv(&script)
    ));
    let mut master = sb.start(&config);

    let pid = sb.wait_starts("front", 1, DEADLINE)[0].pid;
    let env = worker_env(&sb, pid);
    assert_eq!(env_var(&env, "LISTEN_FDS"), Some("2"), "{env}");
    assert_eq!(
        env_var(&env, "LISTEN_PID"),
        Some(pid.to_string().as_str()),
        "{env}"
    );
    assert_eq!(env_var(&env, "LISTEN_FDNAMES"), Some("api:front"), "{env}");
    let sock = sb.path("api.sock");
    assert_eq!(
        env["socknames"],
        serde_json::json!([sock.display().to_string(), format!("127.0.0.1:{port}")]),
        "fd 3 is the unix socket (relative to the config's folder), fd 4 the TCP one"
    );

    let stream = UnixStream::connect(&sock).expect("connect to api.sock");
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .expect("an answer on api.sock");
    assert_eq!(line.trim(), pid.to_string(), "the worker answers on fd 3");
    stop_cleanly(&mut master);
}

// ---------------------------------------------------------------------------------------------
// The unit file and the journal

#[test]
fn the_unit_file_passes_systemd_analyze_verify() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        println!("skipped: systemd-analyze is not installed");
        return;
    }
    let sb = Sandbox::new();
    let unit = fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/plumule.service"
    ))
    .expect("systemd/plumule.service");
    assert!(
        unit.contains("/usr/local/bin/plumule"),
        "ExecStart runs /usr/local/bin/plumule"
    );
    // verify wants ExecStart's binary to exist: point it at the one under test.
    let dir = sb.path("unit");
    fs::create_dir(&dir).expect("unit dir");
    let path = dir.join("plumule.service");
    fs::write(&path, unit.replace("/usr/local/bin/plumule", PLUMULE)).expect("write the unit");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("run systemd-analyze verify");
    assert!(
        out.status.success(),
        "systemd-analyze verify failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `dev:inode` of `path`, as systemd puts it in `JOURNAL_STREAM`.
fn journal_stream(path: &Path) -> String {
    let meta = fs::metadata(path).expect("stat");
    format!("{}:{}", meta.dev(), meta.ino())
}

/// Whether `line` holds an RFC 3339 date (`YYYY-MM-DDT`).
fn has_timestamp(line: &str) -> bool {
    let b = line.as_bytes();
    b.windows(11).any(|w| {
        w[..4].iter().all(u8::is_ascii_digit)
            && w[4] == b'-'
            && w[5..7].iter().all(u8::is_ascii_digit)
            && w[7] == b'-'
            && w[8..10].iter().all(u8::is_ascii_digit)
            && w[10] == b'T'
    })
}

/// Runs a worker that prints one line under a master whose `JOURNAL_STREAM` is `journal`
/// (computed from the stderr file it will get); returns the master's stderr after a stop.
fn stderr_with_journal_stream(sb: &Sandbox, journal: impl FnOnce(&Path) -> String) -> String {
    let script = sb.worker("talker.sh", "echo 'hello journal'\nexec sleep 1000");
    let config = sb.config(&format!("[program.talker]\ncommand = {}\n", argv(&script)));
    let stderr = sb.next_stderr();
    fs::write(&stderr, "").expect("create the stderr file");
    let value = journal(&stderr);
    let mut master = sb.start_with_env(&config, &[("JOURNAL_STREAM", &value)]);
    master.wait_stderr(&["talker.0", "hello journal"], DEADLINE);
    stop_cleanly(&mut master);
    master.stderr_text()
}

#[test]
fn under_journald_log_lines_carry_a_priority_and_no_timestamp() {
    let sb = Sandbox::new();
    let text = stderr_with_journal_stream(&sb, journal_stream);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() >= 2, "the master logged something:\n{text}");
    for line in &lines {
        let b = line.as_bytes();
        assert!(
            b.len() > 3 && b[0] == b'<' && (b'0'..=b'7').contains(&b[1]) && b[2] == b'>',
            "line without a <N> priority prefix: {line:?}\n{text}"
        );
        assert!(
            !has_timestamp(line),
            "line with a timestamp: {line:?}\n{text}"
        );
    }
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("<6>") && l.contains("talker.0") && l.contains("hello journal")),
        "worker output is logged at info priority:\n{text}"
    );
}

#[test]
fn outside_journald_log_lines_keep_their_timestamps() {
    let sb = Sandbox::new();
    // JOURNAL_STREAM names another file: inherited from a parent, not ours.
    let other = sb.write_file("elsewhere", "", 0o644);
    let text = stderr_with_journal_stream(&sb, |_| journal_stream(&other));
    let lines: Vec<&str> = text.lines().collect();
    assert!(!lines.is_empty(), "the master logged something");
    for line in &lines {
        assert!(
            !line.starts_with('<'),
            "priority prefix outside journald: {line:?}"
        );
        assert!(
            has_timestamp(line),
            "line without a timestamp: {line:?}\n{text}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// systemd-notify from a worker's shell, and a refused reload's STATUS=

/// The `status` entries of `program`'s workers, over the control socket.
fn worker_entries(sb: &Sandbox, program: &str) -> Vec<WorkerStatus> {
    let Some(s) = try_status(sb) else {
        return Vec::new();
    };
    s.workers()
        .filter(|(p, _)| p.name == program)
        .map(|(_, w)| w.clone())
        .collect()
}

/// 100 workers of `ready = "notify"` whose shell, once the file `gate` exists, runs
/// `systemd-notify --ready --status="ready ID"` as a short-lived child, then sleeps; run as
/// `user` when given. Every one must be attributed and become running, its STATUS= its own.
///
/// As root, systemd-notify sends with its parent's pid (the worker's); as another user it
/// cannot, and sends with its own, which the master maps to the worker by process group. That
/// lookup needs the helper alive: it is only because the master holds the helper's barrier
/// until its READY=1 is handled. Without that, 100 helpers at once lose some (seen 3 runs
/// out of 3 before the fix).
fn systemd_notify_helpers_all_become_running(user: Option<&str>) {
    let Some(notify) = needed_program("systemd-notify", "systemd") else {
        return;
    };
    let n = 100;
    let sb = Sandbox::new();
    let gate = sb.path("gate");
    // Workers as another user reach the gate, and the notify socket, through the sandbox.
    fs::set_permissions(
        sb.root(),
        std::os::unix::fs::PermissionsExt::from_mode(0o711),
    )
    .expect("chmod the sandbox");
    let command = format!(
        "while [ ! -e {gate} ]; do sleep 0.01; done; \
         {notify} --ready --status=\"ready $PLUMULE_WORKER_ID\"; exec sleep 1000",
        gate = sh_str(&gate),
        notify = sh_str(&notify),
    );
    let user = user
        .map(|u| format!("user = \"{u}\"\n"))
        .unwrap_or_default();
    let config = sb.config(&format!(
        "[program.helpers]\ncommand = {}\nworkers = {n}\nready = \"notify\"\n\
         ready_timeout = \"30s\"\n{user}",
        toml_str(Path::new(&command)),
    ));
    let mut master = sb.start(&config);
    // The gate opens once the master has seen every exec: what is tested is the helper's
    // message, not a READY=1 that races the exec confirmation.
    sb.wait(
        &format!("helpers has {n} workers waiting for READY=1"),
        DEADLINE,
        || {
            let workers = worker_entries(&sb, "helpers");
            workers.len() == n
                && workers
                    .iter()
                    .all(|w| w.detail.as_deref() == Some("waiting for READY=1"))
        },
    );
    fs::write(&gate, "").expect("open the gate");
    let pids = wait_running(&sb, "helpers", n as u32);
    for w in worker_entries(&sb, "helpers") {
        assert_eq!(
            w.status,
            Some(format!("ready {}", w.id)),
            "the helper's STATUS= is its worker's: {w:?}"
        );
        assert_eq!(w.restarts, 0, "{w:?}");
    }
    assert_eq!(pids.len(), n);
    stop_cleanly(&mut master);
}

#[test]
fn systemd_notify_run_from_a_shell_helper_is_attributed_through_its_barrier() {
    systemd_notify_helpers_all_become_running(None);
}

#[test]
fn as_root_systemd_notify_from_a_helper_of_a_nobody_worker_is_attributed_through_its_barrier() {
    if !root_or_skip("to run workers as user nobody") {
        return;
    }
    systemd_notify_helpers_all_become_running(Some("nobody"));
}

/// Regression: a reload refused for a typo sent `STATUS=reload refused…`; once the typo was
/// reverted the good reload sent `READY=1` without a STATUS= when the worker summary had not
/// changed, so systemd went on showing "reload refused".
#[test]
fn a_refused_reload_status_is_replaced_by_the_next_good_reload() {
    let sb = Sandbox::new();
    let programs = sleeper(&sb, "web", 2);
    let config = sb.config(&programs);
    let mut systemd = FakeSystemd::bind(&sb);
    let mut master = sb.start_with_env(&config, &[systemd.env()]);
    let ready = systemd.expect(&mut master, "READY=1", DEADLINE, |d| has_line(d, "READY=1"));
    let summary = value_of(&ready, "STATUS")
        .unwrap_or_else(|| panic!("READY=1 comes with a STATUS=: {ready:?}"))
        .to_string();
    assert!(summary.starts_with("2/2 workers running"), "{summary}");

    let good = fs::read_to_string(&config).expect("read the config");
    sb.config(&programs.replace("workers = 2", "worker = 2"));
    let out = sb.cli(&config, &["reload"]);
    assert_exit_code(out.status, 1, &out.stderr);
    let refused = systemd.expect(&mut master, "STATUS=reload refused…", DEADLINE, |d| {
        value_of(d, "STATUS").is_some_and(|s| s.starts_with("reload refused"))
    });
    assert!(has_line(&refused, "READY=1"), "{refused:?}");

    fs::write(&config, good).expect("revert the typo");
    sb.cli_ok(&config, &["reload"]);
    let ready = systemd.expect(
        &mut master,
        "READY=1 after the good reload",
        DEADLINE,
        |d| has_line(d, "READY=1"),
    );
    // What systemd shows is the last STATUS= it received, up to this READY=1.
    let shown = systemd.seen[..systemd.next]
        .iter()
        .rev()
        .find_map(|d| value_of(d, "STATUS"))
        .unwrap_or_default()
        .to_string();
    assert_eq!(
        shown, summary,
        "after the good reload systemd still shows the refusal; datagrams: {:?} (last {ready:?})",
        systemd.seen
    );
    stop_cleanly(&mut master);
}

/// Regression for "READY before the exec confirmation": a worker whose shell runs
/// `systemd-notify --ready` at once may have its READY=1 read before the master has read the
/// end of its status pipe (the exec confirmation); that READY=1 must not be lost, which would
/// leave the worker starting until `ready_timeout` and then restart it.
#[test]
fn ready_before_the_exec_confirmation_is_not_lost() {
    let Some(notify) = needed_program("systemd-notify", "systemd") else {
        return;
    };
    let sb = Sandbox::new();
    let command = format!(
        "{} --ready --status=\"ready $PLUMULE_WORKER_ID\"; exec sleep 1000",
        sh_str(&notify)
    );
    let config = sb.config(&format!(
        "[program.par]\ncommand = {}\nworkers = 0\nready = \"notify\"\nready_timeout = \"30s\"\n",
        toml_str(Path::new(&command)),
    ));
    let mut master = sb.start(&config);
    sb.wait("the master listens", DEADLINE, || try_status(&sb).is_some());
    let cfg = config.display().to_string();
    // Well below ready_timeout: a lost READY=1 shows as a timeout here, not as a slow pass.
    let within = Duration::from_secs(15);
    let out = sb.plumule(&["scale", "par", "20", "-c", &cfg], within);
    assert_exit_code(out.status, 0, &out.stderr);
    wait_running_within(&sb, "par", 20, within);
    for w in worker_entries(&sb, "par") {
        assert_eq!(w.restarts, 0, "no worker was restarted: {w:?}");
        assert_eq!(w.status, Some(format!("ready {}", w.id)), "{w:?}");
    }
    stop_cleanly(&mut master);
}
