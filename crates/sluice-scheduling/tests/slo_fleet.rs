//! SLO-aware routing on a heterogeneous simulated fleet, in virtual time.
//!
//! Eight `sluice-sim` engines (3 × H100, 3 × A100, 2 × L4, all Llama-3.1-8B) are stepped by
//! a discrete-event loop; every arrival goes through the same calls the picker makes
//! (`legacy_admit` → `schedule` → `pre_request`, then response headers, one chunk per token,
//! and `complete`), with model-server metrics scraped every 50 ms as the picker does. The
//! policies compared on identical arrivals: round-robin, random, upstream's default profile
//! (queue 2 + KV 2 + prefix 3, max score) and the SLO profile (prefix → predicted-latency
//! scorer → weighted random) with the in-process predictor trained online from the run's
//! own responses.
//!
//! - `slo_profile_beats_round_robin_on_a_small_fleet_and_leaks_nothing` runs in the normal
//!   test suite (a short, light run).
//! - `slo_fleet_report` (ignored) is the benchmark behind `cargo xtask bench-slo`: a rate
//!   ladder finds where round-robin meets about half of the SLOs, then every policy runs at
//!   that rate and the report prints attainment, goodput, TTFT/TPOT p50/p99 and the
//!   predictor's MAPE after warm-up. Settings: `SLO_BENCH_SECONDS` (measured seconds,
//!   default 60), `SLO_BENCH_WARMUP` (30), `SLO_BENCH_RATE` (skip the ladder),
//!   `SLO_BENCH_SEED` (7), `SLO_BENCH_SEEDS` (the seed-spread table, `7,8,9,10`),
//!   `SLO_BENCH_SCENARIO` (`balanced`, the default, or `tiered`: see
//!   [`TIERED`]).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout,
    reason = "a simulation harness and report; set-up failures should be loud"
)]

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use sluice_core::endpoint::HARDWARE_CLASS_LABEL;
use sluice_core::{Endpoint, EndpointMetrics, EndpointPickerConfig};
use sluice_predictor::{InProcessPredictor, PredictorConfig};
use sluice_scheduling::plugins::prefix::block_hashes;
use sluice_scheduling::plugins::slo::{self, RunningRequests, SloCycleState, SloServices};
use sluice_scheduling::{
    Candidate, Clock, InFlightCounters, LlmRequest, Outcome, Registry, ResponseChunk, Scheduled,
    Scheduler, SchedulerOptions, SharedState,
};
use sluice_sim::engine::{Engine, Micros, ReqId, SimRequest};
use sluice_sim::preset::Preset;

const MODEL: &str = "llama";
const SCRAPE_US: Micros = 50_000;
const TRAIN_US: Micros = 2_000_000;

/// One class of the workload mix.
#[derive(Clone, Copy, Debug)]
struct Class {
    name: &'static str,
    share: f64,
    prefix_tokens: u32,
    prefix_groups: u32,
    unique_tokens: u32,
    output_tokens: u32,
    ttft_slo_ms: f64,
    tpot_slo_ms: f64,
    priority: i32,
}

const BALANCED: [Class; 3] = [
    // Interactive chat: shared system prompts, tight TTFT and inter-token latency.
    Class {
        name: "chat",
        share: 0.5,
        prefix_tokens: 400,
        prefix_groups: 16,
        unique_tokens: 200,
        output_tokens: 100,
        ttft_slo_ms: 500.0,
        tpot_slo_ms: 50.0,
        priority: 0,
    },
    // Retrieval-augmented: long shared documents, moderate SLOs.
    Class {
        name: "rag",
        share: 0.2,
        prefix_tokens: 2000,
        prefix_groups: 8,
        unique_tokens: 1000,
        output_tokens: 60,
        ttft_slo_ms: 1500.0,
        tpot_slo_ms: 80.0,
        priority: 0,
    },
    // Offline summarisation: loose SLOs, sheddable.
    Class {
        name: "batch",
        share: 0.3,
        prefix_tokens: 0,
        prefix_groups: 1,
        unique_tokens: 1000,
        output_tokens: 200,
        ttft_slo_ms: 4000.0,
        tpot_slo_ms: 150.0,
        priority: -1,
    },
];

/// The `tiered` scenario (`SLO_BENCH_SCENARIO=tiered`): the same request shapes under
/// tiered SLOs, as a service selling an interactive premium tier next to a standard one
/// would set them. A 20 ms inter-token SLO needs an H100's short decode step; an A100 meets
/// it only nearly empty and an L4 never (its step alone reads 67 ms of weights), so where a
/// request runs matters, not only how loaded the endpoint is.
const TIERED: [Class; 3] = [
    Class {
        name: "premium",
        share: 0.3,
        ttft_slo_ms: 300.0,
        tpot_slo_ms: 20.0,
        ..BALANCED[0]
    },
    Class {
        name: "standard",
        share: 0.4,
        ttft_slo_ms: 1000.0,
        tpot_slo_ms: 80.0,
        ..BALANCED[0]
    },
    BALANCED[2],
];

