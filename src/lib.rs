//! plumule: a multi-process daemon supervisor for Linux.
//!
//! The crate is layered so that decisions never perform effects:
//!
//! - [`config`]: the TOML file → a validated [`config::Config`];
//! - [`backoff`], [`slot`], [`plan`], [`diff`]: pure decisions (restart delays, the worker state
//!   machine, the actions that bring what runs in line with what should run, what a reload
//!   changes);
//! - [`launch`]: how a worker is started (executable, environment, credentials, locks);
//! - [`master`]: the single-threaded event loop over its subsystems, the only code that carries
//!   out actions;
//! - [`protocol`], [`control`], [`client`]: the control socket's typed messages, its server
//!   side, and the client commands;
//! - [`sys`]: every syscall wrapper and every `unsafe` block;
//! - [`output`], [`logging`], [`locks`], [`orphans`]: worker output, the master's log, named
//!   file locks, and the record of process groups that outlives a crashed master;
//! - [`worker`]: the library for queue workers written in Rust (jobs on stdin, answers on
//!   stdout, typed payloads, a thread pool that answers in order);
//! - [`cli`], [`manpage`]: the `plumule` command line and its man page.

#![deny(unsafe_op_in_unsafe_fn)]

pub mod backoff;
pub mod cli;
pub mod client;
pub mod config;
pub mod control;
pub mod diff;
pub mod launch;
pub mod locks;
pub mod logging;
pub mod manpage;
pub mod master;
pub mod orphans;
pub mod output;
pub mod plan;
pub mod protocol;
pub mod queue;
pub mod service;
pub mod slot;
pub mod sys;
#[cfg(test)]
mod test_support;
pub mod worker;

pub use service::{Service, ServiceId, ServiceManager, ServiceOptions, Worker};

/// Named file locks as RAII guards, the same lock files workers and `plumule lock` use.
pub use locks::{acquire as lock, LockGuard, Mode as LockMode, Wait as LockWait};

/// A duration as the config file writes it: "1m 30s", "250ms".
pub fn format_duration(d: std::time::Duration) -> String {
    if d.is_zero() {
        return "0s".to_string();
    }
    // Milliseconds are as fine as any of plumule's settings go.
    let ms = std::time::Duration::from_millis(d.as_millis() as u64);
    humantime::format_duration(if ms.is_zero() { d } else { ms }).to_string()
}
