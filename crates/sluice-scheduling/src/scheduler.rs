//! The scheduler: runs data producers, admitters, and the profiles the profile handler picks;
//! then tells the request-control hooks about the request's life.

use std::fmt;
use std::hash::Hasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rand::SeedableRng;
use rand::rngs::SmallRng;
use sluice_core::{EndpointKey, EndpointPickerConfig};

use std::time::Instant;

use crate::config::{self, ConfigError, LoadedProfile};
use crate::cycle::{Clock, Cycle, CycleState, SystemClock, keys};
use crate::observe::{ExtensionPoint, SchedulingObserver};
use crate::plugin::{
    Admitter, DataProducer, EndpointAware, Plugin, PreRequest, ProfileHandler, ProfileRuns,
    ResponseHooks, SaturationDetector,
};
use crate::plugins::prefix::PrefixMatchInfo;
use crate::registry::{PluginEnv, Registry, SharedState};
use crate::types::{
    Candidate, LlmRequest, Outcome, PluginError, ProfileFailure, ProfileRunResult, ResponseChunk,
    ScheduleError, SchedulingResult, ScoredEndpoint, ScorerScores,
};

/// Knobs that are not part of the config document.
#[derive(Clone, Debug)]
pub struct SchedulerOptions {
    /// Where time comes from.
    pub clock: Arc<dyn Clock>,
    /// Seed for the per-request random number generators. With a fixed seed, a request's
    /// random choices depend only on the seed and the request id, so tests and simulations
    /// are reproducible. `None` draws a seed at construction.
    pub seed: Option<u64>,
    /// Record every scorer's scores in [`ProfileRunResult::scorer_scores`] (costs one
    /// allocation per scorer per request; for tests, debugging and simulations).
    pub record_scores: bool,
    /// State kept across schedulers built with the same options (the prefix index, for
    /// example); keep one per pool and pass it to every rebuild.
    pub shared: SharedState,
    /// Receives plugin timings and prefix-cache outcomes for metrics; `None` skips timing.
    pub observer: Option<Arc<dyn SchedulingObserver>>,
}

impl Default for SchedulerOptions {
    fn default() -> Self {
        SchedulerOptions {
            clock: Arc::new(SystemClock),
            seed: None,
            record_scores: false,
            shared: SharedState::default(),
            observer: None,
        }
    }
}

/// A configured scheduler. Cheap to clone (one `Arc`) and safe to share between threads;
/// build a new one when the config changes.
#[derive(Clone)]
pub struct Scheduler {
    inner: Arc<Inner>,
}

struct Inner {
    config: EndpointPickerConfig,
    plugins: Vec<Arc<dyn Plugin>>,
    profiles: Vec<LoadedProfile>,
    profile_names: Vec<Arc<str>>,
    handler: Arc<dyn ProfileHandler>,
    handler_name: Arc<str>,
    producers: Vec<(Arc<str>, Arc<dyn DataProducer>)>,
    admitters: Vec<(Arc<str>, Arc<dyn Admitter>)>,
    pre_requests: Vec<(Arc<str>, Arc<dyn PreRequest>)>,
    response_hooks: Vec<(Arc<str>, Arc<dyn ResponseHooks>)>,
    observer: Option<Arc<dyn SchedulingObserver>>,
    /// (instance name, plugin type), looked up on every timed plugin call. The callers pass
    /// the very `Arc<str>` names stored here, so a pointer comparison over a handful of
    /// entries settles it without hashing (a SipHash map cost ~1.7k instructions per
    /// request, foldhash ~0.5k).
    plugin_types: Vec<(Arc<str>, Arc<str>)>,
    endpoint_aware: Vec<Arc<dyn EndpointAware>>,
    detector: Option<Arc<dyn SaturationDetector>>,
    clock: Arc<dyn Clock>,
    seed: u64,
    record_scores: bool,
    counter: AtomicU64,
}

impl fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scheduler")
            .field("profiles", &self.inner.profile_names)
            .field("handler", &self.inner.handler_name)
            .field(
                "plugins",
                &self
                    .inner
                    .plugins
                    .iter()
                    .map(|p| p.typed_name().to_string())
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Default for Scheduler {
    /// Upstream's no-config default (queue 2, KV 2, prefix 3, max-score picker).
    fn default() -> Self {
        // The built-in default config is valid by construction; a failure here is a bug that
        // the `default_config_loads` test catches. Fall back to an empty scheduler rather than
        // panicking.
        match Scheduler::from_config(&EndpointPickerConfig::default()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "built-in default scheduling config failed to load");
                Scheduler::empty()
            }
        }
    }
}

