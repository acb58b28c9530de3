//! Reload planning: the old config against the new one, program by program. Pure.
//!
//! Keys that shape the process (SPEC §9) need a new process; every other key applies in
//! place. `workers` is reported apart, since scaling never touches the survivors.

use std::sync::Arc;

use nix::sys::signal::Signal;

use crate::config::{Config, Program, ReloadMode};
use crate::plan::{Pool, PoolId};

/// Keys whose change needs a new process.
pub const PROCESS_KEYS: &[&str] = &[
    "command",
    "env",
    "inherit_env",
    "cwd",
    "user",
    "group",
    "umask",
    "listen",
    "locks",
    "stdout",
    "stderr",
    "queue",
    "ready",
    "watchdog",
    "nice",
    "oom_score_adj",
    "limits",
];

#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Added(String),
    Removed(String),
    Changed {
        name: String,
        /// (old, new) when the file's `workers` changed.
        workers: Option<(u32, u32)>,
        /// Changed keys that need a new process.
        process: Vec<&'static str>,
        /// Changed keys applied in place.
        settings: Vec<&'static str>,
        /// `reload = "signal"`: the workers get `reload_signal` (unless they are replaced).
        signal: bool,
    },
}

impl Change {
    pub fn name(&self) -> &str {
        match self {
            Change::Added(n) | Change::Removed(n) => n,
            Change::Changed { name, .. } => name,
        }
    }

    /// One line for `plumule reload` and the log.
    pub fn describe(&self, new: &Config) -> String {
        match self {
            Change::Added(n) => format!("{n}: added"),
            Change::Removed(n) => format!("{n}: removed"),
            Change::Changed {
                name,
                workers,
                process,
                settings,
                signal,
            } => {
                let mut parts = Vec::new();
                if let Some((a, b)) = workers {
                    parts.push(format!("workers {a} -> {b}"));
                }
                if !process.is_empty() {
                    let how = match new.program(name).map(|p| p.reload) {
                        Some(ReloadMode::None) => "applies at each worker's next restart",
                        _ => "rolling restart",
                    };
                    parts.push(format!("{} changed ({how})", process.join(", ")));
                }
                if !settings.is_empty() {
                    parts.push(format!(
                        "{} changed (applied in place)",
                        settings.join(", ")
                    ));
                }
                if *signal && process.is_empty() {
                    parts.push("reload signal sent".to_string());
                }
                format!("{name}: {}", parts.join("; "))
            }
        }
    }
}

/// Lists what differs between the two configs; unchanged programs are absent, except those
/// with `reload = "signal"`, which are signalled at every reload.
pub fn diff(old: &Config, new: &Config) -> Vec<Change> {
    let mut changes = Vec::new();
    for p in &old.programs {
        if new.program(&p.name).is_none() {
            changes.push(Change::Removed(p.name.clone()));
        }
    }
    for n in &new.programs {
        let Some(o) = old.program(&n.name) else {
            changes.push(Change::Added(n.name.clone()));
            continue;
        };
        let (mut process, settings) = changed_keys(o, n);
        // The bytes on a consumer's pipes follow its queue's protocol and max_frame (SPEC §9).
        let wire = |c: &Config| {
            n.queue
                .as_ref()
                .and_then(|q| c.queues.iter().find(|x| &x.name == q))
                .map(|q| (q.protocol, q.max_frame))
        };
        if o.queue == n.queue && wire(old) != wire(new) && !process.contains(&"queue") {
            process.push("queue");
        }
        let workers = (o.workers != n.workers).then_some((o.workers, n.workers));
        let signal = n.reload == ReloadMode::Signal;
        if workers.is_some() || !process.is_empty() || !settings.is_empty() || signal {
            changes.push(Change::Changed {
                name: n.name.clone(),
                workers,
                process,
                settings,
                signal,
            });
        }
    }
    changes
}

