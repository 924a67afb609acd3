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
use arc_swap::ArcSwap;
use sluice_core::EndpointPickerConfig;
use sluice_core::engine_metrics::EngineMappings;

use crate::promparse::extract;
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
    /// Which series each engine reports; replaced when a config changes them, read on
    /// every scrape.
    mappings: Arc<ArcSwap<EngineMappings>>,
    /// The origin of the tick grid every scraper of this picker follows.
    epoch: tokio::time::Instant,
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
        let mappings = EngineMappings::builtin(&settings.default_engine).unwrap_or_default();
        Scraper {
            settings: Arc::new(settings),
            client,
            metrics,
            capacity: None,
            mappings: Arc::new(ArcSwap::from_pointee(mappings)),
            epoch: tokio::time::Instant::now(),
        }
    }

    /// The first tick at or after `now` on the grid `epoch + k × interval`.
    fn next_tick(&self, now: tokio::time::Instant) -> tokio::time::Instant {
        let interval = self.settings.interval.max(Duration::from_millis(1));
        let since = now.saturating_duration_since(self.epoch);
        let k = since.as_nanos().div_ceil(interval.as_nanos());
        let offset = interval
            .checked_mul(u32::try_from(k).unwrap_or(u32::MAX))
            .unwrap_or(since);
        self.epoch + offset
    }

    /// The engine mappings `config` asks for (its `core-metrics-extractor` parameters, with
    /// `--default-engine` as the default engine when they name none), to [`install`] once
    /// the config is accepted.
    ///
    /// [`install`]: Scraper::install_mappings
    pub fn mappings_for(&self, config: &EndpointPickerConfig) -> Result<EngineMappings, String> {
        EngineMappings::from_config(config, &self.settings.default_engine)
    }

    /// Makes every scraper, running or future, read pages with `mappings` from its next
    /// scrape on.
    pub fn install_mappings(&self, mappings: EngineMappings) {
        if *self.mappings.load_full() != mappings {
            self.mappings.store(Arc::new(mappings));
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
        let uri = format!(
            "http://{}{}",
            endpoint.endpoint.metrics_address, self.settings.path
        );
        let task = ScrapeTask {
            endpoint: Arc::downgrade(endpoint),
            uri,
            this: self.clone(),
        };
        handle.spawn(task.run());
    }
}

struct ScrapeTask {
    endpoint: Weak<EndpointRuntime>,
    uri: String,
    this: Scraper,
}

