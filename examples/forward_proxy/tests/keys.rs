//! The forward proxy's key file, hot reload and provider profiles, run as a real process
//! against a mock upstream on 127.0.0.1.
//!
//! Reloads are observed through the proxy's log (a line per reload) and its admin route,
//! never by sleeping: each wait is bounded by [`WAIT`]. Every test ends by checking that no
//! key value reached the log, the admin routes or the client.

mod support;

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::*;
use tokio::time::Instant;

const ALPHA: &str = "sk-alpha-key-0a1b";
const BRAVO: &str = "sk-bravo-key-2c3d";
const CHARLIE: &str = "sk-charlie-key-4e5f";
const INLINE: &str = "sk-inline-key-6a7b";
const SECRETS: [&str; 4] = [ALPHA, BRAVO, CHARLIE, INLINE];

async fn ok_upstream() -> MockUpstream {
    MockUpstream::start(|_| async { reply(200, "{\"ok\":true}") }).await
}

/// A proxy reading `keys.toml` in `dir` (its working directory), with `env` set and no
/// `BIGMODEL_API_KEY`.
fn with_key_file(upstream: &MockUpstream, dir: &Path, env: &[(&str, &str)]) -> ProxyConfig {
    let mut config = ProxyConfig::new(&upstream.url(""), "").arg("--keys-file", "keys.toml");
    config.env = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    config.dir = Some(dir.to_owned());
    config
}

/// Replaces `dir/name` in one step (write a temporary file, rename it over), as editors
/// and configuration tools do, so the proxy never reads half a file.
fn write_atomically(dir: &Path, name: &str, text: &str) {
    let temporary: PathBuf = dir.join(format!(".{name}.tmp"));
    std::fs::write(&temporary, text).unwrap();
    std::fs::rename(&temporary, dir.join(name)).unwrap();
}

/// `[[key]]` tables taking each value from the environment variable of the same name.
fn env_keys(names: &[&str]) -> String {
    names
        .iter()
        .map(|name| {
            format!(
                "[[key]]\nname = \"{name}\"\nenv = \"{}\"\n\n",
                name.to_uppercase()
            )
        })
        .collect()
}

const KEY_ENV: [(&str, &str); 3] = [("ALPHA", ALPHA), ("BRAVO", BRAVO), ("CHARLIE", CHARLIE)];

fn names_seen(upstream: &MockUpstream) -> Vec<&'static str> {
    upstream
        .keys_seen()
        .iter()
        .map(|key| match key.as_str() {
            ALPHA => "alpha",
            BRAVO => "bravo",
            CHARLIE => "charlie",
            INLINE => "inline",
            _ => "?",
        })
        .collect()
}

fn count(seen: &[&str], name: &str) -> usize {
    seen.iter().filter(|s| **s == name).count()
}

/// Asserts no key value in the proxy's log, its admin routes, or `extra` texts.
async fn assert_nothing_leaked(proxy: &Proxy, extra: &[String]) {
    proxy.assert_log_has_no_secret(&SECRETS);
    for route in ["/_keyrotation/keys", "/_keyrotation/metrics"] {
        let got = get(&proxy.url(route)).await;
        assert_no_secret(route, &got.text(), &SECRETS);
    }
    for text in extra {
        assert_no_secret("a response", text, &SECRETS);
    }
}

