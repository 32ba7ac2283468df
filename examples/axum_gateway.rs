//! An axum route that calls an upstream provider through a key-rotated client: every
//! handler invocation shares one pool, so the keys' limits hold across requests and
//! connections of the gateway.
//!
//! Try it:
//!
//! ```sh
//! cargo run --example axum_gateway
//! ```
//!
//! It starts a local upstream, the gateway on 127.0.0.1, sends the gateway a few requests
//! and prints what came back and the per-key statistics.

use std::convert::Infallible;

use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tower::ServiceExt;
use tower_key_rotation::{BoxError, KeyPool, KeyRotation, KeyRotationLayer, KeySet};

type Upstream = KeyRotation<Client<HttpConnector, Full<Bytes>>>;

#[derive(Clone)]
struct Gateway {
    client: Upstream,
    upstream: String,
}

/// `POST /summarize`: forwards the prompt to the provider with the next key.
async fn summarize(State(gateway): State<Gateway>, prompt: String) -> Response {
    let request = Request::post(format!("{}/v4/chat/completions", gateway.upstream))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            serde_json::json!({ "messages": [{ "role": "user", "content": prompt }] }).to_string(),
        )))
        .expect("a valid request");
    // Clones share the pool; readiness waits here when every key is busy or cooling.
    match gateway.client.clone().oneshot(request).await {
        Ok(response) => {
            let status = response.status();
            match response.into_body().collect().await {
                Ok(body) => (status, body.to_bytes()).into_response(),
                Err(error) => bad_gateway(error.into()),
            }
        }
        Err(error) => bad_gateway(error),
    }
}

fn bad_gateway(error: BoxError) -> Response {
    let body = serde_json::json!({ "error": error.to_string() }).to_string();
    let json = [(http::header::CONTENT_TYPE, "application/json")];
    (StatusCode::BAD_GATEWAY, json, body).into_response()
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let upstream = start_upstream().await?;

    let pool = KeyPool::builder(KeySet::parse("demo-key-a,demo-key-b")?)
        .max_in_flight_per_key(2)
        .build();
    let client = Client::builder(TokioExecutor::new()).build_http();
    let gateway = Gateway {
        client: tower::Layer::layer(&KeyRotationLayer::new(pool.clone()), client),
        upstream: format!("http://{upstream}"),
    };
    let app = Router::new()
        .route("/summarize", post(summarize))
        .with_state(gateway);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    println!("gateway on http://{addr}, upstream on http://{upstream}");

    // Talk to the gateway as its users would.
    let caller = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    for topic in ["tower", "hyper", "tokio", "axum"] {
        let request = Request::post(format!("http://{addr}/summarize"))
            .body(Full::new(Bytes::from(format!("Summarize {topic}"))))?;
        let response = caller.request(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        println!("{topic}: {status} {}", String::from_utf8_lossy(&body));
    }
    for key in pool.snapshot() {
        println!("{key}");
    }
    Ok(())
}

/// A provider that answers which key it saw (by position, never the value).
async fn start_upstream() -> std::io::Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let service =
                hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                    let key = match req.headers().get("authorization").map(|v| v.as_bytes()) {
                        Some(b"Bearer demo-key-a") => "key 1",
                        Some(b"Bearer demo-key-b") => "key 2",
                        _ => "no valid key",
                    };
                    let body =
                        serde_json::json!({ "summary": "...", "answered_by": key }).to_string();
                    Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(body))))
                });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    Ok(addr)
}
