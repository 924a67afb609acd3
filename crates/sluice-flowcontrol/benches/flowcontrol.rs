//! Per-request cost of flow control (targets: < 5 µs per admission while the pool is not
//! saturated; < 1 µs per workload-aware score) and of dispatching from a deep queue.
//!
//! `CARGO_TARGET_DIR=/tmp/target-fc cargo bench -p sluice-flowcontrol --bench flowcontrol`

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "benchmark set-up fails loudly"
)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use sluice_flowcontrol::workload::score;
use sluice_flowcontrol::*;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap()
}

fn request(workload: &WorkloadContext, flow: &Arc<str>) -> FlowRequest {
    FlowRequest {
        priority: 0,
        fairness_id: Some(flow.clone()),
        workload: workload.clone(),
        bytes: 2048,
        ..FlowRequest::default()
    }
}

/// Admission plus release of the guard with a pool that has room: the whole cost the picker
/// pays per request when flow control is on but not queueing.
fn admit_unsaturated(c: &mut Criterion) {
    let rt = runtime();
    for (name, ordering) in [
        ("fcfs", OrderingPolicy::Fcfs),
        (
            "workload_aware",
            OrderingPolicy::WorkloadAware(ScoreParams::default()),
        ),
    ] {
        let mut cfg = FlowControlConfig::default();
        cfg.default_band.ordering = ordering;
        let fc = rt.block_on(async {
            FlowController::new(cfg, Arc::new(ConcurrencyLimit::new(1_000_000)))
        });
        // A spread of workloads and flows, as a busy picker sees.
        let workloads: Vec<WorkloadContext> = (0..64)
            .map(|i| {
                fc.workload_context(Some(&format!(
                    r#"{{"workload_id":"w{i}","criticality":{}}}"#,
                    1 + i % 5
                )))
            })
            .collect();
        let flows: Vec<Arc<str>> = (0..8).map(|i| Arc::from(format!("flow{i}"))).collect();
        c.bench_function(&format!("admit_and_release_unsaturated/{name}"), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for i in 0..iters as usize {
                        let r = request(&workloads[i % workloads.len()], &flows[i % flows.len()]);
                        let guard = fc.admit(r).await.unwrap();
                        drop(black_box(guard));
                    }
                    start.elapsed()
                })
            })
        });
    }
}

fn header_parse(c: &mut Criterion) {
    let header = r#"{"workload_id": "fraud-detection", "criticality": 5}"#;
    c.bench_function("workload_context_from_header", |b| {
        b.iter(|| WorkloadContext::from_header(black_box(Some(header)), 3))
    });
}

fn score_computation(c: &mut Criterion) {
    let params = ScoreParams::default();
    c.bench_function("workload_aware_score", |b| {
        b.iter(|| {
            score(
                black_box(&params),
                black_box(Duration::from_millis(1234)),
                black_box(4),
                black_box(37.5),
            )
        })
    });
    // The score as the dispatcher computes it: including the workload's windowed rate.
    let reg = WorkloadRegistry::new(WorkloadConfig::default());
    let now = tokio::time::Instant::now();
    let token = reg.arrive(&Arc::from("w"), now);
    c.bench_function("workload_aware_score_with_rate_lookup", |b| {
        b.iter(|| {
            let rate = token.entry().rate(black_box(now), Duration::from_secs(60));
            score(&params, Duration::from_millis(1234), 4, rate)
        })
    });
}

/// Enqueue 1,000 requests behind a full pool, then release them one by one: the cost per
/// queued request of the dispatch path (pick + wake), by ordering policy.
fn dispatch_from_queue(c: &mut Criterion) {
    let rt = runtime();
    for (name, ordering, fairness) in [
        (
            "fcfs_global_strict",
            OrderingPolicy::Fcfs,
            FairnessPolicy::GlobalStrict,
        ),
        (
            "fcfs_round_robin",
            OrderingPolicy::Fcfs,
            FairnessPolicy::RoundRobin,
        ),
        (
            "workload_aware",
            OrderingPolicy::WorkloadAware(ScoreParams::default()),
            FairnessPolicy::GlobalStrict,
        ),
    ] {
        c.bench_function(&format!("queue_and_dispatch_1000/{name}"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    total += rt.block_on(async {
                        let mut cfg = FlowControlConfig::default();
                        cfg.default_band.ordering = ordering.clone();
                        cfg.default_band.fairness = fairness;
                        let sat = Arc::new(ManualSaturation::default());
                        sat.set(1.0);
                        let fc = FlowController::new(cfg, sat.clone());
                        let start = Instant::now();
                        let mut tasks = Vec::with_capacity(1000);
                        for i in 0..1000 {
                            let fc = fc.clone();
                            let w = WorkloadContext {
                                workload_id: Arc::from(format!("w{}", i % 50)),
                                criticality: 1 + (i % 5) as u8,
                            };
                            let flow: Arc<str> = Arc::from(format!("f{}", i % 10));
                            tasks.push(tokio::spawn(async move {
                                fc.admit(request(&w, &flow)).await.map(drop)
                            }));
                        }
                        while fc.queued() < 1000 {
                            tokio::task::yield_now().await;
                        }
                        sat.set(0.0);
                        fc.capacity_changed();
                        for t in tasks {
                            t.await.unwrap().unwrap();
                        }
                        start.elapsed()
                    });
                }
                total
            })
        });
    }
}

criterion_group!(
    benches,
    admit_unsaturated,
    header_parse,
    score_computation,
    dispatch_from_queue
);
criterion_main!(benches);
