//! Typed jobs: the program submits numbers to the queue `squares` from the master's side, and
//! two `squarer` workers answer each with its square, as JSON both ways.
//!
//! ```text
//! cargo run --example producer_consumer -- --jobs 20 --exit-after 2s
//! ```
//!
//! The queue gives the library's services what it gives the binary's workers (SPEC §4): each
//! job is answered once, a failed job is retried with backoff, a job that keeps failing (or is
//! dropped, like an overflowing square here) is dead-lettered, and a job held by a worker that
//! dies is delivered again. `--runtime-dir DIR` opens the control socket at
//! `DIR/control.sock`, where `plumule --socket DIR/control.sock submit squares '{"n": 12}'
//! --wait` and `plumule … queue` work too.

use std::time::Instant;

use plumule::service::{Error, Exit, QueueOptions, Reload, RestartPolicy};
use plumule::worker::Fail;
use plumule::{Service, ServiceManager, ServiceOptions, Worker};
use serde::{Deserialize, Serialize};

/// One job of the queue.
#[derive(Debug, Serialize, Deserialize)]
struct Square {
    n: i64,
}

struct Squarer;

impl Service for Squarer {
    fn run(&mut self, worker: &Worker) -> Result<(), Error> {
        // Until the master closes the jobs (a stop, a scale-down): then `run` returns and the
        // worker exits 0.
        worker.jobs()?.serve(|job: Square| {
            let square = job
                .n
                .checked_mul(job.n)
                .ok_or_else(|| Fail::drop("overflow"))?;
            // stdout goes to the master's log, never into the answers.
            println!("{}.{}: {}² = {square}", worker.name(), worker.id(), job.n);
            Ok(square)
        })?;
        Ok(())
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
    let mut jobs = 10i64;
    let mut exit_after = None;
    let mut runtime_dir = None;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--jobs", Some(n)) => match n.parse() {
                Ok(n) => jobs = n,
                Err(e) => return usage(&format!("--jobs {n}: {e}")),
            },
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
    manager.add_queue(
        "squares",
        QueueOptions {
            // The jobs need not outlive this program.
            durable: false,
            ..QueueOptions::default()
        },
    );
    let consumers = ServiceOptions {
        workers: 2,
        queue: Some("squares".into()),
        ..ServiceOptions::default()
    };
    manager.add_with("squarer", consumers, |_: &Worker| Squarer);
    // The producer is the master: these wait for it to start, then go to the workers.
    let handle = manager.handle();
    for n in 1..=jobs {
        if let Err(e) = handle.submit("squares", &Square { n }) {
            eprintln!("producer_consumer: cannot encode job {n}: {e}");
            return 1;
        }
    }
    if let Some(after) = exit_after {
        let options = ServiceOptions {
            restart: RestartPolicy::Never,
            ..ServiceOptions::default()
        };
        let until = Instant::now() + after;
        manager.add_with("clock", options, move |_: &Worker| Clock { until });
        manager.on_dead_worker(move |name, _, _, exit| {
            if name == "clock" && exit == Exit::Code(0) {
                handle.shutdown();
            }
        });
    }
    manager.run()
}

fn usage(problem: &str) -> i32 {
    eprintln!("producer_consumer: {problem}");
    eprintln!("usage: producer_consumer [--jobs N] [--exit-after DURATION] [--runtime-dir DIR]");
    2
}
