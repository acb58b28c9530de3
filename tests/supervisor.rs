//! Supervision through the real binary: worker identity, restart policies, backoff, programs
//! that cannot start, graceful stop, master death, reaping (SPEC §1–3, §9 "Semantics").

mod common;

use std::time::{Duration, Instant};

use common::*;
use plumule::protocol::LastExit;

/// Backoff for programs whose restarts must be quick and free of jitter.
const FAST_BACKOFF: &str = r#"backoff = { initial = "1ms", max = "1ms", jitter = 0.0 }"#;

/// A program that runs until killed and is restarted 1 ms after it dies: the clock the "nothing
/// else happened" checks below read.
fn probe_program(sb: &Sandbox) -> String {
    let script = sb.worker("probe.sh", "exec sleep 1000");
    format!(
        "[program.probe]\ncommand = {}\n{FAST_BACKOFF}\n\n",
        argv(&script)
    )
}

/// Proves the master has moved past every event that happened before this call: SIGKILLs the
/// probe's current worker and waits for the replacement's start line, twice. The probe restarts
/// after 1 ms like the programs under test, and the master runs its timers in order, so a restart
/// that was due for one of them would have been forked before the probe's replacement; the second
/// round gives such a process time to write its start line.
fn let_the_master_move_on(sb: &Sandbox) {
    for _ in 0..2 {
        let before = sb.starts_of("probe");
        let current = before.last().expect("the probe is running").pid;
        send(current, SIGKILL);
        sb.wait_starts("probe", before.len() + 1, DEADLINE);
    }
}

#[test]
fn workers_start_with_ids_0_to_n_minus_1_and_plumule_env() {
    let sb = Sandbox::new();
    let script = sb.worker("pool.sh", "exec sleep 1000");
    let config = sb.config(&format!(
        "[program.pool]\ncommand = {}\nworkers = 3\n",
        argv(&script)
    ));
    let mut master = sb.start(&config);

    let starts = sb.wait_starts("pool", 3, DEADLINE);
    let mut ids: Vec<u32> = starts.iter().map(|s| s.id).collect();
    ids.sort();
    assert_eq!(ids, [0, 1, 2], "worker ids: {starts:?}");
    for s in &starts {
        assert_eq!(s.workers, 3, "PLUMULE_WORKERS of {s:?}");
        let stat = proc_stat(s.pid).unwrap_or_else(|| panic!("worker {s:?} is not running"));
        assert_eq!(stat.pgrp, s.pid, "worker {s:?} leads its own process group");
        assert_eq!(
            stat.ppid,
            master.pid(),
            "worker {s:?} is a child of the master"
        );
    }
    stop_cleanly(&mut master);
}

#[test]
fn a_killed_worker_is_replaced_under_the_same_id_with_a_new_pid() {
    let sb = Sandbox::new();
    let script = sb.worker("pool.sh", "exec sleep 1000");
    let config = sb.config(&format!(
        "[program.pool]\ncommand = {}\nworkers = 2\n",
        argv(&script)
    ));
    let mut master = sb.start(&config);

    let starts = sb.wait_starts("pool", 2, DEADLINE);
    let victim = starts
        .iter()
        .find(|s| s.id == 1)
        .expect("worker 1 started")
        .clone();
    let survivor = starts
        .iter()
        .find(|s| s.id == 0)
        .expect("worker 0 started")
        .clone();
    send(victim.pid, SIGKILL);

    let starts = sb.wait_starts("pool", 3, DEADLINE);
    let replacement = &starts[2];
    assert_eq!(
        replacement.id, 1,
        "the replacement keeps the id: {starts:?}"
    );
    assert_eq!(replacement.workers, 2);
    assert_ne!(
        replacement.pid, victim.pid,
        "the replacement is a new process"
    );
    assert!(
        pid_alive(replacement.pid),
        "replacement {replacement:?} is running"
    );
    assert!(pid_alive(survivor.pid), "worker 0 was left alone");
    assert_eq!(sb.starts_of("pool").iter().filter(|s| s.id == 0).count(), 1);

    let status = sb.worker_status(&config, "pool", 1);
    assert_eq!(status.state, "running", "{status:?}");
    assert_eq!(status.pid, Some(replacement.pid), "{status:?}");
    assert_eq!(status.restarts, 1, "{status:?}");
    assert_eq!(
        status.last_exit,
        Some(LastExit::Signal {
            signal: "KILL".into()
        }),
        "{status:?}"
    );
    stop_cleanly(&mut master);
}

