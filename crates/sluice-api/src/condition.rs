//! `metav1.Condition`, with the validation upstream's CRDs carry, plus the condition types and
//! reasons sluice and the upstream resources use.
//!
//! k8s-openapi's `Condition` has no bounds or patterns in its schema, so our CRDs would be looser
//! than upstream's if we embedded it; this copy carries them.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Pattern upstream (`metav1.Condition`) puts on `type`.
pub const CONDITION_TYPE_PATTERN: &str = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$";
/// Pattern upstream (`metav1.Condition`) puts on `reason`.
pub const CONDITION_REASON_PATTERN: &str = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$";
/// Most conditions a resource keeps (upstream `maxItems` on every `conditions` list).
pub const MAX_CONDITIONS: usize = 8;
/// Longest condition message the API server accepts.
pub const MAX_MESSAGE_LEN: usize = 32768;

/// Condition type: the resource was accepted (InferencePool per parent, InferenceObjective,
/// InferenceModelRewrite, sluice's EndpointPickerConfig).
pub const TYPE_ACCEPTED: &str = "Accepted";
/// Condition type: every reference of an InferencePool resolved (written by Gateways).
pub const TYPE_RESOLVED_REFS: &str = "ResolvedRefs";
/// Condition type: an InferencePool was exported to other clusters.
pub const TYPE_EXPORTED: &str = "Exported";
/// Condition type the API server defaults an InferenceObjective's status to (upstream quirk:
/// the documented type is `Accepted`).
pub const TYPE_READY: &str = "Ready";

/// Reason: the resource is valid and in use.
pub const REASON_ACCEPTED: &str = "Accepted";
/// Reason: no controller has looked at the resource yet.
pub const REASON_PENDING: &str = "Pending";
/// Reason (InferencePool `Accepted=True`): the parent supports the pool.
pub const REASON_SUPPORTED_BY_PARENT: &str = "SupportedByParent";
/// Reason (InferencePool `Accepted=False`): the parent does not support the pool.
pub const REASON_NOT_SUPPORTED_BY_PARENT: &str = "NotSupportedByParent";
/// Reason (InferencePool `Accepted=False`): the HTTPRoute referencing the pool was not accepted.
pub const REASON_HTTP_ROUTE_NOT_ACCEPTED: &str = "HTTPRouteNotAccepted";
/// Reason (InferencePool `Accepted=False`, GIE `main`): the pool has no `endpointPickerRef`.
pub const REASON_ENDPOINT_PICKER_REF_MISSING: &str = "EndpointPickerRefMissing";
/// Reason (InferencePool `ResolvedRefs=True`).
pub const REASON_RESOLVED_REFS: &str = "ResolvedRefs";
/// Reason (InferencePool `ResolvedRefs=False`): `endpointPickerRef` names nothing usable.
pub const REASON_INVALID_EXTENSION_REF: &str = "InvalidExtensionRef";
/// Reason (sluice EndpointPickerConfig `Accepted=False`): the config failed defaulting or
/// validation; the message says which check failed.
pub const REASON_INVALID_CONFIG: &str = "InvalidConfig";
/// Reason (sluice EndpointPickerConfig `Accepted=False`): `poolRef` names no InferencePool in
/// the namespace.
pub const REASON_POOL_NOT_FOUND: &str = "PoolNotFound";
/// Reason (sluice EndpointPickerConfig `Accepted=False`): another EndpointPickerConfig already
/// configures the same pool (the oldest one wins).
pub const REASON_CONFLICT: &str = "Conflict";

/// The status of a condition.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum ConditionStatus {
    /// The condition holds.
    True,
    /// The condition does not hold.
    False,
    /// The controller cannot tell (yet).
    #[default]
    Unknown,
}

impl ConditionStatus {
    /// The wire form (`"True"`, `"False"`, `"Unknown"`).
    pub fn as_str(self) -> &'static str {
        match self {
            ConditionStatus::True => "True",
            ConditionStatus::False => "False",
            ConditionStatus::Unknown => "Unknown",
        }
    }
}

impl From<bool> for ConditionStatus {
    fn from(value: bool) -> Self {
        if value {
            ConditionStatus::True
        } else {
            ConditionStatus::False
        }
    }
}

