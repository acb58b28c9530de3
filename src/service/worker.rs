//! The worker side: what a service's body sees ([`Worker`]) and the life of a forked worker
//! (build the service, run it, answer stop and reload requests, exit).

use std::io::Write;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::Mutex;
use std::time::Duration;

use nix::sys::signal::Signal;

use super::{Reload, Service};
use crate::sys::service::Requests;

/// What a worker has been asked, by its master or by a signal sent to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Stop: the master stops this worker (a graceful stop of the manager, a scale-down, its
    /// stop signal sent by hand, or the master's death). [`Service::terminate`] runs once
    /// [`Service::run`] has returned, then the worker exits 0.
    Stop,
    /// Reload: SIGHUP to the manager (or the service's `reload_signal` sent to this worker).
    /// [`Service::reload`] runs once [`Service::run`] has returned.
    Reload,
}

impl From<crate::sys::service::Request> for Request {
    fn from(r: crate::sys::service::Request) -> Request {
        match r {
            crate::sys::service::Request::Stop => Request::Stop,
            crate::sys::service::Request::Reload => Request::Reload,
        }
    }
}

/// One worker of a service, as its body sees it: who it is, and whether it has been asked to
/// stop or reload.
///
/// # How a request reaches a busy body
///
/// The service's methods take `&mut self`, so nothing can run beside [`Service::run`] on the
/// service: a request is *delivered* to the body, which returns, and then the worker calls
/// [`Service::terminate`] or [`Service::reload`]. The signal handler behind it is plumule's
/// own (it only sets a flag and wakes a pipe); the service author writes no signal handling.
/// A body does one of these:
///
/// - checks [`Worker::stopping`] (or [`Worker::pending`]) between units of work;
/// - blocks in [`Worker::wait`] / [`Worker::wait_for_stop`] instead of sleeping;
/// - adds [`Worker::request_fd`] to its own `poll`/`epoll` set: it becomes readable when a
///   request comes.
///
/// A body that never looks is still stopped: the master sends SIGKILL after the service's
/// `stop_timeout`, as for any worker. A body that returns without being asked (its work
/// is done, or it handed the work to threads) leaves the worker waiting for its next request:
/// the process lives on until it is stopped, as in Cotyledon.
///
/// ```no_run
/// use std::time::Duration;
/// use plumule::{Service, Worker};
///
/// struct Poller;
///
/// impl Service for Poller {
///     fn run(&mut self, worker: &Worker) -> Result<(), plumule::service::Error> {
///         // Returns as soon as a stop or reload request comes, else every second.
///         while worker.wait(Duration::from_secs(1)).is_none() {
///             println!("{}.{}: polling", worker.name(), worker.id());
///         }
///         Ok(())
///     }
///
///     fn terminate(&mut self, worker: &Worker) {
///         println!("{}.{}: bye", worker.name(), worker.id());
///     }
/// }
/// ```
#[derive(Debug)]
pub struct Worker {
    name: String,
    id: u32,
    workers: u32,
    requests: Requests,
    /// A consumer's job and answer pipes, until [`Worker::jobs`] takes them.
    channel: Mutex<Option<(OwnedFd, OwnedFd)>>,
    consumer: bool,
}

/// Why [`Worker::jobs`] has no jobs to give.
#[derive(Debug, thiserror::Error)]
pub enum JobsError {
    /// The service consumes no queue ([`ServiceOptions::queue`](crate::ServiceOptions::queue)).
    #[error("this service consumes no queue")]
    NoQueue,
    /// [`Worker::jobs`] was called before in this worker.
    #[error("the jobs were already taken")]
    Taken,
    /// What the master said about the queue's protocol could not be understood.
    #[error(transparent)]
    Setup(#[from] crate::worker::Error),
}

impl Worker {
    /// The service's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// This worker's id, from 0 to `workers() - 1`: stable across restarts (a worker that
    /// is restarted gets the id of the one it replaces).
    pub fn id(&self) -> u32 {
        self.id
    }

    /// How many workers the service had when this one was started.
    pub fn workers(&self) -> u32 {
        self.workers
    }

    /// Whether this worker has been asked to stop. Once true it stays true.
    pub fn stopping(&self) -> bool {
        self.requests.stopping()
    }

    /// The request waiting for the body to return, if any: a stop before a reload.
    pub fn pending(&self) -> Option<Request> {
        self.requests.pending().map(Request::from)
    }

    /// Waits until a request comes (returning it) or `timeout` has passed (`None`). Use it
    /// where the body would sleep: it returns at once when a request is already waiting.
    pub fn wait(&self, timeout: Duration) -> Option<Request> {
        self.requests.wait(Some(timeout)).map(Request::from)
    }

