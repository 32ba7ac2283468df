//! The backend's task: what leaves the request path (counts, rests, outcomes), the
//! heartbeat, and the other replicas' messages.

use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::mpsc;

use super::*;
use crate::shared::{Acquire, BackendLink, Op, RemoteRest};

impl Inner {
    pub(super) fn key(&self, kind: &str, id: &str) -> String {
        format!("{}{kind}:{id}", self.prefix)
    }

    pub(super) fn replicas_key(&self) -> String {
        format!("{}replicas", self.prefix)
    }

    /// The connection, made if there is none yet (within the budget).
    pub(super) async fn manager(&self) -> Option<ConnectionManager> {
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
    pub(super) async fn call<T: redis::FromRedisValue>(
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

    pub(super) fn failed(&self) {
        self.connected.store(false, Ordering::Relaxed);
        self.failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Writes this replica's counts (and renews its life); the replicas alive.
    pub(super) async fn write_counts(
        &self,
        counts: &[(Arc<str>, crate::shared::KeyCount)],
    ) -> Option<u32> {
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
    pub(super) async fn acquire(&self, acquire: &Acquire) -> Option<Result<(), Option<Duration>>> {
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
    pub(super) async fn rest(
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
    pub(super) async fn sync(&self, link: &BackendLink) -> bool {
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
    pub(super) async fn merge(&self, link: &BackendLink) -> bool {
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

    pub(super) fn breaker_open(&self, link: &BackendLink) -> bool {
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
pub(super) const PROBE_TTL: Duration = Duration::from_secs(10);

pub(super) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The backend's task: carries the pool's ops to the store, heartbeats, syncs, and runs
/// the breaker.
pub(super) async fn run(
    inner: Arc<Inner>,
    link: Arc<BackendLink>,
    mut ops: mpsc::UnboundedReceiver<Op>,
) {
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
pub(super) fn dispatch(inner: &Arc<Inner>, link: &Arc<BackendLink>, op: Op) {
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
pub(super) async fn tick(inner: &Inner, link: &BackendLink, ticks: u64) {
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
pub(super) async fn subscribe(inner: Arc<Inner>, link: Arc<BackendLink>) {
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
pub(super) fn event(inner: &Inner, link: &BackendLink, text: &str) {
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
