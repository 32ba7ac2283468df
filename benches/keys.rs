//! Cost of reading a key list: `KeySet::parse` and `KeySet::from_specs` over 100 to 100,000
//! distinct keys (the worst case for finding duplicates: every key is compared with all the
//! others, or hashed once).
//!
//! The baseline sits in the same group, so one run gives the ratio:
//!
//! - `split_trim`: splitting the list on commas and trimming each entry, the floor of any
//!   parse (no validation, no duplicate check, no copies).
//!
//! Comparing every pair, 100,000 keys took 10.6 s to parse and 66 s as specs (with names);
//! hashing them, about 18 ms each (release, one run on a shared 2-core machine).
//!
//! ```sh
//! cargo bench --bench keys
//! cargo bench --bench keys -- 'key_set/parse'   # a subset
//! ```

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};
use tower_key_rotation::{ApiKey, KeySet, KeySpec};

const KEY_COUNTS: [usize; 4] = [100, 1_000, 10_000, 100_000];

/// `n` distinct keys shaped like providers' (`sk-` and 48 characters), comma-separated.
fn key_list(n: usize) -> String {
    (0..n)
        .map(|i| format!("sk-bench-{i:039}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn key_set(c: &mut Criterion) {
    let mut group = c.benchmark_group("key_set");
    group
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20);
    for n in KEY_COUNTS {
        let list = key_list(n);
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::new("split_trim", n), &list, |b, list| {
            b.iter(|| black_box(list).split(',').map(str::trim).count());
        });
        group.bench_with_input(BenchmarkId::new("parse", n), &list, |b, list| {
            b.iter(|| KeySet::parse(black_box(list)).expect("distinct keys"));
        });
        let specs: Vec<KeySpec> = list
            .split(',')
            .enumerate()
            .map(|(i, key)| {
                KeySpec::new(ApiKey::new(key).expect("a valid key")).name(format!("key-{i}"))
            })
            .collect();
        group.bench_with_input(BenchmarkId::new("from_specs", n), &specs, |b, specs| {
            b.iter_batched(
                || specs.clone(),
                |specs| KeySet::from_specs(black_box(specs)).expect("distinct keys"),
                criterion::BatchSize::LargeInput,
            );
        });
    }
    group.finish();
}

// `criterion_main!` spelled out: the macro's generated `pub fn` would trip `missing_docs`.
fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    key_set(&mut criterion);
    criterion.final_summary();
}
