//! Job queues (SPEC §4): the building blocks the master and the worker library share. The
//! master does not feed queues yet; these are their parts, each tested on its own.
//!
//! - [`ring`]: routing decisions (consistent hash ring for `route = "key"`, least-loaded,
//!   round-robin);
//! - [`wire`]: the bytes on a queue worker's stdin and stdout, for both protocols (`lines` and
//!   `frames`), encoders and incremental decoders for both ends;
//! - [`store`]: the on-disk log of a durable queue, its format and its recovery;
//! - [`durable`]: group commit of a store, its syncs done by the syncer process;
//! - [`redis`]: a queue kept in Redis (SPEC §10): the messages between the master and its
//!   Redis helper process, the keys and Lua scripts, and the helper's body.

pub mod durable;
pub mod redis;
pub mod ring;
pub mod state;
pub mod store;
pub mod wire;
