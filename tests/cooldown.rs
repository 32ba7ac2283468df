//! Cool-down algebra on 429, through a real upstream, with tokio's clock paused.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use http::StatusCode;
use support::{Upstream, get, rotated, status, too_many};
use tokio::sync::{Barrier, Notify};
use tokio::time::advance;
use tower_key_rotation::{Backoff, KeyPool, KeySet};

const KEYS: [&str; 3] = ["key-aaa", "key-bbb", "key-ccc"];

fn pool(keys: &[&str]) -> KeyPool {
    KeyPool::builder(KeySet::parse(&keys.join(",")).unwrap())
        .backoff(Backoff::default().jitter(false))
        .build()
}

fn cooling(pool: &KeyPool, position: usize) -> Option<Duration> {
    pool.snapshot()[position - 1].cooling_down_for
}

/// An upstream whose key 1 answers its first request with `first`, everything else 200.
async fn key_one_refuses_once(
    first: impl Fn() -> http::Response<http_body_util::Full<bytes::Bytes>> + Send + Sync + 'static,
) -> Upstream {
    let first = Arc::new(first);
    let refused = Arc::new(AtomicUsize::new(0));
    Upstream::start(&KEYS, move |key, _| {
        let refuse = key == 1 && refused.fetch_add(1, Ordering::SeqCst) == 0;
        let first = first.clone();
        async move {
            if refuse {
                first()
            } else {
                status(StatusCode::OK)
            }
        }
    })
    .await
}

#[tokio::test(start_paused = true)]
async fn cooling_key_is_skipped_until_retry_after_seconds_pass() {
    let upstream = key_one_refuses_once(|| too_many(&[("retry-after", "2")])).await;
    let pool = pool(&KEYS);
    let mut client = rotated(&pool);
    let url = upstream.url("/");

    assert_eq!(
        get(&mut client, &url).await.unwrap(),
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(cooling(&pool, 1), Some(Duration::from_secs(2)));
    for _ in 0..4 {
        get(&mut client, &url).await.unwrap();
    }
    advance(Duration::from_millis(1999)).await;
    get(&mut client, &url).await.unwrap();
    assert_eq!(upstream.keys_seen(), [1, 2, 3, 2, 3, 2]);

    advance(Duration::from_millis(1)).await;
    assert_eq!(cooling(&pool, 1), None);
    for _ in 0..3 {
        get(&mut client, &url).await.unwrap();
    }
    assert_eq!(upstream.keys_seen()[6..], [3, 1, 2]);
}

#[tokio::test(start_paused = true)]
async fn cooling_key_is_skipped_until_retry_after_date_passes() {
    let upstream = key_one_refuses_once(|| {
        let date = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(3));
        too_many(&[("retry-after", &date)])
    })
    .await;
    let pool = pool(&KEYS);
    let mut client = rotated(&pool);
    let url = upstream.url("/");

    get(&mut client, &url).await.unwrap();
    // HTTP-dates have whole seconds: the wait is in (2 s, 3 s].
    let wait = cooling(&pool, 1).expect("key 1 cools down");
    assert!(
        wait > Duration::from_secs(2) && wait <= Duration::from_secs(3),
        "{wait:?}"
    );
    for _ in 0..4 {
        get(&mut client, &url).await.unwrap();
    }
    assert!(!upstream.keys_seen()[1..].contains(&1));
    advance(wait).await;
    get(&mut client, &url).await.unwrap();
    get(&mut client, &url).await.unwrap();
    assert!(upstream.keys_seen()[5..].contains(&1));
}

#[tokio::test(start_paused = true)]
async fn backoff_doubles_without_retry_after_and_resets_on_success() {
    let refusals = Arc::new(AtomicUsize::new(3));
    let upstream_refusals = refusals.clone();
    let upstream = Upstream::start(&KEYS[..1], move |_, _| {
        let refuse = upstream_refusals
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        async move {
            if refuse {
                too_many(&[])
            } else {
                status(StatusCode::OK)
            }
        }
    })
    .await;
    let pool = pool(&KEYS[..1]);
    let mut client = rotated(&pool);
    let url = upstream.url("/");

    for expected in [1, 2, 4] {
        let wait = Duration::from_secs(expected);
        assert_eq!(
            get(&mut client, &url).await.unwrap(),
            StatusCode::TOO_MANY_REQUESTS
        );
        assert_eq!(cooling(&pool, 1), Some(wait));
        advance(wait).await;
    }
    assert_eq!(get(&mut client, &url).await.unwrap(), StatusCode::OK);
    // The success reset the level: the next 429 rests the key for the base again.
    refusals.store(1, Ordering::SeqCst);
    get(&mut client, &url).await.unwrap();
    assert_eq!(cooling(&pool, 1), Some(Duration::from_secs(1)));
}

#[tokio::test(start_paused = true)]
async fn a_later_shorter_wait_never_shortens_a_deadline() {
    // Three requests in flight on the one key. The first answer says 10 s; then a
    // straggler says 1 s; then another straggler's 429 has no header at all (which one
    // gateway let reopen the key early).
    let all_in = Arc::new(Barrier::new(3));
    let release = Arc::new([Notify::new(), Notify::new()]);
    let (upstream_all_in, upstream_release) = (all_in.clone(), release.clone());
    let upstream = Upstream::start(&KEYS[..1], move |_, n| {
        let (all_in, release) = (upstream_all_in.clone(), upstream_release.clone());
        async move {
            all_in.wait().await;
            match n {
                1 => too_many(&[("retry-after", "10")]),
                2 => {
                    release[0].notified().await;
                    too_many(&[("retry-after", "1")])
                }
                _ => {
                    release[1].notified().await;
                    too_many(&[])
                }
            }
        }
    })
    .await;
    let pool = pool(&KEYS[..1]);
    let client = rotated(&pool);
    let mut requests = tokio::task::JoinSet::new();
    for i in 0..3 {
        let mut client = client.clone();
        let url = upstream.url(&format!("/{i}"));
        requests.spawn(async move { get(&mut client, &url).await.unwrap() });
    }
    let first = requests.join_next().await.unwrap().unwrap();
    assert_eq!(first, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(cooling(&pool, 1), Some(Duration::from_secs(10)));
    for notify in release.iter() {
        notify.notify_one();
        requests.join_next().await.unwrap().unwrap();
        assert_eq!(cooling(&pool, 1), Some(Duration::from_secs(10)));
    }
    assert_eq!(pool.snapshot()[0].rate_limited, 3);
}

#[tokio::test(start_paused = true)]
async fn stragglers_in_flight_do_not_escalate_the_backoff() {
    // Three requests in flight on one key, all answered 429 without Retry-After.
    let gate = Arc::new(Barrier::new(3));
    let upstream_gate = gate.clone();
    let upstream = Upstream::start(&KEYS[..1], move |_, _| {
        let gate = upstream_gate.clone();
        async move {
            gate.wait().await;
            too_many(&[])
        }
    })
    .await;
    let pool = pool(&KEYS[..1]);
    let client = rotated(&pool);
    let requests: Vec<_> = (0..3)
        .map(|i| {
            let mut client = client.clone();
            let url = upstream.url(&format!("/{i}"));
            tokio::spawn(async move { get(&mut client, &url).await.unwrap() })
        })
        .collect();
    for request in requests {
        assert_eq!(request.await.unwrap(), StatusCode::TOO_MANY_REQUESTS);
    }
    // One cool-down of the base wait, not 1 + 2 + 4 s.
    assert_eq!(cooling(&pool, 1), Some(Duration::from_secs(1)));
    assert_eq!(pool.snapshot()[0].rate_limited, 3);
}
