//! Cluster membership and cluster locks through a real etcd (SPEC §10): masters on one etcd,
//! each in a sandbox of its own, as if on hosts of their own.

mod common;
#[path = "common/etcd.rs"]
mod etcd;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use etcd::Etcd;
use plumule::protocol::MembersReport;

/// The lease of the test clusters: short, so that handovers are quick.
const LEASE: &str = "2s";

/// A master in a sandbox of its own, joined to `etcd` as `node`.
struct Host {
    sandbox: Sandbox,
    config: PathBuf,
    master: Option<Daemon>,
}

impl Host {
    fn new(etcd: &Etcd, node: &str, programs: &str, budget: Duration) -> Host {
        let sandbox = Sandbox::with_budget(budget);
        let text = format!(
            "{}node = \"{node}\"\ncluster = {{ etcd = [\"{}\"], lease = \"{LEASE}\" }}\n\n{programs}",
            sandbox
                .header()
                .trim_end()
                .to_string()
                + "\n",
            etcd.url()
        );
        let config = sandbox.write_file("plumule.toml", &text, 0o644);
        let mut h = Host {
            sandbox,
            config,
            master: None,
        };
        h.start();
        h
    }

    fn start(&mut self) {
        self.master = Some(self.sandbox.start(&self.config));
    }

    fn master_pid(&self) -> i32 {
        self.master.as_ref().expect("a running master").pid()
    }

    /// The master's etcd helper process.
    fn helper_pid(&self) -> Option<i32> {
        live_children(self.master_pid())
            .into_iter()
            .find(|p| p.comm == "plumule-etcd")
            .map(|p| p.pid)
    }

    fn members(&self) -> Option<MembersReport> {
        let out = self.sandbox.cli(&self.config, &["members", "--json"]);
        if !out.status.success() {
            return None;
        }
        serde_json::from_str(out.stdout.trim()).ok()
    }

    fn member_nodes(&self) -> Vec<String> {
        self.members()
            .map(|m| m.members.into_iter().map(|m| m.node).collect())
            .unwrap_or_default()
    }
}

fn hosts(etcd: &Etcd, n: usize, programs: &str, budget: Duration) -> Vec<Host> {
    (1..=n)
        .map(|i| Host::new(etcd, &format!("m{i}"), programs, budget))
        .collect()
}

#[test]
fn members_lists_the_live_masters_and_forgets_a_dead_one_after_its_lease() {
    let Some(etcd) = Etcd::start() else { return };
    let mut hosts = hosts(
        &etcd,
        3,
        "[program.idle]\ncommand = \"sleep 1000\"\n",
        Duration::from_secs(60),
    );
    hosts[0]
        .sandbox
        .wait("members lists m1, m2 and m3", DEADLINE, || {
            hosts[0].member_nodes() == ["m1", "m2", "m3"]
        });
    let report = hosts[0].members().unwrap();
    let m2 = &report.members[1];
    assert_eq!(m2.pid as i32, hosts[1].master_pid());
    assert_eq!(m2.programs, ["idle"]);
    assert!(!m2.host.is_empty() && m2.since > 1_700_000_000, "{m2:?}");
    // The table, from another master (each reads the members after its own renewals).
    let mut table = String::new();
    hosts[1].sandbox.wait("m2's table lists m3", DEADLINE, || {
        table = hosts[1]
            .sandbox
            .cli_ok(&hosts[1].config, &["members"])
            .stdout;
        table.contains("m3")
    });
    assert!(
        table.starts_with("NODE") && table.contains("m1") && table.contains("idle"),
        "{table}"
    );

    // A reload that adds a program: the record says so.
    let text = std::fs::read_to_string(&hosts[0].config).unwrap()
        + "\n[program.more]\ncommand = \"sleep 1000\"\n";
    std::fs::write(&hosts[0].config, text).unwrap();
    hosts[0].sandbox.cli_ok(&hosts[0].config, &["reload"]);
    hosts[1]
        .sandbox
        .wait("m1's record lists its new program", DEADLINE, || {
            hosts[1].members().is_some_and(|r| {
                r.members
                    .iter()
                    .any(|m| m.node == "m1" && m.programs == ["idle", "more"])
            })
        });

    // A host that dies whole (master and helper at once) leaves when its lease expires.
    let helper = hosts[2].helper_pid().expect("m3's etcd helper");
    send(helper, SIGSTOP);
    hosts[2].master.as_ref().unwrap().signal(SIGKILL);
    send(helper, SIGKILL);
    hosts[0].sandbox.wait(
        "members forgets m3 once its lease expires",
        DEADLINE,
        || hosts[0].member_nodes() == ["m1", "m2"],
    );
    // A master that is SIGKILLed alone: its helper revokes the lease as it goes.
    hosts[1].master.as_mut().unwrap().signal(SIGKILL);
    hosts[0].sandbox.wait("members forgets m2", DEADLINE, || {
        hosts[0].member_nodes() == ["m1"]
    });
    // Without etcd: an error, exit 1.
    drop(etcd);
    hosts[0]
        .sandbox
        .wait("members fails without etcd", DEADLINE, || {
            let out = hosts[0].sandbox.cli(&hosts[0].config, &["members"]);
            out.status.code() == Some(1) && out.stderr.contains("not in the cluster now")
        });
}

