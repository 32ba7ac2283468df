//! Where a key goes on the request.

use std::fmt;
use std::sync::Arc;

use http::header::{AUTHORIZATION, HeaderName};
use http::{HeaderValue, Request, request::Parts};

use crate::key::{ApiKey, KeySet};

type CustomFn = dyn Fn(&ApiKey, &mut Parts) + Send + Sync;

/// Where the key is put on each request.
///
/// Whatever credential the caller already put in that header is replaced, so a client's
/// own `Authorization` never reaches the provider beside ours.
///
/// # Examples
///
/// ```
/// use tower_key_rotation::Placement;
///
/// // OpenAI, Zhipu BigModel: `Authorization: Bearer <key>` (the default).
/// let bearer = Placement::bearer();
/// // Anthropic: `x-api-key: <key>`; Azure OpenAI: `api-key: <key>`.
/// let anthropic = Placement::header(http::HeaderName::from_static("x-api-key"));
/// // Anything else: your own function, e.g. Gemini's `?key=` query parameter.
/// let custom = Placement::custom(|key, parts| {
///     parts.headers.insert("x-goog-api-key", key.header_value(""));
/// });
/// ```
#[derive(Clone)]
pub struct Placement(PlacementKind);

#[derive(Clone)]
enum PlacementKind {
    Header {
        name: HeaderName,
        prefix: &'static str,
    },
    Custom(Arc<CustomFn>),
}

impl Placement {
    /// `Authorization: Bearer <key>` (the default).
    pub fn bearer() -> Self {
        Self(PlacementKind::Header {
            name: AUTHORIZATION,
            prefix: "Bearer ",
        })
    }

    /// A named header carrying the bare key, such as `x-api-key` or `api-key`.
    pub fn header(name: HeaderName) -> Self {
        Self(PlacementKind::Header { name, prefix: "" })
    }

    /// A caller-supplied function that puts the key on the request's head.
    ///
    /// It runs on every request; build header values with [`ApiKey::header_value`] so they
    /// are marked sensitive.
    pub fn custom(f: impl Fn(&ApiKey, &mut Parts) + Send + Sync + 'static) -> Self {
        Self(PlacementKind::Custom(Arc::new(f)))
    }

    /// Builds each key's header value once, for the hot path.
    pub(crate) fn prepare(&self, keys: &KeySet) -> PreparedPlacement {
        match &self.0 {
            PlacementKind::Header { name, prefix } => PreparedPlacement::Header {
                name: name.clone(),
                values: keys.keys().iter().map(|k| k.header_value(prefix)).collect(),
            },
            PlacementKind::Custom(f) => PreparedPlacement::Custom {
                keys: keys.clone(),
                f: f.clone(),
            },
        }
    }
}

impl Default for Placement {
    fn default() -> Self {
        Self::bearer()
    }
}

impl fmt::Debug for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            PlacementKind::Header { name, prefix: "" } => {
                write!(f, "Placement::header({name})")
            }
            PlacementKind::Header { .. } => f.write_str("Placement::bearer()"),
            PlacementKind::Custom(_) => f.write_str("Placement::custom(..)"),
        }
    }
}

/// A [`Placement`] with its header values built.
#[derive(Clone)]
pub(crate) enum PreparedPlacement {
    Header {
        name: HeaderName,
        values: Arc<[HeaderValue]>,
    },
    Custom {
        keys: KeySet,
        f: Arc<CustomFn>,
    },
}

impl PreparedPlacement {
    /// Puts key `index` on `req`, replacing any value the caller set.
    #[inline]
    pub(crate) fn apply<B>(&self, index: usize, req: Request<B>) -> Request<B> {
        match self {
            Self::Header { name, values } => {
                let mut req = req;
                req.headers_mut()
                    .insert(name.clone(), values[index].clone());
                req
            }
            Self::Custom { keys, f } => {
                let (mut parts, body) = req.into_parts();
                f(&keys.keys()[index], &mut parts);
                Request::from_parts(parts, body)
            }
        }
    }
}

impl fmt::Debug for PreparedPlacement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Header { name, values } => write!(f, "header {name} ({} keys)", values.len()),
            Self::Custom { keys, .. } => write!(f, "custom ({} keys)", keys.len()),
        }
    }
}
