//! How long a refused key rests.
//!
//! Everything here is pure: [`retry_after`] parses `Retry-After` / `retry-after-ms` against
//! a wall clock passed in, and [`Backoff`] turns a consecutive-429 level into a wait. The
//! pool applies the result (see `pool`).

use std::time::{Duration, SystemTime};

use http::HeaderMap;

/// Reads the wait a response asks for: `retry-after-ms` (milliseconds, as OpenAI sends it)
/// first, then `Retry-After` as delta-seconds or an HTTP-date.
///
/// A date in the past counts as zero; huge values saturate. Unparseable values are ignored
/// (as if absent), so the caller falls back to its own backoff. `now` is the wall clock the
/// date is measured against.
///
/// # Examples
///
/// ```
/// use http::HeaderMap;
/// use std::time::{Duration, SystemTime};
/// use tower_key_rotation::retry_after;
///
/// let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480);
/// let mut headers = HeaderMap::new();
/// headers.insert("retry-after", "Wed, 21 Oct 2015 07:28:10 GMT".parse().unwrap());
/// assert_eq!(retry_after(&headers, now), Some(Duration::from_secs(10)));
///
/// headers.insert("retry-after-ms", "1500".parse().unwrap());
/// assert_eq!(retry_after(&headers, now), Some(Duration::from_millis(1500)));
/// ```
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    if let Some(ms) = headers
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_millis)
    {
        return Some(ms);
    }
    let value = headers.get(http::header::RETRY_AFTER)?.to_str().ok()?;
    parse_retry_after(value, now)
}

/// Parses one `Retry-After` value: delta-seconds or an HTTP-date (past dates give zero).
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Saturate rather than reject: a huge value still means "a long time".
        let secs = value.parse::<u64>().unwrap_or(u64::MAX);
        return Some(Duration::from_secs(secs));
    }
    let date = httpdate::parse_http_date(value).ok()?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
}

fn parse_millis(value: &str) -> Option<Duration> {
    let value = value.trim();
    let ms: f64 = value.parse().ok()?;
    if !ms.is_finite() || ms < 0.0 {
        return None;
    }
    // Durations past ~584 million years saturate.
    Some(Duration::try_from_secs_f64(ms / 1000.0).unwrap_or(Duration::MAX))
}

/// How a rate-limited key rests: exponential backoff with full jitter when the provider
/// gives no `Retry-After`, and a cap on any wait.
///
/// The `n`-th consecutive 429 (n ≥ 1) without `Retry-After` rests the key for a random time
/// in `[0, min(max, base · 2^(n-1))]` (full jitter: concurrent clients do not retry in
/// lock-step). An explicit `Retry-After` replaces that computed wait, capped at
/// `max_retry_after`.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use tower_key_rotation::Backoff;
///
/// let backoff = Backoff::default()
///     .base(Duration::from_millis(500))
///     .max(Duration::from_secs(30))
///     .jitter(false);
/// assert_eq!(backoff.wait(1, None), Duration::from_millis(500));
/// assert_eq!(backoff.wait(3, None), Duration::from_secs(2));
/// assert_eq!(backoff.wait(20, None), Duration::from_secs(30));
/// // The provider's own wait wins, capped at max_retry_after (5 minutes by default).
/// assert_eq!(backoff.wait(3, Some(Duration::from_secs(7))), Duration::from_secs(7));
/// assert_eq!(backoff.wait(1, Some(Duration::MAX)), Duration::from_secs(300));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    max_retry_after: Duration,
    jitter: bool,
    pub(crate) quota_wait: Duration,
    pub(crate) max_quota_wait: Duration,
}

impl Default for Backoff {
    /// Base 1 s, max 60 s, `Retry-After` capped at 5 minutes, full jitter; a spent quota
    /// rests the key 1 hour when the reset is unknown, at most 24 hours when known.
    fn default() -> Self {
        Self {
            base: Duration::from_secs(1),
            max: Duration::from_secs(60),
            max_retry_after: Duration::from_secs(300),
            jitter: true,
            quota_wait: Duration::from_secs(3600),
            max_quota_wait: Duration::from_secs(24 * 3600),
        }
    }
}

impl Backoff {
    /// The wait after the first 429 without `Retry-After` (before jitter).
    pub fn base(mut self, base: Duration) -> Self {
        self.base = base;
        self
    }

