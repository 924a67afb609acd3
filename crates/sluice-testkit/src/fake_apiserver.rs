//! A fake Kubernetes API server over real HTTP, so that the real kube client, kube-runtime
//! watchers/reflectors, server-side apply and Lease-based leader election run unmodified in
//! tests (there is no installable kube-apiserver on the team's machines; see
//! `test-infra.md` §1.3).
//!
//! It is generic over resources: JSON objects are stored by group/version/resource,
//! namespace and name, under one resourceVersion counter. Implemented:
//!
//! - list with `labelSelector`, `fieldSelector` (`metadata.name`/`metadata.namespace`),
//!   `limit`/`continue`, and the list's resourceVersion;
//! - watch (`?watch=true`) streaming newline-delimited events from a resourceVersion, with
//!   `allowWatchBookmarks`, `timeoutSeconds`, `sendInitialEvents`; a resourceVersion older
//!   than the kept history gets an in-stream `ERROR` event with code 410 (as a real API
//!   server sends it) so that watchers re-list; [`FakeApiServer::compact`] forces that;
//! - get, create (`generateName` too), update with resourceVersion conflicts (409), merge /
//!   strategic (as merge) / JSON patches, server-side apply with field managers and
//!   conflicts (simplified: lists are atomic), the `/status` subresource, delete with
//!   finalizers;
//! - discovery (`/api`, `/apis`, `/apis/{group}/{version}`) for "is this API installed".
//!
//! Deliberate simplifications: objects keep the `status` they are created with (tests set
//! up Pods in one call); there is no admission, defaulting or schema validation.

mod selector;
mod store;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

pub use selector::{FieldSelector, LabelSelector};
use store::Store;
pub use store::{ApiError, EventType, PatchKind, ResourceDef, Selection, StoredEvent};

/// One request the server answered, for assertions such as "only the leader wrote status".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestRecord {
    /// HTTP method.
    pub method: String,
    /// Path without the query.
    pub path: String,
    /// The `fieldManager` query parameter, if any.
    pub field_manager: Option<String>,
    /// The HTTP status answered.
    pub status: u16,
}

/// Options for [`FakeApiServer::start_with`].
#[derive(Clone, Debug)]
pub struct Options {
    /// How many events are kept for watch resumption.
    pub history_limit: usize,
    /// How often watchers that asked for bookmarks get one.
    pub bookmark_interval: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            history_limit: 10_000,
            bookmark_interval: Duration::from_secs(1),
        }
    }
}

const REQUEST_LOG_LIMIT: usize = 10_000;
const WATCH_BUFFER: usize = 1024;

#[derive(Debug)]
struct Shared {
    store: Mutex<Store>,
    events: broadcast::Sender<Arc<StoredEvent>>,
    requests: Mutex<VecDeque<RequestRecord>>,
    bookmark_interval: Duration,
    shutdown: watch::Receiver<bool>,
}

impl Shared {
    /// Runs a store operation and publishes its event; both under the store lock so that
    /// a watch subscribing under the same lock sees every event exactly once.
    fn mutate<T>(
        &self,
        f: impl FnOnce(&mut Store) -> Result<(T, Option<Arc<StoredEvent>>), ApiError>,
    ) -> Result<T, ApiError> {
        let mut store = self.store.lock();
        let (out, ev) = f(&mut store)?;
        if let Some(ev) = ev {
            // No receiver is not an error: nobody is watching.
            let _ = self.events.send(ev);
        }
        Ok(out)
    }
}

