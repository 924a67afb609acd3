//! sluice's own `EndpointPickerConfig` resource — `sluice.dev/v1alpha1`.
//!
//! Its spec is the upstream EndpointPickerConfig body (what the Go EPP takes as
//! `--config-text`), so a user can paste that document under `spec`, plus `poolRef` naming the
//! InferencePool it configures. Unlike the Go EPP, which reads its config once at startup, the
//! controller recompiles and pushes a changed config to the pool's pickers; the status reports
//! whether it was accepted and how many pickers run it.

use kube_derive::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::condition::Condition;

/// API group of sluice's own resources.
pub const GROUP: &str = "sluice.dev";
/// API version of EndpointPickerConfig.
pub const VERSION: &str = "v1alpha1";

/// EndpointPickerConfigSpec is an upstream EndpointPickerConfig body (feature gates, plugins,
/// scheduling profiles, saturation detector, data layer, flow control, parser) plus the
/// InferencePool it configures.
// clippy reads the repeated `type_ = ...` of separate `printcolumn(...)`s as duplicated
// attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "sluice.dev",
    version = "v1alpha1",
    kind = "EndpointPickerConfig",
    plural = "endpointpickerconfigs",
    singular = "endpointpickerconfig",
    shortname = "epc",
    namespaced,
    status = "EndpointPickerConfigStatus",
    derive = "PartialEq",
    doc = "EndpointPickerConfig configures the endpoint pickers of one InferencePool. Its spec takes the same document the upstream Endpoint Picker reads from --config-text, plus poolRef.",
    printcolumn(name = "Pool", type_ = "string", json_path = ".spec.poolRef.name"),
    printcolumn(
        name = "Accepted",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Accepted\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    crates(kube_core = "::kube_core")
)]
#[serde(rename_all = "camelCase")]
pub struct EndpointPickerConfigSpec {
    /// PoolRef names the InferencePool, in the same namespace, that this configuration applies
    /// to. At most one EndpointPickerConfig configures a pool; when several name the same pool
    /// the oldest wins and the others are not accepted.
    pub pool_ref: LocalPoolReference,

    /// The upstream EndpointPickerConfig body, with upstream's keys.
    #[serde(flatten)]
    pub config: sluice_core::config::EndpointPickerConfig,
}

/// LocalPoolReference names an InferencePool in the referrer's namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LocalPoolReference {
    /// Name is the name of the InferencePool.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// EndpointPickerConfigStatus is what the sluice controller observed and did with the
/// configuration.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EndpointPickerConfigStatus {
    /// Conditions track the state of the EndpointPickerConfig.
    ///
    /// Known condition types are:
    ///
    /// * "Accepted": True when the configuration passed defaulting and validation and its pool
    ///   exists; False with reason InvalidConfig, PoolNotFound or Conflict otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::condition::conditions_schema")]
    pub conditions: Vec<Condition>,

    /// ObservedGeneration is the metadata.generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub observed_generation: Option<i64>,

    /// AppliedVersion is the version of the compiled pool configuration that contains this
    /// spec (it grows with every change to the pool's configuration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub applied_version: Option<i64>,

    /// PickersInSync is how many of the pool's pickers run AppliedVersion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub pickers_in_sync: Option<i32>,

    /// PickersTotal is how many pickers serve the pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub pickers_total: Option<i32>,
}
