//! `predicted-latency-scorer` (alias `slo-aware-routing`): scores endpoints by predicted
//! headroom against the request's SLOs, sheds sheddable requests no endpoint can serve in
//! time, and — as PreRequest and response hooks — tracks running requests and turns served
//! requests into training samples.
//!
//! Per request (seeds 000/002/004, reference §3.3, §6, §9):
//!
//! 1. Features per candidate (KV usage, prompt tokens, waiting, this picker's in-flight
//!    requests and uncached prompt tokens, the prefix-cache score the prefix producer wrote
//!    before any profile ran, role and hardware class) and **one** batch prediction. A TPOT
//!    prediction is raised to the step length the endpoint is streaming at right now when
//!    the model says less (`apply_observed_step_floor`, a sluice addition).
//! 2. `headroom = SLO − prediction`. TTFT is valid when `pred < SLO` (no TTFT header ⇒ never
//!    valid, so the lowest predicted latency wins). TPOT is checked against
//!    `min(SLO, tightest TPOT SLO already running there) × sloBufferFactor`, so a new
//!    request does not push a pod past what its running requests were promised; no TPOT SLO
//!    anywhere, no TPOT model yet, or a prefill-role pod ⇒ TPOT is not constrained.
//! 3. Valid endpoints get weights 2..=101 by `headroomSelectionStrategy`; invalid ones get
//!    `invalidWeightFraction` (1 %) of the mean valid weight, so the weighted random picker
//!    still explores them about 1 % as often as a valid one.
//! 4. No valid endpoint: a sheddable request (priority < 0) with a TTFT SLO is shed (429)
//!    with the reason, unless an endpoint is idle (nothing running, waiting or in flight),
//!    where it then goes, as upstream's admitter allows; any other request goes to the
//!    endpoint with the least negative headroom (upstream's order: only TPOT short, then
//!    only TTFT short, then both). A request with no SLO at all is drawn instead with
//!    upstream's weights (1..=101 by shortfall, i.e. by predicted latency), so such
//!    requests do not herd onto the one fastest endpoint.
//! 5. No prediction (no model yet, predictor error, or a remote predictor that cannot answer
//!    synchronously) ⇒ composite score `(wkv·(1−kv) + wq·relQueue + wp·prefix)` — never a
//!    failure — and the best score wins (ties, at upstream's 0.01 rounding, drawn at
//!    random), as in the default profile. Training continues from that traffic, which is
//!    how the first model appears. Upstream draws at random weighted by the composite
//!    score instead: at low load every endpoint scores near 1, so a cold picker gives a
//!    slow endpoint of a heterogeneous pool its full share until its first model, and that
//!    endpoint's backlog outlives the cold start by minutes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use sluice_core::endpoint::HARDWARE_CLASS_LABEL;
use sluice_predictor::{Features, LatencyPredictor, LatencyTracker, PodRole, Prediction};

use super::SloServices;
use super::headers::Slo;
use super::metrics::SloLabels;
use super::running::RunningRequests;
use crate::cycle::{Clock, Cycle, keys};
use crate::plugin::{
    EndpointAware, Plugin, PreRequest, ResponseHooks, Scorer, ScorerCategory, TypedName,
};
use crate::plugins::prefix::PrefixMatchInfo;
use crate::registry::PluginInit;
use crate::types::{Candidate, LlmRequest, Outcome, PluginError, ResponseChunk, SchedulingResult};

/// How valid endpoints are weighted.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum HeadroomStrategy {
    /// The least positive headroom weighs most: packs endpoints tightly (default).
    #[default]
    Least,
    /// The most headroom weighs most: spreads load, leaves room for spikes.
    Most,
    /// Among valid endpoints, the lowest composite score weighs most.
    CompositeLeast,
    /// Among valid endpoints, the highest composite score weighs most.
    CompositeMost,
    /// Ignore predictions: composite score over every endpoint (training continues).
    CompositeOnly,
}

/// Parameters, with upstream's names and defaults (`headroomTTFTWeight` etc. are accepted
/// as aliases of the current names).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ScorerParams {
    /// See [`HeadroomStrategy`].
    pub headroom_selection_strategy: HeadroomStrategy,
    /// Share of TTFT in the headroom blend.
    #[serde(alias = "headroomTTFTWeight", alias = "ttftWeight")]
    pub ttft_weight: f64,
    /// Share of TPOT in the headroom blend.
    #[serde(alias = "headroomTPOTWeight", alias = "tpotWeight")]
    pub tpot_weight: f64,
    /// Composite: weight of free KV cache.
    #[serde(rename = "compositeKVWeight")]
    pub composite_kv_weight: f64,
    /// Composite: weight of a short queue.
    pub composite_queue_weight: f64,
    /// Composite: weight of the prefix-cache score.
    pub composite_prefix_weight: f64,
    /// Multiplies the TPOT SLO (> 0).
    pub slo_buffer_factor: f64,
    /// An invalid endpoint's weight as a fraction of the mean valid weight (0..=1).
    pub invalid_weight_fraction: f64,
    /// How long a running-request entry may live without a completion (e.g. `5m`, `300s`).
    #[serde(rename = "contextTTL")]
    pub context_ttl: String,
    /// Pod label whose value (`prefill`/`decode`) is the endpoint's role; empty = none.
    pub endpoint_role_label: String,
    /// Pod label naming the endpoint's hardware/engine class.
    pub hardware_class_label: String,
}

