//! The on-disk store of a durable queue: an append-only log of segment files in one folder
//! (`state_dir/queues/NAME/`), replayed at start-up into the jobs that are still live.
//!
//! The store owns the files and the durable state they describe; it runs no thread and knows
//! nothing of workers. The queue appends a record for every change of a job, asks for the
//! records to be written and synced, and acknowledges a submission only once its record is
//! synced ([`Store::synced`] has reached the [`Pos`] its append returned). Invariants:
//!
//! - every byte of a segment up to [`Store::synced`] is durable and parses as whole records;
//! - a record is only ever written at the current end of the log, and after a failed write or
//!   sync nothing more is appended until [`Store::truncate_to`] has cut the log back, so a later
//!   record never lands after garbage;
//! - the store's own index of live jobs (used by [`Store::compact`]) reflects synced records
//!   only.
//!
//! # Format (version 1)
//!
//! All integers are little-endian. A segment is the file `SEQ.log`, SEQ in decimal, at least
//! six digits (`000001.log`); segments replay in increasing SEQ. A segment is:
//!
//! ```text
//! header, 24 bytes
//!   0..8    magic "PLUMQLOG"
//!   8..12   u32 format version (1)
//!   12..20  u64 next id: the id the store would have given next when it made this segment
//!   20..24  u32 CRC-32 (IEEE, as crc32fast computes it) of bytes 0..20
//! records, one after the other, each:
//!   0..4    u32 body length L
//!   4       u8  type (1 to 4)
//!   5..9    u32 CRC-32 of the type byte followed by the body
//!   9..9+L  body
//! zeros up to the end of the file (space reserved with fallocate)
//! ```
//!
//! Bytes 0..12 of the header (magic and version) keep their meaning in every future version;
//! the rest of the header may change with the version. A segment whose version is newer than
//! [`FORMAT_VERSION`] is refused with an error naming the file and both versions; nothing is
//! read or written then.
//!
//! Bodies, by type:
//!
//! ```text
//! 1 submitted  u64 id, u32 attempts so far, u32 key length K (0xFFFF_FFFF: no key),
//!              K bytes of key, then the payload up to the end of the body
//! 2 answered   u64 id, u8 outcome (0 ok: the job is done; 1 dead: dead-lettered),
//!              then the result (ok) or the reason (dead) up to the end of the body
//! 3 attempt    u64 id, u32 attempts so far, then the reason of the failed attempt
//! 4 requeued   u64 id: a dead job is pending again, its attempts back to 0
//! ```
//!
//! Replay applies the records in order to a map from id to job; a record about an id that is
//! not in the map is ignored (after a compaction the job's earlier records are gone). A
//! `submitted` record for an id already in the map replaces it, which makes replaying a
//! compacted segment after the segments it replaced harmless. The live jobs are listed in id
//! order, which is submission order; the next id is one more than the highest id seen, or
//! the highest header's next id when that is more.
//!
//! # Torn and corrupt records
//!
//! Replay of a segment stops at the first record that does not parse: fewer than 9 bytes
//! left, a length past the end of the file, a CRC mismatch, an unknown type or a body too
//! short for its type. If every byte from there to the end of the file is zero, that is the
//! clean end of the log (the reserved, never written space). Otherwise the store reports a
//! warning naming the segment, the offset of the bad record and how many bytes (up to the last
//! non-zero one) it skips. Every record before it is kept. No attempt is made to resynchronise
//! on a later record: a payload may contain bytes that look like a record with a valid CRC,
//! and replaying those would invent jobs or acknowledgements. So a corrupt record in the middle
//! of a segment also drops the intact records after it in that segment; later segments are
//! still replayed. In the last segment, the one appended to, the bad tail is cut off (the file
//! is truncated there and its reservation made again) before anything is appended.
//!
//! A torn tail is what a SIGKILL or a power loss leaves after the last sync; a corrupt record
//! before the synced offset means the disk lost data, and is reported the same way.
//!
//! # Durability and the order of operations
//!
//! - A new segment is written as `SEQ.log.tmp` (header, and for a compaction its records),
//!   reserved to the segment size with fallocate (a full disk shows here, not at a later
//!   write), fsynced, renamed to `SEQ.log`, and the folder fsynced. A `.log` file therefore
//!   always has a whole header; `.tmp` files left by a crash are removed at the next open.
//! - [`Store::sync`] is fdatasync of the current segment. Before moving to a new segment the
//!   store syncs the current one, so only the current segment ever holds unsynced bytes. The
//!   new segment is made before that sync, so that a full disk fails the move with nothing
//!   synced: the caller may then cut back every record since the last sync. (A crash between
//!   the two leaves an older segment with a torn tail before an empty one: reported, skipped,
//!   and never appended to again.)
//! - [`Store::compact`] syncs, writes every live job (its `submitted` record, then an `answered
//!   dead` or an `attempt` record carrying its state) into a new segment numbered after all
//!   the others, as above (write, fsync, rename, folder fsync), makes it the current segment,
//!   then deletes the older segments oldest first and fsyncs the folder. A crash before the
//!   rename leaves the old segments as they were (and a `.tmp` file that the next open
//!   removes); a crash after it replays the remaining old segments and then the new one, which
//!   restates every live job and so gives the same jobs. Deleting oldest first keeps a job's
//!   `answered` record on disk as long as its `submitted` record is, so a finished job cannot
//!   come back.
//!
//! # Syncing away from the event loop
//!
//! fdatasync can take milliseconds, and the master's event loop must not wait for it. The
//! API keeps writing and syncing apart so that the sync can happen elsewhere: [`Store::flush`]
//! hands the buffered records to the kernel and returns the [`Pos`] written, and
//! [`Store::current_segment_path`] names the file. A small syncer process holding its own
//! descriptor of that file (opened by path, or passed over a socket) can be told "sync
//! SEGMENT up to OFFSET", call fdatasync, which covers every write made before it by any
//! process, and answer "synced SEGMENT up to OFFSET"; the master then calls
//! [`Store::mark_synced`] and acknowledges the submissions whose positions are covered. While
//! one sync runs, further records accumulate and are covered by the next one (group commit).
//! What still happens inline: moving to a new segment (once per segment size) and compaction
//! sync in the caller; [`Store::sync`] is the inline version for tests and simple callers.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::sys::fs::{reserve, sync_dir};

/// The format version this build writes, and the newest it reads.
pub const FORMAT_VERSION: u32 = 1;
/// The first bytes of every segment.
pub const MAGIC: [u8; 8] = *b"PLUMQLOG";
/// Length of a segment header.
pub const HEADER_LEN: u64 = 24;
/// Length of a record's length, type and CRC, before its body.
pub const RECORD_HEADER_LEN: u64 = 9;
/// The default size at which the store moves to a new segment.
pub const DEFAULT_SEGMENT_SIZE: u64 = 64 << 20;

const NO_KEY: u32 = u32::MAX;
const TYPE_SUBMITTED: u8 = 1;
const TYPE_ANSWERED: u8 = 2;
const TYPE_ATTEMPT: u8 = 3;
const TYPE_REQUEUED: u8 = 4;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error(
        "{}: queue data of format version {found}, newer than this plumule reads (version \
         {supported}); run a newer plumule, or move the folder away to start empty",
        path.display()
    )]
    NewerVersion {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("{}: not a queue segment, or its header is damaged: {why}", path.display())]
    BadHeader { path: PathBuf, why: &'static str },
    #[error(
        "queue store {}: an earlier write or sync failed; cut the log back with truncate_to \
         before appending",
        dir.display()
    )]
    NeedsTruncate { dir: PathBuf },
    #[error(
        "{}: cannot cut the log to offset {offset}: it must lie between the synced offset \
         {synced} and the written offset {written}",
        path.display()
    )]
    BadTruncate {
        path: PathBuf,
        offset: u64,
        synced: u64,
        written: u64,
    },
    #[error("a queue record of {len} bytes is over the format's limit of 4 GiB")]
    TooLarge { len: u64 },
}

pub type Result<T> = std::result::Result<T, Error>;

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Error + 'a {
    move |source| Error::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Tunables of a store.
