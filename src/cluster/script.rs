//! `plumule lock --cluster NAME [--timeout DUR | --nonblock] -- CMD…`: runs CMD holding the
//! cluster lock NAME, the same lock the workers' `{ name = NAME, cluster = true }` take, with
//! the exit codes of the file lock (SPEC §9): CMD's own status; 75 when the lock was not
//! taken (`--nonblock`, `--timeout`); 2 for a bad name or no CMD; 1 when etcd cannot be used.
//!
//! It grants itself a lease (the config's `cluster.lease`), kept alive by a thread for as long
//! as it waits and CMD runs; CMD gets `PLUMULE_LOCK_REVISION_<NAME>`. When the lease cannot be
//! renewed, CMD is SIGKILLed by [`Lease::kill_at`] of the last renewal, like a worker; the
//! exit status is then 128 + 9. The lease is revoked at the end, which releases the lock.

use std::ffi::OsString;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::Signal;

use super::etcd::Client;
use super::{lock_key, Lease};
use crate::config::Cluster;
use crate::locks::{Wait, EXIT_BUSY, EXIT_FAILURE, EXIT_USAGE};
use crate::sys::process::boottime;

/// Runs `cmd` holding cluster lock `name`; returns plumule's exit code.
pub fn run(cluster: &Cluster, name: &str, wait: Wait, cmd: &[OsString]) -> i32 {
    if let Err(reason) = crate::locks::validate_name(name) {
        eprintln!("plumule lock: invalid lock name {name:?}: {reason}");
        return EXIT_USAGE;
    }
    let Some((program, args)) = cmd.split_first() else {
        eprintln!("plumule lock: no command given (plumule lock --cluster NAME -- CMD...)");
        return EXIT_USAGE;
    };
    let lease = Lease { ttl: cluster.lease };
    let timeout = lease
        .renew_every()
        .clamp(Duration::from_millis(200), Duration::from_secs(5));
    let mut client = match Client::new(&cluster.etcd, timeout) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("plumule lock: {e}");
            return EXIT_FAILURE;
        }
    };
    let sent = boottime();
    let id = match client.grant(cluster.lease) {
        Ok((id, _)) => id,
        Err(e) => {
            eprintln!("plumule lock: cannot get a lease: {e}");
            return EXIT_FAILURE;
        }
    };
    // The last renewal that succeeded (when it was sent), and CMD once it runs.
    let renewed = Arc::new(Mutex::new(sent));
    let child: Arc<Mutex<Option<std::os::fd::OwnedFd>>> = Arc::new(Mutex::new(None));
    let done = Arc::new(AtomicBool::new(false));
    let lost = Arc::new(AtomicBool::new(false));
    {
        let (renewed, child, done, lost) = (
            Arc::clone(&renewed),
            Arc::clone(&child),
            Arc::clone(&done),
            Arc::clone(&lost),
        );
        let mut client = client.clone();
        std::thread::spawn(move || {
            keep_alive(&mut client, id, lease, &renewed, &child, &done, &lost)
        });
    }
    let code = hold_and_run(&mut client, id, name, wait, program, args, &child, &lost);
    done.store(true, Ordering::SeqCst);
    if let Err(e) = client.revoke(id) {
        eprintln!("plumule lock: cannot release lock {name} (it goes with the lease): {e}");
    }
    code
}

#[allow(clippy::too_many_arguments)]
fn hold_and_run(
    client: &mut Client,
    lease: i64,
    name: &str,
    wait: Wait,
    program: &OsString,
    args: &[OsString],
    child: &Mutex<Option<std::os::fd::OwnedFd>>,
    lost: &AtomicBool,
) -> i32 {
    let give_up_at = match wait {
        Wait::Block => None,
        Wait::NonBlock => Some(boottime()),
        Wait::Timeout(d) => Some(boottime() + d),
    };
    let key = lock_key(name, lease, std::process::id());
    let poll = Duration::from_millis(100);
    let give_up = || lost.load(Ordering::SeqCst) || give_up_at.is_some_and(|at| boottime() >= at);
    let revision = loop {
        match super::helper::wait_turn(client, name, &key, lease, poll, &give_up) {
            Ok(Some(rev)) => break rev,
            Ok(None) => {}
            Err(e) => {
                eprintln!("plumule lock: {e}");
                return EXIT_FAILURE;
            }
        }
        if lost.load(Ordering::SeqCst) {
            eprintln!("plumule lock: the lease expired while waiting for lock {name}");
            return EXIT_FAILURE;
        }
        if give_up() {
            eprintln!("plumule lock: lock {name} is held elsewhere in the cluster");
            return EXIT_BUSY;
        }
    };
    let mut command = Command::new(program);
    command
        .args(args)
        .env(super::revision_var(name), revision.to_string());
    let mut proc = match command.spawn() {
        Ok(p) => p,
        Err(err) => {
            eprintln!(
                "plumule lock: cannot run {}: {err}",
                program.to_string_lossy()
            );
            return crate::locks::spawn_failure_code(&err);
        }
    };
    let pid = nix::unistd::Pid::from_raw(proc.id() as i32);
    match crate::sys::process::pidfd(pid) {
        Ok(fd) => {
            *child.lock().unwrap_or_else(|e| e.into_inner()) = Some(fd);
            if lost.load(Ordering::SeqCst) {
                let _ = crate::sys::process::signal_process(pid, Signal::SIGKILL);
            }
        }
        Err(e) => {
            eprintln!("plumule lock: cannot watch {pid} (pidfd: {e}); not enforcing the lease")
        }
    }
    let status = proc.wait();
    *child.lock().unwrap_or_else(|e| e.into_inner()) = None;
    if lost.load(Ordering::SeqCst) {
        eprintln!(
            "plumule lock: the lease on lock {name} could not be renewed: the command was killed"
        );
    }
    match status {
        Ok(s) => crate::locks::exit_code(s),
        Err(e) => {
            eprintln!(
                "plumule lock: cannot wait for {}: {e}",
                program.to_string_lossy()
            );
            EXIT_FAILURE
        }
    }
}

/// Renews the lease every third of it; past the kill deadline of the last renewal, SIGKILLs
/// CMD (through its pidfd) and says the lease is lost.
fn keep_alive(
    client: &mut Client,
    id: i64,
    lease: Lease,
    renewed: &Mutex<Duration>,
    child: &Mutex<Option<std::os::fd::OwnedFd>>,
    done: &AtomicBool,
    lost: &AtomicBool,
) {
    let mut next = boottime() + lease.renew_every();
    while !done.load(Ordering::SeqCst) {
        let last = *renewed.lock().unwrap_or_else(|e| e.into_inner());
        let now = boottime();
        if now >= lease.kill_at(last) {
            lost.store(true, Ordering::SeqCst);
            if let Some(fd) = child.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                let _ = crate::sys::process::signal_pidfd(fd.as_raw_fd(), Signal::SIGKILL);
            }
            return;
        }
        if now >= next {
            let sent = boottime();
            match client.keep_alive(id) {
                Ok(Some(_)) => *renewed.lock().unwrap_or_else(|e| e.into_inner()) = sent,
                Ok(None) => {
                    // Expired on the server: kill now.
                    *renewed.lock().unwrap_or_else(|e| e.into_inner()) = Duration::ZERO;
                    continue;
                }
                Err(_) => {}
            }
            next = sent + lease.renew_every();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
