//! The library's services (SPEC §8): a Rust program that is the master of its own forked
//! workers, on the binary's engine.
//!
//! - [`ServiceManager`] (manager.rs): services are added with a worker count and options;
//!   `run` builds an in-memory config whose programs run a Rust function instead of a
//!   command, and runs the binary's [`Master`](crate::master::Master) with hooks: the same
//!   supervisor, slot state machine, backoff, stop timeout then SIGKILL, process groups,
//!   control socket.
//! - [`Service`] and [`Worker`] (worker.rs): what runs in each forked worker, and how a stop
//!   or a reload request reaches it.
//! - [`ServiceOptions`] (options.rs): the config file's program keys, as Rust values.
//!
//! Invariants: the master never runs service code (only hooks); a worker runs its service
//! in the forked child and never returns into the master's code (it `_exit`s); its signal
//! handling is plumule's ([`crate::sys::service`]), set up before the service is built.

#![deny(missing_docs)]

mod manager;
mod options;
mod worker;

pub use crate::config::{
    Backoff, Limit, LockSpec, OutputSpec, QueueProtocol, ReadyMode, RestartPolicy, Route,
    StartLimit,
};
pub use crate::slot::Exit;
pub use manager::{ManagerHandle, ServiceId, ServiceManager};
pub use options::{QueueOptions, ServiceOptions};
pub use worker::{JobsError, Request, Worker};

/// What a service's `run` may fail with: any error. The worker logs it and exits 1, and is
/// restarted with backoff like any crashed worker.
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// What a worker does after [`Service::reload`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Reload {
    /// The reload is done: [`Service::run`] is called again, in the same process.
    Resume,
    /// The worker runs [`Service::terminate`] and exits 0; the master starts a new one with
    /// the same id (with the default `restart = always`; after a run shorter than
    /// `healthy_after`, with backoff). The default.
    #[default]
    Restart,
}

/// The work of one worker of a service, built in the forked worker by the factory given to
/// [`ServiceManager::add`].
///
/// The three methods never run at the same time: [`Service::run`] is the body; a stop or
/// reload request makes it return (see [`Worker`] for how a busy body notices), then the
/// worker calls [`Service::terminate`] or [`Service::reload`].
///
/// | the worker…                         | then                                           |
/// |-------------------------------------|------------------------------------------------|
/// | is asked to stop                    | `run` returns, `terminate` runs, exit 0        |
/// | is asked to reload                  | `run` returns, `reload` runs; see [`Reload`]   |
/// | returns from `run` unasked          | waits for the next request (a queue consumer, whose jobs ended: `terminate`, exit 0) |
/// | returns an error from `run`         | exit 1, restarted with backoff                 |
/// | panics                              | exit 101 (SIGABRT under `panic = "abort"`), restarted with backoff |
/// | exits itself (`std::process::exit`) | the master sees that code, restart policy applies |
pub trait Service {
    /// The worker's body. Return when [`Worker::pending`] says a request waits (or use
    /// [`Worker::wait`] instead of sleeping).
    fn run(&mut self, worker: &Worker) -> Result<(), Error>;

    /// The worker was asked to stop (and `run` has returned): release what must be released.
    /// The worker exits 0 afterwards; it is killed if this takes longer than the service's
    /// `stop_timeout`. Does nothing by default.
    fn terminate(&mut self, worker: &Worker) {
        let _ = worker;
    }

    /// The worker was asked to reload (and `run` has returned). By default the worker exits
    /// and is started again with the same id ([`Reload::Restart`]).
    fn reload(&mut self, worker: &Worker) -> Reload {
        let _ = worker;
        Reload::Restart
    }
}
