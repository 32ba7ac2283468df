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

mod body;
mod write;

use std::fmt;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::BytesMut;
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method, Response, StatusCode, Version};
use tokio::io::{AsyncRead, AsyncWrite};
use tower::BoxError;

use super::codec::{self, Framing};
use super::common::{MAX_HEAD, MAX_HEADERS};

pub(crate) use self::body::ResponseBody;
pub(crate) use self::write::RequestWriter;

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
mod tests;
