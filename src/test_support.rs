//! Builders for unit tests: a program with SPEC §9's defaults, without parsing a file.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::config::*;

pub(crate) fn program(name: &str, workers: u32) -> Program {
    Program {
        name: name.to_string(),
        command: CommandSpec::Argv(vec!["/bin/true".into()]),
        workers,
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
        reload: ReloadMode::Restart,
        reload_signal: Signal::SIGHUP,
        env: BTreeMap::new(),
        inherit_env: true,
        cwd: None,
        user: None,
        group: None,
        umask: None,
        stdout: OutputSpec::Log,
        stderr: OutputSpec::Log,
        locks: vec![],
        ready: ReadyMode::Started,
        ready_timeout: Duration::from_secs(30),
        watchdog: None,
        listen: vec![],
        after: vec![],
        queue: None,
        nice: None,
        oom_score_adj: None,
        limits: vec![],
    }
}

pub(crate) fn config(programs: Vec<Program>) -> Config {
    Config {
        path: PathBuf::from("/etc/plumule/plumule.toml"),
        runtime_dir: PathBuf::from("/run/plumule"),
        state_dir: PathBuf::from("/var/lib/plumule"),
        lock_dir: PathBuf::from("/run/plumule/locks"),
        control_group: None,
        metrics: None,
        shutdown_timeout: Duration::from_secs(30),
        log_level: log::LevelFilter::Info,
        node: "test".to_owned(),
        cluster: None,
        programs,
        queues: vec![],
    }
}
