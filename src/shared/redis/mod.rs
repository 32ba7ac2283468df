//! [`RedisBackend`]: the keys' state shared through Redis (or Valkey), so that several
//! replicas behave like one pool. Cargo feature `redis`.
//!
//! # In the store
//!
//! A key is named by a keyed hash of its value (HMAC-SHA-256 under the deployment's
//! secret, 128 bits in hex): never the value. In a pool with buckets, each (key, bucket)
//! is shared as a key is, under the id `<key id>.<bucket>` (the bucket's name with each
//! byte outside `[A-Za-z0-9_-]` written `%XX`): the key's own id keeps what is
//! account-wide (disabled, account rests). The backend treats an id as an opaque string.
//! Every record of one id carries the whole id as a hash tag
//! (`tkr:<namespace>:{<id>}:<kind>`), so that each script's keys share one slot of a Redis
//! Cluster; the replicas' lives are one record of the namespace's own
//! (`tkr:{<namespace>}:replicas`). On a cluster (`RedisBackend::cluster`, feature
//! `redis-cluster`) each script goes to the node of its keys' slot, the sync reads one key
//! a call, and the replicas' messages go through the first node's subscription.
//!
//! | name | type | holds |
//! | --- | --- | --- |
//! | `tkr:<ns>:{<id>}:k` | hash | `until` (the rest's end, on the server's clock, ms), `level`, `disabled`, `cap`, `limit` (the learned concurrency limit), `lgen` (its generation), `floor` (the limit known to hold), `rat` (no raise before, server ms), `rwait` (the raise back-off, ms), `trial` (a raise's single try runs until, server ms), `tries` (a raise's tries served so far) |
//! | `tkr:<ns>:{<id>}:c` | hash | per replica: `count:deadline:generation`, its requests sent on the key, the server time the entry lives until (renewed by each call and the heartbeat), and how many times the replica reset it |
//! | `tkr:<ns>:{<id>}:w` | list | the queue: one entry (the replica's name) per lease waiting for the key, in arrival order across the replicas |
//! | `tkr:<ns>:{<id>}:q` | string | the key's quota state (GCRA's theoretical arrival time, server µs) |
//! | `tkr:<ns>:{<id>}:t` | string | the key's token quota state (GCRA in token units: its theoretical arrival time, server µs) |
//! | `tkr:<ns>:{<id>}:p` | string | the replica whose probe of the key (its single request after a rest) is running |
//! | `tkr:{<ns>}:replicas` | sorted set | replica → when it is considered dead (server ms) |
//! | `tkr:<ns>:events` | channel | `rest <id> <ms left> <level> <disabled> <replica>`, `grant <id> <replica> <n> <generation> <total>`, `back <id> <0/1> <replica>`, `limit <id> <limit> <generation> <floor> <ms until a raise>` |
//!
//! # Admission
//!
//! A lease on a capped key costs two calls: its admission and its release; so does a lease
//! on a key without a cap in its learning window ([`RedisOptions::learning_window`]), which
//! is counted (cap `COUNT_ONLY`) but never queued. Each admission tells the lease the key's
//! total across the replicas when it goes (the answer to `acquire`, `release` or `renew`,
//! or the `grant` message): a refusal of its request teaches the limit from that.
//!
//! - `acquire` admits the lease if the live replicas' counts leave room under the cap and
//!   nobody waits; else it appends the replica to the key's queue and the lease waits
//!   (here, in `poll_ready`). Either way it changes no other replica's count and
//!   publishes nothing (unless it hands a slot a dead replica freed to a waiter).
//! - `release` takes the lease off its replica's count and hands each slot it frees to
//!   the queue's first entry (whose count goes up at once: a *grant*): a grant to its own
//!   replica comes back in the answer, a grant to another replica is one message naming
//!   it (`grant`), which admits that replica's first waiting lease. A release so wakes at
//!   most as many waiters as it freed slots, in arrival order across the replicas.
//! - `renew` (each heartbeat, for the keys this replica counts on or waits for) keeps its
//!   entries alive, hands out the slots of replicas that died (their entries expire after
//!   [`RedisOptions::ttl`]: a dead replica's slots are free within the TTL plus one
//!   heartbeat), and repairs this replica's count when nothing of it is on its way.
//!
//! # Other scripts
//!
//! Each reads only the server's clock (`TIME`); replicas send and receive *remaining*
//! durations, so their clocks never need to agree. They are sent by hash and loaded
//! again when the server answers `NOSCRIPT` (after a restart or `SCRIPT FLUSH`).
//!
//! - `replicas`: this replica's life; answers which replicas are alive.
//! - `rest`: a rest that only extends, a level that only rises (or a reset after a
//!   recovery), a disable for good; announced to the other replicas, and with it a
//!   probe's answer (`back`: the other replicas owe no probe of their own).
//! - `limit`: a key's learned concurrency limit, one for every replica (which `acquire`
//!   admits under), with the limit known to hold and the raise back-off: a lower one
//!   always wins, a raise only if made on the limit kept (its generation), that limit
//!   holds and the back-off has passed; a refused try goes back to the limit known to hold
//!   and doubles the back-off (up to the pool's longest), one served as many times in a
//!   row as the raised limit holds; every change
//!   raises the generation and is announced. While a raise is tried, the admission
//!   scripts let one lease at a time above the limit known to hold.
//! - `sync`: every key's rest and learned limit, for the heartbeat's backstop and the
//!   merge after an outage.
//!
//! # When the store is away
//!
//! Every call has a budget ([`RedisOptions::call_timeout`], 100 ms). After
//! [`RedisOptions::failures`] failures in a row, or at once when the subscription's
//! connection closes, the breaker opens: the pool applies its
//! [`DegradedPolicy`](crate::shared::DegradedPolicy) (under `split`, for
//! [`RedisOptions::ttl`] no key takes more requests here than it had in flight then, while
//! the leases the store admitted end), leases waiting for a grant look again under it, and the backend sends nothing to the store but the heartbeat's try at
//! coming back. A replica whose leases only wait (and so makes no call) pings the store
//! when no call succeeded for 100 ms: it notices a hung store within 400 ms. When the
//! store answers, this replica's rests, disables and levels are merged into it (the later
//! deadline wins, a disable is kept, the higher level wins, the lower learned limit wins),
//! its counts written, every key's state read back, and sharing resumes.

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
mod tokens;

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
    /// How long a key without a cap or learned limit is counted by the store after its
    /// first use and after each refusal of it (default 60 s; zero: never): its leases
    /// cost an admission and a release, as a capped key's do, so that a refusal teaches
    /// its concurrency limit from the count across the replicas (see
    /// [`StateBackend::learning_window`]).
    pub learning_window: Duration,
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
            learning_window: Duration::from_secs(60),
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
    /// The sorted set of replicas' lives.
    replicas_key: String,
    connection: Mutex<Option<Connection>>,
    /// A Redis Cluster's client (its nodes): scripts go to the node of their keys' slot,
    /// and `client` (the first node) carries the subscription.
    #[cfg(feature = "redis-cluster")]
    cluster: Option<redis::cluster::ClusterClient>,
    /// Leases waiting for the store's grant, per key.
    waiting: Mutex<std::collections::HashMap<Arc<str>, task::KeyWait>>,
    /// Keys whose count this replica renewed since the last heartbeat.
    touched: Mutex<std::collections::HashSet<Arc<str>>>,
    /// When a call last succeeded (ms since `started`).
    last_ok: std::sync::atomic::AtomicU64,
    started: tokio::time::Instant,
    /// Replicas alive at the last heartbeat.
    replicas: AtomicU32,
    /// This replica's rank among them, by name.
    rank: AtomicU32,
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
        Ok(Self::with(client, server, secret, options))
    }

    /// A backend on the Redis Cluster (or Valkey cluster) whose nodes include those at
    /// `urls` (`redis://[user:password@]host:port`; one is enough, the others are found
    /// from it): each script runs on the node of its keys' slot (every record of one id
    /// carries the id as a hash tag), and the replicas hear each other through the first
    /// node's subscription (a cluster's `PUBLISH` reaches every node). Otherwise as
    /// [`new`](Self::new). Needs the `redis-cluster` feature.
    ///
    /// # Errors
    ///
    /// If `urls` is empty or one is not a Redis URL (never repeated: it may hold a
    /// password), or [`RedisOptions::tls_ca`] is given (TLS to a cluster is not built in).
    #[cfg(feature = "redis-cluster")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis-cluster")))]
    pub fn cluster(
        urls: &[&str],
        secret: &[u8],
        options: RedisOptions,
    ) -> Result<Self, RedisBackendError> {
        let Some(first) = urls.first() else {
            return Err(RedisBackendError(
                "a Redis Cluster needs at least one node's URL",
            ));
        };
        if options.tls_ca.is_some() {
            return Err(RedisBackendError(
                "a CA for Redis is given, but TLS to a Redis Cluster is not built in",
            ));
        }
        let client = client(first, None)?;
        let server = format!("{} (cluster)", client.get_connection_info().addr());
        let budget = options.call_timeout;
        let cluster = redis::cluster::ClusterClient::builder(urls.iter().copied())
            .connection_timeout(budget)
            .response_timeout(budget)
            .retries(1)
            .build()
            .map_err(|_| {
                RedisBackendError("not a Redis URL (expected redis://[user:password@]host:port)")
            })?;
        let mut backend = Self::with(client, server, secret, options);
        Arc::get_mut(&mut backend.inner)
            .expect("a backend just made is not shared yet")
            .cluster = Some(cluster);
        Ok(backend)
    }

    fn with(client: Client, server: String, secret: &[u8], options: RedisOptions) -> Self {
        let prefix = format!("tkr:{}:", options.namespace);
        Self {
            inner: Arc::new(Inner {
                client,
                server,
                #[cfg(feature = "redis-cluster")]
                cluster: None,
                last_failure: Mutex::new(None),
                secret: Zeroizing::new(secret.to_vec()),
                replica: format!("{:016x}", fastrand::u64(..)),
                channel: format!("{prefix}events"),
                replicas_key: format!("tkr:{{{}}}:replicas", options.namespace),
                prefix,
                options,
                connection: Mutex::new(None),
                waiting: Mutex::default(),
                touched: Mutex::default(),
                last_ok: std::sync::atomic::AtomicU64::new(0),
                started: tokio::time::Instant::now(),
                replicas: AtomicU32::new(1),
                rank: AtomicU32::new(0),
                connected: AtomicBool::new(false),
                failures: AtomicU32::new(0),
                open: AtomicBool::new(true),
                scripts: Scripts::new(),
                applied: watch::Sender::new(0),
                subscribed: watch::Sender::new(false),
                syncs: watch::Sender::new(0),
                sharing: watch::Sender::new(false),
            }),
        }
    }

    /// Connects and announces this replica, within the call budget; `true` on success.
    /// A backend not connected when the pool is built starts degraded and keeps trying at
    /// every heartbeat.
    pub async fn connect(&self) -> bool {
        let inner = &self.inner;
        if inner.manager().await.is_none() {
            return false;
        }
        match inner.live_replicas().await {
            Some(replicas) => {
                inner.open.store(false, Ordering::Release);
                inner.sharing.send_replace(true);
                inner.replicas.store(
                    u32::try_from(replicas.len()).unwrap_or(1),
                    Ordering::Relaxed,
                );
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

/// A connection to the store: to one server (made again when lost), or to a cluster's
/// nodes (each command to the node of its keys' slot).
#[derive(Clone)]
pub(super) enum Connection {
    Single(ConnectionManager),
    #[cfg(feature = "redis-cluster")]
    Cluster(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for Connection {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Self::Single(connection) => connection.req_packed_command(cmd),
            #[cfg(feature = "redis-cluster")]
            Self::Cluster(connection) => connection.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Self::Single(connection) => connection.req_packed_commands(cmd, offset, count),
            #[cfg(feature = "redis-cluster")]
            Self::Cluster(connection) => connection.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(connection) => connection.get_db(),
            #[cfg(feature = "redis-cluster")]
            Self::Cluster(connection) => connection.get_db(),
        }
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

    fn learning_window(&self) -> Duration {
        self.inner.options.learning_window
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
