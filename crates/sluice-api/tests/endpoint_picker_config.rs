//! sluice's EndpointPickerConfig resource: a document written for the Go EPP's `--config-text`
//! pasted under `spec` (plus `poolRef`) is accepted by the schema, kept intact by the API
//! server's pruning, and read back into the same config.

// Helpers outside #[test] fns are test code too: a failed expectation is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use serde_json::{Value, json};
use sluice_api::EndpointPickerConfig;

const CRD: &str = "sluice.dev_endpointpickerconfigs.yaml";

/// upstream's defaulted example config (api.md §7.4), as a user would paste it.
const CONFIG_TEXT: &str = r#"
featureGates: []
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
  parameters: {autoTune: true, blockSizeTokens: 16, maxPrefixBlocksToMatch: 256, lruCapacityPerServer: 31250}
- name: picker
  type: max-score-picker
  parameters: {maxNumOfEndpoints: 1}
- type: single-profile-handler
- type: utilization-detector
  parameters: {queueDepthThreshold: 5, kvCacheUtilThreshold: 0.8, metricsStalenessThreshold: 200ms, headroom: 0.0}
- type: metrics-data-source
  parameters: {scheme: http, path: /metrics, insecureSkipVerify: true}
- type: core-metrics-extractor
- type: openai-parser
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: queue-scorer, weight: 2}
  - {pluginRef: kv-cache-utilization-scorer, weight: 2}
  - {pluginRef: prefix-cache-scorer, weight: 3}
  - {pluginRef: picker}
saturationDetector: {pluginRef: utilization-detector}
dataLayer:
  sources:
  - pluginRef: metrics-data-source
    extractors: [{pluginRef: core-metrics-extractor}]
flowControl:
  maxBytes: 4Gi
  maxRequests: 5000
  defaultRequestTTL: 60s
  noEndpointRequestTTL: 5s
  priorityBands:
  - {priority: 10, maxRequests: 100}
parser: {pluginRef: openai-parser}
"#;

fn resource() -> Value {
    let mut spec: Value = serde_saphyr::from_str(CONFIG_TEXT).unwrap();
    spec["poolRef"] = json!({"name": "vllm-qwen3-32b-pool"});
    json!({
        "apiVersion": "sluice.dev/v1alpha1",
        "kind": "EndpointPickerConfig",
        "metadata": {"name": "default", "namespace": "default"},
        "spec": spec,
    })
}

/// Drops every field the schema does not declare, as the API server does for a structural
/// schema without `x-kubernetes-preserve-unknown-fields`.
fn prune(schema: &Value, value: &Value) -> Value {
    if schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true)) {
        return value.clone();
    }
    match value {
        Value::Object(map) => {
            let props = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            let mut out = serde_json::Map::new();
            for (k, v) in map {
                if let Some(s) = props.and_then(|p| p.get(k)).or(additional) {
                    out.insert(k.clone(), prune(s, v));
                } else if schema.pointer("/properties").is_none() && additional.is_none() {
                    // `metadata: {type: object}` keeps everything.
                    out.insert(k.clone(), v.clone());
                }
            }
            Value::Object(out)
        }
        Value::Array(items) => {
            let item = schema.get("items").cloned().unwrap_or(Value::Null);
            Value::Array(items.iter().map(|i| prune(&item, i)).collect())
        }
        other => other.clone(),
    }
}

#[test]
fn pasted_config_text_is_accepted_and_survives_pruning() {
    let crd = common::generated_crd(CRD);
    let schema = common::schema_of(&crd);
    let object = resource();
    assert_eq!(common::check_openapi(schema, &object), Vec::<String>::new());
    kube_core::cel::Validator::new()
        .validate(schema, &object, None)
        .unwrap();
    let stored = prune(schema, &object);
    assert_eq!(
        stored, object,
        "the API server would drop some of the config"
    );
}

#[test]
fn resource_spec_reads_as_the_upstream_config_document() {
    let epc: EndpointPickerConfig = serde_json::from_value(resource()).unwrap();
    assert_eq!(epc.spec.pool_ref.name, "vllm-qwen3-32b-pool");
    let doc = sluice_core::EndpointPickerConfig::from_document(
        serde_saphyr::from_str(CONFIG_TEXT).unwrap(),
    )
    .unwrap();
    assert_eq!(epc.spec.config, doc);
    let fc = epc.spec.config.flow_control.as_ref().unwrap();
    assert_eq!(fc.default_request_ttl.as_deref(), Some("60s"));
    assert_eq!(fc.no_endpoint_request_ttl.as_deref(), Some("5s"));
    assert_eq!(fc.max_bytes.as_ref().unwrap().to_u64().unwrap(), 4 << 30);
    let prefix = &epc.spec.config.plugins[2];
    assert_eq!(
        prefix.parameters.as_ref().unwrap()["lruCapacityPerServer"],
        31250
    );
    // Writing the resource back keeps upstream's keys (what a kubectl diff would show).
    let back = serde_json::to_value(&epc).unwrap();
    assert_eq!(back["spec"]["flowControl"]["defaultRequestTTL"], "60s");
    // Only spelling may differ: an empty list is left out and weights are floats.
    let mut expected = resource()["spec"].clone();
    expected.as_object_mut().unwrap().remove("featureGates");
    assert_eq!(
        common::canonical(back["spec"].clone()),
        common::canonical(expected)
    );
}

#[test]
fn missing_pool_ref_is_rejected_by_the_schema() {
    let crd = common::generated_crd(CRD);
    let mut object = resource();
    object["spec"].as_object_mut().unwrap().remove("poolRef");
    assert_eq!(
        common::check_openapi(common::schema_of(&crd), &object),
        vec!["spec.poolRef: Required value"]
    );
}

#[test]
fn printer_columns_show_pool_and_acceptance() {
    let crd = common::generated_crd(CRD);
    let columns = &crd["spec"]["versions"][0]["additionalPrinterColumns"];
    assert_eq!(
        columns,
        &json!([
            {"name": "Pool", "type": "string", "jsonPath": ".spec.poolRef.name"},
            {"name": "Accepted", "type": "string",
             "jsonPath": ".status.conditions[?(@.type==\"Accepted\")].status"},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ])
    );
    assert_eq!(crd["spec"]["names"]["shortNames"], json!(["epc"]));
    assert_eq!(crd["spec"]["scope"], "Namespaced");
    assert_eq!(
        crd["spec"]["versions"][0]["subresources"],
        json!({"status": {}})
    );
}

#[test]
fn status_round_trips_with_counters_and_conditions() {
    let status = json!({
        "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted",
                        "message": "applied", "lastTransitionTime": "2026-01-01T00:00:00Z",
                        "observedGeneration": 4}],
        "observedGeneration": 4, "appliedVersion": 17, "pickersInSync": 2, "pickersTotal": 3
    });
    let crd = common::generated_crd(CRD);
    let schema = common::schema_of(&crd);
    let mut object = resource();
    object["status"] = status.clone();
    assert_eq!(common::check_openapi(schema, &object), Vec::<String>::new());
    let epc: EndpointPickerConfig = serde_json::from_value(object).unwrap();
    let s = epc.status.as_ref().unwrap();
    assert_eq!(
        (s.pickers_in_sync, s.pickers_total, s.applied_version),
        (Some(2), Some(3), Some(17))
    );
    assert_eq!(serde_json::to_value(s).unwrap(), status);

    let mut bad = resource();
    bad["status"] = json!({"pickersTotal": -1});
    assert_eq!(
        common::check_openapi(schema, &bad),
        vec!["status.pickersTotal: should be greater than or equal to 0"]
    );
}
