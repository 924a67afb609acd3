//! Endpoints (one per ready pod and target port) and the metrics the picker keeps for them.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// The pod label that names the model-server engine (`vllm`, `sglang`, `trtllm-serve`,
/// `triton-tensorrt-llm`), as upstream's `core-metrics-extractor` reads it.
pub const ENGINE_LABEL: &str = "inference.networking.k8s.io/engine-type";

/// The pod annotation that restricts a pod's endpoints to some of the pool's target ports.
pub const ACTIVE_PORTS_ANNOTATION: &str = "inference.networking.k8s.io/active-ports";

/// The pod label sluice reads for an endpoint's hardware/engine class (for the latency
/// predictor in heterogeneous pools), for example `h100-llama8b`.
pub const HARDWARE_CLASS_LABEL: &str = "sluice.dev/hardware-class";

/// Identity of an endpoint: the pod and the index of the target port (upstream names it
/// `<pod>-rank-<idx>`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct EndpointKey {
    /// The pod's namespace.
    pub namespace: Arc<str>,
    /// The pod's name.
    pub pod: Arc<str>,
    /// Index into the pool's target ports.
    pub rank: u32,
}

impl fmt::Display for EndpointKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}-rank-{}", self.namespace, self.pod, self.rank)
    }
}

/// One model-server endpoint the picker may route to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// Which pod and port this is.
    pub key: EndpointKey,
    /// `podIP:targetPort`: what goes into `x-gateway-destination-endpoint`.
    pub address: SocketAddr,
    /// Where the model server's Prometheus metrics are scraped (`podIP:metricsPort`).
    pub metrics_address: SocketAddr,
    /// The pod's labels, copied.
    pub labels: BTreeMap<String, String>,
}

impl Endpoint {
    /// An endpoint for a bare address (standalone mode): the pod name is the address.
    pub fn from_address(namespace: &str, address: SocketAddr) -> Self {
        Endpoint {
            key: EndpointKey {
                namespace: namespace.into(),
                pod: address.to_string().into(),
                rank: 0,
            },
            address,
            metrics_address: address,
            labels: BTreeMap::new(),
        }
    }

    /// The engine named by the pod's engine label, if any.
    pub fn engine(&self) -> Option<&str> {
        self.labels.get(ENGINE_LABEL).map(String::as_str)
    }
}

/// What the picker knows about a model server's load: scraped from its `/metrics`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EndpointMetrics {
    /// Requests waiting in the server's queue.
    pub waiting_queue_size: u32,
    /// Requests the server is running (in its batch).
    pub running_requests_size: u32,
    /// KV-cache utilisation, 0.0 to 1.0.
    pub kv_cache_usage: f64,
    /// LoRA adapters loaded and running.
    pub active_models: Vec<String>,
    /// LoRA adapters requested by waiting requests.
    pub waiting_models: Vec<String>,
    /// How many LoRA adapters the server can hold at once (0 = unknown).
    pub max_active_models: u32,
    /// KV-cache block size in tokens (0 = unknown).
    pub cache_block_size: u32,
    /// Number of KV-cache blocks on the server (0 = unknown).
    pub cache_num_blocks: u64,
}
