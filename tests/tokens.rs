//! Token budgets through the public API, on paused time: a provider stand-in that meters
//! tokens per minute per key with a token bucket, and a mix of prompts offered above what
//! three keys allow together.
//!
//! The stand-in follows OpenAI's rate-limits guide
//! (<https://platform.openai.com/docs/guides/rate-limits>): tokens per minute are counted per
//! key from the prompt and `max_tokens` ("your rate limit is calculated as the maximum of
//! `max_tokens` and the estimated number of tokens based on the character count of your
//! request"), the answer's head carries `x-ratelimit-limit-tokens`,
//! `x-ratelimit-remaining-tokens` and `x-ratelimit-reset-tokens` ("the time until the rate
//! limit resets to its initial state", a duration such as `6m0s`), a request over the limit
//! is refused with a 429, and the answer reports `usage.{prompt_tokens, completion_tokens}`
//! (<https://platform.openai.com/docs/api-reference/chat/object>), in a stream on its last
//! event (`stream_options.include_usage`). The bucket refills continuously, as Anthropic's
//! rate-limits page says of its own ("token bucket algorithm"), and gives back the output a
//! request was allowed but did not use when it ends.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tokio::time::Instant;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_key_rotation::pool::TokenReservation;
use tower_key_rotation::retry::{ReplayBody, RetryLayer};
use tower_key_rotation::route::{RequestHead, Router};
use tower_key_rotation::{CostTooLarge, KeyPool, KeyRotationLayer, KeySet, TokenQuota};

/// Tokens per minute of each key.
const TPM: f64 = 30_000.0;
/// The output the stand-in counts for a request without `max_tokens`, and the client
/// reserves for it.
const DEFAULT_OUTPUT: u64 = 1_000;

/// Routes by the client's estimate of a request's tokens, in `x-cost`.
#[derive(Debug)]
struct ByCost;

impl Router for ByCost {
    fn tokens(&self, head: &RequestHead<'_>) -> Option<u64> {
        head.headers.get("x-cost")?.to_str().ok()?.parse().ok()
    }
}

/// One key's bucket at the stand-in.
struct Bucket {
    level: f64,
    at: Instant,
}

impl Bucket {
    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.level = (self.level + elapsed * TPM / 60.0).min(TPM);
        self.at = now;
    }
}

#[derive(Default)]
struct Ledger {
    buckets: HashMap<String, Bucket>,
    /// (when, key) of each 429.
    refusals: Vec<(Instant, String)>,
    /// (when, key) of each key's first answer (a refusal or not).
    first_answer: HashMap<String, Instant>,
    /// (when the request was admitted, tokens it used) of each answer.
    used: Vec<(Instant, u64)>,
}

#[derive(Clone, Default)]
struct StandIn(Arc<Mutex<Ledger>>);

type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

impl StandIn {
    fn headers(bucket: &Bucket, builder: http::response::Builder) -> http::response::Builder {
        let deficit = (TPM - bucket.level).max(0.0);
        let reset_ms = (deficit * 60_000.0 / TPM).ceil() as u64;
        builder
            .header("x-ratelimit-limit-tokens", TPM as u64)
            .header("x-ratelimit-remaining-tokens", bucket.level.max(0.0) as u64)
            .header("x-ratelimit-reset-tokens", format!("{reset_ms}ms"))
    }

    async fn answer(self, req: Request<ReplayBody<Full<Bytes>>>) -> Response<Body> {
        let header = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let key = header("authorization").unwrap();
        let prompt: u64 = header("x-prompt-tokens").unwrap().parse().unwrap();
        let max: Option<u64> = header("x-max-tokens").map(|v| v.parse().unwrap());
        let stream = header("x-stream").is_some();
        let allowed = max.unwrap_or(DEFAULT_OUTPUT);
        let output = allowed / 4 + fastrand::u64(0..=allowed * 3 / 4);
        let charge = (prompt + allowed) as f64;
        let now = Instant::now();
        let head = {
            let mut ledger = self.0.lock().unwrap();
            // Each key's bucket starts spent (its key was busy elsewhere), so that the keys
            // are at their limit from the start.
            let bucket = ledger.buckets.entry(key.clone()).or_insert(Bucket {
                level: 0.0,
                at: now,
            });
            bucket.refill(now);
            if bucket.level < charge {
                let head = Self::headers(bucket, Response::builder().status(429))
                    .header("retry-after-ms", "500");
                ledger.first_answer.entry(key.clone()).or_insert(now);
                ledger.refusals.push((now, key));
                return head.body(Full::new(Bytes::new()).boxed_unsync()).unwrap();
            }
            bucket.level -= charge;
            let head = Self::headers(bucket, Response::builder());
            ledger.first_answer.entry(key.clone()).or_insert(now);
            head
        };
        // Generating: a second, and a second per 1,000 output tokens.
        let took = Duration::from_millis(1_000 + output);
        let usage = format!(r#"{{"prompt_tokens":{prompt},"completion_tokens":{output}}}"#);
        let ledger = self.0.clone();
        let end = move || {
            let mut ledger = ledger.lock().unwrap();
            let bucket = ledger.buckets.get_mut(&key).unwrap();
            bucket.refill(Instant::now());
            bucket.level = (bucket.level + (allowed - output) as f64).min(TPM);
            ledger.used.push((now, prompt + output));
        };
        if !stream {
            tokio::time::sleep(took).await;
            end();
            let body = format!(r#"{{"choices":[],"usage":{usage}}}"#);
            return head
                .body(Full::new(Bytes::from(body)).boxed_unsync())
                .unwrap();
        }
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<http_body::Frame<Bytes>, Infallible>>(4);
        tokio::spawn(async move {
            for _ in 0..4 {
                tokio::time::sleep(took / 4).await;
                let event = Bytes::from_static(b"data: {\"choices\":[{\"delta\":{}}]}\n\n");
                let _ = tx.send(Ok(http_body::Frame::data(event))).await;
            }
            end();
            let last = format!("data: {{\"choices\":[],\"usage\":{usage}}}\n\ndata: [DONE]\n\n");
            let _ = tx.send(Ok(http_body::Frame::data(Bytes::from(last)))).await;
        });
        head.body(ChannelBody(rx).boxed_unsync()).unwrap()
    }
}

/// A streamed body: the frames a task sends.
struct ChannelBody(tokio::sync::mpsc::Receiver<Result<http_body::Frame<Bytes>, Infallible>>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx)
    }
}

