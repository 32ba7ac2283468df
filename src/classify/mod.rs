//! From a response to what it means for the key that carried it.
//!
//! A [`Classifier`] turns a response's status and headers (and, for the provider profiles,
//! a small error body) into an [`Outcome`]; the pool applies it. [`generic`] reads the
//! status and headers only; the provider profiles ([`Classifier::bigmodel`],
//! [`Classifier::openai`], [`Classifier::anthropic`], [`Classifier::gemini`]) also read the provider's small JSON
//! error body, because status codes alone misclassify:
//!
//! | provider | signal | outcome | scope | rest |
//! | --- | --- | --- | --- | --- |
//! | Zhipu BigModel | `error.code` `1302` (concurrency) | [`Outcome::ConcurrencyLimited`] | the model | none while other requests of the key are at the provider: its limit drops to them; alone on the key, a short cool-down |
//! | | `1303` (frequency) | [`Outcome::AccountLimited`] | the model | `Retry-After`, else the backoff |
//! | | `1304` (daily calls) | [`Outcome::QuotaExhausted`] | the key | until the next midnight, Beijing time |
//! | | `1308`, `1310` (usage caps, the reset time in the message) | [`Outcome::QuotaExhausted`] | the key | until the time in the message (Beijing time) |
//! | | `1113` (arrears) | [`Outcome::QuotaExhausted`] | the key | [`Backoff::quota_wait`](crate::Backoff::quota_wait), then a probe |
//! | | `1305`, `1312` (platform overloaded) | [`Outcome::Failure`] | | none: not the key's fault, not retried |
//! | | `1000`–`1004` (authentication) | [`Outcome::KeyRejected`] | the key | none (disabled once proven the key's fault) |
//! | OpenAI | 429 with `error.code` or `error.type` `insufficient_quota` (billing) | [`Outcome::QuotaExhausted`]: not retried | the key | [`Backoff::quota_wait`](crate::Backoff::quota_wait) |
//! | | other 429 (limits are per organisation and model) | [`Outcome::AccountLimited`] | the model | `Retry-After`, else the reset headers, else the backoff |
//! | Anthropic | 529 (overloaded, platform-wide) | [`Outcome::Failure`] | | none |
//! | | 429 (limits are per organisation and model class) | [`Outcome::AccountLimited`] | the model | `Retry-After`, else the backoff |
//! | Gemini | 429 `RESOURCE_EXHAUSTED`, `QuotaFailure` with a per-minute `quotaId` (or none), even beside a per-day one | [`Outcome::RateLimited`] | the model | `RetryInfo.retryDelay` (a 39 s throttle rests 39 s) |
//! | | 429 `QuotaFailure` with per-day `quotaId`s only | [`Outcome::QuotaExhausted`] | the model (`...PerModel...` ids), else the key | until midnight Pacific time |
//! | | 400 with `ErrorInfo.reason` `API_KEY_INVALID` | [`Outcome::KeyRejected`] | the key | none (disabled once proven the key's fault) |
//! | | 503 `UNAVAILABLE` (model overloaded) | [`Outcome::Failure`] | | none |
//!
//! A rest for a spent quota is capped at [`Backoff::max_quota_wait`](crate::Backoff::max_quota_wait)
//! (a day by default), any other at [`Backoff::max_retry_after`](crate::Backoff::max_retry_after).
//! `tests/provider_signals.rs` runs each Gemini and Zhipu signal, as the provider sends it,
//! through its profile and a pool with buckets.
//!
//! The scope ([`Outcome::scope`]) matters in a pool whose requests have buckets
//! ([`KeyPoolBuilder::router`](crate::KeyPoolBuilder)): "the model" rests the request's
//! bucket on the key (and, for an account limit, on the account's other keys), and the key
//! goes on serving other models; "the key" rests every bucket of it. In a pool with one
//! bucket, every outcome is the key's.
//!
//! Anything else falls back to [`generic`] (which also reads the rate-limit headers,
//! OpenAI's durations and Anthropic's RFC 3339 resets). Bodies are read only for error
//! statuses, and at most [`BODY_LIMIT`] bytes of them.
//!
//! Three header readers are public, for classifiers of your own: [`retry_after`] (the
//! `Retry-After` and `retry-after-ms` headers of a response), [`parse_retry_after`] (one
//! `Retry-After` value: delta-seconds or an HTTP date) and [`learned_reset`] (when the
//! rate-limit headers above say a used-up window resets). They take the wall clock's `now`
//! as an argument, so they are pure and testable.

