//! SLO-aware routing through the picker: the predicted-latency profile (`slo_config()`),
//! the picker's SLO services with an in-process predictor, and the scorer's running-request
//! queues kept in the pool's shared state.

use sluice_predictor::{Features, InProcessPredictor, PredictorConfig, TrainingSample};
use sluice_scheduling::plugins::slo::{RunningRequests, SloServices, slo_config};

use super::flow::{FLOW_CONFIG, Inbound, Stream, flow_of, next, open_on};
use super::*;
use crate::state::PickerOptions;

struct SloFixture {
    state: PickerState,
    service: ExtProcService,
    predictor: Arc<InProcessPredictor>,
}

/// A picker state with the SLO profile over endpoints A and B, the given predictor, and a
/// sheddable objective `batch`; every endpoint's scrape reports `waiting(address)` queued
/// requests.
fn slo_state(
    predictor: Arc<dyn sluice_predictor::LatencyPredictor>,
    waiting: impl Fn(&str) -> u32,
) -> PickerState {
    slo_state_with(predictor, waiting, slo_config().unwrap())
}

/// [`slo_state`] with another EndpointPickerConfig (the SLO one with flow control on).
fn slo_state_with(
    predictor: Arc<dyn sluice_predictor::LatencyPredictor>,
    waiting: impl Fn(&str) -> u32,
    config: sluice_core::EndpointPickerConfig,
) -> PickerState {
    let state = PickerState::with_options(
        Arc::new(Metrics::new()),
        None,
        None,
        PickerOptions {
            slo: Some(SloServices::with_predictor(predictor)),
            ..PickerOptions::default()
        },
    );
    let eps = [A, B]
        .iter()
        .map(|a| Endpoint::from_address("default", a.parse().unwrap()))
        .collect();
    let snap = PoolSnapshot::new(
        PoolRef {
            namespace: "default".into(),
            name: "pool".into(),
        },
        1,
        Default::default(),
        eps,
        vec![Objective {
            name: "batch".into(),
            priority: -1,
        }],
        vec![],
        config,
    );
    state.apply_snapshot(snap).unwrap();
    let loaded = state.current().unwrap();
    for ep in &loaded.endpoints {
        let q = waiting(&ep.endpoint.address.to_string());
        ep.record_scrape(metrics(q, 0.3), Instant::now());
    }
    state
}

impl SloFixture {
    fn new() -> Self {
        Self::with_config(slo_config().unwrap())
    }

    /// The SLO profile with the `flowControl` feature gate on (flow control's defaults).
    fn with_flow_control() -> Self {
        let mut config = slo_config().unwrap();
        config.feature_gates.push("flowControl".into());
        Self::with_config(config)
    }

    fn with_config(config: sluice_core::EndpointPickerConfig) -> Self {
        let predictor = Arc::new(InProcessPredictor::spawn(PredictorConfig::default()).unwrap());
        let state = slo_state_with(predictor.clone(), |_| 2, config);
        let service = ExtProcService::new(state.clone(), ServerOptions::default());
        SloFixture {
            state,
            service,
            predictor,
        }
    }

    /// The SLO scorer's running-request queues (the same object the scorer uses: it lives
    /// in the pool's shared state under the scorer's name).
    fn running(&self) -> Arc<RunningRequests> {
        self.state
            .shared()
            .get_or_insert_with("predicted-latency-running/predicted-latency-scorer", || {
                RunningRequests::new(std::time::Duration::from_secs(1))
            })
    }

    /// Teaches the predictor that TTFT is at least a second, growing with the queue.
    fn train_slow_pool(&self) {
        for i in 0..200u32 {
            let features = Features {
                kv_cache_usage: 0.3,
                input_tokens: 10 + i % 50,
                waiting: i % 5,
                running: i % 3,
                // The fixture's requests ask for streamed responses: a model of whole
                // responses would not answer for them.
                streamed: true,
                ..Default::default()
            };
            self.predictor.record_sample(TrainingSample {
                features_at_dispatch: features,
                ttft_ms: Some(1000.0 + 200.0 * f64::from(i % 5)),
                tpot_ms: Some(40.0),
            });
        }
        assert!(self.predictor.train_now().is_some(), "the predictor trains");
    }
}

fn slo_request(ttft_ms: &str, objective: Option<&str>) -> ProcessingRequest {
    let mut pairs = vec![
        (":method", "POST"),
        (":path", "/v1/completions"),
        ("x-slo-ttft-ms", ttft_ms),
        ("x-slo-tpot-ms", "100"),
    ];
    if let Some(o) = objective {
        pairs.push(("x-gateway-inference-objective", o));
    }
    headers(&pairs, false)
}

