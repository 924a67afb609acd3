use super::*;
use crate::files::{parse_manifests, sync_index};

const POOL: &str = r#"
apiVersion: inference.networking.k8s.io/v1
kind: InferencePool
metadata: {name: pool, namespace: ns}
spec:
  selector: {matchLabels: {app: vllm}}
  targetPorts: [{number: 8000}, {number: 8001}]
  endpointPickerRef: {name: epp, port: {number: 9002}}
"#;

fn pod(name: &str, ip: &str, ready: bool, extra: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: ns
  labels: {{app: vllm, zone: a}}
  {extra}
status:
  podIP: {ip}
  conditions: [{{type: Ready, status: "{}"}}]
"#,
        if ready { "True" } else { "False" }
    )
}

fn index_with(docs: &[&str]) -> Index {
    let mut index = Index::new(crate::default_validator());
    load(&mut index, docs);
    index
}

fn load(index: &mut Index, docs: &[&str]) {
    let (set, errors) = parse_manifests(&docs.join("\n---\n"), "test");
    assert!(errors.is_empty(), "{errors:?}");
    sync_index(index, &set);
}

fn pool() -> PoolRef {
    PoolRef {
        namespace: "ns".into(),
        name: "pool".into(),
    }
}

fn publish(index: &mut Index) -> PoolSnapshot {
    match index.compile(&pool()) {
        Compiled::Publish(s) => s,
        other => panic!("expected a snapshot, got {other:?}"),
    }
}

#[test]
fn one_endpoint_per_ready_pod_and_target_port_with_labels() {
    let p1 = pod("p1", "10.0.0.1", true, "");
    let p2 = pod("p2", "10.0.0.2", false, "");
    let mut index = index_with(&[POOL, &p1, &p2]);
    let s = publish(&mut index);
    let addrs: Vec<String> = s.endpoints.iter().map(|e| e.address.to_string()).collect();
    assert_eq!(
        addrs,
        ["10.0.0.1:8000", "10.0.0.1:8001"],
        "the unready pod has no endpoints"
    );
    assert_eq!(s.endpoints[1].key.to_string(), "ns/p1-rank-1");
    assert_eq!(
        s.endpoints[0].labels.get("zone").map(String::as_str),
        Some("a")
    );
}

#[test]
fn active_ports_annotation_restricts_endpoints() {
    let p1 = pod(
        "p1",
        "10.0.0.1",
        true,
        "annotations: {inference.networking.k8s.io/active-ports: \"8001\"}",
    );
    let mut index = index_with(&[POOL, &p1]);
    let s = publish(&mut index);
    let addrs: Vec<String> = s.endpoints.iter().map(|e| e.address.to_string()).collect();
    assert_eq!(addrs, ["10.0.0.1:8001"]);
    assert_eq!(s.endpoints[0].key.rank, 1);
}

#[test]
fn pods_outside_the_selector_or_namespace_are_ignored() {
    let other_ns = pod("p9", "10.0.0.9", true, "").replace("namespace: ns", "namespace: other");
    let other_app = pod("p8", "10.0.0.8", true, "").replace("app: vllm", "app: sglang");
    let mut index = index_with(&[POOL, &other_ns, &other_app]);
    assert!(publish(&mut index).endpoints.is_empty());
}

