//! Where things are in the file: byte offsets to line and column, and the key that an offset
//! belongs to.
//!
//! toml's errors carry a byte span but not the key they concern, and the typed structs cannot
//! say where a *key* is (only where a value is). So the text is also read into a small
//! generic tree that keeps every key's span; from it we get every key path in the file (to find
//! keys that are set, like the unsupported ones) and the key any offset belongs to.

use std::fmt;
use std::ops::Range;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use toml::Spanned;

use super::Pending;

/// A 1-based line and column (columns count characters, not bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Location {
    pub line: usize,
    pub column: usize,
}

/// One key written in the file, with its full path from the root.
#[derive(Debug, Clone)]
pub(super) struct KeyEntry {
    pub span: Range<usize>,
    pub path: Vec<String>,
    /// The value when it is a string, or a boolean as `true`/`false` (for "unsupported when
    /// set to X").
    pub string_value: Option<String>,
}

/// The text of the file and every key in it.
pub(super) struct Source<'a> {
    text: &'a str,
    /// Sorted by position.
    keys: Vec<KeyEntry>,
}

impl<'a> Source<'a> {
    /// Indexes the keys of `text`. A file that is not valid TOML has no keys; its syntax error
    /// comes from the typed parse.
    pub fn new(text: &'a str) -> Self {
        let mut keys = Vec::new();
        if let Ok(Node::Table(entries)) = toml::from_str::<Node>(text) {
            flatten(&entries, &mut Vec::new(), &mut keys);
        }
        keys.sort_by_key(|k| k.span.start);
        Source { text, keys }
    }

    pub fn keys(&self) -> &[KeyEntry] {
        &self.keys
    }

    pub fn location(&self, offset: usize) -> Location {
        let mut offset = offset.min(self.text.len());
        while !self.text.is_char_boundary(offset) {
            offset -= 1;
        }
        let before = &self.text[..offset];
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        Location {
            line: before.matches('\n').count() + 1,
            column: before[line_start..].chars().count() + 1,
        }
    }

    /// Where the key with this path is written (its first occurrence).
    pub fn key_span(&self, path: &[&str]) -> Option<Range<usize>> {
        self.keys
            .iter()
            .find(|k| k.path.iter().map(String::as_str).eq(path.iter().copied()))
            .map(|k| k.span.clone())
    }

    /// The key an error at `offset` concerns: on a `[table]` header line, the last key of that
    /// header; elsewhere, the last key written at or before `offset` (a value follows its key;
    /// an unknown-key error points at the key itself).
    pub fn key_at(&self, offset: usize) -> Option<&KeyEntry> {
        let line_end = self.text[offset.min(self.text.len())..]
            .find('\n')
            .map_or(self.text.len(), |i| offset + i);
        if self.is_header_at(offset) {
            return self
                .keys
                .iter()
                .rev()
                .find(|k| k.span.start >= offset && k.span.start < line_end);
        }
        self.keys.iter().rev().find(|k| k.span.start <= offset)
    }

    /// The `[header]` or `[[header]]` text when `offset` is the start of a header line.
    pub fn header_at(&self, offset: usize) -> Option<String> {
        if !self.is_header_at(offset) {
            return None;
        }
        let line = self.text[offset..].lines().next().unwrap_or("");
        let inner = line.trim_start_matches('[');
        let end = inner.find(']')?;
        Some(inner[..end].trim().to_owned())
    }

    fn is_header_at(&self, offset: usize) -> bool {
        let Some(rest) = self.text.get(offset..) else {
            return false;
        };
        let line_start = self.text[..offset].rfind('\n').map_or(0, |i| i + 1);
        rest.starts_with('[') && self.text[line_start..offset].trim().is_empty()
    }
}

/// Locates a syntax error of the file (toml's parser stops at the first one, so there is only
/// one to report) and names the key it concerns when it can.
pub(super) fn syntax_error(error: &toml_edit::TomlError, source: &Source) -> Pending {
    let mut message = error
        .message()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    let Some(span) = error.span() else {
        return Pending {
            file: 0,
            span: None,
            key: None,
            message,
        };
    };
    if message.is_empty() {
        // toml says nothing at all about some bytes it refuses (a control character in a
        // comment): name the character, so the line is not a bare location.
        message = match source.text.get(span.start..).and_then(|t| t.chars().next()) {
            Some(c) => format!("unexpected character {:?}", c),
            None => "unexpected end of file".to_owned(),
        };
    }
    let key = match source.key_at(span.start) {
        Some(k) => Some(display_path(&k.path)),
        None => duplicate_key(&message).or_else(|| source.header_at(span.start)),
    };
    Pending {
        file: 0,
        span: Some(span),
        key,
        message,
    }
}

