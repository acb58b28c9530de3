//! Arbitrary bytes as a queue segment → `queue::store::Store::open`: no panic; when the store
//! opens, its recovery is complete (a second open finds the same jobs and nothing to warn
//! about, since the first cut any bad tail), its jobs have unique ids in submission order below
//! `next_id`, and a job added then is found after them by a third open.
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
        // The recovered jobs are consistent: ids unique, in submission order, under next_id.
        assert!(
            first.jobs.windows(2).all(|w| w[0].id < w[1].id),
            "ids out of order: {:?}",
            first.jobs.iter().map(|j| j.id).collect::<Vec<_>>()
        );
        assert!(first.jobs.iter().all(|j| j.id < first.next_id), "{first:?}");
        let (mut again, second) =
            Store::open(&dir, opts.clone()).expect("a store that opened opens again");
        assert_eq!(first.jobs, second.jobs);
        assert_eq!(first.next_id, second.next_id);
        assert!(second.warnings.is_empty(), "{:?}", second.warnings);
        let id = second.next_id;
        again.append_submitted(id, 0, None, b"fuzz").unwrap();
        again.sync().unwrap();
        store = again;
        drop(store);
        // What was added after recovery is there on the next open, after the same jobs.
        let (_, third) = Store::open(&dir, opts).expect("opens a third time");
        assert_eq!(third.jobs.len(), second.jobs.len() + 1, "{third:?}");
        assert_eq!(third.jobs[..second.jobs.len()], second.jobs[..]);
        let added = third.jobs.last().unwrap();
        assert_eq!((added.id, &added.payload[..]), (id, &b"fuzz"[..]));
        assert!(third.next_id > id);
    }
    let _ = std::fs::remove_dir_all(&dir);
});
