//! The Prometheus endpoint as a part of the loop (SPEC §9): `GET /metrics` answered with the
//! text exposition format 0.0.4, over `tcp:HOST:PORT` or `unix:PATH` (`[plumule] metrics`).
//!
//! It is served by the event loop itself, with a minimal HTTP/1.0–1.1 responder of its own:
//! one request per connection, answered with `Connection: close`. Nothing a scraper does can
//! stall the master:
//! - sockets are non-blocking and registered with the reactor; a request is read as it comes,
//!   and the answer is written as the socket takes it (with `POLLOUT`), from a buffer per
//!   connection;
//! - a request (line and headers) is at most [`MAX_REQUEST`] bytes: more is answered 431;
//! - at most [`MAX_CONNECTIONS`] connections are open: more are answered 503 and closed;
//! - a connection lives at most [`TIMEOUT`] from its accept, reading, writing and lingering
//!   included. That deadline is the part's only timer, and only while a connection is open.
//!
//! After its answer, a connection lingers, reading and discarding, until the scraper closes:
//! closing a socket with unread input resets it, and the reset can destroy an answer the
//! scraper has not read yet (a refused oversized request, typically).
//!
//! What it reports is read from the supervisor at the time of the request; the only state the
//! supervisor keeps for it are the [`Counters`] of exits and restarts, which are monotonic for
//! the master's life. A reload that changes `metrics` is applied by the next pass: the old
//! socket closes and the new address is bound.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use nix::unistd::Pid;

use super::supervisor::{describe_addr, Supervisor};
use super::{MasterError, Part, Subsystem};
use crate::config::{ListenAddr, Program};
use crate::slot::{AfterStop, Exit, SlotState, StopReason};
use crate::sys::listen::{self, ListenError};
use crate::sys::reactor::Ready;

/// The longest request line and headers taken.
pub const MAX_REQUEST: usize = 8 * 1024;
/// The most connections open at once.
pub const MAX_CONNECTIONS: usize = 32;
/// How long a connection may stay open, from its accept.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// The part's token for the listener; connections use their ids (from 1).
const LISTENER: u64 = 0;

/// The states `plumule_workers` reports, every one of them for every program (zeros too):
/// SPEC §3's states, as `status` names them.
const STATES: [&str; 7] = [
    "stopped", "starting", "running", "stopping", "backoff", "exited", "failed",
];

/// Why a worker's process ended, the `reason` of `plumule_worker_exits_total`.
const REASONS: [&str; 7] = [
    "success",
    "failure",
    "signal",
    "stopped",
    "start_error",
    "ready_timeout",
    "watchdog",
];

/// A Prometheus histogram of seconds with fixed buckets, from half a millisecond to five
/// minutes: job durations and fsync times both fall in that range.
#[derive(Debug, Clone)]
pub(crate) struct Histogram {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

const BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0,
    300.0,
];

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: [0; BUCKETS.len()],
            sum: 0.0,
            count: 0,
        }
    }
}

impl Histogram {
    pub(crate) fn observe(&mut self, seconds: f64) {
        // Non-cumulative here; made cumulative when rendered.
        if let Some(i) = BUCKETS.iter().position(|b| seconds <= *b) {
            self.counts[i] += 1;
        }
        self.sum += seconds;
        self.count += 1;
    }