/// What changed among the `[plumule]` keys, one line each (SPEC §9): `log_level` and
/// `shutdown_timeout` apply at once; the directories, `control_group`, `node` and `cluster` are
/// the master's own set-up and take effect when it restarts. (`metrics` belongs to its own part.)
pub fn settings_changes(old: &Config, new: &Config) -> Vec<String> {
    let mut lines = Vec::new();
    if old.log_level != new.log_level {
        lines.push(format!(
            "log_level: {} -> {} (applied)",
            old.log_level.as_str().to_lowercase(),
            new.log_level.as_str().to_lowercase()
        ));
    }
    if old.shutdown_timeout != new.shutdown_timeout {
        lines.push(format!(
            "shutdown_timeout: {} -> {} (applied)",
            crate::format_duration(old.shutdown_timeout),
            crate::format_duration(new.shutdown_timeout)
        ));
    }
    let restart_only = [
        ("runtime_dir", old.runtime_dir != new.runtime_dir),
        ("state_dir", old.state_dir != new.state_dir),
        ("lock_dir", old.lock_dir != new.lock_dir),
        ("control_group", old.control_group != new.control_group),
        ("node", old.node != new.node),
        ("cluster", old.cluster != new.cluster),
    ];
    for (key, changed) in restart_only {
        if changed {
            lines.push(format!(
                "{key} changed: takes effect when the master restarts"
            ));
        }
    }
    lines
}

/// `new` as the running master applies it: the keys that take effect only when the master
/// restarts keep their running values (what the master bound, locked and created), so that
/// the next reload still reports them as pending.
pub fn applicable(old: &Config, mut new: Config) -> Config {
    new.runtime_dir = old.runtime_dir.clone();
    new.state_dir = old.state_dir.clone();
    new.lock_dir = old.lock_dir.clone();
    new.control_group = old.control_group.clone();
    // The cluster helper was forked with these: a new lease and member record need a restart.
    new.node = old.node.clone();
    new.cluster = old.cluster.clone();
    new
}

/// (process keys, in-place keys) that differ, `workers` excluded. `Program` is destructured
/// whole: a new field does not compile until it is sorted into one list or the other.
pub fn changed_keys(o: &Program, n: &Program) -> (Vec<&'static str>, Vec<&'static str>) {
    let Program {
        name: _,
        workers: _,
        command,
        env,
        inherit_env,
        cwd,
        user,
        group,
        umask,
        listen,
        locks,
        stdout,
        stderr,
        queue,
        ready,
        watchdog,
        nice,
        oom_score_adj,
        limits,
        restart,
        success_exit_codes,
        healthy_after,
        backoff,
        start_limit,
        stop_signal,
        stop_timeout,
        reload,
        reload_signal,
        ready_timeout,
        after,
    } = n;
    let mut process = Vec::new();
    let mut settings = Vec::new();
    macro_rules! cmp {
        ($list:ident: $($field:ident),*) => {
            $( if o.$field != *$field { $list.push(stringify!($field)); } )*
        };
    }
    cmp!(process: command, env, inherit_env, cwd, user, group, umask, listen, locks, stdout,
        stderr, queue, ready, watchdog, nice, oom_score_adj, limits);
    cmp!(settings: restart, success_exit_codes, healthy_after, backoff, start_limit, stop_signal,
        stop_timeout, reload, reload_signal, ready_timeout, after);
    (process, settings)
}

/// What a reload does to the running pools: the decision, apart from carrying it out.
#[derive(Debug, Clone, PartialEq)]
pub enum ReloadAction {
    /// A new program (or one removed earlier, still draining, that comes back): a new pool.
    Add(Arc<Program>),
    /// The program left the file: its pool drains.
    Remove(PoolId),
    /// The pool takes the new settings. `reset_scale`: the file's `workers` changed, which
    /// replaces an operator's `scale`. `roll`: a key that shapes the process changed, so
    /// the workers are replaced (failed ones get another chance).
    Update {
        pool: PoolId,
        program: Arc<Program>,
        reset_scale: bool,
        roll: bool,
    },
    /// `reload = "signal"`: send `reload_signal` to each live worker of the pool.
    Signal { pool: PoolId, signal: Signal },
}