    /// Waits up to `timeout` for the body to be asked to return: true when a request (a stop,
    /// or a reload, which also needs [`Service::run`] to return) is waiting, false when the
    /// time has passed without one.
    pub fn wait_for_stop(&self, timeout: Duration) -> bool {
        self.wait(timeout).is_some()
    }

    /// Tells the master this worker is ready, for a service with `ready = Notify` (see
    /// [`ServiceOptions::ready`](crate::ServiceOptions::ready)): until then it is `starting`,
    /// and `plumule start`/`scale` wait. Sends `READY=1` to plumule's notify socket, the
    /// worker's `$NOTIFY_SOCKET`; does nothing harmful when called again or without it.
    pub fn ready(&self) {
        crate::sys::notify::Notifier::from_env().send("READY=1");
    }

    /// The jobs of the queue the service consumes, once per worker: iterate over them (typed
    /// with [`Jobs::typed`](crate::worker::Jobs::typed), or answered by
    /// [`Jobs::serve`](crate::worker::Jobs::serve)) and answer each, as a worker of the
    /// binary does (see [`crate::worker`]). The jobs come on a pipe of the worker's own, not
    /// on stdin; stdout goes to the master's log, so a `println!` cannot corrupt the answers.
    ///
    /// The jobs end when the master asks the worker to finish (it closes the pipe, at a stop
    /// or a scale-down): `run` should then return, and the worker runs `terminate` and exits
    /// 0. A stop or reload request reaches a consumer between jobs: a body blocked waiting
    /// for the next job sees it when that job comes or the jobs end.
    ///
    /// The jobs are handed out once per worker: a service whose [`Service::reload`] returns
    /// [`Reload::Resume`] keeps them in itself for the next `run`: dropping them closes the
    /// pipes, and the worker gets no job after that.
    pub fn jobs(&self) -> Result<crate::worker::Jobs, JobsError> {
        if !self.consumer {
            return Err(JobsError::NoQueue);
        }
        let taken = self
            .channel
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let (jobs, answers) = taken.ok_or(JobsError::Taken)?;
        Ok(crate::worker::Builder::new()
            .io(std::fs::File::from(jobs), std::fs::File::from(answers))?)
    }

    /// A descriptor that becomes readable when a request comes, for a body that polls its
    /// own descriptors: check [`Worker::pending`] before polling it and when it is readable
    /// (it says what the request is). Do not read from it.
    pub fn request_fd(&self) -> BorrowedFd<'_> {
        self.requests.fd()
    }
}

/// How the forked child of a service runs; `make` builds the service from its worker.
pub(super) struct Body<S> {
    pub(super) name: String,
    /// Whether its service consumes a queue.
    pub(super) consumer: bool,
    pub(super) stop_signal: Signal,
    pub(super) reload_signal: Signal,
    pub(super) make: Box<dyn Fn(&Worker) -> S + Send + Sync>,
}

/// Exit code of a worker whose `run` returned an error.
pub(super) const ERROR_EXIT: i32 = 1;

impl<S: Service> Body<S> {
    /// The forked worker's whole life; returns its exit code.
    pub(super) fn serve(&self, id: u32, workers: u32) -> i32 {
        let tag = format!("{}.{id}", self.name);
        crate::sys::service::set_process_name(&tag);
        let requests = match Requests::install(self.stop_signal, self.reload_signal) {
            Ok(r) => r,
            Err(e) => {
                log::error!("{tag}: cannot install its signal handlers: {e}");
                return ERROR_EXIT;
            }
        };
        let channel = if self.consumer {
            match crate::sys::service::take_job_channel() {
                Ok(c) => Some(c),
                Err(e) => {
                    log::error!("{tag}: cannot set up its job channel: {e}");
                    return ERROR_EXIT;
                }
            }
        } else {
            None
        };
        let worker = Worker {
            name: self.name.clone(),
            id,
            workers,
            requests,
            channel: Mutex::new(channel),
            consumer: self.consumer,
        };
        let mut service = (self.make)(&worker);
        let code = loop {
            if let Err(e) = service.run(&worker) {
                log::error!("{tag}: {e}");
                break ERROR_EXIT;
            }
            // A consumer's body returns when its jobs end: the master asks it to finish.
            if self.consumer && worker.requests.pending().is_none() {
                service.terminate(&worker);
                break 0;
            }
            // Whether the body returned because of a request or not, the worker lives until
            // it is asked something.
            worker.requests.wait(None);
            match worker.requests.take() {
                Some(crate::sys::service::Request::Stop) | None => {
                    service.terminate(&worker);
                    break 0;
                }
                Some(crate::sys::service::Request::Reload) => match service.reload(&worker) {
                    Reload::Resume => continue,
                    Reload::Restart => {
                        service.terminate(&worker);
                        break 0;
                    }
                },
            }
        };
        // The child ends with _exit: nothing else would write out what is buffered.
        let _ = std::io::stdout().flush();
        code
    }
}
