//! Routed pools: with a `Router`, `poll_ready` reserves nothing and `call` chooses the key
//! for the request's route, at once or after waiting in the response future. The inner
//! service is an in-memory mock that echoes the key.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tokio_test::assert_ready_ok;
use tower::{BoxError, Service, ServiceExt};
use tower_key_rotation::retry::{Attempts, ReplayBody, RetryLayer};
use tower_key_rotation::route::{BucketId, RequestHead, Route, Router};
use tower_key_rotation::{KeyPool, KeyPoolBuilder, KeyRotation, KeySet, NoKeyAvailable};
use tower_test::mock::Spawn;

type Inner = tower::util::BoxCloneSyncService<Request<()>, Response<Full<Bytes>>, Infallible>;

/// Echoes the credential in `x-key`.
fn mock() -> Inner {
    tower::util::BoxCloneSyncService::new(tower::service_fn(|req: Request<()>| async move {
        let mut response = Response::new(Full::new(Bytes::from_static(b"body")));
        if let Some(key) = req.headers().get("authorization") {
            response.headers_mut().insert("x-key", key.clone());
        }
        Ok::<_, Infallible>(response)
    }))
}

/// Buckets by `x-model`, affinity by `x-session`.
#[derive(Debug)]
struct ByHeaders;

impl Router for ByHeaders {
    fn bucket<'a>(&self, head: &RequestHead<'a>) -> Option<&'a str> {
        head.headers.get("x-model")?.to_str().ok()
    }

    fn affinity<'a>(&self, head: &RequestHead<'a>) -> Option<&'a [u8]> {
        head.headers.get("x-session").map(|v| v.as_bytes())
    }
}

fn builder(n: usize) -> KeyPoolBuilder {
    let keys: Vec<String> = (1..=n).map(|i| format!("key-{i}")).collect();
    KeyPool::builder(KeySet::parse(&keys.join(",")).unwrap()).router(ByHeaders)
}

fn request(model: &str) -> Request<()> {
    Request::post("/v1/chat/completions")
        .header("x-model", model)
        .body(())
        .unwrap()
}

#[tokio::test]
async fn poll_ready_reserves_nothing_and_call_takes_a_key_for_the_request() {
    let pool = builder(2).max_in_flight_per_key(1).build();
    let mut service = Spawn::new(KeyRotation::new(mock(), pool.clone()));
    assert_ready_ok!(service.poll_ready());
    assert!(pool.snapshot().iter().all(|key| key.in_flight == 0));
    let first = service.call(request("a")).await.unwrap();
    assert_eq!(first.headers()["x-key"], "Bearer key-1");
    assert_eq!(pool.snapshot()[0].in_flight, 1);
    // Ready again at once: the next call finds key 2.
    assert_ready_ok!(service.poll_ready());
    let second = service.call(request("a")).await.unwrap();
    assert_eq!(second.headers()["x-key"], "Bearer key-2");
}

#[tokio::test]
async fn a_routed_call_with_no_free_key_waits_in_its_future_for_a_release() {
    let pool = builder(1).max_in_flight_per_key(1).build();
    let mut service = KeyRotation::new(mock(), pool.clone());
    let first = service
        .ready()
        .await
        .unwrap()
        .call(request("a"))
        .await
        .unwrap();
    let waiting = service.ready().await.unwrap().call(request("a"));
    let waiting = tokio::spawn(waiting);
    tokio::task::yield_now().await;
    assert!(
        !waiting.is_finished(),
        "key 1 is taken: the second request waits"
    );
    assert_eq!(pool.waiting(), 1);
    // Reading the first answer to its end releases key 1: the waiter takes it.
    first.into_body().collect().await.unwrap();
    let second = waiting.await.unwrap().unwrap();
    assert_eq!(second.headers()["x-key"], "Bearer key-1");
    assert_eq!(pool.waiting(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_routed_wait_ends_with_the_budget() {
    let pool = builder(1)
        .max_in_flight_per_key(1)
        .max_wait(Some(Duration::from_millis(300)))
        .build();
    let mut service = KeyRotation::new(mock(), pool.clone());
    let _held = service
        .ready()
        .await
        .unwrap()
        .call(request("a"))
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    let error = service
        .ready()
        .await
        .unwrap()
        .call(request("a"))
        .await
        .unwrap_err();
    let error = error.downcast::<NoKeyAvailable>().unwrap();
    assert_eq!(started.elapsed(), Duration::from_millis(300));
    assert_eq!(error.waited(), Duration::from_millis(300));
}

#[tokio::test(start_paused = true)]
async fn behind_the_retry_layer_a_routed_wait_counts_as_waited() {
    let pool = builder(1).max_in_flight_per_key(1).build();
    let inner = tower::service_fn(|req: Request<ReplayBody<Full<Bytes>>>| async move {
        let _ = req;
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"body"))))
    });
    let mut service = tower::ServiceBuilder::new()
        .layer(RetryLayer::new(pool.clone()))
        .layer(tower_key_rotation::KeyRotationLayer::new(pool.clone()))
        .service(inner);
    let body = || ReplayBody::buffered(Bytes::from_static(b"{}"));
    let req = |model: &str| {
        Request::post("/")
            .header("x-model", model)
            .body(body())
            .unwrap()
    };
    let first = service.ready().await.unwrap().call(req("a")).await.unwrap();
    let second = tokio::spawn(service.ready().await.unwrap().call(req("a")));
    tokio::time::sleep(Duration::from_millis(250)).await;
    first.into_body().collect().await.unwrap();
    let second = second.await.unwrap().unwrap();
    let attempts = second.extensions().get::<Attempts>().unwrap();
    assert_eq!(attempts.waited(), Duration::from_millis(250));
}

