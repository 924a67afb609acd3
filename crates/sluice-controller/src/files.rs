//! File mode (`--manifests DIR`): the same YAML a cluster would hold — InferencePools,
//! InferenceObjectives and InferenceModelRewrites (both groups), EndpointPickerConfigs, and
//! Pods with `status.podIP` and a `Ready` condition standing in for model servers — read
//! from a directory and followed by polling, feeding the same index as the watches.
//!
//! A document that does not parse is logged and skipped; a file that cannot be read or is
//! not YAML at all keeps the objects it had (an editor's half-written save must not empty a
//! pool).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use serde_json::Value;
use sluice_api::{EndpointPickerConfig as EpcResource, InferencePool, llm_d, x_k8s};
use tokio::sync::watch;

use crate::index::{AlphaGroup, Index, PodInfo, objective_from_llm_d, rewrite_from_llm_d};
use crate::runtime::SharedIndex;

/// Largest manifest file read (bounds memory on a stray large file).
const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;
/// Most files followed in one directory tree.
const MAX_FILES: usize = 10_000;

/// The objects of one or more manifest files.
#[derive(Clone, Debug, Default)]
pub struct ManifestSet {
    /// InferencePools.
    pub pools: Vec<InferencePool>,
    /// Pods (namespace, name, what the index keeps).
    pub pods: Vec<(String, String, PodInfo)>,
    /// InferenceObjectives of either group.
    pub objectives: Vec<(AlphaGroup, x_k8s::InferenceObjective)>,
    /// InferenceModelRewrites of either group.
    pub rewrites: Vec<(AlphaGroup, x_k8s::InferenceModelRewrite)>,
    /// EndpointPickerConfigs.
    pub epcs: Vec<EpcResource>,
}

impl ManifestSet {
    fn extend(&mut self, other: &ManifestSet) {
        self.pools.extend(other.pools.iter().cloned());
        self.pods.extend(other.pods.iter().cloned());
        self.objectives.extend(other.objectives.iter().cloned());
        self.rewrites.extend(other.rewrites.iter().cloned());
        self.epcs.extend(other.epcs.iter().cloned());
    }
}

/// Splits a YAML stream into documents on `---` lines.
fn documents(text: &str) -> Vec<String> {
    let mut docs = vec![String::new()];
    for line in text.lines() {
        if line.trim_end() == "---" || line.starts_with("--- ") {
            docs.push(String::new());
        } else if let Some(d) = docs.last_mut() {
            d.push_str(line);
            d.push('\n');
        }
    }
    docs.into_iter()
        .filter(|d| {
            d.lines()
                .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        })
        .collect()
}

/// Parses a YAML stream; returns the objects and one message per skipped document, each
/// naming `origin` and the document's position.
pub fn parse_manifests(text: &str, origin: &str) -> (ManifestSet, Vec<String>) {
    let mut set = ManifestSet::default();
    let mut errors = Vec::new();
    for (i, doc) in documents(text).iter().enumerate() {
        let at = format!("{origin} (document {})", i + 1);
        let value: Value = match serde_saphyr::from_str(doc) {
            Ok(v) => v,
            Err(e) => {
                errors.push(format!("{at}: not valid YAML: {e}"));
                continue;
            }
        };
        if let Err(e) = add_object(&mut set, value) {
            errors.push(format!("{at}: {e}"));
        }
    }
    (set, errors)
}

fn add_object(set: &mut ManifestSet, mut value: Value) -> Result<(), String> {
    let api_version = value
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let kind = value
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    // Objects without a namespace land in `default`, as `kubectl apply` would put them.
    if let Some(meta) = value.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.entry("namespace")
            .or_insert_with(|| Value::String("default".into()));
    }
    fn typed<T: serde::de::DeserializeOwned>(v: Value, what: &str) -> Result<T, String> {
        serde_json::from_value(v).map_err(|e| format!("invalid {what}: {e}"))
    }
    match (api_version.as_str(), kind.as_str()) {
        ("inference.networking.k8s.io/v1", "InferencePool") => {
            set.pools.push(typed(value, "InferencePool")?)
        }
        ("v1", "Pod") => {
            let pod: Pod = typed(value, "Pod")?;
            let info = PodInfo::from_pod(&pod);
            set.pods
                .push((pod.namespace().unwrap_or_default(), pod.name_any(), info));
        }
        ("inference.networking.x-k8s.io/v1alpha2", "InferenceObjective") => {
            set.objectives
                .push((AlphaGroup::XK8s, typed(value, "InferenceObjective")?));
        }
        ("llm-d.ai/v1alpha2", "InferenceObjective") => {
            let o: llm_d::InferenceObjective = typed(value, "InferenceObjective")?;
            set.objectives
                .push((AlphaGroup::LlmD, objective_from_llm_d(&o)));
        }
        ("inference.networking.x-k8s.io/v1alpha2", "InferenceModelRewrite") => {
            set.rewrites
                .push((AlphaGroup::XK8s, typed(value, "InferenceModelRewrite")?));
        }
        ("llm-d.ai/v1alpha2", "InferenceModelRewrite") => {
            let o: llm_d::InferenceModelRewrite = typed(value, "InferenceModelRewrite")?;
            set.rewrites
                .push((AlphaGroup::LlmD, rewrite_from_llm_d(&o)));
        }
        ("sluice.dev/v1alpha1", "EndpointPickerConfig") => {
            set.epcs.push(typed(value, "EndpointPickerConfig")?)
        }
        (av, k) => {
            return Err(format!(
                "unsupported object {av}/{k}: expected InferencePool, InferenceObjective, InferenceModelRewrite, \
                 EndpointPickerConfig or Pod"
            ));
        }
    }
    Ok(())
}

