//! The article workload and the five ways of sending it.
//!
//! `articles` readers each ask for an article at the same moment; each article's
//! `sections` are expanded in parallel, one chat completion per section. The same requests
//! go through a plain hyper-util client (case 1) or through the library's own stack,
//! `RetryLayer → KeyRotationLayer → client` over one pool with its default wait budget
//! (cases 2 to 5): a refused request goes again on a key that can take it, after waiting
//! for one within the budget, and the pool learns each key's concurrency from the refusals.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt};
use tower_key_rotation::retry::{Attempts, ReplayBody, RetryLayer};
use tower_key_rotation::{
    BoxError, KeyPool, KeyRotationLayer, KeySet, Quota, Selection, pool::KeyStats,
};

use crate::mock::{self, Attempt, Limits, MockProvider};

/// The request body through the layer: held in memory, so a refused request can be sent
/// again.
type Body = ReplayBody<Full<Bytes>>;

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
    /// Retries per section through the layer ([`RetryLayer::max_retries`]).
    pub(crate) max_retries: usize,
    /// How long a section may wait for a key, across its attempts
    /// ([`KeyPoolBuilder::max_wait`](tower_key_rotation::KeyPoolBuilder::max_wait)).
    pub(crate) max_wait: Duration,
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
    /// One key through `KeyRotation`: refused requests wait for the key and go again, and
    /// the pool learns how many the key takes at once.
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
                "a refused request waits for the key and goes again; the pool learns its limit"
            }
            Case::RoundRobin => {
                "requests rotate over the keys, uncapped: the first burst is refused, unseen"
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
    /// Sections that failed otherwise (no key within the wait budget, transport errors,
    /// other statuses).
    pub(crate) caller_errors: usize,
    /// Per section that got an answer: attempts it took and time it waited for a key (the
    /// library's [`Attempts`]; one attempt and no wait when it carries none).
    pub(crate) tries: Vec<(u32, Duration)>,
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
    /// 200, after these attempts and this wait.
    Written(u32, Duration),
    /// 429, after these attempts and this wait.
    Refused(u32, Duration),
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

    let start = Instant::now();
    let mut sections = JoinSet::new();
    let pool = match case {
        Case::Naive => {
            let client = Client::builder(TokioExecutor::new()).build::<_, Full<Bytes>>(connector);
            let credential = header::HeaderValue::try_from(format!("Bearer {}", keys[0]))?;
            for (article, section) in section_ids(workload) {
                let client = client.clone();
                let mut request = completion_request(&url, Full::new(prompt(article, section)));
                request
                    .headers_mut()
                    .insert(header::AUTHORIZATION, credential.clone());
                sections.spawn(async move {
                    let result = client.request(request).await.map_err(BoxError::from);
                    finish(article, section, result).await
                });
            }
            None
        }
        Case::OneKey | Case::RoundRobin | Case::LeastInFlight | Case::Quota => {
            let keys = KeySet::parse(&keys.join(","))?;
            // The library's defaults otherwise: the concurrency of each key is learned
            // from the provider's refusals, below any cap set here.
            let builder = KeyPool::builder(keys).max_wait(Some(workload.max_wait));
            let builder = match case {
                Case::LeastInFlight => builder
                    .selection(Selection::LeastInFlight)
                    .max_in_flight_per_key(workload.limits.concurrency),
                Case::Quota => builder
                    .selection(Selection::LeastInFlight)
                    .max_in_flight_per_key(workload.limits.concurrency)
                    .quota_per_key(provider_quota(&workload.limits)),
                _ => builder.selection(Selection::RoundRobin),
            };
            let pool = builder.build();
            let client = Client::builder(TokioExecutor::new()).build::<_, Body>(connector);
            // The retry goes outside the rotation, so each attempt reserves a key of its
            // own; both share the pool (and so its wait budget).
            let service = ServiceBuilder::new()
                .layer(RetryLayer::new(pool.clone()).max_retries(workload.max_retries))
                .layer(KeyRotationLayer::new(pool.clone()))
                .service(client);
            for (article, section) in section_ids(workload) {
                let service = service.clone();
                // The prompt is in memory already: a buffered body can be replayed.
                let body = ReplayBody::buffered(prompt(article, section));
                let request = completion_request(&url, body);
                sections.spawn(async move {
                    let result = service.oneshot(request).await;
                    finish(article, section, result).await
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
        tries: Vec::new(),
        upstream: Vec::new(),
        upstream_max_in_flight: Vec::new(),
        pool: None,
    };
    while let Some(section) = sections.join_next().await {
        match section? {
            Section::Written(attempts, waited) => {
                run.sections_ok += 1;
                run.tries.push((attempts, waited));
            }
            Section::Refused(attempts, waited) => {
                run.caller_429 += 1;
                run.tries.push((attempts, waited));
            }
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

/// The chat completion request body for one section.
fn prompt(article: usize, section: usize) -> Bytes {
    Bytes::from(format!(
        r#"{{"model":"glm-4-flash","messages":[{{"role":"user","content":"Write section {section} of article {article}."}}]}}"#
    ))
}

fn completion_request<B>(url: &http::Uri, body: B) -> Request<B> {
    Request::post(url.clone())
        .header(header::CONTENT_TYPE, "application/json")
        .body(body)
        .expect("a fixed, valid request")
}

/// Reads the answer to its end (which frees the key in the layer) and logs the outcome.
async fn finish<B>(article: usize, section: usize, result: Result<Response<B>, BoxError>) -> Section
where
    B: http_body::Body,
    B::Error: Into<BoxError>,
{
    let response = match result {
        Ok(response) => response,
        Err(error) => {
            tracing::error!(target: "demo", "article {article} section {section}: {error}");
            return Section::Failed;
        }
    };
    let status = response.status();
    // Put there by the library's retry when a section took more than one attempt or
    // waited for a key.
    let (attempts, waited) = response
        .extensions()
        .get::<Attempts>()
        .map_or((1, Duration::ZERO), |a| (a.count(), a.waited()));
    let key = response
        .headers()
        .get(mock::KEY_POSITION_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("?")
        .to_owned();
    let body = response.into_body().collect().await;
    let tries = match (attempts, waited.is_zero()) {
        (1, true) => String::new(),
        (1, false) => format!(" (waited {:.2} s)", waited.as_secs_f64()),
        (n, _) => format!(" (attempt {n}, waited {:.2} s)", waited.as_secs_f64()),
    };
    match (status, body) {
        (StatusCode::OK, Ok(_)) => {
            tracing::info!(target: "demo", "article {article} section {section} written by key {key}{tries}");
            Section::Written(attempts, waited)
        }
        (StatusCode::TOO_MANY_REQUESTS, _) => {
            tracing::warn!(target: "demo", "article {article} section {section}: 429 Too Many Requests reached the caller{tries}");
            Section::Refused(attempts, waited)
        }
        (status, _) => {
            tracing::error!(target: "demo", "article {article} section {section}: {status}");
            Section::Failed
        }
    }
}
