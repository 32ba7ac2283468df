//! Requests written to the upstream ([`RequestWriter`]): the head and a small body in
//! one write; the body framed by its exact size when known, chunked otherwise.

use std::io;
use std::pin::Pin;
use std::task::Poll;

use bytes::{Buf, Bytes, BytesMut};
use http::Method;
use http::header::{self, HeaderValue};
use http_body::{Body, Frame};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use tower::BoxError;

use super::{COPY_MAX, Connection, Error, Kind, READ_SIZE};
use crate::h1::codec;
use crate::h1::common::{put_content_length, put_field};

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
