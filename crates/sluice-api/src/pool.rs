//! `InferencePool` — `inference.networking.k8s.io/v1` (GIE `api/v1/inferencepool_types.go`).
//!
//! sluice reads pools and never writes their status (Gateways do), but the status types are
//! here so the controller can read them and the CRD matches upstream.

use std::collections::BTreeMap;

use kube_derive::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::condition::Condition;

/// API group of InferencePool.
pub const GROUP: &str = "inference.networking.k8s.io";
/// API version of InferencePool.
pub const VERSION: &str = "v1";

/// Pattern of a DNS-subdomain API group, or `""` for the core group.
pub const GROUP_PATTERN: &str =
    r"^$|^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
/// Pattern of a Kubernetes kind.
pub const KIND_PATTERN: &str = r"^[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$";
/// Pattern of a label value (OpenAPI cannot check label keys, so upstream checks values only).
pub const LABEL_VALUE_PATTERN: &str = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$";
/// Pattern of a namespace name.
pub const NAMESPACE_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";
/// Pattern of a controller name: DOMAIN "/" PATH.
pub const CONTROLLER_NAME_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\/[A-Za-z0-9\/\-._~%!$&'()*+,;=:]+$";
/// Most target ports a pool may list.
pub const MAX_TARGET_PORTS: usize = 8;
/// Most parents a pool's status may list.
pub const MAX_PARENTS: usize = 32;

/// CEL rule on `spec.targetPorts`.
pub const RULE_UNIQUE_PORTS: &str = "self.all(p1, self.exists_one(p2, p1.number==p2.number))";
/// Message of [`RULE_UNIQUE_PORTS`].
pub const MESSAGE_UNIQUE_PORTS: &str = "port number must be unique";
/// CEL rule on `spec.endpointPickerRef`.
pub const RULE_SERVICE_NEEDS_PORT: &str = "self.kind != 'Service' || has(self.port)";
/// Message of [`RULE_SERVICE_NEEDS_PORT`].
pub const MESSAGE_SERVICE_NEEDS_PORT: &str =
    "port is required when kind is 'Service' or unspecified (defaults to 'Service')";

/// Spec defines the desired state of the InferencePool.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "inference.networking.k8s.io",
    version = "v1",
    kind = "InferencePool",
    plural = "inferencepools",
    singular = "inferencepool",
    shortname = "infpool",
    namespaced,
    status = "InferencePoolStatus",
    derive = "PartialEq",
    doc = "InferencePool is the Schema for the InferencePools API.",
    annotation(
        "api-approved.kubernetes.io",
        "https://github.com/kubernetes-sigs/gateway-api-inference-extension/pull/1173"
    ),
    annotation("inference.networking.k8s.io/bundle-version", "v1.5.0"),
    crates(kube_core = "::kube_core")
)]
#[serde(rename_all = "camelCase")]
pub struct InferencePoolSpec {
    /// Selector determines which Pods are members of this inference pool. It matches Pods by
    /// their labels only within the same namespace; cross-namespace selection is not supported.
    ///
    /// The structure of this LabelSelector is intentionally simple to be compatible with
    /// Kubernetes Service selectors, as some implementations may translate this configuration
    /// into a Service resource.
    pub selector: LabelSelector,

    /// TargetPorts defines a list of ports that are exposed by this InferencePool. Every port
    /// will be treated as a distinctive endpoint by EPP, addressable as a 'podIP:portNumber'
    /// combination.
    #[schemars(length(min = 1, max = 8))]
    #[schemars(extend(
        "x-kubernetes-list-type" = "atomic",
        "x-kubernetes-validations" = [{"rule": RULE_UNIQUE_PORTS, "message": MESSAGE_UNIQUE_PORTS}],
    ))]
    pub target_ports: Vec<Port>,

    /// AppProtocol describes the application protocol for all the target ports.
    ///
    /// If unspecified, the protocol defaults to HTTP/1.1.
    ///
    /// Supported values include:
    /// * "http": HTTP/1.1. This is the default.
    /// * "kubernetes.io/h2c": HTTP/2 over cleartext.
    #[serde(default)]
    pub app_protocol: AppProtocol,

    /// EndpointPickerRef is a reference to the Endpoint Picker extension and its associated
    /// configuration.
    //
    // Required by the CRD we install (as in GIE v1.5.0) but optional in Rust: GIE `main` made
    // it optional (PR #2898), so a cluster with that CRD may hold pools without it and the
    // controller must still read them. No `serde(default)`: with it schemars would drop the
    // field from `required` (serde reads a missing Option as None anyway).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(required)]
    #[schemars(extend(
        "x-kubernetes-validations" = [{"rule": RULE_SERVICE_NEEDS_PORT, "message": MESSAGE_SERVICE_NEEDS_PORT}],
    ))]
    pub endpoint_picker_ref: Option<EndpointPickerRef>,
}

