//! The latency model: per-(class, role, streamed) linear models on engineered features, fit by
//! relative-error ridge regression with a closed-form solve, and for TTFT a small ensemble
//! of boosted oblivious trees (`boost.rs`) that corrects the linear model's relative error.
//!
//! # Why this model
//!
//! The predictor runs inside the picker, once per request, over every candidate endpoint.
//! What we need from it, in order:
//!
//! 1. **Microseconds per decision.** The linear part is two dot products over about a
//!    dozen engineered features (~25 ns per endpoint). The TTFT correction is 32 oblivious
//!    trees of depth 4: each is 4 comparisons forming a leaf index, branch-free, ~1.5 ns a
//!    tree. 100 endpoints cost about 7–8 µs in all (criterion, `predict_100_endpoints`),
//!    against a 20 µs budget. Upstream's XGBoost sidecar costs 12–27 ms per 100-endpoint
//!    call; a general tree crate (`forust-ml`, `perpetual`, `gbdt`: all pull in rayon or
//!    sysinfo, and evaluate pointer-linked trees of a few hundred nodes) would spend that
//!    budget on a few endpoints, hence the few hundred lines of `boost.rs`.
//! 2. **Cheap, bounded online training.** The linear fit accumulates a p×p normal matrix
//!    (p ≤ 19) in one pass over the stored samples and solves it by Cholesky: O(n·p²),
//!    ~10 ms for 100k samples. The trees are histogram-fit (32 quantile bins per feature)
//!    on at most 20k rows: O(trees·depth·rows·features), a few hundred ms at the cap, on
//!    the trainer thread. Both are deterministic for a given sample set.
//! 3. **Accuracy on serving-engine physics.** TTFT and TPOT of a batching engine are close
//!    to linear in the right features: prefill time ∝ uncached prompt tokens, waiting
//!    ahead ∝ tokens and requests in flight, each slowed by the decode batch sharing the
//!    step (the `running × tokens` interactions), and each waiting request holds the queue
//!    for steps whose length grows with the batch (`waiting × running`); TPOT ∝ batch size
//!    and KV footprint. A few curvature terms (`waiting²`, `kv × tokens`,
//!    `tokens²`) absorb the blow-up near saturation; with them a latency function
//!    *outside* the model's span is still fit to ~6 % MAPE (test
//!    `a_saturating_fleet_outside_the_models_span_stays_within_ten_percent`). The linear
//!    part also extrapolates along load, which trees cannot: a router that packs
//!    endpoints (`least`) keeps pushing them past anything in the training set.
//!
//!    What the products cannot express are thresholds: the phase of the endpoint's
//!    current step (a request dispatched just after a step began waits for all of it),
//!    a prefill that fits in the current chunk or spills into the next, the class-specific
//!    shape of all that. On `cargo xtask bench-slo` (features dumped with
//!    `SLO_BENCH_DUMP`, studied offline) the per-class linear fit left 14–18 % TTFT MAPE
//!    and gradient-boosted trees on the raw observations 11–16 %; linear + trees on the
//!    log-ratio 9–15 %. In the closed loop (seeds 7–9 at 100 req/s) the TTFT correction and
//!    the pace features took the median model's TTFT MAPE from 18.5 % to 16.7 % on average
//!    with `most` and from 30.0 % to 26.8 % with `least`. Hence the trees correct
//!    the linear model (log of actual / linear) rather than replace it: they keep its
//!    extrapolation and only learn the shape it lacks, so a few shallow trees suffice.
//!
//!    TPOT gets no trees by default (`PredictorConfig::tpot_trees`): they did not help in
//!    the closed loop or offline. Three quarters of the TPOT error is information the picker
//!    does not have at dispatch: with the prefill tokens that *later* reach the endpoint
//!    during the request's decode and the mean decode batch over its life (an oracle from
//!    the bench dump), trees reach 3.5 % (`most`) and 5.4 % (`least`) TPOT MAPE against
//!    14.7 % and 20.7 % with what is observable at dispatch. The endpoint's recent mean step
//!    length and prompt-token rate (the closest observable proxies of that future) are
//!    inputs of the TTFT trees but not of the TPOT design: see `tpot_design`.
//! 4. **Relative error.** The linear fit minimises squared *relative* error (weights
//!    `1/y²`, refined once with `1/ŷ²`), and the trees fit the *log* of actual/linear,
//!    because routing compares predictions to SLOs: a 20 ms error on an idle pod's 40 ms
//!    TTFT matters as much as 500 ms on a loaded pod's 1 s. This is what MAPE measures too.
//! 5. **Robust with little data and heterogeneous fleets.** One pooled linear model is fit
//!    per response mode (streamed first chunk, whole response: different quantities, tens
//!    of milliseconds against seconds); each (hardware class, pod role, mode) group then
//!    gets its own, fit by ridge regression whose prior mean is its mode's model (worth
//!    `prior_strength` pseudo-samples). A class with 10 samples predicts like the mode's
//!    model nudged by its data; one with thousands is fit by its own data. Unknown classes
//!    use the mode's model. A mode with fewer than `min_samples` samples has no model, and
//!    the in-process predictor answers `NotReady` for its requests (the scorer's
//!    fallback), fitting again as soon as the samples are there. The trees are shared by
//!    all groups (class and role are two of their inputs), start only at 400 samples, and
//!    shrink every leaf towards no correction.
//! 6. **No extrapolation of load.** The load inputs (queue, running, prefill in flight,
//!    prompt length) are clamped to the largest seen in training for the mode (`Ceiling`).
//!    In the real-time demo an L4 flooded during the cold start sat at 38 waiting, where
//!    the model had seen at most 7: extrapolated, its squared and interaction terms turned
//!    the prediction negative, the floor made it 16 ms, and the most loaded endpoint of the
//!    pool looked the fastest.
//!
//! Quantile mode (p90 by default, or the median) continues the linear fit with iteratively
//! reweighted least squares on the relative pinball loss `ρ_q(y − ŷ)/y` (for q = 0.5 that
//! is exactly the MAPE), i.e. a linear quantile regression, still one small solve per
//! iteration (10 in all). A final multiplier, the q-quantile of the ratios
//! `actual / predicted`, calibrates what IRLS and the trees leave. With trees it is taken
//! on every fifth sample, held out of the trees' fit: in-sample residuals of trees are
//! optimistic and would calibrate a p90 that covers less than 90 %. In mean mode the
//! multiplier rescales the trees' geometric mean to the arithmetic one.

