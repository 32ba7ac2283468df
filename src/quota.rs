//! Per-key request quotas, enforced before sending: a generic cell rate algorithm (GCRA)
//! on one atomic word per key.
//!
//! GCRA keeps a *theoretical arrival time* (TAT): the time at which the key would be
//! idle again if requests were spaced exactly one emission interval `T = period /
//! requests` (rounded up) apart. A request is allowed when `TAT ≤ now + τ` (τ, the
//! tolerance, allows a burst of `burst` requests), and moves `TAT` to `max(TAT, now) + T`.
//! One `u64` holds the whole state, so checking and taking is a compare-and-swap, like the
//! rest of the pool.
//!
//! We do not use `governor` (the well-kept GCRA crate) because the pool needs three things
//! it does not offer together: taking quota in the same step as the in-flight slot,
//! *refunding* it when a reservation is dropped unsent, and knowing when the next unit
//! frees, on tokio's pausable clock, to arm the waiters' timer.

use crate::pool_time::PoolTime;
use crate::sync::{AtomicU64, Ordering};
use std::time::Duration;

/// A request quota: at most `requests` per `period`, spaced evenly, with an optional burst.
///
/// With the default burst of 1, requests are spaced `period / requests` apart, so no
/// window of length `period` ever holds more than `requests`: what a provider's sliding
/// "requests per minute" limit needs. A larger burst lets that many go at once after a
/// quiet spell, at the risk of a window holding up to `burst - 1` more.
///
/// The interval is rounded up to the nanosecond, so that promise holds exactly. An interval
/// or burst spanning more than about 146 years acts as if it spanned that long.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use tower_key_rotation::Quota;
///
/// let rpm = Quota::per_minute(60); // one request per second
/// assert_eq!(rpm.interval(), Duration::from_secs(1));
/// let bursty = Quota::new(10, Duration::from_secs(1)).burst(5);
/// # let _ = bursty;
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    requests: u32,
    period: Duration,
    burst: u32,
}

impl Quota {
    /// `requests` per `period`.
    ///
    /// # Panics
    ///
    /// If `requests` is zero or `period` is zero: such a quota would never let a request
    /// through, or always.
    pub fn new(requests: u32, period: Duration) -> Self {
        assert!(
            requests > 0,
            "a quota needs at least one request per period"
        );
        assert!(!period.is_zero(), "a quota needs a non-zero period");
        Self {
            requests,
            period,
            burst: 1,
        }
    }

    /// `requests` per second.
    pub fn per_second(requests: u32) -> Self {
        Self::new(requests, Duration::from_secs(1))
    }

    /// `requests` per minute (a provider's RPM).
    pub fn per_minute(requests: u32) -> Self {
        Self::new(requests, Duration::from_secs(60))
    }

    /// How many requests may go back to back after a quiet spell (default 1, at least 1).
    pub fn burst(mut self, burst: u32) -> Self {
        self.burst = burst.max(1);
        self
    }

    /// The spacing between requests: `period / requests`, rounded up to the nanosecond.
    ///
    /// Rounded up, because `requests` intervals must span the whole period: rounded down,
    /// 3 per second would let a fourth request out a nanosecond before the second is over.
    pub fn interval(&self) -> Duration {
        let nanos = self.period.as_nanos().div_ceil(u128::from(self.requests));
        // At most `period`, so the seconds fit a `u64` as they did in `period`.
        Duration::new(
            u64::try_from(nanos / 1_000_000_000).unwrap_or(u64::MAX),
            (nanos % 1_000_000_000) as u32,
        )
    }

    pub(crate) fn gcra(&self) -> Gcra {
        let interval = u64::try_from(self.interval().as_nanos())
            .unwrap_or(u64::MAX)
            .clamp(1, MAX_SPAN);
        Gcra {
            interval,
            tolerance: interval
                .saturating_mul(u64::from(self.burst - 1))
                .min(MAX_SPAN),
        }
    }
}

