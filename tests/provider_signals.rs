//! Every documented limit signal of Gemini and Zhipu BigModel, as the provider sends it (a
//! fixture each under `tests/fixtures/`), through the provider's profile and a pool with
//! buckets: the outcome, the scope it hits (the request's model on that key, or every model
//! of the key) and the rest it causes. The table of the `classify` module docs lists the
//! same signals.
//!
//! Sources:
//! - Zhipu: the error-code table, <https://docs.bigmodel.cn/cn/faq/api-code> (1113 arrears,
//!   1302 concurrency, 1303 frequency, 1304 daily calls, 1305 overload, 1308 a usage cap
//!   whose message names the time it resets: "已达到 ${number} ${unit} 的使用上限。您的限额将在
//!   ${next_flush_time} 重置。"), and the rate-limit page,
//!   <https://docs.bigmodel.cn/cn/api/rate-limit> (concurrency is limited per model).
//! - Gemini: <https://ai.google.dev/gemini-api/docs/rate-limits> (limits per project and
//!   model; requests and tokens per minute, requests per day, the day resetting at midnight
//!   Pacific time) and <https://ai.google.dev/gemini-api/docs/troubleshooting> (429
//!   `RESOURCE_EXHAUSTED`, 503 `UNAVAILABLE`); the `google.rpc` details (`QuotaFailure`,
//!   `RetryInfo`) are those of <https://cloud.google.com/apis/design/errors>.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, StatusCode};
use tower_key_rotation::classify::{Classifier, Outcome, Scope};
use tower_key_rotation::pool::{KeyState, KeyStats, Lease};
use tower_key_rotation::route::{RequestHead, Route, Router};
use tower_key_rotation::{Backoff, KeyPool, KeySet};

/// Buckets by the `x-model` header.
#[derive(Debug)]
struct ByModelHeader;

impl Router for ByModelHeader {
    fn bucket<'a>(&self, head: &RequestHead<'a>) -> Option<&'a str> {
        head.headers.get("x-model")?.to_str().ok()
    }
}

