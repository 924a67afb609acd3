//! What kube-apiserver requires of the CRDs we ship: a valid `apiextensions.k8s.io/v1`
//! CustomResourceDefinition with no unknown keys, and a structural schema (a type on every
//! node, no `$ref`/`definitions`, no `properties` next to `additionalProperties`, nothing but
//! the int-or-string form inside `anyOf`, `metadata` left alone), with defaults that satisfy
//! their own schema.

// Helpers outside #[test] fns are test code too: a failed expectation is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::{Value, json};

/// Keys a JSONSchemaProps may carry in our CRDs. Left out on purpose: `$ref`, `$schema`,
/// `definitions`, `id` (rejected by the API server), `uniqueItems` (rejected when true),
/// `patternProperties`/`dependencies`/`additionalItems` (not structural), `nullable` and
/// `title` (upstream has none; kube's derive adds them and `normalize` must remove them).
const SCHEMA_KEYS: &[&str] = &[
    "description",
    "type",
    "format",
    "default",
    "enum",
    "maximum",
    "minimum",
    "exclusiveMaximum",
    "exclusiveMinimum",
    "multipleOf",
    "maxLength",
    "minLength",
    "pattern",
    "maxItems",
    "minItems",
    "maxProperties",
    "minProperties",
    "required",
    "items",
    "properties",
    "additionalProperties",
    "anyOf",
    "allOf",
    "oneOf",
    "not",
    "example",
    "externalDocs",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-embedded-resource",
    "x-kubernetes-int-or-string",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-list-type",
    "x-kubernetes-map-type",
    "x-kubernetes-validations",
];

fn structural_violations(schema: &Value) -> Vec<String> {
    let mut out = Vec::new();
    walk(schema, "<root>", &mut out);
    if let Some(meta) = schema.pointer("/properties/metadata") {
        let allowed = meta.as_object().is_some_and(|m| {
            m.keys()
                .all(|k| k == "type" || k == "description" || k == "properties")
                && m.get("properties")
                    .and_then(Value::as_object)
                    .is_none_or(|p| p.keys().all(|k| k == "name" || k == "generateName"))
        });
        if !allowed {
            out.push("metadata: only name and generateName may be restricted".into());
        }
    }
    out
}

fn is_int_or_string_any_of(node: &serde_json::Map<String, Value>) -> bool {
    node.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true))
        && node.get("anyOf") == Some(&json!([{"type": "integer"}, {"type": "string"}]))
}

fn walk(node: &Value, path: &str, out: &mut Vec<String>) {
    let Some(obj) = node.as_object() else {
        out.push(format!("{path}: schema is not an object"));
        return;
    };
    for key in obj.keys() {
        if !SCHEMA_KEYS.contains(&key.as_str()) {
            out.push(format!("{path}: key {key:?} is not allowed"));
        }
    }
    let typed = obj
        .get("type")
        .and_then(Value::as_str)
        .is_some_and(|t| !t.is_empty());
    let escape = obj.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true))
        || obj.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
    if !typed && !escape {
        out.push(format!("{path}: no type"));
    }
    if obj.contains_key("properties") && obj.contains_key("additionalProperties") {
        out.push(format!(
            "{path}: properties and additionalProperties together"
        ));
    }
    if matches!(obj.get("additionalProperties"), Some(Value::Bool(_))) {
        out.push(format!("{path}: additionalProperties must be a schema"));
    }
    for key in ["anyOf", "allOf", "oneOf", "not"] {
        if obj.contains_key(key) && !(key == "anyOf" && is_int_or_string_any_of(obj)) {
            out.push(format!("{path}: {key} other than the int-or-string form"));
        }
    }
    if obj.get("x-kubernetes-list-type").and_then(Value::as_str) == Some("map") {
        let keys = obj
            .get("x-kubernetes-list-map-keys")
            .and_then(Value::as_array);
        let required = node.pointer("/items/required").and_then(Value::as_array);
        match (keys, required) {
            (Some(keys), Some(required)) if keys.iter().all(|k| required.contains(k)) => {}
            _ => out.push(format!(
                "{path}: list-type map needs list-map-keys that items require"
            )),
        }
    }
    if let Some(default) = obj.get("default") {
        for e in common::check_openapi(node, default) {
            out.push(format!("{path}: default does not satisfy its schema: {e}"));
        }
    }
    if let Some(items) = obj.get("items") {
        if items.is_array() {
            out.push(format!("{path}: items must be one schema"));
        } else {
            walk(items, &format!("{path}[]"), out);
        }
    }
    if let Some(props) = obj.get("properties").and_then(Value::as_object) {
        for (k, v) in props {
            walk(v, &format!("{path}.{k}"), out);
        }
    }
    if let Some(additional) = obj.get("additionalProperties").filter(|a| a.is_object()) {
        walk(additional, &format!("{path}{{}}"), out);
    }
}

fn shipped() -> Vec<(String, Value)> {
    sluice_api::crd_files()
        .unwrap()
        .into_iter()
        .map(|(f, yaml)| (f, serde_saphyr::from_str(&yaml).unwrap()))
        .chain(common::generated_reader_only())
        .collect()
}

