//! One HTTP/1.1 connection to the upstream, driven inside the task that sends the request:
//! no task of its own, no channel, no second wake-up per request (the cost `hyper`'s
//! connection dispatcher adds to every request).
//!
//! A request is written by [`RequestWriter`] (head and a small body in one write; the body
//! framed by its exact size when known, chunked otherwise); the response head is parsed by
//! `httparse` ([`Connection::read_head`]), bounded in size and in header count; its body is
//! framed by [`codec`] and read from the connection as [`ResponseBody`] is
//! polled. The pool (in `connections`) decides what to do with a connection whose response
//! has ended: [`ResponseBody::take_reusable`] hands it over only when it may carry another
//! request.

use std::fmt;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, Waker, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tower::BoxError;

use super::codec::{self, BodyDecoder, Decoded, Framing};
use super::{put_content_length, put_field};

/// At most this many header fields in a response head (hyper's default).
const MAX_HEADERS: usize = 100;
/// At most this many bytes of a response head (1xx heads included).
const MAX_HEAD: usize = 64 * 1024;
/// Reads ask for this much room: most LLM API answers (head and body) fit in one read,
/// and an idle connection keeps no more than this (nginx's `proxy_buffer_size`).
const READ_SIZE: usize = 4 * 1024;
/// A read buffer grown past this by a large message is let go once it is empty.
const MAX_IDLE_BUFFER: usize = 16 * 1024;
/// Request body data up to this size is copied behind the head (one write); larger
/// pieces are written as they are.
const COPY_MAX: usize = 16 * 1024;

/// An HTTP/1.1 connection over `T` (plain TCP, or TLS).
#[derive(Debug)]
pub(crate) struct Connection<T> {
    io: T,
    /// What was read and not yet taken: a response head, its body's bytes.
    read_buf: BytesMut,
    /// A write that fails has sent nothing (a plain socket's `write(2)`). Not so for TLS:
    /// tokio-rustls may send part of its records in one system call and report the error
    /// of the next in the same write.
    failed_write_sent_nothing: bool,
}

/// A parsed response head.
#[derive(Debug)]
pub(crate) struct Head {
    pub(crate) response: Response<()>,
    pub(crate) framing: Framing,
    /// HTTP/1.1 without `Connection: close`, and a body that does not run to the close.
    pub(crate) keep_alive: bool,
}

impl<T: AsyncRead + AsyncWrite + Unpin> Connection<T> {
    /// A connection over `io`; `failed_write_sent_nothing` when a failed write on it
    /// cannot have sent a byte (true of a plain socket, not of TLS), so that a request
    /// whose first write failed may be sent elsewhere.
    pub(crate) fn new(io: T, failed_write_sent_nothing: bool) -> Self {
        Self {
            io,
            read_buf: BytesMut::new(),
            failed_write_sent_nothing,
        }
    }

    /// An idle connection may take a request: the upstream has neither closed it nor sent
    /// anything unasked (a non-blocking read finds nothing to read).
    pub(crate) fn is_usable(&mut self) -> bool {
        if !self.read_buf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        self.read_buf.reserve(1);
        // Ready(Ok(0)): closed; Ready(Ok(n)): bytes no request asked for; Ready(Err):
        // broken. Pending: open and quiet (the waker is replaced by the next real read).
        matches!(
            tokio_util::io::poll_read_buf(Pin::new(&mut self.io), &mut cx, &mut self.read_buf),
            Poll::Pending
        )
    }

