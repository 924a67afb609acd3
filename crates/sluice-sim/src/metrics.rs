//! Engine counters and histograms, and their rendering in the Prometheus text format under the
//! metric names of vLLM, SGLang or TensorRT-LLM (`trtllm-serve`).
//!
//! The names the EPP scrapes come from `scheduling.md` §8; the counters and histograms follow
//! vLLM's `vllm/v1/metrics/loggers.py` (v0.10 era) and are mapped to the other engines'
//! closest equivalents.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// Which engine's metric names `/metrics` uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum EngineFlavor {
    /// vLLM (`vllm:` prefix).
    #[default]
    Vllm,
    /// SGLang (`sglang:` prefix).
    Sglang,
    /// TensorRT-LLM's `trtllm-serve` (`trtllm_` prefix).
    #[value(name = "trtllm-serve")]
    #[serde(rename = "trtllm-serve")]
    TrtllmServe,
}

/// A cumulative histogram with fixed upper bounds, in seconds.
#[derive(Debug, Clone)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

/// vLLM's `vllm:time_to_first_token_seconds` buckets.
pub const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
/// vLLM's `vllm:inter_token_latency_seconds` buckets.
pub const ITL_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
/// vLLM's request-latency buckets (`e2e`, queue time).
pub const E2E_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];

impl Histogram {
    /// An empty histogram with the given bucket upper bounds (ascending).
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    /// Records one observation.
    pub fn observe(&mut self, v: f64) {
        if let Some(i) = self.bounds.iter().position(|b| v <= *b) {
            self.counts[i] += 1;
        }
        self.sum += v;
        self.count += 1;
    }

    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Sum of observations.
    pub fn sum(&self) -> f64 {
        self.sum
    }
}

/// Counters and histograms an engine accumulates over its life.
#[derive(Debug, Clone)]
pub struct EngineStats {
    /// Prompt tokens of admitted requests.
    pub prompt_tokens: u64,
    /// Generated tokens.
    pub generation_tokens: u64,
    /// Prompt tokens looked up in the prefix cache.
    pub prefix_queries: u64,
    /// Prompt tokens found in the prefix cache.
    pub prefix_hits: u64,
    /// Requests preempted (recompute mode).
    pub preemptions: u64,
    /// Requests finished because they reached `max_tokens`.
    pub finished_length: u64,
    /// Requests finished on a (simulated) end-of-sequence token.
    pub finished_stop: u64,
    /// Requests aborted by the client.
    pub aborted: u64,
    /// Admissions whose LoRA adapter was already loaded.
    pub lora_hits: u64,
    /// Admissions that had to load their LoRA adapter.
    pub lora_misses: u64,
    /// Engine steps run.
    pub steps: u64,
    /// Time to first token, seconds.
    pub ttft: Histogram,
    /// Inter-token latency, seconds.
    pub itl: Histogram,
    /// Arrival to last token, seconds.
    pub e2e: Histogram,
    /// Arrival to first scheduling, seconds.
    pub queue: Histogram,
}

impl Default for EngineStats {
    fn default() -> Self {
        Self {
            prompt_tokens: 0,
            generation_tokens: 0,
            prefix_queries: 0,
            prefix_hits: 0,
            preemptions: 0,
            finished_length: 0,
            finished_stop: 0,
            aborted: 0,
            lora_hits: 0,
            lora_misses: 0,
            steps: 0,
            ttft: Histogram::new(TTFT_BUCKETS),
            itl: Histogram::new(ITL_BUCKETS),
            e2e: Histogram::new(E2E_BUCKETS),
            queue: Histogram::new(E2E_BUCKETS),
        }
    }
}

/// The instantaneous state `/metrics` reports next to the counters.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineSnapshot {
    /// Requests waiting to be scheduled.
    pub waiting: u32,
    /// Requests in the running batch.
    pub running: u32,
    /// KV-cache usage, 0–1.
    pub kv_usage: f64,
    /// Adapters of running requests.
    pub running_loras: Vec<String>,
    /// Adapters of waiting requests.
    pub waiting_loras: Vec<String>,
    /// Maximum adapters in a batch.
    pub max_loras: u32,
    /// Tokens per KV block.
    pub block_size: u32,
    /// KV blocks on the server.
    pub num_gpu_blocks: u32,
}