#[tokio::test]
async fn a_key_file_names_and_weights_the_keys() {
    let upstream = ok_upstream().await;
    let dir = empty_dir();
    std::fs::create_dir(dir.join("secrets")).unwrap();
    std::fs::write(dir.join("secrets/bravo.key"), format!("{BRAVO}\n")).unwrap();
    std::fs::write(
        dir.join("keys.toml"),
        format!(
            "# three tiers\n\
             [[key]]\nname = \"alpha\"\nenv = \"ALPHA\"\nweight = 3\naccount = \"acme\"\nmax_in_flight = 4\n\n\
             [[key]]\nname = \"bravo\"\nfile = \"secrets/bravo.key\"\naccount = \"acme\"\n\n\
             [[key]]\nname = \"inline\"\nvalue = \"{INLINE}\"\n"
        ),
    )
    .unwrap();
    let mut proxy = with_key_file(&upstream, &dir, &[("ALPHA", ALPHA)])
        .start()
        .await;
    proxy
        .wait_for_log("Loaded 3 API key(s) from keys.toml: 1 (alpha), 2 (bravo), 3 (inline)")
        .await;
    proxy
        .wait_for_log("key \"inline\" is written in the key file itself")
        .await;

    let mut texts = Vec::new();
    for _ in 0..10 {
        let got = get(&proxy.url("/v4/models")).await;
        assert_eq!(got.status, 200);
        texts.push(got.text());
    }
    // Smooth weighted round-robin: 3 : 1 : 1, interleaved rather than in runs.
    let seen = names_seen(&upstream);
    assert_eq!(
        seen,
        [
            "alpha", "bravo", "alpha", "inline", "alpha", "alpha", "bravo", "alpha", "inline",
            "alpha"
        ]
    );

    let keys = keys(&proxy).await;
    let field = |name: &str| keys.iter().map(|k| k[name].clone()).collect::<Vec<_>>();
    assert_eq!(field("name"), ["alpha", "bravo", "inline"]);
    assert_eq!(field("weight"), [3, 1, 1]);
    assert_eq!(
        field("account"),
        [
            serde_json::json!("acme"),
            serde_json::json!("acme"),
            serde_json::Value::Null
        ]
    );
    assert_eq!(field("requests"), [6, 2, 2]);
    for key in &keys {
        assert_eq!(key["quota_wait_ms"], 0);
        assert_eq!(key["probing"], false);
    }
    let metrics = get(&proxy.url("/_keyrotation/metrics")).await.body;
    for line in [
        "keyrotation_key_requests_total{key=\"1\",name=\"alpha\",account=\"acme\"} 6",
        "keyrotation_key_requests_total{key=\"3\",name=\"inline\",account=\"\"} 2",
        "keyrotation_key_weight{key=\"1\",name=\"alpha\",account=\"acme\"} 3",
        "keyrotation_keys 3",
    ] {
        assert!(metrics.contains(line), "{line} missing in:\n{metrics}");
    }
    assert_nothing_leaked(&proxy, &texts).await;
}

/// A provider that refuses (429) a key's request when that key already had `limit`
/// requests accepted in the last `window`, as a requests-per-minute limit does.
async fn rate_limited_upstream(
    limit: usize,
    window: Duration,
) -> (MockUpstream, Arc<Mutex<usize>>) {
    let accepted: Arc<Mutex<HashMap<String, VecDeque<Instant>>>> = Arc::default();
    let refused = Arc::new(Mutex::new(0));
    let upstream = MockUpstream::start({
        let refused = refused.clone();
        move |seen: Seen| {
            let key = seen.bearer().unwrap_or_default();
            let now = Instant::now();
            let allowed = {
                let mut accepted = accepted.lock().unwrap();
                let times = accepted.entry(key).or_default();
                while times.front().is_some_and(|&t| now - t >= window) {
                    times.pop_front();
                }
                let allowed = times.len() < limit;
                if allowed {
                    times.push_back(now);
                }
                allowed
            };
            if !allowed {
                *refused.lock().unwrap() += 1;
            }
            async move {
                if allowed {
                    reply(200, "{}")
                } else {
                    reply(429, "{\"error\":\"rate limited\"}")
                }
            }
        }
    })
    .await;
    (upstream, refused)
}

