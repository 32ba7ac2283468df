//! Token budgets through the proxy (`--count-tokens`, keys × models): each request reserves
//! its estimated input and the output it allows, waits until they fit its key's tokens per
//! minute, and settles with its answer's usage; limits are learned from OpenAI's token
//! headers.
//!
//! The stand-in follows OpenAI's rate-limits guide
//! (<https://platform.openai.com/docs/guides/rate-limits>): tokens per minute are counted per
//! key from the prompt and `max_tokens` ("your rate limit is calculated as the maximum of
//! `max_tokens` and the estimated number of tokens based on the character count of your
//! request"), each answer's head carries `x-ratelimit-limit-tokens`,
//! `x-ratelimit-remaining-tokens` and `x-ratelimit-reset-tokens` (the time until the limit
//! is whole again, a duration such as `6m0s`), a request over the limit is refused with a
//! 429, and answers report `usage.{prompt_tokens, completion_tokens}`
//! (<https://platform.openai.com/docs/api-reference/chat/object>), a stream only when asked
//! (`stream_options.include_usage`, on a last event with empty `choices`:
//! <https://platform.openai.com/docs/api-reference/chat/create#chat-create-stream_options>).
//! Its bucket refills continuously and gives back the output a request was allowed but did
//! not use. Time is scaled: a window of 2 s stands for the minute.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use http::Response;
use support::{MockBody, MockUpstream, ProxyConfig, Seen, channel_body, keys, post};

/// Tokens per window of each key.
const LIMIT: f64 = 20_000.0;
/// The window (the minute, scaled).
const WINDOW: Duration = Duration::from_secs(2);
/// The output the stand-in counts for a request without `max_tokens`, and the proxy
/// reserves for it (`--default-output-tokens`).
const DEFAULT_OUTPUT: u64 = 1_000;

/// A small deterministic generator (xorshift), the same run every time.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn range(&mut self, low: u64, high: u64) -> u64 {
        low + self.next() % (high - low + 1)
    }
}

/// One request of the mix the load tests offer: a prompt of 100 to 8,000 tokens, a
/// `max_tokens` of 100 to 2,000 on two in three (else the proxy's default output), a
/// stream on half.
struct Mixed {
    body: serde_json::Value,
    stream: bool,
    /// The tokens it is expected to use: its prompt and 5/8 of the output it allows.
    expected: f64,
}

impl Mixed {
    fn next(rng: &mut Rng) -> Self {
        let prompt = rng.range(100, 8_000);
        let max = (rng.range(0, 2) != 0).then(|| rng.range(100, 2_000));
        let stream = rng.range(0, 1) == 0;
        let allowed = max.unwrap_or(DEFAULT_OUTPUT);
        // About 4 bytes a token, as the stand-in counts them.
        let content = "x".repeat(prompt as usize * 4);
        let mut body = serde_json::json!({
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": content}],
        });
        if let Some(max) = max {
            body["max_tokens"] = max.into();
        }
        if stream {
            body["stream"] = true.into();
        }
        Self {
            body,
            stream,
            expected: (prompt + allowed * 5 / 8) as f64,
        }
    }
}

struct Bucket {
    level: f64,
    at: Instant,
}

impl Bucket {
    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.level = (self.level + elapsed * LIMIT / WINDOW.as_secs_f64()).min(LIMIT);
        self.at = now;
    }

    fn headers(&self, builder: http::response::Builder) -> http::response::Builder {
        let deficit = (LIMIT - self.level).max(0.0);
        let reset_ms = (deficit / LIMIT * WINDOW.as_secs_f64() * 1_000.0).ceil() as u64;
        builder
            .header("x-ratelimit-limit-tokens", LIMIT as u64)
            .header("x-ratelimit-remaining-tokens", self.level.max(0.0) as u64)
            .header("x-ratelimit-reset-tokens", format!("{reset_ms}ms"))
    }
}

#[derive(Default)]
struct Ledger {
    buckets: HashMap<String, Bucket>,
    /// (when, key) of each 429.
    refusals: Vec<(Instant, String)>,
    /// When each key's first answer went out (a refusal or not).
    first_answer: HashMap<String, Instant>,
    /// (when admitted, tokens used) of each answer served.
    used: Vec<(Instant, u64)>,
    rng: Option<Rng>,
    /// Each key's bucket starts whole (else spent: the key was busy elsewhere).
    whole: bool,
}

impl Ledger {
    /// The share of three keys' tokens over `windows` windows served by requests admitted
    /// by `end` (the provider meters tokens when it takes a request).
    fn share_served(&self, end: Instant, windows: u32) -> f64 {
        let served: u64 = self
            .used
            .iter()
            .filter(|(at, _)| *at <= end)
            .map(|(_, used)| used)
            .sum();
        served as f64 / (3.0 * LIMIT * f64::from(windows))
    }

