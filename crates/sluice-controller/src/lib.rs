//! sluice-controller: watches InferencePools, InferenceObjectives, InferenceModelRewrites,
//! EndpointPickerConfigs and Pods (or reads the same YAML from a directory), compiles one
//! versioned, hashed [`PoolSnapshot`](sluice_core::PoolSnapshot) per pool, and streams it to
//! every subscribed picker over gRPC (`sluice.config.v1`). Pickers need no Kubernetes access.
//!
//! The shape follows linkerd2's policy-controller: watch -> index -> compile -> publish.
//!
//! - [`index`]: the in-memory index and the compiler (pure, synchronous);
//! - [`hub`]: per-pool `watch` channels of the latest snapshot, and picker ACK/NACK records;
//! - [`grpc`]: the `ConfigDistribution` service;
//! - [`runtime`]: the shared index, the compile loop and the gRPC server;
//! - [`k8s`]: kube-runtime watchers feeding the index;
//! - [`files`]: file mode (`--manifests DIR`), for laptops and the demo;
//! - [`status`]: status conditions and Events, written by the Lease holder only;
//! - [`metrics`]: Prometheus metrics, `/healthz` and `/readyz`;
//! - [`cli`]: the binary's flags and `run`.

pub mod cli;
pub mod files;
pub mod grpc;
pub mod hub;
pub mod index;
pub mod k8s;
pub mod leader;
pub mod metrics;
pub mod runtime;
pub mod status;

use std::sync::Arc;

use sluice_core::EndpointPickerConfig;
use sluice_scheduling::{ConfigError, Registry, Scheduler};

/// The field manager sluice writes status (and Events) with.
pub const FIELD_MANAGER: &str = "sluice-controller";

/// The validator used before a picker config may be published: `sluice-scheduling`'s own
/// loader with every built-in plugin, the very code a picker runs on receipt, so that the
/// controller accepts exactly the configs pickers accept (unknown plugin types and bad
/// parameters included) instead of learning about them from NACKs.
pub fn default_validator() -> index::Validator {
    let registry = Arc::new(Registry::with_builtins());
    Arc::new(move |cfg: &EndpointPickerConfig| validate_with(&registry, cfg))
}

/// Validates `cfg` against `registry`; the error lists every problem with its location in
/// the document, one per `; `-separated item (status messages are single-line).
pub fn validate_with(registry: &Registry, cfg: &EndpointPickerConfig) -> Result<(), String> {
    Scheduler::validate(cfg, registry)
        .map(|_| ())
        .map_err(|e| describe(&e))
}

fn describe(e: &ConfigError) -> String {
    let problems: Vec<String> = e.problems.iter().map(ToString::to_string).collect();
    format!(
        "invalid EndpointPickerConfig: {}",
        if problems.is_empty() {
            "rejected by the scheduling loader".to_owned()
        } else {
            problems.join("; ")
        }
    )
}
