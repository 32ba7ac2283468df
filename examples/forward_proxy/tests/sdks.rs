//! The clients users really use: the official Python SDKs (openai, anthropic, zhipuai)
//! against the forward proxy, each in front of a local stand-in for its provider that
//! answers in the provider's own format, plain and streamed (`tests/sdk/clients.py`); and
//! the openai and anthropic SDKs making 20 calls at once, with their default `max_retries`,
//! through the proxy (default flags) in front of a provider that allows 2 requests in flight
//! per key: the proxy waits for capacity and says `x-should-retry: false`, so the SDKs never
//! retry and each call reaches the proxy once, also when the proxy gives up
//! (`tests/sdk/many_calls.py`).
//!
//! Ignored by `cargo test`: it needs Python 3 and installs the SDKs from PyPI into a venv
//! cached at `target/tmp/sdk-venv`. `.ci/run` runs it:
//! `cargo test -p forward_proxy --test sdks -- --ignored`.

mod support;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::limited::{Ledger, limited_provider};
use support::*;

const OPENAI_KEYS: &str = "sk-sdk-openai-1,sk-sdk-openai-2";
const ANTHROPIC_KEYS: &str = "sk-ant-sdk-1,sk-ant-sdk-2";
const BIGMODEL_KEYS: &str = "sdk-id-1.secret1,sdk-id-2.secret2";
const TEXT: [&str; 3] = ["Hello ", "from the ", "stand-in"];

/// The venv with the SDKs, made once under `target/` (the tests of this file run at the
/// same time: one of them makes it, the others wait for it).
fn venv_python() -> PathBuf {
    static VENV: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    VENV.get_or_init(make_venv).clone()
}

fn make_venv() -> PathBuf {
    let venv = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("sdk-venv");
    let python = venv.join("bin/python");
    let ready = || {
        std::process::Command::new(&python)
            .args(["-c", "import openai, anthropic, zhipuai"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if !ready() {
        let made = std::process::Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .expect("python3 (with venv) is needed for this test");
        assert!(made.success(), "python3 -m venv failed");
        let installed = std::process::Command::new(venv.join("bin/pip"))
            .args(["install", "-q", "openai", "anthropic", "zhipuai"])
            .status()
            .unwrap();
        assert!(installed.success(), "pip install of the SDKs failed");
        assert!(ready(), "the SDKs do not import after pip install");
    }
    python
}

/// Runs `tests/sdk/<script>` with the venv's Python, `args` and `env`, within a minute;
/// whether it succeeded, and what it printed (stdout, then stderr).
async fn run_script(script: &str, args: &[&str], env: &[(&str, String)]) -> (bool, String) {
    let python = tokio::task::spawn_blocking(venv_python).await.unwrap();
    let path = format!("{}/tests/sdk/{script}", env!("CARGO_MANIFEST_DIR"));
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(&python)
            .arg(path)
            .args(args)
            .envs(env.iter().map(|(name, value)| (name, value)))
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("{script} took over a minute"))
    .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), said)
}

fn json_response(body: serde_json::Value) -> http::Response<MockBody> {
    http::Response::builder()
        .header("content-type", "application/json")
        .body(full(body.to_string()))
        .unwrap()
}

fn sse(events: Vec<(Option<&str>, serde_json::Value)>, done: bool) -> http::Response<MockBody> {
    let mut text = String::new();
    for (event, data) in events {
        if let Some(event) = event {
            text.push_str(&format!("event: {event}\n"));
        }
        text.push_str(&format!("data: {data}\n\n"));
    }
    if done {
        text.push_str("data: [DONE]\n\n");
    }
    http::Response::builder()
        .header("content-type", "text/event-stream")
        .body(full(text))
        .unwrap()
}

