//! The backend's task: what leaves the request path (admissions, releases, rests,
//! outcomes), the heartbeat, the watch on the store while leases wait, and the other
//! replicas' messages.
//!
//! # Leases waiting for a grant
//!
//! A lease the store queued waits here, in its key's [`KeyWait`], in the order the store
//! queued them. A grant (in the answer to one of this replica's calls, or announced by
//! another replica's) admits the first lease still waiting; one with nobody left to take
//! it (its caller gave up) is released at once. A grant may come before the answer that
//! queued its lease: it is kept as a credit until that answer comes.
//!
//! # Repair
//!
//! A call whose answer is lost (a timeout) may leave the store's count of this replica
//! wrong. When nothing of this replica is on its way for a key (no lease asking, waiting
//! or being released), the heartbeat sends its own count, which the store then takes
//! (dropping any queue entry of this replica, and voiding grants announced before: each
//! reset raises the replica's generation on the key).

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::calls::Acquired;
use super::*;
use crate::shared::{Acquire, BackendLink, Op, RemoteLimit, RemoteRest};

/// One key's leases waiting for a grant here.
#[derive(Default)]
pub(super) struct KeyWait {
    /// Queued by the store, in its order.
    queue: VecDeque<Acquire>,
    /// Acquires sent whose answers are not handled yet.
    asking: u32,
    /// Grants that came before the answer that queued their lease.
    credits: u32,
    /// The store's generation of this replica's count on the key, as last heard: grants
    /// announced under an older one are void.
    generation: u64,
}

impl KeyWait {
    /// Hands `n` grants to the first leases still waiting, sent with `total` in flight on
    /// the key across the replicas (0: unknown); the grants nobody can take.
    fn give(&mut self, n: u32, total: u32) -> u32 {
        let mut orphans = 0;
        for _ in 0..n {
            loop {
                match self.queue.pop_front() {
                    Some(acquire) if acquire.is_waiting() => {
                        if !acquire.admit_at(true, total) {
                            orphans += 1;
                        }
                        break;
                    }
                    // Gave up: its own entry in the store's queue gets a grant later,
                    // which then finds nobody.
                    Some(_) => continue,
                    None if self.asking > 0 => {
                        self.credits += 1;
                        break;
                    }
                    None => {
                        orphans += 1;
                        break;
                    }
                }
            }
        }
        if self.asking == 0 {
            orphans += std::mem::take(&mut self.credits);
        }
        orphans
    }

    fn quiet(&self) -> bool {
        self.queue.is_empty() && self.asking == 0 && self.credits == 0
    }
}

impl Inner {
    pub(super) fn breaker_open(&self, link: &Arc<BackendLink>) -> bool {
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
            // The leases the store admitted run on: until they may have ended (as a dead
            // replica's would in the store), each replica holds no more than it has now.
            let hold = link.hold();
            let ttl = self.options.ttl;
            let held = link.clone();
            tokio::spawn(async move {
                tokio::time::sleep(ttl).await;
                held.unhold(hold);
            });
            link.set_health(false, true, None);
            self.sharing.send_replace(false);
            // Leases waiting for a grant look again, under the degraded policy.
            let mut waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
            for wait in waiting.values_mut() {
                for acquire in wait.queue.drain(..) {
                    acquire.admit(false);
                }
                wait.credits = 0;
            }
            return true;
        }
        false
    }

    /// Trips the breaker now (the subscription's connection closed: the store is gone).
    fn trip(&self, link: &Arc<BackendLink>) {
        let failures = self.options.failures;
        self.failures.fetch_max(failures, Ordering::Relaxed);
        self.connected.store(false, Ordering::Relaxed);
        self.breaker_open(link);
    }

    fn has_waiters(&self) -> bool {
        self.waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .any(|wait| !wait.queue.is_empty() || wait.asking > 0)
    }
}

/// How long a replica's probe holds a key's single probe in the store: a probe whose
/// replica died lets another replica probe after this.
pub(super) const PROBE_TTL: Duration = Duration::from_secs(10);

/// While leases wait for grants and no call succeeded for this long, a `PING` checks that
/// the store is there: a replica with only waiting leases notices an outage within
/// `WATCH × (failures + 1)` (400 ms by default), when the subscription's closing has not
/// told it sooner.
pub(super) const WATCH: Duration = Duration::from_millis(100);

