//! Builders shared by the integration tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use sluice_core::{Endpoint, EndpointMetrics};
use sluice_scheduling::{
    Candidate, InFlightCounters, LlmRequest, Registry, Scheduler, SchedulerOptions,
    parse_config_text,
};

/// The integration-test config of upstream (`test/integration/epp/testdata/default-config.yaml`).
pub const INTEGRATION_CONFIG: &str = r#"
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
  - type: queue-scorer
  - type: kv-cache-utilization-scorer
  - type: prefix-cache-scorer
  - type: lora-affinity-scorer
  - type: openai-parser
schedulingProfiles:
  - name: default
    plugins:
      - pluginRef: queue-scorer
      - pluginRef: kv-cache-utilization-scorer
      - pluginRef: prefix-cache-scorer
      - pluginRef: lora-affinity-scorer
parser:
  pluginRef: openai-parser
featureGates:
  - enableLegacyMetrics
"#;

/// One pod of a test table: index i listens on 192.168.1.(i+1):8000, like upstream's tests.
#[derive(Clone, Debug, Default)]
pub struct Pod {
    pub queue: u32,
    pub running: u32,
    pub kv: f64,
    pub active: Vec<String>,
    pub waiting: Vec<String>,
    pub max_lora: u32,
    pub in_flight_requests: u32,
    pub in_flight_tokens: u64,
    pub metrics_age_ms: u64,
    pub no_metrics: bool,
    pub block_size: u32,
    pub num_blocks: u64,
}

pub fn pod(queue: u32, kv: f64) -> Pod {
    Pod {
        queue,
        kv,
        ..Pod::default()
    }
}

impl Pod {
    pub fn active(mut self, models: &[&str]) -> Self {
        self.active = models.iter().map(|s| s.to_string()).collect();
        self
    }
    pub fn waiting(mut self, models: &[&str]) -> Self {
        self.waiting = models.iter().map(|s| s.to_string()).collect();
        self
    }
    pub fn max_lora(mut self, n: u32) -> Self {
        self.max_lora = n;
        self
    }
    pub fn running(mut self, n: u32) -> Self {
        self.running = n;
        self
    }
    pub fn in_flight(mut self, requests: u32, tokens: u64) -> Self {
        self.in_flight_requests = requests;
        self.in_flight_tokens = tokens;
        self
    }
    pub fn age_ms(mut self, ms: u64) -> Self {
        self.metrics_age_ms = ms;
        self
    }
    pub fn no_metrics(mut self) -> Self {
        self.no_metrics = true;
        self
    }
}

pub fn endpoint(i: usize) -> Arc<Endpoint> {
    let mut e = Endpoint::from_address("default", ([192, 168, 1, (i + 1) as u8], 8000).into());
    e.key.pod = format!("pod-{i}").into();
    Arc::new(e)
}

pub fn candidates(pods: &[Pod]) -> Vec<Candidate> {
    pods.iter()
        .enumerate()
        .map(|(i, p)| Candidate {
            endpoint: endpoint(i),
            metrics: (!p.no_metrics).then(|| {
                Arc::new(EndpointMetrics {
                    waiting_queue_size: p.queue,
                    running_requests_size: p.running,
                    kv_cache_usage: p.kv,
                    active_models: p.active.clone(),
                    waiting_models: p.waiting.clone(),
                    max_active_models: p.max_lora,
                    cache_block_size: p.block_size,
                    cache_num_blocks: p.num_blocks,
                })
            }),
            metrics_age: Duration::from_millis(p.metrics_age_ms),
            in_flight: Arc::new(InFlightCounters::with_values(
                p.in_flight_requests,
                p.in_flight_tokens,
            )),
        })
        .collect()
}

pub fn request(id: &str, model: &str) -> LlmRequest {
    LlmRequest {
        request_id: id.to_owned(),
        target_model: model.to_owned(),
        ..LlmRequest::default()
    }
}

pub fn scheduler(yaml: &str) -> Scheduler {
    scheduler_with(yaml, &Registry::with_builtins())
}

pub fn scheduler_with(yaml: &str, registry: &Registry) -> Scheduler {
    let cfg = parse_config_text(yaml).unwrap_or_else(|e| panic!("config does not parse: {e}"));
    Scheduler::from_config_with(
        &cfg,
        registry,
        SchedulerOptions {
            seed: Some(7),
            record_scores: true,
            ..SchedulerOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("config does not load: {e}"))
}

/// The index (0-based pod number) of a candidate from its address.
pub fn pod_index(c: &Candidate) -> usize {
    match c.endpoint.address.ip() {
        std::net::IpAddr::V4(v4) => v4.octets()[3] as usize - 1,
        std::net::IpAddr::V6(_) => usize::MAX,
    }
}
