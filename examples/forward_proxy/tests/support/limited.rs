//! A provider stand-in that enforces a per-key limit the way the real ones do: at most
//! `limit` requests in flight per key, more refused with `429` and a `Retry-After`. Used by
//! `wait.rs` (plain answers) and `sdks.rs` (answers in each provider's format).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::Response;
use tokio::time::Instant;

use super::{MockBody, MockUpstream, Seen, reply};

/// How long the stand-in works on a request it accepts.
pub const WORK: Duration = Duration::from_millis(300);

/// What a stand-in saw: per request, its key, when it arrived, and whether it was refused.
#[derive(Default, Clone)]
pub struct Ledger {
    pub in_flight: HashMap<String, u32>,
    pub arrivals: Vec<(String, Instant, bool)>,
}

impl Ledger {
    /// Requests refused.
    pub fn refused(&self) -> usize {
        self.arrivals
            .iter()
            .filter(|(_, _, refused)| *refused)
            .count()
    }

    /// `ms:position` per arrival from the first (the key's 1-based position in `keys`, 0
    /// for another), `!` for a refusal: for failure messages.
    pub fn timeline(&self, keys: &[&str]) -> Vec<String> {
        let Some(first) = self.arrivals.first().map(|(_, at, _)| *at) else {
            return Vec::new();
        };
        self.arrivals
            .iter()
            .map(|(key, at, refused)| {
                let position = keys.iter().position(|k| k == key).map_or(0, |i| i + 1);
                let ms = at.duration_since(first).as_millis();
                format!("{ms}ms:{position}{}", if *refused { "!" } else { "" })
            })
            .collect()
    }
}

/// A provider holding the keys `keys` that allows `limit` requests in flight per key
/// (`0`: refuses everything) and refuses more with `429` + `Retry-After: retry_after`. An
/// accepted request is worked on for [`WORK`], then answered by `answer`. The key is read
/// wherever the proxy put it: `x-api-key` when that holds one of `keys`, else the bearer.
pub async fn limited_provider(
    keys: &[&str],
    limit: u32,
    retry_after: &'static str,
    answer: impl Fn(&Seen) -> Response<MockBody> + Send + Sync + 'static,
) -> (MockUpstream, Arc<Mutex<Ledger>>) {
    let keys: Arc<Vec<String>> = Arc::new(keys.iter().map(|k| (*k).to_owned()).collect());
    let answer = Arc::new(answer);
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let shared = ledger.clone();
    let upstream = MockUpstream::start(move |seen: Seen| {
        let (ledger, keys, answer) = (shared.clone(), keys.clone(), answer.clone());
        async move {
            let key = seen
                .headers
                .get("x-api-key")
                .and_then(|v| v.to_str().ok())
                .filter(|v| keys.iter().any(|k| k == v))
                .map(str::to_owned)
                .or_else(|| seen.bearer())
                .unwrap_or_default();
            let accepted = {
                let mut ledger = ledger.lock().unwrap();
                let count = ledger.in_flight.entry(key.clone()).or_default();
                let accepted = *count < limit;
                if accepted {
                    *count += 1;
                }
                ledger
                    .arrivals
                    .push((key.clone(), Instant::now(), !accepted));
                accepted
            };
            if !accepted {
                let mut response = reply(
                    429,
                    "{\"error\":{\"message\":\"too many requests\",\"type\":\"rate_limit_error\"}}",
                );
                response
                    .headers_mut()
                    .insert("retry-after", retry_after.parse().unwrap());
                return response;
            }
            tokio::time::sleep(WORK).await;
            *ledger.lock().unwrap().in_flight.get_mut(&key).unwrap() -= 1;
            answer(&seen)
        }
    })
    .await;
    (upstream, ledger)
}
