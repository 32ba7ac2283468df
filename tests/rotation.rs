//! Key choice and placement, through a real hyper client and a real upstream on 127.0.0.1.

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Empty;
use support::{Upstream, get, rotated, send, status};
use tokio::sync::{Barrier, Notify, Semaphore};
use tower_key_rotation::{KeyPool, KeyRotationLayer, KeySet, Placement, Selection};

const KEYS: [&str; 3] = ["key-aaa", "key-bbb", "key-ccc"];

fn key_set() -> KeySet {
    KeySet::parse(&KEYS.join(",")).unwrap()
}

#[tokio::test]
async fn round_robin_visits_keys_in_exact_order() {
    let upstream = Upstream::start(&KEYS, |_, _| async { status(StatusCode::OK) }).await;
    let pool = KeyPool::new(key_set());
    let mut client = rotated(&pool);
    for _ in 0..7 {
        assert_eq!(
            get(&mut client, &upstream.url("/")).await.unwrap(),
            StatusCode::OK
        );
    }
    assert_eq!(upstream.keys_seen(), [1, 2, 3, 1, 2, 3, 1]);
    let stats = pool.snapshot();
    assert_eq!(
        stats.iter().map(|s| s.requests).collect::<Vec<_>>(),
        [3, 2, 2]
    );
    assert!(stats.iter().all(|s| s.in_flight == 0));
}

#[tokio::test]
async fn the_callers_own_credential_is_replaced() {
    let upstream = Upstream::start(&KEYS, |_, _| async { status(StatusCode::OK) }).await;
    let pool = KeyPool::new(key_set());
    let mut client = rotated(&pool);
    let request = Request::get(upstream.url("/"))
        .header("authorization", "Bearer client-own-token")
        .header("authorization", "Basic second-value")
        .body(Empty::<Bytes>::new())
        .unwrap();
    send(&mut client, request).await.unwrap();
    let seen = upstream.seen();
    assert_eq!(seen[0].credentials, ["Bearer key-aaa"]);
}

#[tokio::test]
async fn a_named_header_carries_the_bare_key() {
    let upstream =
        Upstream::start_with_header(&KEYS, "x-api-key", |_, _| async { status(StatusCode::OK) })
            .await;
    let pool = KeyPool::new(key_set());
    let layer = KeyRotationLayer::new(pool).placement(Placement::header(
        http::HeaderName::from_static("x-api-key"),
    ));
    let mut client = tower::Layer::layer(&layer, support::http_client());
    for _ in 0..2 {
        get(&mut client, &upstream.url("/")).await.unwrap();
    }
    let seen = upstream.seen();
    assert_eq!(seen[0].credentials, ["key-aaa"]);
    assert_eq!(seen[1].credentials, ["key-bbb"]);
}

#[tokio::test]
async fn a_custom_placement_runs_for_every_request() {
    let upstream = Upstream::start_with_header(&KEYS, "x-goog-api-key", |_, _| async {
        status(StatusCode::OK)
    })
    .await;
    let pool = KeyPool::new(key_set());
    let layer = KeyRotationLayer::new(pool).placement(Placement::custom(|key, parts| {
        parts.headers.insert("x-goog-api-key", key.header_value(""));
    }));
    let mut client = tower::Layer::layer(&layer, support::http_client());
    for _ in 0..3 {
        get(&mut client, &upstream.url("/")).await.unwrap();
    }
    assert_eq!(upstream.keys_seen(), [1, 2, 3]);
}

