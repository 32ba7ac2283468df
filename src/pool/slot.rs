//! One key's state: the atomics of a [`Slot`], taking and giving back its in-flight slots,
//! and when it can next take a request. With `record` (applying an answer's outcome: rest,
//! disable, learn), this is the pool's state boundary: only these two modules write a
//! slot's atomics, so a backend that shares keys' state between processes has one
//! interface to stand behind (take, release, record, and the status query); the rest of
//! the pool only reads.

use crate::sync::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use http::HeaderValue;

use super::KeyState;
use super::bucket::Bucket;
use super::rest::{Claim, Deadline, Probe, RestWord};
use super::state::Availability;
use super::{LazyNow, Signals};
use crate::key::KeySpec;
use crate::pool_time::PoolTime;
use crate::quota::{Gcra, Quota};
use crate::shared::SharedKey;
use crate::tokens::TokenCell;

/// One key's state, hot fields first and on their own cache lines so that keys do not
/// contend with each other.
#[repr(align(128))]
pub(super) struct Slot {
    /// Leases alive on this key: reserved, in flight, or streaming their answer.
    pub(super) in_flight: AtomicU32,
    /// Of `in_flight`, the leases whose request was sent: only these are at the provider,
    /// and only these count when a refusal teaches a concurrency limit (a reservation a
    /// ready service holds idle is not at the provider).
    pub(super) sent: AtomicU32,
    /// The concurrency limit in force: `cap`, or lower once refusals taught the pool the
    /// provider's (`learn_refusal`); never above `cap`, never below 1. `u32::MAX`: none.
    pub(super) limit: AtomicU32,
    /// Successes sent with the key at its learned `limit` since the limit last changed.
    pub(super) gains: AtomicU32,
    /// The limit was learned from this key's own refusals (not only from other keys'; see
    /// `teach_untaught`).
    pub(super) taught: AtomicBool,
    /// The highest limit known to hold: the last one learned from a refusal, or reached by
    /// a raise that was served (`u32::MAX`: none). A request sent with more than this in
    /// flight tries a raise (`Taken::trial`).
    pub(super) floor: AtomicU32,
    /// No raise of the learned limit before this [`PoolTime`] (as nanoseconds).
    pub(super) raise_at: AtomicU64,
    /// The back-off before the next raise, in nanoseconds: doubled by each refused raise.
    pub(super) raise_wait: AtomicU64,
    /// Leases refused for a limit whose slot is not given back yet: still `in_flight`, but
    /// no longer at the provider, so a refusal does not count them as others there.
    pub(super) refused_open: AtomicU32,
    /// Consecutive fresh 429s (the backoff's exponent); 0 after a fresh success.
    pub(super) level: AtomicU32,
    /// Cool-downs that raised `level`. A lease remembers the generation it was taken in; a
    /// 429 raises the level only if no cool-down started since (see `rate_limited`).
    pub(super) generation: AtomicU32,
    pub(super) probe: Probe,
    pub(super) deadline: Deadline,
    /// GCRA theoretical arrival time (see `quota`), a [`PoolTime`] as nanoseconds.
    pub(super) tat: AtomicU64,
    /// The token quota (see `tokens`): asked only by requests with a token cost.
    pub(super) tokens: TokenCell,
    pub(super) requests: AtomicU64,
    pub(super) successes: AtomicU64,
    pub(super) rate_limited: AtomicU64,
    pub(super) failures: AtomicU64,
    /// Answers that refused the key's credentials (401/403, as the classifier reads them).
    pub(super) rejected: AtomicU64,
    /// Such answers in a row, since the key's last accepted answer: a retry that must tell
    /// a bad key from a bad request asks a key whose last answer was accepted first.
    pub(super) rejected_streak: AtomicU32,
    /// Requests of a session taken by this key as the session's first choice (affinity).
    pub(super) affinity_hits: AtomicU64,
    /// Requests of a session that spilled to this key from their first choice (affinity).
    pub(super) affinity_spills: AtomicU64,
    /// Set by a reload that removed or replaced the key: it finishes its requests in
    /// flight and sends no reservation made earlier.
    pub(super) retired: AtomicBool,
    /// The configured concurrency cap (`u32::MAX`: none).
    pub(super) cap: u32,
    pub(super) weight: u32,
    pub(super) quota: Option<Gcra>,
    pub(super) spec: KeySpec,
    /// The key's part in the state shared with other replicas (`None`: no backend).
    pub(super) shared: Option<SharedKey>,
    /// Header values, built on first use and reused: `Bearer <key>` and the bare key.
    pub(super) bearer: OnceLock<HeaderValue>,
    pub(super) bare: OnceLock<HeaderValue>,
    pub(super) signals: Arc<Signals>,
    /// The bucket this slot is the lane of; `None` for a key's own slot.
    pub(super) bucket: Option<Arc<Bucket>>,
    /// A key's lanes, by bucket index, made on first use (see `bucket`); empty in a pool
    /// without buckets, and for a lane.
    pub(super) lanes: Box<[OnceLock<Arc<Slot>>]>,
}