pub(crate) mod limits;
mod profile;
mod retry_after;

pub use limits::learned_reset;
pub(crate) use limits::{days_from_civil, learned_reset_at};
#[cfg(fuzzing)]
pub(crate) use limits::{parse_go_duration, parse_rfc3339};
pub use profile::BODY_LIMIT;
pub use retry_after::{parse_retry_after, retry_after};

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{HeaderMap, StatusCode};

/// What a response says about the key that carried it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// The key was accepted (any answer that is not about the key's limits or validity).
    Success,
    /// The key was accepted, and the response's rate-limit headers say its window is now
    /// used up: it rests until the window resets, before it can be refused, and comes back
    /// with every slot. A reset later than
    /// [`Backoff::max_retry_after`](crate::Backoff::max_retry_after) is capped at it; such
    /// a rest ends before the window resets, and one probe request decides whether the
    /// key is back, as after a 429.
    SuccessAtLimit {
        /// When the provider's window resets.
        reset_after: Duration,
    },
    /// The key hit its limit. `retry_after` is the provider's own wait, if it gave one;
    /// otherwise the pool's exponential backoff applies.
    RateLimited {
        /// How long the provider asked us to wait.
        retry_after: Option<Duration>,
    },
    /// The *account* the key belongs to hit its limit: every key tagged with the same
    /// account rests (see [`KeySpec::account`](crate::KeySpec::account)).
    AccountLimited {
        /// How long the provider asked us to wait.
        retry_after: Option<Duration>,
    },
    /// Too many requests in flight at once (BigModel's `1302`): a limit of concurrency, not
    /// of rate. With other requests of the key at the provider, the key's concurrency limit
    /// drops to them (see [`KeyPoolBuilder::learn_concurrency`](crate::KeyPoolBuilder)) and
    /// the key does not rest: its slots come back as those requests finish, and a request
    /// waits for one instead of being refused again. Refused with nothing else in flight
    /// (the account's other users hold its slots), or with learning off, it rests as
    /// [`Outcome::AccountLimited`] does.
    ConcurrencyLimited {
        /// How long the provider asked us to wait, if it said.
        retry_after: Option<Duration>,
    },
    /// The key's quota is spent (daily quota, billing, arrears): a long rest until the
    /// reset, if known, else [`Backoff::quota_wait`](crate::Backoff::quota_wait); then one
    /// probe request decides whether it is back. Not worth retrying on another key of the
    /// same account.
    QuotaExhausted {
        /// When the quota resets, if the provider said.
        reset_after: Option<Duration>,
        /// What the spent quota covers: the whole key (a balance, an account's daily cap)
        /// or the request's bucket only (a model's daily quota).
        scope: Scope,
    },
    /// The key's credentials were refused (401/403: revoked, wrong, no permission). Counted;
    /// the key is disabled only when the request is proven not to blame (see
    /// [`RejectedKey`](crate::RejectedKey)): a caller's request can draw a 401/403 too.
    KeyRejected,
    /// A failure that says nothing about the key (5xx, platform overload, transport
    /// error). Counted only.
    Failure,
}

impl Outcome {
    /// Is this a refusal for limits (the request was not served and another key might)?
    pub fn is_rate_limited(&self) -> bool {
        matches!(
            self,
            Self::RateLimited { .. }
                | Self::AccountLimited { .. }
                | Self::ConcurrencyLimited { .. }
        )
    }

    /// What part of the key the outcome is about, in a pool whose requests have buckets
    /// ([`KeyPoolBuilder::router`](crate::KeyPoolBuilder)): a rate limit, a used-up
    /// window or an account's limit is about the request's bucket (providers meter each
    /// model apart); a spent quota says its own [`Scope`]; a refused credential and a
    /// failure are about the key. A pool with one bucket applies every outcome to the key.
    ///
    /// # Examples
    ///
    /// ```
    /// use tower_key_rotation::classify::{Outcome, Scope};
    ///
    /// assert_eq!(Outcome::RateLimited { retry_after: None }.scope(), Scope::Bucket);
    /// let billing = Outcome::QuotaExhausted { reset_after: None, scope: Scope::Key };
    /// assert_eq!(billing.scope(), Scope::Key);
    /// ```
    pub fn scope(&self) -> Scope {
        match self {
            Self::SuccessAtLimit { .. }
            | Self::RateLimited { .. }
            | Self::AccountLimited { .. }
            | Self::ConcurrencyLimited { .. }
            | Self::Success => Scope::Bucket,
            Self::QuotaExhausted { scope, .. } => *scope,
            Self::KeyRejected | Self::Failure => Scope::Key,
        }
    }
}

