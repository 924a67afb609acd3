//! SLO-aware (predicted-latency) routing as a scheduling profile made of plugins (seed 000):
//!
//! - [`PredictedLatencyProfileHandler`] (`predicted-latency-profile-handler`, alias
//!   `slo-aware-profile-handler`): the SLO profile for requests that use prediction, the
//!   default profile for those that opt out (`x-prediction-based-scheduling-off`), and no
//!   saturation-based admission for the former.
//! - [`PredictedLatencyScorer`] (`predicted-latency-scorer`, alias `slo-aware-routing`): the
//!   headroom scorer; as PreRequest it adds the request to the chosen endpoint's running
//!   queue, as response hooks it removes it on every outcome and records a training sample.
//!
//! The profile order is the seed's: the prefix producer runs before any profile (its scores
//! are predictor inputs), then the SLO scorer, then `weighted-random-picker`.
//!
//! Shared services reach the plugins through [`SharedState`](crate::SharedState): the picker
//! installs an [`SloServices`] (predictor handle, metrics, class registry) with
//! [`SloServices::install`] before building the scheduler. Without one, the first prediction
//! lazily starts a default in-process predictor.

pub mod handler;
pub mod headers;
pub mod metrics;
pub mod running;
pub mod scorer;

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use sluice_predictor::{ClassRegistry, InProcessPredictor, LatencyPredictor, PredictorConfig};

pub use handler::{HandlerParams, PredictedLatencyProfileHandler};
pub use headers::Slo;
pub use metrics::{SloLabels, SloMetrics};
pub use running::RunningRequests;
pub use scorer::{
    DEFERRED_PREDICTION_KEY, Decision, DeferredPrediction, EndpointPrediction, HeadroomStrategy,
    PredictedLatencyScorer, PrefetchedPredictions, ScorerParams, SloCycleState,
};

use crate::registry::{Registry, SharedState};

/// The scorer's type name.
pub const SCORER_TYPE: &str = "predicted-latency-scorer";
/// The scorer's legacy type name (seed 002).
pub const SCORER_ALIAS: &str = "slo-aware-routing";
/// The profile handler's type name.
pub const HANDLER_TYPE: &str = "predicted-latency-profile-handler";
/// The profile handler's legacy type name (seed 002).
pub const HANDLER_ALIAS: &str = "slo-aware-profile-handler";

/// The [`SharedState`] key of the [`SloServices`].
pub const SERVICES_KEY: &str = "slo/services";

/// Registers the SLO plugins under their type names and aliases.
pub fn register(r: &mut Registry) {
    for t in [SCORER_TYPE, SCORER_ALIAS] {
        r.replace(t, PredictedLatencyScorer::factory);
    }
    for t in [HANDLER_TYPE, HANDLER_ALIAS] {
        r.replace(t, PredictedLatencyProfileHandler::factory);
    }
}

/// The configuration `--enable-latency-predictor` uses when no config is given: profile
/// `slo` (prefix scorer at weight 0 — its data feeds the predictor —, the SLO scorer,
/// weighted random draw) and profile `default` (upstream's default: queue 2, KV 2, prefix 3,
/// max score) for opted-out requests.
pub const SLO_CONFIG_YAML: &str = r#"apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
  - type: predicted-latency-profile-handler
  - type: prefix-cache-scorer
  - type: predicted-latency-scorer
  - type: queue-scorer
  - type: kv-cache-utilization-scorer
  - type: weighted-random-picker
  - type: max-score-picker
schedulingProfiles:
  - name: slo
    plugins:
      - pluginRef: prefix-cache-scorer
        weight: 0
      - pluginRef: predicted-latency-scorer
        weight: 1
      - pluginRef: weighted-random-picker
  - name: default
    plugins:
      - pluginRef: queue-scorer
        weight: 2
      - pluginRef: kv-cache-utilization-scorer
        weight: 2
      - pluginRef: prefix-cache-scorer
        weight: 3
      - pluginRef: max-score-picker
"#;

/// [`SLO_CONFIG_YAML`], parsed.
pub fn slo_config() -> Result<sluice_core::EndpointPickerConfig, crate::ConfigError> {
    crate::parse_config_text(SLO_CONFIG_YAML)
}

/// What the SLO plugins share with each other and with the picker: the latency predictor,
/// the SLO metrics, the hardware-class registry, and request ids for running-queue entries.
pub struct SloServices {
    predictor: OnceLock<Option<Arc<dyn LatencyPredictor>>>,
    metrics: SloMetrics,
    classes: ClassRegistry,
    next_id: AtomicU64,
}

impl fmt::Debug for SloServices {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SloServices")
            .field("predictor", &self.predictor.get())
            .finish_non_exhaustive()
    }
}

impl Default for SloServices {
    /// Services whose predictor is a default [`InProcessPredictor`], started on first use
    /// (so validating a config starts no thread).
    fn default() -> Self {
        SloServices {
            predictor: OnceLock::new(),
            metrics: SloMetrics::default(),
            classes: ClassRegistry::new(PredictorConfig::default().max_classes),
            next_id: AtomicU64::new(1),
        }
    }
}

impl SloServices {
    /// Services around a given predictor (in-process or remote).
    pub fn with_predictor(predictor: Arc<dyn LatencyPredictor>) -> Self {
        let s = SloServices::default();
        let _ = s.predictor.set(Some(predictor));
        s
    }

    /// Services without a predictor: the scorer always uses the composite score (and
    /// trains nothing). For tests of the fallback, and for turning prediction off.
    pub fn without_predictor() -> Self {
        let s = SloServices::default();
        let _ = s.predictor.set(None);
        s
    }

    /// Puts `services` into `shared` (replacing what was there) for the plugins the next
    /// scheduler built with this `SharedState` creates.
    pub fn install(shared: &SharedState, services: SloServices) -> Arc<SloServices> {
        shared.remove(SERVICES_KEY);
        let mut slot = Some(services);
        shared.get_or_insert_with(SERVICES_KEY, || slot.take().unwrap_or_default())
    }

    /// The services in `shared`, created with defaults when none were installed.
    pub fn from_shared(shared: &SharedState) -> Arc<SloServices> {
        shared.get_or_insert_with(SERVICES_KEY, SloServices::default)
    }

    /// The predictor, starting the default in-process one on first use when none was given.
    /// `None` when prediction is off or the trainer thread could not start.
    pub fn predictor(&self) -> Option<&Arc<dyn LatencyPredictor>> {
        self.predictor
            .get_or_init(|| match InProcessPredictor::spawn(PredictorConfig::default()) {
                Ok(p) => Some(Arc::new(p)),
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the latency predictor's trainer thread; predicted-latency routing falls back to the composite score");
                    None
                }
            })
            .as_ref()
    }

    /// The SLO metrics; register them once with [`SloMetrics::register`].
    pub fn metrics(&self) -> &SloMetrics {
        &self.metrics
    }

    /// Maps hardware-class label values to the predictor's class ids.
    pub fn classes(&self) -> &ClassRegistry {
        &self.classes
    }

    pub(crate) fn next_request_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}