#[tokio::test]
async fn rpm_quotas_keep_every_key_under_the_providers_limit() {
    // 600 requests per minute is one every 100 ms. The provider allows 10 per 950 ms: the
    // same rate, with 5% slack for timers on a loaded machine.
    let (upstream, refused) = rate_limited_upstream(10, Duration::from_millis(950)).await;
    let dir = empty_dir();
    // alpha's quota comes from the file; bravo's from --rpm-per-key.
    std::fs::write(
        dir.join("keys.toml"),
        "[[key]]\nname = \"alpha\"\nenv = \"ALPHA\"\nrpm = 600\n\n\
         [[key]]\nname = \"bravo\"\nenv = \"BRAVO\"\n",
    )
    .unwrap();
    let proxy = with_key_file(&upstream, &dir, &KEY_ENV)
        .arg("--rpm-per-key", "600")
        .start()
        .await;

    // 30 requests at once: 15 per key, more than one window's worth. Without the quotas
    // the provider would refuse at least 5 per key.
    let started = Instant::now();
    let requests: Vec<_> = (0..30)
        .map(|_| {
            let url = proxy.url("/chat/completions");
            tokio::spawn(async move { post(&url, "{}").await })
        })
        .collect();
    for request in requests {
        let got = within("a request", request).await.unwrap();
        assert_eq!(got.status, 200, "{}", got.body);
    }
    let elapsed = started.elapsed();
    assert_eq!(*refused.lock().unwrap(), 0, "the provider refused requests");
    let seen = names_seen(&upstream);
    assert_eq!((count(&seen, "alpha"), count(&seen, "bravo")), (15, 15));
    // 15 requests on a key spaced 100 ms apart take at least 1.4 s.
    assert!(elapsed >= Duration::from_millis(1300), "{elapsed:?}");
    for key in keys(&proxy).await {
        assert_eq!(key["rate_limited"], 0);
    }
    assert_nothing_leaked(&proxy, &[]).await;
}

#[tokio::test]
async fn sighup_reloads_the_key_file_by_position_and_name() {
    let upstream = ok_upstream().await;
    let dir = empty_dir();
    std::fs::write(dir.join("keys.toml"), env_keys(&["alpha", "bravo"])).unwrap();
    // No polling: only the signal can reload.
    let mut proxy = with_key_file(&upstream, &dir, &KEY_ENV)
        .arg("--keys-file-poll", "0")
        .start()
        .await;
    for _ in 0..2 {
        assert_eq!(get(&proxy.url("/x")).await.status, 200);
    }
    assert_eq!(names_seen(&upstream), ["alpha", "bravo"]);

    write_atomically(&dir, "keys.toml", &env_keys(&["bravo", "charlie"]));
    proxy.signal("HUP").await;
    let line = proxy
        .wait_for_log("Reloaded keys from keys.toml (SIGHUP)")
        .await;
    assert!(
        line.contains("2 key(s); 1 unchanged; added: key 2 (charlie); removed: key 1 (alpha)"),
        "{line}"
    );

    for _ in 0..4 {
        assert_eq!(get(&proxy.url("/x")).await.status, 200);
    }
    let after = &names_seen(&upstream)[2..];
    assert_eq!(count(after, "alpha"), 0, "a removed key takes no request");
    assert_eq!(count(after, "charlie"), 2, "the new key takes its share");
    let keys = keys(&proxy).await;
    assert_eq!(keys.len(), 2);
    assert_eq!(keys[0]["name"], "bravo");
    assert_eq!(
        keys[0]["requests"], 3,
        "an unchanged key keeps its counters"
    );
    assert_eq!(keys[1]["name"], "charlie");
    assert_eq!(keys[1]["requests"], 2);
    assert_nothing_leaked(&proxy, &[]).await;
}

#[tokio::test]
async fn a_changed_key_file_is_reloaded_and_a_bad_one_keeps_the_keys_in_force() {
    let upstream = ok_upstream().await;
    let dir = empty_dir();
    std::fs::write(dir.join("keys.toml"), env_keys(&["alpha", "bravo"])).unwrap();
    let mut proxy = with_key_file(&upstream, &dir, &KEY_ENV).start().await;

    write_atomically(&dir, "keys.toml", &env_keys(&["alpha", "bravo", "charlie"]));
    let line = proxy
        .wait_for_log("Reloaded keys from keys.toml (key file changed)")
        .await;
    assert!(
        line.contains("2 unchanged; added: key 3 (charlie)"),
        "{line}"
    );

    // A broken file, with a key written in it: the reload fails, without quoting it.
    write_atomically(
        &dir,
        "keys.toml",
        &format!("[[key]]\nname = \"inline\"\nvalue = \"{INLINE}\nweight = 2\n"),
    );
    let line = proxy.wait_for_log("Reload failed (key file changed)").await;
    assert!(line.contains("the 3 key(s) in force stay"), "{line}");
    assert!(line.contains("--keys-file keys.toml: line 3:"), "{line}");

    // A well-formed file naming an unset variable: also refused, by key and name.
    write_atomically(&dir, "keys.toml", &env_keys(&["alpha", "delta"]));
    let line = proxy
        .wait_for_nth_log("Reload failed (key file changed)", 2)
        .await;
    assert!(
        line.contains("key 2 of 2 (delta): environment variable DELTA is not set"),
        "{line}"
    );

    for _ in 0..3 {
        assert_eq!(get(&proxy.url("/x")).await.status, 200);
    }
    assert_eq!(names_seen(&upstream), ["alpha", "bravo", "charlie"]);
    let metrics = get(&proxy.url("/_keyrotation/metrics")).await.body;
    for line in [
        "keyrotation_key_reloads_total{result=\"ok\"} 1",
        "keyrotation_key_reloads_total{result=\"failed\"} 2",
    ] {
        assert!(metrics.contains(line), "{line} missing in:\n{metrics}");
    }
    assert_nothing_leaked(&proxy, &[]).await;
}

