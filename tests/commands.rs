//! `plumule signal`, `plumule shutdown` and `plumule status --watch` against the real binary
//! (SPEC §1): a signal reaches only the workers it names (their process groups with
//! `--group`), a shutdown returns only once the master and its workers are gone, and a watch
//! keeps printing tables until the master goes away.

mod common;

use std::fs;

use common::*;

/// A worker script that, once its traps are set, appends its start line (so that
/// [`Sandbox::wait_starts`] means "ready for signals"), then idles. USR1 and USR2 append
/// `usr1`/`usr2` to `sig-PROGRAM.ID`. With `child`, it first starts a child shell that does
/// the same into `child-PROGRAM.ID` (and says `ready` in `child-ready-PROGRAM.ID`).
fn trapping_worker(sb: &Sandbox, name: &str, child: bool) -> std::path::PathBuf {
    let dir = sh_str(sb.root());
    let traps = |file: &str| {
        format!(
            "trap 'echo usr1 >> {dir}/{file}' USR1\n\
             trap 'echo usr2 >> {dir}/{file}' USR2\n"
        )
    };
    // `wait` returns when a trapped signal arrives; the loop then waits again. The sleep it
    // leaves behind is in the worker's group, so it goes when the worker does.
    let idle = "while :; do sleep 1000 & wait $!; done";
    let spawn_child = if child {
        let me = "$PLUMULE_PROGRAM.$PLUMULE_WORKER_ID";
        format!(
            "/bin/sh -c '{}echo ready > {dir}/child-ready-{me}\n{idle}' &\n",
            traps(&format!("child-{me}")).replace('\'', "'\\''"),
        )
    } else {
        String::new()
    };
    let body = format!(
        "{spawn_child}{}echo \"$PLUMULE_PROGRAM $PLUMULE_WORKER_ID $PLUMULE_WORKERS $$\" >> {}\n{idle}",
        traps("sig-$PLUMULE_PROGRAM.$PLUMULE_WORKER_ID"),
        sh_str(&sb.starts_file())
    );
    sb.script(name, &body)
}

