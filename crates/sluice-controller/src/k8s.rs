//! Kubernetes mode: kube-runtime watchers feeding the index.
//!
//! Every watch goes through `DeserializeGuard`, so one object that does not deserialize is
//! logged and skipped instead of wedging its watch. Optional APIs (either group of
//! InferenceObjective / InferenceModelRewrite) are watched only when discovery finds them.
//! After a re-list (`Init` .. `InitDone`) objects missing from the list are deleted from the
//! index. Publishing starts once every watch finished its first list.

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::core::DeserializeGuard;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use sluice_api::{EndpointPickerConfig as EpcResource, InferencePool, llm_d, x_k8s};
use tokio::sync::watch;

use crate::index::{AlphaGroup, Index, ObjKey, PodInfo, objective_from_llm_d, rewrite_from_llm_d};
use crate::runtime::SharedIndex;

/// Which optional APIs the cluster serves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InstalledApis {
    /// `inference.networking.x-k8s.io/v1alpha2` InferenceObjective / InferenceModelRewrite.
    pub x_k8s: (bool, bool),
    /// `llm-d.ai/v1alpha2` InferenceObjective / InferenceModelRewrite.
    pub llm_d: (bool, bool),
    /// sluice's EndpointPickerConfig.
    pub epc: bool,
    /// InferencePool v1.
    pub pool: bool,
}

/// Asks discovery which of the APIs sluice reads are installed.
pub async fn discover(client: &Client) -> InstalledApis {
    async fn has(client: &Client, gv: &str) -> (bool, bool, bool) {
        match client.list_api_group_resources(gv).await {
            Ok(list) => {
                let names: BTreeSet<&str> =
                    list.resources.iter().map(|r| r.name.as_str()).collect();
                (
                    names.contains("inferenceobjectives"),
                    names.contains("inferencemodelrewrites"),
                    names.contains("endpointpickerconfigs") || names.contains("inferencepools"),
                )
            }
            Err(e) => {
                tracing::debug!(group_version = gv, error = %e, "API not installed");
                (false, false, false)
            }
        }
    }
    let x = has(client, "inference.networking.x-k8s.io/v1alpha2").await;
    let l = has(client, "llm-d.ai/v1alpha2").await;
    let epc = has(client, "sluice.dev/v1alpha1").await.2;
    let pool = has(client, "inference.networking.k8s.io/v1").await.2;
    InstalledApis {
        x_k8s: (x.0, x.1),
        llm_d: (l.0, l.1),
        epc,
        pool,
    }
}

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<DeserializeGuard<K>>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope> + DeserializeOwned + Clone + Debug,
    K::DynamicType: Default,
    DeserializeGuard<K>:
        Resource<DynamicType = K::DynamicType, Scope = k8s_openapi::NamespaceResourceScope>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Runs every watcher until `shutdown`. `namespace` restricts everything to one namespace
/// (then a namespaced Role suffices).
pub async fn run(
    client: Client,
    index: SharedIndex,
    namespace: Option<String>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let apis = discover(&client).await;
    if !apis.pool {
        anyhow::bail!(
            "InferencePool (inference.networking.k8s.io/v1) is not installed: apply the CRDs (kubectl apply -k manifests/base)"
        );
    }
    if !apis.epc {
        tracing::warn!(
            "EndpointPickerConfig (sluice.dev/v1alpha1) is not installed; every pool uses the default config"
        );
    }
    if apis.x_k8s.0 && apis.llm_d.0 {
        tracing::warn!(
            "InferenceObjective is installed in both inference.networking.x-k8s.io and llm-d.ai; \
            both are read and llm-d.ai wins name clashes"
        );
    }
    let ns = namespace.as_deref();
    let pending = Arc::new(AtomicUsize::new(0));
    let mut tasks: Vec<futures::future::BoxFuture<'static, ()>> = Vec::new();
    let mut add = |fut: futures::future::BoxFuture<'static, ()>| {
        pending.fetch_add(1, Ordering::SeqCst);
        tasks.push(fut);
    };

    add(Box::pin(watch_kind(
        api::<InferencePool>(&client, ns),
        "inferencepools",
        index.clone(),
        pending.clone(),
        |i, p: &InferencePool| i.apply_pool(p),
        |i, ns, name| i.delete_pool(ns, name),
        |i| i.keys().pools,
    )));
    add(Box::pin(watch_kind(
        api::<Pod>(&client, ns),
        "pods",
        index.clone(),
        pending.clone(),
        |i, p: &Pod| {
            i.apply_pod(
                &p.namespace().unwrap_or_default(),
                &p.name_any(),
                PodInfo::from_pod(p),
            )
        },
        |i, ns, name| i.delete_pod(ns, name),
        |i| i.keys().pods,
    )));
    if apis.epc {
        add(Box::pin(watch_kind(
            api::<EpcResource>(&client, ns),
            "endpointpickerconfigs",
            index.clone(),
            pending.clone(),
            |i, e: &EpcResource| i.apply_epc(e),
            |i, ns, name| i.delete_epc(ns, name),
            |i| i.keys().epcs,
        )));
    }
    let group_keys =
        |set: BTreeSet<(String, String, AlphaGroup)>, g: AlphaGroup| -> BTreeSet<ObjKey> {
            set.into_iter()
                .filter(|k| k.2 == g)
                .map(|(ns, n, _)| (ns, n))
                .collect()
        };
    if apis.x_k8s.0 {
        add(Box::pin(watch_kind(
            api::<x_k8s::InferenceObjective>(&client, ns),
            "inferenceobjectives.inference.networking.x-k8s.io",
            index.clone(),
            pending.clone(),
            |i, o: &x_k8s::InferenceObjective| i.apply_objective(AlphaGroup::XK8s, o),
            |i, ns, name| i.delete_objective(AlphaGroup::XK8s, ns, name),
            move |i| group_keys(i.keys().objectives, AlphaGroup::XK8s),
        )));
    }
    if apis.x_k8s.1 {
        add(Box::pin(watch_kind(
            api::<x_k8s::InferenceModelRewrite>(&client, ns),
            "inferencemodelrewrites.inference.networking.x-k8s.io",
            index.clone(),
            pending.clone(),
            |i, o: &x_k8s::InferenceModelRewrite| i.apply_rewrite(AlphaGroup::XK8s, o),
            |i, ns, name| i.delete_rewrite(AlphaGroup::XK8s, ns, name),
            move |i| group_keys(i.keys().rewrites, AlphaGroup::XK8s),
        )));
    }
    if apis.llm_d.0 {
        add(Box::pin(watch_kind(
            api::<llm_d::InferenceObjective>(&client, ns),
            "inferenceobjectives.llm-d.ai",
            index.clone(),
            pending.clone(),
            |i, o: &llm_d::InferenceObjective| {
                i.apply_objective(AlphaGroup::LlmD, &objective_from_llm_d(o))
            },
            |i, ns, name| i.delete_objective(AlphaGroup::LlmD, ns, name),
            move |i| group_keys(i.keys().objectives, AlphaGroup::LlmD),
        )));
    }
    if apis.llm_d.1 {
        add(Box::pin(watch_kind(
            api::<llm_d::InferenceModelRewrite>(&client, ns),
            "inferencemodelrewrites.llm-d.ai",
            index.clone(),
            pending.clone(),
            |i, o: &llm_d::InferenceModelRewrite| {
                i.apply_rewrite(AlphaGroup::LlmD, &rewrite_from_llm_d(o))
            },
            |i, ns, name| i.delete_rewrite(AlphaGroup::LlmD, ns, name),
            move |i| group_keys(i.keys().rewrites, AlphaGroup::LlmD),
        )));
    }
    let all = futures::future::join_all(tasks);
    tokio::select! {
        _ = all => Ok(()),
        _ = shutdown.changed() => Ok(()),
    }
}

