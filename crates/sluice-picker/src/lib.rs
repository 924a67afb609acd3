//! sluice-picker: the data plane. An Envoy ext_proc server that picks, for every inference
//! request, the model-server endpoint it goes to (the Gateway API Inference Extension's
//! Endpoint Picker protocol).
//!
//! # Shape
//!
//! - [`extproc`]: the per-request ext_proc state machine (both `FULL_DUPLEX_STREAMED` and
//!   `BUFFERED` body modes), header sanitising, request/response rewriting, usage, metrics.
//! - [`parse`] / [`response`] / [`rewrite`]: OpenAI and Anthropic bodies, usage, model rewrite.
//! - [`schedule`]: the only module that calls `sluice-scheduling`.
//! - [`state`]: the atomically swapped configuration ([`PickerState`]).
//! - [`scrape`] / [`promparse`]: per-endpoint model-server metric scraping.
//! - [`server`], [`cli`], [`tls`], [`standalone`], [`metrics`]: serving and start-up;
//!   [`remote_metrics`]: the remote latency predictor's counters on /metrics.
//!
//! # Feeding configuration: [`PickerState`]
//!
//! The picker routes with one [`PoolSnapshot`](sluice_core::PoolSnapshot) at a time.
//! Whoever produces snapshots (standalone flags, or the controller's gRPC stream in
//! [`config_client`], see [`cli::apply_fn`]) calls:
//!
//! ```ignore
//! let state: PickerState = /* shared handle, Clone */;
//! match state.apply_snapshot(snapshot) {
//!     Ok(Applied::Swapped | Applied::Unchanged) => {}       // now serving it
//!     Err(e) => tracing::warn!(error = %e, "snapshot rejected; previous one keeps serving"),
//! }
//! ```
//!
//! Applying validates the snapshot (pool name, monotonic version, unique addresses, the
//! EndpointPickerConfig via the scheduler's validation), builds the scheduler (or keeps the
//! running one when the config is unchanged, so plugin state survives endpoint churn),
//! reuses per-endpoint state (metrics, in-flight counts) for endpoints that stay, starts a
//! scraper for new ones, and swaps the result in with one atomic store. Requests in flight
//! keep the snapshot they started with. `state.subscribe()` watches the applied version;
//! the health service reports SERVING once the first snapshot is applied.
//!
//! # Decisions where upstream's docs and code disagree
//!
//! - Shed requests answer **429** (upstream code; some docs say 503).
//! - No candidate endpoint (empty pool, subset hint matching nothing, every endpoint
//!   filtered out) answers **503** (protocol spec), where upstream's code answers 500 or 429
//!   in some of these cases.
//! - Request bodies above `--max-request-body-bytes` (16 MiB) answer **413**.
//! - The subset hint matches `ip:port` entries exactly and bare IPs on any port (upstream
//!   v1.5.0 ignores ports; `lwepp` matches exactly).
//! - Client-supplied `x-gateway-destination-endpoint` is overwritten and
//!   `x-gateway-destination-endpoint-served`, `-subset` and `-fallback` are removed from the
//!   request (upstream forwards them).
//! - A model rewrite splices the new name into the body instead of re-marshalling it, so key
//!   order is preserved; `Content-Length` is set to the new length.
//! - Requests without a body go to the endpoint with the fewest in-flight requests from this
//!   picker (ties at random); upstream picks uniformly at random.

pub mod cli;
pub mod config_client;
pub mod errors;
pub mod extproc;
pub mod histogram;
pub mod metrics;
pub mod parse;
pub mod promparse;
pub mod remote_metrics;
pub mod response;
pub mod rewrite;
pub mod schedule;
pub mod scrape;
pub mod server;
pub mod standalone;
pub mod state;
pub mod tls;

/// The Envoy protobuf types sessions speak, for callers that drive [`extproc::Session`]s
/// directly (tests, benchmarks).
pub use envoy_types;
pub use extproc::{ExtProcService, ServerOptions};
pub use state::{Applied, ApplyError, PickerState};
