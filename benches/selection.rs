//! Cost of choosing a key and giving it back: `KeyPool::try_reserve()` and dropping the
//! `Lease`, for round-robin and least-in-flight, over 1 to 4,096 keys with 0 %, 50 % or 90 %
//! of them cooling down, on one thread and with two threads contending on one pool.
//!
//! The baselines sit in the same groups, so one run gives the ratios:
//!
//! - `atomic_fetch_add`: a bare `AtomicUsize::fetch_add(1) % n`, the physical floor of a
//!   round-robin shared between threads (it tracks nothing: no in-flight count, no release);
//! - `mutex_rotation`: the same rotation behind a `Mutex<usize>`;
//! - `tower_p2c`: tower's `balance::p2c` choosing among `n` always-ready services with
//!   `PendingRequests` load, then the call's response completing (its release). `Balance`
//!   needs `&mut self`, so two threads share it behind a `Mutex`.
//!
//! Every benchmark runs the same loop (`iters` operations per thread, timed per thread, the
//! slowest thread's time reported), and `Throughput::Elements(threads)` makes criterion report
//! the total selections per second, so 1 and 2 threads compare directly.
//!
//! `selection_affinity` puts the route-aware selection beside them, one thread, 3 to 256
//! keys: `KeyPool::try_reserve_route` for requests of 4,096 sessions in turn (each to its
//! key: no spill), the same with half the keys resting (half the sessions spilled and
//! remembered), and for requests naming no session, beside plain round-robin and
//! least-in-flight over the same pool.
//!
//! Before that group, the bench counts the allocations of 10,000 such selections (spills and
//! remembered sessions included), and of 10,000 selections in a pool with buckets (two
//! buckets in turn), with a counting global allocator, and stops if there is one.
//!
//! `side_by_side` runs every kind of selection through one loop (`one_route`, never
//! inlined): round-robin and least-in-flight without a router, the bucketed path, affinity,
//! and round-robin for requests naming no session in a pool with a router. One run gives
//! the ratios; `benches/selection_instructions.sh` counts each row's instructions.
//!
//! ```sh
//! cargo bench --bench selection
//! cargo bench --bench selection -- 'selection_1_thread/round_robin'   # a subset
//! cargo bench --bench selection -- side_by_side                       # the kinds side by side
//! bash benches/selection_instructions.sh                              # their instructions
//! ```

use std::convert::Infallible;
use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Barrier, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use std::alloc::System;

use criterion::{BenchmarkId, Criterion, Throughput};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use tokio::time::Instant;
use tower::Service;
use tower::balance::p2c::Balance;
use tower::discover::ServiceList;
use tower::load::{CompleteOnResponse, PendingRequestsDiscover};
use tower_key_rotation::route::{RequestHead, Route, Router};
use tower_key_rotation::{Backoff, KeyPool, KeySet, Selection, classify::Outcome};

/// Counts allocations, for the affinity group's check (selection allocates nothing, so the
/// count costs the measured loops nothing).
#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const KEY_COUNTS: [usize; 5] = [1, 3, 16, 256, 4096];
const COOLING_PERCENT: [usize; 3] = [0, 50, 90];
/// Longer than any benchmark run: a cooled key stays cooled throughout.
const LONG_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// The session of a request: its `x-session-id` header.
#[derive(Debug)]
struct SessionHeader;

impl Router for SessionHeader {
    fn affinity<'a>(&self, head: &RequestHead<'a>) -> Option<&'a [u8]> {
        head.headers.get("x-session-id").map(|v| v.as_bytes())
    }
}

/// A pool of `n` keys, `cooling_percent` of which (rounded down, evenly spread) are cooling
/// down after a 429 with a day-long `Retry-After`.
fn pool(n: usize, strategy: Selection, cooling_percent: usize) -> KeyPool {
    let list = (0..n)
        .map(|i| format!("bench-key-{i}"))
        .collect::<Vec<_>>()
        .join(",");
    let pool = KeyPool::builder(KeySet::parse(&list).expect("valid keys"))
        .selection(strategy)
        .backoff(Backoff::default().max_retry_after(LONG_RETRY_AFTER))
        .router(SessionHeader)
        .build();
    let cooling = n * cooling_percent / 100;
    for index in (0..n).filter(|&i| (i + 1) * cooling / n != i * cooling / n) {
        let lease = pool
            .try_reserve_where(|p| p == index + 1)
            .expect("a fresh key is available");
        lease.record(Outcome::RateLimited {
            retry_after: Some(LONG_RETRY_AFTER),
        });
    }
    let cooled = pool
        .snapshot()
        .iter()
        .filter(|key| key.cooling_down_for.is_some())
        .count();
    assert_eq!(cooled, cooling, "{n} keys, {cooling_percent}% cooling");
    pool
}

