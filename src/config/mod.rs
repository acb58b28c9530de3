//! Configuration: the TOML file as the user wrote it (`raw`: plain structs read key by key
//! from toml_edit's spanned document) and the validated [`Config`] that the rest of plumule
//! trusts.
//!
//! Invariants of a [`Config`]: every name is valid, every reference (`after`, `queue`) resolves,
//! every path is absolute, every user and group exists, and `after` has no cycle.
//!
//! Reading a file is [`load`] (permission checks, then [`parse`]). Every problem of a file is
//! reported at once: unknown keys (with the key probably meant), values of the wrong type, and
//! every validation problem; a key reported as unknown or mistyped gets no follow-up ("missing
//! key") problem. The one exception is a TOML syntax error, after which nothing can be read,
//! except a number with a leading zero (`umask = 022`): that gets its own hint and the rest of
//! the file is still checked. Each problem is located (`FILE:LINE:COL: KEY: message`), see
//! [`ConfigError`]. [`load_for_check`] adds the warnings of `plumule check` ([`Warnings`]).
//!
//! Value syntaxes, decided here:
//! - durations are strings in humantime syntax ("250ms", "10s", "1h 30m"); a number is an
//!   error that shows the string to write;
//! - sizes are strings: a whole number and a unit among B, KB, MB, GB, TB (powers of 1000) and
//!   KiB, MiB, GiB, TiB (powers of 1024), case ignored, optional space ("10MiB", "512 KB");
//!   a number is an error, as for durations;
//! - signals are names, case ignored, `SIG` prefix optional ("TERM", "SIGTERM", "term");
//! - `umask` and a listen `mode` are strings of 1 to 4 octal digits ("022", "0660");
//! - `stdout`/`stderr` files: no `max_size` means never rotate; `keep` (1 to 1000, default 5)
//!   needs `max_size`;
//! - `start_limit` sub-keys default to systemd's: `burst` 5, `interval` "10s";
//! - `user` and `group` are names, or numeric ids that exist in the user/group database;
//! - `env` may not set the variables plumule sets itself (`PLUMULE_*`, `NOTIFY_SOCKET`,
//!   `LISTEN_*`, `WATCHDOG_*`);
//! - limits (README "Limits"): `workers` ≤ [`MAX_WORKERS`] per program and
//!   ≤ [`MAX_TOTAL_WORKERS`] over all programs; 10 000 programs and 10 000 queues; each `env` string (`KEY=VALUE`) and each
//!   command argument under the kernel's per-string limit ([`MAX_ARG_STRING`]), and a
//!   program's own environment and argv together ≤ [`MAX_ARGS_TOTAL`]; every duration
//!   ≤ [`MAX_DURATION`] (10 years); `prefetch` ≤ 10 000, `max_pending` ≤ 100 000 000,
//!   `start_limit.burst` ≤ 10 000, `partitions` ≤ 65 536, `max_frame` < 4 GiB (a frame
//!   length is 4 bytes), exit codes 0 to 255;
//! - `node` is `[A-Za-z0-9._-]{1,253}` (default: the host name); `cluster.etcd` lists
//!   `http://` or `https://` endpoints, `cluster.lease` is at least 1s (default 10s); a queue's
//!   `backend` is a `redis://` or `unix://` URL, `claim_after` (default 30s) is positive,
//!   `partitions` (default 64) is 1 to 65 536; a program with a cluster lock needs `cluster`
//!   and a `stop_timeout` shorter than the lease, and a cluster lock is never `shared`;
//! - the per-user runtime folder in /tmp (no `$XDG_RUNTIME_DIR`) is created 0700 when missing
//!   and refused when it is not a directory of ours that only we may write (see
//!   [`check_private_dir`]).
//!
//! Relative paths (`runtime_dir`, `state_dir`, `lock_dir`, `cwd`, output files, a `unix:`
//! address, and a command's program when it contains a slash) resolve against the folder of
//! the file.

