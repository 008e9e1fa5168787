//! A real `nats-server` (JetStream) for the tests and benchmarks of brokers on several
//! machines: on a free loopback port, storing in a temp directory, killed when dropped.

use std::path::Path;
use std::time::{Duration, Instant};

/// A `nats-server` with JetStream storing under `dir`, on loopback only; killed when
/// dropped.
pub struct Nats {
    child: Option<std::process::Child>,
    pub port: u16,
    dir: std::path::PathBuf,
    /// Fsync every write (`sync_interval: always`), for tests that kill the server.
    synced: bool,
    /// More of the server's configuration (accounts).
    extra: String,
}

impl Nats {
    pub fn start(dir: &Path, port: u16) -> Self {
        Self::start_as(dir, port, false)
    }

    pub fn start_as(dir: &Path, port: u16, synced: bool) -> Self {
        let mut nats = Self {
            child: None,
            port,
            dir: dir.to_path_buf(),
            synced,
            extra: String::new(),
        };
        nats.restart();
        nats
    }

    /// A server configured with `extra` (e.g. accounts).
    pub fn start_with(dir: &Path, port: u16, extra: &str) -> Self {
        let mut nats = Self {
            child: None,
            port,
            dir: dir.to_path_buf(),
            synced: false,
            extra: extra.to_string(),
        };
        nats.restart();
        nats
    }

    pub fn restart(&mut self) {
        let mut cmd = std::process::Command::new("nats-server");
        if self.synced || !self.extra.is_empty() {
            std::fs::create_dir_all(&self.dir).unwrap();
            let conf = self.dir.join("nats.conf");
            let sync = if self.synced {
                ", sync_interval: always"
            } else {
                ""
            };
            let text = format!(
                "listen: \"127.0.0.1:{}\"\njetstream {{ store_dir: \"{}\"{sync} }}\n{}\n",
                self.port,
                self.dir.display(),
                self.extra
            );
            std::fs::write(&conf, text).unwrap();
            cmd.arg("-c").arg(conf);
        } else {
            let port = self.port.to_string();
            cmd.args(["-a", "127.0.0.1", "-p", &port, "-js", "-sd"])
                .arg(&self.dir);
        }
        let child = cmd
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nats-server starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Nats {
    /// A server fsyncing every write or not, with more configuration.
    pub fn start_full(dir: &Path, port: u16, synced: bool, extra: &str) -> Self {
        let mut nats = Self::start_with_unstarted(dir, port, extra);
        nats.synced = synced;
        nats.restart();
        nats
    }

    fn start_with_unstarted(dir: &Path, port: u16, extra: &str) -> Self {
        Self {
            child: None,
            port,
            dir: dir.to_path_buf(),
            synced: false,
            extra: extra.to_string(),
        }
    }

    /// The server's name in a cluster (`server_name`), if it has one.
    pub fn name(&self) -> Option<&str> {
        self.extra
            .lines()
            .find_map(|l| l.strip_prefix("server_name: "))
    }
}

/// A JetStream cluster of `n` servers on loopback, each fsyncing every write, named
/// `n0`, `n1`, …; its URL lists them all.
pub fn cluster(dir: &Path, n: usize) -> (Vec<Nats>, String) {
    let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
    let routes: Vec<String> = ports
        .iter()
        .map(|(_, c)| format!("\"nats-route://127.0.0.1:{c}\""))
        .collect();
    let routes = routes.join(", ");
    let nodes: Vec<Nats> = ports
        .iter()
        .enumerate()
        .map(|(i, (p, c))| {
            let extra = format!(
                "server_name: n{i}\ncluster {{ name: cp, listen: \"127.0.0.1:{c}\", routes: [{routes}] }}"
            );
            Nats::start_full(&dir.join(format!("n{i}")), *p, true, &extra)
        })
        .collect();
    let url = nodes.iter().map(Nats::url).collect::<Vec<_>>().join(",");
    (nodes, url)
}
