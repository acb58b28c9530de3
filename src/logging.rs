//! The master's own log (env_logger) and the forwarding of worker output, both to stderr.
//!
//! Under journald (`$JOURNAL_STREAM` names our stderr) lines carry a `<N>` syslog priority
//! prefix and no timestamp, since the journal stamps them itself; elsewhere they carry an
//! RFC 3339 timestamp and the level. `RUST_LOG`, when set, wins over the config's `log_level`.
//!
//! # Never blocking the loop
//! The master is one thread: a write to stderr that blocks (a reader of the pipe that stopped
//! reading) would stall supervision. So every line goes through a `Sink`:
//! - stderr is a pipe or a FIFO: the master writes through a descriptor of its own, a fresh
//!   open of `/proc/self/fd/2` (a new open file description of the same pipe), made
//!   non-blocking. Setting O_NONBLOCK on fd 2 itself would change the open file description
//!   that the calling shell and the `stdout = "inherit"` workers share, and make their writes
//!   fail with EAGAIN.
//! - stderr is a socket (the journal's stream): each line is sent with `MSG_DONTWAIT`, which
//!   makes that one call non-blocking and changes no flag.
//! - stderr is a terminal, a regular file or anything else: written directly. A file does not
//!   stall; a terminal stalls only when someone pressed Ctrl-S on it, and is then theirs to
//!   resume; a reopened tty would not be a separate queue anyway.
//!
//! What cannot be written at once waits in a buffer of [`BUFFER_LIMIT`] bytes (whole lines; the
//! rest of a line begun is always kept, so lines never interleave). Past it, lines are dropped
//! and counted, and once the buffer has drained a marker line says how many ("N lines
//! dropped"). Each write first flushes what waits; the loop also registers [`pending_fd`] for
//! writability while something waits and calls [`flush`] when it is writable, so the buffer
//! drains even when nothing new is logged.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The most bytes of log waiting for a stalled stderr.
pub const BUFFER_LIMIT: usize = 1 << 20;

static JOURNAL: AtomicBool = AtomicBool::new(false);

/// Whether `$JOURNAL_STREAM` ("DEVICE:INODE") designates our stderr.
pub fn stderr_is_journal() -> bool {
    let Ok(value) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = value.split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    match nix::sys::stat::fstat(std::io::stderr().as_raw_fd()) {
        Ok(st) => st.st_dev == dev && st.st_ino == ino,
        Err(_) => false,
    }
}

fn priority(level: log::Level) -> u8 {
    match level {
        log::Level::Error => 3,
        log::Level::Warn => 4,
        log::Level::Info => 6,
        log::Level::Debug | log::Level::Trace => 7,
    }
}

/// Sets up the logger once; later calls only change the level (a reload may change it).
pub fn init(level: log::LevelFilter) {
    let journal = stderr_is_journal();
    JOURNAL.store(journal, Ordering::Relaxed);
    let mut builder = env_logger::Builder::new();
    // The logger itself lets everything through and `log`'s max level filters, so that a
    // reload can raise the level as well as lower it (RUST_LOG, when set, decides alone).
    let from_env = std::env::var("RUST_LOG").ok();
    match &from_env {
        Some(spec) => builder.parse_filters(spec),
        None => builder.filter_level(log::LevelFilter::Trace),
    };
    builder.format(move |buf, record| {
        if journal {
            writeln!(buf, "<{}>{}", priority(record.level()), record.args())
        } else {
            writeln!(
                buf,
                "{} {:<5} {}",
                buf.timestamp_millis(),
                record.level(),
                record.args()
            )
        }
    });
    builder.target(env_logger::Target::Pipe(Box::new(LogWriter)));
    // The first set-up chooses the sink; a second `init` keeps it (and what it buffers).
    {
        let mut log = lock();
        if log.is_none() {
            *log = Some(Log::new(Sink::for_stderr()));
        }
    }
    // Whether it was set up now or before, the level is `level` from here on.
    let _ = builder.try_init();
    set_level(level);
}

/// Applies a new `log_level` (unless `RUST_LOG` decides).
pub fn set_level(level: log::LevelFilter) {
    if std::env::var_os("RUST_LOG").is_none() {
        log::set_max_level(level);
    }
}

/// Writes one line of worker output, tagged `PROGRAM.ID`, to the master's stderr. Worker
/// output is forwarded whatever the log level: it is the workers' log, not ours.
pub fn worker_line(tag: &str, line: &[u8]) {
    let text = crate::output::format_tagged(tag, line);
    let record = if JOURNAL.load(Ordering::Relaxed) {
        format!("<6>{text}\n")
    } else {
        let now = humantime::format_rfc3339_millis(std::time::SystemTime::now());
        format!("{now} {text}\n")
    };
    write_record(record.as_bytes());
}