mod include;
mod locate;
mod raw;
mod validate;
mod values;
mod warnings;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;

pub use locate::Location;
pub use values::mask_credentials;
pub use warnings::{Probe, Warnings};

/// A validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file it was read from (absolute).
    pub path: PathBuf,
    pub runtime_dir: PathBuf,
    pub state_dir: PathBuf,
    pub lock_dir: PathBuf,
    pub control_group: Option<GroupSpec>,
    /// Where the Prometheus endpoint listens: `Tcp` or `Unix`, never `Systemd`.
    pub metrics: Option<ListenAddr>,
    pub shutdown_timeout: Duration,
    pub log_level: log::LevelFilter,
    /// This master's name in a cluster: `node`, else the host name.
    pub node: String,
    /// `cluster = { etcd = [...], lease = "10s" }` (SPEC §10).
    pub cluster: Option<Cluster>,
    /// Sorted by name.
    pub programs: Vec<Program>,
    /// Sorted by name.
    pub queues: Vec<Queue>,
}

/// The etcd cluster this master joins (SPEC §10).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    /// etcd endpoints, `http://` or `https://` URLs; never empty.
    pub etcd: Vec<String>,
    /// The TTL of the master's lease.
    pub lease: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Program {
    pub name: String,
    pub command: CommandSpec,
    pub workers: u32,
    pub restart: RestartPolicy,
    pub success_exit_codes: Vec<i32>,
    pub healthy_after: Duration,
    pub backoff: Backoff,
    pub start_limit: Option<StartLimit>,
    pub stop_signal: Signal,
    pub stop_timeout: Duration,
    pub reload: ReloadMode,
    pub reload_signal: Signal,
    pub env: BTreeMap<String, String>,
    pub inherit_env: bool,
    /// Absolute.
    pub cwd: Option<PathBuf>,
    pub user: Option<UserSpec>,
    /// Explicit `group`, else the user's primary group when `user` is set.
    pub group: Option<GroupSpec>,
    pub umask: Option<u32>,
    pub stdout: OutputSpec,
    pub stderr: OutputSpec,
    pub locks: Vec<LockSpec>,
    pub ready: ReadyMode,
    pub ready_timeout: Duration,
    pub watchdog: Option<Duration>,
    pub listen: Vec<ListenSpec>,
    pub after: Vec<String>,
    pub queue: Option<String>,
    /// Scheduling niceness, -20 to 19 (`None`: the master's).
    pub nice: Option<i32>,
    /// `/proc/self/oom_score_adj`, -1000 to 1000 (`None`: the master's).
    pub oom_score_adj: Option<i32>,
    /// Resource limits set before exec, at most one per resource, in [`LimitResource`] order.
    pub limits: Vec<Limit>,
}

/// A resource `limits` can set (setrlimit(2)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LimitResource {
    /// RLIMIT_AS: address space, bytes.
    As,
    /// RLIMIT_CORE: core file size, bytes.
    Core,
    /// RLIMIT_MEMLOCK: locked memory, bytes.
    Memlock,
    /// RLIMIT_NOFILE: open descriptors.
    Nofile,
    /// RLIMIT_NPROC: processes of the worker's user.
    Nproc,
}

impl LimitResource {
    /// Every resource, in order.
    pub const ALL: [LimitResource; 5] = [
        LimitResource::As,
        LimitResource::Core,
        LimitResource::Memlock,
        LimitResource::Nofile,
        LimitResource::Nproc,
    ];

    /// Its key in `limits`.
    pub fn name(self) -> &'static str {
        match self {
            LimitResource::As => "as",
            LimitResource::Core => "core",
            LimitResource::Memlock => "memlock",
            LimitResource::Nofile => "nofile",
            LimitResource::Nproc => "nproc",
        }
    }

    /// Whether its value is a size in bytes (and may be written "64MiB").
    pub fn is_bytes(self) -> bool {
        matches!(
            self,
            LimitResource::As | LimitResource::Core | LimitResource::Memlock
        )
    }
}

