//! The OpenAI-compatible HTTP server around one [`Engine`].
//!
//! One tokio task (the driver) steps the engine: it forms a batch at simulated time `t`,
//! sleeps until the wall-clock instant of `t + step` (divided by the time scale), then applies
//! the step and wakes the requests that got a token. Each request's handler waits on a
//! [`Slot`] holding its token count, so a slow client costs a counter, never a growing queue.
//! Streaming answers are real SSE written as tokens appear: one event per token, rendered from
//! a per-request template (this is the hot path of a busy fleet: one call per token), and the
//! events that are ready when the body is polled go out as one frame.
//!
//! The accept loop is our own (hyper-util's auto builder per connection) so that a "die" fault
//! can drop the listener and every open connection, and a later revive can bind the same port.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::{BufMut, BytesMut};
use hyper::body::Frame;
use parking_lot::Mutex;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};

use tokio::task::JoinSet;

use crate::api::{self, Api, Prompt};
use crate::engine::{Engine, EngineConfig, Micros, ReqId, RequestStats, SimRequest};
use crate::metrics::{self, EngineFlavor};
use crate::tokenizer;

/// Response header naming the simulated server that answered.
pub const SERVER_HEADER: &str = "x-sim-server";

/// Faults to inject. Rates are shares of requests in `[0, 1]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Share of generation requests answered with `error_status` at once.
    pub error_rate: f64,
    /// Status used for injected errors (500–599).
    pub error_status: u16,
    /// Share of generation requests that never answer (until `hang_ms`, then 504).
    pub hang_rate: f64,
    /// How long a hung request holds its connection, milliseconds.
    pub hang_ms: u64,
    /// Share of streamed requests whose connection is dropped mid-stream.
    pub drop_rate: f64,
    /// Delay before `/metrics` answers, milliseconds.
    pub metrics_delay_ms: u64,
    /// Answer `/metrics` with text that is not the Prometheus format.
    pub metrics_garbage: bool,
}

impl Default for Faults {
    fn default() -> Self {
        Self {
            error_rate: 0.0,
            error_status: 500,
            hang_rate: 0.0,
            hang_ms: 300_000,
            drop_rate: 0.0,
            metrics_delay_ms: 0,
            metrics_garbage: false,
        }
    }
}

impl Faults {
    /// Checks ranges; the error names the field and the expected range.
    pub fn validate(&self) -> Result<(), String> {
        for (name, v) in [
            ("error_rate", self.error_rate),
            ("hang_rate", self.hang_rate),
            ("drop_rate", self.drop_rate),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(format!("faults.{name} must be between 0 and 1, got {v}"));
            }
        }
        if !(500..=599).contains(&self.error_status) {
            return Err(format!(
                "faults.error_status must be a 5xx status (500-599), got {}",
                self.error_status
            ));
        }
        if self.hang_ms > 3_600_000 || self.metrics_delay_ms > 3_600_000 {
            return Err(
                "faults.hang_ms and faults.metrics_delay_ms must be at most 3600000 (one hour)"
                    .into(),
            );
        }
        Ok(())
    }
}

/// Configuration of one simulated server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Name reported in [`SERVER_HEADER`].
    pub name: String,
    /// Address to bind; port 0 picks a free port.
    pub bind: SocketAddr,
    /// Engine configuration.
    pub engine: EngineConfig,
    /// Metric naming scheme.
    pub flavor: EngineFlavor,
    /// Simulated seconds per wall-clock second (> 0).
    pub time_scale: f64,
    /// RNG seed for the engine and fault draws.
    pub seed: u64,
    /// Initial faults.
    pub faults: Faults,
    /// Requests accepted but not finished beyond which new ones get 503.
    pub max_pending: usize,
}

impl ServerConfig {
    /// A server named `name` on a free loopback port with the given engine.
    pub fn new(name: impl Into<String>, engine: EngineConfig) -> Self {
        Self {
            name: name.into(),
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            engine,
            flavor: EngineFlavor::Vllm,
            time_scale: 1.0,
            seed: 0,
            faults: Faults::default(),
            max_pending: 10_000,
        }
    }
}

