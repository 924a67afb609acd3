//! Workload files (YAML): arrivals and a weighted mix of request classes.
//!
//! ```yaml
//! name: multi-tenant
//! seed: 7
//! duration_s: 30
//! arrival: {type: poisson, rate: 40}          # or constant, or closed {concurrency: 16}
//! classes:
//!   - name: interactive
//!     weight: 3
//!     api: chat                               # chat | completions
//!     stream: true
//!     prompt: {dist: sharegpt_prompt}
//!     output: {dist: fixed, value: 64}
//!     slo: {ttft_ms: 500, tpot_ms: 50}         # sent as x-slo-ttft-ms / x-slo-tpot-ms
//!     objective: critical                     # x-gateway-inference-objective
//!     workload: {workload_id: chat, criticality: 5}   # X-Workload-Context
//! ```
//!
//! Arrival rates and durations are in **simulated** time; the load generator divides them by
//! its time scale when the target runs faster than real time.

use std::collections::BTreeMap;

use rand::Rng;
use rand::rngs::SmallRng;
use serde::{Deserialize, Serialize};

use crate::api::Api;

/// A whole workload file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    /// Name used in reports.
    pub name: String,
    /// Seed for every random choice (arrivals, classes, lengths, prompt text).
    #[serde(default)]
    pub seed: u64,
    /// Model to ask for when a class names none (defaults to the target's base model name).
    #[serde(default)]
    pub model: Option<String>,
    /// Duration of the run in simulated seconds (ignored when `arrival.stages` is set).
    #[serde(default = "default_duration")]
    pub duration_s: f64,
    /// Arrival process.
    pub arrival: Arrival,
    /// Request classes, chosen by weight.
    pub classes: Vec<Class>,
}

fn default_duration() -> f64 {
    10.0
}

/// How requests arrive.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Arrival {
    /// Open loop, exponential gaps.
    Poisson {
        /// Requests per second (unless `stages` is given).
        #[serde(default)]
        rate: f64,
        /// A rate ladder: each stage runs `rate` for `duration_s`.
        #[serde(default)]
        stages: Vec<Stage>,
    },
    /// Open loop, equal gaps.
    Constant {
        /// Requests per second (unless `stages` is given).
        #[serde(default)]
        rate: f64,
        /// A rate ladder.
        #[serde(default)]
        stages: Vec<Stage>,
    },
    /// Closed loop: `concurrency` users each send their next request when the last one ends.
    Closed {
        /// Concurrent users.
        concurrency: usize,
    },
}

/// One step of a rate ladder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stage {
    /// Requests per second.
    pub rate: f64,
    /// Seconds.
    pub duration_s: f64,
}

/// A length distribution in tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "dist", rename_all = "snake_case", deny_unknown_fields)]
pub enum Dist {
    /// Always `value`.
    Fixed {
        /// Tokens.
        value: u32,
    },
    /// Uniform in `[min, max]`.
    Uniform {
        /// Lower bound.
        min: u32,
        /// Upper bound.
        max: u32,
    },
    /// Log-normal with the given median and log-space sigma, clamped to `[min, max]`.
    Lognormal {
        /// Median.
        median: f64,
        /// Log-space standard deviation.
        sigma: f64,
        /// Lower clamp.
        #[serde(default = "one")]
        min: u32,
        /// Upper clamp.
        #[serde(default = "big")]
        max: u32,
    },
    /// ShareGPT-shaped prompt lengths: log-normal, median 130, sigma 1.0, in [4, 4096]
    /// (mean ≈ 215, close to the ShareGPT V3 set as filtered by vLLM's benchmark).
    SharegptPrompt,
    /// ShareGPT-shaped reply lengths: log-normal, median 150, sigma 0.9, in [4, 2048].
    SharegptOutput,
}

fn one() -> u32 {
    1
}
fn big() -> u32 {
    131_072
}

impl Dist {
    /// Draws one length.
    pub fn sample(&self, rng: &mut SmallRng) -> u32 {
        match *self {
            Dist::Fixed { value } => value,
            Dist::Uniform { min, max } => rng.random_range(min.min(max)..=max.max(min)),
            Dist::Lognormal {
                median,
                sigma,
                min,
                max,
            } => lognormal(rng, median, sigma, min, max),
            Dist::SharegptPrompt => lognormal(rng, 130.0, 1.0, 4, 4096),
            Dist::SharegptOutput => lognormal(rng, 150.0, 0.9, 4, 2048),
        }
    }

