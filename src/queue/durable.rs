//! Group commit for one durable queue: the [`Store`] it wraps, and the syncs of it, asked of
//! the syncer process ([`crate::sys::syncer`]) so that fdatasync never runs in the event loop.
//!
//! The loop appends records during a pass (each append returns the [`Pos`] its record ends
//! at), then calls [`Durable::commit`] once at the end of the pass: what was appended is
//! written (one pwrite), and if no sync of this queue is running, one is asked covering
//! everything written. While it runs, later passes keep appending and writing; the next sync,
//! asked once the reply has come, covers all of them. So there is at most one sync per queue
//! in flight and at most one asked per pass, whatever the number of records. When the reply
//! comes, [`Durable::on_reply`] marks the log synced and the caller acknowledges every
//! submission whose `Pos` is at or before [`Durable::synced`].
//!
//! # Failures
//!
//! A failed write or sync is not retried: that would sync whatever the kernel kept, and the
//! records after the failure might not be on disk. The log is cut back to the last synced
//! offset ([`Store::truncate_to`]) and the call that saw the failure returns a [`Failed`]:
//! every record appended before that call whose `Pos` is greater than [`Failed::after`] is
//! gone. Submissions among them fail with the error's text; answers, attempts and requeues
//! among them must be appended again (the caller still holds them). Records appended after the
//! call are not concerned, even if their `Pos` compares greater (the offsets are reused). An
//! append that fails on a record too large loses only itself: its `after` is the end of the
//! previous record.
//!
//! A full disk shows when a new segment is needed, since a segment reserves its space with
//! fallocate when it is made: that append fails ("queue Q: cannot store the jobs: No space left
//! on device (reserve space for …/queues/Q/000004.log.tmp)") and the log is cut back to the last
//! synced offset, as after a failed write. The store makes the new segment before it syncs
//! the current one, so the records of the batch being appended are still unsynced then and go
//! with the cut: a refused batch is never found stored in part after a restart. Nothing
//! synced before is lost, and appends work again once there is room.
//!
//! # What still runs in the loop
//!
//! - Moving to a new segment: the store syncs the old one and fsyncs the new one and the
//!   folder inline, once per segment size (64 MiB by default): rare, and bounded by the
//!   segment size.
//! - Compaction: a copy of the live jobs into a new segment, inline, when it pays (below).
//! - Without a syncer (it could not be started, or its backlog is full), [`Durable::commit`]
//!   syncs inline; a warning says so once per queue.
//!
//! # Compaction policy
//!
//! Checked at the end of [`Durable::commit`] when the log is fully synced and no sync is in
//! flight, and only after something changed that could make it pay (the number of segments
//! changed, or the live jobs fell to half of what they were at the last check; the check
//! walks the live jobs): compact when there are at least three segments (two retired ones)
//! and the segment files take more than twice what the live jobs' records need
//! ([`Store::live_bytes`] plus a header). A compaction that fails is a warning; the log stays
//! as it was.
//!
//! # Usage
//!
//! ```text
//! // start-up, while single-threaded
//! let mut syncer = Syncer::start().ok();           // register syncer.fd() in the reactor
//! let (store, recovered) = Store::open(&dir, Options::default())?;
//! let mut q = Durable::new("emails", store);
//!
//! // during a pass
//! match q.append_submitted(id, 0, key, payload) {
//!     Ok(pos) => waiting.push((pos, id)),           // acknowledge once synced() >= pos
//!     Err(f) => { refuse this job with f.error; fail the waiting entries with pos > f.after }
//! }
//!
//! // end of the pass, for each durable queue
//! if let Err(f) = q.commit(syncer.as_mut(), now) { fail the waiting entries with pos > f.after }
//! ack the waiting entries with pos <= q.synced()    // an inline sync may have covered them
//!
//! // syncer.fd() readable
//! for reply in syncer.replies() {
//!     for q in queues {
//!         match q.on_reply(&reply, now) {
//!             OnReply::NotMine => continue,
//!             OnReply::Synced(upto) => ack the waiting entries with pos <= upto,
//!             OnReply::Failed(f) => fail the waiting entries with pos > f.after,
//!         }
//!         break;
//!     }
//! }
//! // syncer.wants_write(): watch syncer.fd() for writing, then syncer.send_queued()
//! // the syncer's pid reaped: syncer.restart() (re-register syncer.fd()),
//! //   or drop it and pass None: commit syncs inline
//! // shutdown: q.sync_now()
//! ```

