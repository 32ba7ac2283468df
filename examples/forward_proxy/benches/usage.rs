//! What reading usage (`--count-tokens`) costs per event of an OpenAI chat stream: the
//! stream passed on untouched (the baseline: one pass over each event, as the proxy's
//! own copy does), read by `UsageScan`, and asked-for usage taken out by `UsageStrip`.
//!
//! cargo bench -p forward_proxy --features fuzzing --bench usage

use std::hint::black_box;

use bytes::Bytes;
use criterion::{Criterion, Throughput};
use forward_proxy::fuzzing::{UsageScan, UsageStrip};

/// 200 events of a chat stream, one a frame; with the usage OpenAI adds when asked.
fn stream(asked: bool) -> Vec<Bytes> {
    let usage = if asked { ",\"usage\":null" } else { "" };
    let mut frames: Vec<Bytes> = (0..200)
        .map(|i| {
            Bytes::from(format!(
                "data: {{\"id\":\"chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG\",\"object\":\"chat.completion.chunk\",\
                 \"created\":1741569952,\"model\":\"gpt-4o-2024-08-06\",\"system_fingerprint\":\"fp_eb9dce56a8\",\
                 \"choices\":[{{\"index\":0,\"delta\":{{\"content\":\" token{i}\"}},\"logprobs\":null,\"finish_reason\":null}}]{usage}}}\n\n"
            ))
        })
        .collect();
    if asked {
        frames.push(Bytes::from_static(
            b"data: {\"id\":\"chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG\",\"object\":\"chat.completion.chunk\",\
              \"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":200,\"total_tokens\":209}}\n\n",
        ));
    }
    frames.push(Bytes::from_static(b"data: [DONE]\n\n"));
    frames
}

fn usage(c: &mut Criterion) {
    let plain = stream(false);
    let asked = stream(true);
    let mut group = c.benchmark_group("usage_per_stream");
    group.throughput(Throughput::Elements(plain.len() as u64));
    group.bench_function("pass_through", |b| {
        b.iter(|| {
            // The least a proxy does with each frame: look at every byte once.
            let mut sum = 0u64;
            for frame in &plain {
                sum += memchr::memchr_iter(b'\n', black_box(frame)).count() as u64;
            }
            sum
        })
    });
    group.bench_function("scan", |b| {
        b.iter(|| {
            let mut scan = UsageScan::default();
            for frame in &plain {
                scan.feed(black_box(frame));
            }
            scan.usage()
        })
    });
    group.bench_function("scan_and_strip_asked", |b| {
        b.iter(|| {
            let mut scan = UsageScan::default();
            let mut strip = UsageStrip::default();
            let mut out = 0;
            for frame in &asked {
                strip.push(black_box(frame.clone()), &mut scan);
                while let Some(piece) = strip.pop() {
                    out += piece.len();
                }
            }
            strip.finish(&mut scan);
            (out, scan.usage())
        })
    });
    group.finish();
}

// `criterion_main!` spelled out: the macro's generated `pub fn` would trip `missing_docs`.
fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    usage(&mut criterion);
    criterion.final_summary();
}
