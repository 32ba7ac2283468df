//! [`RetryPolicy`]: when a response or error earns a second attempt.

use std::error::Error as StdError;
use std::fmt;
use std::future::{Ready, ready};
use std::sync::Arc;

use http::{Request, Response, StatusCode};
use tower::retry::Policy;
use tower::retry::budget::{Budget, TpsBudget};

use crate::BoxError;
use crate::outcome::Outcome;
use crate::pool::KeyPool;
use crate::retry::ReplayBody;
use crate::tried::TriedKeys;

type ErrorPredicate = dyn Fn(&BoxError) -> bool + Send + Sync;

/// The [`tower::retry::Policy`] behind [`Retry`](super::Retry): resend a `429` (or a
/// `503` with `Retry-After`, or a connection failure) on a key the request has not tried.
///
/// The response's [`Outcome`] decides before its status: a spent quota
/// ([`Outcome::QuotaExhausted`]) or a platform-wide overload ([`Outcome::Failure`]) is
/// handed back at once, since no other key would fare better.
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
    /// A 503 whose `Retry-After` the classifier read as a rate limit of the key.
    Unavailable,
    NotConnected,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::RateLimited => "429",
            Self::Unavailable => "503 with Retry-After",
            Self::NotConnected => "connection failure",
        })
    }
}

