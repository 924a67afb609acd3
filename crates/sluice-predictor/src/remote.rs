//! A client for the llm-d latency predictor sidecars (`llm-d/llm-d-latency-predictor`):
//! `POST /predict/bulk/strict` on the prediction servers, `POST /add_training_data_bulk`
//! on the training server (SLO reference §10.4, §10.7).
//!
//! Behaviour, and where it departs from upstream's Go client:
//!
//! - A batch larger than upstream's 100-row client limit (`LATENCY_MAX_BULK_SIZE`; the
//!   server itself takes up to 10000 rows) is **split** into chunks sent concurrently
//!   (upstream rejects the whole batch, so the scorer silently falls back for pools over
//!   100 endpoints). Chunks go round-robin over the prediction servers.
//! - One deadline (`timeout`, default 400 ms like upstream's producer budget) covers the
//!   whole batch; any chunk failing, timing out, or answering with the wrong number of rows
//!   fails the batch, and the caller falls back to the composite score. No retries: a retry
//!   would blow the request's latency budget.
//! - Feature fractions are clamped to 0..=1 (as the in-process predictor does) rather than
//!   rejected, so one bad scrape does not disable prediction for a request.
//! - Training samples are buffered (bounded; overflow is dropped and counted) and flushed
//!   every `flush_interval`, at most `max_flush_size` entries per flush, downsampled
//!   evenly within the TTFT and TPOT groups so their ratio is kept. Each sample becomes
//!   upstream's two entries (§3.7): a TTFT entry and, when measured, a TPOT entry.
//! - Response bodies are read up to a size limit.
//!
//! ## Coalescing
//!
//! A sidecar call's cost is mostly fixed (on one core about 13 ms for one row, 27 ms for
//! 100: SLO reference §14), so at high request rates concurrent callers are merged into
//! shared calls, like upstream's client (§10.7): with
//! `coalesceWindowMs` > 0 (default 1) a caller's rows are queued on a bounded channel
//! ([`COALESCE_QUEUE_CAPACITY`] entries) the moment it calls, and a dispatcher task collects
//! callers from the first arrival until the window expires or the next caller would push the
//! call over `maxCoalescedRows` (that caller starts the next call). Each merged call is one
//! `POST /predict/bulk/strict`, at most `maxConcurrentDispatches` in flight (default 36), and
//! its answer is split back by offset, each caller getting its own rows in its own order.
//! Merged calls go round-robin over the prediction servers (upstream picks one at random).
//! Details, and departures from upstream:
//!
//! - A merged call never exceeds `maxBulkSize` rows, nor `maxCoalescedRows` (default 100,
//!   1..=100): upstream's `LATENCY_MAX_COALESCED_ROWS` defaults to 0, no cap, so a busy
//!   window can merge past the 100-row client limit. A caller with more rows than the cap is still
//!   split into chunks, one queue entry per chunk, which may share calls with others.
//! - The dispatcher takes a dispatch slot *before* it collects a call (upstream collects,
//!   then waits for a slot): while every slot is busy callers wait in the queue, and the next
//!   call takes as many of them as fit rather than one window's worth. A full queue fails the
//!   caller at once (counted in [`RemoteStats::coalesce_queue_full`]) rather than making it
//!   wait: the scorer falls back to the composite score, cheaper than waiting behind 1024
//!   others.
//! - `maxConcurrentDispatches` should not exceed what the sidecars serve in parallel (their
//!   workers in all): calls beyond that wait in the sidecars' own queues, where they add
//!   latency without adding throughput and can no longer be merged.
//! - Every caller keeps its own deadline (`timeout`, counted from its call): when its rows
//!   have not come back by then it gets [`PredictError::Timeout`] even if the merged call
//!   later succeeds. A merged call itself is abandoned at the latest deadline of the callers
//!   in it, which also bounds how long it holds a dispatch slot. Callers that stopped waiting
//!   before their call was sent are left out of it.
//! - A failed, timed-out or short merged call fails exactly the callers whose rows are in it;
//!   callers in other merged calls are unaffected.
//! - `coalesceWindowMs: 0` turns coalescing off: each caller sends its own calls, with no
//!   dispatch limit, as before coalescing existed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize, Serializer};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use crate::features::{Features, Prediction, TrainingSample};
use crate::{LatencyPredictor, PredictError, PredictFuture, PredictResult};

/// The largest batch upstream's `/predict/bulk/strict` client accepts per call.
pub const UPSTREAM_MAX_BULK_SIZE: usize = 100;

/// Largest response body read from a predictor (100 rows are ~20 KiB).
const MAX_RESPONSE_BYTES: usize = 4 << 20;

