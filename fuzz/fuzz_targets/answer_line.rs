//! One `lines` answer line → `queue::wire::parse_answer_line`.
//! What must hold: `tests/invariants/targets.rs`, `answer_line`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../tests/invariants/mod.rs"]
mod invariants;

fuzz_target!(|data: &[u8]| invariants::targets::answer_line(data));