/// What [`Slot::try_take`] hands to the lease it makes.
#[derive(Debug, Clone, Copy)]
pub(super) struct Taken {
    /// The lease is the key's single probe after a rest.
    pub(super) probe: bool,
    /// The key's cool-down generation, read before the take.
    pub(super) generation: u32,
    /// The take filled the key up to its concurrency limit (a success then counts
    /// towards raising a learned limit).
    pub(super) at_limit: bool,
    /// The quota state the take left: its unit ends there (the epoch without a quota).
    pub(super) tat_after: PoolTime,
    /// In a pool with buckets: the lease is also the key's single probe after an
    /// account-wide rest.
    pub(super) key_probe: bool,
    /// Sent with more in flight than the limit known to hold (see `Slot::floor`): a try of
    /// a raised limit, whose refusal lowers the limit back without a rest.
    pub(super) trial: bool,
    /// Tokens taken from the token quota (0 for a request without a cost, or a slot
    /// without a token quota).
    pub(super) tokens: u64,
    /// The request's token cost (as reserved, with or without a token quota).
    pub(super) cost: u64,
    /// When the request may go: now, or the time its booked tokens fit (see `booking`).
    pub(super) ready_at: PoolTime,
}

impl Slot {
    /// A key's own slot; with room for `lanes` lanes (0 in a pool without buckets).
    pub(super) fn new(
        spec: KeySpec,
        cap: u32,
        quota: Option<Quota>,
        signals: &Arc<Signals>,
        lanes: usize,
    ) -> Arc<Self> {
        let cap = spec.max_in_flight.unwrap_or(cap);
        let quota = spec.quota.or(quota).map(|q| q.gcra());
        let shared = signals
            .shared
            .as_ref()
            .map(|shared| shared.key(shared.backend.key_id(&spec), cap, quota));
        Self::build(spec, cap, quota, shared, signals, None, lanes)
    }

    /// The key's lane for `bucket`, made on first use: the key's cap and quota, or its own
    /// limits in that bucket ([`KeySpec::bucket_max_in_flight`]); the concurrency limit the
    /// bucket learned on other keys, if lower.
    #[inline]
    pub(super) fn lane(&self, bucket: &Arc<Bucket>) -> &Arc<Slot> {
        self.lanes[bucket.index].get_or_init(|| self.make_lane(bucket))
    }

    #[cold]
    fn make_lane(&self, bucket: &Arc<Bucket>) -> Arc<Slot> {
        let own = self.spec.bucket_limits(&bucket.name);
        let cap = own.and_then(|own| own.max_in_flight).unwrap_or(self.cap);
        let quota = own
            .and_then(|own| own.quota)
            .map(|q| q.gcra())
            .or(self.quota);
        // Shared with the other replicas as the key is, under its own id.
        let shared = self
            .shared
            .as_ref()
            .map(|shared| shared.lane(&bucket.name, cap, quota));
        let lane = Self::build(
            self.spec.clone(),
            cap,
            quota,
            shared,
            &bucket.signals,
            Some(bucket.clone()),
            0,
        );
        let learned = bucket.signals.learned.load(Ordering::Relaxed);
        if self.signals.learn_concurrency && learned < cap {
            lane.start_from(learned);
        }
        lane
    }

