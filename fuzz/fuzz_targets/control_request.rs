//! Control request lines, as the master reads them from `control.sock`: parsing never panics,
//! an error is one reply line, and a parsed request round-trips through JSON.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../tests/invariants/mod.rs"]
mod invariants;

fuzz_target!(|data: &[u8]| {
    invariants::check_request(data);
});
