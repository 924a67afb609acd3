//! The InferencePool validation upstream tests in `test/cel/inferencepool_test.go`, run
//! client-side against the schema we generate: CEL rules are evaluated by kube-cel from the
//! schema's own `x-kubernetes-validations` (each with `self` bound to the node it sits on),
//! after the schema's defaults are applied, as the API server does; enums and bounds are
//! checked by the OpenAPI value checker in `common`.

// Helpers outside #[test] fns are test code too: a failed expectation is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use kube_core::cel::{Validator, apply_defaults, compile_schema};
use serde_json::{Value, json};

const POOL_CRD: &str = "inference.networking.k8s.io_inferencepools.yaml";

fn pool_schema() -> Value {
    common::schema_of(&common::generated_crd(POOL_CRD)).clone()
}

fn valid_pool() -> Value {
    json!({
        "apiVersion": "inference.networking.k8s.io/v1",
        "kind": "InferencePool",
        "metadata": {"name": "vllm-qwen3-32b-pool", "namespace": "default"},
        "spec": {
            "selector": {"matchLabels": {"app": "vllm-qwen3-32b-pool"}},
            "targetPorts": [{"number": 8000}],
            "endpointPickerRef": {"name": "epp", "port": {"number": 9002}},
        },
    })
}

/// Every error the API server would report, CEL first, then OpenAPI.
fn admit(schema: &Value, object: &Value) -> Vec<String> {
    let mut errors: Vec<String> = match Validator::new().validate(schema, object, None) {
        Ok(()) => Vec::new(),
        Err(errs) => errs
            .iter()
            .map(|e| format!("{}: {}", e.field_path, e.message))
            .collect(),
    };
    errors.extend(common::check_openapi(
        schema,
        &apply_defaults(schema, object),
    ));
    errors
}

fn pool_with(mutate: impl FnOnce(&mut Value)) -> Vec<String> {
    let mut pool = valid_pool();
    mutate(&mut pool);
    admit(&pool_schema(), &pool)
}

#[test]
fn the_generated_pool_schema_carries_both_upstream_rules_and_they_compile() {
    let schema = pool_schema();
    let rules = |ptr: &str| {
        schema
            .pointer(ptr)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(
        rules("/properties/spec/properties/targetPorts/x-kubernetes-validations"),
        vec![json!({
            "rule": "self.all(p1, self.exists_one(p2, p1.number==p2.number))",
            "message": "port number must be unique"
        })]
    );
    assert_eq!(
        rules("/properties/spec/properties/endpointPickerRef/x-kubernetes-validations"),
        vec![json!({
            "rule": "self.kind != 'Service' || has(self.port)",
            "message": "port is required when kind is 'Service' or unspecified (defaults to 'Service')"
        })]
    );
    let compiled = compile_schema(&schema);
    assert!(
        !compiled.has_errors(),
        "{:?}",
        compiled.compilation_errors()
    );
}

#[test]
fn valid_pool_is_accepted() {
    assert_eq!(pool_with(|_| {}), Vec::<String>::new());
}

#[test]
fn valid_pool_with_every_field_is_accepted() {
    let errors = pool_with(|p| {
        p["spec"]["appProtocol"] = json!("kubernetes.io/h2c");
        p["spec"]["endpointPickerRef"] = json!({
            "group": "", "kind": "Service", "name": "epp",
            "port": {"number": 9002}, "failureMode": "FailOpen"
        });
        p["status"] = json!({"parents": [{
            "parentRef": {"name": "gw", "namespace": "infra"},
            "controllerName": "example.net/gateway-controller",
            "conditions": [{"type": "Accepted", "status": "True", "reason": "SupportedByParent",
                            "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]
        }]});
    });
    assert_eq!(errors, Vec::<String>::new());
}

#[test]
fn app_protocol_accepts_http_and_h2c_only() {
    for ok in ["http", "kubernetes.io/h2c"] {
        assert_eq!(
            pool_with(|p| p["spec"]["appProtocol"] = json!(ok)),
            Vec::<String>::new()
        );
    }
    let errors = pool_with(|p| p["spec"]["appProtocol"] = json!("h2c"));
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].starts_with("spec.appProtocol: Unsupported value: \"h2c\""),
        "{errors:?}"
    );
}

#[test]
fn endpoint_picker_ref_without_kind_and_port_is_rejected() {
    let errors = pool_with(|p| p["spec"]["endpointPickerRef"] = json!({"name": "epp"}));
    assert_eq!(
        errors,
        vec![
            "spec.endpointPickerRef: port is required when kind is 'Service' or unspecified (defaults to 'Service')"
        ]
    );
}

#[test]
fn endpoint_picker_ref_of_kind_service_without_port_is_rejected() {
    let errors = pool_with(|p| {
        p["spec"]["endpointPickerRef"] = json!({"kind": "Service", "name": "epp"});
    });
    assert_eq!(
        errors,
        vec![
            "spec.endpointPickerRef: port is required when kind is 'Service' or unspecified (defaults to 'Service')"
        ]
    );
}

#[test]
fn endpoint_picker_ref_of_another_kind_may_omit_port() {
    let errors = pool_with(|p| {
        p["spec"]["endpointPickerRef"] =
            json!({"group": "example.com", "kind": "Picker", "name": "epp"});
    });
    assert_eq!(errors, Vec::<String>::new());
}

#[test]
fn several_unique_target_ports_are_accepted() {
    let errors = pool_with(|p| {
        p["spec"]["targetPorts"] = json!([{"number": 8000}, {"number": 8001}, {"number": 8002}]);
    });
    assert_eq!(errors, Vec::<String>::new());
}

#[test]
fn duplicate_target_ports_are_rejected() {
    let errors = pool_with(|p| {
        p["spec"]["targetPorts"] = json!([{"number": 8000}, {"number": 8001}, {"number": 8000}]);
    });
    assert_eq!(errors, vec!["spec.targetPorts: port number must be unique"]);
}

#[test]
fn target_port_bounds_are_enforced() {
    let nine: Vec<Value> = (8000..8009).map(|n| json!({"number": n})).collect();
    let errors = pool_with(|p| p["spec"]["targetPorts"] = json!(nine));
    assert_eq!(errors, vec!["spec.targetPorts: must have at most 8 items"]);

    let errors = pool_with(|p| p["spec"]["targetPorts"] = json!([]));
    assert_eq!(
        errors,
        vec!["spec.targetPorts: should have at least 1 items"]
    );

    let errors = pool_with(|p| p["spec"]["targetPorts"] = json!([{"number": 0}]));
    assert_eq!(
        errors,
        vec!["spec.targetPorts[0].number: should be greater than or equal to 1"]
    );

    let errors = pool_with(|p| p["spec"]["targetPorts"] = json!([{"number": 65536}]));
    assert_eq!(
        errors,
        vec!["spec.targetPorts[0].number: should be less than or equal to 65535"]
    );
}

#[test]
fn selector_needs_labels_with_valid_values() {
    let errors = pool_with(|p| p["spec"]["selector"]["matchLabels"] = json!({}));
    assert_eq!(
        errors,
        vec!["spec.selector.matchLabels: should have at least 1 properties"]
    );

    let errors = pool_with(|p| p["spec"]["selector"]["matchLabels"] = json!({"app": "-bad"}));
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].starts_with("spec.selector.matchLabels[app]: should match"),
        "{errors:?}"
    );
}

