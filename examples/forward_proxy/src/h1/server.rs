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
//! - heads: at most [`MAX_HEADERS`] fields and [`MAX_HEAD`] bytes (else 431); CRLF line
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
//! Responses: `HTTP/1.1`, a `date` (formatted once a second per thread), then
//! `Content-Length` when the body's size is known, chunked otherwise (close-delimited for
//! an HTTP/1.0 client); no body for HEAD, 1xx, 204 and 304. A head and the body frames
//! ready at once go out in one write; a streamed body is written frame by frame as it
//! comes.

use std::future::{Future, poll_fn};
use std::io;
use std::mem::MaybeUninit;
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};
use tower::BoxError;

use super::codec::{self, BodyDecoder, Decoded, Framing};
use super::{put_content_length, put_field};

/// Header fields a request may carry (hyper's default): more get a 431.
pub(crate) const MAX_HEADERS: usize = 100;
/// The largest request head (request line and fields) taken: a larger one gets a 431.
pub(crate) const MAX_HEAD: usize = 64 * 1024;
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

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

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

/// A request head, parsed.
#[derive(Debug)]
pub(crate) struct Head {
    pub(crate) parts: http::request::Parts,
    /// The client keeps the connection open after the answer (HTTP/1.1 unless
    /// `connection: close`; HTTP/1.0 only with `connection: keep-alive`).
    pub(crate) keep_alive: bool,
    /// `Expect: 100-continue` (HTTP/1.1): the client waits for a `100 Continue` before it
    /// sends the body.
    pub(crate) expect_continue: bool,
}

/// Why a head was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HeadError {
    /// Not a valid HTTP/1.x request head: 400.
    Malformed(&'static str),
    /// More fields or bytes than taken: 431.
    TooLarge,
}

impl HeadError {
    fn status(self) -> StatusCode {
        match self {
            Self::Malformed(_) => StatusCode::BAD_REQUEST,
            Self::TooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        }
    }
}

/// Parses a request head at the start of `buf`: `Ok(None)` while it is incomplete; once
/// complete, the head is taken out of `buf` (what follows, a body or the next request,
/// stays) and its target and field values are slices of it (no copy).
///
/// # Errors
///
/// [`HeadError`] for a head the server refuses (see the module docs).
pub(crate) fn parse_head(buf: &mut BytesMut) -> Result<Option<Head>, HeadError> {
    // Uninitialised: zeroing 100 fields per parse costs more than the parse.
    let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut []);
    let len = match parsed.parse_with_uninit_headers(buf, &mut fields) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => {
            return Err(HeadError::TooLarge);
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(e) => {
            return Err(HeadError::Malformed(match e {
                httparse::Error::HeaderName => "invalid header name",
                httparse::Error::HeaderValue => "invalid header value",
                httparse::Error::NewLine => "invalid line end",
                httparse::Error::Token => "invalid method",
                httparse::Error::Version => "invalid version",
                _ => "invalid request line",
            }));
        }
    };
    if len > MAX_HEAD {
        return Err(HeadError::TooLarge);
    }
    // httparse takes a bare LF as a line end; RFC 9112 §2.2 lets a server refuse it, and
    // a proxy must not read lines another parser would split differently.
    if memchr::memchr_iter(b'\n', &buf[..len]).any(|i| i == 0 || buf[i - 1] != b'\r') {
        return Err(HeadError::Malformed("a bare LF in the head"));
    }
    let base = buf.as_ptr() as usize;
    // Where a slice of the head lies in it (the head is at most MAX_HEAD bytes).
    let span = |s: &[u8]| Span {
        at: (s.as_ptr() as usize - base) as u32,
        len: s.len() as u32,
    };
    let method = Method::from_bytes(parsed.method.unwrap_or_default().as_bytes())
        .map_err(|_| HeadError::Malformed("invalid method"))?;
    let version = match parsed.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let target = span(parsed.path.unwrap_or_default().as_bytes());
    // The fields' places, noted before the head is taken out of `buf` (which httparse's
    // slices borrow): on the stack for the usual few, else on the heap.
    let mut few = [(Span::EMPTY, Span::EMPTY); FEW_HEADERS];
    let many: Vec<(Span, Span)>;
    let spans = if parsed.headers.len() <= FEW_HEADERS {
        for (slot, field) in few.iter_mut().zip(parsed.headers.iter()) {
            *slot = (span(field.name.as_bytes()), span(field.value));
        }
        &few[..parsed.headers.len()]
    } else {
        many = parsed
            .headers
            .iter()
            .map(|field| (span(field.name.as_bytes()), span(field.value)))
            .collect();
        &many[..]
    };
    let head = buf.split_to(len).freeze();

    let uri = Uri::from_maybe_shared(target.of(&head))
        .map_err(|_| HeadError::Malformed("invalid request target"))?;
    // Room for a field or two more: the proxy adds the provider's credential, and a
    // full map would be reallocated for it.
    let mut headers = HeaderMap::with_capacity(spans.len() + 2);
    // `Connection` and `Expect` are read as the fields go by (a name compare), not looked
    // up by hash afterwards.
    let (mut close, mut keep_alive, mut expect) = (false, false, None);
    for &(name, value) in spans {
        let name = HeaderName::from_bytes(name.in_(&head))
            .map_err(|_| HeadError::Malformed("invalid header name"))?;
        let value = HeaderValue::from_maybe_shared(value.of(&head))
            .map_err(|_| HeadError::Malformed("invalid header value"))?;
        if name == header::CONNECTION {
            close |= super::has_token([&value], b"close");
            keep_alive |= super::has_token([&value], b"keep-alive");
        } else if name == header::EXPECT && expect.is_none() {
            expect = Some(value.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        }
        headers.append(name, value);
    }
    let keep_alive = if version == Version::HTTP_10 {
        keep_alive && !close
    } else {
        !close
    };
    let expect_continue = version == Version::HTTP_11 && expect == Some(true);
    let (mut parts, ()) = Request::new(()).into_parts();
    parts.method = method;
    parts.uri = uri;
    parts.version = version;
    parts.headers = headers;
    Ok(Some(Head {
        parts,
        keep_alive,
        expect_continue,
    }))
}