pub(super) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The backend's task: carries the pool's ops to the store, heartbeats, watches, and runs
/// the breaker.
pub(super) async fn run(
    inner: Arc<Inner>,
    link: Arc<BackendLink>,
    mut ops: mpsc::UnboundedReceiver<Op>,
) {
    let mut heartbeat = tokio::time::interval(inner.options.heartbeat);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut watch = tokio::time::interval(WATCH);
    watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let beating = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut ticks = 0u64;
    let mut batch = Vec::new();
    loop {
        tokio::select! {
            op = ops.recv() => match op {
                // The pool is gone.
                None => return,
                Some(op) => {
                    // What else is queued goes in the same pass: releases of one key are
                    // one call.
                    batch.push(op);
                    while batch.len() < 1024 {
                        match ops.try_recv() {
                            Ok(op) => batch.push(op),
                            Err(_) => break,
                        }
                    }
                    dispatch(&inner, &link, &mut batch);
                }
            },
            _ = heartbeat.tick() => {
                // One heartbeat at a time, off this loop (ops keep flowing meanwhile).
                if !beating.swap(true, Ordering::AcqRel) {
                    ticks += 1;
                    let (inner, link, beating) = (inner.clone(), link.clone(), beating.clone());
                    tokio::spawn(async move {
                        tick(&inner, &link, ticks).await;
                        beating.store(false, Ordering::Release);
                    });
                }
            }
            _ = watch.tick() => {
                if !inner.open.load(Ordering::Acquire)
                    && inner.since_ok() >= WATCH
                    && inner.has_waiters()
                {
                    let (inner, link) = (inner.clone(), link.clone());
                    tokio::spawn(async move {
                        if !inner.ping().await {
                            inner.breaker_open(&link);
                        }
                    });
                }
            }
        }
    }
}

/// Sends the ops of one pass, each on its own task (a slow store must not hold up the
/// others); the releases of one key as one call.
pub(super) fn dispatch(inner: &Arc<Inner>, link: &Arc<BackendLink>, batch: &mut Vec<Op>) {
    if inner.breaker_open(link) {
        for op in batch.drain(..) {
            match op {
                // Taken before the store went away: look again, under the degraded policy.
                Op::Acquire(acquire) => {
                    acquire.admit(false);
                }
                // Counted here: the merge writes the counts.
                Op::Release { key } => {
                    if let Some(cell) = link.cell(&key) {
                        cell.releasing.fetch_sub(1, Ordering::SeqCst);
                    }
                }
                _ => {}
            }
        }
        return;
    }
    let mut releases: Vec<(Arc<str>, u32)> = Vec::new();
    for op in batch.drain(..) {
        match op {
            Op::Release { key } => match releases.iter_mut().find(|(id, _)| *id == key) {
                Some((_, n)) => *n += 1,
                None => releases.push((key, 1)),
            },
            Op::Acquire(acquire) => {
                inner
                    .waiting
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .entry(acquire.key.clone())
                    .or_default()
                    .asking += 1;
                let (inner, link) = (inner.clone(), link.clone());
                tokio::spawn(async move { ask(&inner, &link, acquire).await });
            }
            op => {
                let (inner, link) = (inner.clone(), link.clone());
                tokio::spawn(async move {
                    report(&inner, &link, op).await;
                    inner.breaker_open(&link);
                });
            }
        }
    }
    for (id, n) in releases {
        release(inner, link, id, n, false);
    }
}

/// Releases `n` slots of this replica on the key `id` in the store, on a task. `orphans`:
/// slots granted to leases gone (not counted here, so on their way from now on).
fn release(inner: &Arc<Inner>, link: &Arc<BackendLink>, id: Arc<str>, n: u32, orphans: bool) {
    let cell = link.cell(&id);
    if orphans {
        if let Some(cell) = &cell {
            cell.releasing.fetch_add(n, Ordering::SeqCst);
        }
    }
    let (inner, link) = (inner.clone(), link.clone());
    tokio::spawn(async move {
        let answer = inner.release(&id, n).await;
        if let Some(cell) = &cell {
            cell.releasing.fetch_sub(n, Ordering::SeqCst);
        }
        if let Some((mine, total)) = answer.filter(|&(mine, _)| mine > 0) {
            granted(&inner, &link, &id, mine, None, total);
        }
        inner.breaker_open(&link);
    });
}

