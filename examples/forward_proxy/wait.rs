//! [`BoundedWait`]: a request waits for a free key at most `--max-wait`, and not at all
//! when no key can come back in time.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};
use tower::{BoxError, Layer, Service};
use tower_key_rotation::KeyPool;

/// No key became free within the wait budget: the client gets a 503 with `Retry-After`.
#[derive(Debug)]
pub(crate) struct NoKeyAvailable {
    /// When the earliest resting key comes back (at least a second).
    pub(crate) retry_after: Duration,
}

impl fmt::Display for NoKeyAvailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "no API key is free; the earliest is back in {:.1?}",
            self.retry_after
        )
    }
}

impl std::error::Error for NoKeyAvailable {}

#[derive(Clone, Debug)]
pub(crate) struct BoundedWaitLayer {
    pub(crate) pool: KeyPool,
    pub(crate) max_wait: Duration,
}

impl<S> Layer<S> for BoundedWaitLayer {
    type Service = BoundedWait<S>;
    fn layer(&self, inner: S) -> BoundedWait<S> {
        BoundedWait {
            inner,
            pool: self.pool.clone(),
            max_wait: self.max_wait,
            deadline: None,
        }
    }
}

/// Bounds `KeyRotation::poll_ready`, which otherwise waits as long as it takes.
pub(crate) struct BoundedWait<S> {
    inner: S,
    pool: KeyPool,
    max_wait: Duration,
    /// Armed on the first `Pending`: a request that finds a key at once never pays for a
    /// timer.
    deadline: Option<Pin<Box<Sleep>>>,
}

impl<S> BoundedWait<S> {
    /// Fail fast: if every key is disabled or cooling down past the deadline, waiting
    /// cannot help, so say so now instead of at the deadline. A key merely at its
    /// in-flight cap may free any moment, so it keeps us waiting.
    fn hopeless(&self, remaining: Duration) -> Option<NoKeyAvailable> {
        let snapshot = self.pool.snapshot();
        let mut earliest: Option<Duration> = None;
        for key in &snapshot {
            if key.disabled {
                continue;
            }
            match key.cooling_down_for {
                Some(wait) if wait > remaining => {
                    earliest = Some(earliest.map_or(wait, |e| e.min(wait)));
                }
                _ => return None,
            }
        }
        // All disabled: KeyRotation reports that itself.
        earliest.map(|wait| NoKeyAvailable {
            retry_after: wait.max(Duration::from_secs(1)),
        })
    }
}

impl<S, Req> Service<Req> for BoundedWait<S>
where
    S: Service<Req, Error = BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if let Poll::Ready(ready) = self.inner.poll_ready(cx) {
            self.deadline = None;
            return Poll::Ready(ready);
        }
        let max_wait = self.max_wait;
        let deadline = self
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(max_wait)))
            .deadline();
        let remaining = deadline.saturating_duration_since(Instant::now());
        if let Some(err) = self.hopeless(remaining) {
            self.deadline = None;
            return Poll::Ready(Err(err.into()));
        }
        let sleep = self.deadline.as_mut().expect("armed above");
        if sleep.as_mut().poll(cx).is_ready() {
            self.deadline = None;
            let retry_after = self
                .pool
                .earliest_return_in()
                .unwrap_or_default()
                .max(Duration::from_secs(1));
            return Poll::Ready(Err(NoKeyAvailable { retry_after }.into()));
        }
        Poll::Pending
    }

    fn call(&mut self, req: Req) -> S::Future {
        self.inner.call(req)
    }
}

impl<S: Clone> Clone for BoundedWait<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            pool: self.pool.clone(),
            max_wait: self.max_wait,
            deadline: None,
        }
    }
}

impl<S> fmt::Debug for BoundedWait<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BoundedWait")
            .field("max_wait", &self.max_wait)
            .finish_non_exhaustive()
    }
}
