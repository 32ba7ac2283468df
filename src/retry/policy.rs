//! [`RetryPolicy`]: when a response or error earns another attempt, and whether waiting
//! for a key can still fit in the request's budget.

use std::fmt;
use std::sync::Arc;

use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use tokio::time::Instant;
use tower::retry::budget::{Budget, TpsBudget};

use crate::BoxError;
use crate::RejectedKey;
use crate::classify::Outcome;
use crate::error::NoKeyAvailable;
use crate::pool::{KeyPool, PoolAvailability};
use crate::retry::ReplayBody;
use crate::retry::TriedKeys;

type ErrorPredicate = dyn Fn(&BoxError) -> bool + Send + Sync;

/// The policy behind [`Retry`](super::Retry): send a refused request again on another key,
/// or on the same key once its rest is over, within the request's wait budget.
///
/// The response's [`Outcome`] decides before its status: a spent quota
/// ([`Outcome::QuotaExhausted`]) or a platform-wide overload ([`Outcome::Failure`]) is
/// handed back at once, since no other key would fare better.
///
/// Each request's future holds its own copy, which counts that request's retries; the
/// retry budget is shared by all copies. Made by [`RetryLayer`](super::RetryLayer).
#[derive(Clone)]
pub struct RetryPolicy {
    pub(crate) pool: KeyPool,
    pub(crate) max_retries: usize,
    pub(crate) budget: Arc<TpsBudget>,
    pub(crate) retry_error: Arc<ErrorPredicate>,
    /// Retries this request has made (0 in the template the layer holds).
    pub(crate) retries: usize,
    /// Whether the last refusal was passed on because no key could take the request again
    /// within its wait budget (or ever): the caller should not retry it either.
    pub(crate) no_key_in_time: bool,
    /// A key that refused this request's credentials, until another key's answer to the
    /// same request says who is to blame.
    pub(crate) suspect: Option<Suspect>,
    /// Whether this request was already sent again after a connection failure.
    pub(crate) reconnected: bool,
}

/// A key that refused a request (401/403), awaiting the contrast.
#[derive(Debug, Clone)]
pub(crate) struct Suspect {
    key: RejectedKey,
    status: StatusCode,
}

/// What another key's answer to a request says about the key that refused it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// No other key has answered yet, or its answer decides nothing (a 429, a 5xx).
    Open,
    /// Another key served the request: the refusing key is bad, and is disabled.
    KeyToBlame,
    /// Another key refused it too: the request is bad (a caller's credentials, a model or
    /// resource the accounts may not use). Passed on; no key is disabled.
    RequestToBlame,
}

/// Why an attempt is worth repeating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reason {
    RateLimited,
    /// A 503 whose `Retry-After` the classifier read as a rate limit of the key.
    Unavailable,
    /// 401/403: another key may serve, which would prove this one bad.
    KeyRejected,
    /// The call was refused before anything was sent: its key went away, or its probe
    /// went out, between `poll_ready` and `call`.
    NotSent,
    NotConnected,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::RateLimited => "429",
            Self::Unavailable => "503 with Retry-After",
            Self::KeyRejected => "rejected key",
            Self::NotSent => "reservation gone stale",
            Self::NotConnected => "connection failure",
        })
    }
}

