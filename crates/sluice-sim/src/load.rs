//! The load generator: open-loop (Poisson, constant, rate ladders) or closed-loop arrivals
//! against one or more base URLs, per-request records, and a summary with goodput.
//!
//! Measurements (all converted to simulated time by multiplying by `time_scale`):
//! - TTFT: request sent → first SSE chunk carrying text (for non-streamed requests there is no
//!   TTFT; the TTFT SLO is judged on e2e, as the EPP does when it is not streaming).
//! - TPOT: mean gap between text chunks after the first, `(t_last − t_first) / (chunks − 1)`,
//!   the vLLM inter-token-latency sense (one token per chunk, which vLLM and the simulator send).
//! - e2e: request sent → end of body.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use memchr::memmem::Finder;
use parking_lot::Mutex;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::Semaphore;

use crate::api::Api;
use crate::http1;
use crate::server::SERVER_HEADER;
use crate::workload::{Planned, Workload, text_of};

/// Largest response body or SSE event the generator buffers.
const MAX_BODY: usize = 4 << 20;

/// How to run a load.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Base URLs (`http://host:port`); requests are spread round-robin (use one URL — the
    /// gateway — to test a router).
    pub targets: Vec<String>,
    /// The workload.
    pub workload: Workload,
    /// Model name when neither the workload nor the class names one.
    pub default_model: String,
    /// Simulated seconds per wall second of the target (1 for real servers).
    pub time_scale: f64,
    /// In-flight requests beyond which an open-loop arrival is dropped (recorded as an error).
    pub max_in_flight: usize,
    /// Deadline on a whole request, wall-clock: even an answer that keeps arriving is cut
    /// off after this long.
    pub timeout: Duration,
    /// A request fails when the server sends nothing for this long (wall-clock): no head,
    /// no body byte. A slow answer that keeps streaming is not cut off.
    pub stall_timeout: Duration,
    /// Write one JSON line per request here.
    pub output: Option<PathBuf>,
}

impl LoadConfig {
    /// Defaults: real time, 10,000 in flight, 600 s deadline, 120 s stall timeout, no
    /// output file.
    pub fn new(targets: Vec<String>, workload: Workload) -> Self {
        Self {
            targets,
            workload,
            default_model: "meta-llama/Llama-3.1-8B-Instruct".into(),
            time_scale: 1.0,
            max_in_flight: 10_000,
            timeout: Duration::from_secs(600),
            stall_timeout: Duration::from_secs(120),
            output: None,
        }
    }
}

/// What happened to one request.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Record {
    /// Sequence number.
    pub id: u64,
    /// Class name.
    pub class: String,
    /// Model asked for.
    pub model: String,
    /// Send time since the start of the run, ms (simulated).
    pub start_ms: f64,
    /// HTTP status; 0 when there was no response (connection error, timeout, dropped).
    pub status: u16,
    /// Error text, if any.
    pub error: Option<String>,
    /// `x-sim-server` of the answer.
    pub server: Option<String>,
    /// Streamed.
    pub stream: bool,
    /// Time to first token, ms.
    pub ttft_ms: Option<f64>,
    /// Mean inter-token latency after the first token, ms.
    pub tpot_ms: Option<f64>,
    /// End to end, ms.
    pub e2e_ms: f64,
    /// Prompt tokens (from `usage`, else as planned).
    pub prompt_tokens: u32,
    /// Output tokens (from `usage`, else text chunks).
    pub output_tokens: u32,
    /// TTFT SLO carried, ms.
    pub slo_ttft_ms: Option<f64>,
    /// TPOT SLO carried, ms.
    pub slo_tpot_ms: Option<f64>,
    /// Succeeded and met every SLO it carried.
    pub good: bool,
}

impl Record {
    /// A 2xx answer that completed without a transport or stream error.
    pub fn succeeded(&self) -> bool {
        (200..300).contains(&self.status) && self.error.is_none()
    }
}

/// p50 / p90 / p99 and mean.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Mean.
    pub mean: f64,
    /// Samples.
    pub n: usize,
}

