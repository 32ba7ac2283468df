//! [`ResponseFuture`]: classifies the response and hands the key's lease to the body; for
//! a routed request, first waits for a key that can take its route.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Buf;
use http::response::Parts;
use http::{Request, Response};
use http_body::{Body, Frame};
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower_service::Service;

use crate::BoxError;
use crate::auth::Placement;
use crate::body::TrackedBody;
use crate::classify::Outcome;
use crate::classify::learned_reset_at;
use crate::pool::{Admit, KeyPool, Lease, Reserve, Waiter};
use crate::retry::TriedKeys;
use crate::route::{RequestHead, Route, Waited};

pin_project! {
    /// Response future of [`KeyRotation`](crate::KeyRotation).
    ///
    /// When the response head arrives, the pool's classifier decides what it means for the
    /// key (success, 429, rejected) and the lease moves into the [`TrackedBody`]. A
    /// classifier that reads error bodies (the provider profiles) first buffers up to its
    /// limit of such a body, then hands it on in full. If this future is dropped first, the
    /// lease is given back.
    ///
    /// A routed request ([`crate::route`]) that found no key for its route in `call` waits
    /// here first, within the wait budget, holding the inner service `call` readied.
    ///
    /// ```text
    ///   Routing ──(a key for the route)──► Calling ──(the head)──► done
    ///   Routing ──(the budget ends, or every key is disabled)──► done: the error
    ///   Refused ──► done: the error
    /// ```
    ///
    /// A response whose outcome is not [`Outcome::Success`] carries that [`Outcome`] in its
    /// extensions, for layers outside (a retry policy) to read; one that refused the key
    /// ([`Outcome::KeyRejected`]) also carries the [`RejectedKey`](crate::RejectedKey).
    pub struct ResponseFuture<S, ReqB, B>
    where
        S: Service<Request<ReqB>>,
        B: Body,
    {
        #[pin]
        state: State<S::Future>,
        lease: Option<Lease>,
        // Boxed: only the rare path (an error body the classifier reads) has one, and
        // inline it would make every response future some 200 bytes larger to move.
        reading: Option<Box<ReadingBody<B>>>,
        // Boxed for the same reason: only a routed request that waits has one.
        routing: Option<Box<Routing<S, ReqB>>>,
        // How long a routed request waited for its key (zero if it did not).
        waited: Duration,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        /// The inner service's future, with the key's header on its request.
        Calling { #[pin] future: F },
        /// Waiting for a key that can take the request's route (in `routing`).
        Routing,
        /// No key could take the request (`poll_ready` found none, or the reservation went
        /// stale): the inner service was never called.
        Refused { error: Option<BoxError> },
    }
}

/// A routed request waiting for a key: the readied inner service and the request.
struct Routing<S, ReqB> {
    inner: S,
    request: Option<Request<ReqB>>,
    route: Route,
    pool: KeyPool,
    placement: Placement,
    waiter: Waiter,
    /// A lease the store shared with other replicas is admitting.
    admit: Option<Admit>,
    /// A lease whose tokens were booked ahead, and the wait until they fit.
    booked: Option<(Lease, Pin<Box<tokio::time::Sleep>>)>,
    deadline: Option<Instant>,
    since: Instant,
}

/// An error body being read for the classifier.
struct ReadingBody<B: Body> {
    head: Parts,
    body: Pin<Box<B>>,
    frames: VecDeque<Frame<B::Data>>,
    bytes: Vec<u8>,
    limit: usize,
}

impl<S, ReqB, B> ResponseFuture<S, ReqB, B>
where
    S: Service<Request<ReqB>>,
    B: Body,
{
    pub(crate) fn new(future: S::Future, lease: Lease) -> Self {
        Self {
            state: State::Calling { future },
            lease: Some(lease),
            reading: None,
            routing: None,
            waited: Duration::ZERO,
        }
    }

    pub(crate) fn refused(error: BoxError) -> Self {
        Self {
            state: State::Refused { error: Some(error) },
            lease: None,
            reading: None,
            routing: None,
            waited: Duration::ZERO,
        }
    }

    /// A routed request that waits for a key of `route` until `deadline`, then goes to
    /// `inner` (ready: `call` readied it).
    pub(crate) fn routing(
        inner: S,
        request: Request<ReqB>,
        route: Route,
        pool: KeyPool,
        placement: Placement,
        deadline: Option<Instant>,
    ) -> Self {
        Self {
            state: State::Routing,
            lease: None,
            reading: None,
            routing: Some(Box::new(Routing {
                inner,
                request: Some(request),
                route,
                pool,
                placement,
                waiter: Waiter::new(),
                admit: None,
                booked: None,
                deadline,
                since: Instant::now(),
            })),
            waited: Duration::ZERO,
        }
    }
}

impl<S, ReqB> Routing<S, ReqB>
where
    S: Service<Request<ReqB>>,
{
    /// Waits for a key of the route (admitted by the store, if one is shared), then sends
    /// the request with it.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<Result<(S::Future, Lease), BoxError>> {
        let lease = loop {
            if let Some((_, sleep)) = &mut self.booked {
                ready!(sleep.as_mut().poll(cx));
                let (lease, _) = self.booked.take().expect("booked");
                if lease.is_usable() {
                    break lease;
                }
                // Its key started resting meanwhile: its tokens go back; look again.
                continue;
            }
            if let Some(admit) = &mut self.admit {
                let admitted = ready!(Pin::new(admit).poll(cx));
                self.admit = None;
                match admitted {
                    // The store may have booked its tokens ahead.
                    Some(lease) => match lease.ready_at() {
                        Some(at) => {
                            self.booked = Some((lease, Box::pin(tokio::time::sleep_until(at))));
                            continue;
                        }
                        None => break lease,
                    },
                    // Full across the replicas: that key reads busy here now; look again.
                    None => continue,
                }
            }
            if self.route.candidate.is_some() {
                // A name new to the pool waits in the overflow bucket until the provider
                // accepts a request in it: then it has a bucket of its own, and moves there.
                let request = self
                    .request
                    .as_ref()
                    .expect("a routed request is sent once");
                let route = self.pool.route(&RequestHead::of(request));
                if route.bucket != self.route.bucket {
                    self.route = route;
                    self.waiter.reroute();
                }
            }
            let reserve =
                self.pool
                    .poll_reserve_route(&self.route, &mut self.waiter, self.deadline, cx);
            match ready!(reserve) {
                Reserve::Lease(lease) if lease.needs_admission() => {
                    self.admit = Some(lease.admit());
                }
                Reserve::Lease(lease) => match lease.ready_at() {
                    // Booked ahead: wait until its tokens fit.
                    Some(at) => self.booked = Some((lease, Box::pin(tokio::time::sleep_until(at)))),
                    None => break lease,
                },
                Reserve::NoKey(error) => return Poll::Ready(Err(error.into())),
                Reserve::AllDisabled(error) => return Poll::Ready(Err(error.into())),
                Reserve::TooLarge(error) => return Poll::Ready(Err(error.into())),
            }
        };
        let mut request = self.request.take().expect("a routed request is sent once");
        if let Some(tried) = request.extensions().get::<TriedKeys>() {
            tried.insert(lease.position());
        }
        self.placement.apply(&lease, &mut request);
        lease.mark_sent();
        Poll::Ready(Ok((self.inner.call(request), lease)))
    }
}

