//! Prometheus metrics and health endpoints on one HTTP port (`--metrics-addr`):
//!
//! - `/metrics`: OpenMetrics text;
//! - `/healthz`: 200 while the process serves HTTP (liveness);
//! - `/readyz`: 200 once the watches finished their first list (or the manifests were
//!   loaded), 503 before: a replica that would hand pickers a partial pool is not ready.
//!
//! Per-pool gauges are read from the [`Hub`] at scrape time rather than kept up to date on
//! every publish, so the hot path pays nothing for them and a deleted pool's series vanish.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `sluice_controller_pool_config_version` | gauge | `namespace`, `pool` |
//! | `sluice_controller_pickers` | gauge | `namespace`, `pool` |
//! | `sluice_controller_pickers_in_sync` | gauge | `namespace`, `pool` |
//! | `sluice_controller_pickers_refusing` | gauge | `namespace`, `pool` |
//! | `sluice_controller_picker_acks_total` | counter | `result` (`ack`, `nack`) |
//! | `sluice_controller_config_propagation_seconds` | histogram | |
//! | `sluice_controller_config_rejections_total` | counter | |
//! | `sluice_controller_configs_invalid` | gauge | |
//! | `sluice_controller_compiles_total` | counter | |
//! | `sluice_controller_compiles_withheld_total` | counter | |
//! | `sluice_controller_index_pods`, `sluice_controller_index_pools` | gauge | |
//! | `sluice_controller_ready` | gauge | |

use std::fmt::Write as _;
use std::net::SocketAddr;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use parking_lot::Mutex;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::hub::Hub;
use crate::runtime::SharedIndex;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabels {
    namespace: String,
    pool: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// The controller's metrics. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct ControllerMetrics {
    hub: Hub,
    index: SharedIndex,
    /// Serialises scrapes: each refreshes the gauge families from the hub, then encodes.
    scrape: Mutex<Scrape>,
}

#[derive(Debug)]
struct Scrape {
    registry: Registry,
    version: Family<PoolLabels, Gauge>,
    pickers: Family<PoolLabels, Gauge>,
    in_sync: Family<PoolLabels, Gauge>,
    refusing: Family<PoolLabels, Gauge>,
    invalid: Gauge,
    pods: Gauge,
    pools: Gauge,
    ready: Gauge,
}

impl ControllerMetrics {
    /// Metrics over `hub` and `index`; the hub's counters are registered here.
    pub fn new(hub: Hub, index: SharedIndex) -> Self {
        let mut registry = Registry::with_prefix("sluice_controller");
        let version = Family::<PoolLabels, Gauge>::default();
        let pickers = Family::<PoolLabels, Gauge>::default();
        let in_sync = Family::<PoolLabels, Gauge>::default();
        let refusing = Family::<PoolLabels, Gauge>::default();
        let (invalid, pods, pools, ready) = (
            Gauge::default(),
            Gauge::default(),
            Gauge::default(),
            Gauge::default(),
        );
        registry.register(
            "pool_config_version",
            "Version of the config published for a pool",
            version.clone(),
        );
        registry.register("pickers", "Pickers subscribed to a pool", pickers.clone());
        registry.register(
            "pickers_in_sync",
            "Pickers running their pool's current config version",
            in_sync.clone(),
        );
        registry.register(
            "pickers_refusing",
            "Pickers whose last answer was a NACK",
            refusing.clone(),
        );
        let stats = hub.stats().clone();
        registry.register(
            "picker_acks",
            "Acks (applied) and NACKs (refused) received from pickers",
            AckCounters(stats.acks.clone(), stats.nacks.clone()),
        );
        registry.register(
            "config_propagation_seconds",
            "Time from publishing a config version to each subscribed picker's Ack of it",
            stats.propagation.clone(),
        );
        registry.register(
            "configs_invalid",
            "EndpointPickerConfigs failing validation now",
            invalid.clone(),
        );
        registry.register("index_pods", "Pods held in the index", pods.clone());
        registry.register(
            "index_pools",
            "InferencePools held in the index",
            pools.clone(),
        );
        registry.register(
            "ready",
            "1 once the initial sync is done and configs are published",
            ready.clone(),
        );
        registry.register_collector(Box::new(IndexCounters(index.clone())));
        ControllerMetrics {
            hub,
            index,
            scrape: Mutex::new(Scrape {
                registry,
                version,
                pickers,
                in_sync,
                refusing,
                invalid,
                pods,
                pools,
                ready,
            }),
        }
    }

