//! Worker answers through `queue::wire::AnswerDecoder`, in chunks of any size: never a panic,
//! the same answers and the same error whatever the chunking, memory bounded by the limit, and
//! what it decodes encodes back to bytes that decode the same. The job decoder gets the same
//! bytes and the same chunking check.
//!
//! Input layout: byte 0 picks the protocol (bit 0: lines or frames) and `max_frame` (the rest:
//! 1 to 32, or 16 MiB when it is 0 mod 33), bytes 1 to 4 seed the chunk sizes, the rest is the
//! worker's stdout.
#![no_main]

use libfuzzer_sys::fuzz_target;
use plumule::config::QueueProtocol;
use plumule::queue::wire::{encode_answer, Answer, AnswerDecoder, JobDecoder, ProtocolError};

type Decoded = (Vec<Answer>, Result<(), ProtocolError>);

/// The stream fed in chunks of `sizes` (then the rest), then its end.
fn answers(protocol: QueueProtocol, max: u64, stream: &[u8], sizes: &[usize]) -> Decoded {
    let bound = match protocol {
        QueueProtocol::Lines => max as usize + 1,
        QueueProtocol::Frames => 4 + max as usize,
    };
    let mut d = AnswerDecoder::new(protocol, max);
    let mut got = Vec::new();
    let mut rest = stream;
    for &size in sizes.iter().chain(std::iter::once(&usize::MAX)) {
        let (chunk, tail) = rest.split_at(size.min(rest.len()));
        rest = tail;
        if let Err(e) = d.push(chunk, |a| got.push(a)) {
            // An error is final: repeated, nothing more decoded.
            assert_eq!(
                d.push(b"ok\n\0\0\0\x01\0", |_| panic!("decoded after an error")),
                Err(e.clone())
            );
            assert_eq!(d.finish(), Err(e.clone()));
            return (got, Err(e));
        }
        assert!(
            d.buffered() <= bound,
            "holds {} bytes, bound {bound}",
            d.buffered()
        );
    }
    (got, d.finish())
}

fn jobs(
    protocol: QueueProtocol,
    max: u64,
    stream: &[u8],
    sizes: &[usize],
) -> (Vec<Vec<u8>>, Result<(), ProtocolError>) {
    let mut d = JobDecoder::new(protocol, max);
    let mut got = Vec::new();
    let mut rest = stream;
    for &size in sizes.iter().chain(std::iter::once(&usize::MAX)) {
        let (chunk, tail) = rest.split_at(size.min(rest.len()));
        rest = tail;
        if let Err(e) = d.push(chunk, |j| got.push(j.to_vec())) {
            return (got, Err(e));
        }
    }
    (got, d.finish())
}

fuzz_target!(|data: &[u8]| {
    let (head, seed, stream) = match data {
        [h, a, b, c, d, rest @ ..] => (*h, u32::from_le_bytes([*a, *b, *c, *d]), rest),
        _ => return,
    };
    let protocol = if head & 1 == 0 {
        QueueProtocol::Lines
    } else {
        QueueProtocol::Frames
    };
    let max = match (head >> 1) % 33 {
        0 => 16 << 20,
        m => u64::from(m),
    };
    // Chunk sizes from 0 to 2 × max + 5 (capped), from a small xorshift of the seed.
    let span = (2 * max + 6).min(200) as u32;
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
    let ones = vec![1; stream.len()];

    let whole = answers(protocol, max, stream, &[]);
    assert_eq!(answers(protocol, max, stream, &sizes), whole, "chunked");
    assert_eq!(answers(protocol, max, stream, &ones), whole, "byte by byte");
    if let Err(e) = &whole.1 {
        assert!(!e.to_string().is_empty() && !e.to_string().contains('\n'));
    }
    // Whatever the encoder accepts of what was decoded reads back the same.
    for a in &whole.0 {
        let mut bytes = Vec::new();
        if encode_answer(protocol, a.outcome, &a.text, max, &mut bytes).is_ok() {
            assert_eq!(
                answers(protocol, max, &bytes, &[]),
                (vec![a.clone()], Ok(()))
            );
        }
    }

    let whole = jobs(protocol, max, stream, &[]);
    assert_eq!(jobs(protocol, max, stream, &sizes), whole, "jobs chunked");
    assert_eq!(
        jobs(protocol, max, stream, &ones),
        whole,
        "jobs byte by byte"
    );
});