impl<S, ReqB, B, E> Future for ResponseFuture<S, ReqB, B>
where
    S: Service<Request<ReqB>, Response = Response<B>, Error = E>,
    B: Body,
    E: Into<BoxError>,
{
    type Output = Result<Response<TrackedBody<B>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let StateProj::Routing = this.state.as_mut().project() {
            let routing = this
                .routing
                .as_mut()
                .expect("a routing future has its request");
            let sent = ready!(routing.poll_send(cx));
            let waited = routing.since.elapsed();
            *this.routing = None;
            match sent {
                Ok((future, lease)) => {
                    *this.waited = waited;
                    *this.lease = Some(lease);
                    this.state.set(State::Calling { future });
                }
                Err(error) => {
                    this.state.set(State::Refused { error: None });
                    return Poll::Ready(Err(error));
                }
            }
        }
        if this.reading.is_none() {
            let result = match this.state.project() {
                StateProj::Calling { future } => ready!(future.poll(cx)),
                StateProj::Routing => unreachable!("left above"),
                StateProj::Refused { error } => {
                    let error = error
                        .take()
                        .expect("ResponseFuture polled after completion");
                    return Poll::Ready(Err(error));
                }
            };
            let lease = this
                .lease
                .as_ref()
                .expect("ResponseFuture polled after completion");
            let response = match result {
                Ok(response) => response,
                Err(error) => {
                    let error: BoxError = error.into();
                    // A request that never reached the provider (DNS, connect, TLS) says
                    // nothing about the key: not counted against it.
                    if !lease.classifier().is_unreached(&*error) {
                        lease.record(Outcome::Failure);
                    }
                    drop(this.lease.take());
                    return Poll::Ready(Err(error));
                }
            };
            let classifier = lease.classifier();
            let Some(limit) = classifier.body_limit(response.status()) else {
                let outcome = classifier.classify(response.status(), response.headers());
                let lease = this.lease.take().expect("lease present");
                return Poll::Ready(Ok(finish(response, outcome, lease, *this.waited)));
            };
            let (head, body) = response.into_parts();
            // The rare path (an error the classifier reads): box the body to poll it here
            // and hand it on afterwards.
            *this.reading = Some(Box::new(ReadingBody {
                head,
                body: Box::pin(body),
                frames: VecDeque::new(),
                bytes: Vec::new(),
                limit,
            }));
        }
        let reading = this.reading.as_mut().expect("reading an error body");
        let error = loop {
            if reading.bytes.len() >= reading.limit {
                break None;
            }
            match ready!(reading.body.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        let room = reading.limit - reading.bytes.len();
                        let chunk = data.chunk();
                        reading
                            .bytes
                            .extend_from_slice(&chunk[..chunk.len().min(room)]);
                    }
                    reading.frames.push_back(frame);
                }
                Some(Err(error)) => break Some(error),
                None => break None,
            }
        };
        let ReadingBody {
            head,
            body,
            frames,
            bytes,
            ..
        } = *this.reading.take().expect("reading an error body");
        let lease = this
            .lease
            .take()
            .expect("ResponseFuture polled after completion");
        let outcome = lease
            .classifier()
            .classify_with_body(head.status, &head.headers, &bytes);
        let body = TrackedBody::replaying(body, frames, error);
        Poll::Ready(Ok(finish(
            Response::from_parts(head, body),
            outcome,
            lease,
            *this.waited,
        )))
    }
}