/// Runs `op` `iters` times on each of `threads` threads started together; returns the
/// slowest thread's time.
fn contended(threads: usize, iters: u64, op: impl Fn() + Sync) -> Duration {
    let start_line = Barrier::new(threads);
    std::thread::scope(|scope| {
        let runners: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    start_line.wait();
                    let start = Instant::now();
                    for _ in 0..iters {
                        op();
                    }
                    start.elapsed()
                })
            })
            .collect();
        runners
            .into_iter()
            .map(|runner| runner.join().expect("bench thread panicked"))
            .max()
            .unwrap_or_default()
    })
}

type Ready = std::future::Ready<Result<(), Infallible>>;
type ReadyService = tower::util::ServiceFn<fn(()) -> Ready>;
type P2c = Balance<PendingRequestsDiscover<ServiceList<Vec<ReadyService>>>, ()>;

fn answer(_: ()) -> Ready {
    std::future::ready(Ok(()))
}

/// tower's p2c balancer over `n` always-ready services, with every service discovered and
/// ready.
fn p2c(n: usize) -> P2c {
    let services = vec![tower::service_fn(answer as fn(()) -> Ready); n];
    let discover =
        PendingRequestsDiscover::new(ServiceList::new(services), CompleteOnResponse::default());
    let mut balance = Balance::new(discover);
    let mut cx = Context::from_waker(Waker::noop());
    assert!(matches!(balance.poll_ready(&mut cx), Poll::Ready(Ok(()))));
    assert_eq!(balance.len(), n);
    balance
}

/// One p2c choice: ready a service (power of two choices by pending requests), call it, and
/// complete the response, which releases its pending-request count.
#[inline]
fn p2c_choose_and_release(balance: &mut P2c) {
    let mut cx = Context::from_waker(Waker::noop());
    match balance.poll_ready(&mut cx) {
        Poll::Ready(Ok(())) => {}
        _ => panic!("p2c over ready services is ready"),
    }
    let response = pin!(balance.call(()));
    assert!(black_box(response.poll(&mut cx)).is_ready());
}

#[inline]
fn reserve_and_release(pool: &KeyPool) {
    let lease = black_box(pool.try_reserve());
    debug_assert!(lease.is_some());
    drop(lease);
}

fn selection(c: &mut Criterion) {
    for threads in [1, 2] {
        let mut group = c.benchmark_group(if threads == 1 {
            "selection_1_thread".to_owned()
        } else {
            format!("selection_{threads}_threads")
        });
        group
            .throughput(Throughput::Elements(threads as u64))
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(2))
            .sample_size(50);

        for n in KEY_COUNTS {
            let cursor = AtomicUsize::new(0);
            group.bench_with_input(BenchmarkId::new("atomic_fetch_add", n), &n, |b, &n| {
                b.iter_custom(|iters| {
                    contended(threads, iters, || {
                        black_box(cursor.fetch_add(1, Ordering::Relaxed) % black_box(n));
                    })
                });
            });

            let rotation = Mutex::new(0usize);
            group.bench_with_input(BenchmarkId::new("mutex_rotation", n), &n, |b, &n| {
                b.iter_custom(|iters| {
                    contended(threads, iters, || {
                        let mut next = rotation.lock().unwrap_or_else(PoisonError::into_inner);
                        let index = *next;
                        *next = if index + 1 == black_box(n) {
                            0
                        } else {
                            index + 1
                        };
                        black_box(index);
                    })
                });
            });

            let balance = Mutex::new(p2c(n));
            group.bench_with_input(BenchmarkId::new("tower_p2c", n), &n, |b, _| {
                b.iter_custom(|iters| {
                    contended(threads, iters, || {
                        let mut balance = balance.lock().unwrap_or_else(PoisonError::into_inner);
                        p2c_choose_and_release(&mut balance);
                    })
                });
            });

            for (strategy, name) in [
                (Selection::RoundRobin, "round_robin"),
                (Selection::LeastInFlight, "least_in_flight"),
            ] {
                for cooling in COOLING_PERCENT {
                    if n * cooling / 100 == 0 && cooling != 0 {
                        continue; // one key: nothing to cool without cooling them all
                    }
                    let pool = pool(n, strategy, cooling);
                    let id = BenchmarkId::new(format!("{name}_cooling_{cooling}%"), n);
                    group.bench_with_input(id, &pool, |b, pool| {
                        b.iter_custom(|iters| {
                            contended(threads, iters, || reserve_and_release(pool))
                        });
                    });
                }
            }
        }
        group.finish();
    }
}

