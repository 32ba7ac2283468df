//! The article case from the guide this crate grew from, runnable with no API keys.
//!
//! An article generator expands its sections in parallel against a provider that limits
//! each key. The demo starts such a provider in-process on 127.0.0.1 (per-key concurrency
//! and requests-per-window limits, 429 + Retry-After for the excess, a fixed latency per
//! completion) and sends the same workload five ways: one key without the layer, one key
//! through `KeyRotation`, several keys round-robin, several keys least-in-flight with a
//! per-key cap, and the same with a per-key quota at the provider's rate. Cases 2 to 5 use
//! the library's stack as it comes: `RetryLayer` outside `KeyRotationLayer`, one pool with
//! its wait budget and learned concurrency. It prints the layer's log live, then a table
//! and a timeline.
//!
//! Try it:
//!
//! ```sh
//! cargo run --release -p demo
//! cargo run --release -p demo -- --help
//! ```

mod live;
mod mock;
mod report;
mod workload;

use std::io::IsTerminal as _;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use tracing_subscriber::layer::SubscriberExt as _;

use crate::live::LiveLog;
use crate::mock::Limits;
use crate::report::{Callers, Style, Upstream};
use crate::workload::{Case, CaseRun, Workload};

/// No case may take longer than this, whatever the flags: the demo always ends.
const CASE_TIMEOUT: Duration = Duration::from_secs(300);

/// The article case from the guide, against a mock LLM provider on 127.0.0.1.
///
/// Several readers ask for an article at the same moment; each article's sections are
/// expanded in parallel, one chat completion per section. The mock provider limits each
/// key (completions at a time, requests per window) and answers the excess with
/// 429 + Retry-After, like a real one; like OpenAI, its answers report the rate window in
/// x-ratelimit-*-requests headers (a concurrency refusal is a plain 429). The same
/// workload is sent five ways:
///
///   1. one key, naive client (no layer): how many 429s reach the caller;
///   2. one key through KeyRotation (with the library's retry outside it): waits instead
///      of failing, and learns how many completions the key may run at once;
///   3. several keys through KeyRotation, round-robin, learning each key's limit;
///   4. several keys, least-in-flight, each capped at the provider's concurrency;
///   5. the same, each key also given the provider's rate as its quota: zero 429s.
///
/// The keys are fake and never printed; keys are named by position (key 2/3).
#[derive(Debug, Parser)]
#[command(
    name = "demo",
    verbatim_doc_comment,
    after_help = "Examples:\n  \
        cargo run --release -p demo\n  \
        cargo run --release -p demo -- --sections 8 --keys 4\n  \
        cargo run --release -p demo -- --concurrency 1 --rate 3 --cases 2,4\n  \
        cargo run --release -p demo -- --json --quiet"
)]
struct Args {
    /// Articles requested at the same moment.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=20))]
    articles: u16,

    /// Sections per article, expanded in parallel (the guide's article has 5).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u16).range(1..=20))]
    sections: u16,

    /// API keys in cases 3 to 5.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(2..=16))]
    keys: u16,

    /// Milliseconds the provider takes per completion.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    latency_ms: u64,

    /// Completions the provider runs at once per key; more get 429. Cases 4 and 5 cap each
    /// key at this many requests in flight.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=1000))]
    concurrency: u32,

    /// Requests the provider accepts per key in any window of --window-ms; more get 429.
    /// Case 5 gives each key this quota.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    rate: u32,

    /// The rate limit's sliding window, in milliseconds.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    window_ms: u64,

    /// Retries per section through the layer (the library's default), each after waiting
    /// for a key that can take it.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u16).range(0..=1000))]
    max_retries: u16,

    /// How long a section may wait for a key, across its attempts (the library's default
    /// budget); a section no key can take in time fails at once.
    #[arg(long, default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    max_wait_ms: u64,

