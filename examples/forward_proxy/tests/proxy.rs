//! The forward proxy example, run as a real process against a mock upstream on 127.0.0.1.
//!
//! Each test starts its own upstream and proxy (`--listen 127.0.0.1:0`; the proxy logs the
//! address it bound). Every test ends by checking that no key value reached the proxy's log
//! or the client.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use tokio::net::TcpStream;

const KEYS: [&str; 3] = ["sk-alpha-7f3a", "sk-bravo-91c2", "sk-charlie-5d0e"];
const KEY_LIST: &str = "sk-alpha-7f3a, sk-bravo-91c2, sk-charlie-5d0e";

fn key_position(key: &str) -> usize {
    KEYS.iter().position(|k| *k == key).map_or(0, |i| i + 1)
}

fn positions(upstream: &MockUpstream) -> Vec<usize> {
    upstream
        .keys_seen()
        .iter()
        .map(|k| key_position(k))
        .collect()
}

async fn ok_upstream() -> MockUpstream {
    MockUpstream::start(|_| async { reply(200, "{\"ok\":true}") }).await
}

#[tokio::test]
async fn requests_rotate_over_the_keys_with_the_clients_credentials_replaced() {
    let upstream = ok_upstream().await;
    let mut proxy = ProxyConfig::new(&upstream.url(""), KEY_LIST).start().await;
    proxy.wait_for_log("Loaded 3 API key(s)").await;

    for _ in 0..6 {
        let got = send(
            Request::post(proxy.url("/chat/completions"))
                .header("authorization", "Bearer client-own-token")
                .header("proxy-authorization", "Basic c2VjcmV0")
                .header("connection", "x-hop-header")
                .header("x-hop-header", "1")
                .header("keep-alive", "timeout=5")
                .header("x-end-to-end", "kept")
                .body(Full::new(Bytes::from("{}")))
                .unwrap(),
        )
        .await;
        assert_eq!(got.status, 200);
        assert_no_secret("a response", &got.text(), &KEYS);
    }

    assert_eq!(positions(&upstream), [1, 2, 3, 1, 2, 3]);
    for seen in upstream.seen() {
        let auth: Vec<_> = seen.headers.get_all("authorization").iter().collect();
        assert_eq!(auth.len(), 1, "exactly one credential: {auth:?}");
        assert!(!format!("{:?}", seen.headers).contains("client-own-token"));
        for hop in ["proxy-authorization", "x-hop-header", "keep-alive"] {
            assert!(seen.headers.get(hop).is_none(), "{hop} was forwarded");
        }
        assert_eq!(seen.headers["x-end-to-end"], "kept");
        assert_eq!(seen.body, "{}");
    }
    proxy
        .wait_for_log("Using key 3/3: POST /chat/completions -> 200")
        .await;
    proxy.assert_log_has_no_secret(&KEYS);
}

#[tokio::test]
async fn the_upstream_path_is_a_prefix_and_the_query_is_kept() {
    let upstream = ok_upstream().await;
    let proxy = ProxyConfig::new(&upstream.url("/api/paas/v4/"), KEY_LIST)
        .arg("--auth", "header:x-api-key")
        .start()
        .await;

    get(&proxy.url("/chat/completions?x=1&y=two")).await;
    get(&proxy.url("/")).await;

    let seen = upstream.seen();
    assert_eq!(seen[0].target, "/api/paas/v4/chat/completions?x=1&y=two");
    assert_eq!(seen[1].target, "/api/paas/v4/");
    // `--auth header:x-api-key` puts the bare key there, and no Authorization at all.
    assert_eq!(seen[0].headers["x-api-key"], KEYS[0]);
    assert!(seen[0].headers.get("authorization").is_none());
    assert_eq!(seen[0].headers["host"], upstream.addr.to_string());
    proxy.assert_log_has_no_secret(&KEYS);
}