/// The state of one scheduled request between the pick and its completion. The picker keeps
/// it with the request and passes it to every hook.
///
/// Dropping it without [`Scheduler::complete`] releases the in-flight counters anyway (so a
/// forgotten call cannot leak load forever), but response plugins are then not told.
#[derive(Debug)]
pub struct Scheduled {
    /// The decision.
    pub result: SchedulingResult,
    /// Plugins' per-request state, randomness and start time.
    pub cycle: Cycle,
    accounted_tokens: Option<u64>,
    /// Whether the request is still counted in its target's prefill phase.
    in_prefill: bool,
    completed: bool,
    /// The endpoint the data plane reported serving the request when that is not the first
    /// target (a retry went to a fallback): its in-flight counts live there from then on.
    served: Option<Candidate>,
}

impl Scheduled {
    /// Whether completion has been reported.
    pub fn is_completed(&self) -> bool {
        self.completed
    }

    /// The endpoint that carries the request's in-flight counts: the one the data plane
    /// reported serving it (see [`Scheduler::served_by`]), else the first target.
    pub fn accounted_on(&self) -> Option<&Candidate> {
        self.served.as_ref().or_else(|| self.result.targets.first())
    }

    fn release(&mut self) {
        let tokens = self.accounted_tokens.take();
        let in_prefill = std::mem::take(&mut self.in_prefill);
        if let (Some(tokens), Some(t)) = (tokens, self.accounted_on()) {
            t.in_flight.remove(tokens, in_prefill);
        }
    }

    /// The first response bytes arrived: the request has left its prefill phase.
    fn end_prefill(&mut self) {
        if !std::mem::take(&mut self.in_prefill) {
            return;
        }
        if let (Some(tokens), Some(t)) = (self.accounted_tokens, self.accounted_on()) {
            t.in_flight.end_prefill(tokens);
        }
    }
}

impl Drop for Scheduled {
    fn drop(&mut self) {
        self.release();
    }
}

impl Scheduler {
    /// Builds a scheduler from a config with the built-in plugins. An empty config (no plugins
    /// and no profiles) means upstream's default.
    pub fn from_config(cfg: &EndpointPickerConfig) -> Result<Scheduler, ConfigError> {
        Scheduler::from_config_with(cfg, &Registry::with_builtins(), SchedulerOptions::default())
    }

    /// Builds a scheduler from a config with the given registry and options.
    pub fn from_config_with(
        cfg: &EndpointPickerConfig,
        registry: &Registry,
        options: SchedulerOptions,
    ) -> Result<Scheduler, ConfigError> {
        let env = PluginEnv {
            clock: options.clock.clone(),
            shared: options.shared.clone(),
        };
        let loaded = config::load(cfg, registry, &env)?;
        Ok(Scheduler::build(loaded, options))
    }

    /// Runs defaulting and validation only, returning the effective config (what the
    /// controller stores and shows). Plugins are instantiated to validate their parameters and
    /// then dropped.
    pub fn validate(
        cfg: &EndpointPickerConfig,
        registry: &Registry,
    ) -> Result<EndpointPickerConfig, ConfigError> {
        config::load(cfg, registry, &PluginEnv::default()).map(|l| l.config)
    }

    fn empty() -> Scheduler {
        let handler = Arc::new(crate::plugins::SingleProfileHandler::new(
            crate::TypedName::new(
                config::SINGLE_PROFILE_HANDLER,
                config::SINGLE_PROFILE_HANDLER,
            ),
        ));
        Scheduler {
            inner: Arc::new(Inner {
                config: EndpointPickerConfig::default(),
                plugins: Vec::new(),
                profiles: Vec::new(),
                profile_names: Vec::new(),
                handler,
                handler_name: config::SINGLE_PROFILE_HANDLER.into(),
                producers: Vec::new(),
                admitters: Vec::new(),
                pre_requests: Vec::new(),
                response_hooks: Vec::new(),
                observer: None,
                plugin_types: Vec::new(),
                endpoint_aware: Vec::new(),
                detector: None,
                clock: Arc::new(SystemClock),
                seed: 0,
                record_scores: false,
                counter: AtomicU64::new(0),
            }),
        }
    }

