//! The upstream connections of one worker: the proxy's own HTTP/1.1 client (`h1::client`)
//! over the rustls connector, hyper's connection-level client for HTTP/2 (`h2::client`),
//! and a small pool of its own in place of hyper-util's legacy `Client`.
//!
//! Why: the proxy has one upstream, and each worker its own connections (see `serve`), so
//! the pool needs no key, no hash map and no lock shared between threads. It never opens a
//! connection "in case" (hyper-util's client races a new connection against a pooled one
//! coming back, and pools the loser: at 1,000 client connections that made up to 2,000
//! upstream ones), keeps at most [`MAX_IDLE`] idle HTTP/1 connections, and takes an HTTP/1
//! connection back when its response body has ended. An HTTP/1 exchange runs in the task
//! that sends the request (no connection task, no channel, no second wake-up). An HTTPS upstream
//! that offers HTTP/2 (ALPN) gets one shared multiplexed connection per worker, on hyper.
//!
//! A pooled HTTP/1 connection the upstream has closed must not fail a request. It is
//! checked when taken from the pool (a non-blocking read: end of stream, or bytes no
//! request asked for, and it is dropped). When the upstream's close is still on its way,
//! the request is sent again, once, on a fresh connection only when the very first write
//! system call on the pooled one failed, so that not a byte of it left
//! (`h1::client::Error::is_unsent`; a plain socket only: a TLS write may have sent some
//! records before it fails). A request the upstream may have seen, even in part, is never
//! sent twice; a pooled connection that takes the request and then closes without an
//! answer gives an error (as hyper-util's client does). A fresh connection that fails is
//! not retried here (refusals are the retry layer's).
//!
//! Idle connections are also looked over every few seconds by a small task per worker
//! ([`SWEEP_EVERY`]): one the upstream closed is closed on our side too, rather than
//! sitting in `CLOSE_WAIT` until a request takes it (or forever, once traffic stops), as
//! is one idle past [`IDLE_TIMEOUT`].

use std::collections::VecDeque;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::HeaderValue;
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::{Connection as _, HttpConnector};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tower::{BoxError, Service, ServiceExt};

use crate::config::UpstreamUrl;
use crate::h1::client::{Connection, RequestWriter, ResponseBody};
use crate::h2::client::Multiplexed;

/// Idle HTTP/1 connections kept per worker (nginx's `keepalive`); more are closed when
/// their response ends.
const MAX_IDLE: usize = 256;
/// An idle connection older than this is not used again (closed when found).
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// How often a worker looks over its idle connections and closes those the upstream has
/// closed (or that are too old): else a closed one would sit in `CLOSE_WAIT` until the
/// next request took it, or forever once the traffic stops.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// One worker's connections to the upstream: a `Service` from request to response head,
/// for any request body `B`.
///
/// It reaches one upstream only, so a request's URI is its path and query *below the
/// upstream URL's path* (origin-form, `/chat/completions`): the scheme, host and path
/// prefix are the upstream's, put in front here (for HTTP/1 as the request line is
/// written, without building a URI per request).
pub(crate) struct Connections<B> {
    shared: Arc<Shared<B>>,
}

impl<B> Clone for Connections<B> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

struct Shared<B> {
    connector: HttpsConnector<HttpConnector>,
    /// Where to connect, and the base of the HTTP/2 requests' URIs.
    upstream: UpstreamUrl,
    /// The upstream URL's scheme and authority, for the connector.
    origin: Uri,
    /// `Host` for HTTP/1 requests (in place of the client's): the upstream's host, with its
    /// port unless it is the scheme's default (hyper-util's rule).
    host: Option<HeaderValue>,
    http1: Arc<Idle>,
    http2: Multiplexed<B>,
}

/// The idle HTTP/1 connections, most recently used last (taken first: its socket and
/// buffers are warm), the oldest first (closed first when too old).
#[derive(Default)]
struct Idle {
    connections: Mutex<VecDeque<(Connection<Io>, Instant)>>,
    /// The sweeping task (see [`SWEEP_EVERY`]) is running: started by the first checkin,
    /// on the worker's runtime, whose I/O driver the connections are registered with.
    sweeping: AtomicBool,
}

