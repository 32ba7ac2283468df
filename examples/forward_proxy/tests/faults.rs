//! The forward proxy under faults, as real processes on 127.0.0.1: upstreams that reset,
//! stall mid-body, answer malformed HTTP, go away and come back, or answer too slowly; and
//! clients that send malformed or oversized requests, aim at other hosts, CONNECT, trickle
//! their headers, or go away mid-stream.
//!
//! Every test ends with [`assert_still_sound`]: the proxy answers its health route, every
//! key's in-flight count is back to 0, a second listener standing in for "another host"
//! ([`Sentinel`]) received nothing, and no key value appears in the proxy's log or in
//! anything a client received. Faults already covered in `tests/proxy.rs` (an upstream
//! that is down from the start, a response head later than `--request-timeout`, a client
//! going away mid-stream, absolute-form and `CONNECT` to an unresolvable host, dot
//! segments) are not repeated here; see TESTING.md.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const KEYS: [&str; 3] = ["sk-fault-a1b2c3", "sk-fault-d4e5f6", "sk-fault-g7h8i9"];
const KEY_LIST: &str = "sk-fault-a1b2c3,sk-fault-d4e5f6,sk-fault-g7h8i9";

/// A proxy with the most verbose log, so that the secret check covers every line it writes.
fn config(upstream: &str) -> ProxyConfig {
    ProxyConfig::new(upstream, KEY_LIST).arg("--log-level", "trace")
}

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// A listener standing in for another host: it must never be contacted.
struct Sentinel {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    received: Arc<Mutex<Vec<u8>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Sentinel {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let received = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn({
            let connections = connections.clone();
            let received = received.clone();
            async move {
                while let Ok((mut stream, _)) = listener.accept().await {
                    connections.fetch_add(1, Ordering::SeqCst);
                    let received = received.clone();
                    tokio::spawn(async move {
                        let mut buf = [0u8; 4096];
                        while let Ok(n @ 1..) = stream.read(&mut buf).await {
                            received.lock().unwrap().extend_from_slice(&buf[..n]);
                        }
                    });
                }
            }
        });
        Self {
            addr,
            connections,
            received,
            task,
        }
    }

