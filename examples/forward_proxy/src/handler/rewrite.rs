//! The request as the upstream gets it: within the upstream's path prefix, in origin
//! form, without the client's credentials (headers and the `key` query parameter) and
//! without hop-by-hop fields.

use http::Uri;
use http::Version;
use http::header::{self, HeaderMap, HeaderName};
use http::request::Parts;

/// Rewrites a request's head for the upstream; `false` (the head untouched) when its path
/// cannot go under the upstream's path prefix.
pub(super) fn for_upstream(parts: &mut Parts) -> bool {
    // Only a path can go under the upstream's path: the asterisk-form `OPTIONS *
    // HTTP/1.1` would be joined into `<prefix>*`, outside it (found by fuzz/proxy_request).
    let within_prefix = parts.uri.path().starts_with('/') && !has_dot_segment(parts.uri.path());
    if !within_prefix {
        return false;
    }
    // The upstream's connections take the path and query below the upstream URL's path
    // and put the upstream's scheme, host and path in front (`Connections`): an
    // origin-form target goes on as it came, an absolute-form one (HTTP/2, or naming this
    // proxy) loses its scheme and authority.
    if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
        parts.uri = parts
            .uri
            .path_and_query()
            .cloned()
            .map_or_else(|| Uri::from_static("/"), Uri::from);
    }
    // A client's key in the query (Google's `key=`) goes no further than its headers do.
    if let Some(target) = parts.uri.path_and_query().and_then(without_key_parameter) {
        parts.uri = Uri::from(target);
    }
    // The client speaks to us in whatever version; the upstream connection picks its own
    // (HTTP/2 by ALPN where offered).
    parts.version = Version::HTTP_11;
    remove_unforwarded(&mut parts.headers, Message::Request);
    true
}

/// `.` and `..` segments (also percent-encoded) would let a request climb out of the
/// upstream's path prefix once the upstream normalises the path.
fn has_dot_segment(path: &str) -> bool {
    // Without a `.` or a `%` there is none: one vectorised scan for the usual path.
    memchr::memchr2(b'.', b'%', path.as_bytes()).is_some() && path.split('/').any(is_dot_segment)
}

/// `.` or `..`, each dot possibly written `%2e` or `%2E` (no allocation: this runs on
/// every request).
fn is_dot_segment(segment: &str) -> bool {
    let mut rest = segment.as_bytes();
    let mut dots = 0;
    while !rest.is_empty() {
        rest = match rest {
            [b'.', tail @ ..] => tail,
            [b'%', b'2', e, tail @ ..] if e.eq_ignore_ascii_case(&b'e') => tail,
            _ => return false,
        };
        dots += 1;
    }
    dots == 1 || dots == 2
}

/// Which message a field list belongs to (see [`remove_unforwarded`]).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Message {
    Request,
    Response,
}

/// Removes what the proxy never forwards: the hop-by-hop fields (RFC 9110 §7.6.1), which
/// describe one connection, not the message, and those `Connection` lists; and from a
/// request also the client's credentials (for this proxy: the key layer adds the
/// provider's). The client's `Host` stays: the upstream connections put the upstream's
/// in its place as they write the request (`Connections`).
pub(super) fn remove_unforwarded(headers: &mut HeaderMap, message: Message) {
    // One pass over the names, no hashing: most messages carry none of them (an upstream's
    // answer at most `Connection`, which our HTTP/1 client already takes out). Names are matched as text (one length test for most):
    // comparing each with the `HeaderName`s cost ~100 instructions a field, and a remove
    // of an absent name ~150 (callgrind, benches/proxy_instructions.sh).
    let mut present = [false; UNFORWARDED.len()];
    let mut any = false;
    for name in headers.keys() {
        if let Some(i) = unforwarded_index(name.as_str()) {
            if i < HOP_BY_HOP || message == Message::Request {
                present[i] = true;
                any = true;
            }
        }
    }
    if !any {
        return;
    }
    // Names listed in `Connection` (present[0]) beyond those removed below: rarely any
    // (the usual list is `keep-alive`, compared as text, not parsed into a name).
    let mut listed: Vec<HeaderName> = Vec::new();
    if present[0] {
        for value in &headers.get_all(header::CONNECTION) {
            for token in value.as_bytes().split(|&b| b == b',') {
                let token = token.trim_ascii();
                let known = UNFORWARDED[..HOP_BY_HOP]
                    .iter()
                    .any(|hop| hop.as_str().as_bytes().eq_ignore_ascii_case(token));
                if !known {
                    if let Ok(name) = HeaderName::from_bytes(token) {
                        listed.push(name);
                    }
                }
            }
        }
    }
    for name in listed {
        headers.remove(name);
    }
    for (name, present) in UNFORWARDED.iter().zip(present) {
        if present {
            headers.remove(name);
        }
    }
}

/// The position of `name` (lowercase, as `HeaderName`s are) in [`UNFORWARDED`].
fn unforwarded_index(name: &str) -> Option<usize> {
    match name {
        "connection" => Some(0),
        "te" => Some(1),
        "trailer" => Some(2),
        "transfer-encoding" => Some(3),
        "upgrade" => Some(4),
        "proxy-authenticate" => Some(5),
        "keep-alive" => Some(6),
        "proxy-connection" => Some(7),
        "authorization" => Some(8),
        "proxy-authorization" => Some(9),
        "x-api-key" => Some(10),
        "api-key" => Some(11),
        "x-goog-api-key" => Some(12),
        _ => None,
    }
}

