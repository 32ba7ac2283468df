//! Learned limits: the rate-limit headers providers send on every response, read so that a
//! key can rest *before* it is refused.
//!
//! | provider | remaining | reset |
//! | --- | --- | --- |
//! | OpenAI | `x-ratelimit-remaining-requests`, `x-ratelimit-remaining-tokens` | `x-ratelimit-reset-requests`, `x-ratelimit-reset-tokens`: a duration such as `1s`, `6m0s`, `20ms` |
//! | Anthropic | `anthropic-ratelimit-requests-remaining`, `anthropic-ratelimit-tokens-remaining`, `anthropic-ratelimit-input-tokens-remaining`, `anthropic-ratelimit-output-tokens-remaining` | the matching `-reset`: an RFC 3339 time |
//!
//! When a dimension reports `0` remaining, the key rests until that dimension resets; with
//! several exhausted, until the latest reset.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderName};

/// OpenAI's pairs of (remaining, reset-as-duration) headers. Header names built at compile
/// time: this runs on every response, and a `&str` lookup would parse the name each time.
const OPENAI: [(HeaderName, HeaderName); 2] = [
    (
        HeaderName::from_static("x-ratelimit-remaining-requests"),
        HeaderName::from_static("x-ratelimit-reset-requests"),
    ),
    (
        HeaderName::from_static("x-ratelimit-remaining-tokens"),
        HeaderName::from_static("x-ratelimit-reset-tokens"),
    ),
];

/// Anthropic's pairs of (remaining, reset-as-RFC-3339) headers.
const ANTHROPIC: [(HeaderName, HeaderName); 4] = [
    (
        HeaderName::from_static("anthropic-ratelimit-requests-remaining"),
        HeaderName::from_static("anthropic-ratelimit-requests-reset"),
    ),
    (
        HeaderName::from_static("anthropic-ratelimit-tokens-remaining"),
        HeaderName::from_static("anthropic-ratelimit-tokens-reset"),
    ),
    (
        HeaderName::from_static("anthropic-ratelimit-input-tokens-remaining"),
        HeaderName::from_static("anthropic-ratelimit-input-tokens-reset"),
    ),
    (
        HeaderName::from_static("anthropic-ratelimit-output-tokens-remaining"),
        HeaderName::from_static("anthropic-ratelimit-output-tokens-reset"),
    ),
];

/// How long until the key may be used again, if the response's rate-limit headers say a
/// limit is used up (`remaining: 0`). `None` when no limit is exhausted or the reset is
/// missing or unreadable.
///
/// # Examples
///
/// ```
/// use http::{HeaderMap, HeaderName};
/// use std::time::{Duration, SystemTime};
/// use tower_key_rotation::classify::learned_reset;
///
/// let mut headers = HeaderMap::new();
/// headers.insert("x-ratelimit-remaining-requests", "0".parse().unwrap());
/// headers.insert("x-ratelimit-reset-requests", "6m0s".parse().unwrap());
/// assert_eq!(learned_reset(&headers, SystemTime::now()), Some(Duration::from_secs(360)));
/// ```
pub fn learned_reset(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    learned_reset_at(headers, || now)
}

/// [`learned_reset`], reading the wall clock only if an Anthropic limit is exhausted (the
/// common answer, with limits left, needs no clock).
///
/// This runs on every response, so it first finds, in one pass over the names and without
/// hashing, which limits say `0` remaining ([`exhausted_limits`]); the reset headers are
/// looked up and parsed only for those. An answer with limits left (or without the headers)
/// costs that one pass.
pub(crate) fn learned_reset_at(
    headers: &HeaderMap,
    now: impl FnOnce() -> SystemTime,
) -> Option<Duration> {
    let exhausted = exhausted_limits(headers);
    if exhausted == 0 {
        return None;
    }
    let text = |name: &HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    let is_exhausted = |i: usize| exhausted & (1 << i) != 0;
    let openai = OPENAI
        .iter()
        .enumerate()
        .filter(|&(i, _)| is_exhausted(i))
        .filter_map(|(_, (_, reset))| parse_go_duration(text(reset)?))
        .max();
    let anthropic = ANTHROPIC
        .iter()
        .enumerate()
        .filter(|&(i, _)| is_exhausted(OPENAI.len() + i))
        .filter_map(|(_, (_, reset))| parse_rfc3339(text(reset)?))
        .max()
        .map(|at| at.duration_since(now()).unwrap_or(Duration::ZERO));
    openai.max(anthropic)
}

