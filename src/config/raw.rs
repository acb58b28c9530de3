//! The TOML file exactly as the user wrote it: plain structs whose fields are the snake_case
//! keys of SPEC §2, read from the parsed document by [`read`].
//!
//! Reading never stops at the first problem: an unknown key (with the known key it most
//! likely meant) or a value of the wrong type is recorded, located at the key or value, and
//! left out, and reading goes on with the next key, so that one run reports every problem of
//! the file. Every field is optional, so a missing key is reported by validation. Leaves are
//! [`Spanned`] so that validation can point at the value. Values whose checks need a good
//! message ("found the number 5; write \"5s\"") are read loosely as a [`Scalar`] and judged
//! by validation.

use std::collections::BTreeMap;
use std::ops::Range;

use toml::Spanned;
use toml_edit::{ArrayOfTables, InlineTable, Item, Table as TomlTable, Value};

use super::locate::display_path;
use super::values::{suggest, unknown_choice};
use super::Pending;

#[derive(Debug, Default)]
pub(super) struct RawFile {
    pub plumule: Option<RawPlumule>,
    pub program: Option<BTreeMap<Spanned<String>, RawProgram>>,
    pub queue: Option<BTreeMap<Spanned<String>, RawQueue>>,
    /// File patterns (see `super::include`).
    pub include: Option<Vec<Spanned<String>>>,
}

#[derive(Debug, Default)]
pub(super) struct RawPlumule {
    pub runtime_dir: Option<Spanned<String>>,
    pub state_dir: Option<Spanned<String>>,
    pub lock_dir: Option<Spanned<String>>,
    pub control_group: Option<Spanned<String>>,
    pub metrics: Option<Spanned<String>>,
    pub shutdown_timeout: Option<Spanned<Scalar>>,
    pub log_level: Option<Spanned<String>>,
    pub node: Option<Spanned<String>>,
    /// Spanned at the table, for problems about the whole.
    pub cluster: Option<Spanned<RawCluster>>,
}

/// `cluster = { etcd = [...], lease = "10s" }`.
#[derive(Debug, Default)]
pub(super) struct RawCluster {
    pub etcd: Option<Vec<Spanned<String>>>,
    pub lease: Option<Spanned<Scalar>>,
}

#[derive(Debug, Default)]
pub(super) struct RawProgram {
    pub command: Option<Spanned<RawCommand>>,
    pub workers: Option<Spanned<i64>>,
    pub restart: Option<Spanned<String>>,
    pub success_exit_codes: Option<Vec<Spanned<i64>>>,
    pub healthy_after: Option<Spanned<Scalar>>,
    pub backoff: Option<RawBackoff>,
    pub start_limit: Option<RawStartLimit>,
    pub stop_signal: Option<Spanned<String>>,
    pub stop_timeout: Option<Spanned<Scalar>>,
    pub reload: Option<Spanned<String>>,
    pub reload_signal: Option<Spanned<String>>,
    pub env: Option<BTreeMap<Spanned<String>, Spanned<String>>>,
    pub inherit_env: Option<bool>,
    pub cwd: Option<Spanned<String>>,
    pub user: Option<Spanned<String>>,
    pub group: Option<Spanned<String>>,
    pub umask: Option<Spanned<Scalar>>,
    pub stdout: Option<Spanned<RawOutput>>,
    pub stderr: Option<Spanned<RawOutput>>,
    pub locks: Option<Vec<Spanned<RawLock>>>,
    pub ready: Option<Spanned<String>>,
    pub ready_timeout: Option<Spanned<Scalar>>,
    pub watchdog: Option<Spanned<Scalar>>,
    pub listen: Option<Vec<Spanned<RawListen>>>,
    pub after: Option<Vec<Spanned<String>>>,
    pub queue: Option<Spanned<String>>,
    pub nice: Option<Spanned<i64>>,
    pub oom_score_adj: Option<Spanned<i64>>,
    /// Resource name (known ones only) and value.
    pub limits: Option<Vec<(Spanned<String>, Spanned<Scalar>)>>,
}

/// `backoff` and `retry_backoff`.
#[derive(Debug, Default)]
pub(super) struct RawBackoff {
    pub initial: Option<Spanned<Scalar>>,
    pub max: Option<Spanned<Scalar>>,
    pub multiplier: Option<Spanned<f64>>,
    pub jitter: Option<Spanned<f64>>,
}