#[test]
fn restart_never_leaves_a_finished_worker_alone() {
    let sb = Sandbox::new();
    let clean = sb.worker("clean.sh", "exit 0");
    let failing = sb.worker("failing.sh", "exit 1");
    let config = sb.config(&format!(
        "{}[program.clean]\ncommand = {}\nrestart = \"never\"\n{FAST_BACKOFF}\n\n\
         [program.failing]\ncommand = {}\nrestart = \"never\"\n{FAST_BACKOFF}\n",
        probe_program(&sb),
        argv(&clean),
        argv(&failing),
    ));
    let mut master = sb.start(&config);

    sb.wait_starts("probe", 1, DEADLINE);
    for program in ["clean", "failing"] {
        let pid = sb.wait_starts(program, 1, DEADLINE)[0].pid;
        sb.wait(
            &format!("the master has reaped {program}'s worker"),
            DEADLINE,
            || !pid_exists(pid),
        );
    }
    let_the_master_move_on(&sb);

    assert_eq!(
        sb.starts_of("clean").len(),
        1,
        "restart = never, exit 0: not restarted"
    );
    assert_eq!(
        sb.starts_of("failing").len(),
        1,
        "restart = never, exit 1: not restarted"
    );
    for (program, code) in [("clean", 0), ("failing", 1)] {
        let status = sb.worker_status(&config, program, 0);
        assert_eq!(status.state, "exited", "{program}: {status:?}");
        assert_eq!(
            status.last_exit,
            Some(LastExit::Code { code }),
            "{program}: {status:?}"
        );
        assert_eq!(status.pid, None, "{program}: {status:?}");
    }
    stop_cleanly(&mut master);
}

#[test]
fn on_failure_restarts_failures_only_and_honours_success_exit_codes() {
    let sb = Sandbox::new();
    let clean = sb.worker("clean.sh", "exit 0");
    let first_run = sb.path("fails.ran");
    let fails = sb.worker(
        "fails.sh",
        &format!(
            "if [ ! -e {marker} ]; then : > {marker}; exit 3; fi\nexec sleep 1000",
            marker = sh_str(&first_run)
        ),
    );
    let tolerated = sb.worker("tolerated.sh", "exit 3");
    let config = sb.config(&format!(
        "{}[program.clean]\ncommand = {}\nrestart = \"on-failure\"\n{FAST_BACKOFF}\n\n\
         [program.fails]\ncommand = {}\nrestart = \"on-failure\"\n{FAST_BACKOFF}\n\n\
         [program.tolerated]\ncommand = {}\nrestart = \"on-failure\"\n\
         success_exit_codes = [0, 3]\n{FAST_BACKOFF}\n",
        probe_program(&sb),
        argv(&clean),
        argv(&fails),
        argv(&tolerated),
    ));
    let mut master = sb.start(&config);

    let restarted = sb.wait_starts("fails", 2, DEADLINE);
    assert_eq!(restarted[1].id, 0);
    sb.wait_starts("probe", 1, DEADLINE);
    for program in ["clean", "tolerated"] {
        let pid = sb.wait_starts(program, 1, DEADLINE)[0].pid;
        sb.wait(
            &format!("the master has reaped {program}'s worker"),
            DEADLINE,
            || !pid_exists(pid),
        );
    }
    let_the_master_move_on(&sb);

    assert_eq!(
        sb.starts_of("clean").len(),
        1,
        "on-failure, exit 0: not restarted"
    );
    assert_eq!(
        sb.starts_of("tolerated").len(),
        1,
        "on-failure with success_exit_codes = [0, 3], exit 3: not restarted"
    );
    assert_eq!(
        sb.starts_of("fails").len(),
        2,
        "on-failure, exit 3: restarted once, then runs"
    );
    for (program, code) in [("clean", 0), ("tolerated", 3)] {
        let status = sb.worker_status(&config, program, 0);
        assert_eq!(status.state, "exited", "{program}: {status:?}");
        assert_eq!(
            status.last_exit,
            Some(LastExit::Code { code }),
            "{program}: {status:?}"
        );
    }
    let status = sb.worker_status(&config, "fails", 0);
    assert_eq!(status.state, "running", "{status:?}");
    assert_eq!(status.restarts, 1, "{status:?}");
    assert_eq!(
        status.last_exit,
        Some(LastExit::Code { code: 3 }),
        "{status:?}"
    );
    stop_cleanly(&mut master);
}

