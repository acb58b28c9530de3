//! The master's side of the control socket: accepting, checking who connects, reading
//! request lines and writing responses without ever blocking the master.
//!
//! Bounds: at most [`MAX_CONNECTIONS`] clients, [`MAX_REQUEST`] bytes per request line,
//! [`MAX_PENDING_OUTPUT`] bytes of unread responses, and a connection that has not sent a
//! full request within [`IDLE_TIMEOUT`] is closed. The timeout is a deadline in the master's
//! loop only while such a connection is open: an idle master with no client has no timer.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::config::GroupSpec;
use crate::protocol::{parse_request_line, Progress, Request, Response, MAX_REQUEST};

pub const MAX_CONNECTIONS: usize = 128;
pub const MAX_PENDING_OUTPUT: usize = 16 * 1024 * 1024;
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the listener is left alone after an accept failed for a reason that a retry at
/// once would meet again (out of descriptors with no spare left, out of memory).
pub const ACCEPT_PAUSE: Duration = Duration::from_millis(250);

/// Who may command the master: root, the master's own user, and members of `control_group`.
#[derive(Debug, Clone)]
pub struct Access {
    pub uid: u32,
    pub group: Option<GroupSpec>,
}

impl Access {
    pub fn allows(&self, uid: u32, gid: u32) -> bool {
        if uid == 0 || uid == self.uid {
            return true;
        }
        let Some(group) = &self.group else {
            return false;
        };
        if gid == group.gid {
            return true;
        }
        // SO_PEERCRED carries only the primary group: look up the membership by user name.
        let name = nix::unistd::User::from_uid(uid.into())
            .ok()
            .flatten()
            .map(|u| u.name);
        let members = nix::unistd::Group::from_gid(group.gid.into())
            .ok()
            .flatten()
            .map(|g| g.mem);
        matches!((name, members), (Some(n), Some(m)) if m.contains(&n))
    }
}

pub struct Conn {
    stream: UnixStream,
    input: Vec<u8>,
    output: Vec<u8>,
    /// Since when the connection waits for a complete request.
    idle_since: Instant,
    /// A request is being carried out; no other is read until it is answered.
    pub busy: bool,
    /// The request being carried out asked for progress lines while it waits.
    pub progress: bool,
    /// Close once the output is written.
    closing: bool,
}

/// What a readable connection produced.
pub enum Incoming {
    Nothing,
    Request(Request),
    Closed,
}

pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
    access: Access,
    pub conns: HashMap<u64, Conn>,
    next_id: u64,
    /// A descriptor (of /dev/null) held to be given up when the master runs out (EMFILE):
    /// closing it lets the master take the waiting connection, tell its client why it is
    /// refused, and close it. Without it the connection would stay in the backlog and the
    /// listener readable, which a level-triggered loop meets again at once: a busy loop.
    spare: Option<std::fs::File>,
    /// Accepting failed in a way a retry at once would meet again: the listener is left
    /// alone until then.
    paused_until: Option<Instant>,
    /// Out of descriptors: said once in the log, until a connection is taken again.
    starved: bool,
}

impl ControlServer {
    /// Binds `path` (a stale socket file from a crashed master is replaced: the pidfile lock
    /// proves it is ours) with mode 0600, or 0660 and the control group.
    pub fn bind(path: &Path, access: Access) -> io::Result<ControlServer> {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = UnixListener::bind(path)?;
        listener.set_nonblocking(true)?;
        let mode = if access.group.is_some() { 0o660 } else { 0o600 };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
        if let Some(g) = &access.group {
            crate::sys::set_group(path, g.gid)?;
        }
        Ok(ControlServer {
            listener,
            path: path.to_path_buf(),
            access,
            conns: HashMap::new(),
            next_id: 0,
            spare: spare_descriptor(),
            paused_until: None,
            starved: false,
        })
    }

    /// Whether the listener is to be watched now: false while accepting is paused.
    pub fn accepting(&mut self, now: Instant) -> bool {
        match self.paused_until {
            Some(until) if now < until => false,
            _ => {
                self.paused_until = None;
                true
            }
        }
    }

    /// When a paused listener is to be watched again.
    pub fn resume_at(&self) -> Option<Instant> {
        self.paused_until
    }

