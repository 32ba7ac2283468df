//! Several pools (replicas) sharing their keys' state through a real `redis-server`
//! (`shared::redis`): rests, disables and in-flight caps seen by one replica hold in the
//! others; the store going away degrades, and its return resumes sharing.

use std::time::Duration;

use test_support::RedisServer;
use tokio::time::{Instant, timeout};
use tower_key_rotation::shared::redis::{RedisBackend, RedisOptions};
use tower_key_rotation::{KeyPool, KeySet, classify::Outcome, pool::KeyState};

const KEYS: &str = "sk-one,sk-two,sk-three";
const SECRET: &[u8] = b"test deployment secret";

fn options(namespace: &str) -> RedisOptions {
    let mut options = RedisOptions::default();
    options.namespace = namespace.to_owned();
    options
}

/// A replica: a backend connected to `server`, and a pool over [`KEYS`] sharing through it.
async fn replica(
    server: &RedisServer,
    namespace: &str,
    cap: Option<u32>,
) -> (KeyPool, RedisBackend) {
    let backend = RedisBackend::new(&server.url(), SECRET, options(namespace)).unwrap();
    assert!(backend.connect().await, "the test server answers");
    let mut pool = KeyPool::builder(KeySet::parse(KEYS).unwrap()).state_backend(backend.clone());
    if let Some(cap) = cap {
        pool = pool.max_in_flight_per_key(cap);
    }
    let pool = pool.build();
    timeout(Duration::from_secs(5), backend.subscribed())
        .await
        .expect("subscribed within 5 s");
    (pool, backend)
}

#[tokio::test]
async fn a_429_seen_by_one_replica_rests_the_key_in_another_within_50_ms() {
    let server = RedisServer::start().await;
    let (a, _) = replica(&server, "rest", None).await;
    let (b, b_backend) = replica(&server, "rest", None).await;
    let mut applied = b_backend.applied();
    applied.borrow_and_update();

    let lease = a.try_reserve().unwrap();
    assert_eq!(lease.position(), 1);
    lease.mark_sent();
    let refused = Instant::now();
    lease.record(Outcome::RateLimited {
        retry_after: Some(Duration::from_secs(20)),
    });
    drop(lease);
    timeout(Duration::from_secs(2), applied.changed())
        .await
        .expect("replica B hears of the rest")
        .unwrap();
    let took = refused.elapsed();
    eprintln!("replica B rested key 1 {took:?} after replica A's 429");
    assert!(took < Duration::from_millis(50), "took {took:?}");

    // B rests key 1 from its own atomics: no round trip on its request path.
    let key = &b.snapshot()[0];
    assert_eq!(key.state, KeyState::Resting);
    let left = key.cooling_down_for.unwrap();
    assert!(
        left > Duration::from_secs(19) && left <= Duration::from_secs(20),
        "{left:?}"
    );
    for _ in 0..6 {
        let lease = b.try_reserve().unwrap();
        assert_ne!(lease.position(), 1);
    }
}

#[tokio::test]
async fn a_disable_reaches_every_replica_and_a_new_one_syncs_it() {
    let server = RedisServer::start().await;
    let (a, _) = replica(&server, "disable", None).await;
    let (b, b_backend) = replica(&server, "disable", None).await;
    let mut applied = b_backend.applied();
    applied.borrow_and_update();

    let lease = a.try_reserve().unwrap();
    lease.mark_sent();
    // Refused, and proven the key's fault (another key served the same request).
    lease.record(Outcome::KeyRejected);
    assert!(lease.disable());
    drop(lease);
    timeout(Duration::from_secs(2), applied.changed())
        .await
        .unwrap()
        .unwrap();
    assert!(b.snapshot()[0].disabled);

    // A replica started later reads it at its first sync.
    let (c, c_backend) = replica(&server, "disable", None).await;
    timeout(
        Duration::from_secs(5),
        c_backend.syncs().wait_for(|&syncs| syncs > 0),
    )
    .await
    .expect("synced within 5 s")
    .unwrap();
    assert!(c.snapshot()[0].disabled);
    // Another namespace shares nothing.
    let (other, _) = replica(&server, "elsewhere", None).await;
    assert!(!other.snapshot()[0].disabled);
}

