//! The article workload and the five ways of sending it.
//!
//! `articles` readers each ask for an article at the same moment; each article's
//! `sections` are expanded in parallel, one chat completion per section. The same requests
//! go through a plain hyper-util client (case 1) or through `Retry → KeyRotation → client`
//! (cases 2 to 5), where the retry policy outside the layer resends a 429-answered request
//! and the layer's `poll_ready` makes the resend wait for a key that is not cooling down.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tower::retry::{Policy, RetryLayer};
use tower::{ServiceBuilder, ServiceExt};
use tower_key_rotation::{
    BoxError, KeyPool, KeyRotationLayer, KeySet, KeyStats, Quota, Strategy, TriedKeys,
};

use crate::mock::{self, Attempt, Limits, MockProvider};

/// The request body type: buffered, so a refused request can be sent again.
type Body = Full<Bytes>;

/// What to run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Workload {
    /// Articles requested at the same moment.
    pub(crate) articles: usize,
    /// Sections per article, expanded in parallel.
    pub(crate) sections: usize,
    /// Keys in the multi-key cases.
    pub(crate) keys: usize,
    /// The provider's limits per key.
    pub(crate) limits: Limits,
    /// Attempts per section through the layer before a 429 reaches the caller.
    pub(crate) max_attempts: u32,
}

impl Workload {
    /// Completions in the whole workload.
    pub(crate) fn requests(&self) -> usize {
        self.articles * self.sections
    }
}

/// One of the five ways of sending the workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Case {
    /// One key, a plain client: parallel requests, 429s reach the caller.
    Naive,
    /// One key through `KeyRotation`: refused requests wait for the key and go again.
    OneKey,
    /// All keys through `KeyRotation`, round-robin, no cap.
    RoundRobin,
    /// All keys, least-in-flight, capped at the provider's concurrency per key.
    LeastInFlight,
    /// All keys, least-in-flight, each with the provider's concurrency as its cap and the
    /// provider's rate as its quota: nothing is sent that the provider would refuse.
    Quota,
}

impl Case {
    /// The five cases in order.
    pub(crate) const ALL: [Case; 5] = [
        Case::Naive,
        Case::OneKey,
        Case::RoundRobin,
        Case::LeastInFlight,
        Case::Quota,
    ];

    /// 1-based number, as the issue and the table count them.
    pub(crate) fn number(self) -> usize {
        match self {
            Case::Naive => 1,
            Case::OneKey => 2,
            Case::RoundRobin => 3,
            Case::LeastInFlight => 4,
            Case::Quota => 5,
        }
    }

    /// Keys the case uses.
    pub(crate) fn keys(self, workload: &Workload) -> usize {
        match self {
            Case::Naive | Case::OneKey => 1,
            Case::RoundRobin | Case::LeastInFlight | Case::Quota => workload.keys,
        }
    }

    /// A short title for headings and the table.
    pub(crate) fn title(self, workload: &Workload) -> String {
        let keys = match self.keys(workload) {
            1 => "one key".to_owned(),
            n => format!("{} keys", number_word(n)),
        };
        match self {
            Case::Naive => format!("{keys}, naive client, no layer"),
            Case::OneKey => format!("{keys} through KeyRotation"),
            Case::RoundRobin => format!("{keys}, round-robin"),
            Case::LeastInFlight => format!(
                "{keys}, least-in-flight, cap {}",
                workload.limits.concurrency
            ),
            Case::Quota => format!("{keys}, quotas set to the provider's limits"),
        }
    }

    /// The title in digits, for the table.
    pub(crate) fn short_title(self, workload: &Workload) -> String {
        let keys = match self.keys(workload) {
            1 => "1 key".to_owned(),
            n => format!("{n} keys"),
        };
        match self {
            Case::Naive => format!("{keys}, naive, no layer"),
            Case::OneKey => format!("{keys}, KeyRotation"),
            Case::RoundRobin => format!("{keys}, round-robin"),
            Case::LeastInFlight => format!(
                "{keys}, least-in-flight, cap {}",
                workload.limits.concurrency
            ),
            Case::Quota => format!(
                "{keys}, quota {}/{:.1} s, cap {}",
                workload.limits.rate,
                workload.limits.window.as_secs_f64(),
                workload.limits.concurrency
            ),
        }
    }

    /// One sentence on what the case shows.
    pub(crate) fn story(self) -> &'static str {
        match self {
            Case::Naive => {
                "every request fires at once on one key; the provider's 429s reach the caller"
            }
            Case::OneKey => {
                "a refused request is resent, and the layer holds it until the key has cooled down"
            }
            Case::RoundRobin => {
                "requests rotate over the keys, uncapped: the provider still refuses some, unseen"
            }
            Case::LeastInFlight => {
                "each key takes at most the provider's concurrency; the rest wait for a free slot"
            }
            Case::Quota => {
                "each key sends at most the provider's rate and concurrency; nothing is refused"
            }
        }
    }
}