    /// The `_bucket`, `_sum` and `_count` lines of `name` with `labels` (`queue="q",` or
    /// empty; a trailing comma when not empty).
    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (b, n) in BUCKETS.iter().zip(self.counts) {
            cumulative += n;
            let _ = writeln!(out, "{name}_bucket{{{labels}le=\"{b}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels}le=\"+Inf\"}} {}", self.count);
        let bare = labels.trim_end_matches(',');
        let braces = if bare.is_empty() {
            String::new()
        } else {
            format!("{{{bare}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

/// What the supervisor counts for the metrics, monotonic for the master's life (a program
/// removed by a reload keeps its counts; one added again continues them).
#[derive(Debug, Default)]
pub(super) struct Counters {
    /// Restarts after an unrequested exit, by program (what `status` counts per worker).
    restarts: BTreeMap<String, u64>,
    /// Ended worker processes, by program and reason (one of [`REASONS`]).
    exits: BTreeMap<(String, &'static str), u64>,
    /// Durable queues' fdatasync times.
    pub(super) fsync_seconds: Histogram,
}

/// Why the endpoint could not be served at an address.
#[derive(Debug, thiserror::Error)]
enum ServeError {
    #[error(transparent)]
    Bind(ListenError),
    #[error("cannot watch {address}: {source}")]
    Watch { address: String, source: io::Error },
}

impl Counters {
    pub(super) fn exited(&mut self, program: &str, reason: &'static str) {
        *self.exits.entry((program.to_owned(), reason)).or_default() += 1;
    }

    pub(super) fn restarted(&mut self, program: &str, restarts: u64) {
        if restarts > 0 {
            *self.restarts.entry(program.to_owned()).or_default() += restarts;
        }
    }
}

/// Why the process `pid` of a slot in `state` ended with `exit`: one of [`REASONS`]. What
/// plumule asked for comes first (a stop, a ready timeout, a watchdog miss, a start that
/// failed in the child); else the exit itself says it.
pub(super) fn exit_reason(
    state: &SlotState,
    pid: Pid,
    exit: Exit,
    program: &Program,
) -> &'static str {
    if state.old().is_some_and(|old| old.pid == pid) {
        // The predecessor of a rolling restart, retired by plumule.
        return "stopped";
    }
    match state.current() {
        SlotState::Stopping {
            then: AfterStop::Crash(StopReason::ReadyTimeout),
            ..
        } => "ready_timeout",
        SlotState::Stopping {
            then: AfterStop::Crash(StopReason::Watchdog),
            ..
        } => "watchdog",
        SlotState::Stopping { .. } => "stopped",
        SlotState::Starting { error: Some(_), .. } => "start_error",
        _ => match exit {
            Exit::Code(code) if program.success_exit_codes.contains(&code) => "success",
            Exit::Code(_) => "failure",
            Exit::Signal(_) => "signal",
        },
    }
}

/// The listening socket.
enum Listener {
    Tcp(TcpListener),
    /// The path is removed when the listener closes.
    Unix(UnixListener, PathBuf),
}

impl Listener {
    fn bind(addr: &ListenAddr) -> Result<Listener, ListenError> {
        match addr {
            ListenAddr::Tcp(address) => {
                let l = TcpListener::from(listen::bind_tcp(*address)?);
                l.set_nonblocking(true)
                    .map_err(|source| ListenError::BindTcp {
                        address: *address,
                        source,
                    })?;
                Ok(Listener::Tcp(l))
            }
            ListenAddr::Unix(path) => {
                let l = UnixListener::from(listen::bind_unix(path, None)?);
                l.set_nonblocking(true)
                    .map_err(|source| ListenError::BindUnix {
                        path: path.clone(),
                        source,
                    })?;
                Ok(Listener::Unix(l, path.clone()))
            }
            // Refused by the config's validation; kept total rather than trusted.
            ListenAddr::Systemd(name) => Err(ListenError::NotPassed { name: name.clone() }),
        }
    }

    fn fd(&self) -> RawFd {
        match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l, _) => l.as_raw_fd(),
        }
    }

    fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Tcp(l) => l.accept().map(|(s, _)| Stream::Tcp(s)),
            Listener::Unix(l, _) => l.accept().map(|(s, _)| Stream::Unix(s)),
        }
    }

    fn close(self) {
        if let Listener::Unix(listener, path) = self {
            drop(listener);
            let _ = std::fs::remove_file(path);
        }
    }
}

/// An accepted connection's socket.
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn fd(&self) -> RawFd {
        match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
        }
    }

    fn set_nonblocking(&self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_nonblocking(true),
            Stream::Unix(s) => s.set_nonblocking(true),
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }

    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn shutdown_write(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Write),
            Stream::Unix(s) => s.shutdown(Shutdown::Write),
        };
    }
}

