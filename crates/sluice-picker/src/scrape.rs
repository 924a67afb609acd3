//! One scraper task per endpoint: GET the model server's Prometheus endpoint every
//! `--refresh-metrics-interval` (50 ms by default), extract the engine's series, and store
//! them with the time they were taken so that every reader knows their age.
//!
//! A failed or timed-out scrape keeps the previous metrics (their age keeps growing, which
//! is how detectors and the pool gauges notice staleness, as upstream does). Failures are
//! counted per endpoint and logged on transition only. The task holds only a weak reference
//! to its endpoint and ends when the endpoint leaves the pool.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::metrics::Metrics;
use crate::promparse::{EngineMapping, extract};
use crate::state::EndpointRuntime;

/// Largest metrics page read; anything longer is an error, not an allocation.
const MAX_METRICS_BYTES: usize = 8 << 20;

/// How endpoints are scraped.
#[derive(Debug, Clone)]
pub struct ScrapeSettings {
    /// Time between scrapes of one endpoint.
    pub interval: Duration,
    /// Limit on one scrape.
    pub timeout: Duration,
    /// URL path of the metrics page.
    pub path: String,
    /// Engine used when the pod has no engine label.
    pub default_engine: String,
}

impl Default for ScrapeSettings {
    fn default() -> Self {
        ScrapeSettings {
            interval: Duration::from_millis(50),
            timeout: Duration::from_secs(1),
            path: "/metrics".into(),
            default_engine: "vllm".into(),
        }
    }
}

/// Starts scraper tasks.
#[derive(Debug, Clone)]
pub struct Scraper {
    settings: Arc<ScrapeSettings>,
    client: Client<HttpConnector, Empty<Bytes>>,
    metrics: Arc<Metrics>,
    capacity: Option<crate::state::CapacitySignal>,
}

impl Scraper {
    /// A scraper with one shared HTTP client (keep-alive connections per endpoint).
    pub fn new(settings: ScrapeSettings, metrics: Arc<Metrics>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(settings.timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(1)
            .build(connector);
        Scraper {
            settings: Arc::new(settings),
            client,
            metrics,
            capacity: None,
        }
    }

    /// Wakes the flow controller found in `signal` after every successful scrape (fresh
    /// metrics may have opened its saturation gate).
    pub fn with_capacity_signal(mut self, signal: crate::state::CapacitySignal) -> Self {
        self.capacity = Some(signal);
        self
    }

    /// Starts scraping `endpoint` if a Tokio runtime is running (it is in the picker; unit
    /// tests without one inject metrics directly).
    pub fn start(&self, endpoint: &Arc<EndpointRuntime>) {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let engine = endpoint
            .endpoint
            .engine()
            .unwrap_or(&self.settings.default_engine)
            .to_string();
        let mapping = EngineMapping::builtin(&engine).unwrap_or_else(|| {
            tracing::warn!(endpoint = %endpoint.endpoint.key, engine, "unknown engine label; scraping with the vllm mapping");
            EngineMapping::builtin("vllm").unwrap_or(EngineMapping {
                waiting: None,
                running: None,
                kv_usage: None,
                kv_usage_fallback: None,
                lora: None,
                cache_info: None,
            })
        });
        let uri = format!(
            "http://{}{}",
            endpoint.endpoint.metrics_address, self.settings.path
        );
        let task = ScrapeTask {
            endpoint: Arc::downgrade(endpoint),
            uri,
            mapping,
            this: self.clone(),
        };
        handle.spawn(task.run());
    }
}

struct ScrapeTask {
    endpoint: Weak<EndpointRuntime>,
    uri: String,
    mapping: EngineMapping,
    this: Scraper,
}

impl ScrapeTask {
    async fn run(self) {
        let settings = Arc::clone(&self.this.settings);
        let mut tick = tokio::time::interval(settings.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let Ok(uri) = self.uri.parse::<http::Uri>() else {
            tracing::error!(
                uri = self.uri,
                "metrics address does not form a valid URI; not scraping"
            );
            return;
        };
        let mut failing = false;
        let mut missing_logged: Vec<&'static str> = Vec::new();
        loop {
            tick.tick().await;
            let Some(endpoint) = self.endpoint.upgrade() else {
                return;
            };
            let started = Instant::now();
            let result =
                tokio::time::timeout(settings.timeout, fetch(&self.this.client, uri.clone())).await;
            match result {
                Ok(Ok(body)) => {
                    let extracted = extract(&body, &self.mapping);
                    if extracted.missing != missing_logged {
                        if !extracted.missing.is_empty() {
                            tracing::warn!(endpoint = %endpoint.endpoint.key, missing = ?extracted.missing, "model server metrics lack mapped families");
                        }
                        missing_logged = extracted.missing.clone();
                    }
                    if extracted.fields_found > 0 {
                        endpoint.record_scrape(extracted.metrics, started);
                        if let Some(fc) = self.this.capacity.as_ref().and_then(|c| c.load_full()) {
                            fc.capacity_changed();
                        }
                    }
                    if failing {
                        tracing::info!(endpoint = %endpoint.endpoint.key, "metrics scrape recovered");
                        failing = false;
                    }
                }
                Ok(Err(e)) => self.failed(&endpoint, &mut failing, &e),
                Err(_) => self.failed(
                    &endpoint,
                    &mut failing,
                    &format!("timed out after {:?}", settings.timeout),
                ),
            }
        }
    }

    fn failed(&self, endpoint: &EndpointRuntime, failing: &mut bool, why: &str) {
        self.this
            .metrics
            .scrape_errors
            .get_or_create(&endpoint.labels)
            .inc();
        if !*failing {
            tracing::warn!(endpoint = %endpoint.endpoint.key, uri = self.uri, error = why, "metrics scrape failed; keeping the last metrics, which age from now on");
            *failing = true;
        }
    }
}

async fn fetch(
    client: &Client<HttpConnector, Empty<Bytes>>,
    uri: http::Uri,
) -> Result<Bytes, String> {
    let resp = client
        .get(uri)
        .await
        .map_err(|e| format!("request failed: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("HTTP {}", resp.status()));
    }
    let body = Limited::new(resp.into_body(), MAX_METRICS_BYTES)
        .collect()
        .await
        .map_err(|e| format!("reading body: {e}"))?;
    Ok(body.to_bytes())
}
