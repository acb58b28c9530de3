//! The syncer process end to end (a real fork, real files, fdatasync), its death and restart,
//! and a durable queue on a file system that fills up. In their own binary: these tests fork
//! and reap their own children.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::waitpid;
use plumule::queue::durable::{Durable, Failed, OnReply};
use plumule::queue::store::{Options, Pos, Store};
use plumule::sys::syncer::{Reply, Syncer};

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
        wait_readable(s.fd(), left);
    }
}

fn wait_readable(fd: i32, within: Duration) -> bool {
    let mut fds = [libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }];
    plumule::sys::poll(&mut fds, Some(within)).unwrap() > 0
}

/// The descriptors open in process `pid`.
fn open_fds(pid: i32) -> Vec<i32> {
    let mut fds: Vec<i32> = fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_str().unwrap().parse().unwrap())
        .collect();
    fds.sort();
    fds
}

/// SIGKILLs the syncer and reaps it, as the master would see it die.
fn kill_and_reap(s: &Syncer) {
    kill(s.pid(), Signal::SIGKILL).unwrap();
    waitpid(s.pid(), None).unwrap();
}

#[test]
fn the_syncer_syncs_its_own_descriptor_and_holds_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("segment");
    let mut file = fs::File::create(&path).unwrap();
    let mut s = Syncer::start().unwrap();
    let pid = s.pid().as_raw();
    file.write_all(b"some bytes").unwrap();
    let tag = s.hold(&fs::File::open(&path).unwrap()).unwrap();
    s.sync(tag, 10).unwrap();
    assert!(s.awaits(tag, 10));
    assert_eq!(wait_replies(&mut s), [Reply::Synced { tag, offset: 10 }]);
    assert!(!s.awaits(tag, 10));
    // It serves, so it is set up: named, and holding only what it should.
    assert_eq!(
        fs::read_to_string(format!("/proc/{pid}/comm"))
            .unwrap()
            .trim(),
        "plumule-syncer"
    );
    // Its standard descriptors, its socket at 3, and the file it was handed.
    let fds = open_fds(pid);
    assert_eq!(&fds[..4], [0, 1, 2, 3], "{fds:?}");
    assert_eq!(fds.len(), 5, "{fds:?}");
    let held = fs::read_link(format!("/proc/{pid}/fd/{}", fds[4])).unwrap();
    assert_eq!(held, path);

    // Closed: the file leaves the syncer, and a sync of it fails with EBADF.
    s.close(tag);
    assert!(!s.holds(tag));
    s.sync(tag, 10).unwrap();
    assert_eq!(
        wait_replies(&mut s),
        [Reply::Failed {
            tag,
            offset: 10,
            errno: libc::EBADF
        }]
    );
    assert_eq!(open_fds(pid), [0, 1, 2, 3]);
    drop(s);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "killed and reaped"
    );
}

#[test]
fn a_restarted_syncer_gets_the_descriptors_and_the_unanswered_syncs_again() {
    let dir = tempfile::tempdir().unwrap();
    let a = fs::File::create(dir.path().join("a")).unwrap();
    let b = fs::File::create(dir.path().join("b")).unwrap();
    a.write_all_at(b"aaaa", 0).unwrap();
    b.write_all_at(b"bb", 0).unwrap();
    let mut s = Syncer::start().unwrap();
    let ta = s.hold(&a).unwrap();
    let tb = s.hold(&b).unwrap();

    // A sync answered by the old process but not read before it died: kept, not repeated.
    s.sync(ta, 4).unwrap();
    assert!(wait_readable(s.fd(), Duration::from_secs(10)));
    // A sync the old process never answered: it is stopped, then killed.
    kill(s.pid(), Signal::SIGSTOP).unwrap();
    s.sync(tb, 2).unwrap();
    let old = s.pid();
    kill_and_reap(&s);
    s.restart().unwrap();
    assert_ne!(s.pid(), old);
    assert!(s.awaits(tb, 2));

    let mut got = Vec::new();
    while got.len() < 2 {
        got.extend(wait_replies(&mut s));
    }
    assert_eq!(
        got,
        [
            Reply::Synced { tag: ta, offset: 4 },
            Reply::Synced { tag: tb, offset: 2 }
        ]
    );
    // Both descriptors made it to the new process: syncs of either work.
    s.sync(ta, 4).unwrap();
    s.sync(tb, 2).unwrap();
    let mut got = Vec::new();
    while got.len() < 2 {
        got.extend(wait_replies(&mut s));
    }
    assert_eq!(
        got,
        [
            Reply::Synced { tag: ta, offset: 4 },
            Reply::Synced { tag: tb, offset: 2 }
        ]
    );
    assert_eq!(open_fds(s.pid().as_raw()).len(), 6);
}