    fn validate(&self, what: &str) -> Result<(), String> {
        match *self {
            Dist::Fixed { value: 0 } => Err(format!("{what}: fixed value must be at least 1")),
            Dist::Uniform { min, max } if min == 0 || min > max => Err(format!(
                "{what}: uniform needs 1 <= min <= max, got min {min}, max {max}"
            )),
            Dist::Lognormal {
                median,
                sigma,
                min,
                max,
            } if !(median > 0.0 && sigma >= 0.0 && min >= 1 && min <= max) => Err(format!(
                "{what}: lognormal needs median > 0, sigma >= 0 and 1 <= min <= max"
            )),
            _ => Ok(()),
        }
    }
}

fn lognormal(rng: &mut SmallRng, median: f64, sigma: f64, min: u32, max: u32) -> u32 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random::<f64>();
    let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
    let v = (median.ln() + sigma * z).exp().round();
    (v.clamp(f64::from(min), f64::from(max))) as u32
}

/// Requests share one of `groups` prefixes of `prefix_tokens` (inference-perf's `shared_prefix`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedPrefix {
    /// Number of distinct prefixes.
    pub groups: u32,
    /// Tokens in each prefix (the class's `prompt` length is added after it).
    pub prefix_tokens: u32,
}

/// A LoRA mix: the request's `model` is one of `adapters`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraMix {
    /// Adapter names.
    pub adapters: Vec<String>,
    /// Relative weights (default: equal).
    #[serde(default)]
    pub weights: Vec<f64>,
}

/// Latency objectives a class carries.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Slo {
    /// Time to first token, ms.
    pub ttft_ms: Option<f64>,
    /// Mean time per output token after the first, ms.
    pub tpot_ms: Option<f64>,
}

/// The `X-Workload-Context` header (a sluice extension, `flow-control.md` §9).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadContext {
    /// Workload identity.
    pub workload_id: String,
    /// 1 (lowest) to 5 (highest).
    pub criticality: u8,
}

/// Which endpoint a class calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApiKind {
    /// `/v1/chat/completions`.
    #[default]
    Chat,
    /// `/v1/completions`.
    Completions,
}

impl From<ApiKind> for Api {
    fn from(k: ApiKind) -> Api {
        match k {
            ApiKind::Chat => Api::Chat,
            ApiKind::Completions => Api::Completions,
        }
    }
}

/// One kind of request in the mix.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Class {
    /// Name used in reports.
    pub name: String,
    /// Relative weight.
    #[serde(default = "one_f")]
    pub weight: f64,
    /// Endpoint.
    #[serde(default)]
    pub api: ApiKind,
    /// Stream the answer (SSE).
    #[serde(default = "yes")]
    pub stream: bool,
    /// Send `ignore_eos: true` so the output length is exactly `max_tokens`.
    #[serde(default = "yes")]
    pub ignore_eos: bool,
    /// Prompt length (after any shared prefix).
    pub prompt: Dist,
    /// `max_tokens`.
    pub output: Dist,
    /// Shared-prefix groups.
    #[serde(default)]
    pub shared_prefix: Option<SharedPrefix>,
    /// LoRA adapters.
    #[serde(default)]
    pub lora: Option<LoraMix>,
    /// Model override for this class.
    #[serde(default)]
    pub model: Option<String>,
    /// SLO headers, also used to judge goodput.
    #[serde(default)]
    pub slo: Slo,
    /// `x-gateway-inference-objective`.
    #[serde(default)]
    pub objective: Option<String>,
    /// `X-Workload-Context`.
    #[serde(default)]
    pub workload: Option<WorkloadContext>,
    /// Further headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

fn one_f() -> f64 {
    1.0
}
fn yes() -> bool {
    true
}

impl Workload {
    /// Reads a YAML workload; errors name the file and what is wrong.
    pub fn from_yaml(text: &str, origin: &str) -> anyhow::Result<Self> {
        let w: Workload =
            serde_saphyr::from_str(text).map_err(|e| anyhow::anyhow!("workload {origin}: {e}"))?;
        w.validate()
            .map_err(|e| anyhow::anyhow!("workload {origin}: {e}"))?;
        Ok(w)
    }

