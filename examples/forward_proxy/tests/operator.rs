//! The forward proxy as operators meet it: command line errors, `.env`, key
//! lists written wrong, TLS failures told in words, the JSON log, body size, host names
//! to listen on, the profile's keys variable, metrics checked by `promtool`, and a client
//! that goes away. Real processes on 127.0.0.1, as in `tests/proxy.rs`.

mod support;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const KEYS: [&str; 3] = ["sk-op-4a1b", "sk-op-7c2d", "sk-op-9e3f"];
const KEY_LIST: &str = "sk-op-4a1b,sk-op-7c2d,sk-op-9e3f";

async fn ok_upstream() -> MockUpstream {
    MockUpstream::start(|_| async { reply(200, "{\"ok\":true}") }).await
}

/// A proxy with no environment but `env`, run in a fresh directory holding `.env` (if any).
fn in_dir_with_dotenv(upstream: &str, dotenv: Option<&str>, env: &[(&str, &str)]) -> ProxyConfig {
    let dir = empty_dir();
    if let Some(text) = dotenv {
        std::fs::write(dir.join(".env"), text).unwrap();
    }
    let mut config = ProxyConfig::new(upstream, "");
    config.env = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    config.dir = Some(dir);
    config
}

// ---------------------------------------------------------------------------------------
// 1. Command line errors
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn command_line_errors_keep_clap_s_whole_message_and_exit_2() {
    let mut missing = ProxyConfig::new("http://127.0.0.1:9", KEY_LIST);
    missing.args = vec!["--listen".into(), "127.0.0.1:0".into()];
    let bad_strategy = ProxyConfig::new("http://127.0.0.1:9", KEY_LIST).arg("--strategy", "random");
    let bad_profile = ProxyConfig::new("http://127.0.0.1:9", KEY_LIST).arg("--profile", "gemma");
    let mut bad_listen = ProxyConfig::new("http://127.0.0.1:9", KEY_LIST);
    bad_listen.args[1] = "127.0.0.1".into();
    let cases = [
        (
            missing,
            vec!["required arguments were not provided", "--upstream <URL>"],
        ),
        (
            bad_strategy,
            vec![
                "'random'",
                "--strategy",
                "[possible values: round-robin, least-in-flight]",
            ],
        ),
        (
            bad_profile,
            vec![
                "'gemma'",
                "[possible values: generic, bigmodel, openai, anthropic, gemini]",
            ],
        ),
        (bad_listen, vec!["--listen", "expected HOST:PORT"]),
    ];
    for (config, expected) in cases {
        let (status, stdout, stderr) = config.run_to_exit().await;
        assert_eq!(status.code(), Some(2), "{:?}: {stderr}", config.args);
        assert!(stderr.starts_with("forward_proxy: error: "), "{stderr}");
        for text in expected {
            assert!(stderr.contains(text), "{text:?} not in:\n{stderr}");
        }
        assert_no_secret("the error", &format!("{stdout}{stderr}"), &KEYS);
    }
}

/// The proxy's output for `args` alone (no upstream, no keys): status, stdout, stderr.
async fn run_with(args: &[&str]) -> (std::process::ExitStatus, String, String) {
    let mut config = ProxyConfig::new("http://127.0.0.1:9", "");
    config.args = args.iter().map(|arg| (*arg).to_owned()).collect();
    config.run_to_exit().await
}

const HEADINGS: [&str; 8] = [
    "Options:",
    "Keys:",
    "Upstream:",
    "Limits and waiting:",
    "Prompt-cache affinity:",
    "Replicas:",
    "Admin and logs:",
    "Timeouts:",
];

