//! A mock LLM provider on 127.0.0.1 that limits each key the way real ones do.
//!
//! Per key: at most `concurrency` completions at once and at most `rate` accepted requests
//! in any sliding `window`. Excess is answered at once with `429 Too Many Requests`,
//! `Retry-After` (whole seconds, rounded up) and `retry-after-ms` (exact, as OpenAI sends
//! it). An accepted request takes exactly `latency`. Every request is logged with its key's
//! position and its times, so the report can draw a timeline and check the limits held.
//!
//! Like OpenAI, the provider reports the rate window on its answers: every completion
//! carries `x-ratelimit-limit-requests`, `x-ratelimit-remaining-requests` (what the window
//! has left as the answer leaves) and `x-ratelimit-reset-requests` (a Go duration such as
//! `1.2s` or `480ms`), and so does a refusal for the window, with `remaining` at 0. A
//! refusal for concurrency is a plain 429 with `Retry-After` only: OpenAI and Anthropic
//! report no concurrency limit in headers, and the window is not what refused it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Extra wait added to every `Retry-After`, so a caller that comes back exactly on time
/// finds the slot already free (timers on both sides fire within a millisecond or so).
const RETRY_AFTER_SLACK: Duration = Duration::from_millis(10);

/// OpenAI's request-window headers.
const LIMIT_REQUESTS: &str = "x-ratelimit-limit-requests";
const REMAINING_REQUESTS: &str = "x-ratelimit-remaining-requests";
const RESET_REQUESTS: &str = "x-ratelimit-reset-requests";

/// Response header naming the 1-based position of the key the provider recognised, so the
/// demo can say which key served a section without ever seeing a key value.
pub(crate) const KEY_POSITION_HEADER: &str = "x-demo-key-position";

/// What the provider allows each key.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Completions in progress at once, per key.
    pub(crate) concurrency: u32,
    /// Accepted requests per sliding window, per key.
    pub(crate) rate: u32,
    /// The window of `rate`.
    pub(crate) window: Duration,
    /// Time to produce one completion.
    pub(crate) latency: Duration,
}

/// Why the provider refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The key already had `concurrency` completions in progress.
    Concurrency,
    /// The key had used its `rate` requests of the current window.
    Rate,
}

/// A key's rate window at one moment, as the rate-limit headers report it.
#[derive(Debug, Clone, Copy)]
struct Window {
    /// Requests the window would still accept now.
    remaining: u32,
    /// How long until the window accepts again: until its oldest request leaves it (when
    /// none remain), else until its newest does (every request available again).
    reset: Duration,
}

/// One request as the provider saw it; times are from the provider's start.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Attempt {
    /// 0-based index of the key.
    pub(crate) key: usize,
    /// When the request arrived.
    pub(crate) arrived: Duration,
    /// `Ok(end)` if accepted (the completion ran from `arrived` to `end`), or why it was
    /// refused.
    pub(crate) outcome: Result<Duration, Refusal>,
}

/// A running mock provider. Dropping it stops the server and closes its connections.
#[derive(Debug)]
pub(crate) struct MockProvider {
    addr: SocketAddr,
    state: Arc<State>,
    tasks: JoinSet<()>,
}

#[derive(Debug)]
struct State {
    /// The `Authorization` value of each key, in position order.
    credentials: Vec<String>,
    limits: Limits,
    epoch: Instant,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    keys: Vec<KeyState>,
    log: Vec<Attempt>,
}

#[derive(Debug, Default)]
struct KeyState {
    /// When each completion in progress ends.
    ends: Vec<Instant>,
    /// Arrival times of the accepted requests still inside the window, oldest first.
    accepted: std::collections::VecDeque<Instant>,
    /// The most completions in progress at once, as counted here.
    max_in_flight: u32,
}

impl KeyState {
    /// Drops the accepted requests that left the window by `now`, and reports what is left.
    fn window(&mut self, now: Instant, limits: &Limits) -> Window {
        while self
            .accepted
            .front()
            .is_some_and(|&t| now.saturating_duration_since(t) >= limits.window)
        {
            self.accepted.pop_front();
        }
        let remaining = limits.rate.saturating_sub(self.accepted.len() as u32);
        let until = if remaining == 0 {
            self.accepted.front()
        } else {
            self.accepted.back()
        };
        let reset = until.map_or(Duration::ZERO, |&t| {
            (t + limits.window).saturating_duration_since(now)
        });
        Window { remaining, reset }
    }
}

