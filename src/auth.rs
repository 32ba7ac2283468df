//! Where a key goes on the request.

use std::fmt;
use std::sync::Arc;

use http::header::{AUTHORIZATION, HeaderName};
use http::{Request, request::Parts};

use crate::key::ApiKey;
use crate::pool::Lease;

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
/// // Anything else: your own function, e.g. Gemini's `x-goog-api-key`.
/// let custom = Placement::custom(|key, parts| {
///     parts.headers.insert("x-goog-api-key", key.header_value(""));
/// });
/// ```
#[derive(Clone)]
pub struct Placement(Kind);

#[derive(Clone)]
enum Kind {
    Header { name: HeaderName, bearer: bool },
    Custom(Arc<CustomFn>),
}

impl Placement {
    /// `Authorization: Bearer <key>` (the default).
    pub fn bearer() -> Self {
        Self(Kind::Header {
            name: AUTHORIZATION,
            bearer: true,
        })
    }

    /// A named header carrying the bare key, such as `x-api-key` or `api-key`.
    pub fn header(name: HeaderName) -> Self {
        Self(Kind::Header {
            name,
            bearer: false,
        })
    }

    /// A caller-supplied function that puts the key on the request's head.
    ///
    /// It runs on every request; build header values with [`ApiKey::header_value`] so they
    /// are marked sensitive.
    pub fn custom(f: impl Fn(&ApiKey, &mut Parts) + Send + Sync + 'static) -> Self {
        Self(Kind::Custom(Arc::new(f)))
    }

    /// Puts the leased key on `req`, replacing any value the caller set. Header values are
    /// built once per key and reused.
    ///
    /// In place: a request is a few hundred bytes, and moving it in and out costs more
    /// than the header insert.
    #[inline]
    pub(crate) fn apply<B>(&self, lease: &Lease, req: &mut Request<B>) {
        match &self.0 {
            Kind::Header { name, bearer } => {
                let value = if *bearer {
                    lease.bearer_header()
                } else {
                    lease.bare_header()
                };
                req.headers_mut().insert(name.clone(), value.clone());
            }
            Kind::Custom(f) => {
                // The function takes the head as `Parts`: lend it the request's fields.
                let (mut parts, ()) = Request::new(()).into_parts();
                swap_head(&mut parts, req);
                f(lease.key(), &mut parts);
                swap_head(&mut parts, req);
            }
        }
    }
}

/// Swaps every field of a request's head with `parts`.
fn swap_head<B>(parts: &mut Parts, req: &mut Request<B>) {
    std::mem::swap(&mut parts.method, req.method_mut());
    std::mem::swap(&mut parts.uri, req.uri_mut());
    std::mem::swap(&mut parts.version, req.version_mut());
    std::mem::swap(&mut parts.headers, req.headers_mut());
    std::mem::swap(&mut parts.extensions, req.extensions_mut());
}

impl Default for Placement {
    fn default() -> Self {
        Self::bearer()
    }
}

impl fmt::Debug for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Kind::Header {
                name,
                bearer: false,
            } => write!(f, "Placement::header({name})"),
            Kind::Header { .. } => f.write_str("Placement::bearer()"),
            Kind::Custom(_) => f.write_str("Placement::custom(..)"),
        }
    }
}
