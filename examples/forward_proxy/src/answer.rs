//! The proxy's own answers: its refusals and the upstream's failures, as JSON in the
//! provider's error format (so that each SDK raises its usual exception), with the cause
//! in words.
//!
//! One condition, one answer: a request that cannot be served within its wait budget is
//! answered 429 with `Retry-After`, `retry-after-ms` and `x-should-retry: false` whether
//! the proxy decided it before sending (every key resting past the budget) or the
//! provider's own 429 came back after the retries; the SDKs raise their rate-limit error
//! for both and do not retry on their own.

use std::error::Error as StdError;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, LengthLimitError};
use tower::BoxError;
use tower_key_rotation::{AllKeysDisabled, CostTooLarge, NoKeyAvailable};

use crate::config::Profile;
use crate::connections::ConnectError;

const RETRY_AFTER_MS: HeaderName = HeaderName::from_static("retry-after-ms");
/// Every response body the proxy sends: the upstream's, streamed, or its own.
pub(crate) type Body = UnsyncBoxBody<Bytes, BoxError>;

/// A body of the proxy's own, whole.
pub(crate) fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Obeyed by the openai and anthropic SDKs: `false` and they do not retry.
const X_SHOULD_RETRY: HeaderName = HeaderName::from_static("x-should-retry");

/// The shape of an error body, after the provider's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrorFormat {
    /// `{"error": {"message", "type", "param", "code"}}` (OpenAI, and the generic profile:
    /// most providers and SDKs read it).
    OpenAi,
    /// `{"type": "error", "error": {"type", "message"}}` (Anthropic).
    Anthropic,
    /// `{"error": {"code", "message"}}` (Zhipu BigModel).
    BigModel,
}

impl From<Profile> for ErrorFormat {
    fn from(profile: Profile) -> Self {
        match profile {
            // Google's SDKs read `error.message` and the status: the OpenAI shape carries both.
            Profile::Generic | Profile::Openai | Profile::Gemini => Self::OpenAi,
            Profile::Anthropic => Self::Anthropic,
            Profile::Bigmodel => Self::BigModel,
        }
    }
}

impl ErrorFormat {
    /// An error answer: `code` is the proxy's name for the condition (every format
    /// carries it as `error.code`), `message` says it in words.
    pub(crate) fn answer(self, status: StatusCode, code: &str, message: &str) -> Response<Body> {
        let body = match self {
            Self::OpenAi => serde_json::json!({
                "error": {
                    "message": message,
                    "type": openai_type(status),
                    "param": null,
                    "code": code,
                }
            }),
            Self::Anthropic => serde_json::json!({
                "type": "error",
                "error": { "type": anthropic_type(status), "message": message, "code": code }
            }),
            Self::BigModel => serde_json::json!({
                "error": { "code": code, "message": message }
            }),
        };
        Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, "application/json")
            .body(full(body.to_string()))
            .expect("static response")
    }
}

/// OpenAI's `error.type` for a status (its API reference's error codes).
fn openai_type(status: StatusCode) -> &'static str {
    match status {
        StatusCode::TOO_MANY_REQUESTS => "requests",
        s if s.is_client_error() => "invalid_request_error",
        _ => "server_error",
    }
}

/// Anthropic's `error.type` for a status (its API's "Errors" page).
fn anthropic_type(status: StatusCode) -> &'static str {
    match status {
        StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
        StatusCode::UNAUTHORIZED => "authentication_error",
        StatusCode::FORBIDDEN => "permission_error",
        StatusCode::NOT_FOUND => "not_found_error",
        StatusCode::PAYLOAD_TOO_LARGE => "request_too_large",
        s if s.is_client_error() => "invalid_request_error",
        StatusCode::SERVICE_UNAVAILABLE => "overloaded_error",
        _ => "api_error",
    }
}