    /// Reads the response head to a request with `method`, skipping `100 Continue` and
    /// other interim answers.
    ///
    /// # Errors
    ///
    /// The connection failing or closing before a whole head, a malformed head or one too
    /// large, untrustworthy framing headers, `101 Switching Protocols` (never asked for).
    pub(crate) async fn read_head(&mut self, method: &Method) -> Result<Head, Error> {
        loop {
            // Nothing read yet (the usual case right after the request went out): no
            // parse of an empty buffer.
            let parsed = if self.read_buf.is_empty() {
                None
            } else {
                parse_head(&mut self.read_buf, method)?
            };
            match parsed {
                Some(head) if head.response.status().is_informational() => {
                    if head.response.status() == StatusCode::SWITCHING_PROTOCOLS {
                        return Err(Error::new(Kind::Malformed("an unasked protocol switch")));
                    }
                }
                Some(head) => return Ok(head),
                None if self.read_buf.len() >= MAX_HEAD => {
                    return Err(Error::new(Kind::Malformed("a head too large")));
                }
                None => {
                    let empty = self.read_buf.is_empty();
                    let n = std::future::poll_fn(|cx| self.poll_read_more(cx))
                        .await
                        .map_err(|e| Error::with(Kind::Read, e))?;
                    if n == 0 {
                        return Err(Error::new(if empty {
                            Kind::ClosedBeforeAnswer
                        } else {
                            Kind::Malformed("a head cut short")
                        }));
                    }
                }
            }
        }
    }

    fn poll_read_more(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.read_buf.capacity() - self.read_buf.len() < READ_SIZE / 4 {
            // Reclaims the buffer when every piece taken from it is gone.
            self.read_buf.reserve(READ_SIZE);
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.read_buf)
    }
}

/// The head at the front of `buf`, taken out of it; `None` while incomplete.
fn parse_head(buf: &mut BytesMut, method: &Method) -> Result<Option<Head>, Error> {
    // Uninitialised room for the fields: zeroing 100 of them would cost more than parsing
    // a typical head.
    let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut []);
    // Parsed in a frozen copy of the buffer (the same bytes, shared), so that the header
    // values can be slices of it rather than copies.
    let data = buf.split().freeze();
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut parsed,
        &data,
        &mut fields,
    ) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => {
            // Back as it was (`split` left the buffer's spare room, so no allocation).
            buf.extend_from_slice(&data);
            return Ok(None);
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Error::new(Kind::Malformed("too many header fields")));
        }
        Err(_) => return Err(Error::new(Kind::Malformed("an invalid head"))),
    };
    let status = StatusCode::from_u16(parsed.code.unwrap_or(0))
        .map_err(|_| Error::new(Kind::Malformed("an invalid status")))?;
    let version = match parsed.version {
        Some(1) => Version::HTTP_11,
        _ => Version::HTTP_10,
    };
    let mut headers = HeaderMap::with_capacity(parsed.headers.len());
    let mut close = false;
    for field in &*parsed.headers {
        // `Connection: keep-alive` or `close`, and `Keep-Alive`, describe this connection
        // only (RFC 9110 §7.6.1): read here, and not handed on (the usual upstream answer
        // carries `Connection: keep-alive`, which would otherwise be parsed into the map
        // only to be removed from it). A `Connection` listing other fields is kept, for
        // the proxy to remove what it names.
        let name = field.name.as_bytes();
        if name.eq_ignore_ascii_case(b"connection") {
            let mut others = false;
            for token in field.value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if !token.eq_ignore_ascii_case(b"keep-alive") && !token.is_empty() {
                    others = true;
                }
            }
            if !others {
                continue;
            }
        } else if name.eq_ignore_ascii_case(b"keep-alive") {
            continue;
        }
        let name = HeaderName::from_bytes(name)
            .map_err(|_| Error::new(Kind::Malformed("an invalid header name")))?;
        let value = HeaderValue::from_maybe_shared(data.slice_ref(field.value))
            .map_err(|_| Error::new(Kind::Malformed("an invalid header value")))?;
        headers.append(name, value);
    }
    // What came after the head (the body's first bytes, usually all of a small one) goes
    // back for the body's decoder.
    buf.extend_from_slice(&data[len..]);
    let framing = codec::response_framing(method, status.as_u16(), &headers)
        .map_err(|e| Error::with(Kind::Framing, e))?;
    let keep_alive = version == Version::HTTP_11 && framing != Framing::UntilClose && !close;
    let mut response = Response::new(());
    *response.status_mut() = status;
    *response.version_mut() = version;
    *response.headers_mut() = headers;
    Ok(Some(Head {
        response,
        framing,
        keep_alive,
    }))
}

