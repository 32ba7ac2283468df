//! One client request: admit it, rewrite it for the upstream, send it through the key
//! layers, and stream the answer back.

use std::convert::Infallible;
use std::error::Error as StdError;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::Authority;
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tokio::time::Instant;
use tower::{BoxError, ServiceExt};
use tower_key_rotation::retry::{Attempts, ReplayBody};
use tower_key_rotation::{AllKeysDisabled, KeyPool, NoKeyAvailable, TriedKeys};

use crate::admin;
use crate::config::{AccessToken, Upstream as UpstreamUrl};
use crate::metrics::Metrics;
use crate::upstream::Upstream;

/// Every response body the proxy sends: the upstream's, streamed, or its own.
pub(crate) type Body = UnsyncBoxBody<Bytes, BoxError>;

/// Shared by every connection.
pub(crate) struct State {
    pub(crate) pool: KeyPool,
    pub(crate) upstream_url: UpstreamUrl,
    pub(crate) upstream: Upstream,
    pub(crate) access_token: Option<AccessToken>,
    pub(crate) metrics: Metrics,
    pub(crate) retry_body_limit: usize,
    pub(crate) listen: SocketAddr,
}

pub(crate) fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// An OpenAI-style JSON error, so clients' SDKs show the message.
pub(crate) fn json_error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    let body = serde_json::json!({
        "error": { "message": message, "type": "key_rotation_proxy", "code": code }
    });
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(full(body.to_string()))
        .expect("static response")
}

pub(crate) async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let started = Instant::now();
    let method = req.method().clone();
    // The path only: a query string is the client's business and stays out of logs.
    let path = req.uri().path().to_owned();
    let (mut response, tried) = proxy(&state, req).await;
    let waited = response
        .extensions_mut()
        .remove::<Waited>()
        .map_or(std::time::Duration::ZERO, |waited| waited.0);
    let elapsed = started.elapsed();
    let status = response.status();
    let latency_ms = elapsed.as_millis();
    if path.starts_with(admin::PREFIX) {
        tracing::debug!("{method} {path} -> {}", status.as_u16());
        return Ok(response);
    }
    state
        .metrics
        .observe(status, elapsed, tried.len().saturating_sub(1), waited);
    let keys = state.pool.len();
    match tried.last() {
        Some(key) if tried.len() > 1 => tracing::info!(
            "Using key {key}/{keys}: {method} {path} -> {} in {latency_ms} ms (keys tried: {tried:?})",
            status.as_u16()
        ),
        Some(key) => tracing::info!(
            "Using key {key}/{keys}: {method} {path} -> {} in {latency_ms} ms",
            status.as_u16()
        ),
        None => tracing::info!(
            "No key used: {method} {path} -> {} in {latency_ms} ms",
            status.as_u16()
        ),
    }
    Ok(response)
}

/// The response, and the 1-based positions of the keys tried, in order (empty when the
/// request never reached the key layer).
async fn proxy(state: &State, req: Request<Incoming>) -> (Response<Body>, Vec<usize>) {
    if req.method() == Method::CONNECT {
        let response = json_error(
            StatusCode::BAD_REQUEST,
            "connect_not_supported",
            "CONNECT is not supported: this proxy only reaches its configured upstream",
        );
        return (response, Vec::new());
    }
    if let Some(authority) = req.uri().authority() {
        if !is_own_authority(state, authority) {
            let response = json_error(
                StatusCode::BAD_REQUEST,
                "foreign_host",
                "this proxy only reaches its configured upstream; send origin-form requests",
            );
            return (response, Vec::new());
        }
    }
    let path = req.uri().path();
    let admitted = state.access_token.as_ref().is_none_or(|token| {
        token.admits(
            req.headers()
                .get(header::AUTHORIZATION)
                .map(HeaderValue::as_bytes),
        )
    });
    if path.starts_with(admin::PREFIX) {
        if !admitted && !admin::is_public(path) {
            return (unauthorized(), Vec::new());
        }
        return (admin::respond(state, req.method(), path), Vec::new());
    }
    if !admitted {
        return (unauthorized(), Vec::new());
    }

    let (mut parts, body) = req.into_parts();
    let path_and_query = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    // Only a path can go under the prefix: the asterisk-form `OPTIONS * HTTP/1.1` would be
    // joined into `<prefix>*`, outside it (found by fuzz/proxy_request).
    let within_prefix = parts.uri.path().starts_with('/') && !has_dot_segment(parts.uri.path());
    let joined = within_prefix
        .then(|| state.upstream_url.join(path_and_query).ok())
        .flatten();
    let Some(uri) = joined else {
        let response = json_error(
            StatusCode::BAD_REQUEST,
            "bad_path",
            "the request path is not valid",
        );
        return (response, Vec::new());
    };
    parts.uri = uri;
    // The client speaks to us in whatever version; the upstream connection picks its own
    // (HTTP/2 by ALPN where offered).
    parts.version = Version::HTTP_11;
    remove_hop_by_hop(&mut parts.headers);
    // The client's credentials are for this proxy; the key layer adds the provider's.
    parts.headers.remove(header::AUTHORIZATION);
    parts.headers.remove(header::PROXY_AUTHORIZATION);
    parts.headers.remove(header::HOST);
    parts.extensions = http::Extensions::new();
    let tried = TriedKeys::new();
    parts.extensions.insert(tried.clone());

    let body = match ReplayBody::buffer(body, state.retry_body_limit).await {
        Ok(body) => body,
        Err(error) => {
            tracing::debug!("reading the request body failed: {error}");
            let response = json_error(
                StatusCode::BAD_REQUEST,
                "bad_request_body",
                "the request body could not be read",
            );
            return (response, Vec::new());
        }
    };
    let result = state
        .upstream
        .clone()
        .oneshot(Request::from_parts(parts, body))
        .await;
    let tried = tried.positions();
    match result {
        Ok(response) => {
            let (mut parts, body) = response.into_parts();
            remove_hop_by_hop(&mut parts.headers);
            if let Some(attempts) = parts.extensions.get::<Attempts>() {
                // We already retried or waited for this answer: an SDK retrying it again
                // would only stack its retries on ours.
                no_more_retries(&mut parts.headers);
                let waited = Waited(attempts.waited());
                parts.extensions.insert(waited);
            }
            let body = body.map_err(BoxError::from).boxed_unsync();
            (Response::from_parts(parts, body), tried)
        }
        Err(error) => {
            let mut response = error_response(&error);
            if let Some(no_key) = error.downcast_ref::<NoKeyAvailable>() {
                response.extensions_mut().insert(Waited(no_key.waited()));
            }
            (response, tried)
        }
    }
}

