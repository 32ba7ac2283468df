//! One request through the whole path: `poll_ready`, `call`, the response, and the response
//! body to its end, over an inner service that answers at once. What each way of putting a
//! key on a request costs, side by side:
//!
//! - `bare_inner`: the inner service alone (no key at all), the floor;
//! - `set_request_header`: tower-http's `SetRequestHeader` with one static key, no rotation;
//! - `key_rotation_round_robin`, `key_rotation_least_in_flight`: our `KeyRotation` over 3 and
//!   256 keys;
//! - `key_rotation_learned_limit`: round-robin with every key's concurrency limit learned
//!   down to 2 by a refusal (learning is on by default), so that each take goes through the
//!   capped compare-and-swap path rather than the uncapped increment;
//! - `tower_p2c`: the ecosystem's build of the same rotation, tower's `balance::p2c` over one
//!   `SetRequestHeader` per key with `PendingRequests` load (one owner: `Balance` is not
//!   `Clone`);
//! - `tower_p2c_buffered`: the same behind a `Buffer`, which is what sharing it between tasks
//!   takes (our `KeyRotation` is `Clone` and shares its pool without one);
//! - `key_rotation_limit_headers`: round-robin `KeyRotation` over an inner service whose
//!   answers carry the head of an OpenAI answer (ten headers, the rate-limit ones with
//!   requests and tokens left), so that classifying reads them as every real answer's are
//!   (the other paths' answers have no header, which the classifier skips at once);
//! - `key_rotation_bucketed`: round-robin `KeyRotation` over a pool with buckets (a
//!   router reading `x-model`): the key chosen in `call`, in its lane for the bucket; beside
//!   `key_rotation_round_robin`, what buckets cost a request;
//! - `key_rotation_retry`: round-robin `KeyRotation` behind our `RetryLayer`, the request's
//!   body a buffered `ReplayBody` (so it could be sent again), never refused: what the retry
//!   layer costs a request that is not retried (as nearly none is).
//!
//! Before the timings it prints the heap allocations per request of each path in steady
//! state, counted by a counting global allocator (`stats_alloc`: the crate forbids `unsafe`,
//! so the allocator wrapper comes from a crate). Requests are built outside the timed and
//! counted sections; everything from `poll_ready` to the body's end is inside.
//!
//! ```sh
//! cargo bench --bench layer
//! ```

use std::alloc::System;
use std::convert::Infallible;
use std::fmt::Debug;
use std::hint::black_box;
use std::pin::pin;
use std::sync::LazyLock;
use std::time::Duration;

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput};
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue, Method, Request, Response, Uri};
use http_body::Body;
use http_body_util::{BodyExt, Full};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use tokio::runtime::Runtime;
use tokio::time::Instant;
use tower::balance::p2c::Balance;
use tower::buffer::Buffer;
use tower::discover::ServiceList;
use tower::load::{CompleteOnResponse, PendingRequestsDiscover};
use tower::{Layer, Service, ServiceExt};
use tower_http::set_header::SetRequestHeader;
use tower_key_rotation::retry::{ReplayBody, Retry, RetryLayer};
use tower_key_rotation::{
    BoxError, KeyPool, KeyRotation, KeyRotationLayer, KeySet, Selection, classify::Outcome,
};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const CHAT_REQUEST: &[u8] =
    br#"{"model":"glm-4-flash","messages":[{"role":"user","content":"Hello"}]}"#;
const CHAT_RESPONSE: &[u8] = br#"{"id":"1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"Hi"},"finish_reason":"stop"}]}"#;
/// Requests built ahead of each timed stretch.
const BATCH: u64 = 256;
/// Requests counted for allocations, after as many to warm up.
const COUNTED: u64 = 10_000;

type ReqBody = Full<Bytes>;
type Answer = std::future::Ready<Result<Response<Full<Bytes>>, Infallible>>;
type Inner = tower::util::ServiceFn<fn(Request<ReqBody>) -> Answer>;

fn answer(_request: Request<ReqBody>) -> Answer {
    std::future::ready(Ok(Response::new(Full::new(Bytes::from_static(
        CHAT_RESPONSE,
    )))))
}

