//! Three forward proxy processes sharing 3 keys through a real `redis-server`, in front
//! of a local provider stand-in allowing 2 requests in flight per key (more get `429`):
//! together they never exceed it, where three proxies on their own do; a replica killed
//! with SIGKILL frees its slots within the TTL and a heartbeat; the Redis URL's password
//! never shows.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use support::{MockUpstream, Proxy, ProxyConfig, Seen, client, get, post, reply};
use test_support::RedisServer;
use tokio::sync::watch;
use tokio::time::{Instant, timeout};

const KEYS: &str = "rk-one,rk-two,rk-three";
/// How long the stand-in works on an accepted request.
const WORK: Duration = Duration::from_millis(50);

#[derive(Default)]
struct Ledger {
    in_flight: HashMap<String, u32>,
    most: u32,
    total: u32,
    most_total: u32,
    refused: u32,
    served: u32,
    /// Requests in flight marked `x-hold: forever` (worked on until their caller goes).
    held: u32,
}

/// A request the stand-in works on.
struct Working {
    ledger: Arc<Mutex<Ledger>>,
    key: String,
    held: bool,
    changed: Arc<watch::Sender<(u32, u32)>>,
}

impl Drop for Working {
    fn drop(&mut self) {
        let mut ledger = self.ledger.lock().unwrap();
        *ledger.in_flight.get_mut(&self.key).unwrap() -= 1;
        ledger.total -= 1;
        ledger.held -= u32::from(self.held);
        self.changed.send_replace((ledger.total, ledger.held));
    }
}

/// A provider allowing 2 requests in flight per key; `429` with `Retry-After: 1` beyond.
/// The watch counts the answers it sent.
async fn provider() -> (MockUpstream, Arc<Mutex<Ledger>>, watch::Receiver<u32>) {
    let (upstream, ledger, answers, _) = provider_watched().await;
    (upstream, ledger, answers)
}

