//! Prompt-cache affinity through the public API: a session's requests go to one key, spill
//! in the session's own order when that key cannot take them, are remembered where they
//! spilled for a cache lifetime, and wait a little for their key when it comes back soon.
//! Requests without a session rotate as before. Paused time throughout.

use std::collections::{BTreeSet, HashMap};
use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use tokio::time::Instant;
use tower::{Service, ServiceExt};
use tower_key_rotation::classify::Outcome;
use tower_key_rotation::pool::Lease;
use tower_key_rotation::route::{RequestHead, Route, Router};
use tower_key_rotation::{ApiKey, KeyPool, KeyRotation, KeySet, KeySpec};

/// Reads the session from the `x-session-id` header.
#[derive(Debug, Clone, Copy)]
struct SessionHeader;

impl Router for SessionHeader {
    fn affinity<'a>(&self, head: &RequestHead<'a>) -> Option<&'a [u8]> {
        head.headers.get("x-session-id").map(|v| v.as_bytes())
    }
}

fn pool(keys: &str) -> KeyPool {
    KeyPool::builder(KeySet::parse(keys).unwrap())
        .router(SessionHeader)
        .build()
}

/// The route of a request of `session` (`None`: a request naming no session).
fn route(pool: &KeyPool, session: Option<&str>) -> Route {
    let mut request = Request::post("http://provider.test/v1/chat/completions");
    if let Some(session) = session {
        request = request.header("x-session-id", session);
    }
    let request = request.body(()).unwrap();
    pool.route(&RequestHead::of(&request))
}

fn reserve(pool: &KeyPool, session: Option<&str>) -> Lease {
    pool.try_reserve_route(&route(pool, session))
        .expect("a key is free")
}

fn sessions(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("session-{i}")).collect()
}

#[tokio::test(start_paused = true)]
async fn every_request_of_a_session_goes_to_its_key_and_sessions_spread_over_keys() {
    let pool = pool("k1,k2,k3");
    let mut per_key = HashMap::<usize, usize>::new();
    for session in sessions(3000) {
        let first = reserve(&pool, Some(&session)).position();
        for _ in 0..3 {
            assert_eq!(reserve(&pool, Some(&session)).position(), first);
        }
        *per_key.entry(first).or_default() += 1;
    }
    for key in 1..=3 {
        let share = per_key[&key] as f64 / 3000.0;
        assert!((share - 1.0 / 3.0).abs() < 0.05, "key {key}: {share}");
    }
    let stats = pool.snapshot();
    assert_eq!(stats.iter().map(|k| k.affinity_hits).sum::<u64>(), 12_000);
    assert_eq!(stats.iter().map(|k| k.affinity_spills).sum::<u64>(), 0);
}

#[tokio::test(start_paused = true)]
async fn weights_scale_each_keys_share_of_sessions() {
    let keys = KeySet::from_specs(vec![
        KeySpec::new(ApiKey::new("k1").unwrap()).weight(3),
        KeySpec::new(ApiKey::new("k2").unwrap()),
    ])
    .unwrap();
    let pool = KeyPool::builder(keys).router(SessionHeader).build();
    let on_first = sessions(4000)
        .iter()
        .filter(|s| reserve(&pool, Some(s)).position() == 1)
        .count();
    let share = on_first as f64 / 4000.0;
    assert!((share - 0.75).abs() < 0.03, "{share}");
}

#[tokio::test(start_paused = true)]
async fn requests_without_a_session_rotate_as_before() {
    let pool = pool("k1,k2,k3");
    let order: Vec<usize> = (0..6).map(|_| reserve(&pool, None).position()).collect();
    assert_eq!(order, [1, 2, 3, 1, 2, 3]);
    assert!(pool.snapshot().iter().all(|k| k.affinity_hits == 0));
}

#[tokio::test(start_paused = true)]
async fn a_session_whose_key_rests_moves_to_one_other_key_and_stays_there() {
    let pool = pool("k1,k2,k3");
    let session = "conversation-7";
    let home = reserve(&pool, Some(session));
    let preferred = home.position();
    home.record(Outcome::RateLimited {
        retry_after: Some(Duration::from_secs(10)),
    });
    // Resting 10 s, beyond the affinity wait: spill at once, to the same key every time.
    let moved = reserve(&pool, Some(session)).position();
    assert_ne!(moved, preferred);
    for _ in 0..5 {
        assert_eq!(reserve(&pool, Some(session)).position(), moved);
    }
    // Back from its rest (probe answered), the preferred key does not take the session
    // back: its cache is warm where it went.
    tokio::time::advance(Duration::from_secs(11)).await;
    let probe = pool
        .try_reserve_route_where(&Route::ANY, |p| p == preferred)
        .expect("the probe");
    probe.record(Outcome::Success);
    for _ in 0..5 {
        assert_eq!(reserve(&pool, Some(session)).position(), moved);
        tokio::time::advance(Duration::from_secs(60)).await;
    }
    // Idle past the cache lifetime (5 minutes): home again.
    tokio::time::advance(Duration::from_secs(301)).await;
    assert_eq!(reserve(&pool, Some(session)).position(), preferred);
    let stats = pool.snapshot();
    assert_eq!(stats[moved - 1].affinity_spills, 1);
}

#[tokio::test(start_paused = true)]
async fn a_spill_goes_to_the_next_key_of_the_sessions_own_order() {
    // Which key a session spills to depends on the session: over many sessions of one
    // key, spills go to both others, each session to one.
    let pool = pool("k1,k2,k3");
    let of_key_1: Vec<String> = sessions(300)
        .into_iter()
        .filter(|s| reserve(&pool, Some(s)).position() == 1)
        .collect();
    let lease = pool
        .try_reserve_route_where(&Route::ANY, |p| p == 1)
        .unwrap();
    lease.record(Outcome::RateLimited {
        retry_after: Some(Duration::from_secs(60)),
    });
    let spilled_to: BTreeSet<usize> = of_key_1
        .iter()
        .map(|s| reserve(&pool, Some(s)).position())
        .collect();
    assert_eq!(spilled_to, BTreeSet::from([2, 3]));
}

