//! A request body as the handler reads it ([`ReceivedBody`]): whole from the head's
//! buffer, or streamed from the connection by a [`Pump`] through a [`Pipe`].

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker, ready};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use tokio::io::AsyncRead;
use tower::BoxError;

use super::{BODY_READ, poll_read};
use crate::h1::codec::{BodyDecoder, Decoded};

/// What the connection and a streamed request body share: at most one chunk in transit
/// (the connection reads on only once the handler took it: back-pressure).
#[derive(Default)]
pub(super) struct Pipe {
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
pub(super) struct Pump {
    pub(super) decoder: BodyDecoder,
    pub(super) pipe: Arc<Pipe>,
    /// `100 Continue` owed once the handler asks for the body.
    pub(super) send_continue: bool,
    /// The body's end was read (the connection can carry the next request).
    pub(super) finished: bool,
    /// The body is cut short or malformed, or the handler dropped it first: the
    /// connection closes after the answer.
    pub(super) broken: bool,
}

impl Pump {
    /// Feeds the body; Ready once nothing more will be read for it.
    pub(super) fn poll<T: AsyncRead + Unpin>(
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
    pub(super) fn settle_if_dropped(&mut self, buf: &mut BytesMut) {
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
pub(super) enum BodyError {
    Closed(String),
    Invalid(String),
}

/// A request body as the handler reads it: empty, whole (it came with the head), streamed
/// from the connection, or an HTTP/2 stream's (hyper's).
#[cfg_attr(feature = "fuzzing", visibility::make(pub))]
#[derive(Debug)]
pub(crate) struct ReceivedBody {
    pub(super) kind: Kind,
}

pub(super) enum Kind {
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
