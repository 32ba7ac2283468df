//! Applying an answer's outcome to a key: rests, backoff levels, learned concurrency
//! limits, probes and disables. Returns a [`Transition`] saying what changed; `events`
//! turns it into log lines.

use crate::sync::Ordering;
use std::time::Duration;

use super::rest::{Deadline, RestWord};
use super::slot::Slot;
use crate::classify::Outcome;
use crate::shared::{LimitChange, Op, RemoteLimit, RemoteRest, SharedKey};

// How long after a limit is learned from a refusal the first try above it waits is
// `Backoff::raise_wait` (5 minutes by default). A limit learned from a refusal at `L + 1`
// counts as a refused raise to `L + 1`: the next try waits this long, not for a number of
// successes. Each refused try doubles the wait, up to `Backoff::max_raise_wait`.

/// What a rest did to a key's deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Rest {
    /// The key was usable and now rests: worth a warning.
    Started,
    /// The key was resting and now rests longer.
    Extended,
    /// The key already rested at least as long (or is disabled).
    Unchanged,
}

/// What a lease knows that recording its outcome needs.
#[derive(Debug, Clone, Copy)]
pub(super) struct Answered {
    pub(super) generation: u32,
    pub(super) at_limit: bool,
    /// Taken above the limit known to hold (`Taken::trial`).
    pub(super) trial: bool,
    pub(super) probe: bool,
    /// The first refusal recorded on this lease (the caller counts it in `refused_open`).
    pub(super) first_refusal: bool,
    /// May a refusal teach a concurrency limit? Not when the answer says a rate window is
    /// used up.
    pub(super) learn: bool,
    /// The key's count across the replicas sharing it when the request was sent, this one
    /// included, as the store admitted it (0: unknown, the count here is used).
    pub(super) total: u32,
}

/// What an outcome did to a key: the facts the log reports (see `events`).
#[derive(Debug, Clone, Default)]
pub(super) struct Transition {
    /// The key's concurrency limit was lowered: (before, after).
    pub(super) learned: Option<(u32, u32)>,
    /// That lowering was a try above the limit known to hold, refused.
    pub(super) raise_refused: bool,
    /// A rest the outcome started, extended or left alone.
    pub(super) rest: Option<RestChange>,
    /// The key was disabled by this outcome.
    pub(super) disabled: bool,
    /// The key answered its probe and is back in rotation.
    pub(super) back: bool,
}

impl Transition {
    /// Did anything change that the log reports?
    #[inline]
    pub(super) fn is_eventful(&self) -> bool {
        self.learned.is_some() || self.rest.is_some() || self.disabled || self.back
    }
}

/// A rest for a limit, and why.
#[derive(Debug, Clone, Copy)]
pub(super) struct RestChange {
    pub(super) cause: RestCause,
    pub(super) wait: Duration,
    pub(super) rest: Rest,
    /// The backoff level after a 429.
    pub(super) level: u32,
    /// Other keys of the account rested with it.
    pub(super) mates: usize,
}

/// Why a key rests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RestCause {
    /// Rate-limit headers say the window is used up; `exact` if the rest lasts until the
    /// window resets (no probe after it), not capped before.
    Window { exact: bool },
    /// A 429 (or 503 with `Retry-After`); `explicit` if it said how long.
    RateLimited { explicit: bool },
    /// A 429 about the key's account.
    Account,
    /// A spent quota.
    Quota,
}

impl Slot {
    /// Applies an answer's outcome to the key and says what changed.
    ///
    /// `#[inline]`: its one caller, `Lease::record_answer`, is on every request's path and
    /// in another module, which the bench profile's 16 codegen units may put in another
    /// unit; without the hint, whether it inlines depends on how the crate is split.
    ///
    /// A plain success (nearly every answer) takes the short way here: no rest to start,
    /// at most a learned limit to raise; every other outcome is `record_other`'s, out of
    /// line, so that this stays small enough to inline.
    #[inline]
    pub(super) fn record(&self, outcome: Outcome, answered: Answered) -> Transition {
        if !matches!(outcome, Outcome::Success) {
            return self.record_other(outcome, answered);
        }
        if answered.trial || answered.at_limit {
            self.learn_from_success(answered);
        }
        let recovered = self.succeeded(answered.generation);
        if answered.probe || self.shared.is_some() {
            return self.finish_record(outcome, answered, Transition::default(), recovered);
        }
        Transition::default()
    }

