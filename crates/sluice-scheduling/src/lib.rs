//! sluice's scheduling framework and built-in plugins. No I/O: given a request and a snapshot
//! of candidate endpoints with their metrics, it decides where the request goes, and it is
//! told about the request's life afterwards.
//!
//! Vocabulary and config format follow the upstream Endpoint Picker (GIE v1.5.0 /
//! llm-d-router) so that `EndpointPickerConfig` documents and plugin docs carry over:
//!
//! ```text
//! schedule():  data producers → admitters → profile handler picks profiles
//!              → per profile: filters → Σ weight·clamp(score) → picker
//!              → profile handler picks the primary result
//! pre_request() → response_headers() → response_chunk()* → complete(outcome)
//! ```
//!
//! Entry points: [`Scheduler::from_config`] / [`Scheduler::from_config_with`] (with a
//! [`Registry`] other crates extend), [`Scheduler::schedule`], the lifecycle hooks on
//! [`Scheduler`], and the saturation view ([`Scheduler::is_saturated`],
//! [`Scheduler::has_capacity`]).

pub mod config;
pub mod cycle;
pub mod observe;
pub mod plugin;
pub mod plugins;
pub mod prefix_index;
pub mod registry;
pub mod scheduler;
pub mod types;

pub use config::{ConfigError, ConfigProblem, ProblemKind, default_config, parse_config_text};
pub use cycle::{Clock, Cycle, CycleState, ManualClock, SystemClock};
pub use observe::{ExtensionPoint, SchedulingObserver};
pub use plugin::{
    Admitter, DataProducer, EndpointAware, Filter, Picker, Plugin, PreRequest, ProfileHandler,
    ProfileRuns, ResponseHooks, SaturationDetector, Scorer, ScorerCategory, TypedName,
};
pub use prefix_index::PrefixIndex;
pub use registry::{DuplicateType, Factory, PluginEnv, PluginInit, Registry, SharedState};
pub use scheduler::{Scheduled, Scheduler, SchedulerOptions};
pub use types::{
    Candidate, InFlightCounters, LlmRequest, Outcome, PluginError, ProfileFailure,
    ProfileRunResult, ResponseChunk, ScheduleError, SchedulingResult, ScoredEndpoint, ScorerScores,
    StepPhase,
};
