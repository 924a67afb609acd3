//! Prediction for 100 endpoints (the per-request hot path) and training on N samples.
// A benchmark whose setup fails has nothing to measure: aborting is the right outcome.
#![allow(clippy::expect_used)]

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use sluice_predictor::{Features, InProcessPredictor, LatencyPredictor, PredictorConfig, Trainer};

#[path = "../tests/common/mod.rs"]
mod common;

fn trained_trainer(n: usize) -> Trainer {
    let mut r = common::rng(42);
    let mut t = Trainer::new(PredictorConfig {
        max_samples_total: n.max(1),
        ..PredictorConfig::default()
    });
    for _ in 0..n {
        t.add(&common::sample(&mut r, 0.08));
    }
    t
}

fn predict(c: &mut Criterion) {
    let mut t = trained_trainer(20_000);
    let model = t.fit().expect("model");
    let mut r = common::rng(7);
    let batch: Vec<Features> = (0..100).map(|_| common::features(&mut r)).collect();

    let mut g = c.benchmark_group("predict_100_endpoints");
    let mut out = Vec::with_capacity(100);
    g.bench_function("model_predict_into", |b| {
        b.iter(|| {
            model.predict_into(black_box(&batch), &mut out);
            black_box(&out);
        })
    });

    let p = InProcessPredictor::spawn(PredictorConfig {
        retrain_interval: None,
        ..PredictorConfig::default()
    })
    .expect("trainer thread");
    let mut r = common::rng(8);
    for _ in 0..5_000 {
        p.record(common::sample(&mut r, 0.08));
    }
    p.train_now().expect("model");
    // The full path a plugin takes: trait call, current-model load, output allocation.
    g.bench_function("trait_predict_batch", |b| {
        b.iter(|| black_box(p.predict_batch(black_box(&batch)).try_now()))
    });
    g.finish();
}

fn train(c: &mut Criterion) {
    let mut g = c.benchmark_group("fit");
    g.sample_size(10);
    for n in [1_000usize, 10_000, 100_000] {
        let mut t = trained_trainer(n);
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| black_box(t.fit()))
        });
    }
    g.finish();
}

/// Background-thread cost of storing samples once the store is full (evictions included).
fn ingest(c: &mut Criterion) {
    let mut t = trained_trainer(20_000);
    let mut r = common::rng(9);
    let samples: Vec<_> = (0..10_000).map(|_| common::sample(&mut r, 0.08)).collect();
    c.bench_function("ingest_10k_samples_into_full_store", |b| {
        b.iter(|| {
            for s in &samples {
                black_box(t.add(s));
            }
        })
    });
}

criterion_group!(benches, predict, train, ingest);
criterion_main!(benches);
