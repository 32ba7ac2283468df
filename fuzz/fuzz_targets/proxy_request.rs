//! The forward proxy's request handling on any bytes a client may send.
//!
//! Each input is served over an in-memory connection as a worker serves a client
//! connection (`forward_proxy::fuzzing::serve_connection`: the proxy's own HTTP/1 server,
//! or hyper's HTTP/2 server when the input starts with the preface), by a `Proxy` bound as
//! the binary binds it, with its real upstream client talking to a mock upstream on
//! 127.0.0.1. Coverage reaches the HTTP/1 server's head parser and body framing, and the
//! handler's checks (CONNECT, absolute-form authorities, dot segments, hop-by-hop headers,
//! admin routes, the access token).
//!
//! In the input, `UPSTREAM` is replaced by the mock upstream's `host:port`, `OTHER` by
//! the address of a second listener standing in for another host, and `127.0.0.1:8080` by
//! the proxy's own address, so that the fuzzer can aim absolute-form targets and `Host`
//! headers at all three. The proxy runs with its body limits
//! low (bodies up to 1 KiB buffered for a retry, larger ones streamed, past 32 KiB a 413)
//! and `--abandoned-grace 1`. After each input:
//! - the other host has accepted no connection;
//! - every request the upstream saw lies under the configured prefix, has no dot segment,
//!   carries exactly one credential, a configured key (an HTTP/2 input's connection ends
//!   with the input, so its requests reach the upstream as abandoned ones, sometimes after
//!   the checks: such a request is checked with the next input);
//! - nothing the client got back contains a key;
//! - every key's in-flight count is back to 0.
#![no_main]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use forward_proxy::fuzzing::{serve_connection, server_config};
use forward_proxy::{KeysFrom, Proxy, ProxyConfig};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const KEYS: [&str; 2] = ["fuzz-key-Alpha-7f3a", "fuzz-key-Bravo-91c2"];
const TOKEN: &str = "fuzz-token";
const PREFIX: &str = "/v4";

struct World {
    runtime: tokio::runtime::Runtime,
    /// Without and with an access token (the input's first byte chooses).
    proxies: [Proxy; 2],
    upstream: SocketAddr,
    other: SocketAddr,
    seen: Arc<Mutex<Vec<(String, Vec<Vec<u8>>)>>>,
    other_connections: Arc<AtomicUsize>,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let other_connections = Arc::new(AtomicUsize::new(0));
        let (upstream, other) = runtime.block_on(async {
            let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let other = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addrs = (upstream.local_addr().unwrap(), other.local_addr().unwrap());
            tokio::spawn(serve_upstream(upstream, seen.clone()));
            let count = other_connections.clone();
            tokio::spawn(async move {
                while let Ok((_stream, _)) = other.accept().await {
                    count.fetch_add(1, Ordering::SeqCst);
                }
            });
            addrs
        });
        // SAFETY: set before any other thread of this process reads the environment.
        unsafe {
            std::env::set_var("FUZZ_KEYS", KEYS.join(","));
            std::env::set_var("FUZZ_TOKEN", TOKEN);
        }
        let upstream_url = format!("http://{upstream}{PREFIX}");
        let build = |token: bool| {
            let mut config = ProxyConfig::new(upstream_url.parse().unwrap());
            // Nothing is accepted on it (inputs come over a duplex); absolute-form targets
            // naming the address it gets (`127.0.0.1:8080` in an input) are the proxy's own.
            config.listen = "127.0.0.1:0".parse().unwrap();
            config.workers = NonZeroUsize::new(1);
            config.keys = KeysFrom::Env("FUZZ_KEYS".to_owned());
            config.max_wait = Duration::from_millis(200);
            config.connect_timeout = Duration::from_secs(1);
            config.request_timeout = Duration::from_secs(2);
            // Bodies up to 1 KiB are buffered for a retry, larger ones stream, and past
            // 32 KiB (declared or counted) they are refused with a 413.
            config.retry_body_limit = 1024;
            config.max_body_size = 32768;
            // Below the 5 s the in-flight check waits (the mock upstream answers at once).
            config.abandoned_grace = Duration::from_secs(1);
            if token {
                config.access_token_env = Some("FUZZ_TOKEN".to_owned());
            }
            runtime.block_on(Proxy::bind(config)).unwrap()
        };
        let proxies = [build(false), build(true)];
        World {
            runtime,
            proxies,
            upstream,
            other,
            seen,
            other_connections,
        }
    })
}