/// [`provider`], with a watch of (requests in flight, of them held): a request marked
/// `x-hold: forever` is worked on until its caller goes away.
async fn provider_watched() -> (
    MockUpstream,
    Arc<Mutex<Ledger>>,
    watch::Receiver<u32>,
    watch::Receiver<(u32, u32)>,
) {
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let (answered, answers) = watch::channel(0u32);
    let (changed, in_flight) = watch::channel((0u32, 0u32));
    let changed = Arc::new(changed);
    let shared = ledger.clone();
    let upstream = MockUpstream::start(move |seen: Seen| {
        let ledger = shared.clone();
        let answered = answered.clone();
        let changed = changed.clone();
        async move {
            let held = seen.headers.contains_key("x-hold");
            // Limits per key and model, as providers meter them.
            let model = serde_json::from_slice::<serde_json::Value>(&seen.body)
                .ok()
                .and_then(|body| Some(body["model"].as_str()?.to_owned()))
                .unwrap_or_default();
            let key = format!("{} {model}", seen.bearer().unwrap_or_default());
            let accepted = {
                let mut ledger = ledger.lock().unwrap();
                let count = ledger.in_flight.entry(key.clone()).or_default();
                let accepted = *count < 2;
                if accepted {
                    *count += 1;
                    let now = *count;
                    ledger.most = ledger.most.max(now);
                    ledger.total += 1;
                    ledger.most_total = ledger.most_total.max(ledger.total);
                    ledger.served += 1;
                    ledger.held += u32::from(held);
                    changed.send_replace((ledger.total, ledger.held));
                } else {
                    ledger.refused += 1;
                }
                accepted
            };
            if !accepted {
                let mut response = reply(429, "{\"error\":{\"message\":\"too many requests\"}}");
                response
                    .headers_mut()
                    .insert("retry-after", "1".parse().unwrap());
                return response;
            }
            // Ends when the work does, or when the caller goes away (a killed proxy).
            let _working = Working {
                ledger,
                key,
                held,
                changed,
            };
            if held {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(WORK).await;
            answered.send_modify(|n| *n += 1);
            reply(200, "{\"choices\":[]}")
        }
    })
    .await;
    (upstream, ledger, answers, in_flight)
}

/// Three proxies over [`KEYS`] capped at 2 per key, sharing through `redis` if given
/// (its URL in `REDIS_URL`, with a password).
async fn replicas(upstream: &MockUpstream, redis: Option<&RedisServer>) -> Vec<Proxy> {
    replicas_at(upstream, redis.map(RedisServer::url)).await
}

/// [`replicas`], sharing through the Redis at `url` (several: a cluster's nodes).
async fn replicas_at(upstream: &MockUpstream, url: Option<String>) -> Vec<Proxy> {
    let mut proxies = Vec::new();
    for _ in 0..3 {
        let mut config =
            ProxyConfig::new(&upstream.url(""), KEYS).arg("--max-in-flight-per-key", "2");
        if let Some(url) = &url {
            config = config
                .env("REDIS_URL", url)
                .arg("--redis-namespace", "proxies")
                .env("REPLICA_SECRET", "replica-secret-value")
                .arg("--redis-secret-env", "REPLICA_SECRET");
        }
        proxies.push(config.start().await);
    }
    proxies
}

/// `n` chat requests at once, spread round the proxies; each one's status (`None` if the
/// proxy it went to is gone).
fn spread(proxies: &[Proxy], n: usize) -> Vec<tokio::task::JoinHandle<Option<u16>>> {
    spread_models(proxies, n, &["glm-4"])
}

/// [`spread`], the `i`-th request for the model `models[i % models.len()]`.
fn spread_models(
    proxies: &[Proxy],
    n: usize,
    models: &[&str],
) -> Vec<tokio::task::JoinHandle<Option<u16>>> {
    (0..n)
        .map(|i| {
            let url = proxies[i % proxies.len()].url("/chat/completions");
            let body = format!("{{\"model\":\"{}\"}}", models[i % models.len()]);
            tokio::spawn(async move {
                let request = http::Request::post(url)
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(body)))
                    .unwrap();
                let response = timeout(Duration::from_secs(30), client().request(request))
                    .await
                    .expect("an answer within 30 s")
                    .ok()?;
                let status = response.status().as_u16();
                response.into_body().collect().await.ok()?;
                Some(status)
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_proxies_sharing_through_redis_send_no_request_the_provider_refuses() {
    let redis = RedisServer::start().await;
    let (upstream, ledger, _) = provider().await;
    let proxies = replicas(&upstream, Some(&redis)).await;
    let backend = get(&proxies[0].url("/_keyrotation/backend")).await.json();
    assert_eq!(backend["backend"], "redis");
    assert_eq!(backend["connected"], true);

    let started = Instant::now();
    let mut statuses = Vec::new();
    for task in spread(&proxies, 300) {
        statuses.push(task.await.unwrap().expect("an answer"));
    }
    let elapsed = started.elapsed();
    let (served, refused, most) = {
        let ledger = ledger.lock().unwrap();
        (ledger.served, ledger.refused, ledger.most)
    };
    eprintln!(
        "3 proxies sharing through Redis: {served} served, {refused} refused (429), at most \
         {most} in flight per key, {elapsed:?}"
    );
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    assert_eq!((served, refused), (300, 0));
    assert!(most <= 2);
    let backend = get(&proxies[1].url("/_keyrotation/backend")).await.json();
    assert_eq!(backend["replicas"], 3);
    let metrics = get(&proxies[2].url("/_keyrotation/metrics")).await.body;
    assert!(
        metrics.contains("keyrotation_backend_replicas 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("keyrotation_backend_degraded 0"),
        "{metrics}"
    );

    // The control: the same three proxies, each on its own.
    let (upstream, ledger, _) = provider().await;
    let proxies = replicas(&upstream, None).await;
    for task in spread(&proxies, 300) {
        task.await.unwrap();
    }
    let refused = ledger.lock().unwrap().refused;
    eprintln!("3 proxies on their own: {refused} refused (429)");
    assert!(
        refused > 0,
        "alone, the replicas exceed the provider's limit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_proxies_routing_by_model_share_each_key_and_models_cap_through_redis() {
    // The provider meters each key per model (2 in flight each); the proxies meter each
    // key per model too (buckets, on by default), and share every (key, model) through
    // Redis.
    let models = ["glm-4-plus", "glm-4-flash"];
    let redis = RedisServer::start().await;
    let (upstream, ledger, _) = provider().await;
    let proxies = replicas(&upstream, Some(&redis)).await;
    let mut statuses = Vec::new();
    for task in spread_models(&proxies, 600, &models) {
        statuses.push(task.await.unwrap().expect("an answer"));
    }
    let (served, refused, most) = {
        let ledger = ledger.lock().unwrap();
        (ledger.served, ledger.refused, ledger.most)
    };
    eprintln!(
        "3 proxies routing by model through Redis: {served} served, {refused} refused (429), \
         at most {most} in flight per key and model"
    );
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    assert_eq!((served, refused), (600, 0));
    assert!(most <= 2);
    let keys = get(&proxies[0].url("/_keyrotation/keys")).await.body;
    for model in models {
        assert!(keys.contains(model), "{keys}");
    }

    // The control: the same three proxies, each on its own.
    let (upstream, ledger, _) = provider().await;
    let proxies = replicas(&upstream, None).await;
    for task in spread_models(&proxies, 600, &models) {
        task.await.unwrap();
    }
    let refused = ledger.lock().unwrap().refused;
    eprintln!("3 proxies routing by model on their own: {refused} refused (429)");
    assert!(
        refused > 0,
        "alone, the replicas exceed the provider's limit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_proxies_share_through_a_three_master_redis_cluster() {
    let cluster = test_support::RedisCluster::start().await;
    let (upstream, ledger, _) = provider().await;
    let proxies = replicas_at(&upstream, Some(cluster.urls().join(","))).await;
    let backend = get(&proxies[0].url("/_keyrotation/backend")).await.json();
    assert_eq!(backend["connected"], true, "{backend}");
    let mut statuses = Vec::new();
    for task in spread_models(&proxies, 600, &["glm-4-plus", "glm-4-flash"]) {
        statuses.push(task.await.unwrap().expect("an answer"));
    }
    let (served, refused, most) = {
        let ledger = ledger.lock().unwrap();
        (ledger.served, ledger.refused, ledger.most)
    };
    eprintln!(
        "3 proxies on a three-master Redis Cluster: {served} served, {refused} refused (429), \
         at most {most} in flight per key and model"
    );
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    assert_eq!((served, refused), (600, 0));
    assert!(most <= 2);
}

/// A proxy over [`KEYS`] capped at 2 per key, sharing through `redis` with a TTL of 1 s and a
/// heartbeat of 200 ms.
async fn quick_replica(upstream: &MockUpstream, redis: &RedisServer) -> Proxy {
    ProxyConfig::new(&upstream.url(""), KEYS)
        .arg("--max-in-flight-per-key", "2")
        .env("REDIS_URL", &redis.url())
        .arg("--redis-namespace", "kills")
        .arg("--redis-ttl", "1")
        .arg("--redis-heartbeat", "0.2")
        .env("REPLICA_SECRET", "replica-secret-value")
        .arg("--redis-secret-env", "REPLICA_SECRET")
        .start()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_killed_mid_run_frees_its_slots_within_ttl_and_a_heartbeat_twenty_times_over() {
    let redis = RedisServer::start().await;
    let (upstream, ledger, _, mut in_flight) = provider_watched().await;
    // Short, so that twenty kills take seconds: `--redis-ttl 1 --redis-heartbeat 0.2`.
    let bound = Duration::from_millis(1200);
    let live = [
        quick_replica(&upstream, &redis).await,
        quick_replica(&upstream, &redis).await,
    ];
    // Twelve callers on the live proxies, one request after another: all six slots (3
    // keys × 2) busy, and more waiting.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let callers: Vec<_> = (0..12)
        .map(|i| {
            let url = live[i % 2].url("/chat/completions");
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut statuses = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let request = http::Request::post(&url)
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from_static(b"{\"model\":\"glm-4\"}")))
                        .unwrap();
                    let response = client().request(request).await.unwrap();
                    statuses.push(response.status().as_u16());
                    response.into_body().collect().await.unwrap();
                }
                statuses
            })
        })
        .collect();

    let mut heals = Vec::new();
    for _ in 0..20 {
        // A third replica, whose two requests the provider holds until it dies.
        let dying = quick_replica(&upstream, &redis).await;
        let held: Vec<_> = (0..2)
            .map(|_| {
                let request = http::Request::post(dying.url("/chat/completions"))
                    .header("content-type", "application/json")
                    .header("x-hold", "forever")
                    .body(Full::new(Bytes::from_static(b"{\"model\":\"glm-4\"}")))
                    .unwrap();
                tokio::spawn(client().request(request))
            })
            .collect();
        timeout(
            Duration::from_secs(10),
            in_flight.wait_for(|&(_, held)| held == 2),
        )
        .await
        .expect("the dying replica's two requests admitted within 10 s")
        .unwrap();
        // kill -9: no release, no goodbye; its slots live on in Redis until the TTL.
        dying.signal("KILL").await;
        let killed = Instant::now();
        // Its requests end at the provider (their connection closed), and its slots come
        // back to the live replicas: six of theirs in flight again.
        let healed = in_flight.wait_for(|&(total, held)| held == 0 && total == 6);
        if timeout(bound * 5, healed).await.is_err() {
            panic!(
                "slots back within {:?} after {heals:?}; in flight now {:?}",
                bound * 5,
                *in_flight.borrow()
            );
        }
        heals.push(killed.elapsed());
        for request in held {
            assert!(request.await.unwrap().is_err(), "its proxy is gone");
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut statuses = Vec::new();
    for caller in callers {
        statuses.extend(caller.await.unwrap());
    }
    let worst = *heals.iter().max().unwrap();
    let (refused, most) = {
        let ledger = ledger.lock().unwrap();
        (ledger.refused, ledger.most)
    };
    eprintln!(
        "20 kills of a proxy (ttl 1 s, heartbeat 200 ms): slots back after {:?} at best, \
         {worst:?} at worst; {} requests served to the live proxies' callers, {refused} refused \
         (429), at most {most} in flight per key",
        heals.iter().min().unwrap(),
        statuses.len()
    );
    assert!(statuses.iter().all(|&s| s == 200));
    assert_eq!(refused, 0);
    assert!(most <= 2);
    // TTL + one heartbeat, and a little for the test's own scheduling on a busy machine.
    assert!(worst <= bound + Duration::from_millis(150), "{heals:?}");
}

#[tokio::test]
async fn the_redis_password_never_shows_in_logs_admin_or_metrics() {
    let (upstream, _, _) = provider().await;
    // Nothing listens on port 1: the proxy starts degraded and says so, without the URL.
    let mut proxy = ProxyConfig::new(&upstream.url(""), KEYS)
        .env(
            "REDIS_URL",
            "redis://admin:hunter2-redis-pass@127.0.0.1:1/0",
        )
        .start()
        .await;
    proxy.wait_for_log("Redis unreachable at start").await;
    let backend = get(&proxy.url("/_keyrotation/backend")).await;
    assert_eq!(backend.json()["degraded"], true);
    let metrics = get(&proxy.url("/_keyrotation/metrics")).await;
    assert!(metrics.body.contains("keyrotation_backend_degraded 1"));
    // Requests still go (split policy, no cap).
    assert_eq!(
        post(&proxy.url("/chat/completions"), "{}").await.status,
        200
    );
    for text in [proxy.log(), backend.text(), metrics.text()] {
        support::assert_no_secret("the proxy", &text, &["hunter2-redis-pass", "admin:"]);
    }

    // A URL that is not one: the error names the flag, not the value.
    let (status, _, stderr) = ProxyConfig::new(&upstream.url(""), KEYS)
        .arg("--redis-url", "mongodb://root:hunter2-redis-pass@db")
        .run_to_exit()
        .await;
    assert!(!status.success());
    assert!(stderr.contains("--redis-url"), "{stderr}");
    support::assert_no_secret("the error", &stderr, &["hunter2-redis-pass"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_share_through_redis_over_tls_and_a_refused_certificate_is_a_clear_error() {
    let redis = RedisServer::start_tls(
        &support::tls_path("leaf.pem"),
        &support::tls_path("leaf.key"),
    )
    .await;
    assert!(redis.url().starts_with("rediss://"));
    let (upstream, ledger, _) = provider().await;
    let mut proxies = Vec::new();
    for _ in 0..3 {
        let config = ProxyConfig::new(&upstream.url(""), KEYS)
            .arg("--max-in-flight-per-key", "2")
            .env("REDIS_URL", &redis.url())
            .arg("--redis-ca", &support::test_ca_path())
            .arg("--redis-namespace", "tls");
        proxies.push(config.start().await);
    }
    let backend = get(&proxies[0].url("/_keyrotation/backend")).await.json();
    assert_eq!(backend["connected"], true, "{backend}");
    for task in spread(&proxies, 150) {
        assert_eq!(task.await.unwrap(), Some(200));
    }
    let (served, refused, most) = {
        let ledger = ledger.lock().unwrap();
        (ledger.served, ledger.refused, ledger.most)
    };
    eprintln!("3 proxies sharing over TLS: {served} served, {refused} refused, at most {most}");
    assert_eq!((served, refused), (150, 0));
    assert!(most <= 2);
    let backend = get(&proxies[2].url("/_keyrotation/backend")).await.json();
    assert_eq!(backend["replicas"], 3, "{backend}");

    // A certificate the proxy cannot trust: the public roots alone (the test CA is not
    // one), or the wrong CA. It exits with one line naming the server, never the password.
    let url = format!(
        "rediss://admin:hunter2-redis-pass@127.0.0.1:{}/0",
        redis.port
    );
    for ca in [None, Some("self-signed.pem")] {
        let mut config = ProxyConfig::new(&upstream.url(""), KEYS).env("REDIS_URL", &url);
        if let Some(ca) = ca {
            config = config.arg("--redis-ca", &support::tls_path(ca));
        }
        let (status, stdout, stderr) = config.run_to_exit().await;
        assert_eq!(status.code(), Some(1), "{ca:?}: {stderr}");
        let server = format!("Redis at 127.0.0.1:{}", redis.port);
        assert!(
            stderr.contains(&server) && stderr.contains("signed by an unknown issuer"),
            "{ca:?}: {stderr}"
        );
        support::assert_no_secret(
            "the error",
            &format!("{stdout}{stderr}"),
            &["hunter2-redis-pass", "admin:"],
        );
    }
}
