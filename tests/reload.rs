//! Reload through the real binary (SPEC §3 SIGHUP, §9 reload rules and `scale`): every kind of
//! difference between the old and the new file, each checked by the pids before and after;
//! invalid files (by `plumule reload` and by SIGHUP); `reload = "signal"` and `"none"`; how
//! long a `scale` lasts.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use plumule::protocol::{LastExit, StatusReport};

use common::*;
use nix::sys::signal::Signal::SIGHUP;

// ---------------------------------------------------------------------------------------------
// Observing the master

fn programs(status: &StatusReport) -> BTreeSet<String> {
    entries(status).into_iter().map(|e| e.program).collect()
}

/// Asserts that `program` runs exactly `expected` (id → pid), every one alive.
#[track_caller]
fn assert_pids(status: &StatusReport, program: &str, expected: &BTreeMap<u32, i32>, when: &str) {
    let listed = entries(status)
        .into_iter()
        .filter(|e| e.program == program)
        .count();
    assert_eq!(
        (listed, &running(status, program)),
        (expected.len(), expected),
        "{program} {when}: {status:?}"
    );
    for (id, pid) in expected {
        assert!(pid_alive(*pid), "{program}.{id} (pid {pid}) is gone {when}");
    }
}

#[track_caller]
fn assert_all_dead(pids: &BTreeMap<u32, i32>, what: &str) {
    for (id, pid) in pids {
        assert!(
            !pid_alive(*pid),
            "{what}: old worker {id} (pid {pid}) still runs"
        );
    }
}

#[track_caller]
fn wait_all_dead(sb: &Sandbox, pids: &BTreeMap<u32, i32>, what: &str) {
    sb.wait(
        &format!("{what}: every old worker has exited"),
        DEADLINE,
        || pids.values().all(|p| !pid_alive(*p)),
    );
}

/// `plumule reload -c CONFIG` must succeed; returns what it printed.
#[track_caller]
fn reload(sb: &Sandbox, config: &Path) -> String {
    sb.cli_ok(config, &["reload"]).stdout
}

/// The last argument the process was started with (the version argument of [`app`]).
fn version_of(pid: i32) -> String {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let args: Vec<&[u8]> = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .collect();
    args.last()
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .unwrap_or_default()
}

/// A worker script that stays a shell (so its argv, the version, shows in /proc) until its
/// process group gets the stop signal.
fn app(sb: &Sandbox) -> PathBuf {
    sb.worker("app.sh", "sleep 1000 &\nwait $!")
}

/// `[program.NAME]` running `script` with the argument `version`, and `extra` lines.
fn program(name: &str, script: &Path, version: &str, extra: &str) -> String {
    format!(
        "[program.{name}]\ncommand = [{}, \"{version}\"]\n{extra}\n",
        toml_str(script)
    )
}

// ---------------------------------------------------------------------------------------------
// What changed → what happens

#[test]
fn an_added_program_starts_and_the_others_keep_their_pids() {
    let sb = Sandbox::new();
    let a = app(&sb);
    let web = program("web", &a, "v1", "workers = 2");
    let config = sb.config(&web);
    let mut master = sb.start(&config);
    let before = wait_running(&sb, "web", 2);

    sb.config(&format!(
        "{web}\n{}",
        program("extra", &a, "v1", "workers = 2")
    ));
    assert_eq!(reload(&sb, &config), "extra: added\n");
    // reload returns once the plan is applied: the new workers run.
    let st = socket_status(&sb);
    let extra = running(&st, "extra");
    assert_eq!(extra.keys().copied().collect::<Vec<_>>(), [0, 1], "{st:?}");
    assert_pids(&st, "web", &before, "after adding extra");
    stop_cleanly(&mut master);
}

#[test]
fn a_removed_program_stops_and_the_others_keep_their_pids() {
    let sb = Sandbox::new();
    let a = app(&sb);
    let web = program("web", &a, "v1", "workers = 2");
    let config = sb.config(&format!(
        "{web}\n{}",
        program("gone", &a, "v1", "workers = 2")
    ));
    let mut master = sb.start(&config);
    let before = wait_running(&sb, "web", 2);
    let gone = wait_running(&sb, "gone", 2);

    sb.config(&web);
    assert_eq!(reload(&sb, &config), "gone: removed\n");
    wait_all_dead(&sb, &gone, "gone was removed");
    sb.wait("status no longer lists gone", DEADLINE, || {
        !programs(&socket_status(&sb)).contains("gone")
    });
    assert_pids(&socket_status(&sb), "web", &before, "after removing gone");
    stop_cleanly(&mut master);
}

