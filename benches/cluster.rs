//! Benchmark of cluster locks through etcd (issue 13), printed as tables:
//!
//! - handover time of a cluster lock between two masters on one etcd, from the holder's end
//!   to the next holder's worker running (its first line in a shared file), against the
//!   lease, for three ends: the holder's master SIGKILLed (its helper kills the worker and
//!   revokes the lease at once), the whole host dying (master and helper SIGKILLed: the lease
//!   must expire on the server), and the master frozen (SIGSTOP: its helper stops renewing,
//!   kills the worker before the lease can expire, then the lease expires);
//! - the latency of `plumule lock --cluster NAME -- true` when the lock is free (a whole run
//!   of the command: start, lease, key, range, CMD, revoke), beside `etcdctl lock NAME true`
//!   and the file lock `plumule lock NAME -- true`, on the same etcd in the same run.
//!
//! It starts its own etcd on free loopback ports (as the tests do); without etcd it says so
//! and exits 0. `CLUSTER_BENCH_ROUNDS=N` sets the rounds per row (default 5).

mod common;
#[path = "../tests/common/etcd.rs"]
mod etcd;

use std::fs;
use std::path::Path;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use common::{machine, today};

const PLUMULE: &str = env!("CARGO_BIN_EXE_plumule");

type Result<T> = std::result::Result<T, String>;

struct Master {
    child: Child,
}

