//! Keys × models through the proxy, with default flags: a provider stand-in that limits
//! each key per model (model A: 1 in flight per key, refused with `Retry-After: 2`; model
//! B: 8 per key). Model A's refusals rest model A on a key, never the key: model B's
//! requests never wait on them.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use support::{MockUpstream, ProxyConfig, Seen, keys, post, reply};

const KEYS: &str = "key-one,key-two";

/// Per model the stand-in serves: requests allowed in flight per key, and how long each
/// is worked on.
fn limit_of(model: &str) -> Option<(u32, Duration)> {
    match model {
        "model-a" => Some((1, Duration::from_millis(150))),
        "model-b" => Some((8, Duration::from_millis(50))),
        _ => None,
    }
}

/// The stand-in: counts in flight per (key, model), refuses beyond the model's limit with
/// `429` and `Retry-After: 2`, and records its refusals per model.
async fn per_model_provider() -> (MockUpstream, Arc<Mutex<HashMap<String, usize>>>) {
    let in_flight: Arc<Mutex<HashMap<(String, String), u32>>> = Arc::default();
    let refusals: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let refused = refusals.clone();
    let upstream = MockUpstream::start(move |seen: Seen| {
        let (in_flight, refused) = (in_flight.clone(), refused.clone());
        async move {
            let key = seen.bearer().unwrap_or_default();
            let body: serde_json::Value = serde_json::from_slice(&seen.body).unwrap();
            let model = body["model"].as_str().unwrap_or_default().to_owned();
            let Some((limit, work)) = limit_of(&model) else {
                // OpenAI's answer for a model that does not exist
                // (https://platform.openai.com/docs/guides/error-codes).
                let message = format!("The model `{model}` does not exist");
                let body = serde_json::json!({"error": {
                    "message": message, "type": "invalid_request_error",
                    "param": null, "code": "model_not_found"}});
                return reply(404, &body.to_string());
            };
            let slot = (key, model.clone());
            let admitted = {
                let mut in_flight = in_flight.lock().unwrap();
                let n = in_flight.entry(slot.clone()).or_default();
                (*n < limit).then(|| *n += 1).is_some()
            };
            if !admitted {
                *refused.lock().unwrap().entry(model).or_default() += 1;
                let mut response = reply(429, r#"{"error":{"message":"too many in flight"}}"#);
                response
                    .headers_mut()
                    .insert("retry-after", "2".parse().unwrap());
                return response;
            }
            tokio::time::sleep(work).await;
            *in_flight.lock().unwrap().get_mut(&slot).unwrap() -= 1;
            reply(200, r#"{"choices":[]}"#)
        }
    })
    .await;
    (upstream, refusals)
}

/// `callers` callers sending `each` requests of `model` one after another; every answer's
/// status and latency.
async fn workload(
    proxy: &str,
    model: &'static str,
    callers: usize,
    each: usize,
) -> Vec<(u16, Duration)> {
    let url = format!("{proxy}/v1/chat/completions");
    let tasks: Vec<_> = (0..callers)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let mut answers = Vec::new();
                for _ in 0..each {
                    let started = Instant::now();
                    let body = format!(r#"{{"model":"{model}","messages":[]}}"#);
                    let got = post(&url, &body).await;
                    answers.push((got.status.as_u16(), started.elapsed()));
                }
                answers
            })
        })
        .collect();
    let mut answers = Vec::new();
    for task in tasks {
        answers.extend(task.await.unwrap());
    }
    answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_models_rests_never_hold_up_another_models_requests() {
    let (upstream, refusals) = per_model_provider().await;
    let proxy = ProxyConfig::new(&upstream.url(""), KEYS).start().await;
    let url = proxy.url("");
    // Both workloads at once: A overloads its 2 slots (1 per key) and draws refusals that
    // rest A for 2 s; B stays well under its 16.
    let (a, b) = tokio::join!(
        workload(&url, "model-a", 4, 4),
        workload(&url, "model-b", 6, 20),
    );
    let refusals = refusals.lock().unwrap().clone();
    assert!(
        refusals.get("model-a").copied().unwrap_or(0) > 0,
        "model A was refused: the workload tests what it should ({refusals:?})"
    );
    assert_eq!(refusals.get("model-b"), None, "model B never refused");
    // No client errors: A's refusals became waits within the budget.
    let errors: Vec<_> = a
        .iter()
        .chain(&b)
        .filter(|(status, _)| *status != 200)
        .collect();
    assert!(errors.is_empty(), "client errors: {errors:?}");
    // No B request waited on an A rest (2 s): each took about its 50 ms of work.
    let slowest = b.iter().map(|(_, latency)| *latency).max().unwrap();
    assert!(
        slowest < Duration::from_secs(1),
        "a model B request took {slowest:?}"
    );
    // Learned limits are shown per model: 1 for A (learned), none for B (never refused).
    let keys = keys(&proxy).await;
    for key in &keys {
        let models = key["models"].as_array().unwrap();
        let model = |name: &str| {
            models
                .iter()
                .find(|m| m["model"] == name)
                .unwrap_or_else(|| panic!("{name} not in {models:?}"))
        };
        assert_eq!(model("model-a")["concurrency_limit"], 1, "{key}");
        assert_eq!(
            model("model-b")["concurrency_limit"],
            serde_json::Value::Null,
            "{key}"
        );
        assert_eq!(model("model-b")["rate_limited"], 0, "{key}");
    }
    let metrics = support::get(&proxy.url("/_keyrotation/metrics")).await.body;
    assert!(
        metrics.contains(
            r#"keyrotation_key_model_concurrency_limit{key="1",name="",model="model-a"} 1"#
        ),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_made_up_model_names_leaves_real_models_their_own_buckets() {
    let (upstream, refusals) = per_model_provider().await;
    let proxy = ProxyConfig::new(&upstream.url(""), KEYS).start().await;
    let url = proxy.url("/v1/chat/completions");
    // One caller makes up far more model names than the pool tracks apart (64).
    for i in 0..300 {
        let got = post(&url, &format!(r#"{{"model":"made-up-{i}","messages":[]}}"#)).await;
        assert_eq!(got.status, 404, "{}", got.body);
    }
    // The real models, once the provider has accepted a request of each (their first
    // requests share one bucket with every new name: `tests/routing.rs` shows how the
    // waiting ones move when the first is accepted), still get buckets of their own, so
    // model A's rests never hold up model B.
    for model in ["model-a", "model-b"] {
        let got = post(&url, &format!(r#"{{"model":"{model}","messages":[]}}"#)).await;
        assert_eq!(got.status, 200, "{}", got.body);
    }
    let base = proxy.url("");
    let (a, b) = tokio::join!(
        workload(&base, "model-a", 4, 4),
        workload(&base, "model-b", 6, 20),
    );
    let refusals = refusals.lock().unwrap().clone();
    assert!(
        refusals.get("model-a").copied().unwrap_or(0) > 0,
        "{refusals:?}"
    );
    assert_eq!(refusals.get("model-b"), None, "model B never refused");
    assert!(a.iter().chain(&b).all(|(status, _)| *status == 200));
    let slowest = b.iter().map(|(_, latency)| *latency).max().unwrap();
    assert!(
        slowest < Duration::from_secs(1),
        "a model B request took {slowest:?}"
    );
    // The made-up names hold a few buckets at most; the real ones are shown by name.
    for key in keys(&proxy).await {
        let models = key["models"].as_array().unwrap();
        let named = |name: &str| models.iter().any(|m| m["model"] == name);
        assert!(named("model-a") && named("model-b"), "{models:?}");
        let made_up = models
            .iter()
            .filter(|m| m["model"].as_str().unwrap().starts_with("made-up"))
            .count();
        assert!(made_up <= 8, "{made_up} made-up names tracked apart");
    }
}

/// The same workloads with one state per key (`--buckets none`): A's rests rest the key,
/// and B's requests wait on them. What the test above guards against.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_one_state_per_key_one_models_rests_hold_up_the_other() {
    let (upstream, _) = per_model_provider().await;
    let proxy = ProxyConfig::new(&upstream.url(""), KEYS)
        .arg("--buckets", "none")
        .start()
        .await;
    let url = proxy.url("");
    let (_, b) = tokio::join!(
        workload(&url, "model-a", 4, 4),
        workload(&url, "model-b", 6, 20),
    );
    let slowest = b.iter().map(|(_, latency)| *latency).max().unwrap();
    assert!(
        slowest >= Duration::from_secs(1),
        "without buckets, some model B request waits on a rest of model A ({slowest:?})"
    );
}