/// Feeds replies to `q` until one is its own.
fn settle(q: &mut Durable, s: &mut Syncer) -> OnReply {
    loop {
        for r in wait_replies(s) {
            match q.on_reply(&r, Instant::now()) {
                OnReply::NotMine => {}
                other => return other,
            }
        }
    }
}

#[test]
fn a_durable_queue_rides_over_the_syncer_dying() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), Options::default()).unwrap();
    let mut q = Durable::new("q", store);
    let mut s = Syncer::start().unwrap();

    // Restarted in place: the running sync is answered by the new process.
    kill(s.pid(), Signal::SIGSTOP).unwrap();
    let a = q.append_submitted(1, 0, None, b"a").unwrap();
    q.commit(Some(&mut s), Instant::now()).unwrap();
    kill_and_reap(&s);
    assert!(!s.is_gone(), "not known before the socket is read");
    assert_eq!(s.replies(), []);
    assert!(s.is_gone());
    s.restart().unwrap();
    assert!(!s.is_gone());
    q.commit(Some(&mut s), Instant::now()).unwrap();
    assert_eq!(s.syncs_requested(), 1, "not asked twice");
    assert_eq!(settle(&mut q, &mut s), OnReply::Synced(a));

    // Replaced by a new handle: the queue notices its sync is lost and asks the new one,
    // handing the segment over again.
    kill(s.pid(), Signal::SIGSTOP).unwrap();
    let b = q.append_submitted(2, 0, None, b"b").unwrap();
    q.commit(Some(&mut s), Instant::now()).unwrap();
    kill_and_reap(&s);
    s.reaped();
    let mut s = Syncer::start().unwrap();
    q.commit(Some(&mut s), Instant::now()).unwrap();
    assert_eq!(s.syncs_requested(), 1);
    assert_eq!(settle(&mut q, &mut s), OnReply::Synced(b));
    drop(q);
    let (_, rec) = Store::open(dir.path(), Options::default()).unwrap();
    assert_eq!(rec.jobs.len(), 2);
}

/// A tmpfs of 1 MiB mounted in a temp dir, unmounted on drop.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount() -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
            .arg(dir.path())
            .output();
        let why = match out {
            Ok(o) if o.status.success() => return Some(Tmpfs(dir)),
            Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
            Err(e) => e.to_string(),
        };
        let root = nix::unistd::geteuid().is_root();
        assert!(
            !root && std::env::var_os("CI").is_none(),
            "the full-disk test must be able to mount a tmpfs (root: {root}): {why}"
        );
        eprintln!("SKIPPED: the full-disk test needs root to mount a tmpfs: {why}");
        None
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.0.path())
            .status();
    }
}

/// The submissions of a test, as the master keeps them: waiting for their sync, acknowledged,
/// or failed with a reason.
#[derive(Default)]
struct Ledger {
    waiting: BTreeMap<Pos, u64>,
    acked: Vec<u64>,
    failed: Vec<(u64, String)>,
}

impl Ledger {
    fn ack(&mut self, upto: Pos) {
        let later = self.waiting.split_off(&Pos {
            segment: upto.segment,
            offset: upto.offset + 1,
        });
        self.acked
            .extend(std::mem::replace(&mut self.waiting, later).into_values());
    }

