//! Waiting for a key: a caller that finds none registers a [`Waiter`] and sleeps until a
//! slot is released, keys are reloaded, a rest ends or quota refills, or its wait budget
//! runs out.
//!
//! # No lost wake-up
//!
//! A release and a waiter race: the releaser decrements `in_flight` and then looks whether
//! anyone waits (`Slot::release`, `Signals::wake_one`); the waiter registers with the
//! pool's `Notify` and counts itself in `waiters`, and only *then* looks at the keys again
//! (`Waiter::arm`, then the loop in [`KeyPool::poll_reserve`]).
//!
//! ```text
//!   releaser                              waiter
//!   in_flight.fetch_sub(1, SeqCst)        notified.enable(); waiters.fetch_add(1, SeqCst)
//!   if waiters.load(SeqCst) != 0 {        fence(SeqCst)
//!       notify.notify_one()               look at the keys again (in_flight loads)
//!   }                                     if still nothing: sleep on `notified`
//! ```
//!
//! All four operations are sequentially consistent, so they have one total order. Either
//! the releaser's `fetch_sub` comes before the waiter's look (which then sees the freed
//! slot), or the waiter's `fetch_add` comes before the releaser's `load` (which then sees
//! the waiter and notifies it; the registration came first, so the notification is kept
//! even if it arrives before the waiter sleeps). There is no third order: no lost wake-up,
//! and no notification cost when nobody waits. A notification that lands on a waiter
//! that gives up is passed on by `Notify` (tokio's `drop_notified`), and events that
//! concern every waiter (a reload, a key disabled, a new rest end, a probe answered) use
//! `notify_waiters`. The loom models in `src/pool/loom_tests.rs` check this protocol.
//!
//! A request of a session waiting for its session's own key (affinity: that key comes back
//! within the affinity wait) wants one key, not any: a `notify_one` it took for a release
//! of another key would be lost to a caller that could use it. So it registers apart, in
//! `patient` and on `patient_notify`, by the same protocol, and a release wakes every such
//! request (`notify_waiters`): each waits at most the affinity wait (500 ms by default).
//! Events that wake every waiter of the pool (a probe answered, a reload) do not reach
//! them: they look again when their key's known return or their affinity wait comes.

use crate::sync::{Ordering, OwnedNotified, fence};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use super::affinity::Patience;
use super::lease::Lease;
use super::state::PoolAvailability;
use super::{KeyPool, Signals};
use crate::error::{AllKeysDisabled, CostTooLarge, NoKeyAvailable};
use crate::route::Route;

impl KeyPool {
    /// Reserves a key, or registers `waiter` to be woken when one may be free.
    ///
    /// Returns `Pending` with a wake-up arranged (a slot released, keys reloaded, the
    /// earliest cool-down ending or quota refilling, or `deadline`). Gives up with
    /// [`Reserve::NoKey`] when `deadline` has passed, or at once when the earliest key comes
    /// back only after it (a deadline of `None` waits for ever), and with
    /// [`Reserve::AllDisabled`] when every key is disabled.
    pub(crate) fn poll_reserve(
        &self,
        waiter: &mut Waiter,
        deadline: Option<Instant>,
        cx: &mut Context<'_>,
    ) -> Poll<Reserve> {
        self.poll_reserve_route(&Route::ANY, waiter, deadline, cx)
    }

