//! Request lifecycle hooks, in-flight accounting, saturation/admission, randomness, and the
//! framework's extension points as other crates (the SLO plugins) will use them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

mod common;

use std::sync::Arc;

use common::*;
use parking_lot::Mutex;
use sluice_scheduling::cycle::keys;
use sluice_scheduling::plugins::PrefixMatchInfo;
use sluice_scheduling::{
    Admitter, Candidate, Cycle, DataProducer, LlmRequest, Outcome, Plugin, PluginError, PreRequest,
    ProfileHandler, ProfileRuns, Registry, ResponseChunk, ResponseHooks, ScheduleError,
    SchedulingResult, Scorer, ScorerCategory, TypedName,
};

/// Records every hook call it receives.
#[derive(Debug)]
struct Recorder {
    name: TypedName,
    events: Arc<Mutex<Vec<String>>>,
}

impl Plugin for Recorder {
    fn typed_name(&self) -> &TypedName {
        &self.name
    }
    fn as_pre_request(self: Arc<Self>) -> Option<Arc<dyn PreRequest>> {
        Some(self)
    }
    fn as_response_hooks(self: Arc<Self>) -> Option<Arc<dyn ResponseHooks>> {
        Some(self)
    }
}

impl PreRequest for Recorder {
    fn pre_request(&self, _: &mut Cycle, r: &LlmRequest, res: &SchedulingResult) {
        self.events.lock().push(format!(
            "pre {} -> {}",
            r.request_id,
            res.destination_header()
        ));
    }
}

impl ResponseHooks for Recorder {
    fn on_response_headers(
        &self,
        _: &mut Cycle,
        r: &LlmRequest,
        _: &SchedulingResult,
        h: &[(String, String)],
        _: &mut Vec<(String, String)>,
    ) {
        self.events
            .lock()
            .push(format!("headers {} {}", r.request_id, h.len()));
    }
    fn on_response_chunk(
        &self,
        _: &mut Cycle,
        r: &LlmRequest,
        _: &SchedulingResult,
        c: ResponseChunk<'_>,
    ) {
        self.events.lock().push(format!(
            "chunk {} {} eos={}",
            r.request_id,
            c.data.len(),
            c.end_of_stream
        ));
    }
    fn on_complete(&self, _: &mut Cycle, r: &LlmRequest, _: &SchedulingResult, o: &Outcome) {
        self.events
            .lock()
            .push(format!("complete {} {o:?}", r.request_id));
    }
}

fn recorder_registry(events: &Arc<Mutex<Vec<String>>>) -> Registry {
    let mut r = Registry::with_builtins();
    let ev = events.clone();
    r.register("recorder", move |init| {
        Ok(Arc::new(Recorder {
            name: init.typed_name.clone(),
            events: ev.clone(),
        }))
    })
    .unwrap();
    r
}

#[test]
fn hooks_are_called_in_order_and_completion_exactly_once() {
    let events = Arc::new(Mutex::new(Vec::new()));
    let s = scheduler_with(
        "plugins: [{type: queue-scorer}, {type: recorder}]",
        &recorder_registry(&events),
    );
    let cands = candidates(&[pod(5, 0.0), pod(0, 0.0)]);
    let req = request("r1", "m");
    let mut sched = s.schedule(&req, &cands).unwrap();
    s.pre_request(&req, &mut sched);
    s.pre_request(&req, &mut sched); // ignored
    s.response_headers(
        &req,
        &mut sched,
        &[("content-type".into(), "text/event-stream".into())],
    );
    s.response_chunk(
        &req,
        &mut sched,
        ResponseChunk {
            data: b"data: {}",
            end_of_stream: false,
        },
    );
    s.response_chunk(
        &req,
        &mut sched,
        ResponseChunk {
            data: b"",
            end_of_stream: true,
        },
    );
    s.complete(&req, &mut sched, Outcome::ClientDisconnected);
    s.complete(&req, &mut sched, Outcome::Success); // ignored
    s.response_chunk(
        &req,
        &mut sched,
        ResponseChunk {
            data: b"late",
            end_of_stream: true,
        },
    ); // ignored
    assert_eq!(
        *events.lock(),
        [
            "pre r1 -> 192.168.1.2:8000",
            "headers r1 1",
            "chunk r1 8 eos=false",
            "chunk r1 0 eos=true",
            "complete r1 ClientDisconnected",
        ]
    );
}

