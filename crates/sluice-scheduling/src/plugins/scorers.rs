//! Load and affinity scorers: `queue-scorer`, `running-requests-size-scorer`,
//! `kv-cache-utilization-scorer`, `lora-affinity-scorer`, `token-load-scorer`.

use std::sync::Arc;

use serde::Deserialize;

use crate::cycle::Cycle;
use crate::plugin::{Plugin, Scorer, ScorerCategory, TypedName};
use crate::registry::PluginInit;
use crate::types::{Candidate, LlmRequest, PluginError};

/// Which metric a [`MetricScorer`] scores.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MetricScorerKind {
    /// `queue-scorer`: min-max over waiting requests, fewer is better.
    Queue,
    /// `running-requests-size-scorer`: min-max over running requests, fewer is better.
    RunningRequests,
    /// `kv-cache-utilization-scorer`: `1 − KV usage`.
    KvCacheUtilization,
    /// `lora-affinity-scorer`: 1.0 adapter active, 0.8 room to load it, 0.6 already waiting,
    /// else 0.
    LoraAffinity,
    /// `token-load-scorer`: `1 − min(1, in-flight tokens / threshold)`.
    TokenLoad {
        /// `queueThresholdTokens`.
        threshold: f64,
    },
}

/// A scorer computed from endpoint metrics or in-flight counters alone.
#[derive(Debug)]
pub struct MetricScorer {
    name: TypedName,
    kind: MetricScorerKind,
}

/// `token-load-scorer` parameters.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct TokenLoadParams {
    /// In-flight tokens at which the score reaches 0 (default 4194304).
    pub queue_threshold_tokens: f64,
}

impl Default for TokenLoadParams {
    fn default() -> Self {
        TokenLoadParams {
            queue_threshold_tokens: 4_194_304.0,
        }
    }
}

/// Accepts no parameters (an empty object or none).
#[derive(Clone, Copy, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NoParams {}

impl MetricScorer {
    /// A scorer of this kind.
    pub fn new(name: TypedName, kind: MetricScorerKind) -> Self {
        MetricScorer { name, kind }
    }

    pub(crate) fn factory(
        kind: MetricScorerKind,
    ) -> impl Fn(&PluginInit<'_>) -> Result<Arc<dyn Plugin>, String> + Send + Sync {
        move |init| {
            let kind = match kind {
                MetricScorerKind::TokenLoad { .. } => {
                    let p: TokenLoadParams = init.parse().map_err(|e| {
                        format!("{e}; expected {{queueThresholdTokens: number > 0}}")
                    })?;
                    if !(p.queue_threshold_tokens > 0.0 && p.queue_threshold_tokens.is_finite()) {
                        return Err(format!(
                            "queueThresholdTokens is {}; expected a number > 0",
                            p.queue_threshold_tokens
                        ));
                    }
                    MetricScorerKind::TokenLoad {
                        threshold: p.queue_threshold_tokens,
                    }
                }
                k => {
                    let _: NoParams = init
                        .parse()
                        .map_err(|e| format!("{e}; this plugin takes no parameters"))?;
                    k
                }
            };
            Ok(Arc::new(MetricScorer::new(init.typed_name.clone(), kind)))
        }
    }
}

impl Plugin for MetricScorer {
    fn typed_name(&self) -> &TypedName {
        &self.name
    }
    fn as_scorer(self: Arc<Self>) -> Option<Arc<dyn Scorer>> {
        Some(self)
    }
}

/// `(max − v) / (max − min)`, 1.0 for all when every value is equal.
fn min_max_inverse(
    candidates: &[Candidate],
    endpoints: &[usize],
    out: &mut [f64],
    value: impl Fn(&Candidate) -> f64,
) {
    let (mut min, mut max) = (f64::INFINITY, f64::NEG_INFINITY);
    for &i in endpoints {
        let v = value(&candidates[i]);
        min = min.min(v);
        max = max.max(v);
    }
    let range = max - min;
    for (o, &i) in out.iter_mut().zip(endpoints) {
        *o = if range > 0.0 {
            (max - value(&candidates[i])) / range
        } else {
            1.0
        };
    }
}

impl Scorer for MetricScorer {
    fn category(&self) -> ScorerCategory {
        match self.kind {
            MetricScorerKind::LoraAffinity => ScorerCategory::Affinity,
            _ => ScorerCategory::Distribution,
        }
    }

    fn score(
        &self,
        _cycle: &mut Cycle,
        request: &LlmRequest,
        candidates: &[Candidate],
        endpoints: &[usize],
        out: &mut [f64],
    ) -> Result<(), PluginError> {
        match self.kind {
            MetricScorerKind::Queue => min_max_inverse(candidates, endpoints, out, |c| {
                f64::from(c.metrics_or_zero().waiting_queue_size)
            }),
            MetricScorerKind::RunningRequests => min_max_inverse(candidates, endpoints, out, |c| {
                f64::from(c.metrics_or_zero().running_requests_size)
            }),
            MetricScorerKind::KvCacheUtilization => {
                for (o, &i) in out.iter_mut().zip(endpoints) {
                    *o = 1.0 - candidates[i].metrics_or_zero().kv_cache_usage;
                }
            }
            MetricScorerKind::LoraAffinity => {
                let model = request.target_model.as_str();
                for (o, &i) in out.iter_mut().zip(endpoints) {
                    let m = candidates[i].metrics_or_zero();
                    *o = if m.active_models.iter().any(|a| a == model) {
                        1.0
                    } else if m.active_models.len() + m.waiting_models.len()
                        < m.max_active_models as usize
                    {
                        0.8
                    } else if m.waiting_models.iter().any(|a| a == model) {
                        0.6
                    } else {
                        0.0
                    };
                }
            }
            MetricScorerKind::TokenLoad { threshold } => {
                for (o, &i) in out.iter_mut().zip(endpoints) {
                    let load = candidates[i].in_flight.tokens() as f64;
                    *o = 1.0 - (load / threshold).min(1.0);
                }
            }
        }
        Ok(())
    }
}