#[derive(Debug, Default)]
pub(super) struct RawStartLimit {
    pub burst: Option<Spanned<i64>>,
    pub interval: Option<Spanned<Scalar>>,
}

#[derive(Debug, Default)]
pub(super) struct RawQueue {
    pub durable: Option<bool>,
    pub protocol: Option<Spanned<String>>,
    pub prefetch: Option<Spanned<i64>>,
    pub max_attempts: Option<Spanned<i64>>,
    pub retry_backoff: Option<RawBackoff>,
    pub route: Option<Spanned<String>>,
    pub max_pending: Option<Spanned<i64>>,
    pub max_frame: Option<Spanned<Scalar>>,
    pub job_timeout: Option<Spanned<Scalar>>,
    pub backend: Option<Spanned<String>>,
    pub claim_after: Option<Spanned<Scalar>>,
    pub partitions: Option<Spanned<i64>>,
}

/// A scalar of any TOML type, for values that are strings but deserve a better message than
/// a type error when they are not (durations, sizes, octal modes).
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Scalar {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
}

/// `command`: an argv array, or a string for `/bin/sh -c`.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum RawCommand {
    Argv(Vec<Spanned<String>>),
    Shell(String),
}

/// `stdout` / `stderr`: a mode string or a `{ file = … }` table.
#[derive(Debug)]
pub(super) enum RawOutput {
    Mode(String),
    File(RawOutputFile),
}

#[derive(Debug, Default)]
pub(super) struct RawOutputFile {
    pub file: Option<Spanned<String>>,
    pub max_size: Option<Spanned<Scalar>>,
    pub keep: Option<Spanned<i64>>,
}

/// `locks` entries: a name, or `{ name = …, shared = true }`.
#[derive(Debug)]
pub(super) enum RawLock {
    Name(String),
    Table(RawLockTable),
}

#[derive(Debug, Default)]
pub(super) struct RawLockTable {
    pub name: Option<Spanned<String>>,
    pub shared: Option<bool>,
    pub cluster: Option<bool>,
}

/// `listen` entries: an address, or `{ address = …, name = …, mode = "0660" }`.
#[derive(Debug)]
pub(super) enum RawListen {
    Address(String),
    Table(RawListenTable),
}

#[derive(Debug, Default)]
pub(super) struct RawListenTable {
    pub address: Option<Spanned<String>>,
    pub name: Option<Spanned<String>>,
    pub mode: Option<Spanned<Scalar>>,
}

// ---- Reading the parsed document. ----

const FILE_KEYS: &[&str] = &["plumule", "program", "queue", "include"];
const PLUMULE_KEYS: &[&str] = &[
    "runtime_dir",
    "state_dir",
    "lock_dir",
    "control_group",
    "metrics",
    "shutdown_timeout",
    "log_level",
    "node",
    "cluster",
];
const CLUSTER_KEYS: &[&str] = &["etcd", "lease"];
const PROGRAM_KEYS: &[&str] = &[
    "command",
    "workers",
    "restart",
    "success_exit_codes",
    "healthy_after",
    "backoff",
    "start_limit",
    "stop_signal",
    "stop_timeout",
    "reload",
    "reload_signal",
    "env",
    "inherit_env",
    "cwd",
    "user",
    "group",
    "umask",
    "stdout",
    "stderr",
    "locks",
    "ready",
    "ready_timeout",
    "watchdog",
    "listen",
    "after",
    "queue",
    "nice",
    "oom_score_adj",
    "limits",
];
const BACKOFF_KEYS: &[&str] = &["initial", "max", "multiplier", "jitter"];
const START_LIMIT_KEYS: &[&str] = &["burst", "interval"];
const QUEUE_KEYS: &[&str] = &[
    "durable",
    "protocol",
    "prefetch",
    "max_attempts",
    "retry_backoff",
    "route",
    "max_pending",
    "max_frame",
    "job_timeout",
    "backend",
    "claim_after",
    "partitions",
];
const OUTPUT_FILE_KEYS: &[&str] = &["file", "max_size", "keep"];
const LOCK_KEYS: &[&str] = &["name", "shared", "cluster"];
const LISTEN_KEYS: &[&str] = &["address", "name", "mode"];

/// What the reader found wrong, and the keys validation must not report again.
#[derive(Debug, Default)]
pub(super) struct ReadProblems {
    pub problems: Vec<Pending>,
    /// Dotted paths of the keys reported here (a value of the wrong type is left out, and
    /// validation would call it missing), and of the keys that an unknown key was taken for
    /// (`comand` is reported as a likely `command`; "missing key `command`" would be noise).
    pub reported: Vec<String>,
}

