//! The picker's own Prometheus metrics: upstream EPP's core series (same names, labels and
//! buckets, so existing dashboards work) plus sluice's metric age per endpoint and picker
//! decision latency.

use crate::histogram::Histogram;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use parking_lot::RwLock;
use sluice_scheduling::{ExtensionPoint, SchedulingObserver};

/// General latency buckets (seconds).
const G: &[f64] = &[
    0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0,
    10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 120.0, 180.0, 240.0, 300.0, 360.0, 480.0, 600.0, 900.0,
    1200.0, 1800.0, 2700.0, 3600.0,
];
/// Scheduler / plugin latency buckets (seconds).
const S: &[f64] = &[
    0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1,
];
/// Token-count buckets (`32778` is upstream's value, kept for compatibility).
const TOK: &[f64] = &[
    1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0,
    32778.0, 65536.0, 131072.0, 262144.0, 524288.0, 1048576.0,
];
const OUT_TOK: &[f64] = &[
    1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0,
];
const REQ_SIZE: &[f64] = &[
    64.0,
    128.0,
    256.0,
    512.0,
    1024.0,
    2048.0,
    4096.0,
    8192.0,
    16384.0,
    32768.0,
    65536.0,
    131072.0,
    262144.0,
    524288.0,
    1048576.0,
    2097152.0,
    4194304.0,
    8388608.0,
    16777216.0,
    33554432.0,
    67108864.0,
    134217728.0,
    268435456.0,
    536870912.0,
    1073741824.0,
];
const RESP_SIZE: &[f64] = &[
    1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0,
    32778.0, 65536.0,
];
const NTPOT: &[f64] = &[
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
];
const AGE: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0,
];

/// `model_name`, `target_model_name`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    /// The model the client asked for.
    pub model_name: String,
    /// The model after rewrite.
    pub target_model_name: String,
}

/// Model labels plus `priority`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PriorityLabels {
    /// The model the client asked for.
    pub model_name: String,
    /// The model after rewrite.
    pub target_model_name: String,
    /// The objective's priority.
    pub priority: String,
}

/// Model labels plus `error_code`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// The model the client asked for.
    pub model_name: String,
    /// The model after rewrite.
    pub target_model_name: String,
    /// Upstream's error code name (`BadRequest`, `ModelServerError`, ...).
    pub error_code: String,
}

/// `model_name` only.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelNameLabel {
    /// The model the client asked for.
    pub model_name: String,
}

/// `name` (the pool).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabel {
    /// The pool's name.
    pub name: String,
}

/// `name`, `model_server_pod`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PerPodLabels {
    /// The pool's name.
    pub name: String,
    /// `<pod>-rank-<idx>`.
    pub model_server_pod: String,
}

/// `pod_name`, `namespace`, `port`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    /// The pod.
    pub pod_name: String,
    /// The pod's namespace.
    pub namespace: String,
    /// The endpoint's port.
    pub port: String,
}

/// `status` + target model + endpoint labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttemptLabels {
    /// `success` or `failure`.
    pub status: String,
    /// The model after rewrite.
    pub target_model_name: String,
    /// The picked pod (empty on failure).
    pub pod_name: String,
    /// Its namespace.
    pub namespace: String,
    /// Its port.
    pub port: String,
}

/// `extension_point`, `plugin_type`, `plugin_name`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginLabels {
    /// Upstream's extension-point name (`Filter`, `Scorer`, ...).
    pub extension_point: String,
    /// The plugin type.
    pub plugin_type: String,
    /// The plugin instance name.
    pub plugin_name: String,
}

/// `model_rewrite_name`, `model_name`, `target_model`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RewriteLabels {
    /// The rewrite resource.
    pub model_rewrite_name: String,
    /// The incoming model.
    pub model_name: String,
    /// The chosen target.
    pub target_model: String,
}

/// `commit`, `build_ref`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InfoLabels {
    /// Source revision.
    pub commit: String,
    /// Build reference (the crate version).
    pub build_ref: String,
}

type HistFamily<L> = Family<L, Histogram, fn() -> Histogram>;
type GaugeF = Gauge<f64, AtomicU64>;

