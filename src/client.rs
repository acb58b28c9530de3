//! The client side of the control socket: finding it, sending one request, reading the
//! answer, and printing it for people (tables) or scripts (`--json`).

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub mod queue;

use crate::config;
use crate::protocol::{
    self, Answer, LogsResult, Message, Request, Response, StatusReport, WorkerStatus,
};

/// Why a client command got no answer it can use; the text is what the user reads.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot find the master's socket: cannot read {}: {source}", path.display())]
    ReadConfig { path: PathBuf, source: io::Error },
    #[error("cannot find the master's socket: {0}")]
    Defaults(#[source] config::ConfigError),
    #[error("no master is running here (nothing listens on {})", socket.display())]
    NoMaster { socket: PathBuf },
    #[error("cannot connect to {}: {source}", socket.display())]
    Connect { socket: PathBuf, source: io::Error },
    #[error("cannot encode the request: {0}")]
    Encode(#[source] serde_json::Error),
    #[error("cannot send the request: {0}")]
    Send(#[source] io::Error),
    #[error("cannot read the answer: {0}")]
    Receive(#[source] io::Error),
    #[error("the master closed the connection without answering")]
    NoAnswer,
    /// `--timeout` of silence: the master is stopped, wedged or overloaded.
    #[error(
        "gave up after {} of silence from the master ({what}); is it stopped or wedged? \
         (--timeout sets how long to wait)",
        crate::format_duration(*after)
    )]
    Silent { after: Duration, what: String },
    /// A `logs -f` stream ended: the master stopped or closed the connection.
    #[error("the master went away (it stopped or closed the connection)")]
    Gone,
    #[error("unreadable answer from the master: {0}")]
    Unreadable(#[source] serde_json::Error),
    /// A well-formed answer of the wrong kind for the request (`what`: "status", …).
    #[error("unreadable {what} from the master")]
    Unexpected { what: &'static str },
    /// The master's own refusal ("no program named web").
    #[error("{0}")]
    Refused(String),
    /// `shutdown`: the master answered, yet its process was still there after `--timeout`.
    #[error(
        "the master (pid {pid}) closed its control socket but has not exited after {}",
        crate::format_duration(*after)
    )]
    NotExited { pid: i32, after: Duration },
    #[error("cannot write to stdout: {0}")]
    Stdout(#[source] io::Error),
}

/// Finds the master's socket, first to last: `--socket`, `-c FILE`'s runtime dir,
/// `$PLUMULE_SOCKET`, the config file found as usual, then (no file found, and none named by
/// `-c` or `$PLUMULE_CONFIG`) the default runtime dir of SPEC §2, the one a master whose
/// config does not set `runtime_dir` uses.
pub fn socket_path(
    socket: Option<&Path>,
    config_path: Option<&Path>,
) -> Result<PathBuf, ClientError> {
    if let Some(s) = socket {
        return Ok(s.to_path_buf());
    }
    if config_path.is_none() {
        if let Some(s) = std::env::var_os("PLUMULE_SOCKET") {
            return Ok(PathBuf::from(s));
        }
    }
    let named =
        config_path.is_some() || std::env::var_os("PLUMULE_CONFIG").is_some_and(|p| !p.is_empty());
    let path = config::find_config_path(config_path);
    if !named && !path.exists() {
        let folder = std::env::current_dir().unwrap_or_default();
        return Ok(default_runtime_dir(&folder)?.join("control.sock"));
    }
    Ok(runtime_dir_of(&path)?.join("control.sock"))
}

/// The runtime dir of a config that does not set it, for this user and environment.
fn default_runtime_dir(folder: &Path) -> Result<PathBuf, ClientError> {
    config::parse("", &folder.join("plumule.toml"))
        .map(|c| c.runtime_dir)
        .map_err(ClientError::Defaults)
}

/// The runtime dir a config file names, read leniently: a client must still reach the master
/// when the file has just been edited into something invalid (that is what `reload` reports).
fn runtime_dir_of(path: &Path) -> Result<PathBuf, ClientError> {
    let text = std::fs::read_to_string(path).map_err(|source| ClientError::ReadConfig {
        path: path.to_path_buf(),
        source,
    })?;
    let folder = std::path::absolute(path)
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_default();
    let named = match toml::from_str::<toml::Table>(&text) {
        Ok(table) => table
            .get("plumule")
            .and_then(|p| p.get("runtime_dir"))
            .and_then(|v| v.as_str())
            .map(str::to_string),
        // Not even TOML: look for the line itself, so the master can report the error.
        Err(_) => scan_runtime_dir(&text),
    }
    .map(|d| folder.join(d));
    if let Some(dir) = named {
        return Ok(dir);
    }
    // Unset: the same defaults as the master's, from an empty config beside the file.
    default_runtime_dir(&folder)
}

/// `runtime_dir = "…"` under `[plumule]`, found line by line in a file that does not parse.
fn scan_runtime_dir(text: &str) -> Option<String> {
    let mut in_plumule = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_plumule = line.trim_start_matches('[').trim_end_matches(']').trim() == "plumule";
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        if in_plumule && key.trim() == "runtime_dir" {
            let value = value.trim();
            let quote = value.chars().next().filter(|c| *c == '"' || *c == '\'')?;
            let rest = &value[1..];
            return rest.find(quote).map(|end| rest[..end].to_string());
        }
    }
    None
}

/// A connection to the master that gives up when the master has been silent for `timeout`.
///
/// Requests ask for progress lines (see [`crate::protocol`]): a master at work on a long
/// request says so at least every [`crate::protocol::PROGRESS_EVERY`], so only a stopped or
/// wedged master stays silent long enough to time out.
pub struct Connection {
    reader: BufReader<UnixStream>,
    timeout: Option<Duration>,
    /// What the client waits for now, for the message when it gives up.
    waiting_for: String,
    /// A send that failed: reported only if no answer can be read either.
    unsent: Option<io::Error>,
}

impl Connection {
    /// Connects to `socket`; `timeout` bounds each silence of the master (None: no bound).
    pub fn open(socket: &Path, timeout: Option<Duration>) -> Result<Connection, ClientError> {
        let stream = UnixStream::connect(socket).map_err(|source| match source.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => ClientError::NoMaster {
                socket: socket.to_path_buf(),
            },
            _ => ClientError::Connect {
                socket: socket.to_path_buf(),
                source,
            },
        })?;
        let set = stream
            .set_read_timeout(timeout)
            .and_then(|()| stream.set_write_timeout(timeout));
        set.map_err(|source| ClientError::Connect {
            socket: socket.to_path_buf(),
            source,
        })?;
        Ok(Connection {
            reader: BufReader::new(stream),
            timeout,
            waiting_for: String::new(),
            unsent: None,
        })
    }

    /// Sends `req`, asking for progress lines.
    pub fn send(&mut self, req: &Request) -> Result<(), ClientError> {
        let line = req.to_line(true).map_err(ClientError::Encode)?;
        self.waiting_for = format!("waiting for {}", req.describe());
        // A master that refuses us (credentials, too many clients) answers and closes at
        // once: even if the send fails, its answer may be waiting.
        if let Err(e) = self.reader.get_ref().write_all(&line) {
            if self.is_silence(&e) {
                return Err(self.silent());
            }
            self.unsent = Some(e);
        }
        Ok(())
    }

    /// Stops bounding the master's silences (a `logs -f` stream, once it has started).
    pub fn unbounded(&mut self) -> Result<(), ClientError> {
        self.timeout = None;
        self.reader
            .get_ref()
            .set_read_timeout(None)
            .map_err(ClientError::Receive)
    }

    fn is_silence(&self, e: &io::Error) -> bool {
        self.timeout.is_some()
            && matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            )
    }

    fn silent(&self) -> ClientError {
        ClientError::Silent {
            after: self.timeout.unwrap_or_default(),
            what: self.waiting_for.clone(),
        }
    }

    /// The next response; progress lines are taken in on the way. `None` once the master has
    /// closed the connection.
    pub fn read_response(&mut self) -> Result<Option<Response>, ClientError> {
        loop {
            let mut line = String::new();
            let read = self.reader.read_line(&mut line);
            if line.is_empty() {
                if let Some(e) = self.unsent.take() {
                    return Err(ClientError::Send(e));
                }
            }
            match read {
                Ok(_) => {}
                Err(e) if self.is_silence(&e) => return Err(self.silent()),
                Err(e) => return Err(ClientError::Receive(e)),
            }
            if line.is_empty() {
                return Ok(None);
            }
            match protocol::parse_message(&line).map_err(ClientError::Unreadable)? {
                Message::Progress(text) => self.waiting_for = text,
                Message::Response(r) => return Ok(Some(r)),
            }
        }
    }

    /// The pid of the master at the other end, as the kernel recorded it when the master
    /// listened (SO_PEERCRED); `None` when the kernel does not say (another pid namespace).
    pub fn peer_pid(&self) -> Option<i32> {
        use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
        let cred = getsockopt(self.reader.get_ref(), PeerCredentials).ok()?;
        Some(cred.pid()).filter(|&p| p > 0)
    }

    /// Waits, `timeout` at most, until the master closes the connection; any line read on the
    /// way is dropped.
    pub fn wait_closed(&mut self) -> Result<(), ClientError> {
        loop {
            match self.read_response() {
                Ok(None) => return Ok(()),
                Ok(Some(_)) => {}
                Err(ClientError::Receive(_)) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    /// Sends `req` and returns once the master has taken it on: its first progress line (it
    /// waits for the work to be done) or its answer. The master's refusal is an error.
    pub fn request_accepted(&mut self, req: &Request) -> Result<(), ClientError> {
        self.send(req)?;
        // The first line, whatever it is, says the request was taken on (or refused).
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => {
                return Err(match self.unsent.take() {
                    Some(e) => ClientError::Send(e),
                    None => ClientError::NoAnswer,
                })
            }
            Ok(_) => {}
            Err(e) if self.is_silence(&e) => return Err(self.silent()),
            Err(e) => return Err(ClientError::Receive(e)),
        }
        match protocol::parse_message(&line).map_err(ClientError::Unreadable)? {
            Message::Progress(_) | Message::Response(Response::Ok(_)) => Ok(()),
            Message::Response(Response::Error(message)) => Err(ClientError::Refused(message)),
        }
    }

    /// Sends `req` and reads its response; the master's refusal is an error too.
    pub fn ask(&mut self, req: &Request) -> Result<Answer, ClientError> {
        self.send(req)?;
        match self.read_response()?.ok_or(ClientError::NoAnswer)? {
            Response::Ok(answer) => Ok(answer),
            Response::Error(message) => Err(ClientError::Refused(message)),
        }
    }
}

/// `plumule shutdown`: asks the master for a graceful stop and returns once it has exited —
/// its answer (sent once every worker is gone), the connection closing, then its process
/// gone (a pidfd on it, opened before the request so that a reused pid cannot fool the
/// wait). Each step is bounded by `timeout` of silence; the master says it is still at work
/// every second until it answers. Returns the master's pid when the kernel told it.
pub fn shutdown(
    socket: Option<&Path>,
    config_path: Option<&Path>,
    timeout: Option<Duration>,
) -> Result<Option<i32>, ClientError> {
    let socket = socket_path(socket, config_path)?;
    let mut conn = Connection::open(&socket, timeout)?;
    let pid = conn.peer_pid();
    let exit_fd = pid.and_then(|p| crate::sys::process::pidfd(nix::unistd::Pid::from_raw(p)).ok());
    conn.send(&Request::Shutdown)?;
    match conn.read_response() {
        Ok(Some(Response::Ok(_))) => conn.wait_closed()?,
        Ok(Some(Response::Error(message))) => return Err(ClientError::Refused(message)),
        // Closed without an answer: the master may have finished between our connect and
        // the request (a stop already under way). Its process tells.
        Ok(None) | Err(ClientError::Receive(_)) if exit_fd.is_some() => {}
        Ok(None) => return Err(ClientError::NoAnswer),
        Err(e) => return Err(e),
    }
    if let (Some(fd), Some(pid)) = (exit_fd, pid) {
        use std::os::fd::AsRawFd;
        let mut fds = [libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        let give_up = timeout.map(|t| std::time::Instant::now() + t);
        loop {
            let left = give_up.map(|g| g.saturating_duration_since(std::time::Instant::now()));
            if crate::sys::poll(&mut fds, left).map_err(ClientError::Receive)? > 0 {
                break;
            }
            if left.is_some_and(|l| l.is_zero()) {
                return Err(ClientError::NotExited {
                    pid,
                    after: timeout.unwrap_or_default(),
                });
            }
        }
    }
    Ok(pid)
}

/// Sends `req` and waits for its answer, giving up after `timeout` of silence.
pub fn ask(socket: &Path, req: &Request, timeout: Option<Duration>) -> Result<Answer, ClientError> {
    Connection::open(socket, timeout)?.ask(req)
}

/// Asks for `status` (of one program, or all).
pub fn status(
    socket: &Path,
    program: Option<&str>,
    timeout: Option<Duration>,
) -> Result<StatusReport, ClientError> {
    let req = Request::Status {
        program: program.map(str::to_string),
    };
    match ask(socket, &req, timeout)? {
        Answer::Status(report) => Ok(report),
        _ => Err(ClientError::Unexpected { what: "status" }),
    }
}

/// What an acting command prints once done: one line for its program or worker, from a
/// status of that program ("web: 4 running", "web: 3 running, 1 backoff", "web.2: running",
/// "web: 0 workers").
pub fn summary_line(target: &protocol::Target, report: &StatusReport) -> String {
    let workers: Vec<&WorkerStatus> = report
        .workers()
        .filter(|(p, _)| p.name == target.program)
        .map(|(_, w)| w)
        .collect();
    if let Some(id) = target.id {
        // During a roll an old process may show beside its successor: the newest counts.
        let state = workers
            .iter()
            .rev()
            .find(|w| w.id == id)
            .map_or("gone", |w| w.state.as_str());
        return format!("{}.{id}: {state}", target.program);
    }
    if workers.is_empty() {
        return format!("{}: 0 workers", target.program);
    }
    let mut counts: Vec<(&str, usize)> = Vec::new();
    for w in &workers {
        match counts.iter_mut().find(|(s, _)| *s == w.state) {
            Some((_, n)) => *n += 1,
            None => counts.push((&w.state, 1)),
        }
    }
    // Running first, then the others in the order the table shows them.
    counts.sort_by_key(|(s, _)| *s != "running");
    let parts: Vec<String> = counts.iter().map(|(s, n)| format!("{n} {s}")).collect();
    format!("{}: {}", target.program, parts.join(", "))
}

/// What `signal` prints once done: "web: sent HUP to 3 workers", "web.1: sent HUP", and with
/// `--group` "web: sent HUP to the process groups of 2 workers", "web.1: sent HUP to its
/// process group".
pub fn signal_line(target: &str, sent: &protocol::SignalResult) -> String {
    let one = protocol::Target::parse(target).is_ok_and(|t| t.id.is_some());
    let n = sent.workers.len();
    let workers = if n == 1 { "worker" } else { "workers" };
    let whom = match (one, sent.group) {
        (true, false) => String::new(),
        (true, true) => " to its process group".into(),
        (false, false) => format!(" to {n} {workers}"),
        (false, true) => format!(" to the process groups of {n} {workers}"),
    };
    let name = if one { target } else { &sent.program };
    format!("{name}: sent {}{whom}", sent.signal)
}

/// One refresh of `status --watch`: on a terminal, the cursor home and the screen cleared
/// before the table (so it redraws in place); otherwise tables one after the other with a
/// blank line between them. `--json`: one status object per line.
pub fn watch_frame(
    status: &StatusReport,
    json: bool,
    terminal: bool,
    colour: bool,
    first: bool,
) -> String {
    let body = if json {
        serde_json::to_string(status).unwrap_or_default() + "\n"
    } else {
        format_status(status, colour)
    };
    match (terminal, json, first) {
        (true, false, _) => format!("\x1b[H\x1b[2J{body}"),
        (false, false, false) => format!("\n{body}"),
        _ => body,
    }
}

/// Keeps the log entries newer than `since` before now (all of them without `since`, and
/// those whose time does not read as RFC 3339).
pub fn logs_since(logs: &mut LogsResult, since: Option<Duration>, now: std::time::SystemTime) {
    let Some(since) = since else { return };
    let Some(from) = now.checked_sub(since) else {
        return;
    };
    logs.lines
        .retain(|l| humantime::parse_rfc3339(&l.time).map_or(true, |t| t >= from));
}

/// Prints `logs` lines as the master's log shows them: `TIME PROGRAM.ID: line`.
/// Returns false once stdout is gone (`plumule logs -f | head`), so that following stops.
pub fn print_log_lines(logs: &LogsResult) -> bool {
    let mut out = std::io::stdout().lock();
    for l in &logs.lines {
        if writeln!(out, "{} {}: {}", l.time, l.source, l.line).is_err() {
            return false;
        }
    }
    out.flush().is_ok()
}

/// Sends `req`; prints the error (exit 1) or hands the answer to `on_ok`.
pub fn run(
    socket: Option<&Path>,
    config_path: Option<&Path>,
    timeout: Option<Duration>,
    req: Request,
    on_ok: impl FnOnce(Answer) -> i32,
) -> i32 {
    let answer = socket_path(socket, config_path).and_then(|s| ask(&s, &req, timeout));
    match answer {
        Ok(answer) => on_ok(answer),
        Err(e) => {
            eprintln!("plumule: {e}");
            1
        }
    }
}

fn uptime(seconds: Option<f64>) -> String {
    match seconds {
        None => "-".into(),
        Some(s) => short_duration(s.max(0.0) as u64),
    }
}

/// A duration for a table: its two largest units, "3h 12m", "2d 4h", "45s" (a zero second
/// unit is left out: "2h").
pub fn short_duration(seconds: u64) -> String {
    const UNITS: [(u64, &str); 4] = [(86_400, "d"), (3_600, "h"), (60, "m"), (1, "s")];
    let Some(first) = UNITS.iter().position(|(n, _)| seconds >= *n) else {
        return "0s".into();
    };
    let (n, unit) = UNITS[first];
    let mut out = format!("{}{unit}", seconds / n);
    if let Some(&(m, unit)) = UNITS.get(first + 1) {
        let rest = seconds % n / m;
        if rest > 0 {
            out.push_str(&format!(" {rest}{unit}"));
        }
    }
    out
}

/// Whether `status` colours its states: only on a terminal, and never with `NO_COLOR` set
/// to anything but the empty string (no-color.org).
pub fn colour_wanted(terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

/// The ANSI colour of a state: red for trouble, green for running, yellow for in between.
fn state_colour(state: &str) -> Option<&'static str> {
    match state {
        "running" => Some("32"),
        "failed" => Some("1;31"),
        "backoff" => Some("33"),
        "starting" | "stopping" => Some("36"),
        "exited" | "stopped" => Some("2"),
        _ => None,
    }
}

/// The column of the status table that holds the state.
const STATE_COLUMN: usize = 3;

fn last_exit(w: &WorkerStatus) -> String {
    match &w.last_exit {
        None => "-".into(),
        Some(crate::protocol::LastExit::Code { code }) => format!("exit {code}"),
        Some(crate::protocol::LastExit::Signal { signal }) => format!("signal {signal}"),
    }
}

/// The status table with its summary line; `colour`: states in ANSI colours (a terminal).
/// Columns are as wide as their widest cell, so long names keep the table aligned.
pub fn format_status(status: &StatusReport, colour: bool) -> String {
    let mut rows = vec![[
        "PROGRAM".to_string(),
        "ID".into(),
        "PID".into(),
        "STATE".into(),
        "UPTIME".into(),
        "RESTARTS".into(),
        "LAST EXIT".into(),
        "LOCKS".into(),
        "JOBS".into(),
        "DETAIL".into(),
    ]];
    let mut counts = std::collections::BTreeMap::<&str, usize>::new();
    let mut total = 0;
    for p in &status.programs {
        for w in &p.workers {
            total += 1;
            *counts.entry(w.state.as_str()).or_default() += 1;
            let detail = match (&w.detail, &w.status) {
                (Some(d), Some(s)) => format!("{d}; {s}"),
                (Some(d), None) => d.clone(),
                (None, Some(s)) => s.clone(),
                (None, None) => String::new(),
            };
            rows.push([
                p.name.clone(),
                w.id.to_string(),
                w.pid.map_or("-".into(), |p| p.to_string()),
                w.state.clone(),
                uptime(w.uptime_s),
                w.restarts.to_string(),
                last_exit(w),
                if w.locks.is_empty() {
                    "-".into()
                } else {
                    w.locks.join(",")
                },
                w.in_flight.to_string(),
                detail,
            ]);
        }
    }
    let mut widths = [0usize; 10];
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            let padded = if i == row.len() - 1 {
                cell.clone()
            } else {
                format!("{cell:<w$}  ", w = widths[i])
            };
            // Padding is measured on the plain text; the escape codes go around it.
            match (i, colour && !std::ptr::eq(row, &rows[0])) {
                (STATE_COLUMN, true) => match state_colour(cell) {
                    Some(code) => {
                        let (text, pad) = padded.split_at(cell.len());
                        line.push_str(&format!("\x1b[{code}m{text}\x1b[0m{pad}"));
                    }
                    None => line.push_str(&padded),
                },
                _ => line.push_str(&padded),
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    let summary: Vec<String> = counts.iter().map(|(s, n)| format!("{n} {s}")).collect();
    out.push_str(&format!(
        "{} program(s), {total} worker(s){}{}\n",
        status.programs.len(),
        if summary.is_empty() { "" } else { ": " },
        summary.join(", ")
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{LastExit, ProgramStatus};

    #[test]
    fn status_table_has_a_row_per_worker_and_a_summary() {
        let w = |id, state: &str, pid| WorkerStatus {
            id,
            pid,
            state: state.into(),
            detail: None,
            uptime_s: pid.map(|_| 75.0),
            restarts: 2,
            last_exit: Some(LastExit::Code { code: 1 }),
            locks: vec![],
            in_flight: 0,
            status: None,
        };
        let status = StatusReport {
            programs: vec![ProgramStatus {
                name: "web".into(),
                workers: vec![w(0, "running", Some(42)), w(1, "failed", None)],
            }],
        };
        let text = format_status(&status, false);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[0].starts_with("PROGRAM"));
        assert!(
            lines[1].contains("web")
                && lines[1].contains("42")
                && lines[1].contains("running")
                && lines[1].contains("1m 15s")
        );
        assert!(lines[2].contains("failed") && lines[2].contains("exit 1"));
        assert_eq!(lines[3], "1 program(s), 2 worker(s): 1 failed, 1 running");
    }

    #[test]
    fn durations_show_their_two_largest_units() {
        let table = [
            (0, "0s"),
            (45, "45s"),
            (60, "1m"),
            (75, "1m 15s"),
            (3 * 3600 + 12 * 60 + 30, "3h 12m"),
            (7200, "2h"),
            (2 * 86_400 + 4 * 3600 + 59, "2d 4h"),
        ];
        for (secs, text) in table {
            assert_eq!(short_duration(secs), text, "{secs}");
        }
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        use std::ffi::OsStr;
        assert!(colour_wanted(true, None));
        assert!(colour_wanted(true, Some(OsStr::new(""))));
        assert!(!colour_wanted(true, Some(OsStr::new("1"))));
        assert!(!colour_wanted(false, None));
    }

    fn worker(id: u32, state: &str) -> WorkerStatus {
        WorkerStatus {
            id,
            pid: Some(100 + id as i32),
            state: state.into(),
            detail: None,
            uptime_s: Some(3.0),
            restarts: 0,
            last_exit: None,
            locks: vec![],
            in_flight: 0,
            status: None,
        }
    }

    #[test]
    fn coloured_states_keep_the_columns_aligned_and_long_names_fit() {
        let long = "a-program-with-a-rather-long-name";
        let status = StatusReport {
            programs: vec![
                ProgramStatus {
                    name: "web".into(),
                    workers: vec![worker(0, "running"), worker(1, "failed")],
                },
                ProgramStatus {
                    name: long.into(),
                    workers: vec![worker(0, "backoff")],
                },
            ],
        };
        let plain = format_status(&status, false);
        assert!(!plain.contains('\x1b'), "{plain}");
        let coloured = format_status(&status, true);
        assert!(coloured.contains("\x1b[32mrunning\x1b[0m"), "{coloured}");
        assert!(coloured.contains("\x1b[1;31mfailed\x1b[0m"), "{coloured}");
        // Without its escape codes, the coloured table is the plain one.
        let stripped = coloured
            .replace("\x1b[32m", "")
            .replace("\x1b[1;31m", "")
            .replace("\x1b[33m", "")
            .replace("\x1b[0m", "");
        assert_eq!(stripped, plain);
        // Every column starts at the same place on every row, the long name's included.
        let rows: Vec<&str> = plain.lines().take(4).collect();
        let id_at = rows[0].find("ID").unwrap();
        assert!(id_at > long.len(), "{plain}");
        for row in &rows[1..] {
            assert!(row[id_at..].starts_with(['0', '1']), "{plain}");
            assert!(row[..id_at].ends_with("  "), "{plain}");
        }
    }

    #[test]
    fn summary_lines_count_states_per_program_or_name_the_worker() {
        let report = StatusReport {
            programs: vec![ProgramStatus {
                name: "web".into(),
                workers: vec![
                    worker(0, "backoff"),
                    worker(1, "running"),
                    worker(2, "running"),
                ],
            }],
        };
        let t = |s: &str| crate::protocol::Target::parse(s).unwrap();
        assert_eq!(
            summary_line(&t("web"), &report),
            "web: 2 running, 1 backoff"
        );
        assert_eq!(summary_line(&t("web.1"), &report), "web.1: running");
        let empty = StatusReport { programs: vec![] };
        assert_eq!(summary_line(&t("web"), &empty), "web: 0 workers");
    }

    #[test]
    fn signal_lines_name_the_program_or_the_worker() {
        let sent = |workers: Vec<u32>, group| protocol::SignalResult {
            program: "web".into(),
            signal: "HUP".into(),
            group,
            workers,
        };
        let table = [
            (
                "web",
                sent(vec![0, 1, 2], false),
                "web: sent HUP to 3 workers",
            ),
            ("web", sent(vec![1], false), "web: sent HUP to 1 worker"),
            (
                "web",
                sent(vec![0, 1], true),
                "web: sent HUP to the process groups of 2 workers",
            ),
            ("web.2", sent(vec![2], false), "web.2: sent HUP"),
            (
                "web.2",
                sent(vec![2], true),
                "web.2: sent HUP to its process group",
            ),
        ];
        for (target, result, line) in table {
            assert_eq!(signal_line(target, &result), line);
        }
    }

    #[test]
    fn watch_frames_redraw_on_a_terminal_and_follow_each_other_elsewhere() {
        let status = StatusReport {
            programs: vec![ProgramStatus {
                name: "web".into(),
                workers: vec![worker(0, "running")],
            }],
        };
        let table = format_status(&status, false);
        assert_eq!(watch_frame(&status, false, false, false, true), table);
        assert_eq!(
            watch_frame(&status, false, false, false, false),
            format!("\n{table}")
        );
        for first in [true, false] {
            assert_eq!(
                watch_frame(&status, false, true, false, first),
                format!("\x1b[H\x1b[2J{table}")
            );
            let json = watch_frame(&status, true, first, false, first);
            assert_eq!(json.lines().count(), 1);
            assert_eq!(
                serde_json::from_str::<StatusReport>(json.trim()).unwrap(),
                status
            );
        }
    }

    #[test]
    fn logs_since_keeps_the_newer_entries() {
        let entry = |time: &str| crate::protocol::LogEntry {
            time: time.into(),
            source: "web.0".into(),
            stream: "stdout".into(),
            line: time.into(),
        };
        let mut logs = LogsResult {
            lines: vec![
                entry("2024-01-01T10:00:00.000Z"),
                entry("2024-01-01T11:59:00.000Z"),
                entry("not a time"),
            ],
        };
        let now = humantime::parse_rfc3339("2024-01-01T12:00:00Z").unwrap();
        logs_since(&mut logs, Some(Duration::from_secs(600)), now);
        let kept: Vec<&str> = logs.lines.iter().map(|l| l.line.as_str()).collect();
        assert_eq!(kept, ["2024-01-01T11:59:00.000Z", "not a time"]);
    }

    /// The texts users (and the integration tests) read, unchanged by typing the errors.
    #[test]
    fn client_errors_say_what_they_said() {
        let sock = PathBuf::from("/run/x/control.sock");
        let table = [
            (
                ClientError::NoMaster {
                    socket: sock.clone(),
                },
                "no master is running here (nothing listens on /run/x/control.sock)",
            ),
            (
                ClientError::Connect {
                    socket: sock,
                    source: io::Error::from_raw_os_error(libc::EACCES),
                },
                "cannot connect to /run/x/control.sock: Permission denied (os error 13)",
            ),
            (
                ClientError::ReadConfig {
                    path: PathBuf::from("/etc/p.toml"),
                    source: io::Error::from_raw_os_error(libc::ENOENT),
                },
                "cannot find the master's socket: cannot read /etc/p.toml: \
                 No such file or directory (os error 2)",
            ),
            (
                ClientError::NoAnswer,
                "the master closed the connection without answering",
            ),
            (
                ClientError::Unexpected { what: "status" },
                "unreadable status from the master",
            ),
            (
                ClientError::Refused("no program named web".into()),
                "no program named web",
            ),
        ];
        for (error, text) in table {
            assert_eq!(error.to_string(), text);
        }
    }
}