impl Percentiles {
    /// Nearest-rank percentiles of `v`.
    pub fn of(mut v: Vec<f64>) -> Self {
        if v.is_empty() {
            return Self::default();
        }
        v.sort_by(f64::total_cmp);
        let at = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        Self {
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
            mean: v.iter().sum::<f64>() / v.len() as f64,
            n: v.len(),
        }
    }
}

/// Per-class results.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ClassSummary {
    /// Requests sent.
    pub requests: u64,
    /// 2xx answers that completed.
    pub ok: u64,
    /// Share of requests that were good (successful and within SLO).
    pub slo_attainment: f64,
    /// TTFT.
    pub ttft_ms: Percentiles,
    /// TPOT.
    pub tpot_ms: Percentiles,
    /// End to end (successful requests).
    pub e2e_ms: Percentiles,
    /// Answers by `x-sim-server`: where the router sent this class.
    pub per_server: BTreeMap<String, u64>,
}

/// The result of a run.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Summary {
    /// Workload name.
    pub workload: String,
    /// Simulated seconds from the first send to the last answer.
    pub duration_s: f64,
    /// Requests sent (or dropped by the in-flight limit).
    pub requests: u64,
    /// Successful requests.
    pub ok: u64,
    /// Successful requests per simulated second.
    pub throughput_rps: f64,
    /// Output tokens per simulated second.
    pub output_tokens_per_s: f64,
    /// Requests per simulated second that succeeded and met every SLO they carried.
    pub goodput_rps: f64,
    /// Good requests / all requests.
    pub slo_attainment: f64,
    /// TTFT (streamed requests), ms.
    pub ttft_ms: Percentiles,
    /// TPOT (streamed requests with ≥ 2 tokens), ms.
    pub tpot_ms: Percentiles,
    /// End to end (successful requests), ms.
    pub e2e_ms: Percentiles,
    /// Failures by status (`"0"` for transport errors).
    pub errors_by_status: BTreeMap<String, u64>,
    /// Answers by `x-sim-server`.
    pub per_server: BTreeMap<String, u64>,
    /// Per class.
    pub per_class: BTreeMap<String, ClassSummary>,
    /// Wall-clock seconds the run took.
    pub wall_s: f64,
}

impl Summary {
    /// Builds the summary from records.
    pub fn from_records(workload: &str, records: &[Record], wall_s: f64) -> Self {
        let ok: Vec<&Record> = records.iter().filter(|r| r.succeeded()).collect();
        let first = records
            .iter()
            .map(|r| r.start_ms)
            .fold(f64::INFINITY, f64::min);
        let last = records
            .iter()
            .map(|r| r.start_ms + r.e2e_ms)
            .fold(0.0, f64::max);
        let duration_s = if records.is_empty() {
            0.0
        } else {
            ((last - first) / 1e3).max(1e-9)
        };
        let per_s = |n: f64| {
            if duration_s > 0.0 {
                n / duration_s
            } else {
                0.0
            }
        };
        let good = records.iter().filter(|r| r.good).count() as f64;
        let mut errors_by_status = BTreeMap::new();
        let mut per_server = BTreeMap::new();
        for r in records {
            if !r.succeeded() {
                *errors_by_status.entry(r.status.to_string()).or_insert(0) += 1;
            }
            if let Some(s) = &r.server {
                *per_server.entry(s.clone()).or_insert(0) += 1;
            }
        }
        let mut per_class: BTreeMap<String, ClassSummary> = BTreeMap::new();
        for r in records {
            let c = per_class.entry(r.class.clone()).or_default();
            c.requests += 1;
            if r.succeeded() {
                c.ok += 1;
            }
        }
        for (name, c) in &mut per_class {
            let rs: Vec<&Record> = records.iter().filter(|r| &r.class == name).collect();
            c.slo_attainment = rs.iter().filter(|r| r.good).count() as f64 / rs.len().max(1) as f64;
            c.ttft_ms = Percentiles::of(rs.iter().filter_map(|r| r.ttft_ms).collect());
            c.tpot_ms = Percentiles::of(rs.iter().filter_map(|r| r.tpot_ms).collect());
            c.e2e_ms = Percentiles::of(
                rs.iter()
                    .filter(|r| r.succeeded())
                    .map(|r| r.e2e_ms)
                    .collect(),
            );
            for server in rs.iter().filter_map(|r| r.server.as_ref()) {
                *c.per_server.entry(server.clone()).or_insert(0) += 1;
            }
        }
        Self {
            workload: workload.to_owned(),
            duration_s,
            requests: records.len() as u64,
            ok: ok.len() as u64,
            throughput_rps: per_s(ok.len() as f64),
            output_tokens_per_s: per_s(ok.iter().map(|r| f64::from(r.output_tokens)).sum()),
            goodput_rps: per_s(good),
            slo_attainment: good / (records.len().max(1) as f64),
            ttft_ms: Percentiles::of(ok.iter().filter_map(|r| r.ttft_ms).collect()),
            tpot_ms: Percentiles::of(ok.iter().filter_map(|r| r.tpot_ms).collect()),
            e2e_ms: Percentiles::of(ok.iter().map(|r| r.e2e_ms).collect()),
            errors_by_status,
            per_server,
            per_class,
            wall_s,
        }
    }

