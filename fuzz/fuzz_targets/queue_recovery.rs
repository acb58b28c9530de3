//! Arbitrary bytes as a queue segment → `queue::store::Store::open`.
//! What must hold: `tests/invariants/targets.rs`, `queue_recovery`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../tests/invariants/mod.rs"]
mod invariants;

fuzz_target!(|data: &[u8]| invariants::targets::queue_recovery(data));