    /// The refusals after their key's first answer, as (time since `start`, key). A request
    /// already on its way when the first answer went out is not after it.
    fn refused_after_first_answers(&self, start: Instant) -> Vec<(Duration, String)> {
        self.refusals
            .iter()
            .filter(|(at, key)| *at > self.first_answer[key] + Duration::from_millis(50))
            .map(|(at, key)| (at.duration_since(start), key.clone()))
            .collect()
    }
}

/// The stand-in: counts a prompt's tokens as its body's bytes over 3.7 to 4.3 (by the
/// body's length), charges prompt and allowed output when it takes a request, answers a
/// tenth of a second later plus a millisecond per ten output tokens.
async fn stand_in() -> (MockUpstream, Arc<Mutex<Ledger>>) {
    stand_in_from(false).await
}

/// [`stand_in`], each key's bucket starting whole if `whole`.
async fn stand_in_from(whole: bool) -> (MockUpstream, Arc<Mutex<Ledger>>) {
    let ledger = Arc::new(Mutex::new(Ledger {
        rng: Some(Rng(0x2323_2323)),
        whole,
        ..Ledger::default()
    }));
    let shared = ledger.clone();
    let upstream = MockUpstream::start(move |seen: Seen| {
        let ledger = shared.clone();
        async move { answer(seen, ledger).await }
    })
    .await;
    (upstream, ledger)
}

async fn answer(seen: Seen, ledger: Arc<Mutex<Ledger>>) -> Response<MockBody> {
    let key = seen.bearer().unwrap();
    let request: serde_json::Value = serde_json::from_slice(&seen.body).unwrap();
    let ratio = 3.7 + (seen.body.len() % 7) as f64 * 0.1;
    let prompt = (seen.body.len() as f64 / ratio).ceil() as u64;
    let allowed = request["max_tokens"].as_u64().unwrap_or(DEFAULT_OUTPUT);
    let stream = request["stream"] == true;
    let asked = request["stream_options"]["include_usage"] == true;
    let now = Instant::now();
    let (head, output) = {
        let mut ledger = ledger.lock().unwrap();
        let output = {
            let rng = ledger.rng.as_mut().unwrap();
            allowed / 4 + rng.range(0, allowed * 3 / 4)
        };
        ledger.first_answer.entry(key.clone()).or_insert(now);
        // Each key's bucket starts spent (the key was busy elsewhere): the keys are at
        // their limit from the start. Or whole, if asked.
        let level = if ledger.whole { LIMIT } else { 0.0 };
        let bucket = ledger
            .buckets
            .entry(key.clone())
            .or_insert(Bucket { level, at: now });
        bucket.refill(now);
        let charge = (prompt + allowed) as f64;
        if bucket.level < charge {
            let head = bucket
                .headers(Response::builder().status(429))
                .header("retry-after-ms", "100");
            ledger.refusals.push((now, key));
            let body = r#"{"error":{"message":"Rate limit reached for tokens","type":"tokens","code":"rate_limit_exceeded"}}"#;
            return head.body(support::full(body)).unwrap();
        }
        bucket.level -= charge;
        (bucket.headers(Response::builder()), output)
    };
    let took = Duration::from_millis(100 + output / 10);
    let usage = format!(
        r#"{{"prompt_tokens":{prompt},"completion_tokens":{output},"total_tokens":{}}}"#,
        prompt + output
    );
    let end = move || {
        let mut ledger = ledger.lock().unwrap();
        let bucket = ledger.buckets.get_mut(&key).unwrap();
        bucket.refill(Instant::now());
        bucket.level = (bucket.level + (allowed - output) as f64).min(LIMIT);
        ledger.used.push((now, prompt + output));
    };
    if !stream {
        tokio::time::sleep(took).await;
        end();
        let body = format!(
            r#"{{"id":"chatcmpl-1","object":"chat.completion","choices":[{{"index":0,"message":{{"role":"assistant","content":"ok"}},"finish_reason":"stop"}}],"usage":{usage}}}"#
        );
        return head.body(support::full(body)).unwrap();
    }
    let (tx, body) = channel_body();
    tokio::spawn(async move {
        let null = if asked { ",\"usage\":null" } else { "" };
        for _ in 0..4 {
            tokio::time::sleep(took / 4).await;
            let event = format!(
                "data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"ok\"}}}}]{null}}}\n\n"
            );
            let _ = tx.send(Bytes::from(event));
        }
        end();
        if asked {
            let last = format!(
                "data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{usage}}}\n\n"
            );
            let _ = tx.send(Bytes::from(last));
        }
        let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n"));
    });
    head.header("content-type", "text/event-stream")
        .body(body)
        .unwrap()
}

