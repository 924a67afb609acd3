//! The picker's configuration state: the current pool snapshot, the scheduler built from it
//! and the per-endpoint runtime (scraped metrics, in-flight counters), swapped atomically.
//!
//! Requests load the current [`Loaded`] once, at the start of routing, and keep that `Arc`
//! until they finish: a new snapshot never blocks or changes a request in flight. Applying a
//! snapshot validates it and builds the scheduler first; only a fully built state is swapped
//! in, so a bad snapshot leaves the old one serving.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use envoy_types::pb::google::protobuf::Struct;
use parking_lot::Mutex;
use sluice_core::{Endpoint, EndpointKey, EndpointMetrics, PoolSnapshot};
use sluice_flowcontrol::{FlowControlConfig, FlowController, FlowMetrics, FnSaturation};
use sluice_predictor::RemotePredictor;
use sluice_scheduling::plugins::slo::SloServices;
use sluice_scheduling::{Candidate, InFlightCounters, Registry, SharedState};
use tokio::sync::watch;

use crate::metrics::{EndpointLabels, Metrics};
use crate::schedule::Router;
use crate::scrape::{ScrapeSettings, Scraper};

/// One endpoint while it is in the pool: what the scraper last saw and what this picker has
/// in flight there. Kept across snapshots as long as the endpoint (key and addresses) stays.
#[derive(Debug)]
pub struct EndpointRuntime {
    /// The endpoint.
    pub endpoint: Arc<Endpoint>,
    /// Requests and prompt tokens routed there and not yet finished.
    pub in_flight: Arc<InFlightCounters>,
    /// Labels for the per-endpoint metric series.
    pub labels: EndpointLabels,
    /// `ip:port` as it goes into `x-gateway-destination-endpoint` (IPv6 bracketed),
    /// formatted once rather than per request.
    pub address_text: Arc<str>,
    /// The `envoy.lb` dynamic metadata routing a request here alone, built once: cloning
    /// it skips building two protobuf maps (SipHash and a fresh `RandomState` each) per
    /// request.
    pub destination_metadata: Struct,
    scraped: Mutex<Option<(Arc<EndpointMetrics>, Instant)>>,
}

impl EndpointRuntime {
    /// A runtime with no metrics yet.
    pub fn new(endpoint: Endpoint) -> Self {
        let labels = EndpointLabels {
            pod_name: endpoint.key.pod.to_string(),
            namespace: endpoint.key.namespace.to_string(),
            port: endpoint.address.port().to_string(),
        };
        let address_text: Arc<str> = endpoint.address.to_string().into();
        EndpointRuntime {
            destination_metadata: crate::extproc::destination_metadata(&address_text),
            address_text,
            endpoint: Arc::new(endpoint),
            in_flight: Arc::new(InFlightCounters::default()),
            labels,
            scraped: Mutex::new(None),
        }
    }

    /// Stores the result of a successful scrape taken at `at`.
    pub fn record_scrape(&self, metrics: EndpointMetrics, at: Instant) {
        *self.scraped.lock() = Some((Arc::new(metrics), at));
    }

    /// The latest metrics and their age at `now`.
    pub fn metrics(&self, now: Instant) -> Option<(Arc<EndpointMetrics>, Duration)> {
        let guard = self.scraped.lock();
        guard
            .as_ref()
            .map(|(m, at)| (Arc::clone(m), now.saturating_duration_since(*at)))
    }

    /// The endpoint as a scheduling candidate at `now`.
    pub fn candidate(&self, now: Instant) -> Candidate {
        let (metrics, metrics_age) = match self.metrics(now) {
            Some((m, age)) => (Some(m), age),
            None => (None, Duration::MAX),
        };
        Candidate {
            endpoint: Arc::clone(&self.endpoint),
            metrics,
            metrics_age,
            in_flight: Arc::clone(&self.in_flight),
        }
    }

