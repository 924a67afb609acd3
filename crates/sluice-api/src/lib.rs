//! Kubernetes API types of sluice, and of the upstream Gateway API Inference Extension
//! resources it reads. No I/O: the controller watches these, `cargo xtask crdgen` writes their
//! CRDs to `crds/`.
//!
//! | kind | group/version | module | CRD installed by |
//! |---|---|---|---|
//! | `InferencePool` | `inference.networking.k8s.io/v1` | [`pool`] | sluice (or GIE) |
//! | `InferenceObjective`, `InferenceModelRewrite` | `inference.networking.x-k8s.io/v1alpha2` | [`alpha::x_k8s`] | sluice (or GIE) |
//! | `InferenceObjective`, `InferenceModelRewrite` | `llm-d.ai/v1alpha2` | [`alpha::llm_d`] | llm-d |
//! | `EndpointPickerConfig` | `sluice.dev/v1alpha1` | [`epc`] | sluice |
//!
//! The generated CRDs are schema-compatible with upstream's (checked field by field against the
//! upstream manifests in the tests).

pub mod alpha;
pub mod condition;
pub mod crdgen;
pub mod epc;
pub mod pool;

pub use alpha::{llm_d, x_k8s};
pub use condition::{Condition, ConditionStatus};
pub use crdgen::{CrdError, crd_files, crds, reader_only_crds};
pub use epc::{EndpointPickerConfig, EndpointPickerConfigSpec, EndpointPickerConfigStatus};
pub use pool::{InferencePool, InferencePoolSpec, InferencePoolStatus};