#[test]
fn failure_mode_is_an_enum() {
    let errors = pool_with(|p| p["spec"]["endpointPickerRef"]["failureMode"] = json!("Retry"));
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].contains("spec.endpointPickerRef.failureMode: Unsupported value"));
}

#[test]
fn schema_defaults_agree_with_rust_defaults() {
    // What the API server stores after defaulting must decode to what the Rust types default
    // to, or the controller would see a different pool than kubectl shows.
    let schema = pool_schema();
    let defaulted = apply_defaults(&schema, &valid_pool());
    assert_eq!(defaulted["spec"]["appProtocol"], "http");
    assert_eq!(defaulted["spec"]["endpointPickerRef"]["kind"], "Service");
    assert_eq!(defaulted["spec"]["endpointPickerRef"]["group"], "");
    assert_eq!(
        defaulted["spec"]["endpointPickerRef"]["failureMode"],
        "FailClose"
    );
    let from_server: sluice_api::InferencePool = serde_json::from_value(defaulted).unwrap();
    let from_raw: sluice_api::InferencePool = serde_json::from_value(valid_pool()).unwrap();
    assert_eq!(from_server.spec, from_raw.spec);
}

#[test]
fn alpha_defaults_agree_with_rust_defaults() {
    use sluice_api::x_k8s::{InferenceModelRewrite, InferenceObjective};
    let objective = json!({
        "apiVersion": "inference.networking.x-k8s.io/v1alpha2", "kind": "InferenceObjective",
        "metadata": {"name": "sql-lora"}, "spec": {"poolRef": {"name": "pool"}, "priority": 2}
    });
    let schema = common::schema_of(&common::generated_crd(
        "inference.networking.x-k8s.io_inferenceobjectives.yaml",
    ))
    .clone();
    assert_eq!(admit(&schema, &objective), Vec::<String>::new());
    let defaulted = apply_defaults(&schema, &objective);
    assert_eq!(
        defaulted["spec"]["poolRef"]["group"],
        "inference.networking.k8s.io"
    );
    assert_eq!(defaulted["spec"]["poolRef"]["kind"], "InferencePool");
    let a: InferenceObjective = serde_json::from_value(defaulted).unwrap();
    let b: InferenceObjective = serde_json::from_value(objective).unwrap();
    assert_eq!(a.spec, b.spec);
    assert!(a.spec.pool_ref.refers_to_pool("pool"));

    let rewrite = json!({
        "apiVersion": "inference.networking.x-k8s.io/v1alpha2", "kind": "InferenceModelRewrite",
        "metadata": {"name": "rewrite-test"},
        "spec": {"poolRef": {"name": "pool"}, "rules": [{
            "matches": [{"model": {"value": "model-to-be-rewritten"}}],
            "targets": [{"modelRewrite": "rewritten-model"}]
        }]}
    });
    let schema = common::schema_of(&common::generated_crd(
        "inference.networking.x-k8s.io_inferencemodelrewrites.yaml",
    ))
    .clone();
    assert_eq!(admit(&schema, &rewrite), Vec::<String>::new());
    let defaulted = apply_defaults(&schema, &rewrite);
    assert_eq!(
        defaulted["spec"]["rules"][0]["matches"][0]["model"]["type"],
        "Exact"
    );
    let a: InferenceModelRewrite = serde_json::from_value(defaulted).unwrap();
    let b: InferenceModelRewrite = serde_json::from_value(rewrite.clone()).unwrap();
    assert_eq!(a.spec, b.spec);

    let mut bad = rewrite;
    bad["spec"]["rules"][0]["targets"] = json!([{"modelRewrite": "m", "weight": 0}]);
    assert_eq!(
        admit(&schema, &bad),
        vec!["spec.rules[0].targets[0].weight: should be greater than or equal to 1"]
    );
}
