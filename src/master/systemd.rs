//! The master's side of systemd: what it tells systemd (READY, RELOADING, STOPPING, STATUS,
//! WATCHDOG) and what workers tell plumule on its notify socket (READY, STATUS, WATCHDOG).

use std::time::{Duration, Instant};

use nix::unistd::Pid;

use super::supervisor::{notify_path, Note, Supervisor};
use super::{MasterError, Part, Subsystem};
use crate::plan::{Phase, Pool};
use crate::slot::Event;
use crate::sys;
use crate::sys::notify::{Notification, NotifySocket};
use crate::sys::reactor::Ready;

/// Hands each message to `handle` in the order received, and closes the descriptors that came
/// with it only once it has been handled. A `BARRIER=1` message's descriptor (what
/// `sd_notify_barrier`, and so `systemd-notify`, waits on) is thus closed after every message
/// received before it was handled: the sender is still alive while its READY=1 is attributed
/// by its pid or process group, even when it is a short-lived helper.
fn handle_in_order(messages: Vec<Notification>, mut handle: impl FnMut(i32, &str)) {
    for message in messages {
        handle(message.pid, &message.text);
        drop(message);
    }
}

/// The systemd part of the loop: plumule's notify socket, on which workers (or their
/// children) send READY=1, STATUS= and WATCHDOG=1, and what the master tells its own systemd,
/// and when.
pub(super) struct Systemd {
    socket: Option<NotifySocket>,
    notifier: sys::notify::Notifier,
    ready_sent: bool,
    /// A reload is being applied: READY=1 once these pools are settled.
    reloading: Option<Vec<crate::plan::PoolId>>,
    /// The last summary sent as `STATUS=`; a new one is sent when the summary changes. What
    /// systemd shows may differ (a refused reload's reason): see [`Systemd::tell`].
    last_summary: String,
    /// Half of `$WATCHDOG_USEC`, when systemd watches us.
    watchdog_every: Option<Duration>,
    watchdog_next: Option<Instant>,
    /// The supervisor's epoch when READY and STATUS were last worked out: nothing to redo
    /// (no walk over the fleet) until it moves.
    seen_epoch: Option<u64>,
}

