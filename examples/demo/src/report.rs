//! What the runs show: the summary table, the timeline, and the JSON summary.
//!
//! Everything here is computed from the mock provider's own log (what it accepted and
//! refused, and when), so the limits are checked by the side that sets them.

use std::fmt::Write as _;
use std::time::Duration;

use crate::mock::{Attempt, Limits, Refusal};
use crate::workload::{Case, CaseRun, Workload};

/// How to draw: colours (only on a terminal) and Unicode or plain ASCII.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Style {
    pub(crate) colour: bool,
    pub(crate) unicode: bool,
}

impl Style {
    fn code(self, code: &'static str) -> &'static str {
        if self.colour { code } else { "" }
    }
    pub(crate) fn reset(self) -> &'static str {
        self.code("\x1b[0m")
    }
    pub(crate) fn bold(self) -> &'static str {
        self.code("\x1b[1m")
    }
    pub(crate) fn dim(self) -> &'static str {
        self.code("\x1b[2m")
    }
    pub(crate) fn red(self) -> &'static str {
        self.code("\x1b[31m")
    }
    pub(crate) fn green(self) -> &'static str {
        self.code("\x1b[32m")
    }
    pub(crate) fn yellow(self) -> &'static str {
        self.code("\x1b[33m")
    }
    fn key_colour(self, key: usize) -> &'static str {
        const KEYS: [&str; 4] = ["\x1b[36m", "\x1b[35m", "\x1b[34m", "\x1b[32m"];
        self.code(KEYS[key % KEYS.len()])
    }
    /// A heading rule.
    pub(crate) fn rule(self) -> &'static str {
        if self.unicode { "━━" } else { "==" }
    }
}

/// The provider's view of one case, computed from its log.
#[derive(Debug, Clone)]
pub(crate) struct Upstream {
    /// Requests that reached the provider, per key (accepted and refused).
    pub(crate) attempts: Vec<u64>,
    /// Refused because the key had too many completions in progress.
    pub(crate) refused_concurrency: usize,
    /// Refused because the key had used its requests of the window.
    pub(crate) refused_rate: usize,
    /// The most accepted completions in progress at once, per key.
    pub(crate) max_concurrent: Vec<u32>,
    /// The most accepted requests in any window, per key.
    pub(crate) max_in_window: Vec<u32>,
    /// The longest chain of accepted completions each starting after the previous ended:
    /// how many latencies back to back the workload needed, whatever the machine's speed.
    pub(crate) rounds: usize,
}

impl Upstream {
    pub(crate) fn of(run: &CaseRun, limits: &Limits) -> Self {
        let keys = run.keys;
        let log = &run.upstream;
        let mut attempts = vec![0; keys];
        let (mut refused_concurrency, mut refused_rate) = (0, 0);
        let mut accepted: Vec<Vec<(Duration, Duration)>> = vec![Vec::new(); keys];
        for attempt in log {
            attempts[attempt.key] += 1;
            match attempt.outcome {
                Ok(end) => accepted[attempt.key].push((attempt.arrived, end)),
                Err(Refusal::Concurrency) => refused_concurrency += 1,
                Err(Refusal::Rate) => refused_rate += 1,
            }
        }
        let max_concurrent = accepted.iter().map(|a| max_overlap(a)).collect();
        let max_in_window = accepted
            .iter()
            .map(|a| max_in_window(a, limits.window))
            .collect();
        let all: Vec<(Duration, Duration)> = accepted.into_iter().flatten().collect();
        Self {
            attempts,
            refused_concurrency,
            refused_rate,
            max_concurrent,
            max_in_window,
            rounds: longest_chain(all),
        }
    }

    pub(crate) fn refused(&self) -> usize {
        self.refused_concurrency + self.refused_rate
    }
}

/// What the callers of one case went through: the library's [`Attempts`] on each answer.
///
/// [`Attempts`]: tower_key_rotation::retry::Attempts
#[derive(Debug, Clone, Copy)]
pub(crate) struct Callers {
    /// Sections that took more than one attempt.
    pub(crate) retried: usize,
    /// The most attempts one section took.
    pub(crate) most_attempts: u32,
    /// The longest one section waited for a key, across its attempts.
    pub(crate) longest_wait: Duration,
}

impl Callers {
    pub(crate) fn of(run: &CaseRun) -> Self {
        Self {
            retried: run.tries.iter().filter(|(n, _)| *n > 1).count(),
            most_attempts: run.tries.iter().map(|(n, _)| *n).max().unwrap_or(0),
            longest_wait: run.tries.iter().map(|(_, w)| *w).max().unwrap_or_default(),
        }
    }
}

