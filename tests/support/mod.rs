//! A real HTTP/1.1 upstream on 127.0.0.1 for the layer's tests, and a client through the
//! layer. The upstream identifies each request's key by position, counts requests in
//! flight per key (and the maximum seen), and answers with a per-test behaviour.

#![allow(dead_code, unreachable_pub)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tower::{Service, ServiceExt};
use tower_key_rotation::{BoxError, KeyPool, KeyRotation, KeyRotationLayer};

/// What the upstream saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    /// 1-based position of the key, or 0 if the credential matched no key.
    pub key: usize,
    /// Every value of the credential header, verbatim.
    pub credentials: Vec<String>,
}

type Handler = Arc<
    dyn Fn(usize, usize) -> Pin<Box<dyn Future<Output = Response<Full<Bytes>>> + Send>>
        + Send
        + Sync,
>;

/// A local upstream. `handler(key_position, request_number)` produces each answer.
pub struct Upstream {
    pub addr: SocketAddr,
    state: Arc<State>,
}

struct State {
    keys: Vec<String>,
    header: &'static str,
    seen: Mutex<Vec<Seen>>,
    in_flight: Vec<AtomicUsize>,
    max_in_flight: Vec<AtomicUsize>,
    handler: Handler,
}

impl Upstream {
    /// Starts an upstream that knows `keys` (as sent in `Authorization: Bearer <key>`).
    pub async fn start<F, Fut>(keys: &[&str], handler: F) -> Self
    where
        F: Fn(usize, usize) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
    {
        Self::start_with_header(keys, "authorization", handler).await
    }

    /// As [`Upstream::start`], reading the key from `header` (bare, or after `Bearer `).
    pub async fn start_with_header<F, Fut>(keys: &[&str], header: &'static str, handler: F) -> Self
    where
        F: Fn(usize, usize) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            keys: keys.iter().map(|k| k.to_string()).collect(),
            header,
            seen: Mutex::new(Vec::new()),
            in_flight: keys.iter().map(|_| AtomicUsize::new(0)).collect(),
            max_in_flight: keys.iter().map(|_| AtomicUsize::new(0)).collect(),
            handler: Arc::new(move |key, n| Box::pin(handler(key, n))),
        });
        let server_state = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let state = server_state.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(state.answer(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { addr, state }
    }

    /// The URL of `path` on this upstream.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Every request seen, in arrival order.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    /// Key positions of every request seen, in arrival order.
    pub fn keys_seen(&self) -> Vec<usize> {
        self.seen().iter().map(|s| s.key).collect()
    }

    /// The most requests ever in flight at once on each key.
    pub fn max_in_flight(&self) -> Vec<usize> {
        self.state
            .max_in_flight
            .iter()
            .map(|m| m.load(Ordering::SeqCst))
            .collect()
    }
}

impl State {
    async fn answer(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let credentials: Vec<String> = req
            .headers()
            .get_all(self.header)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect();
        let key = credentials
            .first()
            .map(|c| c.strip_prefix("Bearer ").unwrap_or(c))
            .and_then(|c| self.keys.iter().position(|k| k == c))
            .map_or(0, |i| i + 1);
        let number = {
            let mut seen = self.seen.lock().unwrap();
            seen.push(Seen { key, credentials });
            seen.len()
        };
        if key == 0 {
            return status(StatusCode::UNAUTHORIZED);
        }
        let now = self.in_flight[key - 1].fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight[key - 1].fetch_max(now, Ordering::SeqCst);
        let response = (self.handler)(key, number).await;
        self.in_flight[key - 1].fetch_sub(1, Ordering::SeqCst);
        response
    }
}

/// A response with `status` and a short body.
pub fn status(status: StatusCode) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(b"{}")));
    *response.status_mut() = status;
    response
}

/// A 429 with the given headers.
pub fn too_many(headers: &[(&'static str, &str)]) -> Response<Full<Bytes>> {
    let mut response = status(StatusCode::TOO_MANY_REQUESTS);
    for (name, value) in headers {
        response.headers_mut().insert(*name, value.parse().unwrap());
    }
    response
}

/// A plain HTTP client with no layer.
pub fn http_client() -> Client<HttpConnector, Empty<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// The client behind the layer.
pub type Rotated = KeyRotation<Client<HttpConnector, Empty<Bytes>>>;

/// A hyper-util client behind `KeyRotationLayer` over `pool`.
pub fn rotated(pool: &KeyPool) -> Rotated {
    tower::Layer::layer(&KeyRotationLayer::new(pool.clone()), http_client())
}

/// Sends a GET through `service` and reads the whole body; returns the status.
pub async fn get(service: &mut Rotated, url: &str) -> Result<StatusCode, BoxError> {
    let request = Request::get(url).body(Empty::new())?;
    send(service, request).await
}

/// Sends `request` through `service` and reads the whole body; returns the status.
pub async fn send(
    service: &mut Rotated,
    request: Request<Empty<Bytes>>,
) -> Result<StatusCode, BoxError> {
    let response = service.ready().await?.call(request).await?;
    let status = response.status();
    response.into_body().collect().await?;
    Ok(status)
}