/// The lines a trap wrote to `file` in the sandbox (none when it does not exist).
fn trapped(sb: &Sandbox, file: &str) -> Vec<String> {
    fs::read_to_string(sb.path(file))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn has_lines(sb: &Sandbox, file: &str, n: usize) -> bool {
    trapped(sb, file).len() >= n
}

#[test]
fn signal_reaches_only_the_targeted_worker() {
    let sb = Sandbox::new();
    let worker = trapping_worker(&sb, "trap.sh", false);
    let config = sb.config(&format!(
        "[program.web]\ncommand = {0}\nworkers = 2\n\n[program.other]\ncommand = {0}\n",
        argv(&worker)
    ));
    let _master = sb.start(&config);
    sb.wait_starts("web", 2, DEADLINE);
    sb.wait_starts("other", 1, DEADLINE);

    let out = sb.cli_ok(&config, &["signal", "web.1", "usr1"]);
    assert_eq!(out.stdout, "web.1: sent USR1\n");
    sb.wait("web.1 trapped USR1", DEADLINE, || {
        has_lines(&sb, "sig-web.1", 1)
    });
    // A barrier: USR2 sent after USR1 to every worker. Had USR1 reached another worker, it
    // would have been pending there before USR2 and trapped first.
    let out = sb.cli_ok(&config, &["signal", "web.0", "SIGUSR2"]);
    assert_eq!(out.stdout, "web.0: sent USR2\n");
    let out = sb.cli_ok(&config, &["signal", "other", "USR2"]);
    assert_eq!(out.stdout, "other: sent USR2 to 1 worker\n");
    sb.wait("web.0 and other.0 trapped USR2", DEADLINE, || {
        has_lines(&sb, "sig-web.0", 1) && has_lines(&sb, "sig-other.0", 1)
    });
    assert_eq!(trapped(&sb, "sig-web.1"), ["usr1"]);
    assert_eq!(trapped(&sb, "sig-web.0"), ["usr2"]);
    assert_eq!(trapped(&sb, "sig-other.0"), ["usr2"]);

    // A whole program: each of its workers once; -q prints nothing.
    let out = sb.cli_ok(&config, &["signal", "web", "Usr1"]);
    assert_eq!(out.stdout, "web: sent USR1 to 2 workers\n");
    sb.wait("both web workers trapped USR1 again", DEADLINE, || {
        has_lines(&sb, "sig-web.0", 2) && has_lines(&sb, "sig-web.1", 2)
    });
    let out = sb.cli_ok(&config, &["signal", "-q", "web", "usr2"]);
    assert_eq!(out.stdout, "");
    sb.wait("both web workers trapped USR2", DEADLINE, || {
        has_lines(&sb, "sig-web.0", 3) && has_lines(&sb, "sig-web.1", 3)
    });
    assert_eq!(trapped(&sb, "sig-web.1"), ["usr1", "usr1", "usr2"]);
    assert_eq!(trapped(&sb, "sig-other.0"), ["usr2"]);
    // No worker died of it: the same processes still run.
    let starts = sb.starts();
    assert_eq!(starts.len(), 3, "{starts:?}");
}

#[test]
fn group_reaches_the_workers_children_too() {
    let sb = Sandbox::new();
    let worker = trapping_worker(&sb, "parent.sh", true);
    let config = sb.config(&format!("[program.web]\ncommand = {}\n", argv(&worker)));
    let _master = sb.start(&config);
    sb.wait_starts("web", 1, DEADLINE);
    sb.wait("the worker's child has set its traps", DEADLINE, || {
        has_lines(&sb, "child-ready-web.0", 1)
    });

    let out = sb.cli_ok(&config, &["signal", "web", "USR1"]);
    assert_eq!(out.stdout, "web: sent USR1 to 1 worker\n");
    sb.wait("the worker trapped USR1", DEADLINE, || {
        has_lines(&sb, "sig-web.0", 1)
    });
    let out = sb.cli_ok(&config, &["signal", "web.0", "USR2", "--group"]);
    assert_eq!(out.stdout, "web.0: sent USR2 to its process group\n");
    sb.wait("the worker and its child trapped USR2", DEADLINE, || {
        has_lines(&sb, "sig-web.0", 2) && has_lines(&sb, "child-web.0", 1)
    });
    // USR1 went to the worker alone, USR2 to its whole group.
    assert_eq!(trapped(&sb, "sig-web.0"), ["usr1", "usr2"]);
    assert_eq!(trapped(&sb, "child-web.0"), ["usr2"]);
    let out = sb.cli_ok(&config, &["signal", "web", "USR1", "--group"]);
    assert_eq!(
        out.stdout,
        "web: sent USR1 to the process groups of 1 worker\n"
    );
}

#[test]
fn unknown_targets_and_signals_are_clear_errors() {
    let sb = Sandbox::new();
    let worker = trapping_worker(&sb, "trap.sh", false);
    let config = sb.config(&format!(
        "[program.web]\ncommand = {}\nworkers = 2\n",
        argv(&worker)
    ));
    let _master = sb.start(&config);
    sb.wait_starts("web", 2, DEADLINE);

    // Usage errors (2), before any master is asked.
    for (signal, message) in [
        ("TREM", "unknown signal `TREM`, did you mean `TERM`?"),
        ("9", "signal numbers are not accepted"),
        ("9", "write `KILL`"),
    ] {
        let out = sb.cli(&config, &["signal", "web", signal]);
        assert_exit_code(out.status, 2, &out.stderr);
        assert!(out.stderr.contains(message), "{signal}: {}", out.stderr);
    }
    // The master's refusals (1).
    sb.cli_ok(&config, &["stop", "web.1"]);
    for (target, message) in [
        ("nope", "no program named nope"),
        ("web.7", "no program named web.7 (web has 2 workers)"),
        ("web.1", "web.1: not running (stopped), nothing to signal"),
        ("web.x", "bad worker id in `web.x`"),
    ] {
        let out = sb.cli(&config, &["signal", target, "HUP"]);
        assert_exit_code(out.status, 1, &out.stderr);
        assert!(out.stderr.contains(message), "{target}: {}", out.stderr);
        assert_eq!(out.stdout, "", "{target}");
    }
    sb.cli_ok(&config, &["stop", "web"]);
    let out = sb.cli(&config, &["signal", "web", "HUP"]);
    assert_exit_code(out.status, 1, &out.stderr);
    assert!(
        out.stderr
            .contains("web: no worker is running, nothing to signal"),
        "{}",
        out.stderr
    );
    // Nothing was sent to anyone: no worker trapped anything, and none was restarted.
    assert!(!sb.path("sig-web.0").exists() && !sb.path("sig-web.1").exists());
    assert_eq!(sb.starts().len(), 2);
}

#[test]
fn shutdown_returns_once_the_master_and_its_workers_are_gone() {
    let sb = Sandbox::new();
    // Ignores TERM: the master has to wait stop_timeout, then kill it, so the stop takes
    // a while, and the client must still wait for its end.
    let stubborn = sb.worker("stubborn.sh", "trap '' TERM\nwhile :; do sleep 1; done");
    let config = sb.config(&format!(
        "[program.web]\ncommand = {}\nworkers = 2\nstop_timeout = \"1s\"\n",
        argv(&stubborn)
    ));
    let mut master = sb.start(&config);
    let workers: Vec<i32> = sb
        .wait_starts("web", 2, DEADLINE)
        .iter()
        .map(|s| s.pid)
        .collect();
    wait_running(&sb, "web", 2);

    let out = sb.cli(&config, &["shutdown"]);
    assert_exit_code(out.status, 0, &out.stderr);
    assert_eq!(
        out.stdout,
        format!("master (pid {}): stopped\n", master.pid())
    );
    // Already gone when the command returned: a zombie waiting for its parent (this test) to
    // reap it, or nothing at all; and its workers with it.
    assert!(!pid_alive(master.pid()), "the master still runs");
    for pid in workers {
        assert!(!pid_alive(pid), "worker {pid} still runs");
    }
    assert_exit_code(master.wait_exit(DEADLINE), 0, &master.stderr_text());
    assert!(!sb.pidfile().exists());
    assert!(!sb.control_socket().exists());
    let log = master.stderr_text();
    assert!(
        log.contains("shutdown requested over the control socket"),
        "{log}"
    );

    // No master: an error, at once.
    let out = sb.cli(&config, &["shutdown", "-q"]);
    assert_exit_code(out.status, 1, &out.stderr);
    assert!(
        out.stderr.contains("no master is running here"),
        "{}",
        out.stderr
    );
}

#[test]
fn quiet_shutdown_during_a_stop_under_way_waits_for_it_too() {
    let sb = Sandbox::new();
    let stubborn = sb.worker("stubborn.sh", "trap '' TERM\nwhile :; do sleep 1; done");
    let config = sb.config(&format!(
        "[program.web]\ncommand = {}\nstop_timeout = \"1s\"\n",
        argv(&stubborn)
    ));
    let mut master = sb.start(&config);
    wait_running(&sb, "web", 1);
    // A first shutdown, left running, starts the stop; a second one joins it.
    let mut first = sb.spawn_plumule(&["shutdown", "-c", &config.display().to_string()]);
    master.wait_stderr(&["shutdown requested over the control socket"], DEADLINE);
    let out = sb.cli(&config, &["shutdown", "-q"]);
    // The second connection may be taken before the stop closed the door (it then waits
    // for the answer) or not (it is then told when the master is gone): both are success.
    assert_exit_code(out.status, 0, &out.stderr);
    assert_eq!(out.stdout, "");
    assert!(!pid_alive(master.pid()), "the master still runs");
    assert_exit_code(first.wait_exit(DEADLINE), 0, &first.stderr_text());
    assert_exit_code(master.wait_exit(DEADLINE), 0, &master.stderr_text());
}

/// The tables a `status --watch` printed so far (separated by blank lines).
fn tables(text: &str) -> Vec<&str> {
    text.split("\n\n")
        .filter(|t| t.starts_with("PROGRAM") && t.trim_end().contains(" worker(s)"))
        .collect()
}

#[test]
fn status_watch_prints_tables_until_the_master_goes_away() {
    let sb = Sandbox::new();
    let config = sb.config(&format!(
        "[program.web]\ncommand = {}\nworkers = 2\n",
        argv(&sleeper(&sb))
    ));
    let mut master = sb.start(&config);
    wait_running(&sb, "web", 2);
    let config_arg = config.display().to_string();
    let watch = sb.spawn_plumule(&["status", "--watch", "100ms", "-c", &config_arg]);
    sb.wait("status --watch has printed two tables", DEADLINE, || {
        tables(&watch.stdout_text()).len() >= 2
    });
    let text = watch.stdout_text();
    assert!(
        !text.contains('\x1b'),
        "escape codes off a terminal:\n{text}"
    );
    for table in tables(&text) {
        assert_eq!(table.lines().filter(|l| l.starts_with("web ")).count(), 2);
    }

    // The default interval, and one JSON object per line with --json.
    let json = sb.spawn_plumule(&["status", "web", "--json", "--watch", "-c", &config_arg]);
    sb.wait(
        "status --json --watch has printed two lines",
        DEADLINE,
        || json.stdout_text().lines().count() >= 2,
    );
    for line in json.stdout_text().lines() {
        let report = parse_status(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert_eq!(running(&report, "web").len(), 2);
    }

    stop_cleanly(&mut master);
    for mut w in [watch, json] {
        let status = w.wait_exit(DEADLINE);
        let stderr = w.stderr_text();
        assert_exit_code(status, 1, &stderr);
        assert!(stderr.contains("the master went away"), "{stderr}");
    }
}

#[test]
fn status_watch_refuses_a_bad_interval_and_needs_a_master() {
    let sb = Sandbox::new();
    let config = sb.config("");
    let config_arg = config.display().to_string();
    for interval in ["0s", "soon"] {
        let out = sb.plumule(
            &["status", "--watch", interval, "-c", &config_arg],
            DEADLINE,
        );
        assert_exit_code(out.status, 2, &out.stderr);
    }
    let out = sb.plumule(&["status", "--watch", "-c", &config_arg], DEADLINE);
    assert_exit_code(out.status, 1, &out.stderr);
    assert!(
        out.stderr.contains("no master is running here"),
        "{}",
        out.stderr
    );
    assert_eq!(out.stdout, "");
}
