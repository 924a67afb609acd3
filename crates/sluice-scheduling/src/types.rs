//! The values that flow through a scheduling cycle: the request, the candidate endpoints and
//! what the scheduler decides.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use sluice_core::{Endpoint, EndpointMetrics};

/// One inference request as the scheduler sees it (upstream's `LLMRequest`).
///
/// The picker builds it after parsing the body and applying model rewrites. Header names are
/// compared case-insensitively, so the picker may pass them as received.
#[derive(Clone, Debug, Default)]
pub struct LlmRequest {
    /// The request id (`x-request-id`); plugins that keep per-request state key it by this.
    pub request_id: String,
    /// The model the request targets after rewrite.
    pub target_model: String,
    /// The model the client asked for, before any rewrite (metrics label it `model_name`);
    /// empty means the same as `target_model`.
    pub requested_model: String,
    /// The bytes the prefix-cache producer hashes (for chat completions, the JSON of
    /// `messages`; for completions, the prompt text). Empty disables prefix matching.
    pub prompt: Bytes,
    /// The request's `cache_salt`, which seeds the prefix hash chain so that tenants that
    /// salt their prompts never share cache entries.
    pub cache_salt: Option<String>,
    /// The request headers plugins may consult (for example `test-epp-endpoint-selection`,
    /// `x-session-token`, the SLO headers).
    pub headers: Vec<(String, String)>,
    /// The InferenceObjective's priority (0 when none); negative means sheddable.
    pub priority: i32,
    /// Estimated prompt length in tokens (used by token-based load accounting).
    pub prompt_tokens: u32,
    /// The client asked for a streamed response (`"stream": true`). A streamed request's
    /// TTFT is its first chunk, a non-streamed one's its whole response, so the latency
    /// predictor keeps the two apart.
    pub stream: bool,
    /// Latency predictions fetched for this request before scheduling, when the predictor
    /// answers asynchronously (see [`crate::plugins::slo::DeferredPrediction`]).
    pub prefetched_predictions: Option<Arc<crate::plugins::slo::PrefetchedPredictions>>,
}