    /// A human-readable report.
    pub fn render(&self) -> String {
        let p = |n: &str, x: &Percentiles| {
            format!(
                "  {n:<5} p50 {:>9.1}  p90 {:>9.1}  p99 {:>9.1}  mean {:>9.1}  (n={})\n",
                x.p50, x.p90, x.p99, x.mean, x.n
            )
        };
        let mut s = format!(
            "workload {}: {} requests, {} ok in {:.1} s simulated ({:.1} s wall)\n  throughput {:.1} req/s, {:.0} output tok/s\n  goodput {:.1} req/s, SLO attainment {:.1} %\nlatency (ms):\n",
            self.workload,
            self.requests,
            self.ok,
            self.duration_s,
            self.wall_s,
            self.throughput_rps,
            self.output_tokens_per_s,
            self.goodput_rps,
            self.slo_attainment * 100.0
        );
        s += &p("TTFT", &self.ttft_ms);
        s += &p("TPOT", &self.tpot_ms);
        s += &p("e2e", &self.e2e_ms);
        if !self.errors_by_status.is_empty() {
            s += &format!("errors by status: {:?}\n", self.errors_by_status);
        }
        for (name, c) in &self.per_class {
            s += &format!(
                "class {name}: {} requests, {} ok, SLO attainment {:.1} %, TTFT p90 {:.1} ms, TPOT p90 {:.1} ms, e2e p99 {:.1} ms\n",
                c.requests,
                c.ok,
                c.slo_attainment * 100.0,
                c.ttft_ms.p90,
                c.tpot_ms.p90,
                c.e2e_ms.p99
            );
            if self.per_server.len() > 1 {
                s += &format!("  per server: {}\n", server_counts(&c.per_server));
            }
        }
        if self.per_server.len() > 1 {
            s += &format!("per server: {}\n", server_counts(&self.per_server));
        }
        s
    }
}

fn server_counts(counts: &BTreeMap<String, u64>) -> String {
    let counts: Vec<String> = counts.iter().map(|(k, v)| format!("{k}={v}")).collect();
    counts.join(" ")
}

struct Ctx {
    cfg: LoadConfig,
    targets: Vec<http1::Target>,
    pool: http1::Pool,
    start: Instant,
    records: Mutex<Vec<Record>>,
    prefixes: Vec<Vec<String>>,
}

/// Runs the workload and returns the summary (and writes records if asked).
pub async fn run(cfg: LoadConfig) -> anyhow::Result<Summary> {
    run_with_records(cfg).await.map(|(s, _)| s)
}

