//! [`Lease`]: a reserved key, counted in flight until dropped.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::task::{Context, Poll, ready};

use http::HeaderValue;

use super::LazyNow;
use super::events::{self, Label};
use super::record::Answered;
use super::rest::Claim;
use super::slot::{Slot, Taken};
use super::table::Table;
use crate::classify::{Classifier, Outcome, Scope};
use crate::key::ApiKey;
use crate::pool_time::PoolTime;
use crate::shared::{Admission, Answer, TokenVerdict};
use crate::tokens::TokenHeaders;
use tokio::sync::oneshot;

/// A reserved key: counts as in flight until dropped.
///
/// Made by [`KeyPool::try_reserve`](super::KeyPool::try_reserve), or by
/// [`KeyRotation`](crate::KeyRotation) while it waits for a key. The service moves it
/// into the response future and then into the response body, so the slot is given back
/// when the body ends, errors or is dropped, or as soon as anything on the way is dropped.
pub struct Lease {
    /// The key's slot, or in a pool with buckets, the key's lane for the request's bucket.
    slot: Arc<Slot>,
    /// In a pool with buckets: the key's own slot (account-wide state).
    key: Option<Arc<Slot>>,
    index: usize,
    keys: usize,
    pub(super) generation: u32,
    /// Taken with the key at its concurrency limit.
    at_limit: bool,
    /// Taken above the limit known to hold: a try of a raised limit (`Taken::trial`).
    trial: bool,
    /// The key's count across the replicas when the store admitted the lease, with it
    /// (0: unknown; see `Answered::total`).
    total: u32,
    /// Where the quota unit this lease took ends: a refund gives back only what of it is
    /// still unused (see `Gcra::refund`).
    tat_after: PoolTime,
    /// What few leases carry (a token cost, a bucket name new to the pool): boxed, so that
    /// the lease every request moves through the layers stays small.
    extra: Option<Box<Extra>>,
    /// `SENT`, `PROBE`, `RESOLVED`, `REFUSED` bits. Only the lease's owner writes them, so
    /// a plain load and store suffice (no locked read-modify-write on the hot path); atomic only
    /// so that a lease is `Sync`.
    flags: AtomicU8,
}

/// What became of a reservation's key since it was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Check {
    /// Nothing that stops it: send.
    Usable,
    /// It started resting (a refusal came back meanwhile).
    Resting,
    /// Another request is its single probe after a rest: it takes nothing else.
    ProbeRunning,
    /// Removed or replaced by a reload, or disabled.
    Gone,
}

/// The fields of a [`Lease`] most requests do without.
struct Extra {
    /// The request's token cost, and of it the tokens taken from a token quota.
    cost: u64,
    charged: u64,
    /// When the request may go (its booked tokens fit then; the epoch: at once).
    ready_at: PoolTime,
    /// The request's bucket name, if it was new to the pool and sent in the overflow
    /// bucket: its hash, to give it a bucket of its own once the provider accepts it.
    candidate: Option<u64>,
    /// With a shared state backend: the request asks the store for its tokens before it
    /// goes (see [`Lease::admit`]), and whether it asks for admission under the key's cap
    /// (or quota, or probe) as well.
    ask_tokens: bool,
    ask_cap: bool,
    /// The tokens the store took for the request (0: none), settled there with its answer.
    stored: u64,
    /// How far ahead (nanoseconds) a request that booked its tokens here may book them in
    /// the store (its wait budget when it booked; 0: it did not book).
    horizon: u64,
}

impl Extra {
    /// What of `taken` needs a place of its own; `None` for a request without a cost.
    #[inline]
    fn of(slot: &Slot, taken: &Taken, flags: &mut u8) -> Option<Box<Self>> {
        // Tokens taken, or a booking, come with a cost.
        (taken.cost != 0).then(|| Self::make(slot, taken, flags))
    }