#[test]
fn in_flight_counts_follow_every_exit_path() {
    let s = scheduler("plugins: [{type: queue-scorer}]");
    let cands = candidates(&[pod(0, 0.0)]);
    let target = &cands[0].in_flight;
    let mut req = request("a", "m");
    req.prompt_tokens = 100;

    let mut a = s.schedule(&req, &cands).unwrap();
    assert_eq!(
        (target.requests(), target.tokens()),
        (0, 0),
        "nothing counted before pre_request"
    );
    s.pre_request(&req, &mut a);
    let mut b = s.schedule(&req, &cands).unwrap();
    s.pre_request(&req, &mut b);
    let mut c = s.schedule(&req, &cands).unwrap();
    s.pre_request(&req, &mut c);
    let mut d = s.schedule(&req, &cands).unwrap();
    s.pre_request(&req, &mut d);
    assert_eq!((target.requests(), target.tokens()), (4, 400));

    s.complete(&req, &mut a, Outcome::Success);
    s.complete(&req, &mut a, Outcome::Success);
    assert_eq!(
        (target.requests(), target.tokens()),
        (3, 300),
        "a second completion must not count twice"
    );
    s.complete(
        &req,
        &mut b,
        Outcome::Failed {
            reason: "503 from upstream".into(),
        },
    );
    s.complete(&req, &mut c, Outcome::ClientDisconnected);
    assert_eq!((target.requests(), target.tokens()), (1, 100));
    drop(d); // the picker lost track of it: the counters still come back
    assert_eq!((target.requests(), target.tokens()), (0, 0));

    // A decision that never reached pre_request counts nothing, even when dropped.
    let e = s.schedule(&req, &cands).unwrap();
    drop(e);
    assert_eq!((target.requests(), target.tokens()), (0, 0));
}

#[test]
fn prefill_counts_end_at_the_first_response_bytes_and_on_every_exit() {
    let s = scheduler("plugins: [{type: queue-scorer}]");
    let cands = candidates(&[pod(0, 0.0)]);
    let target = &cands[0].in_flight;
    let prefill = || (target.prefill_requests(), target.prefill_tokens());
    let mut req = request("a", "m");
    req.prompt_tokens = 100;
    let mut a = s.schedule(&req, &cands).unwrap();
    s.pre_request(&req, &mut a);
    let mut b = s.schedule(&req, &cands).unwrap();
    s.pre_request(&req, &mut b);
    assert_eq!(prefill(), (2, 200), "both wait for their first token");

    let empty = ResponseChunk {
        data: b"",
        end_of_stream: false,
    };
    s.response_chunk(&req, &mut a, empty);
    assert_eq!(prefill(), (2, 200), "an empty chunk is not a first token");
    let first = ResponseChunk {
        data: b"data: {}",
        end_of_stream: false,
    };
    s.response_chunk(&req, &mut a, first);
    s.response_chunk(&req, &mut a, first);
    assert_eq!(prefill(), (1, 100), "a's first bytes end its prefill, once");
    assert_eq!(
        (target.requests(), target.tokens()),
        (2, 200),
        "a is still in flight (decoding)"
    );
    s.complete(&req, &mut a, Outcome::Success);
    assert_eq!(
        prefill(),
        (1, 100),
        "completing a decoding request leaves prefill alone"
    );
    s.complete(&req, &mut b, Outcome::ClientDisconnected);
    assert_eq!(
        prefill(),
        (0, 0),
        "a request that never answered leaves prefill on completion"
    );
    assert_eq!((target.requests(), target.tokens()), (0, 0));
}

