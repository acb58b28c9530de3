//! `sys::spawn` through the real function: set-up first, then the body (an exec or a Rust
//! function run in the forked child), with set-up reported on the status pipe the same way
//! for both.
//!
//! Its own test binary: these tests fork and reap children of the test process. They take
//! `SERIAL` so that no other test of this binary forks at the same time (a fork copies only
//! the forking thread, so the others should be parked on the lock, not in the allocator).

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;
use plumule::sys;
use plumule::sys::forkserver::ForkServer;
use plumule::sys::spawn::{spawn, Body, Report, Setup, Stage, PANIC_EXIT};

static SERIAL: Mutex<()> = Mutex::new(());

/// Upper bound for a child to set up, write a line and exit.
const DEADLINE: Duration = Duration::from_secs(10);

/// A set-up with /dev/null as stdin and stderr and `stdout` as stdout.
fn setup(stdin: &OwnedFd, stdout: &OwnedFd) -> Setup {
    Setup {
        cwd: None,
        umask: None,
        credentials: None,
        stdin: stdin.as_raw_fd(),
        stdout: stdout.as_raw_fd(),
        stderr: stdin.as_raw_fd(),
        pass_fds: Vec::new(),
        locks: Vec::new(),
        lock_mode: 0o644,
        nofile: None,
        limits: Vec::new(),
        nice: None,
        oom_score_adj: None,
        gate: None,
    }
}

/// Waits until `fd` becomes readable, or panics saying `what` never happened.
fn wait_readable(fd: &OwnedFd, give_up: Instant, what: &str) {
    let mut fds = [libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    let left = give_up.saturating_duration_since(Instant::now());
    assert!(!left.is_zero(), "{what} did not happen within {DEADLINE:?}");
    sys::poll(&mut fds, Some(left)).expect("poll");
}

/// The child's status reports, up to end of file on the status pipe.
fn reports_until_eof(status: &OwnedFd) -> Vec<Report> {
    let give_up = Instant::now() + DEADLINE;
    let mut all = Vec::new();
    loop {
        let (reports, eof) = sys::spawn::read_reports(status.as_raw_fd()).expect("read status");
        all.extend(reports);
        if eof {
            return all;
        }
        wait_readable(status, give_up, "end of file on the status pipe");
    }
}

/// Everything written to the read end `fd` until every write end is closed.
fn read_until_eof(fd: &OwnedFd) -> String {
    let give_up = Instant::now() + DEADLINE;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match sys::read_available(fd.as_raw_fd(), &mut buf).expect("read output") {
            None => return String::from_utf8_lossy(&out).into_owned(),
            Some(0) => wait_readable(fd, give_up, "end of file on the output pipe"),
            Some(n) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// The exit code of `pid`, which has closed its output already, so it is exiting.
fn exit_code(pid: Pid) -> i32 {
    match waitpid(pid, None).expect("waitpid") {
        WaitStatus::Exited(_, code) => code,
        other => panic!("child {pid} did not exit normally: {other:?}"),
    }
}

/// Spawns `body` with `setup_of(stdin, stdout)`; returns the status reports, the output and
/// the exit code.
fn run(body: &mut Body<'_>, edit: impl FnOnce(&mut Setup)) -> (Vec<Report>, String, i32) {
    let null = sys::dev_null().expect("open /dev/null");
    let (out_r, out_w) = sys::pipe(true).expect("pipe");
    let mut s = setup(&null, &out_w);
    edit(&mut s);
    let child = spawn(&s, body).expect("spawn");
    // Only the child holds the write end now: end of file means it has exited.
    drop(out_w);
    let reports = reports_until_eof(&child.status);
    let output = read_until_eof(&out_r);
    (reports, output, exit_code(child.pid))
}

#[test]
fn a_call_body_runs_after_set_up_is_reported_and_its_return_is_the_exit_code() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (go_r, go_w) = sys::pipe(false).expect("pipe");
    let (out_r, out_w) = sys::pipe(true).expect("pipe");
    let mut calls = 0;
    let mut body = || {
        calls += 1;
        // The parent says go only after it saw set-up reported done: were the status pipe
        // left open until exit, neither side would ever move.
        let mut go = [0u8; 1];
        if nix::unistd::read(0, &mut go) != Ok(1) {
            return 1;
        }
        // Set-up happened first: the child leads its own process group.
        let group = if nix::unistd::getpgrp() == nix::unistd::getpid() {
            "own group"
        } else {
            "master's group"
        };
        // No allocation: this test process has other threads (see `Body::Call`).
        let nth = if calls == 1 {
            "first call"
        } else {
            "later call"
        };
        for part in [nth, " in ", group, "\n"] {
            nix::unistd::write(std::io::stdout(), part.as_bytes()).expect("write");
        }
        42
    };
    let child = spawn(&setup(&go_r, &out_w), &mut Body::Call(Box::new(&mut body))).expect("spawn");
    drop((go_r, out_w));
    let reports = reports_until_eof(&child.status);
    assert_eq!(reports, [], "set-up done is end of file with no failure");
    nix::unistd::write(&go_w, b"g").expect("write go");
    assert_eq!(read_until_eof(&out_r), "first call in own group\n");
    assert_eq!(exit_code(child.pid), 42);
    assert_eq!(
        calls, 0,
        "the function ran in the child's copy of this memory"
    );
}

#[test]
fn a_set_up_failure_is_reported_and_the_call_body_never_runs() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut body = || {
        nix::unistd::write(std::io::stdout(), b"body ran\n").expect("write");
        0
    };
    let (reports, output, code) = run(&mut Body::Call(Box::new(&mut body)), |s| {
        s.cwd = Some(CString::new("/nonexistent/plumule-test-dir").unwrap());
    });
    assert_eq!(
        reports,
        [Report::Failed {
            stage: Stage::Chdir,
            errno: libc::ENOENT
        }]
    );
    assert_eq!(output, "", "the body must not run after a failed set-up");
    assert_eq!(code, 127);
}

#[test]
fn a_panicking_call_body_ends_the_child_instead_of_unwinding_into_the_callers_code() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut body = || -> i32 {
        nix::unistd::write(std::io::stdout(), b"before\n").expect("write");
        panic!("the body gives up");
    };
    let (reports, output, code) = run(&mut Body::Call(Box::new(&mut body)), |_| {});
    assert_eq!(reports, []);
    // Had the panic unwound out of spawn in the child, the child would have gone on running
    // this test (and the harness would have printed its verdict on the same stdout).
    assert_eq!(output, "before\n");
    assert_eq!(code, PANIC_EXIT);
}

