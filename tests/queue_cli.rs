//! The queue commands as a user meets them before and whatever the master serves (SPEC §1,
//! §9): usage errors (exit 2), `check` printing the queues, a master that refuses (exit 1 with
//! its message), a job too large for a request (exit 1 naming its line, without reading the
//! rest), and the control protocol's version.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use common::*;

fn usage_error(sb: &Sandbox, args: &[&str], needle: &str) {
    let out = sb.plumule(args, DEADLINE);
    assert_exit_code(out.status, 2, &out.stderr);
    assert!(out.stderr.contains(needle), "{args:?}: {}", out.stderr);
}

#[test]
fn queue_commands_refuse_bad_usage_with_exit_2() {
    let sb = Sandbox::new();
    usage_error(&sb, &["queue", "--dead"], "<QUEUE>");
    usage_error(&sb, &["requeue", "q"], "--all");
    usage_error(&sb, &["requeue", "q", "--all", "3"], "cannot be used with");
    usage_error(&sb, &["requeue", "q", "three"], "invalid digit");
    usage_error(&sb, &["submit"], "<QUEUE>");
    usage_error(&sb, &["submit", "q", "--key"], "--key <K>");
}

/// Queues that the master of `sb` runs with: `thumbnails` consumed by `resize`, `mail`
/// consumed by no program here.
fn queue_config(sb: &Sandbox, with_consumer: bool) -> PathBuf {
    let consumer = if with_consumer {
        let worker = sb.worker("answer.sh", "while read -r job; do echo \"ok $job\"; done");
        format!(
            "[program.resize]\ncommand = {}\nworkers = 2\nqueue = \"thumbnails\"\n\n\
             [queue.thumbnails]\nprefetch = 4\nroute = \"key\"\nmax_pending = 500\n\n",
            argv(&worker)
        )
    } else {
        String::new()
    };
    sb.config(&format!(
        "{consumer}[queue.mail]\ndurable = false\nprotocol = \"frames\"\nmax_attempts = 5\n"
    ))
}

#[test]
fn check_prints_each_queue_with_its_settings_and_consumer() {
    let sb = Sandbox::new();
    let config = queue_config(&sb, true);
    let out = sb.cli_ok(&config, &["check"]);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert!(lines.contains(&"queues      2"), "{}", out.stdout);
    let line = |name: &str| {
        *lines
            .iter()
            .find(|l| l.trim_start().starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no line for {name}:\n{}", out.stdout))
    };
    let thumbnails: Vec<&str> = line("thumbnails").split_whitespace().collect();
    assert_eq!(
        thumbnails,
        [
            "thumbnails",
            "durable=true",
            "protocol=lines",
            "prefetch=4",
            "max_attempts=3",
            "route=key",
            "max_pending=500",
            "consumed",
            "by",
            "resize"
        ],
        "{}",
        out.stdout
    );
    assert!(
        line("mail").ends_with(
            "durable=false protocol=frames prefetch=1 max_attempts=5 route=least-loaded \
             max_pending=1000000 no consumer here"
        ),
        "{}",
        out.stdout
    );
}

/// A running master whose config declares the queue `mail` (no consumer here).
fn master(sb: &Sandbox) -> (Daemon, PathBuf) {
    let config = queue_config(sb, false);
    let daemon = sb.start(&config);
    sb.wait("the master answers status", DEADLINE, || {
        sb.ask_status().is_some()
    });
    (daemon, config)
}

/// Whatever the master refuses (a queue it does not have, ids that are not dead letters),
/// each command says it on stderr and exits 1; nothing hangs.
#[test]
fn a_master_that_refuses_gets_exit_1_and_its_message() {
    let sb = Sandbox::new();
    let (_master, config) = master(&sb);
    let c = config.display().to_string();
    let refused = |args: &[&str], input: Option<&Path>| {
        let mut all = args.to_vec();
        all.extend(["-c", &c]);
        let mut d = sb.spawn_plumule_with(&all, |cmd| {
            if let Some(input) = input {
                cmd.stdin(std::fs::File::open(input).expect("open the input"));
            } else {
                cmd.stdin(Stdio::null());
            }
        });
        let status = d.wait_exit(DEADLINE);
        let stderr = d.stderr_text();
        assert_exit_code(status, 1, &stderr);
        assert!(stderr.starts_with("plumule: "), "{args:?}: {stderr}");
        stderr
    };
    let err = refused(&["submit", "nosuch", "hello"], None);
    assert!(
        err.contains("nosuch: the batch of 1 job(s) at payload 1 was refused: ")
            && err.contains("no queue named nosuch")
            && err.contains("; 0 job(s) were stored before it"),
        "{err}"
    );
    let input = sb.write_file("jobs.txt", "a\nb\nc\n", 0o644);
    let err = refused(&["submit", "nosuch", "--wait"], Some(&input));
    assert!(
        err.contains(
            "nosuch: the batch of 3 job(s) from line 1 of stdin to line 3 of stdin was refused"
        ),
        "{err}"
    );
    for args in [
        &["queue", "nosuch"][..],
        &["queue", "nosuch", "--dead"],
        &["queue", "nosuch", "--json"],
        &["requeue", "nosuch", "--all"],
        &["requeue", "mail", "1", "2"],
    ] {
        let err = refused(args, None);
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
    }
}

/// A first line too large for one request line stops `submit` at once, naming the line: the
/// rest of a large input is not read (memory stays bounded) and nothing hangs.
#[test]
fn a_job_too_large_for_a_request_is_an_error_naming_its_line() {
    let sb = Sandbox::new();
    let (_master, config) = master(&sb);
    let mut text = "x".repeat(100_000);
    text.push('\n');
    let big = sb.write_file("big.txt", &text.repeat(50), 0o644);
    let c = config.display().to_string();
    let mut d = sb.spawn_plumule_with(&["submit", "mail", "-c", &c], |cmd| {
        cmd.stdin(std::fs::File::open(&big).expect("open big.txt"));
    });
    let status = d.wait_exit(DEADLINE);
    let stderr = d.stderr_text();
    assert_exit_code(status, 1, &stderr);
    assert!(
        stderr
            .contains("line 1 of stdin is too large for one submit request: more than 65536 bytes")
            && stderr.contains("0 job(s) before it were stored"),
        "{stderr}"
    );
}

/// SPEC §9: the client sends its protocol version with every request; a master refuses
/// another version with a message naming both, and a request without one is version 1.
#[test]
fn the_control_protocol_carries_its_version() {
    let sb = Sandbox::new();
    let (_master, config) = master(&sb);
    let socket = sb.runtime_dir().join("control.sock");
    let stream = UnixStream::connect(&socket).expect("connect");
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut ask = |line: &str| {
        (&stream).write_all(line.as_bytes()).unwrap();
        let mut answer = String::new();
        reader.read_line(&mut answer).expect("an answer");
        serde_json::from_str::<serde_json::Value>(&answer).expect("JSON")
    };
    let newer = ask("{\"cmd\":\"status\",\"v\":2}\n");
    assert_eq!(newer["ok"], false, "{newer}");
    assert_eq!(
        newer["error"],
        "control protocol version 2 is not spoken by this master (it speaks version 1): use \
         the plumule client of the master's version"
    );
    for line in ["{\"cmd\":\"status\",\"v\":1}\n", "{\"cmd\":\"status\"}\n"] {
        let answer = ask(line);
        assert_eq!(answer["ok"], true, "{line}: {answer}");
    }
    // And the client's own requests carry it: they are served.
    sb.cli_ok(&config, &["status"]);
}