#[tokio::test]
async fn a_429_is_resent_on_another_key_and_that_key_cools_down() {
    let upstream = MockUpstream::start(|seen: Seen| async move {
        if seen.bearer().as_deref() == Some(KEYS[0]) {
            let mut response = reply(429, "{\"error\":\"rate limited\"}");
            response
                .headers_mut()
                .insert("retry-after", "30".parse().unwrap());
            response
        } else {
            reply(200, "{\"ok\":true}")
        }
    })
    .await;
    // One state per key: this test is about the key's rest (tests/buckets.rs: per model).
    let mut proxy = ProxyConfig::new(&upstream.url(""), KEY_LIST)
        .arg("--buckets", "none")
        .start()
        .await;

    let got = post(&proxy.url("/chat/completions"), "{\"model\":\"m\"}").await;
    assert_eq!(got.status, 200, "{}", got.body);
    assert_eq!(positions(&upstream), [1, 2]);
    let seen = upstream.seen();
    assert_eq!(
        seen[0].body, seen[1].body,
        "the retry resends the same body"
    );

    // Key 1 rests for the Retry-After: the next requests go to keys 2 and 3 only.
    for _ in 0..4 {
        assert_eq!(get(&proxy.url("/models")).await.status, 200);
    }
    assert_eq!(positions(&upstream)[2..], [3, 2, 3, 2]);

    let keys = keys(&proxy).await;
    assert_eq!(keys[0]["rate_limited"], 1);
    let cooling = keys[0]["cooling_down_ms"].as_u64().unwrap();
    assert!((20_000..=30_000).contains(&cooling), "{cooling}");
    assert_eq!(keys[1]["cooling_down_ms"], 0);
    proxy.wait_for_log("key 1/3 rate limited").await;
    proxy.wait_for_log("429 from key 1/3; sending again").await;
    proxy
        .wait_for_log("Using key 2/3: POST /chat/completions -> 200")
        .await;
    proxy.wait_for_log("(keys tried: [1, 2])").await;
    let metrics = get(&proxy.url("/_keyrotation/metrics")).await;
    assert!(
        metrics.body.contains("keyrotation_retries_total 1\n"),
        "{}",
        metrics.body
    );
    proxy.assert_log_has_no_secret(&KEYS);
}

#[tokio::test]
async fn when_retries_are_spent_the_client_gets_the_last_429_with_its_headers() {
    let upstream = MockUpstream::start(|_| async {
        let mut response = reply(429, "{\"error\":\"slow down\"}");
        let headers = response.headers_mut();
        headers.insert("retry-after", "7".parse().unwrap());
        headers.insert("retry-after-ms", "7000".parse().unwrap());
        response
    })
    .await;
    let proxy = ProxyConfig::new(&upstream.url(""), KEY_LIST)
        .arg("--retries", "1")
        .start()
        .await;

    let got = post(&proxy.url("/chat/completions"), "{}").await;
    assert_eq!(got.status, 429);
    assert_eq!(got.headers["retry-after"], "7");
    assert_eq!(got.headers["retry-after-ms"], "7000");
    assert_eq!(got.body, "{\"error\":\"slow down\"}");
    // One retry, on a key not tried yet.
    assert_eq!(positions(&upstream), [1, 2]);
    proxy.assert_log_has_no_secret(&KEYS);
}

#[tokio::test]
async fn no_free_key_within_max_wait_gives_429_with_retry_after() {
    let (release, body) = channel_body();
    let held = std::sync::Mutex::new(Some(body));
    let upstream = MockUpstream::start(move |_| {
        // The first request streams until the test releases it; later ones answer at once.
        let body = held.lock().unwrap().take();
        async move {
            match body {
                Some(body) => http::Response::new(body),
                None => reply(200, "done"),
            }
        }
    })
    .await;
    let proxy = ProxyConfig::new(&upstream.url(""), "sk-only-one-key")
        .arg("--max-in-flight-per-key", "1")
        .arg("--max-wait", "0.3")
        .start()
        .await;

    // Hold the only slot with a streaming answer.
    let stream = open_stream(&proxy, "/stream").await;

    let started = tokio::time::Instant::now();
    let got = get(&proxy.url("/second")).await;
    // The provider's own answer to a request beyond its limit, in its format.
    assert_eq!(got.status, 429, "{}", got.body);
    assert!(started.elapsed() >= Duration::from_millis(250), "it waited");
    assert_eq!(got.headers["retry-after"], "1");
    assert_eq!(got.headers["x-should-retry"], "false");
    assert_eq!(got.json()["error"]["code"], "rate_limit_exceeded");
    assert_eq!(got.json()["error"]["type"], "requests");
    assert_eq!(upstream.seen().len(), 1, "the 429 was not forwarded");

    drop(release);
    drop(stream);
    proxy.assert_log_has_no_secret(&["sk-only-one-key"]);
}