#[test]
fn in_flight_tokens_exclude_the_cached_prefix() {
    let s = scheduler("plugins: [{type: prefix-cache-scorer, parameters: {autoTune: false}}]");
    let cands = candidates(&[pod(0, 0.0)]);
    let prompt: String = (0..8).map(|i| format!("{i:064}")).collect();
    let mut warm = request("w", "m");
    warm.prompt = prompt[..4 * 64].to_owned().into();
    let mut w = s.schedule(&warm, &cands).unwrap();
    s.pre_request(&warm, &mut w);
    s.complete(&warm, &mut w, Outcome::Success);

    let mut req = request("r", "m");
    req.prompt = prompt.into();
    req.prompt_tokens = 128;
    let mut r = s.schedule(&req, &cands).unwrap();
    let info = r
        .cycle
        .state
        .get::<PrefixMatchInfo>(keys::PREFIX_CACHE_MATCH_INFO)
        .unwrap();
    assert_eq!((info.matched[0], info.total_blocks()), (4, 8));
    s.pre_request(&req, &mut r);
    assert_eq!(cands[0].in_flight.tokens(), 64, "half the prompt is cached");
    s.complete(&req, &mut r, Outcome::Success);
    assert_eq!(cands[0].in_flight.tokens(), 0);
}

#[test]
fn session_affinity_round_trip_through_response_headers() {
    let s = scheduler(
        "plugins: [{type: session-affinity-scorer}, {type: queue-scorer}]\n\
         schedulingProfiles: [{name: a, plugins: [{pluginRef: session-affinity-scorer, weight: 10}, {pluginRef: queue-scorer}]}]",
    );
    let mut cands = candidates(&[pod(0, 0.0), pod(5, 0.0), pod(5, 0.0)]);
    let req = request("r1", "m");
    let mut first = s.schedule(&req, &cands).unwrap();
    s.pre_request(&req, &mut first);
    let added = s.response_headers(&req, &mut first, &[]);
    assert_eq!(added.len(), 1);
    assert_eq!(added[0].0, "x-session-token");
    assert_eq!(pod_index(&first.result.targets[0]), 0);
    // The first pod is now the busiest; the session still returns to it.
    cands = candidates(&[pod(9, 0.0), pod(0, 0.0), pod(0, 0.0)]);
    let mut next = request("r2", "m");
    next.headers.push(added[0].clone());
    let again = s.schedule(&next, &cands).unwrap();
    assert_eq!(pod_index(&again.result.targets[0]), 0);
}

/// A scorer that sheds requests for one model, like the SLO scorer sheds requests that no
/// endpoint can serve in time.
#[derive(Debug)]
struct Shedder(TypedName);

impl Plugin for Shedder {
    fn typed_name(&self) -> &TypedName {
        &self.0
    }
    fn as_scorer(self: Arc<Self>) -> Option<Arc<dyn Scorer>> {
        Some(self)
    }
}

impl Scorer for Shedder {
    fn category(&self) -> ScorerCategory {
        ScorerCategory::Balance
    }
    fn score(
        &self,
        _: &mut Cycle,
        r: &LlmRequest,
        _: &[Candidate],
        _: &[usize],
        _: &mut [f64],
    ) -> Result<(), PluginError> {
        if r.target_model == "doomed" {
            Err(PluginError::Shed("no endpoint meets the TTFT SLO".into()))
        } else {
            Ok(())
        }
    }
}

/// Rejects sheddable requests.
#[derive(Debug)]
struct Gate(TypedName);

impl Plugin for Gate {
    fn typed_name(&self) -> &TypedName {
        &self.0
    }
    fn as_admitter(self: Arc<Self>) -> Option<Arc<dyn Admitter>> {
        Some(self)
    }
}

impl Admitter for Gate {
    fn admit(&self, _: &mut Cycle, r: &LlmRequest, _: &[Candidate]) -> Result<(), String> {
        if r.priority < 0 {
            Err("sheddable requests are closed".into())
        } else {
            Ok(())
        }
    }
}

