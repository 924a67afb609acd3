//! The SLO metrics of seeds 002/004 (`inference_objective_request_*`), labels `model_name`
//! and `target_model_name`. Values are in seconds (`ms / 1000`), buckets as upstream
//! (reference §12).
//!
//! Every `…_total` series is exposed with Prometheus type `gauge` (it only ever grows, so
//! `rate()` works): OpenMetrics, which `prometheus-client` writes, forbids a counter family
//! `…_slo_violation` next to the seeds' 0/1 gauge of the same name, and a clash would make
//! the whole scrape fail.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// `model_name` (what the client asked for) and `target_model_name` (after rewrite).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SloLabels {
    /// The model the client asked for.
    pub model_name: String,
    /// The model after rewrite.
    pub target_model_name: String,
}

impl SloLabels {
    /// The labels of `request`: the model the client asked for and the one it is sent to.
    pub fn for_request(request: &crate::types::LlmRequest) -> Self {
        let requested = if request.requested_model.is_empty() {
            &request.target_model
        } else {
            &request.requested_model
        };
        SloLabels {
            model_name: requested.clone(),
            target_model_name: request.target_model.clone(),
        }
    }
}

type HistFamily = Family<SloLabels, Histogram, fn() -> Histogram>;
type GaugeF = Family<SloLabels, Gauge<f64, AtomicU64>>;

/// TTFT buckets, seconds (upstream "G").
pub const TTFT_BUCKETS: &[f64] = &[
    0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0,
    10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 120.0, 180.0, 240.0, 300.0, 360.0, 480.0, 600.0, 900.0,
    1200.0, 1800.0, 2700.0, 3600.0,
];
/// TPOT buckets, seconds (upstream "T").
pub const TPOT_BUCKETS: &[f64] = &[
    0.0005, 0.00205, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.125, 0.15, 0.2, 0.3, 0.4, 0.5,
    0.6, 0.8, 1.0, 1.5, 2.0, 3.0, 4.5, 6.0, 12.0, 18.0, 24.0, 30.0, 36.0, 48.0, 60.0, 90.0, 120.0,
    180.0, 270.0, 360.0,
];
/// Prediction-duration buckets, seconds (upstream "P").
pub const PREDICTION_BUCKETS: &[f64] = &[
    0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
];

fn ttft_hist() -> Histogram {
    Histogram::new(TTFT_BUCKETS.iter().copied())
}
fn tpot_hist() -> Histogram {
    Histogram::new(TPOT_BUCKETS.iter().copied())
}
fn pred_hist() -> Histogram {
    Histogram::new(PREDICTION_BUCKETS.iter().copied())
}

/// Every SLO series. Cheap to clone (families are `Arc`s); the plugins write, the picker
/// registers once with [`SloMetrics::register`].
#[derive(Clone, Debug)]
pub struct SloMetrics {
    /// Measured TTFT.
    pub ttft: HistFamily,
    /// Last measured TTFT.
    pub ttft_gauge: GaugeF,
    /// Predicted TTFT of the chosen endpoint.
    pub predicted_ttft: HistFamily,
    /// Last predicted TTFT.
    pub predicted_ttft_gauge: GaugeF,
    /// Duration of the bulk prediction call.
    pub ttft_prediction_duration: HistFamily,
    /// Last bulk prediction duration.
    pub ttft_prediction_duration_gauge: GaugeF,
    /// Measured TPOT (mean inter-token latency).
    pub tpot: HistFamily,
    /// Last measured TPOT.
    pub tpot_gauge: GaugeF,
    /// Predicted TPOT of the chosen endpoint.
    pub predicted_tpot: HistFamily,
    /// Last predicted TPOT.
    pub predicted_tpot_gauge: GaugeF,
    /// Duration of the bulk prediction call (the same call predicts both).
    pub tpot_prediction_duration: HistFamily,
    /// Last bulk prediction duration.
    pub tpot_prediction_duration_gauge: GaugeF,
    /// 1 if the last TTFT exceeded its SLO, else 0.
    pub ttft_slo_violation: GaugeF,
    /// TTFT SLO violations so far.
    pub ttft_slo_violation_total: GaugeF,
    /// 1 if the last TPOT exceeded its SLO, else 0.
    pub tpot_slo_violation: GaugeF,
    /// TPOT SLO violations so far.
    pub tpot_slo_violation_total: GaugeF,
    /// Last TTFT SLO seen.
    pub ttft_slo_threshold: GaugeF,
    /// Last TPOT SLO seen.
    pub tpot_slo_threshold: GaugeF,
    /// Endpoint TPOT predictions raised to the step length the endpoint is streaming at
    /// (the scorer's observed-step floor): a rising rate means the model lags the load.
    pub tpot_floored: Counter,
    /// Endpoint TTFT predictions raised to how long this picker's oldest request there has
    /// been waiting for its first chunk: a rising rate means an endpoint stalled.
    pub ttft_floored: Counter,
}

