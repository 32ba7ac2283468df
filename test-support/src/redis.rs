//! A real `redis-server` for the tests: started on a free loopback port with persistence
//! off, ready when it says so on its log, stopped by pid (SIGKILL, as a crash would).
//! Debian's `redis-server` package provides it (`.ci/run` installs it when missing).

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// The server the tests start: `redis-server`, or the one `TKR_REDIS_SERVER` names
/// (`valkey-server`: the same tests against Valkey).
fn server_binary() -> String {
    std::env::var("TKR_REDIS_SERVER").unwrap_or_else(|_| "redis-server".to_owned())
}

/// A running `redis-server`, killed when dropped.
#[derive(Debug)]
pub struct RedisServer {
    /// The loopback port it listens on.
    pub port: u16,
    /// TLS only: the certificate and key files the server presents.
    tls: Option<(String, String)>,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a server on a free port of 127.0.0.1.
    pub async fn start() -> Self {
        Self::start_with(None).await
    }

    /// Starts a server speaking only TLS on a free port of 127.0.0.1, presenting the
    /// certificate in the PEM file `cert` (its key in `key`); clients need no certificate.
    pub async fn start_tls(cert: &str, key: &str) -> Self {
        Self::start_with(Some((cert.to_owned(), key.to_owned()))).await
    }

    async fn start_with(tls: Option<(String, String)>) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut server = Self {
            port,
            tls,
            child: None,
        };
        server.restart().await;
        server
    }

    /// `redis://127.0.0.1:<port>` (`rediss://` with TLS).
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again) on the same port, with no data: as after a crash with
    /// persistence off.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "the server is running");
        let mut command = Command::new(server_binary());
        match &self.tls {
            None => command.args(["--port", &self.port.to_string()]),
            Some((cert, key)) => command
                .args(["--port", "0", "--tls-port", &self.port.to_string()])
                .args(["--tls-cert-file", cert, "--tls-key-file", key])
                .args(["--tls-auth-clients", "no"]),
        };
        self.child = Some(spawn_ready(&mut command).await);
    }

    /// Runs `redis-cli` against the server with `args`; its output.
    pub fn cli(&self, args: &[&str]) -> String {
        let output = std::process::Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli not found: apt-get install redis-tools");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// `INFO commandstats`: the calls of each command so far (`evalsha`, `publish`, ...),
    /// the commands scripts run included.
    pub fn command_stats(&self) -> std::collections::HashMap<String, u64> {
        self.cli(&["INFO", "commandstats"])
            .lines()
            .filter_map(|line| {
                let (name, rest) = line.strip_prefix("cmdstat_")?.split_once(':')?;
                let calls = rest
                    .strip_prefix("calls=")?
                    .split(',')
                    .next()?
                    .parse()
                    .ok()?;
                Some((name.to_owned(), calls))
            })
            .collect()
    }

    /// Sends the server `signal` (`STOP`: it hangs, its connections open but silent, as a
    /// network partition looks; `CONT`: it goes on).
    pub fn signal(&self, signal: &str) {
        let pid = self
            .child
            .as_ref()
            .and_then(Child::id)
            .expect("the server is running");
        let status = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{signal} {pid}");
    }

    /// Kills the server by pid (SIGKILL) and waits for it to be gone.
    pub async fn kill(&mut self) {
        let mut child = self.child.take().expect("the server is running");
        child.start_kill().unwrap();
        child.wait().await.unwrap();
    }
}

/// A Redis Cluster of three masters (no replicas) on free loopback ports, each a real
/// `redis-server --cluster-enabled yes` with its node file in a directory of its own,
/// joined by `redis-cli --cluster create`; every server killed by pid when dropped.
#[derive(Debug)]
pub struct RedisCluster {
    /// The nodes' loopback ports.
    pub ports: Vec<u16>,
    children: Vec<Child>,
    dir: std::path::PathBuf,
}

impl RedisCluster {
    /// Starts three nodes and makes them one cluster; returns once every slot is served
    /// (`cluster_state:ok` on every node).
    pub async fn start() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "tkr-cluster-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let mut cluster = Self {
            ports: Vec::new(),
            children: Vec::new(),
            dir,
        };
        for node in 0..3 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let dir = cluster.dir.join(node.to_string());
            std::fs::create_dir_all(&dir).unwrap();
            let mut command = Command::new(server_binary());
            command
                .args(["--port", &port.to_string()])
                .args([
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                ])
                .arg("--dir")
                .arg(&dir);
            let child = spawn_ready(&mut command).await;
            cluster.ports.push(port);
            cluster.children.push(child);
        }
        let nodes: Vec<String> = cluster
            .ports
            .iter()
            .map(|port| format!("127.0.0.1:{port}"))
            .collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&nodes)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .await
            .expect("redis-cli not found: apt-get install redis-tools");
        assert!(
            created.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&created.stdout)
        );
        // Every node agrees that every slot is served: the cluster's gossip, not a sleep,
        // is what is waited for (asked every 50 ms).
        let ok = async {
            loop {
                let mut all = true;
                for port in &cluster.ports {
                    let info = Command::new("redis-cli")
                        .args(["-p", &port.to_string(), "CLUSTER", "INFO"])
                        .output()
                        .await
                        .unwrap();
                    all &= String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok");
                }
                if all {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(20), ok)
            .await
            .expect("the cluster serves every slot within 20 s");
        cluster
    }

    /// The nodes' URLs, `redis://127.0.0.1:<port>`.
    pub fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|port| format!("redis://127.0.0.1:{port}"))
            .collect()
    }

    /// Runs `redis-cli -c` against the first node with `args`; its output.
    pub fn cli(&self, args: &[&str]) -> String {
        let output = std::process::Command::new("redis-cli")
            .args(["-c", "-p", &self.ports[0].to_string()])
            .args(args)
            .output()
            .expect("redis-cli not found: apt-get install redis-tools");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// `INFO commandstats` of every node, summed: the calls of each command so far.
    pub fn command_stats(&self) -> std::collections::HashMap<String, u64> {
        let mut total = std::collections::HashMap::new();
        for port in &self.ports {
            let server = RedisServer {
                port: *port,
                tls: None,
                child: None,
            };
            for (name, calls) in server.command_stats() {
                *total.entry(name).or_default() += calls;
            }
        }
        total
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts `command` (a `redis-server` with its port and mode) on loopback without
/// persistence, and waits until it accepts connections; its log is read on, or the server
/// would block once the pipe is full.
async fn spawn_ready(command: &mut Command) -> Child {
    let mut child = command
        .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("redis-server not found: apt-get install redis-server");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("Ready to accept connections") {
                return;
            }
        }
        panic!("redis-server ended before it was ready");
    };
    tokio::time::timeout(Duration::from_secs(10), ready)
        .await
        .expect("redis-server ready within 10 s");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    child
}