#[tokio::test]
async fn a_waiting_request_is_served_when_a_slot_frees() {
    let (release, body) = channel_body();
    let held = std::sync::Mutex::new(Some(body));
    let upstream = MockUpstream::start(move |_| {
        let body = held.lock().unwrap().take();
        async move { body.map_or_else(|| reply(200, "second"), http::Response::new) }
    })
    .await;
    let proxy = ProxyConfig::new(&upstream.url(""), "sk-only-one-key")
        .arg("--max-in-flight-per-key", "1")
        .arg("--max-wait", "20")
        .start()
        .await;
    let mut stream = open_stream(&proxy, "/first").await;

    let waiting = tokio::spawn({
        let url = proxy.url("/second");
        async move { get(&url).await }
    });
    // The only slot is taken, so the second request cannot have been forwarded; with 20 s
    // of wait budget it is parked in the proxy rather than refused.
    wait_for_keys(&proxy, |keys| keys[0]["in_flight"] == 1).await;
    assert_eq!(upstream.seen().len(), 1);
    assert!(!waiting.is_finished());

    release.send(Bytes::from("last")).unwrap();
    drop(release);
    assert_eq!(stream.rest().await, "last");
    let got = within("the waiting request", waiting).await.unwrap();
    assert_eq!(got.status, 200);
    assert_eq!(got.body, "second");
}

#[tokio::test]
async fn fail_fast_when_every_key_cools_down_longer_than_the_wait_budget() {
    let upstream = MockUpstream::start(|_| async {
        let mut response = reply(429, "{}");
        response
            .headers_mut()
            .insert("retry-after", "120".parse().unwrap());
        response
    })
    .await;
    let proxy = ProxyConfig::new(&upstream.url(""), "sk-one-aaaa,sk-two-bbbb")
        .arg("--max-wait", "30")
        .start()
        .await;

    // Both keys answer 429 (the retry takes the second) and rest for two minutes.
    assert_eq!(get(&proxy.url("/a")).await.status, 429);
    assert_eq!(upstream.seen().len(), 2);

    let started = tokio::time::Instant::now();
    let got = get(&proxy.url("/b")).await;
    assert_eq!(
        got.status, 429,
        "the same answer as the provider's, without asking it"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "answered at once, not after --max-wait"
    );
    let retry_after: u64 = got.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((110..=120).contains(&retry_after), "{retry_after}");
    assert_eq!(upstream.seen().len(), 2);
}

/// A streaming response being read by the test, chunk by chunk.
struct OpenStream {
    body: hyper::body::Incoming,
    _connection: tokio::task::JoinHandle<()>,
}

impl OpenStream {
    async fn next_chunk(&mut self) -> Option<String> {
        within("a chunk", async {
            loop {
                match self.body.frame().await? {
                    Ok(frame) => {
                        if let Ok(data) = frame.into_data() {
                            return Some(String::from_utf8_lossy(&data).into_owned());
                        }
                    }
                    Err(e) => panic!("stream failed: {e}"),
                }
            }
        })
        .await
    }

    async fn rest(&mut self) -> String {
        let mut rest = String::new();
        while let Some(chunk) = self.next_chunk().await {
            rest.push_str(&chunk);
        }
        rest
    }
}

/// Opens a GET on its own connection whose answer streams; returns once the response head
/// arrived. Dropping it closes the connection, as a client going away does.
async fn open_stream(proxy: &Proxy, path: &str) -> OpenStream {
    within("a streaming response head", async {
        let stream = TcpStream::connect(proxy.addr).await.unwrap();
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        let connection = tokio::spawn(async move {
            let _ = connection.await;
        });
        let response = sender
            .send_request(
                Request::get(path)
                    .header("host", proxy.addr.to_string())
                    .body(Empty::<Bytes>::new())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        OpenStream {
            body: response.into_body(),
            _connection: connection,
        }
    })
    .await
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self._connection.abort();
    }
}

