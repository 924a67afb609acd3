//! Command-line flags (upstream's names where the concept exists) and start-up.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use sluice_core::PoolRef;

use tokio::sync::watch;

use crate::config_client::{self, ConfigClientOptions};
use crate::extproc::ServerOptions;
use crate::metrics::Metrics;
use crate::scrape::ScrapeSettings;
use crate::server::{ServeConfig, serve};
use crate::standalone;
use crate::state::{PickerOptions, PickerState};
use crate::tls::PemIdentity;
use sluice_predictor::{
    InProcessPredictor, Objective, PredictorConfig, RemoteConfig, RemotePredictor,
    remote::RemoteConfigError,
};
use sluice_scheduling::plugins::slo::SloServices;

/// sluice-picker: an Envoy ext_proc endpoint picker for inference pools.
#[derive(Debug, Clone, Parser)]
#[command(name = "sluice-picker", version, about, long_about = None)]
pub struct Args {
    /// ext_proc gRPC port.
    #[arg(long, default_value_t = 9002)]
    pub grpc_port: u16,
    /// gRPC health port (grpc.health.v1).
    #[arg(long, default_value_t = 9003)]
    pub grpc_health_port: u16,
    /// Prometheus /metrics port.
    #[arg(long, default_value_t = 9090)]
    pub metrics_port: u16,
    /// Address every port binds to.
    #[arg(long, default_value = "0.0.0.0")]
    pub bind_address: IpAddr,
    /// Serve ext_proc over TLS (HTTP/2); self-signed unless --cert-path is given. Turn off
    /// (`--secure-serving=false`) only for loopback tests.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub secure_serving: bool,
    /// Directory with tls.crt and tls.key for --secure-serving.
    #[arg(long)]
    pub cert_path: Option<PathBuf>,
    /// Also register the health service on the ext_proc port.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    pub health_checking: bool,
    /// Model-server metrics scrape period (e.g. 50ms, 1s).
    #[arg(long, default_value = "50ms", value_parser = parse_duration)]
    pub refresh_metrics_interval: Duration,
    /// Endpoints whose metrics are older than this are left out of pool gauges.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub metrics_staleness_threshold: Duration,
    /// Limit on one metrics scrape.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub scrape_timeout: Duration,
    /// Path of the model servers' metrics page.
    #[arg(long, default_value = "/metrics")]
    pub model_server_metrics_path: String,
    /// Engine assumed for endpoints without an engine label (vllm, sglang, trtllm-serve,
    /// triton-tensorrt-llm, or one the config's core-metrics-extractor `engineConfigs`
    /// defines); the extractor's `defaultEngine` parameter wins over this flag.
    #[arg(long, default_value = "vllm")]
    pub default_engine: String,
    /// Standalone mode: the pool's endpoints, `HOST:PORT,...`.
    #[arg(long, conflicts_with = "endpoints_file")]
    pub endpoints: Option<String>,
    /// Standalone mode: a file with one `HOST:PORT [engine=NAME] [metrics=HOST:PORT]` per line.
    #[arg(long)]
    pub endpoints_file: Option<PathBuf>,
    /// EndpointPickerConfig file (YAML or JSON).
    #[arg(long, conflicts_with = "config_text")]
    pub config_file: Option<PathBuf>,
    /// EndpointPickerConfig text.
    #[arg(long)]
    pub config_text: Option<String>,
    /// The sluice controller's config gRPC address (controller mode), `http://host:port` or
    /// `https://host:port` (a bare `host:port` means `http://`).
    #[arg(long)]
    pub controller_address: Option<String>,
    /// PEM CA bundle that signs the controller's certificate (for an `https://` address).
    #[arg(long)]
    pub controller_ca_file: Option<PathBuf>,
    /// This picker's identity on the controller's config stream (default: `POD_NAME`, then
    /// the hostname).
    #[arg(long, env = "POD_NAME")]
    pub picker_id: Option<String>,
    /// The pool's namespace.
    #[arg(long, env = "NAMESPACE", default_value = "default")]
    pub pool_namespace: String,
    /// The pool's name.
    #[arg(long, default_value = "standalone")]
    pub pool_name: String,
    /// Largest request body accepted (413 above).
    #[arg(long, default_value_t = 16 << 20)]
    pub max_request_body_bytes: usize,
    /// Ignore the data plane's subset hint.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    pub disable_endpoint_subset_filter: bool,
    /// Request body mode assumed when Envoy does not announce its processing mode:
    /// full-duplex or buffered.
    #[arg(long, default_value = "full-duplex")]
    pub default_body_mode: String,
    /// SLO-aware routing: start the in-process latency predictor at start-up (its series
    /// appear on /metrics) and, in standalone mode without --config-file/--config-text, route
    /// with the predicted-latency profile (`slo_config()`). Requests carry their SLOs in
    /// `x-slo-ttft-ms` / `x-slo-tpot-ms`.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub enable_latency_predictor: bool,
    /// What the latency predictor estimates: `p90` (default: an endpoint counts as meeting an
    /// SLO when its 90th-percentile latency does), `median`, `mean`, `p<N>` or a quantile
    /// such as 0.75. Lower quantiles pack endpoints tighter and miss more SLOs; see
    /// docs/slo-routing.md.
    #[arg(long, value_name = "OBJECTIVE", value_parser = parse_objective)]
    pub latency_objective: Option<Objective>,
    /// Use llm-d's latency predictor sidecars instead of the in-process predictor: their
    /// prediction servers (`/predict/bulk/strict`), comma-separated, e.g.
    /// http://localhost:8001. A request waits for the answer (at most
    /// --latency-predictor-timeout) and falls back to the composite score without it.
    #[arg(
        long,
        value_name = "URL,...",
        value_delimiter = ',',
        requires = "latency_training_url"
    )]
    pub latency_predictor_url: Vec<String>,
    /// The llm-d training server (`/add_training_data_bulk`) that receives the observed
    /// latencies, e.g. http://localhost:8000.
    #[arg(long, value_name = "URL", requires = "latency_predictor_url")]
    pub latency_training_url: Option<String>,
    /// Deadline of one remote batch prediction (coalescing wait included).
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "400ms",
        value_parser = parse_duration,
        requires = "latency_predictor_url"
    )]
    pub latency_predictor_timeout: Duration,
    /// How long a remote prediction call waits for concurrent requests to share it (e.g.
    /// 1ms, 500us): a sidecar call costs about the same for 1 row as for 100, so merging
    /// raises the sidecars' throughput at the cost of up to this much latency. 0 sends one
    /// call per request. Must be shorter than --latency-predictor-timeout.
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "1ms",
        value_parser = parse_duration,
        requires = "latency_predictor_url"
    )]
    pub latency_predictor_coalesce_window: Duration,
    /// Merged prediction calls in flight at most (1..=1024): about the sidecars' total
    /// worker count; beyond it calls queue inside the sidecars, where they add latency and
    /// cannot be merged. Requests wait for a free slot in the picker instead, and share the
    /// next call. No limit with --latency-predictor-coalesce-window 0.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 36,
        requires = "latency_predictor_url"
    )]
    pub latency_predictor_max_dispatches: usize,
    /// Log as JSON lines.
    #[arg(long, default_value_t = false)]
    pub log_json: bool,
    /// Tokio worker threads (default: one per CPU). Fewer than the CPUs leaves cores to a
    /// proxy or model server sharing the machine and saves cross-thread wake-ups: on a
    /// 2-core machine shared with Envoy, 1 gave the lowest latency at 64 concurrent requests
    /// (docs/picker-performance.md).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub worker_threads: Option<u16>,
}