impl MockProvider {
    /// Starts a provider on an ephemeral port of 127.0.0.1 that knows `keys`
    /// (sent as `Authorization: Bearer <key>`).
    pub(crate) async fn start(keys: &[String], limits: Limits) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            credentials: keys.iter().map(|k| format!("Bearer {k}")).collect(),
            limits,
            epoch: Instant::now(),
            inner: Mutex::new(Inner {
                keys: keys.iter().map(|_| KeyState::default()).collect(),
                log: Vec::new(),
            }),
        });
        let mut tasks = JoinSet::new();
        let server_state = state.clone();
        tasks.spawn(async move {
            // Connections live in their own set, aborted with the accept loop.
            let mut connections = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let state = server_state.clone();
                let service = hyper::service::service_fn(move |req| handle(state.clone(), req));
                connections.spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
                // Reap finished connections so the set does not grow.
                while connections.try_join_next().is_some() {}
            }
        });
        Ok(Self { addr, state, tasks })
    }

    /// The address to send requests to.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every request seen so far, in arrival order.
    pub(crate) fn log(&self) -> Vec<Attempt> {
        self.state.lock().log.clone()
    }

    /// The most completions in progress at once, per key, as counted while serving.
    pub(crate) fn max_in_flight(&self) -> Vec<u32> {
        self.state
            .lock()
            .keys
            .iter()
            .map(|k| k.max_in_flight)
            .collect()
    }

    /// Stops accepting and closes open connections.
    pub(crate) fn shutdown(&mut self) {
        self.tasks.abort_all();
    }
}

impl Drop for MockProvider {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl State {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Nothing panics while holding the lock; a poisoned one still holds valid data.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Admits a request on `key` now (returning its log entry and when it ends), or says
    /// why not, how long to wait, and the key's rate window.
    fn admit(&self, key: usize) -> Result<(usize, Instant), (Refusal, Duration, Window)> {
        let limits = self.limits;
        let mut inner = self.lock();
        // Read the clock under the lock, so that the log's times are in admission order.
        let now = Instant::now();
        let slot = &mut inner.keys[key];
        let window = slot.window(now, &limits);
        let verdict = if slot.ends.len() >= limits.concurrency as usize {
            let first_free = slot.ends.iter().min().copied().unwrap_or(now);
            Err((
                Refusal::Concurrency,
                first_free.saturating_duration_since(now),
                window,
            ))
        } else if window.remaining == 0 {
            Err((Refusal::Rate, window.reset, window))
        } else {
            let end = now + limits.latency;
            slot.ends.push(end);
            slot.accepted.push_back(now);
            slot.max_in_flight = slot.max_in_flight.max(slot.ends.len() as u32);
            Ok(end)
        };
        let entry = inner.log.len();
        inner.log.push(Attempt {
            key,
            arrived: now.saturating_duration_since(self.epoch),
            // An accepted request's end is filled in by `finish`.
            outcome: verdict.map(|_| Duration::ZERO).map_err(|(r, _, _)| r),
        });
        verdict
            .map(|end| (entry, end))
            .map_err(|(refusal, wait, window)| (refusal, wait + RETRY_AFTER_SLACK, window))
    }

    /// The key's rate window now, as an answer leaving now reports it.
    fn window(&self, key: usize) -> Window {
        let limits = self.limits;
        let mut inner = self.lock();
        let now = Instant::now();
        inner.keys[key].window(now, &limits)
    }