/// A running fake API server on `127.0.0.1`; stops (closing every watch) when dropped.
#[derive(Debug)]
pub struct FakeApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeApiServer {
    /// Starts a server serving Pods, Leases and Events; register more with
    /// [`register`](Self::register) or [`register_crd_yaml`](Self::register_crd_yaml).
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(Options::default()).await
    }

    /// Starts a server with options.
    pub async fn start_with(opts: Options) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        Self::serve(listener, opts)
    }

    /// Starts a server on a given address (for restarting a server on the same port).
    pub async fn start_on(addr: SocketAddr, opts: Options) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        Self::serve(listener, opts)
    }

    fn serve(listener: tokio::net::TcpListener, opts: Options) -> anyhow::Result<Self> {
        let addr = listener.local_addr()?;
        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut store = Store::new(opts.history_limit);
        for def in [
            ResourceDef::pods(),
            ResourceDef::leases(),
            ResourceDef::events(),
            ResourceDef::core_events(),
        ] {
            store.register(def);
        }
        let (events, _) = broadcast::channel(WATCH_BUFFER);
        let shared = Arc::new(Shared {
            store: Mutex::new(store),
            events,
            requests: Mutex::new(VecDeque::new()),
            bookmark_interval: opts.bookmark_interval,
            shutdown: shutdown_rx.clone(),
        });
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(shared.clone());
        let mut stop = shutdown_rx;
        let task = tokio::spawn(async move {
            let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
                let _ = stop.wait_for(|s| *s).await;
            });
            if let Err(error) = serve.await {
                tracing::warn!(%error, "fake API server stopped");
            }
        });
        Ok(FakeApiServer {
            addr,
            shared,
            shutdown,
            task,
        })
    }

    /// `http://127.0.0.1:PORT`, for `kube::Config::new(url.parse()?)`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves another resource type.
    pub fn register(&self, def: ResourceDef) {
        self.shared.store.lock().register(def);
    }

    /// Serves every version of the CustomResourceDefinitions in a YAML stream.
    pub fn register_crd_yaml(&self, yaml: &str) -> anyhow::Result<()> {
        for doc in yaml
            .split("\n---")
            .filter(|d| !d.trim().is_empty() && d.contains("kind"))
        {
            let crd: Value = serde_saphyr::from_str(doc)?;
            for def in ResourceDef::from_crd(&crd).map_err(anyhow::Error::msg)? {
                self.register(def);
            }
        }
        Ok(())
    }

    /// Creates an object directly (watchers see it), as a test fixture.
    pub fn create(&self, res: &ResourceDef, ns: &str, obj: Value) -> Result<Value, ApiError> {
        self.shared
            .mutate(|s| s.create(res, ns, obj, "test").map(|(o, ev)| (o, Some(ev))))
            .map(|o| (*o).clone())
    }

    /// Applies a merge patch directly (the status too when `status`), as a test fixture.
    pub fn merge(
        &self,
        res: &ResourceDef,
        ns: &str,
        name: &str,
        patch: Value,
        status: bool,
    ) -> Result<Value, ApiError> {
        self.shared
            .mutate(|s| s.patch(res, ns, name, patch, PatchKind::Merge, status, Some("test")))
            .map(|o| (*o).clone())
    }

    /// Deletes an object directly.
    pub fn delete(&self, res: &ResourceDef, ns: &str, name: &str) -> Result<(), ApiError> {
        self.shared.mutate(|s| s.delete(res, ns, name)).map(|_| ())
    }

    /// One object, if it exists.
    pub fn get(&self, res: &ResourceDef, ns: &str, name: &str) -> Option<Value> {
        self.shared
            .store
            .lock()
            .get(res, ns, name)
            .ok()
            .map(|o| (*o).clone())
    }

    /// Every object of a resource type.
    pub fn list(&self, res: &ResourceDef) -> Vec<Value> {
        self.shared
            .store
            .lock()
            .list(res, &Selection::default())
            .0
            .into_iter()
            .map(|o| (*o).clone())
            .collect()
    }

    /// Field managers of an object and the (dotted) paths each owns.
    pub fn managers(
        &self,
        res: &ResourceDef,
        ns: &str,
        name: &str,
    ) -> std::collections::BTreeMap<String, Vec<String>> {
        self.shared.store.lock().managers(res, ns, name)
    }

    /// Forgets the watch history: watchers that reconnect from an old resourceVersion get
    /// 410 Gone and must re-list.
    pub fn compact(&self) {
        self.shared.store.lock().compact();
    }

    /// Every request answered so far (the most recent 10,000).
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.requests.lock().iter().cloned().collect()
    }

    /// Stops the server and closes every watch.
    pub fn stop(&self) {
        let _ = self.shutdown.send(true);
        self.task.abort();
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

// === request handling ===

/// Where a request points.
#[derive(Debug)]
struct Target {
    res: ResourceDef,
    namespace: Option<String>,
    name: Option<String>,
    status: bool,
}

enum Route {
    Discovery(Value),
    Resource(Target),
}

async fn handle(
    axum::extract::State(shared): axum::extract::State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let query = parse_query(uri.query().unwrap_or_default());
    let field_manager = query_get(&query, "fieldManager").map(str::to_owned);
    let response = match route(&shared, uri.path()) {
        Ok(Route::Discovery(v)) if method == Method::GET => json_response(StatusCode::OK, &v),
        Ok(Route::Discovery(_)) => error_response(&ApiError::new(
            405,
            "MethodNotAllowed",
            "discovery is read-only",
        )),
        Ok(Route::Resource(t)) => {
            match serve_resource(&shared, &method, t, &query, &headers, &body) {
                Ok(r) => r,
                Err(e) => error_response(&e),
            }
        }
        Err(e) => error_response(&e),
    };
    let mut log = shared.requests.lock();
    log.push_back(RequestRecord {
        method: method.to_string(),
        path: uri.path().to_owned(),
        field_manager,
        status: response.status().as_u16(),
    });
    while log.len() > REQUEST_LOG_LIMIT {
        log.pop_front();
    }
    response
}

fn route(shared: &Shared, path: &str) -> Result<Route, ApiError> {
    let segs: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let store = shared.store.lock();
    let not_found = || {
        ApiError::new(
            404,
            "NotFound",
            format!("the server could not find the requested resource ({path})"),
        )
    };
    let (group, version, rest) = match segs.as_slice() {
        ["version"] => {
            return Ok(Route::Discovery(
                json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-sluice-fake"}),
            ));
        }
        ["api"] => {
            return Ok(Route::Discovery(
                json!({"kind": "APIVersions", "versions": ["v1"]}),
            ));
        }
        ["apis"] => {
            let mut groups: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
            for r in store.resources().filter(|r| !r.group.is_empty()) {
                let versions = groups.entry(r.group.as_str()).or_default();
                if !versions.contains(&r.version.as_str()) {
                    versions.push(r.version.as_str());
                }
            }
            let groups: Vec<Value> = groups
                .into_iter()
                .map(|(g, vs)| {
                    let versions: Vec<Value> = vs
                        .iter()
                        .map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
                        .collect();
                    json!({"name": g, "versions": versions, "preferredVersion": versions[0]})
                })
                .collect();
            return Ok(Route::Discovery(
                json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}),
            ));
        }
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return Err(not_found()),
    };
    if rest.is_empty() {
        let resources: Vec<Value> = store
            .resources()
            .filter(|r| r.group == group && r.version == version)
            .flat_map(|r| {
                let verbs = json!(["create", "delete", "get", "list", "patch", "update", "watch"]);
                let main = json!({"name": r.plural, "singularName": r.kind.to_lowercase(), "namespaced": r.namespaced,
                                  "kind": r.kind, "verbs": verbs});
                let status = r.status_subresource.then(|| {
                    json!({"name": format!("{}/status", r.plural), "singularName": "", "namespaced": r.namespaced,
                           "kind": r.kind, "verbs": ["get", "patch", "update"]})
                });
                std::iter::once(main).chain(status)
            })
            .collect();
        if resources.is_empty() {
            return Err(not_found());
        }
        let gv = if group.is_empty() {
            version.to_owned()
        } else {
            format!("{group}/{version}")
        };
        return Ok(Route::Discovery(
            json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}),
        ));
    }
    let (namespace, rest) = match rest {
        ["namespaces", ns, plural, tail @ ..] => {
            (Some((*ns).to_owned()), [&[*plural][..], tail].concat())
        }
        other => (None, other.to_vec()),
    };
    let (plural, name, sub) = match rest.as_slice() {
        [p] => (*p, None, None),
        [p, n] => (*p, Some((*n).to_owned()), None),
        [p, n, s] => (*p, Some((*n).to_owned()), Some(*s)),
        _ => return Err(not_found()),
    };
    let res = store
        .resource(group, version, plural)
        .cloned()
        .ok_or_else(not_found)?;
    if res.namespaced && name.is_some() && namespace.is_none() {
        return Err(not_found());
    }
    let status = match sub {
        None => false,
        Some("status") if res.status_subresource => true,
        Some(_) => return Err(not_found()),
    };
    Ok(Route::Resource(Target {
        res,
        namespace,
        name,
        status,
    }))
}

