//! Prometheus exposition: per-key counters and gauges read from the pool at scrape time,
//! plus the proxy's own latency histogram and response counts, and the tokens answers
//! reported per key ([`TokenCounts`], when the proxy counts them).

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tower_key_rotation::KeyPool;

use crate::reload::ReloadCounter;
use crate::usage::estimate::{EstimateStats, Estimator};

/// Everything `/_keyrotation/metrics` shows.
#[derive(Debug)]
pub(crate) struct Metrics {
    registry: Registry,
    latency: Histogram,
    responses: Family<Vec<(&'static str, String)>, Counter>,
    /// `responses`' counter of each status (100 to 599) once it has been seen: the
    /// family's lookup (a lock, a hash, an allocated label) only once per status.
    by_status: Box<[OnceLock<Counter>]>,
    retries: Counter,
    waited: Histogram,
    gone_waiting: Counter,
    reloads: ReloadCounter,
    tokens: Arc<TokenCounts>,
}

impl Metrics {
    /// The proxy's metrics over `pool`; with token budgets, `estimator`'s estimates too.
    pub(crate) fn new(pool: KeyPool, estimator: Option<Arc<Estimator>>) -> Self {
        let mut registry = Registry::with_prefix("keyrotation");
        // Time to the response head: a streamed answer's length is the model's business.
        let latency = Histogram::new([0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]);
        registry.register(
            "request_duration_seconds",
            "Time from receiving a request to sending the response head",
            latency.clone(),
        );
        let responses = Family::default();
        registry.register(
            "responses",
            "Responses sent to clients, by status code",
            responses.clone(),
        );
        let retries = Counter::default();
        registry.register(
            "retries",
            "Requests resent on another key after a 429 or a failed connection",
            retries.clone(),
        );
        let waited = Histogram::new([0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]);
        registry.register(
            "wait_seconds",
            "Time requests that had to wait spent waiting for a key (before the first attempt and between attempts)",
            waited.clone(),
        );
        let gone_waiting = Counter::default();
        registry.register(
            "clients_gone_waiting",
            "Requests whose client went away while they waited for a key",
            gone_waiting.clone(),
        );
        let reloads = ReloadCounter::default();
        registry.register(
            "key_reloads",
            "Key reloads (SIGHUP or key file change), by result: ok or failed",
            reloads.clone(),
        );
        let tokens = Arc::new(TokenCounts::default());
        registry.register_collector(Box::new(KeyCollector {
            pool,
            tokens: tokens.clone(),
            estimator,
        }));
        Self {
            registry,
            latency,
            responses,
            by_status: (100..600).map(|_| OnceLock::new()).collect(),
            retries,
            waited,
            gone_waiting,
            reloads,
            tokens,
        }
    }

    /// The tokens answers reported, per key.
    pub(crate) fn tokens(&self) -> &Arc<TokenCounts> {
        &self.tokens
    }

    /// The reload counter, for the reload task.
    pub(crate) fn reloads(&self) -> ReloadCounter {
        self.reloads.clone()
    }

    /// One answered request: its status, time to the response head, and how many times
    /// it was resent on another key.
    pub(crate) fn observe(
        &self,
        status: http::StatusCode,
        latency: Duration,
        retries: usize,
        waited: Duration,
    ) {
        self.retries.inc_by(retries as u64);
        if !waited.is_zero() {
            self.waited.observe(waited.as_secs_f64());
        }
        self.latency.observe(latency.as_secs_f64());
        let counter = || {
            self.responses
                .get_or_create(&vec![("status", status.as_str().to_owned())])
                .clone()
        };
        match self.by_status.get(usize::from(status.as_u16()) - 100) {
            Some(cached) => cached.get_or_init(counter).inc(),
            None => counter().inc(),
        };
    }

    /// A client went away while its request waited for a key.
    pub(crate) fn client_gone_waiting(&self) {
        self.gone_waiting.inc();
    }

    /// The Prometheus text format.
    pub(crate) fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// Reads [`KeyPool::snapshot`] on each scrape: the pool already counts everything, so the
/// proxy keeps no second copy that could drift.
#[derive(Debug)]
struct KeyCollector {
    pool: KeyPool,
    tokens: Arc<TokenCounts>,
    estimator: Option<Arc<Estimator>>,
}

impl Collector for KeyCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let keys = self.pool.snapshot();
        // Position, and the name and account from the key file (never a value). Every
        // series of a metric has the same labels: empty for a key without name or account.
        let label = |key: &tower_key_rotation::pool::KeyStats| {
            [
                ("key", key.position.to_string()),
                ("name", key.name.clone().unwrap_or_default()),
                ("account", key.account.clone().unwrap_or_default()),
            ]
        };

