//! Security guarantees of SPEC §7 and §9, each tested against the real binary:
//!
//! - `user`/`group` drop every privilege: a worker switched to `nobody` tries every way back to
//!   root (setuid, setresuid, setgid, setgroups…) and fails; no capability is left in any set
//!   but the bounding one, which plumule leaves as it found it, like `NoNewPrivs` (see the
//!   README, systemd → Hardening, for why plumule does not set it). The exact ids and
//!   supplementary groups are checked in tests/process.rs
//!   (`as_root_user_and_group_set_the_ids_and_the_supplementary_groups`).
//! - Job payloads never reach a shell or an argv: shell metacharacters reach a `while read`
//!   worker and a directly exec'd worker byte for byte, nothing they say is run, and no
//!   process's command line ever holds them.
//! - `runtime_dir`, `lock_dir` and `state_dir` are created 0755, 0755 and 0700, whatever the
//!   umask, and existing ones are refused when other users can write to them; a runtime_dir
//!   or state_dir owned by another user than root or the master's own is refused too. (The
//!   per-user folder in /tmp is tested in tests/runtime_dir.rs.)
//! - The master's own `NOTIFY_SOCKET`, `LISTEN_*`, `WATCHDOG_*` and `JOURNAL_STREAM` never reach
//!   a worker, not even one that gets plumule's own `LISTEN_*` and `WATCHDOG_*`: read from
//!   /proc/PID/environ, the environment the worker was exec'd with. (tests/process.rs checks
//!   the same for `/usr/bin/env` workers with and without `inherit_env`.)
//! - The control socket's peer check, as root with a second uid, is tested in tests/control.rs
//!   (`as_root_a_client_under_another_uid_is_refused_and_the_socket_is_0600`); config files
//!   writable by others in tests/check.rs (`a_config_writable_by_others_is_refused`). Redis
//!   and etcd credentials, masked in `check`, `run` and `reload` output, are tested below and
//!   in src/config/tests.rs.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use common::*;

/// Whether the test can run as root. When not, it is skipped loudly; under CI, where tests
/// run as root, that is a failure.
fn root_or_skip_outside_ci(why: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "needs root ({why}), and CI runs the tests as root"
    );
    eprintln!("SKIPPED: needs root ({why})");
    false
}

/// The whitespace-separated values of `Field:` in a /proc/PID/status text.
fn proc_field<'a>(status: &'a str, field: &str) -> Vec<&'a str> {
    let prefix = format!("{field}:");
    let line = status
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no {field} line in:\n{status}"));
    line[prefix.len()..].split_whitespace().collect()
}

/// The environment `pid` was exec'd with.
fn environ(pid: i32) -> BTreeMap<String, String> {
    let raw = fs::read(format!("/proc/{pid}/environ"))
        .unwrap_or_else(|e| panic!("cannot read /proc/{pid}/environ: {e}"));
    raw.split(|b| *b == 0)
        .filter(|entry| !entry.is_empty())
        .map(|entry| {
            let text = String::from_utf8_lossy(entry);
            let (k, v) = text.split_once('=').unwrap_or((&text, ""));
            (k.to_string(), v.to_string())
        })
        .collect()
}

