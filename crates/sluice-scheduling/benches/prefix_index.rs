//! Prefix index throughput: inserts and matches of 250-block requests (a 4,000-token prompt)
//! over 100 endpoints, from 1 and 2 threads at once.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use sluice_core::EndpointKey;
use sluice_scheduling::PrefixIndex;

const BLOCKS: usize = 250;
const ENDPOINTS: usize = 100;

fn keys() -> Vec<EndpointKey> {
    (0..ENDPOINTS)
        .map(|i| EndpointKey {
            namespace: "bench".into(),
            pod: format!("vllm-{i}").into(),
            rank: 0,
        })
        .collect()
}

/// Request `r`'s block hashes: 64 conversations, each sharing its first 200 blocks.
fn hashes(r: u64) -> Vec<u64> {
    let conv = r % 64;
    (0..BLOCKS as u64)
        .map(|b| {
            let salt = if b < 200 { conv } else { r };
            xxhash_rust::xxh64::xxh64(&[salt.to_le_bytes(), b.to_le_bytes()].concat(), 0)
        })
        .collect()
}

fn run(
    ix: &PrefixIndex,
    keys: &[EndpointKey],
    reqs: &[Vec<u64>],
    thread: usize,
    iters: u64,
    insert: bool,
) {
    let mut out = Vec::new();
    for i in 0..iters {
        let r = (i as usize * 7 + thread * 13) % reqs.len();
        if insert {
            ix.insert(&keys[(r + thread) % ENDPOINTS], &reqs[r], 31_250);
        } else {
            ix.match_prefix(&reqs[r], keys.iter(), &mut out);
            black_box(&out);
        }
    }
}

fn bench(c: &mut Criterion) {
    let keys = Arc::new(keys());
    let reqs: Arc<Vec<Vec<u64>>> = Arc::new((0..1024).map(hashes).collect());
    let ix = Arc::new(PrefixIndex::new());
    for (r, h) in reqs.iter().enumerate() {
        ix.insert(&keys[r % ENDPOINTS], h, 31_250);
    }
    let mut g = c.benchmark_group("prefix_index");
    g.throughput(Throughput::Elements(1));
    for threads in [1usize, 2] {
        for (name, insert) in [
            ("insert_250_blocks", true),
            ("match_250_blocks_100_endpoints", false),
        ] {
            g.bench_with_input(
                BenchmarkId::new(name, format!("{threads}_threads")),
                &threads,
                |b, &threads| {
                    b.iter_custom(|iters| {
                        // Each thread does `iters` operations; time per operation is wall time over
                        // all of them, so the reported rate is the aggregate throughput.
                        let start = Instant::now();
                        std::thread::scope(|s| {
                            for t in 0..threads {
                                let (ix, keys, reqs) = (ix.clone(), keys.clone(), reqs.clone());
                                s.spawn(move || run(&ix, &keys, &reqs, t, iters, insert));
                            }
                        });
                        start.elapsed() / threads as u32
                    })
                },
            );
        }
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = bench
}
criterion_main!(benches);