    fn fail(&mut self, f: &Failed) {
        let lost = self.waiting.split_off(&Pos {
            segment: f.after.segment,
            offset: f.after.offset + 1,
        });
        self.failed
            .extend(lost.into_values().map(|id| (id, f.error.to_string())));
    }
}

#[test]
fn a_full_disk_fails_the_submission_clearly_loses_nothing_and_passes() {
    let Some(tmp) = Tmpfs::mount() else { return };
    let root = tmp.0.path();
    let filler = root.join("filler");
    fs::write(&filler, vec![1u8; 600 << 10]).unwrap();
    let dir = root.join("queues").join("mail");
    let opts = Options {
        segment_size: 64 << 10,
    };
    let (store, _) = Store::open(&dir, opts.clone()).unwrap();
    let mut q = Durable::new("mail", store);
    let mut s = Syncer::start().unwrap();
    let mut ledger = Ledger::default();
    let payload = vec![b'p'; 10 << 10];
    let mut refused = None;
    'passes: for pass in 0..100u64 {
        for i in 0..3 {
            let id = pass * 3 + i + 1;
            match q.append_submitted(id, 0, None, &payload) {
                Ok(pos) => {
                    ledger.waiting.insert(pos, id);
                }
                Err(f) => {
                    ledger.fail(&f);
                    refused = Some((id, f.error.to_string()));
                    break 'passes;
                }
            }
        }
        if let Err(f) = q.commit(Some(&mut s), Instant::now()) {
            ledger.fail(&f);
        }
        ledger.ack(q.synced());
        if q.syncing() {
            match settle(&mut q, &mut s) {
                OnReply::Synced(upto) => ledger.ack(upto),
                OnReply::Failed(f) => ledger.fail(&f),
                OnReply::NotMine => unreachable!(),
            }
        }
    }
    let (id, msg) = refused.expect("a 1 MiB file system fills up");
    let expect = format!(
        "queue mail: cannot store the jobs: No space left on device (reserve space for {}",
        dir.display()
    );
    assert!(msg.starts_with(&expect), "{msg}");
    assert!(
        ledger.acked.len() > 3,
        "{} stored first",
        ledger.acked.len()
    );
    eprintln!(
        "full disk: {} jobs stored, job {id} refused: {msg}",
        ledger.acked.len()
    );
    // The master goes on: what was stored is all there.
    q.commit(Some(&mut s), Instant::now()).unwrap();
    ledger.ack(q.synced());
    assert!(ledger.waiting.is_empty());
    assert_eq!(
        ledger.failed,
        Vec::<(u64, String)>::new(),
        "only the refused job failed"
    );
    drop(q);
    let (store, rec) = Store::open(&dir, opts.clone()).unwrap();
    assert_eq!(rec.warnings, Vec::<String>::new());
    let ids: Vec<u64> = rec.jobs.iter().map(|j| j.id).collect();
    assert_eq!(ids, ledger.acked);

    // Room again: the same queue takes jobs, the old ones still there.
    fs::remove_file(&filler).unwrap();
    let mut q = Durable::new("mail", store);
    for id in 1000..1010 {
        let pos = q.append_submitted(id, 0, None, &payload).unwrap();
        ledger.waiting.insert(pos, id);
    }
    q.commit(Some(&mut s), Instant::now()).unwrap();
    ledger.ack(q.synced());
    if q.syncing() {
        let OnReply::Synced(upto) = settle(&mut q, &mut s) else {
            panic!("the sync after the disk emptied failed")
        };
        ledger.ack(upto);
    }
    assert!(ledger.waiting.is_empty());
    drop(q);
    let (_, rec) = Store::open(&dir, opts).unwrap();
    let ids: Vec<u64> = rec.jobs.iter().map(|j| j.id).collect();
    assert_eq!(ids, ledger.acked);
}
