//! [`RedisBackend`]: the keys' state shared through Redis (or Valkey), so that several
//! replicas behave like one pool. Cargo feature `redis`.
//!
//! # In the store
//!
//! Every name starts with `tkr:{<namespace>}:` (the braces keep a namespace on one
//! cluster slot, as multi-key scripts need). A key is named by a keyed hash of its value
//! (HMAC-SHA-256 under the deployment's secret, 128 bits in hex): never the value.
//!
//! | name | type | holds |
//! | --- | --- | --- |
//! | `k:<id>` | hash | `until` (the rest's end, on the server's clock, ms), `level`, `disabled`, `limit` (the learned concurrency limit) and `lgen` (its generation) |
//! | `c:<id>` | hash | per replica: `version:count` of its leases on the key |
//! | `q:<id>` | string | the key's quota state (GCRA's theoretical arrival time, server µs) |
//! | `p:<id>` | string | the replica whose probe of the key (its single request after a rest) is running |
//! | `replicas` | sorted set | replica → when it is considered dead (server ms) |
//! | `events` | channel | `rest <id> <ms left> <level> <disabled> <replica>`, `freed <id>`, `back <id> <0/1> <replica>`, `limit <id> <limit> <generation>` |
//!
//! # Scripts
//!
//! Five Lua scripts, each atomic and each reading only the server's clock (`TIME`);
//! replicas send and receive *remaining* durations, so their clocks never need to agree.
//! They are sent by hash and loaded again when the server answers `NOSCRIPT` (after a
//! restart or `SCRIPT FLUSH`).
//!
//! - `acquire`: admits a lease if the live replicas' counts leave room under the cap and
//!   the key's quota (GCRA, shared by every replica) has a unit (else says how long until
//!   it has one), and a probe only if no other replica's probe of the key is running.
//! - `counts`: this replica's absolute counts (newer versions only) and its heartbeat;
//!   announces `freed` when a count went down; answers how many replicas are alive.
//! - `rest`: a rest that only extends, a level that only rises (or a reset after a
//!   recovery), a disable for good; announced to the other replicas, and with it a
//!   probe's answer (`back`: the other replicas owe no probe of their own).
//! - `limit`: a key's learned concurrency limit, one for every replica (which `acquire`
//!   admits under): a lower one always wins, a raise only if made on the limit kept (its
//!   generation); every change raises the generation and is announced.
//! - `sync`: every key's rest and learned limit, for the periodic backstop and the merge
//!   after an outage.
//!
//! # When the store is away
//!
//! Every call has a budget ([`RedisOptions::call_timeout`], 100 ms). After
//! [`RedisOptions::failures`] failures in a row the breaker opens: the pool applies its
//! [`DegradedPolicy`](crate::shared::DegradedPolicy) and sends nothing to the store but a
//! `PING` per heartbeat. When one answers, this replica's rests, disables and levels are
//! merged into the store (the later deadline wins, a disable is kept, the higher level
//! wins, the lower learned limit wins), its counts written, every key's state read back, and sharing resumes.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hmac::{Hmac, Mac};
use redis::Client;
use redis::aio::ConnectionManager;
use sha2::Sha256;
use tokio::sync::{mpsc, watch};
use zeroize::Zeroizing;

use super::{BackendLink, Op, StateBackend};
use crate::key::KeySpec;

mod calls;
mod failure;
mod scripts;
mod task;

pub use failure::RedisFailure;
use scripts::Scripts;
use task::{run, subscribe};

/// Settings of a [`RedisBackend`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RedisOptions {
    /// Separates deployments sharing one server (default `default`).
    pub namespace: String,
    /// The budget of one call to the store (default 100 ms).
    pub call_timeout: Duration,
    /// How often the replica writes its counts, renews its life and syncs rests (default
    /// 1 s).
    pub heartbeat: Duration,
    /// How long a replica's counts live without a heartbeat (default 5 s): a replica that
    /// dies frees its leases within this.
    pub ttl: Duration,
    /// Failures in a row that open the breaker (default 3).
    pub failures: u32,
    /// For a `rediss://` URL: the CA certificates (PEM) to trust instead of the public
    /// roots (Mozilla's, built in), e.g. a deployment's own CA. Needs the `redis-tls`
    /// feature.
    pub tls_ca: Option<Vec<u8>>,
}