impl Systemd {
    /// Binds the notify socket for workers and reads how systemd watches the master.
    pub(super) fn new(sup: &Supervisor) -> Result<Systemd, MasterError> {
        let path = notify_path(&sup.config);
        let socket = NotifySocket::bind(&path).map_err(|e| MasterError::Dir {
            what: "notify socket",
            path: path.clone(),
            reason: e.to_string(),
        })?;
        sup.reactor
            .add(socket.fd(), Part::Notify.token(0), false)
            .map_err(MasterError::Setup)?;
        let now = Instant::now();
        let notifier = sys::notify::Notifier::from_env();
        let ours = std::env::var("WATCHDOG_PID")
            .ok()
            .and_then(|p| p.parse::<u32>().ok());
        let watchdog_every = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|u| u.parse::<u64>().ok())
            .filter(|&u| {
                u > 0 && ours.is_none_or(|p| p == std::process::id()) && notifier.enabled()
            })
            .map(|u| Duration::from_micros(u / 2));
        Ok(Systemd {
            socket: Some(socket),
            notifier,
            ready_sent: false,
            reloading: None,
            last_summary: String::new(),
            watchdog_every,
            watchdog_next: watchdog_every.map(|w| now + w),
            seen_epoch: None,
        })
    }

    /// Tells systemd what the supervisor noted, in order.
    fn relay(&mut self, notes: Vec<Note>) {
        if !notes.is_empty() {
            // A reload or a stop changes what READY and STATUS say, fleet changed or not.
            self.seen_epoch = None;
        }
        for note in notes {
            match note {
                Note::Reloading { monotonic_usec } => self
                    .notifier
                    .send(&format!("RELOADING=1\nMONOTONIC_USEC={monotonic_usec}")),
                // systemd leaves "reloading" and shows why, until the summary changes or a
                // later reload is applied (see `tell`).
                Note::ReloadRefused(message) => {
                    let first: String = message
                        .lines()
                        .next()
                        .unwrap_or_default()
                        .chars()
                        .take(200)
                        .collect();
                    self.notifier.send(&format!("READY=1\nSTATUS={first}"));
                }
                Note::Reloaded(pools) => self.reloading = Some(pools),
                Note::Stopping { extend_usec } => self
                    .notifier
                    .send(&format!("STOPPING=1\nEXTEND_TIMEOUT_USEC={extend_usec}")),
            }
        }
    }

    /// READY=1 once every program has settled (first start, then after each reload),
    /// STATUS= when the summary changes, WATCHDOG=1 when due. Returns the next watchdog time.
    ///
    /// A refused reload puts its reason in STATUS= (see `reload`) and it stays there while the
    /// summary holds; the next reload that is applied replaces it: its READY=1 carries the
    /// summary whenever the last STATUS= systemd received is not that summary.
    fn tell(&mut self, sup: &Supervisor, now: Instant) -> Option<Instant> {
        if !self.notifier.enabled() {
            return None;
        }
        if self.seen_epoch != Some(sup.epoch) {
            self.seen_epoch = Some(sup.epoch);
            self.tell_state(sup);
        }
        if let (Some(every), Some(next)) = (self.watchdog_every, self.watchdog_next) {
            if next <= now {
                self.notifier.send("WATCHDOG=1");
                self.watchdog_next = Some(now + every);
            }
        }
        self.watchdog_next
    }

    /// READY=1 and STATUS= from the state of the fleet.
    fn tell_state(&mut self, sup: &Supervisor) {
        let status = Self::summary(sup);
        let mut ready = false;
        if sup.phase == Phase::Running {
            let settled = |pools: &[Pool], keys: Option<&Vec<crate::plan::PoolId>>| {
                pools
                    .iter()
                    .filter(|p| keys.is_none_or(|k| k.contains(&p.key)))
                    .all(|p| crate::plan::settled_for_ready(pools, p))
            };
            if !self.ready_sent && settled(&sup.pools, None) {
                self.ready_sent = true;
                ready = true;
            }
            if let Some(keys) = &self.reloading {
                if settled(&sup.pools, Some(keys)) {
                    self.reloading = None;
                    ready = true;
                }
            }
        }
        let stale = self.notifier.last_status() != Some(status.as_str());
        let message = match (ready, stale || status != self.last_summary) {
            (true, true) => Some(format!("READY=1\nSTATUS={status}")),
            (true, false) => Some("READY=1".to_string()),
            // Changed since the last summary sent: it replaces whatever systemd shows.
            (false, _) if status != self.last_summary => Some(format!("STATUS={status}")),
            (false, _) => None,
        };
        if let Some(message) = message {
            self.notifier.send(&message);
            if message.contains("STATUS=") {
                self.last_summary = status;
            }
        }
    }

    /// "12/12 workers running, 0 failed", plus what is degraded.
    fn summary(sup: &Supervisor) -> String {
        let mut wanted = 0;
        let mut running = 0;
        let mut failed = Vec::new();
        for pool in &sup.pools {
            let desired = pool.desired();
            wanted += desired;
            for slot in pool.slots.iter().filter(|s| s.id < desired) {
                match slot.state().current() {
                    crate::slot::SlotState::Running { .. } => running += 1,
                    crate::slot::SlotState::Failed { .. } => {
                        failed.push(format!("{}.{}", pool.program.name, slot.id))
                    }
                    _ => {}
                }
            }
        }
        let mut s = format!(
            "{running}/{wanted} workers running, {} failed",
            failed.len()
        );
        if !failed.is_empty() {
            failed.truncate(5);
            s.push_str(&format!(" ({})", failed.join(", ")));
        }
        if sup.phase != Phase::Running {
            s = format!("stopping: {s}");
        }
        s
    }

    /// Messages on plumule's notify socket, from workers (or their children).
    fn read_notifications(&mut self, sup: &mut Supervisor, now: Instant) {
        let Some(sock) = &self.socket else {
            return;
        };
        let mut messages = Vec::new();
        while let Some(m) = sock.recv() {
            messages.push(m);
            if messages.len() >= 256 {
                break;
            }
        }
        handle_in_order(messages, |sender, text| {
            Self::on_notification(sup, Pid::from_raw(sender), text, now)
        });
    }

    fn on_notification(sup: &mut Supervisor, sender: Pid, text: &str, now: Instant) {
        // A worker's children speak for it too (as with NotifyAccess=all): match the group.
        let pid = if sup.procs.contains_key(&sender) {
            sender
        } else {
            match crate::sys::process::process_group(sender) {
                Some(pgid) if sup.procs.contains_key(&pgid) => pgid,
                _ => {
                    log::debug!(
                        "notify socket: ignoring a message from pid {sender}, not a worker"
                    );
                    return;
                }
            }
        };
        let Some(key) = sup.procs.get(&pid).map(|p| p.key) else {
            return;
        };
        for line in text.lines() {
            match line.split_once('=') {
                Some(("READY", "1")) => {
                    sup.slot_event(key, Event::Ready { pid }, now);
                }
                Some(("WATCHDOG", "1")) => {
                    sup.slot_event(key, Event::WatchdogPing { pid }, now);
                }
                Some(("STATUS", s)) => {
                    let Some(p) = sup.pool_index(key.pool) else {
                        continue;
                    };
                    if let Some(slot) = sup.pools[p].slots.get_mut(key.id as usize) {
                        if slot.pid() == Some(pid) {
                            slot.status = Some(s.chars().take(256).collect());
                        }
                    }
                }
                _ => {}
            }
        }
    }
}

