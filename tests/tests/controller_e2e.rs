//! The controller in file mode (`--manifests DIR`) feeding two pickers over its gRPC config
//! stream, each behind a real Envoy, in front of simulated model servers:
//!
//! - editing the manifests changes where requests go within a second, on both pickers;
//! - a config the scheduler refuses changes nothing;
//! - killing the controller leaves routing working on the last good config;
//! - restarting it resyncs the pickers to what the manifests say now.
//!
//! The controller and the pickers run in-process (the controller binary's `Args::run_until`,
//! the picker's `config_client` with the binary's `cli::apply_fn`), the model servers are
//! `sluice-sim` servers, Envoy is the real one from the testkit harness.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::Parser;
use sluice_core::PoolRef;
use sluice_e2e::{Fleet, request};
use sluice_picker::PickerState;
use sluice_picker::config_client::{self, Backoff, ClientStatus, ConfigClientOptions};
use sluice_picker::metrics::Metrics;
use sluice_picker::scrape::ScrapeSettings;
use sluice_picker::server::Bound;
use sluice_sim::Preset;
use sluice_testkit::envoy::{Envoy, EnvoyOptions};
use sluice_testkit::process::free_ports;
use tokio::sync::watch;

const PRESET: Preset = Preset::H100Llama8b;
/// How fast a manifest edit must change routing.
const PROPAGATION_BUDGET: Duration = Duration::from_secs(1);

fn pool_ref() -> PoolRef {
    PoolRef {
        namespace: "default".into(),
        name: "e2e".into(),
    }
}

/// The pool selects `app: sim` pods on every simulator's port; each pod's active-ports
/// annotation limits it to its own simulator, so one pod is one endpoint although all
/// simulators share 127.0.0.1.
fn pool_yaml(ports: &[u16]) -> String {
    let target_ports: Vec<String> = ports.iter().map(|p| format!("{{number: {p}}}")).collect();
    format!(
        "apiVersion: inference.networking.k8s.io/v1\nkind: InferencePool\n\
         metadata: {{name: e2e}}\nspec:\n  selector: {{matchLabels: {{app: sim}}}}\n  \
         targetPorts: [{}]\n  endpointPickerRef: {{name: epp, port: {{number: 9002}}}}\n",
        target_ports.join(", ")
    )
}