impl Default for ScorerParams {
    fn default() -> Self {
        ScorerParams {
            headroom_selection_strategy: HeadroomStrategy::Least,
            ttft_weight: 0.8,
            tpot_weight: 0.2,
            composite_kv_weight: 1.0,
            composite_queue_weight: 1.0,
            composite_prefix_weight: 1.0,
            slo_buffer_factor: 1.0,
            invalid_weight_fraction: 0.01,
            context_ttl: "5m".into(),
            endpoint_role_label: String::new(),
            hardware_class_label: HARDWARE_CLASS_LABEL.into(),
        }
    }
}

fn parse_ttl(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .map_or((s, "s"), |i| s.split_at(i));
    let v: f64 = num.parse().map_err(|_| {
        format!("contextTTL {s:?} is not a duration; expected e.g. \"5m\", \"300s\"")
    })?;
    let secs = match unit {
        "ms" => v / 1e3,
        "s" => v,
        "m" => v * 60.0,
        "h" => v * 3600.0,
        _ => {
            return Err(format!(
                "contextTTL {s:?} has unit {unit:?}; expected ms, s, m or h"
            ));
        }
    };
    if !(secs.is_finite() && secs > 0.0 && secs <= 86_400.0) {
        return Err(format!(
            "contextTTL {s:?} is out of range; expected a duration > 0 and ≤ 24h"
        ));
    }
    Ok(Duration::from_secs_f64(secs))
}

impl ScorerParams {
    fn validate(&self) -> Result<Duration, String> {
        let fin = |v: f64| v.is_finite() && v >= 0.0;
        if !fin(self.ttft_weight) || !fin(self.tpot_weight) {
            return Err(format!(
                "ttftWeight {} / tpotWeight {} are invalid; expected finite numbers ≥ 0",
                self.ttft_weight, self.tpot_weight
            ));
        }
        if !fin(self.composite_kv_weight)
            || !fin(self.composite_queue_weight)
            || !fin(self.composite_prefix_weight)
        {
            return Err("composite weights must be finite numbers ≥ 0".into());
        }
        if !(self.slo_buffer_factor.is_finite() && self.slo_buffer_factor > 0.0) {
            return Err(format!(
                "sloBufferFactor is {}; expected a number > 0",
                self.slo_buffer_factor
            ));
        }
        if !(0.0..=1.0).contains(&self.invalid_weight_fraction) {
            return Err(format!(
                "invalidWeightFraction is {}; expected a number in [0, 1]",
                self.invalid_weight_fraction
            ));
        }
        parse_ttl(&self.context_ttl)
    }
}

/// How the scorer decided for this request.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// At least one endpoint is predicted to meet the SLOs.
    Valid {
        /// How many.
        valid: usize,
    },
    /// None is; the request goes to the least negative headroom.
    LeastNegative,
    /// None is and the request is sheddable, but an endpoint is idle: it goes there (the
    /// least negative of the idle ones) instead of being shed.
    IdleInsteadOfShed,
    /// No prediction; composite score. The reason is for logs.
    Fallback(String),
    /// `composite-only` strategy.
    CompositeOnly,
}

/// What the scorer found for one endpoint.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EndpointPrediction {
    /// Index into the candidate slice.
    pub candidate: usize,
    /// The features predicted from (kept for the training sample if it is chosen).
    pub features: Features,
    /// The prediction, when there is one.
    pub prediction: Option<Prediction>,
    /// `TTFT SLO − predicted TTFT`, ms.
    pub ttft_headroom_ms: f64,
    /// `TPOT bound − predicted TPOT`, ms (0 when TPOT is not constrained).
    pub tpot_headroom_ms: f64,
    /// Predicted to meet both SLOs.
    pub valid: bool,
    /// The weight given to the picker, before scaling into [0, 1].
    pub weight: f64,
}

/// Cycle-state key of [`DeferredPrediction`].
pub const DEFERRED_PREDICTION_KEY: &str = "predicted-latency/deferred";

/// Left in the cycle state when the predictor could not answer synchronously (the remote
/// predictor): the scorer fell back to the composite score, and the caller may await
/// `predictor` on `features`, put the answers in [`LlmRequest::prefetched_predictions`] and
/// schedule again. Scheduling itself never waits on I/O.
#[derive(Clone, Debug)]
pub struct DeferredPrediction {
    /// The predictor to ask.
    pub predictor: Arc<dyn LatencyPredictor>,
    /// The endpoints, in the order of `features`.
    pub endpoints: Vec<sluice_core::EndpointKey>,
    /// One row per endpoint.
    pub features: Vec<Features>,
}