    pub fn fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    /// Accepts every pending connection; refused ones get one error line and are closed.
    pub fn accept(&mut self, now: Instant) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                    if !self.starved {
                        log::error!(
                            "control socket: cannot take a connection: {e}; clients are refused \
                             until descriptors are freed"
                        );
                        self.starved = true;
                    }
                    match self.refuse_starved(&e) {
                        Ok(()) => continue,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                        Err(_) => {
                            self.paused_until = Some(now + ACCEPT_PAUSE);
                            return;
                        }
                    }
                }
                Err(e) => {
                    log::warn!("control socket: accept failed: {e}");
                    self.paused_until = Some(now + ACCEPT_PAUSE);
                    return;
                }
            };
            self.starved = false;
            let refusal = match crate::sys::peer_credentials(&stream) {
                Ok((uid, gid)) if self.access.allows(uid, gid) => None,
                Ok((uid, _)) => Some(format!(
                    "permission denied: uid {uid} may not command this master"
                )),
                Err(e) => Some(format!("cannot check peer credentials: {e}")),
            };
            let refusal = refusal.or_else(|| {
                (self.conns.len() >= MAX_CONNECTIONS)
                    .then(|| "too many control connections; try again".to_string())
            });
            if let Some(message) = refusal {
                log::warn!("control socket: {message}");
                let _ = stream.set_nonblocking(true);
                let _ = (&stream).write_all(&Response::error(message).to_line());
                continue;
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            self.next_id += 1;
            let conn = Conn {
                stream,
                input: Vec::new(),
                output: Vec::new(),
                idle_since: now,
                busy: false,
                progress: false,
                closing: false,
            };
            self.conns.insert(self.next_id, conn);
        }
    }

    /// Out of descriptors: gives up the spare one to take the waiting connection, tells its
    /// client why, closes it, and takes the spare again. Err when there is no spare, or the
    /// accept failed anyway (WouldBlock: nothing was waiting any more).
    fn refuse_starved(&mut self, why: &io::Error) -> io::Result<()> {
        if self.spare.take().is_none() {
            self.spare = spare_descriptor();
            return Err(io::Error::from_raw_os_error(libc::EMFILE));
        }
        let accepted = self.listener.accept();
        if let Ok((stream, _)) = &accepted {
            let message = format!("the master is out of file descriptors ({why}); try again");
            let _ = stream.set_nonblocking(true);
            let _ = (&*stream).write_all(&Response::error(message).to_line());
        }
        let result = accepted.map(drop);
        self.spare = spare_descriptor();
        result
    }

    /// (fd, wanted events as poll bits, connection id) for the reactor.
    pub fn poll_entries(&self) -> impl Iterator<Item = (RawFd, i16, u64)> + '_ {
        self.conns.iter().filter_map(|(&id, c)| {
            let mut events = 0;
            if !c.busy && !c.closing {
                events |= libc::POLLIN;
            }
            if !c.output.is_empty() {
                events |= libc::POLLOUT;
            }
            (events != 0).then(|| (c.stream.as_raw_fd(), events, id))
        })
    }

    /// Reads from connection `id`; returns the next complete request, if any.
    pub fn read(&mut self, id: u64, now: Instant) -> Incoming {
        let Some(conn) = self.conns.get_mut(&id) else {
            return Incoming::Nothing;
        };
        if conn.busy || conn.closing {
            return Incoming::Nothing;
        }
        let mut buf = [0u8; 8192];
        loop {
            match conn.stream.read(&mut buf) {
                Ok(0) => {
                    self.conns.remove(&id);
                    return Incoming::Closed;
                }
                Ok(n) => {
                    conn.input.extend_from_slice(&buf[..n]);
                    if conn.input.contains(&b'\n') || conn.input.len() > MAX_REQUEST {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.conns.remove(&id);
                    return Incoming::Closed;
                }
            }
        }
        self.next_request(id, now)
    }

    /// Takes the next buffered request of `id`, if a complete line holds one.
    ///
    /// Blank lines are skipped and lines that do not parse are answered with an error here,
    /// until a request parses or no complete line is left: the lines behind them were read
    /// already, and poll reports only bytes still in the socket, so a line left in the buffer
    /// would wait for the client to send more (a client that pipelines, then waits for its
    /// answers, would wait until the idle timeout).
    pub fn next_request(&mut self, id: u64, now: Instant) -> Incoming {
        let Some(conn) = self.conns.get_mut(&id) else {
            return Incoming::Nothing;
        };
        loop {
            let Some(end) = conn.input.iter().position(|&b| b == b'\n') else {
                if conn.input.len() > MAX_REQUEST {
                    let message = format!("request longer than {MAX_REQUEST} bytes");
                    conn.output.extend(Response::error(message).to_line());
                    conn.closing = true;
                    conn.input.clear();
                }
                return Incoming::Nothing;
            };
            let line: Vec<u8> = conn.input.drain(..=end).collect();
            conn.idle_since = now;
            if end > MAX_REQUEST {
                conn.output.extend(
                    Response::error(format!("request longer than {MAX_REQUEST} bytes")).to_line(),
                );
                conn.closing = true;
                return Incoming::Nothing;
            }
            if line.iter().all(|b| b.is_ascii_whitespace()) {
                continue;
            }
            match parse_request_line(&line[..end]) {
                Ok((req, progress)) => {
                    conn.busy = true;
                    conn.progress = progress;
                    return Incoming::Request(req);
                }
                Err(message) => {
                    let reply = Response::error(message).to_line();
                    if conn.output.len() + reply.len() > MAX_PENDING_OUTPUT {
                        log::warn!(
                            "control socket: a client does not read its responses; closing it"
                        );
                        self.conns.remove(&id);
                        return Incoming::Closed;
                    }
                    conn.output.extend(reply);
                }
            }
        }
    }

    /// Queues the answer to the request `id` was busy with.
    pub fn respond(&mut self, id: u64, response: Response, now: Instant) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        conn.busy = false;
        conn.idle_since = now;
        let line = response.to_line();
        if conn.output.len() + line.len() > MAX_PENDING_OUTPUT {
            log::warn!("control socket: a client does not read its responses; closing it");
            self.conns.remove(&id);
            return;
        }
        conn.output.extend(line);
        self.flush(id);
    }

    /// Bytes queued for a connection and not yet taken by its client (0 for one that is
    /// gone): a stream sends more only while this is small.
    pub fn backlog(&self, id: u64) -> usize {
        self.conns.get(&id).map_or(0, |c| c.output.len())
    }

    /// Queues a line for a connection that stays busy (a `logs --follow` stream). Returns
    /// false when the connection is gone or its reader fell too far behind (it is closed).
    pub fn stream(&mut self, id: u64, response: Response) -> bool {
        let Some(conn) = self.conns.get_mut(&id) else {
            return false;
        };
        let line = response.to_line();
        if conn.output.len() + line.len() > MAX_PENDING_OUTPUT {
            self.conns.remove(&id);
            return false;
        }
        conn.output.extend(line);
        self.flush(id);
        self.conns.contains_key(&id)
    }

    /// Tells a busy connection whose request asked for it that its request is still being
    /// carried out (`{"progress":…}`); does nothing for the others.
    pub fn progress(&mut self, id: u64, text: &str) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        if !conn.busy || !conn.progress {
            return;
        }
        let line = Progress {
            progress: text.to_string(),
        }
        .to_line();
        if conn.output.len() + line.len() > MAX_PENDING_OUTPUT {
            // Unread progress lines pile up only for a client that reads nothing.
            return;
        }
        conn.output.extend(line);
        self.flush(id);
    }

    /// Writes what the socket takes now.
    pub fn flush(&mut self, id: u64) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        while !conn.output.is_empty() {
            match conn.stream.write(&conn.output) {
                Ok(0) => break,
                Ok(n) => {
                    conn.output.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.conns.remove(&id);
                    return;
                }
            }
        }
        if conn.closing && conn.output.is_empty() {
            self.conns.remove(&id);
        }
    }

    /// Closes connections idle past the timeout; returns the next such deadline.
    pub fn expire(&mut self, now: Instant) -> Option<Instant> {
        self.conns
            .retain(|_, c| c.busy || now.duration_since(c.idle_since) < IDLE_TIMEOUT);
        self.conns
            .values()
            .filter(|c| !c.busy)
            .map(|c| c.idle_since + IDLE_TIMEOUT)
            .min()
    }

    pub fn close(self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A descriptor to keep in reserve for when the master runs out (close-on-exec, as std
/// opens files): [`ControlServer`] keeps one, and so does the metrics endpoint.
pub(crate) fn spare_descriptor() -> Option<std::fs::File> {
    std::fs::File::open("/dev/null")
        .map_err(|e| log::debug!("no spare descriptor: {e}"))
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A distinct answer per `n`, to tell which request a line answers.
    fn answer(n: u32) -> Response {
        Response::ok(crate::protocol::ScaleResult {
            program: "p".into(),
            workers: n,
        })
    }

    #[test]
    fn access_rules() {
        let a = Access {
            uid: 1000,
            group: None,
        };
        assert!(a.allows(0, 0));
        assert!(a.allows(1000, 1000));
        assert!(!a.allows(1001, 1000));
        let g = Access {
            uid: 1000,
            group: Some(GroupSpec {
                name: "ops".into(),
                gid: 4242,
            }),
        };
        assert!(g.allows(1001, 4242));
        assert!(!g.allows(1001, 1001));
    }

    #[test]
    fn requests_are_read_answered_and_garbage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let me = nix::unistd::geteuid().as_raw();
        let mut server = ControlServer::bind(
            &path,
            Access {
                uid: me,
                group: None,
            },
        )
        .unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let mut client = UnixStream::connect(&path).unwrap();
        let now = Instant::now();
        server.accept(now);
        let id = *server.conns.keys().next().unwrap();

        client
            .write_all(b"garbage\n{\"cmd\":\"status\"}\n")
            .unwrap();
        let got = loop {
            match server.read(id, now) {
                Incoming::Request(r) => break r,
                Incoming::Closed => panic!("closed"),
                Incoming::Nothing => {}
            }
        };
        assert_eq!(got, Request::Status { program: None });
        server.respond(id, answer(1), now);
        let mut reader = io::BufReader::new(client.try_clone().unwrap());
        let mut line = String::new();
        io::BufRead::read_line(&mut reader, &mut line).unwrap();
        assert!(
            line.starts_with(r#"{"ok":false,"error":"bad request"#),
            "{line}"
        );
        line.clear();
        io::BufRead::read_line(&mut reader, &mut line).unwrap();
        assert_eq!(
            line,
            "{\"ok\":true,\"result\":{\"program\":\"p\",\"workers\":1}}\n"
        );

        // An overlong line: an error, then the connection closes.
        client.write_all(&vec![b'x'; MAX_REQUEST + 10]).unwrap();
        let mut closed = false;
        for _ in 0..100 {
            if let Incoming::Closed = server.read(id, now) {
                closed = true;
                break;
            }
            server.flush(id);
            if !server.conns.contains_key(&id) {
                closed = true;
                break;
            }
        }
        assert!(closed, "overlong request did not close the connection");
        line.clear();
        io::BufRead::read_line(&mut reader, &mut line).unwrap();
        assert!(line.contains("longer than"), "{line}");
    }

    /// Regression: lines pipelined behind a bad or blank line stayed in the buffer until the
    /// client sent more bytes, since poll does not report bytes already read.
    #[test]
    fn pipelined_requests_behind_bad_and_blank_lines_come_from_one_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let me = nix::unistd::geteuid().as_raw();
        let access = Access {
            uid: me,
            group: None,
        };
        let mut server = ControlServer::bind(&path, access).unwrap();
        let mut client = UnixStream::connect(&path).unwrap();
        let now = Instant::now();
        server.accept(now);
        let id = *server.conns.keys().next().unwrap();

        client
            .write_all(
                b"garbage\n\n \r\n{\"cmd\":\"nope\"}\n{\"cmd\":\"reload\"}\n{\"cmd\":\"status\"}\n",
            )
            .unwrap();
        match server.read(id, now) {
            Incoming::Request(r) => assert_eq!(r, Request::Reload),
            _ => panic!("the request behind two bad lines was not taken"),
        }
        server.respond(id, answer(1), now);
        match server.next_request(id, now) {
            Incoming::Request(r) => assert_eq!(r, Request::Status { program: None }),
            _ => panic!("the second pipelined request was not taken"),
        }
        server.respond(id, answer(2), now);
        let mut reader = io::BufReader::new(client);
        let answers: Vec<String> = (0..4)
            .map(|_| {
                let mut line = String::new();
                io::BufRead::read_line(&mut reader, &mut line).unwrap();
                line
            })
            .collect();
        assert!(answers[0].starts_with(r#"{"ok":false,"error":"bad request"#));
        assert!(answers[1].starts_with(r#"{"ok":false,"error":"bad request"#));
        assert_eq!(
            answers[2],
            "{\"ok\":true,\"result\":{\"program\":\"p\",\"workers\":1}}\n"
        );
        assert_eq!(
            answers[3],
            "{\"ok\":true,\"result\":{\"program\":\"p\",\"workers\":2}}\n"
        );
    }

    #[test]
    fn idle_connections_expire() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        let me = nix::unistd::geteuid().as_raw();
        let mut server = ControlServer::bind(
            &path,
            Access {
                uid: me,
                group: None,
            },
        )
        .unwrap();
        let _client = UnixStream::connect(&path).unwrap();
        let t = Instant::now();
        server.accept(t);
        assert_eq!(server.expire(t), Some(t + IDLE_TIMEOUT));
        assert_eq!(server.expire(t + IDLE_TIMEOUT), None);
        assert!(server.conns.is_empty());
    }
}
