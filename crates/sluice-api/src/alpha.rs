//! `InferenceObjective` and `InferenceModelRewrite` `v1alpha2`, in both API groups that carry
//! them: `inference.networking.x-k8s.io` (GIE v1.0–v1.5) and `llm-d.ai` (llm-d-router).
//!
//! The two groups have the same schema. A `CustomResource` derive binds one spec struct to one
//! group, so the top-level spec structs are stamped out per group by [`alpha_resources!`]; every
//! nested type is shared, and `From` converts between the groups so the controller can handle
//! both with one code path.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::condition::Condition;
use crate::pool::{GROUP_PATTERN, KIND_PATTERN};

/// API version of both kinds in both groups.
pub const VERSION: &str = "v1alpha2";

/// PoolObjectReference identifies an InferencePool in the same namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolObjectReference {
    /// Group is the group of the referent.
    #[serde(default = "default_pool_group")]
    #[schemars(length(max = 253), regex(pattern = GROUP_PATTERN))]
    pub group: String,

    /// Kind is kind of the referent. For example "InferencePool".
    #[serde(default = "default_pool_kind")]
    #[schemars(length(min = 1, max = 63), regex(pattern = KIND_PATTERN))]
    pub kind: String,

    /// Name is the name of the referent.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

impl PoolObjectReference {
    /// A reference to the InferencePool `name` with the default group and kind.
    pub fn new(name: impl Into<String>) -> Self {
        PoolObjectReference {
            group: default_pool_group(),
            kind: default_pool_kind(),
            name: name.into(),
        }
    }

    /// Whether this names an `inference.networking.k8s.io` InferencePool called `name` (what
    /// the upstream EPP checks before it uses an objective or rewrite).
    pub fn refers_to_pool(&self, name: &str) -> bool {
        self.group == crate::pool::GROUP && self.kind == "InferencePool" && self.name == name
    }
}

fn default_pool_group() -> String {
    crate::pool::GROUP.to_owned()
}

fn default_pool_kind() -> String {
    "InferencePool".to_owned()
}

/// InferenceObjectiveStatus defines the observed state of InferenceObjective.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InferenceObjectiveStatus {
    /// Conditions track the state of the InferenceObjective.
    ///
    /// Known condition types are:
    ///
    /// * "Accepted"
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::condition::conditions_schema")]
    #[schemars(extend("default" = crate::condition::pending_default(crate::condition::TYPE_READY)))]
    pub conditions: Vec<Condition>,
}

/// InferenceModelRewriteStatus defines the observed state of InferenceModelRewrite.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InferenceModelRewriteStatus {
    /// Conditions track the state of the InferenceModelRewrite.
    ///
    /// Known condition types are:
    ///
    /// * "Accepted"
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::condition::conditions_schema")]
    #[schemars(extend("default" = crate::condition::pending_default(crate::condition::TYPE_ACCEPTED)))]
    pub conditions: Vec<Condition>,
}

/// InferenceModelRewriteRule defines the match criteria and corresponding action. Across rules
/// and resources, rules with an exact model match come before match-all rules, older resources
/// before newer ones, and within one resource the first matching rule wins.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InferenceModelRewriteRule {
    /// Matches are ORed; an empty list matches every request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<Match>,

    /// Targets are the weighted models a matching request is rewritten to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(min = 1))]
    pub targets: Vec<TargetModel>,
}

/// Match defines the criteria for matching the LLM requests.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Match {
    /// Model specifies the criteria for matching the 'model' field within the JSON request body.
    pub model: ModelMatch,
}

/// Criteria on the request body's `model`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelMatch {
    /// Type specifies the kind of string matching to use. Supported value is "Exact". Defaults
    /// to "Exact".
    #[serde(rename = "type", default)]
    pub type_: MatchType,

    /// Value is the model name string to match against.
    #[schemars(length(min = 1))]
    pub value: String,
}

/// How a model name is matched.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum MatchType {
    /// The whole name, byte for byte.
    #[default]
    Exact,
}

/// TargetModel defines a weighted model destination for traffic distribution.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TargetModel {
    /// ModelRewrite is the model name written into the request body.
    pub model_rewrite: String,

    /// Weight is used to determine the proportion of traffic that should be sent to this model
    /// when multiple target models are specified: weight / (sum of all weights in the list).
    /// Weight is not a percentage and the sum of weights does not need to equal 100.
    ///
    /// If a weight is set for any target, it must be set for all targets. Conversely weights
    /// are optional, so long as ALL targets do not specify a weight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub weight: Option<i32>,
}

