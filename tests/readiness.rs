//! Tower readiness semantics: reservation in `poll_ready`, release on drop, waiting with a
//! real wake-up, and the all-disabled error. The inner service is an in-memory mock that
//! answers with the status (and Retry-After) the request asks for and echoes the key.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::time::advance;
use tokio_test::{assert_pending, assert_ready_ok};
use tower::{BoxError, Service, ServiceExt};
use tower_key_rotation::{
    AllKeysDisabled, KeyPool, KeyPoolBuilder, KeyRotation, KeySet, NoKeyAvailable, RejectedKey,
    classify::Outcome,
};
use tower_test::mock::Spawn;

type Inner = tower::util::BoxCloneSyncService<Request<()>, Response<Full<Bytes>>, Infallible>;

/// Answers with `x-status` (default 200) and `retry-after` from `x-retry-after`, and echoes
/// the credential in `x-key`.
fn mock() -> Inner {
    tower::util::BoxCloneSyncService::new(tower::service_fn(|req: Request<()>| async move {
        let header = |name: &str| req.headers().get(name).cloned();
        let status = header("x-status")
            .map(|v| v.to_str().unwrap().parse::<u16>().unwrap())
            .unwrap_or(200);
        let mut response = Response::new(Full::new(Bytes::from_static(b"body")));
        *response.status_mut() = StatusCode::from_u16(status).unwrap();
        if let Some(wait) = header("x-retry-after") {
            response.headers_mut().insert("retry-after", wait);
        }
        if let Some(key) = header("authorization") {
            response.headers_mut().insert("x-key", key);
        }
        Ok::<_, Infallible>(response)
    }))
}

fn builder(n: usize) -> KeyPoolBuilder {
    let keys: Vec<String> = (1..=n).map(|i| format!("key-{i}")).collect();
    KeyPool::builder(KeySet::parse(&keys.join(",")).unwrap())
}

fn service(pool: &KeyPool) -> Spawn<KeyRotation<Inner>> {
    Spawn::new(KeyRotation::new(mock(), pool.clone()))
}

fn request(status: u16, retry_after: Option<&str>) -> Request<()> {
    let mut builder = Request::get("/").header("x-status", status.to_string());
    if let Some(wait) = retry_after {
        builder = builder.header("x-retry-after", wait);
    }
    builder.body(()).unwrap()
}

/// Sends one request through a fresh service and reads the body; returns the key used.
async fn send(pool: &KeyPool, status: u16, retry_after: Option<&str>) -> String {
    let service = KeyRotation::new(mock(), pool.clone());
    let response = service.oneshot(request(status, retry_after)).await.unwrap();
    let key = response.headers()["x-key"].to_str().unwrap().to_owned();
    response.into_body().collect().await.unwrap();
    key
}

/// Sends one request through a fresh service, reads the body, and returns the status.
async fn send_response(pool: &KeyPool, status: u16, retry_after: Option<&str>) -> StatusCode {
    let service = KeyRotation::new(mock(), pool.clone());
    let response = service.oneshot(request(status, retry_after)).await.unwrap();
    let status = response.status();
    response.into_body().collect().await.unwrap();
    status
}

fn in_flight(pool: &KeyPool) -> Vec<u32> {
    pool.snapshot().iter().map(|s| s.in_flight).collect()
}

#[tokio::test(start_paused = true)]
async fn all_keys_cooling_is_pending_until_the_earliest_deadline_passes() {
    let pool = builder(2).build();
    send(&pool, 429, Some("5")).await;
    send(&pool, 429, Some("3")).await;

    let mut waiting = service(&pool);
    assert_pending!(waiting.poll_ready());
    advance(Duration::from_millis(2999)).await;
    assert!(!waiting.is_woken(), "woken before any key came back");
    advance(Duration::from_millis(1)).await;
    assert!(waiting.is_woken(), "not woken when key 2 came back");
    // One poll after the wake-up is enough: no polling in a loop.
    assert_ready_ok!(waiting.poll_ready());
    let response = waiting.call(request(200, None)).await.unwrap();
    assert_eq!(response.headers()["x-key"], "Bearer key-2");
}