#[test]
fn a_changed_workers_count_scales_and_the_survivors_keep_their_pids() {
    let sb = Sandbox::new();
    let a = app(&sb);
    let other = program("other", &a, "v1", "");
    let config = sb.config(&format!(
        "{}\n{other}",
        program("web", &a, "v1", "workers = 3")
    ));
    let mut master = sb.start(&config);
    let three = wait_running(&sb, "web", 3);
    let others = wait_running(&sb, "other", 1);

    sb.config(&format!(
        "{}\n{other}",
        program("web", &a, "v1", "workers = 5")
    ));
    assert_eq!(reload(&sb, &config), "web: workers 3 -> 5\n");
    let st = socket_status(&sb);
    let five = running(&st, "web");
    assert_eq!(
        five.keys().copied().collect::<Vec<_>>(),
        [0, 1, 2, 3, 4],
        "{st:?}"
    );
    for id in 0..3 {
        assert_eq!(
            five[&id], three[&id],
            "web.{id} kept its pid when scaling up"
        );
    }
    assert_pids(&st, "other", &others, "after web 3 -> 5");

    sb.config(&format!(
        "{}\n{other}",
        program("web", &a, "v1", "workers = 2")
    ));
    assert_eq!(reload(&sb, &config), "web: workers 5 -> 2\n");
    // Returned once the count is reached: the highest ids are gone, the lowest untouched.
    let st = socket_status(&sb);
    let two: BTreeMap<u32, i32> = five
        .iter()
        .filter(|(id, _)| **id < 2)
        .map(|(i, p)| (*i, *p))
        .collect();
    assert_pids(&st, "web", &two, "after web 5 -> 2");
    let stopped: BTreeMap<u32, i32> = five
        .iter()
        .filter(|(id, _)| **id >= 2)
        .map(|(i, p)| (*i, *p))
        .collect();
    assert_all_dead(&stopped, "web 5 -> 2 returned");
    assert_pids(&st, "other", &others, "after web 5 -> 2");
    stop_cleanly(&mut master);
}

/// A worker that, on the stop signal, waits until the file `gate` exists before it exits: the
/// test decides when an old process may go. The trap is set before the start line is written,
/// so a worker seen started always has it.
///
/// When the stop signal reaches it, it first appends `term PID SUCCESSORS` to `events`:
/// SUCCESSORS are the master's other children that have already exec'd this script with the
/// argument `v2` under the same worker id (what a successor in a rolling restart is).
fn gated_app(sb: &Sandbox, gate: &Path, events: &Path) -> PathBuf {
    sb.script(
        "gated.sh",
        &format!(
            "successors() {{\n\
               for p in $(cat /proc/$PPID/task/*/children); do\n\
                 [ \"$p\" = \"$$\" ] && continue\n\
                 tr '\\0' '\\n' < /proc/$p/cmdline 2>/dev/null | grep -qx v2 || continue\n\
                 tr '\\0' '\\n' < /proc/$p/environ 2>/dev/null \\\n\
                   | grep -qx \"PLUMULE_WORKER_ID=$PLUMULE_WORKER_ID\" || continue\n\
                 printf ' %s' \"$p\"\n\
               done\n\
             }}\n\
             trap 'echo \"term $$$(successors)\" >> {events}; \
                   while [ ! -e {gate} ]; do sleep 0.01; done; exit 0' TERM\n\
             echo \"$PLUMULE_PROGRAM $PLUMULE_WORKER_ID $PLUMULE_WORKERS $$\" >> {starts}\n\
             sleep 1000 &\n\
             wait $!",
            gate = sh_str(gate),
            events = sh_str(events),
            starts = sh_str(&sb.starts_file()),
        ),
    )
}

