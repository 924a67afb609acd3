//! TTFT/TPOT latency prediction for SLO-aware routing.
//!
//! Two implementations of one trait, [`LatencyPredictor`]:
//!
//! - [`InProcessPredictor`]: a model that lives in the picker (see [`model`] for the choice
//!   and its justification), predicts every candidate of a request in one call in a few
//!   microseconds, and is retrained online on a background thread from
//!   [`TrainingSample`]s of real traffic, each new version swapped in atomically.
//! - `RemotePredictor` (cargo feature `remote`): a client for the llm-d latency predictor
//!   sidecars' HTTP API, for users who already run them.
//!
//! Callers must treat any error, and [`PredictError::NotReady`] in particular, as "no
//! prediction": fall back to the composite score and serve the request.
//!
//! The core does no I/O; [`LatencyTracker`] turns a served request into a training sample.

mod boost;
pub mod features;
pub mod measure;
pub mod model;
mod store;
pub mod trainer;

#[cfg(feature = "remote")]
pub mod remote;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

pub use features::{ClassId, ClassRegistry, Features, PodRole, Prediction, TrainingSample};
pub use measure::{LatencyTracker, Measured};
pub use model::{Model, ModelInfo, Objective, ParseObjectiveError};
#[cfg(feature = "remote")]
pub use remote::{RemoteConfig, RemotePredictor};
pub use trainer::{InProcessPredictor, PredictorStats, Trainer};

/// Why a batch has no predictions. Every variant means "fall back", never "fail the
/// request".
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum PredictError {
    /// No model has been trained yet (too few samples so far).
    #[error("latency predictor has no model yet (still collecting training samples)")]
    NotReady,
    /// The remote predictor did not answer in time.
    #[error("latency predictor at {url} did not answer within {after:?}")]
    Timeout {
        /// The prediction server called.
        url: String,
        /// The timeout that expired.
        after: Duration,
    },
    /// The remote predictor could not be reached or answered with an error.
    #[error("latency predictor at {url} failed: {reason}")]
    Unavailable {
        /// The prediction server called.
        url: String,
        /// What went wrong.
        reason: String,
    },
}

/// The result of [`LatencyPredictor::predict_batch`]: one prediction per input row, in
/// order.
pub type PredictResult = Result<Vec<Prediction>, PredictError>;

/// The future returned by [`LatencyPredictor::predict_batch`].
///
/// The in-process predictor returns an already-complete future, so a synchronous caller
/// can take the answer with [`PredictFuture::try_now`] without an executor or an
/// allocation; the remote predictor returns a pending one to `.await`.
pub enum PredictFuture<'a> {
    /// The answer is available now.
    Ready(Option<PredictResult>),
    /// The answer needs I/O.
    Pending(Pin<Box<dyn Future<Output = PredictResult> + Send + 'a>>),
}

impl<'a> PredictFuture<'a> {
    /// An already-complete future.
    pub fn ready(result: PredictResult) -> Self {
        PredictFuture::Ready(Some(result))
    }

    /// A future that still has work to do.
    pub fn pending(fut: impl Future<Output = PredictResult> + Send + 'a) -> Self {
        PredictFuture::Pending(Box::pin(fut))
    }

    /// The answer if it is available without waiting; `None` for a pending future (which is
    /// then dropped, cancelling its I/O) or one already polled to completion.
    pub fn try_now(self) -> Option<PredictResult> {
        match self {
            PredictFuture::Ready(r) => r,
            PredictFuture::Pending(_) => None,
        }
    }
}

impl fmt::Debug for PredictFuture<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PredictFuture::Ready(r) => f.debug_tuple("Ready").field(r).finish(),
            PredictFuture::Pending(_) => f.write_str("Pending(..)"),
        }
    }
}

impl Future for PredictFuture<'_> {
    type Output = PredictResult;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<PredictResult> {
        match self.get_mut() {
            // Polling a completed future again reports "not ready" rather than panicking.
            PredictFuture::Ready(r) => Poll::Ready(r.take().unwrap_or(Err(PredictError::NotReady))),
            PredictFuture::Pending(fut) => fut.as_mut().poll(cx),
        }
    }
}

/// A latency predictor the SLO-aware scheduling plugins can call: in-process or remote.
pub trait LatencyPredictor: Send + Sync + fmt::Debug {
    /// Predicts TTFT and TPOT for every candidate endpoint of one request, in one call.
    /// The output has one entry per input row, in order.
    fn predict_batch<'a>(&'a self, batch: &'a [Features]) -> PredictFuture<'a>;

    /// Hands over a training sample. Never blocks: when the queue is full the sample is
    /// dropped and counted.
    fn record(&self, sample: TrainingSample);

