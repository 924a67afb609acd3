//! One full scheduling decision (schedule + pre_request + complete) with upstream's default
//! profile (queue 2, KV 2, prefix 3, max-score picker) over 10, 100 and 1,000 endpoints,
//! without a prompt and with a 4,000-token prompt through the prefix index.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use sluice_core::{Endpoint, EndpointMetrics};
use sluice_scheduling::{Candidate, InFlightCounters, LlmRequest, Outcome, Scheduler};

fn candidates(n: usize) -> Vec<Candidate> {
    (0..n)
        .map(|i| {
            let addr = ([10, (i / 250) as u8, (i % 250) as u8, 1], 8000).into();
            let mut e = Endpoint::from_address("bench", addr);
            e.key.pod = format!("vllm-{i}").into();
            Candidate {
                endpoint: Arc::new(e),
                metrics: Some(Arc::new(EndpointMetrics {
                    waiting_queue_size: (i * 7 % 13) as u32,
                    running_requests_size: (i % 5) as u32,
                    kv_cache_usage: (i * 37 % 100) as f64 / 100.0,
                    cache_block_size: 16,
                    cache_num_blocks: 30_000,
                    ..EndpointMetrics::default()
                })),
                metrics_age: Duration::from_millis(20),
                in_flight: Arc::new(InFlightCounters::default()),
            }
        })
        .collect()
}

/// ~4,000 tokens at 4 characters per token.
fn long_prompt(tenant: usize) -> String {
    let mut s = format!("You are assistant #{tenant}. ");
    let mut i = 0;
    while s.len() < 16_000 {
        s.push_str(&format!(
            "Turn {i}: the quick brown fox jumps over the lazy dog. "
        ));
        i += 1;
    }
    s.truncate(16_000);
    s
}

fn decide(s: &Scheduler, req: &LlmRequest, cands: &[Candidate]) -> usize {
    let mut d = s.schedule(req, cands).expect("schedules");
    s.pre_request(req, &mut d);
    s.complete(req, &mut d, Outcome::Success);
    d.result.targets.len()
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("decision_default_profile");
    for n in [10usize, 100, 1000] {
        let cands = candidates(n);
        let s = Scheduler::default();
        let req = LlmRequest {
            request_id: "r".into(),
            target_model: "llama".into(),
            prompt_tokens: 20,
            ..Default::default()
        };
        g.bench_with_input(BenchmarkId::new("no_prefix", n), &n, |b, _| {
            b.iter(|| black_box(decide(&s, &req, &cands)))
        });

        // Warm the index: 32 tenants' system prompts, each seen by one endpoint.
        let s = Scheduler::default();
        for t in 0..32 {
            let warm = LlmRequest {
                request_id: format!("w{t}"),
                target_model: "llama".into(),
                prompt: long_prompt(t).into(),
                prompt_tokens: 4000,
                ..Default::default()
            };
            let only = &cands[t % n..t % n + 1];
            let mut d = s.schedule(&warm, only).unwrap();
            s.pre_request(&warm, &mut d);
            s.complete(&warm, &mut d, Outcome::Success);
        }
        let req = LlmRequest {
            request_id: "r".into(),
            target_model: "llama".into(),
            prompt: long_prompt(3).into(),
            prompt_tokens: 4000,
            ..Default::default()
        };
        g.bench_with_input(BenchmarkId::new("prefix_4k_tokens", n), &n, |b, _| {
            b.iter(|| black_box(decide(&s, &req, &cands)))
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = bench
}
criterion_main!(benches);
