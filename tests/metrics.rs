//! The Prometheus endpoint through the real binary (SPEC §2 `metrics`, §9): scrapes over TCP
//! and Unix sockets, the values against what the workers did, `promtool check metrics`, and
//! the responder's bounds (a scraper that never finishes, too many scrapers, an oversized
//! request, other paths and methods).

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;

const FAST_BACKOFF: &str = r#"backoff = { initial = "1ms", max = "1ms", jitter = 0.0 }"#;

/// Where a test's master serves its metrics.
#[derive(Debug, Clone)]
enum Endpoint {
    Tcp(u16),
    Unix(PathBuf),
}

impl Endpoint {
    /// A loopback port nothing listens on now (the kernel's pick, released again).
    fn free_tcp() -> Endpoint {
        let probe = TcpListener::bind("127.0.0.1:0").expect("bind a probe port");
        Endpoint::Tcp(probe.local_addr().unwrap().port())
    }

    fn config_value(&self) -> String {
        match self {
            Endpoint::Tcp(port) => format!("tcp:127.0.0.1:{port}"),
            Endpoint::Unix(path) => format!("unix:{}", path.display()),
        }
    }

    /// A connection with every read and write bounded, or the error of the connect.
    fn connect(&self) -> std::io::Result<Box<dyn Conn>> {
        let conn: Box<dyn Conn> = match self {
            Endpoint::Tcp(port) => {
                let s = TcpStream::connect(("127.0.0.1", *port))?;
                s.set_read_timeout(Some(DEADLINE))?;
                s.set_write_timeout(Some(DEADLINE))?;
                Box::new(s)
            }
            Endpoint::Unix(path) => {
                let s = UnixStream::connect(path)?;
                s.set_read_timeout(Some(DEADLINE))?;
                s.set_write_timeout(Some(DEADLINE))?;
                Box::new(s)
            }
        };
        Ok(conn)
    }

    /// Sends `request` and reads the whole answer (the server closes after it).
    #[track_caller]
    fn exchange(&self, request: &[u8]) -> String {
        self.try_exchange(request)
            .unwrap_or_else(|e| panic!("exchange with {self:?}: {e}"))
    }

    /// [`Endpoint::exchange`] that may fail (a connection refused or reset).
    fn try_exchange(&self, request: &[u8]) -> std::io::Result<String> {
        let mut conn = self.connect()?;
        conn.write_all(request)?;
        let mut answer = Vec::new();
        conn.read_to_end(&mut answer)?;
        Ok(String::from_utf8(answer).expect("a UTF-8 answer"))
    }

    /// `GET /metrics`: the body of a 200 answer.
    #[track_caller]
    fn scrape(&self) -> String {
        let answer = self.exchange(b"GET /metrics HTTP/1.1\r\nHost: plumule\r\n\r\n");
        let (head, body) = answer
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("no end of headers in {answer:?}"));
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(
            head.contains("\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8"),
            "{head}"
        );
        assert!(head.contains("\r\nConnection: close"), "{head}");
        assert!(
            head.contains(&format!("\r\nContent-Length: {}", body.len())),
            "{head}"
        );
        body.to_string()
    }

    /// The samples of a scrape: `name{labels}` → value.
    #[track_caller]
    fn samples(&self) -> BTreeMap<String, f64> {
        parse(&self.scrape())
    }
}

trait Conn: Read + Write {}
impl<T: Read + Write> Conn for T {}

fn parse(body: &str) -> BTreeMap<String, f64> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("malformed sample line {l:?}"));
            let value = value
                .parse()
                .unwrap_or_else(|_| panic!("malformed value in {l:?}"));
            (series.to_string(), value)
        })
        .collect()
}

/// The value of `series`, which must be there.
#[track_caller]
fn value(samples: &BTreeMap<String, f64>, series: &str) -> f64 {
    *samples
        .get(series)
        .unwrap_or_else(|| panic!("no {series} in the scrape: {samples:#?}"))
}

/// Writes a config whose `[plumule]` section serves metrics at `endpoint`.
fn config_with_metrics(sb: &Sandbox, endpoint: &Endpoint, programs: &str) -> PathBuf {
    let text = format!(
        "{}\nmetrics = \"{}\"\n\n{programs}",
        sb.header().trim_end(),
        endpoint.config_value()
    );
    sb.write_file("plumule.toml", &text, 0o644)
}

/// Two sleepers of `web` that come back at once when killed.
fn web(sb: &Sandbox) -> String {
    let script = sb.timed_worker("web.sh", "exec sleep 1000");
    format!(
        "[program.web]\ncommand = {}\nworkers = 2\n{FAST_BACKOFF}\n\n",
        argv(&script)
    )
}