    /// The OpenMetrics text of every metric, refreshed from the hub and index now.
    pub fn render(&self) -> String {
        let scrape = self.scrape.lock();
        scrape.version.clear();
        scrape.pickers.clear();
        scrape.in_sync.clear();
        scrape.refusing.clear();
        for (pool, version, counts) in self.hub.summary() {
            let labels = PoolLabels {
                namespace: pool.namespace,
                pool: pool.name,
            };
            let set = |f: &Family<PoolLabels, Gauge>, v: u64| {
                f.get_or_create(&labels)
                    .set(i64::try_from(v).unwrap_or(i64::MAX));
            };
            set(&scrape.version, version);
            set(&scrape.pickers, counts.total as u64);
            set(&scrape.in_sync, counts.in_sync as u64);
            set(&scrape.refusing, counts.refusing as u64);
        }
        let (pods, pools, invalid) = self
            .index
            .read(|i| (i.pod_count(), i.pool_count(), i.invalid_config_count()));
        scrape.pods.set(pods as i64);
        scrape.pools.set(pools as i64);
        scrape.invalid.set(invalid as i64);
        scrape.ready.set(i64::from(self.index.is_synced()));
        let mut out = String::new();
        if encode(&mut out, &scrape.registry).is_err() {
            // Encoding into a String cannot fail short of a bug in an encoder; say so in the
            // scrape rather than serve a truncated page.
            out.clear();
            let _ = writeln!(out, "# encoding the metrics failed");
        }
        out
    }

    /// Whether the controller is ready (its initial sync is done).
    pub fn is_ready(&self) -> bool {
        self.index.is_synced()
    }
}

/// Acks and NACKs as one counter family, from the hub's two counters.
#[derive(Debug)]
struct AckCounters(
    prometheus_client::metrics::counter::Counter,
    prometheus_client::metrics::counter::Counter,
);

impl prometheus_client::encoding::EncodeMetric for AckCounters {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::MetricEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        for (result, counter) in [("ack", &self.0), ("nack", &self.1)] {
            let labels = ResultLabels { result };
            let e = encoder.encode_family(&labels)?;
            ConstCounter::new(counter.get()).encode(e)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> prometheus_client::metrics::MetricType {
        prometheus_client::metrics::MetricType::Counter
    }
}

/// The index's running totals, read at scrape time.
#[derive(Debug)]
struct IndexCounters(SharedIndex);

impl prometheus_client::collector::Collector for IndexCounters {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        let stats = self.0.read(|i| i.stats());
        for (name, help, value) in [
            ("compiles", "Pool compiles", stats.compiles),
            (
                "config_rejections",
                "EndpointPickerConfig changes that failed validation (pickers kept the last good config)",
                stats.config_rejections,
            ),
            (
                "compiles_withheld",
                "Compiles that published nothing: invalid config and no earlier good one",
                stats.withheld,
            ),
        ] {
            let counter = ConstCounter::new(value);
            let metric = encoder.encode_descriptor(name, help, None, counter.metric_type())?;
            counter.encode(metric)?;
        }
        Ok(())
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until `shutdown` turns true.
pub async fn serve_http_on(
    listener: tokio::net::TcpListener,
    metrics: std::sync::Arc<ControllerMetrics>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready_handler))
        .with_state(metrics);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|s| *s).await;
        })
        .await?;
    Ok(())
}

/// Binds `addr` and serves the HTTP endpoints (see [`serve_http_on`]).
pub async fn serve_http(
    addr: SocketAddr,
    metrics: std::sync::Arc<ControllerMetrics>,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("--metrics-addr {addr}: cannot listen: {e}"))?;
    serve_http_on(listener, metrics, shutdown).await
}

async fn metrics_handler(State(m): State<std::sync::Arc<ControllerMetrics>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.render(),
    )
}

async fn ready_handler(State(m): State<std::sync::Arc<ControllerMetrics>>) -> impl IntoResponse {
    if m.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the initial list of resources (or manifests) is not complete\n",
        )
    }
}
