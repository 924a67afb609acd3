//! Cluster mode against the fake API server (real HTTP, real kube client and watchers):
//! resource changes reach a subscribed picker, bad configs get status and keep the last good
//! config, and only the Lease holder writes status.

// Test helpers outside #[test] functions may fail loudly too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use sluice_controller::hub::Hub;
use sluice_controller::runtime::SharedIndex;
use sluice_core::{PoolRef, PoolSnapshot};
use sluice_testkit::fake_apiserver::{FakeApiServer, ResourceDef};
use tokio::sync::watch;

fn pools() -> ResourceDef {
    ResourceDef::namespaced(
        "inference.networking.k8s.io",
        "v1",
        "inferencepools",
        "InferencePool",
    )
}
fn objectives() -> ResourceDef {
    ResourceDef::namespaced(
        "inference.networking.x-k8s.io",
        "v1alpha2",
        "inferenceobjectives",
        "InferenceObjective",
    )
}
fn rewrites() -> ResourceDef {
    ResourceDef::namespaced(
        "inference.networking.x-k8s.io",
        "v1alpha2",
        "inferencemodelrewrites",
        "InferenceModelRewrite",
    )
}
fn epcs() -> ResourceDef {
    ResourceDef::namespaced(
        "sluice.dev",
        "v1alpha1",
        "endpointpickerconfigs",
        "EndpointPickerConfig",
    )
}

async fn fake() -> FakeApiServer {
    let api = FakeApiServer::start().await.unwrap();
    for r in [pools(), objectives(), rewrites(), epcs()] {
        api.register(r);
    }
    api
}

fn client(api: &FakeApiServer) -> kube::Client {
    let cfg = kube::Config::new(api.url().parse().unwrap());
    kube::Client::try_from(cfg).unwrap()
}

fn pool_ref() -> PoolRef {
    PoolRef {
        namespace: "ns".into(),
        name: "pool".into(),
    }
}

fn pool_obj() -> Value {
    json!({"metadata": {"name": "pool"}, "spec": {"selector": {"matchLabels": {"app": "vllm"}},
        "targetPorts": [{"number": 8000}], "endpointPickerRef": {"name": "epp", "port": {"number": 9002}}}})
}

