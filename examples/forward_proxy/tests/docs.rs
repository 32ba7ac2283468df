//! The shell commands of README.md and of the proxy's manual (examples/forward_proxy/README.md)
//! run as written, against a local stand-in for the provider, and print what the docs say.
//!
//! Each ```sh block carries an HTML comment just before it that says what to do with it:
//!
//! - `<!-- doc-test: serve -->`: a long-running command (the proxy). It is started in the
//!   background; the ```text block right after it is the log it must print (checked, lines
//!   in order, before the next `serve` block stops it or the document ends).
//! - `<!-- doc-test: run -->`: run to its end; the ```text block right after it, if any,
//!   is its output (stdout and stderr), and its exit status must be 0. Options: `run, exit
//!   N` (the status must be N), `run, eventually` (run again until the output matches,
//!   within [`WAIT`]: for what the proxy does a moment later, such as a reload).
//! - `<!-- doc-test: skip -->`: not run; the block must be in [`SKIPPED`], with the reason.
//! - `<!-- doc-test: file PATH -->` before any other block: its text is written to PATH.
//! - `<!-- doc-test: setup COMMAND -->`: COMMAND runs first (files a command expects).
//!
//! An sh block without a marker fails the test, so no command goes unchecked by accident.
//! Each document runs in a fresh directory. Before a block runs, `cargo run ... -p
//! forward_proxy --` becomes this package's binary, the provider's URL the stand-in's, and
//! `127.0.0.1:8080` a free port; the same substitutions apply to the expected output. In
//! an expected line, `…` stands for any text; each expected line must be found within one
//! output line, in order.

mod support;

use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::time::Instant;

use support::{MockUpstream, WAIT, empty_dir, full};

/// Blocks the docs mark `skip`, by document and first line, and why they are not run.
const SKIPPED: &[(&str, &str, &str)] = &[
    (
        "README.md",
        "cargo run --release -p demo",
        "cargo itself: examples/demo/tests/demo.rs runs the demo's binary, and `cargo test` is \
         the command that runs this test",
    ),
    (
        "README.md",
        "cargo run --example hyper_client",
        "cargo builds the library's examples (a long build); CI compiles them with clippy \
         --all-targets",
    ),
    (
        "examples/forward_proxy/README.md",
        "redis-server --bind 127.0.0.1 --port 6379",
        "starts a redis-server and three proxies in the background on fixed ports; \
         examples/forward_proxy/tests/shared.rs runs three proxies over a real redis-server",
    ),
];

/// The provider's URL as the docs write it.
const PROVIDER: &str = "https://open.bigmodel.cn/api/paas/v4";
/// The proxy's address as the docs write it.
const LISTEN: &str = "127.0.0.1:8080";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_commands_print_what_the_readme_says() {
    check_document("README.md").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_manual_commands_print_what_the_manual_says() {
    check_document("examples/forward_proxy/README.md").await;
}

/// A test of the test: a flag renamed in a document, or an output line changed, fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_flag_or_output_in_a_document_is_caught() {
    let upstream = stand_in().await;
    let dir = empty_dir();
    let doc = "<!-- doc-test: run, exit 1 -->\n```sh\nBIGMODEL_API_KEY=k1,,k2 cargo run \
               --release -p forward_proxy -- --upstream https://open.bigmodel.cn/api/paas/v4\n\
               ```\n\n```text\nforward_proxy: error: key 2 of 3 is empty\n```\n";
    assert!(run_document("ok.md", doc, &dir, &upstream).await.is_empty());
    for wrong in [
        doc.replace("--upstream", "--upstream-url"),
        doc.replace("key 2 of 3", "key 3 of 3"),
        doc.replace("exit 1", "exit 0"),
        doc.replace("<!-- doc-test: run, exit 1 -->\n", ""),
    ] {
        let failures = run_document("wrong.md", &wrong, &dir, &upstream).await;
        assert!(!failures.is_empty(), "not caught:\n{wrong}");
    }
}

async fn check_document(relative: &str) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let text = std::fs::read_to_string(root.join(relative)).unwrap();
    let upstream = stand_in().await;
    let failures = run_document(relative, &text, &empty_dir(), &upstream).await;
    assert!(
        failures.is_empty(),
        "{relative}:\n{}",
        failures.join("\n\n")
    );
}

/// A provider stand-in: any request gets a small chat completion.
async fn stand_in() -> MockUpstream {
    MockUpstream::start(|_| async {
        http::Response::builder()
            .header("content-type", "application/json")
            .body(full(
                r#"{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"Hello!"},"finish_reason":"stop"}]}"#,
            ))
            .unwrap()
    })
    .await
}

// ---------------------------------------------------------------------------------------
// Reading a document
// ---------------------------------------------------------------------------------------

#[derive(Debug)]
struct Block {
    /// 1-based line of the opening fence.
    line: usize,
    lang: String,
    text: String,
    markers: Vec<String>,
    /// The ```text block right after this one (only blank lines between), if any.
    output: Option<String>,
}

