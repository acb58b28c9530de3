//! A pool of threads that handles jobs side by side and still answers them in order.
//!
//! The reading thread (the caller of [`Pool::run`]) reads jobs and sends them through a bounded
//! crossbeam channel to the pool's threads; each answer goes to the shared output, whose reorder
//! buffer writes it once every earlier job is answered. The pool holds at most
//! `threads + backlog` jobs, counting the answered ones that wait for an earlier answer: past
//! that the reading thread stops reading, so a slow job cannot make the reorder buffer grow
//! without bound, and the master's jobs wait in the master's queue, not in this process.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{Answer, Error, Fail, Job, Jobs, Sink};

/// Threads that handle jobs side by side, fed through a bounded channel (the backlog).
///
/// ```no_run
/// use plumule::worker::{self, Answer, Pool};
///
/// let pool = Pool::new(4, 8);
/// pool.run(worker::jobs()?, |job| match job.as_str() {
///     Ok(text) => Answer::ok(text.to_uppercase()),
///     Err(_) => Answer::drop("not UTF-8"),
/// })?;
/// # Ok::<(), plumule::worker::Error>(())
/// ```
///
/// A handler that panics answers its job `fail "handler panicked"` and the thread goes on with
/// the next job; under `panic = "abort"` the whole worker aborts instead, and the master
/// redelivers what it held.
#[derive(Debug)]
pub struct Pool {
    threads: usize,
    backlog: usize,
    /// The output of the jobs being run, for [`Pool::in_flight`] and [`Pool::held`].
    running: Mutex<Option<Arc<Sink>>>,
}

impl Pool {
    /// A pool of `threads` threads with room for `backlog` jobs waiting for a thread.
    ///
    /// # Panics
    ///
    /// When `threads` is 0.
    pub fn new(threads: usize, backlog: usize) -> Pool {
        assert!(threads > 0, "a worker pool needs at least one thread");
        Pool {
            threads,
            backlog,
            running: Mutex::new(None),
        }
    }

    /// The number of threads.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Room for jobs waiting for a thread.
    pub fn backlog(&self) -> usize {
        self.backlog
    }

    /// The most jobs the pool holds at once: `threads + backlog`.
    pub fn capacity(&self) -> usize {
        self.threads + self.backlog
    }

    /// Jobs the pool holds: read, and not answered on the output yet (waiting in the backlog,
    /// being handled, or answered and waiting for an earlier job's answer). Never more than
    /// [`capacity`](Pool::capacity); 0 before the first [`run`](Pool::run).
    pub fn in_flight(&self) -> usize {
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        running.as_ref().map_or(0, |sink| sink.in_flight())
    }

    /// Jobs taken from the input and not answered yet: [`in_flight`](Pool::in_flight), plus
    /// those the reading thread has decoded from its last read and not handed to the pool yet
    /// (see [`Jobs::held`]). It stays at the last run's figure (0 after a clean end).
    pub fn held(&self) -> usize {
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        running.as_ref().map_or(0, |sink| sink.held())
    }

    /// Runs `handler` on the pool's threads for every job until end of input, and writes each
    /// answer it returns, in job order.
    ///
    /// Returns once every job read is answered and written: `Ok` at end of input, or the first
    /// read or write error (after the jobs already read are answered, when the output still
    /// works).
    pub fn run<F>(&self, mut jobs: Jobs, handler: F) -> Result<(), Error>
    where
        F: Fn(&Job) -> Answer + Sync,
    {
        let sink = Arc::clone(&jobs.sink);
        *self.running.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::clone(&sink));
        let (sender, receiver) = crossbeam_channel::bounded::<Job>(self.backlog);
        let read = std::thread::scope(|scope| {
            for i in 0..self.threads {
                let receiver = receiver.clone();
                let handler = &handler;
                std::thread::Builder::new()
                    .name(format!("plumule-pool-{i}"))
                    .spawn_scoped(scope, move || {
                        for job in receiver {
                            handle(handler, job);
                        }
                    })
                    .expect("cannot start a worker pool thread");
            }
            drop(receiver);
            let read = loop {
                if let Err(e) = jobs.wait_for_room(self.capacity()) {
                    break Err(e);
                }
                match jobs.next() {
                    None => break Ok(()),
                    Some(Err(e)) => break Err(e),
                    Some(Ok(job)) => {
                        // The receivers live until the sender is dropped below: send only
                        // fails if every thread is gone, and a thread outlives its panics.
                        if let Err(unsent) = sender.send(job) {
                            break handle_unsent(unsent.0);
                        }
                    }
                }
            };
            // End of input: the threads finish what the channel holds, then stop.
            drop(sender);
            read
        });
        read.and_then(|()| sink.broken().map_or(Ok(()), Err))
    }

    /// Runs a typed `handler` on the pool's threads, as [`Jobs::serve`] does on one: payloads
    /// are parsed as JSON into `T` (one that does not parse answers `drop "bad payload: …"`),
    /// results are answered as JSON.
    pub fn serve<T, R, F>(&self, jobs: Jobs, handler: F) -> Result<(), Error>
    where
        T: DeserializeOwned,
        R: Serialize,
        F: Fn(T) -> Result<R, Fail> + Sync,
    {
        self.run(jobs, |job| match job.json::<T>() {
            Ok(payload) => Answer::json_result(handler(payload)),
            Err(e) => Answer::Drop(format!("bad payload: {e}")),
        })
    }
}

/// Answers `job` with what `handler` returns, or `fail` when it panics.
fn handle<F: Fn(&Job) -> Answer>(handler: &F, job: Job) {
    let answer = catch_unwind(AssertUnwindSafe(|| handler(&job)))
        .unwrap_or_else(|_| Answer::Fail("handler panicked".to_string()));
    // A write error is sticky in the sink: the reading thread reports it and stops.
    let _ = job.answer(answer);
}

/// A job no thread took (they are all gone): answer it so that the output stays in step.
fn handle_unsent(job: Job) -> Result<(), Error> {
    job.answer(Answer::Fail(
        "the worker pool has no thread left".to_string(),
    ))
}