/// Runs the workload and returns the summary with every request's record, sorted by send time.
pub async fn run_with_records(cfg: LoadConfig) -> anyhow::Result<(Summary, Vec<Record>)> {
    if cfg.targets.is_empty() {
        anyhow::bail!("load: at least one target base URL is required");
    }
    if !(cfg.time_scale.is_finite() && cfg.time_scale > 0.0) {
        anyhow::bail!(
            "load: time_scale must be a positive number, got {}",
            cfg.time_scale
        );
    }
    cfg.workload
        .validate()
        .map_err(|e| anyhow::anyhow!("workload {}: {e}", cfg.workload.name))?;
    let targets = cfg
        .targets
        .iter()
        .map(|t| http1::Target::parse(t))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("load: {e}"))?;
    let pool = http1::Pool::new(4096, cfg.stall_timeout);
    let w = &cfg.workload;
    // Shared prefixes are generated once per (class, group).
    let prefixes = w
        .classes
        .iter()
        .enumerate()
        .map(|(ci, c)| match &c.shared_prefix {
            Some(p) => (0..p.groups)
                .map(|g| {
                    text_of(
                        p.prefix_tokens,
                        w.seed ^ ((ci as u64) << 32) ^ u64::from(g).wrapping_mul(0x9e37_79b9),
                    )
                })
                .collect(),
            None => Vec::new(),
        })
        .collect();
    let ctx = Arc::new(Ctx {
        cfg: cfg.clone(),
        targets,
        pool,
        start: Instant::now(),
        records: Mutex::new(Vec::new()),
        prefixes,
    });
    let mut rng = SmallRng::seed_from_u64(w.seed);
    let scale = cfg.time_scale;
    match &w.arrival {
        crate::workload::Arrival::Closed { concurrency } => {
            let end = ctx.start + Duration::from_secs_f64(w.total_duration_s() / scale);
            let mut tasks = Vec::with_capacity(*concurrency);
            for u in 0..*concurrency {
                let ctx = ctx.clone();
                let mut urng = SmallRng::seed_from_u64(w.seed.wrapping_add(1 + u as u64));
                tasks.push(tokio::spawn(async move {
                    let mut n = 0u64;
                    while Instant::now() < end {
                        let plan = ctx.cfg.workload.draw(&mut urng);
                        let id = ((u as u64) << 32) | n;
                        n += 1;
                        one(&ctx, id, plan).await;
                    }
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
        }
        _ => {
            let times = w.arrival_times(&mut rng);
            let sem = Arc::new(Semaphore::new(cfg.max_in_flight.max(1)));
            let mut tasks = tokio::task::JoinSet::new();
            for (i, t) in times.into_iter().enumerate() {
                let plan = w.draw(&mut rng);
                let at = ctx.start + Duration::from_secs_f64(t / scale);
                tokio::time::sleep_until(at.into()).await;
                let Ok(permit) = sem.clone().try_acquire_owned() else {
                    ctx.records.lock().push(dropped(&ctx, i as u64, &plan));
                    continue;
                };
                let ctx = ctx.clone();
                tasks.spawn(async move {
                    one(&ctx, i as u64, plan).await;
                    drop(permit);
                });
                while tasks.try_join_next().is_some() {}
            }
            while tasks.join_next().await.is_some() {}
        }
    }
    let wall_s = ctx.start.elapsed().as_secs_f64();
    let mut records = std::mem::take(&mut *ctx.records.lock());
    records.sort_by(|a, b| a.start_ms.total_cmp(&b.start_ms));
    if let Some(path) = &cfg.output {
        let f = std::fs::File::create(path)
            .map_err(|e| anyhow::anyhow!("cannot write records to {}: {e}", path.display()))?;
        let mut f = std::io::BufWriter::new(f);
        for r in &records {
            serde_json::to_writer(&mut f, r)?;
            f.write_all(b"\n")?;
        }
        f.flush()?;
    }
    let summary = Summary::from_records(&w.name, &records, wall_s);
    Ok((summary, records))
}

fn model_of(ctx: &Ctx, plan: &Planned) -> String {
    let c = &ctx.cfg.workload.classes[plan.class];
    if let (Some(l), Some(i)) = (&c.lora, plan.lora) {
        return l.adapters[i].clone();
    }
    c.model
        .clone()
        .or_else(|| ctx.cfg.workload.model.clone())
        .unwrap_or_else(|| ctx.cfg.default_model.clone())
}

fn dropped(ctx: &Ctx, id: u64, plan: &Planned) -> Record {
    let c = &ctx.cfg.workload.classes[plan.class];
    Record {
        id,
        class: c.name.clone(),
        model: model_of(ctx, plan),
        start_ms: ctx.start.elapsed().as_secs_f64() * 1e3 * ctx.cfg.time_scale,
        status: 0,
        error: Some(format!(
            "load generator: in-flight limit {} reached",
            ctx.cfg.max_in_flight
        )),
        server: None,
        stream: c.stream,
        ttft_ms: None,
        tpot_ms: None,
        e2e_ms: 0.0,
        prompt_tokens: 0,
        output_tokens: 0,
        slo_ttft_ms: c.slo.ttft_ms,
        slo_tpot_ms: c.slo.tpot_ms,
        good: false,
    }
}

/// Sends one request and records the outcome.
async fn one(ctx: &Ctx, id: u64, plan: Planned) {
    let w = &ctx.cfg.workload;
    let c = &w.classes[plan.class];
    let model = model_of(ctx, &plan);
    let mut prompt = match plan.group {
        Some(g) => ctx.prefixes[plan.class][g as usize].clone(),
        None => String::new(),
    };
    prompt.push_str(&text_of(plan.prompt_tokens, plan.text_seed));
    let api: Api = c.api.into();
    let mut body = match api {
        Api::Chat => {
            json!({"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": plan.max_tokens})
        }
        Api::Completions => {
            json!({"model": model, "prompt": prompt, "max_tokens": plan.max_tokens})
        }
    };
    if c.ignore_eos {
        body["ignore_eos"] = json!(true);
    }
    if c.stream {
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
    }
    let target = &ctx.targets[(id as usize) % ctx.targets.len()];
    let path = match api {
        Api::Chat => "/v1/chat/completions",
        Api::Completions => "/v1/completions",
    };
    let body = body.to_string();
    // The record's id, so a request can be followed through Envoy's access log and the
    // picker's traces.
    let mut headers: Vec<(&str, String)> = vec![("x-request-id", format!("load-{id}"))];
    if let Some(t) = c.slo.ttft_ms {
        headers.push(("x-slo-ttft-ms", t.to_string()));
    }
    if let Some(t) = c.slo.tpot_ms {
        headers.push(("x-slo-tpot-ms", t.to_string()));
    }
    if let Some(o) = &c.objective {
        headers.push(("x-gateway-inference-objective", o.clone()));
    }
    if let Some(wc) = &c.workload {
        headers.push((
            "x-workload-context",
            serde_json::to_string(wc).unwrap_or_default(),
        ));
    }
    for (k, v) in &c.headers {
        headers.push((k, v.clone()));
    }
    let request = build_request(target, path, &headers, &body);
    let scale = ctx.cfg.time_scale;
    let t0 = Instant::now();
    let mut rec = Record {
        id,
        class: c.name.clone(),
        model,
        start_ms: t0.duration_since(ctx.start).as_secs_f64() * 1e3 * scale,
        status: 0,
        error: None,
        server: None,
        stream: c.stream,
        ttft_ms: None,
        tpot_ms: None,
        e2e_ms: 0.0,
        prompt_tokens: plan.prompt_tokens + c.shared_prefix.as_ref().map_or(0, |p| p.prefix_tokens),
        output_tokens: 0,
        slo_ttft_ms: c.slo.ttft_ms,
        slo_tpot_ms: c.slo.tpot_ms,
        good: false,
    };
    let outcome = match request {
        Ok(req) => {
            let mut sink = Collect::new(c.stream, t0);
            // The answer is collected into `sink` as it arrives, so what came before a
            // timeout is still there.
            match tokio::time::timeout(
                ctx.cfg.timeout,
                http1::exchange(&ctx.pool, target, &req, &[SERVER_HEADER], &mut sink),
            )
            .await
            {
                Ok(result) => judge(sink, result.map(|_| ())),
                Err(_) => Ok(sink.gave_up(format!("timed out after {:?}", ctx.cfg.timeout))),
            }
        }
        Err(e) => Err(e),
    };
    let ms = |d: Duration| d.as_secs_f64() * 1e3 * scale;
    rec.e2e_ms = ms(t0.elapsed());
    match outcome {
        Err(e) => rec.error = Some(e),
        Ok(x) => {
            rec.status = x.status;
            rec.server = x.server;
            rec.error = x.error;
            if let Some(p) = x.prompt_tokens {
                rec.prompt_tokens = p;
            }
            rec.output_tokens = x.completion_tokens.unwrap_or(x.chunks);
            if c.stream {
                rec.ttft_ms = x.first.map(ms);
                if let (Some(f), Some(l)) = (x.first, x.last)
                    && x.chunks > 1
                {
                    rec.tpot_ms = Some(ms(l - f) / f64::from(x.chunks - 1));
                }
            }
        }
    }
    let success = rec.succeeded();
    // Without streaming there is no first-token time: the TTFT objective is judged on e2e.
    let ttft_for_slo = rec.ttft_ms.unwrap_or(rec.e2e_ms);
    let ttft_ok = c.slo.ttft_ms.is_none_or(|s| ttft_for_slo <= s);
    let tpot_ok = c
        .slo
        .tpot_ms
        .is_none_or(|s| !c.stream || rec.tpot_ms.is_none_or(|t| t <= s));
    rec.good = success && ttft_ok && tpot_ok;
    ctx.records.lock().push(rec);
}

struct Exchange {
    status: u16,
    server: Option<String>,
    error: Option<String>,
    first: Option<Duration>,
    last: Option<Duration>,
    chunks: u32,
    prompt_tokens: Option<u32>,
    completion_tokens: Option<u32>,
    saw_done: bool,
}

/// Renders the HTTP/1.1 request; the error names a custom header that cannot be sent.
fn build_request(
    target: &http1::Target,
    path: &str,
    headers: &[(&str, String)],
    body: &str,
) -> Result<Vec<u8>, String> {
    use std::fmt::Write as _;
    let mut head = String::with_capacity(256);
    let _ = write!(
        head,
        "POST {}{path} HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
        target.prefix,
        target.host,
        body.len()
    );
    for (k, v) in headers {
        if http::HeaderName::from_bytes(k.as_bytes()).is_err()
            || http::HeaderValue::from_str(v).is_err()
        {
            return Err(format!(
                "cannot build request: header {k:?}: {v:?} is not a valid HTTP header"
            ));
        }
        let _ = write!(head, "{k}: {v}\r\n");
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(body.as_bytes());
    Ok(out)
}

/// Collects one response: the status and server from the head, then either SSE events as
/// they arrive (timestamped) or the whole body.
struct Collect {
    x: Exchange,
    stream: bool,
    t0: Instant,
    /// Unfinished SSE event, or the whole non-streamed body.
    buf: Vec<u8>,
    overflow: bool,
}

impl http1::Sink for Collect {
    fn head(&mut self, head: &http1::Head) {
        self.x.status = head.status;
        self.x.server = head
            .kept
            .iter()
            .find(|(k, _)| k == SERVER_HEADER)
            .map(|(_, v)| v.clone());
    }

    fn data(&mut self, data: &[u8]) {
        let ok = (200..300).contains(&self.x.status);
        if self.stream && ok {
            if self.buf.is_empty() {
                // The usual case: the piece holds whole events; scan it where it lies.
                let used = sse_events(data, &mut self.x, self.t0);
                self.buf.extend_from_slice(&data[used..]);
            } else {
                self.buf.extend_from_slice(data);
                let used = sse_events(&self.buf, &mut self.x, self.t0);
                self.buf.drain(..used);
            }
        } else if !self.overflow {
            self.buf.extend_from_slice(data);
        }
        if self.buf.len() > MAX_BODY {
            // Keep reading to the end (the connection stays usable) but stop buffering.
            self.overflow = true;
            self.buf.clear();
        }
    }
}

impl Collect {
    fn new(stream: bool, t0: Instant) -> Self {
        Collect {
            x: Exchange {
                status: 0,
                server: None,
                error: None,
                first: None,
                last: None,
                chunks: 0,
                prompt_tokens: None,
                completion_tokens: None,
                saw_done: false,
            },
            stream,
            t0,
            buf: Vec::new(),
            overflow: false,
        }
    }

    /// What had arrived when the request was given up (`why`), for its record and error
    /// message.
    fn gave_up(mut self, why: String) -> Exchange {
        let got = if self.x.status == 0 {
            "no response head".to_string()
        } else {
            format!(
                "after HTTP {} from {} and {} chunks",
                self.x.status,
                self.x.server.as_deref().unwrap_or("an unnamed server"),
                self.x.chunks
            )
        };
        self.x.error = Some(format!("{why} ({got})"));
        self.x
    }
}

/// Turns a finished exchange into its outcome.
fn judge(sink: Collect, result: Result<(), http1::Failure>) -> Result<Exchange, String> {
    let stream = sink.stream;
    match result {
        Ok(()) => {}
        Err(http1::Failure::Request(e)) => return Err(e),
        Err(http1::Failure::Stalled(after)) => {
            return Ok(sink.gave_up(format!("stalled: nothing from the server for {after:?}")));
        }
        Err(http1::Failure::Body(e)) => {
            let mut x = sink.x;
            x.error = Some(format!("{e} (after {} chunks)", x.chunks));
            return Ok(x);
        }
    }
    let Collect {
        mut x,
        buf,
        overflow,
        ..
    } = sink;
    let status = x.status;
    if overflow {
        x.error = Some(format!(
            "response larger than {MAX_BODY} bytes without an event boundary"
        ));
        return Ok(x);
    }
    if !(200..300).contains(&status) {
        let v: Value = serde_json::from_slice(&buf).unwrap_or(Value::Null);
        let msg = v["error"]["message"]
            .as_str()
            .or(v["message"].as_str())
            .map(str::to_owned)
            .unwrap_or_else(|| String::from_utf8_lossy(&buf[..buf.len().min(200)]).into_owned());
        x.error = Some(format!("HTTP {status}: {msg}"));
        return Ok(x);
    }
    if !stream {
        let v: Value =
            serde_json::from_slice(&buf).map_err(|e| format!("response is not JSON: {e}"))?;
        read_usage(&v, &mut x);
        x.chunks = 1;
    } else if x.error.is_none() && !x.saw_done {
        x.error = Some(format!(
            "stream ended after {} chunks without `data: [DONE]`",
            x.chunks
        ));
    }
    Ok(x)
}

static EVENT_END: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\n\n"));
static USAGE: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"usage\""));
static NO_CHOICES: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"choices\":[]"));
static EMPTY_TEXT: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"text\":\"\""));
static EMPTY_CONTENT: LazyLock<Finder<'static>> =
    LazyLock::new(|| Finder::new(b"\"content\":\"\""));