    fn build(
        spec: KeySpec,
        cap: u32,
        quota: Option<Gcra>,
        shared: Option<SharedKey>,
        signals: &Arc<Signals>,
        bucket: Option<Arc<Bucket>>,
        lanes: usize,
    ) -> Arc<Self> {
        Arc::new(Self {
            in_flight: AtomicU32::new(0),
            sent: AtomicU32::new(0),
            limit: AtomicU32::new(cap),
            gains: AtomicU32::new(0),
            taught: AtomicBool::new(false),
            floor: AtomicU32::new(u32::MAX),
            raise_at: AtomicU64::new(0),
            raise_wait: AtomicU64::new(0),
            refused_open: AtomicU32::new(0),
            level: AtomicU32::new(0),
            generation: AtomicU32::new(0),
            probe: Probe::new(),
            deadline: Deadline::new(),
            tat: AtomicU64::new(0),
            tokens: TokenCell::new(signals.token_quota, signals.token_window),
            requests: AtomicU64::new(0),
            successes: AtomicU64::new(0),
            rate_limited: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            rejected_streak: AtomicU32::new(0),
            affinity_hits: AtomicU64::new(0),
            affinity_spills: AtomicU64::new(0),
            retired: AtomicBool::new(false),
            cap,
            weight: spec.weight,
            quota,
            spec,
            shared,
            bearer: OnceLock::new(),
            bare: OnceLock::new(),
            signals: signals.clone(),
            bucket,
            lanes: (0..lanes).map(|_| OnceLock::new()).collect(),
        })
    }

    /// The concurrency limit in force (`u32::MAX`: none).
    pub(super) fn limit(&self) -> u32 {
        self.limit.load(Ordering::Relaxed)
    }

    /// The most leases this replica may hold on the key now: `limit`, or less while the
    /// store shared with other replicas says the key is full, or its degraded policy applies.
    #[inline]
    pub(super) fn take_limit(&self) -> u32 {
        let limit = self.limit();
        match &self.shared {
            None => limit,
            Some(shared) => shared.limit(limit),
        }
    }

    /// Removed or replaced by a reload.
    pub(super) fn retire(&self) {
        self.retired.store(true, Ordering::Release);
    }

    #[inline]
    pub(super) fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    /// Resting or disabled now? Clears an expired rest.
    #[inline]
    pub(super) fn is_resting(&self, now: &mut LazyNow<'_>) -> bool {
        self.deadline.is_resting(now)
    }

    /// The key's state and when it can next take a request: the one answer that
    /// selection, waiting, the retry policy and `KeyPool::snapshot` all use. The states
    /// are those of the module docs' diagram; a key owing its probe reads `Healthy` (the
    /// next taker probes).
    pub(super) fn status(&self, now: &mut LazyNow<'_>) -> (KeyState, Availability) {
        let cost = now.cost;
        let quota_at = || {
            let at = self
                .quota
                .map_or(PoolTime::EPOCH, |q| q.available_at(&self.tat));
            if cost == 0 {
                return at;
            }
            // A request larger than the window never fits here: it waits as if for ever
            // (the pool fails it at once when no key fits it: `KeyPool::poll_reserve_route`).
            // While a shared store is away, the degraded policy's share of the window.
            let tokens_at = self
                .token_units(cost)
                .map_or(Some(PoolTime::EPOCH), |units| {
                    self.tokens.available_at(units)
                });
            at.max(tokens_at.unwrap_or(PoolTime::MAX))
        };
        match self.deadline.read() {
            RestWord::Disabled => return (KeyState::Disabled, Availability::Never),
            // Resting: back (to its probe) at the deadline, or when the quota refills if
            // later.
            RestWord::Until(until) if until > now.get() => {
                return (KeyState::Resting, Availability::At(until.max(quota_at())));
            }
            RestWord::Until(_) | RestWord::Clear => {}
        }
        if self.probe.is_running() {
            // Probing: the probe's answer wakes every waiter.
            return (KeyState::Probing, Availability::OnRelease);
        }
        if self.in_flight.load(Ordering::Relaxed) >= self.take_limit() {
            return (KeyState::Busy, Availability::OnRelease);
        }
        if cost != 0 && self.shared.is_some() && self.token_units(cost).is_none() {
            // The degraded policy `closed`: no tokens until the store is back (its return
            // wakes every waiter).
            return (KeyState::Busy, Availability::OnRelease);
        }
        let quota_at = quota_at();
        if quota_at == PoolTime::MAX {
            return (KeyState::Busy, Availability::Never);
        }
        if quota_at != PoolTime::EPOCH && quota_at > now.get() {
            return (KeyState::Busy, Availability::At(quota_at));
        }
        (KeyState::Healthy, Availability::Now)
    }

    /// Could a request take this key now? (A hint: `try_take` decides, and agrees unless
    /// another caller changes the key in between.)
    #[inline]
    pub(super) fn is_available(&self, now: &mut LazyNow<'_>) -> bool {
        // Clears an expired rest, so that the next look need not read the clock.
        !self.is_resting(now) && self.status(now).1 == Availability::Now
    }

