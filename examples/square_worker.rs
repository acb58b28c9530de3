//! A queue worker that answers each number with its square.
//!
//! Each job's payload is an integer (JSON, so `12` or ` 12 `); the answer is `ok` with its
//! square, `drop overflow` when the square does not fit in an i64, and `drop bad payload: …`
//! for anything that is not an integer. It speaks whichever protocol the master names in
//! `PLUMULE_QUEUE_PROTOCOL` (`lines` unless told otherwise). With `--threads N` it squares on a
//! pool of N threads (backlog N), still answering in order.
//!
//! ```toml
//! [queue.squares]
//! protocol = "frames"
//!
//! [program.squarer]
//! command = ["target/debug/examples/square_worker", "--threads", "4"]
//! queue = "squares"
//! ```
//!
//! By hand: `printf '3\n4\nx\n' | cargo run --example square_worker` prints `ok 9`, `ok 16`,
//! `drop bad payload: …`.

use std::process::ExitCode;

use plumule::worker::{self, Fail, Pool};

fn square(n: i64) -> Result<i64, Fail> {
    n.checked_mul(n).ok_or_else(|| Fail::drop("overflow"))
}

/// The value of `--threads N`, if given.
fn threads() -> Result<Option<usize>, String> {
    let mut args = std::env::args().skip(1);
    match (args.next().as_deref(), args.next(), args.next()) {
        (None, _, _) => Ok(None),
        (Some("--threads"), Some(n), None) => match n.parse::<usize>() {
            Ok(n) if n > 0 => Ok(Some(n)),
            _ => Err(format!("--threads wants a number above 0, not {n:?}")),
        },
        _ => Err("usage: square_worker [--threads N]".to_string()),
    }
}

fn main() -> ExitCode {
    let threads = match threads() {
        Ok(threads) => threads,
        Err(usage) => {
            eprintln!("square_worker: {usage}");
            return ExitCode::from(2);
        }
    };
    let served = worker::jobs().and_then(|jobs| match threads {
        None => jobs.serve(square),
        Some(n) => Pool::new(n, n).serve(jobs, square),
    });
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // stdout carries answers: everything else goes to stderr.
            eprintln!("square_worker: {e}");
            ExitCode::FAILURE
        }
    }
}