/// The workload mix of this process: `BALANCED` unless `SLO_BENCH_SCENARIO=tiered`.
fn classes() -> &'static [Class] {
    static CHOSEN: std::sync::OnceLock<[Class; 3]> = std::sync::OnceLock::new();
    CHOSEN.get_or_init(|| match std::env::var("SLO_BENCH_SCENARIO").as_deref() {
        Ok("tiered") => {
            // `SLO_BENCH_PREMIUM`: the premium share, taken from the standard tier.
            let mut c = TIERED;
            let premium: f64 = env("SLO_BENCH_PREMIUM", c[0].share);
            assert!(
                (0.0..=c[0].share + c[1].share).contains(&premium),
                "SLO_BENCH_PREMIUM={premium}: expected 0 to {}",
                c[0].share + c[1].share
            );
            c[1].share += c[0].share - premium;
            c[0].share = premium;
            c
        }
        Ok("balanced") | Err(_) => BALANCED,
        Ok(other) => panic!("SLO_BENCH_SCENARIO={other:?}: expected balanced or tiered"),
    })
}

const FLEET_TWO: [Preset; 8] = [
    Preset::H100Llama8b,
    Preset::H100Llama8b,
    Preset::H100Llama8b,
    Preset::H100Llama8b,
    Preset::A100Llama8b,
    Preset::A100Llama8b,
    Preset::A100Llama8b,
    Preset::A100Llama8b,
];

/// `SLO_BENCH_FLEET=mixed`: a mixed-generation pool, half of it inference-class GPUs.
const FLEET_MIXED: [Preset; 8] = [
    Preset::H100Llama8b,
    Preset::H100Llama8b,
    Preset::A100Llama8b,
    Preset::A100Llama8b,
    Preset::L4Llama8b,
    Preset::L4Llama8b,
    Preset::L4Llama8b,
    Preset::L4Llama8b,
];

const FLEET: [Preset; 8] = [
    Preset::H100Llama8b,
    Preset::H100Llama8b,
    Preset::H100Llama8b,
    Preset::A100Llama8b,
    Preset::A100Llama8b,
    Preset::A100Llama8b,
    Preset::L4Llama8b,
    Preset::L4Llama8b,
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Policy {
    RoundRobin,
    Random,
    Default,
    /// The SLO profile with this `headroomSelectionStrategy` and predictor objective
    /// (`p90`, the default, or `median`).
    Slo(&'static str, &'static str),
}

impl Policy {
    fn name(self) -> &'static str {
        match self {
            Policy::RoundRobin => "round-robin",
            Policy::Random => "random",
            Policy::Default => "default profile",
            Policy::Slo("least", "p90") => "SLO least p90",
            Policy::Slo("most", "p90") => "SLO most p90",
            Policy::Slo("least", "median") => "SLO least p50",
            Policy::Slo("most", "median") => "SLO most p50",
            Policy::Slo(..) => "SLO (other)",
        }
    }
}

/// A virtual clock the scheduler and plugins read.
#[derive(Debug)]
struct SimClock {
    base: Instant,
    micros: AtomicU64,
}

impl Clock for SimClock {
    fn now(&self) -> Instant {
        self.base + Duration::from_micros(self.micros.load(Ordering::Relaxed))
    }
}

#[derive(Clone, Debug)]
struct Arrival {
    at: Micros,
    class: usize,
    group: u32,
    unique: u32,
    output: u32,
}

fn arrivals(rate: f64, until: Micros, seed: u64) -> Vec<Arrival> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut t = 0.0f64;
    let mut out = Vec::new();
    loop {
        t += -(1.0 - rng.random::<f64>()).ln() / rate * 1e6;
        if t >= until as f64 {
            return out;
        }
        let u: f64 = rng.random();
        let mut acc = 0.0;
        let class = classes()
            .iter()
            .position(|c| {
                acc += c.share;
                u < acc
            })
            .unwrap_or(classes().len() - 1);
        let c = classes()[class];
        // Lengths are log-normal around the class mean (σ = SLO_BENCH_SIGMA, mean-preserving),
        // as chat traffic is: most requests short, a few long (ShareGPT-shaped). σ = 0 gives
        // the uniform ±50 % jitter.
        let sigma: f64 = env("SLO_BENCH_SIGMA", 0.0);
        let jitter = |rng: &mut SmallRng, v: u32| {
            let factor = if sigma > 0.0 {
                // Box–Muller: one standard normal from two uniforms.
                let (u1, u2): (f64, f64) = (1.0 - rng.random::<f64>(), rng.random());
                let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
                (sigma * z - sigma * sigma / 2.0).exp().clamp(0.05, 10.0)
            } else {
                rng.random_range(0.5..1.5)
            };
            ((f64::from(v) * factor) as u32).max(1)
        };
        out.push(Arrival {
            at: t as Micros,
            class,
            group: rng.random_range(0..c.prefix_groups),
            unique: jitter(&mut rng, c.unique_tokens),
            output: jitter(&mut rng, c.output_tokens),
        });
    }
}

