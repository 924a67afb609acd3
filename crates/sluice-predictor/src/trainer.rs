//! Online training: a synchronous [`Trainer`] and the [`InProcessPredictor`] that runs one
//! on a background thread and swaps each new model in atomically.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::RwLock;

use crate::features::{ClassRegistry, Features, Prediction, TrainingSample};
use crate::model::{FitParams, Model, ModelInfo, fit_model};
use crate::store::Store;
use crate::{LatencyPredictor, PredictError, PredictFuture, PredictorConfig};

/// Accumulates samples and fits model versions. Synchronous and deterministic: the
/// building block of [`InProcessPredictor`], usable directly by simulators that train in
/// virtual time.
#[derive(Debug)]
pub struct Trainer {
    config: PredictorConfig,
    ttft: Store,
    tpot: Store,
    new_since_fit: usize,
    version: u64,
    rejected: u64,
}

impl Trainer {
    /// An empty trainer.
    pub fn new(config: PredictorConfig) -> Self {
        Trainer {
            ttft: Store::new(config.max_samples_per_bucket, config.max_samples_total),
            tpot: Store::new(config.max_samples_per_bucket, config.max_samples_total),
            config,
            new_since_fit: 0,
            version: 0,
            rejected: 0,
        }
    }

    /// Stores a sample. Latencies that are missing, non-finite or not positive are
    /// ignored; a sample with neither latency usable counts as rejected and returns false.
    pub fn add(&mut self, sample: &TrainingSample) -> bool {
        let usable = |v: Option<f64>| v.filter(|v| v.is_finite() && *v > 0.0);
        let (ttft, tpot) = (usable(sample.ttft_ms), usable(sample.tpot_ms));
        if ttft.is_none() && tpot.is_none() {
            self.rejected += 1;
            return false;
        }
        if let Some(y) = ttft {
            self.ttft.push(sample.features_at_dispatch, y);
        }
        if let Some(y) = tpot {
            self.tpot.push(sample.features_at_dispatch, y);
        }
        self.new_since_fit += 1;
        true
    }

    /// Samples stored for (TTFT, TPOT).
    pub fn sample_counts(&self) -> (usize, usize) {
        (self.ttft.len(), self.tpot.len())
    }

    /// Samples added since the last successful fit.
    pub fn new_since_fit(&self) -> usize {
        self.new_since_fit
    }

    /// Samples rejected as unusable so far.
    pub fn rejected(&self) -> u64 {
        self.rejected
    }

    /// Fits a new model version from the stored samples; `None` while there are fewer than
    /// `min_samples` TTFT samples.
    pub fn fit(&mut self) -> Option<Model> {
        let params = FitParams {
            objective: self.config.objective,
            min_samples: self.config.min_samples,
            min_group_samples: self.config.min_group_samples,
            prior_strength: self.config.prior_strength,
            ttft_boost: boost_params(self.config.ttft_trees),
            tpot_boost: boost_params(self.config.tpot_trees),
        };
        let model = fit_model(self.version + 1, params, self.ttft.rows(), self.tpot.rows())?;
        self.version += 1;
        self.new_since_fit = 0;
        Some(model)
    }
}

fn boost_params(trees: usize) -> Option<crate::boost::BoostParams> {
    (trees > 0).then(|| crate::boost::BoostParams {
        trees,
        ..crate::boost::BoostParams::default()
    })
}

enum Msg {
    Sample(TrainingSample),
    /// Ingest everything queued before this, fit, publish, then reply.
    TrainNow(SyncSender<Option<ModelInfo>>),
}

/// Counters of an [`InProcessPredictor`], for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PredictorStats {
    /// Samples accepted into the training queue.
    pub samples_queued: u64,
    /// Samples dropped because the training queue was full (or the trainer stopped).
    pub samples_dropped: u64,
    /// Model versions published.
    pub models_published: u64,
}

#[derive(Debug, Default)]
struct Counters {
    queued: AtomicU64,
    dropped: AtomicU64,
    published: AtomicU64,
}

