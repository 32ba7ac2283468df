//! Per-key request quotas, enforced before sending: a generic cell rate algorithm (GCRA)
//! on one atomic word per key.
//!
//! GCRA keeps a *theoretical arrival time* (TAT): the time at which the key would be
//! idle again if requests were spaced exactly one emission interval `T = period /
//! requests` apart. A request is allowed when `TAT ≤ now + τ` (τ, the tolerance, allows a
//! burst of `burst` requests), and moves `TAT` to `max(TAT, now) + T`. One `u64` holds the
//! whole state, so checking and taking is a compare-and-swap, like the rest of the pool.
//!
//! We do not use `governor` (the well-kept GCRA crate) because the pool needs three things
//! it does not offer together: taking quota in the same step as the in-flight slot,
//! *refunding* it when a reservation is dropped unsent, and knowing when the next unit
//! frees, on tokio's pausable clock, to arm the waiters' timer.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A request quota: at most `requests` per `period`, spaced evenly, with an optional burst.
///
/// With the default burst of 1, requests are spaced `period / requests` apart, so no
/// window of length `period` ever holds more than `requests`: what a provider's sliding
/// "requests per minute" limit needs. A larger burst lets that many go at once after a
/// quiet spell, at the risk of a window holding up to `burst - 1` more.
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

    /// The spacing between requests: `period / requests`.
    pub fn interval(&self) -> Duration {
        self.period / self.requests
    }

    pub(crate) fn gcra(&self) -> Gcra {
        let interval = u64::try_from(self.interval().as_nanos())
            .unwrap_or(u64::MAX)
            .max(1);
        Gcra {
            interval,
            tolerance: interval.saturating_mul(u64::from(self.burst - 1)),
        }
    }
}

/// A [`Quota`] in nanoseconds of the pool's clock.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Gcra {
    interval: u64,
    tolerance: u64,
}

impl Gcra {
    /// When (pool nanoseconds) the next request may go, given the state `tat`.
    pub(crate) fn available_at(&self, tat: &AtomicU64) -> u64 {
        tat.load(Ordering::Acquire).saturating_sub(self.tolerance)
    }

    /// Takes one unit if allowed at `now`.
    pub(crate) fn try_take(&self, tat: &AtomicU64, now: u64) -> bool {
        tat.fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
            (t <= now.saturating_add(self.tolerance)).then(|| t.max(now) + self.interval)
        })
        .is_ok()
    }

    /// Gives back a unit taken for a request that was never sent.
    pub(crate) fn refund(&self, tat: &AtomicU64) {
        let _ = tat.fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
            Some(t.saturating_sub(self.interval))
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn spaces_requests_one_interval_apart() {
        let gcra = Quota::per_second(10).gcra(); // 100 ms apart
        let tat = AtomicU64::new(0);
        assert!(gcra.try_take(&tat, 0));
        assert!(!gcra.try_take(&tat, 50 * MS));
        assert_eq!(gcra.available_at(&tat), 100 * MS);
        assert!(gcra.try_take(&tat, 100 * MS));
        assert!(!gcra.try_take(&tat, 199 * MS));
    }

    #[test]
    fn any_window_holds_at_most_the_quota_with_burst_one() {
        let gcra = Quota::new(5, Duration::from_millis(1000)).gcra();
        let tat = AtomicU64::new(0);
        let mut sent = Vec::new();
        for now in (0..10_000).map(|ms| ms * MS) {
            if gcra.try_take(&tat, now) {
                sent.push(now);
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

    #[test]
    fn burst_and_refund() {
        let gcra = Quota::per_second(10).burst(3).gcra();
        let tat = AtomicU64::new(0);
        for _ in 0..3 {
            assert!(gcra.try_take(&tat, 0));
        }
        assert!(!gcra.try_take(&tat, 0));
        gcra.refund(&tat);
        assert!(gcra.try_take(&tat, 0));
    }
}
