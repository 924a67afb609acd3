//! A Prometheus text-format reader that extracts only the series an engine mapping names.
//!
//! Model servers expose hundreds of series; scraping every 50 ms means parsing must be
//! cheap. Lines are sliced in place, a line is skipped after comparing its metric name
//! against the handful of wanted families, and labels are only walked for lines that match.
//! Nothing is allocated per line; only LoRA adapter names are copied out.

use sluice_core::EndpointMetrics;
use sluice_core::engine_metrics::label_value;
pub use sluice_core::engine_metrics::{CacheInfo, EngineMapping, EngineMappings, Selector};

/// The best sample seen for one selector: highest timestamp wins, later lines win ties.
#[derive(Clone, Copy, Default)]
struct Best {
    value: f64,
    ts: i64,
    seen: bool,
}

impl Best {
    fn offer(&mut self, value: f64, ts: i64) {
        if !self.seen || ts >= self.ts {
            *self = Best {
                value,
                ts,
                seen: true,
            };
        }
    }
    fn get(&self) -> Option<f64> {
        self.seen.then_some(self.value)
    }
}

/// What one scrape yielded.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Extracted {
    /// The metrics, with fields that were not found left at their defaults.
    pub metrics: EndpointMetrics,
    /// How many of the mapping's fields were found (0 = nothing useful; upstream then does
    /// not refresh the endpoint's update time).
    pub fields_found: u32,
    /// Names of mapped families that were absent, for a log line on transition.
    pub missing: Vec<&'static str>,
}

/// Extracts an engine's metrics from a Prometheus text exposition.
pub fn extract(text: &[u8], mapping: &EngineMapping) -> Extracted {
    let mut waiting = Best::default();
    let mut running = Best::default();
    let mut kv = Best::default();
    let mut kv_fallback = Best::default();
    let mut block_size = Best::default();
    let mut num_blocks = Best::default();
    let mut lora_best: Option<(f64, &[u8])> = None;
    let mut cache_labels: Option<&[u8]> = None;

    // memchr finds line ends and name ends with SIMD: a 16 KB vLLM page is mostly HELP/TYPE
    // comments and unwanted families, so per-byte work dominated the scrape's CPU cost.
    let mut rest = text;
    while !rest.is_empty() {
        let (line, tail) = match memchr::memchr(b'\n', rest) {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, &rest[rest.len()..]),
        };
        rest = tail;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(&first) = line.first() else { continue };
        if first == b'#' {
            continue;
        }
        let name_end = memchr::memchr3(b'{', b' ', b'\t', line).unwrap_or(line.len());
        let name = &line[..name_end];
        if !mapping.wants(name) {
            continue;
        }
        let Some((labels, value, ts)) = split_sample(&line[name_end..]) else {
            continue;
        };
        let offer = |sel: &Option<Selector>, best: &mut Best| {
            if sel.as_ref().is_some_and(|s| s.matches(name, labels)) {
                best.offer(value, ts);
            }
        };
        offer(&mapping.waiting, &mut waiting);
        offer(&mapping.running, &mut running);
        offer(&mapping.kv_usage, &mut kv);
        offer(&mapping.kv_usage_fallback, &mut kv_fallback);
        if mapping
            .lora
            .as_ref()
            .is_some_and(|s| s.matches(name, labels))
            && lora_best.is_none_or(|(v, _)| value >= v)
        {
            lora_best = Some((value, labels));
        }
        match &mapping.cache_info {
            Some(CacheInfo::Labels { series, .. }) if series.matches(name, labels) => {
                cache_labels = Some(labels);
            }
            Some(CacheInfo::Gauges {
                block_size: bs,
                num_blocks: nb,
            }) => {
                offer(bs, &mut block_size);
                offer(nb, &mut num_blocks);
            }
            _ => {}
        }
    }

    let mut out = Extracted::default();
    let found = |present: bool, name: &'static str, out: &mut Extracted| {
        if present {
            out.fields_found += 1;
        } else {
            out.missing.push(name);
        }
    };
    if mapping.waiting.is_some() {
        found(waiting.seen, "waiting", &mut out);
        out.metrics.waiting_queue_size = to_u32(waiting.get());
    }
    if mapping.running.is_some() {
        found(running.seen, "running", &mut out);
        out.metrics.running_requests_size = to_u32(running.get());
    }
    if mapping.kv_usage.is_some() || mapping.kv_usage_fallback.is_some() {
        let v = kv.get().or(kv_fallback.get());
        found(v.is_some(), "kv_usage", &mut out);
        out.metrics.kv_cache_usage = v.filter(|v| v.is_finite()).unwrap_or(0.0).clamp(0.0, 1.0);
    }
    if mapping.lora.is_some() {
        found(lora_best.is_some(), "lora", &mut out);
        if let Some((_, labels)) = lora_best {
            out.metrics.active_models = split_list(label_value(labels, b"running_lora_adapters"));
            out.metrics.waiting_models = split_list(label_value(labels, b"waiting_lora_adapters"));
            out.metrics.max_active_models = label_value(labels, b"max_lora")
                .and_then(|v| std::str::from_utf8(v).ok())
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
        }
    }
    match &mapping.cache_info {
        Some(CacheInfo::Labels {
            block_size_label,
            num_blocks_label,
            ..
        }) => {
            found(cache_labels.is_some(), "cache_info", &mut out);
            if let Some(labels) = cache_labels {
                out.metrics.cache_block_size =
                    parse_num(label_value(labels, block_size_label.as_bytes())).unwrap_or(0.0)
                        as u32;
                out.metrics.cache_num_blocks =
                    parse_num(label_value(labels, num_blocks_label.as_bytes())).unwrap_or(0.0)
                        as u64;
            }
        }
        Some(CacheInfo::Gauges { .. }) => {
            found(block_size.seen || num_blocks.seen, "cache_info", &mut out);
            out.metrics.cache_block_size = to_u32(block_size.get());
            out.metrics.cache_num_blocks = num_blocks.get().map(|v| v.max(0.0) as u64).unwrap_or(0);
        }
        None => {}
    }
    out
}

