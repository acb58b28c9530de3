//! The queue commands end to end against a master that serves queues (SPEC §1, §4, §9):
//! `submit` from arguments and from stdin, `--wait` printing one line per job in order,
//! dead letters listed and requeued, `queue --json` in SPEC §9's shape.
//!
//! These need the master side of job queues; until it is merged they fail with "queues are
//! not served by this master yet".

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;

use common::*;

/// A master with queue `work` consumed by two `while read` shell workers that answer
/// `ok done-JOB`, except `drop` for a job starting with `bad`.
fn master(sb: &Sandbox) -> (Daemon, PathBuf) {
    let worker = sb.worker(
        "answer.sh",
        "while read -r job; do\n\
         case \"$job\" in bad*) echo \"drop refused $job\" ;; *) echo \"ok done-$job\" ;; esac\n\
         done",
    );
    let config = sb.config(&format!(
        "[program.answer]\ncommand = {}\nworkers = 2\nqueue = \"work\"\n\n\
         [queue.work]\nprefetch = 4\n",
        argv(&worker)
    ));
    let daemon = sb.start(&config);
    sb.wait("both workers run", DEADLINE, || {
        sb.ask_status().is_some_and(|s| {
            s.workers()
                .filter(|(p, w)| p.name == "answer" && w.state == "running")
                .count()
                == 2
        })
    });
    (daemon, config)
}

/// `plumule ARGS -c CONFIG` with stdin from `input` (or nothing).
fn run(sb: &Sandbox, config: &Path, args: &[&str], input: Option<&Path>) -> Outcome {
    let c = config.display().to_string();
    let mut all = args.to_vec();
    all.extend(["-c", &c]);
    let mut d = sb.spawn_plumule_with(&all, |cmd| match input {
        Some(path) => {
            cmd.stdin(std::fs::File::open(path).expect("open the input"));
        }
        None => {
            cmd.stdin(Stdio::null());
        }
    });
    let status = d.wait_exit(TEST_BUDGET);
    Outcome {
        status,
        stdout: d.stdout_text(),
        stderr: d.stderr_text(),
    }
}

#[test]
fn a_thousand_lines_through_a_while_read_worker_come_back_in_order() {
    let sb = Sandbox::new();
    let (_master, config) = master(&sb);
    let jobs: String = (1..=1000).map(|i| format!("job{i}\n")).collect();
    let input = sb.write_file("jobs.txt", &jobs, 0o644);
    let out = run(&sb, &config, &["submit", "work", "--wait"], Some(&input));
    assert_exit_code(out.status, 0, &out.stderr);
    let expected: Vec<String> = (1..=1000).map(|i| format!("ok done-job{i}")).collect();
    let got: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(got, expected);

    let out = run(&sb, &config, &["submit", "work"], Some(&input));
    assert_exit_code(out.status, 0, &out.stderr);
    assert_eq!(out.stdout, "work: 1000 job(s) submitted\n");
    let out = run(&sb, &config, &["submit", "work", "-q", "x"], None);
    assert_exit_code(out.status, 0, &out.stderr);
    assert_eq!(out.stdout, "");
}

#[test]
fn a_dead_job_prints_dead_exits_1_and_can_be_listed_and_requeued() {
    let sb = Sandbox::new();
    let (_master, config) = master(&sb);
    let out = run(
        &sb,
        &config,
        &["submit", "work", "--wait", "a", "bad-1", "b"],
        None,
    );
    assert_exit_code(out.status, 1, &out.stderr);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{}", out.stdout);
    assert_eq!(lines[0], "ok done-a");
    assert!(
        lines[1].starts_with("dead ") && lines[1].contains("refused bad-1"),
        "{}",
        out.stdout
    );
    assert_eq!(lines[2], "ok done-b");
    assert!(
        out.stderr.contains("work: 1 of 3 job(s) ended dead"),
        "{}",
        out.stderr
    );

    let out = run(&sb, &config, &["queue", "work", "--dead"], None);
    assert_exit_code(out.status, 0, &out.stderr);
    assert!(
        out.stdout.starts_with("ID  ATTEMPTS  REASON"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("bad-1"), "{}", out.stdout);
    assert!(
        out.stdout.ends_with("work: 1 dead letter(s)\n"),
        "{}",
        out.stdout
    );

    let out = run(&sb, &config, &["queue", "work", "--dead", "--json"], None);
    let dead: serde_json::Value = serde_json::from_str(&out.stdout).expect("JSON");
    let id = dead["dead"][0]["id"].as_u64().expect("an id");
    let out = run(&sb, &config, &["requeue", "work", &id.to_string()], None);
    assert_exit_code(out.status, 0, &out.stderr);
    assert_eq!(out.stdout, "work: 1 job(s) requeued\n");
}

#[test]
fn queue_json_is_the_spec_shape() {
    let sb = Sandbox::new();
    let (_master, config) = master(&sb);
    let out = run(
        &sb,
        &config,
        &["submit", "work", "--wait", "one", "two"],
        None,
    );
    assert_exit_code(out.status, 0, &out.stderr);
    let out = run(&sb, &config, &["queue", "--json"], None);
    assert_exit_code(out.status, 0, &out.stderr);
    let report: serde_json::Value = serde_json::from_str(&out.stdout).expect("JSON");
    let queues = report["queues"].as_array().expect("queues");
    let work = queues.iter().find(|q| q["name"] == "work").expect("work");
    let mut keys: Vec<&str> = work
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        ["dead", "done", "in_flight", "name", "pending", "retried"]
    );
    assert_eq!(work["done"], 2, "{work}");
    let out = run(&sb, &config, &["queue"], None);
    assert!(out.stdout.starts_with("QUEUE"), "{}", out.stdout);
    assert!(
        out.stdout.lines().any(|l| l.starts_with("work ")),
        "{}",
        out.stdout
    );
}