/// Predictions fetched before scheduling (from a predictor that answers asynchronously),
/// by endpoint.
#[derive(Clone, Debug, Default)]
pub struct PrefetchedPredictions {
    /// One prediction per endpoint.
    pub by_endpoint: Vec<(sluice_core::EndpointKey, Prediction)>,
}

impl PrefetchedPredictions {
    /// Pairs the endpoints of a [`DeferredPrediction`] with the predictor's answers.
    pub fn new(endpoints: Vec<sluice_core::EndpointKey>, predictions: Vec<Prediction>) -> Self {
        PrefetchedPredictions {
            by_endpoint: endpoints.into_iter().zip(predictions).collect(),
        }
    }

    fn get(&self, key: &sluice_core::EndpointKey) -> Option<Prediction> {
        self.by_endpoint
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, p)| *p)
    }
}

/// The scorer's per-request record, in the cycle state under [`PredictedLatencyScorer::state_key`].
#[derive(Clone, Debug)]
pub struct SloCycleState {
    /// The request's SLOs.
    pub slo: Slo,
    /// What the scorer did.
    pub decision: Decision,
    /// Per scored endpoint.
    pub endpoints: Vec<EndpointPrediction>,
    /// Wall time of the batch prediction.
    pub prediction_time: Duration,
}

/// What the response hooks need, from PreRequest to completion.
#[derive(Debug)]
struct Tracking {
    id: u64,
    dispatched_at: Instant,
    tracker: LatencyTracker,
    features: Features,
    slo: Slo,
    labels: SloLabels,
    /// Envoy reported another endpoint than the pick as the one that served the request.
    served_elsewhere: bool,
    /// Its first response chunk has arrived.
    started: bool,
}

/// The scorer plugin.
#[derive(Debug)]
pub struct PredictedLatencyScorer {
    name: TypedName,
    params: ScorerParams,
    services: Arc<SloServices>,
    running: Arc<RunningRequests>,
    clock: Arc<dyn Clock>,
    state_key: String,
    tracking_key: String,
}

const EPS: f64 = 1e-9;

impl PredictedLatencyScorer {
    /// A scorer over shared services and running-request queues.
    pub fn new(
        name: TypedName,
        params: ScorerParams,
        services: Arc<SloServices>,
        running: Arc<RunningRequests>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        let state_key = format!("predicted-latency/{}", name.name);
        let tracking_key = format!("predicted-latency-tracking/{}", name.name);
        PredictedLatencyScorer {
            name,
            params,
            services,
            running,
            clock,
            state_key,
            tracking_key,
        }
    }

    pub(crate) fn factory(init: &PluginInit<'_>) -> Result<Arc<dyn Plugin>, String> {
        let p: ScorerParams = init.parse().map_err(|e| {
            format!("{e}; expected {{headroomSelectionStrategy: least|most|composite-least|composite-most|composite-only, ttftWeight, tpotWeight, compositeKVWeight, compositeQueueWeight, compositePrefixWeight, sloBufferFactor, invalidWeightFraction, contextTTL, endpointRoleLabel, hardwareClassLabel}}")
        })?;
        let ttl = p.validate()?;
        let services = SloServices::from_shared(&init.env.shared);
        // Kept across scheduler rebuilds, so a config change does not forget what runs where.
        let running = init.env.shared.get_or_insert_with(
            &format!("predicted-latency-running/{}", init.typed_name.name),
            || RunningRequests::new(ttl),
        );
        Ok(Arc::new(PredictedLatencyScorer::new(
            init.typed_name.clone(),
            p,
            services,
            running,
            init.env.clock.clone(),
        )))
    }

    /// The cycle-state key of this instance's [`SloCycleState`].
    pub fn state_key(&self) -> &str {
        &self.state_key
    }

    /// The running-request queues this scorer keeps.
    pub fn running(&self) -> &Arc<RunningRequests> {
        &self.running
    }

    fn features(
        &self,
        request: &LlmRequest,
        c: &Candidate,
        prefix_score: f64,
        exclude: Option<u64>,
    ) -> Features {
        let m = c.metrics_or_zero();
        let labels = &c.endpoint.labels;
        let role = if self.params.endpoint_role_label.is_empty() {
            PodRole::Both
        } else {
            PodRole::from_label(
                labels
                    .get(&self.params.endpoint_role_label)
                    .map(String::as_str),
            )
        };
        let mut running = c.in_flight.requests();
        let mut prefilling = c.in_flight.prefill_requests();
        let mut tokens = c.in_flight.prefill_tokens();
        // At PreRequest the scheduler has already counted this request in flight; the
        // features must describe the endpoint as the request found it.
        if let Some(own) = exclude {
            running = running.saturating_sub(1);
            prefilling = prefilling.saturating_sub(1);
            tokens = tokens.saturating_sub(own);
        }
        let phase = c.in_flight.step_phase(self.clock.now());
        Features {
            step_ms: phase.map_or(0.0, |p| p.step.as_secs_f64() * 1e3),
            since_step_ms: phase.map_or(0.0, |p| p.since_step.as_secs_f64() * 1e3),
            mean_step_ms: phase.map_or(0.0, |p| p.mean_step.as_secs_f64() * 1e3),
            prompt_token_rate: phase.map_or(0.0, |p| p.prompt_token_rate),
            kv_cache_usage: m.kv_cache_usage,
            input_tokens: request.prompt_tokens,
            waiting: m.waiting_queue_size,
            running,
            prefix_cache_score: prefix_score,
            prefill_tokens_in_flight: u32::try_from(tokens).unwrap_or(u32::MAX),
            prefill_requests_in_flight: prefilling,
            tokens_generated: 0,
            role,
            streamed: request.stream,
            class: self.services.classes().class_of(
                labels
                    .get(&self.params.hardware_class_label)
                    .map(String::as_str),
            ),
        }
        .sanitised()
    }