    fn assert_untouched(&self) {
        assert_eq!(
            self.connections.load(Ordering::SeqCst),
            0,
            "another host was contacted"
        );
        let received = self.received.lock().unwrap();
        assert!(received.is_empty(), "another host received {received:?}");
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What a [`RawUpstream`] does with a connection once it has read the request head.
enum Answer {
    /// Closes with a TCP reset (SO_LINGER 0).
    Reset,
    /// Writes these bytes, then closes.
    Write(Vec<u8>),
    /// Writes these bytes, then holds the connection open until `release` turns true,
    /// then closes it (mid-body, if the bytes promised more).
    WriteAndHold(Vec<u8>, watch::Receiver<bool>),
}

/// An upstream speaking raw TCP, for answers no well-behaved server would give. It records
/// the head of every request it reads.
struct RawUpstream {
    addr: SocketAddr,
    heads: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl RawUpstream {
    async fn start(answer: impl Fn(usize) -> Answer + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let answer = Arc::new(answer);
        let task = tokio::spawn({
            let heads = heads.clone();
            async move {
                while let Ok((mut stream, _)) = listener.accept().await {
                    let heads = heads.clone();
                    let answer = answer.clone();
                    tokio::spawn(async move {
                        let Some(head) = read_head(&mut stream).await else {
                            return;
                        };
                        let n = {
                            let mut heads = heads.lock().unwrap();
                            heads.push(head);
                            heads.len() - 1
                        };
                        match answer(n) {
                            Answer::Reset => {
                                stream.set_zero_linger().unwrap();
                                drop(stream);
                            }
                            Answer::Write(bytes) => {
                                let _ = stream.write_all(&bytes).await;
                            }
                            Answer::WriteAndHold(bytes, mut release) => {
                                let _ = stream.write_all(&bytes).await;
                                let _ = release.wait_for(|go| *go).await;
                            }
                        }
                    });
                }
            }
        });
        Self { addr, heads, task }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads up to the end of a request head (at most 64 KiB); `None` if the peer closed first.
async fn read_head(stream: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 65_536 {
        let n = stream.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        head.extend_from_slice(&buf[..n]);
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

/// Writes `raw` on a new connection and reads until the proxy closes it (send
/// `Connection: close`, or something the proxy refuses). Returns the status code and
/// everything received.
async fn raw_answer(addr: SocketAddr, raw: &[u8]) -> (u16, String) {
    within("a raw answer", async {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(raw).await.unwrap();
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer).await;
        let text = String::from_utf8_lossy(&answer).into_owned();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("no status line in {text:?}"));
        (status, text)
    })
    .await
}

/// A GET on a connection of its own (hyper's connection-level client), for tests that
/// read the body frame by frame: the response head, or the error that came instead.
async fn get_on_own_connection(
    addr: SocketAddr,
    path: &str,
) -> Result<http::Response<hyper::body::Incoming>, hyper::Error> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let request = Request::get(path)
        .header("host", "proxy")
        .body(Empty::<Bytes>::new())
        .unwrap();
    within("the response head", sender.send_request(request)).await
}

/// Reads `body` to its end: did it end in an error (rather than as if complete)?
async fn ends_in_error(mut body: hyper::body::Incoming) -> bool {
    while let Some(frame) = within("the body's end", body.frame()).await {
        if frame.is_err() {
            return true;
        }
    }
    false
}

/// After each fault: the proxy is up, nothing is left in flight, the other host saw
/// nothing, and no key appears in the log or in what clients received.
async fn assert_still_sound(proxy: &Proxy, sentinel: &Sentinel, received: &[String]) {
    let health = get(&proxy.url("/_keyrotation/health")).await;
    assert_eq!(health.status, 200, "the proxy stopped answering");
    wait_for_keys(proxy, |keys| keys.iter().all(|k| k["in_flight"] == 0)).await;
    sentinel.assert_untouched();
    proxy.assert_log_has_no_secret(&KEYS);
    for text in received {
        assert_no_secret("an answer to a client", text, &KEYS);
    }
}

fn error_code(got: &Got) -> String {
    got.json()["error"]["code"]
        .as_str()
        .unwrap_or("")
        .to_owned()
}

// ---------------------------------------------------------------------------------------
// Upstream faults
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn an_upstream_resetting_connections_gives_502_without_retrying_a_sent_request() {
    let sentinel = Sentinel::start().await;
    let upstream = RawUpstream::start(|_| Answer::Reset).await;
    let proxy = config(&upstream.url()).start().await;

    let got = post(&proxy.url("/chat/completions"), "{}").await;
    assert_eq!(got.status, 502, "{}", got.body);
    assert_eq!(error_code(&got), "upstream_unreachable");
    // The request was sent before the reset: resending it could run it twice.
    assert_eq!(upstream.heads().len(), 1);
    assert!(upstream.heads()[0].contains(&format!("authorization: Bearer {}", KEYS[0])));
    let keys = keys(&proxy).await;
    assert!(keys.iter().all(|k| k["disabled"] == false), "{keys:?}");
    assert_still_sound(&proxy, &sentinel, &[got.text()]).await;
}

#[tokio::test]
async fn an_upstream_stalling_mid_body_holds_its_key_until_it_closes_and_the_client_sees_a_cut_body()
 {
    let sentinel = Sentinel::start().await;
    let (release, held) = watch::channel(false);
    let upstream = RawUpstream::start(move |_| {
        Answer::WriteAndHold(
            b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nfirst ten.".to_vec(),
            held.clone(),
        )
    })
    .await;
    let proxy = config(&upstream.url()).start().await;

    let response = get_on_own_connection(proxy.addr, "/stall").await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let first = within("the first bytes", body.frame())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.into_data().unwrap(), "first ten.");

    // Stalled: the key stays in flight, and the proxy serves others meanwhile.
    assert_eq!(keys(&proxy).await[0]["in_flight"], 1);
    assert_eq!(get(&proxy.url("/_keyrotation/health")).await.status, 200);

    // The upstream gives up 90 bytes short: the client must see an error, not a short body
    // that looks complete.
    release.send_replace(true);
    assert!(ends_in_error(body).await, "a cut body ended as if complete");
    assert_still_sound(&proxy, &sentinel, &[]).await;
}

#[tokio::test]
async fn malformed_upstream_answers_give_502() {
    let answers: [&[u8]; 9] = [
        b"this is not http\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\ncontent-length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: many\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon in this header\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\ncontent-length: 5, 6\r\n\r\nhello",
        // Both lengths: which one the upstream meant is a guess (smuggling), not an answer.
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n\
          5\r\nhello\r\n0\r\n\r\n",
        // A protocol switch nobody asked for.
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n",
        b"", // closes without a byte
    ];
    let sentinel = Sentinel::start().await;
    let upstream = RawUpstream::start(move |n| Answer::Write(answers[n].to_vec())).await;
    let proxy = config(&upstream.url()).start().await;

    let mut received = Vec::new();
    for (n, answer) in answers.iter().enumerate() {
        let got = get(&proxy.url(&format!("/malformed/{n}"))).await;
        assert_eq!(
            got.status,
            502,
            "{:?}: {}",
            String::from_utf8_lossy(answer),
            got.body
        );
        assert_eq!(error_code(&got), "upstream_unreachable");
        received.push(got.text());
    }
    assert_eq!(upstream.heads().len(), answers.len(), "one attempt each");
    assert_still_sound(&proxy, &sentinel, &received).await;
}

/// An upstream whose listener and open connections can all be closed, then reopened on
/// the same port.
struct Restartable {
    addr: SocketAddr,
    stop: Option<watch::Sender<bool>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Restartable {
    async fn start(addr: SocketAddr, served: Arc<AtomicUsize>) -> Self {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn({
            let served = served.clone();
            async move {
                let mut connections = tokio::task::JoinSet::new();
                let mut stopped_accepting = stopped.clone();
                loop {
                    tokio::select! {
                        accepted = listener.accept() => {
                            let Ok((stream, _)) = accepted else { break };
                            let served = served.clone();
                            connections.spawn(async move {
                                let service = hyper::service::service_fn(move |_req| {
                                    served.fetch_add(1, Ordering::SeqCst);
                                    async { Ok::<_, std::convert::Infallible>(reply(200, "up")) }
                                });
                                // Keep-alive: the proxy pools this connection.
                                let _ = hyper::server::conn::http1::Builder::new()
                                    .serve_connection(TokioIo::new(stream), service)
                                    .await;
                            });
                        }
                        _ = stopped_accepting.wait_for(|s| *s) => break,
                    }
                }
                // Closing: the listener and every pooled connection go at once.
                drop(listener);
                connections.shutdown().await;
            }
        });
        Self {
            addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    async fn close(&mut self) {
        self.stop.take().unwrap().send_replace(true);
        within("the upstream to close", self.task.take().unwrap())
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn an_upstream_closing_its_port_gives_502_and_service_resumes_when_it_is_back() {
    let sentinel = Sentinel::start().await;
    let served = Arc::new(AtomicUsize::new(0));
    let mut upstream = Restartable::start(([127, 0, 0, 1], 0).into(), served.clone()).await;
    let addr = upstream.addr;
    let proxy = config(&format!("http://{addr}")).start().await;

    let mut received = Vec::new();
    for _ in 0..3 {
        let got = get(&proxy.url("/before")).await;
        assert_eq!(got.status, 200);
        received.push(got.text());
    }
    upstream.close().await;

    // Pooled connections are gone and the port refuses: a clear 502 (connection refused is
    // resent on the other keys, which cannot help, and then answered).
    for _ in 0..2 {
        let got = get(&proxy.url("/down")).await;
        assert_eq!(got.status, 502, "{}", got.body);
        assert_eq!(error_code(&got), "upstream_unreachable");
        received.push(got.text());
    }
    let keys_now = keys(&proxy).await;
    assert!(
        keys_now
            .iter()
            .all(|k| k["disabled"] == false && k["cooling_down_ms"] == 0),
        "an unreachable upstream is not the keys' fault: {keys_now:?}"
    );

    let _back = Restartable::start(addr, served.clone()).await;
    for _ in 0..3 {
        let got = get(&proxy.url("/after")).await;
        assert_eq!(got.status, 200, "{}", got.body);
        received.push(got.text());
    }
    assert_eq!(served.load(Ordering::SeqCst), 6);
    assert_still_sound(&proxy, &sentinel, &received).await;
}

#[tokio::test]
async fn a_slow_upstream_gets_504_past_the_timeout_and_a_slow_body_is_not_cut() {
    let sentinel = Sentinel::start().await;
    let (release, held) = watch::channel(false);
    let upstream = RawUpstream::start(move |n| match n {
        // The first request: no head at all until released (after the timeout).
        0 => Answer::WriteAndHold(Vec::new(), held.clone()),
        // Then a head in time, and a body that takes its time.
        _ => Answer::WriteAndHold(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nslow \r\n".to_vec(),
            held.clone(),
        ),
    })
    .await;
    let proxy = config(&upstream.url())
        .arg("--request-timeout", "0.5")
        .start()
        .await;

    let got = get(&proxy.url("/no-head")).await;
    assert_eq!(got.status, 504, "{}", got.body);
    assert_eq!(error_code(&got), "upstream_timeout");
    assert_eq!(
        upstream.heads().len(),
        1,
        "a timed-out request is not resent"
    );
    // The key is free again even though the upstream still holds the connection.
    wait_for_keys(&proxy, |keys| keys.iter().all(|k| k["in_flight"] == 0)).await;

    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"GET /slow-body HTTP/1.1\r\nhost: proxy\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&seen).contains("slow ") {
        let n = within("the first chunk", stream.read(&mut buf))
            .await
            .unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&seen).starts_with("HTTP/1.1 200"));
    assert_eq!(
        keys(&proxy).await[1]["in_flight"],
        1,
        "streaming past the timeout"
    );
    release.send_replace(true);
    let _ = within("the end", stream.read_to_end(&mut seen)).await;
    assert_still_sound(&proxy, &sentinel, &[got.text()]).await;
}

#[tokio::test]
async fn a_chunked_answer_with_a_bad_size_line_cuts_the_body_and_releases_the_key() {
    let sentinel = Sentinel::start().await;
    let (release, held) = watch::channel(false);
    let upstream = RawUpstream::start(move |_| {
        Answer::WriteAndHold(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n".to_vec(),
            held.clone(),
        )
    })
    .await;
    let proxy = config(&upstream.url()).start().await;

    let response = get_on_own_connection(proxy.addr, "/bad-chunk").await;
    // The upstream still holds its connection open: the error is the size line's, not a
    // close's. It came with the head, so the proxy may cut the connection before its head
    // is out; if the head is out, the body must end in an error, never as if complete.
    if let Ok(response) = response {
        assert_eq!(response.status(), 200);
        let body = response.into_body();
        assert!(ends_in_error(body).await, "a cut body ended as if complete");
    }
    assert_still_sound(&proxy, &sentinel, &[]).await;
    assert_eq!(upstream.heads().len(), 1);
    release.send_replace(true);
}

/// What a [`KeepAliveUpstream`] does after an answer.
#[derive(Clone, Copy, PartialEq)]
enum After {
    KeepOpen,
    Close,
}

/// An upstream speaking raw HTTP/1.1 on kept-alive connections: it records every request
/// (with its connection's number), answers the n-th with `answer(n)`, and counts the
/// connections it has closed.
struct KeepAliveUpstream {
    addr: SocketAddr,
    /// (connection, request head), in arrival order.
    requests: Arc<Mutex<Vec<(usize, String)>>>,
    closed: watch::Receiver<usize>,
    task: tokio::task::JoinHandle<()>,
}

impl KeepAliveUpstream {
    async fn start(answer: impl Fn(usize) -> (Vec<u8>, After) + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (closed_tx, closed) = watch::channel(0);
        let closed_tx = Arc::new(closed_tx);
        let answer = Arc::new(answer);
        let task = tokio::spawn({
            let requests = requests.clone();
            async move {
                let mut id = 0;
                while let Ok((mut stream, _)) = listener.accept().await {
                    let (requests, answer, closed_tx) =
                        (requests.clone(), answer.clone(), closed_tx.clone());
                    let connection = id;
                    id += 1;
                    tokio::spawn(async move {
                        let mut pending = Vec::new();
                        while let Some(head) = read_request(&mut stream, &mut pending).await {
                            let n = {
                                let mut requests = requests.lock().unwrap();
                                requests.push((connection, head));
                                requests.len() - 1
                            };
                            let (bytes, after) = answer(n);
                            if stream.write_all(&bytes).await.is_err() || after == After::Close {
                                break;
                            }
                        }
                        drop(stream);
                        closed_tx.send_modify(|n| *n += 1);
                    });
                }
            }
        });
        Self {
            addr,
            requests,
            closed,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The connection each request came on.
    fn connections(&self) -> Vec<usize> {
        self.requests.lock().unwrap().iter().map(|r| r.0).collect()
    }

    async fn wait_for_closed(&mut self, n: usize) {
        within("the upstream to close", self.closed.wait_for(|c| *c >= n))
            .await
            .unwrap();
    }
}

impl Drop for KeepAliveUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads one request (its head, and its body by `content-length`) from a kept-alive
/// connection; `pending` holds what was read past it. `None` when the peer closed.
async fn read_request(stream: &mut TcpStream, pending: &mut Vec<u8>) -> Option<String> {
    let mut buf = [0u8; 4096];
    let end = loop {
        if let Some(at) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = stream.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        pending.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&pending[..end]).into_owned();
    let length = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length: "))
        .map_or(0, |n| n.trim().parse::<usize>().unwrap());
    while pending.len() < end + length {
        let n = stream.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        pending.extend_from_slice(&buf[..n]);
    }
    pending.drain(..end + length);
    Some(head)
}

#[tokio::test]
async fn the_request_timeout_holds_on_pooled_connections_and_after_an_idle_spell() {
    let sentinel = Sentinel::start().await;
    const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
    // The second request gets no answer at all; the others are answered at once.
    let upstream = KeepAliveUpstream::start(|n| match n {
        1 => (Vec::new(), After::KeepOpen),
        _ => (OK.to_vec(), After::KeepOpen),
    })
    .await;
    // One worker: one pool, so that a request takes the connection the last one freed.
    let proxy = config(&upstream.url())
        .arg("--workers", "1")
        .arg("--request-timeout", "0.3")
        .start()
        .await;

    let mut received = Vec::new();
    let got = post(&proxy.url("/chat/completions"), "{}").await;
    assert_eq!(got.status, 200, "{}", got.body);
    received.push(got.text());
    // On the pooled connection: this request's own deadline, counted from its call.
    let sent = tokio::time::Instant::now();
    let got = post(&proxy.url("/chat/completions"), "{}").await;
    assert_eq!(got.status, 504, "{}", got.body);
    assert_eq!(error_code(&got), "upstream_timeout");
    assert!(
        sent.elapsed() >= std::time::Duration::from_millis(300),
        "not before the timeout: {:?}",
        sent.elapsed()
    );
    received.push(got.text());
    let got = post(&proxy.url("/chat/completions"), "{}").await;
    assert_eq!(got.status, 200, "{}", got.body);
    received.push(got.text());
    // Time itself is what is tested here: the connection idles past the last request's
    // deadline, and the next request on it must not see that old deadline (a guard for a
    // timer kept per connection and re-armed in place of tower's `Timeout`).
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let got = post(&proxy.url("/chat/completions"), "{}").await;
    assert_eq!(got.status, 200, "{}", got.body);
    received.push(got.text());

    assert_eq!(
        upstream.connections(),
        [0, 0, 1, 1],
        "the timed-out request on the pooled connection, the last one after the idle spell"
    );
    assert_still_sound(&proxy, &sentinel, &received).await;
}

#[tokio::test]
async fn pooled_connections_the_upstream_closed_are_not_used_and_no_request_is_sent_twice() {
    let sentinel = Sentinel::start().await;
    // Every answer keeps the connection alive by HTTP/1.1's default, and then the upstream
    // closes it (its keep-alive timeout, as nginx's `keepalive_timeout`).
    let mut upstream = KeepAliveUpstream::start(|_| {
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec(),
            After::Close,
        )
    })
    .await;
    let proxy = config(&upstream.url()).start().await;

    let mut received = Vec::new();
    for n in 0..5 {
        // The previous connection is closed (and pooled by the proxy) before the next
        // request.
        upstream.wait_for_closed(n).await;
        let got = post(&proxy.url("/chat/completions"), "{\"n\":1}").await;
        assert_eq!(got.status, 200, "request {n}: {}", got.body);
        assert_eq!(got.body, "ok");
        received.push(got.text());
    }
    assert_eq!(
        upstream.connections(),
        [0, 1, 2, 3, 4],
        "each request once, each on a new connection"
    );
    assert_still_sound(&proxy, &sentinel, &received).await;
}

#[tokio::test]
async fn answers_to_head_and_204_and_304_have_no_body_whatever_their_length_says() {
    let sentinel = Sentinel::start().await;
    let upstream = KeepAliveUpstream::start(|n| {
        let answer: &[u8] = match n {
            0 => b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n",
            1 => b"HTTP/1.1 204 No Content\r\ncontent-length: 10\r\n\r\n",
            2 => b"HTTP/1.1 304 Not Modified\r\ncontent-length: 10\r\n\r\n",
            _ => b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
        };
        (answer.to_vec(), After::KeepOpen)
    })
    .await;
    // One worker: one pool of upstream connections.
    let proxy = config(&upstream.url()).arg("--workers", "1").start().await;

    // Were a body read, these would wait for 10 bytes that never come (a 504).
    let head = send(
        Request::head(proxy.url("/head"))
            .body(Default::default())
            .unwrap(),
    )
    .await;
    assert_eq!(head.status, 200);
    assert_eq!(head.body, "");
    let no_content = get(&proxy.url("/no-content")).await;
    assert_eq!(no_content.status, 204);
    assert_eq!(no_content.body, "");
    let not_modified = get(&proxy.url("/not-modified")).await;
    assert_eq!(not_modified.status, 304);
    assert_eq!(not_modified.body, "");
    let ok = get(&proxy.url("/ok")).await;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.body, "ok");
    // And nothing was taken from the connection as a body: all four went on one.
    assert_eq!(upstream.connections(), [0, 0, 0, 0]);
    let received = [
        head.text(),
        no_content.text(),
        not_modified.text(),
        ok.text(),
    ];
    assert_still_sound(&proxy, &sentinel, &received).await;
}

#[tokio::test]
async fn a_connection_with_bytes_past_the_answer_is_not_used_again() {
    let sentinel = Sentinel::start().await;
    let upstream = KeepAliveUpstream::start(|n| {
        let answer: &[u8] = match n {
            // One byte more than the answer: the start of an answer to no request.
            0 => b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokX",
            _ => b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
        };
        (answer.to_vec(), After::KeepOpen)
    })
    .await;
    // One worker: one pool of upstream connections.
    let proxy = config(&upstream.url()).arg("--workers", "1").start().await;

    let mut received = Vec::new();
    for _ in 0..3 {
        let got = get(&proxy.url("/extra")).await;
        assert_eq!(got.status, 200, "{}", got.body);
        assert_eq!(got.body, "ok");
        received.push(got.text());
    }
    // The first connection is dropped; the second, clean, is used again.
    assert_eq!(upstream.connections(), [0, 1, 1]);
    assert_still_sound(&proxy, &sentinel, &received).await;
}

// ---------------------------------------------------------------------------------------
// Client faults
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn malformed_requests_get_400_and_reach_no_one() {
    let sentinel = Sentinel::start().await;
    let upstream = MockUpstream::start(|_| async { reply(200, "ok") }).await;
    let proxy = config(&upstream.url("")).start().await;

    let cases: [&[u8]; 10] = [
        b"GARBAGE\r\n\r\n",
        b"GET\r\n\r\n",
        b"GET /x HTTP/1.1\r\nno colon here\r\n\r\n",
        b"GET /x HTTP/1.1\r\nhost: a\r\nbad name\x01: v\r\n\r\n",
        b"POST /x HTTP/1.1\r\nhost: a\r\ncontent-length: abc\r\n\r\n",
        b"POST /x HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\nabcd",
        b"POST /x HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
        b"GET /a\x00b HTTP/1.1\r\nhost: a\r\n\r\n",
        b"GET /x HTTP/1.1\r\nhost: a\r\nx: \x7f\x00\r\n\r\n",
        // Asterisk-form: was forwarded as `<prefix>*`, outside the prefix (found by fuzzing).
        b"OPTIONS * HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
    ];
    let mut received = Vec::new();
    for raw in cases {
        let (status, text) = raw_answer(proxy.addr, raw).await;
        assert_eq!(status, 400, "{:?} -> {text}", String::from_utf8_lossy(raw));
        received.push(text);
    }
    // HTTP/2 preface followed by garbage: the connection is refused, the proxy lives on.
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\xff\xff\xff\xff\xff\xff\xff\xff\xff")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let _ = within("the h2 connection to close", stream.read_to_end(&mut rest)).await;
    received.push(String::from_utf8_lossy(&rest).into_owned());

    assert!(upstream.seen().is_empty(), "{:?}", upstream.seen());
    assert_still_sound(&proxy, &sentinel, &received).await;
}

#[tokio::test]
async fn oversized_headers_get_431_and_reach_no_one() {
    let sentinel = Sentinel::start().await;
    let upstream = MockUpstream::start(|_| async { reply(200, "ok") }).await;
    let proxy = config(&upstream.url("")).start().await;

    // More header lines than the server takes (hyper's default, 100).
    let mut many = String::from("GET /many HTTP/1.1\r\nhost: a\r\n");
    for i in 0..150 {
        many.push_str(&format!("x-h{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let (status, many_text) = raw_answer(proxy.addr, many.as_bytes()).await;
    assert_eq!(status, 431, "{many_text}");

    // One header line bigger than the read buffer (hyper's default, about 400 KiB). The
    // proxy answers before reading all of it; the client writes from a task of its own so
    // that the answer is read while it is still writing.
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut read, mut write) = stream.split();
    let mut huge = b"GET /huge HTTP/1.1\r\nhost: a\r\nx-big: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 600 * 1024));
    huge.extend_from_slice(b"\r\n\r\n");
    let mut answer = Vec::new();
    let (_, _) = within("the oversized header's answer", async {
        tokio::join!(
            async {
                let _ = write.write_all(&huge).await;
            },
            async {
                let mut buf = [0u8; 1024];
                while let Ok(n @ 1..) = read.read(&mut buf).await {
                    answer.extend_from_slice(&buf[..n]);
                }
            }
        )
    })
    .await;
    let huge_text = String::from_utf8_lossy(&answer).into_owned();
    // The answer is a 431; a reset that beat it to the client would show as nothing at all.
    assert!(
        huge_text.starts_with("HTTP/1.1 431") || huge_text.is_empty(),
        "{huge_text}"
    );

    assert!(upstream.seen().is_empty());
    assert_still_sound(&proxy, &sentinel, &[many_text, huge_text]).await;
}

#[tokio::test]
async fn requests_aimed_at_another_reachable_host_never_reach_it() {
    let sentinel = Sentinel::start().await;
    let upstream = MockUpstream::start(|_| async { reply(200, "upstream") }).await;
    let proxy = config(&upstream.url("/v4")).start().await;
    let other = sentinel.addr;
    let up = upstream.addr;

    let mut received = Vec::new();
    // Absolute-form targets naming the other host, however spelled: refused with 400.
    for target in [
        format!("http://{other}/steal"),
        format!("HTTP://{other}/steal"),
        format!("https://{other}/steal"),
        format!("http://user@{other}/steal"),
        format!("http://{up}@{other}/steal"),
        format!("http://localhost:{}/steal", other.port()),
        format!("http://[::ffff:127.0.0.1]:{}/steal", other.port()),
    ] {
        let raw = format!("GET {target} HTTP/1.1\r\nhost: {other}\r\nconnection: close\r\n\r\n");
        let (status, text) = raw_answer(proxy.addr, raw.as_bytes()).await;
        assert_eq!(status, 400, "{target} -> {text}");
        received.push(text);
    }
    // CONNECT to the other host: 400, and no tunnel opens for the bytes that follow.
    let connect = format!(
        "CONNECT {other} HTTP/1.1\r\nhost: {other}\r\n\r\nGET /through-the-tunnel HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    );
    let (status, text) = raw_answer(proxy.addr, connect.as_bytes()).await;
    assert_eq!(status, 400, "{text}");
    received.push(text);
    assert!(
        upstream.seen().iter().all(|s| s.target.starts_with("/v4/")),
        "{:?}",
        upstream.seen()
    );

    // Origin-form with the other host in `Host` (and in forwarding headers): goes to the
    // configured upstream, with the upstream's own Host.
    let raw = format!(
        "GET /models HTTP/1.1\r\nhost: {other}\r\nx-forwarded-host: {other}\r\nforwarded: host={other}\r\nconnection: close\r\n\r\n"
    );
    let (status, text) = raw_answer(proxy.addr, raw.as_bytes()).await;
    assert_eq!(status, 200, "{text}");
    received.push(text);
    let seen = upstream.seen();
    let last = seen.last().unwrap();
    assert_eq!(last.target, "/v4/models");
    assert_eq!(last.headers["host"], up.to_string());

    // A redirect to the other host is handed back, never followed with a key.
    let redirecting = MockUpstream::start(move |_| async move {
        http::Response::builder()
            .status(307)
            .header("location", format!("http://{other}/landing"))
            .body(full(""))
            .unwrap()
    })
    .await;
    let redirect_proxy = config(&redirecting.url("")).start().await;
    let got = post(&redirect_proxy.url("/chat/completions"), "{}").await;
    assert_eq!(got.status, 307);
    received.push(got.text());
    assert_eq!(redirecting.seen().len(), 1);
    assert_still_sound(&redirect_proxy, &sentinel, &received).await;
    assert_still_sound(&proxy, &sentinel, &received).await;
}

#[tokio::test]
async fn trickling_clients_do_not_starve_others_and_are_answered_when_done() {
    const TRICKLERS: usize = 100;
    let sentinel = Sentinel::start().await;
    let upstream = MockUpstream::start(|_| async { reply(200, "ok") }).await;
    let proxy = config(&upstream.url("")).start().await;

    // Many connections each holding a request head half sent, slowloris-style.
    let mut tricklers = Vec::new();
    for i in 0..TRICKLERS {
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        stream
            .write_all(format!("GET /trickle/{i} HTTP/1.1\r\nhost: a\r\n").as_bytes())
            .await
            .unwrap();
        tricklers.push(stream);
    }
    let mut received = Vec::new();
    // A header line a byte at a time, every connection in turn; a normal client is served
    // between bytes, at once.
    for (round, byte) in b"x-slow: 1\r\n".iter().enumerate() {
        for stream in &mut tricklers {
            stream.write_all(&[*byte]).await.unwrap();
        }
        let got = get(&proxy.url(&format!("/normal/{round}"))).await;
        assert_eq!(got.status, 200);
        received.push(got.text());
    }
    assert_eq!(
        upstream.seen().len(),
        11,
        "no trickled request went through early"
    );

    // Once their heads are complete, every trickler gets its answer.
    for stream in &mut tricklers {
        stream
            .write_all(b"connection: close\r\n\r\n")
            .await
            .unwrap();
    }
    for mut stream in tricklers {
        let mut answer = Vec::new();
        within("a trickler's answer", stream.read_to_end(&mut answer))
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&answer).into_owned();
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        received.push(text);
    }
    assert_eq!(upstream.seen().len(), 11 + TRICKLERS);
    assert_still_sound(&proxy, &sentinel, &received).await;
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_disconnected() {
    let sentinel = Sentinel::start().await;
    let upstream = MockUpstream::start(|_| async { reply(200, "ok") }).await;
    let proxy = config(&upstream.url(""))
        .arg("--header-read-timeout", "1")
        .start()
        .await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"GET /stalled HTTP/1.1\r\nhost: a\r\n")
        .await
        .unwrap();
    // The proxy closes the connection once the timeout passes (whatever it says first).
    let mut answer = Vec::new();
    within(
        "the stalled connection to close",
        stream.read_to_end(&mut answer),
    )
    .await
    .unwrap();
    assert!(upstream.seen().is_empty());
    let received = vec![String::from_utf8_lossy(&answer).into_owned()];
    assert_still_sound(&proxy, &sentinel, &received).await;
}

#[tokio::test]
async fn an_idle_http2_connection_is_closed_and_one_with_a_slow_answer_is_not() {
    let sentinel = Sentinel::start().await;
    // `/slow` is answered after 2 s: longer than the idle timeout below.
    let upstream = MockUpstream::start(|seen| async move {
        if seen.target == "/slow" {
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        }
        reply(200, "ok")
    })
    .await;
    let proxy = config(&upstream.url(""))
        .arg("--header-read-timeout", "1")
        .start()
        .await;

    // A client that opens HTTP/2 (preface and SETTINGS) and asks nothing is closed, as an
    // idle HTTP/1 connection is (hyper's server alone would keep it forever).
    let mut idle = TcpStream::connect(proxy.addr).await.unwrap();
    idle.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let mut said = Vec::new();
    within(
        "the idle HTTP/2 connection to close",
        idle.read_to_end(&mut said),
    )
    .await
    .unwrap();

    // A request in progress keeps its connection open past the timeout: the answer comes,
    // and the same connection (no GOAWAY sent) takes another request.
    let io = TokioIo::new(TcpStream::connect(proxy.addr).await.unwrap());
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
            .await
            .unwrap();
    tokio::spawn(connection);
    let mut received = vec![String::from_utf8_lossy(&said).into_owned()];
    for target in ["/slow", "/again"] {
        let request = Request::get(format!("http://{}{target}", proxy.addr))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let response = within("an HTTP/2 answer", sender.send_request(request))
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{target}");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        received.push(String::from_utf8_lossy(&body).into_owned());
    }
    let seen: Vec<String> = upstream.seen().into_iter().map(|s| s.target).collect();
    assert_eq!(seen, ["/slow", "/again"]);
    assert_still_sound(&proxy, &sentinel, &received).await;
}

#[tokio::test]
async fn an_upstream_answering_before_the_whole_upload_and_resetting_is_heard() {
    // The upstream reads the head, refuses at once (as a server does for a body too large)
    // and closes with the upload unread, which resets the connection.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if stream.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let _ = stream
                    .write_all(
                        b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 9\r\n\
                          connection: close\r\n\r\ntoo large",
                    )
                    .await;
                // Let some of the upload arrive unread: closing then sends a reset.
                let _ = stream.readable().await;
            });
        }
    });
    let proxy = config(&format!("http://{up}")).start().await;

    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    const LEN: usize = 32 * 1024 * 1024;
    let upload = tokio::spawn(async move {
        let head = format!("POST /big HTTP/1.1\r\nhost: a\r\ncontent-length: {LEN}\r\n\r\n");
        write.write_all(head.as_bytes()).await?;
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..LEN / chunk.len() {
            write.write_all(&chunk).await?;
        }
        Ok::<_, std::io::Error>(())
    });
    let mut answer = Vec::new();
    within("the answer", read.read_to_end(&mut answer))
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.ends_with("too large"), "{text}");
    // The upload was cut when the proxy closed the connection after the answer.
    let _ = upload.await;
}

#[tokio::test]
async fn a_client_going_away_mid_upload_forwards_nothing_or_releases_the_key() {
    let sentinel = Sentinel::start().await;
    let upstream = MockUpstream::start(|_| async { reply(200, "ok") }).await;
    let mut proxy = config(&upstream.url(""))
        .arg("--retry-body-limit", "1024")
        .start()
        .await;

    // A small body (buffered for retries) cut short: nothing is forwarded.
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"POST /small HTTP/1.1\r\nhost: a\r\ncontent-length: 500\r\n\r\nonly this")
        .await
        .unwrap();
    drop(stream);
    proxy.wait_for_log("reading the request body failed").await;
    assert!(upstream.seen().is_empty());

    // A large body (streamed through) cut short: the upstream sees the request begin, the
    // key is released when the upload breaks.
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"POST /large HTTP/1.1\r\nhost: a\r\ncontent-length: 100000\r\n\r\n")
        .await
        .unwrap();
    stream.write_all(&[b'x'; 20_000]).await.unwrap();
    // Forwarded (the key is reserved) while the upload goes on; then the client goes.
    wait_for_keys(&proxy, |keys| keys[0]["in_flight"] == 1).await;
    drop(stream);
    upstream.wait_for_requests(1).await;
    assert_eq!(upstream.seen()[0].target, "/large");
    assert!(upstream.seen()[0].body.len() < 100_000);
    assert_still_sound(&proxy, &sentinel, &[]).await;
}

