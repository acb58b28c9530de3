//! Worker output through `LineSplitter`, in chunks of any size: nothing lost or added, no
//! piece over the maximum.
//!
//! Input layout: byte 0 picks `max_line` (1 to 64, or the default 16 KiB), bytes 1 to 4 seed
//! the chunk sizes, the rest is the stream.
#![no_main]

use libfuzzer_sys::fuzz_target;
use plumule::output::DEFAULT_MAX_LINE;

#[path = "../../tests/invariants/mod.rs"]
mod invariants;

fuzz_target!(|data: &[u8]| {
    let (max_line, seed, stream) = match data {
        [m, a, b, c, d, rest @ ..] => (*m, u32::from_le_bytes([*a, *b, *c, *d]), rest),
        _ => return,
    };
    let max_line = match max_line % 65 {
        0 => DEFAULT_MAX_LINE,
        m => usize::from(m),
    };
    // Chunk sizes from 0 to 2 × max_line + 1 (capped), from a small xorshift of the seed.
    let span = (2 * max_line + 2).min(200) as u32;
    let mut x = seed | 1;
    let mut sizes = Vec::new();
    let mut covered = 0;
    while covered < stream.len() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let size = (x % span) as usize;
        sizes.push(size);
        covered += size;
    }
    invariants::check_splitter(stream, max_line, &sizes);
});
