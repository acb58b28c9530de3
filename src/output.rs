//! Worker output: the building blocks the master uses for what workers print.
//!
//! - [`LineSplitter`] turns bytes read from a non-blocking pipe, in whatever chunks the kernel
//!   hands over, into lines. It never holds more than `max_line` bytes, so a worker that prints
//!   without ever writing a newline cannot make the master grow.
//! - [`format_tagged`] renders a line for the master's own log, so that nothing a worker prints
//!   can pass for a line of the master's or reach the terminal as an escape sequence.
//! - [`RotatingFile`] appends lines to a `stdout = { file = ... }` file and rotates it by size.
//! - [`LogRing`] remembers recent lines for `plumule logs` (worker output and the master's
//!   events about workers, told apart by [`Stream`]), bounded in lines and in bytes.
//!
//! Nothing here assumes UTF-8: lines are byte slices until they are shown to a person.

use std::collections::VecDeque;
use std::fmt::{self, Write as _};
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, IoSlice, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Longest line the master keeps in one piece; longer lines are split (see [`LineSplitter`]).
pub const DEFAULT_MAX_LINE: usize = 16 * 1024;

/// Splits a byte stream into lines.
///
/// A line is emitted without its `\n`, and without a `\r` just before it, so CRLF output reads
/// like LF output. A line longer than `max_line` is emitted in pieces of at most `max_line`
/// bytes; the splitter buffers at most `max_line` bytes between calls.
///
/// A piece is only emitted once a byte beyond it has arrived. That way a line of exactly
/// `max_line` bytes (plus `\r\n`) is one piece, not a full piece followed by an empty one.
#[derive(Debug)]
pub struct LineSplitter {
    max_line: usize,
    /// The start of the current, unfinished line (or of its latest piece). Never longer than
    /// `max_line`.
    buf: Vec<u8>,
    /// Whether pieces of the current line were already emitted: its end must then not add an
    /// empty piece of its own.
    continued: bool,
}

impl LineSplitter {
    /// A splitter that emits pieces of at most `max_line` bytes (at least 1).
    pub fn new(max_line: usize) -> Self {
        LineSplitter {
            max_line: max_line.max(1),
            buf: Vec::new(),
            continued: false,
        }
    }

    /// The longest piece this splitter emits.
    pub fn max_line(&self) -> usize {
        self.max_line
    }

    /// Feeds the next chunk of the stream; `emit` is called once per complete line (or piece of
    /// an over-long line), in order.
    pub fn push(&mut self, mut data: &[u8], mut emit: impl FnMut(&[u8])) {
        while let Some(nl) = data.iter().position(|&b| b == b'\n') {
            let line = &data[..nl];
            data = &data[nl + 1..];
            if self.buf.is_empty() && line.len() <= self.max_line {
                // The common case: a whole line inside one chunk, emitted without a copy.
                end_line(line, &mut self.continued, &mut emit);
            } else {
                self.absorb(line, &mut emit);
                end_line(&self.buf, &mut self.continued, &mut emit);
                self.buf.clear();
            }
        }
        self.absorb(data, &mut emit);
    }

    /// Emits what is left of a last line without a newline, at end of stream. The splitter is
    /// then empty and may be reused.
    pub fn finish(&mut self, mut emit: impl FnMut(&[u8])) {
        if !self.buf.is_empty() {
            end_line(&self.buf, &mut self.continued, &mut emit);
            self.buf.clear();
        }
        self.continued = false;
    }

    /// Adds bytes of an unfinished line, emitting full pieces as the line outgrows `max_line`.
    fn absorb(&mut self, mut seg: &[u8], emit: &mut impl FnMut(&[u8])) {
        while !seg.is_empty() {
            if self.buf.len() == self.max_line {
                // More bytes follow a full piece: the piece is final.
                emit(&self.buf);
                self.buf.clear();
                self.continued = true;
            }
            if self.buf.is_empty() && seg.len() > self.max_line {
                emit(&seg[..self.max_line]);
                self.continued = true;
                seg = &seg[self.max_line..];
                continue;
            }
            let take = (self.max_line - self.buf.len()).min(seg.len());
            self.buf.extend_from_slice(&seg[..take]);
            seg = &seg[take..];
        }
    }
}

impl Default for LineSplitter {
    fn default() -> Self {
        LineSplitter::new(DEFAULT_MAX_LINE)
    }
}

