//! The provider profiles: classifiers that read the provider's small JSON error body as
//! well as the status and headers (the table is in the module docs of `classify`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, StatusCode};

use super::{Classifier, Outcome, Scope, days_from_civil, generic, retry_after};

/// The most body bytes a profile reads before classifying.
pub const BODY_LIMIT: usize = 8 * 1024;

/// Beijing time (UTC+8), in which BigModel states its quota resets.
const BEIJING_OFFSET: i64 = 8 * 3600;

fn is_error(status: StatusCode) -> bool {
    status.is_client_error() || status.is_server_error()
}

/// Reads `error.code` (string or number) and `error.type` and `error.message` from a JSON
/// error body.
fn error_fields(body: &[u8]) -> (Option<String>, Option<String>, Option<String>) {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) else {
        return (None, None, None);
    };
    let error = &value["error"];
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    };
    (
        text(&error["code"]),
        text(&error["type"]),
        text(&error["message"]),
    )
}

impl Classifier {
    /// Zhipu BigModel (GLM): reads `error.code` from the error body. See the [module
    /// table](crate::classify).
    ///
    /// # Examples
    ///
    /// ```
    /// use http::{HeaderMap, StatusCode};
    /// use tower_key_rotation::classify::{Classifier, Outcome};
    ///
    /// let bigmodel = Classifier::bigmodel();
    /// let body = br#"{"error":{"code":"1305","message":"overloaded"}}"#;
    /// let outcome = bigmodel.classify_with_body(StatusCode::TOO_MANY_REQUESTS, &HeaderMap::new(), body);
    /// assert_eq!(outcome, Outcome::Failure); // the platform is busy: not the key's fault
    /// ```
    pub fn bigmodel() -> Self {
        Self::with_body(is_error, BODY_LIMIT, |status, headers, body| {
            bigmodel(status, headers, body, SystemTime::now())
        })
    }

    /// OpenAI: a billing 429 (`insufficient_quota`) is a spent quota, not a rate limit.
    pub fn openai() -> Self {
        Self::with_body(
            |status| status == StatusCode::TOO_MANY_REQUESTS,
            BODY_LIMIT,
            openai,
        )
    }

    /// Anthropic: 529 is platform-wide overload (no penalty for the key); 429 is an
    /// organisation-wide limit.
    pub fn anthropic() -> Self {
        Self::new(anthropic)
    }

    /// Google Gemini (the Gemini API, `generativelanguage.googleapis.com`): reads the
    /// `google.rpc` details of a `RESOURCE_EXHAUSTED` body, as Gemini sends no rate-limit
    /// headers. See the [module table](crate::classify).
    ///
    /// - `RetryInfo.retryDelay` (`"45.837906927s"`) is the rest of a 429;
    /// - `QuotaFailure.violations[].quotaId` names the window: a per-day quota alone
    ///   (`GenerateRequestsPerDayPerProjectPerModel-FreeTier`) is spent until the day's reset,
    ///   midnight Pacific time; any per-minute violation makes it a short rate limit, never
    ///   read as daily;
    /// - `ErrorInfo.reason` `API_KEY_INVALID` (a 400) refuses the key;
    /// - 503 `UNAVAILABLE` (the model overloaded) is the platform's, not the key's.
    ///
    /// # Examples
    ///
    /// ```
    /// use http::{HeaderMap, StatusCode};
    /// use std::time::Duration;
    /// use tower_key_rotation::classify::{Classifier, Outcome};
    ///
    /// let body = br#"{"error":{"code":429,"status":"RESOURCE_EXHAUSTED","details":[
    ///   {"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[
    ///     {"quotaId":"GenerateRequestsPerMinutePerProjectPerModel-FreeTier"}]},
    ///   {"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"39s"}]}}"#;
    /// let outcome = Classifier::gemini().classify_with_body(
    ///     StatusCode::TOO_MANY_REQUESTS,
    ///     &HeaderMap::new(),
    ///     body,
    /// );
    /// assert_eq!(outcome, Outcome::RateLimited { retry_after: Some(Duration::from_secs(39)) });
    /// ```
    pub fn gemini() -> Self {
        Self::with_body(is_error, BODY_LIMIT, |status, headers, body| {
            gemini(status, headers, body, SystemTime::now())
        })
    }
}

