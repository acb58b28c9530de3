//! From the raw file to a [`Config`]: checks every value and reference, fills in the defaults
//! of SPEC §9, resolves paths, users and groups.
//!
//! Validation never stops at the first problem: each check records what is wrong (with the
//! span and key it concerns), substitutes the default and goes on, so one run reports every
//! problem. A [`Config`] is returned only when there was none.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::ops::Range;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::{Gid, Group, Uid, User};
use toml::Spanned;

use super::locate::{display_key, display_path, Source};
use super::raw::{
    RawBackoff, RawCluster, RawCommand, RawFile, RawListen, RawLock, RawOutput, RawPlumule,
    RawProgram, RawQueue, Scalar,
};
use super::values::{self, resolve, suggest, unknown_choice};
use super::{
    find_unsupported, Backoff, Cluster, CommandSpec, Config, GroupSpec, Host, Limit, LimitResource,
    ListenAddr, ListenSpec, LockSpec, OutputSpec, Pending, Program, Queue, QueueProtocol,
    ReadyMode, ReloadMode, RestartPolicy, Route, StartLimit, Unsupported, UserSpec, MAX_ARGS_TOTAL,
    MAX_ARG_STRING, MAX_TOTAL_WORKERS, MAX_WORKERS,
};

/// SPEC §9 defaults.
const DEFAULT_BACKOFF: Backoff = Backoff {
    initial: Duration::from_millis(100),
    max: Duration::from_secs(30),
    multiplier: 2.0,
    jitter: 0.1,
};
const DEFAULT_RETRY_BACKOFF: Backoff = Backoff {
    initial: Duration::from_secs(1),
    max: Duration::from_secs(60),
    multiplier: 2.0,
    jitter: 0.1,
};
/// systemd's defaults (`StartLimitBurst`, `StartLimitIntervalSec`), for a `start_limit` table
/// that leaves a key out.
const DEFAULT_START_LIMIT: StartLimit = StartLimit {
    burst: 5,
    interval: Duration::from_secs(10),
};
const DEFAULT_MAX_FRAME: u64 = 16 << 20;
/// A frame's length is 4 bytes.
const MAX_FRAME_LIMIT: u64 = u32::MAX as u64;
/// In-flight jobs per worker: a bound on what the master buffers for one worker.
const MAX_PREFETCH: i64 = 10_000;
const MAX_KEEP: i64 = 1000;
/// Jobs a queue may hold: what `max_pending` may ask for. Each pending job costs the master
/// memory (its index entry at least), so the bound is on memory, not disk.
const MAX_PENDING_LIMIT: i64 = 100_000_000;
/// Starts remembered per worker for `start_limit`: the window keeps one instant per start.
const MAX_BURST: i64 = 10_000;
/// Programs, and queues, a configuration may define: each costs the master a pool (or a
/// queue) and its metrics series.
const MAX_NAMED: usize = 10_000;
const DEFAULT_CLAIM_AFTER: Duration = Duration::from_secs(30);
const DEFAULT_PARTITIONS: i64 = 64;
/// Key partitions of a Redis queue: one stream each.
const MAX_PARTITIONS: i64 = 65_536;
const DEFAULT_LEASE: Duration = Duration::from_secs(10);
/// The longest `node` name: a DNS name's.
const MAX_NODE: usize = 253;

/// Variables plumule sets for every worker (with [`super::SYSTEMD_ENV`]); `env` must not
/// try to set them.
const PLUMULE_ENV: &[&str] = &["PLUMULE_PROGRAM", "PLUMULE_WORKER_ID", "PLUMULE_WORKERS"];

const RESTART: &[(&str, RestartPolicy)] = &[
    ("always", RestartPolicy::Always),
    ("on-failure", RestartPolicy::OnFailure),
    ("never", RestartPolicy::Never),
];
const RELOAD: &[(&str, ReloadMode)] = &[
    ("restart", ReloadMode::Restart),
    ("signal", ReloadMode::Signal),
    ("none", ReloadMode::None),
];
const READY: &[(&str, ReadyMode)] = &[
    ("started", ReadyMode::Started),
    ("notify", ReadyMode::Notify),
];
const PROTOCOL: &[(&str, QueueProtocol)] = &[
    ("lines", QueueProtocol::Lines),
    ("frames", QueueProtocol::Frames),
];
const ROUTE: &[(&str, Route)] = &[
    ("least-loaded", Route::LeastLoaded),
    ("round-robin", Route::RoundRobin),
    ("key", Route::Key),
];
const LOG_LEVEL: &[(&str, log::LevelFilter)] = &[
    ("error", log::LevelFilter::Error),
    ("warn", log::LevelFilter::Warn),
    ("info", log::LevelFilter::Info),
    ("debug", log::LevelFilter::Debug),
    ("trace", log::LevelFilter::Trace),
];
/// `stdout` / `stderr` modes; the table form is handled apart.
#[derive(Clone, Copy)]
enum OutputMode {
    Log,
    Inherit,
    Null,
}
const OUTPUT: &[(&str, OutputMode)] = &[
    ("log", OutputMode::Log),
    ("inherit", OutputMode::Inherit),
    ("null", OutputMode::Null),
];

/// A key path, kept as segments (to find the key in the file) and shown dotted.
#[derive(Clone)]
struct Key(Vec<String>);

impl Key {
    fn root(segment: &str) -> Key {
        Key(vec![segment.to_owned()])
    }
    fn child(&self, segment: &str) -> Key {
        let mut k = self.0.clone();
        k.push(segment.to_owned());
        Key(k)
    }
    fn text(&self) -> String {
        display_path(&self.0)
    }
}

/// One file of the configuration: the main file first, then the included ones.
pub(super) struct FileInput<'a> {
    pub raw: &'a RawFile,
    pub source: &'a Source<'a>,
    pub path: &'a Path,
}

/// The programs of every file by name, with the index of their file.
type Programs<'r> = BTreeMap<Spanned<String>, (usize, &'r RawProgram)>;

