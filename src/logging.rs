//! The master's own log (env_logger on stderr) and the forwarding of worker output.
//!
//! Under journald (`$JOURNAL_STREAM` names our stderr) lines carry a `<N>` syslog priority
//! prefix and no timestamp, since the journal stamps them itself; elsewhere they carry an
//! RFC 3339 timestamp and the level. `RUST_LOG`, when set, wins over the config's `log_level`.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};

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
    let mut err = std::io::stderr().lock();
    let _ = if JOURNAL.load(Ordering::Relaxed) {
        writeln!(err, "<6>{text}")
    } else {
        let now = humantime::format_rfc3339_millis(std::time::SystemTime::now());
        writeln!(err, "{now} {text}")
    };
}
