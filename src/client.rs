//! The client side of the control socket: finding it, sending one request, reading the
//! answer, and printing it for people (tables) or scripts (`--json`).

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use crate::config;
use crate::protocol::{Answer, LogsResult, Request, Response, StatusReport, WorkerStatus};

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
    #[error("unreadable answer from the master: {0}")]
    Unreadable(#[source] serde_json::Error),
    /// A well-formed answer of the wrong kind for the request (`what`: "status", …).
    #[error("unreadable {what} from the master")]
    Unexpected { what: &'static str },
    /// The master's own refusal ("no program named web").
    #[error("{0}")]
    Refused(String),
}

/// Finds the master's socket, first to last: `--socket`, `-c FILE`'s runtime dir,
/// `$PLUMULE_SOCKET`, the config file found as usual.
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
    let path = config::find_config_path(config_path);
    Ok(runtime_dir_of(&path)?.join("control.sock"))
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
    config::parse("", &folder.join("plumule.toml"))
        .map(|c| c.runtime_dir)
        .map_err(ClientError::Defaults)
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

/// Sends `req` and waits for its answer.
pub fn call(socket: &Path, req: &Request) -> Result<Response, ClientError> {
    let mut answers = Vec::new();
    stream_answers(socket, req, |r| {
        answers.push(r);
        false
    })?;
    answers.pop().ok_or(ClientError::NoAnswer)
}

/// Sends `req`; the master's refusal is an error too.
pub fn ask(socket: &Path, req: &Request) -> Result<Answer, ClientError> {
    match call(socket, req)? {
        Response::Ok(answer) => Ok(answer),
        Response::Error(message) => Err(ClientError::Refused(message)),
    }
}

/// Asks for `status` (of one program, or all).
pub fn status(socket: &Path, program: Option<&str>) -> Result<StatusReport, ClientError> {
    let req = Request::Status {
        program: program.map(str::to_string),
    };
    match ask(socket, &req)? {
        Answer::Status(report) => Ok(report),
        _ => Err(ClientError::Unexpected { what: "status" }),
    }
}

/// Sends `req` and hands every answer line to `on_answer` until it returns false or the
/// master closes the connection (`logs --follow` streams many).
pub fn stream_answers(
    socket: &Path,
    req: &Request,
    mut on_answer: impl FnMut(Response) -> bool,
) -> Result<(), ClientError> {
    let stream = UnixStream::connect(socket).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => ClientError::NoMaster {
            socket: socket.to_path_buf(),
        },
        _ => ClientError::Connect {
            socket: socket.to_path_buf(),
            source,
        },
    })?;
    let mut line = serde_json::to_vec(req).map_err(ClientError::Encode)?;
    line.push(b'\n');
    // A master that refuses us (credentials, too many clients) answers and closes at once:
    // even if the send fails, its answer may be waiting.
    let mut sent = (&stream).write_all(&line);
    let mut reader = BufReader::new(&stream);
    let mut answered = false;
    loop {
        let mut answer = String::new();
        let read = reader.read_line(&mut answer);
        if answer.is_empty() {
            if let Err(e) = sent {
                return Err(ClientError::Send(e));
            }
        }
        sent = Ok(());
        read.map_err(ClientError::Receive)?;
        if answer.is_empty() {
            return if answered {
                Ok(())
            } else {
                Err(ClientError::NoAnswer)
            };
        }
        answered = true;
        let response = serde_json::from_str(&answer).map_err(ClientError::Unreadable)?;
        if !on_answer(response) {
            return Ok(());
        }
    }
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
    req: Request,
    on_ok: impl FnOnce(Answer) -> i32,
) -> i32 {
    let answer = socket_path(socket, config_path).and_then(|s| ask(&s, &req));
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
        Some(s) => crate::format_duration(std::time::Duration::from_secs(s as u64)),
    }
}

fn last_exit(w: &WorkerStatus) -> String {
    match &w.last_exit {
        None => "-".into(),
        Some(crate::protocol::LastExit::Code { code }) => format!("exit {code}"),
        Some(crate::protocol::LastExit::Signal { signal }) => format!("signal {signal}"),
    }
}

/// The status table with its summary line.
pub fn format_status(status: &StatusReport) -> String {
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
            if i == row.len() - 1 {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  ", w = widths[i]));
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
        let text = format_status(&status);
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