/// One entry of `limits`: both the soft and the hard limit are set to `value`, as systemd's
/// `LimitNOFILE=N` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub resource: LimitResource,
    /// `None`: "unlimited".
    pub value: Option<u64>,
}

impl fmt::Display for Limit {
    /// `nofile 65536`, `core unlimited`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.value {
            Some(v) => write!(f, "{} {v}", self.resource.name()),
            None => write!(f, "{} unlimited", self.resource.name()),
        }
    }
}

/// What to execute. A relative `argv[0]` with a slash has been made absolute against the config
/// folder; a bare name is kept as written and looked up in PATH at spawn time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandSpec {
    Argv(Vec<String>),
    /// A plain string: run through `/bin/sh -c`.
    Shell(String),
    /// No command: a Rust function run in the forked worker, without exec (the library's
    /// services, see [`crate::ServiceManager`]). Never read from a file.
    Function(Function),
}

/// The body of a worker that runs Rust code in the forked child: called with the worker's id
/// and the program's worker count, it returns the worker's exit code.
#[derive(Clone)]
pub struct Function(pub std::sync::Arc<dyn Fn(u32, u32) -> i32 + Send + Sync>);

impl fmt::Debug for Function {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Function(..)")
    }
}

/// The same function, not an equal one: two closures cannot be compared.
impl PartialEq for Function {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Function {}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartPolicy {
    Always,
    OnFailure,
    Never,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    pub multiplier: f64,
    pub jitter: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartLimit {
    pub burst: u32,
    pub interval: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadMode {
    Restart,
    Signal,
    None,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserSpec {
    pub name: String,
    pub uid: u32,
    /// The user's primary group.
    pub gid: u32,
    pub home: PathBuf,
    pub shell: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSpec {
    pub name: String,
    pub gid: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputSpec {
    Log,
    Inherit,
    Null,
    File {
        /// Absolute.
        path: PathBuf,
        /// None: never rotate.
        max_size: Option<u64>,
        /// How many rotated files to keep (FILE.1 .. FILE.keep).
        keep: u32,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockSpec {
    /// May contain `{worker}`; valid after expansion.
    pub name: String,
    pub shared: bool,
    /// Held through etcd across the cluster (SPEC §10) rather than as a file.
    pub cluster: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadyMode {
    Started,
    Notify,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenSpec {
    pub address: ListenAddr,
    /// LISTEN_FDNAMES entry; default the program's name.
    pub name: String,
    /// For `unix:` sockets.
    pub mode: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ListenAddr {
    Tcp(std::net::SocketAddr),
    /// Absolute.
    Unix(PathBuf),
    /// A socket passed to the master by systemd, by name.
    Systemd(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Queue {
    pub name: String,
    pub durable: bool,
    pub protocol: QueueProtocol,
    pub prefetch: u32,
    pub max_attempts: u32,
    pub retry_backoff: Backoff,
    pub route: Route,
    pub max_pending: u64,
    pub max_frame: u64,
    /// A job in flight longer than this (counted from when it became the oldest unanswered
    /// job of its worker) gets the worker stopped and is redelivered.
    pub job_timeout: Option<Duration>,
    /// `redis://…`: the queue lives in Redis (SPEC §10); `None`: in this master.
    pub backend: Option<String>,
    /// With a backend: how long a job fetched by a master that stopped stays unacknowledged
    /// before another master claims it.
    pub claim_after: Duration,
    /// With a backend and `route = "key"`: how many key partitions.
    pub partitions: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueProtocol {
    Lines,
    Frames,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    LeastLoaded,
    RoundRobin,
    Key,
}

impl Config {
    pub fn program(&self, name: &str) -> Option<&Program> {
        self.programs.iter().find(|p| p.name == name)
    }
}

/// The most workers one program may have: a typo such as `workers = 40000` must not fork the
/// machine to death.
pub const MAX_WORKERS: u32 = 10_000;

/// The most workers all programs together may have: each is a process, with its pipes and
/// slot, and 200 million of them are a typo, not a plan.
pub const MAX_TOTAL_WORKERS: u64 = 100_000;

/// The longest string one argument or environment entry may be, in bytes, without the NUL:
/// the kernel refuses longer ones at exec (`MAX_ARG_STRLEN`, 32 pages of 4 KiB, NUL included).
pub const MAX_ARG_STRING: usize = 128 * 1024 - 1;

/// The most a program's own `env` and `command` may take together at exec, counted as the
/// kernel does (each string, its NUL and its 8-byte pointer): half of the usual `ARG_MAX`
/// (2 MiB, a quarter of the default 8 MiB stack limit), which leaves the other half for the
/// inherited environment and plumule's own variables.
pub const MAX_ARGS_TOTAL: usize = 1024 * 1024;

/// The longest duration any key accepts: 10 years (humantime's, 365.25 days each). Beyond
/// it a value is a typo, and `Instant` arithmetic would overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(10 * 31_557_600);

/// The systemd protocol variables plumule sets for workers itself (and never passes on from
/// its own environment).
pub const SYSTEMD_ENV: &[&str] = &[
    "NOTIFY_SOCKET",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
];

/// A key whose feature is not built yet. A file that sets it is refused ("`after` is not
/// supported yet") rather than silently half-obeyed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unsupported {
    /// A dotted key path; `*` matches any one key (a program or queue name).
    pub key: &'static str,
    /// Refused only when set to this string, or to this boolean (`"true"`, `"false"`);
    /// `None`: whatever the value.
    pub value: Option<&'static str>,
}

/// Keys whose feature is not built yet. Shipping a feature removes its line.
pub const UNSUPPORTED: &[Unsupported] = &[];

/// The entry of [`UNSUPPORTED`] that a key set in a file falls under, if any. `path` is the
/// key's full path (`["program", "web", "after"]`; an array's items have their array's path),
/// `value` its value when it is a string or a boolean (`"true"`).
pub fn unsupported(path: &[&str], value: Option<&str>) -> Option<&'static Unsupported> {
    find_unsupported(UNSUPPORTED, path, value)
}

fn find_unsupported<'a>(
    list: &'a [Unsupported],
    path: &[&str],
    value: Option<&str>,
) -> Option<&'a Unsupported> {
    list.iter().find(|u| {
        let pattern: Vec<&str> = u.key.split('.').collect();
        pattern.len() == path.len()
            && pattern.iter().zip(path).all(|(p, k)| *p == "*" || p == k)
            && u.value.is_none_or(|v| value == Some(v))
    })
}

impl Unsupported {
    /// How a message names it: the last key that is not a wildcard, with the value if any
    /// (`after`, `queue`, `ready = "notify"`).
    fn label(&self) -> String {
        let key = self.key.rsplit('.').find(|k| *k != "*").unwrap_or(self.key);
        match self.value {
            Some(v @ ("true" | "false")) => format!("{key} = {v}"),
            Some(v) => format!("{key} = \"{v}\""),
            None => key.to_owned(),
        }
    }
}

/// Why a configuration file was refused: one or more problems, each located when possible.
///
/// Displayed one problem per line, as `FILE:LINE:COL: KEY: message`, e.g.
/// `/etc/plumule/plumule.toml:7:1: program.web.worker: unknown key `worker`, did you mean
/// `workers`?`. The line and column, or the key, are left out when unknown (a file that cannot
/// be read has neither).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file (absolute).
    pub path: PathBuf,
    /// Sorted by location; never empty.
    pub problems: Vec<Problem>,
}

/// One problem with a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The included file the problem is in; `None`: the main file.
    pub file: Option<PathBuf>,
    pub location: Option<Location>,
    /// The dotted key path, e.g. `program.web.backoff.initial`.
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write_problem(f, &self.path, problem)?;
        }
        Ok(())
    }
}

/// `FILE:LINE:COL: KEY: message`, leaving out what is unknown.
fn write_problem(f: &mut fmt::Formatter<'_>, path: &Path, problem: &Problem) -> fmt::Result {
    let path = problem.file.as_deref().unwrap_or(path);
    write!(f, "{}", path.display())?;
    if let Some(Location { line, column }) = problem.location {
        write!(f, ":{line}:{column}")?;
    }
    if let Some(key) = &problem.key {
        write!(f, ": {key}")?;
    }
    write!(f, ": {}", problem.message)
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    fn whole_file(path: &Path, message: String) -> Self {
        ConfigError {
            path: path.to_path_buf(),
            problems: vec![Problem {
                file: None,
                location: None,
                key: None,
                message,
            }],
        }
    }
}

/// A problem before it is located: the byte span of the file it concerns.
#[derive(Debug)]
struct Pending {
    /// Index of the file among those read: 0 the main file, then the included ones.
    file: usize,
    span: Option<std::ops::Range<usize>>,
    key: Option<String>,
    message: String,
}

/// What parsing needs from the process, injectable so that tests need not change the real
/// environment.
struct Host<'a> {
    var: &'a dyn Fn(&str) -> Option<OsString>,
    euid: u32,
    /// The default `node`.
    hostname: &'a str,
    /// Checks (and creates) the per-user folder in /tmp: [`check_private_dir`].
    private_dir: &'a dyn Fn(&Path, u32) -> Result<(), String>,
}

/// A signal by name, exactly as the config file reads `stop_signal`: "HUP", "SIGHUP", "hup"
/// (case ignored, `SIG` optional); the error says what was meant or how to write one.
/// `plumule signal` uses it too, so the command line and the file accept the same names.
pub fn parse_signal(name: &str) -> Result<Signal, String> {
    values::signal(name).map_err(String::from)
}

/// The configuration file to use: `cli` (`-c/--config`), else `$PLUMULE_CONFIG`, else
/// `./plumule.toml` when it exists, else `/etc/plumule/plumule.toml`.
pub fn find_config_path(cli: Option<&Path>) -> PathBuf {
    choose_config_path(
        cli,
        std::env::var_os("PLUMULE_CONFIG"),
        Path::new("plumule.toml").exists(),
    )
}

fn choose_config_path(cli: Option<&Path>, env: Option<OsString>, local: bool) -> PathBuf {
    if let Some(path) = cli {
        path.to_path_buf()
    } else if let Some(path) = env.filter(|p| !p.is_empty()) {
        PathBuf::from(path)
    } else if local {
        PathBuf::from("plumule.toml")
    } else {
        PathBuf::from("/etc/plumule/plumule.toml")
    }
}

/// Reads, checks and validates the configuration file at `path`.
///
/// Like sshd, refuses a file that someone other than its owner could have written: one that is
/// writable by its group or by others, or owned by a user other than root and the current
/// effective user. The checks apply to the file opened (symbolic links followed).
///
/// A file that holds a password (a queue's `backend` URL with one) must not be readable by
/// others either (SPEC §7).
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let (path, text, mode) = read_trusted(path)?;
    let config = parse(&text, &path)?;
    check_secrets(&config, &path, mode)?;
    Ok(config)
}

/// Refuses a main file readable by others when a queue's `backend` URL in the config carries
/// a password.
fn check_secrets(config: &Config, path: &Path, mode: u32) -> Result<(), ConfigError> {
    let secret = config
        .queues
        .iter()
        .filter_map(|q| q.backend.as_deref())
        .find(|url| crate::queue::redis::has_password(url));
    if secret.is_some() && mode & 0o004 != 0 {
        return Err(ConfigError::whole_file(
            path,
            format!(
                "refusing a configuration file readable by others (mode {:04o}) that holds a \
                 password (a queue's `backend` URL): run `chmod o-r` on it",
                mode & 0o7777
            ),
        ));
    }
    Ok(())
}

/// [`load`], and the warnings of `plumule check` about what cannot run as written on this
/// host (see [`Probe`]).
pub fn load_for_check(path: &Path, probe: &Probe) -> Result<(Config, Warnings), ConfigError> {
    let (path, text, mode) = read_trusted(path)?;
    let (config, files) = parse_files(&text, &path, &this_host(), UNSUPPORTED)?;
    check_secrets(&config, &path, mode)?;
    let warnings = warnings::warnings(&config, &files, probe);
    Ok((config, warnings))
}

/// The absolute path and the content of the file at `path`, once it passed the checks of
/// [`load`].
fn read_trusted(path: &Path) -> Result<(PathBuf, String, u32), ConfigError> {
    let path = absolute(path);
    let fail = |message: String| ConfigError::whole_file(&path, message);
    let read = || -> io::Result<(std::fs::Metadata, String)> {
        let mut file = std::fs::File::open(&path)?;
        // Checked on the open file, so the file judged is the file read.
        let metadata = file.metadata()?;
        let mut text = String::new();
        if metadata.is_file() {
            io::Read::read_to_string(&mut file, &mut text)?;
        }
        Ok((metadata, text))
    };
    let (metadata, text) =
        read().map_err(|e| fail(format!("cannot read the configuration file: {e}")))?;
    if !metadata.is_file() {
        return Err(fail("not a regular file".to_owned()));
    }
    check_ownership(&metadata, nix::unistd::geteuid().as_raw()).map_err(|e| fail(e.to_string()))?;
    Ok((path, text, metadata.mode()))
}

/// Why a configuration file is refused before it is read as TOML.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum Untrusted {
    #[error(
        "refusing a configuration file writable by {writers} (mode {mode:04o}): whoever can \
         write it chooses what plumule runs; run `chmod go-w` on it"
    )]
    Writable { writers: &'static str, mode: u32 },
    #[error(
        "refusing a configuration file owned by uid {owner}, neither root nor the current \
         user (uid {euid}): its owner chooses what plumule runs; `chown` it"
    )]
    Owner { owner: u32, euid: u32 },
}