/// A mix of prompts (100 to 8,000 tokens, half streamed without asking for usage, a third
/// without `max_tokens`) offered at 120 % of three keys' tokens per window for five
/// windows: after each key's first answer no 429, no client error, at least 90 % of what
/// the keys allow together is served, and the proxy counts what the stand-in counted
/// (within 2 %).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mix_of_prompts_above_three_keys_tpm_draws_no_429_and_keeps_them_busy() {
    let (upstream, ledger) = stand_in().await;
    let mut config = ProxyConfig::new(&upstream.url(""), "tb-1,tb-2,tb-3")
        .arg("--profile", "openai")
        .arg("--keys-env", "BIGMODEL_API_KEY")
        .arg("--token-window", "2")
        .arg("--default-output-tokens", &DEFAULT_OUTPUT.to_string())
        .arg("--max-wait", "60");
    config.args.push("--count-tokens".into());
    let proxy = config.start().await;

    let windows = 5;
    let run = WINDOW * windows;
    let offered_per_second = 1.2 * 3.0 * LIMIT / WINDOW.as_secs_f64();
    let mut rng = Rng(0x5eed_0023);
    let start = Instant::now();
    let mut tasks = Vec::new();
    let url = proxy.url("/v1/chat/completions");
    while start.elapsed() < run {
        let Mixed {
            body,
            stream,
            expected,
        } = Mixed::next(&mut rng);
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let got = post(&url, &body.to_string()).await;
            (got, stream)
        }));
        // Open loop: the next request when the offered rate says.
        tokio::time::sleep(Duration::from_secs_f64(expected / offered_per_second)).await;
    }
    let mut failed = Vec::new();
    for task in tasks {
        let (got, stream) = task.await.unwrap();
        if got.status != 200 {
            failed.push(got.status);
        } else if stream {
            // Byte for byte what the stand-in sends a stream that did not ask for usage.
            assert!(!got.body.contains("\"usage\""), "{}", got.body);
            assert!(got.body.ends_with("data: [DONE]\n\n"));
        }
    }
    let keys = keys(&proxy).await;
    let ledger = ledger.lock().unwrap();
    let provider_count: u64 = ledger.used.iter().map(|(_, used)| used).sum();
    let proxy_count: u64 = keys
        .iter()
        .map(|key| {
            key["tokens"]["input"].as_u64().unwrap() + key["tokens"]["output"].as_u64().unwrap()
        })
        .sum();
    let share = ledger.share_served(start + run, windows);
    let after_first = ledger.refused_after_first_answers(start);
    let estimate = &keys[0]["models"][0]["token_estimate"];
    eprintln!(
        "served {share:.3} of the keys' tokens per window; {} refusals, {} after first answers; \
         proxy counted {proxy_count} of {provider_count}; estimate {estimate}",
        ledger.refusals.len(),
        after_first.len(),
    );
    assert!(failed.is_empty(), "client errors: {failed:?}");
    assert!(
        after_first.is_empty(),
        "refused after first answers: {after_first:?}"
    );
    assert!(
        share >= 0.9,
        "served {share:.3} of the keys' tokens per window"
    );
    let off = (proxy_count as f64 - provider_count as f64).abs() / provider_count as f64;
    assert!(off <= 0.02, "{proxy_count} counted of {provider_count}");
    for key in &keys {
        assert_eq!(key["tokens"]["limit"], LIMIT as u64, "learned: {key}");
        let model = &key["models"][0];
        assert!(model["tokens_reserved"].as_u64().unwrap() > 0, "{model}");
    }
    proxy.assert_log_has_no_secret(&["tb-1", "tb-2", "tb-3"]);
}

/// A request whose tokens exceed every key's whole window (`--tpm`) is answered at once
/// with a 413 that says so, and never reaches the provider.
#[tokio::test]
async fn a_request_larger_than_the_token_limit_is_answered_413_at_once() {
    let (upstream, _ledger) = stand_in().await;
    let proxy = ProxyConfig::new(&upstream.url(""), "tb-1")
        .arg("--profile", "openai")
        .arg("--keys-env", "BIGMODEL_API_KEY")
        .arg("--tpm", "1000")
        .start()
        .await;
    let body = r#"{"model":"gpt-4o-mini","max_tokens":5000,"messages":[]}"#;
    let got = post(&proxy.url("/v1/chat/completions"), body).await;
    assert_eq!(got.status, 413, "{}", got.body);
    let error = &got.json()["error"];
    assert_eq!(error["code"], "tokens_exceed_limit", "{error}");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("exceed every API key's whole token window (1000 tokens per 1 min 0 s)"),
        "{error}"
    );
    assert!(upstream.seen().is_empty());
}