/// `3` → `three`, for titles that read as text.
fn number_word(n: usize) -> String {
    const WORDS: [&str; 11] = [
        "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    ];
    WORDS
        .get(n)
        .map_or_else(|| n.to_string(), |w| (*w).to_owned())
}

/// What one case did.
#[derive(Debug)]
pub(crate) struct CaseRun {
    /// Which case.
    pub(crate) case: Case,
    /// Keys used.
    pub(crate) keys: usize,
    /// From the first request to the last section written (or refused).
    pub(crate) wall: Duration,
    /// Sections that came back 200.
    pub(crate) sections_ok: usize,
    /// Sections whose caller got a 429.
    pub(crate) caller_429: usize,
    /// Sections that failed otherwise (transport errors, other statuses).
    pub(crate) caller_errors: usize,
    /// Every request the provider saw.
    pub(crate) upstream: Vec<Attempt>,
    /// The most completions in progress at once per key, counted by the provider.
    pub(crate) upstream_max_in_flight: Vec<u32>,
    /// The pool's own statistics at the end (cases 2 to 4).
    pub(crate) pool: Option<Vec<KeyStats>>,
}

/// How one section ended, seen by its caller.
#[derive(Debug)]
enum Section {
    Written,
    Refused,
    Failed,
}

/// The fake keys of a case. They are never printed: keys are named by position.
fn fake_keys(count: usize) -> Vec<String> {
    (1..=count)
        .map(|i| format!("demo-key-{i}-{:08x}", fastrand::u32(..)))
        .collect()
}

/// Runs one case against a fresh mock provider.
pub(crate) async fn run(case: Case, workload: &Workload) -> Result<CaseRun, BoxError> {
    let keys = fake_keys(case.keys(workload));
    let provider = MockProvider::start(&keys, workload.limits).await?;
    let url: http::Uri =
        format!("http://{}/api/paas/v4/chat/completions", provider.addr()).parse()?;

    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client = Client::builder(TokioExecutor::new()).build::<_, Body>(connector);

    let start = Instant::now();
    let mut sections = JoinSet::new();
    let pool = match case {
        Case::Naive => {
            let credential = header::HeaderValue::try_from(format!("Bearer {}", keys[0]))?;
            for (article, section) in section_ids(workload) {
                let client = client.clone();
                let mut request = completion_request(&url, article, section);
                request
                    .headers_mut()
                    .insert(header::AUTHORIZATION, credential.clone());
                sections.spawn(async move {
                    let result = client.request(request).await.map_err(BoxError::from);
                    finish(article, section, result.map(|r| (r, 1))).await
                });
            }
            None
        }
        Case::OneKey | Case::RoundRobin | Case::LeastInFlight | Case::Quota => {
            let keys = KeySet::parse(&keys.join(","))?;
            let builder = KeyPool::builder(keys);
            let builder = match case {
                Case::LeastInFlight => builder
                    .strategy(Strategy::LeastInFlight)
                    .max_in_flight_per_key(workload.limits.concurrency),
                Case::Quota => builder
                    .strategy(Strategy::LeastInFlight)
                    .max_in_flight_per_key(workload.limits.concurrency)
                    .quota_per_key(provider_quota(&workload.limits)),
                _ => builder.strategy(Strategy::RoundRobin),
            };
            let pool = builder.build();
            let service = ServiceBuilder::new()
                .layer(RetryLayer::new(RetryOn429 {
                    max_attempts: workload.max_attempts,
                }))
                .layer(KeyRotationLayer::new(pool.clone()))
                .service(client.clone());
            for (article, section) in section_ids(workload) {
                let service = service.clone();
                let attempts = Attempts::default();
                let mut request = completion_request(&url, article, section);
                request.extensions_mut().insert(attempts.clone());
                request.extensions_mut().insert(TriedKeys::new());
                sections.spawn(async move {
                    let result = service.oneshot(request).await;
                    let attempts = attempts.get();
                    finish(article, section, result.map(|r| (r, attempts))).await
                });
            }
            Some(pool)
        }
    };

    let mut run = CaseRun {
        case,
        keys: case.keys(workload),
        wall: Duration::ZERO,
        sections_ok: 0,
        caller_429: 0,
        caller_errors: 0,
        upstream: Vec::new(),
        upstream_max_in_flight: Vec::new(),
        pool: None,
    };
    while let Some(section) = sections.join_next().await {
        match section? {
            Section::Written => run.sections_ok += 1,
            Section::Refused => run.caller_429 += 1,
            Section::Failed => run.caller_errors += 1,
        }
    }
    run.wall = start.elapsed();
    run.upstream = provider.log();
    run.upstream_max_in_flight = provider.max_in_flight();
    run.pool = pool.map(|pool| pool.snapshot());
    Ok(run)
}

/// The provider's rate limit as a per-key [`Quota`]: `rate` requests per `window`, spaced
/// evenly, so no window ever holds more than `rate`.
///
/// The window is stretched by 2% (and 10 ms): the quota spaces requests when they leave
/// the layer, the provider counts them when they arrive, and a request that needed a new
/// connection arrives a little later than one that found an open one. Without slack, the
/// last request of a window could arrive a hair inside it.
pub(crate) fn provider_quota(limits: &Limits) -> Quota {
    let window = limits.window.mul_f64(1.02) + Duration::from_millis(10);
    Quota::new(limits.rate, window)
}

/// `(article, section)`, 1-based, in the order the callers start.
fn section_ids(workload: &Workload) -> impl Iterator<Item = (usize, usize)> + use<> {
    let sections = workload.sections;
    (1..=workload.articles).flat_map(move |a| (1..=sections).map(move |s| (a, s)))
}

fn completion_request(url: &http::Uri, article: usize, section: usize) -> Request<Body> {
    let body = format!(
        r#"{{"model":"glm-4-flash","messages":[{{"role":"user","content":"Write section {section} of article {article}."}}]}}"#
    );
    Request::post(url.clone())
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("a fixed, valid request")
}

/// Reads the answer to its end (which frees the key in the layer) and logs the outcome.
async fn finish<B>(
    article: usize,
    section: usize,
    result: Result<(Response<B>, u32), BoxError>,
) -> Section
where
    B: http_body::Body,
    B::Error: Into<BoxError>,
{
    let (response, attempts) = match result {
        Ok(answer) => answer,
        Err(error) => {
            tracing::error!(target: "demo", "article {article} section {section}: {error}");
            return Section::Failed;
        }
    };
    let status = response.status();
    let key = response
        .headers()
        .get(mock::KEY_POSITION_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("?")
        .to_owned();
    let body = response.into_body().collect().await;
    let tries = match attempts {
        1 => String::new(),
        n => format!(" (attempt {n})"),
    };
    match (status, body) {
        (StatusCode::OK, Ok(_)) => {
            tracing::info!(target: "demo", "article {article} section {section} written by key {key}{tries}");
            Section::Written
        }
        (StatusCode::TOO_MANY_REQUESTS, _) => {
            tracing::warn!(target: "demo", "article {article} section {section}: 429 Too Many Requests reached the caller");
            Section::Refused
        }
        (status, _) => {
            tracing::error!(target: "demo", "article {article} section {section}: {status}");
            Section::Failed
        }
    }
}

/// Attempts made for one section, shared by every copy of its request.
#[derive(Debug, Clone)]
struct Attempts(Arc<AtomicU32>);

impl Default for Attempts {
    fn default() -> Self {
        // The first attempt.
        Self(Arc::new(AtomicU32::new(1)))
    }
}

impl Attempts {
    fn get(&self) -> u32 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Resends a request that came back 429, up to `max_attempts` in all.
///
/// No sleep here: the resend goes back through `KeyRotation::poll_ready`, which waits
/// until a key is available (the refusing key cools down for the provider's Retry-After).
///
/// The library's own `retry::RetryLayer` is built for proxies: it resends only on an
/// untried key that is usable right now and otherwise hands the 429 (with its
/// Retry-After) back at once, so with one key it would never resend. An article generator
/// would rather wait, so the demo resends on whatever key the layer gives it next.
#[derive(Debug, Clone)]
struct RetryOn429 {
    max_attempts: u32,
}

impl<B, E> Policy<Request<Body>, Response<B>, E> for RetryOn429 {
    type Future = std::future::Ready<()>;

    fn retry(
        &mut self,
        req: &mut Request<Body>,
        result: &mut Result<Response<B>, E>,
    ) -> Option<Self::Future> {
        let Ok(response) = result else {
            return None;
        };
        if response.status() != StatusCode::TOO_MANY_REQUESTS {
            return None;
        }
        let attempts = req.extensions().get::<Attempts>()?;
        if attempts.get() >= self.max_attempts {
            return None; // spent: the caller gets this 429
        }
        attempts.0.fetch_add(1, Ordering::Relaxed);
        Some(std::future::ready(()))
    }

    fn clone_request(&mut self, req: &Request<Body>) -> Option<Request<Body>> {
        let mut clone = Request::new(req.body().clone());
        *clone.method_mut() = req.method().clone();
        *clone.uri_mut() = req.uri().clone();
        *clone.version_mut() = req.version();
        *clone.headers_mut() = req.headers().clone();
        *clone.extensions_mut() = req.extensions().clone();
        Some(clone)
    }
}
