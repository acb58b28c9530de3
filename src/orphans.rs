//! The record of the workers' process groups in `runtime_dir/workers`, so that a master
//! started after a crash of the previous one (even a SIGKILL, which no handler sees) stops
//! whatever the old one left behind before it starts its own workers.
//!
//! A journal, appended to as workers come and go so that its cost follows the events, not the
//! fleet: a line `PGID START_TIME STOP_SIGNAL STOP_TIMEOUT_MS` for each group started, and a
//! line `-PGID` for each group gone. Read back, the lines replay into the groups that may still
//! live. The start time (clock ticks since boot, from /proc) tells the recorded leader apart
//! from a process that reused its pid. When gone lines outnumber live groups the file is
//! rewritten whole, atomically (temp file, then rename), so it stays in proportion to the
//! fleet. A line torn by a crash is skipped on reading.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, Write as _};
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

/// One journal line.
enum Line {
    Started(Group),
    Gone(Pid),
}

fn parse_line(line: &str) -> Option<Line> {
    let mut f = line.split_whitespace();
    let first = f.next()?;
    if let Some(gone) = first.strip_prefix('-') {
        let pgid: i32 = gone.parse().ok()?;
        return (f.next().is_none() && pgid > 1).then_some(Line::Gone(Pid::from_raw(pgid)));
    }
    let pgid: i32 = first.parse().ok()?;
    let start_time = f.next()?.parse().ok()?;
    let stop_signal = format!("SIG{}", f.next()?).parse().ok()?;
    let stop_timeout = Duration::from_millis(f.next()?.parse().ok()?);
    (pgid > 1 && f.next().is_none()).then_some(Line::Started(Group {
        pgid: Pid::from_raw(pgid),
        start_time,
        stop_signal,
        stop_timeout,
    }))
}

/// Replays the journal into the groups not recorded as gone, in pgid order. Lines that do
/// not parse are skipped: the file is ours, but a torn or foreign file must not stop the
/// master from starting.
pub fn parse(text: &str) -> Vec<Group> {
    let mut groups = BTreeMap::new();
    for line in text.lines().filter_map(parse_line) {
        match line {
            Line::Started(g) => {
                groups.insert(g.pgid.as_raw(), g);
            }
            Line::Gone(pgid) => {
                groups.remove(&pgid.as_raw());
            }
        }
    }
    groups.into_values().collect()
}

/// The master's side of the record: lines are buffered as workers start and end, and
/// written by [`Journal::flush`], once per pass of the loop.
pub struct Journal {
    runtime_dir: PathBuf,
    file: Option<File>,
    /// Lines in the file.
    lines: usize,
    pending: String,
    pending_lines: usize,
    /// Groups alive, as counted from the lines written and buffered.
    live: usize,
}

impl Journal {
    pub fn new(runtime_dir: &Path) -> Journal {
        Journal {
            runtime_dir: runtime_dir.to_path_buf(),
            file: None,
            lines: 0,
            pending: String::new(),
            pending_lines: 0,
            live: 0,
        }
    }

    pub fn started(&mut self, group: &Group) {
        self.pending.push_str(&format(std::slice::from_ref(group)));
        self.pending_lines += 1;
        self.live += 1;
    }

    pub fn gone(&mut self, pgid: Pid) {
        let _ = writeln!(self.pending, "-{pgid}");
        self.pending_lines += 1;
        self.live = self.live.saturating_sub(1);
    }

    /// Writes what is buffered. `live` lists every group alive now; it is called only when
    /// the file is due to be rewritten whole (then it is the new content).
    pub fn flush(&mut self, live: impl FnOnce() -> Vec<Group>) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let lines = self.lines + self.pending_lines;
        if self.file.is_none() || lines > 2 * self.live + 64 {
            return self.rewrite(&live());
        }
        let file = self.file.as_mut().expect("checked above");
        file.write_all(self.pending.as_bytes())?;
        self.lines = lines;
        self.pending.clear();
        self.pending_lines = 0;
        Ok(())
    }

    fn rewrite(&mut self, live: &[Group]) -> io::Result<()> {
        let tmp = self.runtime_dir.join("workers.tmp");
        std::fs::write(&tmp, format(live))?;
        let target = path(&self.runtime_dir);
        std::fs::rename(&tmp, &target)?;
        self.file = Some(std::fs::OpenOptions::new().append(true).open(&target)?);
        self.lines = live.len();
        self.live = live.len();
        self.pending.clear();
        self.pending_lines = 0;
        Ok(())
    }
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
        let mut by_pgid = groups.clone();
        by_pgid.sort_by_key(|g| g.pgid.as_raw());
        assert_eq!(parse(&with_garbage), by_pgid, "replayed in pgid order");
        with_garbage.push_str("-1234\n");
        assert_eq!(
            parse(&with_garbage),
            vec![groups[1]],
            "a gone line removes its group"
        );
    }

    fn group(pgid: i32) -> Group {
        Group {
            pgid: Pid::from_raw(pgid),
            start_time: 1,
            stop_signal: Signal::SIGTERM,
            stop_timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn the_journal_replays_to_the_live_groups_and_stays_in_proportion() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::new(dir.path());
        let mut live: Vec<Group> = Vec::new();
        // Many workers come and go; a few stay.
        for pgid in 100..1100 {
            journal.started(&group(pgid));
            live.push(group(pgid));
            if pgid % 10 != 0 {
                journal.gone(Pid::from_raw(pgid));
                live.retain(|g| g.pgid.as_raw() != pgid);
            }
            let snapshot = live.clone();
            journal.flush(|| snapshot).unwrap();
            let text = std::fs::read_to_string(path(dir.path())).unwrap();
            assert_eq!(parse(&text), live, "after pgid {pgid}");
            assert!(
                text.lines().count() <= 2 * live.len() + 64 + 2,
                "{} lines for {} live groups",
                text.lines().count(),
                live.len()
            );
        }
        // A line torn by a crash is skipped; what precedes it stands.
        let mut text = std::fs::read_to_string(path(dir.path())).unwrap();
        text.push_str("1234 5 TE");
        assert_eq!(parse(&text), live);
    }
}
