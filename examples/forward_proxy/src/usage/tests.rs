use bytes::Bytes;

use super::*;

/// The usage of `body` fed in one frame, at every split into two frames, and a byte at a
/// time: all must agree.
fn scanned(body: &[u8]) -> Usage {
    let mut whole = UsageScan::default();
    whole.feed(body);
    for split in 0..=body.len() {
        let mut scan = UsageScan::default();
        scan.feed(&body[..split]);
        scan.feed(&body[split..]);
        assert_eq!(scan.usage(), whole.usage(), "split at {split}");
    }
    let mut bytewise = UsageScan::default();
    for byte in body.chunks(1) {
        bytewise.feed(byte);
    }
    assert_eq!(bytewise.usage(), whole.usage(), "a byte at a time");
    whole.usage()
}

fn usage(input: u64, output: u64) -> Usage {
    Usage {
        input: Some(input),
        output: Some(output),
        ..Usage::default()
    }
}

/// OpenAI's chat completion object, as its API reference shows it (pretty-printed).
/// <https://platform.openai.com/docs/api-reference/chat/object>
#[test]
fn an_openai_chat_answer_reports_prompt_and_completion_tokens() {
    let body = br#"{
  "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
  "object": "chat.completion",
  "model": "gpt-4o-2024-08-06",
  "choices": [
    {
      "index": 0,
      "message": {"role": "assistant", "content": "Say \"usage\": {\"prompt_tokens\": 1}"},
      "finish_reason": "stop"
    }
  ],
  "usage": {
    "prompt_tokens": 19,
    "completion_tokens": 10,
    "total_tokens": 29,
    "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0}
  },
  "service_tier": "default"
}"#;
    assert_eq!(scanned(body), usage(19, 10));
}

/// OpenAI's response object. <https://platform.openai.com/docs/api-reference/responses/object>
#[test]
fn an_openai_responses_answer_reports_input_and_output_tokens() {
    let body = br#"{"id":"resp_67ccd3a9da748190","object":"response","status":"completed",
        "output":[{"type":"message","content":[{"type":"output_text","text":"hi","annotations":[]}]}],
        "usage":{"input_tokens":36,"input_tokens_details":{"cached_tokens":0},
        "output_tokens":87,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":123}}"#;
    assert_eq!(scanned(body), usage(36, 87));
}

/// Anthropic's message, with prompt caching's fields.
/// <https://docs.anthropic.com/en/api/messages>
#[test]
fn an_anthropic_answer_reports_input_output_and_cache_tokens() {
    let body = br#"{"id":"msg_013Zva2CMHLNnXjNJJKqJ2EF","type":"message","role":"assistant",
        "model":"claude-sonnet-4-5","content":[{"type":"text","text":"Hi! My name is Claude."}],
        "stop_reason":"end_turn","stop_sequence":null,
        "usage":{"input_tokens":2095,"output_tokens":503,
        "cache_creation_input_tokens":2051,"cache_read_input_tokens":0}}"#;
    assert_eq!(
        scanned(body),
        Usage {
            input: Some(2095),
            output: Some(503),
            cache_creation: Some(2051),
            cache_read: Some(0),
        }
    );
}

/// Anthropic's stream: `message_start` holds the input tokens (and a first output count),
/// `message_delta` the output tokens, cumulative.
/// <https://docs.anthropic.com/en/docs/build-with-claude/streaming#basic-streaming-request>
#[test]
fn an_anthropic_stream_reports_input_at_its_start_and_output_at_its_end() {
    let body = b"event: message_start\n\
data: {\"type\": \"message_start\", \"message\": {\"id\": \"msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY\", \"type\": \"message\", \"role\": \"assistant\", \"content\": [], \"model\": \"claude-opus-4-1\", \"stop_reason\": null, \"stop_sequence\": null, \"usage\": {\"input_tokens\": 25, \"output_tokens\": 1}}}\n\n\
event: content_block_start\n\
data: {\"type\": \"content_block_start\", \"index\": 0, \"content_block\": {\"type\": \"text\", \"text\": \"\"}}\n\n\
event: content_block_delta\n\
data: {\"type\": \"content_block_delta\", \"index\": 0, \"delta\": {\"type\": \"text_delta\", \"text\": \"Hello\"}}\n\n\
event: content_block_stop\n\
data: {\"type\": \"content_block_stop\", \"index\": 0}\n\n\
event: message_delta\n\
data: {\"type\": \"message_delta\", \"delta\": {\"stop_reason\": \"end_turn\", \"stop_sequence\":null}, \"usage\": {\"output_tokens\": 15}}\n\n\
event: message_stop\n\
data: {\"type\": \"message_stop\"}\n\n";
    assert_eq!(scanned(body), usage(25, 15));
}