/// Queue entries (callers, or chunks of a caller's batch above `maxCoalescedRows`) waiting
/// for the coalescing dispatcher at most, like upstream's channel buffer.
pub const COALESCE_QUEUE_CAPACITY: usize = 1024;

/// The largest `maxConcurrentDispatches` accepted: more calls in flight than queue entries
/// could never be used.
pub const MAX_CONCURRENT_DISPATCHES: usize = COALESCE_QUEUE_CAPACITY;

/// Where the sidecars are and how to talk to them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct RemoteConfig {
    /// Prediction servers, e.g. `http://localhost:8001` (upstream `PREDICTION_SERVER_URL`).
    pub prediction_urls: Vec<String>,
    /// The training server, e.g. `http://localhost:8000` (upstream `TRAINING_SERVER_URL`).
    pub training_url: String,
    /// Deadline for one whole batch prediction.
    #[serde(with = "millis", rename = "timeoutMs")]
    pub timeout: Duration,
    /// Deadline for one training upload.
    #[serde(with = "millis", rename = "trainingTimeoutMs")]
    pub training_timeout: Duration,
    /// Rows per prediction call, 1..=100 (upstream `LATENCY_MAX_BULK_SIZE`).
    pub max_bulk_size: usize,
    /// How often buffered training samples are sent.
    #[serde(with = "millis", rename = "flushIntervalMs")]
    pub flush_interval: Duration,
    /// Entries sent per flush at most (upstream `LATENCY_MAX_SAMPLE_SIZE`).
    pub max_flush_size: usize,
    /// Entries buffered between flushes at most; more are dropped and counted.
    pub max_buffered: usize,
    /// How long the dispatcher waits after a caller's arrival for others to share its call
    /// (upstream `LATENCY_COALESCE_WINDOW_MS`); 0 turns coalescing off.
    #[serde(with = "millis", rename = "coalesceWindowMs")]
    pub coalesce_window: Duration,
    /// Rows per merged call at most, 1..=100 (upstream `LATENCY_MAX_COALESCED_ROWS`, which
    /// has no cap by default). A merged call is also capped at `max_bulk_size`, so lowering
    /// that alone lowers this too.
    pub max_coalesced_rows: usize,
    /// Merged calls in flight at most (upstream `LATENCY_MAX_CONCURRENT_DISPATCHES`).
    pub max_concurrent_dispatches: usize,
}

impl Default for RemoteConfig {
    fn default() -> Self {
        RemoteConfig {
            prediction_urls: vec!["http://localhost:8001".into()],
            training_url: "http://localhost:8000".into(),
            timeout: Duration::from_millis(400),
            training_timeout: Duration::from_secs(10),
            max_bulk_size: UPSTREAM_MAX_BULK_SIZE,
            flush_interval: Duration::from_secs(1),
            max_flush_size: 1000,
            max_buffered: 10_000,
            coalesce_window: Duration::from_millis(1),
            max_coalesced_rows: UPSTREAM_MAX_BULK_SIZE,
            max_concurrent_dispatches: 36,
        }
    }
}

/// A [`RemoteConfig`] that cannot work.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RemoteConfigError {
    /// No prediction server was given.
    #[error("remote predictor: predictionUrls is empty; expected at least one http:// URL")]
    NoPredictionServer,
    /// A URL does not parse or is not plain `http://host:port`.
    #[error("remote predictor: {field} {url:?} is not a valid http:// URL: {reason}")]
    BadUrl {
        /// Which setting.
        field: &'static str,
        /// The value given.
        url: String,
        /// What was wrong.
        reason: String,
    },
    /// `maxBulkSize` is out of range.
    #[error("remote predictor: maxBulkSize {0} is out of range; expected 1..=100")]
    BadBulkSize(usize),
    /// `maxCoalescedRows` is out of range.
    #[error(
        "remote predictor: maxCoalescedRows {0} is out of range; expected 1..=100 (merged calls \
         are also capped at maxBulkSize)"
    )]
    BadCoalescedRows(usize),
    /// `maxConcurrentDispatches` is out of range.
    #[error(
        "remote predictor: maxConcurrentDispatches {0} is out of range; expected 1..=1024 \
         (upstream default 36)"
    )]
    BadConcurrentDispatches(usize),
    /// `coalesceWindowMs` is not shorter than `timeoutMs`, so every caller would time out.
    #[error(
        "remote predictor: coalesceWindowMs {window_ms} is not shorter than timeoutMs \
         {timeout_ms}; expected 0 (off) or a window well below the deadline (upstream default 1)"
    )]
    BadCoalesceWindow {
        /// The window given, in milliseconds.
        window_ms: u128,
        /// The configured deadline, in milliseconds.
        timeout_ms: u128,
    },
    /// Created outside a Tokio runtime.
    #[error(
        "remote predictor: must be created inside a Tokio runtime (it runs flush and dispatch tasks)"
    )]
    NoRuntime,
}

