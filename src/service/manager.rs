//! The master side: [`ServiceManager`] turns the services into programs of an in-memory
//! config, runs the same master as the binary with hooks of its own, and maps how it stopped
//! to an exit code.

use std::cell::RefCell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::options::{QueueOptions, ServiceOptions};
use super::worker::{Body, Worker};
use super::Service;
use crate::config::{Config, Function, MAX_WORKERS};
use crate::master::{Hooks, Master, Request, StopKind};
use crate::slot::Exit;

/// A service of a [`ServiceManager`], as [`ServiceManager::add`] returned it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ServiceId(usize);

type NewWorkerHook = Box<dyn FnMut(&str, u32, u32)>;
type DeadWorkerHook = Box<dyn FnMut(&str, u32, u32, Exit)>;
type Hook = Box<dyn FnMut()>;

/// What the manager and its handles share with the running master.
#[derive(Default)]
struct Shared {
    /// Service names by [`ServiceId`].
    names: Vec<String>,
    /// Asked for by handles, not yet taken by the master.
    requests: Vec<Request>,
    /// The signal that began the stop.
    stopped_by: Option<Signal>,
}

/// A handle on a [`ServiceManager`] for its hooks (which cannot borrow the manager): scale a
/// service or stop everything from inside a hook. Cheap to clone; it only lives on the
/// master's thread (it is neither `Send` nor `Sync`).
#[derive(Clone)]
pub struct ManagerHandle {
    shared: Rc<RefCell<Shared>>,
}

impl std::fmt::Debug for ManagerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManagerHandle").finish_non_exhaustive()
    }
}

impl ManagerHandle {
    /// Runs `workers` workers of the service from now on: what `plumule scale` does. New
    /// workers get the next ids; scaling down stops the highest ids.
    ///
    /// # Panics
    /// If `service` is not a service of this manager, or `workers` is above 10 000.
    pub fn reconfigure(&self, service: ServiceId, workers: u32) {
        assert!(
            workers <= MAX_WORKERS,
            "at most {MAX_WORKERS} workers per service"
        );
        let mut shared = self.shared.borrow_mut();
        let program = shared
            .names
            .get(service.0)
            .unwrap_or_else(|| panic!("{service:?} is not a service of this manager"))
            .clone();
        shared.requests.push(Request::Scale { program, workers });
    }

    /// Submits one job to `queue`: `job` as JSON, which the consumer's
    /// [`Worker::jobs`]`.typed()` reads back. Taken by the master at its next pass, as
    /// `plumule submit` would be; a refusal (no such queue, the queue full, a job above
    /// `max_frame`) is logged by the master. Before [`ServiceManager::run`], the jobs wait
    /// for the master to start.
    pub fn submit<T: serde::Serialize>(&self, queue: &str, job: &T) -> serde_json::Result<()> {
        let payload = serde_json::to_vec(job)?;
        self.submit_bytes(queue, payload);
        Ok(())
    }

    /// Submits one job whose payload is `payload` as it is.
    pub fn submit_bytes(&self, queue: &str, payload: impl Into<Vec<u8>>) {
        let mut shared = self.shared.borrow_mut();
        // Consecutive jobs for one queue go as one batch.
        if let Some(Request::Submit { queue: q, jobs }) = shared.requests.last_mut() {
            if q == queue {
                jobs.push(payload.into());
                return;
            }
        }
        shared.requests.push(Request::Submit {
            queue: queue.to_string(),
            jobs: vec![payload.into()],
        });
    }

    /// Stops every worker gracefully and ends [`ServiceManager::run`] with 0, as SIGTERM
    /// does (the terminate hooks run too).
    pub fn shutdown(&self) {
        self.shared.borrow_mut().requests.push(Request::Shutdown);
    }
}

struct Entry {
    name: String,
    options: ServiceOptions,
    function: Function,
}

/// Whether `name` is a valid program or queue name.
fn check_name(what: &str, name: &str) {
    assert!(
        valid_name(name),
        "invalid {what} name {name:?}: 1 to 64 of A-Z a-z 0-9 _ -"
    );
}