    /// Composite score in [0, 1] per endpoint (reference §6).
    fn composite(
        &self,
        candidates: &[Candidate],
        endpoints: &[usize],
        prefix: &[f64],
        out: &mut [f64],
    ) {
        let (mut wkv, mut wq, mut wp) = (
            self.params.composite_kv_weight,
            self.params.composite_queue_weight,
            self.params.composite_prefix_weight,
        );
        let sum = wkv + wq + wp;
        if sum <= 0.0 {
            (wkv, wq, wp) = (1.0, 0.0, 0.0);
        } else {
            (wkv, wq, wp) = (wkv / sum, wq / sum, wp / sum);
        }
        let max_q = endpoints
            .iter()
            .map(|&i| candidates[i].metrics_or_zero().waiting_queue_size)
            .max()
            .unwrap_or(0);
        for (k, &i) in endpoints.iter().enumerate() {
            let m = candidates[i].metrics_or_zero();
            let rel_q = if max_q > 0 {
                f64::from(max_q - m.waiting_queue_size.min(max_q)) / f64::from(max_q)
            } else {
                1.0
            };
            let c = wkv * (1.0 - m.kv_cache_usage.clamp(0.0, 1.0)) + wq * rel_q + wp * prefix[k];
            out[k] = c.clamp(0.0, 1.0);
        }
    }

    fn blend(&self) -> (f64, f64) {
        let (a, b) = (self.params.ttft_weight, self.params.tpot_weight);
        if a + b <= 0.0 {
            (1.0, 0.0)
        } else {
            (a / (a + b), b / (a + b))
        }
    }
}

impl Plugin for PredictedLatencyScorer {
    fn typed_name(&self) -> &TypedName {
        &self.name
    }
    fn as_scorer(self: Arc<Self>) -> Option<Arc<dyn Scorer>> {
        Some(self)
    }
    fn as_pre_request(self: Arc<Self>) -> Option<Arc<dyn PreRequest>> {
        Some(self)
    }
    fn as_response_hooks(self: Arc<Self>) -> Option<Arc<dyn ResponseHooks>> {
        Some(self)
    }
    fn as_endpoint_aware(self: Arc<Self>) -> Option<Arc<dyn EndpointAware>> {
        Some(self)
    }
}

/// A TPOT prediction never below the step length the endpoint is producing tokens at right
/// now. Every sequence in a batch gets one token per engine step, so a request joining an
/// endpoint that is decoding at 60 ms per step gets about 60 ms per token, whatever the
/// model says. The model learns from outcomes that arrive seconds after the decisions, so
/// under a sudden overload it under-predicts, and `least` then keeps packing the endpoint
/// that is already missing its SLOs (bench-slo past saturation: p90 coverage fell to
/// 40–70 %). The chunk rhythm shows the overload within a few steps. Only while the
/// endpoint is streaming: an idle endpoint's last rhythm says nothing about its next.
///
/// Returns whether the floor raised the prediction.
fn apply_observed_step_floor(p: &mut Prediction, f: &Features) -> bool {
    let decoding = f.running > f.prefill_requests_in_flight;
    let streaming_now = f.mean_step_ms > 0.0 && f.since_step_ms < 4.0 * f.mean_step_ms;
    match &mut p.tpot_ms {
        Some(t) if decoding && streaming_now && *t < f.mean_step_ms => {
            *t = f.mean_step_ms;
            true
        }
        _ => false,
    }
}

/// Raises a TTFT prediction to the time this picker's oldest request of the same response
/// mode has been waiting on the endpoint for its first chunk, once that is longer than the
/// request's TTFT SLO (always for a request without one). The model learns from outcomes,
/// and a stalled endpoint produces none until it recovers: in the real-time demo an L4
/// flooded during the cold start kept drawing requests for seconds while its first ones
/// waited 30 s and more. An engine admits its queue in order, so the head's wait is what
/// the endpoint delivers now, roughly: a chunked-prefill engine admits short prompts beside
/// a long one, so below the SLO the head's age (often a long prompt's own prefill) would
/// only blur the model's answer; above it, it says the endpoint cannot meet the SLO now.
/// For a non-streamed request the "first chunk" is the whole response, and so is its TTFT.
///
/// Returns whether the floor raised the prediction.
fn apply_waiting_age_floor(p: &mut Prediction, oldest_waiting: Duration, slo: &Slo) -> bool {
    let age_ms = oldest_waiting.as_secs_f64() * 1e3;
    if slo.has_ttft() && age_ms <= slo.ttft_ms {
        return false;
    }
    if p.ttft_ms < age_ms {
        p.ttft_ms = age_ms;
        true
    } else {
        false
    }
}

