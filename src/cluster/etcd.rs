//! A small blocking client of etcd's v3 JSON gateway (`/v3/kv/*`, `/v3/lease/*`,
//! `/v3/watch`), over plain HTTP/1.1 on `std::net::TcpStream`.
//!
//! Why this and not gRPC: there is no well-kept blocking gRPC client for Rust, and the async
//! ones bring a runtime into a helper that needs three calls. The gateway is part of every
//! etcd since 3.3 (paths under `/v3/` from 3.4), speaks JSON with keys and values in base64,
//! and a request is one `POST` on a fresh connection (`Connection: close`), so there is no
//! connection state to get wrong. A watch is one long `POST` whose chunked body carries one
//! JSON message per line.
//!
//! Endpoints: `http://HOST:PORT` URLs; a call that cannot reach one (refused, timed out, cut
//! mid-answer) moves on to the next, round the list once. `https://` endpoints are refused
//! when the client is made (this build has no TLS): put etcd on a private network or a
//! loopback proxy. A user and password in a URL are never printed ([`redact`]).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

/// The most an answer may weigh: a range of every member record stays far below.
const MAX_BODY: usize = 16 << 20;

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
}

impl EtcdError {
    /// Whether another endpoint might do better (not an answer etcd gave on purpose).
    fn is_transport(&self) -> bool {
        matches!(self, EtcdError::Io { .. } | EtcdError::Garbled { .. })
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

/// Whether this client can use `url` (an http:// URL without a user); else why not, the URL
/// redacted. `plumule check` warns with it.
pub fn check_endpoint(url: &str) -> Result<(), String> {
    parse_endpoint(url).map(|_| ()).map_err(|e| e.to_string())
}

#[derive(Debug, Clone)]
struct Endpoint {
    /// `host:port`, for the Host header and resolution.
    authority: String,
    /// How messages name it (`http://host:port`).
    shown: String,
}

fn parse_endpoint(url: &str) -> Result<Endpoint, EtcdError> {
    let bad = |reason: &str| EtcdError::Endpoint {
        url: redact(url),
        reason: reason.to_string(),
    };
    let rest = if let Some(r) = url.strip_prefix("http://") {
        r
    } else if url.starts_with("https://") {
        return Err(bad(
            "https is not supported by this build (no TLS): use http:// on a private network",
        ));
    } else {
        return Err(bad("expected http://HOST:PORT"));
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
    Ok(Endpoint {
        shown: format!("http://{authority}"),
        authority,
    })
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
    /// Connect, read and write timeout of one call.
    pub timeout: Duration,
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
    /// A client of these endpoints; an invalid or https URL is an error naming it.
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
            match post(&self.endpoints[at], path, body, self.timeout) {
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
        let io_err = |source| EtcdError::Io {
            endpoint: ep.shown.clone(),
            path: path.into(),
            source,
        };
        let mut reader = open(&ep, path, &body, self.timeout).map_err(io_err)?;
        let chunked = read_head(&mut reader, &ep, path, self.timeout)?;
        // From here a read that times out only means "look at give_up again".
        reader
            .get_ref()
            .set_read_timeout(Some(poll))
            .map_err(io_err)?;
        let mut stream = Stream {
            reader,
            chunked,
            left: 0,
            line: Vec::new(),
        };
        loop {
            if give_up() {
                return Ok(false);
            }
            let msg = match stream.next_line() {
                Ok(Some(line)) => line,
                Ok(None) => {
                    return Err(EtcdError::Garbled {
                        endpoint: ep.shown.clone(),
                        path: path.into(),
                        reason: "the watch ended".into(),
                    })
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    continue
                }
                Err(e) => return Err(io_err(e)),
            };
            let v: Value = serde_json::from_slice(&msg).map_err(|e| EtcdError::Garbled {
                endpoint: ep.shown.clone(),
                path: path.into(),
                reason: e.to_string(),
            })?;
            if v.get("error").is_some() || v["result"]["canceled"].as_bool() == Some(true) {
                return Err(EtcdError::Garbled {
                    endpoint: ep.shown.clone(),
                    path: path.into(),
                    reason: format!("the watch was refused: {v}"),
                });
            }
            let deleted = v["result"]["events"]
                .as_array()
                .is_some_and(|ev| ev.iter().any(|e| e["type"] == "DELETE"));
            if deleted {
                return Ok(true);
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

/// A read or write that timed out says so (the socket reports EAGAIN).
fn timed_out(e: io::Error, timeout: Duration) -> io::Error {
    if matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    ) {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer within {}", crate::format_duration(timeout)),
        )
    } else {
        e
    }
}

fn connect(ep: &Endpoint, timeout: Duration) -> io::Result<TcpStream> {
    let addrs: Vec<SocketAddr> = ep.authority.to_socket_addrs()?.collect();
    let mut last = io::Error::new(io::ErrorKind::NotFound, "the host name has no address");
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(s) => {
                s.set_nodelay(true)?;
                return Ok(s);
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Connects and sends the request; returns the reader of the answer.
fn open(
    ep: &Endpoint,
    path: &str,
    body: &Value,
    timeout: Duration,
) -> io::Result<BufReader<TcpStream>> {
    let mut sock = connect(ep, timeout)?;
    sock.set_read_timeout(Some(timeout))?;
    sock.set_write_timeout(Some(timeout))?;
    let body = body.to_string();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        ep.authority,
        body.len()
    );
    let mut req = head.into_bytes();
    req.extend_from_slice(body.as_bytes());
    sock.write_all(&req)?;
    Ok(BufReader::new(sock))
}

/// Reads the status line and headers; an HTTP error status is read whole and returned as
/// [`EtcdError::Status`]. Returns whether the body is chunked.
fn read_head(
    r: &mut BufReader<TcpStream>,
    ep: &Endpoint,
    path: &str,
    timeout: Duration,
) -> Result<bool, EtcdError> {
    let garbled = |reason: String| EtcdError::Garbled {
        endpoint: ep.shown.clone(),
        path: path.into(),
        reason,
    };
    let io_err = |source| EtcdError::Io {
        endpoint: ep.shown.clone(),
        path: path.into(),
        source: timed_out(source, timeout),
    };
    let mut line = String::new();
    r.read_line(&mut line).map_err(io_err)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| garbled(format!("not an HTTP answer: {:?}", line.trim())))?;
    let mut chunked = false;
    let mut length = None;
    loop {
        line.clear();
        if r.read_line(&mut line).map_err(io_err)? == 0 {
            return Err(garbled("the answer ended in its headers".into()));
        }
        let l = line.trim();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
                chunked = true;
            } else if k == "content-length" {
                length = v.parse::<usize>().ok();
            }
        }
    }
    if status != 200 {
        let body = read_body(r, chunked, length).unwrap_or_default();
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let message = v["message"]
            .as_str()
            .or(v["error"].as_str())
            .map(str::to_string)
            .unwrap_or_else(|| String::from_utf8_lossy(&body).chars().take(200).collect());
        return Err(EtcdError::Status {
            endpoint: ep.shown.clone(),
            path: path.into(),
            status,
            message,
        });
    }
    Ok(chunked)
}

fn read_body(
    r: &mut BufReader<TcpStream>,
    chunked: bool,
    length: Option<usize>,
) -> io::Result<Vec<u8>> {
    let too_big = || io::Error::new(io::ErrorKind::InvalidData, "the answer is too large");
    let mut body = Vec::new();
    if chunked {
        let mut s = Stream {
            reader: r,
            chunked: true,
            left: 0,
            line: Vec::new(),
        };
        loop {
            let mut buf = [0u8; 8192];
            let n = s.read_body(&mut buf)?;
            if n == 0 {
                return Ok(body);
            }
            body.extend_from_slice(&buf[..n]);
            if body.len() > MAX_BODY {
                return Err(too_big());
            }
        }
    }
    match length {
        Some(n) if n > MAX_BODY => Err(too_big()),
        Some(n) => {
            body.resize(n, 0);
            r.read_exact(&mut body)?;
            Ok(body)
        }
        None => {
            r.take(MAX_BODY as u64 + 1).read_to_end(&mut body)?;
            if body.len() > MAX_BODY {
                return Err(too_big());
            }
            Ok(body)
        }
    }
}

/// One POST, its answer decoded.
fn post(ep: &Endpoint, path: &str, body: &Value, timeout: Duration) -> Result<Value, EtcdError> {
    let io_err = |source| EtcdError::Io {
        endpoint: ep.shown.clone(),
        path: path.into(),
        source: timed_out(source, timeout),
    };
    let started = Instant::now();
    let mut r = open(ep, path, body, timeout).map_err(io_err)?;
    let chunked = read_head(&mut r, ep, path, timeout)?;
    // No Content-Length nor chunks: the body runs to the end of the connection.
    let body = read_body(&mut r, chunked, None).map_err(io_err);
    let body = match body {
        Ok(b) => b,
        Err(e) => {
            log::debug!("etcd call {path} failed after {:?}", started.elapsed());
            return Err(e);
        }
    };
    serde_json::from_slice(&body).map_err(|e| EtcdError::Garbled {
        endpoint: ep.shown.clone(),
        path: path.into(),
        reason: format!("not JSON: {e}"),
    })
}

/// A chunked (or plain) body read piece by piece, whose state survives a read timeout: a
/// timeout only ever interrupts a read of the socket, never a half-parsed header.
struct Stream<R> {
    reader: R,
    chunked: bool,
    /// Bytes left in the current chunk.
    left: usize,
    /// The line being assembled (watch messages are one per line).
    line: Vec<u8>,
}

impl<R: BufRead> Stream<R> {
    /// Reads a chunk-size line whole: the buffered reader keeps a partial one across a
    /// timeout only if we do not consume it, so it is peeked until complete.
    fn chunk_size(&mut self) -> io::Result<Option<usize>> {
        loop {
            let buf = self.reader.fill_buf()?;
            if buf.is_empty() {
                return Ok(None);
            }
            // Skip the CRLF that ends the previous chunk.
            let skip = buf
                .iter()
                .take_while(|b| **b == b'\r' || **b == b'\n')
                .count();
            if skip > 0 {
                self.reader.consume(skip);
                continue;
            }
            let Some(end) = buf.iter().position(|b| *b == b'\n') else {
                if buf.len() > 1024 {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"));
                }
                // An incomplete size line: wait for more (BufReader needs a bigger read).
                let mut more = buf.to_vec();
                let n = more.len();
                self.reader.consume(n);
                let mut byte = [0u8; 1];
                loop {
                    self.reader.read_exact(&mut byte)?;
                    more.push(byte[0]);
                    if byte[0] == b'\n' {
                        break;
                    }
                }
                return parse_size(&more).map(Some);
            };
            let size = parse_size(&buf[..=end])?;
            self.reader.consume(end + 1);
            return Ok(Some(size));
        }
    }

    fn read_body(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if !self.chunked {
            return self.reader.read(out);
        }
        if self.left == 0 {
            match self.chunk_size()? {
                None | Some(0) => return Ok(0),
                Some(n) => self.left = n,
            }
        }
        let want = out.len().min(self.left);
        let n = self.reader.read(&mut out[..want])?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.left -= n;
        Ok(n)
    }

    /// The next complete line of the body; `None` at its end.
    fn next_line(&mut self) -> io::Result<Option<Vec<u8>>> {
        loop {
            if let Some(i) = self.line.iter().position(|b| *b == b'\n') {
                let rest = self.line.split_off(i + 1);
                let mut line = std::mem::replace(&mut self.line, rest);
                line.pop();
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return Ok(Some(line));
            }
            if self.line.len() > MAX_BODY {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "a watch message is too large",
                ));
            }
            let mut buf = [0u8; 8192];
            let n = self.read_body(&mut buf)?;
            if n == 0 {
                return Ok(None);
            }
            self.line.extend_from_slice(&buf[..n]);
        }
    }
}

fn parse_size(line: &[u8]) -> io::Result<usize> {
    let text = std::str::from_utf8(line).unwrap_or("").trim();
    let hex = text.split(';').next().unwrap_or("");
    usize::from_str_radix(hex, 16).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad chunk size {text:?}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_and_credentials_never_shown() {
        assert_eq!(
            parse_endpoint("http://127.0.0.1:2379").unwrap().authority,
            "127.0.0.1:2379"
        );
        assert_eq!(
            parse_endpoint("http://etcd/").unwrap().authority,
            "etcd:2379"
        );
        assert_eq!(
            parse_endpoint("http://[::1]:23").unwrap().authority,
            "[::1]:23"
        );
        let e = parse_endpoint("https://u:secret@e:2379")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no TLS") && !e.contains("secret"), "{e}");
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

    #[test]
    fn a_chunked_stream_gives_lines_across_chunk_boundaries() {
        let raw = b"5\r\n{\"a\":\r\n3\r\n1}\n\r\n8\r\n{\"b\":2}\n\r\n0\r\n\r\n";
        let mut s = Stream {
            reader: &raw[..],
            chunked: true,
            left: 0,
            line: Vec::new(),
        };
        assert_eq!(s.next_line().unwrap().unwrap(), b"{\"a\":1}");
        assert_eq!(s.next_line().unwrap().unwrap(), b"{\"b\":2}");
        assert_eq!(s.next_line().unwrap(), None);
    }

    /// A fake endpoint that reads one request and answers `reply` to each connection.
    fn fake(replies: Vec<&'static [u8]>) -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        std::thread::spawn(move || {
            for reply in replies {
                let Ok((mut s, _)) = l.accept() else { return };
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf);
                let _ = s.write_all(reply);
            }
        });
        url
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

        let url = fake(vec![b"HTTP/1.1 400 Bad Request\r\nContent-Length: 41\r\n\r\n{\"error\":\"x\",\"message\":\"lease not found\"}"]);
        let e = Client::new(&[url], t)
            .unwrap()
            .grant(t)
            .unwrap_err()
            .to_string();
        assert!(e.contains("HTTP 400: lease not found"), "{e}");
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