/// Waits until `program.0` has exited with code 0, through `status --json -c CONFIG`.
#[track_caller]
fn wait_exited_ok(sb: &Sandbox, config: &Path, program: &str) {
    let cfg = config.display().to_string();
    let mut last = None;
    sb.wait(&format!("{program}.0 has exited"), DEADLINE, || {
        let out = sb.plumule(&["status", "--json", "-c", &cfg], DEADLINE);
        last = parse_status(&out.stdout)
            .ok()
            .and_then(|s| worker(&s, program, 0).cloned());
        last.as_ref().is_some_and(|w| w.state == "exited")
    });
    let entry = last.expect("waited for");
    assert_eq!(
        entry.last_exit,
        Some(plumule::protocol::LastExit::Code { code: 0 }),
        "{program}: {entry:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// user and group: no way back

/// Each attempt a worker switched to `nobody` makes to become root again, then its
/// /proc/self/status after them.
const REGAIN_ROOT: &str = r#"
import os
attempts = [
    ("setuid", lambda: os.setuid(0)),
    ("seteuid", lambda: os.seteuid(0)),
    ("setreuid", lambda: os.setreuid(0, 0)),
    ("setresuid", lambda: os.setresuid(0, 0, 0)),
    ("setgid", lambda: os.setgid(0)),
    ("setegid", lambda: os.setegid(0)),
    ("setresgid", lambda: os.setresgid(0, 0, 0)),
    ("setgroups-root", lambda: os.setgroups([0])),
    ("setgroups-none", lambda: os.setgroups([])),
    ("open-shadow", lambda: open("/etc/shadow").close()),
]
for name, attempt in attempts:
    try:
        attempt()
        print(name, "succeeded")
    except PermissionError:
        print(name, "EPERM")
    except OSError as e:
        print(name, "failed", e.errno)
print(open("/proc/self/status").read(), end="")
"#;

#[test]
fn a_worker_switched_to_nobody_cannot_get_root_back() {
    if !root_or_skip_outside_ci("to switch a worker to user nobody") {
        return;
    }
    let nobody = nix::unistd::User::from_name("nobody")
        .expect("read the user database")
        .expect("user nobody exists");
    // Its groups as initgroups gives them: the primary one and those listing it as a member.
    let mut groups: Vec<u32> = fs::read_to_string("/etc/group")
        .expect("/etc/group")
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 4 && f[3].split(',').any(|m| m == "nobody"))
        .filter_map(|f| f[2].parse().ok())
        .collect();
    groups.push(nobody.gid.as_raw());
    groups.sort_unstable();
    groups.dedup();

    let sb = Sandbox::new();
    let code = format!("{REGAIN_ROOT:?}");
    let config = sb.config(&format!(
        "[program.tries]\ncommand = [{:?}, \"-c\", {code}]\nuser = \"nobody\"\n\
         restart = \"never\"\nstdout = {{ file = \"tries.out\" }}\n",
        python()
    ));
    let master = sb.start(&config);
    wait_exited_ok(&sb, &config, "tries");
    let out = fs::read_to_string(sb.path("tries.out")).expect("tries.out");

    for attempt in [
        "setuid",
        "seteuid",
        "setreuid",
        "setresuid",
        "setgid",
        "setegid",
        "setresgid",
        "setgroups-root",
        "setgroups-none",
    ] {
        assert!(
            out.lines().any(|l| l == format!("{attempt} EPERM")),
            "{attempt} must fail with EPERM:\n{out}"
        );
    }
    assert!(
        out.lines()
            .any(|l| l == "open-shadow EPERM" || l.starts_with("open-shadow failed")),
        "nobody read /etc/shadow:\n{out}"
    );
    let uid = nobody.uid.as_raw().to_string();
    let gid = nobody.gid.as_raw().to_string();
    assert_eq!(proc_field(&out, "Uid"), [uid.as_str(); 4], "{out}");
    assert_eq!(proc_field(&out, "Gid"), [gid.as_str(); 4], "{out}");
    let got: Vec<u32> = proc_field(&out, "Groups")
        .iter()
        .map(|g| g.parse().unwrap())
        .collect();
    assert_eq!(got, groups, "exactly nobody's groups, after the attempts");
    for set in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
        assert_eq!(
            proc_field(&out, set),
            ["0000000000000000"],
            "{set}: no capability left"
        );
    }
    // Neither narrowed nor widened: the bounding set, no_new_privs and seccomp are the
    // master's (a unit's CapabilityBoundingSet or NoNewPrivileges reaches workers through it).
    let master_status =
        fs::read_to_string(format!("/proc/{}/status", master.pid())).expect("the master's status");
    for field in ["CapBnd", "NoNewPrivs", "Seccomp"] {
        assert_eq!(
            proc_field(&out, field),
            proc_field(&master_status, field),
            "{field}: as the master's"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Payloads

/// Payloads a shell would run: each would create `{mark}-N`.
fn hostile_payloads(mark: &str) -> Vec<String> {
    [
        "$(touch {m}-1)",
        "`touch {m}-2`",
        "; touch {m}-3",
        "| touch {m}-4",
        "&& touch {m}-5 #",
        "'; touch {m}-6; '",
        "\"; touch {m}-7; \"",
        "$(touch${IFS}{m}-8)",
        "-c touch {m}-9",
        "\\; touch {m}-10 \\",
        "  spaces kept  ; touch {m}-11  ",
        "%s%n%x touch {m}-12 * ~ $HOME",
    ]
    .iter()
    .map(|p| p.replace("{m}", mark))
    .collect()
}

/// A `while read` shell worker: records every job in `$SEEN`, holds them until a line comes
/// through the fifo `$GO`, then answers `ok JOB` for each.
const SHELL_WORKER: &str = r#"n=0
while IFS= read -r job; do
  printf '%s\n' "$job" >> "$SEEN.tmp"
  n=$((n + 1))
  if [ "$n" -eq "$COUNT" ]; then
    mv "$SEEN.tmp" "$SEEN"
    read -r _ < "$GO"
    while IFS= read -r job; do printf 'ok %s\n' "$job"; done < "$SEEN"
  fi
done"#;

/// The same in Python, exec'd directly (no shell at all), byte for byte.
const PYTHON_WORKER: &str = r#"
import os, sys
seen, go, count = os.environ["SEEN"], os.environ["GO"], int(os.environ["COUNT"])
jobs = [sys.stdin.buffer.readline() for _ in range(count)]
with open(seen + ".tmp", "wb") as f:
    f.write(b"".join(jobs))
os.rename(seen + ".tmp", seen)
open(go).read(1)
for job in jobs:
    sys.stdout.buffer.write(b"ok " + job)
sys.stdout.buffer.flush()
"#;

#[test]
fn payloads_never_reach_a_shell_or_an_argv() {
    let sb = Sandbox::new();
    let mark = sb.path("pwned").display().to_string();
    let payloads = hostile_payloads(&mark);
    let count = payloads.len();
    let input = sb.write_file("payloads.txt", &(payloads.join("\n") + "\n"), 0o644);
    let shell = sb.script("shell-worker.sh", SHELL_WORKER);
    let env = |name: &str| {
        format!(
            "env = {{ SEEN = {}, GO = {}, COUNT = \"{count}\" }}\n",
            toml_str(&sb.path(&format!("{name}.seen"))),
            toml_str(&sb.path(&format!("{name}.go"))),
        )
    };
    let config = sb.config(&format!(
        "[program.sh]\ncommand = {}\nqueue = \"qsh\"\n{}\n\
         [program.py]\ncommand = [{:?}, \"-c\", {:?}]\nqueue = \"qpy\"\n{}\n\
         [queue.qsh]\nprefetch = {count}\n\n[queue.qpy]\nprefetch = {count}\n",
        argv(&shell),
        env("sh"),
        python(),
        PYTHON_WORKER,
        env("py"),
    ));
    for name in ["sh", "py"] {
        nix::unistd::mkfifo(
            &sb.path(&format!("{name}.go")),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .expect("mkfifo");
    }
    let _master = sb.start(&config);
    wait_running(&sb, "sh", 1);
    wait_running(&sb, "py", 1);

    // From stdin, as the README says for payloads that are secret: not on submit's argv.
    let cfg = config.display().to_string();
    let mut submits: Vec<Daemon> = ["qsh", "qpy"]
        .iter()
        .map(|queue| {
            sb.spawn_plumule_with(&["submit", queue, "--wait", "-c", &cfg], |cmd| {
                cmd.stdin(Stdio::from(fs::File::open(&input).expect("payloads")));
            })
        })
        .collect();

    for name in ["sh", "py"] {
        let seen = sb.path(&format!("{name}.seen"));
        sb.wait(
            &format!("the {name} worker holds all {count} jobs"),
            DEADLINE,
            || seen.exists(),
        );
        let got = fs::read_to_string(&seen).unwrap();
        let got: Vec<&str> = got.lines().collect();
        assert_eq!(
            got, payloads,
            "the {name} worker got the payloads byte for byte"
        );
    }
    // While every job is in flight, no process's command line holds one.
    for p in processes() {
        let Ok(cmdline) = fs::read(format!("/proc/{}/cmdline", p.pid)) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(
            !cmdline.contains(&mark),
            "a payload is in the argv of pid {}: {cmdline}",
            p.pid
        );
    }
    // Release the jobs: open each fifo once its worker is reading it.
    for name in ["sh", "py"] {
        let fifo = sb.path(&format!("{name}.go"));
        let mut writer = None;
        sb.wait(
            &format!("the {name} worker opens its fifo"),
            DEADLINE,
            || {
                writer = fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(&fifo)
                    .ok();
                writer.is_some()
            },
        );
        use std::io::Write;
        writer.unwrap().write_all(b"go\n").expect("write the fifo");
    }
    let expected: Vec<String> = payloads.iter().map(|p| format!("ok {p}")).collect();
    for submit in &mut submits {
        let status = submit.wait_exit(DEADLINE);
        assert_exit_code(status, 0, &submit.stderr_text());
        let out = submit.stdout_text();
        let got: Vec<&str> = out.lines().collect();
        assert_eq!(got, expected, "results come back byte for byte");
    }
    let created: Vec<String> = fs::read_dir(sb.root())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("pwned"))
        .collect();
    assert!(created.is_empty(), "a payload was run: {created:?}");
}

// ---------------------------------------------------------------------------------------------
// runtime_dir, lock_dir, state_dir

/// A config whose three folders live under `base` (missing or not), and a worker.
fn dirs_config(sb: &Sandbox, base: &Path) -> PathBuf {
    let script = sleeper(sb);
    sb.write_file(
        "dirs.toml",
        &format!(
            "[plumule]\nruntime_dir = {}\nstate_dir = {}\nlock_dir = {}\n\
             shutdown_timeout = \"5s\"\n\n[program.w]\ncommand = {}\n",
            toml_str(&base.join("run/plumule")),
            toml_str(&base.join("lib/plumule")),
            toml_str(&base.join("lock/plumule")),
            argv(&script)
        ),
        0o644,
    )
}

fn mode_of(path: &Path) -> u32 {
    fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .mode()
        & 0o7777
}

#[test]
fn missing_runtime_lock_and_state_dirs_are_created_0755_0755_0700_whatever_the_umask() {
    let sb = Sandbox::new();
    for (n, (umask, base)) in [("022", "default"), ("077", "strict"), ("000", "open")]
        .into_iter()
        .enumerate()
    {
        let base = sb.path(base);
        let config = dirs_config(&sb, &base);
        let script = format!("umask {umask} && exec \"$0\" run -c \"$1\"");
        let mut master = sb.spawn_master_via(
            "/bin/sh",
            &["-c", &script, PLUMULE, &config.display().to_string()],
            "plumule run under a umask",
            |_| {},
        );
        // Its worker started: the folders are made, and SIGTERM is handled.
        sb.wait_starts("w", n + 1, DEADLINE);
        for (dir, want) in [
            ("run/plumule", 0o755),
            ("lock/plumule", 0o755),
            ("lib/plumule", 0o700),
        ] {
            assert_eq!(
                mode_of(&base.join(dir)),
                want,
                "{dir} created under umask {umask}"
            );
        }
        let status = master.stop_with(SIGTERM, DEADLINE);
        assert_exit_code(status, 0, &master.stderr_text());
    }
}

#[test]
fn runtime_lock_and_state_dirs_that_others_may_write_are_refused() {
    let sb = Sandbox::new();
    for dir in ["run/plumule", "lock/plumule", "lib/plumule"] {
        for mode in [0o777, 0o1777, 0o757] {
            let base = sb.path(&format!("refused-{}-{mode:o}", dir.replace('/', "-")));
            let target = base.join(dir);
            fs::create_dir_all(&target).unwrap();
            fs::set_permissions(&target, fs::Permissions::from_mode(mode)).unwrap();
            let config = dirs_config(&sb, &base);
            let mut master = sb.start(&config);
            let status = master.wait_exit(DEADLINE);
            let stderr = master.stderr_text();
            assert_ne!(
                status.code(),
                Some(0),
                "{dir} with mode {mode:o} was accepted:\n{stderr}"
            );
            assert!(
                stderr.contains(&target.display().to_string())
                    && stderr.contains("writable by other users"),
                "the refusal names {} and why:\n{stderr}",
                target.display()
            );
            assert!(
                sb.starts_of("w").is_empty(),
                "a worker started beside a refused {dir}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The master's own systemd variables

#[test]
fn the_masters_systemd_variables_never_reach_a_worker_even_one_given_plumules_own() {
    let sb = Sandbox::new();
    let systemd_sock = sb.path("systemd.sock");
    let _systemd = UnixDatagram::bind(&systemd_sock).expect("bind the fake systemd socket");
    let systemd_path = systemd_sock.display().to_string();
    let config = sb.config(
        "[program.web]\ncommand = [\"sleep\", \"1000\"]\nlisten = [\"unix:web.sock\"]\n\
         watchdog = \"1h\"\n\n\
         [program.consumer]\ncommand = [\"sleep\", \"1000\"]\nqueue = \"q\"\n\n\
         [program.clean]\ncommand = [\"sleep\", \"1000\"]\ninherit_env = false\n\n\
         [queue.q]\n",
    );
    let master_env = [
        ("NOTIFY_SOCKET", systemd_path.as_str()),
        ("LISTEN_FDS", "2"),
        ("LISTEN_PID", "1"),
        ("LISTEN_FDNAMES", "master-only:master-too"),
        ("WATCHDOG_USEC", "987654321"),
        ("WATCHDOG_PID", "1"),
        ("JOURNAL_STREAM", "0:0"),
    ];
    let _master = sb.start_with_env(&config, &master_env);
    let notify = sb.runtime_dir().join("notify.sock").display().to_string();

    for program in ["web", "consumer", "clean"] {
        let pid = wait_running(&sb, program, 1)[&0];
        let env = environ(pid);
        assert_eq!(
            env.get("NOTIFY_SOCKET"),
            Some(&notify),
            "{program}: plumule's notify socket, never the master's: {env:?}"
        );
        assert_eq!(env.get("JOURNAL_STREAM"), None, "{program}: {env:?}");
        for (k, v) in &env {
            for master_value in [systemd_path.as_str(), "master-only", "987654321"] {
                assert!(
                    !v.contains(master_value),
                    "{program}: {k}={v} carries the master's {master_value}"
                );
            }
        }
        let own: [(&str, Option<String>); 4] = if program == "web" {
            [
                ("LISTEN_FDS", Some("1".into())),
                ("LISTEN_PID", Some(pid.to_string())),
                ("LISTEN_FDNAMES", Some("web".into())),
                ("WATCHDOG_USEC", Some("3600000000".into())),
            ]
        } else {
            [
                ("LISTEN_FDS", None),
                ("LISTEN_PID", None),
                ("LISTEN_FDNAMES", None),
                ("WATCHDOG_USEC", None),
            ]
        };
        for (k, want) in own {
            assert_eq!(env.get(k), want.as_ref(), "{program}: {k}");
        }
        let watchdog_pid = (program == "web").then(|| pid.to_string());
        assert_eq!(
            env.get("WATCHDOG_PID"),
            watchdog_pid.as_ref(),
            "{program}: WATCHDOG_PID"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Credentials

#[test]
fn check_never_shows_a_redis_or_etcd_password() {
    let sb = Sandbox::new();
    let config = sb.config(
        "[plumule.cluster]\netcd = [\"http://root:etcd-s3cret@127.0.0.1:2379\", \
         \"ftp://root:etcd-s3cret@e\"]\n\n\
         [queue.q]\nbackend = \"redis://:redis-s3cret@127.0.0.1:6379/0\"\n\n\
         [queue.r]\nbackend = \"rediss://default:redis-s3cret@host/0\"\n",
    );
    let cfg = config.display().to_string();
    let out = sb.plumule(&["check", "-c", &cfg], DEADLINE);
    assert_exit_code(out.status, 1, &out.stderr);
    let all = format!("{}{}", out.stdout, out.stderr);
    assert!(!all.contains("s3cret"), "a password is shown:\n{all}");
    assert!(
        all.contains("queue.r.backend: expected a Redis URL"),
        "{all}"
    );
    assert!(
        all.contains("\"ftp://root:***@e\""),
        "the refused endpoint is shown, masked:\n{all}"
    );
    // The same refusal from `run`: what the master logs.
    let mut master = sb.start(&config);
    let status = master.wait_exit(DEADLINE);
    let stderr = master.stderr_text();
    assert_exit_code(status, 1, &stderr);
    assert!(
        !stderr.contains("s3cret"),
        "a password is logged:\n{stderr}"
    );

    // And from a reload: neither its answer nor the master's log shows it.
    let valid = sb.config("[program.w]\ncommand = [\"sleep\", \"1000\"]\n");
    let mut master = sb.start(&valid);
    wait_running(&sb, "w", 1);
    sb.config(
        "[program.w]\ncommand = [\"sleep\", \"1000\"]\n\n\
         [queue.q]\nbackend = \"redis://:redis-s3cret@127.0.0.1:6379/0\"\n",
    );
    let out = sb.plumule(&["reload", "-c", &valid.display().to_string()], DEADLINE);
    assert_exit_code(out.status, 1, &out.stderr);
    let answer = format!("{}{}", out.stdout, out.stderr);
    assert!(
        answer.contains("readable by others") && !answer.contains("s3cret"),
        "the refused reload, without the password:\n{answer}"
    );
    master.wait_stderr(&["readable by others"], DEADLINE);
    let log = master.stderr_text();
    assert!(!log.contains("s3cret"), "a password is logged:\n{log}");
    let status = master.stop_with(SIGTERM, DEADLINE);
    assert_exit_code(status, 0, &master.stderr_text());
}

/// Under a root master, a runtime_dir or state_dir of another user would let that user swap
/// the pidfile, the sockets, the queues or the records of a previous master's process groups
/// (which a new master signals): refused. A lock_dir may be shared by the masters of several
/// users: accepted.
#[test]
fn runtime_and_state_dirs_of_another_user_are_refused_and_a_shared_lock_dir_is_not() {
    if !root_or_skip_outside_ci("to give a folder to user nobody") {
        return;
    }
    let nobody = nix::unistd::User::from_name("nobody")
        .expect("read the user database")
        .expect("user nobody exists");
    let sb = Sandbox::new();
    for (dir, refused) in [
        ("run/plumule", true),
        ("lib/plumule", true),
        ("lock/plumule", false),
    ] {
        let base = sb.path(&format!("owned-{}", dir.replace('/', "-")));
        let target = base.join(dir);
        fs::create_dir_all(&target).unwrap();
        fs::set_permissions(&target, fs::Permissions::from_mode(0o755)).unwrap();
        nix::unistd::chown(&target, Some(nobody.uid), Some(nobody.gid)).expect("chown");
        let config = dirs_config(&sb, &base);
        let mut master = sb.start(&config);
        if refused {
            let status = master.wait_exit(DEADLINE);
            let stderr = master.stderr_text();
            assert_ne!(status.code(), Some(0), "{dir} of nobody was accepted");
            assert!(
                stderr.contains(&target.display().to_string())
                    && stderr.contains(&format!("belongs to uid {}", nobody.uid)),
                "the refusal names {} and its owner:\n{stderr}",
                target.display()
            );
        } else {
            // Its worker started: the folders passed, and SIGTERM is handled.
            sb.wait_starts("w", 1, DEADLINE);
            let status = master.stop_with(SIGTERM, DEADLINE);
            assert_exit_code(status, 0, &master.stderr_text());
        }
    }
}