/// Min–max normalised `|v|`, 0.5 for all when the range is empty.
fn norm(v: f64, min: f64, max: f64) -> f64 {
    if max - min > EPS {
        (v - min) / (max - min)
    } else {
        0.5
    }
}

fn range(it: impl Iterator<Item = f64>) -> (f64, f64) {
    it.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    })
}

impl Scorer for PredictedLatencyScorer {
    fn category(&self) -> ScorerCategory {
        ScorerCategory::Balance
    }

    fn score(
        &self,
        cycle: &mut Cycle,
        request: &LlmRequest,
        candidates: &[Candidate],
        endpoints: &[usize],
        out: &mut [f64],
    ) -> Result<(), PluginError> {
        let slo = Slo::from_request(request);
        let prefix_info = cycle
            .state
            .get::<PrefixMatchInfo>(keys::PREFIX_CACHE_MATCH_INFO);
        let prefix: Vec<f64> = endpoints
            .iter()
            .map(|&i| prefix_info.map_or(0.0, |p| p.score(i)))
            .collect();
        let features: Vec<Features> = endpoints
            .iter()
            .zip(&prefix)
            .map(|(&i, &p)| self.features(request, &candidates[i], p, None))
            .collect();
        let mut state = SloCycleState {
            slo,
            decision: Decision::CompositeOnly,
            endpoints: endpoints
                .iter()
                .zip(&features)
                .map(|(&candidate, &features)| EndpointPrediction {
                    candidate,
                    features,
                    prediction: None,
                    ttft_headroom_ms: 0.0,
                    tpot_headroom_ms: 0.0,
                    valid: false,
                    weight: 0.0,
                })
                .collect(),
            prediction_time: Duration::ZERO,
        };
        let strategy = self.params.headroom_selection_strategy;
        let predictions = if strategy == HeadroomStrategy::CompositeOnly {
            None
        } else {
            let started = Instant::now();
            // Answers fetched before the cycle took no time here; their duration is the
            // remote call's, which this metric does not see.
            let prefetched = request.prefetched_predictions.is_some();
            let answer = match self.services.predictor() {
                Some(p) if p.is_synchronous() => p.predict_batch(&features).try_now(),
                // An asynchronous predictor: use the answers fetched for this request if
                // there are any for every endpoint, else ask the caller to fetch them.
                Some(p) => match &request.prefetched_predictions {
                    Some(pre) => endpoints
                        .iter()
                        .map(|&i| pre.get(&candidates[i].endpoint.key))
                        .collect::<Option<Vec<_>>>()
                        .map(Ok),
                    None => {
                        cycle.state.insert(
                            DEFERRED_PREDICTION_KEY.to_owned(),
                            DeferredPrediction {
                                predictor: Arc::clone(p),
                                endpoints: endpoints
                                    .iter()
                                    .map(|&i| candidates[i].endpoint.key.clone())
                                    .collect(),
                                features: features.clone(),
                            },
                        );
                        None
                    }
                },
                None => None,
            };
            state.prediction_time = started.elapsed();
            match answer {
                Some(Ok(p)) if p.len() == features.len() => {
                    if !prefetched {
                        self.services.metrics().observe_prediction_duration(
                            &SloLabels::for_request(request),
                            state.prediction_time.as_secs_f64(),
                        );
                    }
                    Some(p)
                }
                Some(Ok(p)) => {
                    state.decision = Decision::Fallback(format!(
                        "predictor returned {} rows for {} endpoints",
                        p.len(),
                        features.len()
                    ));
                    None
                }
                Some(Err(e)) => {
                    state.decision = Decision::Fallback(e.to_string());
                    None
                }
                None => {
                    state.decision = Decision::Fallback(
                        "latency predictor cannot answer synchronously or is not available".into(),
                    );
                    None
                }
            }
        };
        let Some(predictions) = predictions else {
            self.composite(candidates, endpoints, &prefix, out);
            // `composite-only` asked for upstream's weighted draw; a fallback takes the best.
            if !matches!(state.decision, Decision::CompositeOnly) {
                let rounded = |c: f64| (c * 100.0).round();
                let best = out.iter().map(|&c| rounded(c)).fold(0.0, f64::max);
                for o in out.iter_mut() {
                    *o = if rounded(*o) >= best { 1.0 } else { 0.0 };
                }
            }
            for (e, o) in state.endpoints.iter_mut().zip(out.iter()) {
                e.weight = *o;
            }
            tracing::trace!(decision = ?state.decision, "predicted-latency scorer fell back to the composite score");
            cycle.state.insert(self.state_key.clone(), state);
            return Ok(());
        };

        // Headroom and validity.
        let mut queue = Vec::with_capacity(endpoints.len());
        self.running.snapshot(
            endpoints.iter().map(|&i| &candidates[i].endpoint.key),
            request.stream,
            self.clock.now(),
            &mut queue,
        );
        let buf = self.params.slo_buffer_factor;
        for ((e, p), view) in state.endpoints.iter_mut().zip(&predictions).zip(&queue) {
            let pod_min_tpot = view.min_tpot_slo_ms;
            let mut p = *p;
            if apply_observed_step_floor(&mut p, &e.features) {
                self.services.metrics().tpot_floored.inc();
            }
            if apply_waiting_age_floor(&mut p, view.oldest_waiting, &slo) {
                self.services.metrics().ttft_floored.inc();
            }
            e.prediction = Some(p);
            e.ttft_headroom_ms = slo.ttft_ms - p.ttft_ms;
            let ttft_valid = p.ttft_ms < slo.ttft_ms;
            let bound = match (slo.tpot_ms > 0.0, pod_min_tpot > 0.0) {
                (true, true) => slo.tpot_ms.min(pod_min_tpot) * buf,
                (true, false) => slo.tpot_ms * buf,
                (false, true) => pod_min_tpot * buf,
                (false, false) => 0.0,
            };
            let (tpot_valid, tpot_headroom) = match p.tpot_ms {
                Some(t) if bound > 0.0 && e.features.role != PodRole::Prefill => {
                    (t < bound, bound - t)
                }
                _ => (true, 0.0),
            };
            e.tpot_headroom_ms = tpot_headroom;
            e.valid = ttft_valid && tpot_valid;
        }
        let (a, b) = self.blend();
        let n_valid = state.endpoints.iter().filter(|e| e.valid).count();
        if n_valid > 0 {
            let valid = || state.endpoints.iter().filter(|e| e.valid);
            let (min_t, max_t) = range(valid().map(|e| e.ttft_headroom_ms));
            let (min_p, max_p) = range(valid().map(|e| e.tpot_headroom_ms));
            let (a, b) = match (max_t - min_t > EPS, max_p - min_p > EPS) {
                (false, true) => (0.0, 1.0),
                (true, false) => (1.0, 0.0),
                _ => (a, b),
            };
            let mut composite = vec![0.0; endpoints.len()];
            if matches!(
                strategy,
                HeadroomStrategy::CompositeLeast | HeadroomStrategy::CompositeMost
            ) {
                self.composite(candidates, endpoints, &prefix, &mut composite);
            }
            let mut sum = 0.0;
            for (k, e) in state.endpoints.iter_mut().enumerate() {
                if !e.valid {
                    continue;
                }
                let c = a * norm(e.ttft_headroom_ms, min_t, max_t)
                    + b * norm(e.tpot_headroom_ms, min_p, max_p);
                e.weight = match strategy {
                    HeadroomStrategy::Least => ((1.0 - c) * 99.0).floor() + 2.0,
                    HeadroomStrategy::Most => (c * 99.0).floor() + 2.0,
                    HeadroomStrategy::CompositeMost => (1.0 + 99.0 * composite[k]).round() + 1.0,
                    HeadroomStrategy::CompositeLeast | HeadroomStrategy::CompositeOnly => {
                        101.0 - (1.0 + 99.0 * composite[k]).round() + 1.0
                    }
                };
                sum += e.weight;
            }
            let invalid_weight = self.params.invalid_weight_fraction * sum / n_valid as f64;
            for (e, o) in state.endpoints.iter_mut().zip(out.iter_mut()) {
                if !e.valid {
                    e.weight = invalid_weight;
                }
                *o = e.weight / 102.0;
            }
            state.decision = Decision::Valid { valid: n_valid };
        } else {
            // An endpoint with nothing running, waiting or in flight from this picker.
            let idle = |e: &EndpointPrediction| {
                let c = &candidates[e.candidate];
                let m = c.metrics_or_zero();
                m.running_requests_size == 0
                    && m.waiting_queue_size == 0
                    && c.in_flight.requests() == 0
            };
            let sheddable = request.priority < 0 && slo.has_ttft();
            // Upstream's admitter keeps a sheddable request when an endpoint is idle: serving
            // it there costs nobody anything, and it keeps samples coming in from idle
            // endpoints, so a model that has turned pessimistic can still learn its way back
            // (with everything shed it never would).
            let idle_only = sheddable && state.endpoints.iter().any(idle);
            if sheddable && !idle_only {
                let best = state
                    .endpoints
                    .iter()
                    .filter_map(|e| e.prediction.map(|p| (e.candidate, p.ttft_ms)))
                    .min_by(|x, y| x.1.total_cmp(&y.1));
                let detail = best.map_or(String::new(), |(i, t)| {
                    format!(
                        "; the best predicted TTFT is {t:.0} ms on {}",
                        candidates[i].endpoint.key
                    )
                });
                return Err(PluginError::Shed(format!(
                    "no endpoint is predicted to meet the request's SLOs (TTFT {} ms, TPOT {} ms) and the request is sheddable (priority {}){detail}",
                    slo.ttft_ms, slo.tpot_ms, request.priority
                )));
            }
            // Upstream's order: only TPOT short, then only TTFT short, then both.
            let class =
                |e: &EndpointPrediction| match (e.ttft_headroom_ms < 0.0, e.tpot_headroom_ms < 0.0)
                {
                    (false, _) => 0,
                    (true, false) => 1,
                    (true, true) => 2,
                };
            let eligible = |e: &EndpointPrediction| !idle_only || idle(e);
            let best_class = state
                .endpoints
                .iter()
                .filter(|e| eligible(e))
                .map(class)
                .min()
                .unwrap_or(0);
            let in_class = || {
                state
                    .endpoints
                    .iter()
                    .filter(|e| eligible(e) && class(e) == best_class)
            };
            // Only shortfalls count: a pod that meets TTFT but misses TPOT is judged by
            // how far it misses TPOT, not by how much TTFT room it has.
            let short = |h: f64| (-h).max(0.0);
            let (min_t, max_t) = range(in_class().map(|e| short(e.ttft_headroom_ms)));
            let (min_p, max_p) = range(in_class().map(|e| short(e.tpot_headroom_ms)));
            // As in upstream's scoreBucket (and the valid branch above): a dimension with
            // no spread gives the other all the weight, so that the draw spans 1..=101
            // (with a constant 0.5 term, the worst endpoint would keep a tenth of the best
            // one's weight instead of a hundredth).
            let (a, b) = match (max_t - min_t > EPS, max_p - min_p > EPS) {
                (false, true) => (0.0, 1.0),
                (true, false) => (1.0, 0.0),
                _ => (a, b),
            };
            let deficit = |e: &EndpointPrediction| {
                a * norm(short(e.ttft_headroom_ms), min_t, max_t)
                    + b * norm(short(e.tpot_headroom_ms), min_p, max_p)
            };
            let best = in_class().map(deficit).fold(f64::INFINITY, f64::min);
            // A request without any SLO is not "missing" one: it wants the lowest predicted
            // latency, and always sending it to the one lowest would herd every such
            // request onto one endpoint until its in-flight count moved the prediction.
            // Upstream's weights instead: 1..=101 by shortfall, drawn at random.
            let spread = !slo.has_ttft() && slo.tpot_ms <= 0.0;
            for (e, o) in state.endpoints.iter_mut().zip(out.iter_mut()) {
                let in_bucket = eligible(e) && class(e) == best_class;
                e.weight = if !in_bucket {
                    0.0
                } else if spread {
                    ((1.0 - deficit(e)) * 100.0).floor() + 1.0
                } else if (deficit(e) - best).abs() <= EPS {
                    1.0
                } else {
                    0.0
                };
                *o = if spread { e.weight / 101.0 } else { e.weight };
            }
            state.decision = if idle_only {
                Decision::IdleInsteadOfShed
            } else {
                Decision::LeastNegative
            };
        }
        if tracing::enabled!(tracing::Level::DEBUG) {
            for e in &state.endpoints {
                let c = &candidates[e.candidate];
                let m = c.metrics_or_zero();
                tracing::debug!(
                    endpoint = %c.endpoint.key,
                    decision = ?state.decision,
                    slo_ttft_ms = slo.ttft_ms,
                    slo_tpot_ms = slo.tpot_ms,
                    streamed = e.features.streamed,
                    ttft_ms = e.prediction.map(|p| p.ttft_ms),
                    tpot_ms = e.prediction.and_then(|p| p.tpot_ms),
                    valid = e.valid,
                    weight = e.weight,
                    waiting = m.waiting_queue_size,
                    running = m.running_requests_size,
                    kv = m.kv_cache_usage,
                    in_flight = c.in_flight.requests(),
                    "predicted-latency scorer: endpoint"
                );
            }
        }
        cycle.state.insert(self.state_key.clone(), state);
        Ok(())
    }
}