    /// The longest computed wait.
    pub fn max(mut self, max: Duration) -> Self {
        self.max = max;
        self
    }

    /// The longest wait a `Retry-After` may impose; also caps a rest until a window's reset
    /// read from rate-limit headers ([`Outcome::LimitReached`](crate::Outcome)).
    pub fn max_retry_after(mut self, max: Duration) -> Self {
        self.max_retry_after = max;
        self
    }

    /// How long a key whose quota is spent ([`Outcome::QuotaExhausted`](crate::Outcome))
    /// rests when the provider did not say when the quota resets (default 1 hour). Then
    /// one probe request decides whether it is back.
    pub fn quota_wait(mut self, wait: Duration) -> Self {
        self.quota_wait = wait;
        self
    }

    /// The longest rest for a spent quota whose reset the provider did state (default 24
    /// hours).
    pub fn max_quota_wait(mut self, max: Duration) -> Self {
        self.max_quota_wait = max;
        self
    }

    /// Full jitter on (default) or off (exact doubling; useful in tests).
    pub fn jitter(mut self, on: bool) -> Self {
        self.jitter = on;
        self
    }

    /// The wait for the `level`-th consecutive 429 (`level` ≥ 1), given the provider's
    /// `Retry-After`, if any.
    pub fn wait(&self, level: u32, retry_after: Option<Duration>) -> Duration {
        if let Some(wait) = retry_after {
            return self.cap(wait);
        }
        let ceiling = self.ceiling(level);
        if self.jitter {
            let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
            Duration::from_nanos(fastrand::u64(0..=nanos))
        } else {
            ceiling
        }
    }

    /// A wait the provider asked for (`Retry-After`, or a window's reset read from
    /// rate-limit headers), capped at `max_retry_after`: one cap for every rest for a limit.
    pub(crate) fn cap(&self, wait: Duration) -> Duration {
        wait.min(self.max_retry_after)
    }

    /// `min(max, base · 2^(level-1))`: the upper bound of the jittered wait.
    pub fn ceiling(&self, level: u32) -> Duration {
        let doublings = level.saturating_sub(1).min(63);
        let factor = 1u64 << doublings;
        let factor = u32::try_from(factor).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn delta_seconds_parse_and_saturate() {
        assert_eq!(parse_retry_after("2", at(0)), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after(" 0 ", at(0)), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("99999999999999999999999", at(0)),
            Some(Duration::from_secs(u64::MAX))
        );
    }

    #[test]
    fn garbage_and_negative_are_ignored() {
        for bad in [
            "",
            "-1",
            "soon",
            "1.5",
            "2 s",
            "Wed, 99 Oct 2015 07:28:00 GMT",
        ] {
            assert_eq!(parse_retry_after(bad, at(0)), None, "{bad:?}");
        }
    }

    #[test]
    fn dates_in_the_past_count_as_zero() {
        let date = "Wed, 21 Oct 2015 07:28:00 GMT";
        assert_eq!(
            parse_retry_after(date, at(2_000_000_000)),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn retry_after_ms_wins_and_rejects_nonsense() {
        let mut headers = HeaderMap::new();
        headers.insert("retry-after", "9".parse().unwrap());
        headers.insert("retry-after-ms", "250".parse().unwrap());
        assert_eq!(
            retry_after(&headers, at(0)),
            Some(Duration::from_millis(250))
        );
        headers.insert("retry-after-ms", "-5".parse().unwrap());
        assert_eq!(retry_after(&headers, at(0)), Some(Duration::from_secs(9)));
        headers.insert("retry-after-ms", "NaN".parse().unwrap());
        assert_eq!(retry_after(&headers, at(0)), Some(Duration::from_secs(9)));
    }

    #[test]
    fn ceiling_doubles_then_caps_without_overflow() {
        let b = Backoff::default().jitter(false);
        let waits: Vec<u64> = (1..=8).map(|n| b.wait(n, None).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(b.ceiling(u32::MAX), Duration::from_secs(60));
        assert_eq!(b.ceiling(0), Duration::from_secs(1));
    }

    #[test]
    fn jittered_wait_stays_under_the_ceiling() {
        let b = Backoff::default();
        for level in 1..10 {
            for _ in 0..100 {
                assert!(b.wait(level, None) <= b.ceiling(level));
            }
        }
    }
}