const BODY: &[u8] = br#"{"model":"m","prompt":"hello there","stream":true}"#;

#[test]
fn requests_with_slo_headers_are_routed_and_leave_the_running_queue_when_they_finish() {
    let f = SloFixture::new();
    let mut s = f.service.session();
    let out = run(&mut s, vec![slo_request("5000", None), body(BODY, true)]);
    assert!(immediate(&out).is_none(), "{out:?}");
    let dest = set_headers(&out[0]).remove(DESTINATION_KEY).unwrap();
    assert!(dest == A || dest == B, "{dest}");
    assert_eq!(f.running().total(), 1, "the SLO scorer tracks the request");

    let out = run(
        &mut s,
        vec![
            resp_headers("200", "text/event-stream", false),
            resp_body(b"data: {\"choices\":[{\"text\":\"a\"}]}\n\n", false),
            resp_body(b"data: [DONE]\n\n", true),
        ],
    );
    assert_eq!(out.len(), 3);
    assert_eq!(
        f.running().total(),
        0,
        "completion empties the running queue"
    );

    // A client that goes away mid-response leaves no entry behind either.
    let mut s = f.service.session();
    let _ = run(&mut s, vec![slo_request("5000", None), body(BODY, true)]);
    assert_eq!(f.running().total(), 1);
    let _ = run(
        &mut s,
        vec![resp_headers("200", "text/event-stream", false)],
    );
    drop(s);
    assert_eq!(
        f.running().total(),
        0,
        "a disconnect empties the running queue"
    );
}

#[test]
fn a_sheddable_request_with_an_impossible_ttft_slo_gets_429_once_the_predictor_has_a_model() {
    let f = SloFixture::new();
    f.train_slow_pool();

    let mut s = f.service.session();
    let out = run(
        &mut s,
        vec![slo_request("1", Some("batch")), body(BODY, true)],
    );
    let (status, text) = immediate(&out).expect("shed");
    assert_eq!(status, 429, "{text}");
    assert_eq!(f.running().total(), 0);

    // The same impossible SLO without the sheddable objective is still served.
    let mut s = f.service.session();
    let out = run(&mut s, vec![slo_request("1", None), body(BODY, true)]);
    assert!(immediate(&out).is_none(), "{out:?}");
    drop(s);
    assert_eq!(f.running().total(), 0);
}

/// A predictor that answers asynchronously, as the remote (llm-d sidecar) predictor does:
/// endpoints with an empty queue are fast, the others slow; or it fails.
#[derive(Debug, Default)]
struct AsyncPredictor {
    fail: bool,
    calls: std::sync::atomic::AtomicUsize,
}

impl sluice_predictor::LatencyPredictor for AsyncPredictor {
    fn predict_batch<'a>(&'a self, batch: &'a [Features]) -> sluice_predictor::PredictFuture<'a> {
        self.calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let fail = self.fail;
        sluice_predictor::PredictFuture::pending(async move {
            tokio::task::yield_now().await;
            if fail {
                return Err(sluice_predictor::PredictError::Unavailable {
                    url: "http://predictor".into(),
                    reason: "connection refused".into(),
                });
            }
            Ok(batch
                .iter()
                .map(|f| {
                    let ttft = if f.waiting == 0 { 100.0 } else { 9_000.0 };
                    sluice_predictor::Prediction {
                        ttft_ms: ttft,
                        tpot_ms: Some(10.0),
                    }
                })
                .collect())
        })
    }

    fn record(&self, _: TrainingSample) {}

    fn ready(&self) -> bool {
        true
    }

    fn is_synchronous(&self) -> bool {
        false
    }
}

fn async_fixture(fail: bool) -> (PickerState, ExtProcService, Arc<AsyncPredictor>) {
    let predictor = Arc::new(AsyncPredictor {
        fail,
        ..AsyncPredictor::default()
    });
    // A's queue is empty, B's is not: the predictor above calls only A fast.
    let state = slo_state(predictor.clone(), |addr| if addr == A { 0 } else { 3 });
    let service = ExtProcService::new(state.clone(), ServerOptions::default());
    (state, service, predictor)
}