/// The `usage` total of an answer body (JSON, or the last SSE event that has one).
fn usage(body: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(body).ok()?;
    let start = text.rfind("\"usage\":")? + "\"usage\":".len();
    let end = start + text[start..].find('}')? + 1;
    let usage: serde_json::Value = serde_json::from_str(&text[start..end]).ok()?;
    Some(usage["prompt_tokens"].as_u64()? + usage["completion_tokens"].as_u64()?)
}

fn pool(quota: Option<TokenQuota>) -> KeyPool {
    let mut builder = KeyPool::builder(KeySet::parse("k1,k2,k3").unwrap())
        .router(ByCost)
        .max_wait(None);
    if let Some(quota) = quota {
        builder = builder.token_quota_per_key(quota);
    }
    builder.build()
}

/// A mix of prompts (100 to 8,000 tokens, half streamed, a third without `max_tokens`)
/// offered at 120 % of three keys' 30,000 tokens per minute for three minutes: after each
/// key's first answer no 429, no request fails, the keys serve at least 90 % of what they
/// allow together (their buckets start spent, so they are at their limit throughout), and
/// the pool counts what the stand-in counted.
#[tokio::test(start_paused = true)]
async fn a_mix_of_prompts_above_three_keys_tpm_draws_no_429_and_keeps_them_busy() {
    fastrand::seed(23);
    let pool = pool(None);
    let provider = StandIn::default();
    let service = ServiceBuilder::new()
        .layer(RetryLayer::new(pool.clone()))
        .layer(KeyRotationLayer::new(pool.clone()))
        .service(tower::service_fn({
            let provider = provider.clone();
            move |req| {
                let provider = provider.clone();
                async move { Ok::<_, Infallible>(provider.clone().answer(req).await) }
            }
        }));
    let start = Instant::now();
    let minutes = 3;
    let offered_per_minute = 1.2 * 3.0 * TPM;
    let mut offered = 0.0;
    let mut tasks = Vec::new();
    while start.elapsed() < Duration::from_secs(60 * minutes) {
        let prompt = fastrand::u64(100..=8_000);
        let max = (fastrand::u8(0..3) != 0).then(|| fastrand::u64(100..=2_000));
        let allowed = max.unwrap_or(DEFAULT_OUTPUT);
        let stream = fastrand::bool();
        // What the request is expected to use: its prompt and, on average, 5/8 of its
        // allowed output.
        offered += (prompt + allowed * 5 / 8) as f64;
        // The client's estimate of its input: within 3 % above the provider's count.
        let estimate = prompt + prompt * fastrand::u64(0..=3) / 100;
        let mut request = Request::post("/v1/chat/completions")
            .header("x-prompt-tokens", prompt)
            .header("x-cost", estimate + allowed);
        if let Some(max) = max {
            request = request.header("x-max-tokens", max);
        }
        if stream {
            request = request.header("x-stream", "1");
        }
        let request = request
            .body(ReplayBody::buffered(Bytes::from_static(b"{}")))
            .unwrap();
        let mut service = service.clone();
        tasks.push(tokio::spawn(async move {
            let response = service.ready().await?.call(request).await?;
            let status = response.status();
            let reservation = response.extensions().get::<TokenReservation>().cloned();
            let body = response.into_body().collect().await?.to_bytes();
            let used = usage(&body);
            if let (Some(reservation), Some(used)) = (reservation, used) {
                reservation.settle(used);
            }
            Ok::<_, tower::BoxError>((status, used))
        }));
        // Open loop: the next request when the offered rate says.
        let gap = (prompt + allowed * 5 / 8) as f64 * 60.0 / offered_per_minute;
        tokio::time::sleep(Duration::from_secs_f64(gap)).await;
    }
    let mut failed = 0;
    let mut counted = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok((status, used)) if status == 200 => counted += used.unwrap(),
            _ => failed += 1,
        }
    }
    let ledger = provider.0.lock().unwrap();
    assert_eq!(failed, 0, "every request is served");
    for (at, key) in &ledger.refusals {
        let first = ledger.first_answer.get(key);
        assert!(
            first.is_none_or(|first| at <= first),
            "{key} refused at {:?}, after its first answer at {:?}",
            at.duration_since(start),
            first.map(|f| f.duration_since(start)),
        );
    }
    // Served in the three minutes (admitted then: the provider meters tokens when it takes
    // a request).
    let end = start + Duration::from_secs(60 * minutes);
    let served: u64 = ledger
        .used
        .iter()
        .filter(|(at, _)| *at <= end)
        .map(|(_, used)| used)
        .sum();
    let share = served as f64 / (3.0 * TPM * minutes as f64);
    let provider_count: u64 = ledger.used.iter().map(|(_, used)| used).sum();
    let pool_count: u64 = pool.snapshot().iter().map(|key| key.tokens_used).sum();
    eprintln!(
        "offered {:.0} tokens/min; served {share:.3} of the keys' TPM; \
         {} refusals (before first answers); counted {pool_count} of {provider_count}",
        offered / minutes as f64,
        ledger.refusals.len(),
    );
    assert!(share >= 0.9, "served {share:.3} of the keys' TPM");
    assert_eq!(counted, provider_count);
    assert_eq!(pool_count, provider_count);
    let stats = pool.snapshot();
    assert!(
        stats.iter().all(|key| key.token_limit == Some(TPM as u64)),
        "limits learned from headers: {stats:?}"
    );
}