impl Default for RedisOptions {
    fn default() -> Self {
        Self {
            namespace: "default".to_owned(),
            call_timeout: Duration::from_millis(100),
            heartbeat: Duration::from_secs(1),
            ttl: Duration::from_secs(5),
            failures: 3,
            tls_ca: None,
        }
    }
}

/// Why a [`RedisBackend`] could not be made. Never shows the URL (it may hold a password).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisBackendError(&'static str);

impl fmt::Display for RedisBackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for RedisBackendError {}

/// A [`StateBackend`] on Redis or Valkey: see the [module docs](self).
///
/// Cheap to clone; every clone is the same backend. Give it to one pool
/// ([`KeyPoolBuilder::state_backend`](crate::KeyPoolBuilder::state_backend)).
///
/// # Examples
///
/// ```no_run
/// use tower_key_rotation::shared::redis::{RedisBackend, RedisOptions};
/// use tower_key_rotation::{KeyPool, KeySet};
///
/// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
/// let backend = RedisBackend::new(
///     &std::env::var("REDIS_URL")?,
///     b"a secret shared by the replicas",
///     RedisOptions::default(),
/// )?;
/// backend.connect().await; // else it starts degraded, and keeps trying
/// let pool = KeyPool::builder(KeySet::from_env("BIGMODEL_API_KEY")?)
///     .max_in_flight_per_key(2) // across every replica
///     .state_backend(backend)
///     .build();
/// # let _ = pool;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisBackend {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    /// The server's `host:port` (or socket path): what errors name, never the URL.
    server: String,
    /// Why the last failed call failed.
    last_failure: Mutex<Option<RedisFailure>>,
    options: RedisOptions,
    /// The HMAC key of key ids.
    secret: Zeroizing<Vec<u8>>,
    /// This replica's name in the store: random per process.
    replica: String,
    prefix: String,
    channel: String,
    connection: Mutex<Option<ConnectionManager>>,
    /// Replicas alive at the last heartbeat.
    replicas: AtomicU32,
    connected: AtomicBool,
    /// Failures in a row.
    failures: AtomicU32,
    /// Set when the breaker opens; cleared after the merge.
    open: AtomicBool,
    scripts: Scripts,
    /// Other replicas' changes applied here so far.
    applied: watch::Sender<u64>,
    /// The subscription to other replicas' events is live.
    subscribed: watch::Sender<bool>,
    /// Syncs done so far.
    syncs: watch::Sender<u64>,
    /// The breaker is closed: the replicas share their state.
    sharing: watch::Sender<bool>,
}