impl ScrapeTask {
    async fn run(self) {
        let settings = Arc::clone(&self.this.settings);
        // Every endpoint's scraper ticks on the same grid, so that one timer wake-up sends
        // all the scrapes and their answers arrive together: scraping eight endpoints on
        // eight drifting phases cost the picker eight thread wake-ups (and ~100 us of CPU,
        // half of it in the kernel) per interval. A late tick skips to the next grid point
        // rather than shifting this scraper off the grid.
        let period = settings.interval.max(Duration::from_millis(1));
        let mut tick =
            tokio::time::interval_at(self.this.next_tick(tokio::time::Instant::now()), period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let Ok(uri) = self.uri.parse::<http::Uri>() else {
            tracing::error!(
                uri = self.uri,
                "metrics address does not form a valid URI; not scraping"
            );
            return;
        };
        let mut failing = false;
        let mut missing_logged: Vec<&'static str> = Vec::new();
        let mut unknown_engine_logged = false;
        // The first scrape goes out at once; the following ones on the grid.
        let mut first = true;
        loop {
            if !first {
                tick.tick().await;
            }
            first = false;
            let Some(endpoint) = self.endpoint.upgrade() else {
                return;
            };
            let started = Instant::now();
            let result =
                tokio::time::timeout(settings.timeout, fetch(&self.this.client, uri.clone())).await;
            match result {
                Ok(Ok(body)) => {
                    let mappings = self.this.mappings.load();
                    let (engine, mapping, known) = mappings.for_endpoint(&endpoint.endpoint);
                    if !known && !unknown_engine_logged {
                        let label = endpoint.endpoint.labels.get(mappings.label_key());
                        tracing::warn!(endpoint = %endpoint.endpoint.key, label = ?label, default = engine, "the engine label names no known engine; scraping with the default engine's mapping");
                    }
                    unknown_engine_logged = !known;
                    let extracted = extract(&body, mapping);
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

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::standalone;
    use crate::state::PickerState;
    use sluice_core::{Endpoint, PoolRef};

    #[test]
    fn scrapers_tick_on_one_grid() {
        let scraper = Scraper::new(ScrapeSettings::default(), Arc::new(Metrics::new()));
        let (e, ms) = (scraper.epoch, |n: u64| Duration::from_millis(n));
        // Whenever a scraper starts, its ticks fall on epoch + k × 50 ms, so scrapers of
        // different endpoints wake together.
        assert_eq!(scraper.next_tick(e), e);
        assert_eq!(scraper.next_tick(e + ms(1)), e + ms(50));
        assert_eq!(scraper.next_tick(e + ms(50)), e + ms(50));
        assert_eq!(scraper.next_tick(e + ms(120)), e + ms(150));
        assert_eq!(scraper.next_tick(e + ms(60_000) + ms(3)), e + ms(60_050));
    }

    /// A model server that speaks only its own metric names (keep-alive HTTP/1.1).
    async fn custom_engine_server() -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let page = "# TYPE tgi_queue_size gauge\ntgi_queue_size 7\ntgi_batch_current_size{kind=\"decode\"} 3\ntgi_batch_current_size{kind=\"prefill\"} 1\n";
                    let mut buf = vec![0u8; 4096];
                    let mut have = Vec::new();
                    loop {
                        let Ok(n) = conn.read(&mut buf).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        have.extend_from_slice(&buf[..n]);
                        while let Some(end) = have.windows(4).position(|w| w == b"\r\n\r\n") {
                            have.drain(..end + 4);
                            let resp = format!(
                                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{page}",
                                page.len()
                            );
                            if conn.write_all(resp.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        addr
    }

    async fn scraped_queue(state: &PickerState, want: Option<u32>) -> Option<u32> {
        let mut last = None;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let loaded = state.current().unwrap();
            last = loaded.endpoints[0]
                .metrics(Instant::now())
                .map(|(m, _)| m.waiting_queue_size);
            if last == want {
                break;
            }
        }
        last
    }

    #[tokio::test]
    async fn engine_configs_from_the_picker_config_decide_which_series_are_read() {
        let server = custom_engine_server().await;
        let settings = ScrapeSettings {
            interval: Duration::from_millis(10),
            ..ScrapeSettings::default()
        };
        let state = PickerState::new(Arc::new(Metrics::new()), Some(settings), None);
        let pool = PoolRef {
            namespace: "default".into(),
            name: "p".into(),
        };
        let endpoints = vec![Endpoint::from_address("default", server)];
        let tgi = standalone::config_from_text(
            r#"
plugins:
- type: queue-scorer
- type: core-metrics-extractor
  parameters:
    defaultEngine: tgi
    engineConfigs:
    - name: tgi
      queuedRequestsSpec: tgi_queue_size
      runningRequestsSpec: 'tgi_batch_current_size{kind="decode"}'
"#,
        )
        .unwrap();
        state
            .apply_snapshot(standalone::snapshot(
                pool.clone(),
                1,
                endpoints.clone(),
                tgi,
            ))
            .unwrap();
        assert_eq!(scraped_queue(&state, Some(7)).await, Some(7));
        let (m, _) = state.current().unwrap().endpoints[0]
            .metrics(Instant::now())
            .unwrap();
        assert_eq!(
            m.running_requests_size, 3,
            "the label matcher picks the decode series"
        );

        // A config without the custom engine: the built-in vllm mapping finds nothing on
        // this server, so the next scrapes no longer refresh the endpoint.
        let plain = standalone::config_from_text("plugins:\n- type: queue-scorer\n").unwrap();
        state
            .apply_snapshot(standalone::snapshot(
                pool.clone(),
                2,
                endpoints.clone(),
                plain,
            ))
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (_, age_then) = state.current().unwrap().endpoints[0]
            .metrics(Instant::now())
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (_, age_now) = state.current().unwrap().endpoints[0]
            .metrics(Instant::now())
            .unwrap();
        assert!(
            age_now >= age_then + Duration::from_millis(90),
            "metrics age once the mapping no longer matches: {age_then:?} -> {age_now:?}"
        );

        // A config naming an unknown default engine is refused; the last one keeps serving.
        let bad = standalone::config_from_text(
            "plugins:\n- type: queue-scorer\n- type: core-metrics-extractor\n  parameters: {defaultEngine: tgi}\n",
        )
        .unwrap();
        let err = state
            .apply_snapshot(standalone::snapshot(pool, 3, endpoints, bad))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("defaultEngine \"tgi\" is not a known engine"),
            "{err}"
        );
        assert_eq!(state.current().unwrap().snapshot.version, 2);
    }
}