#[tokio::test]
async fn the_text_access_log_names_the_key_when_it_has_a_name() {
    let upstream = ok_upstream().await;
    let dir = empty_dir();
    std::fs::write(dir.join("keys.toml"), env_keys(&["alpha", "bravo"])).unwrap();
    let mut proxy = with_key_file(&upstream, &dir, &KEY_ENV).start().await;
    for _ in 0..2 {
        assert_eq!(get(&proxy.url("/x")).await.status, 200);
    }
    proxy
        .wait_for_log("Using key 1/2 (alpha): GET /x -> 200 in ")
        .await;
    proxy
        .wait_for_log("Using key 2/2 (bravo): GET /x -> 200 in ")
        .await;
    assert_nothing_leaked(&proxy, &[]).await;

    // Keys from a list have no name: the position alone.
    let mut plain = ProxyConfig::new(&upstream.url(""), &format!("{ALPHA},{BRAVO}"))
        .start()
        .await;
    assert_eq!(get(&plain.url("/y")).await.status, 200);
    plain.wait_for_log("Using key 1/2: GET /y -> 200 in ").await;
    assert_nothing_leaked(&plain, &[]).await;
}

#[tokio::test]
async fn a_key_file_edit_then_sighup_reloads_once_and_logs_once() {
    let upstream = ok_upstream().await;
    let dir = empty_dir();
    std::fs::write(dir.join("keys.toml"), env_keys(&["alpha"])).unwrap();
    let mut proxy = with_key_file(&upstream, &dir, &KEY_ENV)
        .arg("--keys-file-poll", "0.05")
        .start()
        .await;

    // As README suggests: edit, then SIGHUP (the poller may see the edit first, or not).
    write_atomically(&dir, "keys.toml", &env_keys(&["alpha", "bravo"]));
    proxy.signal("HUP").await;
    let first = proxy.wait_for_log("Reloaded keys from keys.toml").await;
    assert!(
        first.contains("1 unchanged; added: key 2 (bravo)"),
        "{first}"
    );

    // The next edit's reload is the second line: a second reload of the first edit, or
    // the first one logged twice, would have come before it (the poller looks every
    // 50 ms and found the first edit within one look), and would not name key 1 removed.
    write_atomically(&dir, "keys.toml", &env_keys(&["bravo"]));
    let line = proxy
        .wait_for_nth_log("Reloaded keys from keys.toml", 2)
        .await;
    assert!(line.contains("removed: key 1 (alpha)"), "{line}");
    let log = proxy.log();
    assert_eq!(log.matches("added: key 2 (bravo)").count(), 1, "{log}");
    assert_eq!(log.matches("removed: key 1 (alpha)").count(), 1, "{log}");
    assert_nothing_leaked(&proxy, &[]).await;
}

