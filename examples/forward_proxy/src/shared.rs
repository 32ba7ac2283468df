//! Several proxy replicas sharing their keys' state through Redis (or Valkey): the
//! `--redis-*` and `--degraded-policy` flags, the backend they make, and what admin and
//! metrics show of it. Without `--redis-url` (or `REDIS_URL`) nothing here runs: each
//! replica keeps its own pool.
//!
//! The URL may carry a password: it is read from `REDIS_URL` preferably (a command line
//! is visible to every user of the machine), never logged, never echoed in an error, and
//! redacted in `Debug`.

use clap::ValueEnum;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;
use serde_json::json;
use tower_key_rotation::shared::DegradedPolicy;
use tower_key_rotation::shared::redis::{RedisBackend, RedisOptions};
use tower_key_rotation::{KeyPool, KeyPoolBuilder};
use zeroize::Zeroizing;

/// The variable read when `--redis-url` is not given.
pub(crate) const REDIS_URL_ENV: &str = "REDIS_URL";

/// The flags of replicas sharing state.
#[derive(Debug, clap::Args)]
#[command(next_help_heading = crate::config::REPLICAS)]
pub(crate) struct SharedArgs {
    /// Share the keys' state with the other replicas through Redis
    ///
    /// Their rests, disables and in-flight caps, through this Redis or Valkey:
    /// `redis://[user:password@]host:port[/db]`, `rediss://...` (TLS) or `unix:///path`.
    /// Default: the REDIS_URL variable (better for a password: a command line is visible
    /// to other users); neither: no sharing.
    #[arg(long, value_name = "URL", value_parser = RedisUrl::parse)]
    redis_url: Option<RedisUrl>,

    /// For a rediss:// URL: trust the CA certificates in this PEM file
    ///
    /// A deployment's own CA, instead of the public roots.
    #[arg(long, value_name = "FILE")]
    redis_ca: Option<std::path::PathBuf>,

    /// One namespace per deployment
    ///
    /// The replicas of one deployment share a namespace; other deployments on the same
    /// Redis use others.
    #[arg(long, value_name = "NAME", default_value = "default")]
    redis_namespace: String,

    /// Variable holding a secret shared by the replicas
    ///
    /// It keys the hash that names each API key in Redis (a key's value is never stored).
    /// Without it the namespace keys the hash, and whoever reads Redis can test a guessed
    /// key against it.
    #[arg(long, value_name = "NAME")]
    redis_secret_env: Option<String>,

    /// What to do while Redis is away: split (default), open or closed
    ///
    /// While Redis is unreachable, each replica: `split` each key's cap across the
    /// replicas last seen; `open` uses the whole cap; `closed` makes keys with a cap wait
    /// for Redis.
    #[arg(
        long,
        value_name = "POLICY",
        value_enum,
        default_value_t = PolicyArg::Split,
        hide_default_value = true,
        hide_possible_values = true
    )]
    degraded_policy: PolicyArg,
}

impl SharedArgs {
    /// Variables these flags read, for `.env`.
    pub(crate) fn env_names(&self) -> Vec<String> {
        let mut names = vec![REDIS_URL_ENV.to_owned()];
        names.extend(self.redis_secret_env.clone());
        names
    }
}

/// `--degraded-policy`.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum PolicyArg {
    Split,
    Open,
    Closed,
}

impl From<PolicyArg> for DegradedPolicy {
    fn from(arg: PolicyArg) -> Self {
        match arg {
            PolicyArg::Split => DegradedPolicy::Split,
            PolicyArg::Open => DegradedPolicy::Open,
            PolicyArg::Closed => DegradedPolicy::Closed,
        }
    }
}

/// A Redis URL: may hold a password, so its `Debug` shows nothing and parsing never
/// fails (clap would repeat a rejected value in its error); it is checked when used.
#[derive(Clone)]
struct RedisUrl(Zeroizing<String>);

impl RedisUrl {
    fn parse(s: &str) -> Result<Self, String> {
        Ok(Self(Zeroizing::new(s.to_owned())))
    }
}

impl std::fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RedisUrl(<redacted>)")
    }
}

/// Makes the backend the flags ask for (after `.env` is applied) and hands it to the pool;
/// the pool unchanged without a URL. Errors never contain the URL or the secret.
pub(crate) async fn apply(
    args: &SharedArgs,
    pool: KeyPoolBuilder,
) -> Result<KeyPoolBuilder, String> {
    let url = match &args.redis_url {
        Some(url) => url.0.clone(),
        None => match std::env::var(REDIS_URL_ENV) {
            Ok(url) if !url.trim().is_empty() => Zeroizing::new(url),
            _ => return Ok(pool),
        },
    };
    let secret = match &args.redis_secret_env {
        Some(var) => {
            let secret = Zeroizing::new(std::env::var(var).unwrap_or_default());
            if secret.trim().is_empty() {
                return Err(format!("Redis secret variable {var} is not set or empty"));
            }
            secret
        }
        None => {
            tracing::warn!(
                "--redis-secret-env not set: API keys are named in Redis by a hash keyed with the namespace only"
            );
            Zeroizing::new(args.redis_namespace.clone())
        }
    };
    let mut options = RedisOptions::default();
    options.namespace = args.redis_namespace.clone();
    if let Some(path) = &args.redis_ca {
        // Checked here for a clear error; the Redis client parses it again.
        crate::config::load_ca(path).map_err(|e| e.replacen("--upstream-ca", "--redis-ca", 1))?;
        options.tls_ca =
            Some(std::fs::read(path).map_err(|e| format!("--redis-ca {}: {e}", path.display()))?);
    }
    let backend = RedisBackend::new(url.trim(), secret.as_bytes(), options)
        .map_err(|e| format!("--redis-url (or {REDIS_URL_ENV}): {e}"))?;
    let policy = DegradedPolicy::from(args.degraded_policy);
    let connected = backend.connect().await;
    match backend.last_failure() {
        // A certificate refused is a configuration error that waiting will not mend.
        Some(failure) if !connected && failure.is_certificate() => {
            return Err(format!(
                "--redis-url (or {REDIS_URL_ENV}): {failure} (a CA of your own: --redis-ca FILE)"
            ));
        }
        _ => {}
    }
    if connected {
        tracing::info!(
            namespace = %args.redis_namespace,
            replica = backend.replica(),
            "Sharing key state through Redis (namespace {}, replica {}, degraded policy {})",
            args.redis_namespace,
            backend.replica(),
            policy.as_str()
        );
    } else {
        let why = backend
            .last_failure()
            .map(|failure| format!(" ({failure})"))
            .unwrap_or_default();
        tracing::warn!(
            namespace = %args.redis_namespace,
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
