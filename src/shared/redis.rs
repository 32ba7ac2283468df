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
//! | `k:<id>` | hash | `until` (the rest's end, on the server's clock, ms), `level`, `disabled` |
//! | `c:<id>` | hash | per replica: `version:count` of its leases on the key |
//! | `q:<id>` | string | the key's quota state (GCRA's theoretical arrival time, server µs) |
//! | `p:<id>` | string | the replica whose probe of the key (its single request after a rest) is running |
//! | `replicas` | sorted set | replica → when it is considered dead (server ms) |
//! | `events` | channel | `rest <id> <ms left> <level> <disabled> <replica>`, `freed <id>`, `back <id> <0/1> <replica>` |
//!
//! # Scripts
//!
//! Four Lua scripts, each atomic and each reading only the server's clock (`TIME`);
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
//! - `sync`: every key's rest, for the periodic backstop and the merge after an outage.
//!
//! # When the store is away
//!
//! Every call has a budget ([`RedisOptions::call_timeout`], 100 ms). After
//! [`RedisOptions::failures`] failures in a row the breaker opens: the pool applies its
//! [`DegradedPolicy`](crate::shared::DegradedPolicy) and sends nothing to the store but a
//! `PING` per heartbeat. When one answers, this replica's rests, disables and levels are
//! merged into the store (the later deadline wins, a disable is kept, the higher level
//! wins), its counts written, every key's state read back, and sharing resumes.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::StreamExt;
use hmac::{Hmac, Mac};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, Script};
use sha2::Sha256;
use tokio::sync::{mpsc, watch};
use zeroize::Zeroizing;

use super::{Acquire, BackendLink, Op, RemoteRest, StateBackend};
use crate::key::KeySpec;

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
}

impl Default for RedisOptions {
    fn default() -> Self {
        Self {
            namespace: "default".to_owned(),
            call_timeout: Duration::from_millis(100),
            heartbeat: Duration::from_secs(1),
            ttl: Duration::from_secs(5),
            failures: 3,
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

struct Scripts {
    acquire: Script,
    counts: Script,
    rest: Script,
    sync: Script,
}

/// `now` in milliseconds on the server's clock.
const NOW: &str = "local t = redis.call('TIME')\n\
                   local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n";

/// KEYS: counts hash, replicas, quota state, probe holder. ARGV: replica, version,
/// count, cap, ttl (ms), quota interval and tolerance (µs; interval 0: no quota), probe
/// (0/1), probe's time to live (ms). Returns {1, 0} admitted, {0, 0} full (or another
/// replica's probe running), {0, ms} no quota unit for that long.
const ACQUIRE: &str = r#"
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[5]), ARGV[1])
local me, v, c, cap = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local probe = ARGV[8] == '1'
if probe then
  local holder = redis.call('GET', KEYS[4])
  if holder and holder ~= me then
    return {0, 0}
  end
end
local interval, tolerance = tonumber(ARGV[6]), tonumber(ARGV[7])
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = 0
if interval > 0 then
  tat = math.max(tonumber(redis.call('GET', KEYS[3]) or '0'), now_us)
  if tat - now_us > tolerance then
    return {0, math.max(1, math.ceil((tat - tolerance - now_us) / 1000))}
  end
end
local mine, store = c, true
local stored = redis.call('HGET', KEYS[1], me)
if stored then
  local sv, sc = string.match(stored, '^(%d+):(%d+)$')
  if tonumber(sv) >= v then
    mine, store = tonumber(sc), false
  end
end
local others = 0
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
  local r = fields[i]
  if r ~= me then
    local alive = redis.call('ZSCORE', KEYS[2], r)
    if alive and tonumber(alive) > now then
      others = others + tonumber(string.match(fields[i + 1], ':(%d+)$'))
    else
      redis.call('HDEL', KEYS[1], r)
    end
  end
end
if others + mine > cap then
  return {0, 0}
end
if store then
  redis.call('HSET', KEYS[1], me, string.format('%d:%d', v, c))
end
if interval > 0 then
  local next = tat + interval
  redis.call('SET', KEYS[3], string.format('%d', next), 'PX', math.ceil((next - now_us) / 1000) + 1000)
end
if probe then
  redis.call('SET', KEYS[4], me, 'PX', tonumber(ARGV[9]))
end
return {1, 0}
"#;

/// KEYS: replicas, then one counts hash per key. ARGV: replica, ttl (ms), channel, then
/// per key: id, version, count. Returns the replicas alive.
const COUNTS: &str = r#"
local me = ARGV[1]
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), me)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
for i = 2, #KEYS do
  local base = 4 + (i - 2) * 3
  local id, v, c = ARGV[base], tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2])
  local sv, sc = -1, 0
  local stored = redis.call('HGET', KEYS[i], me)
  if stored then
    local a, b = string.match(stored, '^(%d+):(%d+)$')
    sv, sc = tonumber(a), tonumber(b)
  end
  if v > sv then
    redis.call('HSET', KEYS[i], me, string.format('%d:%d', v, c))
    if c < sc then
      redis.call('PUBLISH', ARGV[3], 'freed ' .. id)
    end
  end