/// Condition contains details for one aspect of the current state of this API Resource
/// (`metav1.Condition`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// type of condition in CamelCase or in foo.example.com/CamelCase.
    #[serde(rename = "type")]
    #[schemars(length(max = 316), regex(pattern = CONDITION_TYPE_PATTERN))]
    pub type_: String,

    /// status of the condition, one of True, False, Unknown.
    pub status: ConditionStatus,

    /// observedGeneration represents the .metadata.generation that the condition was set based
    /// upon. For instance, if .metadata.generation is currently 12, but the
    /// .status.conditions[x].observedGeneration is 9, the condition is out of date with respect
    /// to the current state of the instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub observed_generation: Option<i64>,

    /// lastTransitionTime is the last time the condition transitioned from one status to
    /// another. This should be when the underlying condition changed. If that is not known, then
    /// using the time when the API field changed is acceptable.
    pub last_transition_time: Time,

    /// reason contains a programmatic identifier indicating the reason for the condition's last
    /// transition. Producers of specific condition types may define expected values and meanings
    /// for this field, and whether the values are considered a guaranteed API. The value should
    /// be a CamelCase string. This field may not be empty.
    #[schemars(length(min = 1, max = 1024), regex(pattern = CONDITION_REASON_PATTERN))]
    pub reason: String,

    /// message is a human readable message indicating details about the transition. This may be
    /// an empty string.
    #[schemars(length(max = 32768))]
    pub message: String,
}

impl Condition {
    /// A condition of `type_` with the given status, reason and message, stamped with `now`.
    ///
    /// The message is cut to the API server's limit (on a character boundary) so a long error
    /// text can never make a status update fail.
    pub fn new(
        type_: &str,
        status: ConditionStatus,
        reason: &str,
        message: impl Into<String>,
        now: Time,
    ) -> Self {
        let mut message = message.into();
        truncate_on_char_boundary(&mut message, MAX_MESSAGE_LEN);
        Condition {
            type_: type_.to_owned(),
            status,
            observed_generation: None,
            last_transition_time: now,
            reason: reason.to_owned(),
            message,
        }
    }

    /// `Accepted=True` with reason `Accepted`.
    pub fn accepted(message: impl Into<String>, now: Time) -> Self {
        Self::new(
            TYPE_ACCEPTED,
            ConditionStatus::True,
            REASON_ACCEPTED,
            message,
            now,
        )
    }

    /// `Accepted=False` with the given reason.
    pub fn rejected(reason: &str, message: impl Into<String>, now: Time) -> Self {
        Self::new(TYPE_ACCEPTED, ConditionStatus::False, reason, message, now)
    }

    /// The same condition, recording the generation it was computed for.
    pub fn with_observed_generation(mut self, generation: Option<i64>) -> Self {
        self.observed_generation = generation;
        self
    }

    /// The condition a controller writes before it has decided: `Unknown`, reason `Pending`,
    /// message `Waiting for controller` (what upstream's CRDs default to).
    pub fn pending(type_: &str, now: Time) -> Self {
        Self::new(
            type_,
            ConditionStatus::Unknown,
            REASON_PENDING,
            "Waiting for controller",
            now,
        )
    }

    /// Whether `self` and `other` say the same thing (type, status, reason, message,
    /// generation), ignoring when they were stamped. Controllers use it to avoid status writes
    /// that would only move the timestamp.
    pub fn same_state(&self, other: &Condition) -> bool {
        self.type_ == other.type_
            && self.status == other.status
            && self.reason == other.reason
            && self.message == other.message
            && self.observed_generation == other.observed_generation
    }
}

impl From<Condition> for k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    fn from(c: Condition) -> Self {
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
            last_transition_time: c.last_transition_time,
            message: c.message,
            observed_generation: c.observed_generation,
            reason: c.reason,
            status: c.status.as_str().to_owned(),
            type_: c.type_,
        }
    }
}