/// An OpenAI chat stream that asked for usage: `"usage":null` on each chunk, then a chunk
/// with empty `choices` and the usage.
/// <https://platform.openai.com/docs/api-reference/chat/create#chat-create-stream_options>
const OPENAI_STREAM_WITH_USAGE: &[u8] = b"data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}],\"usage\":null}\n\n\
data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"\\\"usage\\\": 3\"},\"finish_reason\":null}],\"usage\":null}\n\n\
data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n\
data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":3,\"total_tokens\":12}}\n\n\
data: [DONE]\n\n";

/// The same stream had the request not asked.
const OPENAI_STREAM_WITHOUT_USAGE: &[u8] = b"data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n\
data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"\\\"usage\\\": 3\"},\"finish_reason\":null}]}\n\n\
data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n\
data: [DONE]\n\n";

#[test]
fn an_openai_stream_that_asked_reports_its_last_chunks_usage() {
    assert_eq!(scanned(OPENAI_STREAM_WITH_USAGE), usage(9, 3));
}

/// Zhipu's stream: OpenAI's chunks, the last one with `usage`.
/// <https://docs.bigmodel.cn/api-reference/模型-api/对话补全>
#[test]
fn a_zhipu_stream_reports_its_last_chunks_usage() {
    let body = "data: {\"id\":\"8313807536837492492\",\"created\":1706092316,\"model\":\"glm-4\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"土\"}}]}\n\n\
data: {\"id\":\"8313807536837492492\",\"created\":1706092316,\"model\":\"glm-4\",\"choices\":[{\"index\":0,\"finish_reason\":\"stop\",\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}],\"usage\":{\"prompt_tokens\":60,\"completion_tokens\":100,\"total_tokens\":160}}\n\n\
data: [DONE]\n\n";
    assert_eq!(scanned(body.as_bytes()), usage(60, 100));
}

/// The responses stream: `response.created` has `"usage":null`, `response.completed` the
/// usage. <https://platform.openai.com/docs/api-reference/responses-streaming>
#[test]
fn an_openai_responses_stream_reports_the_completed_events_usage() {
    let body = b"event: response.created\n\
data: {\"type\":\"response.created\",\"response\":{\"id\":\"resp_1\",\"status\":\"in_progress\",\"output\":[],\"usage\":null}}\n\n\
event: response.output_text.delta\n\
data: {\"type\":\"response.output_text.delta\",\"item_id\":\"msg_1\",\"delta\":\"Hi\"}\n\n\
event: response.completed\n\
data: {\"type\":\"response.completed\",\"response\":{\"id\":\"resp_1\",\"status\":\"completed\",\"usage\":{\"input_tokens\":37,\"output_tokens\":11,\"output_tokens_details\":{\"reasoning_tokens\":0},\"total_tokens\":48}}}\n\n";
    assert_eq!(scanned(body), usage(37, 11));
}

#[test]
fn a_usage_that_is_not_an_object_is_passed_over_and_the_next_one_read() {
    let body = br#"{"type":"usage","usage":null,"x":{"usage" : "n/a"},"usage":{"prompt_tokens":4,"completion_tokens":2}}"#;
    assert_eq!(scanned(body), usage(4, 2));
}