/// Prompt bytes (4 per token, as the prefix producer assumes): the class/group's shared
/// prefix, then text unique to the request.
fn prompt(a: &Arrival, index: usize) -> Vec<u8> {
    let c = classes()[a.class];
    let mut p = Vec::with_capacity(((c.prefix_tokens + a.unique) * 4) as usize);
    let stem = format!("[{}:{}]", c.name, a.group);
    while p.len() < (c.prefix_tokens * 4) as usize {
        p.extend_from_slice(stem.as_bytes());
    }
    p.truncate((c.prefix_tokens * 4) as usize);
    let mut x = (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for _ in 0..a.unique * 4 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        p.push(b'a' + (x % 26) as u8);
    }
    p
}

#[derive(Debug, Default, Clone)]
struct Done {
    ttft_ms: Vec<f64>,
    tpot_ms: Vec<f64>,
    good: usize,
    total: usize,
    shed: usize,
    /// Per class of the scenario: (requests, requests that met both SLOs).
    per_class: [(usize, usize); 3],
    /// (predicted, actual) for the SLO profile.
    ttft_pairs: Vec<(f64, f64)>,
    tpot_pairs: Vec<(f64, f64)>,
    /// (the chosen endpoint's mean step at dispatch, actual TPOT): a forecast with no
    /// model, the baseline the predictor's TPOT MAPE is read against.
    tpot_persistence: Vec<(f64, f64)>,
    /// Per request with a prediction: server, features at dispatch, predicted and actual
    /// TTFT/TPOT (for `SLO_BENCH_DUMP`).
    rows: Vec<String>,
    decision_wall: Duration,
    decisions: usize,
    prediction_wall: Duration,
}

struct Live {
    index: usize,
    request: LlmRequest,
    scheduled: Option<Scheduled>,
    first: Option<Micros>,
    tokens: u32,
    predicted: Option<(f64, Option<f64>)>,
    features: Option<sluice_predictor::Features>,
    /// Diagnostics at dispatch for `SLO_BENCH_DUMP`: time left in the target's current step,
    /// time since its last step ended, and that step's length (µs).
    step_phase: (Micros, Micros, Micros),
    /// The engine it was sent to (for `SLO_BENCH_DUMP`).
    server: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    Scrape,
    Train,
    Step(usize),
    Arrival(usize),
}

struct Report {
    policy: Policy,
    done: Done,
    seconds: f64,
    leaked_running: usize,
    leaked_in_flight: u32,
}

fn pct(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}