        let count = ConstGauge::new(keys.len() as f64);
        let family = encoder.encode_descriptor(
            "keys",
            "Keys in force (changes on reload).",
            None,
            count.metric_type(),
        )?;
        count.encode(family)?;

        let waiting = ConstGauge::new(self.pool.waiting() as f64);
        let family = encoder.encode_descriptor(
            "requests_waiting",
            "Requests waiting for a key right now.",
            None,
            waiting.metric_type(),
        )?;
        waiting.encode(family)?;
        crate::shared::encode_metrics(&self.pool, &mut encoder)?;

        type Read = fn(&tower_key_rotation::pool::KeyStats) -> u64;
        let counters: [(&str, &str, Read); 7] = [
            ("key_requests", "Requests sent with each key.", |k| {
                k.requests
            }),
            ("key_successes", "Responses accepted on each key.", |k| {
                k.successes
            }),
            ("key_rate_limited", "429 answers per key.", |k| {
                k.rate_limited
            }),
            (
                "key_failures",
                "Refused credentials, 5xx and transport errors of requests that reached the upstream, per key.",
                |k| k.failures,
            ),
            (
                "key_rejected",
                "401/403 answers per key (the key is disabled only when another key then served the same request).",
                |k| k.rejected,
            ),
            (
                "key_affinity_hits",
                "Requests of a session sent to the session's own key (its preferred key, or the one it last spilled to), per key.",
                |k| k.affinity_hits,
            ),
            (
                "key_affinity_spills",
                "Requests of a session that spilled to this key because their own key could not take them in time.",
                |k| k.affinity_spills,
            ),
        ];
        for (name, help, read) in counters {
            let metric = ConstCounter::new(0u64);
            let mut family = encoder.encode_descriptor(name, help, None, metric.metric_type())?;
            for key in &keys {
                let labels = label(key);
                ConstCounter::new(read(key)).encode(family.encode_family(&labels)?)?;
            }
        }

        type Gauge = fn(&tower_key_rotation::pool::KeyStats) -> f64;
        let gauges: [(&str, &str, Gauge); 7] = [
            (
                "key_in_flight",
                "Requests reserved or in flight per key.",
                |k| f64::from(k.in_flight),
            ),
            (
                "key_sent",
                "Requests per key sent to the upstream and not finished (the rest of in flight is reserved, not sent).",
                |k| f64::from(k.sent),
            ),
            (
                "key_cooling_down_seconds",
                "Seconds until a rate-limited key is back (0 if not cooling).",
                |k| k.cooling_down_for.map_or(0.0, |d| d.as_secs_f64()),
            ),
            ("key_disabled", "1 if the provider rejected the key.", |k| {
                f64::from(u8::from(k.disabled))
            }),
            (
                "key_quota_wait_seconds",
                "Seconds until the key's quota lets the next request go (0 if it has room).",
                |k| k.quota_wait.map_or(0.0, |d| d.as_secs_f64()),
            ),
            (
                "key_probing",
                "1 if the key rested for a limit or a spent quota and its next request is a single probe.",
                |k| f64::from(u8::from(k.probing)),
            ),
            ("key_weight", "The key's weight (share of requests).", |k| {
                f64::from(k.weight)
            }),
        ];
        for (name, help, read) in gauges {
            let metric = ConstGauge::new(0.0f64);
            let mut family = encoder.encode_descriptor(name, help, None, metric.metric_type())?;
            for key in &keys {
                let labels = label(key);
                ConstGauge::new(read(key)).encode(family.encode_family(&labels)?)?;
            }
        }

