//! How the configuration shapes a worker before exec and where it comes from (SPEC §2):
//! `nice`, `oom_score_adj` and `limits` as the worker sees them in /proc, a limit the kernel
//! refuses reported plainly, and `include` files whose programs run and reload like those of
//! the main file.

mod common;

use std::fs;
use std::path::Path;

use common::*;

/// Waits until `program.id` is in `state` in `status --json`; returns its entry.
#[track_caller]
fn wait_state(
    sb: &Sandbox,
    config: &Path,
    program: &str,
    id: u32,
    state: &str,
) -> plumule::protocol::WorkerStatus {
    let cfg = config.display().to_string();
    let mut entry = None;
    sb.wait(&format!("{program}.{id} is {state}"), DEADLINE, || {
        let out = sb.plumule(&["status", "--json", "-c", &cfg], DEADLINE);
        entry = parse_status(&out.stdout)
            .ok()
            .and_then(|r| worker(&r, program, id).cloned());
        entry.as_ref().is_some_and(|e| e.state == state)
    });
    entry.expect("waited for")
}

#[test]
fn nice_oom_score_adj_and_limits_reach_the_worker() {
    let sb = Sandbox::new();
    // What the worker's own process reports: /proc/PID/stat field 19 is the nice value. The
    // line is written whole (temp file, then rename), so a complete line is the answer.
    let out = sb.path("shape.out");
    let script = sb.script(
        "shape.sh",
        &format!(
            "nice=$(cut -d' ' -f19 /proc/$$/stat)\n\
             oom=$(cat /proc/self/oom_score_adj)\n\
             echo \"$nice $oom $(ulimit -Sn) $(ulimit -Hn) $(ulimit -c)\" > {out}.tmp\n\
             mv {out}.tmp {out}\n\
             exec sleep 600",
            out = out.display()
        ),
    );
    let config = sb.config(&format!(
        "[program.shape]\ncommand = [{:?}]\nnice = 7\noom_score_adj = 321\n\
         limits = {{ nofile = 1000, core = 0 }}\n\
         [program.plain]\ncommand = [\"sleep\", \"600\"]\n",
        script.display().to_string()
    ));
    let mut master = sb.start(&config);
    let line = sb.wait_line("shape.out", DEADLINE);
    assert_eq!(
        line, "7 321 1000 1000 0",
        "nice, oom_score_adj, nofile soft/hard, core"
    );

    // A program without these keys keeps the master's values (niceness 0 is the harness's).
    let plain = wait_state(&sb, &config, "plain", 0, "running");
    let pid = plain.pid.expect("a running worker has a pid");
    let oom = fs::read_to_string(format!("/proc/{pid}/oom_score_adj")).unwrap();
    let own = fs::read_to_string("/proc/self/oom_score_adj").unwrap();
    assert_eq!(oom, own, "oom_score_adj untouched without the key");
    master.stop_with(SIGTERM, DEADLINE);
}

#[test]
fn a_limit_the_kernel_refuses_fails_the_worker_with_a_clear_reason() {
    let sb = Sandbox::new();
    // Above fs.nr_open no process may raise its open-file limit, root included.
    let nr_open: u64 = fs::read_to_string("/proc/sys/fs/nr_open")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let too_many = nr_open + 1;
    let config = sb.config(&format!(
        "[program.greedy]\ncommand = [\"sleep\", \"600\"]\nlimits = {{ nofile = {too_many} }}\n"
    ));
    let mut master = sb.start(&config);
    let failed = wait_state(&sb, &config, "greedy", 0, "failed");
    let detail = failed.detail.unwrap_or_default();
    assert!(
        detail.contains(&format!(
            "cannot set limit nofile to {too_many}: Operation not permitted"
        )),
        "{detail}"
    );
    master.stop_with(SIGTERM, DEADLINE);
}

/// Writes `conf.d/NAME.toml` (mode 0644) with `text`.
fn conf_d(sb: &Sandbox, name: &str, text: &str) {
    fs::create_dir_all(sb.path("conf.d")).unwrap();
    sb.write_file(&format!("conf.d/{name}.toml"), text, 0o644);
}

/// A program running the worker script `NAME.sh` (which records its starts), with `extra`.
fn program(sb: &Sandbox, name: &str, extra: &str) -> String {
    let script = sb.worker(&format!("{name}.sh"), "exec sleep 600");
    format!(
        "[program.{name}]\ncommand = [{:?}]\n{extra}",
        script.display().to_string()
    )
}

#[test]
fn programs_of_included_files_run_and_a_reload_restarts_only_the_edited_one() {
    let sb = Sandbox::new();
    conf_d(&sb, "a", &program(&sb, "alpha", ""));
    conf_d(&sb, "b", &program(&sb, "beta", "workers = 2\n"));
    // A top-level key: before the header's `[plumule]` table.
    let config = sb.write_file(
        "plumule.toml",
        &format!(
            "include = [\"conf.d/*.toml\"]\n{}{}",
            sb.header(),
            program(&sb, "main", "")
        ),
        0o644,
    );
    let check = sb.cli_ok(&config, &["check"]);
    for name in ["alpha", "beta", "main"] {
        assert!(
            check.stdout.contains(name),
            "check shows {name}:\n{}",
            check.stdout
        );
    }
    let mut master = sb.start(&config);
    let alpha = sb.wait_starts("alpha", 1, DEADLINE);
    let beta = sb.wait_starts("beta", 2, DEADLINE);
    let main = sb.wait_starts("main", 1, DEADLINE);

    // A process key changes in an included file: that program rolls, the others stay.
    conf_d(&sb, "b", &program(&sb, "beta", "workers = 2\nnice = 3\n"));
    let out = sb.cli_ok(&config, &["reload"]);
    assert!(
        out.stdout.contains("beta"),
        "reload says what changed: {}",
        out.stdout
    );
    let rolled = sb.wait_starts("beta", 4, DEADLINE);
    for s in &rolled[2..] {
        let stat = fs::read_to_string(format!("/proc/{}/stat", s.pid)).unwrap();
        let nice = stat.rsplit(')').next().unwrap().split(' ').nth(17).unwrap();
        assert_eq!(
            nice, "3",
            "the new beta worker {s:?} runs with the edited nice"
        );
    }
    for s in alpha.iter().chain(&main) {
        assert!(pid_alive(s.pid), "untouched worker {s:?} still runs");
    }
    assert_eq!(sb.starts_of("alpha").len(), 1);
    assert_eq!(sb.starts_of("main").len(), 1);
    for s in &beta {
        sb.wait(&format!("old beta worker {} gone", s.pid), DEADLINE, || {
            !pid_alive(s.pid)
        });
    }

    // A broken included file is refused by reload, located in that file, and changes nothing.
    conf_d(
        &sb,
        "a",
        &format!("{}worker = 2\n", program(&sb, "alpha", "")),
    );
    let out = sb.cli(&config, &["reload"]);
    assert_exit_code(out.status, 1, &out.stderr);
    let file = sb.path("conf.d/a.toml").display().to_string();
    assert!(
        out.stderr
            .contains(&format!("{file}:3:1: program.alpha.worker: unknown key")),
        "{}",
        out.stderr
    );
    assert!(alpha.iter().all(|s| pid_alive(s.pid)));
    master.stop_with(SIGTERM, DEADLINE);
}
