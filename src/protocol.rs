//! The control protocol between `plumule` client commands and the master, over the Unix
//! stream socket `runtime_dir/control.sock`: one JSON object per line each way, one request
//! and one response per line, any number of requests per connection.
//!
//! ```text
//! → {"cmd":"status","program":"web"}
//! ← {"ok":true,"result":{"programs":[…]}}
//! → {"cmd":"scale","program":"web","workers":8}
//! ← {"ok":false,"error":"no program named web"}
//! ```
//!
//! A response comes once the action is done (SPEC §9): `stop` when the workers have exited,
//! `start`/`restart` when the new workers run, `scale` when the count is reached, `reload`
//! when the new plan is applied, rolling restarts included.

use serde::{Deserialize, Serialize};

/// Longest request line the master reads; longer ones get an error and the connection closes.
pub const MAX_REQUEST: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Status {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        program: Option<String>,
    },
    Reload,
    Start {
        target: String,
    },
    Stop {
        target: String,
    },
    Restart {
        target: String,
    },
    Scale {
        program: String,
        workers: u32,
    },
    /// Recent worker output; with `follow`, the connection then receives every new line.
    Logs {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        target: Option<String>,
        #[serde(default = "default_log_lines")]
        lines: usize,
        #[serde(default)]
        follow: bool,
    },
}

fn default_log_lines() -> usize {
    50
}

/// One line of worker output, as `logs` sends it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    /// `PROGRAM.ID`.
    pub source: String,
    /// `stdout` or `stderr`.
    pub stream: String,
    /// The line, invalid UTF-8 replaced.
    pub line: String,
}

impl From<&crate::output::LogLine> for LogEntry {
    fn from(l: &crate::output::LogLine) -> Self {
        LogEntry {
            time: humantime::format_rfc3339_millis(l.time).to_string(),
            source: l.source.clone(),
            stream: l.stream.as_str().to_string(),
            line: String::from_utf8_lossy(&l.line).into_owned(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Response {
    pub fn ok(result: impl Serialize) -> Response {
        Response {
            ok: true,
            result: serde_json::to_value(result).ok(),
            error: None,
        }
    }

    pub fn error(message: impl Into<String>) -> Response {
        Response {
            ok: false,
            result: None,
            error: Some(message.into()),
        }
    }

    /// The response as one line, newline included.
    pub fn to_line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self).unwrap_or_else(|_| br#"{"ok":false}"#.to_vec());
        line.push(b'\n');
        line
    }
}

/// Parses one request line; the error is what the client is told.
pub fn parse_request(line: &[u8]) -> Result<Request, String> {
    let text = std::str::from_utf8(line).map_err(|_| "request is not UTF-8".to_string())?;
    serde_json::from_str(text.trim()).map_err(|e| format!("bad request: {e}"))
}

/// `PROGRAM` or `PROGRAM.ID`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub program: String,
    pub id: Option<u32>,
}

impl Target {
    pub fn parse(s: &str) -> Result<Target, String> {
        match s.split_once('.') {
            None => Ok(Target {
                program: s.to_string(),
                id: None,
            }),
            Some((program, id)) => match id.parse() {
                Ok(id) => Ok(Target {
                    program: program.to_string(),
                    id: Some(id),
                }),
                Err(_) => Err(format!(
                    "bad worker id in `{s}`: expected PROGRAM or PROGRAM.ID"
                )),
            },
        }
    }
}

/// `status --json`, exactly as SPEC §9 shapes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub programs: Vec<ProgramStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProgramStatus {
    pub name: String,
    pub workers: Vec<WorkerStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerStatus {
    pub id: u32,
    pub pid: Option<i32>,
    pub state: String,
    pub detail: Option<String>,
    pub uptime_s: Option<f64>,
    pub restarts: u32,
    pub last_exit: Option<LastExit>,
    pub locks: Vec<String>,
    pub in_flight: u32,
    pub status: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LastExit {
    Code { code: i32 },
    Signal { signal: String },
}

impl From<crate::slot::Exit> for LastExit {
    fn from(e: crate::slot::Exit) -> Self {
        match e {
            crate::slot::Exit::Code(code) => LastExit::Code { code },
            crate::slot::Exit::Signal(s) => LastExit::Signal {
                signal: crate::slot::signal_name(s).to_string(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_from_their_documented_lines() {
        let table = [
            (r#"{"cmd":"status"}"#, Request::Status { program: None }),
            (
                r#"{"cmd":"status","program":"web"}"#,
                Request::Status {
                    program: Some("web".into()),
                },
            ),
            (r#"{"cmd":"reload"}"#, Request::Reload),
            (
                r#"{"cmd":"start","target":"web.2"}"#,
                Request::Start {
                    target: "web.2".into(),
                },
            ),
            (
                r#"{"cmd":"stop","target":"web"}"#,
                Request::Stop {
                    target: "web".into(),
                },
            ),
            (
                r#"{"cmd":"restart","target":"web"}"#,
                Request::Restart {
                    target: "web".into(),
                },
            ),
            (
                r#" {"cmd":"scale","program":"web","workers":3}"#,
                Request::Scale {
                    program: "web".into(),
                    workers: 3,
                },
            ),
            (
                r#"{"cmd":"logs"}"#,
                Request::Logs {
                    target: None,
                    lines: 50,
                    follow: false,
                },
            ),
            (
                r#"{"cmd":"logs","target":"web.1","lines":5,"follow":true}"#,
                Request::Logs {
                    target: Some("web.1".into()),
                    lines: 5,
                    follow: true,
                },
            ),
        ];
        for (line, expected) in table {
            assert_eq!(
                parse_request(line.as_bytes()),
                Ok(expected.clone()),
                "{line}"
            );
            let round = serde_json::to_string(&expected).unwrap();
            assert_eq!(parse_request(round.as_bytes()), Ok(expected));
        }
    }

    #[test]
    fn bad_requests_are_errors_not_panics() {
        for line in [
            &b"\xff\xfe"[..],
            b"",
            b"{}",
            b"[]",
            b"null",
            br#"{"cmd":"explode"}"#,
            br#"{"cmd":"scale","program":"web","workers":-1}"#,
            br#"{"cmd":"scale","program":"web","workers":"many"}"#,
            br#"{"cmd":"status","extra":1}"#,
            br#"{"cmd":"start"}"#,
        ] {
            let err = parse_request(line).unwrap_err();
            assert!(!err.is_empty());
        }
    }

    #[test]
    fn targets() {
        assert_eq!(
            Target::parse("web"),
            Ok(Target {
                program: "web".into(),
                id: None
            })
        );
        assert_eq!(
            Target::parse("web.3"),
            Ok(Target {
                program: "web".into(),
                id: Some(3)
            })
        );
        assert!(Target::parse("web.x").is_err());
        assert!(Target::parse("web.-1").is_err());
    }

    #[test]
    fn last_exit_serialises_as_spec_shapes_it() {
        let code: LastExit = crate::slot::Exit::Code(1).into();
        assert_eq!(serde_json::to_string(&code).unwrap(), r#"{"code":1}"#);
        let sig: LastExit = crate::slot::Exit::Signal(nix::sys::signal::Signal::SIGKILL).into();
        assert_eq!(serde_json::to_string(&sig).unwrap(), r#"{"signal":"KILL"}"#);
    }
}
