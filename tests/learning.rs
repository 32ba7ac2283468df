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

/// How long after a limit is learned the first try above it waits (the pool's initial
/// raise back-off).
const RAISE_BACKOFF: Duration = Duration::from_secs(5 * 60);

/// Sends `limit` requests at once on key 1, each answered with a success.
fn served_at_limit(pool: &KeyPool) {
    let limit = pool.snapshot()[0].concurrency_limit.unwrap();
    let at_limit = reserve(pool, limit as usize);
    for lease in &at_limit {
        lease.record(Outcome::Success);
    }
}

#[tokio::test(start_paused = true)]
async fn the_limit_never_drops_below_one_nor_rises_above_the_cap() {
    let pool = builder("k1").max_in_flight_per_key(3).build();
    assert_eq!(pool.snapshot()[0].concurrency_limit, Some(3));
    let mut leases = reserve(&pool, 2);
    leases[1].record(refused());
    assert_eq!(pool.snapshot()[0].concurrency_limit, Some(1));
    drop(leases.drain(..));
    // Successes at the limit raise it only after the raise back-off ...
    for _ in 0..100 {
        served_at_limit(&pool);
    }
    assert_eq!(pool.snapshot()[0].concurrency_limit, Some(1));
    // ... then by one, each served try holding, up to the cap.
    for expected in [2, 3, 3] {
        tokio::time::advance(RAISE_BACKOFF).await;
        served_at_limit(&pool);
        served_at_limit(&pool);
        assert_eq!(pool.snapshot()[0].concurrency_limit, Some(expected));
    }
}

