//! Helpers for the forward proxy's tests: a scriptable mock upstream (a hyper server on
//! 127.0.0.1:0), the real `forward_proxy` binary run as a child process, and a
//! small HTTP client. Every wait is bounded by [`WAIT`].

#![allow(dead_code, unreachable_pub)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, watch};

/// The limited-provider stand-in (`wait.rs`, `sdks.rs`).
pub mod limited;

/// The bound on every wait in these tests: generous, so a loaded machine does not fail
/// them, and never reached when the proxy behaves.
pub const WAIT: Duration = Duration::from_secs(10);

/// Awaits `future` for at most [`WAIT`], panicking with `what` otherwise.
pub async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

// ---------------------------------------------------------------------------------------
// Mock upstream
// ---------------------------------------------------------------------------------------

/// What the upstream received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: http::Method,
    /// The HTTP version the request arrived in.
    pub version: http::Version,
    /// Path and query, as received.
    pub target: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Seen {
    /// The `Authorization` value with its `Bearer ` stripped, if any.
    pub fn bearer(&self) -> Option<String> {
        let value = self.headers.get("authorization")?.to_str().ok()?;
        Some(value.strip_prefix("Bearer ").unwrap_or(value).to_owned())
    }
}

pub type MockBody = UnsyncBoxBody<Bytes, Infallible>;

/// A response body whose chunks the test sends when it chooses.
pub struct ChannelBody(mpsc::UnboundedReceiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| Ok(Frame::data(c))))
    }
}

/// A body to stream: send chunks with the sender, drop it to end the body. The sender's
/// `is_closed()` turns true once the upstream's connection dropped the body.
pub fn channel_body() -> (mpsc::UnboundedSender<Bytes>, MockBody) {
    let (tx, rx) = mpsc::unbounded_channel();
    (tx, ChannelBody(rx).boxed_unsync())
}

pub fn full(body: impl Into<Bytes>) -> MockBody {
    Full::new(body.into()).boxed_unsync()
}

pub fn reply(status: u16, body: &str) -> Response<MockBody> {
    Response::builder()
        .status(status)
        .body(full(body.to_owned()))
        .unwrap()
}

type Handler =
    Arc<dyn Fn(Seen) -> Pin<Box<dyn Future<Output = Response<MockBody>> + Send>> + Send + Sync>;

/// A local upstream that records every request and answers with the test's handler.
pub struct MockUpstream {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    connections: Arc<AtomicUsize>,
    arrived: watch::Sender<usize>,
    task: tokio::task::JoinHandle<()>,
}

impl MockUpstream {
    pub async fn start<F, Fut>(handler: F) -> Self
    where
        F: Fn(Seen) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<MockBody>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(listener, handler)
    }

    /// Serves on a listener the test bound itself (to know the port in advance).
    pub fn serve<F, Fut>(listener: TcpListener, handler: F) -> Self
    where
        F: Fn(Seen) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<MockBody>> + Send + 'static,
    {
        Self::serve_with(listener, None, handler)
    }

    /// An HTTPS upstream on 127.0.0.1 whose certificate is signed by the test CA in
    /// `tls/` ([`test_ca_path`]); it offers HTTP/2 and HTTP/1.1 by ALPN.
    pub async fn start_tls<F, Fut>(handler: F) -> Self
    where
        F: Fn(Seen) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<MockBody>> + Send + 'static,
    {
        Self::start_tls_with("leaf", handler).await
    }

    /// An HTTPS upstream on 127.0.0.1 presenting `tls/<name>.pem` (key `tls/<name>.key`).
    pub async fn start_tls_with<F, Fut>(name: &str, handler: F) -> Self
    where
        F: Fn(Seen) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<MockBody>> + Send + 'static,
    {
        Self::start_tls_offering(name, &[b"h2", b"http/1.1"], handler).await
    }

    /// Like [`MockUpstream::start_tls`], offering only HTTP/1.1 by ALPN.
    pub async fn start_tls_http1<F, Fut>(handler: F) -> Self
    where
        F: Fn(Seen) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<MockBody>> + Send + 'static,
    {
        Self::start_tls_offering("leaf", &[b"http/1.1"], handler).await
    }

    async fn start_tls_offering<F, Fut>(name: &str, alpn: &[&[u8]], handler: F) -> Self
    where
        F: Fn(Seen) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<MockBody>> + Send + 'static,
    {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = CertificateDer::pem_file_iter(tls_path(&format!("{name}.pem")))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(tls_path(&format!("{name}.key"))).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve_with(
            listener,
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))),
            handler,
        )
    }

    fn serve_with<F, Fut>(
        listener: TcpListener,
        tls: Option<tokio_rustls::TlsAcceptor>,
        handler: F,
    ) -> Self
    where
        F: Fn(Seen) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<MockBody>> + Send + 'static,
    {
        let addr = listener.local_addr().unwrap();
        let handler: Handler = Arc::new(move |seen| Box::pin(handler(seen)));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let (arrived, _) = watch::channel(0);
        let task = {
            let seen = seen.clone();
            let arrived = arrived.clone();
            let connections = connections.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        return;
                    };
                    connections.fetch_add(1, Ordering::SeqCst);
                    let handler = handler.clone();
                    let seen = seen.clone();
                    let arrived = arrived.clone();
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let handler = handler.clone();
                        let seen = seen.clone();
                        let arrived = arrived.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let request = Seen {
                                method: parts.method,
                                version: parts.version,
                                target: parts
                                    .uri
                                    .path_and_query()
                                    .map_or("/".to_owned(), |pq| pq.to_string()),
                                headers: parts.headers,
                                body,
                            };
                            let count = {
                                let mut seen = seen.lock().unwrap();
                                seen.push(request.clone());
                                seen.len()
                            };
                            arrived.send_replace(count);
                            Ok::<_, Infallible>(handler(request).await)
                        }
                    });
                    let tls = tls.clone();
                    tokio::spawn(async move {
                        let builder =
                            hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                        match tls {
                            None => {
                                let _ = builder
                                    .serve_connection(TokioIo::new(stream), service)
                                    .await;
                            }
                            Some(tls) => {
                                // A failed handshake (an untrusting client) just ends the connection.
                                if let Ok(stream) = tls.accept(stream).await {
                                    let _ = builder
                                        .serve_connection(TokioIo::new(stream), service)
                                        .await;
                                }
                            }
                        }
                    });
                }
            })
        };
        Self {
            addr,
            seen,
            connections,
            arrived,
            task,
        }
    }

    /// How many connections it has accepted.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn https_url(&self, path: &str) -> String {
        format!("https://{}{path}", self.addr)
    }

    /// Every request received so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// The bearer token of every request received so far.
    pub fn keys_seen(&self) -> Vec<String> {
        self.seen()
            .iter()
            .map(|s| s.bearer().unwrap_or_default())
            .collect()
    }

    /// Waits until at least `n` requests have arrived.
    pub async fn wait_for_requests(&self, n: usize) {
        let mut arrived = self.arrived.subscribe();
        within(
            &format!("{n} upstream request(s)"),
            arrived.wait_for(|&c| c >= n),
        )
        .await
        .unwrap();
    }

    /// Stops accepting connections (existing ones finish).
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------
// The proxy process
// ---------------------------------------------------------------------------------------