#[test]
fn a_tcp_scrape_counts_workers_and_moves_with_a_killed_worker() {
    let sb = Sandbox::new();
    let endpoint = Endpoint::free_tcp();
    let config = config_with_metrics(&sb, &endpoint, &web(&sb));
    let mut master = sb.start(&config);
    let pids = wait_running(&sb, "web", 2);

    let s = endpoint.samples();
    assert_eq!(
        value(&s, r#"plumule_workers{program="web",state="running"}"#),
        2.0
    );
    for state in [
        "stopped", "starting", "stopping", "backoff", "exited", "failed",
    ] {
        let series = format!(r#"plumule_workers{{program="web",state="{state}"}}"#);
        assert_eq!(value(&s, &series), 0.0, "{series}");
    }
    assert_eq!(
        value(&s, r#"plumule_worker_restarts_total{program="web"}"#),
        0.0
    );
    assert_eq!(
        value(
            &s,
            r#"plumule_worker_exits_total{program="web",reason="signal"}"#
        ),
        0.0
    );
    let version = format!(
        r#"plumule_build_info{{version="{}"}}"#,
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(value(&s, &version), 1.0);
    let rss = value(&s, "plumule_master_resident_bytes");
    assert!(rss > 100_000.0, "resident bytes {rss}");
    // Start times agree with the clock the worker scripts read when they started.
    for start in sb.starts_of("web") {
        let series = format!(
            r#"plumule_worker_start_time_seconds{{program="web",id="{}"}}"#,
            start.id
        );
        let reported = value(&s, &series);
        let written = start.time.expect("timed start line");
        assert!(
            (reported - written).abs() < 2.0,
            "{series} is {reported}, the worker started at {written}"
        );
    }

    send(pids[&1], SIGKILL);
    let mut last = BTreeMap::new();
    sb.wait(
        "the scrape shows one restart and one exit by a signal, both workers running",
        DEADLINE,
        || {
            last = endpoint.samples();
            last.get(r#"plumule_worker_restarts_total{program="web"}"#) == Some(&1.0)
                && last.get(r#"plumule_worker_exits_total{program="web",reason="signal"}"#)
                    == Some(&1.0)
                && last.get(r#"plumule_workers{program="web",state="running"}"#) == Some(&2.0)
        },
    );
    let restarted = running(&socket_status(&sb), "web");
    assert_ne!(restarted[&1], pids[&1]);
    // Nothing else counted: the exit plumule did not ask for is the only one.
    let exits: f64 = last
        .iter()
        .filter(|(k, _)| k.starts_with("plumule_worker_exits_total{"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(exits, 1.0, "{last:#?}");
    stop_cleanly(&mut master);
}

#[test]
fn a_unix_scrape_passes_promtool_and_counts_failures_and_stops() {
    let sb = Sandbox::new();
    let endpoint = Endpoint::Unix(sb.path("metrics.sock"));
    let once = sb.script("once.sh", "exit 3");
    let programs = format!(
        "{}[program.once]\ncommand = {}\nrestart = \"never\"\n\n",
        web(&sb),
        argv(&once)
    );
    let config = config_with_metrics(&sb, &endpoint, &programs);
    let mut master = sb.start(&config);
    wait_running(&sb, "web", 2);
    sb.cli_ok(&config, &["stop", "web.0"]);

    let mut body = String::new();
    sb.wait(
        "the scrape shows once exited with a failure and web.0 stopped",
        DEADLINE,
        || {
            body = endpoint.scrape();
            let s = parse(&body);
            s.get(r#"plumule_workers{program="once",state="exited"}"#) == Some(&1.0)
                && s.get(r#"plumule_worker_exits_total{program="once",reason="failure"}"#)
                    == Some(&1.0)
        },
    );
    let s = parse(&body);
    assert_eq!(
        value(&s, r#"plumule_workers{program="web",state="stopped"}"#),
        1.0
    );
    assert_eq!(
        value(
            &s,
            r#"plumule_worker_exits_total{program="web",reason="stopped"}"#
        ),
        1.0
    );
    // Neither an operator's stop nor `restart = "never"` is a restart.
    assert_eq!(
        value(&s, r#"plumule_worker_restarts_total{program="web"}"#),
        0.0
    );
    assert_eq!(
        value(&s, r#"plumule_worker_restarts_total{program="once"}"#),
        0.0
    );
    // Only live workers have a start time.
    assert!(!s.contains_key(r#"plumule_worker_start_time_seconds{program="web",id="0"}"#));
    assert!(s.contains_key(r#"plumule_worker_start_time_seconds{program="web",id="1"}"#));

    if let Some(promtool) = needed_program("promtool", "prometheus") {
        promtool_accepts(&promtool, &body);
    }
    stop_cleanly(&mut master);
    assert!(
        !endpoint_path(&endpoint).exists(),
        "the metrics socket is removed when the master stops"
    );
}

fn endpoint_path(endpoint: &Endpoint) -> &Path {
    match endpoint {
        Endpoint::Unix(p) => p,
        Endpoint::Tcp(_) => unreachable!(),
    }
}

/// `promtool check metrics` reads the exposition on stdin and must find nothing to say.
#[track_caller]
fn promtool_accepts(promtool: &Path, body: &str) {
    let mut child = Command::new(promtool)
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
        .expect("feed promtool");
    let out = child.wait_with_output().expect("promtool's verdict");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics: {} {said}\non:\n{body}",
        out.status
    );
}

#[test]
fn scrapers_that_never_finish_do_not_stall_the_master() {
    let sb = Sandbox::new();
    let endpoint = Endpoint::free_tcp();
    let config = config_with_metrics(&sb, &endpoint, &web(&sb));
    let mut master = sb.start(&config);
    wait_running(&sb, "web", 2);

    // Half a request, then nothing, and the answer never read.
    let mut slow = endpoint.connect().expect("connect");
    slow.write_all(b"GET /metr").unwrap();
    sb.cli_ok(&config, &["status"]);
    let s = endpoint.samples();
    assert_eq!(
        value(&s, r#"plumule_workers{program="web",state="running"}"#),
        2.0
    );

    // Fill the connection limit with scrapers that send nothing: the next is refused at once
    // with 503, and the master still answers its control socket.
    let mut idle = Vec::new();
    while idle.len() < 31 {
        idle.push(endpoint.connect().expect("connect"));
    }
    // Each accept is a pass of the loop: the refusal shows once all are in. It is a 503,
    // or a reset when the request reached the refused socket only as it was closed.
    sb.wait(
        "a connection past the limit is refused",
        DEADLINE,
        || match endpoint.try_exchange(b"GET /metrics HTTP/1.0\r\n\r\n") {
            Ok(answer) => answer.starts_with("HTTP/1.1 503 "),
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        },
    );
    sb.cli_ok(&config, &["status"]);
    // A closed scraper frees its place.
    drop(idle.pop());
    drop(slow);
    sb.wait("a scrape succeeds again", DEADLINE, || {
        endpoint
            .try_exchange(b"GET /metrics HTTP/1.0\r\n\r\n")
            .is_ok_and(|a| a.starts_with("HTTP/1.1 200 OK\r\n"))
    });
    stop_cleanly(&mut master);
}

#[test]
fn oversized_requests_other_paths_and_methods_are_refused() {
    let sb = Sandbox::new();
    let endpoint = Endpoint::free_tcp();
    let config = config_with_metrics(&sb, &endpoint, &web(&sb));
    let mut master = sb.start(&config);
    wait_running(&sb, "web", 2);

    let mut big = b"GET /metrics HTTP/1.1\r\n".to_vec();
    while big.len() < 16 * 1024 {
        big.extend_from_slice(b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
    }
    let answer = endpoint.exchange(&big);
    assert!(
        answer.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
        "{answer}"
    );
    assert!(!answer.contains("plumule_workers"), "{answer}");

    let answer = endpoint.exchange(b"GET /other HTTP/1.1\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 404 Not Found\r\n"), "{answer}");
    let answer = endpoint.exchange(b"GET /metricsx HTTP/1.1\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 404 Not Found\r\n"), "{answer}");
    let answer = endpoint.exchange(b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
    assert!(
        answer.starts_with("HTTP/1.1 405 Method Not Allowed\r\n")
            && answer.contains("\r\nAllow: GET\r\n"),
        "{answer}"
    );
    let answer = endpoint.exchange(b"nonsense\r\n\r\n");
    assert!(
        answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
        "{answer}"
    );
    // A query string is not part of the path; bare newlines end lines too.
    let answer = endpoint.exchange(b"GET /metrics?x=1 HTTP/1.0\n\n");
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    stop_cleanly(&mut master);
}

#[test]
fn a_busy_metrics_address_is_a_startup_error_naming_it() {
    let sb = Sandbox::new();
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let endpoint = Endpoint::Tcp(taken.local_addr().unwrap().port());
    let config = config_with_metrics(&sb, &endpoint, &web(&sb));
    let mut master = sb.start(&config);
    let status = master.wait_exit(DEADLINE);
    let stderr = master.stderr_text();
    assert_exit_code(status, 1, &stderr);
    assert!(
        stderr.contains(&format!("cannot bind {}", endpoint.config_value())),
        "{stderr}"
    );
    assert!(
        sb.starts().is_empty(),
        "no worker started: {:?}",
        sb.starts()
    );
}

#[test]
fn a_reload_moves_the_endpoint_at_once() {
    let sb = Sandbox::new();
    let before = Endpoint::free_tcp();
    let programs = web(&sb);
    let config = config_with_metrics(&sb, &before, &programs);
    let mut master = sb.start(&config);
    wait_running(&sb, "web", 2);
    before.scrape();

    let after = Endpoint::Unix(sb.path("moved.sock"));
    config_with_metrics(&sb, &after, &programs);
    sb.cli_ok(&config, &["reload"]);
    // The reload's answer comes after the pass that applied it.
    let s = after.samples();
    assert_eq!(
        value(&s, r#"plumule_workers{program="web",state="running"}"#),
        2.0
    );
    assert!(
        before.connect().is_err(),
        "the old address still takes connections"
    );
    stop_cleanly(&mut master);
}
