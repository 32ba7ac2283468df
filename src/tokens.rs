//! Token quotas: tokens per period per (key, bucket), as providers meter tokens per minute.
//!
//! A token quota is a token bucket of `tokens` units that refills evenly over `period`,
//! kept as GCRA in token units on one atomic word (the *theoretical arrival time*, as
//! [`Quota`](crate::Quota) keeps it): a request of `n` tokens moves the state by `n`
//! emission intervals (`n · period / tokens`), and is allowed while the state stays within
//! one period of now. A request larger than the whole window never fits
//! ([`CostTooLarge`](crate::CostTooLarge)).
//!
//! ```text
//!   reserve (estimate + allowed output) ──► sent ──► answer's usage ──► settle
//!        │                                    │                          ├─ used < reserved: give back the difference
//!        └─ dropped unsent: all back          └─ cut short / no usage:   └─ used > reserved: charge the difference
//!                                                charged in full
//! ```
//!
//! # The refund rule
//!
//! A provider that meters tokens with a token bucket (Anthropic documents one; OpenAI's
//! `x-ratelimit-reset-tokens` is the time until it is whole) never took the tokens a
//! request reserved but did not use, so giving them back is safe; but never more than the
//! bucket can hold: a refund pulls the state in at most to *now*. Tokens whose refill time
//! has already passed are not given back a second time (the later requests admitted since
//! were admitted against a bucket that had refilled them: the units they depend on stay
//! counted). Only what an answer *reported* is refunded: an answer without usage, or cut
//! short, keeps its whole reservation.
//!
//! # Learned from headers
//!
//! A lane without a configured quota learns its limit from the answers' headers
//! (`x-ratelimit-limit-tokens`, `anthropic-ratelimit-tokens-limit`) and, configured or not,
//! holds its state no earlier than the provider's own (`…-remaining-tokens` and
//! `…-reset-tokens`): estimates that fell short are corrected by the provider's count.
//!
//! # Shared between replicas
//!
//! With a [state backend](crate::shared), a (key, bucket)'s state is also kept in the
//! store, for every replica: a request takes its tokens here first, then there (one round
//! trip while it waits for its key), and is settled in both; each answer of the store
//! holds the state here no earlier than the shared one (durations relative to now, so
//! that clocks need not agree). While the store is away, each replica accounts alone by
//! the degraded policy's rule (see [`TokenAsk`](crate::shared::TokenAsk)).

use std::time::Duration;

use crate::pool_time::PoolTime;
use crate::sync::{AtomicU64, Ordering};

/// A token quota: at most `tokens` per `period`, refilled evenly (a provider's tokens per
/// minute, TPM).
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use tower_key_rotation::TokenQuota;
///
/// let tpm = TokenQuota::per_minute(30_000);
/// assert_eq!(tpm.tokens(), 30_000);
/// assert_eq!(tpm.period(), Duration::from_secs(60));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenQuota {
    tokens: u64,
    period: Duration,
}

impl TokenQuota {
    /// `tokens` per `period`.
    ///
    /// # Panics
    ///
    /// If `tokens` or `period` is zero.
    pub fn new(tokens: u64, period: Duration) -> Self {
        assert!(
            tokens > 0,
            "a token quota needs at least one token per period"
        );
        assert!(!period.is_zero(), "a token quota needs a non-zero period");
        Self { tokens, period }
    }

    /// `tokens` per minute (a provider's TPM).
    pub fn per_minute(tokens: u64) -> Self {
        Self::new(tokens, Duration::from_secs(60))
    }

    /// Tokens per period: also the largest request that can ever fit.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// The period over which [`tokens`](Self::tokens) refill.
    pub fn period(&self) -> Duration {
        self.period
    }
}

/// The period of token limits learned from headers by default: a minute, as OpenAI and
/// Anthropic meter tokens per minute.
pub(crate) const DEFAULT_WINDOW: Duration = Duration::from_secs(60);

