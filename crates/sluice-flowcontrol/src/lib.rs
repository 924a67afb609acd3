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
pub use outcome::{DROPPED_REASON_HEADER, Outcome};
pub use saturation::{ConcurrencyLimit, FnSaturation, ManualSaturation, SaturationSource};
pub use workload::{WORKLOAD_CONTEXT_HEADER, WorkloadContext, WorkloadRegistry, WorkloadStats};