end
return redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')
"#;

/// KEYS: state hash, probe holder. ARGV: ms left, level, disabled (0/1), recovered
/// (0/1), channel, id, replica, probe done (0/1), back (0/1). Returns {ms left, level,
/// disabled}. A probe's answer is announced after the rest it started.
const REST: &str = r#"
local u = tonumber(redis.call('HGET', KEYS[1], 'until') or '0')
local left = tonumber(ARGV[1])
if left > 0 and now + left > u then
  u = now + left
  redis.call('HSET', KEYS[1], 'until', u)
end
local level = tonumber(redis.call('HGET', KEYS[1], 'level') or '0')
if ARGV[4] == '1' then
  level = 0
elseif tonumber(ARGV[2]) > level then
  level = tonumber(ARGV[2])
end
redis.call('HSET', KEYS[1], 'level', level)
if ARGV[3] == '1' then
  redis.call('HSET', KEYS[1], 'disabled', '1')
end
local disabled = 0
if redis.call('HGET', KEYS[1], 'disabled') == '1' then
  disabled = 1
end
left = math.max(u - now, 0)
redis.call('PUBLISH', ARGV[5], string.format('rest %s %d %d %d %s', ARGV[6], left, level, disabled, ARGV[7]))
if ARGV[8] == '1' then
  if redis.call('GET', KEYS[2]) == ARGV[7] then
    redis.call('DEL', KEYS[2])
  end
  redis.call('PUBLISH', ARGV[5], string.format('back %s %s %s', ARGV[6], ARGV[9], ARGV[7]))
end
return {left, level, disabled}
"#;

/// KEYS: state hashes. Returns per key {ms left, level, disabled}.
const SYNC: &str = r#"
local out = {}
for i = 1, #KEYS do
  local s = redis.call('HMGET', KEYS[i], 'until', 'level', 'disabled')
  local u = tonumber(s[1] or '0')
  local disabled = 0
  if s[3] == '1' then
    disabled = 1
  end
  out[i] = {math.max(u - now, 0), tonumber(s[2] or '0'), disabled}
end
return out
"#;

impl Scripts {
    fn new() -> Self {
        let script = |body: &str| Script::new(&format!("{NOW}{body}"));
        Self {
            acquire: script(ACQUIRE),
            counts: script(COUNTS),
            rest: script(REST),
            sync: script(SYNC),
        }
    }
}