#[tokio::test]
async fn short_help_puts_each_flag_on_one_line_under_a_heading() {
    let (status, short, _) = run_with(&["-h"]).await;
    assert!(status.success());
    let mut at = 0;
    for heading in HEADINGS {
        let found = short[at..].find(&format!("\n{heading}\n"));
        at += found.unwrap_or_else(|| panic!("{heading} missing, or out of order, in:\n{short}"));
    }
    let (_, long, _) = run_with(&["--help"]).await;
    let flags: Vec<&str> = long
        .lines()
        .filter_map(|line| line.trim_start().strip_prefix("--"))
        .filter_map(|rest| rest.split([' ', ',']).next())
        .collect();
    assert!(flags.len() >= 30, "{flags:?}");
    for flag in &flags {
        // `--flag <VALUE>  Summary`: the summary on the flag's own line.
        let lines: Vec<&str> = short
            .lines()
            .filter(|line| {
                let spec = line.trim_start().trim_start_matches("-h, ");
                spec.starts_with(&format!("--{flag} ")) || spec == format!("--{flag}")
            })
            .collect();
        assert_eq!(lines.len(), 1, "--{flag} in -h:\n{short}");
        let words = lines[0].split("  ").filter(|part| !part.trim().is_empty());
        assert!(
            words.count() >= 2,
            "no summary beside --{flag}: {:?}",
            lines[0]
        );
    }
    for line in short.lines() {
        assert!(line.len() <= 100, "{line:?} is wider than 100 columns");
        // An option's line, a heading, or the text before and after the options: never a
        // flag's help wrapped onto a line of its own.
        assert!(
            !line.starts_with("        "),
            "{line:?} continues a flag's help"
        );
    }
    assert!(short.lines().count() < 70, "{short}");
    assert!(
        long.lines().count() > 2 * short.lines().count(),
        "--help is the long one"
    );
}

#[tokio::test]
async fn long_help_says_header_read_timeout_closes_idle_http2_connections_too() {
    let (_, long, _) = run_with(&["--help"]).await;
    let section = long
        .split("--header-read-timeout")
        .nth(1)
        .and_then(|rest| rest.split("\n      --").next())
        .unwrap();
    assert!(section.contains("HTTP/2"), "{section}");
    assert!(section.contains("slowloris"), "{section}");
    let (_, short, _) = run_with(&["-h"]).await;
    let line = short
        .lines()
        .find(|line| line.contains("--header-read-timeout"))
        .unwrap();
    assert!(line.contains("HTTP/2"), "{line}");
}

#[tokio::test]
async fn a_mistyped_flag_or_value_gets_a_suggestion() {
    for (args, suggestion) in [
        (
            vec!["--upstrem", "http://127.0.0.1:9"],
            "tip: a similar argument exists: '--upstream'",
        ),
        (
            vec![
                "--upstream",
                "http://127.0.0.1:9",
                "--keys-fil",
                "keys.toml",
            ],
            "tip: a similar argument exists: '--keys-file'",
        ),
        (
            vec!["--upstream", "http://127.0.0.1:9", "--profile", "antropic"],
            "tip: a similar value exists: 'anthropic'",
        ),
    ] {
        let (status, stdout, stderr) = run_with(&args).await;
        assert_eq!(status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.starts_with("forward_proxy: error: "), "{stderr}");
        assert!(
            stderr.contains(suggestion),
            "{suggestion:?} not in:\n{stderr}"
        );
        assert_no_secret("the error", &format!("{stdout}{stderr}"), &KEYS);
    }
}

// ---------------------------------------------------------------------------------------
// 2. `.env`
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_dotenv_line_of_another_program_does_not_stop_the_proxy() {
    let upstream = ok_upstream().await;
    // Keys from the real environment; `.env` holds only another program's line.
    let config = in_dir_with_dotenv(
        &upstream.url(""),
        Some("GREETING=hello world\n"),
        &[("BIGMODEL_API_KEY", KEY_LIST)],
    );
    let proxy = config.start().await;
    assert_eq!(get(&proxy.url("/x")).await.status, 200);

    // Keys from `.env` itself, past the unreadable line.
    let config = in_dir_with_dotenv(
        &upstream.url(""),
        Some("GREETING=hello world\nMY_KEYS=sk-dotenv-1,sk-dotenv-2\n"),
        &[],
    )
    .arg("--keys-env", "MY_KEYS");
    let mut proxy = config.start().await;
    proxy
        .wait_for_log("Loaded 2 API key(s) from MY_KEYS in .env")
        .await;
    assert_eq!(get(&proxy.url("/x")).await.status, 200);
    proxy.assert_log_has_no_secret(&["sk-dotenv-1", "sk-dotenv-2"]);
}