    /// Whether a prediction is expected to succeed now (a model exists / the remote
    /// server answered last time). Advisory: callers still handle errors, and must not
    /// skip calls because of it — the remote predictor only learns it is ready by
    /// answering one.
    fn ready(&self) -> bool;

    /// Whether [`predict_batch`](Self::predict_batch) answers at once (the in-process
    /// predictor). A scheduler that cannot wait asks an asynchronous predictor outside the
    /// scheduling cycle instead of calling it and dropping the future.
    fn is_synchronous(&self) -> bool {
        true
    }
}

/// Configuration of the in-process predictor.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct PredictorConfig {
    /// What a prediction estimates. Default: the 90th percentile (`Quantile { q: 0.9 }`),
    /// upstream's code default, not its Helm `mean`. The SLO scorer asks "will this
    /// endpoint meet the SLO?", and emergent serving latencies are right-skewed (a request
    /// arriving mid-step, prefix blocks still being computed, prefill chunks of later
    /// arrivals): a median or mean prediction is exceeded half the time by construction, so
    /// `least` headroom packing onto a "just valid" endpoint misses its SLO about as often
    /// as it meets it. On `cargo xtask bench-slo` (8 heterogeneous servers at 100 req/s)
    /// `least` met 79.5 % of SLOs with the median and 96.4 % with p90, whose predictions
    /// covered 91 % of actual TTFTs. Use `Quantile { q: 0.5 }` (the median: lowest MAPE,
    /// about half the mean's on the engine simulation in the tests) when the predictions
    /// themselves are what you read, or `Mean` for upstream's Helm parity.
    pub objective: Objective,
    /// Samples kept per stratification bucket, newest first (upstream: 500).
    pub max_samples_per_bucket: usize,
    /// Samples kept per target over all buckets (bounds memory with many classes, and the
    /// cost of a fit: ~60 ms per target at 50k samples in quantile mode for the linear
    /// part; the trees fit at most 20k of them).
    pub max_samples_total: usize,
    /// TTFT samples needed before the first model (TPOT likewise for its model).
    pub min_samples: usize,
    /// Samples a (class, role, streamed) group needs for its own model; below it the shared model
    /// serves it.
    pub min_group_samples: usize,
    /// How many samples' worth of trust a group model puts in the shared model.
    pub prior_strength: f64,
    /// How often new samples trigger a refit; `None` = only on `train_now`.
    #[serde(with = "opt_millis", rename = "retrainIntervalMs")]
    pub retrain_interval: Option<Duration>,
    /// Bound of the training-sample queue.
    pub queue_capacity: usize,
    /// Distinct hardware classes tracked; more map to the shared class.
    pub max_classes: u16,
    /// Boosted oblivious trees (depth 4) correcting the linear TTFT model's relative error
    /// (0 = linear only). Each tree costs ~1.5 ns per endpoint; 32 took the median model's
    /// TTFT MAPE on `cargo xtask bench-slo` (seed 7) from 17.1 % to 14.4 % with `most`.
    pub ttft_trees: usize,
    /// Boosted trees for TPOT (0 = linear only, the default: they did not lower TPOT MAPE
    /// on the bench, where most TPOT error comes from requests that arrive after dispatch).
    pub tpot_trees: usize,
}

impl Default for PredictorConfig {
    fn default() -> Self {
        PredictorConfig {
            objective: Objective::P90,
            max_samples_per_bucket: 500,
            max_samples_total: 50_000,
            min_samples: 50,
            min_group_samples: 20,
            prior_strength: 20.0,
            retrain_interval: Some(Duration::from_secs(5)),
            queue_capacity: 16_384,
            max_classes: 64,
            ttft_trees: 32,
            tpot_trees: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_from_camel_case_json_with_defaults_for_the_rest() {
        let cfg: PredictorConfig = serde_json::from_str(
            r#"{"objective": {"type": "quantile", "q": 0.9}, "retrainIntervalMs": 1500, "maxClasses": 8}"#,
        )
        .unwrap();
        assert_eq!(cfg.objective, Objective::Quantile { q: 0.9 });
        assert_eq!(cfg.retrain_interval, Some(Duration::from_millis(1500)));
        assert_eq!(cfg.max_classes, 8);
        assert_eq!(cfg.min_samples, PredictorConfig::default().min_samples);
        let manual: PredictorConfig =
            serde_json::from_str(r#"{"retrainIntervalMs": null}"#).unwrap();
        assert_eq!(manual.retrain_interval, None);
    }
}

mod opt_millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(d) => s.serialize_some(&(d.as_millis() as u64)),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(Duration::from_millis))
    }
}
