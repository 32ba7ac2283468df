//! Token usage through the proxy (`--count-tokens`): read from JSON answers and from
//! streams, counted per key in `/_keyrotation/keys` and the metrics; an OpenAI chat stream
//! that did not ask for usage is asked for it upstream, and its client gets the bytes it
//! would have got without the proxy.

mod support;

use bytes::Bytes;
use http::Response;
use support::{MockBody, MockUpstream, ProxyConfig, Seen, channel_body, get, keys, post};

const KEY: &str = "tk-one";

/// A chat stream as OpenAI sends it, with the usage chunk and the `"usage":null` fields
/// only when the request asked (`stream_options.include_usage`).
/// <https://platform.openai.com/docs/api-reference/chat/create#chat-create-stream_options>
fn openai_stream(asked: bool) -> String {
    let usage = if asked { ",\"usage\":null" } else { "" };
    let mut out = String::new();
    for (delta, finish) in [
        ("{\"role\":\"assistant\",\"content\":\"\"}", "null"),
        ("{\"content\":\"Hello \\\"usage\\\"\"}", "null"),
        ("{\"content\":\" world\"}", "null"),
        ("{}", "\"stop\""),
    ] {
        out.push_str(&format!(
            "data: {{\"id\":\"chatcmpl-7\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\
             \"model\":\"gpt-4o-mini\",\"choices\":[{{\"index\":0,\"delta\":{delta},\"finish_reason\":{finish}}}]{usage}}}\n\n"
        ));
    }
    if asked {
        out.push_str(
            "data: {\"id\":\"chatcmpl-7\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\
             \"model\":\"gpt-4o-mini\",\"choices\":[],\"usage\":{\"prompt_tokens\":21,\
             \"completion_tokens\":4,\"total_tokens\":25,\"prompt_tokens_details\":{\"cached_tokens\":0}}}\n\n",
        );
    }
    out.push_str("data: [DONE]\n\n");
    out
}

/// A chat completion as OpenAI sends it. <https://platform.openai.com/docs/api-reference/chat/object>
const OPENAI_JSON: &str = r#"{
  "id": "chatcmpl-8",
  "object": "chat.completion",
  "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"}, "finish_reason": "stop"}],
  "usage": {"prompt_tokens": 30, "completion_tokens": 7, "total_tokens": 37}
}"#;

/// A stand-in for OpenAI's chat completions: streams when asked to (in pieces of 11
/// bytes, so that events straddle frames), with usage when asked for it.
async fn openai_stand_in() -> MockUpstream {
    MockUpstream::start(|seen: Seen| async move {
        let request: serde_json::Value = serde_json::from_slice(&seen.body).unwrap();
        if request["stream"] != true {
            return Response::new(support::full(OPENAI_JSON));
        }
        let asked = request["stream_options"]["include_usage"] == true;
        let (tx, body): (_, MockBody) = channel_body();
        let stream = Bytes::from(openai_stream(asked));
        for start in (0..stream.len()).step_by(11) {
            tx.send(stream.slice(start..(start + 11).min(stream.len())))
                .unwrap();
        }
        drop(tx);
        Response::builder()
            .header("content-type", "text/event-stream")
            .body(body)
            .unwrap()
    })
    .await
}

fn counting(upstream: &MockUpstream, profile: &str) -> ProxyConfig {
    let mut config = ProxyConfig::new(&upstream.url(""), KEY)
        .arg("--profile", profile)
        .arg("--keys-env", "BIGMODEL_API_KEY");
    config.args.push("--count-tokens".into());
    config
}

const STREAM_REQUEST: &str =
    r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;

