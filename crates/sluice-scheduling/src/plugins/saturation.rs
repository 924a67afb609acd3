//! Saturation detectors, which are also filters: `utilization-detector` and
//! `concurrency-detector`. As filters they keep endpoints with capacity and fail open
//! (return every endpoint) when none has any, as upstream does.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::cycle::Cycle;
use crate::plugin::{Filter, Plugin, SaturationDetector, TypedName};
use crate::registry::PluginInit;
use crate::types::{Candidate, LlmRequest, PluginError};

/// Parses a Go duration string (`200ms`, `1.5s`, `1m30s`; units ns, us, µs, ms, s, m, h).
pub fn parse_go_duration(s: &str) -> Result<Duration, String> {
    let err = || {
        format!(
            "{s:?} is not a duration; expected a number with a unit such as \"200ms\" or \"2s\""
        )
    };
    let t = s.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    let mut rest = t;
    let mut total = 0f64;
    if rest.is_empty() {
        return Err(err());
    }
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(err)?;
        if num_len == 0 {
            return Err(err());
        }
        let n: f64 = rest[..num_len].parse().map_err(|_| err())?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(err()),
        };
        rest = &rest[unit_len..];
        total += n * scale;
    }
    Duration::try_from_secs_f64(total).map_err(|_| err())
}

fn de_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_go_duration(&s).map_err(serde::de::Error::custom)
}

/// `utilization-detector` parameters.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct UtilizationParams {
    /// Waiting requests at which an endpoint counts as full (default 5; > 0).
    pub queue_depth_threshold: f64,
    /// KV-cache utilisation at which an endpoint counts as full (default 0.8; in (0, 1]).
    pub kv_cache_util_threshold: f64,
    /// Metrics older than this make an endpoint count as full (default 200ms; > 0).
    #[serde(deserialize_with = "de_duration")]
    pub metrics_staleness_threshold: Duration,
    /// Slack above the thresholds the filter still accepts (default 0; ≥ 0).
    pub headroom: f64,
}

impl Default for UtilizationParams {
    fn default() -> Self {
        UtilizationParams {
            queue_depth_threshold: 5.0,
            kv_cache_util_threshold: 0.8,
            metrics_staleness_threshold: Duration::from_millis(200),
            headroom: 0.0,
        }
    }
}

impl UtilizationParams {
    fn validate(&self) -> Result<(), String> {
        if self.queue_depth_threshold.is_nan() || self.queue_depth_threshold <= 0.0 {
            return Err(format!(
                "queueDepthThreshold is {}; expected a number > 0",
                self.queue_depth_threshold
            ));
        }
        if !(self.kv_cache_util_threshold > 0.0 && self.kv_cache_util_threshold <= 1.0) {
            return Err(format!(
                "kvCacheUtilThreshold is {}; expected a number in (0, 1]",
                self.kv_cache_util_threshold
            ));
        }
        if self.metrics_staleness_threshold.is_zero() {
            return Err(
                "metricsStalenessThreshold is 0; expected a duration > 0 such as \"200ms\""
                    .to_owned(),
            );
        }
        if self.headroom.is_nan() || self.headroom < 0.0 {
            return Err(format!(
                "headroom is {}; expected a number ≥ 0",
                self.headroom
            ));
        }
        Ok(())
    }
}

/// Saturation from queue depth and KV-cache utilisation.
#[derive(Debug)]
pub struct UtilizationDetector {
    name: TypedName,
    params: UtilizationParams,
}

impl UtilizationDetector {
    /// A detector with these parameters.
    pub fn new(name: TypedName, params: UtilizationParams) -> Self {
        UtilizationDetector { name, params }
    }

    pub(crate) fn factory(init: &PluginInit<'_>) -> Result<Arc<dyn Plugin>, String> {
        let p: UtilizationParams = init.parse().map_err(|e| {
            format!("{e}; expected {{queueDepthThreshold: number, kvCacheUtilThreshold: number, metricsStalenessThreshold: duration, headroom: number}}")
        })?;
        p.validate()?;
        Ok(Arc::new(UtilizationDetector::new(
            init.typed_name.clone(),
            p,
        )))
    }

    fn endpoint_score(&self, c: &Candidate) -> f64 {
        match &c.metrics {
            Some(m) if c.metrics_age <= self.params.metrics_staleness_threshold => {
                (f64::from(m.waiting_queue_size) / self.params.queue_depth_threshold)
                    .max(m.kv_cache_usage / self.params.kv_cache_util_threshold)
            }
            _ => 1.0,
        }
    }
}

impl Plugin for UtilizationDetector {
    fn typed_name(&self) -> &TypedName {
        &self.name
    }
    fn as_filter(self: Arc<Self>) -> Option<Arc<dyn Filter>> {
        Some(self)
    }
    fn as_saturation_detector(self: Arc<Self>) -> Option<Arc<dyn SaturationDetector>> {
        Some(self)
    }
}

impl SaturationDetector for UtilizationDetector {
    fn saturation(&self, candidates: &[Candidate]) -> f64 {
        if candidates.is_empty() {
            return 1.0;
        }
        candidates
            .iter()
            .map(|c| self.endpoint_score(c))
            .sum::<f64>()
            / candidates.len() as f64
    }

    fn has_capacity(&self, c: &Candidate) -> bool {
        let p = &self.params;
        match &c.metrics {
            Some(m) if c.metrics_age <= p.metrics_staleness_threshold => {
                f64::from(m.waiting_queue_size) < p.queue_depth_threshold * (1.0 + p.headroom)
                    && m.kv_cache_usage < p.kv_cache_util_threshold * (1.0 + p.headroom)
            }
            _ => false,
        }
    }
}

