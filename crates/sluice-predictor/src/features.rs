//! What the predictor sees about a (request, endpoint) pair, and what it learns from.

use std::collections::HashMap;
use std::fmt;

use parking_lot::RwLock;
use serde::{Deserialize, Serialize};

/// The role a pod plays in disaggregated serving (upstream's `pod_type`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PodRole {
    /// Prefill and decode on the same pod (upstream `""`).
    #[default]
    Both,
    /// Prefill-only pod.
    Prefill,
    /// Decode-only pod.
    Decode,
}

impl PodRole {
    /// Number of roles; models are kept per (class, role, streamed).
    pub const COUNT: usize = 3;

    /// The role named by a pod label value as upstream spells it (`prefill`, `decode`,
    /// anything else means both).
    pub fn from_label(value: Option<&str>) -> Self {
        match value {
            Some(v) if v.eq_ignore_ascii_case("prefill") => PodRole::Prefill,
            Some(v) if v.eq_ignore_ascii_case("decode") => PodRole::Decode,
            _ => PodRole::Both,
        }
    }

    /// Upstream's wire spelling of the role (`pod_type`).
    pub fn as_upstream_str(self) -> &'static str {
        match self {
            PodRole::Both => "",
            PodRole::Prefill => "prefill",
            PodRole::Decode => "decode",
        }
    }

    pub(crate) fn index(self) -> usize {
        match self {
            PodRole::Both => 0,
            PodRole::Prefill => 1,
            PodRole::Decode => 2,
        }
    }
}

/// A hardware/engine class: endpoints of one class share a latency model.
///
/// Class 0 ([`ClassId::UNKNOWN`]) is the shared fallback used for pods without a class
/// label, and for classes seen after the registry is full.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct ClassId(pub u16);

impl ClassId {
    /// The shared fallback class.
    pub const UNKNOWN: ClassId = ClassId(0);
}

impl fmt::Display for ClassId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "class-{}", self.0)
    }
}

/// Maps class label values (for example the pod label
/// `sluice_core::endpoint::HARDWARE_CLASS_LABEL`) to dense [`ClassId`]s.
///
/// Bounded: past `capacity` distinct values every new value maps to
/// [`ClassId::UNKNOWN`], so a label with unbounded cardinality cannot grow memory or the
/// model table.
#[derive(Debug)]
pub struct ClassRegistry {
    capacity: u16,
    ids: RwLock<HashMap<String, ClassId>>,
}

impl ClassRegistry {
    /// A registry that hands out at most `capacity` ids (1..=capacity).
    pub fn new(capacity: u16) -> Self {
        ClassRegistry {
            capacity,
            ids: RwLock::new(HashMap::new()),
        }
    }

    /// The class for a label value; `None` or an empty value is [`ClassId::UNKNOWN`].
    pub fn class_of(&self, label: Option<&str>) -> ClassId {
        let Some(label) = label.filter(|l| !l.is_empty()) else {
            return ClassId::UNKNOWN;
        };
        if let Some(id) = self.ids.read().get(label) {
            return *id;
        }
        let mut ids = self.ids.write();
        let next = ids.len();
        if let Some(id) = ids.get(label) {
            return *id;
        }
        if next >= usize::from(self.capacity) {
            return ClassId::UNKNOWN;
        }
        // `next < capacity <= u16::MAX`, so the conversion cannot fail.
        let id = ClassId(u16::try_from(next + 1).unwrap_or(0));
        ids.insert(label.to_owned(), id);
        id
    }

    /// The label value a class was registered for.
    pub fn label_of(&self, class: ClassId) -> Option<String> {
        self.ids
            .read()
            .iter()
            .find(|(_, id)| **id == class)
            .map(|(label, _)| label.clone())
    }
}

/// Everything the predictor knows about one candidate endpoint for one request, taken at
/// dispatch time (upstream's `PredictionRequest` plus a hardware class).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Features {
    /// KV-cache utilisation of the endpoint, 0.0..=1.0.
    pub kv_cache_usage: f64,
    /// Prompt length of the request, in tokens.
    pub input_tokens: u32,
    /// Requests waiting in the endpoint's queue.
    pub waiting: u32,
    /// Requests running on the endpoint (upstream: this picker's in-flight count).
    pub running: u32,
    /// Fraction of the prompt already in the endpoint's prefix cache, 0.0..=1.0.
    pub prefix_cache_score: f64,
    /// Uncached prompt tokens dispatched to the endpoint and not yet prefilled (requests
    /// without a first response byte yet): the prefill work queued ahead of this request.
    pub prefill_tokens_in_flight: u32,
    /// Requests dispatched to the endpoint without a first response byte yet; `running`
    /// minus this is the decode batch the request will share steps with.
    #[serde(default)]
    pub prefill_requests_in_flight: u32,
    /// Length of the endpoint's latest engine step in ms, from the rhythm of its streamed
    /// response chunks (0 = unknown).
    #[serde(default)]
    pub step_ms: f64,
    /// Time since the endpoint's latest step emitted its tokens, in ms (meaningful only
    /// with `step_ms > 0`).
    #[serde(default)]
    pub since_step_ms: f64,
    /// The endpoint's recent mean engine-step length in ms (about its last 16 steps, from
    /// the same chunk rhythm; 0 = unknown): the inter-token latency its decoding requests
    /// have been getting.
    #[serde(default)]
    pub mean_step_ms: f64,
    /// Uncached prompt tokens per second dispatched to the endpoint over the last few
    /// seconds: the prefill work that will keep joining the request's decode steps.
    #[serde(default)]
    pub prompt_token_rate: f64,
    /// Tokens the request has generated so far (0 at dispatch).
    pub tokens_generated: u32,
    /// The endpoint's role.
    pub role: PodRole,
    /// The endpoint's hardware/engine class.
    pub class: ClassId,
    /// The request is streamed. Its TTFT is then the first chunk; a non-streamed request's
    /// "TTFT" is its whole response (upstream's definition), a different quantity, so the
    /// two get separate models.
    #[serde(default)]
    pub streamed: bool,
}