#[tokio::test]
async fn least_in_flight_avoids_the_key_with_a_slow_request() {
    // Key 1's first request hangs until released; everything else answers at once.
    let gate = Arc::new(Semaphore::new(0));
    let arrived = Arc::new(Notify::new());
    let (upstream_gate, upstream_arrived) = (gate.clone(), arrived.clone());
    let upstream = Upstream::start(&KEYS, move |_, n| {
        let (gate, arrived) = (upstream_gate.clone(), upstream_arrived.clone());
        async move {
            if n == 1 {
                arrived.notify_one();
                let _permit = gate.acquire().await.unwrap();
            }
            status(StatusCode::OK)
        }
    })
    .await;
    let pool = KeyPool::builder(key_set())
        .selection(Selection::LeastInFlight)
        .build();
    let mut slow_client = rotated(&pool);
    let slow_url = upstream.url("/slow");
    let slow = tokio::spawn(async move { get(&mut slow_client, &slow_url).await.unwrap() });
    // The slow request is in flight on key 1 once the upstream has it.
    tokio::time::timeout(Duration::from_secs(5), arrived.notified())
        .await
        .unwrap();

    let mut client = rotated(&pool);
    for _ in 0..8 {
        get(&mut client, &upstream.url("/fast")).await.unwrap();
    }
    let fast: Vec<usize> = upstream.keys_seen()[1..].to_vec();
    assert!(!fast.contains(&1), "key 1 is busy, yet chosen: {fast:?}");
    // Ties between the idle keys go in rotation.
    assert_eq!(fast, [2, 3, 2, 3, 2, 3, 2, 3]);

    gate.add_permits(1);
    slow.await.unwrap();
    assert!(pool.snapshot().iter().all(|s| s.in_flight == 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_key_cap_holds_under_200_concurrent_callers() {
    let upstream = Upstream::start(&KEYS, |_, _| async {
        // Latency of the "completion", so requests overlap.
        tokio::time::sleep(Duration::from_millis(5)).await;
        status(StatusCode::OK)
    })
    .await;
    for strategy in [Selection::RoundRobin, Selection::LeastInFlight] {
        let pool = KeyPool::builder(key_set())
            .selection(strategy)
            .max_in_flight_per_key(2)
            .build();
        let client = rotated(&pool);
        let start = Arc::new(Barrier::new(200));
        let callers: Vec<_> = (0..200)
            .map(|_| {
                let mut client = client.clone();
                let url = upstream.url("/");
                let start = start.clone();
                tokio::spawn(async move {
                    start.wait().await;
                    get(&mut client, &url).await
                })
            })
            .collect();
        for caller in callers {
            assert_eq!(caller.await.unwrap().unwrap(), StatusCode::OK);
        }
        let stats = pool.snapshot();
        assert_eq!(stats.iter().map(|s| s.requests).sum::<u64>(), 200);
        assert!(stats.iter().all(|s| s.in_flight == 0), "{stats:?}");
    }
    let max = upstream.max_in_flight();
    assert!(max.iter().all(|&m| m <= 2), "cap exceeded: {max:?}");
    assert!(
        max.iter().all(|&m| m == 2),
        "the test never reached the cap: {max:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cap_holds_behind_a_buffer_shared_by_many_callers() {
    let upstream = Upstream::start(&KEYS, |_, _| async {
        tokio::time::sleep(Duration::from_millis(5)).await;
        status(StatusCode::OK)
    })
    .await;
    let pool = KeyPool::builder(key_set()).max_in_flight_per_key(1).build();
    // Buffer drives one inner service from its worker: the pool, not the service
    // instance, must hold the limit.
    let buffered = tower::buffer::Buffer::new(rotated(&pool), 1024);
    let callers: Vec<_> = (0..60)
        .map(|_| {
            let buffered = buffered.clone();
            let url = upstream.url("/");
            tokio::spawn(async move {
                let request = Request::get(url).body(Empty::<Bytes>::new()).unwrap();
                let response = tower::ServiceExt::oneshot(buffered, request).await.unwrap();
                http_body_util::BodyExt::collect(response.into_body())
                    .await
                    .unwrap();
            })
        })
        .collect();
    for caller in callers {
        caller.await.unwrap();
    }
    assert!(upstream.max_in_flight().iter().all(|&m| m <= 1));
    assert_eq!(upstream.seen().len(), 60);
}
