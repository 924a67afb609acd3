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

/// The trainer runs on its own clock: waits for `ok` with a deadline.
fn wait_for(what: &str, ok: &dyn Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ok() {
        assert!(Instant::now() < deadline, "{what} within 10 s");
        std::thread::sleep(Duration::from_millis(5));
    }
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
    wait_for("a model published", &|| p.ready());
    assert!(p.stats().models_published >= 1);
}

#[test]
fn a_response_mode_without_enough_samples_is_not_ready_while_the_other_predicts() {
    // Streamed first chunks come back in milliseconds, whole responses seconds later: for a
    // while a model exists for one mode only. A non-streamed request asked then falls back
    // (NotReady) instead of being predicted from streamed first chunks.
    let p = InProcessPredictor::spawn(manual()).unwrap();
    let mut r = rng(21);
    for _ in 0..500 {
        p.record(sample(&mut r, 0.05));
    }
    for i in 0..49 {
        let mut s = sample(&mut r, 0.05);
        s.features_at_dispatch.streamed = false;
        s.ttft_ms = Some(4000.0 + f64::from(i));
        p.record(s);
    }
    p.train_now().expect("enough samples");
    let f = features(&mut r);
    let whole = Features {
        streamed: false,
        ..f
    };
    let ask = |batch: &[Features]| p.predict_batch(batch).try_now().unwrap();
    assert!(ask(&[f]).is_ok(), "streamed requests are predicted");
    assert_eq!(ask(&[whole]), Err(PredictError::NotReady));
    let mut s = sample(&mut r, 0.05);
    s.features_at_dispatch.streamed = false;
    s.ttft_ms = Some(4000.0);
    p.record(s);
    p.train_now().expect("a model");
    let got = ask(&[whole]).expect("50 whole responses are enough");
    assert!(
        got[0].ttft_ms > 1000.0,
        "a whole response is predicted like the whole responses seen: {got:?}"
    );
}

#[test]
fn an_endpoint_busier_than_any_seen_is_predicted_no_faster_than_the_busiest_seen() {
    // Latency that flattens with the queue over the range trained on (0..=10 waiting):
    // fitted, the squared queue term comes out negative, and extrapolated to 40 or 400
    // waiting it would predict an endpoint far busier than any seen as the fastest.
    let p = InProcessPredictor::spawn(manual()).unwrap();
    let mut r = rng(22);
    let truth = |w: u32| 100.0 + 50.0 * f64::from(w) - 2.0 * f64::from(w * w);
    for i in 0..2_000_u32 {
        let waiting = i % 11;
        let f = Features {
            waiting,
            ..Features::default()
        };
        p.record(sluice_predictor::TrainingSample {
            features_at_dispatch: f,
            ttft_ms: Some(noisy(&mut r, truth(waiting), 0.02)),
            tpot_ms: None,
        });
    }
    p.train_now().expect("enough samples");
    let at = |waiting: u32| {
        let f = Features {
            waiting,
            ..Features::default()
        };
        p.predict_batch(&[f]).try_now().unwrap().unwrap()[0].ttft_ms
    };
    let edge = at(10);
    assert!(
        (edge / truth(10) - 1.0).abs() < 0.05,
        "{edge:.0} ms at 10 waiting"
    );
    for waiting in [40, 400] {
        let got = at(waiting);
        assert!(
            got >= edge * 0.999,
            "{waiting} waiting predicted {got:.0} ms, 10 waiting (the busiest seen) {edge:.0} ms"
        );
    }
}

#[test]
fn the_background_trainer_covers_whole_responses_as_soon_as_enough_arrive() {
    // Whole responses come back after the first model is out; waiting a full retrain
    // interval for the next fit would leave their requests on the fallback that long.
    let cfg = PredictorConfig {
        retrain_interval: Some(Duration::from_secs(600)),
        min_samples: 50,
        ..PredictorConfig::default()
    };
    let p = InProcessPredictor::spawn(cfg).unwrap();
    let mut r = rng(24);
    for _ in 0..60 {
        p.record(sample(&mut r, 0.05));
    }
    let f = features(&mut r);
    let whole = Features {
        streamed: false,
        ..f
    };
    let answers = |f: Features| p.predict_batch(&[f]).try_now().unwrap().is_ok();
    wait_for("a model for streamed requests", &|| answers(f));
    assert!(!answers(whole), "no whole response seen yet");
    for _ in 0..50 {
        let mut s = sample(&mut r, 0.05);
        s.features_at_dispatch.streamed = false;
        s.ttft_ms = Some(3000.0 * noisy(&mut r, 1.0, 0.05));
        p.record(s);
    }
    wait_for("a model for whole responses", &|| answers(whole));
}