impl PreRequest for PredictedLatencyScorer {
    fn pre_request(&self, cycle: &mut Cycle, request: &LlmRequest, result: &SchedulingResult) {
        let Some(target) = result.targets.first() else {
            return;
        };
        let target_index = result.primary().and_then(|r| r.targets.first().copied());
        let slo = Slo::from_request(request);
        let state = cycle.state.get::<SloCycleState>(&self.state_key);
        let known = state.and_then(|s| {
            s.endpoints
                .iter()
                .find(|e| Some(e.candidate) == target_index)
                .copied()
        });
        let labels = SloLabels::for_request(request);
        let features = match known {
            Some(e) => {
                if let Some(p) = e.prediction {
                    self.services
                        .metrics()
                        .observe_predicted(&labels, p.ttft_ms, p.tpot_ms);
                }
                e.features
            }
            None => {
                // This scorer was not in the primary profile (opt-out, fallback profile):
                // still learn from the request, with the target's features as they were.
                let prefix = match (
                    cycle
                        .state
                        .get::<PrefixMatchInfo>(keys::PREFIX_CACHE_MATCH_INFO),
                    target_index,
                ) {
                    (Some(p), Some(i)) => p.score(i),
                    _ => 0.0,
                };
                let own = u64::from(request.prompt_tokens)
                    - (f64::from(request.prompt_tokens) * prefix).floor() as u64;
                self.features(
                    request,
                    target,
                    prefix,
                    Some(own.min(target.in_flight.prefill_tokens())),
                )
            }
        };
        let now = self.clock.now();
        let id = self.services.next_request_id();
        if let Err(e) = self
            .running
            .add(&target.endpoint.key, id, slo.tpot_ms, request.stream, now)
        {
            tracing::debug!(error = ?e, endpoint = %target.endpoint.key, "request not tracked in the running-request queue");
        }
        cycle.state.insert(
            self.tracking_key.clone(),
            Tracking {
                id,
                dispatched_at: now,
                // Streaming until the response headers say otherwise.
                tracker: LatencyTracker::dispatched(features, now, true),
                features,
                slo,
                labels,
                served_elsewhere: false,
                started: false,
            },
        );
    }
}