impl LlmRequest {
    /// The first value of a header, matched case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Requests and prompt tokens the picker has sent to one endpoint and not yet seen finish.
///
/// The scheduler updates these itself (in `pre_request`, on the first response bytes and in
/// `complete`); the picker creates one per endpoint, keeps it for the endpoint's lifetime and
/// hands the same `Arc` in every [`Candidate`] so that counting needs no map lookup on the
/// hot path.
///
/// Two views are kept: everything in flight (`requests`, `tokens`: load, as upstream's
/// `InFlightLoad`), and the part still in its prefill phase, dispatched but without a first
/// response byte yet (`prefill_requests`, `prefill_tokens`). A new request's time to first
/// token is driven by the prefill work queued ahead of it, not by the prompts of requests
/// that are already decoding, so the latency predictor reads the second view.
///
/// It also keeps the endpoint's **step phase**: a batching engine emits the tokens of one
/// decode step for all its sequences at once, so response chunks arrive from an endpoint in
/// bursts, one per engine step. The start of the latest burst and the gap before it tell
/// how far the endpoint is into its current step and how long a step takes; a request
/// dispatched now waits for the rest of the current step before its prefill can start,
/// which is most of the error in predicting a short time to first token.
#[derive(Debug)]
pub struct InFlightCounters {
    requests: AtomicU32,
    tokens: AtomicU64,
    prefill_requests: AtomicU32,
    prefill_tokens: AtomicU64,
    /// Time origin of the `*_us` fields below.
    epoch: Instant,
    /// When the latest burst of response chunks began (µs since `epoch`; 0 = never).
    burst_start_us: AtomicU64,
    /// When the latest response chunk arrived (µs since `epoch`).
    last_chunk_us: AtomicU64,
    /// Gap between the starts of the last two bursts (µs; 0 = unknown).
    step_us: AtomicU64,
    /// Smoothed step length (µs, exponential average over bursts; 0 = unknown).
    mean_step_us: AtomicU64,
    /// Uncached prompt tokens ever dispatched here (only grows; the rate below reads it).
    dispatched_tokens: AtomicU64,
    /// `dispatched_tokens` when the latest burst began.
    dispatched_at_burst: AtomicU64,
    /// Recent rate of dispatched uncached prompt tokens, tokens/s as `f64` bits.
    token_rate_bits: AtomicU64,
}

impl Default for InFlightCounters {
    fn default() -> Self {
        InFlightCounters {
            requests: AtomicU32::new(0),
            tokens: AtomicU64::new(0),
            prefill_requests: AtomicU32::new(0),
            prefill_tokens: AtomicU64::new(0),
            epoch: Instant::now(),
            burst_start_us: AtomicU64::new(0),
            last_chunk_us: AtomicU64::new(0),
            step_us: AtomicU64::new(0),
            mean_step_us: AtomicU64::new(0),
            dispatched_tokens: AtomicU64::new(0),
            dispatched_at_burst: AtomicU64::new(0),
            token_rate_bits: AtomicU64::new(0),
        }
    }
}

/// Bursts (engine steps) the mean step length averages over: 1/α of its exponential
/// average. Long enough to smooth the alternation of prefill and decode-only steps that
/// makes one step a poor guide to the next request's inter-token latency, short enough to
/// follow a batch that grows over a few seconds.
const MEAN_STEP_BURSTS: u64 = 16;

/// Time constant of the dispatched-token rate, in µs: new requests keep joining a
/// request's decode for its whole lifetime (seconds), so their recent rate says how much
/// prefill work will share its steps.
const TOKEN_RATE_TAU_US: f64 = 2_000_000.0;

/// Chunks closer together than this belong to one engine step (the engine writes all of a
/// step's tokens at once; the network spreads them by well under a step, which is at least
/// a few milliseconds for any LLM).
const BURST_GAP: Duration = Duration::from_micros(1_500);

/// Where an endpoint is in its engine step, as seen from its response chunks.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepPhase {
    /// Time since the latest burst of response chunks began.
    pub since_step: Duration,
    /// Length of the endpoint's latest step (gap between the last two bursts).
    pub step: Duration,
    /// The endpoint's recent mean step length (about the last 16 bursts): the inter-token
    /// latency its decoding requests have been seeing.
    pub mean_step: Duration,
    /// Uncached prompt tokens per second dispatched to the endpoint recently (exponential
    /// average with a 2 s time constant, brought up to date at each burst and decayed to
    /// `now` when read).
    pub prompt_token_rate: f64,
}

fn saturating_sub_u32(a: &AtomicU32, v: u32) {
    let _ = a.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |x| {
        Some(x.saturating_sub(v))
    });
}

fn saturating_sub_u64(a: &AtomicU64, v: u64) {
    let _ = a.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |x| {
        Some(x.saturating_sub(v))
    });
}

impl InFlightCounters {
    /// Counters starting at the given values, none of them in prefill (useful in tests and
    /// simulations).
    pub fn with_values(requests: u32, tokens: u64) -> Self {
        InFlightCounters {
            requests: AtomicU32::new(requests),
            tokens: AtomicU64::new(tokens),
            ..InFlightCounters::default()
        }
    }

    /// Zero counters whose step-phase timestamps count from `epoch` (a simulation passes its
    /// virtual clock's origin so that runs repeat exactly).
    pub fn with_epoch(epoch: Instant) -> Self {
        InFlightCounters {
            epoch,
            ..InFlightCounters::default()
        }
    }

    /// Requests in flight.
    pub fn requests(&self) -> u32 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Uncached prompt tokens in flight.
    pub fn tokens(&self) -> u64 {
        self.tokens.load(Ordering::Relaxed)
    }

    /// Requests in flight that have not produced a response byte yet (queued or prefilling).
    pub fn prefill_requests(&self) -> u32 {
        self.prefill_requests.load(Ordering::Relaxed)
    }