/// Writes one request: its head, then its body with the framing chosen from the body's
/// size hint. Kept across a failed first write, so the same request can go out on
/// another connection.
#[derive(Debug)]
pub(crate) struct RequestWriter {
    /// Encoded and not yet written: the head, framing, small body pieces.
    buf: BytesMut,
    /// A large body piece taken from the body and not yet written (after `buf`).
    held: Option<Bytes>,
    /// `Some(n)`: `Content-Length`, `n` bytes still to come; `None`: chunked.
    remaining: Option<u64>,
    /// The body has ended (and its end is encoded in `buf`).
    ended: bool,
    /// A byte has been handed to the connection.
    started: bool,
}

impl RequestWriter {
    /// Encodes the head of a request with `parts`, `host` as its `Host` (when given: a
    /// `Host` in `parts`, the client's, is not sent), and the framing of `body`. The
    /// target is `prefix` (a path without a trailing `/`, or empty) followed by the URI's
    /// path and query.
    pub(crate) fn new<B: Body>(
        parts: &http::request::Parts,
        prefix: &str,
        host: Option<&HeaderValue>,
        body: &B,
    ) -> Self {
        let exact = if body.is_end_stream() {
            Some(0)
        } else {
            body.size_hint().exact()
        };
        let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        let size = parts
            .headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 4)
            .sum::<usize>()
            + prefix.len()
            + target.len()
            + 128;
        let mut buf = BytesMut::with_capacity(size);
        buf.extend_from_slice(parts.method.as_str().as_bytes());
        buf.extend_from_slice(b" ");
        buf.extend_from_slice(prefix.as_bytes());
        buf.extend_from_slice(target.as_bytes());
        buf.extend_from_slice(b" HTTP/1.1\r\n");
        if let Some(host) = host {
            put_field(&mut buf, b"host", host.as_bytes());
        }
        for (name, value) in &parts.headers {
            // The framing is ours, from the body we actually send.
            let ours = name == header::CONTENT_LENGTH
                || name == header::TRANSFER_ENCODING
                || (name == header::HOST && host.is_some());
            if !ours {
                put_field(&mut buf, name.as_str().as_bytes(), value.as_bytes());
            }
        }
        match exact {
            // As hyper: a method that defines no meaning for a body gets no length field.
            Some(0) if !has_body_semantics(&parts.method) => {}
            Some(n) => put_content_length(&mut buf, n),
            None => put_field(&mut buf, b"transfer-encoding", b"chunked"),
        }
        buf.extend_from_slice(b"\r\n");
        let ended = exact == Some(0);
        Self {
            buf,
            held: None,
            remaining: exact,
            ended,
            started: false,
        }
    }

    /// Writes the request to `conn`: the head and whatever of the body is ready in one
    /// write, then the rest of the body as it comes.
    ///
    /// # Errors
    ///
    /// The connection failing ([`Error::is_unsent`] when its very first write failed on a
    /// connection where that means not a byte of the request left: `self` can then be
    /// written to another connection), the body failing, or the body not matching its
    /// announced length.
    pub(crate) async fn write<T, B>(
        &mut self,
        conn: &mut Connection<T>,
        mut body: Pin<&mut B>,
    ) -> Result<(), Error>
    where
        T: AsyncRead + AsyncWrite + Unpin,
        B: Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        loop {
            // Take what the body has ready now, up to a write's worth.
            while !self.ended && self.held.is_none() && self.buf.len() < COPY_MAX {
                let frame = std::future::poll_fn(|cx| Poll::Ready(body.as_mut().poll_frame(cx)));
                match frame.await {
                    Poll::Ready(frame) => self.push(frame)?,
                    Poll::Pending => break,
                }
            }
            if self.buf.is_empty() && self.held.is_none() {
                if self.ended {
                    return conn
                        .io
                        .flush()
                        .await
                        .map_err(|e| Error::with(Kind::Write, e));
                }
                // Nothing to write: wait for the body.
                let frame = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await;
                self.push(frame)?;
                continue;
            }
            self.flush(conn).await?;
        }
    }

    /// Adds a frame of the body (`None`: its end).
    fn push<E: Into<BoxError>>(
        &mut self,
        frame: Option<Result<Frame<Bytes>, E>>,
    ) -> Result<(), Error> {
        let data = match frame {
            None => {
                match self.remaining {
                    Some(0) => {}
                    Some(_) => return Err(Error::new(Kind::BodyLength)),
                    None => self.buf.extend_from_slice(codec::LAST_CHUNK),
                }
                self.ended = true;
                return Ok(());
            }
            Some(Err(e)) => return Err(Error::with(Kind::Body, e.into())),
            // Trailers are not forwarded.
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) if !data.is_empty() => data,
                _ => return Ok(()),
            },
        };
        match &mut self.remaining {
            Some(left) => {
                *left = left
                    .checked_sub(data.len() as u64)
                    .ok_or(Error::new(Kind::BodyLength))?;
            }
            None => codec::encode_chunk_head(data.len(), &mut self.buf),
        }
        if data.len() <= COPY_MAX {
            self.buf.extend_from_slice(&data);
            if self.remaining.is_none() {
                self.buf.extend_from_slice(codec::CHUNK_END);
            }
        } else {
            self.held = Some(data);
        }
        Ok(())
    }

    /// Writes `buf`, then the held piece (and its chunk's end).
    async fn flush<T: AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Connection<T>,
    ) -> Result<(), Error> {
        while !self.buf.is_empty() {
            match conn.io.write(&self.buf).await {
                Ok(0) => {
                    return Err(Error::with(
                        Kind::Write,
                        io::Error::from(io::ErrorKind::WriteZero),
                    ));
                }
                Ok(n) => {
                    self.started = true;
                    self.buf.advance(n);
                }
                // Not a byte of this request was accepted: it may go out elsewhere.
                Err(e) if !self.started && conn.failed_write_sent_nothing => {
                    return Err(Error::with(Kind::Unsent, e));
                }
                Err(e) => return Err(Error::with(Kind::Write, e)),
            }
        }
        if let Some(data) = self.held.take() {
            conn.io
                .write_all(&data)
                .await
                .map_err(|e| Error::with(Kind::Write, e))?;
            if self.remaining.is_none() {
                self.buf.extend_from_slice(codec::CHUNK_END);
            }
        }
        // The head went out in full: shrink what stays allocated for the body's pieces.
        if self.buf.capacity() > COPY_MAX + READ_SIZE {
            self.buf = BytesMut::new();
        }
        Ok(())
    }
}

