//! The binary's flags and `run`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use tokio::sync::watch;

use crate::grpc::Keepalive;
use crate::hub::Hub;
use crate::runtime::{SharedIndex, serve_grpc};

/// sluice-controller: compiles InferencePools, InferenceObjectives, InferenceModelRewrites,
/// EndpointPickerConfigs and Pods into per-pool configs and streams them to pickers.
#[derive(Debug, Parser)]
#[command(name = "sluice-controller", version)]
pub struct Args {
    /// File mode: read the resources (Pods included) from this directory of YAML files and
    /// follow its changes, instead of watching a cluster.
    #[arg(long, env = "SLUICE_MANIFESTS")]
    pub manifests: Option<PathBuf>,

    /// How often file mode looks for changes.
    #[arg(long, default_value = "200ms", value_parser = parse_duration)]
    pub poll_interval: Duration,

    /// Address of the config gRPC service.
    #[arg(long, env = "SLUICE_GRPC_ADDR", default_value = "0.0.0.0:9090")]
    pub grpc_addr: SocketAddr,

    /// Address of the HTTP endpoints: `/metrics` (Prometheus), `/healthz` (live), `/readyz`
    /// (initial sync done).
    #[arg(long, env = "SLUICE_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,

    /// PEM certificate for the gRPC service (TLS on when set).
    #[arg(long, env = "SLUICE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key for `--tls-cert`.
    #[arg(long, env = "SLUICE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA bundle: when set, pickers must present a client certificate signed by it.
    #[arg(long, env = "SLUICE_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// Watch only this namespace (a namespaced Role is then enough); all when unset.
    #[arg(long, env = "SLUICE_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,

    /// This replica's identity (Lease holder, Events): the pod name.
    #[arg(long, env = "POD_NAME", default_value = "sluice-controller")]
    pub identity: String,

    /// Namespace of the leader-election Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,

    /// Name of the leader-election Lease.
    #[arg(long, default_value = "sluice-controller")]
    pub lease_name: String,

    /// Lease duration in seconds; a new leader takes over this long after the old one stops
    /// renewing.
    #[arg(long, default_value_t = 15)]
    pub lease_duration_secs: u64,

    /// HTTP/2 keepalive interval towards pickers.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub keepalive: Duration,

    /// Log format.
    #[arg(long, env = "SLUICE_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

/// Parses `250ms`, `2s`, `1m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: expected e.g. 250ms, 2s, 1m"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!(
            "invalid duration unit in {s:?}: expected ms, s or m"
        )),
    }
}

impl Args {
    /// Runs the controller until SIGINT/SIGTERM.
    pub async fn run(self) -> anyhow::Result<()> {
        let (stop_tx, stop) = watch::channel(false);
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutting down");
            let _ = stop_tx.send(true);
        });
        self.run_until(stop).await
    }

    /// Runs the controller until `stop` turns true.
    pub async fn run_until(self, stop: watch::Receiver<bool>) -> anyhow::Result<()> {
        self.run_with_client(None, stop).await
    }

    /// Like [`Args::run_until`]; in cluster mode talks to the API server through `client`
    /// when given (tests pointing at a particular cluster) instead of the default one
    /// (in-cluster config or `KUBECONFIG`).
    pub async fn run_with_client(
        self,
        client: Option<kube::Client>,
        stop: watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        let Args {
            manifests,
            poll_interval,
            grpc_addr,
            metrics_addr,
            tls_cert,
            tls_key,
            tls_client_ca,
            watch_namespace,
            identity,
            lease_namespace,
            lease_name,
            lease_duration_secs,
            keepalive,
            log_format: _,
        } = self;
        let tls = match (tls_cert, tls_key) {
            (Some(cert), Some(key)) => {
                let read = |p: &PathBuf| {
                    std::fs::read(p)
                        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", p.display()))
                };
                let mut cfg = tonic::transport::ServerTlsConfig::new().identity(
                    tonic::transport::Identity::from_pem(read(&cert)?, read(&key)?),
                );
                if let Some(ca) = &tls_client_ca {
                    cfg = cfg.client_ca_root(tonic::transport::Certificate::from_pem(read(ca)?));
                }
                Some(cfg)
            }
            _ => None,
        };
        let hub = Hub::new();
        let index = SharedIndex::new(crate::default_validator());
        let keepalive = Keepalive {
            interval: keepalive,
            timeout: (keepalive / 2).max(Duration::from_secs(1)),
        };
        let compiler = tokio::spawn(index.clone().run_compiler(hub.clone(), stop.clone()));
        let grpc = tokio::spawn(serve_grpc(
            grpc_addr,
            hub.clone(),
            identity.clone(),
            keepalive,
            tls,
            stop.clone(),
        ));
        tracing::info!(addr = %grpc_addr, "serving sluice.config.v1");
        let metrics = std::sync::Arc::new(crate::metrics::ControllerMetrics::new(
            hub.clone(),
            index.clone(),
        ));
        let http = tokio::spawn(crate::metrics::serve_http(
            metrics_addr,
            metrics,
            stop.clone(),
        ));
        tracing::info!(addr = %metrics_addr, "serving /metrics, /healthz, /readyz");

        let source = if let Some(dir) = manifests {
            tokio::spawn(crate::files::run(
                dir,
                index.clone(),
                poll_interval,
                stop.clone(),
            ))
        } else {
            let client = match client {
                Some(c) => c,
                None => kube::Client::try_default().await.map_err(|e| {
                    anyhow::anyhow!(
                        "no Kubernetes API access ({e}); run in a cluster, set KUBECONFIG, or use --manifests DIR"
                    )
                })?,
            };
            let leader = crate::leader::elect(
                client.clone(),
                &lease_namespace,
                &lease_name,
                &identity,
                lease_duration_secs,
                stop.clone(),
            )
            .await?
            .leader;
            tokio::spawn(crate::status::run(
                client.clone(),
                identity.clone(),
                index.clone(),
                hub.clone(),
                leader,
                stop.clone(),
                crate::status::Timing {
                    min_interval: Duration::from_millis(200),
                    resync: Duration::from_secs(60),
                },
            ));
            tokio::spawn(crate::k8s::run(
                client,
                index.clone(),
                watch_namespace,
                stop.clone(),
            ))
        };
        // The first failure (a port in use, the API server refusing us) ends the run instead
        // of leaving a half-working controller behind.
        let aborts = [
            grpc.abort_handle(),
            source.abort_handle(),
            http.abort_handle(),
        ];
        let result = tokio::try_join!(joined(grpc), joined(source), joined(http));
        compiler.abort();
        for task in aborts {
            task.abort();
        }
        result.map(|_| ())
    }
}

async fn joined(task: tokio::task::JoinHandle<anyhow::Result<()>>) -> anyhow::Result<()> {
    task.await
        .map_err(|e| anyhow::anyhow!("controller task failed: {e}"))?
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
