//! [`Attempts`]: follows a request's attempts at the upstream, for the access log (attempts,
//! time waited for a key) and for a client that goes away (is an attempt at the provider
//! right now?).
//!
//! [`AttemptTimerLayer`] sits just inside `KeyRotation`, so it sees each attempt from the
//! moment a key is placed on it to its response head (or error). The record is handed to
//! the clone of the client stack that serves the request ([`AttemptTimer::follow`]), not
//! carried as a request extension: the retry layer copies a request's extensions for each
//! possible retry, and with only its own `TriedKeys` there it shares instead of copying
//! (three allocations and their frees a request). The retry layer's clones of the stack follow the same record.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tower::{Layer, Service};

/// The attempts of one request, shared by its clones: one allocation, plain atomics (an
/// attempt costs two increments, a decrement and a `Notify` permit, no lock).
#[derive(Clone)]
pub(crate) struct Attempts(Arc<Shared>);

#[derive(Default)]
struct Shared {
    started: AtomicU32,
    /// Attempts at the upstream right now (0 or 1: attempts follow one another).
    at_upstream: AtomicU32,
    /// Time spent at the upstream by the attempts that ended, in nanoseconds.
    upstream_nanos: AtomicU64,
    /// A permit each time an attempt ends, for [`Attempts::none_at_upstream`].
    ended: Notify,
}

impl Attempts {
    pub(crate) fn new() -> Self {
        Self(Arc::default())
    }

    /// Attempts started so far.
    pub(crate) fn count(&self) -> u32 {
        self.0.started.load(Ordering::Relaxed)
    }

    /// Time spent at the upstream by the attempts that ended.
    pub(crate) fn upstream_time(&self) -> Duration {
        Duration::from_nanos(self.0.upstream_nanos.load(Ordering::Relaxed))
    }

    /// Is an attempt at the upstream now (a key on it, its response head not yet back)?
    pub(crate) fn at_upstream(&self) -> bool {
        self.0.at_upstream.load(Ordering::Acquire) > 0
    }

    /// Resolves when no attempt is at the upstream.
    pub(crate) async fn none_at_upstream(&self) {
        // `end` stores a permit even when no one waits yet, so an attempt that ends between
        // the check and the wait is not missed; a stale permit only costs one more check.
        while self.at_upstream() {
            self.0.ended.notified().await;
        }
    }

    fn start(&self) -> Instant {
        self.0.started.fetch_add(1, Ordering::Relaxed);
        self.0.at_upstream.fetch_add(1, Ordering::Release);
        Instant::now()
    }

    fn end(&self, started: Instant) {
        let nanos = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.0.upstream_nanos.fetch_add(nanos, Ordering::Relaxed);
        // Attempts at the upstream are counted up before they are counted down.
        self.0.at_upstream.fetch_sub(1, Ordering::Release);
        self.0.ended.notify_one();
    }
}

/// Wraps the service inside `KeyRotation` in an [`AttemptTimer`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct AttemptTimerLayer;

impl<S> Layer<S> for AttemptTimerLayer {
    type Service = AttemptTimer<S>;
    fn layer(&self, inner: S) -> AttemptTimer<S> {
        AttemptTimer {
            inner,
            attempts: None,
        }
    }
}

/// Records each attempt in the [`Attempts`] it follows, if any.
#[derive(Clone)]
pub(crate) struct AttemptTimer<S> {
    inner: S,
    attempts: Option<Attempts>,
}

impl<S> AttemptTimer<S> {
    /// Records this service's (and its clones') attempts in `attempts`: for a clone of
    /// the stack that serves one request.
    pub(crate) fn follow(&mut self, attempts: Attempts) {
        self.attempts = Some(attempts);
    }
}

impl<S, B> Service<http::Request<B>> for AttemptTimer<S>
where
    S: Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = AttemptFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let attempt = self.attempts.clone().map(|attempts| {
            let started = attempts.start();
            Attempt { attempts, started }
        });
        AttemptFuture {
            inner: self.inner.call(req),
            attempt,
        }
    }
}

/// One attempt at the upstream: ends when its future resolves or is dropped.
struct Attempt {
    attempts: Attempts,
    started: Instant,
}

impl Drop for Attempt {
    fn drop(&mut self) {
        self.attempts.end(self.started);
    }
}

pin_project_lite::pin_project! {
    /// The inner future, ending the attempt when it resolves (or is dropped).
    pub(crate) struct AttemptFuture<F> {
        #[pin]
        inner: F,
        attempt: Option<Attempt>,
    }
}

impl<F: Future> Future for AttemptFuture<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let output = std::task::ready!(this.inner.poll(cx));
        this.attempt.take();
        Poll::Ready(output)
    }
}
