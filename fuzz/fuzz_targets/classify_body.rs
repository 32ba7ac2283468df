//! The provider profiles' classifiers on any status, rate-limit header and body: BigModel,
//! OpenAI and Anthropic, plus the default head-only classifier. None may panic, and a
//! success status is never turned into a penalty for the key by its body.
#![no_main]

use http::{HeaderMap, HeaderValue, StatusCode};
use libfuzzer_sys::fuzz_target;
use tower_key_rotation::classify::{Classifier, Outcome, generic};

fuzz_target!(|data: &[u8]| {
    // Bytes 0-1: the status; byte 2: a header value's length; then the value; the rest: body.
    if data.len() < 3 {
        return;
    }
    let code = 100 + u16::from_be_bytes([data[0], data[1]]) % 500;
    let Ok(status) = StatusCode::from_u16(code) else {
        return;
    };
    let len = usize::from(data[2]).min(data.len() - 3);
    let (value, body) = data[3..].split_at(len);
    let mut headers = HeaderMap::new();
    if let Ok(value) = HeaderValue::from_bytes(value) {
        for name in [
            "retry-after",
            "retry-after-ms",
            "x-ratelimit-reset-requests",
            "anthropic-ratelimit-requests-reset",
        ] {
            headers.insert(name, value.clone());
        }
        headers.insert(
            "x-ratelimit-remaining-requests",
            HeaderValue::from_static("0"),
        );
    }
    let head = generic(status, &headers);
    for classifier in [
        Classifier::bigmodel(),
        Classifier::openai(),
        Classifier::anthropic(),
        Classifier::default(),
    ] {
        // As the layer does: the body only for the statuses the classifier asks it for,
        // cut at its limit.
        let outcome = match classifier.body_limit(status) {
            Some(limit) => {
                classifier.classify_with_body(status, &headers, &body[..body.len().min(limit)])
            }
            None => classifier.classify(status, &headers),
        };
        let _ = classifier.classify_with_body(status, &headers, body);
        if status.is_success() {
            // Bodies are read for error statuses only: a 2xx is classified by its head.
            assert!(
                matches!(outcome, Outcome::Success | Outcome::SuccessAtLimit { .. }),
                "{status} classified as {outcome:?}"
            );
        }
    }
    if status.is_success() {
        assert!(matches!(
            head,
            Outcome::Success | Outcome::SuccessAtLimit { .. }
        ));
    }
});
