//! The upstream connections of one worker: hyper's connection-level client
//! (`hyper::client::conn`) over the rustls connector, with a small pool of its own in place
//! of hyper-util's legacy `Client`.
//!
//! Why: the proxy has one upstream, and each worker its own connections (see `serve`), so
//! the pool needs no key, no hash map and no lock shared between threads. It never opens a
//! connection "in case" (hyper-util's client races a new connection against a pooled one
//! coming back, and pools the loser: at 1,000 client connections that made up to 2,000
//! upstream ones), keeps at most [`MAX_IDLE`] idle HTTP/1 connections, and hands an HTTP/1
//! connection back when its response body has ended. An HTTPS upstream that offers HTTP/2
//! (ALPN) gets one shared multiplexed connection per worker.
//!
//! A request sent on a pooled connection that turns out to be closed (the upstream's
//! keep-alive ended) is sent again on another one, as hyper-util's client does: hyper
//! returns the request untouched when not a byte of it was written.

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::{Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::Instant;
use tower::{BoxError, Service, ServiceExt};

use crate::upstream::RequestBody;

/// Idle HTTP/1 connections kept per worker (nginx's `keepalive`); more are closed when
/// their response ends.
const MAX_IDLE: usize = 256;
/// An idle connection older than this is not used again (closed when found).
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// One worker's connections to the upstream: a `Service` from request to response head.
#[derive(Clone)]
pub(crate) struct Connections {
    shared: Arc<Shared>,
}

struct Shared {
    connector: HttpsConnector<HttpConnector>,
    /// `Host` for HTTP/1 requests that carry none: the upstream's host, with its port
    /// unless it is the scheme's default (hyper-util's rule).
    host: Option<HeaderValue>,
    idle: Mutex<Idle>,
}

#[derive(Default)]
struct Idle {
    /// Most recently used last (taken first: its socket and buffers are warm).
    http1: Vec<(http1::SendRequest<RequestBody>, Instant)>,
    http2: Option<http2::SendRequest<RequestBody>>,
}

enum Sender {
    Http1(http1::SendRequest<RequestBody>),
    Http2(http2::SendRequest<RequestBody>),
}

impl Connections {
    pub(crate) fn new(connector: HttpsConnector<HttpConnector>, upstream: &Uri) -> Self {
        let host = upstream.host().and_then(|host| {
            let default_port = if upstream.scheme_str() == Some("https") {
                443
            } else {
                80
            };
            match upstream.port_u16() {
                Some(port) if port != default_port => {
                    HeaderValue::from_str(&format!("{host}:{port}")).ok()
                }
                _ => HeaderValue::from_str(host).ok(),
            }
        });
        Self {
            shared: Arc::new(Shared {
                connector,
                host,
                idle: Mutex::default(),
            }),
        }
    }

    async fn send(self, mut req: Request<RequestBody>) -> Result<Response<Body>, BoxError> {
        loop {
            let (sender, pooled) = match self.shared.checkout() {
                Some(sender) => (sender, true),
                None => (self.connect(req.uri()).await?, false),
            };
            let failed = match sender {
                Sender::Http2(mut sender) => match sender.try_send_request(req).await {
                    Ok(response) => return Ok(response.map(|body| Body::new(body, None))),
                    Err(failed) => failed,
                },
                Sender::Http1(mut sender) => {
                    if sender.ready().await.is_err() && pooled {
                        // Closed while idle: the request is still ours.
                        continue;
                    }
                    to_origin_form(&mut req, self.shared.host.as_ref());
                    match sender.try_send_request(req).await {
                        Ok(response) => {
                            let back = Some((sender, self.shared.clone()));
                            return Ok(response.map(|body| Body::new(body, back)));
                        }
                        Err(failed) => failed,
                    }
                }
            };
            let mut failed = failed;
            match failed.take_message() {
                // Not a byte was written on a pooled connection: another one may do.
                Some(unsent) if pooled => req = unsent,
                _ => return Err(failed.into_error().into()),
            }
        }
    }

    async fn connect(&self, uri: &Uri) -> Result<Sender, BoxError> {
        let io = self
            .shared
            .connector
            .clone()
            .oneshot(uri.clone())
            .await
            .map_err(ConnectError::new)?;
        if io.connected().is_negotiated_h2() {
            let (sender, connection) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(io)
                .await
                .map_err(ConnectError::new)?;
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!("upstream connection ended with an error: {e}");
                }
            });
            self.shared.lock().http2 = Some(sender.clone());
            Ok(Sender::Http2(sender))
        } else {
            let (sender, connection) = http1::handshake(io).await.map_err(ConnectError::new)?;
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!("upstream connection ended with an error: {e}");
                }
            });
            Ok(Sender::Http1(sender))
        }
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Idle> {
        // Nothing panics while holding it; a poisoned pool still holds valid connections.
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A connection that may take a request now (an HTTP/1 one may still be finishing its
    /// last response: `ready` waits for that).
    fn checkout(&self) -> Option<Sender> {
        let mut idle = self.lock();
        if let Some(sender) = &idle.http2 {
            if !sender.is_closed() {
                return Some(Sender::Http2(sender.clone()));
            }
            idle.http2 = None;
        }
        let now = Instant::now();
        while let Some((sender, since)) = idle.http1.pop() {
            if !sender.is_closed() && now.duration_since(since) < IDLE_TIMEOUT {
                return Some(Sender::Http1(sender));
            }
        }
        None
    }

    fn checkin(&self, sender: http1::SendRequest<RequestBody>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.lock();
        if idle.http1.len() < MAX_IDLE {
            idle.http1.push((sender, Instant::now()));
        }
    }
}

/// HTTP/1 wants the path in the request line and the authority in `Host`.
fn to_origin_form(req: &mut Request<RequestBody>, host: Option<&HeaderValue>) {
    if let Some(host) = host {
        req.headers_mut()
            .entry(header::HOST)
            .or_insert_with(|| host.clone());
    }
    if req.uri().scheme().is_some() {
        let path = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        *req.uri_mut() = Uri::from(path);
    }
}

impl Service<Request<RequestBody>> for Connections {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<RequestBody>) -> Self::Future {
        Box::pin(self.clone().send(req))
    }
}

/// The connection could not be made (refused, DNS, TLS handshake): nothing was sent.
#[derive(Debug)]
pub(crate) struct ConnectError(BoxError);

impl ConnectError {
    fn new(error: impl Into<BoxError>) -> Self {
        Self(error.into())
    }
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("cannot connect to the upstream")
    }
}

impl std::error::Error for ConnectError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

/// An upstream response body; an HTTP/1 connection goes back to the pool at its end.
pub(crate) struct Body {
    inner: Incoming,
    back: Option<(http1::SendRequest<RequestBody>, Arc<Shared>)>,
}

impl Body {
    fn new(inner: Incoming, back: Option<(http1::SendRequest<RequestBody>, Arc<Shared>)>) -> Self {
        Self { inner, back }
    }

    fn give_back(&mut self) {
        if let Some((sender, shared)) = self.back.take() {
            shared.checkin(sender);
        }
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, hyper::Error>>> {
        let frame = std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &frame {
            None => self.give_back(),
            Some(Ok(_)) if self.inner.is_end_stream() => self.give_back(),
            // An error leaves the connection unusable: hyper closes it.
            Some(Err(_)) => self.back = None,
            Some(Ok(_)) => {}
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Body {
    fn drop(&mut self) {
        // An empty body is often never polled; one dropped mid-way closes its connection.
        if http_body::Body::is_end_stream(&self.inner) {
            self.give_back();
        }
    }
}