#[test]
fn an_answer_without_usage_reports_none_and_an_oversized_object_is_not_usage() {
    assert!(!scanned(br#"{"choices":[{"text":"no usage here"}]}"#).is_reported());
    let mut big = br#"{"usage":{"pad":""#.to_vec();
    big.extend(std::iter::repeat_n(b'x', MAX_USAGE_OBJECT));
    big.extend_from_slice(br#"","prompt_tokens":1}}"#);
    let mut scan = UsageScan::default();
    for chunk in big.chunks(1000) {
        scan.feed(chunk);
    }
    assert!(!scan.usage().is_reported());
}

/// The stripped stream of `upstream` cut into frames of `size` bytes.
fn stripped(upstream: &[u8], size: usize) -> (Vec<u8>, Usage) {
    let mut strip = UsageStrip::default();
    let mut scan = UsageScan::default();
    let mut out = Vec::new();
    for frame in upstream.chunks(size) {
        strip.push(Bytes::copy_from_slice(frame), &mut scan);
        while let Some(piece) = strip.pop() {
            out.extend_from_slice(&piece);
        }
    }
    strip.finish(&mut scan);
    while let Some(piece) = strip.pop() {
        out.extend_from_slice(&piece);
    }
    (out, scan.usage())
}

#[test]
fn stripping_what_was_asked_for_gives_the_stream_not_asking_byte_for_byte() {
    for size in (1..=OPENAI_STREAM_WITH_USAGE.len())
        .step_by(7)
        .chain([usize::MAX / 2])
    {
        let (out, usage) = stripped(OPENAI_STREAM_WITH_USAGE, size);
        assert_eq!(
            String::from_utf8_lossy(&out),
            String::from_utf8_lossy(OPENAI_STREAM_WITHOUT_USAGE),
            "frames of {size}"
        );
        assert_eq!(usage, super::tests::usage(9, 3), "frames of {size}");
    }
}

#[test]
fn a_null_usage_is_stripped_with_its_comma_wherever_it_stands() {
    for (asked, plain) in [
        (
            "data: {\"usage\":null,\"choices\":[]}\n\n",
            "data: {\"choices\":[]}\n\n",
        ),
        (
            "data: {\"usage\": null, \"id\": 1}\n\n",
            "data: {\"id\": 1}\n\n",
        ),
        (
            "data: {\"id\": 1, \"usage\": null}\n\n",
            "data: {\"id\": 1}\n\n",
        ),
        ("data: {\"usage\":null}\n\n", "data: {}\n\n"),
    ] {
        let (out, _) = stripped(asked.as_bytes(), usize::MAX / 2);
        assert_eq!(String::from_utf8_lossy(&out), plain);
    }
}

#[test]
fn events_ending_in_crlf_are_stripped_as_well() {
    let crlf = |stream: &[u8]| String::from_utf8_lossy(stream).replace('\n', "\r\n");
    for size in [1, 5, 64, usize::MAX / 2] {
        let (out, usage) = stripped(crlf(OPENAI_STREAM_WITH_USAGE).as_bytes(), size);
        assert_eq!(
            String::from_utf8_lossy(&out),
            crlf(OPENAI_STREAM_WITHOUT_USAGE)
        );
        assert_eq!(usage, super::tests::usage(9, 3), "frames of {size}");
    }
}

#[test]
fn a_stream_without_event_ends_passes_unchanged() {
    let (out, usage) = stripped(OPENAI_STREAM_WITH_USAGE.trim_ascii_end(), usize::MAX / 2);
    // Its last event (`[DONE]`) never ends: passed on as it came at the end.
    assert!(out.ends_with(b"data: [DONE]"));
    assert_eq!(usage, super::tests::usage(9, 3));
}

#[test]
fn asking_for_usage_adds_the_option_and_keeps_every_other_byte() {
    let body = br#"  {"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let asked = ask_for_usage(body).unwrap();
    let value: serde_json::Value = serde_json::from_slice(&asked).unwrap();
    assert_eq!(value["stream_options"]["include_usage"], true);
    assert_eq!(value["stream"], true);
    assert_eq!(value["messages"][0]["content"], "hi");
    assert_eq!(
        asked.len(),
        body.len() + r#""stream_options":{"include_usage":true},"#.len()
    );
    assert_eq!(ask_for_usage(b"[1]"), None);
    assert_eq!(ask_for_usage(b"  "), None);
}