/// The concurrency limit the pool holds for each key at the end of a case (the cap, or
/// lower where refusals taught it), as `2 · 2 · 2`; `None` without the layer.
fn limits_per_key(run: &CaseRun, sep: &str, none: &str) -> Option<String> {
    let pool = run.pool.as_ref()?;
    let limits: Vec<String> = pool
        .iter()
        .map(|k| {
            k.concurrency_limit
                .map_or_else(|| none.to_owned(), |l| l.to_string())
        })
        .collect();
    Some(limits.join(sep))
}

/// The most intervals in progress at once (an interval ending when another starts does
/// not overlap it).
fn max_overlap(intervals: &[(Duration, Duration)]) -> u32 {
    let mut edges: Vec<(Duration, i32)> = intervals
        .iter()
        .flat_map(|&(start, end)| [(start, 1), (end, -1)])
        .collect();
    // Ends before starts at the same instant.
    edges.sort();
    let (mut now, mut max) = (0i32, 0i32);
    for (_, delta) in edges {
        now += delta;
        max = max.max(now);
    }
    max as u32
}

/// The most interval starts inside any half-open window `[t, t + window)`.
fn max_in_window(intervals: &[(Duration, Duration)], window: Duration) -> u32 {
    let mut starts: Vec<Duration> = intervals.iter().map(|&(start, _)| start).collect();
    starts.sort();
    let mut max = 0;
    let mut first = 0;
    for last in 0..starts.len() {
        while starts[last] - starts[first] >= window {
            first += 1;
        }
        max = max.max(last - first + 1);
    }
    max as u32
}

