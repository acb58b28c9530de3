//! `plumule logs [PROGRAM[.ID]] [-n LINES] [-f]`: recent worker output kept by the master,
//! filtered by program or worker, and followed live (SPEC §1).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;

use common::*;

#[test]
fn logs_shows_recent_lines_filtered_by_program_and_worker() {
    let sb = Sandbox::new();
    let script = sb.worker(
        "talker.sh",
        "for i in 1 2 3; do echo \"line $i of $PLUMULE_WORKER_ID\"; done\nexec sleep 1000",
    );
    let other = sb.worker("other.sh", "echo 'from other'\nexec sleep 1000");
    let config = sb.config(&format!(
        "[program.talker]\ncommand = {}\nworkers = 2\n\n[program.other]\ncommand = {}\n",
        argv(&script),
        argv(&other)
    ));
    let mut master = sb.start(&config);
    master.wait_stderr(&["talker.1: line 3 of 1"], DEADLINE);
    master.wait_stderr(&["talker.0: line 3 of 0"], DEADLINE);
    master.wait_stderr(&["other.0: from other"], DEADLINE);
    let c = config.display().to_string();

    let all = sb.plumule(&["logs", "-c", &c], DEADLINE);
    assert_exit_code(all.status, 0, &all.stderr);
    // Seven lines of output, and the master's "started" event of each of the three workers.
    assert_eq!(all.stdout.lines().count(), 10, "{}", all.stdout);

    let one = sb.plumule(&["logs", "talker.1", "-c", &c], DEADLINE);
    let lines: Vec<&str> = one.stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{}", one.stdout);
    assert!(
        lines[0].contains("talker.1: plumule: started (pid "),
        "{}",
        lines[0]
    );
    for (i, line) in lines[1..].iter().enumerate() {
        assert!(
            line.ends_with(&format!("talker.1: line {} of 1", i + 1)),
            "{line}"
        );
    }

    let program = sb.plumule(&["logs", "talker", "-n", "2", "-c", &c], DEADLINE);
    let lines: Vec<&str> = program.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{}", program.stdout);
    assert!(
        lines.iter().all(|l| l.contains("talker.")),
        "{}",
        program.stdout
    );

    let unknown = sb.plumule(&["logs", "nope", "-c", &c], DEADLINE);
    assert_exit_code(unknown.status, 1, &unknown.stderr);
    assert!(
        unknown.stderr.contains("no program named nope"),
        "{}",
        unknown.stderr
    );

    let status = master.stop_with(SIGTERM, DEADLINE);
    assert_exit_code(status, 0, &master.stderr_text());
}

#[test]
fn logs_follow_streams_new_lines_as_they_come() {
    let sb = Sandbox::new();
    let fifo = sb.path("go");
    // Not a child process: the harness reaps children it did not register.
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    // The worker prints one line, then a second one only once the test writes to the FIFO.
    let script = sb.worker(
        "later.sh",
        &format!(
            "echo first\nread x < {}\necho \"second $x\"\nexec sleep 1000",
            sh_str(&fifo)
        ),
    );
    let config = sb.config(&format!("[program.later]\ncommand = {}\n", argv(&script)));
    let mut master = sb.start(&config);
    master.wait_stderr(&["later.0: first"], DEADLINE);

    let mut follower = Command::new(PLUMULE)
        .args(["logs", "-f", "-n", "1", "-c", &config.display().to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("plumule logs -f");
    let (tx, rx) = mpsc::channel();
    let out = follower.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let first = rx
        .recv_timeout(DEADLINE)
        .expect("the last line before following");
    assert!(first.ends_with("later.0: first"), "{first}");

    std::fs::write(&fifo, "now\n").expect("write to the FIFO");
    let second = rx
        .recv_timeout(DEADLINE)
        .expect("a line written after -f started");
    assert!(second.ends_with("later.0: second now"), "{second}");

    let _ = follower.kill();
    let _ = follower.wait();
    let status = master.stop_with(SIGTERM, DEADLINE);
    assert_exit_code(status, 0, &master.stderr_text());
}
