//! A worker's stdin → the worker library (`worker::Builder::io`), read in reads of any size,
//! answered.
//! What must hold: `tests/invariants/targets.rs`, `worker_frames`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../tests/invariants/mod.rs"]
mod invariants;

fuzz_target!(|data: &[u8]| invariants::targets::worker_frames(data));