#[test]
fn objectives_and_rewrites_are_compiled_with_precedence() {
    let obj = r#"
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceObjective
metadata: {name: batch, namespace: ns}
spec: {priority: -1, poolRef: {name: pool}}
"#;
    let obj_llmd = r#"
apiVersion: llm-d.ai/v1alpha2
kind: InferenceObjective
metadata: {name: batch, namespace: ns}
spec: {priority: 5, poolRef: {name: pool}}
"#;
    let other_pool = r#"
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceObjective
metadata: {name: chat, namespace: ns}
spec: {poolRef: {name: elsewhere}}
"#;
    let newer = r#"
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceModelRewrite
metadata: {name: a-newer, namespace: ns, creationTimestamp: "2026-02-01T00:00:00Z"}
spec:
  poolRef: {name: pool}
  rules: [{matches: [{model: {value: m}}], targets: [{modelRewrite: m-new}]}]
"#;
    let older = r#"
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceModelRewrite
metadata: {name: z-older, namespace: ns, creationTimestamp: "2026-01-01T00:00:00Z"}
spec:
  poolRef: {name: pool}
  rules: [{targets: [{modelRewrite: model-x, weight: 3}, {modelRewrite: model-y, weight: 1}]}]
"#;
    let mut index = index_with(&[POOL, obj, other_pool, newer, older]);
    let s = publish(&mut index);
    assert_eq!(
        s.objectives,
        vec![Objective {
            name: "batch".into(),
            priority: -1
        }]
    );
    assert!(s.objective("batch").unwrap().is_sheddable());
    let sources: Vec<&str> = s.rewrites.iter().map(|r| r.source.as_str()).collect();
    assert_eq!(
        sources,
        ["ns/z-older", "ns/a-newer"],
        "oldest resource first"
    );
    assert_eq!(s.rewrites[0].targets[0].weight, 3);
    assert!(s.rewrites[0].matches.is_empty());

    load(&mut index, &[POOL, obj, obj_llmd]);
    let s = publish(&mut index);
    assert_eq!(
        s.objectives,
        vec![Objective {
            name: "batch".into(),
            priority: 5
        }],
        "llm-d.ai wins a name clash"
    );
    assert!(s.rewrites.is_empty(), "deleted rewrites are gone");
}

const GOOD_EPC: &str = r#"
apiVersion: sluice.dev/v1alpha1
kind: EndpointPickerConfig
metadata: {name: cfg, namespace: ns, generation: 1}
spec:
  poolRef: {name: pool}
  plugins: [{type: queue-scorer}, {type: max-score-picker}]
  schedulingProfiles: [{name: default, plugins: [{pluginRef: queue-scorer}, {pluginRef: max-score-picker}]}]
"#;

const BAD_EPC: &str = r#"
apiVersion: sluice.dev/v1alpha1
kind: EndpointPickerConfig
metadata: {name: cfg, namespace: ns, generation: 2}
spec:
  poolRef: {name: pool}
  plugins: [{type: queue-scorer}]
  schedulingProfiles: [{name: default, plugins: [{pluginRef: nope}]}]
"#;

#[test]
fn an_invalid_config_keeps_the_last_good_one_and_is_reported() {
    let mut index = index_with(&[POOL, GOOD_EPC]);
    let good = publish(&mut index);
    assert_eq!(good.picker_config.plugins.len(), 2);
    let p1 = pod("p1", "10.0.0.1", true, "");
    load(&mut index, &[POOL, BAD_EPC, &p1]);
    let s = publish(&mut index);
    assert_eq!(
        s.picker_config, good.picker_config,
        "last good config stays"
    );
    assert_eq!(s.endpoints.len(), 2, "other changes still flow");
    let verdict = &index.epc_verdicts()[&("ns".to_owned(), "cfg".to_owned())];
    assert_eq!(verdict.generation, Some(2));
    match &verdict.verdict {
        EpcVerdict::Invalid(msg) => assert!(msg.contains("\"nope\""), "{msg}"),
        other => panic!("expected Invalid, got {other:?}"),
    }
}

#[test]
fn an_invalid_config_without_a_previous_good_one_is_withheld() {
    let mut index = index_with(&[POOL, BAD_EPC]);
    assert!(matches!(index.compile(&pool()), Compiled::Withheld(msg) if msg.contains("ns/cfg")));
}

#[test]
fn the_oldest_config_wins_and_the_other_is_a_conflict() {
    let older = GOOD_EPC.replace(
        "generation: 1",
        "generation: 1, creationTimestamp: \"2026-01-01T00:00:00Z\"",
    );
    let newer = GOOD_EPC
        .replace("name: cfg", "name: cfg2")
        .replace(
            "generation: 1",
            "generation: 1, creationTimestamp: \"2026-03-01T00:00:00Z\"",
        )
        .replace("{type: queue-scorer}, ", "");
    let newer = newer.replace("{pluginRef: queue-scorer}, ", "");
    let mut index = index_with(&[POOL, &older, &newer]);
    assert_eq!(publish(&mut index).picker_config.plugins.len(), 2);
    assert!(matches!(
        index.epc_verdicts()[&("ns".into(), "cfg2".into())].verdict,
        EpcVerdict::Conflict(_)
    ));
    assert!(matches!(
        index.epc_verdicts()[&("ns".into(), "cfg".into())].verdict,
        EpcVerdict::Accepted { .. }
    ));
}