/// A new connection, as ALPN settled it.
enum Fresh<B> {
    Http1(Connection<Io>),
    Http2(http2::SendRequest<B>),
}

impl<B> Connections<B>
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    pub(crate) fn new(connector: HttpsConnector<HttpConnector>, upstream: &UpstreamUrl) -> Self {
        let origin = upstream.join("/").expect("a validated upstream URL");
        let host = origin.host().and_then(|host| {
            let default_port = if origin.scheme_str() == Some("https") {
                443
            } else {
                80
            };
            match origin.port_u16() {
                Some(port) if port != default_port => {
                    HeaderValue::from_str(&format!("{host}:{port}")).ok()
                }
                _ => HeaderValue::from_str(host).ok(),
            }
        });
        Self {
            shared: Arc::new(Shared {
                connector,
                upstream: upstream.clone(),
                origin,
                host,
                http1: Arc::default(),
                http2: Multiplexed::default(),
            }),
        }
    }

    /// Sends `req` on an HTTP/1 connection (one from the pool, else a new one, which may
    /// turn out to be HTTP/2).
    async fn send_http1(self, req: Request<B>) -> Result<Response<Body>, BoxError> {
        let (mut conn, mut reused) = match self.shared.http1.checkout() {
            Some(conn) => (conn, true),
            // Boxed: the rare connect would otherwise make every request's future larger
            // (moved as a whole into its box).
            None => match Box::pin(self.connect()).await? {
                Fresh::Http1(conn) => (conn, false),
                Fresh::Http2(sender) => {
                    return Box::pin(self.send_http2(sender, req, false)).await;
                }
            },
        };
        let (parts, body) = req.into_parts();
        let mut body = pin!(body);
        let mut writer = RequestWriter::new(
            &parts,
            &self.shared.upstream.prefix,
            self.shared.host.as_ref(),
            &*body,
        );
        let head = loop {
            match writer.write(&mut conn, body.as_mut()).await {
                Ok(()) => break conn.read_head(&parts.method).await?,
                // Closed while idle, and not a byte of the request left: another
                // connection may take it.
                Err(e) if reused && e.is_unsent() => {
                    tracing::debug!("a pooled upstream connection was closed: {e}");
                    match Box::pin(self.connect()).await? {
                        Fresh::Http1(fresh) => {
                            conn = fresh;
                            reused = false;
                        }
                        // The upstream switched to HTTP/2 meanwhile; the body has been
                        // taken as HTTP/1 bytes.
                        Fresh::Http2(_) => return Err(e.into()),
                    }
                }
                // The upstream answered before taking the whole request (a refusal of its
                // body, say) and closed: its answer is already here, and is the one to
                // forward, not the failed write. (Read from what arrived before the
                // close; bounded, as every read here, by the request timeout.)
                Err(e) if e.is_write() => match conn.read_head(&parts.method).await {
                    Ok(mut head) => {
                        tracing::debug!("the upstream answered before the whole request: {e}");
                        // The request was cut: nothing more can go on this connection.
                        head.keep_alive = false;
                        break head;
                    }
                    Err(_) => return Err(e.into()),
                },
                Err(e) => return Err(e.into()),
            }
        };
        let mut body = ResponseBody::new(conn, &head);
        if let Some(conn) = body.take_reusable() {
            // Empty, or whole already: the connection is free before the body is read.
            self.shared.http1.checkin(conn);
        }
        let body = match body.into_whole() {
            Ok(whole) => Body(Inner::Whole(whole)),
            Err(body) => Body(Inner::Http1(Box::new((body, self.shared.http1.clone())))),
        };
        Ok(head.response.map(|()| body))
    }

    async fn send_http2(
        self,
        mut sender: http2::SendRequest<B>,
        mut req: Request<B>,
        mut pooled: bool,
    ) -> Result<Response<Body>, BoxError> {
        // hyper's HTTP/2 client takes `:scheme`, `:authority` and `:path` from the URI; the
        // client's `Host` names this proxy.
        let path_and_query = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
        *req.uri_mut() = self.shared.upstream.join(path_and_query)?;
        req.headers_mut().remove(http::header::HOST);
        loop {
            let failed = match sender.try_send_request(req).await {
                Ok(response) => return Ok(response.map(|body| Body(Inner::Http2(body)))),
                Err(failed) => failed,
            };
            let mut failed = failed;
            match failed.take_message() {
                // Not a byte was written on a pooled connection: another one may do.
                Some(unsent) if pooled => {
                    req = unsent;
                    sender = match self.connect().await? {
                        Fresh::Http2(sender) => sender,
                        Fresh::Http1(_) => return Err(failed.into_error().into()),
                    };
                    pooled = false;
                }
                _ => return Err(failed.into_error().into()),
            }
        }
    }

    async fn connect(&self) -> Result<Fresh<B>, BoxError> {
        let io = self
            .shared
            .connector
            .clone()
            .oneshot(self.shared.origin.clone())
            .await
            .map_err(ConnectError::new)?;
        if io.connected().is_negotiated_h2() {
            let sender = self
                .shared
                .http2
                .handshake(io)
                .await
                .map_err(ConnectError::new)?;
            return Ok(Fresh::Http2(sender));
        }
        Ok(Fresh::Http1(match io {
            MaybeHttpsStream::Http(tcp) => Connection::new(Io::Plain(tcp.into_inner()), true),
            MaybeHttpsStream::Https(tls) => {
                Connection::new(Io::Tls(Box::new(tls.into_inner())), false)
            }
        }))
    }
}

