//! A worker's answers → `queue::wire::AnswerDecoder` (and `JobDecoder`), in chunks of any size.
//! What must hold: `tests/invariants/targets.rs`, `queue_answers`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../tests/invariants/mod.rs"]
mod invariants;

fuzz_target!(|data: &[u8]| invariants::targets::queue_answers(data));