    fn same_target(&self, other: &Endpoint) -> bool {
        self.endpoint.key == other.key
            && self.endpoint.address == other.address
            && self.endpoint.metrics_address == other.metrics_address
            && self.endpoint.labels == other.labels
    }
}

/// A snapshot with everything built from it.
#[derive(Debug)]
pub struct Loaded {
    /// The snapshot.
    pub snapshot: Arc<PoolSnapshot>,
    /// The scheduler built from `snapshot.picker_config`.
    pub router: Router,
    /// The endpoints, in snapshot order.
    pub endpoints: Vec<Arc<EndpointRuntime>>,
    /// The flow controller, when the config's `flowControl` feature gate is on. Kept across
    /// snapshots while its configuration stays the same, so queued requests stay queued.
    pub flow: Option<FlowController>,
    // foldhash: looked up per request (destination, served endpoint), where SipHash's
    // DoS resistance buys nothing (keys come from the snapshot, not from clients).
    by_address: HashMap<SocketAddr, usize, foldhash::fast::RandomState>,
    by_key: HashMap<EndpointKey, usize, foldhash::fast::RandomState>,
}

impl Loaded {
    /// All endpoints as scheduling candidates at `now`.
    pub fn candidates(&self, now: Instant) -> Vec<Candidate> {
        self.endpoints.iter().map(|e| e.candidate(now)).collect()
    }

    /// The endpoint serving at `address`.
    pub fn endpoint_at(&self, address: SocketAddr) -> Option<&Arc<EndpointRuntime>> {
        self.by_address
            .get(&address)
            .and_then(|&i| self.endpoints.get(i))
    }

    /// The `x-gateway-destination-endpoint` value for `targets`: their `ip:port`s joined
    /// with `,`, from the strings formatted when the snapshot was applied.
    pub fn destination(&self, targets: &[Candidate]) -> String {
        let mut out = String::with_capacity(targets.len() * 22);
        for (i, t) in targets.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            match self.endpoint_at(t.endpoint.address) {
                Some(rt) => out.push_str(&rt.address_text),
                None => {
                    use std::fmt::Write as _;
                    let _ = write!(out, "{}", t.endpoint.address);
                }
            }
        }
        out
    }

    /// [`Loaded::destination`] and its `envoy.lb` dynamic metadata (prebuilt for a single
    /// target of the snapshot).
    pub fn destination_and_metadata(&self, targets: &[Candidate]) -> (String, Struct) {
        if let [t] = targets
            && let Some(rt) = self.endpoint_at(t.endpoint.address)
        {
            return (rt.address_text.to_string(), rt.destination_metadata.clone());
        }
        let dest = self.destination(targets);
        let md = crate::extproc::destination_metadata(&dest);
        (dest, md)
    }

    /// The endpoint with this key.
    pub fn endpoint(&self, key: &EndpointKey) -> Option<&Arc<EndpointRuntime>> {
        self.by_key.get(key).and_then(|&i| self.endpoints.get(i))
    }
}

/// Why a snapshot was not applied. The previous snapshot keeps serving.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The snapshot is for another pool than the one this picker serves.
    #[error("snapshot is for pool {got}, but this picker serves {expected}")]
    WrongPool {
        /// The pool this picker serves.
        expected: String,
        /// The snapshot's pool.
        got: String,
    },
    /// Older than (or the same version as) what is applied.
    #[error("snapshot version {got} is not newer than the applied version {current}")]
    Stale {
        /// The applied version.
        current: u64,
        /// The offered version.
        got: u64,
    },
    /// Two endpoints share an address.
    #[error("endpoints {first} and {second} both use address {address}; addresses must be unique")]
    DuplicateAddress {
        /// The address.
        address: SocketAddr,
        /// One endpoint.
        first: String,
        /// The other.
        second: String,
    },
    /// The picker configuration does not validate or a plugin could not be built.
    #[error("invalid EndpointPickerConfig in snapshot version {version}: {message}")]
    Config {
        /// The offered version.
        version: u64,
        /// What the scheduler's validation said.
        message: String,
    },
}