/// Counters of a [`RemotePredictor`], for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RemoteStats {
    /// Prediction HTTP calls made (one per chunk, or one per merged call).
    pub predict_calls: u64,
    /// Batches that failed (the caller fell back).
    pub predict_failures: u64,
    /// Merged calls sent by the coalescing dispatcher (also counted in `predict_calls`).
    pub merged_calls: u64,
    /// Queue entries (callers, or chunks of large batches) carried by merged calls;
    /// `callers_merged / merged_calls` is the coalescing ratio.
    pub callers_merged: u64,
    /// Callers failed at once because the coalescing queue was full.
    pub coalesce_queue_full: u64,
    /// Training entries accepted by the training server.
    pub entries_sent: u64,
    /// Training entries dropped: buffer full, downsampled at flush, or upload failed.
    pub entries_dropped: u64,
}

/// Upstream's `PredictionRequest` (and, with the `actual_*` fields, `TrainingEntry`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WireRow {
    /// KV-cache usage, 0..=1.
    pub kv_cache_percentage: f64,
    /// Prompt tokens.
    pub input_token_length: u32,
    /// Waiting requests.
    pub num_request_waiting: u32,
    /// Running requests.
    pub num_request_running: u32,
    /// Tokens generated so far.
    pub num_tokens_generated: u32,
    /// Prefix-cache hit fraction, 0..=1.
    pub prefix_cache_score: f64,
    /// `""`, `prefill` or `decode`.
    pub pod_type: String,
    /// Uncached prompt tokens in flight.
    pub prefill_tokens_in_flight: u32,
    /// Always 0, as upstream's producer sends it.
    pub decode_tokens_in_flight: u32,
    /// Training only: measured TTFT (0 = not a TTFT sample).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actual_ttft_ms: Option<f64>,
    /// Training only: measured TPOT (0 = not a TPOT sample).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actual_tpot_ms: Option<f64>,
}

impl WireRow {
    fn predict(f: &Features) -> Self {
        let f = f.sanitised();
        WireRow {
            kv_cache_percentage: f.kv_cache_usage,
            input_token_length: f.input_tokens,
            num_request_waiting: f.waiting,
            num_request_running: f.running,
            // Upstream's producer predicts "at the first token".
            num_tokens_generated: f.tokens_generated.max(1),
            prefix_cache_score: f.prefix_cache_score,
            pod_type: f.role.as_upstream_str().to_owned(),
            prefill_tokens_in_flight: f.prefill_tokens_in_flight,
            decode_tokens_in_flight: 0,
            actual_ttft_ms: None,
            actual_tpot_ms: None,
        }
    }

    /// Upstream's two training entries for one request (§3.7).
    fn training(s: &TrainingSample) -> impl Iterator<Item = WireRow> {
        let usable = |v: Option<f64>| v.filter(|v| v.is_finite() && *v > 0.0);
        let base = WireRow {
            num_tokens_generated: 0,
            ..WireRow::predict(&s.features_at_dispatch)
        };
        let ttft = usable(s.ttft_ms).map(|t| WireRow {
            actual_ttft_ms: Some(t),
            actual_tpot_ms: Some(0.0),
            ..base.clone()
        });
        let tpot = usable(s.tpot_ms).map(|t| WireRow {
            actual_ttft_ms: Some(0.0),
            actual_tpot_ms: Some(t),
            prefix_cache_score: 0.0,
            ..base.clone()
        });
        ttft.into_iter().chain(tpot)
    }

    fn is_ttft(&self) -> bool {
        self.actual_ttft_ms.is_some_and(|t| t > 0.0)
    }
}

#[derive(Serialize)]
struct BulkRequest<'a> {
    requests: &'a [WireRow],
}

#[derive(Deserialize)]
struct BulkResponse {
    predictions: Vec<WirePrediction>,
}

#[derive(Deserialize)]
struct WirePrediction {
    ttft_ms: f64,
    tpot_ms: f64,
}

/// One caller's rows (or one chunk of them) waiting for a merged call.
#[derive(Debug)]
struct Job {
    rows: Vec<WireRow>,
    /// When the caller stops waiting (its call time plus `timeout`).
    deadline: Instant,
    reply: oneshot::Sender<PredictResult>,
}

/// The `requests` of a merged call: every job's rows, in job order, without copying them.
struct MergedRows<'a>(&'a [Job]);

impl Serialize for MergedRows<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().flat_map(|j| &j.rows))
    }
}

#[derive(Serialize)]
struct MergedRequest<'a> {
    requests: MergedRows<'a>,
}

#[derive(Serialize)]
struct TrainingBulk<'a> {
    entries: &'a [WireRow],
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