/// Maps simulated time to wall-clock time.
#[derive(Debug, Clone, Copy)]
struct Clock {
    start: Instant,
    scale: f64,
}

impl Clock {
    fn now_sim(&self) -> Micros {
        (self.start.elapsed().as_secs_f64() * self.scale * 1e6) as Micros
    }
    fn wall_at(&self, sim: Micros) -> Instant {
        self.start + Duration::from_secs_f64(sim as f64 / 1e6 / self.scale)
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Progress {
    tokens: u32,
    finished: Option<RequestStats>,
}

/// What the driver publishes to one request's handler: the latest progress (never a queue of
/// token events) and the waker of the task waiting for the next change.
#[derive(Debug, Default)]
struct SlotState {
    progress: Progress,
    /// The server died (fault injection) and this request is lost.
    closed: bool,
    waker: Option<Waker>,
}

/// One request's mailbox between the engine driver and the HTTP handler.
#[derive(Debug, Default)]
struct Slot(Mutex<SlotState>);

impl Slot {
    fn publish(&self, p: Progress) {
        let w = {
            let mut st = self.0.lock();
            st.progress = p;
            st.waker.take()
        };
        if let Some(w) = w {
            w.wake();
        }
    }

    fn close(&self) {
        let w = {
            let mut st = self.0.lock();
            st.closed = true;
            st.waker.take()
        };
        if let Some(w) = w {
            w.wake();
        }
    }

    /// The current progress and whether the slot was closed, registering `cx` to be woken by
    /// the next change (under the same lock, so no change can slip in between).
    fn poll(&self, cx: &Context<'_>) -> (Progress, bool) {
        let mut st = self.0.lock();
        if !st.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            st.waker = Some(cx.waker().clone());
        }
        (st.progress, st.closed)
    }
}

#[derive(Debug)]
struct Core {
    engine: Engine,
    waiters: HashMap<ReqId, Arc<Slot>>,
    /// End of the last step, simulated.
    busy_until: Micros,
    /// Whether the engine still had work when the last step ended.
    was_busy: bool,
    /// Incremented when a "die" fault replaces the engine, so that guards of requests of the
    /// old engine never abort a request of the new one that reuses their id.
    epoch: u64,
}

#[derive(Debug)]
struct Shared {
    name: String,
    header: HeaderValue,
    model: String,
    model_json: String,
    engine_cfg: EngineConfig,
    flavor: EngineFlavor,
    seed: u64,
    max_pending: usize,
    clock: Clock,
    core: Mutex<Core>,
    wake: Notify,
    faults: Mutex<Faults>,
    rng: Mutex<SmallRng>,
    next_req: AtomicU64,
    /// Set while the server is "dead" (fault injection).
    down: AtomicBool,
    /// Signals the supervisor to die for the given milliseconds.
    die: Mutex<Option<u64>>,
    die_notify: Notify,
    served: AtomicU64,
}

/// Run-time control of a server from the same process.
#[derive(Debug, Clone)]
pub struct Admin {
    shared: Arc<Shared>,
}

impl Admin {
    /// Replaces the fault configuration.
    pub fn set_faults(&self, f: Faults) -> Result<(), String> {
        f.validate()?;
        *self.shared.faults.lock() = f;
        Ok(())
    }

    /// The current fault configuration.
    pub fn faults(&self) -> Faults {
        self.shared.faults.lock().clone()
    }

    /// Kills the server (listener and open connections, in-flight requests lost) and brings
    /// it back, with an empty engine, on the same port after `down_for`.
    pub fn kill_for(&self, down_for: Duration) {
        *self.shared.die.lock() = Some(u64::try_from(down_for.as_millis()).unwrap_or(u64::MAX));
        self.shared.die_notify.notify_one();
    }

    /// Whether the server is currently dead.
    pub fn is_down(&self) -> bool {
        self.shared.down.load(Ordering::SeqCst)
    }

