//! The upstream `EndpointPickerConfig` body, as a user writes it for the Go EPP's
//! `--config-text`, and as it sits in the spec of sluice's `EndpointPickerConfig` resource.
//!
//! These types only carry the document. Defaulting and validation live in
//! `sluice-scheduling` (which owns the plugin registry); the controller runs them before a
//! config may reach a picker, and the picker runs them again before applying one.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::quantity::Quantity;

/// `apiVersion` values accepted for a standalone config document.
pub const CONFIG_API_VERSIONS: &[&str] = &[
    "inference.networking.x-k8s.io/v1alpha1",
    "llm-d.ai/v1alpha1",
    "sluice.dev/v1alpha1",
];

/// The body of an upstream `EndpointPickerConfig` (GIE `apix/config/v1alpha1`, plus the
/// keys llm-d-router added).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EndpointPickerConfig {
    /// Feature gates to turn on: `dataLayer`, `flowControl`, `enableLegacyMetrics`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub feature_gates: Vec<String>,

    /// Plugin instances: each has a registered `type`, an optional instance `name`
    /// (defaults to the type) and free-form `parameters` for the plugin's factory.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub plugins: Vec<PluginSpec>,

    /// Scheduling profiles: named lists of references to filter, scorer and picker
    /// instances. With none, a `default` profile references every filter, scorer and picker.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scheduling_profiles: Vec<SchedulingProfileSpec>,

    /// The saturation detector used by admission and flow control (deprecated in
    /// llm-d-router in favour of `flowControl.saturationDetector`; that one wins when both
    /// are set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saturation_detector: Option<PluginRefSpec>,

    /// Data layer sources and their extractors (used with the `dataLayer` feature gate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_layer: Option<DataLayerSpec>,

    /// Flow control: queueing, priority bands, fairness and capacity limits (used with the
    /// `flowControl` feature gate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow_control: Option<FlowControlSpec>,

    /// The request parser (default `openai-parser`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parser: Option<PluginRefSpec>,
}

/// One plugin instance.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PluginSpec {
    /// Instance name, unique in the config; profiles refer to the plugin by it. Defaults
    /// to `type`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,

    /// The registered plugin type, for example `queue-scorer` or `max-score-picker`.
    #[serde(rename = "type")]
    pub type_: String,

    /// Parameters for the plugin's factory; their shape depends on the plugin type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::config::preserve_unknown_fields")]
    pub parameters: Option<serde_json::Value>,
}

impl PluginSpec {
    /// The instance name after upstream's defaulting (name = type when unset).
    pub fn instance_name(&self) -> &str {
        self.name
            .as_deref()
            .filter(|n| !n.is_empty())
            .unwrap_or(&self.type_)
    }
}

/// A named scheduling profile.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SchedulingProfileSpec {
    /// Profile name, unique in the config.
    pub name: String,

    /// The plugins this profile runs, in order: filters, scorers (with weights) and at
    /// most one picker.
    #[serde(default)]
    pub plugins: Vec<SchedulingPluginRef>,
}

/// A reference from a profile to a plugin instance.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SchedulingPluginRef {
    /// The instance name of a plugin declared under `plugins`.
    pub plugin_ref: String,

    /// The scorer's weight in the profile's weighted sum (only meaningful for scorers;
    /// defaults to 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<f64>,
}

/// A reference to a plugin instance by name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PluginRefSpec {
    /// The instance name of a plugin declared under `plugins`.
    pub plugin_ref: String,
}

/// Data layer configuration.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DataLayerSpec {
    /// Data sources (for example `metrics-data-source`) and the extractors fed by each.
    #[serde(default)]
    pub sources: Vec<DataSourceSpec>,
}

/// One data source and its extractors.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DataSourceSpec {
    /// The instance name of the data-source plugin.
    pub plugin_ref: String,

    /// Extractors that turn this source's raw data into endpoint attributes.
    #[serde(default)]
    pub extractors: Vec<PluginRefSpec>,
}

