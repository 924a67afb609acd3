//! The fake API server's object store: objects by resource/namespace/name, one global
//! resourceVersion counter, a bounded event history for watch resumption, and simplified
//! server-side-apply field ownership. Everything here is synchronous; the HTTP layer holds
//! the store behind a mutex.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use serde_json::{Map, Value, json};

use super::selector::{FieldSelector, LabelSelector};

/// A resource type the fake server serves.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceDef {
    /// API group; empty for the core group.
    pub group: String,
    /// API version, for example `v1`.
    pub version: String,
    /// Plural resource name used in URLs.
    pub plural: String,
    /// Kind written into objects.
    pub kind: String,
    /// Whether objects live in namespaces.
    pub namespaced: bool,
    /// Whether `/status` is a separate subresource (then writes to the main resource keep
    /// the old status and writes to `/status` keep everything else).
    pub status_subresource: bool,
}

impl ResourceDef {
    /// A namespaced resource with a status subresource.
    pub fn namespaced(group: &str, version: &str, plural: &str, kind: &str) -> Self {
        ResourceDef {
            group: group.into(),
            version: version.into(),
            plural: plural.into(),
            kind: kind.into(),
            namespaced: true,
            status_subresource: true,
        }
    }

    /// `v1` Pods.
    pub fn pods() -> Self {
        Self::namespaced("", "v1", "pods", "Pod")
    }

    /// `coordination.k8s.io/v1` Leases (no status).
    pub fn leases() -> Self {
        ResourceDef {
            status_subresource: false,
            ..Self::namespaced("coordination.k8s.io", "v1", "leases", "Lease")
        }
    }

    /// `events.k8s.io/v1` Events (what kube's event recorder writes).
    pub fn events() -> Self {
        ResourceDef {
            status_subresource: false,
            ..Self::namespaced("events.k8s.io", "v1", "events", "Event")
        }
    }

    /// Core `v1` Events.
    pub fn core_events() -> Self {
        ResourceDef {
            status_subresource: false,
            ..Self::namespaced("", "v1", "events", "Event")
        }
    }

    /// Every served version of a CustomResourceDefinition (as JSON).
    ///
    /// Returns an error naming the missing field when the document is not a CRD.
    pub fn from_crd(crd: &Value) -> Result<Vec<Self>, String> {
        let spec = crd.get("spec").ok_or("CRD has no spec")?;
        let field = |v: &Value, path: &[&str]| -> Result<String, String> {
            let mut cur = v;
            for p in path {
                cur = cur
                    .get(*p)
                    .ok_or_else(|| format!("CRD has no spec.{}", path.join(".")))?;
            }
            cur.as_str()
                .map(str::to_owned)
                .ok_or_else(|| format!("CRD spec.{} is not a string", path.join(".")))
        };
        let group = field(spec, &["group"])?;
        let plural = field(spec, &["names", "plural"])?;
        let kind = field(spec, &["names", "kind"])?;
        let namespaced = field(spec, &["scope"])? == "Namespaced";
        let versions = spec
            .get("versions")
            .and_then(Value::as_array)
            .ok_or("CRD has no spec.versions")?;
        versions
            .iter()
            .filter(|v| v.get("served").and_then(Value::as_bool).unwrap_or(true))
            .map(|v| {
                Ok(ResourceDef {
                    group: group.clone(),
                    version: field(v, &["name"])?,
                    plural: plural.clone(),
                    kind: kind.clone(),
                    namespaced,
                    status_subresource: v.pointer("/subresources/status").is_some(),
                })
            })
            .collect()
    }

    /// `group/version`, or `version` for the core group.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

/// An error the API server answers with: HTTP code, Kubernetes reason, message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status code.
    pub code: u16,
    /// Kubernetes `reason` (`NotFound`, `Conflict`, ...).
    pub reason: &'static str,
    /// Human-readable message.
    pub message: String,
}

impl ApiError {
    pub(crate) fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            code,
            reason,
            message: message.into(),
        }
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    /// The `Status` object Kubernetes sends for this error.
    pub fn to_status(&self) -> Value {
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        })
    }
}

/// Watch event types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    /// Object created.
    Added,
    /// Object changed.
    Modified,
    /// Object removed.
    Deleted,
}