/// Emits the last piece of a line, without a trailing `\r`, and resets `continued`.
fn end_line(mut last: &[u8], continued: &mut bool, emit: &mut impl FnMut(&[u8])) {
    if let Some(rest) = last.strip_suffix(b"\r") {
        last = rest;
    }
    // An over-long line whose pieces ended exactly at the newline (or at its `\r`) has nothing
    // left to say; an empty line on its own is still a line.
    if !(last.is_empty() && *continued) {
        emit(last);
    }
    *continued = false;
}

/// The line the master prints on its own stderr for a worker with `stdout`/`stderr = "log"`:
/// `web.2: <line>`.
///
/// Invalid UTF-8 becomes U+FFFD. Control characters other than tab are escaped (`\x1b`,
/// `\u{9b}`), as are the Unicode line separators and bidirectional overrides, so a worker can
/// neither start a line that looks like one of the master's own nor send escape sequences to
/// the operator's terminal. Backslashes are left alone: escaping them would mangle ordinary
/// output (JSON, paths) to guard against nothing, since the text stays after the worker's tag.
pub fn format_tagged(source: &str, line: &[u8]) -> String {
    let text = String::from_utf8_lossy(line);
    let mut out = String::with_capacity(source.len() + 2 + text.len());
    out.push_str(source);
    out.push_str(": ");
    for c in text.chars() {
        // Writing to a String cannot fail.
        if c != '\t' && (c.is_control() || is_invisible_format(c)) {
            let code = u32::from(c);
            if code < 0x80 {
                let _ = write!(out, "\\x{code:02x}");
            } else {
                let _ = write!(out, "\\u{{{code:x}}}");
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Characters that are not `Cc` controls but still move or reorder what a viewer shows: line
/// and paragraph separators, and the bidirectional embeddings, overrides and isolates.
fn is_invisible_format(c: char) -> bool {
    matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// Why an output file could not be used. Carried inside the [`io::Error`]s that
/// [`RotatingFile`] returns (see [`io::Error::get_ref`]); its message names the file.
#[derive(Debug, thiserror::Error)]
pub enum OutputFileError {
    #[error("cannot create folder {path} for worker output: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("cannot open output file {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot write to output file {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot truncate output file {path}: {source}")]
    Truncate { path: PathBuf, source: io::Error },
    #[error("cannot remove old output file {path}: {source}")]
    Remove { path: PathBuf, source: io::Error },
    #[error("cannot rename output file {from} to {to}: {source}")]
    Rename {
        from: PathBuf,
        to: PathBuf,
        source: io::Error,
    },
}

impl OutputFileError {
    fn source_kind(&self) -> io::ErrorKind {
        match self {
            OutputFileError::CreateDir { source, .. }
            | OutputFileError::Open { source, .. }
            | OutputFileError::Write { source, .. }
            | OutputFileError::Truncate { source, .. }
            | OutputFileError::Remove { source, .. }
            | OutputFileError::Rename { source, .. } => source.kind(),
        }
    }
}

impl From<OutputFileError> for io::Error {
    fn from(err: OutputFileError) -> io::Error {
        io::Error::new(err.source_kind(), err)
    }
}

/// An append-only output file for `stdout`/`stderr = { file = ..., max_size, keep }`, written
/// by the master.
///
/// Rotation happens before a line that would take the file past `max_size` (unless the file is
/// empty, so one long line cannot rotate forever): FILE.`keep` is removed, FILE.k becomes
/// FILE.k+1, FILE becomes FILE.1 (the newest) and a fresh FILE is opened. With `keep = 0` the
/// file is truncated instead.
///
/// The size is read from the file when it is opened, then counted. Keep one `RotatingFile` per
/// path (workers of a program that share a file share the value): two of them would each count
/// their own writes and rotate under each other. Each line goes out in one `writev` on an
/// `O_APPEND` descriptor, so lines from other writers do not cut into it.
#[derive(Debug)]
pub struct RotatingFile {
    path: PathBuf,
    file: File,
    size: u64,
    max_size: Option<u64>,
    keep: u32,
    /// Size past which the next write rotates: `max_size`, or further away after a failed
    /// rotation, so that a folder we cannot rename in costs one warning per `max_size` bytes
    /// rather than one per line.
    rotate_at: Option<u64>,
}

impl RotatingFile {
    /// Opens (creating it and its missing parent folders, 0755) `path` for appending, mode 0644.
    pub fn open(path: &Path, max_size: Option<u64>, keep: u32) -> io::Result<Self> {
        let (file, size) = open_append(path)?;
        Ok(RotatingFile {
            path: path.to_path_buf(),
            file,
            size,
            max_size,
            keep,
            rotate_at: max_size,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How many bytes the current file holds, as far as this writer knows.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Appends `line` and a `\n`, rotating first if the file would outgrow `max_size`.
    ///
    /// A failed rotation is logged as a warning and the line is written to the current file all
    /// the same: losing output would be worse than a file that outgrows its limit. An `Err`
    /// means the line was not (completely) written.
    pub fn write_line(&mut self, line: &[u8]) -> io::Result<()> {
        let len = line.len() as u64 + 1;
        if let (Some(limit), Some(max_size)) = (self.rotate_at, self.max_size) {
            if self.size > 0 && self.size.saturating_add(len) > limit {
                match self.rotate() {
                    Ok(()) => self.rotate_at = Some(max_size),
                    Err(err) => {
                        log::warn!("{err}; writing on without rotating");
                        self.rotate_at = Some(self.size.saturating_add(max_size));
                    }
                }
            }
        }
        match write_two(&mut self.file, line, b"\n") {
            Ok(()) => {
                self.size += len;
                Ok(())
            }
            Err(source) => {
                // Part of the line may have gone out: count what the file really holds.
                if let Ok(meta) = self.file.metadata() {
                    self.size = meta.len();
                }
                Err(OutputFileError::Write {
                    path: self.path.clone(),
                    source,
                }
                .into())
            }
        }
    }

    /// Opens the path again, for SIGUSR1 after logrotate moved the file away. On failure the
    /// old descriptor stays in use.
    pub fn reopen(&mut self) -> io::Result<()> {
        let (file, size) = open_append(&self.path)?;
        self.file = file;
        self.size = size;
        self.rotate_at = self.max_size;
        Ok(())
    }

    fn rotate(&mut self) -> Result<(), OutputFileError> {
        if self.keep == 0 {
            self.file
                .set_len(0)
                .map_err(|source| OutputFileError::Truncate {
                    path: self.path.clone(),
                    source,
                })?;
            self.size = 0;
            return Ok(());
        }
        let oldest = numbered(&self.path, self.keep);
        match fs::remove_file(&oldest) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(OutputFileError::Remove {
                    path: oldest,
                    source,
                })
            }
        }
        for k in (1..self.keep).rev() {
            rename_if_present(&numbered(&self.path, k), &numbered(&self.path, k + 1))?;
        }
        // FILE may be gone (moved away by logrotate before a reopen): then there is nothing to
        // shift, and the fresh file below is all that is needed.
        rename_if_present(&self.path, &numbered(&self.path, 1))?;
        let (file, size) = open_append(&self.path)?;
        self.file = file;
        self.size = size;
        Ok(())
    }
}

/// `FILE.k`.
fn numbered(path: &Path, k: u32) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(format!(".{k}"));
    PathBuf::from(name)
}

fn rename_if_present(from: &Path, to: &Path) -> Result<(), OutputFileError> {
    match fs::rename(from, to) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(OutputFileError::Rename {
            from: from.to_path_buf(),
            to: to.to_path_buf(),
            source,
        }),
    }
}

/// Opens `path` for appending, creating it and its folders; returns the file and its size.
fn open_append(path: &Path) -> Result<(File, u64), OutputFileError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .map_err(|source| OutputFileError::CreateDir {
                path: parent.to_path_buf(),
                source,
            })?;
    }
    let open_err = |source| OutputFileError::Open {
        path: path.to_path_buf(),
        source,
    };
    let file = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o644)
        // std sets it already; spelled out because a worker must never inherit this fd.
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(open_err)?;
    let size = file.metadata().map_err(open_err)?.len();
    Ok((file, size))
}

/// Writes `a` then `b`, in one `writev` when the kernel takes it all (it does for regular files
/// short of a full disk).
fn write_two(file: &mut File, a: &[u8], b: &[u8]) -> io::Result<()> {
    let written = loop {
        match file.write_vectored(&[IoSlice::new(a), IoSlice::new(b)]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    };
    if written < a.len() {
        file.write_all(&a[written..])?;
        file.write_all(b)
    } else {
        file.write_all(&b[written - a.len()..])
    }
}

/// Where a kept line about a worker came from: one of its output streams, or the master.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stream {
    Stdout,
    Stderr,
    /// Not a pipe: an event the master recorded about the worker (started, exited,
    /// restarting, stopped), so that `plumule logs` shows it among the worker's output.
    Plumule,
}

impl Stream {
    /// `"stdout"`, `"stderr"` or `"plumule"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
            Stream::Plumule => "plumule",
        }
    }
}