/// Makes the index hold exactly the objects of `set`.
pub fn sync_index(index: &mut Index, set: &ManifestSet) {
    let before = index.keys();
    let mut seen_pools = BTreeSet::new();
    for p in &set.pools {
        seen_pools.insert((p.namespace().unwrap_or_default(), p.name_any()));
        index.apply_pool(p);
    }
    let mut seen_pods = BTreeSet::new();
    for (ns, name, info) in &set.pods {
        seen_pods.insert((ns.clone(), name.clone()));
        index.apply_pod(ns, name, info.clone());
    }
    let mut seen_objectives = BTreeSet::new();
    for (g, o) in &set.objectives {
        seen_objectives.insert((o.namespace().unwrap_or_default(), o.name_any(), *g));
        index.apply_objective(*g, o);
    }
    let mut seen_rewrites = BTreeSet::new();
    for (g, o) in &set.rewrites {
        seen_rewrites.insert((o.namespace().unwrap_or_default(), o.name_any(), *g));
        index.apply_rewrite(*g, o);
    }
    let mut seen_epcs = BTreeSet::new();
    for e in &set.epcs {
        seen_epcs.insert((e.namespace().unwrap_or_default(), e.name_any()));
        index.apply_epc(e);
    }
    for (ns, name) in before.pools.difference(&seen_pools) {
        index.delete_pool(ns, name);
    }
    for (ns, name) in before.pods.difference(&seen_pods) {
        index.delete_pod(ns, name);
    }
    for (ns, name, g) in before.objectives.difference(&seen_objectives) {
        index.delete_objective(*g, ns, name);
    }
    for (ns, name, g) in before.rewrites.difference(&seen_rewrites) {
        index.delete_rewrite(*g, ns, name);
    }
    for (ns, name) in before.epcs.difference(&seen_epcs) {
        index.delete_epc(ns, name);
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Fingerprint {
    len: u64,
    modified: Option<SystemTime>,
}

/// Follows a manifest directory.
#[derive(Debug)]
pub struct ManifestDir {
    root: PathBuf,
    files: BTreeMap<PathBuf, (Fingerprint, ManifestSet)>,
}

impl ManifestDir {
    /// A follower of `root` (a directory, or a single file).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        ManifestDir {
            root: root.into(),
            files: BTreeMap::new(),
        }
    }

    /// Re-reads what changed; returns the union of all files when anything did.
    pub fn poll(&mut self) -> std::io::Result<Option<ManifestSet>> {
        let mut found = Vec::new();
        collect_yaml(&self.root, &mut found)?;
        found.sort();
        found.truncate(MAX_FILES);
        let mut changed = found.len() != self.files.len();
        let mut next = BTreeMap::new();
        for path in found {
            let meta = match std::fs::metadata(&path) {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot stat manifest");
                    continue;
                }
            };
            let fp = Fingerprint {
                len: meta.len(),
                modified: meta.modified().ok(),
            };
            if let Some((old_fp, set)) = self.files.get(&path)
                && *old_fp == fp
            {
                next.insert(path, (fp, set.clone()));
                continue;
            }
            changed = true;
            let set = if meta.len() > MAX_FILE_BYTES {
                tracing::warn!(path = %path.display(), bytes = meta.len(), limit = MAX_FILE_BYTES, "manifest too large; skipped");
                ManifestSet::default()
            } else {
                match std::fs::read_to_string(&path) {
                    Ok(text) => {
                        let (set, errors) = parse_manifests(&text, &path.display().to_string());
                        for error in errors {
                            tracing::warn!(%error, "manifest document skipped");
                        }
                        set
                    }
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "cannot read manifest; keeping its previous objects");
                        self.files
                            .get(&path)
                            .map(|(_, s)| s.clone())
                            .unwrap_or_default()
                    }
                }
            };
            next.insert(path, (fp, set));
        }
        if !changed && next.keys().eq(self.files.keys()) {
            return Ok(None);
        }
        self.files = next;
        let mut all = ManifestSet::default();
        for (_, set) in self.files.values() {
            all.extend(set);
        }
        Ok(Some(all))
    }
}

fn collect_yaml(path: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let meta = std::fs::metadata(path)?;
    if meta.is_file() {
        out.push(path.to_owned());
        return Ok(());
    }
    for entry in std::fs::read_dir(path)? {
        let entry = entry?;
        let p = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') {
            continue;
        }
        if entry.file_type()?.is_dir() {
            collect_yaml(&p, out)?;
        } else if name.ends_with(".yaml") || name.ends_with(".yml") {
            out.push(p);
        }
        if out.len() >= MAX_FILES {
            break;
        }
    }
    Ok(())
}

/// Loads the directory, marks the index synced, then follows changes every `interval`.
pub async fn run(
    root: PathBuf,
    index: SharedIndex,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut dir = ManifestDir::new(&root);
    let first = dir
        .poll()
        .map_err(|e| anyhow::anyhow!("cannot read manifests in {}: {e}", root.display()))?;
    if let Some(set) = first {
        index.update(|i| sync_index(i, &set));
    }
    index.set_synced();
    tracing::info!(dir = %root.display(), "manifests loaded; following changes");
    let mut ticker = tokio::time::interval(interval);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => return Ok(()),
        }
        match dir.poll() {
            Ok(Some(set)) => {
                tracing::info!(dir = %root.display(), "manifests changed");
                index.update(|i| sync_index(i, &set));
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(dir = %root.display(), error = %e, "cannot read manifests; keeping the last state")
            }
        }
    }
}
