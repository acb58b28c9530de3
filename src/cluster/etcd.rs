//! A small blocking client of etcd's v3 JSON gateway (`/v3/kv/*`, `/v3/lease/*`,
//! `/v3/watch`), over HTTP/1.1 with the `ureq` crate.
//!
//! Why this and not gRPC: there is no well-kept blocking gRPC client for Rust, and the async
//! ones bring a runtime into a helper that needs three calls. The gateway is part of every
//! etcd since 3.3 (paths under `/v3/` from 3.4) and speaks JSON with keys and values in
//! base64. A request is one `POST` on a fresh connection (no pool: no idle connection that
//! etcd may have closed meanwhile, so there is no connection state to get wrong), bounded as a
//! whole by the client's timeout. A watch is one long `POST` whose body carries one JSON
//! message per line.
//!
//! Endpoints: `http://HOST:PORT` or `https://HOST:PORT` URLs (TLS by rustls, the server's
//! certificate checked against the system's trust store); a call that cannot reach one
//! (refused, timed out, cut mid-answer, a TLS failure) moves on to the next, round the list
//! once. A user in a URL is refused when the client is made (no etcd authentication); a URL is
//! never printed with its password ([`redact`]).

use std::io::{self, BufRead, BufReader};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};

/// The most an answer may weigh: a range of every member record stays far below.
const MAX_BODY: usize = 16 << 20;

/// How long one watch request may last before it is made again (from the same revision, so
/// nothing is missed): a waiter that gave up leaves its reading thread behind at most this
/// long, and an etcd that froze under a watch is noticed within it.
const WATCH_SPAN: Duration = Duration::from_secs(60);

/// What went wrong talking to etcd; each names the endpoint (redacted) and the call.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("invalid etcd endpoint {url}: {reason}")]
    Endpoint { url: String, reason: String },
    #[error("etcd {endpoint}{path}: {source}")]
    Io {
        endpoint: String,
        path: String,
        source: io::Error,
    },
    #[error("etcd {endpoint}{path}: HTTP {status}: {message}")]
    Status {
        endpoint: String,
        path: String,
        status: u16,
        message: String,
    },
    #[error("etcd {endpoint}{path}: bad answer: {reason}")]
    Garbled {
        endpoint: String,
        path: String,
        reason: String,
    },
    #[error("etcd {endpoint}{path}: TLS: {reason}")]
    Tls {
        endpoint: String,
        path: String,
        reason: String,
    },
}

impl EtcdError {
    /// Whether another endpoint might do better (not an answer etcd gave on purpose).
    fn is_transport(&self) -> bool {
        matches!(
            self,
            EtcdError::Io { .. } | EtcdError::Garbled { .. } | EtcdError::Tls { .. }
        )
    }
}

/// `http://user:pass@host:2379` → `http://***@host:2379`: what logs and messages show.
pub fn redact(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let (auth, tail) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match auth.rfind('@') {
        Some(at) => format!("{scheme}://***@{}{tail}", &auth[at + 1..]),
        None => url.to_string(),
    }
}

/// Whether this client can use `url` (an http:// or https:// URL without a user); else why
/// not, the URL redacted. `plumule check` warns with it.
pub fn check_endpoint(url: &str) -> Result<(), String> {
    parse_endpoint(url).map(|_| ()).map_err(|e| e.to_string())
}

#[derive(Debug, Clone)]
struct Endpoint {
    /// `http://host:port` or `https://host:port`: where requests go, and how messages name
    /// it (it never has a user).
    shown: String,
}