/// Where a connection is in its one exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Reading the request line and headers.
    Reading,
    /// Writing the answer as the socket takes it.
    Writing,
    /// Answered (its write side shut): reading and discarding until the scraper closes.
    Lingering,
}

struct Conn {
    stream: Stream,
    input: Vec<u8>,
    output: Vec<u8>,
    /// How much of `output` is written.
    written: usize,
    stage: Stage,
    /// When it is closed, whatever its stage.
    deadline: Instant,
}

/// What one readable or writable event did to a connection.
enum Step {
    Open,
    Close,
}

pub(super) struct Metrics {
    /// The address the config asked for when last applied (bound or not).
    wanted: Option<ListenAddr>,
    listener: Option<Listener>,
    conns: HashMap<u64, Conn>,
    next_id: u64,
    /// Given up when the master runs out of descriptors, to take the waiting connection
    /// and refuse it: left in the backlog, it would keep the listener ready and the loop
    /// busy (see `crate::control::spare_descriptor`).
    spare: Option<std::fs::File>,
    /// The listener is unwatched until then, after an accept failure a retry at once would
    /// meet again.
    paused_until: Option<Instant>,
    /// Out of descriptors: said once in the log, until a connection is taken again.
    starved: bool,
}

impl Metrics {
    /// Binds the configured address: a failure is a startup error naming it.
    pub(super) fn new(sup: &Supervisor) -> Result<Metrics, MasterError> {
        let wanted = sup.config.metrics.clone();
        let mut metrics = Metrics {
            wanted: wanted.clone(),
            listener: None,
            conns: HashMap::new(),
            next_id: 0,
            spare: crate::control::spare_descriptor(),
            paused_until: None,
            starved: false,
        };
        if let Some(addr) = &wanted {
            let listener = Listener::bind(addr).map_err(MasterError::Metrics)?;
            sup.reactor
                .add(listener.fd(), Part::Metrics.token(LISTENER), false)
                .map_err(MasterError::Setup)?;
            log::info!("metrics: serving on {}", describe_addr(addr));
            metrics.listener = Some(listener);
        }
        Ok(metrics)
    }

    /// A reload changed `metrics`: the old socket closes first (the new address may be the
    /// same port on another host address, which cannot be bound while the old one listens),
    /// then the new one is bound. When that fails, the old one is bound again if it can be.
    fn rebind(&mut self, sup: &Supervisor) {
        let old = std::mem::replace(&mut self.wanted, sup.config.metrics.clone());
        self.paused_until = None;
        if let Some(listener) = self.listener.take() {
            sup.reactor.remove(listener.fd());
            listener.close();
        }
        let Some(new) = self.wanted.clone() else {
            log::info!("metrics: no longer served");
            return;
        };
        match self.listen(sup, &new) {
            Ok(()) => log::info!("metrics: serving on {}", describe_addr(&new)),
            Err(e) => {
                let restored = old.filter(|old| self.listen(sup, old).is_ok());
                match restored {
                    Some(old) => {
                        log::error!("metrics: {e}; still serving on {}", describe_addr(&old))
                    }
                    None => log::error!("metrics: {e}; not served until a reload fixes it"),
                }
            }
        }
    }

    fn listen(&mut self, sup: &Supervisor, addr: &ListenAddr) -> Result<(), ServeError> {
        let listener = Listener::bind(addr).map_err(ServeError::Bind)?;
        if let Err(source) = sup
            .reactor
            .add(listener.fd(), Part::Metrics.token(LISTENER), false)
        {
            listener.close();
            return Err(ServeError::Watch {
                address: describe_addr(addr),
                source,
            });
        }
        self.listener = Some(listener);
        Ok(())
    }

