//! The control socket as a part of the loop: its connections, the requests that wait for
//! their answer (SPEC §9: `stop` answers once the workers have exited, `start` once they run,
//! `scale` and `reload` once settled), and `logs --follow` streams. What a request does to the
//! workers is the supervisor's (see `commands`); this part only carries requests and answers.

use std::collections::HashMap;
use std::os::fd::RawFd;
use std::time::Instant;

use super::commands::WaitKind;
use super::supervisor::Supervisor;
use super::{MasterError, Part, Subsystem};
use crate::control::{ControlServer, Incoming};
use crate::plan::Phase;
use crate::protocol::{self, LogsResult, ReloadResult, Request, Response, Target};
use crate::sys::reactor::Ready;

use super::commands::RefusedError;

/// The control part's token for the listener; connections use their ids (from 1).
const LISTENER: u64 = 0;

/// Results that ride along with one `submit` answer at most.
const RESULTS_PER_ANSWER: usize = 10_000;

/// Results sent on one line of a `results` stream.
const RESULTS_PER_LINE: usize = 1000;
/// A `results` stream sends more only while less than this waits for its client.
const STREAM_BACKLOG: usize = 1 << 20;

/// A request that is answered once its condition holds.
struct Waiter {
    conn: u64,
    kind: WaitKind,
    /// The progress line its client gets while it waits ("waiting for web to stop").
    progress: String,
    /// When the next progress line is due.
    next_progress: Instant,
}

pub(super) struct Clients {
    server: Option<ControlServer>,
    waiters: Vec<Waiter>,
    /// `logs --follow` connections: (connection, filter, next line to send).
    followers: Vec<(u64, Option<String>, u64)>,
    /// What the reactor watches of the socket: connection id → (fd, also writable).
    watched: HashMap<u64, (RawFd, bool)>,
    listening: bool,
    /// Batches each connection submitted with `wait`, until it asks for their results.
    waits: HashMap<u64, Vec<(String, u64, u64)>>,
}

impl Clients {
    pub(super) fn new(sup: &Supervisor) -> Result<Clients, MasterError> {
        let access = crate::control::Access {
            uid: nix::unistd::geteuid().as_raw(),
            group: sup.config.control_group.clone(),
        };
        let path = sup.config.runtime_dir.join("control.sock");
        let server = ControlServer::bind(&path, access).map_err(|e| MasterError::Dir {
            what: "control socket",
            path: path.clone(),
            reason: e.to_string(),
        })?;
        Ok(Clients {
            server: Some(server),
            waiters: Vec::new(),
            followers: Vec::new(),
            watched: HashMap::new(),
            listening: false,
            waits: HashMap::new(),
        })
    }

