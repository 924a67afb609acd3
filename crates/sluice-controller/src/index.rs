//! The in-memory index the watches (or the manifest directory) feed, and the compiler that
//! turns one pool's slice of it into a [`PoolSnapshot`].
//!
//! ```text
//! [ Pod ] --labels--> [ InferencePool ] <--poolRef-- [ InferenceObjective ]
//!                            ^   ^------poolRef----- [ InferenceModelRewrite ]
//!                            +----------poolRef----- [ EndpointPickerConfig ]
//! ```
//!
//! Mutations are synchronous and only mark pools dirty; [`Index::compile_dirty`] then
//! recompiles each dirty pool once, so a burst of events (an initial list of 10,000 pods)
//! costs one compile per pool, not one per event.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use sluice_api::alpha::{InferenceModelRewriteRule, PoolObjectReference};
use sluice_api::{
    EndpointPickerConfig as EpcResource, InferencePool, InferencePoolSpec, llm_d, x_k8s,
};
use sluice_core::endpoint::ACTIVE_PORTS_ANNOTATION;
use sluice_core::snapshot::AppProtocol;
use sluice_core::{
    Endpoint, EndpointKey, EndpointPickerConfig, ModelRewriteRule, Objective, PoolRef,
    PoolSnapshot, RewriteTarget,
};

/// Validates a picker config before it may reach a picker; the error says what is wrong.
pub type Validator = Arc<dyn Fn(&EndpointPickerConfig) -> Result<(), String> + Send + Sync>;

/// Which API group an InferenceObjective / InferenceModelRewrite came from. When both
/// groups define the same name in a namespace, `llm-d.ai` wins (llm-d-router's rule).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AlphaGroup {
    /// `inference.networking.x-k8s.io`.
    XK8s,
    /// `llm-d.ai`.
    LlmD,
}

impl AlphaGroup {
    /// The API group's name.
    pub fn api_group(self) -> &'static str {
        match self {
            AlphaGroup::XK8s => "inference.networking.x-k8s.io",
            AlphaGroup::LlmD => "llm-d.ai",
        }
    }
}

/// What the index keeps of a Pod (not the whole object: 10,000 pods must fit in little
/// memory).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    /// `status.podIP`.
    pub ip: Option<IpAddr>,
    /// Condition `Ready` is `True` and no deletion is pending.
    pub ready: bool,
    /// Labels, copied onto endpoints.
    pub labels: BTreeMap<String, String>,
    /// The active-ports annotation, parsed; `None` when absent.
    pub active_ports: Option<BTreeSet<u16>>,
}

impl PodInfo {
    /// Extracts what the index needs from a Pod.
    pub fn from_pod(pod: &Pod) -> Self {
        let status = pod.status.as_ref();
        let ip = status
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|ip| ip.parse().ok());
        let condition_ready = status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        let ready = condition_ready && pod.metadata.deletion_timestamp.is_none();
        let active_ports = pod.annotations().get(ACTIVE_PORTS_ANNOTATION).map(|v| {
            v.split(',')
                .filter_map(|p| p.trim().parse::<u16>().ok())
                .collect::<BTreeSet<_>>()
        });
        PodInfo {
            ip,
            ready,
            labels: pod.labels().clone(),
            active_ports,
        }
    }
}

#[derive(Clone, Debug)]
struct ObjectMeta {
    generation: Option<i64>,
    /// RFC 3339, for "oldest wins" ordering.
    created: String,
}

fn meta_of(m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> ObjectMeta {
    ObjectMeta {
        generation: m.generation,
        created: m
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.to_string())
            .unwrap_or_default(),
    }
}

#[derive(Clone, Debug)]
struct ObjectiveEntry {
    meta: ObjectMeta,
    pool_ref: PoolObjectReference,
    priority: i32,
}

#[derive(Clone, Debug)]
struct RewriteEntry {
    meta: ObjectMeta,
    pool_ref: PoolObjectReference,
    rules: Vec<InferenceModelRewriteRule>,
}

#[derive(Clone, Debug)]
struct EpcEntry {
    meta: ObjectMeta,
    pool: String,
    config: EndpointPickerConfig,
    /// The validator's answer, computed once when the object changes: the loader builds
    /// every plugin, which is too costly to repeat on each pod event's recompile.
    valid: Result<(), String>,
}