    #[cold]
    #[inline(never)]
    fn make(slot: &Slot, taken: &Taken, flags: &mut u8) -> Box<Self> {
        let mut extra = Box::new(Self {
            cost: taken.cost,
            charged: taken.tokens,
            ready_at: taken.ready_at,
            ..Self::NONE
        });
        // Tokens taken from a token quota here are taken from the store's too, while it
        // is reachable.
        if taken.tokens != 0 && slot.shared.as_ref().is_some_and(|s| s.shares_tokens()) {
            extra.ask_tokens = true;
            extra.ask_cap = *flags & ASK != 0;
            *flags |= ASK;
        }
        extra
    }

    /// No cost, no candidate name: what a lease without a side record stands for.
    const NONE: Self = Self {
        cost: 0,
        charged: 0,
        ready_at: PoolTime::EPOCH,
        candidate: None,
        ask_tokens: false,
        ask_cap: false,
        stored: 0,
        horizon: 0,
    };
}

const SENT: u8 = 1;
const PROBE: u8 = 2;
const RESOLVED: u8 = 4;
/// Refused for a limit: counted in the slot's `refused_open` until dropped.
const REFUSED: u8 = 8;
/// With a shared state backend, on a key with a cap: the store must admit the lease
/// before its request goes (see [`Lease::admit`]).
const ASK: u8 = 16;
/// With a shared state backend: counted in this replica's count of the key (admitted by
/// the store, or taken alone while it was away), which its release must take back (see
/// `SharedKey::taken`).
const COUNTED: u8 = 32;
/// The request went out ([`Lease::mark_sent`]): counted in the slot's `sent` until dropped.
const AT_PROVIDER: u8 = 64;
/// In a pool with buckets: the key's single probe after an account-wide rest.
const KEY_PROBE: u8 = 128;

impl Lease {
    pub(super) fn new(table: &Table, index: usize, taken: Taken) -> Self {
        let slot = &table.slots[index];
        let mut flags = if taken.probe { PROBE } else { 0 };
        if let Some(shared) = &slot.shared {
            let (counted, ask) = shared.taken(taken.probe, slot.limit());
            if counted {
                flags |= COUNTED;
            }
            if ask {
                flags |= ASK;
            }
        }
        let extra = Extra::of(slot, &taken, &mut flags);
        Self {
            slot: slot.clone(),
            key: None,
            index,
            keys: table.slots.len(),
            generation: taken.generation,
            at_limit: taken.at_limit,
            trial: taken.trial,
            total: 0,
            tat_after: taken.tat_after,
            extra,
            flags: AtomicU8::new(flags),
        }
    }

    /// A lease on the lane `lane` of the key at `index` (a pool with buckets). With a
    /// shared store, the lane is counted and admitted there as a key is, under its own id.
    pub(super) fn new_in(table: &Table, index: usize, lane: &Arc<Slot>, taken: Taken) -> Self {
        let mut flags = if taken.probe { PROBE } else { 0 };
        if taken.key_probe {
            flags |= KEY_PROBE;
        }
        if let Some(shared) = &lane.shared {
            let (counted, ask) = shared.taken(taken.probe, lane.limit());
            if counted {
                flags |= COUNTED;
            }
            if ask {
                flags |= ASK;
            }
        }
        let extra = Extra::of(lane, &taken, &mut flags);
        Self {
            slot: lane.clone(),
            key: Some(table.slots[index].clone()),
            index,
            keys: table.slots.len(),
            generation: taken.generation,
            at_limit: taken.at_limit,
            trial: taken.trial,
            total: 0,
            tat_after: taken.tat_after,
            extra,
            flags: AtomicU8::new(flags),
        }
    }

    /// The key's own slot: account-wide state, credentials, header values.
    #[inline]
    fn key_slot(&self) -> &Arc<Slot> {
        self.key.as_ref().unwrap_or(&self.slot)
    }

    /// A lease that booked its tokens ahead (see `booking`) within `ahead` nanoseconds of
    /// its wait budget: the store may book them as far ahead.
    pub(super) fn with_horizon(mut self, ahead: u64) -> Self {
        if let Some(extra) = &mut self.extra {
            extra.horizon = ahead;
        }
        self
    }

    /// Takes the request's candidate bucket name (see [`Route`](crate::route::Route)).
    pub(super) fn with_candidate(mut self, candidate: Option<u64>) -> Self {
        if candidate.is_some() {
            let extra = self.extra.get_or_insert_with(|| Box::new(Extra::NONE));
            extra.candidate = candidate;
        }
        self
    }