use std::fs::File;
use std::io;
use std::time::{Duration, Instant};

use crate::queue::store::{self, Outcome, Pos, Store, HEADER_LEN};
use crate::sys::syncer::{Reply, Syncer, Tag};

/// How many sync durations wait for [`Durable::take_sync_times`] at most.
pub const MAX_SYNC_TIMES: usize = 1024;

/// Why records of a queue could not be stored.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("queue {queue}: cannot store the jobs: {detail}")]
pub struct StoreError {
    pub queue: String,
    /// What failed, e.g. "No space left on device (reserve space for /var/lib/plumule/queues/q/000003.log.tmp)".
    pub detail: String,
}

/// Records were lost: every record appended before the call that returned this, and whose
/// position is greater than `after`, is not on disk and never will be (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failed {
    pub after: Pos,
    pub error: StoreError,
}

/// What a reply meant to a queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OnReply {
    /// Not this queue's current sync (another queue's, or a stale one): nothing changed.
    NotMine,
    /// The log is synced up to this position: acknowledge what it covers.
    Synced(Pos),
    /// The sync failed: the log was cut back.
    Failed(Failed),
}

/// The descriptor of a segment handed to the syncer.
#[derive(Clone, Copy, Debug)]
struct Handed {
    segment: u64,
    tag: Tag,
}

/// A sync asked of the syncer and not answered yet.
#[derive(Clone, Copy, Debug)]
struct InFlight {
    tag: Tag,
    pos: Pos,
    asked: Instant,
}

/// One durable queue's store with group commit. See the module docs.
pub struct Durable {
    name: String,
    store: Store,
    handed: Option<Handed>,
    in_flight: Option<InFlight>,
    /// Tags of retired descriptors, closed in the syncer at the next commit that has one.
    to_close: Vec<Tag>,
    /// The end of the last record appended and not cut.
    last_appended: Pos,
    /// The inline fallback was logged.
    warned_inline: bool,
    /// Segments and live jobs at the last compaction check.
    checked: (usize, usize),
    syncs_inline: u64,
    /// How long syncs took, for the fsync histogram; drained by the caller.
    sync_times: Vec<Duration>,
}

impl Durable {
    /// Wraps the store of queue `name` (opened by the caller, who replays what it recovered).
    pub fn new(name: &str, store: Store) -> Durable {
        let last_appended = store.written();
        let checked = (store.segments(), store.live_jobs());
        Durable {
            name: name.to_string(),
            store,
            handed: None,
            in_flight: None,
            to_close: Vec::new(),
            last_appended,
            warned_inline: false,
            checked,
            syncs_inline: 0,
            sync_times: Vec::new(),
        }
    }

    /// Records a submitted job: acknowledge it once [`Durable::synced`] reaches the `Pos`.
    pub fn append_submitted(
        &mut self,
        id: u64,
        attempts: u32,
        key: Option<&[u8]>,
        payload: &[u8],
    ) -> Result<Pos, Failed> {
        self.recover()?;
        let res = self.store.append_submitted(id, attempts, key, payload);
        self.appended(res)
    }

    /// Records a job's answer (done or dead-lettered).
    pub fn append_answered(&mut self, id: u64, outcome: Outcome<'_>) -> Result<Pos, Failed> {
        self.recover()?;
        let res = self.store.append_answered(id, outcome);
        self.appended(res)
    }

    /// Records a failed attempt.
    pub fn append_attempt(&mut self, id: u64, attempts: u32, reason: &[u8]) -> Result<Pos, Failed> {
        self.recover()?;
        let res = self.store.append_attempt(id, attempts, reason);
        self.appended(res)
    }

    /// Records that a dead job is pending again.
    pub fn append_requeued(&mut self, id: u64) -> Result<Pos, Failed> {
        self.recover()?;
        let res = self.store.append_requeued(id);
        self.appended(res)
    }