/// Fields noted on the stack (more go to the heap).
const FEW_HEADERS: usize = 24;

/// A slice of a head by position.
#[derive(Debug, Clone, Copy)]
struct Span {
    at: u32,
    len: u32,
}

impl Span {
    const EMPTY: Self = Self { at: 0, len: 0 };

    fn range(self) -> std::ops::Range<usize> {
        self.at as usize..(self.at + self.len) as usize
    }

    /// The slice of `head`, sharing it.
    fn of(self, head: &Bytes) -> Bytes {
        head.slice(self.range())
    }

    fn in_(self, head: &[u8]) -> &[u8] {
        &head[self.range()]
    }
}

/// The request's body framing; HTTP/1.0 has no transfer codings (RFC 9112 §6.1: a
/// server must treat such a message as faulty).
fn framing(parts: &http::request::Parts) -> Result<Framing, BoxError> {
    if parts.version == Version::HTTP_10 && parts.headers.contains_key(header::TRANSFER_ENCODING) {
        return Err("Transfer-Encoding in an HTTP/1.0 request".into());
    }
    Ok(codec::request_framing(&parts.headers)?)
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
                let n = self.buf.len().min(H2_PREFACE.len());
                if self.buf[..n] == H2_PREFACE[..n] {
                    if n == H2_PREFACE.len() {
                        return Ok(Next::Http2);
                    }
                } else {
                    self.first = false;
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

    /// Writes the answer: `Ok(true)` if the connection may carry another request.
    async fn write_response<B>(
        &mut self,
        response: Response<B>,
        method: &Method,
        version: Version,
        keep_alive: bool,
        pump: &mut Option<Pump>,
    ) -> io::Result<bool>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        let (parts, body) = response.into_parts();
        let status = parts.status.as_u16();
        let no_body = *method == Method::HEAD
            || (100..200).contains(&status)
            || status == 204
            || status == 304;
        // The body's own exact size first (known for the usual answer); the declared
        // length is looked up only when it is not.
        let declared = || {
            parts
                .headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| std::str::from_utf8(v.as_bytes()).ok())
                .and_then(|v| v.parse::<u64>().ok())
        };
        let framing = if no_body {
            Framing::Empty
        } else if let Some(len) = body.size_hint().exact() {
            Framing::Length(len)
        } else if let Some(len) = declared() {
            Framing::Length(len)
        } else if version == Version::HTTP_11 {
            Framing::Chunked
        } else {
            Framing::UntilClose
        };
        let keep_alive = keep_alive && framing != Framing::UntilClose;

        let out = &mut self.out;
        out.reserve(256);
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(parts.status.as_str().as_bytes());
        out.extend_from_slice(b" ");
        out.extend_from_slice(
            parts
                .status
                .canonical_reason()
                .unwrap_or("Unknown")
                .as_bytes(),
        );
        out.extend_from_slice(b"\r\n");
        let mut has_date = false;
        for (name, value) in &parts.headers {
            has_date |= *name == header::DATE;
            let ours = *name == header::CONNECTION
                || *name == header::TRANSFER_ENCODING
                || (*name == header::CONTENT_LENGTH
                    && !(no_body && status >= 200 && status != 204));
            if ours {
                continue;
            }
            put_field(out, name.as_str().as_bytes(), value.as_bytes());
        }
        match framing {
            Framing::Length(len) => {
                put_content_length(out, len);
            }
            Framing::Chunked => put_field(out, b"transfer-encoding", b"chunked"),
            Framing::Empty | Framing::UntilClose => {}
        }
        if !keep_alive {
            put_field(out, b"connection", b"close");
        } else if version == Version::HTTP_10 {
            put_field(out, b"connection", b"keep-alive");
        }
        if !has_date {
            date::with(|date| put_field(out, b"date", date));
        }
        out.extend_from_slice(b"\r\n");

        let mut body = pin!(body);
        let mut body_done = framing == Framing::Empty;
        let mut left = match framing {
            Framing::Length(len) => len,
            _ => 0,
        };
        let mut intact = true;
        poll_fn(|cx| {
            loop {
                let mut body_pending = false;
                while !body_done && self.out.len() < WRITE_HIGH {
                    match body.as_mut().poll_frame(cx) {
                        Poll::Ready(Some(Ok(frame))) => {
                            let Ok(mut data) = frame.into_data() else {
                                continue; // trailers: not sent
                            };
                            match framing {
                                Framing::Length(_) => {
                                    if data.len() as u64 > left {
                                        // More than declared: cut, and close after.
                                        data.truncate(left as usize);
                                        intact = false;
                                        body_done = true;
                                    }
                                    left -= data.len() as u64;
                                    self.out.extend_from_slice(&data);
                                }
                                Framing::Chunked if !data.is_empty() => {
                                    codec::encode_chunk_head(data.len(), &mut self.out);
                                    self.out.extend_from_slice(&data);
                                    self.out.extend_from_slice(codec::CHUNK_END);
                                }
                                _ => self.out.extend_from_slice(&data),
                            }
                            // A body that says it has ended is not polled again for its
                            // `None` (one more trip through every layer of the body).
                            if !body_done && body.is_end_stream() {
                                body_done = true;
                                intact &= end_of_body(framing, left, &mut self.out);
                            }
                        }
                        Poll::Ready(Some(Err(e))) => {
                            tracing::debug!("response body failed: {}", e.into());
                            intact = false;
                            body_done = true;
                        }
                        Poll::Ready(None) => {
                            body_done = true;
                            intact &= end_of_body(framing, left, &mut self.out);
                        }
                        Poll::Pending => {
                            body_pending = true;
                            break;
                        }
                    }
                }
                let written = self.poll_write_out(cx)?;
                if written.is_ready() && body_done {
                    return Poll::Ready(Ok::<_, io::Error>(()));
                }
                if written.is_ready() && !body_pending {
                    // Out, and the body may have more at once.
                    continue;
                }
                if let Poll::Ready(e) = self.poll_read_side(cx, pump) {
                    return Poll::Ready(Err(e));
                }
                return Poll::Pending;
            }
        })
        .await?;
        Ok(keep_alive && intact)
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

/// Closes a response body framed by `framing` with `left` bytes of its declared length not
/// sent: the last chunk of a chunked one. `false` when the client sees a cut body (shorter
/// than declared).
fn end_of_body(framing: Framing, left: u64, out: &mut BytesMut) -> bool {
    match framing {
        Framing::Chunked => {
            out.extend_from_slice(codec::LAST_CHUNK);
            true
        }
        Framing::Length(_) => left == 0,
        Framing::Empty | Framing::UntilClose => true,
    }
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

/// What the connection and a streamed request body share: at most one chunk in transit
/// (the connection reads on only once the handler took it: back-pressure).
#[derive(Default)]
struct Pipe {
    state: Mutex<PipeState>,
}

#[derive(Default)]
struct PipeState {
    data: Option<Bytes>,
    end: Option<Result<(), BodyError>>,
    /// The handler asked for the body (time for a `100 Continue`).
    wanted: bool,
    /// The handler let go of the body.
    dropped: bool,
    body_waker: Option<Waker>,
    conn_waker: Option<Waker>,
}

impl Pipe {
    fn lock(&self) -> std::sync::MutexGuard<'_, PipeState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn store(slot: &mut Option<Waker>, cx: &Context<'_>) {
    match slot {
        Some(waker) if waker.will_wake(cx.waker()) => {}
        _ => *slot = Some(cx.waker().clone()),
    }
}

/// The connection's side of a streamed request body.
struct Pump {
    decoder: BodyDecoder,
    pipe: Arc<Pipe>,
    /// `100 Continue` owed once the handler asks for the body.
    send_continue: bool,
    /// The body's end was read (the connection can carry the next request).
    finished: bool,
    /// The body is cut short or malformed, or the handler dropped it first: the
    /// connection closes after the answer.
    broken: bool,
}

impl Pump {
    /// Feeds the body; Ready once nothing more will be read for it.
    fn poll<T: AsyncRead + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        io: &mut T,
        buf: &mut BytesMut,
        out: &mut BytesMut,
        read_closed: &mut bool,
    ) -> Poll<()> {
        loop {
            {
                let mut state = self.pipe.lock();
                if state.dropped {
                    drop(state);
                    self.settle(buf);
                    return Poll::Ready(());
                }
                if state.data.is_some() || (self.send_continue && !state.wanted) {
                    store(&mut state.conn_waker, cx);
                    return Poll::Pending;
                }
            }
            if self.send_continue {
                // Written by the caller right after this poll.
                self.send_continue = false;
                out.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
            }
            let decoded = self.decoder.decode(buf);
            let outcome = match decoded {
                // The last bytes of a body of known length: its end goes with them, so
                // that a handler that stops at the length still leaves the connection
                // reusable.
                Ok(Decoded::Data(data)) if self.decoder.is_end() => {
                    self.finished = true;
                    self.give(Some(data), Some(Ok(())));
                    return Poll::Ready(());
                }
                Ok(Decoded::Data(data)) => {
                    self.give(Some(data), None);
                    continue;
                }
                Ok(Decoded::End) => Ok(()),
                Ok(Decoded::NeedMore) if *read_closed => self
                    .decoder
                    .eof()
                    .map_err(|e| BodyError::Closed(e.to_string())),
                Ok(Decoded::NeedMore) => {
                    if buf.capacity() - buf.len() < BODY_READ / 2 {
                        buf.reserve(BODY_READ);
                    }
                    match ready!(poll_read(io, cx, buf)) {
                        Ok(0) => {
                            *read_closed = true;
                            continue;
                        }
                        Ok(_) => continue,
                        Err(e) => Err(BodyError::Closed(e.to_string())),
                    }
                }
                Err(e) => Err(BodyError::Invalid(e.to_string())),
            };
            self.finished = outcome.is_ok();
            self.broken = outcome.is_err();
            self.give(None, Some(outcome));
            return Poll::Ready(());
        }
    }

    /// [`Self::settle`] if the handler let go of the body and it is not settled yet.
    fn settle_if_dropped(&mut self, buf: &mut BytesMut) {
        if !self.finished && !self.broken && self.pipe.lock().dropped {
            self.settle(buf);
        }
    }

    /// The handler let go of the body: the connection can go on only if nothing of it is
    /// left to read (its end is already in the buffer).
    fn settle(&mut self, buf: &mut BytesMut) {
        loop {
            match self.decoder.decode(buf) {
                Ok(Decoded::End) => {
                    self.finished = true;
                    return;
                }
                Ok(Decoded::Data(data)) if data.is_empty() => {}
                _ => {
                    self.broken = true;
                    return;
                }
            }
        }
    }

    fn give(&self, data: Option<Bytes>, end: Option<Result<(), BodyError>>) {
        let waker = {
            let mut state = self.pipe.lock();
            if data.is_some() {
                state.data = data;
            }
            if end.is_some() {
                state.end = end;
            }
            state.body_waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

impl Drop for Pump {
    fn drop(&mut self) {
        // The connection ends (or gives up on the body): the body must not wait forever.
        let waker = {
            let mut state = self.pipe.lock();
            if state.end.is_none() {
                state.end = Some(Err(BodyError::Closed("the connection ended".into())));
            }
            state.body_waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

#[derive(Debug, Clone)]
enum BodyError {
    Closed(String),
    Invalid(String),
}

/// A request body as the handler reads it: empty, whole (it came with the head), streamed
/// from the connection, or an HTTP/2 stream's (hyper's).
#[cfg_attr(feature = "fuzzing", visibility::make(pub))]
#[derive(Debug)]
pub(crate) struct ReceivedBody {
    kind: Kind,
}

enum Kind {
    Full(Option<Bytes>),
    Streamed { pipe: Arc<Pipe>, left: Option<u64> },
    Http2(hyper::body::Incoming),
}

impl std::fmt::Debug for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Full(_) => "Full",
            Self::Streamed { .. } => "Streamed",
            Self::Http2(_) => "Http2",
        })
    }
}

impl ReceivedBody {
    /// No body.
    pub(crate) fn empty() -> Self {
        Self {
            kind: Kind::Full(None),
        }
    }

    /// A body read whole.
    pub(crate) fn full(data: Bytes) -> Self {
        Self {
            kind: Kind::Full((!data.is_empty()).then_some(data)),
        }
    }

    /// The body of an HTTP/2 request (hyper's server).
    pub(crate) fn http2(body: hyper::body::Incoming) -> Self {
        Self {
            kind: Kind::Http2(body),
        }
    }
}

impl Body for ReceivedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.kind {
            Kind::Full(data) => Poll::Ready(data.take().map(|data| Ok(Frame::data(data)))),
            Kind::Http2(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            Kind::Streamed { pipe, left } => {
                let (polled, waker) = {
                    let mut state = pipe.lock();
                    if let Some(data) = state.data.take() {
                        (Poll::Ready(Some(Ok(data))), state.conn_waker.take())
                    } else if let Some(end) = &state.end {
                        let end = match end {
                            Ok(()) => None,
                            Err(BodyError::Closed(why)) => Some(Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                why.clone(),
                            ))),
                            Err(BodyError::Invalid(why)) => {
                                Some(Err(io::Error::new(io::ErrorKind::InvalidData, why.clone())))
                            }
                        };
                        (Poll::Ready(end), None)
                    } else {
                        store(&mut state.body_waker, cx);
                        let first = !state.wanted;
                        state.wanted = true;
                        (
                            Poll::Pending,
                            if first { state.conn_waker.take() } else { None },
                        )
                    }
                };
                if let Some(waker) = waker {
                    waker.wake();
                }
                match polled {
                    Poll::Ready(Some(Ok(data))) => {
                        if let Some(left) = left {
                            *left = left.saturating_sub(data.len() as u64);
                        }
                        Poll::Ready(Some(Ok(Frame::data(data))))
                    }
                    Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
                    Poll::Ready(None) => Poll::Ready(None),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(data) => data.is_none(),
            Kind::Http2(body) => body.is_end_stream(),
            Kind::Streamed { .. } => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(data) => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
            Kind::Http2(body) => body.size_hint(),
            Kind::Streamed {
                left: Some(left), ..
            } => SizeHint::with_exact(*left),
            Kind::Streamed { left: None, .. } => SizeHint::default(),
        }
    }
}

impl Drop for ReceivedBody {
    fn drop(&mut self) {
        if let Kind::Streamed { pipe, .. } = &self.kind {
            let waker = {
                let mut state = pipe.lock();
                state.dropped = true;
                state.conn_waker.take()
            };
            if let Some(waker) = waker {
                waker.wake();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http_body_util::{BodyExt, Full};
    use tokio::io::{AsyncReadExt, DuplexStream};

    use super::*;

    fn parse(raw: &[u8]) -> (Result<Option<Head>, HeadError>, BytesMut) {
        let mut buf = BytesMut::from(raw);
        let parsed = parse_head(&mut buf);
        (parsed, buf)
    }

    #[test]
    fn a_complete_head_is_taken_and_what_follows_stays() {
        let (head, rest) =
            parse(b"POST /v1/chat?x=1 HTTP/1.1\r\nHost: a\r\nX-Two: 1\r\nx-two: 2\r\n\r\nbody");
        let head = head.unwrap().unwrap();
        assert_eq!(head.parts.method, Method::POST);
        assert_eq!(head.parts.uri, "/v1/chat?x=1");
        assert_eq!(head.parts.version, Version::HTTP_11);
        assert_eq!(head.parts.headers["host"], "a");
        let twos: Vec<_> = head.parts.headers.get_all("x-two").iter().collect();
        assert_eq!(twos, ["1", "2"]);
        assert!(head.keep_alive);
        assert!(!head.expect_continue);
        assert_eq!(&rest[..], b"body");
    }

    #[test]
    fn an_incomplete_head_waits_and_leaves_the_buffer_alone() {
        for raw in [&b"GET / HTTP/1.1\r\nhost: a\r\n"[..], b"GET /", b"G"] {
            let (head, rest) = parse(raw);
            assert!(head.unwrap().is_none());
            assert_eq!(&rest[..], raw);
        }
    }

    #[test]
    fn targets_in_every_form_hyper_took_are_taken() {
        for (raw, target) in [
            (
                &b"GET http://h:1/p?q HTTP/1.1\r\n\r\n"[..],
                "http://h:1/p?q",
            ),
            (b"OPTIONS * HTTP/1.1\r\n\r\n", "*"),
            (b"CONNECT h:443 HTTP/1.1\r\n\r\n", "h:443"),
        ] {
            let head = parse(raw).0.unwrap().unwrap();
            assert_eq!(head.parts.uri.to_string(), target);
        }
    }

    #[test]
    fn keep_alive_and_expect_follow_the_version() {
        let head = |raw: &[u8]| parse(raw).0.unwrap().unwrap();
        assert!(!head(b"GET / HTTP/1.0\r\n\r\n").keep_alive);
        assert!(head(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").keep_alive);
        assert!(!head(b"GET / HTTP/1.1\r\nconnection: te, close\r\n\r\n").keep_alive);
        assert!(head(b"POST / HTTP/1.1\r\nexpect: 100-Continue\r\n\r\n").expect_continue);
        assert!(!head(b"POST / HTTP/1.0\r\nexpect: 100-continue\r\n\r\n").expect_continue);
    }

    #[test]
    fn malformed_heads_are_refused() {
        for raw in [
            &b"GET / HTTP/1.1\nhost: a\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nhost: a\n\r\n",
            b"GET / HTTP/1.1\r\nhost: a\r\n folded\r\n\r\n",
            b"GET / HTTP/1.1\r\nno colon\r\n\r\n",
            b"GET / HTTP/2.0\r\n\r\n",
            b"GET /a b HTTP/1.1\r\n\r\n",
            b"GET  / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nx: \x00\r\n\r\n",
            b"G\x01T / HTTP/1.1\r\n\r\n",
        ] {
            let (head, _) = parse(raw);
            assert!(
                matches!(head, Err(HeadError::Malformed(_))),
                "{:?}: {head:?}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    #[test]
    fn heads_past_the_limits_are_too_large() {
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("x-{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(parse(&many).0.unwrap_err(), HeadError::TooLarge);
        // Long and still incomplete.
        let mut long = b"GET / HTTP/1.1\r\nx: ".to_vec();
        long.resize(MAX_HEAD, b'a');
        assert_eq!(parse(&long).0.unwrap_err(), HeadError::TooLarge);
        // Just under, complete: taken.
        long.truncate(MAX_HEAD - 4);
        long.extend_from_slice(b"\r\n\r\n");
        assert!(parse(&long).0.unwrap().is_some());
    }

    fn config() -> Config {
        Config {
            header_read_timeout: Duration::from_secs(5),
            half_close: false,
        }
    }

    /// Serves `server` with a handler answering `<method> <path> <body length>`.
    fn echo(server: DuplexStream, config: Config) -> tokio::task::JoinHandle<io::Result<()>> {
        let (stop, stopping) = watch::channel(false);
        let task = echo_with(server, config, stopping);
        tokio::spawn(async move {
            let _stop = stop;
            task.await.unwrap()
        })
    }

    fn echo_with(
        server: DuplexStream,
        config: Config,
        stopping: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<io::Result<()>> {
        tokio::spawn(async move {
            let handler = |req: Request<ReceivedBody>| async move {
                let (parts, body) = req.into_parts();
                let body = body
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                let text = format!("{} {} {}", parts.method, parts.uri, body.len());
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(text))))
            };
            serve(server, config, stopping, handler).await.map(|_| ())
        })
    }

    #[tokio::test]
    async fn pipelined_requests_are_answered_in_order_on_one_connection() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let task = echo(
            server,
            Config {
                half_close: true,
                ..config()
            },
        );
        client
            .write_all(
                b"POST /a HTTP/1.1\r\ncontent-length: 2\r\n\r\nhiGET /b HTTP/1.1\r\n\r\n\
                  GET /c HTTP/1.1\r\nconnection: close\r\n\r\n",
            )
            .await
            .unwrap();
        client.shutdown().await.unwrap();
        let mut answer = String::new();
        client.read_to_string(&mut answer).await.unwrap();
        task.await.unwrap().unwrap();
        let bodies: Vec<&str> = answer
            .split("HTTP/1.1 200 OK\r\n")
            .skip(1)
            .map(|a| a.split("\r\n\r\n").nth(1).unwrap())
            .collect();
        assert_eq!(bodies, ["POST /a 2", "GET /b 0", "GET /c 0"], "{answer}");
    }

    #[tokio::test]
    async fn a_client_gone_while_its_request_is_handled_drops_the_handler() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let (dropped_tx, dropped) = tokio::sync::oneshot::channel::<()>();
        let (_stop, stopping) = watch::channel(false);
        let mut guard = Some(dropped_tx);
        let task = tokio::spawn(async move {
            let handler = move |_req: Request<ReceivedBody>| {
                let guard = guard.take();
                async move {
                    let _guard = guard;
                    std::future::pending::<Result<Response<Full<Bytes>>, Infallible>>().await
                }
            };
            serve(server, config(), stopping, handler).await.map(|_| ())
        });
        client
            .write_all(b"POST /a HTTP/1.1\r\ncontent-length: 2\r\n\r\nhi")
            .await
            .unwrap();
        tokio::task::yield_now().await;
        drop(client);
        // The handler's future (holding the sender) is dropped: the receiver sees it.
        assert!(dropped.await.is_err());
        assert!(task.await.unwrap().is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_not_finished_within_the_timeout_closes_the_connection() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let task = echo(server, config());
        client
            .write_all(b"GET / HTTP/1.1\r\nhost: a\r\n")
            .await
            .unwrap();
        let started = Instant::now();
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        assert!(answer.is_empty());
        assert!(started.elapsed() >= Duration::from_secs(5));
        task.await.unwrap().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn the_timeout_counts_from_each_head_not_from_the_connection() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let task = echo(server, config());
        // Requests every 3 s for 12 s: each head is on time, so none is cut.
        let mut buf = vec![0u8; 4096];
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_secs(3)).await;
            client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
            let n = client.read(&mut buf).await.unwrap();
            assert!(buf[..n].starts_with(b"HTTP/1.1 200 OK\r\n"));
        }
        // Then idle: closed 5 s after the last answer.
        let n = client.read(&mut buf).await.unwrap();
        assert_eq!(n, 0);
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn on_stop_an_idle_connection_closes_and_a_request_in_flight_is_answered_with_close() {
        let (stop, stopping) = watch::channel(false);
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let mut released = Some(released);
        let (mut busy, server) = tokio::io::duplex(1 << 16);
        let handler = move |_req: Request<ReceivedBody>| {
            let released = released.take();
            async move {
                if let Some(released) = released {
                    let _ = released.await;
                }
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"done"))))
            }
        };
        let busy_task = tokio::spawn(serve(server, config(), stopping.clone(), handler));
        let (mut idle, server) = tokio::io::duplex(1 << 16);
        let idle_task = echo_with(server, config(), stopping);
        // The idle one has served a request and waits for the next.
        idle.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut buf = vec![0u8; 4096];
        assert!(idle.read(&mut buf).await.unwrap() > 0);
        busy.write_all(b"GET /slow HTTP/1.1\r\n\r\n").await.unwrap();
        tokio::task::yield_now().await;

        stop.send(true).unwrap();
        assert_eq!(
            idle.read(&mut buf).await.unwrap(),
            0,
            "the idle one is closed"
        );
        idle_task.await.unwrap().unwrap();
        release.send(()).unwrap();
        let mut answer = String::new();
        busy.read_to_string(&mut answer).await.unwrap();
        assert!(answer.contains("connection: close\r\n"), "{answer}");
        assert!(answer.ends_with("done"), "{answer}");
        assert!(busy_task.await.unwrap().is_ok());
    }

    #[tokio::test]
    async fn a_body_read_to_its_length_in_pieces_keeps_the_connection() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let (_stop, stopping) = watch::channel(false);
        // Reads frames up to the declared length, never asks for the end, drops the body.
        let handler = |req: Request<ReceivedBody>| async move {
            let (parts, mut body) = req.into_parts();
            let len: usize = parts
                .headers
                .get("content-length")
                .map_or(0, |v| v.to_str().unwrap().parse().unwrap());
            let mut read = 0;
            while read < len {
                let frame = body.frame().await.unwrap().unwrap();
                read += frame.into_data().unwrap().len();
            }
            drop(body);
            let text = format!("{} {read}", parts.uri);
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(text))))
        };
        let task = tokio::spawn(serve(server, config(), stopping, handler));
        client
            .write_all(b"POST /a HTTP/1.1\r\ncontent-length: 6\r\n\r\nab")
            .await
            .unwrap();
        tokio::task::yield_now().await;
        client.write_all(b"cd").await.unwrap();
        tokio::task::yield_now().await;
        client
            .write_all(b"efGET /b HTTP/1.1\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        client.read_to_string(&mut answer).await.unwrap();
        assert!(!answer.contains("connection: close\r\n\r\n/a"), "{answer}");
        assert!(answer.contains("\r\n\r\n/a 6HTTP/1.1 200 OK"), "{answer}");
        assert!(answer.ends_with("/b 0"), "{answer}");
        assert!(task.await.unwrap().is_ok());
    }

    #[tokio::test]
    async fn expect_continue_is_answered_when_the_handler_reads_the_body() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let task = echo(server, config());
        client
            .write_all(b"PUT /e HTTP/1.1\r\nexpect: 100-continue\r\ncontent-length: 3\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let n = client.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"HTTP/1.1 100 Continue\r\n\r\n");
        client.write_all(b"abc").await.unwrap();
        let n = client.read(&mut buf).await.unwrap();
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(text.ends_with("PUT /e 3"), "{text}");
        drop(client);
        let _ = task.await.unwrap();
    }
}
