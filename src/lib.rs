//! plumule: a multi-process daemon supervisor for Linux.
//!
//! The crate is layered so that decisions never perform effects:
//!
//! - [`config`]: the TOML file → a validated [`config::Config`];
//! - [`backoff`], [`slot`], [`plan`], [`diff`]: pure decisions (restart delays, the worker state
//!   machine, the actions that bring what runs in line with what should run, what a reload
//!   changes);
//! - [`launch`]: how a worker is started (executable, environment, credentials, locks);
//! - [`master`]: the single-threaded event loop over its subsystems, the only code that carries
//!   out actions;
//! - [`protocol`], [`control`], [`client`]: the control socket's typed messages, its server
//!   side, and the client commands;
//! - [`sys`]: every syscall wrapper and every `unsafe` block;
//! - [`output`], [`logging`], [`locks`], [`orphans`]: worker output, the master's log, named
//!   file locks, and the record of process groups that outlives a crashed master;
//! - [`worker`]: the library for queue workers written in Rust (jobs on stdin, answers on
//!   stdout, typed payloads, a thread pool that answers in order);
//! - [`service`]: the library for programs that are their own master ([`ServiceManager`],
//!   [`Service`], [`Worker`]), below;
//! - [`cluster`]: membership, cluster locks and key partitions through etcd (its helper
//!   process, its client, and the pure parts: lock recipe, lease arithmetic, rendezvous);
//! - [`cli`], [`manpage`]: the `plumule` command line and its man page.
//!
//! # A program that is its own master
//!
//! Like Python's Cotyledon, a Rust program can add services with a worker count and become
//! the master of its own forked workers. The master is the binary's, not a copy of it: the
//! same supervisor, worker states, restarts with backoff, stop signal then SIGKILL after the
//! stop timeout, process group per worker, parent-death signal, and (in the runtime
//! directory) the same control socket, so `plumule --socket DIR/control.sock status`,
//! `scale`, `logs`, `signal`, `reload` and `shutdown` work against it. Each worker is forked
//! without exec and runs the service's code; it shows as `NAME.ID` in `ps -o comm`, `top` and
//! `pgrep`.
//!
//! ```
//! use plumule::service::{Error, Exit, RestartPolicy};
//! use plumule::{Service, ServiceManager, ServiceOptions, Worker};
//!
//! /// Waits for work until it is asked to stop.
//! struct Greeter;
//!
//! impl Service for Greeter {
//!     fn run(&mut self, worker: &Worker) -> Result<(), Error> {
//!         println!("{}.{} of {}: ready", worker.name(), worker.id(), worker.workers());
//!         while !worker.wait_for_stop(std::time::Duration::from_millis(100)) {
//!             // a unit of work
//!         }
//!         Ok(())
//!     }
//!
//!     fn terminate(&mut self, worker: &Worker) {
//!         println!("{}.{}: bye", worker.name(), worker.id());
//!     }
//! }
//!
//! /// Does one job and ends.
//! struct Job;
//!
//! impl Service for Job {
//!     fn run(&mut self, _worker: &Worker) -> Result<(), Error> {
//!         println!("the sum is {}", (1..=100u32).sum::<u32>());
//!         std::process::exit(0)
//!     }
//! }
//!
//! let mut manager = ServiceManager::new();
//! manager.add("greeter", 2, |_: &Worker| Greeter);
//! let once = ServiceOptions {
//!     restart: RestartPolicy::Never,
//!     ..ServiceOptions::default()
//! };
//! manager.add_with("job", once, |_: &Worker| Job);
//! // A real program runs until SIGTERM; this one stops once the job is done.
//! let handle = manager.handle();
//! manager
//!     .on_new_worker(|name, id, pid| println!("{name}.{id} started as {pid}"))
//!     .on_dead_worker(move |name, _id, _pid, exit| {
//!         if name == "job" && exit == Exit::Code(0) {
//!             handle.shutdown();
//!         }
//!     });
//! // In a real program: std::process::exit(manager.run()).
//! assert_eq!(manager.run(), 0);
//! ```
//!
//! The signals of the manager: SIGTERM (or `plumule shutdown`) runs the
//! [`on_terminate`](ServiceManager::on_terminate) hooks, asks every worker to stop (its
//! [`Service::terminate`] runs, then it exits 0), kills what is left after each service's
//! `stop_timeout` and returns 0; SIGINT kills every worker at once and returns 1; SIGHUP runs
//! the [`on_reload`](ServiceManager::on_reload) hooks, then every worker's
//! [`Service::reload`]. When the master dies, every worker is asked to stop (SIGTERM, the
//! parent-death signal) and runs its `terminate`. How a request reaches a busy
//! [`Service::run`] is described at [`Worker`].
//!
//! ## Forking and threads
//!
//! A worker is a `fork` of the master that does not exec. What that means:
//!
//! - it starts as a copy of the master's memory, with only the thread that forked: what it
//!   changes, the master never sees, and the other way round. The factory given to
//!   [`ServiceManager::add`] runs in the worker, so each worker builds its own service;
//! - a lock another thread held at the moment of the fork (the allocator's, stdout's, any
//!   `Mutex`) stays locked forever in the child, whose first allocation may then hang. This
//!   cannot be detected afterwards, so [`ServiceManager::run`] **refuses** to start (exit code
//!   1, with a message) when the process runs other threads (it counts `/proc/self/task`)
//!   rather than warning: a warning would trade a clear error for rare hangs of workers.
//!   Start threads inside workers (in [`Service::run`]) or after `run` returns, never before;
//! - its descriptors are 0 (`/dev/null`), 1 and 2 (to the master's log, tagged `NAME.ID`) and
//!   its own request pipe: every descriptor of the master (other workers' pipes, the poll set,
//!   the pidfile and its lock, the sockets, files the program opened) is closed in the child;
//! - every signal disposition is reset to the default, then plumule installs its own handler
//!   for the stop and reload signals (SIGTERM, SIGHUP). Do not register SIGTERM or SIGHUP
//!   with signal-hook in a worker: its registry, copied from the master, believes a handler
//!   is installed and would install none;
//! - its environment is the one an exec'd worker gets: the master's, without what belongs
//!   to the master (systemd's `NOTIFY_SOCKET`, `LISTEN_*`), plus `PLUMULE_PROGRAM`,
//!   `PLUMULE_WORKER_ID`, `PLUMULE_WORKERS` and plumule's own `NOTIFY_SOCKET`;
//! - the master's values are never dropped in the worker (it ends with `_exit`): buffered
//!   output of the program's own writers is lost unless flushed; `run` flushes stdout before
//!   the first fork, and a worker flushes stdout before it exits.
//!
//! ## Panics
//!
//! A hook that panics is caught, logged, and the master goes on (the next hooks of that kind
//! run too). A service that panics ends its worker with exit code 101; the worker is restarted
//! with backoff like any crashed worker. Under `panic = "abort"` (which plumule's own release
//! profile sets for the binary; a program that uses the library decides in its own profile)
//! nothing is caught: a panicking hook aborts the master, whose workers then get SIGTERM and
//! run their `terminate`; a panicking service aborts its worker (SIGABRT), which is
//! restarted with backoff all the same.
//!
//! ## Typed jobs
//!
//! [`ServiceManager::add_queue`] adds a job queue, with the binary's acknowledgements,
//! retries, dead letters and durability (SPEC §4); a service consumes it when its
//! [`ServiceOptions::queue`] names it, and takes the jobs with [`Worker::jobs`] (typed through
//! serde_json, see [`worker`]). The program submits from the master's side with
//! [`ManagerHandle::submit`](service::ManagerHandle::submit), or anyone with `plumule submit`
//! over the control socket. `examples/producer_consumer.rs` shows both ends.
//!
//! ## Process titles
//!
//! Only the kernel's name of the process (`comm`) is set to `NAME.ID`: `ps -f` still shows
//! the program's command line. Rewriting `argv` in place would also change what
//! `std::env::args()` returns inside the worker (the standard library reads the original
//! `argv` memory on each call), so it is not done.

#![deny(unsafe_op_in_unsafe_fn)]

pub mod backoff;
pub mod cli;
pub mod client;
pub mod cluster;
pub mod config;
pub mod control;
pub mod diff;
pub mod launch;
pub mod locks;
pub mod logging;
pub mod manpage;
pub mod master;
pub mod orphans;
pub mod output;
pub mod plan;
pub mod protocol;
pub mod queue;
pub mod service;
pub mod slot;
pub mod sys;
#[cfg(test)]
mod test_support;
pub mod worker;

pub use service::{Service, ServiceId, ServiceManager, ServiceOptions, Worker};

/// Named file locks as RAII guards, the same lock files workers and `plumule lock` use.
pub use locks::{acquire as lock, LockGuard, Mode as LockMode, Wait as LockWait};

/// A duration as the config file writes it: "1m 30s", "250ms".
pub fn format_duration(d: std::time::Duration) -> String {
    if d.is_zero() {
        return "0s".to_string();
    }
    // Milliseconds are as fine as any of plumule's settings go.
    let ms = std::time::Duration::from_millis(d.as_millis() as u64);
    humantime::format_duration(if ms.is_zero() { d } else { ms }).to_string()
}
