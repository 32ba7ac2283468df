//! The response body as the client gets it ([`ClientBody`]): the upstream's or the
//! proxy's own, noting a client that leaves before its end; an upstream's whose token
//! usage is counted passes through a [`CountedBody`].

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::BodyExt;
use tower::BoxError;

use super::log::log_client_gone;
use super::{RequestLabel, State};
use crate::answer::Body;
use crate::metrics::TokenCounts;
use crate::usage::estimate::{Estimated, Estimator};
use crate::usage::{Usage, UsageScan, UsageStrip};
use tower_key_rotation::pool::TokenReservation;

/// The upstream's response body, as the key layer hands it on.
pub(super) type UpstreamBody = tower_key_rotation::body::TrackedBody<crate::connections::Body>;

/// A response body as [`proxy`] leaves it: the upstream's, or the proxy's own. Kept
/// apart (not boxed) until [`handle`] has wrapped it, so that it is boxed once.
pub(super) enum ExchangeBody {
    Upstream(UpstreamBody),
    Counted(Box<CountedBody>),
    Own(Body),
}

impl ExchangeBody {
    pub(super) fn boxed(self) -> Body {
        match self {
            Self::Upstream(body) => body.boxed_unsync(),
            Self::Counted(body) => body.boxed_unsync(),
            Self::Own(body) => body,
        }
    }
}

/// An upstream's answer whose token usage is read on its way to the client, and counted
/// for its key when it ends; one that never ends (cut, or dropped by its client) is
/// counted as reporting none. With a [`UsageStrip`], what the proxy added to the stream
/// to learn its usage is taken out again.
pub(super) struct CountedBody {
    pub(super) inner: UpstreamBody,
    pub(super) scan: UsageScan,
    pub(super) strip: Option<UsageStrip>,
    /// Where to count, and for which key (1-based); `None` once counted.
    pub(super) count: Option<(Arc<TokenCounts>, usize)>,
    /// With token budgets: the reservation to settle, and the estimate to learn from.
    pub(super) settle: Option<Settle>,
    /// The upstream's body has ended (what the strip holds may still be pending).
    pub(super) upstream_done: bool,
    /// The upstream's trailers, held until the strip has passed on the data before them.
    pub(super) trailers: Option<http_body::Frame<Bytes>>,
}

/// A request's token reservation and input estimate, settled and learned from when its
/// answer reports usage. An answer cut short, or without usage, settles nothing: its
/// reservation stays charged in full.
pub(super) struct Settle {
    pub(super) reservation: Option<TokenReservation>,
    pub(super) estimated: Option<Estimated>,
    pub(super) estimator: Arc<Estimator>,
}

impl Settle {
    fn settle(self, usage: Usage) {
        if !usage.is_reported() {
            return;
        }
        let input = usage.input.unwrap_or(0);
        let creation = usage.cache_creation.unwrap_or(0);
        if let Some(reservation) = &self.reservation {
            // What providers count against tokens per minute: input (with Anthropic's
            // cache writes; its cache reads are not counted) and output.
            let used = input + creation + usage.output.unwrap_or(0);
            reservation.settle(used);
        }
        if let (Some(estimated), Some(_)) = (&self.estimated, usage.input) {
            // The whole prompt, as the provider counted it.
            let prompt = input + creation + usage.cache_read.unwrap_or(0);
            self.estimator.learn(estimated, prompt);
        }
    }
}

impl CountedBody {
    fn count(&mut self, ended: bool) {
        if let Some((counts, key)) = self.count.take() {
            let usage = ended.then(|| self.scan.usage());
            counts.record(key, usage);
            if let (Some(settle), Some(usage)) = (self.settle.take(), usage) {
                settle.settle(usage);
            }
        }
    }
}

impl http_body::Body for CountedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        use std::task::Poll;
        let this = &mut *self;
        loop {
            if let Some(strip) = &mut this.strip {
                if let Some(piece) = strip.pop() {
                    if this.upstream_done && this.trailers.is_none() && strip.is_empty() {
                        // The last piece: a client may stop reading at its end.
                        this.count(true);
                    }
                    return Poll::Ready(Some(Ok(http_body::Frame::data(piece))));
                }
            }
            if this.upstream_done {
                this.count(true);
                return Poll::Ready(this.trailers.take().map(Ok));
            }
            match std::task::ready!(std::pin::Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        // A body of known length ends with its last byte: the server
                        // may not ask for more.
                        let ended = this.inner.is_end_stream();
                        match &mut this.strip {
                            Some(strip) => {
                                strip.push(data, &mut this.scan);
                                if ended {
                                    strip.finish(&mut this.scan);
                                    this.upstream_done = true;
                                }
                            }
                            None => {
                                this.scan.feed(&data);
                                if ended {
                                    this.upstream_done = true;
                                    this.count(true);
                                }
                                return Poll::Ready(Some(Ok(http_body::Frame::data(data))));
                            }
                        }
                    }
                    // Trailers: after every data frame (what the strip holds goes first).
                    Err(trailers) => {
                        if let Some(strip) = &mut this.strip {
                            strip.finish(&mut this.scan);
                        }
                        this.upstream_done = true;
                        this.trailers = Some(trailers);
                    }
                },
                Some(Err(error)) => {
                    // Cut short: what was read is not the whole usage.
                    this.count(false);
                    return Poll::Ready(Some(Err(error)));
                }
                None => {
                    if let Some(strip) = &mut this.strip {
                        strip.finish(&mut this.scan);
                    }
                    this.upstream_done = true;
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.strip {
            None => self.inner.is_end_stream(),
            Some(strip) => self.upstream_done && self.trailers.is_none() && strip.is_empty(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self.strip {
            // Shorter than the upstream's by what is taken out.
            Some(_) => http_body::SizeHint::default(),
            None => self.inner.size_hint(),
        }
    }
}

impl Drop for CountedBody {
    fn drop(&mut self) {
        self.count(false);
    }
}

/// The response body as the client gets it: logs a client that leaves before its end.
pub(super) struct ClientBody {
    pub(super) inner: ExchangeBody,
    pub(super) gone: Option<GoneNote>,
}

/// Who to log as gone, should the client leave mid-body.
pub(super) struct GoneNote {
    pub(super) state: Arc<State>,
    pub(super) request: RequestLabel,
    pub(super) key: Option<usize>,
}

impl http_body::Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let frame = std::task::ready!(match &mut self.inner {
            ExchangeBody::Upstream(body) => std::pin::Pin::new(body).poll_frame(cx),
            ExchangeBody::Counted(body) => std::pin::Pin::new(&mut **body).poll_frame(cx),
            ExchangeBody::Own(body) => std::pin::Pin::new(body).poll_frame(cx),
        });
        if !matches!(frame, Some(Ok(_))) {
            // The end, or the upstream's failure: not the client's doing.
            self.gone = None;
        }
        std::task::Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            ExchangeBody::Upstream(body) => body.is_end_stream(),
            ExchangeBody::Counted(body) => body.is_end_stream(),
            ExchangeBody::Own(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match &self.inner {
            ExchangeBody::Upstream(body) => body.size_hint(),
            ExchangeBody::Counted(body) => body.size_hint(),
            ExchangeBody::Own(body) => body.size_hint(),
        }
    }
}

impl Drop for ClientBody {
    fn drop(&mut self) {
        if let Some(note) = self.gone.take() {
            if !http_body::Body::is_end_stream(self) {
                log_client_gone(
                    &note.state,
                    &note.request,
                    note.key,
                    "mid-response; the upstream response is dropped and the key released",
                );
            }
        }
    }
}
