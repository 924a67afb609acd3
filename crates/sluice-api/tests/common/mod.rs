//! Shared helpers for the sluice-api integration tests: locating files, loading CRDs as JSON,
//! and a small OpenAPI v3 value checker (types, enums, bounds, patterns, required fields) for
//! the parts of validation that are not CEL.

// Test helpers: a failed expectation here is a failed test, and not every test file uses
// every helper.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use serde_json::Value;

/// The workspace root (symlinks resolved, so the shared reference directory next to it is
/// found even when the crate is built through a linked workspace).
pub fn workspace_root() -> PathBuf {
    let manifest =
        std::fs::canonicalize(env!("CARGO_MANIFEST_DIR")).expect("CARGO_MANIFEST_DIR exists");
    manifest
        .parent()
        .and_then(|p| p.parent())
        .expect("crates/sluice-api sits two levels below the workspace root")
        .to_path_buf()
}

/// `../shared/reference/upstream-crds/` relative to the workspace root.
pub fn upstream_dir() -> PathBuf {
    workspace_root().join("../shared/reference/upstream-crds")
}

/// Reads one upstream CRD manifest as JSON; a missing file is a failure, not a skip.
pub fn read_upstream(file: &str) -> Value {
    let path = upstream_dir().join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "upstream CRD {} cannot be read ({e}); the compatibility tests need the verbatim \
             upstream manifests in ../shared/reference/upstream-crds/ next to the workspace",
            path.display()
        )
    });
    serde_saphyr::from_str(&text)
        .unwrap_or_else(|e| panic!("upstream CRD {} is not YAML: {e}", path.display()))
}

/// The CRDs we install, as JSON, keyed by file name.
pub fn generated() -> Vec<(String, Value)> {
    sluice_api::crds()
        .expect("CRDs generate")
        .into_iter()
        .map(|(f, crd)| (f, canonical(serde_json::to_value(crd).unwrap())))
        .collect()
}

/// The llm-d.ai CRDs (read, not installed), as JSON, keyed by file name.
pub fn generated_reader_only() -> Vec<(String, Value)> {
    sluice_api::reader_only_crds()
        .expect("CRDs generate")
        .into_iter()
        .map(|(f, crd)| (f, canonical(serde_json::to_value(crd).unwrap())))
        .collect()
}

/// One generated CRD by file name.
pub fn generated_crd(file: &str) -> Value {
    generated()
        .into_iter()
        .chain(generated_reader_only())
        .find(|(f, _)| f == file)
        .map(|(_, v)| v)
        .unwrap_or_else(|| panic!("no generated CRD named {file}"))
}

/// The openAPIV3Schema of the CRD's first version.
pub fn schema_of(crd: &Value) -> &Value {
    crd.pointer("/spec/versions/0/schema/openAPIV3Schema")
        .expect("CRD has an openAPIV3Schema")
}

/// Whole floats become integers, so `65535.0` (how k8s-openapi keeps bounds) equals `65535`
/// (how YAML reads them).
pub fn canonical(mut v: Value) -> Value {
    fn walk(v: &mut Value) {
        match v {
            Value::Number(n) if n.is_f64() => {
                let f = n.as_f64().unwrap();
                if f.fract() == 0.0 && f.abs() < 9.0e15 {
                    *v = Value::from(f as i64);
                }
            }
            Value::Array(a) => a.iter_mut().for_each(walk),
            Value::Object(m) => m.values_mut().for_each(walk),
            _ => {}
        }
    }
    walk(&mut v);
    v
}

/// Checks `value` against an OpenAPI v3 structural schema the way the API server's OpenAPI
/// validation does (after defaulting, which the caller applies): type, enum, numeric bounds,
/// length/item/property bounds, pattern, required. Returns one message per violation, each
/// naming the path.
pub fn check_openapi(schema: &Value, value: &Value) -> Vec<String> {
    let mut errors = Vec::new();
    check_node(schema, value, "", &mut errors);
    errors
}

fn check_node(schema: &Value, value: &Value, path: &str, errors: &mut Vec<String>) {
    let at = if path.is_empty() { "<root>" } else { path };
    if schema.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true)) {
        if !(value.is_i64() || value.is_u64() || value.is_string()) {
            errors.push(format!("{at}: must be an integer or a string"));
        }
        return;
    }
    if let Some(ty) = schema.get("type").and_then(Value::as_str) {
        let ok = match ty {
            "object" => value.is_object(),
            "array" => value.is_array(),
            "string" => value.is_string(),
            "integer" => value.is_i64() || value.is_u64(),
            "number" => value.is_number(),
            "boolean" => value.is_boolean(),
            _ => false,
        };
        if !ok {
            errors.push(format!("{at}: must be of type {ty}, got {value}"));
            return;
        }
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(value)
    {
        errors.push(format!(
            "{at}: Unsupported value: {value}: supported values: {allowed:?}"
        ));
    }
    if let Some(n) = value.as_f64() {
        if let Some(min) = schema.get("minimum").and_then(Value::as_f64)
            && n < min
        {
            errors.push(format!("{at}: should be greater than or equal to {min}"));
        }
        if let Some(max) = schema.get("maximum").and_then(Value::as_f64)
            && n > max
        {
            errors.push(format!("{at}: should be less than or equal to {max}"));
        }
    }
    let bound = |key: &str| schema.get(key).and_then(Value::as_u64);
    let mut check_len = |len: usize, min_key: &str, max_key: &str, what: &str| {
        if let Some(min) = bound(min_key)
            && (len as u64) < min
        {
            errors.push(format!("{at}: should have at least {min} {what}"));
        }
        if let Some(max) = bound(max_key)
            && (len as u64) > max
        {
            errors.push(format!("{at}: must have at most {max} {what}"));
        }
    };
    match value {
        Value::String(s) => {
            check_len(s.chars().count(), "minLength", "maxLength", "characters");
            if let Some(p) = schema.get("pattern").and_then(Value::as_str) {
                let re = regex::Regex::new(p).unwrap_or_else(|e| panic!("pattern {p}: {e}"));
                if !re.is_match(s) {
                    errors.push(format!("{at}: should match '{p}'"));
                }
            }
        }
        Value::Array(items) => {
            check_len(items.len(), "minItems", "maxItems", "items");
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    check_node(item_schema, item, &format!("{path}[{i}]"), errors);
                }
            }
        }
        Value::Object(map) => {
            check_len(map.len(), "minProperties", "maxProperties", "properties");
            if let Some(required) = schema.get("required").and_then(Value::as_array) {
                for r in required.iter().filter_map(Value::as_str) {
                    if !map.contains_key(r) {
                        errors.push(format!("{}: Required value", join(path, r)));
                    }
                }
            }
            let props = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            for (k, v) in map {
                if let Some(s) = props.and_then(|p| p.get(k)) {
                    check_node(s, v, &join(path, k), errors);
                } else if let Some(s) = additional {
                    check_node(s, v, &format!("{path}[{k}]"), errors);
                }
                // Unknown fields are pruned by the API server, not rejected.
            }
        }
        _ => {}
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}
