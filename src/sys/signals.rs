//! Signals as a readable descriptor: each handled signal sets its flag and writes a byte to a
//! self-pipe (signal-hook does both from the handler, async-signal-safely). The master polls
//! the pipe's read end, then [`Signals::drain`]s.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use nix::sys::signal::Signal;

/// Signals the master handles, registered before the first spawn.
pub const HANDLED: [Signal; 5] = [
    Signal::SIGCHLD,
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGUSR1,
];

pub struct Signals {
    read: UnixStream,
    flags: Vec<(Signal, Arc<AtomicBool>)>,
    ids: Vec<signal_hook::SigId>,
}

impl Signals {
    pub fn register(signals: &[Signal]) -> io::Result<Signals> {
        let (read, write) = UnixStream::pair()?;
        read.set_nonblocking(true)?;
        write.set_nonblocking(true)?;
        let mut flags = Vec::new();
        let mut ids = Vec::new();
        for &sig in signals {
            let flag = Arc::new(AtomicBool::new(false));
            // The flag first: when the byte wakes the loop, the flag is already set.
            ids.push(signal_hook::flag::register(sig as i32, Arc::clone(&flag))?);
            ids.push(signal_hook::low_level::pipe::register(
                sig as i32,
                write.try_clone()?,
            )?);
            flags.push((sig, flag));
        }
        Ok(Signals { read, flags, ids })
    }

    pub fn fd(&self) -> RawFd {
        self.read.as_raw_fd()
    }

    /// The signals that arrived since the last call, each once however often it came.
    pub fn drain(&mut self) -> Vec<Signal> {
        let mut buf = [0u8; 256];
        while matches!(super::read_available(self.read.as_raw_fd(), &mut buf), Ok(Some(n)) if n > 0)
        {
        }
        self.flags
            .iter()
            .filter(|(_, flag)| flag.swap(false, Ordering::SeqCst))
            .map(|(sig, _)| *sig)
            .collect()
    }
}

impl Drop for Signals {
    fn drop(&mut self) {
        for id in self.ids.drain(..) {
            signal_hook::low_level::unregister(id);
        }
    }
}
