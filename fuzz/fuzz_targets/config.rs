//! A configuration file → `config::parse`.
//! What must hold: `tests/invariants/targets.rs`, `config`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../tests/invariants/mod.rs"]
mod invariants;

fuzz_target!(|data: &[u8]| invariants::targets::config(data));