        // Per key × model (bucket), once a model was used on the key. The pool bounds the
        // models it tells apart (`KeyPoolBuilder::max_buckets`; beyond it one `(other)`), so
        // a caller inventing model names cannot grow these series.
        let buckets = self.pool.bucket_snapshot();
        let model_label = |bucket: &tower_key_rotation::pool::BucketStats| {
            [
                ("key", bucket.key.position.to_string()),
                ("name", bucket.key.name.clone().unwrap_or_default()),
                ("model", bucket.bucket.clone()),
            ]
        };
        let model_counters: [(&str, &str, Read); 3] = [
            (
                "key_model_requests",
                "Requests sent with each key, per model.",
                |k| k.requests,
            ),
            (
                "key_model_successes",
                "Responses accepted on each key, per model.",
                |k| k.successes,
            ),
            (
                "key_model_rate_limited",
                "429 answers per key and model.",
                |k| k.rate_limited,
            ),
        ];
        for (name, help, read) in model_counters {
            let metric = ConstCounter::new(0u64);
            let mut family = encoder.encode_descriptor(name, help, None, metric.metric_type())?;
            for bucket in &buckets {
                let labels = model_label(bucket);
                ConstCounter::new(read(&bucket.key)).encode(family.encode_family(&labels)?)?;
            }
        }
        let model_gauges: [(&str, &str, Gauge); 2] = [
            (
                "key_model_in_flight",
                "Requests reserved or in flight per key and model.",
                |k| f64::from(k.in_flight),
            ),
            (
                "key_model_cooling_down_seconds",
                "Seconds until a model rate-limited on a key is back on it (0 if not cooling).",
                |k| k.cooling_down_for.map_or(0.0, |d| d.as_secs_f64()),
            ),
        ];
        for (name, help, read) in model_gauges {
            let metric = ConstGauge::new(0.0f64);
            let mut family = encoder.encode_descriptor(name, help, None, metric.metric_type())?;
            for bucket in &buckets {
                let labels = model_label(bucket);
                ConstGauge::new(read(&bucket.key)).encode(family.encode_family(&labels)?)?;
            }
        }
        let metric = ConstGauge::new(0.0f64);
        let mut family = encoder.encode_descriptor(
            "key_model_concurrency_limit",
            "Requests a key may have in flight at once for a model: the configured cap, or the lower limit learned from 429s.",
            None,
            metric.metric_type(),
        )?;
        for bucket in &buckets {
            if let Some(limit) = bucket.key.concurrency_limit {
                let labels = model_label(bucket);
                ConstGauge::new(f64::from(limit)).encode(family.encode_family(&labels)?)?;
            }
        }

        // Only keys with a limit: "no limit" has no number.
        let metric = ConstGauge::new(0.0f64);
        let mut family = encoder.encode_descriptor(
            "key_concurrency_limit",
            "Requests a key may have in flight at once: the configured cap, or the lower limit learned from 429s.",
            None,
            metric.metric_type(),
        )?;
        for key in &keys {
            if let Some(limit) = key.concurrency_limit {
                let labels = label(key);
                ConstGauge::new(f64::from(limit)).encode(family.encode_family(&labels)?)?;
            }
        }

        // Only when the proxy counts tokens (`--count-tokens`).
        let tokens = self.tokens.snapshot();
        if tokens.is_empty() {
            return Ok(());
        }
        type Tokens = fn(&KeyTokens) -> u64;
        let counters: [(&str, &str, Tokens); 6] = [
            (
                "key_input_tokens",
                "Input (prompt) tokens answers reported per key: OpenAI's prompt_tokens, Anthropic's input_tokens (without cache reads and writes).",
                |t| t.input,
            ),
            (
                "key_output_tokens",
                "Output (completion) tokens answers reported per key.",
                |t| t.output,
            ),
            (
                "key_cache_creation_input_tokens",
                "Anthropic's cache_creation_input_tokens answers reported per key.",
                |t| t.cache_creation,
            ),
            (
                "key_cache_read_input_tokens",
                "Anthropic's cache_read_input_tokens answers reported per key.",
                |t| t.cache_read,
            ),
            (
                "key_usage_reported",
                "Successful answers per key whose usage was read to their end.",
                |t| t.reported,
            ),
            (
                "key_usage_unreported",
                "Successful answers per key without usage: cut short, left by their client, or not reporting it.",
                |t| t.unreported,
            ),
        ];
        for (name, help, read) in counters {
            let metric = ConstCounter::new(0u64);
            let mut family = encoder.encode_descriptor(name, help, None, metric.metric_type())?;
            for key in &keys {
                let counts = tokens.get(key.position - 1).copied().unwrap_or_default();
                let labels = label(key);
                ConstCounter::new(read(&counts)).encode(family.encode_family(&labels)?)?;
            }
        }
        match &self.estimator {
            Some(estimator) => self.encode_budgets(estimator, &mut encoder),
            None => Ok(()),
        }
    }
}