macro_rules! hist_ctor {
    ($b:expr) => {{
        fn make() -> Histogram {
            Histogram::new($b.iter().copied())
        }
        make as fn() -> Histogram
    }};
}

/// Every series the picker exports, registered in one registry.
#[derive(Debug)]
pub struct Metrics {
    /// Locked only to register late series and to encode a scrape, never on the request path.
    registry: parking_lot::Mutex<Registry>,
    /// `inference_objective_request_total`.
    pub request_total: Family<PriorityLabels, Counter>,
    /// `inference_objective_request_error_total`.
    pub request_error_total: Family<ErrorLabels, Counter>,
    /// `inference_objective_request_duration_seconds`.
    pub request_duration: HistFamily<ModelLabels>,
    /// `inference_objective_request_sizes`.
    pub request_sizes: HistFamily<ModelLabels>,
    /// `inference_objective_response_sizes`.
    pub response_sizes: HistFamily<ModelLabels>,
    /// `inference_objective_input_tokens`.
    pub input_tokens: HistFamily<ModelLabels>,
    /// `inference_objective_output_tokens`.
    pub output_tokens: HistFamily<ModelLabels>,
    /// `inference_objective_prompt_cached_tokens`.
    pub prompt_cached_tokens: HistFamily<ModelLabels>,
    /// `inference_objective_running_requests`.
    pub running_requests: Family<ModelNameLabel, Gauge>,
    /// `inference_objective_normalized_time_per_output_token_seconds`.
    pub normalized_tpot: HistFamily<ModelLabels>,
    /// `inference_pool_average_kv_cache_utilization`.
    pub pool_avg_kv: Family<PoolLabel, GaugeF>,
    /// `inference_pool_average_queue_size`.
    pub pool_avg_queue: Family<PoolLabel, GaugeF>,
    /// `inference_pool_average_running_requests`.
    pub pool_avg_running: Family<PoolLabel, GaugeF>,
    /// `inference_pool_ready_pods`.
    pub pool_ready_pods: Family<PoolLabel, Gauge>,
    /// `inference_pool_per_pod_queue_size`.
    pub pool_per_pod_queue: Family<PerPodLabels, Gauge>,
    /// `inference_extension_scheduler_e2e_duration_seconds`.
    pub scheduler_e2e: Histogram,
    /// `inference_extension_scheduler_attempts_total`.
    pub scheduler_attempts: Family<AttemptLabels, Counter>,
    /// `inference_extension_plugin_duration_seconds`.
    pub plugin_duration: HistFamily<PluginLabels>,
    /// `inference_extension_model_rewrite_decisions_total`.
    pub rewrite_decisions: Family<RewriteLabels, Counter>,
    /// `inference_extension_info`.
    pub info: Family<InfoLabels, Gauge>,
    /// `sluice_picker_endpoint_metrics_age_seconds`: time since the endpoint's last
    /// successful scrape (absent when never scraped).
    pub endpoint_metrics_age: Family<EndpointLabels, GaugeF>,
    /// `sluice_picker_scrape_errors_total`.
    pub scrape_errors: Family<EndpointLabels, Counter>,
    /// `sluice_picker_decision_duration_seconds`: from the end of the request body to the
    /// routing answer (parse, rewrite, schedule, response build).
    pub decision_duration: Histogram,
    /// `sluice_picker_metrics_age_at_decision_seconds`: age of the picked endpoint's
    /// metrics when the decision was made.
    pub metrics_age_at_decision: Histogram,
    /// `sluice_picker_in_flight_requests`: requests the picker routed to the endpoint and
    /// has not seen finish.
    pub endpoint_in_flight: Family<EndpointLabels, Gauge>,
    /// `sluice_picker_config_version`: version of the applied snapshot.
    pub config_version: Gauge,
    /// `sluice_picker_config_rejected_total`: snapshots that failed validation.
    pub config_rejected: Counter,
    /// `sluice_picker_fallback_served_total`: requests the data plane reported served by
    /// another endpoint of the pool than the pick (a retry on a fallback).
    pub fallback_served: Counter,
    /// Pre-resolved per-request series (see [`Metrics::model_series`]).
    series: SeriesCache,
}