/// How long a request waited for a key, passed from `proxy` to the metrics.
#[derive(Clone, Copy)]
struct Waited(std::time::Duration);

/// `.` and `..` segments (also percent-encoded) would let a request climb out of the
/// upstream's path prefix once the upstream normalises the path.
fn has_dot_segment(path: &str) -> bool {
    path.split('/').any(|segment| {
        let decoded = segment.to_ascii_lowercase().replace("%2e", ".");
        decoded == "." || decoded == ".."
    })
}

fn unauthorized() -> Response<Body> {
    let mut response = json_error(
        StatusCode::UNAUTHORIZED,
        "invalid_access_token",
        "this proxy requires `Authorization: Bearer <access token>`",
    );
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

/// Absolute-form targets may name the upstream or this proxy, nothing else: a key must
/// never travel to a host the operator did not configure.
fn is_own_authority(state: &State, authority: &Authority) -> bool {
    if *authority == state.upstream_url.authority {
        return true;
    }
    let port_matches = authority.port_u16() == Some(state.listen.port());
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    port_matches
        && (host.eq_ignore_ascii_case("localhost")
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip == state.listen.ip()))
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) describe one connection, not the message.
fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::try_from(name.trim()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHENTICATE,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
    ] {
        headers.remove(name);
    }
}

const RETRY_AFTER_MS: HeaderName = HeaderName::from_static("retry-after-ms");
/// Obeyed by the openai and anthropic SDKs: `false` and they do not retry.
const X_SHOULD_RETRY: HeaderName = HeaderName::from_static("x-should-retry");

/// Tells SDKs not to retry an answer the proxy already retried or waited for, and (for a
/// refusal) when to come back, in the millisecond form the openai SDK reads first.
fn no_more_retries(headers: &mut HeaderMap) {
    headers.insert(X_SHOULD_RETRY, HeaderValue::from_static("false"));
    if headers.contains_key(RETRY_AFTER_MS) {
        return;
    }
    let wait = headers
        .get(header::RETRY_AFTER)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| {
            tower_key_rotation::parse_retry_after(value, std::time::SystemTime::now())
        });
    if let Some(wait) = wait {
        let ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
        headers.insert(RETRY_AFTER_MS, HeaderValue::from(ms));
    }
}

/// The proxy's own failures, as JSON. Upstream answers (429s included) never come here:
/// they pass through as they are.
fn error_response(error: &BoxError) -> Response<Body> {
    tracing::warn!("request failed: {}", chain(error.as_ref()));
    if let Some(no_key) = error.downcast_ref::<NoKeyAvailable>() {
        let wait = no_key.retry_after();
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        let mut response = json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_key_available",
            "every API key is busy or rate limited; retry later",
        );
        let headers = response.headers_mut();
        headers.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        headers.insert(
            RETRY_AFTER_MS,
            HeaderValue::from(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1)),
        );
        // The proxy waited as long as it was allowed to.
        headers.insert(X_SHOULD_RETRY, HeaderValue::from_static("false"));
        return response;
    }
    if error.downcast_ref::<AllKeysDisabled>().is_some() {
        return json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "all_keys_disabled",
            "the provider rejected every configured API key",
        );
    }
    if error
        .downcast_ref::<tower::timeout::error::Elapsed>()
        .is_some()
        || is_timeout(error.as_ref())
    {
        return json_error(
            StatusCode::GATEWAY_TIMEOUT,
            "upstream_timeout",
            "the upstream did not answer in time",
        );
    }
    json_error(
        StatusCode::BAD_GATEWAY,
        "upstream_unreachable",
        "the upstream could not be reached",
    )
}

/// Is there an I/O timeout anywhere in the error's source chain?
pub(crate) fn is_timeout(error: &(dyn StdError + 'static)) -> bool {
    let mut source = Some(error);
    while let Some(error) = source {
        if error
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::TimedOut)
        {
            return true;
        }
        source = error.source();
    }
    false
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