/// Records each request's target and credentials (any key outside `Authorization` counts
/// as an extra credential) and answers 200 echoing the target. Never 429 or 401: those
/// would rest or disable keys and make later inputs depend on earlier ones.
async fn serve_upstream(listener: TcpListener, seen: Arc<Mutex<Vec<(String, Vec<Vec<u8>>)>>>) {
    while let Ok((stream, _)) = listener.accept().await {
        let seen = seen.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let seen = seen.clone();
                async move {
                    let target = req
                        .uri()
                        .path_and_query()
                        .map_or("/".into(), |pq| pq.to_string());
                    let mut credentials: Vec<Vec<u8>> = req
                        .headers()
                        .get_all("authorization")
                        .iter()
                        .map(|v| v.as_bytes().to_vec())
                        .collect();
                    for (name, value) in req.headers() {
                        if name != "authorization" {
                            let value = value.as_bytes();
                            if KEYS
                                .iter()
                                .any(|k| value.windows(k.len()).any(|w| w == k.as_bytes()))
                            {
                                credentials.push(b"elsewhere".to_vec());
                            }
                        }
                    }
                    let _ = req.into_body().collect().await;
                    seen.lock().unwrap().push((target.clone(), credentials));
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(target))))
                }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn replace(data: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    let mut i = 0;
    while i < data.len() {
        if data[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.push(data[i]);
            i += 1;
        }
    }
    out
}

fn has_dot_segment(path: &str) -> bool {
    path.split('/').any(|segment| {
        let decoded = segment.to_ascii_lowercase().replace("%2e", ".");
        decoded == "." || decoded == ".."
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&choice, data)) = data.split_first() else {
        return;
    };
    if data.len() > 64 * 1024 {
        return;
    }
    let world = world();
    let which = usize::from(choice & 1);
    let proxy = &world.proxies[which];
    let input = replace(data, b"UPSTREAM", world.upstream.to_string().as_bytes());
    let input = replace(&input, b"OTHER", world.other.to_string().as_bytes());
    // The proxy's own address: the port it was given.
    let input = replace(
        &input,
        b"127.0.0.1:8080",
        proxy.local_addr().to_string().as_bytes(),
    );

    let answer = world.runtime.block_on(async {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        // The input ends with the client's write side closed: let the answers out first.
        let config = server_config(Duration::from_secs(30), true);
        let connection = serve_connection(proxy, server, config);
        let exchange = async {
            let client = async {
                let _ = client.write_all(&input).await;
                let _ = client.shutdown().await;
                let mut answer = Vec::new();
                let _ = client.read_to_end(&mut answer).await;
                answer
            };
            let (answer, ()) = tokio::join!(client, connection);
            answer
        };
        tokio::time::timeout(Duration::from_secs(20), exchange)
            .await
            .expect("the proxy neither answered nor closed within 20 s")
    });

    // Bodies were read to the end or dropped with the connection: nothing stays in flight.
    // (HTTP/2 streams run in tasks of their own, which end just after the connection, and a
    // request whose client went away stays at the upstream until it answers, within
    // --abandoned-grace: a bounded wait for them. Done first, so that the upstream has
    // recorded every request of this input before the checks below.)
    let pool = proxy.pool();
    world.runtime.block_on(async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while pool.snapshot().iter().any(|s| s.in_flight != 0) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "in flight after the connection closed: {:?}",
                pool.snapshot()
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    });
    assert_eq!(
        world.other_connections.load(Ordering::SeqCst),
        0,
        "another host was contacted"
    );
    // Every request the upstream recorded since the last input's checks: this input's, and
    // now and then one an earlier input's client left before it was sent (its task ran on
    // after the in-flight check above), checked here rather than never.
    let seen = std::mem::take(&mut *world.seen.lock().unwrap());
    for (target, credentials) in &seen {
        let path = target.split('?').next().unwrap_or_default();
        assert!(
            path == PREFIX || path.starts_with("/v4/"),
            "the upstream saw a path outside the prefix: {target:?}"
        );
        assert!(
            !has_dot_segment(path),
            "the upstream saw a dot segment: {target:?}"
        );
        assert_eq!(
            credentials.len(),
            1,
            "not exactly one credential: {credentials:?}"
        );
        let bearer = credentials[0].strip_prefix(b"Bearer ").unwrap_or_default();
        assert!(
            KEYS.iter().any(|k| k.as_bytes() == bearer),
            "an unexpected credential"
        );
    }
    for key in KEYS {
        assert!(
            !answer.windows(key.len()).any(|w| w == key.as_bytes()),
            "a key reached the client"
        );
    }
});