impl ResponseHooks for PredictedLatencyScorer {
    fn on_response_headers(
        &self,
        cycle: &mut Cycle,
        _request: &LlmRequest,
        _result: &SchedulingResult,
        headers: &[(String, String)],
        _add_headers: &mut Vec<(String, String)>,
    ) {
        let Some(t) = cycle.state.get_mut::<Tracking>(&self.tracking_key) else {
            return;
        };
        let content_type = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
            .map(|(_, v)| v.as_str());
        if let Some(ct) = content_type
            && !ct.contains("text/event-stream")
        {
            // Not streamed: TTFT is the whole response (upstream's non-streaming mode). No
            // chunk has arrived before the headers, so restarting the tracker loses nothing.
            t.tracker = LatencyTracker::dispatched(t.features, t.dispatched_at, false);
        }
    }

    fn on_response_chunk(
        &self,
        cycle: &mut Cycle,
        _request: &LlmRequest,
        _result: &SchedulingResult,
        chunk: ResponseChunk<'_>,
    ) {
        if chunk.data.is_empty() {
            return;
        }
        let now = self.clock.now();
        if let Some(t) = cycle.state.get_mut::<Tracking>(&self.tracking_key) {
            t.tracker.on_chunk(now);
            if !t.started {
                t.started = true;
                self.running.mark_started(t.id);
            }
        }
    }