#[tokio::test]
async fn an_unreadable_dotenv_line_setting_the_keys_names_its_line_not_its_value() {
    let dotenv = "# keys for the proxy\nOTHER=1\nBIGMODEL_API_KEY=sk-dotenv-a sk-dotenv-b\n";
    let config = in_dir_with_dotenv("http://127.0.0.1:9", Some(dotenv), &[]);
    let (status, stdout, stderr) = config.run_to_exit().await;
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(".env line 3: the value of BIGMODEL_API_KEY cannot be parsed"),
        "{stderr}"
    );
    assert_no_secret("the error", &format!("{stdout}{stderr}"), &["sk-dotenv"]);

    // The same line does not matter when the environment sets the variable.
    let upstream = ok_upstream().await;
    let config = in_dir_with_dotenv(
        &upstream.url(""),
        Some(dotenv),
        &[("BIGMODEL_API_KEY", KEY_LIST)],
    );
    let mut proxy = config.start().await;
    proxy
        .wait_for_log("Loaded 3 API key(s) from BIGMODEL_API_KEY")
        .await;
}

// ---------------------------------------------------------------------------------------
// 3. Key lists written wrong
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn quoted_or_semicolon_separated_keys_are_refused_by_position() {
    let cases = [
        (
            "sk-q-one, sk-q-two ,'sk-q-three'",
            "key 3 of 3 contains a quote at byte 1; remove the quotes",
        ),
        (
            "\"sk-q-one,sk-q-two\"",
            "key 1 of 2 contains a quote at byte 1",
        ),
        (
            "sk-q-one;sk-q-two",
            "key 1 of 1 contains a semicolon at byte 9; separate keys with commas",
        ),
        ("sk-q-one,sk q two", "key 2 of 2 contains white space"),
    ];
    for (keys, expected) in cases {
        let config = ProxyConfig::new("http://127.0.0.1:9", keys);
        let (status, stdout, stderr) = config.run_to_exit().await;
        assert_eq!(status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(expected), "{expected:?} not in {stderr}");
        assert!(stderr.contains("(in BIGMODEL_API_KEY)"), "{stderr}");
        assert_no_secret(
            "the error",
            &format!("{stdout}{stderr}"),
            &["sk-q", "q two"],
        );
    }
}

// ---------------------------------------------------------------------------------------
// 4. TLS
// ---------------------------------------------------------------------------------------

/// A proxy in front of an upstream presenting `tls/<cert>.pem`, trusting `ca` as well as
/// the public roots; the answer to one request, and the proxy's log after it.
async fn through_tls(cert: &str, ca: Option<&str>) -> (Got, String, MockUpstream) {
    let upstream = MockUpstream::start_tls_with(cert, |_| async { reply(200, "secure") }).await;
    let mut config = ProxyConfig::new(&upstream.https_url("/v1"), KEY_LIST);
    if let Some(ca) = ca {
        config = config.arg("--upstream-ca", &tls_path(ca));
    }
    let mut proxy = config.start().await;
    let got = get(&proxy.url("/models")).await;
    if got.status != 200 {
        proxy.wait_for_log("request failed").await;
    }
    proxy.assert_log_has_no_secret(&KEYS);
    assert_no_secret("the answer", &got.text(), &KEYS);
    (got, proxy.log(), upstream)
}

#[tokio::test]
async fn a_self_signed_certificate_given_with_upstream_ca_is_usable_as_the_servers_own() {
    let (got, _, upstream) = through_tls("self-signed", Some("self-signed.pem")).await;
    assert_eq!(got.status, 200, "{}", got.body);
    assert_eq!(got.body, "secure");
    assert_eq!(upstream.seen()[0].target, "/v1/models");
}

