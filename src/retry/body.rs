//! [`ReplayBody`]: a request body that can be sent more than once, when it is small.

use std::fmt;
use std::future::poll_fn;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

pin_project! {
    /// A request body that is either held in memory, and so can be sent again, or streamed
    /// through once.
    ///
    /// [`ReplayBody::buffer`] reads a body into memory up to a size limit; past the limit
    /// the body streams through unchanged (what was read first included) and the request is
    /// simply not retried. Only [`ReplayBody::try_clone`] tells the two apart.
    ///
    /// # Examples
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http_body_util::Full;
    /// use tower_key_rotation::retry::ReplayBody;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let small = ReplayBody::buffer(Full::new(Bytes::from("{}")), 1024).await.unwrap();
    /// assert!(small.try_clone().is_some());
    ///
    /// let large = ReplayBody::buffer(Full::new(Bytes::from(vec![0; 2048])), 1024).await.unwrap();
    /// assert!(large.try_clone().is_none());
    /// # }
    /// ```
    pub struct ReplayBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        // Both fields are taken as they are sent; a clone is made before that.
        Buffered {
            data: Option<Bytes>,
            trailers: Option<HeaderMap>,
        },
        Streaming {
            prefix: Option<Bytes>,
            #[pin]
            rest: B,
        },
    }
}

impl<B> ReplayBody<B> {
    /// A body held in memory: it can be replayed.
    pub fn buffered(data: Bytes) -> Self {
        Self::from_parts(data, None)
    }

    fn from_parts(data: Bytes, trailers: Option<HeaderMap>) -> Self {
        Self {
            kind: Kind::Buffered {
                data: (!data.is_empty()).then_some(data),
                trailers,
            },
        }
    }

    /// A body streamed through once: a request carrying it is never retried.
    pub fn streaming(body: B) -> Self {
        Self::streaming_after(Bytes::new(), body)
    }

    fn streaming_after(prefix: Bytes, rest: B) -> Self {
        Self {
            kind: Kind::Streaming {
                prefix: (!prefix.is_empty()).then_some(prefix),
                rest,
            },
        }
    }

    /// A copy of a buffered body, or `None` for a streaming one.
    pub fn try_clone(&self) -> Option<Self> {
        match &self.kind {
            Kind::Buffered { data, trailers } => Some(Self {
                kind: Kind::Buffered {
                    data: data.clone(),
                    trailers: trailers.clone(),
                },
            }),
            Kind::Streaming { .. } => None,
        }
    }

    /// The whole body, if it is held in memory (empty for an empty body); `None` for a
    /// streaming one. For a layer outside that reads the request (its model, say) before
    /// the key is chosen.
    pub fn buffered_bytes(&self) -> Option<&[u8]> {
        match &self.kind {
            Kind::Buffered { data, .. } => Some(data.as_deref().unwrap_or_default()),
            Kind::Streaming { .. } => None,
        }
    }

    /// Can the body be sent again ([`try_clone`](Self::try_clone) gives `Some`)?
    pub fn is_replayable(&self) -> bool {
        matches!(self.kind, Kind::Buffered { .. })
    }
}

impl<B> ReplayBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    /// Reads `body` into memory if it is at most `limit` bytes long.
    ///
    /// A body whose size hint already exceeds `limit` is not read at all; one that turns
    /// out longer while being read streams on from where reading stopped, nothing lost.
    /// Either way the result carries the whole body. (A body that is not `Unpin` can be
    /// passed as `Box::pin(body)`.)
    ///
    /// # Errors
    ///
    /// The body's own error, if reading it fails.
    pub async fn buffer(mut body: B, limit: usize) -> Result<Self, B::Error> {
        let limit_u64 = u64::try_from(limit).unwrap_or(u64::MAX);
        if body.size_hint().lower() > limit_u64 {
            return Ok(Self::streaming(body));
        }
        // A body that comes in one frame (the common small JSON body) is kept as it came:
        // no copy, and a retry's copy of it shares the bytes (for a body read from a socket,
        // hyper's buffer, which the request's header values share already). Only a second
        // frame starts a buffer of our own.
        let mut first: Option<Bytes> = None;
        let mut buf = BytesMut::new();
        let whole = |first: Option<Bytes>, buf: BytesMut| first.unwrap_or_else(|| buf.freeze());
        loop {
            let frame = poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
            let Some(frame) = frame.transpose()? else {
                return Ok(Self::from_parts(whole(first, buf), None));
            };
            match frame.into_data() {
                Ok(data) => {
                    if first.is_none() && buf.is_empty() {
                        if data.len() > limit {
                            return Ok(Self::streaming_after(data, body));
                        }
                        first = Some(data);
                        continue;
                    }
                    if let Some(first) = first.take() {
                        buf.extend_from_slice(&first);
                    }
                    buf.extend_from_slice(&data);
                    if buf.len() > limit {
                        return Ok(Self::streaming_after(buf.freeze(), body));
                    }
                }
                // Trailers are the last frame.
                Err(frame) => {
                    let trailers = frame.into_trailers().ok();
                    return Ok(Self::from_parts(whole(first, buf), trailers));
                }
            }
        }
    }
}