    /// Uncached prompt tokens of the requests counted by
    /// [`prefill_requests`](Self::prefill_requests).
    pub fn prefill_tokens(&self) -> u64 {
        self.prefill_tokens.load(Ordering::Relaxed)
    }

    /// Counts one more request carrying `tokens` uncached prompt tokens; it starts in its
    /// prefill phase.
    pub fn add(&self, tokens: u64) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.tokens.fetch_add(tokens, Ordering::Relaxed);
        self.prefill_requests.fetch_add(1, Ordering::Relaxed);
        self.prefill_tokens.fetch_add(tokens, Ordering::Relaxed);
        self.dispatched_tokens.fetch_add(tokens, Ordering::Relaxed);
    }

    /// Ends the prefill phase of one request counted by [`add`](Self::add) with `tokens`
    /// (its first response bytes arrived). Saturates at zero.
    pub fn end_prefill(&self, tokens: u64) {
        saturating_sub_u32(&self.prefill_requests, 1);
        saturating_sub_u64(&self.prefill_tokens, tokens);
    }

    /// Records response bytes from this endpoint at `now` (see [`StepPhase`]).
    pub fn observe_chunk(&self, now: Instant) {
        let now_us = u64::try_from(now.saturating_duration_since(self.epoch).as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        let last = self.last_chunk_us.swap(now_us, Ordering::Relaxed);
        if last != 0 && now_us.saturating_sub(last) < BURST_GAP.as_micros() as u64 {
            return;
        }
        // A new burst: one thread wins the swap and records the step length.
        let start = self.burst_start_us.swap(now_us, Ordering::Relaxed);
        if start != 0 && now_us > start {
            let gap = now_us - start;
            let prev = self.step_us.load(Ordering::Relaxed);
            // A gap far longer than the last step is the engine idling between requests,
            // not a step: let the estimate grow towards it only gradually.
            let step = if prev != 0 && gap > 4 * prev {
                2 * prev
            } else {
                gap
            };
            self.step_us.store(step, Ordering::Relaxed);
            let mean = self.mean_step_us.load(Ordering::Relaxed);
            let mean = if mean == 0 {
                step
            } else {
                // Integer EWMA: mean += (step − mean) / N, in either direction.
                (mean * (MEAN_STEP_BURSTS - 1) + step) / MEAN_STEP_BURSTS
            };
            self.mean_step_us.store(mean.max(1), Ordering::Relaxed);
            // Tokens dispatched since the previous burst, folded into the rate: an
            // exponentially decayed token count over τ, i.e. tokens per second.
            let total = self.dispatched_tokens.load(Ordering::Relaxed);
            let new_tokens =
                total.saturating_sub(self.dispatched_at_burst.swap(total, Ordering::Relaxed));
            let decay = (-(gap as f64) / TOKEN_RATE_TAU_US).exp();
            let rate = f64::from_bits(self.token_rate_bits.load(Ordering::Relaxed));
            let rate = rate * decay + new_tokens as f64 / (TOKEN_RATE_TAU_US / 1e6);
            self.token_rate_bits
                .store(rate.to_bits(), Ordering::Relaxed);
        }
    }

    /// The endpoint's step phase at `now`, once two bursts have been seen.
    pub fn step_phase(&self, now: Instant) -> Option<StepPhase> {
        let step = self.step_us.load(Ordering::Relaxed);
        let start = self.burst_start_us.load(Ordering::Relaxed);
        if step == 0 || start == 0 {
            return None;
        }
        let at = self.epoch + Duration::from_micros(start);
        let since_step = now.saturating_duration_since(at);
        let rate = f64::from_bits(self.token_rate_bits.load(Ordering::Relaxed));
        // Tokens dispatched since the latest burst are not in the rate yet: without them an
        // endpoint that has stopped stepping (idle, or one long prefill step) would look
        // unloaded however much was sent to it.
        let pending = self
            .dispatched_tokens
            .load(Ordering::Relaxed)
            .saturating_sub(self.dispatched_at_burst.load(Ordering::Relaxed));
        let decay = (-since_step.as_secs_f64() * 1e6 / TOKEN_RATE_TAU_US).exp();
        Some(StepPhase {
            since_step,
            step: Duration::from_micros(step),
            mean_step: match self.mean_step_us.load(Ordering::Relaxed) {
                0 => Duration::from_micros(step),
                mean => Duration::from_micros(mean),
            },
            prompt_token_rate: rate * decay + pending as f64 / (TOKEN_RATE_TAU_US / 1e6),
        })
    }

    /// Undoes one [`add`](Self::add); `in_prefill` says whether
    /// [`end_prefill`](Self::end_prefill) has not been called for it. Saturates at zero so
    /// that a bug elsewhere can never wrap the counters into enormous values that would mark
    /// the endpoint saturated forever.
    pub fn remove(&self, tokens: u64, in_prefill: bool) {
        saturating_sub_u32(&self.requests, 1);
        saturating_sub_u64(&self.tokens, tokens);
        if in_prefill {
            self.end_prefill(tokens);
        }
    }
}

