//! The remote latency predictor's counters (llm-d's predictor sidecars, request
//! coalescing, training uploads) as Prometheus series.
//!
//! The predictor already counts everything in atomics for [`RemotePredictor::stats`]; the
//! series read those at scrape time, so serving a request does no extra metrics work.

use std::sync::{Arc, Weak};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::registry::Registry;
use sluice_predictor::remote::{RemotePredictor, RemoteStats};

/// Adds the remote predictor's series to `registry` (once per predictor). The registry
/// holds the predictor weakly: it does not keep a replaced predictor's tasks alive, and the
/// series disappear with it.
pub fn register(registry: &mut Registry, predictor: &Arc<RemotePredictor>) {
    registry.register_collector(Box::new(RemoteStatsCollector {
        source: Arc::downgrade(predictor),
    }));
}

/// Every series: name (the encoder appends `_total`), HELP text, value. HELP says what an
/// operator reads from the series, since the names alone do not say how they combine.
fn series(s: &RemoteStats) -> [(&'static str, &'static str, u64); 7] {
    [
        (
            "sluice_latency_predictor_remote_calls",
            "Prediction calls sent to the latency predictor sidecars (one per merged call, or \
             per chunk of at most maxBulkSize rows when coalescing is off).",
            s.predict_calls,
        ),
        (
            "sluice_latency_predictor_remote_call_failures",
            "Prediction batches that failed, timed out or came back short: each one's request \
             kept the composite-score decision instead of the predicted-latency one.",
            s.predict_failures,
        ),
        (
            "sluice_latency_predictor_remote_merged_calls",
            "Merged prediction calls the coalescing dispatcher sent (also counted in \
             sluice_latency_predictor_remote_calls_total); stays 0 with coalescing off.",
            s.merged_calls,
        ),
        (
            "sluice_latency_predictor_remote_merged_callers",
            "Callers (or chunks of large batches) carried by merged calls: divided by \
             sluice_latency_predictor_remote_merged_calls_total it is the coalescing ratio, \
             callers per sidecar call.",
            s.callers_merged,
        ),
        (
            "sluice_latency_predictor_remote_queue_full",
            "Predictions failed at once because the coalescing queue (1024 entries) was full: \
             the sidecars are not keeping up; add prediction servers or raise \
             --latency-predictor-max-dispatches up to their worker count.",
            s.coalesce_queue_full,
        ),
        (
            "sluice_latency_predictor_remote_training_entries_sent",
            "Training entries (a TTFT and a TPOT entry per measured request) the training \
             server accepted.",
            s.entries_sent,
        ),
        (
            "sluice_latency_predictor_remote_training_entries_dropped",
            "Training entries dropped: buffer full, downsampled at flush, or upload failed; \
             a rate near the sent rate means the training server sees a thin sample.",
            s.entries_dropped,
        ),
    ]
}

/// Emits the predictor's counters when the registry is encoded.
#[derive(Debug)]
struct RemoteStatsCollector {
    source: Weak<RemotePredictor>,
}

impl Collector for RemoteStatsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let Some(predictor) = self.source.upgrade() else {
            return Ok(());
        };
        let stats = predictor.stats();
        for (name, help, value) in series(&stats) {
            let counter = ConstCounter::new(value);
            let metric = encoder.encode_descriptor(name, help, None, counter.metric_type())?;
            counter.encode(metric)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_predictor::RemoteConfig;

    /// The value of the sample line `name` in Prometheus text `text`.
    fn sample(text: &str, name: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }

    #[tokio::test]
    async fn series_are_counters_with_total_names_and_vanish_with_the_predictor() {
        let predictor = Arc::new(RemotePredictor::new(RemoteConfig::default()).unwrap());
        let mut registry = Registry::default();
        register(&mut registry, &predictor);
        let encode = |r: &Registry| {
            let mut out = String::new();
            prometheus_client::encoding::text::encode(&mut out, r).unwrap();
            out
        };
        let text = encode(&registry);
        for (name, _, _) in series(&RemoteStats::default()) {
            assert!(
                text.contains(&format!("# TYPE {name} counter\n")),
                "{name} is not a counter in:\n{text}"
            );
            assert_eq!(sample(&text, &format!("{name}_total")), Some(0.0), "{text}");
        }
        drop(predictor);
        let text = encode(&registry);
        assert!(
            !text.contains("sluice_latency_predictor_remote"),
            "series of a dropped predictor must go:\n{text}"
        );
    }
}