/// Reads the document's root table into a [`RawFile`], recording every unknown key and every
/// value of the wrong type.
pub(super) fn read(root: &TomlTable) -> (RawFile, ReadProblems) {
    let mut reader = Reader::default();
    let file = reader.file(Node::Table(root));
    (file, reader.out)
}

/// One node of the parsed document.
#[derive(Clone, Copy)]
enum Node<'a> {
    /// A `[header]` table, an implicit one (`program` of `[program.web]`), or a dotted-key one.
    Table(&'a TomlTable),
    Inline(&'a InlineTable),
    /// `[[header]]`.
    Tables(&'a ArrayOfTables),
    /// Any value but an inline table.
    Value(&'a Value),
}

/// A key of a table, with where it is written.
struct Entry<'a> {
    name: &'a str,
    span: Option<Range<usize>>,
    node: Node<'a>,
}

impl<'a> Node<'a> {
    fn from_item(item: &'a Item) -> Option<Node<'a>> {
        match item {
            Item::None => None,
            Item::Table(t) => Some(Node::Table(t)),
            Item::ArrayOfTables(a) => Some(Node::Tables(a)),
            Item::Value(v) => Some(Node::from_value(v)),
        }
    }

    fn from_value(value: &'a Value) -> Node<'a> {
        match value {
            Value::InlineTable(t) => Node::Inline(t),
            v => Node::Value(v),
        }
    }

    /// The keys of a table, in file order; `None` when this is not a table.
    fn entries(self) -> Option<Vec<Entry<'a>>> {
        let mut entries: Vec<Entry<'a>> = match self {
            Node::Table(t) => t
                .iter()
                .filter_map(|(name, item)| {
                    Some(Entry {
                        name,
                        span: t.key(name).and_then(|k| k.span()),
                        node: Node::from_item(item)?,
                    })
                })
                .collect(),
            Node::Inline(t) => t
                .iter()
                .map(|(name, value)| Entry {
                    name,
                    span: t.key(name).and_then(|k| k.span()),
                    node: Node::from_value(value),
                })
                .collect(),
            Node::Tables(_) | Node::Value(_) => return None,
        };
        entries.sort_by_key(|e| e.span.as_ref().map(|s| s.start));
        Some(entries)
    }

    /// Where the node is written: a value, an inline table, a `[header]`. An implicit or
    /// dotted table has no place of its own: the first key written in it stands for it.
    fn span(self) -> Option<Range<usize>> {
        match self {
            Node::Table(t) => t
                .span()
                .or_else(|| self.entries()?.into_iter().find_map(|e| e.span)),
            // `{ multiplier.x = 0 }`: a dotted key makes an inline table of its own, unwritten.
            Node::Inline(t) => t
                .span()
                .or_else(|| self.entries()?.into_iter().find_map(|e| e.span)),
            Node::Tables(a) => a
                .span()
                .or_else(|| a.iter().next().and_then(TomlTable::span)),
            Node::Value(v) => v.span(),
        }
    }

    /// The node in serde's words for an unexpected value ("string \"4\"", "integer `5`").
    fn describe(self) -> String {
        match self {
            Node::Table(_) | Node::Inline(_) => "table".to_owned(),
            Node::Tables(_) => "array".to_owned(),
            Node::Value(v) => match v {
                Value::String(s) => format!("string {:?}", s.value()),
                Value::Integer(i) => format!("integer `{}`", i.value()),
                Value::Float(f) => format!("floating point `{:?}`", f.value()),
                Value::Boolean(b) => format!("boolean `{}`", b.value()),
                Value::Datetime(d) => format!("datetime `{}`", d.value()),
                Value::Array(_) => "array".to_owned(),
                Value::InlineTable(_) => "table".to_owned(),
            },
        }
    }

    /// The items of an array (of values or of `[[tables]]`); `None` when this is not one.
    fn items(self) -> Option<Vec<Node<'a>>> {
        match self {
            Node::Value(Value::Array(a)) => Some(a.iter().map(Node::from_value).collect()),
            Node::Tables(a) => Some(a.iter().map(Node::Table).collect()),
            _ => None,
        }
    }
}

/// A table's keys, found by name.
struct Fields<'a> {
    entries: Vec<Entry<'a>>,
}