/// The longest interval, and the longest tolerance, in nanoseconds (about 146 years).
///
/// A quota state stays below `now + tolerance + interval` (≤ `now + u64::MAX / 2`), so the
/// arithmetic below neither wraps nor saturates on any clock the pool will see; saturating
/// (as `u64::MAX` would be, for `Duration::MAX`) would instead let every request through.
/// A quota whose interval or burst spans longer acts as if it spanned this long.
const MAX_SPAN: u64 = u64::MAX / 4;

/// A [`Quota`] in nanoseconds of the pool's clock.
///
/// Its state (`tat`, the theoretical arrival time) is a [`PoolTime`] stored in an
/// `AtomicU64`; the arithmetic below is on that word, in nanoseconds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Gcra {
    interval: u64,
    tolerance: u64,
}

impl Gcra {
    /// The spacing between requests.
    pub(crate) fn interval(&self) -> Duration {
        Duration::from_nanos(self.interval)
    }

    /// How far ahead of the spacing a burst may go.
    pub(crate) fn tolerance(&self) -> Duration {
        Duration::from_nanos(self.tolerance)
    }

    /// Holds the quota back: no unit before `at`, as another replica's use of a shared
    /// quota requires.
    pub(crate) fn hold_until(&self, tat: &AtomicU64, at: PoolTime) {
        tat.fetch_max(
            at.as_nanos().saturating_add(self.tolerance),
            Ordering::AcqRel,
        );
    }

    /// When the next request may go, given the state `tat`.
    pub(crate) fn available_at(&self, tat: &AtomicU64) -> PoolTime {
        PoolTime::from_nanos(tat.load(Ordering::Acquire).saturating_sub(self.tolerance))
    }

    /// Takes one unit if allowed at `now`; returns the state the take left (the end of
    /// the unit taken), which [`Gcra::refund`] needs.
    #[cfg(test)]
    pub(crate) fn try_take(&self, tat: &AtomicU64, now: PoolTime) -> Option<PoolTime> {
        self.try_take_units(tat, now, 1)
    }

