//! Prometheus series: upstream's flow-control metrics (reference `flow-control.md` §7) and
//! per-workload series, with bounded label cardinality.
//!
//! Names are registered without a prefix; the picker registers them under its own
//! (`inference_extension_`) prefix and adds the `inference_pool` label with
//! `Registry::sub_registry_with_label`, so the series read as upstream's.
//!
//! One [`FlowMetrics`] can serve several controllers in turn (the picker rebuilds its
//! controller when a new config changes the `flowControl` section): register it once, pass
//! it to [`crate::FlowController::with_metrics`], and scrape-time gauges sum over the
//! controllers still alive.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// Label value for everything beyond the cardinality bound.
pub const OTHER_LABEL: &str = "other";

/// Upstream's queue-duration buckets (llm-d-router).
const QUEUE_BUCKETS: [f64; 16] = [
    0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];
const CYCLE_BUCKETS: [f64; 12] = [
    0.000_001, 0.000_005, 0.00001, 0.00005, 0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5,
];

type QueueLabels = [(&'static str, Arc<str>); 3];
type TotalLabels = [(&'static str, Arc<str>); 2];

/// The flow-control series: handles updated on the hot path, plus scrape-time gauges read
/// from the controllers attached to it.
#[derive(Debug)]
pub struct FlowMetrics {
    pub(crate) queue_duration: Family<QueueLabels, Histogram>,
    pub(crate) requests_total: Family<TotalLabels, Counter>,
    pub(crate) dispatch_cycle: Histogram,
    pub(crate) pool_saturation: Gauge<f64, AtomicU64>,
    flow_labels: Mutex<HashSet<Arc<str>>>,
    max_flow_labels: usize,
    other: Arc<str>,
    priority_labels: Mutex<HashMap<i32, Arc<str>>>,
    outcome_labels: Mutex<HashMap<&'static str, Arc<str>>>,
    controllers: Mutex<Vec<Weak<dyn Snapshot>>>,
}

impl FlowMetrics {
    /// Fresh series; at most `max_flow_labels` fairness ids get their own label.
    pub fn new(max_flow_labels: usize) -> Arc<Self> {
        Arc::new(Self {
            queue_duration: Family::new_with_constructor(|| Histogram::new(QUEUE_BUCKETS)),
            requests_total: Family::default(),
            dispatch_cycle: Histogram::new(CYCLE_BUCKETS),
            pool_saturation: Gauge::default(),
            flow_labels: Mutex::new(HashSet::new()),
            max_flow_labels,
            other: Arc::from(OTHER_LABEL),
            priority_labels: Mutex::new(HashMap::new()),
            outcome_labels: Mutex::new(HashMap::new()),
            controllers: Mutex::new(Vec::new()),
        })
    }

    /// Adds the series to `registry` (once per registry).
    pub fn register(self: &Arc<Self>, registry: &mut Registry) {
        registry.register(
            "flow_control_request_queue_duration_seconds",
            "Time a request spent in flow control, by outcome.",
            self.queue_duration.clone(),
        );
        registry.register(
            "flow_control_requests",
            "Requests that reached a flow-control outcome.",
            self.requests_total.clone(),
        );
        registry.register(
            "flow_control_dispatch_cycle_duration_seconds",
            "Duration of one dispatch cycle.",
            self.dispatch_cycle.clone(),
        );
        registry.register(
            "flow_control_pool_saturation",
            "Pool saturation as last read by the flow controller.",
            self.pool_saturation.clone(),
        );
        registry.register_collector(Box::new(ScrapeCollector {
            source: Arc::downgrade(self),
        }));
    }

    pub(crate) fn attach(&self, controller: Weak<dyn Snapshot>) {
        let mut all = self.controllers.lock();
        all.retain(|c| c.strong_count() > 0);
        all.push(controller);
    }

    fn live(&self) -> Vec<Arc<dyn Snapshot>> {
        self.controllers
            .lock()
            .iter()
            .filter_map(Weak::upgrade)
            .collect()
    }

    /// The label for a fairness id: its own for the first `max_flow_labels` ids seen,
    /// `other` after that, so a client cannot create series at will.
    pub(crate) fn flow_label(&self, flow: &Arc<str>) -> Arc<str> {
        let mut seen = self.flow_labels.lock();
        if let Some(l) = seen.get(flow) {
            return l.clone();
        }
        if seen.len() < self.max_flow_labels {
            seen.insert(flow.clone());
            return flow.clone();
        }
        self.other.clone()
    }

    pub(crate) fn priority_label(&self, priority: i32) -> Arc<str> {
        self.priority_labels
            .lock()
            .entry(priority)
            .or_insert_with(|| Arc::from(priority.to_string()))
            .clone()
    }

    pub fn observe(
        &self,
        flow_label: &Arc<str>,
        priority: i32,
        outcome: &'static str,
        waited_secs: f64,
    ) {
        let p = self.priority_label(priority);
        let o = self
            .outcome_labels
            .lock()
            .entry(outcome)
            .or_insert_with(|| Arc::from(outcome))
            .clone();
        self.queue_duration
            .get_or_create(&[
                ("fairness_id", flow_label.clone()),
                ("priority", p.clone()),
                ("outcome", o.clone()),
            ])
            .observe(waited_secs);
        self.requests_total
            .get_or_create(&[("outcome", o), ("priority", p)])
            .inc();
    }
}

/// Scrape-time view of the controller's queues and workload registry.
pub(crate) trait Snapshot: Send + Sync + 'static {
    /// Queued (requests, bytes) per (fairness label, priority).
    fn queue_sizes(&self) -> Vec<(Arc<str>, i32, u64, u64)>;
    /// (workload, active requests, request rate, average wait seconds).
    fn workloads(&self) -> Vec<(Arc<str>, u64, f64, f64)>;
    /// How many workloads get their own label.
    fn max_workload_labels(&self) -> usize;
}

/// Emits gauges computed at scrape time so the hot path never updates them.
struct ScrapeCollector {
    source: Weak<FlowMetrics>,
}

impl std::fmt::Debug for ScrapeCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScrapeCollector").finish_non_exhaustive()
    }
}

fn gauge_family<L: prometheus_client::encoding::EncodeLabelSet, V>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    rows: &[(L, V)],
) -> Result<(), std::fmt::Error>
where
    V: Copy + prometheus_client::encoding::EncodeGaugeValue,
    ConstGauge<V>: EncodeMetric,
{
    let mut metric = encoder.encode_descriptor(
        name,
        help,
        None,
        prometheus_client::metrics::MetricType::Gauge,
    )?;
    for (labels, value) in rows {
        ConstGauge::new(*value).encode(metric.encode_family(labels)?)?;
    }
    Ok(())
}

