//! Standalone configuration: a pool snapshot built from flags instead of the controller.
//!
//! `--endpoints HOST:PORT,...` or `--endpoints-file` (one `HOST:PORT` per line, `#`
//! comments, optional `engine=NAME` and `metrics=HOST:PORT` after the address) give the
//! endpoints; `--config-file` or `--config-text` give an EndpointPickerConfig (YAML or JSON).

use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;

use anyhow::{Context, Result, bail};
use sluice_core::endpoint::ENGINE_LABEL;
use sluice_core::snapshot::AppProtocol;
use sluice_core::{Endpoint, EndpointKey, EndpointPickerConfig, PoolRef, PoolSnapshot};

/// Parses one endpoint spec: `HOST:PORT [engine=NAME] [metrics=HOST:PORT] [label=K=V]`.
pub fn parse_endpoint(spec: &str, namespace: &str) -> Result<Endpoint> {
    let mut parts = spec.split_whitespace();
    let addr_text = parts.next().context("empty endpoint spec")?;
    let address = resolve(addr_text)?;
    let mut labels = BTreeMap::new();
    let mut metrics_address = address;
    for part in parts {
        let (k, v) = part.split_once('=').with_context(|| {
            format!(
                "endpoint option {part:?} in {spec:?} is not key=value (engine=, metrics=, label=)"
            )
        })?;
        match k {
            "engine" => {
                labels.insert(ENGINE_LABEL.to_string(), v.to_string());
            }
            "metrics" => metrics_address = resolve(v)?,
            "label" => {
                let (lk, lv) = v
                    .split_once('=')
                    .with_context(|| format!("label {v:?} in {spec:?} is not K=V"))?;
                labels.insert(lk.to_string(), lv.to_string());
            }
            other => bail!(
                "unknown endpoint option {other:?} in {spec:?}; expected engine=, metrics= or label="
            ),
        }
    }
    Ok(Endpoint {
        key: EndpointKey {
            namespace: namespace.into(),
            pod: address.to_string().into(),
            rank: 0,
        },
        address,
        metrics_address,
        labels,
    })
}

fn resolve(text: &str) -> Result<SocketAddr> {
    if let Ok(sa) = text.parse::<SocketAddr>() {
        return Ok(sa);
    }
    text.to_socket_addrs()
        .with_context(|| format!("endpoint {text:?} is not HOST:PORT"))?
        .next()
        .with_context(|| format!("endpoint {text:?} resolved to no address"))
}

/// Endpoints from a comma-separated `--endpoints` value.
pub fn endpoints_from_list(list: &str, namespace: &str) -> Result<Vec<Endpoint>> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .enumerate()
        .map(|(i, s)| {
            parse_endpoint(s, namespace).with_context(|| format!("in --endpoints entry {}", i + 1))
        })
        .collect()
}

/// Endpoints from an `--endpoints-file`.
pub fn endpoints_from_file(path: &Path, namespace: &str) -> Result<Vec<Endpoint>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading --endpoints-file {}", path.display()))?;
    endpoints_from_text(&text, namespace)
        .with_context(|| format!("in --endpoints-file {}", path.display()))
}

/// Endpoints from the text of an endpoints file.
pub fn endpoints_from_text(text: &str, namespace: &str) -> Result<Vec<Endpoint>> {
    text.lines()
        .enumerate()
        .map(|(i, l)| (i, l.split('#').next().unwrap_or("").trim()))
        .filter(|(_, l)| !l.is_empty())
        .map(|(i, l)| parse_endpoint(l, namespace).with_context(|| format!("line {}", i + 1)))
        .collect()
}

/// An EndpointPickerConfig from YAML or JSON text (empty text = upstream's default), read
/// by the scheduler's own parser so errors name the offending key.
pub fn config_from_text(text: &str) -> Result<EndpointPickerConfig> {
    sluice_scheduling::parse_config_text(text).map_err(|e| anyhow::anyhow!("{e}"))
}

/// The snapshot standalone mode serves.
pub fn snapshot(
    pool: PoolRef,
    version: u64,
    endpoints: Vec<Endpoint>,
    config: EndpointPickerConfig,
) -> PoolSnapshot {
    PoolSnapshot::new(
        pool,
        version,
        AppProtocol::Http,
        endpoints,
        Vec::new(),
        Vec::new(),
        config,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_lists_and_files_parse() {
        let eps = endpoints_from_list("127.0.0.1:8000, 127.0.0.1:8001", "default").unwrap();
        assert_eq!(eps.len(), 2);
        assert_eq!(eps[1].address.port(), 8001);
        let eps = endpoints_from_text(
            "# fleet\n127.0.0.1:9000 engine=sglang metrics=127.0.0.1:9100\n\n10.0.0.1:80 label=zone=a # comment\n",
            "ns",
        )
        .unwrap();
        assert_eq!(eps[0].engine(), Some("sglang"));
        assert_eq!(eps[0].metrics_address.port(), 9100);
        assert_eq!(eps[1].labels.get("zone").map(String::as_str), Some("a"));
    }

    #[test]
    fn bad_endpoints_say_where() {
        let err = endpoints_from_list("127.0.0.1:8000,nonsense", "d").unwrap_err();
        assert!(format!("{err:#}").contains("entry 2"), "{err:#}");
        let err = endpoints_from_text("127.0.0.1:1 colour=red", "d").unwrap_err();
        assert!(format!("{err:#}").contains("line 1"), "{err:#}");
        assert!(format!("{err:#}").contains("colour"), "{err:#}");
    }

    #[test]
    fn config_text_parses_yaml() {
        let cfg = config_from_text(
            "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: queue-scorer\n",
        )
        .unwrap();
        assert_eq!(cfg.plugins.len(), 1);
        assert!(config_from_text("kind: ConfigMap").is_err());
        assert_eq!(
            config_from_text("  ").unwrap(),
            EndpointPickerConfig::default()
        );
    }
}