impl Default for SloMetrics {
    fn default() -> Self {
        SloMetrics {
            ttft: Family::new_with_constructor(ttft_hist),
            ttft_gauge: GaugeF::default(),
            predicted_ttft: Family::new_with_constructor(ttft_hist),
            predicted_ttft_gauge: GaugeF::default(),
            ttft_prediction_duration: Family::new_with_constructor(pred_hist),
            ttft_prediction_duration_gauge: GaugeF::default(),
            tpot: Family::new_with_constructor(tpot_hist),
            tpot_gauge: GaugeF::default(),
            predicted_tpot: Family::new_with_constructor(tpot_hist),
            predicted_tpot_gauge: GaugeF::default(),
            tpot_prediction_duration: Family::new_with_constructor(pred_hist),
            tpot_prediction_duration_gauge: GaugeF::default(),
            ttft_slo_violation: GaugeF::default(),
            ttft_slo_violation_total: GaugeF::default(),
            tpot_slo_violation: GaugeF::default(),
            tpot_slo_violation_total: GaugeF::default(),
            ttft_slo_threshold: GaugeF::default(),
            tpot_slo_threshold: GaugeF::default(),
            tpot_floored: Counter::default(),
            ttft_floored: Counter::default(),
        }
    }
}

const P: &str = "inference_objective_request_";

impl SloMetrics {
    /// Registers every series under its seed name (`inference_objective_request_…`).
    pub fn register(&self, r: &mut Registry) {
        macro_rules! reg {
            ($field:ident, $name:literal, $help:literal) => {
                r.register(format!("{P}{}", $name), $help, self.$field.clone());
            };
        }
        reg!(
            ttft,
            "ttft_seconds",
            "Inference model TTFT distribution in seconds for each model and target model."
        );
        reg!(
            ttft_gauge,
            "ttft_seconds_gauge",
            "Inference model TTFT gauge in seconds for each model and target model."
        );
        reg!(
            predicted_ttft,
            "predicted_ttft_seconds",
            "Inference model Predicted TTFT distribution in seconds for each model and target model."
        );
        reg!(
            predicted_ttft_gauge,
            "predicted_ttft_seconds_gauge",
            "Inference model Predicted TTFT gauge in seconds for each model and target model."
        );
        reg!(
            ttft_prediction_duration,
            "ttft_prediction_duration_seconds",
            "Duration taken to generate TTFT predictions in seconds for each model and target model."
        );
        reg!(
            ttft_prediction_duration_gauge,
            "ttft_prediction_duration_seconds_gauge",
            "Latest duration taken to generate TTFT predictions in seconds for each model and target model."
        );
        reg!(
            tpot,
            "tpot_seconds",
            "Inference model TPOT distribution in seconds for each model and target model."
        );
        reg!(
            tpot_gauge,
            "tpot_seconds_gauge",
            "Inference model TPOT gauge in seconds for each model and target model."
        );
        reg!(
            predicted_tpot,
            "predicted_tpot_seconds",
            "Inference model Predicted TPOT distribution in seconds for each model and target model."
        );
        reg!(
            predicted_tpot_gauge,
            "predicted_tpot_seconds_gauge",
            "Inference model Predicted TPOT gauge in seconds for each model and target model."
        );
        reg!(
            tpot_prediction_duration,
            "tpot_prediction_duration_seconds",
            "Duration taken to generate TPOT predictions in seconds for each model and target model."
        );
        reg!(
            tpot_prediction_duration_gauge,
            "tpot_prediction_duration_seconds_gauge",
            "Latest duration taken to generate TPOT predictions in seconds for each model and target model."
        );
        reg!(
            ttft_slo_violation,
            "ttft_slo_violation",
            "Boolean indicator (0 or 1) of whether the last TTFT measurement violated the SLO threshold for each model and target model."
        );
        reg!(
            ttft_slo_violation_total,
            "ttft_slo_violation_total",
            "Counter of TTFT SLO violations for each model and target model (monotonic; exposed as a gauge)."
        );
        reg!(
            tpot_slo_violation,
            "tpot_slo_violation",
            "Boolean indicator (0 or 1) of whether the last TPOT measurement violated the SLO threshold for each model and target model."
        );
        reg!(
            tpot_slo_violation_total,
            "tpot_slo_violation_total",
            "Counter of TPOT SLO violations for each model and target model (monotonic; exposed as a gauge)."
        );
        reg!(
            ttft_slo_threshold,
            "ttft_slo_threshold_seconds",
            "Current TTFT SLO threshold in seconds for each model and target model."
        );
        reg!(
            tpot_slo_threshold,
            "tpot_slo_threshold_seconds",
            "Current TPOT SLO threshold in seconds for each model and target model."
        );
        r.register(
            "sluice_latency_prediction_tpot_floored",
            "Endpoint TPOT predictions that the predicted-latency scorer raised to the step length the endpoint is streaming at now, because the model predicted less.",
            self.tpot_floored.clone(),
        );
        r.register(
            "sluice_latency_prediction_ttft_floored",
            "Endpoint TTFT predictions that the predicted-latency scorer raised to how long this picker's oldest request on the endpoint (same response mode) has been waiting for its first chunk, because the model predicted less.",
            self.ttft_floored.clone(),
        );
    }