/// Is this response worth sending again on another key, and why?
///
/// The [`Outcome`] that [`KeyRotation`](crate::KeyRotation) puts on every response it did
/// not classify as a success decides before the status does:
///
/// | outcome | status | retried? |
/// | --- | --- | --- |
/// | [`Outcome::RateLimited`], [`Outcome::AccountLimited`] | 429 | yes: another key (of another account) may take it |
/// | [`Outcome::RateLimited`] | 503 (with `Retry-After`) | yes |
/// | [`Outcome::QuotaExhausted`] | any | no: billing or a spent quota, not a rate limit; the client must hear it |
/// | [`Outcome::Failure`] | 429 | no: the provider says it is overloaded as a whole (BigModel 1305), another key would only add load |
/// | [`Outcome::KeyRejected`] | any | no, as for 401/403 |
/// | none (no `KeyRotation` inside, or a classifier that calls it a success) | 429 | yes, by status |
fn response_reason<R>(response: &Response<R>) -> Option<Reason> {
    let status = response.status();
    match response.extensions().get::<Outcome>() {
        Some(Outcome::RateLimited { .. } | Outcome::AccountLimited { .. })
            if status == StatusCode::TOO_MANY_REQUESTS =>
        {
            Some(Reason::RateLimited)
        }
        Some(Outcome::RateLimited { .. }) if status == StatusCode::SERVICE_UNAVAILABLE => {
            Some(Reason::Unavailable)
        }
        Some(Outcome::QuotaExhausted { .. }) => {
            tracing::debug!(
                "{} for a spent quota; not retried on another key",
                status.as_u16()
            );
            None
        }
        Some(_) => None,
        None => (status == StatusCode::TOO_MANY_REQUESTS).then_some(Reason::RateLimited),
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
            Ok(response) => response_reason(response)?,
            Err(error) if (self.retry_error)(error) => Reason::NotConnected,
            Err(_) => return None,
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

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use http::{Request, Response, StatusCode};
    use tower::retry::Policy;

    use super::*;
    use crate::KeySet;
    use crate::retry::RetryLayer;

    type Body = ReplayBody<http_body_util::Full<Bytes>>;

    fn policy(keys: &str) -> (KeyPool, RetryPolicy) {
        let pool = KeyPool::new(KeySet::parse(keys).unwrap());
        let policy = RetryLayer::new(pool.clone()).policy().clone();
        (pool, policy)
    }

    fn request(body: Body, tried: &TriedKeys) -> Request<Body> {
        let mut request = Request::post("http://provider.test/v4/chat")
            .header("content-type", "application/json")
            .body(body)
            .unwrap();
        request.extensions_mut().insert(tried.clone());
        request
    }

    /// `Policy::clone_request` with the response type pinned down.
    fn clone_of(policy: &mut RetryPolicy, req: &Request<Body>) -> Option<Request<Body>> {
        Policy::<Request<Body>, Response<()>, BoxError>::clone_request(policy, req)
    }

    fn answer(status: StatusCode) -> Result<Response<()>, BoxError> {
        Ok(Response::builder().status(status).body(()).unwrap())
    }

    #[test]
    fn a_clone_has_the_same_head_and_shares_the_tried_keys() {
        let (_, mut policy) = policy("k1,k2");
        let tried = TriedKeys::new();
        let original = request(ReplayBody::buffered(Bytes::from_static(b"{}")), &tried);
        let clone = clone_of(&mut policy, &original).unwrap();
        assert_eq!(clone.method(), original.method());
        assert_eq!(clone.uri(), original.uri());
        assert_eq!(clone.headers(), original.headers());
        tried.insert(1);
        assert!(clone.extensions().get::<TriedKeys>().unwrap().contains(1));
    }

    #[test]
    fn a_streaming_body_is_never_cloned() {
        let (_, mut policy) = policy("k1,k2");
        let body = ReplayBody::streaming(http_body_util::Full::new(Bytes::new()));
        assert!(clone_of(&mut policy, &request(body, &TriedKeys::new())).is_none());
    }

    #[test]
    fn only_a_429_with_an_untried_usable_key_is_retried() {
        let (_, mut policy) = policy("k1,k2");
        let tried = TriedKeys::new();
        tried.insert(0);
        let mut req = request(ReplayBody::buffered(Bytes::new()), &tried);
        for status in [
            StatusCode::OK,
            StatusCode::INTERNAL_SERVER_ERROR,
            StatusCode::FORBIDDEN,
        ] {
            assert!(
                policy.retry(&mut req, &mut answer(status)).is_none(),
                "{status}"
            );
        }
        assert!(
            policy
                .retry(&mut req, &mut answer(StatusCode::TOO_MANY_REQUESTS))
                .is_some()
        );

        // Every key tried: the 429 is the answer.
        tried.insert(1);
        assert!(
            policy
                .retry(&mut req, &mut answer(StatusCode::TOO_MANY_REQUESTS))
                .is_none()
        );
    }

    fn answer_with(status: StatusCode, outcome: Outcome) -> Result<Response<()>, BoxError> {
        let mut response = Response::builder().status(status).body(()).unwrap();
        response.extensions_mut().insert(outcome);
        Ok(response)
    }

    #[test]
    fn the_outcome_on_the_response_decides_before_the_status() {
        let (_, mut policy) = policy("k1,k2,k3,k4,k5,k6,k7,k8");
        policy.max_retries = 100;
        let tried = TriedKeys::new();
        tried.insert(0);
        let mut req = request(ReplayBody::buffered(Bytes::new()), &tried);
        let wait = Some(std::time::Duration::from_secs(1));
        let too_many = StatusCode::TOO_MANY_REQUESTS;
        let unavailable = StatusCode::SERVICE_UNAVAILABLE;
        let cases = [
            (too_many, Outcome::RateLimited { retry_after: wait }, true),
            (too_many, Outcome::RateLimited { retry_after: None }, true),
            (
                too_many,
                Outcome::AccountLimited { retry_after: wait },
                true,
            ),
            // 503 + Retry-After, which `classify` reads as a rate limit of the key.
            (
                unavailable,
                Outcome::RateLimited { retry_after: wait },
                true,
            ),
            (unavailable, Outcome::Failure, false),
            // Billing / a spent quota: another key of the account would not help.
            (
                too_many,
                Outcome::QuotaExhausted { reset_after: None },
                false,
            ),
            (
                too_many,
                Outcome::QuotaExhausted { reset_after: wait },
                false,
            ),
            // BigModel 1305: the platform is overloaded, not the key.
            (too_many, Outcome::Failure, false),
            (StatusCode::FORBIDDEN, Outcome::KeyRejected, false),
        ];
        for (status, outcome, retried) in cases {
            assert_eq!(
                policy
                    .retry(&mut req, &mut answer_with(status, outcome))
                    .is_some(),
                retried,
                "{status} {outcome:?}"
            );
        }
        // No outcome on the response (no `KeyRotation` inside): the status decides.
        assert!(policy.retry(&mut req, &mut answer(too_many)).is_some());
        assert!(policy.retry(&mut req, &mut answer(unavailable)).is_none());
    }

    #[test]
    fn retries_are_counted_per_request() {
        let (_, template) = policy("k1,k2,k3,k4");
        let mut policy = template.clone();
        policy.max_retries = 1;
        let tried = TriedKeys::new();
        tried.insert(0);
        let mut req = request(ReplayBody::buffered(Bytes::new()), &tried);
        assert!(
            policy
                .retry(&mut req, &mut answer(StatusCode::TOO_MANY_REQUESTS))
                .is_some()
        );
        assert!(
            policy
                .retry(&mut req, &mut answer(StatusCode::TOO_MANY_REQUESTS))
                .is_none()
        );
        assert!(
            clone_of(&mut policy, &req).is_none(),
            "no copy kept once retries are spent"
        );
        assert_eq!(template.retries, 0, "the layer's template is untouched");
    }

    #[test]
    fn a_refused_connection_is_retried_but_other_errors_are_not() {
        let (_, mut policy) = policy("k1,k2");
        let mut req = request(ReplayBody::buffered(Bytes::new()), &TriedKeys::new());
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        let mut result: Result<Response<()>, BoxError> = Err(Box::new(reset));
        assert!(policy.retry(&mut req, &mut result).is_none());
        let mut result: Result<Response<()>, BoxError> = Err(Box::new(refused));
        assert!(policy.retry(&mut req, &mut result).is_some());
    }
}
