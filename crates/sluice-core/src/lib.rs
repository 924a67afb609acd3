//! The domain model that `sluice-controller` and `sluice-picker` share.
//!
//! Nothing here does I/O or knows about Kubernetes or gRPC: the controller builds these
//! values from watched resources, the picker receives them over the wire (see
//! `sluice-proto`) or builds them from flags, and the scheduler reads them.

pub mod config;
pub mod endpoint;
pub mod engine_metrics;
pub mod objective;
pub mod quantity;
pub mod rewrite;
pub mod snapshot;

pub use config::EndpointPickerConfig;
pub use endpoint::{Endpoint, EndpointKey, EndpointMetrics};
pub use objective::Objective;
pub use rewrite::{ModelRewriteRule, RewriteTarget};
pub use snapshot::{PoolRef, PoolSnapshot};