/// The descriptor to watch for writability while log lines wait (a stalled stderr), `None`
/// when nothing waits. The loop registers it (level-triggered) and calls [`flush`] when it is
/// writable; it changes after a flush, so the loop asks again after each pass.
pub fn pending_fd() -> Option<RawFd> {
    let log = lock();
    let log = log.as_ref()?;
    if !log.waiting() {
        return None;
    }
    match &log.sink {
        Sink::Pipe(file) => Some(file.as_raw_fd()),
        Sink::Socket => Some(io::stderr().as_raw_fd()),
        Sink::Direct => None,
    }
}

/// Writes what waits, as much as stderr takes now, and the "lines dropped" marker once the
/// buffer is empty. Never blocks.
pub fn flush() {
    if let Some(log) = lock().as_mut() {
        log.flush();
    }
}

/// At exit: gives what waits up to `timeout` to be written, then leaves it.
pub fn finish(timeout: Duration) {
    let end = Instant::now() + timeout;
    loop {
        let mut guard = lock();
        let Some(log) = guard.as_mut() else {
            return;
        };
        log.flush();
        let left = end.saturating_duration_since(Instant::now());
        if !log.waiting() || left.is_zero() {
            return;
        }
        let stderr = io::stderr();
        let fd = match &log.sink {
            Sink::Pipe(file) => file.as_fd(),
            Sink::Socket => stderr.as_fd(),
            Sink::Direct => return,
        };
        let mut fds = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLOUT)];
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        if nix::poll::poll(&mut fds, ms).is_err() {
            return;
        }
    }
}

/// A line (or several) as the logger formatted it: written now, or kept, or counted as dropped.
fn write_record(record: &[u8]) {
    let mut log = lock();
    match log.as_mut() {
        Some(log) => log.write(record),
        // Not set up (a command other than `run`): plain stderr.
        None => {
            let _ = io::stderr().write_all(record);
        }
    }
}

fn lock() -> std::sync::MutexGuard<'static, Option<Log>> {
    static LOG: Mutex<Option<Log>> = Mutex::new(None);
    // A panic while writing a log line leaves nothing half-changed worth refusing.
    LOG.lock().unwrap_or_else(|e| e.into_inner())
}

/// env_logger's target: every record goes through [`write_record`] in one call.
struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        write_record(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// How the master's stderr is written (see the module docs).
enum Sink {
    /// Our own non-blocking open of the pipe or FIFO on fd 2.
    Pipe(File),
    /// fd 2 is a socket: `send(MSG_DONTWAIT)`.
    Socket,
    /// Written to fd 2 as it is.
    Direct,
}

impl Sink {
    fn for_stderr() -> Sink {
        Sink::for_fd(io::stderr().as_fd())
    }

    /// The sink for writing to `fd` (stderr, but for tests).
    fn for_fd(fd: std::os::fd::BorrowedFd) -> Sink {
        use nix::sys::stat::SFlag;
        let Ok(st) = nix::sys::stat::fstat(fd.as_raw_fd()) else {
            return Sink::Direct;
        };
        let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
        if kind == SFlag::S_IFIFO {
            // O_CLOEXEC too (std's default): no worker inherits it.
            match std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            {
                Ok(file) => Sink::Pipe(file),
                // No /proc, or no reader left (ENXIO): nothing better than fd 2 as it is.
                Err(_) => Sink::Direct,
            }
        } else if kind == SFlag::S_IFSOCK {
            Sink::Socket
        } else {
            Sink::Direct
        }
    }

    /// Writes what it can of `bytes` without blocking: how many bytes went out.
    fn try_write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let result = match self {
            Sink::Pipe(file) => file.write(bytes),
            Sink::Socket => nix::sys::socket::send(
                io::stderr().as_raw_fd(),
                bytes,
                nix::sys::socket::MsgFlags::MSG_DONTWAIT | nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
            )
            .map_err(io::Error::from),
            Sink::Direct => io::stderr().write_all(bytes).map(|()| bytes.len()),
        };
        match result {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(0),
            other => other,
        }
    }
}

/// The log's state: its sink, what waits, how many lines were dropped since the last marker.
struct Log {
    sink: Sink,
    waiting: VecDeque<u8>,
    dropped: u64,
}

impl Log {
    fn new(sink: Sink) -> Log {
        Log {
            sink,
            waiting: VecDeque::new(),
            dropped: 0,
        }
    }

    fn waiting(&self) -> bool {
        !self.waiting.is_empty() || self.dropped > 0
    }

    fn write(&mut self, record: &[u8]) {
        self.flush();
        if self.dropped > 0 {
            // Dropping goes on until the marker is out, so that it stands where the gap is.
            self.dropped += lines(record);
            return;
        }
        if !self.waiting.is_empty() {
            if self.waiting.len() + record.len() <= BUFFER_LIMIT {
                self.waiting.extend(record);
            } else {
                self.dropped += lines(record);
            }
            return;
        }
        // The rest of a line begun is kept whatever the limit: a line cut short would join the
        // next one. An error means the reader is gone (EPIPE) or stderr broke: nobody can read
        // it, so nothing is kept.
        if let Ok(n) = self.sink.try_write(record) {
            self.waiting.extend(&record[n..]);
        }
    }