/// Tells SDKs not to retry an answer the proxy already retried or waited for, and (for a
/// refusal) when to come back, in the millisecond form the openai SDK reads first.
pub(crate) fn no_more_retries(headers: &mut HeaderMap) {
    headers.insert(X_SHOULD_RETRY, HeaderValue::from_static("false"));
    if headers.contains_key(RETRY_AFTER_MS) {
        return;
    }
    let wait = headers
        .get(header::RETRY_AFTER)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| {
            tower_key_rotation::classify::parse_retry_after(value, std::time::SystemTime::now())
        });
    if let Some(wait) = wait {
        let ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
        headers.insert(RETRY_AFTER_MS, HeaderValue::from(ms));
    }
}

/// 413: the request body is larger than `--max-body-size`.
pub(crate) fn too_large(format: ErrorFormat, max: u64) -> Response<Body> {
    format.answer(
        StatusCode::PAYLOAD_TOO_LARGE,
        "request_too_large",
        &format!(
            "the request body is larger than this proxy accepts ({max} bytes, --max-body-size)"
        ),
    )
}

/// 401: the proxy's access token is missing or wrong.
pub(crate) fn unauthorized(format: ErrorFormat) -> Response<Body> {
    let mut response = format.answer(
        StatusCode::UNAUTHORIZED,
        "invalid_access_token",
        "this proxy requires its access token: `Authorization: Bearer <token>` (or \
         `x-api-key`, `api-key`, `x-goog-api-key`, a `key` query parameter)",
    );
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

/// What the proxy answers for a request that failed without an answer from the upstream.
pub(crate) struct Failure<'a> {
    pub(crate) format: ErrorFormat,
    /// The upstream's host and port, named in the message.
    pub(crate) upstream: &'a str,
    pub(crate) max_body_size: u64,
}

impl Failure<'_> {
    /// The proxy's own failures, as JSON. Upstream answers (429s included) never come
    /// here: they pass through as they are.
    pub(crate) fn answer(&self, error: &BoxError) -> Response<Body> {
        let format = self.format;
        let upstream = self.upstream;
        if let Some(tls) = crate::tls::failure(error.as_ref()) {
            tracing::warn!("request failed: TLS with {upstream}: {}", tls.reason);
            let code = if tls.certificate {
                "upstream_certificate"
            } else {
                "upstream_tls"
            };
            let message = format!("TLS with the upstream {upstream}: {}", tls.reason);
            return format.answer(StatusCode::BAD_GATEWAY, code, &message);
        }
        if has_source::<LengthLimitError>(error.as_ref()) {
            tracing::info!("request refused: its body is larger than --max-body-size");
            return too_large(format, self.max_body_size);
        }
        tracing::warn!("request failed: {}", chain(error.as_ref()));
        if let Some(no_key) = error.downcast_ref::<NoKeyAvailable>() {
            return no_key_in_time(format, no_key);
        }
        if let Some(too_large) = error.downcast_ref::<CostTooLarge>() {
            // No wait makes it fit: not a rate limit an SDK should retry.
            return format.answer(
                StatusCode::PAYLOAD_TOO_LARGE,
                "tokens_exceed_limit",
                &too_large.to_string(),
            );
        }
        if error.downcast_ref::<AllKeysDisabled>().is_some() {
            return format.answer(
                StatusCode::SERVICE_UNAVAILABLE,
                "all_keys_disabled",
                "the provider rejected every configured API key (each was refused where \
                 another key served the same request)",
            );
        }
        let connect = has_source::<ConnectError>(error.as_ref());
        if error
            .downcast_ref::<tower::timeout::error::Elapsed>()
            .is_some()
            || is_timeout(error.as_ref())
        {
            let message = if connect {
                format!("connecting to the upstream {upstream} timed out (--connect-timeout)")
            } else {
                format!(
                    "the upstream {upstream} did not answer in time (--request-timeout for \
                     the response head)"
                )
            };
            return format.answer(StatusCode::GATEWAY_TIMEOUT, "upstream_timeout", &message);
        }
        let message = if connect {
            format!(
                "cannot connect to the upstream {upstream}: {}",
                connect_cause(error.as_ref())
            )
        } else {
            format!(
                "the connection to the upstream {upstream} failed before its answer: {}",
                innermost(error.as_ref())
            )
        };
        format.answer(StatusCode::BAD_GATEWAY, "upstream_unreachable", &message)
    }
}