impl EventType {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One change, as kept in the history and sent to watchers.
#[derive(Clone, Debug)]
pub struct StoredEvent {
    /// The resourceVersion of the change.
    pub rv: u64,
    /// Which resource type changed.
    pub resource: ResourceDef,
    /// What happened.
    pub kind: EventType,
    /// The object before the change (for filtered watches: an object leaving a selector
    /// is a DELETED to that watcher).
    pub old: Option<Arc<Value>>,
    /// The object after the change (for DELETED: its last state with the new version).
    pub object: Arc<Value>,
}

/// How a write request arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchKind {
    /// RFC 7386 JSON merge patch.
    Merge,
    /// Strategic merge patch, treated as a JSON merge patch (lists are replaced).
    Strategic,
    /// RFC 6902 JSON patch.
    Json,
    /// Server-side apply.
    Apply {
        /// `force=true`: take ownership of conflicting fields.
        force: bool,
    },
}

/// One stored object and who owns which of its fields.
#[derive(Clone, Debug)]
struct Entry {
    object: Arc<Value>,
    /// Field manager -> leaf paths it owns (simplified SSA: objects are maps, everything
    /// else, lists included, is an atomic leaf).
    managers: BTreeMap<String, BTreeSet<Vec<String>>>,
    /// Managers whose ownership came from an apply (only those lose fields they stop
    /// applying).
    appliers: BTreeSet<String>,
}

type Key = (ResourceDef, String, String);

/// The store.
#[derive(Debug)]
pub struct Store {
    resources: BTreeSet<ResourceDef>,
    objects: BTreeMap<Key, Entry>,
    rv: u64,
    uid: u64,
    history: VecDeque<Arc<StoredEvent>>,
    history_limit: usize,
    /// Every event with a version above this is still in `history`.
    history_floor: u64,
}

/// Selection for lists and watches.
#[derive(Clone, Debug, Default)]
pub struct Selection {
    /// Namespace, or `None` for all namespaces.
    pub namespace: Option<String>,
    /// Label selector.
    pub labels: LabelSelector,
    /// Field selector.
    pub fields: FieldSelector,
}

impl Selection {
    /// Whether an object is selected.
    pub fn matches(&self, obj: &Value) -> bool {
        if let Some(ns) = &self.namespace
            && obj
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .unwrap_or_default()
                != ns
        {
            return false;
        }
        self.labels.matches(obj.pointer("/metadata/labels")) && self.fields.matches(obj)
    }
}

impl Default for Store {
    fn default() -> Self {
        Self::new(10_000)
    }
}

impl Store {
    /// An empty store keeping the last `history_limit` events for watch resumption.
    pub fn new(history_limit: usize) -> Self {
        Store {
            resources: BTreeSet::new(),
            objects: BTreeMap::new(),
            rv: 1,
            uid: 0,
            history: VecDeque::new(),
            history_limit: history_limit.max(1),
            history_floor: 1,
        }
    }

    /// Serve a resource type.
    pub fn register(&mut self, def: ResourceDef) {
        self.resources.insert(def);
    }

    /// Every served resource type.
    pub fn resources(&self) -> impl Iterator<Item = &ResourceDef> {
        self.resources.iter()
    }

    /// The resource served under this group, version and plural.
    pub fn resource(&self, group: &str, version: &str, plural: &str) -> Option<&ResourceDef> {
        self.resources
            .iter()
            .find(|r| r.group == group && r.version == version && r.plural == plural)
    }

    /// The current resourceVersion.
    pub fn current_rv(&self) -> u64 {
        self.rv
    }

    /// Forget the watch history: a watch resuming from any version seen so far gets
    /// `410 Gone` and must re-list.
    pub fn compact(&mut self) {
        self.history.clear();
        self.history_floor = self.rv;
    }

    /// One object.
    pub fn get(&self, res: &ResourceDef, ns: &str, name: &str) -> Result<Arc<Value>, ApiError> {
        self.objects
            .get(&(res.clone(), ns.to_owned(), name.to_owned()))
            .map(|e| e.object.clone())
            .ok_or_else(|| not_found(res, name))
    }