impl fmt::Display for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One line of worker output, or one event about the worker, as kept by [`LogRing`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// When the master read it.
    pub time: SystemTime,
    /// The worker, as `PROGRAM.ID` (`web.2`).
    pub source: String,
    pub stream: Stream,
    /// Without its newline; not necessarily UTF-8.
    pub line: Vec<u8>,
}

impl LogLine {
    /// Whether this line belongs to `filter`: a program (`web`, every worker of it) or one
    /// worker (`web.2`). `web` matches neither `webapp.0` nor `web2.0`.
    pub fn matches(&self, filter: &str) -> bool {
        source_matches(&self.source, filter)
    }

    /// What the line costs against [`LogRing`]'s byte bound.
    fn cost(&self) -> usize {
        self.source.len() + self.line.len()
    }
}

fn source_matches(source: &str, filter: &str) -> bool {
    if filter.contains('.') {
        source == filter
    } else {
        // Program names have no dots (SPEC §9), so the program is what precedes the first one.
        source
            .split_once('.')
            .map_or(source, |(program, _)| program)
            == filter
    }
}

/// Recent worker output and the master's events about workers, kept in memory for
/// `plumule logs`, oldest first.
///
/// Bounded twice: at most `max_lines` lines, and at most `max_bytes` bytes of sources plus
/// lines; the oldest lines go first when either bound is crossed. A single line that would not
/// fit in `max_bytes` on its own is cut to fit.
#[derive(Debug)]
pub struct LogRing {
    lines: VecDeque<LogLine>,
    max_lines: usize,
    max_bytes: usize,
    /// Sum of [`LogLine::cost`] over `lines`.
    bytes: usize,
    /// Lines ever kept: the sequence number of the next one.
    pushed: u64,
}