/// Everything needed to render one `/metrics` page.
#[derive(Debug)]
pub struct MetricsPage<'a> {
    /// Engine naming scheme.
    pub flavor: EngineFlavor,
    /// Served model name (the `model_name` label).
    pub model: &'a str,
    /// Gauges.
    pub snapshot: &'a EngineSnapshot,
    /// Counters and histograms.
    pub stats: &'a EngineStats,
    /// Unix time in seconds, the value of `vllm:lora_requests_info`.
    pub unix_time: f64,
}

struct Writer {
    out: String,
    labels: String,
}

impl Writer {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }
    fn gauge(&mut self, name: &str, help: &str, v: f64) {
        self.head(name, "gauge", help);
        let _ = writeln!(self.out, "{name}{{{}}} {}", self.labels, fmt_f(v));
    }
    fn counter(&mut self, name: &str, help: &str, v: u64) {
        // Prometheus counter families are named without `_total`; samples carry it.
        let family = name.strip_suffix("_total").unwrap_or(name);
        self.head(family, "counter", help);
        let _ = writeln!(self.out, "{family}_total{{{}}} {v}", self.labels);
    }
    fn histogram(&mut self, name: &str, help: &str, h: &Histogram) {
        self.head(name, "histogram", help);
        let mut cum = 0;
        for (b, c) in h.bounds.iter().zip(&h.counts) {
            cum += c;
            let _ = writeln!(
                self.out,
                "{name}_bucket{{{},le=\"{}\"}} {cum}",
                self.labels,
                fmt_f(*b)
            );
        }
        let _ = writeln!(
            self.out,
            "{name}_bucket{{{},le=\"+Inf\"}} {}",
            self.labels, h.count
        );
        let _ = writeln!(self.out, "{name}_sum{{{}}} {}", self.labels, fmt_f(h.sum));
        let _ = writeln!(self.out, "{name}_count{{{}}} {}", self.labels, h.count);
    }
}

fn fmt_f(v: f64) -> String {
    if v.is_finite() {
        format!("{v:?}")
    } else if v.is_nan() {
        "NaN".to_owned()
    } else if v > 0.0 {
        "+Inf".to_owned()
    } else {
        "-Inf".to_owned()
    }
}