fn mape(pairs: &[(f64, f64)]) -> f64 {
    let v: Vec<f64> = pairs
        .iter()
        .filter(|(_, a)| *a > 0.0)
        .map(|(p, a)| (p - a).abs() / a)
        .collect();
    100.0 * v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// Share (%) of pairs whose actual value was at most the prediction.
fn coverage(pairs: &[(f64, f64)]) -> f64 {
    100.0 * pairs.iter().filter(|(p, a)| a <= p).count() as f64 / pairs.len().max(1) as f64
}

impl Report {
    fn attainment(&self) -> f64 {
        self.done.good as f64 / self.done.total.max(1) as f64
    }
    fn goodput(&self) -> f64 {
        self.done.good as f64 / self.seconds
    }
}

fn run(
    policy: Policy,
    fleet: &[Preset],
    rate: f64,
    warmup_s: u64,
    measure_s: u64,
    seed: u64,
) -> Report {
    let until = (warmup_s + measure_s) * 1_000_000;
    let warmup = warmup_s * 1_000_000;
    let arrivals = arrivals(rate, until, seed);
    let clock = Arc::new(SimClock {
        base: Instant::now(),
        micros: AtomicU64::new(0),
    });
    let shared = SharedState::default();
    let mut predictor: Option<Arc<InProcessPredictor>> = None;
    let scheduler = match policy {
        Policy::Default | Policy::Slo(..) => {
            let cfg = if let Policy::Slo(strategy, objective) = policy {
                let p = Arc::new(
                    InProcessPredictor::spawn(PredictorConfig {
                        retrain_interval: None,
                        queue_capacity: 1 << 20,
                        objective: objective.parse().unwrap(),
                        ttft_trees: env(
                            "SLO_BENCH_TTFT_TREES",
                            PredictorConfig::default().ttft_trees,
                        ),
                        tpot_trees: env(
                            "SLO_BENCH_TPOT_TREES",
                            PredictorConfig::default().tpot_trees,
                        ),
                        ..PredictorConfig::default()
                    })
                    .unwrap(),
                );
                SloServices::install(&shared, SloServices::with_predictor(p.clone()));
                predictor = Some(p);
                let buffer: f64 = env("SLO_BENCH_BUFFER", 1.0);
                let yaml = slo::SLO_CONFIG_YAML.replace(
                    "  - type: predicted-latency-scorer\n",
                    &format!("  - type: predicted-latency-scorer\n    parameters:\n      headroomSelectionStrategy: {strategy}\n      sloBufferFactor: {buffer}\n"),
                );
                sluice_scheduling::parse_config_text(&yaml).unwrap()
            } else {
                EndpointPickerConfig::default()
            };
            Some(
                Scheduler::from_config_with(
                    &cfg,
                    &Registry::with_builtins(),
                    SchedulerOptions {
                        seed: Some(seed),
                        clock: clock.clone(),
                        shared: shared.clone(),
                        ..SchedulerOptions::default()
                    },
                )
                .unwrap(),
            )
        }
        _ => None,
    };
    let mut engines: Vec<Engine> = fleet
        .iter()
        .enumerate()
        .map(|(i, p)| Engine::new(p.config(), seed ^ (i as u64 + 1)))
        .collect();
    let endpoints: Vec<Arc<Endpoint>> = fleet
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mut e = Endpoint::from_address("bench", ([10, 0, 0, i as u8 + 1], 8000).into());
            e.key.pod = format!("{}-{i}", p.name()).into();
            e.labels
                .insert(HARDWARE_CLASS_LABEL.into(), p.name().into());
            Arc::new(e)
        })
        .collect();
    let in_flight: Vec<Arc<InFlightCounters>> = fleet
        .iter()
        .map(|_| Arc::new(InFlightCounters::with_epoch(clock.base)))
        .collect();
    let scrape = |engines: &[Engine]| -> Vec<Candidate> {
        engines
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let s = e.snapshot();
                Candidate {
                    endpoint: endpoints[i].clone(),
                    metrics: Some(Arc::new(EndpointMetrics {
                        waiting_queue_size: s.waiting,
                        running_requests_size: s.running,
                        kv_cache_usage: s.kv_usage,
                        cache_block_size: s.block_size,
                        cache_num_blocks: u64::from(s.num_gpu_blocks),
                        ..EndpointMetrics::default()
                    })),
                    metrics_age: Duration::ZERO,
                    in_flight: in_flight[i].clone(),
                }
            })
            .collect()
    };
    let mut cands = scrape(&engines);
    let mut heap: BinaryHeap<Reverse<(Micros, u64, Ev)>> = BinaryHeap::new();
    let mut seq = 0u64;
    let mut push = |heap: &mut BinaryHeap<Reverse<(Micros, u64, Ev)>>, t: Micros, ev: Ev| {
        seq += 1;
        heap.push(Reverse((t, seq, ev)));
    };
    for (i, a) in arrivals.iter().enumerate() {
        push(&mut heap, a.at, Ev::Arrival(i));
    }
    push(&mut heap, SCRAPE_US, Ev::Scrape);
    if predictor.is_some() {
        push(&mut heap, TRAIN_US, Ev::Train);
    }
    let mut stepping = vec![false; engines.len()];
    let mut step_end: Vec<Micros> = vec![0; engines.len()];
    let mut last_end: Vec<Micros> = vec![0; engines.len()];
    let mut last_len: Vec<Micros> = vec![0; engines.len()];
    let mut step_start: Vec<Micros> = vec![0; engines.len()];
    let mut live: HashMap<(usize, ReqId), Live> = HashMap::new();
    let mut done = Done::default();
    let mut rr = 0usize;
    let mut rng = SmallRng::seed_from_u64(seed ^ 0xabcdef);
    let sse = vec![("content-type".to_owned(), "text/event-stream".to_owned())];
    let drain_limit = until + 300_000_000;
    let mut hashes = Vec::new();
    let finish = |done: &mut Done, l: &Live, ok: bool, at: Micros| {
        let a = &arrivals[l.index];
        if a.at < warmup {
            return;
        }
        let c = classes()[a.class];
        done.total += 1;
        done.per_class[a.class].0 += 1;
        let Some(first) = l.first.filter(|_| ok) else {
            done.shed += usize::from(!ok);
            return;
        };
        let ttft = (first - a.at) as f64 / 1e3;
        let tpot = if l.tokens > 1 {
            (at - first) as f64 / 1e3 / f64::from(l.tokens - 1)
        } else {
            0.0
        };
        done.ttft_ms.push(ttft);
        done.tpot_ms.push(tpot);
        if ttft <= c.ttft_slo_ms && tpot <= c.tpot_slo_ms {
            done.good += 1;
            done.per_class[a.class].1 += 1;
        }
        if let Some((pt, pp)) = l.predicted {
            if let Some(f) = l.features {
                done.rows.push(format!(
                    "{},{},{},{},{},{},{},{},{},{},{:.3},{:.3},{:.3},{:.3},{},{},{},{},{:.3},{:.3},{},{:.3},{:.1},{}",
                    f.class.0,
                    f.kv_cache_usage,
                    f.input_tokens,
                    f.prefix_cache_score,
                    f.waiting,
                    f.running,
                    f.prefill_tokens_in_flight,
                    f.prefill_requests_in_flight,
                    a.class,
                    a.output,
                    pt,
                    ttft,
                    pp.unwrap_or(f64::NAN),
                    tpot,
                    l.tokens,
                    l.step_phase.0,
                    l.step_phase.1,
                    l.step_phase.2,
                    f.step_ms,
                    f.since_step_ms,
                    a.at,
                    f.mean_step_ms,
                    f.prompt_token_rate,
                    l.server
                ));
            }
            done.ttft_pairs.push((pt, ttft));
            if let Some(pp) = pp
                && l.tokens > 1
            {
                done.tpot_pairs.push((pp, tpot));
                if let Some(f) = l.features.filter(|f| f.mean_step_ms > 0.0) {
                    done.tpot_persistence.push((f.mean_step_ms, tpot));
                }
            }
        }
    };

    while let Some(Reverse((t, _, ev))) = heap.pop() {
        if t > drain_limit {
            break;
        }
        clock.micros.store(t, Ordering::Relaxed);
        match ev {
            Ev::Scrape => {
                cands = scrape(&engines);
                if t < until || !live.is_empty() {
                    push(&mut heap, t + SCRAPE_US, Ev::Scrape);
                }
            }
            Ev::Train => {
                if let Some(p) = &predictor {
                    p.train_now();
                }
                if t < until {
                    push(&mut heap, t + TRAIN_US, Ev::Train);
                }
            }
            Ev::Arrival(i) => {
                let a = &arrivals[i];
                let c = classes()[a.class];
                let bytes = prompt(a, i);
                let request = LlmRequest {
                    request_id: format!("r{i}"),
                    target_model: MODEL.into(),
                    prompt: Bytes::from(bytes),
                    cache_salt: None,
                    headers: vec![
                        ("x-slo-ttft-ms".into(), c.ttft_slo_ms.to_string()),
                        ("x-slo-tpot-ms".into(), c.tpot_slo_ms.to_string()),
                    ],
                    priority: c.priority,
                    prompt_tokens: c.prefix_tokens + a.unique,
                    stream: true,
                    ..LlmRequest::default()
                };
                let mut predicted = None;
                let mut features = None;
                let (server, scheduled) = match &scheduler {
                    None => {
                        let s = if policy == Policy::RoundRobin {
                            rr += 1;
                            (rr - 1) % engines.len()
                        } else {
                            rng.random_range(0..engines.len())
                        };
                        (s, None)
                    }
                    Some(sch) => {
                        let started = Instant::now();
                        let r = sch
                            .legacy_admit(&request, &cands)
                            .and_then(|()| sch.schedule(&request, &cands));
                        let mut s = match r {
                            Ok(s) => s,
                            Err(_) => {
                                done.decision_wall += started.elapsed();
                                done.decisions += 1;
                                let l = Live {
                                    index: i,
                                    request,
                                    scheduled: None,
                                    first: None,
                                    tokens: 0,
                                    predicted: None,
                                    features: None,
                                    step_phase: (0, 0, 0),
                                    server: usize::MAX,
                                };
                                finish(&mut done, &l, false, t);
                                continue;
                            }
                        };
                        sch.pre_request(&request, &mut s);
                        done.decision_wall += started.elapsed();
                        done.decisions += 1;
                        let target = s.result.primary().and_then(|r| r.targets.first().copied());
                        if let Some(st) = s
                            .cycle
                            .state
                            .get::<SloCycleState>("predicted-latency/predicted-latency-scorer")
                        {
                            done.prediction_wall += st.prediction_time;
                            let chosen = st.endpoints.iter().find(|e| Some(e.candidate) == target);
                            predicted = chosen
                                .and_then(|e| e.prediction)
                                .map(|p| (p.ttft_ms, p.tpot_ms));
                            features = chosen.map(|e| e.features);
                        }
                        let server = endpoints
                            .iter()
                            .position(|e| e.key == s.result.targets[0].endpoint.key)
                            .unwrap();
                        (server, Some(s))
                    }
                };
                block_hashes(MODEL, None, &request.prompt, 64, usize::MAX, &mut hashes);
                let sim = SimRequest {
                    prompt_tokens: request.prompt_tokens,
                    block_hashes: hashes.clone(),
                    max_tokens: Some(a.output),
                    ignore_eos: true,
                    lora: None,
                };
                let id = engines[server].submit(sim, t).unwrap();
                live.insert(
                    (server, id),
                    Live {
                        index: i,
                        request,
                        scheduled,
                        first: None,
                        tokens: 0,
                        predicted,
                        features,
                        server,
                        step_phase: (
                            if stepping[server] {
                                step_end[server].saturating_sub(t)
                            } else {
                                0
                            },
                            t.saturating_sub(last_end[server]),
                            last_len[server],
                        ),
                    },
                );
                if !stepping[server]
                    && let Some(d) = engines[server].begin_step(t)
                {
                    stepping[server] = true;
                    step_start[server] = t;
                    step_end[server] = t + d.max(1);
                    push(&mut heap, t + d.max(1), Ev::Step(server));
                }
            }
            Ev::Step(server) => {
                stepping[server] = false;
                last_end[server] = t;
                last_len[server] = t - step_start[server];
                for e in engines[server].finish_step() {
                    let Some(l) = live.get_mut(&(server, e.id)) else {
                        continue;
                    };
                    if l.first.is_none() {
                        l.first = Some(e.at);
                        if let (Some(sch), Some(s)) = (&scheduler, l.scheduled.as_mut()) {
                            sch.response_headers(&l.request, s, &sse);
                        }
                    }
                    l.tokens = e.output_tokens;
                    if let (Some(sch), Some(s)) = (&scheduler, l.scheduled.as_mut()) {
                        sch.response_chunk(
                            &l.request,
                            s,
                            ResponseChunk {
                                data: b"data: {}",
                                end_of_stream: false,
                            },
                        );
                    }
                    if e.finished.is_some() {
                        let Some(mut l) = live.remove(&(server, e.id)) else {
                            continue;
                        };
                        if let (Some(sch), Some(s)) = (&scheduler, l.scheduled.as_mut()) {
                            sch.response_chunk(
                                &l.request,
                                s,
                                ResponseChunk {
                                    data: b"",
                                    end_of_stream: true,
                                },
                            );
                            sch.complete(&l.request, s, Outcome::Success);
                        }
                        finish(&mut done, &l, true, e.at);
                    }
                }
                if let Some(d) = engines[server].begin_step(t) {
                    stepping[server] = true;
                    step_start[server] = t;
                    step_end[server] = t + d.max(1);
                    push(&mut heap, t + d.max(1), Ev::Step(server));
                }
            }
        }
    }
    // Whatever did not finish before the drain limit missed its SLO; its client gives up.
    for (_, mut l) in live.drain() {
        if let (Some(sch), Some(s)) = (&scheduler, l.scheduled.as_mut()) {
            sch.complete(&l.request, s, Outcome::ClientDisconnected);
        }
        finish(&mut done, &l, false, drain_limit);
    }
    let running: Arc<RunningRequests> = shared
        .get_or_insert_with("predicted-latency-running/predicted-latency-scorer", || {
            RunningRequests::new(Duration::from_secs(1))
        });
    Report {
        policy,
        done,
        seconds: measure_s as f64,
        leaked_running: running.total(),
        leaked_in_flight: in_flight.iter().map(|c| c.requests()).sum(),
    }
}