impl LogRing {
    pub fn new(max_lines: usize, max_bytes: usize) -> Self {
        LogRing {
            lines: VecDeque::new(),
            max_lines,
            max_bytes,
            bytes: 0,
            pushed: 0,
        }
    }

    /// The sequence number the next line will get; lines are numbered from 0 as pushed.
    pub fn next_seq(&self) -> u64 {
        self.pushed
    }

    /// The lines numbered `seq` and later that are still kept, oldest first.
    pub fn since(&self, seq: u64) -> impl Iterator<Item = &LogLine> {
        let first = self.pushed - self.lines.len() as u64;
        let skip = seq.saturating_sub(first).min(self.lines.len() as u64) as usize;
        self.lines.iter().skip(skip)
    }

    /// Keeps `line`, stamped with the current time.
    pub fn push(&mut self, source: &str, stream: Stream, line: &[u8]) {
        self.push_at(SystemTime::now(), source, stream, line);
    }

    /// Keeps `line` with the given time stamp.
    pub fn push_at(&mut self, time: SystemTime, source: &str, stream: Stream, line: &[u8]) {
        if self.max_lines == 0 || source.len() > self.max_bytes {
            return;
        }
        let room = self.max_bytes - source.len();
        let entry = LogLine {
            time,
            source: source.to_owned(),
            stream,
            line: line[..line.len().min(room)].to_vec(),
        };
        self.bytes += entry.cost();
        self.pushed += 1;
        self.lines.push_back(entry);
        while self.lines.len() > self.max_lines || self.bytes > self.max_bytes {
            let Some(old) = self.lines.pop_front() else {
                break;
            };
            self.bytes -= old.cost();
        }
    }

