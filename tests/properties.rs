//! Property tests: the key list parser, Retry-After parsing, backoff, and round-robin
//! fairness under any sequence of cool-downs.

use std::time::{Duration, SystemTime};

use proptest::prelude::*;
use tower_key_rotation::{
    ApiKey, Backoff, KeyPool, KeySet, Selection,
    classify::{Outcome, parse_retry_after},
};

/// The spec of `KeySet::parse`, written plainly.
fn expected_keys(input: &str) -> Option<Vec<String>> {
    if input.trim().is_empty() {
        return None;
    }
    let entries: Vec<&str> = input.split(',').map(str::trim).collect();
    for (i, entry) in entries.iter().enumerate() {
        // Visible ASCII, but no quote or semicolon (the marks of a list written wrong).
        let visible = !entry.is_empty()
            && entry
                .bytes()
                .all(|b| (0x21..=0x7e).contains(&b) && !b"\"'`;".contains(&b));
        if !visible || entries[..i].contains(entry) {
            return None;
        }
    }
    Some(entries.into_iter().map(str::to_owned).collect())
}

/// Key lists that are mostly plausible: secret-looking entries, padding, now and then an
/// empty entry, a duplicate or a bad byte.
fn key_lists() -> impl proptest::strategy::Strategy<Value = (String, Vec<String>)> {
    let entry = (
        "[A-Z0-9]{8,14}",
        prop_oneof![Just(""), Just(" "), Just("\t"), Just("  ")],
        prop_oneof![
            8 => Just(String::new()),
            1 => Just("\n".to_owned()),
            1 => Just(" ".to_owned()),
            1 => Just("\u{e9}".to_owned()),
            1 => Just("\u{0}".to_owned()),
            1 => Just("'".to_owned()),
            1 => Just(";".to_owned()),
        ],
        0..100u8,
    );
    proptest::collection::vec(entry, 1..6).prop_map(|entries| {
        let mut secrets: Vec<String> = Vec::new();
        let mut parts = Vec::new();
        for (i, (secret, pad, bad, roll)) in entries.into_iter().enumerate() {
            let secret = match roll {
                0..5 if i > 0 => secrets[0].clone(), // a duplicate
                5..8 => String::new(),               // an empty entry
                _ => secret,
            };
            let (head, tail) = secret.split_at(secret.len() / 2);
            parts.push(format!("{pad}{head}{bad}{tail}{pad}"));
            secrets.push(secret);
        }
        (parts.join(","), secrets)
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn keyset_accepts_exactly_the_valid_lists(input in any::<String>()) {
        let parsed = KeySet::parse(&input);
        match expected_keys(&input) {
            Some(keys) => {
                let parsed = parsed.unwrap();
                let got: Vec<&str> = parsed.keys().map(ApiKey::expose_secret).collect();
                prop_assert_eq!(got, keys);
            }
            None => prop_assert!(parsed.is_err()),
        }
    }

    #[test]
    fn keyset_errors_never_echo_a_key((input, secrets) in key_lists()) {
        let parsed = KeySet::parse(&input);
        prop_assert_eq!(parsed.is_ok(), expected_keys(&input).is_some(), "{:?}", input);
        if let Err(error) = parsed {
            for text in [error.to_string(), format!("{error:?}")] {
                for secret in secrets.iter().filter(|s| !s.is_empty()) {
                    let (head, tail) = secret.split_at(secret.len() / 2);
                    prop_assert!(!text.contains(head) && !text.contains(tail), "{}", text);
                }
            }
        }
    }

    #[test]
    fn retry_after_never_panics_and_only_accepts_numbers_and_dates(value in any::<String>()) {
        if let Some(wait) = parse_retry_after(&value, SystemTime::now()) {
            let v = value.trim();
            let number = !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit());
            prop_assert!(number || httpdate::parse_http_date(v).is_ok(), "{:?} -> {:?}", value, wait);
        }
    }

    #[test]
    fn delta_seconds_are_exact_and_huge_ones_saturate(digits in "[0-9]{1,40}") {
        let wait = parse_retry_after(&digits, SystemTime::UNIX_EPOCH).unwrap();
        let expected = digits.parse::<u64>().map_or(Duration::from_secs(u64::MAX), Duration::from_secs);
        prop_assert_eq!(wait, expected);
        prop_assert_eq!(parse_retry_after(&format!("-{digits}"), SystemTime::UNIX_EPOCH), None);
    }

    #[test]
    fn http_dates_give_the_time_left_and_past_dates_zero(date in 0u64..(1 << 34), now in 0u64..(1 << 34)) {
        let at = |secs| SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
        let wait = parse_retry_after(&httpdate::fmt_http_date(at(date)), at(now));
        prop_assert_eq!(wait, Some(Duration::from_secs(date.saturating_sub(now))));
    }

    #[test]
    fn backoff_is_monotone_capped_and_jitter_stays_below_the_ceiling(
        base_ms in 1u64..10_000,
        extra_ms in 0u64..3_600_000,
        cap_ms in 0u64..3_600_000,
        retry_after_ms in 0u64..u64::MAX,
    ) {
        let (base, max) = (Duration::from_millis(base_ms), Duration::from_millis(base_ms + extra_ms));
        let backoff = Backoff::default().base(base).max(max).max_retry_after(Duration::from_millis(cap_ms));
        let mut previous = Duration::ZERO;
        for level in 1..80 {
            let ceiling = backoff.ceiling(level);
            prop_assert!(ceiling >= previous && ceiling <= max);
            prop_assert!(backoff.wait(level, None) <= ceiling);
            previous = ceiling;
        }
        prop_assert_eq!(backoff.ceiling(1), base);
        let asked = Duration::from_millis(retry_after_ms);
        prop_assert_eq!(backoff.wait(7, Some(asked)), asked.min(Duration::from_millis(cap_ms)));
    }
}

#[derive(Debug, Clone)]
enum Op {
    Pick,
    Cool { key: usize, secs: u64 },
    Succeed { key: usize },
    Advance { ms: u64 },
}

fn ops(keys: usize) -> impl proptest::strategy::Strategy<Value = Vec<Op>> {
    let op = prop_oneof![
        6 => Just(Op::Pick),
        2 => (0..keys, 1..5u64).prop_map(|(key, secs)| Op::Cool { key, secs }),
        1 => (0..keys).prop_map(|key| Op::Succeed { key }),
        2 => (0..3_000u64).prop_map(|ms| Op::Advance { ms }),
    ];
    proptest::collection::vec(op, 1..200)
}

fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap()
}

