// Test helpers outside #[test] fns: a failed setup should fail the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Accuracy on latencies that emerge from a step-level engine simulation of a
//! heterogeneous fleet, measured against the observations themselves (there is no
//! noiseless truth here).

mod common;

use common::engine::{Engine, run};
use common::*;
use sluice_predictor::{ClassId, Objective, PredictorConfig, Trainer, TrainingSample};

fn fleet_samples(seed: u64, duration_ms: f64) -> Vec<TrainingSample> {
    let mut r = rng(seed);
    let fast = Engine {
        hw: FAST,
        class: ClassId(1),
        max_batch: 64,
        kv_capacity_tokens: 120_000.0,
        prefill_chunk_tokens: 2048.0,
    };
    let slow = Engine {
        hw: SLOW,
        class: ClassId(2),
        max_batch: 32,
        kv_capacity_tokens: 40_000.0,
        prefill_chunk_tokens: 1024.0,
    };
    // Load swings from idle to past saturation and back, so every regime is seen.
    let wave = |peak: f64| move |t: f64| peak * (0.55 + 0.5 * (t / 20_000.0).sin());
    let mut out = run(fast, &mut r, duration_ms, wave(0.006));
    out.extend(run(slow, &mut r, duration_ms, wave(0.002)));
    out
}

fn fit(objective: Objective, samples: &[TrainingSample]) -> sluice_predictor::Model {
    let mut t = Trainer::new(PredictorConfig {
        objective,
        ..PredictorConfig::default()
    });
    for s in samples {
        t.add(s);
    }
    t.fit().unwrap()
}

fn mapes(m: &sluice_predictor::Model, test: &[TrainingSample]) -> (f64, f64) {
    let ttft = mape(test.iter().map(|s| {
        (
            m.predict(&s.features_at_dispatch).ttft_ms,
            s.ttft_ms.unwrap(),
        )
    }));
    let tpot = mape(test.iter().map(|s| {
        (
            m.predict(&s.features_at_dispatch).tpot_ms.unwrap(),
            s.tpot_ms.unwrap(),
        )
    }));
    (ttft, tpot)
}

/// On this simulation the achievable MAPE is bounded by noise no dispatch-time feature
/// explains (the phase of the running step, later arrivals' prefill chunks, other requests'
/// output lengths): a 50-nearest-neighbour median on 53k samples, run while choosing the
/// model, scored 18.6 % (TTFT) / 20.0 % (TPOT), the median fit 17.3 % / 19.7 %, the mean
/// fit 31.8 % / 22.0 % (linear model alone). The TTFT trees took most of the mean fit's
/// TTFT excess away (on this test's data set now: median 17.5 % / 21.3 %, mean 21.0 % /
/// 22.7 %); the median stays ahead on both targets.
/// The thresholds below pin that ordering at a test-sized data set.
#[test]
fn median_mode_beats_mean_mode_on_emergent_skewed_latencies() {
    let train = fleet_samples(1, 1_200_000.0);
    let test = fleet_samples(2, 400_000.0);
    let (med_ttft, med_tpot) = mapes(&fit(Objective::Quantile { q: 0.5 }, &train), &test);
    let (mean_ttft, mean_tpot) = mapes(&fit(Objective::Mean, &train), &test);
    eprintln!(
        "engine sim, {} train / {} test samples, MAPE vs observations: \
         median fit TTFT {med_ttft:.1}% TPOT {med_tpot:.1}%; mean fit TTFT {mean_ttft:.1}% TPOT {mean_tpot:.1}%",
        train.len(),
        test.len()
    );
    assert!(
        med_ttft < 0.9 * mean_ttft,
        "median {med_ttft:.1}% vs mean {mean_ttft:.1}%"
    );
    assert!(
        med_tpot <= mean_tpot,
        "median {med_tpot:.1}% vs mean {mean_tpot:.1}%"
    );
    assert!(
        med_ttft <= 22.0 && med_tpot <= 22.0,
        "TTFT {med_ttft:.1}% TPOT {med_tpot:.1}%"
    );
}

#[test]
fn p90_mode_is_exceeded_by_about_one_request_in_ten_on_simulated_engines() {
    let train = fleet_samples(3, 1_200_000.0);
    let test = fleet_samples(4, 400_000.0);
    let m = fit(Objective::Quantile { q: 0.9 }, &train);
    let n = test.len() as f64;
    let over = |pick: &dyn Fn(&TrainingSample) -> (f64, f64)| {
        test.iter()
            .filter(|s| {
                let (pred, actual) = pick(s);
                actual > pred
            })
            .count() as f64
            / n
    };
    let ttft = over(&|s| {
        (
            m.predict(&s.features_at_dispatch).ttft_ms,
            s.ttft_ms.unwrap(),
        )
    });
    let tpot = over(&|s| {
        (
            m.predict(&s.features_at_dispatch).tpot_ms.unwrap(),
            s.tpot_ms.unwrap(),
        )
    });
    eprintln!("engine sim p90: exceeded by TTFT {ttft:.3} TPOT {tpot:.3} of requests");
    assert!(
        (0.05..=0.15).contains(&ttft),
        "TTFT p90 exceeded by {ttft:.3}"
    );
    assert!(
        (0.05..=0.15).contains(&tpot),
        "TPOT p90 exceeded by {tpot:.3}"
    );
}