    /// Brings the reactor in line with the socket: the listener while new clients are taken,
    /// each connection for reading, and for writing while it has output queued. Costs the
    /// number of connections, which is bounded and small, not the fleet.
    fn watch(&mut self, sup: &Supervisor, now: Instant) {
        // Left alone a while after an accept failed in a way a retry at once would meet
        // again (out of descriptors): the loop would spin on a readable listener.
        let accepting = self.server.as_mut().is_some_and(|c| c.accepting(now));
        let Some(c) = &self.server else { return };
        let listen = sup.phase == Phase::Running && accepting;
        if listen != self.listening {
            let fd = c.fd();
            if listen {
                if let Err(e) = sup.reactor.add(fd, Part::Control.token(LISTENER), false) {
                    log::error!("cannot watch the control socket: {e}");
                }
            } else {
                // During a graceful stop no new client is taken; those connected still get
                // answers.
                sup.reactor.remove(fd);
            }
            self.listening = listen;
        }
        let mut seen = HashMap::with_capacity(self.watched.len());
        for (fd, events, id) in c.poll_entries() {
            let write = events & libc::POLLOUT != 0;
            let token = Part::Control.token(id);
            let result = match self.watched.get(&id) {
                // A connection that wanted nothing for a while (busy, its output sent) left
                // `watched` but not the reactor: it is changed, not added again.
                None => match sup.reactor.add(fd, token, write) {
                    Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                        sup.reactor.modify(fd, token, write)
                    }
                    other => other,
                },
                Some(&(old_fd, old_write)) if old_fd == fd && old_write == write => Ok(()),
                Some(_) => sup.reactor.modify(fd, token, write),
            };
            if let Err(e) = result {
                log::warn!("cannot watch control connection {id}: {e}");
            }
            seen.insert(id, (fd, write));
        }
        // Closed connections closed their descriptors, which left the reactor with them.
        self.watched = seen;
    }

    fn serve_client(&mut self, sup: &mut Supervisor, id: u64, revents: i16) {
        let now = Instant::now();
        let Some(control) = self.server.as_mut() else {
            return;
        };
        if revents & libc::POLLOUT != 0 {
            control.flush(id);
        }
        if revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) == 0 {
            return;
        }
        let incoming = control.read(id, now);
        self.serve_requests(sup, id, incoming, now);
    }

    /// Carries out `incoming` and the requests buffered behind it on the same connection, in
    /// order, until one has to wait for its answer or none is left. Returns whether it carried
    /// out any request.
    fn serve_requests(
        &mut self,
        sup: &mut Supervisor,
        id: u64,
        mut incoming: Incoming,
        now: Instant,
    ) -> bool {
        let mut served = false;
        loop {
            match incoming {
                Incoming::Request(req) => {
                    served = true;
                    if let Some(response) = self.handle(sup, id, req, now) {
                        let Some(control) = self.server.as_mut() else {
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
                    if let Some(control) = self.server.as_mut() {
                        control.flush(id);
                    }
                    return served;
                }
                Incoming::Closed => {
                    // Results nobody will collect are not kept.
                    let mut unwanted = self.waits.remove(&id).unwrap_or_default();
                    for w in self.waiters.iter_mut().filter(|w| w.conn == id) {
                        if let WaitKind::Results { batches } = &mut w.kind {
                            unwanted.append(batches);
                        }
                    }
                    self.waiters.retain(|w| w.conn != id);
                    for (queue, first, end) in unwanted {
                        if let Some(q) = sup.queues.get_mut(&queue) {
                            q.unwatch(first, end);
                        }
                    }
                    return served;
                }
            }
        }
    }

    /// Carries out a request; `None` when the answer waits for a condition.
    fn handle(
        &mut self,
        sup: &mut Supervisor,
        conn: u64,
        req: Request,
        now: Instant,
    ) -> Option<Response> {
        if let Phase::ShuttingDown { .. } = sup.phase {
            // Status still answers, and a shutdown waits for the stop under way.
            if !matches!(req, Request::Status { .. } | Request::Shutdown) {
                return Some(Response::error(RefusedError::Stopping));
            }
        }
        let progress = format!("waiting for {}", req.describe());
        let result = match req {
            Request::Status { program } => return Some(sup.status(program.as_deref(), now)),
            Request::Reload => sup
                .reload(now)
                .map(|(changes, pools)| WaitKind::Settled {
                    pools,
                    result: ReloadResult { changes }.into(),
                })
                .map_err(RefusedError::from),
            Request::Start { target } => sup.start(&target, now),
            Request::Stop { target } => sup.stop_target(&target, now),
            Request::Restart { target } => sup.restart(&target, now),
            Request::Scale { program, workers } => sup.scale(&program, workers),
            Request::Logs {
                target,
                lines,
                follow,
            } => return self.logs(sup, conn, target, lines, follow),
            Request::Signal {
                target,
                signal,
                group,
            } => {
                return Some(match sup.signal(&target, &signal, group) {
                    Ok(sent) => Response::ok(sent),
                    Err(refused) => Response::error(refused),
                })
            }
            Request::Shutdown => Ok(sup.shutdown()),
            Request::Submit {
                queue,
                jobs,
                key,
                base64,
                wait,
            } => match self.submit(sup, conn, queue, jobs, key, base64, wait) {
                Ok(kind) => Ok(kind),
                Err(response) => return Some(response),
            },
            Request::Results => {
                let batches = self.waits.remove(&conn).unwrap_or_default();
                Ok(WaitKind::Results { batches })
            }
            Request::Queue { queue, dead } => {
                match sup.remote_query(queue.as_deref(), dead, None) {
                    Some(Ok(kind)) => Ok(kind),
                    Some(Err(response)) => return Some(response),
                    None => return Some(queue_report(sup, queue, dead)),
                }
            }
            Request::Members => return Some(sup.cluster.members_report()),
            Request::Requeue { queue, ids, all } => {
                let ids = (!all).then_some(ids);
                if ids.as_ref().is_some_and(|i| i.is_empty()) {
                    return Some(Response::error("requeue: name dead letter ids, or --all"));
                }
                match sup.remote_query(Some(&queue), false, Some(ids.clone())) {
                    Some(Ok(kind)) => Ok(kind),
                    Some(Err(response)) => return Some(response),
                    None => {
                        return Some(match sup.requeue(&queue, ids.as_deref()) {
                            Ok(n) => Response::ok(crate::protocol::Requeued { queue, requeued: n }),
                            Err(e) => Response::error(e),
                        })
                    }
                }
            }
        };
        match result {
            Err(refused) => Some(Response::error(refused)),
            Ok(kind) => {
                // The acknowledgement: the client knows at once that the master is at work.
                if let Some(c) = self.server.as_mut() {
                    c.progress(conn, &progress);
                }
                self.waiters.push(Waiter {
                    conn,
                    kind,
                    progress,
                    next_progress: now + protocol::PROGRESS_EVERY,
                });
                None
            }
        }
    }

    /// Takes a `submit` batch: decoded, checked and enqueued now; the answer waits for the
    /// batch to be on disk (a durable queue), which the waiter of kind `Stored` sees.
    #[allow(clippy::too_many_arguments)]
    fn submit(
        &mut self,
        sup: &mut Supervisor,
        conn: u64,
        queue: String,
        jobs: Vec<String>,
        key: Option<String>,
        base64: bool,
        wait: bool,
    ) -> Result<WaitKind, Response> {
        let mut payloads = Vec::with_capacity(jobs.len());
        for (i, j) in jobs.into_iter().enumerate() {
            if !base64 {
                payloads.push(j.into_bytes());
                continue;
            }
            match protocol::decode_bytes(&j, true) {
                Ok(bytes) => payloads.push(bytes),
                Err(e) => {
                    return Err(Response::error(format!(
                        "job {} of the batch is not valid base64: {e}",
                        i + 1
                    )))
                }
            }
        }
        if payloads.is_empty() {
            return Err(Response::error("submit: no job in the batch"));
        }
        let (first, end) = sup
            .submit(&queue, key.as_deref().map(str::as_bytes), payloads, wait)
            .map_err(Response::error)?;
        if wait {
            self.waits
                .entry(conn)
                .or_default()
                .push((queue.clone(), first, end));
        }
        Ok(WaitKind::Stored { queue, first, end })
    }

    /// Answers every waiter whose condition now holds, then carries out the requests its
    /// client had pipelined behind the one answered (they were read already: poll will not
    /// report them again). Returns whether it carried out any: the caller plans again then.
    fn check_waiters(&mut self, sup: &mut Supervisor, now: Instant) -> bool {
        if self.waiters.is_empty() {
            return false;
        }
        let mut served = false;
        let waiters = std::mem::take(&mut self.waiters);
        for mut w in waiters {
            if let WaitKind::Results { batches } = &mut w.kind {
                if !batches.is_empty() {
                    if self.stream_results(sup, w.conn, batches, now) {
                        served |= self.serve_next(sup, w.conn, now);
                    } else {
                        self.waiters.push(w);
                    }
                    continue;
                }
            }
            match sup.outcome(&w.kind, now) {
                None => self.waiters.push(w),
                Some(mut response) => {
                    if let Response::Ok(protocol::Answer::Submitted(s)) = &mut response {
                        // The results ready so far ride along, so they do not pile up.
                        if let Some(batches) = self.waits.get_mut(&w.conn) {
                            take_ready(sup, batches, RESULTS_PER_ANSWER, &mut s.results);
                        }
                    }
                    let Some(c) = self.server.as_mut() else {
                        continue;
                    };
                    c.respond(w.conn, response, now);
                    let next = c.next_request(w.conn, now);
                    served |= self.serve_requests(sup, w.conn, next, now);
                }
            }
        }
        served
    }

    /// Sends the results of `batches` (queue, next id, end) that have come, in submission
    /// order, as one line, at most [`RESULTS_PER_LINE`] per line and only while the client
    /// keeps up with what it was sent; what it sent is no longer kept. Returns true when the
    /// last result went out: that line was the request's answer.
    fn stream_results(
        &mut self,
        sup: &mut Supervisor,
        conn: u64,
        batches: &mut Vec<(String, u64, u64)>,
        now: Instant,
    ) -> bool {
        let Some(control) = self.server.as_mut() else {
            return false;
        };
        let mut results = Vec::new();
        while control.backlog(conn) < STREAM_BACKLOG {
            let before = results.len();
            take_ready(sup, batches, RESULTS_PER_LINE, &mut results);
            if batches.is_empty() {
                control.respond(conn, Response::ok(protocol::JobResults { results }), now);
                return true;
            }
            if results.len() == before && results.len() < RESULTS_PER_LINE {
                break;
            }
            let line = std::mem::take(&mut results);
            if !line.is_empty()
                && !control.stream(conn, Response::ok(protocol::JobResults { results: line }))
            {
                return true;
            }
        }
        false
    }

    /// Carries out what the client pipelined behind a request just answered.
    fn serve_next(&mut self, sup: &mut Supervisor, conn: u64, now: Instant) -> bool {
        let Some(c) = self.server.as_mut() else {
            return false;
        };
        let next = c.next_request(conn, now);
        self.serve_requests(sup, conn, next, now)
    }

    /// Sends the progress lines that are due to the requests still waiting; returns when the
    /// next one is. A deadline exists only while a request waits: an idle master has no timer.
    fn send_progress(&mut self, now: Instant) -> Option<Instant> {
        let control = self.server.as_mut()?;
        for w in &mut self.waiters {
            if w.next_progress <= now {
                control.progress(w.conn, &w.progress);
                w.next_progress = now + protocol::PROGRESS_EVERY;
            }
        }
        self.waiters.iter().map(|w| w.next_progress).min()
    }

    /// Answers what is still waiting: the master is going away.
    fn abandon_waiters(&mut self, sup: &Supervisor) {
        let now = Instant::now();
        for w in std::mem::take(&mut self.waiters) {
            let response = sup
                .outcome(&w.kind, now)
                .unwrap_or_else(|| Response::error("the master stopped"));
            if let Some(c) = self.server.as_mut() {
                c.respond(w.conn, response, now);
            }
        }
    }

    /// The last `lines` lines of worker output; with `follow`, the connection keeps receiving
    /// new lines (one `{"ok":true,"result":{"lines":[…]}}` object per batch).
    fn logs(
        &mut self,
        sup: &Supervisor,
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
            if sup.pool(&parsed.program).is_none() {
                return Some(Response::error(RefusedError::NoProgram {
                    program: parsed.program,
                }));
            }
        }
        let lines = sup
            .log_ring
            .tail(lines, target.as_deref())
            .map(protocol::LogEntry::from)
            .collect();
        let response = Response::ok(LogsResult { lines });
        if !follow {
            return Some(response);
        }
        let next = sup.log_ring.next_seq();
        if let Some(c) = self.server.as_mut() {
            if c.stream(conn, response) {
                self.followers.push((conn, target, next));
            }
        }
        None
    }

    /// Sends new worker lines to `logs --follow` connections.
    fn feed_followers(&mut self, sup: &Supervisor) {
        if self.followers.is_empty() {
            return;
        }
        let next = sup.log_ring.next_seq();
        let Some(control) = self.server.as_mut() else {
            return;
        };
        let ring = &sup.log_ring;
        self.followers.retain_mut(|(conn, filter, seq)| {
            if *seq == next {
                return control.conns.contains_key(conn);
            }
            let lines: Vec<protocol::LogEntry> = ring
                .since(*seq)
                .filter(|l| filter.as_deref().is_none_or(|f| l.matches(f)))
                .map(protocol::LogEntry::from)
                .collect();
            *seq = next;
            lines.is_empty() && control.conns.contains_key(conn)
                || control.stream(*conn, Response::ok(LogsResult { lines }))
        });
    }
}