    fn build(loaded: config::Loaded, options: SchedulerOptions) -> Scheduler {
        let mut producers = Vec::new();
        let mut admitters = Vec::new();
        let mut pre_requests = Vec::new();
        let mut response_hooks = Vec::new();
        let mut endpoint_aware = Vec::new();
        for p in &loaded.plugins {
            let name = p.typed_name().name.clone();
            if let Some(x) = p.clone().as_data_producer() {
                producers.push((name.clone(), x));
            }
            if let Some(x) = p.clone().as_admitter() {
                admitters.push((name.clone(), x));
            }
            if let Some(x) = p.clone().as_pre_request() {
                pre_requests.push((name.clone(), x));
            }
            if let Some(x) = p.clone().as_response_hooks() {
                response_hooks.push((name.clone(), x));
            }
            if let Some(x) = p.clone().as_endpoint_aware() {
                endpoint_aware.push(x);
            }
        }
        let producers = order_producers(producers);
        let plugin_types = loaded
            .plugins
            .iter()
            .map(|p| {
                (
                    p.typed_name().name.clone(),
                    p.typed_name().type_name.clone(),
                )
            })
            .collect();
        let profile_names = loaded.profiles.iter().map(|p| p.name.clone()).collect();
        Scheduler {
            inner: Arc::new(Inner {
                config: loaded.config,
                plugins: loaded.plugins,
                profiles: loaded.profiles,
                profile_names,
                handler: loaded.handler,
                handler_name: loaded.handler_name,
                producers,
                admitters,
                pre_requests,
                response_hooks,
                observer: options.observer.clone(),
                plugin_types,
                endpoint_aware,
                detector: loaded.detector,
                clock: options.clock,
                seed: options.seed.unwrap_or_else(rand::random),
                record_scores: options.record_scores,
                counter: AtomicU64::new(0),
            }),
        }
    }

    /// The effective config after defaulting.
    pub fn config(&self) -> &EndpointPickerConfig {
        &self.inner.config
    }

    /// The plugin instance with this name.
    pub fn plugin(&self, name: &str) -> Option<&Arc<dyn Plugin>> {
        self.inner
            .plugins
            .iter()
            .find(|p| &*p.typed_name().name == name)
    }

    /// Every plugin instance, in declaration order (auto-added ones last).
    pub fn plugins(&self) -> &[Arc<dyn Plugin>] {
        &self.inner.plugins
    }

    /// The profile names, in configuration order.
    pub fn profile_names(&self) -> &[Arc<str>] {
        &self.inner.profile_names
    }

    /// The configured saturation detector (for admission and flow control).
    pub fn saturation_detector(&self) -> Option<&Arc<dyn SaturationDetector>> {
        self.inner.detector.as_ref()
    }

    /// Pool saturation per the configured detector (0 without one).
    pub fn saturation(&self, candidates: &[Candidate]) -> f64 {
        self.inner
            .detector
            .as_ref()
            .map_or(0.0, |d| d.saturation(candidates))
    }

    /// Whether the pool is saturated per the configured detector (never without one).
    pub fn is_saturated(&self, candidates: &[Candidate]) -> bool {
        self.inner
            .detector
            .as_ref()
            .is_some_and(|d| d.is_saturated(candidates))
    }

    /// Whether one endpoint can take another request per the configured detector (always
    /// without one).
    pub fn has_capacity(&self, candidate: &Candidate) -> bool {
        self.inner
            .detector
            .as_ref()
            .is_none_or(|d| d.has_capacity(candidate))
    }

    /// Whether this request bypasses saturation-based admission (the profile handler says so,
    /// for example when latency prediction sheds instead).
    pub fn skip_saturation_detection(&self, request: &LlmRequest) -> bool {
        self.inner.handler.skip_saturation_detection(request)
    }

    /// Upstream's legacy admission: a sheddable request (priority < 0) is rejected with 429
    /// when the pool is saturated, unless the profile handler opts out.
    pub fn legacy_admit(
        &self,
        request: &LlmRequest,
        candidates: &[Candidate],
    ) -> Result<(), ScheduleError> {
        if request.priority < 0
            && !self.skip_saturation_detection(request)
            && self.is_saturated(candidates)
        {
            return Err(ScheduleError::Shed {
                plugin: "saturation-detector".to_owned(),
                reason: "the pool is saturated and the request is sheddable (priority < 0)"
                    .to_owned(),
            });
        }
        Ok(())
    }

