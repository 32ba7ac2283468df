//! The proxy's HTTP/1.x server: one client connection, its requests one after another
//! (keep-alive, pipelining), each handed to a handler as an `http::Request` whose body is
//! read from the connection with the shared body codec ([`super::codec`]).
//!
//! Why not hyper's server: its dispatcher drove most of the proxy's instructions per
//! request, and it holds 16 KiB of buffers per connection. Here a head
//! is read into a small buffer that grows only as far as the head needs, parsed by
//! `httparse` in place (header values and the target are slices of that buffer, no copy),
//! and a body already in the buffer is handed over as one `Bytes`, without a channel.
//!
//! What the loop enforces (RFC 9112, strict like nginx; nothing of a rejected request
//! reaches the handler):
//! - heads ([`head`]): at most [`MAX_HEADERS`] fields and [`MAX_HEAD`] bytes (else 431); CRLF line
//!   ends (a bare LF is a 400), no obs-fold, no field without a colon (400);
//! - framing ([`super::codec::request_framing`]): `Content-Length` with
//!   `Transfer-Encoding`, a transfer coding list not ending in `chunked`, an invalid or
//!   several differing lengths, `Transfer-Encoding` in HTTP/1.0: 400, and the connection
//!   is closed;
//! - `--header-read-timeout`: one deadline per connection, armed while a head is awaited
//!   (an idle keep-alive connection included, as hyper does) and re-armed lazily: the
//!   timer is touched only when it fires, not once per request;
//! - a client that goes away while its request is handled (end of stream or an error
//!   once the request body has been read) drops the handler's future: that is how the
//!   handler learns it (`InFlight`'s abandon path). Pipelined bytes read meanwhile are
//!   kept, up to [`PIPELINE_LIMIT`];
//! - a request body the handler did not read to its end (an early answer): the
//!   connection closes after the answer rather than guess where the next request starts.
//!
//! Request bodies are streamed by [`body`]; answers written by [`write`].
//!
//! Responses: `HTTP/1.1`, a `date` (formatted once a second per thread), then
//! `Content-Length` when the body's size is known, chunked otherwise (close-delimited for
//! an HTTP/1.0 client); no body for HEAD, 1xx, 204 and 304. A head and the body frames
//! ready at once go out in one write; a streamed body is written frame by frame as it
//! comes.

mod body;
mod head;
mod write;

use std::future::{Future, poll_fn};
use std::io;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};
use tower::BoxError;

use self::body::{Kind, Pipe, Pump};
use self::head::{Head, HeadError, framing, parse_head};
use super::codec::{BodyDecoder, Framing};
use super::common::{MAX_HEAD, put_field};
use crate::detect::{self, Preface};

#[cfg_attr(feature = "fuzzing", visibility::make(pub))]
pub(crate) use self::body::ReceivedBody;

/// The first read buffer of a connection (nginx's `client_header_buffer_size`).
const FIRST_BUFFER: usize = 1024;
/// Buffers grown past this are let go when the connection is idle.
const KEEP_WHEN_IDLE: usize = 4 * 1024;
/// How much of a request body is read from the socket at once.
const BODY_READ: usize = 8 * 1024;
/// Bytes read ahead (pipelined requests) while a request is handled; past this the
/// socket is not read until the answer is out.
const PIPELINE_LIMIT: usize = 64 * 1024;
/// Response bytes gathered before they are written out.
const WRITE_HIGH: usize = 16 * 1024;

/// How a connection is served.
#[cfg_attr(feature = "fuzzing", visibility::make(pub))]
#[derive(Debug, Clone, Copy)]
pub(crate) struct Config {
    /// A head (or an idle connection's next one) must arrive within this.
    pub(crate) header_read_timeout: Duration,
    /// A client that closes its sending side still gets the answers to what it sent
    /// (tests and the fuzz target); otherwise the end of its stream means it is gone.
    pub(crate) half_close: bool,
}

