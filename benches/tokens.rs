//! What token budgets cost a selection: `try_reserve` (no router) and `try_reserve_route`
//! (a pool with buckets) with the lease dropped, for requests without a token cost (the path
//! of every pool that sets no token quota), beside a request with a cost on a pool without
//! a token quota and on one with a quota (a take and, the lease dropped unsent, a refund).
//!
//! `one_bucket` and `bucketed` are the same loops as the `buckets` group of
//! `benches/selection.rs`: run that group on the build before token budgets for the
//! side-by-side (BENCHMARKS.md, "Token budgets").
//!
//! ```sh
//! cargo bench --bench tokens
//! ```

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};
use tower_key_rotation::route::{RequestHead, Router};
use tower_key_rotation::{KeyPool, KeySet, TokenQuota};

/// Buckets by `x-model`, costs by `x-tokens`.
#[derive(Debug)]
struct ByHeaders;

impl Router for ByHeaders {
    fn bucket<'a>(&self, head: &RequestHead<'a>) -> Option<&'a str> {
        head.headers.get("x-model")?.to_str().ok()
    }

    fn tokens(&self, head: &RequestHead<'_>) -> Option<u64> {
        head.headers.get("x-tokens")?.to_str().ok()?.parse().ok()
    }
}

fn token_budgets(c: &mut Criterion) {
    let mut group = c.benchmark_group("token_budgets");
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
            b.iter(|| drop(black_box(pool.try_reserve())));
        });
        let request = |tokens: Option<u64>| {
            let mut request = http::Request::builder().header("x-model", "glm-4-flash");
            if let Some(tokens) = tokens {
                request = request.header("x-tokens", tokens);
            }
            request.body(()).expect("a request")
        };
        let bucketed = KeyPool::builder(keys.clone()).router(ByHeaders).build();
        let (plain, costed) = (request(None), request(Some(1_000)));
        let route = bucketed.route(&RequestHead::of(&plain));
        group.bench_with_input(BenchmarkId::new("bucketed", n), &bucketed, |b, pool| {
            b.iter(|| drop(black_box(pool.try_reserve_route(black_box(&route)))));
        });
        let route = bucketed.route(&RequestHead::of(&costed));
        group.bench_with_input(
            BenchmarkId::new("costed_without_quota", n),
            &bucketed,
            |b, pool| {
                b.iter(|| drop(black_box(pool.try_reserve_route(black_box(&route)))));
            },
        );
        // A quota that never runs out within a run: each take is refunded as its lease is
        // dropped unsent.
        let quota = KeyPool::builder(keys)
            .router(ByHeaders)
            .token_quota_per_key(TokenQuota::per_minute(u64::MAX / 1_000_000))
            .build();
        let route = quota.route(&RequestHead::of(&costed));
        group.bench_with_input(
            BenchmarkId::new("costed_with_quota", n),
            &quota,
            |b, pool| {
                b.iter(|| drop(black_box(pool.try_reserve_route(black_box(&route)))));
            },
        );
    }
    group.finish();
}

// `criterion_main!` spelled out: the macro's generated `pub fn` would trip `missing_docs`.
fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    token_budgets(&mut criterion);
    criterion.final_summary();
}