#[tokio::test]
async fn certificate_failures_are_told_in_words_in_the_log_and_the_502() {
    let cases = [
        // Signed by the test CA, which the proxy was not told about.
        ("leaf", None, "signed by an unknown issuer"),
        // A self-signed CA certificate the proxy was not told about.
        (
            "self-signed",
            None,
            "a CA certificate used as the server's own",
        ),
        // Pinned, but expired: the validity period is still checked.
        ("expired", Some("expired.pem"), "it has expired"),
        // Pinned, but for another host: the name is still checked.
        (
            "other-name",
            Some("other-name.pem"),
            "for another name than the upstream's host",
        ),
    ];
    for (cert, ca, words) in cases {
        let (got, log, upstream) = through_tls(cert, ca).await;
        assert_eq!(got.status, 502, "{cert}: {}", got.body);
        let error = &got.json()["error"];
        assert_eq!(
            error["code"], "upstream_certificate",
            "{cert}: {}",
            got.body
        );
        let message = error["message"].as_str().unwrap();
        assert!(
            message.starts_with("TLS with the upstream 127.0.0.1:")
                && message.contains("the upstream's certificate was refused: ")
                && message.contains(words),
            "{cert}: {words:?} not in {message:?}"
        );
        let line = log.lines().find(|l| l.contains("request failed")).unwrap();
        assert!(line.contains(words), "{cert}: {words:?} not in {line:?}");
        for internal in ["OtherError", "CaUsedAsEndEntity", "InvalidCertificate"] {
            assert!(
                !log.contains(internal),
                "{cert}: rustls internals in the log:\n{log}"
            );
        }
        assert!(upstream.seen().is_empty(), "{cert}: nothing may be sent");
    }
}

// ---------------------------------------------------------------------------------------
// 5. JSON log, body size, host names, the profile's variable
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn the_json_log_has_one_object_a_line_with_key_status_latency_attempts_and_wait() {
    // The first request earns a 429 (resent on the other key), the rest a 200.
    let served = std::sync::atomic::AtomicUsize::new(0);
    let upstream = MockUpstream::start(move |_| {
        let n = served.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async move {
            if n == 0 {
                http::Response::builder()
                    .status(429)
                    .header("retry-after", "30")
                    .body(full("slow down"))
                    .unwrap()
            } else {
                reply(200, "ok")
            }
        }
    })
    .await;
    let dir = empty_dir();
    std::fs::write(
        dir.join("keys.toml"),
        "[[key]]\nname = \"paid\"\nenv = \"PAID\"\n\n[[key]]\nname = \"free\"\nenv = \"FREE\"\n",
    )
    .unwrap();
    let mut config = ProxyConfig::new(&upstream.url(""), "")
        .arg("--keys-file", "keys.toml")
        .arg("--log-format", "json");
    config.env = vec![
        ("PAID".into(), KEYS[0].into()),
        ("FREE".into(), KEYS[1].into()),
    ];
    config.dir = Some(dir);
    let mut proxy = config.start().await;
    assert_eq!(
        post(&proxy.url("/chat/completions"), "{}").await.status,
        200
    );
    let line = proxy.wait_for_log("\"message\":\"request\"").await;
    // tracing-subscriber's JSON: the event's fields under `fields` (the library's own
    // events have a `level` field too, which must not clash with the log level).

    let log = proxy.log();
    for line in log.lines() {
        let object: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: not JSON: {line}"));
        assert!(
            object["timestamp"].is_string() && object["level"].is_string(),
            "{line}"
        );
    }
    let object: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(object["level"], "INFO");
    let access = &object["fields"];
    assert_eq!(access["method"], "POST");
    assert_eq!(access["path"], "/chat/completions");
    assert_eq!(access["status"], 200);
    assert_eq!(access["key"], 2, "{line}");
    assert_eq!(access["key_name"], "free", "{line}");
    assert_eq!(access["keys"], 2);
    assert_eq!(access["keys_tried"], "1,2");
    assert_eq!(access["attempts"], 2);
    assert!(access["latency_ms"].is_u64(), "{line}");
    assert!(access["waited_ms"].is_u64(), "{line}");
    proxy.assert_log_has_no_secret(&KEYS[..2]);
}

