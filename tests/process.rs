//! The process a worker becomes (SPEC §2 `user`, `group`, `inherit_env`, `env`, `umask`, `cwd`,
//! `restart`; §7 `control_group`; §9): its credentials, environment, file-creation mask and
//! folder, signal dispositions and descriptors, how its exit shows in `status`, the
//! `PLUMULE_WORKERS` it sees across `scale`, and the modes of the files a `control_group`
//! opens to a group.
//!
//! Most workers here are plain programs, not shell scripts (`/bin/cat /proc/self/status`,
//! `/usr/bin/env`, `/bin/ls -l /proc/self/fd`), with `stdout` to a file: what they print is
//! exactly what plumule gave them, with nothing a shell would add or change. They run once
//! (`restart = "never"`), and `exited` in `status` says their output is complete: the master
//! reads a worker's last output before it records the exit.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use plumule::protocol::{LastExit, WorkerStatus};

use common::*;

/// The PATH a worker gets with `inherit_env = false` (SPEC §9).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

// ---------------------------------------------------------------------------------------------
// Helpers

/// The `status --json` entry of `program.id`, or None while the master cannot answer yet.
fn try_worker(sb: &Sandbox, config: &Path, program: &str, id: u32) -> Option<WorkerStatus> {
    let cfg = config.display().to_string();
    let out = sb.plumule(&["status", "--json", "-c", &cfg], DEADLINE);
    let report = parse_status(&out.stdout).ok()?;
    worker(&report, program, id).cloned()
}

/// Waits until `program.id` is in `state`; returns its `status --json` entry.
#[track_caller]
fn wait_state(sb: &Sandbox, config: &Path, program: &str, id: u32, state: &str) -> WorkerStatus {
    let mut entry = None;
    sb.wait(&format!("{program}.{id} is {state}"), DEADLINE, || {
        entry = try_worker(sb, config, program, id);
        entry.as_ref().is_some_and(|e| e.state == state)
    });
    entry.expect("waited for")
}

/// Waits until a run-once worker has exited, then returns what it wrote to `file` (its
/// `stdout`, relative to the sandbox).
#[track_caller]
fn output_of(sb: &Sandbox, config: &Path, program: &str, file: &str) -> String {
    let entry = wait_state(sb, config, program, 0, "exited");
    assert_eq!(
        entry.last_exit,
        Some(LastExit::Code { code: 0 }),
        "{program}: {entry:?}"
    );
    fs::read_to_string(sb.path(file)).unwrap_or_else(|e| panic!("{program} wrote no {file}: {e}"))
}

/// `[program.NAME]` running `argv` once, its stdout to the sandbox file `NAME.out`.
fn run_once(name: &str, argv: &[&str], extra: &str) -> String {
    let argv: Vec<String> = argv.iter().map(|a| format!("{a:?}")).collect();
    format!(
        "[program.{name}]\ncommand = [{}]\nrestart = \"never\"\nstdout = {{ file = \"{name}.out\" }}\n{extra}\n",
        argv.join(", ")
    )
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

/// A signal-set field of /proc/PID/status (`SigBlk`, `SigIgn`…) as a bit mask.
fn sig_mask(status: &str, field: &str) -> u64 {
    let v = proc_field(status, field);
    u64::from_str_radix(v[0], 16).unwrap_or_else(|_| panic!("{field}: {v:?}"))
}

/// The bit of `sig` in a /proc signal mask.
fn bit(sig: nix::sys::signal::Signal) -> u64 {
    1 << (sig as i32 - 1)
}

/// The `env` output as a map (values may be empty; none of ours holds a newline).
fn parse_env(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("env line {l:?}"));
            (k.to_string(), v.to_string())
        })
        .collect()
}

/// A user's entry of /etc/passwd: (uid, primary gid, home, shell).
fn passwd_entry(name: &str) -> (u32, u32, String, String) {
    let text = fs::read_to_string("/etc/passwd").expect("/etc/passwd");
    let f: Vec<&str> = text
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 7 && f[0] == name)
        .unwrap_or_else(|| panic!("no user {name} in /etc/passwd"));
    (
        f[2].parse().unwrap(),
        f[3].parse().unwrap(),
        f[5].to_string(),
        f[6].to_string(),
    )
}