#[tokio::test]
async fn a_streamed_answer_reaches_the_client_chunk_by_chunk() {
    let (chunks, body) = channel_body();
    let held = std::sync::Mutex::new(Some(body));
    let upstream = MockUpstream::start(move |_| {
        let body = held.lock().unwrap().take().expect("one request");
        async move {
            http::Response::builder()
                .header("content-type", "text/event-stream")
                .body(body)
                .unwrap()
        }
    })
    .await;
    let proxy = ProxyConfig::new(&upstream.url(""), KEY_LIST).start().await;

    let mut stream = open_stream(&proxy, "/chat/completions").await;
    chunks.send(Bytes::from("data: one\n\n")).unwrap();
    // The first chunk arrives while the upstream still holds the rest of the stream.
    assert_eq!(stream.next_chunk().await.unwrap(), "data: one\n\n");
    assert_eq!(
        keys(&proxy).await[0]["in_flight"],
        1,
        "in flight while streaming"
    );

    chunks.send(Bytes::from("data: two\n\n")).unwrap();
    assert_eq!(stream.next_chunk().await.unwrap(), "data: two\n\n");
    drop(chunks);
    assert_eq!(stream.rest().await, "");
    wait_for_keys(&proxy, |keys| keys[0]["in_flight"] == 0).await;
}

#[tokio::test]
async fn a_client_going_away_mid_stream_releases_the_key() {
    let (chunks, body) = channel_body();
    let held = std::sync::Mutex::new(Some(body));
    let upstream = MockUpstream::start(move |_| {
        let body = held.lock().unwrap().take().expect("one request");
        async move { http::Response::new(body) }
    })
    .await;
    let proxy = ProxyConfig::new(&upstream.url(""), KEY_LIST).start().await;

    let mut stream = open_stream(&proxy, "/chat/completions").await;
    chunks.send(Bytes::from("data: one\n\n")).unwrap();
    stream.next_chunk().await.unwrap();
    assert_eq!(keys(&proxy).await[0]["in_flight"], 1);

    drop(stream);
    // The proxy drops the upstream answer, which closes the upstream's body channel.
    within("the upstream body to be dropped", chunks.closed()).await;
    wait_for_keys(&proxy, |keys| keys[0]["in_flight"] == 0).await;
}

#[tokio::test]
async fn a_401_disables_the_key_and_the_request_goes_to_another() {
    let upstream = MockUpstream::start(|seen: Seen| async move {
        if seen.bearer().as_deref() == Some(KEYS[1]) {
            reply(401, "{\"error\":\"invalid api key\"}")
        } else {
            reply(200, "ok")
        }
    })
    .await;
    // The most verbose log level: still no key in it.
    let mut proxy = ProxyConfig::new(&upstream.url(""), KEY_LIST)
        .arg("--log-level", "trace")
        .start()
        .await;

    let statuses: Vec<u16> = {
        let mut statuses = Vec::new();
        for _ in 0..5 {
            statuses.push(get(&proxy.url("/x")).await.status.as_u16());
        }
        statuses
    };
    // The 401 disables key 2 and its request goes to key 3; key 2 is then skipped.
    assert_eq!(statuses, [200, 200, 200, 200, 200]);
    assert_eq!(positions(&upstream), [1, 2, 3, 1, 3, 1]);
    let keys = keys(&proxy).await;
    assert_eq!(keys[1]["disabled"], true);
    assert_eq!(keys[0]["disabled"], false);
    proxy
        .wait_for_log("key 2/3 rejected by the provider; disabled")
        .await;
    proxy.assert_log_has_no_secret(&KEYS);
}

#[tokio::test]
async fn an_unreachable_upstream_gives_502_and_the_proxy_recovers_when_it_is_back() {
    // Reserve a port, then free it: nothing listens there until the upstream starts.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let mut proxy = ProxyConfig::new(&format!("http://{addr}"), KEY_LIST)
        .start()
        .await;

    let got = get(&proxy.url("/x")).await;
    assert_eq!(got.status, 502, "{}", got.body);
    assert_eq!(got.json()["error"]["code"], "upstream_unreachable");
    proxy.wait_for_log("request failed").await;

    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let upstream = MockUpstream::serve(listener, |_| async { reply(200, "back") });
    let got = get(&proxy.url("/x")).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.body, "back");
    assert_eq!(upstream.seen().len(), 1);
    proxy.assert_log_has_no_secret(&KEYS);
}