    fn appended(&mut self, res: store::Result<Pos>) -> Result<Pos, Failed> {
        match res {
            Ok(pos) => {
                self.last_appended = pos;
                Ok(pos)
            }
            // A full disk (or any I/O error) when the store moves to a new segment: cut
            // back to the last sync, so that the records appended before it in this batch
            // are not stored behind a refusal.
            Err(e @ store::Error::Io { .. }) => {
                let failed = self.fail(&e);
                if failed.after == self.store.synced() {
                    return Err(failed);
                }
                Err(self.cut(failed.error.detail))
            }
            Err(e) => Err(self.fail(&e)),
        }
    }

    /// The end of a pass: writes what was appended and, unless a sync of this queue is
    /// running, asks `syncer` for one covering everything written (`None`: syncs inline).
    /// Then compacts if it pays. Acknowledge what [`Durable::synced`] covers afterwards: an
    /// inline sync, or a move to a new segment, may have covered more.
    ///
    /// Call it at the end of every pass that appended to this queue, and once after the
    /// syncer was restarted, replaced or dropped: a sync lost with the old one is asked again
    /// (or done inline) only here.
    pub fn commit(&mut self, mut syncer: Option<&mut Syncer>, now: Instant) -> Result<(), Failed> {
        if let Some(s) = syncer.as_deref_mut() {
            for tag in self.to_close.drain(..) {
                s.close(tag);
            }
        }
        self.recover()?;
        let written = match self.store.flush() {
            Ok(pos) => pos,
            Err(e) => return Err(self.fail(&e)),
        };
        // A move to a new segment synced the old one inline: a sync of it still running
        // covers nothing more, and the syncer needs the new segment's descriptor.
        if self
            .in_flight
            .is_some_and(|f| f.pos.segment != written.segment)
        {
            self.in_flight = None;
        }
        if self.handed.is_some_and(|h| h.segment != written.segment) {
            self.retire_handed(syncer.as_deref_mut());
        }
        if self.store.synced() < written {
            if let Some(s) = syncer {
                if self
                    .in_flight
                    .is_some_and(|f| s.awaits(f.tag, f.pos.offset))
                {
                    // Running: what was written since is covered by the next one.
                    return Ok(());
                }
                // Not running, or lost with a syncer that was replaced.
                self.in_flight = None;
                match self.ask(s, written, now) {
                    Ok(()) => return Ok(()),
                    Err(e) => self.warn_inline(&format!("the syncer took no request ({e})")),
                }
            } else {
                self.warn_inline("no syncer process");
            }
            self.sync_now()?;
        }
        self.maybe_compact();
        Ok(())
    }

    /// Hands the current segment to the syncer if it does not hold it, and asks for a sync up
    /// to `written`.
    fn ask(&mut self, s: &mut Syncer, written: Pos, now: Instant) -> io::Result<()> {
        let tag = match self.handed {
            Some(h) if h.segment == written.segment && s.holds(h.tag) => h.tag,
            _ => {
                self.retire_handed(Some(s));
                // Read-only is enough for fdatasync; the store's own descriptor stays private.
                let file = File::open(self.store.current_segment_path())?;
                let tag = s.hold(&file)?;
                self.handed = Some(Handed {
                    segment: written.segment,
                    tag,
                });
                tag
            }
        };
        s.sync(tag, written.offset)?;
        self.in_flight = Some(InFlight {
            tag,
            pos: written,
            asked: now,
        });
        Ok(())
    }