/// Sends one SLO request through a [`SessionStream`] (which polls the pending prediction)
/// and returns the destination header of the routing answer.
async fn route_through_stream(
    service: &ExtProcService,
) -> (
    String,
    SessionStream<futures::channel::mpsc::UnboundedReceiver<Result<ProcessingRequest, Status>>>,
) {
    use futures::StreamExt;
    let (tx, rx) = futures::channel::mpsc::unbounded();
    let mut stream = SessionStream::new(rx, service.session());
    tx.unbounded_send(Ok(slo_request("5000", None))).unwrap();
    tx.unbounded_send(Ok(body(BODY, true))).unwrap();
    let first = tokio::time::timeout(std::time::Duration::from_secs(10), stream.next())
        .await
        .expect("an answer")
        .expect("stream open")
        .expect("not an error");
    assert!(
        immediate(std::slice::from_ref(&first)).is_none(),
        "{first:?}"
    );
    (set_headers(&first).remove(DESTINATION_KEY).unwrap(), stream)
}

#[tokio::test]
async fn an_asynchronous_predictor_is_awaited_and_its_predictions_route() {
    let (state, service, predictor) = async_fixture(false);
    let mut on_a = 0;
    let mut open = Vec::new();
    for _ in 0..40 {
        let (dest, stream) = route_through_stream(&service).await;
        on_a += usize::from(dest == A);
        open.push(stream);
    }
    // B is predicted to miss the 5 s TTFT SLO: drawn at about 1 % of A's weight.
    assert!(
        on_a >= 37,
        "{on_a} of 40 on the endpoint predicted to meet the SLO"
    );
    assert_eq!(
        predictor.calls.load(std::sync::atomic::Ordering::Relaxed),
        40,
        "one remote call per request"
    );
    let loaded = state.current().unwrap();
    let counted: u32 = loaded
        .endpoints
        .iter()
        .map(|e| e.in_flight.requests())
        .sum();
    assert_eq!(
        counted, 40,
        "each request counted in flight once, not per decision"
    );
    let text = state.metrics().encode();
    let count = text
        .lines()
        .find(|l| {
            l.starts_with("inference_objective_request_ttft_prediction_duration_seconds_count")
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok());
    assert_eq!(
        count,
        Some(40.0),
        "every remote round trip is timed once:\n{text}"
    );
}

#[tokio::test]
async fn a_failing_asynchronous_predictor_falls_back_to_the_composite_score() {
    let (state, service, predictor) = async_fixture(true);
    // B's KV cache is full and its queue the longest: its composite score
    // (free KV, relative queue, prefix) is 0, so the weighted random draw never picks it,
    // while a uniform draw would about half the time.
    let loaded = state.current().unwrap();
    for ep in &loaded.endpoints {
        let m = if ep.endpoint.address.to_string() == A {
            metrics(0, 0.1)
        } else {
            metrics(3, 1.0)
        };
        ep.record_scrape(m, Instant::now());
    }
    let mut open = Vec::new();
    for i in 0..10 {
        // route_through_stream also asserts the request was routed, not failed.
        let (dest, stream) = route_through_stream(&service).await;
        assert_eq!(dest, A, "request {i}: the composite score decides");
        open.push(stream);
    }
    assert_eq!(
        predictor.calls.load(std::sync::atomic::Ordering::Relaxed),
        10
    );
    let in_flight = |addr: &str| {
        loaded
            .endpoint_at(addr.parse().unwrap())
            .unwrap()
            .in_flight
            .requests()
    };
    assert_eq!(
        (in_flight(A), in_flight(B)),
        (10, 0),
        "the fallback decision is the one committed"
    );
}

// Flow control and the SLO profile: the profile does its own admission (the scorer sheds),
// so the requests it handles skip the pool-wide saturation gate; opted-out requests and other
// profiles wait in flow control as before.

/// Both endpoints past the utilization detector's thresholds: flow control's gate is shut.
fn saturate_state(state: &PickerState) {
    let loaded = state.current().unwrap();
    for ep in &loaded.endpoints {
        ep.record_scrape(metrics(50, 0.99), Instant::now());
    }
}

/// Sends an SLO request (`x-slo-ttft-ms: 5000`) with `extra` headers on `tx`.
fn send_slo_request(tx: &Inbound, extra: &[(&str, &str)]) {
    let mut pairs = vec![
        (":method", "POST"),
        (":path", "/v1/completions"),
        ("x-slo-ttft-ms", "5000"),
        ("x-slo-tpot-ms", "100"),
    ];
    pairs.extend_from_slice(extra);
    tx.unbounded_send(Ok(headers(&pairs, false))).unwrap();
    tx.unbounded_send(Ok(body(BODY, true))).unwrap();
}

/// The stream's next answer if it comes within half a second (of paused time); `None`
/// means the request is queued.
async fn answer_soon(stream: &mut Stream) -> Option<ProcessingResponse> {
    use futures::StreamExt;
    tokio::time::timeout(std::time::Duration::from_millis(500), stream.next())
        .await
        .ok()
        .map(|r| r.expect("stream open").expect("not an error"))
}

#[tokio::test(start_paused = true)]
async fn with_flow_control_slo_requests_skip_the_saturation_gate_and_opted_out_ones_queue() {
    let f = SloFixture::with_flow_control();
    let fc = flow_of(&f.state);
    saturate_state(&f.state);
    let in_flight = || {
        f.state
            .current()
            .unwrap()
            .endpoints
            .iter()
            .map(|e| e.in_flight.requests())
            .sum::<u32>()
    };

    // Handled by the SLO profile: scheduled at once although the pool is saturated.
    let (tx, mut stream) = open_on(&f.service);
    send_slo_request(&tx, &[]);
    let r = answer_soon(&mut stream)
        .await
        .expect("an SLO request must not wait behind the saturation gate");
    let dest = set_headers(&r).remove(DESTINATION_KEY);
    assert!(matches!(dest.as_deref(), Some(A | B)), "{r:?}");
    assert_eq!(fc.queued(), 0);
    assert_eq!(fc.in_flight(), 0, "it holds no flow-control permit");
    assert_eq!(in_flight(), 1);
    assert_eq!(f.running().total(), 1, "the SLO scorer tracks it");
    let _body_echo = next(&mut stream).await;
    tx.unbounded_send(Ok(resp_headers("200", "text/event-stream", false)))
        .unwrap();
    tx.unbounded_send(Ok(resp_body(b"data: [DONE]\n\n", true)))
        .unwrap();
    let _ = next(&mut stream).await;
    let _ = next(&mut stream).await;
    assert_eq!(in_flight(), 0, "completion releases it");
    assert_eq!(f.running().total(), 0);

    // Opted out of predicted-latency routing: flow control applies as to any request.
    let (tx, mut opted_out) = open_on(&f.service);
    send_slo_request(&tx, &[("x-prediction-based-scheduling-off", "true")]);
    assert!(
        answer_soon(&mut opted_out).await.is_none(),
        "an opted-out request must wait while the pool is saturated"
    );
    assert_eq!(fc.queued(), 1);
    assert_eq!(in_flight(), 0);

    // The pool drains: the queued request goes, holding a permit until it completes.
    let loaded = f.state.current().unwrap();
    for ep in &loaded.endpoints {
        ep.record_scrape(metrics(0, 0.1), Instant::now());
    }
    fc.capacity_changed();
    let r = next(&mut opted_out).await;
    assert!(set_headers(&r).contains_key(DESTINATION_KEY), "{r:?}");
    assert_eq!(fc.queued(), 0);
    assert_eq!(fc.in_flight(), 1);
}

#[tokio::test(start_paused = true)]
async fn with_flow_control_a_sheddable_slo_request_no_endpoint_can_serve_is_shed_at_once() {
    let f = SloFixture::with_flow_control();
    f.train_slow_pool();
    let fc = flow_of(&f.state);
    saturate_state(&f.state);
    let (tx, mut stream) = open_on(&f.service);
    tx.unbounded_send(Ok(slo_request("1", Some("batch"))))
        .unwrap();
    tx.unbounded_send(Ok(body(BODY, true))).unwrap();
    let r = answer_soon(&mut stream)
        .await
        .expect("the SLO scorer's admission answers without queueing");
    let (status, text) = immediate(std::slice::from_ref(&r)).expect("shed");
    assert_eq!(status, 429, "{text}");
    assert_eq!(fc.queued(), 0);
    assert_eq!(f.running().total(), 0);
}

#[tokio::test(start_paused = true)]
async fn under_the_default_profile_a_request_with_slo_headers_still_waits_for_flow_control() {
    let f = Fixture::with_config(vec![], FLOW_CONFIG);
    let fc = flow_of(&f.state);
    saturate_state(&f.state);
    let (tx, mut stream) = open_on(&f.service);
    send_slo_request(&tx, &[]);
    assert!(
        answer_soon(&mut stream).await.is_none(),
        "the default profile has no own admission"
    );
    assert_eq!(fc.queued(), 1);
}
