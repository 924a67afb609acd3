//! The fleet throughput measurement behind `sluice-sim bench`: an in-process fleet, the load
//! generator spreading a Poisson stream round-robin over every server, and a verdict on whether
//! the process kept up with the wall clock.
//!
//! Keeping up is judged against the engine model itself: after the run, every server's engine
//! is replayed offline ([`engine::simulate`], no I/O, no wall clock) on the instants the
//! clients actually sent its requests. That gives the latencies an infinitely fast machine
//! would have delivered for the same traffic. When the CPU cannot keep up, token delivery
//! falls behind the engine's clock and the clients' TTFT grows beyond the model's; when
//! arrivals go out late, the offered rate is not met, which the wall time and `send_lag_ms`
//! show.

use std::collections::HashMap;

use rand::SeedableRng;
use rand::rngs::SmallRng;
use serde::Serialize;

use crate::engine::{self, Micros, SimRequest};
use crate::fleet::{self, FleetConfig};
use crate::load::{self, LoadConfig, Percentiles, Summary};
use crate::workload::{ApiKind, Arrival, Class, Dist, Slo, Workload};

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Requests per simulated second (Poisson).
    pub rate: f64,
    /// Simulated seconds of arrivals.
    pub duration_s: f64,
    /// Prompt tokens per request.
    pub prompt_tokens: u32,
    /// Output tokens per request (`ignore_eos`, so exactly this many).
    pub output_tokens: u32,
    /// Stream answers (SSE, one event per token).
    pub stream: bool,
}

/// The outcome of a bench run.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Servers in the fleet.
    pub servers: usize,
    /// Simulated seconds per wall second.
    pub time_scale: f64,
    /// Offered load, requests per simulated second.
    pub offered_rps: f64,
    /// What the clients measured.
    pub summary: Summary,
    /// How late requests were sent against their planned Poisson instants, simulated ms.
    pub send_lag_ms: Percentiles,
    /// TTFT of the same requests according to the engine model, simulated ms.
    pub model_ttft_ms: Percentiles,
    /// TPOT according to the engine model (requests with ≥ 2 tokens), simulated ms.
    pub model_tpot_ms: Percentiles,
    /// End to end according to the engine model, simulated ms.
    pub model_e2e_ms: Percentiles,
    /// How far the clients' median (TTFT when streaming, else e2e) may exceed the model's
    /// before the run counts as falling behind, simulated ms.
    pub allowed_lag_ms: f64,
    /// Every request answered successfully, requests went out on time (median send lag) and
    /// the clients' median latency is within `allowed_lag_ms` of the model's.
    pub kept_up: bool,
}

impl BenchReport {
    /// The clients' median minus the model's (TTFT when streamed, else e2e), simulated ms.
    pub fn lag_ms(&self) -> f64 {
        if self.summary.ttft_ms.n > 0 {
            self.summary.ttft_ms.p50 - self.model_ttft_ms.p50
        } else {
            self.summary.e2e_ms.p50 - self.model_e2e_ms.p50
        }
    }

    /// A human-readable report: the load summary, then measured against model.
    pub fn render(&self) -> String {
        let s = &self.summary;
        let mut out = s.render();
        let wall_rps = s.requests as f64 / s.wall_s.max(1e-9);
        out += &format!(
            "bench: {} servers, offered {:.0} req/s simulated = {:.0} req/s wall (time scale {}); {} / {} ok, completed {:.0} req/s wall\n",
            self.servers,
            self.offered_rps,
            self.offered_rps * self.time_scale,
            self.time_scale,
            s.ok,
            s.requests,
            wall_rps,
        );
        let row = |name: &str, measured: &Percentiles, model: &Percentiles| {
            format!(
                "  {name:<5} p50 {:>8.1} (model {:>8.1})  p99 {:>8.1} (model {:>8.1})\n",
                measured.p50, model.p50, measured.p99, model.p99
            )
        };
        out += &format!(
            "measured by the clients vs the engine model replayed on the same send times (simulated ms; sends late by p50 {:.1} / p99 {:.1} ms):\n",
            self.send_lag_ms.p50, self.send_lag_ms.p99
        );
        if s.ttft_ms.n > 0 {
            out += &row("TTFT", &s.ttft_ms, &self.model_ttft_ms);
            out += &row("TPOT", &s.tpot_ms, &self.model_tpot_ms);
        }
        out += &row("e2e", &s.e2e_ms, &self.model_e2e_ms);
        out += &format!(
            "kept up: {} (median latency lag {:.1} ms, median send lag {:.1} ms, allowed {:.1} ms; {} failed)\n",
            if self.kept_up { "yes" } else { "NO" },
            self.lag_ms(),
            self.send_lag_ms.p50,
            self.allowed_lag_ms,
            s.requests - s.ok,
        );
        out
    }
}