    /// Tells the pool the provider accepted the request (a 2xx answer), in a pool with
    /// buckets: the request's bucket name is then one the provider knows, and keeps a
    /// bucket of its own (see [`KeyPool::route`](super::KeyPool::route)).
    /// [`KeyRotation`](crate::KeyRotation) calls it; call it when driving the pool by
    /// hand. Nothing to do once the bucket is known: one load.
    #[inline]
    pub fn confirm_bucket(&self) {
        if let Some(bucket) = &self.slot.bucket {
            bucket.confirm(self.extra.as_ref().and_then(|extra| extra.candidate));
        }
    }

    /// Is this lease in a bucket, or does it carry a token cost or a candidate bucket
    /// name? (What the answer's handling must look at beyond the outcome.)
    #[inline]
    pub(crate) fn has_extras(&self) -> bool {
        self.key.is_some() || self.extra.is_some()
    }

    /// The bucket this lease was taken in, in a pool with buckets.
    pub fn bucket(&self) -> Option<&str> {
        self.slot.bucket.as_deref().map(|bucket| &*bucket.name)
    }

    fn set_flag(&self, flag: u8) {
        let flags = self.flags.load(Ordering::Relaxed);
        self.flags.store(flags | flag, Ordering::Relaxed);
    }

    fn label(&self) -> Label<'_> {
        Label {
            position: self.index + 1,
            keys: self.keys,
            name: self.slot.spec.name.as_deref(),
            bucket: self.bucket(),
        }
    }

    /// 1-based position of the reserved key, as logs show it (`key 2/3`).
    pub fn position(&self) -> usize {
        self.index + 1
    }

    /// The reserved key's name, if it has one.
    pub fn name(&self) -> Option<&str> {
        self.slot.spec.name.as_deref()
    }

    /// The reserved key, for custom placements.
    pub fn key(&self) -> &ApiKey {
        &self.slot.spec.key
    }

    /// `Authorization: Bearer <key>`'s value, built once per key and marked sensitive.
    pub(crate) fn bearer_header(&self) -> &HeaderValue {
        self.key_slot().header(true)
    }

    /// The bare key as a header value, built once per key and marked sensitive.
    pub(crate) fn bare_header(&self) -> &HeaderValue {
        self.key_slot().header(false)
    }

    /// Is this lease the single probe request of a key coming back from a suspension?
    pub fn is_probe(&self) -> bool {
        self.flags.load(Ordering::Relaxed) & (PROBE | KEY_PROBE) != 0
    }

    /// The classifier of the pool the key belongs to.
    pub fn classifier(&self) -> &Classifier {
        &self.slot.signals.classifier
    }

    /// May this reservation still be sent? Not if, since it was made, its key was removed
    /// or replaced by a reload, started resting, was disabled, or came to owe its single
    /// probe after a rest to another request. `poll_ready` and `call` ask this of a
    /// reservation made earlier.
    ///
    /// A key owing its probe makes this reservation the probe, if no other request has
    /// claimed it yet: a ready request may as well be the one.
    #[inline]
    pub fn is_usable(&self) -> bool {
        self.check() == Check::Usable
    }

    /// What became of this reservation's key since it was made (see [`is_usable`]): the
    /// common answer in three loads (nothing happened to the key since), else the slow look.
    ///
    /// [`is_usable`]: Self::is_usable
    #[inline]
    pub(crate) fn check(&self) -> Check {
        let slot = &*self.slot;
        if let Some(key) = &self.key {
            if !key.is_retired()
                && key.deadline.is_clear()
                && !key.probe.is_pending()
                && slot.deadline.is_clear()
                && !slot.probe.is_pending()
            {
                return Check::Usable;
            }
            return self.check_slow_in(key);
        }
        if !slot.is_retired() && slot.deadline.is_clear() && !slot.probe.is_pending() {
            return Check::Usable;
        }
        self.check_slow()
    }

    /// [`check_slow`](Self::check_slow) for a lease on a lane: the key's account-wide
    /// state first, then the lane's.
    #[cold]
    #[inline(never)]
    fn check_slow_in(&self, key: &Slot) -> Check {
        let lane = &*self.slot;
        if key.is_retired() || key.deadline.is_disabled() {
            return Check::Gone;
        }
        let mut now = LazyNow::new(&lane.signals);
        if key.is_resting(&mut now) || lane.is_resting(&mut now) {
            return Check::Resting;
        }
        if self.flags.load(Ordering::Relaxed) & KEY_PROBE == 0 {
            match key.probe.claim() {
                Claim::Ordinary => {}
                Claim::Probe => self.set_flag(KEY_PROBE),
                Claim::Running => return Check::ProbeRunning,
            }
        }
        if self.flags.load(Ordering::Relaxed) & PROBE != 0 {
            return Check::Usable;
        }
        match lane.probe.claim() {
            Claim::Ordinary => Check::Usable,
            Claim::Probe => {
                self.set_flag(PROBE);
                Check::Usable
            }
            Claim::Running => Check::ProbeRunning,
        }
    }

    #[cold]
    #[inline(never)]
    fn check_slow(&self) -> Check {
        let slot = &*self.slot;
        if slot.is_retired() || slot.deadline.is_disabled() {
            return Check::Gone;
        }
        if slot.is_resting(&mut LazyNow::new(&slot.signals)) {
            return Check::Resting;
        }
        if self.is_probe() {
            return Check::Usable;
        }
        match slot.probe.claim() {
            Claim::Ordinary => Check::Usable,
            Claim::Probe => {
                self.set_flag(PROBE);
                Check::Usable
            }
            Claim::Running => Check::ProbeRunning,
        }
    }

    /// Must the store shared with other replicas admit this lease before its request
    /// goes? Only with a [state backend](crate::shared), on a key with a cap, while the
    /// store is reachable: then [`admit`](Self::admit) it.
    #[inline]
    pub fn needs_admission(&self) -> bool {
        self.flags.load(Ordering::Relaxed) & ASK != 0
    }

    /// Asks the store to admit this lease (one round trip, in which it counts every
    /// replica's leases on the key against its cap). The future gives the lease back if
    /// admitted, and `None` if the key is full across the replicas: the lease is then
    /// dropped, the key reads busy here until a release is announced, and the caller
    /// reserves again. Ready at once for a lease that does not [need
    /// admission](Self::needs_admission). [`KeyRotation`](crate::KeyRotation) does this in
    /// `poll_ready`.
    ///
    /// A request with a token cost on a key with a token quota also takes its tokens from
    /// the store's shared token quota (after its admission under the cap, if it needs
    /// one): if they do not fit there, the future gives `None` as for a full key, having
    /// given its tokens back and held the key's token state here at the store's, so that
    /// the caller's next look waits until they fit.
    pub fn admit(self) -> Admit {
        let cap = match &self.extra {
            Some(extra) if extra.ask_tokens => extra.ask_cap,
            _ => self.needs_admission(),
        };
        let admission = match &self.slot.shared {
            Some(shared) if cap => Some(shared.ask(self.slot.limit(), self.is_probe())),
            _ => None,
        };
        self.set_flag_off(ASK);
        let tokens = self.extra.as_ref().is_some_and(|extra| extra.ask_tokens);
        Admit {
            lease: Some(self),
            admission,
            tokens: tokens.then_some(TokenStep::Ask),
        }
    }

    /// Asks the store for the lease's tokens (see [`admit`](Self::admit)).
    fn ask_tokens(&self) -> Option<oneshot::Receiver<TokenVerdict>> {
        let extra = self.extra.as_ref()?;
        let shared = self.slot.shared.as_ref()?;
        let tokens = &self.slot.tokens;
        let limit = tokens.limit()?;
        if !shared.shares_tokens() {
            // The store went away since the take: the degraded policy applies from now on.
            return None;
        }
        let now = self.slot.signals.now();
        // A request that booked here books there as far as its budget allows.
        let ahead = extra
            .ready_at
            .saturating_duration_since(now)
            .max(std::time::Duration::from_nanos(extra.horizon));
        // This replica's state before the request (for a store that holds none).
        let floor = tokens
            .ahead_of(now)
            .saturating_sub(std::time::Duration::from_nanos(
                tokens.span(extra.charged, limit),
            ));
        Some(shared.ask_tokens(extra.cost, limit, tokens.period(), ahead, floor))
    }

    /// The store's answer for the lease's tokens: `false` if they do not fit there (the
    /// lease's tokens given back here, the state held at the store's).
    fn tokens_answered(&mut self, verdict: TokenVerdict) -> bool {
        let slot = &*self.slot;
        let now = slot.signals.now();
        let Some(extra) = self.extra.as_mut() else {
            return true;
        };
        match verdict {
            TokenVerdict::Taken { ready_in, state } => {
                extra.stored = extra.cost;
                let ready = now.saturating_add(ready_in);
                if ready > extra.ready_at && !ready_in.is_zero() {
                    extra.ready_at = ready;
                }
                slot.tokens.hold(state, now);
                true
            }
            TokenVerdict::Wait { state } => {
                slot.tokens.refund(std::mem::take(&mut extra.charged), now);
                slot.tokens.hold(state, now);
                false
            }
        }
    }

    fn set_flag_off(&self, flag: u8) {
        let flags = self.flags.load(Ordering::Relaxed);
        self.flags.store(flags & !flag, Ordering::Relaxed);
    }

    /// The request's token cost, as reserved (0: none; see
    /// [`Router::tokens`](crate::route::Router::tokens)).
    pub fn tokens(&self) -> u64 {
        self.extra.as_ref().map_or(0, |extra| extra.cost)
    }

    /// When a lease that booked its tokens ahead may be sent (`None`: now).
    pub(crate) fn ready_at(&self) -> Option<tokio::time::Instant> {
        let ready_at = self.extra.as_ref()?.ready_at;
        let signals = &self.slot.signals;
        (ready_at > signals.now()).then(|| signals.instant(ready_at))
    }

    /// A handle on this lease's token reservation, to settle it with the tokens the answer
    /// reported ([`TokenReservation::settle`]); `None` for a request without a token cost.
    /// [`KeyRotation`](crate::KeyRotation) puts it in the response's extensions.
    pub fn reservation(&self) -> Option<TokenReservation> {
        let extra = self.extra.as_ref().filter(|extra| extra.cost != 0)?;
        Some(TokenReservation {
            inner: Arc::new(ReservationInner {
                slot: self.slot.clone(),
                cost: extra.cost,
                charged: extra.charged,
                stored: extra.stored,
                settled: AtomicBool::new(false),
            }),
        })
    }

    /// What an answer's headers say of the provider's token count, for this lease's key
    /// (and bucket): learns the token limit and holds the quota no looser than the
    /// provider's (see [`KeyPoolBuilder::token_quota_per_key`](super::KeyPoolBuilder::token_quota_per_key)).
    pub(crate) fn observe_tokens(&self, headers: &http::HeaderMap) {
        if let Some(seen) = TokenHeaders::read(headers, std::time::SystemTime::now()) {
            self.slot.tokens.observe(seen, self.slot.signals.now());
        }
    }

    /// Counts the request as sent with this key and logs `Using key i/n`.
    pub fn mark_sent(&self) {
        if self.flags.load(Ordering::Relaxed) & AT_PROVIDER != 0 {
            return;
        }
        self.set_flag(SENT | AT_PROVIDER);
        self.slot.sent.fetch_add(1, Ordering::AcqRel);
        self.slot.requests.fetch_add(1, Ordering::Relaxed);
        if let Some(extra) = self.extra.as_ref().filter(|extra| extra.cost != 0) {
            self.slot
                .tokens
                .reserved
                .fetch_add(extra.cost, Ordering::Relaxed);
        }
        tracing::debug!(
            key = self.position(),
            keys = self.keys,
            "Using {}",
            self.label()
        );
    }

    /// Disables the reserved key for good (and in every replica sharing the pool's state),
    /// because the provider refused it and the caller proved the key to blame: the same
    /// request succeeded with another key (see [`RejectedKey`](super::RejectedKey)).
    /// `true` if it was not disabled yet.
    pub fn disable(&self) -> bool {
        super::rejected::disable(self.key_slot(), self.index, self.keys)
    }

    /// The reserved key as a [`RejectedKey`](super::RejectedKey), for a response that
    /// refused it.
    pub(crate) fn rejected_key(&self) -> super::RejectedKey {
        super::RejectedKey::new(self.key_slot().clone(), self.index, self.keys)
    }

    /// Applies a response's [`Outcome`] to the key: cool down, suspend, or count. A
    /// [`Outcome::KeyRejected`] is counted, not acted on: see
    /// [`RejectedKey`](super::RejectedKey).
    pub fn record(&self, outcome: Outcome) {
        self.record_answer(outcome, false);
    }

    /// [`record`](Self::record), told whether the answer's rate-limit headers say a window
    /// is used up: such a refusal is about rate, and teaches no concurrency limit.
    pub(crate) fn record_answer(&self, outcome: Outcome, window_spent: bool) {
        let flags = self.flags.load(Ordering::Relaxed);
        let first_refusal = outcome.is_rate_limited() && flags & REFUSED == 0;
        if first_refusal {
            self.set_flag(REFUSED);
        }
        if self.is_probe() {
            self.set_flag(RESOLVED);
        }
        if let Some(key) = &self.key {
            let transition = self.record_in(key, outcome, flags, first_refusal, window_spent);
            if transition.is_eventful() {
                events::log(&self.label(), &transition);
            }
            return;
        }
        let transition = self.slot.record(
            outcome,
            Answered {
                generation: self.generation,
                at_limit: self.at_limit,
                trial: self.trial,
                probe: flags & PROBE != 0,
                first_refusal,
                learn: !window_spent,
                total: self.total,
            },
        );
        if transition.is_eventful() {
            events::log(&self.label(), &transition);
        }
    }
}