/// What the old process `pid` saw when its stop signal came: its successors' pids (see
/// [`gated_app`]); `None` if it never got one.
fn successors_at_term(events: &Path, pid: i32) -> Option<Vec<i32>> {
    let text = std::fs::read_to_string(events).unwrap_or_default();
    text.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        (f.next() == Some("term") && f.next() == Some(&pid.to_string()))
            .then(|| f.map(|p| p.parse().expect("a pid")).collect())
    })
}

#[test]
fn a_command_change_rolls_one_worker_at_a_time_old_stopping_beside_its_successor() {
    let sb = Sandbox::new();
    let gate = sb.path("gate");
    let events = sb.path("events");
    let g = gated_app(&sb, &gate, &events);
    let steady = program("steady", &app(&sb), "v1", "workers = 2");
    let config = sb.config(&format!(
        "{}\n{steady}",
        program("web", &g, "v1", "workers = 2")
    ));
    let mut master = sb.start(&config);
    let old = wait_running(&sb, "web", 2);
    let steady_pids = wait_running(&sb, "steady", 2);
    for pid in old.values() {
        sb.wait("the worker has set its trap", DEADLINE, || {
            sb.starts().iter().any(|s| s.pid == *pid)
        });
    }

    sb.config(&format!(
        "{}\n{steady}",
        program("web", &g, "v2", "workers = 2")
    ));
    // The reload answers only once the roll is done, and the old processes cannot finish
    // before the gate opens: status is polled meanwhile.
    let mut reload = sb.spawn_plumule(&["reload", "-c", &config.display().to_string()]);
    // Every sample: at most one worker rolling, its old process shown `stopping` beside a
    // successor under the same id, the other worker untouched. Until a sample shows the
    // successor `running` (the old one cannot leave before the gate opens).
    let mut seen = None;
    sb.wait(
        "status shows an old web worker `stopping` beside its running successor",
        DEADLINE,
        || {
            let st = socket_status(&sb);
            let web: Vec<Entry> = entries(&st)
                .into_iter()
                .filter(|e| e.program == "web")
                .collect();
            let stopping: Vec<&Entry> = web.iter().filter(|e| e.state == "stopping").collect();
            assert!(stopping.len() <= 1, "one worker at a time: {st:?}");
            let Some(s) = stopping.first() else {
                return false;
            };
            let successor = web
                .iter()
                .find(|e| e.id == s.id && e.state != "stopping")
                .unwrap_or_else(|| panic!("web.{} stops without a successor: {st:?}", s.id));
            assert!(
                ["starting", "running"].contains(&successor.state.as_str()),
                "the successor of web.{} is starting or running: {st:?}",
                s.id
            );
            assert_eq!(
                s.pid,
                Some(old[&s.id]),
                "the stopping one is the old process: {st:?}"
            );
            assert_ne!(successor.pid, s.pid, "{st:?}");
            // Only that worker is rolling: the other one still runs its old process.
            for e in web.iter().filter(|e| e.id != s.id) {
                assert_eq!(
                    (e.state.as_str(), e.pid),
                    ("running", Some(old[&e.id])),
                    "{st:?}"
                );
            }
            if successor.state != "running" {
                return false;
            }
            seen = Some((s.id, successor.pid.unwrap()));
            true
        },
    );
    let (id, successor) = seen.unwrap();
    assert_eq!(
        version_of(successor),
        "v2",
        "the successor of web.{id} runs the new command"
    );
    assert!(
        reload.running(),
        "reload answered while a roll was under way"
    );

    std::fs::write(&gate, "").unwrap();
    let status_code = reload.wait_exit(DEADLINE);
    assert_exit_code(status_code, 0, &reload.stderr_text());
    assert_eq!(
        reload.stdout_text(),
        "web: command changed (rolling restart)\n"
    );

    let st = socket_status(&sb);
    let new = running(&st, "web");
    assert_eq!(new.keys().copied().collect::<Vec<_>>(), [0, 1], "{st:?}");
    assert_eq!(
        new[&id], successor,
        "web.{id} keeps the successor seen during the roll"
    );
    for (id, pid) in &new {
        assert_ne!(old[id], *pid, "web.{id} has a new process");
        assert_eq!(version_of(*pid), "v2", "web.{id} runs the new command");
    }
    assert_all_dead(&old, "the roll is done");
    // The new one had exec'd the new command before the old one was told to stop.
    for (id, pid) in &new {
        assert_eq!(
            successors_at_term(&events, old[id]),
            Some(vec![*pid]),
            "web.{id}: when the old {} got its stop signal, its successor {pid} ran already",
            old[id]
        );
    }
    assert!(
        !entries(&st).iter().any(|e| e.state == "stopping"),
        "{st:?}"
    );
    assert_pids(&st, "steady", &steady_pids, "beside a rolled program");
    stop_cleanly(&mut master);
}

