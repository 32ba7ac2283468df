//! The demo's workload, smaller, through the real `demo` example binary (which `cargo test`
//! builds), read back from its `--json` summary.
//!
//! What the README's first command promises, checked here:
//! - callers behind the layer (the library's `RetryLayer` over `KeyRotationLayer`, default
//!   wait budget) never see a 429, while a naive client does;
//! - an uncapped key learns the provider's concurrency from the first burst of refusals,
//!   and is not refused for concurrency after it; callers wait instead; refusals for the
//!   rate window, which carry OpenAI's rate-limit headers, do not lower it;
//! - three keys finish the work in a fraction of the latency rounds one key needs;
//! - the provider's per-key limits are never exceeded, and capping each key at the
//!   provider's concurrency means the provider never has to refuse for concurrency;
//! - with quotas and caps set to the provider's limits (case 5), it never refuses at all.
//!
//! Speed is compared in *rounds*: the longest chain of completions the mock provider ran
//! back to back. One key with a concurrency of 2 cannot need fewer than `requests / 2`
//! rounds, whatever the machine does; three keys need about a third of that. A slow,
//! loaded machine stretches every round alike, so the comparison does not depend on it.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use serde_json::Value;

const ARTICLES: u64 = 3;
const SECTIONS: u64 = 4;
const REQUESTS: u64 = ARTICLES * SECTIONS;
const CONCURRENCY: u64 = 2;
const RATE: u64 = 6;
const LATENCY_MS: u64 = 200;

/// The demo with these flags takes about 3 s; this bounds it on any machine.
const DEMO_DEADLINE: Duration = Duration::from_secs(180);

/// The demo's binary (cargo builds it before the tests).
fn demo_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_demo"))
}

/// Runs the demo with `args` and returns its stdout, or panics with its stderr. Never
/// waits longer than [`DEMO_DEADLINE`].
fn run_demo(args: &[&str]) -> String {
    let mut child = Command::new(demo_binary())
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the demo starts");
    let stdout = read_in_background(&mut child, true);
    let stderr = read_in_background(&mut child, false);
    // The demo holds stdout open until it exits: its end is the signal.
    let out = match stdout.recv_timeout(DEMO_DEADLINE) {
        Ok(out) => out,
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the demo did not finish within {DEMO_DEADLINE:?}");
        }
    };
    let status = child.wait().expect("the demo's exit status");
    let err = stderr
        .recv_timeout(DEMO_DEADLINE)
        .unwrap_or_else(|_| "(stderr not closed)".to_owned());
    assert!(status.success(), "demo {args:?} failed ({status}):\n{err}");
    out
}

fn read_in_background(child: &mut Child, stdout: bool) -> mpsc::Receiver<String> {
    let mut pipe: Box<dyn Read + Send> = if stdout {
        Box::new(child.stdout.take().expect("piped stdout"))
    } else {
        Box::new(child.stderr.take().expect("piped stderr"))
    };
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut text = String::new();
        let _ = pipe.read_to_string(&mut text);
        let _ = tx.send(text);
    });
    rx
}

/// The demo's JSON summary, run once for every test of this file.
fn summary() -> &'static Value {
    static SUMMARY: OnceLock<Value> = OnceLock::new();
    SUMMARY.get_or_init(|| {
        let articles = ARTICLES.to_string();
        let sections = SECTIONS.to_string();
        let concurrency = CONCURRENCY.to_string();
        let rate = RATE.to_string();
        let latency = LATENCY_MS.to_string();
        let out = run_demo(&[
            "--json",
            "--articles",
            &articles,
            "--sections",
            &sections,
            "--keys",
            "3",
            "--concurrency",
            &concurrency,
            "--rate",
            &rate,
            "--window-ms",
            "1000",
            "--latency-ms",
            &latency,
        ]);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}):\n{out}"))
    })
}

/// The summary of case `n` (1 to 5).
fn case(n: u64) -> &'static Value {
    summary()["cases"]
        .as_array()
        .expect("a list of cases")
        .iter()
        .find(|c| c["case"] == n)
        .unwrap_or_else(|| panic!("case {n} in {:#}", summary()))
}