impl Subsystem for Clients {
    fn part(&self) -> Part {
        Part::Control
    }

    fn ready(&mut self, sup: &mut Supervisor, local: u64, ready: Ready, now: Instant) {
        if local == LISTENER {
            if let Some(c) = self.server.as_mut() {
                c.accept(now);
            }
        } else {
            self.serve_client(sup, local, ready.0);
        }
    }

    fn after_pass(&mut self, sup: &mut Supervisor, now: Instant) -> Option<Instant> {
        while self.check_waiters(sup, now) {
            // Pipelined requests were carried out behind an answered one: act on them
            // before sleeping. Each round consumes buffered request lines, so this ends.
            sup.settle(now);
        }
        let progress_due = self.send_progress(now);
        self.feed_followers(sup);
        self.watch(sup, now);
        let recheck = self
            .waiters
            .iter()
            .filter_map(|w| sup.recheck_at(&w.kind, now))
            .min();
        let expiry = self.server.as_mut().and_then(|c| c.expire(now));
        let resume = self.server.as_ref().and_then(|c| c.resume_at());
        let due = super::earliest(super::earliest(progress_due, expiry), recheck);
        super::earliest(due, resume)
    }

    fn finish(&mut self, sup: &mut Supervisor) {
        self.abandon_waiters(sup);
        if let Some(c) = self.server.take() {
            c.close();
        }
    }
}