#[tokio::test]
async fn bodies_over_max_body_size_get_413_and_reach_no_one() {
    let upstream = ok_upstream().await;
    let proxy = ProxyConfig::new(&upstream.url(""), KEY_LIST)
        .arg("--max-body-size", "1000")
        .start()
        .await;

    // Declared too long: refused before it is read.
    let got = post(&proxy.url("/upload"), &"x".repeat(1001)).await;
    assert_eq!(got.status, 413, "{}", got.body);
    assert_eq!(got.json()["error"]["code"], "request_too_large");
    assert!(got.body.contains("1000 bytes"), "{}", got.body);

    // Chunked, no length declared: cut at the limit.
    let chunk = "y".repeat(2000);
    let raw = format!(
        "POST /chunked HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{chunk}\r\n0\r\n\r\n",
        chunk.len()
    );
    assert_eq!(raw_status(proxy.addr, &raw).await, 413);

    // At the limit: forwarded.
    assert_eq!(
        post(&proxy.url("/fits"), &"z".repeat(1000)).await.status,
        200
    );
    let targets: Vec<String> = upstream.seen().into_iter().map(|s| s.target).collect();
    assert_eq!(targets, ["/fits"]);
}

#[tokio::test]
async fn listen_accepts_a_host_name() {
    let upstream = ok_upstream().await;
    let mut config = ProxyConfig::new(&upstream.url(""), KEY_LIST);
    config.args[1] = "localhost:0".into();
    let proxy = config.start().await;
    assert!(proxy.addr.ip().is_loopback(), "{}", proxy.addr);
    assert_eq!(get(&proxy.url("/x")).await.status, 200);
    assert!(!proxy.log().contains("without --access-token-env"));
}

#[tokio::test]
async fn the_default_keys_variable_follows_the_profile() {
    let upstream = ok_upstream().await;
    for (profile, var) in [
        ("openai", "OPENAI_API_KEY"),
        ("anthropic", "ANTHROPIC_API_KEY"),
        ("bigmodel", "BIGMODEL_API_KEY"),
        ("generic", "BIGMODEL_API_KEY"),
    ] {
        let mut config = ProxyConfig::new(&upstream.url(""), "").arg("--profile", profile);
        config.env = vec![(var.into(), KEY_LIST.into())];
        let mut proxy = config.start().await;
        proxy
            .wait_for_log(&format!("Loaded 3 API key(s) from {var}"))
            .await;
    }
    // And says which variable it read when it is not set.
    let mut config = ProxyConfig::new(&upstream.url(""), "").arg("--profile", "anthropic");
    config.env.clear();
    let (_, _, stderr) = config.run_to_exit().await;
    assert!(stderr.contains("ANTHROPIC_API_KEY is not set"), "{stderr}");
}

#[tokio::test]
async fn an_upstream_host_that_does_not_resolve_is_a_warning_at_start() {
    let mut proxy = ProxyConfig::new("http://no-such-host.invalid:9/v1", KEY_LIST)
        .start()
        .await;
    let line = proxy
        .wait_for_log("the upstream host no-such-host.invalid does not resolve")
        .await;
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("starting anyway"), "{line}");
    assert_eq!(get(&proxy.url("/_keyrotation/health")).await.status, 200);
    proxy.assert_log_has_no_secret(&KEYS);

    // An IP literal is not looked up.
    let upstream = ok_upstream().await;
    let proxy = ProxyConfig::new(&upstream.url(""), KEY_LIST).start().await;
    assert_eq!(get(&proxy.url("/x")).await.status, 200);
    assert!(!proxy.log().contains("does not resolve"), "{}", proxy.log());
}

