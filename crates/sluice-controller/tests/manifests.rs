//! The install manifests stay consistent with the generated CRDs without needing kubectl:
//! `crds/kustomization.yml` lists exactly the CRD files in `crds/`, and `manifests/base`
//! installs them through it instead of through a copy that would drift.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn yaml(path: &PathBuf) -> Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn resources(kustomization: &Value) -> Vec<String> {
    kustomization["resources"]
        .as_array()
        .expect("resources is a list")
        .iter()
        .map(|v| v.as_str().expect("resource is a string").to_owned())
        .collect()
}

#[test]
fn the_crd_kustomization_lists_exactly_the_crd_files_sorted() {
    let dir = root().join("crds");
    let on_disk: BTreeSet<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    assert!(!on_disk.is_empty(), "crds/ holds the generated CRDs");
    let k = yaml(&dir.join("kustomization.yml"));
    assert_eq!(k["kind"], "Kustomization");
    let listed = resources(&k);
    let mut sorted = listed.clone();
    sorted.sort();
    assert_eq!(
        listed, sorted,
        "crds/kustomization.yml is sorted (crdgen output is deterministic)"
    );
    assert_eq!(
        listed.into_iter().collect::<BTreeSet<_>>(),
        on_disk,
        "crds/kustomization.yml must list every CRD in crds/ and nothing else: run `cargo xtask crdgen`"
    );
    for file in &on_disk {
        let crd = yaml(&dir.join(file));
        assert_eq!(
            crd["kind"], "CustomResourceDefinition",
            "crds/{file} is a CRD"
        );
    }
}

#[test]
fn the_base_installs_the_crds_from_crds_not_from_a_copy() {
    let base = root().join("manifests/base");
    let listed = resources(&yaml(&base.join("kustomization.yaml")));
    assert!(
        listed.iter().any(|r| r == "../../crds"),
        "manifests/base/kustomization.yaml references ../../crds: {listed:?}"
    );
    for r in &listed {
        let path = base.join(r);
        assert!(path.exists(), "manifests/base resource {r} exists");
        assert!(
            r == "../../crds" || !r.contains("crds"),
            "no CRD copies under manifests/base: {r}"
        );
    }
    assert!(
        !base.join("crds").exists(),
        "manifests/base/crds/ is gone (it was a copy of crds/ that drifted)"
    );
}

/// The example pool and the file-mode demo are valid input for the controller: every
/// document parses, every EndpointPickerConfig passes the pickers' loader, and each pool
/// compiles to a publishable config.
#[test]
fn example_and_demo_manifests_compile() {
    use sluice_controller::files::{parse_manifests, sync_index};
    use sluice_controller::index::{Compiled, Index};
    for dir in ["manifests/examples", "manifests/demo"] {
        let mut text = String::new();
        for entry in std::fs::read_dir(root().join(dir)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml") {
                text.push_str(&std::fs::read_to_string(&path).unwrap());
                text.push_str("\n---\n");
            }
        }
        let (set, errors) = parse_manifests(&text, dir);
        assert!(errors.is_empty(), "{dir}: {errors:?}");
        assert!(!set.pools.is_empty(), "{dir} defines a pool");
        let mut index = Index::new(sluice_controller::default_validator());
        sync_index(&mut index, &set);
        for (pool, compiled) in index.compile_dirty() {
            assert!(
                matches!(compiled, Compiled::Publish(_)),
                "{dir}: pool {pool} does not compile: {compiled:?}"
            );
        }
        assert_eq!(
            index.invalid_config_count(),
            0,
            "{dir}: {:?}",
            index.epc_verdicts()
        );
    }
}

/// The controller Deployment's flags are flags the binary accepts, and its probes hit the
/// HTTP endpoints on the metrics port it is given.
#[test]
fn the_controller_deployment_args_parse_and_probes_match() {
    use clap::Parser;
    let text = std::fs::read_to_string(root().join("manifests/base/controller.yaml")).unwrap();
    let deployment: Value = serde_saphyr::from_str(text.split("\n---").next().unwrap()).unwrap();
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let mut argv = vec!["sluice-controller".to_owned()];
    argv.extend(
        container["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_owned()),
    );
    let args = sluice_controller::cli::Args::try_parse_from(&argv)
        .unwrap_or_else(|e| panic!("manifests/base/controller.yaml args {argv:?}: {e}"));
    let ports = container["ports"].as_array().unwrap();
    let port_of = |name: &str| {
        ports
            .iter()
            .find(|p| p["name"] == name)
            .and_then(|p| p["containerPort"].as_u64())
            .unwrap_or_else(|| panic!("no container port {name}"))
    };
    assert_eq!(u64::from(args.metrics_addr.port()), port_of("http-metrics"));
    assert_eq!(u64::from(args.grpc_addr.port()), port_of("grpc-config"));
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
}
