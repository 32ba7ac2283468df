//! The backend's calls to the store: the connection, the budget and the breaker's count of
//! failures, and what each script is asked and answers.

use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::task::{PROBE_TTL, millis};
use super::*;
use crate::shared::{Acquire, BackendLink, RemoteLimit, RemoteRest};

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
            Ok(Err(error)) => {
                self.failed_with(RedisFailure::of(&self.server, &error));
                None
            }
            Err(_) => {
                self.failed_with(RedisFailure::timeout(&self.server, budget * 2));
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
                let failure = RedisFailure::of(&self.server, &error);
                tracing::debug!("Redis call failed: {failure}");
                self.failed_with(failure);
                None
            }
            Err(_) => {
                tracing::debug!("Redis call timed out");
                self.failed_with(RedisFailure::timeout(
                    &self.server,
                    self.options.call_timeout,
                ));
                None
            }
        }
    }

    pub(super) fn failed_with(&self, failure: RedisFailure) {
        *self
            .last_failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(failure);
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
            .key(self.key("k", &acquire.key))
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

    /// Writes a learned limit (see [`Op::Limit`]); the limit the store keeps, if it answered.
    pub(super) async fn limit(
        &self,
        id: &str,
        limit: u32,
        generation: u64,
        raise: bool,
    ) -> Option<RemoteLimit> {
        let mut invocation = self.scripts.limit.prepare_invoke();
        invocation
            .key(self.key("k", id))
            .arg(limit)
            .arg(generation)
            .arg(u8::from(raise))
            .arg(&self.channel)
            .arg(id);
        let (limit, generation) = self.call::<(u32, u64)>(invocation).await?;
        Some(RemoteLimit { limit, generation })
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
        let Some(states) = self.call::<Vec<(u64, u32, u8, u32, u64)>>(invocation).await else {
            return false;
        };
        for (id, (left, level, disabled, limit, generation)) in ids.iter().zip(states) {
            if limit > 0 {
                link.apply_limit(id, RemoteLimit { limit, generation });
            }
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
            // A limit learned while away: the lower one wins.
            if let Some(limit) = rest.limit {
                match self
                    .limit(&rest.key, limit.limit, limit.generation, false)
                    .await
                {
                    Some(kept) => {
                        link.apply_limit(&rest.key, kept);
                    }
                    None => return false,
                }
            }
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
}