#[test]
fn every_schema_we_ship_is_structural() {
    let mut problems = Vec::new();
    for (file, crd) in shipped() {
        for e in structural_violations(common::schema_of(&crd)) {
            problems.push(format!("{file}: {e}"));
        }
        let root_type = common::schema_of(&crd).get("type");
        assert_eq!(root_type, Some(&json!("object")), "{file}");
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Decodes a CRD as k8s-openapi's `CustomResourceDefinition`. Whatever k8s-openapi does not
/// know is dropped on the way through, so comparing the round trip with the original finds
/// unknown or misspelt keys at any depth.
fn decode_strictly(crd: &Value) -> Result<CustomResourceDefinition, String> {
    let typed: CustomResourceDefinition =
        serde_json::from_value(crd.clone()).map_err(|e| format!("not a CRD: {e}"))?;
    let back = common::canonical(serde_json::to_value(&typed).unwrap());
    if back != common::canonical(crd.clone()) {
        return Err("has keys a v1 CRD does not know".into());
    }
    Ok(typed)
}

#[test]
fn unknown_crd_keys_are_caught() {
    let (_, mut crd) = shipped().remove(0);
    crd["spec"]["versions"][0]["printerColumns"] = json!([]);
    assert_eq!(
        decode_strictly(&crd).unwrap_err(),
        "has keys a v1 CRD does not know"
    );
    let (_, mut crd) = shipped().remove(0);
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["maxitems"] =
        json!(3);
    assert_eq!(
        decode_strictly(&crd).unwrap_err(),
        "has keys a v1 CRD does not know"
    );
}

#[test]
fn every_crd_we_ship_is_a_valid_v1_crd_without_unknown_keys() {
    for (file, crd) in shipped() {
        assert_eq!(crd["apiVersion"], "apiextensions.k8s.io/v1", "{file}");
        assert_eq!(crd["kind"], "CustomResourceDefinition", "{file}");
        let typed = decode_strictly(&crd).unwrap_or_else(|e| panic!("{file} {e}"));
        let spec = &typed.spec;
        assert_eq!(
            typed.metadata.name.as_deref(),
            Some(format!("{}.{}", spec.names.plural, spec.group).as_str()),
            "{file}: metadata.name must be <plural>.<group>"
        );
        assert_eq!(file, format!("{}_{}.yaml", spec.group, spec.names.plural));
        assert_eq!(
            spec.versions.iter().filter(|v| v.storage).count(),
            1,
            "{file}"
        );
    }
}

#[test]
fn upstream_schemas_pass_the_same_checks() {
    // The checker is only trustworthy if what the API server accepts passes it.
    for file in [
        "inference.networking.k8s.io_inferencepools.yaml",
        "inference.networking.x-k8s.io_inferenceobjectives.yaml",
        "inference.networking.x-k8s.io_inferencemodelrewrites.yaml",
        "llm-d.ai_inferenceobjectives.yaml",
        "llm-d.ai_inferencemodelrewrites.yaml",
    ] {
        let crd = common::read_upstream(file);
        assert_eq!(
            structural_violations(common::schema_of(&crd)),
            Vec::<String>::new(),
            "{file}"
        );
    }
}

#[test]
fn non_structural_schemas_are_caught() {
    let schema = json!({
        "type": "object",
        "properties": {
            "metadata": {"type": "object", "properties": {"labels": {"type": "object"}}},
            "spec": {
                "type": "object",
                "properties": {
                    "untyped": {"description": "no type"},
                    "ref": {"$ref": "#/definitions/Foo", "type": "object"},
                    "both": {"type": "object", "properties": {"a": {"type": "string"}},
                             "additionalProperties": {"type": "string"}},
                    "opt": {"type": "string", "nullable": true},
                    "union": {"anyOf": [{"type": "string"}, {"type": "object"}]},
                    "badDefault": {"type": "integer", "minimum": 1, "default": 0},
                    "map": {"type": "array", "x-kubernetes-list-type": "map",
                            "items": {"type": "object", "properties": {"k": {"type": "string"}}}}
                }
            }
        }
    });
    let found = structural_violations(&schema);
    for expected in [
        "<root>.spec.untyped: no type",
        "<root>.spec.ref: key \"$ref\" is not allowed",
        "<root>.spec.both: properties and additionalProperties together",
        "<root>.spec.opt: key \"nullable\" is not allowed",
        "<root>.spec.union: no type",
        "<root>.spec.union: anyOf other than the int-or-string form",
        "<root>.spec.badDefault: default does not satisfy its schema: <root>: should be greater than or equal to 1",
        "<root>.spec.map: list-type map needs list-map-keys that items require",
        "metadata: only name and generateName may be restricted",
    ] {
        assert!(
            found.iter().any(|f| f == expected),
            "missing {expected:?} in {found:#?}"
        );
    }
    assert_eq!(found.len(), 9, "{found:#?}");
}

#[test]
fn int_or_string_fields_use_the_canonical_form() {
    // kube leaves `anyOf: [{}, {}]` behind for quantities; normalize must restore the form
    // the API server accepts.
    let crd = common::generated_crd("sluice.dev_endpointpickerconfigs.yaml");
    let max_bytes = common::schema_of(&crd)
        .pointer("/properties/spec/properties/flowControl/properties/maxBytes")
        .unwrap();
    assert_eq!(max_bytes["x-kubernetes-int-or-string"], true);
    assert_eq!(
        max_bytes["anyOf"],
        json!([{"type": "integer"}, {"type": "string"}])
    );
    assert!(max_bytes.get("nullable").is_none());
}