pub(super) fn validate(
    files: &[FileInput],
    host: &Host,
    unsupported: &[Unsupported],
) -> Result<Config, Vec<Pending>> {
    let main = &files[0];
    let dirs: Vec<PathBuf> = files
        .iter()
        .map(|f| f.path.parent().unwrap_or(Path::new("/")).to_path_buf())
        .collect();
    let mut v = Validator {
        source: main.source,
        dir: dirs[0].clone(),
        file: 0,
        problems: Vec::new(),
        listen_seen: Vec::new(),
    };
    for (i, f) in files.iter().enumerate() {
        v.enter(i, f.source, &dirs[i]);
        v.unsupported_keys(unsupported);
        if i > 0 {
            v.main_only(f.raw);
        }
    }
    v.enter(0, main.source, &dirs[0]);
    let raw = main.raw;
    let default_plumule = RawPlumule::default();
    let plumule = raw.plumule.as_ref().unwrap_or(&default_plumule);
    let plumule_key = Key::root("plumule");

    let (default_runtime, default_state) = default_dirs(host);
    let tmp = private_tmp(host);
    let tmp_used = (plumule.runtime_dir.is_none() && default_runtime.starts_with(&tmp))
        || (plumule.state_dir.is_none() && default_state.starts_with(&tmp));
    if tmp_used {
        if let Err(message) = (host.private_dir)(&tmp, host.euid) {
            v.at_key(&plumule_key.child("runtime_dir"), message);
        }
    }
    let runtime_dir = v
        .dir_path(
            &plumule_key.child("runtime_dir"),
            plumule.runtime_dir.as_ref(),
        )
        .unwrap_or(default_runtime);
    let state_dir = v
        .dir_path(&plumule_key.child("state_dir"), plumule.state_dir.as_ref())
        .unwrap_or(default_state);
    let lock_dir = v
        .dir_path(&plumule_key.child("lock_dir"), plumule.lock_dir.as_ref())
        .unwrap_or_else(|| runtime_dir.join("locks"));
    let control_group = plumule
        .control_group
        .as_ref()
        .and_then(|g| v.group(&plumule_key.child("control_group"), g));
    let metrics = plumule
        .metrics
        .as_ref()
        .and_then(|m| v.metrics(&plumule_key.child("metrics"), m));
    let shutdown_timeout = v.duration(
        &plumule_key.child("shutdown_timeout"),
        plumule.shutdown_timeout.as_ref(),
        Duration::from_secs(30),
    );
    let log_level = v.choice(
        &plumule_key.child("log_level"),
        "log level",
        plumule.log_level.as_ref(),
        LOG_LEVEL,
        log::LevelFilter::Info,
    );
    let node = match &plumule.node {
        Some(n) => {
            v.node(&plumule_key.child("node"), n);
            n.get_ref().clone()
        }
        None => host.hostname.to_owned(),
    };
    let cluster = plumule
        .cluster
        .as_ref()
        .map(|c| v.cluster(&plumule_key.child("cluster"), c));

    let raw_queues: BTreeMap<Spanned<String>, (usize, &RawQueue)> =
        v.merge(files, &dirs, "queue", |f| f.raw.queue.as_ref());
    v.too_many(
        files,
        &dirs,
        "queue",
        raw_queues.keys().map(|k| (k, raw_queues[k].0)),
    );
    let mut queues: Vec<Queue> = Vec::new();
    for (name, (i, q)) in &raw_queues {
        v.enter(*i, files[*i].source, &dirs[*i]);
        queues.push(v.queue(name, q));
    }

    let raw_programs: Programs = v.merge(files, &dirs, "program", |f| f.raw.program.as_ref());
    v.too_many(
        files,
        &dirs,
        "program",
        raw_programs.keys().map(|k| (k, raw_programs[k].0)),
    );
    let mut programs: Vec<Program> = Vec::new();
    for (name, (i, p)) in &raw_programs {
        v.enter(*i, files[*i].source, &dirs[*i]);
        let program = v.program(name, p);
        v.cluster_locks(&program, cluster.as_ref());
        programs.push(program);
    }
    v.total_workers(files, &dirs, &raw_programs, &programs);
    v.references(files, &dirs, &raw_programs, &raw_queues);
    v.after_cycles(files, &dirs, &raw_programs);

    if !v.problems.is_empty() {
        return Err(v.problems);
    }
    Ok(Config {
        path: main.path.to_path_buf(),
        runtime_dir,
        state_dir,
        lock_dir,
        control_group,
        metrics,
        shutdown_timeout,
        log_level,
        node,
        cluster,
        // BTreeMap iteration: both sorted by name.
        programs,
        queues,
    })
}

/// `runtime_dir` and `state_dir` when the file does not set them (SPEC §2): systemd's
/// `$RUNTIME_DIRECTORY` / `$STATE_DIRECTORY` (the first of a `:`-separated list); else
/// `/run/plumule` and `/var/lib/plumule` for root; else `$XDG_RUNTIME_DIR/plumule` and
/// `$XDG_STATE_HOME/plumule` (or `$HOME/.local/state/plumule`); else `/tmp/plumule-UID/run`
/// and `/tmp/plumule-UID/state`. Relative or empty variables are ignored.
fn default_dirs(host: &Host) -> (PathBuf, PathBuf) {
    let absolute = |name: &str| -> Option<PathBuf> {
        let value: OsString = (host.var)(name)?;
        let path = PathBuf::from(value);
        path.is_absolute().then_some(path)
    };
    // systemd lists one folder per `RuntimeDirectory=` entry, separated by ':'.
    let systemd = |name: &str| -> Option<PathBuf> {
        let value: OsString = (host.var)(name)?;
        let first = value.as_bytes().split(|&b| b == b':').next()?;
        let path = PathBuf::from(OsStr::from_bytes(first));
        path.is_absolute().then_some(path)
    };
    let tmp = private_tmp(host);
    let runtime = systemd("RUNTIME_DIRECTORY").unwrap_or_else(|| {
        if host.euid == 0 {
            PathBuf::from("/run/plumule")
        } else if let Some(xdg) = absolute("XDG_RUNTIME_DIR") {
            xdg.join("plumule")
        } else {
            tmp.join("run")
        }
    });
    let state = systemd("STATE_DIRECTORY").unwrap_or_else(|| {
        if host.euid == 0 {
            PathBuf::from("/var/lib/plumule")
        } else if let Some(xdg) = absolute("XDG_STATE_HOME") {
            xdg.join("plumule")
        } else if let Some(home) = absolute("HOME") {
            home.join(".local/state/plumule")
        } else {
            tmp.join("state")
        }
    });
    (runtime, state)
}

/// The per-user folder in /tmp for the default dirs of a user without `$XDG_RUNTIME_DIR`.
fn private_tmp(host: &Host) -> PathBuf {
    PathBuf::from(format!("/tmp/plumule-{}", host.euid))
}

struct Validator<'a> {
    /// The file being checked: its text, its folder (relative paths resolve against it), its
    /// index among the files (0: the main file).
    source: &'a Source<'a>,
    dir: PathBuf,
    file: usize,
    problems: Vec<Pending>,
    /// `tcp:` and `unix:` listen addresses seen so far, with their program.
    listen_seen: Vec<(ListenAddr, String)>,
}

impl<'a> Validator<'a> {
    /// What follows concerns file `file`.
    fn enter(&mut self, file: usize, source: &'a Source<'a>, dir: &Path) {
        self.file = file;
        self.source = source;
        self.dir = dir.to_path_buf();
    }

