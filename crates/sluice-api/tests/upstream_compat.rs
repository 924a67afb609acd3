//! Every CRD that has an upstream twin is compared with it field by field: schema paths,
//! types, formats, enums, defaults, bounds, patterns, required lists, list types, CEL rules and
//! messages, printer columns, scope, names, short names, subresources and annotations.
//! Descriptions are not compared. Every difference must be explained in [`ALLOWED`]; an entry
//! there that no longer matches a difference is itself a failure.

// Helpers outside #[test] fns are test code too: a failed expectation is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Value, json};

/// `(upstream file, path, what, why)`.
type Allowed = (&'static str, &'static str, &'static str, &'static str);

/// `(upstream file, path, what, why)`: differences we keep on purpose.
const ALLOWED: &[Allowed] = &[
    // The Go field is an int32 in both groups; llm-d.ai's CRD carries `format: int32`, GIE's
    // v1.5.0 CRD lost it. One Rust type serves both groups, so ours says int32 in both; the
    // API server accepts the same values either way (the int32 range is enforced by decoding).
    (
        "inference.networking.x-k8s.io_inferenceobjectives.yaml",
        "spec.priority",
        "format",
        "the field is an int32; llm-d.ai's twin of this CRD carries format int32",
    ),
    // kube's derive gives the root a non-optional `spec`, so the CRD requires it. Upstream's
    // alpha CRDs accept an object without spec, but such an object has no poolRef and attaches
    // to nothing; rejecting it early is the only effect.
    (
        "inference.networking.x-k8s.io_inferenceobjectives.yaml",
        "<root>",
        "required",
        "kube's derived root requires spec; a spec-less objective attaches to no pool anyway",
    ),
    (
        "inference.networking.x-k8s.io_inferencemodelrewrites.yaml",
        "<root>",
        "required",
        "kube's derived root requires spec; a spec-less rewrite has no poolRef and no rules",
    ),
    (
        "llm-d.ai_inferenceobjectives.yaml",
        "<root>",
        "required",
        "kube's derived root requires spec; a spec-less objective attaches to no pool anyway",
    ),
    (
        "llm-d.ai_inferencemodelrewrites.yaml",
        "<root>",
        "required",
        "kube's derived root requires spec; a spec-less rewrite has no poolRef and no rules",
    ),
];

/// (ours, upstream) pairs.
const PAIRS: &[(&str, &str)] = &[
    (
        "inference.networking.k8s.io_inferencepools.yaml",
        "inference.networking.k8s.io_inferencepools.yaml",
    ),
    (
        "inference.networking.x-k8s.io_inferenceobjectives.yaml",
        "inference.networking.x-k8s.io_inferenceobjectives.yaml",
    ),
    (
        "inference.networking.x-k8s.io_inferencemodelrewrites.yaml",
        "inference.networking.x-k8s.io_inferencemodelrewrites.yaml",
    ),
    (
        "llm-d.ai_inferenceobjectives.yaml",
        "llm-d.ai_inferenceobjectives.yaml",
    ),
    (
        "llm-d.ai_inferencemodelrewrites.yaml",
        "llm-d.ai_inferencemodelrewrites.yaml",
    ),
];

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Difference {
    crd: String,
    path: String,
    what: String,
    ours: String,
    upstream: String,
}

/// path → (what → value). Schema nodes are keyed by their path (`spec.targetPorts[].number`,
/// `spec.selector.matchLabels{}` for map values); CRD-level facts use `<crd>` and
/// `<version NAME>`.
type Facts = BTreeMap<String, BTreeMap<String, Value>>;