    fn on_served(
        &self,
        cycle: &mut Cycle,
        _request: &LlmRequest,
        _result: &SchedulingResult,
        served: &Candidate,
    ) {
        let Some(t) = cycle.state.get_mut::<Tracking>(&self.tracking_key) else {
            return;
        };
        self.running.move_to(t.id, &served.endpoint.key);
        // The features describe the endpoint first picked: a sample pairing them with the
        // fallback's latency would teach the model something false.
        t.served_elsewhere = true;
    }

    fn on_complete(
        &self,
        cycle: &mut Cycle,
        _request: &LlmRequest,
        _result: &SchedulingResult,
        outcome: &Outcome,
    ) {
        let Some(t) = cycle.state.remove::<Tracking>(&self.tracking_key) else {
            return;
        };
        self.running.remove(t.id);
        // Errors and disconnects say nothing reliable about latency: no sample, no metric.
        if *outcome != Outcome::Success {
            return;
        }
        let now = self.clock.now();
        let Some(m) = t.tracker.finish(now) else {
            return;
        };
        let metrics = self.services.metrics();
        metrics.observe_ttft(&t.labels, m.ttft_ms, t.slo.ttft_ms);
        if let Some(tpot) = m.tpot_ms {
            metrics.observe_tpot(&t.labels, tpot, t.slo.tpot_ms);
        }
        if let Some(p) = self.services.predictor()
            && !t.served_elsewhere
            && let Some(sample) = t.tracker.training_sample(now)
        {
            debug_assert_eq!(
                sample.features_at_dispatch,
                Features {
                    streamed: sample.features_at_dispatch.streamed,
                    ..t.features
                }
            );
            p.record(sample);
        }
    }
}

impl EndpointAware for PredictedLatencyScorer {
    fn retain_endpoints(&self, keep: &dyn Fn(&sluice_core::EndpointKey) -> bool) {
        self.running.retain(keep);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_parsing() {
        assert_eq!(parse_ttl("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_ttl("300").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_ttl("1500ms").unwrap(), Duration::from_millis(1500));
        assert!(parse_ttl("0s").is_err());
        assert!(parse_ttl("5d").unwrap_err().contains("unit"));
        assert!(parse_ttl("abc").is_err());
    }

    #[test]
    fn params_reject_bad_values_with_the_field_name() {
        let p = ScorerParams {
            slo_buffer_factor: 0.0,
            ..ScorerParams::default()
        };
        assert!(p.validate().unwrap_err().contains("sloBufferFactor"));
        let p = ScorerParams {
            invalid_weight_fraction: 2.0,
            ..ScorerParams::default()
        };
        assert!(p.validate().unwrap_err().contains("invalidWeightFraction"));
    }
}
