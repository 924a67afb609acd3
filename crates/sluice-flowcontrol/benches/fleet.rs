//! End-to-end flow-control benchmark on the simulated fleet (sluice-sim's engine model),
//! driven past saturation by a noisy low-criticality workload next to a quiet critical one.
//! Prints, per workload, p50/p99 TTFT, goodput and rejected share with flow control off
//! and on.
//!
//! The fleet runs in tokio's paused clock: every server is a `sluice_sim::Engine` stepped in
//! simulated time, so a two-minute run takes seconds and is the same every time.
//!
//! `CARGO_TARGET_DIR=/tmp/target-fc cargo bench -p sluice-flowcontrol --bench fleet`
//! (settings can be overridden with `FLOW_BENCH_*` environment variables, see `Settings`).

#![allow(
    clippy::print_stdout,
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a benchmark report printed to the terminal; set-up failures should be loud"
)]

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use sluice_flowcontrol::*;
use sluice_sim::engine::{Engine, Micros, ReqId, SimRequest};
use sluice_sim::preset::Preset;
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

/// One workload of the mix.
#[derive(Debug, Clone)]
struct Workload {
    name: &'static str,
    criticality: u8,
    rate: f64,
    prompt_tokens: u32,
    output_tokens: u32,
    slo_ttft: Duration,
}

#[derive(Debug, Clone)]
struct Settings {
    preset: Preset,
    servers: usize,
    seconds: u64,
    ttl: Duration,
    workloads: Vec<Workload>,
    seed: u64,
}

fn env<T: FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

impl Settings {
    fn from_env() -> Self {
        Self {
            preset: env("FLOW_BENCH_PRESET", Preset::A100Llama8b),
            servers: env("FLOW_BENCH_SERVERS", 4),
            seconds: env("FLOW_BENCH_SECONDS", 120),
            ttl: Duration::from_secs(env("FLOW_BENCH_TTL_S", 30)),
            seed: env("FLOW_BENCH_SEED", 7),
            workloads: vec![
                Workload {
                    name: "bulk-noisy",
                    criticality: 1,
                    rate: env("FLOW_BENCH_NOISY_RPS", 60.0),
                    prompt_tokens: 1024,
                    output_tokens: 128,
                    slo_ttft: Duration::from_secs(10),
                },
                Workload {
                    name: "fraud-quiet",
                    criticality: 5,
                    rate: env("FLOW_BENCH_QUIET_RPS", 2.0),
                    prompt_tokens: 512,
                    output_tokens: 64,
                    slo_ttft: Duration::from_millis(1000),
                },
            ],
        }
    }
}

/// A deterministic generator (exponential inter-arrival times).
struct Lcg(u64);

impl Lcg {
    fn uniform(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    fn exp(&mut self, rate: f64) -> Duration {
        Duration::from_secs_f64(-self.uniform().ln() / rate)
    }
}

/// What a request waits for from its server.
struct Waiter {
    first_token: Option<oneshot::Sender<Micros>>,
    done: oneshot::Sender<Micros>,
}

struct Server {
    engine: Mutex<Engine>,
    waiters: Mutex<HashMap<ReqId, Waiter>>,
    wake: Notify,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Server")
    }
}

fn micros_since(start: Instant) -> Micros {
    start.elapsed().as_micros() as Micros
}

impl Server {
    async fn run(self: Arc<Self>, start: Instant) {
        loop {
            let step = self.engine.lock().begin_step(micros_since(start));
            match step {
                Some(d) => {
                    tokio::time::sleep(Duration::from_micros(d)).await;
                    let events = self.engine.lock().finish_step();
                    let mut waiters = self.waiters.lock();
                    for ev in events {
                        if let Some(w) = waiters.get_mut(&ev.id)
                            && let Some(tx) = w.first_token.take()
                        {
                            let _ = tx.send(ev.at);
                        }
                        if ev.finished.is_some()
                            && let Some(w) = waiters.remove(&ev.id)
                        {
                            let _ = w.done.send(ev.at);
                        }
                    }
                }
                None => self.wake.notified().await,
            }
        }
    }

    /// Requests waiting plus running: what a least-loaded router balances on.
    fn load(&self) -> u32 {
        let s = self.engine.lock().snapshot();
        s.waiting + s.running
    }
}

/// Upstream's `utilization-detector` over the simulated servers: mean over servers of
/// `max(waiting / 5, kv_usage / 0.8)`.
#[derive(Debug)]
struct Utilization {
    servers: Vec<Arc<Server>>,
}

