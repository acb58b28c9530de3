//! How a service's workers are supervised: the config file's program keys, as Rust values.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::config::{
    Backoff, CommandSpec, Function, Limit, LockSpec, OutputSpec, Program, Queue, QueueProtocol,
    ReadyMode, ReloadMode, RestartPolicy, Route, StartLimit,
};

/// The supervision settings of one service: the keys of a `[program.NAME]` table of the
/// config file (SPEC §2), with the same types and the same defaults. Build it with struct
/// update syntax:
///
/// ```
/// use std::time::Duration;
/// use plumule::ServiceOptions;
///
/// let options = ServiceOptions {
///     workers: 4,
///     stop_timeout: Duration::from_secs(3),
///     ..ServiceOptions::default()
/// };
/// assert_eq!(options.healthy_after, Duration::from_secs(1));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceOptions {
    /// How many workers to run (default 1); changed at run time by
    /// [`ServiceManager::reconfigure`](crate::ServiceManager::reconfigure).
    pub workers: u32,
    /// When a worker that ended is started again (default: always).
    pub restart: RestartPolicy,
    /// Exit codes that count as success for `restart = on-failure` (default `[0]`).
    pub success_exit_codes: Vec<i32>,
    /// A worker that ran this long was healthy: its next restart is immediate and its backoff
    /// starts over (default 1s).
    pub healthy_after: Duration,
    /// The delay before restarting a worker that keeps crashing (default 100ms, ×2, up to
    /// 30s, jitter 0.1).
    pub backoff: Backoff,
    /// At most `burst` starts within `interval`, else the worker is `failed` (default: none).
    pub start_limit: Option<StartLimit>,
    /// The signal that asks a worker to stop (default SIGTERM; SIGTERM always does too).
    pub stop_signal: Signal,
    /// How long a worker has, after its stop signal, to run `terminate` and exit before it
    /// gets SIGKILL (default 10s).
    pub stop_timeout: Duration,
    /// The signal that asks a worker to reload (default SIGHUP).
    pub reload_signal: Signal,
    /// Named file locks each worker holds while it runs (`{worker}` expands to its id).
    pub locks: Vec<LockSpec>,
    /// When a worker counts as running: once forked and set up (`Started`, the default), or
    /// once it calls [`Worker::ready`](crate::Worker::ready) (`Notify`).
    pub ready: ReadyMode,
    /// With `ready = Notify`: a worker not ready after this long is stopped and restarted
    /// with backoff (default 30s).
    pub ready_timeout: Duration,
    /// Where the workers' stdout goes (default: the master's log, tagged `NAME.ID`).
    pub stdout: OutputSpec,
    /// Where the workers' stderr goes (default: the master's log).
    pub stderr: OutputSpec,
    /// The workers' working folder, absolute (default: the master's).
    pub cwd: Option<PathBuf>,
    /// The workers' umask (default: the master's).
    pub umask: Option<u32>,
    /// Scheduling niceness, -20 to 19 (default: the master's).
    pub nice: Option<i32>,
    /// `/proc/self/oom_score_adj`, -1000 to 1000 (default: the master's).
    pub oom_score_adj: Option<i32>,
    /// Resource limits set in each worker before the service is built.
    pub limits: Vec<Limit>,
    /// The queue whose jobs the workers consume (added with
    /// [`ServiceManager::add_queue`](crate::ServiceManager::add_queue)); they take them with
    /// [`Worker::jobs`](crate::Worker::jobs). Default: none.
    pub queue: Option<String>,
}

impl Default for ServiceOptions {
    /// SPEC §9's defaults, with one worker.
    fn default() -> Self {
        ServiceOptions {
            workers: 1,
            restart: RestartPolicy::Always,
            success_exit_codes: vec![0],
            healthy_after: Duration::from_secs(1),
            backoff: Backoff {
                initial: Duration::from_millis(100),
                max: Duration::from_secs(30),
                multiplier: 2.0,
                jitter: 0.1,
            },
            start_limit: None,
            stop_signal: Signal::SIGTERM,
            stop_timeout: Duration::from_secs(10),
            reload_signal: Signal::SIGHUP,
            locks: Vec::new(),
            ready: ReadyMode::Started,
            ready_timeout: Duration::from_secs(30),
            stdout: OutputSpec::Log,
            stderr: OutputSpec::Log,
            cwd: None,
            umask: None,
            nice: None,
            oom_score_adj: None,
            limits: Vec::new(),
            queue: None,
        }
    }
}