#[tokio::test]
async fn a_freed_slot_wakes_a_waiting_caller() {
    let pool = builder(1).max_in_flight_per_key(1).build();
    let mut first = service(&pool);
    assert_ready_ok!(first.poll_ready());
    let response = first.call(request(200, None)).await.unwrap();

    let mut second = service(&pool);
    assert_pending!(second.poll_ready());
    assert!(!second.is_woken());
    // The first request is in flight until its body is done.
    drop(response);
    assert!(second.is_woken());
    assert_ready_ok!(second.poll_ready());
}

#[tokio::test]
async fn every_key_disabled_readies_the_waiters_and_fails_their_calls() {
    let pool = builder(2).max_in_flight_per_key(1).build();
    let (mut a, mut b, mut waiting) = (service(&pool), service(&pool), service(&pool));
    assert_ready_ok!(a.poll_ready());
    assert_ready_ok!(b.poll_ready());
    assert_pending!(waiting.poll_ready());

    // A refusal alone disables nothing; the caller's proof (the same request served by
    // another key) disables the key its response names.
    let response = a.call(request(401, None)).await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let rejected = response.extensions().get::<RejectedKey>().unwrap().clone();
    assert_eq!(rejected.position(), 1);
    drop(response);
    assert!(!pool.snapshot()[0].disabled);
    assert!(waiting.is_woken());
    assert!(rejected.disable());
    // Key 1 is disabled, key 2 is still busy: keep waiting, no error yet.
    assert_pending!(waiting.poll_ready());

    let response = b.call(request(403, None)).await.unwrap();
    assert!(
        response
            .extensions()
            .get::<RejectedKey>()
            .unwrap()
            .disable()
    );
    drop(response);
    assert!(waiting.is_woken());
    // Ready (a failed poll_ready would make tower callers drop the service for good); the
    // call fails instead.
    assert_ready_ok!(waiting.poll_ready());
    let error: BoxError = waiting.call(request(200, None)).await.unwrap_err();
    let error = error.downcast::<AllKeysDisabled>().unwrap();
    assert_eq!(
        error.to_string(),
        "all 2 API key(s) are disabled: the provider rejected each of them"
    );
    assert!(
        pool.snapshot()
            .iter()
            .all(|s| s.disabled && s.in_flight == 0)
    );
}

#[tokio::test]
async fn behind_a_buffer_a_reload_revives_a_service_whose_keys_were_all_disabled() {
    let pool = builder(1).build();
    let mut buffered = tower::buffer::Buffer::new(KeyRotation::new(mock(), pool.clone()), 8);
    let response = buffered
        .ready()
        .await
        .unwrap()
        .call(request(401, None))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    response
        .extensions()
        .get::<RejectedKey>()
        .unwrap()
        .disable();
    assert!(pool.all_disabled());
    let error = buffered
        .ready()
        .await
        .unwrap()
        .call(request(200, None))
        .await
        .unwrap_err();
    assert!(error.is::<AllKeysDisabled>(), "{error}");

    // A good key comes back: the same buffered service serves again.
    pool.reload(KeySet::parse("key-new").unwrap());
    let response = buffered
        .ready()
        .await
        .unwrap()
        .call(request(200, None))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-key"], "Bearer key-new");
}