/// What a Gemini error body's `google.rpc` details say.
#[derive(Debug, Default)]
struct GoogleDetails {
    retry_delay: Option<Duration>,
    per_day: bool,
    per_minute: bool,
    /// A violated quota is per model (its id says `PerModel`).
    per_model: bool,
    key_invalid: bool,
}

fn google_details(body: &[u8]) -> GoogleDetails {
    let mut found = GoogleDetails::default();
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) else {
        return found;
    };
    let Some(details) = value["error"]["details"].as_array() else {
        return found;
    };
    for detail in details {
        let kind = detail["@type"].as_str().unwrap_or_default();
        if kind.ends_with("google.rpc.RetryInfo") {
            found.retry_delay = detail["retryDelay"].as_str().and_then(parse_proto_duration);
        } else if kind.ends_with("google.rpc.QuotaFailure") {
            for violation in detail["violations"].as_array().into_iter().flatten() {
                let id = violation["quotaId"].as_str().unwrap_or_default();
                found.per_day |= id.contains("PerDay");
                found.per_minute |= id.contains("PerMinute");
                found.per_model |= id.contains("PerModel");
            }
        } else if kind.ends_with("google.rpc.ErrorInfo") {
            found.key_invalid |= detail["reason"].as_str() == Some("API_KEY_INVALID");
        }
    }
    found
}

/// A protobuf `Duration` in its JSON form: decimal seconds with an `s` (`"45.837906927s"`).
fn parse_proto_duration(text: &str) -> Option<Duration> {
    let seconds: f64 = text.trim().strip_suffix('s')?.parse().ok()?;
    Duration::try_from_secs_f64(seconds).ok()
}

fn gemini(status: StatusCode, headers: &HeaderMap, body: &[u8], now: SystemTime) -> Outcome {
    match status {
        StatusCode::TOO_MANY_REQUESTS => {
            let details = google_details(body);
            if details.per_day && !details.per_minute {
                // Spent for the day: back at the day's reset, for this model alone when the
                // quota is per model (keys of other projects may still serve it).
                return Outcome::QuotaExhausted {
                    reset_after: Some(until_next_pacific_midnight(now)),
                    scope: if details.per_model {
                        Scope::Bucket
                    } else {
                        Scope::Key
                    },
                };
            }
            Outcome::RateLimited {
                retry_after: details.retry_delay.or_else(|| retry_after(headers, now)),
            }
        }
        StatusCode::BAD_REQUEST if google_details(body).key_invalid => Outcome::KeyRejected,
        StatusCode::SERVICE_UNAVAILABLE => Outcome::Failure,
        _ => generic(status, headers),
    }
}

/// How long until the next midnight in the US Pacific time zone (where Gemini's daily
/// quotas reset): daylight time (UTC-7) from the second Sunday in March to the first in
/// November, at 2:00 local time, standard time (UTC-8) otherwise.
fn until_next_pacific_midnight(now: SystemTime) -> Duration {
    let secs = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
    let year = civil_year(secs.div_euclid(86_400));
    let sunday_on_or_after = |month: i64, day: i64| {
        let days = days_from_civil(year, month, day);
        // 1970-01-01 was a Thursday: weekday 0 is Sunday.
        days + (7 - (days + 4).rem_euclid(7)) % 7
    };
    // 2:00 local: 10:00 UTC in standard time (March), 9:00 UTC in daylight time (November).
    let dst_start = sunday_on_or_after(3, 8) * 86_400 + 10 * 3600;
    let dst_end = sunday_on_or_after(11, 1) * 86_400 + 9 * 3600;
    let offset = if (dst_start..dst_end).contains(&secs) {
        -7 * 3600
    } else {
        -8 * 3600
    };
    let local = secs + offset;
    let next_midnight = (local.div_euclid(86_400) + 1) * 86_400;
    Duration::from_secs((next_midnight - local) as u64)
}

/// The proleptic Gregorian year of a day counted from 1970-01-01 (Howard Hinnant's
/// `civil_from_days`, the year only).
fn civil_year(days: i64) -> i64 {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    yoe + era * 400 + i64::from(month <= 2)
}