/// The PEM file of the CA that signed [`MockUpstream::start_tls`]'s certificate (for
/// 127.0.0.1; test use only).
pub fn test_ca_path() -> String {
    tls_path("ca.pem")
}

/// A file of `tests/support/tls/` (see its README).
pub fn tls_path(file: &str) -> String {
    format!("{}/tests/support/tls/{file}", env!("CARGO_MANIFEST_DIR"))
}

/// The proxy's binary (cargo builds it before the tests).
pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_forward_proxy"))
}

/// A running proxy. Its stderr (the log) is collected; it is killed when dropped.
pub struct Proxy {
    pub addr: SocketAddr,
    child: Child,
    log: watch::Receiver<String>,
}

/// How to start a proxy: flags and environment on top of a clean one.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub dir: Option<PathBuf>,
}

impl ProxyConfig {
    /// `--upstream <url> --listen 127.0.0.1:0` with `BIGMODEL_API_KEY=<keys>`.
    pub fn new(upstream: &str, keys: &str) -> Self {
        Self {
            args: vec![
                "--listen".into(),
                "127.0.0.1:0".into(),
                "--upstream".into(),
                upstream.into(),
            ],
            env: vec![("BIGMODEL_API_KEY".into(), keys.into())],
            dir: None,
        }
    }

    pub fn arg(mut self, flag: &str, value: &str) -> Self {
        self.args.push(flag.into());
        self.args.push(value.into());
        self
    }

    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.into(), value.into()));
        self
    }

    fn command(&self) -> Command {
        let mut command = Command::new(binary());
        command
            .args(&self.args)
            .env_clear()
            .envs(self.env.iter().cloned())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // Never read a `.env` lying around the repository by accident.
        command.current_dir(self.dir.clone().unwrap_or_else(empty_dir));
        command
    }

    pub async fn start(&self) -> Proxy {
        let mut child = self.command().spawn().expect("starting forward_proxy");
        let (tx, log) = watch::channel(String::new());
        for stream in [
            Box::new(child.stderr.take().unwrap()) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
            Box::new(child.stdout.take().unwrap()),
        ] {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stream).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    tx.send_modify(|log| {
                        log.push_str(&line);
                        log.push('\n');
                    });
                }
            });
        }
        let mut proxy = Proxy {
            addr: ([127, 0, 0, 1], 0).into(),
            child,
            log,
        };
        let line = proxy.wait_for_log("Listening on http://").await;
        let addr = line
            .split("Listening on http://")
            .nth(1)
            .and_then(|rest| rest.split(',').next())
            .and_then(|addr| addr.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        proxy.addr = addr;
        proxy
    }

    /// Runs the proxy expecting it to exit at once (bad configuration).
    pub async fn run_to_exit(&self) -> (ExitStatus, String, String) {
        let output = within("the proxy to exit", self.command().output())
            .await
            .unwrap();
        (
            output.status,
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }
}