    /// Checks values that the types cannot.
    pub fn validate(&self) -> Result<(), String> {
        if self.classes.is_empty() {
            return Err("`classes` must list at least one class".into());
        }
        if self
            .classes
            .iter()
            .any(|c| !(c.weight.is_finite() && c.weight >= 0.0))
            || self.classes.iter().all(|c| c.weight == 0.0)
        {
            return Err("class weights must be non-negative and not all zero".into());
        }
        for c in &self.classes {
            c.prompt.validate(&format!("classes[{}].prompt", c.name))?;
            c.output.validate(&format!("classes[{}].output", c.name))?;
            if let Some(l) = &c.lora
                && (l.adapters.is_empty()
                    || (!l.weights.is_empty() && l.weights.len() != l.adapters.len()))
            {
                return Err(format!(
                    "classes[{}].lora: adapters must be non-empty and weights, if given, one per adapter",
                    c.name
                ));
            }
            if let Some(w) = &c.workload
                && !(1..=5).contains(&w.criticality)
            {
                return Err(format!(
                    "classes[{}].workload.criticality must be 1-5, got {}",
                    c.name, w.criticality
                ));
            }
            if c.shared_prefix.as_ref().is_some_and(|p| p.groups == 0) {
                return Err(format!(
                    "classes[{}].shared_prefix.groups must be at least 1",
                    c.name
                ));
            }
        }
        match &self.arrival {
            Arrival::Poisson { rate, stages } | Arrival::Constant { rate, stages } => {
                if stages.is_empty() && !(*rate > 0.0 && self.duration_s > 0.0) {
                    return Err(
                        "arrival.rate and duration_s must be positive (or give arrival.stages)"
                            .into(),
                    );
                }
                if stages.iter().any(|s| !(s.rate > 0.0 && s.duration_s > 0.0)) {
                    return Err(
                        "every arrival.stages entry needs rate > 0 and duration_s > 0".into(),
                    );
                }
            }
            Arrival::Closed { concurrency } => {
                if *concurrency == 0 || self.duration_s <= 0.0 {
                    return Err("arrival.concurrency and duration_s must be positive".into());
                }
            }
        }
        Ok(())
    }

    /// Total simulated duration.
    pub fn total_duration_s(&self) -> f64 {
        match &self.arrival {
            Arrival::Poisson { stages, .. } | Arrival::Constant { stages, .. }
                if !stages.is_empty() =>
            {
                stages.iter().map(|s| s.duration_s).sum()
            }
            _ => self.duration_s,
        }
    }

    /// Open-loop arrival offsets in simulated seconds (empty for closed loop).
    pub fn arrival_times(&self, rng: &mut SmallRng) -> Vec<f64> {
        let (poisson, rate, stages) = match &self.arrival {
            Arrival::Poisson { rate, stages } => (true, *rate, stages),
            Arrival::Constant { rate, stages } => (false, *rate, stages),
            Arrival::Closed { .. } => return Vec::new(),
        };
        let ladder: Vec<Stage> = if stages.is_empty() {
            vec![Stage {
                rate,
                duration_s: self.duration_s,
            }]
        } else {
            stages.clone()
        };
        let mut out = Vec::new();
        let mut stage_start = 0.0;
        for s in &ladder {
            let end = stage_start + s.duration_s;
            let mut t = stage_start;
            let mut k = 0u64;
            loop {
                // Constant gaps are computed from the index so rounding never adds an arrival.
                t = if poisson {
                    t - (1.0 - rng.random::<f64>()).ln() / s.rate
                } else {
                    k += 1;
                    stage_start + k as f64 / s.rate
                };
                if t >= end - 1e-9 {
                    break;
                }
                out.push(t);
            }
            stage_start = end;
        }
        out
    }

    /// Draws the next request.
    pub fn draw(&self, rng: &mut SmallRng) -> Planned {
        let total: f64 = self.classes.iter().map(|c| c.weight).sum();
        let mut x = rng.random::<f64>() * total;
        let mut ci = self.classes.len() - 1;
        for (i, c) in self.classes.iter().enumerate() {
            if x < c.weight {
                ci = i;
                break;
            }
            x -= c.weight;
        }
        let c = &self.classes[ci];
        let group = c
            .shared_prefix
            .as_ref()
            .map(|p| rng.random_range(0..p.groups));
        let lora = c.lora.as_ref().map(|l| {
            let weights: Vec<f64> = if l.weights.is_empty() {
                vec![1.0; l.adapters.len()]
            } else {
                l.weights.clone()
            };
            let sum: f64 = weights.iter().sum();
            let mut y = rng.random::<f64>() * sum;
            let mut pick = l.adapters.len() - 1;
            for (i, w) in weights.iter().enumerate() {
                if y < *w {
                    pick = i;
                    break;
                }
                y -= w;
            }
            pick
        });
        Planned {
            class: ci,
            prompt_tokens: c.prompt.sample(rng),
            max_tokens: c.output.sample(rng),
            group,
            lora,
            text_seed: rng.random(),
        }
    }
}