impl<'a> Fields<'a> {
    fn get(&self, name: &str) -> Option<Node<'a>> {
        self.entries.iter().find(|e| e.name == name).map(|e| e.node)
    }
}

/// A key path, as segments.
type Path = [String];

fn child(key: &Path, segment: &str) -> Vec<String> {
    let mut k = key.to_vec();
    k.push(segment.to_owned());
    k
}

#[derive(Default)]
struct Reader {
    out: ReadProblems,
}

impl Reader {
    fn report(&mut self, span: Option<Range<usize>>, key: &Path, message: String) {
        let key = display_path(key);
        self.out.problems.push(Pending {
            file: 0,
            span,
            key: Some(key.clone()),
            message,
        });
        self.out.reported.push(key);
    }

    /// `node` is not of the type `expected` names.
    fn wrong_type(&mut self, node: Node, key: &Path, expected: &str) {
        let message = match node {
            // `healthy_after.seconds = 5`: the user wrote a dotted key, not a table.
            Node::Table(t) if t.span().is_none() && !expected.ends_with("table") => {
                "invalid type: table, expected a value".to_owned()
            }
            _ => format!("invalid type: {}, expected {expected}", node.describe()),
        };
        self.report(node.span(), key, message);
    }

    /// The keys of the table `node`, after reporting those not in `known`.
    fn fields<'a>(&mut self, node: Node<'a>, key: &Path, known: &[&str]) -> Option<Fields<'a>> {
        let Some(entries) = node.entries() else {
            self.wrong_type(node, key, "a table");
            return None;
        };
        for entry in &entries {
            if known.contains(&entry.name) {
                continue;
            }
            self.report(
                entry.span.clone(),
                &child(key, entry.name),
                unknown_choice("key", entry.name, known),
            );
            // The key it was probably meant as, when that one is not set too.
            if let Some(meant) = suggest(entry.name, known) {
                if !entries.iter().any(|e| e.name == meant) {
                    self.out.reported.push(display_path(&child(key, meant)));
                }
            }
        }
        Some(Fields { entries })
    }

    fn spanned<T>(node: Node, value: T) -> Spanned<T> {
        Spanned::new(node.span().unwrap_or(0..0), value)
    }

    fn string(&mut self, node: Option<Node>, key: &Path) -> Option<Spanned<String>> {
        let node = node?;
        match node {
            Node::Value(Value::String(s)) => Some(Self::spanned(node, s.value().clone())),
            _ => {
                self.wrong_type(node, key, "a string");
                None
            }
        }
    }

    fn int(&mut self, node: Option<Node>, key: &Path) -> Option<Spanned<i64>> {
        let node = node?;
        match node {
            Node::Value(Value::Integer(i)) => Some(Self::spanned(node, *i.value())),
            _ => {
                self.wrong_type(node, key, "an integer");
                None
            }
        }
    }

    /// A number; an integer is taken as a float (`multiplier = 2`).
    fn float(&mut self, node: Option<Node>, key: &Path) -> Option<Spanned<f64>> {
        let node = node?;
        match node {
            Node::Value(Value::Float(f)) => Some(Self::spanned(node, *f.value())),
            Node::Value(Value::Integer(i)) => Some(Self::spanned(node, *i.value() as f64)),
            _ => {
                self.wrong_type(node, key, "a number");
                None
            }
        }
    }

    fn boolean(&mut self, node: Option<Node>, key: &Path) -> Option<bool> {
        let node = node?;
        match node {
            Node::Value(Value::Boolean(b)) => Some(*b.value()),
            _ => {
                self.wrong_type(node, key, "a boolean");
                None
            }
        }
    }

    /// A string, number or boolean, judged by validation.
    fn scalar(&mut self, node: Option<Node>, key: &Path) -> Option<Spanned<Scalar>> {
        let node = node?;
        let scalar = match node {
            Node::Value(Value::String(s)) => Scalar::Str(s.value().clone()),
            Node::Value(Value::Integer(i)) => Scalar::Int(*i.value()),
            Node::Value(Value::Float(f)) => Scalar::Float(*f.value()),
            Node::Value(Value::Boolean(b)) => Scalar::Bool(*b.value()),
            _ => {
                self.wrong_type(node, key, "a string");
                return None;
            }
        };
        Some(Self::spanned(node, scalar))
    }

    /// An array whose items `item` reads; `None` (reported) when any item is wrong, so that
    /// validation does not judge a list with holes.
    fn array<'a, T>(
        &mut self,
        node: Option<Node<'a>>,
        key: &Path,
        mut item: impl FnMut(&mut Self, Node<'a>) -> Option<T>,
    ) -> Option<Vec<T>> {
        let node = node?;
        let Some(items) = node.items() else {
            self.wrong_type(node, key, "an array");
            return None;
        };
        let mut out = Vec::with_capacity(items.len());
        let mut whole = true;
        for n in items {
            match item(self, n) {
                Some(t) => out.push(t),
                None => whole = false,
            }
        }
        whole.then_some(out)
    }

    fn file(&mut self, root: Node) -> RawFile {
        let key: Vec<String> = Vec::new();
        let Some(fields) = self.fields(root, &key, FILE_KEYS) else {
            return RawFile::default();
        };
        RawFile {
            plumule: fields
                .get("plumule")
                .and_then(|n| self.plumule(n, &child(&key, "plumule"))),
            program: fields
                .get("program")
                .and_then(|n| self.named(n, &child(&key, "program"), |r, n, k| r.program(n, k))),
            queue: fields
                .get("queue")
                .and_then(|n| self.named(n, &child(&key, "queue"), |r, n, k| r.queue(n, k))),
            include: self.array(fields.get("include"), &child(&key, "include"), |r, n| {
                r.string(Some(n), &child(&key, "include"))
            }),
        }
    }

    /// A table of named tables (`[program.NAME]`), each read by `item`.
    fn named<'a, T>(
        &mut self,
        node: Node<'a>,
        key: &Path,
        mut item: impl FnMut(&mut Self, Node<'a>, &Path) -> Option<T>,
    ) -> Option<BTreeMap<Spanned<String>, T>> {
        let Some(entries) = node.entries() else {
            self.wrong_type(node, key, "a table");
            return None;
        };
        let mut out = BTreeMap::new();
        for entry in entries {
            let k = child(key, entry.name);
            if let Some(t) = item(self, entry.node, &k) {
                let name = Spanned::new(entry.span.unwrap_or(0..0), entry.name.to_owned());
                out.insert(name, t);
            }
        }
        Some(out)
    }

    fn plumule(&mut self, node: Node, key: &Path) -> Option<RawPlumule> {
        let f = self.fields(node, key, PLUMULE_KEYS)?;
        Some(RawPlumule {
            runtime_dir: self.string(f.get("runtime_dir"), &child(key, "runtime_dir")),
            state_dir: self.string(f.get("state_dir"), &child(key, "state_dir")),
            lock_dir: self.string(f.get("lock_dir"), &child(key, "lock_dir")),
            control_group: self.string(f.get("control_group"), &child(key, "control_group")),
            metrics: self.string(f.get("metrics"), &child(key, "metrics")),
            shutdown_timeout: self
                .scalar(f.get("shutdown_timeout"), &child(key, "shutdown_timeout")),
            log_level: self.string(f.get("log_level"), &child(key, "log_level")),
            node: self.string(f.get("node"), &child(key, "node")),
            cluster: f
                .get("cluster")
                .and_then(|n| self.cluster(n, &child(key, "cluster"))),
        })
    }

    fn cluster(&mut self, node: Node, key: &Path) -> Option<Spanned<RawCluster>> {
        let f = self.fields(node, key, CLUSTER_KEYS)?;
        let etcd = child(key, "etcd");
        let cluster = RawCluster {
            etcd: self.array(f.get("etcd"), &etcd, |r, n| r.string(Some(n), &etcd)),
            lease: self.scalar(f.get("lease"), &child(key, "lease")),
        };
        Some(Self::spanned(node, cluster))
    }

    fn program(&mut self, node: Node, key: &Path) -> Option<RawProgram> {
        let f = self.fields(node, key, PROGRAM_KEYS)?;
        let k = |name: &str| child(key, name);
        Some(RawProgram {
            command: self.command(f.get("command"), &k("command")),
            workers: self.int(f.get("workers"), &k("workers")),
            restart: self.string(f.get("restart"), &k("restart")),
            success_exit_codes: self.array(
                f.get("success_exit_codes"),
                &k("success_exit_codes"),
                |r, n| r.int(Some(n), &k("success_exit_codes")),
            ),
            healthy_after: self.scalar(f.get("healthy_after"), &k("healthy_after")),
            backoff: f
                .get("backoff")
                .and_then(|n| self.backoff(n, &k("backoff"))),
            start_limit: f
                .get("start_limit")
                .and_then(|n| self.start_limit(n, &k("start_limit"))),
            stop_signal: self.string(f.get("stop_signal"), &k("stop_signal")),
            stop_timeout: self.scalar(f.get("stop_timeout"), &k("stop_timeout")),
            reload: self.string(f.get("reload"), &k("reload")),
            reload_signal: self.string(f.get("reload_signal"), &k("reload_signal")),
            env: f.get("env").and_then(|n| self.env(n, &k("env"))),
            inherit_env: self.boolean(f.get("inherit_env"), &k("inherit_env")),
            cwd: self.string(f.get("cwd"), &k("cwd")),
            user: self.string(f.get("user"), &k("user")),
            group: self.string(f.get("group"), &k("group")),
            umask: self.scalar(f.get("umask"), &k("umask")),
            stdout: self.output(f.get("stdout"), &k("stdout")),
            stderr: self.output(f.get("stderr"), &k("stderr")),
            locks: self.array(f.get("locks"), &k("locks"), |r, n| r.lock(n, &k("locks"))),
            ready: self.string(f.get("ready"), &k("ready")),
            ready_timeout: self.scalar(f.get("ready_timeout"), &k("ready_timeout")),
            watchdog: self.scalar(f.get("watchdog"), &k("watchdog")),
            listen: self.array(f.get("listen"), &k("listen"), |r, n| {
                r.listen(n, &k("listen"))
            }),
            after: self.array(f.get("after"), &k("after"), |r, n| {
                r.string(Some(n), &k("after"))
            }),
            queue: self.string(f.get("queue"), &k("queue")),
            nice: self.int(f.get("nice"), &k("nice")),
            oom_score_adj: self.int(f.get("oom_score_adj"), &k("oom_score_adj")),
            limits: f.get("limits").and_then(|n| self.limits(n, &k("limits"))),
        })
    }

    /// `limits = { nofile = 65536, core = 0 }`: an unknown resource is reported like an
    /// unknown key, with the name probably meant.
    fn limits(
        &mut self,
        node: Node,
        key: &Path,
    ) -> Option<Vec<(Spanned<String>, Spanned<Scalar>)>> {
        let Some(entries) = node.entries() else {
            self.wrong_type(node, key, "a table like { nofile = 65536 }");
            return None;
        };
        let names: Vec<&str> = crate::config::LimitResource::ALL
            .iter()
            .map(|r| r.name())
            .collect();
        let mut out = Vec::new();
        for entry in entries {
            let k = child(key, entry.name);
            if !names.contains(&entry.name) {
                self.report(
                    entry.span.clone(),
                    &k,
                    unknown_choice("limit", entry.name, &names),
                );
                continue;
            }
            if let Some(value) = self.scalar(Some(entry.node), &k) {
                let name = Spanned::new(entry.span.unwrap_or(0..0), entry.name.to_owned());
                out.push((name, value));
            }
        }
        Some(out)
    }

    fn backoff(&mut self, node: Node, key: &Path) -> Option<RawBackoff> {
        let f = self.fields(node, key, BACKOFF_KEYS)?;
        Some(RawBackoff {
            initial: self.scalar(f.get("initial"), &child(key, "initial")),
            max: self.scalar(f.get("max"), &child(key, "max")),
            multiplier: self.float(f.get("multiplier"), &child(key, "multiplier")),
            jitter: self.float(f.get("jitter"), &child(key, "jitter")),
        })
    }

    fn start_limit(&mut self, node: Node, key: &Path) -> Option<RawStartLimit> {
        let f = self.fields(node, key, START_LIMIT_KEYS)?;
        Some(RawStartLimit {
            burst: self.int(f.get("burst"), &child(key, "burst")),
            interval: self.scalar(f.get("interval"), &child(key, "interval")),
        })
    }

    fn queue(&mut self, node: Node, key: &Path) -> Option<RawQueue> {
        let f = self.fields(node, key, QUEUE_KEYS)?;
        let k = |name: &str| child(key, name);
        Some(RawQueue {
            durable: self.boolean(f.get("durable"), &k("durable")),
            protocol: self.string(f.get("protocol"), &k("protocol")),
            prefetch: self.int(f.get("prefetch"), &k("prefetch")),
            max_attempts: self.int(f.get("max_attempts"), &k("max_attempts")),
            retry_backoff: f
                .get("retry_backoff")
                .and_then(|n| self.backoff(n, &k("retry_backoff"))),
            route: self.string(f.get("route"), &k("route")),
            max_pending: self.int(f.get("max_pending"), &k("max_pending")),
            max_frame: self.scalar(f.get("max_frame"), &k("max_frame")),
            job_timeout: self.scalar(f.get("job_timeout"), &k("job_timeout")),
            backend: self.string(f.get("backend"), &k("backend")),
            claim_after: self.scalar(f.get("claim_after"), &k("claim_after")),
            partitions: self.int(f.get("partitions"), &k("partitions")),
        })
    }

    fn command(&mut self, node: Option<Node>, key: &Path) -> Option<Spanned<RawCommand>> {
        let node = node?;
        let command = match node {
            Node::Value(Value::String(s)) => RawCommand::Shell(s.value().clone()),
            Node::Value(Value::Array(_)) => {
                RawCommand::Argv(self.array(Some(node), key, |r, n| r.string(Some(n), key))?)
            }
            _ => {
                self.wrong_type(
                    node,
                    key,
                    "an array of strings (argv) or a string (run by /bin/sh -c)",
                );
                return None;
            }
        };
        Some(Self::spanned(node, command))
    }

    fn env(
        &mut self,
        node: Node,
        key: &Path,
    ) -> Option<BTreeMap<Spanned<String>, Spanned<String>>> {
        let Some(entries) = node.entries() else {
            self.wrong_type(node, key, "a table");
            return None;
        };
        let mut env = BTreeMap::new();
        for entry in entries {
            if let Some(value) = self.string(Some(entry.node), &child(key, entry.name)) {
                let name = Spanned::new(entry.span.unwrap_or(0..0), entry.name.to_owned());
                env.insert(name, value);
            }
        }
        Some(env)
    }

    fn output(&mut self, node: Option<Node>, key: &Path) -> Option<Spanned<RawOutput>> {
        let node = node?;
        let output = match node {
            Node::Value(Value::String(s)) => RawOutput::Mode(s.value().clone()),
            Node::Table(_) | Node::Inline(_) => {
                let f = self.fields(node, key, OUTPUT_FILE_KEYS)?;
                RawOutput::File(RawOutputFile {
                    file: self.string(f.get("file"), &child(key, "file")),
                    max_size: self.scalar(f.get("max_size"), &child(key, "max_size")),
                    keep: self.int(f.get("keep"), &child(key, "keep")),
                })
            }
            _ => {
                self.wrong_type(
                    node,
                    key,
                    "\"log\", \"inherit\", \"null\" or a table { file = \"...\" }",
                );
                return None;
            }
        };
        Some(Self::spanned(node, output))
    }

    fn lock(&mut self, node: Node, key: &Path) -> Option<Spanned<RawLock>> {
        let lock = match node {
            Node::Value(Value::String(s)) => RawLock::Name(s.value().clone()),
            Node::Table(_) | Node::Inline(_) => {
                let f = self.fields(node, key, LOCK_KEYS)?;
                RawLock::Table(RawLockTable {
                    name: self.string(f.get("name"), &child(key, "name")),
                    shared: self.boolean(f.get("shared"), &child(key, "shared")),
                    cluster: self.boolean(f.get("cluster"), &child(key, "cluster")),
                })
            }
            _ => {
                self.wrong_type(
                    node,
                    key,
                    "a lock name or a table { name = \"...\", shared = true }",
                );
                return None;
            }
        };
        Some(Self::spanned(node, lock))
    }

    fn listen(&mut self, node: Node, key: &Path) -> Option<Spanned<RawListen>> {
        let listen = match node {
            Node::Value(Value::String(s)) => RawListen::Address(s.value().clone()),
            Node::Table(_) | Node::Inline(_) => {
                let f = self.fields(node, key, LISTEN_KEYS)?;
                RawListen::Table(RawListenTable {
                    address: self.string(f.get("address"), &child(key, "address")),
                    name: self.string(f.get("name"), &child(key, "name")),
                    mode: self.scalar(f.get("mode"), &child(key, "mode")),
                })
            }
            _ => {
                self.wrong_type(
                    node,
                    key,
                    "an address like \"tcp:0.0.0.0:8080\" or a table { address = \"...\" }",
                );
                return None;
            }
        };
        Some(Self::spanned(node, listen))
    }
}