#[tokio::test]
async fn sighup_rereads_dotenv_but_cannot_see_the_environment_change() {
    let upstream = ok_upstream().await;
    let dir = empty_dir();
    std::fs::write(dir.join(".env"), format!("MY_KEYS={ALPHA},{BRAVO}\n")).unwrap();
    let mut config = ProxyConfig::new(&upstream.url(""), "").arg("--keys-env", "MY_KEYS");
    config.env.clear();
    config.dir = Some(dir.clone());
    let mut proxy = config.start().await;
    proxy
        .wait_for_log("Loaded 2 API key(s) from MY_KEYS in .env")
        .await;

    write_atomically(
        &dir,
        ".env",
        &format!("MY_KEYS={ALPHA},{BRAVO},{CHARLIE}\n"),
    );
    proxy.signal("HUP").await;
    let line = proxy
        .wait_for_log("Reloaded keys from MY_KEYS in .env (SIGHUP)")
        .await;
    assert!(line.contains("2 unchanged; added: key 3"), "{line}");
    for _ in 0..3 {
        get(&proxy.url("/x")).await;
    }
    assert_eq!(names_seen(&upstream), ["alpha", "bravo", "charlie"]);
    assert_nothing_leaked(&proxy, &[]).await;

    // Keys in the process environment: a reload cannot see them change, and says so.
    let mut plain = ProxyConfig::new(&upstream.url(""), &format!("{ALPHA},{BRAVO}"))
        .start()
        .await;
    plain.signal("HUP").await;
    plain
        .wait_for_log("SIGHUP: nothing to reload: the keys come from the environment variable BIGMODEL_API_KEY")
        .await;
    assert_eq!(get(&plain.url("/_keyrotation/health")).await.status, 200);
    assert_nothing_leaked(&plain, &[]).await;
}

/// A BigModel-like provider: key 1 answers its first request with `code`, then 200.
async fn bigmodel_upstream(code: &'static str) -> MockUpstream {
    let answered = Arc::new(Mutex::new(false));
    MockUpstream::start(move |seen: Seen| {
        let first = seen.bearer().as_deref() == Some(ALPHA)
            && !std::mem::replace(&mut *answered.lock().unwrap(), true);
        async move {
            if first {
                reply(
                    429,
                    &format!("{{\"error\":{{\"code\":\"{code}\",\"message\":\"busy\"}}}}"),
                )
            } else {
                reply(200, "{}")
            }
        }
    })
    .await
}

#[tokio::test]
async fn with_the_bigmodel_profile_platform_overload_does_not_rest_the_key() {
    let keys_list = format!("{ALPHA},{BRAVO},{CHARLIE}");
    let upstream = bigmodel_upstream("1305").await;
    let proxy = ProxyConfig::new(&upstream.url(""), &keys_list)
        .arg("--profile", "bigmodel")
        .start()
        .await;
    // 1305: the platform is overloaded. Not the key's fault, and no other key would do
    // better, so the 429 goes back to the client unretried and key 1 stays in rotation.
    let got = post(&proxy.url("/chat/completions"), "{}").await;
    assert_eq!(got.status, 429);
    assert!(
        got.body.contains("1305"),
        "the body reaches the client whole"
    );
    let stats = keys(&proxy).await;
    assert_eq!(stats[0]["rate_limited"], 0);
    assert_eq!(stats[0]["failures"], 1);
    assert_eq!(stats[0]["cooling_down_ms"], 0);
    for _ in 0..3 {
        assert_eq!(get(&proxy.url("/x")).await.status, 200);
    }
    assert_eq!(
        names_seen(&upstream),
        ["alpha", "bravo", "charlie", "alpha"]
    );
    assert_nothing_leaked(&proxy, &[got.text()]).await;

    // The generic profile reads only the status: key 1 rests, and the request is resent.
    let upstream = bigmodel_upstream("1305").await;
    let generic = ProxyConfig::new(&upstream.url(""), &keys_list)
        .start()
        .await;
    assert_eq!(
        post(&generic.url("/chat/completions"), "{}").await.status,
        200
    );
    assert_eq!(names_seen(&upstream), ["alpha", "bravo"]);
    let keys = keys(&generic).await;
    assert_eq!(keys[0]["rate_limited"], 1);
    assert_ne!(keys[0]["cooling_down_ms"], 0);
}

#[tokio::test]
async fn a_spent_quota_is_not_retried_and_suspends_the_key_until_a_probe() {
    let upstream = bigmodel_upstream("1113").await;
    let proxy = ProxyConfig::new(&upstream.url(""), &format!("{ALPHA},{BRAVO}"))
        .arg("--profile", "bigmodel")
        .start()
        .await;
    // 1113: the account is in arrears. The client must hear it; another key will not help.
    let got = post(&proxy.url("/chat/completions"), "{}").await;
    assert_eq!(got.status, 429);
    assert_eq!(names_seen(&upstream), ["alpha"], "not retried");
    let keys = keys(&proxy).await;
    assert_eq!(keys[0]["probing"], true);
    let resting = keys[0]["cooling_down_ms"].as_u64().unwrap();
    assert!(
        resting > 3_000_000,
        "suspended for about an hour: {resting}"
    );
    for _ in 0..2 {
        assert_eq!(get(&proxy.url("/x")).await.status, 200);
    }
    assert_eq!(names_seen(&upstream), ["alpha", "bravo", "bravo"]);
    assert_nothing_leaked(&proxy, &[got.text()]).await;
}