#[derive(Debug)]
struct Inner {
    config: RemoteConfig,
    prediction_uris: Vec<Uri>,
    /// Names the prediction servers in errors raised before a server is chosen.
    prediction_label: String,
    training_uri: Uri,
    client: HttpClient,
    buffer: Mutex<Vec<WireRow>>,
    ready: AtomicBool,
    next_server: AtomicUsize,
    predict_calls: AtomicU64,
    predict_failures: AtomicU64,
    merged_calls: AtomicU64,
    callers_merged: AtomicU64,
    coalesce_queue_full: AtomicU64,
    entries_sent: AtomicU64,
    entries_dropped: AtomicU64,
}

/// The remote predictor: implements [`LatencyPredictor`] over the sidecars' HTTP API.
#[derive(Debug)]
pub struct RemotePredictor {
    inner: Arc<Inner>,
    /// The coalescing dispatcher's queue; `None` when coalescing is off.
    queue: Option<mpsc::Sender<Job>>,
    flusher: JoinHandle<()>,
    dispatcher: Option<JoinHandle<()>>,
}

fn endpoint_uri(field: &'static str, base: &str, path: &str) -> Result<Uri, RemoteConfigError> {
    let bad = |reason: &str| RemoteConfigError::BadUrl {
        field,
        url: base.to_owned(),
        reason: reason.to_owned(),
    };
    let parsed: Uri = base
        .parse()
        .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
    if parsed.scheme_str() != Some("http") {
        return Err(bad(
            "only plain http:// is supported (the sidecars run in the same pod)",
        ));
    }
    let Some(authority) = parsed.authority() else {
        return Err(bad("missing host"));
    };
    let prefix = parsed.path().trim_end_matches('/');
    format!("http://{authority}{prefix}{path}")
        .parse()
        .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))
}

impl RemotePredictor {
    /// Validates the configuration and starts the training-flush task and, when coalescing
    /// is on, the dispatcher task on the current Tokio runtime.
    pub fn new(config: RemoteConfig) -> Result<Self, RemoteConfigError> {
        if config.prediction_urls.is_empty() {
            return Err(RemoteConfigError::NoPredictionServer);
        }
        if !(1..=UPSTREAM_MAX_BULK_SIZE).contains(&config.max_bulk_size) {
            return Err(RemoteConfigError::BadBulkSize(config.max_bulk_size));
        }
        if !(1..=UPSTREAM_MAX_BULK_SIZE).contains(&config.max_coalesced_rows) {
            return Err(RemoteConfigError::BadCoalescedRows(
                config.max_coalesced_rows,
            ));
        }
        if !(1..=MAX_CONCURRENT_DISPATCHES).contains(&config.max_concurrent_dispatches) {
            return Err(RemoteConfigError::BadConcurrentDispatches(
                config.max_concurrent_dispatches,
            ));
        }
        if !config.coalesce_window.is_zero() && config.coalesce_window >= config.timeout {
            return Err(RemoteConfigError::BadCoalesceWindow {
                window_ms: config.coalesce_window.as_millis(),
                timeout_ms: config.timeout.as_millis(),
            });
        }
        let prediction_uris = config
            .prediction_urls
            .iter()
            .map(|u| endpoint_uri("predictionUrls", u, "/predict/bulk/strict"))
            .collect::<Result<Vec<_>, _>>()?;
        let training_uri = endpoint_uri(
            "trainingUrl",
            &config.training_url,
            "/add_training_data_bulk",
        )?;
        let runtime =
            tokio::runtime::Handle::try_current().map_err(|_| RemoteConfigError::NoRuntime)?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(config.timeout));
        let client = Client::builder(TokioExecutor::new()).build(connector);
        let prediction_label = prediction_uris
            .iter()
            .map(Uri::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let inner = Arc::new(Inner {
            config,
            prediction_uris,
            prediction_label,
            training_uri,
            client,
            buffer: Mutex::new(Vec::new()),
            ready: AtomicBool::new(false),
            next_server: AtomicUsize::new(0),
            predict_calls: AtomicU64::new(0),
            predict_failures: AtomicU64::new(0),
            merged_calls: AtomicU64::new(0),
            callers_merged: AtomicU64::new(0),
            coalesce_queue_full: AtomicU64::new(0),
            entries_sent: AtomicU64::new(0),
            entries_dropped: AtomicU64::new(0),
        });
        let weak = Arc::downgrade(&inner);
        let interval = inner.config.flush_interval.max(Duration::from_millis(1));
        let flusher = runtime.spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                inner.flush().await;
            }
        });
        let (queue, dispatcher) = if inner.config.coalesce_window.is_zero() {
            (None, None)
        } else {
            let (tx, rx) = mpsc::channel(COALESCE_QUEUE_CAPACITY);
            let task = runtime.spawn(dispatch_loop(Arc::clone(&inner), rx));
            (Some(tx), Some(task))
        };
        Ok(RemotePredictor {
            inner,
            queue,
            flusher,
            dispatcher,
        })
    }

    /// Predicts every row of `batch`, one prediction per row in order.
    ///
    /// With coalescing on, the rows are queued when this is called (not when the future is
    /// first polled), so the call order is the queue order and the deadline starts now; a
    /// full queue gives an already-failed future.
    pub fn predict<'a>(&'a self, batch: &'a [Features]) -> PredictFuture<'a> {
        if batch.is_empty() {
            return PredictFuture::ready(Ok(Vec::new()));
        }
        let Some(queue) = &self.queue else {
            return PredictFuture::pending(self.settle(self.inner.predict(batch)));
        };
        match self.inner.enqueue(queue, batch) {
            Ok((waiting, deadline)) => PredictFuture::pending(self.settle(self.inner.collect(
                waiting,
                deadline,
                batch.len(),
            ))),
            Err(e) => PredictFuture::ready(self.inner.note(Err(e))),
        }
    }

    async fn settle(&self, answer: impl Future<Output = PredictResult>) -> PredictResult {
        let result = answer.await;
        self.inner.note(result)
    }

    /// Sends buffered training samples now (also done every `flush_interval`).
    pub async fn flush(&self) {
        self.inner.flush().await;
    }

    /// Sends what is still buffered, then stops the flush task (for graceful shutdown).
    pub async fn close(self) {
        self.inner.flush().await;
    }

    /// Counters for metrics.
    pub fn stats(&self) -> RemoteStats {
        let i = &self.inner;
        RemoteStats {
            predict_calls: i.predict_calls.load(Ordering::Relaxed),
            predict_failures: i.predict_failures.load(Ordering::Relaxed),
            merged_calls: i.merged_calls.load(Ordering::Relaxed),
            callers_merged: i.callers_merged.load(Ordering::Relaxed),
            coalesce_queue_full: i.coalesce_queue_full.load(Ordering::Relaxed),
            entries_sent: i.entries_sent.load(Ordering::Relaxed),
            entries_dropped: i.entries_dropped.load(Ordering::Relaxed),
        }
    }
}