#[test]
fn an_unchanged_program_keeps_its_pids_beside_a_changed_one() {
    let sb = Sandbox::new();
    let a = app(&sb);
    let first = program("first", &a, "v1", "workers = 2");
    let last = program("last", &a, "v1", "workers = 2");
    let config = sb.config(&format!(
        "{first}\n{}\n{last}",
        program("mid", &a, "v1", "workers = 2\nenv = { MODE = \"a\" }")
    ));
    let mut master = sb.start(&config);
    let f = wait_running(&sb, "first", 2);
    let m = wait_running(&sb, "mid", 2);
    let l = wait_running(&sb, "last", 2);

    sb.config(&format!(
        "{first}\n{}\n{last}",
        program("mid", &a, "v1", "workers = 2\nenv = { MODE = \"b\" }")
    ));
    assert_eq!(reload(&sb, &config), "mid: env changed (rolling restart)\n");
    let st = socket_status(&sb);
    assert_pids(&st, "first", &f, "beside a changed program");
    assert_pids(&st, "last", &l, "beside a changed program");
    let new = running(&st, "mid");
    assert_eq!(new.len(), 2, "{st:?}");
    for (id, pid) in &new {
        assert_ne!(m[id], *pid, "mid.{id} has a new process");
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        assert!(
            env.split(|b| *b == 0).any(|v| v == b"MODE=b"),
            "mid.{id} runs with the new env"
        );
    }
    assert_all_dead(&m, "mid was rolled");
    stop_cleanly(&mut master);
}

#[test]
fn a_settings_only_change_applies_in_place_without_touching_a_worker() {
    let sb = Sandbox::new();
    let a = app(&sb);
    let config = sb.config(&program("web", &a, "v1", "workers = 3"));
    let mut master = sb.start(&config);
    let before = wait_running(&sb, "web", 3);

    sb.config(&program(
        "web",
        &a,
        "v1",
        "workers = 3\n\
         stop_timeout = \"3s\"\n\
         backoff = { initial = \"10ms\", max = \"1s\", multiplier = 3.0, jitter = 0.0 }\n\
         start_limit = { burst = 5, interval = \"10s\" }\n\
         healthy_after = \"2s\"\n\
         restart = \"on-failure\"\n\
         success_exit_codes = [0, 3]\n\
         stop_signal = \"INT\"\n\
         reload_signal = \"USR2\"\n\
         ready_timeout = \"5s\"",
    ));
    let out = reload(&sb, &config);
    assert!(
        out.starts_with("web: ") && out.contains("(applied in place)") && !out.contains("rolling"),
        "{out}"
    );
    assert_eq!(out.lines().count(), 1, "{out}");
    let st = socket_status(&sb);
    assert_pids(&st, "web", &before, "after a settings-only change");
    for w in &st.programs[0].workers {
        assert_eq!(w.restarts, 0, "{w:?}");
    }
    // Applied: the new stop signal is the one a stop now sends (INT, not TERM).
    sb.cli_ok(&config, &["stop", "web.0"]);
    let st = socket_status(&sb);
    let w0 = &st.programs[0].workers[0];
    assert_eq!(w0.state, "stopped", "{st:?}");
    assert_eq!(
        w0.last_exit,
        Some(LastExit::Signal {
            signal: "INT".into()
        }),
        "{st:?}"
    );
    stop_cleanly(&mut master);
}

