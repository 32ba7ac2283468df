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

/// A refusal that says it is one of concurrency (BigModel's 1302) with others at the
/// provider lowers the limit to them and rests nothing: the key serves again as soon as a
/// slot frees. A 429 that does not say so rests the key as well.
#[tokio::test(start_paused = true)]
async fn a_concurrency_refusal_lowers_the_limit_without_a_rest() {
    let concurrency = Outcome::ConcurrencyLimited {
        retry_after: Some(Duration::from_secs(30)),
    };
    let pool = builder("k1").build();
    let mut leases = reserve(&pool, 3);
    leases[2].record(concurrency);
    let stats = &pool.snapshot()[0];
    assert_eq!(stats.concurrency_limit, Some(2));
    assert_eq!(stats.cooling_down_for, None, "no rest: its limit holds");
    drop(leases.pop());
    assert!(pool.try_reserve().is_none(), "2 in flight: at the limit");
    drop(leases.pop());
    let next = pool
        .try_reserve()
        .expect("a slot freed: the key serves at once");
    assert!(!next.is_probe());

    // The same refusal as a plain account limit rests the key for its Retry-After.
    let pool = builder("k1").build();
    let leases = reserve(&pool, 3);
    leases[2].record(Outcome::AccountLimited {
        retry_after: Some(Duration::from_secs(30)),
    });
    assert_eq!(pool.snapshot()[0].concurrency_limit, Some(2));
    assert!(pool.snapshot()[0].cooling_down_for.is_some());
}

/// A concurrency refusal at a limit already lowered (a second refusal of one burst) rests
/// nothing either; alone on the key (the account's other users hold its slots) it is a
/// short rest, as an account limit.
#[tokio::test(start_paused = true)]
async fn a_concurrency_refusal_rests_only_when_alone_on_the_key() {
    let concurrency = Outcome::ConcurrencyLimited {
        retry_after: Some(Duration::from_secs(3)),
    };
    let pool = builder("k1").build();
    let leases = reserve(&pool, 4);
    leases[3].record(concurrency); // 3 others: the limit is 3
    leases[2].record(concurrency); // 2 others at the provider: 2
    leases[1].record(concurrency); // 1 other: 1
    let stats = &pool.snapshot()[0];
    assert_eq!(stats.concurrency_limit, Some(1));
    assert_eq!(stats.cooling_down_for, None);
    drop(leases);

    let pool = builder("k1").build();
    reserve(&pool, 1)[0].record(concurrency);
    let stats = &pool.snapshot()[0];
    assert_eq!(stats.concurrency_limit, None, "alone: nothing to learn");
    assert_eq!(stats.cooling_down_for, Some(Duration::from_secs(3)));

    // With learning off, it is an account limit.
    let pool = builder("k1").learn_concurrency(false).build();
    let leases = reserve(&pool, 3);
    leases[2].record(concurrency);
    assert!(pool.snapshot()[0].cooling_down_for.is_some());
}

/// A concurrency refusal of a try above the limit that holds: back to that limit without
/// a rest, and the next try waits twice as long, as for any refused raise.
#[tokio::test(start_paused = true)]
async fn a_concurrency_refusal_of_a_raise_doubles_the_wait_before_the_next() {
    let concurrency = Outcome::ConcurrencyLimited { retry_after: None };
    let pool = builder("k1").build();
    let leases = reserve(&pool, 3);
    leases[2].record(concurrency); // the limit is 2, learned from a refusal at 3
    drop(leases);
    assert_eq!(pool.snapshot()[0].cooling_down_for, None);
    // Learned at 3: the first try waits the initial back-off, each refused try doubles it.
    for wait in [1, 2, 4].map(|n| RAISE_BACKOFF * n) {
        tokio::time::advance(wait - Duration::from_secs(1)).await;
        served_at_limit(&pool);
        served_at_limit(&pool);
        assert_eq!(pool.snapshot()[0].concurrency_limit, Some(2), "too early");
        tokio::time::advance(Duration::from_secs(1)).await;
        served_at_limit(&pool);
        assert_eq!(pool.snapshot()[0].concurrency_limit, Some(3), "a try of 3");
        // The third request in flight tries the raise: refused for concurrency.
        let leases = reserve(&pool, 3);
        leases[2].record(concurrency);
        let stats = &pool.snapshot()[0];
        assert_eq!(
            stats.concurrency_limit,
            Some(2),
            "back to the limit that holds"
        );
        assert_eq!(stats.cooling_down_for, None, "no rest");
        drop(leases);
    }
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
    /// Refuse as BigModel does (`429` with `error.code` `1302` and no `Retry-After`).
    zhipu: bool,
    in_flight: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
    refusals: std::sync::Arc<std::sync::Mutex<Vec<(tokio::time::Instant, String)>>>,
}