/// Flow control configuration, with upstream's keys.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FlowControlSpec {
    /// Global limit on queued bytes (a Kubernetes quantity such as `4Gi`; 0 = unlimited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<Quantity>,

    /// Global limit on queued requests (0 = unlimited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<Quantity>,

    /// How long a request may wait in a queue before it is rejected (a duration such as
    /// `60s`).
    #[serde(
        rename = "defaultRequestTTL",
        alias = "defaultRequestTtl",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub default_request_ttl: Option<String>,

    /// How long a request may wait while the pool has no endpoints at all (defaults to
    /// `defaultRequestTTL`).
    #[serde(
        rename = "noEndpointRequestTTL",
        alias = "noEndpointRequestTtl",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub no_endpoint_request_ttl: Option<String>,

    /// Template for priority bands not listed in `priorityBands`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_priority_band: Option<PriorityBandSpec>,

    /// Template for negative (sheddable) priority bands not listed in `priorityBands`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_negative_priority_band: Option<PriorityBandSpec>,

    /// Explicitly configured priority bands.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub priority_bands: Vec<PriorityBandSpec>,

    /// The usage-limit policy plugin that gates dispatch (default
    /// `static-usage-limit-policy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage_limit_policy_plugin_ref: Option<String>,

    /// The saturation detector gating dispatch (wins over the top-level
    /// `saturationDetector`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saturation_detector: Option<PluginRefSpec>,

    /// Evict already-dispatched sheddable requests when the pool is saturated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable_eviction: Option<bool>,
}

/// One priority band.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PriorityBandSpec {
    /// The band's priority (InferenceObjective priority; higher dispatches first). Unset in
    /// the default band templates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,

    /// Limit on bytes queued in this band (default 1e9).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<Quantity>,

    /// Limit on requests queued in this band (default 5000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<Quantity>,

    /// The ordering policy plugin inside each flow (default `fcfs-ordering-policy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ordering_policy_ref: Option<String>,

    /// The fairness policy plugin between flows (default `global-strict-fairness-policy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fairness_policy_ref: Option<String>,
}

/// Schema for free-form JSON: any value, kept as written. This is what makes the CRD's
/// `parameters` structural.
pub fn preserve_unknown_fields(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({ "x-kubernetes-preserve-unknown-fields": true })
}

/// Errors reading a standalone config document.
#[derive(Debug, thiserror::Error)]
pub enum ConfigDocumentError {
    /// The text is not a YAML/JSON object of the expected shape.
    #[error("EndpointPickerConfig is not valid: {0}")]
    Syntax(String),
    /// The document names an `apiVersion` or `kind` sluice does not read.
    #[error(
        "EndpointPickerConfig has apiVersion {api_version:?} kind {kind:?}; expected kind EndpointPickerConfig with apiVersion one of {CONFIG_API_VERSIONS:?}"
    )]
    WrongType {
        /// The document's apiVersion.
        api_version: String,
        /// The document's kind.
        kind: String,
    },
}

/// A standalone document: what the Go EPP reads from `--config-file`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ConfigDocument {
    #[serde(default)]
    api_version: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    #[serde(flatten)]
    body: EndpointPickerConfig,
}

impl EndpointPickerConfig {
    /// Parses a standalone document as given to the Go EPP's `--config-text`, already
    /// decoded from YAML into JSON (`apiVersion` and `kind` are optional, but when present
    /// must name an EndpointPickerConfig).
    pub fn from_document(value: serde_json::Value) -> Result<Self, ConfigDocumentError> {
        let doc: ConfigDocument = serde_json::from_value(value)
            .map_err(|e| ConfigDocumentError::Syntax(e.to_string()))?;
        let api_version = doc.api_version.unwrap_or_default();
        let kind = doc.kind.unwrap_or_default();
        let version_ok =
            api_version.is_empty() || CONFIG_API_VERSIONS.contains(&api_version.as_str());
        let kind_ok = kind.is_empty() || kind == "EndpointPickerConfig";
        if !(version_ok && kind_ok) {
            return Err(ConfigDocumentError::WrongType { api_version, kind });
        }
        Ok(doc.body)
    }

    /// Whether a feature gate is on.
    pub fn has_feature_gate(&self, gate: &str) -> bool {
        self.feature_gates.iter().any(|g| g == gate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn document_header_is_checked() {
        let ok = serde_json::json!({
            "apiVersion": "inference.networking.x-k8s.io/v1alpha1",
            "kind": "EndpointPickerConfig",
            "plugins": [{"type": "queue-scorer"}],
        });
        let cfg = EndpointPickerConfig::from_document(ok).unwrap();
        assert_eq!(cfg.plugins[0].instance_name(), "queue-scorer");

        let wrong = serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap"});
        let err = EndpointPickerConfig::from_document(wrong)
            .unwrap_err()
            .to_string();
        assert!(err.contains("ConfigMap"), "{err}");
    }

    #[test]
    fn parameters_round_trip_untouched() {
        let doc = serde_json::json!({
            "plugins": [{"type": "prefix-cache-scorer", "parameters": {"blockSizeTokens": 16, "x": [1, 2]}}]
        });
        let cfg = EndpointPickerConfig::from_document(doc).unwrap();
        let back = serde_json::to_value(&cfg).unwrap();
        assert_eq!(
            back["plugins"][0]["parameters"]["x"],
            serde_json::json!([1, 2])
        );
    }
}