fn to_u32(v: Option<f64>) -> u32 {
    v.filter(|v| v.is_finite())
        .map(|v| v.clamp(0.0, u32::MAX as f64) as u32)
        .unwrap_or(0)
}

fn parse_num(v: Option<&[u8]>) -> Option<f64> {
    std::str::from_utf8(v?).ok()?.trim().parse().ok()
}

fn split_list(v: Option<&[u8]>) -> Vec<String> {
    let Some(v) = v.and_then(|v| std::str::from_utf8(v).ok()) else {
        return Vec::new();
    };
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// Splits `{labels} value [timestamp]` (the part after the name).
fn split_sample(rest: &[u8]) -> Option<(&[u8], f64, i64)> {
    let (labels, tail) = if rest.first() == Some(&b'{') {
        let end = closing_brace(rest)?;
        (&rest[1..end], &rest[end + 1..])
    } else {
        (&rest[..0], rest)
    };
    let mut parts = tail
        .split(|&b| b == b' ' || b == b'\t')
        .filter(|p| !p.is_empty());
    let value = parse_value(parts.next()?)?;
    let ts = parts
        .next()
        .and_then(|t| std::str::from_utf8(t).ok())
        .and_then(|t| t.parse::<i64>().ok())
        .unwrap_or(0);
    Some((labels, value, ts))
}

fn parse_value(v: &[u8]) -> Option<f64> {
    let s = std::str::from_utf8(v).ok()?;
    match s {
        "+Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => s.parse().ok(),
    }
}

/// Index of the `}` closing the label set, skipping braces inside quoted values.
fn closing_brace(s: &[u8]) -> Option<usize> {
    let mut in_str = false;
    let mut escaped = false;
    for (i, &b) in s.iter().enumerate().skip(1) {
        if in_str {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_str = false,
                _ => {}
            }
        } else if b == b'"' {
            in_str = true;
        } else if b == b'}' {
            return Some(i);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const VLLM: &str = r#"# HELP vllm:num_requests_waiting Number of requests waiting.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="m"} 3.0
vllm:num_requests_running{model_name="m"} 7
vllm:num_requests_running_total 99
vllm:gpu_cache_usage_perc{model_name="m"} 0.9
vllm:kv_cache_usage_perc{model_name="m"} 0.25
vllm:lora_requests_info{max_lora="4",running_lora_adapters="a, b",waiting_lora_adapters=""} 1.7e9
vllm:lora_requests_info{max_lora="4",running_lora_adapters="old",waiting_lora_adapters="x"} 1.6e9
vllm:cache_config_info{block_size="16",num_gpu_blocks="4096",other="a}b"} 1
"#;

    #[test]
    fn vllm_series_are_extracted() {
        let mapping = EngineMapping::builtin("vllm").unwrap();
        let e = extract(VLLM.as_bytes(), &mapping);
        assert_eq!(e.fields_found, 5, "{:?}", e.missing);
        let m = e.metrics;
        assert_eq!(m.waiting_queue_size, 3);
        assert_eq!(m.running_requests_size, 7);
        assert_eq!(
            m.kv_cache_usage, 0.25,
            "the current name wins over the legacy one"
        );
        assert_eq!(
            m.active_models,
            vec!["a", "b"],
            "the LoRA series with the highest value wins"
        );
        assert!(m.waiting_models.is_empty());
        assert_eq!(m.max_active_models, 4);
        assert_eq!((m.cache_block_size, m.cache_num_blocks), (16, 4096));
    }

    #[test]
    fn legacy_kv_name_and_timestamps() {
        let text = "vllm:gpu_cache_usage_perc 0.5\nvllm:num_requests_waiting 9 2000\nvllm:num_requests_waiting 4 1000\n";
        let e = extract(text.as_bytes(), &EngineMapping::builtin("vllm").unwrap());
        assert_eq!(e.metrics.kv_cache_usage, 0.5);
        assert_eq!(e.metrics.waiting_queue_size, 9, "highest timestamp wins");
        assert!(e.missing.contains(&"running"));
    }

    #[test]
    fn triton_label_selectors_pick_the_right_series() {
        let text = r#"nv_trt_llm_request_metrics{model="x",request_type="waiting"} 2
nv_trt_llm_request_metrics{model="x",request_type="scheduled"} 5
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="fraction"} 0.5
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="tokens_per"} 64
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="max"} 1000
"#;
        let e = extract(
            text.as_bytes(),
            &EngineMapping::builtin("triton-tensorrt-llm").unwrap(),
        );
        let m = e.metrics;
        assert_eq!((m.waiting_queue_size, m.running_requests_size), (2, 5));
        assert_eq!(m.kv_cache_usage, 0.5);
        assert_eq!((m.cache_block_size, m.cache_num_blocks), (64, 1000));
    }

    #[test]
    fn sglang_and_trtllm_mappings() {
        let s = "sglang:num_queue_reqs 1\nsglang:num_running_reqs 2\nsglang:token_usage 0.3\nsglang:cache_config_info{page_size=\"32\",num_pages=\"10\"} 1\n";
        let m = extract(s.as_bytes(), &EngineMapping::builtin("sglang").unwrap()).metrics;
        assert_eq!(
            (
                m.waiting_queue_size,
                m.running_requests_size,
                m.cache_block_size
            ),
            (1, 2, 32)
        );
        let t = "trtllm_num_requests_waiting 4\ntrtllm_kv_cache_utilization 0.7\ntrtllm_kv_cache_tokens_per_block 32\n";
        let m = extract(
            t.as_bytes(),
            &EngineMapping::builtin("trtllm-serve").unwrap(),
        )
        .metrics;
        assert_eq!(
            (m.waiting_queue_size, m.kv_cache_usage, m.cache_block_size),
            (4, 0.7, 32)
        );
        assert!(EngineMapping::builtin("unknown").is_none());
    }

    #[test]
    fn garbage_is_ignored_not_fatal() {
        let text = "vllm:num_requests_waiting{broken 1\nvllm:num_requests_waiting abc\nvllm:num_requests_running -5\n\n";
        let e = extract(text.as_bytes(), &EngineMapping::builtin("vllm").unwrap());
        assert_eq!(e.metrics.waiting_queue_size, 0);
        assert_eq!(
            e.metrics.running_requests_size, 0,
            "negative values clamp to zero"
        );
        assert_eq!(e.fields_found, 1);
    }
}