/// The sshd rule: only the file's owner may be able to write it, and the owner must be root or
/// us, since whoever can write the file chooses what plumule runs (possibly as root).
fn check_ownership(metadata: &std::fs::Metadata, euid: u32) -> Result<(), Untrusted> {
    let mode = metadata.mode();
    let writers = match (mode & 0o020 != 0, mode & 0o002 != 0) {
        (true, true) => Some("its group and by others"),
        (true, false) => Some("its group"),
        (false, true) => Some("others"),
        (false, false) => None,
    };
    if let Some(writers) = writers {
        return Err(Untrusted::Writable {
            writers,
            mode: mode & 0o7777,
        });
    }
    let owner = metadata.uid();
    if owner != 0 && owner != euid {
        return Err(Untrusted::Owner { owner, euid });
    }
    Ok(())
}

/// Validates `text`, the content of the file at `path`, into a [`Config`]. Does no permission
/// checks (see [`load`]). `path` names the file in messages, and its folder is where relative
/// paths resolve. Users and groups are looked up on this system; default folders come from the
/// environment (SPEC §2).
///
/// The files `include` names are read from the file system (with the checks of [`load`]).
pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
    parse_with(text, path, &this_host(), UNSUPPORTED)
}

fn this_host() -> Host<'static> {
    static HOSTNAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    Host {
        var: &|name: &str| std::env::var_os(name),
        euid: nix::unistd::geteuid().as_raw(),
        hostname: HOSTNAME.get_or_init(hostname),
        private_dir: &check_private_dir,
    }
}

