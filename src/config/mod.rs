//! Configuration: the TOML file as the user wrote it (`raw` serde types that mirror SPEC §2,
//! `deny_unknown_fields`) and the validated [`Config`] that the rest of plumule trusts.
//!
//! Invariants of a [`Config`]: every name is valid, every reference (`after`, `queue`) resolves,
//! every path is absolute, every user and group exists, and `after` has no cycle.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use nix::sys::signal::Signal;

/// A validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file it was read from (absolute).
    pub path: PathBuf,
    pub runtime_dir: PathBuf,
    pub state_dir: PathBuf,
    pub lock_dir: PathBuf,
    pub control_group: Option<GroupSpec>,
    pub metrics: Option<String>,
    pub shutdown_timeout: Duration,
    pub log_level: log::LevelFilter,
    /// Sorted by name.
    pub programs: Vec<Program>,
    /// Sorted by name.
    pub queues: Vec<Queue>,
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
}

/// What to execute. `argv[0]` is as written: PATH lookup and resolution against the config
/// folder happen in [`crate::spawn`] (a relative path with a slash is made absolute here).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandSpec {
    Argv(Vec<String>),
    /// A plain string: run through `/bin/sh -c`.
    Shell(String),
}

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

#[derive(Debug, Clone, PartialEq, Eq)]
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