fn fixture(path: &str) -> String {
    let path = format!("{}/tests/fixtures/{path}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Two keys, two models, the backoff without jitter (a rest without `Retry-After` lasts
/// exactly the base, 1 s).
struct Pool {
    pool: KeyPool,
    classifier: Classifier,
}

const REFUSED: &str = "model-a";
const OTHER: &str = "model-b";

impl Pool {
    fn new(classifier: Classifier) -> Self {
        let pool = KeyPool::builder(KeySet::parse("k1,k2").unwrap())
            .classifier(classifier.clone())
            .backoff(Backoff::default().jitter(false))
            .router(ByModelHeader)
            .build();
        let this = Self { pool, classifier };
        // Every (key, model) lane exists, serving.
        for model in [REFUSED, OTHER] {
            for key in [1, 2] {
                drop(this.take(model, key).expect("a fresh lane serves"));
            }
        }
        this
    }

    fn route(&self, model: &str) -> Route {
        let request = http::Request::builder()
            .header("x-model", model)
            .body(())
            .unwrap();
        self.pool.route(&RequestHead::of(&request))
    }

    fn take(&self, model: &str, key: usize) -> Option<Lease> {
        let lease = self
            .pool
            .try_reserve_route_where(&self.route(model), |p| p == key)?;
        lease.mark_sent();
        Some(lease)
    }

    /// Key 1 answers a request for `model-a` with `status` and `body`; returns the outcome.
    fn answer(&self, status: u16, body: &str) -> Outcome {
        let lease = self.take(REFUSED, 1).expect("key 1 serves model-a");
        let outcome = self.classify(status, body);
        lease.record(outcome);
        outcome
    }

    fn classify(&self, status: u16, body: &str) -> Outcome {
        let status = StatusCode::from_u16(status).unwrap();
        self.classifier
            .classify_with_body(status, &HeaderMap::new(), body.as_bytes())
    }

    fn lane(&self, model: &str, key: usize) -> KeyStats {
        self.pool
            .bucket_snapshot()
            .into_iter()
            .find(|s| s.bucket == model && s.key.position == key)
            .map(|s| s.key)
            .unwrap()
    }

    /// How long key 1 rests for each model, and whether key 2 serves model-a.
    fn rests(&self) -> (Option<Duration>, Option<Duration>, bool) {
        (
            rest(&self.lane(REFUSED, 1)),
            rest(&self.lane(OTHER, 1)),
            self.take(REFUSED, 2).is_some(),
        )
    }
}

fn rest(stats: &KeyStats) -> Option<Duration> {
    match stats.state {
        KeyState::Resting => Some(stats.cooling_down_for.unwrap_or_default()),
        _ => None,
    }
}

/// `a` within two seconds of `b` (the classifier reads the wall clock, the pool tokio's).
fn about(a: Option<Duration>, b: Duration) -> bool {
    a.is_some_and(|a| a.abs_diff(b) <= Duration::from_secs(2))
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// How long until the next midnight at UTC + `offset` seconds.
fn until_midnight(offset: i64) -> Duration {
    let local = unix_now() + offset;
    Duration::from_secs(((local.div_euclid(86_400) + 1) * 86_400 - local) as u64)
}

/// `at` (Unix seconds) as `YYYY-MM-DD HH:MM:SS` in Beijing time (UTC+8), as BigModel's
/// messages state it (Howard Hinnant's `civil_from_days`).
fn beijing(at: i64) -> String {
    let local = at + 8 * 3600;
    let (days, secs) = (local.div_euclid(86_400), local.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// 1302, refused with another request of the key at the provider: a concurrency limit
/// of the model. The lane's limit drops to what else was in flight, and nothing rests.
/// Alone on the key (the account's other users hold its slots) it rests the model there.
#[tokio::test(start_paused = true)]
async fn zhipu_1302_concurrency_lowers_the_models_limit_without_a_rest() {
    let zhipu = Pool::new(Classifier::bigmodel());
    let other = zhipu.take(REFUSED, 1).unwrap();
    let outcome = zhipu.answer(429, &fixture("zhipu/1302.json"));
    assert_eq!(outcome, Outcome::ConcurrencyLimited { retry_after: None });
    assert_eq!(outcome.scope(), Scope::Bucket);
    assert_eq!(zhipu.rests(), (None, None, true));
    assert_eq!(zhipu.lane(REFUSED, 1).concurrency_limit, Some(1));
    assert_eq!(zhipu.lane(OTHER, 1).concurrency_limit, None);
    drop(other);

    let zhipu = Pool::new(Classifier::bigmodel());
    zhipu.answer(429, &fixture("zhipu/1302.json"));
    assert_eq!(zhipu.rests(), (Some(Duration::from_secs(1)), None, true));
}

/// 1303, frequency: a rate limit of the model. It rests on the key; other models and
/// other keys serve.
#[tokio::test(start_paused = true)]
async fn zhipu_1303_frequency_rests_the_model_on_the_key() {
    let zhipu = Pool::new(Classifier::bigmodel());
    let outcome = zhipu.answer(429, &fixture("zhipu/1303.json"));
    assert_eq!(outcome, Outcome::AccountLimited { retry_after: None });
    assert_eq!(outcome.scope(), Scope::Bucket);
    assert_eq!(zhipu.rests(), (Some(Duration::from_secs(1)), None, true));
}

/// 1304, the day's calls used up: the account's, every model of the key, until the next
/// midnight in Beijing.
#[tokio::test(start_paused = true)]
async fn zhipu_1304_daily_cap_rests_the_key_until_midnight_in_beijing() {
    let zhipu = Pool::new(Classifier::bigmodel());
    let outcome = zhipu.answer(429, &fixture("zhipu/1304.json"));
    assert!(matches!(outcome, Outcome::QuotaExhausted { .. }));
    assert_eq!(outcome.scope(), Scope::Key);
    let (refused, other, key_2) = zhipu.rests();
    let midnight = until_midnight(8 * 3600);
    assert!(about(refused, midnight), "{refused:?}, not {midnight:?}");
    assert_eq!(refused, other, "every model of the key");
    assert!(key_2);
}

/// 1305, the platform overloaded: not the key's doing, no rest anywhere.
#[tokio::test(start_paused = true)]
async fn zhipu_1305_overload_rests_nothing() {
    let zhipu = Pool::new(Classifier::bigmodel());
    let outcome = zhipu.answer(429, &fixture("zhipu/1305.json"));
    assert_eq!(outcome, Outcome::Failure);
    assert_eq!(zhipu.rests(), (None, None, true));
}

/// 1308, a usage cap (five hours on the coding plan): every model of the key, until the
/// time its message names (Beijing time).
#[tokio::test(start_paused = true)]
async fn zhipu_1308_usage_cap_rests_the_key_until_the_time_in_its_message() {
    let zhipu = Pool::new(Classifier::bigmodel());
    let reset = 2 * 3600 + 17 * 60 + 5;
    let body = fixture("zhipu/1308.json").replace("{reset}", &beijing(unix_now() + reset));
    let outcome = zhipu.answer(429, &body);
    assert!(matches!(outcome, Outcome::QuotaExhausted { .. }));
    assert_eq!(outcome.scope(), Scope::Key);
    let (refused, other, key_2) = zhipu.rests();
    let reset = Duration::from_secs(reset as u64);
    assert!(about(refused, reset), "{refused:?}, not {reset:?}");
    assert_eq!(refused, other);
    assert!(key_2);
}

/// 1113, the account in arrears: every model of the key, for the pool's quota wait (no
/// reset is known: billing must change), then one probe.
#[tokio::test(start_paused = true)]
async fn zhipu_1113_arrears_rests_the_key_for_the_quota_wait() {
    let zhipu = Pool::new(Classifier::bigmodel());
    let outcome = zhipu.answer(429, &fixture("zhipu/1113.json"));
    assert_eq!(
        outcome,
        Outcome::QuotaExhausted {
            reset_after: None,
            scope: Scope::Key
        }
    );
    let hour = Some(Duration::from_secs(3600));
    assert_eq!(zhipu.rests(), (hour, hour, true));
}

/// A per-minute quota: the model rests on the key for `RetryInfo.retryDelay`, to the
/// nanosecond.
#[tokio::test(start_paused = true)]
async fn gemini_per_minute_quota_rests_the_model_for_its_retry_delay() {
    let gemini = Pool::new(Classifier::gemini());
    let outcome = gemini.answer(429, &fixture("gemini/per_minute.json"));
    let delay = Duration::new(45, 837_906_927);
    assert_eq!(
        outcome,
        Outcome::RateLimited {
            retry_after: Some(delay)
        }
    );
    assert_eq!(outcome.scope(), Scope::Bucket);
    assert_eq!(gemini.rests(), (Some(delay), None, true));

    let gemini = Pool::new(Classifier::gemini());
    gemini.answer(429, &fixture("gemini/input_tokens_per_minute.json"));
    assert_eq!(gemini.rests(), (Some(Duration::from_secs(12)), None, true));
}

/// A 39 s throttle listed beside a per-day violation is a 39 s rest of the model, never a
/// rest until midnight.
#[tokio::test(start_paused = true)]
async fn gemini_39_second_throttle_is_never_read_as_daily() {
    let gemini = Pool::new(Classifier::gemini());
    let outcome = gemini.answer(429, &fixture("gemini/per_minute_beside_per_day.json"));
    let delay = Duration::from_secs(39);
    assert_eq!(
        outcome,
        Outcome::RateLimited {
            retry_after: Some(delay)
        }
    );
    assert_eq!(gemini.rests(), (Some(delay), None, true));
    tokio::time::advance(delay).await;
    assert!(gemini.take(REFUSED, 1).is_some(), "back after 39 s");
}

/// A per-day quota of the model alone: spent until midnight Pacific time (PST or PDT), for
/// that model on the key; its other models serve.
#[tokio::test(start_paused = true)]
async fn gemini_per_day_quota_rests_the_model_until_midnight_pacific() {
    let gemini = Pool::new(Classifier::gemini());
    let outcome = gemini.answer(429, &fixture("gemini/per_day.json"));
    assert!(matches!(outcome, Outcome::QuotaExhausted { .. }));
    assert_eq!(outcome.scope(), Scope::Bucket);
    let (refused, other, key_2) = gemini.rests();
    let (pst, pdt) = (until_midnight(-8 * 3600), until_midnight(-7 * 3600));
    assert!(
        about(refused, pst) || about(refused, pdt),
        "{refused:?}, not {pst:?} nor {pdt:?}"
    );
    assert_eq!(other, None);
    assert!(key_2);
}

/// 503 `UNAVAILABLE`, the model overloaded: the platform's, no rest.
#[tokio::test(start_paused = true)]
async fn gemini_overload_rests_nothing() {
    let gemini = Pool::new(Classifier::gemini());
    let outcome = gemini.answer(503, &fixture("gemini/overloaded.json"));
    assert_eq!(outcome, Outcome::Failure);
    assert_eq!(gemini.rests(), (None, None, true));
}