/// The upstream: answers at once with a fixed chat completion.
fn inner() -> Inner {
    tower::service_fn(answer as fn(Request<ReqBody>) -> Answer)
}

/// The head of an OpenAI chat completion: limits reported, none used up.
static LIMIT_HEADERS: LazyLock<HeaderMap> = LazyLock::new(|| {
    let mut headers = HeaderMap::new();
    for (name, value) in [
        ("content-type", "application/json"),
        ("date", "Tue, 01 Dec 2026 18:00:00 GMT"),
        ("x-request-id", "req_0123456789abcdef0123456789abcdef"),
        ("openai-processing-ms", "412"),
        ("x-ratelimit-limit-requests", "500"),
        ("x-ratelimit-limit-tokens", "150000"),
        ("x-ratelimit-remaining-requests", "499"),
        ("x-ratelimit-remaining-tokens", "149984"),
        ("x-ratelimit-reset-requests", "120ms"),
        ("x-ratelimit-reset-tokens", "6ms"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    headers
});

fn answer_with_limits(_request: Request<ReqBody>) -> Answer {
    let mut response = Response::new(Full::new(Bytes::from_static(CHAT_RESPONSE)));
    *response.headers_mut() = LIMIT_HEADERS.clone();
    std::future::ready(Ok(response))
}

/// Round-robin over `n` keys, the answers carrying [`LIMIT_HEADERS`].
fn key_rotation_limit_headers(n: usize) -> KeyRotation<Inner> {
    let list = (0..n).map(key).collect::<Vec<_>>().join(",");
    let pool = KeyPool::new(KeySet::parse(&list).expect("valid keys"));
    let inner = tower::service_fn(answer_with_limits as fn(Request<ReqBody>) -> Answer);
    KeyRotationLayer::new(pool).layer(inner)
}

/// A chat-completion request as a client sends it (one header already set).
fn request() -> Request<ReqBody> {
    let mut request = Request::new(Full::new(Bytes::from_static(CHAT_REQUEST)));
    *request.method_mut() = Method::POST;
    *request.uri_mut() = Uri::from_static("http://127.0.0.1:8080/api/paas/v4/chat/completions");
    request
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    request
}

type ReplayReqBody = ReplayBody<Full<Bytes>>;
type ReplayAnswer = std::future::Ready<Result<Response<Full<Bytes>>, BoxError>>;
type ReplayInner = tower::util::ServiceFn<fn(Request<ReplayReqBody>) -> ReplayAnswer>;

fn replay_answer(_request: Request<ReplayReqBody>) -> ReplayAnswer {
    std::future::ready(Ok(Response::new(Full::new(Bytes::from_static(
        CHAT_RESPONSE,
    )))))
}

/// The same request with its body buffered, as a retrying caller sends it.
fn replayable_request() -> Request<ReplayReqBody> {
    // On the heap, as a body read from a socket is (a static one would clone for free).
    request().map(|_| ReplayBody::buffered(Bytes::copy_from_slice(CHAT_REQUEST)))
}

/// Our retry layer over round-robin `KeyRotation` over `n` keys.
fn key_rotation_retry(n: usize) -> Retry<KeyRotation<ReplayInner>> {
    let list = (0..n).map(key).collect::<Vec<_>>().join(",");
    let pool = KeyPool::new(KeySet::parse(&list).expect("valid keys"));
    let inner = tower::service_fn(replay_answer as fn(Request<ReplayReqBody>) -> ReplayAnswer);
    RetryLayer::new(pool.clone()).layer(KeyRotationLayer::new(pool).layer(inner))
}

fn key(i: usize) -> String {
    format!("bench-key-{i}")
}

/// `Bearer <key>`, built at run time as a key read from the environment would be.
fn bearer(i: usize) -> HeaderValue {
    let mut value = HeaderValue::try_from(format!("Bearer {}", key(i))).expect("valid header");
    value.set_sensitive(true);
    value
}

fn key_rotation(n: usize, strategy: Selection) -> KeyRotation<Inner> {
    let list = (0..n).map(key).collect::<Vec<_>>().join(",");
    let pool = KeyPool::builder(KeySet::parse(&list).expect("valid keys"))
        .selection(strategy)
        .build();
    KeyRotationLayer::new(pool).layer(inner())
}

/// Buckets by the `x-model` header: the benches' stand-in for the proxy's router.
#[derive(Debug)]
struct ByModelHeader;

impl tower_key_rotation::route::Router for ByModelHeader {
    fn bucket<'a>(&self, head: &tower_key_rotation::route::RequestHead<'a>) -> Option<&'a str> {
        head.headers.get("x-model")?.to_str().ok()
    }
}

