//! A throwaway etcd for the cluster tests and bench: started on free loopback ports in a
//! temp dir, stopped and restarted on the same data, SIGKILLed on drop.
//!
//! Where `etcd` is not installed the tests skip with a loud message; under CI (`CI` set) a
//! missing etcd is a failure (CI installs `etcd-server`).

#![allow(dead_code)] // the tests and the bench use different parts of it

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The etcd binary, or `None` (after saying so on stderr) when the test must skip.
pub fn etcd_binary() -> Option<PathBuf> {
    for dir in ["/usr/bin", "/usr/local/bin", "/usr/sbin"] {
        let p = PathBuf::from(dir).join("etcd");
        if p.exists() {
            return Some(p);
        }
    }
    if std::env::var_os("CI").is_some() {
        panic!("etcd is not installed, and CI must run the cluster tests (apt-get install etcd-server)");
    }
    eprintln!("\n*** SKIPPED: etcd is not installed (apt-get install etcd-server) ***\n");
    None
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind a free port")
        .local_addr()
        .expect("local addr")
        .port()
}

/// A running (or stopped) etcd.
pub struct Etcd {
    bin: PathBuf,
    dir: tempfile::TempDir,
    pub client_port: u16,
    peer_port: u16,
    /// Serves clients over TLS with a certificate of `ca()` (see [`Etcd::start_tls`]).
    tls: bool,
    child: Option<Child>,
}

impl Etcd {
    /// Starts one on free ports; `None` when etcd is not installed (see [`etcd_binary`]).
    pub fn start() -> Option<Etcd> {
        Etcd::start_with(false)
    }

    /// One that serves clients over TLS (`https://127.0.0.1:PORT`) with a certificate signed by
    /// a throwaway CA, `ca()`, made with the openssl command; `None` (after saying so) when
    /// etcd or openssl is not installed and this is not CI.
    pub fn start_tls() -> Option<Etcd> {
        Etcd::start_with(true)
    }

    fn start_with(tls: bool) -> Option<Etcd> {
        let bin = etcd_binary()?;
        let dir = tempfile::Builder::new()
            .prefix("plumule-etcd.")
            .tempdir()
            .expect("temp dir");
        let mut e = Etcd {
            bin,
            dir,
            client_port: free_port(),
            peer_port: free_port(),
            tls,
            child: None,
        };
        if tls && !e.make_certificates() {
            return None;
        }
        e.restart();
        Some(e)
    }

    /// `http://127.0.0.1:PORT` (`https://` with TLS).
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// The CA (PEM) that signed a TLS etcd's certificate.
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A CA and a server certificate for 127.0.0.1 and localhost; false (after saying so)
    /// when openssl is not installed.
    fn make_certificates(&self) -> bool {
        let probe = Command::new("openssl")
            .arg("version")
            .stdout(Stdio::null())
            .spawn();
        if let Ok(mut probe) = probe {
            // Its status does not matter (and the harness may reap it first).
            let _ = probe.wait();
        } else {
            if std::env::var_os("CI").is_some() {
                panic!("openssl is not installed, and CI must run the TLS cluster test");
            }
            eprintln!("\n*** SKIPPED: openssl is not installed (apt-get install openssl) ***\n");
            return false;
        }
        let dir = self.dir.path();
        std::fs::write(
            dir.join("server.ext"),
            "subjectAltName = IP:127.0.0.1, DNS:localhost\nextendedKeyUsage = serverAuth\n\
             basicConstraints = critical, CA:FALSE\n",
        )
        .expect("write server.ext");
        // Arguments without spaces, so that each step is one line.
        let ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
        let steps = [
            (
                format!(
                    "req -x509 {ec} -keyout ca.key -out ca.pem -days 2 -subj /CN=plumule-test-CA \
                     -addext basicConstraints=critical,CA:TRUE \
                     -addext keyUsage=critical,keyCertSign,cRLSign"
                ),
                "ca.pem",
            ),
            (
                format!("req {ec} -keyout server.key -out server.csr -subj /CN=localhost"),
                "server.csr",
            ),
            (
                "x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
                 -out server.pem -days 2 -extfile server.ext"
                    .to_string(),
                "server.pem",
            ),
        ];
        for (step, made) in steps {
            let errors = dir.join("openssl.err");
            let mut child = Command::new("openssl")
                .args(step.split_whitespace())
                .current_dir(dir)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&errors).expect("openssl.err"))
                .spawn()
                .expect("run openssl");
            // The harness reaps the children it did not register, maybe this one: then it has
            // exited, and what it made tells how.
            let ok = child.wait().map(|s| s.success()).unwrap_or(true);
            assert!(
                ok && std::fs::metadata(dir.join(made)).is_ok_and(|m| m.len() > 0),
                "openssl {step}: {}",
                std::fs::read_to_string(&errors).unwrap_or_default()
            );
        }
        true
    }

    /// Starts it again on the same data and ports, and waits until it answers.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "etcd is running already");
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("etcd.log"))
            .expect("etcd log");
        // What this run logs comes after this.
        let log_from = log.metadata().map(|m| m.len() as usize).unwrap_or(0);
        let mut command = Command::new(&self.bin);
        if self.tls {
            command
                .arg("--cert-file")
                .arg(self.dir.path().join("server.pem"))
                .arg("--key-file")
                .arg(self.dir.path().join("server.key"));
        }
        let child = command
            .arg("--name")
            .arg("test")
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .arg("--listen-client-urls")
            .arg(self.url())
            .arg("--advertise-client-urls")
            .arg(self.url())
            .arg("--listen-peer-urls")
            .arg(&peer)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer)
            .arg("--initial-cluster")
            .arg(format!("test={peer}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start etcd");
        self.child = Some(child);
        let give_up = Instant::now() + Duration::from_secs(20);
        while !self.ready(log_from) {
            assert!(
                Instant::now() < give_up,
                "etcd did not answer on {} within 20s; its log:\n{}",
                self.url(),
                std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50)); // poll interval
        }
    }

    /// Whether it serves clients now: it answers a range request, or (TLS, whose CA this
    /// process does not trust) its log says it serves them.
    fn ready(&self, log_from: usize) -> bool {
        if !self.tls {
            return self.answers();
        }
        let log = std::fs::read(self.dir.path().join("etcd.log")).unwrap_or_default();
        String::from_utf8_lossy(log.get(log_from..).unwrap_or_default())
            .contains("serving client requests on")
    }

    /// Whether it answers a range request now.
    pub fn answers(&self) -> bool {
        let Ok(mut c) =
            plumule::cluster::etcd::Client::new(&[self.url()], Duration::from_millis(500))
        else {
            return false;
        };
        c.range_prefix("plumule/").is_ok()
    }

    /// SIGKILLs it (its data stays); waits for it to be gone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}
