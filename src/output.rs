//! Worker output: the building blocks the master uses for what workers print.
//!
//! - [`LineSplitter`] turns bytes read from a non-blocking pipe, in whatever chunks the kernel
//!   hands over, into lines. It never holds more than `max_line` bytes, so a worker that prints
//!   without ever writing a newline cannot make the master grow.
//!
//! - [`format_tagged`] renders a line for the master's own log, so that nothing a worker prints
//!   can pass for a line of the master's or reach the terminal as an escape sequence.
//!
//! Nothing here assumes UTF-8: lines are byte slices until they are shown to a person.

use std::fmt::Write as _;

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
}