    /// Takes every pending connection; past the limit, a 503 and close.
    fn accept(&mut self, sup: &Supervisor, now: Instant) {
        let Some(listener) = &self.listener else {
            return;
        };
        loop {
            let mut stream = match listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                    if !self.starved {
                        log::error!(
                            "metrics: cannot take a connection: {e}; scrapers are refused \
                             until descriptors are freed"
                        );
                        self.starved = true;
                    }
                    // accept() takes a descriptor before it looks for a connection: it
                    // fails so also when none waits any more, and then WouldBlock follows.
                    if let Some(spare) = self.spare.take() {
                        drop(spare);
                        let refused = listener.accept().map(|mut refused| {
                            let _ = refused.set_nonblocking();
                            let body = format!("out of file descriptors: {e}\n");
                            let _ = refused.write(&response(503, "Service Unavailable", "", &body));
                        });
                        self.spare = crate::control::spare_descriptor();
                        match refused {
                            Ok(()) if self.spare.is_some() => continue,
                            Err(e)
                                if e.kind() == io::ErrorKind::WouldBlock
                                    && self.spare.is_some() =>
                            {
                                return
                            }
                            _ => {}
                        }
                    }
                    // No spare: the listener is left alone a while, not retried at once.
                    sup.reactor.remove(listener.fd());
                    self.paused_until = Some(now + crate::control::ACCEPT_PAUSE);
                    return;
                }
                Err(e) => {
                    log::warn!("metrics: accept failed: {e}");
                    sup.reactor.remove(listener.fd());
                    self.paused_until = Some(now + crate::control::ACCEPT_PAUSE);
                    return;
                }
            };
            self.starved = false;
            if stream.set_nonblocking().is_err() {
                continue;
            }
            if self.conns.len() >= MAX_CONNECTIONS {
                log::warn!("metrics: more than {MAX_CONNECTIONS} scrapers at once; refusing one");
                // Best effort: a fresh socket's buffer takes this whole. What the scraper has
                // sent already is read, so that the close does not reset the connection
                // before the answer is read; what comes later may still be lost that way.
                let _ = stream.write(&response(503, "Service Unavailable", "", "busy\n"));
                stream.shutdown_write();
                let mut buf = [0u8; 4096];
                for _ in 0..(MAX_REQUEST / buf.len() + 1) {
                    if !matches!(stream.read(&mut buf), Ok(n) if n > 0) {
                        break;
                    }
                }
                continue;
            }
            self.next_id += 1;
            let id = self.next_id;
            if let Err(e) = sup.reactor.add(stream.fd(), Part::Metrics.token(id), false) {
                log::warn!("metrics: cannot watch a connection: {e}");
                continue;
            }
            self.conns.insert(
                id,
                Conn {
                    stream,
                    input: Vec::new(),
                    output: Vec::new(),
                    written: 0,
                    stage: Stage::Reading,
                    deadline: now + TIMEOUT,
                },
            );
        }
    }

    fn serve(&mut self, sup: &Supervisor, id: u64, ready: Ready) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        let step = match conn.stage {
            Stage::Reading if ready.readable() => read_request(conn, sup, id),
            Stage::Writing if ready.writable() || ready.readable() => flush(conn, sup, id),
            Stage::Lingering if ready.readable() => discard(conn),
            _ => Step::Open,
        };
        if let Step::Close = step {
            // Closing the descriptor takes it out of the reactor.
            self.conns.remove(&id);
        }
    }
}