impl RedisBackend {
    /// A backend on the server at `url` (`redis://[user:password@]host:port[/db]`, or
    /// `unix:///path/to/socket`), naming keys by an HMAC of their values under `secret`
    /// (the same in every replica of a deployment; keep it as secret as the keys). Nothing
    /// is contacted yet.
    ///
    /// # Errors
    ///
    /// If `url` is not a Redis URL (the error never repeats it: it may hold a password).
    pub fn new(url: &str, secret: &[u8], options: RedisOptions) -> Result<Self, RedisBackendError> {
        let client = Client::open(url).map_err(|_| {
            RedisBackendError(
                "not a Redis URL (expected redis://[user:password@]host:port[/db] or unix:///path; TLS is not built in)",
            )
        })?;
        let prefix = format!("tkr:{{{}}}:", options.namespace);
        Ok(Self {
            inner: Arc::new(Inner {
                client,
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

impl Inner {
    fn key(&self, kind: &str, id: &str) -> String {
        format!("{}{kind}:{id}", self.prefix)
    }

    fn replicas_key(&self) -> String {
        format!("{}replicas", self.prefix)
    }

    /// The connection, made if there is none yet (within the budget).
    async fn manager(&self) -> Option<ConnectionManager> {
        if let Some(manager) = self
            .connection
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
        {
            return Some(manager);
        }
        let budget = self.options.call_timeout;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(budget))
            .set_response_timeout(Some(budget))
            .set_number_of_retries(1);
        let made = tokio::time::timeout(
            budget * 2,
            ConnectionManager::new_with_config(self.client.clone(), config),
        )
        .await;
        match made {
            Ok(Ok(manager)) => {
                *self
                    .connection
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Some(manager.clone());
                Some(manager)
            }
            _ => {
                self.failed();
                None
            }
        }
    }

    /// Runs a script within the budget; `None` on any failure (counted by the breaker).
    async fn call<T: redis::FromRedisValue>(
        &self,
        invocation: redis::ScriptInvocation<'_>,
    ) -> Option<T> {
        let mut manager = self.manager().await?;
        // `invoke_async` sends the script by hash and loads it again after NOSCRIPT.
        match tokio::time::timeout(
            self.options.call_timeout,
            invocation.invoke_async(&mut manager),
        )
        .await
        {
            Ok(Ok(value)) => {
                self.failures.store(0, Ordering::Relaxed);
                self.connected.store(true, Ordering::Relaxed);
                Some(value)
            }
            Ok(Err(error)) => {
                // A server's error names the command, never the URL.
                tracing::debug!("Redis call failed: {:?}", error.kind());
                self.failed();
                None
            }
            Err(_) => {
                tracing::debug!("Redis call timed out");
                self.failed();
                None
            }
        }
    }

    fn failed(&self) {
        self.connected.store(false, Ordering::Relaxed);
        self.failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Writes this replica's counts (and renews its life); the replicas alive.
    async fn write_counts(&self, counts: &[(Arc<str>, super::KeyCount)]) -> Option<u32> {
        let scripts = &self.scripts;
        let mut invocation = scripts.counts.prepare_invoke();
        invocation
            .key(self.replicas_key())
            .arg(&self.replica)
            .arg(millis(self.options.ttl))
            .arg(&self.channel);
        for (id, count) in counts {
            invocation
                .key(self.key("c", id))
                .arg(&**id)
                .arg(count.version)
                .arg(count.count);
        }
        self.call::<u32>(invocation).await
    }

    /// `Some(Ok(()))` admitted, `Some(Err(None))` full, `Some(Err(Some(wait)))` no quota
    /// unit for `wait`; `None` if the store failed.
    async fn acquire(&self, acquire: &Acquire) -> Option<Result<(), Option<Duration>>> {
        // The interval rounded up and the tolerance down: the quota's promise holds (see
        // `Quota::interval`).
        let micros_up = |d: Duration| u64::try_from(d.as_nanos().div_ceil(1000));
        let micros_down = |d: Duration| u64::try_from(d.as_micros());
        let (interval, tolerance) = acquire.quota.map_or((0, 0), |quota| {
            (
                micros_up(quota.interval).unwrap_or(u64::MAX).max(1),
                micros_down(quota.tolerance).unwrap_or(u64::MAX),
            )
        });
        let mut invocation = self.scripts.acquire.prepare_invoke();
        invocation
            .key(self.key("c", &acquire.key))
            .key(self.replicas_key())
            .key(self.key("q", &acquire.key))
            .key(self.key("p", &acquire.key))
            .arg(&self.replica)
            .arg(acquire.count.version)
            .arg(acquire.count.count)
            .arg(acquire.cap)
            .arg(millis(self.options.ttl))
            .arg(interval)
            .arg(tolerance)
            .arg(u8::from(acquire.probe))
            .arg(millis(PROBE_TTL));
        let (admitted, wait) = self.call::<(u8, u64)>(invocation).await?;
        Some(match (admitted, wait) {
            (1, _) => Ok(()),
            (_, 0) => Err(None),
            (_, ms) => Err(Some(Duration::from_millis(ms))),
        })
    }

    /// Writes a rest, disable or level (and a probe's answer: `probe` is `Some(back)`).
    #[allow(clippy::too_many_arguments)]
    async fn rest(
        &self,
        id: &str,
        left: Duration,
        level: u32,
        disabled: bool,
        recovered: bool,
        probe: Option<bool>,
    ) -> bool {
        let mut invocation = self.scripts.rest.prepare_invoke();
        invocation
            .key(self.key("k", id))
            .key(self.key("p", id))
            .arg(millis(left))
            .arg(level)
            .arg(u8::from(disabled))
            .arg(u8::from(recovered))
            .arg(&self.channel)
            .arg(id)
            .arg(&self.replica)
            .arg(u8::from(probe.is_some()))
            .arg(u8::from(probe == Some(true)));
        self.call::<(u64, u32, u8)>(invocation).await.is_some()
    }

    /// Reads every key's shared rest and applies it here; `false` if the store failed.
    async fn sync(&self, link: &BackendLink) -> bool {
        let ids = link.keys();
        if ids.is_empty() {
            return true;
        }
        let mut invocation = self.scripts.sync.prepare_invoke();
        for id in &ids {
            invocation.key(self.key("k", id));
        }
        let Some(states) = self.call::<Vec<(u64, u32, u8)>>(invocation).await else {
            return false;
        };
        for (id, (left, level, disabled)) in ids.iter().zip(states) {
            let rest = RemoteRest {
                remaining: (left > 0).then(|| Duration::from_millis(left)),
                level,
                disabled: disabled == 1,
            };
            if rest != RemoteRest::default() {
                link.apply(id, rest);
            }
        }
        self.syncs.send_modify(|n| *n += 1);
        true
    }

    /// The store is back: put this replica's state into it (no side loses anything: the
    /// scripts keep the later deadline, the disable, the higher level), then read it all
    /// back.
    async fn merge(&self, link: &BackendLink) -> bool {
        for rest in link.rests() {
            let left = rest.remaining.unwrap_or_default();
            if (left.is_zero() && rest.level == 0 && !rest.disabled)
                || self
                    .rest(&rest.key, left, rest.level, rest.disabled, false, None)
                    .await
            {
                continue;
            }
            return false;
        }
        let Some(replicas) = self.write_counts(&link.counts()).await else {
            return false;
        };
        self.replicas.store(replicas, Ordering::Relaxed);
        self.sync(link).await
    }

    fn breaker_open(&self, link: &BackendLink) -> bool {
        if self.open.load(Ordering::Acquire) {
            return true;
        }
        if self.failures.load(Ordering::Relaxed) >= self.options.failures {
            self.open.store(true, Ordering::Release);
            tracing::warn!(
                policy = link.policy().as_str(),
                "Redis unreachable: sharing suspended, each replica on its own ({} policy) until it is back",
                link.policy().as_str()
            );
            link.set_health(false, true, None);
            self.sharing.send_replace(false);
            return true;
        }
        false
    }
}

/// How long a replica's probe holds a key's single probe in the store: a probe whose
/// replica died lets another replica probe after this.
const PROBE_TTL: Duration = Duration::from_secs(10);

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The backend's task: carries the pool's ops to the store, heartbeats, syncs, and runs
/// the breaker.
async fn run(inner: Arc<Inner>, link: Arc<BackendLink>, mut ops: mpsc::UnboundedReceiver<Op>) {
    let mut heartbeat = tokio::time::interval(inner.options.heartbeat);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks = 0u64;
    loop {
        tokio::select! {
            op = ops.recv() => match op {
                // The pool is gone.
                None => return,
                Some(op) => dispatch(&inner, &link, op),
            },
            _ = heartbeat.tick() => {
                ticks += 1;
                tick(&inner, &link, ticks).await;
            }
        }
    }
}

/// Sends one op on its own task (a slow store must not hold up the others).
fn dispatch(inner: &Arc<Inner>, link: &Arc<BackendLink>, op: Op) {
    if inner.breaker_open(link) {
        match op {
            // Decided alone; merged when the store is back.
            Op::Acquire(acquire) => {
                let admitted = link.admits_degraded(acquire.count.count, acquire.cap);
                acquire.admit(admitted);
            }
            // Written at the merge.
            Op::Counts => {
                let _ = link.counts();
            }
            _ => {}
        }
        return;
    }
    let inner = inner.clone();
    let link = link.clone();
    tokio::spawn(async move {
        match op {
            Op::Acquire(acquire) => match inner.acquire(&acquire).await {
                Some(Ok(())) => acquire.admit(true),
                Some(Err(None)) => acquire.admit(false),
                Some(Err(Some(wait))) => acquire.quota_in(wait),
                None => {
                    let admitted = link.admits_degraded(acquire.count.count, acquire.cap);
                    acquire.admit(admitted);
                }
            },
            Op::Counts => {
                let counts = link.counts();
                if let Some(replicas) = inner.write_counts(&counts).await {
                    inner.replicas.store(replicas, Ordering::Relaxed);
                }
            }
            Op::Rest {
                key,
                remaining,
                level,
            } => {
                inner.rest(&key, remaining, level, false, false, None).await;
            }
            Op::ProbeDone { key, back, rest } => {
                let (left, level) = rest.unwrap_or_default();
                // A probe that went through proves the key recovered.
                inner.rest(&key, left, level, false, back, Some(back)).await;
            }
            Op::Disable { key } => {
                inner.rest(&key, Duration::ZERO, 0, true, false, None).await;
            }
            Op::Recovered { key } => {
                inner.rest(&key, Duration::ZERO, 0, false, true, None).await;
            }
        }
        inner.breaker_open(&link);
    });
}

/// A heartbeat: counts and life, then the rests' sync; while the breaker is open, a try
/// at coming back.
async fn tick(inner: &Inner, link: &BackendLink, ticks: u64) {
    if inner.breaker_open(link) {
        if inner.merge(link).await {
            inner.failures.store(0, Ordering::Relaxed);
            inner.open.store(false, Ordering::Release);
            let replicas = inner.replicas.load(Ordering::Relaxed);
            tracing::info!(replicas, "Redis reachable: state merged, sharing resumed");
            link.set_health(true, false, Some(replicas));
            inner.sharing.send_replace(true);
        }
        return;
    }
    let before = inner.replicas.load(Ordering::Relaxed);
    let Some(replicas) = inner.write_counts(&link.counts()).await else {
        inner.breaker_open(link);
        return;
    };
    inner.replicas.store(replicas, Ordering::Relaxed);
    link.set_health(true, false, Some(replicas));
    if !inner.sync(link).await {
        inner.breaker_open(link);
        return;
    }
    // A replica gone frees its leases without a word: let waiters look again. So does
    // every tenth beat, in case a release announcement was lost.
    if replicas < before || ticks % 10 == 0 {
        link.refresh();
    }
}

/// Hears the other replicas' events, and subscribes again after the store comes back.
async fn subscribe(inner: Arc<Inner>, link: Arc<BackendLink>) {
    loop {
        let budget = inner.options.call_timeout * 2;
        if let Ok(Ok(mut pubsub)) =
            tokio::time::timeout(budget, inner.client.get_async_pubsub()).await
        {
            if let Ok(Ok(())) = tokio::time::timeout(budget, pubsub.subscribe(&inner.channel)).await
            {
                inner.subscribed.send_replace(true);
                // Messages may have been missed while away.
                if !inner.open.load(Ordering::Acquire) {
                    inner.sync(&link).await;
                }
                link.refresh();
                let mut messages = pubsub.on_message();
                while let Some(message) = messages.next().await {
                    if let Ok(text) = message.get_payload::<String>() {
                        event(&inner, &link, &text);
                    }
                }
                inner.subscribed.send_replace(false);
            }
        }
        // Not a synchronisation: the pace of reconnection attempts.
        tokio::time::sleep(inner.options.heartbeat).await;
    }
}

/// One event from the channel.
fn event(inner: &Inner, link: &BackendLink, text: &str) {
    let mut words = text.split(' ');
    match (words.next(), words.next()) {
        (Some("freed"), Some(id)) => link.freed(id),
        (Some("back"), Some(id)) => {
            let back = words.next() == Some("1");
            if words.next() != Some(inner.replica.as_str()) {
                link.probe_done(id, back);
            }
        }
        (Some("rest"), Some(id)) => {
            let mut number = || words.next().and_then(|w| w.parse::<u64>().ok());
            let (Some(left), Some(level), Some(disabled)) = (number(), number(), number()) else {
                return;
            };
            if words.next() == Some(inner.replica.as_str()) {
                return; // this replica's own
            }
            let rest = RemoteRest {
                remaining: (left > 0).then(|| Duration::from_millis(left)),
                level: u32::try_from(level).unwrap_or(u32::MAX),
                disabled: disabled == 1,
            };
            if link.apply(id, rest) {
                inner.applied.send_modify(|n| *n += 1);
            }
        }
        _ => {}
    }
}
