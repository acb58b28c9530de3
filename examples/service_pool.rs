//! A pool of workers with hooks: three `printer` workers, each counting ticks until it is
//! asked to stop, and the master told of every start and exit.
//!
//! ```text
//! cargo run --example service_pool -- --exit-after 2s
//! ```
//!
//! Without `--exit-after` it runs until SIGTERM (graceful, exit 0) or SIGINT (at once, exit 1).
//! With it, a one-shot `clock` service ends after that long, and its exit stops the manager
//! from a hook. `--runtime-dir DIR` puts the control socket at `DIR/control.sock`, for
//! `plumule --socket DIR/control.sock status`.

use std::time::{Duration, Instant};

use plumule::service::{Error, Exit, Reload, RestartPolicy};
use plumule::{Service, ServiceManager, ServiceOptions, Worker};

/// Counts ticks; says how many when it stops.
struct Printer {
    ticks: u64,
}

impl Service for Printer {
    fn run(&mut self, worker: &Worker) -> Result<(), Error> {
        println!(
            "{}.{} of {}: running",
            worker.name(),
            worker.id(),
            worker.workers()
        );
        // `wait` instead of a sleep: returns at once when a stop or reload request comes.
        while worker.wait(Duration::from_millis(100)).is_none() {
            self.ticks += 1;
        }
        Ok(())
    }

    fn terminate(&mut self, worker: &Worker) {
        println!(
            "{}.{}: stopping after {} ticks",
            worker.name(),
            worker.id(),
            self.ticks
        );
    }
}

/// Ends its worker at `until` (`restart = never`: it stays ended).
struct Clock {
    until: Instant,
}

impl Service for Clock {
    fn run(&mut self, worker: &Worker) -> Result<(), Error> {
        let left = self.until.saturating_duration_since(Instant::now());
        if worker.wait(left).is_none() {
            std::process::exit(0);
        }
        Ok(())
    }

    /// Not a reason to start counting again: `run` goes on with the time left.
    fn reload(&mut self, _worker: &Worker) -> Reload {
        Reload::Resume
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    std::process::exit(run(&args));
}

/// Runs the example with these arguments; returns the manager's exit code.
pub fn run(args: &[String]) -> i32 {
    let mut exit_after = None;
    let mut runtime_dir = None;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--exit-after", Some(d)) => match humantime::parse_duration(d) {
                Ok(d) => exit_after = Some(d),
                Err(e) => return usage(&format!("--exit-after {d}: {e}")),
            },
            ("--runtime-dir", Some(dir)) => runtime_dir = Some(dir.clone()),
            _ => return usage(&format!("unexpected argument {arg}")),
        }
    }

    let mut manager = ServiceManager::new();
    if let Some(dir) = runtime_dir {
        manager.runtime_dir(dir);
    }
    manager.add("printer", 3, |_worker: &Worker| Printer { ticks: 0 });
    manager
        .on_new_worker(|name, id, pid| println!("master: {name}.{id} started (pid {pid})"))
        .on_dead_worker(|name, id, pid, exit| {
            println!("master: {name}.{id} (pid {pid}) ended: {exit}")
        })
        .on_terminate(|| println!("master: stopping every worker"));
    if let Some(after) = exit_after {
        let options = ServiceOptions {
            restart: RestartPolicy::Never,
            ..ServiceOptions::default()
        };
        manager.add_with("clock", options, move |_worker: &Worker| Clock {
            until: Instant::now() + after,
        });
        let handle = manager.handle();
        manager.on_dead_worker(move |name, _, _, exit| {
            if name == "clock" && exit == Exit::Code(0) {
                handle.shutdown();
            }
        });
    }
    manager.run()
}

fn usage(problem: &str) -> i32 {
    eprintln!("service_pool: {problem}");
    eprintln!("usage: service_pool [--exit-after DURATION] [--runtime-dir DIR]");
    2
}