/// The longest chain of intervals each starting at or after the previous one's end.
fn longest_chain(mut intervals: Vec<(Duration, Duration)>) -> usize {
    intervals.sort();
    let mut chain = vec![0usize; intervals.len()];
    for i in 0..intervals.len() {
        let before = (0..i)
            .filter(|&j| intervals[j].1 <= intervals[i].0)
            .map(|j| chain[j])
            .max()
            .unwrap_or(0);
        chain[i] = before + 1;
    }
    chain.into_iter().max().unwrap_or(0)
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// `wall of case 2 / wall of this case`, for cases that wrote every section.
fn speed_up(run: &CaseRun, runs: &[CaseRun], total: usize) -> Option<f64> {
    let base = runs.iter().find(|r| r.case == Case::OneKey)?;
    (run.sections_ok == total && base.sections_ok == total && !run.wall.is_zero())
        .then(|| base.wall.as_secs_f64() / run.wall.as_secs_f64())
}

/// The summary table.
pub(crate) fn table(runs: &[CaseRun], workload: &Workload, style: Style) -> String {
    let s = style;
    let total = workload.requests();
    let sep = if s.unicode { " · " } else { "/" };
    let dash = if s.unicode { "—" } else { "-" };
    let headers = [
        "#",
        "setup",
        "wall",
        "speed-up",
        "written",
        "provider 429s",
        "caller 429s",
        "sent per key",
        "limit per key",
    ];
    let mut rows: Vec<[String; 9]> = Vec::new();
    for run in runs {
        let up = Upstream::of(run, &workload.limits);
        let speed = speed_up(run, runs, total)
            .map(|x| format!("{x:.1}x"))
            .unwrap_or_else(|| dash.to_owned());
        let refused = format!("{} + {}", up.refused_concurrency, up.refused_rate);
        let per_key: Vec<String> = up.attempts.iter().map(u64::to_string).collect();
        rows.push([
            run.case.number().to_string(),
            run.case.short_title(workload),
            secs(run.wall),
            speed,
            format!("{}/{}", run.sections_ok, total),
            refused,
            run.caller_429.to_string(),
            per_key.join(sep),
            limits_per_key(run, sep, "none").unwrap_or_else(|| dash.to_owned()),
        ]);
    }
    let width = |i: usize| {
        rows.iter()
            .map(|r| r[i].chars().count())
            .chain([headers[i].chars().count()])
            .max()
            .unwrap_or(0)
    };
    let widths: Vec<usize> = (0..headers.len()).map(width).collect();
    let mut out = String::new();
    let line = |out: &mut String, cells: &[String], colours: &[&str]| {
        out.push_str("  ");
        for (i, cell) in cells.iter().enumerate() {
            let pad = widths[i] - cell.chars().count();
            let colour = colours.get(i).copied().unwrap_or("");
            let reset = if colour.is_empty() { "" } else { s.reset() };
            // Text left, numbers right.
            if i == 1 || i >= cells.len() - 2 {
                let _ = write!(out, "{colour}{cell}{reset}{}", " ".repeat(pad));
            } else {
                let _ = write!(out, "{}{colour}{cell}{reset}", " ".repeat(pad));
            }
            if i + 1 < cells.len() {
                out.push_str("  ");
            }
        }
        let trimmed = out.trim_end_matches(' ').len();
        out.truncate(trimmed);
        out.push('\n');
    };
    let header_cells: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    out.push_str(s.bold());
    line(&mut out, &header_cells, &[]);
    out.push_str(s.reset());
    let rule_width: usize = widths.iter().sum::<usize>() + 2 * (widths.len() - 1);
    let _ = writeln!(
        out,
        "  {}{}{}",
        s.dim(),
        (if s.unicode { "─" } else { "-" }).repeat(rule_width),
        s.reset()
    );
    for (run, row) in runs.iter().zip(&rows) {
        let good = run.sections_ok == total;
        let colours = [
            "",
            "",
            "",
            if good { s.green() } else { "" },
            if good { s.green() } else { s.red() },
            "",
            if run.caller_429 == 0 {
                s.green()
            } else {
                s.red()
            },
            "",
            "",
        ];
        line(&mut out, row, &colours);
    }
    let _ = writeln!(
        out,
        "  {}speed-up: over case 2;  provider 429s: refused for concurrency + for the rate window;\n  \
         limit per key: the most in flight the pool allows it at the end (the cap, or learned lower){}",
        s.dim(),
        s.reset()
    );
    out
}

/// The conclusions, in plain words, drawn from the runs.
pub(crate) fn verdict(runs: &[CaseRun], workload: &Workload, style: Style) -> String {
    let s = style;
    let total = workload.requests();
    let mut out = String::new();
    if let Some(naive) = runs.iter().find(|r| r.case == Case::Naive) {
        let _ = writeln!(
            out,
            "  Without the layer {}{} of {total} callers got a 429{}: the article has holes.",
            if naive.caller_429 == 0 {
                s.green()
            } else {
                s.red()
            },
            naive.caller_429,
            s.reset()
        );
    }
    let layered: Vec<&CaseRun> = runs.iter().filter(|r| r.case != Case::Naive).collect();
    if !layered.is_empty() {
        let seen: usize = layered.iter().map(|r| r.caller_429).sum();
        let errors: usize = layered.iter().map(|r| r.caller_errors).sum();
        let absorbed: usize = layered
            .iter()
            .map(|r| Upstream::of(r, &workload.limits).refused())
            .sum();
        let longest = layered
            .iter()
            .map(|r| Callers::of(r).longest_wait)
            .max()
            .unwrap_or_default();
        let errors = match errors {
            0 => String::new(),
            n => format!(" and {}{n} another error{}", s.red(), s.reset()),
        };
        let _ = writeln!(
            out,
            "  Through KeyRotation {}{seen} callers saw a 429{}{errors}: {absorbed} refusals became waits \
             (the longest {:.2} s; budget {:.0} s).",
            if seen == 0 { s.green() } else { s.red() },
            s.reset(),
            longest.as_secs_f64(),
            workload.max_wait.as_secs_f64()
        );
    }
    let uncapped: Vec<&CaseRun> = runs
        .iter()
        .filter(|r| matches!(r.case, Case::OneKey | Case::RoundRobin))
        .collect();
    let learned: Vec<String> = uncapped
        .iter()
        .filter_map(|r| {
            let limits = limits_per_key(r, if s.unicode { " · " } else { "/" }, "none")?;
            Some(format!("{limits} in case {}", r.case.number()))
        })
        .collect();
    if !learned.is_empty() {
        let _ = writeln!(
            out,
            "  Uncapped keys learned their limit from the refusals: {} (provider: {}).",
            learned.join(", "),
            workload.limits.concurrency
        );
    }
    let best = runs
        .iter()
        .filter(|r| r.keys > 1)
        .filter_map(|r| speed_up(r, runs, total).map(|x| (r, x)))
        .max_by(|a, b| a.1.total_cmp(&b.1));
    if let Some((run, x)) = best {
        let _ = writeln!(
            out,
            "  With {} keys the article is written {}{x:.1}x faster{} than with one (case {}).",
            run.keys,
            s.bold(),
            s.reset(),
            run.case.number()
        );
    }
    if let Some(capped) = runs.iter().find(|r| r.case == Case::LeastInFlight) {
        let up = Upstream::of(capped, &workload.limits);
        let _ = writeln!(
            out,
            "  Capped at the provider's concurrency, the keys drew {} concurrency 429s.",
            up.refused_concurrency
        );
    }
    if let Some(quota) = runs.iter().find(|r| r.case == Case::Quota) {
        let refused = Upstream::of(quota, &workload.limits).refused();
        let _ = writeln!(
            out,
            "  With quotas set to the provider's limits, it refused {}{refused}{} requests (case {}).",
            if refused == 0 { s.green() } else { s.red() },
            s.reset(),
            quota.case.number()
        );
    }
    out
}

/// A terminal timeline of every case on one time scale: a row per key (more when a key
/// ran completions side by side), a bar per accepted completion, and under each key the
/// number of requests the provider refused at that moment.
pub(crate) fn timeline(
    runs: &[CaseRun],
    workload: &Workload,
    style: Style,
    width: usize,
) -> String {
    let s = style;
    let span = runs
        .iter()
        .map(|r| r.wall)
        .chain(runs.iter().flat_map(|r| {
            r.upstream
                .iter()
                .map(|a| a.outcome.unwrap_or(a.arrived).max(a.arrived))
        }))
        .max()
        .unwrap_or(Duration::from_secs(1))
        .max(Duration::from_millis(100));
    let step = tick_step(span, width);
    // Round the scale up to a whole tick so the axis ends on a label.
    let ticks = (span.as_secs_f64() / step).ceil().max(1.0);
    let scale = ticks * step;
    let col =
        |t: Duration| -> usize { ((t.as_secs_f64() / scale) * width as f64).floor() as usize };
    let (bar, bar_end, gap, axis, tick, corner, bar_axis, bar_ascii_start) = if s.unicode {
        ('█', '▌', ' ', '─', '┬', '└', '│', None)
    } else {
        ('=', ']', ' ', '-', '+', '+', '|', Some('['))
    };
    let label_width = 9;
    let mut out = String::new();
    for run in runs {
        let _ = writeln!(
            out,
            "  {}{} {}{}  {}{}{}",
            s.bold(),
            run.case.number(),
            run.case.title(workload),
            s.reset(),
            s.dim(),
            secs(run.wall),
            s.reset()
        );
        for key in 0..run.keys {
            let attempts: Vec<&Attempt> = run.upstream.iter().filter(|a| a.key == key).collect();
            // Lay accepted completions on lanes: the first lane free when each starts.
            let mut lanes: Vec<(Duration, Vec<char>)> = Vec::new();
            let mut accepted: Vec<(Duration, Duration)> = attempts
                .iter()
                .filter_map(|a| a.outcome.ok().map(|end| (a.arrived, end)))
                .collect();
            accepted.sort();
            for (start, end) in accepted {
                let lane = match lanes.iter().position(|(free_at, _)| *free_at <= start) {
                    Some(i) => i,
                    None => {
                        lanes.push((Duration::ZERO, vec![gap; width]));
                        lanes.len() - 1
                    }
                };
                let (free_at, cells) = &mut lanes[lane];
                *free_at = end;
                let from = col(start).min(width - 1);
                let to = col(end).clamp(from + 1, width);
                for cell in &mut cells[from..to] {
                    *cell = bar;
                }
                if to - from >= 2 {
                    cells[to - 1] = bar_end;
                    if let Some(start_char) = bar_ascii_start {
                        cells[from] = start_char;
                    }
                }
            }
            if lanes.is_empty() {
                lanes.push((Duration::ZERO, vec![gap; width]));
            }
            let colour = s.key_colour(key);
            for (i, (_, cells)) in lanes.iter().enumerate() {
                let label = if i == 0 {
                    format!("key {}", key + 1)
                } else {
                    String::new()
                };
                let cells: String = cells.iter().collect();
                let cells = cells.trim_end();
                let _ = writeln!(
                    out,
                    "  {label:>label_width$} {}{bar_axis}{}{colour}{cells}{}",
                    s.dim(),
                    s.reset(),
                    s.reset()
                );
            }
            let mut refused = vec![0u32; width];
            for a in attempts.iter().filter(|a| a.outcome.is_err()) {
                refused[col(a.arrived).min(width - 1)] += 1;
            }
            if refused.iter().any(|&n| n > 0) {
                let cells: String = refused
                    .iter()
                    .map(|&n| match n {
                        0 => ' ',
                        1..=9 => char::from_digit(n, 10).unwrap_or('+'),
                        _ => '+',
                    })
                    .collect();
                let cells = cells.trim_end();
                let _ = writeln!(
                    out,
                    "  {:>label_width$} {}{bar_axis}{}{}{cells}{}",
                    "429s",
                    s.dim(),
                    s.reset(),
                    s.red(),
                    s.reset()
                );
            }
        }
        out.push('\n');
    }
    // The time axis.
    let mut axis_line: Vec<char> = vec![axis; width + 1];
    let mut labels: Vec<char> = vec![' '; width + 8];
    for i in 0..=(ticks as usize) {
        let t = step * i as f64;
        let at = ((t / scale) * width as f64).round() as usize;
        if at <= width {
            axis_line[at] = tick;
            let text = format_tick(t, step);
            for (j, c) in text.chars().enumerate() {
                if let Some(cell) = labels.get_mut(at + j) {
                    *cell = c;
                }
            }
        }
    }
    axis_line[0] = corner;
    let axis_line: String = axis_line.into_iter().collect();
    let labels: String = labels.into_iter().collect();
    let _ = writeln!(
        out,
        "  {:>label_width$} {}{axis_line}{}",
        "",
        s.dim(),
        s.reset()
    );
    let _ = writeln!(out, "  {:>label_width$} {}", "", labels.trim_end());
    out
}

/// A tick step that gives at most about one label per 8 columns.
fn tick_step(span: Duration, width: usize) -> f64 {
    let max_ticks = (width / 8).max(1) as f64;
    [0.05, 0.1, 0.2, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0]
        .into_iter()
        .find(|step| span.as_secs_f64() / step <= max_ticks)
        .unwrap_or(120.0)
}

fn format_tick(t: f64, step: f64) -> String {
    if step >= 1.0 {
        format!("{t:.0}s")
    } else if step >= 0.1 {
        format!("{t:.1}s")
    } else {
        format!("{t:.2}s")
    }
}

/// The machine-readable summary (`--json`): what the test reads.
pub(crate) fn json(runs: &[CaseRun], workload: &Workload) -> serde_json::Value {
    let limits = &workload.limits;
    let cases: Vec<serde_json::Value> = runs
        .iter()
        .map(|run| {
            let up = Upstream::of(run, limits);
            let callers = Callers::of(run);
            let pool = run.pool.as_ref();
            serde_json::json!({
                "case": run.case.number(),
                "title": run.case.title(workload),
                "keys": run.keys,
                "wall_ms": run.wall.as_secs_f64() * 1000.0,
                "rounds": up.rounds,
                "sections": workload.requests(),
                "sections_ok": run.sections_ok,
                "caller_429": run.caller_429,
                "caller_errors": run.caller_errors,
                "caller_retried": callers.retried,
                "caller_attempts_max": callers.most_attempts,
                "caller_waited_max_ms": callers.longest_wait.as_secs_f64() * 1000.0,
                "upstream_requests_per_key": up.attempts,
                "upstream_429": up.refused(),
                "upstream_429_concurrency": up.refused_concurrency,
                "upstream_429_rate": up.refused_rate,
                "upstream_max_concurrent_per_key": up.max_concurrent,
                "upstream_max_in_flight_counted_per_key": run.upstream_max_in_flight,
                "upstream_max_in_window_per_key": up.max_in_window,
                "pool_requests_per_key": pool.map(|p| p.iter().map(|k| k.requests).collect::<Vec<_>>()),
                "pool_rate_limited_per_key": pool.map(|p| p.iter().map(|k| k.rate_limited).collect::<Vec<_>>()),
                "pool_in_flight_after": pool.map(|p| p.iter().map(|k| k.in_flight).collect::<Vec<_>>()),
                "pool_concurrency_limit_per_key": pool.map(|p| p.iter().map(|k| k.concurrency_limit).collect::<Vec<_>>()),
            })
        })
        .collect();
    serde_json::json!({
        "articles": workload.articles,
        "sections_per_article": workload.sections,
        "keys": workload.keys,
        "limits": {
            "concurrency": limits.concurrency,
            "rate": limits.rate,
            "window_ms": limits.window.as_millis() as u64,
            "latency_ms": limits.latency.as_millis() as u64,
        },
        "max_retries": workload.max_retries,
        "max_wait_ms": workload.max_wait.as_millis() as u64,
        "cases": cases,
    })
}