#[test]
fn a_renamed_program_is_a_removal_and_an_addition() {
    let sb = Sandbox::new();
    let a = app(&sb);
    let keep = program("keep", &a, "v1", "");
    let config = sb.config(&format!(
        "{keep}\n{}",
        program("before", &a, "v1", "workers = 2")
    ));
    let mut master = sb.start(&config);
    let k = wait_running(&sb, "keep", 1);
    let old = wait_running(&sb, "before", 2);

    sb.config(&format!(
        "{keep}\n{}",
        program("after", &a, "v1", "workers = 2")
    ));
    let out = reload(&sb, &config);
    let mut lines: Vec<&str> = out.lines().collect();
    lines.sort();
    assert_eq!(lines, ["after: added", "before: removed"], "{out}");
    let st = socket_status(&sb);
    let new = running(&st, "after");
    assert_eq!(new.keys().copied().collect::<Vec<_>>(), [0, 1], "{st:?}");
    assert!(
        new.values().all(|p| !old.values().any(|o| o == p)),
        "{st:?}"
    );
    wait_all_dead(&sb, &old, "before was renamed");
    sb.wait("status no longer lists `before`", DEADLINE, || {
        programs(&socket_status(&sb)) == BTreeSet::from(["after".to_string(), "keep".to_string()])
    });
    assert_pids(&socket_status(&sb), "keep", &k, "beside a rename");
    stop_cleanly(&mut master);
}

// ---------------------------------------------------------------------------------------------
// Invalid files

/// The config with `line8` as its line 8 (the header takes lines 1–5; `[program.web]` is 6).
fn config_with_line_8(sb: &Sandbox, script: &Path, line8: &str) -> PathBuf {
    let config = sb.config(&format!(
        "[program.web]\ncommand = {}\n{line8}\n",
        argv(script)
    ));
    let text = std::fs::read_to_string(&config).unwrap();
    assert_eq!(text.lines().nth(7), Some(line8), "line 8 of:\n{text}");
    config
}

const BAD_LINES: &[(&str, &str)] = &[
    ("workers = = 2", "syntax error"),
    ("worker = 2", "unknown key"),
    ("workers = \"two\"", "wrong type"),
    ("stop_signal = \"NOPE\"", "unknown signal"),
];

#[test]
fn an_invalid_file_changes_nothing_and_reload_says_where_with_exit_1() {
    let sb = Sandbox::new();
    let s = sleeper(&sb);
    let config = config_with_line_8(&sb, &s, "workers = 2");
    let mut master = sb.start(&config);
    let before = wait_running(&sb, "web", 2);
    let sock = sb.control_socket().display().to_string();
    let located = format!("{}:8:", config.display());

    for (line, what) in BAD_LINES {
        config_with_line_8(&sb, &s, line);
        // --socket: how the client finds the master is another test's business.
        let out = sb.plumule(&["reload", "--socket", &sock], DEADLINE);
        assert_exit_code(out.status, 1, &format!("{what}: {}", out.stderr));
        assert!(
            out.stderr.contains(&located),
            "{what}: stderr names {located}: {}",
            out.stderr
        );
        assert_pids(
            &socket_status(&sb),
            "web",
            &before,
            &format!("after a reload with a {what}"),
        );
    }
    // The master kept the old config: a valid file now is compared with it.
    config_with_line_8(&sb, &s, "workers = 3");
    assert_eq!(reload(&sb, &config), "web: workers 2 -> 3\n");
    let st = socket_status(&sb);
    assert_eq!(running(&st, "web").len(), 3, "{st:?}");
    for (id, pid) in &before {
        assert_eq!(running(&st, "web")[id], *pid);
    }
    stop_cleanly(&mut master);
}

/// `plumule reload -c FILE` must reach the master FILE names even when FILE was just edited
/// into something unparsable: that is when an operator runs it.
#[test]
fn reload_with_c_reaches_the_master_even_when_the_file_has_a_syntax_error() {
    let sb = Sandbox::new();
    let s = sleeper(&sb);
    let config = config_with_line_8(&sb, &s, "workers = 2");
    let mut master = sb.start(&config);
    let before = wait_running(&sb, "web", 2);
    config_with_line_8(&sb, &s, "workers = = 2");
    let out = sb.cli(&config, &["reload"]);
    assert_exit_code(out.status, 1, &out.stderr);
    let located = format!("{}:8:", config.display());
    assert!(
        out.stderr.contains(&located),
        "stderr names {located} (the master's answer), not a missing master: {}",
        out.stderr
    );
    assert_pids(
        &socket_status(&sb),
        "web",
        &before,
        "after the refused reload",
    );
    stop_cleanly(&mut master);
}

