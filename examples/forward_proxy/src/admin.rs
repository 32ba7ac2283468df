//! Routes under `/_keyrotation/`, answered by the proxy itself and never forwarded.

use http::{Method, Response, StatusCode, header};
use serde_json::json;

use crate::answer::{Body, full};
use crate::handler::State;

pub(crate) const PREFIX: &str = "/_keyrotation/";

/// Does this route need the access token? Health checks come from load balancers that
/// carry none, and say nothing about the keys.
pub(crate) fn is_public(path: &str) -> bool {
    path == "/_keyrotation/health"
}

pub(crate) fn respond(state: &State, method: &Method, path: &str) -> Response<Body> {
    if method != Method::GET {
        return state.error_format.answer(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "admin routes answer GET only",
        );
    }
    match path {
        // 503 once no key can ever serve again (all disabled): a load balancer should send
        // clients elsewhere until a reload brings a working key.
        "/_keyrotation/health" if state.pool.all_disabled() => Response::builder()
            .status(StatusCode::SERVICE_UNAVAILABLE)
            .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .body(full("every key is disabled\n"))
            .expect("static response"),
        "/_keyrotation/health" => Response::builder()
            .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .body(full("ok\n"))
            .expect("static response"),
        "/_keyrotation/keys" => {
            // Positions, names and counters only: nothing here can reveal a key. Each key
            // lists its models (buckets) as they are metered apart, once one was used.
            let tokens = state.metrics.tokens().snapshot();
            let buckets = state.pool.bucket_snapshot();
            let estimates = state
                .estimator
                .as_ref()
                .map(|estimator| estimator.snapshot())
                .unwrap_or_default();
            let models = |position: usize| -> Vec<serde_json::Value> {
                buckets
                    .iter()
                    .filter(|bucket| bucket.key.position == position)
                    .map(|bucket| {
                        let key = &bucket.key;
                        json!({
                            "model": bucket.bucket,
                            "state": key.state.as_str(),
                            "in_flight": key.in_flight,
                            "sent": key.sent,
                            "concurrency_limit": key.concurrency_limit,
                            "requests": key.requests,
                            "successes": key.successes,
                            "rate_limited": key.rate_limited,
                            "cooling_down_ms": key.cooling_down_for.map_or(0, |d| d.as_millis() as u64),
                            "quota_wait_ms": key.quota_wait.map_or(0, |d| d.as_millis() as u64),
                            "probing": key.probing,
                            "tokens_reserved": key.tokens_reserved,
                            "tokens_used": key.tokens_used,
                            "token_limit": key.token_limit,
                            "token_wait_ms": key.token_wait.map_or(0, |d| d.as_millis() as u64),
                            "token_estimate": estimates.iter().find(|e| e.model == bucket.bucket).map(|e| json!({
                                "bytes_per_token": e.bytes_per_token,
                                "samples": e.samples,
                                "mean_error": e.mean_error,
                            })),
                        })
                    })
                    .collect()
            };
            let keys: Vec<_> = state
                .pool
                .snapshot()
                .iter()
                .map(|key| {
                    let mut shown = json!({
                        "index": key.position,
                        "name": key.name,
                        "account": key.account,
                        "weight": key.weight,
                        "state": key.state.as_str(),
                        "in_flight": key.in_flight,
                        "sent": key.sent,
                        "reserved": key.reserved,
                        "concurrency_limit": key.concurrency_limit,
                        "requests": key.requests,
                        "successes": key.successes,
                        "rate_limited": key.rate_limited,
                        "failures": key.failures,
                        "rejected": key.rejected,
                        "affinity_hits": key.affinity_hits,
                        "affinity_spills": key.affinity_spills,
                        "disabled": key.disabled,
                        "cooling_down_ms": key.cooling_down_for.map_or(0, |d| d.as_millis() as u64),
                        "quota_wait_ms": key.quota_wait.map_or(0, |d| d.as_millis() as u64),
                        "probing": key.probing,
                        "models": models(key.position),
                    });
                    if state.count_tokens {
                        let counted = tokens.get(key.position - 1).copied().unwrap_or_default();
                        shown["tokens"] = json!({
                            "input": counted.input,
                            "output": counted.output,
                            "cache_creation_input": counted.cache_creation,
                            "cache_read_input": counted.cache_read,
                            "answers_reported": counted.reported,
                            "answers_unreported": counted.unreported,
                            "reserved": key.tokens_reserved,
                            "settled": key.tokens_used,
                            "limit": key.token_limit,
                            "wait_ms": key.token_wait.map_or(0, |d| d.as_millis() as u64),
                        });
                    }
                    shown
                })
                .collect();
            Response::builder()
                .header(header::CONTENT_TYPE, "application/json")
                .body(full(serde_json::Value::Array(keys).to_string()))
                .expect("static response")
        }
        "/_keyrotation/backend" => Response::builder()
            .header(header::CONTENT_TYPE, "application/json")
            .body(full(crate::shared::admin(&state.pool).to_string()))
            .expect("static response"),
        "/_keyrotation/metrics" => Response::builder()
            .header(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )
            .body(full(state.metrics.render()))
            .expect("static response"),
        _ => state
            .error_format
            .answer(StatusCode::NOT_FOUND, "not_found", "no such admin route"),
    }
}
