//! A fork server request payload → `sys::forkserver::decode`.
//! What must hold: `tests/invariants/targets.rs`, `forkserver_request`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../tests/invariants/mod.rs"]
mod invariants;

fuzz_target!(|data: &[u8]| invariants::targets::forkserver_request(data));