#[test]
fn a_scorer_or_an_admitter_can_shed_with_429() {
    let mut reg = Registry::with_builtins();
    reg.register("shedder", |i| Ok(Arc::new(Shedder(i.typed_name.clone()))))
        .unwrap();
    reg.register("gate", |i| Ok(Arc::new(Gate(i.typed_name.clone()))))
        .unwrap();
    let s = scheduler_with(
        "plugins: [{type: shedder}, {name: slo-gate, type: gate}]",
        &reg,
    );
    let cands = candidates(&[pod(0, 0.0)]);
    let err = s.schedule(&request("r", "doomed"), &cands).unwrap_err();
    assert_eq!(
        err,
        ScheduleError::Shed {
            plugin: "shedder".into(),
            reason: "no endpoint meets the TTFT SLO".into()
        }
    );
    assert_eq!(err.http_status(), 429);
    let mut low = request("r", "fine");
    low.priority = -1;
    let err = s.schedule(&low, &cands).unwrap_err();
    assert_eq!(err.http_status(), 429);
    assert!(
        err.to_string().contains("slo-gate") && err.to_string().contains("closed"),
        "{err}"
    );
    assert!(s.schedule(&request("r", "fine"), &cands).is_ok());
}

/// Runs profile `prefix` first, reads the prefix producer's per-endpoint scores from the
/// cycle state, then runs `main`; `main` is primary. Opts out of saturation detection.
#[derive(Debug)]
struct TwoStage(TypedName, Arc<Mutex<Vec<f64>>>);

impl Plugin for TwoStage {
    fn typed_name(&self) -> &TypedName {
        &self.0
    }
    fn as_profile_handler(self: Arc<Self>) -> Option<Arc<dyn ProfileHandler>> {
        Some(self)
    }
}

impl ProfileHandler for TwoStage {
    fn pick_profiles(
        &self,
        cycle: &mut Cycle,
        _: &LlmRequest,
        runs: &ProfileRuns<'_>,
    ) -> Vec<usize> {
        let (Some(p), Some(m)) = (runs.index_of("prefix"), runs.index_of("main")) else {
            return vec![];
        };
        match (&runs.results[p], &runs.results[m]) {
            (None, _) => vec![p],
            (Some(_), None) => {
                if let Some(info) = cycle
                    .state
                    .get::<PrefixMatchInfo>(keys::PREFIX_CACHE_MATCH_INFO)
                {
                    *self.1.lock() = (0..info.matched.len()).map(|i| info.score(i)).collect();
                }
                vec![m]
            }
            _ => vec![],
        }
    }
    fn process_results(
        &self,
        _: &mut Cycle,
        _: &LlmRequest,
        runs: &ProfileRuns<'_>,
    ) -> Result<usize, PluginError> {
        runs.index_of("main")
            .filter(|_| runs.result("main").is_some())
            .ok_or(PluginError::Internal("main failed".into()))
    }
    fn skip_saturation_detection(&self, _: &LlmRequest) -> bool {
        true
    }
}

#[test]
fn a_custom_profile_handler_chains_profiles_and_reads_cycle_state() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut reg = Registry::with_builtins();
    let s2 = seen.clone();
    reg.register("two-stage", move |i| {
        Ok(Arc::new(TwoStage(i.typed_name.clone(), s2.clone())))
    })
    .unwrap();
    let s = scheduler_with(
        "plugins: [{type: two-stage}, {type: prefix-cache-scorer, parameters: {autoTune: false}}, {type: queue-scorer}]\n\
         schedulingProfiles:\n\
         - {name: main, plugins: [{pluginRef: queue-scorer}]}\n\
         - {name: prefix, plugins: [{pluginRef: prefix-cache-scorer}]}",
        &reg,
    );
    let cands = candidates(&[pod(9, 0.95), pod(0, 0.95)]);
    let mut req = request("r", "m");
    req.prompt = "x".repeat(64 * 4).into();
    req.priority = -1;
    let sched = s.schedule(&req, &cands).unwrap();
    let order: Vec<&str> = sched
        .result
        .profile_results
        .iter()
        .map(|r| &*r.as_ref().unwrap().profile)
        .collect();
    assert_eq!(order, ["prefix", "main"]);
    assert_eq!(&*sched.result.primary_profile, "main");
    assert_eq!(pod_index(&sched.result.targets[0]), 1);
    assert_eq!(*seen.lock(), [0.0, 0.0]);
    // Saturated pool, sheddable request: legacy admission would shed, but the handler opts out.
    assert!(s.is_saturated(&cands));
    assert!(s.skip_saturation_detection(&req));
    assert!(s.legacy_admit(&req, &cands).is_ok());
}