fn truncate_on_char_boundary(s: &mut String, max: usize) {
    if s.len() <= max {
        return;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
}

/// Puts `new` into `conditions` the way `meta.SetStatusCondition` does: an existing condition of
/// the same type is replaced, keeping its `lastTransitionTime` when the status did not change;
/// otherwise `new` is appended. At most [`MAX_CONDITIONS`] are kept (the oldest entries beyond
/// that are dropped, so the API server never rejects the list).
///
/// Returns whether anything other than timestamps changed.
pub fn set_condition(conditions: &mut Vec<Condition>, new: Condition) -> bool {
    if let Some(existing) = conditions.iter_mut().find(|c| c.type_ == new.type_) {
        if existing.same_state(&new) {
            return false;
        }
        let keep_time = existing.status == new.status;
        let time = existing.last_transition_time.clone();
        *existing = new;
        if keep_time {
            existing.last_transition_time = time;
        }
        return true;
    }
    conditions.push(new);
    if conditions.len() > MAX_CONDITIONS {
        let excess = conditions.len() - MAX_CONDITIONS;
        conditions.drain(..excess);
    }
    true
}

/// The condition of the given type, if present.
pub fn find_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Schema of a `conditions` list: at most 8, a map keyed by `type` (as upstream).
pub(crate) fn conditions_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut schema = generator.subschema_for::<Vec<Condition>>();
    schema.insert("maxItems".into(), MAX_CONDITIONS.into());
    schema.insert("x-kubernetes-list-type".into(), "map".into());
    schema.insert(
        "x-kubernetes-list-map-keys".into(),
        serde_json::json!(["type"]),
    );
    schema
}

/// The default upstream's alpha CRDs give `status.conditions`: one `Unknown`/`Pending` entry of
/// the given type, stamped at the epoch.
pub(crate) fn pending_default(type_: &str) -> serde_json::Value {
    serde_json::json!([{
        "lastTransitionTime": "1970-01-01T00:00:00Z",
        "message": "Waiting for controller",
        "reason": "Pending",
        "status": "Unknown",
        "type": type_,
    }])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(secs).unwrap())
    }

    #[test]
    fn set_condition_keeps_transition_time_when_status_unchanged() {
        let mut conds = vec![Condition::accepted("ok", t(10))];
        let changed = set_condition(&mut conds, Condition::accepted("still ok", t(20)));
        assert!(changed);
        assert_eq!(conds.len(), 1);
        assert_eq!(conds[0].message, "still ok");
        assert_eq!(conds[0].last_transition_time, t(10));

        let changed = set_condition(
            &mut conds,
            Condition::rejected("InvalidConfig", "bad", t(30)),
        );
        assert!(changed);
        assert_eq!(conds[0].status, ConditionStatus::False);
        assert_eq!(conds[0].last_transition_time, t(30));
    }

    #[test]
    fn set_condition_reports_no_change_for_same_state() {
        let mut conds = vec![Condition::accepted("ok", t(10))];
        assert!(!set_condition(&mut conds, Condition::accepted("ok", t(99))));
        assert_eq!(conds[0].last_transition_time, t(10));
    }

    #[test]
    fn conditions_are_bounded() {
        let mut conds = Vec::new();
        for i in 0..20 {
            set_condition(
                &mut conds,
                Condition::new(&format!("T{i}"), ConditionStatus::True, "R", "", t(i)),
            );
        }
        assert_eq!(conds.len(), MAX_CONDITIONS);
        assert_eq!(conds[0].type_, "T12");
        assert!(find_condition(&conds, "T19").is_some());
    }

    #[test]
    fn long_messages_are_truncated_on_char_boundary() {
        let msg = "é".repeat(MAX_MESSAGE_LEN);
        let c = Condition::accepted(msg, t(0));
        assert!(c.message.len() <= MAX_MESSAGE_LEN);
        assert!(c.message.chars().all(|ch| ch == 'é'));
    }

    #[test]
    fn condition_wire_form_matches_metav1() {
        let c = Condition::rejected(REASON_POOL_NOT_FOUND, "no pool", t(0))
            .with_observed_generation(Some(3));
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "type": "Accepted", "status": "False", "observedGeneration": 3,
                "lastTransitionTime": "1970-01-01T00:00:00Z", "reason": "PoolNotFound",
                "message": "no pool"
            })
        );
    }
}