/// A number written with a leading zero (`umask = 022`, `workers = 08`), which TOML refuses
/// as a syntax error ("expected newline") that names neither the key nor the cause.
pub(super) struct LeadingZero {
    /// The problem to report instead, located at the number, naming its key.
    pub problem: Pending,
    /// The zeros that, replaced by spaces, leave a number TOML accepts (`022` → ` 22`), at
    /// the same offsets, so that the rest of the file can be read and checked too.
    pub zeros: Range<usize>,
}

/// The keys whose values are octal strings: a number there was meant as that string.
const OCTAL_KEYS: &[&str] = &["umask", "mode"];

/// Recognises a syntax error at `offset` as a number with a leading zero on that line.
pub(super) fn leading_zero(text: &str, offset: usize) -> Option<LeadingZero> {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[offset..].find('\n').map_or(text.len(), |i| offset + i);
    let line = &text[line_start..line_end];
    let bytes = line.as_bytes();
    // The last number token starting at or before the error that begins with 0 and a digit.
    let start = (0..bytes.len())
        .rev()
        .filter(|&i| line_start + i <= offset)
        .find(|&i| {
            // `0` is ASCII, so `i` is a char boundary once it holds.
            let zero_digit = bytes[i] == b'0' && bytes.get(i + 1).is_some_and(u8::is_ascii_digit);
            let starts_token = i == 0 || !is_number_byte(bytes[i - 1]);
            zero_digit
                && starts_token
                && line[..i]
                    .trim_end()
                    .trim_end_matches(['+', '-'])
                    .trim_end()
                    .ends_with(['=', '[', ','])
        })?;
    let end = (start..bytes.len())
        .find(|&i| !is_number_byte(bytes[i]))
        .unwrap_or(bytes.len());
    let token = &line[start..end];
    let zeros = token
        .bytes()
        .zip(token.bytes().skip(1))
        .take_while(|&(b, next)| b == b'0' && next.is_ascii_digit())
        .count();
    let key = value_key(&line[..start])?;
    let header = text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(['[', ']']).trim().to_owned());
    let name = key.rsplit('.').next().unwrap_or(&key).trim().to_owned();
    let message = if OCTAL_KEYS.contains(&name.as_str()) {
        format!(
            "a number cannot start with 0 in TOML; write the {name} as a string: \
             {name} = \"{token}\""
        )
    } else {
        format!(
            "a number cannot start with 0 in TOML: write {name} = {}",
            &token[zeros..]
        )
    };
    let full_key = match header {
        Some(h) if !h.is_empty() => format!("{h}.{key}"),
        _ => key,
    };
    let at = line_start + start;
    Some(LeadingZero {
        problem: Pending {
            file: 0,
            span: Some(at..line_start + end),
            key: Some(full_key),
            message,
        },
        zeros: at..at + zeros,
    })
}

fn is_number_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'+' | b'-' | b':')
}

/// The key a value is set on, from the text of its line before the value:
/// `umask = ` → `umask`; `backoff = { initial = ` → `backoff.initial`;
/// `codes = [0, ` → `codes`.
fn value_key(before: &str) -> Option<String> {
    let mut parts = Vec::new();
    for segment in before.split('{') {
        if let Some(assignment) = segment.rsplit(',').find(|p| p.contains('=')) {
            let (key, _) = assignment.split_once('=')?;
            parts.push(key.trim().to_owned());
        }
    }
    (!parts.is_empty() && parts.iter().all(|p| !p.is_empty())).then(|| parts.join("."))
}

/// The key of toml's "duplicate key `k` in table `t`" (a syntax error: the file has no key
/// index then).
fn duplicate_key(message: &str) -> Option<String> {
    let rest = &message[message.find("duplicate key `")? + "duplicate key `".len()..];
    let (key, rest) = rest.split_once('`')?;
    match rest
        .strip_prefix(" in table `")
        .and_then(|t| t.split_once('`'))
    {
        Some((table, _)) => Some(format!("{table}.{key}")),
        None => Some(key.to_owned()),
    }
}

/// A dotted key path for messages: bare segments as is, others quoted as TOML would.
pub(super) fn display_path<S: AsRef<str>>(path: &[S]) -> String {
    let mut out = String::new();
    for (i, segment) in path.iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        out.push_str(&display_key(segment.as_ref()));
    }
    out
}