fn blocks(doc: &str) -> Result<Vec<Block>, String> {
    let lines: Vec<&str> = doc.lines().collect();
    let mut blocks: Vec<Block> = Vec::new();
    let mut markers = Vec::new();
    // Whether only blank lines came since the last block ended (and no marker).
    let mut adjacent = false;
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i].trim();
        if let Some(marker) = line
            .strip_prefix("<!-- doc-test:")
            .and_then(|rest| rest.strip_suffix("-->"))
        {
            markers.push(marker.trim().to_owned());
            adjacent = false;
        } else if let Some(lang) = line.strip_prefix("```") {
            let start = i;
            let mut text = String::new();
            i += 1;
            while i < lines.len() && lines[i].trim() != "```" {
                text.push_str(lines[i]);
                text.push('\n');
                i += 1;
            }
            if i == lines.len() {
                return Err(format!("line {}: a block that never ends", start + 1));
            }
            let lang = lang.trim().to_owned();
            let is_output = adjacent
                && lang == "text"
                && blocks
                    .last()
                    .is_some_and(|b| b.lang == "sh" && b.output.is_none());
            if is_output {
                blocks.last_mut().unwrap().output = Some(text);
            } else {
                blocks.push(Block {
                    line: start + 1,
                    lang,
                    text,
                    markers: std::mem::take(&mut markers),
                    output: None,
                });
            }
            adjacent = true;
        } else if !line.is_empty() {
            if !markers.is_empty() {
                return Err(format!(
                    "line {}: doc-test markers {markers:?} are not followed by a block",
                    i + 1
                ));
            }
            adjacent = false;
        }
        i += 1;
    }
    Ok(blocks)
}

// ---------------------------------------------------------------------------------------
// Running it
// ---------------------------------------------------------------------------------------

/// The substitutions in force: the binary, the stand-in, the current proxy port.
struct Substitutions {
    upstream: String,
    port: u16,
}

impl Substitutions {
    fn apply(&self, text: &str) -> String {
        let binary = format!("'{}'", support::binary().display());
        text.replace("cargo run --release -p forward_proxy --", &binary)
            .replace("cargo run -p forward_proxy --", &binary)
            .replace(PROVIDER, &format!("{}/api/paas/v4", self.upstream))
            .replace(LISTEN, &format!("127.0.0.1:{}", self.port))
    }
}

/// A command started in the background, in a process group of its own; the group is
/// stopped when this is dropped.
struct Served {
    child: std::process::Child,
    log: PathBuf,
    expected: Option<String>,
    line: usize,
}

