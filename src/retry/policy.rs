//! [`RetryPolicy`]: when a response or error earns a second attempt.

use std::error::Error as StdError;
use std::fmt;
use std::future::{Ready, ready};
use std::sync::Arc;

use http::{Request, Response, StatusCode};
use tower::retry::Policy;
use tower::retry::budget::{Budget, TpsBudget};

use crate::BoxError;
use crate::pool::KeyPool;
use crate::retry::ReplayBody;
use crate::tried::TriedKeys;

type ErrorPredicate = dyn Fn(&BoxError) -> bool + Send + Sync;

/// The [`tower::retry::Policy`] behind [`Retry`](super::Retry): resend a `429` (or a
/// connection failure) on a key the request has not tried.
///
/// Each request's future holds its own copy, which counts that request's retries; the
/// budget is shared by all copies. Made by [`RetryLayer`](super::RetryLayer).
#[derive(Clone)]
pub struct RetryPolicy {
    pub(crate) pool: KeyPool,
    pub(crate) max_retries: usize,
    pub(crate) budget: Arc<TpsBudget>,
    pub(crate) retry_error: Arc<ErrorPredicate>,
    /// Retries this request has made (0 in the template the layer holds).
    pub(crate) retries: usize,
}

/// Why an attempt is worth repeating.
#[derive(Debug, Clone, Copy)]
enum Reason {
    RateLimited,
    NotConnected,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::RateLimited => "429",
            Self::NotConnected => "connection failure",
        })
    }
}

impl RetryPolicy {
    /// Is some key this request has not been sent with usable right now?
    ///
    /// Only then is a retry worth its cost: resending on a tried key that is still
    /// cooling down would wait for it, or earn the same `429` again. A key at its in-flight
    /// cap counts as usable, since a slot frees as soon as any answer ends. The snapshot
    /// allocates, which is fine on this slow path.
    fn has_untried_key(&self, tried: &TriedKeys) -> bool {
        self.pool.snapshot().iter().any(|key| {
            !key.disabled && key.cooling_down_for.is_none() && !tried.contains(key.position - 1)
        })
    }
}

impl<B, R> Policy<Request<ReplayBody<B>>, Response<R>, BoxError> for RetryPolicy {
    type Future = Ready<()>;

    fn retry(
        &mut self,
        req: &mut Request<ReplayBody<B>>,
        result: &mut Result<Response<R>, BoxError>,
    ) -> Option<Self::Future> {
        let reason = match result {
            Ok(response) if response.status() == StatusCode::TOO_MANY_REQUESTS => {
                Reason::RateLimited
            }
            Err(error) if (self.retry_error)(error) => Reason::NotConnected,
            _ => return None,
        };
        if self.retries >= self.max_retries {
            tracing::debug!(
                retries = self.retries,
                "retries spent; passing the {reason} on"
            );
            return None;
        }
        let tried = req.extensions().get::<TriedKeys>()?;
        if !self.has_untried_key(tried) {
            tracing::debug!(
                tried = ?tried.positions(),
                "no untried key is usable now; passing the {reason} on"
            );
            return None;
        }
        if !self.budget.withdraw() {
            tracing::warn!("retry budget exhausted; passing the {reason} on");
            return None;
        }
        self.retries += 1;
        tracing::info!(
            attempt = self.retries + 1,
            tried = ?tried.positions(),
            "{reason} from key {}/{}; resending on another key",
            tried.positions().last().copied().unwrap_or(0),
            self.pool.len(),
        );
        Some(ready(()))
    }

    fn clone_request(&mut self, req: &Request<ReplayBody<B>>) -> Option<Request<ReplayBody<B>>> {
        if self.retries >= self.max_retries {
            return None;
        }
        let mut clone = Request::new(req.body().try_clone()?);
        *clone.method_mut() = req.method().clone();
        *clone.uri_mut() = req.uri().clone();
        *clone.version_mut() = req.version();
        *clone.headers_mut() = req.headers().clone();
        // Shares the request's `TriedKeys`: the record is behind an `Arc`.
        *clone.extensions_mut() = req.extensions().clone();
        Some(clone)
    }
}

impl fmt::Debug for RetryPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryPolicy")
            .field("keys", &self.pool.len())
            .field("max_retries", &self.max_retries)
            .field("retries", &self.retries)
            .finish_non_exhaustive()
    }
}

/// The default test for errors worth a retry: somewhere in the error's source chain, a
/// connection was refused, so nothing of the request was sent.
///
/// Clients can say more (hyper-util's `Error::is_connect` also covers DNS and TLS
/// handshake failures); pass such a test to
/// [`RetryLayer::retry_error_if`](super::RetryLayer::retry_error_if).
///
/// # Examples
///
/// ```
/// use tower_key_rotation::retry::is_connection_refused;
///
/// let refused: tower::BoxError =
///     Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
/// assert!(is_connection_refused(&refused));
/// let reset: tower::BoxError = Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
/// assert!(!is_connection_refused(&reset));
/// ```
pub fn is_connection_refused(error: &BoxError) -> bool {
    let mut source: Option<&(dyn StdError + 'static)> = Some(&**error);
    while let Some(error) = source {
        if let Some(io) = error.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::ConnectionRefused {
                return true;
            }
        }
        source = error.source();
    }
    false
}