/// How a connection ended.
#[cfg_attr(feature = "fuzzing", visibility::make(pub))]
#[derive(Debug)]
pub(crate) enum Ended<T> {
    /// Closed (by either side, or for a fault: nothing more to do).
    Closed,
    /// The client spoke HTTP/2 with prior knowledge: the connection and the bytes read
    /// so far (the preface among them), for an HTTP/2 server.
    Http2(T, BytesMut),
}

/// Serves HTTP/1 requests on `io` with `handler` until either side closes, or `stop`
/// turns true (an idle connection then closes at once; a request in flight gets its
/// answer, marked `connection: close`).
///
/// # Errors
///
/// An I/O error of the connection, or a client gone while its request was handled.
#[cfg_attr(feature = "fuzzing", visibility::make(pub))]
pub(crate) async fn serve<T, H, F, B, E>(
    io: T,
    config: Config,
    stop: watch::Receiver<bool>,
    mut handler: H,
) -> io::Result<Ended<T>>
where
    T: AsyncRead + AsyncWrite + Unpin,
    H: FnMut(Request<ReceivedBody>) -> F,
    F: Future<Output = Result<Response<B>, E>>,
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
    E: Into<BoxError>,
{
    let mut conn = Conn {
        io,
        buf: BytesMut::new(),
        out: BytesMut::new(),
        config,
        deadline: Deadline::new(config.header_read_timeout),
        stopping: Box::pin(stopped(stop.clone())),
        stop,
        read_closed: false,
        first: true,
    };
    loop {
        let head = match conn.read_head().await? {
            Next::Head(head) => head,
            Next::Refused(status) => {
                conn.refuse(status).await;
                return Ok(Ended::Closed);
            }
            Next::Close => {
                let _ = conn.io.shutdown().await;
                return Ok(Ended::Closed);
            }
            Next::Http2 => return Ok(Ended::Http2(conn.io, conn.buf)),
        };
        let Head {
            parts,
            mut keep_alive,
            expect_continue,
        } = head;
        let framing = match framing(&parts) {
            Ok(framing) => framing,
            Err(e) => {
                tracing::debug!("request refused: {e}");
                conn.refuse(StatusCode::BAD_REQUEST).await;
                return Ok(Ended::Closed);
            }
        };
        // A tunnel is not offered (the handler answers 400): what follows is no request.
        keep_alive &= parts.method != Method::CONNECT;
        let method = parts.method.clone();
        let version = parts.version;
        let (body, mut pump) = conn.body(framing, expect_continue);

        let request = Request::from_parts(parts, body);
        // The handler's future ends with this block: the connection's future then holds
        // it and `write_response`'s in the same bytes, not side by side (a smaller task
        // per connection).
        let answer = {
            let mut call = pin!(handler(request));
            poll_fn(|cx| {
                if let Poll::Ready(answer) = call.as_mut().poll(cx) {
                    return Poll::Ready(Ok(answer));
                }
                conn.poll_read_side(cx, &mut pump).map(Err)
            })
            .await
        };
        let response = match answer {
            Ok(Ok(response)) => response,
            Ok(Err(e)) => {
                tracing::debug!("the handler failed: {}", e.into());
                conn.refuse(StatusCode::INTERNAL_SERVER_ERROR).await;
                return Ok(Ended::Closed);
            }
            // Gone: the handler's future is dropped here, which is its notice.
            Err(e) => return Err(e),
        };
        if let Some(pump) = pump.as_mut() {
            pump.settle_if_dropped(&mut conn.buf);
        }
        // A body not read to its end (or broken): where the next request would start is
        // not known.
        keep_alive &= pump.as_ref().is_none_or(|pump| pump.finished) && !*conn.stop.borrow();
        keep_alive = conn
            .write_response(response, &method, version, keep_alive, &mut pump)
            .await?;
        keep_alive &= pump.as_ref().is_none_or(|pump| pump.finished) && !conn.read_closed;
        if !keep_alive {
            let _ = conn.io.shutdown().await;
            return Ok(Ended::Closed);
        }
        conn.idle();
    }
}

/// What the head reader found.
#[allow(clippy::large_enum_variant)] // Returned once per request, never stored.
enum Next {
    Head(Head),
    Refused(StatusCode),
    /// End of stream, timeout or shutdown: close without an answer.
    Close,
    Http2,
}

