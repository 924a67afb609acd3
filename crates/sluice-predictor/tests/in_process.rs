//! The in-process predictor as the scheduling plugins use it: through the trait, with
// Test helpers outside #[test] fns: a failed setup should fail the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]
//! training on a background thread.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use sluice_predictor::{
    Features, InProcessPredictor, LatencyPredictor, PredictError, PredictorConfig,
};

/// Trains only on `train_now`; the median objective, so predictions can be compared with
/// the noiseless truth.
fn manual() -> PredictorConfig {
    PredictorConfig {
        retrain_interval: None,
        objective: sluice_predictor::Objective::MEDIAN,
        ..PredictorConfig::default()
    }
}

#[test]
fn no_model_yet_is_a_distinct_result_so_callers_fall_back() {
    let p: Arc<dyn LatencyPredictor> = Arc::new(InProcessPredictor::spawn(manual()).unwrap());
    assert!(!p.ready());
    let batch = [Features::default(); 3];
    let got = p
        .predict_batch(&batch)
        .try_now()
        .expect("in-process answers synchronously");
    assert_eq!(got, Err(PredictError::NotReady));
}

#[test]
fn too_few_samples_keep_it_not_ready() {
    let p = InProcessPredictor::spawn(manual()).unwrap();
    let mut r = rng(1);
    for _ in 0..10 {
        p.record(sample(&mut r, 0.05));
    }
    assert_eq!(p.train_now(), None);
    assert!(!p.ready());
}

#[test]
fn trained_predictor_predicts_every_candidate_in_order() {
    let p = InProcessPredictor::spawn(manual()).unwrap();
    let mut r = rng(2);
    for _ in 0..5_000 {
        p.record(sample(&mut r, 0.05));
    }
    let info = p.train_now().expect("enough samples");
    assert_eq!(info.version, 1);
    assert_eq!(info.ttft_samples, 5_000);
    assert!(p.ready());

    let batch: Vec<Features> = (0..100).map(|_| features(&mut r)).collect();
    let preds = p.predict_batch(&batch).try_now().unwrap().unwrap();
    assert_eq!(preds.len(), 100);
    let model = p.current().unwrap();
    for (f, got) in batch.iter().zip(&preds) {
        assert_eq!(*got, model.predict(f), "row order is kept");
        let (ttft, tpot) = truth(f);
        assert!(
            (got.ttft_ms - ttft).abs() / ttft < 0.25,
            "{got:?} vs {ttft} for {f:?}"
        );
        assert!(
            (got.tpot_ms.unwrap() - tpot).abs() / tpot < 0.25,
            "{got:?} vs {tpot}"
        );
    }
    assert_eq!(p.stats().samples_queued, 5_000);
    assert_eq!(p.stats().samples_dropped, 0);
}

#[test]
fn an_empty_batch_gets_an_empty_answer() {
    let p = InProcessPredictor::spawn(manual()).unwrap();
    let mut r = rng(3);
    for _ in 0..200 {
        p.record(sample(&mut r, 0.05));
    }
    p.train_now().unwrap();
    assert_eq!(p.predict_batch(&[]).try_now(), Some(Ok(vec![])));
}

#[test]
fn new_versions_are_swapped_in_while_old_ones_stay_usable() {
    let p = InProcessPredictor::spawn(manual()).unwrap();
    let mut r = rng(4);
    for _ in 0..500 {
        p.record(sample(&mut r, 0.05));
    }
    p.train_now().unwrap();
    let old = p.current().unwrap();
    for _ in 0..500 {
        p.record(sample(&mut r, 0.05));
    }
    let info = p.train_now().unwrap();
    assert_eq!(info.version, 2);
    assert_eq!(p.current().unwrap().info().version, 2);
    // A request that grabbed the old version keeps a consistent model.
    assert_eq!(old.info().version, 1);
    let f = Features::default();
    assert!(old.predict(&f).ttft_ms > 0.0);
}

#[test]
fn unusable_samples_do_not_train() {
    let p = InProcessPredictor::spawn(manual()).unwrap();
    let mut r = rng(5);
    for _ in 0..1_000 {
        let mut s = sample(&mut r, 0.05);
        s.ttft_ms = Some(f64::NAN);
        s.tpot_ms = Some(-1.0);
        p.record(s);
    }
    assert_eq!(p.train_now(), None);
}

#[test]
fn tpot_model_is_optional_when_only_non_streamed_traffic_was_seen() {
    let p = InProcessPredictor::spawn(manual()).unwrap();
    let mut r = rng(6);
    for _ in 0..500 {
        let mut s = sample(&mut r, 0.05);
        s.tpot_ms = None;
        p.record(s);
    }
    p.train_now().unwrap();
    let preds = p.predict_batch_now(&[features(&mut r)]).unwrap();
    assert!(preds[0].ttft_ms > 0.0);
    assert_eq!(preds[0].tpot_ms, None);
}

#[test]
fn the_background_trainer_publishes_a_first_model_without_being_asked() {
    let cfg = PredictorConfig {
        retrain_interval: Some(Duration::from_millis(50)),
        min_samples: 100,
        ..PredictorConfig::default()
    };
    let p = InProcessPredictor::spawn(cfg).unwrap();
    let mut r = rng(7);
    for _ in 0..300 {
        p.record(sample(&mut r, 0.05));
    }
    // The trainer runs on its own clock; wait for its publication with a deadline.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !p.ready() {
        assert!(Instant::now() < deadline, "no model published within 10 s");
        std::thread::yield_now();
    }
    assert!(p.stats().models_published >= 1);
}
