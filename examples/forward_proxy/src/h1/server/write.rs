//! Answers: a response's head and body written to the connection (see the module docs
//! of `server` for the framing chosen).

use std::future::poll_fn;
use std::io;
use std::pin::pin;
use std::task::Poll;

use bytes::{Bytes, BytesMut};
use http::header;
use http::{Method, Response, Version};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncWrite};
use tower::BoxError;

use super::body::Pump;
use super::{Conn, WRITE_HIGH, date};
use crate::h1::codec::{self, Framing};
use crate::h1::common::{put_content_length, put_field};

impl<T: AsyncRead + AsyncWrite + Unpin> Conn<T> {
    /// Writes the answer: `Ok(true)` if the connection may carry another request.
    pub(super) async fn write_response<B>(
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
