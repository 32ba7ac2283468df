//! What sharing keys' state through Redis costs one request, side by side with the
//! in-memory pool: one request at a time through `KeyRotation` (poll_ready, call, the
//! response and its body to the end) over an inner service that answers at once, against
//! a `redis-server` on loopback that this bench starts (persistence off) and stops.
//!
//! - `memory`: the pool alone, 3 keys capped at 4 (the baseline);
//! - `redis, no cap`: shared rests and disables only: nothing on the request path;
//! - `redis, cap 4`: each request admitted by the store (one round trip), its release
//!   written in the background.
//!
//! Prints p50, p99 and the mean per request, and requests per second, as a Markdown table
//! (BENCHMARKS.md); then the requests per second of 48 callers through one replica and
//! through three (pools in this process, each with its own Redis connection). Needs `redis-server` (Debian: `apt-get install redis-server`).
//!
//! ```sh
//! cargo bench --bench shared
//! ```

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use test_support::RedisServer;
use tokio::time::Instant;
use tower::{Service, ServiceExt};
use tower_key_rotation::shared::redis::{RedisBackend, RedisOptions};
use tower_key_rotation::{KeyPool, KeyPoolBuilder, KeyRotation, KeySet};

const WARM_UP: usize = 2_000;
const MEASURED: usize = 20_000;

type Answer = std::future::Ready<Result<Response<Full<Bytes>>, Infallible>>;

fn answer(_request: Request<Empty<Bytes>>) -> Answer {
    std::future::ready(Ok(Response::new(Full::new(Bytes::from_static(b"{}")))))
}

fn builder() -> KeyPoolBuilder {
    KeyPool::builder(KeySet::parse("bk-one,bk-two,bk-three").unwrap())
}

/// Per-request times of `MEASURED` requests, one at a time, after `WARM_UP`.
async fn measure(pool: KeyPool) -> Vec<Duration> {
    let inner = tower::service_fn(answer as fn(Request<Empty<Bytes>>) -> Answer);
    let mut service = KeyRotation::new(inner, pool);
    let mut times = Vec::with_capacity(MEASURED);
    for i in 0..WARM_UP + MEASURED {
        let request = Request::get("http://provider.test/v1/models")
            .body(Empty::new())
            .unwrap();
        let started = Instant::now();
        let response = service.ready().await.unwrap().call(request).await.unwrap();
        response.into_body().collect().await.unwrap();
        if i >= WARM_UP {
            times.push(started.elapsed());
        }
    }
    times
}

/// Requests per second of `CONCURRENT` callers spread over `pools`, `TOTAL` requests.
async fn throughput(pools: Vec<KeyPool>) -> f64 {
    const CONCURRENT: usize = 48;
    const TOTAL: usize = 24_000;
    let started = Instant::now();
    let callers: Vec<_> = (0..CONCURRENT)
        .map(|i| {
            let pool = pools[i % pools.len()].clone();
            tokio::spawn(async move {
                let inner = tower::service_fn(answer as fn(Request<Empty<Bytes>>) -> Answer);
                let mut service = KeyRotation::new(inner, pool);
                for _ in 0..TOTAL / CONCURRENT {
                    let request = Request::get("http://provider.test/v1/models")
                        .body(Empty::new())
                        .unwrap();
                    let response = service.ready().await.unwrap().call(request).await.unwrap();
                    response.into_body().collect().await.unwrap();
                }
            })
        })
        .collect();
    for caller in callers {
        caller.await.unwrap();
    }
    TOTAL as f64 / started.elapsed().as_secs_f64()
}

fn row(name: &str, mut times: Vec<Duration>) {
    times.sort_unstable();
    let at = |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)];
    let total: Duration = times.iter().sum();
    let mean = total / times.len() as u32;
    println!(
        "| {name} | {:.1} µs | {:.1} µs | {:.1} µs | {:.0} |",
        at(0.5).as_secs_f64() * 1e6,
        at(0.99).as_secs_f64() * 1e6,
        mean.as_secs_f64() * 1e6,
        1.0 / mean.as_secs_f64()
    );
}

async fn shared(server: &RedisServer, namespace: &str) -> RedisBackend {
    let mut options = RedisOptions::default();
    options.namespace = namespace.to_owned();
    let backend = RedisBackend::new(&server.url(), b"bench", options).unwrap();
    assert!(backend.connect().await, "redis-server answers");
    backend
}

fn main() {
    // `cargo test --benches` runs benches as tests: nothing to time then.
    if std::env::args().any(|arg| arg == "--test") {
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let server = RedisServer::start().await;
        println!("| pool | p50 | p99 | mean | requests/s (one at a time) |");
        println!("| --- | --- | --- | --- | --- |");
        row(
            "memory, cap 4",
            measure(builder().max_in_flight_per_key(4).build()).await,
        );
        let backend = shared(&server, "bench-no-cap").await;
        row(
            "redis, no cap (rests shared)",
            measure(builder().state_backend(backend).build()).await,
        );
        let backend = shared(&server, "bench-cap").await;
        row(
            "redis, cap 4 (admitted by the store)",
            measure(
                builder()
                    .max_in_flight_per_key(4)
                    .state_backend(backend)
                    .build(),
            )
            .await,
        );
        println!();
        println!("| replicas (pools, each with its own connection), cap 1000 per key | requests/s, 48 callers |");
        println!("| --- | --- |");
        for replicas in [1, 3] {
            let mut pools = Vec::new();
            for _ in 0..replicas {
                let backend = shared(&server, &format!("bench-throughput-{replicas}")).await;
                pools.push(
                    builder()
                        .max_in_flight_per_key(1000)
                        .state_backend(backend)
                        .build(),
                );
            }
            println!("| {replicas} | {:.0} |", throughput(pools).await);
        }
        // Redis is stopped by pid when `server` drops (kill_on_drop).
        drop(server);
        tokio::time::sleep(Duration::from_millis(10)).await;
    });
}