#[derive(Clone, Debug)]
pub struct Options {
    /// A record that would take the current segment past this size goes into a new segment
    /// (a record larger than this gets a segment of its own). Also the space each segment
    /// reserves when it is made.
    pub segment_size: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            segment_size: DEFAULT_SEGMENT_SIZE,
        }
    }
}

/// A place in the log: the end of a record, or how far the log is written or synced. Later
/// positions compare greater.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pos {
    /// The SEQ of the segment.
    pub segment: u64,
    /// A byte offset within that segment's file.
    pub offset: u64,
}

/// Where a live job stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobState {
    /// Waiting for a worker; `last_reason` is why the last attempt failed, if one did.
    Pending { last_reason: Option<Vec<u8>> },
    /// Dead-lettered, kept with its reason until it is requeued.
    Dead { reason: Vec<u8> },
}

/// A live job as recovered from disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecoveredJob {
    pub id: u64,
    pub attempts: u32,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub state: JobState,
}

/// What [`Store::open`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    /// The live jobs (pending and dead), in submission order.
    pub jobs: Vec<RecoveredJob>,
    /// The id to give the next submitted job.
    pub next_id: u64,
    /// What was skipped or cleaned up, one sentence each, for the log.
    pub warnings: Vec<String>,
}

/// How a job was answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome<'a> {
    /// Done, with its result: the job leaves the queue.
    Ok(&'a [u8]),
    /// Dead-lettered, with the reason.
    Dead(&'a [u8]),
}

/// What a compaction did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompactStats {
    /// Live jobs written into the new segment.
    pub jobs: usize,
    /// Segment files deleted.
    pub segments_removed: usize,
    /// Total size of the segment files before and after.
    pub bytes_before: u64,
    pub bytes_after: u64,
}

/// A record as it is encoded, borrowing its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Record<'a> {
    Submitted {
        id: u64,
        attempts: u32,
        key: Option<&'a [u8]>,
        payload: &'a [u8],
    },
    Answered {
        id: u64,
        outcome: Outcome<'a>,
    },
    Attempt {
        id: u64,
        attempts: u32,
        reason: &'a [u8],
    },
    Requeued {
        id: u64,
    },
}

impl Record<'_> {
    fn body_len(&self) -> u64 {
        (match self {
            Record::Submitted { key, payload, .. } => {
                16 + key.map_or(0, |k| k.len()) + payload.len()
            }
            Record::Answered {
                outcome: Outcome::Ok(t) | Outcome::Dead(t),
                ..
            } => 9 + t.len(),
            Record::Attempt { reason, .. } => 12 + reason.len(),
            Record::Requeued { .. } => 8,
        }) as u64
    }

    /// Where the payload of a `submitted` record starts, from the start of the record.
    fn payload_offset(key: Option<&[u8]>) -> u64 {
        RECORD_HEADER_LEN + 16 + key.map_or(0, |k| k.len() as u64)
    }

    /// Appends the whole record (length, type, CRC, body) to `out`.
    fn encode(&self, out: &mut Vec<u8>) -> Result<()> {
        let len = self.body_len();
        let key_too_long = matches!(self, Record::Submitted { key: Some(k), .. } if k.len() as u64 >= u64::from(NO_KEY));
        if len > u64::from(u32::MAX) || key_too_long {
            return Err(Error::TooLarge {
                len: len + RECORD_HEADER_LEN,
            });
        }
        let start = out.len();
        out.extend_from_slice(&(len as u32).to_le_bytes());
        out.extend_from_slice(&[0; 5]);
        let ty = match *self {
            Record::Submitted {
                id,
                attempts,
                key,
                payload,
            } => {
                out.extend_from_slice(&id.to_le_bytes());
                out.extend_from_slice(&attempts.to_le_bytes());
                match key {
                    Some(k) => {
                        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
                        out.extend_from_slice(k);
                    }
                    None => out.extend_from_slice(&NO_KEY.to_le_bytes()),
                }
                out.extend_from_slice(payload);
                TYPE_SUBMITTED
            }
            Record::Answered { id, outcome } => {
                out.extend_from_slice(&id.to_le_bytes());
                let (code, text) = match outcome {
                    Outcome::Ok(t) => (0u8, t),
                    Outcome::Dead(t) => (1u8, t),
                };
                out.push(code);
                out.extend_from_slice(text);
                TYPE_ANSWERED
            }
            Record::Attempt {
                id,
                attempts,
                reason,
            } => {
                out.extend_from_slice(&id.to_le_bytes());
                out.extend_from_slice(&attempts.to_le_bytes());
                out.extend_from_slice(reason);
                TYPE_ATTEMPT
            }
            Record::Requeued { id } => {
                out.extend_from_slice(&id.to_le_bytes());
                TYPE_REQUEUED
            }
        };
        let body_start = start + RECORD_HEADER_LEN as usize;
        let mut crc = crc32fast::Hasher::new();
        crc.update(&[ty]);
        crc.update(&out[body_start..]);
        out[start + 4] = ty;
        out[start + 5..body_start].copy_from_slice(&crc.finalize().to_le_bytes());
        Ok(())
    }

    /// Parses a body of type `ty`; `None` when the type is unknown or the body too short.
    fn decode(ty: u8, body: &[u8]) -> Option<Record<'_>> {
        let id = u64::from_le_bytes(body.get(..8)?.try_into().ok()?);
        let u32_at = |at: usize| -> Option<u32> {
            Some(u32::from_le_bytes(body.get(at..at + 4)?.try_into().ok()?))
        };
        match ty {
            TYPE_SUBMITTED => {
                let attempts = u32_at(8)?;
                let key_len = u32_at(12)?;
                let (key, rest) = if key_len == NO_KEY {
                    (None, &body[16..])
                } else {
                    let end = 16usize.checked_add(key_len as usize)?;
                    (Some(body.get(16..end)?), &body[end..])
                };
                Some(Record::Submitted {
                    id,
                    attempts,
                    key,
                    payload: rest,
                })
            }
            TYPE_ANSWERED => {
                let outcome = match *body.get(8)? {
                    0 => Outcome::Ok(&body[9..]),
                    1 => Outcome::Dead(&body[9..]),
                    _ => return None,
                };
                Some(Record::Answered { id, outcome })
            }
            TYPE_ATTEMPT => Some(Record::Attempt {
                id,
                attempts: u32_at(8)?,
                reason: &body[12..],
            }),
            TYPE_REQUEUED if body.len() == 8 => Some(Record::Requeued { id }),
            _ => None,
        }
    }
}

/// The bytes of a payload inside a segment file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Loc {
    segment: u64,
    offset: u64,
    len: u64,
}

/// A live job as the store's index keeps it: its payload stays on disk.
#[derive(Clone, Debug)]
struct Entry {
    attempts: u32,
    key: Option<Vec<u8>>,
    state: JobState,
    payload: Loc,
}

/// A record's effect on the index.
#[derive(Clone, Debug)]
enum Op {
    Submit {
        id: u64,
        entry: Entry,
    },
    Done {
        id: u64,
    },
    Dead {
        id: u64,
        reason: Vec<u8>,
    },
    Attempt {
        id: u64,
        attempts: u32,
        reason: Vec<u8>,
    },
    Requeue {
        id: u64,
    },
}

impl Op {
    /// The effect of `rec`, which starts at `start` in segment `segment`.
    fn of(rec: &Record<'_>, segment: u64, start: u64) -> Op {
        match *rec {
            Record::Submitted {
                id,
                attempts,
                key,
                payload,
            } => Op::Submit {
                id,
                entry: Entry {
                    attempts,
                    key: key.map(<[u8]>::to_vec),
                    state: JobState::Pending { last_reason: None },
                    payload: Loc {
                        segment,
                        offset: start + Record::payload_offset(key),
                        len: payload.len() as u64,
                    },
                },
            },
            Record::Answered {
                id,
                outcome: Outcome::Ok(_),
            } => Op::Done { id },
            Record::Answered {
                id,
                outcome: Outcome::Dead(reason),
            } => Op::Dead {
                id,
                reason: reason.to_vec(),
            },
            Record::Attempt {
                id,
                attempts,
                reason,
            } => Op::Attempt {
                id,
                attempts,
                reason: reason.to_vec(),
            },
            Record::Requeued { id } => Op::Requeue { id },
        }
    }