impl Lease {
    /// [`record_answer`](Self::record_answer) for a lease on a lane: an outcome about the
    /// whole key (a spent balance, an account-wide cap) rests the key, every bucket; any
    /// other is the lane's alone. The key's probe, if this lease is it, is answered.
    #[inline(never)]
    fn record_in(
        &self,
        key: &Slot,
        outcome: Outcome,
        flags: u8,
        first_refusal: bool,
        window_spent: bool,
    ) -> super::record::Transition {
        let lane = &*self.slot;
        let key_probe = flags & KEY_PROBE != 0;
        if let Outcome::QuotaExhausted {
            scope: Scope::Key, ..
        } = outcome
        {
            let transition = key.record(
                outcome,
                Answered {
                    generation: 0,
                    at_limit: false,
                    trial: false,
                    probe: key_probe,
                    first_refusal: false,
                    learn: false,
                    total: 0,
                },
            );
            if flags & PROBE != 0 {
                // The lane's probe told nothing about the lane: owed again.
                lane.probe.settle(false);
            }
            return transition;
        }
        let transition = lane.record(
            outcome,
            Answered {
                generation: self.generation,
                at_limit: self.at_limit,
                trial: self.trial,
                probe: flags & PROBE != 0,
                first_refusal,
                learn: !window_spent,
                total: self.total,
            },
        );
        if key_probe {
            // The key's probe after an account-wide rest: any answer about a bucket, or a
            // success, says the account is served again.
            let back = !matches!(outcome, Outcome::Failure | Outcome::KeyRejected);
            key.probe.settle(back);
            key.signals.notify_all();
        }
        transition
    }
}