/// Methods for which an empty body is still announced (`content-length: 0`), as hyper
/// does: all but those that define no meaning for a request body.
fn has_body_semantics(method: &Method) -> bool {
    !matches!(
        *method,
        Method::GET
            | Method::HEAD
            | Method::DELETE
            | Method::OPTIONS
            | Method::CONNECT
            | Method::TRACE
    )
}

/// A response body read from its connection as it is polled.
#[derive(Debug)]
pub(crate) struct ResponseBody<T> {
    /// The whole body, already read with the head (the connection is done).
    whole: Option<Bytes>,
    /// Reading the body; `None` once it ended or failed.
    conn: Option<Connection<T>>,
    decoder: BodyDecoder,
    keep_alive: bool,
    /// The connection after a clean end, when it may take another request.
    reusable: Option<Connection<T>>,
}

impl<T: AsyncRead + AsyncWrite + Unpin> ResponseBody<T> {
    /// The body of the response whose `head` was just read from `conn`.
    pub(crate) fn new(mut conn: Connection<T>, head: &Head) -> Self {
        let mut decoder = BodyDecoder::new(head.framing);
        let mut whole = None;
        // A body that came in with its head (the usual small answer) is taken at once, so
        // the connection goes back before the body is even forwarded.
        if let Some(n) = decoder.exact_remaining().filter(|&n| n > 0) {
            if conn.read_buf.len() as u64 >= n {
                if let Ok(Decoded::Data(data)) = decoder.decode(&mut conn.read_buf) {
                    whole = Some(data);
                }
            }
        }
        let mut body = Self {
            whole,
            conn: Some(conn),
            decoder,
            keep_alive: head.keep_alive,
            reusable: None,
        };
        if body.decoder.is_end() {
            body.finish();
        }
        body
    }

