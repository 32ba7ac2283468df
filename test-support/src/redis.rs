//! A real `redis-server` for the tests: started on a free loopback port with persistence
//! off, ready when it says so on its log, stopped by pid (SIGKILL, as a crash would).
//! Debian's `redis-server` package provides it (`.ci/run` installs it when missing).

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

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
        let mut command = Command::new("redis-server");
        match &self.tls {
            None => command.args(["--port", &self.port.to_string()]),
            Some((cert, key)) => command
                .args(["--port", "0", "--tls-port", &self.port.to_string()])
                .args(["--tls-cert-file", cert, "--tls-key-file", key])
                .args(["--tls-auth-clients", "no"]),
        };
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
        // Keep reading its log, or it blocks once the pipe is full.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        self.child = Some(child);
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