fn serve_resource(
    shared: &Arc<Shared>,
    method: &Method,
    t: Target,
    query: &[(String, String)],
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Response, ApiError> {
    let ns = if t.res.namespaced {
        t.namespace.clone().unwrap_or_default()
    } else {
        String::new()
    };
    let manager = query_get(query, "fieldManager");
    match (method, &t.name) {
        (&Method::GET, None) => {
            let sel = Selection {
                namespace: t.namespace.clone().filter(|_| t.res.namespaced),
                labels: LabelSelector::parse(query_get(query, "labelSelector").unwrap_or_default())
                    .map_err(ApiError::bad_request)?,
                fields: FieldSelector::parse(query_get(query, "fieldSelector").unwrap_or_default())
                    .map_err(ApiError::bad_request)?,
            };
            if matches!(query_get(query, "watch"), Some("true" | "1")) {
                return watch(shared, &t.res, sel, query);
            }
            list(shared, &t.res, &sel, query)
        }
        (&Method::GET, Some(name)) => {
            let obj = shared.store.lock().get(&t.res, &ns, name)?;
            Ok(json_response(StatusCode::OK, &obj))
        }
        (&Method::POST, None) => {
            let obj = parse_body(body)?;
            let created = shared.mutate(|s| {
                s.create(&t.res, &ns, obj, manager.unwrap_or("unknown"))
                    .map(|(o, ev)| (o, Some(ev)))
            })?;
            Ok(json_response(StatusCode::CREATED, &created))
        }
        (&Method::PUT, Some(name)) => {
            let obj = parse_body(body)?;
            let out = shared.mutate(|s| {
                s.replace(
                    &t.res,
                    &ns,
                    name,
                    obj,
                    t.status,
                    manager.unwrap_or("unknown"),
                )
            })?;
            Ok(json_response(StatusCode::OK, &out))
        }
        (&Method::PATCH, Some(name)) => {
            let content_type = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            let kind = match content_type.split(';').next().unwrap_or_default().trim() {
                "application/merge-patch+json" => PatchKind::Merge,
                "application/strategic-merge-patch+json" => PatchKind::Strategic,
                "application/json-patch+json" => PatchKind::Json,
                "application/apply-patch+yaml" | "application/apply-patch+cbor" => {
                    PatchKind::Apply {
                        force: matches!(query_get(query, "force"), Some("true" | "1")),
                    }
                }
                other => {
                    return Err(ApiError::new(
                        415,
                        "UnsupportedMediaType",
                        format!("the body of the request was in an unknown format: {other}"),
                    ));
                }
            };
            let patch = parse_body(body)?;
            let out =
                shared.mutate(|s| s.patch(&t.res, &ns, name, patch, kind, t.status, manager))?;
            Ok(json_response(StatusCode::OK, &out))
        }
        (&Method::DELETE, Some(name)) => {
            let out = shared.mutate(|s| s.delete(&t.res, &ns, name))?;
            Ok(json_response(StatusCode::OK, &out))
        }
        _ => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            format!("{method} is not supported here"),
        )),
    }
}