/// The host name (the kernel's `uname -n`), "localhost" when it cannot be read.
pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// The per-user folder in /tmp that holds the default runtime (and maybe state) dir when
/// there is no `$XDG_RUNTIME_DIR`: created 0700 when missing, else it must be a directory
/// (not a symbolic link) owned by `euid` that neither its group nor others may write. /tmp is
/// shared: a folder created beforehand by another user, or left writable, would let that user
/// swap `run/` (and the control socket in it) later. OpenSSH and tmux check theirs the same
/// way. Returns the message saying how to fix it.
pub fn check_private_dir(dir: &Path, euid: u32) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt;
    let how = "remove it (as its owner or root) so that plumule creates it again, or set \
               `runtime_dir` in [plumule] (or $XDG_RUNTIME_DIR)";
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("cannot create {}: {e}", dir.display())),
    }
    // lstat: a symbolic link planted there is refused, not followed.
    let meta = std::fs::symlink_metadata(dir)
        .map_err(|e| format!("cannot inspect {}: {e}", dir.display()))?;
    if !meta.is_dir() {
        return Err(format!(
            "refusing the per-user folder {}: it is not a directory; {how}",
            dir.display()
        ));
    }
    if meta.uid() != euid {
        return Err(format!(
            "refusing the per-user folder {}: it belongs to uid {}, not to you (uid {euid}), \
             who could replace what plumule keeps there; {how}",
            dir.display(),
            meta.uid()
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(format!(
            "refusing the per-user folder {}: others may write to it (mode {:04o}) and replace \
             what plumule keeps there; run `chmod go-w {}`, or {how}",
            dir.display(),
            meta.mode() & 0o7777,
            dir.display()
        ));
    }
    Ok(())
}

/// [`parse`] with the process's environment and the list of unsupported keys as parameters.
fn parse_with(
    text: &str,
    path: &Path,
    host: &Host,
    unsupported: &[Unsupported],
) -> Result<Config, ConfigError> {
    parse_files(text, path, host, unsupported).map(|(config, _)| config)
}

/// One file read for a configuration: its path, its text (leading zeros blanked), what was
/// read from it (`None` after a syntax error).
struct ReadFile {
    path: PathBuf,
    text: String,
    raw: Option<raw::RawFile>,
}

/// [`parse_with`], also returning every file read (the main one first) with its text.
fn parse_files(
    text: &str,
    path: &Path,
    host: &Host,
    unsupported: &[Unsupported],
) -> Result<(Config, Vec<(PathBuf, String)>), ConfigError> {
    let path = absolute(path);
    let mut pending: Vec<Pending> = Vec::new();
    let mut reported: Vec<String> = Vec::new();
    let mut files = vec![read_one(text, &path, 0, &mut pending, &mut reported)];
    let patterns = files[0]
        .raw
        .as_ref()
        .and_then(|r| r.include.clone())
        .unwrap_or_default();
    for (path, text) in included(&patterns, &path, &mut pending) {
        let index = files.len();
        files.push(read_one(&text, &path, index, &mut pending, &mut reported));
    }
    let sources: Vec<locate::Source> = files.iter().map(|f| locate::Source::new(&f.text)).collect();
    let covers = |key: &str| {
        reported.iter().any(|r| {
            key.strip_prefix(r.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
        })
    };
    if files.iter().all(|f| f.raw.is_some()) {
        let inputs: Vec<validate::FileInput> = files
            .iter()
            .zip(&sources)
            .filter_map(|(f, source)| {
                Some(validate::FileInput {
                    raw: f.raw.as_ref()?,
                    source,
                    path: &f.path,
                })
            })
            .collect();
        match validate::validate(&inputs, host, unsupported) {
            Ok(config) if pending.is_empty() => {
                let read = files.into_iter().map(|f| (f.path, f.text)).collect();
                return Ok((config, read));
            }
            Ok(_) => {}
            Err(found) => pending.extend(
                found
                    .into_iter()
                    .filter(|p| !p.key.as_deref().is_some_and(covers)),
            ),
        }
    }
    let mut problems: Vec<(usize, Problem)> = pending
        .into_iter()
        .map(|p| {
            let problem = Problem {
                file: (p.file > 0).then(|| files[p.file].path.clone()),
                location: p.span.map(|s| sources[p.file].location(s.start)),
                key: p.key,
                // A refused Redis or etcd URL may hold a password (SPEC §7).
                message: values::mask_credentials(&p.message),
            };
            (p.file, problem)
        })
        .collect();
    problems.sort_by_key(|(file, p)| (*file, p.location.is_none(), p.location));
    Err(ConfigError {
        path,
        problems: problems.into_iter().map(|(_, p)| p).collect(),
    })
}

/// Reads one file's text as file `index`, adding its problems to `pending` and the keys they
/// cover to `reported`.
fn read_one(
    text: &str,
    path: &Path,
    index: usize,
    pending: &mut Vec<Pending>,
    reported: &mut Vec<String>,
) -> ReadFile {
    let (text, mut found) = without_leading_zeros(text);
    // A value whose leading zeros were blanked is read as a number that validation would
    // refuse again.
    reported.extend(found.iter().filter_map(|p| p.key.clone()));
    let raw = match toml_edit::ImDocument::parse(text.as_str()) {
        Ok(doc) => {
            let (raw, read) = raw::read(doc.as_table());
            found.extend(read.problems);
            reported.extend(read.reported);
            Some(raw)
        }
        Err(error) => {
            found.push(locate::syntax_error(&error, &locate::Source::new(&text)));
            None
        }
    };
    pending.extend(found.into_iter().map(|p| Pending { file: index, ..p }));
    ReadFile {
        path: path.to_path_buf(),
        text,
        raw,
    }
}

/// The files `include` names (see [`include`]), read with the checks of [`load`]; a pattern
/// that cannot be expanded, or a file that cannot be read, is a problem located at the
/// pattern in the main file.
fn included(
    patterns: &[toml::Spanned<String>],
    main: &Path,
    pending: &mut Vec<Pending>,
) -> Vec<(PathBuf, String)> {
    let dir = main.parent().unwrap_or(Path::new("/"));
    let mut seen: Vec<PathBuf> = vec![std::fs::canonicalize(main).unwrap_or_else(|_| main.into())];
    let mut out = Vec::new();
    for pattern in patterns {
        let problem = |message: String| Pending {
            file: 0,
            span: Some(pattern.span()),
            key: Some("include".to_owned()),
            message,
        };
        let paths = match include::expand(pattern.get_ref(), dir) {
            Ok(paths) => paths,
            Err(e) => {
                pending.push(problem(e));
                continue;
            }
        };
        for path in paths {
            let canonical = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
            if seen.contains(&canonical) {
                continue;
            }
            if out.len() == include::MAX_INCLUDED {
                pending.push(problem(format!(
                    "more than {} included files",
                    include::MAX_INCLUDED
                )));
                return out;
            }
            seen.push(canonical);
            match read_trusted(&path) {
                Ok((path, text, _)) => out.push((path, text)),
                Err(e) => {
                    let why = e
                        .problems
                        .into_iter()
                        .map(|p| p.message)
                        .collect::<Vec<_>>();
                    pending.push(problem(format!(
                        "cannot include {}: {}",
                        path.display(),
                        why.join("; ")
                    )));
                }
            }
        }
    }
    out
}

/// TOML refuses a number with a leading zero (`umask = 022`) as a syntax error that says
/// neither which key nor why, and stops there. Each such number gets its own problem, and
/// its zeros are blanked (same offsets, so locations hold) so that the rest of the file is
/// still read and checked. Returns the text to read and those problems.
fn without_leading_zeros(text: &str) -> (String, Vec<Pending>) {
    let mut text = text.to_owned();
    let mut found: Vec<Pending> = Vec::new();
    // Each round blanks at least one `0`, so this ends; the bound keeps a pathological file
    // from costing one parse per zero.
    while found.len() < 100 {
        let Err(error) = toml_edit::ImDocument::parse(text.as_str()) else {
            break;
        };
        let Some(zero) = error
            .span()
            .and_then(|span| locate::leading_zero(&text, span.start))
        else {
            break;
        };
        text.replace_range(zero.zeros.clone(), &" ".repeat(zero.zeros.len()));
        found.push(zero.problem);
    }
    (text, found)
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}
