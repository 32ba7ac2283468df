//! The backend's calls to the store: the connection, the budget and the breaker's count of
//! failures, and what each script is asked and answers.

use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::Connection;

use super::task::{PROBE_TTL, millis};
use super::*;
use crate::shared::{Acquire, BackendLink, LimitChange, RemoteLimit, RemoteRest};

/// The store's answer to an acquire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Acquired {
    /// Admitted: its request may go.
    Admitted,
    /// Queued: it waits for a grant.
    Queued,
    /// Refused: another replica's probe of the key runs.
    Refused,
    /// No quota unit for this long.
    QuotaIn(Duration),
}

impl Inner {
    /// The name of the store's `kind` of record for the key `id`: `tkr:<ns>:{<id>}:<kind>`,
    /// the id a hash tag, so that every record of one key is on one cluster slot.
    pub(super) fn key(&self, kind: &str, id: &str) -> String {
        format!("{}{{{id}}}:{kind}", self.prefix)
    }

    /// Is the store a Redis Cluster?
    #[cfg(feature = "redis-cluster")]
    pub(super) fn is_cluster(&self) -> bool {
        self.cluster.is_some()
    }

    /// Is the store a Redis Cluster? Not without the `redis-cluster` feature.
    #[cfg(not(feature = "redis-cluster"))]
    pub(super) fn is_cluster(&self) -> bool {
        false
    }

    /// The connection, made if there is none yet (within the budget).
    pub(super) async fn manager(&self) -> Option<Connection> {
        if let Some(manager) = self
            .connection
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
        {
            return Some(manager);
        }
        let budget = self.options.call_timeout;
        #[cfg(feature = "redis-cluster")]
        if let Some(cluster) = &self.cluster {
            let made = tokio::time::timeout(budget * 2, cluster.get_async_connection()).await;
            return self.keep(made.map(|made| made.map(Connection::Cluster)), budget * 2);
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(budget))
            .set_response_timeout(Some(budget))
            .set_number_of_retries(1);
        let made = tokio::time::timeout(
            budget * 2,
            ConnectionManager::new_with_config(self.client.clone(), config),
        )
        .await;
        self.keep(made.map(|made| made.map(Connection::Single)), budget * 2)
    }