/// One endpoint the request may be sent to, with what is known about it right now.
#[derive(Clone, Debug)]
pub struct Candidate {
    /// The endpoint.
    pub endpoint: Arc<Endpoint>,
    /// Its latest scraped metrics; `None` when never scraped successfully.
    pub metrics: Option<Arc<EndpointMetrics>>,
    /// How old `metrics` is.
    pub metrics_age: Duration,
    /// The picker's in-flight counters for this endpoint.
    pub in_flight: Arc<InFlightCounters>,
}

/// Zero metrics stand in for missing ones in scorers, as upstream's zero-valued metrics struct
/// does for a pod that has not been scraped yet.
static ZERO_METRICS: EndpointMetrics = EndpointMetrics {
    waiting_queue_size: 0,
    running_requests_size: 0,
    kv_cache_usage: 0.0,
    active_models: Vec::new(),
    waiting_models: Vec::new(),
    max_active_models: 0,
    cache_block_size: 0,
    cache_num_blocks: 0,
};

impl Candidate {
    /// A candidate with fresh metrics and its own zeroed in-flight counters.
    pub fn new(endpoint: Arc<Endpoint>, metrics: EndpointMetrics) -> Self {
        Candidate {
            endpoint,
            metrics: Some(Arc::new(metrics)),
            metrics_age: Duration::ZERO,
            in_flight: Arc::new(InFlightCounters::default()),
        }
    }

    /// The metrics, or all-zero metrics when none were scraped yet.
    pub fn metrics_or_zero(&self) -> &EndpointMetrics {
        self.metrics.as_deref().unwrap_or(&ZERO_METRICS)
    }
}

/// A candidate (by index into the candidate slice) and its weighted total score in a profile.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ScoredEndpoint {
    /// Index into the candidate slice given to `schedule`.
    pub index: usize,
    /// The weighted sum of the profile's scorers.
    pub score: f64,
}

/// One scorer's raw (clamped, unweighted) scores, recorded when
/// [`SchedulerOptions::record_scores`](crate::SchedulerOptions::record_scores) is on.
#[derive(Clone, Debug, PartialEq)]
pub struct ScorerScores {
    /// The scorer's instance name.
    pub scorer: Arc<str>,
    /// The weight the profile gives it.
    pub weight: f64,
    /// Score per endpoint, parallel to [`ProfileRunResult::scored`].
    pub scores: Vec<f64>,
}

/// What one profile decided.
#[derive(Clone, Debug, PartialEq)]
pub struct ProfileRunResult {
    /// The profile's name.
    pub profile: Arc<str>,
    /// Chosen candidates (indices into the candidate slice), best first.
    pub targets: Vec<usize>,
    /// The chosen candidates themselves, parallel to `targets`, so that hooks running after
    /// the candidate slice is gone (PreRequest, response hooks) can see them.
    pub target_candidates: Vec<Candidate>,
    /// Every endpoint that passed the filters, with its total score, in candidate order.
    pub scored: Vec<ScoredEndpoint>,
    /// Per-scorer scores, only when recording is on.
    pub scorer_scores: Vec<ScorerScores>,
}