fn crd_facts(crd: &Value) -> Facts {
    let mut facts = Facts::new();
    let top = facts.entry("<crd>".into()).or_default();
    for (what, ptr) in [
        ("metadata.name", "/metadata/name"),
        ("metadata.annotations", "/metadata/annotations"),
        ("metadata.labels", "/metadata/labels"),
        ("group", "/spec/group"),
        ("scope", "/spec/scope"),
        ("names.kind", "/spec/names/kind"),
        ("names.listKind", "/spec/names/listKind"),
        ("names.plural", "/spec/names/plural"),
        ("names.singular", "/spec/names/singular"),
        ("names.shortNames", "/spec/names/shortNames"),
        ("names.categories", "/spec/names/categories"),
        ("conversion", "/spec/conversion"),
        ("preserveUnknownFields", "/spec/preserveUnknownFields"),
    ] {
        top.insert(
            what.into(),
            crd.pointer(ptr).cloned().unwrap_or(Value::Null),
        );
    }
    let versions = crd
        .pointer("/spec/versions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let names: Vec<Value> = versions.iter().map(|v| v["name"].clone()).collect();
    top.insert("versions".into(), Value::Array(names));
    for v in &versions {
        let key = format!("<version {}>", v["name"].as_str().unwrap_or("?"));
        let entry = facts.entry(key).or_default();
        for what in [
            "served",
            "storage",
            "deprecated",
            "deprecationWarning",
            "subresources",
            "selectableFields",
        ] {
            entry.insert(what.into(), v.get(what).cloned().unwrap_or(Value::Null));
        }
        let columns = v
            .get("additionalPrinterColumns")
            .map(|c| strip_descriptions(c.clone()))
            .unwrap_or(Value::Null);
        entry.insert("additionalPrinterColumns".into(), columns);
        if let Some(schema) = v.pointer("/schema/openAPIV3Schema") {
            schema_facts(schema, "", &mut facts);
        }
    }
    facts
}

fn schema_facts(node: &Value, path: &str, facts: &mut Facts) {
    let Some(obj) = node.as_object() else {
        return;
    };
    let here = if path.is_empty() {
        "<root>".to_owned()
    } else {
        path.to_owned()
    };
    let entry = facts.entry(here).or_default();
    for (key, value) in obj {
        match key.as_str() {
            "description" | "properties" | "items" => {}
            "additionalProperties" if value.is_object() => {}
            "required" => {
                let mut names: Vec<Value> = value.as_array().cloned().unwrap_or_default();
                names.sort_by_key(|a| a.to_string());
                entry.insert(key.clone(), Value::Array(names));
            }
            "x-kubernetes-validations" => {
                let mut rules: Vec<Value> = value.as_array().cloned().unwrap_or_default();
                rules.sort_by_key(|a| a["rule"].to_string());
                entry.insert(key.clone(), Value::Array(rules));
            }
            _ => {
                entry.insert(key.clone(), strip_descriptions(value.clone()));
            }
        }
    }
    let child = |suffix: &str| {
        if path.is_empty() {
            suffix.trim_start_matches('.').to_owned()
        } else {
            format!("{path}{suffix}")
        }
    };
    if let Some(props) = obj.get("properties").and_then(Value::as_object) {
        for (name, schema) in props {
            schema_facts(schema, &child(&format!(".{name}")), facts);
        }
    }
    if let Some(items) = obj.get("items") {
        schema_facts(items, &child("[]"), facts);
    }
    if let Some(additional) = obj.get("additionalProperties").filter(|a| a.is_object()) {
        schema_facts(additional, &child("{}"), facts);
    }
}

fn strip_descriptions(mut v: Value) -> Value {
    fn walk(v: &mut Value) {
        match v {
            Value::Object(m) => {
                m.remove("description");
                m.values_mut().for_each(walk);
            }
            Value::Array(a) => a.iter_mut().for_each(walk),
            _ => {}
        }
    }
    walk(&mut v);
    v
}

fn compare(crd_name: &str, ours: &Value, upstream: &Value) -> Vec<Difference> {
    let ours = crd_facts(&common::canonical(ours.clone()));
    let theirs = crd_facts(&common::canonical(upstream.clone()));
    let paths: BTreeSet<&String> = ours.keys().chain(theirs.keys()).collect();
    let absent = |v: Option<&Value>| v.map_or("<absent>".to_owned(), |v| v.to_string());
    let mut diffs = Vec::new();
    for path in paths {
        let (o, t) = (ours.get(path), theirs.get(path));
        if o.is_none() || t.is_none() {
            diffs.push(Difference {
                crd: crd_name.into(),
                path: path.clone(),
                what: "presence".into(),
                ours: if o.is_some() { "present" } else { "<absent>" }.into(),
                upstream: if t.is_some() { "present" } else { "<absent>" }.into(),
            });
            continue;
        }
        let (o, t) = (o.unwrap(), t.unwrap());
        let whats: BTreeSet<&String> = o.keys().chain(t.keys()).collect();
        for what in whats {
            let (ov, tv) = (o.get(what), t.get(what));
            let same = match (ov, tv) {
                (Some(a), Some(b)) => a == b,
                // A null CRD-level fact and an absent one say the same.
                (Some(Value::Null), None) | (None, Some(Value::Null)) => true,
                _ => false,
            };
            if !same {
                diffs.push(Difference {
                    crd: crd_name.into(),
                    path: path.clone(),
                    what: what.clone(),
                    ours: absent(ov),
                    upstream: absent(tv),
                });
            }
        }
    }
    diffs
}

fn ours(file: &str) -> Value {
    common::generated_crd(file)
}

fn all_differences() -> Vec<Difference> {
    PAIRS
        .iter()
        .flat_map(|(mine, theirs)| compare(theirs, &ours(mine), &common::read_upstream(theirs)))
        .collect()
}

/// Splits differences into unexplained ones and returns them together with the allow-list
/// entries that matched nothing.
fn judge(diffs: &[Difference]) -> (Vec<&Difference>, Vec<&Allowed>) {
    let allowed = |d: &Difference| {
        ALLOWED
            .iter()
            .any(|(crd, path, what, _)| d.crd == *crd && d.path == *path && d.what == *what)
    };
    let unexplained = diffs.iter().filter(|d| !allowed(d)).collect();
    let stale = ALLOWED
        .iter()
        .filter(|(crd, path, what, _)| {
            !diffs
                .iter()
                .any(|d| d.crd == *crd && d.path == *path && d.what == *what)
        })
        .collect();
    (unexplained, stale)
}

fn report(unexplained: &[&Difference], stale: &[&Allowed]) -> String {
    let mut out = String::new();
    for d in unexplained {
        out.push_str(&format!(
            "{}: {} [{}]: ours {} vs upstream {}\n",
            d.crd, d.path, d.what, d.ours, d.upstream
        ));
    }
    for (crd, path, what, why) in stale {
        out.push_str(&format!(
            "stale allow-list entry (no such difference any more): {crd}: {path} [{what}] ({why})\n"
        ));
    }
    out
}

#[test]
fn generated_crds_match_upstream_field_by_field() {
    let diffs = all_differences();
    let (unexplained, stale) = judge(&diffs);
    assert!(
        unexplained.is_empty() && stale.is_empty(),
        "{} unexplained difference(s), {} stale allow-list entr(ies):\n{}",
        unexplained.len(),
        stale.len(),
        report(&unexplained, &stale)
    );
}

#[test]
fn every_allow_list_entry_says_why() {
    for (crd, path, what, why) in ALLOWED {
        assert!(
            why.len() > 10,
            "{crd} {path} {what}: explain the difference"
        );
    }
}

fn pool_mutated(mutate: impl FnOnce(&mut Value)) -> Vec<String> {
    let file = "inference.networking.k8s.io_inferencepools.yaml";
    let mut mine = ours(file);
    mutate(&mut mine);
    let diffs = compare(file, &mine, &common::read_upstream(file));
    let (unexplained, _) = judge(&diffs);
    unexplained
        .iter()
        .map(|d| format!("{} [{}]", d.path, d.what))
        .collect()
}

const TARGET_PORTS: &str =
    "/spec/versions/0/schema/openAPIV3Schema/properties/spec/properties/targetPorts";

#[test]
fn a_changed_bound_is_reported() {
    let found = pool_mutated(|crd| {
        crd.pointer_mut(TARGET_PORTS).unwrap()["maxItems"] = json!(9);
    });
    assert_eq!(found, vec!["spec.targetPorts [maxItems]"]);
}

#[test]
fn a_dropped_cel_rule_is_reported() {
    let found = pool_mutated(|crd| {
        crd.pointer_mut(TARGET_PORTS)
            .unwrap()
            .as_object_mut()
            .unwrap()
            .remove("x-kubernetes-validations");
    });
    assert_eq!(found, vec!["spec.targetPorts [x-kubernetes-validations]"]);
}

#[test]
fn a_changed_cel_message_printer_column_or_short_name_is_reported() {
    let found = pool_mutated(|crd| {
        crd.pointer_mut(TARGET_PORTS).unwrap()["x-kubernetes-validations"][0]["message"] =
            json!("ports must differ");
        crd["spec"]["names"]["shortNames"] = json!(["ipool"]);
        crd["spec"]["versions"][0]["additionalPrinterColumns"] =
            json!([{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}]);
    });
    assert_eq!(
        found,
        vec![
            "<crd> [names.shortNames]",
            "<version v1> [additionalPrinterColumns]",
            "spec.targetPorts [x-kubernetes-validations]"
        ]
    );
}

#[test]
fn an_extra_or_missing_field_is_reported() {
    let found = pool_mutated(|crd| {
        let spec = crd
            .pointer_mut("/spec/versions/0/schema/openAPIV3Schema/properties/spec/properties")
            .unwrap()
            .as_object_mut()
            .unwrap();
        spec.remove("appProtocol");
        spec.insert("extra".into(), json!({"type": "string"}));
    });
    assert_eq!(
        found,
        vec!["spec.appProtocol [presence]", "spec.extra [presence]"]
    );
}

#[test]
fn descriptions_are_not_compared() {
    let found = pool_mutated(|crd| {
        crd.pointer_mut(TARGET_PORTS).unwrap()["description"] = json!("something else");
    });
    assert!(found.is_empty(), "{found:?}");
}

#[test]
fn a_missing_upstream_file_fails_loudly() {
    let result = std::panic::catch_unwind(|| common::read_upstream("no-such-crd.yaml"));
    let message = *result.unwrap_err().downcast::<String>().unwrap();
    assert!(
        message.contains("upstream CRD") && message.contains("no-such-crd.yaml"),
        "{message}"
    );
}
