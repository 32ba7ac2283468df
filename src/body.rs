//! [`TrackedBody`]: keeps the key in flight until the response body is done.

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::pool::Lease;

pin_project! {
    /// Response body of [`KeyRotation`](crate::KeyRotation).
    ///
    /// The request counts as in flight on its key until this body yields its last frame,
    /// yields an error, or is dropped, so a streamed (SSE) answer keeps its key busy for as
    /// long as it streams.
    pub struct TrackedBody<B>
    where
        B: Body,
    {
        #[pin]
        inner: Inner<B>,
        // What the classifier read ahead, replayed first. Boxed: only the rare path (an
        // error body the classifier reads) has any, and a body is moved several times.
        replay: Option<Box<Replay<B>>>,
        lease: Option<Lease>,
    }
}

pin_project! {
    #[project = InnerProj]
    #[project_ref = InnerRef]
    enum Inner<B> {
        // The common case: the body as the inner service gave it.
        Direct { #[pin] body: B },
        // A body the classifier read ahead (boxed to be polled before it got here).
        Boxed { body: Pin<Box<B>> },
    }
}

/// Frames read ahead for the classifier, and an error met while reading ahead (yielded
/// after the frames).
struct Replay<B: Body> {
    frames: VecDeque<Frame<B::Data>>,
    error: Option<B::Error>,
}

impl<B: Body> Replay<B> {
    fn is_empty(&self) -> bool {
        self.frames.is_empty() && self.error.is_none()
    }
}

type FrameResult<B> = Result<Frame<<B as Body>::Data>, <B as Body>::Error>;

impl<B: Body> From<B> for TrackedBody<B> {
    fn from(body: B) -> Self {
        Self {
            inner: Inner::Direct { body },
            replay: None,
            lease: None,
        }
    }
}

impl<B: Body> TrackedBody<B> {
    pub(crate) fn replaying(
        body: Pin<Box<B>>,
        replay: VecDeque<Frame<B::Data>>,
        error: Option<B::Error>,
    ) -> Self {
        Self {
            inner: Inner::Boxed { body },
            replay: Some(Box::new(Replay {
                frames: replay,
                error,
            })),
            lease: None,
        }
    }

    /// Attaches the lease; a body that is already over (e.g. empty) may never be polled,
    /// so it releases at once.
    pub(crate) fn track(mut self, lease: Lease) -> Self {
        if !self.is_end_stream() {
            self.lease = Some(lease);
        }
        self
    }

    /// Yields the frames read ahead, then the error met reading ahead, if any.
    fn poll_replay(self: Pin<&mut Self>) -> Option<Poll<Option<FrameResult<B>>>> {
        let this = self.project();
        let replay = this.replay.as_mut()?;
        if let Some(frame) = replay.frames.pop_front() {
            if replay.is_empty() && inner_ended(&this.inner) {
                // The last frame of a body that has ended: the caller, seeing the end, may
                // never poll again, so the key is free now (as for a body not read ahead).
                *this.replay = None;
                drop(this.lease.take());
            }
            return Some(Poll::Ready(Some(Ok(frame))));
        }
        let error = replay.error.take();
        // Replayed: the body goes on as if it had never been read ahead.
        *this.replay = None;
        let error = error?;
        drop(this.lease.take());
        Some(Poll::Ready(Some(Err(error))))
    }
}

impl<B: Body> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        if let Some(replayed) = self.as_mut().poll_replay() {
            return replayed;
        }
        let this = self.project();
        let (frame, ended) = match this.inner.project() {
            InnerProj::Direct { mut body } => {
                let frame = ready!(body.as_mut().poll_frame(cx));
                (frame, body.is_end_stream())
            }
            InnerProj::Boxed { body } => {
                let frame = ready!(body.as_mut().poll_frame(cx));
                (frame, body.is_end_stream())
            }
        };
        let done = match &frame {
            Some(Ok(_)) => ended,
            None | Some(Err(_)) => true,
        };
        if done {
            // Ended or failed: the key is free again.
            drop(this.lease.take());
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.replay.as_ref().is_none_or(|replay| replay.is_empty()) && inner_ended(&self.inner)
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = match &self.inner {
            Inner::Direct { body } => body.size_hint(),
            Inner::Boxed { body } => body.size_hint(),
        };
        let replayed: u64 = self
            .replay
            .iter()
            .flat_map(|replay| replay.frames.iter())
            .filter_map(|frame| frame.data_ref())
            .map(|data| bytes::Buf::remaining(data) as u64)
            .sum();
        if replayed > 0 {
            // Upper first: `set_lower` asserts the new lower bound is not above the upper
            // one (an exact hint, from a Content-Length, would panic otherwise).
            if let Some(upper) = hint.upper() {
                hint.set_upper(upper.saturating_add(replayed));
            }
            hint.set_lower(hint.lower().saturating_add(replayed));
        }
        hint
    }
}

fn inner_ended<B: Body>(inner: &Inner<B>) -> bool {
    match inner {
        Inner::Direct { body } => body.is_end_stream(),
        Inner::Boxed { body } => body.is_end_stream(),
    }
}

impl<B: Body> fmt::Debug for TrackedBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrackedBody")
            .field("lease", &self.lease)
            .field(
                "replay_frames",
                &self.replay.as_ref().map_or(0, |replay| replay.frames.len()),
            )
            .finish()
    }
}