    /// Tells plugins with per-endpoint state to forget endpoints for which `keep` is false.
    /// Call it when endpoints leave the pool.
    pub fn retain_endpoints(&self, keep: &dyn Fn(&EndpointKey) -> bool) {
        for p in &self.inner.endpoint_aware {
            p.retain_endpoints(keep);
        }
    }

    /// Runs `f`, reporting its duration to the observer when there is one.
    #[inline]
    fn timed<R>(&self, point: ExtensionPoint, name: &str, f: impl FnOnce() -> R) -> R {
        match &self.inner.observer {
            None => f(),
            Some(o) => {
                let start = Instant::now();
                let r = f();
                let types = &self.inner.plugin_types;
                let type_name = types
                    .iter()
                    .find(|(n, _)| std::ptr::eq(n.as_ptr(), name.as_ptr()))
                    .or_else(|| types.iter().find(|(n, _)| &**n == name))
                    .map_or("", |(_, t)| &**t);
                o.plugin_duration(point, type_name, name, start.elapsed());
                r
            }
        }
    }

    /// Entries held by plugins with per-endpoint state (the prefix index's (block, endpoint)
    /// pairs): the value of upstream's `inference_extension_prefix_indexer_size`. Takes each
    /// endpoint's lock briefly; meant for a periodic gauge refresh, not the request path.
    pub fn endpoint_state_size(&self) -> usize {
        self.inner
            .endpoint_aware
            .iter()
            .map(|p| p.state_size())
            .sum()
    }

    fn new_cycle(&self, request: &LlmRequest) -> Cycle {
        let mut h = xxhash_rust::xxh64::Xxh64::new(self.inner.seed);
        h.write(request.request_id.as_bytes());
        if request.request_id.is_empty() {
            h.write_u64(self.inner.counter.fetch_add(1, Ordering::Relaxed));
        }
        Cycle {
            state: CycleState::new(),
            rng: SmallRng::seed_from_u64(h.finish()),
            now: self.inner.clock.now(),
        }
    }

    /// Decides where the request goes: data producers, admitters, then the profiles the
    /// profile handler picks (filters → weighted scorers → picker), then the primary result.
    pub fn schedule(
        &self,
        request: &LlmRequest,
        candidates: &[Candidate],
    ) -> Result<Scheduled, ScheduleError> {
        let Some(observer) = &self.inner.observer else {
            return self.schedule_inner(request, candidates);
        };
        let start = Instant::now();
        let result = self.schedule_inner(request, candidates);
        observer.schedule_duration(start.elapsed());
        if let Ok(s) = &result
            && let Some(info) = s
                .cycle
                .state
                .get::<PrefixMatchInfo>(keys::PREFIX_CACHE_MATCH_INFO)
            && let Some(target) = s.result.primary().and_then(|r| r.targets.first())
            && info.total_blocks() > 0
        {
            let matched = info.matched.get(*target).copied().unwrap_or(0) as usize;
            observer.prefix_match(matched, info.total_blocks(), info.block_size_tokens);
        }
        result
    }