/// Converts a rewrite resource's rules to the picker's form.
///
/// Weights keep upstream's pick semantics (`rand.Intn(sum)` walked over the targets): when no
/// target sets a weight every target gets 1 (a uniform pick); when some do, an unset weight is
/// 0, so that target is never picked, as upstream. A rule with no targets is dropped (it can
/// rewrite nothing; the schema's `minItems: 1` rejects an empty list but an omitted one passes).
pub fn to_core_rules(
    metadata: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    rules: &[InferenceModelRewriteRule],
) -> Vec<sluice_core::ModelRewriteRule> {
    let source = format!(
        "{}/{}",
        metadata.namespace.as_deref().unwrap_or_default(),
        metadata.name.as_deref().unwrap_or_default()
    );
    let created = metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.to_string())
        .unwrap_or_default();
    rules
        .iter()
        .filter(|rule| !rule.targets.is_empty())
        .map(|rule| {
            let any_weight = rule.targets.iter().any(|t| t.weight.is_some());
            sluice_core::ModelRewriteRule {
                source: source.clone(),
                created: created.clone(),
                matches: rule.matches.iter().map(|m| m.model.value.clone()).collect(),
                targets: rule
                    .targets
                    .iter()
                    .map(|t| sluice_core::RewriteTarget {
                        model_rewrite: t.model_rewrite.clone(),
                        weight: match t.weight {
                            Some(w) => u32::try_from(w).unwrap_or(0),
                            None if any_weight => 0,
                            None => 1,
                        },
                    })
                    .collect(),
            }
        })
        .collect()
}

/// Stamps out the InferenceObjective and InferenceModelRewrite resources for one API group.
macro_rules! alpha_resources {
    ($group:literal, $bundle_key:literal, $bundle_version:literal) => {
        use kube_derive::CustomResource;
        use schemars::JsonSchema;
        use serde::{Deserialize, Serialize};

        pub use crate::alpha::{
            InferenceModelRewriteRule, InferenceModelRewriteStatus, InferenceObjectiveStatus,
            Match, MatchType, ModelMatch, PoolObjectReference, TargetModel,
        };

        /// The API group of this module's resources.
        pub const GROUP: &str = $group;

        /// InferenceObjectiveSpec represents the desired state of a specific model use case.
        /// This resource is managed by the "Inference Workload Owner" persona, who defines the
        /// performance and latency goals of the workloads that share an InferencePool.
        #[derive(CustomResource, Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
        #[kube(
            group = $group,
            version = "v1alpha2",
            kind = "InferenceObjective",
            plural = "inferenceobjectives",
            singular = "inferenceobjective",
            namespaced,
            status = "InferenceObjectiveStatus",
            derive = "PartialEq",
            doc = "InferenceObjective is the Schema for the InferenceObjectives API.",
            annotation($bundle_key, $bundle_version),
            printcolumn(name = "Inference Pool", type_ = "string", json_path = ".spec.poolRef.name"),
            printcolumn(name = "Priority", type_ = "string", json_path = ".spec.priority"),
            printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
            crates(kube_core = "::kube_core")
        )]
        #[serde(rename_all = "camelCase")]
        pub struct InferenceObjectiveSpec {
            /// Priority defines how important it is to serve the request compared to other
            /// requests in the same pool. The higher the value, the more critical the request
            /// is; negative values _are_ allowed. No default value is set for this field;
            /// consumers (such as the Endpoint Picker) treat an unset value as 0. Flow control
            /// always serves higher priorities first; fairness is only enforced between
            /// requests of the same priority.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub priority: Option<i32>,

            /// PoolRef is a reference to the inference pool, the pool must exist in the same
            /// namespace.
            pub pool_ref: PoolObjectReference,
        }

        impl InferenceObjectiveSpec {
            /// The priority after upstream's defaulting (unset = 0).
            pub fn effective_priority(&self) -> i32 {
                self.priority.unwrap_or(0)
            }
        }

        impl InferenceObjective {
            /// The objective as the picker uses it: named by `metadata.name` (what the
            /// `x-gateway-inference-objective` header carries), priority defaulted to 0.
            pub fn to_objective(&self) -> sluice_core::Objective {
                sluice_core::Objective {
                    name: self.metadata.name.clone().unwrap_or_default(),
                    priority: self.spec.effective_priority(),
                }
            }
        }

        impl InferenceModelRewrite {
            /// The rules as the picker applies them, in order, tagged with this resource's
            /// `namespace/name` and creation time (see [`crate::alpha::to_core_rules`]).
            pub fn to_rules(&self) -> Vec<sluice_core::ModelRewriteRule> {
                crate::alpha::to_core_rules(&self.metadata, &self.spec.rules)
            }
        }

        /// InferenceModelRewriteSpec defines the desired state of InferenceModelRewrite: rules
        /// that rewrite the `model` of matching requests to weighted targets.
        #[derive(CustomResource, Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
        #[kube(
            group = $group,
            version = "v1alpha2",
            kind = "InferenceModelRewrite",
            plural = "inferencemodelrewrites",
            singular = "inferencemodelrewrite",
            namespaced,
            status = "InferenceModelRewriteStatus",
            derive = "PartialEq",
            doc = "InferenceModelRewrite is the Schema for the InferenceModelRewrite API.",
            annotation($bundle_key, $bundle_version),
            printcolumn(name = "Inference Pool", type_ = "string", json_path = ".spec.poolRef.name"),
            printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
            crates(kube_core = "::kube_core")
        )]
        #[serde(rename_all = "camelCase")]
        pub struct InferenceModelRewriteSpec {
            /// PoolRef is a reference to the inference pool.
            pub pool_ref: PoolObjectReference,

            /// Rules are evaluated in order; the first matching rule wins.
            pub rules: Vec<InferenceModelRewriteRule>,
        }
    };
}

