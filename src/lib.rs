//! plumule: a multi-process daemon supervisor for Linux.
//!
//! The crate is layered so that decisions never perform effects:
//!
//! - [`config`]: the TOML file → a validated [`config::Config`];
//! - [`backoff`], [`slot`], [`plan`]: pure decisions (restart delays, the worker state machine,
//!   the actions that bring what runs in line with what should run);
//! - [`master`]: the single-threaded event loop, the only code that carries out actions;
//! - [`sys`]: every syscall wrapper and every `unsafe` block;
//! - [`output`], [`locks`]: worker output handling and named file locks.

#![deny(unsafe_op_in_unsafe_fn)]

pub mod config;
pub mod locks;
pub mod output;