fn pool_of(keys: usize) -> KeyPool {
    let list: Vec<String> = (0..keys).map(|i| format!("key-{i}")).collect();
    KeyPool::builder(KeySet::parse(&list.join(",")).unwrap())
        .selection(Selection::RoundRobin)
        .backoff(Backoff::default().jitter(false))
        .build()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Over any sequence of cool-downs, a key that stays healthy is picked within one
    /// turn of the rotation: never passed over while the others each get their turn
    /// and the rotation comes round to it again.
    #[test]
    fn round_robin_never_passes_over_a_healthy_key_twice(keys in 1usize..7, ops in ops(6)) {
        paused_runtime().block_on(async {
            let pool = pool_of(keys);
            let mut passed_over = vec![0usize; keys];
            for op in ops {
                match op {
                    Op::Pick => {
                        let healthy: Vec<bool> = pool
                            .snapshot()
                            .iter()
                            .map(|s| s.cooling_down_for.is_none() && !s.disabled)
                            .collect();
                        let lease = pool.try_reserve();
                        prop_assert_eq!(lease.is_some(), healthy.contains(&true));
                        let chosen = lease.as_ref().map(|lease| lease.position() - 1);
                        if let Some(index) = chosen {
                            prop_assert!(healthy[index]);
                        }
                        for (k, count) in passed_over.iter_mut().enumerate() {
                            if Some(k) == chosen || !healthy[k] {
                                *count = 0;
                            } else {
                                *count += 1;
                                prop_assert!(*count < keys, "key {} passed over {} times", k + 1, count);
                            }
                        }
                    }
                    Op::Cool { key, secs } => {
                        if key < keys {
                            if let Some(lease) = pool.try_reserve_where(|p| p == key + 1) {
                                lease.record(Outcome::RateLimited { retry_after: Some(Duration::from_secs(secs)) });
                            }
                        }
                    }
                    Op::Succeed { key } => {
                        if let Some(lease) = pool.try_reserve_where(|p| p == key + 1) {
                            lease.record(Outcome::Success);
                        }
                    }
                    Op::Advance { ms } => tokio::time::advance(Duration::from_millis(ms)).await,
                }
            }
            prop_assert!(pool.snapshot().iter().all(|s| s.in_flight == 0));
            Ok(())
        })?;
    }

    /// Through the pool: consecutive fresh 429s without Retry-After rest a key for
    /// non-decreasing, capped waits; a success resets to the base.
    #[test]
    fn pool_backoff_grows_capped_and_resets(refusals in 1usize..40, base_ms in 1u64..2_000, extra_ms in 0u64..60_000) {
        paused_runtime().block_on(async {
            let (base, max) = (Duration::from_millis(base_ms), Duration::from_millis(base_ms + extra_ms));
            let pool = KeyPool::builder(KeySet::parse("only").unwrap())
                .backoff(Backoff::default().base(base).max(max).jitter(false))
                .build();
            let refuse = |pool: &KeyPool| {
                let lease = pool.try_reserve().expect("the key is back");
                lease.record(Outcome::RateLimited { retry_after: None });
                pool.snapshot()[0].cooling_down_for.expect("cooling")
            };
            let mut previous = Duration::ZERO;
            for _ in 0..refusals {
                let wait = refuse(&pool);
                prop_assert!(wait >= previous && wait <= max, "{:?} after {:?}", wait, previous);
                previous = wait;
                tokio::time::advance(wait).await;
            }
            pool.try_reserve().unwrap().record(Outcome::Success);
            prop_assert_eq!(refuse(&pool), base);
            Ok(())
        })?;
    }
}
