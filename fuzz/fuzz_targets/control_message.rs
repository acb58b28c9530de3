//! A line from the master, as the client reads it → `protocol::parse_message`; and request lines
//! with the progress flag → `protocol::parse_request_line`.
//! What must hold: `tests/invariants/targets.rs`, `control_message`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../tests/invariants/mod.rs"]
mod invariants;

fuzz_target!(|data: &[u8]| invariants::targets::control_message(data));