    fn schedule_inner(
        &self,
        request: &LlmRequest,
        candidates: &[Candidate],
    ) -> Result<Scheduled, ScheduleError> {
        if candidates.is_empty() {
            return Err(ScheduleError::NoCandidates);
        }
        let inner = &*self.inner;
        let mut cycle = self.new_cycle(request);
        for (name, p) in &inner.producers {
            if let Err(e) = self.timed(ExtensionPoint::PrepareData, name, || {
                p.produce(&mut cycle, request, candidates)
            }) {
                tracing::debug!(plugin = &**name, error = %e, "data producer failed; scheduling without its data");
            }
        }
        for (name, a) in &inner.admitters {
            self.timed(ExtensionPoint::Admitter, name, || {
                a.admit(&mut cycle, request, candidates)
            })
            .map_err(|reason| ScheduleError::Shed {
                plugin: name.to_string(),
                reason,
            })?;
        }

        let n_profiles = inner.profiles.len();
        let mut results: Vec<Option<Result<ProfileRunResult, ProfileFailure>>> =
            vec![None; n_profiles];
        let mut ran = Vec::with_capacity(n_profiles);
        // Bounded rounds: a handler that keeps returning profiles cannot loop forever.
        for _ in 0..=n_profiles {
            let picks = self.timed(ExtensionPoint::ProfilePicker, &inner.handler_name, || {
                inner.handler.pick_profiles(
                    &mut cycle,
                    request,
                    &ProfileRuns {
                        names: &inner.profile_names,
                        results: &results,
                    },
                )
            });
            let mut any = false;
            for i in picks {
                if i >= n_profiles || results[i].is_some() {
                    continue;
                }
                any = true;
                let r = self.run_profile(&inner.profiles[i], &mut cycle, request, candidates)?;
                results[i] = Some(r);
                ran.push(i);
            }
            if !any {
                break;
            }
        }
        if !results.iter().any(|r| matches!(r, Some(Ok(_)))) {
            let reason = results
                .iter()
                .flatten()
                .filter_map(|r| r.as_ref().err())
                .map(|f| format!("profile {:?}: {}", &*f.profile, f.reason))
                .collect::<Vec<_>>()
                .join("; ");
            return Err(ScheduleError::AllFiltered {
                reason: if reason.is_empty() {
                    "no profile ran".to_owned()
                } else {
                    reason
                },
            });
        }
        let primary = self
            .timed(
                ExtensionPoint::ProcessProfilesResults,
                &inner.handler_name,
                || {
                    inner.handler.process_results(
                        &mut cycle,
                        request,
                        &ProfileRuns {
                            names: &inner.profile_names,
                            results: &results,
                        },
                    )
                },
            )
            .map_err(|e| match e {
                PluginError::Shed(reason) => ScheduleError::Shed {
                    plugin: inner.handler_name.to_string(),
                    reason,
                },
                PluginError::Internal(message) => ScheduleError::Internal {
                    plugin: inner.handler_name.to_string(),
                    message,
                },
            })?;
        let targets: Vec<Candidate> = match results.get(primary) {
            Some(Some(Ok(r))) => r.target_candidates.clone(),
            _ => {
                return Err(ScheduleError::Internal {
                    plugin: inner.handler_name.to_string(),
                    message: format!("chose primary profile #{primary}, which has no result"),
                });
            }
        };
        if targets.is_empty() {
            return Err(ScheduleError::AllFiltered {
                reason: "the primary profile's picker chose no endpoint".to_owned(),
            });
        }
        let primary_profile = inner.profile_names[primary].clone();
        let profile_results = ran.into_iter().filter_map(|i| results[i].take()).collect();
        Ok(Scheduled {
            result: SchedulingResult {
                primary_profile,
                profile_results,
                targets,
            },
            cycle,
            accounted_tokens: None,
            in_prefill: false,
            completed: false,
            served: None,
        })
    }

    fn run_profile(
        &self,
        profile: &LoadedProfile,
        cycle: &mut Cycle,
        request: &LlmRequest,
        candidates: &[Candidate],
    ) -> Result<Result<ProfileRunResult, ProfileFailure>, ScheduleError> {
        // The buffers are taken out of the thread's scratch (not borrowed), so a plugin that
        // schedules re-entrantly on this thread just gets fresh ones.
        let mut scratch = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
        let r = self.run_profile_with(&mut scratch, profile, cycle, request, candidates);
        if scratch.eps.capacity() <= MAX_SCRATCH {
            SCRATCH.with(|s| *s.borrow_mut() = scratch);
        }
        r
    }

