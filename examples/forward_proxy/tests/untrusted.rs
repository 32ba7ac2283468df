//! Untrusted callers: nothing one request carries may disable, rest or starve the keys
//! for the others. The real proxy process against provider stand-ins on 127.0.0.1.
//!
//! The stand-ins answer as Anthropic documents (<https://docs.anthropic.com/en/api/errors>):
//! 401 `authentication_error` for an `x-api-key` it does not know, 403 `permission_error`
//! for a resource the account may not use; and as OpenAI's `Authorization: Bearer`.

mod support;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use support::*;

const KEYS: [&str; 3] = ["sk-alpha-7f3a", "sk-bravo-91c2", "sk-charlie-5d0e"];
const KEY_LIST: &str = "sk-alpha-7f3a,sk-bravo-91c2,sk-charlie-5d0e";
/// What a client sends as its own credential; the provider must never see it.
const JUNK: &str = "junk-client-credential";

/// Anthropic's error body.
fn anthropic_error(status: u16, kind: &str, message: &str) -> http::Response<MockBody> {
    let body = serde_json::json!({
        "type": "error",
        "error": { "type": kind, "message": message }
    });
    let mut response = reply(status, &body.to_string());
    response
        .headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    response
}

/// A POST to `path` carrying `header: value` (if any).
fn request_with(url: &str, header: Option<(&str, String)>) -> Request<Full<Bytes>> {
    let mut request = Request::post(url).header("content-type", "application/json");
    if let Some((name, value)) = header {
        request = request.header(name, value);
    }
    request
        .body(Full::new(Bytes::from_static(br#"{"model":"m"}"#)))
        .unwrap()
}

/// Every placement a client's SDK may use for its own credential.
fn client_credentials() -> Vec<(&'static str, Option<(&'static str, String)>)> {
    vec![
        (
            "/v1/messages",
            Some(("authorization", format!("Bearer {JUNK}"))),
        ),
        (
            "/v1/messages",
            Some(("proxy-authorization", format!("Basic {JUNK}"))),
        ),
        ("/v1/messages", Some(("x-api-key", JUNK.to_owned()))),
        ("/v1/messages", Some(("api-key", JUNK.to_owned()))),
        ("/v1/messages", Some(("x-goog-api-key", JUNK.to_owned()))),
        ("/v1/messages?key=junk-client-credential&alt=sse", None),
        ("/v1/messages?alt=sse&key=junk-client-credential", None),
    ]
}

#[tokio::test]
async fn no_client_credential_reaches_the_provider_in_any_auth_mode() {
    // (flags, where the pool's key must be found)
    let modes: [(&[&str], &str); 4] = [
        (&[], "authorization"),
        (&["--auth", "header:x-api-key"], "x-api-key"),
        (&["--auth", "header:api-key"], "api-key"),
        (&["--profile", "anthropic"], "x-api-key"),
    ];
    for (flags, placement) in modes {
        let upstream = MockUpstream::start(|_| async { reply(200, "{}") }).await;
        let mut config =
            ProxyConfig::new(&upstream.url(""), KEY_LIST).env("ANTHROPIC_API_KEY", KEY_LIST);
        for pair in flags.chunks(2) {
            config = config.arg(pair[0], pair[1]);
        }
        let proxy = config.start().await;
        let cases = client_credentials();
        for (path, header) in &cases {
            let got = send(request_with(&proxy.url(path), header.clone())).await;
            assert_eq!(got.status, 200, "{flags:?} {path} {header:?}: {}", got.body);
        }
        let seen = upstream.seen();
        assert_eq!(seen.len(), cases.len());
        for (request, (path, header)) in seen.iter().zip(&cases) {
            let case = format!("{flags:?} {path} {header:?}");
            for (name, value) in &request.headers {
                let value = value.to_str().unwrap_or_default();
                assert!(!value.contains(JUNK), "{case}: {name}: {value} forwarded");
            }
            assert!(!request.target.contains(JUNK), "{case}: {}", request.target);
            assert!(
                request.target.contains("alt=sse") || !path.contains("alt=sse"),
                "{case}: the other parameters stay: {}",
                request.target
            );
            let key = request.headers[placement].to_str().unwrap();
            let key = key.strip_prefix("Bearer ").unwrap_or(key);
            assert!(KEYS.contains(&key), "{case}: the pool's key in {placement}");
            let credentials = ["authorization", "x-api-key", "api-key", "x-goog-api-key"];
            let carried = credentials
                .iter()
                .filter(|name| request.headers.contains_key(**name))
                .count();
            assert_eq!(
                carried, 1,
                "{case}: only the pool's key: {:?}",
                request.headers
            );
        }
        proxy.assert_log_has_no_secret(&KEYS);
    }
}

#[tokio::test]
async fn the_access_token_is_accepted_in_any_placement_and_never_forwarded() {
    let upstream = MockUpstream::start(|_| async { reply(200, "{}") }).await;
    let token = "proxy-access-token-1234";
    let proxy = ProxyConfig::new(&upstream.url(""), KEY_LIST)
        .arg("--access-token-env", "PROXY_TOKEN")
        .env("PROXY_TOKEN", token)
        .start()
        .await;
    let placements = [
        ("/x", Some(("authorization", format!("Bearer {token}")))),
        ("/x", Some(("x-api-key", token.to_owned()))),
        ("/x", Some(("api-key", token.to_owned()))),
        ("/x", Some(("x-goog-api-key", token.to_owned()))),
    ];
    for (path, header) in placements {
        let got = send(request_with(&proxy.url(path), header.clone())).await;
        assert_eq!(got.status, 200, "{header:?}: {}", got.body);
    }
    let got = send(request_with(&proxy.url(&format!("/x?key={token}")), None)).await;
    assert_eq!(got.status, 200, "{}", got.body);
    let got = send(request_with(
        &proxy.url("/x"),
        Some(("x-api-key", "wrong".to_owned())),
    ))
    .await;
    assert_eq!(got.status, 401);
    for request in upstream.seen() {
        for (name, value) in &request.headers {
            let value = value.to_str().unwrap_or_default();
            assert!(!value.contains(token), "{name}: {value}");
        }
        assert!(!request.target.contains(token), "{}", request.target);
    }
    assert_eq!(upstream.seen().len(), 5);
}

#[tokio::test]
async fn a_junk_x_api_key_through_the_anthropic_profile_disables_nothing() {
    // Anthropic: 401 `authentication_error` for an `x-api-key` it does not know.
    let upstream = MockUpstream::start(|seen: Seen| async move {
        let key = seen.headers.get("x-api-key").and_then(|v| v.to_str().ok());
        match key {
            Some(key) if KEYS.contains(&key) && !seen.headers.contains_key("authorization") => {
                reply(200, "{}")
            }
            _ => anthropic_error(401, "authentication_error", "invalid x-api-key"),
        }
    })
    .await;
    // The README's command for Anthropic: `--profile anthropic`, nothing else.
    let proxy = ProxyConfig::new(&upstream.url(""), KEY_LIST)
        .arg("--profile", "anthropic")
        .env("ANTHROPIC_API_KEY", KEY_LIST)
        .start()
        .await;
    for _ in 0..9 {
        let got = send(request_with(
            &proxy.url("/v1/messages"),
            Some(("x-api-key", JUNK.to_owned())),
        ))
        .await;
        assert_eq!(got.status, 200, "{}", got.body);
    }
    let keys = keys(&proxy).await;
    for key in &keys {
        assert_eq!(key["disabled"], false, "{keys:?}");
        assert_eq!(key["rejected"], 0, "{keys:?}");
    }
    assert_eq!(get(&proxy.url("/_keyrotation/health")).await.status, 200);
}

#[tokio::test]
async fn a_403_for_one_model_on_every_key_disables_none_and_other_models_are_served() {
    // Every key's account may not use `forbidden-model`: Anthropic's 403 permission_error.
    let upstream = MockUpstream::start(|seen: Seen| async move {
        if seen.body.windows(15).any(|w| w == b"forbidden-model") {
            anthropic_error(403, "permission_error", "not allowed to use this model")
        } else {
            reply(200, "{}")
        }
    })
    .await;
    let mut proxy = ProxyConfig::new(&upstream.url(""), KEY_LIST)
        .arg("--profile", "anthropic")
        .env("ANTHROPIC_API_KEY", KEY_LIST)
        .start()
        .await;
    for round in 1..=12 {
        let got = post(&proxy.url("/v1/messages"), r#"{"model":"forbidden-model"}"#).await;
        assert_eq!(got.status, 403, "{}", got.body);
        assert_eq!(got.json()["error"]["type"], "permission_error");
        assert_eq!(upstream.seen().len(), 2 * round, "two keys asked, no third");
    }
    proxy
        .wait_for_log("the request is to blame, not the keys")
        .await;
    let before = upstream.seen().len();
    for _ in 0..6 {
        let got = post(&proxy.url("/v1/messages"), r#"{"model":"allowed"}"#).await;
        assert_eq!(got.status, 200, "{}", got.body);
    }
    let served: std::collections::BTreeSet<String> = upstream.seen()[before..]
        .iter()
        .map(|seen| seen.headers["x-api-key"].to_str().unwrap().to_owned())
        .collect();
    assert_eq!(served.len(), 3, "every key still serves");
    let keys = keys(&proxy).await;
    assert!(keys.iter().all(|key| key["disabled"] == false), "{keys:?}");
    let rejected: u64 = keys
        .iter()
        .map(|key| key["rejected"].as_u64().unwrap())
        .sum();
    assert_eq!(rejected, 24);
    proxy.assert_log_has_no_secret(&KEYS);
}

#[tokio::test]
async fn one_revoked_key_among_three_is_disabled_and_every_client_gets_200() {
    let upstream = MockUpstream::start(|seen: Seen| async move {
        if seen.bearer().as_deref() == Some(KEYS[1]) {
            reply(
                401,
                r#"{"error":{"message":"invalid api key","code":"invalid_api_key"}}"#,
            )
        } else {
            reply(200, "{}")
        }
    })
    .await;
    let mut proxy = ProxyConfig::new(&upstream.url(""), KEY_LIST).start().await;
    let clients: Vec<_> = (0..30)
        .map(|_| {
            let url = proxy.url("/chat/completions");
            tokio::spawn(async move { post(&url, "{}").await.status })
        })
        .collect();
    for client in clients {
        assert_eq!(client.await.unwrap(), 200);
    }
    proxy
        .wait_for_log("key 2/3 rejected by the provider; disabled")
        .await;
    let keys = keys(&proxy).await;
    assert_eq!(keys[1]["disabled"], true, "{keys:?}");
    assert_eq!(keys[0]["disabled"], false);
    assert_eq!(keys[2]["disabled"], false);
    assert!(keys[1]["rejected"].as_u64().unwrap() >= 1);
    proxy.assert_log_has_no_secret(&KEYS);
}

#[tokio::test]
async fn an_unresolvable_upstream_is_a_502_naming_dns_and_the_host_and_blames_no_key() {
    // `.invalid` never resolves (RFC 6761).
    let mut proxy = ProxyConfig::new("http://upstream.invalid", KEY_LIST)
        .start()
        .await;
    let got = post(&proxy.url("/chat/completions"), "{}").await;
    assert_eq!(got.status, 502, "{}", got.body);
    let message = got.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(message.contains("upstream.invalid"), "{message}");
    assert!(message.contains("DNS"), "{message}");
    proxy.wait_for_log("request failed").await;
    let keys = keys(&proxy).await;
    for key in &keys {
        assert_eq!(key["failures"], 0, "not the key's fault: {keys:?}");
        assert_eq!(key["disabled"], false);
    }
    // Sent once more on a fresh connection at most, not once per key.
    let requests: u64 = keys
        .iter()
        .map(|key| key["requests"].as_u64().unwrap())
        .sum();
    assert!(requests <= 2, "{keys:?}");
}