/// Handles every complete SSE event at the front of `buf`; returns the bytes consumed.
fn sse_events(buf: &[u8], x: &mut Exchange, t0: Instant) -> usize {
    let mut at = 0;
    while let Some(pos) = EVENT_END.find(&buf[at..]) {
        sse_event(&buf[at..at + pos], x, t0);
        at += pos + 2;
    }
    at
}

fn sse_event(ev: &[u8], x: &mut Exchange, t0: Instant) {
    for line in ev.split(|b| *b == b'\n') {
        let Some(data) = line.strip_prefix(b"data:") else {
            continue;
        };
        let data = data.trim_ascii();
        if data == b"[DONE]" {
            x.saw_done = true;
            continue;
        }
        // Cheap scans, no JSON parse: parsing every token chunk would dominate the CPU.
        if USAGE.find(data).is_some() && NO_CHOICES.find(data).is_some() {
            if let Ok(v) = serde_json::from_slice::<Value>(data) {
                read_usage(&v, x);
            }
            continue;
        }
        if EMPTY_TEXT.find(data).is_some() || EMPTY_CONTENT.find(data).is_some() {
            continue; // an empty delta (role announcement, final marker)
        }
        let now = t0.elapsed();
        x.first.get_or_insert(now);
        x.last = Some(now);
        x.chunks += 1;
    }
}