/// Runs `bench.rate` requests per simulated second for `bench.duration_s` simulated seconds
/// against a fleet built from `cfg`, and compares what the clients saw with the model.
pub async fn run(cfg: &FleetConfig, bench: &BenchConfig) -> anyhow::Result<BenchReport> {
    // One pool serves one model name, whatever GPUs its servers run on.
    let mut cfg = cfg.clone();
    let model = cfg
        .overrides
        .model
        .get_or_insert_with(|| {
            cfg.presets
                .first()
                .copied()
                .unwrap_or(crate::Preset::H100Llama8b)
                .config()
                .model
        })
        .clone();
    let handles = fleet::spawn_with(&cfg).await?;
    let workload = Workload {
        name: format!("bench-{}x{}", cfg.n, bench.rate),
        seed: cfg.seed,
        model: None,
        duration_s: bench.duration_s,
        arrival: Arrival::Poisson {
            rate: bench.rate,
            stages: Vec::new(),
        },
        classes: vec![Class {
            name: "bench".into(),
            weight: 1.0,
            api: ApiKind::Completions,
            stream: bench.stream,
            ignore_eos: true,
            prompt: Dist::Fixed {
                value: bench.prompt_tokens,
            },
            output: Dist::Fixed {
                value: bench.output_tokens,
            },
            shared_prefix: None,
            lora: None,
            model: None,
            slo: Slo::default(),
            objective: None,
            workload: None,
            headers: Default::default(),
        }],
    };
    let planned = workload.arrival_times(&mut SmallRng::seed_from_u64(workload.seed));
    let mut lc = LoadConfig::new(handles.iter().map(|h| h.base_url()).collect(), workload);
    lc.time_scale = cfg.time_scale;
    lc.default_model = model;
    // In process, every request in flight holds two sockets (client and server side); past this
    // bound an overloaded run counts dropped arrivals instead of exhausting file descriptors.
    lc.max_in_flight = 4096;
    // On a worker thread, not the caller's (`block_on` runs on its own thread): then the
    // arrival timer fires where the time driver runs, instead of waking another thread for
    // each of thousands of arrivals per second.
    let outcome = match tokio::spawn(load::run_with_records(lc)).await {
        Ok(o) => o,
        Err(e) => Err(anyhow::anyhow!(
            "bench: the load generator task failed: {e}"
        )),
    };
    for h in handles {
        h.shutdown().await;
    }
    let (summary, records) = outcome?;
    let send_lag: Vec<f64> = records
        .iter()
        .filter_map(|r| {
            let t = planned.get(usize::try_from(r.id).ok()?)?;
            Some((r.start_ms - t * 1e3).max(0.0))
        })
        .collect();
    let model = replay(&cfg, bench, &records)?;
    // Tokio timers fire on a 1 ms wall-clock grid, which is `time_scale` ms simulated; beyond
    // that, a few ms of scheduling noise on a busy machine is not "falling behind".
    let allowed_lag_ms = 5.0 + cfg.time_scale;
    let mut report = BenchReport {
        servers: cfg.n,
        time_scale: cfg.time_scale,
        offered_rps: bench.rate,
        summary,
        send_lag_ms: Percentiles::of(send_lag),
        model_ttft_ms: Percentiles::of(model.iter().map(|o| o.ttft_ms).collect()),
        model_tpot_ms: Percentiles::of(
            model
                .iter()
                .filter(|o| o.stats.output_tokens > 1)
                .map(|o| o.tpot_ms)
                .collect(),
        ),
        model_e2e_ms: Percentiles::of(model.iter().map(|o| o.e2e_ms).collect()),
        allowed_lag_ms,
        kept_up: false,
    };
    report.kept_up = report.summary.requests > 0
        && report.summary.ok == report.summary.requests
        && report.send_lag_ms.p50 <= allowed_lag_ms
        && report.lag_ms() <= allowed_lag_ms;
    Ok(report)
}

/// Replays every server's engine offline on the instants its requests were sent.
fn replay(
    cfg: &FleetConfig,
    bench: &BenchConfig,
    records: &[load::Record],
) -> anyhow::Result<Vec<engine::Outcome>> {
    let index: HashMap<String, usize> = (0..cfg.n).map(|i| (format!("sim-{i}"), i)).collect();
    let mut per_server: Vec<Vec<(Micros, SimRequest)>> = vec![Vec::new(); cfg.n];
    let block_size: Vec<u32> = (0..cfg.n)
        .map(|i| cfg.server(i).map(|c| c.engine.block_size.max(1)))
        .collect::<anyhow::Result<_>>()?;
    for (k, r) in records.iter().enumerate() {
        let Some(i) = r.server.as_ref().and_then(|s| index.get(s)) else {
            continue;
        };
        // Distinct prompts share no block, as the load generator's random texts do. The KV
        // cache keys its maps by the hash itself, so the stand-ins must be well mixed.
        let blocks = r.prompt_tokens / block_size[*i];
        per_server[*i].push((
            (r.start_ms * 1e3).round() as Micros,
            SimRequest {
                prompt_tokens: r.prompt_tokens,
                block_hashes: (0..u64::from(blocks))
                    .map(|b| xxhash_rust::xxh64::xxh64(&b.to_le_bytes(), k as u64))
                    .collect(),
                max_tokens: Some(bench.output_tokens),
                ignore_eos: true,
                lora: None,
            },
        ));
    }
    let mut out = Vec::new();
    for (i, mut arrivals) in per_server.into_iter().enumerate() {
        arrivals.sort_by_key(|a| a.0);
        let sc = cfg.server(i)?;
        out.extend(engine::simulate(sc.engine, sc.seed, arrivals));
    }
    Ok(out)
}