impl Subsystem for Systemd {
    fn part(&self) -> Part {
        Part::Notify
    }

    fn ready(&mut self, sup: &mut Supervisor, _local: u64, _ready: Ready, now: Instant) {
        self.read_notifications(sup, now);
    }

    fn after_pass(&mut self, sup: &mut Supervisor, now: Instant) -> Option<Instant> {
        let notes = std::mem::take(&mut sup.notes);
        self.relay(notes);
        self.tell(sup, now)
    }

    fn finish(&mut self, _sup: &mut Supervisor) {
        if let Some(n) = self.socket.take() {
            n.close();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::IoSlice;
    use std::os::fd::{AsFd, AsRawFd, OwnedFd};
    use std::os::unix::net::UnixDatagram;

    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};

    use super::*;
    use crate::sys::notify::NotifySocket;

    /// Sends `text` to `path` from `client`, passing `fd` along when given.
    fn send_with(client: &UnixDatagram, path: &std::path::Path, text: &str, fd: Option<&OwnedFd>) {
        let addr = UnixAddr::new(path).unwrap();
        let raw = fd.map(|f| [f.as_raw_fd()]);
        let cmsgs: Vec<ControlMessage> = raw.iter().map(|r| ControlMessage::ScmRights(r)).collect();
        sendmsg(
            client.as_raw_fd(),
            &[IoSlice::new(text.as_bytes())],
            &cmsgs,
            MsgFlags::empty(),
            Some(&addr),
        )
        .unwrap();
    }

    /// Whether every write end of the pipe whose read end is `read` has been closed.
    fn hung_up(read: &OwnedFd) -> bool {
        let mut fds = [PollFd::new(read.as_fd(), PollFlags::POLLIN)];
        poll(&mut fds, PollTimeout::ZERO).unwrap();
        fds[0]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLHUP))
    }

    #[test]
    fn a_barrier_descriptor_is_closed_only_after_the_messages_before_it_were_handled() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let sock = NotifySocket::bind(&path).unwrap();
        let client = UnixDatagram::unbound().unwrap();
        let (barrier_read, barrier_write) = nix::unistd::pipe().unwrap();
        let (other_read, other_write) = nix::unistd::pipe().unwrap();
        send_with(&client, &path, "READY=1\nSTATUS=up", None);
        send_with(&client, &path, "STATUS=with a stray fd", Some(&other_write));
        send_with(&client, &path, "BARRIER=1", Some(&barrier_write));
        // Only the copies in flight (then in the master) keep the pipes open now.
        drop((barrier_write, other_write));

        let mut messages = Vec::new();
        while let Some(m) = sock.recv() {
            messages.push(m);
        }
        assert_eq!(messages.len(), 3);
        assert!(messages[2].is_barrier());
        for m in &messages[1..] {
            let flags = nix::fcntl::fcntl(m.fds[0].as_raw_fd(), nix::fcntl::F_GETFD).unwrap();
            assert_ne!(flags & libc::FD_CLOEXEC, 0, "received close-on-exec");
        }
        assert!(!hung_up(&barrier_read) && !hung_up(&other_read));

        let mut handled = Vec::new();
        handle_in_order(messages, |pid, text| {
            assert_eq!(pid, std::process::id() as i32);
            // While a message is handled, the barrier (after it, or itself) is still held.
            assert!(!hung_up(&barrier_read), "barrier released before {text:?}");
            handled.push(text.to_string());
        });
        assert_eq!(
            handled,
            ["READY=1\nSTATUS=up", "STATUS=with a stray fd", "BARRIER=1"]
        );
        assert!(hung_up(&barrier_read), "the barrier's descriptor is closed");
        assert!(
            hung_up(&other_read),
            "a descriptor passed with a message is closed"
        );
    }
}