/// Namespace and name.
pub type ObjKey = (String, String);

/// The verdict on one EndpointPickerConfig resource, for its status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EpcVerdict {
    /// In use by its pool (the published snapshot carries it).
    Accepted {
        /// The pool version that carries it (0 before the pool was ever published).
        version: u64,
    },
    /// Validation failed; the pool keeps its last good config.
    Invalid(String),
    /// `poolRef` names no pool.
    PoolNotFound,
    /// An older EndpointPickerConfig configures the same pool.
    Conflict(String),
}

/// Status-relevant facts about one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectStatus<V> {
    /// `metadata.generation` at the time of the verdict.
    pub generation: Option<i64>,
    /// The pool the object refers to.
    pub pool: PoolRef,
    /// The verdict.
    pub verdict: V,
}

/// The index.
pub struct Index {
    pools: BTreeMap<ObjKey, InferencePoolSpec>,
    pods: BTreeMap<String, BTreeMap<String, PodInfo>>,
    objectives: BTreeMap<(String, String, AlphaGroup), ObjectiveEntry>,
    rewrites: BTreeMap<(String, String, AlphaGroup), RewriteEntry>,
    epcs: BTreeMap<ObjKey, EpcEntry>,
    dirty: BTreeSet<PoolRef>,
    /// Per pool: the last config that passed validation, and its source generation.
    last_good: BTreeMap<PoolRef, EndpointPickerConfig>,
    /// Per EndpointPickerConfig: its verdict at the last compile.
    epc_verdicts: BTreeMap<ObjKey, ObjectStatus<EpcVerdict>>,
    validator: Validator,
    stats: IndexStats,
}

/// Running totals of the index, for the metrics endpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IndexStats {
    /// Pool compiles.
    pub compiles: u64,
    /// EndpointPickerConfig changes that failed validation.
    pub config_rejections: u64,
    /// Compiles that published nothing (invalid config and no earlier good one).
    pub withheld: u64,
}

impl std::fmt::Debug for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Index")
            .field("pools", &self.pools.len())
            .field(
                "pods",
                &self.pods.values().map(BTreeMap::len).sum::<usize>(),
            )
            .field("objectives", &self.objectives.len())
            .field("rewrites", &self.rewrites.len())
            .field("epcs", &self.epcs.len())
            .finish()
    }
}

/// The result of compiling a pool.
#[derive(Clone, Debug)]
pub enum Compiled {
    /// Publish this (version is assigned by the hub).
    Publish(PoolSnapshot),
    /// The pool was deleted: publish an empty snapshot so pickers stop routing to its pods
    /// (upstream clears its datastore when the pool goes away).
    Deleted(PoolSnapshot),
    /// Nothing publishable: the bound config is invalid and there was never a good one.
    Withheld(String),
}

impl Index {
    /// An empty index validating picker configs with `validator`.
    pub fn new(validator: Validator) -> Self {
        Index {
            pools: BTreeMap::new(),
            pods: BTreeMap::new(),
            objectives: BTreeMap::new(),
            rewrites: BTreeMap::new(),
            epcs: BTreeMap::new(),
            dirty: BTreeSet::new(),
            last_good: BTreeMap::new(),
            epc_verdicts: BTreeMap::new(),
            validator,
            stats: IndexStats::default(),
        }
    }

    /// Running totals (compiles, rejected configs).
    pub fn stats(&self) -> IndexStats {
        self.stats
    }

    /// How many pools the index holds.
    pub fn pool_count(&self) -> usize {
        self.pools.len()
    }

    /// How many EndpointPickerConfigs are invalid now (by their last verdict).
    pub fn invalid_config_count(&self) -> usize {
        self.epc_verdicts
            .values()
            .filter(|v| matches!(v.verdict, EpcVerdict::Invalid(_)))
            .count()
    }

    /// How many pods the index holds.
    pub fn pod_count(&self) -> usize {
        self.pods.values().map(BTreeMap::len).sum()
    }

    fn mark_pool(&mut self, ns: &str, name: &str) {
        self.dirty.insert(PoolRef {
            namespace: ns.to_owned(),
            name: name.to_owned(),
        });
    }

    /// Whether any pool waits for a compile.
    pub fn has_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    // === pools ===