/// Parses a duration flag the way upstream's Go flags do (`50ms`, `2s`, `1m30s`; a unit is
/// required), with sluice-core's parser; the message names the flag's expected form.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    sluice_core::quantity::parse_duration(s)
        .map_err(|e| format!("{e}; expected a duration such as 50ms, 2s or 1m30s"))
}

fn parse_objective(s: &str) -> Result<Objective, String> {
    s.parse()
        .map_err(|e: sluice_predictor::ParseObjectiveError| e.to_string())
}

impl Args {
    fn body_mode(&self) -> Result<i32> {
        match self.default_body_mode.as_str() {
            "full-duplex" | "FULL_DUPLEX_STREAMED" => Ok(4),
            "buffered" | "BUFFERED" => Ok(2),
            other => bail!("--default-body-mode {other:?} is not full-duplex or buffered"),
        }
    }
}

/// What start-up prepares before it serves: the picker's state, with the standalone
/// configuration already applied, and the controller's config-stream settings in
/// controller mode (the stream starts when serving does).
#[derive(Debug)]
pub struct Startup {
    /// The state the servers share.
    pub state: PickerState,
    /// Controller mode: where to subscribe for snapshots.
    pub controller: Option<ConfigClientOptions>,
    /// The sidecar predictor, when in use: its buffered training samples are sent on
    /// shutdown.
    pub remote: Option<Arc<RemotePredictor>>,
}