impl Collector for ScrapeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let Some(metrics) = self.source.upgrade() else {
            return Ok(());
        };
        let mut merged_sizes: HashMap<(Arc<str>, i32), (u64, u64)> = HashMap::new();
        let mut merged_workloads: HashMap<Arc<str>, (u64, f64, f64)> = HashMap::new();
        let mut n = 0;
        for c in metrics.live() {
            for (f, p, q, b) in c.queue_sizes() {
                let e = merged_sizes.entry((f, p)).or_default();
                e.0 += q;
                e.1 += b;
            }
            for (id, a, r, w) in c.workloads() {
                let e = merged_workloads.entry(id).or_default();
                e.0 += a;
                e.1 += r;
                e.2 = e.2.max(w);
            }
            n = c.max_workload_labels();
        }
        let mut sizes: Vec<_> = merged_sizes
            .into_iter()
            .map(|((f, p), (q, b))| (f, p, q, b))
            .collect();
        sizes.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        let size_rows: Vec<_> = sizes
            .iter()
            .map(|(f, p, n, _)| {
                (
                    [("fairness_id", f.to_string()), ("priority", p.to_string())],
                    *n as i64,
                )
            })
            .collect();
        let byte_rows: Vec<_> = sizes
            .iter()
            .map(|(f, p, _, b)| {
                (
                    [("fairness_id", f.to_string()), ("priority", p.to_string())],
                    *b as i64,
                )
            })
            .collect();
        gauge_family(
            &mut encoder,
            "flow_control_queue_size",
            "Requests waiting in flow-control queues.",
            &size_rows,
        )?;
        gauge_family(
            &mut encoder,
            "flow_control_queue_bytes",
            "Bytes waiting in flow-control queues.",
            &byte_rows,
        )?;

        // Top-N workloads by active requests (then rate); the rest summed under "other".
        let mut workloads: Vec<_> = merged_workloads
            .into_iter()
            .map(|(id, (a, r, w))| (id, a, r, w))
            .collect();
        workloads.sort_by(|a, b| b.1.cmp(&a.1).then(b.2.total_cmp(&a.2)).then(a.0.cmp(&b.0)));
        let mut active = Vec::new();
        let mut rate = Vec::new();
        let mut wait = Vec::new();
        let (mut o_active, mut o_rate, mut o_wait, mut o_count) = (0i64, 0f64, 0f64, 0usize);
        for (i, (id, a, r, w)) in workloads.iter().enumerate() {
            if i < n {
                active.push(([("workload_id", id.to_string())], *a as i64));
                rate.push(([("workload_id", id.to_string())], *r));
                wait.push(([("workload_id", id.to_string())], *w));
            } else {
                o_active += *a as i64;
                o_rate += *r;
                o_wait += *w;
                o_count += 1;
            }
        }
        if o_count > 0 {
            active.push(([("workload_id", OTHER_LABEL.to_owned())], o_active));
            rate.push(([("workload_id", OTHER_LABEL.to_owned())], o_rate));
            wait.push((
                [("workload_id", OTHER_LABEL.to_owned())],
                o_wait / o_count as f64,
            ));
        }
        gauge_family(
            &mut encoder,
            "flow_control_workload_active_requests",
            "Requests of a workload queued, processing or streaming a response.",
            &active,
        )?;
        gauge_family(
            &mut encoder,
            "flow_control_workload_request_rate",
            "Requests per second of a workload over the sliding window.",
            &rate,
        )?;
        gauge_family(
            &mut encoder,
            "flow_control_workload_average_wait_seconds",
            "Moving average of a workload's queue wait.",
            &wait,
        )?;
        Ok(())
    }
}