    /// Adds or changes a pool.
    pub fn apply_pool(&mut self, pool: &InferencePool) {
        let key = (pool.namespace().unwrap_or_default(), pool.name_any());
        if self.pools.get(&key) != Some(&pool.spec) {
            self.pools.insert(key.clone(), pool.spec.clone());
            self.mark_pool(&key.0, &key.1);
        }
    }

    /// Removes a pool.
    pub fn delete_pool(&mut self, ns: &str, name: &str) {
        if self
            .pools
            .remove(&(ns.to_owned(), name.to_owned()))
            .is_some()
        {
            self.mark_pool(ns, name);
        }
    }

    /// Every pool's key.
    pub fn pool_keys(&self) -> Vec<ObjKey> {
        self.pools.keys().cloned().collect()
    }

    // === pods ===

    /// Adds or changes a pod; only pools in its namespace whose selector matches the old or
    /// the new labels are recompiled.
    pub fn apply_pod(&mut self, ns: &str, name: &str, info: PodInfo) {
        let pods = self.pods.entry(ns.to_owned()).or_default();
        let old = pods.insert(name.to_owned(), info.clone());
        if old.as_ref() == Some(&info) {
            return;
        }
        self.mark_pools_selecting(ns, old.as_ref(), Some(&info));
    }

    /// Removes a pod.
    pub fn delete_pod(&mut self, ns: &str, name: &str) {
        let old = self.pods.get_mut(ns).and_then(|p| p.remove(name));
        if old.is_some() {
            self.mark_pools_selecting(ns, old.as_ref(), None);
        }
    }

    fn mark_pools_selecting(&mut self, ns: &str, old: Option<&PodInfo>, new: Option<&PodInfo>) {
        let hit: Vec<PoolRef> = self
            .pools
            .iter()
            .filter(|((n, _), spec)| {
                n == ns
                    && [old, new]
                        .into_iter()
                        .flatten()
                        .any(|p| selects(spec, &p.labels))
            })
            .map(|((n, name), _)| PoolRef {
                namespace: n.clone(),
                name: name.clone(),
            })
            .collect();
        self.dirty.extend(hit);
    }

    /// Replaces every pod of the index (after a re-list).
    pub fn retain_pods(&mut self, keep: &BTreeSet<ObjKey>) {
        let gone: Vec<ObjKey> = self
            .pods
            .iter()
            .flat_map(|(ns, pods)| pods.keys().map(move |n| (ns.clone(), n.clone())))
            .filter(|k| !keep.contains(k))
            .collect();
        for (ns, name) in gone {
            self.delete_pod(&ns, &name);
        }
    }

    // === objectives, rewrites, picker configs ===

    /// Adds or changes an InferenceObjective of either group.
    pub fn apply_objective(&mut self, group: AlphaGroup, obj: &x_k8s::InferenceObjective) {
        let ns = obj.namespace().unwrap_or_default();
        let entry = ObjectiveEntry {
            meta: meta_of(&obj.metadata),
            pool_ref: obj.spec.pool_ref.clone(),
            priority: obj.spec.effective_priority(),
        };
        if let Some(old) = self
            .objectives
            .insert((ns.clone(), obj.name_any(), group), entry)
        {
            self.mark_pool(&ns, &old.pool_ref.name);
        }
        self.mark_pool(&ns, &obj.spec.pool_ref.name);
    }

    /// Removes an InferenceObjective.
    pub fn delete_objective(&mut self, group: AlphaGroup, ns: &str, name: &str) {
        if let Some(old) = self
            .objectives
            .remove(&(ns.to_owned(), name.to_owned(), group))
        {
            self.mark_pool(ns, &old.pool_ref.name);
        }
    }

    /// Adds or changes an InferenceModelRewrite of either group.
    pub fn apply_rewrite(&mut self, group: AlphaGroup, obj: &x_k8s::InferenceModelRewrite) {
        let ns = obj.namespace().unwrap_or_default();
        let entry = RewriteEntry {
            meta: meta_of(&obj.metadata),
            pool_ref: obj.spec.pool_ref.clone(),
            rules: obj.spec.rules.clone(),
        };
        if let Some(old) = self
            .rewrites
            .insert((ns.clone(), obj.name_any(), group), entry)
        {
            self.mark_pool(&ns, &old.pool_ref.name);
        }
        self.mark_pool(&ns, &obj.spec.pool_ref.name);
    }