/// Which limits say `0` remaining, as a bit set: bit `i` for `OPENAI[i]`, bit
/// `OPENAI.len() + i` for `ANTHROPIC[i]`. Reads each remaining header's first value, as
/// [`HeaderMap::get`] would, but by walking the headers once and comparing names (most
/// headers fail on length alone): six hashed lookups of long names cost ~1.6k instructions
/// per response, the walk a few dozen per header.
fn exhausted_limits(headers: &HeaderMap) -> u8 {
    let (mut seen, mut exhausted) = (0u8, 0u8);
    for (name, value) in headers {
        let bit = match name.as_str() {
            "x-ratelimit-remaining-requests" => 1 << 0,
            "x-ratelimit-remaining-tokens" => 1 << 1,
            "anthropic-ratelimit-requests-remaining" => 1 << 2,
            "anthropic-ratelimit-tokens-remaining" => 1 << 3,
            "anthropic-ratelimit-input-tokens-remaining" => 1 << 4,
            "anthropic-ratelimit-output-tokens-remaining" => 1 << 5,
            _ => continue,
        };
        // A name's values come one after another, its first value first: only that one
        // counts (what `get` returns).
        if seen & bit != 0 {
            continue;
        }
        seen |= bit;
        if is_zero(value.as_bytes()) {
            exhausted |= bit;
        }
    }
    exhausted
}

/// `value` reads `0` between spaces and tabs: what `to_str()` then `trim() == "0"` says,
/// without the pass over every byte (`to_str` accepts visible ASCII, space and tab, of which
/// `trim` removes the last two).
fn is_zero(value: &[u8]) -> bool {
    let blank = |b: &u8| matches!(b, b' ' | b'\t');
    let start = value.iter().position(|b| !blank(b));
    let end = value.iter().rposition(|b| !blank(b));
    matches!((start, end), (Some(i), Some(j)) if i == j && value[i] == b'0')
}

/// Parses a Go-style duration as OpenAI sends it: `1s`, `6m0s`, `20ms`, `1h2m3.5s`,
/// `150us`. Units `h`, `m`, `s`, `ms`, `us`/`µs`, `ns`; each number may have a fraction.
///
/// Crate-private, as general parsing is not this crate's job; the fuzz targets reach it
/// through `fuzzing` (under `--cfg fuzzing`).
pub(crate) fn parse_go_duration(text: &str) -> Option<Duration> {
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    if rest == "0" {
        return Some(Duration::ZERO);
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..number_len].parse().ok()?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds_per_unit = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" | "μs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += number * seconds_per_unit;
    }
    Duration::try_from_secs_f64(total).ok()
}

