//! Control requests: status, start/stop/restart, scale and reload, and the waiters that
//! answer a request once its action is done (SPEC §9).

use std::sync::Arc;
use std::time::Instant;

use nix::unistd::Pid;

use super::Master;
use crate::config;
use crate::control::Incoming;
use crate::diff::{self, Change};
use crate::plan::{Phase, Pool};
use crate::protocol::{self, ProgramStatus, Request, Response, Status, Target, WorkerStatus};
use crate::slot::{Event, SlotState};

/// A request that is answered once its condition holds.
pub struct Waiter {
    conn: u64,
    kind: WaitKind,
}

enum WaitKind {
    /// `stop`: the slots have no process left.
    Stopped { program: String, ids: Vec<u32> },
    /// `start`/`restart`: each slot runs a process other than `old`.
    Running {
        program: String,
        ids: Vec<u32>,
        old: Vec<Pid>,
    },
    /// `scale` and `reload`: the pools are settled; `result` is the answer then.
    Settled {
        programs: Vec<String>,
        result: serde_json::Value,
    },
}

impl Master {
    pub(super) fn serve_client(&mut self, id: u64, revents: i16) {
        let now = Instant::now();
        let Some(control) = self.control.as_mut() else {
            return;
        };
        if revents & libc::POLLOUT != 0 {
            control.flush(id);
        }
        if revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) == 0 {
            return;
        }
        let incoming = control.read(id, now);
        self.serve_requests(id, incoming, now);
    }

    /// Carries out `incoming` and the requests buffered behind it on the same connection, in
    /// order, until one has to wait for its answer or none is left. Returns whether it carried
    /// out any request.
    fn serve_requests(&mut self, id: u64, mut incoming: Incoming, now: Instant) -> bool {
        let mut served = false;
        loop {
            match incoming {
                Incoming::Request(req) => {
                    served = true;
                    if let Some(response) = self.handle(id, req, now) {
                        let Some(control) = self.control.as_mut() else {
                            return served;
                        };
                        control.respond(id, response, now);
                        // Requests pipelined on one line batch are served in order.
                        incoming = control.next_request(id, now);
                        continue;
                    }
                    return served;
                }
                Incoming::Nothing => {
                    if let Some(control) = self.control.as_mut() {
                        control.flush(id);
                    }
                    return served;
                }
                Incoming::Closed => {
                    self.waiters.retain(|w| w.conn != id);
                    return served;
                }
            }
        }
    }

    /// Carries out a request; `None` when the answer waits for a condition.
    fn handle(&mut self, conn: u64, req: Request, now: Instant) -> Option<Response> {
        if let Phase::ShuttingDown { .. } = self.phase {
            if !matches!(req, Request::Status { .. }) {
                return Some(Response::error("the master is stopping"));
            }
        }
        let result = match req {
            Request::Status { program } => return Some(self.status(program.as_deref(), now)),
            Request::Reload => self
                .reload(now)
                .map(|(changes, programs)| WaitKind::Settled {
                    programs,
                    result: serde_json::json!({ "changes": changes }),
                }),
            Request::Start { target } => self.start(&target, now),
            Request::Stop { target } => self.stop_target(&target, now),
            Request::Restart { target } => self.restart(&target, now),
            Request::Scale { program, workers } => self.scale(&program, workers),
            Request::Logs {
                target,
                lines,
                follow,
            } => return self.logs(conn, target, lines, follow),
        };
        match result {
            Err(message) => Some(Response::error(message)),
            Ok(kind) => {
                self.waiters.push(Waiter { conn, kind });
                None
            }
        }
    }

    /// Answers every waiter whose condition now holds, then carries out the requests its
    /// client had pipelined behind the one answered (they were read already: poll will not
    /// report them again). Returns whether it carried out any: the caller plans again then.
    pub(super) fn check_waiters(&mut self, now: Instant) -> bool {
        if self.waiters.is_empty() {
            return false;
        }
        let mut served = false;
        let waiters = std::mem::take(&mut self.waiters);
        for w in waiters {
            match self.outcome(&w.kind) {
                None => self.waiters.push(w),
                Some(response) => {
                    let Some(c) = self.control.as_mut() else {
                        continue;
                    };
                    c.respond(w.conn, response, now);
                    let next = c.next_request(w.conn, now);
                    served |= self.serve_requests(w.conn, next, now);
                }
            }
        }
        served
    }

    /// Answers what is still waiting: the master is going away.
    pub(super) fn abandon_waiters(&mut self) {
        let now = Instant::now();
        for w in std::mem::take(&mut self.waiters) {
            let response = self
                .outcome(&w.kind)
                .unwrap_or_else(|| Response::error("the master stopped"));
            if let Some(c) = self.control.as_mut() {
                c.respond(w.conn, response, now);
            }
        }
    }

    /// The last `lines` lines of worker output; with `follow`, the connection keeps receiving
    /// new lines (one `{"ok":true,"result":{"lines":[…]}}` object per batch).
    fn logs(
        &mut self,
        conn: u64,
        target: Option<String>,
        lines: usize,
        follow: bool,
    ) -> Option<Response> {
        if let Some(t) = &target {
            let parsed = match Target::parse(t) {
                Ok(p) => p,
                Err(e) => return Some(Response::error(e)),
            };
            if self.pool(&parsed.program).is_none() {
                return Some(Response::error(format!(
                    "no program named {}",
                    parsed.program
                )));
            }
        }
        let entries: Vec<protocol::LogEntry> = self
            .log_ring
            .tail(lines, target.as_deref())
            .map(protocol::LogEntry::from)
            .collect();
        let response = Response::ok(serde_json::json!({ "lines": entries }));
        if !follow {
            return Some(response);
        }
        let next = self.log_ring.next_seq();
        if let Some(c) = self.control.as_mut() {
            if c.stream(conn, response) {
                self.followers.push((conn, target, next));
            }
        }
        None
    }

    /// Sends new worker lines to `logs --follow` connections.
    pub(super) fn feed_followers(&mut self) {
        if self.followers.is_empty() {
            return;
        }
        let next = self.log_ring.next_seq();
        let Some(control) = self.control.as_mut() else {
            return;
        };
        let ring = &self.log_ring;
        self.followers.retain_mut(|(conn, filter, seq)| {
            if *seq == next {
                return control.conns.contains_key(conn);
            }
            let entries: Vec<protocol::LogEntry> = ring
                .since(*seq)
                .filter(|l| filter.as_deref().is_none_or(|f| l.matches(f)))
                .map(protocol::LogEntry::from)
                .collect();
            *seq = next;
            entries.is_empty() && control.conns.contains_key(conn)
                || control.stream(*conn, Response::ok(serde_json::json!({ "lines": entries })))
        });
    }

    fn pool(&self, name: &str) -> Option<&Pool> {
        self.pools
            .iter()
            .find(|p| p.program.name == name && !p.removed)
    }

    fn outcome(&self, kind: &WaitKind) -> Option<Response> {
        match kind {
            WaitKind::Stopped { program, ids } => {
                let Some(pool) = self.pool(program) else {
                    return Some(Response::ok(serde_json::json!({})));
                };
                let busy = ids
                    .iter()
                    .any(|&id| pool.slots.get(id as usize).is_some_and(|s| s.is_live()));
                (!busy).then(|| Response::ok(serde_json::json!({})))
            }
            WaitKind::Running { program, ids, old } => {
                let Some(pool) = self.pool(program) else {
                    return Some(Response::error(format!("no program named {program}")));
                };
                let mut errors = Vec::new();
                for &id in ids {
                    // Held back by an `after` dependency that has given up: say so, not hang.
                    let blocked = crate::plan::waiting_for(&self.pools, pool).filter(|dep| {
                        self.pools
                            .iter()
                            .any(|p| p.program.name == *dep && p.settled())
                    });
                    if let Some(dep) = blocked {
                        errors.push(format!(
                            "{program}.{id}: waiting for {dep}, which is not running"
                        ));
                        continue;
                    }
                    let slot = pool.slots.get(id as usize)?;
                    match &slot.state {
                        SlotState::Running { pid, .. }
                            if !old.contains(pid) && slot.retiring.is_none() => {}
                        SlotState::Failed { reason } => {
                            errors.push(format!("{program}.{id}: failed: {reason}"))
                        }
                        SlotState::Exited { exit } => {
                            errors.push(format!("{program}.{id}: exited ({exit})"))
                        }
                        SlotState::Backoff { .. } if slot.crashes > 0 => {
                            let exit = slot.last_exit.map_or("?".to_string(), |e| e.to_string());
                            errors.push(format!(
                                "{program}.{id}: crashed ({exit}) and is restarting"
                            ))
                        }
                        _ => return None,
                    }
                }
                Some(if errors.is_empty() {
                    Response::ok(serde_json::json!({}))
                } else {
                    Response::error(errors.join("\n"))
                })
            }
            WaitKind::Settled { programs, result } => {
                let done = programs.iter().all(|name| {
                    self.pools
                        .iter()
                        .filter(|p| p.program.name == *name)
                        .all(|p| !p.removed && p.settled())
                });
                done.then(|| Response::ok(result.clone()))
            }
        }
    }

    /// The pool index and slot ids a target names; errors name what does not exist.
    fn resolve(&mut self, target: &str) -> Result<(usize, Vec<u32>), String> {
        let t = Target::parse(target)?;
        let p = self
            .pools
            .iter()
            .position(|p| p.program.name == t.program && !p.removed)
            .ok_or_else(|| format!("no program named {}", t.program))?;
        let desired = self.pools[p].desired();
        let ids = match t.id {
            Some(id) if id < desired || (id as usize) < self.pools[p].slots.len() => vec![id],
            Some(id) => {
                return Err(format!(
                    "no program named {}.{id} ({} has {desired} workers)",
                    t.program, t.program
                ))
            }
            None => (0..desired.max(self.pools[p].slots.len() as u32)).collect(),
        };
        Ok((p, ids))
    }

    fn start(&mut self, target: &str, now: Instant) -> Result<WaitKind, String> {
        let (p, ids) = self.resolve(target)?;
        let desired = self.pools[p].desired();
        let program = Arc::clone(&self.pools[p].program);
        let ids: Vec<u32> = ids.into_iter().filter(|&id| id < desired).collect();
        for &id in &ids {
            if let Some(slot) = self.pools[p].slots.get_mut(id as usize) {
                slot.transition(Event::Enable, &program, now);
            }
        }
        Ok(WaitKind::Running {
            program: program.name.clone(),
            ids,
            old: Vec::new(),
        })
    }

    fn stop_target(&mut self, target: &str, now: Instant) -> Result<WaitKind, String> {
        let (p, ids) = self.resolve(target)?;
        let program = Arc::clone(&self.pools[p].program);
        for &id in &ids {
            if let Some(slot) = self.pools[p].slots.get_mut(id as usize) {
                slot.transition(Event::Disable, &program, now);
            }
        }
        Ok(WaitKind::Stopped {
            program: program.name.clone(),
            ids,
        })
    }

    fn restart(&mut self, target: &str, now: Instant) -> Result<WaitKind, String> {
        let (p, ids) = self.resolve(target)?;
        let desired = self.pools[p].desired();
        let program = Arc::clone(&self.pools[p].program);
        let ids: Vec<u32> = ids.into_iter().filter(|&id| id < desired).collect();
        let mut old = Vec::new();
        for &id in &ids {
            let Some(slot) = self.pools[p].slots.get_mut(id as usize) else {
                continue;
            };
            slot.transition(Event::Enable, &program, now);
            if let Some(pid) = slot.pid() {
                old.push(pid);
                if !matches!(slot.state, SlotState::Stopping { .. }) {
                    slot.restart_after_stop = true;
                    self.stop(p, id, now);
                } else {
                    slot.restart_after_stop = true;
                }
            }
        }
        Ok(WaitKind::Running {
            program: program.name.clone(),
            ids,
            old,
        })
    }

    fn scale(&mut self, program: &str, workers: u32) -> Result<WaitKind, String> {
        if workers > config::MAX_WORKERS {
            return Err(format!(
                "cannot scale {program} to {workers}: at most {} workers",
                config::MAX_WORKERS
            ));
        }
        let p = self
            .pools
            .iter()
            .position(|p| p.program.name == program && !p.removed)
            .ok_or_else(|| format!("no program named {program}"))?;
        let pool = &mut self.pools[p];
        log::info!(
            "{program}: scaling from {} to {workers} worker(s)",
            pool.desired()
        );
        pool.scale = Some(workers);
        Ok(WaitKind::Settled {
            programs: vec![program.to_string()],
            result: serde_json::json!({ "program": program, "workers": workers }),
        })
    }

    /// Re-reads the config file and applies the difference. On error nothing changes.
    /// Returns the changes (as lines) and the programs to wait for.
    pub(super) fn reload(&mut self, now: Instant) -> Result<(Vec<String>, Vec<String>), String> {
        let usec = crate::sys::notify::monotonic_usec();
        self.systemd
            .notifier
            .send(&format!("RELOADING=1\nMONOTONIC_USEC={usec}"));
        let new = match config::load(&self.config.path) {
            Ok(c) => c,
            Err(e) => {
                let message = format!("reload refused, nothing changed: {e}");
                log::error!("{message}");
                let first = message
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .chars()
                    .take(200)
                    .collect::<String>();
                self.systemd
                    .notifier
                    .send(&format!("READY=1\nSTATUS={first}"));
                return Err(message);
            }
        };
        // New sockets are bound before anything changes, so a busy port refuses the reload.
        if let Err((addr, reason)) = super::bind_listeners(&new, &mut self.listeners) {
            let message = format!(
                "reload refused, nothing changed: cannot listen on {}: {reason}",
                addr.display()
            );
            log::error!("{message}");
            self.systemd.notifier.send(&format!(
                "READY=1\nSTATUS={}",
                message.chars().take(200).collect::<String>()
            ));
            return Err(message);
        }
        let changes = diff::diff(&self.config, &new);
        let mut lines: Vec<String> = changes.iter().map(|c| c.describe(&new)).collect();
        for (key, a, b) in [
            ("runtime_dir", &self.config.runtime_dir, &new.runtime_dir),
            ("state_dir", &self.config.state_dir, &new.state_dir),
            ("lock_dir", &self.config.lock_dir, &new.lock_dir),
        ] {
            if a != b {
                lines.push(format!(
                    "{key} changed: takes effect when the master restarts"
                ));
            }
        }
        if self.config.control_group != new.control_group {
            lines.push("control_group changed: takes effect when the master restarts".into());
        }
        let mut wait_for = Vec::new();
        for change in &changes {
            let name = change.name().to_string();
            let program = new.program(&name).cloned().map(Arc::new);
            match (change, program) {
                (Change::Added(_), Some(program)) => {
                    // A program removed earlier but still draining comes back as new.
                    self.pools.push(Pool::new(program));
                    wait_for.push(name);
                }
                (Change::Removed(_), _) => {
                    for pool in self.pools.iter_mut().filter(|p| p.program.name == name) {
                        pool.removed = true;
                    }
                }
                (
                    Change::Changed {
                        workers,
                        process,
                        signal,
                        ..
                    },
                    Some(program),
                ) => {
                    let Some(pool) = self
                        .pools
                        .iter_mut()
                        .find(|p| p.program.name == name && !p.removed)
                    else {
                        continue;
                    };
                    pool.program = Arc::clone(&program);
                    if workers.is_some() {
                        pool.scale = None;
                    }
                    if !process.is_empty() {
                        pool.generation += 1;
                        for slot in &mut pool.slots {
                            if matches!(slot.state, SlotState::Failed { .. }) {
                                slot.transition(Event::Enable, &program, now);
                            }
                        }
                    } else if *signal {
                        for slot in &pool.slots {
                            if let Some(pid) = slot.pid() {
                                let _ =
                                    crate::sys::process::signal_process(pid, program.reload_signal);
                            }
                        }
                    }
                    wait_for.push(name);
                }
                _ => {}
            }
        }
        crate::logging::set_level(new.log_level);
        // Sockets no program lists any more close; systemd's stay (they cannot be had again).
        self.listeners.retain(|addr, _| {
            matches!(addr, crate::config::ListenAddr::Systemd(_))
                || new
                    .programs
                    .iter()
                    .any(|p| p.listen.iter().any(|l| &l.address == addr))
        });
        self.config = Arc::new(new);
        self.systemd.reloading = Some(wait_for.clone());
        if lines.is_empty() {
            log::info!("reload: nothing changed");
        }
        for line in &lines {
            log::info!("reload: {line}");
        }
        Ok((lines, wait_for))
    }

    fn status(&self, program: Option<&str>, now: Instant) -> Response {
        if let Some(name) = program {
            if self.pool(name).is_none() {
                return Response::error(format!("no program named {name}"));
            }
        }
        let mut programs = Vec::new();
        for pool in &self.pools {
            if program.is_some_and(|n| n != pool.program.name) {
                continue;
            }
            let mut workers = Vec::new();
            // `after`: wanted workers not forked yet show as starting, waiting for whom.
            let blocked_by = crate::plan::waiting_for(&self.pools, pool);
            let desired = pool.desired();
            for slot in &pool.slots {
                if let Some(r) = &slot.retiring {
                    workers.push(WorkerStatus {
                        id: slot.id,
                        pid: Some(r.pid.as_raw()),
                        state: "stopping".into(),
                        detail: Some("replaced by a rolling restart".into()),
                        uptime_s: Some(now.saturating_duration_since(r.since).as_secs_f64()),
                        restarts: slot.restarts,
                        last_exit: None,
                        locks: self
                            .procs
                            .get(&r.pid)
                            .map(|p| p.lock_names.clone())
                            .unwrap_or_default(),
                        in_flight: 0,
                        status: None,
                    });
                }
                let locks = match &slot.state {
                    SlotState::Running { pid, .. } | SlotState::Stopping { pid, .. } => self
                        .procs
                        .get(pid)
                        .map(|p| p.lock_names.clone())
                        .unwrap_or_default(),
                    SlotState::Starting { pid, wait, .. }
                        if *wait != crate::slot::StartWait::Exec =>
                    {
                        let all = self
                            .procs
                            .get(pid)
                            .map(|p| p.lock_names.clone())
                            .unwrap_or_default();
                        match wait {
                            crate::slot::StartWait::Lock(name) => {
                                all.into_iter().take_while(|l| l != name).collect()
                            }
                            _ => all,
                        }
                    }
                    _ => Vec::new(),
                };
                let waiting = blocked_by.filter(|_| {
                    slot.id < desired && slot.enabled && matches!(slot.state, SlotState::Stopped)
                });
                workers.push(WorkerStatus {
                    id: slot.id,
                    pid: slot.pid().map(|p| p.as_raw()),
                    state: if waiting.is_some() {
                        "starting"
                    } else {
                        slot.state.name()
                    }
                    .into(),
                    detail: waiting
                        .map(|d| format!("waiting for {d}"))
                        .or_else(|| slot.detail(now)),
                    uptime_s: slot
                        .state
                        .since()
                        .map(|s| now.saturating_duration_since(s).as_secs_f64()),
                    restarts: slot.restarts,
                    last_exit: slot.last_exit.map(protocol::LastExit::from),
                    locks,
                    in_flight: 0,
                    status: slot.status.clone(),
                });
            }
            if let Some(dep) = blocked_by {
                for id in pool.slots.len() as u32..desired {
                    workers.push(WorkerStatus {
                        id,
                        pid: None,
                        state: "starting".into(),
                        detail: Some(format!("waiting for {dep}")),
                        uptime_s: None,
                        restarts: 0,
                        last_exit: None,
                        locks: Vec::new(),
                        in_flight: 0,
                        status: None,
                    });
                }
            }
            programs.push(ProgramStatus {
                name: pool.program.name.clone(),
                workers,
            });
        }
        Response::ok(Status { programs })
    }
}