/// `n` slots of the key `id` granted to this replica (under the store's `generation` of
/// its count, if announced), leaving `total` in flight on the key: admits its first
/// waiting leases.
fn granted(
    inner: &Arc<Inner>,
    link: &Arc<BackendLink>,
    id: &Arc<str>,
    n: u32,
    generation: Option<u64>,
    total: u32,
) {
    let orphans = {
        let mut waiting = inner.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        let wait = waiting.entry(id.clone()).or_default();
        if generation.is_some_and(|generation| generation < wait.generation) {
            // Void: the count was reset since.
            return;
        }
        wait.give(n, total)
    };
    if orphans > 0 {
        release(inner, link, id.clone(), orphans, true);
    }
}

/// Asks the store to admit a lease, and answers it (or queues it here).
async fn ask(inner: &Arc<Inner>, link: &Arc<BackendLink>, acquire: Acquire) {
    let answer = inner.acquire(&acquire).await;
    let id = acquire.key.clone();
    let orphans = {
        let mut waiting = inner.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        let wait = waiting.entry(id.clone()).or_default();
        wait.asking -= 1;
        let mut orphans = 0;
        let mine = match answer {
            // Failed (perhaps applied: the heartbeat repairs the count): look again.
            None => {
                acquire.admit(false);
                0
            }
            Some((Acquired::Admitted, mine, total)) => {
                if !acquire.admit_at(true, total) {
                    orphans += 1;
                }
                mine
            }
            Some((Acquired::Queued, mine, _)) => {
                // Behind its own replica's earlier leases, which the grants are for.
                wait.queue.push_back(acquire);
                if wait.credits > 0 {
                    wait.credits -= 1;
                    orphans += wait.give(1, 0);
                }
                mine
            }
            Some((Acquired::Refused, _, _)) => {
                acquire.admit(false);
                0
            }
            Some((Acquired::QuotaIn(left), _, _)) => {
                acquire.quota_in(left);
                0
            }
        };
        // The lease's own grants (its replica's earlier leases queued): sent with the
        // total after this call.
        orphans + wait.give(mine, answer.map_or(0, |(_, _, total)| total))
    };
    if orphans > 0 {
        release(inner, link, id, orphans, true);
    }
    inner.breaker_open(link);
}

/// Writes a rest, a probe's answer, a disable, a recovery or a learned limit.
async fn report(inner: &Inner, link: &BackendLink, op: Op) {
    match op {
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
            change,
        } => {
            // The store's answer: this replica's own limit, or one it must take
            // (another replica's lower one, or a raise refused).
            if let Some(kept) = inner
                .limit(&key, limit, generation, change, link.raise_waits())
                .await
            {
                link.set_limit(&key, kept);
            }
        }
        op @ (Op::Tokens(_) | Op::TokenSettle { .. }) => super::tokens::report(inner, op).await,
        Op::Acquire(_) | Op::Release { .. } => {}
    }
}

