//! A synthetic heterogeneous fleet with a known latency function, shared by the accuracy
//! tests and the benchmarks.
#![allow(dead_code)]

pub mod engine;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use sluice_predictor::{ClassId, Features, TrainingSample};

/// Engine physics of one hardware class (vLLM-like, chunked prefill).
#[derive(Clone, Copy, Debug)]
pub struct Hardware {
    /// Prefill throughput, tokens per millisecond.
    pub prefill_tok_per_ms: f64,
    /// Decode step time with an empty batch, ms.
    pub step_base_ms: f64,
    /// Extra step time per running request, ms.
    pub step_per_running_ms: f64,
    /// Extra step time at a full KV cache (attention over long contexts), ms.
    pub step_kv_ms: f64,
}

/// A fast class (H100-like) and a slow one (L4-like, ~2.5× slower).
pub const FAST: Hardware = Hardware {
    prefill_tok_per_ms: 12.0,
    step_base_ms: 7.0,
    step_per_running_ms: 0.18,
    step_kv_ms: 6.0,
};
pub const SLOW: Hardware = Hardware {
    prefill_tok_per_ms: 4.5,
    step_base_ms: 16.0,
    step_per_running_ms: 0.45,
    step_kv_ms: 15.0,
};

pub fn hardware(class: ClassId) -> Hardware {
    if class == ClassId(2) { SLOW } else { FAST }
}

/// Noiseless mean TTFT and TPOT.
pub fn truth(f: &Features) -> (f64, f64) {
    let h = hardware(f.class);
    let running = f64::from(f.running);
    let step = h.step_base_ms + h.step_per_running_ms * running + h.step_kv_ms * f.kv_cache_usage;
    // Prompt work ahead of and including this request, slowed by the decode batch sharing
    // each step; requests waiting ahead each hold us back by a few steps.
    let prefill = (f.uncached_input_tokens() + f64::from(f.prefill_tokens_in_flight))
        / h.prefill_tok_per_ms
        * (1.0 + 0.015 * running);
    let queue = f64::from(f.waiting) * 3.0 * step;
    let ttft = step + prefill + queue;
    let tpot = step + 0.04 * f64::from(f.prefill_tokens_in_flight) / h.prefill_tok_per_ms / 10.0;
    (ttft, tpot)
}

/// Random dispatch-time features for a two-class fleet.
pub fn features(rng: &mut SmallRng) -> Features {
    let class = if rng.random_bool(0.5) {
        ClassId(1)
    } else {
        ClassId(2)
    };
    let running: u32 = rng.random_range(0..48);
    let waiting: u32 = if rng.random_bool(0.7) {
        0
    } else {
        rng.random_range(1..16)
    };
    let kv = (f64::from(running) / 48.0 * rng.random_range(0.5..1.2)).clamp(0.0, 1.0);
    let input = (rng.random_range(4.0_f64..9.0)).exp() as u32; // 55..8100 tokens
    let prefix = if rng.random_bool(0.4) {
        0.0
    } else {
        rng.random_range(0.0..1.0)
    };
    let tif = rng.random_range(0..(running * 400 + 1));
    Features {
        kv_cache_usage: kv,
        input_tokens: input,
        waiting,
        running,
        prefix_cache_score: prefix,
        prefill_tokens_in_flight: tif,
        class,
        streamed: true,
        ..Features::default()
    }
}

/// Multiplicative log-normal-ish noise with the given relative spread.
pub fn noisy(rng: &mut SmallRng, v: f64, sigma: f64) -> f64 {
    // Sum of uniforms approximates a normal without another dependency.
    let z: f64 = (0..12).map(|_| rng.random::<f64>()).sum::<f64>() - 6.0;
    v * (sigma * z).exp()
}

pub fn sample(rng: &mut SmallRng, sigma: f64) -> TrainingSample {
    let f = features(rng);
    let (ttft, tpot) = truth(&f);
    TrainingSample {
        features_at_dispatch: f,
        ttft_ms: Some(noisy(rng, ttft, sigma)),
        tpot_ms: Some(noisy(rng, tpot, sigma)),
    }
}

pub fn rng(seed: u64) -> SmallRng {
    SmallRng::seed_from_u64(seed)
}

/// Mean absolute percentage error, in percent.
pub fn mape(pairs: impl Iterator<Item = (f64, f64)>) -> f64 {
    let (mut sum, mut n) = (0.0, 0usize);
    for (pred, actual) in pairs {
        sum += ((pred - actual) / actual).abs();
        n += 1;
    }
    100.0 * sum / n.max(1) as f64
}