    /// The field managers of an object and the paths they own (dotted), for assertions.
    pub fn managers(
        &self,
        res: &ResourceDef,
        ns: &str,
        name: &str,
    ) -> BTreeMap<String, Vec<String>> {
        self.objects
            .get(&(res.clone(), ns.to_owned(), name.to_owned()))
            .map(|e| {
                e.managers
                    .iter()
                    .map(|(m, paths)| (m.clone(), paths.iter().map(|p| p.join(".")).collect()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Selected objects, sorted by namespace and name, and the list's resourceVersion.
    pub fn list(&self, res: &ResourceDef, sel: &Selection) -> (Vec<Arc<Value>>, u64) {
        let items = self
            .objects
            .range((res.clone(), String::new(), String::new())..)
            .take_while(|((r, _, _), _)| r == res)
            .filter(|(_, e)| sel.matches(&e.object))
            .map(|(_, e)| e.object.clone())
            .collect();
        (items, self.rv)
    }

    /// Events after `rv` for a resource, or `None` when the history no longer reaches back
    /// that far (the watcher must re-list: 410 Gone).
    pub fn events_since(&self, res: &ResourceDef, rv: u64) -> Option<Vec<Arc<StoredEvent>>> {
        if rv < self.history_floor {
            return None;
        }
        Some(
            self.history
                .iter()
                .filter(|e| e.rv > rv && &e.resource == res)
                .cloned()
                .collect(),
        )
    }

    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn record(&mut self, ev: StoredEvent) -> Arc<StoredEvent> {
        let ev = Arc::new(ev);
        self.history.push_back(ev.clone());
        while self.history.len() > self.history_limit {
            if let Some(old) = self.history.pop_front() {
                self.history_floor = old.rv;
            }
        }
        ev
    }

    /// POST.
    pub fn create(
        &mut self,
        res: &ResourceDef,
        ns: &str,
        mut obj: Value,
        manager: &str,
    ) -> Result<(Arc<Value>, Arc<StoredEvent>), ApiError> {
        let meta = obj
            .get_mut("metadata")
            .and_then(Value::as_object_mut)
            .ok_or_else(|| {
                ApiError::new(422, "Invalid", format!("{} has no metadata", res.kind))
            })?;
        let name = match meta.get("name").and_then(Value::as_str) {
            Some(n) if !n.is_empty() => n.to_owned(),
            _ => match meta.get("generateName").and_then(Value::as_str) {
                Some(prefix) => format!("{prefix}{:05x}", self.uid + 1),
                None => {
                    return Err(ApiError::new(
                        422,
                        "Invalid",
                        format!(
                            "{}: metadata.name or metadata.generateName is required",
                            res.kind
                        ),
                    ));
                }
            },
        };
        if res.namespaced {
            match meta.get("namespace").and_then(Value::as_str) {
                Some(n) if !n.is_empty() && n != ns => {
                    return Err(ApiError::bad_request(format!(
                        "the namespace of the object ({n}) does not match the namespace on the request ({ns})"
                    )));
                }
                _ => {}
            }
        }
        let key = (res.clone(), ns.to_owned(), name.clone());
        if self.objects.contains_key(&key) {
            return Err(ApiError::new(
                409,
                "AlreadyExists",
                format!("{}.{} \"{name}\" already exists", res.plural, res.group),
            ));
        }
        self.uid += 1;
        let rv = self.next_rv();
        meta.insert("name".into(), json!(name));
        if res.namespaced {
            meta.insert("namespace".into(), json!(ns));
        }
        meta.insert(
            "uid".into(),
            json!(format!("00000000-0000-0000-0000-{:012x}", self.uid)),
        );
        meta.insert("resourceVersion".into(), json!(rv.to_string()));
        meta.insert("generation".into(), json!(1));
        meta.insert("creationTimestamp".into(), json!(now_rfc3339()));
        meta.remove("deletionTimestamp");
        set_type_meta(&mut obj, res);
        let mut entry = Entry {
            object: Arc::new(Value::Null),
            managers: BTreeMap::new(),
            appliers: BTreeSet::new(),
        };
        entry
            .managers
            .insert(manager.to_owned(), leaf_paths(&obj).into_iter().collect());
        entry.object = Arc::new(obj);
        let object = entry.object.clone();
        self.objects.insert(key, entry);
        let ev = self.record(StoredEvent {
            rv,
            resource: res.clone(),
            kind: EventType::Added,
            old: None,
            object,
        });
        Ok((ev.object.clone(), ev))
    }

    /// PUT on the object or its status. A resourceVersion in the body must match.
    pub fn replace(
        &mut self,
        res: &ResourceDef,
        ns: &str,
        name: &str,
        obj: Value,
        status: bool,
        manager: &str,
    ) -> Result<(Arc<Value>, Option<Arc<StoredEvent>>), ApiError> {
        let current = self.get(res, ns, name)?;
        if let Some(rv) = obj
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            && !rv.is_empty()
            && Some(rv)
                != current
                    .pointer("/metadata/resourceVersion")
                    .and_then(Value::as_str)
        {
            return Err(ApiError::new(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {}.{} \"{name}\": the object has been modified; \
                     please apply your changes to the latest version and try again",
                    res.plural, res.group
                ),
            ));
        }
        self.write(res, ns, name, obj, status, manager, None)
    }

    /// PATCH on the object or its status; an apply patch creates a missing object.
    #[allow(clippy::too_many_arguments)]
    pub fn patch(
        &mut self,
        res: &ResourceDef,
        ns: &str,
        name: &str,
        patch: Value,
        kind: PatchKind,
        status: bool,
        manager: Option<&str>,
    ) -> Result<(Arc<Value>, Option<Arc<StoredEvent>>), ApiError> {
        let current = match self.get(res, ns, name) {
            Ok(c) => c,
            Err(e) => {
                if let (PatchKind::Apply { .. }, Some(m), false) = (kind, manager, status) {
                    let mut obj = patch;
                    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
                        meta.insert("name".into(), json!(name));
                    }
                    let (o, ev) = self.create(res, ns, obj, m)?;
                    let key = (res.clone(), ns.to_owned(), name.to_owned());
                    if let Some(entry) = self.objects.get_mut(&key) {
                        entry.appliers.insert(m.to_owned());
                    }
                    return Ok((o, Some(ev)));
                }
                return Err(e);
            }
        };
        let manager_name = manager.unwrap_or("unknown");
        let new = match kind {
            PatchKind::Merge | PatchKind::Strategic => {
                let mut new = (*current).clone();
                json_merge(&mut new, &patch);
                new
            }
            PatchKind::Json => {
                let ops: json_patch::Patch = serde_json::from_value(patch)
                    .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
                let mut new = (*current).clone();
                json_patch::patch(&mut new, &ops).map_err(|e| {
                    ApiError::new(422, "Invalid", format!("JSON patch failed: {e}"))
                })?;
                new
            }
            PatchKind::Apply { force } => {
                let Some(m) = manager else {
                    return Err(ApiError::bad_request(
                        "PATCH with application/apply-patch+yaml requires the fieldManager parameter",
                    ));
                };
                return self.apply(res, ns, name, &current, patch, force, status, m);
            }
        };
        self.write(res, ns, name, new, status, manager_name, None)
    }

    #[allow(clippy::too_many_arguments)]
    fn apply(
        &mut self,
        res: &ResourceDef,
        ns: &str,
        name: &str,
        current: &Value,
        config: Value,
        force: bool,
        status: bool,
        manager: &str,
    ) -> Result<(Arc<Value>, Option<Arc<StoredEvent>>), ApiError> {
        let key = (res.clone(), ns.to_owned(), name.to_owned());
        let applied: BTreeSet<Vec<String>> = leaf_paths(&config)
            .into_iter()
            .filter(|p| in_scope(p, status, res.status_subresource))
            .collect();
        let entry = self
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| not_found(res, name))?;
        let mut conflicts = Vec::new();
        for (other, owned) in &entry.managers {
            if other == manager {
                continue;
            }
            for p in owned.intersection(&applied) {
                if get_path(current, p) != get_path(&config, p) {
                    conflicts.push(format!("conflict with \"{other}\": .{}", p.join(".")));
                }
            }
        }
        if !conflicts.is_empty() && !force {
            return Err(ApiError::new(
                409,
                "Conflict",
                format!(
                    "Apply failed with {} conflict(s): {}",
                    conflicts.len(),
                    conflicts.join(", ")
                ),
            ));
        }
        let mut new = current.clone();
        // Fields this manager applied before and no longer applies (and nobody else owns)
        // are removed, as server-side apply does.
        if entry.appliers.contains(manager)
            && let Some(previous) = entry.managers.get(manager)
        {
            for p in previous.difference(&applied) {
                let shared = entry
                    .managers
                    .iter()
                    .any(|(m, owned)| m != manager && owned.contains(p));
                if !shared && in_scope(p, status, res.status_subresource) {
                    remove_path(&mut new, p);
                }
            }
        }
        json_merge(&mut new, &config);
        let ownership = Ownership { applied, force };
        let out = self.write(res, ns, name, new, status, manager, Some(ownership))?;
        if let Some(entry) = self.objects.get_mut(&key) {
            entry.appliers.insert(manager.to_owned());
        }
        Ok(out)
    }

    /// Stores a new state of an existing object: keeps the parts the endpoint may not
    /// change, bumps versions, updates field ownership, records the event. A write that
    /// changes nothing is not an event (as in Kubernetes).
    #[allow(clippy::too_many_arguments)]
    fn write(
        &mut self,
        res: &ResourceDef,
        ns: &str,
        name: &str,
        mut new: Value,
        status: bool,
        manager: &str,
        apply: Option<Ownership>,
    ) -> Result<(Arc<Value>, Option<Arc<StoredEvent>>), ApiError> {
        let key = (res.clone(), ns.to_owned(), name.to_owned());
        let entry = self
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| not_found(res, name))?;
        let old = entry.object.clone();
        if !new.is_object() {
            return Err(ApiError::bad_request(format!(
                "{} body must be a JSON object",
                res.kind
            )));
        }
        if res.status_subresource {
            if status {
                // The status endpoint changes only status.
                let st = new.get("status").cloned();
                new = (*old).clone();
                match st {
                    Some(s) => set_field(&mut new, "status", s),
                    None => remove_field(&mut new, "status"),
                }
            } else {
                match old.get("status") {
                    Some(s) => set_field(&mut new, "status", s.clone()),
                    None => remove_field(&mut new, "status"),
                }
            }
        }
        // Immutable metadata comes from the stored object.
        for f in [
            "name",
            "namespace",
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "generation",
        ] {
            match old.pointer(&format!("/metadata/{f}")) {
                Some(v) => set_meta(&mut new, f, v.clone()),
                None => remove_meta(&mut new, f),
            }
        }
        set_type_meta(&mut new, res);
        set_meta(
            &mut new,
            "resourceVersion",
            old.pointer("/metadata/resourceVersion")
                .cloned()
                .unwrap_or_default(),
        );
        if new == *old {
            return Ok((old, None));
        }
        if strip_meta_status(&new) != strip_meta_status(&old) {
            let generation = old
                .pointer("/metadata/generation")
                .and_then(Value::as_i64)
                .unwrap_or(1)
                + 1;
            set_meta(&mut new, "generation", json!(generation));
        }
        let rv = self.next_rv();
        set_meta(&mut new, "resourceVersion", json!(rv.to_string()));

        let mut managers = entry.managers.clone();
        let new_leaves: BTreeSet<Vec<String>> = leaf_paths(&new).into_iter().collect();
        match apply {
            Some(Ownership { applied, force }) => {
                for (m, owned) in managers.iter_mut() {
                    if m != manager {
                        // Equal values are shared; forced or changed values move.
                        owned.retain(|p| {
                            !applied.contains(p)
                                || (!force && get_path(&old, p) == get_path(&new, p))
                        });
                    }
                }
                let mut mine: BTreeSet<Vec<String>> = managers
                    .get(manager)
                    .map(|s| {
                        s.iter()
                            .filter(|p| !in_scope(p, status, res.status_subresource))
                            .cloned()
                            .collect()
                    })
                    .unwrap_or_default();
                mine.extend(applied);
                managers.insert(manager.to_owned(), mine);
            }
            None => {
                let changed: BTreeSet<Vec<String>> = new_leaves
                    .iter()
                    .filter(|p| get_path(&old, p) != get_path(&new, p))
                    .cloned()
                    .collect();
                for (m, owned) in managers.iter_mut() {
                    if m != manager {
                        owned.retain(|p| !changed.contains(p));
                    }
                }
                managers
                    .entry(manager.to_owned())
                    .or_default()
                    .extend(changed);
            }
        }
        for owned in managers.values_mut() {
            owned.retain(|p| new_leaves.contains(p));
        }
        managers.retain(|_, owned| !owned.is_empty());

        // Removing the last finalizer of an object being deleted deletes it.
        let deleting = new.pointer("/metadata/deletionTimestamp").is_some();
        let finalizers_left = new
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .is_some_and(|f| !f.is_empty());
        let new = Arc::new(new);
        if deleting && !finalizers_left {
            self.objects.remove(&key);
            let ev = self.record(StoredEvent {
                rv,
                resource: res.clone(),
                kind: EventType::Deleted,
                old: Some(old),
                object: new.clone(),
            });
            return Ok((new, Some(ev)));
        }
        let appliers = entry.appliers.clone();
        self.objects.insert(
            key,
            Entry {
                object: new.clone(),
                managers,
                appliers,
            },
        );
        let ev = self.record(StoredEvent {
            rv,
            resource: res.clone(),
            kind: EventType::Modified,
            old: Some(old),
            object: new.clone(),
        });
        Ok((new, Some(ev)))
    }

    /// DELETE: objects with finalizers get a deletionTimestamp instead.
    pub fn delete(
        &mut self,
        res: &ResourceDef,
        ns: &str,
        name: &str,
    ) -> Result<(Arc<Value>, Option<Arc<StoredEvent>>), ApiError> {
        let key = (res.clone(), ns.to_owned(), name.to_owned());
        let entry = self
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| not_found(res, name))?;
        let has_finalizers = entry
            .object
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .is_some_and(|f| !f.is_empty());
        if has_finalizers {
            if entry
                .object
                .pointer("/metadata/deletionTimestamp")
                .is_some()
            {
                return Ok((entry.object, None));
            }
            let mut new = (*entry.object).clone();
            let rv = self.next_rv();
            set_meta(&mut new, "deletionTimestamp", json!(now_rfc3339()));
            set_meta(&mut new, "resourceVersion", json!(rv.to_string()));
            let new = Arc::new(new);
            self.objects.insert(
                key,
                Entry {
                    object: new.clone(),
                    ..entry.clone()
                },
            );
            let ev = self.record(StoredEvent {
                rv,
                resource: res.clone(),
                kind: EventType::Modified,
                old: Some(entry.object),
                object: new.clone(),
            });
            return Ok((new, Some(ev)));
        }
        self.objects.remove(&key);
        let rv = self.next_rv();
        let mut last = (*entry.object).clone();
        set_meta(&mut last, "resourceVersion", json!(rv.to_string()));
        let last = Arc::new(last);
        let ev = self.record(StoredEvent {
            rv,
            resource: res.clone(),
            kind: EventType::Deleted,
            old: Some(entry.object),
            object: last.clone(),
        });
        Ok((last, Some(ev)))
    }
}