#[tokio::test(start_paused = true)]
async fn a_refused_raise_lowers_the_limit_without_a_rest_and_doubles_the_wait() {
    let pool = builder("k1").build();
    let leases = reserve(&pool, 3);
    leases[2].record(refused()); // 2 others: the limit is 2
    drop(leases);
    // The learned limit counts as a refused raise to 3: the first try waits the initial
    // back-off, not a count of successes.
    tokio::time::advance(Duration::from_secs(10)).await;
    reserve(&pool, 1)[0].record(Outcome::Success); // the key's probe after its rest
    served_at_limit(&pool);
    served_at_limit(&pool);
    assert_eq!(pool.snapshot()[0].concurrency_limit, Some(2));
    tokio::time::advance(RAISE_BACKOFF).await;
    // Each refused try doubles the wait before the next.
    for wait_after in [2, 4, 8].map(|n| RAISE_BACKOFF * n) {
        served_at_limit(&pool);
        assert_eq!(pool.snapshot()[0].concurrency_limit, Some(3), "a try of 3");
        // The third request in flight tries the raise, and the provider refuses it.
        let leases = reserve(&pool, 3);
        leases[2].record(Outcome::RateLimited {
            retry_after: Some(Duration::from_secs(2)),
        });
        let stats = &pool.snapshot()[0];
        assert_eq!(
            stats.concurrency_limit,
            Some(2),
            "back to the limit that holds"
        );
        assert_eq!(stats.cooling_down_for, None, "no rest: its limit holds");
        drop(leases);
        assert!(pool.try_reserve().is_some(), "the key serves on");
        tokio::time::advance(wait_after - Duration::from_secs(1)).await;
        served_at_limit(&pool);
        served_at_limit(&pool);
        assert_eq!(pool.snapshot()[0].concurrency_limit, Some(2), "too early");
        tokio::time::advance(Duration::from_secs(1)).await;
    }
    served_at_limit(&pool);
    assert_eq!(pool.snapshot()[0].concurrency_limit, Some(3));
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

/// A provider stand-in that serves at most `limit` requests at once per key (by the key in
/// `Authorization`), each for a second, and refuses the rest at once with `429` and
/// `Retry-After: 1`; it counts its refusals with the time they happened.
#[derive(Clone)]
struct ConcurrencyLimited {
    limit: usize,
    in_flight: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
    refusals: std::sync::Arc<std::sync::Mutex<Vec<(tokio::time::Instant, String)>>>,
}

impl ConcurrencyLimited {
    fn new(limit: usize) -> Self {
        Self {
            limit,
            in_flight: Default::default(),
            refusals: Default::default(),
        }
    }

    fn service<B: Send + 'static>(
        &self,
    ) -> tower::util::BoxCloneService<
        http::Request<B>,
        http::Response<http_body_util::Full<bytes::Bytes>>,
        std::convert::Infallible,
    > {
        let this = self.clone();
        tower::util::BoxCloneService::new(tower::service_fn(move |req: http::Request<B>| {
            let this = this.clone();
            let key = req.headers()["authorization"].to_str().unwrap().to_owned();
            async move {
                let admitted = {
                    let mut in_flight = this.in_flight.lock().unwrap();
                    let n = in_flight.entry(key.clone()).or_default();
                    (*n < this.limit).then(|| *n += 1).is_some()
                };
                let response = http::Response::builder();
                if !admitted {
                    let now = tokio::time::Instant::now();
                    this.refusals.lock().unwrap().push((now, key));
                    let refused = response.status(429).header("retry-after", "1");
                    return Ok(refused.body(Default::default()).unwrap());
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                *this.in_flight.lock().unwrap().get_mut(&key).unwrap() -= 1;
                Ok(response.status(200).body(Default::default()).unwrap())
            }
        }))
    }
}

/// 20 callers on 3 keys that each allow 2 at once: the first burst draws no more refusals
/// than the 14 requests beyond the 6 slots (retries wait instead of reaching keys whose
/// own refusals have not come back), every caller is served, and ten minutes at the limit
/// cost at most one refusal per key (a try of a raised limit, refused without a rest).
#[tokio::test(start_paused = true)]
async fn twenty_callers_on_three_keys_allowing_two_bounce_no_more_than_the_floor() {
    use tower::{Service, ServiceBuilder, ServiceExt};
    use tower_key_rotation::KeyRotationLayer;
    use tower_key_rotation::retry::{ReplayBody, RetryLayer};

    let pool = builder("k1,k2,k3").build();
    let provider = ConcurrencyLimited::new(2);
    let service = ServiceBuilder::new()
        .layer(RetryLayer::new(pool.clone()))
        .layer(KeyRotationLayer::new(pool.clone()))
        .service(provider.service::<ReplayBody<http_body_util::Full<bytes::Bytes>>>());
    let start = tokio::time::Instant::now();
    let end = start + Duration::from_secs(10 * 60);
    let callers: Vec<_> = (0..20)
        .map(|_| {
            let mut service = service.clone();
            tokio::spawn(async move {
                let (mut served, mut failed) = (0, 0);
                while tokio::time::Instant::now() < end {
                    let request = http::Request::new(ReplayBody::buffered(bytes::Bytes::new()));
                    let response = service.ready().await.unwrap().call(request).await;
                    match response {
                        Ok(response) if response.status() == 200 => served += 1,
                        _ => failed += 1,
                    }
                    // A caller that reads the answer before its next request: the 20 of
                    // them offer about as much as the 6 slots serve (the pool does not
                    // queue in order: callers that loop without a pause can starve others
                    // past their wait budget).
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
                (served, failed)
            })
        })
        .collect();
    let (mut served, mut failed) = (0, 0);
    for caller in callers {
        let (s, f) = caller.await.unwrap();
        served += s;
        failed += f;
    }
    assert_eq!(failed, 0, "every caller is served");
    assert!(
        served > 5 * 600,
        "the keys stay near their 6 slots: {served} served"
    );
    eprintln!("served {served}");
    let refusals = provider.refusals.lock().unwrap().clone();
    let burst = refusals
        .iter()
        .filter(|(at, _)| *at < start + Duration::from_secs(5))
        .count();
    assert!(burst <= 14, "{burst} refusals in the first burst");
    for key in ["Bearer k1", "Bearer k2", "Bearer k3"] {
        let later: Vec<_> = refusals
            .iter()
            .filter(|(at, k)| k == key && *at >= start + Duration::from_secs(5))
            .map(|(at, _)| at.duration_since(start))
            .collect();
        assert!(later.len() <= 1, "{key}: refused at {later:?}");
    }
    let stats = pool.snapshot();
    assert!(
        stats.iter().all(|key| key.concurrency_limit == Some(2)),
        "{stats:?}"
    );
}