#[test]
fn an_exec_body_gets_its_own_pid_in_the_environment_and_a_missing_program_is_reported() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let c = |s: &str| CString::new(s).unwrap();
    let mut body = Body::Exec {
        path: c("/bin/sh"),
        argv: vec![c("sh"), c("-c"), c("echo \"$LISTEN_PID $$\"")],
        envp: vec![c("PATH=/usr/bin:/bin"), c("LISTEN_PID=0")],
        pid_vars: vec![1],
    };
    let (reports, output, code) = run(&mut body, |_| {});
    assert_eq!(reports, [], "exec confirmed: end of file with no failure");
    let (listen_pid, shell_pid) = output.trim().split_once(' ').expect("two pids");
    assert_eq!(listen_pid, shell_pid, "{output:?}");
    assert_eq!(code, 0);

    let mut missing = Body::Exec {
        path: c("/nonexistent/plumule-test-program"),
        argv: vec![c("x")],
        envp: Vec::new(),
        pid_vars: Vec::new(),
    };
    let (reports, output, code) = run(&mut missing, |_| {});
    assert_eq!(
        reports,
        [Report::Failed {
            stage: Stage::Exec,
            errno: libc::ENOENT
        }]
    );
    assert_eq!(output, "");
    assert_eq!(code, 127);
}