    /// Ends the completion of log entry `entry` on `key`, due at `end`.
    fn finish(&self, key: usize, entry: usize, end: Instant) {
        let mut inner = self.lock();
        let finished = Instant::now().saturating_duration_since(self.epoch);
        let slot = &mut inner.keys[key];
        if let Some(i) = slot.ends.iter().position(|&e| e == end) {
            slot.ends.swap_remove(i);
        }
        inner.log[entry].outcome = Ok(finished);
    }
}

async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let credential = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let Some(key) = state.credentials.iter().position(|c| c == credential) else {
        return Ok(json(
            StatusCode::UNAUTHORIZED,
            r#"{"error":{"code":"1000","message":"authentication failed"}}"#.into(),
        ));
    };
    // Read the prompt as a real provider would, before deciding.
    let _prompt = req.into_body().collect().await;
    match state.admit(key) {
        Ok((entry, end)) => {
            // Frees the slot even if the caller goes away mid-completion.
            let completion = Completion {
                state: state.clone(),
                key,
                entry,
                end,
            };
            tokio::time::sleep_until(end).await;
            // The slot is free before the answer leaves, as at a real provider.
            drop(completion);
            let window = state.window(key);
            let mut response = json(
                StatusCode::OK,
                format!(
                    r#"{{"object":"chat.completion","choices":[{{"index":0,"message":{{"role":"assistant","content":"A well-written section (key {})."}},"finish_reason":"stop"}}]}}"#,
                    key + 1
                ),
            );
            let headers = response.headers_mut();
            insert_window(headers, state.limits.rate, window);
            headers.insert(KEY_POSITION_HEADER, (key + 1).into());
            Ok(response)
        }
        Err((refusal, wait, window)) => {
            let message = match refusal {
                Refusal::Concurrency => "too many concurrent requests for this API key",
                Refusal::Rate => "rate limit reached for requests on this API key",
            };
            let mut response = json(
                StatusCode::TOO_MANY_REQUESTS,
                format!(r#"{{"error":{{"code":"429","message":"{message}"}}}}"#),
            );
            let ms = wait.as_millis().max(1);
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            let headers = response.headers_mut();
            headers.insert(header::RETRY_AFTER, secs.max(1).into());
            headers.insert(
                "retry-after-ms",
                u64::try_from(ms).unwrap_or(u64::MAX).into(),
            );
            if refusal == Refusal::Rate {
                insert_window(headers, state.limits.rate, window);
            }
            headers.insert(KEY_POSITION_HEADER, (key + 1).into());
            Ok(response)
        }
    }
}

/// Adds OpenAI's request-window headers for `window`, of `rate` requests.
fn insert_window(headers: &mut header::HeaderMap, rate: u32, window: Window) {
    headers.insert(LIMIT_REQUESTS, rate.into());
    headers.insert(REMAINING_REQUESTS, window.remaining.into());
    let reset = go_duration(window.reset);
    headers.insert(
        RESET_REQUESTS,
        header::HeaderValue::try_from(reset).expect("a duration is a valid header value"),
    );
}

/// Formats a duration as Go (and so OpenAI) prints one, to the millisecond rounded up so a
/// caller that waits for it is never early: `0s`, `480ms`, `1.2s`, `6m0s`.
fn go_duration(d: Duration) -> String {
    let ms = d.as_nanos().div_ceil(1_000_000);
    if ms == 0 {
        return "0s".to_owned();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (minutes, ms) = (ms / 60_000, ms % 60_000);
    let seconds = format!("{}.{:03}", ms / 1000, ms % 1000);
    let seconds = seconds.trim_end_matches('0').trim_end_matches('.');
    match minutes {
        0 => format!("{seconds}s"),
        m => format!("{m}m{seconds}s"),
    }
}

/// A completion in progress; dropping it frees the key's slot.
struct Completion {
    state: Arc<State>,
    key: usize,
    entry: usize,
    end: Instant,
}

impl Drop for Completion {
    fn drop(&mut self) {
        self.state.finish(self.key, self.entry, self.end);
    }
}

fn json(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use tower_key_rotation::classify::learned_reset;

    use super::*;

    #[test]
    fn durations_print_as_go_prints_them() {
        let cases = [
            (Duration::ZERO, "0s"),
            (Duration::from_micros(1), "1ms"),
            (Duration::from_millis(480), "480ms"),
            (Duration::from_millis(1000), "1s"),
            (Duration::from_millis(1200), "1.2s"),
            (Duration::from_millis(1234), "1.234s"),
            (Duration::from_secs(360), "6m0s"),
            (Duration::from_millis(61_500), "1m1.5s"),
        ];
        for (d, text) in cases {
            assert_eq!(go_duration(d), text, "{d:?}");
        }
    }

    #[test]
    fn a_spent_window_reads_as_one_to_the_library_and_a_window_with_room_does_not() {
        let mut headers = header::HeaderMap::new();
        let spent = Window {
            remaining: 0,
            reset: Duration::from_millis(480),
        };
        insert_window(&mut headers, 3, spent);
        assert_eq!(
            learned_reset(&headers, SystemTime::now()),
            Some(Duration::from_millis(480))
        );
        let room = Window {
            remaining: 1,
            reset: Duration::from_millis(900),
        };
        insert_window(&mut headers, 3, room);
        assert_eq!(learned_reset(&headers, SystemTime::now()), None);
    }

    #[test]
    fn the_window_frees_its_oldest_request_first() {
        let limits = Limits {
            concurrency: 2,
            rate: 3,
            window: Duration::from_secs(1),
            latency: Duration::from_millis(500),
        };
        let start = Instant::now();
        let mut key = KeyState::default();
        let at = |ms| start + Duration::from_millis(ms);
        key.accepted.extend([at(0), at(300), at(600)]);
        // Spent: it accepts again when the request of 0 ms leaves.
        let w = key.window(at(800), &limits);
        assert_eq!((w.remaining, w.reset), (0, Duration::from_millis(200)));
        // One left: it is whole again when the request of 600 ms leaves.
        let w = key.window(at(1000), &limits);
        assert_eq!((w.remaining, w.reset), (1, Duration::from_millis(600)));
    }
}
