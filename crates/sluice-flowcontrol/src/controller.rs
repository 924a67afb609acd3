//! The flow controller: admission, the dispatch task, TTLs and shutdown.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use parking_lot::Mutex;
use prometheus_client::registry::Registry;
use tokio::sync::{Notify, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::FlowControlConfig;
use crate::metrics::{FlowMetrics, Snapshot};
use crate::outcome::{DISPATCHED_LABEL, Outcome};
use crate::queue::{ItemId, NewItem, Queues};
use crate::saturation::SaturationSource;
use crate::workload::{ActiveToken, WorkloadContext, WorkloadRegistry, WorkloadStats};

/// Fairness id used when a request names none (upstream's default).
pub const DEFAULT_FLOW: &str = "default-flow";
/// Request header naming the fairness id (llm-d-router; GIE's alias below).
pub const FAIRNESS_ID_HEADER: &str = "x-llm-d-inference-fairness-id";
/// GIE's name for the fairness-id header.
pub const FAIRNESS_ID_HEADER_ALIAS: &str = "x-gateway-inference-fairness-id";
/// Request header with the TTFT SLO in milliseconds, used by the SLO-deadline ordering.
pub const SLO_TTFT_HEADER: &str = "x-slo-ttft-ms";
/// llm-d-router's name for the TTFT SLO header.
pub const SLO_TTFT_HEADER_ALIAS: &str = "x-llm-d-slo-ttft-ms";
/// Most fairness ids given their own metric label; the rest share `other`.
const MAX_FLOW_LABELS: usize = 100;

/// Parses an `x-slo-ttft-ms` value (a non-negative integer of milliseconds); anything else
/// means "no SLO", as upstream does.
pub fn parse_slo_ttft_ms(value: &str) -> Option<Duration> {
    value.trim().parse::<u64>().ok().map(Duration::from_millis)
}

/// What the flow controller needs to know about one request.
#[derive(Debug, Clone, Default)]
pub struct FlowRequest {
    /// InferenceObjective priority: higher first, negative = sheddable. 0 when unset.
    pub priority: i32,
    /// Fairness id (flow inside the band); `None` = [`DEFAULT_FLOW`].
    pub fairness_id: Option<Arc<str>>,
    /// Workload context from `X-Workload-Context`.
    pub workload: WorkloadContext,
    /// Request size, counted against the byte limits.
    pub bytes: u64,
    /// TTFT SLO, for the SLO-deadline ordering.
    pub slo_ttft: Option<Duration>,
    /// Per-request TTL; `None` = the configured default, zero = no TTL.
    pub ttl: Option<Duration>,
}

/// Proof that a request may proceed to scheduling. Hold it until the response has
/// completed: dropping it frees the in-flight slot (waking the dispatcher) and gives back
/// the workload's active count.
#[derive(Debug)]
pub struct AdmissionGuard {
    _permit: DispatchPermit,
    active: ActiveToken,
    waited: Duration,
}

impl AdmissionGuard {
    /// How long the request waited in the queue (zero when admitted at once).
    pub fn queue_wait(&self) -> Duration {
        self.waited
    }

    /// The workload the request is counted against.
    pub fn workload_id(&self) -> &Arc<str> {
        self.active.entry().id()
    }
}

/// One dispatched, not yet completed request.
#[derive(Debug)]
struct DispatchPermit {
    inner: Arc<Inner>,
    /// Sent by the dispatcher but not yet received by the waiting request.
    in_handoff: bool,
}

impl DispatchPermit {
    /// The waiting request has the permit and is on its way to the scheduler.
    fn received(&mut self) {
        if std::mem::take(&mut self.in_handoff) {
            self.inner.handoffs.fetch_sub(1, Ordering::AcqRel);
            self.inner.wake.notify_one();
        }
    }
}

impl Drop for DispatchPermit {
    fn drop(&mut self) {
        if self.in_handoff {
            self.inner.handoffs.fetch_sub(1, Ordering::AcqRel);
        }
        self.inner.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.inner.wake.notify_one();
    }
}

type Reply = oneshot::Sender<Result<DispatchPermit, Outcome>>;

#[derive(Debug)]
struct State {
    queues: Queues<Reply>,
    shutting_down: bool,
}

#[derive(Debug)]
struct Inner {
    config: FlowControlConfig,
    saturation: Arc<dyn SaturationSource>,
    state: Mutex<State>,
    in_flight: AtomicU64,
    /// Dispatched permits their requests have not picked up yet. The dispatcher releases
    /// the next request only when this is zero, so saturation is re-read after the previous
    /// one has reached the scheduler (and its server's load), not from stale numbers.
    handoffs: AtomicU64,
    wake: Notify,
    registry: WorkloadRegistry,
    metrics: Arc<FlowMetrics>,
}

/// Removes a queued item when the waiting future is dropped (client disconnect).
struct Ticket<'a> {
    inner: &'a Arc<Inner>,
    id: Option<ItemId>,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        let Some(id) = self.id else { return };
        let removed = self.inner.state.lock().queues.remove(id);
        if let Some(item) = removed {
            let waited = Instant::now().saturating_duration_since(item.enqueued);
            let outcome = Outcome::EvictedContextCancelled;
            self.inner.metrics.observe(
                &item.flow_label,
                item.band,
                outcome.label(),
                waited.as_secs_f64(),
            );
            tracing::debug!(flow = %item.flow, priority = item.band, "queued request cancelled by its client");
        }
    }
}