/// OpenAI's chat completion format (BigModel speaks it too).
fn chat_completion(stream: bool) -> http::Response<MockBody> {
    let base = serde_json::json!({"id": "chatcmpl-1", "created": 1_700_000_000, "model": "test"});
    if !stream {
        let mut body = base;
        body["object"] = "chat.completion".into();
        body["choices"] = serde_json::json!([{
            "index": 0,
            "message": {"role": "assistant", "content": TEXT.concat()},
            "finish_reason": "stop"
        }]);
        body["usage"] =
            serde_json::json!({"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4});
        return json_response(body);
    }
    let chunk = |delta: serde_json::Value, finish: Option<&str>| {
        let mut chunk = base.clone();
        chunk["object"] = "chat.completion.chunk".into();
        chunk["choices"] =
            serde_json::json!([{"index": 0, "delta": delta, "finish_reason": finish}]);
        (None, chunk)
    };
    let mut events = vec![chunk(
        serde_json::json!({"role": "assistant", "content": ""}),
        None,
    )];
    for part in TEXT {
        events.push(chunk(serde_json::json!({"content": part}), None));
    }
    events.push(chunk(serde_json::json!({}), Some("stop")));
    sse(events, true)
}

/// Anthropic's Messages format.
fn anthropic_message(stream: bool) -> http::Response<MockBody> {
    let message = serde_json::json!({
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-test",
        "content": [], "stop_reason": null, "stop_sequence": null,
        "usage": {"input_tokens": 1, "output_tokens": 1}
    });
    if !stream {
        let mut body = message;
        body["content"] = serde_json::json!([{"type": "text", "text": TEXT.concat()}]);
        body["stop_reason"] = "end_turn".into();
        return json_response(body);
    }
    let mut events = vec![
        (
            Some("message_start"),
            serde_json::json!({"type": "message_start", "message": message}),
        ),
        (
            Some("content_block_start"),
            serde_json::json!({"type": "content_block_start", "index": 0,
                "content_block": {"type": "text", "text": ""}}),
        ),
    ];
    for part in TEXT {
        events.push((
            Some("content_block_delta"),
            serde_json::json!({"type": "content_block_delta", "index": 0,
                "delta": {"type": "text_delta", "text": part}}),
        ));
    }
    events.extend([
        (
            Some("content_block_stop"),
            serde_json::json!({"type": "content_block_stop", "index": 0}),
        ),
        (
            Some("message_delta"),
            serde_json::json!({"type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": null},
                "usage": {"output_tokens": 3}}),
        ),
        (
            Some("message_stop"),
            serde_json::json!({"type": "message_stop"}),
        ),
    ]);
    sse(events, false)
}

/// The provider's answer to a request it serves: a chat completion (openai, zhipuai) or
/// a message (anthropic), streamed if the request asks.
fn answer(seen: &Seen) -> http::Response<MockBody> {
    let body: serde_json::Value = serde_json::from_slice(&seen.body).unwrap_or_default();
    let stream = body["stream"] == true;
    if seen.target.ends_with("/chat/completions") {
        chat_completion(stream)
    } else if seen.target == "/v1/messages" {
        anthropic_message(stream)
    } else {
        reply(404, "no such route in the stand-in")
    }
}

#[tokio::test]
#[ignore = "installs the SDKs from PyPI into target/tmp/sdk-venv: run by .ci/run"]
async fn the_official_python_sdks_work_through_the_proxy_plain_and_streamed() {
    // The venv first: making it may take longer than a proxy waits for nothing.
    tokio::task::spawn_blocking(venv_python).await.unwrap();
    let upstream = MockUpstream::start(|seen| async move { answer(&seen) }).await;
    let proxy = |profile: &str, var: &str, keys: &str| {
        let mut config = ProxyConfig::new(&upstream.url(""), "").arg("--profile", profile);
        config.env = vec![(var.into(), keys.into())];
        config
    };
    let openai = proxy("openai", "OPENAI_API_KEY", OPENAI_KEYS).start().await;
    let anthropic = proxy("anthropic", "ANTHROPIC_API_KEY", ANTHROPIC_KEYS)
        .arg("--auth", "header:x-api-key")
        .start()
        .await;
    let bigmodel = proxy("bigmodel", "BIGMODEL_API_KEY", BIGMODEL_KEYS)
        .start()
        .await;

    let (ok, said) = run_script(
        "clients.py",
        &[],
        &[
            ("OPENAI_PROXY", openai.url("")),
            ("ANTHROPIC_PROXY", anthropic.url("")),
            ("BIGMODEL_PROXY", bigmodel.url("")),
        ],
    )
    .await;
    assert!(ok, "{said}");
    assert_eq!(said.matches("ok ").count(), 6, "{said}");

    // Every request carried one of the proxy's keys, in the provider's place for it.
    let all_keys: Vec<&str> = [OPENAI_KEYS, ANTHROPIC_KEYS, BIGMODEL_KEYS]
        .iter()
        .flat_map(|list| list.split(','))
        .collect();
    let seen = upstream.seen();
    assert_eq!(seen.len(), 6, "{seen:?}");
    for request in &seen {
        let key = match request.headers.get("x-api-key") {
            Some(value) => value.to_str().unwrap().to_owned(),
            None => request.bearer().unwrap_or_default(),
        };
        assert!(
            all_keys.contains(&key.as_str()),
            "{}: not a proxy key",
            request.target
        );
    }
    for proxy in [&openai, &anthropic, &bigmodel] {
        proxy.assert_log_has_no_secret(&all_keys);
    }
}

// ---------------------------------------------------------------------------------------
// Many calls at once against a provider that enforces a per-key limit
// ---------------------------------------------------------------------------------------

const LIMITED_KEYS: [&str; 3] = ["sk-limited-1", "sk-limited-2", "sk-limited-3"];

/// A provider speaking the openai and anthropic formats (plain and streamed) that allows
/// `limit` requests in flight per key and refuses more with `429` + `Retry-After: secs`
/// (`limit` 0: refuses everything).
async fn limited(limit: u32, secs: &'static str) -> (MockUpstream, Arc<Mutex<Ledger>>) {
    limited_provider(&LIMITED_KEYS, limit, secs, answer).await
}

/// Runs `tests/sdk/many_calls.py <sdk> <calls> <expect>` against `proxy`; its output, and
/// whether it succeeded.
async fn concurrent_sdk_calls(
    proxy: &Proxy,
    sdk: &str,
    calls: usize,
    expect: &str,
) -> (bool, String) {
    run_script(
        "many_calls.py",
        &[sdk, &calls.to_string(), expect],
        &[("PROXY", proxy.url(""))],
    )
    .await
}

/// Requests that reached the proxy from clients: the sum of `keyrotation_responses_total`.
async fn client_requests(proxy: &Proxy) -> u64 {
    let metrics = get(&proxy.url("/_keyrotation/metrics")).await;
    metrics
        .body
        .lines()
        .filter(|line| line.starts_with("keyrotation_responses_total{"))
        .map(|line| line.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

/// The README's proxy command: upstream, listen address and keys, nothing else.
fn default_proxy(upstream: &MockUpstream) -> ProxyConfig {
    ProxyConfig::new(&upstream.url(""), &LIMITED_KEYS.join(","))
}

/// 20 concurrent calls with the SDK's default `max_retries`, half streamed, through the
/// proxy with default flags in front of a provider allowing 2 in flight per key (3 keys).
/// Before the proxy waited for capacity this gave 20 × 200 but 56 upstream calls (36
/// refused): the proxy and the SDK both retried.
async fn twenty_calls_through_a_limited_provider(
    sdk: &str,
    proxy: ProxyConfig,
    ledger: &Mutex<Ledger>,
) {
    let proxy = proxy.start().await;
    let (ok, said) = concurrent_sdk_calls(&proxy, sdk, 20, "ok").await;
    let ledger = ledger.lock().unwrap().clone();
    let timeline = ledger.timeline(&LIMITED_KEYS);
    println!(
        "{sdk}: {} upstream calls, {} refused, {} requests at the proxy\n{said}{timeline:?}",
        ledger.arrivals.len(),
        ledger.refused(),
        client_requests(&proxy).await,
    );
    // Every call succeeded, none retried by the SDK (`retries_taken` 0, checked by the
    // script) ...
    assert!(ok, "{said}\n{timeline:?}");
    assert_eq!(said.matches("ok ").count(), 20, "{said}");
    // ... and the proxy saw each call exactly once.
    assert_eq!(client_requests(&proxy).await, 20, "{said}\n{timeline:?}");
    // 20 accepted upstream calls; refusals only in the first burst (6 taken at once, the
    // rest refused at most once per key), none after the first rest of 1 s.
    let accepted = ledger.arrivals.len() - ledger.refused();
    assert_eq!(accepted, 20, "{timeline:?}");
    assert!(ledger.refused() <= 14 * 3, "{timeline:?}");
    let first = ledger.arrivals[0].1;
    assert!(
        ledger
            .arrivals
            .iter()
            .filter(|(_, _, refused)| *refused)
            .all(|(_, at, _)| at.duration_since(first) < Duration::from_millis(900)),
        "refused after the first burst: {timeline:?}"
    );
    for key in keys(&proxy).await {
        assert_eq!(key["in_flight"], 0, "{key}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "installs the SDKs from PyPI into target/tmp/sdk-venv: run by .ci/run"]
async fn openai_sdk_twenty_at_once_all_succeed_and_the_sdk_never_retries() {
    let (upstream, ledger) = limited(2, "1").await;
    twenty_calls_through_a_limited_provider("openai", default_proxy(&upstream), &ledger).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "installs the SDKs from PyPI into target/tmp/sdk-venv: run by .ci/run"]
async fn anthropic_sdk_twenty_at_once_all_succeed_and_the_sdk_never_retries() {
    let (upstream, ledger) = limited(2, "1").await;
    // Anthropic wants the key in `x-api-key`; otherwise the README's flags. (With
    // `--profile anthropic` a 429 is an account's limit, which teaches no per-key
    // concurrency limit: refusals come again after the first rest.)
    let proxy = default_proxy(&upstream).arg("--auth", "header:x-api-key");
    twenty_calls_through_a_limited_provider("anthropic", proxy, &ledger).await;
}

/// The proxy gives up: every key refuses everything for 5 s and the wait budget is 1 s.
/// The SDK, default `max_retries`, must not retry the proxy's answer: exactly one request
/// per SDK call reaches the proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "installs the SDKs from PyPI into target/tmp/sdk-venv: run by .ci/run"]
async fn when_the_proxy_gives_up_the_sdk_does_not_retry_its_answer() {
    let (upstream, ledger) = limited(0, "5").await;
    let proxy = default_proxy(&upstream)
        .arg("--max-wait", "1")
        .start()
        .await;
    let calls = 6;
    let (ok, said) = concurrent_sdk_calls(&proxy, "openai", calls, "refused").await;
    let ledger = ledger.lock().unwrap().clone();
    let at_proxy = client_requests(&proxy).await;
    println!(
        "gives up: {} upstream calls, {} refused, {at_proxy} requests at the proxy\n{said}{:?}",
        ledger.arrivals.len(),
        ledger.refused(),
        ledger.timeline(&LIMITED_KEYS)
    );
    assert!(ok, "{said}");
    assert_eq!(
        at_proxy,
        calls as u64,
        "{said}\n{:?}",
        ledger.timeline(&LIMITED_KEYS)
    );
    // Nothing went upstream after the first burst: no key was sent on while it rested
    // (5 s), and neither the proxy nor the SDK came back when the rests ended.
    let first = ledger.arrivals[0].1;
    assert!(
        ledger
            .arrivals
            .iter()
            .all(|(_, at, _)| at.duration_since(first) < Duration::from_secs(1)),
        "{:?}",
        ledger.timeline(&LIMITED_KEYS)
    );
    assert_eq!(
        said.matches("x-should-retry=false").count(),
        calls,
        "{said}"
    );
}

/// One condition, one answer: every key rests 60 s, past the default budget of 30 s. The
/// first call gets the provider's 429 (after each key refused it), the second the proxy's
/// own (no key asked): each SDK raises its `RateLimitError` for both, and neither call is
/// retried by the SDK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "installs the SDKs from PyPI into target/tmp/sdk-venv: run by .ci/run"]
async fn the_sdks_raise_the_same_error_whether_or_not_the_provider_was_asked() {
    for (sdk, profile) in [("openai", "openai"), ("anthropic", "anthropic")] {
        let (upstream, ledger) = limited(0, "60").await;
        let proxy = default_proxy(&upstream)
            .arg("--profile", profile)
            .env("OPENAI_API_KEY", &LIMITED_KEYS.join(","))
            .env("ANTHROPIC_API_KEY", &LIMITED_KEYS.join(","))
            .start()
            .await;
        let (ok, said) = run_script("same_error.py", &[sdk], &[("PROXY", proxy.url(""))]).await;
        assert!(ok, "{sdk}: {said}");
        assert!(said.contains("RateLimitError"), "{sdk}: {said}");
        assert_eq!(
            client_requests(&proxy).await,
            2,
            "{sdk}: the SDK retried: {said}"
        );
        let asked = ledger.lock().unwrap().arrivals.len();
        assert_eq!(
            asked,
            LIMITED_KEYS.len(),
            "{sdk}: only the first call went upstream"
        );
    }
}