    fn run_profile_with(
        &self,
        scratch: &mut Scratch,
        profile: &LoadedProfile,
        cycle: &mut Cycle,
        request: &LlmRequest,
        candidates: &[Candidate],
    ) -> Result<Result<ProfileRunResult, ProfileFailure>, ScheduleError> {
        let plugin_err = |name: &Arc<str>, e: PluginError| match e {
            PluginError::Shed(reason) => ScheduleError::Shed {
                plugin: name.to_string(),
                reason,
            },
            PluginError::Internal(message) => ScheduleError::Internal {
                plugin: name.to_string(),
                message,
            },
        };
        let Scratch { eps, totals, buf } = scratch;
        eps.clear();
        eps.extend(0..candidates.len());
        for (name, f) in &profile.filters {
            self.timed(ExtensionPoint::Filter, name, || {
                f.filter(cycle, request, candidates, eps)
            })
            .map_err(|e| plugin_err(name, e))?;
            if eps.is_empty() {
                return Ok(Err(ProfileFailure {
                    profile: profile.name.clone(),
                    reason: format!("filter {:?} removed every endpoint", &**name),
                }));
            }
        }
        let m = eps.len();
        totals.clear();
        totals.resize(m, 0.0);
        buf.clear();
        buf.resize(m, 0.0);
        let mut scorer_scores = Vec::new();
        for (name, s, weight) in &profile.scorers {
            buf.fill(0.0);
            self.timed(ExtensionPoint::Scorer, name, || {
                s.score(cycle, request, candidates, eps, buf)
            })
            .map_err(|e| plugin_err(name, e))?;
            for (t, v) in totals.iter_mut().zip(buf.iter_mut()) {
                *v = if v.is_nan() { 0.0 } else { v.clamp(0.0, 1.0) };
                *t += *v * weight;
            }
            if self.inner.record_scores {
                scorer_scores.push(ScorerScores {
                    scorer: name.clone(),
                    weight: *weight,
                    scores: buf.clone(),
                });
            }
        }
        let mut scored: Vec<ScoredEndpoint> = eps
            .iter()
            .zip(totals.iter())
            .map(|(&index, &score)| ScoredEndpoint { index, score })
            .collect();
        let mut targets = Vec::with_capacity(1);
        self.timed(ExtensionPoint::Picker, &profile.picker.0, || {
            profile.picker.1.pick(cycle, &mut scored, &mut targets)
        });
        if !scored.is_sorted_by_key(|s| s.index) {
            scored.sort_unstable_by_key(|s| s.index);
        }
        if targets.is_empty() {
            return Ok(Err(ProfileFailure {
                profile: profile.name.clone(),
                reason: format!("picker {:?} chose no endpoint", &*profile.picker.0),
            }));
        }
        let target_candidates = targets
            .iter()
            .filter_map(|&i| candidates.get(i).cloned())
            .collect();
        Ok(Ok(ProfileRunResult {
            profile: profile.name.clone(),
            targets,
            target_candidates,
            scored,
            scorer_scores,
        }))
    }

    /// Runs the PreRequest plugins and counts the request as in flight on its target. Call it
    /// once, after the pick and before forwarding; later calls do nothing.
    pub fn pre_request(&self, request: &LlmRequest, scheduled: &mut Scheduled) {
        if scheduled.accounted_tokens.is_some() || scheduled.completed {
            return;
        }
        let Some(target) = scheduled.result.targets.first() else {
            return;
        };
        let tokens = uncached_tokens(request, scheduled);
        target.in_flight.add(tokens);
        scheduled.accounted_tokens = Some(tokens);
        scheduled.in_prefill = true;
        for (name, p) in &self.inner.pre_requests {
            self.timed(ExtensionPoint::PreRequest, name, || {
                p.pre_request(&mut scheduled.cycle, request, &scheduled.result)
            });
        }
    }

    /// Tells response plugins the response headers arrived; returns headers to add to the
    /// response (for example `x-session-token`).
    pub fn response_headers(
        &self,
        request: &LlmRequest,
        scheduled: &mut Scheduled,
        headers: &[(String, String)],
    ) -> Vec<(String, String)> {
        let mut add = Vec::new();
        if scheduled.completed {
            return add;
        }
        for (name, p) in &self.inner.response_hooks {
            self.timed(ExtensionPoint::ResponseReceived, name, || {
                p.on_response_headers(
                    &mut scheduled.cycle,
                    request,
                    &scheduled.result,
                    headers,
                    &mut add,
                )
            });
        }
        add
    }

    /// Tells response plugins about one response body chunk.
    pub fn response_chunk(
        &self,
        request: &LlmRequest,
        scheduled: &mut Scheduled,
        chunk: ResponseChunk<'_>,
    ) {
        if scheduled.completed {
            return;
        }
        if !chunk.data.is_empty() {
            scheduled.end_prefill();
            if let Some(t) = scheduled.accounted_on() {
                t.in_flight.observe_chunk(self.inner.clock.now());
            }
        }
        for (name, p) in &self.inner.response_hooks {
            self.timed(ExtensionPoint::ResponseStreaming, name, || {
                p.on_response_chunk(&mut scheduled.cycle, request, &scheduled.result, chunk)
            });
        }
    }

