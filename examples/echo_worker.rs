//! The most trivial queue worker: answers each job with `ok PAYLOAD`.
//!
//! It speaks whichever protocol the master names in `PLUMULE_QUEUE_PROTOCOL` (`lines` unless
//! told otherwise), one job at a time, and exits at end of input. `benches/queue.rs` uses it as
//! the Rust side of its end-to-end figures: all the time it takes is the library's.
//!
//! ```toml
//! [queue.echo]
//!
//! [program.echo]
//! command = ["target/release/examples/echo_worker"]
//! queue = "echo"
//! ```
//!
//! By hand: `printf 'a\nb c\n' | cargo run --example echo_worker` prints `ok a` and `ok b c`.

use std::process::ExitCode;

use plumule::worker;

fn echo() -> Result<(), worker::Error> {
    for job in worker::jobs()? {
        let job = job?;
        let payload = job.payload().to_vec();
        job.ok(payload)?;
    }
    Ok(())
}

fn main() -> ExitCode {
    match echo() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // stdout carries answers: everything else goes to stderr.
            eprintln!("echo_worker: {e}");
            ExitCode::FAILURE
        }
    }
}