use nix::sys::signal::Signal::{SIGCONT, SIGSTOP};

/// The worker of the lock test: says when it enters (with its fencing token), then ticks
/// every 20 ms into the shared `stamps` file until it is stopped.
fn leader_program(stamps: &Path) -> String {
    let stamps = stamps.display();
    format!(
        "[program.leader]\n\
         command = [\"/bin/sh\", \"-c\", \"echo \\\"enter $$ $PLUMULE_LOCK_REVISION_LEADER\\\" >> {stamps}; \
         trap 'echo \\\"leave $$\\\" >> {stamps}; exit 0' TERM; \
         while :; do echo \\\"tick $$\\\" >> {stamps}; sleep 0.02; done\"]\n\
         stop_timeout = \"1s\"\n\
         locks = [{{ name = \"leader\", cluster = true }}]\n"
    )
}

/// The stamps in order: (what, pid, revision for an enter).
fn stamps(path: &Path) -> Vec<(String, i32, i64)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    complete
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((
                f.first()?.to_string(),
                f.get(1)?.parse().ok()?,
                f.get(2).and_then(|r| r.parse().ok()).unwrap_or(0),
            ))
        })
        .collect()
}

/// No overlap, ever: once a worker has written its first stamp, no earlier worker writes
/// again; and each holder's fencing token is greater than the previous one's.
fn assert_no_overlap(path: &Path) -> Vec<(i32, i64)> {
    let all = stamps(path);
    let mut holders: Vec<(i32, i64)> = Vec::new();
    for (i, (what, pid, rev)) in all.iter().enumerate() {
        match holders.iter().position(|(p, _)| p == pid) {
            Some(at) if at + 1 == holders.len() => {}
            Some(_) => panic!(
                "overlap: {pid} wrote `{what}` (stamp {i}) after {} had entered; stamps:\n{}",
                holders.last().unwrap().0,
                std::fs::read_to_string(path).unwrap_or_default()
            ),
            None => {
                assert_eq!(what, "enter", "{pid}'s first stamp");
                if let Some((_, before)) = holders.last() {
                    assert!(rev > before, "fencing token {rev} after {before}");
                }
                holders.push((*pid, *rev));
            }
        }
    }
    holders
}

/// The current holder, once a worker has entered after `after` holders.
fn wait_holder(h: &Host, stamps_path: &Path, after: usize) -> i32 {
    let mut holder = 0;
    h.sandbox.wait(
        &format!("holder number {}", after + 1),
        Duration::from_secs(20),
        || {
            let holders = assert_no_overlap(stamps_path);
            if holders.len() > after {
                holder = holders.last().unwrap().0;
                true
            } else {
                false
            }
        },
    );
    holder
}

/// Prints every master's stderr if the test fails while it lives.
struct DumpOnPanic<'a>(&'a [Host]);

impl Drop for DumpOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for h in self.0 {
                if let Some(m) = &h.master {
                    eprintln!("--- master {} ---\n{}", m.pid(), m.stderr_text());
                }
            }
        }
    }
}