struct Conn<T> {
    io: T,
    /// Bytes read and not yet consumed: a head, a body's start, pipelined requests.
    buf: BytesMut,
    /// Bytes to write.
    out: BytesMut,
    config: Config,
    deadline: Deadline,
    stop: watch::Receiver<bool>,
    /// Resolves once `stop` turns true: made once for the connection and polled while
    /// it waits for a request, so that a keep-alive wait does not register (and remove)
    /// a waiter on the channel each time (~500 instructions a request).
    stopping: Pin<Box<dyn Future<Output = ()> + Send>>,
    /// The client's end of stream was read.
    read_closed: bool,
    /// No request read yet (the HTTP/2 preface may come).
    first: bool,
}

impl<T: AsyncRead + AsyncWrite + Unpin> Conn<T> {
    async fn read_head(&mut self) -> io::Result<Next> {
        self.deadline.start();
        loop {
            if self.first && !self.buf.is_empty() {
                match detect::http2_preface(&self.buf) {
                    Preface::Whole => return Ok(Next::Http2),
                    Preface::Partial => {}
                    Preface::Absent => self.first = false,
                }
            }
            if !self.buf.is_empty() && !self.first {
                match parse_head(&mut self.buf) {
                    Ok(Some(head)) => return Ok(Next::Head(head)),
                    Ok(None) => {}
                    Err(e) => {
                        if let HeadError::Malformed(why) = e {
                            tracing::debug!("request refused: {why}");
                        }
                        return Ok(Next::Refused(e.status()));
                    }
                }
            }
            if self.read_closed || (self.buf.is_empty() && *self.stop.borrow()) {
                return Ok(Next::Close);
            }
            let spare = self.buf.capacity() - self.buf.len();
            if spare < FIRST_BUFFER / 2 {
                let grow = self.buf.len().max(FIRST_BUFFER);
                self.buf
                    .reserve(grow.min(MAX_HEAD + 1 - self.buf.len().min(MAX_HEAD)));
            }
            let idle = self.buf.is_empty();
            let stopping = &mut self.stopping;
            let read = tokio::select! {
                biased;
                read = poll_fn(|cx| poll_read(&mut self.io, cx, &mut self.buf)) => read?,
                () = self.deadline.expired() => return Ok(Next::Close),
                // Ready once, and the connection then closes: never polled again.
                () = stopping, if idle => return Ok(Next::Close),
            };
            if read == 0 {
                self.read_closed = true;
            }
        }
    }

    /// The request's body: empty, whole from the buffer, or streamed from the
    /// connection by the returned pump.
    fn body(&mut self, framing: Framing, expect_continue: bool) -> (ReceivedBody, Option<Pump>) {
        match framing {
            Framing::Empty => (ReceivedBody::empty(), None),
            Framing::Length(len) if self.buf.len() as u64 >= len => {
                let data = self.buf.split_to(len as usize).freeze();
                (ReceivedBody::full(data), None)
            }
            framing => {
                let len = match framing {
                    Framing::Length(len) => Some(len),
                    _ => None,
                };
                let pipe = Arc::new(Pipe::default());
                let pump = Pump {
                    decoder: BodyDecoder::new(framing),
                    pipe: pipe.clone(),
                    send_continue: expect_continue,
                    finished: false,
                    broken: false,
                };
                let body = ReceivedBody {
                    kind: Kind::Streamed { pipe, left: len },
                };
                (body, Some(pump))
            }
        }
    }

    /// Everything the connection does while a request is handled: the `100 Continue`,
    /// the request body, and watching for a client that goes away. Ready only with the
    /// error that means the client is gone.
    fn poll_read_side(&mut self, cx: &mut Context<'_>, pump: &mut Option<Pump>) -> Poll<io::Error> {
        let watch = match pump.as_mut() {
            None => true,
            Some(p) => {
                if !p.finished && !p.broken {
                    let _ = p.poll(
                        cx,
                        &mut self.io,
                        &mut self.buf,
                        &mut self.out,
                        &mut self.read_closed,
                    );
                }
                // A broken body: the handler hears of it through the body and answers.
                p.finished
            }
        };
        if !self.out.is_empty() {
            // The 100 Continue.
            if let Poll::Ready(Err(e)) = self.poll_write_out(cx) {
                return Poll::Ready(e);
            }
        }
        if watch {
            self.poll_watch(cx)
        } else {
            Poll::Pending
        }
    }