    fn apply(self, index: &mut BTreeMap<u64, Entry>) {
        match self {
            Op::Submit { id, entry } => {
                index.insert(id, entry);
            }
            Op::Done { id } => {
                index.remove(&id);
            }
            Op::Dead { id, reason } => {
                if let Some(e) = index.get_mut(&id) {
                    e.state = JobState::Dead { reason };
                }
            }
            Op::Attempt {
                id,
                attempts,
                reason,
            } => {
                if let Some(e) = index.get_mut(&id) {
                    if let JobState::Pending { last_reason } = &mut e.state {
                        e.attempts = attempts;
                        *last_reason = Some(reason);
                    }
                }
            }
            Op::Requeue { id } => {
                if let Some(e) = index.get_mut(&id) {
                    if matches!(e.state, JobState::Dead { .. }) {
                        e.attempts = 0;
                        e.state = JobState::Pending { last_reason: None };
                    }
                }
            }
        }
    }
}

/// The header of a segment made when `next_id` is the next id to give.
pub fn segment_header(next_id: u64) -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    h[..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[12..20].copy_from_slice(&next_id.to_le_bytes());
    let crc = crc32fast::hash(&h[..20]);
    h[20..24].copy_from_slice(&crc.to_le_bytes());
    h
}

/// The file name of segment `seq`.
pub fn segment_name(seq: u64) -> String {
    format!("{seq:06}.log")
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".log")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// What replaying one segment found.
struct Scan {
    header_next_id: u64,
    /// Where the intact records end.
    end: u64,
    file_len: u64,
    /// Offset of a bad record, and how many bytes up to the last non-zero one it skips.
    torn: Option<(u64, u64)>,
}