#[tokio::test]
async fn bad_key_files_stop_the_proxy_with_one_line_naming_file_key_and_problem() {
    let dir = empty_dir();
    let cases: [(&str, String, &str); 11] = [
        ("missing.toml", String::new(), "--keys-file missing.toml: "),
        ("empty.toml", "# nothing\n".into(), "lists no key"),
        (
            "syntax.toml",
            format!("[[key]]\nname = \"a\"\nvalue = \"{INLINE}\n"),
            "syntax.toml: line 3:",
        ),
        (
            "single-bracket.toml",
            "[key]\nname = \"a\"\nenv = \"ALPHA\"\n".into(),
            "line 1: `[key]` is a single table: write `[[key]]`, with double brackets",
        ),
        (
            "unknown.toml",
            format!("[[key]]\nname = \"a\"\nvalu = \"{INLINE}\"\n"),
            "line 3: unknown field `valu`",
        ),
        (
            "wrong-type.toml",
            format!("[[key]]\nname = \"a\"\nenv = \"ALPHA\"\nweight = \"{INLINE}\"\n"),
            "line 4: invalid type: string \"<redacted>\", expected u32",
        ),
        (
            "unset.toml",
            env_keys(&["alpha", "zulu"]),
            "key 2 of 2 (zulu): environment variable ZULU is not set",
        ),
        (
            "two-values.toml",
            "[[key]]\nname = \"a\"\nenv = \"ALPHA\"\nfile = \"a.key\"\n".into(),
            "key 1 of 1 (a): more than one of env, file and value",
        ),
        (
            "zero.toml",
            "[[key]]\nname = \"a\"\nenv = \"ALPHA\"\nrpm = 0\n".into(),
            "key 1 of 1 (a): rpm must be at least 1",
        ),
        (
            "zero-model.toml",
            "[[key]]\nname = \"a\"\nenv = \"ALPHA\"\n[key.models.\"glm-4-plus\"]\nmax_in_flight = 0\n"
                .into(),
            "key 1 of 1 (a): models.\"glm-4-plus\".max_in_flight must be at least 1",
        ),
        (
            "same-name.toml",
            "[[key]]\nname = \"a\"\nenv = \"ALPHA\"\n\n[[key]]\nname = \"a\"\nenv = \"BRAVO\"\n"
                .into(),
            "key 2 of 2 repeats key 1",
        ),
    ];
    for (file, text, expected) in cases {
        if !text.is_empty() {
            std::fs::write(dir.join(file), text).unwrap();
        }
        let mut config = ProxyConfig::new("http://127.0.0.1:9", ALPHA).arg("--keys-file", file);
        config.env.extend(
            [("ALPHA", ALPHA), ("BRAVO", BRAVO)].map(|(k, v)| (k.to_owned(), v.to_owned())),
        );
        config.dir = Some(dir.clone());
        let (status, stdout, stderr) = config.run_to_exit().await;
        assert!(!status.success(), "{file} should fail");
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        assert!(stderr.starts_with("forward_proxy: error: "), "{stderr}");
        assert!(stderr.contains(expected), "{expected:?} not in {stderr}");
        assert_no_secret(file, &format!("{stdout}{stderr}"), &SECRETS);
    }
}