#[derive(Debug)]
struct Shared {
    inner: Arc<Inner>,
    task: JoinHandle<()>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.inner.shutdown();
        self.task.abort();
    }
}

/// Queues requests while the pool is saturated and releases them by priority band,
/// fairness between flows and ordering within a flow. Cheap to clone; the dispatcher task
/// stops when the last clone is dropped or [`FlowController::shutdown`] is called.
#[derive(Debug, Clone)]
pub struct FlowController {
    shared: Arc<Shared>,
}

impl FlowController {
    /// Starts a controller and its dispatch task. Must be called inside a tokio runtime.
    /// Time is tokio's clock, so tests can drive it with a paused runtime.
    pub fn new(config: FlowControlConfig, saturation: Arc<dyn SaturationSource>) -> Self {
        Self::with_metrics(config, saturation, FlowMetrics::new(MAX_FLOW_LABELS))
    }

    /// Like [`FlowController::new`], reporting into shared `metrics` (registered once by
    /// the picker) so a controller rebuilt for a new config keeps the same series.
    pub fn with_metrics(
        config: FlowControlConfig,
        saturation: Arc<dyn SaturationSource>,
        metrics: Arc<FlowMetrics>,
    ) -> Self {
        let now = Instant::now();
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                queues: Queues::new(&config, now),
                shutting_down: false,
            }),
            registry: WorkloadRegistry::new(config.workload.clone()),
            config,
            saturation,
            in_flight: AtomicU64::new(0),
            handoffs: AtomicU64::new(0),
            wake: Notify::new(),
            metrics,
        });
        let snapshot: std::sync::Weak<dyn Snapshot> =
            Arc::downgrade(&inner) as std::sync::Weak<Inner>;
        inner.metrics.attach(snapshot);
        let task = tokio::spawn(Inner::run(inner.clone()));
        Self {
            shared: Arc::new(Shared { inner, task }),
        }
    }

    /// The configuration in use.
    pub fn config(&self) -> &FlowControlConfig {
        &self.shared.inner.config
    }

    /// Parses an `X-Workload-Context` header with this controller's default criticality.
    pub fn workload_context(&self, header: Option<&str>) -> WorkloadContext {
        WorkloadContext::from_header(
            header,
            self.shared.inner.config.workload.default_criticality,
        )
    }

    /// Builds a [`FlowRequest`] from request headers (looked up by lower-case name): the
    /// fairness id ([`FAIRNESS_ID_HEADER`] or its alias), `X-Workload-Context` and the TTFT
    /// SLO ([`SLO_TTFT_HEADER`] or its alias). `priority` is the objective's priority.
    pub fn request_from_headers<'h>(
        &self,
        priority: i32,
        bytes: u64,
        header: impl Fn(&str) -> Option<&'h str>,
    ) -> FlowRequest {
        let first = |names: [&str; 2]| names.into_iter().find_map(&header);
        FlowRequest {
            priority,
            fairness_id: first([FAIRNESS_ID_HEADER, FAIRNESS_ID_HEADER_ALIAS])
                .map(str::trim)
                .filter(|f| !f.is_empty() && f.len() <= crate::workload::MAX_WORKLOAD_ID_LEN)
                .map(Arc::from),
            workload: self.workload_context(header(crate::workload::WORKLOAD_CONTEXT_HEADER)),
            bytes,
            slo_ttft: first([SLO_TTFT_HEADER, SLO_TTFT_HEADER_ALIAS]).and_then(parse_slo_ttft_ms),
            ttl: None,
        }
    }

    /// Waits until the request may be scheduled, or returns why it may not.
    ///
    /// Resolves at once while the pool has room and nothing is queued. Dropping the future
    /// (the client went away) removes the request from its queue immediately.
    pub async fn admit(&self, request: FlowRequest) -> Result<AdmissionGuard, Outcome> {
        let inner = &self.shared.inner;
        let now = Instant::now();
        let active = inner.registry.arrive(&request.workload.workload_id, now);
        let (id, rx) = match inner.enqueue(request, &active, now) {
            Enqueued::Now(permit) => {
                return Ok(AdmissionGuard {
                    _permit: permit,
                    active,
                    waited: Duration::ZERO,
                });
            }
            Enqueued::Rejected(outcome) => return Err(outcome),
            Enqueued::Queued(id, rx) => (id, rx),
        };
        let mut ticket = Ticket {
            inner,
            id: Some(id),
        };
        let reply = rx.await;
        // Whoever sent the reply already took the item out of the queue.
        ticket.id = None;
        match reply {
            Ok(Ok(mut permit)) => {
                permit.received();
                let waited = Instant::now().saturating_duration_since(now);
                Ok(AdmissionGuard {
                    _permit: permit,
                    active,
                    waited,
                })
            }
            Ok(Err(outcome)) => Err(outcome),
            Err(_) => Err(Outcome::ShuttingDown),
        }
    }

    /// [`FlowController::admit`] as an owned future: it borrows nothing, so a synchronous
    /// session state machine (the picker's ext_proc session) can store it and poll it from
    /// its stream's `poll_next`. Dropping it leaves the queue like dropping `admit`.
    pub fn admit_owned(&self, request: FlowRequest) -> Admission {
        let fc = self.clone();
        Admission(Box::pin(async move { fc.admit(request).await }))
    }

    /// Tells the dispatcher that saturation may have dropped (metrics refreshed, endpoints
    /// added). Cheap; call it freely.
    pub fn capacity_changed(&self) {
        self.shared.inner.wake.notify_one();
    }

    /// Rejects every queued request with [`Outcome::ShuttingDown`] and every later one too.
    pub fn shutdown(&self) {
        self.shared.inner.shutdown();
    }

    /// Requests dispatched and not yet completed.
    pub fn in_flight(&self) -> u64 {
        self.shared.inner.in_flight.load(Ordering::Acquire)
    }

    /// Requests waiting in queues.
    pub fn queued(&self) -> u64 {
        self.shared.inner.state.lock().queues.len
    }

    /// Bytes waiting in queues.
    pub fn queued_bytes(&self) -> u64 {
        self.shared.inner.state.lock().queues.bytes
    }

    /// Requests waiting in the band of `priority`.
    pub fn queued_in_band(&self, priority: i32) -> u64 {
        let st = self.shared.inner.state.lock();
        st.queues
            .bands()
            .find(|b| b.priority == priority)
            .map_or(0, |b| b.len)
    }

    /// The workload registry (active counts, rates, waits).
    pub fn registry(&self) -> &WorkloadRegistry {
        &self.shared.inner.registry
    }

    /// A copy of one workload's figures.
    pub fn workload_stats(&self, workload_id: &str) -> Option<WorkloadStats> {
        self.shared
            .inner
            .registry
            .stats(workload_id, Instant::now())
    }

    /// Adds this controller's metrics (flow-control and per-workload series) to `registry`
    /// (see [`crate::metrics`] for names, the prefix convention and sharing between
    /// controllers).
    pub fn register(&self, registry: &mut Registry) {
        self.shared.inner.metrics.register(registry);
    }
}

