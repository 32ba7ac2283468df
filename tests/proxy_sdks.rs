//! The clients users really use: the official Python SDKs (openai, anthropic, zhipuai)
//! against the forward proxy, each in front of a local stand-in for its provider that
//! answers in the provider's own format, plain and streamed (`tests/sdk/clients.py`).
//!
//! Ignored by `cargo test`: it needs Python 3 and installs the SDKs from PyPI into a venv
//! cached at `target/sdk-venv`. `.ci/run` runs it:
//! `cargo test --test proxy_sdks -- --ignored`.

mod proxy_support;

use std::path::PathBuf;

use proxy_support::*;

const OPENAI_KEYS: &str = "sk-sdk-openai-1,sk-sdk-openai-2";
const ANTHROPIC_KEYS: &str = "sk-ant-sdk-1,sk-ant-sdk-2";
const BIGMODEL_KEYS: &str = "sdk-id-1.secret1,sdk-id-2.secret2";
const TEXT: [&str; 3] = ["Hello ", "from the ", "stand-in"];

/// The venv with the SDKs, made (once) under `target/`.
fn venv_python() -> PathBuf {
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/sdk-venv");
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

#[tokio::test]
#[ignore = "installs the SDKs from PyPI into target/sdk-venv: run by .ci/run"]
async fn the_official_python_sdks_work_through_the_proxy_plain_and_streamed() {
    let python = tokio::task::spawn_blocking(venv_python).await.unwrap();
    let upstream = MockUpstream::start(|seen| async move {
        let body: serde_json::Value = serde_json::from_slice(&seen.body).unwrap_or_default();
        let stream = body["stream"] == true;
        if seen.target.ends_with("/chat/completions") {
            chat_completion(stream)
        } else if seen.target == "/v1/messages" {
            anthropic_message(stream)
        } else {
            reply(404, "no such route in the stand-in")
        }
    })
    .await;
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

    let output = within(
        "the SDKs",
        tokio::process::Command::new(&python)
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/clients.py"))
            .env("OPENAI_PROXY", openai.url(""))
            .env("ANTHROPIC_PROXY", anthropic.url(""))
            .env("BIGMODEL_PROXY", bigmodel.url(""))
            .output(),
    )
    .await
    .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{said}");
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