struct Ownership {
    applied: BTreeSet<Vec<String>>,
    force: bool,
}

fn not_found(res: &ResourceDef, name: &str) -> ApiError {
    let what = if res.group.is_empty() {
        res.plural.clone()
    } else {
        format!("{}.{}", res.plural, res.group)
    };
    ApiError::new(404, "NotFound", format!("{what} \"{name}\" not found"))
}

/// Whether a field path may be written through this endpoint (main resource vs. status).
fn in_scope(path: &[String], status: bool, has_status_subresource: bool) -> bool {
    let first = path.first().map(String::as_str);
    if matches!(first, Some("apiVersion" | "kind")) {
        return false;
    }
    if matches!(first, Some("metadata")) {
        return matches!(
            path.get(1).map(String::as_str),
            Some("labels" | "annotations" | "finalizers")
        );
    }
    if !has_status_subresource {
        return true;
    }
    (first == Some("status")) == status
}

fn strip_meta_status(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("metadata");
        m.remove("status");
    }
    v
}

fn set_type_meta(obj: &mut Value, res: &ResourceDef) {
    if let Some(m) = obj.as_object_mut() {
        m.insert("apiVersion".into(), json!(res.api_version()));
        m.insert("kind".into(), json!(res.kind));
    }
}

fn set_field(obj: &mut Value, f: &str, v: Value) {
    if let Some(m) = obj.as_object_mut() {
        m.insert(f.into(), v);
    }
}