    /// Removes an InferenceModelRewrite.
    pub fn delete_rewrite(&mut self, group: AlphaGroup, ns: &str, name: &str) {
        if let Some(old) = self
            .rewrites
            .remove(&(ns.to_owned(), name.to_owned(), group))
        {
            self.mark_pool(ns, &old.pool_ref.name);
        }
    }

    /// Adds or changes an EndpointPickerConfig.
    pub fn apply_epc(&mut self, obj: &EpcResource) {
        let ns = obj.namespace().unwrap_or_default();
        let key = (ns.clone(), obj.name_any());
        let valid = match self.epcs.get(&key) {
            Some(old) if old.config == obj.spec.config => old.valid.clone(),
            _ => {
                let valid = (self.validator)(&obj.spec.config);
                if valid.is_err() {
                    self.stats.config_rejections += 1;
                }
                valid
            }
        };
        let entry = EpcEntry {
            meta: meta_of(&obj.metadata),
            pool: obj.spec.pool_ref.name.clone(),
            config: obj.spec.config.clone(),
            valid,
        };
        if let Some(old) = self.epcs.insert(key, entry) {
            self.mark_pool(&ns, &old.pool);
        }
        self.mark_pool(&ns, &obj.spec.pool_ref.name);
    }

    /// Removes an EndpointPickerConfig.
    pub fn delete_epc(&mut self, ns: &str, name: &str) {
        let key = (ns.to_owned(), name.to_owned());
        if let Some(old) = self.epcs.remove(&key) {
            self.epc_verdicts.remove(&key);
            self.mark_pool(ns, &old.pool);
        }
    }

    /// Every (group, namespace, name) of the objectives, rewrites and picker configs held;
    /// used to delete what a re-list or a manifest reload no longer has.
    pub fn keys(&self) -> IndexKeys {
        IndexKeys {
            pools: self.pools.keys().cloned().collect(),
            pods: self
                .pods
                .iter()
                .flat_map(|(ns, p)| p.keys().map(move |n| (ns.clone(), n.clone())))
                .collect(),
            objectives: self.objectives.keys().cloned().collect(),
            rewrites: self.rewrites.keys().cloned().collect(),
            epcs: self.epcs.keys().cloned().collect(),
        }
    }

    // === compile ===

    /// Compiles every dirty pool.
    pub fn compile_dirty(&mut self) -> Vec<(PoolRef, Compiled)> {
        let dirty = std::mem::take(&mut self.dirty);
        dirty
            .into_iter()
            .map(|p| (p.clone(), self.compile(&p)))
            .collect()
    }

    /// Marks every pool dirty (after a restart of the compile loop).
    pub fn mark_all(&mut self) {
        let all: Vec<PoolRef> = self
            .pools
            .keys()
            .map(|(ns, name)| PoolRef {
                namespace: ns.clone(),
                name: name.clone(),
            })
            .collect();
        self.dirty.extend(all);
    }

    /// Compiles one pool.
    pub fn compile(&mut self, pool: &PoolRef) -> Compiled {
        self.stats.compiles += 1;
        self.judge_epcs(pool);
        let key = (pool.namespace.clone(), pool.name.clone());
        let Some(spec) = self.pools.get(&key).cloned() else {
            return Compiled::Deleted(PoolSnapshot::new(
                pool.clone(),
                0,
                AppProtocol::Http,
                vec![],
                vec![],
                vec![],
                EndpointPickerConfig::default(),
            ));
        };
        let picker_config = match self.bound_epc(pool) {
            None => EndpointPickerConfig::default(),
            Some((epc_key, entry)) => match entry.valid.clone() {
                Ok(()) => {
                    self.last_good.insert(pool.clone(), entry.config.clone());
                    entry.config
                }
                Err(error) => {
                    tracing::warn!(pool = %pool, config = %format!("{}/{}", epc_key.0, epc_key.1), %error,
                        "EndpointPickerConfig rejected; pickers keep the last good config");
                    match self.last_good.get(pool) {
                        Some(good) => good.clone(),
                        None => {
                            self.stats.withheld += 1;
                            return Compiled::Withheld(format!(
                                "EndpointPickerConfig {}/{} is invalid and the pool has no previous valid config: {error}",
                                epc_key.0, epc_key.1
                            ));
                        }
                    }
                }
            },
        };
        Compiled::Publish(PoolSnapshot::new(
            pool.clone(),
            0,
            spec.app_protocol.into(),
            self.endpoints(&pool.namespace, &spec),
            self.objectives_of(pool),
            self.rewrites_of(pool),
            picker_config,
        ))
    }