#[test]
fn a_cluster_lock_is_held_by_one_worker_at_a_time_through_kills_freezes_and_etcd_restarts() {
    let Some(mut etcd) = Etcd::start() else {
        return;
    };
    let shared = tempfile::tempdir().unwrap();
    let stamps_path = shared.path().join("stamps");
    let program = leader_program(&stamps_path);
    let mut hosts = hosts(&etcd, 3, &program, Duration::from_secs(240));
    let holder = wait_holder(&hosts[0], &stamps_path, 0);

    // The others wait, and say so.
    for h in &hosts {
        if h.master.as_ref().unwrap().pid() == proc_stat(holder).unwrap().ppid {
            continue;
        }
        h.sandbox.wait("a waiting worker shows why", DEADLINE, || {
            let w = h.sandbox.worker_status(&h.config, "leader", 0);
            w.state == "starting" && w.detail.as_deref() == Some("waiting for lock leader")
        });
    }

    for round in 0..2 {
        // 1. The holder's master is SIGKILLed (its helper kills the worker and revokes).
        let (at, _, seen) = current_holder(&hosts, &stamps_path);
        hosts[at].master.as_mut().unwrap().signal(SIGKILL);
        hosts[at].master.as_mut().unwrap().wait_exit(DEADLINE);
        wait_holder(&hosts[(at + 1) % 3], &stamps_path, seen);
        hosts[at].start();

        // 2. The holder's master freezes past the lease: its helper stops renewing and kills
        // the worker before the lease can expire; another master takes over.
        let (at, _, seen) = current_holder(&hosts, &stamps_path);
        let frozen = hosts[at].master_pid();
        send(frozen, SIGSTOP);
        wait_holder(&hosts[(at + 1) % 3], &stamps_path, seen);
        send(frozen, SIGCONT);
        // Back, it waits again.
        let h = &hosts[at];
        h.sandbox.wait(
            "the thawed master's worker waits for the lock",
            Duration::from_secs(20),
            || {
                let w = h.sandbox.worker_status(&h.config, "leader", 0);
                w.state == "starting" && w.detail.as_deref() == Some("waiting for lock leader")
            },
        );

        // 3. etcd goes away: every holder is killed by its lease's deadline; nobody holds
        // until etcd is back, and then exactly one does.
        let (_, last, seen) = current_holder(&hosts, &stamps_path);
        etcd.kill();
        hosts[0].sandbox.wait(
            "the holder is killed without etcd",
            Duration::from_secs(20),
            || !pid_alive(last),
        );
        etcd.restart();
        let dump = DumpOnPanic(&hosts);
        wait_holder(&hosts[0], &stamps_path, seen);
        std::mem::forget(dump);
        eprintln!(
            "round {round}: {} holders so far, no overlap",
            assert_no_overlap(&stamps_path).len()
        );
    }
    // Three handovers a round at least (more if a slow machine missed renewals: still one
    // holder at a time).
    let holders = assert_no_overlap(&stamps_path);
    assert!(holders.len() > 6, "{holders:?}");
}

/// The holder now: (its host, its pid, how many holders there have been), once the latest
/// holder runs under one of the masters.
fn current_holder(hosts: &[Host], stamps_path: &Path) -> (usize, i32, usize) {
    let mut found = None;
    hosts[0]
        .sandbox
        .wait("a live holder", Duration::from_secs(20), || {
            let holders = assert_no_overlap(stamps_path);
            let Some(&(pid, _)) = holders.last() else {
                return false;
            };
            let parent = proc_stat(pid)
                .filter(|p| p.state != 'Z')
                .map_or(0, |p| p.ppid);
            found = hosts
                .iter()
                .position(|h| h.master.as_ref().is_some_and(|m| m.pid() == parent))
                .map(|at| (at, pid, holders.len()));
            found.is_some()
        });
    found.unwrap()
}

