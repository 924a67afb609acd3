//! A small step-level simulation of a continuous-batching engine (vLLM-like: FCFS
//! admission bounded by batch size and KV capacity, chunked prefill sharing steps with
//! decodes). Latencies *emerge* from the simulation instead of coming from a formula, so
//! the model is tested on data with the noise real traffic has: unknown output lengths of
//! the requests ahead, and batch changes after dispatch.

use std::collections::VecDeque;

use rand::Rng;
use rand::rngs::SmallRng;
use sluice_predictor::{ClassId, Features, TrainingSample};

use super::Hardware;

#[derive(Clone, Copy, Debug)]
pub struct Engine {
    pub hw: Hardware,
    pub class: ClassId,
    pub max_batch: usize,
    pub kv_capacity_tokens: f64,
    pub prefill_chunk_tokens: f64,
}

#[derive(Clone, Debug)]
struct Req {
    arrival: f64,
    features: Features,
    /// Uncached prompt tokens still to prefill.
    prefill_left: f64,
    context: f64,
    output: u32,
    generated: u32,
    first_token_at: Option<f64>,
}

/// Simulates one server for `duration_ms` with Poisson arrivals whose rate follows
/// `rate_per_ms(t)`; returns one training sample per completed request.
pub fn run(
    e: Engine,
    rng: &mut SmallRng,
    duration_ms: f64,
    rate_per_ms: impl Fn(f64) -> f64,
) -> Vec<TrainingSample> {
    let mut out = Vec::new();
    let mut waiting: VecDeque<Req> = VecDeque::new();
    let mut running: Vec<Req> = Vec::new();
    let mut now = 0.0;
    let max_rate = 1.0; // thinning bound, arrivals per ms
    let mut next_arrival = exp(rng, max_rate);
    while now < duration_ms {
        // Arrivals up to now join the queue with the server state as the picker sees it.
        while next_arrival <= now {
            if rng.random::<f64>() < rate_per_ms(next_arrival) / max_rate {
                let input = rng.random_range(4.0_f64..8.5).exp().round();
                let prefix = if rng.random_bool(0.4) {
                    0.0
                } else {
                    rng.random_range(0.0..0.95)
                };
                let kv_used: f64 = running.iter().map(|r| r.context).sum();
                let tif: f64 = running
                    .iter()
                    .chain(waiting.iter())
                    .map(|r| r.prefill_left)
                    .sum();
                let features = Features {
                    kv_cache_usage: (kv_used / e.kv_capacity_tokens).min(1.0),
                    input_tokens: input as u32,
                    waiting: waiting.len() as u32,
                    running: running.len() as u32,
                    prefix_cache_score: prefix,
                    prefill_tokens_in_flight: tif as u32,
                    prefill_requests_in_flight: running
                        .iter()
                        .filter(|r| r.prefill_left > 0.0)
                        .count() as u32,
                    class: e.class,
                    streamed: true,
                    ..Features::default()
                };
                waiting.push_back(Req {
                    arrival: next_arrival,
                    features,
                    prefill_left: (input * (1.0 - prefix)).max(1.0),
                    context: input,
                    output: rng.random_range(20..400),
                    generated: 0,
                    first_token_at: None,
                });
            }
            next_arrival += exp(rng, max_rate);
        }
        // FCFS admission bounded by batch size and KV capacity.
        let mut kv_used: f64 = running.iter().map(|r| r.context).sum();
        while running.len() < e.max_batch {
            let Some(front) = waiting.front() else { break };
            if kv_used + front.context > e.kv_capacity_tokens {
                break;
            }
            kv_used += front.context;
            if let Some(r) = waiting.pop_front() {
                running.push(r);
            }
        }
        if running.is_empty() {
            now = now.max(next_arrival);
            continue;
        }
        // One step: decode for every prefilled request, a prefill chunk for the others.
        let mut budget = e.prefill_chunk_tokens;
        let mut prefilled = 0.0;
        let decoding = running.iter().filter(|r| r.prefill_left <= 0.0).count() as f64;
        for r in running.iter_mut().filter(|r| r.prefill_left > 0.0) {
            let take = r.prefill_left.min(budget);
            r.prefill_left -= take;
            budget -= take;
            prefilled += take;
            if budget <= 0.0 {
                break;
            }
        }
        let step = e.hw.step_base_ms
            + e.hw.step_per_running_ms * decoding
            + e.hw.step_kv_ms * (kv_used / e.kv_capacity_tokens)
            + prefilled / e.hw.prefill_tok_per_ms;
        now += step;
        let mut i = 0;
        while i < running.len() {
            let r = &mut running[i];
            if r.prefill_left <= 0.0 {
                r.generated += 1;
                r.context += 1.0;
                r.first_token_at.get_or_insert(now);
            }
            if r.generated >= r.output {
                let r = running.swap_remove(i);
                let first = r.first_token_at.unwrap_or(now);
                out.push(TrainingSample {
                    features_at_dispatch: r.features,
                    ttft_ms: Some(first - r.arrival),
                    tpot_ms: Some((now - first) / f64::from(r.output - 1)),
                });
            } else {
                i += 1;
            }
        }
    }
    out
}

fn exp(rng: &mut SmallRng, rate: f64) -> f64 {
    -(1.0 - rng.random::<f64>()).ln() / rate
}