/// A request of more tokens than any key's whole window fails at once, saying so.
#[tokio::test(start_paused = true)]
async fn a_request_larger_than_every_window_fails_at_once() {
    let pool = pool(Some(TokenQuota::per_minute(10_000)));
    let inner = tower::service_fn(|_req: Request<Full<Bytes>>| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
    });
    let mut service = tower::Layer::layer(&KeyRotationLayer::new(pool.clone()), inner);
    let request = Request::post("/")
        .header("x-cost", 12_000)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let started = Instant::now();
    let error = service
        .ready()
        .await
        .unwrap()
        .call(request)
        .await
        .unwrap_err();
    assert_eq!(started.elapsed(), Duration::ZERO);
    let error = error.downcast::<CostTooLarge>().unwrap();
    assert_eq!((error.tokens(), error.window()), (12_000, 10_000));
    assert_eq!(
        error.to_string(),
        "the request's 12000 tokens exceed every API key's whole token window \
         (10000 tokens per 1 min 0 s): it can never be sent"
    );
}

/// A reservation whose answer never reported usage (a stream cut short) stays charged in
/// full; one settled gives back what was not used. A request that waits books its tokens
/// where they fit soonest and goes then, not overtaken by later ones.
#[tokio::test(start_paused = true)]
async fn an_unsettled_reservation_stays_charged_and_a_settled_one_gives_back_the_rest() {
    let pool = KeyPool::builder(KeySet::parse("k1").unwrap())
        .router(ByCost)
        .token_quota_per_key(TokenQuota::per_minute(10_000))
        .build();
    let route = |cost: u64| {
        let request = Request::post("/").header("x-cost", cost).body(()).unwrap();
        pool.route(&RequestHead::of(&request))
    };
    let cut = pool.try_reserve_route(&route(6_000)).unwrap();
    cut.mark_sent();
    drop(cut.reservation());
    drop(cut);
    let settled = pool.try_reserve_route(&route(4_000)).unwrap();
    settled.mark_sent();
    let reservation = settled.reservation().unwrap();
    drop(settled);
    assert!(pool.try_reserve_route(&route(3_000)).is_none());
    let stats = &pool.snapshot()[0];
    assert_eq!((stats.tokens_reserved, stats.tokens_used), (10_000, 0));
    assert_eq!(stats.token_wait, Some(Duration::from_nanos(6_000_000)));
    // A caller for 3,000 tokens books them: they fit in 18 s.
    let inner = tower::service_fn(|_req: Request<Full<Bytes>>| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
    });
    let mut service = tower::Layer::layer(&KeyRotationLayer::new(pool.clone()), inner);
    let request = Request::post("/")
        .header("x-cost", 3_000)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let started = Instant::now();
    let booked = tokio::spawn(async move { service.ready().await?.call(request).await });
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(!booked.is_finished());
    // The answer used 500 of 4,000: 3,500 come back, at once (3,000 of them after the
    // booking: 500 now).
    assert!(pool.try_reserve_route(&route(500)).is_none());
    reservation.settle(500);
    assert_eq!(pool.snapshot()[0].tokens_used, 500);
    assert!(pool.try_reserve_route(&route(500)).is_some());
    booked.await.unwrap().unwrap();
    assert_eq!(started.elapsed(), Duration::from_secs(18));
}
