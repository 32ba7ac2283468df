//! The backend's task: what leaves the request path (counts, rests, outcomes), the
//! heartbeat, and the other replicas' messages.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::*;
use crate::shared::{BackendLink, Op, RemoteLimit, RemoteRest};

impl Inner {
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
            Op::Limit {
                key,
                limit,
                generation,
                raise,
            } => {
                // The store's answer: this replica's own limit, or one it must take
                // (another replica's lower one, or a raise refused).
                if let Some(kept) = inner.limit(&key, limit, generation, raise).await {
                    link.apply_limit(&key, kept);
                }
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
        (Some("limit"), Some(id)) => {
            let (Some(limit), Some(generation)) = (
                words.next().and_then(|w| w.parse().ok()),
                words.next().and_then(|w| w.parse().ok()),
            ) else {
                return;
            };
            if link.apply_limit(id, RemoteLimit { limit, generation }) {
                inner.applied.send_modify(|n| *n += 1);
            }
        }
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