/// A program that is the master of its own forked workers, Cotyledon-style: services are
/// added with a worker count, then [`ServiceManager::run`] forks and supervises them with
/// the binary's engine (see the [crate-level docs](crate) for an example and what forking
/// means).
pub struct ServiceManager {
    services: Vec<Entry>,
    queues: Vec<(String, QueueOptions)>,
    new_worker: Vec<NewWorkerHook>,
    dead_worker: Vec<DeadWorkerHook>,
    reload: Vec<Hook>,
    terminate: Vec<Hook>,
    shared: Rc<RefCell<Shared>>,
    runtime_dir: Option<PathBuf>,
    lock_dir: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    shutdown_timeout: Duration,
    log_level: log::LevelFilter,
}

impl Default for ServiceManager {
    fn default() -> Self {
        ServiceManager::new()
    }
}

impl std::fmt::Debug for ServiceManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.services.iter().map(|s| s.name.as_str()).collect();
        f.debug_struct("ServiceManager")
            .field("services", &names)
            .field("runtime_dir", &self.runtime_dir)
            .finish_non_exhaustive()
    }
}

/// Whether `name` can name a program: `[A-Za-z0-9_-]{1,64}` (SPEC §9).
fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl ServiceManager {
    /// A manager with no service, a graceful stop of at most 30s, and a private runtime
    /// directory (see [`ServiceManager::runtime_dir`]).
    pub fn new() -> ServiceManager {
        ServiceManager {
            services: Vec::new(),
            queues: Vec::new(),
            new_worker: Vec::new(),
            dead_worker: Vec::new(),
            reload: Vec::new(),
            terminate: Vec::new(),
            shared: Rc::default(),
            runtime_dir: None,
            lock_dir: None,
            state_dir: None,
            shutdown_timeout: Duration::from_secs(30),
            log_level: log::LevelFilter::Info,
        }
    }

    /// Adds a service run by `workers` workers, with the default [`ServiceOptions`].
    /// `factory` builds the service inside each forked worker, from its [`Worker`].
    ///
    /// # Panics
    /// If `name` is not 1 to 64 of `A-Z a-z 0-9 _ -`, is taken, or `workers` is above 10 000.
    pub fn add<S, F>(&mut self, name: &str, workers: u32, factory: F) -> ServiceId
    where
        S: Service + 'static,
        F: Fn(&Worker) -> S + Send + Sync + 'static,
    {
        let options = ServiceOptions {
            workers,
            ..ServiceOptions::default()
        };
        self.add_with(name, options, factory)
    }

    /// Adds a service supervised as `options` say.
    ///
    /// # Panics
    /// As [`ServiceManager::add`].
    pub fn add_with<S, F>(&mut self, name: &str, options: ServiceOptions, factory: F) -> ServiceId
    where
        S: Service + 'static,
        F: Fn(&Worker) -> S + Send + Sync + 'static,
    {
        check_name("service", name);
        assert!(
            self.services.iter().all(|s| s.name != name),
            "a service named {name} was already added"
        );
        assert!(
            options.workers <= MAX_WORKERS,
            "at most {MAX_WORKERS} workers per service"
        );
        let body = Body {
            name: name.to_string(),
            consumer: options.queue.is_some(),
            stop_signal: options.stop_signal,
            reload_signal: options.reload_signal,
            make: Box::new(factory),
        };
        let function = Function(Arc::new(move |id, workers| body.serve(id, workers)));
        self.services.push(Entry {
            name: name.to_string(),
            options,
            function,
        });
        self.shared.borrow_mut().names.push(name.to_string());
        ServiceId(self.services.len() - 1)
    }

    /// Adds a job queue, which a service consumes by naming it in
    /// [`ServiceOptions::queue`] and the program feeds with [`ManagerHandle::submit`] (or
    /// `plumule submit` over the control socket). Jobs get the same acknowledgements, retries
    /// and dead letters as the binary's (SPEC §4).
    ///
    /// # Panics
    /// If `name` is not 1 to 64 of `A-Z a-z 0-9 _ -`, or a queue of that name was added.
    pub fn add_queue(&mut self, name: &str, options: QueueOptions) -> &mut Self {
        check_name("queue", name);
        assert!(
            self.queues.iter().all(|(n, _)| n != name),
            "a queue named {name} was already added"
        );
        self.queues.push((name.to_string(), options));
        self
    }

    /// Changes the number of workers `service` starts with. Once [`ServiceManager::run`] has
    /// begun, hooks scale with [`ManagerHandle::reconfigure`].
    ///
    /// # Panics
    /// As [`ManagerHandle::reconfigure`].
    pub fn reconfigure(&mut self, service: ServiceId, workers: u32) {
        assert!(
            workers <= MAX_WORKERS,
            "at most {MAX_WORKERS} workers per service"
        );
        let entry = self
            .services
            .get_mut(service.0)
            .unwrap_or_else(|| panic!("{service:?} is not a service of this manager"));
        entry.options.workers = workers;
    }

    /// A handle for hooks: [`ManagerHandle::reconfigure`] and [`ManagerHandle::shutdown`]
    /// while the manager runs.
    pub fn handle(&self) -> ManagerHandle {
        ManagerHandle {
            shared: Rc::clone(&self.shared),
        }
    }

    /// Called with the service's name, the worker's id and its pid each time a worker is
    /// forked (at start, after a restart, when scaling up).
    pub fn on_new_worker(&mut self, hook: impl FnMut(&str, u32, u32) + 'static) -> &mut Self {
        self.new_worker.push(Box::new(hook));
        self
    }

    /// Called with the service's name, the worker's id, its pid and how it ended, each time
    /// a worker has exited and was reaped (before it is restarted, if it is).
    pub fn on_dead_worker(
        &mut self,
        hook: impl FnMut(&str, u32, u32, Exit) + 'static,
    ) -> &mut Self {
        self.dead_worker.push(Box::new(hook));
        self
    }

    /// Called when the manager gets SIGHUP (or `plumule reload`), before the workers are
    /// sent their reload signal.
    pub fn on_reload(&mut self, hook: impl FnMut() + 'static) -> &mut Self {
        self.reload.push(Box::new(hook));
        self
    }

    /// Called when a graceful stop begins (SIGTERM, `plumule shutdown`,
    /// [`ManagerHandle::shutdown`]), before the workers are asked to stop. Not on SIGINT,
    /// which stops everything at once.
    pub fn on_terminate(&mut self, hook: impl FnMut() + 'static) -> &mut Self {
        self.terminate.push(Box::new(hook));
        self
    }

    /// Where the master keeps its pidfile, control socket (`control.sock`), notify socket,
    /// state and lock files. With a fixed directory, `plumule --socket DIR/control.sock
    /// status` (and `scale`, `logs`, `signal`, `shutdown`…) works against this manager, and a
    /// second manager on the same directory is refused. Default: a fresh directory
    /// `plumule-NAME-PID` (mode 0700, refused if another user owns it) under
    /// `$XDG_RUNTIME_DIR`, else the temp dir; removed at the end.
    pub fn runtime_dir(&mut self, dir: impl Into<PathBuf>) -> &mut Self {
        self.runtime_dir = Some(dir.into());
        self
    }

    /// Where named lock files live (default: `RUNTIME_DIR/locks`); share it with other
    /// masters to exclude across them.
    pub fn lock_dir(&mut self, dir: impl Into<PathBuf>) -> &mut Self {
        self.lock_dir = Some(dir.into());
        self
    }

    /// Where durable queues keep their jobs (default: `RUNTIME_DIR/state`, which goes with a
    /// private runtime directory: set this, or a fixed runtime directory, for jobs that
    /// outlive the program).
    pub fn state_dir(&mut self, dir: impl Into<PathBuf>) -> &mut Self {
        self.state_dir = Some(dir.into());
        self
    }

    /// The most a graceful stop may take, after which every worker left is killed (default
    /// 30s).
    pub fn shutdown_timeout(&mut self, timeout: Duration) -> &mut Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// The master's log level (default info; `RUST_LOG` wins). The master logs to stderr with
    /// `env_logger`, installed by `run` unless the program installed a logger first.
    pub fn log_level(&mut self, level: log::LevelFilter) -> &mut Self {
        self.log_level = level;
        self
    }

    /// Runs the master until it is stopped, and returns its exit code: 0 after a graceful
    /// stop (SIGTERM, `plumule shutdown`, [`ManagerHandle::shutdown`]), 1 after SIGINT or when
    /// the master cannot start (3 when another master owns the runtime directory). Never
    /// returns inside a worker. Use it as `std::process::exit(manager.run())`.
    ///
    /// It refuses to start (exit code 1) when the process already runs other threads: see
    /// the [crate-level docs](crate#forking-and-threads).
    pub fn run(self) -> i32 {
        match crate::sys::service::thread_count() {
            Ok(1) => {}
            Ok(n) => {
                eprintln!(
                    "plumule: cannot run the service manager: this process runs {n} threads; \
                     call ServiceManager::run before starting any thread"
                );
                return 1;
            }
            Err(e) => {
                eprintln!("plumule: cannot count the threads of this process: {e}");
                return 1;
            }
        }
        for s in &self.services {
            if let Some(q) = &s.options.queue {
                if self.queues.iter().all(|(n, _)| n != q) {
                    eprintln!(
                        "plumule: service {} consumes queue {q}, which was not added",
                        s.name
                    );
                    return 1;
                }
            }
        }
        // What print! left in the buffer would be written again by every worker.
        use std::io::Write;
        let _ = std::io::stdout().flush();
        crate::logging::init(self.log_level);

        let (runtime_dir, private) = match &self.runtime_dir {
            Some(dir) => (dir.clone(), false),
            None => (private_runtime_dir(), true),
        };
        if private {
            // Under the shared temp dir another user could have made it first.
            let euid = nix::unistd::geteuid().as_raw();
            if let Err(why) = crate::config::check_private_dir(&runtime_dir, euid) {
                log::error!("{why}");
                return 1;
            }
        }
        let mut programs: Vec<_> = self
            .services
            .iter()
            .map(|s| s.options.program(&s.name, s.function.clone()))
            .collect();
        programs.sort_by(|a, b| a.name.cmp(&b.name));
        let config = Config {
            path: std::env::current_exe().unwrap_or_else(|_| runtime_dir.join("library")),
            state_dir: self
                .state_dir
                .clone()
                .unwrap_or_else(|| runtime_dir.join("state")),
            lock_dir: self
                .lock_dir
                .clone()
                .unwrap_or_else(|| runtime_dir.join("locks")),
            runtime_dir: runtime_dir.clone(),
            control_group: None,
            metrics: None,
            shutdown_timeout: self.shutdown_timeout,
            log_level: self.log_level,
            node: crate::config::hostname(),
            cluster: None,
            programs,
            queues: {
                let mut queues: Vec<_> = self.queues.iter().map(|(n, o)| o.queue(n)).collect();
                queues.sort_by(|a, b| a.name.cmp(&b.name));
                queues
            },
        };
        let shared = Rc::clone(&self.shared);
        let hooks = LibraryHooks {
            new_worker: self.new_worker,
            dead_worker: self.dead_worker,
            reload: self.reload,
            terminate: self.terminate,
            shared: Rc::clone(&shared),
        };
        let result = Master::with_hooks(config, Box::new(hooks)).and_then(Master::run);
        if private {
            let _ = std::fs::remove_dir_all(&runtime_dir);
        }
        match result {
            Err(e) => {
                log::error!("{e}");
                e.exit_code()
            }
            Ok(()) if shared.borrow().stopped_by == Some(Signal::SIGINT) => 1,
            Ok(()) => 0,
        }
    }
}