#[test]
fn a_crash_loop_is_slowed_down_by_the_backoff() {
    let sb = Sandbox::new();
    let script = sb.timed_worker("crash.sh", "exit 1");
    let config = sb.config(&format!(
        "[program.crash]\ncommand = {}\nhealthy_after = \"1s\"\n\
         backoff = {{ initial = \"100ms\", max = \"1s\", multiplier = 2.0, jitter = 0.0 }}\n",
        argv(&script)
    ));
    let mut master = sb.start(&config);

    // Delays after crash k: 100, 200, 400, 800, 1000, 1000 ms: starts at about 0, 0.1, 0.3,
    // 0.7, 1.5, 2.5 s. Observe until one start lies past the 2 s window.
    const WINDOW: f64 = 2.0;
    let first = sb.wait_starts("crash", 1, DEADLINE)[0]
        .time
        .expect("timed start line");
    sb.wait(
        "a start more than 2 s after the first one",
        DEADLINE,
        || {
            sb.starts_of("crash")
                .iter()
                .any(|s| s.time.unwrap() > first + WINDOW)
        },
    );
    let times: Vec<f64> = sb
        .starts_of("crash")
        .iter()
        .map(|s| s.time.unwrap())
        .collect();
    let in_window = times.iter().filter(|t| **t <= first + WINDOW).count();
    assert!(
        (3..=6).contains(&in_window),
        "{in_window} starts within {WINDOW} s of the first; the backoff allows 5 (start times: \
         {times:?})"
    );
    for (k, pair) in times.windows(2).enumerate().take(5) {
        let expected = (0.1 * 2f64.powi(k as i32)).min(1.0);
        let gap = pair[1] - pair[0];
        assert!(
            gap >= expected * 0.9,
            "restart {} came {gap:.3} s after the crash before it; the backoff asks for {expected} s \
             (start times: {times:?})",
            k + 1
        );
    }
    stop_cleanly(&mut master);
}

#[test]
fn a_missing_command_fails_without_spinning_and_without_harming_others() {
    let sb = Sandbox::new();
    let config = sb.config(&format!(
        "{}[program.broken]\ncommand = [\"/nonexistent/x\"]\n{FAST_BACKOFF}\n\n\
         [program.good]\ncommand = {}\nworkers = 2\n",
        probe_program(&sb),
        argv(&sb.worker("good.sh", "exec sleep 1000")),
    ));
    let mut master = sb.start(&config);

    let good = sb.wait_starts("good", 2, DEADLINE);
    sb.wait_starts("probe", 1, DEADLINE);
    master.wait_stderr(&["broken.0", "failed"], DEADLINE);

    // A crash loop on a 1 ms backoff would keep logging about `broken`.
    let_the_master_move_on(&sb);
    let settled = master.stderr_lines_with(&["broken"]);
    let_the_master_move_on(&sb);
    let later = master.stderr_lines_with(&["broken"]);
    assert_eq!(
        settled, later,
        "the master keeps acting on the failed program"
    );
    assert!(
        settled.len() <= 10,
        "too much said about `broken`: {settled:#?}"
    );

    assert_eq!(
        sb.starts_of("good").len(),
        2,
        "the good program was not disturbed"
    );
    for s in &good {
        assert!(pid_alive(s.pid), "good worker {s:?} still runs");
    }

    let (code, json) = sb.status(&config);
    assert_eq!(code, 3, "status exits 3 when a worker is failed: {json:?}");
    let broken = sb.worker_status(&config, "broken", 0);
    assert_eq!(broken.state, "failed", "{broken:?}");
    assert_eq!(broken.pid, None, "{broken:?}");
    assert!(
        broken.detail.as_deref().is_some_and(|d| !d.is_empty()),
        "failed says why: {broken:?}"
    );
    for id in 0..2 {
        let good = sb.worker_status(&config, "good", id);
        assert_eq!(good.state, "running", "{good:?}");
        assert_eq!(good.restarts, 0, "{good:?}");
    }
    stop_cleanly(&mut master);
}