/// The longest span of the state ahead of now, in nanoseconds (as `quota::MAX_SPAN`).
const MAX_SPAN: u64 = u64::MAX / 4;

/// One (key, bucket)'s token quota and its counters.
#[derive(Debug)]
pub(crate) struct TokenCell {
    /// Tokens per period in force (0: no quota, configured or learned yet).
    limit: AtomicU64,
    /// The period, in nanoseconds (that of the configured quota, or of learned limits).
    period: u64,
    /// The limit was configured: headers do not change it.
    configured: bool,
    /// GCRA state, a [`PoolTime`] as nanoseconds.
    tat: AtomicU64,
    /// Tokens reserved by requests sent (estimates plus allowed output).
    pub(crate) reserved: AtomicU64,
    /// Tokens the answers reported using.
    pub(crate) used: AtomicU64,
}

impl TokenCell {
    /// A cell with `quota` in force, or none yet (then learned limits are per `period`).
    pub(crate) fn new(quota: Option<TokenQuota>, period: Duration) -> Self {
        let nanos = |d: Duration| {
            u64::try_from(d.as_nanos())
                .unwrap_or(MAX_SPAN)
                .clamp(1, MAX_SPAN)
        };
        Self {
            limit: AtomicU64::new(quota.map_or(0, |q| q.tokens)),
            period: nanos(quota.map_or(period, |q| q.period)),
            configured: quota.is_some(),
            tat: AtomicU64::new(0),
            reserved: AtomicU64::new(0),
            used: AtomicU64::new(0),
        }
    }

    /// Tokens per period in force, if any.
    #[inline]
    pub(crate) fn limit(&self) -> Option<u64> {
        match self.limit.load(Ordering::Relaxed) {
            0 => None,
            limit => Some(limit),
        }
    }

    /// The period of the limit.
    pub(crate) fn period(&self) -> Duration {
        Duration::from_nanos(self.period)
    }

    /// The time `tokens` take to refill under `limit`: `tokens · period / limit`, rounded
    /// up to the nanosecond (so that a window never holds more than the limit).
    pub(crate) fn span(&self, tokens: u64, limit: u64) -> u64 {
        let nanos = (u128::from(tokens) * u128::from(self.period)).div_ceil(u128::from(limit));
        u64::try_from(nanos).unwrap_or(MAX_SPAN).min(MAX_SPAN)
    }

    /// Takes `tokens` if they fit at `now`: `Some(charged)` (0 without a limit), `None` if
    /// the request must wait.
    #[cfg(test)]
    pub(crate) fn try_take(&self, tokens: u64, now: PoolTime) -> Option<u64> {
        self.try_take_ahead(tokens, now, 0)
            .map(|(charged, _)| charged)
    }

