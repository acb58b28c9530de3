//! The client commands as a user meets them (SPEC §1): they give up on a silent master but not
//! on a busy one, say what they did in one line per program, find a master in the default
//! runtime dir, and `logs` follows, filters by age, and notices the master going away.

mod common;

use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

/// A config with one program `web` of `workers` sleeping workers.
fn sleepers(sb: &Sandbox, workers: u32) -> std::path::PathBuf {
    let script = sb.worker("sleeper.sh", "exec sleep 1000");
    sb.config(&format!(
        "[program.web]\ncommand = {}\nworkers = {workers}\n",
        argv(&script)
    ))
}

fn wait_running(sb: &Sandbox, n: usize) {
    sb.wait(&format!("{n} worker(s) run"), DEADLINE, || {
        sb.ask_status()
            .is_some_and(|s| s.workers().filter(|(_, w)| w.state == "running").count() == n)
    });
}

#[test]
fn status_gives_up_on_a_stopped_master_and_works_once_it_continues() {
    let sb = Sandbox::new();
    let config = sleepers(&sb, 1);
    let master = sb.start(&config);
    wait_running(&sb, 1);
    let c = config.display().to_string();

    master.signal(Signal::SIGSTOP);
    let began = Instant::now();
    // The default bound of `status` is 5s.
    let out = sb.plumule(&["status", "-c", &c], Duration::from_secs(9));
    let took = began.elapsed();
    master.signal(Signal::SIGCONT);
    assert_exit_code(out.status, 1, &out.stderr);
    assert!(
        out.stderr.contains("5s of silence from the master")
            && out.stderr.contains("waiting for the status"),
        "{}",
        out.stderr
    );
    assert!(
        took >= Duration::from_millis(4500),
        "gave up after {took:?}"
    );

    let out = sb.plumule(&["status", "-c", &c, "--timeout", "2s"], DEADLINE);
    assert_exit_code(out.status, 0, &out.stderr);
    assert!(out.stdout.contains("running"), "{}", out.stdout);
}

#[test]
fn a_long_stop_does_not_time_out_while_the_master_reports_progress() {
    let sb = Sandbox::new();
    // TERM takes the worker 4s to handle: twice the client's bound.
    let script = sb.worker(
        "slow.sh",
        "trap 'sleep 4; exit 0' TERM\nwhile :; do sleep 1000 & wait $!; done",
    );
    let config = sb.config(&format!(
        "[program.web]\ncommand = {}\nstop_timeout = \"15s\"\n",
        argv(&script)
    ));
    let _master = sb.start(&config);
    wait_running(&sb, 1);
    let c = config.display().to_string();

    let began = Instant::now();
    let out = sb.plumule(&["stop", "web", "--timeout", "2s", "-c", &c], DEADLINE);
    assert_exit_code(out.status, 0, &out.stderr);
    assert!(
        began.elapsed() >= Duration::from_millis(3500),
        "stop returned before the worker could have handled TERM: {:?}",
        began.elapsed()
    );
    assert_eq!(out.stdout, "web: stopped\n");
}

#[test]
fn acting_commands_print_one_line_and_q_silences_them() {
    let sb = Sandbox::new();
    let script = sb.worker("sleeper.sh", "exec sleep 1000");
    let config = sb.config(&format!(
        "[program.web]\ncommand = {0}\nworkers = 2\n\n[program.idle]\ncommand = {0}\nworkers = 0\n",
        argv(&script)
    ));
    let _master = sb.start(&config);
    wait_running(&sb, 2);

    let said = |args: &[&str]| sb.cli_ok(&config, args).stdout;
    assert_eq!(said(&["start", "web"]), "web: 2 running\n");
    assert_eq!(said(&["restart", "web.1"]), "web.1: running\n");
    assert_eq!(said(&["scale", "web", "3"]), "web: 3 running\n");
    assert_eq!(said(&["stop", "web.2"]), "web.2: stopped\n");
    assert_eq!(said(&["stop", "web"]), "web: stopped\n");
    assert_eq!(said(&["start", "web", "-q"]), "");
    assert_eq!(said(&["reload", "-q"]), "");

    let idle = sb.cli(&config, &["start", "idle"]);
    assert_exit_code(idle.status, 1, &idle.stderr);
    assert!(
        idle.stderr
            .contains("idle: 0 workers wanted; nothing to start"),
        "{}",
        idle.stderr
    );
}

