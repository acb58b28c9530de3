//! A syncer reply → `sys::syncer::Reply::decode`.
//! What must hold: `tests/invariants/targets.rs`, `syncer_reply`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../tests/invariants/mod.rs"]
mod invariants;

fuzz_target!(|data: &[u8]| invariants::targets::syncer_reply(data));