#[tokio::test]
async fn the_profile_places_the_key_as_its_provider_expects_unless_auth_is_given() {
    let upstream = ok_upstream().await;
    let key = KEYS[0];
    let bearer = format!("Bearer {key}");
    let cases = [
        ("anthropic", None, "x-api-key", key, "authorization"),
        ("openai", None, "authorization", &*bearer, "x-api-key"),
        ("bigmodel", None, "authorization", &bearer, "x-api-key"),
        ("generic", None, "authorization", &bearer, "x-api-key"),
        (
            "anthropic",
            Some("bearer"),
            "authorization",
            &bearer,
            "x-api-key",
        ),
        (
            "openai",
            Some("header:api-key"),
            "api-key",
            key,
            "authorization",
        ),
    ];
    for (profile, auth, header, value, absent) in cases {
        let mut config = ProxyConfig::new(&upstream.url(""), key)
            .arg("--profile", profile)
            .arg("--keys-env", "BIGMODEL_API_KEY");
        if let Some(auth) = auth {
            config = config.arg("--auth", auth);
        }
        let proxy = config.start().await;
        assert_eq!(get(&proxy.url("/x")).await.status, 200);
        let seen = upstream.seen().pop().unwrap();
        let case = format!("--profile {profile} --auth {auth:?}");
        assert_eq!(seen.headers.get(header).unwrap(), value, "{case}");
        assert!(seen.headers.get(absent).is_none(), "{case}");
    }
}

#[tokio::test]
async fn a_missing_keys_variable_is_said_to_be_unset_or_empty_with_the_ways_to_give_keys() {
    for (env, expected) in [
        (vec![], "BIGMODEL_API_KEY is not set: "),
        (
            vec![("BIGMODEL_API_KEY", " ")],
            "BIGMODEL_API_KEY is empty: ",
        ),
    ] {
        let (status, stdout, stderr) = in_dir_with_dotenv("http://127.0.0.1:9", None, &env)
            .run_to_exit()
            .await;
        assert_eq!(status.code(), Some(1), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        for text in [
            expected,
            "a .env file in the working directory",
            "--keys-env NAME",
            "--keys-file FILE",
        ] {
            assert!(stderr.contains(text), "{text:?} not in {stderr}");
        }
        assert_no_secret("the error", &format!("{stdout}{stderr}"), &KEYS);
    }
}

#[tokio::test]
async fn a_dotenv_quote_never_closed_that_takes_in_the_keys_line_names_the_line() {
    let dotenv = format!("# notes\nGREETING=\"hello\nBIGMODEL_API_KEY={KEY_LIST}\n");
    let config = in_dir_with_dotenv("http://127.0.0.1:9", Some(&dotenv), &[]);
    let (status, stdout, stderr) = config.run_to_exit().await;
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(
            ".env line 2: a quote opened on this line is never closed, so line 3 (which sets \
             BIGMODEL_API_KEY) is read as part of its value"
        ),
        "{stderr}"
    );
    assert_no_secret("the error", &format!("{stdout}{stderr}"), &KEYS);
}

// ---------------------------------------------------------------------------------------
// 6. Metrics
// ---------------------------------------------------------------------------------------

/// The label names of every series, by metric name, from the Prometheus text format.
fn label_sets(exposition: &str) -> std::collections::BTreeMap<String, Vec<Vec<String>>> {
    let mut sets: std::collections::BTreeMap<String, Vec<Vec<String>>> = Default::default();
    for line in exposition.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (name, labels) = match line.split_once('{') {
            Some((name, rest)) => (name, rest.split_once('}').unwrap().0),
            None => (line.split_whitespace().next().unwrap(), ""),
        };
        let mut names: Vec<String> = labels
            .split(',')
            .filter(|l| !l.is_empty())
            .map(|l| l.split_once('=').unwrap().0.to_owned())
            .collect();
        names.sort();
        let name = name
            .trim_end_matches("_bucket")
            .trim_end_matches("_sum")
            .trim_end_matches("_count");
        // A histogram's `le` is its own.
        names.retain(|n| n != "le");
        sets.entry(name.to_owned()).or_default().push(names);
    }
    sets
}