fn remove_field(obj: &mut Value, f: &str) {
    if let Some(m) = obj.as_object_mut() {
        m.remove(f);
    }
}

fn set_meta(obj: &mut Value, f: &str, v: Value) {
    if let Some(m) = obj.as_object_mut() {
        let meta = m
            .entry("metadata")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Some(meta) = meta.as_object_mut() {
            meta.insert(f.into(), v);
        }
    }
}

fn remove_meta(obj: &mut Value, f: &str) {
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove(f);
    }
}

/// RFC 7386 merge.
pub(crate) fn json_merge(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(t) = target {
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                json_merge(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

/// Paths of every non-object value (lists are atomic), skipping server-owned metadata.
fn leaf_paths(v: &Value) -> Vec<Vec<String>> {
    fn walk(v: &Value, path: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
        match v {
            Value::Object(m) if !m.is_empty() => {
                for (k, child) in m {
                    path.push(k.clone());
                    walk(child, path, out);
                    path.pop();
                }
            }
            Value::Null => {}
            _ => out.push(path.clone()),
        }
    }
    let mut out = Vec::new();
    walk(v, &mut Vec::new(), &mut out);
    out.retain(|p| {
        let first = p.first().map(String::as_str);
        !matches!(first, Some("apiVersion" | "kind"))
            && (first != Some("metadata")
                || matches!(
                    p.get(1).map(String::as_str),
                    Some("labels" | "annotations" | "finalizers")
                ))
    });
    out
}

fn get_path<'a>(v: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(v, |cur, k| cur.get(k))
}

fn remove_path(v: &mut Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut cur = v;
    for k in parents {
        match cur.get_mut(k) {
            Some(next) => cur = next,
            None => return,
        }
    }
    if let Some(m) = cur.as_object_mut() {
        m.remove(last);
    }
}

/// Now as RFC 3339 (UTC, seconds), computed without a date library.
pub(crate) fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    rfc3339(secs)
}

fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cm() -> ResourceDef {
        ResourceDef::namespaced("example.dev", "v1", "widgets", "Widget")
    }

    fn store() -> Store {
        let mut s = Store::new(100);
        s.register(cm());
        s
    }

    fn widget(name: &str, size: i64) -> Value {
        json!({"metadata": {"name": name, "labels": {"app": "a"}}, "spec": {"size": size}})
    }

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn create_assigns_metadata_and_rejects_duplicates() {
        let mut s = store();
        let (obj, ev) = s.create(&cm(), "ns", widget("w", 1), "test").unwrap();
        assert_eq!(obj["metadata"]["namespace"], "ns");
        assert_eq!(obj["apiVersion"], "example.dev/v1");
        assert_eq!(obj["metadata"]["resourceVersion"], ev.rv.to_string());
        let err = s.create(&cm(), "ns", widget("w", 2), "test").unwrap_err();
        assert_eq!((err.code, err.reason), (409, "AlreadyExists"));
    }

    #[test]
    fn replace_with_stale_version_conflicts() {
        let mut s = store();
        let (obj, _) = s.create(&cm(), "ns", widget("w", 1), "a").unwrap();
        let mut stale = (*obj).clone();
        stale["spec"]["size"] = json!(2);
        s.replace(&cm(), "ns", "w", stale.clone(), false, "a")
            .unwrap();
        stale["spec"]["size"] = json!(3);
        let err = s.replace(&cm(), "ns", "w", stale, false, "a").unwrap_err();
        assert_eq!(err.code, 409);
    }

    #[test]
    fn status_subresource_separates_spec_and_status_writes() {
        let mut s = store();
        s.create(&cm(), "ns", widget("w", 1), "a").unwrap();
        let (obj, _) = s
            .patch(
                &cm(),
                "ns",
                "w",
                json!({"spec": {"size": 9}, "status": {"ok": true}}),
                PatchKind::Merge,
                true,
                None,
            )
            .unwrap();
        assert_eq!(
            obj["spec"]["size"], 1,
            "status endpoint must not change spec"
        );
        assert_eq!(obj["status"]["ok"], true);
        assert_eq!(
            obj["metadata"]["generation"], 1,
            "status writes do not bump generation"
        );
        let (obj, _) = s
            .patch(
                &cm(),
                "ns",
                "w",
                json!({"spec": {"size": 2}, "status": {"ok": false}}),
                PatchKind::Merge,
                false,
                None,
            )
            .unwrap();
        assert_eq!(
            obj["status"]["ok"], true,
            "main endpoint must not change status"
        );
        assert_eq!(obj["metadata"]["generation"], 2);
    }

    #[test]
    fn apply_conflicts_with_other_managers_unless_forced() {
        let mut s = store();
        s.patch(
            &cm(),
            "ns",
            "w",
            widget("w", 1),
            PatchKind::Apply { force: false },
            false,
            Some("one"),
        )
        .unwrap();
        let err = s
            .patch(
                &cm(),
                "ns",
                "w",
                widget("w", 2),
                PatchKind::Apply { force: false },
                false,
                Some("two"),
            )
            .unwrap_err();
        assert_eq!(err.code, 409);
        assert!(
            err.message.contains("\"one\"") && err.message.contains(".spec.size"),
            "{}",
            err.message
        );
        // Applying the same value is shared ownership, not a conflict.
        s.patch(
            &cm(),
            "ns",
            "w",
            widget("w", 1),
            PatchKind::Apply { force: false },
            false,
            Some("two"),
        )
        .unwrap();
        let (obj, _) = s
            .patch(
                &cm(),
                "ns",
                "w",
                widget("w", 3),
                PatchKind::Apply { force: true },
                false,
                Some("two"),
            )
            .unwrap();
        assert_eq!(obj["spec"]["size"], 3);
        assert!(
            !s.managers(&cm(), "ns", "w")
                .get("one")
                .is_some_and(|p| p.contains(&"spec.size".to_owned()))
        );
    }

    #[test]
    fn apply_removes_fields_the_manager_stopped_applying() {
        let mut s = store();
        let cfg = json!({"metadata": {"name": "w"}, "spec": {"size": 1, "color": "red"}});
        s.patch(
            &cm(),
            "ns",
            "w",
            cfg,
            PatchKind::Apply { force: false },
            false,
            Some("m"),
        )
        .unwrap();
        let cfg = json!({"metadata": {"name": "w"}, "spec": {"size": 1}});
        let (obj, _) = s
            .patch(
                &cm(),
                "ns",
                "w",
                cfg,
                PatchKind::Apply { force: false },
                false,
                Some("m"),
            )
            .unwrap();
        assert!(obj["spec"].get("color").is_none(), "{obj}");
    }

    #[test]
    fn update_takes_ownership_from_an_applier() {
        let mut s = store();
        s.patch(
            &cm(),
            "ns",
            "w",
            widget("w", 1),
            PatchKind::Apply { force: false },
            false,
            Some("one"),
        )
        .unwrap();
        s.patch(
            &cm(),
            "ns",
            "w",
            json!({"spec": {"size": null}}),
            PatchKind::Strategic,
            false,
            Some("two"),
        )
        .unwrap();
        // The field is gone, so applying a new value conflicts with nobody.
        s.patch(
            &cm(),
            "ns",
            "w",
            widget("w", 5),
            PatchKind::Apply { force: false },
            false,
            Some("three"),
        )
        .unwrap();
    }

    #[test]
    fn json_patch_applies_and_test_failures_are_422() {
        let mut s = store();
        s.create(&cm(), "ns", widget("w", 1), "a").unwrap();
        let (obj, _) = s
            .patch(
                &cm(),
                "ns",
                "w",
                json!([{"op": "replace", "path": "/spec/size", "value": 7}]),
                PatchKind::Json,
                false,
                None,
            )
            .unwrap();
        assert_eq!(obj["spec"]["size"], 7);
        let err = s
            .patch(
                &cm(),
                "ns",
                "w",
                json!([{"op": "test", "path": "/spec/size", "value": 1}]),
                PatchKind::Json,
                false,
                None,
            )
            .unwrap_err();
        assert_eq!(err.code, 422);
    }

    #[test]
    fn finalizers_defer_deletion_until_removed() {
        let mut s = store();
        let mut w = widget("w", 1);
        w["metadata"]["finalizers"] = json!(["x/y"]);
        s.create(&cm(), "ns", w, "a").unwrap();
        let (obj, ev) = s.delete(&cm(), "ns", "w").unwrap();
        assert!(obj["metadata"]["deletionTimestamp"].is_string());
        assert_eq!(ev.unwrap().kind, EventType::Modified);
        let (_, ev) = s
            .patch(
                &cm(),
                "ns",
                "w",
                json!({"metadata": {"finalizers": null}}),
                PatchKind::Merge,
                false,
                None,
            )
            .unwrap();
        assert_eq!(ev.unwrap().kind, EventType::Deleted);
        assert_eq!(s.get(&cm(), "ns", "w").unwrap_err().code, 404);
    }

    #[test]
    fn history_answers_resumption_until_compacted() {
        let mut s = store();
        let rv0 = s.current_rv();
        s.create(&cm(), "ns", widget("a", 1), "m").unwrap();
        s.create(&cm(), "ns", widget("b", 1), "m").unwrap();
        assert_eq!(s.events_since(&cm(), rv0).unwrap().len(), 2);
        s.compact();
        assert!(s.events_since(&cm(), rv0).is_none());
        assert_eq!(s.events_since(&cm(), s.current_rv()).unwrap().len(), 0);
    }

    #[test]
    fn bounded_history_forgets_the_oldest_events() {
        let mut s = Store::new(2);
        s.register(cm());
        let rv0 = s.current_rv();
        for i in 0..3 {
            s.create(&cm(), "ns", widget(&format!("w{i}"), 1), "m")
                .unwrap();
        }
        assert!(s.events_since(&cm(), rv0).is_none());
        assert_eq!(s.events_since(&cm(), rv0 + 1).unwrap().len(), 2);
    }

    #[test]
    fn crd_definitions_register_every_served_version() {
        let crd = json!({"spec": {"group": "g.io", "scope": "Namespaced",
            "names": {"plural": "things", "kind": "Thing"},
            "versions": [{"name": "v1", "served": true, "subresources": {"status": {}}},
                         {"name": "v0", "served": false}]}});
        let defs = ResourceDef::from_crd(&crd).unwrap();
        assert_eq!(defs.len(), 1);
        assert!(defs[0].status_subresource && defs[0].namespaced);
        assert!(
            ResourceDef::from_crd(&json!({"spec": {}}))
                .unwrap_err()
                .contains("spec.group")
        );
    }
}
