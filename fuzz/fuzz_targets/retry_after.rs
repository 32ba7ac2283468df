//! The wait parsers on any input: `parse_retry_after`, `retry_after` (headers, with
//! `retry-after-ms`), `parse_go_duration`, `parse_rfc3339` and `learned_reset`. None may
//! panic; delta-seconds must be exact (saturating), past dates zero.
#![no_main]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use tower_key_rotation::classify::{learned_reset, parse_retry_after, retry_after};
// Crate-private parsers, public only under `--cfg fuzzing` (which cargo-fuzz sets).
use tower_key_rotation::fuzzing::{parse_go_duration, parse_rfc3339};

fuzz_target!(|data: &[u8]| {
    // First 5 bytes: the clock (seconds since 1970, up to ~35,000 years); the rest: the value.
    if data.len() < 5 {
        return;
    }
    let secs = data[..5].iter().fold(0u64, |n, &b| n << 8 | u64::from(b));
    let now = UNIX_EPOCH + Duration::from_secs(secs);
    let raw = &data[5..];

    if let Ok(text) = std::str::from_utf8(raw) {
        let wait = parse_retry_after(text, now);
        let trimmed = text.trim();
        if !trimmed.is_empty() && trimmed.bytes().all(|b| b.is_ascii_digit()) {
            let exact = trimmed
                .parse::<u64>()
                .map_or(Duration::from_secs(u64::MAX), Duration::from_secs);
            assert_eq!(wait, Some(exact));
        } else if let Some(wait) = wait {
            // Only an HTTP-date gets here: the time left until it, zero when past.
            let date = httpdate::parse_http_date(trimmed).expect("only dates besides numbers");
            assert_eq!(wait, date.duration_since(now).unwrap_or(Duration::ZERO));
        }
        let _ = parse_go_duration(text);
        if let Some(at) = parse_rfc3339(text) {
            let _ = at.duration_since(UNIX_EPOCH);
        }
    }

    if let Ok(value) = HeaderValue::from_bytes(raw) {
        for name in ["retry-after", "retry-after-ms"] {
            let mut headers = HeaderMap::new();
            headers.insert(name, value.clone());
            let _ = retry_after(&headers, now);
        }
        let mut headers = HeaderMap::new();
        for (remaining, reset) in [
            (
                "x-ratelimit-remaining-requests",
                "x-ratelimit-reset-requests",
            ),
            ("x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"),
            (
                "anthropic-ratelimit-requests-remaining",
                "anthropic-ratelimit-requests-reset",
            ),
            (
                "anthropic-ratelimit-tokens-remaining",
                "anthropic-ratelimit-tokens-reset",
            ),
        ] {
            headers.insert(remaining, HeaderValue::from_static("0"));
            headers.insert(reset, value.clone());
        }
        let _ = learned_reset(&headers, now);
        let _ = learned_reset(&headers, SystemTime::UNIX_EPOCH);
    }
});
