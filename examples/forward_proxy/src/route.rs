//! How the proxy routes a request within the pool ([`Routing`], [`ProxyRouter`]): the
//! bucket its provider meters it in, and the session it belongs to, read from what the
//! handler found in its body ([`BodyFields`]) and its header fields.

use http::HeaderName;
use tower_key_rotation::route::{RequestHead, Router};

use crate::handler::BodyFields;

/// What the proxy routes requests by. By default, affinity only (requests naming a
/// session go to its key). Both off: the key is chosen before the request is read, as the
/// configured strategy says, and bodies are not looked into.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Routing {
    /// Meter each key apart per model: a request's bucket is its body's top-level `model`.
    pub bucket_by_model: bool,
    /// Keep each session on one key: a request's affinity id is its body's
    /// `prompt_cache_key`, else `metadata.user_id`, else `user`, else the
    /// [`session_header`](Self::session_header).
    pub affinity: bool,
    /// The header naming a request's session, when its body names none.
    pub session_header: HeaderName,
}

impl Default for Routing {
    fn default() -> Self {
        Self {
            bucket_by_model: false,
            affinity: true,
            session_header: HeaderName::from_static("x-session-id"),
        }
    }
}

impl Routing {
    /// Does anything route requests?
    pub(crate) fn is_on(&self) -> bool {
        self.bucket_by_model || self.affinity
    }
}

/// The pool's [`Router`] in the proxy.
#[derive(Debug)]
pub(crate) struct ProxyRouter(pub(crate) Routing);

impl Router for ProxyRouter {
    fn bucket<'a>(&self, head: &RequestHead<'a>) -> Option<&'a str> {
        if !self.0.bucket_by_model {
            return None;
        }
        head.extensions.get::<BodyFields>()?.model.as_deref()
    }

    fn affinity<'a>(&self, head: &RequestHead<'a>) -> Option<&'a [u8]> {
        if !self.0.affinity {
            return None;
        }
        let fields = head.extensions.get::<BodyFields>();
        fields
            .and_then(|fields| {
                fields
                    .prompt_cache_key
                    .as_deref()
                    .or(fields.metadata_user_id.as_deref())
                    .or(fields.user.as_deref())
            })
            .map(str::as_bytes)
            .or_else(|| {
                head.headers
                    .get(&self.0.session_header)
                    .map(|value| value.as_bytes())
            })
    }
}