/// Most (model, target model, priority) combinations kept resolved. Model names come from
/// clients, so the cache is bounded; past it, series are resolved per request (slower, same
/// numbers).
const MAX_CACHED_SERIES: usize = 512;
/// Most endpoints kept resolved per [`ModelSeries`] for the scheduler-attempt counter.
const MAX_CACHED_ATTEMPTS: usize = 256;

/// The series one request touches for its (model, target model, priority), resolved once so
/// that the hot path increments atomics instead of hashing label strings under a lock for
/// every observation (a request touched up to ten families).
#[derive(Debug)]
pub struct ModelSeries {
    /// The labels these series carry.
    pub labels: ModelLabels,
    /// The request's priority (part of `inference_objective_request_total`'s labels).
    pub priority: i32,
    /// `inference_objective_request_total{model_name, target_model_name, priority}`.
    pub request_total: Counter,
    /// `inference_objective_request_sizes`.
    pub request_sizes: Histogram,
    /// `inference_objective_request_duration_seconds`.
    pub request_duration: Histogram,
    /// `inference_objective_response_sizes`.
    pub response_sizes: Histogram,
    /// `inference_objective_input_tokens`.
    pub input_tokens: Histogram,
    /// `inference_objective_output_tokens`.
    pub output_tokens: Histogram,
    /// `inference_objective_prompt_cached_tokens`.
    pub prompt_cached_tokens: Histogram,
    /// `inference_objective_normalized_time_per_output_token_seconds`.
    pub normalized_tpot: Histogram,
    /// `inference_objective_running_requests{model_name}`.
    pub running_requests: Gauge,
    attempts: RwLock<Vec<AttemptSeries>>,
}

#[derive(Debug)]
struct AttemptSeries {
    pod: Arc<str>,
    namespace: Arc<str>,
    port: u16,
    counter: Counter,
}

impl ModelSeries {
    fn resolve(m: &Metrics, model: &str, target: &str, priority: i32) -> ModelSeries {
        let labels = ModelLabels {
            model_name: model.to_string(),
            target_model_name: target.to_string(),
        };
        let h = |f: &HistFamily<ModelLabels>| f.get_or_create(&labels).clone();
        ModelSeries {
            priority,
            request_total: m
                .request_total
                .get_or_create(&PriorityLabels {
                    model_name: model.to_string(),
                    target_model_name: target.to_string(),
                    priority: priority.to_string(),
                })
                .clone(),
            request_sizes: h(&m.request_sizes),
            request_duration: h(&m.request_duration),
            response_sizes: h(&m.response_sizes),
            input_tokens: h(&m.input_tokens),
            output_tokens: h(&m.output_tokens),
            prompt_cached_tokens: h(&m.prompt_cached_tokens),
            normalized_tpot: h(&m.normalized_tpot),
            running_requests: m
                .running_requests
                .get_or_create(&ModelNameLabel {
                    model_name: model.to_string(),
                })
                .clone(),
            attempts: RwLock::new(Vec::new()),
            labels,
        }
    }

    fn is(&self, model: &str, target: &str, priority: i32) -> bool {
        self.priority == priority
            && self.labels.model_name == model
            && self.labels.target_model_name == target
    }

    /// `inference_extension_scheduler_attempts_total{status="success", ...}` for a pick of
    /// the endpoint `namespace/pod:port` (resolved once per endpoint).
    pub fn attempt_success(
        &self,
        m: &Metrics,
        pod: &Arc<str>,
        namespace: &Arc<str>,
        port: u16,
    ) -> Counter {
        let find = |v: &[AttemptSeries]| {
            v.iter()
                .find(|a| a.port == port && a.pod == *pod && a.namespace == *namespace)
                .map(|a| a.counter.clone())
        };
        if let Some(c) = find(&self.attempts.read()) {
            return c;
        }
        let counter = m
            .scheduler_attempts
            .get_or_create(&AttemptLabels {
                status: "success".into(),
                target_model_name: self.labels.target_model_name.clone(),
                pod_name: pod.to_string(),
                namespace: namespace.to_string(),
                port: port.to_string(),
            })
            .clone();
        let mut w = self.attempts.write();
        if w.len() < MAX_CACHED_ATTEMPTS && find(&w).is_none() {
            w.push(AttemptSeries {
                pod: Arc::clone(pod),
                namespace: Arc::clone(namespace),
                port,
                counter: counter.clone(),
            });
        }
        counter
    }
}

