//! The plugin interfaces, with upstream's extension-point names.
//!
//! A plugin is one object with a type and an instance name that implements any number of
//! extension points. It announces them through the `as_*` methods (upstream does this with Go
//! type assertions): a plugin that returns `Some` from `as_pre_request` is called after every
//! pick, whether or not a profile references it, just as upstream registers "any instantiated
//! plugin that implements a hook".

use std::fmt;
use std::sync::Arc;

use sluice_core::EndpointKey;

use crate::cycle::Cycle;
use crate::types::{
    Candidate, LlmRequest, Outcome, PluginError, ProfileFailure, ProfileRunResult, ResponseChunk,
    SchedulingResult, ScoredEndpoint,
};

/// A plugin's type (the registry key, e.g. `queue-scorer`) and instance name (unique in a
/// config; defaults to the type).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TypedName {
    /// The registered type.
    pub type_name: Arc<str>,
    /// The instance name.
    pub name: Arc<str>,
}

impl TypedName {
    /// A typed name.
    pub fn new(type_name: &str, name: &str) -> Self {
        TypedName {
            type_name: type_name.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for TypedName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.type_name == self.name {
            write!(f, "{}", self.name)
        } else {
            write!(f, "{} (type {})", self.name, self.type_name)
        }
    }
}

/// Every plugin. Override the `as_*` method of each extension point the plugin implements
/// with `Some(self)`.
pub trait Plugin: Send + Sync + fmt::Debug {
    /// The plugin's type and instance name.
    fn typed_name(&self) -> &TypedName;

    /// As a profile handler (which profiles run, which result is primary).
    fn as_profile_handler(self: Arc<Self>) -> Option<Arc<dyn ProfileHandler>> {
        None
    }
    /// As a filter.
    fn as_filter(self: Arc<Self>) -> Option<Arc<dyn Filter>> {
        None
    }
    /// As a scorer.
    fn as_scorer(self: Arc<Self>) -> Option<Arc<dyn Scorer>> {
        None
    }
    /// As a picker.
    fn as_picker(self: Arc<Self>) -> Option<Arc<dyn Picker>> {
        None
    }
    /// As a data producer, run before scheduling.
    fn as_data_producer(self: Arc<Self>) -> Option<Arc<dyn DataProducer>> {
        None
    }
    /// As an admitter, run after the producers and before the profiles.
    fn as_admitter(self: Arc<Self>) -> Option<Arc<dyn Admitter>> {
        None
    }
    /// As a PreRequest hook, run after the pick.
    fn as_pre_request(self: Arc<Self>) -> Option<Arc<dyn PreRequest>> {
        None
    }
    /// As a response hook (headers, chunks, completion).
    fn as_response_hooks(self: Arc<Self>) -> Option<Arc<dyn ResponseHooks>> {
        None
    }
    /// As a saturation detector.
    fn as_saturation_detector(self: Arc<Self>) -> Option<Arc<dyn SaturationDetector>> {
        None
    }
    /// As a holder of per-endpoint state that must forget departed endpoints.
    fn as_endpoint_aware(self: Arc<Self>) -> Option<Arc<dyn EndpointAware>> {
        None
    }
}

/// Removes endpoints that cannot serve the request (extension point `Filter`).
pub trait Filter: Send + Sync + fmt::Debug {
    /// Retains in `endpoints` (indices into `candidates`) those that pass. Removing every
    /// endpoint fails the profile.
    fn filter(
        &self,
        cycle: &mut Cycle,
        request: &LlmRequest,
        candidates: &[Candidate],
        endpoints: &mut Vec<usize>,
    ) -> Result<(), PluginError>;
}

/// What a scorer measures, as upstream classifies scorers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScorerCategory {
    /// Prefers endpoints that already hold something of the request (cache, adapter, session).
    Affinity,
    /// Spreads load.
    Distribution,
    /// Balances affinity against load.
    Balance,
}

/// Scores endpoints in [0, 1] (extension point `Scorer`). The scheduler clamps scores and NaN
/// counts as 0.
pub trait Scorer: Send + Sync + fmt::Debug {
    /// The scorer's category.
    fn category(&self) -> ScorerCategory;

    /// Writes `out[i]`, the score of `candidates[endpoints[i]]`. `out` arrives zeroed.
    /// Returning [`PluginError::Shed`] sheds the request (HTTP 429).
    fn score(
        &self,
        cycle: &mut Cycle,
        request: &LlmRequest,
        candidates: &[Candidate],
        endpoints: &[usize],
        out: &mut [f64],
    ) -> Result<(), PluginError>;
}

/// Chooses targets from scored endpoints (extension point `Picker`).
pub trait Picker: Send + Sync + fmt::Debug {
    /// Appends the chosen candidate indices to `targets`, best first. `scored` may be
    /// reordered.
    fn pick(&self, cycle: &mut Cycle, scored: &mut [ScoredEndpoint], targets: &mut Vec<usize>);
}

/// The profile names and what has run so far, as a profile handler sees them.
#[derive(Debug)]
pub struct ProfileRuns<'a> {
    /// Every configured profile's name, in configuration order.
    pub names: &'a [Arc<str>],
    /// Per profile (parallel to `names`): `None` when it has not run yet.
    pub results: &'a [Option<Result<ProfileRunResult, ProfileFailure>>],
}

impl ProfileRuns<'_> {
    /// The index of the profile with this name.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| &**n == name)
    }

    /// The successful result of the named profile, if it ran.
    pub fn result(&self, name: &str) -> Option<&ProfileRunResult> {
        let i = self.index_of(name)?;
        self.results.get(i)?.as_ref()?.as_ref().ok()
    }
}