    /// An included file holds programs and queues only.
    fn main_only(&mut self, raw: &RawFile) {
        if raw.plumule.is_some() {
            self.at_key(
                &Key::root("plumule"),
                "`[plumule]` belongs in the main file, not in an included one",
            );
        }
        if raw.include.is_some() {
            self.at_key(
                &Key::root("include"),
                "an included file cannot include others: list every pattern in the main file",
            );
        }
    }

    /// The `[program.*]` (or `[queue.*]`) tables of every file by name, with their file; a
    /// name defined in two files is reported in the later one, naming the first.
    fn merge<'r: 'a, T>(
        &mut self,
        files: &[FileInput<'r>],
        dirs: &[PathBuf],
        what: &str,
        tables: impl Fn(&FileInput<'r>) -> Option<&'r BTreeMap<Spanned<String>, T>>,
    ) -> BTreeMap<Spanned<String>, (usize, &'r T)> {
        let mut merged: BTreeMap<Spanned<String>, (usize, &'r T)> = BTreeMap::new();
        for (i, f) in files.iter().enumerate() {
            for (name, t) in tables(f).into_iter().flatten() {
                if let Some((first, _)) = merged.get_key_value(name) {
                    let (j, _) = merged[name];
                    let at = files[j].source.location(first.span().start);
                    let message = format!(
                        "{what} `{}` is already defined in {}:{}:{}",
                        name.get_ref(),
                        files[j].path.display(),
                        at.line,
                        at.column
                    );
                    self.enter(i, f.source, &dirs[i]);
                    let key = Key(vec![what.to_owned(), name.get_ref().clone()]);
                    self.at(name, &key, message);
                    continue;
                }
                merged.insert(name.clone(), (i, t));
            }
        }
        merged
    }

    fn report(&mut self, span: Option<Range<usize>>, key: &Key, message: impl Into<String>) {
        self.problems.push(Pending {
            file: self.file,
            span,
            key: Some(key.text()),
            message: message.into(),
        });
    }

    /// A problem with a value: located at the value.
    fn at<T>(&mut self, value: &Spanned<T>, key: &Key, message: impl Into<String>) {
        self.report(Some(value.span()), key, message);
    }

    /// A problem with a key as a whole (missing, not supported): located at the key, or at
    /// its table when the key is not in the file.
    fn at_key(&mut self, key: &Key, message: impl Into<String>) {
        let span = (0..key.0.len()).rev().find_map(|n| {
            let path: Vec<&str> = key.0[..=n].iter().map(String::as_str).collect();
            self.source.key_span(&path)
        });
        self.report(span, key, message);
    }

    fn unsupported_keys(&mut self, list: &[Unsupported]) {
        let found: Vec<(Range<usize>, Vec<String>, String)> = self
            .source
            .keys()
            .iter()
            .filter_map(|k| {
                let path: Vec<&str> = k.path.iter().map(String::as_str).collect();
                let hit = find_unsupported(list, &path, k.string_value.as_deref())?;
                Some((k.span.clone(), k.path.clone(), hit.label()))
            })
            .collect();
        for (span, path, label) in found {
            self.report(
                Some(span),
                &Key(path),
                format!("`{label}` is not supported yet"),
            );
        }
    }

    fn duration(
        &mut self,
        key: &Key,
        value: Option<&Spanned<Scalar>>,
        default: Duration,
    ) -> Duration {
        self.opt_duration(key, value).unwrap_or(default)
    }

    fn opt_duration(&mut self, key: &Key, value: Option<&Spanned<Scalar>>) -> Option<Duration> {
        let value = value?;
        match values::duration(value.get_ref()) {
            Ok(d) => Some(d),
            Err(e) => {
                self.at(value, key, e);
                None
            }
        }
    }

    /// A duration that must not be zero.
    fn positive_duration(
        &mut self,
        key: &Key,
        value: Option<&Spanned<Scalar>>,
    ) -> Option<Duration> {
        let d = self.opt_duration(key, value)?;
        if d.is_zero() {
            self.at(value?, key, "must be longer than 0");
            return None;
        }
        Some(d)
    }

    fn size(&mut self, key: &Key, value: &Spanned<Scalar>, max: u64) -> Option<u64> {
        match values::size(value.get_ref()) {
            Ok(0) => self.at(value, key, "must be larger than 0 bytes"),
            Ok(n) if n > max => self.at(value, key, format!("must be at most {max} bytes")),
            Ok(n) => return Some(n),
            Err(e) => self.at(value, key, e),
        }
        None
    }

    fn int(
        &mut self,
        key: &Key,
        value: Option<&Spanned<i64>>,
        min: i64,
        max: i64,
        default: i64,
    ) -> i64 {
        let Some(value) = value else {
            return default;
        };
        let n = *value.get_ref();
        if (min..=max).contains(&n) {
            return n;
        }
        let message = if max >= i64::from(u32::MAX) {
            format!("must be at least {min}, found {n}")
        } else {
            format!("must be between {min} and {max}, found {n}")
        };
        self.at(value, key, message);
        default
    }

    fn choice<T: Copy>(
        &mut self,
        key: &Key,
        what: &str,
        value: Option<&Spanned<String>>,
        options: &[(&str, T)],
        default: T,
    ) -> T {
        let Some(value) = value else {
            return default;
        };
        if let Some(&(_, t)) = options.iter().find(|(name, _)| name == value.get_ref()) {
            return t;
        }
        let names: Vec<&str> = options.iter().map(|(name, _)| *name).collect();
        self.at(value, key, unknown_choice(what, value.get_ref(), &names));
        default
    }

    fn signal(&mut self, key: &Key, value: Option<&Spanned<String>>, default: Signal) -> Signal {
        let Some(value) = value else {
            return default;
        };
        values::signal(value.get_ref()).unwrap_or_else(|e| {
            self.at(value, key, e);
            default
        })
    }

    /// A path relative to the config folder; `None` when unset or empty.
    fn path(&mut self, key: &Key, value: &Spanned<String>) -> Option<PathBuf> {
        if value.get_ref().is_empty() {
            self.at(value, key, "the path is empty");
            return None;
        }
        Some(resolve(&self.dir, value.get_ref()))
    }

    fn dir_path(&mut self, key: &Key, value: Option<&Spanned<String>>) -> Option<PathBuf> {
        self.path(key, value?)
    }

    fn backoff(&mut self, key: &Key, raw: Option<&RawBackoff>, default: Backoff) -> Backoff {
        let Some(raw) = raw else {
            return default;
        };
        let initial = self.duration(&key.child("initial"), raw.initial.as_ref(), default.initial);
        let max = self.duration(&key.child("max"), raw.max.as_ref(), default.max);
        let mut multiplier = default.multiplier;
        if let Some(m) = &raw.multiplier {
            if m.get_ref().is_finite() && *m.get_ref() >= 1.0 {
                multiplier = *m.get_ref();
            } else {
                let message = format!(
                    "must be a number of at least 1.0 (1.0 keeps the delay constant), found {}",
                    m.get_ref()
                );
                self.at(m, &key.child("multiplier"), message);
            }
        }
        let mut jitter = default.jitter;
        if let Some(j) = &raw.jitter {
            if (0.0..=1.0).contains(j.get_ref()) {
                jitter = *j.get_ref();
            } else {
                let message = format!(
                    "must be between 0.0 and 1.0 (a fraction of the delay), found {}",
                    j.get_ref()
                );
                self.at(j, &key.child("jitter"), message);
            }
        }
        if initial > max {
            let message = format!(
                "`initial` ({}) is longer than `max` ({})",
                humantime::format_duration(initial),
                humantime::format_duration(max)
            );
            match (&raw.initial, &raw.max) {
                (Some(i), _) => self.at(i, &key.child("initial"), message),
                (None, Some(m)) => self.at(m, &key.child("max"), message),
                (None, None) => self.at_key(key, message),
            }
        }
        Backoff {
            initial,
            max,
            multiplier,
            jitter,
        }
    }

    fn user(&mut self, key: &Key, value: &Spanned<String>) -> Option<UserSpec> {
        let name = value.get_ref();
        let found = match name.parse::<u32>() {
            Ok(uid) => User::from_uid(Uid::from_raw(uid)),
            Err(_) => User::from_name(name),
        };
        match found {
            Ok(Some(u)) => Some(UserSpec {
                name: u.name,
                uid: u.uid.as_raw(),
                gid: u.gid.as_raw(),
                home: u.dir,
                shell: u.shell,
            }),
            Ok(None) => {
                self.at(value, key, format!("no user `{name}` on this system"));
                None
            }
            Err(e) => {
                self.at(value, key, format!("cannot look up user `{name}`: {e}"));
                None
            }
        }
    }

    fn group(&mut self, key: &Key, value: &Spanned<String>) -> Option<GroupSpec> {
        let name = value.get_ref();
        let found = match name.parse::<u32>() {
            Ok(gid) => Group::from_gid(Gid::from_raw(gid)),
            Err(_) => Group::from_name(name),
        };
        match found {
            Ok(Some(g)) => Some(GroupSpec {
                name: g.name,
                gid: g.gid.as_raw(),
            }),
            Ok(None) => {
                self.at(value, key, format!("no group `{name}` on this system"));
                None
            }
            Err(e) => {
                self.at(value, key, format!("cannot look up group `{name}`: {e}"));
                None
            }
        }
    }

    fn metrics(&mut self, key: &Key, value: &Spanned<String>) -> Option<ListenAddr> {
        match values::listen_addr(value.get_ref(), &self.dir) {
            Ok(addr @ (ListenAddr::Tcp(_) | ListenAddr::Unix(_))) => Some(addr),
            Ok(ListenAddr::Systemd(_)) => {
                self.at(value, key, "expected a tcp:HOST:PORT or unix:PATH address");
                None
            }
            Err(e) => {
                self.at(value, key, e);
                None
            }
        }
    }

    fn queue(&mut self, name: &Spanned<String>, raw: &RawQueue) -> Queue {
        let key = Key(vec!["queue".to_owned(), name.get_ref().clone()]);
        if let Err(e) = values::check_name("queue", name.get_ref()) {
            self.at(name, &key, e);
        }
        let max_frame = match &raw.max_frame {
            Some(v) => self
                .size(&key.child("max_frame"), v, MAX_FRAME_LIMIT)
                .unwrap_or(DEFAULT_MAX_FRAME),
            None => DEFAULT_MAX_FRAME,
        };
        Queue {
            name: name.get_ref().clone(),
            durable: raw.durable.unwrap_or(true),
            protocol: self.choice(
                &key.child("protocol"),
                "protocol",
                raw.protocol.as_ref(),
                PROTOCOL,
                QueueProtocol::Lines,
            ),
            prefetch: self.int(
                &key.child("prefetch"),
                raw.prefetch.as_ref(),
                1,
                MAX_PREFETCH,
                1,
            ) as u32,
            max_attempts: self.int(
                &key.child("max_attempts"),
                raw.max_attempts.as_ref(),
                1,
                i64::from(u32::MAX),
                3,
            ) as u32,
            retry_backoff: self.backoff(
                &key.child("retry_backoff"),
                raw.retry_backoff.as_ref(),
                DEFAULT_RETRY_BACKOFF,
            ),
            route: self.choice(
                &key.child("route"),
                "route",
                raw.route.as_ref(),
                ROUTE,
                Route::LeastLoaded,
            ),
            max_pending: self.int(
                &key.child("max_pending"),
                raw.max_pending.as_ref(),
                1,
                MAX_PENDING_LIMIT,
                1_000_000,
            ) as u64,
            max_frame,
            job_timeout: self.opt_duration(&key.child("job_timeout"), raw.job_timeout.as_ref()),
            backend: raw.backend.as_ref().map(|b| {
                let b_key = key.child("backend");
                let url = b.get_ref();
                let scheme = ["redis://", "unix://", "redis+unix://"]
                    .into_iter()
                    .find(|s| url.starts_with(s));
                if scheme.is_none_or(|s| url.len() <= s.len()) {
                    self.at(
                        b,
                        &b_key,
                        "expected a Redis URL like \"redis://127.0.0.1:6379/0\"",
                    );
                } else if let Err(e) = ::redis::Client::open(url.as_str()) {
                    // The client's reasons name no part of the URL (no password shown).
                    self.at(b, &b_key, format!("not a usable Redis URL: {e}"));
                }
                b.get_ref().clone()
            }),
            claim_after: self
                .positive_duration(&key.child("claim_after"), raw.claim_after.as_ref())
                .unwrap_or(DEFAULT_CLAIM_AFTER),
            partitions: self.int(
                &key.child("partitions"),
                raw.partitions.as_ref(),
                1,
                MAX_PARTITIONS,
                DEFAULT_PARTITIONS,
            ) as u32,
        }
    }

    /// At most [`MAX_NAMED`] programs (or queues): reported once, at the first one past the
    /// limit in name order.
    fn too_many<'n>(
        &mut self,
        files: &[FileInput<'a>],
        dirs: &[PathBuf],
        what: &str,
        mut names: impl Iterator<Item = (&'n Spanned<String>, usize)>,
    ) {
        if let Some((name, i)) = names.nth(MAX_NAMED) {
            self.enter(i, files[i].source, &dirs[i]);
            let key = Key(vec![what.to_owned(), name.get_ref().clone()]);
            self.at(
                name,
                &key,
                format!("more than {MAX_NAMED} {what}s: the limit is {MAX_NAMED}"),
            );
        }
    }

    /// `node`: a name other masters and `plumule members` show.
    fn node(&mut self, key: &Key, value: &Spanned<String>) {
        let n = value.get_ref();
        let ok = (1..=MAX_NODE).contains(&n.len())
            && n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !ok {
            self.at(
                value,
                key,
                format!(
                    "invalid node name {n:?}: use 1 to {MAX_NODE} characters among \
                     A-Z a-z 0-9 . _ -"
                ),
            );
        }
    }

    fn cluster(&mut self, key: &Key, raw: &Spanned<RawCluster>) -> Cluster {
        let c = raw.get_ref();
        let etcd: Vec<String> = match &c.etcd {
            None => {
                self.at(
                    raw,
                    &key.child("etcd"),
                    "missing key `etcd`: the endpoints, like [\"http://127.0.0.1:2379\"]",
                );
                Vec::new()
            }
            Some(list) => {
                if list.is_empty() {
                    self.at(raw, &key.child("etcd"), "name at least one etcd endpoint");
                }
                for e in list {
                    let url = e.get_ref();
                    let rest = url
                        .strip_prefix("http://")
                        .or_else(|| url.strip_prefix("https://"));
                    if rest.is_none_or(|r| r.is_empty() || r.contains(char::is_whitespace)) {
                        self.at(
                            e,
                            &key.child("etcd"),
                            format!(
                                "invalid etcd endpoint {url:?}: expected an http:// or https:// \
                                 URL like \"http://127.0.0.1:2379\""
                            ),
                        );
                    }
                }
                list.iter().map(|e| e.get_ref().clone()).collect()
            }
        };
        let lease_key = key.child("lease");
        let lease = self
            .positive_duration(&lease_key, c.lease.as_ref())
            .unwrap_or(DEFAULT_LEASE);
        if let Some(l) = &c.lease {
            // etcd counts a lease's TTL in whole seconds.
            if lease < Duration::from_secs(1) {
                self.at(l, &lease_key, "must be at least 1s");
            }
        }
        Cluster { etcd, lease }
    }

    /// The workers of all programs together stay within [`MAX_TOTAL_WORKERS`]; reported at
    /// the `workers` of the program that crosses the limit.
    fn total_workers(
        &mut self,
        files: &[FileInput<'a>],
        dirs: &[PathBuf],
        raw: &Programs,
        programs: &[Program],
    ) {
        let all: u64 = programs.iter().map(|p| u64::from(p.workers)).sum();
        let mut total: u64 = 0;
        for ((name, &(i, p)), program) in raw.iter().zip(programs) {
            let before = total;
            total += u64::from(program.workers);
            if before <= MAX_TOTAL_WORKERS && total > MAX_TOTAL_WORKERS {
                self.enter(i, files[i].source, &dirs[i]);
                let key = Key(vec![
                    "program".to_owned(),
                    name.get_ref().clone(),
                    "workers".to_owned(),
                ]);
                let message = format!(
                    "the programs ask for {all} workers in all, above the limit of \
                     {MAX_TOTAL_WORKERS} workers across all programs"
                );
                match &p.workers {
                    Some(w) => self.at(w, &key, message),
                    None => self.at_key(&key, message),
                }
            }
        }
    }

    /// A program with cluster locks needs `[plumule] cluster`, and a `stop_timeout` shorter
    /// than the lease: its workers are SIGKILLed by the lease's deadline anyway, so a
    /// graceful stop that may take longer would be cut short (SPEC §10).
    fn cluster_locks(&mut self, program: &Program, cluster: Option<&Cluster>) {
        let Some(lock) = program.locks.iter().find(|l| l.cluster) else {
            return;
        };
        let key = Key(vec!["program".to_owned(), program.name.clone()]);
        match cluster {
            None => self.at_key(
                &key.child("locks"),
                format!(
                    "lock `{}` is a cluster lock, which needs `cluster` in [plumule] \
                     (the etcd endpoints)",
                    lock.name
                ),
            ),
            Some(c) if program.stop_timeout >= c.lease => self.at_key(
                &key.child("stop_timeout"),
                format!(
                    "must be shorter than the cluster lease ({}) for a program with cluster \
                     lock `{}`: its workers are killed when the lease may expire",
                    crate::format_duration(c.lease),
                    lock.name
                ),
            ),
            Some(_) => {}
        }
    }

    fn program(&mut self, name_spanned: &Spanned<String>, raw: &RawProgram) -> Program {
        let name = name_spanned.get_ref().clone();
        let key = Key(vec!["program".to_owned(), name.clone()]);
        if let Err(e) = values::check_name("program", &name) {
            self.at(name_spanned, &key, e);
        }
        let workers = self.int(
            &key.child("workers"),
            raw.workers.as_ref(),
            0,
            i64::from(MAX_WORKERS),
            1,
        ) as u32;
        let success_exit_codes = match &raw.success_exit_codes {
            None => vec![0],
            Some(codes) => codes
                .iter()
                .filter_map(|c| {
                    let n = *c.get_ref();
                    if (0..=255).contains(&n) {
                        Some(n as i32)
                    } else {
                        let message = format!("exit codes are 0 to 255, found {n}");
                        self.at(c, &key.child("success_exit_codes"), message);
                        None
                    }
                })
                .collect(),
        };
        let start_limit = raw.start_limit.as_ref().map(|s| {
            let k = key.child("start_limit");
            StartLimit {
                burst: self.int(
                    &k.child("burst"),
                    s.burst.as_ref(),
                    1,
                    MAX_BURST,
                    i64::from(DEFAULT_START_LIMIT.burst),
                ) as u32,
                interval: self
                    .positive_duration(&k.child("interval"), s.interval.as_ref())
                    .unwrap_or(DEFAULT_START_LIMIT.interval),
            }
        });
        let user = raw
            .user
            .as_ref()
            .and_then(|u| self.user(&key.child("user"), u));
        let group = match (&raw.group, &user) {
            (Some(g), _) => self.group(&key.child("group"), g),
            (None, Some(u)) => Some(primary_group(u.gid)),
            (None, None) => None,
        };
        let umask = raw.umask.as_ref().and_then(|u| {
            values::octal(u.get_ref(), 0o777, "022")
                .map_err(|e| self.at(u, &key.child("umask"), e))
                .ok()
        });
        if let (Some(q), Some(out)) = (&raw.queue, &raw.stdout) {
            let message = format!(
                "a program that consumes queue `{}` answers jobs on its stdout; remove `stdout`",
                q.get_ref()
            );
            self.at(out, &key.child("stdout"), message);
        }
        let cwd = raw
            .cwd
            .as_ref()
            .and_then(|c| self.path(&key.child("cwd"), c));
        let after = match &raw.after {
            None => Vec::new(),
            Some(after) => {
                let mut names: Vec<String> = Vec::new();
                for a in after {
                    if !names.contains(a.get_ref()) {
                        names.push(a.get_ref().clone());
                    }
                }
                names
            }
        };
        let command = self.command(&key.child("command"), raw.command.as_ref());
        let env = self.env(&key.child("env"), raw.env.as_ref());
        let size = exec_size(&command, &env);
        if size > MAX_ARGS_TOTAL {
            let message = format!(
                "`command` and `env` take {size} bytes at exec, above the limit of \
                 {MAX_ARGS_TOTAL} bytes (half of the usual ARG_MAX, leaving room for the \
                 inherited environment); pass large data in a file"
            );
            match (&raw.env, &raw.command) {
                (Some(_), _) | (None, None) => self.at_key(&key.child("env"), message),
                (None, Some(c)) => self.at(c, &key.child("command"), message),
            }
        }
        Program {
            command,
            restart: self.choice(
                &key.child("restart"),
                "restart policy",
                raw.restart.as_ref(),
                RESTART,
                RestartPolicy::Always,
            ),
            success_exit_codes,
            healthy_after: self.duration(
                &key.child("healthy_after"),
                raw.healthy_after.as_ref(),
                Duration::from_secs(1),
            ),
            backoff: self.backoff(&key.child("backoff"), raw.backoff.as_ref(), DEFAULT_BACKOFF),
            start_limit,
            stop_signal: self.signal(
                &key.child("stop_signal"),
                raw.stop_signal.as_ref(),
                Signal::SIGTERM,
            ),
            stop_timeout: self.duration(
                &key.child("stop_timeout"),
                raw.stop_timeout.as_ref(),
                Duration::from_secs(10),
            ),
            reload: self.choice(
                &key.child("reload"),
                "reload mode",
                raw.reload.as_ref(),
                RELOAD,
                ReloadMode::Restart,
            ),
            reload_signal: self.signal(
                &key.child("reload_signal"),
                raw.reload_signal.as_ref(),
                Signal::SIGHUP,
            ),
            env,
            inherit_env: raw.inherit_env.unwrap_or(true),
            cwd,
            user,
            group,
            umask,
            stdout: self.output(&key.child("stdout"), raw.stdout.as_ref()),
            stderr: self.output(&key.child("stderr"), raw.stderr.as_ref()),
            locks: self.locks(&key.child("locks"), raw.locks.as_deref(), workers),
            ready: self.choice(
                &key.child("ready"),
                "readiness mode",
                raw.ready.as_ref(),
                READY,
                ReadyMode::Started,
            ),
            ready_timeout: self
                .positive_duration(&key.child("ready_timeout"), raw.ready_timeout.as_ref())
                .unwrap_or(Duration::from_secs(30)),
            watchdog: self.positive_duration(&key.child("watchdog"), raw.watchdog.as_ref()),
            listen: self.listen(&key.child("listen"), raw.listen.as_deref(), &name),
            after,
            queue: raw.queue.as_ref().map(|q| q.get_ref().clone()),
            nice: raw
                .nice
                .as_ref()
                .map(|n| self.int(&key.child("nice"), Some(n), -20, 19, 0) as i32),
            oom_score_adj: raw
                .oom_score_adj
                .as_ref()
                .map(|n| self.int(&key.child("oom_score_adj"), Some(n), -1000, 1000, 0) as i32),
            limits: self.limits(&key.child("limits"), raw.limits.as_deref()),
            workers,
            name,
        }
    }

    /// `limits`: a whole number (bytes for the sizes), a size string for `as`, `core` and
    /// `memlock`, or "unlimited" (not for `nofile`, which the kernel always bounds).
    fn limits(
        &mut self,
        key: &Key,
        raw: Option<&[(Spanned<String>, Spanned<Scalar>)]>,
    ) -> Vec<Limit> {
        let mut limits: Vec<Limit> = Vec::new();
        for (name, value) in raw.unwrap_or_default() {
            let k = key.child(name.get_ref());
            let Some(resource) = LimitResource::ALL
                .into_iter()
                .find(|r| r.name() == name.get_ref())
            else {
                continue; // reported when read
            };
            let parsed = match value.get_ref() {
                Scalar::Int(n) if *n >= 0 => Ok(Some(*n as u64)),
                Scalar::Int(n) => Err(format!("must be at least 0, found {n}")),
                Scalar::Str(s) if s.trim().eq_ignore_ascii_case("unlimited") => {
                    if resource == LimitResource::Nofile {
                        Err(
                            "the kernel caps open files (fs.nr_open): give a number like 65536"
                                .to_owned(),
                        )
                    } else {
                        Ok(None)
                    }
                }
                Scalar::Str(_) if resource.is_bytes() => values::size(value.get_ref())
                    .map(Some)
                    .map_err(|e| e.to_string()),
                other => Err(format!(
                    "expected a whole number{} or \"unlimited\", found {}",
                    if resource.is_bytes() {
                        ", a size like \"64MiB\""
                    } else {
                        ""
                    },
                    match other {
                        Scalar::Str(s) => format!("{s:?}"),
                        Scalar::Int(n) => n.to_string(),
                        Scalar::Float(f) => f.to_string(),
                        Scalar::Bool(b) => b.to_string(),
                    }
                )),
            };
            match parsed {
                // RLIM_INFINITY is all ones: a number that large would mean "unlimited".
                Ok(Some(v)) if v == u64::MAX => {
                    self.at(value, &k, "too large: write \"unlimited\"")
                }
                Ok(v) => limits.push(Limit { resource, value: v }),
                Err(e) => self.at(value, &k, e),
            }
        }
        limits.sort_by_key(|l| l.resource);
        limits
    }

    fn command(&mut self, key: &Key, raw: Option<&Spanned<RawCommand>>) -> CommandSpec {
        let Some(raw) = raw else {
            self.at_key(
                key,
                "missing key `command`: an argv array like [\"/usr/bin/app\", \"--flag\"], \
                 or a string run by /bin/sh -c",
            );
            return CommandSpec::Argv(Vec::new());
        };
        match raw.get_ref() {
            RawCommand::Shell(line) => {
                if line.trim().is_empty() {
                    self.at(raw, key, "the command is empty");
                } else if line.contains('\0') {
                    self.at(raw, key, "the command contains a NUL character");
                } else if line.len() > MAX_ARG_STRING {
                    self.at(raw, key, too_long("the command", line.len()));
                }
                CommandSpec::Shell(line.clone())
            }
            RawCommand::Argv(args) => {
                let Some(first) = args.first() else {
                    self.at(
                        raw,
                        key,
                        "the command is empty: name at least the program to run",
                    );
                    return CommandSpec::Argv(Vec::new());
                };
                if first.get_ref().is_empty() {
                    self.at(
                        first,
                        key,
                        "the program to run (the first element) is empty",
                    );
                }
                for arg in args {
                    if arg.get_ref().contains('\0') {
                        self.at(arg, key, "an argument contains a NUL character");
                    } else if arg.get_ref().len() > MAX_ARG_STRING {
                        self.at(arg, key, too_long("the argument", arg.get_ref().len()));
                    }
                }
                let mut argv: Vec<String> = args.iter().map(|a| a.get_ref().clone()).collect();
                let program = Path::new(&argv[0]);
                if !program.is_absolute() && argv[0].contains('/') {
                    match resolve(&self.dir, program).into_os_string().into_string() {
                        Ok(resolved) => argv[0] = resolved,
                        Err(_) => self.at(
                            first,
                            key,
                            "the config folder is not valid UTF-8, so this relative path \
                             cannot be resolved; use an absolute path",
                        ),
                    }
                }
                CommandSpec::Argv(argv)
            }
        }
    }

    fn env(
        &mut self,
        key: &Key,
        raw: Option<&BTreeMap<Spanned<String>, Spanned<String>>>,
    ) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        for (name, value) in raw.into_iter().flatten() {
            let k = key.child(name.get_ref());
            let n = name.get_ref();
            if n.is_empty() || n.contains('=') || n.contains('\0') {
                self.at(
                    name,
                    &k,
                    format!(
                        "invalid variable name {}: it must be non-empty, without `=` or NUL",
                        display_key(n)
                    ),
                );
            } else if PLUMULE_ENV
                .iter()
                .chain(super::SYSTEMD_ENV)
                .any(|r| *r == n.as_str())
            {
                self.at(
                    name,
                    &k,
                    format!("`{n}` is set by plumule for every worker"),
                );
            }
            if value.get_ref().contains('\0') {
                self.at(value, &k, "the value contains a NUL character");
            }
            let entry = n.len() + 1 + value.get_ref().len();
            if entry > MAX_ARG_STRING {
                self.at(value, &k, too_long("the variable (NAME=VALUE)", entry));
            }
            env.insert(n.clone(), value.get_ref().clone());
        }
        env
    }

    fn output(&mut self, key: &Key, raw: Option<&Spanned<RawOutput>>) -> OutputSpec {
        let Some(raw) = raw else {
            return OutputSpec::Log;
        };
        match raw.get_ref() {
            RawOutput::Mode(mode) => match OUTPUT.iter().find(|(name, _)| name == mode) {
                Some((_, OutputMode::Log)) => OutputSpec::Log,
                Some((_, OutputMode::Inherit)) => OutputSpec::Inherit,
                Some((_, OutputMode::Null)) => OutputSpec::Null,
                None => {
                    let names: Vec<&str> = OUTPUT.iter().map(|(name, _)| *name).collect();
                    let message = match suggest(mode, &names) {
                        Some(s) => format!("unknown output `{mode}`, did you mean `{s}`?"),
                        None => format!(
                            "unknown output `{mode}`; expected \"log\", \"inherit\", \"null\" \
                             or {{ file = \"...\" }}"
                        ),
                    };
                    self.at(raw, key, message);
                    OutputSpec::Log
                }
            },
            RawOutput::File(f) => {
                let path = match &f.file {
                    Some(file) => self.path(&key.child("file"), file),
                    None => {
                        self.at(
                            raw,
                            &key.child("file"),
                            "missing key `file`: the file to write to",
                        );
                        None
                    }
                };
                let max_size = f
                    .max_size
                    .as_ref()
                    .and_then(|m| self.size(&key.child("max_size"), m, u64::MAX));
                if let (Some(keep), None) = (&f.keep, &f.max_size) {
                    self.at(
                        keep,
                        &key.child("keep"),
                        "`keep` needs `max_size`: without it the file is never rotated",
                    );
                }
                let keep = self.int(&key.child("keep"), f.keep.as_ref(), 1, MAX_KEEP, 5) as u32;
                OutputSpec::File {
                    path: path.unwrap_or_default(),
                    max_size,
                    keep,
                }
            }
        }
    }

    fn locks(
        &mut self,
        key: &Key,
        raw: Option<&[Spanned<RawLock>]>,
        workers: u32,
    ) -> Vec<LockSpec> {
        let mut locks: Vec<LockSpec> = Vec::new();
        for item in raw.unwrap_or_default() {
            let (name, shared, span) = match item.get_ref() {
                RawLock::Name(name) => (name, false, item.span()),
                RawLock::Table(t) => match &t.name {
                    Some(name) => (name.get_ref(), t.shared.unwrap_or(false), name.span()),
                    None => {
                        self.at(
                            item,
                            &key.child("name"),
                            "missing key `name`: the lock's name",
                        );
                        continue;
                    }
                },
            };
            let max_id = workers.saturating_sub(1);
            if let Err(e) = values::check_lock_template(name, max_id) {
                self.report(Some(span.clone()), key, e);
            } else if locks.iter().any(|l| &l.name == name) {
                // Two open files on one lock would make the worker wait for itself.
                self.report(
                    Some(span.clone()),
                    key,
                    format!("lock `{name}` is listed twice"),
                );
            }
            let cluster = match item.get_ref() {
                RawLock::Table(t) => t.cluster.unwrap_or(false),
                RawLock::Name(_) => false,
            };
            if cluster && shared {
                self.report(
                    Some(span),
                    key,
                    format!("lock `{name}`: a cluster lock cannot be shared"),
                );
            }
            locks.push(LockSpec {
                name: name.clone(),
                shared,
                cluster,
            });
        }
        locks
    }

    fn listen(
        &mut self,
        key: &Key,
        raw: Option<&[Spanned<RawListen>]>,
        program: &str,
    ) -> Vec<ListenSpec> {
        let mut listen = Vec::new();
        for item in raw.unwrap_or_default() {
            let (address, address_span, name, mode) = match item.get_ref() {
                RawListen::Address(a) => (a, item.span(), None, None),
                RawListen::Table(t) => match &t.address {
                    Some(a) => (a.get_ref(), a.span(), t.name.as_ref(), t.mode.as_ref()),
                    None => {
                        self.at(
                            item,
                            &key.child("address"),
                            "missing key `address`: like \"tcp:0.0.0.0:8080\"",
                        );
                        continue;
                    }
                },
            };
            let address = match values::listen_addr(address, &self.dir) {
                Ok(a) => a,
                Err(e) => {
                    self.report(Some(address_span), key, e);
                    continue;
                }
            };
            if !matches!(address, ListenAddr::Systemd(_)) {
                let other = self.listen_seen.iter().find(|(a, _)| *a == address);
                if let Some((_, other)) = other {
                    let message = if other == program {
                        "this address is listed twice".to_owned()
                    } else {
                        format!("program `{other}` listens on this address too")
                    };
                    self.report(Some(address_span.clone()), key, message);
                }
                self.listen_seen.push((address.clone(), program.to_owned()));
            }
            let name = match name {
                Some(n) => {
                    if let Err(e) = values::check_fd_name(n.get_ref()) {
                        self.at(n, &key.child("name"), e);
                    }
                    n.get_ref().clone()
                }
                None => program.to_owned(),
            };
            let mode = mode.and_then(|m| {
                if !matches!(address, ListenAddr::Unix(_)) {
                    self.at(
                        m,
                        &key.child("mode"),
                        "`mode` applies to unix: sockets only",
                    );
                    return None;
                }
                values::octal(m.get_ref(), 0o777, "0660")
                    .map_err(|e| self.at(m, &key.child("mode"), e))
                    .ok()
            });
            listen.push(ListenSpec {
                address,
                name,
                mode,
            });
        }
        listen
    }

    /// `after` and `queue` name things that exist.
    fn references(
        &mut self,
        files: &[FileInput<'a>],
        dirs: &[PathBuf],
        programs: &Programs,
        queues: &BTreeMap<Spanned<String>, (usize, &RawQueue)>,
    ) {
        let program_names: Vec<&str> = programs.keys().map(|k| k.get_ref().as_str()).collect();
        let queue_names: Vec<&str> = queues.keys().map(|k| k.get_ref().as_str()).collect();
        for (name, &(i, p)) in programs {
            self.enter(i, files[i].source, &dirs[i]);
            let key = Key(vec!["program".to_owned(), name.get_ref().clone()]);
            for a in p.after.iter().flatten() {
                if !program_names.contains(&a.get_ref().as_str()) {
                    let message = undefined("program", a.get_ref(), &program_names);
                    self.at(a, &key.child("after"), message);
                }
            }
            if let Some(q) = &p.queue {
                if !queue_names.contains(&q.get_ref().as_str()) {
                    let message = undefined("queue", q.get_ref(), &queue_names);
                    self.at(q, &key.child("queue"), message);
                }
            }
        }
    }

    /// Reports each cycle of `after` once, at the entry that closes it.
    fn after_cycles(&mut self, files: &[FileInput<'a>], dirs: &[PathBuf], programs: &Programs) {
        let names: Vec<&str> = programs.keys().map(|k| k.get_ref().as_str()).collect();
        let index = |n: &str| names.iter().position(|m| *m == n);
        // Edges to defined programs only; the undefined ones are reported already.
        let edges: Vec<Vec<(usize, &Spanned<String>)>> = programs
            .values()
            .map(|(_, p)| {
                p.after
                    .iter()
                    .flatten()
                    .filter_map(|a| Some((index(a.get_ref())?, a)))
                    .collect()
            })
            .collect();
        #[derive(Clone, Copy, PartialEq)]
        enum Mark {
            New,
            OnPath,
            Done,
        }
        let mut mark = vec![Mark::New; names.len()];
        let mut cycles = Vec::new();
        // Iterative depth-first search: (program, next edge to follow).
        for start in 0..names.len() {
            if mark[start] != Mark::New {
                continue;
            }
            let mut path: Vec<(usize, usize)> = vec![(start, 0)];
            mark[start] = Mark::OnPath;
            while let Some(top) = path.last_mut() {
                let node = top.0;
                let Some(&(target, entry)) = edges[node].get(top.1) else {
                    mark[node] = Mark::Done;
                    path.pop();
                    continue;
                };
                top.1 += 1;
                match mark[target] {
                    Mark::New => {
                        mark[target] = Mark::OnPath;
                        path.push((target, 0));
                    }
                    Mark::OnPath => {
                        let from = path.iter().position(|&(n, _)| n == target).unwrap_or(0);
                        let mut cycle: Vec<&str> =
                            path[from..].iter().map(|&(n, _)| names[n]).collect();
                        cycle.push(names[target]);
                        cycles.push((node, entry, cycle.join(" -> ")));
                    }
                    Mark::Done => {}
                }
            }
        }
        let file_of: Vec<usize> = programs.values().map(|&(i, _)| i).collect();
        for (node, entry, cycle) in cycles {
            let i = file_of[node];
            self.enter(i, files[i].source, &dirs[i]);
            let key = Key(vec![
                "program".to_owned(),
                names[node].to_owned(),
                "after".to_owned(),
            ]);
            self.at(entry, &key, format!("`after` makes a cycle: {cycle}"));
        }
    }
}

/// A string above the kernel's limit for one argument or environment entry.
fn too_long(what: &str, len: usize) -> String {
    format!(
        "{what} is {len} bytes long, above the limit of {MAX_ARG_STRING} bytes for one \
         argument or environment string (the kernel's MAX_ARG_STRLEN, 128 KiB with its NUL); \
         pass large data in a file"
    )
}

/// What `command` and `env` take at exec, counted as the kernel counts toward ARG_MAX: each
/// string, its NUL and its pointer.
fn exec_size(command: &CommandSpec, env: &BTreeMap<String, String>) -> usize {
    let string = |len: usize| len + 1 + std::mem::size_of::<usize>();
    let argv: usize = match command {
        CommandSpec::Argv(args) => args.iter().map(|a| string(a.len())).sum(),
        CommandSpec::Shell(line) => string("/bin/sh".len()) + string(2) + string(line.len()),
        CommandSpec::Function(_) => 0,
    };
    let envp: usize = env.iter().map(|(k, v)| string(k.len() + 1 + v.len())).sum();
    argv + envp
}

fn undefined(what: &str, name: &str, defined: &[&str]) -> String {
    match suggest(name, defined) {
        Some(s) => format!("no {what} named `{name}`, did you mean `{s}`?"),
        None if defined.is_empty() => format!("no {what} named `{name}`: none is defined"),
        None => format!("no {what} named `{name}`"),
    }
}

/// The group of a user's primary gid; the name is the gid itself when the group database has
/// no entry for it.
fn primary_group(gid: u32) -> GroupSpec {
    let name = match Group::from_gid(Gid::from_raw(gid)) {
        Ok(Some(g)) => g.name,
        _ => gid.to_string(),
    };
    GroupSpec { name, gid }
}