impl Features {
    /// Clamps fractions into 0..=1 (NaN becomes 0) so a bad scrape cannot poison a
    /// prediction or a model.
    pub fn sanitised(mut self) -> Self {
        self.kv_cache_usage = clamp_unit(self.kv_cache_usage);
        self.prefix_cache_score = clamp_unit(self.prefix_cache_score);
        // A step longer than a minute is not a step; NaN or negative means unknown.
        self.step_ms = finite_in(self.step_ms, 60_000.0);
        self.since_step_ms = finite_in(self.since_step_ms, f64::MAX);
        self.mean_step_ms = finite_in(self.mean_step_ms, 60_000.0);
        // Ten million tokens per second is far beyond any single engine's prefill.
        self.prompt_token_rate = finite_in(self.prompt_token_rate, 1e7);
        self
    }

    /// Expected wait for the endpoint's current engine step to end, in ms: a request can
    /// only join the batch at a step boundary. 0 when the step rhythm is unknown or the
    /// step is overdue (idle engine, or a long prefill step the other features describe).
    pub fn step_residual_ms(&self) -> f64 {
        if self.step_ms > 0.0 && self.since_step_ms.is_finite() {
            (self.step_ms - self.since_step_ms.max(0.0)).clamp(0.0, self.step_ms)
        } else {
            0.0
        }
    }

    /// Requests in flight past their first token: the decode batch.
    pub fn decoding(&self) -> u32 {
        self.running.saturating_sub(self.prefill_requests_in_flight)
    }

    /// Prompt tokens that still need prefill on this endpoint.
    pub fn uncached_input_tokens(&self) -> f64 {
        (1.0 - clamp_unit(self.prefix_cache_score)) * f64::from(self.input_tokens)
    }
}

fn finite_in(x: f64, max: f64) -> f64 {
    if x.is_finite() && x > 0.0 {
        x.min(max)
    } else {
        0.0
    }
}

fn clamp_unit(x: f64) -> f64 {
    if x.is_nan() { 0.0 } else { x.clamp(0.0, 1.0) }
}

/// One observed request: the features at dispatch and the latencies it then had.
///
/// A latency that was not measured (`None`) does not train that model: a non-streamed
/// response trains TTFT only, a single-chunk response has no TPOT.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainingSample {
    /// Features as they were when the request was dispatched.
    pub features_at_dispatch: Features,
    /// Time to first token in milliseconds, from dispatch.
    pub ttft_ms: Option<f64>,
    /// Mean inter-token latency in milliseconds (vLLM's ITL, not NTPOT).
    pub tpot_ms: Option<f64>,
}

/// Predicted latencies for one endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    /// Predicted time to first token, milliseconds.
    pub ttft_ms: f64,
    /// Predicted inter-token latency, milliseconds; `None` while no TPOT model exists
    /// (for example when only non-streamed traffic has been observed).
    pub tpot_ms: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_is_stable_and_bounded() {
        let reg = ClassRegistry::new(2);
        let a = reg.class_of(Some("h100"));
        let b = reg.class_of(Some("a10g"));
        assert_ne!(a, b);
        assert_ne!(a, ClassId::UNKNOWN);
        assert_eq!(reg.class_of(Some("h100")), a);
        assert_eq!(
            reg.class_of(Some("l4")),
            ClassId::UNKNOWN,
            "third class exceeds capacity"
        );
        assert_eq!(reg.class_of(None), ClassId::UNKNOWN);
        assert_eq!(reg.class_of(Some("")), ClassId::UNKNOWN);
        assert_eq!(reg.label_of(b).as_deref(), Some("a10g"));
    }

    #[test]
    fn role_from_label() {
        assert_eq!(PodRole::from_label(Some("Prefill")), PodRole::Prefill);
        assert_eq!(PodRole::from_label(Some("decode")), PodRole::Decode);
        assert_eq!(PodRole::from_label(Some("both")), PodRole::Both);
        assert_eq!(PodRole::from_label(None), PodRole::Both);
    }

    #[test]
    fn step_residual_is_what_is_left_of_the_current_step() {
        let f = |step_ms, since_step_ms| Features {
            step_ms,
            since_step_ms,
            ..Features::default()
        };
        assert_eq!(f(12.0, 3.0).step_residual_ms(), 9.0);
        assert_eq!(f(12.0, 30.0).step_residual_ms(), 0.0, "overdue step");
        assert_eq!(f(0.0, 3.0).step_residual_ms(), 0.0, "unknown rhythm");
        assert_eq!(f(f64::NAN, 3.0).sanitised().step_residual_ms(), 0.0);
        assert_eq!(f(12.0, -5.0).sanitised().step_residual_ms(), 12.0);
    }

    #[test]
    fn sanitise_clamps_bad_fractions() {
        let f = Features {
            kv_cache_usage: f64::NAN,
            prefix_cache_score: 1.7,
            ..Features::default()
        }
        .sanitised();
        assert_eq!(f.kv_cache_usage, 0.0);
        assert_eq!(f.prefix_cache_score, 1.0);
    }
}