#[test]
fn a_graceful_stop_kills_the_workers_grandchildren() {
    let sb = Sandbox::new();
    let script = sb.worker(
        "parent.sh",
        &format!(
            "sleep 1000 &\necho $! > {}\nwait",
            sh_str(&sb.path("grandchild"))
        ),
    );
    let config = sb.config(&format!("[program.parent]\ncommand = {}\n", argv(&script)));
    let mut master = sb.start(&config);

    let worker = sb.wait_starts("parent", 1, DEADLINE)[0].pid;
    let grandchild: i32 = sb.wait_line("grandchild", DEADLINE).parse().expect("a pid");
    assert_eq!(proc_stat(grandchild).expect("grandchild runs").pgrp, worker);

    stop_cleanly(&mut master);
    sb.wait("the worker and its grandchild are gone", DEADLINE, || {
        !pid_alive(worker) && !pid_alive(grandchild) && group_members(worker).is_empty()
    });
}

#[test]
fn sigint_is_a_graceful_stop_too() {
    let sb = Sandbox::new();
    let script = sb.worker("w.sh", "exec sleep 1000");
    let config = sb.config(&format!("[program.w]\ncommand = {}\n", argv(&script)));
    let mut master = sb.start(&config);

    let worker = sb.wait_starts("w", 1, DEADLINE)[0].pid;
    let status = master.stop_with(SIGINT, DEADLINE);
    assert_exit_code(status, 0, &master.stderr_text());
    sb.wait("the worker is gone", DEADLINE, || !pid_alive(worker));
}

#[test]
fn a_worker_ignoring_sigterm_is_killed_after_stop_timeout() {
    let sb = Sandbox::new();
    let script = sb.worker("stubborn.sh", "trap '' TERM\nexec sleep 1000");
    let config = sb.config(&format!(
        "[program.stubborn]\ncommand = {}\nstop_timeout = \"500ms\"\n",
        argv(&script)
    ));
    let mut master = sb.start(&config);

    let worker = sb.wait_starts("stubborn", 1, DEADLINE)[0].pid;
    let asked = Instant::now();
    stop_cleanly(&mut master);
    let took = asked.elapsed();
    sb.wait(
        "the SIGTERM-ignoring worker is gone",
        Duration::from_secs(1),
        || !pid_alive(worker),
    );
    assert!(
        took >= Duration::from_millis(450),
        "the master exited {took:?} after SIGTERM: it did not give the worker its stop_timeout"
    );
}

#[test]
fn workers_get_sigterm_when_the_master_is_killed() {
    let sb = Sandbox::new();
    let script = sb.worker(
        "w.sh",
        &format!(
            "trap 'echo TERM > {}.$PLUMULE_WORKER_ID; kill $child; exit 0' TERM\n\
             sleep 1000 &\nchild=$!\nwait",
            sh_str(&sb.path("got"))
        ),
    );
    let config = sb.config(&format!(
        "[program.w]\ncommand = {}\nworkers = 2\n",
        argv(&script)
    ));
    let mut master = sb.start(&config);

    let workers = sb.wait_starts("w", 2, DEADLINE);
    master.signal(SIGKILL);
    master.wait_exit(DEADLINE);

    for w in &workers {
        assert_eq!(
            sb.wait_line(&format!("got.{}", w.id), DEADLINE),
            "TERM",
            "worker {w:?}"
        );
        sb.wait(
            &format!("worker {} (pid {}) is gone", w.id, w.pid),
            DEADLINE,
            || !pid_alive(w.pid),
        );
    }
}

