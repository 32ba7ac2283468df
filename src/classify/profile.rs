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
}

fn bigmodel(status: StatusCode, headers: &HeaderMap, body: &[u8], now: SystemTime) -> Outcome {
    let (code, _, message) = error_fields(body);
    match code.as_deref() {
        Some("1302" | "1303") => Outcome::AccountLimited {
            retry_after: retry_after(headers, now),
        },
        Some("1113") => Outcome::QuotaExhausted { reset_after: None, scope: Scope::Key },
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
        return Outcome::QuotaExhausted { reset_after: None, scope: Scope::Key };
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
            Outcome::AccountLimited { retry_after: None }
        );
        assert!(matches!(
            bigmodel_code("1303", "", now),
            Outcome::AccountLimited { .. }
        ));
        assert_eq!(
            bigmodel_code("1113", "arrears", now),
            Outcome::QuotaExhausted { reset_after: None, scope: Scope::Key }
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

    #[test]
    fn numeric_codes_are_read_too() {
        let body = br#"{"error":{"code":1302}}"#;
        let outcome = bigmodel(
            StatusCode::TOO_MANY_REQUESTS,
            &HeaderMap::new(),
            body,
            SystemTime::now(),
        );
        assert!(matches!(outcome, Outcome::AccountLimited { .. }));
    }

    #[test]
    fn openai_billing_429_is_a_spent_quota() {
        let body = br#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","code":"insufficient_quota"}}"#;
        let headers = HeaderMap::new();
        assert_eq!(
            openai(StatusCode::TOO_MANY_REQUESTS, &headers, body),
            Outcome::QuotaExhausted { reset_after: None, scope: Scope::Key }
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