/// `promtool check metrics` on `exposition`. Fails, saying how to install promtool, when
/// it is missing: `.ci/run` installs it.
fn promtool_check(exposition: &str) {
    use std::io::Write;
    let child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) => panic!(
            "cannot run promtool ({e}): install Prometheus's promtool, on Debian with \
             `apt-get install -y --no-install-recommends prometheus` (.ci/run does)"
        ),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success() && said.trim().is_empty(),
        "promtool check metrics: {}\n{said}\non:\n{exposition}",
        output.status
    );
}

#[tokio::test]
async fn metrics_have_one_label_set_per_metric_and_pass_promtool() {
    let upstream = MockUpstream::start(|seen| async move {
        // The third key is refused, so that gauges and counters differ between keys.
        if seen.bearer().as_deref() == Some(KEYS[2]) {
            reply(401, "bad key")
        } else {
            reply(200, "ok")
        }
    })
    .await;
    let dir = empty_dir();
    // A key with name and account, one with a name only, one with neither field set but
    // the name (the key file requires one); and a plain list, with no name at all.
    std::fs::write(
        dir.join("keys.toml"),
        "[[key]]\nname = \"paid\"\nenv = \"PAID\"\naccount = \"acme\"\n\n\
         [[key]]\nname = \"free\"\nenv = \"FREE\"\n\n\
         [[key]]\nname = \"old\"\nenv = \"OLD\"\nweight = 2\n",
    )
    .unwrap();
    let mut from_file = ProxyConfig::new(&upstream.url(""), "").arg("--keys-file", "keys.toml");
    from_file.env = vec![
        ("PAID".into(), KEYS[0].into()),
        ("FREE".into(), KEYS[1].into()),
        ("OLD".into(), KEYS[2].into()),
    ];
    from_file.dir = Some(dir);
    let from_env = ProxyConfig::new(&upstream.url(""), KEY_LIST);
    for config in [from_file, from_env] {
        let mut proxy = config.start().await;
        for _ in 0..4 {
            get(&proxy.url("/x")).await;
        }
        proxy.signal("HUP").await;
        proxy.wait_for_log("SIGHUP").await;
        let metrics = get(&proxy.url("/_keyrotation/metrics")).await;
        assert_eq!(metrics.status, 200);
        for (metric, sets) in label_sets(&metrics.body) {
            assert!(
                sets.windows(2).all(|w| w[0] == w[1]),
                "{metric} has different label sets: {sets:?}\n{}",
                metrics.body
            );
        }
        assert!(
            metrics
                .body
                .contains("keyrotation_key_requests_total{key=\"1\",name=\"\",account=\"\"}")
                || metrics.body.contains(
                    "keyrotation_key_requests_total{key=\"1\",name=\"paid\",account=\"acme\"}"
                ),
            "{}",
            metrics.body
        );
        promtool_check(&metrics.body);
        assert_no_secret("the metrics", &metrics.body, &KEYS);
    }
}

// ---------------------------------------------------------------------------------------
// 7. A client that goes away
// ---------------------------------------------------------------------------------------

/// Sends a POST on its own connection and returns the connection (drop it to go away).
async fn send_and_keep(proxy: &Proxy, path: &str) -> TcpStream {
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    let head = format!("POST {path} HTTP/1.1\r\nhost: a\r\ncontent-length: 2\r\n\r\n{{}}");
    stream.write_all(head.as_bytes()).await.unwrap();
    stream
}

