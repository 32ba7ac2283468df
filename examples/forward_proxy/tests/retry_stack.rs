//! The `retry` module through real sockets: tower's retry loop, the key layer and a
//! hyper-util client against a mock upstream on 127.0.0.1.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use support::{MockUpstream, Seen, reply, within};
use tower::retry::budget::TpsBudget;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_key_rotation::retry::{ReplayBody, RetryLayer};
use tower_key_rotation::{BoxError, KeyPool, KeyRotationLayer, KeySet, retry::TriedKeys};

const KEYS: [&str; 3] = ["rk-one", "rk-two", "rk-three"];

fn pool(n: usize) -> KeyPool {
    KeyPool::new(KeySet::parse(&KEYS[..n].join(",")).unwrap())
}

type Body = ReplayBody<Full<Bytes>>;

/// Retry → KeyRotation → hyper-util client, as the crate docs compose them.
fn stack(
    pool: &KeyPool,
    retry: RetryLayer,
) -> impl Service<Request<Body>, Response = Response<impl http_body::Body>, Error = BoxError> + Clone
{
    let client = Client::builder(TokioExecutor::new()).build::<_, Body>(HttpConnector::new());
    ServiceBuilder::new()
        .layer(retry)
        .layer(KeyRotationLayer::new(pool.clone()))
        .service(client)
}

async fn buffered(text: &str) -> Body {
    ReplayBody::buffer(Full::new(Bytes::from(text.to_owned())), 1024)
        .await
        .unwrap()
}

/// Sends one request and returns it (with its `TriedKeys`) and the response.
async fn send<S, B>(service: S, url: &str, body: Body) -> (TriedKeys, Result<Response<B>, BoxError>)
where
    S: Service<Request<Body>, Response = Response<B>, Error = BoxError>,
{
    let tried = TriedKeys::new();
    let mut request = Request::post(url).body(body).unwrap();
    request.extensions_mut().insert(tried.clone());
    let result = within("the retried response", service.oneshot(request)).await;
    (tried, result)
}

fn limited(retry_after: &'static str) -> Response<support::MockBody> {
    let mut response = reply(429, "slow down");
    response
        .headers_mut()
        .insert("retry-after", retry_after.parse().unwrap());
    response.headers_mut().insert(
        "retry-after-ms",
        format!("{retry_after}000").parse().unwrap(),
    );
    response
}

fn key_of(seen: &Seen) -> usize {
    let bearer = seen.bearer().unwrap_or_default();
    KEYS.iter().position(|k| *k == bearer).map_or(0, |i| i + 1)
}

fn keys_seen(upstream: &MockUpstream) -> Vec<usize> {
    upstream.seen().iter().map(key_of).collect()
}

#[tokio::test]
async fn a_429_is_resent_with_the_same_body_on_a_key_not_tried_yet() {
    let upstream = MockUpstream::start(|seen: Seen| async move {
        if key_of(&seen) == 1 {
            limited("30")
        } else {
            reply(200, "ok")
        }
    })
    .await;
    let pool = pool(3);
    let service = stack(&pool, RetryLayer::new(pool.clone()));

    let (tried, result) = send(
        service,
        &upstream.url("/v4/chat"),
        buffered("{\"q\":1}").await,
    )
    .await;
    let response = result.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response
            .into_body()
            .collect()
            .await
            .ok()
            .unwrap()
            .to_bytes(),
        "ok"
    );
    assert_eq!(tried.positions(), [1, 2]);
    assert_eq!(keys_seen(&upstream), [1, 2]);
    let seen = upstream.seen();
    assert_eq!(seen[0].body, "{\"q\":1}");
    assert_eq!(seen[1].body, "{\"q\":1}");
    assert!(pool.snapshot().iter().all(|k| k.in_flight == 0));
}

#[tokio::test]
async fn retries_stop_at_the_limit_and_the_last_429_keeps_its_retry_after() {
    let upstream = MockUpstream::start(|_| async { limited("9") }).await;
    let pool = pool(3);
    let service = stack(&pool, RetryLayer::new(pool.clone()).max_retries(1));

    let (tried, result) = send(service, &upstream.url("/x"), buffered("{}").await).await;
    let response = result.unwrap();
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "9");
    assert_eq!(response.headers()["retry-after-ms"], "9000");
    assert_eq!(tried.positions(), [1, 2]);
    assert_eq!(upstream.seen().len(), 2);
}