#[test]
fn only_pools_selecting_a_changed_pod_become_dirty() {
    let other = POOL
        .replace("name: pool", "name: other")
        .replace("app: vllm", "app: sglang");
    let mut index = index_with(&[POOL, &other]);
    index.compile_dirty();
    let p1 = pod("p1", "10.0.0.1", true, "");
    load(&mut index, &[POOL, &other, &p1]);
    let dirty: Vec<String> = index
        .compile_dirty()
        .into_iter()
        .map(|(p, _)| p.name)
        .collect();
    assert_eq!(dirty, ["pool"]);
}

#[test]
fn a_deleted_pool_compiles_to_an_empty_snapshot() {
    let p1 = pod("p1", "10.0.0.1", true, "");
    let mut index = index_with(&[POOL, &p1]);
    publish(&mut index);
    load(&mut index, &[&p1]);
    assert!(matches!(index.compile(&pool()), Compiled::Deleted(s) if s.endpoints.is_empty()));
}

#[test]
fn unsupported_documents_are_skipped_with_their_position() {
    let (set, errors) = parse_manifests(
        &format!("{POOL}\n---\nkind: Service\napiVersion: v1\n---\n: : bad"),
        "f.yaml",
    );
    assert_eq!(set.pools.len(), 1);
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(
        errors[0].contains("f.yaml (document 2)") && errors[0].contains("v1/Service"),
        "{errors:?}"
    );
}

/// The controller refuses exactly what a picker's scheduler refuses: an unknown plugin
/// type and out-of-range parameters (which a purely structural check let through to be
/// NACKed by every picker) never reach a picker, and every config the loader builds passes.
#[test]
fn configs_are_judged_by_the_pickers_own_loader() {
    let validator = crate::default_validator();
    let cases = [
        (
            "plugins: [{type: queue-scorer}, {type: no-such-scorer}]",
            false,
        ),
        (
            "plugins: [{type: utilization-detector, parameters: {kvCacheUtilThreshold: 1.5}}]",
            false,
        ),
        (
            "plugins: [{type: prefix-cache-scorer, parameters: {blockSizeToken: 16}}]",
            false,
        ),
        (
            "plugins: [{type: queue-scorer}]\nschedulingProfiles: [{name: a, plugins: [{pluginRef: nope}]}]",
            false,
        ),
        ("featureGates: [fastPath]", false),
        (
            "plugins: [{type: queue-scorer}, {type: max-score-picker}]",
            true,
        ),
        (
            "plugins: [{type: prefix-cache-scorer, parameters: {blockSizeTokens: 16}}, {type: max-score-picker}]",
            true,
        ),
        ("", true),
    ];
    for (text, ok) in cases {
        let cfg = sluice_scheduling::parse_config_text(text).unwrap();
        let picker = sluice_scheduling::Scheduler::from_config(&cfg).map(|_| ());
        let controller = validator(&cfg);
        assert_eq!(picker.is_ok(), ok, "picker on {text:?}: {picker:?}");
        assert_eq!(
            controller.is_ok(),
            ok,
            "controller on {text:?}: {controller:?}"
        );
        if let Err(e) = controller {
            assert!(
                e.starts_with("invalid EndpointPickerConfig: ") && !e.contains('\n'),
                "a single-line status message: {e}"
            );
        }
    }
    let unknown = sluice_scheduling::parse_config_text(cases[0].0).unwrap();
    let err = validator(&unknown).unwrap_err();
    assert!(
        err.contains("no-such-scorer"),
        "names the offending type: {err}"
    );
}
