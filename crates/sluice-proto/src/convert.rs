//! `sluice-core` <-> wire conversions.

use std::net::SocketAddr;

use sluice_core::snapshot::{AppProtocol, PoolRef, PoolSnapshot};
use sluice_core::{
    Endpoint, EndpointKey, EndpointPickerConfig, ModelRewriteRule, Objective, RewriteTarget,
};

use crate::config::v1 as pb;

/// A snapshot received from the wire that cannot be used. The picker NACKs it with this
/// message and keeps its last good config.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotDecodeError {
    /// An endpoint address is not `ip:port`.
    #[error("endpoint {endpoint}: address {address:?} is not ip:port")]
    BadAddress {
        /// The endpoint's key.
        endpoint: String,
        /// The address as received.
        address: String,
    },
    /// The picker config is not valid JSON of the expected shape.
    #[error("picker config is not a valid EndpointPickerConfig: {0}")]
    BadPickerConfig(String),
}

impl From<&PoolSnapshot> for pb::PoolConfig {
    fn from(s: &PoolSnapshot) -> Self {
        pb::PoolConfig {
            pool_namespace: s.pool.namespace.clone(),
            pool_name: s.pool.name.clone(),
            version: s.version,
            content_hash: s.content_hash,
            app_protocol: match s.app_protocol {
                AppProtocol::Http => pb::AppProtocol::Http,
                AppProtocol::H2c => pb::AppProtocol::H2c,
            } as i32,
            endpoints: s
                .endpoints
                .iter()
                .map(|e| pb::Endpoint {
                    namespace: e.key.namespace.to_string(),
                    pod: e.key.pod.to_string(),
                    rank: e.key.rank,
                    address: e.address.to_string(),
                    metrics_address: e.metrics_address.to_string(),
                    labels: e
                        .labels
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                })
                .collect(),
            objectives: s
                .objectives
                .iter()
                .map(|o| pb::Objective {
                    name: o.name.clone(),
                    priority: o.priority,
                })
                .collect(),
            rewrites: s
                .rewrites
                .iter()
                .map(|r| pb::RewriteRule {
                    source: r.source.clone(),
                    created: r.created.clone(),
                    matches: r.matches.clone(),
                    targets: r
                        .targets
                        .iter()
                        .map(|t| pb::RewriteTarget {
                            model_rewrite: t.model_rewrite.clone(),
                            weight: t.weight,
                        })
                        .collect(),
                })
                .collect(),
            // Serializing a plain data type into JSON cannot fail.
            picker_config_json: serde_json::to_string(&s.picker_config).unwrap_or_default(),
            controller_id: String::new(),
        }
    }
}

impl TryFrom<pb::PoolConfig> for PoolSnapshot {
    type Error = SnapshotDecodeError;

    fn try_from(c: pb::PoolConfig) -> Result<Self, Self::Error> {
        let app_protocol = match pb::AppProtocol::try_from(c.app_protocol) {
            Ok(pb::AppProtocol::H2c) => AppProtocol::H2c,
            _ => AppProtocol::Http,
        };
        let endpoints = c
            .endpoints
            .into_iter()
            .map(|e| {
                let key = EndpointKey {
                    namespace: e.namespace.into(),
                    pod: e.pod.into(),
                    rank: e.rank,
                };
                let parse = |a: &str| {
                    a.parse::<SocketAddr>()
                        .map_err(|_| SnapshotDecodeError::BadAddress {
                            endpoint: key.to_string(),
                            address: a.to_owned(),
                        })
                };
                let address = parse(&e.address)?;
                let metrics_address = if e.metrics_address.is_empty() {
                    address
                } else {
                    parse(&e.metrics_address)?
                };
                Ok(Endpoint {
                    key,
                    address,
                    metrics_address,
                    labels: e.labels.into_iter().collect(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let picker_config: EndpointPickerConfig = if c.picker_config_json.trim().is_empty() {
            EndpointPickerConfig::default()
        } else {
            serde_json::from_str(&c.picker_config_json)
                .map_err(|e| SnapshotDecodeError::BadPickerConfig(e.to_string()))?
        };
        let snapshot = PoolSnapshot {
            pool: PoolRef {
                namespace: c.pool_namespace,
                name: c.pool_name,
            },
            version: c.version,
            content_hash: c.content_hash,
            app_protocol,
            endpoints,
            objectives: c
                .objectives
                .into_iter()
                .map(|o| Objective {
                    name: o.name,
                    priority: o.priority,
                })
                .collect(),
            rewrites: c
                .rewrites
                .into_iter()
                .map(|r| ModelRewriteRule {
                    source: r.source,
                    created: r.created,
                    matches: r.matches,
                    targets: r
                        .targets
                        .into_iter()
                        .map(|t| RewriteTarget {
                            model_rewrite: t.model_rewrite,
                            weight: t.weight,
                        })
                        .collect(),
                })
                .collect(),
            picker_config,
        };
        Ok(snapshot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_round_trips_through_the_wire_type() {
        let mut ep = Endpoint::from_address("ns", "10.0.0.7:8000".parse().unwrap());
        ep.labels.insert("app".into(), "vllm".into());
        let cfg: EndpointPickerConfig =
            serde_json::from_value(serde_json::json!({"plugins": [{"type": "queue-scorer"}]}))
                .unwrap();
        let snap = PoolSnapshot::new(
            PoolRef {
                namespace: "ns".into(),
                name: "pool".into(),
            },
            7,
            AppProtocol::H2c,
            vec![ep],
            vec![Objective {
                name: "chat".into(),
                priority: 3,
            }],
            vec![ModelRewriteRule {
                source: "ns/r".into(),
                created: "2026-01-01T00:00:00Z".into(),
                matches: vec!["m".into()],
                targets: vec![RewriteTarget {
                    model_rewrite: "m-v2".into(),
                    weight: 1,
                }],
            }],
            cfg,
        );
        let wire = pb::PoolConfig::from(&snap);
        let back = PoolSnapshot::try_from(wire).unwrap();
        assert_eq!(back, snap);
    }

    #[test]
    fn bad_address_is_named_in_the_error() {
        let wire = pb::PoolConfig {
            endpoints: vec![pb::Endpoint {
                pod: "p".into(),
                address: "nope".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let err = PoolSnapshot::try_from(wire).unwrap_err().to_string();
        assert!(err.contains("nope") && err.contains("p-rank-0"), "{err}");
    }
}