/// Parses an RFC 3339 time such as `2024-06-01T12:00:00Z` or
/// `2024-06-01T20:00:00.5+08:00`.
///
/// Crate-private, as [`parse_go_duration`] is.
pub(crate) fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    let s = text.trim().as_bytes();
    let digits = |range: std::ops::Range<usize>| -> Option<i64> {
        let part = s.get(range)?;
        part.iter().all(u8::is_ascii_digit).then_some(())?;
        std::str::from_utf8(part).ok()?.parse().ok()
    };
    let year = digits(0..4)?;
    let (month, day) = (digits(5..7)?, digits(8..10)?);
    let (hour, minute, second) = (digits(11..13)?, digits(14..16)?, digits(17..19)?);
    let separators_ok = s.get(4) == Some(&b'-')
        && s.get(7) == Some(&b'-')
        && matches!(s.get(10), Some(b'T' | b't' | b' '))
        && s.get(13) == Some(&b':')
        && s.get(16) == Some(&b':');
    let in_range = (1..=12).contains(&month)
        && (1..=days_in_month(year, month)).contains(&day)
        && hour < 24
        && minute < 60
        && second < 61;
    if !separators_ok || !in_range {
        return None;
    }
    let mut i = 19;
    let mut nanos = 0u32;
    if s.get(i) == Some(&b'.') {
        let start = i + 1;
        let end = start + s[start..].iter().take_while(|b| b.is_ascii_digit()).count();
        if end == start {
            return None;
        }
        for (n, b) in s[start..end.min(start + 9)].iter().enumerate() {
            nanos += u32::from(b - b'0') * 10u32.pow(8 - n as u32);
        }
        i = end;
    }
    let offset_seconds = match s.get(i..)? {
        b"Z" | b"z" => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let hh = digits(i + 1..i + 3)?;
            let mm = digits(i + 4..i + 6)?;
            let _ = (h1, h2, m1, m2);
            let offset = hh * 3600 + mm * 60;
            if *sign == b'+' { offset } else { -offset }
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second - offset_seconds;
    let seconds = u64::try_from(seconds).ok()?;
    Some(UNIX_EPOCH + Duration::new(seconds, nanos))
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
pub(crate) fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use proptest::prelude::*;

    /// The definition `learned_reset_at` had before its fast path: six lookups by name,
    /// then the resets of the exhausted limits. The fast path must agree with it.
    fn learned_reset_by_lookups(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
        let exhausted = |name: &HeaderName| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.trim() == "0")
        };
        let text = |name: &HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
        let openai = OPENAI
            .iter()
            .filter(|(remaining, _)| exhausted(remaining))
            .filter_map(|(_, reset)| parse_go_duration(text(reset)?))
            .max();
        let anthropic = ANTHROPIC
            .iter()
            .filter(|(remaining, _)| exhausted(remaining))
            .filter_map(|(_, reset)| parse_rfc3339(text(reset)?))
            .max()
            .map(|at| at.duration_since(now).unwrap_or(Duration::ZERO));
        openai.max(anthropic)
    }

    /// Every rate-limit name, some neighbours that must not count, and common headers.
    fn names() -> Vec<HeaderName> {
        let mut names: Vec<HeaderName> = OPENAI
            .iter()
            .chain(&ANTHROPIC)
            .flat_map(|(remaining, reset)| [remaining.clone(), reset.clone()])
            .collect();
        for other in [
            "content-type",
            "date",
            "x-ratelimit-limit-requests",
            "x-ratelimit-remaining-request",
            "anthropic-ratelimit-requests-limit",
            "anthropic-ratelimit-tokens-remainin",
            "x-other",
        ] {
            names.push(HeaderName::from_static(other));
        }
        names
    }

    /// Values that matter to the rules (zero in its spellings, counts, both reset formats)
    /// or to reading them (empty, obs-text that `to_str` refuses).
    fn value() -> impl Strategy<Value = HeaderValue> {
        let fixed = prop::sample::select(vec![
            "0",
            " 0",
            "0\t",
            "00",
            "-0",
            "1",
            "12",
            "",
            "1s",
            "6m0s",
            "20ms",
            "1h2m3.5s",
            "soon",
            "2024-01-01T00:00:30Z",
            "2023-12-31T23:59:59Z",
            "2024-01-01T01:00:00.5+01:00",
            "2024-01-01T00:10:00Z",
        ])
        .prop_map(HeaderValue::from_static);
        let obs_text = Just(HeaderValue::from_bytes(b"0\x80").unwrap());
        let any = "[0-9a-z:.+ TZ-]{0,24}".prop_map(|v| HeaderValue::from_str(&v).unwrap());
        prop_oneof![6 => fixed, 1 => obs_text, 3 => any]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]

        /// On generated header sets (names repeated, so some carry several values, only
        /// the first of which counts), the one-pass fast path gives the lookups' answer.
        #[test]
        fn the_fast_path_agrees_with_the_lookups(
            entries in prop::collection::vec((0..names().len(), value()), 0..12)
        ) {
            let names = names();
            let mut headers = HeaderMap::new();
            for (name, value) in entries {
                headers.append(names[name].clone(), value);
            }
            let now = parse_rfc3339("2024-01-01T00:00:00Z").unwrap();
            prop_assert_eq!(
                learned_reset_at(&headers, || now),
                learned_reset_by_lookups(&headers, now)
            );
        }
    }

    proptest! {
        /// Any bytes at all, valid in a header or not.
        #[test]
        fn is_zero_agrees_with_to_str_and_trim(bytes in prop::collection::vec(
            prop::sample::select(vec![b'0', b'1', b' ', b'\t', b'\n', b'\r', 0x0b, 0x0c, 0x80, 0xa0, b'a']),
            0..5,
        )) {
            let by_str = std::str::from_utf8(&bytes).is_ok_and(|v| {
                v.bytes().all(|b| b == b'\t' || (32..127).contains(&b)) && v.trim() == "0"
            });
            prop_assert_eq!(is_zero(&bytes), by_str);
        }
    }

    #[test]
    fn each_remaining_header_has_its_own_bit() {
        for (i, (remaining, _)) in OPENAI.iter().chain(&ANTHROPIC).enumerate() {
            let mut headers = HeaderMap::new();
            headers.insert(
                HeaderName::from_static("date"),
                HeaderValue::from_static("0"),
            );
            headers.insert(remaining.clone(), HeaderValue::from_static(" 0 "));
            assert_eq!(exhausted_limits(&headers), 1 << i, "{remaining}");
            headers.insert(remaining.clone(), HeaderValue::from_static("3"));
            assert_eq!(exhausted_limits(&headers), 0, "{remaining}");
        }
    }

    #[test]
    fn only_the_first_value_of_a_remaining_header_counts() {
        let now = parse_rfc3339("2024-01-01T00:00:00Z").unwrap();
        let (remaining, reset) = &OPENAI[0];
        let mut headers = HeaderMap::new();
        headers.append(remaining.clone(), HeaderValue::from_static("5"));
        headers.append(remaining.clone(), HeaderValue::from_static("0"));
        headers.insert(reset.clone(), HeaderValue::from_static("1s"));
        assert_eq!(learned_reset(&headers, now), None);
        let mut headers = HeaderMap::new();
        headers.append(remaining.clone(), HeaderValue::from_static("0"));
        headers.append(remaining.clone(), HeaderValue::from_static("5"));
        headers.insert(reset.clone(), HeaderValue::from_static("1s"));
        assert_eq!(learned_reset(&headers, now), Some(Duration::from_secs(1)));
    }

    #[test]
    fn go_durations() {
        let cases = [
            ("1s", 1_000),
            ("6m0s", 360_000),
            ("20ms", 20),
            ("1h2m3.5s", 3_723_500),
            ("0.5s", 500),
            ("1500us", 1),
            ("0", 0),
        ];
        for (text, ms) in cases {
            assert_eq!(
                parse_go_duration(text).map(|d| d.as_millis()),
                Some(ms),
                "{text}"
            );
        }
        for bad in ["", "s", "5", "5x", "-1s", "1..2s", "1 s"] {
            assert_eq!(parse_go_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn rfc3339_agrees_with_http_dates() {
        let at = parse_rfc3339("2015-10-21T07:28:00Z").unwrap();
        assert_eq!(
            at,
            httpdate::parse_http_date("Wed, 21 Oct 2015 07:28:00 GMT").unwrap()
        );
        let offset = parse_rfc3339("2015-10-21T15:28:00.250+08:00").unwrap();
        assert_eq!(offset, at + Duration::from_millis(250));
        for bad in [
            "2015-13-01T00:00:00Z",
            "2015-02-29T00:00:00Z",
            "2015-10-21 07:28:00",
            "2015-10-21T07:28:00+0800",
            "yesterday",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn only_exhausted_limits_count_and_the_latest_reset_wins() {
        let now = parse_rfc3339("2024-01-01T00:00:00Z").unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("x-ratelimit-remaining-requests", "5".parse().unwrap());
        headers.insert("x-ratelimit-reset-requests", "1s".parse().unwrap());
        assert_eq!(learned_reset(&headers, now), None);
        headers.insert("x-ratelimit-remaining-tokens", "0".parse().unwrap());
        headers.insert("x-ratelimit-reset-tokens", "20ms".parse().unwrap());
        assert_eq!(
            learned_reset(&headers, now),
            Some(Duration::from_millis(20))
        );
        headers.insert(
            "anthropic-ratelimit-requests-remaining",
            "0".parse().unwrap(),
        );
        headers.insert(
            "anthropic-ratelimit-requests-reset",
            "2024-01-01T00:00:30Z".parse().unwrap(),
        );
        assert_eq!(learned_reset(&headers, now), Some(Duration::from_secs(30)));
    }
}
