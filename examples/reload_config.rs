//! A service that re-reads its own configuration on SIGHUP, without restarting.
//!
//! ```text
//! echo hello > greeting.txt
//! cargo run --example reload_config -- --config greeting.txt --exit-after 30s &
//! echo bonjour > greeting.txt; kill -HUP %1
//! ```
//!
//! Each `greeter` worker reads the file when it starts and again on each reload request
//! (SIGHUP to the manager reaches every worker; SIGHUP to one worker, only that one). Its
//! `reload` returns [`Reload::Resume`]: the same process goes on with the new value. A file
//! that cannot be read on reload keeps the old value, said in the log.
//!
//! `--exit-after DURATION` ends the manager by itself (exit 0) after that long;
//! `--runtime-dir DIR` puts its control socket at `DIR/control.sock`.

use std::path::PathBuf;
use std::time::Instant;

use plumule::service::{Error, Exit, Reload, RestartPolicy};
use plumule::{Service, ServiceManager, ServiceOptions, Worker};

struct Greeter {
    config: PathBuf,
    greeting: String,
}

impl Greeter {
    fn read(&self) -> Result<String, Error> {
        Ok(std::fs::read_to_string(&self.config)?.trim().to_string())
    }
}

impl Service for Greeter {
    fn run(&mut self, worker: &Worker) -> Result<(), Error> {
        // A body that has nothing to do until it is asked something may simply return: the
        // worker then waits for the next request.
        println!(
            "{}.{}: greeting is {:?}",
            worker.name(),
            worker.id(),
            self.greeting
        );
        Ok(())
    }

    fn reload(&mut self, worker: &Worker) -> Reload {
        match self.read() {
            Ok(greeting) => self.greeting = greeting,
            Err(e) => eprintln!(
                "{}.{}: keeping the old greeting: {e}",
                worker.name(),
                worker.id()
            ),
        }
        Reload::Resume
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
    let mut config = None;
    let mut exit_after = None;
    let mut runtime_dir = None;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--config", Some(path)) => config = Some(PathBuf::from(path)),
            ("--exit-after", Some(d)) => match humantime::parse_duration(d) {
                Ok(d) => exit_after = Some(d),
                Err(e) => return usage(&format!("--exit-after {d}: {e}")),
            },
            ("--runtime-dir", Some(dir)) => runtime_dir = Some(dir.clone()),
            _ => return usage(&format!("unexpected argument {arg}")),
        }
    }
    let Some(config) = config else {
        return usage("--config is required");
    };
    // Read once before starting, so that a missing file is an error now, not a crash loop.
    let greeting = match std::fs::read_to_string(&config) {
        Ok(text) => text.trim().to_string(),
        Err(e) => {
            eprintln!("reload_config: cannot read {}: {e}", config.display());
            return 1;
        }
    };

    let mut manager = ServiceManager::new();
    if let Some(dir) = runtime_dir {
        manager.runtime_dir(dir);
    }
    // The factory runs in each new worker: a worker started after the file changed (a
    // restart, a scale-up) reads the file as it is then.
    manager.add("greeter", 2, move |worker: &Worker| {
        let mut greeter = Greeter {
            config: config.clone(),
            greeting: greeting.clone(),
        };
        greeter.reload(worker);
        greeter
    });
    manager.on_reload(|| println!("master: reloading every greeter"));
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
    eprintln!("reload_config: {problem}");
    eprintln!("usage: reload_config --config FILE [--exit-after DURATION] [--runtime-dir DIR]");
    2
}