    /// Records the duration of one bulk prediction (it covers TTFT and TPOT).
    pub fn observe_prediction_duration(&self, l: &SloLabels, seconds: f64) {
        for (h, g) in [
            (
                &self.ttft_prediction_duration,
                &self.ttft_prediction_duration_gauge,
            ),
            (
                &self.tpot_prediction_duration,
                &self.tpot_prediction_duration_gauge,
            ),
        ] {
            h.get_or_create(l).observe(seconds);
            g.get_or_create(l).set(seconds);
        }
    }

    /// Records what was predicted for the chosen endpoint.
    pub fn observe_predicted(&self, l: &SloLabels, ttft_ms: f64, tpot_ms: Option<f64>) {
        self.predicted_ttft.get_or_create(l).observe(ttft_ms / 1e3);
        self.predicted_ttft_gauge
            .get_or_create(l)
            .set(ttft_ms / 1e3);
        if let Some(t) = tpot_ms {
            self.predicted_tpot.get_or_create(l).observe(t / 1e3);
            self.predicted_tpot_gauge.get_or_create(l).set(t / 1e3);
        }
    }

    /// Records a measured TTFT and checks it against the SLO (0 = none: no check).
    pub fn observe_ttft(&self, l: &SloLabels, actual_ms: f64, slo_ms: f64) {
        self.ttft.get_or_create(l).observe(actual_ms / 1e3);
        self.ttft_gauge.get_or_create(l).set(actual_ms / 1e3);
        if slo_ms > 0.0 {
            let violated = actual_ms > slo_ms;
            self.ttft_slo_threshold.get_or_create(l).set(slo_ms / 1e3);
            self.ttft_slo_violation
                .get_or_create(l)
                .set(if violated { 1.0 } else { 0.0 });
            if violated {
                self.ttft_slo_violation_total.get_or_create(l).inc();
            }
        }
    }

    /// Records a measured TPOT and checks it against the SLO (0 = none: no check).
    pub fn observe_tpot(&self, l: &SloLabels, actual_ms: f64, slo_ms: f64) {
        self.tpot.get_or_create(l).observe(actual_ms / 1e3);
        self.tpot_gauge.get_or_create(l).set(actual_ms / 1e3);
        if slo_ms > 0.0 {
            let violated = actual_ms > slo_ms;
            self.tpot_slo_threshold.get_or_create(l).set(slo_ms / 1e3);
            self.tpot_slo_violation
                .get_or_create(l)
                .set(if violated { 1.0 } else { 0.0 });
            if violated {
                self.tpot_slo_violation_total.get_or_create(l).inc();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_the_seed_names_and_parses_as_one_family_each() {
        let m = SloMetrics::default();
        let l = SloLabels {
            model_name: "m".into(),
            target_model_name: "m-v2".into(),
        };
        m.observe_ttft(&l, 300.0, 200.0);
        m.observe_ttft(&l, 100.0, 200.0);
        m.observe_tpot(&l, 30.0, 20.0);
        m.observe_predicted(&l, 150.0, Some(25.0));
        m.observe_prediction_duration(&l, 0.000_02);
        m.tpot_floored.inc();
        let mut r = Registry::default();
        m.register(&mut r);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &r).unwrap();
        for name in [
            "inference_objective_request_ttft_seconds_bucket",
            "inference_objective_request_predicted_tpot_seconds_gauge{",
            "inference_objective_request_ttft_slo_violation{",
            "inference_objective_request_ttft_slo_violation_total{",
            "inference_objective_request_tpot_slo_threshold_seconds{",
            "inference_objective_request_tpot_prediction_duration_seconds_count",
            "sluice_latency_prediction_tpot_floored_total 1",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
        assert!(text.contains(
            "inference_objective_request_ttft_slo_violation_total{model_name=\"m\",target_model_name=\"m-v2\"} 1"
        ));
        assert!(text.contains(
            "inference_objective_request_ttft_slo_violation{model_name=\"m\",target_model_name=\"m-v2\"} 0"
        ), "the last TTFT (100 ms) met its 200 ms SLO");
        let mut families: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        let n = families.len();
        families.sort_unstable();
        families.dedup();
        assert_eq!(families.len(), n, "duplicate metric families");
    }
}