    /// The data plane reports that `served`, not the endpoint the request is counted on,
    /// served it (Envoy retried on a fallback): moves the request's in-flight counts (and
    /// its prefill phase) there and tells response plugins ([`ResponseHooks::on_served`]).
    /// The caller vouches that `served` is an endpoint of the pool. Returns whether anything
    /// moved: nothing does before [`pre_request`](Self::pre_request), after completion, or
    /// when `served` is where the request already counts.
    pub fn served_by(
        &self,
        request: &LlmRequest,
        scheduled: &mut Scheduled,
        served: Candidate,
    ) -> bool {
        if scheduled.completed {
            return false;
        }
        let Some(tokens) = scheduled.accounted_tokens else {
            return false;
        };
        let Some(current) = scheduled.accounted_on() else {
            return false;
        };
        if current.endpoint.key == served.endpoint.key {
            return false;
        }
        current.in_flight.remove(tokens, scheduled.in_prefill);
        served.in_flight.add(tokens);
        if !scheduled.in_prefill {
            served.in_flight.end_prefill(tokens);
        }
        scheduled.served = Some(served);
        // Not timed: there is no extension point for it in upstream's plugin metrics, and it
        // happens only on retries.
        if let Some(served) = &scheduled.served {
            for (_, p) in &self.inner.response_hooks {
                p.on_served(&mut scheduled.cycle, request, &scheduled.result, served);
            }
        }
        true
    }

    /// Reports how the request ended and releases its in-flight counts. Safe to call more than
    /// once (only the first call counts), so every exit path of the picker may call it.
    pub fn complete(&self, request: &LlmRequest, scheduled: &mut Scheduled, outcome: Outcome) {
        if scheduled.completed {
            return;
        }
        scheduled.completed = true;
        scheduled.release();
        for (name, p) in &self.inner.response_hooks {
            self.timed(ExtensionPoint::ResponseComplete, name, || {
                p.on_complete(&mut scheduled.cycle, request, &scheduled.result, &outcome)
            });
        }
    }
}

/// Per-thread buffers for a profile run: the surviving endpoints and the score sums.
#[derive(Debug, Default)]
struct Scratch {
    eps: Vec<usize>,
    totals: Vec<f64>,
    buf: Vec<f64>,
}

/// Scratch larger than this (endpoints) is freed after use rather than kept per thread.
const MAX_SCRATCH: usize = 1 << 16;

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// Prompt tokens the target has to compute: the prompt minus what its prefix cache holds.
fn uncached_tokens(request: &LlmRequest, scheduled: &Scheduled) -> u64 {
    let prompt = u64::from(request.prompt_tokens);
    let Some(target) = scheduled
        .result
        .primary()
        .and_then(|r| r.targets.first().copied())
    else {
        return prompt;
    };
    match scheduled
        .cycle
        .state
        .get::<PrefixMatchInfo>(keys::PREFIX_CACHE_MATCH_INFO)
    {
        Some(info) => {
            let hit = info.score(target);
            // Rounding down the cached share keeps the estimate conservative (more load).
            prompt - (prompt as f64 * hit).floor().min(prompt as f64) as u64
        }
        None => prompt,
    }
}