fn fail_open_filter(
    d: &dyn SaturationDetector,
    candidates: &[Candidate],
    endpoints: &mut Vec<usize>,
) {
    if endpoints.iter().any(|&i| d.has_capacity(&candidates[i])) {
        endpoints.retain(|&i| d.has_capacity(&candidates[i]));
    }
}

impl Filter for UtilizationDetector {
    fn filter(
        &self,
        _: &mut Cycle,
        _: &LlmRequest,
        candidates: &[Candidate],
        endpoints: &mut Vec<usize>,
    ) -> Result<(), PluginError> {
        fail_open_filter(self, candidates, endpoints);
        Ok(())
    }
}

/// What a [`ConcurrencyDetector`] counts.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ConcurrencyMode {
    /// In-flight requests against `maxConcurrency`.
    #[default]
    Requests,
    /// In-flight tokens against `maxTokenConcurrency`.
    Tokens,
    /// Both; an endpoint is full when either is (llm-d-router).
    Hybrid,
}

/// `concurrency-detector` parameters.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ConcurrencyParams {
    /// `requests`, `tokens` or `hybrid` (default `requests`).
    pub concurrency_mode: ConcurrencyMode,
    /// In-flight requests per endpoint at capacity (default 100).
    pub max_concurrency: f64,
    /// In-flight tokens per endpoint at capacity (default 1000000).
    pub max_token_concurrency: f64,
    /// Slack above capacity the filter still accepts (default 0).
    pub headroom: f64,
}

impl Default for ConcurrencyParams {
    fn default() -> Self {
        ConcurrencyParams {
            concurrency_mode: ConcurrencyMode::Requests,
            max_concurrency: 100.0,
            max_token_concurrency: 1_000_000.0,
            headroom: 0.0,
        }
    }
}

/// Saturation from the picker's own in-flight counts.
#[derive(Debug)]
pub struct ConcurrencyDetector {
    name: TypedName,
    params: ConcurrencyParams,
}

impl ConcurrencyDetector {
    /// A detector with these parameters.
    pub fn new(name: TypedName, params: ConcurrencyParams) -> Self {
        ConcurrencyDetector { name, params }
    }

    pub(crate) fn factory(init: &PluginInit<'_>) -> Result<Arc<dyn Plugin>, String> {
        let p: ConcurrencyParams = init.parse().map_err(|e| {
            format!("{e}; expected {{concurrencyMode: requests|tokens|hybrid, maxConcurrency: number, maxTokenConcurrency: number, headroom: number}}")
        })?;
        if p.max_concurrency.is_nan() || p.max_concurrency <= 0.0 {
            return Err(format!(
                "maxConcurrency is {}; expected a number > 0",
                p.max_concurrency
            ));
        }
        if p.max_token_concurrency.is_nan() || p.max_token_concurrency <= 0.0 {
            return Err(format!(
                "maxTokenConcurrency is {}; expected a number > 0",
                p.max_token_concurrency
            ));
        }
        if p.headroom.is_nan() || p.headroom < 0.0 {
            return Err(format!("headroom is {}; expected a number ≥ 0", p.headroom));
        }
        Ok(Arc::new(ConcurrencyDetector::new(
            init.typed_name.clone(),
            p,
        )))
    }
}

impl Plugin for ConcurrencyDetector {
    fn typed_name(&self) -> &TypedName {
        &self.name
    }
    fn as_filter(self: Arc<Self>) -> Option<Arc<dyn Filter>> {
        Some(self)
    }
    fn as_saturation_detector(self: Arc<Self>) -> Option<Arc<dyn SaturationDetector>> {
        Some(self)
    }
}

impl SaturationDetector for ConcurrencyDetector {
    fn saturation(&self, candidates: &[Candidate]) -> f64 {
        if candidates.is_empty() {
            return 1.0;
        }
        let n = candidates.len() as f64;
        let req = candidates
            .iter()
            .map(|c| f64::from(c.in_flight.requests()))
            .sum::<f64>()
            / (n * self.params.max_concurrency);
        let tok = candidates
            .iter()
            .map(|c| c.in_flight.tokens() as f64)
            .sum::<f64>()
            / (n * self.params.max_token_concurrency);
        match self.params.concurrency_mode {
            ConcurrencyMode::Requests => req,
            ConcurrencyMode::Tokens => tok,
            ConcurrencyMode::Hybrid => req.max(tok),
        }
    }

    fn has_capacity(&self, c: &Candidate) -> bool {
        let p = &self.params;
        let req_ok = f64::from(c.in_flight.requests()) < p.max_concurrency * (1.0 + p.headroom);
        let tok_ok = (c.in_flight.tokens() as f64) < p.max_token_concurrency * (1.0 + p.headroom);
        match p.concurrency_mode {
            ConcurrencyMode::Requests => req_ok,
            ConcurrencyMode::Tokens => tok_ok,
            ConcurrencyMode::Hybrid => req_ok && tok_ok,
        }
    }
}

impl Filter for ConcurrencyDetector {
    fn filter(
        &self,
        _: &mut Cycle,
        _: &LlmRequest,
        candidates: &[Candidate],
        endpoints: &mut Vec<usize>,
    ) -> Result<(), PluginError> {
        fail_open_filter(self, candidates, endpoints);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("200ms"), Ok(Duration::from_millis(200)));
        assert_eq!(parse_go_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_go_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_go_duration("0"), Ok(Duration::ZERO));
        assert!(
            parse_go_duration("200")
                .unwrap_err()
                .contains("expected a number with a unit")
        );
        assert!(parse_go_duration("fast").is_err());
        assert!(parse_go_duration("").is_err());
    }
}
