//! The built-in plugins, registered under upstream's type names.

pub mod affinity;
pub mod external;
pub mod pickers;
pub mod prefix;
pub mod profile;
pub mod saturation;
pub mod scorers;
pub mod slo;

use std::sync::Arc;

pub use affinity::{HeaderBasedTestingFilter, SessionAffinityScorer};
pub use external::{ExternalPlugin, InFlightLoadProducer};
pub use pickers::{BuiltinPicker, PickerKind};
pub use prefix::{PrefixCachePlugin, PrefixMatchInfo};
pub use profile::SingleProfileHandler;
pub use saturation::{ConcurrencyDetector, UtilizationDetector};
pub use scorers::{MetricScorer, MetricScorerKind};

use crate::registry::Registry;

/// Adds every built-in type to `r` (replacing any factory already there for these names).
pub fn register_builtins(r: &mut Registry) {
    r.replace("single-profile-handler", |init| {
        let _: scorers::NoParams = init
            .parse()
            .map_err(|e| format!("{e}; this plugin takes no parameters"))?;
        Ok(Arc::new(SingleProfileHandler::new(init.typed_name.clone())))
    });
    r.replace(
        "max-score-picker",
        BuiltinPicker::factory(PickerKind::MaxScore),
    );
    r.replace("random-picker", BuiltinPicker::factory(PickerKind::Random));
    r.replace(
        "weighted-random-picker",
        BuiltinPicker::factory(PickerKind::WeightedRandom),
    );
    r.replace(
        "queue-scorer",
        MetricScorer::factory(MetricScorerKind::Queue),
    );
    r.replace(
        "running-requests-size-scorer",
        MetricScorer::factory(MetricScorerKind::RunningRequests),
    );
    r.replace(
        "kv-cache-utilization-scorer",
        MetricScorer::factory(MetricScorerKind::KvCacheUtilization),
    );
    r.replace(
        "lora-affinity-scorer",
        MetricScorer::factory(MetricScorerKind::LoraAffinity),
    );
    r.replace(
        "token-load-scorer",
        MetricScorer::factory(MetricScorerKind::TokenLoad { threshold: 0.0 }),
    );
    r.replace("prefix-cache-scorer", PrefixCachePlugin::factory(true));
    r.replace(
        "approx-prefix-cache-producer",
        PrefixCachePlugin::factory(false),
    );
    r.replace("inflight-load-producer", InFlightLoadProducer::factory);
    r.replace("utilization-detector", UtilizationDetector::factory);
    r.replace("concurrency-detector", ConcurrencyDetector::factory);
    r.replace("session-affinity-scorer", SessionAffinityScorer::factory);
    r.replace(
        "header-based-testing-filter",
        HeaderBasedTestingFilter::factory,
    );
    for t in external::EXTERNAL_TYPES {
        r.replace(t, ExternalPlugin::factory);
    }
    slo::register(r);
}