impl<B> Body for ReplayBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.project().kind.project() {
            KindProj::Buffered { data, trailers } => {
                if let Some(data) = data.take() {
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(t))))
            }
            KindProj::Streaming { prefix, rest } => {
                if let Some(prefix) = prefix.take() {
                    return Poll::Ready(Some(Ok(Frame::data(prefix))));
                }
                rest.poll_frame(cx)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Buffered { data, trailers } => data.is_none() && trailers.is_none(),
            Kind::Streaming { prefix, rest } => prefix.is_none() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Buffered { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Kind::Streaming { prefix, rest } => {
                let extra = prefix.as_ref().map_or(0, |p| p.len() as u64);
                let hint = rest.size_hint();
                let mut sum = SizeHint::new();
                sum.set_lower(hint.lower().saturating_add(extra));
                if let Some(upper) = hint.upper() {
                    sum.set_upper(upper.saturating_add(extra));
                }
                sum
            }
        }
    }
}

impl<B> fmt::Debug for ReplayBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The content is the caller's business (and may hold secrets): sizes only.
        match &self.kind {
            Kind::Buffered { data, .. } => f
                .debug_struct("ReplayBody::Buffered")
                .field("len", &data.as_ref().map_or(0, Bytes::len))
                .finish(),
            Kind::Streaming { .. } => f.write_str("ReplayBody::Streaming"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A body of the given frames (trailers included), of unknown total size, as a chunked
    /// upload is.
    struct Frames(Vec<Frame<Bytes>>);

    impl Body for Frames {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            if self.0.is_empty() {
                Poll::Ready(None)
            } else {
                Poll::Ready(Some(Ok(self.0.remove(0))))
            }
        }
    }

    async fn collect<B: Body<Data = Bytes> + Unpin>(mut body: B) -> Vec<u8>
    where
        B::Error: fmt::Debug,
    {
        let mut out = Vec::new();
        while let Some(frame) = poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
            if let Ok(data) = frame.unwrap().into_data() {
                out.extend_from_slice(&data);
            }
        }
        out
    }

    fn chunks(parts: &[&'static str]) -> Frames {
        Frames(
            parts
                .iter()
                .map(|p| Frame::data(Bytes::from_static(p.as_bytes())))
                .collect(),
        )
    }

    #[tokio::test]
    async fn small_chunked_body_is_buffered_and_replays_identically() {
        let body = ReplayBody::buffer(chunks(&["ab", "cd"]), 4).await.unwrap();
        assert!(body.is_replayable());
        let copy = body.try_clone().unwrap();
        assert_eq!(body.size_hint().exact(), Some(4));
        assert_eq!(collect(body).await, b"abcd");
        assert_eq!(collect(copy).await, b"abcd");
    }

    #[tokio::test]
    async fn body_over_the_limit_streams_through_without_losing_the_read_part() {
        let body = ReplayBody::buffer(chunks(&["ab", "cd", "ef"]), 3)
            .await
            .unwrap();
        assert!(!body.is_replayable());
        assert!(body.try_clone().is_none());
        assert_eq!(collect(body).await, b"abcdef");
    }

    #[tokio::test]
    async fn a_body_in_one_frame_is_kept_as_it_came_not_copied() {
        let data = Bytes::from(b"{\"model\":\"m\"}".to_vec());
        let body = ReplayBody::buffer(Frames(vec![Frame::data(data.clone())]), 64)
            .await
            .unwrap();
        let copy = body.try_clone().unwrap();
        for mut body in [body, copy] {
            let frame = poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
            let sent = frame.unwrap().unwrap().into_data().unwrap();
            assert_eq!(sent.as_ptr(), data.as_ptr(), "the same bytes, shared");
            assert_eq!(sent, data);
        }
        // Past the limit, the one frame streams through whole.
        let body = ReplayBody::buffer(Frames(vec![Frame::data(data.clone())]), 4)
            .await
            .unwrap();
        assert!(!body.is_replayable());
        assert_eq!(collect(body).await, data.to_vec());
    }

    #[tokio::test]
    async fn trailers_after_one_frame_are_kept() {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-checksum", http::HeaderValue::from_static("1"));
        let body = Frames(vec![
            Frame::data(Bytes::from_static(b"ab")),
            Frame::trailers(trailers.clone()),
        ]);
        let body = ReplayBody::buffer(body, 4).await.unwrap();
        let mut copy = body.try_clone().unwrap();
        assert_eq!(collect(body).await, b"ab");
        let mut frames = Vec::new();
        while let Some(frame) = poll_fn(|cx| Pin::new(&mut copy).poll_frame(cx)).await {
            frames.push(frame.unwrap());
        }
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[1].trailers_ref(), Some(&trailers));
    }

    #[tokio::test]
    async fn empty_body_is_replayable_and_ends_at_once() {
        let body = ReplayBody::buffer(chunks(&[]), 0).await.unwrap();
        assert!(body.is_replayable());
        assert!(body.is_end_stream());
    }

    #[test]
    fn debug_shows_the_size_not_the_content() {
        let body = ReplayBody::<Frames>::buffered(Bytes::from_static(b"secret"));
        assert_eq!(format!("{body:?}"), "ReplayBody::Buffered { len: 6 }");
    }
}