impl Drop for RemotePredictor {
    fn drop(&mut self) {
        self.flusher.abort();
        // Aborting the dispatcher drops its in-flight merged calls with it; no caller can
        // still be waiting, since callers borrow the predictor.
        if let Some(dispatcher) = &self.dispatcher {
            dispatcher.abort();
        }
    }
}

impl LatencyPredictor for RemotePredictor {
    fn predict_batch<'a>(&'a self, batch: &'a [Features]) -> PredictFuture<'a> {
        self.predict(batch)
    }

    fn record(&self, sample: TrainingSample) {
        let mut buf = self.inner.buffer.lock();
        for row in WireRow::training(&sample) {
            if buf.len() < self.inner.config.max_buffered {
                buf.push(row);
            } else {
                self.inner.entries_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn is_synchronous(&self) -> bool {
        false
    }

    fn ready(&self) -> bool {
        self.inner.ready.load(Ordering::Relaxed)
    }
}

impl Inner {
    /// Records the outcome of one caller's prediction for `ready()` and the stats.
    fn note(&self, result: PredictResult) -> PredictResult {
        self.ready.store(result.is_ok(), Ordering::Relaxed);
        if result.is_err() {
            self.predict_failures.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    /// Rows per merged call, and per queue entry, at most.
    fn row_cap(&self) -> usize {
        self.config
            .max_coalesced_rows
            .min(self.config.max_bulk_size)
            .max(1)
    }

    fn next_prediction_uri(&self) -> Uri {
        let i = self.next_server.fetch_add(1, Ordering::Relaxed);
        self.prediction_uris[i % self.prediction_uris.len()].clone()
    }

    /// Queues `batch` for the dispatcher, one entry per `max_coalesced_rows` rows.
    fn enqueue(
        &self,
        queue: &mpsc::Sender<Job>,
        batch: &[Features],
    ) -> Result<(Vec<oneshot::Receiver<PredictResult>>, Instant), PredictError> {
        let deadline = Instant::now() + self.config.timeout;
        let chunk = self.row_cap();
        let mut waiting = Vec::with_capacity(batch.len().div_ceil(chunk));
        for rows in batch.chunks(chunk) {
            let (reply, answer) = oneshot::channel();
            let job = Job {
                rows: rows.iter().map(WireRow::predict).collect(),
                deadline,
                reply,
            };
            // Chunks already queued for this caller are skipped by the dispatcher once
            // `waiting` is dropped here.
            match queue.try_send(job) {
                Ok(()) => waiting.push(answer),
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.coalesce_queue_full.fetch_add(1, Ordering::Relaxed);
                    return Err(PredictError::Unavailable {
                        url: self.prediction_label.clone(),
                        reason: format!(
                            "the coalescing queue is full ({COALESCE_QUEUE_CAPACITY} entries \
                             waiting); the prediction servers are not keeping up: add \
                             prediction servers or raise maxConcurrentDispatches"
                        ),
                    });
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    return Err(PredictError::Unavailable {
                        url: self.prediction_label.clone(),
                        reason: "the coalescing dispatcher has stopped".to_owned(),
                    });
                }
            }
        }
        Ok((waiting, deadline))
    }

    /// Waits for every queued chunk of one caller, until the caller's own deadline.
    async fn collect(
        &self,
        waiting: Vec<oneshot::Receiver<PredictResult>>,
        deadline: Instant,
        rows: usize,
    ) -> PredictResult {
        let all = async {
            let mut out = Vec::with_capacity(rows);
            for answer in waiting {
                match answer.await {
                    Ok(Ok(predictions)) => out.extend(predictions),
                    Ok(Err(e)) => return Err(e),
                    Err(_) => {
                        return Err(PredictError::Unavailable {
                            url: self.prediction_label.clone(),
                            reason: "the coalescing dispatcher dropped the request (shutting \
                                     down)"
                                .to_owned(),
                        });
                    }
                }
            }
            Ok(out)
        };
        match tokio::time::timeout_at(deadline, all).await {
            Ok(result) => result,
            Err(_) => Err(PredictError::Timeout {
                url: self.prediction_label.clone(),
                after: self.config.timeout,
            }),
        }
    }

    /// One merged call: sends every job's rows, then hands each job its slice by offset.
    async fn dispatch(self: Arc<Self>, jobs: Vec<Job>, _slot: OwnedSemaphorePermit) {
        let rows: usize = jobs.iter().map(|j| j.rows.len()).sum();
        let deadline = latest_deadline(&jobs);
        let uri = self.next_prediction_uri();
        let url = uri.to_string();
        self.predict_calls.fetch_add(1, Ordering::Relaxed);
        self.merged_calls.fetch_add(1, Ordering::Relaxed);
        self.callers_merged
            .fetch_add(jobs.len() as u64, Ordering::Relaxed);
        let result = match serde_json::to_vec(&MergedRequest {
            requests: MergedRows(&jobs),
        }) {
            Err(e) => Err(PredictError::Unavailable {
                url,
                reason: format!("encoding request: {e}"),
            }),
            Ok(body) => {
                let call = call_predict(self.client.clone(), uri, body, rows);
                // Past the latest caller's deadline nobody is waiting for the answer.
                match tokio::time::timeout_at(deadline, call).await {
                    Ok(result) => result,
                    Err(_) => Err(PredictError::Timeout {
                        url,
                        after: self.config.timeout,
                    }),
                }
            }
        };
        match result {
            Ok(predictions) => {
                let mut predictions = predictions.into_iter();
                for job in jobs {
                    let mine: Vec<Prediction> = predictions.by_ref().take(job.rows.len()).collect();
                    // A caller that gave up has dropped its receiver; nothing to tell it.
                    let _ = job.reply.send(Ok(mine));
                }
            }
            Err(e) => {
                for job in jobs {
                    let _ = job.reply.send(Err(e.clone()));
                }
            }
        }
    }

    async fn predict(&self, batch: &[Features]) -> PredictResult {
        let rows: Vec<WireRow> = batch.iter().map(WireRow::predict).collect();
        let mut calls = tokio::task::JoinSet::new();
        let first = self.next_server.fetch_add(1, Ordering::Relaxed);
        let mut first_url = None;
        for (i, chunk) in rows.chunks(self.config.max_bulk_size).enumerate() {
            let uri = self.prediction_uris[(first + i) % self.prediction_uris.len()].clone();
            first_url.get_or_insert_with(|| uri.to_string());
            let body = serde_json::to_vec(&BulkRequest { requests: chunk }).map_err(|e| {
                PredictError::Unavailable {
                    url: uri.to_string(),
                    reason: format!("encoding request: {e}"),
                }
            })?;
            let client = self.client.clone();
            let expected = chunk.len();
            self.predict_calls.fetch_add(1, Ordering::Relaxed);
            calls.spawn(async move { (i, call_predict(client, uri, body, expected).await) });
        }
        let deadline = self.config.timeout;
        let collect = async {
            let mut parts: Vec<Option<Vec<Prediction>>> = vec![None; calls.len()];
            while let Some(joined) = calls.join_next().await {
                let (i, result) = joined.map_err(|e| PredictError::Unavailable {
                    url: first_url.clone().unwrap_or_default(),
                    reason: format!("prediction task failed: {e}"),
                })?;
                if let Some(slot) = parts.get_mut(i) {
                    *slot = Some(result?);
                }
            }
            Ok(parts.into_iter().flatten().flatten().collect::<Vec<_>>())
        };
        // Leaving early (error or timeout) drops the JoinSet, which aborts the other chunks.
        match tokio::time::timeout(deadline, collect).await {
            Ok(result) => result,
            Err(_) => Err(PredictError::Timeout {
                url: first_url.unwrap_or_default(),
                after: deadline,
            }),
        }
    }

    async fn flush(&self) {
        let mut rows = std::mem::take(&mut *self.buffer.lock());
        if rows.is_empty() {
            return;
        }
        let before = rows.len();
        rows = downsample(rows, self.config.max_flush_size.max(1));
        self.entries_dropped
            .fetch_add((before - rows.len()) as u64, Ordering::Relaxed);
        let url = self.training_uri.to_string();
        let sent = async {
            let body =
                serde_json::to_vec(&TrainingBulk { entries: &rows }).map_err(|e| e.to_string())?;
            let (status, text) = post(&self.client, self.training_uri.clone(), body).await?;
            if status == StatusCode::ACCEPTED {
                Ok(())
            } else {
                Err(format!(
                    "answered {status}, expected 202 Accepted: {}",
                    String::from_utf8_lossy(&text)
                ))
            }
        };
        let outcome = match tokio::time::timeout(self.config.training_timeout, sent).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "no answer within {:?}",
                self.config.training_timeout
            )),
        };
        match outcome {
            Ok(()) => {
                self.entries_sent
                    .fetch_add(rows.len() as u64, Ordering::Relaxed);
            }
            Err(reason) => {
                // Training data is best effort, like upstream: drop the batch, never retry
                // into an unbounded backlog.
                tracing::warn!(%url, entries = rows.len(), %reason, "latency predictor training upload failed");
                self.entries_dropped
                    .fetch_add(rows.len() as u64, Ordering::Relaxed);
            }
        }
    }
}

fn latest_deadline(jobs: &[Job]) -> Instant {
    jobs.iter()
        .map(|j| j.deadline)
        .max()
        .unwrap_or_else(Instant::now)
}

/// The coalescing dispatcher: groups queued callers into merged calls (module doc).
async fn dispatch_loop(inner: Arc<Inner>, mut queue: mpsc::Receiver<Job>) {
    let window = inner.config.coalesce_window;
    let limit = inner.row_cap();
    let slots = Arc::new(Semaphore::new(inner.config.max_concurrent_dispatches));
    // Owning the calls here means stopping the dispatcher stops them too.
    let mut in_flight = JoinSet::new();
    // A caller that did not fit the previous call starts the next one.
    let mut carried: Option<Job> = None;
    loop {
        while in_flight.try_join_next().is_some() {}
        // The slot comes before the collecting: while every slot is busy, callers wait in
        // the queue, and the next call then takes as many of them as fit instead of only
        // those of one window. Every call ends by its callers' deadlines, so this wait is
        // bounded too.
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let first = match carried.take() {
            Some(job) => job,
            None => match queue.recv().await {
                Some(job) => job,
                None => return,
            },
        };
        if first.reply.is_closed() {
            continue;
        }
        let window_ends = Instant::now() + window;
        let mut rows = first.rows.len();
        let mut jobs = vec![first];
        while rows < limit {
            match tokio::time::timeout_at(window_ends, queue.recv()).await {
                Ok(Some(job)) if job.reply.is_closed() => {}
                Ok(Some(job)) if rows + job.rows.len() > limit => {
                    carried = Some(job);
                    break;
                }
                Ok(Some(job)) => {
                    rows += job.rows.len();
                    jobs.push(job);
                }
                // Queue closed (predictor dropped) or window over: send what we have.
                Ok(None) | Err(_) => break,
            }
        }
        // Callers that gave up while the window was open are left out.
        jobs.retain(|j| !j.reply.is_closed());
        if jobs.is_empty() {
            continue;
        }
        in_flight.spawn(Arc::clone(&inner).dispatch(jobs, slot));
    }
}

/// Keeps at most `max` rows, taking evenly spaced rows from the TTFT and TPOT groups in
/// proportion to their sizes.
fn downsample(rows: Vec<WireRow>, max: usize) -> Vec<WireRow> {
    if rows.len() <= max {
        return rows;
    }
    let total = rows.len();
    let (ttft, tpot): (Vec<_>, Vec<_>) = rows.into_iter().partition(WireRow::is_ttft);
    let keep_ttft = (ttft.len() * max).div_ceil(total).min(max);
    let keep_tpot = max - keep_ttft;
    let pick = |group: Vec<WireRow>, keep: usize| -> Vec<WireRow> {
        let n = group.len();
        if keep >= n {
            return group;
        }
        group
            .into_iter()
            .enumerate()
            .filter(|(i, _)| (i * keep) / n != ((i + 1) * keep) / n)
            .map(|(_, r)| r)
            .collect()
    };
    let mut out = pick(ttft, keep_ttft);
    out.extend(pick(tpot, keep_tpot));
    out
}

async fn post(client: &HttpClient, uri: Uri, body: Vec<u8>) -> Result<(StatusCode, Bytes), String> {
    let req = Request::builder()
        .method(Method::POST)
        .uri(uri)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let resp = client
        .request(req)
        .await
        .map_err(|e| format!("request failed: {e}"))?;
    let status = resp.status();
    let body = Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
        .collect()
        .await
        .map_err(|e| format!("reading response body (limit {MAX_RESPONSE_BYTES} bytes): {e}"))?
        .to_bytes();
    Ok((status, body))
}

async fn call_predict(
    client: HttpClient,
    uri: Uri,
    body: Vec<u8>,
    expected: usize,
) -> Result<Vec<Prediction>, PredictError> {
    let url = uri.to_string();
    let unavailable = |reason: String| PredictError::Unavailable {
        url: url.clone(),
        reason,
    };
    let (status, bytes) = post(&client, uri, body).await.map_err(unavailable)?;
    if status != StatusCode::OK {
        return Err(unavailable(format!(
            "answered {status}, expected 200: {}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
        )));
    }
    let parsed: BulkResponse = serde_json::from_slice(&bytes).map_err(|e| {
        unavailable(format!(
            "response is not a bulk prediction ({{\"predictions\":[...]}}): {e}"
        ))
    })?;
    if parsed.predictions.len() != expected {
        return Err(unavailable(format!(
            "answered {} predictions for {expected} rows",
            parsed.predictions.len()
        )));
    }
    parsed
        .predictions
        .into_iter()
        .map(|p| {
            if p.ttft_ms.is_finite() && p.tpot_ms.is_finite() {
                Ok(Prediction {
                    ttft_ms: p.ttft_ms.max(0.0),
                    tpot_ms: Some(p.tpot_ms.max(0.0)),
                })
            } else {
                Err(unavailable(format!(
                    "non-finite prediction ttft {} tpot {}",
                    p.ttft_ms, p.tpot_ms
                )))
            }
        })
        .collect()
}

mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(v.as_millis() as u64)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(ttft: bool) -> WireRow {
        WireRow {
            actual_ttft_ms: Some(if ttft { 5.0 } else { 0.0 }),
            actual_tpot_ms: Some(if ttft { 0.0 } else { 5.0 }),
            ..WireRow::predict(&Features::default())
        }
    }