    /// Takes a reply of the syncer: if it answers this queue's running sync, the log is marked
    /// synced (or, on failure, cut back).
    /// `now` is when the reply was read: the sync's time, as the loop saw it from request to
    /// reply, goes to [`Durable::take_sync_times`].
    pub fn on_reply(&mut self, reply: &Reply, now: Instant) -> OnReply {
        let Some(f) = self.in_flight else {
            return OnReply::NotMine;
        };
        if reply.tag() != f.tag || reply.offset() != f.pos.offset {
            return OnReply::NotMine;
        }
        self.in_flight = None;
        match *reply {
            Reply::Synced { .. } => {
                self.record_time(now.saturating_duration_since(f.asked));
                self.store.mark_synced(f.pos);
                self.maybe_compact();
                OnReply::Synced(self.store.synced())
            }
            // The syncer lost the descriptor (it could not receive it): the disk is not to
            // blame. Sync inline this once; the next commit hands the file over again.
            Reply::Failed { errno, .. } if errno == libc::EBADF => {
                self.retire_handed(None);
                self.warn_inline("the syncer did not hold the segment");
                match self.sync_now() {
                    Ok(pos) => OnReply::Synced(pos),
                    Err(failed) => OnReply::Failed(failed),
                }
            }
            Reply::Failed { errno, .. } => {
                let detail = format!(
                    "{} (sync {})",
                    os_text(&io::Error::from_raw_os_error(errno)),
                    self.store.current_segment_path().display()
                );
                OnReply::Failed(self.cut(detail))
            }
        }
    }

    /// Writes and syncs everything appended, inline (shutdown, or no syncer). Returns the
    /// position synced.
    pub fn sync_now(&mut self) -> Result<Pos, Failed> {
        self.recover()?;
        self.in_flight = None;
        self.syncs_inline += 1;
        let started = Instant::now();
        match self.store.sync() {
            Ok(pos) => {
                self.record_time(started.elapsed());
                Ok(pos)
            }
            // A full disk (or any I/O error) when the store moves to a new segment: cut
            // back to the last sync, so that the records appended before it in this batch
            // are not stored behind a refusal.
            Err(e @ store::Error::Io { .. }) => {
                let failed = self.fail(&e);
                if failed.after == self.store.synced() {
                    return Err(failed);
                }
                Err(self.cut(failed.error.detail))
            }
            Err(e) => Err(self.fail(&e)),
        }
    }

    /// The durations of the syncs that succeeded since the last call (at most
    /// [`MAX_SYNC_TIMES`] are kept), for `plumule_queue_fsync_seconds`.
    pub fn take_sync_times(&mut self) -> Vec<Duration> {
        std::mem::take(&mut self.sync_times)
    }

    fn record_time(&mut self, took: Duration) {
        if self.sync_times.len() < MAX_SYNC_TIMES {
            self.sync_times.push(took);
        }
    }

    /// Every record ending at or before this position is on disk.
    pub fn synced(&self) -> Pos {
        self.store.synced()
    }

    /// Whether a sync of this queue is running in the syncer.
    pub fn syncing(&self) -> bool {
        self.in_flight.is_some()
    }

    /// How many syncs ran inline (fallbacks and [`Durable::sync_now`]).
    pub fn syncs_inline(&self) -> u64 {
        self.syncs_inline
    }

    /// The queue's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The store, to read its state (next id, live jobs, sizes).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The queue goes away: the syncer closes its descriptor.
    pub fn close(mut self, syncer: Option<&mut Syncer>) {
        self.retire_handed(None);
        if let Some(s) = syncer {
            for tag in self.to_close.drain(..) {
                s.close(tag);
            }
        }
    }

    fn retire_handed(&mut self, syncer: Option<&mut Syncer>) {
        if let Some(h) = self.handed.take() {
            match syncer {
                Some(s) => s.close(h.tag),
                None => self.to_close.push(h.tag),
            }
        }
    }

    /// A store call failed with `e`: cut the log back if the store needs it.
    fn fail(&mut self, e: &store::Error) -> Failed {
        let detail = match e {
            store::Error::Io {
                action,
                path,
                source,
            } => format!("{} ({action} {})", os_text(source), path.display()),
            other => other.to_string(),
        };
        if self.store.needs_truncate() {
            self.cut(detail)
        } else {
            // Nothing was cut: only the failed operation is lost.
            Failed {
                after: self.last_appended,
                error: self.error(detail),
            }
        }
    }