/// The keys are already hashes: hashing them again would only cost time.
#[derive(Default)]
struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

#[derive(Debug, Default)]
struct SeriesCache {
    hasher: foldhash::fast::RandomState,
    map: RwLock<HashMap<u64, Arc<ModelSeries>, BuildHasherDefault<IdentityHasher>>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every series.
    pub fn new() -> Self {
        let mut r = Registry::default();
        let m = Metrics {
            request_total: Family::default(),
            request_error_total: Family::default(),
            request_duration: Family::new_with_constructor(hist_ctor!(G)),
            request_sizes: Family::new_with_constructor(hist_ctor!(REQ_SIZE)),
            response_sizes: Family::new_with_constructor(hist_ctor!(RESP_SIZE)),
            input_tokens: Family::new_with_constructor(hist_ctor!(TOK)),
            output_tokens: Family::new_with_constructor(hist_ctor!(OUT_TOK)),
            prompt_cached_tokens: Family::new_with_constructor(hist_ctor!(TOK)),
            running_requests: Family::default(),
            normalized_tpot: Family::new_with_constructor(hist_ctor!(NTPOT)),
            pool_avg_kv: Family::default(),
            pool_avg_queue: Family::default(),
            pool_avg_running: Family::default(),
            pool_ready_pods: Family::default(),
            pool_per_pod_queue: Family::default(),
            scheduler_e2e: Histogram::new(S.iter().copied()),
            scheduler_attempts: Family::default(),
            plugin_duration: Family::new_with_constructor(hist_ctor!(S)),
            rewrite_decisions: Family::default(),
            info: Family::default(),
            endpoint_metrics_age: Family::default(),
            scrape_errors: Family::default(),
            decision_duration: Histogram::new(S.iter().copied()),
            metrics_age_at_decision: Histogram::new(AGE.iter().copied()),
            endpoint_in_flight: Family::default(),
            config_version: Gauge::default(),
            config_rejected: Counter::default(),
            fallback_served: Counter::default(),
            series: SeriesCache::default(),
            registry: parking_lot::Mutex::new(Registry::default()),
        };
        // Counters get `_total` appended by the encoder.
        r.register("inference_objective_request", "[ALPHA] Counter of inference objective requests broken out for each model and target model", m.request_total.clone());
        r.register("inference_objective_request_error", "[ALPHA] Counter of inference objective requests errors broken out for each model and target model", m.request_error_total.clone());
        r.register("inference_objective_request_duration_seconds", "[ALPHA] Inference objective response latency distribution in seconds for each model and target model", m.request_duration.clone());
        r.register("inference_objective_request_sizes", "[ALPHA] Inference objective requests size distribution in bytes for each model and target model", m.request_sizes.clone());
        r.register("inference_objective_response_sizes", "[ALPHA] Inference objective responses size distribution in bytes for each model and target model", m.response_sizes.clone());
        r.register(
            "inference_objective_input_tokens",
            "[ALPHA] Inference objective input token count distribution for requests in each model",
            m.input_tokens.clone(),
        );
        r.register("inference_objective_output_tokens", "[ALPHA] Inference objective output token count distribution for requests in each model", m.output_tokens.clone());
        r.register("inference_objective_prompt_cached_tokens", "[ALPHA] Inference objective prompt cached token count distribution for requests in each model", m.prompt_cached_tokens.clone());
        r.register(
            "inference_objective_running_requests",
            "[ALPHA] Inference objective number of running requests in each model",
            m.running_requests.clone(),
        );
        r.register("inference_objective_normalized_time_per_output_token_seconds", "[ALPHA] Inference objective latency divided by number of output tokens in seconds for each model and target model", m.normalized_tpot.clone());
        r.register(
            "inference_pool_average_kv_cache_utilization",
            "[ALPHA] The average kv cache utilization for an inference server pool",
            m.pool_avg_kv.clone(),
        );
        r.register(
            "inference_pool_average_queue_size",
            "[ALPHA] The average number of requests pending in the model server queue",
            m.pool_avg_queue.clone(),
        );
        r.register(
            "inference_pool_average_running_requests",
            "[ALPHA] The average number of requests currently being processed",
            m.pool_avg_running.clone(),
        );
        r.register(
            "inference_pool_ready_pods",
            "[ALPHA] The number of ready pods in the inference server pool",
            m.pool_ready_pods.clone(),
        );
        r.register("inference_pool_per_pod_queue_size", "[ALPHA] The total number of requests pending in the model server queue for each underlying pod", m.pool_per_pod_queue.clone());
        r.register(
            "inference_extension_scheduler_e2e_duration_seconds",
            "[ALPHA] End-to-end scheduling latency distribution in seconds",
            m.scheduler_e2e.clone(),
        );
        r.register(
            "inference_extension_scheduler_attempts",
            "[ALPHA] Total number of scheduling attempts",
            m.scheduler_attempts.clone(),
        );
        r.register("inference_extension_plugin_duration_seconds", "[ALPHA] Plugin processing latency distribution in seconds for each extension point, plugin type and plugin name", m.plugin_duration.clone());
        r.register(
            "inference_extension_model_rewrite_decisions",
            "[ALPHA] Total number of model rewrite decisions",
            m.rewrite_decisions.clone(),
        );
        r.register(
            "inference_extension_info",
            "[ALPHA] General information of the current build of Inference Extension",
            m.info.clone(),
        );
        r.register(
            "sluice_picker_endpoint_metrics_age_seconds",
            "Seconds since the endpoint's model-server metrics were last scraped successfully",
            m.endpoint_metrics_age.clone(),
        );
        r.register(
            "sluice_picker_scrape_errors",
            "Failed model-server metric scrapes per endpoint",
            m.scrape_errors.clone(),
        );
        r.register(
            "sluice_picker_decision_duration_seconds",
            "Picker decision latency: end of request body to routing answer",
            m.decision_duration.clone(),
        );
        r.register(
            "sluice_picker_metrics_age_at_decision_seconds",
            "Age of the picked endpoint's metrics when it was picked",
            m.metrics_age_at_decision.clone(),
        );
        r.register(
            "sluice_picker_in_flight_requests",
            "Requests routed to the endpoint by this picker and not yet finished",
            m.endpoint_in_flight.clone(),
        );
        r.register(
            "sluice_picker_config_version",
            "Version of the applied pool snapshot",
            m.config_version.clone(),
        );
        r.register(
            "sluice_picker_config_rejected",
            "Pool snapshots rejected by validation",
            m.config_rejected.clone(),
        );
        r.register(
            "sluice_picker_fallback_served",
            "Requests served by another endpoint of the pool than the one picked (the proxy retried on a fallback)",
            m.fallback_served.clone(),
        );
        m.info
            .get_or_create(&InfoLabels {
                commit: option_env!("SLUICE_COMMIT")
                    .unwrap_or("unknown")
                    .to_string(),
                build_ref: env!("CARGO_PKG_VERSION").to_string(),
            })
            .set(1);
        Metrics {
            registry: parking_lot::Mutex::new(r),
            ..m
        }
    }