    /// [`try_take`](Self::try_take), or books them `ahead` (nanoseconds) at most: the
    /// tokens are taken now, for a request that goes at the time returned (now if they fit
    /// now). Booking keeps waiters in the order they booked: a request of many tokens is
    /// not overtaken, refill after refill, by smaller ones arriving later.
    #[inline]
    pub(crate) fn try_take_ahead(
        &self,
        tokens: u64,
        now: PoolTime,
        ahead: u64,
    ) -> Option<(u64, PoolTime)> {
        let Some(limit) = self.limit() else {
            return Some((0, now));
        };
        if tokens > limit {
            return None;
        }
        let (now, span) = (now.as_nanos(), self.span(tokens, limit));
        let horizon = now
            .saturating_add(self.period)
            .saturating_add(ahead.min(MAX_SPAN));
        self.tat
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
                let next = t.max(now).saturating_add(span);
                (next <= horizon).then_some(next)
            })
            .ok()
            .map(|t| {
                let next = t.max(now).saturating_add(span);
                let ready = next.saturating_sub(self.period).max(now);
                (tokens, PoolTime::from_nanos(ready))
            })
    }

    /// The state ahead of `now` (zero if it is not ahead): how long until the window is
    /// whole again.
    pub(crate) fn ahead_of(&self, now: PoolTime) -> std::time::Duration {
        let tat = self.tat.load(Ordering::Acquire);
        std::time::Duration::from_nanos(tat.saturating_sub(now.as_nanos()))
    }

    /// Holds the state no earlier than `ahead` past `now`: what the store shared with other
    /// replicas says of the quota (their use included).
    pub(crate) fn hold(&self, ahead: std::time::Duration, now: PoolTime) {
        let ahead = u64::try_from(ahead.as_nanos())
            .unwrap_or(MAX_SPAN)
            .min(MAX_SPAN);
        self.tat
            .fetch_max(now.as_nanos().saturating_add(ahead), Ordering::AcqRel);
    }

    /// When `tokens` fit next: `None` if they never can (more than the whole window),
    /// [`PoolTime::EPOCH`] without a limit.
    pub(crate) fn available_at(&self, tokens: u64) -> Option<PoolTime> {
        let Some(limit) = self.limit() else {
            return Some(PoolTime::EPOCH);
        };
        if tokens > limit {
            return None;
        }
        let tat = self.tat.load(Ordering::Acquire);
        Some(PoolTime::from_nanos(
            tat.saturating_add(self.span(tokens, limit))
                .saturating_sub(self.period),
        ))
    }

    /// Does a request of `tokens` fit the whole window (or is there no limit)?
    pub(crate) fn fits(&self, tokens: u64) -> bool {
        self.limit().is_none_or(|limit| tokens <= limit)
    }

    /// Settles a reservation of `charged` tokens whose answer reported `used`: the
    /// difference is charged, or given back by the refund rule (module docs). `true` if
    /// tokens came back (waiters may go sooner).
    pub(crate) fn settle(&self, charged: u64, used: u64, now: PoolTime) -> bool {
        let Some(limit) = self.limit() else {
            return false;
        };
        let now = now.as_nanos();
        if used > charged {
            let span = self.span(used - charged, limit);
            let _ = self
                .tat
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
                    Some(
                        t.max(now)
                            .saturating_add(span)
                            .min(now.saturating_add(MAX_SPAN)),
                    )
                });
            return false;
        }
        self.give_back(charged - used, limit, now)
    }

    /// Gives back `tokens` of a reservation that never reached the provider (or that it
    /// reported unused), pulling the state in at most to now.
    pub(crate) fn refund(&self, tokens: u64, now: PoolTime) -> bool {
        match self.limit() {
            Some(limit) => self.give_back(tokens, limit, now.as_nanos()),
            None => false,
        }
    }

    fn give_back(&self, tokens: u64, limit: u64, now: u64) -> bool {
        if tokens == 0 {
            return false;
        }
        let span = self.span(tokens, limit);
        self.tat
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
                (t > now).then(|| t.saturating_sub(span).max(now))
            })
            .is_ok()
    }

    /// What an answer's headers say of the provider's count: learns the limit if none was
    /// configured, and holds the state no earlier than the provider's (`remaining` of
    /// `limit` tokens, whole again after `reset`).
    pub(crate) fn observe(&self, seen: TokenHeaders, now: PoolTime) {
        if !self.configured && seen.limit > 0 {
            self.limit.store(seen.limit, Ordering::Relaxed);
        }
        let Some(limit) = self.limit() else { return };
        let deficit = seen.limit.saturating_sub(seen.remaining);
        let behind = match seen.reset {
            Some(reset) if deficit > 0 => u64::try_from(reset.as_nanos()).unwrap_or(MAX_SPAN),
            _ => self.span(deficit.min(limit), limit),
        }
        .min(self.period);
        // The provider whole again at `now + behind`: the state is at least there (a
        // state `behind` ahead of now leaves the same room as the provider's bucket).
        self.tat
            .fetch_max(now.as_nanos().saturating_add(behind), Ordering::AcqRel);
    }

    /// How long until a request of `tokens` fits, from `now` (zero if it does now).
    pub(crate) fn wait(&self, tokens: u64, now: PoolTime) -> Option<Duration> {
        self.available_at(tokens)
            .map(|at| at.saturating_duration_since(now))
    }
}