#[tokio::test]
async fn a_client_leaving_before_the_head_keeps_the_key_until_the_upstream_answers() {
    // The first request is answered when the test says; the others at once.
    let (answer, answered) = tokio::sync::watch::channel(false);
    let upstream = MockUpstream::start(move |seen| {
        let mut answered = answered.clone();
        async move {
            if seen.target == "/first" {
                let _ = answered.wait_for(|go| *go).await;
            }
            reply(200, "done")
        }
    })
    .await;
    let mut proxy = ProxyConfig::new(&upstream.url(""), KEYS[0])
        .arg("--max-in-flight-per-key", "1")
        .start()
        .await;

    let first = send_and_keep(&proxy, "/first").await;
    upstream.wait_for_requests(1).await;
    drop(first);
    let line = proxy.wait_for_log("Client went away").await;
    assert!(
        line.contains("POST /first on key 1/1") && line.contains("before the response head"),
        "{line}"
    );
    assert!(line.contains("the key stays in flight"), "{line}");
    assert_eq!(
        keys(&proxy).await[0]["in_flight"],
        1,
        "the provider still works on it"
    );

    // The key is at its cap: the next request waits instead of going to the provider.
    let url = proxy.url("/second");
    let second = tokio::spawn(async move { get(&url).await });
    wait_for_waiting(&proxy, 1).await;
    assert_eq!(upstream.seen().len(), 1, "sent past the key's cap");

    answer.send_replace(true);
    proxy
        .wait_for_log("Upstream answered 200 on key 1/1 after the client went away")
        .await;
    let got = within("the second answer", second).await.unwrap();
    assert_eq!(got.status, 200);
    assert_eq!(upstream.seen().len(), 2);
    wait_for_keys(&proxy, |keys| keys[0]["in_flight"] == 0).await;
    proxy.assert_log_has_no_secret(&KEYS);
}

#[tokio::test]
async fn a_client_leaving_while_waiting_for_a_key_gives_it_up_at_once_and_is_logged() {
    let (answer, answered) = tokio::sync::watch::channel(false);
    let upstream = MockUpstream::start(move |_| {
        let mut answered = answered.clone();
        async move {
            let _ = answered.wait_for(|go| *go).await;
            reply(200, "done")
        }
    })
    .await;
    let mut proxy = ProxyConfig::new(&upstream.url(""), KEYS[0])
        .arg("--max-in-flight-per-key", "1")
        .start()
        .await;
    // The first request holds the only slot; the second waits for it, then goes away.
    let url = proxy.url("/first");
    let first = tokio::spawn(async move { get(&url).await });
    upstream.wait_for_requests(1).await;
    let waiting = send_and_keep(&proxy, "/waiting").await;
    wait_for_waiting(&proxy, 1).await;
    drop(waiting);
    let line = proxy.wait_for_log("Client went away").await;
    assert!(line.contains("while waiting for a key"), "{line}");
    let metrics = get(&proxy.url("/_keyrotation/metrics")).await;
    assert!(
        metrics
            .body
            .contains("keyrotation_clients_gone_waiting_total 1\n"),
        "{}",
        metrics.body
    );

    answer.send_replace(true);
    assert_eq!(within("the first answer", first).await.unwrap().status, 200);
    wait_for_keys(&proxy, |keys| keys[0]["in_flight"] == 0).await;
    let targets: Vec<String> = upstream.seen().into_iter().map(|s| s.target).collect();
    assert_eq!(
        targets,
        ["/first"],
        "the abandoned request never took the key"
    );
}

#[tokio::test]
async fn a_client_leaving_mid_stream_is_logged() {
    let (chunks, body) = channel_body();
    let held = std::sync::Mutex::new(Some(body));
    let upstream = MockUpstream::start(move |_| {
        let body = held.lock().unwrap().take().expect("one request");
        async move { http::Response::new(body) }
    })
    .await;
    let mut proxy = ProxyConfig::new(&upstream.url(""), KEY_LIST).start().await;

    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    let connection = tokio::spawn(connection);
    let response = within(
        "the head",
        sender.send_request(
            Request::get("/stream")
                .header("host", "a")
                .body(Empty::<Bytes>::new())
                .unwrap(),
        ),
    )
    .await
    .unwrap();
    let mut body = response.into_body();
    chunks.send(Bytes::from("data: one\n\n")).unwrap();
    within("a chunk", body.frame()).await.unwrap().unwrap();
    proxy.wait_for_log("-> 200 in").await;

    connection.abort();
    drop(body);
    let line = proxy.wait_for_log("Client went away").await;
    assert!(line.contains("GET /stream on key 1/3"), "{line}");
    assert!(line.contains("mid-response"), "{line}");
    within("the upstream body to be dropped", chunks.closed()).await;
    wait_for_keys(&proxy, |keys| keys[0]["in_flight"] == 0).await;
}