    /// The per-request series of (`model`, `target`, `priority`), resolved once and cached
    /// (bounded; see `MAX_CACHED_SERIES`).
    pub fn model_series(&self, model: &str, target: &str, priority: i32) -> Arc<ModelSeries> {
        let key = self.series.hasher.hash_one((model, target, priority));
        if let Some(s) = self.series.map.read().get(&key)
            && s.is(model, target, priority)
        {
            return Arc::clone(s);
        }
        let resolved = Arc::new(ModelSeries::resolve(self, model, target, priority));
        let mut map = self.series.map.write();
        if map.len() < MAX_CACHED_SERIES {
            // A hash collision keeps the first entry; the other combination stays uncached.
            map.entry(key).or_insert_with(|| Arc::clone(&resolved));
        }
        resolved
    }

    /// The Prometheus text exposition of every series.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry.lock());
        out
    }

    /// Adds series owned by other components (SLO routing, flow control) to the exported
    /// registry. Call once per component, at start-up.
    pub fn register_with(&self, f: impl FnOnce(&mut Registry)) {
        f(&mut self.registry.lock());
    }
}

/// Extension points a [`PluginDurations`] table has a slot for (one per [`ExtensionPoint`]).
const N_POINTS: usize = 11;

fn point_slot(p: ExtensionPoint) -> Option<usize> {
    Some(match p {
        ExtensionPoint::PrepareData => 0,
        ExtensionPoint::Admitter => 1,
        ExtensionPoint::ProfilePicker => 2,
        ExtensionPoint::Filter => 3,
        ExtensionPoint::Scorer => 4,
        ExtensionPoint::Picker => 5,
        ExtensionPoint::ProcessProfilesResults => 6,
        ExtensionPoint::PreRequest => 7,
        ExtensionPoint::ResponseReceived => 8,
        ExtensionPoint::ResponseStreaming => 9,
        ExtensionPoint::ResponseComplete => 10,
        #[allow(unreachable_patterns)]
        _ => return None,
    })
}