/// Decides which profiles run, in rounds, and which result is primary (extension points
/// `ProfilePicker` and `ProcessProfilesResults`).
pub trait ProfileHandler: Send + Sync + fmt::Debug {
    /// The indices (into `runs.names`) of the profiles to run in this round; empty ends the
    /// loop. Called again after each round, so a handler can run one profile, look at its
    /// result and the cycle state, and then choose the next.
    fn pick_profiles(
        &self,
        cycle: &mut Cycle,
        request: &LlmRequest,
        runs: &ProfileRuns<'_>,
    ) -> Vec<usize>;

    /// The index of the primary profile, once all rounds are done. An error here becomes
    /// [`ScheduleError::AllFiltered`](crate::ScheduleError::AllFiltered) when it is
    /// [`PluginError::Internal`] and no profile succeeded, else is passed through.
    fn process_results(
        &self,
        cycle: &mut Cycle,
        request: &LlmRequest,
        runs: &ProfileRuns<'_>,
    ) -> Result<usize, PluginError>;

    /// Whether this request should bypass saturation-based admission (for example because the
    /// profile sheds by predicted latency instead).
    fn skip_saturation_detection(&self, _request: &LlmRequest) -> bool {
        false
    }
}

/// Prepares per-request data before scheduling (upstream `PrepareData`, llm-d
/// `DataProducer`). Producers run in dependency order: one that consumes a key runs after
/// every producer of that key.
pub trait DataProducer: Send + Sync + fmt::Debug {
    /// Cycle-state keys this producer writes.
    fn produces(&self) -> &[&'static str] {
        &[]
    }
    /// Cycle-state keys this producer reads.
    fn consumes(&self) -> &[&'static str] {
        &[]
    }
    /// Produces the data. Errors are logged and scheduling continues without the data, as
    /// upstream does.
    fn produce(
        &self,
        cycle: &mut Cycle,
        request: &LlmRequest,
        candidates: &[Candidate],
    ) -> Result<(), PluginError>;
}

/// Admits or rejects a request before the profiles run (llm-d `Admitter`). A rejection sheds
/// the request.
pub trait Admitter: Send + Sync + fmt::Debug {
    /// `Err(reason)` rejects.
    fn admit(
        &self,
        cycle: &mut Cycle,
        request: &LlmRequest,
        candidates: &[Candidate],
    ) -> Result<(), String>;
}

/// Runs after the pick, before the request is forwarded (extension point `PreRequest`).
pub trait PreRequest: Send + Sync + fmt::Debug {
    /// Told the decision. `result.targets[0]` is where the request goes.
    fn pre_request(&self, cycle: &mut Cycle, request: &LlmRequest, result: &SchedulingResult);
}

/// Response hooks (extension points `ResponseReceived`, `ResponseStreaming`, and completion,
/// which upstream folds into the last chunk).
pub trait ResponseHooks: Send + Sync + fmt::Debug {
    /// The model server's response headers arrived; push headers to add to the response into
    /// `add_headers`.
    fn on_response_headers(
        &self,
        _cycle: &mut Cycle,
        _request: &LlmRequest,
        _result: &SchedulingResult,
        _headers: &[(String, String)],
        _add_headers: &mut Vec<(String, String)>,
    ) {
    }

    /// One response body chunk.
    fn on_response_chunk(
        &self,
        _cycle: &mut Cycle,
        _request: &LlmRequest,
        _result: &SchedulingResult,
        _chunk: ResponseChunk<'_>,
    ) {
    }

    /// The data plane reports that `served`, not the picked target, is serving the request
    /// (a retry on a fallback endpoint). Plugins that keep per-endpoint state for the request
    /// (running-request queues) move it here. Called at most once per endpoint change, before
    /// [`on_complete`](Self::on_complete).
    fn on_served(
        &self,
        _cycle: &mut Cycle,
        _request: &LlmRequest,
        _result: &SchedulingResult,
        _served: &Candidate,
    ) {
    }

    /// The request ended; called exactly once per picked request, on every exit path.
    fn on_complete(
        &self,
        _cycle: &mut Cycle,
        _request: &LlmRequest,
        _result: &SchedulingResult,
        _outcome: &Outcome,
    ) {
    }
}

/// Judges whether endpoints can take more work (upstream's `SaturationDetector`), for
/// admission and flow control as well as for filtering.
pub trait SaturationDetector: Send + Sync + fmt::Debug {
    /// Pool saturation: 0 idle, ≥ 1 saturated. No candidates counts as saturated.
    fn saturation(&self, candidates: &[Candidate]) -> f64;

    /// Whether the pool is saturated.
    fn is_saturated(&self, candidates: &[Candidate]) -> bool {
        self.saturation(candidates) >= 1.0
    }

    /// Whether this one endpoint can take another request.
    fn has_capacity(&self, candidate: &Candidate) -> bool;
}

/// A plugin that keeps per-endpoint state and must drop departed endpoints to stay bounded.
pub trait EndpointAware: Send + Sync + fmt::Debug {
    /// Forget every endpoint for which `keep` returns false.
    fn retain_endpoints(&self, keep: &dyn Fn(&EndpointKey) -> bool);

    /// How many per-endpoint entries the plugin holds (for the prefix index: (block,
    /// endpoint) pairs, upstream's `prefix_indexer_size`).
    fn state_size(&self) -> usize {
        0
    }
}