    /// A success sent above the limit known to hold, or at the limit: what it teaches.
    #[inline(never)]
    fn learn_from_success(&self, answered: Answered) {
        if answered.trial {
            self.raise_served();
        }
        if answered.at_limit {
            self.learn_success();
        }
    }

    /// [`record`](Self::record) for any outcome but a plain success.
    #[inline(never)]
    fn record_other(&self, outcome: Outcome, answered: Answered) -> Transition {
        let mut transition = Transition::default();
        if matches!(outcome, Outcome::Success | Outcome::SuccessAtLimit { .. }) {
            if answered.trial {
                self.raise_served();
            }
            if answered.at_limit {
                self.learn_success();
            }
        }
        let mut recovered = false;
        match outcome {
            Outcome::Success => recovered = self.succeeded(answered.generation),
            Outcome::SuccessAtLimit { reset_after } => {
                recovered = self.succeeded(answered.generation);
                // A rest for a limit, as after a 429, capped the same way. Healthy =>
                // Resting, and back at the window's reset with its capacity: the provider
                // said when the window resets (OpenAI and Anthropic document the reset as
                // the moment the limit is whole again), so a rest that lasts until then
                // needs no probe to find out, and the key's other slots need not idle
                // while one request probes. A capped rest ends before the window resets:
                // it owes a probe, as a 429's does.
                let wait = self.signals.backoff.cap(reset_after);
                let exact = wait == reset_after;
                transition.rest = Some(RestChange {
                    cause: RestCause::Window { exact },
                    wait,
                    rest: if exact {
                        self.extend(wait)
                    } else {
                        self.rest_for_limit(wait)
                    },
                    level: 0,
                    mates: 0,
                });
            }
            Outcome::RateLimited { retry_after }
            | Outcome::AccountLimited { retry_after }
            | Outcome::ConcurrencyLimited { retry_after } => {
                // A refusal for a limit: the key's own, or its account's: either teaches the
                // key.
                let concurrency = matches!(outcome, Outcome::ConcurrencyLimited { .. });
                // The limit holds, lowered if need be, and the key does not rest.
                let mut held = false;
                if let Some(shared) = &self.shared {
                    // Counted by the store again while the limit may be learned.
                    shared.learning_again();
                }
                if answered.first_refusal {
                    let refused = self.refused_open.fetch_add(1, Ordering::AcqRel);
                    // Shared by replicas, a refusal while a raise is tried is the try's: the
                    // store lets one request at a time above the limit known to hold, but
                    // requests admitted before it may reach the provider after it.
                    let trying = answered.trial || self.trying();
                    tracing::debug!(
                        "DBG refusal trial={} trying={} floor={} limit={} total={} learn={}",
                        answered.trial,
                        self.trying(),
                        self.floor.load(Ordering::Acquire),
                        self.limit(),
                        answered.total,
                        answered.learn
                    );
                    if answered.learn && trying && self.signals.learn_concurrency {
                        // A try above the limit known to hold, refused: a concurrency
                        // refusal. Back to that limit, and the next try waits twice as
                        // long; the key does not rest (its limit holds).
                        held = true;
                        transition.learned = self.refuse_raise();
                        transition.raise_refused = true;
                    } else if answered.learn {
                        let (others, learned) = self.learn_refusal(refused, answered.total);
                        transition.learned = learned;
                        // Said to be one of concurrency, with others at the provider: the
                        // limit (now at most them) holds, and the bucket goes on serving as
                        // they finish. A rest would only idle the slots they free.
                        held = concurrency && others;
                    }
                }
                if held {
                    self.rate_limited.fetch_add(1, Ordering::Relaxed);
                    return self.finish_record(outcome, answered, transition, false);
                }
                let (wait, level, rest) = self.rate_limited(answered.generation, retry_after);
                let account = matches!(
                    outcome,
                    Outcome::AccountLimited { .. } | Outcome::ConcurrencyLimited { .. }
                );
                transition.rest = Some(RestChange {
                    cause: if account {
                        RestCause::Account
                    } else {
                        RestCause::RateLimited {
                            explicit: retry_after.is_some(),
                        }
                    },
                    wait,
                    rest,
                    level,
                    mates: if account { self.rest_account(wait) } else { 0 },
                });
            }
            Outcome::QuotaExhausted { reset_after, .. } => {
                self.rate_limited.fetch_add(1, Ordering::Relaxed);
                let backoff = &self.signals.backoff;
                let wait =
                    reset_after.map_or(backoff.quota_wait, |w| w.min(backoff.max_quota_wait));
                let rest = self.extend(wait);
                // Healthy => Resting, with a probe owed (a probe in flight settles below).
                self.probe.owe();
                transition.rest = Some(RestChange {
                    cause: RestCause::Quota,
                    wait,
                    rest,
                    level: 0,
                    mates: 0,
                });
            }
            Outcome::KeyRejected => {
                // Not disabled here: the request may be to blame (a caller's own
                // credentials, a model the account may not use). Only a contrast proves it
                // the key's fault: the same request served by another key (the retry
                // layer's `RejectedKey::disable`).
                self.failures.fetch_add(1, Ordering::Relaxed);
                self.rejected.fetch_add(1, Ordering::Relaxed);
                self.rejected_streak.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::Failure => {
                self.failures.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.finish_record(outcome, answered, transition, recovered)
    }

    /// The end of `record`: the probe's answer, and what the other replicas must hear.
    /// Out of line: a plain success needs it only as a probe or with a state backend.
    #[inline(never)]
    fn finish_record(
        &self,
        outcome: Outcome,
        answered: Answered,
        mut transition: Transition,
        recovered: bool,
    ) -> Transition {
        if answered.probe {
            // A used-up window rests the key again (above): until its reset, with no probe
            // after it (back, as far as probing goes), unless the rest is capped.
            let back = match outcome {
                Outcome::Success => true,
                Outcome::SuccessAtLimit { reset_after } => {
                    self.signals.backoff.cap(reset_after) == reset_after
                }
                _ => false,
            };
            // Probing => Healthy on success (or Resting until the window resets); else
            // Probing => Resting: another probe once the rest (if any) is over.
            self.probe.settle(back);
            if back {
                // Everyone waiting for this key may go now.
                self.signals.notify_all();
            }
            transition.back = back;
        }
        if let Some(shared) = &self.shared {
            self.share(shared, &transition, recovered, answered.probe);
        }
        transition
    }

    /// Tells the other replicas what an outcome changed here (off the request path: the
    /// backend's task carries it).
    #[inline(never)]
    fn share(&self, shared: &SharedKey, transition: &Transition, recovered: bool, probe: bool) {
        if transition.raise_refused {
            // Told the store even if this replica had not heard of the raise yet: the
            // store ends the try for every replica.
            let floor = self.floor.load(Ordering::Acquire);
            if floor != u32::MAX {
                self.share_limit(shared, floor, LimitChange::RaiseRefused);
            }
        } else if let Some((_, after)) = transition.learned {
            self.share_limit(shared, after, LimitChange::Lowered);
        }
        if transition.disabled {
            shared.report(Op::Disable {
                key: shared.id.clone(),
            });
            if !probe {
                return;
            }
        }
        let rested = transition
            .rest
            .is_some_and(|change| change.rest != Rest::Unchanged);
        if probe {
            // The rest (if any) and the answer in one message, in that order.
            shared.report(Op::ProbeDone {
                key: shared.id.clone(),
                back: transition.back,
                rest: if rested { self.rest_left() } else { None },
            });
        } else if rested {
            self.share_rest(shared);
        } else if recovered {
            shared.report(Op::Recovered {
                key: shared.id.clone(),
            });
        }
    }

    /// Sends what was learned here of the limit (lowered, raised after successes at it, a
    /// try above it refused or served) to the store, which keeps one limit for every
    /// replica, with the limit known to hold and the raise back-off.
    #[inline(never)]
    fn share_limit(&self, shared: &SharedKey, limit: u32, change: LimitChange) {
        shared.report(Op::Limit {
            key: shared.id.clone(),
            limit,
            generation: shared.limit_generation().load(Ordering::Acquire),
            change,
        });
    }

    /// Shared by replicas, is a raise of the limit being tried (the limit in force is above
    /// the limit known to hold)?
    fn trying(&self) -> bool {
        self.shared.is_some() && {
            let floor = self.floor.load(Ordering::Acquire);
            floor != u32::MAX && self.limit() > floor
        }
    }

    /// What the store's count of the key across the replicas (`total`, with a request
    /// just admitted) says of that request: (at the limit, a try above the limit known to
    /// hold).
    pub(super) fn sent_with(&self, total: u32) -> (bool, bool) {
        let limit = self.limit();
        if limit == u32::MAX || total == 0 {
            return (false, false);
        }
        (total >= limit, total > self.floor.load(Ordering::Relaxed))
    }

    /// Applies the key's limit as the store keeps it for every replica (see
    /// [`RemoteLimit`]): a newer generation replaces the limit here (never above the cap),
    /// with the limit known to hold and when the next try above it may start (the raise
    /// back-off holds in every replica); the same generation keeps the lower one, an older
    /// one is ignored. With `own` (the store's answer to this replica's change), the same
    /// generation is taken as is: the store decided. Not shared again. Returns whether the
    /// limit here changed.
    pub(super) fn apply_limit(&self, remote: RemoteLimit, own: bool) -> bool {
        let Some(shared) = &self.shared else {
            return false;
        };
        if !self.signals.learn_concurrency {
            return false;
        }
        let limit = remote.limit.clamp(1, self.cap);
        let applied = shared
            .limit_generation()
            .fetch_max(remote.generation, Ordering::AcqRel);
        let before = if applied < remote.generation || (own && applied == remote.generation) {
            // Another replica's change (or this one's, as the store kept it): take it.
            self.gains.store(0, Ordering::Relaxed);
            if remote.floor != 0 {
                self.floor
                    .store(remote.floor.clamp(1, self.cap), Ordering::Release);
                self.raise_at.store(
                    self.signals
                        .now()
                        .saturating_add(remote.raise_in)
                        .as_nanos(),
                    Ordering::Relaxed,
                );
            }
            self.limit.swap(limit, Ordering::AcqRel)
        } else if applied == remote.generation {
            // Same generation: a lowering made here meanwhile stands.
            self.limit.fetch_min(limit, Ordering::AcqRel)
        } else {
            return false;
        };
        let after = self.limit();
        if after > before {
            // Room for more: a waiter may take it.
            self.signals.notify_all();
        }
        after != before
    }

    /// Sends the key's rest as it stands here: what is left of it, and the level.
    fn share_rest(&self, shared: &SharedKey) {
        if let Some((remaining, level)) = self.rest_left() {
            shared.report(Op::Rest {
                key: shared.id.clone(),
                remaining,
                level,
            });
        }
    }

    /// What is left of the key's rest here, and its level; `None` if not resting.
    fn rest_left(&self) -> Option<(Duration, u32)> {
        let RestWord::Until(until) = self.deadline.read() else {
            return None;
        };
        let remaining = until.saturating_duration_since(self.signals.now());
        (!remaining.is_zero()).then(|| (remaining, self.level.load(Ordering::Acquire)))
    }

    /// A probe dropped unanswered: the next caller may probe (here, or in another replica).
    pub(super) fn probe_abandoned(&self) {
        self.probe.give_back();
        if let Some(shared) = &self.shared {
            self.probe_given_up(shared);
        }
    }

    #[inline(never)]
    fn probe_given_up(&self, shared: &SharedKey) {
        shared.report(Op::ProbeDone {
            key: shared.id.clone(),
            back: false,
            rest: None,
        });
    }

    /// The store shared with other replicas says the key's quota has no unit for `wait`:
    /// hold it back here as long, so that waiters sleep until then.
    pub(super) fn hold_quota(&self, wait: Duration) {
        if let Some(quota) = self.quota {
            quota.hold_until(&self.tat, self.signals.now().saturating_add(wait));
        }
    }

    /// Applies another replica's rest, disable or level (from the store): a rest only
    /// extends, a disable is for good, a level only rises. Not shared again. Returns
    /// whether anything changed.
    pub(super) fn apply_remote(&self, remote: RemoteRest) -> bool {
        if remote.disabled {
            return self.disable();
        }
        let raised = self.level.fetch_max(remote.level, Ordering::AcqRel) < remote.level;
        let Some(wait) = remote.remaining.filter(|wait| !wait.is_zero()) else {
            return raised;
        };
        match self.extend(wait) {
            Rest::Unchanged => raised,
            Rest::Extended => true,
            Rest::Started => {
                // A cool-down began elsewhere: leases taken here before it are stragglers
                // whose 429 must not raise the level again, and the key owes its probe.
                // Its limit may be learned: counted by the store again.
                if let Some(shared) = &self.shared {
                    shared.learning_again();
                }
                self.generation.fetch_add(1, Ordering::AcqRel);
                self.probe.owe();
                true
            }
        }
    }

    /// Disables the key for good, because the provider rejected it and the caller proved
    /// the key to blame (see `RejectedKey`); shares the disable with other replicas.
    pub(super) fn disable_rejected(&self) -> Transition {
        let transition = Transition {
            disabled: self.disable(),
            ..Transition::default()
        };
        if let Some(shared) = &self.shared {
            self.share(shared, &transition, false, false);
        }
        transition
    }

    /// Disables the key for good; `true` if it was not disabled yet.
    fn disable(&self) -> bool {
        let newly = self.deadline.disable();
        if newly {
            // Waiters must learn if this was the last key.
            self.signals.notify_all();
        }
        newly
    }

    /// A refusal on a lease: if other requests were in flight on the key when it came
    /// back, the provider limits concurrency, and its limit is at most what was in flight
    /// besides this request. Lowers `limit` to that (never below 1). Returns whether others
    /// were at the provider (with learning on), and (before, after) if the limit was
    /// lowered.
    ///
    /// `refused`: the other leases refused whose slots are not given back yet (the caller
    /// counted this one in `refused_open`, and its release takes it out again). `total`:
    /// the key's count across the replicas when the request was sent, this one included
    /// (0: unknown): what the provider saw is what every replica sent, not this one's.
    fn learn_refusal(&self, refused: u32, total: u32) -> (bool, Option<(u32, u32)>) {
        if !self.signals.learn_concurrency {
            return (false, None);
        }
        // Only requests sent are at the provider (a reservation held by a ready service is
        // not). This lease still counts among them, and so do others already refused whose
        // slots are not given back yet; neither is at the provider now.
        // Sent with `total - 1` others in flight across the replicas (unknown: this
        // replica's count now). Refusals seen here and not given back yet may have been
        // among them, and no longer at the provider: taken off (erring low: a limit
        // learned too low is raised again, one learned too high is refused again).
        let sent = if total != 0 {
            total
        } else {
            self.sent.load(Ordering::Acquire)
        };
        let others = sent.saturating_sub(1).saturating_sub(refused);
        if others == 0 {
            // Alone on the key: a limit of rate, not of concurrency.
            return (false, None);
        }
        self.gains.store(0, Ordering::Relaxed);
        self.taught.store(true, Ordering::Relaxed);
        let Ok(before) = self
            .limit
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |limit| {
                (others < limit).then_some(others)
            })
        else {
            return (true, None);
        };
        // Learned from a refusal at `others + 1`: a refused raise to it.
        self.hold_from_now(others);
        if self.signals.learned.fetch_min(others, Ordering::AcqRel) > others {
            self.teach_untaught(others);
        }
        (true, Some((before, others)))
    }

    /// A lower limit learned here: the keys (of this bucket) that have learned nothing
    /// from refusals of their own start from it, as keys of one tier share limits. Their
    /// requests in flight when the refusals come back are then not followed by more that
    /// the provider would refuse too.
    #[cold]
    fn teach_untaught(&self, limit: u32) {
        let Some(pool) = self.signals.pool.upgrade() else {
            return;
        };
        let table = pool.table.load();
        let bucket = self.bucket.as_ref();
        for slot in table.slots.iter() {
            let slot = match bucket {
                Some(bucket) => match slot.lanes[bucket.index].get() {
                    Some(lane) => lane,
                    None => continue,
                },
                None => slot,
            };
            if std::ptr::eq(&**slot, self)
                || slot.taught.load(Ordering::Relaxed)
                || slot.limit() <= limit
            {
                continue;
            }
            slot.start_from(limit);
        }
    }

    /// A success on a lease taken with the key at its learned limit: once the raise
    /// back-off has passed (`raise_at`) and the key was at its limit `limit` times since
    /// the limit last changed (there is demand for more), the limit rises by one, up to
    /// `cap`. The next request sent above the old limit tries it (`Taken::trial`).
    fn learn_success(&self) {
        let limit = self.limit();
        if limit >= self.cap {
            return;
        }
        let gains = self.gains.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        if gains < limit {
            return;
        }
        if self.signals.now().as_nanos() < self.raise_at.load(Ordering::Relaxed) {
            return;
        }
        self.gains.store(0, Ordering::Relaxed);
        let raised = limit.saturating_add(1).min(self.cap);
        let swapped = self
            .limit
            .compare_exchange(limit, raised, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok();
        if swapped {
            // The floor stays: requests above it try the new limit.
            self.floor.fetch_min(limit, Ordering::AcqRel);
        }
        if let Some(shared) = self.shared.as_ref().filter(|_| swapped) {
            self.share_limit(shared, raised, LimitChange::Raised);
        }
        // One more slot: a waiter may take it.
        self.signals.wake_one();
    }

    /// A request sent above the limit known to hold was served: the raised limit holds,
    /// and the next raise waits the initial back-off.
    fn raise_served(&self) {
        let limit = self.limit();
        if let Some(shared) = &self.shared {
            // The store decides when the raise holds (after tries enough), for every
            // replica: its answer brings the new floor.
            if limit != u32::MAX && limit > self.floor.load(Ordering::Acquire) {
                self.share_limit(shared, limit, LimitChange::RaiseServed);
            }
            return;
        }
        if self.floor.fetch_max(limit, Ordering::AcqRel) < limit {
            let wait = self.signals.backoff.raise_wait;
            self.raise_wait.store(nanos(wait), Ordering::Relaxed);
            self.raise_at.store(
                self.signals.now().saturating_add(wait).as_nanos(),
                Ordering::Relaxed,
            );
        }
    }

    /// A request sent above the limit known to hold was refused: back to that limit, and
    /// the next try waits twice as long as the last (from `Backoff::raise_wait`, up to
    /// `Backoff::max_raise_wait`). Returns (before, after) if the limit was lowered here.
    fn refuse_raise(&self) -> Option<(u32, u32)> {
        let floor = self.floor.load(Ordering::Acquire);
        if floor == u32::MAX {
            return None;
        }
        self.gains.store(0, Ordering::Relaxed);
        let before = self.limit.fetch_min(floor, Ordering::AcqRel);
        if before > floor {
            // Once per refused try, not once per refusal of it.
            let wait = Duration::from_nanos(self.raise_wait.load(Ordering::Relaxed))
                .saturating_mul(2)
                .clamp(
                    self.signals.backoff.raise_wait,
                    self.signals
                        .backoff
                        .max_raise_wait
                        .max(self.signals.backoff.raise_wait),
                );
            self.raise_wait.store(nanos(wait), Ordering::Relaxed);
            self.raise_at.store(
                self.signals.now().saturating_add(wait).as_nanos(),
                Ordering::Relaxed,
            );
            return Some((before, floor));
        }
        None
    }

    /// Starts from a limit learned elsewhere (another key, or another key's lane of the
    /// bucket), as if learned here: it holds, and the first try above it waits the initial
    /// back-off.
    pub(super) fn start_from(&self, limit: u32) {
        let limit = limit.clamp(1, self.cap);
        let before = self.limit.fetch_min(limit, Ordering::AcqRel);
        self.gains.store(0, Ordering::Relaxed);
        self.hold_from_now(limit);
        if let Some(shared) = self.shared.as_ref().filter(|_| before > limit) {
            // One limit for every replica: the store keeps it (a lower one wins).
            self.share_limit(shared, limit, LimitChange::Lowered);
        }
    }

    /// `limit` holds: the first try above it waits the initial back-off.
    fn hold_from_now(&self, limit: u32) {
        let wait = self.signals.backoff.raise_wait;
        self.floor.store(limit, Ordering::Release);
        self.raise_wait.store(nanos(wait), Ordering::Relaxed);
        self.raise_at.store(
            self.signals.now().saturating_add(wait).as_nanos(),
            Ordering::Relaxed,
        );
    }

    /// Rests the key until at least `wait` from now.
    fn extend(&self, wait: Duration) -> Rest {
        let now = self.signals.now();
        let until = now.saturating_add(wait).min(Deadline::LATEST);
        // A rest only ever extends.
        match self.deadline.extend(until) {
            RestWord::Disabled => Rest::Unchanged,
            RestWord::Until(previous) if until <= previous => Rest::Unchanged,
            RestWord::Until(previous) if previous > now => Rest::Extended,
            RestWord::Until(_) | RestWord::Clear => {
                // A new moment at which this key comes back. A waiter that armed no timer
                // (every key was busy for reasons other than time) would not hear of it if
                // the one caller woken by a release gave up: let every waiter recompute
                // its timer.
                if self.signals.any_waiting() {
                    self.signals.notify_all();
                }
                Rest::Started
            }
        }
    }

    /// A rest for a limit (a 429, a used-up window, an account's limit): the limit may still
    /// hold when the rest ends, so a rest that starts owes a probe.
    fn rest_for_limit(&self, wait: Duration) -> Rest {
        let rest = self.extend(wait);
        if rest == Rest::Started {
            self.probe.owe();
        }
        rest
    }

    /// A 429 on a lease of `generation`: raise the level if fresh, rest the key.
    pub(super) fn rate_limited(
        &self,
        generation: u32,
        retry_after: Option<Duration>,
    ) -> (Duration, u32, Rest) {
        self.rate_limited.fetch_add(1, Ordering::Relaxed);
        let fresh = self
            .generation
            .compare_exchange(
                generation,
                generation.wrapping_add(1),
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok();
        let level = if fresh {
            self.level.fetch_add(1, Ordering::AcqRel).saturating_add(1)
        } else {
            self.level.load(Ordering::Acquire).max(1)
        };
        let wait = self.signals.backoff.wait(level, retry_after);
        (wait, level, self.rest_for_limit(wait))
    }

    /// Rests every other key of this key's account for `wait`; returns how many.
    fn rest_account(&self, wait: Duration) -> usize {
        let Some(account) = self.spec.account.as_deref() else {
            return 0;
        };
        let Some(pool) = self.signals.pool.upgrade() else {
            return 0;
        };
        let table = pool.table.load();
        // A lane rests its bucket on the account's other keys; a key, the other keys.
        let bucket = self.bucket.as_ref();
        table
            .slots
            .iter()
            .filter(|s| s.spec.account.as_deref() == Some(account))
            .map(|s| match bucket {
                Some(bucket) => s.lane(bucket),
                None => s,
            })
            .filter(|s| !std::ptr::eq(&***s, self))
            .filter(|s| s.rest_for_limit(wait) != Rest::Unchanged)
            .inspect(|s| {
                if let Some(shared) = &s.shared {
                    s.share_rest(shared);
                }
            })
            .count()
    }

    /// A success; `true` if it reset the backoff level.
    fn succeeded(&self, generation: u32) -> bool {
        self.successes.fetch_add(1, Ordering::Relaxed);
        // Read first: the usual key has no streak, and a load keeps its line shared.
        if self.rejected_streak.load(Ordering::Relaxed) != 0 {
            self.rejected_streak.store(0, Ordering::Relaxed);
        }
        // Only a request reserved after the last cool-down began proves the key has
        // recovered; a straggler's success does not.
        if self.level.load(Ordering::Relaxed) != 0
            && self.generation.load(Ordering::Acquire) == generation
        {
            self.level.store(0, Ordering::Relaxed);
            return true;
        }
        false
    }
}

fn nanos(wait: Duration) -> u64 {
    u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX)
}