impl Lease {
    /// A probe (the key's, the lane's, or both) dropped unanswered.
    #[cold]
    fn probes_abandoned(&self, flags: u8) {
        if flags & KEY_PROBE != 0 {
            if let Some(key) = &self.key {
                // The key's probe never got an answer: the next caller of any bucket may
                // probe.
                key.probe_abandoned();
                key.signals.notify_all();
            }
        }
        if flags & PROBE != 0 {
            // The probe never got an answer: the next caller may probe.
            self.slot.probe_abandoned();
        }
    }
}

impl Lease {
    /// Gives back the tokens of a lease dropped unsent: here, and in the store if it took
    /// them.
    #[cold]
    fn tokens_unsent(&self, extra: &Extra) {
        let slot = &*self.slot;
        if extra.charged != 0 {
            slot.tokens.refund(extra.charged, slot.signals.now());
        }
        if let (Some(shared), Some(limit)) = (&slot.shared, slot.tokens.limit()) {
            if extra.stored != 0 {
                let floor = slot.tokens.ahead_of(slot.signals.now());
                shared.settle_tokens(extra.stored, 0, limit, slot.tokens.period(), floor);
            }
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let flags = *self.flags.get_mut();
        if flags & (KEY_PROBE | PROBE) != 0 && flags & RESOLVED == 0 {
            self.probes_abandoned(flags);
        }
        // Reserved but never sent: what is left of its quota unit goes back, and its
        // tokens.
        let unsent = (flags & SENT == 0).then_some(self.tat_after);
        if let Some(extra) = self.extra.as_ref() {
            if unsent.is_some() && (extra.charged != 0 || extra.stored != 0) {
                self.tokens_unsent(extra);
            }
        }
        self.slot.release(
            unsent,
            flags & AT_PROVIDER != 0,
            flags & REFUSED != 0,
            flags & COUNTED != 0,
        );
    }
}

/// The store's answer to a lease's request to be admitted: made by [`Lease::admit`].
#[derive(Debug)]
#[must_use = "a future does nothing unless polled"]
pub struct Admit {
    lease: Option<Lease>,
    admission: Option<Admission>,
    tokens: Option<TokenStep>,
}

/// Where an [`Admit`] is with the store's token quota.
#[derive(Debug)]
enum TokenStep {
    /// To ask, once admitted under the cap.
    Ask,
    /// Asked: the store's answer.
    Asked(oneshot::Receiver<TokenVerdict>),
}

impl Future for Admit {
    type Output = Option<Lease>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Lease>> {
        let this = &mut *self;
        if let Some(admission) = &mut this.admission {
            let lease = this.lease.as_mut().expect("Admit polled after completion");
            let shared = lease
                .slot
                .shared
                .as_ref()
                .expect("an admission has a shared key");
            let answer = ready!(admission.poll(shared, cx));
            this.admission = None;
            match answer {
                Answer::Admitted { counted, total } => {
                    if counted {
                        lease.set_flag(COUNTED);
                    }
                    if total != 0 {
                        // What every replica sent is what the provider sees.
                        let (at_limit, trial) = lease.slot.sent_with(total);
                        lease.total = total;
                        lease.at_limit |= at_limit;
                        lease.trial |= trial;
                    }
                }
                Answer::Full => {
                    this.lease = None;
                    return Poll::Ready(None);
                }
                Answer::QuotaIn(wait) => {
                    lease.slot.hold_quota(wait);
                    // Its local unit stays spent: a refund would undo part of the hold.
                    lease.set_flag(SENT);
                    this.lease = None;
                    return Poll::Ready(None);
                }
            }
        }
        if let Some(step) = &mut this.tokens {
            let lease = this.lease.as_mut().expect("Admit polled after completion");
            if let TokenStep::Ask = step {
                match lease.ask_tokens() {
                    Some(answer) => *step = TokenStep::Asked(answer),
                    None => this.tokens = None,
                }
            }
            if let Some(TokenStep::Asked(answer)) = &mut this.tokens {
                let verdict = ready!(Pin::new(answer).poll(cx));
                this.tokens = None;
                // No answer (the store failed): the request goes on this replica's own
                // accounting.
                if let Ok(verdict) = verdict {
                    if !lease.tokens_answered(verdict) {
                        this.lease = None;
                        return Poll::Ready(None);
                    }
                }
            }
        }
        Poll::Ready(Some(
            this.lease.take().expect("Admit polled after completion"),
        ))
    }
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Lease({})", self.label())
    }
}

