//! Sockets a worker serves on without binding them itself (SPEC §6 `listen`, §9): sockets
//! systemd passed the master by socket activation (`systemd:NAME`), and `unix:` sockets the
//! master binds with a `mode` and removes when it stops.
//!
//! Socket activation is played by the test: it binds a TCP listener, and starts the master
//! through `/bin/sh -c 'LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=web exec plumule run …'` with
//! the listener at descriptor 3 (`exec` keeps the pid, so LISTEN_PID is the master's), as
//! systemd would. The worker is a small Python server that accepts on its descriptor 3 and
//! answers each connection with one line: its pid and the LISTEN_* variables it got.

mod common;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use common::*;

/// Accepts on descriptor 3 forever; answers `PID LISTEN_FDS LISTEN_PID LISTEN_FDNAMES`.
const SERVE_PY: &str = r#"
import os, socket
s = socket.socket(fileno=3)
while True:
    c, _ = s.accept()
    with c:
        env = [os.environ.get(k, "-") for k in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")]
        c.sendall(("%d %s\n" % (os.getpid(), " ".join(env))).encode())
"#;

/// `command = [python3, serve.py]` for a program, the script written into the sandbox.
fn server_command(sb: &Sandbox) -> String {
    let script = sb.write_file("serve.py", SERVE_PY, 0o644);
    format!("[{}, {}]", toml_str(Path::new(python())), toml_str(&script))
}

/// What the server answered: (pid, LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES).
type Answer = (i32, String, String, String);

fn parse_answer(line: &str) -> Answer {
    let f: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(f.len(), 4, "answer {line:?}");
    (f[0].parse().unwrap(), f[1].into(), f[2].into(), f[3].into())
}

/// One line from a connected stream, within [`DEADLINE`].
fn read_answer(stream: impl std::io::Read) -> Answer {
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .expect("read the server's answer");
    parse_answer(&line)
}

fn ask_tcp(addr: SocketAddr) -> Answer {
    let stream = TcpStream::connect_timeout(&addr, DEADLINE).expect("connect");
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    read_answer(stream)
}

fn ask_unix(path: &Path) -> Answer {
    let stream = UnixStream::connect(path).expect("connect");
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    read_answer(stream)
}

/// Starts `plumule run -c CONFIG` through /bin/sh with `env` (e.g. the LISTEN_* variables;
/// `$$` is the master's pid) and, when given, `listener` at descriptor 3.
fn start_activated(
    sb: &Sandbox,
    config: &Path,
    env: &str,
    listener: Option<&TcpListener>,
) -> Daemon {
    let script = format!(
        "{env} exec {} run -c {}",
        sh_str(Path::new(PLUMULE)),
        sh_str(config)
    );
    let fd = listener.map(|l| l.as_raw_fd());
    sb.spawn_master_via(
        "/bin/sh",
        &["-c", &script],
        &format!("run -c {} (through /bin/sh, {env})", config.display()),
        |cmd| {
            let Some(fd) = fd else { return };
            // SAFETY: between fork and exec the closure only calls dup2(2) or fcntl(2), which
            // are async-signal-safe, on a descriptor number taken before the fork.
            unsafe {
                cmd.pre_exec(move || {
                    if fd == 3 {
                        // Already in place: only its close-on-exec flag must go.
                        nix::fcntl::fcntl(
                            fd,
                            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
                        )?;
                    } else {
                        nix::unistd::dup2(fd, 3)?;
                    }
                    Ok(())
                });
            }
        },
    )
}

// ---------------------------------------------------------------------------------------------
// systemd:NAME

#[test]
fn a_socket_systemd_passed_to_the_master_reaches_the_worker_at_fd_3() {
    let sb = Sandbox::new();
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    let addr = listener.local_addr().unwrap();
    let config = sb.config(&format!(
        "[program.web]\ncommand = {}\nlisten = [\"systemd:web\"]\n",
        server_command(&sb)
    ));
    let mut master = start_activated(
        &sb,
        &config,
        "LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=web",
        Some(&listener),
    );
    // From now on only the master and its worker hold the socket: whoever answers on the
    // port is the worker.
    drop(listener);
    let pid = wait_running(&sb, "web", 1)[&0];

    let (answered_by, fds, listen_pid, names) = ask_tcp(addr);
    assert_eq!(
        answered_by, pid,
        "the worker answers on the activated socket"
    );
    assert_eq!(fds, "1", "LISTEN_FDS");
    assert_eq!(
        listen_pid,
        pid.to_string(),
        "LISTEN_PID is the worker's own"
    );
    assert_eq!(names, "web", "LISTEN_FDNAMES");
    // The master neither accepts nor closes it: the next client is served too.
    assert_eq!(ask_tcp(addr).0, pid);

    let status = master.stop_with(SIGTERM, DEADLINE);
    assert_exit_code(status, 0, &master.stderr_text());
}

#[test]
fn a_systemd_socket_that_was_not_passed_is_a_startup_error_naming_it() {
    let cases: [(&str, &str, bool); 3] = [
        ("nothing passed", "", false),
        (
            "a socket named web passed",
            "LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=web",
            true,
        ),
        (
            "a socket passed to another process",
            "LISTEN_PID=1 LISTEN_FDS=1 LISTEN_FDNAMES=nope",
            true,
        ),
    ];
    for (case, env, pass) in cases {
        let sb = Sandbox::new();
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind port 0");
        let config = sb.config(&format!(
            "[program.web]\ncommand = {}\nlisten = [\"systemd:nope\"]\n",
            server_command(&sb)
        ));
        let mut master = start_activated(&sb, &config, env, pass.then_some(&listener));
        let status = master.wait_exit(DEADLINE);
        let stderr = master.stderr_text();
        assert_exit_code(status, 1, &format!("{case}: {stderr}"));
        assert!(
            stderr.contains("systemd:nope"),
            "{case}: the error names the address:\n{stderr}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// unix: with a mode

#[test]
fn a_unix_listen_socket_gets_its_mode_and_is_removed_when_the_master_stops() {
    let sb = Sandbox::new();
    let config = sb.config(&format!(
        "[program.web]\ncommand = {}\nlisten = [{{ address = \"unix:web.sock\", mode = \"0660\" }}]\n",
        server_command(&sb)
    ));
    let mut master = sb.start(&config);
    let pid = wait_running(&sb, "web", 1)[&0];

    let sock: PathBuf = sb.path("web.sock");
    let meta = std::fs::symlink_metadata(&sock).expect("web.sock exists");
    assert!(meta.file_type().is_socket(), "web.sock is a socket");
    assert_eq!(meta.mode() & 0o7777, 0o660, "web.sock mode");
    let (answered_by, fds, _, names) = ask_unix(&sock);
    assert_eq!(
        (answered_by, fds.as_str(), names.as_str()),
        (pid, "1", "web")
    );

    let status = master.stop_with(SIGTERM, DEADLINE);
    assert_exit_code(status, 0, &master.stderr_text());
    assert!(
        !sock.exists() && std::fs::symlink_metadata(&sock).is_err(),
        "web.sock is left behind after the master stopped"
    );
}