// Small dense linear algebra reads best with explicit indices.
#![allow(clippy::needless_range_loop)]

use crate::boost::{Boost, BoostParams, TREE_FEATURES};
use crate::features::{ClassId, Features, PodRole};

/// What a prediction estimates.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase", tag = "type")]
pub enum Objective {
    /// The expected latency (upstream's Helm setting `mean`).
    Mean,
    /// A quantile of the latency, for example 0.9 (upstream's code default `quantile`).
    Quantile {
        /// The quantile, in (0, 1).
        q: f64,
    },
}

impl Objective {
    /// The median: the most accurate point estimate.
    pub const MEDIAN: Objective = Objective::Quantile { q: 0.5 };

    /// The 90th percentile: the default, for SLO validity checks.
    pub const P90: Objective = Objective::Quantile { q: 0.9 };
}

/// An objective spelled wrongly.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "latency objective {0:?} is not recognised; expected mean, median, p<1..99> (e.g. p90) or a quantile in (0, 1) (e.g. 0.9)"
)]
pub struct ParseObjectiveError(String);

impl std::str::FromStr for Objective {
    type Err = ParseObjectiveError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseObjectiveError(s.to_owned());
        let t = s.trim().to_ascii_lowercase();
        let q = match t.as_str() {
            "mean" => return Ok(Objective::Mean),
            "median" => 0.5,
            _ => match t.strip_prefix('p') {
                Some(pct) => pct.parse::<u8>().map_err(|_| err())? as f64 / 100.0,
                None => t.parse::<f64>().map_err(|_| err())?,
            },
        };
        if q > 0.0 && q < 1.0 {
            Ok(Objective::Quantile { q })
        } else {
            Err(err())
        }
    }
}

pub(crate) const TTFT_P: usize = 19;
pub(crate) const TPOT_P: usize = 10;

/// Engineered TTFT features. Token counts are in thousands so the raw coefficients stay
/// near unit scale (the fit standardises anyway; this keeps the published ones readable).
///
/// The shape follows a chunked-prefill engine: the first token comes once the prefill work
/// ahead (`tif`) and the request's own uncached prompt (`eff`) have gone through steps that
/// the decode batch (`dec`) shares, so the decode batch multiplies both; `waiting` (scraped)
/// carries what other pickers sent. Before any of that, the request waits for the end of
/// the endpoint's current step (`residual`, from the rhythm of its response chunks), and the
/// step length itself says how busy the endpoint is right now.
#[inline]
pub(crate) fn ttft_design(f: &Features) -> [f64; TTFT_P] {
    let kv = f.kv_cache_usage;
    let input = f64::from(f.input_tokens) * 1e-3;
    let eff = f.uncached_input_tokens() * 1e-3;
    let tif = f64::from(f.prefill_tokens_in_flight) * 1e-3;
    let pending = f64::from(f.prefill_requests_in_flight);
    let dec = f64::from(f.decoding());
    let waiting = f64::from(f.waiting);
    let work = eff + tif;
    let queued = if f.waiting > 0 { 1.0 } else { 0.0 };
    let residual = f.step_residual_ms();
    let step = f.step_ms;
    [
        1.0,
        residual,
        step,
        eff,
        input,
        tif,
        pending,
        dec,
        kv,
        dec * eff,
        dec * tif,
        waiting,
        waiting * work,
        waiting * dec,
        kv * eff,
        kv * tif,
        eff * eff,
        waiting * waiting,
        queued,
    ]
}