impl Idle {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(Connection<Io>, Instant)>> {
        // Nothing panics while holding it; a poisoned pool still holds valid connections.
        self.connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The most recently used idle connection that is still open and quiet.
    fn checkout(&self) -> Option<Connection<Io>> {
        let now = Instant::now();
        loop {
            let (mut conn, since) = self.lock().pop_back()?;
            if still_usable(&mut conn, since, now) {
                return Some(conn);
            }
            // Closed by the upstream, or too old: dropped (closed) here.
        }
    }

    fn checkin(self: &Arc<Self>, conn: Connection<Io>) {
        if !self.sweeping.load(Ordering::Relaxed) && !self.sweeping.swap(true, Ordering::Relaxed) {
            tokio::spawn(sweep(Arc::downgrade(self)));
        }
        let now = Instant::now();
        let mut idle = self.lock();
        // Connections idle too long are closed here rather than when a quiet spell ends:
        // nothing else watches an idle connection (it has no task).
        while idle
            .front()
            .is_some_and(|(_, since)| now.duration_since(*since) >= IDLE_TIMEOUT)
        {
            idle.pop_front();
        }
        if idle.len() < MAX_IDLE {
            idle.push_back((conn, now));
        }
    }
}

impl Idle {
    /// Closes the idle connections the upstream has closed (or that are too old).
    fn sweep(&self) {
        let now = Instant::now();
        self.lock()
            .retain_mut(|(conn, since)| still_usable(conn, *since, now));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

/// An idle connection (since `since`) that may take a request at `now`: not too old, and
/// neither closed by the upstream nor holding bytes no request asked for.
fn still_usable(conn: &mut Connection<Io>, since: Instant, now: Instant) -> bool {
    now.duration_since(since) < IDLE_TIMEOUT && conn.is_usable()
}

/// Sweeps `idle` every [`SWEEP_EVERY`] while its worker's connections exist.
async fn sweep(idle: std::sync::Weak<Idle>) {
    let mut every = tokio::time::interval_at(Instant::now() + SWEEP_EVERY, SWEEP_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let Some(idle) = idle.upgrade() else {
            return;
        };
        idle.sweep();
    }
}

impl<B> Service<Request<B>> for Connections<B>
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        // Two futures rather than one with both paths: each is only as large as its own.
        match self.shared.http2.current() {
            Some(sender) => Box::pin(self.clone().send_http2(sender, req, true)),
            None => Box::pin(self.clone().send_http1(req)),
        }
    }
}

/// Did `error` come from making the connection (DNS, connect, TLS handshake), before
/// anything reached the upstream? Then it says nothing about the key.
pub(crate) fn is_connect_failure(error: &(dyn std::error::Error + 'static)) -> bool {
    crate::answer::has_source::<ConnectError>(error)
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

/// An HTTP/1 connection's stream: plain TCP, or TLS over it (as the connector made it).
enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TokioIo<TokioIo<TcpStream>>>>),
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(io) => Pin::new(io).poll_read(cx, buf),
            Io::Tls(io) => Pin::new(io).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(io) => Pin::new(io).poll_write(cx, buf),
            Io::Tls(io) => Pin::new(io).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(io) => Pin::new(io).poll_flush(cx),
            Io::Tls(io) => Pin::new(io).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(io) => Pin::new(io).poll_shutdown(cx),
            Io::Tls(io) => Pin::new(io).poll_shutdown(cx),
        }
    }
}

