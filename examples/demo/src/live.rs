//! The live log: the library's tracing events (`Using key 2/3`, cool-downs) and the demo's
//! own lines, printed as they happen with the time since the case started.
//!
//! Events arrive in bursts (fifteen callers take a key in the same millisecond), so lines
//! are gathered for a few tens of milliseconds and identical ones are printed once with a
//! count: `Using key 1/1 (x13)`.

use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

use crate::report::Style;

/// How often gathered lines are printed.
pub(crate) const FLUSH_EVERY: Duration = Duration::from_millis(40);

/// The live log's shared state: cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct LiveLog {
    inner: Arc<Mutex<Inner>>,
    style: Style,
}

#[derive(Debug)]
struct Inner {
    start: Instant,
    pending: Vec<Line>,
}

#[derive(Debug)]
struct Line {
    at: Duration,
    level: Level,
    library: bool,
    message: String,
}

impl LiveLog {
    pub(crate) fn new(style: Style) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                start: Instant::now(),
                pending: Vec::new(),
            })),
            style,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Times from now on count from zero.
    pub(crate) fn restart(&self) {
        self.lock().start = Instant::now();
    }

    /// Prints what has gathered, identical lines once with a count.
    pub(crate) fn flush(&self) {
        let lines = std::mem::take(&mut self.lock().pending);
        if lines.is_empty() {
            return;
        }
        // Group identical lines, in order of first appearance.
        let mut groups: Vec<(&Line, usize)> = Vec::new();
        for line in &lines {
            match groups
                .iter_mut()
                .find(|(seen, _)| seen.level == line.level && seen.message == line.message)
            {
                Some((_, count)) => *count += 1,
                None => groups.push((line, 1)),
            }
        }
        let mut out = String::new();
        for (line, count) in groups {
            let s = self.style;
            let (tag, colour) = match (line.level, line.library) {
                (Level::ERROR, _) => ("error", s.red()),
                (Level::WARN, true) => ("layer", s.yellow()),
                (Level::WARN, false) => ("429! ", s.red()),
                (_, true) => ("layer", s.dim()),
                (_, false) => ("done ", s.green()),
            };
            let times = if count > 1 {
                format!(" {}(x{count}){}", s.bold(), s.reset())
            } else {
                String::new()
            };
            let _ = writeln!(
                out,
                "  {}{:>7.3}s{}  {colour}{tag}{}  {}{times}",
                s.dim(),
                line.at.as_secs_f64(),
                s.reset(),
                s.reset(),
                line.message,
            );
        }
        let mut stdout = std::io::stdout().lock();
        let _ = stdout.write_all(out.as_bytes());
        let _ = stdout.flush();
    }

    /// The tracing layer that feeds this log.
    pub(crate) fn layer(&self) -> LiveLayer {
        LiveLayer { log: self.clone() }
    }
}

/// A `tracing_subscriber` layer that hands the library's and the demo's events to a
/// [`LiveLog`].
#[derive(Debug)]
pub(crate) struct LiveLayer {
    log: LiveLog,
}

impl<S: Subscriber> Layer<S> for LiveLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let meta = event.metadata();
        let library = meta.target().starts_with("tower_key_rotation");
        if !(library || meta.target() == "demo") || *meta.level() > Level::DEBUG {
            return;
        }
        let mut message = Message(String::new());
        event.record(&mut message);
        let mut inner = self.log.lock();
        let at = inner.start.elapsed();
        inner.pending.push(Line {
            at,
            level: *meta.level(),
            library,
            message: message.0,
        });
    }
}

/// Collects an event's `message` field.
struct Message(String);

impl Visit for Message {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.push_str(value);
        }
    }
}
