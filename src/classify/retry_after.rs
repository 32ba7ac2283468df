//! `Retry-After` and `retry-after-ms`: how long a response asks us to wait.

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
/// use tower_key_rotation::classify::retry_after;
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
}