fn pod_yaml(name: &str, port: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  labels: {{app: sim}}\n  \
         annotations: {{inference.networking.k8s.io/active-ports: \"{port}\"}}\n\
         status:\n  podIP: 127.0.0.1\n  conditions: [{{type: Ready, status: \"True\"}}]\n"
    )
}

fn epc_yaml(plugin: &str) -> String {
    format!(
        "apiVersion: sluice.dev/v1alpha1\nkind: EndpointPickerConfig\nmetadata: {{name: cfg}}\n\
         spec:\n  poolRef: {{name: e2e}}\n  plugins: [{{type: {plugin}}}, {{type: max-score-picker}}]\n  \
         schedulingProfiles: [{{name: default, plugins: [{{pluginRef: {plugin}}}, {{pluginRef: max-score-picker}}]}}]\n"
    )
}

struct Manifests {
    dir: PathBuf,
}

impl Manifests {
    fn new() -> Result<Manifests> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos();
        let dir = std::env::temp_dir().join(format!(
            "sluice-controller-e2e-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir)?;
        Ok(Manifests { dir })
    }

    /// Replaces a file atomically (write, then rename), as GitOps tools and editors do.
    fn write(&self, file: &str, docs: &[String]) -> Result<()> {
        let tmp = self.dir.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, docs.join("---\n"))?;
        std::fs::rename(&tmp, self.dir.join(file))?;
        Ok(())
    }

    fn pods(&self, fleet: &Fleet, which: &[usize]) -> Result<()> {
        let docs: Vec<String> = which
            .iter()
            .map(|&i| pod_yaml(&format!("sim-{i}"), fleet.servers[i].addr.port()))
            .collect();
        self.write("pods.yaml", &docs)
    }

    fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Manifests {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Controller {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<()>>,
}

impl Controller {
    fn start(dir: &Path, grpc: SocketAddr, metrics: SocketAddr) -> Result<Controller> {
        let args = sluice_controller::cli::Args::try_parse_from([
            "sluice-controller",
            "--manifests",
            dir.to_str().context("temp dir is UTF-8")?,
            "--grpc-addr",
            &grpc.to_string(),
            "--metrics-addr",
            &metrics.to_string(),
            "--poll-interval",
            "50ms",
            "--keepalive",
            "1s",
        ])?;
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(args.run_until(stop_rx));
        Ok(Controller { stop, task })
    }

    async fn kill(self) -> Result<()> {
        let _ = self.stop.send(true);
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .context("the controller did not stop")???;
        Ok(())
    }
}

/// A picker fed by the controller's stream, serving ext_proc for its Envoy.
struct ControlledPicker {
    state: PickerState,
    bound: Bound,
    status: watch::Receiver<ClientStatus>,
    _stop_client: watch::Sender<bool>,
    stop_server: Option<tokio::sync::oneshot::Sender<()>>,
}

impl ControlledPicker {
    async fn start(controller: SocketAddr, id: &str) -> Result<ControlledPicker> {
        let scrape = ScrapeSettings {
            interval: Duration::from_millis(50),
            ..Default::default()
        };
        let state = PickerState::new(
            Arc::new(Metrics::new()),
            Some(scrape),
            Some(pool_ref().to_string()),
        );
        let mut opts = ConfigClientOptions::new(format!("http://{controller}"), pool_ref(), id);
        opts.backoff = Backoff {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(250),
        };
        opts.keepalive = Duration::from_secs(1);
        let (stop_client, stop_client_rx) = watch::channel(false);
        let (status_tx, status) = watch::channel(ClientStatus::default());
        // The picker binary's own apply function (`--controller-address` mode).
        tokio::spawn(config_client::run_with_status(
            opts,
            sluice_picker::cli::apply_fn(state.clone()),
            stop_client_rx,
            status_tx,
        ));

        let (bound, stop_server) = sluice_e2e::serve_on_loopback(state.clone(), None).await?;
        Ok(ControlledPicker {
            state,
            bound,
            status,
            _stop_client: stop_client,
            stop_server: Some(stop_server),
        })
    }

    /// The endpoint addresses the picker routes with now.
    fn endpoints(&self) -> BTreeSet<SocketAddr> {
        self.state
            .current()
            .map(|l| l.endpoints.iter().map(|e| e.endpoint.address).collect())
            .unwrap_or_default()
    }

    fn plugin_types(&self) -> Vec<String> {
        self.state
            .current()
            .map(|l| {
                l.snapshot
                    .picker_config
                    .plugins
                    .iter()
                    .map(|p| p.type_.clone())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for ControlledPicker {
    fn drop(&mut self) {
        if let Some(s) = self.stop_server.take() {
            let _ = s.send(());
        }
    }
}

/// Waits until every picker routes with exactly `want`; returns how long that took.
async fn until_routing(
    pickers: &[&ControlledPicker],
    want: &BTreeSet<SocketAddr>,
    within: Duration,
) -> Result<Duration> {
    let start = Instant::now();
    loop {
        if pickers.iter().all(|p| p.endpoints() == *want) {
            return Ok(start.elapsed());
        }
        if start.elapsed() > within {
            let have: Vec<_> = pickers.iter().map(|p| p.endpoints()).collect();
            bail!("pickers route with {have:?}, not {want:?}, after {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Sends `n` completions through each gateway; every one must succeed. Returns how many
/// each simulator served meanwhile.
async fn traffic(gateways: &[SocketAddr], fleet: &Fleet, n: usize, tag: &str) -> Result<Vec<u64>> {
    let before: Vec<u64> = fleet.servers.iter().map(|s| s.admin.served()).collect();
    let model = Fleet::model(PRESET);
    for (g, gw) in gateways.iter().enumerate() {
        for i in 0..n {
            let body = serde_json::json!({"model": model, "prompt": format!("{tag} {g} {i}"), "max_tokens": 2});
            let r = request(
                *gw,
                "POST",
                "/v1/completions",
                &[],
                Bytes::from(body.to_string()),
            )
            .await?;
            if r.status != 200 {
                bail!(
                    "{tag}: request {i} via gateway {g} answered {}: {}",
                    r.status,
                    r.text()
                );
            }
        }
    }
    Ok(fleet
        .servers
        .iter()
        .zip(before)
        .map(|(s, b)| s.admin.served() - b)
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn controller_file_mode_drives_two_pickers_behind_envoy() -> Result<()> {
    let fleet = Fleet::start(3, PRESET, 50.0).await?;
    let addr = |i: usize| fleet.servers[i].addr;
    let ports: Vec<u16> = fleet.servers.iter().map(|s| s.addr.port()).collect();

    let manifests = Manifests::new()?;
    manifests.write("pool.yaml", &[pool_yaml(&ports)])?;
    manifests.pods(&fleet, &[0, 1])?;
    let free = free_ports(2)?;
    let grpc = SocketAddr::from(([127, 0, 0, 1], free[0]));
    let http = SocketAddr::from(([127, 0, 0, 1], free[1]));
    let controller = Controller::start(manifests.path(), grpc, http)?;

    let a = ControlledPicker::start(grpc, "picker-a").await?;
    let b = ControlledPicker::start(grpc, "picker-b").await?;
    let pickers = [&a, &b];
    until_routing(
        &pickers,
        &[addr(0), addr(1)].into(),
        Duration::from_secs(10),
    )
    .await?;

    let envoys = {
        let (ga, gb) = (a.bound.grpc, b.bound.grpc);
        tokio::task::spawn_blocking(move || -> Result<(Envoy, Envoy)> {
            Ok((
                Envoy::start(&EnvoyOptions::new(ga))?,
                Envoy::start(&EnvoyOptions::new(gb))?,
            ))
        })
        .await??
    };
    let gateways = [envoys.0.listen, envoys.1.listen];

    // 1. Both pickers route to the two pods of the manifests.
    let served = traffic(&gateways, &fleet, 8, "start").await?;
    assert_eq!(served[0] + served[1], 16, "{served:?}");
    assert_eq!(served[2], 0, "sim-2 is not in the pool yet: {served:?}");

    // 2. Edit the manifests: only sim-2 serves now. Both pickers switch within a second, and
    //    every request after that lands on sim-2.
    manifests.pods(&fleet, &[2])?;
    let took = until_routing(&pickers, &[addr(2)].into(), PROPAGATION_BUDGET)
        .await
        .context("a manifest edit must change routing within a second")?;
    eprintln!("manifest edit -> both pickers routing with it: {took:?}");
    let served = traffic(&gateways, &fleet, 8, "edited").await?;
    assert_eq!(served, [0, 0, 16], "every request follows the edit");

    // 3. An EndpointPickerConfig the scheduler accepts reaches both pickers; one it refuses
    //    does not, and routing carries on with the last good one.
    manifests.write("config.yaml", &[epc_yaml("queue-scorer")])?;
    let start = Instant::now();
    while !pickers
        .iter()
        .all(|p| p.plugin_types().contains(&"queue-scorer".to_owned()))
    {
        assert!(
            start.elapsed() < PROPAGATION_BUDGET,
            "config did not reach the pickers"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let applied_before = a.status.borrow().applied_version;
    manifests.write("config.yaml", &[epc_yaml("no-such-scorer")])?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        a.status.borrow().applied_version,
        applied_before,
        "a refused config is not published"
    );
    assert_eq!(
        a.status.borrow().refused,
        0,
        "the controller refused it, not the picker"
    );
    assert!(a.plugin_types().contains(&"queue-scorer".to_owned()));
    let served = traffic(&gateways, &fleet, 4, "bad-config").await?;
    assert_eq!(served, [0, 0, 8]);

    // 4. Kill the controller: pickers notice, and keep routing with the last good config.
    controller.kill().await?;
    for p in pickers {
        let mut st = p.status.clone();
        tokio::time::timeout(Duration::from_secs(5), st.wait_for(|s| !s.connected))
            .await
            .context("pickers notice the controller is gone")??;
    }
    let served = traffic(&gateways, &fleet, 8, "controller-down").await?;
    assert_eq!(served, [0, 0, 16], "routing works without the controller");

    // 5. While it is down the manifests change; a restarted controller resyncs both pickers.
    manifests.pods(&fleet, &[0])?;
    manifests.write("config.yaml", &[epc_yaml("kv-cache-utilization-scorer")])?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        a.endpoints(),
        [addr(2)].into(),
        "nothing changes while the controller is away"
    );
    let controller = Controller::start(manifests.path(), grpc, http)?;
    let took = until_routing(&pickers, &[addr(0)].into(), Duration::from_secs(5))
        .await
        .context("a restarted controller resyncs the pickers")?;
    eprintln!("controller restart -> pickers resynced: {took:?}");
    for p in pickers {
        assert!(
            p.plugin_types()
                .contains(&"kv-cache-utilization-scorer".to_owned())
        );
        assert!(p.status.borrow().connects >= 2, "{:?}", *p.status.borrow());
    }
    let served = traffic(&gateways, &fleet, 8, "resynced").await?;
    assert_eq!(served, [16, 0, 0]);

    controller.kill().await?;
    Ok(())
}