    /// Takes an in-flight slot (and a unit of quota) if the key is usable now.
    #[inline]
    pub(super) fn try_take(&self, now: &mut LazyNow<'_>) -> Option<Taken> {
        // Read before anything else, so that a lease never carries a generation newer
        // than its take: a cool-down starts by raising the generation (`rate_limited`),
        // and a lease reserved before that is a straggler whose 429 must not escalate.
        // The AcqRel increment below keeps this load before the take (loom model:
        // `a_lease_taken_before_a_cool_down_starts_can_never_escalate_it`).
        let generation = self.generation.load(Ordering::Acquire);
        if self.is_resting(now) {
            return None;
        }
        let probe = match self.probe.claim() {
            Claim::Ordinary => false,
            Claim::Probe => true,
            Claim::Running => return None,
        };
        // Quota first: giving a unit back needs no wake-up, while giving back an in-flight
        // slot would (and would wake this very caller if it is waiting).
        let now_at = if self.quota.is_some() {
            now.get()
        } else {
            PoolTime::EPOCH
        };
        let mut tat_after = PoolTime::EPOCH;
        if let Some(quota) = self.quota {
            // Units of quota per request: more while a quota shared by replicas is split.
            let units = self
                .shared
                .as_ref()
                .map_or(1, |shared| shared.quota_units());
            let Some(after) = quota.try_take_units(&self.tat, now_at, units) else {
                self.unprobe(probe);
                return None;
            };
            tat_after = after;
        }
        // Tokens next, only for a request that has a cost.
        let mut tokens = 0;
        let mut ready_at = PoolTime::EPOCH;
        if now.cost != 0 {
            let (taken, ready) = self.take_tokens(now, tat_after, now_at, probe)?;
            tokens = taken;
            ready_at = ready;
        }
        let limit = self.take_limit();
        let in_flight = if limit == u32::MAX {
            Some(self.in_flight.fetch_add(1, Ordering::AcqRel))
        } else {
            self.in_flight
                .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                    (n < limit).then_some(n + 1)
                })
                .ok()
        };
        if let Some(before) = in_flight {
            return Some(Taken {
                probe,
                generation,
                at_limit: before.saturating_add(1) >= limit,
                tat_after,
                key_probe: false,
                // Only a learned limit has a floor: no load on a key without a limit.
                trial: limit != u32::MAX
                    && before.saturating_add(1) > self.floor.load(Ordering::Relaxed),
                tokens,
                cost: now.cost,
                ready_at,
            });
        }
        if let Some(quota) = self.quota {
            quota.refund(&self.tat, tat_after, now_at);
        }
        if tokens != 0 {
            self.tokens.refund(tokens, now.get());
        }
        self.unprobe(probe);
        None
    }

    /// In a pool with buckets: takes the key for a request of `bucket`, if the key (not
    /// disabled, not resting account-wide, its probe not running) and its lane for the
    /// bucket (see [`try_take`](Self::try_take)) both allow. The one question selection
    /// asks of a key for a route: "can it take a request now, and take it".
    #[inline]
    pub(super) fn try_take_in(
        &self,
        bucket: &Arc<Bucket>,
        now: &mut LazyNow<'_>,
    ) -> Option<(&Arc<Slot>, Taken)> {
        if self.is_resting(now) {
            return None;
        }
        let key_probe = match self.probe.claim() {
            Claim::Ordinary => false,
            Claim::Probe => true,
            Claim::Running => return None,
        };
        let lane = self.lane(bucket);
        match lane.try_take(now) {
            Some(mut taken) => {
                taken.key_probe = key_probe;
                Some((lane, taken))
            }
            None => {
                self.unprobe(key_probe);
                None
            }
        }
    }

    /// The key's state and availability for a request of `bucket`: the key's own
    /// (disabled, an account-wide rest, its probe running) first, then its lane's.
    pub(super) fn status_in(
        &self,
        bucket: &Arc<Bucket>,
        now: &mut LazyNow<'_>,
    ) -> (KeyState, Availability) {
        match self.deadline.read() {
            RestWord::Disabled => return (KeyState::Disabled, Availability::Never),
            RestWord::Until(until) if until > now.get() => {
                return (KeyState::Resting, Availability::At(until));
            }
            RestWord::Until(_) | RestWord::Clear => {}
        }
        if self.probe.is_running() {
            return (KeyState::Probing, Availability::OnRelease);
        }
        match self.lanes[bucket.index].get() {
            Some(lane) => lane.status(now),
            None => (KeyState::Healthy, Availability::Now),
        }
    }

    /// [`status_in`](Self::status_in) says `Now` (clearing expired rests on the way).
    #[inline]
    pub(super) fn is_available_in(&self, bucket: &Arc<Bucket>, now: &mut LazyNow<'_>) -> bool {
        if self.is_resting(now) {
            return false;
        }
        match self.lanes[bucket.index].get() {
            Some(lane) => !self.probe.is_running() && lane.is_available(now),
            None => !self.probe.is_running(),
        }
    }

    /// The key's state and availability for a request of a bucket not known here (the
    /// retry policy's question): its own, and in a pool with buckets, the soonest of the
    /// lanes it has made, when none of them can take a request now.
    pub(super) fn status_any(&self, now: &mut LazyNow<'_>) -> (KeyState, Availability) {
        let own = self.status(now);
        if own.1 != Availability::Now || self.lanes.is_empty() {
            return own;
        }
        let mut soonest: Option<(KeyState, Availability)> = None;
        for lane in self.made_lanes() {
            let status = lane.status(now);
            let better = match (soonest.map(|s| s.1), status.1) {
                (None, _) | (_, Availability::Now) => true,
                (Some(Availability::At(a)), Availability::At(b)) => b < a,
                (Some(Availability::At(_) | Availability::Never), Availability::OnRelease) => true,
                _ => false,
            };
            if better {
                soonest = Some(status);
            }
            if status.1 == Availability::Now {
                break;
            }
        }
        soonest.unwrap_or(own)
    }

    /// A key's lanes made so far.
    pub(super) fn made_lanes(&self) -> impl Iterator<Item = &Arc<Slot>> {
        self.lanes.iter().filter_map(OnceLock::get)
    }

    /// The token part of [`try_take`](Self::try_take), out of line (only a request with a
    /// token cost comes here): the tokens taken and when the request may go, or `None`
    /// (the quota unit and the probe given back) if they do not fit.
    #[cold]
    #[inline(never)]
    fn take_tokens(
        &self,
        now: &mut LazyNow<'_>,
        tat_after: PoolTime,
        now_at: PoolTime,
        probe: bool,
    ) -> Option<(u64, PoolTime)> {
        // Only a token quota reads the clock: a cost on a lane without one takes nothing.
        if self.tokens.limit().is_none() {
            return Some((0, PoolTime::EPOCH));
        }
        let at = now.get();
        let taken = self
            .token_units(now.cost)
            .and_then(|units| self.tokens.try_take_ahead(units, at, now.ahead));
        if taken.is_none() {
            if let Some(quota) = self.quota {
                quota.refund(&self.tat, tat_after, now_at);
            }
            self.unprobe(probe);
        }
        taken
    }

    /// Tokens a request of `cost` takes from this slot's token quota: `cost`, or while a
    /// shared store is away, the degraded policy's (`None`: none may be taken until it is
    /// back; see [`TokenAsk`](crate::shared::TokenAsk)).
    #[inline]
    pub(super) fn token_units(&self, cost: u64) -> Option<u64> {
        match (&self.shared, self.tokens.limit()) {
            (Some(shared), Some(limit)) => shared.token_units(cost, limit),
            _ => Some(cost),
        }
    }

    /// Gives back a probe won by a caller that could not take the key after all.
    fn unprobe(&self, probe: bool) {
        if probe {
            self.probe.give_back();
        }
    }

    /// Gives back an in-flight slot, and what is left of an unsent request's quota unit.
    /// `counted`: the lease was counted in the state shared with other replicas.
    #[inline]
    pub(super) fn release(
        &self,
        unsent_tat_after: Option<PoolTime>,
        sent: bool,
        refused: bool,
        counted: bool,
    ) {
        if sent {
            self.sent.fetch_sub(1, Ordering::AcqRel);
        }
        if let (Some(tat_after), Some(quota)) = (unsent_tat_after, self.quota) {
            // Only a quota reads the clock.
            quota.refund(&self.tat, tat_after, self.signals.now());
        }
        if refused {
            self.refused_open.fetch_sub(1, Ordering::AcqRel);
        }
        if let Some(shared) = &self.shared {
            shared.released(counted);
        }
        // SeqCst pairs with the waiter's registration (see `wait`).
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        crate::sync::seq_cst_order();
        self.signals.wake_one();
    }

    /// `Bearer <key>` or the bare key, built once and marked sensitive.
    pub(super) fn header(&self, bearer: bool) -> &HeaderValue {
        if bearer {
            self.bearer
                .get_or_init(|| self.spec.key.header_value("Bearer "))
        } else {
            self.bare.get_or_init(|| self.spec.key.header_value(""))
        }
    }
}