/// Is this response worth sending again, and why?
///
/// The [`Outcome`] that [`KeyRotation`](crate::KeyRotation) puts on every response it did
/// not classify as a success decides before the status does:
///
/// | outcome | status | retried? |
/// | --- | --- | --- |
/// | [`Outcome::RateLimited`], [`Outcome::AccountLimited`], [`Outcome::ConcurrencyLimited`] | 429 | yes: another key (of another account) may take it, or the same once its rest is over |
/// | [`Outcome::RateLimited`] | 503 (with `Retry-After`) | yes |
/// | [`Outcome::KeyRejected`] | any | yes, once, on a key not tried that can take it now: if that key serves it, the first is disabled; if it refuses it too, the request is to blame and the refusal is the answer |
/// | [`Outcome::QuotaExhausted`] | any | no: billing or a spent quota, not a rate limit; the client must hear it |
/// | [`Outcome::Failure`] | 429 | no: the provider says it is overloaded as a whole (BigModel 1305), another key would only add load |
/// | none (no `KeyRotation` inside, or a classifier that calls it a success) | 429 | yes, by status |
fn response_reason<R>(response: &Response<R>) -> Option<Reason> {
    let status = response.status();
    match response.extensions().get::<Outcome>() {
        Some(
            Outcome::RateLimited { .. }
            | Outcome::AccountLimited { .. }
            | Outcome::ConcurrencyLimited { .. },
        ) if status == StatusCode::TOO_MANY_REQUESTS => Some(Reason::RateLimited),
        Some(Outcome::RateLimited { .. }) if status == StatusCode::SERVICE_UNAVAILABLE => {
            Some(Reason::Unavailable)
        }
        Some(Outcome::KeyRejected) => Some(Reason::KeyRejected),
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
    /// Should this attempt's `result` be sent again? `budget_end` is when the request's
    /// wait budget runs out (`None`: never).
    ///
    /// Yes when the refusal is worth a retry, retries and the retry budget allow, and some
    /// key can take the request within the wait budget:
    ///
    /// - a key that can take it now, or one at its concurrency limit (it frees when any of
    ///   its requests ends);
    /// - else the earliest key whose rest ends (or quota refills) before the budget ends: a
    ///   tried key counts once its own rest (`Retry-After`) is over.
    ///
    /// A refused key (401/403) is blamed by contrast: the request goes once to a key not
    /// tried yet that can take it now (one whose last answer was accepted first); if that
    /// key serves it, the refusing key is disabled; if it refuses it too, the request is
    /// to blame, its refusal is the answer and no key is disabled. So one request disables
    /// at most one key, and with a single key nothing is ever disabled.
    ///
    /// A connection failure (DNS, connect, TLS: nothing reached the provider) is not the
    /// key's fault: the request is sent again once, on a fresh connection, with any key
    /// free now.
    pub(crate) fn should_retry<R>(
        &mut self,
        tried: Option<&TriedKeys>,
        result: &Result<Response<R>, BoxError>,
        budget_end: Option<Instant>,
    ) -> bool {
        let reason = match result {
            Ok(response) => {
                if self.suspect.is_some() && self.judge(tried, response) == Verdict::RequestToBlame
                {
                    return false;
                }
                match response_reason(response) {
                    Some(Reason::KeyRejected) if self.suspect.is_some() => {
                        // The suspect itself refused again (no other key was free): the
                        // contrast is still owed, and only an untried key can give it.
                        Reason::KeyRejected
                    }
                    Some(Reason::KeyRejected) => {
                        match response.extensions().get::<RejectedKey>() {
                            Some(key) => {
                                self.suspect = Some(Suspect {
                                    key: key.clone(),
                                    status: response.status(),
                                });
                            }
                            // Refused, but no key to blame (no `KeyRotation` inside).
                            None => return false,
                        }
                        Reason::KeyRejected
                    }
                    Some(reason) => reason,
                    None => return false,
                }
            }
            Err(error)
                if error
                    .downcast_ref::<NoKeyAvailable>()
                    .is_some_and(|no_key| no_key.waited().is_zero()) =>
            {
                Reason::NotSent
            }
            Err(error) if (self.retry_error)(error) => Reason::NotConnected,
            Err(_) => return false,
        };
        if self.retries >= self.max_retries {
            tracing::debug!(
                retries = self.retries,
                "retries spent; passing the {reason} on"
            );
            return false;
        }
        let Some(tried) = tried else {
            return false; // not replayable
        };
        // Whether the retry goes out at once (and so adds load now), if at all.
        let mut at_once = true;
        let worth_it = match reason {
            Reason::NotConnected if self.reconnected => {
                tracing::debug!("sent again once already; passing the {reason} on");
                return false;
            }
            Reason::NotConnected => {
                self.reconnected = true;
                self.pool.can_take_now(|_| true)
            }
            Reason::KeyRejected => {
                let untried = self.pool.can_take_now(|p| !tried.contains(p));
                if !untried {
                    tracing::debug!(
                        "no other key free to tell a bad key from a bad request; passing the {reason} on"
                    );
                    return false;
                }
                true
            }
            _ => match self.pool.availability() {
                PoolAvailability::Now => true,
                PoolAvailability::OnRelease { .. } => {
                    at_once = false;
                    true
                }
                PoolAvailability::At(at) => {
                    at_once = false;
                    let at = self.pool.instant(at);
                    let in_time = budget_end.is_none_or(|end| at <= end);
                    if !in_time {
                        tracing::debug!(
                            back_in_ms =
                                at.saturating_duration_since(Instant::now()).as_millis() as u64,
                            "the earliest key is back after the wait budget; passing the {reason} on"
                        );
                    }
                    in_time
                }
                PoolAvailability::Never => false,
            },
        };
        if !worth_it {
            self.no_key_in_time = true;
            tracing::debug!(
                tried = ?tried.positions(),
                "no key can take it again in time; passing the {reason} on"
            );
            return false;
        }
        // The retry budget is for retries that add load at once. One that waits goes
        // when a key's rest is over or a request ends: the provider paces it, and the wait
        // budget and `max_retries` bound it.
        if at_once && !self.budget.withdraw() {
            tracing::warn!("retry budget exhausted; passing the {reason} on");
            return false;
        }
        self.retries += 1;
        tracing::info!(
            attempt = self.retries + 1,
            tried = ?tried.positions(),
            "{reason} from key {}/{}; sending again",
            tried.positions().last().copied().unwrap_or(0),
            self.pool.len(),
        );
        true
    }

    /// Reads another key's answer to a request that a key (the suspect) refused: a
    /// success disables the suspect, a refusal blames the request.
    fn judge<R>(&mut self, tried: Option<&TriedKeys>, response: &Response<R>) -> Verdict {
        let Some(suspect) = &self.suspect else {
            return Verdict::Open;
        };
        let bad = suspect.key.position();
        let Some(by) = tried.and_then(TriedKeys::last).filter(|&by| by != bad) else {
            return Verdict::Open; // the suspect answered again
        };
        let keys = self.pool.len();
        let outcome = response.extensions().get::<Outcome>();
        let verdict = match outcome {
            None | Some(Outcome::Success | Outcome::SuccessAtLimit { .. })
                if response.status().is_success() =>
            {
                Verdict::KeyToBlame
            }
            Some(Outcome::KeyRejected) => Verdict::RequestToBlame,
            _ => Verdict::Open,
        };
        match verdict {
            Verdict::Open => return Verdict::Open,
            Verdict::KeyToBlame => {
                tracing::info!(
                    "key {bad}/{keys} refused a request ({}) that key {by}/{keys} served: the key is to blame",
                    suspect.status.as_u16()
                );
                suspect.key.disable();
            }
            Verdict::RequestToBlame => tracing::info!(
                "key {bad}/{keys} and key {by}/{keys} both refused the request ({}, {}): the request is to blame, not the keys; passing it on, no key disabled",
                suspect.status.as_u16(),
                response.status().as_u16()
            ),
        }
        self.suspect = None;
        verdict
    }

    /// What the next attempt is rebuilt from, if it may have one: the body is buffered and
    /// retries remain.
    pub(crate) fn replay<B>(&self, req: &Request<ReplayBody<B>>) -> Option<Replay<B>> {
        if self.retries >= self.max_retries {
            return None;
        }
        Replay::of(req)
    }
}

/// A copy of a request as it was before an attempt, kept for the next one (and dropped,
/// unused, by nearly every request).
///
/// The copy is needed (the inner service consumes the request, and a client may change
/// its headers), but it keeps only what rebuilding the request takes, in the cheapest form:
///
/// - the headers as a list of (name, value) pairs, one allocation (a `HeaderMap` clone makes
///   two: its index and its entries); a retry rebuilds the map from them, in the same order;
/// - when the only extension is the request's [`TriedKeys`], which this layer put there (or
///   a caller did alone), that record by itself: cloning `http::Extensions` builds a new map
///   with a boxed copy of each value, three allocations for one extension. A retry puts it
///   back. Other extensions (a caller's, read by layers inside) are copied with it.
///
/// Rebuilding costs what the copy saved, once, and only for a retry.
pub(crate) struct Replay<B> {
    /// The request with its headers left empty (and its extensions, when `tried` stands
    /// for them).
    request: Request<ReplayBody<B>>,
    headers: Vec<(HeaderName, HeaderValue)>,
    /// The record to put back on the extensions, when they were left empty.
    tried: Option<TriedKeys>,
}

impl<B> Replay<B> {
    /// A copy of `req`, or `None` if its body cannot be sent again.
    fn of(req: &Request<ReplayBody<B>>) -> Option<Self> {
        let mut copy = Request::new(req.body().try_clone()?);
        *copy.method_mut() = req.method().clone();
        *copy.uri_mut() = req.uri().clone();
        *copy.version_mut() = req.version();
        let headers = req
            .headers()
            .iter()
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect();
        let extensions = req.extensions();
        let tried = match extensions.get::<TriedKeys>() {
            Some(tried) if extensions.len() == 1 => Some(tried.clone()),
            // Shares the request's `TriedKeys`: the record is behind an `Arc`.
            _ => {
                *copy.extensions_mut() = extensions.clone();
                None
            }
        };
        Some(Self {
            request: copy,
            headers,
            tried,
        })
    }

    /// The keys the request has been sent with, shared with every attempt.
    pub(crate) fn tried(&self) -> Option<&TriedKeys> {
        self.tried
            .as_ref()
            .or_else(|| self.request.extensions().get::<TriedKeys>())
    }

    /// The request for the next attempt, as the first one was.
    pub(crate) fn into_request(self) -> Request<ReplayBody<B>> {
        let mut request = self.request;
        let headers = request.headers_mut();
        headers.reserve(self.headers.len());
        // A name's values come one after another in the list, first value first: appended
        // in that order they make the same map.
        for (name, value) in self.headers {
            headers.append(name, value);
        }
        if let Some(tried) = self.tried {
            request.extensions_mut().insert(tried);
        }
        request
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
    crate::classify::connection_refused(&**error)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use http::{Request, Response, StatusCode};
    use http_body_util::BodyExt;

    use super::*;
    use crate::KeySet;
    use crate::classify::Scope;
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

    fn answer(status: StatusCode) -> Result<Response<()>, BoxError> {
        Ok(Response::builder().status(status).body(()).unwrap())
    }

    fn answer_with(status: StatusCode, outcome: Outcome) -> Result<Response<()>, BoxError> {
        let mut response = Response::builder().status(status).body(()).unwrap();
        response.extensions_mut().insert(outcome);
        Ok(response)
    }

    fn in_secs(secs: u64) -> Option<Instant> {
        Some(Instant::now() + Duration::from_secs(secs))
    }

    /// A caller's extension, read by layers inside: every attempt must carry it.
    #[derive(Debug, Clone, PartialEq)]
    struct Label(&'static str);

    #[tokio::test]
    async fn a_copy_has_the_same_head_and_body_and_shares_the_tried_keys() {
        let (_, policy) = policy("k1,k2");
        for with_label in [false, true] {
            let tried = TriedKeys::new();
            let mut original = request(ReplayBody::buffered(Bytes::from_static(b"{}")), &tried);
            *original.version_mut() = http::Version::HTTP_2;
            original
                .headers_mut()
                .append("x-many", http::HeaderValue::from_static("1"));
            original
                .headers_mut()
                .append("x-many", http::HeaderValue::from_static("2"));
            original
                .headers_mut()
                .append("accept", http::HeaderValue::from_static("*/*"));
            if with_label {
                original.extensions_mut().insert(Label("caller's"));
            }
            let replay = policy.replay(&original).unwrap();
            tried.insert(2);
            assert!(
                replay.tried().unwrap().contains(2),
                "shared before rebuilding"
            );
            let copy = replay.into_request();
            assert_eq!(copy.method(), original.method());
            assert_eq!(copy.uri(), original.uri());
            assert_eq!(copy.version(), original.version());
            assert_eq!(copy.headers(), original.headers());
            assert!(
                copy.headers().iter().eq(original.headers().iter()),
                "the same order, as a client would send them"
            );
            let tried_copy = copy.extensions().get::<TriedKeys>().unwrap();
            assert!(tried_copy.contains(2), "the copy's record is the request's");
            tried_copy.insert(1);
            assert!(tried.contains(1));
            let label = with_label.then_some(Label("caller's"));
            assert_eq!(copy.extensions().get::<Label>(), label.as_ref());
            assert_eq!(copy.extensions().len(), original.extensions().len());
            let body = copy.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, Bytes::from_static(b"{}"));
        }
    }

    #[test]
    fn a_streaming_body_is_never_cloned() {
        let (_, policy) = policy("k1,k2");
        let body = ReplayBody::streaming(http_body_util::Full::new(Bytes::new()));
        assert!(policy.replay(&request(body, &TriedKeys::new())).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn only_refusals_are_retried() {
        let (_, mut policy) = policy("k1,k2");
        let tried = TriedKeys::new();
        tried.insert(1);
        let req = request(ReplayBody::buffered(Bytes::new()), &tried);
        for status in [StatusCode::OK, StatusCode::INTERNAL_SERVER_ERROR] {
            assert!(
                !policy.should_retry(req.extensions().get(), &answer(status), in_secs(30)),
                "{status}"
            );
        }
        assert!(policy.should_retry(
            req.extensions().get(),
            &answer(StatusCode::TOO_MANY_REQUESTS),
            in_secs(30)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_waits_for_a_tried_key_only_within_the_budget() {
        let (pool, mut policy) = policy("k1");
        let tried = TriedKeys::new();
        let req = request(ReplayBody::buffered(Bytes::new()), &tried);
        // The one key is refused with Retry-After: 5 and rests.
        let lease = pool.try_reserve().unwrap();
        tried.insert(lease.position());
        lease.mark_sent();
        let refusal = Outcome::RateLimited {
            retry_after: Some(Duration::from_secs(5)),
        };
        lease.record(refusal);
        drop(lease);
        let too_many = StatusCode::TOO_MANY_REQUESTS;
        assert!(
            !policy.should_retry(
                req.extensions().get(),
                &answer_with(too_many, refusal),
                in_secs(1)
            ),
            "back after the budget: handed back at once"
        );
        assert!(
            policy.should_retry(
                req.extensions().get(),
                &answer_with(too_many, refusal),
                in_secs(10)
            ),
            "back within the budget: worth waiting for"
        );
        assert!(policy.should_retry(
            req.extensions().get(),
            &answer_with(too_many, refusal),
            None
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn the_outcome_on_the_response_decides_before_the_status() {
        let (_, mut policy) = policy("k1,k2,k3,k4,k5,k6,k7,k8");
        policy.max_retries = 100;
        let tried = TriedKeys::new();
        tried.insert(1);
        let req = request(ReplayBody::buffered(Bytes::new()), &tried);
        let wait = Some(Duration::from_secs(1));
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
            (
                too_many,
                Outcome::ConcurrencyLimited { retry_after: None },
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
                Outcome::QuotaExhausted {
                    reset_after: None,
                    scope: Scope::Key,
                },
                false,
            ),
            (
                too_many,
                Outcome::QuotaExhausted {
                    reset_after: wait,
                    scope: Scope::Key,
                },
                false,
            ),
            // BigModel 1305: the platform is overloaded, not the key.
            (too_many, Outcome::Failure, false),
            // A refusal of credentials without the key that drew it (no `KeyRotation`
            // inside): nothing to blame by contrast, so nothing to retry for.
            (StatusCode::FORBIDDEN, Outcome::KeyRejected, false),
            (StatusCode::UNAUTHORIZED, Outcome::KeyRejected, false),
        ];
        for (status, outcome, retried) in cases {
            assert_eq!(
                policy.should_retry(
                    req.extensions().get(),
                    &answer_with(status, outcome),
                    in_secs(30)
                ),
                retried,
                "{status} {outcome:?}"
            );
        }
        // No outcome on the response (no `KeyRotation` inside): the status decides.
        assert!(policy.should_retry(req.extensions().get(), &answer(too_many), in_secs(30)));
        assert!(!policy.should_retry(req.extensions().get(), &answer(unavailable), in_secs(30)));
    }

    /// An answer from the key at `lease`'s position, as `KeyRotation` hands it on.
    fn answered_by(
        lease: &crate::pool::Lease,
        tried: &TriedKeys,
        status: StatusCode,
    ) -> Result<Response<()>, BoxError> {
        tried.insert(lease.position());
        lease.mark_sent();
        let mut response = Response::builder().status(status).body(()).unwrap();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            lease.record(Outcome::KeyRejected);
            response.extensions_mut().insert(Outcome::KeyRejected);
            response.extensions_mut().insert(lease.rejected_key());
        } else {
            lease.record(Outcome::Success);
        }
        Ok(response)
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_key_is_disabled_only_when_another_key_serves_the_same_request() {
        let (pool, template) = policy("k1,k2,k3");
        let mut policy = template.clone();
        let tried = TriedKeys::new();
        let req = request(ReplayBody::buffered(Bytes::new()), &tried);
        let first = pool.try_reserve_where(|p| p == 1).unwrap();
        let refused = answered_by(&first, &tried, StatusCode::UNAUTHORIZED);
        assert!(policy.should_retry(req.extensions().get(), &refused, in_secs(30)));
        assert!(!pool.snapshot()[0].disabled, "one refusal proves nothing");
        let second = pool.try_reserve_where(|p| !tried.contains(p)).unwrap();
        let served = answered_by(&second, &tried, StatusCode::OK);
        assert!(!policy.should_retry(req.extensions().get(), &served, in_secs(30)));
        let stats = pool.snapshot();
        assert!(stats[0].disabled, "served by key {}", second.position());
        assert_eq!(stats[0].rejected, 1);
        assert!(!stats[1].disabled && !stats[2].disabled);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_refused_by_two_keys_is_answered_and_disables_none() {
        let (pool, template) = policy("k1,k2,k3");
        let mut policy = template.clone();
        let tried = TriedKeys::new();
        let req = request(ReplayBody::buffered(Bytes::new()), &tried);
        let first = pool.try_reserve_where(|p| p == 1).unwrap();
        let refused = answered_by(&first, &tried, StatusCode::FORBIDDEN);
        assert!(policy.should_retry(req.extensions().get(), &refused, in_secs(30)));
        let second = pool.try_reserve_where(|p| !tried.contains(p)).unwrap();
        let refused_again = answered_by(&second, &tried, StatusCode::FORBIDDEN);
        assert!(
            !policy.should_retry(req.extensions().get(), &refused_again, in_secs(30)),
            "the request is to blame: no third key is tried"
        );
        assert!(pool.snapshot().iter().all(|key| !key.disabled));
        assert_eq!(tried.len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn with_one_key_a_refusal_is_the_answer_and_the_key_stays() {
        let (pool, template) = policy("k1");
        let mut policy = template.clone();
        let tried = TriedKeys::new();
        let req = request(ReplayBody::buffered(Bytes::new()), &tried);
        let only = pool.try_reserve().unwrap();
        let refused = answered_by(&only, &tried, StatusCode::UNAUTHORIZED);
        assert!(!policy.should_retry(req.extensions().get(), &refused, in_secs(30)));
        drop(only);
        assert!(!pool.snapshot()[0].disabled);
        assert!(pool.try_reserve().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_refused_before_sending_is_tried_again_within_the_budget() {
        let (pool, mut policy) = policy("k1");
        let req = request(ReplayBody::buffered(Bytes::new()), &TriedKeys::new());
        let stale = || -> Result<Response<()>, BoxError> {
            Err(NoKeyAvailable::new(Duration::from_secs(1), Duration::ZERO).into())
        };
        assert!(policy.should_retry(req.extensions().get(), &stale(), in_secs(30)));
        // Waited to the end of its budget: that is the answer.
        let waited: Result<Response<()>, BoxError> =
            Err(NoKeyAvailable::new(Duration::from_secs(1), Duration::from_secs(30)).into());
        assert!(!policy.should_retry(req.extensions().get(), &waited, in_secs(30)));
        drop(pool);
    }

    #[tokio::test(start_paused = true)]
    async fn retries_are_counted_per_request() {
        let (_, template) = policy("k1,k2,k3,k4");
        let mut policy = template.clone();
        policy.max_retries = 1;
        let tried = TriedKeys::new();
        tried.insert(1);
        let req = request(ReplayBody::buffered(Bytes::new()), &tried);
        let too_many = answer(StatusCode::TOO_MANY_REQUESTS);
        assert!(policy.should_retry(req.extensions().get(), &too_many, in_secs(30)));
        assert!(!policy.should_retry(req.extensions().get(), &too_many, in_secs(30)));
        assert!(
            policy.replay(&req).is_none(),
            "no copy kept once retries are spent"
        );
        assert_eq!(template.retries, 0, "the layer's template is untouched");
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_connection_is_sent_again_once_but_other_errors_are_not() {
        let (_, template) = policy("k1");
        let mut policy = template.clone();
        let tried = TriedKeys::new();
        tried.insert(1);
        let req = request(ReplayBody::buffered(Bytes::new()), &tried);
        let refused = || -> Result<Response<()>, BoxError> {
            Err(Box::new(std::io::Error::from(
                std::io::ErrorKind::ConnectionRefused,
            )))
        };
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        let result: Result<Response<()>, BoxError> = Err(Box::new(reset));
        assert!(!policy.should_retry(req.extensions().get(), &result, in_secs(30)));
        // Not the key's fault: once more, on a fresh connection, even on the key tried.
        assert!(policy.should_retry(req.extensions().get(), &refused(), in_secs(30)));
        assert!(
            !policy.should_retry(req.extensions().get(), &refused(), in_secs(30)),
            "once: the host refuses, and no key changes that"
        );
        assert_eq!(policy.retries, 1);
    }
}
