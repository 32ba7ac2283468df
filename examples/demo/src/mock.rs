//! A mock LLM provider on 127.0.0.1 that limits each key the way real ones do.
//!
//! Per key: at most `concurrency` completions at once and at most `rate` accepted requests
//! in any sliding `window`. Excess is answered at once with `429 Too Many Requests`,
//! `Retry-After` (whole seconds, rounded up) and `retry-after-ms` (exact, as OpenAI sends
//! it). An accepted request takes exactly `latency`. Every request is logged with its key's
//! position and its times, so the report can draw a timeline and check the limits held.

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
    /// why not and how long to wait.
    fn admit(&self, key: usize) -> Result<(usize, Instant), (Refusal, Duration)> {
        let limits = self.limits;
        let mut inner = self.lock();
        // Read the clock under the lock, so that the log's times are in admission order.
        let now = Instant::now();
        let slot = &mut inner.keys[key];
        while slot
            .accepted
            .front()
            .is_some_and(|&t| now.saturating_duration_since(t) >= limits.window)
        {
            slot.accepted.pop_front();
        }
        let verdict = if slot.ends.len() >= limits.concurrency as usize {
            let first_free = slot.ends.iter().min().copied().unwrap_or(now);
            Err((
                Refusal::Concurrency,
                first_free.saturating_duration_since(now),
            ))
        } else if slot.accepted.len() >= limits.rate as usize {
            let oldest = slot.accepted.front().copied().unwrap_or(now);
            Err((
                Refusal::Rate,
                (oldest + limits.window).saturating_duration_since(now),
            ))
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
            outcome: verdict.map(|_| Duration::ZERO).map_err(|(r, _)| r),
        });
        verdict
            .map(|end| (entry, end))
            .map_err(|(refusal, wait)| (refusal, wait + RETRY_AFTER_SLACK))
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
            let mut response = json(
                StatusCode::OK,
                format!(
                    r#"{{"object":"chat.completion","choices":[{{"index":0,"message":{{"role":"assistant","content":"A well-written section (key {})."}},"finish_reason":"stop"}}]}}"#,
                    key + 1
                ),
            );
            response
                .headers_mut()
                .insert(KEY_POSITION_HEADER, (key + 1).into());
            Ok(response)
        }
        Err((refusal, wait)) => {
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
            headers.insert(KEY_POSITION_HEADER, (key + 1).into());
            Ok(response)
        }
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