    /// Generation requests answered so far (any status).
    pub fn served(&self) -> u64 {
        self.shared.served.load(Ordering::Relaxed)
    }

    /// The engine's gauges right now.
    pub fn snapshot(&self) -> metrics::EngineSnapshot {
        self.shared.core.lock().engine.snapshot()
    }
}

/// A running server.
#[derive(Debug)]
pub struct Handle {
    /// Bound address.
    pub addr: SocketAddr,
    /// Server name ([`SERVER_HEADER`]).
    pub name: String,
    /// Run-time control.
    pub admin: Admin,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Handle {
    /// `http://addr`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops the server and waits for its tasks.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        for t in std::mem::take(&mut self.tasks) {
            let _ = t.await;
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

/// Binds and starts one simulated server.
pub async fn spawn(cfg: ServerConfig) -> anyhow::Result<Handle> {
    cfg.faults.validate().map_err(anyhow::Error::msg)?;
    if !(cfg.time_scale.is_finite() && cfg.time_scale > 0.0) {
        anyhow::bail!(
            "time_scale must be a positive number, got {}",
            cfg.time_scale
        );
    }
    let listener = TcpListener::bind(cfg.bind).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot bind simulated server {} to {}: {e}",
            cfg.name,
            cfg.bind
        )
    })?;
    let addr = listener.local_addr()?;
    let shared = Arc::new(Shared {
        header: HeaderValue::from_str(&cfg.name).map_err(|_| {
            anyhow::anyhow!("server name {:?} is not a valid header value", cfg.name)
        })?,
        name: cfg.name.clone(),
        model: cfg.engine.model.clone(),
        model_json: serde_json::to_string(&cfg.engine.model)?,
        engine_cfg: cfg.engine.clone(),
        flavor: cfg.flavor,
        seed: cfg.seed,
        max_pending: cfg.max_pending,
        clock: Clock {
            start: Instant::now(),
            scale: cfg.time_scale,
        },
        core: Mutex::new(Core {
            engine: Engine::new(cfg.engine.clone(), cfg.seed),
            waiters: HashMap::new(),
            busy_until: 0,
            was_busy: false,
            epoch: 0,
        }),
        wake: Notify::new(),
        faults: Mutex::new(cfg.faults.clone()),
        rng: Mutex::new(SmallRng::seed_from_u64(cfg.seed ^ 0x5eed_fa17)),
        next_req: AtomicU64::new(0),
        down: AtomicBool::new(false),
        die: Mutex::new(None),
        die_notify: Notify::new(),
        served: AtomicU64::new(0),
    });
    let (shutdown, rx) = watch::channel(false);
    let driver = tokio::spawn(drive(shared.clone(), rx.clone()));
    let supervisor = tokio::spawn(supervise(shared.clone(), listener, addr, rx));
    Ok(Handle {
        addr,
        name: cfg.name,
        admin: Admin { shared },
        shutdown,
        tasks: vec![driver, supervisor],
    })
}

/// Steps the engine in simulated time, mapped to wall time by the clock.
async fn drive(s: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    loop {
        if *shutdown.borrow() {
            return;
        }
        let plan = {
            let mut c = s.core.lock();
            // Back-to-back steps keep exact simulated time (absolute deadlines absorb timer
            // jitter); after idling, the next step starts at the clock's current time.
            let start = if c.was_busy {
                c.busy_until
            } else {
                c.busy_until.max(s.clock.now_sim())
            };
            c.engine.begin_step(start).map(|d| start + d)
        };
        let Some(end) = plan else {
            tokio::select! {
                () = s.wake.notified() => {}
                _ = shutdown.changed() => return,
            }
            continue;
        };
        let deadline = s.clock.wall_at(end);
        if deadline > Instant::now() {
            tokio::select! {
                () = tokio::time::sleep_until(deadline.into()) => {}
                _ = shutdown.changed() => return,
            }
        } else {
            // Behind the clock: run the next step at once but let other tasks in.
            tokio::task::yield_now().await;
        }
        let mut c = s.core.lock();
        c.busy_until = end;
        let events = c.engine.finish_step();
        c.was_busy = c.engine.has_work();
        for ev in events {
            let done = ev.finished.is_some();
            if let Some(slot) = c.waiters.get(&ev.id) {
                slot.publish(Progress {
                    tokens: ev.output_tokens,
                    finished: ev.finished,
                });
            }
            if done {
                c.waiters.remove(&ev.id);
            }
        }
    }
}

