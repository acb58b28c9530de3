//! What must hold for *any* input to the parsers that face untrusted bytes (SPEC §7: bad input
//! of every kind gets a clear error and never crashes the master).
//!
//! Shared by the deterministic tests in `tests/robustness.rs` and by the libFuzzer targets in
//! `fuzz/fuzz_targets/` (which include this file by path), so both check exactly the same
//! properties. Every check panics, naming the input, when a property fails.

#![allow(dead_code)] // each user calls a different part

use std::path::Path;

pub mod targets;

use plumule::config::{self, ConfigError};
use plumule::output::{format_tagged, LineSplitter};
use plumule::protocol::{parse_request, Request, Response, Target};

/// The path configs are parsed as: never read, it only names the file and anchors relative
/// paths.
pub const CONFIG_PATH: &str = "/tmp/fuzz/plumule.toml";

/// A control request line, as the master reads it.
///
/// - parsing never panics;
/// - an error is a non-empty message that the master can send back as exactly one line;
/// - a parsed request serialises back to JSON that parses to the same request;
/// - a target in it is either a `PROGRAM[.ID]` or an error, never a panic.
pub fn check_request(line: &[u8]) -> Option<Request> {
    match parse_request(line) {
        Ok(request) => {
            let text = serde_json::to_string(&request)
                .unwrap_or_else(|e| panic!("{request:?} does not serialise: {e}"));
            assert!(
                !text.contains('\n'),
                "{request:?} serialises to more than one line: {text:?}"
            );
            assert_eq!(
                parse_request(text.as_bytes()).ok().as_ref(),
                Some(&request),
                "{request:?} serialised as {text:?} does not parse back (input {:?})",
                String::from_utf8_lossy(line)
            );
            let target = match &request {
                Request::Start { target }
                | Request::Stop { target }
                | Request::Restart { target } => Some(target.as_str()),
                Request::Logs { target, .. } => target.as_deref(),
                _ => None,
            };
            if let Some(t) = target {
                if let Ok(parsed) = Target::parse(t) {
                    assert!(t.starts_with(&parsed.program), "{t:?} parsed as {parsed:?}");
                }
            }
            Some(request)
        }
        Err(error) => {
            let message = error.to_string();
            assert!(!message.is_empty(), "empty error for {line:?}");
            let reply = Response::error(message).to_line();
            assert_eq!(
                reply.iter().filter(|&&b| b == b'\n').count(),
                1,
                "the error reply to {line:?} is not one line: {:?}",
                String::from_utf8_lossy(&reply)
            );
            assert_eq!(reply.last(), Some(&b'\n'));
            None
        }
    }
}

/// A configuration file's text.
///
/// - parsing never panics;
/// - an error has at least one problem and renders with `Display`, one line per problem;
/// - every problem of a file that is not blank carries a location inside the file (toml's
///   errors and validation's both point at a byte of the text, or at the key concerned).
pub fn check_config(text: &str) -> Result<config::Config, ConfigError> {
    let path = Path::new(CONFIG_PATH);
    let result = config::parse(text, path);
    match &result {
        Ok(config) => {
            assert_eq!(config.path, path);
            assert!(config.runtime_dir.is_absolute(), "{config:?}");
            assert!(config.state_dir.is_absolute(), "{config:?}");
            assert!(config.lock_dir.is_absolute(), "{config:?}");
            assert!(
                config.programs.windows(2).all(|w| w[0].name < w[1].name),
                "programs not sorted by name: {config:?}"
            );
            for p in &config.programs {
                assert!(p.workers <= config::MAX_WORKERS, "{p:?}");
                assert!(!p.name.is_empty() && !p.name.contains('.'), "{p:?}");
            }
        }
        Err(error) => {
            assert!(
                !error.problems.is_empty(),
                "an error without problems for {text:?}"
            );
            let shown = error.to_string();
            assert_eq!(
                shown.lines().count(),
                error.problems.len(),
                "not one line per problem for {text:?}:\n{shown}"
            );
            let lines = text.split('\n').count();
            for problem in &error.problems {
                assert!(!problem.message.is_empty(), "an empty message for {text:?}");
                if text.trim().is_empty() {
                    continue;
                }
                let Some(at) = problem.location else {
                    panic!("problem without a location for {text:?}: {problem:?}");
                };
                assert!(
                    at.line >= 1 && at.line <= lines && at.column >= 1,
                    "location {at:?} outside the {lines} line(s) of {text:?}"
                );
            }
        }
    }
    result
}

/// What [`LineSplitter`] must emit for `stream`: every line (and a last unfinished one) with one
/// trailing `\r` removed, cut into pieces of at most `max_line` bytes; a line with nothing left
/// is one empty piece.
pub fn expected_pieces(stream: &[u8], max_line: usize) -> Vec<Vec<u8>> {
    let mut lines: Vec<&[u8]> = stream.split(|&b| b == b'\n').collect();
    // After the last newline: an unfinished line, emitted at the end only when non-empty.
    if lines.last().is_some_and(|l| l.is_empty()) {
        lines.pop();
    }
    let mut out = Vec::new();
    for line in lines {
        let core = line.strip_suffix(b"\r").unwrap_or(line);
        if core.is_empty() {
            out.push(Vec::new());
        } else {
            out.extend(core.chunks(max_line).map(<[u8]>::to_vec));
        }
    }
    out
}

/// Feeds `stream` to a splitter of `max_line` in chunks of the given sizes (the last chunk takes
/// what is left), then finishes it, and checks the pieces against [`expected_pieces`]: nothing
/// lost, nothing added, no piece longer than `max_line`, whatever the chunking. Each piece also
/// goes through [`format_tagged`], which must leave no control character but tab. The splitter
/// is then reused for the same stream in one chunk, which must give the same pieces.
pub fn check_splitter(stream: &[u8], max_line: usize, chunk_sizes: &[usize]) {
    let mut splitter = LineSplitter::new(max_line);
    let max_line = splitter.max_line();
    let mut pieces: Vec<Vec<u8>> = Vec::new();
    let mut rest = stream;
    for &size in chunk_sizes {
        let (chunk, tail) = rest.split_at(size.min(rest.len()));
        splitter.push(chunk, |p| pieces.push(p.to_vec()));
        rest = tail;
    }
    splitter.push(rest, |p| pieces.push(p.to_vec()));
    splitter.finish(|p| pieces.push(p.to_vec()));

    for piece in &pieces {
        assert!(
            piece.len() <= max_line,
            "a piece of {} bytes > max {max_line} from {stream:?}",
            piece.len()
        );
        assert!(
            !piece.contains(&b'\n'),
            "a piece holds a newline: {piece:?}"
        );
        let shown = format_tagged("p.0", piece);
        assert!(
            !shown
                .chars()
                .any(|c| c != '\t' && (c.is_control() || matches!(c, '\u{2028}' | '\u{2029}'))),
            "format_tagged lets a control character through: {shown:?}"
        );
    }
    let expected = expected_pieces(stream, max_line);
    assert_eq!(
        pieces, expected,
        "max_line {max_line}, chunks {chunk_sizes:?}, stream {stream:?}"
    );

    let mut again = Vec::new();
    splitter.push(stream, |p| again.push(p.to_vec()));
    splitter.finish(|p| again.push(p.to_vec()));
    assert_eq!(
        again, expected,
        "a reused splitter differs, stream {stream:?}"
    );
}