/// One plugin instance's `inference_extension_plugin_duration_seconds` series, one per
/// extension point it is called at.
#[derive(Debug)]
struct PluginSlot {
    name: Arc<str>,
    /// Series are created on a plugin's first call at a point (not for every point it could
    /// serve, which would export empty histograms), then reused without allocating.
    points: [OnceLock<Histogram>; N_POINTS],
}

/// `inference_extension_plugin_duration_seconds` for one scheduler: the scheduler's timing
/// hook. The plugin table is filled once, when the snapshot's scheduler is built
/// ([`PluginDurations::resolve`]), so a plugin call costs a short scan of the table (the
/// scheduler passes the very `Arc<str>` names the table holds, so pointer equality usually
/// settles it) and one histogram update: no label strings are built or hashed per request.
#[derive(Debug)]
pub struct PluginDurations {
    family: HistFamily<PluginLabels>,
    plugins: OnceLock<Vec<PluginSlot>>,
    misses: AtomicU64,
}

impl PluginDurations {
    /// An empty table exporting into `metrics`' plugin-duration family.
    pub fn new(metrics: &Metrics) -> Self {
        PluginDurations {
            family: metrics.plugin_duration.clone(),
            plugins: OnceLock::new(),
            misses: AtomicU64::new(0),
        }
    }

    /// Records the scheduler's plugin instances (call once, after building the scheduler
    /// and before it schedules; later calls are ignored).
    pub fn resolve<'a>(&self, names: impl IntoIterator<Item = &'a Arc<str>>) {
        let _ = self.plugins.set(
            names
                .into_iter()
                .map(|name| PluginSlot {
                    name: Arc::clone(name),
                    points: Default::default(),
                })
                .collect(),
        );
    }

    /// Plugin calls whose name was not in the table (each resolved its series the slow way).
    pub fn misses(&self) -> u64 {
        self.misses.load(Ordering::Relaxed)
    }

    fn labels(point: ExtensionPoint, plugin_type: &str, plugin_name: &str) -> PluginLabels {
        PluginLabels {
            extension_point: point.as_str().to_string(),
            plugin_type: plugin_type.to_string(),
            plugin_name: plugin_name.to_string(),
        }
    }
}

