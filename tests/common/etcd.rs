//! A throwaway etcd for the cluster tests and bench: started on free loopback ports in a
//! temp dir, stopped and restarted on the same data, SIGKILLed on drop.
//!
//! Where `etcd` is not installed the tests skip with a loud message; under CI (`CI` set) a
//! missing etcd is a failure (CI installs `etcd-server`).

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
    child: Option<Child>,
}

impl Etcd {
    /// Starts one on free ports; `None` when etcd is not installed (see [`etcd_binary`]).
    pub fn start() -> Option<Etcd> {
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
            child: None,
        };
        e.restart();
        Some(e)
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
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
        let child = Command::new(&self.bin)
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
        while !self.answers() {
            assert!(
                Instant::now() < give_up,
                "etcd did not answer on {} within 20s; its log:\n{}",
                self.url(),
                std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50)); // poll interval
        }
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
