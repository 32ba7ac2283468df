//! Admission: what the proxy answers itself instead of forwarding (CONNECT, a target
//! naming another host, admin routes, a missing access token, a declared body too large).

use http::header::{self, HeaderValue};
use http::uri::Authority;
use http::{Method, Request, Response, StatusCode};

use super::State;
use super::rewrite::{API_KEY, KEY_PARAMETER, X_API_KEY, X_GOOG_API_KEY};
use crate::admin;
use crate::answer;
use crate::answer::Body;
use crate::config::AccessToken;
use crate::h1::server::ReceivedBody;

/// The proxy's own answer to a request it does not forward, or `None` for a request to
/// send upstream.
pub(super) fn answer_locally(state: &State, req: &Request<ReceivedBody>) -> Option<Response<Body>> {
    if req.method() == Method::CONNECT {
        let response = state.error_format.answer(
            StatusCode::BAD_REQUEST,
            "connect_not_supported",
            "CONNECT is not supported: this proxy only reaches its configured upstream",
        );
        return Some(response);
    }
    if let Some(authority) = req.uri().authority() {
        if !is_own_authority(state, authority) {
            let response = state.error_format.answer(
                StatusCode::BAD_REQUEST,
                "foreign_host",
                "this proxy only reaches its configured upstream; send origin-form requests",
            );
            return Some(response);
        }
    }
    let path = req.uri().path();
    let admitted = state
        .access_token
        .as_ref()
        .is_none_or(|token| presents(token, req));
    if path.starts_with(admin::PREFIX) {
        if !admitted && !admin::is_public(path) {
            return Some(answer::unauthorized(state.error_format));
        }
        return Some(admin::respond(state, req.method(), path));
    }
    if !admitted {
        return Some(answer::unauthorized(state.error_format));
    }
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > state.max_body_size) {
        return Some(answer::too_large(state.error_format, state.max_body_size));
    }
    None
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

/// The value of the first `key` parameter of a query, as sent (not percent-decoded).
fn key_parameter(query: &str) -> Option<&str> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find_map(|(name, value)| (name == KEY_PARAMETER).then_some(value))
}

/// Does the request present the proxy's access token, in any of the places a client's
/// SDK may put a credential (`Authorization: Bearer`, `x-api-key`, `api-key`,
/// `x-goog-api-key`, a `key` query parameter)?
fn presents(token: &AccessToken, req: &Request<ReceivedBody>) -> bool {
    let headers = req.headers();
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
    let named = [X_API_KEY, API_KEY, X_GOOG_API_KEY]
        .into_iter()
        .filter_map(|name| headers.get(name).map(HeaderValue::as_bytes));
    let query = req.uri().query().and_then(key_parameter).map(str::as_bytes);
    bearer
        .into_iter()
        .chain(named)
        .chain(query)
        .any(|given| token.matches(given))
}