#[test]
fn lock_cluster_excludes_against_workers_and_passes_the_exit_status_through() {
    let Some(etcd) = Etcd::start() else { return };
    let shared = tempfile::tempdir().unwrap();
    let stamps_path = shared.path().join("stamps");
    let h = Host::new(
        &etcd,
        "m1",
        &leader_program(&stamps_path),
        Duration::from_secs(60),
    );
    let worker = wait_holder(&h, &stamps_path, 0);
    let lock = |args: &[&str]| {
        let mut all = vec!["lock", "--cluster", "leader"];
        all.extend_from_slice(args);
        h.sandbox.cli(&h.config, &all)
    };
    // Held by the worker: --nonblock and --timeout give up with 75.
    let out = lock(&["--nonblock", "--", "true"]);
    assert_eq!(out.status.code(), Some(75), "{}", out.stderr);
    assert!(out.stderr.contains("held elsewhere"), "{}", out.stderr);
    let out = lock(&["--timeout", "300ms", "--", "true"]);
    assert_eq!(out.status.code(), Some(75), "{}", out.stderr);

    // Free: CMD runs with the fencing token, its status is plumule's.
    h.sandbox.cli_ok(&h.config, &["stop", "leader"]);
    assert!(!pid_alive(worker));
    let out = lock(&[
        "--",
        "sh",
        "-c",
        "echo $PLUMULE_LOCK_REVISION_LEADER; exit 3",
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", out.stderr);
    let token: i64 = out
        .stdout
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{out:?}"));
    assert!(token > 0);
    assert_eq!(lock(&["--", "/nonexistent/cmd"]).status.code(), Some(127));

    // A script holds it: the worker waits, then runs once the script is done.
    let flag = shared.path().join("release");
    let mut script = h.sandbox.spawn_plumule(&[
        "lock",
        "--cluster",
        "leader",
        "-c",
        &h.config.display().to_string(),
        "--",
        "sh",
        "-c",
        &format!(
            "echo held > {0}.held; while [ ! -e {0} ]; do sleep 0.02; done",
            flag.display()
        ),
    ]);
    h.sandbox.wait("the script holds the lock", DEADLINE, || {
        shared.path().join("release.held").exists()
    });
    // `start` answers once the worker runs: after the script.
    let mut start =
        h.sandbox
            .spawn_plumule(&["start", "leader", "-c", &h.config.display().to_string()]);
    h.sandbox
        .wait("the worker waits for the script", DEADLINE, || {
            let w = h.sandbox.worker_status(&h.config, "leader", 0);
            w.state == "starting" && w.detail.as_deref() == Some("waiting for lock leader")
        });
    let before = assert_no_overlap(&stamps_path).len();
    std::fs::write(&flag, "").unwrap();
    assert!(script.wait_exit(DEADLINE).success());
    wait_holder(&h, &stamps_path, before);
    assert!(start.wait_exit(DEADLINE).success());
}

#[test]
fn a_cluster_lock_needs_a_stop_timeout_shorter_than_the_lease() {
    let sandbox = Sandbox::new();
    let config = sandbox.write_file(
        "plumule.toml",
        "[plumule]\ncluster = { etcd = [\"http://127.0.0.1:2379\"], lease = \"5s\" }\n\n\
         [program.leader]\ncommand = \"true\"\nstop_timeout = \"5s\"\n\
         locks = [{ name = \"leader\", cluster = true }]\n",
        0o644,
    );
    let out = sandbox.cli(&config, &["check"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        out.stderr
            .contains("program.leader.stop_timeout: must be shorter than the cluster lease (5s)"),
        "{}",
        out.stderr
    );
}

#[test]
fn an_etcd_password_is_never_logged_and_an_unusable_endpoint_says_why() {
    let sandbox = Sandbox::new();
    let config = sandbox.config(
        "[program.leader]\ncommand = [\"sleep\", \"1000\"]\nstop_timeout = \"1s\"\n\
         locks = [{ name = \"leader\", cluster = true }]\n",
    );
    let text = std::fs::read_to_string(&config).unwrap().replacen(
        "[plumule]\n",
        "[plumule]\ncluster = { etcd = [\"http://root:etcd-s3cret@127.0.0.1:9\"], lease = \"2s\" }\n",
        1,
    );
    std::fs::write(&config, text).unwrap();
    let master = sandbox.start(&config);
    sandbox.wait(
        "the master says why it is out of the cluster",
        DEADLINE,
        || master.stderr_text().contains("out of the cluster"),
    );
    let log = master.stderr_text();
    assert!(!log.contains("s3cret"), "a password is logged:\n{log}");
    assert!(log.contains("http://***@127.0.0.1:9"), "{log}");
    assert!(log.contains("authentication is not supported"), "{log}");
    // Its worker waits, and members says why.
    let w = sandbox.worker_status(&config, "leader", 0);
    assert_eq!(
        (w.state.as_str(), w.detail.as_deref()),
        ("starting", Some("waiting for lock leader"))
    );
    let out = sandbox.cli(&config, &["members"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        out.stderr.contains("not in the cluster now") && !out.stderr.contains("s3cret"),
        "{}",
        out.stderr
    );
}

#[test]
fn a_dead_helper_takes_its_holders_with_it_and_another_one_takes_over() {
    let Some(etcd) = Etcd::start() else { return };
    let shared = tempfile::tempdir().unwrap();
    let stamps_path = shared.path().join("stamps");
    let h = Host::new(
        &etcd,
        "m1",
        &leader_program(&stamps_path),
        Duration::from_secs(60),
    );
    let first = wait_holder(&h, &stamps_path, 0);
    let helper = h.helper_pid().expect("the etcd helper");
    send(helper, SIGKILL);
    // Nothing enforces the holder's lease now: the master kills it at once.
    h.sandbox
        .wait("the holder is killed with its helper", DEADLINE, || {
            !pid_alive(first)
        });
    h.sandbox.wait("another helper runs", DEADLINE, || {
        h.helper_pid().is_some_and(|p| p != helper)
    });
    // The old lease still holds the old key until it expires; then the worker holds again.
    let second = wait_holder(&h, &stamps_path, 1);
    assert_ne!(first, second);
    h.sandbox
        .wait("the new helper lists the member again", DEADLINE, || {
            h.member_nodes() == ["m1"]
        });
}

#[test]
fn check_warns_about_an_endpoint_this_build_cannot_use() {
    let sandbox = Sandbox::new();
    let config = sandbox.write_file(
        "plumule.toml",
        "[plumule]\ncluster = { etcd = [\"https://root:etcd-s3cret@10.0.0.5:2379\", \
         \"https://10.0.0.6:2379\"] }\n",
        0o644,
    );
    let out = sandbox.cli(&config, &["check"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    // A user is refused (no etcd authentication); https itself is fine.
    assert!(
        out.stderr.contains("plumule.cluster.etcd: invalid etcd endpoint https://***@10.0.0.5:2379: etcd authentication is not supported")
            && !out.stderr.contains("s3cret")
            && !out.stderr.contains("10.0.0.6"),
        "{}",
        out.stderr
    );
    assert_eq!(
        sandbox.cli(&config, &["check", "--strict"]).status.code(),
        Some(1)
    );
}

#[test]
fn lock_cluster_speaks_tls_to_an_https_endpoint_and_checks_its_certificate() {
    let Some(etcd) = Etcd::start_tls() else {
        return;
    };
    let sandbox = Sandbox::new();
    let config = sandbox.write_file(
        "plumule.toml",
        &format!(
            "[plumule]\ncluster = {{ etcd = [\"{}\"], lease = \"2s\" }}\n",
            etcd.url()
        ),
        0o644,
    );
    let config = config.display().to_string();
    // `plumule lock` trusting the CA named by SSL_CERT_FILE, or only the system's roots.
    let lock = |ca: Option<PathBuf>| {
        let args = [
            "lock",
            "--cluster",
            "leader",
            "--timeout",
            "5s",
            "-c",
            &config,
            "--",
            "sh",
            "-c",
            "echo $PLUMULE_LOCK_REVISION_LEADER",
        ];
        let mut run = sandbox.spawn_plumule_with(&args, |cmd| {
            cmd.env_remove("SSL_CERT_FILE").env_remove("SSL_CERT_DIR");
            if let Some(ca) = ca {
                cmd.env("SSL_CERT_FILE", ca);
            }
        });
        let status = run.wait_exit(DEADLINE);
        (status, run.stdout_text(), run.stderr_text())
    };
    let (status, out, err) = lock(Some(etcd.ca()));
    assert_eq!(status.code(), Some(0), "{err}");
    let token: i64 = out
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{out:?} {err}"));
    assert!(token > 0);

    // Its certificate is not signed by a CA the system trusts: refused, and said where.
    let (status, _, err) = lock(None);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("etcd {}/v3/lease/grant: TLS: ", etcd.url()))
            && err.contains("certificate"),
        "{err}"
    );
}
