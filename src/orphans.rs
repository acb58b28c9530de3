//! The record of the workers' process groups in `runtime_dir/workers`, so that a master
//! started after a crash of the previous one (even a SIGKILL, which no handler sees) stops
//! whatever the old one left behind before it starts its own workers.
//!
//! One line per group: `PGID START_TIME STOP_SIGNAL STOP_TIMEOUT_MS`. The start time (clock
//! ticks since boot, from /proc) tells the recorded leader apart from a process that reused
//! its pid. The file is replaced atomically (temp file, then rename).

use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use crate::sys::process::{group_exists, signal_group, start_time};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Group {
    pub pgid: Pid,
    pub start_time: u64,
    pub stop_signal: Signal,
    pub stop_timeout: Duration,
}

pub fn path(runtime_dir: &Path) -> PathBuf {
    runtime_dir.join("workers")
}

pub fn format(groups: &[Group]) -> String {
    let mut out = String::new();
    for g in groups {
        let _ = writeln!(
            out,
            "{} {} {} {}",
            g.pgid,
            g.start_time,
            crate::slot::signal_name(g.stop_signal),
            g.stop_timeout.as_millis()
        );
    }
    out
}

/// Lines that do not parse are skipped: the file is ours, but a torn or foreign file must not
/// stop the master from starting.
pub fn parse(text: &str) -> Vec<Group> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let pgid: i32 = f.next()?.parse().ok()?;
            let start_time = f.next()?.parse().ok()?;
            let stop_signal = format!("SIG{}", f.next()?).parse().ok()?;
            let stop_timeout = Duration::from_millis(f.next()?.parse().ok()?);
            (pgid > 1).then_some(Group {
                pgid: Pid::from_raw(pgid),
                start_time,
                stop_signal,
                stop_timeout,
            })
        })
        .collect()
}

pub fn write(runtime_dir: &Path, groups: &[Group]) -> io::Result<()> {
    let tmp = runtime_dir.join("workers.tmp");
    std::fs::write(&tmp, format(groups))?;
    std::fs::rename(&tmp, path(runtime_dir))
}

pub fn remove(runtime_dir: &Path) {
    let _ = std::fs::remove_file(path(runtime_dir));
}

/// Whether a recorded group still has members that are really its own: either its leader
/// (same start time), or members left after the leader died (a group id stays reserved
/// while members remain, so it cannot have been reused).
fn still_there(g: &Group) -> bool {
    match start_time(g.pgid) {
        Some(t) => t == g.start_time,
        None => group_exists(g.pgid),
    }
}

/// Stops the groups a previous master left: their stop signal, then SIGKILL after their
/// stop timeout. Returns how many groups were found. Runs once, before any worker starts.
pub fn stop_leftovers(runtime_dir: &Path) -> usize {
    let Ok(text) = std::fs::read_to_string(path(runtime_dir)) else {
        return 0;
    };
    let left: Vec<Group> = parse(&text).into_iter().filter(still_there).collect();
    if left.is_empty() {
        remove(runtime_dir);
        return 0;
    }
    log::warn!(
        "stopping {} worker process group(s) left by a previous master: {}",
        left.len(),
        left.iter()
            .map(|g| g.pgid.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    for g in &left {
        let _ = signal_group(g.pgid, g.stop_signal);
    }
    let timeout = left
        .iter()
        .map(|g| g.stop_timeout)
        .max()
        .unwrap_or_default();
    if !wait_gone(&left, timeout) {
        for g in left.iter().filter(|g| group_exists(g.pgid)) {
            log::warn!(
                "process group {} ignored {}; killing it",
                g.pgid,
                crate::slot::signal_name(g.stop_signal)
            );
            let _ = signal_group(g.pgid, Signal::SIGKILL);
        }
        wait_gone(&left, Duration::from_secs(5));
    }
    remove(runtime_dir);
    left.len()
}

/// These processes are not our children, so no SIGCHLD tells of their end: check every
/// 10 ms. This runs only at start-up, before the event loop, never while idle.
fn wait_gone(groups: &[Group], timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if groups.iter().all(|g| !group_exists(g.pgid)) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_garbage_is_skipped() {
        let groups = vec![
            Group {
                pgid: Pid::from_raw(1234),
                start_time: 99,
                stop_signal: Signal::SIGTERM,
                stop_timeout: Duration::from_secs(10),
            },
            Group {
                pgid: Pid::from_raw(77),
                start_time: 5,
                stop_signal: Signal::SIGQUIT,
                stop_timeout: Duration::from_millis(250),
            },
        ];
        let text = format(&groups);
        assert_eq!(text, "1234 99 TERM 10000\n77 5 QUIT 250\n");
        let mut with_garbage = text.clone();
        with_garbage.push_str("nonsense\n1 2 TERM 3\n-5 1 TERM 1\n12 x TERM 1\n");
        assert_eq!(parse(&with_garbage), groups);
    }
}
