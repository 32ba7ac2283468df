//! The forward proxy's request handling on any bytes a client may send.
//!
//! The proxy is an example, not a library, so its own modules (all but `main.rs`) are
//! compiled into this target with `#[path]` (the real files, not copies; a module added to
//! the example must be added here too): each input is served over an in-memory connection
//! by `serve::connection`, the function each worker runs per client connection (the
//! proxy's own HTTP/1 server, `h1::server`, or hyper's HTTP/2 server when the input starts
//! with the preface), calling `handler::handle` exactly as `main.rs` wires it, with its
//! real upstream client talking to a mock upstream on 127.0.0.1. Coverage reaches the
//! HTTP/1 server's head parser and body framing (`h1`), and the handler's checks (CONNECT,
//! absolute-form authorities, dot segments, hop-by-hop headers, admin routes, the access
//! token).
//!
//! In the input, `UPSTREAM` is replaced by the mock upstream's `host:port` and `OTHER` by
//! the address of a second listener standing in for another host, so that the fuzzer can
//! aim absolute-form targets and `Host` headers at both. The proxy runs with its body limits
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
#![allow(dead_code, unreachable_pub, clippy::all)]

#[path = "../../examples/forward_proxy/src/admin.rs"]
mod admin;
#[path = "../../examples/forward_proxy/src/answer.rs"]
mod answer;
#[path = "../../examples/forward_proxy/src/attempts.rs"]
mod attempts;
#[path = "../../examples/forward_proxy/src/config.rs"]
mod config;
#[path = "../../examples/forward_proxy/src/connections.rs"]
mod connections;
#[path = "../../examples/forward_proxy/src/dotenv.rs"]
mod dotenv;
#[path = "../../examples/forward_proxy/src/h1/mod.rs"]
mod h1;
#[path = "../../examples/forward_proxy/src/handler.rs"]
mod handler;
#[path = "../../examples/forward_proxy/src/keys.rs"]
mod keys;
#[path = "../../examples/forward_proxy/src/metrics.rs"]
mod metrics;
#[path = "../../examples/forward_proxy/src/reload.rs"]
mod reload;
#[path = "../../examples/forward_proxy/src/serve.rs"]
mod serve;
#[path = "../../examples/forward_proxy/src/shared.rs"]
mod shared;
#[path = "../../examples/forward_proxy/src/tls.rs"]
mod tls;
#[path = "../../examples/forward_proxy/src/upstream.rs"]
mod upstream;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tower_key_rotation::KeyPool;

const KEYS: [&str; 2] = ["fuzz-key-Alpha-7f3a", "fuzz-key-Bravo-91c2"];
const TOKEN: &str = "fuzz-token";
const PREFIX: &str = "/v4";

struct World {
    runtime: tokio::runtime::Runtime,
    /// Without and with an access token (the input's first byte chooses).
    states: [Arc<handler::State>; 2],
    pools: [KeyPool; 2],
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
            let mut argv = vec![
                "forward_proxy",
                "--listen",
                "127.0.0.1:8080",
                "--upstream",
                &upstream_url,
                "--keys-env",
                "FUZZ_KEYS",
                "--max-wait",
                "0.2",
                "--connect-timeout",
                "1",
                "--request-timeout",
                "2",
                // Bodies up to 1 KiB are buffered for a retry, larger ones stream, and past
                // 32 KiB (declared or counted) they are refused with a 413.
                "--retry-body-limit",
                "1024",
                "--max-body-size",
                "32768",
                // Below the 5 s the in-flight check waits (the mock upstream answers at once).
                "--abandoned-grace",
                "1",
            ];
            if token {
                argv.extend(["--access-token-env", "FUZZ_TOKEN"]);
            }
            let args = config::Args::try_parse_from(argv).unwrap();
            let secrets = config::load_secrets(&args).unwrap();
            // As main.rs builds it.
            let pool = args.pool_builder(secrets.keys).build();
            let options = upstream::Options::from_args(&args, Vec::new());
            let upstream = runtime.block_on(async { upstream::build(&pool, options).unwrap() });
            // main.rs binds `--listen`; nothing listens here (inputs come over a duplex),
            // but absolute-form targets naming this address count as the proxy's own.
            let listen: SocketAddr = args.listen.to_string().parse().unwrap();
            // As main.rs builds it.
            let state = Arc::new(handler::State::new(
                &args,
                pool.clone(),
                upstream,
                secrets.access_token,
                listen,
            ));
            (state, pool)
        };
        let (open, open_pool) = build(false);
        let (guarded, guarded_pool) = build(true);
        World {
            runtime,
            states: [open, guarded],
            pools: [open_pool, guarded_pool],
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
    let state = world.states[which].clone();
    let input = replace(data, b"UPSTREAM", world.upstream.to_string().as_bytes());
    let input = replace(&input, b"OTHER", world.other.to_string().as_bytes());

    let answer = world.runtime.block_on(async move {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let config = h1::server::Config {
            header_read_timeout: Duration::from_secs(30),
            // The input ends with the client's write side closed: let the answers out first.
            half_close: true,
        };
        let (_stop, stopping) = tokio::sync::watch::channel(false);
        let (open, _ended) = tokio::sync::mpsc::channel(1);
        let connection = tokio::spawn(serve::connection(server, state, config, stopping, open));
        let exchange = async {
            let _ = client.write_all(&input).await;
            let _ = client.shutdown().await;
            let mut answer = Vec::new();
            let _ = client.read_to_end(&mut answer).await;
            let _ = connection.await;
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
    let pool = &world.pools[which];
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
