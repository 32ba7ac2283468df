//! Wait, don't bounce: the proxy, started with the README's defaults (no limits set by
//! hand), in front of a local provider stand-in that enforces a per-key limit the way the
//! real ones do: at most 2 requests in flight per key, more are refused with `429` and
//! `Retry-After: 1`. Callers must all get their answer, with refusals only in the first
//! burst, while the proxy learns the limit and waits for capacity.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::limited::{Ledger, limited_provider};
use support::{Got, MockUpstream, ProxyConfig, Seen, get, keys, post, reply};
use tokio::time::Instant;

const KEYS: [&str; 3] = ["wk-one", "wk-two", "wk-three"];

/// A provider allowing `limit` requests in flight per key; more get `429` with
/// `Retry-After: 1`.
async fn limited(limit: u32) -> (MockUpstream, Arc<Mutex<Ledger>>) {
    limited_provider(&KEYS, limit, "1", |_| reply(200, "{\"choices\":[]}")).await
}

/// `n` concurrent chat requests; their answers and the wall time.
async fn burst(url: &str, n: usize) -> (Vec<Got>, Duration) {
    let started = Instant::now();
    let requests: Vec<_> = (0..n)
        .map(|_| {
            let url = url.to_owned();
            tokio::spawn(async move { post(&url, "{\"model\":\"glm-4\"}").await })
        })
        .collect();
    let mut answers = Vec::new();
    for request in requests {
        answers.push(request.await.unwrap());
    }
    (answers, started.elapsed())
}