#[test]
fn sighup_with_an_invalid_file_keeps_everything_and_logs_where() {
    let sb = Sandbox::new();
    let s = sleeper(&sb);
    let config = config_with_line_8(&sb, &s, "workers = 2");
    let mut master = sb.start(&config);
    let before = wait_running(&sb, "web", 2);
    let located = format!("{}:8:", config.display());

    for (n, (line, what)) in BAD_LINES.iter().enumerate() {
        config_with_line_8(&sb, &s, line);
        master.signal(SIGHUP);
        sb.wait(
            &format!("the master has logged refusal {}", n + 1),
            DEADLINE,
            || master.stderr_lines_with(&[&located]).len() > n,
        );
        assert_pids(
            &socket_status(&sb),
            "web",
            &before,
            &format!("after SIGHUP with a {what}"),
        );
    }
    // SIGHUP with a valid file applies it.
    sb.config(&format!(
        "[program.web]\ncommand = {a}\nworkers = 2\n\n[program.late]\ncommand = {a}\n",
        a = argv(&s)
    ));
    master.signal(SIGHUP);
    wait_running(&sb, "late", 1);
    assert_pids(&socket_status(&sb), "web", &before, "after a valid SIGHUP");
    stop_cleanly(&mut master);
}

// ---------------------------------------------------------------------------------------------
// reload = "signal" and "none"

#[test]
fn reload_signal_sends_reload_signal_at_every_reload_and_keeps_the_pids() {
    let sb = Sandbox::new();
    let log = sb.path("signals");
    // Traps first, then the start line: a worker seen started catches the signal.
    let script = sb.script(
        "hup.sh",
        &format!(
            "trap 'echo \"HUP $PLUMULE_PROGRAM $PLUMULE_WORKER_ID $$\" >> {log}' HUP\n\
             trap 'echo \"USR2 $PLUMULE_PROGRAM $PLUMULE_WORKER_ID $$\" >> {log}' USR2\n\
             echo \"$PLUMULE_PROGRAM $PLUMULE_WORKER_ID $PLUMULE_WORKERS $$\" >> {starts}\n\
             sleep 1000 & child=$!\n\
             while :; do wait $child; done",
            log = sh_str(&log),
            starts = sh_str(&sb.starts_file()),
        ),
    );
    let config = sb.config(&format!(
        "[program.hup]\ncommand = {a}\nworkers = 2\nreload = \"signal\"\n\n\
         [program.usr]\ncommand = {a}\nreload = \"signal\"\nreload_signal = \"USR2\"\n\n\
         [program.plain]\ncommand = {a}\n",
        a = argv(&script)
    ));
    let mut master = sb.start(&config);
    let hup = wait_running(&sb, "hup", 2);
    let usr = wait_running(&sb, "usr", 1);
    let plain = wait_running(&sb, "plain", 1);
    sb.wait_starts("hup", 2, DEADLINE);
    sb.wait_starts("usr", 1, DEADLINE);
    sb.wait_starts("plain", 1, DEADLINE);

    let mut expected = BTreeSet::new();
    for round in 1..=2 {
        let out = reload(&sb, &config);
        let mut lines: Vec<&str> = out.lines().collect();
        lines.sort();
        assert_eq!(
            lines,
            ["hup: reload signal sent", "usr: reload signal sent"],
            "{out}"
        );
        for (id, pid) in &hup {
            expected.insert(format!("HUP hup {id} {pid} #{round}"));
        }
        expected.insert(format!("USR2 usr 0 {} #{round}", usr[&0]));
        let mut got = BTreeSet::new();
        sb.wait(
            &format!("every signalled worker has logged reload {round}"),
            DEADLINE,
            || {
                // Number repeated lines by their occurrence: round k is the k-th.
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let mut count = BTreeMap::<&str, usize>::new();
                got = text
                    .lines()
                    .map(|l| {
                        let k = count.entry(l).or_default();
                        *k += 1;
                        format!("{l} #{k}")
                    })
                    .collect();
                got.len() >= expected.len()
            },
        );
        assert_eq!(got, expected, "signals logged after reload {round}");
        let st = socket_status(&sb);
        assert_pids(&st, "hup", &hup, &format!("after reload {round}"));
        assert_pids(&st, "usr", &usr, &format!("after reload {round}"));
        assert_pids(&st, "plain", &plain, &format!("after reload {round}"));
    }
    stop_cleanly(&mut master);
}