/// Turns the changes between two configs into actions on `pools`. Pure: no process is
/// touched here.
pub fn plan_reload(pools: &[Pool], changes: &[Change], new: &Config) -> Vec<ReloadAction> {
    let live = |name: &str| {
        pools
            .iter()
            .find(|p| p.program.name == name && !p.removed)
            .map(|p| p.key)
    };
    let mut actions = Vec::new();
    for change in changes {
        let name = change.name();
        let program = new.program(name).cloned().map(Arc::new);
        match (change, program) {
            (Change::Added(_), Some(program)) => actions.push(ReloadAction::Add(program)),
            (Change::Removed(_), _) => {
                for pool in pools
                    .iter()
                    .filter(|p| p.program.name == name && !p.removed)
                {
                    actions.push(ReloadAction::Remove(pool.key));
                }
            }
            (
                Change::Changed {
                    workers,
                    process,
                    signal,
                    ..
                },
                Some(program),
            ) => {
                let Some(pool) = live(name) else { continue };
                let roll = !process.is_empty();
                if *signal && !roll {
                    actions.push(ReloadAction::Signal {
                        pool,
                        signal: program.reload_signal,
                    });
                }
                actions.push(ReloadAction::Update {
                    pool,
                    program,
                    reset_scale: workers.is_some(),
                    roll,
                });
            }
            (Change::Added(_) | Change::Changed { .. }, None) => {}
        }
    }
    actions
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{CommandSpec, RestartPolicy};

    use crate::test_support::{config, program};
    use std::time::Duration;

    #[test]
    fn plumule_keys_apply_at_once_or_at_the_next_master() {
        let old = config(vec![program("web", 1)]);
        assert!(settings_changes(&old, &old.clone()).is_empty());
        let mut new = old.clone();
        new.log_level = log::LevelFilter::Debug;
        new.shutdown_timeout = Duration::from_secs(5);
        new.runtime_dir = "/run/other".into();
        new.lock_dir = "/run/other/locks".into();
        assert_eq!(
            settings_changes(&old, &new),
            [
                "log_level: info -> debug (applied)",
                "shutdown_timeout: 30s -> 5s (applied)",
                "runtime_dir changed: takes effect when the master restarts",
                "lock_dir changed: takes effect when the master restarts",
            ]
        );
        let applied = applicable(&old, new.clone());
        assert_eq!(
            (applied.log_level, applied.shutdown_timeout),
            (new.log_level, new.shutdown_timeout)
        );
        assert_eq!(
            (&applied.runtime_dir, &applied.lock_dir),
            (&old.runtime_dir, &old.lock_dir),
            "the running master keeps its directories"
        );
        assert_eq!(
            settings_changes(&applied, &new).len(),
            2,
            "still pending at the next reload"
        );
    }

    #[test]
    fn node_and_cluster_take_effect_at_the_next_master() {
        let old = config(vec![program("web", 1)]);
        let mut new = old.clone();
        new.node = "web-9".into();
        new.cluster = Some(crate::config::Cluster {
            etcd: vec!["http://127.0.0.1:2379".into()],
            lease: Duration::from_secs(10),
        });
        assert_eq!(
            settings_changes(&old, &new),
            [
                "node changed: takes effect when the master restarts",
                "cluster changed: takes effect when the master restarts",
            ]
        );
        let applied = applicable(&old, new.clone());
        assert_eq!((&applied.node, &applied.cluster), (&old.node, &old.cluster));
        assert_eq!(settings_changes(&applied, &new).len(), 2);
    }

    #[test]
    fn unchanged_programs_are_absent() {
        let a = config(vec![program("web", 2), program("db", 1)]);
        assert_eq!(diff(&a, &a.clone()), vec![]);
    }

    #[test]
    fn add_remove_and_rename() {
        let old = config(vec![program("web", 2), program("old", 1)]);
        let new = config(vec![program("web", 2), program("new", 1)]);
        assert_eq!(
            diff(&old, &new),
            vec![Change::Removed("old".into()), Change::Added("new".into())]
        );
    }

    #[test]
    fn scale_only_is_not_a_process_change() {
        let old = config(vec![program("web", 2)]);
        let new = config(vec![program("web", 5)]);
        assert_eq!(
            diff(&old, &new),
            vec![Change::Changed {
                name: "web".into(),
                workers: Some((2, 5)),
                process: vec![],
                settings: vec![],
                signal: false
            }]
        );
    }

    #[test]
    fn process_keys_and_settings_are_told_apart() {
        let old = config(vec![program("web", 2)]);
        let mut p = program("web", 2);
        p.command = CommandSpec::Argv(vec!["/bin/false".into()]);
        p.env.insert("A".into(), "1".into());
        p.restart = RestartPolicy::Never;
        p.stop_timeout = Duration::from_secs(3);
        let new = config(vec![p]);
        let changes = diff(&old, &new);
        assert_eq!(
            changes,
            vec![Change::Changed {
                name: "web".into(),
                workers: None,
                process: vec!["command", "env"],
                settings: vec!["restart", "stop_timeout"],
                signal: false
            }]
        );
        assert_eq!(
            changes[0].describe(&new),
            "web: command, env changed (rolling restart); restart, stop_timeout changed (applied in place)"
        );
    }

    #[test]
    fn signal_programs_are_listed_even_when_unchanged() {
        let mut p = program("web", 1);
        p.reload = ReloadMode::Signal;
        let a = config(vec![p]);
        let changes = diff(&a, &a.clone());
        assert_eq!(
            changes,
            vec![Change::Changed {
                name: "web".into(),
                workers: None,
                process: vec![],
                settings: vec![],
                signal: true
            }]
        );
        assert_eq!(changes[0].describe(&a), "web: reload signal sent");
    }

    fn pools(config: &Config) -> Vec<Pool> {
        config
            .programs
            .iter()
            .enumerate()
            .map(|(i, p)| Pool::new(PoolId(i as u64), Arc::new(p.clone())))
            .collect()
    }

    #[test]
    fn a_reload_becomes_actions_on_pools() {
        let mut sig = program("sig", 1);
        sig.reload = ReloadMode::Signal;
        let old = config(vec![program("web", 2), program("gone", 1), sig.clone()]);
        let mut web = program("web", 3);
        web.command = CommandSpec::Argv(vec!["/bin/false".into()]);
        let new = config(vec![web.clone(), sig.clone(), program("new", 1)]);
        let pools = pools(&old);
        let actions = plan_reload(&pools, &diff(&old, &new), &new);
        assert_eq!(
            actions,
            vec![
                ReloadAction::Remove(PoolId(1)),
                ReloadAction::Update {
                    pool: PoolId(0),
                    program: Arc::new(web),
                    reset_scale: true,
                    roll: true
                },
                ReloadAction::Signal {
                    pool: PoolId(2),
                    signal: Signal::SIGHUP
                },
                ReloadAction::Update {
                    pool: PoolId(2),
                    program: Arc::new(sig),
                    reset_scale: false,
                    roll: false
                },
                ReloadAction::Add(Arc::new(program("new", 1))),
            ]
        );
    }

    /// Regression (issue "a master that can grow"): a program removed by one reload and
    /// added back by the next while its old pool still drains is a new pool; the draining
    /// one is never updated or waited for in its place.
    #[test]
    fn a_program_added_back_while_draining_is_a_new_pool() {
        let with = config(vec![program("slow", 1)]);
        let without = config(vec![]);
        let mut pools = pools(&with);
        pools[0].removed = true;
        let actions = plan_reload(&pools, &diff(&without, &with), &with);
        assert_eq!(
            actions,
            vec![ReloadAction::Add(Arc::new(program("slow", 1)))]
        );
    }

    #[test]
    fn every_process_key_is_a_field_compared() {
        // The macro list and PROCESS_KEYS must agree, or reload would misjudge a key.
        let o = program("web", 1);
        let mut n = program("web", 1);
        n.umask = Some(0o022);
        n.cwd = Some("/tmp".into());
        n.inherit_env = false;
        let (process, _) = changed_keys(&o, &n);
        assert!(process.iter().all(|k| PROCESS_KEYS.contains(k)));
        assert_eq!(process, vec!["inherit_env", "cwd", "umask"]);
    }
}