impl KeyCollector {
    /// Token budgets: each key × model's reservations, settlements and limit, and each
    /// model's estimate.
    fn encode_budgets(
        &self,
        estimator: &Estimator,
        encoder: &mut DescriptorEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        let buckets = self.pool.bucket_snapshot();
        let model_label = |bucket: &tower_key_rotation::pool::BucketStats| {
            [
                ("key", bucket.key.position.to_string()),
                ("name", bucket.key.name.clone().unwrap_or_default()),
                ("model", bucket.bucket.clone()),
            ]
        };
        type Read = fn(&tower_key_rotation::pool::KeyStats) -> u64;
        let counters: [(&str, &str, Read); 2] = [
            (
                "key_model_tokens_reserved",
                "Tokens reserved per key and model: each request's estimated input and the output it allows.",
                |k| k.tokens_reserved,
            ),
            (
                "key_model_tokens_used",
                "Tokens per key and model that answers reported using (settled reservations).",
                |k| k.tokens_used,
            ),
        ];
        for (name, help, read) in counters {
            let metric = ConstCounter::new(0u64);
            let mut family = encoder.encode_descriptor(name, help, None, metric.metric_type())?;
            for bucket in &buckets {
                let labels = model_label(bucket);
                ConstCounter::new(read(&bucket.key)).encode(family.encode_family(&labels)?)?;
            }
        }
        let metric = ConstGauge::new(0.0f64);
        let mut family = encoder.encode_descriptor(
            "key_model_token_limit",
            "Tokens per window a key may use for a model: --tpm, or learned from the provider's token headers.",
            None,
            metric.metric_type(),
        )?;
        for bucket in &buckets {
            if let Some(limit) = bucket.key.token_limit {
                let labels = model_label(bucket);
                ConstGauge::new(limit as f64).encode(family.encode_family(&labels)?)?;
            }
        }
        let estimates = estimator.snapshot();
        type Estimate = fn(&EstimateStats) -> f64;
        let gauges: [(&str, &str, Estimate); 2] = [
            (
                "token_estimate_error",
                "Mean relative error of the input tokens estimated per model, against the usage answers reported.",
                |e| e.mean_error,
            ),
            (
                "token_estimate_bytes_per_token",
                "Request body bytes per reported input token, learned per model.",
                |e| e.bytes_per_token,
            ),
        ];
        for (name, help, read) in gauges {
            let metric = ConstGauge::new(0.0f64);
            let mut family = encoder.encode_descriptor(name, help, None, metric.metric_type())?;
            for estimate in &estimates {
                let labels = [("model", estimate.model.clone())];
                ConstGauge::new(read(estimate)).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// The tokens successful answers reported, per key position: counted by the proxy as each
/// answer's body ends (the pool does not see bodies).
#[derive(Debug, Default)]
pub(crate) struct TokenCounts {
    /// By 0-based key index; grows to the highest key counted.
    by_key: Mutex<Vec<KeyTokens>>,
}

/// One key's [`TokenCounts`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct KeyTokens {
    pub(crate) input: u64,
    pub(crate) output: u64,
    pub(crate) cache_creation: u64,
    pub(crate) cache_read: u64,
    /// Answers whose usage was read.
    pub(crate) reported: u64,
    /// Answers without usage (cut, left, or not reporting it).
    pub(crate) unreported: u64,
}

impl TokenCounts {
    /// An answer with key `position` (1-based) ended reporting `usage`, or was cut short
    /// (`None`).
    pub(crate) fn record(&self, position: usize, usage: Option<crate::usage::Usage>) {
        let mut by_key = self.by_key.lock().unwrap_or_else(|e| e.into_inner());
        let index = position.saturating_sub(1);
        if by_key.len() <= index {
            by_key.resize(index + 1, KeyTokens::default());
        }
        let key = &mut by_key[index];
        match usage.filter(crate::usage::Usage::is_reported) {
            Some(usage) => {
                key.reported += 1;
                key.input += usage.input.unwrap_or(0);
                key.output += usage.output.unwrap_or(0);
                key.cache_creation += usage.cache_creation.unwrap_or(0);
                key.cache_read += usage.cache_read.unwrap_or(0);
            }
            None => key.unreported += 1,
        }
    }

    /// The counts by 0-based key index (empty when nothing was counted).
    pub(crate) fn snapshot(&self) -> Vec<KeyTokens> {
        self.by_key
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}