/// A request's token reservation: the tokens its [`Lease`] took from its key's token quota
/// (estimated input plus the output allowed), settled when the answer says what it used.
///
/// In the response's extensions of a request with a token cost
/// ([`Router::tokens`](crate::route::Router::tokens)). Settle it once the answer's usage is
/// known ([`settle`](Self::settle)): what was not used goes back to the quota (see the
/// refund rule in [`TokenQuota`](crate::TokenQuota)'s docs), what was used beyond it is
/// charged. One never settled (an answer cut short, or without usage) stays charged in
/// full: tokens are never given back blind. Clones are the same reservation; it settles
/// once.
///
/// # Examples
///
/// ```
/// use tower_key_rotation::route::{RequestHead, Router};
/// use tower_key_rotation::{KeyPool, KeySet, TokenQuota};
///
/// #[derive(Debug)]
/// struct Thousand;
///
/// impl Router for Thousand {
///     fn tokens(&self, _: &RequestHead<'_>) -> Option<u64> {
///         Some(1_000)
///     }
/// }
///
/// let pool = KeyPool::builder(KeySet::parse("k1")?)
///     .router(Thousand)
///     .token_quota_per_key(TokenQuota::per_minute(1_500))
///     .build();
/// let route = pool.route(&RequestHead::of(&http::Request::new(())));
/// let lease = pool.try_reserve_route(&route).unwrap();
/// lease.mark_sent();
/// let reservation = lease.reservation().unwrap();
/// drop(lease);
/// assert!(pool.try_reserve_route(&route).is_none(), "1,000 + 1,000 > 1,500");
/// reservation.settle(300); // the answer used 300: 700 come back
/// assert!(pool.try_reserve_route(&route).is_some());
/// assert_eq!(pool.snapshot()[0].tokens_used, 300);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct TokenReservation {
    inner: Arc<ReservationInner>,
}

