//! The picker following an in-process controller over the real gRPC config stream
//! (`--controller-address` mode): the picker's own config client and apply function, the
//! controller's hub and gRPC service, routing checked through ext_proc sessions.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sluice_controller::grpc::Keepalive;
use sluice_controller::hub::Hub;
use sluice_core::snapshot::AppProtocol;
use sluice_core::{Endpoint, EndpointPickerConfig, PoolRef, PoolSnapshot};
use sluice_picker::config_client::{self, Backoff, ClientStatus, ConfigClientOptions};
use sluice_picker::envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
use sluice_picker::envoy_types::pb::envoy::service::ext_proc::v3::{
    HttpBody, HttpHeaders, ProcessingRequest, processing_request::Request as In,
    processing_response::Response as Out,
};
use sluice_picker::metrics::Metrics;
use sluice_picker::{ExtProcService, PickerState, ServerOptions, cli};
use tokio::sync::watch;

const A: u16 = 18001;
const B: u16 = 18002;

fn pool() -> PoolRef {
    PoolRef {
        namespace: "ns".into(),
        name: "pool".into(),
    }
}

fn snap(ports: &[u16], config: EndpointPickerConfig) -> PoolSnapshot {
    let eps = ports
        .iter()
        .map(|p| Endpoint::from_address("ns", ([127, 0, 0, 1], *p).into()))
        .collect();
    PoolSnapshot::new(pool(), 0, AppProtocol::Http, eps, vec![], vec![], config)
}

/// Where one completion request goes (the destination header), or the immediate status.
fn route(service: &ExtProcService) -> Result<String, i32> {
    let mut session = service.session();
    let mut out = VecDeque::new();
    let headers = [(":method", "POST"), (":path", "/v1/completions")]
        .iter()
        .map(|(k, v)| HeaderValue {
            key: k.to_string(),
            raw_value: v.as_bytes().to_vec(),
            ..Default::default()
        })
        .collect();
    session.handle(
        ProcessingRequest {
            request: Some(In::RequestHeaders(HttpHeaders {
                headers: Some(HeaderMap { headers }),
                ..Default::default()
            })),
            ..Default::default()
        },
        &mut out,
    );
    session.handle(
        ProcessingRequest {
            request: Some(In::RequestBody(HttpBody {
                body: br#"{"model":"m","prompt":"hello"}"#.to_vec(),
                end_of_stream: true,
                ..Default::default()
            })),
            ..Default::default()
        },
        &mut out,
    );
    for r in out {
        match r.response {
            Some(Out::ImmediateResponse(ir)) => return Err(ir.status.map_or(0, |s| s.code)),
            Some(Out::RequestHeaders(h)) => {
                let set = h
                    .response
                    .and_then(|c| c.header_mutation)
                    .unwrap()
                    .set_headers;
                let dest = set
                    .into_iter()
                    .filter_map(|h| h.header)
                    .find(|h| h.key == "x-gateway-destination-endpoint")
                    .unwrap();
                return Ok(String::from_utf8(dest.raw_value).unwrap());
            }
            _ => {}
        }
    }
    panic!("no routing answer")
}

async fn start_controller(hub: Hub) -> (SocketAddr, watch::Sender<bool>) {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, rx) = watch::channel(false);
    let keepalive = Keepalive {
        interval: Duration::from_secs(1),
        timeout: Duration::from_secs(1),
    };
    tokio::spawn(async move {
        sluice_controller::runtime::serve_grpc_on(
            listener,
            hub,
            "test".into(),
            keepalive,
            None,
            rx,
        )
        .await
        .unwrap();
    });
    (addr, stop)
}

async fn wait_status(rx: &mut watch::Receiver<ClientStatus>, f: impl Fn(&ClientStatus) -> bool) {
    tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|s| f(s)))
        .await
        .expect("timed out waiting for the config client")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn picker_routes_by_the_controllers_snapshots_and_a_nacked_config_keeps_the_old_one() {
    let hub = Hub::new();
    hub.publish(snap(&[A], EndpointPickerConfig::default()));
    let (addr, _stop_ctl) = start_controller(hub.clone()).await;

    let state = PickerState::new(Arc::new(Metrics::new()), None, Some(pool().to_string()));
    let service = ExtProcService::new(state.clone(), ServerOptions::default());
    assert_eq!(
        route(&service),
        Err(503),
        "nothing applied yet: 503, not a hang"
    );
    assert!(!state.is_ready());

    let mut opts = ConfigClientOptions::new(format!("http://{addr}"), pool(), "picker-0");
    opts.backoff = Backoff {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(200),
    };
    let (stop, stop_rx) = watch::channel(false);
    let (status_tx, mut status) = watch::channel(ClientStatus::default());
    tokio::spawn(config_client::run_with_status(
        opts,
        cli::apply_fn(state.clone()),
        stop_rx,
        status_tx,
    ));

    wait_status(&mut status, |s| s.applied_version == 1).await;
    assert!(
        state.is_ready(),
        "health reports SERVING from the first applied config"
    );
    assert_eq!(route(&service), Ok(format!("127.0.0.1:{A}")));

    // The controller moves the pool to B: the picker follows.
    hub.publish(snap(&[B], EndpointPickerConfig::default()));
    wait_status(&mut status, |s| s.applied_version == 2).await;
    assert_eq!(route(&service), Ok(format!("127.0.0.1:{B}")));

    // A config the picker's scheduler refuses is NACKed with the reason; routing stays on B.
    let bad: EndpointPickerConfig = serde_json::from_value(serde_json::json!({
        "plugins": [{"type": "no-such-scorer"}],
        "schedulingProfiles": [{"name": "default", "plugins": [{"pluginRef": "no-such-scorer"}]}],
    }))
    .unwrap();
    hub.publish(snap(&[A], bad));
    wait_status(&mut status, |s| s.refused == 1).await;
    tokio::time::timeout(
        Duration::from_secs(5),
        hub.wait_until(|h| {
            h.pickers(&pool())
                .get("picker-0")
                .is_some_and(|p| !p.accepted && p.version == 3)
        }),
    )
    .await
    .expect("the controller records the NACK");
    let nack = hub.pickers(&pool())["picker-0"].error.clone().unwrap();
    assert!(nack.contains("no-such-scorer"), "{nack}");
    assert_eq!(route(&service), Ok(format!("127.0.0.1:{B}")));
    assert_eq!(state.current().unwrap().snapshot.version, 2);
    let _ = stop.send(true);
}