/// Three proxies sharing three keys' token quotas (`--tpm`) through a real `redis-server`,
/// each offered a third of a mix at 120 % of the keys' combined tokens per window (the
/// stand-in's buckets start whole, as the proxies' quotas do): no 429 after each key's
/// first answer, no client error, the keys' combined tokens per window respected (the
/// stand-in refuses beyond them), and most of them served. Without the shared token state,
/// each replica would spend each key's whole window on its own: three times the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_through_redis_keep_the_keys_combined_tpm() {
    let redis = test_support::RedisServer::start().await;
    let (upstream, ledger) = stand_in_from(true).await;
    let mut proxies = Vec::new();
    for _ in 0..3 {
        let mut config = ProxyConfig::new(&upstream.url(""), "tb-1,tb-2,tb-3")
            .arg("--profile", "openai")
            .arg("--keys-env", "BIGMODEL_API_KEY")
            .arg("--tpm", &(LIMIT as u64).to_string())
            .arg("--token-window", "2")
            .arg("--default-output-tokens", &DEFAULT_OUTPUT.to_string())
            .arg("--max-wait", "60")
            .env("REDIS_URL", &redis.url())
            .arg("--redis-namespace", "tokens")
            .env("REPLICA_SECRET", "replica-secret-value")
            .arg("--redis-secret-env", "REPLICA_SECRET");
        config.args.push("--count-tokens".into());
        proxies.push(config.start().await);
    }
    // The heartbeats' calls alone, over one window: what the load's calls are measured
    // against.
    let idle = redis.command_stats();
    tokio::time::sleep(WINDOW).await;
    let before = redis.command_stats();
    let evalsha = |stats: &HashMap<String, u64>| stats.get("evalsha").copied().unwrap_or(0);
    let heartbeats_per_window = evalsha(&before) - evalsha(&idle);

    let windows = 5;
    let run = WINDOW * windows;
    let offered_per_second = 1.2 * 3.0 * LIMIT / WINDOW.as_secs_f64();
    let mut rng = Rng(0x5eed_0024);
    let start = Instant::now();
    let mut tasks = Vec::new();
    let urls: Vec<String> = proxies
        .iter()
        .map(|proxy| proxy.url("/v1/chat/completions"))
        .collect();
    let mut sent = 0usize;
    while start.elapsed() < run {
        let Mixed { body, expected, .. } = Mixed::next(&mut rng);
        // Each replica in turn.
        let url = urls[sent % urls.len()].clone();
        sent += 1;
        tasks.push(tokio::spawn(async move {
            post(&url, &body.to_string()).await.status
        }));
        tokio::time::sleep(Duration::from_secs_f64(expected / offered_per_second)).await;
    }
    let mut failed = Vec::new();
    for task in tasks {
        let status = task.await.unwrap();
        if status != 200 {
            failed.push(status);
        }
    }
    let after = redis.command_stats();
    let took = start.elapsed();
    let ledger = ledger.lock().unwrap();
    let share = ledger.share_served(start + run, windows);
    let after_first = ledger.refused_after_first_answers(start);
    let heartbeats = heartbeats_per_window as f64 * took.as_secs_f64() / WINDOW.as_secs_f64();
    let calls = (evalsha(&after) - evalsha(&before)) as f64;
    let mut commands: Vec<_> = after
        .iter()
        .map(|(name, calls)| (name.as_str(), calls - before.get(name).unwrap_or(&0)))
        .filter(|(_, calls)| *calls != 0)
        .collect();
    commands.sort_unstable();
    eprintln!("commands run during the load: {commands:?}");
    eprintln!(
        "3 replicas: {sent} requests, served {share:.3} of the keys' tokens per window; {} \
         refusals, {} after first answers; {:.2} script calls per request ({:.2} without the \
         heartbeats' {heartbeats:.0})",
        ledger.refusals.len(),
        after_first.len(),
        calls / sent as f64,
        (calls - heartbeats) / sent as f64,
    );
    assert!(failed.is_empty(), "client errors: {failed:?}");
    assert!(
        after_first.is_empty(),
        "refused after first answers: {after_first:?}"
    );
    assert!(
        share >= 0.8,
        "served {share:.3} of the keys' tokens per window"
    );
    for proxy in &proxies {
        proxy.assert_log_has_no_secret(&["tb-1", "tb-2", "tb-3", "replica-secret-value"]);
    }
}