#[test]
fn status_outside_the_config_folder_finds_the_master_in_the_default_runtime_dir() {
    let sb = Sandbox::new();
    let script = sb.worker("sleeper.sh", "exec sleep 1000");
    // No runtime_dir: the default of SPEC §2. Its variables point into the sandbox, for the
    // master and the client alike (root's default, /run/plumule, is taken from
    // RUNTIME_DIRECTORY when set, other users' from XDG_RUNTIME_DIR).
    let config = sb.write_file(
        "plumule.toml",
        &format!(
            "[plumule]\nstate_dir = {}\n\n[program.web]\ncommand = {}\n",
            toml_str(&sb.path("state")),
            argv(&script)
        ),
        0o644,
    );
    let runtime = sb.path("systemd-run");
    let xdg = sb.path("xdg");
    std::fs::create_dir(&xdg).unwrap();
    let env = [
        ("RUNTIME_DIRECTORY", runtime.display().to_string()),
        ("XDG_RUNTIME_DIR", xdg.display().to_string()),
    ];
    let master = sb.spawn_plumule_with(&["run", "-c", &config.display().to_string()], |cmd| {
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
    });
    master.wait_stderr(&["started"], DEADLINE);
    let elsewhere = sb.path("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    assert!(
        !std::path::Path::new("/etc/plumule/plumule.toml").exists(),
        "this test needs a machine without /etc/plumule/plumule.toml"
    );
    let mut client = sb.spawn_plumule_with(&["status", "--json"], |cmd| {
        cmd.current_dir(&elsewhere)
            .envs(env.iter().map(|(k, v)| (k, v)));
    });
    let status = client.wait_exit(DEADLINE);
    assert_exit_code(status, 0, &client.stderr_text());
    let report = parse_status(&client.stdout_text()).unwrap();
    assert_eq!(report.programs[0].name, "web");
}

#[test]
fn logs_follow_exits_1_when_the_master_goes_away() {
    let sb = Sandbox::new();
    let script = sb.worker("talker.sh", "echo 'hello from web'\nexec sleep 1000");
    let config = sb.config(&format!("[program.web]\ncommand = {}\n", argv(&script)));
    let mut master = sb.start(&config);
    master.wait_stderr(&["web.0: hello from web"], DEADLINE);
    let c = config.display().to_string();

    let mut follower = sb.spawn_plumule(&["logs", "-f", "-c", &c]);
    sb.wait("logs -f printed the worker's line", DEADLINE, || {
        follower.stdout_text().contains("hello from web")
    });
    master.stop_with(SIGTERM, DEADLINE);
    let status = follower.wait_exit(DEADLINE);
    let stderr = follower.stderr_text();
    assert_exit_code(status, 1, &stderr);
    assert!(stderr.contains("the master went away"), "{stderr}");
}

#[test]
fn logs_since_leaves_out_older_lines() {
    let sb = Sandbox::new();
    let script = sb.worker("talker.sh", "echo 'hello from web'\nexec sleep 1000");
    let config = sb.config(&format!("[program.web]\ncommand = {}\n", argv(&script)));
    let master = sb.start(&config);
    master.wait_stderr(&["web.0: hello from web"], DEADLINE);

    let recent = sb.cli_ok(&config, &["logs", "--since", "1h"]);
    assert!(
        recent.stdout.contains("hello from web"),
        "{}",
        recent.stdout
    );
    // The line is older than a millisecond by the time a new process asks for it.
    let none = sb.cli_ok(&config, &["logs", "--since", "1ms"]);
    assert!(!none.stdout.contains("hello from web"), "{}", none.stdout);
}
