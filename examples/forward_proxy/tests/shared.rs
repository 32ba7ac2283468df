//! Three forward proxy processes sharing 3 keys through a real `redis-server`, in front
//! of a local provider stand-in allowing 2 requests in flight per key (more get `429`):
//! together they never exceed it, where three proxies on their own do; a replica killed
//! with SIGKILL frees its slots within the TTL; the Redis URL's password never shows.

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
}

/// A request the stand-in works on.
struct Working {
    ledger: Arc<Mutex<Ledger>>,
    key: String,
}

impl Drop for Working {
    fn drop(&mut self) {
        let mut ledger = self.ledger.lock().unwrap();
        *ledger.in_flight.get_mut(&self.key).unwrap() -= 1;
        ledger.total -= 1;
    }
}

/// A provider allowing 2 requests in flight per key; `429` with `Retry-After: 1` beyond.
/// The watch counts the answers it sent.
async fn provider() -> (MockUpstream, Arc<Mutex<Ledger>>, watch::Receiver<u32>) {
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let (answered, answers) = watch::channel(0u32);
    let shared = ledger.clone();
    let upstream = MockUpstream::start(move |seen: Seen| {
        let ledger = shared.clone();
        let answered = answered.clone();
        async move {
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
            let _working = Working { ledger, key };
            tokio::time::sleep(WORK).await;
            answered.send_modify(|n| *n += 1);
            reply(200, "{\"choices\":[]}")
        }
    })
    .await;
    (upstream, ledger, answers)
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_killed_mid_run_frees_its_slots_within_the_ttl_and_no_request_is_refused() {
    let redis = RedisServer::start().await;
    let (upstream, ledger, mut answers) = provider().await;
    let proxies = replicas(&upstream, Some(&redis)).await;

    let tasks = spread(&proxies, 300);
    timeout(Duration::from_secs(20), answers.wait_for(|&n| n >= 60))
        .await
        .expect("60 answers")
        .unwrap();
    // kill -9: no release, no goodbye; its leases live on in Redis until the TTL.
    proxies[2].signal("KILL").await;
    let killed = Instant::now();
    let mut lost = 0;
    for task in tasks {
        match task.await.unwrap() {
            Some(status) => assert_eq!(status, 200),
            // Sent to the killed proxy.
            None => lost += 1,
        }
    }
    // The live replicas see the dead one gone once its TTL (5 s) passes; from then its
    // slots are free again: all six serve at once.
    let live = &proxies[..2];
    loop {
        let backend = get(&live[0].url("/_keyrotation/backend")).await.json();
        if backend["replicas"] == 2 {
            break;
        }
        assert!(killed.elapsed() < Duration::from_secs(8), "{backend}");
        // The admin page has no push: look again at the heartbeat's pace.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let freed_after = killed.elapsed();
    ledger.lock().unwrap().most_total = 0;
    for task in spread(live, 60) {
        assert_eq!(task.await.unwrap(), Some(200));
    }
    let ledger = ledger.lock().unwrap();
    eprintln!(
        "killed replica: {lost} requests lost with it, its slots free after {freed_after:?}, then \
         {} in flight at once; {} refused (429) in all",
        ledger.most_total, ledger.refused
    );
    assert_eq!(ledger.refused, 0);
    assert!(ledger.most <= 2);
    assert_eq!(ledger.most_total, 6, "every slot back");
    assert!(freed_after < Duration::from_secs(8), "{freed_after:?}");
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