#[tokio::test]
async fn a_client_going_away_while_the_upstream_thinks_releases_the_key_after_the_grace() {
    let sentinel = Sentinel::start().await;
    let (gone_tx, mut gone_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let upstream = MockUpstream::start(move |_| {
        let gone = gone_tx.clone();
        async move {
            // Never answers; reports when the proxy drops the request.
            struct Dropped(tokio::sync::mpsc::UnboundedSender<()>);
            impl Drop for Dropped {
                fn drop(&mut self) {
                    let _ = self.0.send(());
                }
            }
            let _dropped = Dropped(gone);
            std::future::pending::<http::Response<MockBody>>().await
        }
    })
    .await;
    // The provider goes on working on an abandoned request: the proxy keeps it (and its
    // key) for the grace, then cancels it (see `tests/operator.rs` for an answer
    // within the grace).
    let mut proxy = config(&upstream.url(""))
        .arg("--abandoned-grace", "0.5")
        .start()
        .await;

    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"POST /think HTTP/1.1\r\nhost: a\r\ncontent-length: 2\r\n\r\n{}")
        .await
        .unwrap();
    upstream.wait_for_requests(1).await;
    assert_eq!(keys(&proxy).await[0]["in_flight"], 1);
    drop(stream);
    proxy.wait_for_log("Client went away").await;
    assert_eq!(keys(&proxy).await[0]["in_flight"], 1, "held for the grace");
    // After the grace the proxy cancels its upstream request, which ends the upstream's
    // handler.
    within("the upstream request to be dropped", gone_rx.recv())
        .await
        .unwrap();
    proxy.wait_for_log("did not answer within 500ms").await;
    assert_still_sound(&proxy, &sentinel, &[]).await;
}