    /// [`poll_reserve`](Self::poll_reserve) for a request of `route`: in a pool with
    /// buckets, the waiter registers with the bucket's signals, so that only a slot freed
    /// or a rest ended in that bucket (or what concerns every bucket) wakes it.
    pub(crate) fn poll_reserve_route(
        &self,
        route: &Route,
        waiter: &mut Waiter,
        deadline: Option<Instant>,
        cx: &mut Context<'_>,
    ) -> Poll<Reserve> {
        let bucket = self.inner.bucket_state(route.bucket);
        let signals = bucket.map_or(&self.inner.signals, |bucket| &bucket.signals);
        loop {
            // A request of a session waits for its session's key a little (`patient`)
            // before it spills; the affinity wait counts from its first look.
            let reserved = match route.affinity() {
                Some(id) => {
                    let wait = self.inner.affinity.wait;
                    let patience = match waiter.since {
                        Some(since) => Patience::Until(self.inner.signals.pool_time(since + wait)),
                        None => Patience::For(wait),
                    };
                    self.reserve_affinity(id, bucket, route.tokens, patience, |_| true)
                        .map(|lease| lease.with_candidate(route.candidate))
                }
                None => self.try_reserve_route(route).ok_or(None),
            };
            let patient = match reserved {
                Ok(lease) => {
                    waiter.disarm();
                    return Poll::Ready(Reserve::Lease(lease));
                }
                Err(Some(patient)) if patient.free => continue,
                Err(patient) => patient,
            };
            if let Some((window, period)) = bucket
                .filter(|_| route.tokens != 0)
                .and_then(|bucket| self.inner.too_large(bucket, route.tokens))
            {
                // No wait can make it fit: say so now.
                waiter.disarm();
                return Poll::Ready(Reserve::TooLarge(CostTooLarge::new(
                    route.tokens,
                    window,
                    period,
                )));
            }
            let now = Instant::now();
            let tokens_bucket = bucket.filter(|_| route.tokens != 0 && route.affinity.is_none());
            if let Some(bucket) = tokens_bucket {
                // Tokens that fit no key now: booked where they fit soonest, within the
                // budget, so that later requests queue behind (see `booking`).
                let ahead = deadline.map_or(u64::MAX, |deadline| {
                    u64::try_from(deadline.saturating_duration_since(now).as_nanos())
                        .unwrap_or(u64::MAX)
                });
                if let Some(lease) = self.inner.book_in(bucket, route.tokens, ahead) {
                    waiter.disarm();
                    return Poll::Ready(Reserve::Lease(lease));
                }
            }
            let started = *waiter.since.get_or_insert(now);
            let availability = self.inner.availability_in(bucket, route.tokens);
            let give_up = |retry_after: Duration| {
                Poll::Ready(Reserve::NoKey(NoKeyAvailable::new(
                    retry_after,
                    now.saturating_duration_since(started),
                )))
            };
            let earliest = match availability {
                // Waiting for the session's own key while others are free.
                PoolAvailability::Now if patient.is_some() => None,
                // Free since `try_reserve` looked: look again.
                PoolAvailability::Now => continue,
                PoolAvailability::Never => {
                    waiter.disarm();
                    return Poll::Ready(Reserve::AllDisabled(AllKeysDisabled::new(self.len())));
                }
                PoolAvailability::OnRelease { earliest } => {
                    earliest.map(|at| self.inner.signals.instant(at))
                }
                PoolAvailability::At(at) => {
                    let at = self.inner.signals.instant(at);
                    if deadline.is_some_and(|deadline| at > deadline) {
                        // Waiting cannot help: say so now, not at the deadline.
                        waiter.disarm();
                        return give_up(at.saturating_duration_since(now));
                    }
                    Some(at)
                }
            };
            if let Some(deadline) = deadline.filter(|&deadline| deadline <= now) {
                waiter.disarm();
                let retry_after = earliest.map_or(Duration::from_secs(1), |at| {
                    at.saturating_duration_since(deadline.max(now))
                });
                return give_up(retry_after.max(Duration::from_millis(1)));
            }
            // The session's key back, or the end of the affinity wait (then spill).
            let earliest = match patient {
                Some(patient) => Some(
                    patient
                        .back_at
                        .map_or(patient.until, |at| at.min(patient.until))
                        .min(earliest.unwrap_or(patient.until)),
                ),
                None => earliest,
            };
            let Some(armed) = waiter
                .armed
                .as_mut()
                .filter(|armed| armed.patient == patient.is_some())
            else {
                // Register interest, then look again before sleeping.
                waiter.arm(signals, patient.is_some());
                continue;
            };
            if armed.notified.as_mut().poll(cx).is_ready() {
                // A slot was released: look again (and re-register if still nothing).
                waiter.rearm();
                continue;
            }
            let wake_at = match (earliest, deadline) {
                (Some(at), Some(deadline)) => Some(at.min(deadline)),
                (at, deadline) => at.or(deadline),
            };
            if let Some(at) = wake_at {
                let sleep = waiter
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
                if sleep.deadline() != at || sleep.is_elapsed() {
                    sleep.as_mut().reset(at);
                }
                if sleep.as_mut().poll(cx).is_ready() {
                    continue;
                }
            }
            return Poll::Pending;
        }
    }
}