/// What applying a snapshot did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The snapshot is now serving.
    Swapped,
    /// Same content as what is serving; only the version was recorded.
    Unchanged,
}

/// The shared state handle: cheap to clone, safe to use from any task.
///
/// The controller's config client and standalone mode both feed it through
/// [`PickerState::apply_snapshot`]. Request handling calls [`PickerState::current`].
#[derive(Debug, Clone)]
pub struct PickerState {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    current: ArcSwapOption<Loaded>,
    /// Serialises appliers so that version checks and endpoint reuse see a stable state.
    apply_lock: Mutex<()>,
    metrics: Arc<Metrics>,
    scraper: Option<Scraper>,
    pool_name: Option<String>,
    version_tx: watch::Sender<u64>,
    /// Plugin types the scheduler builds from (the controller validates with the same).
    registry: Registry,
    /// The pool's scheduler state that outlives one config (prefix index, SLO queues).
    shared: SharedState,
    /// Flow-control series, registered once and shared by every controller built.
    flow_metrics: Arc<FlowMetrics>,
    /// The live flow controller (if any), for the scraper's "capacity may have changed".
    flow_signal: CapacitySignal,
}

/// Where the scraper finds the flow controller to wake after fresh metrics.
pub type CapacitySignal = Arc<ArcSwapOption<FlowController>>;

/// Start-up choices of a [`PickerState`] beyond metrics, scraping and pool.
#[derive(Debug, Default)]
pub struct PickerOptions {
    /// The SLO-routing services (latency predictor, SLO metrics). `None` installs the
    /// defaults, whose in-process predictor starts on the first prediction.
    pub slo: Option<SloServices>,
    /// llm-d's predictor sidecars client, when `slo` predicts with it: its counters
    /// (calls, failures, coalescing, training uploads) are exported on /metrics.
    pub remote_predictor: Option<Arc<RemotePredictor>>,
}

impl PickerOptions {
    /// SLO routing that predicts with llm-d's sidecars through `remote`, with its counters
    /// exported (see [`crate::remote_metrics`]).
    pub fn with_remote_predictor(remote: Arc<RemotePredictor>) -> Self {
        PickerOptions {
            slo: Some(SloServices::with_predictor(remote.clone())),
            remote_predictor: Some(remote),
        }
    }
}

impl PickerState {
    /// A state with nothing loaded. `scrape` starts a scraper per endpoint (needs a Tokio
    /// runtime at apply time); `None` disables scraping (tests inject metrics directly).
    /// `pool` restricts snapshots to one pool (`namespace/name`); `None` accepts any.
    pub fn new(
        metrics: Arc<Metrics>,
        scrape: Option<ScrapeSettings>,
        pool: Option<String>,
    ) -> Self {
        Self::with_options(metrics, scrape, pool, PickerOptions::default())
    }

    /// [`PickerState::new`] with explicit [`PickerOptions`]. Registers the SLO and
    /// flow-control series in `metrics` (so build one state per `Metrics`).
    pub fn with_options(
        metrics: Arc<Metrics>,
        scrape: Option<ScrapeSettings>,
        pool: Option<String>,
        options: PickerOptions,
    ) -> Self {
        let (version_tx, _) = watch::channel(0);
        let shared = SharedState::default();
        let slo = SloServices::install(&shared, options.slo.unwrap_or_default());
        let flow_metrics = FlowMetrics::new(100);
        let pool_label = pool
            .as_deref()
            .map(|p| p.rsplit('/').next().unwrap_or(p).to_string())
            .unwrap_or_default();
        metrics.register_with(|r| {
            slo.metrics().register(r);
            if let Some(remote) = &options.remote_predictor {
                crate::remote_metrics::register(r, remote);
            }
            flow_metrics.register(
                r.sub_registry_with_prefix("inference_extension")
                    .sub_registry_with_label((
                        std::borrow::Cow::Borrowed("inference_pool"),
                        std::borrow::Cow::Owned(pool_label),
                    )),
            );
        });
        let flow_signal: CapacitySignal = Arc::new(ArcSwapOption::empty());
        PickerState {
            inner: Arc::new(Inner {
                current: ArcSwapOption::empty(),
                apply_lock: Mutex::new(()),
                scraper: scrape.map(|s| {
                    Scraper::new(s, Arc::clone(&metrics)).with_capacity_signal(flow_signal.clone())
                }),
                metrics,
                pool_name: pool,
                version_tx,
                registry: Registry::with_builtins(),
                shared,
                flow_metrics,
                flow_signal,
            }),
        }
    }