impl Served {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (at most [`WAIT`]) for the expected log, then stops the group.
    async fn finish(mut self, subs: &Substitutions, failures: &mut Vec<String>) {
        if let Some(expected) = self.expected.take() {
            let expected = subs.apply(&expected);
            let deadline = Instant::now() + WAIT;
            while let Err(missing) = matches(&expected, &self.log()) {
                if Instant::now() > deadline {
                    failures.push(format!(
                        "line {}: the log lacks `{missing}`; it was:\n{}",
                        self.line,
                        self.log()
                    ));
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let group = format!("-{}", self.child.id());
        for signal in ["-TERM", "-KILL"] {
            let _ = std::process::Command::new("kill")
                .args([signal, "--", &group])
                .stderr(Stdio::null())
                .status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn bash(script: &str, dir: &Path) -> std::process::Command {
    let mut command = std::process::Command::new("bash");
    command
        .arg("-c")
        .arg(format!("exec 2>&1\n{script}"))
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", dir)
        .stdin(Stdio::null());
    command
}

/// Runs a document's blocks in `dir`; returns what did not hold.
async fn run_document(name: &str, doc: &str, dir: &Path, upstream: &MockUpstream) -> Vec<String> {
    let blocks = match blocks(doc) {
        Ok(blocks) => blocks,
        Err(e) => return vec![e],
    };
    let mut failures = Vec::new();
    let mut subs = Substitutions {
        upstream: format!("http://{}", upstream.addr),
        port: free_port(),
    };
    let mut served: Option<Served> = None;
    let mut skipped = Vec::new();
    for block in &blocks {
        let mut action = None;
        for marker in &block.markers {
            if let Some(command) = marker.strip_prefix("setup ") {
                let status = bash(&subs.apply(command), dir).output().unwrap();
                if !status.status.success() {
                    failures.push(format!("line {}: setup `{command}` failed", block.line));
                }
            } else if let Some(path) = marker.strip_prefix("file ") {
                let path = dir.join(path.trim());
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(&path, &block.text).unwrap();
            } else {
                action = Some(marker.as_str());
            }
        }
        let first_line = block.text.lines().next().unwrap_or_default();
        match (block.lang.as_str(), action) {
            ("sh", None) => failures.push(format!(
                "line {}: an sh block without a doc-test marker (serve, run, skip): {first_line}",
                block.line
            )),
            ("sh", Some("skip")) => {
                skipped.push(first_line.to_owned());
                if !SKIPPED
                    .iter()
                    .any(|&(d, l, _)| d == name && first_line.starts_with(l))
                {
                    failures.push(format!(
                        "line {}: skipped, but not listed in SKIPPED with a reason: {first_line}",
                        block.line
                    ));
                }
            }
            ("sh", Some("serve")) => {
                if let Some(previous) = served.take() {
                    previous.finish(&subs, &mut failures).await;
                }
                subs.port = free_port();
                let log = dir.join(format!("serve-{}.log", block.line));
                let mut command = bash(&subs.apply(&block.text), dir);
                command.stdout(std::fs::File::create(&log).unwrap());
                std::os::unix::process::CommandExt::process_group(&mut command, 0);
                let server = Served {
                    child: command.spawn().unwrap(),
                    log,
                    expected: block.output.clone(),
                    line: block.line,
                };
                let deadline = Instant::now() + WAIT;
                while tokio::net::TcpStream::connect(("127.0.0.1", subs.port))
                    .await
                    .is_err()
                {
                    if Instant::now() > deadline {
                        failures.push(format!(
                            "line {}: nothing listens on 127.0.0.1:{} (as {LISTEN}); log:\n{}",
                            block.line,
                            subs.port,
                            server.log()
                        ));
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                served = Some(server);
            }
            ("sh", Some(run)) if run == "run" || run.starts_with("run,") => {
                let mut want = 0;
                let mut eventually = false;
                for option in run.split(',').skip(1).map(str::trim) {
                    match option.strip_prefix("exit ") {
                        Some(code) => want = code.trim().parse().unwrap(),
                        None if option == "eventually" => eventually = true,
                        None => {
                            failures.push(format!("line {}: unknown option `{option}`", block.line))
                        }
                    }
                }
                let script = subs.apply(&block.text);
                let deadline = Instant::now() + WAIT;
                loop {
                    match run_once(block, &script, want, &subs, dir).await {
                        Some(_) if eventually && Instant::now() < deadline => {
                            tokio::time::sleep(Duration::from_millis(100)).await
                        }
                        Some(failure) => break failures.push(failure),
                        None => break,
                    }
                }
            }
            ("sh", Some(other)) => failures.push(format!(
                "line {}: unknown doc-test marker `{other}`",
                block.line
            )),
            _ => {}
        }
    }
    if let Some(last) = served.take() {
        last.finish(&subs, &mut failures).await;
    }
    for &(doc, line, reason) in SKIPPED {
        if doc == name && !skipped.iter().any(|s| s.starts_with(line)) {
            failures.push(format!("SKIPPED lists `{line}`, which {doc} does not skip"));
        } else if doc == name {
            eprintln!("{doc}: skipped `{line}`: {reason}");
        }
    }
    failures
}

/// Runs a `run` block once: what did not hold, if anything.
async fn run_once(
    block: &Block,
    script: &str,
    want: i32,
    subs: &Substitutions,
    dir: &Path,
) -> Option<String> {
    let mut command = bash(script, dir);
    let output = tokio::task::spawn_blocking(move || command.output().unwrap());
    let Ok(output) = tokio::time::timeout(Duration::from_secs(60), output).await else {
        return Some(format!("line {}: did not end within 60 s", block.line));
    };
    let output = output.unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    if output.status.code() != Some(want) {
        return Some(format!(
            "line {}: exit status {:?}, the doc says {want}; output:\n{text}",
            block.line,
            output.status.code()
        ));
    }
    let expected = subs.apply(block.output.as_deref().unwrap_or_default());
    match matches(&expected, &text) {
        Err(missing) => Some(format!(
            "line {}: the output lacks `{missing}`; it was:\n{text}",
            block.line
        )),
        Ok(()) => None,
    }
}

/// Whether every non-blank line of `expected` is found within a line of `actual`, in
/// order (`…` matching any text); else the first line missing.
fn matches(expected: &str, actual: &str) -> Result<(), String> {
    let mut lines = actual.lines();
    'expected: for want in expected.lines().map(str::trim).filter(|l| !l.is_empty()) {
        for line in lines.by_ref() {
            if line_matches(want, line) {
                continue 'expected;
            }
        }
        return Err(want.to_owned());
    }
    Ok(())
}

fn line_matches(pattern: &str, line: &str) -> bool {
    let mut rest = line;
    for part in pattern.split('…').filter(|p| !p.is_empty()) {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    true
}

#[test]
fn expected_lines_match_in_order_with_wildcards() {
    let log = "2026-01-01T00:00:00Z  INFO Loaded 3 API key(s)\nx INFO Using key 1/3: POST / -> 200 in 4 ms\n";
    assert!(matches("… INFO Loaded 3 API key(s)\n… -> 200 in … ms", log).is_ok());
    assert!(matches("Using key\nLoaded", log).is_err());
    assert!(matches("Loaded 2 API key(s)", log).is_err());
}