fn list(
    shared: &Shared,
    res: &ResourceDef,
    sel: &Selection,
    query: &[(String, String)],
) -> Result<Response, ApiError> {
    let (items, rv) = shared.store.lock().list(res, sel);
    let offset: usize = match query_get(query, "continue").filter(|c| !c.is_empty()) {
        Some(c) => c
            .parse()
            .map_err(|_| ApiError::new(410, "Expired", format!("invalid continue token {c:?}")))?,
        None => 0,
    };
    let limit = query_get(query, "limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0);
    let end = limit.map_or(items.len(), |l| (offset + l).min(items.len()));
    let page: Vec<&Value> = items
        .iter()
        .skip(offset)
        .take(end.saturating_sub(offset))
        .map(|o| &**o)
        .collect();
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if end < items.len() {
        metadata["continue"] = json!(end.to_string());
    }
    let body = json!({"apiVersion": res.api_version(), "kind": format!("{}List", res.kind), "metadata": metadata, "items": page});
    Ok(json_response(StatusCode::OK, &body))
}

/// Translates a stored event for a watcher with a selection: an object that stops matching
/// is deleted for that watcher, one that starts matching is added.
fn translate(ev: &StoredEvent, sel: &Selection) -> Option<(&'static str, Arc<Value>)> {
    let old = ev.old.as_deref().is_some_and(|o| sel.matches(o));
    let new = sel.matches(&ev.object);
    let kind = match ev.kind {
        EventType::Added if new => "ADDED",
        EventType::Deleted if old => "DELETED",
        EventType::Modified => match (old, new) {
            (true, true) => "MODIFIED",
            (false, true) => "ADDED",
            (true, false) => "DELETED",
            (false, false) => return None,
        },
        _ => return None,
    };
    Some((kind, ev.object.clone()))
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

fn watch(
    shared: &Arc<Shared>,
    res: &ResourceDef,
    sel: Selection,
    query: &[(String, String)],
) -> Result<Response, ApiError> {
    let bookmarks = matches!(query_get(query, "allowWatchBookmarks"), Some("true" | "1"));
    let initial_events = matches!(query_get(query, "sendInitialEvents"), Some("true" | "1"));
    let timeout = query_get(query, "timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs);
    let requested_rv = query_get(query, "resourceVersion").unwrap_or_default();

    let mut initial: Vec<Bytes> = Vec::new();
    let (mut live, start_rv) = {
        let store = shared.store.lock();
        let live = shared.events.subscribe();
        let current = store.current_rv();
        if initial_events || requested_rv.is_empty() || requested_rv == "0" {
            for obj in store.list(res, &sel).0 {
                initial.push(event_line("ADDED", &obj));
            }
            if initial_events {
                let bm = json!({"apiVersion": res.api_version(), "kind": res.kind,
                    "metadata": {"resourceVersion": current.to_string(),
                                 "annotations": {"k8s.io/initial-events-end": "true"}}});
                initial.push(event_line("BOOKMARK", &bm));
            }
        } else {
            let rv: u64 = requested_rv.parse().map_err(|_| {
                ApiError::bad_request(format!("invalid resourceVersion {requested_rv:?}"))
            })?;
            match store.events_since(res, rv) {
                Some(events) => {
                    for ev in events {
                        if let Some((kind, obj)) = translate(&ev, &sel) {
                            initial.push(event_line(kind, &obj));
                        }
                    }
                }
                None => {
                    let gone = ApiError::new(
                        410,
                        "Expired",
                        format!("too old resource version: {rv} ({current})"),
                    );
                    initial.push(event_line("ERROR", &gone.to_status()));
                    let stream = tokio_stream::iter(initial.into_iter().map(Ok::<_, Infallible>));
                    return Ok(stream_response(Body::from_stream(stream)));
                }
            }
        }
        (live, current)
    };

    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(WATCH_BUFFER);
    let res = res.clone();
    let mut shutdown = shared.shutdown.clone();
    let bookmark_interval = shared.bookmark_interval;
    let api_version = res.api_version();
    tokio::spawn(async move {
        for line in initial {
            if tx.send(Ok(line)).await.is_err() {
                return;
            }
        }
        let mut last_seen = start_rv;
        let deadline = tokio::time::sleep(timeout.unwrap_or(Duration::from_secs(3600)));
        tokio::pin!(deadline);
        let mut ticker = tokio::time::interval(bookmark_interval);
        ticker.tick().await;
        loop {
            tokio::select! {
                ev = live.recv() => match ev {
                    Ok(ev) => {
                        if ev.rv <= last_seen {
                            continue;
                        }
                        last_seen = ev.rv;
                        if ev.resource != res {
                            continue;
                        }
                        if let Some((kind, obj)) = translate(&ev, &sel)
                            && tx.send(Ok(event_line(kind, &obj))).await.is_err()
                        {
                            return;
                        }
                    }
                    // A watcher that fell behind is disconnected, as a real server does; it
                    // resumes from its last version (or re-lists after 410).
                    Err(_) => return,
                },
                _ = ticker.tick(), if bookmarks => {
                    let bm = json!({"apiVersion": api_version, "kind": res.kind,
                                    "metadata": {"resourceVersion": last_seen.to_string()}});
                    if tx.send(Ok(event_line("BOOKMARK", &bm))).await.is_err() {
                        return;
                    }
                }
                _ = &mut deadline => return,
                _ = shutdown.changed() => return,
                _ = tx.closed() => return,
            }
        }
    });
    Ok(stream_response(Body::from_stream(ReceiverStream::new(rx))))
}

fn stream_response(body: Body) -> Response {
    let mut r = Response::new(body);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

fn parse_body(body: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(body).or_else(|json_err| {
        let text = std::str::from_utf8(body)
            .map_err(|_| ApiError::bad_request("request body is not UTF-8"))?;
        serde_saphyr::from_str::<Value>(text).map_err(|e| {
            ApiError::bad_request(format!(
                "request body is neither JSON ({json_err}) nor YAML ({e})"
            ))
        })
    })
}

fn json_response(code: StatusCode, v: &Value) -> Response {
    let body = serde_json::to_vec(v).unwrap_or_default();
    (code, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn error_response(e: &ApiError) -> Response {
    json_response(
        StatusCode::from_u16(e.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &e.to_status(),
    )
}

fn parse_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn query_get<'a>(q: &'a [(String, String)], key: &str) -> Option<&'a str> {
    q.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => match s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                Some(b) => {
                    out.push(b);
                    i += 2;
                }
                None => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding_handles_selectors() {
        assert_eq!(
            percent_decode("app%3Dvllm%2Ctier+in+%28a%29"),
            "app=vllm,tier in (a)"
        );
        assert_eq!(percent_decode("100%"), "100%");
    }
}