/// Reads the segment at `path`, calling `each` with every intact record and its start.
fn scan_segment(path: &Path, mut each: impl FnMut(Record<'_>, u64)) -> Result<Scan> {
    let read_err = io_err("read", path);
    let mut file = File::open(path).map_err(io_err("open", path))?;
    let file_len = file.metadata().map_err(io_err("stat", path))?.len();
    let bad = |why| Error::BadHeader {
        path: path.to_path_buf(),
        why,
    };
    let mut header = [0u8; HEADER_LEN as usize];
    let have = (file_len.min(HEADER_LEN)) as usize;
    file.read_exact(&mut header[..have]).map_err(read_err)?;
    if have < 8 || header[..8] != MAGIC {
        return Err(bad("it does not start with the magic bytes PLUMQLOG"));
    }
    if have < 12 {
        return Err(bad("the header is cut short"));
    }
    let version = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"));
    if version > FORMAT_VERSION {
        return Err(Error::NewerVersion {
            path: path.to_path_buf(),
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    if version == 0 {
        return Err(bad("format version 0 does not exist"));
    }
    if have < HEADER_LEN as usize {
        return Err(bad("the header is cut short"));
    }
    let crc = u32::from_le_bytes(header[20..24].try_into().expect("4 bytes"));
    if crc32fast::hash(&header[..20]) != crc {
        return Err(bad("the header checksum does not match"));
    }
    let header_next_id = u64::from_le_bytes(header[12..20].try_into().expect("8 bytes"));
    if header_next_id == u64::MAX {
        // As for records: the job given this id would have no id after it.
        return Err(bad("the header's next job id is out of range"));
    }

    let mut reader = io::BufReader::with_capacity(64 << 10, file);
    let mut off = HEADER_LEN;
    let mut body = Vec::new();
    loop {
        if off == file_len {
            break;
        }
        let left = file_len - off;
        if left < RECORD_HEADER_LEN {
            break;
        }
        let mut rh = [0u8; RECORD_HEADER_LEN as usize];
        reader.read_exact(&mut rh).map_err(io_err("read", path))?;
        let len = u64::from(u32::from_le_bytes(rh[..4].try_into().expect("4 bytes")));
        let ty = rh[4];
        let crc = u32::from_le_bytes(rh[5..9].try_into().expect("4 bytes"));
        if len > left - RECORD_HEADER_LEN {
            break;
        }
        body.resize(len as usize, 0);
        reader.read_exact(&mut body).map_err(io_err("read", path))?;
        let mut h = crc32fast::Hasher::new();
        h.update(&[ty]);
        h.update(&body);
        if h.finalize() != crc {
            break;
        }
        let Some(rec) = Record::decode(ty, &body) else {
            break;
        };
        // No job has the last id (the one after it could not be given): a record naming it is
        // corrupt, its CRC matched by chance or by design.
        let (Record::Submitted { id, .. }
        | Record::Answered { id, .. }
        | Record::Attempt { id, .. }
        | Record::Requeued { id }) = rec;
        if id == u64::MAX {
            break;
        }
        each(rec, off);
        off += RECORD_HEADER_LEN + len;
    }
    // `off` is the end of the intact records: the rest is either the zeros of the reserved
    // space or a torn or corrupt tail.
    let mut torn = None;
    if off < file_len {
        let mut chunk = vec![0u8; 64 << 10];
        let mut at = off;
        let mut last_nonzero = None;
        // Only the parts of the file that hold data need reading: where the file system can
        // tell (SEEK_DATA), the reserved space of a fresh segment is skipped, not read.
        // Positional reads: the SEEK_DATA and SEEK_HOLE probes move the file's offset.
        let file = reader.get_ref();
        'regions: loop {
            match data_at(file, at) {
                Some(next) if next >= file_len => break,
                Some(next) if next > at => at = next,
                _ => {}
            }
            let end = data_from(file, at, file_len);
            let end = if end > at { end } else { file_len };
            while at < end {
                let want = chunk.len().min((end - at) as usize);
                let n = file
                    .read_at(&mut chunk[..want], at)
                    .map_err(io_err("read", path))?;
                if n == 0 {
                    break 'regions;
                }
                if let Some(i) = chunk[..n].iter().rposition(|&b| b != 0) {
                    last_nonzero = Some(at + i as u64);
                }
                at += n as u64;
            }
            if at >= file_len {
                break;
            }
        }
        if let Some(last) = last_nonzero {
            torn = Some((off, last + 1 - off));
        }
    }
    Ok(Scan {
        header_next_id,
        end: off,
        file_len,
        torn,
    })
}

/// The first offset at or after `at` that holds data (SEEK_DATA), `None` when the file
/// system cannot say; the end of the file when only a hole follows.
fn data_at(file: &File, at: u64) -> Option<u64> {
    use std::os::fd::AsRawFd;
    let at = i64::try_from(at).ok()?;
    match nix::unistd::lseek(file.as_raw_fd(), at, nix::unistd::Whence::SeekData) {
        Ok(pos) => u64::try_from(pos).ok(),
        Err(nix::errno::Errno::ENXIO) => Some(u64::MAX),
        Err(_) => None,
    }
}

/// Where the data that `at` is in ends (SEEK_HOLE), capped at `len`; `len` when the file
/// system cannot say.
fn data_from(file: &File, at: u64, len: u64) -> u64 {
    use std::os::fd::AsRawFd;
    let Ok(pos) = i64::try_from(at) else {
        return len;
    };
    match nix::unistd::lseek(file.as_raw_fd(), pos, nix::unistd::Whence::SeekHole) {
        Ok(end) => u64::try_from(end).map_or(len, |e| e.min(len)),
        Err(_) => len,
    }
}

/// Makes segment `seq` in `dir` with `content` after its header, reserving `reserve_len`
/// bytes, through a `.tmp` name (see the module docs for the order).
fn create_segment(
    dir: &Path,
    seq: u64,
    next_id: u64,
    reserve_len: u64,
    content: impl FnOnce(&File, &Path) -> Result<u64>,
) -> Result<(File, PathBuf, u64)> {
    let path = dir.join(segment_name(seq));
    let tmp = dir.join(format!("{}.tmp", segment_name(seq)));
    let made = (|| {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err("create", &tmp))?;
        file.write_all_at(&segment_header(next_id), 0)
            .map_err(io_err("write", &tmp))?;
        let end = content(&file, &tmp)?;
        reserve(&file, reserve_len.max(end)).map_err(io_err("reserve space for", &tmp))?;
        file.sync_all().map_err(io_err("sync", &tmp))?;
        fs::rename(&tmp, &path).map_err(io_err("rename", &tmp))?;
        Ok((file, end))
    })();
    match made {
        Ok((file, end)) => {
            sync_dir(dir).map_err(io_err("sync", dir))?;
            Ok((file, path, end))
        }
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// The segment being appended to.
struct Segment {
    seq: u64,
    path: PathBuf,
    file: File,
    /// The file length its reservation gave it.
    reserved: u64,
}

/// An open queue store. See the module docs.
pub struct Store {
    dir: PathBuf,
    opts: Options,
    /// Older segments, oldest first.
    old: Vec<(u64, PathBuf)>,
    cur: Segment,
    /// Bytes of the current segment handed to the kernel, and how many of them are synced.
    written: u64,
    synced: u64,
    /// Encoded records not written yet; they go at `written`.
    buf: Vec<u8>,
    /// The effects of the records past `synced`, with their end positions, in order.
    pending: Vec<(Pos, Op)>,
    /// The live jobs as the synced records leave them.
    index: BTreeMap<u64, Entry>,
    next_id: u64,
    /// A write or sync failed: nothing is appended until `truncate_to`.
    failed: bool,
}

impl Store {
    /// Opens the store in `dir`, making the folder if needed, and replays it. The tail of the
    /// last segment after its intact records is cut off before this returns.
    pub fn open(dir: &Path, opts: Options) -> Result<(Store, Recovered)> {
        if !dir.is_dir() {
            fs::create_dir_all(dir).map_err(io_err("create", dir))?;
            if let Some(parent) = dir.parent() {
                sync_dir(parent).map_err(io_err("sync", parent))?;
            }
        }
        let mut warnings = Vec::new();
        let mut segments = Vec::new();
        for entry in fs::read_dir(dir).map_err(io_err("list", dir))? {
            let entry = entry.map_err(io_err("list", dir))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.ends_with(".log.tmp") {
                let path = entry.path();
                fs::remove_file(&path).map_err(io_err("remove", &path))?;
                warnings.push(format!(
                    "removed {name}, a segment whose making was interrupted"
                ));
            } else if let Some(seq) = parse_segment_name(name) {
                segments.push((seq, entry.path()));
            }
        }
        segments.sort();

        let mut index = BTreeMap::new();
        let mut payloads: HashMap<u64, Vec<u8>> = HashMap::new();
        let mut next_id = 1u64;
        let mut last = None;
        for (seq, path) in &segments {
            let scan = scan_segment(path, |rec, start| {
                match rec {
                    Record::Submitted { id, payload, .. } => {
                        next_id = next_id.max(id.saturating_add(1));
                        payloads.insert(id, payload.to_vec());
                    }
                    Record::Answered {
                        id,
                        outcome: Outcome::Ok(_),
                    } => {
                        payloads.remove(&id);
                    }
                    _ => {}
                }
                Op::of(&rec, *seq, start).apply(&mut index);
            })?;
            next_id = next_id.max(scan.header_next_id);
            if let Some((offset, skipped)) = scan.torn {
                warnings.push(format!(
                    "segment {}: torn or corrupt record at offset {offset}, {skipped} bytes \
                     skipped",
                    segment_name(*seq)
                ));
            }
            last = Some((*seq, path.clone(), scan));
        }

        let (cur, written) = match last {
            Some((seq, path, scan)) => {
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)
                    .map_err(io_err("open", &path))?;
                let mut reserved = scan.file_len;
                if scan.torn.is_some() {
                    // Cut the bad tail off, keep the reservation, and make the cut durable
                    // before anything is appended after it.
                    file.set_len(scan.end).map_err(io_err("truncate", &path))?;
                    if reserve(&file, scan.file_len).is_err() {
                        reserved = scan.end;
                    }
                    file.sync_all().map_err(io_err("sync", &path))?;
                }
                (
                    Segment {
                        seq,
                        path,
                        file,
                        reserved,
                    },
                    scan.end,
                )
            }
            None => {
                let (file, path, end) =
                    create_segment(dir, 1, next_id, opts.segment_size, |_, _| Ok(HEADER_LEN))?;
                (
                    Segment {
                        seq: 1,
                        path,
                        file,
                        reserved: opts.segment_size.max(end),
                    },
                    end,
                )
            }
        };
        let old = segments
            .into_iter()
            .filter(|(seq, _)| *seq != cur.seq)
            .collect();

        let jobs = index
            .iter()
            .map(|(&id, e)| RecoveredJob {
                id,
                attempts: e.attempts,
                key: e.key.clone(),
                payload: payloads.remove(&id).unwrap_or_default(),
                state: e.state.clone(),
            })
            .collect();
        let store = Store {
            dir: dir.to_path_buf(),
            opts,
            old,
            cur,
            written,
            synced: written,
            buf: Vec::new(),
            pending: Vec::new(),
            index,
            next_id,
            failed: false,
        };
        Ok((
            store,
            Recovered {
                jobs,
                next_id,
                warnings,
            },
        ))
    }

    /// Records a submitted job. Returns the position its record ends at: the submission may be
    /// acknowledged once [`Store::synced`] reaches it.
    pub fn append_submitted(
        &mut self,
        id: u64,
        attempts: u32,
        key: Option<&[u8]>,
        payload: &[u8],
    ) -> Result<Pos> {
        let pos = self.append(Record::Submitted {
            id,
            attempts,
            key,
            payload,
        })?;
        self.next_id = self.next_id.max(id.saturating_add(1));
        Ok(pos)
    }

    /// Records a job's answer: done (it leaves the queue) or dead-lettered.
    pub fn append_answered(&mut self, id: u64, outcome: Outcome<'_>) -> Result<Pos> {
        self.append(Record::Answered { id, outcome })
    }

    /// Records a failed attempt: the job stays pending with `attempts` and `reason`.
    pub fn append_attempt(&mut self, id: u64, attempts: u32, reason: &[u8]) -> Result<Pos> {
        self.append(Record::Attempt {
            id,
            attempts,
            reason,
        })
    }

    /// Records that a dead job is pending again, its attempts back to 0.
    pub fn append_requeued(&mut self, id: u64) -> Result<Pos> {
        self.append(Record::Requeued { id })
    }

    fn append(&mut self, rec: Record<'_>) -> Result<Pos> {
        if self.failed {
            return Err(self.needs_truncate_error());
        }
        let len = RECORD_HEADER_LEN + rec.body_len();
        let end = self.written + self.buf.len() as u64;
        if end > HEADER_LEN && end + len > self.opts.segment_size {
            self.rotate()?;
        }
        let start = self.written + self.buf.len() as u64;
        rec.encode(&mut self.buf)?;
        let pos = Pos {
            segment: self.cur.seq,
            offset: start + len,
        };
        self.pending.push((pos, Op::of(&rec, self.cur.seq, start)));
        Ok(pos)
    }

    /// Moves to a new, empty segment, syncing the current one first.
    ///
    /// The new segment is made (and its space reserved) before the current one is synced:
    /// when the disk is full, the append that needed it fails with nothing more synced, so
    /// the caller can still cut the log back to what was synced before (the earlier records
    /// of a refused batch with it) instead of finding them stored after a restart.
    fn rotate(&mut self) -> Result<()> {
        let seq = self.cur.seq + 1;
        let (file, path, end) = create_segment(
            &self.dir,
            seq,
            self.next_id,
            self.opts.segment_size,
            |_, _| Ok(HEADER_LEN),
        )?;
        if let Err(e) = self.sync() {
            // Unused: remove it (if that fails too, the next rotation replaces it; an empty
            // segment left by a crash replays as nothing).
            let _ = fs::remove_file(&path);
            return Err(e);
        }
        let old = std::mem::replace(
            &mut self.cur,
            Segment {
                seq,
                path,
                file,
                reserved: self.opts.segment_size.max(end),
            },
        );
        self.old.push((old.seq, old.path));
        self.written = end;
        self.synced = end;
        Ok(())
    }

    fn needs_truncate_error(&self) -> Error {
        Error::NeedsTruncate {
            dir: self.dir.clone(),
        }
    }

    /// Writes the buffered records into the current segment (no sync). Returns how far the
    /// segment is written. On error the store refuses appends until [`Store::truncate_to`].
    pub fn flush(&mut self) -> Result<Pos> {
        if self.failed {
            return Err(self.needs_truncate_error());
        }
        if !self.buf.is_empty() {
            if let Err(e) = self.cur.file.write_all_at(&self.buf, self.written) {
                self.failed = true;
                return Err(Error::Io {
                    action: "write",
                    path: self.cur.path.clone(),
                    source: e,
                });
            }
            self.written += self.buf.len() as u64;
            self.buf.clear();
        }
        Ok(self.written())
    }

    /// Writes and fdatasyncs the current segment. Returns the position now synced. On error
    /// the store refuses appends until [`Store::truncate_to`].
    pub fn sync(&mut self) -> Result<Pos> {
        let pos = self.flush()?;
        if self.synced < self.written {
            if let Err(e) = self.cur.file.sync_data() {
                self.failed = true;
                return Err(Error::Io {
                    action: "sync",
                    path: self.cur.path.clone(),
                    source: e,
                });
            }
        }
        self.mark_synced(pos);
        Ok(pos)
    }

    /// Takes note that the current segment was synced up to `pos` by someone else (a syncer
    /// process calling fdatasync on its own descriptor after [`Store::flush`] returned `pos`).
    /// A position of another segment, or past what is written, is ignored or capped.
    pub fn mark_synced(&mut self, pos: Pos) {
        if self.failed || pos.segment != self.cur.seq {
            return;
        }
        let offset = pos.offset.min(self.written);
        if offset <= self.synced {
            return;
        }
        self.synced = offset;
        let done = self
            .pending
            .iter()
            .take_while(|(p, _)| p.offset <= offset)
            .count();
        for (_, op) in self.pending.drain(..done) {
            op.apply(&mut self.index);
        }
    }

    /// Cuts the current segment back to `offset`, which must lie between the synced and the
    /// written offsets (after a failed write or sync: [`Store::synced`]). The buffered and cut
    /// records are forgotten; their submissions must not be acknowledged. Appends work again
    /// once this succeeds.
    pub fn truncate_to(&mut self, offset: u64) -> Result<()> {
        if offset < self.synced || offset > self.written {
            return Err(Error::BadTruncate {
                path: self.cur.path.clone(),
                offset,
                synced: self.synced,
                written: self.written,
            });
        }
        self.buf.clear();
        self.pending.retain(|(p, _)| p.offset <= offset);
        let path = &self.cur.path;
        self.cur
            .file
            .set_len(offset)
            .map_err(io_err("truncate", path))?;
        self.written = offset;
        // The cut bytes read as zeros again; without the reservation the log still ends
        // cleanly at `offset`, later writes just extend the file.
        if reserve(&self.cur.file, self.cur.reserved).is_err() {
            self.cur.reserved = offset;
        }
        self.cur.file.sync_data().map_err(io_err("sync", path))?;
        self.failed = false;
        Ok(())
    }

    /// Rewrites the live jobs into a new segment and deletes the older ones (see the module
    /// docs for the order that makes a crash at any point harmless). Syncs first.
    pub fn compact(&mut self) -> Result<CompactStats> {
        self.sync()?;
        let bytes_before = self.disk_bytes();
        let seq = self.cur.seq + 1;
        let mut moved = Vec::with_capacity(self.index.len());
        let index = &self.index;
        let cur = &self.cur;
        let dir = &self.dir;
        let (file, path, end) = create_segment(
            dir,
            seq,
            self.next_id,
            self.opts.segment_size,
            |out, out_path| {
                let mut sources: HashMap<u64, File> = HashMap::new();
                let mut buf = Vec::new();
                let mut payload = Vec::new();
                let mut at = HEADER_LEN;
                for (&id, e) in index {
                    let loc = e.payload;
                    let src_path = dir.join(segment_name(loc.segment));
                    let src = if loc.segment == cur.seq {
                        &cur.file
                    } else {
                        match sources.entry(loc.segment) {
                            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                            std::collections::hash_map::Entry::Vacant(v) => {
                                v.insert(File::open(&src_path).map_err(io_err("open", &src_path))?)
                            }
                        }
                    };
                    payload.resize(loc.len as usize, 0);
                    src.read_exact_at(&mut payload, loc.offset)
                        .map_err(io_err("read", &src_path))?;
                    let start = at + buf.len() as u64;
                    let key = e.key.as_deref();
                    Record::Submitted {
                        id,
                        attempts: e.attempts,
                        key,
                        payload: &payload,
                    }
                    .encode(&mut buf)?;
                    moved.push((
                        id,
                        Loc {
                            segment: seq,
                            offset: start + Record::payload_offset(key),
                            len: loc.len,
                        },
                    ));
                    match &e.state {
                        JobState::Dead { reason } => Record::Answered {
                            id,
                            outcome: Outcome::Dead(reason),
                        }
                        .encode(&mut buf)?,
                        JobState::Pending {
                            last_reason: Some(reason),
                        } => Record::Attempt {
                            id,
                            attempts: e.attempts,
                            reason,
                        }
                        .encode(&mut buf)?,
                        JobState::Pending { last_reason: None } => {}
                    }
                    if buf.len() >= 1 << 20 {
                        out.write_all_at(&buf, at)
                            .map_err(io_err("write", out_path))?;
                        at += buf.len() as u64;
                        buf.clear();
                    }
                }
                out.write_all_at(&buf, at)
                    .map_err(io_err("write", out_path))?;
                Ok(at + buf.len() as u64)
            },
        )?;
        let jobs = moved.len();
        for (id, loc) in moved {
            if let Some(e) = self.index.get_mut(&id) {
                e.payload = loc;
            }
        }
        let old_cur = std::mem::replace(
            &mut self.cur,
            Segment {
                seq,
                path,
                file,
                reserved: self.opts.segment_size.max(end),
            },
        );
        self.old.push((old_cur.seq, old_cur.path));
        self.written = end;
        self.synced = end;
        // Oldest first: a job's `answered` record outlives its `submitted` record.
        let mut removed = 0;
        let old = std::mem::take(&mut self.old);
        let mut kept = Vec::new();
        let mut first_err = None;
        for (s, p) in old {
            if first_err.is_some() {
                kept.push((s, p));
                continue;
            }
            match fs::remove_file(&p) {
                Ok(()) => removed += 1,
                Err(e) => {
                    first_err = Some(Error::Io {
                        action: "remove",
                        path: p.clone(),
                        source: e,
                    });
                    kept.push((s, p));
                }
            }
        }
        self.old = kept;
        sync_dir(&self.dir).map_err(io_err("sync", &self.dir))?;
        if let Some(e) = first_err {
            return Err(e);
        }
        Ok(CompactStats {
            jobs,
            segments_removed: removed,
            bytes_before,
            bytes_after: self.disk_bytes(),
        })
    }

    /// Total length of the segment files.
    pub fn disk_bytes(&self) -> u64 {
        self.old
            .iter()
            .map(|(_, p)| p.as_path())
            .chain(std::iter::once(self.cur.path.as_path()))
            .filter_map(|p| fs::metadata(p).ok())
            .map(|m| m.len())
            .sum()
    }

    /// How many segment files the store has.
    pub fn segments(&self) -> usize {
        self.old.len() + 1
    }

    /// The number of live jobs (pending or dead) that synced records leave.
    pub fn live_jobs(&self) -> usize {
        self.index.len()
    }

    /// How many bytes the live jobs' records take in a compacted segment (its header not
    /// counted): what a compaction would keep. Walks the live jobs.
    pub fn live_bytes(&self) -> u64 {
        self.index
            .values()
            .map(|e| {
                let submitted = Record::payload_offset(e.key.as_deref()) + e.payload.len;
                let state = match &e.state {
                    JobState::Dead { reason } => RECORD_HEADER_LEN + 9 + reason.len() as u64,
                    JobState::Pending {
                        last_reason: Some(reason),
                    } => RECORD_HEADER_LEN + 12 + reason.len() as u64,
                    JobState::Pending { last_reason: None } => 0,
                };
                submitted + state
            })
            .sum()
    }

    /// The file appended to now: a syncer process opens or is given this file.
    pub fn current_segment_path(&self) -> &Path {
        &self.cur.path
    }

    /// How far the log is written (handed to the kernel).
    pub fn written(&self) -> Pos {
        Pos {
            segment: self.cur.seq,
            offset: self.written,
        }
    }

    /// How far the log is synced: every record ending at or before this is durable.
    pub fn synced(&self) -> Pos {
        Pos {
            segment: self.cur.seq,
            offset: self.synced,
        }
    }

    /// The id after the highest one recorded (or recovered).
    pub fn next_id(&self) -> u64 {
        self.next_id
    }

    /// Whether a write or sync failed and [`Store::truncate_to`] must run before appending.
    pub fn needs_truncate(&self) -> bool {
        self.failed
    }

    /// The folder of the store.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One append, as the tests script them.
    #[derive(Clone, Debug)]
    enum Step {
        Submit(u64, u32, Option<&'static [u8]>, &'static [u8]),
        Ok(u64, &'static [u8]),
        Dead(u64, &'static [u8]),
        Attempt(u64, u32, &'static [u8]),
        Requeue(u64),
    }

    fn append(store: &mut Store, step: &Step) -> Pos {
        match *step {
            Step::Submit(id, attempts, key, payload) => {
                store.append_submitted(id, attempts, key, payload)
            }
            Step::Ok(id, result) => store.append_answered(id, Outcome::Ok(result)),
            Step::Dead(id, reason) => store.append_answered(id, Outcome::Dead(reason)),
            Step::Attempt(id, attempts, reason) => store.append_attempt(id, attempts, reason),
            Step::Requeue(id) => store.append_requeued(id),
        }
        .expect("append")
    }

    /// What replaying `steps` must give, written independently of the store's code.
    fn model(steps: &[Step]) -> Vec<RecoveredJob> {
        let mut jobs: BTreeMap<u64, RecoveredJob> = BTreeMap::new();
        for step in steps {
            match *step {
                Step::Submit(id, attempts, key, payload) => {
                    jobs.insert(
                        id,
                        RecoveredJob {
                            id,
                            attempts,
                            key: key.map(<[u8]>::to_vec),
                            payload: payload.to_vec(),
                            state: JobState::Pending { last_reason: None },
                        },
                    );
                }
                Step::Ok(id, _) => {
                    jobs.remove(&id);
                }
                Step::Dead(id, reason) => {
                    if let Some(j) = jobs.get_mut(&id) {
                        j.state = JobState::Dead {
                            reason: reason.to_vec(),
                        };
                    }
                }
                Step::Attempt(id, attempts, reason) => {
                    if let Some(j) = jobs.get_mut(&id) {
                        j.attempts = attempts;
                        j.state = JobState::Pending {
                            last_reason: Some(reason.to_vec()),
                        };
                    }
                }
                Step::Requeue(id) => {
                    if let Some(j) = jobs.get_mut(&id) {
                        j.attempts = 0;
                        j.state = JobState::Pending { last_reason: None };
                    }
                }
            }
        }
        jobs.into_values().collect()
    }

    fn script() -> Vec<Step> {
        vec![
            Step::Submit(1, 0, None, b"first job"),
            Step::Submit(2, 0, Some(b"user-42"), b"second\0binary\xff"),
            Step::Attempt(1, 1, b"exit 3"),
            Step::Submit(3, 2, None, b""),
            Step::Ok(2, b"result text"),
            Step::Dead(3, b"bad input"),
            Step::Submit(4, 0, Some(b""), b"four"),
            Step::Requeue(3),
            Step::Dead(4, b"timeout"),
        ]
    }

    fn small() -> Options {
        Options { segment_size: 4096 }
    }

    /// Writes `steps` into a fresh store in `dir`, synced; returns each record's end.
    fn write_log(dir: &Path, steps: &[Step]) -> Vec<Pos> {
        let (mut store, rec) = Store::open(dir, small()).unwrap();
        assert_eq!(
            rec,
            Recovered {
                next_id: 1,
                ..Recovered::default()
            }
        );
        let ends = steps.iter().map(|s| append(&mut store, s)).collect();
        store.sync().unwrap();
        ends
    }

    #[test]
    fn every_record_kind_encodes_and_decodes_back() {
        let recs = [
            Record::Submitted {
                id: u64::MAX,
                attempts: 7,
                key: Some(b"k"),
                payload: b"p\n\0",
            },
            Record::Submitted {
                id: 0,
                attempts: 0,
                key: None,
                payload: b"",
            },
            Record::Answered {
                id: 5,
                outcome: Outcome::Ok(b"r"),
            },
            Record::Answered {
                id: 5,
                outcome: Outcome::Dead(b""),
            },
            Record::Attempt {
                id: 9,
                attempts: u32::MAX,
                reason: b"why",
            },
            Record::Requeued { id: 12 },
        ];
        for rec in recs {
            let mut buf = Vec::new();
            rec.encode(&mut buf).unwrap();
            assert_eq!(buf.len() as u64, RECORD_HEADER_LEN + rec.body_len());
            let len = u32::from_le_bytes(buf[..4].try_into().unwrap()) as usize;
            assert_eq!(len + 9, buf.len());
            let crc = u32::from_le_bytes(buf[5..9].try_into().unwrap());
            assert_eq!(crc, crc32fast::hash(&[&buf[4..5], &buf[9..]].concat()));
            assert_eq!(Record::decode(buf[4], &buf[9..]), Some(rec));
        }
    }

    #[test]
    fn every_record_kind_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let steps = script();
        write_log(dir.path(), &steps);
        let (store, rec) = Store::open(dir.path(), small()).unwrap();
        assert_eq!(rec.warnings, Vec::<String>::new());
        assert_eq!(rec.next_id, 5);
        assert_eq!(rec.jobs, model(&steps));
        // The model agrees with what the script means, spelled out.
        let states: Vec<_> = rec
            .jobs
            .iter()
            .map(|j| (j.id, j.attempts, &j.state))
            .collect();
        assert_eq!(
            states,
            [
                (
                    1,
                    1,
                    &JobState::Pending {
                        last_reason: Some(b"exit 3".to_vec())
                    }
                ),
                (3, 0, &JobState::Pending { last_reason: None }),
                (
                    4,
                    0,
                    &JobState::Dead {
                        reason: b"timeout".to_vec()
                    }
                ),
            ]
        );
        assert_eq!(rec.jobs[2].key.as_deref(), Some(&b""[..]));
        assert_eq!(store.live_jobs(), 3);
    }

    /// Every cut of a log (what a SIGKILL or a power loss can leave) recovers exactly the
    /// records wholly before the cut, warns when the cut is inside a record, and appends after
    /// the cut cleanly. Both shapes of a cut file: shortened, and kept at its reserved length
    /// with zeros after the cut.
    #[test]
    fn a_cut_at_every_offset_keeps_exactly_the_whole_records_before_it() {
        let src = tempfile::tempdir().unwrap();
        let steps = script();
        let ends = write_log(src.path(), &steps);
        let seg = src.path().join(segment_name(1));
        let full = fs::read(&seg).unwrap();
        let end = ends.last().unwrap().offset as usize;
        assert!(
            full[end..].iter().all(|&b| b == 0),
            "reserved space reads as zeros"
        );
        let starts: Vec<u64> = std::iter::once(HEADER_LEN)
            .chain(ends.iter().map(|p| p.offset))
            .collect();

        for cut in 0..=end {
            for padded in [false, true] {
                let dir = tempfile::tempdir().unwrap();
                let mut bytes = full[..cut].to_vec();
                if padded {
                    bytes.resize(full.len(), 0);
                }
                fs::write(dir.path().join(segment_name(1)), &bytes).unwrap();
                let opened = Store::open(dir.path(), small());
                if (cut as u64) < HEADER_LEN {
                    // A .log file always has a whole header (it is renamed into place after
                    // its fsync): a shorter one is damage, and refused.
                    assert!(
                        matches!(opened, Err(Error::BadHeader { .. })),
                        "cut {cut}: {:?}",
                        opened.map(|(_, r)| r)
                    );
                    continue;
                }
                let (mut store, rec) = opened.unwrap();
                // Whole records: those whose bytes are all there. A zero-padded cut can
                // restore a record whose missing bytes were zeros anyway.
                let whole = ends
                    .iter()
                    .take_while(|p| {
                        bytes.get(..p.offset as usize) == Some(&full[..p.offset as usize])
                    })
                    .count();
                assert!(whole >= ends.iter().filter(|p| p.offset as usize <= cut).count());
                assert_eq!(
                    rec.jobs,
                    model(&steps[..whole]),
                    "cut {cut} padded {padded}"
                );
                let tail_start = starts[whole] as usize;
                let tail = &bytes[tail_start.min(bytes.len())..];
                if tail.iter().any(|&b| b != 0) {
                    let last = tail_start + tail.iter().rposition(|&b| b != 0).unwrap() + 1;
                    assert_eq!(
                        rec.warnings,
                        [format!(
                            "segment 000001.log: torn or corrupt record at offset {tail_start}, \
                             {} bytes skipped",
                            last - tail_start
                        )],
                        "cut {cut} padded {padded}"
                    );
                } else {
                    assert_eq!(rec.warnings, Vec::<String>::new(), "cut {cut}");
                }
                if padded {
                    continue;
                }
                // What is appended now lands right after the intact records.
                let extra = Step::Submit(100, 0, None, b"after the cut");
                let pos = append(&mut store, &extra);
                assert_eq!(pos.offset, starts[whole] + 9 + 16 + 13);
                store.sync().unwrap();
                drop(store);
                let (_, rec) = Store::open(dir.path(), small()).unwrap();
                assert_eq!(rec.warnings, Vec::<String>::new(), "cut {cut} reopened");
                let mut expect = steps[..whole].to_vec();
                expect.push(extra);
                assert_eq!(rec.jobs, model(&expect), "cut {cut} reopened");
            }
        }
    }

    /// A flipped byte inside a record: reported at that record's offset, the records before it
    /// kept. No resync is attempted, so the intact records after it in the segment are not
    /// replayed (see the module docs); the log is cut there and stays usable.
    #[test]
    fn a_flipped_byte_is_reported_and_the_records_before_it_survive() {
        let dir = tempfile::tempdir().unwrap();
        let steps = script();
        let ends = write_log(dir.path(), &steps);
        let seg = dir.path().join(segment_name(1));
        let mut bytes = fs::read(&seg).unwrap();
        let bad_start = ends[3].offset;
        let bad_end = ends[4].offset;
        let middle = ((bad_start + bad_end) / 2) as usize;
        bytes[middle] ^= 0x20;
        fs::write(&seg, &bytes).unwrap();

        let (mut store, rec) = Store::open(dir.path(), small()).unwrap();
        let last = ends.last().unwrap().offset;
        assert_eq!(
            rec.warnings,
            [format!(
                "segment 000001.log: torn or corrupt record at offset {bad_start}, {} bytes \
                 skipped",
                last - bad_start
            )]
        );
        assert_eq!(rec.jobs, model(&steps[..4]));
        assert_eq!(store.written().offset, bad_start);
        append(&mut store, &Step::Ok(1, b""));
        store.sync().unwrap();
        drop(store);
        let (_, rec) = Store::open(dir.path(), small()).unwrap();
        assert_eq!(rec.warnings, Vec::<String>::new());
        let mut expect = steps[..4].to_vec();
        expect.push(Step::Ok(1, b""));
        assert_eq!(rec.jobs, model(&expect));
    }

    #[test]
    fn a_newer_format_is_refused_naming_the_file_and_versions() {
        let dir = tempfile::tempdir().unwrap();
        let mut header = segment_header(1);
        header[8..12].copy_from_slice(&2u32.to_le_bytes());
        // A newer version may lay out the rest of its header differently: only the magic
        // and the version are read.
        header[20] ^= 0xff;
        let seg = dir.path().join(segment_name(3));
        fs::write(&seg, header).unwrap();
        let err = Store::open(dir.path(), small()).err().expect("refused");
        assert!(
            matches!(
                err,
                Error::NewerVersion {
                    found: 2,
                    supported: 1,
                    ..
                }
            ),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains(&seg.display().to_string()), "{msg}");
        assert!(
            msg.contains("version 2") && msg.contains("version 1"),
            "{msg}"
        );
        // Nothing was touched.
        assert_eq!(fs::read(&seg).unwrap(), header);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_foreign_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("000001.log"),
            b"not a plumule queue segment",
        )
        .unwrap();
        let err = Store::open(dir.path(), small()).err().expect("refused");
        assert!(matches!(err, Error::BadHeader { .. }), "{err:?}");
    }

    #[test]
    fn compaction_keeps_exactly_the_live_jobs_and_frees_space() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, _) = Store::open(dir.path(), small()).unwrap();
        static PAYLOAD: [u8; 100] = [7u8; 100];
        let mut steps = Vec::new();
        for id in 1..=120u64 {
            steps.push(Step::Submit(id, 0, None, &PAYLOAD));
            match id % 12 {
                0 => steps.push(Step::Dead(id, b"dead")),
                5 => steps.push(Step::Attempt(id, 2, b"failed twice")),
                7 => {}
                _ => steps.push(Step::Ok(id, b"")),
            }
        }
        for s in &steps {
            append(&mut store, s);
        }
        store.sync().unwrap();
        let expected = model(&steps);
        assert_eq!(expected.len(), 30);
        assert!(store.segments() > 3, "{} segments", store.segments());

        // Keep the segments as a crash right after the rename would leave them.
        let before: Vec<(PathBuf, Vec<u8>)> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .map(|p| (p.clone(), fs::read(&p).unwrap()))
            .collect();
        let segments_before = store.segments();
        let stats = store.compact().unwrap();
        assert_eq!(stats.jobs, 30);
        assert_eq!(stats.segments_removed, segments_before);
        assert!(stats.bytes_after < stats.bytes_before, "{stats:?}");
        assert_eq!(store.segments(), 1);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        assert_eq!(store.disk_bytes(), stats.bytes_after);
        assert_eq!(store.written().offset, HEADER_LEN + store.live_bytes());

        // Appends go on in the compacted segment, and a second compaction reads its payloads.
        store.append_answered(7, Outcome::Ok(b"")).unwrap();
        store.sync().unwrap();
        let stats = store.compact().unwrap();
        assert_eq!(stats.jobs, 29);
        drop(store);
        let mut expected_after = steps.clone();
        expected_after.push(Step::Ok(7, b""));
        let (_, rec) = Store::open(dir.path(), small()).unwrap();
        assert_eq!(rec.warnings, Vec::<String>::new());
        assert_eq!(rec.jobs, model(&expected_after));
        assert_eq!(rec.next_id, 121);

        // A crash after the first compaction's rename, before any old segment was deleted,
        // and one that left a half-made segment behind: the same jobs.
        let crash = tempfile::tempdir().unwrap();
        for (p, bytes) in &before {
            fs::write(crash.path().join(p.file_name().unwrap()), bytes).unwrap();
        }
        let (mut store, _) = Store::open(crash.path(), small()).unwrap();
        store.compact().unwrap();
        let compacted = store.current_segment_path().to_path_buf();
        drop(store);
        for (p, bytes) in &before {
            fs::write(crash.path().join(p.file_name().unwrap()), bytes).unwrap();
        }
        fs::write(crash.path().join("999999.log.tmp"), b"half").unwrap();
        assert!(compacted.exists());
        let (_, rec) = Store::open(crash.path(), small()).unwrap();
        assert_eq!(rec.jobs, expected);
        assert_eq!(
            rec.warnings,
            ["removed 999999.log.tmp, a segment whose making was interrupted"]
        );
        // Oldest deleted first, the crash in the middle of the deletions: the same jobs.
        let mut names: Vec<_> = before.iter().map(|(p, _)| p.clone()).collect();
        names.sort();
        fs::remove_file(crash.path().join(names[0].file_name().unwrap())).unwrap();
        let (_, rec) = Store::open(crash.path(), small()).unwrap();
        assert_eq!(rec.jobs, expected);
    }

    #[test]
    fn truncate_to_forgets_what_was_not_synced() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, _) = Store::open(dir.path(), small()).unwrap();
        store.append_submitted(1, 0, None, b"kept").unwrap();
        let synced = store.sync().unwrap();
        assert_eq!(store.synced(), synced);
        let lost = store
            .append_submitted(2, 0, None, b"written, never synced")
            .unwrap();
        assert_eq!(store.flush().unwrap(), lost);
        assert!(store.synced() < lost);
        let err = store.truncate_to(synced.offset - 1).unwrap_err();
        assert!(matches!(err, Error::BadTruncate { .. }), "{err:?}");
        store.truncate_to(synced.offset).unwrap();
        assert_eq!(store.written(), synced);
        assert_eq!(store.live_jobs(), 1);
        store.append_submitted(3, 0, None, b"after").unwrap();
        store.sync().unwrap();
        drop(store);
        let (_, rec) = Store::open(dir.path(), small()).unwrap();
        assert_eq!(rec.warnings, Vec::<String>::new());
        let ids: Vec<u64> = rec.jobs.iter().map(|j| j.id).collect();
        assert_eq!(ids, [1, 3]);
    }

    /// The sync done elsewhere: another descriptor of the current segment, fdatasync, then
    /// mark_synced.
    #[test]
    fn a_sync_by_another_descriptor_counts() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, _) = Store::open(dir.path(), small()).unwrap();
        let pos = store.append_submitted(1, 0, Some(b"k"), b"job").unwrap();
        assert_eq!(
            store.live_jobs(),
            0,
            "the index follows synced records only"
        );
        let written = store.flush().unwrap();
        assert_eq!(written, pos);
        let syncer = File::open(store.current_segment_path()).unwrap();
        syncer.sync_data().unwrap();
        store.mark_synced(written);
        assert_eq!(store.synced(), pos);
        assert_eq!(store.live_jobs(), 1);
        // A stale or foreign answer changes nothing.
        store.mark_synced(Pos {
            segment: pos.segment + 1,
            offset: u64::MAX,
        });
        assert_eq!(store.synced(), pos);
    }

    #[test]
    fn records_larger_than_a_segment_get_their_own() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, _) = Store::open(dir.path(), small()).unwrap();
        let big = vec![b'x'; 10_000];
        let a = store.append_submitted(1, 0, None, &big).unwrap();
        let b = store.append_submitted(2, 0, None, b"small").unwrap();
        let c = store.append_submitted(3, 0, None, &big).unwrap();
        assert_eq!((a.segment, b.segment, c.segment), (1, 2, 3));
        store.sync().unwrap();
        drop(store);
        let (_, rec) = Store::open(dir.path(), small()).unwrap();
        assert_eq!(rec.jobs.len(), 3);
        assert_eq!(rec.jobs[2].payload, big);
    }

    /// The check of the `queue_recovery` fuzz target, on mutations of a real log: opening
    /// never panics, and a store that opened reopens with the same jobs and no warning.
    #[test]
    fn mutated_logs_open_or_fail_cleanly_and_recovery_is_complete() {
        let src = tempfile::tempdir().unwrap();
        let ends = write_log(src.path(), &script());
        let log = fs::read(src.path().join(segment_name(1))).unwrap();
        let log = &log[..ends.last().unwrap().offset as usize];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..300 {
            let mut bytes = log.to_vec();
            for _ in 0..1 + next() % 4 {
                let at = (next() % bytes.len() as u64) as usize;
                match next() % 3 {
                    0 => bytes[at] = next() as u8,
                    1 => bytes.truncate(at.max(1)),
                    _ => bytes
                        .splice(at..at, (0..next() % 9).map(|_| next() as u8))
                        .for_each(drop),
                }
            }
            let dir = tempfile::tempdir().unwrap();
            fs::write(dir.path().join(segment_name(1)), &bytes).unwrap();
            if let Ok((store, first)) = Store::open(dir.path(), small()) {
                drop(store);
                let (_, second) = Store::open(dir.path(), small()).unwrap();
                assert_eq!(first.jobs, second.jobs, "round {round}");
                assert_eq!(second.warnings, Vec::<String>::new(), "round {round}");
            }
        }
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
            match out {
                Ok(o) if o.status.success() => Some(Tmpfs(dir)),
                other => {
                    let why = match other {
                        Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
                        Err(e) => e.to_string(),
                    };
                    assert!(
                        std::env::var_os("CI").is_none(),
                        "CI must be able to mount a tmpfs for the full-disk test: {why}"
                    );
                    eprintln!("SKIPPED: full-disk test needs to mount a tmpfs: {why}");
                    None
                }
            }
        }
    }

    impl Drop for Tmpfs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg(self.0.path())
                .status();
        }
    }

    #[test]
    fn a_full_disk_fails_the_append_loses_nothing_and_passes() {
        let Some(fs_) = Tmpfs::mount() else { return };
        let root = fs_.0.path();
        let filler = root.join("filler");
        fs::write(&filler, vec![1u8; 600 << 10]).unwrap();
        let dir = root.join("queues").join("q");
        let opts = Options {
            segment_size: 64 << 10,
        };
        let (mut store, _) = Store::open(&dir, opts.clone()).unwrap();
        let small_payload = vec![b's'; 10 << 10];
        let big_payload = vec![b'b'; 100 << 10];
        let mut synced_ids = Vec::new();
        let mut failure = None;
        for id in 1..200u64 {
            let payload = if id % 3 == 0 {
                &big_payload
            } else {
                &small_payload
            };
            let res = store
                .append_submitted(id, 0, None, payload)
                .and_then(|_| store.sync());
            match res {
                Ok(_) => synced_ids.push(id),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        let err = failure.expect("a 1 MiB file system fills up");
        let Error::Io { source, .. } = &err else {
            panic!("{err:?}")
        };
        assert_eq!(source.raw_os_error(), Some(libc::ENOSPC), "{err}");
        assert!(!synced_ids.is_empty());
        // Cut back whatever a failed write left, as the queue would. A failure at the making
        // of a new segment wrote nothing and leaves the store usable as it is.
        if store.needs_truncate() {
            assert!(matches!(
                store.append_requeued(1),
                Err(Error::NeedsTruncate { .. })
            ));
            let synced = store.synced().offset;
            store.truncate_to(synced).unwrap();
        }
        assert!(!store.needs_truncate());
        drop(store);
        let (mut store, rec) = Store::open(&dir, opts.clone()).unwrap();
        let ids: Vec<u64> = rec.jobs.iter().map(|j| j.id).collect();
        assert_eq!(ids, synced_ids);

        // Space frees up: the store takes jobs again, the old ones still there.
        fs::remove_file(&filler).unwrap();
        store.append_submitted(500, 0, None, &big_payload).unwrap();
        store.sync().unwrap();
        drop(store);
        let (_, rec) = Store::open(&dir, opts).unwrap();
        let ids: Vec<u64> = rec.jobs.iter().map(|j| j.id).collect();
        let mut expect = synced_ids.clone();
        expect.push(500);
        assert_eq!(ids, expect);
        assert_eq!(rec.warnings, Vec::<String>::new());
    }

    /// Found by `fuzz/fuzz_targets/queue_recovery.rs`: a record for job `u64::MAX` (its CRC
    /// intact) was recovered with `next_id` stuck at `u64::MAX`, so the next job submitted got
    /// the same id. A record with the last id, or a header whose next id is it, is corrupt.
    #[test]
    fn fuzz_regression_the_last_id_is_never_recovered() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, _) = Store::open(dir.path(), small()).unwrap();
        store.append_submitted(1, 0, None, b"one").unwrap();
        store
            .append_submitted(u64::MAX, 4, None, b"forged")
            .unwrap();
        store.sync().unwrap();
        drop(store);
        let (_, rec) = Store::open(dir.path(), small()).unwrap();
        assert_eq!(rec.jobs.iter().map(|j| j.id).collect::<Vec<_>>(), vec![1]);
        assert_eq!(rec.next_id, 2);
        assert_eq!(rec.warnings.len(), 1, "{:?}", rec.warnings);

        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(segment_name(1)), segment_header(u64::MAX)).unwrap();
        assert!(matches!(
            Store::open(dir.path(), small()),
            Err(Error::BadHeader { .. })
        ));
    }
}
