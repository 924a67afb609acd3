//! The one place the picker calls into `sluice-scheduling`.
//!
//! [`Router`] wraps the configured [`Scheduler`]; the ext_proc session calls
//! [`Router::schedule`], then the lifecycle hooks on the returned [`Scheduled`].

use std::sync::Arc;

use rand::Rng;
use sluice_core::EndpointPickerConfig;
use sluice_scheduling::{
    Candidate, LlmRequest, Outcome, Registry, ResponseChunk, ScheduleError, Scheduled, Scheduler,
    SchedulerOptions, SharedState,
};

use crate::metrics::{Metrics, PluginDurations};
use crate::state::EndpointRuntime;

/// The scheduler a snapshot's configuration builds. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Router {
    scheduler: Scheduler,
    durations: Arc<PluginDurations>,
}

impl Router {
    /// Validates `cfg` and builds its plugins (an empty config means upstream's default
    /// profile: queue 2, KV cache 2, prefix cache 3, max-score picker). `shared` is the
    /// pool's [`SharedState`]: passing the same one to every rebuild keeps the prefix index
    /// and the SLO running-request queues across config changes. Every plugin call is timed
    /// into `metrics`' `inference_extension_plugin_duration_seconds`, through a table of the
    /// config's plugins resolved here, once.
    pub fn build(
        cfg: &EndpointPickerConfig,
        registry: &Registry,
        shared: &SharedState,
        metrics: &Metrics,
    ) -> Result<Router, String> {
        let durations = Arc::new(PluginDurations::new(metrics));
        let options = SchedulerOptions {
            shared: shared.clone(),
            observer: Some(durations.clone()),
            ..SchedulerOptions::default()
        };
        let scheduler =
            Scheduler::from_config_with(cfg, registry, options).map_err(|e| e.to_string())?;
        durations.resolve(scheduler.plugins().iter().map(|p| &p.typed_name().name));
        Ok(Router {
            scheduler,
            durations,
        })
    }

    /// The plugin-duration table this scheduler reports into.
    pub fn plugin_durations(&self) -> &PluginDurations {
        &self.durations
    }

    /// The scheduler (for its configured plugins and detector).
    pub fn scheduler(&self) -> &Scheduler {
        &self.scheduler
    }

    /// Pool saturation per the configured detector (`utilization-detector` unless the
    /// config names another): what flow control gates dispatch on.
    pub fn saturation(&self, candidates: &[Candidate]) -> f64 {
        self.scheduler.saturation(candidates)
    }

    /// Whether `request` bypasses saturation-based admission, legacy or flow control's gate
    /// (the SLO profile handler says so for every request that does not opt out: its
    /// scorer sheds by predicted latency instead).
    pub fn skip_saturation_detection(&self, request: &LlmRequest) -> bool {
        self.scheduler.skip_saturation_detection(request)
    }

    /// Tells plugins with per-endpoint state which endpoints remain.
    pub fn set_endpoints(&self, endpoints: &[Arc<EndpointRuntime>]) {
        let keys: std::collections::HashSet<_> =
            endpoints.iter().map(|e| e.endpoint.key.clone()).collect();
        self.scheduler.retain_endpoints(&|k| keys.contains(k));
    }

    /// Admission (legacy: sheddable requests are refused when the pool is saturated; skipped
    /// with `legacy_admit == false`, when flow control has admitted the request), then the
    /// scheduling cycle, then the PreRequest hooks (which count the request in flight).
    pub fn schedule(
        &self,
        request: &LlmRequest,
        candidates: &[Candidate],
        legacy_admit: bool,
    ) -> Result<Scheduled, ScheduleError> {
        let mut scheduled = self.decide(request, candidates, legacy_admit)?;
        self.commit(request, &mut scheduled);
        Ok(scheduled)
    }

    /// Admission and the scheduling cycle, without the PreRequest hooks: a decision that
    /// may still be replaced (for example once asynchronous latency predictions arrive).
    /// Dropping it leaves nothing counted.
    pub fn decide(
        &self,
        request: &LlmRequest,
        candidates: &[Candidate],
        legacy_admit: bool,
    ) -> Result<Scheduled, ScheduleError> {
        if legacy_admit {
            self.scheduler.legacy_admit(request, candidates)?;
        }
        self.scheduler.schedule(request, candidates)
    }

    /// Runs the PreRequest hooks of the decision that will be forwarded.
    pub fn commit(&self, request: &LlmRequest, scheduled: &mut Scheduled) {
        self.scheduler.pre_request(request, scheduled);
    }

    /// Response headers arrived; returns headers plugins want added to the response.
    pub fn response_headers(
        &self,
        request: &LlmRequest,
        scheduled: &mut Scheduled,
        headers: &[(String, String)],
    ) -> Vec<(String, String)> {
        self.scheduler.response_headers(request, scheduled, headers)
    }

    /// One response body chunk.
    pub fn response_chunk(
        &self,
        request: &LlmRequest,
        scheduled: &mut Scheduled,
        chunk: ResponseChunk<'_>,
    ) {
        self.scheduler.response_chunk(request, scheduled, chunk);
    }

    /// Moves the request's in-flight accounting to `served`, the endpoint the data plane
    /// reported serving it; see [`Scheduler::served_by`].
    pub fn served_by(
        &self,
        request: &LlmRequest,
        scheduled: &mut Scheduled,
        served: Candidate,
    ) -> bool {
        self.scheduler.served_by(request, scheduled, served)
    }

    /// The request ended (only the first call counts).
    pub fn complete(&self, request: &LlmRequest, scheduled: &mut Scheduled, outcome: Outcome) {
        self.scheduler.complete(request, scheduled, outcome);
    }

    /// The pick for a request without a body (a plain GET): upstream picks uniformly at
    /// random without scheduling; sluice picks the endpoint with the fewest requests in
    /// flight from this picker, ties broken at random, so probes do not pile onto one pod.
    pub fn pick_bodiless(candidates: &[Candidate], rng: &mut impl Rng) -> Option<Candidate> {
        let min = candidates.iter().map(|c| c.in_flight.requests()).min()?;
        let best: Vec<&Candidate> = candidates
            .iter()
            .filter(|c| c.in_flight.requests() == min)
            .collect();
        best.get(rng.random_range(0..best.len()))
            .map(|c| (*c).clone())
    }
}