#[tokio::test(start_paused = true)]
async fn a_wait_past_the_budget_fails_at_once_with_retry_after() {
    let pool = builder(1).max_wait(Some(Duration::from_secs(1))).build();
    let status = send_response(&pool, 429, Some("5")).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    // The only key rests 5 s; the budget is 1 s: ready at once, and the call says when.
    let mut waiting = service(&pool);
    assert_ready_ok!(waiting.poll_ready());
    let error = waiting.call(request(200, None)).await.unwrap_err();
    let error = error.downcast::<NoKeyAvailable>().unwrap();
    assert_eq!(error.retry_after(), Duration::from_secs(5));
    assert_eq!(error.waited(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn a_wait_for_a_busy_key_ends_with_the_budget() {
    let pool = builder(1)
        .max_in_flight_per_key(1)
        .max_wait(Some(Duration::from_secs(2)))
        .build();
    let mut holder = service(&pool);
    assert_ready_ok!(holder.poll_ready());
    let mut waiting = service(&pool);
    assert_pending!(waiting.poll_ready());
    advance(Duration::from_millis(1999)).await;
    assert_pending!(waiting.poll_ready());
    advance(Duration::from_millis(1)).await;
    assert!(waiting.is_woken(), "the budget's end wakes the waiter");
    assert_ready_ok!(waiting.poll_ready());
    let error = waiting.call(request(200, None)).await.unwrap_err();
    let error = error.downcast::<NoKeyAvailable>().unwrap();
    assert_eq!(error.waited(), Duration::from_secs(2));
    // A busy key gives no time: one second.
    assert_eq!(error.retry_after(), Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn a_wait_for_a_resting_key_within_the_budget_gets_it() {
    let pool = builder(1).build(); // 30 s budget
    send_response(&pool, 429, Some("2")).await;
    let mut waiting = service(&pool);
    assert_pending!(waiting.poll_ready());
    advance(Duration::from_secs(2)).await;
    assert!(waiting.is_woken());
    assert_ready_ok!(waiting.poll_ready());
    let response = waiting.call(request(200, None)).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_reservation_on_a_key_removed_since_is_traded_before_sending() {
    let pool = builder(2).build();
    let mut ready = service(&pool);
    assert_ready_ok!(ready.poll_ready()); // key 1
    pool.reload(KeySet::parse("key-2,key-3").unwrap());
    let response = ready.call(request(200, None)).await.unwrap();
    assert_ne!(
        response.headers()["x-key"],
        "Bearer key-1",
        "key 1 was removed"
    );
}

#[tokio::test(start_paused = true)]
async fn a_reservation_made_before_a_rest_becomes_the_probe_or_waits() {
    let pool = builder(1).build();
    let (mut early, mut later) = (service(&pool), service(&pool));
    assert_ready_ok!(early.poll_ready());
    assert_ready_ok!(later.poll_ready());
    // Another request is refused: the key rests 1 s, then owes one probe.
    send_response(&pool, 429, Some("1")).await;
    advance(Duration::from_secs(1)).await;
    // Both reservations predate the rest. The first to be sent becomes the probe ...
    let probe = early.call(request(200, None));
    assert!(pool.snapshot()[0].probing);
    // ... and the other may not go while the probe is out.
    let error = later.call(request(200, None)).await.unwrap_err();
    assert!(error.is::<NoKeyAvailable>(), "{error}");
    assert_eq!(probe.await.unwrap().status(), StatusCode::OK);
    assert!(!pool.snapshot()[0].probing);
}

#[tokio::test]
async fn dropping_a_ready_service_gives_its_reservation_back() {
    let pool = builder(2).build();
    let mut ready = service(&pool);
    assert_ready_ok!(ready.poll_ready());
    assert_eq!(in_flight(&pool), [1, 0]);
    drop(ready);
    assert_eq!(in_flight(&pool), [0, 0]);
}

#[tokio::test]
async fn a_clone_carries_no_reservation() {
    let pool = builder(1).max_in_flight_per_key(1).build();
    let mut ready = service(&pool);
    assert_ready_ok!(ready.poll_ready());
    let mut clone = Spawn::new(ready.get_ref().clone());
    assert_eq!(in_flight(&pool), [1]);
    assert_pending!(clone.poll_ready());
    drop(ready);
    assert!(clone.is_woken());
    assert_ready_ok!(clone.poll_ready());
}

#[tokio::test]
async fn repeated_poll_ready_keeps_a_good_reservation() {
    let pool = builder(3).build();
    let mut ready = service(&pool);
    for _ in 0..5 {
        assert_ready_ok!(ready.poll_ready());
    }
    assert_eq!(in_flight(&pool), [1, 0, 0]);
}

#[tokio::test(start_paused = true)]
async fn a_reservation_on_a_key_that_starts_cooling_is_traded() {
    let pool = builder(2).build();
    let mut ready = service(&pool);
    assert_ready_ok!(ready.poll_ready()); // holds key 1
    // Meanwhile another request on key 1 is refused.
    let other = pool.try_reserve_where(|p| p == 1).unwrap();
    other.record(Outcome::RateLimited {
        retry_after: Some(Duration::from_secs(10)),
    });
    drop(other);

    assert_ready_ok!(ready.poll_ready());
    assert_eq!(in_flight(&pool), [0, 1]);
    let response = ready.call(request(200, None)).await.unwrap();
    assert_eq!(response.headers()["x-key"], "Bearer key-2");
}

#[tokio::test(start_paused = true)]
async fn a_reservation_on_a_cooling_key_is_given_back_when_no_key_is_free() {
    let pool = builder(1).build();
    let mut ready = service(&pool);
    assert_ready_ok!(ready.poll_ready());
    let other = pool.try_reserve().unwrap();
    other.record(Outcome::RateLimited {
        retry_after: Some(Duration::from_secs(1)),
    });
    drop(other);

    assert_pending!(ready.poll_ready());
    assert_eq!(in_flight(&pool), [0]);
    advance(Duration::from_secs(1)).await;
    assert!(ready.is_woken());
    assert_ready_ok!(ready.poll_ready());
}

#[tokio::test]
#[should_panic(expected = "poll_ready must return Ready first")]
async fn call_without_poll_ready_panics() {
    let pool = builder(1).build();
    let mut service = service(&pool);
    drop(service.call(request(200, None)));
}

#[tokio::test(start_paused = true)]
async fn waiters_without_a_timer_hear_of_a_new_cool_down() {
    let pool = builder(1).build();
    // Key 1 cooled down once and now owes a probe; the probe is in flight.
    pool.try_reserve().unwrap().record(Outcome::RateLimited {
        retry_after: Some(Duration::from_secs(1)),
    });
    advance(Duration::from_secs(1)).await;
    let probe = pool.try_reserve().unwrap();
    assert!(probe.is_probe());
    // Two callers wait; no key has a deadline, so neither has a timer.
    let (mut first, mut second) = (service(&pool), service(&pool));
    assert_pending!(first.poll_ready());
    assert_pending!(second.poll_ready());
    // The probe is refused again: a new cool-down, then its slot is released.
    probe.record(Outcome::RateLimited {
        retry_after: Some(Duration::from_secs(1)),
    });
    drop(probe);
    assert!(first.is_woken() && second.is_woken());
    assert_pending!(first.poll_ready());
    assert_pending!(second.poll_ready());
    // The first caller gives up; the second must still come back when the key does.
    drop(first);
    advance(Duration::from_secs(1)).await;
    assert!(second.is_woken());
    assert_ready_ok!(second.poll_ready());
}

#[tokio::test(start_paused = true)]
async fn a_reservation_whose_key_started_resting_is_never_sent_on_it() {
    // One key: a service readies, then another request on the key is refused with
    // Retry-After: 5. The readied call sends nothing and says when the key is back.
    let pool = builder(1).build();
    let mut ready = service(&pool);
    assert_ready_ok!(ready.poll_ready());
    assert_eq!(
        send_response(&pool, 429, Some("5")).await,
        StatusCode::TOO_MANY_REQUESTS
    );
    let error = ready.call(request(200, None)).await.unwrap_err();
    let error = error.downcast::<NoKeyAvailable>().unwrap();
    assert_eq!(error.waited(), Duration::ZERO, "refused before sending");
    assert_eq!(error.retry_after(), Duration::from_secs(5));
    let stats = &pool.snapshot()[0];
    assert_eq!(stats.requests, 1, "only the refused request was sent");
    assert_eq!(stats.in_flight, 0);

    // Two keys: the stale reservation is traded for the free one.
    let pool = builder(2).build();
    let mut ready = service(&pool);
    assert_ready_ok!(ready.poll_ready());
    // Another request on key 1 (the readied service's) is refused: key 1 rests.
    let key_1 = pool.try_reserve_where(|p| p == 1).unwrap();
    key_1.mark_sent();
    key_1.record(Outcome::RateLimited {
        retry_after: Some(Duration::from_secs(5)),
    });
    drop(key_1);
    let response = ready.call(request(200, None)).await.unwrap();
    assert_eq!(response.headers()["x-key"], "Bearer key-2");
}
