//! Several proxy replicas sharing their keys' state through Redis (or Valkey): their
//! configuration (`--redis-*`, `--degraded-policy`), the backend it makes, and what admin
//! and metrics show of it. Without a Redis URL (or `REDIS_URL`) nothing here runs: each
//! replica keeps its own pool.
//!
//! The URL may carry a password: it is read from `REDIS_URL` preferably (a command line
//! is visible to every user of the machine), never logged, never echoed in an error, and
//! redacted in `Debug`.

use std::path::PathBuf;

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;
use serde_json::json;
use tower_key_rotation::shared::DegradedPolicy;
use tower_key_rotation::shared::redis::{RedisBackend, RedisOptions};
use tower_key_rotation::{KeyPool, KeyPoolBuilder};
use zeroize::Zeroizing;

use crate::error::StartError;

/// The variable read when no Redis URL is given.
pub(crate) const REDIS_URL_ENV: &str = "REDIS_URL";

/// Replicas sharing their keys' state through Redis or Valkey: their rests, disables and
/// in-flight caps. Without a URL (here or in `REDIS_URL`), each replica keeps its own.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]`, `rediss://...` (TLS) or `unix:///path`
    /// (`--redis-url`); `None`: the `REDIS_URL` variable, if set.
    pub url: Option<RedisUrl>,
    /// For a `rediss://` URL: the CA certificates to trust, in a PEM file (`--redis-ca`).
    pub ca: Option<PathBuf>,
    /// One namespace per deployment (`--redis-namespace`).
    pub namespace: String,
    /// The variable holding a secret shared by the replicas, which keys the hash naming
    /// each API key in Redis (`--redis-secret-env`); `None`: the namespace keys it.
    pub secret_env: Option<String>,
    /// What each replica does while Redis is away (`--degraded-policy`).
    pub degraded_policy: DegradedPolicy,
    /// How long a replica's slots outlive it in Redis (`--redis-ttl`, default 5 s): a
    /// replica that dies frees them within this plus one heartbeat.
    pub ttl: std::time::Duration,
    /// How often a replica renews its life and counts in Redis (`--redis-heartbeat`,
    /// default 1 s).
    pub heartbeat: std::time::Duration,
}

impl Default for RedisConfig {
    /// No URL (`REDIS_URL` if set), namespace `default`, the `split` policy, a TTL of 5 s
    /// and a heartbeat of 1 s.
    fn default() -> Self {
        Self {
            url: None,
            ca: None,
            namespace: "default".to_owned(),
            secret_env: None,
            degraded_policy: DegradedPolicy::Split,
            ttl: RedisOptions::default().ttl,
            heartbeat: RedisOptions::default().heartbeat,
        }
    }
}

impl RedisConfig {
    /// Variables this configuration reads, for `.env`.
    pub(crate) fn env_names(&self) -> Vec<String> {
        let mut names = vec![REDIS_URL_ENV.to_owned()];
        names.extend(self.secret_env.clone());
        names
    }
}

/// A Redis URL: it may hold a password, so its `Debug` shows nothing, and it is wiped
/// when dropped. Checked when the proxy starts.
#[derive(Clone)]
pub struct RedisUrl(Zeroizing<String>);

impl RedisUrl {
    /// The URL `url`, unchecked.
    pub fn new(url: String) -> Self {
        Self(Zeroizing::new(url))
    }
}

impl std::fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RedisUrl(<redacted>)")
    }
}