/// Serves connections; on a "die" fault drops everything and comes back later.
async fn supervise(
    s: Arc<Shared>,
    listener: TcpListener,
    addr: SocketAddr,
    mut shutdown: watch::Receiver<bool>,
) {
    let app = router(s.clone());
    let mut listener = Some(listener);
    loop {
        let Some(l) = listener.take() else {
            return;
        };
        let mut conns = JoinSet::new();
        let down_ms = loop {
            tokio::select! {
                accepted = l.accept() => {
                    let stream = match accepted {
                        Ok((stream, _)) => stream,
                        Err(e) => {
                            // Out of file descriptors and the like: back off instead of spinning.
                            tracing::warn!(server = %s.name, error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    };
                    let _ = stream.set_nodelay(true);
                    let svc = hyper_util::service::TowerToHyperService::new(app.clone());
                    conns.spawn(async move {
                        let io = hyper_util::rt::TokioIo::new(stream);
                        let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                            .serve_connection(io, svc)
                            .await;
                    });
                    // Reap finished connection tasks so the set stays bounded by open connections.
                    while conns.try_join_next().is_some() {}
                }
                () = s.die_notify.notified() => {
                    if let Some(ms) = s.die.lock().take() { break Some(ms); }
                }
                _ = shutdown.changed() => break None,
            }
        };
        drop(l);
        conns.abort_all();
        let Some(ms) = down_ms else {
            return;
        };
        s.down.store(true, Ordering::SeqCst);
        tracing::info!(server = %s.name, %addr, down_ms = ms, "simulated server died (fault injection)");
        {
            // A restarted server has an empty engine; in-flight requests are lost.
            let mut c = s.core.lock();
            for (_, slot) in c.waiters.drain() {
                slot.close();
            }
            c.engine = Engine::new(s.engine_cfg.clone(), s.seed);
            c.was_busy = false;
            c.epoch += 1;
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(ms)) => {}
            _ = shutdown.changed() => return,
        }
        // The port was ours a moment ago; retry briefly in case the OS is slow to release it.
        for _ in 0..50 {
            match TcpListener::bind(addr).await {
                Ok(l) => {
                    listener = Some(l);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        if listener.is_none() {
            tracing::warn!(server = %s.name, %addr, "simulated server could not bind its port again; it stays down");
        } else {
            tracing::info!(server = %s.name, %addr, "simulated server is back");
        }
        s.down.store(false, Ordering::SeqCst);
    }
}

fn router(s: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics_page))
        .route(
            "/admin/faults",
            get(get_faults).put(put_faults).post(put_faults),
        )
        .route("/admin/down", post(admin_down))
        .route("/reset_prefix_cache", post(reset_prefix_cache))
        .with_state(s)
}

fn with_server(s: &Shared, mut r: Response) -> Response {
    r.headers_mut().insert(SERVER_HEADER, s.header.clone());
    r
}

fn json_error(s: &Shared, status: StatusCode, kind: &str, msg: &str) -> Response {
    with_server(
        s,
        (
            status,
            axum::Json(api::error_body(msg, kind, status.as_u16())),
        )
            .into_response(),
    )
}

async fn health(State(s): State<Arc<Shared>>) -> Response {
    with_server(&s, StatusCode::OK.into_response())
}

async fn models(State(s): State<Arc<Shared>>) -> Response {
    let created = unix_secs();
    let mut data = vec![
        json!({"id": s.model, "object": "model", "created": created, "owned_by": "vllm", "root": s.model, "parent": null, "max_model_len": s.engine_cfg.max_model_len}),
    ];
    for a in &s.engine_cfg.lora_adapters {
        data.push(json!({"id": a, "object": "model", "created": created, "owned_by": "vllm", "root": a, "parent": s.model}));
    }
    with_server(
        &s,
        axum::Json(json!({"object": "list", "data": data})).into_response(),
    )
}

async fn metrics_page(State(s): State<Arc<Shared>>) -> Response {
    let faults = s.faults.lock().clone();
    if faults.metrics_delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(faults.metrics_delay_ms)).await;
    }
    if faults.metrics_garbage {
        return with_server(
            &s,
            "vllm:num_requests_waiting{{{ not a number\n\u{1}garbage 12 34 56\n".into_response(),
        );
    }
    let text = {
        let c = s.core.lock();
        metrics::render(&metrics::MetricsPage {
            flavor: s.flavor,
            model: &s.model,
            snapshot: &c.engine.snapshot(),
            stats: c.engine.stats(),
            unix_time: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
        })
    };
    let mut r = text.into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    with_server(&s, r)
}