#[test]
fn reload_none_applies_a_command_change_at_the_next_restart_only() {
    let sb = Sandbox::new();
    let a = app(&sb);
    let extra = "workers = 2\nreload = \"none\"\n\
                 backoff = { initial = \"1ms\", max = \"1ms\", jitter = 0.0 }";
    let config = sb.config(&program("web", &a, "v1", extra));
    let mut master = sb.start(&config);
    let before = wait_running(&sb, "web", 2);

    sb.config(&program("web", &a, "v2", extra));
    assert_eq!(
        reload(&sb, &config),
        "web: command changed (applies at each worker's next restart)\n"
    );
    let st = socket_status(&sb);
    assert_pids(&st, "web", &before, "after a reload = \"none\" reload");
    for pid in before.values() {
        assert_eq!(version_of(*pid), "v1");
    }

    // A natural restart (the worker dies) runs the new command …
    send(before[&0], SIGKILL);
    let mut replaced = 0;
    sb.wait(
        "web.0 runs again with a new pid",
        DEADLINE,
        || match running(&socket_status(&sb), "web").get(&0) {
            Some(p) if *p != before[&0] => {
                replaced = *p;
                true
            }
            _ => false,
        },
    );
    assert_eq!(
        version_of(replaced),
        "v2",
        "web.0 restarted with the new command"
    );
    assert_eq!(
        running(&socket_status(&sb), "web")[&1],
        before[&1],
        "web.1 untouched"
    );
    assert_eq!(version_of(before[&1]), "v1");

    // … and so does `restart`.
    sb.cli_ok(&config, &["restart", "web"]);
    let st = socket_status(&sb);
    let after = running(&st, "web");
    assert_eq!(after.len(), 2, "{st:?}");
    for (id, pid) in &after {
        assert_ne!(before[id], *pid);
        assert_eq!(version_of(*pid), "v2", "web.{id} after restart");
    }
    stop_cleanly(&mut master);
}

// ---------------------------------------------------------------------------------------------
// scale and reload

#[test]
fn scale_lasts_until_the_files_workers_changes() {
    let sb = Sandbox::new();
    let a = app(&sb);
    let config = sb.config(&program("web", &a, "v1", "workers = 2"));
    let mut master = sb.start(&config);
    wait_running(&sb, "web", 2);

    sb.cli_ok(&config, &["scale", "web", "4"]);
    let scaled = running(&socket_status(&sb), "web");
    assert_eq!(scaled.len(), 4);

    // Nothing changed: the scaled count stays.
    assert_eq!(reload(&sb, &config), "nothing changed\n");
    assert_pids(&socket_status(&sb), "web", &scaled, "after an empty reload");

    // A change that leaves `workers` as it was keeps the scaled count.
    sb.config(&program(
        "web",
        &a,
        "v1",
        "workers = 2\nstop_timeout = \"4s\"",
    ));
    let out = reload(&sb, &config);
    assert!(
        out.contains("stop_timeout") && !out.contains("workers"),
        "{out}"
    );
    assert_pids(
        &socket_status(&sb),
        "web",
        &scaled,
        "after a reload that kept `workers`",
    );

    // The file's `workers` changes: it wins over the scale.
    sb.config(&program(
        "web",
        &a,
        "v1",
        "workers = 3\nstop_timeout = \"4s\"",
    ));
    assert_eq!(reload(&sb, &config), "web: workers 2 -> 3\n");
    let st = socket_status(&sb);
    let three: BTreeMap<u32, i32> = scaled
        .iter()
        .filter(|(id, _)| **id < 3)
        .map(|(i, p)| (*i, *p))
        .collect();
    assert_pids(&st, "web", &three, "after `workers` changed to 3");
    assert!(!pid_alive(scaled[&3]), "web.3 stopped");
    stop_cleanly(&mut master);
}