#[test]
fn a_gated_child_reports_its_wait_and_execs_with_the_revisions_it_is_given() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let c = |s: &str| CString::new(s).unwrap();
    let mut body = Body::Exec {
        path: c("/bin/sh"),
        argv: vec![c("sh"), c("-c"), c("echo \"$LISTEN_PID $$ $R_A $R_B\"")],
        envp: vec![
            c("LISTEN_PID=0"),
            c("R_A="),
            c("PATH=/usr/bin:/bin"),
            c("R_B="),
        ],
        pid_vars: vec![0],
    };
    let null = sys::dev_null().expect("open /dev/null");
    let (out_r, out_w) = sys::pipe(true).expect("pipe");
    let (gate_r, gate_w) = sys::pipe(false).expect("pipe");
    let mut s = setup(&null, &out_w);
    s.gate = Some(sys::spawn::Gate {
        fd: gate_r.as_raw_fd(),
        lock: 2,
        env: vec![3, 1],
    });
    let child = spawn(&s, &mut body).expect("spawn");
    drop(out_w);
    drop(gate_r);
    // It waits: the report comes, and the pipe stays open (no exec yet).
    wait_readable(&child.status, Instant::now() + DEADLINE, "the wait report");
    let (reports, eof) = sys::spawn::read_reports(child.status.as_raw_fd()).unwrap();
    assert_eq!(reports, [Report::WaitingForLock(2)]);
    assert!(!eof, "the child must wait on its gate, not exec");
    let mut revs = Vec::new();
    revs.extend_from_slice(&7u64.to_le_bytes());
    revs.extend_from_slice(&u64::MAX.to_le_bytes());
    let mut gate = std::fs::File::from(gate_w);
    std::io::Write::write_all(&mut gate, &revs).unwrap();
    drop(gate);
    let rest = reports_until_eof(&child.status);
    assert_eq!(rest, [], "exec confirmed");
    let output = read_until_eof(&out_r);
    let fields: Vec<&str> = output.split_whitespace().collect();
    assert_eq!(fields[0], fields[1], "{output:?}");
    // env [3, 1]: the first revision goes to R_B (entry 3), the second to R_A (entry 1).
    assert_eq!(fields[2..], ["18446744073709551615", "7"], "{output:?}");
    assert_eq!(exit_code(child.pid), 0);

    // The gate closed with nothing written: the child gives up.
    let (gate_r, gate_w) = sys::pipe(false).expect("pipe");
    let mut body = sh("echo never");
    let (reports, output, code) = run(&mut body, |s| {
        s.gate = Some(sys::spawn::Gate {
            fd: gate_r.as_raw_fd(),
            lock: 0,
            env: vec![],
        });
        drop(gate_w);
    });
    assert_eq!(
        reports,
        [
            Report::WaitingForLock(0),
            Report::Failed {
                stage: Stage::Lock(0),
                errno: libc::ECANCELED
            }
        ]
    );
    assert_eq!((output.as_str(), code), ("", 127));
}

/// `/bin/sh -c SCRIPT` as an exec body.
fn sh(script: &str) -> Body<'static> {
    Body::Exec {
        path: CString::new("/bin/sh").unwrap(),
        argv: ["sh", "-c", script]
            .iter()
            .map(|a| CString::new(*a).unwrap())
            .collect(),
        envp: vec![CString::new("PATH=/usr/bin:/bin").unwrap()],
        pid_vars: Vec::new(),
    }
}

/// The descriptors open in process `pid`, from /proc.
fn open_fds(pid: Pid) -> Vec<i32> {
    let mut fds: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read /proc/PID/fd")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    fds.sort();
    fds
}

#[test]
fn the_fork_server_starts_children_of_its_caller_that_inherit_none_of_its_descriptors() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // Descriptors the caller holds when the server starts and after: none reaches a child.
    let (_held_r, _held_w) = sys::pipe(false).expect("pipe");
    let mut server = ForkServer::start().expect("start the fork server");
    let (_later_r, _later_w) = sys::pipe(false).expect("pipe");

    let null = sys::dev_null().expect("open /dev/null");
    let (out_r, out_w) = sys::pipe(true).expect("pipe");
    let s = setup(&null, &out_w);
    let body = sh("echo parent=$PPID fds=$(ls /proc/self/fd | wc -l); exit 42");
    let child = server.spawn(&s, &body).expect("spawn through the server");
    drop(out_w);
    assert_eq!(reports_until_eof(&child.status), [], "set-up went through");
    let output = read_until_eof(&out_r);
    // The shell's $PPID is its parent: the test process, not the server (CLONE_PARENT).
    let me = nix::unistd::getpid();
    assert!(output.contains(&format!("parent={me} ")), "{output:?}");
    // 0, 1, 2, and the one `ls` opens to read /proc/self/fd: nothing of ours or the server's.
    assert!(output.contains("fds=4"), "{output:?}");
    assert_eq!(exit_code(child.pid), 42, "the caller reaps its child");
    // It has answered, so it is past its own set-up: only its socket besides 0, 1, 2.
    assert_eq!(
        open_fds(server.pid()),
        [0, 1, 2, 3],
        "the server keeps only its socket"
    );

    // A set-up failure is reported on the status pipe as with a direct spawn.
    let mut s = setup(&null, &null);
    s.cwd = Some(CString::new("/nonexistent/dir").unwrap());
    let child = server.spawn(&s, &sh("exit 0")).expect("spawn");
    assert_eq!(
        reports_until_eof(&child.status),
        [Report::Failed {
            stage: Stage::Chdir,
            errno: libc::ENOENT
        }]
    );
    assert_eq!(exit_code(child.pid), 127);

    // A function body cannot cross to another process: refused, nothing started.
    let mut f = || 0;
    assert!(server
        .spawn(&setup(&null, &null), &Body::Call(Box::new(&mut f)))
        .is_err());

    // Dropping the handle ends and reaps the server.
    let pid = server.pid();
    drop(server);
    assert!(
        nix::sys::signal::kill(pid, None).is_err(),
        "the server {pid} is gone and reaped"
    );
}