/// Consumes the prefix info; declared before the producer.
#[derive(Debug)]
struct Consumer(TypedName, Arc<Mutex<Option<bool>>>);

impl Plugin for Consumer {
    fn typed_name(&self) -> &TypedName {
        &self.0
    }
    fn as_data_producer(self: Arc<Self>) -> Option<Arc<dyn DataProducer>> {
        Some(self)
    }
}

impl DataProducer for Consumer {
    fn produces(&self) -> &[&'static str] {
        &["PredictedLatency"]
    }
    fn consumes(&self) -> &[&'static str] {
        &[keys::PREFIX_CACHE_MATCH_INFO]
    }
    fn produce(
        &self,
        cycle: &mut Cycle,
        _: &LlmRequest,
        _: &[Candidate],
    ) -> Result<(), PluginError> {
        *self.1.lock() = Some(cycle.state.contains(keys::PREFIX_CACHE_MATCH_INFO));
        Err(PluginError::Internal("predictor unavailable".into()))
    }
}

#[test]
fn producers_run_in_dependency_order_and_their_errors_do_not_fail_scheduling() {
    let saw = Arc::new(Mutex::new(None));
    let mut reg = Registry::with_builtins();
    let s2 = saw.clone();
    reg.register("consumer", move |i| {
        Ok(Arc::new(Consumer(i.typed_name.clone(), s2.clone())))
    })
    .unwrap();
    let s = scheduler_with(
        "plugins: [{type: consumer}, {type: queue-scorer}, {type: prefix-cache-scorer}]",
        &reg,
    );
    s.schedule(&request("r", "m"), &candidates(&[pod(0, 0.0)]))
        .unwrap();
    assert_eq!(*saw.lock(), Some(true));
}

#[test]
fn legacy_admission_sheds_only_sheddable_requests_on_a_saturated_pool() {
    let s = scheduler(INTEGRATION_CONFIG);
    let saturated = candidates(&[pod(6, 0.2), pod(0, 0.85), pod(10, 0.9)]);
    let fine = candidates(&[pod(1, 0.2), pod(0, 0.1)]);
    let mut low = request("r", "m");
    low.priority = -1;
    assert!(s.is_saturated(&saturated));
    assert_eq!(
        s.legacy_admit(&low, &saturated).unwrap_err().http_status(),
        429
    );
    assert!(
        s.legacy_admit(&request("r", "m"), &saturated).is_ok(),
        "priority 0 is never shed"
    );
    assert!(s.legacy_admit(&low, &fine).is_ok());
    // Per-endpoint view for flow control.
    assert!(
        !s.has_capacity(&saturated[0])
            && !s.has_capacity(&saturated[1])
            && s.has_capacity(&fine[0])
    );
}

#[test]
fn utilization_saturation_is_the_mean_and_stale_or_missing_metrics_count_as_full() {
    let s = scheduler(INTEGRATION_CONFIG);
    // scores: max(1/5, 0.4/0.8) = 0.5; stale ⇒ 1; missing ⇒ 1; max(0, 0.2/0.8) = 0.25
    let cands = candidates(&[
        pod(1, 0.4),
        pod(0, 0.0).age_ms(201),
        pod(0, 0.0).no_metrics(),
        pod(0, 0.2),
    ]);
    assert!((s.saturation(&cands) - 2.75 / 4.0).abs() < 1e-12);
    assert_eq!(s.saturation(&[]), 1.0, "no candidates counts as saturated");
    assert!(s.is_saturated(&[]));
}