/// Reads what has come of the request; once it is complete (or too long), queues the answer
/// and starts writing it.
fn read_request(conn: &mut Conn, sup: &Supervisor, id: u64) -> Step {
    let mut buf = [0u8; 4096];
    loop {
        match conn.stream.read(&mut buf) {
            Ok(0) => return Step::Close,
            Ok(n) => {
                conn.input.extend_from_slice(&buf[..n]);
                if conn.input.len() > MAX_REQUEST || head_end(&conn.input).is_some() {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return Step::Close,
        }
    }
    let answer = match head_end(&conn.input) {
        Some(end) if end <= MAX_REQUEST => answer(&conn.input[..end], sup),
        _ if conn.input.len() > MAX_REQUEST => response(
            431,
            "Request Header Fields Too Large",
            "",
            &format!("request longer than {MAX_REQUEST} bytes\n"),
        ),
        _ => return Step::Open,
    };
    conn.input = Vec::new();
    conn.output = answer;
    conn.stage = Stage::Writing;
    flush(conn, sup, id)
}

/// Writes what the socket takes of the answer; once it is all out, shuts the write side and
/// lingers.
fn flush(conn: &mut Conn, sup: &Supervisor, id: u64) -> Step {
    while conn.written < conn.output.len() {
        match conn.stream.write(&conn.output[conn.written..]) {
            Ok(0) => return Step::Close,
            Ok(n) => conn.written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let token = Part::Metrics.token(id);
                return match sup.reactor.modify_write_only(conn.stream.fd(), token) {
                    Ok(()) => Step::Open,
                    Err(_) => Step::Close,
                };
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return Step::Close,
        }
    }
    conn.output = Vec::new();
    conn.stream.shutdown_write();
    conn.stage = Stage::Lingering;
    match sup
        .reactor
        .modify(conn.stream.fd(), Part::Metrics.token(id), false)
    {
        Ok(()) => Step::Open,
        Err(_) => Step::Close,
    }
}

/// Reads and drops what a lingering scraper still sends; its end closes the connection.
fn discard(conn: &mut Conn) -> Step {
    let mut buf = [0u8; 4096];
    loop {
        match conn.stream.read(&mut buf) {
            Ok(0) => return Step::Close,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Open,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return Step::Close,
        }
    }
}

/// The length of the request head (line and headers, with the blank line that ends them),
/// once it has all come. A bare `\n` ends lines too (RFC 9112 §2.2).
fn head_end(input: &[u8]) -> Option<usize> {
    let mut line_start = 0;
    for (i, &b) in input.iter().enumerate() {
        if b == b'\n' {
            let line = &input[line_start..i];
            if (line.is_empty() || line == b"\r") && line_start > 0 {
                return Some(i + 1);
            }
            line_start = i + 1;
        }
    }
    None
}

/// The whole answer to a complete request head.
fn answer(head: &[u8], sup: &Supervisor) -> Vec<u8> {
    match route(head) {
        Route::Metrics => response(
            200,
            "OK",
            "",
            &render(sup, Instant::now(), SystemTime::now()),
        ),
        Route::NotFound => response(404, "Not Found", "", "only /metrics is served here\n"),
        Route::BadMethod => response(
            405,
            "Method Not Allowed",
            "Allow: GET\r\n",
            "only GET is served here\n",
        ),
        Route::BadVersion => response(505, "HTTP Version Not Supported", "", "HTTP/1 only\n"),
        Route::Bad => response(400, "Bad Request", "", "malformed request line\n"),
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Route {
    Metrics,
    NotFound,
    BadMethod,
    BadVersion,
    Bad,
}

/// What the request line asks for. Headers do not change the answer.
fn route(head: &[u8]) -> Route {
    let line_end = head.iter().position(|&b| b == b'\n').unwrap_or(head.len());
    let Ok(line) = std::str::from_utf8(&head[..line_end]) else {
        return Route::Bad;
    };
    let parts: Vec<&str> = line.trim_end_matches('\r').split(' ').collect();
    let [method, target, version] = parts[..] else {
        return Route::Bad;
    };
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
    };
    if !token(method) || !target.starts_with('/') {
        return Route::Bad;
    }
    if !version.starts_with("HTTP/") {
        return Route::Bad;
    }
    if version != "HTTP/1.0" && version != "HTTP/1.1" {
        return Route::BadVersion;
    }
    if method != "GET" {
        return Route::BadMethod;
    }
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    if path == "/metrics" {
        Route::Metrics
    } else {
        Route::NotFound
    }
}

/// An HTTP/1.1 answer with `Connection: close`; `headers` are extra lines, each ending in CRLF.
fn response(code: u16, reason: &str, headers: &str, body: &str) -> Vec<u8> {
    let kind = if code == 200 {
        "text/plain; version=0.0.4; charset=utf-8"
    } else {
        "text/plain; charset=utf-8"
    };
    format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\n\
         {headers}Connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// A label value with `\`, `"` and newlines escaped (names are restricted by the config;
/// the format is kept whatever they hold).
fn label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// The master's resident set size, from /proc/self/status (`VmRSS`, in kB).
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line
        .trim_start_matches("VmRSS:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// The exposition (text format 0.0.4) of the supervisor's state at `now` (`wall` is the same
/// moment on the system clock, for start times).
fn render(sup: &Supervisor, now: Instant, wall: SystemTime) -> String {
    let mut out = String::with_capacity(4096);
    family(
        &mut out,
        "plumule_build_info",
        "gauge",
        "The plumule version this master runs; always 1.",
    );
    let _ = writeln!(
        out,
        "plumule_build_info{{version=\"{}\"}} 1",
        label(env!("CARGO_PKG_VERSION"))
    );
    if let Some(rss) = resident_bytes() {
        family(
            &mut out,
            "plumule_master_resident_bytes",
            "gauge",
            "Resident memory of the master process, in bytes.",
        );
        let _ = writeln!(out, "plumule_master_resident_bytes {rss}");
    }

    // By program name: a program removed and added again by reloads has two pools while the
    // old one drains, and a label set may appear only once.
    let mut states: BTreeMap<&str, [u64; STATES.len()]> = BTreeMap::new();
    let mut started: BTreeMap<(&str, u32), f64> = BTreeMap::new();
    let count = |counts: &mut [u64; STATES.len()], state: &str| {
        if let Some(i) = STATES.iter().position(|s| *s == state) {
            counts[i] += 1;
        }
    };
    let seconds = |since: Instant| {
        let at = wall
            .checked_sub(now.saturating_duration_since(since))
            .unwrap_or(wall);
        at.duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64())
    };
    // Removed pools first, so that a live pool's start times win.
    let mut pools: Vec<_> = sup.pools.iter().collect();
    pools.sort_by_key(|p| !p.removed);
    for pool in pools {
        let name = pool.program.name.as_str();
        let counts = states.entry(name).or_default();
        for slot in &pool.slots {
            count(counts, slot.state().name());
            if slot.state().old().is_some() {
                // The predecessor of a rolling restart shows as stopping, as in `status`.
                count(counts, "stopping");
            }
            let since = slot
                .state()
                .since()
                .or_else(|| slot.state().old().map(|o| o.since));
            if let Some(since) = since {
                started.insert((name, slot.id), seconds(since));
            }
        }
        // Wanted workers held back by `after` are starting, as `status` shows them.
        if crate::plan::waiting_for(&sup.pools, pool).is_some() {
            for _ in pool.slots.len() as u32..pool.desired() {
                count(counts, "starting");
            }
        }
    }

    family(
        &mut out,
        "plumule_workers",
        "gauge",
        "Workers by program and state.",
    );
    for (program, counts) in &states {
        for (state, n) in STATES.iter().zip(counts) {
            let _ = writeln!(
                out,
                "plumule_workers{{program=\"{}\",state=\"{state}\"}} {n}",
                label(program)
            );
        }
    }

    let counters = &sup.counters;
    family(
        &mut out,
        "plumule_worker_restarts_total",
        "counter",
        "Restarts of workers after an exit plumule did not ask for, by program.",
    );
    let mut restarts: BTreeMap<&str, u64> = states.keys().map(|p| (*p, 0)).collect();
    for (program, n) in &counters.restarts {
        restarts.insert(program, *n);
    }
    for (program, n) in &restarts {
        let _ = writeln!(
            out,
            "plumule_worker_restarts_total{{program=\"{}\"}} {n}",
            label(program)
        );
    }

    family(
        &mut out,
        "plumule_worker_exits_total",
        "counter",
        "Ended worker processes, by program and reason (success, failure, signal, stopped, \
         start_error, ready_timeout, watchdog).",
    );
    let mut exits: BTreeMap<(&str, &str), u64> = BTreeMap::new();
    for program in states.keys() {
        for reason in REASONS {
            exits.insert((program, reason), 0);
        }
    }
    for ((program, reason), n) in &counters.exits {
        exits.insert((program, reason), *n);
    }
    for ((program, reason), n) in &exits {
        let _ = writeln!(
            out,
            "plumule_worker_exits_total{{program=\"{}\",reason=\"{reason}\"}} {n}",
            label(program)
        );
    }

    family(
        &mut out,
        "plumule_worker_start_time_seconds",
        "gauge",
        "When each live worker process was spawned, in seconds since the Unix epoch.",
    );
    for ((program, id), at) in &started {
        let _ = writeln!(
            out,
            "plumule_worker_start_time_seconds{{program=\"{}\",id=\"{id}\"}} {at:.3}",
            label(program)
        );
    }
    render_queues(&mut out, sup);
    out
}

/// The queue families: jobs by state, jobs by outcome, job durations, fsync times.
fn render_queues(out: &mut String, sup: &Supervisor) {
    let queues = &sup.queues.queues;
    family(
        out,
        "plumule_queue_jobs",
        "gauge",
        "Jobs of each queue by state (pending, in_flight, dead).",
    );
    for q in queues {
        let c = q.state.counts();
        for (state, n) in [
            ("pending", c.pending),
            ("in_flight", c.in_flight),
            ("dead", c.dead),
        ] {
            let _ = writeln!(
                out,
                "plumule_queue_jobs{{queue=\"{}\",state=\"{state}\"}} {n}",
                label(&q.config.name)
            );
        }
    }
    family(
        out,
        "plumule_jobs_total",
        "counter",
        "Answers and redeliveries of each queue's jobs since the master started, by outcome \
         (ok, fail and drop: answers, retried: a redelivery of any cause, timeout: jobs in \
         flight past job_timeout).",
    );
    for q in queues {
        let k = &q.counters;
        for (outcome, n) in [
            ("ok", k.ok),
            ("fail", k.fail),
            ("drop", k.dropped),
            ("retried", k.retried),
            ("timeout", k.timeout),
        ] {
            let _ = writeln!(
                out,
                "plumule_jobs_total{{queue=\"{}\",outcome=\"{outcome}\"}} {n}",
                label(&q.config.name)
            );
        }
    }
    family(
        out,
        "plumule_job_duration_seconds",
        "histogram",
        "Time from a job's delivery to its worker to the worker's answer, by queue.",
    );
    for q in queues {
        let labels = format!("queue=\"{}\",", label(&q.config.name));
        q.counters
            .durations
            .render(out, "plumule_job_duration_seconds", &labels);
    }
    family(
        out,
        "plumule_queue_fsync_seconds",
        "histogram",
        "Time each group commit of a durable queue took to sync its log to disk.",
    );
    sup.counters
        .fsync_seconds
        .render(out, "plumule_queue_fsync_seconds", "");
}

impl Subsystem for Metrics {
    fn part(&self) -> Part {
        Part::Metrics
    }

    fn ready(&mut self, sup: &mut Supervisor, local: u64, ready: Ready, now: Instant) {
        if local == LISTENER {
            self.accept(sup, now);
        } else {
            self.serve(sup, local, ready);
        }
    }

    fn after_pass(&mut self, sup: &mut Supervisor, now: Instant) -> Option<Instant> {
        if sup.config.metrics != self.wanted {
            self.rebind(sup);
        }
        if let (Some(until), Some(listener)) = (self.paused_until, &self.listener) {
            if now >= until {
                self.paused_until = None;
                if self.spare.is_none() {
                    self.spare = crate::control::spare_descriptor();
                }
                if let Err(e) = sup
                    .reactor
                    .add(listener.fd(), Part::Metrics.token(LISTENER), false)
                {
                    log::error!("metrics: cannot watch the listener again: {e}");
                }
            }
        }
        self.conns.retain(|_, c| c.deadline > now);
        let expiry = self.conns.values().map(|c| c.deadline).min();
        super::earliest(expiry, self.paused_until)
    }

    fn finish(&mut self, sup: &mut Supervisor) {
        self.conns.clear();
        if let Some(listener) = self.listener.take() {
            sup.reactor.remove(listener.fd());
            listener.close();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slot::{Old, StartWait};
    use nix::sys::signal::Signal;

    #[test]
    fn routes_by_request_line() {
        let cases: &[(&str, Route)] = &[
            ("GET /metrics HTTP/1.1", Route::Metrics),
            ("GET /metrics HTTP/1.0", Route::Metrics),
            ("GET /metrics?name[]=x HTTP/1.1", Route::Metrics),
            ("GET / HTTP/1.1", Route::NotFound),
            ("GET /metrics/ HTTP/1.1", Route::NotFound),
            ("HEAD /metrics HTTP/1.1", Route::BadMethod),
            ("POST /metrics HTTP/1.1", Route::BadMethod),
            ("GET /metrics HTTP/2.0", Route::BadVersion),
            ("GET /metrics", Route::Bad),
            ("GET  /metrics HTTP/1.1", Route::Bad),
            ("GET metrics HTTP/1.1", Route::Bad),
            ("G(T /metrics HTTP/1.1", Route::Bad),
            ("GET /metrics FTP/1.1", Route::Bad),
        ];
        for (line, expected) in cases {
            let head = format!("{line}\r\nHost: x\r\n\r\n");
            assert_eq!(&route(head.as_bytes()), expected, "{line}");
        }
        assert_eq!(route(b"GET /metrics HTTP/1.1\n\n"), Route::Metrics);
        assert_eq!(route(b"\xff\xfe /metrics HTTP/1.1\r\n\r\n"), Route::Bad);
    }

    #[test]
    fn the_head_ends_at_the_first_blank_line() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: x\r\n"), None);
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\nbody"), Some(18));
        assert_eq!(head_end(b"GET / HTTP/1.1\n\n"), Some(16));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n\r\n"), Some(24));
        // A request cannot begin with its blank line.
        assert_eq!(head_end(b"\r\n"), None);
    }

    #[test]
    fn answers_carry_their_length_and_close() {
        let text = String::from_utf8(response(404, "Not Found", "", "nope\n")).unwrap();
        assert_eq!(
            text,
            "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain; charset=utf-8\r\n\
             Content-Length: 5\r\nConnection: close\r\n\r\nnope\n"
        );
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn exit_reasons_put_what_plumule_asked_for_first() {
        let program = crate::test_support::program("web", 1);
        let pid = Pid::from_raw(42);
        let other = Pid::from_raw(43);
        let now = Instant::now();
        let stopping = |then| SlotState::Stopping {
            pid,
            since: now,
            kill_at: now,
            killed: false,
            then,
        };
        let running = SlotState::Running {
            pid,
            since: now,
            watchdog_at: None,
        };
        let term = Exit::Signal(Signal::SIGTERM);
        let cases = [
            (running.clone(), Exit::Code(0), "success"),
            (running.clone(), Exit::Code(1), "failure"),
            (running.clone(), term, "signal"),
            (stopping(AfterStop::Rest), term, "stopped"),
            (stopping(AfterStop::Restart), Exit::Code(1), "stopped"),
            (
                stopping(AfterStop::Crash(StopReason::ReadyTimeout)),
                term,
                "ready_timeout",
            ),
            (
                stopping(AfterStop::Crash(StopReason::Watchdog)),
                Exit::Signal(Signal::SIGABRT),
                "watchdog",
            ),
            (
                SlotState::Starting {
                    pid,
                    since: now,
                    wait: StartWait::Exec,
                    error: Some("cannot execute".into()),
                },
                Exit::Code(127),
                "start_error",
            ),
            // The old process of a rolling restart, and its successor.
            (
                SlotState::Rolling {
                    old: Old {
                        pid,
                        since: now,
                        kill_at: Some(now),
                        killed: false,
                    },
                    next: Box::new(SlotState::Running {
                        pid: other,
                        since: now,
                        watchdog_at: None,
                    }),
                },
                term,
                "stopped",
            ),
        ];
        for (state, exit, expected) in cases {
            assert_eq!(
                exit_reason(&state, pid, exit, &program),
                expected,
                "{state:?} {exit}"
            );
            assert!(REASONS.contains(&expected));
        }
    }

    #[test]
    fn counters_only_grow() {
        let mut c = Counters::default();
        c.exited("web", "signal");
        c.exited("web", "signal");
        c.restarted("web", 0);
        assert!(c.restarts.is_empty());
        c.restarted("web", 2);
        assert_eq!(c.exits[&("web".to_string(), "signal")], 2);
        assert_eq!(c.restarts["web"], 2);
    }
}
