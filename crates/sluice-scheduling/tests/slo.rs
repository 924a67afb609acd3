//! Predicted-latency (SLO-aware) routing: the seeds' behaviour, pinned with a scripted
//! predictor, a fixed scheduler seed and a manual clock.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use sluice_predictor::{
    Features, LatencyPredictor, PredictError, PredictFuture, Prediction, TrainingSample,
};
use sluice_scheduling::plugins::slo::{
    self, Decision, RunningRequests, SloCycleState, SloServices,
};
use sluice_scheduling::{
    Candidate, Clock, InFlightCounters, LlmRequest, ManualClock, Outcome, Registry, ResponseChunk,
    ScheduleError, Scheduled, Scheduler, SchedulerOptions, SharedState, parse_config_text,
};

use common::{Pod, candidates, pod, pod_index};

/// Predicts from a table keyed by the endpoint's waiting-queue length (each test pod gets
/// its own), records training samples, and can be switched to fail.
#[derive(Debug, Default)]
struct Scripted {
    table: Mutex<HashMap<u32, Prediction>>,
    fail: Mutex<Option<PredictError>>,
    samples: Mutex<Vec<TrainingSample>>,
    calls: Mutex<Vec<usize>>,
}

impl Scripted {
    fn new(rows: &[(u32, f64, Option<f64>)]) -> Arc<Self> {
        let s = Scripted::default();
        for &(w, ttft, tpot) in rows {
            s.table.lock().insert(
                w,
                Prediction {
                    ttft_ms: ttft,
                    tpot_ms: tpot,
                },
            );
        }
        Arc::new(s)
    }
}

impl LatencyPredictor for Scripted {
    fn predict_batch<'a>(&'a self, batch: &'a [Features]) -> PredictFuture<'a> {
        self.calls.lock().push(batch.len());
        if let Some(e) = self.fail.lock().clone() {
            return PredictFuture::ready(Err(e));
        }
        let t = self.table.lock();
        PredictFuture::ready(Ok(batch
            .iter()
            .map(|f| {
                t.get(&f.waiting).copied().unwrap_or(Prediction {
                    ttft_ms: 1e6,
                    tpot_ms: None,
                })
            })
            .collect()))
    }
    fn record(&self, sample: TrainingSample) {
        self.samples.lock().push(sample);
    }
    fn ready(&self) -> bool {
        true
    }
}

struct Setup {
    scheduler: Scheduler,
    shared: SharedState,
    clock: Arc<ManualClock>,
}

impl Setup {
    fn running(&self) -> Arc<RunningRequests> {
        self.shared
            .get_or_insert_with("predicted-latency-running/predicted-latency-scorer", || {
                RunningRequests::new(Duration::from_secs(1))
            })
    }
}

