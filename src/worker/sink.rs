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
            state = self.written.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Records the answer to job `seq` and writes, then flushes, every answer now in order.
    ///
    /// `Ok` means the answer is written, or held until the earlier jobs are answered.
    pub(super) fn answer(&self, seq: u64, answer: Answer) -> Result<(), Error> {
        let mut state = self.lock();
        if let Some(e) = state.broken_error() {
            return Err(e);
        }
        debug_assert!(
            seq >= state.next && seq < state.read,
            "answer to job {seq} out of range"
        );
        state.held.insert(seq, answer);
        let mut bytes = Vec::new();
        while let Some(answer) = {
            let next = state.next;
            state.held.remove(&next)
        } {
            codec::encode_answer(self.protocol, self.max_frame, &answer, &mut bytes);
            state.next += 1;
        }
        if bytes.is_empty() {
            return Ok(());
        }
        let result = state
            .output
            .write_all(&bytes)
            .and_then(|()| state.output.flush());
        if let Err(e) = result {
            state.broken = Some((e.kind(), e.to_string()));
        }
        self.written.notify_all();
        match state.broken_error() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}