/// Buckets by the `x-model` header (the reservations below name their bucket directly).
#[derive(Debug)]
struct ByModelHeader;

impl tower_key_rotation::route::Router for ByModelHeader {
    fn bucket<'a>(&self, head: &tower_key_rotation::route::RequestHead<'a>) -> Option<&'a str> {
        head.headers.get("x-model")?.to_str().ok()
    }
}

/// One bucket (a pool without a router, `try_reserve`) beside a bucket of a pool with
/// buckets (`try_reserve_route`: the key's state and its lane for the bucket), and beside
/// reading the route too (`route` then `try_reserve_route`: the router's interned name).
fn buckets(c: &mut Criterion) {
    let mut group = c.benchmark_group("buckets");
    group
        .throughput(Throughput::Elements(1))
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .sample_size(50);
    for n in [3, 256] {
        let list = (0..n)
            .map(|i| format!("bench-key-{i}"))
            .collect::<Vec<_>>()
            .join(",");
        let keys = KeySet::parse(&list).expect("valid keys");
        let one = KeyPool::new(keys.clone());
        group.bench_with_input(BenchmarkId::new("one_bucket", n), &one, |b, pool| {
            b.iter(|| reserve_and_release(pool));
        });
        let bucketed = KeyPool::builder(keys).router(ByModelHeader).build();
        let request = http::Request::builder()
            .header("x-model", "glm-4-flash")
            .body(())
            .expect("a request");
        let head = tower_key_rotation::route::RequestHead::of(&request);
        let route = bucketed.route(&head);
        group.bench_with_input(BenchmarkId::new("bucketed", n), &bucketed, |b, pool| {
            b.iter(|| drop(black_box(pool.try_reserve_route(black_box(&route)))));
        });
        group.bench_with_input(
            BenchmarkId::new("bucketed_with_route", n),
            &bucketed,
            |b, pool| {
                b.iter(|| {
                    let route = pool.route(black_box(&head));
                    drop(black_box(pool.try_reserve_route(&route)));
                });
            },
        );
    }
    group.finish();
}

/// The routes of requests of `sessions` sessions (`0`: one route naming no session).
fn routes(pool: &KeyPool, sessions: usize) -> Vec<Route> {
    let heads = (0..sessions.max(1)).map(|i| {
        let mut request = http::Request::post("http://provider.test/v1/chat/completions");
        if sessions > 0 {
            request = request.header("x-session-id", format!("conversation-{i}"));
        }
        request.body(()).expect("a valid request")
    });
    heads
        .map(|request| pool.route(&RequestHead::of(&request)))
        .collect()
}

/// One selection: `try_reserve_route` and the lease dropped. Never inlined, so that
/// `benches/selection_instructions.sh` can count the instructions of each call.
#[inline(never)]
fn one_route(pool: &KeyPool, route: &Route) {
    let lease = black_box(pool.try_reserve_route(route));
    debug_assert!(lease.is_some());
    drop(lease);
}

/// `try_reserve_route` and the lease dropped, over `routes` in turn, `iters` times.
fn route_and_release(pool: &KeyPool, routes: &[Route], iters: u64) -> Duration {
    let start = Instant::now();
    let mut next = 0;
    for _ in 0..iters {
        one_route(pool, black_box(&routes[next]));
        next += 1;
        if next == routes.len() {
            next = 0;
        }
    }
    start.elapsed()
}

/// Allocations of 10,000 selections with affinity over 16 keys, half of them resting (so
/// half the sessions spill, and are remembered), after one pass that allocates the memory
/// of spilled sessions (once per pool).
fn affinity_allocations() -> usize {
    let pool = pool(16, Selection::RoundRobin, 50);
    let sessions = routes(&pool, 4096);
    route_and_release(&pool, &sessions, 4096);
    let region = Region::new(GLOBAL);
    route_and_release(&pool, &sessions, 10_000);
    region.change().allocations
}

/// Allocations of 10,000 selections in a pool with buckets (two buckets in turn, over
/// 16 keys), after a pass that makes each (key, bucket)'s lane (once per pool).
fn bucketed_allocations() -> usize {
    let keys = (0..16)
        .map(|i| format!("bench-key-{i}"))
        .collect::<Vec<_>>()
        .join(",");
    let pool = KeyPool::builder(KeySet::parse(&keys).expect("valid keys"))
        .router(ByModelHeader)
        .build();
    let routes: Vec<Route> = ["glm-4-flash", "glm-4-plus"]
        .iter()
        .map(|model| {
            let request = http::Request::builder()
                .header("x-model", *model)
                .body(())
                .expect("a request");
            pool.route(&RequestHead::of(&request))
        })
        .collect();
    route_and_release(&pool, &routes, 64);
    let region = Region::new(GLOBAL);
    route_and_release(&pool, &routes, 10_000);
    region.change().allocations
}