/// Round-robin `KeyRotation` over `n` keys of a pool with buckets: each request's bucket
/// is its `x-model`, its key chosen in `call` and taken in the key's lane for the bucket.
fn key_rotation_bucketed(n: usize) -> KeyRotation<Inner> {
    let list = (0..n).map(key).collect::<Vec<_>>().join(",");
    let pool = KeyPool::builder(KeySet::parse(&list).expect("valid keys"))
        .router(ByModelHeader)
        .build();
    KeyRotationLayer::new(pool).layer(inner())
}

/// [`request`] naming its model in `x-model`.
fn bucketed_request() -> Request<ReqBody> {
    let mut request = request();
    request
        .headers_mut()
        .insert("x-model", HeaderValue::from_static("glm-4-flash"));
    request
}

/// Round-robin over `n` keys whose concurrency limit a refusal lowered to 2: three
/// requests in flight on every key, one of each refused with a 1 ms `Retry-After` (the
/// provider limits concurrency, and two others were there). After the rest, the first
/// request on each key is its probe (answered by the warm-up); from then on each take
/// reads the learned limit and goes through the capped path. Sequential requests keep one
/// in flight, below the limit, so the limit stays at 2 (it only grows from successes
/// taken at the limit).
fn key_rotation_learned_limit(n: usize) -> KeyRotation<Inner> {
    let list = (0..n).map(key).collect::<Vec<_>>().join(",");
    let pool = KeyPool::builder(KeySet::parse(&list).expect("valid keys")).build();
    let leases: Vec<_> = (0..3 * n)
        .map(|_| {
            let lease = pool.try_reserve().expect("a key");
            lease.mark_sent();
            lease
        })
        .collect();
    for lease in leases.iter().take(n) {
        lease.record(Outcome::RateLimited {
            retry_after: Some(Duration::from_millis(1)),
        });
    }
    drop(leases);
    std::thread::sleep(Duration::from_millis(5));
    assert_learned(&pool);
    KeyRotationLayer::new(pool).layer(inner())
}

/// Every key's learned concurrency limit is 2 (checked before and after the timings).
fn assert_learned(pool: &KeyPool) {
    for stats in pool.snapshot() {
        assert_eq!(stats.concurrency_limit, Some(2), "learned limit in force");
    }
}

type PerKey = SetRequestHeader<Inner, HeaderValue>;
type P2c = Balance<PendingRequestsDiscover<ServiceList<Vec<PerKey>>>, Request<ReqBody>>;

/// tower's p2c balancer over one `SetRequestHeader` per key.
fn p2c(n: usize) -> P2c {
    let services = (0..n)
        .map(|i| SetRequestHeader::overriding(inner(), AUTHORIZATION, bearer(i)))
        .collect();
    let discover =
        PendingRequestsDiscover::new(ServiceList::new(services), CompleteOnResponse::default());
    Balance::new(discover)
}

/// One request: ready, call, response, body to its end.
async fn one_request<S, Q, B>(service: &mut S, request: Request<Q>)
where
    S: Service<Request<Q>, Response = Response<B>>,
    S::Error: Debug,
    B: Body,
    B::Error: Debug,
{
    let response = service
        .ready()
        .await
        .expect("ready")
        .call(request)
        .await
        .expect("response");
    let mut body = pin!(response.into_body());
    while let Some(frame) = body.as_mut().frame().await {
        black_box(frame.expect("frame"));
    }
}

/// Times `iters` requests, building them in batches outside the timed stretches.
fn run<S, Q, B>(
    runtime: &Runtime,
    service: &mut S,
    make: fn() -> Request<Q>,
    iters: u64,
) -> Duration
where
    S: Service<Request<Q>, Response = Response<B>>,
    S::Error: Debug,
    B: Body,
    B::Error: Debug,
{
    runtime.block_on(async {
        let mut batch = Vec::with_capacity(BATCH as usize);
        let mut total = Duration::ZERO;
        let mut left = iters;
        while left > 0 {
            let count = left.min(BATCH);
            batch.extend((0..count).map(|_| make()));
            let start = Instant::now();
            for request in batch.drain(..) {
                one_request(service, request).await;
            }
            total += start.elapsed();
            left -= count;
        }
        total
    })
}