/// `$XDG_RUNTIME_DIR/plumule-NAME-PID` (else under the temp dir), NAME the executable's.
fn private_runtime_dir() -> PathBuf {
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute() && p.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    let name = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "library".into());
    base.join(format!("plumule-{name}-{}", std::process::id()))
}

/// Runs one hook; a panic is logged and the master goes on.
fn guarded(kind: &str, hook: impl FnOnce()) {
    if let Err(panic) = catch_unwind(AssertUnwindSafe(hook)) {
        let why = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".into());
        log::error!("an {kind} hook panicked, ignoring: {why}");
    }
}

/// The manager's hooks, as the master calls them.
struct LibraryHooks {
    new_worker: Vec<NewWorkerHook>,
    dead_worker: Vec<DeadWorkerHook>,
    reload: Vec<Hook>,
    terminate: Vec<Hook>,
    shared: Rc<RefCell<Shared>>,
}

impl Hooks for LibraryHooks {
    fn spawned(&mut self, program: &str, id: u32, pid: Pid) {
        for hook in &mut self.new_worker {
            guarded("on_new_worker", || hook(program, id, pid.as_raw() as u32));
        }
    }

    fn exited(&mut self, program: &str, id: u32, pid: Pid, exit: Exit) {
        for hook in &mut self.dead_worker {
            guarded("on_dead_worker", || {
                hook(program, id, pid.as_raw() as u32, exit)
            });
        }
    }

