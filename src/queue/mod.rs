//! Job queues (SPEC §4): the pure building blocks the master and the worker library share.
//!
//! - [`ring`]: routing decisions (consistent hash ring for `route = "key"`, least-loaded,
//!   round-robin);
//! - [`wire`]: the bytes on a queue worker's stdin and stdout, for both protocols (`lines` and
//!   `frames`), encoders and incremental decoders for both ends.

pub mod ring;
pub mod wire;