impl std::fmt::Debug for Io {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Io::Plain(_) => "Io::Plain",
            Io::Tls(_) => "Io::Tls",
        })
    }
}

/// An upstream response body; an HTTP/1 connection goes back to the pool at its end.
pub(crate) struct Body(Inner);

/// Small, since every layer above moves the response: the usual answer's body came whole
/// with its head (its connection is already back in the pool); one still to be read from
/// its connection is boxed (one allocation for a streamed answer).
enum Inner {
    Whole(Option<Bytes>),
    Http1(Box<(ResponseBody<Io>, Arc<Idle>)>),
    Http2(Incoming),
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        match &mut self.get_mut().0 {
            Inner::Whole(whole) => {
                Poll::Ready(whole.take().map(|data| Ok(http_body::Frame::data(data))))
            }
            Inner::Http1(http1) => {
                let (body, idle) = &mut **http1;
                let frame = std::task::ready!(Pin::new(&mut *body).poll_frame(cx));
                if let Some(conn) = body.take_reusable() {
                    idle.checkin(conn);
                }
                Poll::Ready(frame.map(|frame| frame.map_err(BoxError::from)))
            }
            Inner::Http2(body) => Pin::new(body)
                .poll_frame(cx)
                .map(|frame| frame.map(|frame| frame.map_err(BoxError::from))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Inner::Whole(whole) => whole.is_none(),
            Inner::Http1(http1) => http1.0.is_end_stream(),
            Inner::Http2(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match &self.0 {
            Inner::Whole(whole) => {
                http_body::SizeHint::with_exact(whole.as_ref().map_or(0, |data| data.len() as u64))
            }
            Inner::Http1(http1) => http1.0.size_hint(),
            Inner::Http2(body) => body.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// Pools a fresh connection in `idle` and returns the upstream's end of it.
    async fn pooled(idle: &Arc<Idle>) -> TcpStream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ours = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (theirs, _) = listener.accept().await.unwrap();
        idle.checkin(Connection::new(Io::Plain(ours), true));
        theirs
    }

    #[tokio::test(start_paused = true)]
    async fn idle_connections_the_upstream_closed_are_closed_within_a_sweep() {
        let idle = Arc::new(Idle::default());
        let closed = pooled(&idle).await;
        let open = pooled(&idle).await;
        drop(closed);
        assert_eq!(idle.len(), 2);

        // No request comes: the sweep alone finds the closed one (its end of stream was
        // delivered with the close on loopback) and keeps the open one.
        tokio::time::sleep(SWEEP_EVERY + Duration::from_millis(1)).await;
        assert_eq!(idle.len(), 1);

        // The open one's peer reads nothing yet; the pool going (its worker stopping)
        // closes it.
        let mut byte = [0u8; 1];
        assert!(open.try_read(&mut byte).is_err(), "open and quiet");
        drop(idle);
        open.readable().await.unwrap();
        assert_eq!(
            open.try_read(&mut byte).unwrap(),
            0,
            "closed when the pool went"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn idle_connections_past_the_idle_timeout_are_closed_by_the_sweep() {
        let idle = Arc::new(Idle::default());
        let _open = pooled(&idle).await;
        tokio::time::sleep(IDLE_TIMEOUT - SWEEP_EVERY).await;
        assert_eq!(idle.len(), 1);
        tokio::time::sleep(SWEEP_EVERY * 2).await;
        assert_eq!(idle.len(), 0);
    }
}