#[tokio::test]
async fn routes_intern_buckets_and_hash_sessions_stably() {
    let pool = builder(2).max_buckets(1).build();
    let route = |model: Option<&str>, session: Option<&str>| {
        let mut builder = Request::get("/");
        if let Some(model) = model {
            builder = builder.header("x-model", model);
        }
        if let Some(session) = session {
            builder = builder.header("x-session", session);
        }
        let request = builder.body(()).unwrap();
        pool.route(&RequestHead::of(&request))
    };
    assert_eq!(route(None, None), Route::ANY);
    let plus = route(Some("glm-4-plus"), None).bucket();
    assert_ne!(plus, BucketId::DEFAULT);
    assert_eq!(route(Some("glm-4-plus"), None).bucket(), plus);
    assert_eq!(pool.bucket_name(plus).as_deref(), Some("glm-4-plus"));
    // Past the bound, every further name shares the overflow bucket.
    let overflow = route(Some("made-up-1"), None).bucket();
    assert_eq!(route(Some("made-up-2"), None).bucket(), overflow);
    assert_ne!(overflow, plus);
    assert_eq!(pool.bucket_name(overflow), None);
    // A session's hash is the same for the same id.
    let session = route(None, Some("conversation-7")).affinity();
    assert!(session.is_some());
    assert_eq!(route(None, Some("conversation-7")).affinity(), session);
    assert_ne!(route(None, Some("conversation-8")).affinity(), session);
}

#[tokio::test(start_paused = true)]
async fn a_new_model_waiting_behind_made_up_names_moves_to_its_own_bucket_once_accepted() {
    let pool = builder(1).max_in_flight_per_key(1).build();
    // Made-up names (never accepted by the provider) take every provisional bucket.
    for i in 0..8 {
        let made_up = request(&format!("made-up-{i}"));
        assert_ne!(
            pool.route(&RequestHead::of(&made_up)).bucket(),
            BucketId::DEFAULT
        );
    }
    let overflow = pool.route(&RequestHead::of(&request("made-up-8"))).bucket();
    let (inner, mut provider) = tower_test::mock::pair::<Request<()>, Response<Full<Bytes>>>();
    let mut service = KeyRotation::new(inner, pool.clone());
    // A real model's first request goes in the shared overflow bucket, and holds its slot.
    let mut first = tokio_test::task::spawn(service.ready().await.unwrap().call(request("b")));
    assert!(first.poll().is_pending());
    let (_, answer_first) = provider.next_request().await.unwrap();
    assert_eq!(
        pool.route(&RequestHead::of(&request("b"))).bucket(),
        overflow
    );
    // The next one waits there, behind it.
    let mut second = tokio_test::task::spawn(service.ready().await.unwrap().call(request("b")));
    assert!(second.poll().is_pending());
    // The provider accepts the first: the model gets a bucket of its own, and the waiting
    // request moves there at once (the first's answer still holds the overflow slot).
    answer_first.send_response(Response::new(Full::new(Bytes::from_static(b"ok"))));
    let first_answer = assert_ready_ok!(first.poll());
    let own = pool.route(&RequestHead::of(&request("b"))).bucket();
    assert_ne!(own, overflow);
    assert_eq!(pool.bucket_name(own).as_deref(), Some("b"));
    assert!(second.is_woken());
    assert!(second.poll().is_pending());
    let mut sent = tokio_test::task::spawn(provider.next_request());
    let (sent, answer_second) = tokio_test::assert_ready!(sent.poll()).unwrap();
    assert_eq!(sent.headers()["authorization"], "Bearer key-1");
    answer_second.send_response(Response::new(Full::new(Bytes::new())));
    assert_ready_ok!(second.poll());
    drop(first_answer);
}

#[tokio::test]
async fn a_pool_without_a_router_still_reserves_in_poll_ready() -> Result<(), BoxError> {
    let keys = KeySet::parse("key-1,key-2").unwrap();
    let pool = KeyPool::builder(keys).max_in_flight_per_key(1).build();
    assert!(!pool.routes());
    let mut service = Spawn::new(KeyRotation::new(mock(), pool.clone()));
    assert_ready_ok!(service.poll_ready());
    assert_eq!(pool.snapshot()[0].in_flight, 1);
    let response = service.call(request("a")).await?;
    assert_eq!(response.headers()["x-key"], "Bearer key-1");
    Ok(())
}