/// LabelSelector selects Pods by labels: every pair must match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    /// MatchLabels contains a set of required {key,value} pairs. An object must match every
    /// label in this map to be selected. The matching logic is an AND operation on all entries.
    #[schemars(schema_with = "match_labels_schema")]
    pub match_labels: BTreeMap<String, String>,
}

fn match_labels_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "minProperties": 1,
        "maxProperties": 64,
        "additionalProperties": {
            "description": "LabelValue is the value of a label: at most 63 characters (can be empty); unless empty, it begins and ends with an alphanumeric character and contains dashes, underscores, dots and alphanumerics between.",
            "type": "string",
            "minLength": 0,
            "maxLength": 63,
            "pattern": LABEL_VALUE_PATTERN,
        },
    })
}

/// Port defines the network port that will be exposed by this InferencePool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Port {
    /// Number defines the port number to access the selected model server Pods. The number must
    /// be in the range 1 to 65535.
    #[schemars(range(min = 1, max = 65535))]
    pub number: i32,
}

/// The application protocol the proxy speaks to the model servers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum AppProtocol {
    /// HTTP/1.1 (the default).
    #[default]
    #[serde(rename = "http")]
    Http,
    /// HTTP/2 over cleartext.
    #[serde(rename = "kubernetes.io/h2c")]
    H2c,
}

impl From<AppProtocol> for sluice_core::snapshot::AppProtocol {
    fn from(value: AppProtocol) -> Self {
        match value {
            AppProtocol::Http => sluice_core::snapshot::AppProtocol::Http,
            AppProtocol::H2c => sluice_core::snapshot::AppProtocol::H2c,
        }
    }
}

/// EndpointPickerRef specifies a reference to an Endpoint Picker extension and its associated
/// configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EndpointPickerRef {
    /// Group is the group of the referent API object. When unspecified, the default value is "",
    /// representing the Core API group.
    #[serde(default)]
    #[schemars(length(min = 0, max = 253), regex(pattern = GROUP_PATTERN))]
    pub group: String,

    /// Kind is the Kubernetes resource kind of the referent.
    ///
    /// Required if the referent is ambiguous, e.g. service with multiple ports.
    ///
    /// Defaults to "Service" when not specified.
    ///
    /// ExternalName services can refer to CNAME DNS records that may live outside of the cluster
    /// and as such are difficult to reason about in terms of conformance. They also may not be
    /// safe to forward to (see CVE-2021-25740 for more information). Implementations MUST NOT
    /// support ExternalName Services.
    #[serde(default = "default_service_kind")]
    #[schemars(length(min = 1, max = 63), regex(pattern = KIND_PATTERN))]
    pub kind: String,

    /// Name is the name of the referent API object.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,

    /// Port is the port of the Endpoint Picker extension service.
    ///
    /// Port is required when the referent is a Kubernetes Service. In this case, the port number
    /// is the service port number, not the target port. For other resources, destination port
    /// might be derived from the referent resource or this field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<Port>,

    /// FailureMode configures how the parent handles the case when the Endpoint Picker extension
    /// is non-responsive. When unspecified, defaults to "FailClose".
    #[serde(default)]
    pub failure_mode: FailureMode,
}

fn default_service_kind() -> String {
    "Service".to_owned()
}

/// What the proxy does when the Endpoint Picker does not answer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum FailureMode {
    /// Route the request anyway (the proxy picks an endpoint itself).
    FailOpen,
    /// Fail the request (the default).
    #[default]
    FailClose,
}

/// Status defines the observed state of the InferencePool.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InferencePoolStatus {
    /// Parents is a list of parent resources, typically Gateways, that are associated with the
    /// InferencePool, and the status of the InferencePool with respect to each parent.
    ///
    /// A controller that manages the InferencePool, must add an entry for each parent it manages
    /// and remove the parent entry when the controller no longer considers the InferencePool to
    /// be associated with that parent.
    ///
    /// A maximum of 32 parents will be represented in this list. When the list is empty, it
    /// indicates that the InferencePool is not associated with any parents.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), extend("x-kubernetes-list-type" = "atomic"))]
    pub parents: Vec<ParentStatus>,
}

/// ParentStatus defines the observed state of InferencePool from a Parent, i.e. Gateway.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ParentStatus {
    /// Conditions is a list of status conditions that provide information about the observed
    /// state of the InferencePool. This field is required to be set by the controller that
    /// manages the InferencePool.
    ///
    /// Supported condition types are:
    ///
    /// * "Accepted"
    /// * "ResolvedRefs"
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::condition::conditions_schema")]
    pub conditions: Vec<Condition>,

    /// ControllerName is a domain/path string that indicates the name of the controller that
    /// wrote this status. This corresponds with the GatewayClass controllerName field when the
    /// parentRef references a Gateway kind.
    ///
    /// Example: "example.net/gateway-controller".
    ///
    /// The format of this field is DOMAIN "/" PATH, where DOMAIN and PATH are valid Kubernetes
    /// names (<https://kubernetes.io/docs/concepts/overview/working-with-objects/names/#names>).
    ///
    /// Controllers MAY populate this field when writing status. When populating this field,
    /// controllers should ensure that entries to status populated with their ControllerName are
    /// cleaned up when they are no longer necessary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = CONTROLLER_NAME_PATTERN))]
    pub controller_name: Option<String>,

    /// ParentRef is used to identify the parent resource that this status is associated with.
    /// It is used to match the InferencePool with the parent resource, such as a Gateway.
    pub parent_ref: ParentReference,
}