/// 429 for a request no key could take within its wait budget: the same status,
/// headers and body shape as the provider's own 429 passed on after the retries.
fn no_key_in_time(format: ErrorFormat, no_key: &NoKeyAvailable) -> Response<Body> {
    let wait = no_key.retry_after();
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    let mut response = format.answer(
        StatusCode::TOO_MANY_REQUESTS,
        match format {
            ErrorFormat::OpenAi => "rate_limit_exceeded",
            ErrorFormat::Anthropic | ErrorFormat::BigModel => "no_key_available",
        },
        &format!(
            "every API key of this proxy is rate limited or busy past this request's wait \
             budget (--max-wait); retry after {} s",
            secs.max(1)
        ),
    );
    let headers = response.headers_mut();
    headers.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
    headers.insert(
        RETRY_AFTER_MS,
        HeaderValue::from(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1)),
    );
    // The proxy waited as long as it was allowed to.
    headers.insert(X_SHOULD_RETRY, HeaderValue::from_static("false"));
    response
}

/// Why a connection could not be made, in words: the host did not resolve, refused, or
/// something else (then the innermost error's words).
fn connect_cause(error: &(dyn StdError + 'static)) -> String {
    let mut source = Some(error);
    while let Some(error) = source {
        if let Some(io) = error.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::ConnectionRefused {
                return "the connection was refused (nothing listens there?)".to_owned();
            }
        }
        // hyper-util's connector names a failed lookup so (its `ConnectError`'s message).
        if error.to_string() == "dns error" {
            return format!("its host name does not resolve (DNS: {})", innermost(error));
        }
        source = error.source();
    }
    innermost(error)
}

/// The innermost error's words.
fn innermost(error: &(dyn StdError + 'static)) -> String {
    let mut last = error;
    while let Some(source) = last.source() {
        last = source;
    }
    last.to_string()
}

/// Does any error in `error`'s source chain (itself included) satisfy `test`?
fn any_in_chain(
    error: &(dyn StdError + 'static),
    test: impl Fn(&(dyn StdError + 'static)) -> bool,
) -> bool {
    let mut source = Some(error);
    while let Some(error) = source {
        if test(error) {
            return true;
        }
        source = error.source();
    }
    false
}

/// Is there an I/O timeout anywhere in the error's source chain?
pub(crate) fn is_timeout(error: &(dyn StdError + 'static)) -> bool {
    any_in_chain(error, |error| {
        error
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::TimedOut)
    })
}

/// Is there an `E` anywhere in the error's source chain?
pub(crate) fn has_source<E: StdError + 'static>(error: &(dyn StdError + 'static)) -> bool {
    any_in_chain(error, |error| error.is::<E>())
}

/// `outer: inner: innermost`, for one log line.
fn chain(error: &(dyn StdError + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(error) = source {
        text.push_str(": ");
        text.push_str(&error.to_string());
        source = error.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn body(response: Response<Body>) -> serde_json::Value {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn each_format_is_the_providers_and_carries_the_code() {
        let status = StatusCode::TOO_MANY_REQUESTS;
        let openai = body(ErrorFormat::OpenAi.answer(status, "c", "m")).await;
        assert_eq!(openai["error"]["type"], "requests");
        assert_eq!(openai["error"]["code"], "c");
        assert_eq!(openai["error"]["message"], "m");
        let anthropic = body(ErrorFormat::Anthropic.answer(status, "c", "m")).await;
        assert_eq!(anthropic["type"], "error");
        assert_eq!(anthropic["error"]["type"], "rate_limit_error");
        assert_eq!(anthropic["error"]["code"], "c");
        let bigmodel = body(ErrorFormat::BigModel.answer(status, "c", "m")).await;
        assert_eq!(bigmodel["error"]["code"], "c");
        assert_eq!(bigmodel["error"]["message"], "m");
    }
}