/// /etc/group as (name, gid, members).
fn groups() -> Vec<(String, u32, Vec<String>)> {
    let text = fs::read_to_string("/etc/group").expect("/etc/group");
    text.lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 4)
        .map(|f| {
            let members = f[3]
                .split(',')
                .filter(|m| !m.is_empty())
                .map(str::to_string)
                .collect();
            (f[0].to_string(), f[2].parse().unwrap_or(u32::MAX), members)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// user and group

#[test]
fn as_root_user_and_group_set_the_ids_and_the_supplementary_groups() {
    if !root_or_skip("to switch a worker to user nobody") {
        return;
    }
    let (uid, primary, home, shell) = passwd_entry("nobody");
    let all = groups();
    let name_of = |gid: u32| {
        all.iter()
            .find(|(_, g, _)| *g == gid)
            .map(|(n, _, _)| n.clone())
            .unwrap_or_else(|| panic!("nobody's primary gid {primary} has no name in /etc/group"))
    };
    let primary_name = name_of(primary);
    // Another group to ask for explicitly: users (or adm), not nobody's primary one.
    let (other_name, other) = ["users", "adm"]
        .iter()
        .find_map(|n| {
            all.iter()
                .find(|(name, gid, _)| name == n && *gid != primary)
                .map(|(name, gid, _)| (name.clone(), *gid))
        })
        .expect("neither group users nor adm exists");
    // The groups that list nobody as a member: what initgroups would add.
    let supplementary: BTreeSet<u32> = all
        .iter()
        .filter(|(_, _, members)| members.iter().any(|m| m == "nobody"))
        .map(|(_, gid, _)| *gid)
        .collect();

    let sb = Sandbox::new();
    let cat = ["/bin/cat", "/proc/self/status"];
    let config = sb.config(&format!(
        "{}{}{}{}",
        run_once(
            "both",
            &cat,
            &format!("user = \"nobody\"\ngroup = \"{primary_name}\"")
        ),
        run_once("useronly", &cat, "user = \"nobody\""),
        run_once(
            "othergroup",
            &cat,
            &format!("user = \"nobody\"\ngroup = \"{other_name}\"")
        ),
        run_once(
            "env",
            &["/usr/bin/env"],
            "user = \"nobody\"\ninherit_env = false"
        ),
    ));
    let _master = sb.start(&config);

    for (program, gid) in [
        ("both", primary),
        ("useronly", primary),
        ("othergroup", other),
    ] {
        let status = output_of(&sb, &config, program, &format!("{program}.out"));
        let u = uid.to_string();
        let g = gid.to_string();
        assert_eq!(
            proc_field(&status, "Uid"),
            vec![u.as_str(); 4],
            "{program}: real, effective, saved, fs uid"
        );
        assert_eq!(
            proc_field(&status, "Gid"),
            vec![g.as_str(); 4],
            "{program}: real, effective, saved, fs gid"
        );
        let got: BTreeSet<u32> = proc_field(&status, "Groups")
            .iter()
            .map(|g| g.parse().unwrap())
            .collect();
        let mut want = supplementary.clone();
        want.insert(gid);
        assert_eq!(
            got, want,
            "{program}: supplementary groups (root's are dropped)"
        );
        // setuid away from root leaves no capability behind.
        assert_eq!(
            proc_field(&status, "CapEff"),
            ["0000000000000000"],
            "{program}"
        );
        assert_eq!(
            proc_field(&status, "CapPrm"),
            ["0000000000000000"],
            "{program}"
        );
    }

    // inherit_env = false: HOME, USER, LOGNAME and SHELL are those of the worker's user.
    let env = parse_env(&output_of(&sb, &config, "env", "env.out"));
    assert_eq!(
        env.get("USER").map(String::as_str),
        Some("nobody"),
        "{env:?}"
    );
    assert_eq!(
        env.get("LOGNAME").map(String::as_str),
        Some("nobody"),
        "{env:?}"
    );
    assert_eq!(env.get("HOME"), Some(&home), "{env:?}");
    assert_eq!(env.get("SHELL"), Some(&shell), "{env:?}");
}

// ---------------------------------------------------------------------------------------------
// Environment

/// `inherit_env = false` gives exactly `env`, the PLUMULE_* variables, plumule's notify socket,
/// the default PATH and the user's HOME/USER/LOGNAME/SHELL. The worker is `/usr/bin/env`
/// itself, not a shell, so nothing is added on the way (no PWD, SHLVL or `_`).
///
/// `inherit_env = true` passes the master's environment on, except what describes the master
/// itself: systemd's NOTIFY_SOCKET, LISTEN_*, WATCHDOG_* and JOURNAL_STREAM.
#[test]
fn inherit_env_false_gives_a_fixed_environment_and_true_drops_the_masters_systemd_variables() {
    let sb = Sandbox::new();
    // A real fake systemd, so that the master's own sd_notify traffic goes somewhere.
    let systemd_sock = sb.path("systemd.sock");
    let _systemd = UnixDatagram::bind(&systemd_sock).expect("bind the fake systemd socket");
    let config = sb.config(&format!(
        "{}{}",
        run_once(
            "clean",
            &["/usr/bin/env"],
            "inherit_env = false\nenv = { GREETING = \"hello world\", EMPTY = \"\" }"
        ),
        run_once(
            "inherit",
            &["/usr/bin/env"],
            "env = { GREETING = \"from the file\" }"
        ),
    ));
    let systemd_path = systemd_sock.display().to_string();
    let _master = sb.start_with_env(
        &config,
        &[
            ("PLUMULE_TEST_FROM_MASTER", "visible"),
            ("GREETING", "from the master"),
            ("NOTIFY_SOCKET", &systemd_path),
            ("LISTEN_FDS", "1"),
            ("LISTEN_PID", "1"),
            ("LISTEN_FDNAMES", "master-only"),
            ("WATCHDOG_USEC", "600000000"),
            ("WATCHDOG_PID", "1"),
            ("JOURNAL_STREAM", "0:0"),
        ],
    );
    let notify = sb.runtime_dir().join("notify.sock").display().to_string();

    let clean = parse_env(&output_of(&sb, &config, "clean", "clean.out"));
    let keys: Vec<&str> = clean.keys().map(String::as_str).collect();
    let mut want = vec![
        "EMPTY",
        "GREETING",
        "HOME",
        "LOGNAME",
        "NOTIFY_SOCKET",
        "PATH",
        "PLUMULE_PROGRAM",
        "PLUMULE_WORKERS",
        "PLUMULE_WORKER_ID",
        "SHELL",
        "USER",
    ];
    want.sort_unstable();
    assert_eq!(keys, want, "the whole environment: {clean:?}");
    let get = |k: &str| clean[k].as_str();
    assert_eq!(get("GREETING"), "hello world");
    assert_eq!(get("EMPTY"), "");
    assert_eq!(get("PATH"), DEFAULT_PATH);
    assert_eq!(get("NOTIFY_SOCKET"), notify);
    assert_eq!(
        (
            get("PLUMULE_PROGRAM"),
            get("PLUMULE_WORKER_ID"),
            get("PLUMULE_WORKERS")
        ),
        ("clean", "0", "1")
    );
    if let Ok(Some(me)) = nix::unistd::User::from_uid(nix::unistd::geteuid()) {
        assert_eq!(get("USER"), me.name);
        assert_eq!(get("LOGNAME"), me.name);
        assert_eq!(get("HOME"), me.dir.display().to_string());
        assert_eq!(get("SHELL"), me.shell.display().to_string());
    }

    let inherit = parse_env(&output_of(&sb, &config, "inherit", "inherit.out"));
    assert_eq!(
        inherit.get("PLUMULE_TEST_FROM_MASTER").map(String::as_str),
        Some("visible"),
        "the master's environment reaches the worker: {inherit:?}"
    );
    assert_eq!(
        inherit.get("GREETING").map(String::as_str),
        Some("from the file"),
        "`env` overrides the inherited value"
    );
    assert_eq!(
        inherit.get("PATH").map(String::as_str),
        std::env::var("PATH").ok().as_deref(),
        "PATH is the master's"
    );
    assert_eq!(
        inherit.get("NOTIFY_SOCKET").map(String::as_str),
        Some(notify.as_str()),
        "plumule's notify socket, never the master's own"
    );
    for var in [
        "LISTEN_FDS",
        "LISTEN_PID",
        "LISTEN_FDNAMES",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
        "JOURNAL_STREAM",
    ] {
        assert_eq!(
            inherit.get(var),
            None,
            "the master's {var} reached the worker"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// umask and cwd

/// `cwd` is relative to the config file's folder (here a subfolder, not the master's own
/// working directory), and files the worker creates follow `umask`.
#[test]
fn umask_shapes_the_workers_files_and_cwd_is_relative_to_the_config_folder() {
    let sb = Sandbox::new();
    for dir in ["etc", "etc/work"] {
        fs::create_dir(sb.path(dir)).unwrap();
        fs::set_permissions(sb.path(dir), fs::Permissions::from_mode(0o755)).unwrap();
    }
    let script = sb.script(
        "files.sh",
        "pwd -P > where.tmp && mv where.tmp where\n\
         echo data > made\n\
         mkdir folder\n\
         grep Umask /proc/self/status > umask",
    );
    let config = sb.write_file(
        "etc/plumule.toml",
        &format!(
            "{}[program.files]\ncommand = {}\nrestart = \"never\"\numask = \"077\"\ncwd = \"work\"\n",
            sb.header(),
            argv(&script)
        ),
        0o644,
    );
    let _master = sb.start(&config);
    let entry = wait_state(&sb, &config, "files", 0, "exited");
    assert_eq!(
        entry.last_exit,
        Some(LastExit::Code { code: 0 }),
        "{entry:?}"
    );

    let work = sb.path("etc/work");
    let where_ = fs::read_to_string(work.join("where")).expect("the worker wrote etc/work/where");
    assert_eq!(
        PathBuf::from(where_.trim_end()),
        fs::canonicalize(&work).unwrap(),
        "the worker's folder"
    );
    let mode = |p: &str| fs::metadata(work.join(p)).unwrap().mode() & 0o777;
    assert_eq!(mode("made"), 0o600, "a file the worker created, umask 077");
    assert_eq!(
        mode("folder"),
        0o700,
        "a folder the worker created, umask 077"
    );
    let umask = fs::read_to_string(work.join("umask")).unwrap();
    assert_eq!(proc_field(&umask, "Umask"), ["0077"], "{umask}");
    assert!(
        !sb.path("work").exists(),
        "cwd was taken relative to the master's folder"
    );
}

// ---------------------------------------------------------------------------------------------
// Signals and descriptors

/// Signals 32 and 33 (glibc's own; its sigaction refuses them), left out of the checks below:
/// a launcher that ignores them (`cargo test` does: bit 31 of its SigIgn) passes that on.
const GLIBC_RESERVED: u64 = 0b11 << 31;

/// Names the signals set in a /proc signal mask.
fn signals_in(mask: u64) -> Vec<String> {
    (1..=64)
        .filter(|s| mask & (1 << (s - 1)) != 0)
        .map(|s| match nix::sys::signal::Signal::try_from(s) {
            Ok(sig) => sig.to_string(),
            Err(_) => format!("signal {s}"),
        })
        .collect()
}

/// Runs `cat /proc/self/status` as a worker of a master whose launcher ignored SIGUSR2 and
/// the signals `ignore` and blocked SIGWINCH (the master is checked to show them, and SIGPIPE,
/// which Rust ignores); returns the worker's /proc status.
fn worker_under_a_messy_launcher(sb: &Sandbox, ignore: &[i32]) -> String {
    use nix::sys::signal::{SigHandler, SigSet, SigmaskHow, Signal};
    let config = sb.config(&run_once("sig", &["/bin/cat", "/proc/self/status"], ""));
    let args = ["run", "-c", &config.display().to_string()];
    let ignore = ignore.to_vec();
    let mut planted = bit(Signal::SIGPIPE) | bit(Signal::SIGUSR2);
    for &s in &ignore {
        planted |= 1 << (s - 1);
    }
    let master = sb.spawn_plumule_with(&args, |cmd| {
        // SAFETY: between fork and exec the closure only calls signal(2) and sigprocmask(2),
        // which are async-signal-safe, on a vector built before the fork and on the stack.
        unsafe {
            cmd.pre_exec(move || {
                nix::sys::signal::signal(Signal::SIGUSR2, SigHandler::SigIgn)?;
                for &s in &ignore {
                    if libc::signal(s, libc::SIG_IGN) == libc::SIG_ERR {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                let mut winch = SigSet::empty();
                winch.add(Signal::SIGWINCH);
                nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&winch), None)?;
                Ok(())
            });
        }
    });
    let worker = output_of(sb, &config, "sig", "sig.out");
    // What the worker must not inherit is really there in the master.
    let own = fs::read_to_string(format!("/proc/{}/status", master.pid())).unwrap();
    let (ign, blk) = (sig_mask(&own, "SigIgn"), sig_mask(&own, "SigBlk"));
    assert_eq!(
        ign & planted,
        planted,
        "the master ignores {:?}",
        signals_in(ign)
    );
    let winch = bit(Signal::SIGWINCH);
    assert_ne!(blk & winch, 0, "the master blocks {:?}", signals_in(blk));
    worker
}

/// Ignored signals stay ignored across exec and the blocked mask is inherited: a worker must
/// start with neither, whatever the master and its launcher ignore or block.
#[test]
fn a_worker_starts_with_no_signal_blocked_and_sigpipe_not_ignored() {
    let sb = Sandbox::new();
    let worker = worker_under_a_messy_launcher(&sb, &[]);
    let blk = sig_mask(&worker, "SigBlk");
    assert_eq!(blk, 0, "the worker blocks {:?}", signals_in(blk));
    let ign = sig_mask(&worker, "SigIgn");
    assert_eq!(
        ign & bit(nix::sys::signal::Signal::SIGPIPE),
        0,
        "the worker ignores SIGPIPE"
    );
    let ign = ign & !GLIBC_RESERVED;
    assert_eq!(ign, 0, "the worker ignores {:?}", signals_in(ign));
}

/// The same for a real-time signal: SIGRTMIN+2 ignored by the master's launcher.
#[test]
fn a_real_time_signal_ignored_by_the_masters_launcher_is_not_ignored_in_a_worker() {
    let sb = Sandbox::new();
    let rt = libc::SIGRTMIN() + 2;
    let worker = worker_under_a_messy_launcher(&sb, &[rt]);
    let ign = sig_mask(&worker, "SigIgn") & !GLIBC_RESERVED;
    assert_eq!(ign, 0, "the worker ignores {:?}", signals_in(ign));
}

/// (fd, target) of each line of `ls -l /proc/self/fd`.
fn fd_listing(text: &str) -> BTreeMap<u32, String> {
    text.lines()
        .filter_map(|l| l.split_once(" -> "))
        .map(|(left, target)| {
            let fd = left.split_whitespace().last().unwrap();
            (fd.parse().unwrap(), target.to_string())
        })
        .collect()
}

/// Removes the descriptor `ls` opened itself to read /proc/self/fd, if listed.
fn without_ls_own(mut fds: BTreeMap<u32, String>) -> BTreeMap<u32, String> {
    let own: Vec<u32> = fds
        .iter()
        .filter(|(fd, t)| **fd > 2 && t.starts_with("/proc/") && t.ends_with("/fd"))
        .map(|(fd, _)| *fd)
        .collect();
    assert!(
        own.len() <= 1,
        "more than one /proc/*/fd descriptor: {fds:?}"
    );
    for fd in own {
        fds.remove(&fd);
    }
    fds
}

/// A worker holds 0, 1 and 2, plus its listen sockets from 3 on and its lock files: none of
/// the master's descriptors (pidfile lock, control and notify sockets, signalfd, pipes of
/// other workers).
#[test]
fn a_worker_holds_only_stdio_its_listen_sockets_and_its_locks() {
    let sb = Sandbox::new();
    let ls = ["/bin/ls", "-l", "/proc/self/fd"];
    let config = sb.config(&format!(
        "{}{}[program.other]\ncommand = [\"/bin/sleep\", \"1000\"]\n\n",
        run_once("plain", &ls, ""),
        run_once(
            "more",
            &ls,
            "listen = [\"unix:more.sock\"]\nlocks = [\"held\"]"
        ),
    ));
    let _master = sb.start(&config);

    let plain = without_ls_own(fd_listing(&output_of(&sb, &config, "plain", "plain.out")));
    assert_eq!(
        plain.keys().copied().collect::<Vec<_>>(),
        [0, 1, 2],
        "descriptors of a plain worker: {plain:?}"
    );
    assert_eq!(plain[&0], "/dev/null", "stdin");
    assert!(
        plain[&1].starts_with("pipe:"),
        "stdout to the master: {plain:?}"
    );
    assert!(
        plain[&2].starts_with("pipe:"),
        "stderr to the master: {plain:?}"
    );

    let more = without_ls_own(fd_listing(&output_of(&sb, &config, "more", "more.out")));
    let lock = fs::canonicalize(sb.runtime_dir().join("locks/held.lock")).expect("held.lock");
    let mut extra: Vec<(u32, String)> = more
        .iter()
        .filter(|(fd, _)| **fd > 2)
        .map(|(fd, t)| (*fd, t.clone()))
        .collect();
    assert_eq!(extra.len(), 2, "a listen socket and a lock file: {more:?}");
    let (sock_fd, sock) = extra.remove(0);
    assert_eq!(sock_fd, 3, "the listen socket is at 3: {more:?}");
    assert!(sock.starts_with("socket:"), "fd 3 is a socket: {more:?}");
    assert_eq!(PathBuf::from(&extra[0].1), lock, "the lock file: {more:?}");
}

// ---------------------------------------------------------------------------------------------
// Exit codes and PLUMULE_WORKERS

#[test]
fn restart_never_shows_the_exit_code_and_state_exited() {
    let sb = Sandbox::new();
    let once = sb.worker("once.sh", "exit 7");
    let config = sb.config(&format!(
        "[program.once]\ncommand = {}\nrestart = \"never\"\n",
        argv(&once)
    ));
    let _master = sb.start(&config);
    let entry = wait_state(&sb, &config, "once", 0, "exited");
    assert_eq!(
        entry.last_exit,
        Some(LastExit::Code { code: 7 }),
        "{entry:?}"
    );
    assert_eq!(entry.pid, None, "{entry:?}");
    assert_eq!(entry.restarts, 0, "{entry:?}");
    assert_eq!(sb.starts_of("once").len(), 1, "started once");
    let (code, _) = sb.status(&config);
    assert_eq!(code, 0, "an exited worker is not a failed one");
}

/// PLUMULE_WORKERS of a live process, from its environment.
fn workers_var(pid: i32) -> String {
    let env = fs::read(format!("/proc/{pid}/environ")).expect("environ");
    env.split(|b| *b == 0)
        .find_map(|v| v.strip_prefix(b"PLUMULE_WORKERS="))
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_else(|| panic!("pid {pid} has no PLUMULE_WORKERS"))
}

#[test]
fn after_scale_new_workers_see_the_new_count_and_survivors_keep_theirs() {
    let sb = Sandbox::new();
    let web = sb.worker("web.sh", "exec /bin/sleep 1000");
    let config = sb.config(&format!(
        "[program.web]\ncommand = {}\nworkers = 2\nbackoff = {{ initial = \"10ms\", max = \"10ms\", jitter = 0.0 }}\n",
        argv(&web)
    ));
    let cfg = config.display().to_string();
    let _master = sb.start(&config);
    let first = sb.wait_starts("web", 2, DEADLINE);
    assert!(first.iter().all(|s| s.workers == 2), "{first:?}");
    let pid_of = |id: u32| first.iter().find(|s| s.id == id).unwrap().pid;

    let out = sb.plumule(&["scale", "web", "4", "-c", &cfg], DEADLINE);
    assert_exit_code(out.status, 0, &out.stderr);
    let starts = sb.wait_starts("web", 4, DEADLINE);
    let new: Vec<(u32, u32)> = starts[2..].iter().map(|s| (s.id, s.workers)).collect();
    assert_eq!(
        BTreeSet::from_iter(new),
        BTreeSet::from([(2, 4), (3, 4)]),
        "{starts:?}"
    );
    for id in [0, 1] {
        assert!(
            pid_alive(pid_of(id)),
            "web.{id} kept running through scale up"
        );
        assert_eq!(workers_var(pid_of(id)), "2", "web.{id} keeps its count");
    }

    let out = sb.plumule(&["scale", "web", "3", "-c", &cfg], DEADLINE);
    assert_exit_code(out.status, 0, &out.stderr);
    let id2 = starts.iter().find(|s| s.id == 2).unwrap().pid;
    assert_eq!(
        workers_var(id2),
        "4",
        "web.2 survives scale down with its count"
    );
    assert_eq!(workers_var(pid_of(0)), "2");

    // A survivor that restarts is a new process: it sees the count of now.
    send(pid_of(0), SIGKILL);
    let starts = sb.wait_starts("web", 5, DEADLINE);
    let again = &starts[4];
    assert_eq!((again.id, again.workers), (0, 3), "{starts:?}");
}

// ---------------------------------------------------------------------------------------------
// control_group

/// An existing group to open the control socket to: users or adm, else a fresh one (removed
/// again on drop).
struct TestGroup {
    name: String,
    gid: u32,
    created: bool,
}

impl TestGroup {
    fn get() -> TestGroup {
        for name in ["users", "adm"] {
            if let Ok(Some(g)) = nix::unistd::Group::from_name(name) {
                return TestGroup {
                    name: name.to_string(),
                    gid: g.gid.as_raw(),
                    created: false,
                };
            }
        }
        let name = format!("plumule-test-{}", std::process::id());
        let out = std::process::Command::new("groupadd")
            .arg(&name)
            .output()
            .expect("run groupadd");
        assert!(out.status.success(), "groupadd {name}: {out:?}");
        let gid = nix::unistd::Group::from_name(&name)
            .ok()
            .flatten()
            .expect("the new group")
            .gid
            .as_raw();
        TestGroup {
            name,
            gid,
            created: true,
        }
    }
}

impl Drop for TestGroup {
    fn drop(&mut self) {
        if self.created {
            let _ = std::process::Command::new("groupdel")
                .arg(&self.name)
                .status();
        }
    }
}

#[test]
fn as_root_control_group_opens_the_socket_and_the_lock_files_to_the_group() {
    if !root_or_skip("to give files to a group and connect as another user") {
        return;
    }
    let group = TestGroup::get();
    let sb = Sandbox::new();
    let web = sb.worker("web.sh", "exec /bin/sleep 1000");
    let config = sb.write_file(
        "plumule.toml",
        &format!(
            "{}control_group = \"{}\"\n\n[program.web]\ncommand = {}\nworkers = 2\nlocks = [\"web-{{worker}}\"]\n",
            sb.header(),
            group.name,
            argv(&web)
        ),
        0o644,
    );
    let _master = sb.start(&config);
    sb.wait_starts("web", 2, DEADLINE);
    wait_state(&sb, &config, "web", 1, "running");

    let sock = sb.runtime_dir().join("control.sock");
    let meta = fs::metadata(&sock).expect("control.sock");
    assert_eq!(meta.mode() & 0o777, 0o660, "control.sock mode");
    assert_eq!(meta.gid(), group.gid, "control.sock group");
    for id in [0, 1] {
        let lock = sb.runtime_dir().join(format!("locks/web-{id}.lock"));
        let meta = fs::metadata(&lock).expect("lock file");
        assert_eq!(
            meta.mode() & 0o777,
            0o664,
            "{} (created under umask 022)",
            lock.display()
        );
    }

    // A member of the group may command the master; the same user outside it may not.
    fs::set_permissions(sb.root(), fs::Permissions::from_mode(0o711)).unwrap();
    let sock_arg = sock.display().to_string();
    let as_nobody = |gid: u32| {
        let mut d = sb.spawn_plumule_as(&["status", "--json", "--socket", &sock_arg], 65534, gid);
        let status = d.wait_exit(DEADLINE);
        (status, d.stdout_text(), d.stderr_text())
    };
    let (status, stdout, stderr) = as_nobody(group.gid);
    assert_exit_code(status, 0, &stderr);
    assert!(stdout.contains("\"web\""), "{stdout}");
    let (_, nogroup, _, _) = passwd_entry("nobody");
    if nogroup != group.gid {
        let (status, _, stderr) = as_nobody(nogroup);
        assert_exit_code(status, 1, &stderr);
        assert!(
            stderr.to_lowercase().contains("permission denied"),
            "{stderr}"
        );
    }
}