#[tokio::test]
async fn a_refusal_is_handed_back_at_once_when_no_key_is_back_within_the_budget() {
    let upstream = MockUpstream::start(|_| async { limited("9") }).await;
    let pool = KeyPool::builder(KeySet::parse(&KEYS.join(",")).unwrap())
        .max_wait(Some(Duration::from_secs(1)))
        .build();
    // More retries allowed than there are keys: each key is tried once; then every key
    // rests 9 s, past the 1 s budget, so the 429 is the answer, with its Retry-After.
    let service = stack(&pool, RetryLayer::new(pool.clone()).max_retries(10));

    let started = tokio::time::Instant::now();
    let (tried, result) = send(service, &upstream.url("/x"), buffered("{}").await).await;
    let response = result.unwrap();
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "9");
    assert_eq!(tried.positions(), [1, 2, 3]);
    assert_eq!(upstream.seen().len(), 3);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "not at the end of the budget"
    );
}

#[tokio::test]
async fn no_retry_when_the_untried_keys_are_all_cooling_down() {
    let upstream = MockUpstream::start(|_| async { limited("60") }).await;
    let pool = pool(2);
    let service = stack(&pool, RetryLayer::new(pool.clone()));

    // A request that cannot be retried rests key 1 ...
    let streaming = ReplayBody::streaming(Full::new(Bytes::from("{}")));
    let (_, first) = send(service.clone(), &upstream.url("/a"), streaming).await;
    assert_eq!(first.unwrap().status(), 429);
    // ... so this one, refused on key 2, has nowhere better to go.
    let (tried, second) = send(service, &upstream.url("/b"), buffered("{}").await).await;
    assert_eq!(second.unwrap().status(), 429);
    assert_eq!(tried.positions(), [2]);
    assert_eq!(keys_seen(&upstream), [1, 2]);
}

#[tokio::test]
async fn a_body_too_large_to_buffer_is_sent_once() {
    let upstream = MockUpstream::start(|_| async { limited("1") }).await;
    let pool = pool(3);
    let service = stack(&pool, RetryLayer::new(pool.clone()));

    let large = Full::new(Bytes::from(vec![b'x'; 4096]));
    let body = ReplayBody::buffer(large, 1024).await.unwrap();
    assert!(!body.is_replayable());
    let (_, result) = send(service, &upstream.url("/x"), body).await;
    assert_eq!(result.unwrap().status(), 429);
    let seen = upstream.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].body.len(), 4096, "the whole body streamed through");
}

#[tokio::test]
async fn an_exhausted_budget_passes_the_429_through() {
    let upstream = MockUpstream::start(|_| async { limited("1") }).await;
    let pool = pool(3);
    let no_budget = TpsBudget::new(Duration::from_secs(1), 0, 0.0);
    let service = stack(&pool, RetryLayer::new(pool.clone()).budget(no_budget));

    let (_, result) = send(service, &upstream.url("/x"), buffered("{}").await).await;
    assert_eq!(result.unwrap().status(), 429);
    assert_eq!(upstream.seen().len(), 1);
}

#[tokio::test]
async fn the_budget_caps_retries_across_requests() {
    let upstream = MockUpstream::start(|_| async { limited("0") }).await;
    let pool = pool(3);
    // No floor, 10% of requests: ten requests earn one retry.
    let budget = TpsBudget::new(Duration::from_secs(10), 0, 0.1);
    let service = stack(&pool, RetryLayer::new(pool.clone()).budget(budget));

    for _ in 0..10 {
        let (_, result) = send(service.clone(), &upstream.url("/x"), buffered("{}").await).await;
        assert_eq!(result.unwrap().status(), 429);
    }
    let attempts = upstream.seen().len();
    assert!(
        (10..=11).contains(&attempts),
        "{attempts} attempts for 10 requests"
    );
}

#[tokio::test]
async fn other_statuses_are_not_retried() {
    let upstream = MockUpstream::start(|_| async { reply(500, "boom") }).await;
    let pool = pool(3);
    let service = stack(&pool, RetryLayer::new(pool.clone()));
    let (tried, result) = send(service, &upstream.url("/x"), buffered("{}").await).await;
    assert_eq!(result.unwrap().status(), 500);
    assert_eq!(tried.positions(), [1]);
}

#[tokio::test]
async fn a_refused_connection_is_retried_on_other_keys_then_reported() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let pool = pool(3);
    let service = stack(&pool, RetryLayer::new(pool.clone()).max_retries(1));

    let (tried, result) = send(service, &format!("http://{addr}/x"), buffered("{}").await).await;
    let Err(error) = result else {
        panic!("a refused connection cannot answer")
    };
    assert!(
        tower_key_rotation::retry::is_connection_refused(&error),
        "{error}"
    );
    assert_eq!(tried.positions(), [1, 2]);
    let requests: u64 = pool.snapshot().iter().map(|k| k.requests).sum();
    assert_eq!(requests, 2);
}