impl Inner {
    /// Renews this replica's count on the keys it counts on or waits for that no call
    /// touched since the last heartbeat (the calls renew the others), handing out slots
    /// dead replicas held. With `repair`, on every key it counts on, waits for or touched,
    /// resetting the count of each key with nothing on its way (see the [module
    /// docs](self)); with `all` too, on every key it ever counted on. `false` if the store
    /// failed.
    pub(super) async fn renew_all(
        self: &Arc<Self>,
        link: &Arc<BackendLink>,
        repair: bool,
        all: bool,
    ) -> bool {
        let touched =
            std::mem::take(&mut *self.touched.lock().unwrap_or_else(PoisonError::into_inner));
        let busy: Vec<Arc<str>> = link
            .counts()
            .into_iter()
            .filter(|(_, count)| all || count.count > 0)
            .map(|(id, _)| id)
            .chain(
                self.waiting
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .iter()
                    .filter(|(_, wait)| !wait.quiet())
                    .map(|(id, _)| id.clone()),
            )
            .collect();
        let mut ids: Vec<Arc<str>> = if repair {
            busy.into_iter().chain(touched).collect()
        } else {
            busy.into_iter()
                .filter(|id| !touched.contains(id))
                .collect()
        };
        ids.sort_unstable();
        ids.dedup();
        let calls = ids.into_iter().map(|id| async move {
            let (own, claim) = {
                let waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
                let wait = waiting.get(&id);
                let quiet = wait.is_none_or(KeyWait::quiet);
                // Only waiting: no answer, grant or release of its on the way but
                // grants whose messages may be lost.
                let waits_only = wait.is_some_and(|wait| {
                    !wait.queue.is_empty() && wait.asking == 0 && wait.credits == 0
                });
                // The count first, then the releases on their way (see `key::release`).
                let cell = link.cell(&id);
                let count = cell.as_ref().map_or(0, |cell| cell.count());
                let releasing = cell
                    .as_ref()
                    .map_or(0, |cell| cell.releasing.load(Ordering::SeqCst));
                (
                    (repair && quiet && releasing == 0).then_some(count),
                    repair && waits_only && releasing == 0,
                )
            };
            let Some((mine, generation, stored, total)) = self.renew(&id, own, claim).await else {
                return false;
            };
            let orphans = {
                let mut waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
                let wait = waiting.entry(id.clone()).or_default();
                wait.generation = wait.generation.max(generation);
                // Grants the store counted for this replica whose messages never came
                // (those on their way are void now: the generation rose).
                let lost = match link.cell(&id) {
                    Some(cell) if claim && wait.asking == 0 && wait.credits == 0 => {
                        // Read now: grants applied meanwhile are counted here already.
                        let count = cell.count();
                        let releasing = cell.releasing.load(Ordering::SeqCst);
                        stored.saturating_sub(count + releasing + mine)
                    }
                    _ => 0,
                };
                wait.give(mine + lost, total)
            };
            if orphans > 0 {
                release(self, link, id, orphans, true);
            }
            true
        });
        futures_util::future::join_all(calls)
            .await
            .into_iter()
            .all(|ok| ok)
    }
}

/// A heartbeat: life and counts, then the rests' sync; while the breaker is open, a try
/// at coming back.
pub(super) async fn tick(inner: &Arc<Inner>, link: &Arc<BackendLink>, ticks: u64) {
    if inner.breaker_open(link) {
        // The degraded policy's turn moves on.
        link.arrange(
            inner.rank.load(Ordering::Relaxed),
            inner.replicas.load(Ordering::Relaxed),
        );
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
    let Some(replicas) = inner.live_replicas().await else {
        inner.breaker_open(link);
        return;
    };
    inner.seat(link, &replicas);
    link.set_health(true, false, Some(inner.replicas.load(Ordering::Relaxed)));
    // Every fifth beat: the counts repaired, the rests read again (messages cover the
    // rest of the time).
    let backstop = ticks % 5 == 0;
    if !inner.renew_all(link, backstop, false).await || (backstop && !inner.sync(link).await) {
        inner.breaker_open(link);
        return;
    }
    // Every tenth beat, waiters look again, in case a probe's answer was lost.
    if ticks % 10 == 0 {
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
                // The connection closed: the store is gone (or restarting).
                inner.trip(&link);
            }
        }
        // Not a synchronisation: the pace of reconnection attempts.
        tokio::time::sleep(inner.options.heartbeat).await;
    }
}

/// One event from the channel.
pub(super) fn event(inner: &Arc<Inner>, link: &Arc<BackendLink>, text: &str) {
    let mut words = text.split(' ');
    match (words.next(), words.next()) {
        (Some("grant"), Some(id)) => {
            if words.next() != Some(inner.replica.as_str()) {
                return; // another replica's
            }
            let (Some(n), Some(generation)) = (
                words.next().and_then(|w| w.parse().ok()),
                words.next().and_then(|w| w.parse().ok()),
            ) else {
                return;
            };
            let total = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
            granted(inner, link, &Arc::from(id), n, Some(generation), total);
        }
        (Some("limit"), Some(id)) => {
            let (Some(limit), Some(generation)) = (
                words.next().and_then(|w| w.parse().ok()),
                words.next().and_then(|w| w.parse().ok()),
            ) else {
                return;
            };
            let floor = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
            let raise_in = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
            let remote = RemoteLimit {
                limit,
                generation,
                floor,
                raise_in: Duration::from_millis(raise_in),
            };
            if link.apply_limit(id, remote) {
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