#[test]
fn no_zombie_is_left_after_hundreds_of_crashes() {
    const CRASHES: usize = 300;
    let sb = Sandbox::new();
    // Crashes at once until it has started CRASHES times, then stays up: from then on every
    // earlier worker must have been reaped.
    let script = sb.worker(
        "crash.sh",
        &format!(
            "n=$(wc -l < {})\nif [ \"$n\" -ge {CRASHES} ]; then exec sleep 1000; fi\nexit 1",
            sh_str(&sb.starts_file())
        ),
    );
    let config = sb.config(&format!(
        "[program.crash]\ncommand = {}\nbackoff = {{ initial = \"1ms\", max = \"1ms\", jitter = 0.0 }}\n",
        argv(&script)
    ));
    let mut master = sb.start(&config);

    // While it loops, at most the one worker that is exiting right now may be a zombie.
    let mut most_zombies = 0;
    let mut last = None;
    sb.wait(
        &format!("{CRASHES} starts, the last one still running"),
        Duration::from_secs(18),
        || {
            most_zombies = most_zombies.max(zombie_children(master.pid()).len());
            let starts = sb.starts_of("crash");
            last = starts.get(CRASHES - 1).cloned();
            last.as_ref()
                .is_some_and(|s| proc_stat(s.pid).is_some_and(|p| p.comm == "sleep"))
        },
    );
    assert!(
        most_zombies <= 1,
        "{most_zombies} zombie children of the master at once"
    );

    let zombies = zombie_children(master.pid());
    assert!(
        zombies.is_empty(),
        "zombies after {CRASHES} crashes: {zombies:?}"
    );
    let children = live_children(master.pid());
    let last = last.unwrap();
    let workers: Vec<i32> = children
        .iter()
        .filter(|p| p.comm != plumule::sys::forkserver::NAME)
        .map(|p| p.pid)
        .collect();
    assert_eq!(
        workers,
        [last.pid],
        "the master's only children are the running worker and its fork server: {children:?}"
    );
    assert!(children.len() <= 2, "{children:?}");
    stop_cleanly(&mut master);
    assert_eq!(sb.starts_of("crash").len(), CRASHES);
}

#[test]
fn the_start_limit_turns_a_crash_loop_into_failed() {
    let sb = Sandbox::new();
    let script = sb.worker("crash.sh", "exit 1");
    let config = sb.config(&format!(
        "{}[program.crash]\ncommand = {}\n{FAST_BACKOFF}\n\
         start_limit = {{ burst = 3, interval = \"60s\" }}\n",
        probe_program(&sb),
        argv(&script)
    ));
    let mut master = sb.start(&config);

    sb.wait_starts("probe", 1, DEADLINE);
    let starts = sb.wait_starts("crash", 3, DEADLINE);
    sb.wait("the master has reaped the third crash", DEADLINE, || {
        !pid_exists(starts[2].pid)
    });
    let_the_master_move_on(&sb);

    assert_eq!(
        sb.starts_of("crash").len(),
        3,
        "burst = 3 counts the first start too"
    );
    let status = sb.worker_status(&config, "crash", 0);
    assert_eq!(status.state, "failed", "{status:?}");
    assert_eq!(
        status.last_exit,
        Some(LastExit::Code { code: 1 }),
        "{status:?}"
    );
    stop_cleanly(&mut master);
}

#[test]
fn a_healthy_run_is_restarted_at_once_despite_a_long_backoff() {
    let sb = Sandbox::new();
    // Each run lasts 300 ms, longer than healthy_after, then fails.
    let script = sb.timed_worker("steady.sh", "sleep 0.3\nexit 1");
    let config = sb.config(&format!(
        "[program.steady]\ncommand = {}\nhealthy_after = \"100ms\"\n\
         backoff = {{ initial = \"5s\", max = \"5s\", jitter = 0.0 }}\n",
        argv(&script)
    ));
    let mut master = sb.start(&config);

    let starts = sb.wait_starts("steady", 3, DEADLINE);
    let times: Vec<f64> = starts.iter().map(|s| s.time.unwrap()).collect();
    for pair in times.windows(2) {
        assert!(
            pair[1] - pair[0] < 2.0,
            "a run longer than healthy_after waited for the 5 s backoff (start times {times:?})"
        );
    }
    stop_cleanly(&mut master);
}

#[test]
fn a_string_command_runs_through_sh_with_env_and_cwd() {
    let sb = Sandbox::new();
    std::fs::create_dir(sb.path("wd")).expect("mkdir wd");
    let out = sb.path("env.out");
    let config = sb.config(&format!(
        "[program.shell]\n\
         command = \"echo \\\"$GREETING $PLUMULE_PROGRAM.$PLUMULE_WORKER_ID $(pwd)\\\" >> {}; exec sleep 1000\"\n\
         env = {{ GREETING = \"hello there\" }}\ncwd = {}\n",
        sh_str(&out),
        toml_str(&sb.path("wd"))
    ));
    let mut master = sb.start(&config);

    let line = sb.wait_line("env.out", DEADLINE);
    assert_eq!(
        line,
        format!("hello there shell.0 {}", sb.path("wd").display())
    );
    stop_cleanly(&mut master);
}