fn env<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn slo_profile_beats_round_robin_on_a_small_fleet_and_leaks_nothing() {
    // One fast and one slow server: round-robin sends half of the chat traffic to the L4,
    // which cannot meet a 50 ms TPOT; the SLO profile learns that within the warm-up.
    let fleet = [Preset::H100Llama8b, Preset::L4Llama8b];
    let rr = run(Policy::RoundRobin, &fleet, 6.0, 10, 20, 3);
    let slo = run(Policy::Slo("least", "p90"), &fleet, 6.0, 10, 20, 3);
    assert_eq!(slo.leaked_running, 0, "running-request queues are empty");
    assert_eq!(slo.leaked_in_flight, 0);
    assert!(
        slo.attainment() > rr.attainment() + 0.1,
        "SLO {:.2} vs round-robin {:.2}",
        slo.attainment(),
        rr.attainment()
    );
}

#[test]
#[ignore = "benchmark: run with `cargo xtask bench-slo`"]
fn slo_fleet_report() {
    let fleet: &[Preset] = match std::env::var("SLO_BENCH_FLEET").as_deref() {
        Ok("two") => &FLEET_TWO,
        Ok("mixed") => &FLEET_MIXED,
        _ => &FLEET,
    };
    let seed: u64 = env("SLO_BENCH_SEED", 7);
    let warmup: u64 = env("SLO_BENCH_WARMUP", 30);
    let seconds: u64 = env("SLO_BENCH_SECONDS", 60);
    let rate = match std::env::var("SLO_BENCH_RATE")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
    {
        Some(r) => r,
        None => {
            println!(
                "rate ladder (round-robin, {}+20 s per step):",
                warmup.min(10)
            );
            let mut best = (f64::INFINITY, 0.0);
            for rate in [20.0, 40.0, 60.0, 80.0, 100.0, 120.0, 150.0, 180.0] {
                let r = run(Policy::RoundRobin, fleet, rate, warmup.min(10), 20, seed);
                println!(
                    "  {rate:>6.1} req/s: attainment {:5.1} %",
                    100.0 * r.attainment()
                );
                let gap = (r.attainment() - 0.5).abs();
                if gap < best.0 {
                    best = (gap, rate);
                }
                if r.attainment() < 0.4 {
                    break;
                }
            }
            best.1
        }
    };
    let mut fleet_desc: Vec<(Preset, usize)> = Vec::new();
    for p in fleet {
        match fleet_desc.iter_mut().find(|(q, _)| q == p) {
            Some((_, n)) => *n += 1,
            None => fleet_desc.push((*p, 1)),
        }
    }
    let fleet_desc: Vec<String> = fleet_desc
        .iter()
        .map(|(p, n)| format!("{n} × {}", p.name()))
        .collect();
    let class_desc: Vec<String> = classes()
        .iter()
        .map(|c| {
            format!(
                "{} {:.0} % (TTFT {} ms, TPOT {} ms{})",
                c.name,
                100.0 * c.share,
                c.ttft_slo_ms,
                c.tpot_slo_ms,
                if c.priority < 0 { ", sheddable" } else { "" }
            )
        })
        .collect();
    println!(
        "\nfleet: {}; classes: {}",
        fleet_desc.join(", "),
        class_desc.join(", ")
    );
    println!("rate {rate} req/s, warm-up {warmup} s, measured {seconds} s, seed {seed}\n");
    let class_names = classes()
        .iter()
        .map(|c| c.name)
        .collect::<Vec<_>>()
        .join(" / ");
    let header = || {
        println!(
            "{:<16} {:>10} {:>12} {:>9} {:>9} {:>9} {:>9} {:>8} {:>12}  attain % per class ({})",
            "policy",
            "attain %",
            "goodput/s",
            "TTFT p50",
            "TTFT p99",
            "TPOT p50",
            "TPOT p99",
            "unserved",
            "decision µs",
            class_names
        );
    };
    let row = |r: &mut Report| {
        let seconds = r.seconds;
        let d = &mut r.done;
        let decision = if d.decisions > 0 {
            format!(
                "{:.1}",
                d.decision_wall.as_secs_f64() * 1e6 / d.decisions as f64
            )
        } else {
            "-".into()
        };
        println!(
            "{:<16} {:>10.1} {:>12.2} {:>9.0} {:>9.0} {:>9.1} {:>9.1} {:>8} {:>12}  {}",
            r.policy.name(),
            100.0 * (d.good as f64 / d.total.max(1) as f64),
            d.good as f64 / seconds,
            pct(&mut d.ttft_ms, 0.5),
            pct(&mut d.ttft_ms, 0.99),
            pct(&mut d.tpot_ms, 0.5),
            pct(&mut d.tpot_ms, 0.99),
            d.shed,
            decision,
            d.per_class
                .iter()
                .take(classes().len())
                .map(|(n, good)| format!("{:.1}", 100.0 * *good as f64 / (*n).max(1) as f64))
                .collect::<Vec<_>>()
                .join(" / "),
        );
        assert_eq!(r.leaked_in_flight, 0, "{}", r.policy.name());
        assert_eq!(r.leaked_running, 0, "{}", r.policy.name());
    };
    header();
    let mut reports = Vec::new();
    // `SLO_BENCH_PREDICTOR_ONLY=1` runs the SLO profile alone (the predictor's MAPE and
    // coverage), without the baselines, the stress point and the sweep: the quick loop for
    // predictor work.
    let predictor_only = std::env::var("SLO_BENCH_PREDICTOR_ONLY").is_ok_and(|v| v == "1");
    for policy in [
        Policy::RoundRobin,
        Policy::Random,
        Policy::Default,
        Policy::Slo("least", "p90"),
        Policy::Slo("most", "p90"),
        Policy::Slo("least", "median"),
        Policy::Slo("most", "median"),
    ] {
        if predictor_only && !matches!(policy, Policy::Slo(..)) {
            continue;
        }
        let mut r = run(policy, fleet, rate, warmup, seconds, seed);
        row(&mut r);
        if let (Ok(dir), Policy::Slo(strategy, objective)) =
            (std::env::var("SLO_BENCH_DUMP"), policy)
        {
            let path = std::path::Path::new(&dir).join(format!("slo-{strategy}-{objective}.csv"));
            let header = "class,kv,input,prefix,waiting,running,prefill_tokens,prefill_requests,workload_class,output,pred_ttft,ttft,pred_tpot,tpot,tokens,residual_us,since_last_us,last_len_us,step_ms,since_step_ms,arrival_us,mean_step_ms,prompt_token_rate,server\n";
            std::fs::write(&path, header.to_owned() + &r.done.rows.join("\n")).unwrap();
        }
        reports.push(r);
    }
    let get = |p: Policy| reports.iter().find(|r| r.policy == p).unwrap();
    for strategy in ["least", "most"] {
        if predictor_only {
            break;
        }
        let slo = get(Policy::Slo(strategy, "p90")).goodput();
        println!(
            "goodput ratio, SLO {strategy} p90: / default = {:.2} (target ≥ 1.3), / round-robin = {:.2} (target ≥ 1.6)",
            slo / get(Policy::Default).goodput().max(1e-9),
            slo / get(Policy::RoundRobin).goodput().max(1e-9)
        );
    }
    for strategy in ["least", "most"] {
        let median = get(Policy::Slo(strategy, "median"));
        println!(
            "predictor MAPE after warm-up, median objective, SLO {strategy} (chosen endpoint vs the simulated outcome): TTFT {:.1} % over {} requests, TPOT {:.1} % over {} (target ≤ 10 %)",
            mape(&median.done.ttft_pairs),
            median.done.ttft_pairs.len(),
            mape(&median.done.tpot_pairs),
            median.done.tpot_pairs.len(),
        );
        println!(
            "  baseline without a model: TPOT = the endpoint's mean step at dispatch, {:.1} % over {} requests",
            mape(&median.done.tpot_persistence),
            median.done.tpot_persistence.len(),
        );
    }
    for strategy in ["least", "most"] {
        let r = get(Policy::Slo(strategy, "p90"));
        println!(
            "p90 objective, SLO {strategy}: actual ≤ predicted for TTFT {:.1} %, TPOT {:.1} % of requests (target 90 %); in-loop batch prediction for {} endpoints {:.2} µs mean",
            coverage(&r.done.ttft_pairs),
            coverage(&r.done.tpot_pairs),
            fleet.len(),
            r.done.prediction_wall.as_secs_f64() * 1e6 / r.done.decisions.max(1) as f64
        );
    }
    if predictor_only {
        return;
    }
    let stress = rate * 1.5;
    println!(
        "
stress: {stress} req/s (1.5 × the rate above)"
    );
    header();
    for policy in [
        Policy::Default,
        Policy::Slo("least", "p90"),
        Policy::Slo("most", "p90"),
    ] {
        let mut r = run(policy, fleet, stress, warmup, seconds, seed);
        row(&mut r);
    }
    println!("\nload sweep, goodput req/s (attainment %):");
    println!(
        "{:>10} {:>16} {:>16} {:>16} {:>16}",
        "rate", "round-robin", "default", "SLO least p90", "SLO most p90"
    );
    for factor in [0.5, 1.0, 1.25, 1.5, 2.0] {
        let r = rate * factor;
        let cells: Vec<String> = [
            Policy::RoundRobin,
            Policy::Default,
            Policy::Slo("least", "p90"),
            Policy::Slo("most", "p90"),
        ]
        .into_iter()
        .map(|p| {
            let rep = run(p, fleet, r, warmup.min(20), seconds.min(40), seed);
            format!("{:.1} ({:.0})", rep.goodput(), 100.0 * rep.attainment())
        })
        .collect();
        println!(
            "{:>10.1} {:>16} {:>16} {:>16} {:>16}",
            r, cells[0], cells[1], cells[2], cells[3]
        );
    }
    seed_spread(fleet, rate, warmup.min(20), seconds.min(40));
}

