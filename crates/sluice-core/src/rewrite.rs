//! InferenceModelRewrite rules as the picker applies them.

use serde::{Deserialize, Serialize};

/// One rewrite rule: requests for any of `matches` (or for any model when `matches` is empty)
/// are sent to one of `targets`, drawn by weight.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelRewriteRule {
    /// The rewrite resource this rule came from (`namespace/name`), for logs and status.
    pub source: String,
    /// When the resource was created (RFC 3339); older resources win on conflicts.
    pub created: String,
    /// Model names this rule matches exactly; empty = every model.
    pub matches: Vec<String>,
    /// Where matching requests go.
    pub targets: Vec<RewriteTarget>,
}

/// A weighted rewrite target.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RewriteTarget {
    /// The model name the request is rewritten to.
    pub model_rewrite: String,
    /// Relative weight among the rule's targets.
    pub weight: u32,
}
