//! [`Attempts`]: a request extension that follows a request's attempts at the upstream, for
//! the access log (attempts, time waited for a key) and for a client that goes away (is
//! an attempt at the provider right now?).
//!
//! [`AttemptTimerLayer`] sits just inside `KeyRotation`, so it sees each attempt from the
//! moment a key is placed on it to its response head (or error); every clone of the
//! request made for a retry carries the same record.

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tower::{Layer, Service};

/// The attempts of one request, shared by its clones.
#[derive(Clone)]
pub(crate) struct Attempts(Arc<Shared>);

struct Shared {
    totals: Mutex<Totals>,
    /// Attempts at the upstream right now (0 or 1: attempts follow one another).
    at_upstream: watch::Sender<u32>,
}

#[derive(Default)]
struct Totals {
    started: u32,
    /// Time spent at the upstream by the attempts that ended.
    upstream: Duration,
}

impl Attempts {
    pub(crate) fn new() -> Self {
        Self(Arc::new(Shared {
            totals: Mutex::default(),
            at_upstream: watch::Sender::new(0),
        }))
    }

    /// Attempts started so far.
    pub(crate) fn count(&self) -> u32 {
        self.totals().started
    }

    /// Time spent at the upstream by the attempts that ended.
    pub(crate) fn upstream_time(&self) -> Duration {
        self.totals().upstream
    }

    /// Is an attempt at the upstream now (a key on it, its response head not yet back)?
    pub(crate) fn at_upstream(&self) -> bool {
        *self.0.at_upstream.borrow() > 0
    }

    /// Resolves when no attempt is at the upstream.
    pub(crate) async fn none_at_upstream(&self) {
        let mut at_upstream = self.0.at_upstream.subscribe();
        // The sender lives in `self`: the channel cannot close while we wait.
        let _ = at_upstream.wait_for(|n| *n == 0).await;
    }

    fn start(&self) -> Instant {
        self.totals().started += 1;
        self.0.at_upstream.send_modify(|n| *n += 1);
        Instant::now()
    }

    fn end(&self, started: Instant) {
        self.totals().upstream += started.elapsed();
        self.0.at_upstream.send_modify(|n| *n = n.saturating_sub(1));
    }

    fn totals(&self) -> std::sync::MutexGuard<'_, Totals> {
        // Nothing panics while holding the lock; a poisoned one still holds valid counts.
        self.0.totals.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Wraps the service inside `KeyRotation` in an [`AttemptTimer`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct AttemptTimerLayer;

impl<S> Layer<S> for AttemptTimerLayer {
    type Service = AttemptTimer<S>;
    fn layer(&self, inner: S) -> AttemptTimer<S> {
        AttemptTimer { inner }
    }
}

/// Records each attempt in the request's [`Attempts`], if it carries one.
#[derive(Debug, Clone)]
pub(crate) struct AttemptTimer<S> {
    inner: S,
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
        let attempt = req.extensions().get::<Attempts>().cloned().map(|attempts| {
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