/// An admission in progress; see [`FlowController::admit_owned`].
pub struct Admission(Pin<Box<dyn Future<Output = Result<AdmissionGuard, Outcome>> + Send>>);

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Admission")
    }
}

impl Future for Admission {
    type Output = Result<AdmissionGuard, Outcome>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.0.as_mut().poll(cx)
    }
}

enum Enqueued {
    Now(DispatchPermit),
    Rejected(Outcome),
    Queued(ItemId, oneshot::Receiver<Result<DispatchPermit, Outcome>>),
}

impl Inner {
    fn permit(self: &Arc<Self>, in_handoff: bool) -> DispatchPermit {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        if in_handoff {
            self.handoffs.fetch_add(1, Ordering::AcqRel);
        }
        DispatchPermit {
            inner: self.clone(),
            in_handoff,
        }
    }

    /// Whether `priority` may dispatch now, given the pool's state.
    fn gate_open(&self, queues: &Queues<Reply>, priority: i32, saturation: f64) -> bool {
        saturation
            < self
                .config
                .usage_limit
                .ceiling(priority, queues.priorities())
    }

    fn enqueue(self: &Arc<Self>, req: FlowRequest, active: &ActiveToken, now: Instant) -> Enqueued {
        let flow = req.fairness_id.unwrap_or_else(|| Arc::from(DEFAULT_FLOW));
        let mut st = self.state.lock();
        if st.shutting_down {
            return Enqueued::Rejected(Outcome::ShuttingDown);
        }
        if st.queues.len == 0
            && self.handoffs.load(Ordering::Acquire) == 0
            && self.saturation.has_endpoints()
        {
            let sat = self
                .saturation
                .saturation(self.in_flight.load(Ordering::Acquire));
            if self.gate_open(&st.queues, req.priority, sat) {
                let permit = self.permit(false);
                drop(st);
                self.metrics.observe(
                    &self.metrics.flow_label(&flow),
                    req.priority,
                    DISPATCHED_LABEL,
                    0.0,
                );
                return Enqueued::Now(permit);
            }
        }
        let (tx, rx) = oneshot::channel();
        let flow_label = self.metrics.flow_label(&flow);
        let new = NewItem {
            band: req.priority,
            flow_label: flow_label.clone(),
            flow,
            enqueued: now,
            ttl: req.ttl.unwrap_or(self.config.default_request_ttl),
            slo_deadline: req.slo_ttft.map(|d| now + d),
            bytes: req.bytes,
            criticality: req.workload.criticality,
            workload: active.entry().clone(),
            payload: tx,
        };
        match st.queues.insert(&self.config, new) {
            Ok(id) => {
                drop(st);
                self.wake.notify_one();
                Enqueued::Queued(id, rx)
            }
            Err((outcome, _tx)) => {
                drop(st);
                self.metrics
                    .observe(&flow_label, req.priority, outcome.label(), 0.0);
                Enqueued::Rejected(outcome)
            }
        }
    }

