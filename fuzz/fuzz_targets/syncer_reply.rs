//! The syncer's replies (`sys::syncer::Reply::decode`): never a panic; exactly the 24-byte
//! messages with a known status decode, and what decodes encodes back to the same bytes; a
//! reply made from the input encodes to bytes that decode to it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use plumule::sys::syncer::{Reply, Tag};

fuzz_target!(|data: &[u8]| {
    if let Some(reply) = Reply::decode(data) {
        assert_eq!(data.len(), 24);
        assert_eq!(&reply.encode()[..], data, "{reply:?}");
    } else if data.len() == 24 {
        let status = u32::from_le_bytes(data[0..4].try_into().unwrap());
        let errno = u32::from_le_bytes(data[4..8].try_into().unwrap());
        assert!(
            status > 1 || (status == 0 && errno != 0),
            "refused a well-formed reply {data:?}"
        );
    }
    // Any reply the syncer can send reads back as itself.
    if let [a, b @ ..] = data {
        if b.len() >= 20 {
            let tag = Tag(u64::from_le_bytes(b[0..8].try_into().unwrap()));
            let offset = u64::from_le_bytes(b[8..16].try_into().unwrap());
            let errno = i32::from_le_bytes(b[16..20].try_into().unwrap());
            let reply = if a & 1 == 0 {
                Reply::Synced { tag, offset }
            } else {
                Reply::Failed { tag, offset, errno }
            };
            assert_eq!(Reply::decode(&reply.encode()), Some(reply));
        }
    }
});