/// One seed is one sample of a chaotic system (`least` especially: it packs each endpoint
/// until its own prediction reaches the SLO, so the prediction shapes the load it predicts).
/// This repeats the comparison over the seeds in `SLO_BENCH_SEEDS` (default `7,8,9,10`;
/// empty skips it) at the rate and 1.5× it, and prints each cell's mean and range: the
/// figures to compare before and after a change.
fn seed_spread(fleet: &[Preset], rate: f64, warmup: u64, seconds: u64) {
    let seeds: Vec<u64> = std::env::var("SLO_BENCH_SEEDS")
        .unwrap_or_else(|_| "7,8,9,10".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    if seeds.is_empty() {
        return;
    }
    println!(
        "\nover seeds {seeds:?} ({warmup} s warm-up, {seconds} s measured): goodput req/s, mean (min–max); MAPE of the median model with `most`"
    );
    println!(
        "{:>10} {:>22} {:>22} {:>22} {:>16}",
        "rate", "default", "SLO least p90", "SLO most p90", "MAPE TTFT / TPOT"
    );
    for factor in [1.0, 1.5] {
        let r = rate * factor;
        let mut cells = Vec::new();
        for policy in [
            Policy::Default,
            Policy::Slo("least", "p90"),
            Policy::Slo("most", "p90"),
        ] {
            let g: Vec<f64> = seeds
                .iter()
                .map(|&seed| run(policy, fleet, r, warmup, seconds, seed).goodput())
                .collect();
            let (lo, hi) = g
                .iter()
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
                    (lo.min(*v), hi.max(*v))
                });
            let mean = g.iter().sum::<f64>() / g.len() as f64;
            cells.push(format!("{mean:.1} ({lo:.1}–{hi:.1})"));
        }
        let (mut ttft, mut tpot) = (0.0, 0.0);
        for &seed in &seeds {
            let m = run(
                Policy::Slo("most", "median"),
                fleet,
                r,
                warmup,
                seconds,
                seed,
            );
            ttft += mape(&m.done.ttft_pairs) / seeds.len() as f64;
            tpot += mape(&m.done.tpot_pairs) / seeds.len() as f64;
        }
        println!(
            "{:>10.1} {:>22} {:>22} {:>22} {:>16}",
            r,
            cells[0],
            cells[1],
            cells[2],
            format!("{ttft:.1} / {tpot:.1} %")
        );
    }
}