    /// Which cases to run, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3,4,5",
          value_parser = clap::value_parser!(u8).range(1..=5))]
    cases: Vec<u8>,

    /// Width of the timeline, in columns.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(20..=400))]
    width: u16,

    /// Leave out the live log; print only each case's result, the table and the timeline.
    #[arg(long, short)]
    quiet: bool,

    /// Print only a JSON summary of every case (what the provider saw, what callers got).
    #[arg(long)]
    json: bool,

    /// Colours: on a terminal unless NO_COLOR is set (auto), always, or never.
    #[arg(long, value_enum, default_value_t = ColorChoice::Auto)]
    color: ColorChoice,

    /// Draw with plain ASCII instead of Unicode blocks and lines.
    #[arg(long)]
    ascii: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ColorChoice {
    Auto,
    Always,
    Never,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let workload = Workload {
        articles: usize::from(args.articles),
        sections: usize::from(args.sections),
        keys: usize::from(args.keys),
        limits: Limits {
            concurrency: args.concurrency,
            rate: args.rate,
            window: Duration::from_millis(args.window_ms),
            latency: Duration::from_millis(args.latency_ms),
        },
        max_retries: usize::from(args.max_retries),
        max_wait: Duration::from_millis(args.max_wait_ms),
    };
    let mut cases: Vec<Case> = Case::ALL
        .into_iter()
        .filter(|c| args.cases.contains(&(c.number() as u8)))
        .collect();
    cases.dedup();
    let style = Style {
        colour: match args.color {
            ColorChoice::Always => true,
            ColorChoice::Never => false,
            ColorChoice::Auto => {
                std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
            }
        },
        unicode: !args.ascii,
    };
    let live = LiveLog::new(style);
    let show_live = !args.json && !args.quiet;
    if show_live {
        let subscriber = tracing_subscriber::registry().with(live.layer());
        if let Err(error) = tracing::subscriber::set_global_default(subscriber) {
            eprintln!("demo: cannot install the live log: {error}");
        }
    }
    let printer = show_live.then(|| {
        let live = live.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(live::FLUSH_EVERY);
            loop {
                every.tick().await;
                live.flush();
            }
        })
    });

    if !args.json {
        print!("{}", intro(&workload, &cases, style));
    }
    let mut runs: Vec<CaseRun> = Vec::new();
    for (i, &case) in cases.iter().enumerate() {
        if !args.json {
            print!("{}", case_heading(case, i, cases.len(), &workload, style));
        }
        live.restart();
        let result = tokio::time::timeout(CASE_TIMEOUT, workload::run(case, &workload)).await;
        live.flush();
        let run = match result {
            Ok(Ok(run)) => run,
            Ok(Err(error)) => {
                eprintln!("demo: case {} failed: {error}", case.number());
                return ExitCode::FAILURE;
            }
            Err(_) => {
                eprintln!(
                    "demo: case {} took longer than {CASE_TIMEOUT:?}; giving up",
                    case.number()
                );
                return ExitCode::FAILURE;
            }
        };
        if !args.json {
            println!("{}", case_result(&run, &workload, style));
        }
        runs.push(run);
    }
    if let Some(printer) = printer {
        printer.abort();
    }

    if args.json {
        println!("{}", report::json(&runs, &workload));
        return ExitCode::SUCCESS;
    }
    let s = style;
    println!(
        "{}{} Results{}  {}(same workload each time: {} completions){}\n",
        s.bold(),
        s.rule(),
        s.reset(),
        s.dim(),
        workload.requests(),
        s.reset()
    );
    print!("{}", report::table(&runs, &workload, style));
    println!();
    print!("{}", report::verdict(&runs, &workload, style));
    println!();
    println!(
        "{}{} Timeline{}  {}(one time scale for every case){}",
        s.bold(),
        s.rule(),
        s.reset(),
        s.dim(),
        s.reset()
    );
    println!(
        "  {}A bar is a completion the provider accepted; a key gets a row per completion it ran\n  \
         side by side. '429s' counts the requests it refused at that moment (+ is 10 or more).{}\n",
        s.dim(),
        s.reset()
    );
    print!(
        "{}",
        report::timeline(&runs, &workload, style, usize::from(args.width))
    );
    ExitCode::SUCCESS
}

fn intro(workload: &Workload, cases: &[Case], style: Style) -> String {
    let s = style;
    let l = &workload.limits;
    let mut out = format!(
        "{}{} tower-key-rotation demo{}: the article case, no API keys needed\n\n",
        s.bold(),
        s.rule(),
        s.reset()
    );
    out += &format!(
        "  workload   {} requested at once, {} each expanded in parallel\n             \
         = {} chat completions\n",
        plural(workload.articles, "article"),
        plural(workload.sections, "section"),
        workload.requests()
    );
    out += &format!(
        "  provider   a mock on 127.0.0.1; per key {} at a time, {} per {:.1} s,\n             \
         {} ms per completion; anything more gets 429 + Retry-After, and the\n             \
         answers report the rate window in OpenAI's x-ratelimit-*-requests headers\n",
        plural(l.concurrency as usize, "completion"),
        plural(l.rate as usize, "request"),
        l.window.as_secs_f64(),
        l.latency.as_millis()
    );
    out += "  cases      ";
    let titles: Vec<String> = cases
        .iter()
        .map(|c| format!("{} {}", c.number(), c.title(workload)))
        .collect();
    out += &titles.join("\n             ");
    out += "\n\n";
    out
}

fn plural(n: usize, thing: &str) -> String {
    if n == 1 {
        format!("1 {thing}")
    } else {
        format!("{n} {thing}s")
    }
}

fn case_heading(case: Case, i: usize, of: usize, workload: &Workload, style: Style) -> String {
    let s = style;
    format!(
        "{}{} Case {} ({}/{of}): {}{}\n  {}{}{}\n",
        s.bold(),
        s.rule(),
        case.number(),
        i + 1,
        case.title(workload),
        s.reset(),
        s.dim(),
        case.story(),
        s.reset()
    )
}

fn case_result(run: &CaseRun, workload: &Workload, style: Style) -> String {
    let s = style;
    let total = workload.requests();
    let up = Upstream::of(run, &workload.limits);
    let written = if run.sections_ok == total {
        s.green()
    } else {
        s.red()
    };
    let seen = if run.caller_429 == 0 {
        s.green()
    } else {
        s.red()
    };
    let arrow = if s.unicode { "→" } else { "->" };
    let callers = Callers::of(run);
    let waits = if callers.retried == 0 && callers.longest_wait.is_zero() {
        String::new()
    } else {
        format!(
            ";\n    {} went again, the longest waited {:.2} s",
            plural(callers.retried, "section"),
            callers.longest_wait.as_secs_f64()
        )
    };
    format!(
        "  {arrow} {written}{}/{total} sections{} in {}{:.2} s{}; the provider refused {}, \
         callers saw {seen}{} 429s{}{waits}\n",
        run.sections_ok,
        s.reset(),
        s.bold(),
        run.wall.as_secs_f64(),
        s.reset(),
        up.refused(),
        run.caller_429,
        s.reset()
    )
}
