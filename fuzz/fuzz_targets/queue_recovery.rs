//! Arbitrary bytes as a queue segment → `queue::store::Store::open`: no panic; when the store
//! opens, its recovery is complete (a second open finds the same jobs and nothing to warn
//! about, since the first cut any bad tail) and it takes a new record.
//!
//! Input layout: byte 0 odd puts a valid segment header before the rest (so the records are
//! what gets fuzzed), even writes the rest as it is (so the header is).
#![no_main]

use libfuzzer_sys::fuzz_target;
use plumule::queue::store::{segment_header, segment_name, Options, Store};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut bytes = Vec::new();
    if mode & 1 == 1 {
        bytes.extend_from_slice(&segment_header(1));
    }
    bytes.extend_from_slice(rest);

    let dir = std::env::temp_dir().join(format!("plumule-fuzz-queue-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(segment_name(1)), &bytes).unwrap();
    let opts = Options {
        segment_size: 1 << 16,
    };
    if let Ok((mut store, first)) = Store::open(&dir, opts.clone()) {
        drop(store);
        let (mut again, second) = Store::open(&dir, opts).expect("a store that opened opens again");
        assert_eq!(first.jobs, second.jobs);
        assert!(second.warnings.is_empty(), "{:?}", second.warnings);
        let id = second.next_id;
        again.append_submitted(id, 0, None, b"fuzz").unwrap();
        again.sync().unwrap();
        store = again;
        drop(store);
    }
    let _ = std::fs::remove_dir_all(&dir);
});
