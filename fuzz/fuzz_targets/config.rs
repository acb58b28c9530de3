//! Configuration files: parsing never panics, and an error renders one located line per
//! problem.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../tests/invariants/mod.rs"]
mod invariants;

fuzz_target!(|data: &[u8]| {
    let _ = invariants::check_config(&String::from_utf8_lossy(data));
});