#[tokio::test]
async fn learned_limits_rest_a_key_before_it_is_refused_and_a_503_with_retry_after_is_resent() {
    let upstream = MockUpstream::start(|seen: Seen| async move {
        let mut response = reply(200, "{}");
        match (seen.bearer().as_deref(), seen.target.as_str()) {
            // An answer that uses up key 1's window: OpenAI's headers say so.
            (Some(ALPHA), "/first") => {
                let headers = response.headers_mut();
                headers.insert("x-ratelimit-remaining-requests", "0".parse().unwrap());
                headers.insert("x-ratelimit-reset-requests", "1m0s".parse().unwrap());
            }
            // Key 2 is unavailable for a while, and says how long.
            (Some(BRAVO), _) => {
                response = reply(503, "{\"error\":\"busy\"}");
                response
                    .headers_mut()
                    .insert("retry-after", "40".parse().unwrap());
            }
            _ => {}
        }
        response
    })
    .await;
    let proxy = ProxyConfig::new(&upstream.url(""), &format!("{ALPHA},{BRAVO},{CHARLIE}"))
        .start()
        .await;

    // Key 1 answers, and its headers say it has no request left for a minute.
    assert_eq!(get(&proxy.url("/first")).await.status, 200);
    // Key 2 answers 503 + Retry-After: resent on key 3, which the client never notices.
    let got = post(&proxy.url("/second"), "{}").await;
    assert_eq!(got.status, 200, "{}", got.body);
    // Both rest: every request now goes to key 3, and none is refused on the way.
    for _ in 0..3 {
        assert_eq!(get(&proxy.url("/more")).await.status, 200);
    }
    assert_eq!(
        names_seen(&upstream),
        ["alpha", "bravo", "charlie", "charlie", "charlie", "charlie"]
    );
    let stats = keys(&proxy).await;
    let resting = |i: usize| stats[i]["cooling_down_ms"].as_u64().unwrap();
    assert!((50_000..=60_000).contains(&resting(0)), "{}", resting(0));
    assert_eq!(stats[0]["rate_limited"], 0, "rested before any refusal");
    assert!((30_000..=40_000).contains(&resting(1)), "{}", resting(1));
    assert_nothing_leaked(&proxy, &[got.text()]).await;
}

#[tokio::test]
async fn help_documents_the_key_file_reload_and_profiles() {
    let mut config = ProxyConfig::new("http://127.0.0.1:9", "");
    config.args = vec!["--help".into()];
    let (status, stdout, _) = config.run_to_exit().await;
    assert!(status.success());
    for text in [
        "--keys-file",
        "--keys-file-poll",
        "--profile",
        "bigmodel",
        "--rpm-per-key",
        "[[key]]",
        "SIGHUP",
        "share its limit",
    ] {
        assert!(
            stdout.contains(text),
            "{text} missing from --help:\n{stdout}"
        );
    }
}

#[tokio::test]
async fn a_key_removed_by_a_reload_finishes_its_stream_and_takes_nothing_new() {
    use http_body_util::BodyExt;

    let (chunks, body) = channel_body();
    let held = Mutex::new(Some(body));
    let upstream = MockUpstream::start(move |_| {
        // The first request streams until the test ends it; later ones answer at once.
        let body = held.lock().unwrap().take();
        async move { body.map_or_else(|| reply(200, "quick"), http::Response::new) }
    })
    .await;
    let dir = empty_dir();
    std::fs::write(dir.join("keys.toml"), env_keys(&["alpha", "bravo"])).unwrap();
    let mut proxy = with_key_file(&upstream, &dir, &KEY_ENV)
        .arg("--keys-file-poll", "0")
        .start()
        .await;

    // alpha carries a streaming answer.
    let response = within(
        "the stream's head",
        client().request(
            http::Request::get(proxy.url("/stream"))
                .body(http_body_util::Full::default())
                .unwrap(),
        ),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(names_seen(&upstream), ["alpha"]);

    write_atomically(&dir, "keys.toml", &env_keys(&["bravo"]));
    proxy.signal("HUP").await;
    let line = proxy
        .wait_for_log("Reloaded keys from keys.toml (SIGHUP)")
        .await;
    assert!(line.contains("removed: key 1 (alpha)"), "{line}");

    // The stream goes on to its end on the removed key...
    chunks.send(bytes::Bytes::from("still here")).unwrap();
    drop(chunks);
    let body = within("the rest of the stream", response.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(body, "still here");
    // ...and new requests go to the keys in force only.
    for _ in 0..3 {
        assert_eq!(get(&proxy.url("/x")).await.body, "quick");
    }
    assert_eq!(names_seen(&upstream), ["alpha", "bravo", "bravo", "bravo"]);
    assert_nothing_leaked(&proxy, &[]).await;
}