#[tokio::test]
async fn an_upstream_that_does_not_answer_in_time_gives_504() {
    let upstream = MockUpstream::start(|_| std::future::pending()).await;
    let proxy = ProxyConfig::new(&upstream.url(""), KEY_LIST)
        .arg("--request-timeout", "0.3")
        .start()
        .await;
    let got = get(&proxy.url("/slow")).await;
    assert_eq!(got.status, 504);
    assert_eq!(got.json()["error"]["code"], "upstream_timeout");
    // The proxy keeps serving.
    assert_eq!(get(&proxy.url("/_keyrotation/health")).await.status, 200);
}

#[tokio::test]
async fn with_an_access_token_only_clients_presenting_it_are_forwarded() {
    let upstream = ok_upstream().await;
    let token = "proxy-token-e1d2c3";
    let proxy = ProxyConfig::new(&upstream.url(""), KEY_LIST)
        .arg("--access-token-env", "PROXY_TOKEN")
        .env("PROXY_TOKEN", token)
        .start()
        .await;

    let without = get(&proxy.url("/x")).await;
    assert_eq!(without.status, 401);
    let wrong = send(
        Request::get(proxy.url("/x"))
            .header("authorization", "Bearer proxy-token-e1d2c4")
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(wrong.status, 401);
    let keys_route = get(&proxy.url("/_keyrotation/keys")).await;
    assert_eq!(keys_route.status, 401, "admin data needs the token too");
    assert_eq!(get(&proxy.url("/_keyrotation/health")).await.status, 200);
    assert!(upstream.seen().is_empty(), "nothing was forwarded");

    let right = send(
        Request::get(proxy.url("/x"))
            .header("authorization", format!("Bearer {token}"))
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(right.status, 200);
    let seen = upstream.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].bearer().as_deref(),
        Some(KEYS[0]),
        "the token is replaced"
    );
    let mut secrets = KEYS.to_vec();
    secrets.push(token);
    proxy.assert_log_has_no_secret(&secrets);
}

#[tokio::test]
async fn other_hosts_and_connect_are_refused_and_redirects_are_not_followed() {
    let upstream = MockUpstream::start(|seen: Seen| async move {
        if seen.target == "/moved" {
            http::Response::builder()
                .status(302)
                .header("location", "http://elsewhere.invalid/landing")
                .body(full(""))
                .unwrap()
        } else {
            reply(200, "ok")
        }
    })
    .await;
    let proxy = ProxyConfig::new(&upstream.url(""), KEY_LIST).start().await;

    let foreign = "GET http://elsewhere.invalid/steal HTTP/1.1\r\nHost: elsewhere.invalid\r\n\r\n";
    assert_eq!(raw_status(proxy.addr, foreign).await, 400);
    let connect = "CONNECT elsewhere.invalid:443 HTTP/1.1\r\nHost: elsewhere.invalid:443\r\n\r\n";
    assert_eq!(raw_status(proxy.addr, connect).await, 400);
    // Nor can a path climb out of the upstream's prefix.
    for path in ["/v4/../admin", "/%2e%2E/admin", "/./x"] {
        let raw = format!("GET {path} HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n\r\n");
        assert_eq!(raw_status(proxy.addr, &raw).await, 400, "{path}");
    }
    assert!(upstream.seen().is_empty());

    // Absolute-form naming the upstream itself is fine.
    let own = format!(
        "GET http://{0}/ok HTTP/1.1\r\nHost: {0}\r\nConnection: close\r\n\r\n",
        upstream.addr
    );
    assert_eq!(raw_status(proxy.addr, &own).await, 200);

    let got = get(&proxy.url("/moved")).await;
    assert_eq!(got.status, 302);
    assert_eq!(got.headers["location"], "http://elsewhere.invalid/landing");
    assert_eq!(
        upstream.seen().len(),
        2,
        "the redirect was handed back, not followed"
    );
}