    /// Cuts the log back to the last synced offset: what followed is lost.
    fn cut(&mut self, detail: String) -> Failed {
        let synced = self.store.synced();
        // A reply to a sync asked before the cut must not count for what is written after
        // it at the same offsets: forget the sync, and sync through a new tag from now on.
        self.in_flight = None;
        self.retire_handed(None);
        let error = self.error(detail);
        if let Err(e) = self.store.truncate_to(synced.offset) {
            // The store refuses appends until a cut succeeds; `recover` tries again.
            log::error!("queue {}: {e}", self.name);
        }
        self.last_appended = synced;
        Failed {
            after: synced,
            error,
        }
    }

    /// Retries a cut that failed before: nothing can be appended until it succeeds.
    fn recover(&mut self) -> Result<(), Failed> {
        if !self.store.needs_truncate() {
            return Ok(());
        }
        let synced = self.store.synced();
        self.store.truncate_to(synced.offset).map_err(|e| Failed {
            after: synced,
            error: self.error(e.to_string()),
        })
    }

    fn error(&self, detail: String) -> StoreError {
        StoreError {
            queue: self.name.clone(),
            detail,
        }
    }

    fn warn_inline(&mut self, why: &str) {
        if !self.warned_inline {
            self.warned_inline = true;
            log::warn!(
                "queue {}: {why}: syncing its log in the event loop (said once)",
                self.name
            );
        }
    }

    /// Compacts when it pays (see the module docs).
    fn maybe_compact(&mut self) {
        if self.in_flight.is_some() || self.store.synced() != self.store.written() {
            return;
        }
        let segments = self.store.segments();
        let live = self.store.live_jobs();
        let (last_segments, last_live) = self.checked;
        if segments == last_segments && live > last_live / 2 {
            return;
        }
        self.checked = (segments, live);
        if segments < 3 {
            return;
        }
        let disk = self.store.disk_bytes();
        let needed = HEADER_LEN + self.store.live_bytes();
        if disk <= 2 * needed {
            return;
        }
        match self.store.compact() {
            Ok(stats) => {
                log::debug!(
                    "queue {}: compacted: {} live jobs kept, {} segments removed, {} -> {} bytes",
                    self.name,
                    stats.jobs,
                    stats.segments_removed,
                    stats.bytes_before,
                    stats.bytes_after
                );
            }
            Err(e) => log::warn!("queue {}: cannot compact, ignoring: {e}", self.name),
        }
        // Everything was synced before: a failure here lost nothing, but the store may want
        // its cut before taking appends again.
        if self.store.needs_truncate() {
            let _ = self.store.truncate_to(self.store.synced().offset);
        }
        self.checked = (self.store.segments(), self.store.live_jobs());
        self.last_appended = self.last_appended.max(self.store.written());
    }
}