    /// The EndpointPickerConfig bound to a pool: the oldest one naming it.
    fn bound_epc(&self, pool: &PoolRef) -> Option<(ObjKey, EpcEntry)> {
        self.epcs
            .iter()
            .filter(|((ns, _), e)| *ns == pool.namespace && e.pool == pool.name)
            .min_by(|a, b| (&a.1.meta.created, &a.0.1).cmp(&(&b.1.meta.created, &b.0.1)))
            .map(|(k, e)| (k.clone(), e.clone()))
    }

    fn judge_epcs(&mut self, pool: &PoolRef) {
        let exists = self
            .pools
            .contains_key(&(pool.namespace.clone(), pool.name.clone()));
        let bound = self.bound_epc(pool).map(|(k, _)| k);
        let mine: Vec<(ObjKey, EpcEntry)> = self
            .epcs
            .iter()
            .filter(|((ns, _), e)| *ns == pool.namespace && e.pool == pool.name)
            .map(|(k, e)| (k.clone(), e.clone()))
            .collect();
        for (key, entry) in mine {
            let verdict = if !exists {
                EpcVerdict::PoolNotFound
            } else if Some(&key) != bound.as_ref() {
                let winner = bound.as_ref().map(|(_, n)| n.clone()).unwrap_or_default();
                EpcVerdict::Conflict(format!(
                    "EndpointPickerConfig {winner} is older and already configures pool {}",
                    pool.name
                ))
            } else {
                match entry.valid {
                    Ok(()) => EpcVerdict::Accepted { version: 0 },
                    Err(e) => EpcVerdict::Invalid(e),
                }
            };
            self.epc_verdicts.insert(
                key,
                ObjectStatus {
                    generation: entry.meta.generation,
                    pool: pool.clone(),
                    verdict,
                },
            );
        }
    }

    /// The verdicts on every EndpointPickerConfig at its last compile.
    pub fn epc_verdicts(&self) -> &BTreeMap<ObjKey, ObjectStatus<EpcVerdict>> {
        &self.epc_verdicts
    }

    /// Every InferenceObjective with its pool and whether that pool exists.
    pub fn objective_statuses(&self) -> Vec<(AlphaGroup, ObjKey, ObjectStatus<bool>)> {
        self.objectives
            .iter()
            .map(|((ns, name, group), e)| {
                let pool = PoolRef {
                    namespace: ns.clone(),
                    name: e.pool_ref.name.clone(),
                };
                let exists = e.pool_ref.refers_to_pool(&e.pool_ref.name)
                    && self
                        .pools
                        .contains_key(&(ns.clone(), e.pool_ref.name.clone()));
                (
                    *group,
                    (ns.clone(), name.clone()),
                    ObjectStatus {
                        generation: e.meta.generation,
                        pool,
                        verdict: exists,
                    },
                )
            })
            .collect()
    }

    /// Every InferenceModelRewrite with its pool and whether that pool exists.
    pub fn rewrite_statuses(&self) -> Vec<(AlphaGroup, ObjKey, ObjectStatus<bool>)> {
        self.rewrites
            .iter()
            .map(|((ns, name, group), e)| {
                let exists = e.pool_ref.refers_to_pool(&e.pool_ref.name)
                    && self
                        .pools
                        .contains_key(&(ns.clone(), e.pool_ref.name.clone()));
                (
                    *group,
                    (ns.clone(), name.clone()),
                    ObjectStatus {
                        generation: e.meta.generation,
                        pool: PoolRef {
                            namespace: ns.clone(),
                            name: e.pool_ref.name.clone(),
                        },
                        verdict: exists,
                    },
                )
            })
            .collect()
    }