/// One request drawn from the workload, before it is rendered.
#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    /// Index into `classes`.
    pub class: usize,
    /// Tokens after the shared prefix.
    pub prompt_tokens: u32,
    /// `max_tokens`.
    pub max_tokens: u32,
    /// Shared-prefix group.
    pub group: Option<u32>,
    /// Index into the class's adapters.
    pub lora: Option<usize>,
    /// Seed of the unique part of the prompt.
    pub text_seed: u64,
}

/// Text of exactly `tokens` tokens (4 bytes each) derived from `seed`.
pub fn text_of(tokens: u32, seed: u64) -> String {
    const SYL: [&str; 16] = [
        "ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "ve", "du", "ga", "be", "zo", "fi", "ha",
        "ju",
    ];
    let mut s = String::with_capacity(tokens as usize * 4);
    let mut x = seed | 1;
    for _ in 0..tokens {
        // xorshift: cheap, deterministic, good enough for filler text.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.push(' ');
        s.push_str(SYL[(x & 15) as usize]);
        s.push(if x & 16 == 0 { 'n' } else { 's' });
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    const YAML: &str = r#"
name: t
seed: 3
duration_s: 10
arrival: {type: poisson, rate: 50}
classes:
  - name: a
    weight: 3
    prompt: {dist: fixed, value: 10}
    output: {dist: uniform, min: 1, max: 4}
    slo: {ttft_ms: 100}
  - name: b
    api: completions
    stream: false
    prompt: {dist: sharegpt_prompt}
    output: {dist: sharegpt_output}
    shared_prefix: {groups: 4, prefix_tokens: 100}
    lora: {adapters: [x, y]}
"#;

    #[test]
    fn parses_and_draws_deterministically() {
        let w = Workload::from_yaml(YAML, "inline").unwrap();
        let mut r1 = SmallRng::seed_from_u64(w.seed);
        let mut r2 = SmallRng::seed_from_u64(w.seed);
        let a: Vec<_> = (0..100).map(|_| w.draw(&mut r1)).collect();
        let b: Vec<_> = (0..100).map(|_| w.draw(&mut r2)).collect();
        assert_eq!(a, b);
        let share_a = a.iter().filter(|p| p.class == 0).count();
        assert!((60..=90).contains(&share_a), "{share_a}");
        assert!(
            a.iter()
                .filter(|p| p.class == 1)
                .all(|p| p.group.is_some() && p.lora.is_some())
        );
    }

    #[test]
    fn poisson_rate_and_ladder_are_respected() {
        let w = Workload::from_yaml(YAML, "inline").unwrap();
        let n = w.arrival_times(&mut SmallRng::seed_from_u64(1)).len();
        assert!((400..=600).contains(&n), "{n}");
        let ladder = YAML.replace(
            "{type: poisson, rate: 50}",
            "{type: constant, stages: [{rate: 10, duration_s: 2}, {rate: 100, duration_s: 1}]}",
        );
        let w = Workload::from_yaml(&ladder, "inline").unwrap();
        let t = w.arrival_times(&mut SmallRng::seed_from_u64(1));
        assert_eq!(t.iter().filter(|x| **x < 2.0).count(), 19);
        assert_eq!(t.iter().filter(|x| **x >= 2.0).count(), 99);
        assert_eq!(w.total_duration_s(), 3.0);
    }

    #[test]
    fn errors_name_the_file_and_field() {
        let bad = YAML.replace("value: 10", "value: 0");
        let e = Workload::from_yaml(&bad, "w.yaml").unwrap_err().to_string();
        assert!(
            e.contains("w.yaml") && e.contains("classes[a].prompt"),
            "{e}"
        );
        let e = Workload::from_yaml("name: x\narrival: {type: warp}\nclasses: []", "w2.yaml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("w2.yaml"), "{e}");
    }

    #[test]
    fn text_has_exactly_four_bytes_per_token() {
        assert_eq!(text_of(37, 9).len(), 148);
        assert_eq!(crate::tokenizer::count_tokens(&text_of(37, 9)), 37);
        assert_ne!(text_of(8, 1), text_of(8, 2));
    }
}