    /// The last `n` lines that match `filter` (see [`LogLine::matches`]; `None` matches all),
    /// oldest first.
    pub fn tail<'a>(
        &'a self,
        n: usize,
        filter: Option<&'a str>,
    ) -> impl Iterator<Item = &'a LogLine> + 'a {
        let wanted = move |l: &LogLine| filter.is_none_or(|f| l.matches(f));
        // Walk back to the n-th match from the end, then forward from there: no allocation.
        let mut start = self.lines.len();
        let mut found = 0;
        for (i, l) in self.lines.iter().enumerate().rev() {
            if found == n {
                break;
            }
            if wanted(l) {
                found += 1;
                start = i;
            }
        }
        self.lines.range(start..).filter(move |l| wanted(l))
    }

    /// How many lines are kept.
    pub fn len(&self) -> usize {
        self.lines.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    /// How many bytes of sources and lines are kept.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split_chunks(max_line: usize, chunks: &[&[u8]], finish: bool) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut s = LineSplitter::new(max_line);
        for chunk in chunks {
            s.push(chunk, |l| out.push(l.to_vec()));
            assert!(s.buf.len() <= max_line, "buffered more than max_line");
        }
        if finish {
            s.finish(|l| out.push(l.to_vec()));
        }
        out
    }

    fn lines(v: &[&str]) -> Vec<Vec<u8>> {
        v.iter().map(|s| s.as_bytes().to_vec()).collect()
    }

    #[test]
    fn splits_across_chunk_boundaries() {
        let got = split_chunks(64, &[b"hel", b"lo\nwor", b"ld\n", b"\n", b"a\nb"], false);
        assert_eq!(got, lines(&["hello", "world", "", "a"]));
    }

    #[test]
    fn every_split_point_gives_the_same_lines() {
        let input: &[u8] = b"one\r\ntwo\n\nthree\r\n\r\nfour";
        let expected = lines(&["one", "two", "", "three", "", "four"]);
        for cut in 0..=input.len() {
            let (a, b) = input.split_at(cut);
            assert_eq!(split_chunks(64, &[a, b], true), expected, "cut at {cut}");
        }
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(split_chunks(64, &bytes, true), expected);
    }

    #[test]
    fn strips_crlf_even_when_split() {
        assert_eq!(
            split_chunks(64, &[b"a\r", b"\nb\r\n"], false),
            lines(&["a", "b"])
        );
        // A lone `\r` inside a line is kept: only the line ending is stripped.
        assert_eq!(split_chunks(64, &[b"a\rb\n"], false), lines(&["a\rb"]));
    }

    #[test]
    fn empty_lines_are_lines() {
        assert_eq!(
            split_chunks(64, &[b"\n\n\r\n"], false),
            lines(&["", "", ""])
        );
    }

    #[test]
    fn huge_line_without_newline_comes_out_in_bounded_pieces() {
        let max = DEFAULT_MAX_LINE;
        let data = vec![b'x'; 100 * 1024];
        // One big chunk, then many small ones: the same pieces either way.
        for chunks in [vec![&data[..]], data.chunks(1000).collect::<Vec<_>>()] {
            let got = split_chunks(max, &chunks, true);
            assert!(got.iter().all(|p| p.len() <= max && !p.is_empty()));
            assert_eq!(got.len(), (100 * 1024usize).div_ceil(max));
            assert_eq!(got.concat(), data);
        }
    }

    #[test]
    fn pieces_end_where_the_line_ends() {
        // Exactly max_line, then the newline: one piece, no empty tail.
        assert_eq!(split_chunks(4, &[b"abcd\n"], false), lines(&["abcd"]));
        assert_eq!(split_chunks(4, &[b"abcd", b"\n"], false), lines(&["abcd"]));
        assert_eq!(split_chunks(4, &[b"abcd\r\n"], false), lines(&["abcd"]));
        assert_eq!(
            split_chunks(4, &[b"abcdefgh\n"], false),
            lines(&["abcd", "efgh"])
        );
        assert_eq!(
            split_chunks(4, &[b"abcdefghi\nj\n"], false),
            lines(&["abcd", "efgh", "i", "j"])
        );
        assert_eq!(
            split_chunks(4, &[b"ab", b"cdefg", b"h\n"], false),
            lines(&["abcd", "efgh"])
        );
    }

    #[test]
    fn finish_emits_a_partial_line_once() {
        assert_eq!(
            split_chunks(64, &[b"done\npartial"], true),
            lines(&["done", "partial"])
        );
        assert_eq!(split_chunks(64, &[b"done\n"], true), lines(&["done"]));
        assert_eq!(split_chunks(64, &[], true), lines(&[]));

        let mut s = LineSplitter::new(64);
        let mut out = Vec::new();
        s.push(b"tail", |l| out.push(l.to_vec()));
        assert!(out.is_empty(), "a partial line waits for its newline");
        s.finish(|l| out.push(l.to_vec()));
        s.finish(|l| out.push(l.to_vec()));
        assert_eq!(out, lines(&["tail"]));
    }

    #[test]
    fn bytes_need_not_be_utf8() {
        let got = split_chunks(64, &[b"\xff\xfe\x00\n"], false);
        assert_eq!(got, vec![b"\xff\xfe\x00".to_vec()]);
    }

    #[test]
    fn tagging_escapes_controls_but_keeps_tabs() {
        assert_eq!(
            format_tagged("web.2", b"hello\tworld"),
            "web.2: hello\tworld"
        );
        assert_eq!(
            format_tagged("web.2", b"\x1b[31mred\x1b[0m"),
            "web.2: \\x1b[31mred\\x1b[0m"
        );
        // A worker cannot end the line and forge one of the master's own.
        assert_eq!(
            format_tagged("web.0", b"ok\rERROR plumule: boom\x7f"),
            "web.0: ok\\x0dERROR plumule: boom\\x7f"
        );
        assert_eq!(format_tagged("web.0", b"a\nb"), "web.0: a\\x0ab");
        assert_eq!(
            format_tagged("web.0", "a\u{9b}b\u{202e}c".as_bytes()),
            "web.0: a\\u{9b}b\\u{202e}c"
        );
    }

    #[test]
    fn tagging_replaces_invalid_utf8() {
        assert_eq!(
            format_tagged("db.0", b"caf\xc3\xa9 \xff"),
            "db.0: caf\u{e9} \u{fffd}"
        );
        assert_eq!(format_tagged("db.0", b""), "db.0: ");
    }

    mod rotating {
        use super::super::*;
        use std::os::unix::fs::PermissionsExt;
        use std::os::unix::io::AsRawFd;

        fn read(path: &Path) -> String {
            fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        }

        #[test]
        fn rotation_keeps_numbered_files_newest_first() {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("web.log");
            // Lines are 6 bytes with their newline: two fit in 12 bytes.
            let mut f = RotatingFile::open(&path, Some(12), 3).unwrap();
            for i in 0..10 {
                f.write_line(format!("line{i}").as_bytes()).unwrap();
                assert!(
                    !numbered(&path, 4).exists(),
                    "FILE.4 appeared after line {i}"
                );
            }
            assert_eq!(read(&path), "line8\nline9\n");
            assert_eq!(read(&numbered(&path, 1)), "line6\nline7\n");
            assert_eq!(read(&numbered(&path, 2)), "line4\nline5\n");
            assert_eq!(read(&numbered(&path, 3)), "line2\nline3\n");
            assert_eq!(f.size(), 12);
            let mut names: Vec<_> = fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            names.sort();
            assert_eq!(names, ["web.log", "web.log.1", "web.log.2", "web.log.3"]);
        }

        #[test]
        fn keep_zero_truncates() {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("out");
            let mut f = RotatingFile::open(&path, Some(12), 0).unwrap();
            for i in 0..5 {
                f.write_line(format!("line{i}").as_bytes()).unwrap();
            }
            assert_eq!(read(&path), "line4\n");
            assert!(!numbered(&path, 1).exists());
        }

        #[test]
        fn no_max_size_never_rotates() {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("out");
            let mut f = RotatingFile::open(&path, None, 3).unwrap();
            for _ in 0..100 {
                f.write_line(b"0123456789").unwrap();
            }
            assert_eq!(fs::metadata(&path).unwrap().len(), 1100);
            assert!(!numbered(&path, 1).exists());
        }

        #[test]
        fn size_is_read_at_open_and_a_long_line_goes_whole() {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("out");
            fs::write(&path, "earlier\n").unwrap();
            let mut f = RotatingFile::open(&path, Some(12), 2).unwrap();
            assert_eq!(f.size(), 8);
            f.write_line(b"next").unwrap(); // 8 + 5 > 12: rotates first
            assert_eq!(read(&numbered(&path, 1)), "earlier\n");
            // Longer than max_size, into an empty-but-for-"next" file: rotates once, then is
            // written whole to the fresh file (it is not rotated again for being alone).
            let long = "x".repeat(40);
            f.write_line(long.as_bytes()).unwrap();
            assert_eq!(read(&path), format!("{long}\n"));
            assert_eq!(read(&numbered(&path, 1)), "next\n");
            assert_eq!(read(&numbered(&path, 2)), "earlier\n");
        }

        #[test]
        fn reopen_follows_the_path_after_a_rename() {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("out");
            let moved = dir.path().join("out.moved");
            let mut f = RotatingFile::open(&path, Some(1000), 3).unwrap();
            f.write_line(b"a").unwrap();
            fs::rename(&path, &moved).unwrap();
            f.write_line(b"b").unwrap(); // still the old file, as with logrotate before SIGUSR1
            f.reopen().unwrap();
            assert_eq!(f.size(), 0);
            f.write_line(b"c").unwrap();
            assert_eq!(read(&moved), "a\nb\n");
            assert_eq!(read(&path), "c\n");
        }

        #[test]
        fn missing_parent_folders_are_created() {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("logs/web/out.log");
            let mut f = RotatingFile::open(&path, None, 0).unwrap();
            f.write_line(b"hi").unwrap();
            assert_eq!(read(&path), "hi\n");
            assert!(dir.path().join("logs/web").is_dir());
            // Both modes are asked for; the umask can only take bits away.
            let dir_mode = fs::metadata(dir.path().join("logs"))
                .unwrap()
                .permissions()
                .mode();
            let file_mode = fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(dir_mode & !0o755 & 0o777, 0);
            assert_eq!(file_mode & !0o644 & 0o777, 0);
            let fd_flags =
                nix::fcntl::fcntl(f.file.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFD).unwrap();
            assert_ne!(fd_flags & libc::FD_CLOEXEC, 0);
        }

        #[test]
        fn errors_name_the_file() {
            let dir = tempfile::tempdir().unwrap();
            let blocker = dir.path().join("plain-file");
            fs::write(&blocker, "").unwrap();
            let path = blocker.join("out.log");
            let err = RotatingFile::open(&path, None, 0).unwrap_err();
            assert!(
                err.to_string().contains(&*blocker.to_string_lossy()),
                "{err}"
            );
            let inner = err.get_ref().unwrap().downcast_ref::<OutputFileError>();
            assert!(
                matches!(inner, Some(OutputFileError::CreateDir { .. })),
                "{inner:?}"
            );
        }

        #[test]
        fn a_failed_rotation_loses_no_line_and_is_retried_later() {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("out");
            // FILE.1 is a non-empty folder: removing it (keep = 1) fails.
            fs::create_dir(numbered(&path, 1)).unwrap();
            fs::write(numbered(&path, 1).join("x"), "").unwrap();
            let mut f = RotatingFile::open(&path, Some(12), 1).unwrap();
            for i in 0..4 {
                f.write_line(format!("line{i}").as_bytes()).unwrap();
            }
            assert_eq!(read(&path), "line0\nline1\nline2\nline3\n");
            fs::remove_dir_all(numbered(&path, 1)).unwrap();
            // The failure at 12 bytes pushed the next attempt to 24.
            f.write_line(b"line4").unwrap();
            assert_eq!(read(&path), "line4\n");
            assert_eq!(read(&numbered(&path, 1)), "line0\nline1\nline2\nline3\n");
            f.write_line(b"line5").unwrap();
            f.write_line(b"line6").unwrap(); // back to the normal limit
            assert_eq!(read(&path), "line6\n");
        }
    }

    mod ring {
        use super::super::*;
        use std::time::Duration;

        fn texts<'a>(it: impl Iterator<Item = &'a LogLine>) -> Vec<String> {
            it.map(|l| format!("{} {}", l.source, String::from_utf8_lossy(&l.line)))
                .collect()
        }

        #[test]
        fn evicts_oldest_past_max_lines() {
            let mut ring = LogRing::new(3, 1 << 20);
            for i in 0..5 {
                ring.push("web.0", Stream::Stdout, format!("l{i}").as_bytes());
            }
            assert_eq!(ring.len(), 3);
            assert_eq!(
                texts(ring.tail(10, None)),
                ["web.0 l2", "web.0 l3", "web.0 l4"]
            );
            assert_eq!(ring.bytes(), 3 * (5 + 2));
        }

        #[test]
        fn evicts_oldest_past_max_bytes() {
            // Each entry costs 5 (source) + 5 (line) = 10 bytes.
            let mut ring = LogRing::new(100, 25);
            ring.push("web.0", Stream::Stdout, b"aaaaa");
            ring.push("web.1", Stream::Stderr, b"bbbbb");
            assert_eq!(ring.len(), 2);
            ring.push("web.0", Stream::Stdout, b"ccccc");
            assert_eq!(texts(ring.tail(10, None)), ["web.1 bbbbb", "web.0 ccccc"]);
            assert_eq!(ring.bytes(), 20);
            // One big line pushes out everything before it, and is cut to the bound itself.
            ring.push("web.2", Stream::Stdout, &[b'x'; 100]);
            assert_eq!(ring.len(), 1);
            assert_eq!(ring.bytes(), 25);
            assert_eq!(ring.tail(1, None).next().unwrap().line.len(), 20);
        }

        #[test]
        fn zero_bounds_keep_nothing() {
            let mut ring = LogRing::new(0, 100);
            ring.push("web.0", Stream::Stdout, b"x");
            assert!(ring.is_empty());
            let mut ring = LogRing::new(10, 3);
            ring.push("web.0", Stream::Stdout, b"x");
            assert!(ring.is_empty());
            assert_eq!(ring.tail(5, None).count(), 0);
        }

        #[test]
        fn filters_by_program_or_worker() {
            let mut ring = LogRing::new(100, 1 << 20);
            for (source, line) in [
                ("web.0", "a"),
                ("webapp.0", "b"),
                ("web.2", "c"),
                ("web2.0", "d"),
                ("web.0", "e"),
                ("db.0", "f"),
            ] {
                ring.push(source, Stream::Stdout, line.as_bytes());
            }
            assert_eq!(
                texts(ring.tail(10, Some("web"))),
                ["web.0 a", "web.2 c", "web.0 e"]
            );
            assert_eq!(texts(ring.tail(10, Some("web.0"))), ["web.0 a", "web.0 e"]);
            assert_eq!(texts(ring.tail(10, Some("webapp"))), ["webapp.0 b"]);
            assert_eq!(ring.tail(10, Some("web.1")).count(), 0);
            assert_eq!(ring.tail(10, Some("we")).count(), 0);
        }

        #[test]
        fn tail_takes_the_last_n_matches_oldest_first() {
            let mut ring = LogRing::new(100, 1 << 20);
            for i in 0..6 {
                let source = if i % 2 == 0 { "web.0" } else { "db.0" };
                ring.push(source, Stream::Stdout, format!("{i}").as_bytes());
            }
            assert_eq!(texts(ring.tail(2, None)), ["web.0 4", "db.0 5"]);
            assert_eq!(texts(ring.tail(2, Some("web"))), ["web.0 2", "web.0 4"]);
            assert_eq!(ring.tail(0, None).count(), 0);
            assert_eq!(ring.tail(100, Some("db")).count(), 3);
        }

        #[test]
        fn lines_keep_time_and_stream() {
            let mut ring = LogRing::new(10, 1000);
            let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
            ring.push_at(t, "web.1", Stream::Stderr, b"\xffoops");
            let before = SystemTime::now();
            ring.push("web.1", Stream::Stdout, b"later");
            let lines: Vec<_> = ring.tail(2, None).collect();
            assert_eq!(
                *lines[0],
                LogLine {
                    time: t,
                    source: "web.1".into(),
                    stream: Stream::Stderr,
                    line: b"\xffoops".to_vec(),
                }
            );
            assert!(lines[1].time >= before);
            assert_eq!(lines[1].stream.to_string(), "stdout");
        }
    }

    #[test]
    fn since_follows_sequence_numbers_across_eviction() {
        let mut ring = LogRing::new(3, 1 << 20);
        assert_eq!(ring.next_seq(), 0);
        for i in 0..5u8 {
            ring.push("web.0", Stream::Stdout, &[b'a' + i]);
        }
        assert_eq!(ring.next_seq(), 5);
        let got: Vec<&[u8]> = ring.since(0).map(|l| l.line.as_slice()).collect();
        assert_eq!(got, vec![b"c", b"d", b"e"], "evicted lines are skipped");
        let got: Vec<&[u8]> = ring.since(4).map(|l| l.line.as_slice()).collect();
        assert_eq!(got, vec![b"e"]);
        assert_eq!(ring.since(5).count(), 0);
    }
}