fn statuses(answers: &[Got]) -> Vec<u16> {
    answers.iter().map(|got| got.status.as_u16()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_key_ten_callers_all_succeed_with_default_settings() {
    let (upstream, ledger) = limited(2).await;
    let proxy = ProxyConfig::new(&upstream.url(""), KEYS[0]).start().await;

    let (answers, elapsed) = burst(&proxy.url("/chat/completions"), 10).await;
    assert_eq!(statuses(&answers), [200; 10]);
    let ledger = ledger.lock().unwrap().clone();
    // Refusals only in the first burst: 10 went at once, 2 were taken.
    assert!(ledger.refused() <= 8, "{} refusals", ledger.refused());
    let first_refusal = ledger
        .arrivals
        .iter()
        .find(|(_, _, refused)| *refused)
        .map(|(_, at, _)| *at)
        .expect("the first burst met the limit");
    assert!(
        ledger
            .arrivals
            .iter()
            .filter(|(_, _, refused)| *refused)
            .all(|(_, at, _)| at.duration_since(first_refusal) < Duration::from_millis(500)),
        "a refusal after the first burst"
    );
    // Ideal: 1 s rest, the probe, then 2 at a time (~2.5 s); a loaded machine adds some.
    assert!(elapsed < Duration::from_secs(6), "took {elapsed:?}");
    // The proxy learned the limit and shows it, in the admin JSON and the metrics, with
    // the time the requests waited.
    let keys = keys(&proxy).await;
    assert_eq!(keys[0]["concurrency_limit"], 2);
    let metrics = get(&proxy.url("/_keyrotation/metrics")).await.body;
    let line = |name: &str| {
        metrics
            .lines()
            .find(|line| line.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} in {metrics}"))
            .to_owned()
    };
    assert!(
        line("keyrotation_key_concurrency_limit{").ends_with(" 2.0"),
        "{metrics}"
    );
    let waited: u64 = line("keyrotation_wait_seconds_count")
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        waited >= 8,
        "{waited} requests waited; the 8 refused had to"
    );
    assert_eq!(
        line("keyrotation_requests_waiting "),
        "keyrotation_requests_waiting 0.0"
    );
    // Every answer we retried or waited for tells SDKs not to retry it again.
    assert!(
        answers
            .iter()
            .any(|got| got.headers.contains_key("x-should-retry"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_keys_twenty_callers_all_succeed_with_default_settings() {
    let (upstream, ledger) = limited(2).await;
    let proxy = ProxyConfig::new(&upstream.url(""), &KEYS.join(","))
        .start()
        .await;

    let (answers, elapsed) = burst(&proxy.url("/chat/completions"), 20).await;
    let ledger = ledger.lock().unwrap().clone();
    let first = ledger.arrivals[0].1;
    let timeline = ledger.timeline(&KEYS);
    assert_eq!(statuses(&answers), [200; 20], "{timeline:?}");
    // 20 went at once and 6 were taken; a refused request's retry may go to another key
    // before that key's own refusals come back, and be refused there too: more refusals,
    // but all in the first burst, and each request tries each key at most once in it.
    assert!(ledger.refused() <= 14 * 3, "{} refusals", ledger.refused());
    let late_refusals: Vec<_> = ledger
        .arrivals
        .iter()
        .filter(|(_, at, refused)| {
            *refused && at.duration_since(first) > Duration::from_millis(500)
        })
        .collect();
    assert!(
        late_refusals.is_empty(),
        "refused after the first burst: {timeline:?}"
    );
    assert!(elapsed < Duration::from_secs(6), "took {elapsed:?}");
    let keys = keys(&proxy).await;
    for key in &keys {
        assert_eq!(key["concurrency_limit"], 2, "{key}");
        assert_eq!(key["in_flight"], 0, "{key}");
    }
}

/// Every key refuses its first request with `Retry-After: secs`, then serves.
async fn refuses_once(secs: &'static str) -> (MockUpstream, Arc<Mutex<Ledger>>) {
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let shared = ledger.clone();
    let upstream = MockUpstream::start(move |seen: Seen| {
        let ledger = shared.clone();
        async move {
            let key = seen.bearer().unwrap_or_default();
            let mut ledger = ledger.lock().unwrap();
            let first = !ledger.arrivals.iter().any(|(k, _, _)| *k == key);
            ledger.arrivals.push((key, Instant::now(), first));
            if first {
                let mut response = reply(429, "{\"error\":{\"message\":\"slow down\"}}");
                response
                    .headers_mut()
                    .insert("retry-after", secs.parse().unwrap());
                response
            } else {
                reply(200, "{\"ok\":true}")
            }
        }
    })
    .await;
    (upstream, ledger)
}

#[tokio::test]
async fn every_key_refusing_once_is_waited_out_within_the_budget() {
    let (upstream, ledger) = refuses_once("1").await;
    let proxy = ProxyConfig::new(&upstream.url(""), &KEYS[..2].join(","))
        .arg("--max-wait", "10")
        .start()
        .await;

    let started = Instant::now();
    let got = post(&proxy.url("/chat/completions"), "{}").await;
    let elapsed = started.elapsed();
    assert_eq!(got.status, 200, "{}", got.body);
    assert!(
        (Duration::from_millis(900)..Duration::from_secs(3)).contains(&elapsed),
        "{elapsed:?}"
    );
    // We retried and waited: the SDK must not retry on top.
    assert_eq!(got.headers["x-should-retry"], "false");

    let ledger = ledger.lock().unwrap();
    let arrivals: Vec<(usize, Duration, bool)> = ledger
        .arrivals
        .iter()
        .map(|(key, at, refused)| {
            let position = KEYS.iter().position(|k| k == key).unwrap() + 1;
            (position, at.duration_since(started), *refused)
        })
        .collect();
    assert_eq!(arrivals.len(), 3, "{arrivals:?}");
    // The untried free key 2 was preferred to waiting for key 1 ...
    assert_eq!((arrivals[0].0, arrivals[1].0), (1, 2), "{arrivals:?}");
    assert!(arrivals[1].1 < Duration::from_millis(500), "{arrivals:?}");
    // ... and the third attempt went to a key only once its rest was over.
    assert!(!arrivals[2].2);
    let refused_at = arrivals
        .iter()
        .find(|(key, _, refused)| *key == arrivals[2].0 && *refused)
        .unwrap()
        .1;
    assert!(
        arrivals[2].1 >= refused_at + Duration::from_millis(990),
        "sent on a key still resting: {arrivals:?}"
    );
}

#[tokio::test]
async fn a_rest_past_the_budget_hands_back_the_refusal_and_then_429s_at_once() {
    let (upstream, ledger) = refuses_once("5").await;
    let proxy = ProxyConfig::new(&upstream.url(""), KEYS[0])
        .arg("--max-wait", "1")
        .start()
        .await;

    // The refusal itself passes through with its Retry-After: no key is back within 1 s.
    let started = Instant::now();
    let got = post(&proxy.url("/chat/completions"), "{}").await;
    assert_eq!(got.status, 429);
    assert_eq!(got.headers["retry-after"], "5");
    // No key is back within the budget: the SDKs must not retry it either.
    assert_eq!(got.headers["x-should-retry"], "false");
    assert_eq!(got.headers["retry-after-ms"], "5000");
    // The next request is not sent at all, and is told at once when to come back.
    let got = post(&proxy.url("/chat/completions"), "{}").await;
    assert!(
        started.elapsed() < Duration::from_millis(800),
        "{:?}",
        started.elapsed()
    );
    // One condition, one answer: the same status and headers as the refusal passed on.
    assert_eq!(got.status, 429);
    let retry_after: u64 = got.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((4..=5).contains(&retry_after), "{retry_after}");
    assert!(got.headers.contains_key("retry-after-ms"));
    assert_eq!(got.headers["x-should-retry"], "false");
    assert_eq!(got.json()["error"]["code"], "rate_limit_exceeded");
    assert_eq!(ledger.lock().unwrap().arrivals.len(), 1);
}

#[tokio::test]
async fn every_key_refusing_a_request_disables_none_and_the_client_gets_the_refusal() {
    let upstream =
        MockUpstream::start(|_| async { reply(401, "{\"error\":\"invalid key\"}") }).await;
    let mut proxy = ProxyConfig::new(&upstream.url(""), &KEYS[..2].join(","))
        .start()
        .await;
    for round in 1..=3 {
        // Key 1 refuses it, key 2 too: the request is to blame, not the keys.
        let got = post(&proxy.url("/chat/completions"), "{}").await;
        assert_eq!(got.status, 401);
        assert_eq!(got.headers["x-should-retry"], "false");
        assert_eq!(upstream.seen().len(), 2 * round, "no third attempt");
    }
    proxy
        .wait_for_log("the request is to blame, not the keys")
        .await;
    let health = get(&proxy.url("/_keyrotation/health")).await;
    assert_eq!(health.status, 200, "{}", health.body);
    let keys = keys(&proxy).await;
    for key in &keys {
        assert_eq!(key["disabled"], false, "{keys:?}");
        assert_eq!(key["rejected"], 3, "{keys:?}");
    }
}