impl Master {
    fn start(dir: &Path, node: &str, url: &str, lease: &str, stamps: &Path) -> Master {
        let run = dir.join(node);
        fs::create_dir_all(&run).unwrap();
        let text = format!(
            "[plumule]\nruntime_dir = \"{0}/run\"\nstate_dir = \"{0}/state\"\nnode = \"{node}\"\n\
             cluster = {{ etcd = [\"{url}\"], lease = \"{lease}\" }}\n\n\
             [program.leader]\ncommand = [\"/bin/sh\", \"-c\", \"echo $$ >> {1}; exec sleep 1000\"]\n\
             stop_timeout = \"1s\"\nlocks = [{{ name = \"leader\", cluster = true }}]\n",
            run.display(),
            stamps.display()
        );
        let config = run.join("plumule.toml");
        fs::write(&config, text).unwrap();
        let mut cmd = Command::new(PLUMULE);
        cmd.args(["run", "-c"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(run.join("stderr")).unwrap());
        common::sys::die_with_parent(&mut cmd);
        Master {
            child: cmd.spawn().expect("start plumule"),
        }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn helper(&self) -> Option<i32> {
        let me = self.pid();
        fs::read_dir("/proc").ok()?.find_map(|e| {
            let pid: i32 = e.ok()?.file_name().to_str()?.parse().ok()?;
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let comm = &stat[stat.find('(')? + 1..stat.rfind(')')?];
            let ppid: i32 = stat[stat.rfind(')')? + 2..]
                .split(' ')
                .nth(1)?
                .parse()
                .ok()?;
            (ppid == me && comm == "plumule-etcd").then_some(pid)
        })
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Master {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The worker pids in the stamps file, in order.
fn holders(stamps: &Path) -> Vec<i32> {
    fs::read_to_string(stamps)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Waits (polling every millisecond) until a holder after the first `n` appears.
fn wait_holder(stamps: &Path, n: usize, limit: Duration) -> Result<i32> {
    let give_up = Instant::now() + limit;
    loop {
        let h = holders(stamps);
        if h.len() > n {
            return Ok(h[n]);
        }
        if Instant::now() >= give_up {
            return Err(format!("no new holder within {limit:?}"));
        }
        std::thread::sleep(Duration::from_millis(1)); // poll interval
    }
}

fn parent_of(pid: i32) -> i32 {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s[s.rfind(')')? + 2..].split(' ').nth(1)?.parse().ok())
        .unwrap_or(0)
}

#[derive(Clone, Copy)]
enum End {
    Kill,
    HostDeath,
    Freeze,
}

fn handovers(url: &str, lease: &str, end: End, rounds: usize) -> Result<Vec<Duration>> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let stamps = dir.path().join("stamps");
    let mut masters = vec![
        Master::start(dir.path(), "a", url, lease, &stamps),
        Master::start(dir.path(), "b", url, lease, &stamps),
    ];
    let mut seen = 0;
    let mut holder = wait_holder(&stamps, seen, Duration::from_secs(30))?;
    let mut times = Vec::new();
    for _ in 0..rounds {
        seen += 1;
        let at = masters
            .iter()
            .position(|m| m.pid() == parent_of(holder))
            .ok_or("the holder has no master")?;
        // Let the waiter settle into its watch first.
        std::thread::sleep(Duration::from_millis(300)); // not a synchronisation: a pause between rounds
        let start = Instant::now();
        let frozen = masters[at].pid();
        match end {
            End::Kill => masters[at].kill(),
            End::HostDeath => {
                let helper = masters[at].helper().ok_or("no helper")?;
                let _ = common::sys::kill(helper, libc::SIGSTOP);
                masters[at].kill();
                let _ = common::sys::kill(helper, libc::SIGKILL);
            }
            End::Freeze => {
                let _ = common::sys::kill(frozen, libc::SIGSTOP);
            }
        }
        holder = wait_holder(&stamps, seen, Duration::from_secs(60))?;
        times.push(start.elapsed());
        match end {
            End::Freeze => {
                let _ = common::sys::kill(frozen, libc::SIGCONT);
            }
            _ => {
                let node = if at == 0 { "a" } else { "b" };
                masters[at] = Master::start(dir.path(), node, url, lease, &stamps);
            }
        }
    }
    drop(masters);
    Ok(times)
}

fn timed_runs(rounds: usize, mut run: impl FnMut() -> Result<()>) -> Result<Vec<Duration>> {
    run()?; // warm-up
    (0..rounds)
        .map(|_| {
            let t = Instant::now();
            run()?;
            Ok(t.elapsed())
        })
        .collect()
}

fn command_ok(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn stats(times: &Result<Vec<Duration>>) -> String {
    match times {
        Err(e) => format!("| failed: {e} | | |"),
        Ok(t) if t.is_empty() => "| none | | |".into(),
        Ok(t) => {
            let mut ms: Vec<f64> = t.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
            ms.sort_by(|a, b| a.total_cmp(b));
            format!(
                "| {:.0} | {:.0} | {:.0} |",
                ms[0],
                ms[ms.len() / 2],
                ms[ms.len() - 1]
            )
        }
    }
}

fn main() -> ExitCode {
    let rounds: usize = std::env::var("CLUSTER_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    println!("# plumule cluster bench, {}, {}\n", today(), machine());
    let Some(etcd) = etcd::Etcd::start() else {
        println!("skipped: etcd is not installed");
        return ExitCode::SUCCESS;
    };
    let url = etcd.url();
    println!("etcd: {url} (one member, loopback); {rounds} rounds per row\n");

    println!("## Handover of a cluster lock: holder's end → next holder's worker running\n");
    println!("| end of the holder | lease | min ms | median ms | max ms |");
    println!("|---|---|---|---|---|");
    for (end, name) in [
        (End::Kill, "master SIGKILLed (helper revokes)"),
        (End::HostDeath, "host dies (master + helper SIGKILLed)"),
        (End::Freeze, "master frozen (SIGSTOP)"),
    ] {
        for lease in ["2s", "5s"] {
            let t = handovers(&url, lease, end, rounds);
            println!("| {name} | {lease} {}", stats(&t));
        }
    }

    println!("\n## Acquire latency when free (whole command, `-- true`)\n");
    println!("| command | min ms | median ms | max ms |");
    println!("|---|---|---|---|");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("plumule.toml");
    fs::write(
        &config,
        format!(
            "[plumule]\nruntime_dir = \"{0}/run\"\nstate_dir = \"{0}/state\"\nlock_dir = \"{0}/locks\"\n\
             cluster = {{ etcd = [\"{url}\"], lease = \"10s\" }}\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let t = timed_runs(rounds * 4, || {
        command_ok(
            Command::new(PLUMULE)
                .args(["lock", "--cluster", "bench", "-c"])
                .arg(&config)
                .args(["--", "true"]),
        )
    });
    println!("| plumule lock --cluster bench -- true {}", stats(&t));
    let etcdctl = ["/usr/bin/etcdctl", "/usr/local/bin/etcdctl"]
        .into_iter()
        .find(|p| Path::new(p).exists());
    let t = match etcdctl {
        Some(bin) => timed_runs(rounds * 4, || {
            command_ok(Command::new(bin).env("ETCDCTL_API", "3").args([
                "--endpoints",
                &url,
                "lock",
                "bench-etcdctl",
                "true",
            ]))
        }),
        None => Err("etcdctl is not installed".into()),
    };
    println!("| etcdctl lock bench-etcdctl true {}", stats(&t));
    fs::create_dir_all(dir.path().join("locks")).unwrap();
    let t = timed_runs(rounds * 4, || {
        command_ok(
            Command::new(PLUMULE)
                .args(["lock", "bench", "-c"])
                .arg(&config)
                .args(["--", "true"]),
        )
    });
    println!("| plumule lock bench -- true (file lock) {}", stats(&t));
    ExitCode::SUCCESS
}
