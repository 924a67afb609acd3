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
//! - [`cli`]: the binary's flags and `run`.

pub mod cli;
pub mod files;
pub mod grpc;
pub mod hub;
pub mod index;
pub mod k8s;
pub mod leader;
pub mod runtime;
pub mod status;

use std::collections::BTreeSet;
use std::sync::Arc;

use sluice_core::EndpointPickerConfig;

/// The field manager sluice writes status (and Events) with.
pub const FIELD_MANAGER: &str = "sluice-controller";

/// The validator used before a picker config may be published: upstream's structural rules
/// (`api.md` §7.3) that need no plugin registry. The picker runs the full loader again on
/// receipt and NACKs what its registry refuses, which the controller records.
pub fn default_validator() -> index::Validator {
    Arc::new(validate_structure)
}

/// Feature gates upstream knows.
const FEATURE_GATES: &[&str] = &["dataLayer", "flowControl", "enableLegacyMetrics"];

/// Upstream's registry-independent validation rules; the error names the offending item.
pub fn validate_structure(cfg: &EndpointPickerConfig) -> Result<(), String> {
    let mut problems = Vec::new();
    let mut names = BTreeSet::new();
    for (i, p) in cfg.plugins.iter().enumerate() {
        if p.type_.trim().is_empty() {
            problems.push(format!("plugins[{i}]: type is required"));
        }
        if !names.insert(p.instance_name().to_owned()) {
            problems.push(format!(
                "plugins[{i}]: duplicate plugin name {:?}",
                p.instance_name()
            ));
        }
    }
    let mut profiles = BTreeSet::new();
    for (i, prof) in cfg.scheduling_profiles.iter().enumerate() {
        if prof.name.trim().is_empty() {
            problems.push(format!("schedulingProfiles[{i}]: name is required"));
        } else if !profiles.insert(prof.name.as_str()) {
            problems.push(format!(
                "schedulingProfiles[{i}]: duplicate profile name {:?}",
                prof.name
            ));
        }
        for (j, r) in prof.plugins.iter().enumerate() {
            if !names.contains(&r.plugin_ref) {
                problems.push(format!(
                    "schedulingProfiles[{i}].plugins[{j}]: pluginRef {:?} names no declared plugin",
                    r.plugin_ref
                ));
            }
        }
    }
    for gate in &cfg.feature_gates {
        if !FEATURE_GATES.contains(&gate.as_str()) {
            problems.push(format!(
                "featureGates: unknown feature gate {gate:?} (known: {})",
                FEATURE_GATES.join(", ")
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}