/// What part of a key a limit covers: one bucket of it (what the provider meters apart on
/// one key, usually the model) or all of it.
///
/// A pool whose requests carry buckets keeps each (key, bucket)'s in-flight count, rests,
/// probe, learned limit and quota apart: a refusal for one model rests that model on the
/// key, and the key goes on serving the others. What covers the key's account (a spent
/// balance, an account-wide daily or five-hour cap, a disabled key) rests every bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Scope {
    /// The request's bucket on this key (and, for [`Outcome::AccountLimited`], on every key
    /// of the account).
    Bucket,
    /// Every bucket of the key.
    Key,
}

/// Classifies a response by status and headers: the default rules.
///
/// - `429` → [`Outcome::RateLimited`], waiting for `Retry-After` / `retry-after-ms`, else
///   for the reset of an exhausted provider limit header ([`learned_reset`]);
/// - `401`, `403` → [`Outcome::KeyRejected`];
/// - `503` with `Retry-After` → [`Outcome::RateLimited`] for that long;
/// - other `5xx` → [`Outcome::Failure`];
/// - anything else → [`Outcome::Success`], or [`Outcome::SuccessAtLimit`] when the
///   provider's rate-limit headers say a limit is used up.
///
/// # Examples
///
/// ```
/// use http::{HeaderMap, StatusCode};
/// use std::time::Duration;
/// use tower_key_rotation::classify::{Outcome, generic};
///
/// let mut headers = HeaderMap::new();
/// headers.insert("retry-after", "2".parse().unwrap());
/// assert_eq!(
///     generic(StatusCode::TOO_MANY_REQUESTS, &headers),
///     Outcome::RateLimited { retry_after: Some(Duration::from_secs(2)) },
/// );
/// assert_eq!(generic(StatusCode::UNAUTHORIZED, &headers), Outcome::KeyRejected);
/// ```
pub fn generic(status: StatusCode, headers: &HeaderMap) -> Outcome {
    match status {
        StatusCode::TOO_MANY_REQUESTS => {
            let now = SystemTime::now();
            Outcome::RateLimited {
                retry_after: retry_after(headers, now).or_else(|| learned_reset(headers, now)),
            }
        }
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Outcome::KeyRejected,
        StatusCode::SERVICE_UNAVAILABLE => match retry_after(headers, SystemTime::now()) {
            Some(wait) => Outcome::RateLimited {
                retry_after: Some(wait),
            },
            None => Outcome::Failure,
        },
        s if s.is_server_error() => Outcome::Failure,
        _ if headers.is_empty() => Outcome::Success,
        _ => match learned_reset_at(headers, SystemTime::now) {
            Some(reset_after) => Outcome::SuccessAtLimit { reset_after },
            None => Outcome::Success,
        },
    }
}