/// Why a profile produced no result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProfileFailure {
    /// The profile's name.
    pub profile: Arc<str>,
    /// What went wrong, for example which filter removed every endpoint.
    pub reason: String,
}

/// The outcome of a scheduling cycle (upstream's `SchedulingResult`).
#[derive(Clone, Debug, PartialEq)]
pub struct SchedulingResult {
    /// The profile whose targets the request goes to.
    pub primary_profile: Arc<str>,
    /// Every profile that ran, successful or not, in the order they ran.
    pub profile_results: Vec<Result<ProfileRunResult, ProfileFailure>>,
    /// The primary profile's targets: the pick first, then fallbacks in order.
    pub targets: Vec<Candidate>,
}

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.endpoint == other.endpoint
    }
}

impl SchedulingResult {
    /// The result of the named profile, when it ran and succeeded.
    pub fn profile(&self, name: &str) -> Option<&ProfileRunResult> {
        self.profile_results
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .find(|r| &*r.profile == name)
    }

    /// The primary profile's result.
    pub fn primary(&self) -> Option<&ProfileRunResult> {
        self.profile(&self.primary_profile)
    }

    /// The value of `x-gateway-destination-endpoint`: every target's `ip:port`, joined with
    /// `,` (IPv6 addresses bracketed).
    pub fn destination_header(&self) -> String {
        let mut out = String::with_capacity(self.targets.len() * 22);
        for (i, t) in self.targets.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&t.endpoint.address.to_string());
        }
        out
    }
}

/// How a request ended, told to response plugins exactly once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The model server answered and the response was delivered in full.
    Success,
    /// The request failed after dispatch: the model server or the proxy returned an error, or
    /// the stream broke.
    Failed {
        /// What failed (an HTTP status, a gRPC error); for logs and training filters.
        reason: String,
    },
    /// The client went away before the response was complete. Upstream cannot tell this from
    /// a failure; sluice can, so that latency training can drop such samples.
    ClientDisconnected,
}

/// A response chunk as response plugins see it.
#[derive(Clone, Copy, Debug)]
pub struct ResponseChunk<'a> {
    /// The chunk's bytes.
    pub data: &'a [u8],
    /// Whether this is the last chunk.
    pub end_of_stream: bool,
}

/// Why `schedule` produced no destination. Each variant maps to one HTTP status.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    /// The pool has no candidate endpoints for this request (HTTP 503).
    #[error("no candidate endpoints for the request")]
    NoCandidates,
    /// Every profile's filters removed every endpoint (HTTP 503).
    #[error("no endpoints available for the request: {reason}")]
    AllFiltered {
        /// Which profile and filter removed the last endpoint.
        reason: String,
    },
    /// A plugin chose to shed the request (HTTP 429).
    #[error("request shed by {plugin}: {reason}")]
    Shed {
        /// The plugin's instance name.
        plugin: String,
        /// Why, as the plugin says it.
        reason: String,
    },
    /// A plugin or profile handler failed in a way the request cannot be blamed for (HTTP 500).
    #[error("scheduling failed in {plugin}: {message}")]
    Internal {
        /// The plugin's instance name.
        plugin: String,
        /// What went wrong.
        message: String,
    },
}

impl ScheduleError {
    /// The HTTP status the picker answers with.
    pub fn http_status(&self) -> u16 {
        match self {
            ScheduleError::NoCandidates | ScheduleError::AllFiltered { .. } => 503,
            ScheduleError::Shed { .. } => 429,
            ScheduleError::Internal { .. } => 500,
        }
    }
}

