//! The fake API server (sluice-testkit) driven by the real kube client over HTTP, for the
//! behaviours the controller's tests rely on: label-selected and paginated lists,
//! optimistic-concurrency conflicts, merge / JSON / apply patches with field managers, the
//! status subresource, deletion, and watches with bookmarks and `410 Gone`.
//!
//! It lives here rather than in sluice-testkit because the kube client is a dependency of
//! the controller, not of the harness.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use sluice_testkit::fake_apiserver::{FakeApiServer, Options};

fn client(api: &FakeApiServer) -> Client {
    Client::try_from(kube::Config::new(api.url().parse().unwrap())).unwrap()
}

fn pod(name: &str, app: &str) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": app}},
        "spec": {"containers": [{"name": "c", "image": "x"}]}
    }))
    .unwrap()
}

fn status_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

#[tokio::test]
async fn lists_select_by_label_and_paginate() {
    let api = FakeApiServer::start().await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client(&api), "ns");
    for i in 0..5 {
        let app = if i % 2 == 0 { "vllm" } else { "sglang" };
        pods.create(&PostParams::default(), &pod(&format!("p{i}"), app))
            .await
            .unwrap();
    }
    let vllm = pods
        .list(&ListParams::default().labels("app=vllm"))
        .await
        .unwrap();
    let names: Vec<String> = vllm.items.iter().map(|p| p.name_any()).collect();
    assert_eq!(names, ["p0", "p2", "p4"]);
    assert!(
        vllm.metadata.resource_version.is_some(),
        "a list carries the resourceVersion to watch from"
    );
    let not = pods
        .list(&ListParams::default().labels("app notin (vllm)"))
        .await
        .unwrap();
    assert_eq!(not.items.len(), 2);

    let mut seen = Vec::new();
    let mut lp = ListParams::default().limit(2);
    loop {
        let page = pods.list(&lp).await.unwrap();
        assert!(page.items.len() <= 2);
        seen.extend(page.items.iter().map(|p| p.name_any()));
        match page.metadata.continue_ {
            Some(c) if !c.is_empty() => lp = lp.continue_token(&c),
            _ => break,
        }
    }
    assert_eq!(seen, ["p0", "p1", "p2", "p3", "p4"]);
}

#[tokio::test]
async fn writes_conflict_patch_apply_and_delete_like_an_api_server() {
    let api = FakeApiServer::start().await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client(&api), "ns");
    let created = pods
        .create(&PostParams::default(), &pod("p", "vllm"))
        .await
        .unwrap();
    let err = pods
        .create(&PostParams::default(), &pod("p", "vllm"))
        .await
        .unwrap_err();
    assert_eq!(status_code(&err), Some(409), "duplicate create: {err}");

    // Update with a stale resourceVersion conflicts.
    let mut fresh = created.clone();
    fresh.labels_mut().insert("tier".into(), "a".into());
    pods.replace("p", &PostParams::default(), &fresh)
        .await
        .unwrap();
    let mut stale = created.clone();
    stale.labels_mut().insert("tier".into(), "b".into());
    let err = pods
        .replace("p", &PostParams::default(), &stale)
        .await
        .unwrap_err();
    assert_eq!(status_code(&err), Some(409), "stale update: {err}");

    // Merge and JSON patches.
    pods.patch(
        "p",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"zone": "z1"}}})),
    )
    .await
    .unwrap();
    let jp: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": "/metadata/labels/zone", "value": "z1"},
        {"op": "replace", "path": "/metadata/labels/zone", "value": "z2"}
    ]))
    .unwrap();
    let p = pods
        .patch("p", &PatchParams::default(), &Patch::Json::<()>(jp))
        .await
        .unwrap();
    assert_eq!(p.labels()["zone"], "z2");

    // Server-side apply: a second manager touching the same field conflicts unless forced.
    let apply = |v: &str| json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "labels": {"owner": v}}});
    pods.patch("p", &PatchParams::apply("one"), &Patch::Apply(apply("one")))
        .await
        .unwrap();
    let err = pods
        .patch("p", &PatchParams::apply("two"), &Patch::Apply(apply("two")))
        .await
        .unwrap_err();
    assert_eq!(status_code(&err), Some(409), "apply conflict: {err}");
    let p = pods
        .patch(
            "p",
            &PatchParams::apply("two").force(),
            &Patch::Apply(apply("two")),
        )
        .await
        .unwrap();
    assert_eq!(p.labels()["owner"], "two");
    assert!(
        api.managers(
            &sluice_testkit::fake_apiserver::ResourceDef::pods(),
            "ns",
            "p"
        )
        .contains_key("two")
    );

    // The status subresource writes status only; the main resource ignores status.
    let p = pods
        .patch_status(
            "p",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"status": {"podIP": "10.0.0.9"}, "metadata": {"labels": {"sneaky": "x"}}}),
            ),
        )
        .await
        .unwrap();
    assert!(!p.labels().contains_key("sneaky"));
    assert_eq!(p.status.unwrap().pod_ip.as_deref(), Some("10.0.0.9"));
    let p = pods
        .patch(
            "p",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"podIP": "10.0.0.10"}})),
        )
        .await
        .unwrap();
    assert_eq!(p.status.unwrap().pod_ip.as_deref(), Some("10.0.0.9"));

    pods.delete("p", &Default::default()).await.unwrap();
    let err = pods.get("p").await.unwrap_err();
    assert_eq!(status_code(&err), Some(404), "{err}");
}

#[tokio::test]
async fn watches_stream_changes_bookmarks_and_410_after_compaction() {
    let api = FakeApiServer::start_with(Options {
        bookmark_interval: Duration::from_millis(50),
        ..Options::default()
    })
    .await
    .unwrap();
    let pods: Api<Pod> = Api::namespaced(client(&api), "ns");
    let rv = pods
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let mut stream = pods
        .watch(&WatchParams::default().timeout(10), &rv)
        .await
        .unwrap()
        .boxed();
    pods.create(&PostParams::default(), &pod("w", "vllm"))
        .await
        .unwrap();
    pods.delete("w", &Default::default()).await.unwrap();
    let (mut added, mut deleted, mut bookmarks) = (false, false, 0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !(added && deleted && bookmarks > 0) {
        let ev = tokio::time::timeout_at(deadline, stream.try_next())
            .await
            .expect("watch events in time")
            .unwrap()
            .expect("stream open");
        match ev {
            WatchEvent::Added(p) => added = p.name_any() == "w",
            WatchEvent::Deleted(p) => deleted = p.name_any() == "w",
            WatchEvent::Bookmark(_) => bookmarks += 1,
            other => panic!("unexpected {other:?}"),
        }
    }

    // Resuming from a compacted resourceVersion: 410 Gone, in-stream as a real server does.
    api.compact();
    let mut stream = pods
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    let ev = tokio::time::timeout(Duration::from_secs(5), stream.try_next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    match ev {
        WatchEvent::Error(e) => assert_eq!(e.code, 410, "{e:?}"),
        other => panic!("expected 410 Gone, got {other:?}"),
    }
}
