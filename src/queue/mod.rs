//! Job queues (SPEC §4): what a queue keeps, and how it survives the master.
//!
//! - [`store`]: the on-disk log of a durable queue, its format and its recovery.

pub mod store;
