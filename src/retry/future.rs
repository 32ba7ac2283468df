//! Future types of [`Retry`](super::Retry): one request's attempts, and the waits between them.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http::{Request, Response};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower_service::Service;

use crate::BoxError;
use crate::error::NoKeyAvailable;
use crate::retry::policy::Replay;
use crate::retry::{Attempts, ReplayBody, RetryPolicy};
use crate::route::Waited;

pin_project! {
    /// Response future of [`Retry`](super::Retry).
    ///
    /// ```text
    ///   Called ──(answer the policy retries)──► Readying ──(a key)──► Called
    ///   Called ──(any other answer)──► done
    ///   Readying ──(the wait budget ends)──► done: NoKeyAvailable
    /// ```
    ///
    /// A final answer after more than one attempt, or after waiting for a key, carries an
    /// [`Attempts`] extension.
    pub struct ResponseFuture<S, B>
    where
        S: Service<Request<ReplayBody<B>>>,
    {
        #[pin]
        state: State<S::Future>,
        service: S,
        policy: RetryPolicy,
        // What the next attempt is rebuilt from (`None`: no more attempts).
        replay: Option<Replay<B>>,
        arrival: Instant,
        attempts: u32,
        // Time spent waiting for a key so far.
        waited: Duration,
        // The end of the wait budget, armed when a retry has to wait.
        budget: Option<Pin<Box<Sleep>>>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        // An attempt is on its way.
        Called { #[pin] future: F },
        // Waiting for the inner service (and so a key) to be ready for the next attempt,
        // since the given instant.
        Readying { since: Instant },
    }
}

impl<S, B> ResponseFuture<S, B>
where
    S: Service<Request<ReplayBody<B>>>,
{
    pub(crate) fn new(
        future: S::Future,
        service: S,
        policy: RetryPolicy,
        replay: Option<Replay<B>>,
        arrival: Instant,
        waited: Duration,
    ) -> Self {
        Self {
            state: State::Called { future },
            service,
            policy,
            replay,
            arrival,
            attempts: 1,
            waited,
            budget: None,
        }
    }
}

impl<S, B, R> Future for ResponseFuture<S, B>
where
    S: Service<Request<ReplayBody<B>>, Response = Response<R>, Error = BoxError>,
{
    type Output = Result<Response<R>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let budget_end = this
            .policy
            .pool
            .max_wait()
            .and_then(|wait| this.arrival.checked_add(wait));
        loop {
            match this.state.as_mut().project() {
                StateProj::Called { future } => {
                    let mut result = ready!(future.poll(cx));
                    // A routed request waits for its key in the key layer's future.
                    if let Some(waited) = result
                        .as_ref()
                        .ok()
                        .and_then(|response| response.extensions().get::<Waited>())
                    {
                        *this.waited += waited.0;
                    }
                    let again = match this.replay.as_ref() {
                        Some(replay) => {
                            this.policy
                                .should_retry(replay.tried(), &result, budget_end)
                        }
                        None => false,
                    };
                    if !again {
                        if let Ok(response) = &mut result {
                            let no_key_in_time = this.policy.no_key_in_time;
                            if *this.attempts > 1 || !this.waited.is_zero() || no_key_in_time {
                                response.extensions_mut().insert(Attempts {
                                    count: *this.attempts,
                                    waited: *this.waited,
                                    no_key_in_time,
                                });
                            }
                        }
                        return Poll::Ready(result);
                    }
                    // The refusal (and with its body, its key's slot) goes now.
                    drop(result);
                    this.state.set(State::Readying {
                        since: Instant::now(),
                    });
                }
                StateProj::Readying { since } => {
                    let since = *since;
                    match this.service.poll_ready(cx) {
                        Poll::Ready(Ok(())) => {}
                        Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                        Poll::Pending => {
                            let Some(end) = budget_end else {
                                return Poll::Pending;
                            };
                            let budget = this
                                .budget
                                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(end)));
                            ready!(budget.as_mut().poll(cx));
                            let retry_after = this
                                .policy
                                .pool
                                .earliest_return_in()
                                .filter(|wait| !wait.is_zero())
                                .unwrap_or(Duration::from_secs(1));
                            let waited = *this.waited + since.elapsed();
                            return Poll::Ready(Err(
                                NoKeyAvailable::new(retry_after, waited).into()
                            ));
                        }
                    }
                    *this.waited += since.elapsed();
                    let request = this
                        .replay
                        .take()
                        .expect("a retry is decided only with a copy of the request")
                        .into_request();
                    *this.replay = this.policy.replay(&request);
                    *this.attempts += 1;
                    let future = this.service.call(request);
                    this.state.set(State::Called { future });
                }
            }
        }
    }
}

impl<S, B> fmt::Debug for ResponseFuture<S, B>
where
    S: Service<Request<ReplayBody<B>>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("attempts", &self.attempts)
            .field("waited", &self.waited)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}