/// `inference.networking.x-k8s.io/v1alpha2` (GIE v1.5.0). sluice installs these CRDs.
pub mod x_k8s {
    alpha_resources!(
        "inference.networking.x-k8s.io",
        "inference.networking.k8s.io/bundle-version",
        "v1.5.0"
    );
}

/// `llm-d.ai/v1alpha2` (llm-d-router). llm-d installs these CRDs; sluice only reads them.
pub mod llm_d {
    alpha_resources!("llm-d.ai", "llm-d.ai/bundle-version", "main-dev");
}

impl From<llm_d::InferenceObjectiveSpec> for x_k8s::InferenceObjectiveSpec {
    fn from(s: llm_d::InferenceObjectiveSpec) -> Self {
        x_k8s::InferenceObjectiveSpec {
            priority: s.priority,
            pool_ref: s.pool_ref,
        }
    }
}

impl From<x_k8s::InferenceObjectiveSpec> for llm_d::InferenceObjectiveSpec {
    fn from(s: x_k8s::InferenceObjectiveSpec) -> Self {
        llm_d::InferenceObjectiveSpec {
            priority: s.priority,
            pool_ref: s.pool_ref,
        }
    }
}

impl From<llm_d::InferenceModelRewriteSpec> for x_k8s::InferenceModelRewriteSpec {
    fn from(s: llm_d::InferenceModelRewriteSpec) -> Self {
        x_k8s::InferenceModelRewriteSpec {
            pool_ref: s.pool_ref,
            rules: s.rules,
        }
    }
}

impl From<x_k8s::InferenceModelRewriteSpec> for llm_d::InferenceModelRewriteSpec {
    fn from(s: x_k8s::InferenceModelRewriteSpec) -> Self {
        llm_d::InferenceModelRewriteSpec {
            pool_ref: s.pool_ref,
            rules: s.rules,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rewrite(rules: serde_json::Value) -> x_k8s::InferenceModelRewrite {
        serde_json::from_value(json!({
            "apiVersion": "inference.networking.x-k8s.io/v1alpha2",
            "kind": "InferenceModelRewrite",
            "metadata": {"name": "rw", "namespace": "ns",
                         "creationTimestamp": "2026-01-02T03:04:05Z"},
            "spec": {"poolRef": {"name": "pool"}, "rules": rules}
        }))
        .unwrap()
    }

    #[test]
    fn rewrite_rules_convert_with_source_time_and_matches() {
        let rules = rewrite(json!([
            {"matches": [{"model": {"value": "a"}}, {"model": {"value": "b"}}],
             "targets": [{"modelRewrite": "a-v2"}]},
            {"targets": [{"modelRewrite": "fallback"}]},
            {"matches": [{"model": {"value": "c"}}]}
        ]))
        .to_rules();
        assert_eq!(rules.len(), 2, "a rule without targets rewrites nothing");
        assert_eq!(rules[0].source, "ns/rw");
        assert_eq!(rules[0].created, "2026-01-02T03:04:05Z");
        assert_eq!(rules[0].matches, vec!["a", "b"]);
        assert!(rules[1].matches.is_empty(), "no matches = every model");
    }

    #[test]
    fn unset_weights_keep_upstream_pick_semantics() {
        let weights = |targets: serde_json::Value| -> Vec<u32> {
            rewrite(json!([{"targets": targets}])).to_rules()[0]
                .targets
                .iter()
                .map(|t| t.weight)
                .collect()
        };
        assert_eq!(
            weights(json!([{"modelRewrite": "x"}, {"modelRewrite": "y"}])),
            vec![1, 1]
        );
        assert_eq!(
            weights(json!([{"modelRewrite": "x", "weight": 30}, {"modelRewrite": "y"}])),
            vec![30, 0]
        );
    }

    #[test]
    fn objective_converts_with_default_priority() {
        let o: llm_d::InferenceObjective = serde_json::from_value(json!({
            "apiVersion": "llm-d.ai/v1alpha2", "kind": "InferenceObjective",
            "metadata": {"name": "batch"}, "spec": {"poolRef": {"name": "pool"}}
        }))
        .unwrap();
        assert_eq!(
            o.to_objective(),
            sluice_core::Objective {
                name: "batch".into(),
                priority: 0
            }
        );
        let x: x_k8s::InferenceObjectiveSpec = o.spec.clone().into();
        assert_eq!(x.pool_ref, o.spec.pool_ref);
    }
}