impl SaturationSource for Utilization {
    fn saturation(&self, _in_flight: u64) -> f64 {
        let sum: f64 = self
            .servers
            .iter()
            .map(|s| {
                let snap = s.engine.lock().snapshot();
                (f64::from(snap.waiting) / 5.0).max(snap.kv_usage / 0.8)
            })
            .sum();
        sum / self.servers.len() as f64
    }
}

#[derive(Debug, Clone)]
struct Record {
    workload: usize,
    status: u16,
    ttft: Option<Duration>,
}

async fn run_mode(settings: &Settings, flow_control: bool) -> (Vec<Record>, Duration) {
    let start = Instant::now();
    let servers: Vec<Arc<Server>> = (0..settings.servers)
        .map(|i| {
            Arc::new(Server {
                engine: Mutex::new(Engine::new(
                    settings.preset.config(),
                    settings.seed + i as u64,
                )),
                waiters: Mutex::new(HashMap::new()),
                wake: Notify::new(),
            })
        })
        .collect();
    let engine_tasks: Vec<_> = servers
        .iter()
        .map(|s| tokio::spawn(s.clone().run(start)))
        .collect();
    let fc = flow_control.then(|| {
        let mut cfg = FlowControlConfig {
            default_request_ttl: settings.ttl,
            // The engines' step completions are the only saturation changes; poll for them.
            recheck_interval: Duration::from_millis(5),
            ..FlowControlConfig::default()
        };
        cfg.default_band.ordering = OrderingPolicy::WorkloadAware(ScoreParams::default());
        cfg.workload.window = Duration::from_secs(10);
        FlowController::new(
            cfg,
            Arc::new(Utilization {
                servers: servers.clone(),
            }),
        )
    });
    let records: Arc<Mutex<Vec<Record>>> = Arc::default();
    let mut generators = Vec::new();
    for (wi, w) in settings.workloads.iter().enumerate() {
        let (w, servers, fc, records) = (w.clone(), servers.clone(), fc.clone(), records.clone());
        let seconds = settings.seconds;
        let mut rng = Lcg(settings.seed * 1000 + wi as u64);
        generators.push(tokio::spawn(async move {
            let mut requests = Vec::new();
            let mut at = Duration::ZERO;
            loop {
                at += rng.exp(w.rate);
                if at >= Duration::from_secs(seconds) {
                    break;
                }
                tokio::time::sleep_until(start + at).await;
                let (w, servers, fc, records) =
                    (w.clone(), servers.clone(), fc.clone(), records.clone());
                requests.push(tokio::spawn(async move {
                    let arrived = micros_since(start);
                    let guard = match &fc {
                        None => None,
                        Some(fc) => {
                            let r = FlowRequest {
                                workload: WorkloadContext {
                                    workload_id: Arc::from(w.name),
                                    criticality: w.criticality,
                                },
                                bytes: u64::from(w.prompt_tokens) * 4,
                                ..FlowRequest::default()
                            };
                            match fc.admit(r).await {
                                Ok(g) => Some(g),
                                Err(outcome) => {
                                    records.lock().push(Record {
                                        workload: wi,
                                        status: outcome.http_status(),
                                        ttft: None,
                                    });
                                    return;
                                }
                            }
                        }
                    };
                    let server = servers.iter().min_by_key(|s| s.load()).unwrap();
                    let (first_tx, first_rx) = oneshot::channel();
                    let (done_tx, done_rx) = oneshot::channel();
                    {
                        let mut engine = server.engine.lock();
                        let req = SimRequest {
                            prompt_tokens: w.prompt_tokens,
                            block_hashes: Vec::new(),
                            max_tokens: Some(w.output_tokens),
                            ignore_eos: true,
                            lora: None,
                        };
                        let id = engine.submit(req, micros_since(start)).unwrap();
                        server.waiters.lock().insert(
                            id,
                            Waiter {
                                first_token: Some(first_tx),
                                done: done_tx,
                            },
                        );
                    }
                    server.wake.notify_one();
                    let first = first_rx.await.unwrap();
                    records.lock().push(Record {
                        workload: wi,
                        status: 200,
                        ttft: Some(Duration::from_micros(first.saturating_sub(arrived))),
                    });
                    let _ = done_rx.await;
                    drop(guard);
                }));
            }
            for r in requests {
                r.await.unwrap();
            }
        }));
    }
    for g in generators {
        g.await.unwrap();
    }
    let elapsed = start.elapsed();
    for t in engine_tasks {
        t.abort();
    }
    let records = records.lock().clone();
    (records, elapsed)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

struct Row {
    p50: Duration,
    p99: Duration,
    goodput: f64,
    rejected: f64,
    requests: usize,
}

fn summarise(settings: &Settings, records: &[Record], workload: usize) -> Row {
    let w = &settings.workloads[workload];
    let mine: Vec<&Record> = records.iter().filter(|r| r.workload == workload).collect();
    let mut ttfts: Vec<Duration> = mine.iter().filter_map(|r| r.ttft).collect();
    ttfts.sort();
    let good = ttfts.iter().filter(|t| **t <= w.slo_ttft).count();
    let rejected = mine.iter().filter(|r| r.status != 200).count();
    Row {
        p50: percentile(&ttfts, 0.5),
        p99: percentile(&ttfts, 0.99),
        goodput: good as f64 / settings.seconds as f64,
        rejected: rejected as f64 / mine.len().max(1) as f64,
        requests: mine.len(),
    }
}

/// Resident memory of this process in bytes (Linux), for the registry's footprint.
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// Seed 003's target: under 10 MB for 1,000 workloads. Measured on 100,000 (so the
/// difference dwarfs allocator noise) and scaled.
fn registry_footprint(rt: &tokio::runtime::Runtime) {
    rt.block_on(async {
        let reg = WorkloadRegistry::new(WorkloadConfig { max_workloads: 1_000_000, ..WorkloadConfig::default() });
        let now = Instant::now();
        let before = resident_bytes();
        for i in 0..100_000u32 {
            drop(reg.arrive(&Arc::from(format!("workload-{i:08}")), now));
        }
        if let (Some(b), Some(a)) = (before, resident_bytes()) {
            let per = a.saturating_sub(b) as f64 / 100_000.0;
            println!(
                "workload registry: {per:.0} bytes per workload (RSS growth over 100,000), {:.2} MB per 1,000",
                per * 1000.0 / 1e6
            );
        }
        drop(reg);
    });
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument that is not ours means another bench
    // target was asked for.
    if std::env::args()
        .skip(1)
        .any(|a| !a.starts_with('-') && a != "fleet")
    {
        return;
    }
    let settings = Settings::from_env();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    println!(
        "fleet: {} x {}, {} s of arrivals, TTL {:?}; workloads: {}",
        settings.servers,
        settings.preset.name(),
        settings.seconds,
        settings.ttl,
        settings
            .workloads
            .iter()
            .map(|w| format!(
                "{} (criticality {}, {} req/s, {}+{} tokens, TTFT SLO {:?})",
                w.name, w.criticality, w.rate, w.prompt_tokens, w.output_tokens, w.slo_ttft
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    registry_footprint(&rt);
    let wall = std::time::Instant::now();
    let (off, off_elapsed) = rt.block_on(run_mode(&settings, false));
    let (on, on_elapsed) = rt.block_on(run_mode(&settings, true));
    println!(
        "simulated {:.0} s (off) and {:.0} s (on) in {:.1} s of wall time",
        off_elapsed.as_secs_f64(),
        on_elapsed.as_secs_f64(),
        wall.elapsed().as_secs_f64()
    );
    println!(
        "{:<12} {:<4} {:>8} {:>10} {:>10} {:>12} {:>9}",
        "workload", "fc", "requests", "p50 TTFT", "p99 TTFT", "goodput/s", "rejected"
    );
    let mut ratios = Vec::new();
    for (wi, w) in settings.workloads.iter().enumerate() {
        let a = summarise(&settings, &off, wi);
        let b = summarise(&settings, &on, wi);
        for (mode, r) in [("off", &a), ("on", &b)] {
            println!(
                "{:<12} {:<4} {:>8} {:>9.0}ms {:>9.0}ms {:>12.2} {:>8.1}%",
                w.name,
                mode,
                r.requests,
                r.p50.as_secs_f64() * 1e3,
                r.p99.as_secs_f64() * 1e3,
                r.goodput,
                r.rejected * 100.0
            );
        }
        ratios.push((w.name, a.p99.as_secs_f64() / b.p99.as_secs_f64().max(1e-9)));
    }
    for (name, ratio) in ratios {
        println!("{name}: p99 TTFT off/on = {ratio:.1}x");
    }
}