fn pod(name: &str, ip: &str) -> Value {
    json!({"metadata": {"name": name, "labels": {"app": "vllm"}},
           "spec": {"containers": [{"name": "c", "image": "x"}]},
           "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]}})
}

fn epc(plugin_ref: &str) -> Value {
    json!({"metadata": {"name": "cfg"}, "spec": {"poolRef": {"name": "pool"},
        "plugins": [{"type": "queue-scorer"}, {"type": "max-score-picker"}],
        "schedulingProfiles": [{"name": "default", "plugins": [{"pluginRef": plugin_ref}, {"pluginRef": "max-score-picker"}]}]}})
}

struct Ctl {
    hub: Hub,
    _stop: watch::Sender<bool>,
}

fn start_controller(api: &FakeApiServer, leader: Option<watch::Receiver<bool>>) -> Ctl {
    let hub = Hub::new();
    let index = SharedIndex::new(sluice_controller::default_validator());
    let (stop_tx, stop) = watch::channel(false);
    tokio::spawn(index.clone().run_compiler(hub.clone(), stop.clone()));
    let c = client(api);
    tokio::spawn(sluice_controller::k8s::run(
        c.clone(),
        index.clone(),
        None,
        stop.clone(),
    ));
    if let Some(leader) = leader {
        tokio::spawn(sluice_controller::status::run(
            c,
            "test".into(),
            index,
            hub.clone(),
            leader,
            stop,
            sluice_controller::status::Timing {
                min_interval: Duration::from_millis(10),
                resync: Duration::from_secs(60),
            },
        ));
    }
    Ctl {
        hub,
        _stop: stop_tx,
    }
}

async fn until(hub: &Hub, what: &str, f: impl Fn(&PoolSnapshot) -> bool) -> Arc<PoolSnapshot> {
    let mut rx = hub.subscribe(&pool_ref(), "test-observer", 0, 0);
    let got = tokio::time::timeout(
        Duration::from_secs(5),
        rx.wait_for(|s| s.as_ref().is_some_and(|s| f(s))),
    )
    .await;
    match got {
        Ok(Ok(s)) => s.clone().unwrap(),
        _ => panic!(
            "timed out waiting for: {what}; last: {:?}",
            hub.current(&pool_ref())
        ),
    }
}

async fn eventually(what: &str, f: impl Fn() -> bool) {
    for _ in 0..500 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for: {what}");
}

fn ports(s: &PoolSnapshot) -> Vec<String> {
    s.endpoints.iter().map(|e| e.address.to_string()).collect()
}

#[tokio::test]
async fn creating_changing_and_deleting_each_kind_changes_what_pickers_receive() {
    let api = fake().await;
    api.create(&pools(), "ns", pool_obj()).unwrap();
    api.create(&ResourceDef::pods(), "ns", pod("p1", "10.0.0.1"))
        .unwrap();
    let ctl = start_controller(&api, None);
    until(&ctl.hub, "initial pod", |s| ports(s) == ["10.0.0.1:8000"]).await;

    // Pods: add, become unready, delete.
    api.create(&ResourceDef::pods(), "ns", pod("p2", "10.0.0.2"))
        .unwrap();
    until(&ctl.hub, "second pod", |s| s.endpoints.len() == 2).await;
    api.merge(
        &ResourceDef::pods(),
        "ns",
        "p2",
        json!({"status": {"conditions": [{"type": "Ready", "status": "False"}]}}),
        true,
    )
    .unwrap();
    until(&ctl.hub, "unready pod removed", |s| {
        ports(s) == ["10.0.0.1:8000"]
    })
    .await;
    api.delete(&ResourceDef::pods(), "ns", "p1").unwrap();
    until(&ctl.hub, "deleted pod removed", |s| s.endpoints.is_empty()).await;
    api.merge(
        &ResourceDef::pods(),
        "ns",
        "p2",
        json!({"status": {"conditions": [{"type": "Ready", "status": "True"}]}}),
        true,
    )
    .unwrap();

    // Pool: change the target port.
    api.merge(
        &pools(),
        "ns",
        "pool",
        json!({"spec": {"targetPorts": [{"number": 9000}]}}),
        false,
    )
    .unwrap();
    until(&ctl.hub, "new target port", |s| {
        ports(s) == ["10.0.0.2:9000"]
    })
    .await;

    // Objective: create, change, delete.
    api.create(&objectives(), "ns", json!({"metadata": {"name": "batch"}, "spec": {"priority": -1, "poolRef": {"name": "pool"}}})).unwrap();
    until(&ctl.hub, "objective", |s| {
        s.objective("batch").is_some_and(|o| o.is_sheddable())
    })
    .await;
    api.merge(
        &objectives(),
        "ns",
        "batch",
        json!({"spec": {"priority": 4}}),
        false,
    )
    .unwrap();
    until(&ctl.hub, "objective priority", |s| {
        s.objective("batch").is_some_and(|o| o.priority == 4)
    })
    .await;
    api.delete(&objectives(), "ns", "batch").unwrap();
    until(&ctl.hub, "objective gone", |s| s.objectives.is_empty()).await;

    // Rewrite: create, delete.
    api.create(
        &rewrites(),
        "ns",
        json!({"metadata": {"name": "rw"}, "spec": {"poolRef": {"name": "pool"},
        "rules": [{"matches": [{"model": {"value": "a"}}], "targets": [{"modelRewrite": "b"}]}]}}),
    )
    .unwrap();
    until(&ctl.hub, "rewrite", |s| {
        s.rewrites.len() == 1 && s.rewrites[0].targets[0].model_rewrite == "b"
    })
    .await;
    api.delete(&rewrites(), "ns", "rw").unwrap();
    until(&ctl.hub, "rewrite gone", |s| s.rewrites.is_empty()).await;

    // Picker config: create, delete (back to the default).
    api.create(&epcs(), "ns", epc("queue-scorer")).unwrap();
    until(&ctl.hub, "picker config", |s| {
        s.picker_config.plugins.len() == 2
    })
    .await;
    api.delete(&epcs(), "ns", "cfg").unwrap();
    until(&ctl.hub, "default picker config", |s| {
        s.picker_config.plugins.is_empty()
    })
    .await;

    // A forced re-list (410 Gone) loses nothing and picks up what changed meanwhile.
    api.compact();
    api.create(&ResourceDef::pods(), "ns", pod("p3", "10.0.0.3"))
        .unwrap();
    until(&ctl.hub, "pod after compaction", |s| s.endpoints.len() == 2).await;

    // Pool deleted: pickers get an empty config.
    api.delete(&pools(), "ns", "pool").unwrap();
    until(&ctl.hub, "pool deleted", |s| s.endpoints.is_empty()).await;
}

#[tokio::test]
async fn an_object_that_does_not_deserialize_is_skipped_without_wedging_the_watch() {
    let api = fake().await;
    api.create(&pools(), "ns", pool_obj()).unwrap();
    api.create(&objectives(), "ns", json!({"metadata": {"name": "broken"}, "spec": {"priority": "high", "poolRef": {"name": "pool"}}})).unwrap();
    api.create(
        &objectives(),
        "ns",
        json!({"metadata": {"name": "good"}, "spec": {"priority": 1, "poolRef": {"name": "pool"}}}),
    )
    .unwrap();
    let ctl = start_controller(&api, None);
    until(&ctl.hub, "good objective", |s| {
        s.objective("good").is_some() && s.objective("broken").is_none()
    })
    .await;
    api.create(
        &objectives(),
        "ns",
        json!({"metadata": {"name": "later"}, "spec": {"poolRef": {"name": "pool"}}}),
    )
    .unwrap();
    until(&ctl.hub, "later objective", |s| {
        s.objective("later").is_some()
    })
    .await;
}

fn accepted(obj: &Value) -> Option<(String, String, String)> {
    let c = obj
        .pointer("/status/conditions")?
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Accepted")?;
    Some((
        c["status"].as_str()?.to_owned(),
        c["reason"].as_str()?.to_owned(),
        c["message"].as_str()?.to_owned(),
    ))
}

#[tokio::test]
async fn a_bad_config_gets_a_status_condition_and_pickers_keep_the_last_good_one() {
    let api = fake().await;
    api.create(&pools(), "ns", pool_obj()).unwrap();
    api.create(&epcs(), "ns", epc("queue-scorer")).unwrap();
    api.create(
        &objectives(),
        "ns",
        json!({"metadata": {"name": "chat"}, "spec": {"poolRef": {"name": "pool"}}}),
    )
    .unwrap();
    let (_leader_tx, leader) = watch::channel(true);
    let ctl = start_controller(&api, Some(leader));
    let good = until(&ctl.hub, "good config", |s| {
        s.picker_config.plugins.len() == 2
    })
    .await;
    eventually("Accepted=True", || {
        accepted(&api.get(&epcs(), "ns", "cfg").unwrap())
            .is_some_and(|(s, r, _)| s == "True" && r == "Accepted")
    })
    .await;
    eventually("objective accepted", || {
        api.get(&objectives(), "ns", "chat")
            .and_then(|o| accepted(&o))
            .is_some_and(|(s, _, _)| s == "True")
    })
    .await;

    api.merge(&epcs(), "ns", "cfg", epc("missing-plugin"), false)
        .unwrap();
    eventually("InvalidConfig condition", || {
        accepted(&api.get(&epcs(), "ns", "cfg").unwrap()).is_some_and(|(s, r, m)| {
            s == "False" && r == "InvalidConfig" && m.contains("missing-plugin")
        })
    })
    .await;
    let obj = api.get(&epcs(), "ns", "cfg").unwrap();
    assert_eq!(
        obj["status"]["observedGeneration"],
        obj["metadata"]["generation"]
    );
    assert_eq!(
        ctl.hub.current(&pool_ref()).unwrap().picker_config,
        good.picker_config,
        "last good config stays"
    );
    eventually("a Warning event", || {
        api.list(&ResourceDef::events())
            .iter()
            .any(|e| e["reason"] == "ConfigRejected" && e["type"] == "Warning")
    })
    .await;
    let managers = api.managers(&epcs(), "ns", "cfg");
    assert!(
        managers
            .get("sluice-controller")
            .is_some_and(|p| p.iter().any(|p| p.starts_with("status."))),
        "{managers:?}"
    );
}

#[tokio::test]
async fn only_the_leader_writes_status_and_a_new_leader_takes_over_when_the_lease_lapses() {
    let api = fake().await;
    api.create(&pools(), "ns", pool_obj()).unwrap();
    api.create(&epcs(), "ns", epc("queue-scorer")).unwrap();

    // Two replicas with real Lease election (2 s leases).
    let (_stop_a_tx, stop_a) = watch::channel(false);
    let election_a = sluice_controller::leader::elect(client(&api), "ns", "sluice", "a", 2, stop_a)
        .await
        .unwrap();
    let leader_a = election_a.leader.clone();
    let mut wait_a = leader_a.clone();
    tokio::time::timeout(Duration::from_secs(5), wait_a.wait_for(|l| *l))
        .await
        .unwrap()
        .unwrap();
    let (_stop_b_tx, stop_b) = watch::channel(false);
    let leader_b = sluice_controller::leader::elect(client(&api), "ns", "sluice", "b", 2, stop_b)
        .await
        .unwrap()
        .leader;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        *leader_a.borrow() && !*leader_b.borrow(),
        "exactly one leader"
    );

    // Replica B alone writes nothing while it is not the leader.
    let _b = start_controller(&api, Some(leader_b.clone()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        accepted(&api.get(&epcs(), "ns", "cfg").unwrap()).is_none(),
        "a non-leader wrote status"
    );
    assert!(
        !api.requests()
            .iter()
            .any(|r| r.path.ends_with("/status") && r.method == "PATCH")
    );

    // A stops renewing (its process dies without releasing): B takes over after the lease lapses.
    election_a.abandon();
    let mut wait_b = leader_b.clone();
    tokio::time::timeout(Duration::from_secs(10), wait_b.wait_for(|l| *l))
        .await
        .expect("B never became leader")
        .unwrap();
    eventually("status written by the new leader", || {
        accepted(&api.get(&epcs(), "ns", "cfg").unwrap()).is_some()
    })
    .await;
}

#[tokio::test]
async fn rewrites_are_pending_without_their_pool_and_accepted_with_it() {
    let api = fake().await;
    api.create(
        &rewrites(),
        "ns",
        json!({"metadata": {"name": "alias"}, "spec": {"poolRef": {"name": "pool"},
            "rules": [{"targets": [{"modelRewrite": "llama", "weight": 1}]}]}}),
    )
    .unwrap();
    let (_leader_tx, leader) = watch::channel(true);
    let _ctl = start_controller(&api, Some(leader));
    eventually("rewrite Pending while the pool is missing", || {
        api.get(&rewrites(), "ns", "alias")
            .and_then(|o| accepted(&o))
            .is_some_and(|(s, r, m)| s == "False" && r == "Pending" && m.contains("ns/pool"))
    })
    .await;
    api.create(&pools(), "ns", pool_obj()).unwrap();
    eventually("rewrite Accepted once the pool exists", || {
        api.get(&rewrites(), "ns", "alias")
            .and_then(|o| accepted(&o))
            .is_some_and(|(s, r, _)| s == "True" && r == "Accepted")
    })
    .await;
    let obj = api.get(&rewrites(), "ns", "alias").unwrap();
    let cond = &obj["status"]["conditions"][0];
    assert_eq!(cond["observedGeneration"], obj["metadata"]["generation"]);
    let managers = api.managers(&rewrites(), "ns", "alias");
    assert!(
        managers
            .get("sluice-controller")
            .is_some_and(|p| p.iter().any(|p| p.starts_with("status."))),
        "status is written by server-side apply under sluice's field manager: {managers:?}"
    );
}