/// Heap allocations (and reallocations) per request in steady state.
fn allocations_per_request<S, Q, B>(
    runtime: &Runtime,
    service: &mut S,
    make: fn() -> Request<Q>,
) -> f64
where
    S: Service<Request<Q>, Response = Response<B>>,
    S::Error: Debug,
    B: Body,
    B::Error: Debug,
{
    runtime.block_on(async {
        for _ in 0..COUNTED {
            one_request(service, make()).await;
        }
        let batch: Vec<_> = (0..COUNTED).map(|_| make()).collect();
        let mut batch = batch.into_iter();
        let region = Region::new(GLOBAL);
        for request in batch.by_ref() {
            one_request(service, request).await;
        }
        let change = region.change();
        drop(batch);
        (change.allocations + change.reallocations) as f64 / COUNTED as f64
    })
}

fn bench_path<S, B>(c: &mut Criterion, runtime: &Runtime, name: &str, keys: usize, service: S)
where
    S: Service<Request<ReqBody>, Response = Response<B>>,
    S::Error: Debug,
    B: Body,
    B::Error: Debug,
{
    bench_path_with(c, runtime, name, keys, service, request);
}

/// [`bench_path`] with requests made by `make`.
fn bench_path_with<S, Q, B>(
    c: &mut Criterion,
    runtime: &Runtime,
    name: &str,
    keys: usize,
    mut service: S,
    make: fn() -> Request<Q>,
) where
    S: Service<Request<Q>, Response = Response<B>>,
    S::Error: Debug,
    B: Body,
    B::Error: Debug,
{
    let mut group = c.benchmark_group("layer");
    group
        .throughput(Throughput::Elements(1))
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(50);
    let mut counted = false;
    group.bench_function(BenchmarkId::new(name, keys), |b| {
        // Here rather than before: only for benchmarks the command line selects.
        if !counted {
            let allocations = allocations_per_request(runtime, &mut service, make);
            println!("layer/{name}/{keys}: allocations per request: {allocations:.2}");
            counted = true;
        }
        b.iter_custom(|iters| run(runtime, &mut service, make, iters));
    });
    group.finish();
}

fn layer(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    // Buffer spawns its worker on the current runtime.
    let _entered = runtime.enter();

    bench_path(c, &runtime, "bare_inner", 0, inner());
    bench_path(
        c,
        &runtime,
        "set_request_header",
        1,
        SetRequestHeader::overriding(inner(), AUTHORIZATION, bearer(0)),
    );
    for n in [3, 256] {
        for (strategy, name) in [
            (Selection::RoundRobin, "key_rotation_round_robin"),
            (Selection::LeastInFlight, "key_rotation_least_in_flight"),
        ] {
            bench_path(c, &runtime, name, n, key_rotation(n, strategy));
        }
        bench_path_with(
            c,
            &runtime,
            "key_rotation_bucketed",
            n,
            key_rotation_bucketed(n),
            bucketed_request,
        );
        bench_path(
            c,
            &runtime,
            "key_rotation_limit_headers",
            n,
            key_rotation_limit_headers(n),
        );
        bench_path_with(
            c,
            &runtime,
            "key_rotation_retry",
            n,
            key_rotation_retry(n),
            replayable_request,
        );
        let learned = key_rotation_learned_limit(n);
        let pool = learned.pool().clone();
        bench_path(c, &runtime, "key_rotation_learned_limit", n, learned);
        assert_learned(&pool);
        bench_path(c, &runtime, "tower_p2c", n, p2c(n));
        bench_path(
            c,
            &runtime,
            "tower_p2c_buffered",
            n,
            Buffer::new(p2c(n), 1024),
        );
    }
}

// `criterion_main!` spelled out: the macro's generated `pub fn` would trip `missing_docs`.
fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    layer(&mut criterion);
    criterion.final_summary();
}
