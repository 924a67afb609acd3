//! SLO-aware routing through the picker: the predicted-latency profile (`slo_config()`),
//! the picker's SLO services with an in-process predictor, and the scorer's running-request
//! queues kept in the pool's shared state.

use sluice_predictor::{Features, InProcessPredictor, PredictorConfig, TrainingSample};
use sluice_scheduling::plugins::slo::{RunningRequests, SloServices, slo_config};

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
    let state = PickerState::with_options(
        Arc::new(Metrics::new()),
        None,
        None,
        PickerOptions {
            slo: Some(SloServices::with_predictor(predictor)),
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
        slo_config().unwrap(),
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
        let predictor = Arc::new(InProcessPredictor::spawn(PredictorConfig::default()).unwrap());
        let state = slo_state(predictor.clone(), |_| 2);
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
    let (_state, service, predictor) = async_fixture(true);
    for _ in 0..10 {
        let (dest, _) = route_through_stream(&service).await;
        assert!(dest == A || dest == B, "{dest}");
    }
    assert_eq!(
        predictor.calls.load(std::sync::atomic::Ordering::Relaxed),
        10
    );
}
