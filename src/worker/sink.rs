//! Where answers go: the output, and the reorder buffer that writes them in job order.
//!
//! Invariants:
//! - answers reach the output in the order the jobs were read, whatever order they are given
//!   in: an answer waits in `held` until every earlier job is answered;
//! - whatever is written is flushed before `answer` returns, so no buffer holds an answer back
//!   while the worker waits for its next job (with prefetch 1 that would deadlock the master);
//! - a write error is sticky: the output is broken for good, every later answer reports it.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

use super::{codec, Answer, Error, Protocol};

pub(super) struct Sink {
    protocol: Protocol,
    max_frame: usize,
    state: Mutex<State>,
    /// Notified whenever answers are written or the output breaks.
    written: Condvar,
    /// Jobs read from the input and decoded, not handed out yet (kept by the reading side).
    buffered: AtomicUsize,
}

struct State {
    output: Box<dyn Write + Send>,
    /// Jobs handed out so far; the next job read gets this sequence number.
    read: u64,
    /// Sequence number of the next answer to write.
    next: u64,
    /// Answers given ahead of an earlier job's, by sequence number.
    held: BTreeMap<u64, Answer>,
    /// The first write error, kept: once an answer is lost the stream cannot be trusted.
    broken: Option<(io::ErrorKind, String)>,
    /// The bytes being written, kept between answers (empty between calls).
    out: Vec<u8>,
    /// Threads blocked in [`Sink::wait_for_room`]: only then is `written` notified, since a
    /// notification is a system call even when nobody waits.
    waiting: usize,
}

impl State {
    fn broken_error(&self) -> Option<Error> {
        let (kind, message) = self.broken.as_ref()?;
        Some(Error::Write(io::Error::new(*kind, message.clone())))
    }
}

impl fmt::Debug for Sink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sink")
            .field("in_flight", &self.in_flight())
            .field("held", &self.held())
            .finish_non_exhaustive()
    }
}

impl Sink {
    pub(super) fn new(protocol: Protocol, max_frame: usize, output: Box<dyn Write + Send>) -> Sink {
        Sink {
            protocol,
            max_frame,
            state: Mutex::new(State {
                output,
                read: 0,
                next: 0,
                held: BTreeMap::new(),
                broken: None,
                out: Vec::new(),
                waiting: 0,
            }),
            written: Condvar::new(),
            buffered: AtomicUsize::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock happens only inside `Write` of the output; the state
        // itself is still consistent, so keep going rather than poison every later answer.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Gives the next job its sequence number.
    pub(super) fn next_seq(&self) -> u64 {
        let mut state = self.lock();
        state.read += 1;
        state.read - 1
    }

    /// Jobs handed out whose answers are not written yet.
    pub(super) fn in_flight(&self) -> usize {
        let state = self.lock();
        (state.read - state.next) as usize
    }

    /// Records how many jobs the reader has decoded and not handed out.
    pub(super) fn set_buffered(&self, jobs: usize) {
        self.buffered.store(jobs, Ordering::Relaxed);
    }

    /// Jobs taken from the input whose answers are not written yet: [`Sink::in_flight`] plus
    /// those decoded and not handed out.
    pub(super) fn held(&self) -> usize {
        self.in_flight() + self.buffered.load(Ordering::Relaxed)
    }

    /// The write error that broke the output, if any.
    pub(super) fn broken(&self) -> Option<Error> {
        self.lock().broken_error()
    }

    /// Blocks until fewer than `limit` jobs are in flight; fails if the output broke meanwhile.
    pub(super) fn wait_for_room(&self, limit: usize) -> Result<(), Error> {
        let mut state = self.lock();
        loop {
            if let Some(e) = state.broken_error() {
                return Err(e);
            }
            if ((state.read - state.next) as usize) < limit {
                return Ok(());
            }
            state.waiting += 1;
            state = self.written.wait(state).unwrap_or_else(|p| p.into_inner());
            state.waiting -= 1;
        }
    }

    /// Records the answer to job `seq` and writes, then flushes, every answer now in order.
    ///
    /// `Ok` means the answer is written, or held until the earlier jobs are answered.
    pub(super) fn answer(&self, seq: u64, answer: Answer) -> Result<(), Error> {
        self.answer_with(seq, |protocol, max_frame, out| match out {
            Some(out) => {
                codec::encode_answer(protocol, max_frame, &answer, out);
                None
            }
            None => Some(answer),
        })
    }

    /// [`Sink::answer`] of an `ok` with `result`: copied only when it has to wait for an
    /// earlier job's answer.
    pub(super) fn answer_ok(&self, seq: u64, result: &[u8]) -> Result<(), Error> {
        self.answer_with(seq, |protocol, max_frame, out| match out {
            Some(out) => {
                codec::encode_ok(protocol, max_frame, result, out);
                None
            }
            None => Some(Answer::Ok(result.to_vec())),
        })
    }

    /// Records the answer to job `seq`: `answer` either encodes it into the buffer it is
    /// given (when it is the next one due, the common case: no copy, no map), or, given
    /// `None`, returns it to be held. Then writes and flushes every answer now in order.
    fn answer_with(
        &self,
        seq: u64,
        answer: impl FnOnce(Protocol, usize, Option<&mut Vec<u8>>) -> Option<Answer>,
    ) -> Result<(), Error> {
        let mut guard = self.lock();
        let state = &mut *guard;
        if let Some(e) = state.broken_error() {
            return Err(e);
        }
        debug_assert!(
            seq >= state.next && seq < state.read,
            "answer to job {seq} out of range"
        );
        let mut out = std::mem::take(&mut state.out);
        if seq == state.next {
            answer(self.protocol, self.max_frame, Some(&mut out));
            state.next += 1;
        } else if let Some(held) = answer(self.protocol, self.max_frame, None) {
            state.held.insert(seq, held);
        }
        while !state.held.is_empty() {
            let Some(answer) = state.held.remove(&state.next) else {
                break;
            };
            codec::encode_answer(self.protocol, self.max_frame, &answer, &mut out);
            state.next += 1;
        }
        if out.is_empty() {
            state.out = out;
            return Ok(());
        }
        let result = state
            .output
            .write_all(&out)
            .and_then(|()| state.output.flush());
        if let Err(e) = result {
            state.broken = Some((e.kind(), e.to_string()));
        }
        out.clear();
        if out.capacity() <= 64 * 1024 {
            // Kept for the next answer; a big one's room is given back.
            state.out = out;
        }
        if state.waiting > 0 {
            self.written.notify_all();
        }
        match state.broken_error() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}