/// Makes the backend `config` asks for (after `.env` is applied) and hands it to the
/// pool; the pool unchanged without a URL. Errors never contain the URL or the secret.
pub(crate) async fn apply(
    config: &RedisConfig,
    pool: KeyPoolBuilder,
) -> Result<KeyPoolBuilder, StartError> {
    let url = match &config.url {
        Some(url) => url.0.clone(),
        None => match std::env::var(REDIS_URL_ENV) {
            Ok(url) if !url.trim().is_empty() => Zeroizing::new(url),
            _ => return Ok(pool),
        },
    };
    let secret = match &config.secret_env {
        Some(var) => {
            let secret = Zeroizing::new(std::env::var(var).unwrap_or_default());
            if secret.trim().is_empty() {
                return Err(StartError::new(format!(
                    "Redis secret variable {var} is not set or empty"
                )));
            }
            secret
        }
        None => {
            tracing::warn!(
                "--redis-secret-env not set: API keys are named in Redis by a hash keyed with the namespace only"
            );
            Zeroizing::new(config.namespace.clone())
        }
    };
    let mut options = RedisOptions::default();
    options.namespace = config.namespace.clone();
    options.ttl = config.ttl;
    options.heartbeat = config.heartbeat;
    if let Some(path) = &config.ca {
        // Checked here for a clear error; the Redis client parses it again.
        crate::config::load_ca("--redis-ca", path)?;
        options.tls_ca = Some(
            std::fs::read(path)
                .map_err(|e| StartError::caused(format!("--redis-ca {}", path.display()), e))?,
        );
    }
    // Several URLs: the nodes of a Redis Cluster.
    let nodes: Vec<&str> = url
        .split(',')
        .map(str::trim)
        .filter(|node| !node.is_empty())
        .collect();
    let backend = if nodes.len() > 1 {
        RedisBackend::cluster(&nodes, secret.as_bytes(), options)
    } else {
        RedisBackend::new(url.trim(), secret.as_bytes(), options)
    }
    .map_err(|e| StartError::new(format!("--redis-url (or {REDIS_URL_ENV}): {e}")))?;
    let policy = config.degraded_policy;
    let connected = backend.connect().await;
    match backend.last_failure() {
        // A certificate refused is a configuration error that waiting will not mend.
        Some(failure) if !connected && failure.is_certificate() => {
            return Err(StartError::new(format!(
                "--redis-url (or {REDIS_URL_ENV}): {failure} (a CA of your own: --redis-ca FILE)"
            )));
        }
        _ => {}
    }
    if connected {
        tracing::info!(
            namespace = %config.namespace,
            replica = backend.replica(),
            "Sharing key state through Redis (namespace {}, replica {}, degraded policy {})",
            config.namespace,
            backend.replica(),
            policy.as_str()
        );
    } else {
        let why = backend
            .last_failure()
            .map(|failure| format!(" ({failure})"))
            .unwrap_or_default();
        tracing::warn!(
            namespace = %config.namespace,
            "Redis unreachable at start{why}: each replica on its own ({} policy) until it answers",
            policy.as_str()
        );
    }
    Ok(pool.state_backend(backend).degraded_policy(policy))
}

/// `/_keyrotation/backend`: where the keys' state lives and how that store is doing.
pub(crate) fn admin(pool: &KeyPool) -> serde_json::Value {
    match pool.backend_health() {
        None => json!({ "backend": "memory" }),
        Some(health) => json!({
            "backend": "redis",
            "connected": health.connected,
            "degraded": health.degraded,
            "replicas": health.replicas,
            "degraded_policy": health.policy.as_str(),
        }),
    }
}

/// The backend's gauges, when there is one.
pub(crate) fn encode_metrics(
    pool: &KeyPool,
    encoder: &mut DescriptorEncoder<'_>,
) -> Result<(), std::fmt::Error> {
    let Some(health) = pool.backend_health() else {
        return Ok(());
    };
    let gauges = [
        (
            "backend_connected",
            "1 if the shared state's store (Redis) answered the last call.",
            u8::from(health.connected),
        ),
        (
            "backend_degraded",
            "1 while the store is away and the degraded policy applies.",
            u8::from(health.degraded),
        ),
    ];
    for (name, help, value) in gauges {
        let gauge = ConstGauge::new(f64::from(value));
        gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
    }
    let gauge = ConstGauge::new(f64::from(health.replicas));
    gauge.encode(encoder.encode_descriptor(
        "backend_replicas",
        "Replicas sharing the keys' state, alive at the last heartbeat.",
        None,
        gauge.metric_type(),
    )?)?;
    Ok(())
}
