//! The compiled, versioned configuration of one pool: everything a picker needs.

use std::fmt;
use std::hash::Hasher;

use serde::{Deserialize, Serialize};

use crate::{Endpoint, EndpointPickerConfig, ModelRewriteRule, Objective};

/// Names an InferencePool.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PoolRef {
    /// The pool's namespace.
    pub namespace: String,
    /// The pool's name.
    pub name: String,
}

impl fmt::Display for PoolRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Protocol towards the model servers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum AppProtocol {
    /// HTTP/1.1.
    #[default]
    Http,
    /// Cleartext HTTP/2.
    H2c,
}

/// One pool's compiled configuration. The controller builds a new one on every relevant
/// change; the picker swaps it in atomically. `version` grows monotonically per pool and
/// `content_hash` lets a picker skip a snapshot identical to what it runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PoolSnapshot {
    /// The pool.
    pub pool: PoolRef,
    /// Monotonic per pool, per controller lifetime.
    pub version: u64,
    /// Hash of everything below; equal hashes mean equal content.
    pub content_hash: u64,
    /// Protocol towards the model servers.
    pub app_protocol: AppProtocol,
    /// Ready endpoints, sorted by key.
    pub endpoints: Vec<Endpoint>,
    /// Objectives by name, sorted by name.
    pub objectives: Vec<Objective>,
    /// Rewrite rules, oldest first (precedence order).
    pub rewrites: Vec<ModelRewriteRule>,
    /// The validated picker configuration (defaults are applied by the picker's loader).
    pub picker_config: EndpointPickerConfig,
}

impl PoolSnapshot {
    /// Builds a snapshot and computes its content hash.
    pub fn new(
        pool: PoolRef,
        version: u64,
        app_protocol: AppProtocol,
        mut endpoints: Vec<Endpoint>,
        mut objectives: Vec<Objective>,
        rewrites: Vec<ModelRewriteRule>,
        picker_config: EndpointPickerConfig,
    ) -> Self {
        endpoints.sort_by(|a, b| a.key.cmp(&b.key));
        objectives.sort_by(|a, b| a.name.cmp(&b.name));
        let mut snapshot = PoolSnapshot {
            pool,
            version,
            content_hash: 0,
            app_protocol,
            endpoints,
            objectives,
            rewrites,
            picker_config,
        };
        snapshot.content_hash = snapshot.compute_hash();
        snapshot
    }

    /// Hash of the content (not the version): pools, endpoints, objectives, rewrites and
    /// config, in their canonical JSON form.
    pub fn compute_hash(&self) -> u64 {
        let mut hasher = xxhash_rust::xxh64::Xxh64::new(0);
        let parts = (
            &self.pool,
            self.app_protocol,
            &self.endpoints,
            &self.objectives,
            &self.rewrites,
            &self.picker_config,
        );
        // Serializing these plain data types cannot fail; an empty hash input would still be
        // deterministic, so a failure only costs an unnecessary config push.
        let bytes = serde_json::to_vec(&parts).unwrap_or_default();
        hasher.write(&bytes);
        hasher.finish()
    }

    /// The objective with this name, if the pool has one.
    pub fn objective(&self, name: &str) -> Option<&Objective> {
        self.objectives
            .binary_search_by(|o| o.name.as_str().cmp(name))
            .ok()
            .map(|i| &self.objectives[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(version: u64, port: u16) -> PoolSnapshot {
        let ep = Endpoint::from_address("default", ([127, 0, 0, 1], port).into());
        PoolSnapshot::new(
            PoolRef {
                namespace: "default".into(),
                name: "pool".into(),
            },
            version,
            AppProtocol::Http,
            vec![ep],
            vec![
                Objective {
                    name: "b".into(),
                    priority: -1,
                },
                Objective {
                    name: "a".into(),
                    priority: 2,
                },
            ],
            vec![],
            EndpointPickerConfig::default(),
        )
    }

    #[test]
    fn hash_ignores_version_but_not_content() {
        assert_eq!(
            snapshot(1, 8000).content_hash,
            snapshot(2, 8000).content_hash
        );
        assert_ne!(
            snapshot(1, 8000).content_hash,
            snapshot(1, 8001).content_hash
        );
    }

    #[test]
    fn objectives_are_found_by_name() {
        let s = snapshot(1, 8000);
        assert_eq!(s.objective("b").map(Objective::is_sheddable), Some(true));
        assert_eq!(s.objective("a").map(|o| o.priority), Some(2));
        assert!(s.objective("c").is_none());
    }
}