/// What [`KeyPool::poll_reserve`] ends with.
#[derive(Debug)]
pub(crate) enum Reserve {
    /// A key, reserved.
    Lease(Lease),
    /// No key within the deadline.
    NoKey(NoKeyAvailable),
    /// Every key is disabled.
    AllDisabled(AllKeysDisabled),
    /// The request's tokens exceed every key's whole token window.
    TooLarge(CostTooLarge),
}

/// A caller's registration for a wake-up while no key is free. Keep one per caller (a
/// service holds one) and pass it to [`KeyPool::poll_reserve`].
#[derive(Default)]
pub(crate) struct Waiter {
    armed: Option<Armed>,
    /// When this caller started waiting (the first time no key was free), until it gets a
    /// key or gives up.
    pub(crate) since: Option<Instant>,
    /// Kept across waits so that waiting again does not allocate a new timer.
    sleep: Option<Pin<Box<Sleep>>>,
}

struct Armed {
    signals: Arc<Signals>,
    notified: Pin<Box<OwnedNotified>>,
    /// Registered as waiting for its session's own key (`Signals::patient`), not for any.
    patient: bool,
}

impl Waiter {
    /// A waiter not yet registered anywhere.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Registers interest *before* the caller's last look at the keys (see the module docs).
    /// `patient`: waiting for one key of a session (affinity), woken by every release
    /// rather than taking a wake-up meant for a caller that can use any key.
    fn arm(&mut self, signals: &Arc<Signals>, patient: bool) {
        // A registration of the other kind goes first (its count with it).
        self.armed = None;
        let signals = signals.clone();
        let (notify, count) = if patient {
            (&signals.patient_notify, &signals.patient)
        } else {
            (&signals.notify, &signals.waiters)
        };
        let mut notified = Box::pin(notify.clone().notified_owned());
        notified.as_mut().enable();
        count.fetch_add(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        self.armed = Some(Armed {
            signals,
            notified,
            patient,
        });
    }

    /// Done waiting, from outside `poll_reserve` (the caller found a key itself).
    #[inline]
    pub(crate) fn reset(&mut self) {
        if self.armed.is_some() || self.since.is_some() {
            self.disarm();
        }
    }

    /// Done waiting (a key, or given up).
    fn disarm(&mut self) {
        self.armed = None;
        self.since = None;
    }

    /// Woken: the registration is used up; the next look registers again.
    fn rearm(&mut self) {
        self.armed = None;
    }

    /// The caller now waits for another route (its bucket became known): its registration
    /// with the old route's signals goes; how long it has waited stays.
    pub(crate) fn reroute(&mut self) {
        self.armed = None;
    }
}

impl Drop for Armed {
    fn drop(&mut self) {
        let count = if self.patient {
            &self.signals.patient
        } else {
            &self.signals.waiters
        };
        count.fetch_sub(1, Ordering::SeqCst);
    }
}

impl fmt::Debug for Waiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Waiter")
            .field("armed", &self.armed.is_some())
            .field("since", &self.since)
            .finish()
    }
}