    /// [`Gcra::try_take`] of `units` intervals at once (a replica's share of a quota split
    /// between replicas: it spaces its requests `units` intervals apart).
    #[inline]
    pub(crate) fn try_take_units(
        &self,
        tat: &AtomicU64,
        now: PoolTime,
        units: u64,
    ) -> Option<PoolTime> {
        let now = now.as_nanos();
        let step = self.interval.saturating_mul(units).min(MAX_SPAN);
        let next = |t: u64| t.max(now).saturating_add(step);
        tat.fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
            (t <= now.saturating_add(self.tolerance)).then(|| next(t))
        })
        .ok()
        .map(|t| PoolTime::from_nanos(next(t)))
    }

    /// Gives back what is still unused, at `now`, of the unit a take that left the state
    /// `tat_after` took, for a request that was never sent.
    ///
    /// That unit spans `[tat_after - T, tat_after)`; only its part after `now` can still go
    /// to another request. Giving back the whole unit would hand out quota already spent:
    /// a reservation held unsent through its unit, then dropped after others were sent,
    /// would let one request more into their window.
    ///
    /// And only while it is the last unit taken (the state is still `tat_after`): once
    /// others were taken after it, their requests were admitted against a schedule that
    /// counted it, and pulling the schedule in under them would let a later request
    /// crowd them (found by `refunds_never_let_sent_requests_break_the_bound`). The unit
    /// then stays spent: a quota may go unused, never over.
    pub(crate) fn refund(&self, tat: &AtomicU64, tat_after: PoolTime, now: PoolTime) {
        let (tat_after, now) = (tat_after.as_nanos(), now.as_nanos());
        let unused = tat_after.saturating_sub(now).min(self.interval);
        if unused == 0 {
            return;
        }
        let _ = tat.compare_exchange(
            tat_after,
            tat_after - unused,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const MS: u64 = 1_000_000;

    /// `ms` milliseconds after the epoch.
    fn ms(ms: u64) -> PoolTime {
        PoolTime::from_nanos(ms * MS)
    }

    #[test]
    fn spaces_requests_one_interval_apart() {
        let gcra = Quota::per_second(10).gcra(); // 100 ms apart
        let tat = AtomicU64::new(0);
        assert!(gcra.try_take(&tat, PoolTime::EPOCH).is_some());
        assert!(gcra.try_take(&tat, ms(50)).is_none());
        assert_eq!(gcra.available_at(&tat), ms(100));
        assert!(gcra.try_take(&tat, ms(100)).is_some());
        assert!(gcra.try_take(&tat, ms(199)).is_none());
    }

    #[test]
    fn any_window_holds_at_most_the_quota_with_burst_one() {
        let gcra = Quota::new(5, Duration::from_millis(1000)).gcra();
        let tat = AtomicU64::new(0);
        let mut sent = Vec::new();
        for now in (0..10_000).map(ms) {
            if gcra.try_take(&tat, now).is_some() {
                sent.push(now.as_nanos());
            }
        }
        for (i, &start) in sent.iter().enumerate() {
            let in_window = sent[i..]
                .iter()
                .take_while(|&&t| t < start + 1000 * MS)
                .count();
            assert!(in_window <= 5);
        }
        assert_eq!(sent.len(), 50);
    }

    /// Sends as early as `gcra` allows, `count` times from a fresh state; the send times.
    fn greedy(gcra: Gcra, count: usize) -> Vec<u64> {
        let tat = AtomicU64::new(0);
        (0..count)
            .map(|_| {
                let now = gcra.available_at(&tat);
                assert!(gcra.try_take(&tat, now).is_some());
                now.as_nanos()
            })
            .collect()
    }

    #[test]
    fn three_per_second_never_let_a_fourth_out_within_the_second() {
        let quota = Quota::per_second(3);
        let sent = greedy(quota.gcra(), 4);
        assert!(sent[3] - sent[0] >= 1_000 * MS, "{sent:?}");
        assert_eq!(quota.interval(), Duration::from_nanos(333_333_334));
    }

    #[test]
    fn an_endless_period_with_a_burst_lets_the_burst_go_then_nothing() {
        for burst in [1, 2, 3, u32::MAX] {
            let gcra = Quota::new(1, Duration::MAX).burst(burst).gcra();
            let tat = AtomicU64::new(0);
            let at_once = (0..4)
                .filter(|_| gcra.try_take(&tat, PoolTime::EPOCH).is_some())
                .count();
            // The burst in full where its span fits the clock (see `MAX_SPAN`), never more.
            assert!((1..=burst as usize).contains(&at_once), "burst {burst}");
            if burst <= 2 {
                assert_eq!(at_once, burst as usize);
            }
            // A century on, still nothing.
            let century = ms(100 * 365 * 24 * 3600 * 1_000);
            assert!(gcra.try_take(&tat, century).is_none(), "burst {burst}");
        }
    }

    #[test]
    fn burst_and_refund() {
        let gcra = Quota::per_second(10).burst(3).gcra();
        let tat = AtomicU64::new(0);
        let taken: Vec<PoolTime> = (0..3)
            .map(|_| gcra.try_take(&tat, PoolTime::EPOCH).unwrap())
            .collect();
        assert_eq!(taken, [ms(100), ms(200), ms(300)]);
        assert!(gcra.try_take(&tat, PoolTime::EPOCH).is_none());
        gcra.refund(&tat, taken[2], PoolTime::EPOCH);
        assert!(gcra.try_take(&tat, PoolTime::EPOCH).is_some());
    }

    /// Any period (up to `Duration::MAX`), a handful of requests per period, any burst.
    fn quotas() -> impl Strategy<Value = Quota> {
        let secs = prop_oneof![Just(0), 0..100u64, any::<u64>(), Just(u64::MAX)];
        let nanos = prop_oneof![Just(0), 0..1_000_000_000u32, Just(999_999_999)];
        let burst = prop_oneof![Just(1), 1..5u32, any::<u32>(), Just(u32::MAX)];
        (1..5u32, secs, nanos, burst).prop_filter_map("a zero period", |(r, s, n, b)| {
            let period = Duration::new(s, n);
            (!period.is_zero()).then(|| Quota::new(r, period).burst(b))
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]

        /// Takes, sends and unsent drops in any order: the arithmetic never overflows, and
        /// the requests sent keep GCRA's bound, `t_j - t_i ≥ (j - i)·T - τ` (with a burst of
        /// 1: no window of length `period` holds more than `requests`), whatever the
        /// refunds gave back.
        #[test]
        fn refunds_never_let_sent_requests_break_the_bound(
            quota in quotas(),
            ops in proptest::collection::vec((0..4u8, any::<u64>()), 1..80),
        ) {
            let gcra = quota.gcra();
            let tat = AtomicU64::new(0);
            let (mut now, mut held, mut sent) = (0u64, Vec::new(), Vec::new());
            for (op, roll) in ops {
                let at = PoolTime::from_nanos(now);
                match op {
                    // Time passes: up to two intervals, on a clock of at most `MAX_SPAN`.
                    0 => now = (now + roll % (2 * gcra.interval + 1)).min(MAX_SPAN),
                    // A request sent at once.
                    1 => sent.extend(gcra.try_take(&tat, at).map(|_| now)),
                    // A reservation held for now.
                    2 => held.extend(gcra.try_take(&tat, at).map(|after| (now, after))),
                    // A held reservation sent, or dropped unsent.
                    _ if !held.is_empty() => {
                        let (taken_at, after) = held.swap_remove(roll as usize % held.len());
                        if roll % 2 == 0 {
                            sent.push(taken_at);
                        } else {
                            gcra.refund(&tat, after, at);
                        }
                    }
                    _ => {}
                }
            }
            sent.sort_unstable();
            let (interval, tolerance) = (i128::from(gcra.interval), i128::from(gcra.tolerance));
            for (i, &first) in sent.iter().enumerate() {
                for (k, &later) in sent[i + 1..].iter().enumerate() {
                    let apart = i128::from(later) - i128::from(first);
                    let units = i128::try_from(k).unwrap() + 1;
                    prop_assert!(
                        apart >= units * interval - tolerance,
                        "{sent:?} with {gcra:?}"
                    );
                }
            }
            if quota.burst == 1 && gcra.interval < MAX_SPAN {
                let period = u64::try_from(quota.period.as_nanos()).unwrap();
                for window in sent.windows(quota.requests as usize + 1) {
                    prop_assert!(window[quota.requests as usize] - window[0] >= period);
                }
            }
        }
    }

    #[test]
    fn a_refund_gives_back_only_the_unused_part_of_its_unit() {
        // 100 ms apart: one unit taken at 0 fills [0, 100 ms).
        let gcra = Quota::per_second(10).gcra();
        let tat = AtomicU64::new(0);
        let unit = gcra.try_take(&tat, PoolTime::EPOCH).unwrap();
        // Dropped unsent at 40 ms: 60 ms come back, not 100.
        gcra.refund(&tat, unit, ms(40));
        assert_eq!(gcra.available_at(&tat), ms(40));
        gcra.try_take(&tat, ms(40)).unwrap();
        assert_eq!(gcra.available_at(&tat), ms(140));
    }

    #[test]
    fn a_refund_under_later_units_gives_nothing_back() {
        // A burst of 3: three at 0 fill [0, 300 ms). The first is dropped unsent at 40 ms,
        // but two more were taken after it: they were admitted against a schedule that
        // counted it, so it stays spent.
        let gcra = Quota::per_second(10).burst(3).gcra();
        let tat = AtomicU64::new(0);
        let first = gcra.try_take(&tat, PoolTime::EPOCH).unwrap();
        for _ in 0..2 {
            gcra.try_take(&tat, PoolTime::EPOCH).unwrap();
        }
        gcra.refund(&tat, first, ms(40));
        assert_eq!(gcra.available_at(&tat), ms(100));
    }

    #[test]
    fn a_refund_after_its_unit_has_passed_gives_nothing_back() {
        // One a minute: a unit taken at 0, another at 60 s; the first, dropped at 70 s,
        // has nothing left to give back.
        let gcra = Quota::per_minute(1).gcra();
        let second = |s: u64| ms(s * 1_000);
        let tat = AtomicU64::new(0);
        let stale = gcra.try_take(&tat, PoolTime::EPOCH).unwrap();
        gcra.try_take(&tat, second(60)).unwrap();
        gcra.refund(&tat, stale, second(70));
        assert!(gcra.try_take(&tat, second(70)).is_none());
        assert_eq!(gcra.available_at(&tat), second(120));
    }
}