    /// Keeps a connection just made for the next calls; a failure to make one (within
    /// `waited`) counts with the breaker.
    fn keep(
        &self,
        made: Result<Result<Connection, redis::RedisError>, tokio::time::error::Elapsed>,
        waited: Duration,
    ) -> Option<Connection> {
        match made {
            Ok(Ok(connection)) => {
                *self
                    .connection
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Some(connection.clone());
                Some(connection)
            }
            Ok(Err(error)) => {
                self.failed_with(RedisFailure::of(&self.server, &error));
                None
            }
            Err(_) => {
                self.failed_with(RedisFailure::timeout(&self.server, waited));
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
        let answer = tokio::time::timeout(
            self.options.call_timeout,
            invocation.invoke_async(&mut manager),
        )
        .await;
        self.answered(answer)
    }

    /// A `PING` within the budget: is the store there?
    pub(super) async fn ping(&self) -> bool {
        let Some(mut manager) = self.manager().await else {
            return false;
        };
        let answer = tokio::time::timeout(
            self.options.call_timeout,
            redis::cmd("PING").query_async::<String>(&mut manager),
        )
        .await;
        self.answered(answer).is_some()
    }

    fn answered<T>(
        &self,
        answer: Result<redis::RedisResult<T>, tokio::time::error::Elapsed>,
    ) -> Option<T> {
        match answer {
            Ok(Ok(value)) => {
                self.failures.store(0, Ordering::Relaxed);
                self.connected.store(true, Ordering::Relaxed);
                let since = self.started.elapsed().as_millis();
                self.last_ok
                    .store(u64::try_from(since).unwrap_or(u64::MAX), Ordering::Relaxed);
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

    /// How long since a call last succeeded.
    pub(super) fn since_ok(&self) -> Duration {
        let since = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(since.saturating_sub(self.last_ok.load(Ordering::Relaxed)))
    }

    pub(super) fn failed_with(&self, failure: RedisFailure) {
        *self
            .last_failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(failure);
        self.connected.store(false, Ordering::Relaxed);
        self.failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Renews this replica's life; the names of the replicas alive, sorted.
    pub(super) async fn live_replicas(&self) -> Option<Vec<String>> {
        let mut invocation = self.scripts.replicas.prepare_invoke();
        invocation
            .key(&self.replicas_key)
            .arg(&self.replica)
            .arg(millis(self.options.ttl));
        let mut names = self.call::<Vec<String>>(invocation).await?;
        names.sort_unstable();
        Some(names)
    }

    fn touch(&self, id: &Arc<str>) {
        self.touched
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id.clone());
    }

    /// Asks the store to admit a lease; `None` if the store failed. With the grants to
    /// this replica the same call made, and the key's total across the replicas after it
    /// (with the lease, if admitted).
    pub(super) async fn acquire(&self, acquire: &Acquire) -> Option<(Acquired, u32, u32)> {
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
        let id = &acquire.key;
        let mut invocation = self.scripts.acquire.prepare_invoke();
        invocation
            .key(self.key("c", id))
            .key(self.key("w", id))
            .key(self.key("k", id))
            .key(self.key("q", id))
            .key(self.key("p", id))
            .arg(&self.replica)
            .arg(acquire.cap)
            .arg(millis(self.options.ttl))
            .arg(interval)
            .arg(tolerance)
            .arg(u8::from(acquire.probe))
            .arg(millis(PROBE_TTL))
            .arg(&self.channel)
            .arg(&**id);
        let (status, wait, total, mine) = self.call::<(u8, u64, u32, u32)>(invocation).await?;
        if acquire.cap != u32::MAX {
            self.touch(id);
        }
        let acquired = match (status, wait) {
            (1, _) => Acquired::Admitted,
            (2, _) => Acquired::Queued,
            (_, 0) => Acquired::Refused,
            (_, ms) => Acquired::QuotaIn(Duration::from_millis(ms)),
        };
        Some((acquired, mine, total))
    }

    /// Releases `n` of this replica's slots on the key `id`; the grants to this replica
    /// (its own leases queued first) and the key's total after, or `None` if the store
    /// failed.
    pub(super) async fn release(&self, id: &Arc<str>, n: u32) -> Option<(u32, u32)> {
        let mut invocation = self.scripts.release.prepare_invoke();
        invocation
            .key(self.key("c", id))
            .key(self.key("w", id))
            .key(self.key("k", id))
            .arg(&self.replica)
            .arg(n)
            .arg(millis(self.options.ttl))
            .arg(&self.channel)
            .arg(&**id);
        let answer = self.call::<(u32, u32)>(invocation).await?;
        self.touch(id);
        Some(answer)
    }

    /// Renews this replica's count on the key `id`, resetting it to `own` if given, or
    /// claiming lost grants (see the script); (the grants to this replica, its
    /// generation, its count there, the key's total), or `None` if the store failed.
    pub(super) async fn renew(
        &self,
        id: &str,
        own: Option<u32>,
        claim: bool,
    ) -> Option<(u32, u64, u32, u32)> {
        let mut invocation = self.scripts.renew.prepare_invoke();
        invocation
            .key(self.key("c", id))
            .key(self.key("w", id))
            .key(self.key("k", id))
            .arg(&self.replica)
            .arg(millis(self.options.ttl))
            .arg(&self.channel)
            .arg(id)
            .arg(own.map_or(-1, i64::from))
            .arg(u8::from(claim));
        self.call::<(u32, u64, u32, u32)>(invocation).await
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

    /// Writes what this replica learned of a limit (see [`Op::Limit`]) under the pool's
    /// raise back-off (`waits`: first, longest); the limit the store keeps, if it answered.
    pub(super) async fn limit(
        &self,
        id: &str,
        limit: u32,
        generation: u64,
        change: LimitChange,
        waits: (Duration, Duration),
    ) -> Option<RemoteLimit> {
        let change: u8 = match change {
            LimitChange::Raised => 1,
            LimitChange::RaiseRefused => 2,
            LimitChange::RaiseServed => 3,
            _ => 0,
        };
        let mut invocation = self.scripts.limit.prepare_invoke();
        invocation
            .key(self.key("k", id))
            .arg(limit)
            .arg(generation)
            .arg(change)
            .arg(&self.channel)
            .arg(id)
            .arg(millis(waits.0))
            .arg(millis(waits.1));
        let (limit, generation, floor, raise_in) =
            self.call::<(u32, u64, u32, u64)>(invocation).await?;
        Some(RemoteLimit {
            limit,
            generation,
            floor,
            raise_in: Duration::from_millis(raise_in),
        })
    }

    /// Reads every key's shared rest and applies it here; `false` if the store failed.
    pub(super) async fn sync(&self, link: &BackendLink) -> bool {
        let ids = link.keys();
        if ids.is_empty() {
            return true;
        }
        // A cluster runs a script on one node: one key a call there (each key its slot).
        let chunk = if self.is_cluster() { 1 } else { ids.len() };
        let mut states = Vec::with_capacity(ids.len());
        for ids in ids.chunks(chunk) {
            let mut invocation = self.scripts.sync.prepare_invoke();
            for id in ids {
                invocation.key(self.key("k", id));
            }
            let Some(part) = self
                .call::<Vec<(u64, u32, u8, u32, u64, u32, u64)>>(invocation)
                .await
            else {
                return false;
            };
            states.extend(part);
        }
        for (id, (left, level, disabled, limit, generation, floor, raise_in)) in
            ids.iter().zip(states)
        {
            if limit > 0 {
                link.apply_limit(
                    id,
                    RemoteLimit {
                        limit,
                        generation,
                        floor,
                        raise_in: Duration::from_millis(raise_in),
                    },
                );
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
    /// scripts keep the later deadline, the disable, the higher level), its counts (the
    /// leases taken alone meanwhile), then read it all back.
    pub(super) async fn merge(self: &Arc<Self>, link: &Arc<BackendLink>) -> bool {
        for rest in link.rests() {
            // A limit learned while away: the lower one wins.
            if let Some(limit) = rest.limit {
                match self
                    .limit(
                        &rest.key,
                        limit.limit,
                        limit.generation,
                        LimitChange::Lowered,
                        link.raise_waits(),
                    )
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
        let Some(replicas) = self.live_replicas().await else {
            return false;
        };
        self.seat(link, &replicas);
        if !self.renew_all(link, true, true).await {
            return false;
        }
        self.sync(link).await
    }

    /// This replica's rank among the replicas alive, for the degraded policy's deal.
    pub(super) fn seat(&self, link: &BackendLink, replicas: &[String]) {
        let count = u32::try_from(replicas.len()).unwrap_or(u32::MAX).max(1);
        let rank = replicas
            .iter()
            .position(|name| *name == self.replica)
            .unwrap_or(0);
        let rank = u32::try_from(rank).unwrap_or(0);
        self.replicas.store(count, Ordering::Relaxed);
        self.rank.store(rank, Ordering::Relaxed);
        link.arrange(rank, count);
    }
}