#[tokio::test]
async fn a_client_that_did_not_ask_for_usage_gets_the_stream_byte_for_byte() {
    let upstream = openai_stand_in().await;
    let proxy = counting(&upstream, "openai").start().await;

    // What the provider answers this request, sent to it directly.
    let direct = post(&upstream.url("/chat/completions"), STREAM_REQUEST).await;
    assert_eq!(direct.body, openai_stream(false));
    let through = post(&proxy.url("/chat/completions"), STREAM_REQUEST).await;
    assert_eq!(through.status, 200);
    assert_eq!(through.body, direct.body, "the client's stream changed");
    assert_eq!(through.headers["content-type"], "text/event-stream");

    // The proxy asked upstream, with the client's request otherwise as it came.
    let seen = upstream.seen();
    let asked: serde_json::Value = serde_json::from_slice(&seen[1].body).unwrap();
    assert_eq!(asked["stream_options"]["include_usage"], true);
    let mut unasked = asked.clone();
    unasked.as_object_mut().unwrap().remove("stream_options");
    assert_eq!(
        unasked,
        serde_json::from_str::<serde_json::Value>(STREAM_REQUEST).unwrap()
    );

    // A client that asked gets the usage chunk, untouched.
    let with_usage = r#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#;
    let through = post(&proxy.url("/chat/completions"), with_usage).await;
    assert_eq!(through.body, openai_stream(true));

    // And a JSON answer passes as it came.
    let through = post(
        &proxy.url("/chat/completions"),
        r#"{"model":"gpt-4o-mini"}"#,
    )
    .await;
    assert_eq!(through.body, OPENAI_JSON);

    // Counted: 21 + 4 twice (streams), 30 + 7 (JSON).
    let tokens = &keys(&proxy).await[0]["tokens"];
    assert_eq!(tokens["input"], 21 + 21 + 30, "{tokens}");
    assert_eq!(tokens["output"], 4 + 4 + 7, "{tokens}");
    assert_eq!(tokens["answers_reported"], 3, "{tokens}");
    assert_eq!(tokens["answers_unreported"], 0, "{tokens}");
    let metrics = get(&proxy.url("/_keyrotation/metrics")).await.body;
    assert!(
        metrics.contains("keyrotation_key_input_tokens_total{key=\"1\",name=\"\",account=\"\"} 72"),
        "{metrics}"
    );
    proxy.assert_log_has_no_secret(&[KEY]);
}

/// Anthropic's stream: input tokens on `message_start`, output on `message_delta`.
/// <https://docs.anthropic.com/en/docs/build-with-claude/streaming#basic-streaming-request>
const ANTHROPIC_STREAM: &str = "event: message_start\n\
data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"claude-sonnet-4-5\",\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n\
event: content_block_delta\n\
data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hello\"}}\n\n\
event: message_delta\n\
data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":15}}\n\n\
event: message_stop\n\
data: {\"type\":\"message_stop\"}\n\n";

#[tokio::test]
async fn other_profiles_count_what_answers_report_and_change_nothing() {
    let upstream = MockUpstream::start(|seen: Seen| async move {
        let body = if seen.target.ends_with("/messages") {
            ANTHROPIC_STREAM.to_owned()
        } else {
            openai_stream(false)
        };
        Response::new(support::full(body))
    })
    .await;
    let proxy = counting(&upstream, "generic").start().await;

    let got = post(&proxy.url("/v1/messages"), r#"{"stream":true}"#).await;
    assert_eq!(got.body, ANTHROPIC_STREAM);
    // Not OpenAI's profile: the stream is not asked for usage, and reports none.
    let got = post(&proxy.url("/chat/completions"), STREAM_REQUEST).await;
    assert_eq!(got.body, openai_stream(false));
    assert_eq!(upstream.seen()[1].body, STREAM_REQUEST.as_bytes());

    let tokens = &keys(&proxy).await[0]["tokens"];
    assert_eq!(
        (&tokens["input"], &tokens["output"]),
        (&25.into(), &15.into()),
        "{tokens}"
    );
    assert_eq!(tokens["answers_reported"], 1, "{tokens}");
    assert_eq!(tokens["answers_unreported"], 1, "{tokens}");
}
