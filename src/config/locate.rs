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

use super::values::unknown_choice;
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
    /// The value when it is a string (for "unsupported when set to X").
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

/// Locates a toml error (a syntax error, or a value that does not fit the schema's types) and
/// rewords serde's message for a person who edits TOML rather than Rust.
pub(super) fn toml_error(error: &toml::de::Error, source: &Source) -> Pending {
    let mut message = error
        .message()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    let Some(span) = error.span() else {
        return Pending {
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
    let mut path = source.key_at(span.start).map(|k| k.path.clone());
    if message.ends_with("expected a borrowed string") {
        // A value written as a dotted-key table (`healthy_after.x = 1`): toml gives such
        // implicit tables no span, so `Spanned` reads the table's first key instead of a span
        // and fails. The located key is that first key; the culprit is its table.
        if let Some(path) = &mut path {
            path.pop();
        }
        message = "invalid type: table, expected a value".to_owned();
    } else if let Some(unknown) = unknown_key(&message) {
        message = unknown;
    } else {
        message = plain_words(&message);
    }
    let key = match path {
        Some(path) => Some(display_path(&path)),
        None => duplicate_key(&message).or_else(|| source.header_at(span.start)),
    };
    Pending {
        span: Some(span),
        key,
        message,
    }
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

/// serde's "unknown field `x`, expected one of `a`, `b`" as "unknown key `x`, did you mean …?".
fn unknown_key(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    let end = rest.find('`')?;
    let name = &rest[..end];
    let expected: Vec<&str> = rest[end + 1..].split('`').skip(1).step_by(2).collect();
    Some(if expected.is_empty() {
        format!("unknown key `{name}`")
    } else {
        unknown_choice("key", name, &expected)
    })
}

/// serde's and Rust's type names in TOML words.
fn plain_words(message: &str) -> String {
    let mut out = message
        .replace("invalid type: map", "invalid type: table")
        .replace("expected a map", "expected a table")
        .replace("invalid type: sequence", "invalid type: array")
        .replace("expected a sequence", "expected an array")
        .replace("expected i64", "expected an integer")
        .replace("expected f64", "expected a number");
    // Derived structs expect "struct RawProgram": a table.
    if let Some(i) = out.find("expected struct ") {
        let end = out[i..].find([',', ';']).map_or(out.len(), |e| i + e);
        out.replace_range(i..end, "expected a table");
    }
    out
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
        Node::Str(_) | Node::Other => {}
    }
}

/// Any TOML value, keeping only what locating needs: keys with their spans, and strings.
enum Node {
    Str(String),
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
            fn visit_bool<E>(self, _: bool) -> Result<Node, E> {
                Ok(Node::Other)
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

    #[test]
    fn paths_quote_keys_that_are_not_bare() {
        assert_eq!(
            display_path(&["program", "a.b", "workers"]),
            "program.\"a.b\".workers"
        );
    }
}