fn setup_with(yaml: &str, services: SloServices) -> Setup {
    let shared = SharedState::default();
    SloServices::install(&shared, services);
    let clock = ManualClock::new();
    let cfg = parse_config_text(yaml).unwrap_or_else(|e| panic!("{e}"));
    let scheduler = Scheduler::from_config_with(
        &cfg,
        &Registry::with_builtins(),
        SchedulerOptions {
            seed: Some(42),
            clock: clock.clone(),
            shared: shared.clone(),
            record_scores: true,
            ..SchedulerOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    Setup {
        scheduler,
        shared,
        clock,
    }
}

fn setup(p: &Arc<Scripted>) -> Setup {
    setup_with(slo::SLO_CONFIG_YAML, SloServices::with_predictor(p.clone()))
}

fn with_strategy(strategy: &str) -> String {
    slo::SLO_CONFIG_YAML.replace(
        "  - type: predicted-latency-scorer\n",
        &format!(
            "  - type: predicted-latency-scorer\n    parameters:\n      headroomSelectionStrategy: {strategy}\n"
        ),
    )
}

fn req(id: usize, headers: &[(&str, &str)], priority: i32) -> LlmRequest {
    LlmRequest {
        request_id: format!("req-{id}"),
        target_model: "m".into(),
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        priority,
        prompt_tokens: 100,
        stream: true,
        ..LlmRequest::default()
    }
}

/// Pods whose waiting length is their id in the scripted table.
fn pods(n: u32) -> Vec<Pod> {
    (0..n).map(|w| pod(w, 0.1)).collect()
}

fn state(s: &Scheduled) -> &SloCycleState {
    s.cycle
        .state
        .get::<SloCycleState>("predicted-latency/predicted-latency-scorer")
        .expect("the SLO scorer ran")
}

/// Picks per pod over `n` requests.
fn histogram(setup: &Setup, cands: &[Candidate], n: usize, headers: &[(&str, &str)]) -> Vec<usize> {
    let mut counts = vec![0; cands.len()];
    for i in 0..n {
        let s = setup
            .scheduler
            .schedule(&req(i, headers, 0), cands)
            .unwrap();
        counts[pod_index(&s.result.targets[0])] += 1;
    }
    counts
}

const SLO: &[(&str, &str)] = &[("x-slo-ttft-ms", "400"), ("x-slo-tpot-ms", "50")];

#[test]
fn valid_pods_are_preferred_and_the_strategy_decides_among_them() {
    // TTFT 100/200/300 ms are under the 400 ms SLO; pod 3 (500 ms) is not.
    let p = Scripted::new(&[
        (0, 100.0, Some(20.0)),
        (1, 200.0, Some(20.0)),
        (2, 300.0, Some(20.0)),
        (3, 500.0, Some(20.0)),
    ]);
    let cands = candidates(&pods(4));
    let least = setup_with(
        &with_strategy("least"),
        SloServices::with_predictor(p.clone()),
    );
    let c = histogram(&least, &cands, 3000, SLO);
    assert!(
        c[2] > c[1] && c[1] > c[0],
        "least: the smallest positive headroom (300 ms) wins most: {c:?}"
    );
    assert!(c[3] < 60, "the invalid pod is only explored: {c:?}");
    let s = least.scheduler.schedule(&req(1, SLO, 0), &cands).unwrap();
    assert_eq!(s.result.primary_profile.as_ref(), "slo");
    assert_eq!(state(&s).decision, Decision::Valid { valid: 3 });
    assert_eq!(
        p.calls.lock().last(),
        Some(&4),
        "one batch call covers every candidate"
    );

    let most = setup_with(
        &with_strategy("most"),
        SloServices::with_predictor(p.clone()),
    );
    let c = histogram(&most, &cands, 3000, SLO);
    assert!(
        c[0] > c[1] && c[1] > c[2],
        "most: the largest headroom (100 ms) wins most: {c:?}"
    );

    // composite-most among valid pods: the emptiest queue (pod 0) weighs most; pod 3 is
    // still only explored because it is invalid.
    let cm = setup_with(
        &with_strategy("composite-most"),
        SloServices::with_predictor(p.clone()),
    );
    let c = histogram(&cm, &cands, 3000, SLO);
    assert!(c[0] > c[1] && c[1] > c[2] && c[3] < 60, "{c:?}");

    // composite-least among valid pods: the fullest valid queue (pod 2) weighs most.
    let cl = setup_with(
        &with_strategy("composite-least"),
        SloServices::with_predictor(p.clone()),
    );
    let c = histogram(&cl, &cands, 3000, SLO);
    assert!(c[2] > c[1] && c[1] > c[0] && c[3] < 60, "{c:?}");

    // composite-only ignores predictions: pod 3 is not invalid, just the fullest queue,
    // and every pod is drawn in proportion to its composite score.
    let co = setup_with(
        &with_strategy("composite-only"),
        SloServices::with_predictor(p.clone()),
    );
    let c = histogram(&co, &cands, 3000, SLO);
    assert!(
        c[0] > c[1] && c[1] > c[2] && c[2] > c[3] && c[3] > 300,
        "{c:?}"
    );
    let s = co.scheduler.schedule(&req(2, SLO, 0), &cands).unwrap();
    assert_eq!(state(&s).decision, Decision::CompositeOnly);
}

#[test]
fn tpot_counts_and_a_running_tighter_tpot_slo_protects_its_pod() {
    // Both pods meet TTFT; pod 0 misses the 50 ms TPOT SLO.
    let p = Scripted::new(&[(0, 100.0, Some(60.0)), (1, 300.0, Some(30.0))]);
    let s = setup(&p);
    let cands = candidates(&pods(2));
    let c = histogram(&s, &cands, 2000, SLO);
    assert!(c[1] > c[0] * 20, "{c:?}");

    // A request with a 25 ms TPOT SLO now runs on pod 1: a new 50 ms request must not
    // land there (30 ms predicted > 25 ms), so no pod is valid and it goes to the least
    // negative headroom.
    let tight_req = req(
        9999,
        &[("x-slo-ttft-ms", "400"), ("x-slo-tpot-ms", "25")],
        0,
    );
    let mut tight = s.scheduler.schedule(&tight_req, &cands).unwrap();
    let target = pod_index(&tight.result.targets[0]);
    assert_eq!(
        target, 1,
        "pod 1 is the least negative for a 25 ms TPOT SLO"
    );
    s.scheduler.pre_request(&tight_req, &mut tight);
    let next = s.scheduler.schedule(&req(10_000, SLO, 0), &cands).unwrap();
    let st = state(&next);
    assert!(
        st.endpoints.iter().all(|e| !e.valid),
        "pod 1's bound is now 25 ms: {st:?}"
    );
}

#[test]
fn a_pod_decoding_slower_than_the_tpot_slo_is_invalid_whatever_the_model_says() {
    // The model says both pods decode at 20 ms per token. Pod 0 is in fact streaming one
    // token every 60 ms (a sudden overload the model has not learnt yet).
    let p = Scripted::new(&[(0, 100.0, Some(20.0)), (1, 300.0, Some(20.0))]);
    let s = setup(&p);
    let mut cands = candidates(&pods(2));
    let busy = Arc::new(InFlightCounters::with_epoch(s.clock.now()));
    busy.add(100);
    busy.end_prefill(100);
    cands[0].in_flight = busy.clone();
    for _ in 0..40 {
        s.clock.advance(Duration::from_millis(60));
        busy.observe_chunk(s.clock.now());
    }
    let r = s.scheduler.schedule(&req(1, SLO, 0), &cands).unwrap();
    let st = state(&r);
    let tpot = |st: &SloCycleState, i: usize| st.endpoints[i].prediction.unwrap().tpot_ms.unwrap();
    assert!((tpot(st, 0) - 60.0).abs() < 3.0, "{st:?}");
    assert!(!st.endpoints[0].valid && st.endpoints[1].valid, "{st:?}");
    assert_eq!(
        tpot(st, 1),
        20.0,
        "a pod with no rhythm keeps the model's answer"
    );
    let floored = || {
        SloServices::from_shared(&s.shared)
            .metrics()
            .tpot_floored
            .get()
    };
    assert_eq!(floored(), 1, "one endpoint prediction was raised");
    let c = histogram(&s, &cands, 2000, SLO);
    assert!(c[1] > c[0] * 20, "{c:?}");

    // Once the pod stops streaming, its old rhythm no longer overrides the model.
    s.clock.advance(Duration::from_secs(1));
    let r = s.scheduler.schedule(&req(2, SLO, 0), &cands).unwrap();
    let st = state(&r);
    assert_eq!(tpot(st, 0), 20.0);
    let before = floored();
    s.scheduler.schedule(&req(3, SLO, 0), &cands).unwrap();
    assert_eq!(floored(), before, "nothing raised once the pod is quiet");
    assert!(st.endpoints.iter().all(|e| e.valid), "{st:?}");
}

#[test]
fn a_request_still_waiting_for_its_first_chunk_floors_its_endpoints_ttft() {
    // The model says both pods answer in 100 ms. Pod 1 has had a streamed request waiting
    // 2 s for its first chunk: a new request queues behind it, so pod 1 cannot meet a
    // 400 ms TTFT SLO whatever the model says (the model learns only from outcomes, and a
    // stalled endpoint produces none).
    let p = Scripted::new(&[(0, 100.0, Some(20.0)), (1, 100.0, Some(20.0))]);
    let s = setup(&p);
    let cands = candidates(&pods(2));
    let stuck = req(1000, SLO, 0);
    let mut sch = s.scheduler.schedule(&stuck, &cands[1..]).unwrap();
    s.scheduler.pre_request(&stuck, &mut sch);
    let ttft = |r: &Scheduled, i: usize| state(r).endpoints[i].prediction.unwrap().ttft_ms;
    // Within the request's 400 ms SLO the head's wait says little (a chunked-prefill
    // engine admits short prompts beside a long one): the model's answer stands.
    s.clock.advance(Duration::from_millis(300));
    let r = s.scheduler.schedule(&req(0, SLO, 0), &cands).unwrap();
    assert_eq!(ttft(&r, 1), 100.0);
    s.clock.advance(Duration::from_millis(1700));

    let r = s.scheduler.schedule(&req(1, SLO, 0), &cands).unwrap();
    assert_eq!(ttft(&r, 0), 100.0);
    assert!((ttft(&r, 1) - 2000.0).abs() < 1.0, "{:?}", state(&r));
    let floored = || {
        SloServices::from_shared(&s.shared)
            .metrics()
            .ttft_floored
            .get()
    };
    assert_eq!(floored(), 1);
    let c = histogram(&s, &cands, 1000, SLO);
    assert!(c[1] < 30, "only exploration reaches the stalled pod: {c:?}");

    // A whole response waits behind its own kind: the streamed request's wait is a
    // streamed first chunk's, not a whole response's.
    let whole = LlmRequest {
        stream: false,
        ..req(2, SLO, 0)
    };
    let r = s.scheduler.schedule(&whole, &cands).unwrap();
    assert_eq!(ttft(&r, 1), 100.0);

    // Its first chunk arrives: the queue moves, the model's answer stands again.
    s.scheduler
        .response_headers(&stuck, &mut sch, &sse_headers());
    s.scheduler.response_chunk(
        &stuck,
        &mut sch,
        ResponseChunk {
            data: b"data: x",
            end_of_stream: false,
        },
    );
    let r = s.scheduler.schedule(&req(3, SLO, 0), &cands).unwrap();
    assert_eq!(ttft(&r, 1), 100.0);
    let c = histogram(&s, &cands, 1000, SLO);
    assert!(c[1] > 300, "{c:?}");
}

#[test]
fn no_valid_pod_non_sheddable_goes_to_least_negative_headroom() {
    let p = Scripted::new(&[
        (0, 900.0, Some(20.0)),
        (1, 450.0, Some(20.0)),
        (2, 700.0, Some(20.0)),
    ]);
    let s = setup(&p);
    let cands = candidates(&pods(3));
    for i in 0..200 {
        let r = s.scheduler.schedule(&req(i, SLO, 0), &cands).unwrap();
        assert_eq!(pod_index(&r.result.targets[0]), 1, "request {i}");
        assert_eq!(state(&r).decision, Decision::LeastNegative);
    }
    // Without SLO headers every pod is "invalid" and the lowest predicted TTFT wins; a
    // sheddable request without a TTFT SLO is not shed.
    let r = s.scheduler.schedule(&req(1, &[], -1), &cands).unwrap();
    assert_eq!(pod_index(&r.result.targets[0]), 1);
}

#[test]
fn no_valid_pod_sheddable_request_is_shed_with_429_and_a_reason_unless_an_endpoint_is_idle() {
    let p = Scripted::new(&[(0, 900.0, Some(20.0)), (1, 450.0, Some(20.0))]);
    let s = setup(&p);
    let busy = |queue: u32, running: u32| Pod {
        running,
        ..pod(queue, 0.1)
    };
    let cands = candidates(&[busy(0, 3), busy(1, 2)]);
    let err = s
        .scheduler
        .schedule(&req(1, SLO, -1), &cands)
        .expect_err("sheddable request with no valid pod");
    assert_eq!(err.http_status(), 429);
    let ScheduleError::Shed { plugin, reason } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(plugin, "predicted-latency-scorer");
    assert!(reason.contains("SLO") && reason.contains("450"), "{reason}");
    // The same request with priority 0 is served.
    assert!(s.scheduler.schedule(&req(1, SLO, 0), &cands).is_ok());

    // An idle endpoint (nothing running or waiting, nothing in flight from this picker)
    // serves a sheddable request rather than shedding it, even though it is predicted
    // further from the SLO (900 ms against 450 ms).
    let with_idle = candidates(&[busy(0, 0), busy(1, 2)]);
    for i in 0..20 {
        let r = s
            .scheduler
            .schedule(&req(i, SLO, -1), &with_idle)
            .expect("an idle endpoint takes it");
        assert_eq!(pod_index(&r.result.targets[0]), 0);
        assert_eq!(state(&r).decision, Decision::IdleInsteadOfShed);
    }
    // Requests this picker has in flight there make it busy, whatever the last scrape said.
    let in_flight = candidates(&[
        Pod {
            in_flight_requests: 1,
            ..busy(0, 0)
        },
        busy(1, 2),
    ]);
    let err = s
        .scheduler
        .schedule(&req(1, SLO, -1), &in_flight)
        .expect_err("no idle endpoint left");
    assert_eq!(err.http_status(), 429);
}

#[test]
fn invalid_pods_are_drawn_about_one_percent_as_often_as_a_valid_one() {
    let p = Scripted::new(&[(0, 100.0, Some(20.0)), (1, 500.0, Some(20.0))]);
    let s = setup(&p);
    let cands = candidates(&pods(2));
    let n = 20_000;
    let c = histogram(&s, &cands, n, SLO);
    let ratio = c[1] as f64 / c[0] as f64;
    // Expected 0.01; with 20k draws the standard error of the count is ~14 (7 %).
    assert!(
        (0.0070..=0.0130).contains(&ratio),
        "invalid/valid = {ratio:.4} ({c:?})"
    );
}

#[test]
fn opt_out_header_bypasses_the_profile_and_keeps_saturation_detection() {
    let p = Scripted::new(&[(0, 100.0, None), (1, 100.0, None)]);
    let s = setup(&p);
    // Pod 1 has the shorter queue... in the default profile it wins by queue and KV.
    let cands = candidates(&[pod(5, 0.9), pod(1, 0.1)]);
    let calls_before = p.calls.lock().len();
    for header in [
        "x-prediction-based-scheduling-off",
        "X-Prediction-Based-Scheduling",
    ] {
        let value = if header.ends_with("off") { "" } else { "false" };
        let r = req(1, &[(header, value), ("x-slo-ttft-ms", "1")], -1);
        let out = s.scheduler.schedule(&r, &cands).unwrap();
        assert_eq!(out.result.primary_profile.as_ref(), "default");
        assert_eq!(pod_index(&out.result.targets[0]), 1);
        assert!(!s.scheduler.skip_saturation_detection(&r));
    }
    assert_eq!(
        p.calls.lock().len(),
        calls_before,
        "opted-out requests do not call the predictor"
    );
    assert!(s.scheduler.skip_saturation_detection(&req(1, SLO, 0)));
}

#[test]
fn predictor_failure_or_no_model_falls_back_to_the_composite_score() {
    let cands = candidates(&[pod(8, 0.9).running(3), pod(0, 0.1), pod(4, 0.5)]);
    let p = Scripted::new(&[]);
    *p.fail.lock() = Some(PredictError::NotReady);
    for services in [
        SloServices::with_predictor(p.clone()),
        SloServices::without_predictor(),
    ] {
        let s = setup_with(slo::SLO_CONFIG_YAML, services);
        // A sheddable request with an impossible SLO is still served: no prediction, no
        // shedding.
        // The best composite score wins, as in the default profile (upstream draws weighted
        // by it, which at low load is about uniform).
        let c = histogram(&s, &cands, 600, &[("x-slo-ttft-ms", "1")]);
        assert_eq!(c, vec![0, 600, 0], "the idle, empty pod wins");
        // Equal scores split the traffic.
        let tied = candidates(&[pod(0, 0.1), pod(0, 0.1), pod(4, 0.5)]);
        let c = histogram(&s, &tied, 600, &[("x-slo-ttft-ms", "1")]);
        assert!(
            c[2] == 0 && c[0] > 240 && c[1] > 240,
            "two equally good pods share: {c:?}"
        );
        let r = s
            .scheduler
            .schedule(&req(1, &[("x-slo-ttft-ms", "1")], -1), &cands)
            .unwrap();
        assert!(
            matches!(state(&r).decision, Decision::Fallback(_)),
            "{:?}",
            state(&r).decision
        );
    }
    *p.fail.lock() = Some(PredictError::Unavailable {
        url: "http://x".into(),
        reason: "down".into(),
    });
    let s = setup(&p);
    let r = s.scheduler.schedule(&req(1, SLO, -1), &cands).unwrap();
    let Decision::Fallback(reason) = &state(&r).decision else {
        panic!()
    };
    assert!(reason.contains("down"), "{reason}");
}

fn sse_headers() -> Vec<(String, String)> {
    vec![("content-type".into(), "text/event-stream".into())]
}

#[test]
fn metrics_label_the_requested_model_and_the_rewritten_target() {
    let p = Scripted::new(&[(0, 100.0, Some(20.0))]);
    let s = setup(&p);
    let cands = candidates(&pods(1));
    let r = LlmRequest {
        requested_model: "chat-alias".into(),
        ..req(1, SLO, 0)
    };
    let mut sch = s.scheduler.schedule(&r, &cands).unwrap();
    s.scheduler.pre_request(&r, &mut sch);
    s.scheduler.response_headers(&r, &mut sch, &sse_headers());
    s.clock.advance(Duration::from_millis(50));
    let chunk = ResponseChunk {
        data: b"data: x",
        end_of_stream: false,
    };
    s.scheduler.response_chunk(&r, &mut sch, chunk);
    s.clock.advance(Duration::from_millis(20));
    s.scheduler.response_chunk(&r, &mut sch, chunk);
    s.scheduler.complete(&r, &mut sch, Outcome::Success);
    let mut registry = prometheus_client::registry::Registry::default();
    SloServices::from_shared(&s.shared)
        .metrics()
        .register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains(
            "inference_objective_request_ttft_seconds_count{model_name=\"chat-alias\",target_model_name=\"m\"} 1"
        ),
        "{text}"
    );
}

#[test]
fn training_samples_measure_ttft_from_dispatch_and_inter_token_tpot() {
    let p = Scripted::new(&[(0, 100.0, Some(20.0)), (1, 300.0, Some(20.0))]);
    let s = setup(&p);
    let cands = candidates(&[pod(0, 0.2).in_flight(2, 500), pod(1, 0.4)]);
    let r = req(1, SLO, 0);
    let mut sch = s.scheduler.schedule(&r, &cands).unwrap();
    let target = pod_index(&sch.result.targets[0]);
    let expected = state(&sch).endpoints[target].features;
    s.scheduler.pre_request(&r, &mut sch);
    s.scheduler.response_headers(&r, &mut sch, &sse_headers());
    s.clock.advance(Duration::from_millis(120));
    for _ in 0..5 {
        s.scheduler.response_chunk(
            &r,
            &mut sch,
            ResponseChunk {
                data: b"data: x",
                end_of_stream: false,
            },
        );
        s.clock.advance(Duration::from_millis(25));
    }
    s.scheduler.response_chunk(
        &r,
        &mut sch,
        ResponseChunk {
            data: b"",
            end_of_stream: true,
        },
    );
    s.scheduler.complete(&r, &mut sch, Outcome::Success);
    let samples = p.samples.lock();
    assert_eq!(samples.len(), 1);
    let smp = samples[0];
    assert_eq!(
        smp.features_at_dispatch, expected,
        "features as at dispatch"
    );
    assert!((smp.ttft_ms.unwrap() - 120.0).abs() < 1e-6);
    // 5 chunks at 120, 145, ..., 220; end at 245: (245 − 120) / 4.
    assert!((smp.tpot_ms.unwrap() - 31.25).abs() < 1e-6, "{smp:?}");
    drop(samples);

    // A non-streamed response trains TTFT = end-to-end only.
    let r = req(2, SLO, 0);
    let mut sch = s.scheduler.schedule(&r, &cands).unwrap();
    s.scheduler.pre_request(&r, &mut sch);
    s.scheduler.response_headers(
        &r,
        &mut sch,
        &[("Content-Type".into(), "application/json".into())],
    );
    s.clock.advance(Duration::from_millis(400));
    s.scheduler.response_chunk(
        &r,
        &mut sch,
        ResponseChunk {
            data: b"{}",
            end_of_stream: false,
        },
    );
    s.clock.advance(Duration::from_millis(100));
    s.scheduler.response_chunk(
        &r,
        &mut sch,
        ResponseChunk {
            data: b"{}",
            end_of_stream: true,
        },
    );
    s.scheduler.complete(&r, &mut sch, Outcome::Success);
    let last = *p.samples.lock().last().unwrap();
    assert!((last.ttft_ms.unwrap() - 500.0).abs() < 1e-6);
    assert!(
        !last.features_at_dispatch.streamed,
        "a whole-response TTFT trains the non-streamed model, whatever the request asked"
    );
    assert_eq!(last.tpot_ms, None);
}

#[test]
fn a_request_served_by_a_fallback_leaves_the_running_queue_there_and_trains_nothing() {
    let p = Scripted::new(&[(0, 100.0, Some(20.0)), (1, 300.0, Some(20.0))]);
    let s = setup(&p);
    let running = s.running();
    let cands = candidates(&[pod(0, 0.2), pod(1, 0.4)]);
    let r = req(1, SLO, 0);
    let mut sch = s.scheduler.schedule(&r, &cands).unwrap();
    s.scheduler.pre_request(&r, &mut sch);
    let picked = sch.result.targets[0].clone();
    let other = cands
        .iter()
        .find(|c| c.endpoint.key != picked.endpoint.key)
        .unwrap()
        .clone();
    assert_eq!(running.len(&picked.endpoint.key), 1);
    assert!(s.scheduler.served_by(&r, &mut sch, other.clone()));
    assert_eq!(
        (
            running.len(&picked.endpoint.key),
            running.len(&other.endpoint.key)
        ),
        (0, 1),
        "the request's TPOT SLO now protects the endpoint that runs it"
    );
    s.scheduler.response_headers(&r, &mut sch, &sse_headers());
    s.clock.advance(Duration::from_millis(50));
    for end_of_stream in [false, true] {
        s.scheduler.response_chunk(
            &r,
            &mut sch,
            ResponseChunk {
                data: if end_of_stream { b"" } else { b"data: x" },
                end_of_stream,
            },
        );
    }
    s.scheduler.complete(&r, &mut sch, Outcome::Success);
    assert_eq!(
        running.total(),
        0,
        "completion finds the request where it moved"
    );
    assert!(
        p.samples.lock().is_empty(),
        "the pick's features paired with the fallback's latency would be a false sample"
    );
}

#[test]
fn running_queues_return_to_zero_after_a_mixed_run_with_errors_and_disconnects() {
    let p = Scripted::new(&[
        (0, 100.0, Some(20.0)),
        (1, 150.0, Some(30.0)),
        (2, 390.0, None),
    ]);
    let s = setup(&p);
    let running = s.running();
    let cands = candidates(&pods(3));
    // (request, its scheduling, whether it entered a running queue)
    let mut open: Vec<(LlmRequest, Scheduled, bool)> = Vec::new();
    let mut successes = 0;
    // What the queues must hold: every queued request not completed yet, dropped ones
    // included (only the TTL removes those). Checked after every step, so a completion
    // path that forgets its removal fails here, before the TTL could hide it.
    let mut expected = 0usize;
    for i in 0..400 {
        let headers: &[(&str, &str)] = match i % 4 {
            0 => SLO,
            1 => &[("x-prediction-based-scheduling-off", "")],
            2 => &[("x-slo-ttft-ms", "300")],
            _ => &[],
        };
        let r = req(i, headers, 0);
        let mut sch = s.scheduler.schedule(&r, &cands).unwrap();
        let before = running.total();
        s.scheduler.pre_request(&r, &mut sch);
        let queued = running.total() == before + 1;
        assert!(queued || running.total() == before);
        expected += usize::from(queued);
        open.push((r, sch, queued));
        // Finish the oldest requests in a mixed order of outcomes.
        if open.len() > 20 {
            let (r, mut sch, queued) = open.remove(i % 7);
            let completes = i % 5 != 2;
            expected -= usize::from(queued && completes);
            s.clock.advance(Duration::from_millis(3));
            match i % 5 {
                0 => s.scheduler.complete(
                    &r,
                    &mut sch,
                    Outcome::Failed {
                        reason: "503".into(),
                    },
                ),
                1 => s
                    .scheduler
                    .complete(&r, &mut sch, Outcome::ClientDisconnected),
                2 => drop(sch), // lost: only the TTL removes it
                _ => {
                    s.scheduler.response_headers(&r, &mut sch, &sse_headers());
                    s.clock.advance(Duration::from_millis(50));
                    s.scheduler.response_chunk(
                        &r,
                        &mut sch,
                        ResponseChunk {
                            data: b"a",
                            end_of_stream: false,
                        },
                    );
                    s.clock.advance(Duration::from_millis(20));
                    s.scheduler.response_chunk(
                        &r,
                        &mut sch,
                        ResponseChunk {
                            data: b"b",
                            end_of_stream: true,
                        },
                    );
                    s.scheduler.complete(&r, &mut sch, Outcome::Success);
                    successes += 1;
                }
            }
        }
        assert_eq!(running.total(), expected, "after request {i}");
    }
    assert!(running.total() > 0);
    for (r, mut sch, queued) in open.drain(..) {
        s.scheduler
            .complete(&r, &mut sch, Outcome::ClientDisconnected);
        expected -= usize::from(queued);
    }
    assert_eq!(
        running.total(),
        expected,
        "only the dropped requests are left"
    );
    let lost = running.total();
    assert!(lost > 0, "dropped requests stay until the TTL");
    s.clock.advance(Duration::from_secs(301));
    running.expire(sluice_scheduling::Clock::now(&*s.clock));
    assert_eq!(running.total(), 0, "every queue is empty again");
    for c in &cands {
        assert_eq!(c.in_flight.requests(), 0);
        assert_eq!(running.len(&c.endpoint.key), 0);
    }
    assert_eq!(
        p.samples.lock().len(),
        successes,
        "only successful responses train (opted-out ones included)"
    );
}

#[test]
fn aliases_and_parameters_load_and_bad_parameters_say_what_is_expected() {
    let legacy = slo::SLO_CONFIG_YAML
        .replace(
            "  - type: predicted-latency-scorer\n",
            "  - name: predicted-latency-scorer\n    type: slo-aware-routing\n",
        )
        .replace(
            "type: predicted-latency-profile-handler",
            "type: slo-aware-profile-handler",
        );
    assert!(legacy.contains("type: slo-aware-routing"));
    let cfg = parse_config_text(&legacy).unwrap();
    let s = Scheduler::from_config_with(
        &cfg,
        &Registry::with_builtins(),
        SchedulerOptions::default(),
    );
    assert!(s.is_ok(), "{s:?}");

    let bad = with_strategy("fastest");
    let cfg = parse_config_text(&bad).unwrap();
    let err = Scheduler::from_config_with(
        &cfg,
        &Registry::with_builtins(),
        SchedulerOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("fastest") && err.contains("least"), "{err}");
}

#[test]
fn the_predictor_sees_each_endpoints_prefix_match_and_hardware_class() {
    let p = Scripted::new(&[(0, 100.0, Some(20.0)), (1, 100.0, Some(20.0))]);
    let s = setup(&p);
    let mut cands = candidates(&[pod(0, 0.1), pod(1, 0.1), pod(0, 0.1)]);
    for (c, class) in cands.iter_mut().zip(["h100", "l4", "h100"]) {
        let mut e = (*c.endpoint).clone();
        e.labels.insert(
            sluice_core::endpoint::HARDWARE_CLASS_LABEL.into(),
            class.into(),
        );
        c.endpoint = Arc::new(e);
    }
    let prompt: String = (0..2000)
        .map(|i| char::from(b'a' + (i % 23) as u8))
        .collect();
    let with_prompt = |id: usize| LlmRequest {
        prompt: prompt.clone().into(),
        prompt_tokens: 500,
        ..req(id, SLO, 0)
    };
    let first = with_prompt(1);
    let mut sch = s.scheduler.schedule(&first, &cands).unwrap();
    s.scheduler.pre_request(&first, &mut sch);
    let cached = pod_index(&sch.result.targets[0]);

    let again = s.scheduler.schedule(&with_prompt(2), &cands).unwrap();
    let features: Vec<Features> = state(&again).endpoints.iter().map(|e| e.features).collect();
    for (i, f) in features.iter().enumerate() {
        if i == cached {
            assert!(f.prefix_cache_score > 0.9, "{i}: {f:?}");
        } else {
            assert_eq!(f.prefix_cache_score, 0.0, "{i}: {f:?}");
        }
        assert_eq!(f.input_tokens, 500);
    }
    assert_eq!(
        features[0].class, features[2].class,
        "same label, same class"
    );
    assert_ne!(features[0].class, features[1].class, "h100 is not l4");
}

#[test]
fn requests_without_slos_favour_the_lowest_predicted_latency_without_herding() {
    // Every endpoint "misses" a request that sets no SLO, so it goes by predicted latency:
    // upstream's weights (1..=101 by shortfall), drawn at random. Always picking the
    // lowest would send every such request to pod 0 until its in-flight count moved the
    // prediction.
    let p = Scripted::new(&[
        (0, 100.0, Some(20.0)),
        (1, 200.0, Some(20.0)),
        (2, 300.0, Some(20.0)),
    ]);
    let s = setup(&p);
    let cands = candidates(&pods(3));
    let c = histogram(&s, &cands, 3000, &[]);
    assert!(c[0] > c[1] && c[1] > c[2] && c[2] > 0, "{c:?}");
    assert!(c[0] < 2900, "spread, not herded: {c:?}");
    // Weights 101, 51 and 1: the slowest gets about 20 of 3000 (with the TPOT term, flat
    // here, still weighing 0.2 it got about 200).
    assert!(
        c[2] < 60,
        "the slowest endpoint is drawn about 1 % of the time: {c:?}"
    );
    let r = s.scheduler.schedule(&req(1, &[], 0), &cands).unwrap();
    assert_eq!(state(&r).decision, Decision::LeastNegative);
}