fn read_usage(v: &Value, x: &mut Exchange) {
    let u = &v["usage"];
    if let Some(p) = u["prompt_tokens"].as_u64() {
        x.prompt_tokens = u32::try_from(p).ok();
    }
    if let Some(c) = u["completion_tokens"].as_u64() {
        x.completion_tokens = u32::try_from(c).ok();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server that answers every request with a streamed head from `stalled` and one
    /// SSE chunk, then sends nothing more (a request stuck in a model server's queue).
    async fn stalling_server() -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((mut conn, _)) = listener.accept().await {
                let mut buf = [0u8; 4096];
                let _ = conn.read(&mut buf).await;
                let chunk = "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n";
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n{SERVER_HEADER}: stalled\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{chunk}\r\n",
                    chunk.len()
                );
                let _ = conn.write_all(head.as_bytes()).await;
                held.push(conn);
            }
        });
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn a_timed_out_request_records_what_arrived_before_the_timeout() {
        let w = Workload::from_yaml(
            "name: t\nseed: 1\nduration_s: 0.05\narrival: {type: constant, rate: 40}\n\
             classes:\n  - name: chat\n    prompt: {dist: fixed, value: 10}\n    \
             output: {dist: fixed, value: 8}\n",
            "inline",
        )
        .unwrap();
        let mut cfg = LoadConfig::new(vec![stalling_server().await], w);
        cfg.timeout = Duration::from_millis(300);
        let (summary, records) = run_with_records(cfg).await.unwrap();
        assert!(!records.is_empty());
        for r in &records {
            assert_eq!(r.status, 200, "{r:?}");
            assert_eq!(r.server.as_deref(), Some("stalled"), "{r:?}");
            assert!(!r.good, "{r:?}");
            let e = r.error.as_deref().unwrap_or_default();
            assert!(
                e.contains("timed out after 300ms (after HTTP 200 from stalled and 1 chunks)"),
                "{e}"
            );
        }
        assert_eq!(summary.ok, 0, "{summary:?}");
    }

    /// A server that streams `chunks` SSE chunks `gap` apart, then ends the stream properly
    /// (a long answer from a slow model server).
    async fn trickling_server(chunks: usize, gap: Duration) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = conn.read(&mut buf).await;
                    let head = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n{SERVER_HEADER}: slow\r\ntransfer-encoding: chunked\r\n\r\n"
                    );
                    let _ = conn.write_all(head.as_bytes()).await;
                    let chunk = "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n";
                    for _ in 0..chunks {
                        tokio::time::sleep(gap).await;
                        let piece = format!("{:x}\r\n{chunk}\r\n", chunk.len());
                        let _ = conn.write_all(piece.as_bytes()).await;
                    }
                    let done = "data: [DONE]\n\n";
                    let end = format!("{:x}\r\n{done}\r\n0\r\n\r\n", done.len());
                    let _ = conn.write_all(end.as_bytes()).await;
                });
            }
        });
        format!("http://{addr}")
    }

    fn one_chat_request() -> Workload {
        Workload::from_yaml(
            "name: t\nseed: 1\nduration_s: 0.015\narrival: {type: constant, rate: 100}\n\
             classes:\n  - name: chat\n    prompt: {dist: fixed, value: 10}\n    \
             output: {dist: fixed, value: 8}\n",
            "inline",
        )
        .unwrap()
    }

    #[tokio::test]
    async fn a_server_that_goes_quiet_fails_the_request_after_the_stall_timeout() {
        let mut cfg = LoadConfig::new(vec![stalling_server().await], one_chat_request());
        cfg.stall_timeout = Duration::from_millis(300);
        let started = Instant::now();
        let (_, records) = run_with_records(cfg).await.unwrap();
        // Not the 600 s deadline: the stall is noticed on its own.
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(records.len(), 1);
        let r = &records[0];
        assert_eq!((r.status, r.good), (200, false), "{r:?}");
        let e = r.error.as_deref().unwrap_or_default();
        assert!(
            e.contains(
                "stalled: nothing from the server for 300ms (after HTTP 200 from stalled and 1 chunks)"
            ),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_long_answer_that_keeps_streaming_outlives_the_stall_timeout() {
        // Thirty chunks 50 ms apart: 1.5 s in all, longer than the stall timeout, and never
        // near a second without a byte (the margin is for a busy CI machine).
        let target = trickling_server(30, Duration::from_millis(50)).await;
        let mut cfg = LoadConfig::new(vec![target], one_chat_request());
        cfg.stall_timeout = Duration::from_secs(1);
        let (summary, records) = run_with_records(cfg).await.unwrap();
        assert_eq!(records.len(), 1);
        let r = &records[0];
        assert_eq!(r.error, None, "{r:?}");
        assert_eq!((r.status, r.output_tokens), (200, 30), "{r:?}");
        assert!(r.e2e_ms >= 1_400.0, "{r:?}");
        assert_eq!(summary.ok, 1);
    }
}