/// The answer of `queue`: counts of one queue or all, or one queue's dead letters.
fn queue_report(sup: &Supervisor, queue: Option<String>, dead: bool) -> Response {
    let queues = &sup.queues;
    if dead {
        let Some(name) = queue else {
            return Response::error("queue --dead: name the queue");
        };
        let Some(q) = queues.get(&name) else {
            return Response::error(format!("no queue named {name}"));
        };
        let dead = q
            .state
            .dead()
            .map(|d| {
                let (payload, b64) = protocol::encode_bytes(&d.job.payload);
                let (reason, reason_base64) = protocol::encode_bytes(&d.reason);
                protocol::DeadLetter {
                    id: d.job.id,
                    attempts: d.job.attempts,
                    reason,
                    reason_base64,
                    payload,
                    key: d
                        .job
                        .key
                        .as_ref()
                        .map(|k| String::from_utf8_lossy(k).into_owned()),
                    base64: b64,
                }
            })
            .collect();
        return Response::ok(protocol::DeadLetters { queue: name, dead });
    }
    let list: Vec<protocol::QueueCounts> = match &queue {
        None => queues.queues.iter().map(super::queues::report).collect(),
        Some(name) => match queues.get(name) {
            Some(q) => vec![super::queues::report(q)],
            None => return Response::error(format!("no queue named {name}")),
        },
    };
    Response::ok(protocol::QueueReport { queues: list })
}

/// Takes the results that have come for `batches` (queue, next id, end), in submission order,
/// up to `max` in `out`; batches fully taken are dropped.
fn take_ready(
    sup: &mut Supervisor,
    batches: &mut Vec<(String, u64, u64)>,
    max: usize,
    out: &mut Vec<protocol::JobResult>,
) {
    let mut done = 0;
    for (queue, next, end) in batches.iter_mut() {
        match sup.queues.get_mut(queue) {
            Some(q) => q.take_results(next, *end, max, out),
            None => *next = *end,
        }
        if *next < *end {
            break;
        }
        done += 1;
    }
    batches.drain(..done);
}