fn parse_endpoint(url: &str) -> Result<Endpoint, EtcdError> {
    let bad = |reason: &str| EtcdError::Endpoint {
        url: redact(url),
        reason: reason.to_string(),
    };
    let (scheme, rest) = if let Some(r) = url.strip_prefix("http://") {
        ("http", r)
    } else if let Some(r) = url.strip_prefix("https://") {
        ("https", r)
    } else {
        return Err(bad("expected http://HOST:PORT or https://HOST:PORT"));
    };
    let auth = rest.split('/').next().unwrap_or("");
    if auth.contains('@') {
        return Err(bad(
            "etcd authentication is not supported: give the endpoint without a user",
        ));
    }
    if auth.is_empty() {
        return Err(bad("no host"));
    }
    // Bracketed IPv6 keeps its colons; a port is whatever follows the last one outside them.
    let has_port = auth.rsplit_once(':').is_some_and(|(h, p)| {
        !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && !h.is_empty()
    }) && !auth.ends_with(']');
    let authority = if has_port {
        auth.to_string()
    } else {
        format!("{auth}:2379")
    };
    let shown = format!("{scheme}://{authority}");
    // What ureq would refuse later (a bad character in the host) is refused here, by name.
    if shown.parse::<ureq::http::Uri>().is_err() {
        return Err(bad("not a valid URL"));
    }
    Ok(Endpoint { shown })
}

/// One key and value as etcd returns them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    pub key: String,
    pub value: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub lease: i64,
}

/// A blocking client over a list of endpoints.
#[derive(Debug, Clone)]
pub struct Client {
    endpoints: Vec<Endpoint>,
    /// The endpoint that answered last: tried first.
    current: usize,
    /// The most one call may take, connection included.
    pub timeout: Duration,
    /// The longest a watch lasts before it is made again ([`WATCH_SPAN`]).
    watch_span: Duration,
    agent: ureq::Agent,
}