/// ParentReference identifies an API object, usually a Gateway, that the pool is attached to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ParentReference {
    /// Group is the group of the referent API object. When unspecified, the referent is assumed
    /// to be in the "gateway.networking.k8s.io" API group.
    #[serde(default = "default_gateway_group")]
    #[schemars(length(min = 0, max = 253), regex(pattern = GROUP_PATTERN))]
    pub group: String,

    /// Kind is the kind of the referent API object. When unspecified, the referent is assumed to
    /// be a "Gateway" kind.
    #[serde(default = "default_gateway_kind")]
    #[schemars(length(min = 1, max = 63), regex(pattern = KIND_PATTERN))]
    pub kind: String,

    /// Name is the name of the referent API object.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,

    /// Namespace is the namespace of the referenced object. When unspecified, the local
    /// namespace is inferred.
    ///
    /// Note that when a namespace different than the local namespace is specified, a
    /// ReferenceGrant object is required in the referent namespace to allow that namespace's
    /// owner to accept the reference. See the ReferenceGrant documentation for details:
    /// <https://gateway-api.sigs.k8s.io/api-types/referencegrant/>
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = NAMESPACE_PATTERN))]
    pub namespace: Option<String>,
}

fn default_gateway_group() -> String {
    "gateway.networking.k8s.io".to_owned()
}

fn default_gateway_kind() -> String {
    "Gateway".to_owned()
}

impl InferencePool {
    /// The pool's namespace and name.
    pub fn pool_ref(&self) -> sluice_core::PoolRef {
        sluice_core::PoolRef {
            namespace: self.metadata.namespace.clone().unwrap_or_default(),
            name: self.metadata.name.clone().unwrap_or_default(),
        }
    }
}

impl InferencePoolSpec {
    /// The distinct target port numbers, in the order listed (the API server rejects duplicates,
    /// but a pool read from a file has not been through it).
    pub fn port_numbers(&self) -> Vec<u16> {
        let mut out: Vec<u16> = Vec::with_capacity(self.target_ports.len());
        for p in &self.target_ports {
            if let Ok(n) = u16::try_from(p.number)
                && n != 0
                && !out.contains(&n)
            {
                out.push(n);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pool(spec: serde_json::Value) -> InferencePool {
        serde_json::from_value(json!({
            "apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool",
            "metadata": {"name": "p", "namespace": "ns"}, "spec": spec
        }))
        .unwrap()
    }

    #[test]
    fn pool_without_endpoint_picker_ref_from_gie_main_is_readable() {
        let p = pool(json!({
            "selector": {"matchLabels": {"app": "x"}}, "targetPorts": [{"number": 8000}]
        }));
        assert_eq!(p.spec.endpoint_picker_ref, None);
        assert_eq!(p.spec.app_protocol, AppProtocol::Http);
        assert_eq!(p.pool_ref().to_string(), "ns/p");
        let back = serde_json::to_value(&p.spec).unwrap();
        assert!(back.get("endpointPickerRef").is_none());
    }

    #[test]
    fn endpoint_picker_ref_defaults_match_upstream() {
        let p = pool(json!({
            "selector": {"matchLabels": {"app": "x"}}, "targetPorts": [{"number": 8000}],
            "endpointPickerRef": {"name": "epp", "port": {"number": 9002}}
        }));
        let epp = p.spec.endpoint_picker_ref.unwrap();
        assert_eq!((epp.group.as_str(), epp.kind.as_str()), ("", "Service"));
        assert_eq!(epp.failure_mode, FailureMode::FailClose);
        assert_eq!(epp.port, Some(Port { number: 9002 }));
    }

    #[test]
    fn port_numbers_skip_duplicates_and_out_of_range_values() {
        let p = pool(json!({
            "selector": {"matchLabels": {"app": "x"}},
            "targetPorts": [{"number": 8000}, {"number": 0}, {"number": 8001},
                            {"number": 8000}, {"number": 70000}],
            "appProtocol": "kubernetes.io/h2c"
        }));
        assert_eq!(p.spec.port_numbers(), vec![8000, 8001]);
        assert_eq!(
            sluice_core::snapshot::AppProtocol::from(p.spec.app_protocol),
            sluice_core::snapshot::AppProtocol::H2c
        );
    }
}