/// The in-process latency predictor: predictions read the current model version without
/// waiting for training; samples go through a bounded channel to a trainer thread that
/// publishes new versions.
///
/// The model slot is a `RwLock<Option<Arc<Model>>>` held only to clone or replace the
/// `Arc` (nanoseconds); fitting happens outside it, so a prediction never waits for a fit.
#[derive(Debug)]
pub struct InProcessPredictor {
    model: Arc<RwLock<Option<Arc<Model>>>>,
    tx: Option<SyncSender<Msg>>,
    thread: Option<JoinHandle<()>>,
    counters: Arc<Counters>,
    classes: ClassRegistry,
}

impl InProcessPredictor {
    /// Starts the trainer thread. Returns an error only if the OS refuses a thread.
    pub fn spawn(config: PredictorConfig) -> std::io::Result<Self> {
        Self::spawn_gated(config, None)
    }

    /// `gate`: the worker waits for it before consuming anything (lets tests fill the
    /// queue deterministically).
    fn spawn_gated(config: PredictorConfig, gate: Option<Receiver<()>>) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::sync_channel(config.queue_capacity.max(1));
        let model = Arc::new(RwLock::new(None));
        let counters = Arc::new(Counters::default());
        let classes = ClassRegistry::new(config.max_classes);
        let worker = Worker {
            trainer: Trainer::new(config.clone()),
            model: Arc::clone(&model),
            counters: Arc::clone(&counters),
            retrain_interval: config.retrain_interval,
            min_samples: config.min_samples,
        };
        let thread = std::thread::Builder::new()
            .name("sluice-predictor-trainer".into())
            .spawn(move || {
                if let Some(gate) = gate {
                    let _ = gate.recv();
                }
                worker.run(rx)
            })?;
        Ok(InProcessPredictor {
            model,
            tx: Some(tx),
            thread: Some(thread),
            counters,
            classes,
        })
    }

    /// The current model version, if any. Cheap: one `Arc` clone under a read lock.
    pub fn current(&self) -> Option<Arc<Model>> {
        self.model.read().clone()
    }

    /// Predicts every endpoint of `batch` with the current model.
    pub fn predict_batch_now(&self, batch: &[Features]) -> Result<Vec<Prediction>, PredictError> {
        let model = self.current().ok_or(PredictError::NotReady)?;
        // Too few samples of this response mode yet (whole responses come back seconds
        // after streamed first chunks): the caller's fallback beats a guess.
        if batch.iter().any(|f| !model.covers(f.streamed)) {
            return Err(PredictError::NotReady);
        }
        let mut out = Vec::with_capacity(batch.len());
        model.predict_into(batch, &mut out);
        Ok(out)
    }

    /// Queues a training sample without blocking; a full queue drops it (counted in
    /// [`PredictorStats::samples_dropped`]).
    pub fn record_sample(&self, sample: TrainingSample) {
        let sent = self
            .tx
            .as_ref()
            .is_some_and(|tx| match tx.try_send(Msg::Sample(sample)) {
                Ok(()) => true,
                Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
            });
        let counter = if sent {
            &self.counters.queued
        } else {
            &self.counters.dropped
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Blocks until every sample queued so far is stored, then fits and publishes a model.
    /// Returns the new version's summary, or `None` if there is still too little data.
    ///
    /// For tests, shutdown and simulators in virtual time (set
    /// `retrain_interval: None`); never call it on a request path.
    pub fn train_now(&self) -> Option<ModelInfo> {
        let tx = self.tx.as_ref()?;
        let (reply_tx, reply_rx) = mpsc::sync_channel(1);
        tx.send(Msg::TrainNow(reply_tx)).ok()?;
        reply_rx.recv().ok().flatten()
    }

    /// Counters for metrics.
    pub fn stats(&self) -> PredictorStats {
        PredictorStats {
            samples_queued: self.counters.queued.load(Ordering::Relaxed),
            samples_dropped: self.counters.dropped.load(Ordering::Relaxed),
            models_published: self.counters.published.load(Ordering::Relaxed),
        }
    }

    /// The registry that maps class label values to [`crate::ClassId`]s for this predictor.
    pub fn classes(&self) -> &ClassRegistry {
        &self.classes
    }
}

impl Drop for InProcessPredictor {
    fn drop(&mut self) {
        // Closing the channel ends the worker loop.
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl LatencyPredictor for InProcessPredictor {
    fn predict_batch<'a>(&'a self, batch: &'a [Features]) -> PredictFuture<'a> {
        PredictFuture::ready(self.predict_batch_now(batch))
    }

    fn record(&self, sample: TrainingSample) {
        self.record_sample(sample);
    }

    fn ready(&self) -> bool {
        self.model.read().is_some()
    }
}

/// The least time between the fits that give a response mode its first model.
fn early_fit_gap(retrain_interval: Duration) -> Duration {
    (retrain_interval / 20).min(Duration::from_millis(250))
}

struct Worker {
    trainer: Trainer,
    model: Arc<RwLock<Option<Arc<Model>>>>,
    counters: Arc<Counters>,
    retrain_interval: Option<Duration>,
    min_samples: usize,
}

impl Worker {
    fn run(mut self, rx: Receiver<Msg>) {
        let mut last_fit = Instant::now();
        // TTFT samples received and whether the published model covers them, per response
        // mode (streamed, whole response).
        let mut seen = [0_usize; 2];
        let mut covered = [false; 2];
        loop {
            // A response mode's first model is fit as soon as there are enough samples of
            // it, not a full interval later: until then its requests fall back to the
            // composite score. (At most every 250 ms, in case a fit cannot cover the mode
            // with the samples the store kept.)
            let early = (0..2).any(|m| !covered[m] && seen[m] >= self.min_samples)
                && self.trainer.new_since_fit() > 0;
            let wait = match self.retrain_interval {
                Some(iv) if early => early_fit_gap(iv).saturating_sub(last_fit.elapsed()),
                Some(iv) => iv.saturating_sub(last_fit.elapsed()),
                None => Duration::from_secs(3600),
            };
            match rx.recv_timeout(wait) {
                Ok(Msg::Sample(s)) => {
                    if self.trainer.add(&s) && s.ttft_ms.is_some_and(|y| y.is_finite() && y > 0.0) {
                        seen[usize::from(!s.features_at_dispatch.streamed)] += 1;
                    }
                }
                Ok(Msg::TrainNow(reply)) => {
                    let info = self.fit_and_publish();
                    covered = self.covered();
                    last_fit = Instant::now();
                    let _ = reply.send(info);
                    continue;
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            let Some(iv) = self.retrain_interval else {
                continue;
            };
            let early = (0..2).any(|m| !covered[m] && seen[m] >= self.min_samples)
                && last_fit.elapsed() >= early_fit_gap(iv);
            if self.trainer.new_since_fit() > 0 && (early || last_fit.elapsed() >= iv) {
                self.fit_and_publish();
                covered = self.covered();
                last_fit = Instant::now();
            }
        }
    }

    fn covered(&self) -> [bool; 2] {
        self.model
            .read()
            .as_ref()
            .map_or([false; 2], |m| [m.covers(true), m.covers(false)])
    }

    fn fit_and_publish(&mut self) -> Option<ModelInfo> {
        let model = Arc::new(self.trainer.fit()?);
        let info = model.info();
        *self.model.write() = Some(model);
        self.counters.published.fetch_add(1, Ordering::Relaxed);
        Some(info)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_blocking() {
        let cfg = PredictorConfig {
            queue_capacity: 8,
            retrain_interval: None,
            ..PredictorConfig::default()
        };
        let (open, gate) = mpsc::sync_channel(1);
        let p = InProcessPredictor::spawn_gated(cfg, Some(gate)).unwrap();
        let s = TrainingSample {
            features_at_dispatch: Features::default(),
            ttft_ms: Some(10.0),
            tpot_ms: None,
        };
        for _ in 0..20 {
            p.record(s);
        }
        let stats = p.stats();
        assert_eq!(stats.samples_queued, 8);
        assert_eq!(stats.samples_dropped, 12);
        open.send(()).unwrap();
        // The 8 queued samples were kept: below min_samples, so still no model.
        assert_eq!(p.train_now(), None);
    }
}