/// A provider's token count, as an answer's headers report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TokenHeaders {
    /// Tokens per window.
    pub(crate) limit: u64,
    /// Tokens left now.
    pub(crate) remaining: u64,
    /// Time until the window is whole again, if said.
    pub(crate) reset: Option<Duration>,
}

impl TokenHeaders {
    /// The token count in `headers`: OpenAI's `x-ratelimit-{limit,remaining,reset}-tokens`,
    /// else Anthropic's `anthropic-ratelimit-tokens-{limit,remaining,reset}` (the reset an
    /// RFC 3339 time, read against `now`). `None` without a limit and a remainder.
    pub(crate) fn read(headers: &http::HeaderMap, now: std::time::SystemTime) -> Option<Self> {
        use crate::classify::limits::{parse_go_duration, parse_rfc3339};
        let number =
            |name: &str| -> Option<u64> { headers.get(name)?.to_str().ok()?.trim().parse().ok() };
        if let (Some(limit), Some(remaining)) = (
            number("x-ratelimit-limit-tokens"),
            number("x-ratelimit-remaining-tokens"),
        ) {
            let reset = headers
                .get("x-ratelimit-reset-tokens")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| parse_go_duration(v.trim()));
            return Some(Self {
                limit,
                remaining,
                reset,
            });
        }
        let limit = number("anthropic-ratelimit-tokens-limit")?;
        let remaining = number("anthropic-ratelimit-tokens-remaining")?;
        let reset = headers
            .get("anthropic-ratelimit-tokens-reset")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_rfc3339(v.trim()))
            .map(|at| at.duration_since(now).unwrap_or_default());
        Some(Self {
            limit,
            remaining,
            reset,
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const MS: u64 = 1_000_000;

    fn ms(ms: u64) -> PoolTime {
        PoolTime::from_nanos(ms * MS)
    }

    /// 1,000 tokens a second.
    fn cell() -> TokenCell {
        TokenCell::new(
            Some(TokenQuota::new(1_000, Duration::from_secs(1))),
            Duration::from_secs(60),
        )
    }

    #[test]
    fn a_request_takes_as_many_units_as_it_has_tokens() {
        let cell = cell();
        assert_eq!(cell.try_take(600, ms(0)), Some(600));
        assert_eq!(cell.try_take(400, ms(0)), Some(400));
        assert_eq!(cell.try_take(1, ms(0)), None, "the window is spent");
        // 300 tokens refill in 300 ms.
        assert_eq!(cell.available_at(300), Some(ms(300)));
        assert_eq!(cell.try_take(300, ms(299)), None);
        assert_eq!(cell.try_take(300, ms(300)), Some(300));
    }

    #[test]
    fn a_request_larger_than_the_window_never_fits() {
        let cell = cell();
        assert!(!cell.fits(1_001));
        assert_eq!(cell.available_at(1_001), None);
        assert_eq!(cell.try_take(1_001, ms(10_000)), None);
    }

    #[test]
    fn no_limit_takes_nothing() {
        let cell = TokenCell::new(None, Duration::from_secs(60));
        assert_eq!(cell.try_take(1_000_000, ms(0)), Some(0));
        assert!(!cell.settle(0, 5, ms(0)));
    }

    #[test]
    fn settling_gives_back_what_was_not_used_and_charges_what_was_over() {
        let cell = cell();
        cell.try_take(1_000, ms(0)).unwrap();
        assert!(cell.settle(1_000, 400, ms(0)));
        assert_eq!(cell.available_at(600), Some(ms(0)));
        cell.try_take(600, ms(0)).unwrap();
        // 200 more than reserved: charged, the window is in debt.
        assert!(!cell.settle(600, 800, ms(0)));
        assert_eq!(cell.available_at(1), Some(ms(201)));
    }

    #[test]
    fn a_refund_never_pulls_the_state_before_now() {
        let cell = cell();
        cell.try_take(1_000, ms(0)).unwrap(); // whole again at 1 s
        // At 900 ms, 100 tokens are still owed: a refund of 1,000 brings it to now only.
        assert!(cell.settle(1_000, 0, ms(900)));
        assert_eq!(cell.available_at(1_000), Some(ms(900)));
        assert_eq!(cell.try_take(1_001, ms(900)), None);
    }

    #[test]
    fn headers_teach_the_limit_and_hold_the_state_at_the_providers() {
        let cell = TokenCell::new(None, Duration::from_secs(1));
        assert_eq!(cell.limit(), None);
        cell.observe(
            TokenHeaders {
                limit: 1_000,
                remaining: 250,
                reset: Some(Duration::from_millis(750)),
            },
            ms(0),
        );
        assert_eq!(cell.limit(), Some(1_000));
        assert_eq!(cell.try_take(251, ms(0)), None);
        assert_eq!(cell.try_take(250, ms(0)), Some(250));
    }

    #[test]
    fn openai_and_anthropic_headers_read() {
        let mut headers = http::HeaderMap::new();
        headers.insert("x-ratelimit-limit-tokens", "30000".parse().unwrap());
        headers.insert("x-ratelimit-remaining-tokens", "29000".parse().unwrap());
        headers.insert("x-ratelimit-reset-tokens", "2s".parse().unwrap());
        let now = std::time::SystemTime::UNIX_EPOCH;
        assert_eq!(
            TokenHeaders::read(&headers, now),
            Some(TokenHeaders {
                limit: 30_000,
                remaining: 29_000,
                reset: Some(Duration::from_secs(2))
            })
        );
        let mut headers = http::HeaderMap::new();
        headers.insert("anthropic-ratelimit-tokens-limit", "80000".parse().unwrap());
        headers.insert(
            "anthropic-ratelimit-tokens-remaining",
            "79000".parse().unwrap(),
        );
        headers.insert(
            "anthropic-ratelimit-tokens-reset",
            "1970-01-01T00:00:03Z".parse().unwrap(),
        );
        let read = TokenHeaders::read(&headers, now).unwrap();
        assert_eq!(read.reset, Some(Duration::from_secs(3)));
    }

    proptest! {
        /// Takes (reserved), settlements (with any usage) and time passing in any order:
        /// the tokens charged for requests admitted in any window of one period, net of
        /// what was given back, never exceed the limit plus what answers overran their
        /// reservations by (a token bucket's bound).
        #[test]
        fn a_bucket_never_admits_more_than_it_refills(
            ops in proptest::collection::vec((0..3u8, 1..1_500u64), 1..100),
        ) {
            let cell = cell();
            let mut now = 0u64;
            // A token bucket that refills 1 token a ms, capacity 1,000: the level may never
            // go below what overruns took.
            let mut level: i128 = 1_000;
            let mut last = 0u64;
            let mut held: Vec<u64> = Vec::new();
            for (op, n) in ops {
                level = (level + i128::from(now - last)).min(1_000);
                last = now;
                match op {
                    0 => now += n,
                    1 => if let Some(charged) = cell.try_take(n, PoolTime::from_nanos(now * MS)) {
                        level -= i128::from(charged);
                        prop_assert!(level >= 0, "admitted past the bucket: {level}");
                        held.push(charged);
                    },
                    _ => if let Some(charged) = held.pop() {
                        let used = n.min(charged);
                        cell.settle(charged, used, PoolTime::from_nanos(now * MS));
                        level = (level + i128::from(charged - used)).min(1_000);
                    },
                }
            }
        }
    }
}