/// An io error's text without Rust's "(os error N)" suffix: "No space left on device".
/// (strerror's wording, as the system's tools print it).
fn os_text(e: &io::Error) -> String {
    let text = e.to_string();
    match e.raw_os_error() {
        Some(n) => text
            .strip_suffix(&format!(" (os error {n})"))
            .map_or_else(|| text.clone(), str::to_string),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::store::{Options, RecoveredJob};
    use std::path::Path;

    fn open(dir: &Path, segment_size: u64) -> Durable {
        let (store, rec) = Store::open(dir, Options { segment_size }).unwrap();
        assert_eq!(rec.warnings, Vec::<String>::new());
        Durable::new("q", store)
    }

    fn reopen_ids(dir: &Path) -> Vec<u64> {
        let (_, rec) = Store::open(dir, Options::default()).unwrap();
        assert_eq!(rec.warnings, Vec::<String>::new());
        rec.jobs.iter().map(|j: &RecoveredJob| j.id).collect()
    }

    /// Waits (poll on the socket, bounded) until the syncer has answered something.
    fn wait_replies(s: &mut Syncer) -> Vec<Reply> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = s.replies();
            if !got.is_empty() {
                return got;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "the syncer never answered");
            let mut fds = [libc::pollfd {
                fd: s.fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            crate::sys::poll(&mut fds, Some(left)).unwrap();
        }
    }

    /// Feeds replies until `q` says Synced; returns that position.
    fn wait_synced(q: &mut Durable, s: &mut Syncer) -> Pos {
        loop {
            for r in wait_replies(s) {
                match q.on_reply(&r, Instant::now()) {
                    OnReply::Synced(pos) => return pos,
                    OnReply::NotMine => {}
                    OnReply::Failed(f) => panic!("{f:?}"),
                }
            }
        }
    }

    #[test]
    fn one_sync_per_pass_covers_every_record_of_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = open(dir.path(), 64 << 20);
        let mut s = Syncer::start().unwrap();
        let n = 10_000u64;
        let started = Instant::now();
        let mut last = q.synced();
        for id in 1..=n {
            last = q
                .append_submitted(id, 0, None, format!("job {id}").as_bytes())
                .unwrap();
        }
        let appended = started.elapsed();
        q.commit(Some(&mut s), Instant::now()).unwrap();
        let committed = started.elapsed();
        assert_eq!(s.syncs_requested(), 1, "one pass, one sync");
        assert!(q.syncing());
        assert!(q.synced() < last, "nothing acknowledged before the reply");

        // A second pass while the sync runs: written, not synced, no second request.
        let more = q.append_submitted(n + 1, 0, None, b"later").unwrap();
        q.commit(Some(&mut s), Instant::now()).unwrap();
        assert_eq!(s.syncs_requested(), 1, "the running sync is not doubled");
        let upto = wait_synced(&mut q, &mut s);
        let elapsed = started.elapsed();
        assert_eq!(upto, last, "the reply covers the first pass exactly");
        assert_eq!(q.take_sync_times().len(), 1, "one sync timed");
        assert_eq!(q.take_sync_times(), []);
        assert!(upto < more);
        eprintln!(
            "group commit: {n} records of ~10 bytes ({} bytes) appended in {appended:?}, \
             written and sync asked by {committed:?}, synced by {} syncer request(s) in \
             {elapsed:?} in all",
            last.offset,
            s.syncs_requested()
        );
        q.commit(Some(&mut s), Instant::now()).unwrap();
        assert_eq!(s.syncs_requested(), 2);
        assert_eq!(wait_synced(&mut q, &mut s), more);
        assert!(!q.syncing());
        // Nothing left: an idle pass asks for nothing.
        q.commit(Some(&mut s), Instant::now()).unwrap();
        assert_eq!(s.syncs_requested(), 2);
        assert_eq!(q.syncs_inline(), 0);

        // Many small passes, each acknowledged as soon as its sync returns.
        let started = Instant::now();
        let passes = 200u64;
        for p in 0..passes {
            for i in 0..50 {
                q.append_submitted(n + 2 + p * 50 + i, 0, None, b"x")
                    .unwrap();
            }
            q.commit(Some(&mut s), Instant::now()).unwrap();
            if q.syncing() {
                wait_synced(&mut q, &mut s);
            }
        }
        eprintln!(
            "group commit: {passes} passes of 50 records, each waited for: {:?} per pass",
            started.elapsed() / passes as u32
        );
        drop(q);
        assert_eq!(reopen_ids(dir.path()).len() as u64, n + 1 + passes * 50);
    }

    #[test]
    fn a_failed_sync_cuts_the_log_back_and_a_stale_reply_counts_for_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = open(dir.path(), 64 << 20);
        let mut s = Syncer::start().unwrap();
        let a = q.append_submitted(1, 0, None, b"kept").unwrap();
        q.commit(Some(&mut s), Instant::now()).unwrap();
        assert_eq!(wait_synced(&mut q, &mut s), a);

        // Two records of 35 bytes, then pretend their sync failed with EIO.
        q.append_submitted(2, 0, None, &[b'b'; 10]).unwrap();
        let c = q.append_submitted(3, 0, None, &[b'c'; 10]).unwrap();
        q.commit(Some(&mut s), Instant::now()).unwrap();
        let sent = q.in_flight.expect("a sync asked");
        assert_eq!(sent.pos, c);
        let failure = Reply::Failed {
            tag: sent.tag,
            offset: c.offset,
            errno: libc::EIO,
        };
        let OnReply::Failed(f) = q.on_reply(&failure, Instant::now()) else {
            panic!("the failure is this queue's")
        };
        assert_eq!(
            f.after, a,
            "everything after the last synced record is lost"
        );
        assert_eq!(
            f.error.to_string(),
            format!(
                "queue q: cannot store the jobs: Input/output error (sync {})",
                q.store().current_segment_path().display()
            )
        );
        assert_eq!(q.store().written(), a, "cut back");
        assert!(!q.syncing());

        // A record ending exactly where the failed sync did: the real syncer's late answer
        // to that sync ("synced") must not cover it.
        let d = q.append_submitted(4, 0, None, &[b'd'; 45]).unwrap();
        assert_eq!(d, c, "the same offset as the cut records");
        q.commit(Some(&mut s), Instant::now()).unwrap();
        assert_eq!(s.syncs_requested(), 3);
        let mut stale_seen = false;
        let upto = loop {
            let mut synced = None;
            for r in wait_replies(&mut s) {
                match q.on_reply(&r, Instant::now()) {
                    OnReply::NotMine => {
                        assert_eq!(r.tag(), sent.tag);
                        assert_eq!(q.synced(), a, "a stale reply moved nothing");
                        stale_seen = true;
                    }
                    OnReply::Synced(pos) => synced = Some(pos),
                    OnReply::Failed(f) => panic!("{f:?}"),
                }
            }
            if let Some(pos) = synced {
                break pos;
            }
        };
        assert!(stale_seen, "the syncer answered the old request first");
        assert_eq!(upto, d);
        drop(q);
        assert_eq!(reopen_ids(dir.path()), [1, 4]);
    }

    #[test]
    fn a_syncer_that_lost_the_descriptor_costs_one_inline_sync_not_the_jobs() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = open(dir.path(), 64 << 20);
        let mut s = Syncer::start().unwrap();
        let a = q.append_submitted(1, 0, None, b"a").unwrap();
        q.commit(Some(&mut s), Instant::now()).unwrap();
        let sent = q.in_flight.unwrap();
        let reply = Reply::Failed {
            tag: sent.tag,
            offset: sent.pos.offset,
            errno: libc::EBADF,
        };
        assert_eq!(q.on_reply(&reply, Instant::now()), OnReply::Synced(a));
        assert_eq!(q.syncs_inline(), 1);
        // The next sync goes through a descriptor handed over again.
        let b = q.append_submitted(2, 0, None, b"b").unwrap();
        q.commit(Some(&mut s), Instant::now()).unwrap();
        assert_ne!(q.in_flight.unwrap().tag, sent.tag);
        assert_eq!(wait_synced(&mut q, &mut s), b);
        drop(q);
        assert_eq!(reopen_ids(dir.path()), [1, 2]);
    }

    #[test]
    fn without_a_syncer_commit_syncs_inline() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = open(dir.path(), 64 << 20);
        let a = q.append_submitted(1, 0, None, b"a").unwrap();
        q.commit(None, Instant::now()).unwrap();
        assert_eq!(q.synced(), a);
        assert_eq!(q.syncs_inline(), 1);
        assert_eq!(q.take_sync_times().len(), 1);
        q.commit(None, Instant::now()).unwrap();
        assert_eq!(q.syncs_inline(), 1, "nothing new, no sync");

        // A sync asked of a syncer that then went away is done inline by the next commit.
        let mut s = Syncer::start().unwrap();
        let b = q.append_submitted(2, 0, None, b"b").unwrap();
        q.commit(Some(&mut s), Instant::now()).unwrap();
        assert!(q.syncing());
        drop(s);
        q.commit(None, Instant::now()).unwrap();
        assert_eq!(q.synced(), b);
        assert!(!q.syncing());
    }

    #[test]
    fn a_move_to_a_new_segment_hands_the_new_file_over() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = open(dir.path(), 4096);
        let mut s = Syncer::start().unwrap();
        q.append_submitted(1, 0, None, b"first").unwrap();
        q.commit(Some(&mut s), Instant::now()).unwrap();
        let first = q.in_flight.unwrap();
        // Enough to need segment 2 while the sync of segment 1 runs.
        let mut last = first.pos;
        for id in 2..60 {
            last = q.append_submitted(id, 0, None, &[b'p'; 100]).unwrap();
        }
        assert!(last.segment > first.pos.segment);
        q.commit(Some(&mut s), Instant::now()).unwrap();
        let second = q.in_flight.unwrap();
        assert_ne!(second.tag, first.tag, "the new segment's own descriptor");
        assert!(
            !s.holds(first.tag),
            "the retired segment's descriptor is closed"
        );
        assert_eq!(second.pos, last);
        assert_eq!(wait_synced(&mut q, &mut s), last);
        drop(q);
        assert_eq!(reopen_ids(dir.path()), (1..60).collect::<Vec<_>>());
    }

    /// Issue 9, full disk: a batch refused because the next segment cannot be made must not
    /// be found stored in part after a restart. (The segment cannot be made here because a
    /// folder holds its temporary name: open fails as it would on a full disk, as any user.)
    #[test]
    fn a_failed_move_to_a_new_segment_cuts_back_the_unsynced_records_of_the_batch() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = open(dir.path(), 1024);
        q.append_submitted(1, 0, None, b"stored before").unwrap();
        q.sync_now().unwrap();
        std::fs::create_dir(dir.path().join("000002.log.tmp")).unwrap();
        let mut first_of_batch = None;
        let failed = (2..100)
            .map(|id| q.append_submitted(id, 0, None, &[b'p'; 100]))
            .inspect(|r| {
                if let Ok(pos) = r {
                    first_of_batch.get_or_insert(*pos);
                }
            })
            .find_map(Result::err)
            .expect("segment 2 is needed within 100 records of 1 KiB segments");
        assert!(first_of_batch.is_some(), "part of the batch went in first");
        assert_eq!(failed.after, q.synced(), "cut back to the last sync");
        assert!(failed.error.detail.contains("000002.log.tmp"), "{failed:?}");
        // Appends work again once the segment can be made.
        std::fs::remove_dir(dir.path().join("000002.log.tmp")).unwrap();
        q.append_submitted(200, 0, None, b"after").unwrap();
        q.sync_now().unwrap();
        drop(q);
        assert_eq!(reopen_ids(dir.path()), [1, 200]);
    }

    #[test]
    fn the_written_survives_a_crash_the_buffered_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = open(dir.path(), 64 << 20);
        let mut s = Syncer::start().unwrap();
        q.append_submitted(1, 0, None, b"synced").unwrap();
        q.commit(Some(&mut s), Instant::now()).unwrap();
        wait_synced(&mut q, &mut s);
        q.append_answered(1, Outcome::Ok(b"done")).unwrap();
        q.append_submitted(2, 0, None, b"written").unwrap();
        q.commit(Some(&mut s), Instant::now()).unwrap();
        q.append_submitted(3, 0, None, b"only appended").unwrap();
        // The process dies here: written records are in the kernel's hands (a process crash
        // keeps them; only a power loss could take them, which the acknowledgement rule
        // covers), appended ones were in our memory.
        drop(q);
        drop(s);
        assert_eq!(reopen_ids(dir.path()), [2]);
    }

    #[test]
    fn compaction_runs_when_the_files_hold_mostly_dead_records() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = open(dir.path(), 4096);
        let mut most = 0;
        for id in 1..=400u64 {
            q.append_submitted(id, 0, None, &[b'j'; 64]).unwrap();
            if id % 40 != 0 {
                q.append_answered(id, Outcome::Ok(b"")).unwrap();
            }
            if id % 10 == 0 {
                q.commit(None, Instant::now()).unwrap();
            }
            most = most.max(q.store().segments());
        }
        q.commit(None, Instant::now()).unwrap();
        assert!(most >= 3, "the log spread over {most} segments");
        assert!(
            q.store().segments() < most,
            "compacted: {} segments of {most}",
            q.store().segments()
        );
        assert!(q.store().disk_bytes() <= 2 * (HEADER_LEN + q.store().live_bytes()).max(4096));
        drop(q);
        let expect: Vec<u64> = (1..=400).filter(|id| id % 40 == 0).collect();
        assert_eq!(reopen_ids(dir.path()), expect);
    }
}