fn b64(s: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn unb64(v: &Value) -> Vec<u8> {
    v.as_str()
        .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
        .unwrap_or_default()
}

/// etcd's JSON gives 64-bit numbers as strings ("12"), and leaves out zeros.
pub fn int(v: &Value) -> i64 {
    match v {
        Value::String(s) => s.parse().unwrap_or(0),
        Value::Number(n) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

/// The end of the range of every key that starts with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn kv_of(v: &Value) -> Kv {
    Kv {
        key: String::from_utf8_lossy(&unb64(&v["key"])).into_owned(),
        value: unb64(&v["value"]),
        create_revision: int(&v["create_revision"]),
        mod_revision: int(&v["mod_revision"]),
        lease: int(&v["lease"]),
    }
}

impl Client {
    /// A client of these endpoints; an invalid URL (or one with a user) is an error naming it.
    pub fn new(urls: &[String], timeout: Duration) -> Result<Client, EtcdError> {
        let endpoints = urls
            .iter()
            .map(|u| parse_endpoint(u))
            .collect::<Result<Vec<_>, _>>()?;
        if endpoints.is_empty() {
            return Err(EtcdError::Endpoint {
                url: String::new(),
                reason: "no endpoint".into(),
            });
        }
        Ok(Client {
            endpoints,
            current: 0,
            timeout,
            watch_span: WATCH_SPAN,
            agent: agent(),
        })
    }

    /// The endpoints, as messages show them.
    pub fn describe(&self) -> String {
        self.endpoints
            .iter()
            .map(|e| e.shown.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// POSTs `body` to `path` on the current endpoint, then the others in turn while the
    /// failure is one of transport. Returns the answer's JSON.
    pub fn call(&mut self, path: &str, body: &Value) -> Result<Value, EtcdError> {
        let n = self.endpoints.len();
        let mut last = None;
        for i in 0..n {
            let at = (self.current + i) % n;
            match post(&self.agent, &self.endpoints[at], path, body, self.timeout) {
                Ok(v) => {
                    self.current = at;
                    return Ok(v);
                }
                Err(e) if e.is_transport() => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.expect("at least one endpoint"))
    }

    /// Grants a lease of `ttl` (rounded up to whole seconds); returns its id and granted TTL.
    pub fn grant(&mut self, ttl: Duration) -> Result<(i64, Duration), EtcdError> {
        let secs = ttl.as_millis().div_ceil(1000).max(1) as i64;
        let v = self.call("/v3/lease/grant", &json!({ "TTL": secs }))?;
        let id = int(&v["ID"]);
        if id == 0 {
            return Err(self.garbled("/v3/lease/grant", &v));
        }
        Ok((id, Duration::from_secs(int(&v["TTL"]).max(0) as u64)))
    }

    /// Renews the lease; `Ok(None)` when etcd no longer knows it (it expired).
    pub fn keep_alive(&mut self, lease: i64) -> Result<Option<Duration>, EtcdError> {
        let v = self.call("/v3/lease/keepalive", &json!({ "ID": lease.to_string() }))?;
        let ttl = int(&v["result"]["TTL"]);
        Ok((ttl > 0).then(|| Duration::from_secs(ttl as u64)))
    }

    /// Revokes the lease: its keys go at once.
    pub fn revoke(&mut self, lease: i64) -> Result<(), EtcdError> {
        match self.call("/v3/lease/revoke", &json!({ "ID": lease.to_string() })) {
            Ok(_) => Ok(()),
            // Already gone: what we wanted.
            Err(EtcdError::Status { message, .. }) if message.contains("not found") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Creates `key` with `value` under `lease` unless it exists; returns whether it was
    /// created, and the key as it is now (ours or the other one).
    pub fn create(&mut self, key: &str, value: &[u8], lease: i64) -> Result<(bool, Kv), EtcdError> {
        let k = b64(key.as_bytes());
        let v = self.call(
            "/v3/kv/txn",
            &json!({
                "compare": [{ "key": k, "target": "CREATE", "create_revision": "0" }],
                "success": [
                    { "request_put": { "key": k, "value": b64(value), "lease": lease.to_string() } },
                    { "request_range": { "key": k } }
                ],
                "failure": [{ "request_range": { "key": k } }],
            }),
        )?;
        let created = v["succeeded"].as_bool().unwrap_or(false);
        let kv = v["responses"]
            .as_array()
            .and_then(|r| r.iter().find_map(|r| r["response_range"]["kvs"].get(0)))
            .map(kv_of)
            .ok_or_else(|| self.garbled("/v3/kv/txn", &v))?;
        Ok((created, kv))
    }

    /// Puts `key` under `lease` (0: none).
    pub fn put(&mut self, key: &str, value: &[u8], lease: i64) -> Result<(), EtcdError> {
        let mut req = json!({ "key": b64(key.as_bytes()), "value": b64(value) });
        if lease != 0 {
            req["lease"] = lease.to_string().into();
        }
        self.call("/v3/kv/put", &req).map(|_| ())
    }

    /// Every key under `prefix`, by key, and the store's revision.
    pub fn range_prefix(&mut self, prefix: &str) -> Result<(Vec<Kv>, i64), EtcdError> {
        let v = self.call(
            "/v3/kv/range",
            &json!({
                "key": b64(prefix.as_bytes()),
                "range_end": b64(&prefix_end(prefix.as_bytes())),
            }),
        )?;
        let kvs = v["kvs"]
            .as_array()
            .map(|a| a.iter().map(kv_of).collect())
            .unwrap_or_default();
        Ok((kvs, int(&v["header"]["revision"])))
    }

    /// Deletes `key`.
    pub fn delete(&mut self, key: &str) -> Result<(), EtcdError> {
        self.call("/v3/kv/deleterange", &json!({ "key": b64(key.as_bytes()) }))
            .map(|_| ())
    }

    /// Waits until `key` is deleted at a revision after `after`, or `give_up` says to stop
    /// (checked every `poll`), or `deadline` passes. `Ok(true)`: deleted.
    pub fn wait_deleted(
        &mut self,
        key: &str,
        after: i64,
        poll: Duration,
        give_up: &dyn Fn() -> bool,
    ) -> Result<bool, EtcdError> {
        let body = json!({ "create_request": {
            "key": b64(key.as_bytes()),
            "start_revision": (after + 1).to_string(),
        }});
        let ep = self.endpoints[self.current].clone();
        let path = "/v3/watch";
        let garbled = |reason: String| EtcdError::Garbled {
            endpoint: ep.shown.clone(),
            path: path.into(),
            reason,
        };
        // The messages are read by a thread of their own, so that `give_up` is looked at
        // every `poll` whatever the stream does; each watch lasts at most its span, then
        // the next one starts from the same revision.
        'watch: loop {
            if give_up() {
                return Ok(false);
            }
            let lines = watch(&self.agent, &ep, path, &body, self.timeout, self.watch_span)?;
            loop {
                if give_up() {
                    return Ok(false);
                }
                let msg = match lines.recv_timeout(poll) {
                    Ok(Ok(line)) => line,
                    Ok(Err(Ended::Span)) => continue 'watch,
                    Ok(Err(Ended::Closed)) => return Err(garbled("the watch ended".into())),
                    Ok(Err(Ended::Failed(e))) => return Err(e),
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => {
                        return Err(garbled("the watch ended".into()))
                    }
                };
                let v: Value = serde_json::from_slice(&msg).map_err(|e| garbled(e.to_string()))?;
                if v.get("error").is_some() || v["result"]["canceled"].as_bool() == Some(true) {
                    return Err(garbled(format!("the watch was refused: {v}")));
                }
                let deleted = v["result"]["events"]
                    .as_array()
                    .is_some_and(|ev| ev.iter().any(|e| e["type"] == "DELETE"));
                if deleted {
                    return Ok(true);
                }
            }
        }
    }

    fn garbled(&self, path: &str, v: &Value) -> EtcdError {
        let mut text = v.to_string();
        text.truncate(200);
        EtcdError::Garbled {
            endpoint: self.endpoints[self.current].shown.clone(),
            path: path.into(),
            reason: format!("unexpected {text}"),
        }
    }
}

/// The agent every call goes through: no pool (a fresh connection per call), no proxy from
/// the environment (etcd is reached directly), no redirect, HTTP errors given as answers (their
/// body says why), server certificates checked against the system's trust store.
fn agent() -> ureq::Agent {
    let tls = ureq::tls::TlsConfig::builder()
        .root_certs(ureq::tls::RootCerts::PlatformVerifier)
        .build();
    ureq::Agent::config_builder()
        .proxy(None)
        .max_redirects(0)
        .http_status_as_error(false)
        .max_idle_connections(0)
        .max_idle_connections_per_host(0)
        .tls_config(tls)
        .user_agent(concat!("plumule/", env!("CARGO_PKG_VERSION")))
        .build()
        .new_agent()
}

/// What went wrong in ureq, said for `path` of `ep`; a timeout says how long it waited.
fn failure(ep: &Endpoint, path: &str, timeout: Duration, e: ureq::Error) -> EtcdError {
    let io = |source| EtcdError::Io {
        endpoint: ep.shown.clone(),
        path: path.into(),
        source,
    };
    let garbled = |reason: String| EtcdError::Garbled {
        endpoint: ep.shown.clone(),
        path: path.into(),
        reason,
    };
    let tls = |reason: String| EtcdError::Tls {
        endpoint: ep.shown.clone(),
        path: path.into(),
        reason,
    };
    let timed_out = || {
        io(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer within {}", crate::format_duration(timeout)),
        ))
    };
    match e {
        ureq::Error::Timeout(_) => timed_out(),
        ureq::Error::Io(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            timed_out()
        }
        ureq::Error::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => io(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the connection was closed before the answer was whole",
        )),
        // rustls reports a failed handshake or a bad record as invalid data read.
        ureq::Error::Io(e)
            if e.kind() == io::ErrorKind::InvalidData && ep.shown.starts_with("https://") =>
        {
            tls(e.to_string())
        }
        ureq::Error::Io(e) => io(e),
        ureq::Error::HostNotFound => io(io::Error::new(
            io::ErrorKind::NotFound,
            "the host name has no address",
        )),
        ureq::Error::ConnectionFailed => io(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            "cannot connect",
        )),
        ureq::Error::Protocol(e) => garbled(format!("not an HTTP answer: {e}")),
        ureq::Error::BodyExceedsLimit(_) | ureq::Error::LargeResponseHeader(..) => {
            garbled("the answer is too large".into())
        }
        ureq::Error::Tls(why) => tls(why.into()),
        ureq::Error::Rustls(e) => tls(e.to_string()),
        e => garbled(e.to_string()),
    }
}

/// Sends the request; an HTTP error status is read whole and returned as
/// [`EtcdError::Status`]. The request carries its timeouts (see [`post`] and [`watch`]).
fn send(
    request: ureq::RequestBuilder<ureq::typestate::WithBody>,
    ep: &Endpoint,
    path: &str,
    body: &Value,
    timeout: Duration,
) -> Result<ureq::Body, EtcdError> {
    let answer = request
        .header("Content-Type", "application/json")
        .send(body.to_string())
        .map_err(|e| failure(ep, path, timeout, e))?;
    let status = answer.status().as_u16();
    let mut body = answer.into_body();
    if status != 200 {
        let text = body
            .with_config()
            .limit(MAX_BODY as u64)
            .read_to_vec()
            .unwrap_or_default();
        let v: Value = serde_json::from_slice(&text).unwrap_or(Value::Null);
        let message = v["message"]
            .as_str()
            .or(v["error"].as_str())
            .map(str::to_string)
            .unwrap_or_else(|| String::from_utf8_lossy(&text).chars().take(200).collect());
        return Err(EtcdError::Status {
            endpoint: ep.shown.clone(),
            path: path.into(),
            status,
            message,
        });
    }
    Ok(body)
}

/// One POST, its answer decoded; the whole call (connection included) within `timeout`.
fn post(
    agent: &ureq::Agent,
    ep: &Endpoint,
    path: &str,
    body: &Value,
    timeout: Duration,
) -> Result<Value, EtcdError> {
    let request = agent
        .post(format!("{}{path}", ep.shown))
        .config()
        .timeout_global(Some(timeout))
        .build();
    let text = send(request, ep, path, body, timeout)?
        .with_config()
        .limit(MAX_BODY as u64)
        .read_to_vec()
        .map_err(|e| failure(ep, path, timeout, e))?;
    serde_json::from_slice(&text).map_err(|e| EtcdError::Garbled {
        endpoint: ep.shown.clone(),
        path: path.into(),
        reason: format!("not JSON: {e}"),
    })
}

/// Why a watch's messages stopped.
enum Ended {
    /// It lasted its span: to be made again.
    Span,
    /// etcd ended the answer.
    Closed,
    Failed(EtcdError),
}

/// Starts a watch: its answer's head within `timeout`, then its body read for at most
/// `span` by a thread that sends each line (a JSON message), then why it stopped. The
/// thread ends with the watch, or at the first line after the receiver is dropped.
fn watch(
    agent: &ureq::Agent,
    ep: &Endpoint,
    path: &str,
    body: &Value,
    timeout: Duration,
    span: Duration,
) -> Result<mpsc::Receiver<Result<Vec<u8>, Ended>>, EtcdError> {
    let request = agent
        .post(format!("{}{path}", ep.shown))
        .config()
        .timeout_connect(Some(timeout))
        .timeout_send_request(Some(timeout))
        .timeout_send_body(Some(timeout))
        .timeout_recv_response(Some(timeout))
        .timeout_recv_body(Some(span))
        .build();
    let answer = send(request, ep, path, body, timeout)?;
    let (tx, rx) = mpsc::channel();
    let (ep, path) = (ep.clone(), path.to_string());
    std::thread::spawn(move || {
        let reader = answer.into_with_config().limit(u64::MAX).reader();
        let mut lines = BufReader::new(reader).split(b'\n');
        let end = loop {
            match lines.next() {
                Some(Ok(line)) if line.iter().all(u8::is_ascii_whitespace) => {}
                Some(Ok(line)) if line.len() > MAX_BODY => {
                    break Ended::Failed(EtcdError::Garbled {
                        endpoint: ep.shown.clone(),
                        path,
                        reason: "a watch message is too large".into(),
                    })
                }
                Some(Ok(line)) => {
                    if tx.send(Ok(line)).is_err() {
                        return;
                    }
                }
                None => break Ended::Closed,
                Some(Err(e)) => match ureq::Error::from(e) {
                    ureq::Error::Timeout(ureq::Timeout::RecvBody | ureq::Timeout::Global) => {
                        break Ended::Span
                    }
                    e => break Ended::Failed(failure(&ep, &path, span, e)),
                },
            }
        };
        let _ = tx.send(Err(end));
    });
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_and_credentials_never_shown() {
        assert_eq!(
            parse_endpoint("http://127.0.0.1:2379").unwrap().shown,
            "http://127.0.0.1:2379"
        );
        assert_eq!(
            parse_endpoint("http://etcd/").unwrap().shown,
            "http://etcd:2379"
        );
        assert_eq!(
            parse_endpoint("http://[::1]:23").unwrap().shown,
            "http://[::1]:23"
        );
        assert_eq!(
            parse_endpoint("https://etcd.example").unwrap().shown,
            "https://etcd.example:2379"
        );
        let e = parse_endpoint("https://u:secret@e:2379")
            .unwrap_err()
            .to_string();
        assert!(e.contains("authentication") && !e.contains("secret"), "{e}");
        let e = parse_endpoint("etcd:2379").unwrap_err().to_string();
        assert!(e.contains("expected http://HOST:PORT"), "{e}");
        let e = parse_endpoint("http://a b:2379").unwrap_err().to_string();
        assert!(e.contains("not a valid URL"), "{e}");
        let e = parse_endpoint("http://u:secret@e:2379")
            .unwrap_err()
            .to_string();
        assert!(e.contains("authentication") && !e.contains("secret"), "{e}");
        assert_eq!(redact("http://u:p@h:1/x"), "http://***@h:1/x");
        assert_eq!(redact("http://h:1"), "http://h:1");
    }

    #[test]
    fn prefix_end_is_the_next_key() {
        assert_eq!(prefix_end(b"a/"), b"a0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
    }

    /// Reads one request whole (head, then as many bytes as its Content-Length says).
    fn read_request(s: &mut std::net::TcpStream) -> Vec<u8> {
        use std::io::Read;
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
                let length = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|n| n.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                if got.len() >= end + 4 + length {
                    return got;
                }
            }
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return got,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    }

    /// A fake endpoint that reads one request and answers `reply` to each connection, then
    /// closes it.
    fn fake(replies: Vec<&'static [u8]>) -> String {
        use std::io::Write;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        std::thread::spawn(move || {
            for reply in replies {
                let Ok((mut s, _)) = l.accept() else { return };
                read_request(&mut s);
                let _ = s.write_all(reply);
            }
        });
        url
    }

    /// A fake endpoint whose one answer is written in `pieces`, `pause` apart, the connection
    /// then kept open until `hold` is over.
    fn fake_stream(pieces: Vec<&'static [u8]>, pause: Duration, hold: Duration) -> String {
        use std::io::Write;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        std::thread::spawn(move || {
            let Ok((mut s, _)) = l.accept() else { return };
            let request = read_request(&mut s);
            assert!(request.starts_with(b"POST /v3/watch HTTP/1.1\r\n"));
            for piece in pieces {
                if s.write_all(piece).is_err() {
                    return;
                }
                std::thread::sleep(pause);
            }
            std::thread::sleep(hold);
        });
        url
    }

    const WATCH_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                                Transfer-Encoding: chunked\r\n\r\n";
    const CREATED: &[u8] = b"28\r\n{\"result\":{\"header\":{},\"created\":true}}\n\r\n";
    const DELETED: &[u8] = b"2A\r\n{\"result\":{\"events\":[{\"type\":\"DELETE\"}]}}\n\r\n";

    #[test]
    fn a_watch_reads_its_messages_across_chunk_boundaries() {
        let t = Duration::from_secs(2);
        // The created message, then a DELETE split over two chunks, the first cut mid-line.
        let url = fake_stream(
            vec![
                WATCH_HEAD,
                CREATED,
                b"12\r\n{\"result\":{\"events\r\n",
                b"18\r\n\":[{\"type\":\"DELETE\"}]}}\n\r\n",
            ],
            Duration::from_millis(50),
            Duration::from_secs(5),
        );
        let mut c = Client::new(&[url], t).unwrap();
        let deleted = c
            .wait_deleted("k", 1, Duration::from_millis(20), &|| false)
            .unwrap();
        assert!(deleted);
    }

    #[test]
    fn a_watch_that_outlasts_its_span_is_made_again_from_the_same_revision() {
        use std::io::Write;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let (tx, requests) = mpsc::channel();
        std::thread::spawn(move || {
            // The first watch hears nothing; the second one hears the deletion.
            let mut open = Vec::new();
            for answer in [
                &[WATCH_HEAD, CREATED][..],
                &[WATCH_HEAD, CREATED, DELETED][..],
            ] {
                let Ok((mut s, _)) = l.accept() else { return };
                let _ = tx.send(read_request(&mut s));
                for piece in answer {
                    let _ = s.write_all(piece);
                }
                open.push(s);
            }
            std::thread::sleep(Duration::from_secs(10));
        });
        let mut c = Client::new(&[url], Duration::from_secs(2)).unwrap();
        c.watch_span = Duration::from_millis(300);
        let deleted = c
            .wait_deleted("k", 41, Duration::from_millis(20), &|| false)
            .unwrap();
        assert!(deleted);
        let requests: Vec<String> = requests
            .try_iter()
            .map(|r| String::from_utf8_lossy(&r).into_owned())
            .collect();
        assert_eq!(requests.len(), 2);
        for r in requests {
            assert!(r.contains("\"start_revision\":\"42\""), "{r}");
        }
    }

    #[test]
    fn a_silent_watch_still_hears_give_up() {
        let t = Duration::from_secs(2);
        let url = fake_stream(
            vec![WATCH_HEAD, CREATED],
            Duration::ZERO,
            Duration::from_secs(30),
        );
        let mut c = Client::new(&[url], t).unwrap();
        let asked = std::cell::Cell::new(0);
        let give_up = || {
            asked.set(asked.get() + 1);
            asked.get() > 5
        };
        let deleted = c
            .wait_deleted("k", 1, Duration::from_millis(20), &give_up)
            .unwrap();
        assert!(!deleted);
        assert_eq!(asked.get(), 6);
    }

    #[test]
    fn garbage_or_a_cut_in_a_watch_is_an_error_that_says_where() {
        let t = Duration::from_secs(2);
        let url = fake_stream(
            vec![WATCH_HEAD, CREATED, b"6\r\nnotjs\n\r\n"],
            Duration::ZERO,
            Duration::from_secs(5),
        );
        let mut c = Client::new(std::slice::from_ref(&url), t).unwrap();
        let e = c
            .wait_deleted("k", 1, Duration::from_millis(20), &|| false)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("{url}/v3/watch: bad answer")), "{e}");

        // Cut mid-chunk, then closed.
        let url = fake_stream(
            vec![WATCH_HEAD, CREATED, b"40\r\n{\"result\""],
            Duration::ZERO,
            Duration::ZERO,
        );
        let mut c = Client::new(std::slice::from_ref(&url), t).unwrap();
        let e = c
            .wait_deleted("k", 1, Duration::from_millis(20), &|| false)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("{url}/v3/watch: ")), "{e}");

        // A refused watch (etcd cancels it: compacted revision).
        let url = fake_stream(
            vec![
                WATCH_HEAD,
                b"34\r\n{\"result\":{\"canceled\":true,\"compact_revision\":\"9\"}}\n\r\n",
            ],
            Duration::ZERO,
            Duration::from_secs(5),
        );
        let mut c = Client::new(&[url], t).unwrap();
        let e = c
            .wait_deleted("k", 1, Duration::from_millis(20), &|| false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("the watch was refused"), "{e}");
    }

    #[test]
    fn garbage_errors_and_cut_answers_say_where_and_what() {
        let t = Duration::from_secs(2);
        let url = fake(vec![b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nnotjs"]);
        let e = Client::new(std::slice::from_ref(&url), t)
            .unwrap()
            .grant(t)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("{url}/v3/lease/grant")) && e.contains("not JSON"),
            "{e}"
        );

        let url = fake(vec![b"SSH-2.0-OpenSSH\r\n"]);
        let e = Client::new(std::slice::from_ref(&url), t)
            .unwrap()
            .grant(t)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not an HTTP answer"), "{e}");

        let url = fake(vec![b""]);
        let e = Client::new(std::slice::from_ref(&url), t)
            .unwrap()
            .grant(t)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&url), "{e}");

        // Cut mid-body.
        let url = fake(vec![
            b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n{\"ID\":",
        ]);
        let e = Client::new(std::slice::from_ref(&url), t)
            .unwrap()
            .grant(t)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("{url}/v3/lease/grant: the connection was closed")),
            "{e}"
        );

        let url = fake(vec![b"HTTP/1.1 400 Bad Request\r\nContent-Length: 41\r\n\r\n{\"error\":\"x\",\"message\":\"lease not found\"}"]);
        let e = Client::new(&[url], t)
            .unwrap()
            .grant(t)
            .unwrap_err()
            .to_string();
        assert!(e.contains("HTTP 400: lease not found"), "{e}");
    }

    #[test]
    fn a_call_that_gets_no_answer_times_out_and_says_so() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        std::thread::spawn(move || {
            let Ok((mut s, _)) = l.accept() else { return };
            read_request(&mut s);
            std::thread::sleep(Duration::from_secs(30));
        });
        let t = Duration::from_millis(300);
        let e = Client::new(std::slice::from_ref(&url), t)
            .unwrap()
            .grant(t)
            .unwrap_err();
        assert!(
            matches!(&e, EtcdError::Io { source, .. } if source.kind() == io::ErrorKind::TimedOut)
        );
        let e = e.to_string();
        assert!(
            e.contains(&format!("{url}/v3/lease/grant")) && e.contains("no answer within 300ms"),
            "{e}"
        );
    }

    #[test]
    fn an_https_endpoint_that_speaks_no_tls_fails_over_to_the_next() {
        // Answers plain HTTP to whatever comes first (a TLS client hello, here).
        let no_tls = || {
            use std::io::{Read, Write};
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let url = format!("https://{}", l.local_addr().unwrap());
            std::thread::spawn(move || {
                let Ok((mut s, _)) = l.accept() else { return };
                let _ = s.read(&mut [0u8; 4096]);
                let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
            });
            url
        };
        let t = Duration::from_secs(2);
        let url = no_tls();
        let e = Client::new(std::slice::from_ref(&url), t)
            .unwrap()
            .grant(t)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("{url}/v3/lease/grant: TLS: ")), "{e}");
        let ok: &[u8] =
            b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n{\"ID\":\"7\",\"TTL\":\"2\"}";
        let live = fake(vec![ok]);
        let plain = no_tls();
        let mut c = Client::new(&[plain, live], t).unwrap();
        assert_eq!(c.grant(t).unwrap(), (7, Duration::from_secs(2)));
        assert_eq!(c.current, 1);
    }

    #[test]
    fn a_call_moves_on_to_the_next_endpoint_and_stays_there() {
        let t = Duration::from_secs(2);
        let dead = format!(
            "http://127.0.0.1:{}",
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        );
        let ok: &[u8] = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                          14\r\n{\"ID\":\"7\",\"TTL\":\"2\"}\r\n0\r\n\r\n";
        let live = fake(vec![ok, ok]);
        let mut c = Client::new(&[dead, live], t).unwrap();
        assert_eq!(c.grant(t).unwrap(), (7, Duration::from_secs(2)));
        assert_eq!(c.current, 1);
        assert_eq!(c.grant(t).unwrap().0, 7);
    }

    #[test]
    fn a_dead_endpoint_fails_over_and_says_where() {
        // A port nothing listens on: bind then drop.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut c = Client::new(
            &[
                format!("http://127.0.0.1:{port}"),
                format!("http://127.0.0.1:{port}"),
            ],
            Duration::from_millis(500),
        )
        .unwrap();
        let e = c.grant(Duration::from_secs(1)).unwrap_err().to_string();
        assert!(
            e.contains(&format!("127.0.0.1:{port}/v3/lease/grant")),
            "{e}"
        );
    }
}