#[tokio::test(start_paused = true)]
async fn removing_a_key_moves_only_its_sessions() {
    let pool = pool("k1,k2,k3,k4");
    let all = sessions(2000);
    let before: Vec<usize> = all
        .iter()
        .map(|s| reserve(&pool, Some(s)).position())
        .collect();
    pool.reload(KeySet::parse("k1,k2,k4").unwrap());
    // Positions after the reload: k1 1, k2 2, k4 3.
    let moved = all
        .iter()
        .zip(&before)
        .filter(|&(s, &was)| {
            let now = reserve(&pool, Some(s)).position();
            let same = match was {
                1 | 2 => now == was,
                4 => now == 3,
                _ => now != 0,
            };
            assert!(same, "{s}: key {was} before, {now} after");
            was == 3
        })
        .count();
    assert!(moved > 300, "{moved} sessions were on the removed key");
}

/// Echoes the key it was given in `x-key`.
fn echo() -> tower::util::BoxCloneSyncService<Request<()>, Response<Full<Bytes>>, Infallible> {
    tower::util::BoxCloneSyncService::new(tower::service_fn(|req: Request<()>| async move {
        let mut response = Response::new(Full::new(Bytes::new()));
        if let Some(key) = req.headers().get("authorization") {
            response.headers_mut().insert("x-key", key.clone());
        }
        Ok::<_, Infallible>(response)
    }))
}

fn session_request(session: &str) -> Request<()> {
    Request::post("http://provider.test/v1/chat/completions")
        .header("x-session-id", session)
        .body(())
        .unwrap()
}

/// A pool of 3 keys, 1 in flight each; a session and its order of keys.
fn capped_pool() -> (KeyPool, &'static str, Vec<usize>) {
    let pool = KeyPool::builder(KeySet::parse("k1,k2,k3").unwrap())
        .max_in_flight_per_key(1)
        .router(SessionHeader)
        .build();
    let session = "conversation-3";
    let order = pool.affinity_order(&route(&pool, Some(session)));
    (pool, session, order)
}

#[tokio::test(start_paused = true)]
async fn a_request_waits_for_its_sessions_busy_key_and_takes_it_when_freed() {
    let (pool, session, order) = capped_pool();
    let held = pool
        .try_reserve_route_where(&Route::ANY, |p| p == order[0])
        .expect("the session's key");
    let mut service = KeyRotation::new(echo(), pool.clone());
    let call = service
        .ready()
        .await
        .unwrap()
        .call(session_request(session));
    let call = tokio::spawn(call);
    // Two other keys are free, but the session's own comes back sooner than the affinity
    // wait: the request waits for it.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!call.is_finished());
    assert_eq!(pool.waiting(), 1);
    drop(held);
    let answer = call.await.unwrap().unwrap();
    assert_eq!(answer.headers()["x-key"], format!("Bearer k{}", order[0]));
    assert_eq!(pool.snapshot()[order[0] - 1].affinity_hits, 1);
    assert_eq!(pool.waiting(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_request_spills_when_its_sessions_key_stays_busy_past_the_affinity_wait() {
    let (pool, session, order) = capped_pool();
    let _held = pool
        .try_reserve_route_where(&Route::ANY, |p| p == order[0])
        .expect("the session's key");
    let mut service = KeyRotation::new(echo(), pool.clone());
    let started = Instant::now();
    let answer = service
        .ready()
        .await
        .unwrap()
        .call(session_request(session))
        .await
        .unwrap();
    // 500 ms, the default affinity wait, then the next key of the session's order.
    assert_eq!(started.elapsed(), Duration::from_millis(500));
    assert_eq!(answer.headers()["x-key"], format!("Bearer k{}", order[1]));
    assert_eq!(pool.snapshot()[order[1] - 1].affinity_spills, 1);
    assert_eq!(pool.affinity_remembered(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_request_spills_at_once_when_its_sessions_key_rests_longer_than_the_affinity_wait() {
    let (pool, session, order) = capped_pool();
    pool.try_reserve_route_where(&Route::ANY, |p| p == order[0])
        .unwrap()
        .record(Outcome::RateLimited {
            retry_after: Some(Duration::from_secs(5)),
        });
    let mut service = KeyRotation::new(echo(), pool.clone());
    let started = Instant::now();
    let answer = service
        .ready()
        .await
        .unwrap()
        .call(session_request(session))
        .await
        .unwrap();
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert_eq!(answer.headers()["x-key"], format!("Bearer k{}", order[1]));
}

#[tokio::test(start_paused = true)]
async fn a_flood_of_sessions_is_remembered_within_the_bound() {
    let pool = KeyPool::builder(KeySet::parse("k1,k2").unwrap())
        .router(SessionHeader)
        .affinity_capacity(1000)
        .build();
    pool.try_reserve_route_where(&Route::ANY, |p| p == 1)
        .unwrap()
        .record(Outcome::RateLimited {
            retry_after: Some(Duration::from_secs(60)),
        });
    // 20,000 sessions, about half of which spill from key 1 to key 2.
    for session in sessions(20_000) {
        assert_eq!(reserve(&pool, Some(&session)).position(), 2);
    }
    let remembered = pool.affinity_remembered();
    assert!(
        (900..=1024).contains(&remembered),
        "{remembered} remembered"
    );
}
