//! A response body read from its connection as it is polled ([`ResponseBody`]), and the
//! connection handed back when it may carry another request.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite};

use super::{Connection, Error, Head, Kind, MAX_IDLE_BUFFER};
use crate::h1::codec::{BodyDecoder, Decoded};

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
