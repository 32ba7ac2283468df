//! The response body as the client gets it ([`ClientBody`]): the upstream's or the
//! proxy's own, noting a client that leaves before its end.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::BodyExt;
use tower::BoxError;

use super::log::log_client_gone;
use super::{RequestLabel, State};
use crate::answer::Body;

/// The upstream's response body, as the key layer hands it on.
pub(super) type UpstreamBody = tower_key_rotation::body::TrackedBody<crate::connections::Body>;

/// A response body as [`proxy`] leaves it: the upstream's, or the proxy's own. Kept
/// apart (not boxed) until [`handle`] has wrapped it, so that it is boxed once.
pub(super) enum ExchangeBody {
    Upstream(UpstreamBody),
    Own(Body),
}

impl ExchangeBody {
    pub(super) fn boxed(self) -> Body {
        match self {
            Self::Upstream(body) => body.boxed_unsync(),
            Self::Own(body) => body,
        }
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
            ExchangeBody::Own(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match &self.inner {
            ExchangeBody::Upstream(body) => body.size_hint(),
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