impl RedisBackend {
    /// A backend on the server at `url` (`redis://[user:password@]host:port[/db]`,
    /// `rediss://...` for TLS with the `redis-tls` feature, or `unix:///path/to/socket`),
    /// naming keys by an HMAC of their values under `secret` (the same in every replica of
    /// a deployment; keep it as secret as the keys). Nothing is contacted yet.
    ///
    /// # Errors
    ///
    /// If `url` is not a Redis URL, or [`RedisOptions::tls_ca`] is not PEM certificates or
    /// is given for a URL without TLS (the error never repeats the URL: it may hold a
    /// password).
    pub fn new(url: &str, secret: &[u8], options: RedisOptions) -> Result<Self, RedisBackendError> {
        let client = client(url, options.tls_ca.as_deref())?;
        let server = client.get_connection_info().addr().to_string();
        let prefix = format!("tkr:{{{}}}:", options.namespace);
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                server,
                last_failure: Mutex::new(None),
                secret: Zeroizing::new(secret.to_vec()),
                replica: format!("{:016x}", fastrand::u64(..)),
                channel: format!("{prefix}events"),
                prefix,
                options,
                connection: Mutex::new(None),
                replicas: AtomicU32::new(1),
                connected: AtomicBool::new(false),
                failures: AtomicU32::new(0),
                open: AtomicBool::new(true),
                scripts: Scripts::new(),
                applied: watch::Sender::new(0),
                subscribed: watch::Sender::new(false),
                syncs: watch::Sender::new(0),
                sharing: watch::Sender::new(false),
            }),
        })
    }

    /// Connects and announces this replica, within the call budget; `true` on success.
    /// A backend not connected when the pool is built starts degraded and keeps trying at
    /// every heartbeat.
    pub async fn connect(&self) -> bool {
        let inner = &self.inner;
        if inner.manager().await.is_none() {
            return false;
        }
        match inner.write_counts(&[]).await {
            Some(replicas) => {
                inner.open.store(false, Ordering::Release);
                inner.sharing.send_replace(true);
                inner.replicas.store(replicas, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }

    /// Why the last call to the store failed (`None` if none has), naming the server's
    /// host and port, never the URL's password: say, why [`connect`](Self::connect) failed.
    pub fn last_failure(&self) -> Option<RedisFailure> {
        self.inner
            .last_failure
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Whether the replicas share their state now (`false` while the store is away and the
    /// degraded policy applies): a test or a dashboard can wait for a change.
    pub fn sharing(&self) -> watch::Receiver<bool> {
        self.inner.sharing.subscribe()
    }

    /// This replica's name in the store (random per process).
    pub fn replica(&self) -> &str {
        &self.inner.replica
    }

    /// Counts other replicas' changes applied to this pool (rests, disables, levels): a
    /// test or a dashboard can wait for the next one.
    pub fn applied(&self) -> watch::Receiver<u64> {
        self.inner.applied.subscribe()
    }

    /// Waits until this replica hears other replicas' events (the subscription is live).
    pub async fn subscribed(&self) {
        let mut live = self.inner.subscribed.subscribe();
        let _ = live.wait_for(|live| *live).await;
    }

    /// Counts the syncs done so far (each reads every key's shared rest and applies it):
    /// a test or a dashboard can wait for the next one.
    pub fn syncs(&self) -> watch::Receiver<u64> {
        self.inner.syncs.subscribe()
    }
}

/// The client for `url`, trusting `ca` (PEM) for TLS if given.
fn client(url: &str, ca: Option<&[u8]>) -> Result<Client, RedisBackendError> {
    const NOT_A_URL: &str = if cfg!(feature = "redis-tls") {
        "not a Redis URL (expected redis://[user:password@]host:port[/db], rediss://... or unix:///path)"
    } else {
        "not a Redis URL (expected redis://[user:password@]host:port[/db] or unix:///path; TLS (rediss://) is not built in)"
    };
    let Some(ca) = ca else {
        return Client::open(url).map_err(|_| RedisBackendError(NOT_A_URL));
    };
    #[cfg(feature = "redis-tls")]
    {
        use redis::IntoConnectionInfo;
        let info = url
            .into_connection_info()
            .map_err(|_| RedisBackendError(NOT_A_URL))?;
        if !matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. }) {
            return Err(RedisBackendError(
                "a CA for Redis is given, but the URL is not rediss:// (TLS)",
            ));
        }
        let certificates = redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(ca.to_vec()),
        };
        Client::build_with_tls(info, certificates)
            .map_err(|_| RedisBackendError("the CA for Redis holds no usable PEM certificate"))
    }
    #[cfg(not(feature = "redis-tls"))]
    {
        let _ = (url, ca);
        Err(RedisBackendError(
            "a CA for Redis is given, but TLS is not built in (feature redis-tls)",
        ))
    }
}

impl fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Neither the URL (a password) nor the secret.
        f.debug_struct("RedisBackend")
            .field("namespace", &self.inner.options.namespace)
            .field("replica", &self.inner.replica)
            .field("connected", &self.inner.connected.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl StateBackend for RedisBackend {
    fn key_id(&self, spec: &KeySpec) -> String {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.inner.secret)
            .expect("HMAC takes a key of any length");
        mac.update(spec.key().expose_secret().as_bytes());
        let digest = mac.finalize().into_bytes();
        digest[..16].iter().map(|b| format!("{b:02x}")).collect()
    }

    fn attach(&self, link: BackendLink, ops: mpsc::UnboundedReceiver<Op>) {
        let inner = self.inner.clone();
        let connected = !inner.open.load(Ordering::Acquire);
        link.set_health(
            connected,
            !connected,
            Some(inner.replicas.load(Ordering::Relaxed)),
        );
        let link = Arc::new(link);
        tokio::spawn(subscribe(inner.clone(), link.clone()));
        tokio::spawn(run(inner, link, ops));
    }
}