/// Escapes a label value for the text format.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Renders the page in the Prometheus text exposition format (version 0.0.4).
pub fn render(page: &MetricsPage<'_>) -> String {
    let s = page.snapshot;
    let st = page.stats;
    let mut w = Writer {
        out: String::with_capacity(8 * 1024),
        labels: String::new(),
    };
    match page.flavor {
        EngineFlavor::Vllm => {
            w.labels = format!("engine=\"0\",model_name=\"{}\"", esc(page.model));
            w.gauge(
                "vllm:num_requests_running",
                "Number of requests in model execution batches.",
                f64::from(s.running),
            );
            w.gauge(
                "vllm:num_requests_waiting",
                "Number of requests waiting to be processed.",
                f64::from(s.waiting),
            );
            w.gauge(
                "vllm:kv_cache_usage_perc",
                "KV-cache usage. 1 means 100 percent usage.",
                s.kv_usage,
            );
            w.gauge(
                "vllm:gpu_cache_usage_perc",
                "GPU KV-cache usage. 1 means 100 percent usage (deprecated name).",
                s.kv_usage,
            );
            w.head(
                "vllm:lora_requests_info",
                "gauge",
                "Running stats on lora requests.",
            );
            let _ = writeln!(
                w.out,
                "vllm:lora_requests_info{{max_lora=\"{}\",running_lora_adapters=\"{}\",waiting_lora_adapters=\"{}\"}} {}",
                s.max_loras,
                esc(&s.running_loras.join(",")),
                esc(&s.waiting_loras.join(",")),
                fmt_f(page.unix_time)
            );
            w.head(
                "vllm:cache_config_info",
                "gauge",
                "Information of the LLMEngine CacheConfig.",
            );
            let _ = writeln!(
                w.out,
                "vllm:cache_config_info{{block_size=\"{}\",enable_prefix_caching=\"True\",engine=\"0\",num_gpu_blocks=\"{}\"}} 1.0",
                s.block_size, s.num_gpu_blocks
            );
            w.counter(
                "vllm:num_preemptions_total",
                "Cumulative number of preemptions from the engine.",
                st.preemptions,
            );
            w.counter(
                "vllm:prompt_tokens_total",
                "Number of prefill tokens processed.",
                st.prompt_tokens,
            );
            w.counter(
                "vllm:generation_tokens_total",
                "Number of generation tokens processed.",
                st.generation_tokens,
            );
            w.counter(
                "vllm:prefix_cache_queries_total",
                "Prefix cache queries, in terms of number of queried tokens.",
                st.prefix_queries,
            );
            w.counter(
                "vllm:prefix_cache_hits_total",
                "Prefix cache hits, in terms of number of cached tokens.",
                st.prefix_hits,
            );
            w.head(
                "vllm:request_success",
                "counter",
                "Count of successfully processed requests.",
            );
            let base = w.labels.clone();
            for (reason, v) in [
                ("length", st.finished_length),
                ("stop", st.finished_stop),
                ("abort", st.aborted),
            ] {
                let _ = writeln!(
                    w.out,
                    "vllm:request_success_total{{{base},finished_reason=\"{reason}\"}} {v}"
                );
            }
            w.histogram(
                "vllm:time_to_first_token_seconds",
                "Histogram of time to first token in seconds.",
                &st.ttft,
            );
            w.histogram(
                "vllm:inter_token_latency_seconds",
                "Histogram of inter-token latency in seconds.",
                &st.itl,
            );
            w.histogram(
                "vllm:time_per_output_token_seconds",
                "Histogram of time per output token in seconds (deprecated name).",
                &st.itl,
            );
            w.histogram(
                "vllm:e2e_request_latency_seconds",
                "Histogram of e2e request latency in seconds.",
                &st.e2e,
            );
            w.histogram(
                "vllm:request_queue_time_seconds",
                "Histogram of time spent in WAITING phase for request.",
                &st.queue,
            );
        }
        EngineFlavor::Sglang => {
            w.labels = format!("model_name=\"{}\"", esc(page.model));
            w.gauge(
                "sglang:num_running_reqs",
                "The number of running requests.",
                f64::from(s.running),
            );
            w.gauge(
                "sglang:num_queue_reqs",
                "The number of requests in the waiting queue.",
                f64::from(s.waiting),
            );
            w.gauge("sglang:token_usage", "The token usage.", s.kv_usage);
            w.head("sglang:cache_config_info", "gauge", "Cache configuration.");
            let _ = writeln!(
                w.out,
                "sglang:cache_config_info{{num_pages=\"{}\",page_size=\"{}\"}} 1.0",
                s.num_gpu_blocks, s.block_size
            );
            let hit = if st.prefix_queries == 0 {
                0.0
            } else {
                st.prefix_hits as f64 / st.prefix_queries as f64
            };
            w.gauge("sglang:cache_hit_rate", "The prefix cache hit rate.", hit);
            w.counter(
                "sglang:prompt_tokens_total",
                "Number of prefill tokens processed.",
                st.prompt_tokens,
            );
            w.counter(
                "sglang:generation_tokens_total",
                "Number of generation tokens processed.",
                st.generation_tokens,
            );
            w.counter(
                "sglang:num_requests_total",
                "Number of requests processed.",
                st.finished_length + st.finished_stop,
            );
            w.histogram(
                "sglang:time_to_first_token_seconds",
                "Histogram of time to first token in seconds.",
                &st.ttft,
            );
            w.histogram(
                "sglang:inter_token_latency_seconds",
                "Histogram of inter-token latency in seconds.",
                &st.itl,
            );
            w.histogram(
                "sglang:e2e_request_latency_seconds",
                "Histogram of End-to-end request latency in seconds.",
                &st.e2e,
            );
        }
        EngineFlavor::TrtllmServe => {
            w.labels = format!("model_name=\"{}\"", esc(page.model));
            w.gauge(
                "trtllm_num_requests_running",
                "Number of requests currently running.",
                f64::from(s.running),
            );
            w.gauge(
                "trtllm_num_requests_waiting",
                "Number of requests waiting.",
                f64::from(s.waiting),
            );
            w.gauge(
                "trtllm_kv_cache_utilization",
                "KV cache utilization, 0 to 1.",
                s.kv_usage,
            );
            w.gauge(
                "trtllm_kv_cache_tokens_per_block",
                "Tokens per KV cache block.",
                f64::from(s.block_size),
            );
            w.gauge(
                "trtllm_kv_cache_max_blocks",
                "Maximum number of KV cache blocks.",
                f64::from(s.num_gpu_blocks),
            );
            w.counter(
                "trtllm_prompt_tokens_total",
                "Number of prefill tokens processed.",
                st.prompt_tokens,
            );
            w.counter(
                "trtllm_generation_tokens_total",
                "Number of generation tokens processed.",
                st.generation_tokens,
            );
            w.counter(
                "trtllm_request_success_total",
                "Count of successfully processed requests.",
                st.finished_length + st.finished_stop,
            );
            w.histogram(
                "trtllm_time_to_first_token_seconds",
                "Histogram of time to first token in seconds.",
                &st.ttft,
            );
            w.histogram(
                "trtllm_time_per_output_token_seconds",
                "Histogram of time per output token in seconds.",
                &st.itl,
            );
            w.histogram(
                "trtllm_e2e_request_latency_seconds",
                "Histogram of end to end request latency in seconds.",
                &st.e2e,
            );
        }
    }
    w.out
}