struct ReservationInner {
    slot: Arc<Slot>,
    cost: u64,
    /// Taken from the token quota here: the cost, or more while a shared store is away
    /// (the degraded policy's share).
    charged: u64,
    /// Taken from the store's shared token quota (0: none).
    stored: u64,
    settled: AtomicBool,
}

impl ReservationInner {
    /// Settles what the store took, if anything, with `used` (0: given back whole).
    fn settle_stored(&self, used: u64) {
        let slot = &*self.slot;
        if let (Some(shared), Some(limit)) = (&slot.shared, slot.tokens.limit()) {
            if self.stored != 0 {
                let floor = slot.tokens.ahead_of(slot.signals.now());
                shared.settle_tokens(self.stored, used, limit, slot.tokens.period(), floor);
            }
        }
    }
}

impl TokenReservation {
    /// The tokens reserved.
    pub fn tokens(&self) -> u64 {
        self.inner.cost
    }

    /// Settles the reservation with the tokens the answer reported using (input and
    /// output together). Only the first call counts.
    pub fn settle(&self, used: u64) {
        let inner = &*self.inner;
        if inner.settled.swap(true, Ordering::AcqRel) {
            return;
        }
        let slot = &*inner.slot;
        slot.tokens.used.fetch_add(used, Ordering::Relaxed);
        // Charged more than the cost (the degraded policy's share): settled in the same
        // proportion.
        let used_here = if inner.charged > inner.cost && inner.cost != 0 {
            u64::try_from(u128::from(used) * u128::from(inner.charged) / u128::from(inner.cost))
                .unwrap_or(u64::MAX)
        } else {
            used
        };
        let back = inner.charged != 0
            && slot
                .tokens
                .settle(inner.charged, used_here, slot.signals.now());
        inner.settle_stored(used);
        if back {
            // Room came back sooner than the waiters' timers say.
            slot.signals.notify_all();
        }
    }

    /// Gives the whole reservation back: the provider refused the request (a 429), so it
    /// used none of it.
    pub(crate) fn refused(&self) {
        let inner = &*self.inner;
        if inner.settled.swap(true, Ordering::AcqRel) {
            return;
        }
        let slot = &*inner.slot;
        let back = inner.charged != 0 && slot.tokens.refund(inner.charged, slot.signals.now());
        inner.settle_stored(0);
        if back {
            slot.signals.notify_all();
        }
    }
}

impl fmt::Debug for TokenReservation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenReservation")
            .field("tokens", &self.inner.cost)
            .field("settled", &self.inner.settled.load(Ordering::Relaxed))
            .finish()
    }
}
