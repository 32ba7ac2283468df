//! Staying under the limits: quotas, learned limits, weights and per-key settings, hot
//! reload, provider profiles, account-wide limits and the half-open probe.

mod support;

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::time::advance;
use tokio_test::{assert_pending, assert_ready_ok};
use tower::ServiceExt;
use tower_key_rotation::{
    ApiKey, Backoff, KeyPool, KeyRotation, KeySet, KeySpec, Quota, Selection,
    classify::{Classifier, Outcome, Scope},
};
use tower_test::mock::Spawn;

type Inner = tower::util::BoxCloneSyncService<Request<()>, Response<Full<Bytes>>, Infallible>;

/// Answers with the status, headers and body the request asks for (`x-status`,
/// `x-header: name=value`, `x-body`) and echoes the credential in `x-key`.
fn mock() -> Inner {
    tower::util::BoxCloneSyncService::new(tower::service_fn(|req: Request<()>| async move {
        let header = |name: &str| {
            req.headers()
                .get(name)
                .map(|v| v.to_str().unwrap().to_owned())
        };
        let body = header("x-body").unwrap_or_default();
        let mut response = Response::new(Full::new(Bytes::from(body)));
        if let Some(status) = header("x-status") {
            *response.status_mut() = StatusCode::from_u16(status.parse().unwrap()).unwrap();
        }
        for value in req.headers().get_all("x-header") {
            let (name, value) = value.to_str().unwrap().split_once('=').unwrap();
            response.headers_mut().insert(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        let key = req.headers()["authorization"].to_str().unwrap();
        response.headers_mut().insert("x-key", key.parse().unwrap());
        Ok::<_, Infallible>(response)
    }))
}

fn request() -> http::request::Builder {
    Request::get("/")
}

/// Sends one request; returns (key used, status, body).
async fn send(pool: &KeyPool, builder: http::request::Builder) -> (String, StatusCode, Bytes) {
    let service = KeyRotation::new(mock(), pool.clone());
    let response = service.oneshot(builder.body(()).unwrap()).await.unwrap();
    let key = response.headers()["x-key"]
        .to_str()
        .unwrap()
        .trim_start_matches("Bearer ")
        .to_owned();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (key, status, body)
}

async fn key_of(pool: &KeyPool) -> String {
    send(pool, request()).await.0
}

fn keys(list: &str) -> KeySet {
    KeySet::parse(list).unwrap()
}

fn spec(key: &str) -> KeySpec {
    KeySpec::new(ApiKey::new(key).unwrap())
}

#[tokio::test(start_paused = true)]
async fn callers_wait_for_the_earliest_key_with_quota() {
    // Two keys, 2 requests per second each: one every 500 ms per key.
    let pool = KeyPool::builder(keys("k1,k2"))
        .quota_per_key(Quota::per_second(2))
        .build();
    assert_eq!(key_of(&pool).await, "k1");
    assert_eq!(key_of(&pool).await, "k2");

    let mut waiting = Spawn::new(KeyRotation::new(mock(), pool.clone()));
    assert_pending!(waiting.poll_ready());
    advance(Duration::from_millis(499)).await;
    assert!(!waiting.is_woken());
    advance(Duration::from_millis(1)).await;
    assert!(waiting.is_woken());
    assert_ready_ok!(waiting.poll_ready());
    // The reservation spent key 1's next unit.
    assert_eq!(
        pool.snapshot()[0].quota_wait,
        Some(Duration::from_millis(500))
    );
}

#[tokio::test(start_paused = true)]
async fn an_unsent_reservation_gives_its_quota_back() {
    let pool = KeyPool::builder(keys("only"))
        .quota_per_key(Quota::per_minute(1))
        .build();
    let lease = pool.try_reserve().unwrap();
    assert!(pool.try_reserve().is_none());
    drop(lease); // never sent
    let lease = pool.try_reserve().expect("quota refunded");
    lease.mark_sent();
    drop(lease);
    assert!(
        pool.try_reserve().is_none(),
        "a sent request spent its quota"
    );
}

#[tokio::test(start_paused = true)]
async fn openai_headers_rest_a_key_before_it_is_refused() {
    let pool = KeyPool::new(keys("k1,k2"));
    let used_up = request()
        .header("x-header", "x-ratelimit-remaining-requests=0")
        .header("x-header", "x-ratelimit-reset-requests=1m30s");
    let (key, status, _) = send(&pool, used_up).await;
    assert_eq!((key.as_str(), status), ("k1", StatusCode::OK));
    let stats = &pool.snapshot()[0];
    assert_eq!(stats.cooling_down_for, Some(Duration::from_secs(90)));
    assert_eq!((stats.successes, stats.rate_limited), (1, 0));
    for _ in 0..3 {
        assert_eq!(key_of(&pool).await, "k2");
    }
}

#[tokio::test(start_paused = true)]
async fn anthropic_reset_times_and_503_retry_after_rest_a_key() {
    let pool = KeyPool::new(keys("k1,k2"));
    let now = std::time::SystemTime::now() + Duration::from_secs(10);
    let rfc3339 = {
        let secs = now.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        let days = secs / 86_400;
        let (y, m, d) = civil_from_days(days as i64);
        let t = secs % 86_400;
        format!(
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
            t / 3600,
            t / 60 % 60,
            t % 60
        )
    };
    let used_up = request()
        .header("x-header", "anthropic-ratelimit-requests-remaining=0")
        .header(
            "x-header",
            format!("anthropic-ratelimit-requests-reset={rfc3339}"),
        );
    send(&pool, used_up).await;
    let wait = pool.snapshot()[0].cooling_down_for.unwrap();
    assert!(
        wait > Duration::from_secs(8) && wait <= Duration::from_secs(10),
        "{wait:?}"
    );

    let unavailable = request()
        .header("x-status", "503")
        .header("x-header", "retry-after=7");
    let (key, ..) = send(&pool, unavailable).await;
    assert_eq!(key, "k2");
    assert_eq!(
        pool.snapshot()[1].cooling_down_for,
        Some(Duration::from_secs(7))
    );
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[tokio::test]
async fn weighted_round_robin_interleaves_shares_smoothly() {
    let keys = KeySet::from_specs([spec("heavy").weight(3), spec("light")]).unwrap();
    let pool = KeyPool::new(keys);
    let mut order = Vec::new();
    for _ in 0..8 {
        order.push(key_of(&pool).await);
    }
    assert_eq!(
        order,
        [
            "heavy", "heavy", "light", "heavy", "heavy", "heavy", "light", "heavy"
        ]
    );
}

#[tokio::test]
async fn least_in_flight_weighs_load_by_weight_and_keys_have_their_own_caps() {
    let keys = KeySet::from_specs([
        spec("big").weight(2).max_in_flight(2),
        spec("small").max_in_flight(1),
    ])
    .unwrap();
    let pool = KeyPool::builder(keys)
        .selection(Selection::LeastInFlight)
        .build();
    let leases: Vec<_> = (0..3).map(|_| pool.try_reserve().unwrap()).collect();
    // big (weight 2) takes two before small looks less loaded; then the caps are full.
    let names: Vec<usize> = leases.iter().map(|l| l.position()).collect();
    assert_eq!(names, [1, 2, 1]);
    assert!(pool.try_reserve().is_none());
}

#[tokio::test(start_paused = true)]
async fn reload_keeps_unchanged_keys_state_and_drains_removed_keys() {
    let pool = KeyPool::builder(
        KeySet::from_specs([spec("k1").name("one"), spec("k2").name("two"), spec("k3")]).unwrap(),
    )
    .backoff(Backoff::default().jitter(false))
    .build();
    // k1 is cooling; k2 has a request in flight.
    pool.try_reserve().unwrap().record(Outcome::RateLimited {
        retry_after: Some(Duration::from_secs(60)),
    });
    let in_flight_on_two = pool.try_reserve().unwrap();
    assert_eq!(in_flight_on_two.position(), 2);

    let summary = pool.reload(
        KeySet::from_specs([
            spec("k1").name("one"),
            spec("k2-rotated").name("two"),
            spec("k4"),
        ])
        .unwrap(),
    );
    assert_eq!(
        summary.to_string(),
        "1 unchanged; added: key 3; replaced: key 2 (two); removed: key 3"
    );
    let stats = pool.snapshot();
    assert!(
        stats[0].cooling_down_for.is_some(),
        "unchanged key kept its cool-down"
    );
    assert_eq!(stats[1].in_flight, 0, "the replaced key starts afresh");
    // The removed request still finishes on its own slot.
    drop(in_flight_on_two);
    let mut used = Vec::new();
    for _ in 0..4 {
        used.push(key_of(&pool).await);
    }
    used.sort();
    assert_eq!(
        used,
        ["k2-rotated", "k2-rotated", "k4", "k4"],
        "k1 is still cooling"
    );
}

#[tokio::test]
async fn a_reload_wakes_callers_waiting_for_a_key() {
    let pool = KeyPool::builder(keys("k1"))
        .max_in_flight_per_key(1)
        .build();
    let _busy = pool.try_reserve().unwrap();
    let mut waiting = Spawn::new(KeyRotation::new(mock(), pool.clone()));
    assert_pending!(waiting.poll_ready());
    pool.reload(keys("k1,k2"));
    assert!(waiting.is_woken());
    assert_ready_ok!(waiting.poll_ready());
}

#[tokio::test(start_paused = true)]
async fn bigmodel_overload_does_not_penalise_the_key_and_the_body_arrives_intact() {
    let pool = KeyPool::builder(keys("k1,k2"))
        .classifier(Classifier::bigmodel())
        .build();
    let overload =
        r#"{"error":{"code":"1305","message":"The service may be temporarily overloaded"}}"#;
    let (key, status, body) = send(
        &pool,
        request()
            .header("x-status", "429")
            .header("x-body", overload),
    )
    .await;
    assert_eq!(
        (key.as_str(), status),
        ("k1", StatusCode::TOO_MANY_REQUESTS)
    );
    assert_eq!(body, overload.as_bytes());
    let stats = &pool.snapshot()[0];
    assert_eq!((stats.cooling_down_for, stats.failures), (None, 1));
}

#[tokio::test(start_paused = true)]
async fn an_account_wide_limit_rests_every_key_of_the_account() {
    let keys = KeySet::from_specs([
        spec("a1").account("acct-a"),
        spec("a2").account("acct-a"),
        spec("b1").account("acct-b"),
    ])
    .unwrap();
    let pool = KeyPool::builder(keys)
        .classifier(Classifier::bigmodel())
        .build();
    let concurrency = r#"{"error":{"code":"1302","message":"concurrency"}}"#;
    let limited = request()
        .header("x-status", "429")
        .header("x-header", "retry-after=30")
        .header("x-body", concurrency);
    send(&pool, limited).await;
    let cooling: Vec<bool> = pool
        .snapshot()
        .iter()
        .map(|s| s.cooling_down_for.is_some())
        .collect();
    assert_eq!(cooling, [true, true, false]);
    for _ in 0..3 {
        assert_eq!(key_of(&pool).await, "b1");
    }
}

#[tokio::test(start_paused = true)]
async fn a_spent_quota_suspends_the_key_then_one_probe_brings_it_back() {
    let pool = KeyPool::builder(keys("k1,k2"))
        .classifier(Classifier::openai())
        .backoff(Backoff::default().quota_wait(Duration::from_secs(600)))
        .build();
    let billing = r#"{"error":{"type":"insufficient_quota","code":"insufficient_quota"}}"#;
    let (_, status, _) = send(
        &pool,
        request()
            .header("x-status", "429")
            .header("x-body", billing),
    )
    .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    let stats = &pool.snapshot()[0];
    assert_eq!(stats.cooling_down_for, Some(Duration::from_secs(600)));
    assert!(stats.probing);

    advance(Duration::from_secs(600)).await;
    // Exactly one probe may go to k1; everything else waits for it or goes to k2.
    let probe = pool.try_reserve_where(|p| p == 1).expect("the probe");
    assert!(probe.is_probe());
    assert!(
        pool.try_reserve_where(|p| p == 1).is_none(),
        "a second probe"
    );
    // A cancelled probe lets the next caller probe.
    drop(probe);
    let probe = pool.try_reserve_where(|p| p == 1).expect("the probe again");
    probe.mark_sent();
    probe.record(Outcome::Success);
    drop(probe);
    assert!(!pool.snapshot()[0].probing);
    let both: Vec<_> = (0..2).map(|_| pool.try_reserve().unwrap()).collect();
    let mut positions: Vec<usize> = both.iter().map(|l| l.position()).collect();
    positions.sort();
    assert_eq!(positions, [1, 2], "k1 takes ordinary requests again");
}

#[tokio::test(start_paused = true)]
async fn a_failed_probe_suspends_the_key_again() {
    let pool = KeyPool::builder(keys("k1"))
        .backoff(Backoff::default().quota_wait(Duration::from_secs(60)))
        .build();
    pool.try_reserve().unwrap().record(Outcome::QuotaExhausted {
        reset_after: None,
        scope: Scope::Key,
    });
    advance(Duration::from_secs(60)).await;
    let probe = pool.try_reserve().unwrap();
    assert!(probe.is_probe());
    probe.record(Outcome::QuotaExhausted {
        reset_after: Some(Duration::from_secs(30)),
        scope: Scope::Key,
    });
    drop(probe);
    assert_eq!(
        pool.snapshot()[0].cooling_down_for,
        Some(Duration::from_secs(30))
    );
    assert!(pool.try_reserve().is_none());
    advance(Duration::from_secs(30)).await;
    assert!(pool.try_reserve().unwrap().is_probe());
}

#[tokio::test(start_paused = true)]
async fn outcomes_other_than_success_ride_on_the_response() {
    let pool = KeyPool::builder(keys("k1,k2"))
        .classifier(Classifier::openai())
        .build();
    let service = KeyRotation::new(mock(), pool.clone());
    let billing = r#"{"error":{"code":"insufficient_quota"}}"#;
    let req = request()
        .header("x-status", "429")
        .header("x-body", billing)
        .body(())
        .unwrap();
    let response = service.clone().oneshot(req).await.unwrap();
    assert_eq!(
        response.extensions().get::<Outcome>(),
        Some(&Outcome::QuotaExhausted {
            reset_after: None,
            scope: Scope::Key
        })
    );
    let response = service.oneshot(request().body(()).unwrap()).await.unwrap();
    assert_eq!(response.extensions().get::<Outcome>(), None);
}

#[tokio::test(start_paused = true)]
async fn a_key_owed_a_probe_but_at_its_cap_is_passed_over_not_spun_on() {
    // A straggler still holds the key's only slot when its cool-down ends.
    for strategy in [Selection::LeastInFlight, Selection::RoundRobin] {
        let pool = KeyPool::builder(keys("k1"))
            .selection(strategy)
            .max_in_flight_per_key(1)
            .build();
        let straggler = pool.try_reserve().unwrap();
        let refused = pool.try_reserve_where(|_| true);
        assert!(refused.is_none());
        straggler.record(Outcome::RateLimited {
            retry_after: Some(Duration::from_secs(1)),
        });
        advance(Duration::from_secs(1)).await;
        assert!(pool.try_reserve().is_none(), "{strategy:?}");
        assert!(pool.try_reserve_where(|_| true).is_none());
        drop(straggler);
        assert!(pool.try_reserve().unwrap().is_probe());
    }
}

#[tokio::test(start_paused = true)]
async fn a_stale_reservation_dropped_unsent_gives_back_no_quota_spent_since() {
    // One request a minute. A reservation taken at 0 s is held unsent: its unit,
    // [0 s, 60 s), passes unused. A request sent at 60 s spends [60 s, 120 s), so dropping
    // the old reservation at 70 s has nothing left to give back: no request before 120 s.
    let pool = KeyPool::builder(keys("only"))
        .quota_per_key(Quota::per_minute(1))
        .build();
    let stale = pool.try_reserve().unwrap();
    advance(Duration::from_secs(60)).await;
    let sent = pool.try_reserve().expect("the next minute's unit");
    sent.mark_sent();
    drop(sent);
    advance(Duration::from_secs(10)).await;
    drop(stale);
    assert!(
        pool.try_reserve().is_none(),
        "a second request in the minute of the first"
    );
    assert_eq!(pool.snapshot()[0].quota_wait, Some(Duration::from_secs(50)));
    advance(Duration::from_secs(50)).await;
    assert!(pool.try_reserve().is_some());
}

#[tokio::test(start_paused = true)]
async fn a_reservation_dropped_part_way_through_its_unit_gives_back_only_the_rest() {
    // One unit every 10 s: a reservation at 0 s takes [0 s, 10 s). Dropped unsent at 4 s,
    // it gives back the 6 s of its unit still unused, not the whole unit: a request may
    // go at once, and the next at 14 s (it would at 10 s had the whole unit come back).
    let pool = KeyPool::builder(keys("only"))
        .quota_per_key(Quota::per_minute(6))
        .build();
    let first = pool.try_reserve().unwrap();
    assert!(pool.try_reserve().is_none());
    advance(Duration::from_secs(4)).await;
    drop(first);
    pool.try_reserve().expect("the unit given back").mark_sent();
    assert_eq!(pool.snapshot()[0].quota_wait, Some(Duration::from_secs(10)));
}

#[tokio::test(start_paused = true)]
async fn a_reservation_dropped_under_later_ones_gives_nothing_back() {
    // A burst of 3, one unit every 10 s: three reservations at 0 s. The first, dropped
    // unsent at 4 s, was counted by the two taken after it: it stays spent (a quota may go
    // unused, never over).
    let pool = KeyPool::builder(keys("only"))
        .quota_per_key(Quota::per_minute(6).burst(3))
        .build();
    let first = pool.try_reserve().unwrap();
    let others: Vec<_> = (0..2).map(|_| pool.try_reserve().unwrap()).collect();
    others.iter().for_each(|lease| lease.mark_sent());
    advance(Duration::from_secs(4)).await;
    drop(first);
    assert!(pool.try_reserve().is_none());
    assert_eq!(pool.snapshot()[0].quota_wait, Some(Duration::from_secs(6)));
}

#[tokio::test(start_paused = true)]
async fn an_extreme_quota_neither_wraps_nor_panics() {
    // One request per `Duration::MAX` with a burst of 2: two requests, then none.
    let pool = KeyPool::builder(keys("only"))
        .quota_per_key(Quota::new(1, Duration::MAX).burst(2))
        .build();
    for _ in 0..2 {
        pool.try_reserve().expect("the burst").mark_sent();
    }
    assert!(pool.try_reserve().is_none(), "a third request");
    advance(Duration::from_secs(365 * 24 * 3600)).await;
    assert!(pool.try_reserve().is_none(), "a third request a year on");
    assert!(pool.snapshot()[0].quota_wait.is_some());
    assert!(pool.earliest_return_in().is_some());
}

#[tokio::test(start_paused = true)]
async fn a_replayed_error_body_frees_its_key_with_the_last_frame() {
    let pool = KeyPool::builder(keys("k1"))
        .classifier(Classifier::bigmodel())
        .build();
    let service = KeyRotation::new(mock(), pool.clone());
    let overload = r#"{"error":{"code":"1305","message":"overloaded"}}"#;
    let req = request()
        .header("x-status", "429")
        .header("x-body", overload)
        .body(())
        .unwrap();
    let mut body = service.oneshot(req).await.unwrap().into_body();
    assert_eq!(pool.snapshot()[0].in_flight, 1);
    let frame = body.frame().await.unwrap().unwrap();
    assert_eq!(frame.into_data().unwrap(), overload.as_bytes());
    assert!(http_body::Body::is_end_stream(&body));
    // A caller that sees the end may keep the body a while before dropping it.
    assert_eq!(
        pool.snapshot()[0].in_flight,
        0,
        "the key is still busy after the body's last frame"
    );
    drop(body);
}
#[tokio::test(start_paused = true)]
async fn a_rest_learned_from_headers_is_capped_and_ends_with_a_probe() {
    let pool = KeyPool::builder(keys("k1"))
        .backoff(Backoff::default().max_retry_after(Duration::from_secs(10)))
        .build();
    let lease = pool.try_reserve().unwrap();
    lease.mark_sent();
    lease.record(Outcome::SuccessAtLimit {
        reset_after: Duration::from_secs(3600),
    });
    drop(lease);
    let stats = &pool.snapshot()[0];
    assert_eq!(stats.cooling_down_for, Some(Duration::from_secs(10)));
    assert!(stats.probing, "a rest for a limit owes a probe");

    advance(Duration::from_secs(10)).await;
    let probe = pool.try_reserve().expect("the probe");
    assert!(probe.is_probe());
    assert!(
        pool.try_reserve().is_none(),
        "a second request beside the probe"
    );
    // The probe's answer says the window is used up again, and when it resets (within
    // the cap): rest until then, and back whole, with no probe.
    probe.mark_sent();
    probe.record(Outcome::SuccessAtLimit {
        reset_after: Duration::from_secs(5),
    });
    drop(probe);
    let stats = &pool.snapshot()[0];
    assert_eq!(stats.cooling_down_for, Some(Duration::from_secs(5)));
    assert!(!stats.probing, "no probe owed for an uncapped window rest");
    advance(Duration::from_secs(5)).await;
    let first = pool.try_reserve().unwrap();
    let second = pool
        .try_reserve()
        .expect("a second request beside the first");
    assert!(!first.is_probe() && !second.is_probe());
}

/// A 2xx whose rate-limit headers say the window is used up, and when it resets: the key
/// rests until then and comes back with its capacity, every slot at once (the provider
/// said the limit is whole again then). Before, one probe went alone and the other slots
/// idled until it answered.
#[tokio::test(start_paused = true)]
async fn a_rest_until_the_window_resets_ends_without_a_probe() {
    let pool = KeyPool::builder(keys("k1"))
        .backoff(Backoff::default().max_retry_after(Duration::from_secs(10)))
        .max_in_flight_per_key(3)
        .build();
    let lease = pool.try_reserve().unwrap();
    lease.mark_sent();
    lease.record(Outcome::SuccessAtLimit {
        reset_after: Duration::from_secs(3),
    });
    drop(lease);
    let stats = &pool.snapshot()[0];
    assert_eq!(stats.cooling_down_for, Some(Duration::from_secs(3)));
    assert!(!stats.probing, "the rest owes no probe");
    advance(Duration::from_millis(2_999)).await;
    assert!(
        pool.try_reserve().is_none(),
        "taken before the window reset"
    );
    advance(Duration::from_millis(1)).await;
    let taken: Vec<_> = (0..3).map(|_| pool.try_reserve()).collect();
    assert!(
        taken
            .iter()
            .all(|lease| lease.as_ref().is_some_and(|l| !l.is_probe())),
        "every slot back at the reset, none of them a probe"
    );
}