    fn flush(&mut self) {
        loop {
            while !self.waiting.is_empty() {
                let (front, _) = self.waiting.as_slices();
                match self.sink.try_write(front) {
                    Ok(0) => return,
                    Ok(n) => drop(self.waiting.drain(..n)),
                    Err(_) => {
                        self.waiting.clear();
                        self.dropped = 0;
                        return;
                    }
                }
            }
            if self.dropped == 0 {
                return;
            }
            let marker = marker(self.dropped);
            self.dropped = 0;
            self.waiting.extend(marker.as_bytes());
        }
    }
}

/// How many lines `record` holds (a last one without its newline counts).
fn lines(record: &[u8]) -> u64 {
    let newlines = record.iter().filter(|&&b| b == b'\n').count() as u64;
    newlines + u64::from(!record.ends_with(b"\n") && !record.is_empty())
}

/// The line that stands for `n` dropped lines, formatted as the log's warnings are.
fn marker(n: u64) -> String {
    let what = if n == 1 { "line" } else { "lines" };
    let text = format!("{n} {what} dropped: stderr was not read fast enough");
    if JOURNAL.load(Ordering::Relaxed) {
        format!("<{}>{text}\n", priority(log::Level::Warn))
    } else {
        let now = humantime::format_rfc3339_millis(std::time::SystemTime::now());
        format!("{now} WARN  {text}\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::OwnedFd;

    use nix::fcntl::{fcntl, FcntlArg, OFlag};

    fn nonblocking(fd: &impl AsFd) -> bool {
        let flags = fcntl(fd.as_fd().as_raw_fd(), FcntlArg::F_GETFL).unwrap();
        OFlag::from_bits_truncate(flags).contains(OFlag::O_NONBLOCK)
    }

    /// A pipe, both ends blocking and close-on-exec.
    fn pipe() -> (File, OwnedFd) {
        let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap();
        (File::from(r), w)
    }

    #[test]
    fn a_pipe_is_written_through_a_nonblocking_descriptor_of_our_own() {
        let (_r, w) = pipe();
        let sink = Sink::for_fd(w.as_fd());
        let Sink::Pipe(own) = &sink else {
            panic!("a pipe gets a descriptor of its own");
        };
        assert_ne!(own.as_raw_fd(), w.as_raw_fd());
        assert!(nonblocking(own), "ours is non-blocking");
        assert!(
            !nonblocking(&w),
            "the shared one keeps its flags (the shell's and inheriting workers')"
        );
        let tmp = tempfile::tempfile().unwrap();
        assert!(matches!(Sink::for_fd(tmp.as_fd()), Sink::Direct));
    }

    /// A reader that stops reading: writes never block, at most BUFFER_LIMIT waits, the rest is
    /// counted, and once the reader resumes every line kept arrives whole and in order, then
    /// the marker.
    #[test]
    fn a_stalled_reader_costs_a_bounded_buffer_and_a_marker() {
        let (mut r, w) = pipe();
        let mut log = Log::new(Sink::for_fd(w.as_fd()));
        let line = |i: u32| format!("line {i:08} {}\n", "x".repeat(80));
        let total = 20_000u32; // 1.8 MB: a 64 KiB pipe plus the buffer cannot hold it.
        for i in 0..total {
            log.write(line(i).as_bytes());
            assert!(log.waiting.len() <= BUFFER_LIMIT + line(i).len());
        }
        assert!(log.dropped > 0, "lines were dropped");
        assert!(log.waiting.len() > BUFFER_LIMIT / 2, "the buffer was used");

        // The reader resumes; the loop flushes each time the pipe is writable.
        let mut out = Vec::new();
        let mut chunk = vec![0u8; 1 << 16];
        while log.waiting() {
            log.flush();
            let n = r.read(&mut chunk).unwrap();
            out.extend_from_slice(&chunk[..n]);
        }
        drop(log);
        drop(w);
        r.read_to_end(&mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let (marker, kept) = lines.split_last().unwrap();
        let dropped = u64::from(total) - kept.len() as u64;
        assert!(
            marker.ends_with(&format!(
                "WARN  {dropped} lines dropped: stderr was not read fast enough"
            )),
            "{marker}"
        );
        for (i, l) in kept.iter().enumerate() {
            assert_eq!(
                format!("{l}\n"),
                line(i as u32),
                "whole lines, in order, no gap before the marker"
            );
        }
    }

    #[test]
    fn a_reader_gone_drops_lines_without_an_error() {
        let (r, w) = pipe();
        let mut log = Log::new(Sink::for_fd(w.as_fd()));
        assert!(matches!(log.sink, Sink::Pipe(_)));
        drop(r);
        log.write(b"nobody reads this\n");
        assert!(!log.waiting());
    }

    #[test]
    fn lines_are_counted_with_a_last_one_unterminated() {
        assert_eq!(lines(b"a\nb\n"), 2);
        assert_eq!(lines(b"a\nb"), 2);
        assert_eq!(lines(b""), 0);
    }
}