#[tokio::test]
async fn admin_routes_answer_locally_with_key_stats_and_metrics() {
    let upstream = ok_upstream().await;
    let proxy = ProxyConfig::new(&upstream.url(""), KEY_LIST).start().await;
    for _ in 0..4 {
        get(&proxy.url("/x")).await;
    }

    let health = get(&proxy.url("/_keyrotation/health")).await;
    assert_eq!(health.status, 200);

    let keys = keys(&proxy).await;
    assert_eq!(keys.len(), 3);
    for (i, key) in keys.iter().enumerate() {
        assert_eq!(key["index"], i + 1);
        for field in [
            "in_flight",
            "requests",
            "rate_limited",
            "disabled",
            "cooling_down_ms",
        ] {
            assert!(key.get(field).is_some(), "{field} missing in {key}");
        }
    }
    let requests: Vec<_> = keys
        .iter()
        .map(|k| k["requests"].as_u64().unwrap())
        .collect();
    assert_eq!(requests, [2, 1, 1]);

    let metrics = get(&proxy.url("/_keyrotation/metrics")).await;
    assert_eq!(metrics.status, 200);
    assert!(
        metrics.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain"),
    );
    for line in [
        "keyrotation_key_requests_total{key=\"1\",name=\"\",account=\"\"} 2",
        "keyrotation_key_in_flight{key=\"3\",name=\"\",account=\"\"} 0",
        "keyrotation_key_disabled{key=\"2\",name=\"\",account=\"\"} 0",
        "keyrotation_responses_total{status=\"200\"} 4",
        "keyrotation_request_duration_seconds_count 4",
    ] {
        assert!(
            metrics.body.contains(line),
            "{line} missing in:\n{}",
            metrics.body
        );
    }
    assert_eq!(upstream.seen().len(), 4, "admin routes are never forwarded");
    for text in [health.text(), metrics.text()] {
        assert_no_secret("an admin response", &text, &KEYS);
    }
}

#[tokio::test]
async fn keys_can_come_from_a_dotenv_file() {
    let upstream = ok_upstream().await;
    let dir = empty_dir();
    std::fs::write(
        dir.join(".env"),
        "# keys\nMY_KEYS=sk-from-dotenv-1,sk-from-dotenv-2\n",
    )
    .unwrap();
    let mut config = ProxyConfig::new(&upstream.url(""), "")
        .arg("--keys-env", "MY_KEYS")
        .arg("--log-level", "debug");
    config.env.clear();
    config.dir = Some(dir);
    let mut proxy = config.start().await;
    proxy.wait_for_log("Loaded 2 API key(s)").await;
    get(&proxy.url("/x")).await;
    assert_eq!(upstream.keys_seen(), ["sk-from-dotenv-1"]);
    proxy.wait_for_log("Using key 1/2").await;
    proxy.assert_log_has_no_secret(&["sk-from-dotenv-1", "sk-from-dotenv-2"]);
}

#[tokio::test]
async fn bad_configuration_exits_non_zero_with_a_clear_message() {
    let base = |keys: &str| ProxyConfig::new("http://127.0.0.1:9", keys);
    let mut bad_listen = base("sk-good-1");
    bad_listen.args[1] = "127.0.0.1:99999".into();
    let cases = [
        (base(""), "BIGMODEL_API_KEY is empty: give the keys"),
        (base("sk-good-1,,sk-good-2"), "key 2 of 3 is empty"),
        (base("sk-dup-1,sk-dup-1"), "key 2 of 2"),
        (base("sk-\u{7}bell"), "key 1 of 1"),
        (
            ProxyConfig::new("ftp://example.invalid", "sk-good-1"),
            "http:// or https://",
        ),
        (
            ProxyConfig::new("not a url", "sk-good-1"),
            "not a valid URL",
        ),
        (
            base("sk-good-1").arg("--strategy", "random"),
            "possible values: round-robin, least-in-flight",
        ),
        (
            base("sk-good-1").arg("--no-such-flag", "1"),
            "unexpected argument",
        ),
        (
            base("sk-good-1").arg("--access-token-env", "UNSET_TOKEN"),
            "access token variable UNSET_TOKEN is not set",
        ),
        (bad_listen, "invalid value"),
    ];
    for (config, expected) in cases {
        let (status, stdout, stderr) = config.run_to_exit().await;
        assert!(!status.success(), "{:?} should fail", config.args);
        // clap's own errors keep its whole message (see tests/operator.rs).
        let is_clap = status.code() == Some(2);
        assert!(is_clap || stderr.lines().count() == 1, "one line: {stderr}");
        assert!(stderr.starts_with("forward_proxy: error: "), "{stderr}");
        assert!(stderr.contains(expected), "{expected:?} not in {stderr}");
        for secret in ["sk-good-1", "sk-good-2", "sk-dup-1", "bell"] {
            assert!(
                !stderr.contains(secret) && !stdout.contains(secret),
                "{stderr}"
            );
        }
    }
}

