//! A control request line, as the master reads it → `protocol::parse_request`.
//! What must hold: `tests/invariants/targets.rs`, `control_request`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../tests/invariants/mod.rs"]
mod invariants;

fuzz_target!(|data: &[u8]| invariants::targets::control_request(data));