async fn get_faults(State(s): State<Arc<Shared>>) -> Response {
    axum::Json(s.faults.lock().clone()).into_response()
}

async fn put_faults(State(s): State<Arc<Shared>>, body: Bytes) -> Response {
    let f: Faults = match serde_json::from_slice(&body) {
        Ok(f) => f,
        Err(e) => {
            return json_error(
                &s,
                StatusCode::BAD_REQUEST,
                "BadRequestError",
                &format!("invalid fault configuration: {e}"),
            );
        }
    };
    if let Err(e) = f.validate() {
        return json_error(&s, StatusCode::BAD_REQUEST, "BadRequestError", &e);
    }
    *s.faults.lock() = f.clone();
    axum::Json(f).into_response()
}

#[derive(Deserialize)]
struct DownQuery {
    ms: Option<u64>,
}

async fn admin_down(State(s): State<Arc<Shared>>, Query(q): Query<DownQuery>) -> Response {
    let Some(ms) = q.ms.filter(|ms| *ms <= 3_600_000) else {
        return json_error(
            &s,
            StatusCode::BAD_REQUEST,
            "BadRequestError",
            "query parameter `ms` (0-3600000) is required: how long the server stays down",
        );
    };
    let s2 = s.clone();
    // Let this answer reach the client before the connections are dropped.
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(20)).await;
        *s2.die.lock() = Some(ms);
        s2.die_notify.notify_one();
    });
    axum::Json(json!({"down_ms": ms})).into_response()
}

async fn reset_prefix_cache(State(s): State<Arc<Shared>>) -> Response {
    s.core.lock().engine.reset_prefix_cache();
    with_server(&s, StatusCode::OK.into_response())
}

async fn completions(State(s): State<Arc<Shared>>, body: Bytes) -> Response {
    generate(s, Api::Completions, body).await
}