/// A fresh empty directory under cargo's temporary directory for tests.
pub fn empty_dir() -> PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "proxy-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

impl Proxy {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The log so far.
    pub fn log(&self) -> String {
        self.log.borrow().clone()
    }

    /// Waits for a log line containing `needle`, and returns that line.
    pub async fn wait_for_log(&mut self, needle: &str) -> String {
        let mut log = self.log.clone();
        let found = tokio::time::timeout(WAIT, log.wait_for(|log| log.contains(needle))).await;
        let log = self.log();
        match found {
            Ok(Ok(_)) => log
                .lines()
                .find(|line| line.contains(needle))
                .unwrap()
                .to_owned(),
            _ => panic!("no log line with {needle:?}; log so far:\n{log}"),
        }
    }

    /// Sends SIGTERM (as an orchestrator stopping the proxy would).
    pub async fn terminate(&self) {
        let pid = self.child.id().expect("the proxy is running");
        let status = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit.
    pub async fn wait(&mut self) -> ExitStatus {
        within("the proxy to exit", self.child.wait())
            .await
            .unwrap()
    }

    /// Panics if any key value appears in the log.
    pub fn assert_log_has_no_secret(&self, secrets: &[&str]) {
        assert_no_secret("the proxy's log", &self.log(), secrets);
    }
}

pub fn assert_no_secret(what: &str, text: &str, secrets: &[&str]) {
    for secret in secrets {
        assert!(
            !text.contains(secret),
            "{what} contains a secret value:\n{text}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------------------

/// A response read in full.
#[derive(Debug)]
pub struct Got {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Got {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }

    /// Everything the client saw, for secret checks.
    pub fn text(&self) -> String {
        format!("{} {:?} {}", self.status, self.headers, self.body)
    }
}

type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

pub fn client() -> Client {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http()
}

/// Sends `request` and reads the whole answer, within [`WAIT`].
pub async fn send(request: Request<Full<Bytes>>) -> Got {
    within("a response", async {
        let response = client().request(request).await.expect("request failed");
        let (parts, body) = response.into_parts();
        let body = body.collect().await.expect("body failed").to_bytes();
        Got {
            status: parts.status,
            headers: parts.headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    })
    .await
}

pub async fn get(url: &str) -> Got {
    send(Request::get(url).body(Full::default()).unwrap()).await
}

pub async fn post(url: &str, body: &str) -> Got {
    send(
        Request::post(url)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_owned())))
            .unwrap(),
    )
    .await
}

/// Writes `raw` bytes on a new connection and returns the status code of the answer.
pub async fn raw_status(addr: SocketAddr, raw: &str) -> u16 {
    within("a raw response", async {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(raw.as_bytes()).await.unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n") {
            if stream.read(&mut byte).await.unwrap() == 0 {
                break;
            }
            head.push(byte[0]);
        }
        let line = String::from_utf8_lossy(&head).into_owned();
        line.split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("no status line: {line:?}"))
    })
    .await
}

/// The JSON of `/_keyrotation/keys`.
pub async fn keys(proxy: &Proxy) -> Vec<serde_json::Value> {
    let got = get(&proxy.url("/_keyrotation/keys")).await;
    assert_eq!(got.status, 200, "{}", got.body);
    got.json().as_array().unwrap().clone()
}

/// Polls `/_keyrotation/metrics` until `n` requests wait for a key
/// (`keyrotation_requests_waiting`), at most [`WAIT`]: the signal that a request reached
/// the proxy's wait, set in another process.
pub async fn wait_for_waiting(proxy: &Proxy, n: usize) {
    let deadline = tokio::time::Instant::now() + WAIT;
    let wanted = format!("keyrotation_requests_waiting {n}.0");
    loop {
        let metrics = get(&proxy.url("/_keyrotation/metrics")).await.body;
        if metrics.lines().any(|line| line == wanted) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never {n} request(s) waiting: {metrics}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls `/_keyrotation/keys` until `done` holds, at most [`WAIT`]. The state it waits for
/// is set by another process, which offers no signal to await; each poll is a request,
/// never a sleep standing in for one.
pub async fn wait_for_keys(proxy: &Proxy, done: impl Fn(&[serde_json::Value]) -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let keys = keys(proxy).await;
        if done(&keys) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "keys never reached the expected state: {keys:?}"
        );
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

impl Proxy {
    /// Sends `signal` (`HUP`, `TERM`, ...) to the proxy process.
    pub async fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("the proxy is running");
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .status()
            .await
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the `n`-th log line containing `needle` (1-based), and returns it.
    pub async fn wait_for_nth_log(&mut self, needle: &str, n: usize) -> String {
        let mut log = self.log.clone();
        let found = tokio::time::timeout(
            WAIT,
            log.wait_for(|log| log.lines().filter(|l| l.contains(needle)).count() >= n),
        )
        .await;
        let log = self.log();
        match found {
            Ok(Ok(_)) => log
                .lines()
                .filter(|line| line.contains(needle))
                .nth(n - 1)
                .unwrap()
                .to_owned(),
            _ => panic!("no log line #{n} with {needle:?}; log so far:\n{log}"),
        }
    }
}