impl ConcurrencyLimited {
    fn new(limit: usize) -> Self {
        Self {
            limit,
            zhipu: false,
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
                    if this.zhipu {
                        let body = r#"{"error":{"code":"1302","message":"您当前使用该API的并发数过高，请降低并发，或联系客服增加限额。"}}"#;
                        let refused = response.status(429).body(body.into()).unwrap();
                        return Ok(refused);
                    }
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
    let pool = builder("k1,k2,k3").build();
    twenty_callers_at_the_limit(pool.clone(), ConcurrencyLimited::new(2), None).await;
    let stats = pool.snapshot();
    assert!(
        stats.iter().all(|key| key.concurrency_limit == Some(2)),
        "{stats:?}"
    );
}

/// Buckets by the `x-model` header.
#[derive(Debug)]
struct ByModelHeader;

impl tower_key_rotation::route::Router for ByModelHeader {
    fn bucket<'a>(&self, head: &tower_key_rotation::route::RequestHead<'a>) -> Option<&'a str> {
        head.headers.get("x-model")?.to_str().ok()
    }
}

/// The same through BigModel's profile, in a pool with buckets: its concurrency refusal
/// (`1302`, no `Retry-After`; <https://docs.bigmodel.cn/cn/faq/api-code>) teaches each
/// (key, model) lane its limit, and rests no lane, so the first burst and ten minutes at
/// the limit refuse no more than with a plain 429.
#[tokio::test(start_paused = true)]
async fn twenty_callers_on_three_zhipu_keys_bounce_no_more_than_the_floor() {
    let pool = builder("k1,k2,k3")
        .classifier(tower_key_rotation::classify::Classifier::bigmodel())
        .router(ByModelHeader)
        .build();
    let provider = ConcurrencyLimited {
        zhipu: true,
        ..ConcurrencyLimited::new(2)
    };
    twenty_callers_at_the_limit(pool.clone(), provider, Some("glm-4-plus")).await;
    let stats = pool.bucket_snapshot();
    let lanes: Vec<_> = stats.iter().filter(|s| s.bucket == "glm-4-plus").collect();
    assert_eq!(lanes.len(), 3);
    assert!(
        lanes.iter().all(
            |lane| lane.key.concurrency_limit == Some(2) && lane.key.state != KeyState::Resting
        ),
        "{stats:?}"
    );
}

/// 20 callers for ten minutes (paused time) on `pool`'s three keys, `provider` allowing 2
/// at once on each: every caller served, at most 14 refusals in the first burst and at
/// most one per key after it.
async fn twenty_callers_at_the_limit(
    pool: KeyPool,
    provider: ConcurrencyLimited,
    model: Option<&'static str>,
) {
    use tower::{Service, ServiceBuilder, ServiceExt};
    use tower_key_rotation::KeyRotationLayer;
    use tower_key_rotation::retry::{ReplayBody, RetryLayer};

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
                    let mut request = http::Request::new(ReplayBody::buffered(bytes::Bytes::new()));
                    if let Some(model) = model {
                        request
                            .headers_mut()
                            .insert("x-model", http::HeaderValue::from_static(model));
                    }
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
}
