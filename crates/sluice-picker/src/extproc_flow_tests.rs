//! Flow control in the request path: sessions driven through [`SessionStream`] (the
//! admission is polled there), on a paused Tokio clock so TTLs and waits are deterministic.

use std::time::Duration;

use futures::StreamExt;
use futures::channel::mpsc;

use super::*;

/// Flow control on, with every policy type an upstream config names, and a short TTL.
pub(super) const FLOW_CONFIG: &str = r#"
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
- type: fcfs-ordering-policy
- type: global-strict-fairness-policy
- type: static-usage-limit-policy
- type: queue-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins: [{pluginRef: queue-scorer}, {pluginRef: max-score-picker}]
flowControl:
  defaultRequestTTL: 2s
  defaultPriorityBand:
    orderingPolicyRef: fcfs-ordering-policy
    fairnessPolicyRef: global-strict-fairness-policy
  usageLimitPolicyPluginRef: static-usage-limit-policy
"#;

pub(super) type Inbound = mpsc::UnboundedSender<Result<ProcessingRequest, Status>>;
pub(super) type Stream = SessionStream<mpsc::UnboundedReceiver<Result<ProcessingRequest, Status>>>;

pub(super) fn open(f: &Fixture) -> (Inbound, Stream) {
    open_on(&f.service)
}

/// A session on `service` driven through a [`SessionStream`], as tonic drives it.
pub(super) fn open_on(service: &ExtProcService) -> (Inbound, Stream) {
    let (tx, rx) = mpsc::unbounded();
    (tx, SessionStream::new(rx, service.session()))
}

fn send_request(tx: &Inbound) {
    tx.unbounded_send(Ok(post("/v1/completions"))).unwrap();
    tx.unbounded_send(Ok(body(br#"{"model":"m","prompt":"p"}"#, true)))
        .unwrap();
}

fn saturate(f: &Fixture) {
    f.set_metrics(A, metrics(50, 0.99));
    f.set_metrics(B, metrics(50, 0.99));
}

pub(super) fn flow(f: &Fixture) -> sluice_flowcontrol::FlowController {
    flow_of(&f.state)
}

/// The flow controller of `state`'s current configuration.
pub(super) fn flow_of(state: &PickerState) -> sluice_flowcontrol::FlowController {
    state
        .current()
        .unwrap()
        .flow
        .clone()
        .expect("flow control is on")
}

pub(super) async fn next(stream: &mut Stream) -> ProcessingResponse {
    tokio::time::timeout(Duration::from_secs(30), stream.next())
        .await
        .expect("an answer")
        .expect("stream open")
        .expect("not an error")
}

#[tokio::test(start_paused = true)]
async fn a_queued_request_dispatches_when_capacity_frees_and_its_permit_lasts_until_completion() {
    let f = Fixture::with_config(vec![], FLOW_CONFIG);
    let fc = flow(&f);
    saturate(&f);
    let (tx, mut stream) = open(&f);
    send_request(&tx);

    // Saturated: the request waits (well under its 2 s TTL), nothing is answered.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), stream.next())
            .await
            .is_err(),
        "a request must wait while the pool is saturated"
    );
    assert_eq!(fc.queued(), 1);
    assert_eq!(f.in_flight(A) + f.in_flight(B), 0);

    // The pool drains (the detector averages over endpoints); B is the emptier one.
    f.set_metrics(A, metrics(3, 0.5));
    f.set_metrics(B, metrics(0, 0.1));
    fc.capacity_changed();
    let r = next(&mut stream).await;
    assert_eq!(
        set_headers(&r).get(DESTINATION_KEY).map(String::as_str),
        Some(B),
        "{r:?}"
    );
    assert_eq!(fc.queued(), 0);
    assert_eq!(
        fc.in_flight(),
        1,
        "the permit is held while the response runs"
    );
    assert_eq!(f.in_flight(B), 1);
    let _body_echo = next(&mut stream).await;

    tx.unbounded_send(Ok(resp_headers("200", "application/json", false)))
        .unwrap();
    tx.unbounded_send(Ok(resp_body(br#"{"choices":[]}"#, true)))
        .unwrap();
    let _ = next(&mut stream).await;
    let _ = next(&mut stream).await;
    assert_eq!(fc.in_flight(), 0, "completion gives the permit back");
    assert_eq!(f.in_flight(B), 0);
}

#[tokio::test(start_paused = true)]
async fn a_queued_request_whose_client_disconnects_leaves_the_queue() {
    let f = Fixture::with_config(vec![], FLOW_CONFIG);
    let fc = flow(&f);
    saturate(&f);
    let (tx, mut stream) = open(&f);
    send_request(&tx);
    assert!(futures::poll!(stream.next()).is_pending());
    assert_eq!(fc.queued(), 1);

    // Envoy resets the stream: tonic drops the response stream, and with it the session.
    drop(stream);
    assert_eq!(fc.queued(), 0);
    assert_eq!(fc.in_flight(), 0);
    assert_eq!(f.in_flight(A) + f.in_flight(B), 0);
}

#[tokio::test(start_paused = true)]
async fn a_request_that_waits_past_its_ttl_gets_429_with_the_drop_reason() {
    let f = Fixture::with_config(vec![], FLOW_CONFIG);
    let fc = flow(&f);
    saturate(&f);
    let (tx, mut stream) = open(&f);
    send_request(&tx);
    let r = next(&mut stream).await;
    let Some(Out::ImmediateResponse(ir)) = &r.response else {
        panic!("expected an immediate response, got {r:?}");
    };
    assert_eq!(ir.status.as_ref().map(|s| s.code), Some(429));
    let reason = ir
        .headers
        .as_ref()
        .unwrap()
        .set_headers
        .iter()
        .filter_map(|h| h.header.as_ref())
        .find(|h| h.key == DROPPED_REASON_HEADER)
        .map(|h| String::from_utf8(h.raw_value.clone()).unwrap());
    assert_eq!(reason.as_deref(), Some("rejected-ttl-expired"));
    assert!(
        stream.next().await.is_none(),
        "the stream ends after the answer"
    );
    assert_eq!(fc.queued(), 0);
}

#[tokio::test(start_paused = true)]
async fn with_flow_control_a_sheddable_request_waits_instead_of_being_shed_at_once() {
    let f = Fixture::with_config(
        vec![Objective {
            name: "batch".into(),
            priority: -1,
        }],
        FLOW_CONFIG,
    );
    let fc = flow(&f);
    saturate(&f);
    let (tx, mut stream) = open(&f);
    let mut h = post("/v1/completions");
    if let Some(In::RequestHeaders(hh)) = &mut h.request {
        hh.headers.as_mut().unwrap().headers.push(HeaderValue {
            key: "x-gateway-inference-objective".into(),
            raw_value: b"batch".to_vec(),
            ..Default::default()
        });
    }
    tx.unbounded_send(Ok(h)).unwrap();
    tx.unbounded_send(Ok(body(br#"{"model":"m","prompt":"p"}"#, true)))
        .unwrap();
    assert!(futures::poll!(stream.next()).is_pending());
    assert_eq!(fc.queued_in_band(-1), 1);
    f.set_metrics(A, metrics(0, 0.1));
    f.set_metrics(B, metrics(3, 0.5));
    fc.capacity_changed();
    let r = next(&mut stream).await;
    assert_eq!(
        set_headers(&r).get(DESTINATION_KEY).map(String::as_str),
        Some(A),
        "legacy admission (429 for sheddable) is off when flow control is on"
    );
}