#[tokio::test]
async fn help_documents_every_flag_with_an_example() {
    let mut config = ProxyConfig::new("http://127.0.0.1:9", "");
    config.args = vec!["--help".into()];
    let (status, stdout, _) = config.run_to_exit().await;
    assert!(status.success());
    for flag in [
        "--listen",
        "--upstream",
        "--strategy",
        "--max-in-flight-per-key",
        "--retries",
        "--max-wait",
        "--keys-env",
        "--auth",
        "--access-token-env",
        "--connect-timeout",
        "--request-timeout",
        "--max-body-size",
        "--abandoned-grace",
        "--log-format",
        "cargo run --release -p forward_proxy",
    ] {
        assert!(stdout.contains(flag), "{flag} missing from --help");
    }
}

#[tokio::test]
async fn sigterm_lets_requests_in_flight_finish_then_exits_zero() {
    let (chunks, body) = channel_body();
    let held = std::sync::Mutex::new(Some(body));
    let upstream = MockUpstream::start(move |_| {
        let body = held.lock().unwrap().take().expect("one request");
        async move { http::Response::new(body) }
    })
    .await;
    let mut proxy = ProxyConfig::new(&upstream.url(""), KEY_LIST).start().await;
    let mut stream = open_stream(&proxy, "/long").await;
    chunks.send(Bytes::from("part one;")).unwrap();
    assert_eq!(stream.next_chunk().await.unwrap(), "part one;");

    proxy.terminate().await;
    proxy.wait_for_log("Shutting down").await;
    // No new connections once shutting down.
    assert!(TcpStream::connect(proxy.addr).await.is_err());

    chunks.send(Bytes::from("part two")).unwrap();
    drop(chunks);
    assert_eq!(stream.rest().await, "part two");
    assert!(proxy.wait().await.success());
    proxy.wait_for_log("Shut down cleanly").await;
}