type HeadFn = dyn Fn(StatusCode, &HeaderMap) -> Outcome + Send + Sync;
type UnreachedFn = dyn Fn(&(dyn StdError + 'static)) -> bool + Send + Sync;
type BodyFn = dyn Fn(StatusCode, &HeaderMap, &[u8]) -> Outcome + Send + Sync;
type WantsBodyFn = dyn Fn(StatusCode) -> bool + Send + Sync;

/// A replaceable classifier: a function from a response to an [`Outcome`].
///
/// Providers signal limits differently (some answer 403 or 503 for a rate limit, some put
/// the reason in a JSON error body); give the pool your own with
/// [`KeyPoolBuilder::classifier`](crate::KeyPoolBuilder::classifier), or one of the
/// built-in provider profiles ([`Classifier::bigmodel`], [`Classifier::openai`],
/// [`Classifier::anthropic`]).
///
/// # Examples
///
/// ```
/// use http::StatusCode;
/// use tower_key_rotation::classify::{Classifier, Outcome, generic};
///
/// // A provider that says "rate limited" with 403 and a header.
/// let classifier = Classifier::new(|status, headers| {
///     if status == StatusCode::FORBIDDEN && headers.contains_key("x-throttled") {
///         Outcome::RateLimited { retry_after: None }
///     } else {
///         generic(status, headers)
///     }
/// });
/// # let _ = classifier;
/// ```
#[derive(Clone)]
pub struct Classifier {
    head: Arc<HeadFn>,
    body: Option<BodyRule>,
    unreached: Option<Arc<UnreachedFn>>,
}

#[derive(Clone)]
struct BodyRule {
    wants: Arc<WantsBodyFn>,
    limit: usize,
    classify: Arc<BodyFn>,
}

impl Classifier {
    /// A classifier that reads status and headers only.
    pub fn new(f: impl Fn(StatusCode, &HeaderMap) -> Outcome + Send + Sync + 'static) -> Self {
        Self {
            head: Arc::new(f),
            body: None,
            unreached: None,
        }
    }

    /// A classifier that also reads the response body, for the statuses `wants` selects
    /// (typically errors), up to `limit` bytes. The body is buffered before the response
    /// is handed on, then replayed in full to the caller; other statuses go through
    /// `classify` with an empty body and stream as usual.
    pub fn with_body(
        wants: impl Fn(StatusCode) -> bool + Send + Sync + 'static,
        limit: usize,
        classify: impl Fn(StatusCode, &HeaderMap, &[u8]) -> Outcome + Send + Sync + 'static,
    ) -> Self {
        let classify: Arc<BodyFn> = Arc::new(classify);
        let head_classify = classify.clone();
        Self {
            head: Arc::new(move |status, headers| head_classify(status, headers, &[])),
            body: Some(BodyRule {
                wants: Arc::new(wants),
                limit,
                classify,
            }),
            unreached: None,
        }
    }

    /// Tells which of the inner service's errors never reached the provider: a failed DNS
    /// lookup, a refused connection, a failed TLS handshake. Such an error says nothing
    /// about the key and is not counted against it. By default, an error with a refused
    /// connection ([`std::io::ErrorKind::ConnectionRefused`]) anywhere in its source chain.
    ///
    /// # Examples
    ///
    /// ```
    /// use tower_key_rotation::classify::Classifier;
    ///
    /// // A client whose connect errors are a type of its own.
    /// #[derive(Debug)]
    /// struct ConnectFailed;
    /// impl std::fmt::Display for ConnectFailed {
    ///     fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
    ///         f.write_str("could not connect")
    ///     }
    /// }
    /// impl std::error::Error for ConnectFailed {}
    ///
    /// let classifier = Classifier::default().unreached_if(|error| error.is::<ConnectFailed>());
    /// assert!(classifier.is_unreached(&ConnectFailed));
    /// ```
    #[must_use]
    pub fn unreached_if(
        mut self,
        f: impl Fn(&(dyn StdError + 'static)) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.unreached = Some(Arc::new(f));
        self
    }

    /// Did `error` come before the request reached the provider (see
    /// [`unreached_if`](Self::unreached_if))?
    pub fn is_unreached(&self, error: &(dyn StdError + 'static)) -> bool {
        match &self.unreached {
            Some(f) => f(error),
            None => connection_refused(error),
        }
    }

    /// Classifies one response by its head.
    pub fn classify(&self, status: StatusCode, headers: &HeaderMap) -> Outcome {
        (self.head)(status, headers)
    }

    /// Classifies one response by its head and (part of) its body.
    pub fn classify_with_body(
        &self,
        status: StatusCode,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Outcome {
        match &self.body {
            Some(rule) => (rule.classify)(status, headers, body),
            None => (self.head)(status, headers),
        }
    }

    /// How many body bytes to read before classifying a response with `status`, if any.
    pub fn body_limit(&self, status: StatusCode) -> Option<usize> {
        let rule = self.body.as_ref()?;
        (rule.wants)(status).then_some(rule.limit)
    }
}

/// Is there a refused connection anywhere in `error`'s source chain?
pub(crate) fn connection_refused(error: &(dyn StdError + 'static)) -> bool {
    let mut source = Some(error);
    while let Some(error) = source {
        if error
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
        {
            return true;
        }
        source = error.source();
    }
    false
}

impl Default for Classifier {
    fn default() -> Self {
        Self::new(generic)
    }
}

impl fmt::Debug for Classifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.body.is_some() {
            "Classifier(head and body)"
        } else {
            "Classifier(head)"
        })
    }
}