fn bigmodel(status: StatusCode, headers: &HeaderMap, body: &[u8], now: SystemTime) -> Outcome {
    let (code, _, message) = error_fields(body);
    match code.as_deref() {
        Some("1302") => Outcome::ConcurrencyLimited {
            retry_after: retry_after(headers, now),
        },
        Some("1303") => Outcome::AccountLimited {
            retry_after: retry_after(headers, now),
        },
        Some("1113") => Outcome::QuotaExhausted {
            reset_after: None,
            scope: Scope::Key,
        },
        Some("1304") => Outcome::QuotaExhausted {
            reset_after: Some(until_next_beijing_midnight(now)),
            scope: Scope::Key,
        },
        Some("1308" | "1310") => Outcome::QuotaExhausted {
            reset_after: message
                .as_deref()
                .and_then(beijing_time_in)
                .map(|at| at.duration_since(now).unwrap_or(Duration::ZERO)),
            scope: Scope::Key,
        },
        Some("1305" | "1312") => Outcome::Failure,
        Some("1000" | "1001" | "1002" | "1003" | "1004") => Outcome::KeyRejected,
        _ => generic(status, headers),
    }
}

fn openai(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Outcome {
    if status != StatusCode::TOO_MANY_REQUESTS {
        return generic(status, headers);
    }
    let (code, kind, _) = error_fields(body);
    if code.as_deref() == Some("insufficient_quota")
        || kind.as_deref() == Some("insufficient_quota")
    {
        return Outcome::QuotaExhausted {
            reset_after: None,
            scope: Scope::Key,
        };
    }
    match generic(status, headers) {
        Outcome::RateLimited { retry_after } => Outcome::AccountLimited { retry_after },
        other => other,
    }
}

fn anthropic(status: StatusCode, headers: &HeaderMap) -> Outcome {
    match status.as_u16() {
        529 => Outcome::Failure,
        _ => match generic(status, headers) {
            Outcome::RateLimited { retry_after } => Outcome::AccountLimited { retry_after },
            other => other,
        },
    }
}

fn until_next_beijing_midnight(now: SystemTime) -> Duration {
    let secs = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
    let local = secs + BEIJING_OFFSET;
    let next_midnight = (local.div_euclid(86_400) + 1) * 86_400;
    Duration::from_secs((next_midnight - local) as u64)
}

/// Finds the first `YYYY-MM-DD HH:MM:SS` in `message`, read as Beijing time.
fn beijing_time_in(message: &str) -> Option<SystemTime> {
    let bytes = message.as_bytes();
    let shape = b"dddd-dd-dd dd:dd:dd";
    let start = (0..bytes.len().saturating_sub(shape.len() - 1)).find(|&i| {
        shape.iter().zip(&bytes[i..]).all(|(s, b)| match s {
            b'd' => b.is_ascii_digit(),
            _ => s == b,
        })
    })?;
    let text = &message[start..start + shape.len()];
    let n = |r: std::ops::Range<usize>| text[r].parse::<i64>().ok();
    let (year, month, day) = (n(0..4)?, n(5..7)?, n(8..10)?);
    let (hour, minute, second) = (n(11..13)?, n(14..16)?, n(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return None;
    }
    let local = days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second;
    let utc = u64::try_from(local - BEIJING_OFFSET).ok()?;
    Some(UNIX_EPOCH + Duration::from_secs(utc))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(rfc3339: &str) -> SystemTime {
        super::super::limits::parse_rfc3339(rfc3339).unwrap()
    }

    fn bigmodel_code(code: &str, message: &str, now: SystemTime) -> Outcome {
        let body = format!(r#"{{"error":{{"code":"{code}","message":"{message}"}}}}"#);
        bigmodel(
            StatusCode::TOO_MANY_REQUESTS,
            &HeaderMap::new(),
            body.as_bytes(),
            now,
        )
    }

    #[test]
    fn bigmodel_codes_map_to_outcomes() {
        let now = at("2025-08-27T01:00:00Z"); // 09:00 in Beijing
        assert_eq!(
            bigmodel_code("1302", "concurrency", now),
            Outcome::ConcurrencyLimited { retry_after: None }
        );
        assert!(matches!(
            bigmodel_code("1303", "", now),
            Outcome::AccountLimited { .. }
        ));
        assert_eq!(
            bigmodel_code("1113", "arrears", now),
            Outcome::QuotaExhausted {
                reset_after: None,
                scope: Scope::Key
            }
        );
        assert_eq!(
            bigmodel_code("1304", "daily", now),
            Outcome::QuotaExhausted {
                reset_after: Some(Duration::from_secs(15 * 3600)),
                scope: Scope::Key,
            }
        );
        assert_eq!(
            bigmodel_code(
                "1308",
                "已达到 5 小时的使用上限。您的限额将在 2025-08-27 11:42:56 重置。",
                now
            ),
            Outcome::QuotaExhausted {
                reset_after: Some(Duration::from_secs(2 * 3600 + 42 * 60 + 56)),
                scope: Scope::Key,
            }
        );
        assert_eq!(bigmodel_code("1305", "overloaded", now), Outcome::Failure);
        assert_eq!(bigmodel_code("1312", "", now), Outcome::Failure);
        assert_eq!(
            bigmodel_code("1002", "invalid token", now),
            Outcome::KeyRejected
        );
        // Unknown codes and unreadable bodies fall back to the status.
        assert!(matches!(
            bigmodel_code("9999", "", now),
            Outcome::RateLimited { .. }
        ));
        let garbage = bigmodel(StatusCode::UNAUTHORIZED, &HeaderMap::new(), b"<html>", now);
        assert_eq!(garbage, Outcome::KeyRejected);
    }

    /// Zhipu's codes and the scope each hits, per the error-code table
    /// (<https://docs.bigmodel.cn/cn/faq/api-code>) and the rate-limit page
    /// (<https://docs.bigmodel.cn/cn/api/rate-limit>: concurrency is limited per model, 1302
    /// is the account's limit on the model, 1305 the platform's overload).
    #[test]
    fn bigmodel_codes_hit_the_documented_scope() {
        let now = at("2025-08-27T01:00:00Z");
        // 1302 concurrency, 1303 frequency: the model's limit on the account (a bucket).
        for code in ["1302", "1303"] {
            let outcome = bigmodel_code(code, "", now);
            assert!(outcome.is_rate_limited(), "{code}");
            assert_eq!(outcome.scope(), Scope::Bucket, "{code}");
        }
        // 1113 arrears, 1304 daily cap, 1308 five-hour cap, 1310 weekly/monthly cap: the
        // account's, every model.
        for code in ["1113", "1304", "1308", "1310"] {
            let outcome = bigmodel_code(code, "", now);
            assert!(
                matches!(outcome, Outcome::QuotaExhausted { .. }),
                "{code}: {outcome:?}"
            );
            assert_eq!(outcome.scope(), Scope::Key, "{code}");
        }
        // 1308 with the documented message shape ("已达到 ${number} ${unit} 的使用上限。您的
        // 限额将在 ${next_flush_time} 重置。"): until that time, Beijing time.
        assert_eq!(
            bigmodel_code(
                "1308",
                "已达到 5 小时 的使用上限。您的限额将在 2025-08-27 10:00:00 重置。",
                now
            ),
            Outcome::QuotaExhausted {
                reset_after: Some(Duration::from_secs(3600)),
                scope: Scope::Key,
            }
        );
    }

    /// A Gemini error body as the docs show it: `error.details[]` of `google.rpc` types.
    fn gemini_body(details: &str) -> Vec<u8> {
        format!(
            r#"{{"error":{{"code":429,"message":"You exceeded your current quota","status":"RESOURCE_EXHAUSTED","details":[{details}]}}}}"#
        )
        .into_bytes()
    }

    fn quota_failure(ids: &[&str]) -> String {
        let violations: Vec<String> = ids
            .iter()
            .map(|id| {
                format!(
                    r#"{{"quotaMetric":"generativelanguage.googleapis.com/generate_content_free_tier_requests","quotaId":"{id}","quotaDimensions":{{"location":"global","model":"gemini-2.0-flash"}}}}"#
                )
            })
            .collect();
        format!(
            r#"{{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{}]}}"#,
            violations.join(",")
        )
    }

    fn retry_info(delay: &str) -> String {
        format!(r#"{{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"{delay}"}}"#)
    }

    /// Gemini's 429s: limits per project × model, per minute or per day, the day resetting
    /// at midnight Pacific time (<https://ai.google.dev/gemini-api/docs/rate-limits>); the
    /// body's `RetryInfo` and `QuotaFailure` say which (the 429 `RESOURCE_EXHAUSTED` of
    /// <https://ai.google.dev/gemini-api/docs/troubleshooting>).
    #[test]
    fn gemini_reads_the_window_from_the_quota_id_and_the_rest_from_retry_delay() {
        let now = at("2025-01-15T20:00:00Z"); // 12:00 PST
        let classify =
            |body: &[u8]| gemini(StatusCode::TOO_MANY_REQUESTS, &HeaderMap::new(), body, now);
        // Per minute: the retry delay, to the nanosecond, for the model's bucket.
        let minute = gemini_body(&format!(
            "{},{}",
            quota_failure(&["GenerateRequestsPerMinutePerProjectPerModel-FreeTier"]),
            retry_info("45.837906927s")
        ));
        let outcome = classify(&minute);
        assert_eq!(
            outcome,
            Outcome::RateLimited {
                retry_after: Some(Duration::new(45, 837_906_927))
            }
        );
        assert_eq!(outcome.scope(), Scope::Bucket);
        // Input tokens per minute: a rate limit too.
        let tokens = gemini_body(&format!(
            "{},{}",
            quota_failure(&["GenerateContentInputTokensPerModelPerMinute-FreeTier"]),
            retry_info("39s")
        ));
        assert_eq!(
            classify(&tokens),
            Outcome::RateLimited {
                retry_after: Some(Duration::from_secs(39))
            }
        );
        // Per day alone: spent until midnight Pacific (PST in January: 12 hours away), for
        // this model only (the id says per model).
        let day = gemini_body(&format!(
            "{},{}",
            quota_failure(&["GenerateRequestsPerDayPerProjectPerModel-FreeTier"]),
            retry_info("20s")
        ));
        assert_eq!(
            classify(&day),
            Outcome::QuotaExhausted {
                reset_after: Some(Duration::from_secs(12 * 3600)),
                scope: Scope::Bucket,
            }
        );
        // A 39 s throttle listed beside a per-day violation is never read as daily.
        let both = gemini_body(&format!(
            "{},{}",
            quota_failure(&[
                "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
                "GenerateRequestsPerDayPerProjectPerModel-FreeTier"
            ]),
            retry_info("39s")
        ));
        assert_eq!(
            classify(&both),
            Outcome::RateLimited {
                retry_after: Some(Duration::from_secs(39))
            }
        );
        // No details at all: a rate limit with the pool's backoff.
        assert_eq!(
            classify(br#"{"error":{"code":429,"status":"RESOURCE_EXHAUSTED"}}"#),
            Outcome::RateLimited { retry_after: None }
        );
    }

    /// The other documented Gemini errors
    /// (<https://ai.google.dev/gemini-api/docs/troubleshooting>): a bad key is a 400 whose
    /// `ErrorInfo.reason` is `API_KEY_INVALID`; 403 `PERMISSION_DENIED` is the key's
    /// permissions; 503 `UNAVAILABLE` is the service overloaded; other 400s are the request's.
    #[test]
    fn gemini_tells_a_bad_key_from_a_bad_request_and_an_overload() {
        let now = SystemTime::now();
        let headers = HeaderMap::new();
        let invalid = br#"{"error":{"code":400,"message":"API key not valid. Please pass a valid API key.","status":"INVALID_ARGUMENT","details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"API_KEY_INVALID","domain":"googleapis.com","metadata":{"service":"generativelanguage.googleapis.com"}}]}}"#;
        assert_eq!(
            gemini(StatusCode::BAD_REQUEST, &headers, invalid, now),
            Outcome::KeyRejected
        );
        let bad_request = br#"{"error":{"code":400,"message":"Invalid JSON payload","status":"INVALID_ARGUMENT"}}"#;
        assert_eq!(
            gemini(StatusCode::BAD_REQUEST, &headers, bad_request, now),
            Outcome::Success
        );
        let denied = br#"{"error":{"code":403,"status":"PERMISSION_DENIED"}}"#;
        assert_eq!(
            gemini(StatusCode::FORBIDDEN, &headers, denied, now),
            Outcome::KeyRejected
        );
        let overloaded = br#"{"error":{"code":503,"message":"The model is overloaded. Please try again later.","status":"UNAVAILABLE"}}"#;
        assert_eq!(
            gemini(StatusCode::SERVICE_UNAVAILABLE, &headers, overloaded, now),
            Outcome::Failure
        );
    }

    #[test]
    fn pacific_midnight_follows_daylight_saving_time() {
        // Standard time (UTC-8): 07:59:59 UTC is 23:59:59 PST.
        assert_eq!(
            until_next_pacific_midnight(at("2025-01-15T07:59:59Z")),
            Duration::from_secs(1)
        );
        // Daylight time (UTC-7): 07:00 UTC is midnight PDT, a whole day to the next.
        assert_eq!(
            until_next_pacific_midnight(at("2025-07-04T07:00:00Z")),
            Duration::from_secs(86_400)
        );
        // 2025: daylight time from 9 March 10:00 UTC to 2 November 09:00 UTC.
        assert_eq!(
            until_next_pacific_midnight(at("2025-03-09T09:59:59Z")),
            Duration::from_secs(22 * 3600 + 1) // 01:59:59 PST; midnight PDT is 22 h later
        );
        assert_eq!(
            until_next_pacific_midnight(at("2025-03-09T10:00:00Z")),
            Duration::from_secs(21 * 3600) // 03:00 PDT
        );
        assert_eq!(
            until_next_pacific_midnight(at("2025-11-02T09:00:00Z")),
            Duration::from_secs(23 * 3600) // 01:00 PST
        );
        assert_eq!(civil_year(0), 1970);
        assert_eq!(civil_year(days_from_civil(2024, 12, 31)), 2024);
        assert_eq!(civil_year(days_from_civil(2025, 1, 1)), 2025);
    }

    #[test]
    fn numeric_codes_are_read_too() {
        let body = br#"{"error":{"code":1302}}"#;
        let outcome = bigmodel(
            StatusCode::TOO_MANY_REQUESTS,
            &HeaderMap::new(),
            body,
            SystemTime::now(),
        );
        assert!(matches!(outcome, Outcome::ConcurrencyLimited { .. }));
    }

    #[test]
    fn openai_billing_429_is_a_spent_quota() {
        let body = br#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","code":"insufficient_quota"}}"#;
        let headers = HeaderMap::new();
        assert_eq!(
            openai(StatusCode::TOO_MANY_REQUESTS, &headers, body),
            Outcome::QuotaExhausted {
                reset_after: None,
                scope: Scope::Key
            }
        );
        let body = br#"{"error":{"message":"Rate limit reached for requests","type":"requests","code":"rate_limit_exceeded"}}"#;
        assert_eq!(
            openai(StatusCode::TOO_MANY_REQUESTS, &headers, body),
            Outcome::AccountLimited { retry_after: None }
        );
    }

    #[test]
    fn anthropic_overload_is_not_the_keys_fault() {
        let headers = HeaderMap::new();
        assert_eq!(
            anthropic(StatusCode::from_u16(529).unwrap(), &headers),
            Outcome::Failure
        );
        assert!(matches!(
            anthropic(StatusCode::TOO_MANY_REQUESTS, &headers),
            Outcome::AccountLimited { .. }
        ));
    }

    #[test]
    fn profiles_read_bodies_only_for_errors() {
        let bigmodel = Classifier::bigmodel();
        assert_eq!(bigmodel.body_limit(StatusCode::OK), None);
        assert_eq!(
            bigmodel.body_limit(StatusCode::TOO_MANY_REQUESTS),
            Some(BODY_LIMIT)
        );
        assert_eq!(
            Classifier::anthropic().body_limit(StatusCode::TOO_MANY_REQUESTS),
            None
        );
    }
}