/// Start-up up to serving: the SLO services the flags ask for, the picker state, and in
/// standalone mode the snapshot of the flags' endpoints under the configuration the flags
/// choose (`--config-file`, `--config-text`, else the built-in SLO routing config with
/// `--enable-latency-predictor`, else upstream's default). Needs a Tokio runtime (metrics
/// scrapers start when the snapshot is applied); binds no port.
pub fn prepare(args: &Args) -> Result<Startup> {
    let metrics = Arc::new(Metrics::new());
    let scrape = ScrapeSettings {
        interval: args.refresh_metrics_interval.max(Duration::from_millis(1)),
        timeout: args.scrape_timeout,
        path: args.model_server_metrics_path.clone(),
        default_engine: args.default_engine.clone(),
    };
    let pool = PoolRef {
        namespace: args.pool_namespace.clone(),
        name: args.pool_name.clone(),
    };
    let mut remote_predictor = None;
    let options = if let Some(training_url) = &args.latency_training_url {
        let remote = RemotePredictor::new(RemoteConfig {
            prediction_urls: args.latency_predictor_url.clone(),
            training_url: training_url.clone(),
            timeout: args.latency_predictor_timeout,
            coalesce_window: args.latency_predictor_coalesce_window,
            max_concurrent_dispatches: args.latency_predictor_max_dispatches,
            ..RemoteConfig::default()
        })
        .map_err(|e| {
            let flags = remote_flags(&e);
            anyhow::Error::new(e).context(flags)
        })?;
        let remote = Arc::new(remote);
        remote_predictor = Some(remote.clone());
        PickerOptions::with_remote_predictor(remote)
    } else if args.enable_latency_predictor || args.latency_objective.is_some() {
        let config = PredictorConfig {
            objective: args
                .latency_objective
                .unwrap_or(PredictorConfig::default().objective),
            ..PredictorConfig::default()
        };
        let predictor = InProcessPredictor::spawn(config)
            .context("starting the latency predictor (--enable-latency-predictor)")?;
        PickerOptions {
            slo: Some(SloServices::with_predictor(Arc::new(predictor))),
            ..PickerOptions::default()
        }
    } else {
        // The default services start a predictor only if a config uses the SLO plugins.
        PickerOptions::default()
    };
    let state = PickerState::with_options(metrics, Some(scrape), Some(pool.to_string()), options);

    let config = match (&args.config_file, &args.config_text) {
        (Some(path), _) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading --config-file {}", path.display()))?;
            standalone::config_from_text(&text)
                .with_context(|| format!("in --config-file {}", path.display()))?
        }
        (None, Some(text)) => standalone::config_from_text(text).context("in --config-text")?,
        (None, None) if args.enable_latency_predictor => {
            sluice_scheduling::plugins::slo::slo_config()
                .context("the built-in SLO routing config (--enable-latency-predictor)")?
        }
        (None, None) => Default::default(),
    };
    let mut controller = None;
    let endpoints = match (&args.endpoints, &args.endpoints_file) {
        (Some(list), _) => Some(standalone::endpoints_from_list(list, &args.pool_namespace)?),
        (None, Some(path)) => Some(standalone::endpoints_from_file(path, &args.pool_namespace)?),
        (None, None) => None,
    };
    match (endpoints, &args.controller_address) {
        (Some(eps), None) => {
            let snap = standalone::snapshot(pool, 1, eps, config);
            state
                .apply_snapshot(snap)
                .context("applying the standalone configuration")?;
        }
        (Some(_), Some(_)) => bail!(
            "--endpoints/--endpoints-file (standalone) and --controller-address are exclusive"
        ),
        (None, Some(addr)) => {
            if args.config_file.is_some() || args.config_text.is_some() {
                bail!(
                    "--config-file/--config-text apply to standalone mode; with --controller-address the controller sends the EndpointPickerConfig"
                );
            }
            controller = Some(controller_options(args, addr, pool)?);
        }
        (None, None) => bail!(
            "no endpoints: give --endpoints HOST:PORT,..., --endpoints-file, or --controller-address"
        ),
    }

    Ok(Startup {
        state,
        controller,
        remote: remote_predictor,
    })
}

/// The flags behind a remote-predictor setting the predictor refused: its message names
/// the setting by its config name, the context names what the user typed.
fn remote_flags(e: &RemoteConfigError) -> &'static str {
    match e {
        RemoteConfigError::NoPredictionServer => "--latency-predictor-url",
        RemoteConfigError::BadUrl { field, .. } if field.contains("training") => {
            "--latency-training-url"
        }
        RemoteConfigError::BadUrl { .. } => "--latency-predictor-url",
        RemoteConfigError::BadConcurrentDispatches(_) => "--latency-predictor-max-dispatches",
        RemoteConfigError::BadCoalesceWindow { .. } => {
            "--latency-predictor-coalesce-window / --latency-predictor-timeout"
        }
        _ => "the remote latency predictor (--latency-predictor-url)",
    }
}