    /// Reads ahead (pipelined requests, up to a bound) to see the client's end of stream.
    fn poll_watch(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        while !self.read_closed && self.buf.len() < PIPELINE_LIMIT {
            if self.buf.capacity() == self.buf.len() {
                self.buf.reserve(FIRST_BUFFER);
            }
            match ready!(poll_read(&mut self.io, cx, &mut self.buf)) {
                Ok(0) => {
                    self.read_closed = true;
                    if !self.config.half_close {
                        return Poll::Ready(io::ErrorKind::ConnectionAborted.into());
                    }
                }
                Ok(_) => {}
                Err(e) => return Poll::Ready(e),
            }
        }
        Poll::Pending
    }

    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.out.is_empty() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.out))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out.advance(n);
        }
        Pin::new(&mut self.io).poll_flush(cx)
    }

    /// Answers a request refused before the handler saw it, and closes.
    async fn refuse(&mut self, status: StatusCode) {
        let out = &mut self.out;
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(status.as_str().as_bytes());
        out.extend_from_slice(b" ");
        out.extend_from_slice(status.canonical_reason().unwrap_or("Error").as_bytes());
        out.extend_from_slice(b"\r\ncontent-length: 0\r\nconnection: close\r\n");
        date::with(|date| put_field(out, b"date", date));
        out.extend_from_slice(b"\r\n");
        let _ = poll_fn(|cx| self.poll_write_out(cx)).await;
        let _ = self.io.shutdown().await;
    }

    /// Between requests: lets go of buffers a large request or answer grew.
    fn idle(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() > KEEP_WHEN_IDLE {
            self.buf = BytesMut::new();
        }
        if self.out.capacity() > KEEP_WHEN_IDLE {
            self.out = BytesMut::new();
        } else {
            self.out.clear();
        }
    }
}

fn poll_read<T: AsyncRead + Unpin>(
    io: &mut T,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
) -> Poll<io::Result<usize>> {
    tokio_util::io::poll_read_buf(Pin::new(io), cx, buf)
}

/// Resolves once `stop` turns true (never if its sender is gone).
async fn stopped(mut stop: watch::Receiver<bool>) {
    if stop.wait_for(|stop| *stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// The `--header-read-timeout` of one connection: one timer, created on the first wait
/// and reset only when it fires before the current deadline.
struct Deadline {
    timeout: Duration,
    at: Instant,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl Deadline {
    fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            at: Instant::now() + timeout,
            sleep: None,
        }
    }

    /// A head is awaited from now.
    fn start(&mut self) {
        self.at = Instant::now() + self.timeout;
    }

    async fn expired(&mut self) {
        poll_fn(|cx| {
            let at = self.at;
            let sleep = self
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
            loop {
                ready!(sleep.as_mut().poll(cx));
                if sleep.deadline() >= at {
                    return Poll::Ready(());
                }
                sleep.as_mut().reset(at);
            }
        })
        .await;
    }
}

/// The `date` header value, formatted once a second per thread.
mod date {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};

    thread_local! {
        static CACHED: RefCell<(u64, [u8; 29])> = const { RefCell::new((u64::MAX, [0; 29])) };
    }

    pub(super) fn with<R>(f: impl FnOnce(&[u8]) -> R) -> R {
        let now = SystemTime::now();
        let second = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_secs());
        CACHED.with(|cached| {
            let mut cached = cached.borrow_mut();
            if cached.0 != second {
                let text = httpdate::fmt_http_date(now);
                if let Ok(bytes) = <[u8; 29]>::try_from(text.as_bytes()) {
                    *cached = (second, bytes);
                }
            }
            f(&cached.1)
        })
    }
}

#[cfg(test)]
mod tests;