/// One key segment, quoted when it is not a bare TOML key.
pub(super) fn display_key(key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare {
        key.to_owned()
    } else {
        format!("\"{}\"", key.escape_default())
    }
}

fn flatten(entries: &[(Spanned<String>, Node)], prefix: &mut Vec<String>, out: &mut Vec<KeyEntry>) {
    for (key, node) in entries {
        prefix.push(key.get_ref().clone());
        out.push(KeyEntry {
            span: key.span(),
            path: prefix.clone(),
            string_value: match node {
                Node::Str(s) => Some(s.clone()),
                Node::Bool(b) => Some(b.to_string()),
                _ => None,
            },
        });
        flatten_node(node, prefix, out);
        prefix.pop();
    }
}

fn flatten_node(node: &Node, prefix: &mut Vec<String>, out: &mut Vec<KeyEntry>) {
    match node {
        Node::Table(entries) => flatten(entries, prefix, out),
        Node::Array(items) => items.iter().for_each(|n| flatten_node(n, prefix, out)),
        Node::Str(_) | Node::Bool(_) | Node::Other => {}
    }
}

/// Any TOML value, keeping only what locating needs: keys with their spans, strings and
/// booleans.
enum Node {
    Str(String),
    Bool(bool),
    Other,
    Array(Vec<Node>),
    Table(Vec<(Spanned<String>, Node)>),
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct NodeVisitor;
        impl<'de> Visitor<'de> for NodeVisitor {
            type Value = Node;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any TOML value")
            }
            fn visit_bool<E>(self, b: bool) -> Result<Node, E> {
                Ok(Node::Bool(b))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Node, E> {
                Ok(Node::Other)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Node, E> {
                Ok(Node::Other)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Node, E> {
                Ok(Node::Other)
            }
            fn visit_str<E>(self, v: &str) -> Result<Node, E> {
                Ok(Node::Str(v.to_owned()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(Node::Array(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
                let mut entries = Vec::new();
                loop {
                    match map.next_key::<Spanned<String>>() {
                        Ok(Some(key)) => entries.push((key, map.next_value()?)),
                        Ok(None) => break,
                        // toml hands a datetime over as a one-entry map whose key has no
                        // span; it is a leaf for our purposes.
                        Err(_) if entries.is_empty() => return Ok(Node::Other),
                        Err(e) => return Err(e),
                    }
                }
                Ok(Node::Table(entries))
            }
        }
        deserializer.deserialize_any(NodeVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_count_lines_and_characters() {
        let src = Source::new("a = 1\nb = \"é\"\nc = 2\n");
        assert_eq!(src.location(0), Location { line: 1, column: 1 });
        assert_eq!(src.location(6), Location { line: 2, column: 1 });
        // After the two-byte 'é': column counts characters.
        let c = "a = 1\nb = \"é\"\n".len();
        assert_eq!(src.location(c), Location { line: 3, column: 1 });
        assert_eq!(src.location(c - 2), Location { line: 2, column: 7 });
    }

    #[test]
    fn key_at_finds_values_headers_and_datetimes() {
        let text = "[program.web]\ncommand = [\"a\", 5]\nat = 1979-05-27\n[program.web.backoff]\n";
        let src = Source::new(text);
        let five = text.find('5').unwrap();
        assert_eq!(
            src.key_at(five).unwrap().path,
            ["program", "web", "command"]
        );
        let header = text.find("[program.web.backoff]").unwrap();
        assert_eq!(
            src.key_at(header).unwrap().path,
            ["program", "web", "backoff"]
        );
        assert_eq!(
            src.header_at(header).as_deref(),
            Some("program.web.backoff")
        );
        assert!(src.key_span(&["program", "web", "at"]).is_some());
    }

    /// Found by tests/robustness.rs: an offset inside a multi-byte character panicked.
    #[test]
    fn leading_zero_handles_any_offset() {
        let text = "a = \"é\" x\nb = 007 # é\n";
        for offset in 0..=text.len() + 1 {
            let _ = leading_zero(text, offset);
        }
        let b = text.find("007").unwrap();
        let found = leading_zero(text, b + 1).unwrap();
        assert_eq!(found.zeros, b..b + 2);
        assert_eq!(found.problem.key.as_deref(), Some("b"));
        assert_eq!(
            found.problem.message,
            "a number cannot start with 0 in TOML: write b = 7"
        );
        assert!(leading_zero(text, text.find('x').unwrap()).is_none());
    }

    #[test]
    fn paths_quote_keys_that_are_not_bare() {
        assert_eq!(
            display_path(&["program", "a.b", "workers"]),
            "program.\"a.b\".workers"
        );
    }
}