/// One watch: applies events to the index; after each (re-)list deletes what the list did
/// not contain; counts down `pending` after its first list.
async fn watch_kind<K>(
    api: Api<DeserializeGuard<K>>,
    what: &'static str,
    index: SharedIndex,
    pending: Arc<AtomicUsize>,
    apply: impl Fn(&mut Index, &K) + Send + 'static,
    delete: impl Fn(&mut Index, &str, &str) + Send + 'static,
    keys: impl Fn(&Index) -> BTreeSet<ObjKey> + Send + 'static,
) where
    K: Resource + DeserializeOwned + Clone + Debug + Send + Sync + 'static,
    DeserializeGuard<K>: Resource + Clone + Debug + Send + DeserializeOwned + 'static,
    <DeserializeGuard<K> as Resource>::DynamicType: Default,
{
    let mut stream = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut listed: Option<BTreeSet<ObjKey>> = None;
    let mut first_list_done = false;
    while let Some(event) = stream.next().await {
        match event {
            Ok(Event::Apply(obj)) | Ok(Event::InitApply(obj)) => {
                if let Some((key, typed)) = key_of(&obj, what) {
                    if let Some(l) = listed.as_mut() {
                        l.insert(key.clone());
                    }
                    match typed {
                        Some(k) => index.update(|i| apply(i, k)),
                        // An object that became invalid is treated as gone.
                        None => index.update(|i| delete(i, &key.0, &key.1)),
                    }
                }
            }
            Ok(Event::Delete(obj)) => {
                if let Some(((ns, name), _)) = key_of(&obj, what) {
                    index.update(|i| delete(i, &ns, &name));
                }
            }
            Ok(Event::Init) => listed = Some(BTreeSet::new()),
            Ok(Event::InitDone) => {
                if let Some(seen) = listed.take() {
                    index.update(|i| {
                        for (ns, name) in keys(i).difference(&seen) {
                            delete(i, ns, name);
                        }
                    });
                }
                if !first_list_done {
                    first_list_done = true;
                    tracing::info!(resource = what, "initial list done");
                    if pending.fetch_sub(1, Ordering::SeqCst) == 1 {
                        index.set_synced();
                    }
                }
            }
            Err(error) => tracing::warn!(resource = what, %error, "watch error; retrying"),
        }
    }
}

fn key_of<'a, K: Resource>(
    o: &'a DeserializeGuard<K>,
    what: &str,
) -> Option<(ObjKey, Option<&'a K>)> {
    match &o.0 {
        Ok(k) => Some(((k.namespace().unwrap_or_default(), k.name_any()), Some(k))),
        Err(invalid) => {
            tracing::warn!(resource = what, name = ?invalid.metadata.name, namespace = ?invalid.metadata.namespace,
                error = %invalid.error, "object does not deserialize; skipped");
            invalid.metadata.name.clone().map(|n| {
                (
                    (invalid.metadata.namespace.clone().unwrap_or_default(), n),
                    None,
                )
            })
        }
    }
}
