//! Flow control for the sluice picker: requests wait here, between parsing and scheduling,
//! while the pool is saturated, and leave by priority band, fairness between flows and
//! ordering within a flow. Upstream behaviour is described in the reference
//! `flow-control.md`; the workload-aware ordering (`X-Workload-Context`, seed 003) is a
//! sluice extension.
//!
//! # Using it from the picker
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use sluice_flowcontrol::*;
//! # async fn example(spec: sluice_core::config::FlowControlSpec) -> Result<(), Box<dyn std::error::Error>> {
//! let config = FlowControlConfig::from_spec(&spec, &[])?;
//! let saturation = Arc::new(ConcurrencyLimit::new(64)); // or the picker's own detector
//! let fc = FlowController::new(config, saturation);
//! let request = FlowRequest {
//!     priority: 0,
//!     workload: fc.workload_context(Some(r#"{"workload_id": "chat", "criticality": 4}"#)),
//!     bytes: 1024,
//!     ..FlowRequest::default()
//! };
//! match fc.admit(request).await {
//!     Ok(guard) => { /* schedule, proxy; drop `guard` when the response completes */ drop(guard) }
//!     Err(outcome) => { let _ = (outcome.http_status(), DROPPED_REASON_HEADER, outcome.reason()); }
//! }
//! # Ok(()) }
//! ```
//!
//! Dropping the `admit` future (client disconnect) removes the request from its queue at
//! once. Dropping the [`AdmissionGuard`] frees its in-flight slot and its workload's active
//! count, so every counter returns to zero whatever path a request takes.
//!
//! # Dispatch
//!
//! One task per controller, woken by arrivals, completions, [`FlowController::capacity_changed`],
//! TTL deadlines and (while requests wait behind a closed gate) every `recheck_interval`.
//! Bands go strictly by priority; a band whose saturation ceiling is reached stops the cycle
//! (head-of-line blocking, as upstream). Inside a band the fairness policy picks a flow
//! (`global-strict`: best head by the ordering policy; `round-robin`: flows take turns), and
//! the ordering policy picks the request (FCFS, EDF, SLO deadline, workload-aware). After each
//! dispatch the next one waits until the released request has picked up its permit, so
//! saturation is read again with that request counted by the picker rather than from stale
//! numbers.
//!
//! # Workload-aware ordering (sluice extension)
//!
//! Not part of any upstream release (reference `flow-control.md` §9). Enabled per band by
//! referencing a `workload-aware-ordering-policy` plugin; its parameters (all optional, seed
//! 003 defaults shown) also configure the workload registry:
//!
//! ```yaml
//! featureGates: [flowControl]
//! plugins:
//! - name: workload-aware
//!   type: workload-aware-ordering-policy
//!   parameters:
//!     weights: {waitTime: 0.4, criticality: 0.4, requestRate: 0.2}
//!     maxWaitTime: 60s          # wait term stops growing here
//!     maxRequestRate: 100       # req/s at which the rate penalty is full
//!     slidingWindowDuration: 60s
//!     cleanupInterval: 5m
//!     idleTimeout: 5m
//!     defaultCriticality: 3
//!     maxWorkloads: 10000       # beyond this, arrivals count under workload "other"
//!     maxMetricWorkloads: 20    # per-workload series: top N by active requests + "other"
//! flowControl:
//!   defaultPriorityBand: {orderingPolicyRef: workload-aware}
//! ```
//!
//! Decisions where sluice departs from the seed: a missing or invalid header maps to one
//! shared `default` workload (the fork minted a unique id per request, which grows the
//! registry without bound and escapes the rate penalty); the rate is a true sliding window
//! (12 buckets) instead of a tumbling one, and a young workload's rate is measured over at
//! least one bucket so its first request does not look like a burst; scores are computed
//! at dispatch time over the oldest request of each (workload, criticality) group, so the
//! time-dependent wait term is always fresh without re-sorting a heap. As the seed notes,
//! the 60 s cap on the wait term means a criticality-1 request can still starve under a
//! permanent backlog of criticality-5 work; raise `waitTime` or `maxWaitTime` if that matters.

pub mod config;
mod controller;
pub mod metrics;
pub mod outcome;
mod queue;
pub mod saturation;
pub mod workload;

pub use config::{
    BandConfig, ConfigError, FairnessPolicy, FlowControlConfig, OrderingPolicy, ScoreParams,
    UsageLimitPolicy, WorkloadConfig,
};
pub use controller::{
    Admission, AdmissionGuard, DEFAULT_FLOW, FAIRNESS_ID_HEADER, FAIRNESS_ID_HEADER_ALIAS,
    FlowController, FlowRequest, SLO_TTFT_HEADER, SLO_TTFT_HEADER_ALIAS, parse_slo_ttft_ms,
};
pub use metrics::FlowMetrics;
pub use outcome::{DROPPED_REASON_HEADER, Outcome};
pub use saturation::{ConcurrencyLimit, FnSaturation, ManualSaturation, SaturationSource};
pub use workload::{WORKLOAD_CONTEXT_HEADER, WorkloadContext, WorkloadRegistry, WorkloadStats};