/// How many of [`UNFORWARDED`] are hop-by-hop (the first ones); the rest are a request's.
const HOP_BY_HOP: usize = 8;

static UNFORWARDED: [HeaderName; 13] = [
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    // The credentials a client may send, in every placement a provider reads (the
    // proxy's access token may arrive in any of them): the pool's key is the only one the
    // provider sees. A client's own key sent along would draw the provider's 401 for it.
    header::AUTHORIZATION,
    header::PROXY_AUTHORIZATION,
    X_API_KEY,
    HeaderName::from_static("api-key"),
    X_GOOG_API_KEY,
];

pub(super) const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
pub(super) const X_GOOG_API_KEY: HeaderName = HeaderName::from_static("x-goog-api-key");
pub(super) const API_KEY: HeaderName = HeaderName::from_static("api-key");

/// The query parameter Google's APIs read a key from.
pub(super) const KEY_PARAMETER: &str = "key";

/// The `path?query` of `target` without its `key` parameters, or `None` when it has none
/// (the usual request: one scan of the query, no allocation).
fn without_key_parameter(target: &http::uri::PathAndQuery) -> Option<http::uri::PathAndQuery> {
    let query = target.query()?;
    if !query.split('&').any(is_key_parameter) {
        return None;
    }
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| !is_key_parameter(pair))
        .collect();
    let mut rebuilt = String::with_capacity(target.as_str().len());
    rebuilt.push_str(target.path());
    if !kept.is_empty() {
        rebuilt.push('?');
        rebuilt.push_str(&kept.join("&"));
    }
    // Made of the parts of a valid target: still valid.
    http::uri::PathAndQuery::try_from(rebuilt).ok()
}

/// `key=...` or a bare `key`.
fn is_key_parameter(pair: &str) -> bool {
    pair.split_once('=').map_or(pair, |(name, _)| name) == KEY_PARAMETER
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    /// The definition `is_dot_segment` replaced (allocating), as the oracle.
    fn decoded_is_dot(segment: &str) -> bool {
        let decoded = segment.to_ascii_lowercase().replace("%2e", ".");
        decoded == "." || decoded == ".."
    }

    #[test]
    fn dot_segments_are_found_in_every_spelling_and_nothing_else() {
        for segment in [
            "",
            ".",
            "..",
            "...",
            "%2e",
            "%2E",
            "%2e%2E",
            ".%2e",
            "%2e.",
            "%2e%2e%2e",
            "%2",
            "%2f",
            "%%2e",
            "%2%2ee",
            ".a",
            "a.",
            "a",
            "%2ex",
            "x%2e",
            "%2E.",
            "..%2e",
        ] {
            assert_eq!(
                is_dot_segment(segment),
                decoded_is_dot(segment),
                "{segment:?}"
            );
        }
        assert!(has_dot_segment("/v4/%2E%2e/admin"));
        assert!(!has_dot_segment("/v4/chat/completions"));
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_lists_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-hop"),
        );
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert("x-hop", HeaderValue::from_static("1"));
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        remove_unforwarded(&mut headers, Message::Response);
        let left: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, ["content-type"]);

        let mut plain = HeaderMap::new();
        plain.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        remove_unforwarded(&mut plain, Message::Response);
        assert_eq!(plain.len(), 1);

        // Listed names in any case and spacing; a listed hop-by-hop name is removed once.
        let mut listed = HeaderMap::new();
        listed.insert(
            header::CONNECTION,
            HeaderValue::from_static(" Keep-Alive ,X-Hop,, close"),
        );
        listed.insert("x-hop", HeaderValue::from_static("1"));
        listed.insert("close", HeaderValue::from_static("1"));
        listed.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        listed.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        remove_unforwarded(&mut listed, Message::Response);
        let left: Vec<&str> = listed.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, ["accept"]);
    }

    #[test]
    fn a_requests_credentials_are_removed_and_a_responses_are_not() {
        let fields = |message| {
            let mut headers = HeaderMap::new();
            headers.insert(header::HOST, HeaderValue::from_static("proxy.test"));
            headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer t"));
            headers.insert(
                header::PROXY_AUTHORIZATION,
                HeaderValue::from_static("Basic x"),
            );
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            headers.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
            remove_unforwarded(&mut headers, message);
            let left: Vec<String> = headers.keys().map(|n| n.as_str().to_owned()).collect();
            left
        };
        assert_eq!(fields(Message::Request), ["host", "accept"]);
        assert_eq!(
            fields(Message::Response),
            ["host", "authorization", "proxy-authorization", "accept"]
        );
    }

    #[test]
    fn every_unforwarded_name_is_found_at_its_position_and_no_other_name_is() {
        for (i, name) in UNFORWARDED.iter().enumerate() {
            assert_eq!(unforwarded_index(name.as_str()), Some(i), "{name}");
        }
        for name in ["content-type", "host", "connectio", "tes", "x-keep-alive"] {
            assert_eq!(unforwarded_index(name), None, "{name}");
        }
    }
}