/// Regression: a program removed by one reload and added back by the next while its old
/// worker is still stopping (its TERM handler takes 3 s). The second reload must answer and
/// the program's new worker must run, beside the old one until that one has exited.
#[test]
fn a_program_re_added_while_its_removed_worker_is_still_stopping_runs_again() {
    let sb = Sandbox::new();
    let keep = program("keep", &sleeper(&sb), "v1", "");
    let slow = "[program.slow]\n\
                command = \"trap 'sleep 3; exit 0' TERM; while :; do sleep 0.1; done\"\n\
                stop_timeout = \"10s\"\n";
    let config = sb.config(&format!("{keep}\n{slow}"));
    let mut master = sb.start(&config);
    wait_running(&sb, "keep", 1);
    let old = wait_running(&sb, "slow", 1)[&0];

    sb.config(&keep);
    let removed = reload(&sb, &config);
    assert!(
        removed.contains("slow"),
        "the reload says slow went: {removed}"
    );
    sb.wait("slow.0 is stopping", DEADLINE, || {
        entries(&socket_status(&sb))
            .iter()
            .any(|e| e.program == "slow" && e.pid == Some(old) && e.state == "stopping")
    });

    sb.config(&format!("{keep}\n{slow}"));
    let out = sb.cli(&config, &["reload"]);
    assert_exit_code(out.status, 0, &out.stderr);
    assert!(
        pid_alive(old),
        "the old slow.0 (pid {old}) was still stopping when slow came back"
    );
    let mut new = None;
    sb.wait("a new slow.0 is running", DEADLINE, || {
        new = running(&socket_status(&sb), "slow")
            .get(&0)
            .copied()
            .filter(|&p| p != old);
        new.is_some()
    });
    wait_all_dead(
        &sb,
        &[(0, old)].into(),
        "the removed slow.0 ended its TERM handler",
    );
    let now = wait_running(&sb, "slow", 1);
    assert_eq!(now[&0], new.unwrap(), "the new slow.0 kept running");
    stop_cleanly(&mut master);
}

// ---------------------------------------------------------------------------------------------
// [plumule] keys (SPEC §9)

/// `log_level` and `shutdown_timeout` apply at once and the reload says so; `lock_dir` takes
/// effect when the master restarts, and the reload says that too. No worker is touched.
#[test]
fn reload_applies_log_level_and_shutdown_timeout_and_defers_the_directories() {
    let sb = Sandbox::new();
    let s = sleeper(&sb);
    let file = |extra: &str| {
        sb.write_file(
            "plumule.toml",
            &format!(
                "[plumule]\nruntime_dir = {}\nstate_dir = {}\n{extra}\n\
                 [program.web]\ncommand = {}\n",
                toml_str(&sb.runtime_dir()),
                toml_str(&sb.path("state")),
                argv(&s)
            ),
            0o644,
        )
    };
    let config = file("shutdown_timeout = \"5s\"\nlog_level = \"info\"\n");
    let mut master = sb.start(&config);
    let before = wait_running(&sb, "web", 1);

    file(&format!(
        "shutdown_timeout = \"3s\"\nlog_level = \"debug\"\nlock_dir = {}\n",
        toml_str(&sb.path("elsewhere"))
    ));
    let out = reload(&sb, &config);
    for needles in [
        &["log_level", "debug"][..],
        &["shutdown_timeout", "3s"],
        &["lock_dir", "restart"],
    ] {
        assert!(
            out.lines().any(|l| needles.iter().all(|n| l.contains(n))),
            "the reload reports {needles:?}: {out}"
        );
    }
    assert!(!out.contains("nothing changed"), "{out}");
    assert_pids(&socket_status(&sb), "web", &before, "after the reload");

    // debug now: the slot's transitions are logged.
    sb.cli_ok(&config, &["stop", "web"]);
    master.wait_stderr(&["web.0: running -> stopping"], DEADLINE);
    // The new shutdown_timeout is the one the graceful stop uses.
    master.signal(nix::sys::signal::Signal::SIGTERM);
    master.wait_stderr(&["killed after 3s"], DEADLINE);
    master.wait_exit(DEADLINE);
    assert!(
        !sb.path("elsewhere").exists(),
        "the running master keeps its lock_dir until it restarts"
    );
}
