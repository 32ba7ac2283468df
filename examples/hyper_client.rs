//! A hyper-util client whose requests carry API keys in rotation, against a local upstream
//! that behaves like a rate-limited provider (one request at a time per key, 429 with
//! `Retry-After` beyond that).
//!
//! Try it:
//!
//! ```sh
//! cargo run --example hyper_client
//! ```
//!
//! Each request logs `Using key i/3`; a refused key logs its cool-down and is skipped until
//! it ends, so every caller gets a 200.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tower::{ServiceBuilder, ServiceExt};
use tower_key_rotation::{BoxError, KeyPool, KeyRotationLayer, KeySet, Selection};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

const KEYS: &str = "demo-key-one,demo-key-two,demo-key-three";

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    // Our debug events (`Using key i/3`), everyone else's warnings.
    let filter = tracing_subscriber::filter::Targets::new()
        .with_target("tower_key_rotation", tracing::Level::DEBUG)
        .with_default(tracing::Level::WARN);
    tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_target(false))
        .with(filter)
        .init();
    let upstream = start_upstream().await?;

    let pool = KeyPool::builder(KeySet::parse(KEYS)?)
        .selection(Selection::LeastInFlight)
        .max_in_flight_per_key(1)
        .build();
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let service = ServiceBuilder::new()
        .layer(KeyRotationLayer::new(pool.clone()))
        .service(client);

    // Six requests at once: with one slot per key, three run and three wait for a slot.
    let tasks: Vec<_> = (1..=6)
        .map(|i| {
            let service = service.clone();
            let url = format!("http://{upstream}/v4/chat/completions?section={i}");
            tokio::spawn(async move {
                let request = Request::get(url).body(Empty::new())?;
                let response = service.oneshot(request).await?;
                let status = response.status();
                let body = response.into_body().collect().await?.to_bytes();
                Ok::<_, BoxError>(format!(
                    "section {i}: {status} {}",
                    String::from_utf8_lossy(&body)
                ))
            })
        })
        .collect();
    for task in tasks {
        println!("{}", task.await??);
    }
    for key in pool.snapshot() {
        println!("{key}");
    }
    Ok(())
}

/// A provider that allows one request in flight per key and answers 100 ms later.
async fn start_upstream() -> std::io::Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let busy: Arc<[AtomicUsize; 3]> = Arc::new(Default::default());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let busy = busy.clone();
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let busy = busy.clone();
                async move { Ok::<_, Infallible>(answer(&req, &busy).await) }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    Ok(addr)
}

async fn answer(
    req: &Request<hyper::body::Incoming>,
    busy: &[AtomicUsize; 3],
) -> Response<Full<Bytes>> {
    let credential = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let Some(key) = credential.and_then(|c| KEYS.split(',').position(|k| k == c)) else {
        return reply(StatusCode::UNAUTHORIZED, "{\"error\":\"invalid key\"}");
    };
    if busy[key].fetch_add(1, Ordering::SeqCst) > 0 {
        busy[key].fetch_sub(1, Ordering::SeqCst);
        let mut response = reply(StatusCode::TOO_MANY_REQUESTS, "{\"error\":\"concurrency\"}");
        response
            .headers_mut()
            .insert("retry-after", http::HeaderValue::from_static("1"));
        return response;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    busy[key].fetch_sub(1, Ordering::SeqCst);
    reply(
        StatusCode::OK,
        &format!("{{\"answered_by\":\"key {}\"}}", key + 1),
    )
}

fn reply(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_owned())));
    *response.status_mut() = status;
    response
}