#[test]
fn concurrency_saturation_is_in_flight_over_capacity() {
    let s = scheduler(
        "plugins: [{type: queue-scorer}, {type: concurrency-detector, parameters: {maxConcurrency: 10}}]\n\
         schedulingProfiles: [{name: a, plugins: [{pluginRef: queue-scorer}]}]\n\
         saturationDetector: {pluginRef: concurrency-detector}",
    );
    let cands = candidates(&[pod(0, 0.0).in_flight(10, 0), pod(0, 0.0).in_flight(5, 0)]);
    assert!((s.saturation(&cands) - 0.75).abs() < 1e-12);
    assert!(!s.is_saturated(&cands));
    assert!(!s.has_capacity(&cands[0]) && s.has_capacity(&cands[1]));
}

fn pick_counts(yaml: &str, pods: &[Pod], n: usize) -> Vec<usize> {
    let s = scheduler(yaml);
    let cands = candidates(pods);
    let mut counts = vec![0; pods.len()];
    for i in 0..n {
        let sched = s
            .schedule(&request(&format!("req-{i}"), "m"), &cands)
            .unwrap();
        counts[pod_index(&sched.result.targets[0])] += 1;
    }
    counts
}

#[test]
fn weighted_random_picker_selects_in_proportion_to_score() {
    // KV 0.75 / 0.5 / 0 ⇒ scores 0.25 / 0.5 / 1 ⇒ probabilities 1/7, 2/7, 4/7.
    let n = 7000;
    let counts = pick_counts(
        "plugins: [{type: kv-cache-utilization-scorer}, {type: weighted-random-picker}]",
        &[pod(0, 0.75), pod(0, 0.5), pod(0, 0.0)],
        n,
    );
    for (c, want) in counts.iter().zip([1000.0, 2000.0, 4000.0]) {
        assert!(
            (*c as f64 - want).abs() < 0.06 * want + 60.0,
            "counts {counts:?}"
        );
    }
}

#[test]
fn random_picker_is_uniform_and_max_score_breaks_ties_at_random() {
    let n = 3000;
    for yaml in [
        "plugins: [{type: kv-cache-utilization-scorer}, {type: random-picker}]",
        "plugins: [{type: queue-scorer}]",
    ] {
        let counts = pick_counts(yaml, &[pod(0, 0.9), pod(0, 0.0), pod(0, 0.5)], n);
        assert!(
            counts.iter().all(|&c| (c as f64 - 1000.0).abs() < 120.0),
            "{yaml}: {counts:?}"
        );
    }
}

#[test]
fn same_seed_and_request_id_give_the_same_pick() {
    let pods = [pod(0, 0.0), pod(0, 0.0), pod(0, 0.0), pod(0, 0.0)];
    let a = pick_counts("plugins: [{type: random-picker}]", &pods, 50);
    let b = pick_counts("plugins: [{type: random-picker}]", &pods, 50);
    assert_eq!(a, b);
}

#[test]
fn departed_endpoints_lose_their_prefix_affinity() {
    let s = scheduler("plugins: [{type: prefix-cache-scorer, parameters: {autoTune: false}}]");
    let cands = candidates(&[pod(0, 0.0), pod(0, 0.0)]);
    let mut req = request("w", "m");
    req.prompt = "y".repeat(64 * 3).into();
    let mut w = s.schedule(&req, &cands[1..]).unwrap();
    s.pre_request(&req, &mut w);
    let score = |s: &sluice_scheduling::Scheduler| {
        let r = s.schedule(&req, &cands).unwrap();
        r.result.primary().unwrap().scorer_scores[0].scores.clone()
    };
    assert_eq!(score(&s), [0.0, 1.0]);
    assert_eq!(s.endpoint_state_size(), 3, "three blocks on one endpoint");
    s.retain_endpoints(&|k| &*k.pod != "pod-1");
    assert_eq!(score(&s), [0.0, 0.0]);
    assert_eq!(s.endpoint_state_size(), 0);
}