#[tokio::test]
async fn clients_may_speak_http2() {
    let upstream = ok_upstream().await;
    let proxy = ProxyConfig::new(&upstream.url(""), KEY_LIST).start().await;
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<Empty<Bytes>>();
    let response = within(
        "an HTTP/2 response",
        client.request(Request::get(proxy.url("/h2")).body(Empty::new()).unwrap()),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(upstream.seen()[0].target, "/h2");
}

#[tokio::test]
async fn an_https_upstream_is_verified_and_reached_over_http2() {
    let upstream = MockUpstream::start_tls(|_| async { reply(200, "secure") }).await;

    // Signed by a CA the proxy does not know: refused, never sent a key.
    let untrusting = ProxyConfig::new(&upstream.https_url("/v4"), KEY_LIST)
        .start()
        .await;
    let got = get(&untrusting.url("/models")).await;
    assert_eq!(got.status, 502, "{}", got.body);
    assert!(upstream.seen().is_empty());

    let proxy = ProxyConfig::new(&upstream.https_url("/v4"), KEY_LIST)
        .arg("--upstream-ca", &test_ca_path())
        .start()
        .await;
    for _ in 0..2 {
        let got = get(&proxy.url("/models")).await;
        assert_eq!(got.status, 200, "{}", got.body);
        assert_eq!(got.body, "secure");
    }
    let seen = upstream.seen();
    assert_eq!(
        seen[0].version,
        http::Version::HTTP_2,
        "HTTP/2 chosen by ALPN"
    );
    assert_eq!(seen[0].target, "/v4/models");
    // The client's `Host` named the proxy; over HTTP/2 `:authority` names the upstream.
    assert!(
        seen[0].headers.get("host").is_none(),
        "{:?}",
        seen[0].headers
    );
    assert_eq!(positions(&upstream), [1, 2]);
    proxy.assert_log_has_no_secret(&KEYS);
    untrusting.assert_log_has_no_secret(&KEYS);
}

#[tokio::test]
async fn an_https_upstream_without_http2_is_reached_over_http1_on_kept_connections() {
    let upstream = MockUpstream::start_tls_http1(|seen| async move {
        reply(
            200,
            &format!("secure {}", String::from_utf8_lossy(&seen.body)),
        )
    })
    .await;
    let proxy = ProxyConfig::new(&upstream.https_url("/v4"), KEY_LIST)
        .arg("--upstream-ca", &test_ca_path())
        .arg("--workers", "1")
        .start()
        .await;
    for n in 0..3 {
        let got = post(&proxy.url("/chat/completions"), &format!("{{\"n\":{n}}}")).await;
        assert_eq!(got.status, 200, "{}", got.body);
        assert_eq!(got.body, format!("secure {{\"n\":{n}}}"));
    }
    let seen = upstream.seen();
    assert!(seen.iter().all(|s| s.version == http::Version::HTTP_11));
    assert_eq!(seen[0].target, "/v4/chat/completions");
    assert_eq!(positions(&upstream), [1, 2, 3]);
    assert_eq!(upstream.connections(), 1, "one TLS connection, kept alive");
    proxy.assert_log_has_no_secret(&KEYS);
}

/// Not a test: what the proxy costs per request. Run with
/// `cargo test --release -p forward_proxy --test proxy -- --ignored --nocapture measure`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check"]
async fn measure_proxy_overhead() {
    let upstream = ok_upstream().await;
    // Default settings, info log (one line per request) included.
    let proxy = ProxyConfig::new(&upstream.url(""), KEY_LIST).start().await;
    let client = client();
    let once = move |url: String| {
        let client = client.clone();
        async move {
            let started = tokio::time::Instant::now();
            let response = client
                .request(Request::get(url).body(Full::default()).unwrap())
                .await
                .unwrap();
            response.into_body().collect().await.unwrap();
            started.elapsed()
        }
    };
    let percentiles = |mut samples: Vec<Duration>| {
        samples.sort();
        let at = |p: f64| samples[((samples.len() - 1) as f64 * p) as usize];
        format!("p50 {:?}  p99 {:?}", at(0.5), at(0.99))
    };
    const N: usize = 2000;
    for (name, url) in [
        ("direct ", upstream.url("/x")),
        ("proxied", proxy.url("/x")),
    ] {
        for _ in 0..100 {
            once(url.clone()).await; // warm up connections
        }
        let mut samples = Vec::with_capacity(N);
        for _ in 0..N {
            samples.push(once(url.clone()).await);
        }
        println!("{name} sequential: {}", percentiles(samples));
    }
    let started = tokio::time::Instant::now();
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let url = proxy.url("/x");
            let once = once.clone();
            tokio::spawn(async move {
                for _ in 0..200 {
                    once(url.clone()).await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let elapsed = started.elapsed();
    println!(
        "proxied, 32 concurrent clients: {:.0} requests/s",
        6400.0 / elapsed.as_secs_f64()
    );
}

#[tokio::test]
async fn least_in_flight_sends_new_requests_past_a_busy_key() {
    let (chunks, body) = channel_body();
    let held = std::sync::Mutex::new(Some(body));
    let upstream = MockUpstream::start(move |_| {
        let body = held.lock().unwrap().take();
        async move { body.map_or_else(|| reply(200, "quick"), http::Response::new) }
    })
    .await;
    let proxy = ProxyConfig::new(&upstream.url(""), KEY_LIST)
        .arg("--strategy", "least-in-flight")
        .start()
        .await;

    // Key 1 stays busy with a stream; round-robin would come back to it, this does not.
    let stream = open_stream(&proxy, "/stream").await;
    for _ in 0..4 {
        assert_eq!(get(&proxy.url("/x")).await.status, 200);
    }
    assert_eq!(positions(&upstream), [1, 2, 3, 2, 3]);
    drop(chunks);
    drop(stream);
}

#[tokio::test]
async fn a_body_over_the_retry_limit_streams_through_and_is_not_retried() {
    let upstream = MockUpstream::start(|_| async { reply(429, "busy") }).await;
    let proxy = ProxyConfig::new(&upstream.url(""), KEY_LIST)
        .arg("--retry-body-limit", "1024")
        .arg("--retries", "1")
        .start()
        .await;

    let large = "x".repeat(100_000);
    let got = post(&proxy.url("/upload"), &large).await;
    assert_eq!(got.status, 429);
    let seen = upstream.seen();
    assert_eq!(seen.len(), 1, "not retried");
    assert_eq!(seen[0].body.len(), 100_000, "the whole body arrived");

    // A small body is retried (once, with --retries 1), on a key not resting (key 1 cools
    // after its 429).
    assert_eq!(post(&proxy.url("/small"), "{}").await.status, 429);
    assert_eq!(positions(&upstream), [1, 2, 3]);
}
