//! One master per runtime dir: the pidfile and its lock, and what a new master does with the
//! workers a killed one left behind (SPEC §1 exit codes, §5, §9 "Orphans").

mod common;

use std::fs;

use common::*;

fn wait_pidfile(sb: &Sandbox, master: &Daemon) {
    let expected = format!("{}\n", master.pid());
    sb.wait(
        "the pidfile holds the master's pid and a newline",
        DEADLINE,
        || fs::read_to_string(sb.pidfile()).is_ok_and(|text| text == expected),
    );
}

#[test]
fn the_pidfile_names_the_master_and_is_removed_by_a_graceful_stop() {
    let sb = Sandbox::new();
    let script = sb.worker("w.sh", "exec sleep 1000");
    let config = sb.config(&format!("[program.w]\ncommand = {}\n", argv(&script)));
    let mut master = sb.start(&config);

    sb.wait_starts("w", 1, DEADLINE);
    wait_pidfile(&sb, &master);
    let status = master.stop_with(SIGTERM, DEADLINE);
    assert_exit_code(status, 0, &master.stderr_text());
    assert!(
        !sb.pidfile().exists(),
        "the pidfile is removed on a graceful stop"
    );
}

#[test]
fn a_second_master_on_the_same_runtime_dir_exits_3_naming_the_first() {
    let sb = Sandbox::new();
    let script = sb.worker("w.sh", "exec sleep 1000");
    let config = sb.config(&format!("[program.w]\ncommand = {}\n", argv(&script)));
    let mut first = sb.start(&config);
    let worker = sb.wait_starts("w", 1, DEADLINE)[0].pid;
    wait_pidfile(&sb, &first);

    let mut second = sb.start(&config);
    let status = second.wait_exit(DEADLINE);
    let stderr = second.stderr_text();
    assert_exit_code(status, 3, &stderr);
    assert!(
        stderr.contains(&first.pid().to_string()),
        "the refusal names the running master's pid {}:\n{stderr}",
        first.pid()
    );

    assert!(first.running(), "the first master is unaffected");
    assert!(pid_alive(worker), "the first master's worker is unaffected");
    assert_eq!(
        sb.starts_of("w").len(),
        1,
        "the second master started no worker"
    );
    wait_pidfile(&sb, &first);
    let status = first.stop_with(SIGTERM, DEADLINE);
    assert_exit_code(status, 0, &first.stderr_text());
}

#[test]
fn a_new_master_kills_the_orphans_of_a_killed_one_before_starting_workers() {
    let sb = Sandbox::new();
    let orphan_file = sb.path("orphan.pid");
    // Ignores SIGTERM, so it outlives a SIGKILLed master; so does its own child, in its group.
    // At start it notes whether the orphan named in orphan.pid (if any) is still alive.
    let script = sb.worker(
        "stubborn.sh",
        &format!(
            r#"trap '' TERM
orphan=$(cat {orphan} 2>/dev/null)
if [ -n "$orphan" ] && read -r stat 2>/dev/null < /proc/$orphan/stat; then
    set -- ${{stat##*)}}
    [ "$1" = Z ] || echo "$$ started while orphan $orphan was alive" >> {seen}
fi
sleep 1000 &
echo $! > {dir}/grandchild.$$
wait"#,
            orphan = sh_str(&orphan_file),
            seen = sh_str(&sb.path("orphan-seen")),
            dir = sh_str(sb.root()),
        ),
    );
    let config = sb.config(&format!(
        "[program.stubborn]\ncommand = {}\nstop_timeout = \"500ms\"\n",
        argv(&script)
    ));

    let mut first = sb.start(&config);
    let orphan = sb.wait_starts("stubborn", 1, DEADLINE)[0].pid;
    let grandchild: i32 = sb
        .wait_line(&format!("grandchild.{orphan}"), DEADLINE)
        .parse()
        .expect("a pid");
    first.signal(SIGKILL);
    first.wait_exit(DEADLINE);
    assert!(
        pid_alive(orphan) && pid_alive(grandchild),
        "premise: a worker ignoring SIGTERM outlives its killed master"
    );
    fs::write(&orphan_file, format!("{orphan}\n")).expect("write orphan.pid");

    let mut second = sb.start(&config);
    sb.wait("the orphan's process group is gone", DEADLINE, || {
        group_members(orphan).is_empty()
    });
    let starts = sb.wait_starts("stubborn", 2, DEADLINE);
    assert_ne!(starts[1].pid, orphan);
    let seen = fs::read_to_string(sb.path("orphan-seen")).unwrap_or_default();
    assert!(
        seen.is_empty(),
        "the new master started a worker beside the orphan: {seen}"
    );
    assert!(!pid_alive(grandchild), "the orphan's child is gone too");

    let status = second.stop_with(SIGTERM, DEADLINE);
    assert_exit_code(status, 0, &second.stderr_text());
}