/// The selections side by side, each through the same loop (`one_route` over a slice of
/// routes): round-robin and least-in-flight on a pool without a router; the bucketed path
/// (a known bucket: the key's state and its lane); affinity (4,096 sessions in turn, no
/// spill); and round-robin on a pool with a router for requests naming no session.
fn side_by_side(c: &mut Criterion) {
    let mut group = c.benchmark_group("side_by_side");
    group
        .throughput(Throughput::Elements(1))
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .sample_size(50);
    for n in [3, 16] {
        let list = (0..n)
            .map(|i| format!("bench-key-{i}"))
            .collect::<Vec<_>>()
            .join(",");
        let keys = KeySet::parse(&list).expect("valid keys");
        let any = [Route::ANY];
        for (strategy, name) in [
            (Selection::RoundRobin, "round_robin"),
            (Selection::LeastInFlight, "least_in_flight"),
        ] {
            let plain = KeyPool::builder(keys.clone()).selection(strategy).build();
            group.bench_with_input(BenchmarkId::new(name, n), &plain, |b, pool| {
                b.iter_custom(|iters| route_and_release(pool, &any, iters));
            });
        }
        let bucketed = KeyPool::builder(keys.clone()).router(ByModelHeader).build();
        let request = http::Request::builder()
            .header("x-model", "glm-4-flash")
            .body(())
            .expect("a request");
        let bucket = [bucketed.route(&RequestHead::of(&request))];
        group.bench_with_input(BenchmarkId::new("bucketed", n), &bucketed, |b, pool| {
            b.iter_custom(|iters| route_and_release(pool, &bucket, iters));
        });
        for (strategy, name) in [
            (Selection::RoundRobin, "affinity"),
            (Selection::LeastInFlight, "affinity_least_in_flight"),
        ] {
            let pool = pool(n, strategy, 0);
            let sessions = routes(&pool, 4096);
            group.bench_with_input(BenchmarkId::new(name, n), &pool, |b, pool| {
                b.iter_custom(|iters| route_and_release(pool, &sessions, iters));
            });
        }
        let routed = pool(n, Selection::RoundRobin, 0);
        let no_session = routes(&routed, 0);
        let id = BenchmarkId::new("round_robin_route_without_session", n);
        group.bench_with_input(id, &routed, |b, pool| {
            b.iter_custom(|iters| route_and_release(pool, &no_session, iters));
        });
    }
    group.finish();
}

/// Route-aware selection: affinity beside round-robin and least-in-flight.
fn selection_affinity(c: &mut Criterion) {
    let allocations = affinity_allocations();
    println!("selection with affinity: {allocations} allocations in 10,000 requests");
    assert_eq!(allocations, 0, "selection with affinity allocated");
    let allocations = bucketed_allocations();
    println!("bucketed selection: {allocations} allocations in 10,000 requests");
    assert_eq!(allocations, 0, "bucketed selection allocated");
    let mut group = c.benchmark_group("selection_affinity");
    group
        .throughput(Throughput::Elements(1))
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .sample_size(50);
    for n in [3, 16, 256] {
        for (strategy, name) in [
            (Selection::RoundRobin, "round_robin"),
            (Selection::LeastInFlight, "least_in_flight"),
        ] {
            let pool = pool(n, strategy, 0);
            group.bench_with_input(BenchmarkId::new(name, n), &pool, |b, pool| {
                b.iter_custom(|iters| contended(1, iters, || reserve_and_release(pool)));
            });
            let no_session = routes(&pool, 0);
            let id = BenchmarkId::new(format!("{name}_route_without_session"), n);
            group.bench_with_input(id, &pool, |b, pool| {
                b.iter_custom(|iters| route_and_release(pool, &no_session, iters));
            });
        }
        for cooling in [0, 50] {
            let pool = pool(n, Selection::RoundRobin, cooling);
            let sessions = routes(&pool, 4096);
            let id = BenchmarkId::new(format!("affinity_cooling_{cooling}%"), n);
            group.bench_with_input(id, &pool, |b, pool| {
                b.iter_custom(|iters| route_and_release(pool, &sessions, iters));
            });
        }
    }
    group.finish();
}

// `criterion_main!` spelled out: the macro's generated `pub fn` would trip `missing_docs`.
fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    selection(&mut criterion);
    buckets(&mut criterion);
    selection_affinity(&mut criterion);
    side_by_side(&mut criterion);
    criterion.final_summary();
}