    #[test]
    fn downsampling_keeps_the_ttft_tpot_ratio() {
        let rows: Vec<WireRow> = (0..3000).map(|i| entry(i % 3 != 0)).collect();
        let kept = downsample(rows, 300);
        assert_eq!(kept.len(), 300);
        assert_eq!(kept.iter().filter(|r| r.is_ttft()).count(), 200);
    }

    #[test]
    fn a_sample_becomes_upstreams_two_entries() {
        let s = TrainingSample {
            features_at_dispatch: Features {
                prefix_cache_score: 0.5,
                input_tokens: 10,
                ..Features::default()
            },
            ttft_ms: Some(120.0),
            tpot_ms: Some(15.0),
        };
        let rows: Vec<WireRow> = WireRow::training(&s).collect();
        assert_eq!(rows.len(), 2);
        assert_eq!(
            (rows[0].actual_ttft_ms, rows[0].actual_tpot_ms),
            (Some(120.0), Some(0.0))
        );
        assert_eq!(rows[0].prefix_cache_score, 0.5);
        assert_eq!(
            (rows[1].actual_ttft_ms, rows[1].actual_tpot_ms),
            (Some(0.0), Some(15.0))
        );
        assert_eq!(
            rows[1].prefix_cache_score, 0.0,
            "upstream's TPOT entry carries no prefix score"
        );
        assert!(rows.iter().all(|r| r.num_tokens_generated == 0));
    }

    #[test]
    fn urls_are_validated_with_the_offending_value() {
        let err = endpoint_uri("trainingUrl", "https://x:1", "/a").unwrap_err();
        assert!(err.to_string().contains("https://x:1"), "{err}");
        assert_eq!(
            endpoint_uri(
                "predictionUrls",
                "http://127.0.0.1:8001/",
                "/predict/bulk/strict"
            )
            .unwrap(),
            "http://127.0.0.1:8001/predict/bulk/strict"
        );
    }
}