/// Runs the picker until SIGINT/SIGTERM.
pub async fn run(args: Args) -> Result<()> {
    let Startup {
        state,
        controller,
        remote,
    } = prepare(&args)?;
    let tls = if args.secure_serving {
        Some(match &args.cert_path {
            Some(dir) => PemIdentity::load(dir)?,
            None => PemIdentity::self_signed()?,
        })
    } else {
        None
    };
    let addr = |port| SocketAddr::new(args.bind_address, port);
    let cfg = ServeConfig {
        grpc_addr: addr(args.grpc_port),
        health_addr: addr(args.grpc_health_port),
        metrics_addr: addr(args.metrics_port),
        tls,
        health_on_grpc_port: args.health_checking,
        metrics_staleness: args.metrics_staleness_threshold,
        server: ServerOptions {
            max_request_body_bytes: args.max_request_body_bytes,
            disable_subset_filter: args.disable_endpoint_subset_filter,
            default_request_body_mode: args.body_mode()?,
            ..Default::default()
        },
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    if let Some(opts) = controller {
        // Health stays NOT_SERVING until the first snapshot from the controller is applied
        // (server::track_readiness watches the applied version).
        tokio::spawn(config_client::run(opts, apply_fn(state.clone()), stop_rx));
    }
    let shutdown = async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    };
    let served = serve(cfg, state, shutdown, |_| {}).await;
    if let Some(remote) = remote {
        // Up to a second's worth of samples would otherwise be lost; bounded so a dead
        // training server cannot hold the shutdown.
        if tokio::time::timeout(SHUTDOWN_FLUSH, remote.flush())
            .await
            .is_err()
        {
            tracing::warn!(
                "the training server did not take the last samples within {SHUTDOWN_FLUSH:?}"
            );
        }
    }
    served
}

/// How long shutdown waits to send the remote predictor's buffered training samples.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(2);

/// The function the controller's config client installs snapshots with: applies through
/// [`PickerState::apply_snapshot`], and turns a refusal into the NACK text the controller
/// shows (the previous snapshot keeps serving).
pub fn apply_fn(
    state: PickerState,
) -> impl Fn(sluice_core::PoolSnapshot) -> Result<(), String> + Send + Sync + 'static {
    move |snapshot| {
        state
            .apply_snapshot(snapshot)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// Config-client settings from the flags: address scheme, TLS, pool and picker id.
fn controller_options(args: &Args, addr: &str, pool: PoolRef) -> Result<ConfigClientOptions> {
    let address = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    let picker_id = args.picker_id.clone().unwrap_or_else(hostname);
    let mut opts = ConfigClientOptions::new(address.clone(), pool, picker_id);
    match (address.starts_with("https://"), &args.controller_ca_file) {
        (true, Some(path)) => {
            let pem = std::fs::read(path)
                .with_context(|| format!("reading --controller-ca-file {}", path.display()))?;
            let mut tls = tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(pem));
            // The controller requires a client certificate from its CA (mutual TLS, as
            // manifests/base deploys it): present the picker's own serving certificate.
            if let Some(dir) = &args.cert_path {
                let id = PemIdentity::load(dir)?;
                tls = tls.identity(tonic::transport::Identity::from_pem(id.cert, id.key));
            }
            opts.tls = Some(tls);
        }
        (true, None) => bail!(
            "--controller-address {address} uses TLS: give --controller-ca-file with the CA that signs the controller's certificate"
        ),
        (false, Some(_)) => {
            bail!("--controller-ca-file is set but --controller-address {address} is not https://")
        }
        (false, None) => {}
    }
    Ok(opts)
}