/// Engineered TPOT features: a decode step costs a fixed part plus a part per sequence and
/// per context token (`dec`, `kv`), and the prefill work in flight (`tif`) will share the
/// steps of the request's decode.
///
/// The endpoint's recent mean step and prompt-token rate are *not* here, although they are
/// the live inter-token latency and the prefill arriving: with them (and `step × rate`) the
/// closed-loop bench lost most of `least`'s goodput past saturation (about 20 good req/s
/// instead of 29–111, mean 67, at 187.5 req/s over seeds 7–9), because extrapolated on an
/// overloaded endpoint they under-predicted. The SLO scorer now floors TPOT at the live
/// mean step instead (`apply_observed_step_floor`); retried on top of that, these features
/// were neutral (docs/slo-routing.md).
#[inline]
pub(crate) fn tpot_design(f: &Features) -> [f64; TPOT_P] {
    let kv = f.kv_cache_usage;
    let input = f64::from(f.input_tokens) * 1e-3;
    let tif = f64::from(f.prefill_tokens_in_flight) * 1e-3;
    let pending = f64::from(f.prefill_requests_in_flight);
    let dec = f64::from(f.decoding());
    let waiting = f64::from(f.waiting);
    let queued = if f.waiting > 0 { 1.0 } else { 0.0 };
    [
        1.0,
        dec,
        kv,
        tif,
        waiting,
        input,
        dec * kv,
        dec * dec,
        queued,
        pending,
    ]
}

/// What the boosted trees see: the raw observations (the trees find their own
/// interactions), plus the class and role so that a correction can be specific to one
/// kind of hardware.
#[inline]
pub(crate) fn tree_features(f: &Features) -> [f32; TREE_FEATURES] {
    [
        f32::from(f.class.0),
        f.role.index() as f32,
        f.kv_cache_usage as f32,
        f.input_tokens as f32,
        f.prefix_cache_score as f32,
        f.uncached_input_tokens() as f32,
        f.waiting as f32,
        f.running as f32,
        f.decoding() as f32,
        f.prefill_tokens_in_flight as f32,
        f.prefill_requests_in_flight as f32,
        f.step_ms as f32,
        f.since_step_ms.min(1e9) as f32,
        f.step_residual_ms() as f32,
        f.mean_step_ms as f32,
        f.prompt_token_rate as f32,
    ]
}

/// The model slot of a (class, role, streamed) triple.
#[inline]
pub(crate) fn group_index(class: ClassId, role: PodRole, streamed: bool) -> usize {
    (usize::from(class.0) * PodRole::COUNT + role.index()) * 2 + mode_of(streamed)
}

/// The response mode's index: 0 streamed, 1 whole response.
#[inline]
fn mode_of(streamed: bool) -> usize {
    usize::from(!streamed)
}

/// The response mode of a group slot (see `group_index` and `mode_of`).
#[inline]
fn mode_of_group(group: usize) -> usize {
    group % 2
}

/// The largest load seen in training, per response mode. Inputs are clamped to it before
/// the design is built: an endpoint far busier than any the model learnt from (a slow
/// class flooded before its first samples came back) is predicted like the busiest one
/// seen. Extrapolated, the quadratic and interaction terms can turn the prediction down,
/// and the floored result made the most loaded endpoint look the fastest. The step
/// lengths are not clamped: they carry the endpoint's speed, linearly.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Ceiling {
    input_tokens: u32,
    waiting: u32,
    running: u32,
    prefill_tokens_in_flight: u32,
    prefill_requests_in_flight: u32,
}

impl Ceiling {
    fn of(f: &Features) -> Self {
        Ceiling {
            input_tokens: f.input_tokens,
            waiting: f.waiting,
            running: f.running,
            prefill_tokens_in_flight: f.prefill_tokens_in_flight,
            prefill_requests_in_flight: f.prefill_requests_in_flight,
        }
    }

    fn widen_by(&mut self, other: &Ceiling) {
        self.input_tokens = self.input_tokens.max(other.input_tokens);
        self.waiting = self.waiting.max(other.waiting);
        self.running = self.running.max(other.running);
        self.prefill_tokens_in_flight = self
            .prefill_tokens_in_flight
            .max(other.prefill_tokens_in_flight);
        self.prefill_requests_in_flight = self
            .prefill_requests_in_flight
            .max(other.prefill_requests_in_flight);
    }

    #[inline]
    fn apply(&self, f: &Features) -> Features {
        Features {
            input_tokens: f.input_tokens.min(self.input_tokens),
            waiting: f.waiting.min(self.waiting),
            running: f.running.min(self.running),
            prefill_tokens_in_flight: f
                .prefill_tokens_in_flight
                .min(self.prefill_tokens_in_flight),
            prefill_requests_in_flight: f
                .prefill_requests_in_flight
                .min(self.prefill_requests_in_flight),
            ..*f
        }
    }
}

/// One fitted linear model over raw (un-standardised) engineered features.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Linear<const P: usize> {
    coef: [f64; P],
    /// Multiplier applied to the linear prediction (1 in mean mode; the residual-ratio
    /// quantile in quantile mode).
    multiplier: f64,
    /// Lowest value returned: half the smallest latency seen in training, so
    /// extrapolation can never predict a free (≤ 0 ms) endpoint.
    floor: f64,
    samples: usize,
}

impl<const P: usize> Linear<P> {
    /// The linear part alone, floored: the base the trees' correction multiplies.
    #[inline]
    fn base(&self, x: &[f64; P]) -> f64 {
        dot(&self.coef, x).max(self.floor)
    }

    /// The prediction given the trees' correction (a log-ratio; 0 without trees).
    #[inline]
    fn eval(&self, x: &[f64; P], correction: f64) -> f64 {
        (self.base(x) * correction.exp() * self.multiplier).max(self.floor)
    }
}

