//! `grpc.health.v1` over real gRPC on loopback: the readiness services report NOT_SERVING
//! until a pool configuration is applied and SERVING from then on; `liveness` is always
//! SERVING (upstream `cmd/epp/runner/health.go` without leader election).

// Test helpers outside `#[test]` functions: clippy's test allowance does not reach them.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sluice_core::{Endpoint, PoolRef};
use sluice_picker::metrics::Metrics;
use sluice_picker::server::{Bound, EXT_PROC_SERVICE, ServeConfig, serve};
use sluice_picker::{PickerState, ServerOptions, standalone};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

async fn start(state: PickerState) -> (Bound, tokio::sync::oneshot::Sender<()>) {
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let cfg = ServeConfig {
        grpc_addr: any,
        health_addr: any,
        metrics_addr: any,
        tls: None,
        health_on_grpc_port: true,
        metrics_staleness: Duration::from_secs(2),
        server: ServerOptions::default(),
    };
    let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve(
        cfg,
        state,
        async move {
            let _ = stop_rx.await;
        },
        move |b| {
            let _ = bound_tx.send(b);
        },
    ));
    (bound_rx.await.unwrap(), stop_tx)
}

async fn client(addr: SocketAddr) -> HealthClient<tonic::transport::Channel> {
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    HealthClient::new(channel)
}

async fn check(c: &mut HealthClient<tonic::transport::Channel>, service: &str) -> ServingStatus {
    let r = c
        .check(HealthCheckRequest {
            service: service.to_string(),
        })
        .await
        .unwrap()
        .into_inner();
    ServingStatus::try_from(r.status).unwrap()
}

fn snapshot() -> sluice_core::PoolSnapshot {
    standalone::snapshot(
        PoolRef {
            namespace: "default".into(),
            name: "health".into(),
        },
        1,
        vec![Endpoint::from_address(
            "default",
            "127.0.0.1:1".parse().unwrap(),
        )],
        Default::default(),
    )
}

#[tokio::test]
async fn readiness_follows_the_first_applied_configuration() {
    let state = PickerState::new(Arc::new(Metrics::new()), None, None);
    let (bound, _stop) = start(state.clone()).await;
    let mut health = client(bound.health).await;
    // The same service on the ext_proc port (`--health-checking`), as Envoy's active
    // health check asks it.
    let mut on_grpc = client(bound.grpc).await;

    for service in ["", EXT_PROC_SERVICE, "readiness", "inference-extension"] {
        assert_eq!(
            check(&mut health, service).await,
            ServingStatus::NotServing,
            "{service:?} before any configuration"
        );
    }
    assert_eq!(
        check(&mut on_grpc, EXT_PROC_SERVICE).await,
        ServingStatus::NotServing
    );
    assert_eq!(check(&mut health, "liveness").await, ServingStatus::Serving);
    let unknown = health
        .check(HealthCheckRequest {
            service: "no-such-service".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    // Watch the readiness service the picker updates last: NOT_SERVING now, SERVING once a
    // snapshot is applied (the stream says when, so the test does not poll).
    let mut watch = health
        .watch(HealthCheckRequest {
            service: "inference-extension".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status, ServingStatus::NotServing as i32);
    state.apply_snapshot(snapshot()).unwrap();
    let next = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .expect("SERVING within 10 s of applying a configuration")
        .unwrap()
        .unwrap();
    assert_eq!(next.status, ServingStatus::Serving as i32);

    for service in ["", EXT_PROC_SERVICE, "readiness", "inference-extension"] {
        assert_eq!(
            check(&mut health, service).await,
            ServingStatus::Serving,
            "{service:?} after the configuration"
        );
    }
    assert_eq!(
        check(&mut on_grpc, EXT_PROC_SERVICE).await,
        ServingStatus::Serving
    );
}