#[test]
fn neither_the_url_nor_its_password_shows_in_errors_or_debug() {
    let error = RedisBackend::new("redis://:hunter2-pass@", SECRET, RedisOptions::default())
        .err()
        .map(|e| e.to_string());
    if let Some(error) = error {
        assert!(!error.contains("hunter2"), "{error}");
    }
    let error = RedisBackend::new(
        "http://user:hunter2-pass@host",
        SECRET,
        RedisOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(!error.contains("hunter2"), "{error}");
    let backend = RedisBackend::new(
        "redis://user:hunter2-pass@127.0.0.1:1/0",
        SECRET,
        RedisOptions::default(),
    )
    .unwrap();
    let debug = format!("{backend:?}");
    assert!(
        !debug.contains("hunter2") && !debug.contains("127.0.0.1"),
        "{debug}"
    );
}

// ---------------------------------------------------------------------------------------
// In-flight caps shared by three replicas
// ---------------------------------------------------------------------------------------

#[allow(unreachable_pub)]
mod caps {
    use std::collections::HashMap;
    use std::convert::Infallible;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use bytes::Bytes;
    use http::{Request, Response};
    use http_body_util::{BodyExt, Empty, Full};
    use tower::{Service, ServiceExt};
    use tower_key_rotation::{KeyPool, KeyRotation};

    /// A provider stand-in allowing `limit` requests in flight per key, refusing more with
    /// 429; it records the most it saw at once per key.
    #[derive(Clone, Default)]
    pub struct Provider {
        limit: u32,
        /// The `Retry-After` its 429s carry, if any.
        retry_after: Option<&'static str>,
        state: Arc<Mutex<Ledger>>,
    }

    #[derive(Default)]
    struct Ledger {
        in_flight: HashMap<String, u32>,
        most: HashMap<String, u32>,
        refused: u32,
        served: u32,
        /// Each refusal: the key's position (its value's last word) and when.
        refusals: Vec<(String, tokio::time::Instant)>,
    }

    /// A request the provider works on.
    struct Working {
        state: Arc<Mutex<Ledger>>,
        key: String,
    }

    impl Drop for Working {
        fn drop(&mut self) {
            *self
                .state
                .lock()
                .unwrap()
                .in_flight
                .get_mut(&self.key)
                .unwrap() -= 1;
        }
    }

    impl Provider {
        pub fn new(limit: u32) -> Self {
            Self {
                limit,
                retry_after: None,
                state: Arc::default(),
            }
        }

        /// Its 429s say `Retry-After: <seconds>`.
        pub fn retry_after(mut self, seconds: &'static str) -> Self {
            self.retry_after = Some(seconds);
            self
        }

        /// Each refusal so far: which key (`one`, `two`, `three`) and when.
        pub fn refusals(&self) -> Vec<(String, tokio::time::Instant)> {
            self.state.lock().unwrap().refusals.clone()
        }

        /// (served, refused with 429, the most in flight on any key at once).
        pub fn tally(&self) -> (u32, u32, u32) {
            let ledger = self.state.lock().unwrap();
            let most = ledger.most.values().copied().max().unwrap_or(0);
            (ledger.served, ledger.refused, most)
        }

        /// The inner service: works `work` on an accepted request.
        pub fn service(
            &self,
            work: Duration,
        ) -> impl Service<
            Request<Empty<Bytes>>,
            Response = Response<Full<Bytes>>,
            Error = Infallible,
            Future = impl Send,
        > + Clone
        + Send
        + 'static {
            let provider = self.clone();
            tower::service_fn(move |request: Request<Empty<Bytes>>| {
                let provider = provider.clone();
                async move {
                    // Limits per key, or per key and model when the request names one.
                    let mut key = request.headers()["authorization"]
                        .to_str()
                        .unwrap()
                        .to_owned();
                    if let Some(model) = request.headers().get("x-model") {
                        key.push(' ');
                        key.push_str(model.to_str().unwrap());
                    }
                    let accepted = {
                        let mut ledger = provider.state.lock().unwrap();
                        let count = ledger.in_flight.entry(key.clone()).or_default();
                        let accepted = *count < provider.limit;
                        if accepted {
                            *count += 1;
                            let now = *count;
                            let most = ledger.most.entry(key.clone()).or_default();
                            *most = (*most).max(now);
                            ledger.served += 1;
                        } else {
                            ledger.refused += 1;
                            let which = key.rsplit('-').next().unwrap_or_default().to_owned();
                            ledger.refusals.push((which, tokio::time::Instant::now()));
                        }
                        accepted
                    };
                    if !accepted {
                        let mut response = Response::new(Full::new(Bytes::from_static(b"busy")));
                        *response.status_mut() = http::StatusCode::TOO_MANY_REQUESTS;
                        if let Some(seconds) = provider.retry_after {
                            response.headers_mut().insert(
                                http::header::RETRY_AFTER,
                                http::HeaderValue::from_static(seconds),
                            );
                        }
                        return Ok(response);
                    }
                    // Out of flight when the work ends, or when the caller gives up.
                    let _working = Working {
                        state: provider.state.clone(),
                        key,
                    };
                    tokio::time::sleep(work).await;
                    Ok(Response::new(Full::new(Bytes::from_static(b"ok"))))
                }
            })
        }
    }

    /// `requests` requests spread round the `pools`, all at once; each answer read to its
    /// end (which gives its key back). Returns the statuses.
    pub async fn load(
        pools: &[KeyPool],
        provider: &Provider,
        requests: usize,
        work: Duration,
    ) -> Vec<u16> {
        load_models(pools, provider, requests, work, &[]).await
    }

    /// [`load`], the `i`-th request naming the model `models[i % models.len()]` in
    /// `x-model` (none if `models` is empty).
    pub async fn load_models(
        pools: &[KeyPool],
        provider: &Provider,
        requests: usize,
        work: Duration,
        models: &[&'static str],
    ) -> Vec<u16> {
        let tasks: Vec<_> = (0..requests)
            .map(|i| {
                let service =
                    KeyRotation::new(provider.service(work), pools[i % pools.len()].clone());
                let model = (!models.is_empty()).then(|| models[i % models.len()]);
                tokio::spawn(async move {
                    let mut request = Request::get("http://provider.test/v1/chat");
                    if let Some(model) = model {
                        request = request.header("x-model", model);
                    }
                    let request = request.body(Empty::<Bytes>::new()).unwrap();
                    let response = service.oneshot(request).await.expect("an answer");
                    let status = response.status().as_u16();
                    response.into_body().collect().await.unwrap();
                    status
                })
            })
            .collect();
        let mut statuses = Vec::with_capacity(requests);
        for task in tasks {
            statuses.push(task.await.unwrap());
        }
        statuses
    }
}

use caps::{Provider, load, load_models};

/// Three replicas with a cap of `cap` per key, sharing through `server` (or not).
async fn three_replicas(
    server: Option<&RedisServer>,
    namespace: &str,
    keys: &str,
    cap: u32,
    options: RedisOptions,
) -> (Vec<KeyPool>, Vec<RedisBackend>) {
    let mut pools = Vec::new();
    let mut backends = Vec::new();
    for _ in 0..3 {
        let mut pool = KeyPool::builder(KeySet::parse(keys).unwrap()).max_in_flight_per_key(cap);
        if let Some(server) = server {
            let mut options = options.clone();
            options.namespace = namespace.to_owned();
            let backend = RedisBackend::new(&server.url(), SECRET, options).unwrap();
            assert!(backend.connect().await);
            pool = pool.state_backend(backend.clone());
            backends.push(backend);
        }
        pools.push(pool.build());
    }
    for backend in &backends {
        timeout(Duration::from_secs(5), backend.subscribed())
            .await
            .unwrap();
    }
    (pools, backends)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_keep_each_keys_cap_between_them_and_without_redis_they_do_not() {
    let server = RedisServer::start().await;
    let work = Duration::from_millis(20);

    let provider = Provider::new(2);
    let (pools, _backends) =
        three_replicas(Some(&server), "caps", KEYS, 2, RedisOptions::default()).await;
    let statuses = load(&pools, &provider, 300, work).await;
    let (served, refused, most) = provider.tally();
    eprintln!("shared: {served} served, {refused} refused (429), at most {most} in flight per key");
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    assert_eq!((served, refused), (300, 0));
    assert!(most <= 2, "{most} in flight on one key");
    for pool in &pools {
        assert!(pool.snapshot().iter().all(|key| key.in_flight == 0));
    }

    // The control: the same replicas, each on its own.
    let provider = Provider::new(2);
    let (pools, _) = three_replicas(None, "", KEYS, 2, RedisOptions::default()).await;
    load(&pools, &provider, 300, work).await;
    let (_, refused, _) = provider.tally();
    eprintln!("control without Redis: {refused} refused (429)");
    assert!(
        refused > 0,
        "the replicas alone exceed the provider's limit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_replicas_leases_come_back_within_the_ttl() {
    let server = RedisServer::start().await;
    let mut options = RedisOptions::default();
    options.namespace = "dead".to_owned();
    options.heartbeat = Duration::from_millis(200);
    options.ttl = Duration::from_secs(1);

    // The replica that dies: its own runtime, holding both slots of the one key, then
    // gone without a word (its runtime dropped, its leases never released).
    let url = server.url();
    let dying = options.clone();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let backend = RedisBackend::new(&url, SECRET, dying).unwrap();
            assert!(backend.connect().await);
            let pool = KeyPool::builder(KeySet::parse("sk-one").unwrap())
                .max_in_flight_per_key(2)
                .state_backend(backend)
                .build();
            for _ in 0..2 {
                let lease = pool.try_reserve().unwrap();
                assert!(lease.needs_admission());
                std::mem::forget(lease.admit().await.expect("admitted"));
            }
        });
        drop(runtime);
    })
    .join()
    .unwrap();

    let backend = RedisBackend::new(&server.url(), SECRET, options).unwrap();
    assert!(backend.connect().await);
    let pool = KeyPool::builder(KeySet::parse("sk-one").unwrap())
        .max_in_flight_per_key(2)
        .state_backend(backend)
        .build();
    let started = Instant::now();
    let lease = pool.try_reserve().unwrap();
    assert!(
        timeout(Duration::from_millis(300), lease.admit())
            .await
            .is_err(),
        "the dead replica's leases still count"
    );
    // A caller waits (no polling: woken when the replica count drops) and gets the key.
    let provider = Provider::new(2);
    let statuses = load(&[pool], &provider, 2, Duration::from_millis(1)).await;
    let took = started.elapsed();
    eprintln!("a dead replica's slots came back after {took:?} (ttl 1 s, heartbeat 200 ms)");
    assert_eq!(statuses, [200, 200]);
    assert!(took < Duration::from_millis(2500), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_run_degrades_without_failing_a_request_and_its_return_resumes_sharing() {
    let mut server = RedisServer::start().await;
    let mut options = RedisOptions::default();
    options.heartbeat = Duration::from_millis(200);
    // A cap of 3 over 3 replicas: the split policy gives each 1, so even degraded the
    // provider's limit holds.
    let provider = Provider::new(3);
    let (pools, backends) = three_replicas(Some(&server), "outage", "sk-one", 3, options).await;
    let work = Duration::from_millis(20);
    let before = load(&pools, &provider, 60, work).await;

    // Killed while requests are in flight.
    let during = {
        let pools = pools.clone();
        let provider = provider.clone();
        tokio::spawn(async move { load(&pools, &provider, 120, work).await })
    };
    server.kill().await;
    for backend in &backends {
        timeout(Duration::from_secs(5), backend.sharing().wait_for(|s| !s))
            .await
            .expect("degraded within 5 s")
            .unwrap();
    }
    let degraded = load(&pools, &provider, 60, work).await;
    for pool in &pools {
        let health = pool.backend_health().unwrap();
        assert!(health.degraded && !health.connected, "{health:?}");
        assert_eq!(health.replicas, 3);
    }
    let during = during.await.unwrap();

    // Back, empty (no persistence): scripts reloaded (NOSCRIPT), state merged, sharing on.
    server.restart().await;
    for backend in &backends {
        timeout(Duration::from_secs(5), backend.sharing().wait_for(|s| *s))
            .await
            .expect("sharing again within 5 s")
            .unwrap();
    }
    let after = load(&pools, &provider, 60, work).await;
    for pool in &pools {
        assert!(!pool.backend_health().unwrap().degraded);
    }
    let (served, refused, most) = provider.tally();
    eprintln!("outage: {served} served, {refused} refused (429), at most {most} at once");
    for statuses in [before, during, degraded, after] {
        assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    }
    assert_eq!((served, refused), (300, 0));
    assert!(most <= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_redis_admitted_before_it_went_away_and_the_split_deal_never_exceed_the_cap() {
    let mut server = RedisServer::start().await;
    let mut options = RedisOptions::default();
    options.heartbeat = Duration::from_millis(200);
    options.ttl = Duration::from_secs(1);
    let ttl = options.ttl;
    let (pools, backends) = three_replicas(Some(&server), "held", "sk-one", 3, options).await;
    // A backstop heartbeat after the three connected: each knows there are three.
    for backend in &backends {
        let mut syncs = backend.syncs();
        let seen = *syncs.borrow_and_update();
        timeout(Duration::from_secs(5), syncs.wait_for(|n| *n >= seen + 2))
            .await
            .unwrap()
            .unwrap();
    }
    // The store admitted two requests of the first replica and one of the second: the
    // key's cap of 3 is full, though the split deal gives each replica 1.
    let mut first = Vec::new();
    for _ in 0..2 {
        let lease = pools[0].try_reserve().unwrap();
        first.push(lease.admit().await.expect("admitted"));
    }
    let second = pools[1].try_reserve().unwrap();
    let second = second.admit().await.expect("admitted");

    let killed = Instant::now();
    server.kill().await;
    for backend in &backends {
        timeout(Duration::from_secs(5), backend.sharing().wait_for(|s| !s))
            .await
            .expect("degraded within 5 s")
            .unwrap();
    }
    for pool in &pools {
        assert_eq!(pool.backend_health().unwrap().replicas, 3);
    }
    // The third replica holds none of the three running: it takes no slot beside them.
    assert!(
        pools[2].try_reserve().is_none(),
        "4 in flight on a cap of 3"
    );
    // The first, above its share, does not replace a request that ends; the second
    // replaces its own.
    drop(first.pop());
    assert!(
        pools[0].try_reserve().is_none(),
        "the first replica exceeds its share"
    );
    drop(second);
    let second = pools[1]
        .try_reserve()
        .expect("the second replaces its own request");
    assert!(
        pools[2].try_reserve().is_none(),
        "4 in flight on a cap of 3"
    );

    // After the time to live, the third takes its share: its caller waits (woken when
    // the hold ends, no polling) and is served.
    let provider = Provider::new(3);
    let statuses = load(&pools[2..], &provider, 1, Duration::from_millis(1)).await;
    let took = killed.elapsed();
    eprintln!("the third replica's first degraded request went {took:?} after the kill");
    assert_eq!(statuses, [200]);
    assert!(took >= ttl, "{took:?}");
    drop((first, second));
}

/// Buckets by the `x-model` header.
#[derive(Debug)]
struct ByModel;

impl tower_key_rotation::route::Router for ByModel {
    fn bucket<'a>(&self, head: &tower_key_rotation::route::RequestHead<'a>) -> Option<&'a str> {
        head.headers.get("x-model")?.to_str().ok()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_keep_the_cap_of_each_key_and_model_between_them() {
    let server = RedisServer::start().await;
    let work = Duration::from_millis(20);
    let models = ["model-a", "model b/{2}"];
    let replicas = |server: Option<&RedisServer>| {
        let url = server.map(RedisServer::url);
        async move {
            let mut pools = Vec::new();
            let mut backends = Vec::new();
            for _ in 0..3 {
                let mut pool = KeyPool::builder(KeySet::parse(KEYS).unwrap())
                    .max_in_flight_per_key(2)
                    .router(ByModel);
                if let Some(url) = &url {
                    let backend = RedisBackend::new(url, SECRET, options("buckets")).unwrap();
                    assert!(backend.connect().await);
                    pool = pool.state_backend(backend.clone());
                    backends.push(backend);
                }
                pools.push(pool.build());
            }
            for backend in &backends {
                timeout(Duration::from_secs(5), backend.subscribed())
                    .await
                    .unwrap();
            }
            (pools, backends)
        }
    };

    // Each model allows 2 in flight per key: the cap of each (key, model).
    let provider = Provider::new(2);
    let (pools, _backends) = replicas(Some(&server)).await;
    let before = server.command_stats();
    let statuses = load_models(&pools, &provider, 600, work, &models).await;
    let after = server.command_stats();
    let (served, refused, most) = provider.tally();
    let calls = (client_calls(&after) - client_calls(&before)) as f64 / 600.0;
    eprintln!(
        "buckets shared: {served} served, {refused} refused (429), at most {most} in flight \
         per key and model, {calls:.2} Redis calls per request"
    );
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    assert_eq!((served, refused), (600, 0));
    assert!(most <= 2, "{most} in flight on one key and model");
    // Admission and release, as for keys alone (the thirty-client test holds those to
    // 2.1), plus the heartbeat's renewals, which cost per second and per lane in use (six
    // here, against three keys there): 1.86-2.10 measured.
    assert!(calls <= 2.2, "{calls:.2} Redis calls per request");
    // Both models' lanes are in the store, each under its own (key, model) id.
    let stored = server.cli(&["--scan", "--pattern", "tkr:buckets:*:c"]);
    assert_eq!(stored.lines().count(), 6, "{stored}");
    assert!(stored.contains(".model-a}:c"), "{stored}");
    assert!(stored.contains(".model%20b%2F%7B2%7D}:c"), "{stored}");
    for pool in &pools {
        assert!(pool.snapshot().iter().all(|key| key.in_flight == 0));
    }

    // The control: the same replicas, each on its own.
    let provider = Provider::new(2);
    let (pools, _) = replicas(None).await;
    load_models(&pools, &provider, 600, work, &models).await;
    let (_, refused, _) = provider.tally();
    eprintln!("control without Redis: {refused} refused (429)");
    assert!(
        refused > 0,
        "the replicas alone exceed the provider's limit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quota_is_shared_by_the_replicas() {
    let server = RedisServer::start().await;
    let quota = tower_key_rotation::Quota::per_second(10);
    let run = Duration::from_millis(1500);
    let mut pools = Vec::new();
    for _ in 0..3 {
        let backend = RedisBackend::new(&server.url(), SECRET, options("quota")).unwrap();
        assert!(backend.connect().await);
        pools.push(
            KeyPool::builder(KeySet::parse("sk-one").unwrap())
                .quota_per_key(quota)
                .state_backend(backend)
                .build(),
        );
    }
    let shared = clients_for(&pools, &Provider::new(100), 3, run, Duration::ZERO).await;

    let alone: Vec<KeyPool> = (0..3)
        .map(|_| {
            KeyPool::builder(KeySet::parse("sk-one").unwrap())
                .quota_per_key(quota)
                .build()
        })
        .collect();
    let control = clients_for(&alone, &Provider::new(100), 3, run, Duration::ZERO).await;
    eprintln!(
        "10 requests/s over 1.5 s: {shared} sent by 3 replicas sharing the quota, {control} without Redis"
    );
    // 10/s from the first at 0 ms: 15 or 16 in 1.5 s, whoever sends them.
    assert!((14..=16).contains(&shared), "{shared}");
    assert!(control >= 42, "{control}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_rest_one_probe_goes_for_all_the_replicas() {
    use http_body_util::BodyExt;
    use std::sync::{Arc, Mutex};
    use tower::ServiceExt;

    let server = RedisServer::start().await;
    let mut pools = Vec::new();
    let mut backends = Vec::new();
    for _ in 0..3 {
        let backend = RedisBackend::new(&server.url(), SECRET, options("probe")).unwrap();
        assert!(backend.connect().await);
        pools.push(
            KeyPool::builder(KeySet::parse("sk-one").unwrap())
                .state_backend(backend.clone())
                .build(),
        );
        backends.push(backend);
    }
    for backend in &backends {
        timeout(Duration::from_secs(5), backend.subscribed())
            .await
            .unwrap();
    }
    let mut heard: Vec<_> = backends[1..].iter().map(RedisBackend::applied).collect();
    let lease = pools[0].try_reserve().unwrap();
    lease.mark_sent();
    lease.record(Outcome::RateLimited {
        retry_after: Some(Duration::from_millis(300)),
    });
    drop(lease);
    for applied in &mut heard {
        timeout(Duration::from_secs(2), applied.changed())
            .await
            .unwrap()
            .unwrap();
    }

    // Three callers per replica wait for the key; the provider works 200 ms per request.
    let arrivals = Arc::new(Mutex::new(Vec::new()));
    let work = Duration::from_millis(200);
    let callers: Vec<_> = (0..9)
        .map(|i| {
            let pool = pools[i % 3].clone();
            let arrivals = arrivals.clone();
            tokio::spawn(async move {
                let inner = tower::service_fn(
                    move |_request: http::Request<http_body_util::Empty<bytes::Bytes>>| {
                        let arrivals = arrivals.clone();
                        async move {
                            arrivals.lock().unwrap().push(Instant::now());
                            tokio::time::sleep(work).await;
                            Ok::<_, std::convert::Infallible>(http::Response::new(
                                http_body_util::Full::new(bytes::Bytes::from_static(b"ok")),
                            ))
                        }
                    },
                );
                let request = http::Request::get("http://provider.test/v1/chat")
                    .body(http_body_util::Empty::<bytes::Bytes>::new())
                    .unwrap();
                let response = tower_key_rotation::KeyRotation::new(inner, pool)
                    .oneshot(request)
                    .await
                    .unwrap();
                assert_eq!(response.status(), 200);
                response.into_body().collect().await.unwrap();
            })
        })
        .collect();
    for caller in callers {
        caller.await.unwrap();
    }
    let mut arrivals = arrivals.lock().unwrap().clone();
    arrivals.sort();
    let alone = arrivals[1] - arrivals[0];
    eprintln!("the probe went alone for {alone:?} (its answer took {work:?})");
    assert_eq!(arrivals.len(), 9);
    // The others waited for the probe's answer, whichever replica sent it.
    assert!(alone >= work - Duration::from_millis(20), "{alone:?}");
}

#[tokio::test]
async fn a_reservation_traded_in_call_never_takes_a_key_full_across_the_replicas() {
    use std::sync::{Arc, Mutex};
    use tower::{Service, ServiceExt};

    let server = RedisServer::start().await;
    let keys = "sk-one,sk-two";
    let replica = |server: &RedisServer| {
        let backend = RedisBackend::new(&server.url(), SECRET, options("trade")).unwrap();
        async move {
            assert!(backend.connect().await);
            let pool = KeyPool::builder(KeySet::parse(keys).unwrap())
                .max_in_flight_per_key(1)
                .state_backend(backend.clone())
                .build();
            timeout(Duration::from_secs(5), backend.subscribed())
                .await
                .unwrap();
            (pool, backend)
        }
    };
    let (a, a_backend) = replica(&server).await;
    let (b, _) = replica(&server).await;

    // A's caller is ready: key 1 reserved and admitted by the store.
    let sent = Arc::new(Mutex::new(Vec::new()));
    let inner = {
        let sent = sent.clone();
        tower::service_fn(
            move |request: http::Request<http_body_util::Empty<bytes::Bytes>>| {
                sent.lock().unwrap().push(
                    request.headers()["authorization"]
                        .to_str()
                        .unwrap()
                        .to_owned(),
                );
                async {
                    Ok::<_, std::convert::Infallible>(http::Response::new(
                        http_body_util::Full::new(bytes::Bytes::from_static(b"ok")),
                    ))
                }
            },
        )
    };
    let mut service = tower_key_rotation::KeyRotation::new(inner, a.clone());
    timeout(Duration::from_secs(2), service.ready())
        .await
        .expect("ready")
        .unwrap();
    assert_eq!(a.snapshot()[0].in_flight, 1, "A reserved key 1");

    // B fills key 2 (its cap of 1 across the replicas); A has not asked about key 2 since,
    // so key 2 looks free from A's own atomics.
    let b_lease = b.try_reserve_where(|p| p == 2).unwrap();
    let b_lease = b_lease.admit().await.expect("key 2 is free in the store");
    assert_eq!(a.snapshot()[1].in_flight, 0);

    // Key 1 starts resting (a 429 seen by B) before A's caller sends: its reservation is
    // stale, and `call` looks for another key.
    let mut applied = a_backend.applied();
    applied.borrow_and_update();
    let refused = b.try_reserve_where(|p| p == 1).unwrap();
    refused.mark_sent();
    refused.record(Outcome::RateLimited {
        retry_after: Some(Duration::from_secs(20)),
    });
    drop(refused);
    timeout(Duration::from_secs(2), applied.changed())
        .await
        .expect("A hears of the rest")
        .unwrap();
    assert_eq!(a.snapshot()[0].state, KeyState::Resting);

    let request = http::Request::get("http://provider.test/v1/chat")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let answer = service.call(request).await;
    let sent = sent.lock().unwrap().clone();
    eprintln!(
        "A's call: {:?}, sent with {sent:?}",
        answer.as_ref().map(|r| r.status())
    );
    // Key 2 holds B's request: the cap of 1 across the replicas forbids a second one. The
    // call may go on its own (resting) key, or be refused before sending.
    assert!(
        !sent.iter().any(|key| key == "Bearer sk-two"),
        "sent on key 2 while B holds its only slot: {sent:?}"
    );
    drop(b_lease);
}

/// The concurrency limit of key 1 in `pool` (`None`: none).
fn limit_of(pool: &KeyPool) -> Option<u32> {
    pool.snapshot()[0].concurrency_limit
}

/// Waits until `pool`'s key 1 has the concurrency limit `limit` (told by the store, in a
/// message or at a sync).
async fn wait_for_limit(pool: &KeyPool, backend: &RedisBackend, limit: u32) {
    let (mut applied, mut syncs) = (backend.applied(), backend.syncs());
    let reached = async {
        while limit_of(pool) != Some(limit) {
            tokio::select! {
                changed = applied.changed() => changed.unwrap(),
                changed = syncs.changed() => changed.unwrap(),
            }
        }
    };
    timeout(Duration::from_secs(2), reached)
        .await
        .unwrap_or_else(|_| panic!("limit {limit} within 2 s, not {:?}", limit_of(pool)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrency_limit_learned_by_one_replica_holds_in_every_replica() {
    let server = RedisServer::start().await;
    // No configured cap: the limit is learned.
    let (a, a_backend) = replica(&server, "learn", None).await;
    let (b, b_backend) = replica(&server, "learn", None).await;
    assert_eq!((limit_of(&a), limit_of(&b)), (None, None));

    // A: a 429 while 2 other requests are in flight on key 1 teaches it a limit of 2.
    let leases: Vec<_> = (0..3)
        .map(|_| a.try_reserve_where(|p| p == 1).unwrap())
        .collect();
    for lease in &leases {
        lease.mark_sent();
    }
    leases[2].record(Outcome::RateLimited {
        retry_after: Some(Duration::ZERO),
    });
    drop(leases);
    assert_eq!(limit_of(&a), Some(2));
    // B takes it from the store, without a refusal of its own.
    wait_for_limit(&b, &b_backend, 2).await;

    // The store admits under it, counting both replicas: B holds 2, A gets no third.
    let mut held = Vec::new();
    for _ in 0..2 {
        let lease = b.try_reserve_where(|p| p == 1).unwrap();
        assert!(
            lease.needs_admission(),
            "a learned limit is shared like a cap"
        );
        let lease = lease.admit().await.expect("room for 2");
        lease.mark_sent();
        held.push(lease);
    }
    // A third lease on key 1 waits in the store's queue (and gives up here).
    let third = a.try_reserve_where(|p| p == 1).unwrap();
    assert!(
        timeout(Duration::from_millis(300), third.admit())
            .await
            .is_err(),
        "a third lease on key 1 across the replicas"
    );

    // A lower limit learned by B (a 429 with one other in flight) wins in A.
    drop(held.pop());
    let refused = b.try_reserve_where(|p| p == 1).unwrap();
    refused.mark_sent();
    refused.record(Outcome::RateLimited {
        retry_after: Some(Duration::ZERO),
    });
    drop(refused);
    drop(held);
    assert_eq!(limit_of(&b), Some(1));
    wait_for_limit(&a, &a_backend, 1).await;

    // A limit learned from a refusal is not raised by successes before its back-off (5
    // minutes; `tests/learning.rs` follows the raises in paused time): 16 successes at it
    // leave it at 1 in both replicas.
    let provider = Provider::new(5);
    let successes = |pool: &KeyPool| pool.snapshot()[0].successes;
    let before = successes(&a);
    // One at a time (round-robin over the 3 keys): each on key 1 is at its limit.
    while successes(&a) < before + 16 {
        assert_eq!(
            load(std::slice::from_ref(&a), &provider, 1, Duration::ZERO).await,
            [200]
        );
    }
    assert_eq!((limit_of(&a), limit_of(&b)), (Some(1), Some(1)));
    // Nothing was left counted: both replicas' leases are all given back.
    for pool in [&a, &b] {
        assert_eq!(pool.snapshot()[0].in_flight, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_learned_while_redis_is_away_are_merged_on_its_return_and_the_lower_wins() {
    let mut server = RedisServer::start().await;
    let mut options = options("learn-outage");
    options.heartbeat = Duration::from_millis(200);
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let backend = RedisBackend::new(&server.url(), SECRET, options.clone()).unwrap();
        assert!(backend.connect().await);
        let pool = KeyPool::builder(KeySet::parse(KEYS).unwrap())
            .state_backend(backend.clone())
            .build();
        replicas.push((pool, backend));
    }
    server.kill().await;
    for (_, backend) in &replicas {
        timeout(Duration::from_secs(5), backend.sharing().wait_for(|s| !s))
            .await
            .expect("degraded within 5 s")
            .unwrap();
    }
    // Each learns alone: A a limit of 3, B of 2 (a 429 with that many others in flight).
    for ((pool, _), others) in replicas.iter().zip([3, 2]) {
        let leases: Vec<_> = (0..=others)
            .map(|_| pool.try_reserve_where(|p| p == 1).unwrap())
            .collect();
        for lease in &leases {
            lease.mark_sent();
        }
        leases[others].record(Outcome::RateLimited {
            retry_after: Some(Duration::ZERO),
        });
        assert_eq!(limit_of(pool), Some(others as u32));
    }

    // Back (empty): both limits merged, the lower kept, and every replica takes it.
    server.restart().await;
    for (_, backend) in &replicas {
        timeout(Duration::from_secs(5), backend.sharing().wait_for(|s| *s))
            .await
            .expect("sharing again within 5 s")
            .unwrap();
    }
    let (a, a_backend) = &replicas[0];
    wait_for_limit(a, a_backend, 2).await;
    assert_eq!(limit_of(&replicas[1].0), Some(2));
}

// ---------------------------------------------------------------------------------------
// At scale: calls per request, heal after a kill, outages
// ---------------------------------------------------------------------------------------

/// Calls clients sent (`INFO commandstats` also counts the commands scripts run): the
/// scripts, their loading, pings, subscriptions and the connection's set-up.
fn client_calls(stats: &std::collections::HashMap<String, u64>) -> u64 {
    const CLIENT: [&str; 8] = [
        "evalsha",
        "eval",
        "script",
        "ping",
        "subscribe",
        "client",
        "hello",
        "select",
    ];
    stats
        .iter()
        .filter(|(name, _)| CLIENT.contains(&name.split('|').next().unwrap_or(name)))
        .map(|(_, calls)| calls)
        .sum()
}

/// `clients` callers spread round `pools`, each sending one request after another (with
/// `work` at the provider) until `requests` were sent in all. The statuses, by replica.
async fn clients(
    pools: &[KeyPool],
    provider: &Provider,
    clients: usize,
    requests: usize,
    work: Duration,
) -> Vec<Vec<u16>> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let left = Arc::new(AtomicUsize::new(requests));
    let tasks: Vec<_> = (0..clients)
        .map(|i| {
            let replica = i % pools.len();
            let pool = pools[replica].clone();
            let provider = provider.clone();
            let left = left.clone();
            tokio::spawn(async move {
                use http_body_util::BodyExt;
                use tower::ServiceExt;
                let mut statuses = Vec::new();
                while left
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                    .is_ok()
                {
                    let service =
                        tower_key_rotation::KeyRotation::new(provider.service(work), pool.clone());
                    let request = http::Request::get("http://provider.test/v1/chat")
                        .body(http_body_util::Empty::<bytes::Bytes>::new())
                        .unwrap();
                    let status = match service.oneshot(request).await {
                        Ok(response) => {
                            let status = response.status().as_u16();
                            response.into_body().collect().await.unwrap();
                            status
                        }
                        Err(_) => 0,
                    };
                    statuses.push(status);
                }
                (replica, statuses)
            })
        })
        .collect();
    let mut by_replica = vec![Vec::new(); pools.len()];
    for task in tasks {
        let (replica, statuses) = task.await.unwrap();
        by_replica[replica].extend(statuses);
    }
    by_replica
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_clients_on_three_replicas_cost_at_most_two_redis_calls_per_request() {
    let server = RedisServer::start().await;
    let provider = Provider::new(2);
    let (pools, _backends) =
        three_replicas(Some(&server), "herd", KEYS, 2, RedisOptions::default()).await;
    let requests = 900;
    let before = server.command_stats();
    let started = Instant::now();
    let statuses = clients(&pools, &provider, 30, requests, Duration::from_millis(10)).await;
    let took = started.elapsed();
    let after = server.command_stats();
    let calls = client_calls(&after) - client_calls(&before);
    let mut others: Vec<_> = after
        .iter()
        .filter(|(name, calls)| before.get(*name) != Some(calls))
        .map(|(name, calls)| (name, calls - before.get(name).unwrap_or(&0)))
        .collect();
    others.sort();
    eprintln!("commands run: {others:?}");
    let count = |name: &str| after.get(name).unwrap_or(&0) - before.get(name).unwrap_or(&0);
    let (served, refused, most) = provider.tally();
    let per_request = calls as f64 / requests as f64;
    eprintln!(
        "30 clients, 3 replicas, cap 2 on 3 keys: {requests} requests in {took:?}; {calls} Redis calls \
         ({per_request:.3} per request: {} EVALSHA, {} EVAL, {} PING), {} PUBLISH ({:.3} per request); \
         {served} served, {refused} refused (429), at most {most} in flight per key",
        count("evalsha"),
        count("eval"),
        count("ping"),
        count("publish"),
        count("publish") as f64 / requests as f64,
    );
    for statuses in &statuses {
        assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    }
    assert_eq!((served, refused), (requests as u32, 0));
    assert!(most <= 2, "{most} in flight on one key");
    // Two per request (admission, release) less the releases batched, plus the
    // heartbeat's few calls a second and any call sent again after missing its budget on
    // a busy machine: 1.95-2.04 measured here (the target is 2).
    assert!(
        per_request <= 2.1,
        "{per_request:.3} Redis calls per request"
    );
    // A grant is announced once, to one replica: never a message per waiter.
    assert!(count("publish") <= requests as u64, "{}", count("publish"));
}

/// The raise back-off in scaled time: ÷100 (5 minutes → 3 s, 1 hour → 36 s).
const SCALE: u32 = 100;

/// `clients` callers spread round `pools`, each sending one request after another (with
/// `work` at the provider) for `run`.
async fn clients_for(
    pools: &[KeyPool],
    provider: &Provider,
    clients: usize,
    run: Duration,
    work: Duration,
) -> u32 {
    let end = Instant::now() + run;
    let tasks: Vec<_> = (0..clients)
        .map(|i| {
            let pool = pools[i % pools.len()].clone();
            let provider = provider.clone();
            tokio::spawn(async move {
                use http_body_util::BodyExt;
                use tower::ServiceExt;
                let mut sent = 0;
                while Instant::now() < end {
                    let service =
                        tower_key_rotation::KeyRotation::new(provider.service(work), pool.clone());
                    let request = http::Request::get("http://provider.test/v1/chat")
                        .body(http_body_util::Empty::<bytes::Bytes>::new())
                        .unwrap();
                    let Ok(answer) = tokio::time::timeout_at(end, service.oneshot(request)).await
                    else {
                        break;
                    };
                    if let Ok(response) = answer {
                        response.into_body().collect().await.unwrap();
                    }
                    sent += 1;
                }
                sent
            })
        })
        .collect();
    let mut sent = 0;
    for task in tasks {
        sent += task.await.unwrap();
    }
    sent
}

/// Three replicas with default flags (learned limits) against a provider allowing 2 in
/// flight per key: refusals in the first burst, then only the single tries of raises, in
/// time scaled by [`SCALE`] for the raise back-off (the provider's `Retry-After: 1` and
/// the first second are not scaled).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_default_flags_three_replicas_learn_each_limit_together_and_try_one_raise_at_a_time() {
    if std::env::var_os("TKR_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing_subscriber::filter::LevelFilter::DEBUG)
            .with_test_writer()
            .try_init();
    }
    let server = RedisServer::start().await;
    let provider = Provider::new(2).retry_after("1");
    let backoff = tower_key_rotation::Backoff::default()
        .raise_wait(Duration::from_secs(300) / SCALE)
        .max_raise_wait(Duration::from_secs(3600) / SCALE);
    let mut pools = Vec::new();
    let mut backends = Vec::new();
    // A generous budget: this test is about learning, not about a busy machine's delays
    // (a call past its budget would open the breaker, and each replica decide alone).
    let mut options = options("learn-together");
    options.call_timeout = Duration::from_secs(1);
    for _ in 0..3 {
        let backend = RedisBackend::new(&server.url(), SECRET, options.clone()).unwrap();
        assert!(backend.connect().await);
        // Default flags: no cap, limits learned.
        pools.push(
            KeyPool::builder(KeySet::parse(KEYS).unwrap())
                .backoff(backoff)
                .state_backend(backend.clone())
                .build(),
        );
        backends.push(backend);
    }
    for backend in &backends {
        timeout(Duration::from_secs(5), backend.subscribed())
            .await
            .unwrap();
    }
    let run = Duration::from_secs(16);
    let before = server.command_stats();
    let started = Instant::now();
    let sent = clients_for(&pools, &provider, 12, run, Duration::from_millis(40)).await;
    let calls = client_calls(&server.command_stats()) - client_calls(&before);
    let (served, refused, most) = provider.tally();
    let refusals = provider.refusals();
    let at = |when: Instant| when.duration_since(started).as_secs_f64();
    let mut by_key: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
    for (key, when) in &refusals {
        by_key.entry(key).or_default().push(at(*when));
    }
    eprintln!(
        "3 replicas, default flags, {run:?}: {sent} requests, {served} served, {refused} refused \
         (at most {most} in flight on a key), {:.2} Redis calls per request; refusals (s): {by_key:?}; \
         limits {:?}",
        calls as f64 / f64::from(sent),
        pools
            .iter()
            .map(|pool| pool
                .snapshot()
                .iter()
                .map(|key| key.concurrency_limit)
                .collect::<Vec<_>>())
            .collect::<Vec<_>>()
    );
    assert!(refused > 0, "the provider's limit was found by refusals");
    for (key, times) in &by_key {
        // After the first second: tries above the limit, one request each, the first
        // (scaled) five minutes after the limit was learned, each refused try doubling
        // the wait before the next: 2 in the run (at 3 s and 9 s), and room for one rest
        // and probe more. Without the shared back-off and single try, 4-9 a key, in
        // bursts. In about one run in three on a loaded machine, a refusal right after
        // the first rest, or a refused try read as a lowering, comes 1-3 s after the one
        // before it: the room for two more.
        let late: Vec<f64> = times.iter().copied().filter(|&t| t >= 1.0).collect();
        assert!(
            late.len() <= 4,
            "key {key}: {} refusals after the first second: {times:?}",
            late.len()
        );
    }
    // Every replica holds the same limit of each key, the one the store keeps: the
    // provider's, one more while a try runs, or one less when a refusal read a count
    // short (raised again after the back-off).
    let limits: Vec<Vec<Option<u32>>> = pools
        .iter()
        .map(|pool| {
            pool.snapshot()
                .iter()
                .map(|key| key.concurrency_limit)
                .collect()
        })
        .collect();
    for limits in &limits {
        assert_eq!(
            limits,
            &limits_of_first(&pools),
            "{:?}",
            pools[0].snapshot()
        );
        assert!(
            limits.iter().all(|limit| matches!(limit, Some(1..=3))),
            "{limits:?}"
        );
    }
}

/// Each key's concurrency limit in the first of `pools`.
fn limits_of_first(pools: &[KeyPool]) -> Vec<Option<u32>> {
    pools[0]
        .snapshot()
        .iter()
        .map(|key| key.concurrency_limit)
        .collect()
}

/// Keys without a cap cost the store nothing per request once their learning window is
/// over (a provider that never refuses): the store counts them, two calls a request, only
/// while their limit may be learned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_without_a_cap_are_counted_by_redis_only_in_their_learning_window() {
    let server = RedisServer::start().await;
    let provider = Provider::new(1000);
    let window = Duration::from_millis(1500);
    let mut pools = Vec::new();
    for _ in 0..3 {
        let mut options = options("window");
        options.learning_window = window;
        let backend = RedisBackend::new(&server.url(), SECRET, options).unwrap();
        assert!(backend.connect().await);
        pools.push(
            KeyPool::builder(KeySet::parse(KEYS).unwrap())
                .state_backend(backend.clone())
                .build(),
        );
        timeout(Duration::from_secs(5), backend.subscribed())
            .await
            .unwrap();
    }
    let started = Instant::now();
    let mut per_request = Vec::new();
    for run in [Duration::from_millis(1000), Duration::from_millis(2000)] {
        let before = server.command_stats();
        let sent = clients_for(&pools, &provider, 6, run, Duration::from_millis(5)).await;
        let calls = client_calls(&server.command_stats()) - client_calls(&before);
        per_request.push(calls as f64 / f64::from(sent));
        eprintln!(
            "{:?} after the start: {sent} requests, {calls} Redis calls ({:.3} per request)",
            started.elapsed(),
            per_request.last().unwrap()
        );
        // The window of each key began with the pools: past it after the first run.
        tokio::time::sleep_until(started + window).await;
    }
    assert!(
        per_request[0] >= 1.5,
        "counted in the window: {per_request:?}"
    );
    assert!(
        per_request[1] <= 0.05,
        "only heartbeats after it: {per_request:?}"
    );
    assert_eq!(provider.tally().1, 0);
}

/// A provider stand-in that tells when its in-flight count on any key reaches `mark`
/// after being armed.
#[derive(Clone)]
struct Marker {
    in_flight: std::sync::Arc<std::sync::atomic::AtomicU32>,
    armed: std::sync::Arc<std::sync::atomic::AtomicBool>,
    reached: std::sync::Arc<tokio::sync::Notify>,
    mark: u32,
}

impl Marker {
    fn new(mark: u32) -> Self {
        Self {
            in_flight: Default::default(),
            armed: Default::default(),
            reached: Default::default(),
            mark,
        }
    }

    fn arm(&self) {
        self.armed.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// A caller sending requests of `work` through `pool` until aborted.
    fn caller(&self, pool: KeyPool, work: Duration) -> tokio::task::JoinHandle<()> {
        use std::sync::atomic::Ordering;
        let marker = self.clone();
        tokio::spawn(async move {
            loop {
                use tower::ServiceExt;
                let marker = marker.clone();
                let inner = tower::service_fn(
                    move |_: http::Request<http_body_util::Empty<bytes::Bytes>>| {
                        let marker = marker.clone();
                        async move {
                            let now = marker.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                            if now >= marker.mark && marker.armed.swap(false, Ordering::SeqCst) {
                                marker.reached.notify_one();
                            }
                            tokio::time::sleep(work).await;
                            marker.in_flight.fetch_sub(1, Ordering::SeqCst);
                            Ok::<_, std::convert::Infallible>(http::Response::new(
                                http_body_util::Full::new(bytes::Bytes::from_static(b"ok")),
                            ))
                        }
                    },
                );
                let service = tower_key_rotation::KeyRotation::new(inner, pool.clone());
                let request = http::Request::get("http://provider.test/v1/chat")
                    .body(http_body_util::Empty::<bytes::Bytes>::new())
                    .unwrap();
                let _ = service.oneshot(request).await;
            }
        })
    }
}

/// The counts the store keeps for the namespace's keys: (replica, count) per entry.
fn stored_counts(server: &RedisServer, namespace: &str) -> Vec<(String, u64)> {
    let mut counts = Vec::new();
    for key in server
        .cli(&["--scan", "--pattern", &format!("tkr:{namespace}:*:c")])
        .lines()
    {
        let fields: Vec<String> = server
            .cli(&["HGETALL", key])
            .lines()
            .map(str::to_owned)
            .collect();
        for pair in fields.chunks(2) {
            if let [replica, value] = pair {
                let count = value.split(':').next().unwrap().parse().unwrap();
                counts.push((replica.clone(), count));
            }
        }
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replicas_slots_come_back_within_ttl_and_a_heartbeat_twenty_times_over() {
    let server = RedisServer::start().await;
    let mut options = RedisOptions::default();
    options.namespace = "kill".to_owned();
    // A generous budget: this test is about the heal, not about a busy machine's delays.
    options.call_timeout = Duration::from_secs(1);
    options.heartbeat = Duration::from_millis(200);
    options.ttl = Duration::from_secs(1);
    let bound = options.ttl + options.heartbeat;
    let cap = 3;
    let pool = move |backend: RedisBackend| {
        KeyPool::builder(KeySet::parse("sk-one").unwrap())
            .max_in_flight_per_key(cap)
            .state_backend(backend)
            .build()
    };

    // Two live replicas, two callers each: their counts change all the time, and two of
    // their callers always wait (the third slot is the dying replica's).
    let marker = Marker::new(cap);
    let mut live = Vec::new();
    let mut callers = Vec::new();
    for _ in 0..2 {
        let backend = RedisBackend::new(&server.url(), SECRET, options.clone()).unwrap();
        assert!(backend.connect().await);
        let pool = pool(backend.clone());
        timeout(Duration::from_secs(5), backend.subscribed())
            .await
            .unwrap();
        for _ in 0..2 {
            callers.push(marker.caller(pool.clone(), Duration::from_millis(5)));
        }
        live.push(pool);
    }

    let mut heals = Vec::new();
    for _ in 0..20 {
        // The replica that dies: its own runtime, one slot admitted (its request never
        // ends), then gone without a word: its runtime dropped, its connections closed.
        let (admitted, killed) = (std::sync::mpsc::channel(), std::sync::mpsc::channel::<()>());
        let (url, dying) = (server.url(), options.clone());
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Runtime::new().unwrap();
            runtime.block_on(async {
                let backend = RedisBackend::new(&url, SECRET, dying).unwrap();
                assert!(backend.connect().await);
                let pool = pool(backend.clone());
                timeout(Duration::from_secs(5), backend.subscribed())
                    .await
                    .unwrap();
                // Admitted in its turn (a call that misses its budget on a busy machine
                // sends the lease back: it asks again).
                loop {
                    if let Some(lease) = pool.try_reserve() {
                        if let Some(lease) = lease.admit().await {
                            std::mem::forget(lease);
                            break;
                        }
                    }
                    tokio::task::yield_now().await;
                }
                admitted.0.send(()).unwrap();
                let _ = killed.1.recv();
            });
            drop(runtime);
        });
        admitted.1.recv().unwrap();
        marker.arm();
        killed.0.send(()).unwrap();
        let started = Instant::now();
        thread.join().unwrap();
        if timeout(bound * 3, marker.reached.notified()).await.is_err() {
            let queue = server.cli(&["--scan", "--pattern", "tkr:kill:*:w"]);
            let queue = server.cli(&["LRANGE", queue.trim(), "0", "-1"]);
            panic!(
                "the dead replica's slot comes back: after {heals:?}, stuck with {:?}, queue {queue:?}, in flight {:?}",
                stored_counts(&server, "kill"),
                live.iter()
                    .map(|pool| pool.snapshot()[0].in_flight)
                    .collect::<Vec<_>>(),
            );
        }
        heals.push(started.elapsed());
    }
    let worst = *heals.iter().max().unwrap();
    eprintln!(
        "20 kills: slots back after {:?} at best, {worst:?} at worst (ttl 1 s + heartbeat 200 ms)",
        heals.iter().min().unwrap()
    );
    // A little for the test's own scheduling on a busy machine.
    assert!(worst <= bound + Duration::from_millis(150), "{heals:?}");

    // Stopped: every count the store keeps goes back to 0 (no count stuck).
    for caller in callers {
        caller.abort();
        let _ = caller.await;
    }
    let settled = async {
        loop {
            let counts = stored_counts(&server, "kill");
            if counts.iter().all(|(_, count)| *count == 0) {
                return counts;
            }
            // Not a synchronisation: the store is polled from outside.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let counts = timeout(Duration::from_secs(2), settled)
        .await
        .unwrap_or_else(|_| panic!("counts stuck: {:?}", stored_counts(&server, "kill")));
    eprintln!("after the run, the store's counts: {counts:?}");
    for pool in &live {
        assert_eq!(pool.snapshot()[0].in_flight, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_with_only_waiting_leases_notices_a_hung_redis_within_500_ms() {
    let server = RedisServer::start().await;
    let (holder, _) = replica(&server, "hung", Some(1)).await;
    let (waiter, waiter_backend) = replica(&server, "hung", Some(1)).await;
    let held = holder.try_reserve_where(|p| p == 1).unwrap();
    let held = held.admit().await.expect("admitted");
    // The waiter's lease is queued: it makes no call of its own from now on.
    let queued = waiter.try_reserve_where(|p| p == 1).unwrap();
    let mut admit = Box::pin(queued.admit());
    assert!(
        timeout(Duration::from_millis(200), &mut admit)
            .await
            .is_err()
    );

    // Hung, not gone: its connections stay open, and nothing answers.
    server.signal("STOP");
    let started = Instant::now();
    let mut sharing = waiter_backend.sharing();
    timeout(Duration::from_secs(3), sharing.wait_for(|s| !s))
        .await
        .expect("degraded")
        .unwrap();
    let noticed = started.elapsed();
    server.signal("CONT");
    eprintln!("a replica with only a waiting lease noticed a hung Redis after {noticed:?}");
    assert!(noticed <= Duration::from_millis(500), "{noticed:?}");
    assert!(!waiter.backend_health().unwrap().connected);
    // The waiting lease looks again, under the degraded policy.
    assert!(admit.await.is_none());
    drop(held);
}

/// Three replicas with a cap of 2 on 3 keys, 9 clients, Redis killed for `outage`: every
/// replica serves throughout, no client fails.
async fn outage_under_load(outage: Duration) {
    let mut server = RedisServer::start().await;
    let mut options = RedisOptions::default();
    options.heartbeat = Duration::from_millis(200);
    let provider = Provider::new(2);
    let (pools, backends) = three_replicas(Some(&server), "down", KEYS, 2, options).await;
    let work = Duration::from_millis(10);
    let before = clients(&pools, &provider, 9, 90, work).await;

    server.kill().await;
    let started = Instant::now();
    for backend in &backends {
        timeout(
            Duration::from_millis(500),
            backend.sharing().wait_for(|s| !s),
        )
        .await
        .expect("degraded within 500 ms")
        .unwrap();
    }
    eprintln!("all three degraded after {:?}", started.elapsed());
    // Under load for the whole outage.
    let mut during = vec![Vec::new(); 3];
    while started.elapsed() < outage {
        for (replica, statuses) in clients(&pools, &provider, 9, 90, work)
            .await
            .into_iter()
            .enumerate()
        {
            during[replica].extend(statuses);
        }
    }
    server.restart().await;
    for backend in &backends {
        if timeout(Duration::from_secs(5), backend.sharing().wait_for(|s| *s))
            .await
            .is_err()
        {
            panic!("sharing again within 5 s: {:?}", backend.last_failure());
        }
    }
    let after = clients(&pools, &provider, 9, 90, work).await;
    let (served, refused, most) = provider.tally();
    let total: usize = during.iter().map(Vec::len).sum();
    let shares: Vec<f64> = during
        .iter()
        .map(|statuses| statuses.len() as f64 / total as f64)
        .collect();
    eprintln!(
        "Redis down {outage:?}: {total} requests during it, shares by replica {shares:.2?}; \
         {served} served, {refused} refused (429), at most {most} in flight per key"
    );
    for statuses in before.iter().chain(&during).chain(&after) {
        assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    }
    assert!(shares.iter().all(|&share| share >= 0.2), "{shares:?}");
    assert_eq!(refused, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_under_load_every_replica_serves_and_no_client_fails() {
    outage_under_load(Duration::from_secs(3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a minute long: run with --ignored"]
async fn redis_down_a_minute_under_load_every_replica_serves_and_no_client_fails() {
    outage_under_load(Duration::from_secs(60)).await;
}

#[cfg(feature = "redis-cluster")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_keep_each_keys_cap_between_them_on_a_three_master_redis_cluster() {
    let cluster = test_support::RedisCluster::start().await;
    let urls = cluster.urls();
    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
    let work = Duration::from_millis(20);
    let models = ["model-a", "model-b"];

    let mut pools = Vec::new();
    let mut backends = Vec::new();
    for _ in 0..3 {
        let backend = RedisBackend::cluster(&urls, SECRET, options("cluster")).unwrap();
        assert!(backend.connect().await, "{:?}", backend.last_failure());
        pools.push(
            KeyPool::builder(KeySet::parse(KEYS).unwrap())
                .max_in_flight_per_key(2)
                .router(ByModel)
                .state_backend(backend.clone())
                .build(),
        );
        backends.push(backend);
    }
    for backend in &backends {
        timeout(Duration::from_secs(5), backend.subscribed())
            .await
            .unwrap();
    }
    let provider = Provider::new(2);
    let before = cluster.command_stats();
    // Keys alone, then keys × models.
    let mut statuses = load(&pools, &provider, 300, work).await;
    statuses.extend(load_models(&pools, &provider, 600, work, &models).await);
    let after = cluster.command_stats();
    let (served, refused, most) = provider.tally();
    let calls = (client_calls(&after) - client_calls(&before)) as f64 / 900.0;
    eprintln!(
        "on a three-master cluster: {served} served, {refused} refused (429), at most {most} \
         in flight per key (and model), {calls:.2} Redis calls per request"
    );
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    assert_eq!((served, refused), (900, 0));
    assert!(most <= 2, "{most} in flight on one key");
    // The keys' records are spread over the masters (each script's on one of them).
    let holding = cluster
        .ports
        .iter()
        .filter(|port| {
            let keys = std::process::Command::new("redis-cli")
                .args([
                    "-p",
                    &port.to_string(),
                    "--scan",
                    "--pattern",
                    "tkr:cluster:*",
                ])
                .output()
                .unwrap();
            !keys.stdout.is_empty()
        })
        .count();
    assert!(holding >= 2, "the records sit on {holding} of 3 masters");
    for pool in &pools {
        assert!(pool.snapshot().iter().all(|key| key.in_flight == 0));
        assert!(!pool.backend_health().unwrap().degraded);
    }
}