/// What a plugin returns when it cannot do its work.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PluginError {
    /// Refuse the request (HTTP 429), for example because no endpoint can meet its SLO.
    #[error("shed: {0}")]
    Shed(String),
    /// Something went wrong inside the plugin.
    #[error("{0}")]
    Internal(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_phase_follows_bursts_of_chunks() {
        let c = InFlightCounters::default();
        let t0 = c.epoch + Duration::from_millis(100);
        let at = |ms: f64| t0 + Duration::from_secs_f64(ms / 1e3);
        assert_eq!(c.step_phase(t0), None, "nothing seen yet");
        // Step 1 ends at 0 ms: three streams' chunks within 0.3 ms of each other.
        for ms in [0.0, 0.1, 0.3] {
            c.observe_chunk(at(ms));
        }
        assert_eq!(
            c.step_phase(at(1.0)),
            None,
            "one burst gives no step length"
        );
        // Step 2 ends 12 ms after step 1.
        for ms in [12.0, 12.2] {
            c.observe_chunk(at(ms));
        }
        let p = c.step_phase(at(15.0)).unwrap();
        assert_eq!(p.step, Duration::from_millis(12));
        assert_eq!(p.since_step, Duration::from_millis(3));
        // The engine idles for a second, then steps again: the idle gap is not a step.
        c.observe_chunk(at(1012.0));
        let p = c.step_phase(at(1013.0)).unwrap();
        assert_eq!(
            p.step,
            Duration::from_millis(24),
            "grows at most 2x per burst"
        );
        assert_eq!(p.since_step, Duration::from_millis(1));
    }

    #[test]
    fn mean_step_smooths_over_recent_bursts_and_follows_a_slower_engine() {
        let c = InFlightCounters::default();
        let t0 = c.epoch + Duration::from_millis(100);
        let mut now = t0;
        let burst = |c: &InFlightCounters, now: &mut Instant, gap_ms: u64| {
            *now += Duration::from_millis(gap_ms);
            c.observe_chunk(*now);
            *now
        };
        burst(&c, &mut now, 0);
        for _ in 0..40 {
            burst(&c, &mut now, 10);
        }
        let mean = |c: &InFlightCounters, at| c.step_phase(at).unwrap().mean_step;
        assert_eq!(mean(&c, now), Duration::from_millis(10));
        // One long (prefill) step moves the latest step, and the mean only by 1/16 of it.
        let at = burst(&c, &mut now, 38);
        assert_eq!(c.step_phase(at).unwrap().step, Duration::from_millis(38));
        assert_eq!(mean(&c, at), Duration::from_micros(11_750));
        // The batch grows: steps of 20 ms. The mean follows within a few dozen steps.
        for _ in 0..80 {
            burst(&c, &mut now, 20);
        }
        let m = mean(&c, now).as_secs_f64() * 1e3;
        assert!((19.5..=20.0).contains(&m), "{m}");
    }

    #[test]
    fn prompt_token_rate_tracks_recent_dispatches_and_decays() {
        let c = InFlightCounters::default();
        let t0 = c.epoch + Duration::from_millis(100);
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        c.observe_chunk(at(0));
        // 500 uncached tokens every 10 ms (50k tokens/s) for 10 s, one burst per 10 ms.
        for i in 1..=1000 {
            c.add(500);
            c.observe_chunk(at(10 * i));
        }
        let rate = |ms| c.step_phase(at(ms)).unwrap().prompt_token_rate;
        let r = rate(10_000);
        assert!((48_000.0..=50_500.0).contains(&r), "{r}");
        // Dispatches stop; 2 s (one time constant) later the rate is down by e.
        for i in 1001..=1200 {
            c.observe_chunk(at(10 * i));
        }
        let r = rate(12_000);
        assert!((17_000.0..=19_500.0).contains(&r), "{r}");
        // Tokens sent since the latest burst count at once, even before the next burst
        // (an endpoint stuck in a long step must not look idle).
        c.add(4_000);
        assert!((rate(12_000) - r - 2_000.0).abs() < 1.0);
    }
}
