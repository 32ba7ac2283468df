//! Cancellation safety: requests whose futures or bodies are dropped at any await point
//! never leak an in-flight count.
//!
//! The run is deterministic: seeded randomness, and a paused clock that moves by a fixed
//! step per round. (On the real clock, how many 1 ms rests ended between two rounds
//! depended on the machine's speed, and so did how many requests completed.)

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use tower::{Service, ServiceExt};
use tower_key_rotation::{BoxError, KeyPool, KeyRotation, KeySet, Selection};

/// A body of `frames` one-byte frames, each preceded by one `Pending`.
struct SlowBody {
    frames: u32,
    ready: bool,
}

impl Body for SlowBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.frames == 0 {
            return Poll::Ready(None);
        }
        if !self.ready {
            self.ready = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        self.ready = false;
        self.frames -= 1;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"x")))))
    }
}

/// Yields `Pending` `n` times before completing.
struct YieldTimes(u32);

impl std::future::Future for YieldTimes {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 == 0 {
            return Poll::Ready(());
        }
        self.0 -= 1;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// An upstream with random latency (in polls), random 429s (1 ms Retry-After) and 5xx.
fn inner()
-> impl Service<Request<()>, Response = Response<SlowBody>, Error = Infallible, Future: Send> + Clone
{
    tower::service_fn(|req: Request<()>| {
        let seed: u64 = req.headers()["x-seed"].to_str().unwrap().parse().unwrap();
        let mut rng = fastrand::Rng::with_seed(seed);
        async move {
            YieldTimes(rng.u32(0..3)).await;
            let status = match rng.u32(0..20) {
                0 => StatusCode::TOO_MANY_REQUESTS,
                1 => StatusCode::BAD_GATEWAY,
                _ => StatusCode::OK,
            };
            let mut response = Response::new(SlowBody {
                frames: rng.u32(0..4),
                ready: false,
            });
            *response.status_mut() = status;
            response
                .headers_mut()
                .insert("retry-after-ms", http::HeaderValue::from_static("1"));
            Ok(response)
        }
    })
}

async fn one_request<S>(service: KeyRotation<S>, seed: u64) -> Result<(), BoxError>
where
    S: Service<Request<()>, Response = Response<SlowBody>, Error = Infallible> + Clone,
{
    let request = Request::get("/")
        .header("x-seed", seed.to_string())
        .body(())
        .unwrap();
    let response = service.oneshot(request).await?;
    let mut body = response.into_body();
    while let Some(frame) = body.frame().await {
        frame?;
    }
    Ok(())
}

/// Time that passes per round of the loop below: a tenth of the upstream's 1 ms rests.
const STEP: Duration = Duration::from_micros(100);

#[tokio::test(start_paused = true)]
async fn requests_dropped_at_random_points_leak_no_in_flight_count() {
    for strategy in [Selection::RoundRobin, Selection::LeastInFlight] {
        let pool = KeyPool::builder(KeySet::parse("k1,k2,k3").unwrap())
            .selection(strategy)
            .max_in_flight_per_key(2)
            .build();
        let service = KeyRotation::new(inner(), pool.clone());
        let mut rng = fastrand::Rng::with_seed(7);
        let mut live = Vec::new();
        let (mut started, mut completed, mut dropped) = (0u32, 0u32, 0u32);

        // Up to 16 requests alive at once, each polled in random order and dropped with
        // some probability after any poll: inside poll_ready (waiting or holding a key),
        // inside the response future, or part-way through the body.
        while started < 10_000 || !live.is_empty() {
            if started < 10_000 && live.len() < 16 {
                let seed = rng.u64(..);
                live.push(tokio_test::task::spawn(one_request(service.clone(), seed)));
                started += 1;
            }
            let i = rng.usize(..live.len());
            if rng.u32(0..6) == 0 {
                drop(live.swap_remove(i));
                dropped += 1;
                continue;
            }
            if let Poll::Ready(result) = live[i].poll() {
                result.unwrap();
                drop(live.swap_remove(i));
                completed += 1;
            }
            tokio::time::advance(STEP).await;
        }

        let stats = pool.snapshot();
        assert!(
            stats.iter().all(|s| s.in_flight == 0),
            "{strategy:?}: {stats:?}"
        );
        // Every request ended one way or the other, and both ways were well exercised.
        assert_eq!(completed + dropped, started);
        assert!(
            completed > 1_000 && dropped > 1_000,
            "{completed} / {dropped}"
        );
        // Every request that reached the key got counted, and outcomes never exceed sends.
        for s in &stats {
            assert!(
                s.successes + s.rate_limited + s.failures <= s.requests,
                "{s:?}"
            );
        }
        // The pool is still usable: a fresh request goes through.
        tokio::time::timeout(Duration::from_secs(5), one_request(service.clone(), 1))
            .await
            .unwrap()
            .unwrap();
    }
}
