//! Worker output → `output::LineSplitter`, in chunks of any size.
//! What must hold: `tests/invariants/targets.rs`, `output_lines`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../tests/invariants/mod.rs"]
mod invariants;

fuzz_target!(|data: &[u8]| invariants::targets::output_lines(data));