/// The models for one target (TTFT or TPOT).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct TargetModel<const P: usize> {
    /// Fit on every sample; used only for a response mode with too few samples of its own.
    shared: Linear<P>,
    /// Fit on the samples of one response mode (streamed, whole response): the prior of
    /// that mode's groups and the model of those without enough samples. A streamed TTFT
    /// (tens of ms) and a whole response (seconds) are different quantities: pooled, a
    /// hardware class with no whole-response samples yet would be predicted from a blend
    /// of the two and look faster than the classes that have them.
    modes: [Option<Linear<P>>; 2],
    groups: Vec<Option<Linear<P>>>,
    /// Per response mode (of all samples for a mode without any).
    ceilings: [Ceiling; 2],
    /// Correction of the linear models' relative error, shared by all groups (the class
    /// is one of its inputs); empty when boosting is off or data is short.
    boost: Boost,
}

impl<const P: usize> TargetModel<P> {
    #[inline]
    fn eval(&self, group: usize, f: &Features, design: fn(&Features) -> [f64; P]) -> f64 {
        let f = self.ceilings[mode_of_group(group)].apply(f);
        let correction = if self.boost.len() == 0 {
            0.0
        } else {
            self.boost.eval(&tree_features(&f))
        };
        self.pick(group).eval(&design(&f), correction)
    }

    #[inline]
    fn pick(&self, group: usize) -> &Linear<P> {
        match self.groups.get(group) {
            Some(Some(m)) => m,
            _ => self.modes[mode_of_group(group)]
                .as_ref()
                .unwrap_or(&self.shared),
        }
    }

    fn group_count(&self) -> usize {
        self.groups.iter().filter(|g| g.is_some()).count()
    }
}

/// A trained, immutable model version. Cheap to share behind an `Arc`.
#[derive(Clone, Debug, PartialEq)]
pub struct Model {
    version: u64,
    objective: Objective,
    ttft: TargetModel<TTFT_P>,
    tpot: Option<TargetModel<TPOT_P>>,
}

/// A summary of a model version, for logs and status endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelInfo {
    /// Monotonic version number, starting at 1.
    pub version: u64,
    /// Samples the TTFT model was fit on.
    pub ttft_samples: usize,
    /// Samples the TPOT model was fit on (0 without a TPOT model).
    pub tpot_samples: usize,
    /// (class, role, streamed) groups with their own TTFT model.
    pub ttft_groups: usize,
    /// (class, role, streamed) groups with their own TPOT model.
    pub tpot_groups: usize,
}

impl Model {
    /// Predicts one endpoint.
    #[inline]
    pub fn predict(&self, features: &Features) -> crate::Prediction {
        let f = features.sanitised();
        let g = group_index(f.class, f.role, f.streamed);
        let ttft_ms = self.ttft.eval(g, &f, ttft_design);
        let tpot_ms = self.tpot.as_ref().map(|t| t.eval(g, &f, tpot_design));
        crate::Prediction { ttft_ms, tpot_ms }
    }

    /// Predicts every endpoint of `batch` into `out` (cleared first), reusing its buffer.
    pub fn predict_into(&self, batch: &[Features], out: &mut Vec<crate::Prediction>) {
        out.clear();
        out.reserve(batch.len());
        out.extend(batch.iter().map(|f| self.predict(f)));
    }

    /// Whether the model has learnt the TTFT of this response mode (streamed first chunk,
    /// or whole response) from enough samples of it. Without that, `predict` answers from
    /// the model pooled over both modes, which is no estimate of either.
    pub fn covers(&self, streamed: bool) -> bool {
        self.ttft.modes[mode_of(streamed)].is_some()
    }

    /// What the model predicts.
    pub fn objective(&self) -> Objective {
        self.objective
    }

    /// A summary of this version.
    pub fn info(&self) -> ModelInfo {
        ModelInfo {
            version: self.version,
            ttft_samples: self.ttft.shared.samples,
            tpot_samples: self.tpot.as_ref().map_or(0, |t| t.shared.samples),
            ttft_groups: self.ttft.group_count(),
            tpot_groups: self.tpot.as_ref().map_or(0, TargetModel::group_count),
        }
    }
}

/// Knobs of one fit (a subset of `PredictorConfig`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct FitParams {
    pub objective: Objective,
    pub min_samples: usize,
    pub min_group_samples: usize,
    pub prior_strength: f64,
    /// Boosted correction of the TTFT model (`None`: linear only).
    pub ttft_boost: Option<BoostParams>,
    /// Boosted correction of the TPOT model (`None`: linear only).
    pub tpot_boost: Option<BoostParams>,
}