/// Applies the outcome to the key and moves the lease into the body.
fn finish<B, T>(
    response: Response<T>,
    outcome: Outcome,
    lease: Lease,
    waited: Duration,
) -> Response<TrackedBody<B>>
where
    B: Body,
    T: Into<TrackedBody<B>>,
{
    // A refusal whose rate-limit headers say a window is used up is about rate, not
    // concurrency: the key must not learn a concurrency limit from it.
    let window_spent = outcome.is_rate_limited()
        && learned_reset_at(response.headers(), std::time::SystemTime::now).is_some();
    lease.record_answer(outcome, window_spent);
    // A lease in a bucket, or with a token cost: out of line, so that the others pay one
    // branch.
    let reservation = if lease.has_extras() {
        finish_extras(&response, outcome, &lease)
    } else {
        None
    };
    // `matches!`, not `==`: the derived comparison of the whole enum is a call.
    let rejected = matches!(outcome, Outcome::KeyRejected).then(|| lease.rejected_key());
    let mut response = response.map(|body| body.into().track(lease));
    if !matches!(outcome, Outcome::Success) {
        response.extensions_mut().insert(outcome);
    }
    if let Some(rejected) = rejected {
        response.extensions_mut().insert(rejected);
    }
    if !waited.is_zero() {
        response.extensions_mut().insert(Waited(waited));
    }
    if let Some(reservation) = reservation {
        response.extensions_mut().insert(reservation);
    }
    response
}

/// What an answer means for a lease in a bucket (the bucket confirmed) or with a token
/// cost (the token headers read, a refusal's tokens given back): its reservation, if any.
#[cold]
#[inline(never)]
fn finish_extras<T>(
    response: &Response<T>,
    outcome: Outcome,
    lease: &Lease,
) -> Option<crate::pool::TokenReservation> {
    if response.status().is_success() {
        lease.confirm_bucket();
    }
    let reservation = lease.reservation()?;
    // Only requests with a token cost read the token headers.
    lease.observe_tokens(response.headers());
    if outcome.is_rate_limited() {
        // Refused: the provider used none of it.
        reservation.refused();
    }
    Some(reservation)
}

impl<S, ReqB, B> fmt::Debug for ResponseFuture<S, ReqB, B>
where
    S: Service<Request<ReqB>>,
    B: Body,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("lease", &self.lease)
            .field("routing", &self.routing.is_some())
            .field("reading_error_body", &self.reading.is_some())
            .finish()
    }
}