/// Orders producers so that every consumer of a key runs after its producers (Kahn's
/// algorithm; declaration order breaks ties). A dependency cycle keeps declaration order for
/// the rest and is logged.
fn order_producers(
    producers: Vec<(Arc<str>, Arc<dyn DataProducer>)>,
) -> Vec<(Arc<str>, Arc<dyn DataProducer>)> {
    let n = producers.len();
    let mut indegree = vec![0usize; n];
    let mut edges = vec![Vec::new(); n];
    for (i, (_, a)) in producers.iter().enumerate() {
        for (j, (_, b)) in producers.iter().enumerate() {
            if i != j && a.produces().iter().any(|k| b.consumes().contains(k)) {
                edges[i].push(j);
                indegree[j] += 1;
            }
        }
    }
    let mut done = vec![false; n];
    let mut order = Vec::with_capacity(n);
    while order.len() < n {
        let next = (0..n).find(|&i| !done[i] && indegree[i] == 0).or_else(|| {
            tracing::warn!("data producers depend on each other in a cycle; running the rest in declaration order");
            (0..n).find(|&i| !done[i])
        });
        let Some(i) = next else { break };
        done[i] = true;
        order.push(i);
        for &j in &edges[i] {
            indegree[j] = indegree[j].saturating_sub(1);
        }
    }
    let mut slots: Vec<Option<_>> = producers.into_iter().map(Some).collect();
    order.into_iter().filter_map(|i| slots[i].take()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}

    #[test]
    fn handles_cross_threads_and_await_points() {
        // The picker shares the scheduler between tasks and keeps a request's `Scheduled`
        // across awaits.
        send_sync::<Scheduler>();
        send::<Scheduled>();
        send_sync::<SchedulingResult>();
    }

    #[test]
    fn producers_are_ordered_by_their_data_dependencies() {
        #[derive(Debug)]
        struct P(&'static [&'static str], &'static [&'static str]);
        impl DataProducer for P {
            fn produces(&self) -> &[&'static str] {
                self.0
            }
            fn consumes(&self) -> &[&'static str] {
                self.1
            }
            fn produce(
                &self,
                _: &mut Cycle,
                _: &LlmRequest,
                _: &[Candidate],
            ) -> Result<(), PluginError> {
                Ok(())
            }
        }
        let ps: Vec<(Arc<str>, Arc<dyn DataProducer>)> = vec![
            ("c".into(), Arc::new(P(&[], &["B"]))),
            ("b".into(), Arc::new(P(&["B"], &["A"]))),
            ("a".into(), Arc::new(P(&["A"], &[]))),
            ("x".into(), Arc::new(P(&[], &[]))),
        ];
        let names: Vec<String> = order_producers(ps)
            .into_iter()
            .map(|(n, _)| n.to_string())
            .collect();
        assert_eq!(names, ["a", "b", "c", "x"]);
    }

    #[test]
    fn a_served_fallback_takes_over_the_in_flight_counts_in_the_same_phase() {
        let s = Scheduler::from_config(&EndpointPickerConfig::default()).unwrap();
        let cands: Vec<Candidate> = ["10.0.0.1:8000", "10.0.0.2:8000"]
            .iter()
            .map(|a| {
                Candidate::new(
                    Arc::new(sluice_core::Endpoint::from_address(
                        "default",
                        a.parse().unwrap(),
                    )),
                    Default::default(),
                )
            })
            .collect();
        let counts = |c: &Candidate| {
            (
                c.in_flight.requests(),
                c.in_flight.tokens(),
                c.in_flight.prefill_requests(),
            )
        };
        let req = LlmRequest {
            request_id: "r".into(),
            target_model: "m".into(),
            prompt_tokens: 10,
            ..Default::default()
        };
        let mut sched = s.schedule(&req, &cands).unwrap();
        let fallback = |sched: &Scheduled| {
            let picked = &sched.result.targets[0].endpoint.key;
            cands
                .iter()
                .find(|c| &c.endpoint.key != picked)
                .unwrap()
                .clone()
        };
        let other = fallback(&sched);
        assert!(
            !s.served_by(&req, &mut sched, other.clone()),
            "nothing is counted before pre_request"
        );
        s.pre_request(&req, &mut sched);
        let picked = sched.result.targets[0].clone();
        assert!(s.served_by(&req, &mut sched, other.clone()));
        assert_eq!(counts(&picked), (0, 0, 0));
        assert_eq!(
            counts(&other),
            (1, 10, 1),
            "still waiting for its first token"
        );
        assert!(
            !s.served_by(&req, &mut sched, other.clone()),
            "already there"
        );
        s.response_chunk(
            &req,
            &mut sched,
            ResponseChunk {
                data: b"x",
                end_of_stream: false,
            },
        );
        assert_eq!(counts(&other), (1, 10, 0));
        // Served back on the pick after its first token: it arrives there decoding.
        assert!(s.served_by(&req, &mut sched, picked.clone()));
        assert_eq!((counts(&picked), counts(&other)), ((1, 10, 0), (0, 0, 0)));
        s.complete(&req, &mut sched, Outcome::Success);
        assert_eq!((counts(&picked), counts(&other)), ((0, 0, 0), (0, 0, 0)));
        assert!(!s.served_by(&req, &mut sched, other.clone()), "completed");
        assert_eq!((counts(&picked), counts(&other)), ((0, 0, 0), (0, 0, 0)));
    }
}
