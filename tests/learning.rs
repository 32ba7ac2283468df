//! Learned concurrency: a `429` that comes back while other requests are in flight on the
//! same key lowers that key's limit to what else was in flight; successes at the limit
//! raise it slowly; never above the configured cap, never below 1; off when asked.

use std::time::Duration;

use tower_key_rotation::{
    KeyPool, KeyPoolBuilder, KeySet,
    classify::Outcome,
    pool::{KeyState, Lease},
};

fn builder(keys: &str) -> KeyPoolBuilder {
    KeyPool::builder(KeySet::parse(keys).unwrap())
}

fn refused() -> Outcome {
    Outcome::RateLimited {
        retry_after: Some(Duration::ZERO),
    }
}

fn reserve(pool: &KeyPool, n: usize) -> Vec<Lease> {
    (0..n)
        .map(|_| {
            let lease = pool.try_reserve().expect("a free slot");
            lease.mark_sent();
            lease
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_refusal_with_others_in_flight_lowers_the_keys_limit_to_them() {
    let pool = builder("k1").build();
    assert_eq!(pool.snapshot()[0].concurrency_limit, None);
    let mut leases = reserve(&pool, 5);
    // The provider took two and refuses the rest: each refusal sees what else is out.
    leases[4].record(refused()); // 4 others in flight
    assert_eq!(pool.snapshot()[0].concurrency_limit, Some(4));
    leases.truncate(2); // 2 still in flight
    let third = reserve(&pool, 1).pop().unwrap();
    third.record(refused()); // 2 others
    assert_eq!(pool.snapshot()[0].concurrency_limit, Some(2));
    // At the learned limit, the next caller waits instead of being refused.
    drop(third);
    assert!(pool.try_reserve().is_none());
    assert_eq!(pool.snapshot()[0].state, KeyState::Busy);
    leases.pop();
    assert!(pool.try_reserve().is_some());
}

#[tokio::test(start_paused = true)]
async fn a_refusal_alone_on_the_key_is_a_rate_limit_and_teaches_nothing() {
    let pool = builder("k1").build();
    let lease = reserve(&pool, 1).pop().unwrap();
    lease.record(refused());
    assert_eq!(pool.snapshot()[0].concurrency_limit, None);
}

#[tokio::test(start_paused = true)]
async fn the_limit_never_drops_below_one_nor_rises_above_the_cap() {
    let pool = builder("k1").max_in_flight_per_key(3).build();
    assert_eq!(pool.snapshot()[0].concurrency_limit, Some(3));
    let mut leases = reserve(&pool, 2);
    leases[1].record(refused());
    assert_eq!(pool.snapshot()[0].concurrency_limit, Some(1));
    drop(leases.drain(..));

    // 16 × limit successes sent at the limit raise it by one, up to the cap.
    for expected in [2, 3, 3] {
        let limit = pool.snapshot()[0].concurrency_limit.unwrap();
        for _ in 0..16 * limit {
            let at_limit = reserve(&pool, limit as usize);
            for lease in &at_limit {
                lease.record(Outcome::Success);
            }
        }
        assert_eq!(pool.snapshot()[0].concurrency_limit, Some(expected));
    }
}

#[tokio::test(start_paused = true)]
async fn successes_below_the_limit_do_not_raise_it() {
    let pool = builder("k1").build();
    let leases = reserve(&pool, 3);
    leases[2].record(refused());
    drop(leases);
    assert_eq!(pool.snapshot()[0].concurrency_limit, Some(2));
    // One at a time never tests the limit: nothing learned.
    for _ in 0..1_000 {
        reserve(&pool, 1)[0].record(Outcome::Success);
    }
    assert_eq!(pool.snapshot()[0].concurrency_limit, Some(2));
}

#[tokio::test(start_paused = true)]
async fn learning_can_be_turned_off() {
    let pool = builder("k1").learn_concurrency(false).build();
    let leases = reserve(&pool, 3);
    leases[2].record(refused());
    assert_eq!(pool.snapshot()[0].concurrency_limit, None);
}

#[tokio::test(start_paused = true)]
async fn a_reload_keeps_an_unchanged_keys_learned_limit() {
    let pool = builder("k1,k2").build();
    let leases: Vec<Lease> = (0..4)
        .map(|_| {
            let lease = pool.try_reserve_where(|p| p == 1).unwrap();
            lease.mark_sent();
            lease
        })
        .collect();
    leases[3].record(refused());
    drop(leases);
    pool.reload(KeySet::parse("k1,k3").unwrap());
    assert_eq!(pool.snapshot()[0].concurrency_limit, Some(3));
    assert_eq!(pool.snapshot()[1].concurrency_limit, None);
}

#[tokio::test(start_paused = true)]
async fn requests_already_refused_do_not_count_as_at_the_provider() {
    let pool = builder("k1").build();
    let leases = reserve(&pool, 5);
    leases[4].record(refused()); // 4 others in flight
    assert_eq!(pool.snapshot()[0].concurrency_limit, Some(4));
    // Still in flight here (its body not yet dropped), but no longer at the provider.
    leases[3].record(refused()); // 4 others, one of them already refused
    assert_eq!(pool.snapshot()[0].concurrency_limit, Some(3));
    drop(leases);
    // The key comes back through its probe.
    reserve(&pool, 1)[0].record(Outcome::Success);
    // The count of refused leases drained with them: a later refusal sees only the others.
    let leases = reserve(&pool, 2);
    leases[1].record(refused());
    assert_eq!(pool.snapshot()[0].concurrency_limit, Some(1));
}

#[tokio::test(start_paused = true)]
async fn an_account_limit_refusal_teaches_the_key_too() {
    // Profiles read BigModel's 1302 ("concurrency") and OpenAI/Anthropic 429s as account
    // limits: with other requests in flight, the key learns from them as from a 429.
    let pool = builder("k1").build();
    let leases = reserve(&pool, 3);
    leases[2].record(Outcome::AccountLimited {
        retry_after: Some(Duration::ZERO),
    });
    assert_eq!(pool.snapshot()[0].concurrency_limit, Some(2));
}

/// Through the layer: a 429 whose rate-limit headers say the requests window is used up is
/// about rate, and teaches no concurrency limit even with others in flight; one without
/// such headers does.
#[tokio::test(start_paused = true)]
async fn a_refusal_for_a_spent_rate_window_teaches_no_concurrency_limit() {
    use tower::{Service, ServiceExt};
    use tower_key_rotation::KeyRotation;

    async fn refuse(pool: &KeyPool, window_spent: bool) {
        let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let inner = tower::service_fn(move |_req: http::Request<()>| {
            let call = calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            async move {
                if call < 2 {
                    // The two others: served, their bodies still streaming.
                    return Ok(http::Response::new(String::from("streaming")));
                }
                let mut response = http::Response::builder().status(429);
                if window_spent {
                    response = response
                        .header("x-ratelimit-remaining-requests", "0")
                        .header("x-ratelimit-reset-requests", "20s");
                }
                Ok::<_, std::convert::Infallible>(response.body(String::new()).unwrap())
            }
        });
        let mut services: Vec<_> = (0..3)
            .map(|_| KeyRotation::new(inner.clone(), pool.clone()))
            .collect();
        let mut streaming = Vec::new();
        for service in &mut services[..2] {
            streaming.push(
                service
                    .ready()
                    .await
                    .unwrap()
                    .call(http::Request::new(()))
                    .await
                    .unwrap(),
            );
        }
        // Two others hold the key (sent, at the provider) while the third is refused.
        let refused = services[2]
            .ready()
            .await
            .unwrap()
            .call(http::Request::new(()))
            .await
            .unwrap();
        assert_eq!(refused.status(), 429);
    }

    let pool = builder("k1").build();
    refuse(&pool, true).await;
    assert_eq!(pool.snapshot()[0].concurrency_limit, None);

    let pool = builder("k1").build();
    refuse(&pool, false).await;
    assert_eq!(pool.snapshot()[0].concurrency_limit, Some(2));
}

/// Reservations that ready services hold without sending are not at the provider: a
/// refusal beside them is a lone one (a rate limit) and teaches nothing, and they do not
/// keep the key's probe from going once its rest is over.
#[tokio::test(start_paused = true)]
async fn reservations_not_sent_do_not_count_as_at_the_provider() {
    use tower::{Service, ServiceExt};
    use tower_key_rotation::KeyRotation;

    let pool = builder("k1").build();
    let inner = tower::service_fn(|_req: http::Request<()>| async {
        let response = http::Response::builder()
            .status(429)
            .header("retry-after", "1")
            .body(String::from("refused"))
            .unwrap();
        Ok::<_, std::convert::Infallible>(response)
    });
    let mut services: Vec<_> = (0..4)
        .map(|_| KeyRotation::new(inner, pool.clone()))
        .collect();
    for service in &mut services {
        service.ready().await.unwrap();
    }
    let stats = &pool.snapshot()[0];
    assert_eq!((stats.in_flight, stats.sent, stats.reserved), (4, 0, 4));
    // One is sent and refused; three readied services sit idle.
    let refused = services[3].call(http::Request::new(())).await.unwrap();
    assert_eq!(refused.status(), 429);
    let stats = &pool.snapshot()[0];
    assert_eq!((stats.in_flight, stats.sent, stats.reserved), (4, 1, 3));
    assert_eq!(
        stats.concurrency_limit, None,
        "a lone refusal is a rate limit"
    );
    drop(refused);
    // After the rest, a caller gets the key's probe although three reservations idle.
    tokio::time::advance(Duration::from_millis(1_100)).await;
    let probe = pool.try_reserve().expect("the probe goes");
    assert!(probe.is_probe());
}