#[test]
fn the_prefix_index_survives_a_scheduler_rebuild_with_the_same_shared_state() {
    use sluice_scheduling::{Scheduler, SchedulerOptions, SharedState, parse_config_text};
    let build = |shared: &SharedState| {
        let cfg = parse_config_text(
            "plugins: [{type: prefix-cache-scorer, parameters: {autoTune: false}}]",
        )
        .unwrap();
        let opts = SchedulerOptions {
            shared: shared.clone(),
            record_scores: true,
            seed: Some(1),
            ..Default::default()
        };
        Scheduler::from_config_with(&cfg, &Registry::with_builtins(), opts).unwrap()
    };
    let cands = candidates(&[pod(0, 0.0), pod(0, 0.0)]);
    let mut req = request("w", "m");
    req.prompt = "z".repeat(64 * 2).into();
    let shared = SharedState::default();
    let old = build(&shared);
    let mut w = old.schedule(&req, &cands[1..]).unwrap();
    old.pre_request(&req, &mut w);
    drop(old);
    let scores = |s: &Scheduler| {
        s.schedule(&req, &cands)
            .unwrap()
            .result
            .primary()
            .unwrap()
            .scorer_scores[0]
            .scores
            .clone()
    };
    assert_eq!(scores(&build(&shared)), [0.0, 1.0]);
    assert_eq!(scores(&build(&SharedState::default())), [0.0, 0.0]);
}

#[derive(Debug, Default)]
struct Metrics {
    calls: Mutex<Vec<String>>,
    prefix: Mutex<Vec<(usize, usize, usize)>>,
    schedules: Mutex<u32>,
}

impl sluice_scheduling::SchedulingObserver for Metrics {
    fn plugin_duration(
        &self,
        point: sluice_scheduling::ExtensionPoint,
        t: &str,
        n: &str,
        _: std::time::Duration,
    ) {
        self.calls.lock().push(format!("{point} {t} {n}"));
    }
    fn schedule_duration(&self, _: std::time::Duration) {
        *self.schedules.lock() += 1;
    }
    fn prefix_match(&self, matched: usize, total: usize, block: usize) {
        self.prefix.lock().push((matched, total, block));
    }
}

#[test]
fn an_observer_sees_every_plugin_call_and_the_prefix_hit() {
    use sluice_scheduling::{Scheduler, SchedulerOptions, parse_config_text};
    let metrics = Arc::new(Metrics::default());
    let cfg = parse_config_text(
        "plugins: [{name: pfx, type: prefix-cache-scorer, parameters: {autoTune: false}}, {type: utilization-detector}, {type: session-affinity-scorer}]",
    )
    .unwrap();
    let opts = SchedulerOptions {
        observer: Some(metrics.clone()),
        seed: Some(3),
        ..Default::default()
    };
    let s = Scheduler::from_config_with(&cfg, &Registry::with_builtins(), opts).unwrap();
    let cands = candidates(&[pod(0, 0.0)]);
    let mut req = request("r", "m");
    req.prompt = "q".repeat(64 * 4 + 10).into();
    for _ in 0..2 {
        let mut d = s.schedule(&req, &cands).unwrap();
        s.pre_request(&req, &mut d);
        s.response_headers(&req, &mut d, &[]);
        s.response_chunk(
            &req,
            &mut d,
            ResponseChunk {
                data: b"x",
                end_of_stream: true,
            },
        );
        s.complete(&req, &mut d, Outcome::Success);
    }
    assert_eq!(*metrics.schedules.lock(), 2);
    assert_eq!(
        *metrics.prefix.lock(),
        [(0, 4, 16), (4, 4, 16)],
        "a miss, then a full hit"
    );
    let calls = metrics.calls.lock();
    for want in [
        "PrepareData prefix-cache-scorer pfx",
        "ProfilePicker single-profile-handler single-profile-handler",
        "Filter utilization-detector utilization-detector",
        "Scorer prefix-cache-scorer pfx",
        "Scorer session-affinity-scorer session-affinity-scorer",
        "Picker max-score-picker max-score-picker",
        "ProcessProfilesResults single-profile-handler single-profile-handler",
        "PreRequest prefix-cache-scorer pfx",
        "ResponseReceived session-affinity-scorer session-affinity-scorer",
        "ResponseStreaming session-affinity-scorer session-affinity-scorer",
        "ResponseComplete session-affinity-scorer session-affinity-scorer",
    ] {
        assert!(
            calls.iter().any(|c| c == want),
            "missing {want:?} in {calls:?}"
        );
    }
}
