//! Plugin types that upstream configs declare but that other sluice components implement
//! (parsers, data sources, the served-endpoint verifier, flow-control policies), plus
//! `inflight-load-producer`.
//!
//! The registry accepts them so that upstream configs load unchanged; the picker overrides
//! the placeholders with [`Registry::replace`](crate::Registry::replace) when it implements
//! them.

use std::sync::Arc;

use crate::cycle::{Cycle, keys};
use crate::plugin::{DataProducer, Plugin, TypedName};
use crate::plugins::scorers::NoParams;
use crate::registry::PluginInit;
use crate::types::{Candidate, LlmRequest, PluginError};

/// Types registered as [`ExternalPlugin`] placeholders.
pub const EXTERNAL_TYPES: &[&str] = &[
    "openai-parser",
    "passthrough-parser",
    "vllmgrpc-parser",
    "metrics-data-source",
    "core-metrics-extractor",
    "k8s-notification-source",
    "endpoint-notification-source",
    "destination-endpoint-served-verifier",
    "request-attribute-reporter",
    // Flow-control policies: sluice-flowcontrol reads them from the config's `plugins` by
    // name (FlowControlConfig::from_picker_config); the scheduler only has to accept them.
    "fcfs-ordering-policy",
    "edf-ordering-policy",
    "slo-deadline-ordering-policy",
    "workload-aware-ordering-policy",
    "global-strict-fairness-policy",
    "round-robin-fairness-policy",
    "static-usage-limit-policy",
    "priority-holdback-policy",
];

/// A plugin implemented outside the scheduler; it keeps its parameters for the component that
/// implements it and takes part in no scheduling extension point.
#[derive(Debug)]
pub struct ExternalPlugin {
    name: TypedName,
    /// The parameters from the config.
    pub parameters: serde_json::Value,
}

impl ExternalPlugin {
    pub(crate) fn factory(init: &PluginInit<'_>) -> Result<Arc<dyn Plugin>, String> {
        // The picker's scraper reads these parameters; checking them here lets the
        // controller reject a bad engine mapping before any picker sees it.
        if &*init.typed_name.type_name == crate::config::CORE_METRICS_EXTRACTOR {
            sluice_core::engine_metrics::EngineMappings::from_json(init.parameters, "vllm")?;
        }
        Ok(Arc::new(ExternalPlugin {
            name: init.typed_name.clone(),
            parameters: init.parameters.clone(),
        }))
    }
}

impl Plugin for ExternalPlugin {
    fn typed_name(&self) -> &TypedName {
        &self.name
    }
}

/// `inflight-load-producer`. The scheduler counts in-flight requests and tokens itself (see
/// [`InFlightCounters`](crate::InFlightCounters)) on every exit path, so this producer only
/// declares the data for dependency ordering and for configs that name it.
#[derive(Debug)]
pub struct InFlightLoadProducer {
    name: TypedName,
}

impl InFlightLoadProducer {
    pub(crate) fn factory(init: &PluginInit<'_>) -> Result<Arc<dyn Plugin>, String> {
        let _: NoParams = init
            .parse()
            .map_err(|e| format!("{e}; this plugin takes no parameters"))?;
        Ok(Arc::new(InFlightLoadProducer {
            name: init.typed_name.clone(),
        }))
    }
}

impl Plugin for InFlightLoadProducer {
    fn typed_name(&self) -> &TypedName {
        &self.name
    }
    fn as_data_producer(self: Arc<Self>) -> Option<Arc<dyn DataProducer>> {
        Some(self)
    }
}

impl DataProducer for InFlightLoadProducer {
    fn produces(&self) -> &[&'static str] {
        &[keys::IN_FLIGHT_LOAD]
    }
    fn produce(&self, _: &mut Cycle, _: &LlmRequest, _: &[Candidate]) -> Result<(), PluginError> {
        Ok(())
    }
}