/// Builds a model version from the stored samples of both targets; `None` while TTFT has
/// fewer than `min_samples` samples.
pub(crate) fn fit_model<'a>(
    version: u64,
    params: FitParams,
    ttft_rows: impl Iterator<Item = (&'a Features, f64)> + Clone,
    tpot_rows: impl Iterator<Item = (&'a Features, f64)> + Clone,
) -> Option<Model> {
    let ttft = fit_target::<TTFT_P>(params, params.ttft_boost, ttft_rows, ttft_design)?;
    let tpot = fit_target::<TPOT_P>(params, params.tpot_boost, tpot_rows, tpot_design);
    Some(Model {
        version,
        objective: params.objective,
        ttft,
        tpot,
    })
}

/// Latencies below this (ms) are treated as this in relative weights, so a bogus
/// near-zero measurement cannot dominate the fit.
const Y_FLOOR_MS: f64 = 0.05;

/// IRLS iterations of a quantile fit after the least-squares start.
const QUANTILE_IRLS_STEPS: usize = 8;

/// Samples per coefficient below which a quantile fit skips IRLS.
const IRLS_MIN_SAMPLES_PER_COEF: usize = 40;

/// Ridge strength of the shared model, in pseudo-samples per coefficient: only enough to
/// keep the solve well-posed when a feature is constant (for example no queue yet).
const SHARED_RIDGE: f64 = 1e-3;

/// Samples per tree leaf below which boosting is skipped (the trees would mostly fit
/// noise; the linear model alone is the better guess with little data).
const BOOST_MIN_SAMPLES: usize = 400;

/// Every `CALIBRATION_EVERY`-th sample is held out of the trees' fit and used to
/// calibrate the quantile multiplier: in-sample residuals of trees are optimistic, and a
/// p90 calibrated on them would cover less than 90 %.
const CALIBRATION_EVERY: usize = 5;

struct Rows<const P: usize> {
    x: Vec<[f64; P]>,
    trees: Vec<[f32; TREE_FEATURES]>,
    y: Vec<f64>,
    group: Vec<usize>,
}

fn fit_target<'a, const P: usize>(
    params: FitParams,
    boost: Option<BoostParams>,
    rows: impl Iterator<Item = (&'a Features, f64)>,
    design: fn(&Features) -> [f64; P],
) -> Option<TargetModel<P>> {
    let mut data = Rows {
        x: Vec::new(),
        trees: Vec::new(),
        y: Vec::new(),
        group: Vec::new(),
    };
    let mut ceilings = [Ceiling::default(); 2];
    for (f, y) in rows {
        if !(y.is_finite() && y > 0.0) {
            continue;
        }
        let f = f.sanitised();
        ceilings[mode_of(f.streamed)].widen_by(&Ceiling::of(&f));
        data.x.push(design(&f));
        if boost.is_some() {
            data.trees.push(tree_features(&f));
        }
        data.y.push(y);
        data.group.push(group_index(f.class, f.role, f.streamed));
    }
    let n = data.y.len();
    if n < params.min_samples.max(1) {
        return None;
    }
    let mut all = ceilings[0];
    all.widen_by(&ceilings[1]);
    for c in &mut ceilings {
        if *c == Ceiling::default() {
            *c = all;
        }
    }
    let group_slots = data.group.iter().copied().max().map_or(0, |g| g + 1);

    // Pass 1 weights by the observation, pass 2 by pass 1's prediction: weighting by a noisy
    // observation favours samples that came out fast and biases the fit low.
    let mut weights: Vec<f64> = data
        .y
        .iter()
        .map(|y| 1.0 / y.max(Y_FLOOR_MS).powi(2))
        .collect();
    // L1-type fits have more variance than least squares: with few samples per
    // coefficient the quantile comes from least squares plus the ratio calibration below.
    let passes = match params.objective {
        Objective::Quantile { .. } if n >= IRLS_MIN_SAMPLES_PER_COEF * P => 2 + QUANTILE_IRLS_STEPS,
        _ => 2,
    };
    let irls = passes > 2;
    let mut fitted = None;
    for pass in 0..passes {
        let (shared, modes, groups) = solve_all(params, &data, &weights, group_slots)?;
        // The weights for the next pass: relative least squares (first two passes), then
        // iteratively reweighted least squares for the relative pinball loss
        // `ρ_q(y − ŷ) / y`, whose minimiser is the conditional q-quantile.
        let pinball = match params.objective {
            Objective::Quantile { q } if irls && pass >= 1 => Some(q.clamp(0.01, 0.99)),
            _ => None,
        };
        for (i, w) in weights.iter_mut().enumerate() {
            let g = data.group[i];
            let coef = match groups.get(g) {
                Some(Some(c)) => c,
                _ => modes[mode_of_group(g)].as_ref().unwrap_or(&shared),
            };
            let y = data.y[i].max(Y_FLOOR_MS);
            let yhat = dot(coef, &data.x[i]);
            *w = match pinball {
                None => 1.0 / yhat.max(y * 0.1).max(Y_FLOOR_MS).powi(2),
                Some(q) => {
                    let r = data.y[i] - yhat;
                    let side = if r >= 0.0 { q } else { 1.0 - q };
                    // |r| is floored at 5 % of y so near-exact fits do not dominate (a
                    // Huber-like core; 1 % made small-data fits interpolate a few samples).
                    side / (y * r.abs().max(0.05 * y))
                }
            };
        }
        fitted = Some((shared, modes, groups));
    }
    let (shared, modes, groups) = fitted?;

    // Floors first (half the smallest latency of the group), so that the trees fit the
    // residual of exactly the base `Linear::base` will compute.
    let min_y = |members: &mut dyn Iterator<Item = usize>| {
        members.map(|i| data.y[i]).fold(f64::INFINITY, f64::min)
    };
    let linear = |coef: [f64; P], floor: f64| Linear {
        coef,
        multiplier: 1.0,
        floor,
        samples: 0,
    };
    let shared_lin = linear(shared, 0.5 * min_y(&mut (0..n)));
    let group = &data.group;
    let in_mode = |m: usize| move |&i: &usize| mode_of_group(group[i]) == m;
    let mode_lins: [Option<Linear<P>>; 2] =
        [0, 1].map(|m| modes[m].map(|c| linear(c, 0.5 * min_y(&mut (0..n).filter(in_mode(m))))));
    let group_lins: Vec<Option<Linear<P>>> = groups
        .into_iter()
        .enumerate()
        .map(|(g, coef)| {
            coef.map(|c| linear(c, 0.5 * min_y(&mut (0..n).filter(|&i| data.group[i] == g))))
        })
        .collect();
    let pick = |g: usize| match group_lins.get(g) {
        Some(Some(m)) => m,
        _ => mode_lins[mode_of_group(g)].as_ref().unwrap_or(&shared_lin),
    };

    // The trees fit log(actual / linear base) of the samples not held out for calibration.
    let boost_model = match boost {
        Some(bp) if n >= BOOST_MIN_SAMPLES => {
            let mut xs = Vec::with_capacity(n);
            let mut zs = Vec::with_capacity(n);
            for i in (0..n).filter(|i| i % CALIBRATION_EVERY != 0) {
                xs.push(data.trees[i]);
                zs.push((data.y[i] / pick(data.group[i]).base(&data.x[i])).ln());
            }
            Boost::fit(&xs, &zs, bp)
        }
        _ => Boost::default(),
    };
    let boosted = boost_model.len() > 0;
    let correction = |i: usize| {
        if boosted {
            boost_model.eval(&data.trees[i])
        } else {
            0.0
        }
    };

    let finish = |lin: &Linear<P>, members: &mut dyn Iterator<Item = usize>| -> Linear<P> {
        let mut ratios = Vec::new();
        let (mut sum_y, mut sum_hat) = (0.0, 0.0);
        let mut samples = 0;
        for i in members {
            samples += 1;
            if boosted && i % CALIBRATION_EVERY != 0 {
                continue;
            }
            let yhat = lin.base(&data.x[i]) * correction(i).exp();
            if yhat > 0.0 {
                ratios.push(data.y[i] / yhat);
                sum_y += data.y[i];
                sum_hat += yhat;
            }
        }
        let multiplier = match params.objective {
            // The trees fit log-ratios, i.e. a geometric mean: rescale to the mean.
            Objective::Mean if boosted && sum_hat > 0.0 => sum_y / sum_hat,
            Objective::Mean => 1.0,
            // The IRLS fit already targets the quantile; this calibrates what is left (the
            // floored weights make IRLS stop slightly short of the exact minimiser, and the
            // trees pull towards the centre).
            Objective::Quantile { q } => quantile(&mut ratios, q).unwrap_or(1.0),
        };
        Linear {
            multiplier,
            samples,
            ..lin.clone()
        }
    };

    let shared_model = finish(&shared_lin, &mut (0..n));
    let mode_models = [0, 1].map(|m| {
        mode_lins[m]
            .as_ref()
            .map(|l| finish(l, &mut (0..n).filter(in_mode(m))))
    });
    let group_models = group_lins
        .iter()
        .enumerate()
        .map(|(g, lin)| {
            lin.as_ref()
                .map(|l| finish(l, &mut (0..n).filter(|&i| data.group[i] == g)))
        })
        .collect();
    Some(TargetModel {
        shared: shared_model,
        modes: mode_models,
        groups: group_models,
        ceilings,
        boost: boost_model,
    })
}

type Coefs<const P: usize> = [f64; P];

/// Fits the shared model, each response mode with at least `min_samples` samples and
/// every group with enough samples (its prior: its mode's model, else the shared one), in
/// standardised feature space, and returns raw-space coefficients.
#[allow(clippy::type_complexity)]
fn solve_all<const P: usize>(
    params: FitParams,
    data: &Rows<P>,
    weights: &[f64],
    group_slots: usize,
) -> Option<(Coefs<P>, [Option<Coefs<P>>; 2], Vec<Option<Coefs<P>>>)> {
    // Weighted RMS of each column; the intercept stays unscaled.
    let mut scale = [0.0_f64; P];
    let mut wsum = 0.0;
    for (x, w) in data.x.iter().zip(weights) {
        wsum += w;
        for j in 0..P {
            scale[j] += w * x[j] * x[j];
        }
    }
    for s in scale.iter_mut() {
        *s = if wsum > 0.0 && *s > 0.0 {
            (*s / wsum).sqrt()
        } else {
            1.0
        };
    }
    scale[0] = 1.0;

    let mut a = vec![[[0.0_f64; P]; P]; group_slots];
    let mut b = vec![[0.0_f64; P]; group_slots];
    let mut counts = vec![0_usize; group_slots];
    for i in 0..data.y.len() {
        let g = data.group[i];
        let w = weights[i];
        let mut z = [0.0_f64; P];
        for j in 0..P {
            z[j] = data.x[i][j] / scale[j];
        }
        let (ag, bg) = (&mut a[g], &mut b[g]);
        for j in 0..P {
            let wz = w * z[j];
            bg[j] += wz * data.y[i];
            for k in j..P {
                ag[j][k] += wz * z[k];
            }
        }
        counts[g] += 1;
    }
    for ag in a.iter_mut() {
        for j in 0..P {
            for k in 0..j {
                ag[j][k] = ag[k][j];
            }
        }
    }

    let mut a_mode = [[[0.0_f64; P]; P]; 2];
    let mut b_mode = [[0.0_f64; P]; 2];
    let mut n_mode = [0_usize; 2];
    for g in 0..group_slots {
        let m = mode_of_group(g);
        n_mode[m] += counts[g];
        for j in 0..P {
            b_mode[m][j] += b[g][j];
            for k in 0..P {
                a_mode[m][j][k] += a[g][j][k];
            }
        }
    }
    let mut a_all = a_mode[0];
    let mut b_all = b_mode[0];
    for j in 0..P {
        b_all[j] += b_mode[1][j];
        for k in 0..P {
            a_all[j][k] += a_mode[1][j][k];
        }
    }
    let n_all = n_mode[0] + n_mode[1];
    let shared_z = ridge_solve(&a_all, &b_all, n_all, SHARED_RIDGE, &[0.0; P], false)?;
    let mode_z: [Option<[f64; P]>; 2] = [0, 1].map(|m| {
        if n_mode[m] < params.min_samples.max(1) {
            return None;
        }
        ridge_solve(
            &a_mode[m],
            &b_mode[m],
            n_mode[m],
            SHARED_RIDGE,
            &[0.0; P],
            false,
        )
    });

    let groups = (0..group_slots)
        .map(|g| {
            if counts[g] < params.min_group_samples.max(1) {
                return None;
            }
            let prior = mode_z[mode_of_group(g)].as_ref().unwrap_or(&shared_z);
            let z = ridge_solve(&a[g], &b[g], counts[g], params.prior_strength, prior, true)?;
            Some(unscale(&z, &scale))
        })
        .collect();
    Some((
        unscale(&shared_z, &scale),
        mode_z.map(|z| z.map(|z| unscale(&z, &scale))),
        groups,
    ))
}

fn unscale<const P: usize>(z: &[f64; P], scale: &[f64; P]) -> [f64; P] {
    let mut out = [0.0; P];
    for j in 0..P {
        out[j] = z[j] / scale[j];
    }
    out
}

/// Solves `(A + λI) β = b + λ β₀` where λ is `pseudo_samples` average samples' worth of
/// curvature. With `penalise_intercept == false` coordinate 0 is left free.
fn ridge_solve<const P: usize>(
    a: &[[f64; P]; P],
    b: &[f64; P],
    n: usize,
    pseudo_samples: f64,
    prior: &[f64; P],
    penalise_intercept: bool,
) -> Option<[f64; P]> {
    let trace: f64 = (0..P).map(|j| a[j][j]).sum();
    let per_sample = trace / (P as f64 * n.max(1) as f64);
    let mut lambda = pseudo_samples * per_sample;
    for _attempt in 0..4 {
        let mut m = *a;
        let mut rhs = *b;
        for j in 0..P {
            if j == 0 && !penalise_intercept {
                continue;
            }
            m[j][j] += lambda;
            rhs[j] += lambda * prior[j];
        }
        if let Some(x) = cholesky_solve(m, rhs)
            && x.iter().all(|v| v.is_finite())
        {
            return Some(x);
        }
        // Numerically singular (for example every sample identical): regularise harder.
        lambda = (lambda * 100.0)
            .max(per_sample * 1e-6)
            .max(f64::MIN_POSITIVE);
    }
    None
}

fn cholesky_solve<const P: usize>(mut m: [[f64; P]; P], mut rhs: [f64; P]) -> Option<[f64; P]> {
    for j in 0..P {
        let mut d = m[j][j];
        for k in 0..j {
            d -= m[j][k] * m[j][k];
        }
        if d <= 0.0 || !d.is_finite() {
            return None;
        }
        let d = d.sqrt();
        m[j][j] = d;
        for i in j + 1..P {
            let mut s = m[i][j];
            for k in 0..j {
                s -= m[i][k] * m[j][k];
            }
            m[i][j] = s / d;
        }
    }
    for i in 0..P {
        let mut s = rhs[i];
        for k in 0..i {
            s -= m[i][k] * rhs[k];
        }
        rhs[i] = s / m[i][i];
    }
    for i in (0..P).rev() {
        let mut s = rhs[i];
        for k in i + 1..P {
            s -= m[k][i] * rhs[k];
        }
        rhs[i] = s / m[i][i];
    }
    Some(rhs)
}

#[inline]
fn dot<const P: usize>(c: &[f64; P], x: &[f64; P]) -> f64 {
    c.iter().zip(x).map(|(a, b)| a * b).sum()
}

fn quantile(values: &mut [f64], q: f64) -> Option<f64> {
    if values.is_empty() || !(0.0..=1.0).contains(&q) {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let idx = ((values.len() - 1) as f64 * q).round() as usize;
    values.get(idx).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objectives_parse_from_their_usual_spellings() {
        assert_eq!("mean".parse(), Ok(Objective::Mean));
        assert_eq!("Median".parse(), Ok(Objective::MEDIAN));
        assert_eq!("p90".parse(), Ok(Objective::Quantile { q: 0.9 }));
        assert_eq!("0.75".parse(), Ok(Objective::Quantile { q: 0.75 }));
        for bad in ["p0", "p100", "1.5", "fast", ""] {
            let err = bad.parse::<Objective>().unwrap_err();
            assert!(err.to_string().contains("expected mean, median"), "{err}");
        }
    }

    #[test]
    fn cholesky_solves_a_known_system() {
        let m = [[4.0, 2.0], [2.0, 3.0]];
        let x = cholesky_solve(m, [2.0, 1.0]).unwrap();
        // 4x + 2y = 2, 2x + 3y = 1  =>  x = 0.5, y = 0
        assert!((x[0] - 0.5).abs() < 1e-12 && x[1].abs() < 1e-12, "{x:?}");
    }

    #[test]
    fn exact_linear_data_is_recovered() {
        let fs: Vec<Features> = (0..200)
            .map(|i| Features {
                input_tokens: 100 + (i * 37) % 2000,
                running: i % 9,
                waiting: i % 4,
                kv_cache_usage: f64::from(i % 10) / 10.0,
                ..Features::default()
            })
            .collect();
        let truth =
            |f: &Features| 20.0 + 0.05 * f64::from(f.input_tokens) + 3.0 * f64::from(f.running);
        let rows: Vec<(&Features, f64)> = fs.iter().map(|f| (f, truth(f))).collect();
        let params = FitParams {
            objective: Objective::Mean,
            min_samples: 10,
            min_group_samples: 10,
            prior_strength: 20.0,
            ttft_boost: None,
            tpot_boost: None,
        };
        let m = fit_model(1, params, rows.iter().copied(), std::iter::empty()).unwrap();
        for f in &fs {
            let p = m.predict(f);
            assert!(
                (p.ttft_ms - truth(f)).abs() / truth(f) < 0.01,
                "{} vs {}",
                p.ttft_ms,
                truth(f)
            );
            assert_eq!(p.tpot_ms, None);
        }
    }

    #[test]
    fn too_few_samples_gives_no_model() {
        let f = Features::default();
        let rows = [(&f, 10.0); 3];
        let params = FitParams {
            objective: Objective::Mean,
            min_samples: 10,
            min_group_samples: 10,
            prior_strength: 20.0,
            ttft_boost: None,
            tpot_boost: None,
        };
        assert!(fit_model(1, params, rows.iter().copied(), std::iter::empty()).is_none());
    }

    #[test]
    fn identical_samples_still_fit() {
        let f = Features {
            input_tokens: 500,
            ..Features::default()
        };
        let rows = vec![(&f, 42.0); 50];
        let params = FitParams {
            objective: Objective::Mean,
            min_samples: 10,
            min_group_samples: 10,
            prior_strength: 20.0,
            ttft_boost: None,
            tpot_boost: None,
        };
        let m = fit_model(1, params, rows.iter().copied(), rows.iter().copied()).unwrap();
        let p = m.predict(&f);
        assert!((p.ttft_ms - 42.0).abs() < 0.5, "{p:?}");
        assert!((p.tpot_ms.unwrap() - 42.0).abs() < 0.5, "{p:?}");
    }

    /// TTFT that doubles when a queue meets a half-full KV cache (preemption
    /// territory): an AND of two thresholds that no sum of the engineered products
    /// expresses. The trees must find it; the linear model alone cannot.
    #[test]
    fn boosted_trees_learn_a_threshold_interaction_the_linear_model_misses() {
        let mut x = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move |m: u32| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % u64::from(m)) as u32
        };
        let fs: Vec<Features> = (0..4000)
            .map(|_| Features {
                input_tokens: 100 + next(2000),
                running: next(30),
                waiting: next(8),
                kv_cache_usage: f64::from(next(100)) / 100.0,
                ..Features::default()
            })
            .collect();
        let truth = |f: &Features| {
            let base = 20.0 + 0.05 * f64::from(f.input_tokens) + 2.0 * f64::from(f.running);
            if f.kv_cache_usage > 0.5 && f.waiting > 3 {
                2.0 * base
            } else {
                base
            }
        };
        let rows: Vec<(&Features, f64)> = fs.iter().map(|f| (f, truth(f))).collect();
        let mape_with = |trees| {
            let params = FitParams {
                objective: Objective::MEDIAN,
                min_samples: 10,
                min_group_samples: 10,
                prior_strength: 20.0,
                ttft_boost: trees,
                tpot_boost: None,
            };
            let m = fit_model(1, params, rows.iter().copied(), std::iter::empty()).unwrap();
            fs.iter()
                .map(|f| (m.predict(f).ttft_ms - truth(f)).abs() / truth(f))
                .sum::<f64>()
                / fs.len() as f64
        };
        let linear = mape_with(None);
        let boosted = mape_with(Some(BoostParams::default()));
        assert!(linear > 0.08, "linear alone {linear}");
        assert!(boosted < 0.03, "boosted {boosted} (linear {linear})");
    }

    #[test]
    fn quantile_picks_the_right_order_statistic() {
        let mut v: Vec<f64> = (1..=101).map(f64::from).collect();
        assert_eq!(quantile(&mut v, 0.9), Some(91.0));
        assert_eq!(quantile(&mut [], 0.9), None);
    }
}