impl ServiceOptions {
    /// The program the supervisor runs for this service: `function` instead of a command,
    /// and the keys a library service has no use for at their defaults.
    pub(super) fn program(&self, name: &str, function: Function) -> Program {
        Program {
            name: name.to_string(),
            command: CommandSpec::Function(function),
            workers: self.workers,
            restart: self.restart,
            success_exit_codes: self.success_exit_codes.clone(),
            healthy_after: self.healthy_after,
            backoff: self.backoff,
            start_limit: self.start_limit,
            stop_signal: self.stop_signal,
            stop_timeout: self.stop_timeout,
            reload: ReloadMode::Signal,
            reload_signal: self.reload_signal,
            env: BTreeMap::new(),
            inherit_env: true,
            cwd: self.cwd.clone(),
            user: None,
            group: None,
            umask: self.umask,
            stdout: self.stdout.clone(),
            stderr: self.stderr.clone(),
            locks: self.locks.clone(),
            ready: self.ready,
            ready_timeout: self.ready_timeout,
            watchdog: None,
            listen: Vec::new(),
            after: Vec::new(),
            queue: self.queue.clone(),
            nice: self.nice,
            oom_score_adj: self.oom_score_adj,
            limits: self.limits.clone(),
        }
    }
}

/// The settings of a job queue: the keys of a `[queue.NAME]` table of the config file
/// (SPEC §4), with the same types and the same defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueOptions {
    /// Whether jobs survive a restart of the master, kept under the state directory
    /// (default true; see [`ServiceManager::state_dir`](crate::ServiceManager::state_dir)).
    pub durable: bool,
    /// How jobs and answers travel on the consumers' pipes (default `Lines`: a job's JSON is
    /// one line; `Frames` for large payloads).
    pub protocol: QueueProtocol,
    /// How many jobs a worker holds at once (default 1).
    pub prefetch: u32,
    /// Attempts before a job that keeps failing is dead-lettered (default 3).
    pub max_attempts: u32,
    /// The delay before a failed job is tried again (default 1s, ×2, up to 1m, jitter 0.1).
    pub retry_backoff: Backoff,
    /// Which worker gets a job (default least-loaded).
    pub route: Route,
    /// The most jobs waiting; a submission beyond it is refused (default 1 000 000).
    pub max_pending: u64,
    /// The largest job or answer, in bytes (default 16 MiB).
    pub max_frame: u64,
    /// A worker holding a job longer than this is stopped and the job is delivered again
    /// (default: none).
    pub job_timeout: Option<Duration>,
}

impl Default for QueueOptions {
    /// SPEC §9's defaults.
    fn default() -> Self {
        QueueOptions {
            durable: true,
            protocol: QueueProtocol::Lines,
            prefetch: 1,
            max_attempts: 3,
            retry_backoff: Backoff {
                initial: Duration::from_secs(1),
                max: Duration::from_secs(60),
                multiplier: 2.0,
                jitter: 0.1,
            },
            route: Route::LeastLoaded,
            max_pending: 1_000_000,
            max_frame: 16 * 1024 * 1024,
            job_timeout: None,
        }
    }
}

impl QueueOptions {
    /// The queue the master runs.
    pub(super) fn queue(&self, name: &str) -> Queue {
        Queue {
            name: name.to_string(),
            durable: self.durable,
            protocol: self.protocol,
            prefetch: self.prefetch,
            max_attempts: self.max_attempts,
            retry_backoff: self.retry_backoff,
            route: self.route,
            max_pending: self.max_pending,
            max_frame: self.max_frame,
            job_timeout: self.job_timeout,
            backend: None,
            claim_after: Duration::from_secs(30),
            partitions: 64,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use super::*;

    /// What the config file makes of `text`.
    fn parsed(text: &str) -> crate::config::Config {
        let header = "[plumule]\nruntime_dir = \"/run/plumule-test\"\n";
        crate::config::parse(
            &format!("{header}{text}"),
            Path::new("/etc/plumule/test.toml"),
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn service_defaults_are_the_config_files() {
        let function = Function(Arc::new(|_, _| 0));
        let from_file = parsed("[program.web]\ncommand = \"true\"\n").programs[0].clone();
        let ours = ServiceOptions::default().program("web", function.clone());
        // Everything but what a library service does differently: a function instead of a
        // command, and reload by signal (SIGHUP reaches each worker's `reload`).
        let expected = Program {
            command: CommandSpec::Function(function),
            reload: ReloadMode::Signal,
            ..from_file
        };
        assert_eq!(ours, expected);
    }

    #[test]
    fn queue_defaults_are_the_config_files() {
        let from_file = parsed("[queue.jobs]\n").queues[0].clone();
        assert_eq!(QueueOptions::default().queue("jobs"), from_file);
    }

    #[test]
    fn options_reach_the_program() {
        let function = Function(Arc::new(|_, _| 0));
        let options = ServiceOptions {
            workers: 3,
            stop_signal: Signal::SIGINT,
            stop_timeout: Duration::from_millis(250),
            ready: ReadyMode::Notify,
            queue: Some("jobs".into()),
            ..ServiceOptions::default()
        };
        let p = options.program("web", function);
        assert_eq!(
            (p.workers, p.stop_signal, p.stop_timeout, p.ready, p.queue),
            (
                3,
                Signal::SIGINT,
                Duration::from_millis(250),
                ReadyMode::Notify,
                Some("jobs".to_string())
            )
        );
    }
}