    fn reload(&mut self) -> bool {
        for hook in &mut self.reload {
            guarded("on_reload", hook);
        }
        true
    }

    fn stopping(&mut self, signal: Signal) -> StopKind {
        self.shared.borrow_mut().stopped_by = Some(signal);
        if signal == Signal::SIGINT {
            return StopKind::Immediate;
        }
        for hook in &mut self.terminate {
            guarded("on_terminate", hook);
        }
        StopKind::Graceful
    }

    fn requests(&mut self) -> Vec<Request> {
        std::mem::take(&mut self.shared.borrow_mut().requests)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::Error;

    struct Idle;

    impl Service for Idle {
        fn run(&mut self, _: &Worker) -> Result<(), Error> {
            Ok(())
        }
    }

    #[test]
    fn names_follow_the_config_files_rule() {
        for (name, ok) in [
            ("web", true),
            ("a_b-C9", true),
            (&"x".repeat(64), true),
            (&"x".repeat(65), false),
            ("", false),
            ("web.1", false),
            ("a b", false),
        ] {
            assert_eq!(valid_name(name), ok, "{name:?}");
        }
    }

    #[test]
    #[should_panic(expected = "invalid service name")]
    fn a_service_name_with_a_dot_is_refused() {
        ServiceManager::new().add("web.1", 1, |_: &Worker| Idle);
    }

    #[test]
    #[should_panic(expected = "already added")]
    fn a_service_name_is_taken_once() {
        let mut m = ServiceManager::new();
        m.add("web", 1, |_: &Worker| Idle);
        m.add("web", 2, |_: &Worker| Idle);
    }

    #[test]
    fn reconfigure_before_run_sets_the_starting_count() {
        let mut m = ServiceManager::new();
        let a = m.add("a", 1, |_: &Worker| Idle);
        let b = m.add("b", 1, |_: &Worker| Idle);
        m.reconfigure(b, 5);
        assert_eq!(
            m.services
                .iter()
                .map(|s| s.options.workers)
                .collect::<Vec<_>>(),
            [1, 5]
        );
        // From a handle, it is a request for the running master.
        m.handle().reconfigure(a, 3);
        assert_eq!(
            m.shared.borrow().requests,
            [Request::Scale {
                program: "a".into(),
                workers: 3
            }]
        );
    }

    #[test]
    fn submitted_jobs_for_one_queue_go_as_one_batch() {
        let m = ServiceManager::new();
        let h = m.handle();
        h.submit("q", &1).unwrap();
        h.submit("q", &2).unwrap();
        h.submit_bytes("r", "x");
        h.submit("q", &3).unwrap();
        assert_eq!(
            m.shared.borrow().requests,
            [
                Request::Submit {
                    queue: "q".into(),
                    jobs: vec![b"1".to_vec(), b"2".to_vec()]
                },
                Request::Submit {
                    queue: "r".into(),
                    jobs: vec![b"x".to_vec()]
                },
                Request::Submit {
                    queue: "q".into(),
                    jobs: vec![b"3".to_vec()]
                },
            ]
        );
    }
}