/// The host name (Kubernetes sets it to the pod name), for the default picker id.
fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "sluice-picker".to_string())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("shutting down");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("50ms"), Ok(Duration::from_millis(50)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        let e = parse_duration("5 parsecs").unwrap_err();
        assert!(e.contains("\"5 parsecs\"") && e.contains("unit"), "{e}");
        assert!(parse_duration("abc").unwrap_err().contains("50ms"));
        // Like Go's flags, a bare number is ambiguous and refused.
        assert!(parse_duration("2").is_err());
        let err = Args::try_parse_from(["sluice-picker", "--refresh-metrics-interval", "fast"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--refresh-metrics-interval") && err.contains("50ms"),
            "{err}"
        );
    }

    #[test]
    fn upstream_flag_defaults() {
        let a = Args::try_parse_from(["sluice-picker", "--endpoints", "127.0.0.1:1"]).unwrap();
        assert_eq!(
            (a.grpc_port, a.grpc_health_port, a.metrics_port),
            (9002, 9003, 9090)
        );
        assert!(a.secure_serving);
        assert_eq!(a.refresh_metrics_interval, Duration::from_millis(50));
        assert_eq!(a.metrics_staleness_threshold, Duration::from_secs(2));
        let b = Args::try_parse_from(["sluice-picker", "--secure-serving=false"]).unwrap();
        assert!(!b.secure_serving);
        assert!(
            Args::try_parse_from(["sluice-picker", "--config-file", "a", "--config-text", "b"])
                .is_err()
        );
    }

    /// The profile handler the standalone picker prepared by `flags` routes with, and
    /// whether that scheduler skips saturation detection for an ordinary request.
    fn prepared_handler(flags: &[&str]) -> (Vec<String>, bool) {
        let mut argv = vec![
            "sluice-picker",
            "--endpoints",
            "127.0.0.1:1",
            "--secure-serving=false",
        ];
        argv.extend_from_slice(flags);
        let startup = prepare(&Args::try_parse_from(argv).unwrap()).unwrap();
        assert!(startup.controller.is_none(), "standalone mode");
        let loaded = startup
            .state
            .current()
            .expect("the standalone snapshot is applied");
        let handlers = loaded
            .snapshot
            .picker_config
            .plugins
            .iter()
            .filter(|p| p.type_.ends_with("-profile-handler"))
            .map(|p| p.type_.clone())
            .collect();
        let skip = loaded
            .router
            .skip_saturation_detection(&sluice_scheduling::LlmRequest::default());
        (handlers, skip)
    }

    #[tokio::test]
    async fn enable_latency_predictor_without_a_config_routes_with_the_built_in_slo_config() {
        let (handlers, skip) = prepared_handler(&["--enable-latency-predictor"]);
        assert_eq!(handlers, ["predicted-latency-profile-handler"]);
        assert!(skip, "the SLO profile does its own admission");

        // Without the flag: upstream's default config (no handler named, single profile).
        let (handlers, skip) = prepared_handler(&[]);
        assert!(handlers.is_empty(), "{handlers:?}");
        assert!(!skip, "the default profile keeps saturation detection");

        // A config given on the command line wins over the built-in one.
        let (handlers, skip) = prepared_handler(&[
            "--enable-latency-predictor",
            "--config-text",
            "plugins: [{type: single-profile-handler}, {type: queue-scorer}, {type: max-score-picker}]\nschedulingProfiles: [{name: default, plugins: [{pluginRef: queue-scorer}, {pluginRef: max-score-picker}]}]",
        ]);
        assert_eq!(handlers, ["single-profile-handler"]);
        assert!(!skip);
    }

    #[test]
    fn latency_objective_flag() {
        let a = Args::try_parse_from(["sluice-picker", "--latency-objective", "median"]).unwrap();
        assert_eq!(a.latency_objective, Some(Objective::MEDIAN));
        let a = Args::try_parse_from(["sluice-picker", "--latency-objective", "p75"]).unwrap();
        assert_eq!(a.latency_objective, Some(Objective::Quantile { q: 0.75 }));
        assert_eq!(
            Args::try_parse_from(["sluice-picker"])
                .unwrap()
                .latency_objective,
            None
        );
        let err = Args::try_parse_from(["sluice-picker", "--latency-objective", "p100"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("expected mean, median"), "{err}");
    }

    #[test]
    fn remote_predictor_flags_come_in_pairs() {
        let a = Args::try_parse_from([
            "sluice-picker",
            "--latency-predictor-url",
            "http://p1:8001,http://p2:8001",
            "--latency-training-url",
            "http://t:8000",
        ])
        .unwrap();
        assert_eq!(
            a.latency_predictor_url,
            ["http://p1:8001", "http://p2:8001"]
        );
        assert_eq!(a.latency_training_url.as_deref(), Some("http://t:8000"));
        assert_eq!(a.latency_predictor_timeout, Duration::from_millis(400));
        let err = Args::try_parse_from(["sluice-picker", "--latency-predictor-url", "http://p:1"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--latency-training-url"), "{err}");
        // A sidecar deadline without sidecars is a mistake worth saying so.
        let err = Args::try_parse_from(["sluice-picker", "--latency-predictor-timeout", "1s"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--latency-predictor-url"), "{err}");
    }

    #[test]
    fn remote_predictor_coalescing_flags() {
        let remote = [
            "sluice-picker",
            "--latency-predictor-url",
            "http://p:8001",
            "--latency-training-url",
            "http://t:8000",
        ];
        let a = Args::try_parse_from(remote).unwrap();
        assert_eq!(
            a.latency_predictor_coalesce_window,
            Duration::from_millis(1)
        );
        assert_eq!(a.latency_predictor_max_dispatches, 36);

        let mut argv = remote.to_vec();
        argv.extend([
            "--latency-predictor-coalesce-window",
            "500us",
            "--latency-predictor-max-dispatches",
            "4",
        ]);
        let a = Args::try_parse_from(argv).unwrap();
        assert_eq!(
            a.latency_predictor_coalesce_window,
            Duration::from_micros(500)
        );
        assert_eq!(a.latency_predictor_max_dispatches, 4);
        let mut argv = remote.to_vec();
        argv.extend(["--latency-predictor-coalesce-window", "0"]);
        let a = Args::try_parse_from(argv).unwrap();
        assert_eq!(a.latency_predictor_coalesce_window, Duration::ZERO);

        // Without the sidecars the settings would silently do nothing.
        for flag in [
            ["--latency-predictor-coalesce-window", "2ms"],
            ["--latency-predictor-max-dispatches", "8"],
        ] {
            let mut argv = vec!["sluice-picker"];
            argv.extend(flag);
            let err = Args::try_parse_from(argv).unwrap_err().to_string();
            assert!(err.contains("--latency-predictor-url"), "{err}");
        }
        let mut argv = remote.to_vec();
        argv.extend(["--latency-predictor-max-dispatches", "many"]);
        let err = Args::try_parse_from(argv).unwrap_err().to_string();
        assert!(err.contains("--latency-predictor-max-dispatches"), "{err}");
    }

    /// `prepare` for a standalone picker predicting with sidecars at `url`, plus `flags`.
    fn prepare_remote(url: &str, flags: &[&str]) -> Result<Startup> {
        let mut argv = vec![
            "sluice-picker",
            "--endpoints",
            "127.0.0.1:1",
            "--secure-serving=false",
            "--latency-predictor-url",
            url,
            "--latency-training-url",
            url,
        ];
        argv.extend_from_slice(flags);
        prepare(&Args::try_parse_from(argv).unwrap())
    }

    #[tokio::test]
    async fn bad_remote_predictor_settings_fail_start_up_naming_the_flag() {
        let url = "http://127.0.0.1:1";
        let err = prepare_remote(url, &["--latency-predictor-max-dispatches", "0"]).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("--latency-predictor-max-dispatches")
                && msg.contains("maxConcurrentDispatches 0 is out of range; expected 1..=1024"),
            "{msg}"
        );
        let err = prepare_remote(url, &["--latency-predictor-max-dispatches", "2000"]).unwrap_err();
        assert!(format!("{err:#}").contains("2000"), "{err:#}");

        let err =
            prepare_remote(url, &["--latency-predictor-coalesce-window", "400ms"]).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("--latency-predictor-coalesce-window")
                && msg.contains("coalesceWindowMs 400 is not shorter than timeoutMs 400"),
            "{msg}"
        );
        // A window below the deadline is fine.
        prepare_remote(
            url,
            &[
                "--latency-predictor-coalesce-window",
                "400ms",
                "--latency-predictor-timeout",
                "1s",
            ],
        )
        .unwrap();

        let err = prepare_remote("https://127.0.0.1:1", &[]).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("--latency-predictor-url") && msg.contains("only plain http://"),
            "{msg}"
        );
    }

    /// The value of the sample line `name` in Prometheus text `text`.
    fn sample(text: &str, name: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }

    const REMOTE_SERIES: [&str; 7] = [
        "sluice_latency_predictor_remote_calls_total",
        "sluice_latency_predictor_remote_call_failures_total",
        "sluice_latency_predictor_remote_merged_calls_total",
        "sluice_latency_predictor_remote_merged_callers_total",
        "sluice_latency_predictor_remote_queue_full_total",
        "sluice_latency_predictor_remote_training_entries_sent_total",
        "sluice_latency_predictor_remote_training_entries_dropped_total",
    ];

    /// Start-up with sidecars on a loopback port nobody listens on, one prediction through
    /// the picker's SLO services, and the picker's /metrics text before and after it.
    async fn metrics_around_a_failed_prediction(flags: &[&str]) -> (String, String) {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let startup = prepare_remote(&format!("http://127.0.0.1:{port}"), flags).unwrap();
        let before = startup.state.metrics().encode();
        let slo = startup.state.slo();
        let predictor = slo.predictor().expect("the remote predictor is installed");
        let batch = [sluice_predictor::Features::default()];
        // Connection refused comes back at once; the bound only keeps a broken build from
        // hanging the suite (the predictor's own deadline is 400 ms).
        let answer = tokio::time::timeout(Duration::from_secs(5), predictor.predict_batch(&batch))
            .await
            .expect("the prediction must finish within its deadline");
        assert!(
            answer.is_err(),
            "nothing listens on port {port}: {answer:?}"
        );
        (before, startup.state.metrics().encode())
    }

    #[tokio::test]
    async fn remote_predictor_counters_are_on_metrics_and_count_failed_calls() {
        let (before, after) = metrics_around_a_failed_prediction(&[]).await;
        for name in REMOTE_SERIES {
            assert_eq!(sample(&before, name), Some(0.0), "{name} in:\n{before}");
        }
        let after_of = |name: &str| sample(&after, name).unwrap();
        assert_eq!(
            after_of("sluice_latency_predictor_remote_call_failures_total"),
            1.0
        );
        assert_eq!(after_of("sluice_latency_predictor_remote_calls_total"), 1.0);
        // Coalescing is on by default: the one caller went out as a merged call of one.
        assert_eq!(
            after_of("sluice_latency_predictor_remote_merged_calls_total"),
            1.0
        );
        assert_eq!(
            after_of("sluice_latency_predictor_remote_merged_callers_total"),
            1.0
        );
        assert_eq!(
            after_of("sluice_latency_predictor_remote_queue_full_total"),
            0.0
        );
    }

    #[tokio::test]
    async fn coalesce_window_zero_sends_unmerged_calls() {
        let (_, after) =
            metrics_around_a_failed_prediction(&["--latency-predictor-coalesce-window", "0"]).await;
        let after_of = |name: &str| sample(&after, name).unwrap();
        assert_eq!(after_of("sluice_latency_predictor_remote_calls_total"), 1.0);
        assert_eq!(
            after_of("sluice_latency_predictor_remote_call_failures_total"),
            1.0
        );
        assert_eq!(
            after_of("sluice_latency_predictor_remote_merged_calls_total"),
            0.0
        );
    }

    /// A stand-in prediction server: answers `/predict/bulk/strict` with one prediction per
    /// row, and records the row count of every call it receives.
    async fn mock_sidecar() -> (String, Arc<parking_lot::Mutex<Vec<usize>>>) {
        let calls = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let seen = Arc::clone(&calls);
        let app = axum::Router::new().route(
            "/predict/bulk/strict",
            axum::routing::post(move |body: axum::Json<serde_json::Value>| {
                let seen = Arc::clone(&seen);
                async move {
                    let rows = body["requests"].as_array().map_or(0, Vec::len);
                    seen.lock().push(rows);
                    let row = serde_json::json!({"ttft_ms": 100.0, "tpot_ms": 10.0});
                    axum::Json(serde_json::json!({ "predictions": vec![row; rows] }))
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (url, calls)
    }

    /// Concurrent requests share one sidecar call, and the series say so: merged callers
    /// over merged calls is the coalescing ratio an operator reads.
    #[tokio::test]
    async fn metrics_show_the_coalescing_ratio_of_concurrent_predictions() {
        let (url, sidecar_calls) = mock_sidecar().await;
        let startup =
            prepare_remote(&url, &["--latency-predictor-coalesce-window", "50ms"]).unwrap();
        let slo = startup.state.slo();
        let predictor = slo.predictor().unwrap();
        let batch = [sluice_predictor::Features::default(); 3];
        // The rows are queued when predict_batch is called, so all eight callers are
        // waiting before the dispatcher (on this single-threaded runtime) first runs.
        let pending: Vec<_> = (0..8).map(|_| predictor.predict_batch(&batch)).collect();
        let answers =
            tokio::time::timeout(Duration::from_secs(5), futures::future::join_all(pending))
                .await
                .expect("the mock sidecar answers within the deadline");
        for answer in answers {
            assert_eq!(answer.unwrap().len(), 3);
        }
        assert_eq!(*sidecar_calls.lock(), [24], "one merged call of 8 × 3 rows");
        let text = startup.state.metrics().encode();
        let value = |name: &str| sample(&text, name).unwrap();
        assert_eq!(value("sluice_latency_predictor_remote_calls_total"), 1.0);
        assert_eq!(
            value("sluice_latency_predictor_remote_merged_calls_total"),
            1.0
        );
        assert_eq!(
            value("sluice_latency_predictor_remote_merged_callers_total"),
            8.0
        );
        assert_eq!(
            value("sluice_latency_predictor_remote_call_failures_total"),
            0.0
        );
    }

    #[tokio::test]
    async fn in_process_predictor_exports_no_remote_series() {
        let startup = prepare(
            &Args::try_parse_from([
                "sluice-picker",
                "--endpoints",
                "127.0.0.1:1",
                "--secure-serving=false",
                "--enable-latency-predictor",
            ])
            .unwrap(),
        )
        .unwrap();
        let text = startup.state.metrics().encode();
        assert!(
            !text.contains("sluice_latency_predictor_remote"),
            "remote series without sidecars:\n{text}"
        );
    }

    #[test]
    fn controller_mode_flags() {
        let pool = PoolRef {
            namespace: "ns".into(),
            name: "p".into(),
        };
        let a = Args::try_parse_from([
            "sluice-picker",
            "--controller-address",
            "ctl:9090",
            "--picker-id",
            "epp-0",
            "--enable-latency-predictor",
        ])
        .unwrap();
        assert!(a.enable_latency_predictor);
        let opts = controller_options(&a, "ctl:9090", pool.clone()).unwrap();
        assert_eq!(opts.controller_address, "http://ctl:9090");
        assert_eq!(opts.picker_id, "epp-0");
        assert!(opts.tls.is_none());
        let err = controller_options(&a, "https://ctl:9090", pool).unwrap_err();
        assert!(err.to_string().contains("--controller-ca-file"), "{err}");
    }

    /// A CA-signed PEM pair for `names` with `usage`.
    fn leaf(
        issuer: &rcgen::Issuer<'_, rcgen::KeyPair>,
        names: &[&str],
        usage: rcgen::ExtendedKeyUsagePurpose,
    ) -> PemIdentity {
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.extended_key_usages = vec![usage];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, issuer).unwrap();
        PemIdentity {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    /// One health check through a channel built from the config client's options: the
    /// same TLS settings the config stream connects with.
    async fn check_over(opts: &ConfigClientOptions) -> Result<(), String> {
        let endpoint = tonic::transport::Endpoint::from_shared(opts.controller_address.clone())
            .map_err(|e| e.to_string())?
            .tls_config(opts.tls.clone().unwrap())
            .map_err(|e| e.to_string())?;
        let channel = endpoint.connect().await.map_err(|e| format!("{e:?}"))?;
        tonic_health::pb::health_client::HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .map(|_| ())
            .map_err(|e| format!("{e:?}"))
    }

    /// `--cert-path` is presented as the client certificate to an https controller that
    /// requires one from its CA (mutual TLS as manifests/base deploys it); without it the
    /// controller refuses the picker.
    #[tokio::test]
    async fn https_controller_sees_the_cert_path_identity_as_client_certificate() {
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca_pem = ca_params.self_signed(&ca_key).unwrap().pem();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let server = leaf(
            &issuer,
            &["localhost"],
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        );
        let client = leaf(
            &issuer,
            &["sluice-picker"],
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        );
        let dir = std::env::temp_dir().join(format!(
            "sluice-picker-mtls-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("tls.crt"), &client.cert).unwrap();
        std::fs::write(dir.join("tls.key"), &client.key).unwrap();
        std::fs::write(dir.join("ca.crt"), &ca_pem).unwrap();

        // A stand-in controller: any gRPC service behind TLS that requires a client
        // certificate from the CA.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (_reporter, health) = tonic_health::server::health_reporter();
        let tls = tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(
                &server.cert,
                &server.key,
            ))
            .client_ca_root(tonic::transport::Certificate::from_pem(&ca_pem));
        let server_task = tokio::spawn(
            tonic::transport::Server::builder()
                .tls_config(tls)
                .unwrap()
                .add_service(health)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );

        let address = format!("https://localhost:{port}");
        let pool = PoolRef {
            namespace: "ns".into(),
            name: "p".into(),
        };
        let ca_file = dir.join("ca.crt");
        let cert_dir = dir.to_str().unwrap();
        let with_cert = Args::try_parse_from([
            "sluice-picker",
            "--controller-address",
            &address,
            "--controller-ca-file",
            ca_file.to_str().unwrap(),
            "--cert-path",
            cert_dir,
        ])
        .unwrap();
        let opts = controller_options(&with_cert, &address, pool.clone()).unwrap();
        check_over(&opts)
            .await
            .expect("the picker's --cert-path identity is accepted");

        let without = Args::try_parse_from([
            "sluice-picker",
            "--controller-address",
            &address,
            "--controller-ca-file",
            ca_file.to_str().unwrap(),
        ])
        .unwrap();
        let opts = controller_options(&without, &address, pool).unwrap();
        assert!(
            check_over(&opts).await.is_err(),
            "without a client certificate the controller must refuse the picker"
        );
        server_task.abort();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