impl SchedulingObserver for PluginDurations {
    fn plugin_duration(
        &self,
        point: ExtensionPoint,
        plugin_type: &str,
        plugin_name: &str,
        elapsed: Duration,
    ) {
        let secs = elapsed.as_secs_f64();
        let slot = self.plugins.get().and_then(|table| {
            table
                .iter()
                .find(|s| std::ptr::eq(s.name.as_ptr(), plugin_name.as_ptr()))
                .or_else(|| table.iter().find(|s| &*s.name == plugin_name))
        });
        match (slot, point_slot(point)) {
            (Some(slot), Some(i)) => slot.points[i]
                .get_or_init(|| {
                    self.family
                        .get_or_create(&Self::labels(point, plugin_type, plugin_name))
                        .clone()
                })
                .observe(secs),
            _ => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                self.family
                    .get_or_create(&Self::labels(point, plugin_type, plugin_name))
                    .observe(secs);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_names_are_exported() {
        let m = Metrics::new();
        m.request_total
            .get_or_create(&PriorityLabels {
                model_name: "my-model".into(),
                target_model_name: "my-model-12345".into(),
                priority: "2".into(),
            })
            .inc();
        m.scheduler_e2e.observe(0.0003);
        let text = m.encode();
        assert!(
            text.contains(r#"inference_objective_request_total{model_name="my-model",target_model_name="my-model-12345",priority="2"} 1"#),
            "{text}"
        );
        for name in [
            "inference_extension_scheduler_e2e_duration_seconds_bucket{le=\"0.0005\"} 1",
            "# TYPE inference_objective_request counter",
            "inference_extension_info{commit=",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }

    #[test]
    fn cached_series_count_under_the_same_labels_as_direct_lookups() {
        let m = Metrics::new();
        for _ in 0..3 {
            let s = m.model_series("m", "m-lora", 2);
            s.request_total.inc();
            s.request_sizes.observe(100.0);
            s.running_requests.inc();
        }
        m.model_series("m", "m-lora", 0).request_total.inc();
        m.request_total
            .get_or_create(&PriorityLabels {
                model_name: "m".into(),
                target_model_name: "m-lora".into(),
                priority: "2".into(),
            })
            .inc();
        let text = m.encode();
        for want in [
            r#"inference_objective_request_total{model_name="m",target_model_name="m-lora",priority="2"} 4"#,
            r#"inference_objective_request_total{model_name="m",target_model_name="m-lora",priority="0"} 1"#,
            r#"inference_objective_request_sizes_count{model_name="m",target_model_name="m-lora"} 3"#,
            r#"inference_objective_running_requests{model_name="m"} 3"#,
        ] {
            assert!(text.contains(want), "missing {want} in\n{text}");
        }
    }

    #[test]
    fn series_past_the_cache_bound_still_count() {
        let m = Metrics::new();
        let n = MAX_CACHED_SERIES + 10;
        for i in 0..n {
            m.model_series(&format!("m{i}"), "t", 0).request_total.inc();
        }
        // Past the bound the series are resolved per call: counts must still accumulate.
        let last = format!("m{}", n - 1);
        m.model_series(&last, "t", 0).request_total.inc();
        assert!(m.series.map.read().len() <= MAX_CACHED_SERIES);
        let text = m.encode();
        let want = format!(
            r#"inference_objective_request_total{{model_name="{last}",target_model_name="t",priority="0"}} 2"#
        );
        assert!(text.contains(&want), "missing {want}");
    }

    #[test]
    fn attempt_counters_are_per_endpoint() {
        let m = Metrics::new();
        let s = m.model_series("m", "t", 0);
        let (pod_a, pod_b, ns): (Arc<str>, Arc<str>, Arc<str>) =
            ("pod-a".into(), "pod-b".into(), "default".into());
        s.attempt_success(&m, &pod_a, &ns, 8000).inc();
        s.attempt_success(&m, &pod_a, &ns, 8000).inc();
        s.attempt_success(&m, &pod_b, &ns, 8000).inc();
        s.attempt_success(&m, &pod_a, &ns, 8001).inc();
        let text = m.encode();
        for want in [
            r#"inference_extension_scheduler_attempts_total{status="success",target_model_name="t",pod_name="pod-a",namespace="default",port="8000"} 2"#,
            r#"inference_extension_scheduler_attempts_total{status="success",target_model_name="t",pod_name="pod-b",namespace="default",port="8000"} 1"#,
            r#"inference_extension_scheduler_attempts_total{status="success",target_model_name="t",pod_name="pod-a",namespace="default",port="8001"} 1"#,
        ] {
            assert!(text.contains(want), "missing {want} in\n{text}");
        }
    }
}
