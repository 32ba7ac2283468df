//! Pool time: a moment on a pool's clock, in nanoseconds since the pool was built.
//!
//! A key's rest and its quota state are each one atomic `u64` (see `pool::rest` and
//! `quota`), so the pool keeps time as a plain count of nanoseconds on tokio's monotonic
//! clock, from the pool's epoch. [`PoolTime`] gives that count a type, so a moment is never
//! mistaken for a duration, a count or another clock's reading. The atomics still store the
//! `u64` ([`PoolTime::from_nanos`] and [`PoolTime::as_nanos`] cross that boundary); every
//! signature between them takes a `PoolTime`. It is a `u64` underneath and its operations
//! are inlined: the hot path costs what it did with the bare integer.

use std::time::Duration;

/// A moment on a pool's clock: nanoseconds since the pool's epoch (when it was built).
///
/// About 584 years fit; later moments saturate at the last one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct PoolTime(u64);

impl PoolTime {
    /// The pool's epoch. Also what a quota state holds before its first take.
    pub(crate) const EPOCH: Self = Self(0);

    /// The last moment the clock can hold.
    pub(crate) const MAX: Self = Self(u64::MAX);

    /// The moment an atomic word holds (nanoseconds since the epoch).
    #[inline]
    pub(crate) const fn from_nanos(nanos: u64) -> Self {
        Self(nanos)
    }

    /// The word to store in an atomic: nanoseconds since the epoch.
    #[inline]
    pub(crate) const fn as_nanos(self) -> u64 {
        self.0
    }

    /// The moment `elapsed` after the epoch, saturating at [`PoolTime::MAX`].
    #[inline]
    pub(crate) fn after_epoch(elapsed: Duration) -> Self {
        u64::try_from(elapsed.as_nanos()).map_or(Self::MAX, Self)
    }

    /// How long after the epoch this moment is.
    #[inline]
    pub(crate) fn since_epoch(self) -> Duration {
        Duration::from_nanos(self.0)
    }

    /// `self + wait`, saturating at [`PoolTime::MAX`].
    #[inline]
    pub(crate) fn saturating_add(self, wait: Duration) -> Self {
        let wait = u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX);
        Self(self.0.saturating_add(wait))
    }

    /// How long after `earlier` this moment is; zero if it is not later.
    #[inline]
    pub(crate) fn saturating_duration_since(self, earlier: Self) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_time_saturates_instead_of_wrapping() {
        let second = PoolTime::after_epoch(Duration::from_secs(1));
        assert_eq!(second.as_nanos(), 1_000_000_000);
        assert_eq!(second.since_epoch(), Duration::from_secs(1));
        assert_eq!(PoolTime::after_epoch(Duration::MAX), PoolTime::MAX);
        assert_eq!(second.saturating_add(Duration::MAX), PoolTime::MAX);
        assert_eq!(
            second.saturating_add(Duration::from_millis(500)),
            PoolTime::from_nanos(1_500_000_000)
        );
        assert_eq!(
            second.saturating_duration_since(PoolTime::EPOCH),
            Duration::from_secs(1)
        );
        assert_eq!(
            PoolTime::EPOCH.saturating_duration_since(second),
            Duration::ZERO
        );
        assert!(PoolTime::EPOCH < second && second < PoolTime::MAX);
    }
}