    fn finish(
        &self,
        queues: &mut Queues<Reply>,
        id: ItemId,
        now: Instant,
        result: Result<DispatchPermit, Outcome>,
    ) {
        let Some(item) = queues.remove(id) else {
            return;
        };
        let waited = now.saturating_duration_since(item.enqueued);
        let label = match &result {
            Ok(_) => {
                self.registry.dispatched(&item.workload, waited);
                DISPATCHED_LABEL
            }
            Err(o) => o.label(),
        };
        // A failed send means the client left between our pick and its wake-up; the
        // permit comes back inside the error and is dropped here, freeing the slot.
        let label = if item.payload.send(result).is_err() {
            Outcome::EvictedContextCancelled.label()
        } else {
            label
        };
        self.metrics
            .observe(&item.flow_label, item.band, label, waited.as_secs_f64());
    }

    /// Expires TTLs, dispatches what the gate allows, and returns when to look again.
    fn cycle(self: &Arc<Self>, st: &mut State, now: Instant) -> Option<Instant> {
        let has_endpoints = self.saturation.has_endpoints();
        // TTL expiry.
        while let Some((at, id)) = st.queues.next_expiry() {
            if at > now {
                break;
            }
            let outcome = if has_endpoints {
                Outcome::EvictedTtl
            } else {
                Outcome::EvictedNoEndpoints
            };
            self.finish(&mut st.queues, id, now, Err(outcome));
        }
        let ne_ttl = self.config.no_endpoint_request_ttl;
        if !has_endpoints {
            while let Some((id, enqueued)) = st.queues.oldest() {
                if ne_ttl.is_zero() || enqueued + ne_ttl > now {
                    break;
                }
                self.finish(&mut st.queues, id, now, Err(Outcome::EvictedNoEndpoints));
            }
        }
        let mut blocked = false;
        if has_endpoints && st.queues.len > 0 {
            let started = std::time::Instant::now();
            'cycle: loop {
                if self.handoffs.load(Ordering::Acquire) > 0 {
                    // The pick-up wakes us again.
                    break;
                }
                let sat = self
                    .saturation
                    .saturation(self.in_flight.load(Ordering::Acquire));
                self.metrics.pool_saturation.set(sat);
                let bands: Vec<i32> = st
                    .queues
                    .bands()
                    .filter(|b| b.len > 0)
                    .map(|b| b.priority)
                    .collect();
                if bands.is_empty() {
                    break;
                }
                for priority in bands {
                    // Head-of-line blocking: a closed band stops the cycle so lower bands
                    // cannot overtake it.
                    if !self.gate_open(&st.queues, priority, sat) {
                        blocked = true;
                        break 'cycle;
                    }
                    if let Some(id) = st.queues.pick(priority, now, self.config.workload.window) {
                        let permit = self.permit(true);
                        self.finish(&mut st.queues, id, now, Ok(permit));
                        continue 'cycle;
                    }
                }
                break;
            }
            self.metrics
                .dispatch_cycle
                .observe(started.elapsed().as_secs_f64());
        }
        let mut next = st.queues.next_expiry().map(|(t, _)| t);
        let mut consider = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        if !has_endpoints
            && !ne_ttl.is_zero()
            && let Some((_, enqueued)) = st.queues.oldest()
        {
            consider(enqueued + ne_ttl);
        }
        if st.queues.len > 0 && (blocked || !has_endpoints) {
            consider(now + self.config.recheck_interval);
        }
        next
    }

    async fn run(self: Arc<Self>) {
        let cleanup_every = self.config.workload.cleanup_interval;
        let mut next_cleanup = Instant::now() + cleanup_every;
        loop {
            let now = Instant::now();
            if now >= next_cleanup {
                self.registry.cleanup(now);
                next_cleanup = now + cleanup_every;
            }
            let next = {
                let mut st = self.state.lock();
                if st.shutting_down {
                    return;
                }
                self.cycle(&mut st, now)
            };
            let deadline = next.map_or(next_cleanup, |t| t.min(next_cleanup));
            tokio::select! {
                () = self.wake.notified() => {}
                () = tokio::time::sleep_until(deadline) => {}
            }
        }
    }

    fn shutdown(self: &Arc<Self>) {
        let mut st = self.state.lock();
        st.shutting_down = true;
        let now = Instant::now();
        for id in st.queues.ids() {
            self.finish(&mut st.queues, id, now, Err(Outcome::ShuttingDown));
        }
        drop(st);
        self.wake.notify_one();
    }
}

impl Snapshot for Inner {
    fn queue_sizes(&self) -> Vec<(Arc<str>, i32, u64, u64)> {
        let sizes = self.state.lock().queues.sizes();
        sizes
            .into_iter()
            .map(|((f, p), (n, b))| (f, p, n, b))
            .collect()
    }

    fn workloads(&self) -> Vec<(Arc<str>, u64, f64, f64)> {
        self.registry
            .all_stats(Instant::now())
            .into_iter()
            .map(|s| {
                (
                    s.workload_id,
                    s.active_requests,
                    s.request_rate,
                    s.average_wait.as_secs_f64(),
                )
            })
            .collect()
    }

    fn max_workload_labels(&self) -> usize {
        self.config.workload.max_metric_workloads
    }
}