/// Samples by name: `(raw label text, value)` pairs.
pub type ParsedSamples = HashMap<String, Vec<(String, f64)>>;

/// A strict reading of the text format: every sample belongs to a family announced by
/// HELP and TYPE lines before it, names are valid, label values are quoted and escaped,
/// values parse as floats, and no family is announced twice. Returns samples by name as
/// `(raw label text, value)`; the error names the offending line.
pub fn parse_strict(text: &str) -> Result<ParsedSamples, String> {
    let mut types: HashMap<String, String> = HashMap::new();
    let mut helped: HashSet<String> = HashSet::new();
    let mut samples: HashMap<String, Vec<(String, f64)>> = HashMap::new();
    let valid_name = |n: &str| {
        !n.is_empty()
            && n.chars().enumerate().all(|(i, c)| {
                c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
            })
    };
    for (ln, line) in text.lines().enumerate() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap_or("");
            if !helped.insert(name.to_owned()) {
                return Err(format!("line {ln}: second HELP for {name}"));
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split(' ');
            let name = it.next().unwrap_or("");
            let kind = it.next().unwrap_or("");
            if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                return Err(format!("line {ln}: bad type {kind}"));
            }
            if types.insert(name.to_owned(), kind.to_owned()).is_some() {
                return Err(format!("line {ln}: second TYPE for {name}"));
            }
            continue;
        }
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, rest) = match line.find('{') {
            Some(i) => (&line[..i], &line[i..]),
            None => line.split_once(' ').ok_or(format!("line {ln}: no value"))?,
        };
        if !valid_name(name) {
            return Err(format!("line {ln}: bad name {name}"));
        }
        let (labels, value) = if let Some(r) = rest.strip_prefix('{') {
            let end = r.rfind("} ").ok_or(format!("line {ln}: unclosed labels"))?;
            (&r[..end], r[end + 2..].trim())
        } else {
            ("", rest.trim())
        };
        // Labels: name="value" pairs, comma separated, value escapes only \\ \" \n.
        let mut chars = labels.chars().peekable();
        while chars.peek().is_some() {
            let lname: String = chars.by_ref().take_while(|c| *c != '=').collect();
            if !valid_name(&lname) || lname.contains(':') {
                return Err(format!("line {ln}: bad label name {lname}"));
            }
            if chars.next() != Some('"') {
                return Err(format!("line {ln}: unquoted label {lname}"));
            }
            loop {
                match chars.next() {
                    Some('\\') => match chars.next() {
                        Some('\\' | '"' | 'n') => {}
                        _ => return Err(format!("line {ln}: bad escape")),
                    },
                    Some('"') => break,
                    Some(_) => {}
                    None => return Err(format!("line {ln}: unterminated label value")),
                }
            }
            match chars.next() {
                Some(',') | None => {}
                Some(c) => return Err(format!("line {ln}: unexpected {c}")),
            }
        }
        let v: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().map_err(|_| format!("line {ln}: bad value {v}"))?,
        };
        let family = types
            .keys()
            .filter(|f| {
                let kind = &types[*f];
                name == f.as_str()
                    || (kind == "counter" && name == format!("{f}_total"))
                    || (kind == "histogram"
                        && [
                            format!("{f}_bucket"),
                            format!("{f}_sum"),
                            format!("{f}_count"),
                        ]
                        .contains(&name.to_owned()))
            })
            .max_by_key(|f| f.len())
            .ok_or(format!("line {ln}: sample {name} has no TYPE before it"))?;
        if !helped.contains(family) {
            return Err(format!("line {ln}: family {family} has no HELP"));
        }
        samples
            .entry(name.to_owned())
            .or_default()
            .push((labels.to_owned(), v));
    }
    Ok(samples)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page_for(flavor: EngineFlavor) -> String {
        let snapshot = EngineSnapshot {
            waiting: 3,
            running: 7,
            kv_usage: 0.25,
            running_loras: vec!["a".into(), "b\"q".into()],
            waiting_loras: vec![],
            max_loras: 4,
            block_size: 16,
            num_gpu_blocks: 1000,
        };
        let mut stats = EngineStats::default();
        stats.ttft.observe(0.03);
        stats.ttft.observe(100.0);
        render(&MetricsPage {
            flavor,
            model: "m",
            snapshot: &snapshot,
            stats: &stats,
            unix_time: 1.7e9,
        })
    }

    #[test]
    fn vllm_page_parses_strictly_and_carries_scheduler_series() {
        let s = parse_strict(&page_for(EngineFlavor::Vllm)).unwrap();
        assert_eq!(s["vllm:num_requests_waiting"][0].1, 3.0);
        assert_eq!(s["vllm:num_requests_running"][0].1, 7.0);
        assert_eq!(s["vllm:kv_cache_usage_perc"][0].1, 0.25);
        assert_eq!(s["vllm:gpu_cache_usage_perc"][0].1, 0.25);
        let lora = &s["vllm:lora_requests_info"][0];
        assert!(lora.0.contains("max_lora=\"4\""));
        assert!(lora.0.contains("running_lora_adapters=\"a,b\\\"q\""));
        assert_eq!(lora.1, 1.7e9);
        assert!(
            s["vllm:cache_config_info"][0]
                .0
                .contains("num_gpu_blocks=\"1000\"")
        );
        let buckets = &s["vllm:time_to_first_token_seconds_bucket"];
        let inf = buckets.iter().find(|(l, _)| l.contains("+Inf")).unwrap();
        assert_eq!(inf.1, 2.0);
        let le_004 = buckets
            .iter()
            .find(|(l, _)| l.contains("le=\"0.04\""))
            .unwrap();
        assert_eq!(le_004.1, 1.0);
    }

    #[test]
    fn other_engines_use_their_names() {
        let s = parse_strict(&page_for(EngineFlavor::Sglang)).unwrap();
        assert_eq!(s["sglang:num_queue_reqs"][0].1, 3.0);
        assert!(
            s["sglang:cache_config_info"][0]
                .0
                .contains("page_size=\"16\"")
        );
        assert!(!s.contains_key("vllm:num_requests_waiting"));
        let t = parse_strict(&page_for(EngineFlavor::TrtllmServe)).unwrap();
        assert_eq!(t["trtllm_num_requests_running"][0].1, 7.0);
        assert_eq!(t["trtllm_kv_cache_max_blocks"][0].1, 1000.0);
    }
}