fn uint(value: &Value, field: &str) -> u64 {
    value[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} in {value:#}"))
}

fn uints(value: &Value, field: &str) -> Vec<u64> {
    value[field]
        .as_array()
        .unwrap_or_else(|| panic!("{field} in {value:#}"))
        .iter()
        .map(|v| v.as_u64().expect("a count"))
        .collect()
}

#[test]
fn callers_through_the_layer_never_see_a_429() {
    // Without the layer the provider's refusals reach the callers: the problem is real.
    let naive = case(1);
    assert!(uint(naive, "caller_429") > 0, "{naive:#}");
    assert_eq!(
        uint(naive, "caller_429"),
        uint(naive, "upstream_429"),
        "{naive:#}"
    );

    for n in [2, 3, 4, 5] {
        let c = case(n);
        assert_eq!(uint(c, "caller_429"), 0, "case {n}: {c:#}");
        assert_eq!(uint(c, "caller_errors"), 0, "case {n}: {c:#}");
        assert_eq!(uint(c, "sections_ok"), REQUESTS, "case {n}: {c:#}");
        // Every request the pool counted reached the provider, and no key is left in flight.
        assert_eq!(
            uints(c, "pool_requests_per_key"),
            uints(c, "upstream_requests_per_key"),
            "case {n}: {c:#}"
        );
        assert!(
            uints(c, "pool_in_flight_after")
                .iter()
                .all(|&in_flight| in_flight == 0),
            "case {n}: {c:#}"
        );
    }
    // One uncapped key bounced off the provider, and the layer turned that into waiting:
    // the refused sections went again (the library's `Attempts` on their answers says so),
    // and the last ones waited for the key through several latency rounds.
    let one = case(2);
    assert!(uint(one, "upstream_429") > 0, "{one:#}");
    assert!(uint(one, "caller_retried") > 0, "{one:#}");
    let waited = one["caller_waited_max_ms"]
        .as_f64()
        .expect("caller_waited_max_ms");
    assert!(waited > (2 * LATENCY_MS) as f64, "{one:#}");
}

#[test]
fn an_uncapped_key_learns_the_providers_concurrency_from_the_first_burst() {
    let limits = |c: &Value| -> Vec<Option<u64>> {
        c["pool_concurrency_limit_per_key"]
            .as_array()
            .unwrap_or_else(|| panic!("pool_concurrency_limit_per_key in {c:#}"))
            .iter()
            .map(Value::as_u64)
            .collect()
    };
    // One key, no cap: the burst of refusals taught the pool the provider's limit. The
    // provider's refusals for its rate window say so in their rate-limit headers
    // (`x-ratelimit-remaining-requests: 0`), as OpenAI's do, so they teach nothing: the
    // limit stays at the provider's concurrency however many of them come back while
    // another request runs.
    let one = case(2);
    let learned = limits(one);
    assert_eq!(learned, [Some(CONCURRENCY)], "{one:#}");
    // Once learned, the key is not sent more than it takes at once: every refusal for
    // concurrency came in the first burst, when all the sections arrived together.
    assert!(
        uint(one, "upstream_429_concurrency") <= REQUESTS - CONCURRENCY,
        "{one:#}"
    );
    // Three keys, no cap: the keys that were refused learned the same.
    let three = case(3);
    let learned = limits(three);
    assert!(learned.iter().any(Option::is_some), "{three:#}");
    assert!(
        learned.iter().flatten().all(|&limit| limit == CONCURRENCY),
        "{three:#}"
    );
}

#[test]
fn three_keys_finish_in_a_fraction_of_the_rounds_of_one() {
    let one = case(2);
    let rounds_one = uint(one, "rounds");
    // The provider runs at most CONCURRENCY completions at once on the one key.
    assert!(rounds_one >= REQUESTS / CONCURRENCY, "{one:#}");
    for n in [3, 4] {
        let three = case(n);
        assert_eq!(uint(three, "keys"), 3);
        let rounds_three = uint(three, "rounds");
        // Ideally a third; at most half, so a stalled round on a loaded machine passes.
        assert!(
            rounds_three * 2 <= rounds_one,
            "case {n} took {rounds_three} rounds, one key {rounds_one}:\n{three:#}\n{one:#}"
        );
        let wall = |c: &Value| c["wall_ms"].as_f64().expect("wall_ms");
        assert!(wall(three) < wall(one), "{three:#}\n{one:#}");
    }
}

#[test]
fn the_provider_limits_hold_for_every_key() {
    for n in [1, 2, 3, 4, 5] {
        let c = case(n);
        for (key, &max) in uints(c, "upstream_max_concurrent_per_key")
            .iter()
            .enumerate()
        {
            assert!(max <= CONCURRENCY, "case {n} key {}: {c:#}", key + 1);
        }
        for (key, &max) in uints(c, "upstream_max_in_flight_counted_per_key")
            .iter()
            .enumerate()
        {
            assert!(max <= CONCURRENCY, "case {n} key {}: {c:#}", key + 1);
        }
        for (key, &max) in uints(c, "upstream_max_in_window_per_key")
            .iter()
            .enumerate()
        {
            assert!(max <= RATE, "case {n} key {}: {c:#}", key + 1);
        }
    }
    // Capped at the provider's concurrency, the layer never sends a key more than it takes:
    // callers beyond the cap wait for a slot, and nothing is sent twice.
    let capped = case(4);
    assert_eq!(uint(capped, "upstream_429_concurrency"), 0, "{capped:#}");
    assert_eq!(uint(capped, "upstream_429_rate"), 0, "{capped:#}");
    assert_eq!(uint(capped, "caller_retried"), 0, "{capped:#}");
    let waited = capped["caller_waited_max_ms"]
        .as_f64()
        .expect("caller_waited_max_ms");
    assert!(waited > (LATENCY_MS / 2) as f64, "{capped:#}");
}

#[test]
fn quotas_set_to_the_providers_limits_draw_no_429_at_all() {
    let quota = case(5);
    assert_eq!(uint(quota, "keys"), 3);
    assert_eq!(uint(quota, "sections_ok"), REQUESTS, "{quota:#}");
    // Not one request the provider refused, for concurrency or for the rate window, and so
    // not one the layer had to wait out or resend.
    assert_eq!(uint(quota, "upstream_429"), 0, "{quota:#}");
    assert_eq!(
        uints(quota, "pool_rate_limited_per_key"),
        [0, 0, 0],
        "{quota:#}"
    );
    let sent: u64 = uints(quota, "upstream_requests_per_key").iter().sum();
    assert_eq!(sent, REQUESTS, "each section sent once: {quota:#}");
}

#[test]
fn help_explains_the_flags() {
    let help = run_demo(&["--help"]);
    for flag in [
        "--sections",
        "--articles",
        "--keys",
        "--latency-ms",
        "--concurrency",
        "--rate",
        "--window-ms",
        "--json",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help:\n{help}");
    }
}
