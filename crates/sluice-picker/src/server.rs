//! Serving: the ext_proc gRPC port (TLS by default), the gRPC health port and the
//! Prometheus `/metrics` port.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessorServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::extproc::{ExtProcService, ServerOptions};
use crate::state::PickerState;
use crate::tls::PemIdentity;

/// The service name Envoy's reference config health-checks.
pub const EXT_PROC_SERVICE: &str = "envoy.service.ext_proc.v3.ExternalProcessor";

/// Health service names that report readiness (upstream answers these; `liveness` is
/// always SERVING).
const READINESS_SERVICES: [&str; 4] = ["", EXT_PROC_SERVICE, "readiness", "inference-extension"];

/// Where and how to serve.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// ext_proc listen address.
    pub grpc_addr: SocketAddr,
    /// gRPC health listen address.
    pub health_addr: SocketAddr,
    /// Prometheus listen address.
    pub metrics_addr: SocketAddr,
    /// TLS identity for the ext_proc port; `None` serves plaintext HTTP/2.
    pub tls: Option<PemIdentity>,
    /// Also serve the health service on the ext_proc port (upstream `--health-checking`).
    pub health_on_grpc_port: bool,
    /// Endpoints whose metrics are older than this do not count in pool gauges.
    pub metrics_staleness: Duration,
    /// ext_proc behaviour.
    pub server: ServerOptions,
}

/// The bound addresses (useful when ports were 0).
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    /// ext_proc.
    pub grpc: SocketAddr,
    /// Health.
    pub health: SocketAddr,
    /// Metrics.
    pub metrics: SocketAddr,
}

async fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the {what} port {addr}"))
}

/// Binds every port, then serves until `shutdown` resolves. `on_bound` is called once the
/// ports are bound (the addresses are also logged).
pub async fn serve(
    cfg: ServeConfig,
    state: PickerState,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_bound: impl FnOnce(Bound),
) -> Result<()> {
    let grpc = bind(cfg.grpc_addr, "ext_proc (--grpc-port)").await?;
    let health = bind(cfg.health_addr, "health (--grpc-health-port)").await?;
    let metrics = bind(cfg.metrics_addr, "metrics (--metrics-port)").await?;
    let bound = Bound {
        grpc: grpc.local_addr()?,
        health: health.local_addr()?,
        metrics: metrics.local_addr()?,
    };
    tracing::info!(
        grpc = %bound.grpc, health = %bound.health, metrics = %bound.metrics, tls = cfg.tls.is_some(),
        "sluice-picker listening"
    );
    on_bound(bound);

    let (reporter, health_service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("liveness", ServingStatus::Serving)
        .await;
    for s in READINESS_SERVICES {
        reporter
            .set_service_status(s, ServingStatus::NotServing)
            .await;
    }
    let health_task = tokio::spawn(track_readiness(state.clone(), reporter));

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let mut tasks = tokio::task::JoinSet::new();

    let service = ExtProcService::new(state.clone(), cfg.server.clone());
    let mut builder = Server::builder().tcp_nodelay(true);
    if let Some(tls) = &cfg.tls {
        builder = builder
            .tls_config(tls.server_config())
            .context("configuring TLS for the ext_proc port")?;
    }
    let mut router = builder.add_service(ExternalProcessorServer::new(service));
    if cfg.health_on_grpc_port {
        router = router.add_service(health_service.clone());
    }
    let s = stopped();
    tasks.spawn(async move {
        router
            // Nagle on the ext_proc socket costs ~1 ms p50 at concurrency 4-16: tonic ignores
            // its own tcp_nodelay setting for a caller-supplied listener, so set it here.
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(grpc).with_nodelay(Some(true)),
                s,
            )
            .await
            .context("ext_proc server failed")
    });

    let s = stopped();
    tasks.spawn(async move {
        Server::builder()
            .add_service(health_service)
            .serve_with_incoming_shutdown(TcpListenerStream::new(health), s)
            .await
            .context("health server failed")
    });

    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get({
            let state = state.clone();
            let staleness = cfg.metrics_staleness;
            move || {
                let state = state.clone();
                async move {
                    state.refresh_pool_gauges(staleness);
                    (
                        [(
                            http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        state.metrics().encode(),
                    )
                }
            }
        }),
    );
    let s = stopped();
    tasks.spawn(async move {
        axum::serve(metrics, app)
            .with_graceful_shutdown(s)
            .await
            .context("metrics server failed")
    });

    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let mut result = Ok(());
    while let Some(joined) = tasks.join_next().await {
        let r = joined.map_err(anyhow::Error::from).and_then(|r| r);
        if let Err(e) = r {
            tracing::error!(error = %format!("{e:#}"), "a server stopped");
            if result.is_ok() {
                result = Err(e);
            }
            tasks.abort_all();
        }
    }
    health_task.abort();
    result
}

async fn track_readiness(state: PickerState, reporter: HealthReporter) {
    let mut rx = state.subscribe();
    let mut serving = false;
    loop {
        if state.is_ready() && !serving {
            for s in READINESS_SERVICES {
                reporter.set_service_status(s, ServingStatus::Serving).await;
            }
            serving = true;
            tracing::info!(
                version = *rx.borrow(),
                "pool configuration loaded; reporting SERVING"
            );
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}