    /// The pool's [`SharedState`] (the SLO services live there).
    pub fn shared(&self) -> &SharedState {
        &self.inner.shared
    }

    /// The SLO-routing services every scheduler of this picker uses.
    pub fn slo(&self) -> Arc<SloServices> {
        SloServices::from_shared(&self.inner.shared)
    }

    /// The metrics registry shared by everything in this picker.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// The state requests route with, or `None` before the first snapshot.
    pub fn current(&self) -> Option<Arc<Loaded>> {
        self.inner.current.load_full()
    }

    /// Whether a snapshot is loaded (the health service reports SERVING from then on).
    pub fn is_ready(&self) -> bool {
        self.inner.current.load().is_some()
    }

    /// Watches the applied snapshot version (0 = none yet).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.version_tx.subscribe()
    }

    /// Validates `snapshot`, builds its scheduler and endpoints, and swaps it in. On error
    /// the previous snapshot keeps serving and the error says why.
    pub fn apply_snapshot(&self, snapshot: PoolSnapshot) -> Result<Applied, ApplyError> {
        let _guard = self.inner.apply_lock.lock();
        let result = self.apply_locked(snapshot);
        if result.is_err() {
            self.inner.metrics.config_rejected.inc();
        }
        result
    }

    fn apply_locked(&self, snapshot: PoolSnapshot) -> Result<Applied, ApplyError> {
        if let Some(expected) = &self.inner.pool_name {
            let got = snapshot.pool.to_string();
            if &got != expected {
                return Err(ApplyError::WrongPool {
                    expected: expected.clone(),
                    got,
                });
            }
        }
        let old = self.inner.current.load_full();
        if let Some(old) = &old {
            if snapshot.version <= old.snapshot.version && snapshot.pool == old.snapshot.pool {
                return Err(ApplyError::Stale {
                    current: old.snapshot.version,
                    got: snapshot.version,
                });
            }
            if snapshot.content_hash == old.snapshot.content_hash
                && snapshot.compute_hash() == snapshot.content_hash
            {
                // Same content: keep the built scheduler (and its learned state) serving.
                self.inner.version_tx.send_replace(snapshot.version);
                return Ok(Applied::Unchanged);
            }
        }
        let mut by_address: HashMap<SocketAddr, usize, foldhash::fast::RandomState> =
            HashMap::with_capacity_and_hasher(snapshot.endpoints.len(), Default::default());
        let mut by_key: HashMap<EndpointKey, usize, foldhash::fast::RandomState> =
            HashMap::with_capacity_and_hasher(snapshot.endpoints.len(), Default::default());
        for (i, ep) in snapshot.endpoints.iter().enumerate() {
            if let Some(&j) = by_address.get(&ep.address) {
                return Err(ApplyError::DuplicateAddress {
                    address: ep.address,
                    first: snapshot.endpoints[j].key.to_string(),
                    second: ep.key.to_string(),
                });
            }
            by_address.insert(ep.address, i);
            by_key.insert(ep.key.clone(), i);
        }
        // An unchanged picker config keeps the built scheduler, so plugin state (the prefix
        // index, latency trackers) survives endpoint churn.
        let router = match old
            .as_ref()
            .filter(|o| o.snapshot.picker_config == snapshot.picker_config)
        {
            Some(o) => o.router.clone(),
            None => Router::build(
                &snapshot.picker_config,
                &self.inner.registry,
                &self.inner.shared,
                &self.inner.metrics,
            )
            .map_err(|message| ApplyError::Config {
                version: snapshot.version,
                message,
            })?,
        };
        let mappings = match &self.inner.scraper {
            Some(s) => Some(s.mappings_for(&snapshot.picker_config).map_err(|message| {
                ApplyError::Config {
                    version: snapshot.version,
                    message,
                }
            })?),
            None => None,
        };
        let flow = self.flow_controller(&snapshot, old.as_deref())?;
        if let (Some(s), Some(m)) = (&self.inner.scraper, mappings) {
            s.install_mappings(m);
        }
        let endpoints: Vec<Arc<EndpointRuntime>> = snapshot
            .endpoints
            .iter()
            .map(|ep| {
                old.as_ref()
                    .and_then(|o| o.endpoint(&ep.key))
                    .filter(|rt| rt.same_target(ep))
                    .cloned()
                    .unwrap_or_else(|| {
                        let rt = Arc::new(EndpointRuntime::new(ep.clone()));
                        if let Some(s) = &self.inner.scraper {
                            s.start(&rt);
                        }
                        rt
                    })
            })
            .collect();
        router.set_endpoints(&endpoints);
        let version = snapshot.version;
        let loaded = Loaded {
            snapshot: Arc::new(snapshot),
            router,
            endpoints,
            flow: flow.clone(),
            by_address,
            by_key,
        };
        self.inner.current.store(Some(Arc::new(loaded)));
        self.inner.flow_signal.store(flow.map(Arc::new));
        if let Some(fc) = self.inner.flow_signal.load().as_deref() {
            // New endpoints or a new detector may have opened the gate.
            fc.capacity_changed();
        }
        self.inner
            .metrics
            .config_version
            .set(i64::try_from(version).unwrap_or(i64::MAX));
        self.inner.version_tx.send_replace(version);
        Ok(Applied::Swapped)
    }

    /// The flow controller `snapshot` asks for: none without the `flowControl` feature gate,
    /// the running one when its configuration is unchanged, else a new one whose gate is the
    /// scheduler's saturation detector over the pool's current endpoints.
    fn flow_controller(
        &self,
        snapshot: &PoolSnapshot,
        old: Option<&Loaded>,
    ) -> Result<Option<FlowController>, ApplyError> {
        let config =
            FlowControlConfig::from_picker_config(&snapshot.picker_config).map_err(|e| {
                ApplyError::Config {
                    version: snapshot.version,
                    message: format!("flowControl: {e}"),
                }
            })?;
        let Some(config) = config else {
            return Ok(None);
        };
        if let Some(fc) = old.and_then(|o| o.flow.as_ref())
            && *fc.config() == config
        {
            return Ok(Some(fc.clone()));
        }
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(ApplyError::Config {
                version: snapshot.version,
                message: "flow control needs a running Tokio runtime for its dispatcher".into(),
            });
        }
        // The gate reads whatever snapshot is current at dispatch time (a weak handle: the
        // controller lives inside the state it reads, so a strong one would be a cycle).
        let weak = Arc::downgrade(&self.inner);
        let weak2 = weak.clone();
        let saturation = FnSaturation::new(
            move |_in_flight| {
                weak.upgrade()
                    .and_then(|i| i.current.load_full())
                    .map_or(0.0, |l| l.router.saturation(&l.candidates(Instant::now())))
            },
            move || {
                weak2
                    .upgrade()
                    .and_then(|i| i.current.load_full())
                    .is_some_and(|l| !l.endpoints.is_empty())
            },
        );
        Ok(Some(FlowController::with_metrics(
            config,
            Arc::new(saturation),
            Arc::clone(&self.inner.flow_metrics),
        )))
    }

    /// Refreshes the pool-level gauges (ready pods, averages, per-pod queue) and per-endpoint
    /// metric age, counting only endpoints whose metrics are younger than `staleness`.
    pub fn refresh_pool_gauges(&self, staleness: Duration) {
        let m = &self.inner.metrics;
        let Some(loaded) = self.current() else { return };
        let now = Instant::now();
        let pool = crate::metrics::PoolLabel {
            name: loaded.snapshot.pool.name.clone(),
        };
        m.pool_per_pod_queue.clear();
        m.endpoint_metrics_age.clear();
        m.endpoint_in_flight.clear();
        let (mut n, mut kv, mut queue, mut running) = (0u32, 0.0, 0.0, 0.0);
        for ep in &loaded.endpoints {
            m.endpoint_in_flight
                .get_or_create(&ep.labels)
                .set(i64::from(ep.in_flight.requests()));
            let Some((metrics, age)) = ep.metrics(now) else {
                continue;
            };
            m.endpoint_metrics_age
                .get_or_create(&ep.labels)
                .set(age.as_secs_f64());
            if age > staleness {
                continue;
            }
            n += 1;
            kv += metrics.kv_cache_usage;
            queue += f64::from(metrics.waiting_queue_size);
            running += f64::from(metrics.running_requests_size);
            m.pool_per_pod_queue
                .get_or_create(&crate::metrics::PerPodLabels {
                    name: pool.name.clone(),
                    model_server_pod: format!(
                        "{}-rank-{}",
                        ep.endpoint.key.pod, ep.endpoint.key.rank
                    ),
                })
                .set(i64::from(metrics.waiting_queue_size));
        }
        m.pool_ready_pods.get_or_create(&pool).set(i64::from(n));
        let avg = |x: f64| if n == 0 { 0.0 } else { x / f64::from(n) };
        m.pool_avg_kv.get_or_create(&pool).set(avg(kv));
        m.pool_avg_queue.get_or_create(&pool).set(avg(queue));
        m.pool_avg_running.get_or_create(&pool).set(avg(running));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_core::PoolRef;

    #[test]
    fn destination_joins_preformatted_addresses_with_ipv6_bracketed() {
        let state = PickerState::new(Arc::new(Metrics::new()), None, None);
        let addrs: Vec<SocketAddr> = ["[fd00::7]:8000", "10.0.0.1:8001"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let eps = addrs
            .iter()
            .map(|a| Endpoint::from_address("default", *a))
            .collect();
        let pool = PoolRef {
            namespace: "default".into(),
            name: "p".into(),
        };
        state
            .apply_snapshot(crate::standalone::snapshot(
                pool,
                1,
                eps,
                Default::default(),
            ))
            .unwrap();
        let loaded = state.current().unwrap();
        let cands = loaded.candidates(Instant::now());
        // Snapshot order is the snapshot's; the value follows the targets' order.
        let forward = loaded.destination(&cands);
        let mut reversed = cands.clone();
        reversed.reverse();
        let backward = loaded.destination(&reversed);
        let mut parts: Vec<&str> = forward.split(',').collect();
        assert_eq!(parts.len(), 2);
        assert!(parts.contains(&"[fd00::7]:8000") && parts.contains(&"10.0.0.1:8001"));
        parts.reverse();
        assert_eq!(backward, parts.join(","));
        assert_eq!(loaded.destination(&cands[..1]), parts[1]);
        // A target outside the snapshot (a plugin's own candidate) is still formatted.
        let stray = Candidate::new(
            Arc::new(Endpoint::from_address(
                "default",
                "[::1]:9".parse().unwrap(),
            )),
            EndpointMetrics::default(),
        );
        assert_eq!(loaded.destination(std::slice::from_ref(&stray)), "[::1]:9");
        // The metadata always carries the header's value: prebuilt for one target of the
        // snapshot, built for a list or a stray target.
        for targets in [
            &cands[..1],
            &cands[1..],
            &cands[..],
            &reversed[..],
            &[stray],
        ] {
            let (dest, md) = loaded.destination_and_metadata(targets);
            assert_eq!(dest, loaded.destination(targets));
            assert_eq!(md, crate::extproc::destination_metadata(&dest));
        }
    }
}