#[test]
fn shutdown_timeout_caps_the_whole_stop() {
    let sb = Sandbox::new();
    let script = sb.worker("stubborn.sh", "trap '' TERM\nexec sleep 1000");
    let header = sb
        .header()
        .replace("shutdown_timeout = \"5s\"", "shutdown_timeout = \"1s\"");
    let text = format!(
        "{header}[program.stubborn]\ncommand = {}\nstop_timeout = \"30s\"\n",
        argv(&script)
    );
    let config = sb.write_file("plumule.toml", &text, 0o644);
    let mut master = sb.start(&config);

    let worker = sb.wait_starts("stubborn", 1, DEADLINE)[0].pid;
    let asked = Instant::now();
    stop_cleanly(&mut master);
    let took = asked.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "the stop took {took:?}: shutdown_timeout = 1s should cut stop_timeout = 30s short"
    );
    sb.wait(
        "the SIGTERM-ignoring worker is gone",
        Duration::from_secs(1),
        || !pid_alive(worker),
    );
}

#[test]
fn what_is_left_of_a_dead_workers_group_is_killed_before_its_replacement_starts() {
    let sb = Sandbox::new();
    // Leaves a child behind and exits; the next run reports whether the previous run's child
    // was still alive when it started.
    let script = sb.worker(
        "leaky.sh",
        &format!(
            r#"prev=$(cat {dir}/leftover 2>/dev/null)
if [ -n "$prev" ] && read -r stat 2>/dev/null < /proc/$prev/stat; then
    set -- ${{stat##*)}}
    # Killed means SIGKILL is pending or done: on a busy machine a killed process may not
    # have run yet to die, but it never runs its own code again.
    killed=0
    while read -r key mask; do
        case $key in SigPnd:|ShdPnd:) [ $(( 0x$mask & 0x100 )) -ne 0 ] && killed=1 ;; esac
    done < /proc/$prev/status 2>/dev/null
    [ "$1" = Z ] || [ $killed = 1 ] || echo "$$ started while $prev was alive" >> {dir}/overlap
fi
sleep 1000 &
echo $! > {dir}/leftover.new
mv {dir}/leftover.new {dir}/leftover
exit 1"#,
            dir = sh_str(sb.root())
        ),
    );
    let config = sb.config(&format!(
        "[program.leaky]\ncommand = {}\n{FAST_BACKOFF}\n",
        argv(&script)
    ));
    let mut master = sb.start(&config);

    sb.wait_starts("leaky", 3, DEADLINE);
    let overlap = std::fs::read_to_string(sb.path("overlap")).unwrap_or_default();
    assert!(
        overlap.is_empty(),
        "a replacement started beside a leftover child:\n{overlap}"
    );
    stop_cleanly(&mut master);
}

/// The workers are forked by a small fork server, a child of the master. Should it die, the
/// master forks them itself: supervision goes on.
#[test]
fn a_dead_fork_server_does_not_stop_restarts() {
    let sb = Sandbox::new();
    let script = sb.worker("pool.sh", "exec sleep 1000");
    let config = sb.config(&format!(
        "[program.pool]\ncommand = {}\nworkers = 1\n",
        argv(&script)
    ));
    let mut master = sb.start(&config);
    let first = sb.wait_starts("pool", 1, DEADLINE)[0].clone();
    let server = live_children(master.pid())
        .into_iter()
        .find(|p| p.comm == plumule::sys::forkserver::NAME)
        .expect("the master has a fork server");
    assert_eq!(proc_stat(first.pid).unwrap().ppid, master.pid());
    send(server.pid, SIGKILL);
    send(first.pid, SIGKILL);
    let starts = sb.wait_starts("pool", 2, DEADLINE);
    let second = &starts[1];
    assert!(pid_alive(second.pid), "{second:?} runs");
    assert_eq!(
        proc_stat(second.pid).unwrap().ppid,
        master.pid(),
        "forked by the master itself"
    );
    sb.wait("the dead fork server is reaped", DEADLINE, || {
        proc_stat(server.pid).is_none_or(|p| p.ppid != master.pid())
    });
    stop_cleanly(&mut master);
}