    /// The connection, once the body has ended cleanly and it may take another request.
    pub(crate) fn take_reusable(&mut self) -> Option<Connection<T>> {
        self.reusable.take()
    }

    /// The whole body, when it came with the head and the connection is done with (back in
    /// the pool after [`Self::take_reusable`], or closed): `Err(self)` while the body still
    /// has to be read from the connection.
    pub(crate) fn into_whole(self) -> Result<Option<Bytes>, Self> {
        if self.conn.is_none() && self.reusable.is_none() && self.decoder.is_end() {
            Ok(self.whole)
        } else {
            Err(self)
        }
    }

    fn finish(&mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        // A byte after the end is one no request asked for: the connection cannot be
        // trusted with another exchange.
        if self.keep_alive && conn.read_buf.is_empty() {
            if conn.read_buf.capacity() > MAX_IDLE_BUFFER {
                conn.read_buf = BytesMut::new();
            }
            self.reusable = Some(conn);
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> Body for ResponseBody<T> {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        if let Some(data) = self.whole.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        let this = &mut *self;
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match this.decoder.decode(&mut conn.read_buf) {
                Ok(Decoded::Data(data)) => {
                    if this.decoder.is_end() {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(Decoded::End) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(Decoded::NeedMore) => {}
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(Error::with(Kind::Body, e))));
                }
            }
            match ready!(conn.poll_read_more(cx)) {
                Ok(0) => {
                    // Closed: the end of a body read to the close, else a cut body.
                    this.conn = None;
                    return match this.decoder.eof() {
                        Ok(()) => Poll::Ready(None),
                        Err(e) => Poll::Ready(Some(Err(Error::with(Kind::Body, e)))),
                    };
                }
                Ok(_) => {}
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(Error::with(Kind::Read, e))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.whole.is_none() && self.decoder.is_end()
    }

    fn size_hint(&self) -> SizeHint {
        let whole = self.whole.as_ref().map_or(0, |data| data.len() as u64);
        match self.decoder.exact_remaining() {
            Some(n) => SizeHint::with_exact(whole + n),
            None => SizeHint::default(),
        }
    }
}

/// An exchange with the upstream failed. Its `Display` names the step, never a byte of
/// what was exchanged.
#[derive(Debug)]
pub(crate) struct Error {
    kind: Kind,
    source: Option<BoxError>,
}

#[derive(Debug)]
enum Kind {
    /// The first write failed: not a byte of the request left.
    Unsent,
    Write,
    Read,
    /// The request body failed, or the response body could not be decoded.
    Body,
    /// The request body did not match the length announced for it.
    BodyLength,
    /// The connection closed before a byte of an answer.
    ClosedBeforeAnswer,
    Malformed(&'static str),
    Framing,
}

impl Error {
    fn new(kind: Kind) -> Self {
        Self { kind, source: None }
    }

    fn with(kind: Kind, source: impl Into<BoxError>) -> Self {
        Self {
            kind,
            source: Some(source.into()),
        }
    }

    /// Not a byte of the request reached the connection: it may be sent on another.
    pub(crate) fn is_unsent(&self) -> bool {
        matches!(self.kind, Kind::Unsent)
    }

    /// Writing to the connection failed after some of the request left: the upstream may
    /// have answered already (and closed without taking the rest).
    pub(crate) fn is_write(&self) -> bool {
        matches!(self.kind, Kind::Write)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            Kind::Unsent | Kind::Write => f.write_str("writing the request to the upstream failed"),
            Kind::Read => f.write_str("reading from the upstream failed"),
            Kind::Body => f.write_str("a message body failed"),
            Kind::BodyLength => f.write_str("the request body did not match its length"),
            Kind::ClosedBeforeAnswer => {
                f.write_str("the upstream closed the connection without an answer")
            }
            Kind::Malformed(what) => write!(f, "the upstream answered with {what}"),
            Kind::Framing => f.write_str("the upstream's answer has an untrustworthy length"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use tokio::io::{AsyncReadExt, DuplexStream, duplex};

    use super::*;

    /// A request body of given pieces, with or without its exact size known.
    struct Pieces {
        pieces: VecDeque<Bytes>,
        exact: bool,
    }

    impl Pieces {
        fn new(pieces: &[&'static [u8]], exact: bool) -> Self {
            Self {
                pieces: pieces.iter().map(|p| Bytes::from_static(p)).collect(),
                exact,
            }
        }
    }

    impl Body for Pieces {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.pieces.pop_front().map(|p| Ok(Frame::data(p))))
        }

        fn is_end_stream(&self) -> bool {
            self.pieces.is_empty()
        }

        fn size_hint(&self) -> SizeHint {
            if self.exact {
                SizeHint::with_exact(self.pieces.iter().map(|p| p.len() as u64).sum())
            } else {
                SizeHint::default()
            }
        }
    }

    fn parts(method: Method, uri: &str) -> http::request::Parts {
        let (mut parts, ()) = http::Request::builder()
            .method(method)
            .uri(uri)
            .header("x-one", "1")
            .header("content-length", "999")
            .body(())
            .unwrap()
            .into_parts();
        parts.headers.append("x-one", HeaderValue::from_static("2"));
        parts
    }

    /// Writes the request below the upstream path `/api` and returns the bytes the upstream
    /// side received.
    async fn written(parts: &http::request::Parts, mut body: Pieces) -> String {
        let (near, mut far) = duplex(64 * 1024);
        let mut conn = Connection::new(near, true);
        let host = HeaderValue::from_static("upstream.test");
        let mut writer = RequestWriter::new(parts, "/api", Some(&host), &body);
        writer.write(&mut conn, Pin::new(&mut body)).await.unwrap();
        drop(conn);
        let mut out = String::new();
        far.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn a_body_of_known_size_is_sent_with_its_length_behind_the_head() {
        let mut parts = parts(Method::POST, "http://upstream.test/v4/chat?x=1");
        // The client's `Host` names the proxy: the upstream's goes in its place.
        parts
            .headers
            .insert(header::HOST, HeaderValue::from_static("proxy.test"));
        let out = written(&parts, Pieces::new(&[b"{\"a\"", b":1}"], true)).await;
        assert_eq!(
            out,
            "POST /api/v4/chat?x=1 HTTP/1.1\r\nhost: upstream.test\r\nx-one: 1\r\nx-one: 2\r\n\
             content-length: 7\r\n\r\n{\"a\":1}"
        );
    }

    #[tokio::test]
    async fn a_body_of_unknown_size_is_chunked() {
        let parts = parts(Method::POST, "/stream");
        let out = written(&parts, Pieces::new(&[b"hello", b"", b" world"], false)).await;
        assert!(
            out.ends_with(
                "transfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
            )
        );
        assert!(!out.contains("content-length"), "{out}");
    }

    #[tokio::test]
    async fn an_empty_body_is_announced_only_where_a_body_means_something() {
        let get = written(&parts(Method::GET, "/"), Pieces::new(&[], true)).await;
        assert!(get.ends_with("x-one: 2\r\n\r\n"), "{get}");
        let post = written(&parts(Method::POST, "/"), Pieces::new(&[], true)).await;
        assert!(post.ends_with("content-length: 0\r\n\r\n"), "{post}");
    }

    #[tokio::test]
    async fn a_body_longer_than_its_size_is_an_error() {
        struct Lying(Pieces);
        impl Body for Lying {
            type Data = Bytes;
            type Error = std::convert::Infallible;
            fn poll_frame(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
            ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
                Pin::new(&mut self.0).poll_frame(cx)
            }
            fn size_hint(&self) -> SizeHint {
                SizeHint::with_exact(3)
            }
        }
        let (near, _far) = duplex(1024);
        let mut conn = Connection::new(near, true);
        let mut body = Lying(Pieces::new(&[b"four"], false));
        let mut writer = RequestWriter::new(&parts(Method::POST, "/"), "", None, &body);
        let error = writer
            .write(&mut conn, Pin::new(&mut body))
            .await
            .unwrap_err();
        assert!(matches!(error.kind, Kind::BodyLength), "{error:?}");
    }

    #[tokio::test]
    async fn a_request_whose_first_write_failed_goes_out_whole_on_another_connection() {
        let parts = parts(Method::POST, "/again");
        let mut body = Pieces::new(&[b"payload"], true);
        let mut writer = RequestWriter::new(&parts, "", None, &body);

        let (near, far) = duplex(1024);
        drop(far); // closed by the upstream while idle
        let mut closed = Connection::new(near, true);
        let error = writer
            .write(&mut closed, Pin::new(&mut body))
            .await
            .unwrap_err();
        assert!(error.is_unsent(), "{error:?}");

        let (near, mut far) = duplex(1024);
        let mut fresh = Connection::new(near, true);
        writer.write(&mut fresh, Pin::new(&mut body)).await.unwrap();
        drop(fresh);
        let mut out = String::new();
        far.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("POST /again HTTP/1.1\r\n"), "{out}");
        assert!(out.ends_with("content-length: 7\r\n\r\npayload"), "{out}");
    }

    #[tokio::test]
    async fn a_failed_first_write_is_not_unsent_where_it_may_have_sent_a_part() {
        let mut body = Pieces::new(&[b"payload"], true);
        let mut writer = RequestWriter::new(&parts(Method::POST, "/"), "", None, &body);
        let (near, far) = duplex(1024);
        drop(far);
        let mut tls_like = Connection::new(near, false);
        let error = writer
            .write(&mut tls_like, Pin::new(&mut body))
            .await
            .unwrap_err();
        assert!(!error.is_unsent(), "{error:?}");
    }

    #[tokio::test]
    async fn a_write_failing_after_the_first_bytes_is_not_unsent() {
        // Room for part of the head only: the rest fails once the upstream is gone.
        let (near, mut far) = duplex(8);
        let mut conn = Connection::new(near, true);
        let mut body = Pieces::new(&[b"payload"], true);
        let mut writer = RequestWriter::new(&parts(Method::POST, "/"), "", None, &body);
        let upstream = tokio::spawn(async move {
            let mut first = [0u8; 8];
            far.read_exact(&mut first).await.unwrap();
            // Gone after reading 8 bytes.
        });
        let error = writer
            .write(&mut conn, Pin::new(&mut body))
            .await
            .unwrap_err();
        upstream.await.unwrap();
        assert!(!error.is_unsent(), "{error:?}");
    }

    async fn connection_with(answer: &'static [u8]) -> (Connection<DuplexStream>, DuplexStream) {
        let (near, mut far) = duplex(64 * 1024);
        far.write_all(answer).await.unwrap();
        (Connection::new(near, true), far)
    }

    #[tokio::test]
    async fn interim_answers_are_skipped_and_the_head_is_parsed() {
        let (mut conn, _far) = connection_with(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nx-a: 1\r\nx-a: 2\r\n\
              content-length: 5\r\n\r\nhello",
        )
        .await;
        let head = conn.read_head(&Method::POST).await.unwrap();
        assert_eq!(head.response.status(), 201);
        assert_eq!(head.response.headers().get_all("x-a").iter().count(), 2);
        assert_eq!(head.framing, Framing::Length(5));
        assert!(head.keep_alive);
        let mut body = ResponseBody::new(conn, &head);
        // The body came with the head: the connection is free at once.
        assert!(body.take_reusable().is_some());
        assert_eq!(body.size_hint().exact(), Some(5));
    }

    #[tokio::test]
    async fn connection_close_and_http_1_0_are_not_kept_alive() {
        for answer in [
            &b"HTTP/1.1 200 OK\r\nconnection: keep-alive, Close\r\ncontent-length: 0\r\n\r\n"[..],
            b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n\r\n",
        ] {
            let (mut conn, _far) = connection_with(answer).await;
            let head = conn.read_head(&Method::GET).await.unwrap();
            assert!(!head.keep_alive, "{answer:?}");
            let mut body = ResponseBody::new(conn, &head);
            assert!(body.take_reusable().is_none());
        }
    }

    #[tokio::test]
    async fn the_fields_of_this_connection_are_read_here_and_not_handed_on() {
        let (mut conn, _far) = connection_with(
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\
              x-a: 1\r\ncontent-length: 0\r\n\r\n",
        )
        .await;
        let head = conn.read_head(&Method::GET).await.unwrap();
        assert!(head.keep_alive);
        let names: Vec<_> = head.response.headers().keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["x-a", "content-length"]);

        // A `Connection` naming other fields stays, for the proxy to remove them.
        let (mut conn, _far) = connection_with(
            b"HTTP/1.1 200 OK\r\nConnection: close, x-trace\r\nx-trace: 1\r\n\
              content-length: 0\r\n\r\n",
        )
        .await;
        let head = conn.read_head(&Method::GET).await.unwrap();
        assert!(!head.keep_alive);
        assert_eq!(head.response.headers()["connection"], "close, x-trace");
    }

    #[tokio::test]
    async fn too_many_header_fields_are_refused() {
        let mut answer = b"HTTP/1.1 200 OK\r\n".to_vec();
        for n in 0..=MAX_HEADERS {
            answer.extend_from_slice(format!("x-{n}: v\r\n").as_bytes());
        }
        answer.extend_from_slice(b"\r\n");
        let (near, mut far) = duplex(64 * 1024);
        far.write_all(&answer).await.unwrap();
        let mut conn = Connection::new(near, true);
        let error = conn.read_head(&Method::GET).await.unwrap_err();
        assert_eq!(
            error.to_string(),
            "the upstream answered with too many header fields"
        );
    }

    #[tokio::test]
    async fn a_head_past_the_bound_is_refused() {
        let (near, mut far) = duplex(256 * 1024);
        let mut answer = b"HTTP/1.1 200 OK\r\nx-long: ".to_vec();
        answer.resize(MAX_HEAD + 10, b'a');
        far.write_all(&answer).await.unwrap();
        let mut conn = Connection::new(near, true);
        let error = conn.read_head(&Method::GET).await.unwrap_err();
        assert_eq!(
            error.to_string(),
            "the upstream answered with a head too large"
        );
    }

    #[tokio::test]
    async fn a_closed_or_chatty_idle_connection_is_not_usable() {
        let (near, far) = duplex(1024);
        let mut quiet = Connection::new(near, true);
        assert!(quiet.is_usable());
        drop(far);
        assert!(!quiet.is_usable(), "closed by the upstream");

        let (near, mut far) = duplex(1024);
        let mut chatty = Connection::new(near, true);
        far.write_all(b"H").await.unwrap();
        assert!(!chatty.is_usable(), "bytes nobody asked for");
    }

    #[tokio::test]
    async fn a_body_read_as_it_comes_frees_the_connection_at_its_end() {
        let (near, mut far) = duplex(1024);
        let mut conn = Connection::new(near, true);
        far.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n")
            .await
            .unwrap();
        let head = conn.read_head(&Method::GET).await.unwrap();
        let mut body = ResponseBody::new(conn, &head);
        let first = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
        assert_eq!(first.unwrap().unwrap().into_data().unwrap(), "abc");
        assert!(body.take_reusable().is_none(), "not ended yet");
        far.write_all(b"0\r\n\r\n").await.unwrap();
        let end = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
        assert!(end.is_none());
        assert!(body.is_end_stream());
        assert!(body.take_reusable().is_some());
    }
}