    fn endpoints(&self, ns: &str, spec: &InferencePoolSpec) -> Vec<Endpoint> {
        let Some(pods) = self.pods.get(ns) else {
            return Vec::new();
        };
        let ns_arc: Arc<str> = ns.into();
        let mut out = Vec::new();
        for (name, pod) in pods {
            let (Some(ip), true) = (pod.ip, pod.ready) else {
                continue;
            };
            if !selects(spec, &pod.labels) {
                continue;
            }
            let pod_arc: Arc<str> = name.as_str().into();
            for (rank, port) in spec.target_ports.iter().enumerate() {
                let Ok(port) = u16::try_from(port.number) else {
                    continue;
                };
                if pod
                    .active_ports
                    .as_ref()
                    .is_some_and(|active| !active.contains(&port))
                {
                    continue;
                }
                let address = SocketAddr::new(ip, port);
                out.push(Endpoint {
                    key: EndpointKey {
                        namespace: ns_arc.clone(),
                        pod: pod_arc.clone(),
                        rank: rank as u32,
                    },
                    address,
                    metrics_address: address,
                    labels: pod.labels.clone(),
                });
            }
        }
        out
    }

    fn objectives_of(&self, pool: &PoolRef) -> Vec<Objective> {
        let mut by_name: BTreeMap<&str, (AlphaGroup, i32)> = BTreeMap::new();
        for ((ns, name, group), e) in &self.objectives {
            if *ns != pool.namespace || !e.pool_ref.refers_to_pool(&pool.name) {
                continue;
            }
            let slot = by_name.entry(name.as_str()).or_insert((*group, e.priority));
            if *group >= slot.0 {
                *slot = (*group, e.priority);
            }
        }
        by_name
            .into_iter()
            .map(|(name, (_, priority))| Objective {
                name: name.to_owned(),
                priority,
            })
            .collect()
    }

    fn rewrites_of(&self, pool: &PoolRef) -> Vec<ModelRewriteRule> {
        let mut sources: Vec<(&String, &String, &RewriteEntry)> = self
            .rewrites
            .iter()
            .filter(|((ns, _, _), e)| {
                *ns == pool.namespace && e.pool_ref.refers_to_pool(&pool.name)
            })
            .map(|((ns, name, _), e)| (ns, name, e))
            .collect();
        // Oldest resource first: its rules take precedence.
        sources.sort_by(|a, b| (&a.2.meta.created, a.1).cmp(&(&b.2.meta.created, b.1)));
        let mut out = Vec::new();
        for (ns, name, e) in sources {
            for rule in &e.rules {
                out.push(ModelRewriteRule {
                    source: format!("{ns}/{name}"),
                    created: e.meta.created.clone(),
                    matches: rule.matches.iter().map(|m| m.model.value.clone()).collect(),
                    targets: rule
                        .targets
                        .iter()
                        .map(|t| RewriteTarget {
                            model_rewrite: t.model_rewrite.clone(),
                            weight: t.weight.and_then(|w| u32::try_from(w).ok()).unwrap_or(0),
                        })
                        .collect(),
                });
            }
        }
        out
    }
}

/// Every key the index holds, by kind.
#[derive(Clone, Debug, Default)]
pub struct IndexKeys {
    /// Pools.
    pub pools: BTreeSet<ObjKey>,
    /// Pods.
    pub pods: BTreeSet<ObjKey>,
    /// Objectives.
    pub objectives: BTreeSet<(String, String, AlphaGroup)>,
    /// Rewrites.
    pub rewrites: BTreeSet<(String, String, AlphaGroup)>,
    /// Picker configs.
    pub epcs: BTreeSet<ObjKey>,
}

fn selects(spec: &InferencePoolSpec, labels: &BTreeMap<String, String>) -> bool {
    // An empty selector selects nothing (the CRD requires at least one label).
    !spec.selector.match_labels.is_empty()
        && spec
            .selector
            .match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
}

/// Converts an `llm-d.ai` objective to the shared representation.
pub fn objective_from_llm_d(o: &llm_d::InferenceObjective) -> x_k8s::InferenceObjective {
    let mut out = x_k8s::InferenceObjective::new(&o.name_any(), o.spec.clone().into());
    out.metadata = o.metadata.clone();
    out
}

/// Converts an `llm-d.ai` rewrite to the shared representation.
pub fn rewrite_from_llm_d(o: &llm_d::InferenceModelRewrite) -> x_k8s::InferenceModelRewrite {
    let mut out = x_k8s::InferenceModelRewrite::new(&o.name_any(), o.spec.clone().into());
    out.metadata = o.metadata.clone();
    out
}

#[cfg(test)]
#[path = "index_tests.rs"]
mod tests;