async fn chat(State(s): State<Arc<Shared>>, body: Bytes) -> Response {
    generate(s, Api::Chat, body).await
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Aborts the engine request if the handler (or its stream) is dropped before the end.
#[derive(Debug)]
struct Cancel {
    s: Arc<Shared>,
    id: ReqId,
    epoch: u64,
    done: bool,
}

impl Drop for Cancel {
    fn drop(&mut self) {
        if !self.done {
            let mut c = self.s.core.lock();
            if c.epoch != self.epoch {
                return;
            }
            c.waiters.remove(&self.id);
            c.engine.abort(self.id);
        }
    }
}

async fn generate(s: Arc<Shared>, api: Api, body: Bytes) -> Response {
    s.served.fetch_add(1, Ordering::Relaxed);
    let (fail, hang, drop_at) = {
        let f = s.faults.lock().clone();
        let mut rng = s.rng.lock();
        let fail = rng.random::<f64>() < f.error_rate;
        let hang = rng.random::<f64>() < f.hang_rate;
        let drop = rng.random::<f64>() < f.drop_rate;
        (
            fail.then_some(f.error_status),
            hang.then_some(f.hang_ms),
            drop,
        )
    };
    if let Some(status) = fail {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return json_error(
            &s,
            status,
            "InternalServerError",
            "injected fault: simulated server error",
        );
    }
    if let Some(ms) = hang {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        return json_error(
            &s,
            StatusCode::GATEWAY_TIMEOUT,
            "Timeout",
            "injected fault: request hung",
        );
    }
    let req = match api::parse(api, &body) {
        Ok(r) => r,
        Err(e) => {
            return with_server(
                &s,
                (StatusCode::BAD_REQUEST, axum::Json(e.body())).into_response(),
            );
        }
    };
    let lora = if req.model == s.model {
        None
    } else if s.engine_cfg.lora_adapters.contains(&req.model) {
        Some(req.model.as_str())
    } else {
        return json_error(
            &s,
            StatusCode::NOT_FOUND,
            "NotFoundError",
            &format!("The model `{}` does not exist.", req.model),
        );
    };
    let bs = s.engine_cfg.block_size;
    let tp = match &req.prompt {
        Prompt::Text(t) => tokenizer::tokenize_text(t, &s.model, lora, bs),
        Prompt::Ids(ids) => tokenizer::tokenize_ids(ids, &s.model, lora, bs),
    };
    let (id, epoch, slot) = {
        let mut c = s.core.lock();
        if c.waiters.len() >= s.max_pending {
            drop(c);
            return json_error(
                &s,
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailableError",
                &format!(
                    "server overloaded: {} requests pending (limit {})",
                    s.max_pending, s.max_pending
                ),
            );
        }
        // When the driver runs behind the wall clock (timer granularity at high time scales,
        // or a busy CPU), an arrival is stamped no later than the engine's own time, so no
        // request gets its first token "before" it arrived.
        let wall = s.clock.now_sim();
        let now = if c.was_busy {
            wall.min(c.busy_until)
        } else {
            wall
        };
        let submitted = c.engine.submit(
            SimRequest {
                prompt_tokens: tp.tokens,
                block_hashes: tp.block_hashes,
                max_tokens: req.max_tokens,
                ignore_eos: req.ignore_eos,
                lora: lora.map(str::to_owned),
            },
            now,
        );
        match submitted {
            Ok(id) => {
                let slot = Arc::new(Slot::default());
                c.waiters.insert(id, slot.clone());
                (id, c.epoch, slot)
            }
            Err(e) => {
                drop(c);
                return json_error(
                    &s,
                    StatusCode::BAD_REQUEST,
                    "BadRequestError",
                    &e.to_string(),
                );
            }
        }
    };
    s.wake.notify_one();
    let n = s.next_req.fetch_add(1, Ordering::Relaxed);
    // Only characters that need no JSON escaping, since chunks are formatted by hand.
    let tag: String = s
        .name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .collect();
    let rid = match api {
        Api::Completions => format!("cmpl-{tag}-{n}"),
        Api::Chat => format!("chatcmpl-{tag}-{n}"),
    };
    let created = unix_secs();
    let mut cancel = Cancel {
        s: s.clone(),
        id,
        epoch,
        done: false,
    };
    if !req.stream {
        let fin = std::future::poll_fn(|cx| match slot.poll(cx) {
            (
                Progress {
                    finished: Some(f), ..
                },
                _,
            ) => Poll::Ready(Some(f)),
            (_, true) => Poll::Ready(None),
            _ => Poll::Pending,
        })
        .await;
        let Some(fin) = fin else {
            return json_error(
                &s,
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailableError",
                "the simulated server restarted",
            );
        };
        cancel.done = true;
        let body = api::full_response(
            api,
            &rid,
            &s.model,
            created,
            &api::generated_text(fin.output_tokens),
            fin.reason.as_str(),
            api::usage(fin.prompt_tokens, fin.output_tokens, fin.cached_tokens),
        );
        return with_server(&s, axum::Json(body).into_response());
    }
    let drop_after = if drop_at {
        // Cut somewhere in the first half of the output (at least after one token).
        let max = req.max_tokens.unwrap_or(16).max(2);
        Some(s.rng.lock().random_range(1..=max.div_ceil(2)))
    } else {
        None
    };
    let body = SseBody {
        tmpl: ChunkTemplate::new(api, &rid, &s.model_json, created),
        rid,
        created,
        api,
        slot,
        cancel,
        sent: 0,
        drop_after,
        include_usage: req.include_usage,
        buf: BytesMut::new(),
        phase: Phase::Streaming,
    };
    let mut r = Response::new(Body::new(body));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    with_server(&s, r)
}

/// The constant parts of one request's token chunks, so that rendering a token is three
/// copies into the frame buffer (no formatting, no `serde_json::Value`, no allocation).
#[derive(Debug)]
struct ChunkTemplate {
    /// `data: {...` up to the opening quote of the token text.
    head: Box<[u8]>,
    /// From the closing quote of the text to `"finish_reason":`.
    mid: &'static [u8],
    /// After the finish reason to the end of the event.
    tail: &'static [u8],
}

impl ChunkTemplate {
    /// `model_json` is the model name already JSON-encoded (with its quotes); `id` must need no
    /// JSON escaping (the server builds it from ASCII letters, digits and dashes).
    fn new(api: Api, id: &str, model_json: &str, created: u64) -> Self {
        let (object, open, mid, tail): (&str, &str, &'static [u8], &'static [u8]) = match api {
            Api::Completions => (
                "text_completion",
                "\"text\":\"",
                b"\",\"logprobs\":null,\"finish_reason\":",
                b",\"stop_reason\":null}]}\n\n",
            ),
            Api::Chat => (
                "chat.completion.chunk",
                "\"delta\":{\"role\":\"assistant\",\"content\":\"",
                b"\"},\"logprobs\":null,\"finish_reason\":",
                b"}]}\n\n",
            ),
        };
        let head = format!(
            "data: {{\"id\":\"{id}\",\"object\":\"{object}\",\"created\":{created},\"model\":{model_json},\"choices\":[{{\"index\":0,{open}"
        );
        Self {
            head: head.into_bytes().into_boxed_slice(),
            mid,
            tail,
        }
    }

    /// Appends the event of one token; `text` must need no JSON escaping (see
    /// [`api::token_text`]).
    fn push(&self, buf: &mut BytesMut, text: &str, finish: Option<&str>) {
        let fin_len = finish.map_or(4, |f| f.len() + 2);
        let len = self.head.len() + text.len() + self.mid.len() + fin_len + self.tail.len();
        if buf.capacity() - buf.len() < len {
            // Frames are split off this buffer, so one allocation serves many tokens.
            buf.reserve(len.max(FRAME_ALLOC));
        }
        buf.put_slice(&self.head);
        buf.put_slice(text.as_bytes());
        buf.put_slice(self.mid);
        match finish {
            None => buf.put_slice(b"null"),
            Some(f) => {
                buf.put_u8(b'"');
                buf.put_slice(f.as_bytes());
                buf.put_u8(b'"');
            }
        }
        buf.put_slice(self.tail);
    }
}

/// Bytes reserved at a time for a stream's frames (about 16 token events).
const FRAME_ALLOC: usize = 4096;

#[derive(Debug)]
enum Phase {
    Streaming,
    /// The next frame is this error (connection dropped), then the end.
    Broken(&'static str),
    Done,
}

/// The SSE body of one streamed request, polled by hyper straight from the request's slot:
/// whatever tokens exist when it is polled go out as one frame, one event per token.
#[derive(Debug)]
struct SseBody {
    tmpl: ChunkTemplate,
    rid: String,
    created: u64,
    api: Api,
    slot: Arc<Slot>,
    /// Aborts the engine request if the client goes away mid-stream.
    cancel: Cancel,
    sent: u32,
    drop_after: Option<u32>,
    include_usage: bool,
    buf: BytesMut,
    phase: Phase,
}

impl SseBody {
    fn frame(&mut self) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        Poll::Ready(Some(Ok(Frame::data(self.buf.split().freeze()))))
    }
}

impl hyper::body::Body for SseBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = self.get_mut();
        match this.phase {
            Phase::Streaming => {}
            Phase::Broken(msg) => {
                this.phase = Phase::Done;
                return Poll::Ready(Some(Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionAborted,
                    msg,
                ))));
            }
            Phase::Done => return Poll::Ready(None),
        }
        let (p, closed) = this.slot.poll(cx);
        if p.tokens > this.sent {
            while this.sent < p.tokens {
                if this.drop_after.is_some_and(|d| this.sent >= d) {
                    this.phase = Phase::Broken("injected fault: connection dropped mid-stream");
                    return this.frame();
                }
                let last = this.sent + 1 == p.tokens;
                let finish = if last {
                    p.finished.map(|f| f.reason.as_str())
                } else {
                    None
                };
                this.tmpl
                    .push(&mut this.buf, api::token_text(this.sent), finish);
                this.sent += 1;
            }
            if let Some(f) = p.finished {
                if this.include_usage {
                    let u = api::usage_chunk(
                        this.api,
                        &this.rid,
                        &this.cancel.s.model,
                        this.created,
                        api::usage(f.prompt_tokens, f.output_tokens, f.cached_tokens),
                    );
                    this.buf.put_slice(b"data: ");
                    this.buf.put_slice(u.to_string().as_bytes());
                    this.buf.put_slice(b"\n\n");
                }
                this.buf.put_slice(b"data: [DONE]\n\n");
                this.cancel.done = true;
                this.phase = Phase::Done;
            }
            return this.frame();
        }
        if closed {
            this.phase = Phase::Done;
            return Poll::Ready(Some(Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "the simulated server restarted",
            ))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.phase, Phase::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn template_chunks_are_the_reference_chunks_byte_for_byte_in_json() {
        // A model name that needs escaping, as the template embeds it pre-encoded.
        let model = "org/model \"q\" \\ é";
        let model_json = serde_json::to_string(model).unwrap();
        for api in [Api::Completions, Api::Chat] {
            let t = ChunkTemplate::new(api, "cmpl-sim-0-7", &model_json, 1_234);
            let mut buf = BytesMut::new();
            t.push(&mut buf, api::token_text(3), None);
            t.push(&mut buf, api::token_text(4), Some("length"));
            let text = std::str::from_utf8(&buf).unwrap();
            let events: Vec<&str> = text.split_terminator("\n\n").collect();
            assert_eq!(events.len(), 2, "{text}");
            for (ev, (tok, fin)) in events.iter().zip([(3, None), (4, Some("length"))]) {
                let v: Value = serde_json::from_str(ev.strip_prefix("data: ").unwrap()).unwrap();
                let want =
                    api::stream_chunk(api, "cmpl-sim-0-7", model, 1_234, api::token_text(tok), fin);
                assert_eq!(v, want, "{api:?}");
            }
        }
    }

    #[test]
    fn one_buffer_serves_many_frames() {
        let t = ChunkTemplate::new(Api::Completions, "cmpl-x-1", "\"m\"", 1);
        let mut buf = BytesMut::new();
        let mut frames = Vec::new();
        for i in 0..40 {
            t.push(&mut buf, api::token_text(i), None);
            frames.push(buf.split().freeze());
        }
        // Every frame is one whole event; splitting never corrupts an earlier frame.
        for (i, f) in frames.iter().enumerate() {
            let s = std::str::from_utf8(f).unwrap();
            assert!(s.starts_with("data: {") && s.ends_with("}\n\n"), "{s}");
            assert!(s.contains(api::token_text(i as u32)), "{s}");
        }
    }
}
